/*
 * The cubicle test guest: a freestanding kernel that drives the VMM's boot
 * path and devices from inside a VM and reports on COM1.
 *
 * It checks what the VMM handed it (command line, e820 map or PVH memory
 * map, MP table, CPUID), wires COM1's receive interrupt through the IOAPIC
 * (PIC masked) and then runs a command loop. Options come from the kernel
 * command line:
 *
 *   cubicle.mem=N     guest RAM in bytes, checked against the memory map
 *   cubicle.cpus=N    vCPUs, checked against the MP table (N > 1)
 *   cubicle.token=S   echoed back as "token=S"
 *   cubicle.mode=M    exit | tick | idle | spin (default idle)
 *   cubicle.tick=N    loop iterations per tick in tick mode
 *
 * Commands (bytes on COM1, received by the interrupt handler):
 *   p  "pong N" (N counts commands so far)   c  "count N" (ticks so far)
 *   t  tick mode   i  idle mode (hlt)   s  spin mode (out 0x80 in a loop)
 *   m  probe unclaimed MMIO and ports, "mmio ok" when all read as ones
 *   r  "irqs line10=N": interrupts taken on IOAPIC pin 10
 *   e  execute popcnt, "popcnt 8" (the PVM emulator cannot)
 *   x  triple fault on purpose   q  "bye N", then reset through the i8042
 * Virtio devices named on the command line (virtio_mmio.device=...) are set
 * up before "ready"; virtio.c lists their commands. A decimal argument may
 * precede a command letter ("3R" reads from sector 3).
 *
 * Built with -mgeneral-regs-only -mno-red-zone: the PVM emulator that runs
 * CPL0 code on the development hosts rejects SSE, popcnt, cmpxchg16b, int N.
 */
#include "guest.h"

#define COM1 0x3f8
#define SERIAL_VECTOR 0x24
#define LINE10_VECTOR 0x2a
#define SPURIOUS_VECTOR 0xff

/* ---- freestanding support ---- */

void *memset(void *d, int c, unsigned long n)
{
	void *r = d;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return r;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	void *r = d;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return r;
}

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* ---- serial output (polled) ---- */

void putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, (u8)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void putu(u64 v)
{
	char b[21];
	int i = 20;
	b[i] = 0;
	do {
		b[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts(&b[i]);
}

void puthex(u64 v)
{
	static const char d[] = "0123456789abcdef";
	char b[19];
	int i = 18;
	b[i] = 0;
	do {
		b[--i] = d[v & 15];
		v >>= 4;
	} while (v);
	b[--i] = 'x';
	b[--i] = '0';
	puts(&b[i]);
}

/* ---- command line ---- */

const char *cmdline = "";

/* opt returns the value of "key=" in the command line, or 0. */
static const char *opt(const char *key)
{
	for (const char *p = cmdline; *p; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;
		while (*k && *q == *k)
			k++, q++;
		if (!*k && *q == '=')
			return q + 1;
	}
	return 0;
}

static u64 optnum(const char *key, u64 def)
{
	const char *v = opt(key);
	if (!v || *v < '0' || *v > '9')
		return def;
	u64 n = 0;
	while (*v >= '0' && *v <= '9')
		n = n * 10 + (u64)(*v++ - '0');
	return n;
}

static int optis(const char *key, const char *want)
{
	const char *v = opt(key);
	if (!v)
		return 0;
	while (*want && *v == *want)
		v++, want++;
	return !*want && (*v == 0 || *v == ' ');
}

static void putword(const char *s)
{
	while (*s && *s != ' ')
		putc(*s++);
}

/* ---- boot information ---- */

struct region {
	u64 addr, size;
	u32 type;
};

static struct region map[128];
static u32 nmap;

static void read_linux(u64 bp)
{
	u64 ptr = *(volatile u32 *)(bp + 0x228) | (u64) * (volatile u32 *)(bp + 0x0c8) << 32;
	cmdline = (const char *)ptr;
	nmap = *(volatile u8 *)(bp + 0x1e8);
	if (nmap > 128)
		nmap = 128;
	for (u32 i = 0; i < nmap; i++) {
		u64 e = bp + 0x2d0 + 20 * i;
		map[i].addr = rd64(e);
		map[i].size = rd64(e + 8);
		map[i].type = rd32(e + 16);
	}
	puts("boot linux64");
	if (rd32(bp + 0x202) == 0x53726448 && rd16(bp + 0x1fe) == 0xaa55 && rd8(bp + 0x210) == 0xff)
		puts(" header ok\n");
	else
		puts(" header bad\n");
}

static void read_pvh(u64 si)
{
	if (rd32(si) != 0x336ec578) {
		puts("boot pvh bad magic\n");
		return;
	}
	cmdline = (const char *)rd64(si + 24);
	u64 mm = rd64(si + 40);
	nmap = rd32(si + 48);
	if (nmap > 128)
		nmap = 128;
	for (u32 i = 0; i < nmap; i++) {
		u64 e = mm + 24 * i;
		map[i].addr = rd64(e);
		map[i].size = rd64(e + 8);
		map[i].type = rd32(e + 16);
	}
	puts("boot pvh header ok\n");
}

/* check_map verifies the memory map against cubicle.mem: sorted and
 * disjoint, RAM at 0 and from 1 MiB, nothing in the MMIO hole, and RAM
 * above 1 MiB adding up to mem - 1 MiB. */
static void check_map(void)
{
	u64 mem = optnum("cubicle.mem", 0), ram = 0, end = 0;
	const u64 hole = 0xc0000000ull, four = 0x100000000ull;
	const char *bad = 0;
	if (nmap < 3)
		bad = "few entries";
	for (u32 i = 0; i < nmap && !bad; i++) {
		struct region *r = &map[i];
		if (i && r->addr < map[i - 1].addr + map[i - 1].size)
			bad = "overlap or unsorted";
		else if (r->type == 1 && r->addr < four && r->addr + r->size > hole)
			bad = "RAM in MMIO hole";
		else if (r->type == 1 && r->addr >= 0x100000)
			ram += r->size;
		if (r->type == 1 && r->addr + r->size > end)
			end = r->addr + r->size;
	}
	if (!bad && (map[0].addr != 0 || map[0].type != 1))
		bad = "no RAM at 0";
	if (!bad && ram + 0x100000 != mem)
		bad = "RAM size";
	if (!bad && end != (mem > hole ? four + mem - hole : mem))
		bad = "RAM end";
	if (bad) {
		puts("e820 bad: ");
		puts(bad);
		puts(" ram=");
		putu(ram);
		puts("\n");
		return;
	}
	puts("e820 ok entries=");
	putu(nmap);
	puts(" ram=");
	putu(ram + 0x100000);
	puts("\n");
	/* Touch the last page of RAM below the hole. */
	u64 top = (mem < hole ? mem : hole) - 8;
	wr64(top, 0x5a5a5a5a12345678ull);
	puts(rd64(top) == 0x5a5a5a5a12345678ull ? "mem ok\n" : "mem bad\n");
}

static u8 sum(u64 a, u32 n)
{
	u8 s = 0;
	for (u32 i = 0; i < n; i++)
		s += rd8(a + i);
	return s;
}

/* check_mptable finds the MP floating pointer in the EBDA and counts the
 * enabled processors of the configuration table. */
static void check_mptable(void)
{
	u64 want = optnum("cubicle.cpus", 1);
	if (want < 2)
		return;
	for (u64 a = 0x9fc00; a < 0xa0000; a += 16) {
		if (rd32(a) != 0x5f504d5f) /* "_MP_" */
			continue;
		u64 t = rd32(a + 4);
		if (sum(a, 16) || rd32(t) != 0x504d4350 /* "PCMP" */ || sum(t, rd16(t + 4))) {
			puts("mp bad checksum\n");
			return;
		}
		u32 n = rd16(t + 34), cpus = 0, ioapic = 0;
		u64 e = t + 44;
		for (u32 i = 0; i < n; i++) {
			u8 type = rd8(e);
			if (type == 0) {
				cpus += rd8(e + 3) & 1;
				e += 20;
			} else {
				if (type == 2 && rd32(e + 4) == IOAPIC)
					ioapic++;
				e += 8;
			}
		}
		puts("mp cpus=");
		putu(cpus);
		puts(cpus == want && ioapic == 1 ? " ok\n" : " bad\n");
		return;
	}
	puts("mp missing\n");
}

static void report_cpuid(void)
{
	u32 a, b, c, d, max;
	cpuid(0x40000000, &max, &b, &c, &d);
	puts("cpuid hv=");
	puthex(max);
	cpuid(0x40000002, &a, &b, &c, &d);
	puts(" pvm=");
	puthex(max >= 0x40000002 ? b : 0);
	cpuid(0x80000008, &a, &b, &c, &d);
	puts(" physbits=");
	putu(a & 0xff);
	cpuid(1, &a, &b, &c, &d);
	puts(" apic=");
	putu(b >> 24);
	puts(" hypervisor=");
	putu(c >> 31);
	puts("\n");
}

/* ---- interrupts ---- */

struct gate {
	u16 off0, sel;
	u8 ist, attr;
	u16 off1;
	u32 off2, zero;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(16)));
static volatile u8 rx[256];
static volatile u32 rx_head, rx_tail;
static volatile u64 irqs, irqs10;

void set_gate(int v, void *h)
{
	u64 a = (u64)h;
	idt[v] = (struct gate){(u16)a, 0x10, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

static void lidt(void *base, u16 limit)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = {limit, (u64)base};
	__asm__ volatile("lidt %0" : : "m"(d));
}

static void triple_fault(void)
{
	lidt(0, 0);
	__asm__ volatile("ud2");
}

static void panic(const char *what, u64 rip)
{
	puts("PANIC ");
	puts(what);
	puts(" rip=");
	puthex(rip);
	puts("\n");
	triple_fault();
}

__attribute__((interrupt)) static void exc_de(struct iframe *f) { panic("#DE", f->rip); }
__attribute__((interrupt)) static void exc_ud(struct iframe *f) { panic("#UD", f->rip); }
__attribute__((interrupt)) static void exc_df(struct iframe *f, u64 e) { (void)e; panic("#DF", f->rip); }
__attribute__((interrupt)) static void exc_gp(struct iframe *f, u64 e) { (void)e; panic("#GP", f->rip); }
__attribute__((interrupt)) static void exc_pf(struct iframe *f, u64 e) { (void)e; panic("#PF", f->rip); }
__attribute__((interrupt)) static void exc_other(struct iframe *f) { panic("exception", f->rip); }
__attribute__((interrupt)) static void spurious(struct iframe *f) { (void)f; }

__attribute__((interrupt)) static void serial_irq(struct iframe *f)
{
	(void)f;
	(void)inb(COM1 + 2); /* IIR */
	while (inb(COM1 + 5) & 1) {
		u8 c = inb(COM1);
		if (rx_head - rx_tail < sizeof rx)
			rx[rx_head++ % sizeof rx] = c;
	}
	irqs++;
	eoi();
}

__attribute__((interrupt)) static void line10_irq(struct iframe *f)
{
	(void)f;
	irqs10++;
	eoi();
}

static void ioapic_write(u32 reg, u32 v)
{
	wr32(IOAPIC, reg);
	wr32(IOAPIC + 0x10, v);
}

/* ioapic_route sends IOAPIC pin to vector: fixed, physical, edge, active
 * high, to APIC 0. */
void ioapic_route(u32 pin, u8 vector)
{
	ioapic_write(0x10 + 2 * pin + 1, 0);
	ioapic_write(0x10 + 2 * pin, vector);
}

void eoi(void) { wr32(LAPIC + 0xb0, 0); }

static void setup_interrupts(void)
{
	for (int v = 0; v < 32; v++)
		set_gate(v, exc_other);
	set_gate(0, exc_de);
	set_gate(6, exc_ud);
	set_gate(8, exc_df);
	set_gate(13, exc_gp);
	set_gate(14, exc_pf);
	set_gate(SERIAL_VECTOR, serial_irq);
	set_gate(LINE10_VECTOR, line10_irq);
	set_gate(SPURIOUS_VECTOR, spurious);
	lidt(idt, sizeof idt - 1);
	/* Mask both 8259s: interrupts come through the IOAPIC. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	/* Enable the local APIC (spurious vector register), TPR 0. */
	wr32(LAPIC + 0x80, 0);
	wr32(LAPIC + 0xf0, 0x100 | SPURIOUS_VECTOR);
	/* IOAPIC pin 4 (COM1) and pin 10 (a device line the host pulses). */
	ioapic_route(4, SERIAL_VECTOR);
	ioapic_route(10, LINE10_VECTOR);
	/* COM1: 8N1, FIFO, OUT2, receive interrupt on. */
	outb(COM1 + 3, 0x03);
	outb(COM1 + 2, 0x07);
	outb(COM1 + 4, 0x0b);
	outb(COM1 + 1, 0x01);
	__asm__ volatile("sti");
}

/* ---- commands ---- */

static volatile u64 counter, ticks, cmds;

static void mmio_probe(void)
{
	u64 mem = optnum("cubicle.mem", 0);
	struct {
		u64 got, want;
	} r[9];
	int n = 0;
	r[n].got = rd32(0xd0000000ull), r[n++].want = 0xffffffffull;
	wr32(0xd0000000ull, 0x12345678);
	r[n].got = rd32(0xd0000000ull), r[n++].want = 0xffffffffull;
	r[n].got = rd64(0xfeb00000ull), r[n++].want = ~0ull;
	r[n].got = rd8(0xc0001000ull), r[n++].want = 0xff;
	r[n].got = rd16(0xe0000002ull), r[n++].want = 0xffff;
	if (mem && mem + 0x10000 < 0xc0000000ull)
		r[n].got = rd32(mem + 0x10000), r[n++].want = 0xffffffffull;
	r[n].got = inb(0x1234), r[n++].want = 0xff;
	r[n].got = inw(0x2000), r[n++].want = 0xffff;
	r[n].got = inl(0x3000), r[n++].want = 0xffffffffull;
	outb(0x5678, 0xaa);
	for (int i = 0; i < n; i++) {
		if (r[i].got != r[i].want) {
			puts("mmio bad ");
			putu((u64)i);
			puts(" ");
			puthex(r[i].got);
			puts("\n");
			return;
		}
	}
	puts("mmio ok\n");
}

static void reset(void)
{
	outb(0x64, 0xfe);
	puts("reset failed\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}

enum { MODE_IDLE, MODE_TICK, MODE_SPIN };

static u64 arg;

static int handle(u8 c, int mode)
{
	if (c >= '0' && c <= '9') {
		arg = arg * 10 + (u64)(c - '0');
		return mode;
	}
	u64 a = arg;
	arg = 0;
	if (virtio_cmd(c, a)) {
		cmds++;
		return mode;
	}
	switch (c) {
	case 'p':
		cmds++;
		puts("pong ");
		putu(cmds);
		puts("\n");
		break;
	case 'c':
		cmds++;
		puts("count ");
		putu(ticks);
		puts("\n");
		break;
	case 'r':
		cmds++;
		puts("irqs line10=");
		putu(irqs10);
		puts("\n");
		break;
	case 't':
		cmds++;
		return MODE_TICK;
	case 'i':
		cmds++;
		return MODE_IDLE;
	case 's':
		cmds++;
		return MODE_SPIN;
	case 'm':
		cmds++;
		mmio_probe();
		break;
	case 'e': {
		/* popcnt: native under VT-x/SVM, refused by the PVM emulator
		 * (KVM_EXIT_INTERNAL_ERROR). */
		u64 x = 0xf0f0, r;
		__asm__ volatile("popcnt %1, %0" : "=r"(r) : "r"(x));
		cmds++;
		puts("popcnt ");
		putu(r);
		puts("\n");
		break;
	}
	case 'x':
		puts("crashing\n");
		triple_fault();
		break;
	case 'q':
		cmds++;
		puts("bye ");
		putu(cmds);
		puts("\n");
		reset();
		break;
	}
	return mode;
}

void guest_main(u64 info, u64 pvh)
{
	if (pvh)
		read_pvh(info);
	else
		read_linux(info);
	puts("hello from guest\n");
	puts("cmdline [");
	puts(cmdline);
	puts("]\n");
	const char *tok = opt("cubicle.token");
	if (tok) {
		puts("token=");
		putword(tok);
		puts("\n");
	}
	check_map();
	check_mptable();
	report_cpuid();
	setup_interrupts();
	virtio_init();
	if (optis("cubicle.mode", "exit")) {
		puts("bye 0\n");
		reset();
	}
	int mode = MODE_IDLE;
	if (optis("cubicle.mode", "tick"))
		mode = MODE_TICK;
	else if (optis("cubicle.mode", "spin"))
		mode = MODE_SPIN;
	u64 every = optnum("cubicle.tick", 20000);
	if (!every)
		every = 1;
	puts("ready\n");
	for (;;) {
		while (rx_tail != rx_head)
			mode = handle(rx[rx_tail++ % sizeof rx], mode);
		switch (mode) {
		case MODE_TICK:
			if (++counter % every == 0) {
				ticks++;
				puts("tick ");
				putu(ticks);
				puts("\n");
			}
			break;
		case MODE_SPIN:
			outb(0x80, (u8)++counter);
			break;
		default:
			virtio_poll();
			__asm__ volatile("cli");
			if (rx_tail == rx_head && !virtio_pending())
				__asm__ volatile("sti; hlt");
			else
				__asm__ volatile("sti");
		}
	}
}

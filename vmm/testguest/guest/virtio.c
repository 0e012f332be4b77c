/*
 * virtio-mmio drivers of the cubicle test guest: just enough of virtio 1.2
 * (§2.7 split virtqueues, §4.2 virtio-mmio, §5.1 net, §5.2 block, §5.4
 * entropy, §5.10 socket) to drive cubicle's devices from inside a VM and
 * report what happened on COM1.
 *
 * Devices come from the kernel command line, as Linux finds them:
 * virtio_mmio.device=<size>@<base>:<irq>. Each is reset, negotiates
 * VIRTIO_F_VERSION_1 plus a few device bits, and gets QSZ-entry queues; its
 * interrupt (IOAPIC pin irq, vector 0x30 + irq) counts and acknowledges
 * the interrupt status. Requests wait with sti; hlt for their used-ring
 * entry and an interrupt, so every completion is taken through one.
 *
 * Commands (a decimal argument n may precede the letter):
 *   nR  read 8 sectors at n: "blk read n status=S fnv=0x.. head=<16 chars>"
 *   nW  write the last read buffer, each byte + 1, at n: "blk write n status=S"
 *   F   flush: "blk flush status=S"          I  "blk id <serial>"
 *   nP  post a read of 8 sectors at n without notifying the device
 *       ("blk posted n"); A waits for it and reports like R
 *   G   32 bytes from virtio-rng: "rng 32 <hex>"
 *   nC  vsock connect to host port n; the guest says "hello from cid C
 *       port n\n" once connected and echoes what it receives
 *   nN  broadcast an Ethernet frame of type 0x88b5 carrying "cubicle ping n"
 *   K   interrupts per device: "irqs blk=N rng=N vsock=N net=N"
 * Unprompted: host connections to vsock port 1234 are accepted and echoed
 * ("vsock accept port=1234"), other ports refused; a transport reset
 * prints "vsock reset cid=C"; frames of type 0x88b5 print "net rx ...".
 */
#include "guest.h"

#define QSZ 16
#define MAXDEV 8
#define VIRQ_VECTOR 0x30

/* virtio-mmio registers (§4.2.2). */
enum {
	R_MAGIC = 0x000, R_VERSION = 0x004, R_DEVICE_ID = 0x008, R_DEV_FEAT = 0x010,
	R_DEV_FEAT_SEL = 0x014, R_DRV_FEAT = 0x020, R_DRV_FEAT_SEL = 0x024,
	R_QUEUE_SEL = 0x030, R_QUEUE_NUM_MAX = 0x034, R_QUEUE_NUM = 0x038,
	R_QUEUE_READY = 0x044, R_QUEUE_NOTIFY = 0x050, R_ISR = 0x060, R_ISR_ACK = 0x064,
	R_STATUS = 0x070, R_DESC = 0x080, R_DRIVER = 0x090, R_DEVICE = 0x0a0, R_CONFIG = 0x100,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { ID_NET = 1, ID_BLK = 2, ID_RNG = 4, ID_VSOCK = 19 };
#define F_VERSION_1 (1ull << 32)
enum { D_NEXT = 1, D_WRITE = 2 };

struct desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};
struct vq {
	struct desc desc[QSZ] __attribute__((aligned(16)));
	struct {
		u16 flags, idx, ring[QSZ], used_event;
	} avail __attribute__((aligned(2)));
	struct {
		u16 flags, idx;
		struct {
			u32 id, len;
		} ring[QSZ];
		u16 avail_event;
	} used __attribute__((aligned(4)));
	u16 last_used, free_head, index;
	u64 base;
};
struct vdev {
	u64 base;
	u32 irq, id;
	u64 offered, accepted;
	volatile u64 irqs;
	struct vq *q[3];
};

static struct vdev devs[MAXDEV];
static int ndev;
static struct vq queues[3 * MAXDEV];
static int nqueues;
static struct vdev *blk, *rng, *vsock, *net;

static void putc_hex(u8 b)
{
	static const char d[] = "0123456789abcdef";
	putc(d[b >> 4]);
	putc(d[b & 15]);
}

static u64 fnv(const u8 *p, u64 n)
{
	u64 h = 0xcbf29ce484222325ull;
	for (u64 i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

/* ---- interrupts ---- */

static void virq(u32 pin)
{
	for (int i = 0; i < ndev; i++) {
		struct vdev *d = &devs[i];
		if (d->irq != pin)
			continue;
		u32 isr = rd32(d->base + R_ISR);
		wr32(d->base + R_ISR_ACK, isr);
		d->irqs++;
	}
	eoi();
}

#define VIRQ(n) \
	__attribute__((interrupt)) static void virq##n(struct iframe *f) { (void)f; virq(n); }
VIRQ(5) VIRQ(6) VIRQ(7) VIRQ(8) VIRQ(9) VIRQ(10) VIRQ(11) VIRQ(12) VIRQ(13) VIRQ(14)
VIRQ(15) VIRQ(16) VIRQ(17) VIRQ(18) VIRQ(19) VIRQ(20) VIRQ(21) VIRQ(22) VIRQ(23)
static void *const virq_handlers[24] = {
	[5] = virq5, [6] = virq6, [7] = virq7, [8] = virq8, [9] = virq9, [10] = virq10,
	[11] = virq11, [12] = virq12, [13] = virq13, [14] = virq14, [15] = virq15,
	[16] = virq16, [17] = virq17, [18] = virq18, [19] = virq19, [20] = virq20,
	[21] = virq21, [22] = virq22, [23] = virq23,
};

/* ---- virtqueues ---- */

static int used_pending(struct vq *q) { return *(volatile u16 *)&q->used.idx != q->last_used; }

/* post makes the chain starting at descriptor head available. */
static void post(struct vq *q, u16 head)
{
	u16 i = *(volatile u16 *)&q->avail.idx;
	q->avail.ring[i % QSZ] = head;
	barrier();
	*(volatile u16 *)&q->avail.idx = i + 1;
	barrier();
}

static void notify(struct vq *q) { wr32(q->base + R_QUEUE_NOTIFY, q->index); }

/* take returns the next used entry's head and length, or -1. */
static int take(struct vq *q, u32 *len)
{
	if (!used_pending(q))
		return -1;
	barrier();
	u16 slot = q->last_used++ % QSZ;
	if (len)
		*len = *(volatile u32 *)&q->used.ring[slot].len;
	return (int)*(volatile u32 *)&q->used.ring[slot].id;
}

/* wait sleeps until q has a used entry and d has taken an interrupt since
 * its count was seen (sampled before the request was made available), so
 * that every completion is seen through an interrupt. */
static void wait(struct vdev *d, struct vq *q, u64 seen)
{
	for (;;) {
		__asm__ volatile("cli");
		if (used_pending(q) && d->irqs != seen) {
			__asm__ volatile("sti");
			return;
		}
		__asm__ volatile("sti; hlt");
	}
}

static void setdesc(struct vq *q, u16 i, void *addr, u32 len, u16 flags)
{
	q->desc[i] = (struct desc){(u64)addr, len, flags, (u16)(i + 1)};
}

/* ---- device setup (§3.1.1, §4.2.3) ---- */

static u64 read_features(u64 b)
{
	wr32(b + R_DEV_FEAT_SEL, 0);
	u64 f = rd32(b + R_DEV_FEAT);
	wr32(b + R_DEV_FEAT_SEL, 1);
	return f | (u64)rd32(b + R_DEV_FEAT) << 32;
}

/* negotiate resets the device and offers acc; it reports whether the
 * device kept FEATURES_OK. */
static int negotiate(u64 b, u64 acc)
{
	wr32(b + R_STATUS, 0);
	wr32(b + R_STATUS, S_ACK);
	wr32(b + R_STATUS, S_ACK | S_DRIVER);
	wr32(b + R_DRV_FEAT_SEL, 0);
	wr32(b + R_DRV_FEAT, (u32)acc);
	wr32(b + R_DRV_FEAT_SEL, 1);
	wr32(b + R_DRV_FEAT, (u32)(acc >> 32));
	wr32(b + R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	return (rd32(b + R_STATUS) & S_FEATURES_OK) != 0;
}

static int setup_queue(struct vdev *d, u16 index)
{
	u64 b = d->base;
	wr32(b + R_QUEUE_SEL, index);
	if (rd32(b + R_QUEUE_NUM_MAX) < QSZ || nqueues == 3 * MAXDEV)
		return 0;
	struct vq *q = &queues[nqueues++];
	q->index = index;
	q->base = b;
	wr32(b + R_QUEUE_NUM, QSZ);
	/* Control registers take 32-bit accesses only (§4.2.2.2). */
	u64 a[3] = {(u64)q->desc, (u64)&q->avail, (u64)&q->used};
	for (int i = 0; i < 3; i++) {
		wr32(b + R_DESC + 0x10 * (u64)i, (u32)a[i]);
		wr32(b + R_DESC + 0x10 * (u64)i + 4, (u32)(a[i] >> 32));
	}
	wr32(b + R_QUEUE_READY, 1);
	d->q[index] = q;
	return 1;
}

static const char *type_name(u32 id)
{
	switch (id) {
	case ID_NET:
		return "net";
	case ID_BLK:
		return "blk";
	case ID_RNG:
		return "rng";
	case ID_VSOCK:
		return "vsock";
	}
	return "unknown";
}

static void vsock_start(void);
static void net_start(void);

static void probe(u64 base, u32 irq)
{
	if (ndev == MAXDEV || irq < 5 || irq > 23)
		return;
	if (rd32(base + R_MAGIC) != 0x74726976 || rd32(base + R_VERSION) != 2) {
		puts("virtio bad magic at ");
		puthex(base);
		puts("\n");
		return;
	}
	struct vdev *d = &devs[ndev];
	d->base = base;
	d->irq = irq;
	d->id = rd32(base + R_DEVICE_ID);
	d->offered = read_features(base);
	u64 want = F_VERSION_1, nq = 1;
	switch (d->id) {
	case ID_BLK:
		want |= 1 << 6 | 1 << 9; /* BLK_SIZE, FLUSH */
		break;
	case ID_NET:
		want |= 1 << 5; /* MAC */
		nq = 2;
		break;
	case ID_VSOCK:
		nq = 3;
		break;
	case ID_RNG:
		break;
	default:
		return;
	}
	/* A feature the device did not offer must be refused (§2.2.1). */
	int refused = !negotiate(base, (d->offered & want) | 1ull << 50);
	d->accepted = d->offered & want;
	if (!negotiate(base, d->accepted)) {
		puts("virtio features rejected\n");
		return;
	}
	for (u16 i = 0; i < nq; i++) {
		if (!setup_queue(d, i)) {
			puts("virtio queue setup failed\n");
			return;
		}
	}
	ioapic_route(irq, VIRQ_VECTOR + irq);
	set_gate(VIRQ_VECTOR + irq, virq_handlers[irq]);
	ndev++;
	wr32(base + R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	puts("virtio ");
	puts(type_name(d->id));
	puts(" base=");
	puthex(base);
	puts(" irq=");
	putu(irq);
	puts(" offered=");
	puthex(d->offered);
	puts(" accepted=");
	puthex(d->accepted);
	puts(refused ? " refuse ok\n" : " refuse bad\n");
	switch (d->id) {
	case ID_BLK:
		blk = d;
		break;
	case ID_RNG:
		rng = d;
		break;
	case ID_VSOCK:
		vsock = d;
		vsock_start();
		break;
	case ID_NET:
		net = d;
		net_start();
		break;
	}
}

static u64 parse_num(const char **pp, u64 radix)
{
	const char *p = *pp;
	u64 n = 0;
	for (;; p++) {
		u64 v;
		if (*p >= '0' && *p <= '9')
			v = (u64)(*p - '0');
		else if (radix == 16 && *p >= 'a' && *p <= 'f')
			v = (u64)(*p - 'a' + 10);
		else
			break;
		n = n * radix + v;
	}
	*pp = p;
	return n;
}

/* virtio_init probes every virtio_mmio.device=<size>@<base>:<irq>. */
void virtio_init(void)
{
	static const char key[] = "virtio_mmio.device=";
	for (const char *p = cmdline; *p; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;
		while (*k && *q == *k)
			k++, q++;
		if (*k)
			continue;
		parse_num(&q, 10);
		if (*q == 'K' || *q == 'k')
			q++;
		if (q[0] != '@' || q[1] != '0' || q[2] != 'x')
			continue;
		q += 3;
		u64 base = parse_num(&q, 16);
		if (*q++ != ':')
			continue;
		probe(base, (u32)parse_num(&q, 10));
	}
}

/* ---- block (§5.2) ---- */

static struct {
	u32 type, reserved;
	u64 sector;
} blk_hdr;
static u8 blk_buf[4096] __attribute__((aligned(4096)));
static u8 blk_status;
static u64 blk_posted = ~0ull;
static u64 blk_seen; /* blk->irqs when the request was made available */

enum { BLK_IN = 0, BLK_OUT = 1, BLK_FLUSH = 4, BLK_GET_ID = 8 };

static void blk_post(u32 type, u64 sector, u32 len)
{
	struct vq *q = blk->q[0];
	blk_hdr.type = type;
	blk_hdr.reserved = 0;
	blk_hdr.sector = sector;
	blk_status = 0xff;
	blk_seen = blk->irqs;
	/* header, then data (if any), then the status byte, chained */
	u16 n = 0;
	setdesc(q, n++, &blk_hdr, sizeof blk_hdr, D_NEXT);
	if (len)
		setdesc(q, n++, blk_buf, len, D_NEXT | (type == BLK_OUT ? 0 : D_WRITE));
	setdesc(q, n, &blk_status, 1, D_WRITE);
	post(q, 0);
}

static u8 blk_complete(void)
{
	wait(blk, blk->q[0], blk_seen);
	take(blk->q[0], 0);
	return *(volatile u8 *)&blk_status;
}

static void blk_report_read(u64 sector, u8 st)
{
	puts("blk read ");
	putu(sector);
	puts(" status=");
	putu(st);
	puts(" fnv=");
	puthex(fnv(blk_buf, sizeof blk_buf));
	puts(" head=");
	for (int i = 0; i < 16; i++) {
		u8 c = blk_buf[i];
		putc(c >= 0x20 && c < 0x7f ? (char)c : '.');
	}
	puts("\n");
}

static void blk_cmd(u8 c, u64 arg)
{
	u8 st;
	switch (c) {
	case 'R':
		blk_post(BLK_IN, arg, sizeof blk_buf);
		notify(blk->q[0]);
		blk_report_read(arg, blk_complete());
		break;
	case 'P':
		blk_posted = arg;
		blk_post(BLK_IN, arg, sizeof blk_buf);
		puts("blk posted ");
		putu(arg);
		puts("\n");
		break;
	case 'A':
		if (blk_posted == ~0ull) {
			puts("blk nothing posted\n");
			break;
		}
		blk_report_read(blk_posted, blk_complete());
		blk_posted = ~0ull;
		break;
	case 'W':
		for (u32 i = 0; i < sizeof blk_buf; i++)
			blk_buf[i]++;
		blk_post(BLK_OUT, arg, sizeof blk_buf);
		notify(blk->q[0]);
		st = blk_complete();
		puts("blk write ");
		putu(arg);
		puts(" status=");
		putu(st);
		puts("\n");
		break;
	case 'F':
		blk_post(BLK_FLUSH, 0, 0);
		notify(blk->q[0]);
		st = blk_complete();
		puts("blk flush status=");
		putu(st);
		puts("\n");
		break;
	case 'I':
		memset(blk_buf, 0, 21);
		blk_post(BLK_GET_ID, 0, 20);
		notify(blk->q[0]);
		st = blk_complete();
		puts("blk id ");
		puts(st == 0 ? (const char *)blk_buf : "?");
		puts("\n");
		break;
	}
}

/* ---- entropy (§5.4) ---- */

static u8 rng_buf[32];

static void rng_get(void)
{
	struct vq *q = rng->q[0];
	u32 len = 0;
	setdesc(q, 0, rng_buf, sizeof rng_buf, D_WRITE);
	q->desc[0].flags = D_WRITE;
	u64 seen = rng->irqs;
	post(q, 0);
	notify(q);
	wait(rng, q, seen);
	take(q, &len);
	puts("rng ");
	putu(len);
	puts(" ");
	for (u32 i = 0; i < len && i < sizeof rng_buf; i++)
		putc_hex(rng_buf[i]);
	puts("\n");
}

/* ---- socket (§5.10) ---- */

struct vsock_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
enum { C_FREE, C_CONNECTING, C_OPEN };
#define VSOCK_LISTEN 1234
#define VSOCK_BUF 65536
#define VSOCK_RXBUF 2048
#define NCONN 8

struct conn {
	int state;
	u32 lport, pport;
	u32 fwd_cnt, tx_cnt, peer_buf, peer_fwd;
};
static struct conn conns[NCONN];
static u64 vsock_cid;
static u32 next_lport = 49152;
static u8 vsock_rx[QSZ][VSOCK_RXBUF];
static u8 vsock_ev[QSZ][8];
static u8 vsock_tx[sizeof(struct vsock_hdr) + 1024];

static u64 read_cid(void) { return rd64(vsock->base + R_CONFIG); }

static void vsock_start(void)
{
	vsock_cid = read_cid();
	struct vq *rx = vsock->q[0], *ev = vsock->q[2];
	for (u16 i = 0; i < QSZ; i++) {
		rx->desc[i] = (struct desc){(u64)vsock_rx[i], VSOCK_RXBUF, D_WRITE, 0};
		post(rx, i);
		ev->desc[i] = (struct desc){(u64)vsock_ev[i], sizeof vsock_ev[i], D_WRITE, 0};
		post(ev, i);
	}
	notify(rx);
	notify(ev);
	puts("vsock cid=");
	putu(vsock_cid);
	puts("\n");
}

/* vsock_packet_out sends one packet and waits until the device took it. */
static void vsock_packet_out(struct conn *c, u32 lport, u32 pport, u16 op, u32 flags, const u8 *data, u32 len)
{
	struct vq *q = vsock->q[1];
	struct vsock_hdr *h = (struct vsock_hdr *)vsock_tx;
	*h = (struct vsock_hdr){vsock_cid, 2, lport, pport, len, 1, op, flags, VSOCK_BUF, c ? c->fwd_cnt : 0};
	if (len)
		memcpy(vsock_tx + sizeof *h, data, len);
	if (c)
		c->tx_cnt += len;
	q->desc[0] = (struct desc){(u64)vsock_tx, (u32)sizeof *h + len, 0, 0};
	u64 seen = vsock->irqs;
	post(q, 0);
	notify(q);
	wait(vsock, q, seen);
	take(q, 0);
}

/* vsock_send sends data in packets that fit the tx buffer (one packet
 * when there is no data). */
static void vsock_send(struct conn *c, u32 lport, u32 pport, u16 op, u32 flags, const u8 *data, u32 len)
{
	const u32 max = sizeof vsock_tx - sizeof(struct vsock_hdr);
	do {
		u32 n = len < max ? len : max;
		vsock_packet_out(c, lport, pport, op, flags, data, n);
		data += n;
		len -= n;
	} while (len);
}

static struct conn *find(u32 lport, u32 pport)
{
	for (int i = 0; i < NCONN; i++)
		if (conns[i].state != C_FREE && conns[i].lport == lport && conns[i].pport == pport)
			return &conns[i];
	return 0;
}

static struct conn *alloc_conn(u32 lport, u32 pport, int state)
{
	for (int i = 0; i < NCONN; i++) {
		if (conns[i].state == C_FREE) {
			conns[i] = (struct conn){state, lport, pport, 0, 0, 0, 0};
			return &conns[i];
		}
	}
	return 0;
}

/* conn_port is the port a connection is known by: the guest's listening
 * port for host-initiated ones, the host's port for the guest's own. */
static u32 conn_port(struct conn *c) { return c->lport == VSOCK_LISTEN ? c->lport : c->pport; }

static void put_port(const char *what, u32 port)
{
	puts("vsock ");
	puts(what);
	puts(" port=");
	putu(port);
	puts("\n");
}

static void send_hello(struct conn *c)
{
	static char msg[64];
	char *m = msg;
	const char *s = "hello from cid ";
	while (*s)
		*m++ = *s++;
	char digits[21];
	int n;
	for (int pass = 0; pass < 2; pass++) {
		u64 v = pass ? c->pport : vsock_cid;
		n = 0;
		do {
			digits[n++] = (char)('0' + v % 10);
			v /= 10;
		} while (v);
		while (n)
			*m++ = digits[--n];
		if (!pass) {
			s = " port ";
			while (*s)
				*m++ = *s++;
		}
	}
	*m++ = '\n';
	vsock_send(c, c->lport, c->pport, OP_RW, 0, (const u8 *)msg, (u32)(m - msg));
}

static void vsock_packet(const u8 *buf, u32 n)
{
	struct vsock_hdr h;
	if (n < sizeof h)
		return;
	memcpy(&h, buf, sizeof h);
	if (h.dst_cid != vsock_cid || h.type != 1)
		return;
	struct conn *c = find(h.dst_port, h.src_port);
	if (c) {
		c->peer_buf = h.buf_alloc;
		c->peer_fwd = h.fwd_cnt;
	}
	switch (h.op) {
	case OP_REQUEST:
		if (c || h.dst_port != VSOCK_LISTEN || !(c = alloc_conn(h.dst_port, h.src_port, C_OPEN))) {
			vsock_send(0, h.dst_port, h.src_port, OP_RST, 0, 0, 0);
			put_port("refuse", h.dst_port);
			break;
		}
		c->peer_buf = h.buf_alloc;
		c->peer_fwd = h.fwd_cnt;
		vsock_send(c, c->lport, c->pport, OP_RESPONSE, 0, 0, 0);
		put_port("accept", h.dst_port);
		break;
	case OP_RESPONSE:
		if (c && c->state == C_CONNECTING) {
			c->state = C_OPEN;
			put_port("connected", c->pport);
			send_hello(c);
		}
		break;
	case OP_RW:
		if (!c || c->state != C_OPEN || h.len > n - sizeof h)
			break;
		c->fwd_cnt += h.len;
		if (c->tx_cnt + h.len - c->peer_fwd > c->peer_buf) {
			puts("vsock no credit\n");
			break;
		}
		vsock_send(c, c->lport, c->pport, OP_RW, 0, buf + sizeof h, h.len);
		break;
	case OP_CREDIT_REQUEST:
		if (c)
			vsock_send(c, c->lport, c->pport, OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case OP_SHUTDOWN:
		if (c) {
			vsock_send(c, c->lport, c->pport, OP_RST, 0, 0, 0);
			put_port("closed", conn_port(c));
			c->state = C_FREE;
		}
		break;
	case OP_RST:
		if (c) {
			put_port(c->state == C_CONNECTING ? "refused" : "reset", conn_port(c));
			c->state = C_FREE;
		}
		break;
	}
}

static void vsock_connect(u32 port)
{
	struct conn *c = alloc_conn(next_lport++, port, C_CONNECTING);
	if (!c) {
		puts("vsock too many connections\n");
		return;
	}
	vsock_send(c, c->lport, port, OP_REQUEST, 0, 0, 0);
	put_port("connect", port);
}

/* vsock_poll takes the rx queue before the event queue, in the order of
 * Linux's virtio-mmio interrupt handler: a REQUEST the device sent before
 * the guest handled a TRANSPORT_RESET meets the state from before it. */
static void vsock_poll(void)
{
	struct vq *rx = vsock->q[0], *ev = vsock->q[2];
	int head;
	u32 len;
	while ((head = take(rx, &len)) >= 0) {
		if (head < QSZ)
			vsock_packet(vsock_rx[head], len);
		post(rx, (u16)head);
		notify(rx);
	}
	while ((head = take(ev, &len)) >= 0) {
		if (len >= 4 && *(volatile u32 *)vsock_ev[head] == 0) { /* TRANSPORT_RESET */
			for (int i = 0; i < NCONN; i++)
				conns[i].state = C_FREE;
			vsock_cid = read_cid();
			puts("vsock reset cid=");
			putu(vsock_cid);
			puts("\n");
		}
		post(ev, (u16)head);
		notify(ev);
	}
}

/* ---- network (§5.1) ---- */

#define NET_HDR 12
#define NET_BUF 2048
static u8 net_mac[6];
static u8 net_rx[QSZ][NET_BUF];
static u8 net_tx[NET_HDR + 128];

static void put_mac(const u8 *m)
{
	for (int i = 0; i < 6; i++) {
		if (i)
			putc(':');
		putc_hex(m[i]);
	}
}

static void net_start(void)
{
	for (int i = 0; i < 6; i++)
		net_mac[i] = rd8(net->base + R_CONFIG + (u64)i);
	struct vq *rx = net->q[0];
	for (u16 i = 0; i < QSZ; i++) {
		rx->desc[i] = (struct desc){(u64)net_rx[i], NET_BUF, D_WRITE, 0};
		post(rx, i);
	}
	notify(rx);
	puts("net mac=");
	put_mac(net_mac);
	puts("\n");
}

static void net_send(u64 n)
{
	struct vq *q = net->q[1];
	u8 *f = net_tx + NET_HDR;
	memset(net_tx, 0, sizeof net_tx);
	memset(f, 0xff, 6);
	memcpy(f + 6, net_mac, 6);
	f[12] = 0x88, f[13] = 0xb5;
	char *p = (char *)f + 14;
	const char *s = "cubicle ping ";
	while (*s)
		*p++ = *s++;
	char digits[21];
	int k = 0;
	do {
		digits[k++] = (char)('0' + n % 10);
		n /= 10;
	} while (n);
	while (k)
		*p++ = digits[--k];
	*p++ = '\n';
	u32 len = NET_HDR + 64; /* minimum Ethernet frame without FCS: 60 */
	q->desc[0] = (struct desc){(u64)net_tx, len, 0, 0};
	u64 seen = net->irqs;
	post(q, 0);
	notify(q);
	wait(net, q, seen);
	take(q, 0);
	puts("net tx\n");
}

static void net_poll(void)
{
	struct vq *rx = net->q[0];
	int head;
	u32 len;
	while ((head = take(rx, &len)) >= 0) {
		u8 *f = net_rx[head % QSZ] + NET_HDR;
		if (len >= NET_HDR + 14 && f[12] == 0x88 && f[13] == 0xb5) {
			puts("net rx len=");
			putu(len - NET_HDR);
			puts(" from=");
			put_mac(f + 6);
			puts(" ");
			for (u32 i = 14; i < len - NET_HDR && f[i] >= 0x20 && f[i] < 0x7f; i++)
				putc((char)f[i]);
			puts("\n");
		}
		post(rx, (u16)head);
		notify(rx);
	}
}

/* ---- commands ---- */

/* virtio_cmd runs command c; it returns 0 for letters it does not know. */
int virtio_cmd(u8 c, u64 arg)
{
	switch (c) {
	case 'R':
	case 'W':
	case 'F':
	case 'I':
	case 'P':
	case 'A':
		if (blk)
			blk_cmd(c, arg);
		else
			puts("no blk\n");
		return 1;
	case 'G':
		if (rng)
			rng_get();
		else
			puts("no rng\n");
		return 1;
	case 'C':
		if (vsock)
			vsock_connect((u32)arg);
		else
			puts("no vsock\n");
		return 1;
	case 'N':
		if (net)
			net_send(arg);
		else
			puts("no net\n");
		return 1;
	case 'K': {
		static const u32 ids[] = {ID_BLK, ID_RNG, ID_VSOCK, ID_NET};
		puts("irqs");
		for (int i = 0; i < 4; i++) {
			for (int j = 0; j < ndev; j++) {
				if (devs[j].id == ids[i]) {
					puts(" ");
					puts(type_name(ids[i]));
					puts("=");
					putu(devs[j].irqs);
				}
			}
		}
		puts("\n");
		return 1;
	}
	}
	return 0;
}

/* virtio_pending reports whether a device has something for virtio_poll. */
int virtio_pending(void)
{
	return (vsock && (used_pending(vsock->q[0]) || used_pending(vsock->q[2]))) ||
	       (net && used_pending(net->q[0]));
}

/* virtio_poll handles what the host sent unprompted. */
void virtio_poll(void)
{
	if (vsock)
		vsock_poll();
	if (net)
		net_poll();
}

/*
 * Shared declarations of the cubicle test guest (guest.c: boot checks,
 * console, interrupts, command loop; virtio.c: virtio-mmio drivers).
 */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define LAPIC 0xfee00000ull
#define IOAPIC 0xfec00000ull

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void wr64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

struct iframe {
	u64 rip, cs, rflags, rsp, ss;
};

void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);

/* guest.c */
extern const char *cmdline;
void putc(char c);
void puts(const char *s);
void putu(u64 v);
void puthex(u64 v);
void set_gate(int v, void *h);
void ioapic_route(u32 pin, u8 vector);
void eoi(void);

/* virtio.c */
void virtio_init(void);
int virtio_cmd(u8 c, u64 arg);
void virtio_poll(void);
int virtio_pending(void);

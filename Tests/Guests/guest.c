/*
 * hv-testguest: a freestanding multiboot v1 guest for hv's integration
 * tests and benchmarks. The command line picks a mode; every mode talks
 * only through the COM1 16550 and ends with all CPUs in `cli; hlt`.
 * The output strings are a contract with the tests: change them together.
 */

#include <stdarg.h>
#include <stdint.h>

#define MB_BOOT_MAGIC   0x2BADB002u
#define MBI_MEM         (1u << 0)
#define MBI_CMDLINE     (1u << 2)

#define COM1            0x3F8
#define UART_THR        (COM1 + 0)
#define UART_DLL        (COM1 + 0)
#define UART_IER        (COM1 + 1)
#define UART_DLM        (COM1 + 1)
#define UART_FCR        (COM1 + 2)
#define UART_LCR        (COM1 + 3)
#define UART_MCR        (COM1 + 4)
#define UART_LSR        (COM1 + 5)
#define UART_SCR        (COM1 + 7)
#define UART_RBR        (COM1 + 0)
#define LSR_DR          0x01
#define LSR_THRE        0x20

#define APIC_BASE       0xFEE00000u
#define APIC_ID         0x020
#define APIC_SVR        0x0F0
#define APIC_ICR_LO     0x300
#define APIC_ICR_HI     0x310
#define APIC_SVR_ENABLE 0x100
#define ICR_PENDING     (1u << 12)
#define ICR_INIT_ALL    0x000C4500u     /* all-excluding-self, INIT, level assert */
#define ICR_SIPI_ALL    0x000C4608u     /* all-excluding-self, STARTUP, vector 0x08 */

#define TRAMP_BASE      0x8000
/* Emulated instructions cost ~1 us, so keep IPI gaps short rather than timed. */
#define IPI_GAP_SPINS   200
#define ICR_WAIT_SPINS  100000
/*
 * The AP wait is bounded in TSC cycles, not pause iterations: on software
 * KVM (kvm_pvm) a pause measured ~10k cycles, about 100x bare metal.
 * 2^32 cycles is 1-2 s at common TSC rates; bring-up takes a few ms.
 */
#define SMP_WAIT_CYCLES (1ull << 32)

#define LINE_LEN        64              /* throughput: 63 'x' + '\n' */

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower;
    uint32_t mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
};

struct config {
    char mode[16];
    uint32_t port;
    uint32_t cpus, lines, count, bytes, delay;
};

extern const char tramp_start[], tramp_end[];

static volatile uint32_t console_lock;
static volatile uint32_t aps_online;

/* ---- port I/O and CPU helpers ---- */

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_pause(void)
{
    __asm__ volatile("pause" : : : "memory");
}

static void spin(uint32_t n)
{
    while (n--)
        cpu_pause();
}

static inline volatile uint32_t *apic_reg(uint32_t reg)
{
    return (volatile uint32_t *)(APIC_BASE + reg);
}

/* ---- serial console ---- */

static void serial_init(void)
{
    outb(UART_IER, 0x00);
    outb(UART_LCR, 0x80);               /* DLAB on: next two writes set the divisor */
    outb(UART_DLL, 0x01);               /* 115200 baud */
    outb(UART_DLM, 0x00);
    outb(UART_LCR, 0x03);               /* 8N1, DLAB off */
    outb(UART_FCR, 0x07);
    outb(UART_MCR, 0x03);
}

static void serial_putc(char c)
{
    while (!(inb(UART_LSR) & LSR_THRE))
        ;
    outb(UART_THR, (uint8_t)c);
}

static void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

/*
 * 64-by-32 division built from two 32-bit `divl`s, so the link needs no
 * libgcc (__udivdi3). The second divide cannot overflow: its high half
 * is the first remainder, which is below d.
 */
static uint32_t divmod64(uint64_t *n, uint32_t d)
{
    uint32_t hi = (uint32_t)(*n >> 32), lo = (uint32_t)*n;
    uint32_t qhi = hi / d, rem = hi % d, qlo;

    __asm__("divl %4" : "=a"(qlo), "=d"(rem) : "a"(lo), "d"(rem), "rm"(d));
    *n = ((uint64_t)qhi << 32) | qlo;
    return rem;
}

static void put_number(uint64_t v, uint32_t base, int width, char pad)
{
    char digits[20];
    int n = 0;

    do
        digits[n++] = "0123456789abcdef"[divmod64(&v, base)];
    while (v);
    for (; width > n; width--)
        serial_putc(pad);
    while (n)
        serial_putc(digits[--n]);
}

/* Supports %u, %x, %s, %llu, %% with an optional zero flag and width. */
static void kvprintf(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, is_long_long = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        for (; *fmt >= '0' && *fmt <= '9'; fmt++)
            width = width * 10 + (*fmt - '0');
        if (fmt[0] == 'l' && fmt[1] == 'l') {
            is_long_long = 1;
            fmt += 2;
        }
        switch (*fmt) {
        case 'u':
        case 'x': {
            uint64_t v = is_long_long ? va_arg(ap, uint64_t) : va_arg(ap, uint32_t);
            put_number(v, *fmt == 'x' ? 16 : 10, width, pad);
            break;
        }
        case 's':
            serial_puts(va_arg(ap, const char *));
            break;
        case '%':
            serial_putc('%');
            break;
        default:
            return;                     /* malformed format: stop rather than misread args */
        }
    }
}

/* Every line goes out under one lock because the APs share the port. */
static void kprintf(const char *fmt, ...)
{
    va_list ap;

    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        cpu_pause();
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
    __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

/* ---- command line ---- */

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n';
}

/* If [tok, end) is `key=...`, returns the value's start, else 0. */
static const char *token_value(const char *tok, const char *end, const char *key)
{
    while (*key && tok < end && *tok == *key)
        tok++, key++;
    return *key == '\0' ? tok : 0;
}

static uint32_t parse_u32(const char *s, const char *end)
{
    uint32_t v = 0;

    for (; s < end && *s >= '0' && *s <= '9'; s++)
        v = v * 10 + (uint32_t)(*s - '0');
    return v;
}

static void parse_cmdline(const char *s, struct config *cfg)
{
    while (*s) {
        while (is_space(*s))
            s++;
        const char *tok = s, *v;
        while (*s && !is_space(*s))
            s++;
        if (tok == s)
            break;

        if ((v = token_value(tok, s, "mode="))) {
            uint32_t n = 0;
            while (v < s && n < sizeof(cfg->mode) - 1)
                cfg->mode[n++] = *v++;
            cfg->mode[n] = '\0';
        } else if ((v = token_value(tok, s, "cpus="))) {
            cfg->cpus = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "lines="))) {
            cfg->lines = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "count="))) {
            cfg->count = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "bytes="))) {
            cfg->bytes = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "delay="))) {
            cfg->delay = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "port="))) {
            cfg->port = parse_u32(v, s);
        }
    }
}

/* ---- modes ---- */

static void mode_hello(const struct multiboot_info *mbi)
{
    kprintf("hello from hv-testguest\n");
    if (!mbi) {
        kprintf("mbi: none\n");
        return;
    }
    if (mbi->flags & MBI_MEM)
        kprintf("mbi: flags=0x%x mem_lower=%u mem_upper=%u\n",
                mbi->flags, mbi->mem_lower, mbi->mem_upper);
    else
        kprintf("mbi: flags=0x%x\n", mbi->flags);
    if ((mbi->flags & MBI_CMDLINE) && mbi->cmdline)
        kprintf("cmdline: %s\n", (const char *)mbi->cmdline);
}

static void apic_send_ipi(uint32_t icr_lo)
{
    *apic_reg(APIC_ICR_HI) = 0;         /* the shorthand ignores it; keep it defined */
    *apic_reg(APIC_ICR_LO) = icr_lo;
    for (uint32_t i = 0; i < ICR_WAIT_SPINS && (*apic_reg(APIC_ICR_LO) & ICR_PENDING); i++)
        cpu_pause();
}

/* Called by entry.S on each AP's own stack; returning halts the AP. */
void ap_main(void)
{
    kprintf("cpu %u online\n", *apic_reg(APIC_ID) >> 24);
    __atomic_fetch_add(&aps_online, 1, __ATOMIC_RELEASE);
}

static void mode_smp(uint32_t cpus)
{
    uint32_t want = cpus ? cpus - 1 : 0;

    if (want) {
        uint32_t len = (uint32_t)(tramp_end - tramp_start);
        void *dst = (void *)TRAMP_BASE;
        const void *src = tramp_start;
        __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(len) : : "memory");

        *apic_reg(APIC_SVR) |= APIC_SVR_ENABLE;
        apic_send_ipi(ICR_INIT_ALL);
        spin(IPI_GAP_SPINS);
        apic_send_ipi(ICR_SIPI_ALL);
        spin(IPI_GAP_SPINS);
        apic_send_ipi(ICR_SIPI_ALL);    /* ignored by APs the first one started */
    }

    uint64_t start = rdtsc();
    while (__atomic_load_n(&aps_online, __ATOMIC_ACQUIRE) < want && rdtsc() - start < SMP_WAIT_CYCLES)
        cpu_pause();

    uint32_t n = __atomic_load_n(&aps_online, __ATOMIC_ACQUIRE) + 1;
    if (n - 1 < want)
        kprintf("smp: timeout, %u of %u cpus online\n", n, cpus);
    else
        kprintf("smp: %u cpus online\n", n);
}

static void mode_flood(uint32_t lines, uint32_t delay)
{
    for (uint32_t i = 0; i < lines; i++) {
        kprintf("line %05u\n", i);
        spin(delay);
    }
}

/*
 * An IDT with limit 0 turns the #UD into #GP, then #DF, then a shutdown.
 * A fault rather than int3: on the kvm_pvm backend a soft interrupt (int3,
 * int n) whose delivery faults ends in KVM_EXIT_INTERNAL_ERROR (emulation
 * failure) instead of the shutdown.
 */
static void mode_triple(void)
{
    static const struct __attribute__((packed)) {
        uint16_t limit;
        uint32_t base;
    } empty_idt = { 0, 0 };

    __asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
}

static void mode_pioread(uint32_t count)
{
    uint64_t start = rdtsc();
    for (uint32_t i = 0; i < count; i++)
        (void)inb(UART_SCR);
    uint64_t cycles = rdtsc() - start;

    kprintf("pioread: count=%u cycles=%llu\n", count, cycles);
}

/* Exactly `bytes` bytes; the last line is cut short but still ends in '\n'. */
static void mode_throughput(uint32_t bytes)
{
    for (uint32_t i = 0; i < bytes; i++)
        serial_putc((i % LINE_LEN == LINE_LEN - 1 || i == bytes - 1) ? '\n' : 'x');
    kprintf("throughput: bytes=%u\n", bytes);
}

/* Read an I/O port `count` times (decimal `port=`): drives a test device's register path. */
static void mode_probe(uint32_t port, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++)
        kprintf("probe: port=0x%x value=0x%x\n", port, inb((uint16_t)port));
}

static uint8_t cmos_read(uint8_t reg)
{
    outb(0x70, reg);
    return inb(0x71);
}

static uint32_t from_bcd(uint8_t v, int bcd)
{
    return bcd ? (uint32_t)(v >> 4) * 10 + (v & 0x0F) : v;
}

/* Read the RTC the way firmware does (wait out an update, honour BCD/binary) and print it in
 * ISO 8601, so a test can compare it with the host's clock. */
static void mode_rtc(void)
{
    for (uint32_t spins = 0; (cmos_read(0x0A) & 0x80) && spins < 1000000; spins++)
        cpu_pause();
    int bcd = !(cmos_read(0x0B) & 0x04);
    uint32_t sec = from_bcd(cmos_read(0x00), bcd), min = from_bcd(cmos_read(0x02), bcd);
    uint32_t hour = from_bcd(cmos_read(0x04), bcd), day = from_bcd(cmos_read(0x07), bcd);
    uint32_t month = from_bcd(cmos_read(0x08), bcd), year = from_bcd(cmos_read(0x09), bcd);
    uint32_t century = from_bcd(cmos_read(0x32), bcd);
    kprintf("rtc: %u%s%u-%s%u-%s%uT%s%u:%s%u:%s%uZ\n", century, year < 10 ? "0" : "", year,
            month < 10 ? "0" : "", month, day < 10 ? "0" : "", day, hour < 10 ? "0" : "", hour,
            min < 10 ? "0" : "", min, sec < 10 ? "0" : "", sec);
}

/* ---- RTC periodic interrupts through the PIC ---- */

struct idt_gate {
    uint16_t offset_lo, selector;
    uint8_t zero, type;
    uint16_t offset_hi;
} __attribute__((packed));

static struct idt_gate idt[256];
static volatile uint32_t rtc_ticks;

/* The interrupt entry: save registers, run the C handler, return from the interrupt. This
 * machine's software KVM cannot emulate `iret`, so the return is done by hand: turn the
 * same-privilege frame [EIP][CS][EFLAGS] into [EFLAGS][EIP], then `popfl; ret` (CS is unchanged). */
void rtc_stub(void);
__asm__(".globl rtc_stub\nrtc_stub:\n"
        " pushal\n cld\n call rtc_isr\n popal\n"
        " push %eax\n"              /* [eax][EIP][CS][EFL] */
        " mov 4(%esp), %eax\n"      /* eax = EIP */
        " xchg %eax, 12(%esp)\n"    /* [eax][EIP][CS][EIP], eax = EFL */
        " mov %eax, 8(%esp)\n"      /* [eax][EIP][EFL][EIP] */
        " pop %eax\n"               /* [EIP][EFL][EIP] */
        " add $4, %esp\n"           /* [EFL][EIP] */
        " popfl\n ret\n");

void rtc_isr(void)
{
    (void)cmos_read(0x0C);  /* acknowledge: reading register C lowers IRQ 8 */
    rtc_ticks++;
    outb(0xA0, 0x20);       /* EOI to the slave PIC, then the master */
    outb(0x20, 0x20);
}

/* Remap the PICs to vectors 0x20–0x2F, unmask only IRQ 2 (cascade) and IRQ 8, enable the RTC's
 * periodic interrupt at 64 Hz and count `count` of them while halted with interrupts on. */
static void mode_rtcirq(uint32_t count)
{
    uint32_t handler = (uint32_t)rtc_stub;
    idt[0x28] = (struct idt_gate){ (uint16_t)handler, 0x08, 0, 0x8E, (uint16_t)(handler >> 16) };
    struct { uint16_t limit; uint32_t base; } __attribute__((packed)) idtr = { sizeof idt - 1, (uint32_t)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));

    outb(0x20, 0x11); outb(0xA0, 0x11);   /* ICW1: edge, cascade, ICW4 follows */
    outb(0x21, 0x20); outb(0xA1, 0x28);   /* ICW2: vector bases */
    outb(0x21, 0x04); outb(0xA1, 0x02);   /* ICW3: slave on IRQ 2 */
    outb(0x21, 0x01); outb(0xA1, 0x01);   /* ICW4: 8086 mode */
    outb(0x21, 0xFB); outb(0xA1, 0xFE);   /* masks */

    outb(0x70, 0x0A); outb(0x71, 0x2A);   /* 32.768 kHz base, rate 10 = 64 Hz */
    outb(0x70, 0x0B); outb(0x71, (uint8_t)(cmos_read(0x0B) | 0x40));  /* PIE */
    (void)cmos_read(0x0C);
    uint64_t start = rdtsc();
    while (rtc_ticks < count)
        __asm__ volatile("sti; hlt; cli");
    uint64_t cycles = rdtsc() - start;
    outb(0x70, 0x0B); outb(0x71, (uint8_t)(cmos_read(0x0B) & ~0x40));
    kprintf("rtcirq: %u periodic interrupts, cycles=%llu\n", rtc_ticks, cycles);
}

/* Stay up without using the CPU: mask every PIC line (the LAPIC timer is off at reset), then
 * halt with interrupts enabled, which the hypervisor must NOT take for power-off. */
static void mode_idle(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    kprintf("idle: ready\n");
    for (;;)
        __asm__ volatile("sti; hlt");
}

/* Echo serial input back in upper case until a '.' arrives: proves host input reaches the
 * guest through the device's receive path. */
static void mode_echo(void)
{
    kprintf("echo: ready\n");
    for (;;) {
        while (!(inb(UART_LSR) & LSR_DR))
            cpu_pause();
        char c = (char)inb(UART_RBR);
        if (c == '.')
            break;
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        serial_putc(c);
    }
    kprintf("\necho: end\n");
}

/* PCI configuration mechanism #1. */
static uint32_t pci_read(uint32_t bdf, uint32_t reg)
{
    outl(0xCF8, 0x80000000u | bdf << 8 | (reg & 0xFC));
    return inl(0xCFC);
}

static void pci_write(uint32_t bdf, uint32_t reg, uint32_t v)
{
    outl(0xCF8, 0x80000000u | bdf << 8 | (reg & 0xFC));
    outl(0xCFC, v);
}

/*
 * pcibar: find the 1234:11e9 test function on bus 0, size its BARs, place BAR 0 (memory) and
 * BAR 1 (I/O) at addresses of the guest's choosing, and check accesses reach the device there,
 * follow a move, stop when decoding is off, and are refused over guest RAM.
 */
static void mode_pcibar(void)
{
    uint32_t bdf = 0xFFFF;
    for (uint32_t dev = 0; dev < 32; dev++) {
        uint32_t id = pci_read(dev << 3, 0);
        if (id != 0xFFFFFFFFu)
            kprintf("pcibar: 00:%x.0 id=%x class=%x\n", dev, id, pci_read(dev << 3, 8) >> 8);
        if (id == 0x11E91234u)
            bdf = dev << 3;
    }
    if (bdf == 0xFFFF) { kprintf("pcibar: test function not found\n"); return; }
    pci_write(bdf, 0x10, 0xFFFFFFFFu);
    pci_write(bdf, 0x14, 0xFFFFFFFFu);
    kprintf("pcibar: sizing bar0=%x bar1=%x bar2=%x\n", pci_read(bdf, 0x10), pci_read(bdf, 0x14), pci_read(bdf, 0x18));
    pci_write(bdf, 0x10, 0xE0000000u);
    pci_write(bdf, 0x14, 0xC100);
    pci_write(bdf, 0x04, 0x3);  /* memory and I/O decode */
    kprintf("pcibar: bar0=%x bar1=%x command=%x\n", pci_read(bdf, 0x10), pci_read(bdf, 0x14), pci_read(bdf, 0x04) & 0xFFFF);
    volatile uint32_t *mem = (volatile uint32_t *)0xE0000000u;
    mem[4] = 0xDEADBEEFu;
    outl(0xC104, 0x12345678u);
    kprintf("pcibar: mmio=%x pio=%x\n", mem[4], inl(0xC104));
    pci_write(bdf, 0x10, 0xE0010000u);  /* move BAR 0: the register follows, the old place floats */
    kprintf("pcibar: moved mmio=%x old=%x\n", ((volatile uint32_t *)0xE0010000u)[4], mem[4]);
    pci_write(bdf, 0x04, 0x1);  /* memory decode off */
    kprintf("pcibar: decode off mmio=%x pio=%x\n", ((volatile uint32_t *)0xE0010000u)[4], inl(0xC104));
    pci_write(bdf, 0x10, 0x00100000u);  /* over guest RAM: refused, RAM stays RAM */
    pci_write(bdf, 0x04, 0x3);
    kprintf("pcibar: over ram bar0=%x ram=%x\n", pci_read(bdf, 0x10), ((volatile uint32_t *)0x00100000u)[0] == 0xDEADBEEFu);
    kprintf("pcibar: absent=%x\n", pci_read(31 << 3 | 7, 0));
}

/* ---- vscsi: hv's own virtio-scsi driver (polled), for precise and hostile checks ---- */

struct vq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
#define VQ_SIZE 8
static struct vq_desc vq_desc[VQ_SIZE] __attribute__((aligned(16)));
static struct { uint16_t flags, idx, ring[VQ_SIZE], used_event; } vq_avail __attribute__((aligned(2)));
static struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[VQ_SIZE]; uint16_t avail_event; } vq_used __attribute__((aligned(4)));
static uint8_t vs_req[VQ_SIZE][64], vs_resp[VQ_SIZE][128];
static uint8_t vs_data[VQ_SIZE][4096] __attribute__((aligned(4096)));
static volatile uint8_t *vs_common, *vs_notify, *vs_isr;
static uint16_t vs_used_seen;
static uint32_t vs_bdf;
/* Feature bits 0-31 the driver accepts (vscsimsix adds VIRTIO_RING_F_EVENT_IDX), and the MSI-X
 * vector it gives the request queue before DRIVER_OK (0xFFFF: none). */
static uint32_t vs_features_lo;
static uint16_t vs_queue_vector = 0xFFFF, vs_queue_vector_read;
/* The request queue's rings (vscsibench swaps in a larger queue). */
static void *vs_qdesc = vq_desc, *vs_qavail = &vq_avail, *vs_qused = &vq_used;
static uint16_t vs_qsize = VQ_SIZE;

static void mb(void) { __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory"); }

static int vscsi_setup(int *readonly_out)
{
    (void)readonly_out;
    uint32_t bdf = 0xFFFF;
    for (uint32_t dev = 0; dev < 32; dev++)
        if (pci_read(dev << 3, 0) == 0x10481AF4u) { bdf = dev << 3; break; }
    if (bdf == 0xFFFF) { kprintf("vscsi: no virtio-scsi function\n"); return 0; }
    vs_bdf = bdf;
    /* The BAR the capabilities name (hv: BAR 0; QEMU: BAR 4, 64-bit) goes at 0xE0000000. */
    uint32_t bar = 0;
    for (uint32_t cap = pci_read(bdf, 0x34) & 0xFF; cap; cap = (pci_read(bdf, cap) >> 8) & 0xFF)
        if ((pci_read(bdf, cap) & 0xFF) == 0x09 && ((pci_read(bdf, cap) >> 24) & 0xFF) == 1) bar = pci_read(bdf, cap + 4) & 0xFF;
    pci_write(bdf, 0x10 + 4 * bar, 0xE0000000u);
    if ((pci_read(bdf, 0x10 + 4 * bar) & 0x6) == 0x4) pci_write(bdf, 0x14 + 4 * bar, 0);
    pci_write(bdf, 0x04, 0x6);  /* memory decode, bus master */
    uint32_t notify_mult = 0, common_off = 0, notify_off = 0;
    for (uint32_t cap = pci_read(bdf, 0x34) & 0xFF; cap; cap = (pci_read(bdf, cap) >> 8) & 0xFF) {
        uint32_t head = pci_read(bdf, cap), type = (head >> 24) & 0xFF;
        if ((head & 0xFF) != 0x09) continue;
        if (type == 1) common_off = pci_read(bdf, cap + 8);
        if (type == 3) vs_isr = (volatile uint8_t *)(0xE0000000u + pci_read(bdf, cap + 8));
        if (type == 2) { notify_off = pci_read(bdf, cap + 8); notify_mult = pci_read(bdf, cap + 16); }
    }
    vs_common = (volatile uint8_t *)(0xE0000000u + common_off);
    vs_notify = (volatile uint8_t *)(0xE0000000u + notify_off);
    vs_common[0x14] = 0;                                   /* reset */
    vs_common[0x14] = 1 | 2;                               /* ACKNOWLEDGE | DRIVER */
    *(volatile uint32_t *)(vs_common + 0x08) = 0;
    *(volatile uint32_t *)(vs_common + 0x0C) = vs_features_lo;
    *(volatile uint32_t *)(vs_common + 0x08) = 1;          /* driver_feature_select: bits 32-63 */
    *(volatile uint32_t *)(vs_common + 0x0C) = 1;          /* VIRTIO_F_VERSION_1 */
    vs_common[0x14] = 1 | 2 | 8;                           /* FEATURES_OK */
    if (!(vs_common[0x14] & 8)) { kprintf("vscsi: features refused\n"); return 0; }
    *(volatile uint16_t *)(vs_common + 0x16) = 2;          /* the request queue */
    *(volatile uint16_t *)(vs_common + 0x18) = vs_qsize;
    *(volatile uint32_t *)(vs_common + 0x20) = (uint32_t)vs_qdesc;  *(volatile uint32_t *)(vs_common + 0x24) = 0;
    *(volatile uint32_t *)(vs_common + 0x28) = (uint32_t)vs_qavail; *(volatile uint32_t *)(vs_common + 0x2C) = 0;
    *(volatile uint32_t *)(vs_common + 0x30) = (uint32_t)vs_qused;  *(volatile uint32_t *)(vs_common + 0x34) = 0;
    if (vs_queue_vector != 0xFFFF) {
        *(volatile uint16_t *)(vs_common + 0x1A) = 60;     /* past the table: reads back NO_VECTOR */
        vs_queue_vector_read = *(volatile uint16_t *)(vs_common + 0x1A);
        *(volatile uint16_t *)(vs_common + 0x1A) = vs_queue_vector;
    }
    *(volatile uint16_t *)(vs_common + 0x1C) = 1;          /* queue_enable */
    vs_common[0x14] = 1 | 2 | 8 | 4;                       /* DRIVER_OK */
    (void)notify_mult;  /* queue 2's notify_off is 2: offset 2 * multiplier */
    vs_notify += 2 * notify_mult;
    kprintf("vscsi: ready status=%x\n", vs_common[0x14]);
    return 1;
}

/* Builds the chain for request slot 0 or 1 in descriptors slot*4 .. slot*4+3: request header,
 * optional data-out, response, optional data-in. */
static void vscsi_chain(int slot, const uint8_t *cdb, int cdblen, uint32_t out_len, uint32_t in_len)
{
    int d = slot * 4;
    uint8_t *req = vs_req[slot];
    for (int i = 0; i < 64; i++) req[i] = 0;
    req[0] = 1; req[1] = 0; req[2] = 0x40; req[3] = 0;  /* target 0, LUN 0 */
    for (int i = 0; i < cdblen; i++) req[19 + i] = cdb[i];
    int n = 0;
    vq_desc[d + n] = (struct vq_desc){ (uint32_t)req, 51, 1, (uint16_t)(d + n + 1) }; n++;
    if (out_len) { vq_desc[d + n] = (struct vq_desc){ (uint32_t)vs_data[slot], out_len, 1, (uint16_t)(d + n + 1) }; n++; }
    vq_desc[d + n] = (struct vq_desc){ (uint32_t)vs_resp[slot], 108, 2 | (in_len ? 1 : 0), (uint16_t)(d + n + 1) }; n++;
    if (in_len) { vq_desc[d + n] = (struct vq_desc){ (uint32_t)vs_data[slot], in_len, 2, 0 }; n++; }
}

static void vscsi_offer(uint16_t head)
{
    vq_avail.ring[vq_avail.idx % VQ_SIZE] = head;
    mb();
    vq_avail.idx++;
    mb();
}

static void vscsi_kick_and_wait(uint16_t count)
{
    *(volatile uint16_t *)vs_notify = 2;
    uint32_t spins = 0;
    while ((uint16_t)(*(volatile uint16_t *)&vq_used.idx - vs_used_seen) < count && ++spins < 50000000u)
        cpu_pause();
    vs_used_seen = *(volatile uint16_t *)&vq_used.idx;
}

/* One command on slot 0; returns the SCSI status, or 0xFF for "no answer". */
static uint8_t vscsi_cmd(const uint8_t *cdb, int cdblen, uint32_t out_len, uint32_t in_len)
{
    uint16_t before = vs_used_seen;
    vscsi_chain(0, cdb, cdblen, out_len, in_len);
    vscsi_offer(0);
    vscsi_kick_and_wait(1);
    if (vs_used_seen == before) return 0xFF;
    return vs_resp[0][11] != 0 ? 0xFE : vs_resp[0][10];
}

static void put_be32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

static void mode_vscsi(void)
{
    int ro = 0;
    if (!vscsi_setup(&ro)) return;
    uint8_t inquiry[6] = { 0x12, 0, 0, 0, 36, 0 };
    uint8_t st = vscsi_cmd(inquiry, 6, 0, 36);
    char vendor[9], product[17];
    for (int i = 0; i < 8; i++) vendor[i] = (char)vs_data[0][8 + i];
    for (int i = 0; i < 16; i++) product[i] = (char)vs_data[0][16 + i];
    vendor[8] = 0; product[16] = 0;
    kprintf("vscsi: inquiry status=%x type=%x vendor=%s product=%s\n", st, vs_data[0][0], vendor, product);
    uint8_t capacity[10] = { 0x25 };
    st = vscsi_cmd(capacity, 10, 0, 8);
    uint32_t last = (uint32_t)vs_data[0][0] << 24 | vs_data[0][1] << 16 | vs_data[0][2] << 8 | vs_data[0][3];
    kprintf("vscsi: capacity status=%x blocks=%u\n", st, last + 1);

    /* Write a pattern to LBA 100..107, read it back. */
    for (int i = 0; i < 4096; i++) vs_data[0][i] = (uint8_t)(i * 7 + 3);
    uint8_t wr[10] = { 0x2A, 0, 0, 0, 0, 100, 0, 0, 8, 0 };
    uint8_t wst = vscsi_cmd(wr, 10, 4096, 0);
    kprintf("vscsi: write status=%x sense=%x/%x\n", wst, vs_resp[0][12 + 2] & 0xF, vs_resp[0][12 + 12]);
    for (int i = 0; i < 4096; i++) vs_data[0][i] = 0;
    uint8_t rd[10] = { 0x28, 0, 0, 0, 0, 100, 0, 0, 8, 0 };
    st = vscsi_cmd(rd, 10, 0, 4096);
    int same = 1;
    for (int i = 0; i < 4096; i++) if (vs_data[0][i] != (uint8_t)(i * 7 + 3)) same = 0;
    kprintf("vscsi: read status=%x pattern=%s\n", st, wst == 0 ? (same ? "match" : "MISMATCH") : "n/a");

    /* Two requests in flight at once: both offered, one notification. */
    uint8_t rd2[10] = { 0x28, 0, 0, 0, 0, 100, 0, 0, 1, 0 };
    vscsi_chain(0, rd2, 10, 0, 512);
    rd2[5] = 101;
    vscsi_chain(1, rd2, 10, 0, 512);
    uint16_t before = vs_used_seen;
    vscsi_offer(0);
    vscsi_offer(4);
    vscsi_kick_and_wait(2);
    kprintf("vscsi: in flight completed=%u status=%x,%x\n", (uint16_t)(vs_used_seen - before), vs_resp[0][10], vs_resp[1][10]);

    /* Hostile chains: each must fail alone, and the device must keep answering. */
    vq_desc[0] = (struct vq_desc){ 0xF0000000u, 51, 1, 1 };           /* request outside guest RAM */
    vq_desc[1] = (struct vq_desc){ (uint32_t)vs_resp[0], 108, 2, 0 };
    before = vs_used_seen; vscsi_offer(0); vscsi_kick_and_wait(1);
    kprintf("vscsi: hostile outside-ram completed=%u len=%u\n", (uint16_t)(vs_used_seen - before), vq_used.ring[(vs_used_seen - 1) % VQ_SIZE].len);
    vq_desc[0] = (struct vq_desc){ (uint32_t)vs_req[0], 51, 1, 1 };
    vq_desc[1] = (struct vq_desc){ (uint32_t)vs_resp[0], 108, 1, 0 };  /* 0 → 1 → 0 → …: a loop */
    before = vs_used_seen; vscsi_offer(0); vscsi_kick_and_wait(1);
    kprintf("vscsi: hostile loop completed=%u len=%u\n", (uint16_t)(vs_used_seen - before), vq_used.ring[(vs_used_seen - 1) % VQ_SIZE].len);
    vq_desc[0] = (struct vq_desc){ (uint32_t)vs_req[0], 0xFFFFFFF0u, 1, 1 };  /* an absurd length */
    vq_desc[1] = (struct vq_desc){ (uint32_t)vs_resp[0], 108, 2, 0 };
    before = vs_used_seen; vscsi_offer(0); vscsi_kick_and_wait(1);
    kprintf("vscsi: hostile length completed=%u len=%u\n", (uint16_t)(vs_used_seen - before), vq_used.ring[(vs_used_seen - 1) % VQ_SIZE].len);
    vscsi_offer(9);  /* a head past the queue */
    vscsi_kick_and_wait(0);
    uint8_t tur[6] = { 0 };
    kprintf("vscsi: alive after hostile chains: tur status=%x\n", vscsi_cmd(tur, 6, 0, 0));

    /* Discards: write 1 MiB at LBA 4096, let the host look, then UNMAP it. */
    for (int i = 0; i < 4096; i++) vs_data[0][i] = 0x5A;
    int wrote = 1;
    for (uint32_t lba = 4096; lba < 4096 + 2048; lba += 8) {
        uint8_t w[10] = { 0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0 };
        put_be32(&w[2], lba);
        if (vscsi_cmd(w, 10, 4096, 0) != 0) { wrote = 0; break; }
    }
    uint8_t sync[10] = { 0x35 };
    vscsi_cmd(sync, 10, 0, 0);
    kprintf("vscsi: wrote 1MiB=%s\n", wrote ? "yes" : "no");
    while (!(inb(UART_LSR) & LSR_DR)) cpu_pause();  /* the host looks at the image, then sends a byte */
    (void)inb(UART_RBR);
    uint8_t *list = vs_data[0];
    for (int i = 0; i < 24; i++) list[i] = 0;
    list[1] = 22; list[3] = 16;
    put_be32(&list[8 + 4], 4096);    /* LBA (low half) */
    put_be32(&list[8 + 8], 2048);    /* blocks */
    uint8_t unmap[10] = { 0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0 };
    st = vscsi_cmd(unmap, 10, 24, 0);
    kprintf("vscsi: unmap status=%x\n", st);
}

/* vscsicd: a CD-ROM drive seen through the polled driver while the operator ejects and inserts
 * media (the host sends a byte on the serial line after each change). */
static void vscsicd_state(const char *when)
{
    uint8_t tur[6] = { 0 };
    uint8_t st = vscsi_cmd(tur, 6, 0, 0);
    kprintf("vscsicd: %s tur status=%x sense=%x/%x\n", when, st, st == 2 ? vs_resp[0][12 + 2] & 0xF : 0, st == 2 ? vs_resp[0][12 + 12] : 0);
}

static void vscsicd_wait(void)
{
    kprintf("vscsicd: waiting\n");
    while (!(inb(UART_LSR) & LSR_DR)) cpu_pause();
    (void)inb(UART_RBR);
}

static uint32_t vscsicd_blocks(void)
{
    uint8_t capacity[10] = { 0x25 };
    if (vscsi_cmd(capacity, 10, 0, 8) != 0) return 0;
    return ((uint32_t)vs_data[0][0] << 24 | vs_data[0][1] << 16 | vs_data[0][2] << 8 | vs_data[0][3]) + 1;
}

static void mode_vscsicd(void)
{
    int ro = 0;
    if (!vscsi_setup(&ro)) return;
    vscsicd_state("start");
    kprintf("vscsicd: blocks=%u\n", vscsicd_blocks());
    vscsicd_wait();
    vscsicd_state("after eject");
    vscsicd_state("then");
    uint8_t event[10] = { 0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0 };
    vscsi_cmd(event, 10, 0, 8);
    kprintf("vscsicd: media event=%x present=%x\n", vs_data[0][4], vs_data[0][5]);
    vscsicd_wait();
    vscsicd_state("after insert");
    vscsicd_state("then");
    kprintf("vscsicd: blocks=%u\n", vscsicd_blocks());
}

/* vscsiirq: the same driver with interrupts. The guest routes the adapter's INTA# (device 4:
 * PIRQD) to IRQ 11 through the PIIX3 routing register, as firmware would, makes IRQ 11 level-
 * triggered (ELCR), and counts interrupts; reading the ISR lowers the line. */
static volatile uint32_t vs_irqs, vs_isr_bits;

void vscsi_irq_stub(void);
__asm__(".globl vscsi_irq_stub\nvscsi_irq_stub:\n"
        " pushal\n cld\n call vscsi_isr\n popal\n"
        " push %eax\n mov 4(%esp), %eax\n xchg %eax, 12(%esp)\n mov %eax, 8(%esp)\n pop %eax\n"
        " add $4, %esp\n popfl\n ret\n");

void vscsi_isr(void)
{
    vs_isr_bits |= *vs_isr;  /* acknowledges: the device lowers INTx */
    vs_irqs++;
    outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

static volatile uint32_t vs_spurious;
void spurious_stub(void);
__asm__(".globl spurious_stub\nspurious_stub:\n"
        " lock incl vs_spurious\n"
        " push %eax\n mov 4(%esp), %eax\n xchg %eax, 12(%esp)\n mov %eax, 8(%esp)\n pop %eax\n"
        " add $4, %esp\n popfl\n ret\n");

/* Waits with interrupts on until `target` interrupts were taken, or about 0.2 s (TSC) passed. */
static void vscsi_wait_irq(uint32_t target)
{
    uint64_t end = rdtsc() + 500000000ull;
    while (vs_irqs < target && rdtsc() < end)
        __asm__ volatile("sti; pause; cli");
}

static void mode_vscsiirq(void)
{
    int ro = 0;
    pci_write(0x08, 0x60, 0x0B808080u);   /* PIRQD → IRQ 11; A–C off */
    outb(0x4D1, 0x08);                    /* ELCR: IRQ 11 level-triggered */
    if (!vscsi_setup(&ro)) return;
    uint32_t handler = (uint32_t)vscsi_irq_stub;
    idt[0x2B] = (struct idt_gate){ (uint16_t)handler, 0x08, 0, 0x8E, (uint16_t)(handler >> 16) };
    /* Spurious IRQ 7 and 15 (a line that drops before the PIC's acknowledge): counted, no EOI. */
    uint32_t spurious = (uint32_t)spurious_stub;
    idt[0x27] = (struct idt_gate){ (uint16_t)spurious, 0x08, 0, 0x8E, (uint16_t)(spurious >> 16) };
    idt[0x2F] = (struct idt_gate){ (uint16_t)spurious, 0x08, 0, 0x8E, (uint16_t)(spurious >> 16) };
    struct { uint16_t limit; uint32_t base; } __attribute__((packed)) idtr = { sizeof idt - 1, (uint32_t)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFB); outb(0xA1, 0xF7);   /* unmask the cascade and IRQ 11 */

    uint8_t tur[6] = { 0 };
    vscsi_chain(0, tur, 6, 0, 0);
    vscsi_offer(0);
    *(volatile uint16_t *)vs_notify = 2;
    vscsi_wait_irq(1);
    kprintf("vscsiirq: interrupts=%u isr=%x used=%u\n", vs_irqs, vs_isr_bits, vq_used.idx);
    vscsi_wait_irq(2);   /* a line left high would fire again after the EOI */
    kprintf("vscsiirq: after waiting interrupts=%u\n", vs_irqs);
    vq_avail.flags = 1;  /* VIRTQ_AVAIL_F_NO_INTERRUPT: the driver polls instead */
    vscsi_chain(0, tur, 6, 0, 0);
    vscsi_offer(0);
    *(volatile uint16_t *)vs_notify = 2;
    while (*(volatile uint16_t *)&vq_used.idx != 2) cpu_pause();
    vscsi_wait_irq(2);
    kprintf("vscsiirq: suppressed interrupts=%u used=%u\n", vs_irqs, vq_used.idx);
    vq_avail.flags = 0;
    vscsi_chain(0, tur, 6, 0, 0);
    vscsi_offer(0);
    *(volatile uint16_t *)vs_notify = 2;
    vscsi_wait_irq(2);
    kprintf("vscsiirq: interrupts=%u used=%u spurious=%u\n", vs_irqs, vq_used.idx, vs_spurious);
}

/* vscsimsix: the driver with MSI-X and event indices. The request queue gets vector 1, whose
 * table entry sends vector 0x41 to local APIC 0; the guest counts interrupts, masks the entry
 * (the pending bit must hold the interrupt until it unmasks), and uses used_event to ask for an
 * interrupt only every second completion. */
static volatile uint32_t msix_irqs;
#define LAPIC ((volatile uint32_t *)0xFEE00000u)

void msix_stub(void);
__asm__(".globl msix_stub\nmsix_stub:\n"
        " pushal\n cld\n call msix_isr\n popal\n"
        " push %eax\n mov 4(%esp), %eax\n xchg %eax, 12(%esp)\n mov %eax, 8(%esp)\n pop %eax\n"
        " add $4, %esp\n popfl\n ret\n");

void msix_isr(void)
{
    msix_irqs++;
    LAPIC[0xB0 / 4] = 0;  /* EOI */
}

static void msix_wait(uint32_t target)
{
    uint64_t end = rdtsc() + 500000000ull;
    while (msix_irqs < target && rdtsc() < end)
        __asm__ volatile("sti; pause; cli");
}

static void msix_request(void)
{
    uint8_t tur[6] = { 0 };
    vscsi_chain(0, tur, 6, 0, 0);
    vscsi_offer(0);
    *(volatile uint16_t *)vs_notify = 2;
}

static void mode_vscsimsix(void)
{
    int ro = 0;
    outb(0x20, 0x11); outb(0xA0, 0x11);   /* PICs out of the way: remapped, every line masked */
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
    uint32_t handler = (uint32_t)msix_stub;
    idt[0x41] = (struct idt_gate){ (uint16_t)handler, 0x08, 0, 0x8E, (uint16_t)(handler >> 16) };
    struct { uint16_t limit; uint32_t base; } __attribute__((packed)) idtr = { sizeof idt - 1, (uint32_t)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
    LAPIC[0xF0 / 4] = 0x1FF;              /* software-enable the local APIC, spurious vector 0xFF */

    vs_features_lo = 1u << 29;            /* VIRTIO_RING_F_EVENT_IDX */
    vs_queue_vector = 1;
    if (!vscsi_setup(&ro)) return;
    uint32_t cap = pci_read(vs_bdf, 0x34) & 0xFF;
    while (cap && (pci_read(vs_bdf, cap) & 0xFF) != 0x11) cap = (pci_read(vs_bdf, cap) >> 8) & 0xFF;
    if (!cap) { kprintf("vscsimsix: no MSI-X capability\n"); return; }
    uint32_t control = pci_read(vs_bdf, cap) >> 16, table = pci_read(vs_bdf, cap + 4), pba = pci_read(vs_bdf, cap + 8);
    kprintf("vscsimsix: vectors=%u table=%x pba=%x queue_vector_60=%x\n", (control & 0x7FF) + 1, table, pba, vs_queue_vector_read);
    volatile uint32_t *entry = (volatile uint32_t *)(0xE0000000u + (table & ~7u) + 16);
    volatile uint32_t *pending = (volatile uint32_t *)(0xE0000000u + (pba & ~7u));
    entry[0] = 0xFEE00000u;               /* local APIC 0, physical destination */
    entry[1] = 0;
    entry[2] = 0x41;                      /* fixed delivery, edge, vector 0x41 */
    entry[3] = 0;                         /* unmasked */
    pci_write(vs_bdf, cap, pci_read(vs_bdf, cap) | (0x8000u << 16));  /* MSI-X enable */

    vq_avail.used_event = vs_used_seen;   /* an interrupt for the next completion */
    msix_request();
    msix_wait(1);
    kprintf("vscsimsix: interrupts=%u isr=%x used=%u\n", msix_irqs, *vs_isr, vq_used.idx);

    entry[3] = 1;                         /* mask: the interrupt waits in the pending bits */
    vq_avail.used_event = vq_used.idx;
    msix_request();
    while (*(volatile uint16_t *)&vq_used.idx != 2) cpu_pause();
    msix_wait(2);
    kprintf("vscsimsix: masked interrupts=%u pending=%x used=%u\n", msix_irqs, pending[0], vq_used.idx);
    entry[3] = 0;
    msix_wait(2);
    kprintf("vscsimsix: unmasked interrupts=%u pending=%x\n", msix_irqs, pending[0]);

    vq_avail.used_event = vq_used.idx + 1; /* event index: no interrupt until the second completion */
    msix_request();
    while (*(volatile uint16_t *)&vq_used.idx != 3) cpu_pause();
    msix_wait(3);
    kprintf("vscsimsix: event index interrupts=%u used=%u avail_event=%u\n", msix_irqs, vq_used.idx, vq_used.avail_event);
    msix_request();
    msix_wait(3);
    kprintf("vscsimsix: event index interrupts=%u used=%u\n", msix_irqs, vq_used.idx);
}

/* vscsibench: throughput of the SCSI path as the guest sees it, for bench/bench.py (not a test).
 * Sequential reads then writes of `count` MiB in 256 KiB requests, then `count` × 256 random 4 KiB
 * reads, each with 4 requests in flight on a 32-entry queue. The host times the marker lines. */
#define BQ_SIZE 32
#define BQ_DEPTH 4
#define BQ_CHUNK (256u * 1024u)
static struct vq_desc bq_desc[BQ_SIZE] __attribute__((aligned(16)));
static struct { uint16_t flags, idx, ring[BQ_SIZE], used_event; } bq_avail __attribute__((aligned(2)));
static struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[BQ_SIZE]; uint16_t avail_event; } bq_used __attribute__((aligned(4)));
static uint8_t bq_buf[BQ_DEPTH][BQ_CHUNK] __attribute__((aligned(4096)));
static uint8_t bq_req[BQ_DEPTH][64], bq_resp[BQ_DEPTH][128];

static void bench_submit(int slot, int write, uint32_t lba, uint32_t bytes)
{
    uint8_t *req = bq_req[slot];
    for (int i = 0; i < 64; i++) req[i] = 0;
    req[0] = 1; req[2] = 0x40;
    uint8_t *cdb = req + 19;
    uint32_t blocks = bytes / 512;
    cdb[0] = write ? 0x2A : 0x28;
    cdb[2] = lba >> 24; cdb[3] = lba >> 16; cdb[4] = lba >> 8; cdb[5] = lba;
    cdb[7] = blocks >> 8; cdb[8] = blocks;
    int d = slot * 3;
    bq_desc[d] = (struct vq_desc){ (uint32_t)req, 51, 1, (uint16_t)(d + 1) };
    if (write) {
        bq_desc[d + 1] = (struct vq_desc){ (uint32_t)bq_buf[slot], bytes, 1, (uint16_t)(d + 2) };
        bq_desc[d + 2] = (struct vq_desc){ (uint32_t)bq_resp[slot], 108, 2, 0 };
    } else {
        bq_desc[d + 1] = (struct vq_desc){ (uint32_t)bq_resp[slot], 108, 2 | 1, (uint16_t)(d + 2) };
        bq_desc[d + 2] = (struct vq_desc){ (uint32_t)bq_buf[slot], bytes, 2, 0 };
    }
    bq_avail.ring[bq_avail.idx % BQ_SIZE] = (uint16_t)d;
    mb();
    bq_avail.idx++;
}

/* Runs `total` requests, BQ_DEPTH in flight; returns how many failed. */
static uint32_t bench_run(int write, uint32_t total, uint32_t bytes, int random, uint32_t span_blocks)
{
    uint32_t submitted = 0, completed = 0, failed = 0, seed = 12345;
    int busy[BQ_DEPTH] = { 0 };
    uint16_t seen = bq_used.idx;
    while (completed < total) {
        int offered = 0;
        for (int slot = 0; slot < BQ_DEPTH && submitted < total; slot++) {
            if (busy[slot]) continue;
            uint32_t lba;
            if (random) { seed = seed * 1103515245u + 12345u; lba = ((seed >> 8) % (span_blocks / 8)) * 8; }
            else lba = submitted * (bytes / 512);
            bench_submit(slot, write, lba, bytes);
            busy[slot] = 1; submitted++; offered = 1;
        }
        if (offered) { mb(); *(volatile uint16_t *)vs_notify = 2; }
        while (*(volatile uint16_t *)&bq_used.idx == seen) cpu_pause();
        while (seen != *(volatile uint16_t *)&bq_used.idx) {
            uint32_t id = bq_used.ring[seen % BQ_SIZE].id;
            int slot = id / 3;
            if (slot < BQ_DEPTH) {
                if (bq_resp[slot][10] != 0 || bq_resp[slot][11] != 0) failed++;
                busy[slot] = 0;
            }
            seen++; completed++;
        }
    }
    return failed;
}

static void mode_vscsibench(uint32_t mib)
{
    int ro = 0;
    vs_qdesc = bq_desc; vs_qavail = &bq_avail; vs_qused = &bq_used; vs_qsize = BQ_SIZE;
    if (!vscsi_setup(&ro)) return;
    uint32_t chunks = mib * (1024u * 1024u / BQ_CHUNK), span = mib * 2048u;
    (void)bench_run(0, 1, 4096, 0, span);  /* takes any power-on UNIT ATTENTION (QEMU reports one) */
    kprintf("bench: seqread start\n");
    uint32_t e1 = bench_run(0, chunks, BQ_CHUNK, 0, span);
    kprintf("bench: seqread end\n");
    kprintf("bench: seqwrite start\n");
    uint32_t e2 = bench_run(1, chunks, BQ_CHUNK, 0, span);
    kprintf("bench: seqwrite end\n");
    kprintf("bench: randread start\n");
    uint32_t e3 = bench_run(0, mib * 256u, 4096, 1, span);
    kprintf("bench: randread end\n");
    kprintf("bench: errors=%u\n", e1 + e2 + e3);
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    const struct multiboot_info *mbi =
        magic == MB_BOOT_MAGIC ? (const struct multiboot_info *)mbi_addr : 0;
    static struct config cfg = {
        .mode = "hello", .cpus = 1, .lines = 100, .count = 10000, .bytes = 204800, .delay = 0,
    };

    serial_init();
    if (mbi && (mbi->flags & MBI_CMDLINE) && mbi->cmdline)
        parse_cmdline((const char *)mbi->cmdline, &cfg);

    kprintf("hv-testguest: mode=%s\n", cfg.mode);
    if (streq(cfg.mode, "hello"))
        mode_hello(mbi);
    else if (streq(cfg.mode, "smp"))
        mode_smp(cfg.cpus);
    else if (streq(cfg.mode, "flood"))
        mode_flood(cfg.lines, cfg.delay);
    else if (streq(cfg.mode, "triple"))
        mode_triple();
    else if (streq(cfg.mode, "pioread"))
        mode_pioread(cfg.count);
    else if (streq(cfg.mode, "throughput"))
        mode_throughput(cfg.bytes);
    else if (streq(cfg.mode, "echo"))
        mode_echo();
    else if (streq(cfg.mode, "rtc"))
        mode_rtc();
    else if (streq(cfg.mode, "rtcirq"))
        mode_rtcirq(cfg.count);
    else if (streq(cfg.mode, "idle"))
        mode_idle();
    else if (streq(cfg.mode, "vscsiirq"))
        mode_vscsiirq();
    else if (streq(cfg.mode, "vscsimsix"))
        mode_vscsimsix();
    else if (streq(cfg.mode, "vscsibench"))
        mode_vscsibench(cfg.count);
    else if (streq(cfg.mode, "vscsicd"))
        mode_vscsicd();
    else if (streq(cfg.mode, "vscsi"))
        mode_vscsi();
    else if (streq(cfg.mode, "pcibar"))
        mode_pcibar();
    else if (streq(cfg.mode, "probe"))
        mode_probe(cfg.port, cfg.count);
    else
        kprintf("hv-testguest: unknown mode\n");
    kprintf("hv-testguest: done\n");
}

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
    uint32_t count_given;
    uint32_t ip, peer, size;            /* net modes: addresses in host order, UDP payload bytes */
    uint32_t csum;                      /* netblast: leave UDP checksums to the device (VIRTIO_NET_F_CSUM) */
    uint8_t peer_mac[6];                /* netping: the peer's MAC, given instead of asked by ARP */
    uint32_t peer_mac_given;
    uint32_t poke, poke_given;          /* probe: a byte written to port+1 before the reads */
    uint32_t seed;                      /* hostile: the generator's seed */
    uint32_t passes;                    /* vscsibench: sequential passes over the disk (default 1) */
    uint32_t write;                     /* vscsilat: time WRITEs instead of READs */
    const char *ops, *ops_end;          /* poke: the operations, as given */
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

/* Decimal, or hex after "0x". */
static uint32_t parse_u32(const char *s, const char *end)
{
    uint32_t v = 0;

    if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2; s < end; s++) {
            char c = *s;
            uint32_t d = c >= '0' && c <= '9' ? (uint32_t)(c - '0') : c >= 'a' && c <= 'f' ? (uint32_t)(c - 'a' + 10)
                       : c >= 'A' && c <= 'F' ? (uint32_t)(c - 'A' + 10) : 16;
            if (d == 16)
                break;
            v = v * 16 + d;
        }
        return v;
    }
    for (; s < end && *s >= '0' && *s <= '9'; s++)
        v = v * 10 + (uint32_t)(*s - '0');
    return v;
}

/* "a.b.c.d" in host byte order (a is the top byte); 0 if malformed. */
/* "52:54:00:12:34:56" into mac[6]; returns 0 if malformed. */
static int parse_mac(const char *s, const char *end, uint8_t mac[6])
{
    for (int i = 0; i < 6; i++) {
        uint32_t v = 0;
        for (int d = 0; d < 2; d++, s++) {
            if (s >= end) return 0;
            char c = *s;
            uint32_t x = c >= '0' && c <= '9' ? (uint32_t)(c - '0') : c >= 'a' && c <= 'f' ? (uint32_t)(c - 'a' + 10)
                       : c >= 'A' && c <= 'F' ? (uint32_t)(c - 'A' + 10) : 16u;
            if (x > 15) return 0;
            v = v << 4 | x;
        }
        mac[i] = (uint8_t)v;
        if (i < 5) {
            if (s >= end || *s != ':') return 0;
            s++;
        }
    }
    return 1;
}

static uint32_t parse_ip(const char *s, const char *end)
{
    uint32_t ip = 0;
    for (int part = 0; part < 4; part++) {
        if (s >= end || *s < '0' || *s > '9') return 0;
        uint32_t v = 0;
        for (; s < end && *s >= '0' && *s <= '9'; s++)
            v = v * 10 + (uint32_t)(*s - '0');
        if (v > 255) return 0;
        ip = ip << 8 | v;
        if (part < 3) {
            if (s >= end || *s != '.') return 0;
            s++;
        }
    }
    return ip;
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
        } else if ((v = token_value(tok, s, "ops="))) {
            cfg->ops = v;
            cfg->ops_end = s;
        } else if ((v = token_value(tok, s, "cpus="))) {
            cfg->cpus = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "lines="))) {
            cfg->lines = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "count="))) {
            cfg->count = parse_u32(v, s);
            cfg->count_given = 1;
        } else if ((v = token_value(tok, s, "bytes="))) {
            cfg->bytes = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "delay="))) {
            cfg->delay = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "port="))) {
            cfg->port = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "poke="))) {
            cfg->poke = parse_u32(v, s);
            cfg->poke_given = 1;
        } else if ((v = token_value(tok, s, "ip="))) {
            cfg->ip = parse_ip(v, s);
        } else if ((v = token_value(tok, s, "peer="))) {
            cfg->peer = parse_ip(v, s);
        } else if ((v = token_value(tok, s, "seed="))) {
            cfg->seed = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "passes="))) {
            cfg->passes = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "write="))) {
            cfg->write = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "size="))) {
            cfg->size = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "csum="))) {
            cfg->csum = parse_u32(v, s);
        } else if ((v = token_value(tok, s, "peermac="))) {
            cfg->peer_mac_given = (uint32_t)parse_mac(v, s, cfg->peer_mac);
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

/* `count` forwarded register reads: inb of the UART's scratch register, or with `port=` a 4-byte
 * inl of that port (a plugin's register, for the plugin round-trip benchmark). */
static void mode_pioread(uint32_t count, uint32_t port)
{
    uint64_t start = rdtsc();
    if (port) {
        for (uint32_t i = 0; i < count; i++)
            (void)inl((uint16_t)port);
    } else {
        for (uint32_t i = 0; i < count; i++)
            (void)inb(UART_SCR);
    }
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
static void mode_probe(uint32_t port, uint32_t count, int poke_given, uint32_t poke)
{
    if (poke_given) {
        outb((uint16_t)(port + 1), (uint8_t)poke);
        kprintf("probe: wrote 0x%x to port 0x%x\n", poke, port + 1);
    }
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

/* Burn CPU in the guest without leaving it (no exits): what a CPU quota must hold down. */
static void mode_spin(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    kprintf("spin: ready\n");
    volatile uint64_t n = 0;
    for (;;)
        n++;
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

/*
 * poke: a plugin author's probe. `ops=` is a comma-separated list run in order, each printed:
 *   inb:PORT inw:PORT inl:PORT            port reads
 *   outb:PORT:VAL outw:PORT:VAL outl:PORT:VAL
 *   readb:ADDR readw:ADDR readl:ADDR      MMIO reads (guest-physical = virtual: no paging)
 *   writeb:ADDR:VAL writew:ADDR:VAL writel:ADDR:VAL
 *   pciread:BDF:REG pciwrite:BDF:REG:VAL  configuration mechanism #1, 32 bits (BDF = bus<<8|dev<<3|fn)
 *   sleep:MS                              wait MS milliseconds (TSC time), e.g. while a test kills the device
 * Numbers are decimal or 0x-hex. Prints "poke: OP ADDR = VALUE" for reads, "poke: OP ADDR <- VALUE"
 * for writes, "poke: bad op '...'" for anything else, then "poke: end".
 */
static int op_is(const char *op, const char *end, const char *name)
{
    while (*name && op < end && *op == *name)
        op++, name++;
    return *name == '\0' && (op == end || *op == ':');
}

static void pci_write(uint32_t bdf, uint32_t reg, uint32_t v);
static uint32_t pci_read(uint32_t bdf, uint32_t reg);
static uint64_t ms_to_tsc(uint32_t ms);
static void tsc_calibrate(void);

static void mode_poke(const struct config *cfg)
{
    const char *s = cfg->ops, *end = cfg->ops_end;
    if (!s) { kprintf("poke: no ops= given\n"); return; }
    while (s < end) {
        const char *op = s, *e = s;
        while (e < end && *e != ',') e++;
        uint32_t arg[3] = { 0, 0, 0 };
        int args = 0;
        const char *f = op;
        while (f < e && *f != ':') f++;
        const char *name_end = f;
        while (f < e && args < 3) {
            const char *a = ++f;
            while (f < e && *f != ':') f++;
            arg[args++] = parse_u32(a, f);
        }
        uint32_t a0 = arg[0], a1 = arg[1];
        volatile uint8_t *m8 = (volatile uint8_t *)(uintptr_t)a0;
        volatile uint16_t *m16 = (volatile uint16_t *)(uintptr_t)a0;
        volatile uint32_t *m32 = (volatile uint32_t *)(uintptr_t)a0;
        if (op_is(op, name_end, "inb") && args == 1) kprintf("poke: inb 0x%x = 0x%x\n", a0, inb((uint16_t)a0));
        else if (op_is(op, name_end, "inw") && args == 1) {
            uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"((uint16_t)a0)); kprintf("poke: inw 0x%x = 0x%x\n", a0, v);
        } else if (op_is(op, name_end, "inl") && args == 1) kprintf("poke: inl 0x%x = 0x%x\n", a0, inl((uint16_t)a0));
        else if (op_is(op, name_end, "outb") && args == 2) { outb((uint16_t)a0, (uint8_t)a1); kprintf("poke: outb 0x%x <- 0x%x\n", a0, a1 & 0xFF); }
        else if (op_is(op, name_end, "outw") && args == 2) {
            __asm__ volatile("outw %0, %1" : : "a"((uint16_t)a1), "Nd"((uint16_t)a0)); kprintf("poke: outw 0x%x <- 0x%x\n", a0, a1 & 0xFFFF);
        } else if (op_is(op, name_end, "outl") && args == 2) { outl((uint16_t)a0, a1); kprintf("poke: outl 0x%x <- 0x%x\n", a0, a1); }
        else if (op_is(op, name_end, "readb") && args == 1) kprintf("poke: readb 0x%x = 0x%x\n", a0, *m8);
        else if (op_is(op, name_end, "readw") && args == 1) kprintf("poke: readw 0x%x = 0x%x\n", a0, *m16);
        else if (op_is(op, name_end, "readl") && args == 1) kprintf("poke: readl 0x%x = 0x%x\n", a0, *m32);
        else if (op_is(op, name_end, "writeb") && args == 2) { *m8 = (uint8_t)a1; kprintf("poke: writeb 0x%x <- 0x%x\n", a0, a1 & 0xFF); }
        else if (op_is(op, name_end, "writew") && args == 2) { *m16 = (uint16_t)a1; kprintf("poke: writew 0x%x <- 0x%x\n", a0, a1 & 0xFFFF); }
        else if (op_is(op, name_end, "writel") && args == 2) { *m32 = a1; kprintf("poke: writel 0x%x <- 0x%x\n", a0, a1); }
        else if (op_is(op, name_end, "sleep") && args == 1) {
            static int calibrated;
            if (!calibrated) { tsc_calibrate(); calibrated = 1; }
            uint64_t until = rdtsc() + ms_to_tsc(a0);
            while (rdtsc() < until) __asm__ volatile("pause");
            kprintf("poke: slept %u ms\n", a0);
        } else if (op_is(op, name_end, "pciread") && args == 2) kprintf("poke: pciread 0x%x:0x%x = 0x%x\n", a0, a1, pci_read(a0, a1));
        else if (op_is(op, name_end, "pciwrite") && args == 3) {
            pci_write(a0, a1, arg[2]); kprintf("poke: pciwrite 0x%x:0x%x <- 0x%x\n", a0, a1, arg[2]);
        } else {
            kprintf("poke: bad op '");
            for (const char *c = op; c < e; c++) serial_putc(*c);
            kprintf("'\n");
        }
        s = e < end ? e + 1 : e;
    }
    kprintf("poke: end\n");
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

/* ---- the modern virtio-pci transport, shared by the vscsi and net drivers ---- */

struct vpci {
    uint32_t bdf;
    volatile uint8_t *common, *isr, *device, *notify;  /* notify: queue_notify_off 0's address */
    uint32_t notify_mult;
};

#define VPCI_STATUS     0x14
#define VPCI_Q_SELECT   0x16
#define VPCI_Q_SIZE     0x18
#define VPCI_Q_VECTOR   0x1A
#define VPCI_Q_ENABLE   0x1C
#define VPCI_Q_NOTIFY   0x1E

static inline volatile uint16_t *vpci16(const struct vpci *v, uint32_t off) { return (volatile uint16_t *)(v->common + off); }
static inline volatile uint32_t *vpci32(const struct vpci *v, uint32_t off) { return (volatile uint32_t *)(v->common + off); }

/*
 * Places the BAR the capabilities name (hv: BAR 0; QEMU: BAR 4, 64-bit) at `base`, or, with
 * `keep_assigned`, leaves it where firmware put it if it is assigned and below 4 GiB; turns on
 * memory decode and bus mastering; finds the common, notify, ISR and device-config structures.
 * All four are assumed to live in that one BAR.
 */
static void vpci_map(struct vpci *v, uint32_t bdf, uint32_t base, int keep_assigned)
{
    uint32_t bar = 0;
    v->bdf = bdf;
    for (uint32_t cap = pci_read(bdf, 0x34) & 0xFF; cap; cap = (pci_read(bdf, cap) >> 8) & 0xFF)
        if ((pci_read(bdf, cap) & 0xFF) == 0x09 && ((pci_read(bdf, cap) >> 24) & 0xFF) == 1) bar = pci_read(bdf, cap + 4) & 0xFF;
    uint32_t reg = 0x10 + 4 * bar, cur = keep_assigned ? pci_read(bdf, reg) : 0;
    if ((cur & ~0xFu) && !((cur & 0x6) == 0x4 && pci_read(bdf, reg + 4))) {
        base = cur & ~0xFu;
    } else {
        pci_write(bdf, reg, base);
        if ((pci_read(bdf, reg) & 0x6) == 0x4) pci_write(bdf, reg + 4, 0);
    }
    pci_write(bdf, 0x04, 0x6);  /* memory decode, bus master */
    uint32_t common_off = 0, notify_off = 0, isr_off = 0, device_off = 0;
    v->notify_mult = 0;
    for (uint32_t cap = pci_read(bdf, 0x34) & 0xFF; cap; cap = (pci_read(bdf, cap) >> 8) & 0xFF) {
        uint32_t head = pci_read(bdf, cap), type = (head >> 24) & 0xFF;
        if ((head & 0xFF) != 0x09) continue;
        if (type == 1) common_off = pci_read(bdf, cap + 8);
        if (type == 3) isr_off = pci_read(bdf, cap + 8);
        if (type == 2) { notify_off = pci_read(bdf, cap + 8); v->notify_mult = pci_read(bdf, cap + 16); }
        if (type == 4) device_off = pci_read(bdf, cap + 8);
    }
    v->common = (volatile uint8_t *)(base + common_off);
    v->isr = (volatile uint8_t *)(base + isr_off);
    v->notify = (volatile uint8_t *)(base + notify_off);
    v->device = (volatile uint8_t *)(base + device_off);
}

/* Reset, then ACKNOWLEDGE | DRIVER: the device's features may be read now. */
static void vpci_reset_ack(const struct vpci *v)
{
    v->common[VPCI_STATUS] = 0;
    v->common[VPCI_STATUS] = 1 | 2;
}

static uint32_t vpci_offered(const struct vpci *v, uint32_t half)
{
    *vpci32(v, 0x00) = half;                               /* device_feature_select */
    return *vpci32(v, 0x04);
}

/* Writes the driver's features and sets FEATURES_OK; returns whether the device kept it. */
static int vpci_set_features(const struct vpci *v, uint32_t lo, uint32_t hi)
{
    *vpci32(v, 0x08) = 0;                                  /* driver_feature_select: bits 0-31 */
    *vpci32(v, 0x0C) = lo;
    *vpci32(v, 0x08) = 1;                                  /* bits 32-63 */
    *vpci32(v, 0x0C) = hi;
    v->common[VPCI_STATUS] = 1 | 2 | 8;                    /* FEATURES_OK */
    return (v->common[VPCI_STATUS] & 8) != 0;
}

/* Selects queue `q` and gives it `size` entries and its three rings (enable it afterwards). */
static void vpci_queue(const struct vpci *v, uint16_t q, uint16_t size, const void *desc, const void *avail, const void *used)
{
    *vpci16(v, VPCI_Q_SELECT) = q;
    *vpci16(v, VPCI_Q_SIZE) = size;
    *vpci32(v, 0x20) = (uint32_t)desc;  *vpci32(v, 0x24) = 0;
    *vpci32(v, 0x28) = (uint32_t)avail; *vpci32(v, 0x2C) = 0;
    *vpci32(v, 0x30) = (uint32_t)used;  *vpci32(v, 0x34) = 0;
}

static void vpci_queue_enable(const struct vpci *v) { *vpci16(v, VPCI_Q_ENABLE) = 1; }
static void vpci_driver_ok(const struct vpci *v) { v->common[VPCI_STATUS] = 1 | 2 | 8 | 4; }

static struct vpci vs_dev;

static int vscsi_setup(int *readonly_out)
{
    (void)readonly_out;
    uint32_t bdf = 0xFFFF;
    for (uint32_t dev = 0; dev < 32; dev++)
        if (pci_read(dev << 3, 0) == 0x10481AF4u) { bdf = dev << 3; break; }
    if (bdf == 0xFFFF) { kprintf("vscsi: no virtio-scsi function\n"); return 0; }
    vs_bdf = bdf;
    vpci_map(&vs_dev, bdf, 0xE0000000u, 0);               /* always at 0xE0000000 (vscsimsix relies on it) */
    vs_common = vs_dev.common;
    vs_isr = vs_dev.isr;
    vpci_reset_ack(&vs_dev);
    if (!vpci_set_features(&vs_dev, vs_features_lo, 1)) {  /* bit 32: VIRTIO_F_VERSION_1 */
        kprintf("vscsi: features refused\n");
        return 0;
    }
    vpci_queue(&vs_dev, 2, vs_qsize, vs_qdesc, vs_qavail, vs_qused);  /* the request queue */
    if (vs_queue_vector != 0xFFFF) {
        *vpci16(&vs_dev, VPCI_Q_VECTOR) = 60;              /* past the table: reads back NO_VECTOR */
        vs_queue_vector_read = *vpci16(&vs_dev, VPCI_Q_VECTOR);
        *vpci16(&vs_dev, VPCI_Q_VECTOR) = vs_queue_vector;
    }
    vpci_queue_enable(&vs_dev);
    vpci_driver_ok(&vs_dev);
    vs_notify = vs_dev.notify + 2 * vs_dev.notify_mult;  /* queue 2's notify_off is 2 */
    kprintf("vscsi: ready status=%x\n", vs_common[VPCI_STATUS]);
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
 * Sequential reads then writes over the first `count` MiB in 256 KiB requests, `passes` times over
 * (default 1: a pass over a small disk is too short to time steadily), then `count` × 256 random
 * 4 KiB reads, each with 4 requests in flight on a 32-entry queue. The host times the marker lines. */
#define BQ_SIZE 32
#define BQ_DEPTH 4
#define BQ_CHUNK (256u * 1024u)
static struct vq_desc bq_desc[BQ_SIZE] __attribute__((aligned(16)));
static struct { uint16_t flags, idx, ring[BQ_SIZE], used_event; } bq_avail __attribute__((aligned(4096)));
/* The used ring has a page of its own (the avail ring is page-aligned too, so nothing the vCPU
 * writes shares it): only the device writes it, so a migration that missed the device's writes
 * would leave the guest on the destination a stale ring (vscsireadback). */
static struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[BQ_SIZE]; uint16_t avail_event; } bq_used __attribute__((aligned(4096)));
static uint8_t bq_buf[BQ_DEPTH][BQ_CHUNK] __attribute__((aligned(4096)));
static uint8_t bq_req[BQ_DEPTH][64], bq_resp[BQ_DEPTH][128];

/* Where a read lands instead of bq_buf[slot] (vscsireadback), when set. */
static uint8_t *bq_read_into[BQ_DEPTH];

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
        bq_desc[d + 2] = (struct vq_desc){ (uint32_t)(bq_read_into[slot] ? bq_read_into[slot] : bq_buf[slot]), bytes, 2, 0 };
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
            else lba = submitted * (bytes / 512) % span_blocks;
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

static uint32_t tsc_per_ms;         /* defined with the network code, which calibrates it */
static void tsc_calibrate(void);

/* Microseconds since `t0` by the TSC (0 if it could not be calibrated). */
static uint32_t tsc_us_since(uint64_t t0)
{
    uint64_t ticks = (rdtsc() - t0) * 1000;
    if (tsc_per_ms == 0) return 0;
    (void)divmod64(&ticks, tsc_per_ms);   /* no 64-bit division in a freestanding i386 guest */
    return (uint32_t)ticks;
}

/* Runs one vscsibench phase between its marker lines, then prints its own duration ("bench:
 * PHASE us=N"): the host's timestamps of the markers include how late the serial device wrote
 * them, which on a busy host is milliseconds. */
static uint32_t bench_phase(const char *name, int write, uint32_t total, uint32_t bytes, int random, uint32_t span)
{
    kprintf("bench: %s start\n", name);
    uint64_t t0 = rdtsc();
    uint32_t failed = bench_run(write, total, bytes, random, span);
    uint32_t us = tsc_us_since(t0);
    kprintf("bench: %s end\n", name);
    kprintf("bench: %s us=%u\n", name, us);
    return failed;
}

static void mode_vscsibench(uint32_t mib, uint32_t passes)
{
    int ro = 0;
    vs_qdesc = bq_desc; vs_qavail = &bq_avail; vs_qused = &bq_used; vs_qsize = BQ_SIZE;
    if (!vscsi_setup(&ro)) return;
    tsc_calibrate();
    uint32_t chunks = mib * (1024u * 1024u / BQ_CHUNK) * (passes ? passes : 1), span = mib * 2048u;
    (void)bench_run(0, 1, 4096, 0, span);  /* takes any power-on UNIT ATTENTION (QEMU reports one) */
    uint32_t e1 = bench_phase("seqread", 0, chunks, BQ_CHUNK, 0, span);
    uint32_t e2 = bench_phase("seqwrite", 1, chunks, BQ_CHUNK, 0, span);
    uint32_t e3 = bench_phase("randread", 0, mib * 256u, 4096, 1, span);
    kprintf("bench: errors=%u\n", e1 + e2 + e3);
}

/* vscsilat: `count` 4 KiB reads (writes with write=1) one at a time (queue depth 1) at
 * pseudo-random LBAs within the first `size` MiB (default 16), each timed from the kick to its
 * completion; prints the median, the 90th and the 99th percentile in microseconds: the disk round
 * trip a small VM sees. */
static uint32_t lat_us[4096];

static void mode_vscsilat(uint32_t count, uint32_t span_mib, int write)
{
    int ro = 0;
    vs_qdesc = bq_desc; vs_qavail = &bq_avail; vs_qused = &bq_used; vs_qsize = BQ_SIZE;
    if (!vscsi_setup(&ro)) return;
    tsc_calibrate();
    if (count > 4096) count = 4096;
    if (span_mib == 0) span_mib = 16;
    (void)bench_run(0, 1, 4096, 0, 64);  /* takes any power-on UNIT ATTENTION */
    kprintf("bench: disklat start\n");
    uint32_t seed = 4242, failed = 0;
    for (uint32_t i = 0; i < count; i++) {
        seed = seed * 1103515245u + 12345u;
        uint32_t lba = ((seed >> 8) % (span_mib * 256u)) * 8;
        uint16_t seen = bq_used.idx;
        uint64_t t0 = rdtsc();
        bench_submit(0, write, lba, 4096);
        mb();
        *(volatile uint16_t *)vs_notify = 2;
        while (*(volatile uint16_t *)&bq_used.idx == seen) cpu_pause();
        uint64_t ticks = (rdtsc() - t0) * 1000;
        (void)divmod64(&ticks, tsc_per_ms);   /* no 64-bit division in a freestanding i386 guest */
        lat_us[i] = (uint32_t)ticks;
        if (bq_resp[0][10] != 0 || bq_resp[0][11] != 0) failed++;
    }
    /* Insertion sort: a few thousand numbers. */
    for (uint32_t i = 1; i < count; i++) {
        uint32_t v = lat_us[i], j = i;
        while (j > 0 && lat_us[j - 1] > v) { lat_us[j] = lat_us[j - 1]; j--; }
        lat_us[j] = v;
    }
    kprintf("bench: disklat end count=%u median=%u p90=%u p99=%u errors=%u\n", count, lat_us[count / 2],
            lat_us[count * 9 / 10], lat_us[count * 99 / 100], failed);
}

/* vscsistress: `count` rounds (default 200) of write-then-verify with BQ_DEPTH requests in flight,
 * 4 KiB each at distinct LBAs, every word a function of (round, LBA, offset), while the test kills
 * the adapter's process at random moments. Every used element must name a request in flight
 * (none completed twice), every status must be GOOD and every word must read back as written.
 * The last round's writes stay on the disk, so the host can check the image afterwards. */
static uint32_t stress_word(uint32_t round, uint32_t lba, uint32_t i)
{
    uint32_t v = round * 2654435761u ^ (lba * 40503u + i * 2246822519u);
    return v ^ (v >> 15);
}

static void mode_vscsistress(uint32_t rounds)
{
    int ro = 0;
    vs_qdesc = bq_desc; vs_qavail = &bq_avail; vs_qused = &bq_used; vs_qsize = BQ_SIZE;
    if (!vscsi_setup(&ro)) return;
    (void)bench_run(0, 1, 4096, 0, 64);  /* takes any power-on UNIT ATTENTION */
    uint32_t errors = 0, mismatches = 0, duplicates = 0, requests = 0;
    uint16_t seen = bq_used.idx;
    for (uint32_t round = 0; round < rounds; round++) {
        for (int write = 1; write >= 0; write--) {
            int busy[BQ_DEPTH];
            for (int slot = 0; slot < BQ_DEPTH; slot++) {
                uint32_t lba = (round % 16) * (BQ_DEPTH * 8) + (uint32_t)slot * 8;
                uint32_t *w = (uint32_t *)bq_buf[slot];
                for (uint32_t i = 0; i < 1024; i++) w[i] = write ? stress_word(round, lba, i) : 0;
                bench_submit(slot, write, lba, 4096);
                busy[slot] = 1;
            }
            mb();
            *(volatile uint16_t *)vs_notify = 2;
            int left = BQ_DEPTH;
            while (left > 0) {
                while (*(volatile uint16_t *)&bq_used.idx == seen) cpu_pause();
                while (seen != *(volatile uint16_t *)&bq_used.idx) {
                    uint32_t id = bq_used.ring[seen % BQ_SIZE].id;
                    int slot = (int)(id / 3);
                    seen++;
                    requests++;
                    if (id % 3 != 0 || slot >= BQ_DEPTH || !busy[slot]) {
                        duplicates++;
                        if (duplicates <= 3) kprintf("vscsistress: round %u: used element names %u, not a request in flight\n", round, id);
                        continue;
                    }
                    busy[slot] = 0;
                    left--;
                    if (bq_resp[slot][10] != 0 || bq_resp[slot][11] != 0) {
                        errors++;
                        if (errors <= 3) kprintf("vscsistress: round %u slot %d: status=%x response=%x\n", round, slot, bq_resp[slot][10], bq_resp[slot][11]);
                    }
                }
            }
            if (!write) {
                for (int slot = 0; slot < BQ_DEPTH; slot++) {
                    uint32_t lba = (round % 16) * (BQ_DEPTH * 8) + (uint32_t)slot * 8;
                    uint32_t *w = (uint32_t *)bq_buf[slot];
                    for (uint32_t i = 0; i < 1024; i++) {
                        if (w[i] != stress_word(round, lba, i)) {
                            mismatches++;
                            if (mismatches <= 3) kprintf("vscsistress: round %u lba %u word %u: %x, wrote %x\n", round, lba, i, w[i], stress_word(round, lba, i));
                            break;
                        }
                    }
                }
            }
        }
        if (round % 50 == 49) kprintf("vscsistress: round %u\n", round + 1);
    }
    kprintf("vscsistress: done rounds=%u requests=%u errors=%u mismatches=%u duplicates=%u\n",
            rounds, requests, errors, mismatches, duplicates);
}

/* vscsireadback: `count` passes; pass p writes 64 distinct 4 KiB blocks with pattern p, then reads
 * them back, BQ_DEPTH at a time, into buffers the vCPU never writes (rb_buf), and checks every
 * word. Only the device writes those pages (and the used ring, on its own page), and what it
 * writes changes every pass, so a live migration that misses the device's writes leaves the guest
 * on the destination an older pass's block (a mismatch) or a stale used ring (the guest waits
 * forever): the check of device-side dirty logging. */
static uint8_t rb_buf[BQ_DEPTH][4096] __attribute__((aligned(4096)));

/* One step of the pattern check vscsireadback and migrant run: writes `blocks` 4 KiB blocks with
 * pattern `pass` (`write`), or reads them back into rb_buf and checks every word, BQ_DEPTH at a
 * time, calling `idle` while a request is in flight; counts errors and mismatches (the first
 * three reported under `who`). */
static void pattern_step(const char *who, uint32_t pass, int write, uint32_t blocks, uint16_t *seen,
                         uint32_t *errors, uint32_t *mismatches, void (*idle)(void))
{
    for (uint32_t group = 0; group < blocks / BQ_DEPTH; group++) {
        for (int slot = 0; slot < BQ_DEPTH; slot++) {
            uint32_t lba = (group * BQ_DEPTH + (uint32_t)slot) * 8;
            if (write) {
                uint32_t *w = (uint32_t *)bq_buf[slot];
                for (uint32_t i = 0; i < 1024; i++) w[i] = stress_word(pass, lba, i);
            }
            bq_read_into[slot] = rb_buf[slot];
            bench_submit(slot, write, lba, 4096);
        }
        mb();
        *(volatile uint16_t *)vs_notify = 2;
        for (int left = BQ_DEPTH; left > 0; left--) {
            while (*(volatile uint16_t *)&bq_used.idx == *seen) idle();
            (*seen)++;
        }
        for (int slot = 0; slot < BQ_DEPTH; slot++) {
            uint32_t lba = (group * BQ_DEPTH + (uint32_t)slot) * 8;
            if (bq_resp[slot][10] != 0 || bq_resp[slot][11] != 0) (*errors)++;
            if (write) continue;
            const volatile uint32_t *w = (const volatile uint32_t *)rb_buf[slot];
            for (uint32_t i = 0; i < 1024; i++) {
                if (w[i] != stress_word(pass, lba, i)) {
                    (*mismatches)++;
                    if (*mismatches <= 3) kprintf("%s: pass %u lba %u word %u: %x, not %x\n", who, pass, lba, i, w[i], stress_word(pass, lba, i));
                    break;
                }
            }
        }
    }
}

static void pause_idle(void) { cpu_pause(); }

static void mode_vscsireadback(uint32_t passes)
{
    int ro = 0;
    vs_qdesc = bq_desc; vs_qavail = &bq_avail; vs_qused = &bq_used; vs_qsize = BQ_SIZE;
    if (!vscsi_setup(&ro)) return;
    (void)bench_run(0, 1, 4096, 0, 64);  /* takes any power-on UNIT ATTENTION */
    uint32_t errors = 0, mismatches = 0, reads = 0;
    uint16_t seen = bq_used.idx;
    for (uint32_t pass = 1; pass <= passes; pass++) {
        pattern_step("vscsireadback", pass, 1, 64, &seen, &errors, &mismatches, pause_idle);
        pattern_step("vscsireadback", pass, 0, 64, &seen, &errors, &mismatches, pause_idle);
        reads += 64;
        if (pass % 10 == 0) kprintf("vscsireadback: pass %u\n", pass);
    }
    kprintf("vscsireadback: done reads=%u errors=%u mismatches=%u\n", reads, errors, mismatches);
}

/* ---- net: a polled virtio-net driver and a tiny IPv4 stack (ARP, ICMP echo, UDP, DHCP) ----
 *
 * Up to two NICs (1AF4:1041 on bus 0, numbered in slot order). Queue 0 receives into 32 buffers
 * of 2 KiB, each one device-writable descriptor; queue 1 transmits from one descriptor per frame
 * (the 12-byte virtio_net_hdr_v1, zeroed, then the frame), up to a whole ring in flight. No
 * interrupts: the driver polls the used rings and kicks after every batch it makes available.
 */

#define NET_NICS        2
#define NQ_MAX          64              /* ring entries per queue, at most */
#define NRX_BUFS        32
#define NBUF_SIZE       2048
#define VNET_HDR        12              /* virtio_net_hdr_v1 */
#define ETH_MAX         1514
#define VNET_F_CSUM     (1u << 0)
#define VNET_F_GUEST_CSUM (1u << 1)
#define VNET_F_MAC      (1u << 5)
#define VNET_F_MRG_RXBUF (1u << 15)
#define VNET_F_STATUS   (1u << 16)

struct nq {
    struct vq_desc desc[NQ_MAX] __attribute__((aligned(16)));
    struct { uint16_t flags, idx, ring[NQ_MAX], used_event; } avail __attribute__((aligned(4)));
    struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[NQ_MAX]; uint16_t avail_event; } used __attribute__((aligned(4)));
    volatile uint16_t *notify;
    uint16_t index, size, used_seen, nfree, free[NQ_MAX];
};

struct nic {
    struct vpci v;
    uint32_t features;                  /* bits 0-31 negotiated */
    uint32_t num, pending_kick, rx_skip;
    uint8_t mac[6];
    struct nq rx, tx;
};

static struct nic nics[NET_NICS];
static uint32_t nic_count;
static uint8_t net_rxbuf[NET_NICS][NRX_BUFS][NBUF_SIZE] __attribute__((aligned(4096)));
static uint8_t net_txbuf[NET_NICS][NQ_MAX][NBUF_SIZE] __attribute__((aligned(4096)));
static uint32_t tsc_per_ms = 2000000;   /* calibrated against the PIT in net_start */

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Dwords first, then the odd bytes: a rep iteration is not cheap under emulation. */
static void copy_bytes(void *d, const void *s, uint32_t n)
{
    uint32_t dwords = n >> 2, rest = n & 3;
    __asm__ volatile("rep movsl" : "+D"(d), "+S"(s), "+c"(dwords) : : "memory");
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(rest) : : "memory");
}

static void zero_bytes(void *d, uint32_t n)
{
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(0) : "memory");
}

static int same_bytes(const void *a, const void *b, uint32_t n)
{
    const uint8_t *x = a, *y = b;
    while (n--)
        if (*x++ != *y++) return 0;
    return 1;
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

static uint64_t ms_to_tsc(uint32_t ms) { return (uint64_t)tsc_per_ms * ms; }

/* 50 ms of PIT channel 2 (gated through port 0x61, mode 0) against the TSC. */
static void tsc_calibrate(void)
{
    uint8_t p61 = inb(0x61);
    outb(0x61, (uint8_t)((p61 & ~0x02) | 0x01));
    outb(0x43, 0xB0);
    outb(0x42, 59659 & 0xFF);
    outb(0x42, 59659 >> 8);
    uint64_t t0 = rdtsc(), t;
    while (!(inb(0x61) & 0x20) && rdtsc() - t0 < (1ull << 31))
        ;
    t = rdtsc() - t0;
    outb(0x61, p61);
    divmod64(&t, 50);                                      /* t becomes cycles per ms */
    uint32_t per_ms = t > 0xFFFFFFFFull ? 0 : (uint32_t)t;
    if (per_ms >= 100000 && per_ms <= 10000000)            /* 0.1 to 10 GHz: believable */
        tsc_per_ms = per_ms;
}

static void nq_kick(struct nq *q)
{
    mb();
    *q->notify = q->index;
}

static int nq_setup(struct nic *n, struct nq *q, uint16_t index)
{
    *vpci16(&n->v, VPCI_Q_SELECT) = index;
    uint16_t max = *vpci16(&n->v, VPCI_Q_SIZE), size = NQ_MAX;
    while (size > max)
        size >>= 1;
    if (!size) return 0;
    q->index = index;
    q->size = size;
    q->avail.flags = 1;                 /* VIRTQ_AVAIL_F_NO_INTERRUPT: polled */
    vpci_queue(&n->v, index, size, q->desc, &q->avail, &q->used);
    q->notify = (volatile uint16_t *)(n->v.notify + *vpci16(&n->v, VPCI_Q_NOTIFY) * n->v.notify_mult);
    vpci_queue_enable(&n->v);
    return 1;
}

static void nq_offer(struct nq *q, uint16_t id)
{
    q->avail.ring[q->avail.idx % q->size] = id;
    mb();
    q->avail.idx++;
}

static uint32_t nrx_bufs(const struct nic *n) { return n->rx.size < NRX_BUFS ? n->rx.size : NRX_BUFS; }

/* Finds and starts the NICs, printing one line for each; returns how many. */
/* Set before net_start: negotiate VIRTIO_NET_F_CSUM (the device completes checksums). */
static uint32_t net_want_csum;
/* The virtio-net header flags of the frame being handled (NEEDS_CSUM 1, DATA_VALID 2). */
static uint8_t rx_hdr_flags;
/* Set while netblast sends: its datagrams carry a partial UDP checksum for the device to finish. */
static uint32_t net_tx_partial_udp;

static uint32_t net_start(void)
{
    tsc_calibrate();
    nic_count = 0;
    for (uint32_t dev = 0; dev < 32 && nic_count < NET_NICS; dev++) {
        if (pci_read(dev << 3, 0) != 0x10411AF4u) continue;
        struct nic *n = &nics[nic_count];
        n->num = nic_count;
        vpci_map(&n->v, dev << 3, 0xE1000000u + (dev << 20), 1);  /* if unassigned: 1 MiB per slot */
        vpci_reset_ack(&n->v);
        uint32_t lo = vpci_offered(&n->v, 0), hi = vpci_offered(&n->v, 1);
        n->features = lo & (VNET_F_MAC | VNET_F_STATUS | VNET_F_MRG_RXBUF | (net_want_csum ? VNET_F_CSUM | VNET_F_GUEST_CSUM : 0));
        if (!(hi & 1) || !vpci_set_features(&n->v, n->features, 1)) {
            kprintf("net: nic%u features refused\n", nic_count);
            continue;
        }
        if (!nq_setup(n, &n->rx, 0) || !nq_setup(n, &n->tx, 1)) {
            kprintf("net: nic%u has no queues\n", nic_count);
            continue;
        }
        for (uint32_t i = 0; i < nrx_bufs(n); i++) {
            n->rx.desc[i] = (struct vq_desc){ (uint32_t)net_rxbuf[n->num][i], NBUF_SIZE, 2, 0 };  /* WRITE */
            nq_offer(&n->rx, (uint16_t)i);
        }
        for (uint32_t i = 0; i < n->tx.size; i++) {
            n->tx.desc[i] = (struct vq_desc){ (uint32_t)net_txbuf[n->num][i], 0, 0, 0 };
            n->tx.free[i] = (uint16_t)(n->tx.size - 1 - i);
        }
        n->tx.nfree = n->tx.size;
        vpci_driver_ok(&n->v);
        nq_kick(&n->rx);
        for (int i = 0; i < 6; i++)
            n->mac[i] = (n->features & VNET_F_MAC) ? n->v.device[i] : (uint8_t)(i == 0 ? 0x02 : i == 5 ? nic_count : 0);
        int up = (n->features & VNET_F_STATUS) ? (*(volatile uint16_t *)(n->v.device + 6) & 1) : 1;
        kprintf("net: nic%u mac %02x:%02x:%02x:%02x:%02x:%02x link %s\n", nic_count,
                n->mac[0], n->mac[1], n->mac[2], n->mac[3], n->mac[4], n->mac[5], up ? "up" : "down");
        nic_count++;
    }
    if (!nic_count)
        kprintf("net: no virtio-net device\n");
    return nic_count;
}

static void tx_reclaim(struct nic *n)
{
    struct nq *q = &n->tx;
    uint16_t used = *(volatile uint16_t *)&q->used.idx;
    barrier();
    while (q->used_seen != used) {
        uint32_t id = q->used.ring[q->used_seen % q->size].id;
        if (id < q->size && q->nfree < q->size)
            q->free[q->nfree++] = (uint16_t)id;
        q->used_seen++;
    }
}

/* A free transmit slot, waiting up to `wait_ms` for one; -1 if none. */
static int tx_alloc(struct nic *n, uint32_t wait_ms)
{
    tx_reclaim(n);
    if (!n->tx.nfree && wait_ms) {
        uint64_t t0 = rdtsc(), limit = ms_to_tsc(wait_ms);
        while (!n->tx.nfree && rdtsc() - t0 < limit) {
            cpu_pause();
            tx_reclaim(n);
        }
    }
    return n->tx.nfree ? n->tx.free[--n->tx.nfree] : -1;
}

/* Where slot `id`'s frame goes (after its virtio-net header). */
static uint8_t *tx_frame(struct nic *n, int id) { return net_txbuf[n->num][id] + VNET_HDR; }

/* Makes slot `id` (a frame of `len` bytes, padded here to 60) available, kicking unless `batch`. */
static void tx_submit(struct nic *n, int id, uint32_t len, int batch)
{
    uint8_t *b = net_txbuf[n->num][id];
    zero_bytes(b, VNET_HDR);
    if (net_tx_partial_udp && (n->features & VNET_F_CSUM)) {
        /* virtio_net_hdr: NEEDS_CSUM, csum_start = the UDP header, csum_offset = its checksum field. */
        b[0] = 1;
        b[6] = 14 + 20; b[7] = 0;
        b[8] = 6; b[9] = 0;
    }
    if (len < 60) {
        zero_bytes(b + VNET_HDR + len, 60 - len);
        len = 60;
    }
    n->tx.desc[id].len = VNET_HDR + len;
    nq_offer(&n->tx, (uint16_t)id);
    if (batch)
        n->pending_kick = 1;
    else
        nq_kick(&n->tx);
}

static void tx_flush(struct nic *n)
{
    if (n->pending_kick) {
        n->pending_kick = 0;
        nq_kick(&n->tx);
    }
}

typedef void (*frame_fn)(struct nic *n, uint8_t *frame, uint32_t len);

/* Hands every received frame to `fn`, gives the buffers back and kicks; returns how many. */
static uint32_t nic_poll(struct nic *n, frame_fn fn)
{
    struct nq *q = &n->rx;
    uint32_t handled = 0;
    uint16_t used = *(volatile uint16_t *)&q->used.idx;
    barrier();
    while (q->used_seen != used) {
        uint32_t id = q->used.ring[q->used_seen % q->size].id, len = q->used.ring[q->used_seen % q->size].len;
        q->used_seen++;
        if (id >= nrx_bufs(n)) continue;              /* not ours: nothing to give back */
        uint8_t *b = net_rxbuf[n->num][id];
        uint16_t nbufs = (n->features & VNET_F_MRG_RXBUF) ? (uint16_t)(b[10] | b[11] << 8) : 1;
        if (n->rx_skip) {
            n->rx_skip--;                             /* the tail of a frame spread over buffers */
        } else if (nbufs > 1) {
            n->rx_skip = nbufs - 1u;                  /* cannot happen for frames ≤ 1514: dropped */
        } else if (len >= VNET_HDR + 14 && len <= NBUF_SIZE) {
            rx_hdr_flags = (n->features & VNET_F_GUEST_CSUM) ? b[0] : 0;
            fn(n, b + VNET_HDR, len - VNET_HDR);
        }
        nq_offer(q, (uint16_t)id);
        handled++;
    }
    if (handled)
        nq_kick(q);
    return handled;
}

/* ---- the IPv4 stack, on nic0 ---- */

#define IP4(a) (uint32_t)((a) >> 24), (uint32_t)(((a) >> 16) & 0xFF), (uint32_t)(((a) >> 8) & 0xFF), (uint32_t)((a) & 0xFF)
#define PING_ID         0x4856

static const uint8_t eth_bcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
static uint32_t my_ip;                  /* host order; 0 while there is none */
static uint32_t arp_want, arp_got;      /* resolving: the address, and whether it answered */
static uint8_t arp_mac[6];
static uint32_t ping_peer, ping_want, ping_got;
static uint32_t echo_printed;
static uint32_t sink_port, sink_open, sink_count, sink_summed, sink_bad, sink_offloaded;
static uint64_t sink_bytes;

static uint32_t dhcp_xid, dhcp_active, dhcp_got, dhcp_yiaddr, dhcp_server, dhcp_mask;

static uint16_t csum(uint32_t sum, const uint8_t *p, uint32_t len)
{
    for (; len > 1; p += 2, len -= 2)
        sum += (uint32_t)p[0] << 8 | p[1];
    if (len)
        sum += (uint32_t)p[0] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

static uint8_t *eth_header(uint8_t *f, const uint8_t *dst, const uint8_t *src, uint16_t type)
{
    copy_bytes(f, dst, 6);
    copy_bytes(f + 6, src, 6);
    put16(f + 12, type);
    return f + 14;
}

/* A 20-byte IPv4 header (DF, TTL 64) with its checksum; returns where the payload goes. */
static uint8_t *ip_header(uint8_t *ip, uint32_t payload_len, uint8_t proto, uint32_t src, uint32_t dst, uint16_t id)
{
    ip[0] = 0x45; ip[1] = 0;
    put16(ip + 2, 20 + payload_len);
    put16(ip + 4, id);
    put16(ip + 6, 0x4000);
    ip[8] = 64; ip[9] = proto;
    put16(ip + 10, 0);
    put_be32(ip + 12, src);
    put_be32(ip + 16, dst);
    put16(ip + 10, csum(0, ip, 20));
    return ip + 20;
}

static uint8_t *udp_header(uint8_t *u, uint16_t sport, uint16_t dport, uint32_t payload_len)
{
    put16(u, sport);
    put16(u + 2, dport);
    put16(u + 4, 8 + payload_len);
    put16(u + 6, 0);                    /* no checksum */
    return u + 8;
}

static void arp_send(struct nic *n, uint16_t op, const uint8_t *eth_dst, const uint8_t *tha, uint32_t tpa)
{
    int id = tx_alloc(n, 100);
    if (id < 0) return;
    uint8_t *f = tx_frame(n, id), *a = eth_header(f, eth_dst, n->mac, 0x0806);
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, op);
    copy_bytes(a + 8, n->mac, 6);
    put_be32(a + 14, my_ip);
    copy_bytes(a + 18, tha, 6);
    put_be32(a + 24, tpa);
    tx_submit(n, id, 42, 0);
}

static void arp_input(struct nic *n, const uint8_t *f, const uint8_t *a)
{
    (void)f;
    if (get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4) return;
    uint16_t op = get16(a + 6);
    uint32_t spa = get32(a + 14), tpa = get32(a + 24);
    if (op == 1 && my_ip && tpa == my_ip)
        arp_send(n, 2, a + 8, a + 8, spa);  /* unicast to the asker */
    else if (op == 2 && arp_want && spa == arp_want && !arp_got) {
        copy_bytes(arp_mac, a + 8, 6);
        arp_got = 1;
    }
}

static void icmp_input(struct nic *n, const uint8_t *f, uint32_t src, const uint8_t *icmp, uint32_t len)
{
    if (len < 8) return;
    if (icmp[0] == 8 && icmp[1] == 0) {             /* echo request */
        if (14 + 20 + len > ETH_MAX) return;
        int id = tx_alloc(n, 100);
        if (id < 0) return;
        uint8_t *o = tx_frame(n, id);
        uint8_t *ip = eth_header(o, f + 6, n->mac, 0x0800);
        uint8_t *r = ip_header(ip, len, 1, my_ip, src, 0);
        copy_bytes(r, icmp, len);
        r[0] = 0; r[1] = 0;
        put16(r + 2, 0);
        put16(r + 2, csum(0, r, len));
        tx_submit(n, id, 14 + 20 + len, 0);
        if (echo_printed < 50) {
            echo_printed++;
            kprintf("net: echo seq %u from %u.%u.%u.%u\n", get16(icmp + 6), IP4(src));
        }
    } else if (icmp[0] == 0 && ping_want && src == ping_peer && get16(icmp + 4) == PING_ID &&
               get16(icmp + 6) == ping_want) {
        ping_got = 1;
    }
}

static void dhcp_input(const struct nic *n, const uint8_t *b, uint32_t len)
{
    if (len < 240 || b[0] != 2 || get32(b + 4) != dhcp_xid || !same_bytes(b + 28, n->mac, 6) ||
        get32(b + 236) != 0x63825363u)
        return;
    uint32_t type = 0, server = 0, mask = 0;
    for (uint32_t i = 240; i < len && b[i] != 255;) {
        if (b[i] == 0) { i++; continue; }
        if (i + 2 > len || i + 2 + b[i + 1] > len) break;
        uint8_t code = b[i], olen = b[i + 1];
        const uint8_t *v = b + i + 2;
        if (code == 53 && olen >= 1) type = v[0];
        if (code == 54 && olen >= 4) server = get32(v);
        if (code == 1 && olen >= 4) mask = get32(v);
        i += 2u + olen;
    }
    if (type == dhcp_active || (type == 6 && dhcp_active == 5)) {  /* what the client waits for, or a NAK */
        dhcp_got = type;
        dhcp_yiaddr = get32(b + 16);
        if (server) dhcp_server = server;
        if (mask) dhcp_mask = mask;
    }
}

static void udp_input(struct nic *n, uint32_t src, uint32_t dst, const uint8_t *u, uint32_t len)
{
    if (len < 8 || get16(u + 4) < 8 || get16(u + 4) > len) return;
    len = get16(u + 4);
    uint16_t dport = get16(u + 2);
    const uint8_t *p = u + 8;
    uint32_t plen = len - 8;
    if (dport == 68 && dhcp_active) {
        dhcp_input(n, p, plen);
    } else if (my_ip && dst == my_ip && sink_port && dport == sink_port) {
        if (plen >= 4 && same_bytes(p, "END!", 4)) {
            if (sink_open) {
                kprintf("bench: net rx end received=%u bytes=%llu checksummed=%u bad=%u offloaded=%u\n", sink_count, sink_bytes,
                        sink_summed, sink_bad, sink_offloaded);
                sink_open = 0;
            }
        } else {
            if (!sink_open) {
                kprintf("bench: net rx start\n");
                sink_open = 1;
                sink_count = 0;
                sink_bytes = 0;
                sink_summed = 0;
                sink_bad = 0;
                sink_offloaded = 0;
            }
            sink_count++;
            sink_bytes += plen;
            if (rx_hdr_flags & 3) {
                /* VIRTIO_NET_F_GUEST_CSUM: the device says the checksum was left partial by a sender
                 * on this host (NEEDS_CSUM; the frame never crossed a wire) or was already checked. */
                sink_offloaded++;
            } else if (get16(u + 6)) {
                /* A UDP checksum is there: the pseudo-header, header and payload must sum to all ones. */
                uint32_t pseudo = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 17 + len;
                sink_summed++;
                if (csum(pseudo, u, len) != 0)
                    sink_bad++;
            }
        }
    }
}

/* The stack's receive path: answers ARP and echo requests for my_ip, notes what the modes wait for. */
static void net_input(struct nic *n, uint8_t *f, uint32_t len)
{
    uint16_t type = get16(f + 12);
    if (type == 0x0806 && len >= 42) {
        arp_input(n, f, f + 14);
        return;
    }
    if (type != 0x0800 || len < 34) return;
    const uint8_t *ip = f + 14;
    uint32_t ihl = (ip[0] & 0xF) * 4u, total = get16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl || total > len - 14 || (get16(ip + 6) & 0x3FFF))
        return;                             /* not IPv4, malformed, or a fragment */
    uint32_t src = get32(ip + 12), dst = get32(ip + 16);
    if (ip[9] == 1 && my_ip && dst == my_ip)
        icmp_input(n, f, src, ip + ihl, total - ihl);
    else if (ip[9] == 17)
        udp_input(n, src, dst, ip + ihl, total - ihl);
}

/* Polls nic0 for `ms` milliseconds or until *flag is set; returns *flag. */
static uint32_t net_wait(volatile uint32_t *flag, uint32_t ms)
{
    uint64_t t0 = rdtsc(), limit = ms_to_tsc(ms);
    while (!*flag && rdtsc() - t0 < limit)
        if (!nic_poll(&nics[0], net_input))
            cpu_pause();
    return *flag;
}

static void net_responder(void)
{
    for (;;)
        if (!nic_poll(&nics[0], net_input))
            cpu_pause();
}

/* ARP-resolves `peer` into arp_mac: a request every second, ten times at most. */
static int arp_resolve(uint32_t peer)
{
    arp_want = peer;
    arp_got = 0;
    for (int tries = 0; tries < 10 && !arp_got; tries++) {
        arp_send(&nics[0], 1, eth_bcast, (const uint8_t *)"\0\0\0\0\0\0", peer);
        net_wait(&arp_got, 1000);
    }
    if (arp_got)
        kprintf("net: peer %u.%u.%u.%u is at %02x:%02x:%02x:%02x:%02x:%02x\n", IP4(peer),
                arp_mac[0], arp_mac[1], arp_mac[2], arp_mac[3], arp_mac[4], arp_mac[5]);
    else
        kprintf("net: peer %u.%u.%u.%u did not answer ARP\n", IP4(peer));
    return arp_got;
}

static void dhcp_send(struct nic *n, uint8_t type)
{
    int id = tx_alloc(n, 100);
    if (id < 0) return;
    uint8_t *f = tx_frame(n, id);
    const uint32_t blen = 300;              /* BOOTP's minimum message */
    zero_bytes(f, 14 + 20 + 8 + blen);
    uint8_t *ip = eth_header(f, eth_bcast, n->mac, 0x0800);
    uint8_t *u = ip_header(ip, 8 + blen, 17, 0, 0xFFFFFFFFu, 0);
    uint8_t *b = udp_header(u, 68, 67, blen);
    b[0] = 1; b[1] = 1; b[2] = 6;           /* BOOTREQUEST, Ethernet */
    put_be32(b + 4, dhcp_xid);
    put16(b + 10, 0x8000);                  /* broadcast replies, please */
    copy_bytes(b + 28, n->mac, 6);
    put_be32(b + 236, 0x63825363u);
    uint8_t *o = b + 240;
    *o++ = 53; *o++ = 1; *o++ = type;
    *o++ = 61; *o++ = 7; *o++ = 1; copy_bytes(o, n->mac, 6); o += 6;
    *o++ = 12; *o++ = 12; copy_bytes(o, "hv-testguest", 12); o += 12;
    *o++ = 55; *o++ = 3; *o++ = 1; *o++ = 3; *o++ = 6;
    if (type == 3) {
        *o++ = 50; *o++ = 4; put_be32(o, dhcp_yiaddr); o += 4;
        *o++ = 54; *o++ = 4; put_be32(o, dhcp_server); o += 4;
    }
    *o = 255;
    tx_submit(n, id, 14 + 20 + 8 + blen, 0);
}

/* DISCOVER → OFFER → REQUEST → ACK, each step sent up to 10 times, 2 s apart. */
static int dhcp_run(void)
{
    struct nic *n = &nics[0];
    dhcp_xid = (uint32_t)rdtsc() ^ ((uint32_t)n->mac[2] << 24 | n->mac[3] << 16 | n->mac[4] << 8 | n->mac[5]);
    for (int round = 0; round < 3; round++) {
        dhcp_server = dhcp_mask = dhcp_yiaddr = 0;
        dhcp_active = 2;                    /* waiting for an OFFER */
        dhcp_got = 0;
        for (int tries = 0; tries < 10 && dhcp_got != 2; tries++) {
            dhcp_send(n, 1);
            net_wait(&dhcp_got, 2000);
        }
        if (dhcp_got != 2) break;
        dhcp_active = 5;                    /* waiting for an ACK */
        dhcp_got = 0;
        for (int tries = 0; tries < 10 && !dhcp_got; tries++) {
            dhcp_send(n, 3);
            net_wait(&dhcp_got, 2000);
        }
        if (dhcp_got == 5) {
            dhcp_active = 0;
            return 1;
        }
        if (dhcp_got != 6) break;
        kprintf("net: dhcp nak, starting over\n");
        dhcp_xid++;
    }
    dhcp_active = 0;
    kprintf("net: dhcp failed\n");
    return 0;
}

static void mode_netdhcp(void)
{
    if (!net_start() || !dhcp_run()) return;
    my_ip = dhcp_yiaddr;
    kprintf("net: lease %u.%u.%u.%u server %u.%u.%u.%u mask %u.%u.%u.%u\n",
            IP4(dhcp_yiaddr), IP4(dhcp_server), IP4(dhcp_mask));
    /* Announce the address (RFC 5227 §2.3): the server may have probed it while we had none,
     * leaving a failed neighbour entry that would make the first echo to us unreachable. */
    {
        static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, zero[6] = {0};
        arp_send(&nics[0], 1, bcast, zero, my_ip);
    }
    net_responder();
}

static void mode_netpeer(const struct config *cfg)
{
    if (!net_start()) return;
    my_ip = cfg->ip;
    sink_port = cfg->port;
    net_responder();
}

static void mode_netping(const struct config *cfg)
{
    if (!net_start()) return;
    my_ip = cfg->ip;
    int resolved;
    if (cfg->peer_mac_given) {
        /* A MAC given on the command line: no ARP (the switch tests send to a station it never saw). */
        copy_bytes(arp_mac, cfg->peer_mac, 6);
        kprintf("net: peer %u.%u.%u.%u is at %02x:%02x:%02x:%02x:%02x:%02x (given)\n", IP4(cfg->peer),
                arp_mac[0], arp_mac[1], arp_mac[2], arp_mac[3], arp_mac[4], arp_mac[5]);
        resolved = 1;
    } else {
        resolved = arp_resolve(cfg->peer);
    }
    if (resolved) {
        uint32_t count = cfg->count_given ? cfg->count : 3, received = 0;
        ping_peer = cfg->peer;
        for (uint32_t seq = 1; seq <= count; seq++) {
            struct nic *n = &nics[0];
            ping_want = seq & 0xFFFF;
            ping_got = 0;
            int id = tx_alloc(n, 100);
            uint64_t sent_at = rdtsc();
            if (id >= 0) {
                uint8_t *f = tx_frame(n, id), *ip = eth_header(f, arp_mac, n->mac, 0x0800);
                uint8_t *icmp = ip_header(ip, 8 + 32, 1, my_ip, ping_peer, (uint16_t)seq);
                icmp[0] = 8; icmp[1] = 0;
                put16(icmp + 2, 0);
                put16(icmp + 4, PING_ID);
                put16(icmp + 6, seq);
                for (int i = 0; i < 32; i++)
                    icmp[8 + i] = (uint8_t)('a' + i % 23);
                put16(icmp + 2, csum(0, icmp, 8 + 32));
                tx_submit(n, id, 14 + 20 + 8 + 32, 0);
            }
            if (net_wait(&ping_got, 2000)) {
                /* The round trip as the guest sees it: from building the request to seeing the reply. */
                uint64_t us = (rdtsc() - sent_at) * 1000;
                divmod64(&us, tsc_per_ms ? tsc_per_ms : 1);
                received++;
                kprintf("net: reply seq %u from %u.%u.%u.%u time=%llu us\n", seq, IP4(ping_peer), us);
            }
        }
        ping_want = 0;
        kprintf("net: ping done sent=%u received=%u\n", count, received);
    }
    net_responder();
}

static void sniff_frame(struct nic *n, uint8_t *f, uint32_t len)
{
    static uint32_t frames;
    (void)n;
    if (frames++ < 100)
        kprintf("net: frame dst=%02x:%02x:%02x:%02x:%02x:%02x src=%02x:%02x:%02x:%02x:%02x:%02x type=%04x len=%u\n",
                f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], get16(f + 12), len);
}

static void mode_netsniff(void)
{
    if (!net_start()) return;
    for (;;)
        if (!nic_poll(&nics[0], sniff_frame))
            cpu_pause();
}

/* Copies the frame out of the other NIC unchanged; drops it if that NIC's transmit ring is full. */
static void bridge_frame(struct nic *n, uint8_t *f, uint32_t len)
{
    struct nic *out = &nics[n->num ^ 1];
    if (len > ETH_MAX) return;
    int id = tx_alloc(out, 0);
    if (id < 0) return;
    copy_bytes(tx_frame(out, id), f, len);
    tx_submit(out, id, len, 1);
}

static void mode_netbridge(void)
{
    if (!net_start()) return;
    if (nic_count < 2) {
        kprintf("net: netbridge needs two NICs\n");
        return;
    }
    kprintf("net: bridging nic0 and nic1\n");
    for (;;) {
        uint32_t got = nic_poll(&nics[0], bridge_frame);
        tx_flush(&nics[1]);
        got += nic_poll(&nics[1], bridge_frame);
        tx_flush(&nics[0]);
        if (!got)
            cpu_pause();
    }
}

/* Fills transmit slot `id` with a whole netblast datagram (payload bytes 0, 1, 2, ...). */
static void blast_build(struct nic *n, int id, uint32_t peer, uint32_t port, uint32_t size)
{
    uint8_t *f = tx_frame(n, id), *ip = eth_header(f, arp_mac, n->mac, 0x0800);
    uint8_t *p = udp_header(ip_header(ip, 8 + size, 17, my_ip, peer, 0), (uint16_t)port, (uint16_t)port, size);
    for (uint32_t i = 0; i < size; i++)
        p[i] = (uint8_t)i;
    if (net_tx_partial_udp && (n->features & VNET_F_CSUM)) {
        /* The partial checksum a device expects: the folded pseudo-header sum, not complemented. */
        uint32_t sum = (my_ip >> 16) + (my_ip & 0xFFFF) + (peer >> 16) + (peer & 0xFFFF) + 17 + 8 + size;
        while (sum >> 16)
            sum = (sum & 0xFFFF) + (sum >> 16);
        put16(p - 2, (uint16_t)sum);
    }
}

/* Stamps a built datagram with its first payload bytes and IP id, and redoes the IP checksum. */
static void blast_stamp(struct nic *n, int id, const uint8_t first[4], uint32_t ip_id)
{
    uint8_t *ip = tx_frame(n, id) + 14;
    copy_bytes(ip + 28, first, 4);
    put16(ip + 4, ip_id);
    put16(ip + 10, 0);
    put16(ip + 10, csum(0, ip, 20));
}

/*
 * netblast: `count` UDP datagrams of `size` bytes (a big-endian sequence number first) to the peer
 * as fast as the transmit ring drains, then 5 that start "END!", 100 ms apart so that a receiver
 * still working through a backlog (its queues dropping what does not fit) sees at least one. Every
 * transmit slot is built once up front; each datagram then only needs its stamp. Nothing is
 * received during the burst, so nothing else writes into the slots.
 */
static void mode_netblast(const struct config *cfg)
{
    net_want_csum = cfg->csum;
    if (!net_start()) return;
    struct nic *n = &nics[0];
    my_ip = cfg->ip;
    if (cfg->csum)
        kprintf("net: checksum offload %s\n", (n->features & VNET_F_CSUM) ? "on" : "not offered");
    uint32_t port = cfg->port ? cfg->port : 5001, size = cfg->size ? cfg->size : 1472;
    if (size < 4) size = 4;
    if (size > 1472) size = 1472;
    if (!arp_resolve(cfg->peer)) {
        net_responder();
        return;
    }
    net_tx_partial_udp = cfg->csum;     /* only the datagrams below: ARP is done */
    kprintf("bench: net tx start\n");
    uint32_t flen = 14 + 20 + 8 + size, sent = 0;
    for (uint32_t id = 0; id < n->tx.size; id++)
        blast_build(n, (int)id, cfg->peer, port, size);
    uint64_t progress = rdtsc();
    while (sent < cfg->count) {
        tx_reclaim(n);
        if (!n->tx.nfree) {
            if (rdtsc() - progress > ms_to_tsc(5000)) {
                kprintf("bench: net tx stalled\n");
                break;
            }
            cpu_pause();
            continue;
        }
        progress = rdtsc();
        while (n->tx.nfree && sent < cfg->count) {
            int id = n->tx.free[--n->tx.nfree];
            uint8_t seq[4];
            put_be32(seq, sent);
            blast_stamp(n, id, seq, sent);
            tx_submit(n, id, flen, 1);
            sent++;
        }
        tx_flush(n);
    }
    uint64_t t0 = rdtsc();
    while (n->tx.nfree < n->tx.size && rdtsc() - t0 < ms_to_tsc(2000))
        tx_reclaim(n);
    for (uint32_t i = 0; i < 5; i++) {
        int id = tx_alloc(n, 100);
        if (id >= 0) {
            blast_build(n, id, cfg->peer, port, size);     /* the responder may have used the slot */
            blast_stamp(n, id, (const uint8_t *)"END!", sent + i);
            tx_submit(n, id, flen, 0);
        }
        uint32_t never = 0;
        net_wait(&never, 100);
    }
    kprintf("bench: net tx end sent=%u\n", sent);
    net_tx_partial_udp = 0;
    net_responder();
}

/* netsink: a responder that also counts UDP datagrams to its port (see udp_input). */
/* ticks: print "tick N" every `delay` ms of TSC time, `count` times. A paused VM prints none:
 * the pause test watches the gaps between lines. */
static void mode_ticks(uint32_t count, uint32_t delay)
{
    tsc_calibrate();
    if (delay == 0)
        delay = 100;
    kprintf("ticks: ready\n");
    for (uint32_t i = 1; i <= count; i++) {
        uint64_t until = rdtsc() + ms_to_tsc(delay);
        while (rdtsc() < until)
            cpu_pause();
        kprintf("tick %u\n", i);
    }
}

/*
 * balloon: hv's own virtio-balloon driver (polled), for precise checks. Fills `count` MiB from
 * 16 MiB up with a non-zero pattern (so the host has allocated it), sends memory statistics
 * (free_memory = the unfilled RAM, total_memory = the RAM multiboot reported), then every 20 ms
 * reads the device's target: it inflates with pages from the top of the filled area down, and
 * deflates them again, checking each page it takes back reads zero (the host gave it away) before
 * filling it again. Answers each statistics request with fresh figures. When the device offers
 * free page reporting, it reports the bottom MiB of the filled area free once, on queue 3 (the
 * number Linux gives the reporting queue when free page hinting is not negotiated).
 */
#define BL_QSIZE 8
#define BL_BATCH 256
struct bl_queue {
    struct vq_desc desc[BL_QSIZE];
    struct { uint16_t flags, idx, ring[BL_QSIZE], used_event; } avail;
    uint8_t pad[4096 - BL_QSIZE * 16 - (4 + 2 * BL_QSIZE + 2)];
    struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[BL_QSIZE]; uint16_t avail_event; } used;
    uint16_t used_seen;
    volatile uint16_t *notify;
} __attribute__((aligned(4096)));
static struct bl_queue bl_q[4];
static uint32_t bl_pfns[BL_BATCH];
static struct __attribute__((packed)) { uint16_t tag; uint64_t val; } bl_stats[3];

static void bl_setup_queue(const struct vpci *v, uint16_t q)
{
    struct bl_queue *b = &bl_q[q];
    vpci_queue(v, q, BL_QSIZE, b->desc, &b->avail, &b->used);
    vpci_queue_enable(v);
    b->notify = (volatile uint16_t *)(v->notify + *vpci16(v, VPCI_Q_NOTIFY) * v->notify_mult);
}

/* Offers one buffer on queue q (device-readable) and, with `wait`, polls until it is used. */
static void bl_send(uint16_t q, const void *buf, uint32_t len, int wait)
{
    struct bl_queue *b = &bl_q[q];
    uint16_t slot = b->avail.idx % BL_QSIZE;
    b->desc[slot] = (struct vq_desc){ (uint32_t)buf, len, 0, 0 };
    b->avail.ring[slot] = slot;
    mb();
    b->avail.idx++;
    mb();
    *b->notify = q;
    if (!wait)
        return;
    while (*(volatile uint16_t *)&b->used.idx == b->used_seen)
        cpu_pause();
    b->used_seen++;
}

static void bl_fill_page(uint32_t page, uint32_t salt)
{
    uint32_t *p = (uint32_t *)(uintptr_t)(page << 12);
    for (uint32_t i = 0; i < 1024; i++)
        p[i] = 0x9E3779B9u * (page + salt) ^ i;
}

/*
 * rng: a virtio entropy device's driver (virtio 1.2 §5.4), for the Swift example plugin
 * (Plugins/examples/swift-rng). `count` requests of 64 device-writable bytes on queue 0, each
 * printed "rng: N bytes: HEX…" (its first 8 bytes), then how many distinct first words came back.
 */
static struct bl_queue rng_q;
static uint8_t rng_buf[64];

static void mode_rng(uint32_t count)
{
    uint32_t bdf = 0xFFFF;
    for (uint32_t dev = 0; dev < 32; dev++)
        if (pci_read(dev << 3, 0) == 0x10441AF4u) { bdf = dev << 3; break; }
    if (bdf == 0xFFFF) { kprintf("rng: no virtio-rng function\n"); return; }
    struct vpci v;
    vpci_map(&v, bdf, 0xE0000000u, 0);
    vpci_reset_ack(&v);
    if (!vpci_set_features(&v, 0, 1)) { kprintf("rng: features refused\n"); return; }   /* VERSION_1 only */
    vpci_queue(&v, 0, BL_QSIZE, rng_q.desc, &rng_q.avail, &rng_q.used);
    vpci_queue_enable(&v);
    rng_q.notify = (volatile uint16_t *)(v.notify + *vpci16(&v, VPCI_Q_NOTIFY) * v.notify_mult);
    vpci_driver_ok(&v);
    uint32_t firsts[64], distinct = 0;
    for (uint32_t i = 0; i < count; i++) {
        for (uint32_t k = 0; k < sizeof rng_buf; k++) rng_buf[k] = 0;
        uint16_t slot = rng_q.avail.idx % BL_QSIZE;
        rng_q.desc[slot] = (struct vq_desc){ (uint32_t)rng_buf, sizeof rng_buf, 2, 0 };   /* device-writable */
        rng_q.avail.ring[slot] = slot;
        mb();
        rng_q.avail.idx++;
        mb();
        *rng_q.notify = 0;
        while (*(volatile uint16_t *)&rng_q.used.idx == rng_q.used_seen)
            cpu_pause();
        uint32_t len = rng_q.used.ring[rng_q.used_seen % BL_QSIZE].len;
        rng_q.used_seen++;
        uint32_t first = rng_buf[0] | rng_buf[1] << 8 | rng_buf[2] << 16 | (uint32_t)rng_buf[3] << 24;
        uint32_t second = rng_buf[4] | rng_buf[5] << 8 | rng_buf[6] << 16 | (uint32_t)rng_buf[7] << 24;
        kprintf("rng: %u bytes: %x%x\n", len, first, second);
        int seen = 0;
        for (uint32_t k = 0; k < distinct; k++) if (firsts[k] == first) seen = 1;
        if (!seen && distinct < 64) firsts[distinct++] = first;
    }
    kprintf("rng: distinct=%u of %u\n", distinct, count);
}

static void mode_balloon(uint32_t mib, const struct multiboot_info *mbi)
{
    uint32_t bdf = 0xFFFF;
    for (uint32_t dev = 0; dev < 32; dev++)
        if (pci_read(dev << 3, 0) == 0x10451AF4u) { bdf = dev << 3; break; }
    if (bdf == 0xFFFF) { kprintf("balloon: no virtio-balloon function\n"); return; }
    struct vpci v;
    vpci_map(&v, bdf, 0xE0000000u, 0);
    vpci_reset_ack(&v);
    uint32_t offered = vpci_offered(&v, 0);
    uint32_t reporting = offered & (1u << 5);
    if (!vpci_set_features(&v, offered & ((1u << 1) | reporting), 1)) {   /* STATS_VQ, REPORTING, VERSION_1 */
        kprintf("balloon: features refused\n");
        return;
    }
    for (uint16_t q = 0; q < (reporting ? 4 : 3); q++)
        bl_setup_queue(&v, q);
    vpci_driver_ok(&v);
    volatile uint32_t *config = (volatile uint32_t *)v.device;
    uint32_t total = mbi && (mbi->flags & MBI_MEM) ? (mbi->mem_upper + 1024) << 10 : 0;
    uint32_t first = 16u << 8, filled = mib << 8;           /* in 4 KiB pages */
    for (uint32_t k = 0; k < filled; k++)
        bl_fill_page(first + k, 0);
    uint32_t held = config[1], stats_sent = 0;               /* a restarted VM: the device kept `actual` */
    bl_stats[0].tag = 4; bl_stats[1].tag = 5; bl_stats[2].tag = 6;  /* MEMFREE, MEMTOT, AVAIL */
    bl_stats[0].val = total - (16u << 20) - (filled << 12) + ((uint64_t)held << 12);
    bl_stats[1].val = total;
    bl_stats[2].val = bl_stats[0].val;
    bl_send(2, bl_stats, sizeof bl_stats, 0);
    kprintf("balloon: ready offered=%x filled=%u pages total=%u held=%u\n", offered, filled, total, held);
    if (reporting && filled >= 256) {
        /* Two device-writable buffers of 512 KiB each: ranges the guest has free. */
        struct bl_queue *rq = &bl_q[3];
        uint16_t slot = rq->avail.idx % BL_QSIZE;
        rq->desc[slot] = (struct vq_desc){ first << 12, 512u << 10, 1 | 2, (uint16_t)((slot + 1) % BL_QSIZE) };
        rq->desc[(slot + 1) % BL_QSIZE] = (struct vq_desc){ (first + 128) << 12, 512u << 10, 2, 0 };
        rq->avail.ring[slot] = slot;
        mb();
        rq->avail.idx++;
        mb();
        *rq->notify = 3;
        while (*(volatile uint16_t *)&rq->used.idx == rq->used_seen)
            cpu_pause();
        rq->used_seen++;
        kprintf("balloon: reported 256 pages free\n");
    }
    tsc_calibrate();
    for (;;) {
        uint64_t until = rdtsc() + ms_to_tsc(20);
        while (rdtsc() < until)
            cpu_pause();
        struct bl_queue *sq = &bl_q[2];
        if (*(volatile uint16_t *)&sq->used.idx != sq->used_seen) {
            /* The device handed the statistics buffer back: it wants fresh figures. */
            sq->used_seen++;
            bl_stats[0].val = total - (16u << 20) - (filled << 12) + ((uint64_t)held << 12);
            bl_stats[2].val = bl_stats[0].val;
            bl_send(2, bl_stats, sizeof bl_stats, 0);
            stats_sent++;
            kprintf("balloon: stats sent %u\n", stats_sent);
        }
        uint32_t target = config[0];
        if (target > filled)
            target = filled;
        if (target == held)
            continue;
        if (target > held) {
            while (held < target) {
                uint32_t n = target - held < BL_BATCH ? target - held : BL_BATCH;
                for (uint32_t k = 0; k < n; k++)
                    bl_pfns[k] = first + filled - 1 - (held + k);
                bl_send(0, bl_pfns, n * 4, 1);
                held += n;
            }
            config[1] = held;
            kprintf("balloon: inflated, holds %u pages\n", held);
        } else {
            uint32_t zero = 1;
            while (held > target) {
                uint32_t n = held - target < BL_BATCH ? held - target : BL_BATCH;
                for (uint32_t k = 0; k < n; k++)
                    bl_pfns[k] = first + filled - held + k;
                bl_send(1, bl_pfns, n * 4, 1);
                for (uint32_t k = 0; k < n; k++) {
                    const uint32_t *p = (const uint32_t *)(uintptr_t)(bl_pfns[k] << 12);
                    if (p[0] != 0 || p[1023] != 0)
                        zero = 0;
                    bl_fill_page(bl_pfns[k], 0);
                }
                held -= n;
            }
            config[1] = held;
            kprintf("balloon: deflated, holds %u pages, returned pages read zero=%u\n", held, zero);
        }
    }
}

/* memfill: write `count` MiB from 16 MiB up (each MiB its own non-zero pattern), then idle with
 * every interrupt masked: a guest whose memory a snapshot must carry (bench). */
static void mode_memfill(uint32_t mib)
{
    for (uint32_t m = 0; m < mib; m++) {
        uint32_t *p = (uint32_t *)(uintptr_t)((16u + m) << 20);
        uint32_t value = 0x9E3779B9u * (m + 1);
        for (uint32_t i = 0; i < (1u << 18); i++)
            p[i] = value ^ i;
    }
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    kprintf("memfill: ready mib=%u\n", mib);
    for (;;)
        __asm__ volatile("sti; hlt");
}

/* memdirty: memfill's `count` MiB, then rewrites one word in every page of them, round after
 * round, for good: a guest that keeps dirtying `count` MiB as fast as its vCPU can (the live
 * migration benchmark's busy guest). With `delay`, it also prints "tick N" every `delay` ms of
 * its TSC (checked after each round), so a host can time the pause a migration makes. */
static void mode_memdirty(uint32_t mib, uint32_t delay)
{
    uint64_t next_tick = 0;
    uint32_t tick = 0;
    if (delay) {
        tsc_calibrate();
        next_tick = rdtsc() + ms_to_tsc(delay);
    }
    for (uint32_t m = 0; m < mib; m++) {
        uint32_t *p = (uint32_t *)(uintptr_t)((16u + m) << 20);
        for (uint32_t i = 0; i < (1u << 18); i++)
            p[i] = 0x9E3779B9u * (m + 1) ^ i;
    }
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    kprintf("memdirty: ready mib=%u\n", mib);
    for (uint32_t round = 1;; round++) {
        for (uint32_t page = 0; page < mib * 256u; page++)
            *(volatile uint32_t *)(uintptr_t)((16u << 20) + page * 4096u) = round;
        if (delay && rdtsc() >= next_tick) {
            next_tick = rdtsc() + ms_to_tsc(delay);
            kprintf("tick %u\n", ++tick);
        }
    }
}

/* migrant: the live-migration guest, all at once. It answers ARP and pings at `ip` on nic0,
 * prints "tick N" every 100 ms of its TSC, and runs `count` passes of a disk check: pass p writes
 * 16 blocks with pattern p, reads them back into buffers only the device writes, and checks every
 * word. While a request is in flight it polls the NIC and keeps the ticks going. */
static uint32_t migrant_tick;
static uint64_t migrant_next_tick;

static void migrant_background(void)
{
    nic_poll(&nics[0], net_input);
    if (rdtsc() >= migrant_next_tick) {
        migrant_next_tick += ms_to_tsc(100);
        kprintf("tick %u\n", ++migrant_tick);
    }
}

static void mode_migrant(const struct config *cfg)
{
    if (!net_start()) return;           /* calibrates the TSC against the PIT */
    my_ip = cfg->ip;
    int ro = 0;
    vs_qdesc = bq_desc; vs_qavail = &bq_avail; vs_qused = &bq_used; vs_qsize = BQ_SIZE;
    if (!vscsi_setup(&ro)) return;
    (void)bench_run(0, 1, 4096, 0, 64);  /* takes any power-on UNIT ATTENTION */
    uint32_t passes = cfg->count_given ? cfg->count : 50, errors = 0, mismatches = 0;
    uint16_t seen = bq_used.idx;
    migrant_next_tick = rdtsc() + ms_to_tsc(100);
    kprintf("migrant: ready\n");
    for (uint32_t pass = 1; pass <= passes; pass++) {
        pattern_step("migrant", pass, 1, 16, &seen, &errors, &mismatches, migrant_background);
        pattern_step("migrant", pass, 0, 16, &seen, &errors, &mismatches, migrant_background);
        if (pass % 10 == 0) kprintf("migrant: pass %u\n", pass);
    }
    kprintf("migrant: done passes=%u errors=%u mismatches=%u\n", passes, errors, mismatches);
    for (;;) migrant_background();
}

static void mode_netsink(const struct config *cfg)
{
    net_want_csum = cfg->csum;
    if (!net_start()) return;
    if (cfg->csum)
        kprintf("net: receive checksum offload %s\n", (nics[0].features & VNET_F_GUEST_CSUM) ? "on" : "not offered");
    my_ip = cfg->ip;
    sink_port = cfg->port ? cfg->port : 5001;
    net_responder();
}

/* ---- hostile: a guest that attacks every device (issue 20) ----
 *
 * `mode=hostile seed=S count=N`: N operations against each device class, drawn by a xorshift
 * generator seeded with S: random register reads and writes to every legacy port (UART, CMOS/RTC,
 * i8042, fw_cfg, PCI config, ACPI PM), to every PCI function's config space (BARs moved anywhere,
 * decoding toggled, capabilities rewritten) and BARs, virtqueues with random sizes and random
 * descriptor tables, MSI-X entries pointing anywhere, fw_cfg DMA descriptors of any length to any
 * address. A device may refuse any of it; it must not crash or hang, and the VM keeps running.
 * The guest spares only itself: no reset or power-off register write, and every address it hands
 * a device for DMA lies in a scratch area or outside RAM (a device writing where it is told is
 * not a fault). Ends with one line per phase and "hostile: done".
 */
static uint32_t hs_rng = 1;
static uint32_t hs_ram_end;
/* Where the guest lets devices write: rings and buffers start in its first quarter, so a ring of
 * the largest queue (6 + 8 * 32768 bytes) still ends inside it. */
#define HS_SCRATCH (512u * 1024u)
static uint8_t hs_scratch[HS_SCRATCH] __attribute__((aligned(4096)));

static uint32_t hrand(void)
{
    uint32_t x = hs_rng;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    return hs_rng = x;
}

/* An address a device may be told to read or write: in the scratch area, just past RAM, or any
 * address at or above the end of RAM (the MMIO hole, the BARs, the top of the 32-bit space). */
static uint32_t hs_address(void)
{
    switch (hrand() % 4) {
    case 0: return (uint32_t)hs_scratch + hrand() % 4096;              /* the page hs_fill_scratch writes */
    case 1: return (uint32_t)hs_scratch + hrand() % (HS_SCRATCH / 4);
    case 2: return hs_ram_end + hrand() % 0x100000;
    default: { uint32_t a = hrand(); return a < hs_ram_end ? hs_ram_end + (a & 0x0FFFFFFF) : a; }
    }
}

static uint32_t hs_length(void)
{
    switch (hrand() % 4) {
    case 0: return 0;
    case 1: return hrand();
    case 2: return 0xFFFFFFFFu;
    default: return hrand() % 8192;
    }
}

/* A length for a buffer at `address`: any, unless it starts in the scratch area, where it must
 * end there too (a device filling a buffer the guest described is doing its job). */
static uint32_t hs_fit(uint32_t address, uint32_t length)
{
    uint32_t start = (uint32_t)hs_scratch, end = start + HS_SCRATCH;
    return address >= start && address < end && length > end - address ? end - address : length;
}

/* Fills the scratch area's first page with descriptor-shaped garbage (or plain garbage): what a
 * device walking a random descriptor table or ring there finds. */
static void hs_fill_scratch(void)
{
    uint32_t *w = (uint32_t *)hs_scratch;
    int raw = hrand() % 3 == 0;
    for (uint32_t i = 0; i + 4 <= 4096 / 4; i += 4) {
        if (raw) { w[i] = hrand(); w[i + 1] = hrand() | 1; w[i + 2] = hrand(); w[i + 3] = hrand(); continue; }
        uint32_t a = hs_address();
        w[i] = a; w[i + 1] = 0;                                         /* 64-bit address */
        w[i + 2] = hs_fit(a, hs_length());
        w[i + 3] = (hrand() & 0x7) | (hrand() % 64) << 16;              /* flags, next */
    }
}

static void hs_out(uint16_t port, uint32_t size, uint32_t v)
{
    if (size == 1) outb(port, (uint8_t)v);
    else if (size == 2) __asm__ volatile("outw %0, %1" : : "a"((uint16_t)v), "Nd"(port));
    else outl(port, v);
}

static uint32_t hs_in(uint16_t port, uint32_t size)
{
    if (size == 1) return inb(port);
    if (size == 2) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
    return inl(port);
}

/* The PIIX4 PM function's I/O base (where PM1a_CNT, whose SLP_EN powers off, lives). */
static uint32_t hs_pm_base;

/* A config-space write, except the two that would let a later port write power the VM off (the
 * PM function's I/O base and its I/O enable). */
static void hs_pci_write(uint32_t bdf, uint32_t reg, uint32_t v)
{
    if (bdf == 0x0B && ((reg & 0xFC) == 0x40 || (reg & 0xFC) == 0x80)) return;
    pci_write(bdf, reg, v);
}

static uint32_t hs_size(void) { return 1u << (hrand() % 3); }

/* The attacks leave the UART in any mode (divisor latch, loopback): set it up again first. */
#define hs_report(...) do { serial_init(); kprintf(__VA_ARGS__); } while (0)

/* Legacy ports: UART, CMOS/RTC, i8042, fw_cfg (and its DMA), the PCI config ports, ACPI PM,
 * the reset control register, POST codes. */
static void hostile_pio(uint32_t count)
{
    static const uint16_t ports[] = { 0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF, 0x70, 0x71, 0x60, 0x64,
                                      0x510, 0x511, 0x514, 0x518, 0xCF8, 0xCFC, 0xCFD, 0xCFE, 0xCFF, 0xCF9, 0x80 };
    static const uint8_t kbd_commands[] = { 0x20, 0x60, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAD, 0xAE, 0xC0, 0xD0, 0xD2, 0xD3, 0xD4, 0xE0 };
    uint32_t n = sizeof ports / sizeof ports[0];
    for (uint32_t i = 0; i < count; i++) {
        uint32_t size = hs_size(), v = hrand();
        uint16_t port = hrand() % 4 == 0 && hs_pm_base ? (uint16_t)(hs_pm_base + hrand() % 0x40) : ports[hrand() % n];
        if (hrand() & 1) { (void)hs_in(port, size); continue; }
        if (port == 0x64) { outb(0x64, kbd_commands[hrand() % sizeof kbd_commands]); continue; }
        if (port >= 0xCFC && port <= 0xCFF) continue;                 /* config writes go through hs_pci_write */
        if (port == 0xCF9) v &= ~0x04u;                                /* RST_CPU */
        if (port == 0xCF8 && size != 4) continue;                      /* would reach 0xCF9 */
        if (hs_pm_base && port <= hs_pm_base + 5 && port + size > hs_pm_base + 5)
            v &= ~(0x20u << (8 * (hs_pm_base + 5 - port)));             /* PM1a_CNT's SLP_EN */
        if (port == 0x518 || port == 0x514) {
            /* fw_cfg DMA: a descriptor in the scratch area (control, length, address; big-endian)
             * or a descriptor address anywhere outside RAM. */
            uint32_t *d = (uint32_t *)(hs_scratch + (hrand() % (HS_SCRATCH / 16)) * 16);
            uint32_t target = hs_address();
            d[0] = __builtin_bswap32((hrand() & 0x1F) | (hrand() % 0x40) << 16);
            d[1] = __builtin_bswap32(hs_fit(target, hs_length()));
            d[2] = 0; d[3] = __builtin_bswap32(target);
            uint32_t at = hrand() % 4 ? (uint32_t)d : hs_address();
            outl(0x514, 0);
            outl(0x518, __builtin_bswap32(at));
            continue;
        }
        hs_out(port, size, v);
    }
    hs_report("hostile: pio %u ops\n", count);
}

/* One PCI function: config space, its BARs, and for a virtio function its transport. */
static void hostile_function(uint32_t bdf, uint32_t count, uint32_t slot)
{
    uint32_t id = pci_read(bdf, 0);
    int virtio = (id & 0xFFFF) == 0x1AF4;
    /* A balloon gives back the pages its inflate and free-page-reporting queues name: random
     * ones there would be the guest discarding its own memory, so only the deflate and stats
     * queues, the device config, ISR and MSI-X are attacked, never its common config. */
    int balloon = id == 0x10451AF4u || id == 0x10021AF4u;
    struct vpci v;
    uint32_t base = 0xD0000000u + slot * 0x100000u;
    uint32_t common_off = 0, notify_off = 0, isr_off = 0;
    if (virtio) {
        vpci_map(&v, bdf, base, 0);
        common_off = (uint32_t)v.common - base;
        notify_off = (uint32_t)v.notify - base;
        isr_off = (uint32_t)v.isr - base;
    }
    uint32_t msix = 0;
    for (uint32_t cap = pci_read(bdf, 0x34) & 0xFF, guard = 0; cap && guard < 16; cap = (pci_read(bdf, cap) >> 8) & 0xFF, guard++)
        if ((pci_read(bdf, cap) & 0xFF) == 0x11) msix = cap;
    /* The MSI-X table, if it lives in BAR 0 (hv's functions put it there). */
    uint32_t table = msix ? pci_read(bdf, msix + 4) : 0, entries = msix ? (pci_read(bdf, msix) >> 16 & 0x7FF) + 1 : 0;
    if ((table & 7) != 0) entries = 0;
    table &= ~7u;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t op = hrand() % 16, size = hs_size();
        uint32_t reg = hrand() % 256;
        switch (op) {
        case 0: case 1:
            (void)pci_read(bdf, reg);
            break;
        case 2:
            hs_pci_write(bdf, reg, hrand());
            break;
        case 3: {                                                       /* move, size or clear a BAR */
            uint32_t bar = 0x10 + 4 * (hrand() % 6), choice = hrand() % 4;
            hs_pci_write(bdf, bar, choice == 0 ? 0xFFFFFFFFu : choice == 1 ? hrand() : choice == 2 ? 0 : base);
            break;
        }
        case 4:
            hs_pci_write(bdf, 0x04, hrand() % 2 ? 0x6 : hrand() & 0x7);  /* decoding and bus mastering */
            break;
        case 5:                                                         /* MSI-X enable and function mask */
            if (msix) hs_pci_write(bdf, msix, (pci_read(bdf, msix) & 0xFFFF) | (hrand() & 0xC000u) << 16);
            break;
        default: {
            /* The function's first memory BAR, wherever it now is, if it lies above RAM. */
            uint32_t bar0 = pci_read(bdf, 0x10) & ~0xFu;
            if (bar0 < hs_ram_end || bar0 >= 0xFEC00000u) {
                hs_pci_write(bdf, 0x10, base);
                hs_pci_write(bdf, 0x04, 0x6);
                break;
            }
            volatile uint8_t *b = (volatile uint8_t *)bar0;
            uint32_t off = hrand() % 0x4000 & ~(size - 1);
            if (balloon && off >= common_off && off < common_off + 0x40) off += 0x40;
            if (op == 11 && entries) {                                  /* an MSI-X entry pointing anywhere */
                volatile uint32_t *e = (volatile uint32_t *)(b + table + 16 * (hrand() % entries));
                e[0] = hrand() % 2 ? 0xFEE00000u | (hrand() & 0xFFFFC) : hrand();
                e[1] = hrand() % 4 ? 0 : hrand();
                e[2] = hrand();
                e[3] = hrand() & 1;
                break;
            }
            if (virtio && op >= 12) {
                /* The virtio transport itself: a queue with random rings, status, notify. */
                v.common = b + common_off;
                switch (op) {
                case 12:
                    if (balloon) break;
                    hs_fill_scratch();
                    vpci_queue(&v, (uint16_t)(hrand() % 4), (uint16_t)(hrand() % 3 ? 1u << (hrand() % 10) : hrand()),
                               (void *)hs_address(), (void *)hs_address(), (void *)hs_address());
                    if (hrand() & 1) *vpci16(&v, VPCI_Q_VECTOR) = (uint16_t)hrand();
                    vpci_queue_enable(&v);
                    break;
                case 13: if (!balloon) v.common[VPCI_STATUS] = (uint8_t)(hrand() % 2 ? 0xF : hrand()); break;
                case 14: *(volatile uint16_t *)(b + notify_off + (balloon ? 1 + hrand() % 2 : hrand() % 4) * v.notify_mult) = (uint16_t)hrand(); break;
                default: (void)*(volatile uint8_t *)(b + isr_off); break;   /* ISR read (clears it) */
                }
                break;
            }
            if (hrand() & 1) {
                if (size == 1) (void)b[off]; else if (size == 2) (void)*(volatile uint16_t *)(b + off); else (void)*(volatile uint32_t *)(b + off);
            } else {
                uint32_t val = hrand() % 4 == 0 ? 0xFEE00000u | (hrand() & 0xFFFFF) : hrand();
                /* A queue's ring addresses: somewhere the guest may be written (see hs_address),
                 * always as a whole dword (half of one would splice two addresses). */
                if (virtio && off >= common_off + 0x20 && off < common_off + 0x38) {
                    off &= ~3u;
                    size = 4;
                    val = (off - common_off) & 4 ? 0 : hs_address();
                }
                if (size == 1) b[off] = (uint8_t)val; else if (size == 2) *(volatile uint16_t *)(b + off) = (uint16_t)val; else *(volatile uint32_t *)(b + off) = val;
            }
        }
        }
    }
    if (virtio) {                                                       /* leave it reset */
        hs_pci_write(bdf, 0x10, base);
        hs_pci_write(bdf, 0x04, 0x6);
        *(volatile uint8_t *)(base + common_off + VPCI_STATUS) = 0;
    }
    hs_report("hostile: pci 00:%x.%x id=%x %u ops\n", bdf >> 3, bdf & 7, id, count);
}

static void mode_hostile(const struct config *cfg, const struct multiboot_info *mbi)
{
    hs_rng = cfg->seed ? cfg->seed : 1;
    hs_ram_end = mbi && (mbi->flags & MBI_MEM) ? (mbi->mem_upper + 1024) << 10 : 16u << 20;
    uint32_t count = cfg->count_given ? cfg->count : 1000;
    uint32_t pm = pci_read(0x0B, 0);
    if (pm != 0xFFFFFFFFu) hs_pm_base = pci_read(0x0B, 0x40) & 0xFFC0;
    kprintf("hostile: seed=%u count=%u ram_end=%x pm=%x\n", hs_rng, count, hs_ram_end, hs_pm_base);
    hostile_pio(count);
    uint32_t slot = 0;
    for (uint32_t dev = 0; dev < 32; dev++) {
        for (uint32_t fn = 0; fn < 8; fn++) {
            uint32_t bdf = dev << 3 | fn;
            if (pci_read(bdf, 0) == 0xFFFFFFFFu) { if (fn == 0) break; continue; }
            if (bdf == 0x00 || bdf == 0x08 || bdf == 0x0B) { hostile_function(bdf, count / 4, slot++); continue; }
            hostile_function(bdf, count, slot++);
            if (fn == 0 && !(pci_read(bdf, 0x0C) & 0x00800000u)) break;   /* not multi-function */
        }
    }
    hostile_pio(count / 4);
    hs_report("hostile: done seed=%u\n", cfg->seed ? cfg->seed : 1);
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
    else if (streq(cfg.mode, "rng"))
        mode_rng(cfg.count_given ? cfg.count : 4);
    else if (streq(cfg.mode, "pioread"))
        mode_pioread(cfg.count, cfg.port);
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
    else if (streq(cfg.mode, "spin"))
        mode_spin();
    else if (streq(cfg.mode, "vscsiirq"))
        mode_vscsiirq();
    else if (streq(cfg.mode, "vscsimsix"))
        mode_vscsimsix();
    else if (streq(cfg.mode, "vscsibench"))
        mode_vscsibench(cfg.count, cfg.passes);
    else if (streq(cfg.mode, "vscsilat"))
        mode_vscsilat(cfg.count_given ? cfg.count : 1000, cfg.size, cfg.write != 0);
    else if (streq(cfg.mode, "vscsireadback"))
        mode_vscsireadback(cfg.count_given ? cfg.count : 100);
    else if (streq(cfg.mode, "vscsistress"))
        mode_vscsistress(cfg.count_given ? cfg.count : 200);
    else if (streq(cfg.mode, "vscsicd"))
        mode_vscsicd();
    else if (streq(cfg.mode, "vscsi"))
        mode_vscsi();
    else if (streq(cfg.mode, "pcibar"))
        mode_pcibar();
    else if (streq(cfg.mode, "poke"))
        mode_poke(&cfg);
    else if (streq(cfg.mode, "probe"))
        mode_probe(cfg.port, cfg.count, (int)cfg.poke_given, cfg.poke);
    else if (streq(cfg.mode, "netdhcp"))
        mode_netdhcp();
    else if (streq(cfg.mode, "netpeer"))
        mode_netpeer(&cfg);
    else if (streq(cfg.mode, "netping"))
        mode_netping(&cfg);
    else if (streq(cfg.mode, "netsniff"))
        mode_netsniff();
    else if (streq(cfg.mode, "netbridge"))
        mode_netbridge();
    else if (streq(cfg.mode, "netblast"))
        mode_netblast(&cfg);
    else if (streq(cfg.mode, "netsink"))
        mode_netsink(&cfg);
    else if (streq(cfg.mode, "memfill"))
        mode_memfill(cfg.count_given ? cfg.count : 16);
    else if (streq(cfg.mode, "migrant"))
        mode_migrant(&cfg);
    else if (streq(cfg.mode, "memdirty"))
        mode_memdirty(cfg.count_given ? cfg.count : 16, cfg.delay);
    else if (streq(cfg.mode, "balloon"))
        mode_balloon(cfg.count_given ? cfg.count : 16, mbi);
    else if (streq(cfg.mode, "ticks"))
        mode_ticks(cfg.count_given ? cfg.count : 50, cfg.delay);
    else if (streq(cfg.mode, "hostile"))
        mode_hostile(&cfg, mbi);
    else
        kprintf("hv-testguest: unknown mode\n");
    kprintf("hv-testguest: done\n");
}

/*
 * hv-bootparams-probe: entered by the Linux 64-bit boot protocol, prints on COM1 what it was
 * handed (machine state, setup header fields, command line, e820 map, initrd checksum), then
 * ends the VM the way the command line asks: ACPI S5 (default), i8042 reset, port 0xCF9 or
 * port 0x92 reset, or cli;hlt.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc(char c) {
    while (!(inb(0x3FD) & 0x20)) { }
    outb(0x3F8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void hex(u64 v, int digits) {
    puts("0x");
    for (int i = digits - 1; i >= 0; i--) putc("0123456789abcdef"[(v >> (4 * i)) & 0xF]);
}
static void dec(u64 v) {
    char buf[21];
    int n = 0;
    do { buf[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc(buf[--n]);
}

static u8 rd8(const u8 *p, u32 off) { return p[off]; }
static u16 rd16(const u8 *p, u32 off) { return (u16)(p[off] | p[off + 1] << 8); }
static u32 rd32(const u8 *p, u32 off) { return rd16(p, off) | (u32)rd16(p, off + 2) << 16; }
static u64 rd64(const u8 *p, u32 off) { return rd32(p, off) | (u64)rd32(p, off + 4) << 32; }

static u8 sum8(const u8 *p, u32 n) { u8 s = 0; while (n--) s += *p++; return s; }

static int contains(const char *hay, const char *needle) {
    for (; *hay; hay++) {
        const char *h = hay, *n = needle;
        while (*n && *h == *n) { h++; n++; }
        if (!*n) return 1;
    }
    return 0;
}

void probe_main(const u8 *bp) {
    u16 cs, ds, es, ss;
    u64 cr0, cr3, cr4, rflags;
    u32 efer_lo, efer_hi;
    struct __attribute__((packed)) { u16 limit; u64 base; } gdtr;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    __asm__ volatile("mov %%ds, %0" : "=r"(ds));
    __asm__ volatile("mov %%es, %0" : "=r"(es));
    __asm__ volatile("mov %%ss, %0" : "=r"(ss));
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("pushfq; pop %0" : "=r"(rflags));
    __asm__ volatile("rdmsr" : "=a"(efer_lo), "=d"(efer_hi) : "c"(0xC0000080));
    __asm__ volatile("sgdt %0" : "=m"(gdtr));

    puts("probe: entry rsi="); hex((u64)bp, 8);
    puts(" cs="); hex(cs, 2); puts(" ds="); hex(ds, 2); puts(" es="); hex(es, 2); puts(" ss="); hex(ss, 2);
    puts(" pg="); dec(cr0 >> 31 & 1); puts(" pae="); dec(cr4 >> 5 & 1);
    puts(" lma="); dec(efer_lo >> 10 & 1); puts(" if="); dec(rflags >> 9 & 1); puts("\n");
    /* The boot GDT's selectors 0x10 and 0x18, as the loader wrote them. */
    const u8 *gdt = (const u8 *)gdtr.base;
    puts("probe: gdt limit="); hex(gdtr.limit, 4);
    puts(" cs_desc="); hex(rd64(gdt, 0x10), 16); puts(" ds_desc="); hex(rd64(gdt, 0x18), 16); puts("\n");
    puts("probe: cr3 page-aligned="); dec((cr3 & 0xFFF) == 0); puts("\n");

    /* struct setup_header lives at 0x1F1 in boot_params. */
    puts("probe: version="); hex(rd16(bp, 0x206), 4);
    puts(" loader="); hex(rd8(bp, 0x210), 2);
    puts(" loadflags="); hex(rd8(bp, 0x211), 2);
    puts(" boot_flag="); hex(rd16(bp, 0x1FE), 4);
    puts(" pref="); hex(rd64(bp, 0x258), 8);
    puts(" init_size="); hex(rd32(bp, 0x260), 8);
    puts(" sentinel="); dec(rd8(bp, 0x1EF));
    puts("\n");

    u64 cmd = rd32(bp, 0x228) | (u64)rd32(bp, 0x0C8) << 32;
    puts("probe: cmdline=\"");
    if (cmd) puts((const char *)cmd);
    puts("\"\n");

    u32 entries = rd8(bp, 0x1E8);
    puts("probe: e820 entries="); dec(entries); puts("\n");
    for (u32 i = 0; i < entries && i < 128; i++) {
        u32 off = 0x2D0 + 20 * i;
        puts("probe: e820 "); hex(rd64(bp, off), 16); puts(" "); hex(rd64(bp, off + 8), 16);
        puts(" "); dec(rd32(bp, off + 16)); puts("\n");
    }

    u64 initrd = rd32(bp, 0x218) | (u64)rd32(bp, 0x0C0) << 32;
    u64 initrd_size = rd32(bp, 0x21C) | (u64)rd32(bp, 0x0C4) << 32;
    /* FNV-1a over the initrd, so the host can check every byte arrived. */
    u32 sum = 2166136261u;
    for (u64 i = 0; i < initrd_size; i++) { sum ^= ((const u8 *)initrd)[i]; sum *= 16777619u; }
    puts("probe: initrd addr="); hex(initrd, 8); puts(" size="); dec(initrd_size);
    puts(" fnv="); hex(sum, 8); puts(" aligned="); dec((initrd & 0xFFF) == 0); puts("\n");

    /* ACPI: RSDP from boot_params.acpi_rsdp_addr → RSDT → FACP (PM ports) and DSDT (\_S5). */
    u16 pm1a_cnt = 0, pm_tmr = 0;
    u8 s5 = 0xFF;
    const u8 *rsdp = (const u8 *)rd64(bp, 0x070);
    int ok = rsdp && rd32(rsdp, 0) == 0x20445352 && rd32(rsdp, 4) == 0x20525450 && sum8(rsdp, 20) == 0;
    if (ok) {
        const u8 *rsdt = (const u8 *)(u64)rd32(rsdp, 16);
        ok = rd32(rsdt, 0) == 0x54445352 && sum8(rsdt, rd32(rsdt, 4)) == 0;
        for (u32 i = 0; ok && i < (rd32(rsdt, 4) - 36) / 4; i++) {
            const u8 *t = (const u8 *)(u64)rd32(rsdt, 36 + 4 * i);
            if (sum8(t, rd32(t, 4)) != 0) ok = 0;
            if (rd32(t, 0) != 0x50434146) continue;  /* "FACP" */
            pm1a_cnt = (u16)rd32(t, 64);
            pm_tmr = (u16)rd32(t, 76);
            const u8 *dsdt = (const u8 *)(u64)rd32(t, 40);
            if (rd32(dsdt, 0) != 0x54445344 || sum8(dsdt, rd32(dsdt, 4)) != 0) { ok = 0; continue; }
            /* Name(_S5_, Package(n) { SLP_TYP_a, ... }): 08 '_S5_' 12 len n value */
            for (u32 j = 36; j + 9 < rd32(dsdt, 4); j++) {
                if (dsdt[j] == 0x08 && rd32(dsdt, j + 1) == 0x5F35535F && dsdt[j + 5] == 0x12) {
                    u8 v = dsdt[j + 8];
                    s5 = v == 0x0A ? dsdt[j + 9] : v == 0x01 ? 1 : v == 0x00 ? 0 : 0xFE;
                    break;
                }
            }
        }
    }
    puts("probe: acpi rsdp="); hex((u64)rsdp, 8); puts(" checksums="); puts(ok ? "ok" : "bad");
    puts(" pm1a_cnt="); hex(pm1a_cnt, 4); puts(" pm_tmr="); hex(pm_tmr, 4); puts(" s5="); dec(s5); puts("\n");

    const char *line = cmd ? (const char *)cmd : "";
    if (contains(line, "probe.end=kbd")) {
        puts("probe: reset via i8042\n");
        while (inb(0x64) & 0x02) { }
        outb(0x64, 0xFE);
    } else if (contains(line, "probe.end=cf9")) {
        puts("probe: reset via 0xcf9\n");
        outb(0xCF9, 0x06);
    } else if (contains(line, "probe.end=port92")) {
        puts("probe: reset via port 0x92\n");
        outb(0x92, inb(0x92) | 1);
    } else if (contains(line, "probe.end=halt")) {
        puts("probe: halt\n");
    } else {
        /* The PM timer the FADT names must count (3.579545 MHz, 24 bits). */
        u32 t0 = inl(pm_tmr) & 0xFFFFFF, t1 = t0;
        for (int i = 0; i < 1000 && t1 == t0; i++) t1 = inl(pm_tmr) & 0xFFFFFF;
        puts("probe: pm timer advances="); dec(t1 != t0); puts("\n");
        puts("probe: power off via ACPI\n");
        /* PM1a_CNT from the FADT: SLP_TYP from the DSDT's \_S5 with SLP_EN (bit 13). */
        outw(pm1a_cnt, (u16)((s5 & 7) << 10 | 1 << 13));
    }
    for (;;) __asm__ volatile("cli; hlt");
}

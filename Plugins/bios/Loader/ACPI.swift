// ACPI tables describing hv's PC platform, so a guest OS can find the power-management block (and
// power off through it), the interrupt controllers and the keyboard controller.
//
// Tables (ACPI 2.0 layouts, RSDP revision 0 with an RSDT, as QEMU's i440FX machine has them):
// RSDP → RSDT → FADT (→ FACS, DSDT), MADT. The DSDT's AML declares \_S5 (SLP_TYP 0, what
// `ACPIPowerManagement` treats as soft-off) and the PS/2 keyboard (PNP0303) at 0x60/0x64, IRQ 1.
//
// Two ways out:
// - with firmware, as QEMU's fw_cfg files "etc/acpi/rsdp", "etc/acpi/tables" and the linker script
//   "etc/table-loader" that SeaBIOS executes (romfile_loader.c): it allocates the files, patches
//   the pointers (which hold offsets into "etc/acpi/tables" until then) and the checksums;
// - without firmware (direct kernel or multiboot boot), placed at fixed addresses by `placed(at:)`.

/// Builds the ACPI tables for `cpus` processors.
public struct ACPITables: Sendable {
    /// The RSDP (20 bytes).
    public private(set) var rsdp: [UInt8]
    /// Every other table, back to back; pointers hold offsets into this blob plus the base given.
    public private(set) var tables: [UInt8]
    /// Where each table starts in `tables`.
    public private(set) var offsets: [String: Int] = [:]
    /// Offsets in `tables` of 32-bit pointers to other tables (for the table-loader).
    private var pointerFields: [Int] = []

    /// Guest-physical addresses the tables go to when there is no firmware: the RSDP where an OS
    /// scans for it (0xE0000–0xFFFFF), the rest just after it. Both lie in the legacy hole hv's
    /// e820 map reports as not-RAM, so no OS reuses them.
    public static let directRSDPAddress: UInt64 = 0xE_0000
    public static let directTablesAddress: UInt64 = 0xE_0040

    static let oemID = Array("HV    ".utf8)
    static let oemTableID = Array("HVPC    ".utf8)

    /// Tables whose pointers hold `tablesBase` plus offsets into `tables`. Checksums are valid for
    /// exactly these values (the table-loader's ADD_CHECKSUM corrects them after patching).
    init(cpus: Int, tablesBase: UInt64) {
        rsdp = []
        tables = []
        // FACS first: it must be 64-byte aligned, and the blob is.
        append("FACS", table(signature: "FACS", length: 64))
        append("DSDT", table(signature: "DSDT", revision: 1, body: Self.dsdtAML))
        let fadtAt = append("FADT", fadt(tablesBase: tablesBase))
        pointerFields += [fadtAt + 36, fadtAt + 40]
        append("APIC", madt(cpus: cpus))
        var rsdtBody: [UInt8] = []
        for name in ["FADT", "APIC"] { rsdtBody += le(tablesBase + UInt64(offsets[name]!), 4) }
        let rsdtAt = append("RSDT", table(signature: "RSDT", revision: 1, body: rsdtBody))
        pointerFields += [rsdtAt + 36, rsdtAt + 40]

        var r = Array("RSD PTR ".utf8)
        r += [0]                                  // checksum
        r += Self.oemID
        r += [0]                                  // revision 0: ACPI 1.0 RSDP, RSDT only
        r += le(tablesBase + UInt64(rsdtAt), 4)
        r[8] = Self.checksum(r)
        rsdp = r
    }

    /// The tables as they sit in guest memory without firmware: RSDP at `directRSDPAddress`,
    /// the rest at `directTablesAddress`, every pointer and checksum final.
    public static func placed(cpus: Int) -> ACPITables {
        ACPITables(cpus: cpus, tablesBase: directTablesAddress)
    }

    /// The fw_cfg files for firmware (SeaBIOS): "etc/acpi/rsdp", "etc/acpi/tables" and the
    /// "etc/table-loader" script that places and links them.
    public static func firmwareFiles(cpus: Int) -> [(name: String, bytes: [UInt8])] {
        let t = ACPITables(cpus: cpus, tablesBase: 0)
        var loader = TableLoader()
        loader.allocate(file: "etc/acpi/rsdp", align: 16, zone: .fseg)
        loader.allocate(file: "etc/acpi/tables", align: 64, zone: .high)
        for field in t.pointerFields { loader.addPointer(dest: "etc/acpi/tables", src: "etc/acpi/tables", offset: field, size: 4) }
        loader.addPointer(dest: "etc/acpi/rsdp", src: "etc/acpi/tables", offset: 16, size: 4)
        // Checksums last: each covers its table after every pointer in it is patched.
        for name in ["DSDT", "FADT", "APIC", "RSDT"] {
            let start = t.offsets[name]!
            let length = Int(t.u32(start + 4))
            loader.addChecksum(file: "etc/acpi/tables", offset: start + 9, start: start, length: length)
        }
        loader.addChecksum(file: "etc/acpi/rsdp", offset: 8, start: 0, length: 20)
        return [("etc/acpi/rsdp", t.rsdp), ("etc/acpi/tables", t.tables), ("etc/table-loader", loader.bytes)]
    }

    // MARK: Tables

    private func fadt(tablesBase: UInt64) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: 244 - 36)
        func put(_ v: UInt64, _ n: Int, _ at: Int) { for i in 0..<n { f[at - 36 + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        let pm = UInt64(ACPIPowerManagement.base)
        put(tablesBase + UInt64(offsets["FACS"]!), 4, 36)  // FIRMWARE_CTRL
        put(tablesBase + UInt64(offsets["DSDT"]!), 4, 40)  // DSDT
        put(9, 2, 46)                 // SCI_INT: PIIX4's SCI is IRQ 9
        put(0, 4, 48)                 // SMI_CMD 0: always in ACPI mode (SCI_EN reads 1)
        put(pm, 4, 56)                // PM1a_EVT_BLK
        put(pm + 4, 4, 64)            // PM1a_CNT_BLK
        put(pm + 8, 4, 76)            // PM_TMR_BLK
        put(4, 1, 88)                 // PM1_EVT_LEN
        put(2, 1, 89)                 // PM1_CNT_LEN
        put(4, 1, 91)                 // PM_TMR_LEN
        put(0x0FFF, 2, 96)            // P_LVL2_LAT > 100: no C2
        put(0x0FFF, 2, 98)            // P_LVL3_LAT > 1000: no C3
        put(0x32, 1, 108)             // CENTURY: the CMOS century register
        put(0x0003, 2, 109)           // IAPC_BOOT_ARCH: LEGACY_DEVICES | 8042
        // Flags: WBINVD, PROC_C1, PWR_BUTTON and SLP_BUTTON (none), RESET_REG_SUP.
        put(1 << 0 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 10, 4, 112)
        // RESET_REG: system I/O, 8 bits at 0xCF9; RESET_VALUE 0x06 (SYS_RST | RST_CPU).
        for (value, size, at) in [(1, 1, 116), (8, 1, 117), (0, 1, 118), (1, 1, 119), (0xCF9, 8, 120), (0x06, 1, 128)] {
            put(UInt64(value), size, at)
        }
        return table(signature: "FACP", revision: 3, body: f)
    }

    private func madt(cpus: Int) -> [UInt8] {
        var body = le(0xFEE0_0000, 4) + le(1, 4)  // local APIC address; PCAT_COMPAT (8259s present)
        for id in 0..<max(1, min(cpus, 255)) {
            body += [0, 8, UInt8(id), UInt8(id)] + le(1, 4)  // processor local APIC, enabled
        }
        body += [1, 12, 0, 0] + le(0xFEC0_0000, 4) + le(0, 4)  // IOAPIC 0 at its usual address, GSI base 0
        body += [2, 10, 0, 0] + le(2, 4) + le(0, 2)             // ISA IRQ 0 → GSI 2 (the PIT)
        body += [2, 10, 0, 9] + le(9, 4) + le(0x000D, 2)        // ISA IRQ 9 (SCI): level, active high
        return table(signature: "APIC", revision: 1, body: body)
    }

    /// A table: the 36-byte header (with a valid checksum) and `body`; or, with `length` and no
    /// body, a FACS-style table of zeros after signature and length.
    private func table(signature: String, revision: UInt8 = 1, body: [UInt8] = [], length: Int? = nil) -> [UInt8] {
        if let length {
            return Array(signature.utf8) + le(UInt64(length), 4) + [UInt8](repeating: 0, count: length - 8)
        }
        var t = Array(signature.utf8) + le(UInt64(36 + body.count), 4) + [revision, 0]
        t += Self.oemID + Self.oemTableID + le(1, 4) + Array("HV  ".utf8) + le(1, 4)
        t += body
        t[9] = Self.checksum(t)
        return t
    }

    @discardableResult
    private mutating func append(_ name: String, _ bytes: [UInt8]) -> Int {
        while tables.count % 8 != 0 { tables.append(0) }
        offsets[name] = tables.count
        tables += bytes
        return tables.count - bytes.count
    }

    func u32(_ at: Int) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(tables[at + $1]) << (8 * UInt32($1)) }
    }

    /// The byte that makes `bytes` sum to zero (mod 256), given its slot holds 0.
    static func checksum(_ bytes: [UInt8]) -> UInt8 {
        0 &- bytes.reduce(0, &+)
    }

    private func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    /// The DSDT's AML (ACPI 6, chapter 20), assembled by hand:
    ///
    ///     Name (_S5, Package (4) { 0, 0, 0, 0 })
    ///     Scope (\_SB) {
    ///         Device (KBD) {
    ///             Name (_HID, EisaId ("PNP0303"))
    ///             Name (_CRS, ResourceTemplate () {
    ///                 IO (Decode16, 0x60, 0x60, 1, 1)
    ///                 IO (Decode16, 0x64, 0x64, 1, 1)
    ///                 IRQNoFlags () { 1 }
    ///             })
    ///         }
    ///     }
    static let dsdtAML: [UInt8] = {
        let nameOp: UInt8 = 0x08, packageOp: UInt8 = 0x12, scopeOp: UInt8 = 0x10, bufferOp: UInt8 = 0x11
        let s5 = [nameOp] + Array("_S5_".utf8) + [packageOp, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00]
        let resources: [UInt8] = [0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01,   // IO 0x60
                                  0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01,   // IO 0x64
                                  0x22, 0x02, 0x00,                                 // IRQ 1
                                  0x79, 0x00]                                       // end tag
        // Buffer: BufferOp PkgLength BufferSize(ByteConst) bytes; PkgLength counts itself.
        let buffer = [bufferOp, UInt8(1 + 2 + resources.count), 0x0A, UInt8(resources.count)] + resources
        let hid = [nameOp] + Array("_HID".utf8) + [0x0C, 0x41, 0xD0, 0x03, 0x03]  // DWordConst EISA "PNP0303"
        let crs = [nameOp] + Array("_CRS".utf8) + buffer
        let deviceBody = Array("KBD_".utf8) + hid + crs
        let device = [0x5B, 0x82, UInt8(1 + deviceBody.count)] + deviceBody     // DeviceOp PkgLength …
        let scopeBody = [0x5C] + Array("_SB_".utf8) + device                      // RootChar NameSeg
        let scope = [scopeOp, UInt8(1 + scopeBody.count)] + scopeBody
        return s5 + scope
    }()
}

/// QEMU's fw_cfg table-loader script (SeaBIOS src/fw/romfile_loader.h): 128-byte commands.
struct TableLoader {
    enum Zone: UInt8 { case high = 1, fseg = 2 }
    private(set) var bytes: [UInt8] = []
    static let fileNameSize = 56

    mutating func allocate(file: String, align: UInt32, zone: Zone) {
        var c = le(1, 4) + name(file) + le(UInt64(align), 4) + [zone.rawValue]
        pad(&c)
    }
    mutating func addPointer(dest: String, src: String, offset: Int, size: UInt8) {
        var c = le(2, 4) + name(dest) + name(src) + le(UInt64(offset), 4) + [size]
        pad(&c)
    }
    mutating func addChecksum(file: String, offset: Int, start: Int, length: Int) {
        var c = le(3, 4) + name(file) + le(UInt64(offset), 4) + le(UInt64(start), 4) + le(UInt64(length), 4)
        pad(&c)
    }
    private mutating func pad(_ command: inout [UInt8]) {
        command += [UInt8](repeating: 0, count: 128 - command.count)
        bytes += command
    }
    private func name(_ s: String) -> [UInt8] {
        let b = Array(s.utf8.prefix(Self.fileNameSize - 1))
        return b + [UInt8](repeating: 0, count: Self.fileNameSize - b.count)
    }
    private func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
}

/// The configuration space of the PCI functions every PC firmware expects at boot: an Intel 440FX host bridge (00:00.0, 8086:1237), a PIIX3 ISA bridge
/// (00:01.0, 8086:7000) and the PIIX4 power-management function (00:01.3, 8086:7113), as QEMU's
/// "pc" machine has them. SeaBIOS identifies the platform by the host bridge's IDs, programs the
/// PAM registers to shadow itself, routes PIRQs through PIIX3's 0x60–0x63 (which the core keeps, as
/// it routes INTx), and sets up ACPI
/// power management through 00:01.3 (its PM I/O block is `ACPIPowerManagement`, at a fixed base).
///
/// The core owns configuration mechanism #1 (the 0xCF8 latch), each function's command register
/// and BARs, and the PIRQ routing registers; it forwards every other config byte of these three functions here (the bios device
/// declares them as PCI_CONFIG resources).
///
/// Plain data (no arrays), so it can live in the device's state page; every access is masked,
/// so restored garbage can't make it trap.
public struct PCIHostBridge: Sendable, BitwiseCopyable {
    /// The three functions, and their bus/device/function numbers (`bus << 8 | device << 3 | function`).
    public enum Function: Sendable, CaseIterable {
        case host, isa, pm
        public var bdf: UInt16 {
            switch self {
            case .host: return 0x00  // 00:00.0
            case .isa: return 0x08   // 00:01.0
            case .pm: return 0x0B    // 00:01.3
            }
        }
    }
    /// i440FX PAM0–PAM6 (0x59–0x5F) as the guest wrote them; guest RAM under them is always RAM in hv.
    private var pam: UInt64 = 0
    /// i440FX SMRAM (0x72).
    private var smram: UInt8 = 0x02
    /// PIIX4 PM: interrupt line (0x3C), PMREGMISC (0x80), SMBus base (0x90) and host config (0xD2).
    private var pmInterruptLine: UInt8 = 0
    private var pmMisc: UInt8 = 0
    private var smbusBase: UInt32 = 0x0000_0001
    private var smbusConfig: UInt8 = 0
    /// PIIX3 reset control register (port 0xCF9).
    public private(set) var resetControl: UInt8 = 0

    public init() {}

    /// Port 0xCF9 (PIIX3 reset control) write; true when it asks for a reset (RST_CPU, bit 2, set).
    public mutating func writeResetControl(_ value: UInt8) -> Bool {
        resetControl = value & 0x0A  // SYS_RST and FULL_RST stick; RST_CPU is a trigger
        return value & 0x04 != 0
    }

    /// Reads `size` (1, 2 or 4) bytes of `function`'s config space at `register`.
    public func readConfig(_ function: Function, register: Int, size: Int) -> UInt32 {
        var value: UInt32 = 0
        for i in 0..<min(max(size, 1), 4) {
            value |= UInt32(byte(function: function, at: register + i)) << (8 * UInt32(i))
        }
        return value
    }

    /// Writes `size` (1, 2 or 4) bytes of `function`'s config space at `register`.
    public mutating func writeConfig(_ function: Function, register: Int, size: Int, value: UInt32) {
        for i in 0..<min(max(size, 1), 4) {
            setByte(function: function, at: register + i, UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))))
        }
    }


    private func byte(function: Function, at register: Int) -> UInt8 {
        guard (0..<256).contains(register) else { return 0xFF }
        func le16(_ v: UInt16, _ r: Int) -> UInt8 { UInt8(truncatingIfNeeded: v >> (8 * UInt16(r & 1))) }
        switch (function, register) {
        case (_, 0...1): return le16(0x8086, register)
        case (.host, 2...3): return le16(0x1237, register)
        case (.isa, 2...3): return le16(0x7000, register)
        case (.pm, 2...3): return le16(0x7113, register)
        case (_, 6...7): return le16(0x0280, register)          // status: medium DEVSEL, fast back-to-back
        case (.host, 8): return 0x02                               // revision
        case (.isa, 8): return 0x00
        case (.pm, 8): return 0x03
        case (_, 9): return 0x00                                   // programming interface
        case (.host, 0xA): return 0x00                             // subclass: host bridge
        case (.isa, 0xA): return 0x01                              // subclass: ISA bridge
        case (.pm, 0xA): return 0x80                               // subclass: other bridge
        case (_, 0xB): return 0x06                                 // class: bridge
        case (.isa, 0xE): return 0x80                              // header type 0, multifunction
        case (.host, 0x59...0x5F): return UInt8(truncatingIfNeeded: pam >> (8 * UInt64(register - 0x59)))
        case (.host, 0x72): return smram
        case (.pm, 0x3C): return pmInterruptLine
        case (.pm, 0x3D): return 0x01                              // INTA#: the SCI
        case (.pm, 0x40...0x43):                                   // PMBA: fixed, I/O space
            return UInt8(truncatingIfNeeded: (UInt32(ACPIPowerManagement.base) | 1) >> (8 * UInt32(register - 0x40)))
        // DEVACTB (0x58–0x5B) with APMC_EN (bit 25) set: "SMM already set up". hv has no SMM;
        // without this SeaBIOS raises an SMI through port 0xB2 and waits for it forever (QEMU
        // reports the same with smm=off).
        case (.pm, 0x5B): return 0x02
        case (.pm, 0x80): return pmMisc
        case (.pm, 0x90...0x93): return UInt8(truncatingIfNeeded: smbusBase >> (8 * UInt32(register - 0x90)))
        case (.pm, 0xD2): return smbusConfig
        default: return 0x00
        }
    }

    private mutating func setByte(function: Function, at register: Int, _ value: UInt8) {
        switch (function, register) {
        case (.pm, 0x3C): pmInterruptLine = value
        case (.pm, 0x80): pmMisc = value & 0x01
        case (.pm, 0x90...0x93):
            // The SMBus base is only remembered (hv has no SMBus); bit 0 marks I/O space.
            let shift = 8 * UInt32(register - 0x90)
            smbusBase = ((smbusBase & ~(0xFF << shift)) | (UInt32(value) << shift)) & 0xFFF0 | 1
        case (.pm, 0xD2): smbusConfig = value & 0x0F
        case (.host, 0x59...0x5F):
            let shift = 8 * UInt64(register - 0x59)
            pam = (pam & ~(0xFF << shift)) | (UInt64(value) << shift)
        case (.host, 0x72): smram = value & 0x7F  // D_LCK and friends; no SMRAM in hv
        default: break  // read-only or unimplemented: ignored, as on hardware
        }
    }
}

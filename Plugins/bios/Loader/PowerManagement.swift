/// The PIIX4 ACPI power-management registers hv decodes at a fixed base, 0x600 — where QEMU's
/// i440FX machine has them and where SeaBIOS puts them whenever the host supplies ACPI tables
/// ("etc/table-loader"), as hv does: PM1a event block (status, enable), PM1a control block, and
/// the 24-bit PM timer. Writing SLP_EN with SLP_TYP 0 — the S5 value of QEMU's i440FX DSDT, which
/// guests written for that platform use — powers the machine off.
///
/// The ACPI tables (`ACPITables`) describe the block. The base does not move when a guest
/// reprograms PMBA (PCI 00:01.3 register 0x40, which reads back fixed), and the block is decoded even before firmware enables it (PMREGMISC), because hv
/// also boots kernels with no firmware at all. SCI_EN reads as set: the platform is always in
/// ACPI mode, so no SMI command port is needed.
///
/// Plain data, so it can live in the device's state page.
public struct ACPIPowerManagement: Sendable, BitwiseCopyable {
    /// First port of the block.
    public static let base: UInt16 = 0x600
    /// Bytes decoded from `base`.
    public static let length: UInt16 = 16
    /// PM timer frequency in Hz (the ACPI-defined 3.579545 MHz).
    public static let timerHz: UInt64 = 3_579_545

    /// What a register write asks of the platform.
    public enum Effect: Equatable, Sendable {
        case none
        /// SLP_EN with SLP_TYP 0 (S5, soft-off).
        case powerOff
        /// SLP_EN with another sleep type (S1–S4): hv does not suspend; the write is ignored.
        case unsupportedSleep(type: UInt8)
    }

    static let sciEnable: UInt16 = 1 << 0
    static let sleepEnable: UInt16 = 1 << 13

    /// PM1 status (write 1 to clear) and enable.
    private var status: UInt16 = 0
    private var enable: UInt16 = 0
    /// PM1 control without SLP_EN (write-only, reads 0).
    private var control: UInt16 = ACPIPowerManagement.sciEnable

    public init() {}

    /// Reads `size` bytes at `offset` from `base`; `nowNanoseconds` is a monotonic clock.
    public func read(offset: Int, size: Int, nowNanoseconds: UInt64) -> UInt32 {
        var value: UInt32 = 0
        for i in 0..<min(max(size, 1), 4) {
            value |= UInt32(byte(at: offset + i, nowNanoseconds: nowNanoseconds)) << (8 * UInt32(i))
        }
        return value
    }

    /// Writes `size` bytes at `offset` from `base`.
    public mutating func write(offset: Int, size: Int, value: UInt32) -> Effect {
        var newControl = control
        for i in 0..<min(max(size, 1), 4) {
            let byte = UInt16(truncatingIfNeeded: value >> (8 * UInt32(i)))
            switch offset + i {
            case 0: status &= ~byte
            case 1: status &= ~(byte << 8)
            case 2: enable = (enable & 0xFF00) | byte
            case 3: enable = (enable & 0x00FF) | byte << 8
            case 4: newControl = (newControl & 0xFF00) | byte
            case 5: newControl = (newControl & 0x00FF) | byte << 8
            default: break  // the timer and the rest are read-only
            }
        }
        control = (newControl & ~Self.sleepEnable) | Self.sciEnable
        guard newControl & Self.sleepEnable != 0 else { return .none }
        let type = UInt8((newControl >> 10) & 0x7)
        return type == 0 ? .powerOff : .unsupportedSleep(type: type)
    }

    /// The 24-bit PM timer at `nowNanoseconds`.
    public static func timer(nowNanoseconds ns: UInt64) -> UInt32 {
        // Split to avoid overflow: whole seconds, then the sub-second remainder.
        let ticks = (ns / 1_000_000_000) &* timerHz &+ (ns % 1_000_000_000) * timerHz / 1_000_000_000
        return UInt32(truncatingIfNeeded: ticks) & 0xFF_FFFF
    }

    private func byte(at offset: Int, nowNanoseconds: UInt64) -> UInt8 {
        switch offset {
        case 0...1: return UInt8(truncatingIfNeeded: status >> (8 * UInt16(offset)))
        case 2...3: return UInt8(truncatingIfNeeded: enable >> (8 * UInt16(offset - 2)))
        case 4...5: return UInt8(truncatingIfNeeded: control >> (8 * UInt16(offset - 4)))
        case 8...11: return UInt8(truncatingIfNeeded: Self.timer(nowNanoseconds: nowNanoseconds) >> (8 * UInt32(offset - 8)))
        default: return 0
        }
    }
}

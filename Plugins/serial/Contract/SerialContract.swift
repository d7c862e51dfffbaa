import HVIPC

/// What the trusted side hands hv-serial (a 16550A UART), compiled by both: the board
/// (HVHost) builds the device from it and the device reads its pieces by these names.
public enum SerialContract {
    /// The UART's eight registers (COM1).
    public static let registers = Resource(kind: .pio, base: 0x3F8, length: 8)
    /// Its interrupt line 0 (ISA IRQ 4).
    public static let interruptGSI: UInt32 = 4

    /// The host files, by HELLO hostIO index.
    public enum HostFile: UInt16, CaseIterable, Sendable {
        /// Where transmitted bytes go (a terminal, a file, the console log, /dev/null).
        case output = 0
        /// Where received bytes come from (non-blocking); absent for an output-only port.
        case input = 1
    }
}

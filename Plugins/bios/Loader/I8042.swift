/// The PC keyboard controller (i8042) at ports 0x60 (data) and 0x64 (status/command), with a
/// keyboard that never has a key pressed (hv's console is the serial port) and no mouse.
///
/// It exists for two reasons: PC software resets the machine through it (command 0xFE, or bit 0 of
/// the output port via 0xD1) — Linux's default reboot path and SeaBIOS's — and firmware and
/// kernels probe it, answering their probes promptly spares them timeouts.
///
/// Plain data (no arrays), so it can live in the device's state page.
public struct I8042: Sendable, BitwiseCopyable {
    /// What a register access asks of the platform.
    public enum Effect: Equatable, Sendable {
        case none
        /// The guest pulsed the reset line: reset the machine.
        case reset
    }

    // Status register bits.
    static let outputFull: UInt8 = 0x01
    static let systemFlag: UInt8 = 0x04
    static let lastWasCommand: UInt8 = 0x08
    static let notInhibited: UInt8 = 0x10

    // Command byte bits.
    static let keyboardInterrupt: UInt8 = 0x01
    static let auxInterrupt: UInt8 = 0x02
    static let systemBit: UInt8 = 0x04

    /// Bytes waiting for the guest on port 0x60, oldest in the low byte.
    private var queue: UInt64 = 0
    private var queued: UInt8 = 0
    /// The controller's command byte (0x20 reads it, 0x60 writes it): keyboard IRQ, system flag,
    /// scan-code translation, as SeaBIOS and QEMU leave it.
    public private(set) var commandByte: UInt8 = 0x45
    /// A controller command (0x60, 0xD1, 0xD2, 0xD3, 0xD4) waiting for its data byte.
    private var pendingController: UInt8 = 0
    /// A keyboard command (0xED, 0xF0, 0xF3) waiting for its argument.
    private var pendingKeyboard: UInt8 = 0
    private var lastWrite: UInt8 = 0
    private var scanCodeSet: UInt8 = 2

    public init() {}

    /// True while a byte waits and the keyboard interrupt is enabled: the level of IRQ 1.
    public var interruptLine: Bool { queued > 0 && commandByte & Self.keyboardInterrupt != 0 }

    /// Port 0x64 read.
    public func readStatus() -> UInt8 {
        (queued > 0 ? Self.outputFull : 0) | (commandByte & Self.systemBit) | lastWrite | Self.notInhibited
    }

    /// Port 0x60 read: the oldest waiting byte, or the last one again when none waits (as the
    /// hardware latch does).
    public mutating func readData() -> UInt8 {
        let byte = UInt8(truncatingIfNeeded: queue)
        if queued > 0 {
            queued -= 1
            queue = queued > 0 ? queue >> 8 : queue & 0xFF
        }
        return byte
    }

    /// Port 0x64 write: a controller command.
    public mutating func writeCommand(_ command: UInt8) -> Effect {
        lastWrite = Self.lastWasCommand
        pendingController = 0
        switch command {
        case 0x20: push(commandByte)                     // read command byte
        case 0x60, 0xD1, 0xD2, 0xD3, 0xD4: pendingController = command
        case 0xA7, 0xA8: break                           // disable/enable the (absent) mouse port
        case 0xA9: push(0x01)                            // mouse port test: clock line stuck low, no mouse
        case 0xAA: push(0x55)                            // controller self-test passed
        case 0xAB: push(0x00)                            // keyboard port test passed
        case 0xAD, 0xAE: break                           // disable/enable the keyboard port
        case 0xC0: push(0x80)                            // input port: keyboard not locked
        case 0xD0: push(0x03 | (queued > 0 ? 0x10 : 0))  // output port: reset line high, A20 on
        case 0xF0...0xFF:
            // Pulse output-port bits low for 6 µs; bit 0 is the CPU reset line.
            if command & 0x01 == 0 { return .reset }
        default: break
        }
        return .none
    }

    /// Port 0x60 write: a controller command's data, or a byte for the keyboard.
    public mutating func writeData(_ value: UInt8) -> Effect {
        lastWrite = 0
        let pending = pendingController
        pendingController = 0
        switch pending {
        case 0x60: commandByte = value & 0x77
        case 0xD1: if value & 0x01 == 0 { return .reset }  // output port with the reset line low
        case 0xD2: push(value)                              // as if the keyboard sent it
        case 0xD3, 0xD4: break                              // no mouse: nothing answers
        default: keyboardCommand(value)
        }
        return .none
    }

    private mutating func keyboardCommand(_ value: UInt8) {
        let ack: UInt8 = 0xFA
        if pendingKeyboard != 0 {
            let command = pendingKeyboard
            pendingKeyboard = 0
            if command == 0xF0 && value == 0 {
                push(ack)
                push(scanCodeSet)
            } else {
                if command == 0xF0 && (1...3).contains(value) { scanCodeSet = value }
                push(ack)
            }
            return
        }
        switch value {
        case 0xED, 0xF0, 0xF3:                              // LEDs, scan-code set, typematic: argument follows
            pendingKeyboard = value
            push(ack)
        case 0xEE: push(0xEE)                               // echo
        case 0xF2:                                          // identify: an MF2 keyboard
            push(ack)
            push(0xAB)
            push(commandByte & 0x40 != 0 ? 0x41 : 0x83)
        case 0xF4, 0xF5, 0xF6: push(ack)                    // enable, disable, defaults
        case 0xFF:                                          // reset: ack, then self-test passed
            scanCodeSet = 2
            push(ack)
            push(0xAA)
        default: push(0xFE)                                 // resend: not understood
        }
    }

    private mutating func push(_ byte: UInt8) {
        guard queued < 8 else { return }  // the guest isn't reading; drop as a full buffer would
        // With nothing queued, the low byte is only the latch of the last read: replace it.
        queue = queued == 0 ? UInt64(byte) : queue | UInt64(byte) << (8 * UInt64(queued))
        queued += 1
    }

    /// Makes a state restored from the state page safe to use.
    public mutating func sanitize() {
        if queued > 8 { queued = 0 }
    }
}

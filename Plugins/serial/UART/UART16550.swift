// A register-level model of a National Semiconductor PC16550D (16550A) UART as wired on a PC COM port.
//
// Written from the datasheet's register descriptions. The model has no notion of time: a byte written to
// THR reaches the host sink at once, so the transmitter is always empty. Host input arrives through
// `receive(_:)`; the host calls `receiveIdle()` when its input goes quiet, which stands in for the
// 16550's four-character receive timeout.
//
// Every stored property is a plain unsigned integer, so any bit pattern is a representable value: the
// struct can be copied to and from a shared memory page and restored from untrusted bytes, after which
// `sanitize()` brings it back into the states the methods below produce. The methods mask every index
// and use wrapping arithmetic, so they do not trap even on state that was never sanitized.

/// A 16550A UART: eight I/O registers, a 16-byte receive FIFO and the modem status lines.
///
/// Register offsets are relative to the port base (0x3F8 for COM1):
///
/// | Offset | DLAB = 0 read | DLAB = 0 write | DLAB = 1 |
/// |--------|---------------|----------------|----------|
/// | 0      | RBR           | THR            | DLL      |
/// | 1      | IER           | IER            | DLM      |
/// | 2      | IIR           | FCR            | (same)   |
/// | 3      | LCR           | LCR            | (same)   |
/// | 4      | MCR           | MCR            | (same)   |
/// | 5      | LSR           | (ignored)      | (same)   |
/// | 6      | MSR           | (ignored)      | (same)   |
/// | 7      | SCR           | SCR            | (same)   |
///
/// Reset state: IER = 0, IIR = 0x01, LCR = 0, MCR = 0, LSR = 0x60, MSR = 0xB0 (no modem is attached, so
/// CTS, DSR and DCD read as asserted), SCR = 0, FIFOs disabled with a trigger level of 1, and a divisor
/// of 12 (9600 baud from the PC's 1.8432 MHz clock; the chip's own reset value is undefined).
///
/// The value is trivially copyable (`BitwiseCopyable`): it holds no references, arrays or strings.
public struct UART16550: Sendable, BitwiseCopyable {
    // MARK: Register offsets and bits

    /// Register offsets.
    public enum Register {
        /// RBR (read) / THR (write) / DLL (DLAB = 1).
        public static let data: UInt8 = 0
        /// IER / DLM (DLAB = 1).
        public static let interruptEnable: UInt8 = 1
        /// IIR (read) / FCR (write).
        public static let interruptIdentification: UInt8 = 2
        /// LCR.
        public static let lineControl: UInt8 = 3
        /// MCR.
        public static let modemControl: UInt8 = 4
        /// LSR.
        public static let lineStatus: UInt8 = 5
        /// MSR.
        public static let modemStatus: UInt8 = 6
        /// SCR.
        public static let scratch: UInt8 = 7
    }

    /// Depth of the receive FIFO.
    public static let fifoDepth = 16
    /// Divisor latch value after `init()`: 12, i.e. 9600 baud.
    public static let resetDivisor: UInt16 = 12

    // IER
    private static let ierRxData: UInt8 = 0x01        // ERBFI
    private static let ierTHRE: UInt8 = 0x02          // ETBEI
    private static let ierLineStatus: UInt8 = 0x04    // ELSI
    private static let ierModemStatus: UInt8 = 0x08   // EDSSI
    private static let ierWritable: UInt8 = 0x0F

    // FCR (the bits kept in `fifoControl`)
    private static let fcrEnable: UInt8 = 0x01
    private static let fcrClearRx: UInt8 = 0x02
    private static let fcrClearTx: UInt8 = 0x04
    private static let fcrTriggerMask: UInt8 = 0xC0
    private static let fcrStored: UInt8 = fcrEnable | fcrTriggerMask

    // LCR
    private static let lcrDLAB: UInt8 = 0x80

    // MCR
    private static let mcrDTR: UInt8 = 0x01
    private static let mcrRTS: UInt8 = 0x02
    private static let mcrOUT1: UInt8 = 0x04
    private static let mcrOUT2: UInt8 = 0x08
    private static let mcrLoop: UInt8 = 0x10
    private static let mcrWritable: UInt8 = 0x1F

    // LSR
    private static let lsrDR: UInt8 = 0x01
    private static let lsrOE: UInt8 = 0x02
    private static let lsrPE: UInt8 = 0x04
    private static let lsrFE: UInt8 = 0x08
    private static let lsrBI: UInt8 = 0x10
    private static let lsrTHRE: UInt8 = 0x20
    private static let lsrTEMT: UInt8 = 0x40
    private static let lsrErrors: UInt8 = lsrOE | lsrPE | lsrFE | lsrBI
    private static let lsrFifoErrors: UInt8 = lsrPE | lsrFE | lsrBI

    // MSR
    private static let msrDCTS: UInt8 = 0x01
    private static let msrDDSR: UInt8 = 0x02
    private static let msrTERI: UInt8 = 0x04
    private static let msrDDCD: UInt8 = 0x08
    private static let msrDeltas: UInt8 = 0x0F
    private static let msrCTS: UInt8 = 0x10
    private static let msrDSR: UInt8 = 0x20
    private static let msrRI: UInt8 = 0x40
    private static let msrDCD: UInt8 = 0x80
    private static let msrLines: UInt8 = 0xF0
    /// Modem inputs with nothing attached: CTS, DSR and DCD asserted, RI not.
    private static let msrNoModem: UInt8 = msrCTS | msrDSR | msrDCD

    // IIR
    private static let iirNone: UInt8 = 0x01
    private static let iirModemStatus: UInt8 = 0x00
    private static let iirTHRE: UInt8 = 0x02
    private static let iirRxData: UInt8 = 0x04
    private static let iirLineStatus: UInt8 = 0x06
    private static let iirTimeout: UInt8 = 0x0C
    private static let iirFifosEnabled: UInt8 = 0xC0

    // `flags` bits
    private static let flagTHREPending: UInt8 = 0x01
    private static let flagTimeout: UInt8 = 0x02
    private static let flagsValid: UInt8 = flagTHREPending | flagTimeout

    // MARK: Stored state (plain integers only: every bit pattern is representable)

    /// Receive FIFO slots 0...7, one byte each, slot 0 in the low byte.
    private var rxLow: UInt64 = 0
    /// Receive FIFO slots 8...15.
    private var rxHigh: UInt64 = 0
    /// Slot of the oldest received byte (0...15).
    private var rxHead: UInt8 = 0
    /// Bytes held (0...16; at most 1 with FIFOs disabled).
    private var rxCountRaw: UInt8 = 0
    /// IER (low four bits).
    private var ier: UInt8 = 0
    /// LCR.
    private var lcr: UInt8 = 0
    /// MCR (low five bits).
    private var mcr: UInt8 = 0
    /// SCR.
    private var scr: UInt8 = 0
    /// Divisor latch low byte.
    private var dll: UInt8 = UInt8(truncatingIfNeeded: UART16550.resetDivisor)
    /// Divisor latch high byte.
    private var dlm: UInt8 = UInt8(truncatingIfNeeded: UART16550.resetDivisor >> 8)
    /// FCR bit 0 (FIFO enable) and bits 7:6 (receive trigger level); the other FCR bits are actions.
    private var fifoControl: UInt8 = 0
    /// Sticky LSR error bits (OE, PE, FE, BI); cleared by reading LSR.
    private var lineErrors: UInt8 = 0
    /// MSR: modem input lines in bits 7:4, sticky delta bits in 3:0.
    private var msr: UInt8 = UART16550.msrNoModem
    /// `flagTHREPending`, `flagTimeout`.
    private var flags: UInt8 = 0

    // MARK: Public interface

    /// A UART in its reset state (see the type's documentation).
    public init() {}

    /// The guest reads the register at `offset` (0...7, relative to the port base), with the side effects
    /// the datasheet gives: reading RBR takes a byte from the receive FIFO and clears the character
    /// timeout; reading IIR clears a THRE interrupt when THRE is the source it reports; reading LSR
    /// clears OE, PE, FE and BI; reading MSR clears the delta bits. Other offsets read as 0xFF.
    public mutating func read(offset: UInt8) -> UInt8 {
        switch offset {
        case Register.data:
            if dlab { return dll }
            return popReceived()
        case Register.interruptEnable:
            return dlab ? dlm : ier & Self.ierWritable
        case Register.interruptIdentification:
            let id = pendingInterruptID
            if id == Self.iirTHRE { flags &= ~Self.flagTHREPending }
            return id | (fifoEnabled ? Self.iirFifosEnabled : 0)
        case Register.lineControl:
            return lcr
        case Register.modemControl:
            return mcr & Self.mcrWritable
        case Register.lineStatus:
            let value = lineStatus
            lineErrors = 0
            return value
        case Register.modemStatus:
            let value = msr
            msr &= Self.msrLines
            return value
        case Register.scratch:
            return scr
        default:
            return 0xFF
        }
    }

    /// The guest writes `value` to the register at `offset` (0...7). Returns the byte to hand to the host
    /// when the write is to THR outside loopback; in loopback mode the byte goes into the receive FIFO
    /// instead and the result is nil, as it is for every other register. Writes to LSR, MSR and to
    /// offsets past 7 are ignored.
    ///
    /// The word length in LCR is not applied: bytes pass through with all eight bits, so a guest that
    /// never programs LCR (which resets to 5-bit words) still gets its output through.
    public mutating func write(offset: UInt8, value: UInt8) -> UInt8? {
        switch offset {
        case Register.data:
            if dlab {
                dll = value
                return nil
            }
            return transmit(value)
        case Register.interruptEnable:
            if dlab {
                dlm = value
                return nil
            }
            let old = ier
            ier = value & Self.ierWritable
            if ier & Self.ierTHRE == 0 {
                flags &= ~Self.flagTHREPending
            } else if old & Self.ierTHRE == 0 {
                // ETBEI 0 -> 1 with THR empty (it always is): THRE interrupt.
                flags |= Self.flagTHREPending
            }
        case Register.interruptIdentification:
            writeFIFOControl(value)
        case Register.lineControl:
            lcr = value
        case Register.modemControl:
            mcr = value & Self.mcrWritable
            setModemInputs(loopback ? Self.loopbackInputs(mcr: mcr) : Self.msrNoModem)
        case Register.scratch:
            scr = value
        default:
            break
        }
        return nil
    }

    /// True when the host may push a received byte without an overrun: the receive FIFO has room, or
    /// with FIFOs disabled, the receiver buffer register is empty.
    public var canReceive: Bool { rxCount < rxCapacity }

    /// Bytes waiting in the receive FIFO (0...16; 0 or 1 with FIFOs disabled).
    public var rxCount: Int { Int(min(rxCountRaw, UInt8(Self.fifoDepth))) }

    /// The divisor latch (DLM:DLL).
    public var divisor: UInt16 { UInt16(dlm) << 8 | UInt16(dll) }

    /// Host input: one byte arrives at the receiver (in loopback mode too, though then nothing would
    /// normally be sent). Returns false and sets LSR.OE when there was no room: with FIFOs enabled the
    /// new byte is lost and the FIFO is unchanged; with FIFOs disabled the new byte replaces the unread
    /// one in RBR, as on the chip. Check `canReceive` first to avoid losing data.
    @discardableResult
    public mutating func receive(_ byte: UInt8) -> Bool {
        pushReceived(byte)
    }

    /// Host input went idle. If the receive FIFO holds data but less than the trigger level, raises the
    /// character-timeout indication (IIR 0x0C while IER.ERBFI is set), which stays until the guest reads
    /// RBR or clears the receive FIFO. Only meaningful with FIFOs enabled: with them disabled every byte
    /// already raises "received data available".
    ///
    /// The chip restarts its timeout after each RBR read, so a device should call this again whenever
    /// the host has nothing more to send and the guest may have left bytes below the trigger level (for
    /// example after each guest register access); it is idempotent.
    public mutating func receiveIdle() {
        let count = rxCount
        if fifoEnabled && count > 0 && count < receiveTriggerLevel {
            flags |= Self.flagTimeout
        }
    }

    /// Level of the IRQ line as wired on a PC: an interrupt is pending and MCR.OUT2 is set. In loopback
    /// mode the chip forces its OUT2 pin inactive, which on a PC disconnects the IRQ, so the line is low
    /// then (the pending interrupt still shows in IIR).
    public var interruptLine: Bool {
        mcr & (Self.mcrOUT2 | Self.mcrLoop) == Self.mcrOUT2 && pendingInterruptID != Self.iirNone
    }

    /// After restoring this value from untrusted memory (a shared page another process may have
    /// scribbled on), forces every field back into a state the other methods can produce: FIFO index
    /// and count in range (at most one byte with FIFOs disabled), reserved register bits clear, modem
    /// input lines consistent with MCR, internal flags valid. Never traps. A value that was not
    /// corrupted is left unchanged.
    public mutating func sanitize() {
        rxHead &= 0x0F
        rxCountRaw = min(rxCountRaw, UInt8(rxCapacity))
        ier &= Self.ierWritable
        mcr &= Self.mcrWritable
        fifoControl &= Self.fcrStored
        if !fifoEnabled {
            rxCountRaw = min(rxCountRaw, 1)
        }
        lineErrors &= Self.lsrErrors
        let lines = loopback ? Self.loopbackInputs(mcr: mcr) : Self.msrNoModem
        msr = lines | (msr & Self.msrDeltas)
        flags &= Self.flagsValid
        if ier & Self.ierTHRE == 0 { flags &= ~Self.flagTHREPending }
        if !fifoEnabled || rxCount == 0 { flags &= ~Self.flagTimeout }
    }

    // MARK: Derived state

    private var dlab: Bool { lcr & Self.lcrDLAB != 0 }
    private var loopback: Bool { mcr & Self.mcrLoop != 0 }
    private var fifoEnabled: Bool { fifoControl & Self.fcrEnable != 0 }
    private var rxCapacity: Int { fifoEnabled ? Self.fifoDepth : 1 }

    /// Receive trigger level from FCR bits 7:6 (1, 4, 8 or 14); 1 with FIFOs disabled.
    private var receiveTriggerLevel: Int {
        guard fifoEnabled else { return 1 }
        switch fifoControl >> 6 {
        case 0: return 1
        case 1: return 4
        case 2: return 8
        default: return 14
        }
    }

    /// LSR as the guest would read it. The transmitter is always empty (THRE and TEMT set). Bit 7 reports
    /// parity, framing or break errors in the FIFO; host input never carries those, so it stays clear
    /// unless restored state says otherwise.
    private var lineStatus: UInt8 {
        var value = Self.lsrTHRE | Self.lsrTEMT | (lineErrors & Self.lsrErrors)
        if rxCount > 0 { value |= Self.lsrDR }
        if fifoEnabled && lineErrors & Self.lsrFifoErrors != 0 { value |= 0x80 }
        return value
    }

    /// IIR bits 3:0 for the highest-priority pending, enabled interrupt, or 0x01 when none is.
    private var pendingInterruptID: UInt8 {
        let count = rxCount
        if ier & Self.ierLineStatus != 0 && lineErrors & Self.lsrErrors != 0 {
            return Self.iirLineStatus
        }
        if ier & Self.ierRxData != 0 && count > 0 {
            if count >= receiveTriggerLevel { return Self.iirRxData }
            if fifoEnabled && flags & Self.flagTimeout != 0 { return Self.iirTimeout }
        }
        if ier & Self.ierTHRE != 0 && flags & Self.flagTHREPending != 0 {
            return Self.iirTHRE
        }
        if ier & Self.ierModemStatus != 0 && msr & Self.msrDeltas != 0 {
            return Self.iirModemStatus
        }
        return Self.iirNone
    }

    /// MSR input lines in loopback: RTS -> CTS, DTR -> DSR, OUT1 -> RI, OUT2 -> DCD.
    private static func loopbackInputs(mcr: UInt8) -> UInt8 {
        var lines: UInt8 = 0
        if mcr & mcrRTS != 0 { lines |= msrCTS }
        if mcr & mcrDTR != 0 { lines |= msrDSR }
        if mcr & mcrOUT1 != 0 { lines |= msrRI }
        if mcr & mcrOUT2 != 0 { lines |= msrDCD }
        return lines
    }

    // MARK: Actions

    /// THR write: the byte leaves at once, so THR is empty again and THRE is re-raised.
    private mutating func transmit(_ value: UInt8) -> UInt8? {
        if ier & Self.ierTHRE != 0 { flags |= Self.flagTHREPending }
        if loopback {
            pushReceived(value)
            return nil
        }
        return value
    }

    private mutating func writeFIFOControl(_ value: UInt8) {
        let enable = value & Self.fcrEnable != 0
        if enable != fifoEnabled {
            // Switching between 16450 and FIFO mode empties both FIFOs.
            clearReceiveFIFO()
        }
        guard enable else {
            // With bit 0 clear, the other FCR bits are not programmed.
            fifoControl &= ~Self.fcrEnable
            return
        }
        fifoControl = value & Self.fcrStored
        if value & Self.fcrClearRx != 0 { clearReceiveFIFO() }
        // Bit 2 (clear TX FIFO): the transmitter is always empty already.
    }

    private mutating func clearReceiveFIFO() {
        rxHead = 0
        rxCountRaw = 0
        flags &= ~Self.flagTimeout
    }

    /// Updates the modem input lines, latching the datasheet's delta bits (TERI on RI's falling edge).
    private mutating func setModemInputs(_ lines: UInt8) {
        let old = msr & Self.msrLines
        let changed = old ^ lines
        var deltas: UInt8 = 0
        if changed & Self.msrCTS != 0 { deltas |= Self.msrDCTS }
        if changed & Self.msrDSR != 0 { deltas |= Self.msrDDSR }
        if old & Self.msrRI != 0 && lines & Self.msrRI == 0 { deltas |= Self.msrTERI }
        if changed & Self.msrDCD != 0 { deltas |= Self.msrDDCD }
        msr = lines | (msr & Self.msrDeltas) | deltas
    }

    @discardableResult
    private mutating func pushReceived(_ byte: UInt8) -> Bool {
        let count = rxCount
        if count < rxCapacity {
            storeSlot(rxHead &+ UInt8(truncatingIfNeeded: count), byte)
            rxCountRaw = UInt8(truncatingIfNeeded: count &+ 1)
            return true
        }
        lineErrors |= Self.lsrOE
        if !fifoEnabled {
            // 16450 mode: the new character overwrites the unread one.
            rxHead &= 0x0F
            rxCountRaw = 1
            storeSlot(rxHead, byte)
        }
        return false
    }

    private mutating func popReceived() -> UInt8 {
        flags &= ~Self.flagTimeout
        let count = rxCount
        guard count > 0 else { return 0 }
        let byte = loadSlot(rxHead)
        rxHead = (rxHead &+ 1) & 0x0F
        rxCountRaw = UInt8(truncatingIfNeeded: count &- 1)
        return byte
    }

    private func loadSlot(_ slot: UInt8) -> UInt8 {
        let index = slot & 0x0F
        let word = index < 8 ? rxLow : rxHigh
        return UInt8(truncatingIfNeeded: word >> (UInt64(index & 7) &* 8))
    }

    private mutating func storeSlot(_ slot: UInt8, _ byte: UInt8) {
        let index = slot & 0x0F
        let shift = UInt64(index & 7) &* 8
        let mask = ~(UInt64(0xFF) << shift)
        let bits = UInt64(byte) << shift
        if index < 8 {
            rxLow = rxLow & mask | bits
        } else {
            rxHigh = rxHigh & mask | bits
        }
    }
}

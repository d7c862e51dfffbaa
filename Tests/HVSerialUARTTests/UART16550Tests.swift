import XCTest
import HVSerialUART

// Register offsets, named as in the datasheet.
private let RBR: UInt8 = 0, THR: UInt8 = 0, DLL: UInt8 = 0
private let IER: UInt8 = 1, DLM: UInt8 = 1
private let IIR: UInt8 = 2, FCR: UInt8 = 2
private let LCR: UInt8 = 3, MCR: UInt8 = 4, LSR: UInt8 = 5, MSR: UInt8 = 6, SCR: UInt8 = 7

// IIR values (low nibble).
private let noInterrupt: UInt8 = 0x01
private let modemStatus: UInt8 = 0x00
private let threEmpty: UInt8 = 0x02
private let rxDataAvailable: UInt8 = 0x04
private let lineStatus: UInt8 = 0x06
private let charTimeout: UInt8 = 0x0C

/// Deterministic generator for the fuzz tests.
private struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private func requireBitwiseCopyable<T: BitwiseCopyable>(_: T.Type) {}
private func requireSendable<T: Sendable>(_: T.Type) {}

private func bytes(of uart: UART16550) -> [UInt8] {
    withUnsafeBytes(of: uart) { Array($0) }
}

/// A UART with FIFOs enabled at `trigger` (FCR bits 7:6) and `ier` set.
private func fifoUART(trigger: UInt8 = 0x00, ier: UInt8 = 0) -> UART16550 {
    var u = UART16550()
    _ = u.write(offset: FCR, value: 0x01 | trigger)
    _ = u.write(offset: IER, value: ier)
    return u
}

/// Checks the invariants every reachable (or sanitized) state must satisfy, through the public API only.
/// Reads registers, so it takes a copy.
private func checkInvariants(_ original: UART16550, file: StaticString = #filePath, line: UInt = #line) {
    var u = original
    XCTAssertLessThanOrEqual(u.rxCount, 16, file: file, line: line)
    let iir = u.read(offset: IIR)
    let fifo = iir & 0xC0 == 0xC0
    XCTAssertEqual(u.canReceive, fifo ? u.rxCount < 16 : u.rxCount == 0,
                   "canReceive disagrees with FIFO state", file: file, line: line)
    XCTAssertTrue(iir & 0xC0 == 0xC0 || iir & 0xC0 == 0x00, file: file, line: line)
    XCTAssertEqual(iir & 0x30, 0, file: file, line: line)
    XCTAssertTrue([0x00, 0x01, 0x02, 0x04, 0x06, 0x0C].contains(iir & 0x0F), "IIR \(iir)", file: file, line: line)
    if !fifo {
        XCTAssertLessThanOrEqual(u.rxCount, 1, file: file, line: line)
        XCTAssertNotEqual(iir & 0x0F, charTimeout, file: file, line: line)
    }
    let lcr = u.read(offset: LCR)
    _ = u.write(offset: LCR, value: lcr & 0x7F)
    XCTAssertEqual(u.read(offset: IER) & 0xF0, 0, file: file, line: line)
    let mcr = u.read(offset: MCR)
    XCTAssertEqual(mcr & 0xE0, 0, file: file, line: line)
    let lsr = u.read(offset: LSR)
    XCTAssertEqual(lsr & 0x60, 0x60, "transmitter always empty", file: file, line: line)
    XCTAssertEqual(lsr & 0x01 != 0, u.rxCount > 0, file: file, line: line)
    let msr = u.read(offset: MSR)
    if mcr & 0x10 == 0 {
        XCTAssertEqual(msr & 0xF0, 0xB0, file: file, line: line)
    } else {
        var expected: UInt8 = 0
        if mcr & 0x02 != 0 { expected |= 0x10 }
        if mcr & 0x01 != 0 { expected |= 0x20 }
        if mcr & 0x04 != 0 { expected |= 0x40 }
        if mcr & 0x08 != 0 { expected |= 0x80 }
        XCTAssertEqual(msr & 0xF0, expected, file: file, line: line)
    }
    // Draining the receiver terminates within the FIFO depth.
    var reads = 0
    while u.read(offset: LSR) & 0x01 != 0 && reads < 100 {
        _ = u.read(offset: RBR)
        reads += 1
    }
    XCTAssertLessThanOrEqual(reads, 16, file: file, line: line)
    XCTAssertEqual(u.rxCount, 0, file: file, line: line)
}

/// Calls every entry point with a spread of arguments. Must never trap.
private func exerciseEverything(_ u: inout UART16550, rng: inout SplitMix64) {
    for offset in UInt8(0)...UInt8(12) {
        _ = u.read(offset: offset)
    }
    _ = u.canReceive
    _ = u.interruptLine
    _ = u.rxCount
    _ = u.divisor
    u.receiveIdle()
    for _ in 0..<40 { u.receive(UInt8.random(in: 0...255, using: &rng)) }
    for _ in 0..<40 { _ = u.read(offset: RBR) }
    for _ in 0..<200 {
        let offset = UInt8.random(in: 0...9, using: &rng)
        let value = UInt8.random(in: 0...255, using: &rng)
        switch UInt8.random(in: 0...4, using: &rng) {
        case 0: _ = u.write(offset: offset, value: value)
        case 1: _ = u.read(offset: offset)
        case 2: u.receive(value)
        case 3: u.receiveIdle()
        default: _ = u.interruptLine; _ = u.canReceive
        }
    }
}

final class UART16550Tests: XCTestCase {

    // MARK: Type properties

    func testIsTriviallyCopyableAndSendable() {
        requireBitwiseCopyable(UART16550.self)
        requireSendable(UART16550.self)
        XCTAssertLessThanOrEqual(MemoryLayout<UART16550>.size, 64)
    }

    // MARK: Reset state

    func testResetValues() {
        var u = UART16550()
        XCTAssertEqual(u.read(offset: IER), 0x00)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        XCTAssertEqual(u.read(offset: LCR), 0x00)
        XCTAssertEqual(u.read(offset: MCR), 0x00)
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertEqual(u.read(offset: MSR), 0xB0)
        XCTAssertEqual(u.read(offset: SCR), 0x00)
        XCTAssertEqual(u.divisor, 12)
        XCTAssertEqual(UART16550.resetDivisor, 12)
        XCTAssertTrue(u.canReceive)
        XCTAssertFalse(u.interruptLine)
        XCTAssertEqual(u.rxCount, 0)
        _ = u.write(offset: LCR, value: 0x80)
        XCTAssertEqual(u.read(offset: DLL), 12)
        XCTAssertEqual(u.read(offset: DLM), 0)
    }

    func testRegisterOffsetConstants() {
        XCTAssertEqual(UART16550.Register.data, 0)
        XCTAssertEqual(UART16550.Register.interruptEnable, 1)
        XCTAssertEqual(UART16550.Register.interruptIdentification, 2)
        XCTAssertEqual(UART16550.Register.lineControl, 3)
        XCTAssertEqual(UART16550.Register.modemControl, 4)
        XCTAssertEqual(UART16550.Register.lineStatus, 5)
        XCTAssertEqual(UART16550.Register.modemStatus, 6)
        XCTAssertEqual(UART16550.Register.scratch, 7)
        XCTAssertEqual(UART16550.fifoDepth, 16)
    }

    // MARK: Plain registers

    func testScratchRegisterHoldsAnyByte() {
        var u = UART16550()
        for value in [UInt8(0x00), 0x55, 0xAA, 0xFF] {
            XCTAssertNil(u.write(offset: SCR, value: value))
            XCTAssertEqual(u.read(offset: SCR), value)
        }
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
    }

    func testLineControlHoldsAllEightBits() {
        var u = UART16550()
        for value in [UInt8(0x03), 0x1B, 0x7F, 0x80, 0xFF] {
            XCTAssertNil(u.write(offset: LCR, value: value))
            XCTAssertEqual(u.read(offset: LCR), value)
        }
    }

    func testOnlyLowFourIERBitsAreWritable() {
        var u = UART16550()
        XCTAssertNil(u.write(offset: IER, value: 0xFF))
        XCTAssertEqual(u.read(offset: IER), 0x0F)
        _ = u.write(offset: IER, value: 0xF0)
        XCTAssertEqual(u.read(offset: IER), 0x00)
    }

    func testOnlyLowFiveMCRBitsAreWritable() {
        var u = UART16550()
        XCTAssertNil(u.write(offset: MCR, value: 0xEF))
        XCTAssertEqual(u.read(offset: MCR), 0x0F)
        _ = u.write(offset: MCR, value: 0xFF)
        XCTAssertEqual(u.read(offset: MCR), 0x1F)
        _ = u.write(offset: MCR, value: 0xE0)
        XCTAssertEqual(u.read(offset: MCR), 0x00)
    }

    func testWritesToStatusRegistersAreIgnored() {
        var u = UART16550()
        XCTAssertNil(u.write(offset: LSR, value: 0x1F))
        XCTAssertNil(u.write(offset: MSR, value: 0x0F))
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertEqual(u.read(offset: MSR), 0xB0)
    }

    func testOffsetsPastSevenReadAsFFAndIgnoreWrites() {
        var u = UART16550()
        _ = u.write(offset: SCR, value: 0x42)
        let before = bytes(of: u)
        for offset in [UInt8(8), 9, 15, 0x10, 0x7F, 0x80, 0xFF] {
            XCTAssertEqual(u.read(offset: offset), 0xFF)
            XCTAssertNil(u.write(offset: offset, value: 0x41))
        }
        XCTAssertEqual(bytes(of: u), before)
        XCTAssertEqual(u.read(offset: SCR), 0x42)
    }

    // MARK: DLAB

    func testDLABSelectsDivisorLatchAtOffsetsZeroAndOne() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x05)
        _ = u.write(offset: LCR, value: 0x83)
        XCTAssertNil(u.write(offset: DLL, value: 0x01), "DLL write must not transmit")
        XCTAssertNil(u.write(offset: DLM, value: 0x02))
        XCTAssertEqual(u.read(offset: DLL), 0x01)
        XCTAssertEqual(u.read(offset: DLM), 0x02)
        XCTAssertEqual(u.divisor, 0x0201)
        XCTAssertEqual(u.read(offset: LCR), 0x83)

        _ = u.write(offset: LCR, value: 0x03)
        XCTAssertEqual(u.read(offset: IER), 0x05, "IER untouched by the DLM write")
        XCTAssertEqual(u.write(offset: THR, value: 0x41), 0x41)
        XCTAssertEqual(u.divisor, 0x0201, "THR write leaves DLL alone")
    }

    func testDLABHidesReceiveBufferButKeepsIt() {
        var u = UART16550()
        u.receive(0x5A)
        _ = u.write(offset: LCR, value: 0x80)
        XCTAssertEqual(u.read(offset: DLL), 12)
        XCTAssertEqual(u.rxCount, 1, "reading DLL does not consume RBR")
        XCTAssertEqual(u.read(offset: LSR) & 0x01, 0x01)
        _ = u.write(offset: LCR, value: 0x00)
        XCTAssertEqual(u.read(offset: RBR), 0x5A)
    }

    func testDLABDoesNotAffectOtherOffsets() {
        var u = UART16550()
        _ = u.write(offset: LCR, value: 0x80)
        _ = u.write(offset: SCR, value: 0x99)
        _ = u.write(offset: MCR, value: 0x0B)
        XCTAssertEqual(u.read(offset: SCR), 0x99)
        XCTAssertEqual(u.read(offset: MCR), 0x0B)
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        _ = u.write(offset: FCR, value: 0x01)
        XCTAssertEqual(u.read(offset: IIR), 0xC1, "FCR is reachable with DLAB set")
    }

    // MARK: Transmit

    func testTHRWriteHandsByteToHost() {
        var u = UART16550()
        for value in [UInt8(0x00), 0x41, 0x0A, 0xFF] {
            XCTAssertEqual(u.write(offset: THR, value: value), value)
            XCTAssertEqual(u.read(offset: LSR) & 0x60, 0x60, "THRE and TEMT stay set")
        }
    }

    func testWordLengthDoesNotMaskTransmittedBytes() {
        var u = UART16550()  // LCR = 0: 5-bit words
        XCTAssertEqual(u.write(offset: THR, value: 0xE9), 0xE9)
    }

    func testTransmitWithFIFOsEnabled() {
        var u = fifoUART()
        for i in 0..<40 {
            XCTAssertEqual(u.write(offset: THR, value: UInt8(i)), UInt8(i))
        }
        XCTAssertEqual(u.read(offset: LSR), 0x60)
    }

    // MARK: Receive, 16450 mode

    func testReceiveWithoutFIFOHoldsOneByte() {
        var u = UART16550()
        XCTAssertTrue(u.canReceive)
        XCTAssertTrue(u.receive(0x31))
        XCTAssertFalse(u.canReceive)
        XCTAssertEqual(u.rxCount, 1)
        XCTAssertEqual(u.read(offset: LSR), 0x61)
        XCTAssertEqual(u.read(offset: RBR), 0x31)
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertTrue(u.canReceive)
    }

    func testOverrunWithoutFIFOSetsOEAndKeepsNewestByte() {
        var u = UART16550()
        XCTAssertTrue(u.receive(0x31))
        XCTAssertFalse(u.receive(0x32))
        XCTAssertEqual(u.rxCount, 1)
        XCTAssertEqual(u.read(offset: LSR), 0x63, "DR | OE | THRE | TEMT")
        XCTAssertEqual(u.read(offset: LSR), 0x61, "OE cleared by the LSR read")
        XCTAssertEqual(u.read(offset: RBR), 0x32, "the unread byte was overwritten")
        XCTAssertEqual(u.read(offset: LSR), 0x60)
    }

    func testReadingEmptyRBRIsHarmless() {
        var u = UART16550()
        for _ in 0..<20 { XCTAssertEqual(u.read(offset: RBR), 0) }
        XCTAssertEqual(u.rxCount, 0)
        XCTAssertTrue(u.receive(0x77))
        XCTAssertEqual(u.read(offset: RBR), 0x77)
    }

    func testReceivedBytesKeepAllEightBits() {
        var u = UART16550()
        _ = u.write(offset: LCR, value: 0x02)  // 7-bit words
        u.receive(0xC3)
        XCTAssertEqual(u.read(offset: RBR), 0xC3)
    }

    // MARK: Receive, FIFO mode

    func testFIFOHoldsSixteenBytesInOrder() {
        var u = fifoUART()
        for i in 0..<16 {
            XCTAssertTrue(u.canReceive)
            XCTAssertTrue(u.receive(UInt8(0x40 + i)))
        }
        XCTAssertFalse(u.canReceive)
        XCTAssertEqual(u.rxCount, 16)
        XCTAssertFalse(u.receive(0xEE))
        XCTAssertEqual(u.rxCount, 16, "overrun byte is not stored")
        XCTAssertEqual(u.read(offset: LSR), 0x63)
        XCTAssertEqual(u.read(offset: LSR), 0x61)
        for i in 0..<16 {
            XCTAssertEqual(u.read(offset: RBR), UInt8(0x40 + i))
        }
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertTrue(u.canReceive)
    }

    func testFIFOWrapsAround() {
        var u = fifoUART()
        var next: UInt8 = 0
        var expected: UInt8 = 0
        for round in 0..<50 {
            let pushes = (round * 7) % 17
            for _ in 0..<pushes where u.canReceive {
                XCTAssertTrue(u.receive(next))
                next &+= 1
            }
            let pops = (round * 5) % 17
            for _ in 0..<pops where u.rxCount > 0 {
                XCTAssertEqual(u.read(offset: RBR), expected)
                expected &+= 1
            }
        }
        while u.rxCount > 0 {
            XCTAssertEqual(u.read(offset: RBR), expected)
            expected &+= 1
        }
        XCTAssertEqual(expected, next)
        XCTAssertEqual(u.read(offset: LSR), 0x60, "no overrun was ever signalled")
    }

    func testIIRShowsFIFOsEnabledBits() {
        var u = UART16550()
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        _ = u.write(offset: FCR, value: 0x01)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        _ = u.write(offset: FCR, value: 0xC7)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        _ = u.write(offset: FCR, value: 0x00)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
    }

    func testFCRBitOneClearsReceiveFIFO() {
        var u = fifoUART(trigger: 0x40)
        for i in 0..<10 { u.receive(UInt8(i)) }
        _ = u.write(offset: FCR, value: 0x41 | 0x02)
        XCTAssertEqual(u.rxCount, 0)
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        // Trigger level still 4.
        _ = u.write(offset: IER, value: 0x01)
        for i in 0..<3 { u.receive(UInt8(i)) }
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        u.receive(3)
        XCTAssertEqual(u.read(offset: IIR), 0xC4)
        XCTAssertEqual(u.read(offset: RBR), 0, "the FIFO restarted from the first byte after the clear")
    }

    func testFCRBitOneDoesNotClearLineErrors() {
        var u = UART16550()
        u.receive(1)
        u.receive(2)  // overrun
        _ = u.write(offset: FCR, value: 0x01)  // enabling clears the FIFO
        _ = u.write(offset: FCR, value: 0x03)
        XCTAssertEqual(u.read(offset: LSR), 0x62, "OE survives a FIFO clear")
    }

    func testFCRClearTransmitIsHarmless() {
        var u = fifoUART(ier: 0x02)
        XCTAssertEqual(u.read(offset: IIR), 0xC2)
        u.receive(0x10)
        _ = u.write(offset: FCR, value: 0x05)
        XCTAssertEqual(u.rxCount, 1, "bit 2 leaves the receive FIFO alone")
        XCTAssertEqual(u.read(offset: LSR), 0x61)
        XCTAssertEqual(u.write(offset: THR, value: 0x20), 0x20)
    }

    func testChangingFIFOEnableClearsFIFO() {
        var u = UART16550()
        u.receive(0x11)
        _ = u.write(offset: FCR, value: 0x01)
        XCTAssertEqual(u.rxCount, 0, "16450 -> FIFO mode clears")
        for i in 0..<5 { u.receive(UInt8(i)) }
        _ = u.write(offset: FCR, value: 0x01)
        XCTAssertEqual(u.rxCount, 5, "rewriting the same enable state keeps data")
        _ = u.write(offset: FCR, value: 0x00)
        XCTAssertEqual(u.rxCount, 0, "FIFO -> 16450 mode clears")
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertTrue(u.receive(0x22))
        XCTAssertFalse(u.canReceive, "back to a one-byte holding register")
    }

    func testFCRWithoutEnableBitIgnoresOtherBits() {
        var u = UART16550()
        u.receive(0x5E)
        _ = u.write(offset: FCR, value: 0xC2)  // bit 0 clear: clear-RX and trigger bits not programmed
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        XCTAssertEqual(u.rxCount, 1)
        XCTAssertEqual(u.read(offset: RBR), 0x5E)
    }

    func testFCRWithEnableBitProgramsTrigger() {
        var u = fifoUART(trigger: 0x80, ier: 0x01)  // trigger 8
        _ = u.write(offset: FCR, value: 0x01)       // still enabled, trigger bits now 00: level 1
        u.receive(0x01)
        XCTAssertEqual(u.read(offset: IIR), 0xC4)
    }

    func testReceiveTriggerLevels() {
        for (bits, level) in [(UInt8(0x00), 1), (0x40, 4), (0x80, 8), (0xC0, 14)] {
            var u = fifoUART(trigger: bits, ier: 0x01)
            for i in 0..<(level - 1) {
                u.receive(UInt8(i))
                XCTAssertEqual(u.read(offset: IIR), 0xC1, "level \(level): \(i + 1) bytes below trigger")
            }
            XCTAssertFalse(u.interruptLine)
            u.receive(0xAA)
            XCTAssertEqual(u.read(offset: IIR), 0xC4, "level \(level) reached")
            _ = u.write(offset: MCR, value: 0x08)
            XCTAssertTrue(u.interruptLine)
            u.receive(0xBB)
            XCTAssertEqual(u.read(offset: IIR), 0xC4, "above the trigger level")
            // Reading IIR does not clear RDA; draining below the trigger does.
            XCTAssertEqual(u.read(offset: IIR), 0xC4)
            _ = u.read(offset: RBR)
            _ = u.read(offset: RBR)
            XCTAssertEqual(u.read(offset: IIR), 0xC1, "level \(level): back below trigger")
            XCTAssertFalse(u.interruptLine)
        }
    }

    func testReceivedDataInterruptWithoutFIFO() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x01)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        u.receive(0x42)
        XCTAssertEqual(u.read(offset: IIR), 0x04)
        XCTAssertEqual(u.read(offset: RBR), 0x42)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
    }

    func testReceivedDataNeedsERBFI() {
        var u = fifoUART()
        u.receive(0x42)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        _ = u.write(offset: IER, value: 0x01)
        XCTAssertEqual(u.read(offset: IIR), 0xC4)
        _ = u.write(offset: IER, value: 0x00)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
    }

    // MARK: Character timeout

    func testCharacterTimeoutBelowTrigger() {
        var u = fifoUART(trigger: 0x40, ier: 0x01)  // trigger 4
        u.receive(0x61)
        u.receive(0x62)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xCC)
        XCTAssertEqual(u.read(offset: IIR), 0xCC, "reading IIR does not clear the timeout")
        _ = u.write(offset: MCR, value: 0x08)
        XCTAssertTrue(u.interruptLine)
        XCTAssertEqual(u.read(offset: RBR), 0x61)
        XCTAssertEqual(u.read(offset: IIR), 0xC1, "reading RBR clears the timeout")
        XCTAssertFalse(u.interruptLine)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xCC, "raised again while data remains")
        XCTAssertEqual(u.read(offset: RBR), 0x62)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xC1, "no timeout with an empty FIFO")
    }

    func testReceiveIdleIsIdempotent() {
        var u = fifoUART(trigger: 0x80, ier: 0x01)
        u.receive(1)
        u.receiveIdle()
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xCC)
        XCTAssertEqual(u.rxCount, 1)
    }

    func testNoTimeoutAtOrAboveTrigger() {
        var u = fifoUART(trigger: 0x40, ier: 0x01)
        for i in 0..<4 { u.receive(UInt8(i)) }
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xC4)
    }

    func testNoTimeoutWithEmptyFIFO() {
        var u = fifoUART(trigger: 0xC0, ier: 0x01)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        u.receive(1)
        XCTAssertEqual(u.read(offset: IIR), 0xC1, "a stale idle does not count for new data")
    }

    func testNoTimeoutWithoutFIFO() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x01)
        u.receive(0x33)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0x04)
        _ = u.read(offset: RBR)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0x01)
    }

    func testTimeoutIsHiddenWithoutERBFI() {
        var u = fifoUART(trigger: 0x40, ier: 0x00)
        u.receive(1)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
    }

    func testTimeoutClearedByFIFOReset() {
        var u = fifoUART(trigger: 0x40, ier: 0x01)
        u.receive(1)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xCC)
        _ = u.write(offset: FCR, value: 0x43)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        u.receive(2)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
    }

    func testTimeoutClearedByLeavingFIFOMode() {
        var u = fifoUART(trigger: 0x40, ier: 0x01)
        u.receive(1)
        u.receiveIdle()
        _ = u.write(offset: FCR, value: 0x00)
        _ = u.write(offset: FCR, value: 0x41)
        u.receive(2)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
    }

    // MARK: Line status

    func testLSRErrorBitsClearOnRead() {
        var u = fifoUART()
        for i in 0..<17 { u.receive(UInt8(i)) }
        let first = u.read(offset: LSR)
        XCTAssertEqual(first & 0x02, 0x02, "OE")
        XCTAssertEqual(first & 0x1C, 0x00, "host input never has parity, framing or break errors")
        XCTAssertEqual(first & 0x80, 0x00, "no error byte in the FIFO")
        XCTAssertEqual(u.read(offset: LSR) & 0x1E, 0x00)
        XCTAssertEqual(u.read(offset: LSR) & 0x01, 0x01, "DR is not cleared by reading LSR")
    }

    func testLineStatusInterrupt() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x04)
        _ = u.write(offset: MCR, value: 0x08)
        u.receive(1)
        XCTAssertEqual(u.read(offset: IIR), 0x01, "data alone is not a line status interrupt")
        u.receive(2)
        XCTAssertEqual(u.read(offset: IIR), 0x06)
        XCTAssertEqual(u.read(offset: IIR), 0x06, "reading IIR does not clear it")
        XCTAssertTrue(u.interruptLine)
        _ = u.read(offset: LSR)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        XCTAssertFalse(u.interruptLine)
    }

    func testLineStatusNeedsELSI() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x0B)
        u.receive(1)
        u.receive(2)
        XCTAssertEqual(u.read(offset: IIR), 0x04)
        XCTAssertEqual(u.read(offset: LSR) & 0x02, 0x02)
    }

    // MARK: IIR priorities

    func testInterruptPriorityOrder() {
        var u = fifoUART(trigger: 0x00)
        // Modem status pending: loopback toggles the lines.
        _ = u.write(offset: MCR, value: 0x10)
        _ = u.write(offset: MCR, value: 0x00)
        _ = u.write(offset: IER, value: 0x0F)  // THRE raised by the 0 -> 1 edge
        for i in 0..<17 { u.receive(UInt8(i)) }  // data and an overrun

        XCTAssertEqual(u.read(offset: IIR), 0xC6, "line status first")
        _ = u.read(offset: LSR)
        XCTAssertEqual(u.read(offset: IIR), 0xC4, "then received data")
        for _ in 0..<16 { _ = u.read(offset: RBR) }
        XCTAssertEqual(u.read(offset: IIR), 0xC2, "then THRE, which this read clears")
        XCTAssertEqual(u.read(offset: IIR), 0xC0, "then modem status")
        _ = u.read(offset: MSR)
        XCTAssertEqual(u.read(offset: IIR), 0xC1, "then none")
    }

    func testTimeoutHasReceivedDataPriority() {
        var u = fifoUART(trigger: 0x80, ier: 0x03)
        u.receive(1)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xCC, "timeout outranks THRE")
        _ = u.read(offset: RBR)
        XCTAssertEqual(u.read(offset: IIR), 0xC2)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
    }

    func testLineStatusOutranksTimeout() {
        var u = fifoUART(trigger: 0xC0, ier: 0x05)  // trigger 14
        for i in 0..<17 { u.receive(UInt8(i)) }     // the 17th overruns
        for _ in 0..<4 { _ = u.read(offset: RBR) }  // 12 left, below the trigger
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xC6)
        _ = u.read(offset: LSR)
        XCTAssertEqual(u.read(offset: IIR), 0xCC)
    }

    // MARK: THRE interrupt

    func testTHREInterruptRaisedWhenEnabled() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x02)
        XCTAssertEqual(u.read(offset: IIR), 0x02)
        XCTAssertEqual(u.read(offset: IIR), 0x01, "cleared by the IIR read that reported it")
    }

    func testTHREReRaisedAfterEachTHRWrite() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x02)
        _ = u.read(offset: IIR)
        for i in 0..<3 {
            XCTAssertEqual(u.write(offset: THR, value: UInt8(i)), UInt8(i))
            XCTAssertEqual(u.read(offset: IIR), 0x02)
            XCTAssertEqual(u.read(offset: IIR), 0x01)
        }
    }

    func testTHRWriteClearsUnreadTHREAndRaisesItAgain() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x02)
        _ = u.write(offset: THR, value: 0x41)
        XCTAssertEqual(u.read(offset: IIR), 0x02)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
    }

    func testRewritingETBEIWithoutEdgeDoesNotReRaise() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x02)
        XCTAssertEqual(u.read(offset: IIR), 0x02)
        _ = u.write(offset: IER, value: 0x02)
        XCTAssertEqual(u.read(offset: IIR), 0x01, "no 0 -> 1 edge")
        _ = u.write(offset: IER, value: 0x03)
        XCTAssertEqual(u.read(offset: IIR), 0x01, "enabling other sources is no edge either")
        // Linux's THRE test: enable, read IIR, disable, enable, read IIR again.
        _ = u.write(offset: IER, value: 0x00)
        _ = u.write(offset: IER, value: 0x02)
        XCTAssertEqual(u.read(offset: IIR), 0x02)
    }

    func testDisablingETBEIClearsTHRE() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x02)
        _ = u.write(offset: IER, value: 0x00)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        _ = u.write(offset: THR, value: 0x41)
        _ = u.write(offset: IER, value: 0x01)
        XCTAssertEqual(u.read(offset: IIR), 0x01, "THR writes with ETBEI clear leave nothing pending")
    }

    func testTHREClearedOnlyWhenItIsTheReportedSource() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x03)
        u.receive(0x10)
        XCTAssertEqual(u.read(offset: IIR), 0x04)
        XCTAssertEqual(u.read(offset: IIR), 0x04)
        _ = u.read(offset: RBR)
        XCTAssertEqual(u.read(offset: IIR), 0x02, "THRE survived the IIR reads that reported RDA")
        XCTAssertEqual(u.read(offset: IIR), 0x01)
    }

    func testTHREInLoopback() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x10)
        _ = u.write(offset: IER, value: 0x02)
        _ = u.read(offset: IIR)
        XCTAssertNil(u.write(offset: THR, value: 0x55))
        XCTAssertEqual(u.read(offset: LSR), 0x61, "THRE and TEMT set in loopback too")
        XCTAssertEqual(u.read(offset: IIR), 0x02)
    }

    // MARK: OUT2 gating

    func testInterruptLineNeedsOUT2() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x01)
        u.receive(0x01)
        XCTAssertFalse(u.interruptLine, "pending but OUT2 clear")
        _ = u.write(offset: MCR, value: 0x07)  // DTR | RTS | OUT1
        XCTAssertFalse(u.interruptLine)
        _ = u.write(offset: MCR, value: 0x08)
        XCTAssertTrue(u.interruptLine)
        _ = u.write(offset: MCR, value: 0x0B)
        XCTAssertTrue(u.interruptLine)
        _ = u.read(offset: RBR)
        XCTAssertFalse(u.interruptLine, "nothing pending")
    }

    func testInterruptLineFollowsIIR() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x08)
        XCTAssertFalse(u.interruptLine)
        _ = u.write(offset: IER, value: 0x02)
        XCTAssertTrue(u.interruptLine)
        XCTAssertTrue(u.interruptLine, "reading the line has no side effect")
        _ = u.read(offset: IIR)
        XCTAssertFalse(u.interruptLine)
    }

    func testLoopbackDisconnectsInterruptLine() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x02)
        _ = u.write(offset: MCR, value: 0x18)  // LOOP | OUT2
        XCTAssertFalse(u.interruptLine, "OUT2 pin forced inactive in loopback")
        XCTAssertEqual(u.read(offset: IIR), 0x02, "the interrupt is still identified")
        _ = u.write(offset: MCR, value: 0x08)
        _ = u.write(offset: THR, value: 0x00)
        XCTAssertTrue(u.interruptLine)
    }

    // MARK: Loopback

    func testLoopbackTHRWriteGoesToReceiver() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x10)
        XCTAssertNil(u.write(offset: THR, value: 0x78))
        XCTAssertEqual(u.read(offset: LSR), 0x61)
        XCTAssertEqual(u.read(offset: RBR), 0x78)
        XCTAssertNil(u.write(offset: THR, value: 0x01))
        XCTAssertNil(u.write(offset: THR, value: 0x02))
        XCTAssertEqual(u.read(offset: LSR), 0x63, "second byte overran the holding register")
        XCTAssertEqual(u.read(offset: RBR), 0x02)
        _ = u.write(offset: MCR, value: 0x00)
        XCTAssertEqual(u.write(offset: THR, value: 0x79), 0x79, "back to the host")
    }

    func testLoopbackWithFIFO() {
        var u = fifoUART(trigger: 0x40, ier: 0x01)
        _ = u.write(offset: MCR, value: 0x10)
        for i in 0..<16 { XCTAssertNil(u.write(offset: THR, value: UInt8(i))) }
        XCTAssertNil(u.write(offset: THR, value: 0xFF))
        XCTAssertEqual(u.read(offset: LSR) & 0x03, 0x03)
        XCTAssertEqual(u.read(offset: IIR), 0xC4)
        for i in 0..<16 { XCTAssertEqual(u.read(offset: RBR), UInt8(i)) }
    }

    func testLoopbackMSRMirrorsMCR() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x10)
        XCTAssertEqual(u.read(offset: MSR), 0x0B, "CTS, DSR, DCD dropped: DCTS | DDSR | DDCD")
        XCTAssertEqual(u.read(offset: MSR), 0x00, "deltas cleared by the read")

        let cases: [(mcr: UInt8, lines: UInt8)] = [
            (0x01, 0x20),  // DTR  -> DSR
            (0x02, 0x10),  // RTS  -> CTS
            (0x04, 0x40),  // OUT1 -> RI
            (0x08, 0x80),  // OUT2 -> DCD
            (0x0F, 0xF0),
            (0x0A, 0x90),  // Linux's loopback probe expects 0x90
            (0x00, 0x00),
        ]
        for (mcr, lines) in cases {
            _ = u.write(offset: MCR, value: 0x10 | mcr)
            XCTAssertEqual(u.read(offset: MSR) & 0xF0, lines, "MCR \(mcr)")
            XCTAssertEqual(u.read(offset: MCR), 0x10 | mcr)
        }
    }

    func testLoopbackDeltaBits() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x10)
        _ = u.read(offset: MSR)
        _ = u.write(offset: MCR, value: 0x12)  // RTS
        XCTAssertEqual(u.read(offset: MSR), 0x11, "CTS | DCTS")
        _ = u.write(offset: MCR, value: 0x13)  // + DTR
        XCTAssertEqual(u.read(offset: MSR), 0x32, "CTS | DSR | DDSR")
        _ = u.write(offset: MCR, value: 0x1B)  // + OUT2
        XCTAssertEqual(u.read(offset: MSR), 0xB8, "DDCD")
        _ = u.write(offset: MCR, value: 0x1B)
        XCTAssertEqual(u.read(offset: MSR), 0xB0, "no change, no delta")
        _ = u.write(offset: MCR, value: 0x10)
        XCTAssertEqual(u.read(offset: MSR), 0x0B, "falling edges set DCTS, DDSR, DDCD")
    }

    func testDeltasAccumulateUntilRead() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x10)
        _ = u.read(offset: MSR)
        _ = u.write(offset: MCR, value: 0x12)
        _ = u.write(offset: MCR, value: 0x10)
        XCTAssertEqual(u.read(offset: MSR), 0x01, "CTS back low, DCTS still latched")
    }

    func testTERIOnlyOnRIFallingEdge() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x10)
        _ = u.read(offset: MSR)
        _ = u.write(offset: MCR, value: 0x14)  // OUT1 -> RI rises
        XCTAssertEqual(u.read(offset: MSR), 0x40, "rising RI: no TERI")
        _ = u.write(offset: MCR, value: 0x10)  // RI falls
        XCTAssertEqual(u.read(offset: MSR), 0x04, "TERI")
        XCTAssertEqual(u.read(offset: MSR), 0x00)
    }

    func testLeavingLoopbackRestoresNoModemLines() {
        var u = UART16550()
        _ = u.write(offset: MCR, value: 0x10)
        _ = u.read(offset: MSR)
        _ = u.write(offset: MCR, value: 0x03)
        XCTAssertEqual(u.read(offset: MSR), 0xBB, "lines back up, deltas latched")
        XCTAssertEqual(u.read(offset: MSR), 0xB0)
    }

    func testMCROutsideLoopbackDoesNotTouchMSR() {
        var u = UART16550()
        for value in [UInt8(0x00), 0x01, 0x02, 0x04, 0x08, 0x0F] {
            _ = u.write(offset: MCR, value: value)
            XCTAssertEqual(u.read(offset: MSR), 0xB0)
        }
    }

    func testModemStatusInterrupt() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x08)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        _ = u.write(offset: MCR, value: 0x18)  // LOOP | OUT2
        XCTAssertEqual(u.read(offset: IIR), 0x00)
        XCTAssertEqual(u.read(offset: IIR), 0x00, "IIR read does not clear modem status")
        _ = u.read(offset: MSR)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        _ = u.write(offset: MCR, value: 0x08)  // leave loopback: CTS, DSR rise
        XCTAssertEqual(u.read(offset: IIR), 0x00)
        XCTAssertTrue(u.interruptLine)
        XCTAssertEqual(u.read(offset: MSR), 0xB3)
        XCTAssertFalse(u.interruptLine)
    }

    func testModemStatusNeedsEDSSI() {
        var u = UART16550()
        _ = u.write(offset: IER, value: 0x05)
        _ = u.write(offset: MCR, value: 0x10)
        XCTAssertEqual(u.read(offset: IIR), 0x01)
        _ = u.write(offset: IER, value: 0x08)
        XCTAssertEqual(u.read(offset: IIR), 0x00, "latched deltas show once enabled")
    }

    // MARK: Shared memory, restore and sanitize

    func testSurvivesRoundTripThroughRawMemory() {
        var u = fifoUART(trigger: 0x80, ier: 0x0F)
        _ = u.write(offset: SCR, value: 0x5C)
        for i in 0..<11 { u.receive(UInt8(100 + i)) }
        _ = u.read(offset: RBR)
        _ = u.read(offset: RBR)

        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        page.storeBytes(of: u, as: UART16550.self)
        var restored = page.load(as: UART16550.self)
        restored.sanitize()

        XCTAssertEqual(bytes(of: restored), bytes(of: u))
        XCTAssertEqual(restored.rxCount, 9)
        XCTAssertEqual(restored.read(offset: SCR), 0x5C)
        XCTAssertEqual(restored.read(offset: IIR), 0xC4)
        for i in 2..<11 { XCTAssertEqual(restored.read(offset: RBR), UInt8(100 + i)) }
    }

    func testSanitizeLeavesReachableStatesUnchanged() {
        var rng = SplitMix64(state: 0x1234_5678)
        var u = UART16550()
        for step in 0..<5000 {
            let offset = UInt8.random(in: 0...8, using: &rng)
            let value = UInt8.random(in: 0...255, using: &rng)
            switch UInt8.random(in: 0...5, using: &rng) {
            case 0, 1: _ = u.write(offset: offset, value: value)
            case 2: _ = u.read(offset: offset)
            case 3, 4: u.receive(value)
            default: u.receiveIdle()
            }
            var copy = u
            copy.sanitize()
            XCTAssertEqual(bytes(of: copy), bytes(of: u), "step \(step)")
            if step % 250 == 0 { checkInvariants(u) }
        }
    }

    func testSanitizeRepairsAllOnesGarbage() {
        var u = UART16550()
        withUnsafeMutableBytes(of: &u) { raw in
            for i in raw.indices { raw[i] = 0xFF }
        }
        u.sanitize()
        checkInvariants(u)
        XCTAssertEqual(u.read(offset: LCR), 0xFF, "LCR has no reserved bits")
        XCTAssertEqual(u.read(offset: DLM), 0xFF, "DLAB set: offset 1 is DLM")
        _ = u.write(offset: LCR, value: 0x03)
        XCTAssertEqual(u.read(offset: IER), 0x0F)
        XCTAssertEqual(u.read(offset: MCR), 0x1F)
        XCTAssertEqual(u.read(offset: LSR) & 0x60, 0x60)
        var rng = SplitMix64(state: 1)
        exerciseEverything(&u, rng: &rng)
        checkInvariants(u)
    }

    func testSanitizeRepairsRandomGarbage() {
        var rng = SplitMix64(state: 0xDEAD_BEEF)
        for _ in 0..<2000 {
            var u = UART16550()
            withUnsafeMutableBytes(of: &u) { raw in
                for i in raw.indices { raw[i] = UInt8.random(in: 0...255, using: &rng) }
            }
            u.sanitize()
            checkInvariants(u)
            var again = u
            again.sanitize()
            XCTAssertEqual(bytes(of: again), bytes(of: u), "sanitize is idempotent")
            exerciseEverything(&u, rng: &rng)
            checkInvariants(u)
        }
    }

    func testSanitizedGarbageStillWorksAsAUART() {
        var u = UART16550()
        withUnsafeMutableBytes(of: &u) { raw in
            for i in raw.indices { raw[i] = UInt8(truncatingIfNeeded: i &* 37 &+ 11) }
        }
        u.sanitize()
        // A guest re-initialising the port gets a normal UART back.
        _ = u.write(offset: LCR, value: 0x80)
        _ = u.write(offset: DLL, value: 1)
        _ = u.write(offset: DLM, value: 0)
        _ = u.write(offset: LCR, value: 0x03)
        _ = u.write(offset: FCR, value: 0xC7)
        _ = u.write(offset: MCR, value: 0x0B)
        _ = u.write(offset: IER, value: 0x00)
        _ = u.read(offset: LSR)
        _ = u.read(offset: MSR)
        _ = u.read(offset: IIR)
        XCTAssertEqual(u.divisor, 1)
        XCTAssertEqual(u.read(offset: LSR), 0x60)
        XCTAssertEqual(u.read(offset: MSR), 0xB0)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
        XCTAssertEqual(u.write(offset: THR, value: 0x48), 0x48)
        _ = u.write(offset: IER, value: 0x01)
        u.receive(0x69)
        u.receiveIdle()
        XCTAssertEqual(u.read(offset: IIR), 0xCC)
        XCTAssertEqual(u.read(offset: RBR), 0x69)
        XCTAssertEqual(u.read(offset: IIR), 0xC1)
    }

    func testUnsanitizedGarbageDoesNotTrap() {
        // sanitize() is the contract, but the methods themselves mask every index as well.
        var rng = SplitMix64(state: 42)
        for pattern in 0..<600 {
            var u = UART16550()
            withUnsafeMutableBytes(of: &u) { raw in
                for i in raw.indices {
                    raw[i] = pattern < 3 ? [0x00, 0xFF, 0x80][pattern] : UInt8.random(in: 0...255, using: &rng)
                }
            }
            exerciseEverything(&u, rng: &rng)
            u.sanitize()
            checkInvariants(u)
        }
    }

    func testFuzzedOperationsKeepInvariants() {
        var rng = SplitMix64(state: 7)
        var u = UART16550()
        var sent = 0
        for step in 0..<20000 {
            let offset = UInt8.random(in: 0...7, using: &rng)
            let value = UInt8.random(in: 0...255, using: &rng)
            switch UInt8.random(in: 0...9, using: &rng) {
            case 0...2:
                if u.write(offset: offset, value: value) != nil { sent += 1 }
            case 3...5: _ = u.read(offset: offset)
            case 6...7:
                let room = u.canReceive
                XCTAssertEqual(u.receive(value), room, "step \(step)")
            case 8: u.receiveIdle()
            default:
                let line = u.interruptLine
                var probe = u
                let iir = probe.read(offset: IIR)
                let mcr = probe.read(offset: MCR)
                XCTAssertEqual(line, iir & 0x01 == 0 && mcr & 0x18 == 0x08, "step \(step)")
            }
            if step % 1000 == 0 { checkInvariants(u) }
        }
        XCTAssertGreaterThan(sent, 0)
    }
}

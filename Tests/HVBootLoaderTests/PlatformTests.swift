import HVBootLoader
import XCTest

/// The PC platform pieces of the bios device: PCI configuration space of the i440FX/PIIX3/PIIX4
/// functions, the i8042 keyboard controller, and the ACPI PM block.
final class PlatformTests: XCTestCase {
    // MARK: PCI configuration space (the core forwards every byte but the command register and BARs)

    private func config(_ pci: inout PCIHostBridge, _ function: PCIHostBridge.Function, register: Int, size: Int = 4) -> UInt32 {
        pci.readConfig(function, register: register, size: size)
    }

    private func setConfig(_ pci: inout PCIHostBridge, _ function: PCIHostBridge.Function, register: Int, size: Int, value: UInt32) {
        pci.writeConfig(function, register: register, size: size, value: value)
    }

    func testFunctionsAndTheirIdentities() {
        var pci = PCIHostBridge()
        XCTAssertEqual(PCIHostBridge.Function.allCases.map(\.bdf), [0x00, 0x08, 0x0B], "00:00.0, 00:01.0, 00:01.3")
        XCTAssertEqual(config(&pci, .host, register: 0), 0x1237_8086, "i440FX host bridge")
        XCTAssertEqual(config(&pci, .isa, register: 0), 0x7000_8086, "PIIX3 ISA bridge")
        XCTAssertEqual(config(&pci, .pm, register: 0), 0x7113_8086, "PIIX4 power management")
        XCTAssertEqual(config(&pci, .host, register: 8) >> 8, 0x06_0000, "class: host bridge")
        XCTAssertEqual(config(&pci, .isa, register: 8) >> 8, 0x06_0100, "class: ISA bridge")
        XCTAssertEqual(config(&pci, .pm, register: 8) >> 8, 0x06_8000, "class: other bridge")
        XCTAssertEqual(config(&pci, .isa, register: 0xC) >> 16 & 0x80, 0x80, "device 1 is multi-function")
        XCTAssertEqual(config(&pci, .host, register: 2, size: 2), 0x1237, "word reads at an offset")
        XCTAssertEqual(config(&pci, .host, register: 300, size: 1), 0xFF, "past the 256-byte space")
    }

    func testPAMRegistersHoldWhatFirmwareWrites() {
        var pci = PCIHostBridge()
        setConfig(&pci, .host, register: 0x5A, size: 1, value: 0x33)
        XCTAssertEqual(config(&pci, .host, register: 0x5A, size: 1), 0x33)
        setConfig(&pci, .host, register: 0x00, size: 4, value: 0)  // IDs are read-only
        XCTAssertEqual(config(&pci, .host, register: 0), 0x1237_8086)
    }

    func testPowerManagementFunctionAsSeaBIOSProgramsIt() {
        var pci = PCIHostBridge()
        // SeaBIOS's piix4_pm_config_setup.
        setConfig(&pci, .pm, register: 0x3C, size: 1, value: 9)
        setConfig(&pci, .pm, register: 0x40, size: 4, value: 0x0601)
        setConfig(&pci, .pm, register: 0x80, size: 1, value: 0x01)
        setConfig(&pci, .pm, register: 0x90, size: 4, value: 0x0701)
        XCTAssertEqual(config(&pci, .pm, register: 0x3C, size: 1), 9)
        XCTAssertEqual(config(&pci, .pm, register: 0x3D, size: 1), 1, "INTA#")
        XCTAssertEqual(config(&pci, .pm, register: 0x40), UInt32(ACPIPowerManagement.base) | 1)
        XCTAssertEqual(config(&pci, .pm, register: 0x80, size: 1), 1)
        XCTAssertEqual(config(&pci, .pm, register: 0x90), 0x0701)
        // PMBA does not move: hv decodes the block at a fixed base.
        setConfig(&pci, .pm, register: 0x40, size: 4, value: 0xB001)
        XCTAssertEqual(config(&pci, .pm, register: 0x40), 0x0601)
        // DEVACTB.APMC_EN set: SeaBIOS must find SMM already set up, or it waits for an SMI forever.
        XCTAssertEqual(config(&pci, .pm, register: 0x58) & (1 << 25), 1 << 25)
    }

    func testResetControlRegister() {
        var pci = PCIHostBridge()
        XCTAssertFalse(pci.writeResetControl(0x02), "SYS_RST alone only selects the reset kind")
        XCTAssertEqual(pci.resetControl, 0x02)
        XCTAssertTrue(pci.writeResetControl(0x06), "RST_CPU triggers")
        XCTAssertTrue(pci.writeResetControl(0x04))
    }

    // MARK: i8042

    func testControllerSelfTestsAndCommandByte() {
        var kbc = I8042()
        XCTAssertEqual(kbc.readStatus() & 0x01, 0, "nothing to read at power-on")
        XCTAssertEqual(kbc.writeCommand(0xAA), .none)
        XCTAssertEqual(kbc.readStatus() & 0x09, 0x09, "output full; last write was a command")
        XCTAssertEqual(kbc.readData(), 0x55)
        XCTAssertEqual(kbc.readStatus() & 0x01, 0)
        _ = kbc.writeCommand(0xAB)
        XCTAssertEqual(kbc.readData(), 0x00)
        _ = kbc.writeCommand(0x60)
        _ = kbc.writeData(0x61)
        XCTAssertEqual(kbc.readStatus() & 0x08, 0, "last write was data")
        _ = kbc.writeCommand(0x20)
        XCTAssertEqual(kbc.readData(), 0x61)
        XCTAssertEqual(kbc.commandByte, 0x61)
        _ = kbc.writeCommand(0xD0)
        XCTAssertEqual(kbc.readData() & 0x03, 0x03, "output port: reset line high, A20 on")
        _ = kbc.writeCommand(0xA9)
        XCTAssertNotEqual(kbc.readData(), 0x00, "no mouse port")
    }

    func testKeyboardAnswersResetIdentifyAndArgumentCommands() {
        var kbc = I8042()
        _ = kbc.writeData(0xFF)
        XCTAssertEqual([kbc.readData(), kbc.readData()], [0xFA, 0xAA], "ack, then self-test passed")
        _ = kbc.writeData(0xF2)
        XCTAssertEqual([kbc.readData(), kbc.readData(), kbc.readData()], [0xFA, 0xAB, 0x41], "MF2, translated")
        _ = kbc.writeData(0xF0)
        _ = kbc.writeData(0x00)
        XCTAssertEqual([kbc.readData(), kbc.readData(), kbc.readData()], [0xFA, 0xFA, 0x02], "scan-code set query")
        _ = kbc.writeData(0xED)
        _ = kbc.writeData(0x07)
        XCTAssertEqual([kbc.readData(), kbc.readData()], [0xFA, 0xFA], "LEDs and their argument both acked")
        _ = kbc.writeData(0xEE)
        XCTAssertEqual(kbc.readData(), 0xEE)
        _ = kbc.writeData(0x42)
        XCTAssertEqual(kbc.readData(), 0xFE, "unknown command: resend")
        XCTAssertEqual(kbc.readData(), 0xFE, "an empty buffer reads the last byte again")
        XCTAssertEqual(kbc.readStatus() & 0x01, 0)
    }

    func testKeyboardInterruptLevelFollowsTheBuffer() {
        var kbc = I8042()
        XCTAssertFalse(kbc.interruptLine)
        _ = kbc.writeData(0xF4)
        XCTAssertTrue(kbc.interruptLine, "command byte 0x45 enables the keyboard IRQ")
        _ = kbc.readData()
        XCTAssertFalse(kbc.interruptLine)
        _ = kbc.writeCommand(0x60)
        _ = kbc.writeData(0x44)  // IRQ off
        _ = kbc.writeData(0xF4)
        XCTAssertFalse(kbc.interruptLine)
        XCTAssertEqual(kbc.readStatus() & 0x01, 0x01)
    }

    func testBufferIsBoundedWhenTheGuestNeverReads() {
        var kbc = I8042()
        for _ in 0..<100 { _ = kbc.writeData(0xFF) }
        var read = 0
        while kbc.readStatus() & 0x01 != 0 && read < 100 {
            _ = kbc.readData()
            read += 1
        }
        XCTAssertEqual(read, 8)
    }

    func testResetThroughPulseAndOutputPort() {
        var kbc = I8042()
        XCTAssertEqual(kbc.writeCommand(0xFE), .reset, "pulse bit 0: the CPU reset line")
        XCTAssertEqual(kbc.writeCommand(0xFF), .none, "pulse nothing")
        XCTAssertEqual(kbc.writeCommand(0xFD), .none, "pulse bit 1 only")
        _ = kbc.writeCommand(0xD1)
        XCTAssertEqual(kbc.writeData(0x03), .none, "output port with the reset line high")
        _ = kbc.writeCommand(0xD1)
        XCTAssertEqual(kbc.writeData(0x02), .reset, "output port with the reset line low")
    }

    // MARK: ACPI PM

    func testSleepEnableWithS5PowersOff() {
        var pm = ACPIPowerManagement()
        XCTAssertEqual(pm.read(offset: 4, size: 2, nowNanoseconds: 0) & 1, 1, "SCI_EN: always in ACPI mode")
        XCTAssertEqual(pm.write(offset: 4, size: 2, value: 0x0001), .none)
        XCTAssertEqual(pm.write(offset: 4, size: 2, value: 0x2000), .powerOff, "SLP_TYP 0 | SLP_EN")
        XCTAssertEqual(pm.write(offset: 4, size: 2, value: 0x0400 | 0x2000), .unsupportedSleep(type: 1))
        XCTAssertEqual(pm.read(offset: 4, size: 2, nowNanoseconds: 0) & 0x2000, 0, "SLP_EN reads 0")
        XCTAssertEqual(pm.write(offset: 5, size: 1, value: 0x20), .powerOff, "a byte write to the high half works too")
    }

    func testStatusIsWriteOneToClearAndEnableHolds() {
        var pm = ACPIPowerManagement()
        _ = pm.write(offset: 2, size: 2, value: 0x0121)
        XCTAssertEqual(pm.read(offset: 2, size: 2, nowNanoseconds: 0), 0x0121)
        XCTAssertEqual(pm.read(offset: 0, size: 2, nowNanoseconds: 0), 0)
        _ = pm.write(offset: 0, size: 2, value: 0xFFFF)
        XCTAssertEqual(pm.read(offset: 0, size: 2, nowNanoseconds: 0), 0)
    }

    func testPMTimerCountsAt3579545HzIn24Bits() {
        let pm = ACPIPowerManagement()
        XCTAssertEqual(pm.read(offset: 8, size: 4, nowNanoseconds: 0), 0)
        XCTAssertEqual(pm.read(offset: 8, size: 4, nowNanoseconds: 1_000_000_000), 3_579_545)
        XCTAssertEqual(pm.read(offset: 8, size: 4, nowNanoseconds: 1_000_000), 3_579)
        XCTAssertEqual(ACPIPowerManagement.timer(nowNanoseconds: 5_000_000_000), UInt32(5 * 3_579_545) & 0xFF_FFFF, "wraps at 24 bits")
        // Hours of uptime do not overflow the arithmetic.
        let day: UInt64 = 86_400_000_000_000 * 365
        XCTAssertEqual(ACPIPowerManagement.timer(nowNanoseconds: day), UInt32(truncatingIfNeeded: (day / 1_000_000_000) * 3_579_545) & 0xFF_FFFF)
        XCTAssertEqual(pm.read(offset: 8, size: 1, nowNanoseconds: 1_000_000_000), 3_579_545 & 0xFF, "byte reads")
    }
}

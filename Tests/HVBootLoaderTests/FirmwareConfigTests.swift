import HVBootLoader
import XCTest

final class FirmwareConfigTests: XCTestCase {
    // MARK: Traditional interface

    func testSignatureAndIDReadByteByByteThroughThePorts() {
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x1000)
        config.writePort(offset: 0, size: 2, value: 0x0000, memory: ram)
        XCTAssertEqual((0..<4).map { _ in config.readPort(offset: 1, size: 1) }, [0x51, 0x45, 0x4D, 0x55])  // "QEMU"
        XCTAssertEqual(config.readPort(offset: 1, size: 1), 0, "past the end")

        config.writePort(offset: 0, size: 2, value: 0x0001, memory: ram)
        XCTAssertEqual((0..<4).map { _ in config.readPort(offset: 1, size: 1) }, [0x03, 0, 0, 0], "traditional + DMA")
        // An 8-bit read of 0x510 also reads the data byte, as in QEMU.
        config.writePort(offset: 0, size: 2, value: 0x0000, memory: ram)
        XCTAssertEqual(config.readPort(offset: 0, size: 1), 0x51)
        XCTAssertTrue(ram.accesses.isEmpty)
    }

    func testDirectWriteSelectorAndReadData() {
        var config = standardConfig()
        config.writeSelector(0x0000)
        XCTAssertEqual((0..<6).map { _ in config.readData() }, [0x51, 0x45, 0x4D, 0x55, 0, 0])
    }

    func testFileDirectoryLayoutIsExact() {
        var config = FirmwareConfig()
        XCTAssertTrue(config.addFile("b", [1, 2, 3]))
        XCTAssertTrue(config.addFile("etc/x", []))
        XCTAssertTrue(config.addFile("a", [9]))
        var expected: [UInt8] = [0, 0, 0, 3]
        expected += [0, 0, 0, 1, 0x00, 0x20, 0, 0] + [0x61] + [UInt8](repeating: 0, count: 55)
        expected += [0, 0, 0, 3, 0x00, 0x21, 0, 0] + [0x62] + [UInt8](repeating: 0, count: 55)
        expected += [0, 0, 0, 0, 0x00, 0x22, 0, 0] + [0x65, 0x74, 0x63, 0x2F, 0x78] + [UInt8](repeating: 0, count: 51)
        XCTAssertEqual(expected.count, 4 + 3 * 64)
        XCTAssertEqual(readItem(&config, FirmwareConfig.Key.fileDirectory, count: expected.count + 8),
                       expected + [UInt8](repeating: 0, count: 8))
        XCTAssertEqual(config.selector(ofFile: "a"), 0x20)
        XCTAssertEqual(config.selector(ofFile: "etc/x"), 0x22)
        XCTAssertNil(config.selector(ofFile: "c"))
    }

    func testEmptyConfigurationHasAnEmptyDirectory() {
        var config = FirmwareConfig()
        XCTAssertEqual(readItem(&config, FirmwareConfig.Key.fileDirectory, count: 6), [0, 0, 0, 0, 0, 0])
        XCTAssertEqual(readItem(&config, FirmwareConfig.Key.signature, count: 4), [0, 0, 0, 0])
    }

    func testFileNamesAreValidatedAndSelectorsFollowSortedOrder() {
        var config = FirmwareConfig()
        let longest = String(repeating: "n", count: 55)
        XCTAssertTrue(config.addFile(longest, [7]))
        XCTAssertFalse(config.addFile(String(repeating: "n", count: 56), [7]), "56 bytes leave no room for the NUL")
        XCTAssertFalse(config.addFile(longest, [8]), "duplicate")
        XCTAssertFalse(config.addFile("", [1]), "empty")
        XCTAssertFalse(config.addFile("a\u{0}b", [1]), "embedded NUL")
        XCTAssertFalse(config.addFile(String(repeating: "é", count: 28), []), "56 UTF-8 bytes")
        XCTAssertEqual(config.selector(ofFile: longest), 0x20)
        XCTAssertTrue(config.addFile("etc/a", [1]))  // Sorts first: renumbers the 'n…' file.
        XCTAssertEqual(config.selector(ofFile: "etc/a"), 0x20)
        XCTAssertEqual(config.selector(ofFile: longest), 0x21)

        let directory = readItem(&config, FirmwareConfig.Key.fileDirectory, count: 4 + 2 * 64)
        let entry = Array(directory[(4 + 64)..<(4 + 128)])
        XCTAssertEqual(Array(entry[0..<8]), [0, 0, 0, 1, 0x00, 0x21, 0, 0])
        XCTAssertEqual(Array(entry[8..<63]), Array(longest.utf8))
        XCTAssertEqual(entry[63], 0)
        XCTAssertEqual(readItem(&config, 0x21, count: 2), [7, 0])
    }

    func testReadingAFileBySelector() {
        var config = FirmwareConfig()
        config.addFile("opt/one", [1, 2, 3])
        config.addFile("opt/two", Array(0x10..<0x30))
        guard let selector = directoryLookup(&config, "opt/two") else { return XCTFail("opt/two is not in the directory") }
        XCTAssertEqual(selector.select, 0x21)
        XCTAssertEqual(selector.size, 0x20)
        XCTAssertEqual(readItem(&config, selector.select, count: 0x20), Array(0x10..<0x30))
    }

    func testReadingPastTheEndGivesZerosAndUnknownKeysAreEmpty() {
        var config = FirmwareConfig()
        config.addFile("f", [0xAA, 0xBB])
        XCTAssertEqual(readItem(&config, 0x20, count: 6), [0xAA, 0xBB, 0, 0, 0, 0])
        XCTAssertEqual(config.cursor.offset, 2, "the offset stops at the end")
        XCTAssertEqual(readItem(&config, 0x21, count: 3), [0, 0, 0], "no file there")
        XCTAssertEqual(readItem(&config, 0x7FFF, count: 3), [0, 0, 0])
        XCTAssertEqual(readItem(&config, 0xFFFF, count: 3), [0, 0, 0])
    }

    func testSelectorSwitchResetsTheOffset() {
        var config = FirmwareConfig()
        config.addFile("f", [1, 2, 3, 4])
        config.setItem(0x0005, [5, 6])
        config.writeSelector(0x20)
        XCTAssertEqual([config.readData(), config.readData()], [1, 2])
        config.writeSelector(0x05)
        XCTAssertEqual(config.readData(), 5)
        config.writeSelector(0x20)
        XCTAssertEqual(config.cursor.offset, 0)
        XCTAssertEqual(config.readData(), 1)
        config.writeSelector(0x20)  // Re-selecting the same key rewinds too.
        XCTAssertEqual(config.readData(), 1)
    }

    func testSetItemReplacesAndLeavesDirectoryAndFileKeysAlone() {
        var config = FirmwareConfig()
        config.addFile("f", [1])
        config.setItem(0x0005, [1, 0])
        config.setItem(0x0005, [4, 0])
        config.setItem(FirmwareConfig.Key.irq0Override, [1])
        config.setItem(FirmwareConfig.Key.fileDirectory, [0xEE])
        config.setItem(0x0020, [0xEE])
        config.setItem(0x0100, [0xEE])
        XCTAssertEqual(readItem(&config, 0x0005, count: 2), [4, 0])
        XCTAssertEqual(readItem(&config, 0x8002, count: 2), [1, 0])
        XCTAssertEqual(readItem(&config, 0x0019, count: 4), [0, 0, 0, 1])
        XCTAssertEqual(readItem(&config, 0x0020, count: 2), [1, 0])
        XCTAssertEqual(readItem(&config, 0x0100, count: 1), [0])
    }

    func testCursorSurvivesARebuild() {
        var config = standardConfig()
        config.writeSelector(0x0000)
        _ = config.readData()
        _ = config.readData()
        let saved = config.cursor
        XCTAssertEqual(saved.selector, 0)
        XCTAssertEqual(saved.offset, 2)

        var restarted = standardConfig()
        restarted.cursor = saved
        XCTAssertEqual([restarted.readData(), restarted.readData(), restarted.readData()], [0x4D, 0x55, 0])

        restarted.cursor = (selector: 0x0000, offset: UInt32.max)  // A hostile value reads zeros, never traps.
        XCTAssertEqual(restarted.readData(), 0)
        XCTAssertEqual(restarted.cursor.offset, UInt32.max)
    }

    func testUnclaimedPortsAndInvalidAccessesAreHarmless() {
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x1000)
        config.writeSelector(0x0000)
        XCTAssertEqual(config.readPort(offset: 1, size: 2), 0xFFFF, "the data port is 8-bit")
        XCTAssertEqual(config.readPort(offset: 2, size: 1), 0xFF)
        XCTAssertEqual(config.readPort(offset: 3, size: 4), 0xFFFF_FFFF)
        XCTAssertEqual(config.readPort(offset: 12, size: 1), 0xFF)
        XCTAssertEqual(config.readPort(offset: -1, size: 1), 0xFF)
        config.writePort(offset: 1, size: 1, value: 0x42, memory: ram)  // Data writes are ignored.
        config.writePort(offset: 0, size: 1, value: 0x01, memory: ram)  // An 8-bit selector write is not a select.
        config.writePort(offset: 0, size: 4, value: 0x01, memory: ram)
        XCTAssertEqual(config.readPort(offset: 1, size: 1), 0x51, "still key 0 at offset 0")
        XCTAssertTrue(ram.accesses.isEmpty)
    }

    // MARK: DMA register

    func testDMASignatureReads() {
        var config = FirmwareConfig()
        XCTAssertEqual(config.readDMARegister(offset: 4, size: 8).byteSwapped, FirmwareConfig.dmaSignature)
        XCTAssertEqual(littleEndianBytes(config.readDMARegister(offset: 4, size: 8), count: 8), Array("QEMU CFG".utf8))
        XCTAssertEqual(UInt32(config.readDMARegister(offset: 4, size: 4)).byteSwapped, 0x5145_4D55)
        XCTAssertEqual(UInt32(config.readDMARegister(offset: 8, size: 4)).byteSwapped, 0x2043_4647)
        XCTAssertEqual(littleEndianBytes(config.readDMARegister(offset: 8, size: 4), count: 4), Array(" CFG".utf8))
        XCTAssertEqual(config.readDMARegister(offset: 4, size: 1), 0x51)
        XCTAssertEqual(config.readDMARegister(offset: 11, size: 1), 0x47)
        XCTAssertEqual(littleEndianBytes(config.readDMARegister(offset: 6, size: 2), count: 2), Array("MU".utf8))
        XCTAssertEqual(config.readPort(offset: 4, size: 4), config.readDMARegister(offset: 4, size: 4))
        // Invalid: past 0x51B, odd sizes, below 0x514.
        XCTAssertEqual(config.readDMARegister(offset: 8, size: 8), UInt64.max)
        XCTAssertEqual(config.readDMARegister(offset: 10, size: 4), 0xFFFF_FFFF)
        XCTAssertEqual(config.readDMARegister(offset: 4, size: 3), UInt64.max)
        XCTAssertEqual(config.readDMARegister(offset: 3, size: 1), 0xFF)
        XCTAssertEqual(config.readDMARegister(offset: Int.max, size: 1), 0xFF)
        XCTAssertEqual(config.readDMARegister(offset: Int.min, size: 8), UInt64.max)
    }

    // MARK: DMA transfers

    func testDMAReadOfAFileTheWaySeaBIOSIssuesIt() {
        var config = FirmwareConfig()
        config.addFile("etc/data", Array(0x40..<0x50))
        let ram = FakeGuestRAM(size: 0x4000, fill: 0xCC)
        config.writeSelector(0x20)
        placeDescriptor(in: ram, at: 0x1000, control: FirmwareConfig.DMAControl.read, length: 10, address: 0x2000)
        triggerLow(&config, descriptorAt: 0x1000, ram: ram)

        XCTAssertEqual(ram.bytes(at: 0x2000, count: 11), Array(0x40..<0x4A) + [0xCC])
        XCTAssertEqual(ram.bytes(at: 0x1000, count: 16),
                       [0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0x20, 0x00], "control cleared; length and address untouched")
        XCTAssertEqual(config.cursor.offset, 10)

        // A DMA read without select continues where the last one stopped; the tail past the end is zeros.
        placeDescriptor(in: ram, at: 0x1000, control: FirmwareConfig.DMAControl.read, length: 12, address: 0x3000)
        triggerLow(&config, descriptorAt: 0x1000, ram: ram)
        XCTAssertEqual(ram.bytes(at: 0x3000, count: 13), Array(0x4A..<0x50) + [0, 0, 0, 0, 0, 0] + [0xCC])
        XCTAssertEqual(control(in: ram, at: 0x1000), 0)
        XCTAssertEqual(config.cursor.offset, 16, "zeros past the end do not move the offset")
        XCTAssertEqual(config.readData(), 0)
    }

    func testDMAContinuesFromThePortCursor() {
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x4000)
        config.writePort(offset: 0, size: 2, value: UInt64(FirmwareConfig.Key.signature), memory: ram)
        _ = config.readPort(offset: 1, size: 1)
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.read, length: 3, address: 0x200)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(ram.bytes(at: 0x200, count: 3), Array("EMU".utf8))
    }

    func testDMASkip() {
        var config = FirmwareConfig()
        config.addFile("f", Array(0..<8))
        let ram = FakeGuestRAM(size: 0x4000, fill: 0xCC)
        config.writeSelector(0x20)
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.skip, length: 3, address: 0)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), 0)
        XCTAssertEqual(config.cursor.offset, 3)
        XCTAssertEqual(ram.bytes(at: 0, count: 4), [0xCC, 0xCC, 0xCC, 0xCC], "a skip writes nothing")
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.read, length: 2, address: 0x200)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(ram.bytes(at: 0x200, count: 2), [3, 4])

        // Skip with select: selects, rewinds, then skips.
        placeDescriptor(in: ram, at: 0x100, control: 0x0020_0000 | FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.skip,
                        length: 6, address: 0)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(config.cursor.offset, 6)
        XCTAssertEqual(config.readData(), 6)
    }

    func testDMASelect() {
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x4000, fill: 0xCC)
        config.writeSelector(0x0001)
        _ = config.readData()
        // Select + read of the signature, like SeaBIOS's qemu_cfg_read_entry.
        placeDescriptor(in: ram, at: 0x100, control: 0x0000_0000 | FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.read,
                        length: 4, address: 0x200)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(ram.bytes(at: 0x200, count: 4), Array("QEMU".utf8))
        XCTAssertEqual(control(in: ram, at: 0x100), 0)

        // Select alone (no read, write or skip) selects and rewinds.
        placeDescriptor(in: ram, at: 0x100, control: 0x0005_0000 | FirmwareConfig.DMAControl.select, length: 100, address: 0x300)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), 0)
        XCTAssertEqual(config.cursor.selector, 0x0005)
        XCTAssertEqual(config.cursor.offset, 0)
        XCTAssertEqual(ram.bytes(at: 0x300, count: 2), [0xCC, 0xCC])
        XCTAssertEqual([config.readData(), config.readData()], [2, 0], "two CPUs")
    }

    func testDMAWriteIsRefusedWithTheErrorBit() {
        var config = FirmwareConfig()
        config.addFile("f", [1, 2, 3, 4])
        let ram = FakeGuestRAM(size: 0x4000)
        ram.place([9, 9, 9, 9], at: 0x200)
        placeDescriptor(in: ram, at: 0x100, control: 0x0020_0000 | FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.write,
                        length: 4, address: 0x200)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), FirmwareConfig.DMAControl.error)
        XCTAssertEqual(config.cursor.selector, 0x20, "the select still happened")
        XCTAssertEqual(readItem(&config, 0x20, count: 4), [1, 2, 3, 4], "the item is unchanged")

        // Zero-length writes are refused too: hv's items are read-only.
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.write, length: 0, address: 0x200)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), FirmwareConfig.DMAControl.error)
        // Read takes precedence over write when both are set (QEMU's order: read, write, skip).
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.read | FirmwareConfig.DMAControl.write | 0x0020_0000 | FirmwareConfig.DMAControl.select,
                        length: 2, address: 0x200)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), 0)
        XCTAssertEqual(ram.bytes(at: 0x200, count: 4), [1, 2, 9, 9])
    }

    func testDMAWithAnOutOfRangeBufferSetsTheErrorBit() {
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x4000, fill: 0xCC)
        for address: UInt64 in [0x4000, 0x3FFE, 0x1_0000_0000, 0xFFFF_FFFF_FFFF_FFFC] {
            placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.read,
                            length: 4, address: address)
            triggerLow(&config, descriptorAt: 0x100, ram: ram)
            XCTAssertEqual(control(in: ram, at: 0x100), FirmwareConfig.DMAControl.error, "buffer at 0x\(String(address, radix: 16))")
        }
        XCTAssertEqual(ram.bytes(at: 0x3FFC, count: 4), [0xCC, 0xCC, 0xCC, 0xCC], "nothing written at the edge")
    }

    func testDMAWithAnOutOfRangeDescriptorNeverTraps() {
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x4000, fill: 0xCC)
        // Descriptor wholly outside, straddling the end, and at the very top of the address space.
        for address: UInt64 in [0x4000, 0x3FF8, 0xFFFF_FFF0, 0xFFFF_FFFF_FFFF_FFF8, UInt64.max] {
            config.writeDMARegister(offset: 4, size: 8, value: address.byteSwapped, memory: ram)
        }
        // The only access that succeeds is QEMU's error write-back to a control word that is itself in RAM.
        XCTAssertEqual(ram.accepted.map(\.address), [0x3FF8])
        XCTAssertEqual(ram.accepted.map(\.count), [4])
        XCTAssertEqual(ram.bytes(at: 0x3FF0, count: 16), [UInt8](repeating: 0xCC, count: 8) + [0, 0, 0, 1] + [0xCC, 0xCC, 0xCC, 0xCC])
        XCTAssertEqual(config.dmaAddressLatch, 0)
    }

    func testDMALengthThatWrapsTheAddressSpaceIsAnError() {
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x4000)
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.read,
                        length: 0x2000, address: 0xFFFF_FFFF_FFFF_F000)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), FirmwareConfig.DMAControl.error)
        XCTAssertEqual(ram.refused.count, 0, "refused before any guest access")
        XCTAssertEqual(config.cursor.offset, 0)
    }

    func testHugeDMALengths() {
        var config = FirmwareConfig()
        config.addFile("f", [1, 2, 3, 4])
        let ram = FakeGuestRAM(size: 0x1_0000, fill: 0xCC)
        // Read 4 GiB − 1 bytes into the last 32 KiB of RAM: the item lands, the zero fill runs off the end of RAM,
        // and the transfer ends with the error bit after a bounded amount of work.
        placeDescriptor(in: ram, at: 0x100, control: 0x0020_0000 | FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.read,
                        length: UInt32.max, address: 0x8000)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), FirmwareConfig.DMAControl.error)
        XCTAssertEqual(ram.bytes(at: 0x7FFF, count: 5), [0xCC, 1, 2, 3, 4])
        XCTAssertLessThan(ram.accesses.count, 16, "zeros go out in large chunks and stop at the first refusal")

        // A long read that fits: the item, then zeros over several chunks, and success.
        let big = FakeGuestRAM(size: 0x4_0000, fill: 0xCC)
        placeDescriptor(in: big, at: 0x100, control: 0x0020_0000 | FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.read,
                        length: 0x3_0000, address: 0x8000)
        triggerLow(&config, descriptorAt: 0x100, ram: big)
        XCTAssertEqual(control(in: big, at: 0x100), 0)
        XCTAssertEqual(big.bytes(at: 0x8000, count: 4), [1, 2, 3, 4])
        XCTAssertEqual(big.bytes(at: 0x8004, count: 0x3_0000 - 4), [UInt8](repeating: 0, count: 0x3_0000 - 4))
        XCTAssertEqual(big.bytes(at: 0x3_8000, count: 1), [0xCC])
        XCTAssertEqual(config.cursor.offset, 4)

        // A huge skip stops at the end of the item.
        placeDescriptor(in: ram, at: 0x100, control: 0x0020_0000 | FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.skip,
                        length: UInt32.max, address: 0)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), 0)
        XCTAssertEqual(config.cursor.offset, 4)
        // A huge skip after a large offset cannot overflow the 32-bit offset.
        config.cursor = (selector: 0x20, offset: 2)
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.skip, length: UInt32.max, address: 0)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(config.cursor.offset, 4)

        // A zero-length read succeeds and touches nothing but the control word.
        placeDescriptor(in: ram, at: 0x100, control: FirmwareConfig.DMAControl.read, length: 0, address: 0xFFFF_FFFF_FFFF_FFFF)
        triggerLow(&config, descriptorAt: 0x100, ram: ram)
        XCTAssertEqual(control(in: ram, at: 0x100), 0)
    }

    func testDMAAddressAbove4GiBUsesBothHalvesAndResetsAfterwards() {
        var config = standardConfig()
        let ram = FakeGuestRAM(base: 0x1_0000_0000, size: 0x1000, fill: 0xCC)
        placeDescriptor(in: ram, at: 0x1_0000_0100, control: FirmwareConfig.DMAControl.select | FirmwareConfig.DMAControl.read,
                        length: 4, address: 0x1_0000_0200)
        config.writePort(offset: 4, size: 4, value: UInt64(UInt32(1).byteSwapped), memory: ram)  // High half: no transfer yet.
        XCTAssertTrue(ram.accesses.isEmpty)
        XCTAssertEqual(config.dmaAddressLatch, 0x1_0000_0000)
        config.writePort(offset: 8, size: 4, value: UInt64(UInt32(0x100).byteSwapped), memory: ram)
        XCTAssertEqual(ram.bytes(at: 0x1_0000_0200, count: 4), Array("QEMU".utf8))
        XCTAssertEqual(control(in: ram, at: 0x1_0000_0100), 0)
        XCTAssertEqual(config.dmaAddressLatch, 0)

        // The next low-half write starts from a high half of 0: 0x100 is not in this RAM.
        ram.accesses.removeAll()
        config.writePort(offset: 8, size: 4, value: UInt64(UInt32(0x100).byteSwapped), memory: ram)
        XCTAssertEqual(ram.accesses.first?.address, 0x100)
        XCTAssertTrue(ram.accepted.isEmpty)

        // One 8-byte write sets the whole address and starts the transfer.
        placeDescriptor(in: ram, at: 0x1_0000_0100, control: FirmwareConfig.DMAControl.select | 0x0001_0000 | FirmwareConfig.DMAControl.read,
                        length: 4, address: 0x1_0000_0300)
        config.writeDMARegister(offset: 4, size: 8, value: UInt64(0x1_0000_0100).byteSwapped, memory: ram)
        XCTAssertEqual(ram.bytes(at: 0x1_0000_0300, count: 4), [3, 0, 0, 0])

        // Other sizes and offsets do nothing.
        ram.accesses.removeAll()
        for (offset, size) in [(4, 2), (4, 1), (5, 4), (6, 2), (8, 8), (8, 2), (9, 1), (11, 1), (12, 4)] {
            config.writeDMARegister(offset: offset, size: size, value: 0x0001_0000_0000_0000, memory: ram)
        }
        XCTAssertTrue(ram.accesses.isEmpty)
        XCTAssertEqual(config.dmaAddressLatch, 0)
    }

    // MARK: Standard items and e820

    func testStandardItems() {
        var config = FirmwareConfig.standard(ramBelow4G: 0xC000_0000, ramAbove4G: 0xC000_0000, cpus: 4, bootMenu: false,
                                             bootFailWaitMilliseconds: 5000, bootOrder: "")
        XCTAssertEqual(readItem(&config, 0x0002, count: 17), [UInt8](repeating: 0, count: 17))
        XCTAssertEqual(readItem(&config, 0x0003, count: 8), [0, 0, 0, 0x80, 1, 0, 0, 0], "6 GiB")
        XCTAssertEqual(readItem(&config, 0x0004, count: 3), [1, 0, 0])
        XCTAssertEqual(readItem(&config, 0x0005, count: 3), [4, 0, 0])
        XCTAssertEqual(readItem(&config, 0x000F, count: 3), [4, 0, 0])
        XCTAssertEqual(readItem(&config, 0x000E, count: 3), [0, 0, 0])

        XCTAssertEqual(directoryNames(&config), ["bootorder", "etc/acpi/rsdp", "etc/acpi/tables", "etc/boot-fail-wait", "etc/e820",
                                                 "etc/show-boot-menu", "etc/smbios/smbios-anchor", "etc/smbios/smbios-tables",
                                                 "etc/table-loader"])
        XCTAssertEqual(readFile(&config, "bootorder"), [])
        XCTAssertEqual(readFile(&config, "etc/boot-fail-wait"), [0x88, 0x13, 0, 0])
        XCTAssertEqual(readFile(&config, "etc/show-boot-menu"), [0, 0])
        XCTAssertEqual(readFile(&config, "etc/e820")?.count, 7 * 20)

        var withMenu = FirmwareConfig.standard(ramBelow4G: 0x1000_0000, ramAbove4G: 0, cpus: 1, bootMenu: true,
                                               bootFailWaitMilliseconds: UInt32.max, bootOrder: "/rom@genroms/linuxboot.bin\nHALT")
        XCTAssertEqual(readItem(&withMenu, 0x000E, count: 2), [1, 0])
        XCTAssertEqual(readFile(&withMenu, "etc/show-boot-menu"), [1, 0])
        XCTAssertEqual(readFile(&withMenu, "etc/boot-fail-wait"), [0xFF, 0xFF, 0xFF, 0xFF])
        XCTAssertEqual(readFile(&withMenu, "bootorder"), Array("/rom@genroms/linuxboot.bin\nHALT".utf8) + [0])
        XCTAssertEqual(readItem(&withMenu, 0x0003, count: 8), [0, 0, 0, 0x10, 0, 0, 0, 0])

        var clamped = FirmwareConfig.standard(ramBelow4G: 0, ramAbove4G: 0, cpus: -3, bootMenu: false,
                                              bootFailWaitMilliseconds: 0, bootOrder: "")
        XCTAssertEqual(readItem(&clamped, 0x0005, count: 2), [1, 0])
        var many = FirmwareConfig.standard(ramBelow4G: 0, ramAbove4G: 0, cpus: 100_000, bootMenu: false,
                                           bootFailWaitMilliseconds: 0, bootOrder: "")
        XCTAssertEqual(readItem(&many, 0x000F, count: 2), [0xFF, 0xFF])
    }

    func testE820For256MiB() {
        var config = FirmwareConfig.standard(ramBelow4G: 256 << 20, ramAbove4G: 0, cpus: 1, bootMenu: false,
                                             bootFailWaitMilliseconds: 0, bootOrder: "")
        guard let bytes = readFile(&config, "etc/e820") else { return XCTFail("no etc/e820") }
        XCTAssertEqual(Array(bytes[0..<20]), [0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0xFC, 0x09, 0, 0, 0, 0, 0, 1, 0, 0, 0])
        XCTAssertEqual(decodeE820(bytes), [
            E820(0, 0x9_FC00, 1),
            E820(0x9_FC00, 0x400, 2),
            E820(0xF_0000, 0x1_0000, 2),
            E820(0x10_0000, 0x0FF0_0000, 1),
            E820(0xFFFB_C000, 0x4000, 2),
            E820(0xFFFC_0000, 0x4_0000, 2),
        ])
        XCTAssertEqual(seaBIOSEarlyE820(&config), SeaBIOSMemory(ramSize: 256 << 20, ramSizeOver4G: 0))
    }

    func testE820For6GiB() {
        var config = FirmwareConfig.standard(ramBelow4G: 3 << 30, ramAbove4G: 3 << 30, cpus: 2, bootMenu: false,
                                             bootFailWaitMilliseconds: 0, bootOrder: "")
        guard let bytes = readFile(&config, "etc/e820") else { return XCTFail("no etc/e820") }
        XCTAssertEqual(decodeE820(bytes), [
            E820(0, 0x9_FC00, 1),
            E820(0x9_FC00, 0x400, 2),
            E820(0xF_0000, 0x1_0000, 2),
            E820(0x10_0000, 0xBFF0_0000, 1),
            E820(0xFFFB_C000, 0x4000, 2),
            E820(0xFFFC_0000, 0x4_0000, 2),
            E820(0x1_0000_0000, 0xC000_0000, 1),
        ])
        XCTAssertEqual(seaBIOSEarlyE820(&config), SeaBIOSMemory(ramSize: 3 << 30, ramSizeOver4G: 3 << 30))
    }

    func testE820EdgeSizesStayOrderedAndInRange() {
        XCTAssertEqual(FirmwareConfig.e820Table(ramBelow4G: 0x8_0000, ramAbove4G: 0).map { E820($0.address, $0.length, $0.type) }, [
            E820(0, 0x8_0000, 1), E820(0x9_FC00, 0x400, 2), E820(0xF_0000, 0x1_0000, 2),
            E820(0xFFFB_C000, 0x4000, 2), E820(0xFFFC_0000, 0x4_0000, 2),
        ])
        let top = FirmwareConfig.e820Table(ramBelow4G: UInt64.max, ramAbove4G: UInt64.max)
        XCTAssertEqual(top[3].address + top[3].length, 0xFFFB_C000, "low RAM stops below the KVM pages")
        XCTAssertEqual(top.last?.length, UInt64.max - 0x1_0000_0000, "no overflow")
        for (lower, upper) in zip(top, top.dropFirst()) { XCTAssertLessThanOrEqual(lower.address + lower.length, upper.address) }
        var config = FirmwareConfig.standard(ramBelow4G: UInt64.max, ramAbove4G: UInt64.max, cpus: 1, bootMenu: false,
                                             bootFailWaitMilliseconds: 0, bootOrder: "")
        XCTAssertEqual(readItem(&config, 0x0003, count: 8), [UInt8](repeating: 0xFF, count: 8), "RAM size saturates")
    }

    // MARK: Fuzz

    func testTenThousandRandomPortOperationsNeverTrap() {
        var random = FuzzRandom(seed: 0x5EED_F00D)
        var config = standardConfig()
        let ram = FakeGuestRAM(size: 0x1_0000)
        let interestingControls: [UInt32] = [0, 1, 2, 4, 8, 0x10, 0x0A, 0x0C, 0x1E, 0xFFFF_FFFF, 0x0019_000A, 0x0020_000A,
                                             0x0022_000C, 0xFFFF_000A, 0x8000_0008]
        let interestingLengths: [UInt32] = [0, 1, 4, 20, 64, 0x1000, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF]
        let interestingAddresses: [UInt64] = [0, 0x10, 0xFFF0, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 0x1_0000_0000,
                                              0xFFFF_FFFF_FFFF_FFF0, UInt64.max]
        let directoryBefore = readItem(&config, FirmwareConfig.Key.fileDirectory, count: 4 + 64 * 4)

        for _ in 0..<10_000 {
            // Keep some plausible descriptors in RAM.
            let slot = UInt64(random.below(64)) * 16
            let useInteresting = random.below(2) == 0
            placeDescriptor(in: ram, at: slot,
                            control: useInteresting ? interestingControls[random.below(interestingControls.count)] : UInt32(truncatingIfNeeded: random.next()),
                            length: useInteresting ? interestingLengths[random.below(interestingLengths.count)] : UInt32(random.below(0x2000)),
                            address: random.below(3) == 0 ? interestingAddresses[random.below(interestingAddresses.count)] : UInt64(random.below(0x1_0000)))

            let sizes = [1, 2, 3, 4, 8, 0, -1, 16]
            let size = sizes[random.below(sizes.count)]
            let offset = random.below(16) - 2
            switch random.below(8) {
            case 0, 1:
                let readValue = config.readPort(offset: offset, size: size)
                if size == 1 || size == 2 || size == 4 { XCTAssertLessThan(readValue, UInt64(1) << UInt64(8 * size)) }
            case 2:
                config.writePort(offset: 0, size: 2, value: random.below(4) == 0 ? random.next() : UInt64(random.below(0x24)), memory: ram)
            case 3:
                // Trigger a DMA at a descriptor slot, the SeaBIOS way, or at a random address.
                let address = random.below(4) == 0 ? UInt32(truncatingIfNeeded: random.next()) : UInt32(slot)
                config.writePort(offset: 8, size: 4, value: UInt64(address.byteSwapped), memory: ram)
            case 4:
                config.writePort(offset: offset, size: size, value: random.next(), memory: ram)
            case 5:
                config.writeDMARegister(offset: offset, size: size, value: random.next(), memory: ram)
            case 6:
                _ = config.readDMARegister(offset: offset, size: size)
            default:
                if random.below(50) == 0 {
                    config.cursor = (selector: UInt16(truncatingIfNeeded: random.next()), offset: UInt32(truncatingIfNeeded: random.next()))
                } else {
                    _ = config.readData()
                }
            }
        }
        XCTAssertEqual(readItem(&config, FirmwareConfig.Key.fileDirectory, count: 4 + 64 * 4), directoryBefore, "items are read-only")
        XCTAssertEqual(readItem(&config, FirmwareConfig.Key.signature, count: 4), Array("QEMU".utf8))
    }

    // MARK: Helpers

    private func standardConfig() -> FirmwareConfig {
        FirmwareConfig.standard(ramBelow4G: 256 << 20, ramAbove4G: 0, cpus: 2, bootMenu: false,
                                bootFailWaitMilliseconds: 60_000, bootOrder: "")
    }

    /// Selects `key` and reads `count` bytes through the data port.
    private func readItem(_ config: inout FirmwareConfig, _ key: UInt16, count: Int) -> [UInt8] {
        let ram = FakeGuestRAM(size: 0)
        config.writePort(offset: 0, size: 2, value: UInt64(key), memory: ram)
        return (0..<count).map { _ in UInt8(config.readPort(offset: 1, size: 1)) }
    }

    /// Finds `name` the way a guest does: by walking the directory through the ports.
    private func directoryLookup(_ config: inout FirmwareConfig, _ name: String) -> (select: UInt16, size: UInt32)? {
        config.writeSelector(FirmwareConfig.Key.fileDirectory)
        let count = (0..<4).reduce(UInt32(0)) { value, _ in value << 8 | UInt32(config.readData()) }
        var found: (select: UInt16, size: UInt32)?
        for _ in 0..<count {
            let entry = (0..<64).map { _ in config.readData() }
            let size = entry[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let select = UInt16(entry[4]) << 8 | UInt16(entry[5])
            let nameBytes = Array(entry[8..<64].prefix { $0 != 0 })
            if found == nil, nameBytes == Array(name.utf8) { found = (select, size) }
        }
        return found
    }

    private func directoryNames(_ config: inout FirmwareConfig) -> [String] {
        config.writeSelector(FirmwareConfig.Key.fileDirectory)
        let count = (0..<4).reduce(UInt32(0)) { value, _ in value << 8 | UInt32(config.readData()) }
        return (0..<count).map { _ in
            let entry = (0..<64).map { _ in config.readData() }
            return String(decoding: entry[8..<64].prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    private func readFile(_ config: inout FirmwareConfig, _ name: String) -> [UInt8]? {
        guard let file = directoryLookup(&config, name) else { return nil }
        return readItem(&config, file.select, count: Int(file.size))
    }

    private func decodeE820(_ bytes: [UInt8]) -> [E820] {
        stride(from: 0, to: bytes.count - 19, by: 20).map { start in
            let entry = Array(bytes[start..<(start + 20)])
            return E820(littleEndianValue(entry[0..<8]), littleEndianValue(entry[8..<16]), UInt32(littleEndianValue(entry[16..<20])))
        }
    }

    /// SeaBIOS's qemu_cfg_detect + qemu_early_e820, over DMA as SeaBIOS does once FW_CFG_ID has the DMA bit.
    private func seaBIOSEarlyE820(_ config: inout FirmwareConfig) -> SeaBIOSMemory? {
        let ram = FakeGuestRAM(size: 0x1_0000)
        config.writePort(offset: 0, size: 2, value: 0, memory: ram)
        guard (0..<4).map({ _ in UInt8(config.readPort(offset: 1, size: 1)) }) == Array("QEMU".utf8) else { return nil }
        config.writePort(offset: 0, size: 2, value: 1, memory: ram)
        let id = (0..<4).reduce(UInt32(0)) { value, shift in value | UInt32(config.readPort(offset: 1, size: 1)) << UInt32(8 * shift) }
        guard id & FirmwareConfig.idDMA != 0 else { return nil }

        let descriptor: UInt64 = 0x7000, buffer: UInt64 = 0x8000
        func dma(_ control: UInt32, _ length: UInt32) -> [UInt8]? {
            placeDescriptor(in: ram, at: descriptor, control: control, length: length, address: buffer)
            config.writePort(offset: 8, size: 4, value: UInt64(UInt32(descriptor).byteSwapped), memory: ram)
            guard self.control(in: ram, at: descriptor) == 0 else { return nil }
            return ram.bytes(at: buffer, count: Int(length))
        }
        let read = FirmwareConfig.DMAControl.read, select = FirmwareConfig.DMAControl.select
        guard let countBytes = dma(UInt32(FirmwareConfig.Key.fileDirectory) << 16 | select | read, 4) else { return nil }
        let count = countBytes.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        var e820Select: UInt16 = 0, e820Size: UInt32 = 0
        for _ in 0..<count {
            guard let entry = dma(read, 64) else { return nil }
            guard Array(entry[8..<17]) == Array("etc/e820".utf8) + [0] else { continue }
            e820Select = UInt16(entry[4]) << 8 | UInt16(entry[5])
            e820Size = entry[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            break
        }
        guard e820Select != 0 else { return nil }
        config.writePort(offset: 0, size: 2, value: UInt64(e820Select), memory: ram)
        var memory = SeaBIOSMemory(ramSize: 0, ramSizeOver4G: 0)
        for _ in 0..<(e820Size / 20) {
            guard let raw = dma(read, 20) else { return nil }
            let entry = decodeE820(raw)[0]
            guard entry.type == 1 else { continue }
            if entry.address < 0x1_0000_0000 {
                memory.ramSize = max(memory.ramSize, entry.address + entry.length)
            } else {
                memory.ramSizeOver4G = max(memory.ramSizeOver4G, entry.address + entry.length - 0x1_0000_0000)
            }
        }
        return memory
    }

    private func placeDescriptor(in ram: FakeGuestRAM, at address: UInt64, control: UInt32, length: UInt32, address target: UInt64) {
        ram.place(bigEndianBytes(UInt64(control), count: 4) + bigEndianBytes(UInt64(length), count: 4) + bigEndianBytes(target, count: 8),
                  at: address)
    }

    /// Starts a DMA the way SeaBIOS does: `outl(cpu_to_be32(address), 0x518)`.
    private func triggerLow(_ config: inout FirmwareConfig, descriptorAt address: UInt32, ram: FakeGuestRAM) {
        config.writePort(offset: 8, size: 4, value: UInt64(address.byteSwapped), memory: ram)
    }

    private func control(in ram: FakeGuestRAM, at address: UInt64) -> UInt32 {
        ram.bytes(at: address, count: 4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }
}

private struct E820: Equatable, CustomStringConvertible {
    var address: UInt64
    var length: UInt64
    var type: UInt32
    init(_ address: UInt64, _ length: UInt64, _ type: UInt32) {
        self.address = address
        self.length = length
        self.type = type
    }
    var description: String { "[0x\(String(address, radix: 16)), +0x\(String(length, radix: 16))) type \(type)" }
}

private struct SeaBIOSMemory: Equatable {
    var ramSize: UInt64
    var ramSizeOver4G: UInt64
}

/// A window of guest RAM at `[base, base + size)` that logs every access and refuses anything outside.
private final class FakeGuestRAM: GuestMemoryIO {
    struct Access {
        var address: UInt64
        var count: Int
        var isWrite: Bool
        var accepted: Bool
    }

    let base: UInt64
    private var storage: [UInt8]
    var accesses: [Access] = []

    init(base: UInt64 = 0, size: Int, fill: UInt8 = 0) {
        self.base = base
        storage = [UInt8](repeating: fill, count: size)
    }

    var accepted: [Access] { accesses.filter(\.accepted) }
    var refused: [Access] { accesses.filter { !$0.accepted } }

    private func index(_ address: UInt64, _ count: Int) -> Int? {
        guard address >= base else { return nil }
        let offset = address - base
        guard offset <= UInt64(storage.count), UInt64(count) <= UInt64(storage.count) - offset else { return nil }
        return Int(offset)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at address: UInt64) -> Bool {
        let start = index(address, buffer.count)
        log(Access(address: address, count: buffer.count, isWrite: false, accepted: start != nil))
        guard let start else { return false }
        for i in 0..<buffer.count { buffer[i] = storage[start + i] }
        return true
    }

    func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) -> Bool {
        let start = index(address, bytes.count)
        log(Access(address: address, count: bytes.count, isWrite: true, accepted: start != nil))
        guard let start else { return false }
        storage.replaceSubrange(start..<(start + bytes.count), with: bytes)
        return true
    }

    private func log(_ access: Access) {
        if accesses.count >= 4096 { accesses.removeFirst(2048) }  // The fuzz test makes many; keep the recent ones.
        accesses.append(access)
    }

    /// Test-side setup and inspection; not logged.
    func place(_ bytes: [UInt8], at address: UInt64) {
        guard let start = index(address, bytes.count) else { return }
        storage.replaceSubrange(start..<(start + bytes.count), with: bytes)
    }

    func bytes(at address: UInt64, count: Int) -> [UInt8] {
        guard let start = index(address, count) else { return [] }
        return Array(storage[start..<(start + count)])
    }
}

private struct FuzzRandom {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
}

private func bigEndianBytes(_ value: UInt64, count: Int) -> [UInt8] {
    (0..<count).reversed().map { UInt8(truncatingIfNeeded: value >> UInt64(8 * $0)) }
}

private func littleEndianBytes(_ value: UInt64, count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: value >> UInt64(8 * $0)) }
}

private func littleEndianValue(_ bytes: ArraySlice<UInt8>) -> UInt64 {
    bytes.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
}

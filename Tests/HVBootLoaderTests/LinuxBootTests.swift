import HVBootLoader
import XCTest

/// The 64-bit Linux boot protocol loader against Documentation/arch/x86/boot.rst: what must be
/// where in boot_params, the identity map and GDT the 64-bit entry requires, initrd placement,
/// and a clear error (with guest RAM untouched) for every malformed image.
final class LinuxBootTests: XCTestCase {
    // MARK: Loading

    func testBootParamsCarryTheHeaderCommandLineInitrdAndE820() throws {
        let kernel = bzImage(payload: pattern(0x3000, seed: 7))
        let initrd = pattern(0x2345, seed: 9)
        let ram = RecordingRAM(ramSize: 64 << 20)
        let entry = try LinuxLoader(kernel: kernel, initrd: initrd).load(into: ram, ramAbove4G: 0, commandLine: "console=ttyS0 root=/dev/sda1")

        XCTAssertEqual(entry.kernelAddress, 0x100_0000, "loaded at pref_address")
        XCTAssertEqual(entry.entryPoint, 0x100_0200, "the 64-bit entry is the load address + 0x200")
        XCTAssertEqual(ram.bytes(at: 0x100_0000, count: 0x3000), pattern(0x3000, seed: 7), "the protected-mode part, byte for byte")

        let bp = entry.bootParams
        // struct setup_header is copied from the image (0x1F1 up to 0x202 + image[0x201]).
        XCTAssertEqual(ram.bytes(at: bp + 0x1F1, count: 0x10), Array(kernel[0x1F1..<0x201]))
        XCTAssertEqual(ram.u16(bp + 0x1FE), 0xAA55)
        XCTAssertEqual(ram.u32(bp + 0x202), 0x5372_6448)
        XCTAssertEqual(ram.u16(bp + 0x206), 0x020F)
        XCTAssertEqual(ram.u32(bp + 0x260), 0x8000, "init_size from the image")
        // Fields the loader must fill.
        XCTAssertEqual(ram.byte(bp + 0x210), 0xFF, "type_of_loader: undefined")
        XCTAssertEqual(ram.byte(bp + 0x211) & 0x01, 0x01, "LOADED_HIGH")
        XCTAssertEqual(ram.byte(bp + 0x1EF), 0, "sentinel must be zero or the kernel discards fields")
        let cmdline = UInt64(ram.u32(bp + 0x228)) | UInt64(ram.u32(bp + 0x0C8)) << 32
        XCTAssertEqual(String(decoding: ram.bytes(at: cmdline, count: 28), as: UTF8.self), "console=ttyS0 root=/dev/sda1")
        XCTAssertEqual(ram.byte(cmdline + 28), 0, "NUL-terminated")
        let initrdAddress = UInt64(ram.u32(bp + 0x218)) | UInt64(ram.u32(bp + 0x0C0)) << 32
        let initrdSize = UInt64(ram.u32(bp + 0x21C)) | UInt64(ram.u32(bp + 0x0C4)) << 32
        XCTAssertEqual(initrdAddress, entry.initrdAddress)
        XCTAssertEqual(initrdSize, 0x2345)
        XCTAssertEqual(ram.bytes(at: initrdAddress, count: 0x2345), initrd)

        let table = FirmwareConfig.e820Table(ramBelow4G: 64 << 20, ramAbove4G: 0)
        XCTAssertEqual(Int(ram.byte(bp + 0x1E8)), table.count, "e820_entries")
        for (i, e) in table.enumerated() {
            let at = bp + 0x2D0 + UInt64(20 * i)
            XCTAssertEqual(ram.u64(at), e.address, "e820[\(i)].addr")
            XCTAssertEqual(ram.u64(at + 8), e.length, "e820[\(i)].size")
            XCTAssertEqual(ram.u32(at + 16), e.type, "e820[\(i)].type")
        }
        XCTAssertTrue(table.contains { $0.type == 1 && $0.address == 0x10_0000 && $0.address + $0.length == 64 << 20 })
    }

    func testInitrdGoesAsHighAsAllowedPageAligned() throws {
        // RAM is the limit.
        var ram = RecordingRAM(ramSize: 64 << 20)
        var entry = try LinuxLoader(kernel: bzImage(), initrd: pattern(5000, seed: 1)).load(into: ram, ramAbove4G: 0, commandLine: "")
        XCTAssertEqual(entry.initrdAddress, ((64 << 20) - 5000) & ~0xFFF)
        XCTAssertEqual(entry.initrdAddress & 0xFFF, 0)
        // initrd_addr_max (the last byte the kernel may use) is the limit.
        ram = RecordingRAM(ramSize: 256 << 20)
        entry = try LinuxLoader(kernel: bzImage(initrdAddressMax: 0x3FF_FFFF), initrd: pattern(5000, seed: 1))
            .load(into: ram, ramAbove4G: 0, commandLine: "")
        XCTAssertEqual(entry.initrdAddress, (0x400_0000 - 5000) & ~0xFFF, "the initrd's last byte at or below initrd_addr_max")
        // No initrd: the fields stay zero.
        ram = RecordingRAM(ramSize: 64 << 20)
        entry = try LinuxLoader(kernel: bzImage()).load(into: ram, ramAbove4G: 0, commandLine: "")
        XCTAssertEqual([entry.initrdAddress, entry.initrdSize], [0, 0])
        XCTAssertEqual(ram.u32(entry.bootParams + 0x218), 0)
        XCTAssertEqual(ram.u32(entry.bootParams + 0x21C), 0)
    }

    func testHighRAMIsInTheE820Map() throws {
        let ram = RecordingRAM(ramSize: 3 << 30)
        let entry = try LinuxLoader(kernel: bzImage()).load(into: ram, ramAbove4G: 1 << 30, commandLine: "")
        let count = Int(ram.byte(entry.bootParams + 0x1E8))
        let last = entry.bootParams + 0x2D0 + UInt64(20 * (count - 1))
        XCTAssertEqual([ram.u64(last), ram.u64(last + 8), UInt64(ram.u32(last + 16))], [1 << 32, 1 << 30, 1])
    }

    func testIdentityMapCoversTheFirst4GiBWith2MiBPages() throws {
        let ram = RecordingRAM(ramSize: 64 << 20)
        let entry = try LinuxLoader(kernel: bzImage()).load(into: ram, ramAbove4G: 0, commandLine: "")
        XCTAssertEqual(entry.pageTableRoot & 0xFFF, 0)
        // Walk the tables for a spread of addresses, as the MMU would.
        for address: UInt64 in [0, 0x7000, 0x100_0200, 0x3FF_FFFF, 0x4000_0000, 0xFEC0_0000, 0xFFFF_FFFF] {
            let pml4e = ram.u64(entry.pageTableRoot + ((address >> 39) & 0x1FF) * 8)
            XCTAssertEqual(pml4e & 0x3, 0x3, "PML4E present+writable for \(address)")
            let pdpte = ram.u64((pml4e & ~0xFFF) + ((address >> 30) & 0x1FF) * 8)
            XCTAssertEqual(pdpte & 0x83, 0x03, "PDPTE present+writable, not a 1 GiB page, for \(address)")
            let pde = ram.u64((pdpte & ~0xFFF) + ((address >> 21) & 0x1FF) * 8)
            XCTAssertEqual(pde & 0x83, 0x83, "PDE: a present, writable 2 MiB page for \(address)")
            XCTAssertEqual((pde & ~0x1F_FFFF & 0x000F_FFFF_FFFF_F000) | (address & 0x1F_FFFF), address, "identity")
        }
        // The tables themselves sit below the kernel and clear of boot_params and the command line.
        XCTAssertLessThan(entry.pageTableRoot + LinuxBootLayout.pageTableBytes, entry.kernelAddress)
        XCTAssertTrue(entry.pageTableRoot >= entry.bootParams + 4096 || entry.pageTableRoot + LinuxBootLayout.pageTableBytes <= entry.bootParams)
    }

    func testGDTHolds64BitCodeAt0x10AndFlatDataAt0x18() throws {
        let ram = RecordingRAM(ramSize: 64 << 20)
        let entry = try LinuxLoader(kernel: bzImage()).load(into: ram, ramAbove4G: 0, commandLine: "")
        XCTAssertGreaterThanOrEqual(entry.gdtLimit, 0x1F)
        func decode(_ d: UInt64) -> (base: UInt64, limit: UInt64, type: UInt64, s: UInt64, present: UInt64, long: UInt64, db: UInt64, granular: UInt64, dpl: UInt64) {
            ((d >> 16) & 0xFF_FFFF | ((d >> 56) & 0xFF) << 24, (d & 0xFFFF) | ((d >> 48) & 0xF) << 16, (d >> 40) & 0xF, (d >> 44) & 1,
             (d >> 47) & 1, (d >> 53) & 1, (d >> 54) & 1, (d >> 55) & 1, (d >> 45) & 3)
        }
        let code = decode(ram.u64(entry.gdtBase + 0x10))
        XCTAssertEqual([code.base, code.limit, code.s, code.present, code.long, code.db, code.granular, code.dpl], [0, 0xF_FFFF, 1, 1, 1, 0, 1, 0])
        XCTAssertEqual(code.type & 0xA, 0xA, "execute/read")
        let data = decode(ram.u64(entry.gdtBase + 0x18))
        XCTAssertEqual([data.base, data.limit, data.s, data.present, data.long, data.db, data.granular, data.dpl], [0, 0xF_FFFF, 1, 1, 0, 1, 1, 0])
        XCTAssertEqual(data.type & 0xA, 0x2, "read/write data")
    }

    func testSetupSectorsZeroMeansFour() throws {
        let kernel = bzImage(setupSectors: 0, payload: pattern(0x800, seed: 3))
        XCTAssertEqual(try LinuxSetupHeader(image: kernel).kernelOffset, 5 * 512)
        let ram = RecordingRAM(ramSize: 64 << 20)
        _ = try LinuxLoader(kernel: kernel).load(into: ram, ramAbove4G: 0, commandLine: "")
        XCTAssertEqual(ram.bytes(at: 0x100_0000, count: 0x800), pattern(0x800, seed: 3))
    }

    func testWithoutPreferredAddressTheKernelGoesAt1MiB() throws {
        let ram = RecordingRAM(ramSize: 64 << 20)
        let entry = try LinuxLoader(kernel: bzImage(preferredAddress: 0)).load(into: ram, ramAbove4G: 0, commandLine: "")
        XCTAssertEqual(entry.entryPoint, 0x10_0200)
    }

    // MARK: Refusals

    func testMalformedImagesAreRefusedWithoutTouchingRAM() {
        var old = bzImage()
        old[0x206] = 0x0B  // protocol 2.11
        var no64 = bzImage()
        no64[0x236] = 0
        var zImage = bzImage()
        zImage[0x211] = 0
        var badFlag = bzImage()
        badFlag[0x1FE] = 0
        var shortHeader = bzImage()
        shortHeader[0x201] = 0x20  // ends before init_size
        let cases: [(String, [UInt8], LinuxBootError)] = [
            ("empty", [], .imageTooSmall(size: 0)),
            ("truncated header", Array(bzImage().prefix(0x230)), .imageTooSmall(size: 0x230)),
            ("no protected-mode part", Array(bzImage().prefix(1024)), .imageTooSmall(size: 1024)),
            ("an ELF vmlinux", [0x7F, 0x45, 0x4C, 0x46] + [UInt8](repeating: 0, count: 4096), .notABzImage),
            ("no boot flag", badFlag, .notABzImage),
            ("protocol 2.11", old, .protocolTooOld(version: 0x020B)),
            ("32-bit only", no64, .no64BitEntry),
            ("zImage", zImage, .notLoadedHigh),
            ("header too short", shortHeader, .badHeaderLength(end: 0x222)),
            ("load address below 1 MiB", bzImage(preferredAddress: 0x8000), .badLoadAddress(0x8000)),
            ("load address unaligned", bzImage(preferredAddress: 0x100_0010), .badLoadAddress(0x100_0010)),
        ]
        for (name, image, expected) in cases {
            let ram = RecordingRAM(ramSize: 64 << 20)
            XCTAssertThrowsError(try LinuxLoader(kernel: image).load(into: ram, ramAbove4G: 0, commandLine: ""), name) { error in
                XCTAssertEqual(error as? LinuxBootError, expected, name)
                XCTAssertFalse("\(error)".isEmpty)
            }
            XCTAssertEqual(ram.writes, 0, "\(name): guest RAM must be untouched")
        }
    }

    func testLayoutsThatDoNotFitAreRefused() {
        // init_size beyond RAM: the kernel needs 16 MiB + 0x8000.
        var ram = RecordingRAM(ramSize: 16 << 20)
        XCTAssertThrowsError(try LinuxLoader(kernel: bzImage()).load(into: ram, ramAbove4G: 0, commandLine: "")) { error in
            XCTAssertEqual(error as? LinuxBootError, .ramTooSmall(needed: 0x100_8000, have: 16 << 20))
            XCTAssertTrue("\(error)".contains("--memory"))
        }
        XCTAssertEqual(ram.writes, 0)
        // A command line longer than cmdline_size.
        ram = RecordingRAM(ramSize: 64 << 20)
        XCTAssertThrowsError(try LinuxLoader(kernel: bzImage(commandLineSize: 16)).load(into: ram, ramAbove4G: 0, commandLine: String(repeating: "x", count: 17))) { error in
            XCTAssertEqual(error as? LinuxBootError, .commandLineTooLong(length: 17, maximum: 16))
        }
        XCTAssertNoThrow(try LinuxLoader(kernel: bzImage(commandLineSize: 16)).load(into: RecordingRAM(ramSize: 64 << 20), ramAbove4G: 0,
                                                                                     commandLine: String(repeating: "x", count: 16)))
        XCTAssertEqual(ram.writes, 0)
        // An initrd that cannot fit between the kernel and the top of RAM.
        ram = RecordingRAM(ramSize: 20 << 20)
        XCTAssertThrowsError(try LinuxLoader(kernel: bzImage(), initrd: [UInt8](repeating: 1, count: 5 << 20)).load(into: ram, ramAbove4G: 0, commandLine: "")) { error in
            guard case .initrdDoesNotFit(let size, _, _)? = error as? LinuxBootError else { return XCTFail("\(error)") }
            XCTAssertEqual(size, 5 << 20)
        }
        // Or below initrd_addr_max.
        XCTAssertThrowsError(try LinuxLoader(kernel: bzImage(initrdAddressMax: 0x100_7FFF), initrd: [1, 2, 3]).load(into: ram, ramAbove4G: 0, commandLine: ""))
        XCTAssertEqual(ram.writes, 0)
    }

    func testHostileHeaderValuesDoNotTrap() {
        // Every single-byte corruption of the header region loads or fails cleanly.
        let base = bzImage(payload: pattern(0x200, seed: 5))
        var loaded = 0
        for offset in 0x1F1..<0x270 {
            for value: UInt8 in [0x00, 0x80, 0xFF] {
                var image = base
                image[offset] = value
                if (try? LinuxLoader(kernel: image, initrd: [1]).load(into: RecordingRAM(ramSize: 64 << 20), ramAbove4G: 0, commandLine: "x")) != nil {
                    loaded += 1
                }
            }
        }
        XCTAssertGreaterThan(loaded, 0)
    }

    // MARK: Helpers

    /// A minimal bzImage: a 1 KiB (setupSectors + 1 sectors) real-mode part holding a protocol
    /// 2.15 setup header, then `payload` as the protected-mode part.
    private func bzImage(setupSectors: UInt8 = 1, payload: [UInt8] = [UInt8](repeating: 0xF4, count: 0x400),
                         preferredAddress: UInt64 = 0x100_0000, initSize: UInt32 = 0x8000,
                         initrdAddressMax: UInt32 = 0x7FFF_FFFF, commandLineSize: UInt32 = 2047) -> [UInt8] {
        let realMode = (Int(setupSectors == 0 ? 4 : setupSectors) + 1) * 512
        var image = [UInt8](repeating: 0, count: realMode)
        func put(_ v: UInt64, _ n: Int, _ at: Int) { for i in 0..<n { image[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        put(UInt64(setupSectors), 1, 0x1F1)
        put(0xFFFF, 2, 0x1FA)
        put(0xAA55, 2, 0x1FE)
        put(0x6AEB, 2, 0x200)  // jmp: the header ends at 0x26C
        put(0x5372_6448, 4, 0x202)
        put(0x020F, 2, 0x206)
        put(0x01, 1, 0x211)     // LOADED_HIGH
        put(0x10_0000, 4, 0x214)
        put(UInt64(initrdAddressMax), 4, 0x22C)
        put(0x20_0000, 4, 0x230)
        put(1, 1, 0x234)
        put(0x0001, 2, 0x236)   // XLF_KERNEL_64
        put(UInt64(commandLineSize), 4, 0x238)
        put(preferredAddress, 8, 0x258)
        put(UInt64(initSize), 4, 0x260)
        return image + payload
    }

    private func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 7 &+ ($0 >> 8)) }
    }
}

/// Guest RAM for the loader tests: sparse pages, and a count of writes.
private final class RecordingRAM: GuestPhysicalMemory {
    let ramSize: UInt64
    private var pages: [UInt64: [UInt8]] = [:]
    private(set) var writes = 0
    init(ramSize: UInt64) { self.ramSize = ramSize }

    func write(_ bytes: UnsafeRawBufferPointer, at guestAddress: UInt64) throws(GuestMemoryError) {
        guard guestAddress <= ramSize, UInt64(bytes.count) <= ramSize - guestAddress else {
            throw GuestMemoryError(address: guestAddress, count: UInt64(bytes.count))
        }
        writes += 1
        var done = 0
        while done < bytes.count {
            let a = guestAddress + UInt64(done)
            let inPage = Int(a & 0xFFF), n = min(4096 - inPage, bytes.count - done)
            pages[a >> 12, default: [UInt8](repeating: 0, count: 4096)].replaceSubrange(inPage..<inPage + n, with: bytes[done..<done + n])
            done += n
        }
    }
    func zero(at guestAddress: UInt64, count: UInt64) throws(GuestMemoryError) {
        let zeros = [UInt8](repeating: 0, count: Int(count))
        var failure: GuestMemoryError?
        zeros.withUnsafeBytes { b in
            do throws(GuestMemoryError) { try write(b, at: guestAddress) } catch { failure = error }
        }
        if let failure { throw failure }
    }
    func byte(_ a: UInt64) -> UInt8 { pages[a >> 12]?[Int(a & 0xFFF)] ?? 0 }
    func bytes(at a: UInt64, count: Int) -> [UInt8] { (0..<count).map { byte(a + UInt64($0)) } }
    func u16(_ a: UInt64) -> UInt16 { UInt16(byte(a)) | UInt16(byte(a + 1)) << 8 }
    func u32(_ a: UInt64) -> UInt32 { UInt32(u16(a)) | UInt32(u16(a + 2)) << 16 }
    func u64(_ a: UInt64) -> UInt64 { UInt64(u32(a)) | UInt64(u32(a + 4)) << 32 }
}

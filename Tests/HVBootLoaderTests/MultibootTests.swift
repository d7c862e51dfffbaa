import HVBootLoader
import XCTest

final class MultibootTests: XCTestCase {
    // MARK: Loading

    func testELFPlacesEverySegmentByteAndTheInformationArea() {
        let text = pattern(0x300, seed: 1), data = pattern(0x80, seed: 2)
        let image = elfImage(entry: 0x10_0010, segments: [
            TestSegment(type: 4, address: 0, data: pattern(0x20, seed: 3)),  // PT_NOTE: not loaded.
            TestSegment(address: 0x10_0000, data: text),
            TestSegment(address: 0x20_0000, data: data, memorySize: 0x1000),  // .bss after the data.
            TestSegment(address: 0, data: []),  // Empty PT_LOAD: ignored.
        ])
        let ram = SparseRAM(ramSize: 0x40_0000)
        let entry = assertLoads(image, into: ram, commandLine: "console=ttyS0 quiet")

        XCTAssertEqual(entry?.entryPoint, 0x10_0010)
        XCTAssertEqual(entry?.loadedRanges, [.init(start: 0x10_0000, end: 0x10_0300), .init(start: 0x20_0000, end: 0x20_1000)])
        var expected = ExpectedRAM()
        expected.place(text, at: 0x10_0000)
        expected.place(data, at: 0x20_0000)
        expected.place([UInt8](repeating: 0, count: 0x1000 - 0x80), at: 0x20_0080)
        if let entry { checkInformation(in: ram, entry: entry, commandLine: "console=ttyS0 quiet", expected: &expected) }
        assertRAM(ram, holdsExactly: expected)
    }

    func testKludgePlacesLoadRangeAndZeroesBSS() {
        // Header at file offset 0x20 and header_addr = load_addr + 0x20: loading starts at file offset 0.
        let image = kludgeImage(size: 0x600, headerOffset: 0x20, headerAddress: 0x10_0020, loadAddress: 0x10_0000,
                                loadEndAddress: 0x10_0400, bssEndAddress: 0x10_0800, entryAddress: 0x10_0040)
        let ram = SparseRAM(ramSize: 0x40_0000)
        let entry = assertLoads(image, into: ram, commandLine: "root=/dev/vda")

        XCTAssertEqual(entry?.entryPoint, 0x10_0040)
        XCTAssertEqual(entry?.loadedRanges, [.init(start: 0x10_0000, end: 0x10_0800)])
        var expected = ExpectedRAM()
        expected.place(Array(image[0..<0x400]), at: 0x10_0000)
        expected.place([UInt8](repeating: 0, count: 0x400), at: 0x10_0400)
        if let entry { checkInformation(in: ram, entry: entry, commandLine: "root=/dev/vda", expected: &expected) }
        assertRAM(ram, holdsExactly: expected)
    }

    func testKludgeLoadsFromHeaderRelativeOffsetToEndOfFile() {
        // header_addr − load_addr = 0x10 with the header at 0x1000: loading starts at file offset 0xFF0.
        // load_end_addr 0 loads to the end of the file; bss_end_addr 0 means no .bss.
        let image = kludgeImage(size: 0x1800, headerOffset: 0x1000, headerAddress: 0x18_0010, loadAddress: 0x18_0000,
                                loadEndAddress: 0, bssEndAddress: 0, entryAddress: 0x18_0000)
        let ram = SparseRAM(ramSize: 0x40_0000)
        let entry = assertLoads(image, into: ram, commandLine: "")

        XCTAssertEqual(entry?.loadedRanges, [.init(start: 0x18_0000, end: 0x18_0810)])
        var expected = ExpectedRAM()
        expected.place(Array(image[0xFF0...]), at: 0x18_0000)
        if let entry { checkInformation(in: ram, entry: entry, commandLine: "", expected: &expected) }
        assertRAM(ram, holdsExactly: expected)
    }

    func testSupportedRequirementsAndOptionalFlagsAreAccepted() {
        // Bits 0 (page-align modules), 1 (memory info) and 2 (video mode, ignored); bit 20 is optional.
        let image = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(16, seed: 4))],
                             flags: 0b111 | 1 << 20)
        let ram = SparseRAM(ramSize: 0x20_0000)
        guard let entry = assertLoads(image, into: ram, commandLine: "") else { return }
        let infoFlags = ram.u32(at: UInt64(entry.infoAddress))
        XCTAssertEqual(infoFlags & (1 << 11 | 1 << 12), 0, "no video information is claimed")
    }

    func testBadChecksumBeforeAValidHeaderIsSkipped() {
        var image = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(16, seed: 5))],
                             headerOffset: 0x100)
        image.replaceSubrange(0x80..<0x8C, with: le32(0x1BAD_B002) + le32(0) + le32(0))  // Checksum should be 0xE4524FFE.
        XCTAssertNotNil(assertLoads(image, into: SparseRAM(ramSize: 0x20_0000), commandLine: ""))
    }

    func testHugeRAMClampsMemUpperAndReportsFullMap() {
        let image = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(64, seed: 6))])
        for ramSize: UInt64 in [0x1_0000_0000, 1 << 44, .max] {
            let ram = SparseRAM(ramSize: ramSize)
            guard let entry = assertLoads(image, into: ram, commandLine: "x") else { continue }
            var expected = ExpectedRAM()
            expected.place(pattern(64, seed: 6), at: 0x10_0000)
            checkInformation(in: ram, entry: entry, commandLine: "x", expected: &expected)
            assertRAM(ram, holdsExactly: expected)
        }
    }

    func testSegmentEndingExactlyAt4GiBLoads() {
        let image = elfImage(entry: 0xFFFF_F000, segments: [TestSegment(address: 0xFFFF_F000, data: pattern(0x1000, seed: 7))])
        let entry = assertLoads(image, into: SparseRAM(ramSize: .max), commandLine: "")
        XCTAssertEqual(entry?.loadedRanges, [.init(start: 0xFFFF_F000, end: 0x1_0000_0000)])
    }

    func testAdjacentSegmentsAndEntryInBSSLoad() {
        let image = elfImage(entry: 0x10_1800, segments: [
            TestSegment(address: 0x10_0000, data: pattern(0x1000, seed: 8)),
            TestSegment(address: 0x10_1000, data: pattern(0x10, seed: 9), memorySize: 0x1000),
        ])
        XCTAssertNotNil(assertLoads(image, into: SparseRAM(ramSize: 0x20_0000), commandLine: ""))
    }

    func testLongestCommandLineFitsBelowEBDA() {
        let image = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(16, seed: 10))])
        let tooLong = String(repeating: "a", count: 0x10_0000)
        guard case .failure(.commandLineTooLong(_, let maximum)) = load(image, into: SparseRAM(ramSize: 0x20_0000), commandLine: tooLong) else {
            return XCTFail("a 1 MiB command line must not fit")
        }
        let longest = String(repeating: "a", count: Int(maximum))
        let ram = SparseRAM(ramSize: 0x20_0000)
        guard let entry = assertLoads(image, into: ram, commandLine: longest) else { return }
        var expected = ExpectedRAM()
        expected.place(pattern(16, seed: 10), at: 0x10_0000)
        checkInformation(in: ram, entry: entry, commandLine: longest, expected: &expected)
        assertRAM(ram, holdsExactly: expected)
        assertFails(image, .commandLineTooLong(length: maximum + 1, maximum: maximum), commandLine: longest + "a")
    }

    // MARK: Hostile headers

    func testTruncatedFiles() {
        assertFails([], .noHeader)
        assertFails(Array(le32(0x1BAD_B002) + le32(0)), .noHeader)
        // ELF identification and multiboot header present, ELF header cut short.
        var stub = Array(elfImage(entry: 0, segments: [])[0..<16]) + multibootHeader(flags: 0)
        stub += [UInt8](repeating: 0, count: 40 - stub.count)
        assertFails(stub, .elfTruncated(needed: 52, imageSize: 40))
        // a.out kludge header whose address fields are cut off by the end of the file.
        assertFails(multibootHeader(flags: 1 << 16) + [0, 0, 0, 0],
                    .headerTruncated(offset: 0, needed: 32, available: 16))

        // Every proper prefix of valid images fails cleanly without writing anything.
        let elf = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(0x100, seed: 11))])
        let kludge = kludgeImage(size: 0x200, headerOffset: 0x40, headerAddress: 0x10_0040, loadAddress: 0x10_0000,
                                 loadEndAddress: 0x10_0200, bssEndAddress: 0, entryAddress: 0x10_0000)
        for image in [elf, kludge] {
            for length in 0..<image.count {
                let ram = SparseRAM(ramSize: 0x20_0000)
                guard case .failure = load(Array(image[0..<length]), into: ram, commandLine: "") else {
                    return XCTFail("prefix of \(length) bytes loaded")
                }
                XCTAssertTrue(ram.pages.isEmpty)
            }
        }
        assertFails(Array(elf[0..<(elf.count - 1)]),
                    .segmentDataBeyondFile(segment: 0, fileOffset: UInt64(elf.count - 0x100), fileSize: 0x100,
                                           imageSize: UInt64(elf.count - 1)))
    }

    func testBadChecksumIsReportedWithTheExpectedValue() {
        var image = kludgeImage(size: 0x100, headerOffset: 0, headerAddress: 0x10_0000, loadAddress: 0x10_0000,
                                loadEndAddress: 0, bssEndAddress: 0, entryAddress: 0x10_0000)
        image.replaceSubrange(8..<12, with: le32(0x1234_5678))
        let error = MultibootError.headerChecksumMismatch(offset: 0, flags: 1 << 16, checksum: 0x1234_5678)
        assertFails(image, error)
        XCTAssertTrue(error.description.contains("0xe4514ffe"), error.description)
    }

    func testHeaderMustLieWithinFirst8KiB() {
        let segment = TestSegment(address: 0x10_0000, data: pattern(16, seed: 12))
        XCTAssertNotNil(assertLoads(elfImage(entry: 0x10_0000, segments: [segment], headerOffset: 8192 - 12),
                                    into: SparseRAM(ramSize: 0x20_0000), commandLine: ""))
        assertFails(elfImage(entry: 0x10_0000, segments: [segment], headerOffset: 8192 - 8), .headerOutsideSearchWindow(offset: 8184))
        assertFails(elfImage(entry: 0x10_0000, segments: [segment], headerOffset: 8192), .headerOutsideSearchWindow(offset: 8192))
        // Misaligned headers are not headers.
        var misaligned = elfImage(entry: 0x10_0000, segments: [segment], headerOffset: 0x100)
        misaligned.insert(0, at: 0x100)
        assertFails(misaligned, .noHeader)

        // The a.out kludge fields must also fit within the window.
        let fits = kludgeImage(size: 0x3000, headerOffset: 8192 - 32, headerAddress: 0x10_0000 + 8192 - 32,
                               loadAddress: 0x10_0000, loadEndAddress: 0, bssEndAddress: 0, entryAddress: 0x10_0000)
        XCTAssertNotNil(assertLoads(fits, into: SparseRAM(ramSize: 0x20_0000), commandLine: ""))
        let straddles = kludgeImage(size: 0x3000, headerOffset: 8192 - 28, headerAddress: 0x10_0000 + 8192 - 28,
                                    loadAddress: 0x10_0000, loadEndAddress: 0, bssEndAddress: 0, entryAddress: 0x10_0000)
        assertFails(straddles, .headerTruncated(offset: 8164, needed: 32, available: 28))
    }

    func testUnsupportedRequiredFeaturesAreRefused() {
        let segment = TestSegment(address: 0x10_0000, data: pattern(16, seed: 13))
        assertFails(elfImage(entry: 0x10_0000, segments: [segment], flags: 1 << 3), .unsupportedRequiredFeatures(unsupportedFlags: 1 << 3))
        assertFails(elfImage(entry: 0x10_0000, segments: [segment], flags: 0b11 | 1 << 4 | 1 << 15),
                    .unsupportedRequiredFeatures(unsupportedFlags: 1 << 4 | 1 << 15))
    }

    func testKludgeAddressFieldErrors() {
        func image(header: UInt32, load: UInt32, loadEnd: UInt32, bssEnd: UInt32, entry: UInt32 = 0x10_0000) -> [UInt8] {
            kludgeImage(size: 0x400, headerOffset: 0x40, headerAddress: header, loadAddress: load,
                        loadEndAddress: loadEnd, bssEndAddress: bssEnd, entryAddress: entry)
        }
        assertFails(image(header: 0x10_0000, load: 0x10_0040, loadEnd: 0, bssEnd: 0),
                    .kludgeHeaderBelowLoadAddress(headerAddress: 0x10_0000, loadAddress: 0x10_0040))
        assertFails(image(header: 0x10_0080, load: 0x10_0000, loadEnd: 0, bssEnd: 0),
                    .kludgeLoadStartBeforeFile(headerOffset: 0x40, headerAddress: 0x10_0080, loadAddress: 0x10_0000))
        assertFails(image(header: 0x10_0040, load: 0x10_0000, loadEnd: 0xF_FFFF, bssEnd: 0),
                    .kludgeLoadEndBelowLoadAddress(loadEndAddress: 0xF_FFFF, loadAddress: 0x10_0000))
        XCTAssertEqual(assertLoads(image(header: 0x10_0040, load: 0x10_0000, loadEnd: 0x10_0200, bssEnd: 0x10_0200),
                                   into: SparseRAM(ramSize: 0x20_0000), commandLine: "")?.loadedRanges,
                       [.init(start: 0x10_0000, end: 0x10_0200)], "bss_end_addr at the end of the data means no .bss")
        assertFails(image(header: 0x10_0040, load: 0x10_0000, loadEnd: 0x10_0200, bssEnd: 0x10_01FF),
                    .kludgeBSSEndBelowLoadEnd(bssEndAddress: 0x10_01FF, loadAddress: 0x10_0000, loadSize: 0x200))
        assertFails(image(header: 0x10_0040, load: 0x10_0000, loadEnd: 0, bssEnd: 0x10_0100),
                    .kludgeBSSEndBelowLoadEnd(bssEndAddress: 0x10_0100, loadAddress: 0x10_0000, loadSize: 0x400))
        assertFails(image(header: 0x10_0040, load: 0x10_0000, loadEnd: 0x10_0800, bssEnd: 0),
                    .segmentDataBeyondFile(segment: 0, fileOffset: 0, fileSize: 0x800, imageSize: 0x400))
        // Nothing to load, so the entry cannot be inside the image.
        assertFails(image(header: 0x10_0040, load: 0x10_0000, loadEnd: 0x10_0000, bssEnd: 0),
                    .entryOutsideLoadedImage(entryPoint: 0x10_0000))
    }

    // MARK: Hostile ELF

    func testNonI386ELFIsRefused() {
        let valid = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(16, seed: 14))])
        var elf64 = valid
        elf64[4] = 2
        assertFails(elf64, .elfNot32Bit(elfClass: 2))
        var bigEndian = valid
        bigEndian[5] = 2
        assertFails(bigEndian, .elfNotLittleEndian(dataEncoding: 2))
        var x86_64 = valid
        x86_64.replaceSubrange(18..<20, with: le16(62))
        assertFails(x86_64, .elfWrongMachine(machine: 62))
        var shared = valid
        shared.replaceSubrange(16..<18, with: le16(3))
        assertFails(shared, .elfNotExecutable(type: 3))
        var notELF = valid
        notELF[0] = 0x7E
        assertFails(notELF, .notELF)
    }

    func testImagesWithoutLoadableSegmentsAreRefused() {
        assertFails(elfImage(entry: 0x10_0000, segments: []), .elfNoLoadableSegments)
        assertFails(elfImage(entry: 0x10_0000, segments: [
            TestSegment(type: 4, address: 0x10_0000, data: pattern(16, seed: 15)),
            TestSegment(address: 0x10_0000, data: []),
        ]), .elfNoLoadableSegments)
    }

    func testSegmentsOutsideLoadableRAMAreRefused() {
        func image(_ address: UInt32, _ size: Int) -> [UInt8] {
            elfImage(entry: address, segments: [TestSegment(address: address, data: pattern(size, seed: 16))])
        }
        XCTAssertNotNil(assertLoads(image(0x3F_F000, 0x1000), into: SparseRAM(ramSize: 0x40_0000), commandLine: ""))
        assertFails(image(0x3F_F000, 0x1001), .segmentBeyondRAM(segment: 0, start: 0x3F_F000, end: 0x40_0001, ramSize: 0x40_0000))
        assertFails(image(0x3F_F000, 0x2000), .segmentBeyondRAM(segment: 0, start: 0x3F_F000, end: 0x40_1000, ramSize: 0x40_0000))
        assertFails(image(0xF_FFFF, 0x10), .segmentBelowOneMiB(segment: 0, start: 0xF_FFFF, end: 0x10_000F))
        assertFails(image(0xF_F000, 0x2000), .segmentBelowOneMiB(segment: 0, start: 0xF_F000, end: 0x10_1000))
        assertFails(image(0x7C00, 0x200), .segmentBelowOneMiB(segment: 0, start: 0x7C00, end: 0x7E00))
        assertFails(image(0x10_0000, 0x10), .ramTooSmall(ramSize: 0x10_0000), ramSize: 0x10_0000)
        assertFails(image(0x10_0000, 0x10), .ramTooSmall(ramSize: 0), ramSize: 0)
    }

    func testSegmentOverlappingTheInformationAreaIsRefused() {
        let probe = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(16, seed: 17))])
        guard let info = assertLoads(probe, into: SparseRAM(ramSize: 0x20_0000), commandLine: "")?.infoAddress else { return }
        let hostile = elfImage(entry: info, segments: [TestSegment(address: info, data: pattern(0x100, seed: 18))])
        assertFails(hostile, .segmentBelowOneMiB(segment: 0, start: UInt64(info), end: UInt64(info) + 0x100))
        let kludge = kludgeImage(size: 0x100, headerOffset: 0, headerAddress: info, loadAddress: info,
                                 loadEndAddress: 0, bssEndAddress: 0, entryAddress: info)
        assertFails(kludge, .segmentBelowOneMiB(segment: 0, start: UInt64(info), end: UInt64(info) + 0x100))
    }

    func testSegmentFileRangeErrors() {
        let valid = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(0x40, seed: 19))])
        let offset = UInt64(valid.count - 0x40), size = UInt64(valid.count)
        var beyond = valid
        poke(&beyond, programHeader: 0, field: 16, 0x41)  // p_filesz one past the end of the file.
        poke(&beyond, programHeader: 0, field: 20, 0x41)
        assertFails(beyond, .segmentDataBeyondFile(segment: 0, fileOffset: offset, fileSize: 0x41, imageSize: size))
        var fileLarger = valid
        poke(&fileLarger, programHeader: 0, field: 20, 0x3F)  // p_memsz below p_filesz.
        assertFails(fileLarger, .segmentFileSizeExceedsMemorySize(segment: 0, fileSize: 0x40, memorySize: 0x3F))
        var bssOnly = valid  // A segment with no file bytes ignores p_offset, even past the end of the file.
        poke(&bssOnly, programHeader: 0, field: 4, 0xFFFF_FFFF)
        poke(&bssOnly, programHeader: 0, field: 16, 0)
        XCTAssertNotNil(assertLoads(bssOnly, into: SparseRAM(ramSize: 0x20_0000), commandLine: ""))
    }

    func testHugeValuesDoNotOverflow() {
        let valid = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(0x40, seed: 20))])
        let size = UInt64(valid.count)
        var everything = valid
        for field in [4, 12, 16, 20] { poke(&everything, programHeader: 0, field: field, 0xFFFF_FFFF) }
        assertFails(everything, .segmentDataBeyondFile(segment: 0, fileOffset: 0xFFFF_FFFF, fileSize: 0xFFFF_FFFF, imageSize: size))
        var wraps = valid
        poke(&wraps, programHeader: 0, field: 12, 0xFFFF_FFF0)
        assertFails(wraps, .segmentBeyond4GiB(segment: 0, address: 0xFFFF_FFF0, memorySize: 0x40), ramSize: .max)
        var wrapsMemory = valid
        poke(&wrapsMemory, programHeader: 0, field: 12, 0xFFFF_FFFF)
        poke(&wrapsMemory, programHeader: 0, field: 20, 0xFFFF_FFFF)
        assertFails(wrapsMemory, .segmentBeyond4GiB(segment: 0, address: 0xFFFF_FFFF, memorySize: 0xFFFF_FFFF))
        var tableOffset = valid
        tableOffset.replaceSubrange(28..<32, with: le32(0xFFFF_FFFF))
        assertFails(tableOffset, .elfTruncated(needed: 0xFFFF_FFFF + 32, imageSize: size))
        var tableCount = valid
        tableCount.replaceSubrange(42..<46, with: le16(0xFFFF) + le16(0xFFFF))
        assertFails(tableCount, .elfTruncated(needed: 52 + 0xFFFF * 0xFFFF, imageSize: size))
        var tinyEntries = valid
        tinyEntries.replaceSubrange(42..<44, with: le16(0))
        assertFails(tinyEntries, .elfProgramHeaderTooSmall(entrySize: 0))
        var maxEntry = valid
        maxEntry.replaceSubrange(24..<28, with: le32(0xFFFF_FFFF))
        assertFails(maxEntry, .entryOutsideLoadedImage(entryPoint: 0xFFFF_FFFF))

        func kludge(header: UInt32, load: UInt32, loadEnd: UInt32, bssEnd: UInt32) -> [UInt8] {
            kludgeImage(size: 0x100, headerOffset: 0x40, headerAddress: header, loadAddress: load,
                        loadEndAddress: loadEnd, bssEndAddress: bssEnd, entryAddress: load)
        }
        assertFails(kludge(header: 0xFFFF_FFFF, load: 0, loadEnd: 0, bssEnd: 0),
                    .kludgeLoadStartBeforeFile(headerOffset: 0x40, headerAddress: 0xFFFF_FFFF, loadAddress: 0))
        assertFails(kludge(header: 0xFFFF_FFC0, load: 0xFFFF_FF80, loadEnd: 0, bssEnd: 0),
                    .segmentBeyond4GiB(segment: 0, address: 0xFFFF_FF80, memorySize: 0x100), ramSize: .max)
        assertFails(kludge(header: 0x10_0040, load: 0x10_0000, loadEnd: 0xFFFF_FFFF, bssEnd: 0),
                    .segmentDataBeyondFile(segment: 0, fileOffset: 0, fileSize: 0xFFEF_FFFF, imageSize: 0x100))
        assertFails(kludge(header: 0x10_0040, load: 0x10_0000, loadEnd: 0, bssEnd: 0xFFFF_FFFF),
                    .segmentBeyondRAM(segment: 0, start: 0x10_0000, end: 0xFFFF_FFFF, ramSize: 0x40_0000))
    }

    func testEntryOutsideLoadedSegmentsIsRefused() {
        let segment = TestSegment(address: 0x10_0000, data: pattern(0x40, seed: 21))
        assertFails(elfImage(entry: 0x10_0040, segments: [segment]), .entryOutsideLoadedImage(entryPoint: 0x10_0040))
        assertFails(elfImage(entry: 0xF_FFFF, segments: [segment]), .entryOutsideLoadedImage(entryPoint: 0xF_FFFF))
        assertFails(elfImage(entry: 0, segments: [segment]), .entryOutsideLoadedImage(entryPoint: 0))
    }

    func testOverlappingSegmentsAreRefused() {
        let image = elfImage(entry: 0x10_0000, segments: [
            TestSegment(address: 0x10_1000, data: pattern(0x1000, seed: 22)),
            TestSegment(address: 0x10_0000, data: pattern(0x10, seed: 23), memorySize: 0x1001),
        ])
        assertFails(image, .segmentsOverlap(first: 1, second: 0))
        let duplicate = elfImage(entry: 0x10_0000, segments: [
            TestSegment(address: 0x10_0000, data: pattern(0x10, seed: 24)),
            TestSegment(address: 0x10_0000, data: pattern(0x10, seed: 25)),
        ])
        assertFails(duplicate, .segmentsOverlap(first: 0, second: 1))
    }

    // MARK: Command line and guest memory

    func testCommandLineWithNULIsRefused() {
        let image = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(16, seed: 26))])
        assertFails(image, .commandLineContainsNUL, commandLine: "quiet\0init=/bin/sh")
    }

    func testRefusedGuestWriteIsReported() {
        let image = elfImage(entry: 0x10_0000, segments: [TestSegment(address: 0x10_0000, data: pattern(16, seed: 27))])
        let ram = SparseRAM(ramSize: 0x20_0000, mappedSize: 0x10_0000)  // Claims more than it maps.
        XCTAssertEqual(load(image, into: ram, commandLine: ""), .failure(.guestMemory(GuestMemoryError(address: 0x10_0000, count: 16))))
    }

    // MARK: Robustness

    func testMutatedImagesNeverTrapOrWriteOutsideTheirRanges() {
        let seeds = [
            elfImage(entry: 0x10_0010, segments: [
                TestSegment(address: 0x10_0000, data: pattern(0x80, seed: 28)),
                TestSegment(address: 0x10_8000, data: pattern(0x40, seed: 29), memorySize: 0x200),
            ]),
            kludgeImage(size: 0x200, headerOffset: 0x20, headerAddress: 0x10_0020, loadAddress: 0x10_0000,
                        loadEndAddress: 0x10_0100, bssEndAddress: 0x10_0400, entryAddress: 0x10_0000),
        ]
        let interesting: [UInt32] = [0, 1, 0x20, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0xFFFF_FFE0, 0x10_0000, 0x10_FFFF]
        var random = SplitMix64(state: 0x6876_2D62_696F_73)
        for iteration in 0..<2500 {
            var image = seeds[iteration % seeds.count]
            for _ in 0...random.next(below: 4) {
                let offset = random.next(below: min(image.count, 0x80) / 4) * 4
                if random.next(below: 2) == 0 {
                    image.replaceSubrange(offset..<offset + 4, with: le32(interesting[random.next(below: interesting.count)]))
                } else {
                    image[offset + random.next(below: 4)] = UInt8(truncatingIfNeeded: random.next(below: 256))
                }
            }
            if random.next(below: 8) == 0 { image.removeLast(random.next(below: image.count)) }

            let ram = SparseRAM(ramSize: 0x11_0000)  // Small, so that mutated sizes stay cheap to check byte by byte.
            switch load(image, into: ram, commandLine: "fuzz") {
            case .failure(let error):
                XCTAssertTrue(ram.pages.isEmpty, "iteration \(iteration): \(error) but guest memory was written")
                XCTAssertFalse(error.description.isEmpty || error.description.contains("\n"))
            case .success(let entry):
                for range in entry.loadedRanges {
                    XCTAssertTrue(0x10_0000 <= range.start && range.start < range.end && range.end <= ram.ramSize)
                }
                for (lower, upper) in zip(entry.loadedRanges, entry.loadedRanges.dropFirst()) {
                    XCTAssertLessThanOrEqual(lower.end, upper.start)
                }
                XCTAssertTrue(entry.loadedRanges.contains { $0.start <= UInt64(entry.entryPoint) && UInt64(entry.entryPoint) < $0.end })
                let allowed = entry.loadedRanges.map { $0.start..<$0.end } + [0x500..<0x9_FC00]
                XCTAssertEqual(ram.changedAddresses(outside: allowed), [], "iteration \(iteration)")
            }
        }
    }

    func testDescriptionsAreSingleLines() {
        let errors: [MultibootError] = [
            .ramTooSmall(ramSize: 0), .noHeader, .headerOutsideSearchWindow(offset: 0x2000),
            .headerChecksumMismatch(offset: 0, flags: 0, checksum: 0), .headerTruncated(offset: 0, needed: 32, available: 12),
            .unsupportedRequiredFeatures(unsupportedFlags: 8), .kludgeHeaderBelowLoadAddress(headerAddress: 0, loadAddress: 1),
            .kludgeLoadStartBeforeFile(headerOffset: 0, headerAddress: 1, loadAddress: 0),
            .kludgeLoadEndBelowLoadAddress(loadEndAddress: 0, loadAddress: 1),
            .kludgeBSSEndBelowLoadEnd(bssEndAddress: 0, loadAddress: 1, loadSize: 2), .notELF, .elfNot32Bit(elfClass: 2),
            .elfNotLittleEndian(dataEncoding: 2), .elfTruncated(needed: 52, imageSize: 40), .elfWrongMachine(machine: 62),
            .elfNotExecutable(type: 3), .elfProgramHeaderTooSmall(entrySize: 0), .elfNoLoadableSegments,
            .segmentFileSizeExceedsMemorySize(segment: 0, fileSize: 2, memorySize: 1),
            .segmentDataBeyondFile(segment: 0, fileOffset: 0, fileSize: 2, imageSize: 1),
            .segmentBeyond4GiB(segment: 0, address: 0xFFFF_FFFF, memorySize: 2),
            .segmentBelowOneMiB(segment: 0, start: 0, end: 1), .segmentBeyondRAM(segment: 0, start: 0, end: 2, ramSize: 1),
            .segmentsOverlap(first: 0, second: 1), .entryOutsideLoadedImage(entryPoint: 0), .commandLineContainsNUL,
            .commandLineTooLong(length: 2, maximum: 1), .guestMemory(GuestMemoryError(address: 0, count: 1)),
        ]
        for error in errors {
            XCTAssertFalse(error.description.isEmpty)
            XCTAssertFalse(error.description.contains("\n"), error.description)
        }
        XCTAssertEqual(Set(errors.map(\.description)).count, errors.count, "each failure reads differently")
        XCTAssertEqual(MultibootError.noHeader.description,
                       "not a multiboot image: no multiboot header (magic 0x1BADB002) in the first 8192 bytes")
        XCTAssertEqual(MultibootEntry.bootloaderMagic, 0x2BAD_B002)
    }

    // MARK: Helpers

    private func load(_ image: [UInt8], into ram: SparseRAM, commandLine: String) -> Result<MultibootEntry, MultibootError> {
        Result { () throws(MultibootError) in try MultibootLoader(image: image).load(into: ram, commandLine: commandLine) }
    }

    @discardableResult
    private func assertLoads(_ image: [UInt8], into ram: SparseRAM, commandLine: String,
                             file: StaticString = #filePath, line: UInt = #line) -> MultibootEntry? {
        switch load(image, into: ram, commandLine: commandLine) {
        case .success(let entry):
            return entry
        case .failure(let error):
            XCTFail("load failed: \(error)", file: file, line: line)
            return nil
        }
    }

    /// Loads must fail with exactly `expected` and leave guest memory untouched.
    private func assertFails(_ image: [UInt8], _ expected: MultibootError, ramSize: UInt64 = 0x40_0000, commandLine: String = "",
                             file: StaticString = #filePath, line: UInt = #line) {
        let ram = SparseRAM(ramSize: ramSize)
        XCTAssertEqual(load(image, into: ram, commandLine: commandLine), .failure(expected), file: file, line: line)
        XCTAssertTrue(ram.pages.isEmpty, "a failed load wrote guest memory", file: file, line: line)
    }

    /// Checks the information structure, memory map and strings field by field, and adds their bytes to `expected`.
    private func checkInformation(in ram: SparseRAM, entry: MultibootEntry, commandLine: String, expected: inout ExpectedRAM,
                                  file: StaticString = #filePath, line: UInt = #line) {
        let info = UInt64(entry.infoAddress)
        let commandAddress = ram.u32(at: info + 16), mapLength = ram.u32(at: info + 44)
        let mapAddress = ram.u32(at: info + 48), nameAddress = ram.u32(at: info + 64)
        let ramSize = ram.ramSize

        var structure = [UInt8](repeating: 0, count: 88)
        structure.replaceSubrange(0..<4, with: le32(1 << 0 | 1 << 2 | 1 << 6 | 1 << 9))
        structure.replaceSubrange(4..<8, with: le32(639))
        structure.replaceSubrange(8..<12, with: le32(UInt32(min((ramSize - 0x10_0000) / 1024, UInt64(UInt32.max)))))
        structure.replaceSubrange(16..<20, with: le32(commandAddress))
        structure.replaceSubrange(44..<48, with: le32(96))
        structure.replaceSubrange(48..<52, with: le32(mapAddress))
        structure.replaceSubrange(64..<68, with: le32(nameAddress))
        let map: [(UInt64, UInt64, UInt32)] = [
            (0, 0x9_FC00, 1), (0x9_FC00, 0x400, 2), (0xF_0000, 0x1_0000, 2), (0x10_0000, ramSize - 0x10_0000, 1),
        ]
        let mapBytes = map.flatMap { le32(20) + le64($0.0) + le64($0.1) + le32($0.2) }
        XCTAssertEqual(mapLength, 96, file: file, line: line)

        let regions: [(UInt64, [UInt8])] = [
            (info, structure), (UInt64(mapAddress), mapBytes), (UInt64(nameAddress), Array("hv\0".utf8)),
            (UInt64(commandAddress), Array(commandLine.utf8) + [0]),
        ]
        for (address, bytes) in regions {
            XCTAssertTrue(address >= 0x500 && address + UInt64(bytes.count) <= 0x9_FC00,
                          "information at \(address) is outside low memory", file: file, line: line)
            expected.place(bytes, at: address, file: file, line: line)
        }
    }

    /// Every byte of guest memory must be what `expected` says, or untouched.
    private func assertRAM(_ ram: SparseRAM, holdsExactly expected: ExpectedRAM,
                           file: StaticString = #filePath, line: UInt = #line) {
        var wrong: [UInt64] = []
        for address in ram.changedAddresses() where expected.bytes[address] == nil { wrong.append(address) }
        for (address, byte) in expected.bytes where ram.byte(at: address) != byte { wrong.append(address) }
        XCTAssertTrue(wrong.isEmpty, "\(wrong.count) wrong bytes, first at \(wrong.min() ?? 0)", file: file, line: line)
    }
}

// MARK: - Test doubles and image builders

/// Sparse guest RAM: 4 KiB pages appear on first write and untouched bytes read as `fill`, so tests can check
/// every byte the loader placed and claim RAM far larger than the test can allocate.
private final class SparseRAM: GuestPhysicalMemory {
    static let fill: UInt8 = 0xCC
    private static let pageSize: UInt64 = 4096
    let ramSize: UInt64
    /// Writes at or above this fail, to model a mapping smaller than `ramSize`.
    private let mappedSize: UInt64
    private(set) var pages: [UInt64: [UInt8]] = [:]

    init(ramSize: UInt64, mappedSize: UInt64? = nil) {
        self.ramSize = ramSize
        self.mappedSize = mappedSize ?? ramSize
    }

    func write(_ bytes: UnsafeRawBufferPointer, at guestAddress: UInt64) throws(GuestMemoryError) {
        try check(guestAddress, UInt64(bytes.count))
        update(guestAddress, UInt64(bytes.count)) { page, range, done in
            page.replaceSubrange(range, with: bytes[done..<done + range.count])
        }
    }

    func zero(at guestAddress: UInt64, count: UInt64) throws(GuestMemoryError) {
        try check(guestAddress, count)
        update(guestAddress, count) { page, range, _ in page.replaceSubrange(range, with: repeatElement(0, count: range.count)) }
    }

    func byte(at address: UInt64) -> UInt8 {
        pages[address / Self.pageSize]?[Int(address % Self.pageSize)] ?? Self.fill
    }

    func u32(at address: UInt64) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(byte(at: address + UInt64($1))) << (8 * $1) }
    }

    /// Addresses outside `allowed` whose bytes no longer hold `fill`. Pages wholly inside one allowed range are
    /// not scanned, which keeps the mutation test fast in debug builds.
    func changedAddresses(outside allowed: [Range<UInt64>] = []) -> [UInt64] {
        pages.flatMap { page, bytes in
            let base = page * Self.pageSize
            if allowed.contains(where: { $0.contains(base) && $0.contains(base + Self.pageSize - 1) }) { return [UInt64]() }
            let changed = bytes.indices.filter { bytes[$0] != Self.fill }.map { base + UInt64($0) }
            return changed.filter { address in !allowed.contains { $0.contains(address) } }
        }
    }

    private func check(_ address: UInt64, _ count: UInt64) throws(GuestMemoryError) {
        guard address <= mappedSize, count <= mappedSize - address else {
            throw GuestMemoryError(address: address, count: count)
        }
    }

    /// Calls `body` with each page [address, address + count) touches, the part of the page it covers, and how
    /// many bytes of the range came before that part.
    private func update(_ address: UInt64, _ count: UInt64, _ body: (inout [UInt8], Range<Int>, Int) -> Void) {
        var done: UInt64 = 0
        while done < count {
            let current = address + done
            let offset = Int(current % Self.pageSize)
            let length = Int(min(Self.pageSize - UInt64(offset), count - done))
            body(&pages[current / Self.pageSize, default: [UInt8](repeating: Self.fill, count: Int(Self.pageSize))],
                 offset..<offset + length, Int(done))
            done += UInt64(length)
        }
    }
}

/// The bytes a test expects in guest memory; placing two things on one byte is a test failure.
private struct ExpectedRAM {
    private(set) var bytes: [UInt64: UInt8] = [:]

    mutating func place(_ data: [UInt8], at address: UInt64, file: StaticString = #filePath, line: UInt = #line) {
        for (index, byte) in data.enumerated() {
            let previous = bytes.updateValue(byte, forKey: address + UInt64(index))
            XCTAssertNil(previous, "two things placed at \(address + UInt64(index))", file: file, line: line)
        }
    }
}

private struct TestSegment {
    var type: UInt32 = 1  // PT_LOAD
    var address: UInt32
    var data: [UInt8]
    var memorySize: UInt32?
}

/// An ELF32 i386 executable: ELF header, program headers, the multiboot header (at `headerOffset` if given,
/// else right after the program headers), then each segment's data 16-byte aligned.
private func elfImage(entry: UInt32, segments: [TestSegment], flags: UInt32 = 0, headerOffset: Int? = nil) -> [UInt8] {
    var image = [0x7F, 0x45, 0x4C, 0x46, 1, 1, 1] + [UInt8](repeating: 0, count: 9)  // ELFCLASS32, LSB, EV_CURRENT.
    image += le16(2) + le16(3) + le32(1) + le32(entry) + le32(52) + le32(0) + le32(0)  // ET_EXEC, EM_386.
    image += le16(52) + le16(32) + le16(UInt16(segments.count)) + le16(40) + le16(0) + le16(0)
    image += [UInt8](repeating: 0, count: 32 * segments.count)
    image += [UInt8](repeating: 0, count: (headerOffset ?? image.count) - image.count)
    image += multibootHeader(flags: flags)
    for (index, segment) in segments.enumerated() {
        image += [UInt8](repeating: 0, count: (16 - image.count % 16) % 16)
        let fields: [UInt32] = [segment.type, UInt32(image.count), segment.address, segment.address, UInt32(segment.data.count),
                      segment.memorySize ?? UInt32(segment.data.count), 7, 16]
        for (field, value) in fields.enumerated() { poke(&image, programHeader: index, field: 4 * field, value) }
        image += segment.data
    }
    return image
}

/// A flat image filled with `pattern` with an a.out-kludge multiboot header at `headerOffset`.
private func kludgeImage(size: Int, headerOffset: Int, headerAddress: UInt32, loadAddress: UInt32, loadEndAddress: UInt32,
                         bssEndAddress: UInt32, entryAddress: UInt32) -> [UInt8] {
    var image = pattern(size, seed: 42)
    let header = multibootHeader(flags: 1 << 16) + [headerAddress, loadAddress, loadEndAddress, bssEndAddress, entryAddress].flatMap(le32)
    image.replaceSubrange(headerOffset..<headerOffset + header.count, with: header)
    return image
}

private func multibootHeader(flags: UInt32) -> [UInt8] {
    le32(0x1BAD_B002) + le32(flags) + le32(0 &- 0x1BAD_B002 &- flags)
}

/// Bytes in 1...127: never zero (so .bss is visible), never the RAM fill, never part of a header magic.
private func pattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(1 + ($0 &* 7 &+ seed) % 127) }
}

private func poke(_ image: inout [UInt8], programHeader: Int, field: Int, _ value: UInt32) {
    let offset = 52 + 32 * programHeader + field
    image.replaceSubrange(offset..<offset + 4, with: le32(value))
}

private func le16(_ value: UInt16) -> [UInt8] { [UInt8(value & 0xFF), UInt8(value >> 8)] }
private func le32(_ value: UInt32) -> [UInt8] { le16(UInt16(value & 0xFFFF)) + le16(UInt16(value >> 16)) }
private func le64(_ value: UInt64) -> [UInt8] { le32(UInt32(value & 0xFFFF_FFFF)) + le32(UInt32(value >> 32)) }

/// Deterministic pseudo-random numbers for the mutation test.
private struct SplitMix64 {
    var state: UInt64

    mutating func next(below bound: Int) -> Int {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return Int((z ^ (z >> 31)) % UInt64(max(bound, 1)))
    }
}

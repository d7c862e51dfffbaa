// Multiboot v1 (specification 0.6.96) image loader.
//
// This runs in the sandboxed bios device and the image is untrusted: every read of the image is bounds-checked,
// every sum is overflow-checked, and nothing is written to guest memory until the whole image has been validated,
// so a hostile image yields a MultibootError and leaves guest RAM untouched.

/// Loads a Multiboot v1 kernel (ELF32 or a.out kludge) into guest memory.
public struct MultibootLoader: Sendable {
    private let image: [UInt8]

    /// Creates a loader for `image`, the complete kernel file.
    ///
    /// The loader keeps its own copy of the bytes (an array rather than a borrowed pointer), so it may outlive
    /// the buffer the file was read into.
    public init(image: [UInt8]) {
        self.image = image
    }

    /// Parses and validates the header, loads the image into `memory`, writes the multiboot information structure
    /// and the command line into low memory, and returns the entry state.
    ///
    /// - Image segments must lie within [0x100000, `ramSize`): the low 1 MiB belongs to the firmware (IVT, BDA,
    ///   EBDA, VGA window, BIOS ROM) and to the multiboot information, so `ramSize` must exceed 1 MiB.
    /// - The information structure (flags: memory bounds, command line, e820-style memory map, boot loader name
    ///   "hv"), the memory map and the strings are written within [0x10000, 0x9FC00), leaving [0x500, 0x10000)
    ///   to the firmware.
    /// - Everything is validated before the first write, so on error `memory` is unchanged (except for a
    ///   `.guestMemory` error, which means `memory` refused a write the loader had checked against `ramSize`).
    public func load(into memory: some GuestPhysicalMemory, commandLine: String) throws(MultibootError) -> MultibootEntry {
        let ramSize = memory.ramSize
        guard ramSize > Layout.highMemoryStart else { throw .ramTooSmall(ramSize: ramSize) }

        let header = try MultibootHeader.find(in: image)
        let (segments, entryPoint) = if let kludge = header.kludge { try kludgeSegments(kludge) } else { try elfSegments() }

        for segment in segments { try segment.checkPlacement(ramSize: ramSize) }
        let sorted = segments.sorted { ($0.address, $0.index) < ($1.address, $1.index) }
        for (lower, upper) in zip(sorted, sorted.dropFirst()) where upper.address < lower.end {
            throw .segmentsOverlap(first: lower.index, second: upper.index)
        }
        guard sorted.contains(where: { $0.address <= UInt64(entryPoint) && UInt64(entryPoint) < $0.end }) else {
            throw .entryOutsideLoadedImage(entryPoint: entryPoint)
        }
        // Segments start at or above 1 MiB and the information area ends below 0x9FC00, so they cannot overlap.
        let info = try InformationArea(ramSize: ramSize, commandLine: commandLine)

        for segment in segments { try segment.load(from: image, into: memory) }
        try info.write(into: memory)
        return MultibootEntry(
            entryPoint: entryPoint,
            infoAddress: UInt32(Layout.infoAreaStart),
            loadedRanges: sorted.map { MultibootEntry.LoadedRange(start: $0.address, end: $0.end) })
    }

    /// The single segment described by the a.out kludge address fields (header flag bit 16).
    private func kludgeSegments(_ kludge: MultibootHeader.Kludge) throws(MultibootError) -> ([Segment], UInt32) {
        let load = kludge.loadAddress
        guard kludge.headerAddress >= load else {
            throw .kludgeHeaderBelowLoadAddress(headerAddress: kludge.headerAddress, loadAddress: load)
        }
        // The file offset of load_addr is the header's offset minus the header's distance from load_addr.
        let headerOffset = UInt64(kludge.headerOffset)
        let headerDistance = UInt64(kludge.headerAddress - load)
        guard headerDistance <= headerOffset else {
            throw .kludgeLoadStartBeforeFile(headerOffset: headerOffset, headerAddress: kludge.headerAddress, loadAddress: load)
        }
        let fileOffset = headerOffset - headerDistance

        let fileSize: UInt64
        if kludge.loadEndAddress == 0 {  // 0: load to the end of the file.
            fileSize = UInt64(image.count) - fileOffset
        } else {
            guard kludge.loadEndAddress >= load else {
                throw .kludgeLoadEndBelowLoadAddress(loadEndAddress: kludge.loadEndAddress, loadAddress: load)
            }
            fileSize = UInt64(kludge.loadEndAddress - load)
        }

        let memorySize: UInt64
        if kludge.bssEndAddress == 0 {  // 0: no .bss.
            memorySize = fileSize
        } else {
            guard kludge.bssEndAddress >= load, UInt64(kludge.bssEndAddress - load) >= fileSize else {
                throw .kludgeBSSEndBelowLoadEnd(bssEndAddress: kludge.bssEndAddress, loadAddress: load, loadSize: fileSize)
            }
            memorySize = UInt64(kludge.bssEndAddress - load)
        }
        let segment = try Segment(index: 0, fileOffset: fileOffset, fileSize: fileSize, address: UInt64(load),
                                  memorySize: memorySize, imageSize: image.count)
        return ([segment], kludge.entryAddress)
    }

    /// The PT_LOAD segments of an ELF32 i386 executable, placed at their physical addresses.
    private func elfSegments() throws(MultibootError) -> ([Segment], UInt32) {
        guard let ident = LittleEndianWindow(image, offset: 0, count: ELF.identSize), ident.u32(0) == ELF.magic else {
            throw .notELF
        }
        guard ident.u8(4) == ELF.class32 else { throw .elfNot32Bit(elfClass: ident.u8(4)) }
        guard ident.u8(5) == ELF.littleEndian else { throw .elfNotLittleEndian(dataEncoding: ident.u8(5)) }
        guard let header = LittleEndianWindow(image, offset: 0, count: ELF.headerSize) else {
            throw .elfTruncated(needed: ELF.headerSize, imageSize: UInt64(image.count))
        }
        guard header.u16(18) == ELF.machine386 else { throw .elfWrongMachine(machine: header.u16(18)) }
        guard header.u16(16) == ELF.typeExecutable else { throw .elfNotExecutable(type: header.u16(16)) }

        let tableOffset = UInt64(header.u32(28))
        let entrySize = UInt64(header.u16(42))
        let count = UInt64(header.u16(44))
        guard count == 0 || entrySize >= ELF.programHeaderSize else {
            throw .elfProgramHeaderTooSmall(entrySize: header.u16(42))
        }
        // A 16-bit count times a 16-bit size is below 2^32, so neither the product nor the sum with the
        // 32-bit offset can overflow 64 bits.
        let tableSize = count * entrySize
        guard let table = LittleEndianWindow(image, offset: tableOffset, count: tableSize) else {
            throw .elfTruncated(needed: tableOffset + tableSize, imageSize: UInt64(image.count))
        }

        var segments: [Segment] = []
        for index in 0..<count {
            let entry = table.window(offset: index * entrySize, count: ELF.programHeaderSize)
            let fileSize = UInt64(entry.u32(16)), memorySize = UInt64(entry.u32(20))
            guard entry.u32(0) == ELF.loadSegment, fileSize != 0 || memorySize != 0 else { continue }
            segments.append(try Segment(index: Int(index), fileOffset: UInt64(entry.u32(4)), fileSize: fileSize,
                                        address: UInt64(entry.u32(12)), memorySize: memorySize,
                                        imageSize: image.count))
        }
        guard !segments.isEmpty else { throw .elfNoLoadableSegments }
        return (segments, header.u32(24))
    }
}

/// The state a multiboot kernel is entered with: 32-bit protected mode, paging off, EAX = `bootloaderMagic`,
/// EBX = `infoAddress`, EIP = `entryPoint` (Multiboot 0.6.96 §3.2).
public struct MultibootEntry: Equatable, Sendable {
    /// A half-open guest-physical range [start, end) the image occupies.
    public struct LoadedRange: Equatable, Sendable {
        /// First byte of the range.
        public var start: UInt64
        /// One past the last byte of the range.
        public var end: UInt64

        /// The range [start, end).
        public init(start: UInt64, end: UInt64) {
            self.start = start
            self.end = end
        }
    }

    /// EIP: the kernel's entry point.
    public var entryPoint: UInt32
    /// EBX: guest-physical address of the multiboot information structure.
    public var infoAddress: UInt32
    /// EAX: tells the kernel a multiboot-compliant loader started it.
    public static let bootloaderMagic: UInt32 = 0x2BAD_B002
    /// The ranges the image's segments occupy (including zero-filled .bss), sorted by start; the information
    /// area is not included.
    public var loadedRanges: [LoadedRange]
}

/// Why an image could not be loaded. Segment indices are ELF program-header indices; an a.out-kludge image
/// has the single segment 0.
public enum MultibootError: Error, Equatable, CustomStringConvertible {
    /// Guest RAM is not larger than 1 MiB, so there is nowhere to load a kernel.
    case ramTooSmall(ramSize: UInt64)
    /// No 4-byte-aligned header with magic 0x1BADB002 and a valid checksum in the first 8192 bytes.
    case noHeader
    /// A valid header exists, but not entirely within the first 8192 bytes.
    case headerOutsideSearchWindow(offset: UInt64)
    /// A header magic was found whose checksum does not make magic + flags + checksum zero.
    case headerChecksumMismatch(offset: UInt64, flags: UInt32, checksum: UInt32)
    /// The header sets flag bit 16, but its a.out kludge address fields run past the file or the 8192-byte window.
    case headerTruncated(offset: UInt64, needed: UInt64, available: UInt64)
    /// The header requires features (bits 0–15 of its flags) this loader does not provide.
    case unsupportedRequiredFeatures(unsupportedFlags: UInt32)
    /// a.out kludge: header_addr is below load_addr.
    case kludgeHeaderBelowLoadAddress(headerAddress: UInt32, loadAddress: UInt32)
    /// a.out kludge: header_addr − load_addr exceeds the header's file offset, so loading would start before the file.
    case kludgeLoadStartBeforeFile(headerOffset: UInt64, headerAddress: UInt32, loadAddress: UInt32)
    /// a.out kludge: load_end_addr is nonzero and below load_addr.
    case kludgeLoadEndBelowLoadAddress(loadEndAddress: UInt32, loadAddress: UInt32)
    /// a.out kludge: bss_end_addr is nonzero and below the end of the loaded data (load_addr + loadSize).
    case kludgeBSSEndBelowLoadEnd(bssEndAddress: UInt32, loadAddress: UInt32, loadSize: UInt64)
    /// Flag bit 16 is clear and the image is not an ELF file.
    case notELF
    /// The ELF class is not ELFCLASS32 (for example an ELF64 kernel).
    case elfNot32Bit(elfClass: UInt8)
    /// The ELF data encoding is not little-endian.
    case elfNotLittleEndian(dataEncoding: UInt8)
    /// The ELF header or program header table runs past the end of the file.
    case elfTruncated(needed: UInt64, imageSize: UInt64)
    /// e_machine is not EM_386.
    case elfWrongMachine(machine: UInt16)
    /// e_type is not ET_EXEC.
    case elfNotExecutable(type: UInt16)
    /// e_phentsize is smaller than an ELF32 program header.
    case elfProgramHeaderTooSmall(entrySize: UInt16)
    /// The ELF image has no non-empty PT_LOAD segment.
    case elfNoLoadableSegments
    /// A segment's file size (p_filesz) exceeds its memory size (p_memsz).
    case segmentFileSizeExceedsMemorySize(segment: Int, fileSize: UInt64, memorySize: UInt64)
    /// A segment's file bytes run past the end of the image.
    case segmentDataBeyondFile(segment: Int, fileOffset: UInt64, fileSize: UInt64, imageSize: UInt64)
    /// A segment runs past 4 GiB, the end of the 32-bit physical address space.
    case segmentBeyond4GiB(segment: Int, address: UInt64, memorySize: UInt64)
    /// A segment starts below 1 MiB, which belongs to the firmware and the multiboot information.
    case segmentBelowOneMiB(segment: Int, start: UInt64, end: UInt64)
    /// A segment ends past the end of guest RAM.
    case segmentBeyondRAM(segment: Int, start: UInt64, end: UInt64, ramSize: UInt64)
    /// Two segments occupy some of the same guest-physical bytes.
    case segmentsOverlap(first: Int, second: Int)
    /// The entry point is not inside any loaded segment.
    case entryOutsideLoadedImage(entryPoint: UInt32)
    /// The command line contains a NUL byte, which would silently truncate it.
    case commandLineContainsNUL
    /// The command line does not fit in the information area.
    case commandLineTooLong(length: UInt64, maximum: UInt64)
    /// Guest memory refused a write the loader had checked against `ramSize`.
    case guestMemory(GuestMemoryError)

    /// One line naming what is wrong and what to do about it.
    public var description: String {
        switch self {
        case .ramTooSmall(let ramSize):
            return "guest RAM (\(hex(ramSize)) bytes) must be larger than 1 MiB: multiboot kernels load at or above 0x100000; give the guest more memory"
        case .noHeader:
            return "not a multiboot image: no multiboot header (magic 0x1BADB002) in the first 8192 bytes"
        case .headerOutsideSearchWindow(let offset):
            return "multiboot header at file offset \(hex(offset)) is not within the first 8192 bytes; link it at the start of the image"
        case .headerChecksumMismatch(let offset, let flags, let checksum):
            return "multiboot header at file offset \(hex(offset)) has checksum \(hex(checksum)) but flags \(hex(flags)) need \(hex(0 &- (MultibootHeader.magic &+ flags))); fix the checksum"
        case .headerTruncated(let offset, let needed, let available):
            return "multiboot header at file offset \(hex(offset)) sets the a.out kludge flag (bit 16) and needs \(needed) bytes, but only \(available) remain in the file's first 8192 bytes; the image is truncated"
        case .unsupportedRequiredFeatures(let flags):
            return "multiboot header requires unsupported features (flag bits \(hex(flags))); only bits 0, 1 and 2 of bits 0–15 are supported"
        case .kludgeHeaderBelowLoadAddress(let header, let load):
            return "a.out kludge header_addr \(hex(header)) is below load_addr \(hex(load)); header_addr must be where the header itself is loaded"
        case .kludgeLoadStartBeforeFile(let offset, let header, let load):
            return "a.out kludge header_addr − load_addr (\(hex(header)) − \(hex(load))) exceeds the header's file offset \(hex(offset)), so loading would start before the file; fix header_addr or load_addr"
        case .kludgeLoadEndBelowLoadAddress(let loadEnd, let load):
            return "a.out kludge load_end_addr \(hex(loadEnd)) is below load_addr \(hex(load)); use 0 to load to the end of the file"
        case .kludgeBSSEndBelowLoadEnd(let bssEnd, let load, let size):
            return "a.out kludge bss_end_addr \(hex(bssEnd)) is below the end of the loaded data (load_addr \(hex(load)) + \(hex(size))); use 0 for no .bss"
        case .notELF:
            return "multiboot header does not set the a.out kludge flag (bit 16) and the image is not ELF; build an ELF32 kernel or set bit 16 with load addresses"
        case .elfNot32Bit(let elfClass):
            return "ELF class \(elfClass) is not ELFCLASS32 (1); multiboot v1 loads 32-bit kernels only, build for i386"
        case .elfNotLittleEndian(let encoding):
            return "ELF data encoding \(encoding) is not little-endian (1); build for i386"
        case .elfTruncated(let needed, let size):
            return "ELF headers need \(needed) bytes but the image has \(size); the image is truncated or its header is corrupt"
        case .elfWrongMachine(let machine):
            return "ELF e_machine \(machine) is not EM_386 (3); build the kernel for i386"
        case .elfNotExecutable(let type):
            return "ELF e_type \(type) is not ET_EXEC (2); link the kernel as a static executable"
        case .elfProgramHeaderTooSmall(let size):
            return "ELF e_phentsize \(size) is smaller than the 32-byte ELF32 program header; the ELF header is corrupt"
        case .elfNoLoadableSegments:
            return "ELF image has no non-empty PT_LOAD segment; there is nothing to load, check the linker script"
        case .segmentFileSizeExceedsMemorySize(let segment, let fileSize, let memorySize):
            return "segment \(segment) file size \(hex(fileSize)) exceeds its memory size \(hex(memorySize)); the program header is corrupt"
        case .segmentDataBeyondFile(let segment, let offset, let size, let imageSize):
            return "segment \(segment) needs \(hex(size)) file bytes at offset \(hex(offset)) but the image has \(hex(imageSize)) bytes; the image is truncated or its header is corrupt"
        case .segmentBeyond4GiB(let segment, let address, let size):
            return "segment \(segment) at \(hex(address)) with size \(hex(size)) runs past 4 GiB, the end of the 32-bit physical address space; fix its load address"
        case .segmentBelowOneMiB(let segment, let start, let end):
            return "segment \(segment) [\(hex(start)), \(hex(end))) starts below 1 MiB, which belongs to the firmware; link the kernel at or above 0x100000"
        case .segmentBeyondRAM(let segment, let start, let end, let ramSize):
            return "segment \(segment) [\(hex(start)), \(hex(end))) ends past guest RAM (\(hex(ramSize)) bytes); give the guest more memory or fix the load address"
        case .segmentsOverlap(let first, let second):
            return "segments \(first) and \(second) overlap in guest memory; fix the load addresses in the linker script"
        case .entryOutsideLoadedImage(let entry):
            return "entry point \(hex(entry)) is not inside any loaded segment; fix the ELF e_entry or the a.out kludge entry_addr"
        case .commandLineContainsNUL:
            return "kernel command line contains a NUL byte, which would truncate it; remove it"
        case .commandLineTooLong(let length, let maximum):
            return "kernel command line is \(length) bytes but at most \(maximum) fit in the multiboot information area; shorten it"
        case .guestMemory(let error):
            return "guest memory refused a write of \(hex(error.count)) bytes at \(hex(error.address)); its mapping is smaller than its reported ramSize"
        }
    }
}

/// Guest-physical layout the loader relies on.
private enum Layout {
    /// Segments load at or above 1 MiB; everything below belongs to the firmware and the information area.
    static let highMemoryStart: UInt64 = 0x10_0000
    /// Conventional memory ends where the EBDA starts.
    static let lowMemoryEnd: UInt64 = 0x9_FC00
    /// The information area runs from here to `lowMemoryEnd`: above the IVT, BDA and the firmware's own low
    /// structures.
    static let infoAreaStart: UInt64 = 0x1_0000
    /// Segments must end at or below 4 GiB: the kernel starts with 32-bit addressing.
    static let fourGiB: UInt64 = 1 << 32
}

/// ELF constants (System V ABI, ELF32).
private enum ELF {
    static let magic: UInt32 = 0x464C_457F  // "\x7FELF" read little-endian
    static let identSize: UInt64 = 16
    static let headerSize: UInt64 = 52
    static let programHeaderSize: UInt64 = 32
    static let class32: UInt8 = 1
    static let littleEndian: UInt8 = 1
    static let typeExecutable: UInt16 = 2
    static let machine386: UInt16 = 3
    static let loadSegment: UInt32 = 1
}

/// The multiboot header fields the loader uses (Multiboot 0.6.96 §3.1).
private struct MultibootHeader {
    /// The a.out kludge address fields, valid when flag bit 16 is set.
    struct Kludge {
        let headerOffset: Int
        let headerAddress: UInt32
        let loadAddress: UInt32
        let loadEndAddress: UInt32
        let bssEndAddress: UInt32
        let entryAddress: UInt32
    }

    static let magic: UInt32 = 0x1BAD_B002
    static let searchWindow = 8192
    static let baseSize = 12
    static let kludgeSize = 32
    static let kludgeFlag: UInt32 = 1 << 16
    /// Bits 0–15 are requirements the loader must refuse if it does not understand them. Supported:
    /// 0 (page-align modules: no modules are loaded), 1 (memory information: always provided), and
    /// 2 (video mode: accepted and ignored; the information structure's video flags stay clear, telling the
    /// kernel no mode was set, and the video fields at offsets 32–47 are not read).
    static let supportedRequirements: UInt32 = 0b111

    let kludge: Kludge?

    /// The first 4-byte-aligned header with a valid checksum, which must lie within the first 8192 bytes.
    /// The search continues past 8192 bytes only to tell a misplaced header from a missing one.
    static func find(in image: [UInt8]) throws(MultibootError) -> MultibootHeader {
        var checksumMismatch: MultibootError?
        var offset = 0
        while let fields = LittleEndianWindow(image, offset: UInt64(offset), count: UInt64(baseSize)) {
            let inWindow = offset + baseSize <= searchWindow
            let flags = fields.u32(4), checksum = fields.u32(8)
            if fields.u32(0) == magic {
                if magic &+ flags &+ checksum == 0 {
                    guard inWindow else { throw .headerOutsideSearchWindow(offset: UInt64(offset)) }
                    return try MultibootHeader(image: image, offset: offset, flags: flags)
                }
                if inWindow, checksumMismatch == nil {
                    checksumMismatch = .headerChecksumMismatch(offset: UInt64(offset), flags: flags, checksum: checksum)
                }
            }
            offset += 4
        }
        throw checksumMismatch ?? .noHeader
    }

    private init(image: [UInt8], offset: Int, flags: UInt32) throws(MultibootError) {
        let unsupported = flags & 0xFFFF & ~Self.supportedRequirements
        guard unsupported == 0 else { throw .unsupportedRequiredFeatures(unsupportedFlags: unsupported) }
        guard flags & Self.kludgeFlag != 0 else {
            kludge = nil
            return
        }
        let available = min(image.count, Self.searchWindow) - offset
        guard available >= Self.kludgeSize,
              let fields = LittleEndianWindow(image, offset: UInt64(offset), count: UInt64(Self.kludgeSize)) else {
            throw .headerTruncated(offset: UInt64(offset), needed: UInt64(Self.kludgeSize), available: UInt64(available))
        }
        kludge = Kludge(headerOffset: offset, headerAddress: fields.u32(12), loadAddress: fields.u32(16),
                        loadEndAddress: fields.u32(20), bssEndAddress: fields.u32(24), entryAddress: fields.u32(28))
    }
}

/// A range of the image to place in guest memory: `fileSize` bytes from the image, then zeros up to `memorySize`.
/// Construction checks everything that does not depend on guest RAM.
private struct Segment {
    let index: Int
    let fileOffset: UInt64
    let fileSize: UInt64
    let address: UInt64
    let memorySize: UInt64
    /// One past the last byte; at most 4 GiB.
    let end: UInt64

    init(index: Int, fileOffset: UInt64, fileSize: UInt64, address: UInt64, memorySize: UInt64,
         imageSize: Int) throws(MultibootError) {
        guard fileSize <= memorySize else {
            throw .segmentFileSizeExceedsMemorySize(segment: index, fileSize: fileSize, memorySize: memorySize)
        }
        // An empty file part reads nothing, so its offset is irrelevant (pure .bss segments).
        let size = UInt64(imageSize)
        guard fileSize == 0 || (fileOffset <= size && fileSize <= size - fileOffset) else {
            throw .segmentDataBeyondFile(segment: index, fileOffset: fileOffset, fileSize: fileSize, imageSize: size)
        }
        let (end, overflow) = address.addingReportingOverflow(memorySize)
        guard !overflow, end <= Layout.fourGiB else {
            throw .segmentBeyond4GiB(segment: index, address: address, memorySize: memorySize)
        }
        self.index = index
        self.fileOffset = fileOffset
        self.fileSize = fileSize
        self.address = address
        self.memorySize = memorySize
        self.end = end
    }

    func checkPlacement(ramSize: UInt64) throws(MultibootError) {
        guard address >= Layout.highMemoryStart else { throw .segmentBelowOneMiB(segment: index, start: address, end: end) }
        guard end <= ramSize else { throw .segmentBeyondRAM(segment: index, start: address, end: end, ramSize: ramSize) }
    }

    /// Copies the file bytes and zero-fills the rest; only called after every check has passed.
    func load(from image: [UInt8], into memory: some GuestPhysicalMemory) throws(MultibootError) {
        if fileSize > 0 {
            try copy(image[Int(fileOffset)..<Int(fileOffset + fileSize)], to: address, in: memory)
        }
        if memorySize > fileSize {
            do throws(GuestMemoryError) {
                try memory.zero(at: address + fileSize, count: memorySize - fileSize)
            } catch {
                throw .guestMemory(error)
            }
        }
    }
}

/// The multiboot information structure, its memory map, the boot loader name and the command line, laid out
/// contiguously from `Layout.infoAreaStart`.
private struct InformationArea {
    private static let structureSize = 88  // Through vbe_interface_len, the last field of 0.6.96.
    private static let mapEntrySize = 24   // A 4-byte size field (20, which excludes itself) then 20 bytes.
    private static let loaderName = Array("hv".utf8) + [0]
    /// Flags: mem_lower/mem_upper (bit 0), cmdline (bit 2), mmap (bit 6), boot_loader_name (bit 9).
    private static let flags: UInt32 = 1 << 0 | 1 << 2 | 1 << 6 | 1 << 9

    private let bytes: [UInt8]

    init(ramSize: UInt64, commandLine: String) throws(MultibootError) {
        let command = Array(commandLine.utf8)
        guard !command.contains(0) else { throw .commandLineContainsNUL }

        // BIOS e820 style: type 1 is usable RAM, type 2 reserved (EBDA; BIOS ROM). ramSize > 1 MiB was checked.
        let map: [(base: UInt64, length: UInt64, type: UInt32)] = [
            (0, Layout.lowMemoryEnd, 1),
            (Layout.lowMemoryEnd, 0xA_0000 - Layout.lowMemoryEnd, 2),
            (0xF_0000, 0x1_0000, 2),
            (Layout.highMemoryStart, ramSize - Layout.highMemoryStart, 1),
        ]
        let mapOffset = Self.structureSize
        let nameOffset = mapOffset + map.count * Self.mapEntrySize
        let commandOffset = nameOffset + Self.loaderName.count
        let maximum = Int(Layout.lowMemoryEnd - Layout.infoAreaStart) - commandOffset - 1  // Leave room for the NUL.
        guard command.count <= maximum else {
            throw .commandLineTooLong(length: UInt64(command.count), maximum: UInt64(maximum))
        }

        var bytes = [UInt8](repeating: 0, count: Self.structureSize)
        bytes.storeLE(Self.flags, at: 0)
        bytes.storeLE(UInt32(Layout.lowMemoryEnd / 1024), at: 4)  // mem_lower, KiB from 0.
        bytes.storeLE(UInt32(min((ramSize - Layout.highMemoryStart) / 1024, UInt64(UInt32.max))), at: 8)  // mem_upper, KiB from 1 MiB.
        bytes.storeLE(Self.address(of: commandOffset), at: 16)
        bytes.storeLE(UInt32(map.count * Self.mapEntrySize), at: 44)
        bytes.storeLE(Self.address(of: mapOffset), at: 48)
        bytes.storeLE(Self.address(of: nameOffset), at: 64)
        for entry in map {
            bytes.appendLE(UInt32(Self.mapEntrySize - 4))
            bytes.appendLE(entry.base)
            bytes.appendLE(entry.length)
            bytes.appendLE(entry.type)
        }
        bytes += Self.loaderName
        bytes += command
        bytes.append(0)
        self.bytes = bytes
    }

    /// The guest-physical address of an offset into the area; the area lies below 0x9FC00, so it fits 32 bits.
    private static func address(of offset: Int) -> UInt32 {
        UInt32(Layout.infoAreaStart) + UInt32(offset)
    }

    func write(into memory: some GuestPhysicalMemory) throws(MultibootError) {
        try copy(bytes[...], to: Layout.infoAreaStart, in: memory)
    }
}

/// Writes `bytes` to guest memory at `address`. `withUnsafeBytes` only rethrows untyped errors, so the typed
/// error comes back out as a Result.
private func copy(_ bytes: ArraySlice<UInt8>, to address: UInt64, in memory: some GuestPhysicalMemory) throws(MultibootError) {
    let result = bytes.withUnsafeBytes { raw in
        Result { () throws(GuestMemoryError) in try memory.write(raw, at: address) }
    }
    if case .failure(let error) = result { throw .guestMemory(error) }
}

/// A bounds-checked window onto part of the image, read little-endian at offsets fixed by the parser.
/// Creating the window is the only check hostile input can fail; reads stay within the window's count.
private struct LittleEndianWindow {
    private let bytes: ArraySlice<UInt8>

    /// The `count` bytes at `offset`, or nil if they run past the end of `image`.
    init?(_ image: [UInt8], offset: UInt64, count: UInt64) {
        let size = UInt64(image.count)
        guard offset <= size, count <= size - offset else { return nil }  // Compare before adding.
        bytes = image[Int(offset)..<Int(offset + count)]
    }

    /// A sub-window that the caller has already bounded by this window's checked size.
    func window(offset: UInt64, count: UInt64) -> LittleEndianWindow {
        let start = bytes.startIndex + Int(offset)
        return LittleEndianWindow(bytes: bytes[start..<start + Int(count)])
    }

    private init(bytes: ArraySlice<UInt8>) {
        self.bytes = bytes
    }

    func u8(_ offset: Int) -> UInt8 {
        bytes[bytes.startIndex + offset]
    }

    func u16(_ offset: Int) -> UInt16 {
        UInt16(u8(offset)) | UInt16(u8(offset + 1)) << 8
    }

    func u32(_ offset: Int) -> UInt32 {
        UInt32(u16(offset)) | UInt32(u16(offset + 2)) << 16
    }
}

extension [UInt8] {
    fileprivate mutating func storeLE(_ value: UInt32, at offset: Int) {
        for byte in 0..<4 { self[offset + byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
    }

    fileprivate mutating func appendLE(_ value: some FixedWidthInteger) {
        for byte in 0..<value.bitWidth / 8 { append(UInt8(truncatingIfNeeded: value >> (8 * byte))) }
    }
}

private func hex(_ value: some BinaryInteger) -> String {
    "0x" + String(value, radix: 16)
}

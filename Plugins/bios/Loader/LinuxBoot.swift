// The Linux x86 boot protocol, 64-bit entry (Documentation/arch/x86/boot.rst, protocol 2.12+).
//
// This runs in the sandboxed bios device and the kernel image is untrusted: every field is read
// with bounds checks, every sum is overflow-checked, and nothing is written to guest memory until
// the whole layout has been validated, so a hostile image yields a LinuxBootError and leaves guest
// RAM untouched.

/// Fixed guest-physical places of the loader's own structures, all in conventional memory below
/// the EBDA and away from the kernel (loaded at 1 MiB or above).
public enum LinuxBootLayout {
    /// The boot GDT: null, null, __BOOT_CS (0x10), __BOOT_DS (0x18).
    public static let gdt: UInt64 = 0x500
    public static let gdtLimit: UInt16 = 4 * 8 - 1
    /// struct boot_params, the "zero page".
    public static let bootParams: UInt64 = 0x7000
    /// The stack pointer handed over (the protocol requires none; the kernel sets its own).
    public static let stackTop: UInt64 = 0x8FF0
    /// Identity page tables for the first 4 GiB with 2 MiB pages: PML4, one PDPT, four PDs.
    public static let pageTables: UInt64 = 0x9000
    public static let pageTableBytes: UInt64 = 6 * 4096
    /// The kernel command line (NUL-terminated), at most `commandLineCapacity` bytes with the NUL.
    public static let commandLine: UInt64 = 0x2_0000
    public static let commandLineCapacity: UInt64 = 0x1_0000
}

/// The fields of struct setup_header a 64-bit loader reads, at their offsets in the image.
public struct LinuxSetupHeader: Equatable, Sendable {
    /// Offsets in the image file and in boot_params (the header sits at 0x1F1 in both).
    enum Offset {
        static let setupSects = 0x1F1, bootFlag = 0x1FE, jump = 0x200, magic = 0x202, version = 0x206
        static let typeOfLoader = 0x210, loadflags = 0x211, ramdiskImage = 0x218, ramdiskSize = 0x21C
        static let cmdLinePtr = 0x228, initrdAddrMax = 0x22C, kernelAlignment = 0x230, relocatable = 0x234
        static let xloadflags = 0x236, cmdlineSize = 0x238, prefAddress = 0x258, initSize = 0x260
    }
    public static let magic: UInt32 = 0x5372_6448  // "HdrS"
    /// xloadflags bit 0: the kernel has the 64-bit entry point at its start + 0x200.
    public static let kernel64: UInt16 = 1 << 0
    /// loadflags bit 0: the protected-mode part is loaded at 1 MiB or above (a bzImage).
    public static let loadedHigh: UInt8 = 1 << 0

    /// Sectors of the real-mode part after the boot sector (0 means 4).
    public var setupSectors: Int
    public var version: UInt16
    public var loadflags: UInt8
    public var xloadflags: UInt16
    public var initrdAddressMax: UInt32
    public var kernelAlignment: UInt32
    public var relocatable: Bool
    /// Longest command line the kernel accepts, without the terminating NUL.
    public var commandLineSize: UInt32
    public var preferredAddress: UInt64
    /// Memory the kernel needs from its load address before it reads the memory map.
    public var initSize: UInt32
    /// Where struct setup_header ends in the image: 0x202 + the jump's displacement byte.
    public var headerEnd: Int

    /// File offset of the protected-mode part.
    public var kernelOffset: Int { (setupSectors + 1) * 512 }

    /// Reads and validates the header of `image`.
    public init(image: [UInt8]) throws(LinuxBootError) {
        guard image.count >= 0x264 else { throw .imageTooSmall(size: image.count) }
        func u8(_ o: Int) -> UInt8 { image[o] }
        func u16(_ o: Int) -> UInt16 { UInt16(image[o]) | UInt16(image[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
        func u64(_ o: Int) -> UInt64 { UInt64(u32(o)) | UInt64(u32(o + 4)) << 32 }
        guard u16(Offset.bootFlag) == 0xAA55, u32(Offset.magic) == Self.magic else { throw .notABzImage }
        version = u16(Offset.version)
        guard version >= 0x020C else { throw .protocolTooOld(version: version) }
        xloadflags = u16(Offset.xloadflags)
        guard xloadflags & Self.kernel64 != 0 else { throw .no64BitEntry }
        loadflags = u8(Offset.loadflags)
        guard loadflags & Self.loadedHigh != 0 else { throw .notLoadedHigh }
        let sects = Int(u8(Offset.setupSects))
        setupSectors = sects == 0 ? 4 : sects
        initrdAddressMax = u32(Offset.initrdAddrMax)
        kernelAlignment = u32(Offset.kernelAlignment)
        relocatable = u8(Offset.relocatable) != 0
        commandLineSize = u32(Offset.cmdlineSize)
        preferredAddress = u64(Offset.prefAddress)
        initSize = u32(Offset.initSize)
        headerEnd = 0x202 + Int(u8(Offset.jump + 1))
        guard image.count > kernelOffset else { throw .imageTooSmall(size: image.count) }
        // A 2.12+ header reaches at least init_size. (It cannot pass the real-mode part: that is
        // at least 1 KiB and the jump byte reaches 0x301 at most.)
        guard headerEnd >= Offset.initSize + 4 else { throw .badHeaderLength(end: headerEnd) }
    }
}

/// Why a kernel could not be loaded.
public enum LinuxBootError: Error, Equatable, CustomStringConvertible, Sendable {
    case imageTooSmall(size: Int)
    case notABzImage
    case protocolTooOld(version: UInt16)
    case no64BitEntry
    case notLoadedHigh
    case badHeaderLength(end: Int)
    case badLoadAddress(UInt64)
    case ramTooSmall(needed: UInt64, have: UInt64)
    case commandLineTooLong(length: Int, maximum: UInt64)
    case initrdDoesNotFit(size: UInt64, lowest: UInt64, highest: UInt64)
    case guestMemory(GuestMemoryError)

    public var description: String {
        func mib(_ v: UInt64) -> String { "\((v + (1 << 20) - 1) >> 20) MiB" }
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .imageTooSmall(let size):
            return "the kernel is \(size) bytes, too small for a bzImage (truncated?)"
        case .notABzImage:
            return "the kernel is not a bzImage: no 0xAA55 boot flag and \"HdrS\" setup header (give arch/x86/boot/bzImage, not vmlinux)"
        case .protocolTooOld(let v):
            return "the kernel speaks boot protocol \(v >> 8).\(String(format2: v & 0xFF)); hv needs 2.12 or later (Linux 3.8+) for the 64-bit entry"
        case .no64BitEntry:
            return "the kernel has no 64-bit entry point (xloadflags bit 0 clear): hv boots 64-bit x86 kernels only"
        case .notLoadedHigh:
            return "the kernel is a zImage (loadflags LOADED_HIGH clear): hv boots bzImages only"
        case .badHeaderLength(let end):
            return "the kernel's setup header is malformed (it claims to end at offset \(hex(UInt64(end))))"
        case .badLoadAddress(let a):
            return "the kernel asks to be loaded at \(hex(a)), below 1 MiB or not aligned to 4 KiB"
        case .ramTooSmall(let needed, let have):
            return "the kernel needs \(mib(needed)) of RAM below 4 GiB, the VM has \(mib(have)): raise --memory"
        case .commandLineTooLong(let length, let maximum):
            return "the command line is \(length) bytes; this kernel accepts at most \(maximum)"
        case .initrdDoesNotFit(let size, let lowest, let highest):
            return "the initrd (\(mib(size))) does not fit between the kernel's end (\(hex(lowest))) and the highest address the kernel accepts or RAM reaches (\(hex(highest))): raise --memory"
        case .guestMemory(let e):
            return "guest RAM refused a write of \(e.count) bytes at \(hex(e.address))"
        }
    }
}

private extension String {
    /// Two decimal digits, for protocol minor versions.
    init(format2 v: UInt16) { self = v < 10 ? "0\(v)" : "\(v)" }
}

/// What the loader put where, and the entry state for the boot vCPU.
public struct LinuxEntry: Equatable, Sendable {
    /// The 64-bit entry point: the load address + 0x200.
    public var entryPoint: UInt64
    public var bootParams: UInt64
    public var pageTableRoot: UInt64
    public var gdtBase: UInt64
    public var gdtLimit: UInt16
    public var stackPointer: UInt64
    public var kernelAddress: UInt64
    /// Guest-physical address and size of the initrd (0, 0 without one).
    public var initrdAddress: UInt64
    public var initrdSize: UInt64
}

/// Loads a bzImage, an optional initrd and the command line, and builds boot_params, the e820
/// map, identity page tables and the boot GDT, as the 64-bit boot protocol requires.
public struct LinuxLoader: Sendable {
    private let kernel: [UInt8]
    private let initrd: [UInt8]

    public init(kernel: [UInt8], initrd: [UInt8] = []) {
        self.kernel = kernel
        self.initrd = initrd
    }

    /// The boot_params type_of_loader value: 0xFF, "undefined" (hv has no assigned loader ID).
    public static let loaderType: UInt8 = 0xFF
    /// Lowest address the protected-mode kernel may be loaded at.
    public static let highMemory: UInt64 = 0x10_0000

    /// Validates everything, then writes the kernel, initrd, command line, boot_params, page
    /// tables and GDT into `memory` (low RAM: guest-physical 0 up to `memory.ramSize`).
    /// `ramAbove4G` only feeds the e820 map.
    public func load(into memory: some GuestPhysicalMemory, ramAbove4G: UInt64, commandLine: String, cpus: Int = 1) throws(LinuxBootError) -> LinuxEntry {
        let header = try LinuxSetupHeader(image: kernel)
        let ramBelow4G = memory.ramSize
        // Usable RAM below 4 GiB ends at the lower of the RAM size and the KVM pages hv reserves.
        let e820 = FirmwareConfig.e820Table(ramBelow4G: ramBelow4G, ramAbove4G: ramAbove4G)
        let usableTop = e820.filter { $0.type == FirmwareConfig.E820Entry.ram && $0.address == Self.highMemory }
            .map { $0.address + $0.length }.first ?? 0

        // The protected-mode part goes at the kernel's preferred address (16 MiB for a stock
        // kernel): a relocatable kernel decompresses there anyway, a fixed one must run there.
        let load = header.preferredAddress == 0 ? Self.highMemory : header.preferredAddress
        guard load >= Self.highMemory, load & 0xFFF == 0, load < 1 << 32 else { throw .badLoadAddress(load) }
        let payload = UInt64(kernel.count - header.kernelOffset)
        let (kernelEnd, overflow) = load.addingReportingOverflow(max(UInt64(header.initSize), payload))
        guard !overflow, kernelEnd <= usableTop else {
            throw .ramTooSmall(needed: overflow ? .max : kernelEnd, have: ramBelow4G)
        }

        let cmdline = Array(commandLine.utf8)
        let cmdlineMaximum = min(UInt64(header.commandLineSize), LinuxBootLayout.commandLineCapacity - 1)
        guard UInt64(cmdline.count) <= cmdlineMaximum else {
            throw .commandLineTooLong(length: cmdline.count, maximum: cmdlineMaximum)
        }

        // The initrd goes as high as the kernel allows (initrd_addr_max is the last byte it may
        // use) and RAM reaches, page-aligned, above the kernel.
        var initrdAddress: UInt64 = 0
        let initrdSize = UInt64(initrd.count)
        if initrdSize > 0 {
            let highest = min(UInt64(header.initrdAddressMax) + 1, usableTop)
            let lowest = (kernelEnd + 0xFFF) & ~0xFFF
            guard initrdSize <= highest, (highest - initrdSize) & ~0xFFF >= lowest else {
                throw .initrdDoesNotFit(size: initrdSize, lowest: lowest, highest: highest)
            }
            initrdAddress = (highest - initrdSize) & ~0xFFF
        }

        var params = bootParams(header: header, e820: e820, commandLineAddress: LinuxBootLayout.commandLine,
                                initrdAddress: initrdAddress, initrdSize: initrdSize)
        // ACPI tables in the legacy hole, where the kernel also scans for the RSDP; protocol 2.14
        // added boot_params.acpi_rsdp_addr (0x070) to say so directly.
        let acpi = ACPITables.placed(cpus: cpus)
        if header.version >= 0x020E {
            for i in 0..<8 { params[0x070 + i] = UInt8(truncatingIfNeeded: ACPITables.directRSDPAddress >> (8 * UInt64(i))) }
        }

        // Everything checked: write.
        do throws(GuestMemoryError) {
            try write(kernel[header.kernelOffset...], at: load, into: memory)
            if initrdSize > 0 { try write(initrd[...], at: initrdAddress, into: memory) }
            try write((cmdline + [0])[...], at: LinuxBootLayout.commandLine, into: memory)
            try write(params[...], at: LinuxBootLayout.bootParams, into: memory)
            try write(Self.pageTables(at: LinuxBootLayout.pageTables)[...], at: LinuxBootLayout.pageTables, into: memory)
            try write(Self.gdt[...], at: LinuxBootLayout.gdt, into: memory)
            try write(acpi.rsdp[...], at: ACPITables.directRSDPAddress, into: memory)
            try write(acpi.tables[...], at: ACPITables.directTablesAddress, into: memory)
        } catch {
            throw .guestMemory(error)
        }
        return LinuxEntry(entryPoint: load + 0x200, bootParams: LinuxBootLayout.bootParams,
                          pageTableRoot: LinuxBootLayout.pageTables, gdtBase: LinuxBootLayout.gdt,
                          gdtLimit: LinuxBootLayout.gdtLimit, stackPointer: LinuxBootLayout.stackTop,
                          kernelAddress: load, initrdAddress: initrdAddress, initrdSize: initrdSize)
    }

    private func write(_ bytes: ArraySlice<UInt8>, at address: UInt64, into memory: some GuestPhysicalMemory) throws(GuestMemoryError) {
        var failure: GuestMemoryError?
        bytes.withUnsafeBytes { buffer in
            do throws(GuestMemoryError) { try memory.write(buffer, at: address) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// The 4 KiB zero page: the kernel's own setup header, then what the loader fills in.
    func bootParams(header: LinuxSetupHeader, e820: [FirmwareConfig.E820Entry], commandLineAddress: UInt64,
                    initrdAddress: UInt64, initrdSize: UInt64) -> [UInt8] {
        var page = [UInt8](repeating: 0, count: 4096)
        func put(_ value: UInt64, _ bytes: Int, at offset: Int) {
            for i in 0..<bytes { page[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        }
        // Copy struct setup_header as the kernel's image has it (boot.rst: "the setup header
        // ... should be loaded into struct boot_params"), then fill in the loader's fields.
        let start = LinuxSetupHeader.Offset.setupSects
        page.replaceSubrange(start..<header.headerEnd, with: kernel[start..<header.headerEnd])
        typealias O = LinuxSetupHeader.Offset
        put(UInt64(Self.loaderType), 1, at: O.typeOfLoader)
        // LOADED_HIGH stays; KEEP_SEGMENTS and QUIET off; CAN_USE_HEAP off (no real-mode heap).
        put(UInt64(header.loadflags & LinuxSetupHeader.loadedHigh), 1, at: O.loadflags)
        put(0xFFFF, 2, at: 0x1FA)  // vid_mode: "normal"
        put(commandLineAddress & 0xFFFF_FFFF, 4, at: O.cmdLinePtr)
        put(commandLineAddress >> 32, 4, at: 0x0C8)  // ext_cmd_line_ptr
        put(initrdAddress & 0xFFFF_FFFF, 4, at: O.ramdiskImage)
        put(initrdSize & 0xFFFF_FFFF, 4, at: O.ramdiskSize)
        put(initrdAddress >> 32, 4, at: 0x0C0)  // ext_ramdisk_image
        put(initrdSize >> 32, 4, at: 0x0C4)     // ext_ramdisk_size
        let entries = e820.prefix(128)
        put(UInt64(entries.count), 1, at: 0x1E8)  // e820_entries
        for (i, entry) in entries.enumerated() {
            let offset = 0x2D0 + 20 * i          // e820_table
            put(entry.address, 8, at: offset)
            put(entry.length, 8, at: offset + 8)
            put(UInt64(entry.type), 4, at: offset + 16)
        }
        return page
    }

    /// PML4 → one PDPT → four page directories of 2 MiB pages: an identity map of the first
    /// 4 GiB, which covers the kernel, its init_size, boot_params and the command line.
    static func pageTables(at base: UInt64) -> [UInt8] {
        var tables = [UInt8](repeating: 0, count: Int(LinuxBootLayout.pageTableBytes))
        func put(_ value: UInt64, at offset: Int) {
            for i in 0..<8 { tables[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        }
        let present: UInt64 = 1, writable: UInt64 = 2, large: UInt64 = 0x80
        put((base + 0x1000) | present | writable, at: 0)  // PML4[0] → PDPT
        for directory in 0..<4 {
            put((base + 0x2000 + UInt64(directory) * 0x1000) | present | writable, at: 0x1000 + directory * 8)
            for entry in 0..<512 {
                let address = (UInt64(directory) << 30) | (UInt64(entry) << 21)
                put(address | present | writable | large, at: 0x2000 + directory * 0x1000 + entry * 8)
            }
        }
        return tables
    }

    /// The boot GDT: 0x10 a flat 64-bit code segment (execute/read, L=1), 0x18 a flat data
    /// segment (read/write), both present, DPL 0, 4 KiB granularity, accessed.
    static let gdt: [UInt8] = {
        let code: UInt64 = 0x00AF_9B00_0000_FFFF
        let data: UInt64 = 0x00CF_9300_0000_FFFF
        var bytes = [UInt8](repeating: 0, count: 32)
        for i in 0..<8 {
            bytes[16 + i] = UInt8(truncatingIfNeeded: code >> (8 * UInt64(i)))
            bytes[24 + i] = UInt8(truncatingIfNeeded: data >> (8 * UInt64(i)))
        }
        return bytes
    }()
}

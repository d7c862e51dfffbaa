// QEMU-compatible firmware configuration device (fw_cfg), x86 I/O-port flavour, as SeaBIOS consumes it.
//
// The interface follows QEMU's docs/specs/fw_cfg.rst: a 16-bit selector register at 0x510, an 8-bit data
// register at 0x511, and a 64-bit big-endian DMA address register at 0x514 (high half) / 0x518 (low half).
// Everything the guest hands us — selectors, offsets, DMA descriptors, guest addresses and lengths — is
// untrusted: all arithmetic is overflow-checked and every guest-memory access goes through `GuestMemoryIO`,
// whose refusal turns into the DMA error bit, never a trap.
//
// What SeaBIOS (src/fw/paravirt.c, src/boot.c, src/fw/smp.c, src/romfile.c) reads, and so what `standard`
// provides:
// - key 0x0000 "QEMU" (4 bytes, read byte by byte through 0x511 to detect the device);
// - key 0x0001 u32: bit 1 set switches SeaBIOS to DMA for every later read;
// - key 0x0019 the file directory (read with DMA: u32 count, then 64-byte entries, consecutively);
// - key 0x0005 u16 present CPUs (SeaBIOS spins until exactly that many CPUs have checked in, so it must be
//   exact), key 0x000f u16 maximum CPUs ("etc/max-cpus"), key 0x000e u16 ("etc/show-boot-menu", size 2),
//   key 0x0004 u16 no-graphics (non-zero: SeaBIOS sends its screen output to COM1 at 0x3F8);
// - files "etc/e820" (20-byte entries), "etc/boot-fail-wait" and "etc/show-boot-menu" through
//   romfile_loadint (any power-of-two size up to 8, little-endian), "bootorder" (text; a zero-size file is
//   the same as no file).

/// Guest-RAM access for fw_cfg DMA.
///
/// Implementations must bounds-check every access and return false, without touching anything, when the
/// range is not wholly guest RAM. A false return sets the DMA error bit; it never traps.
public protocol GuestMemoryIO {
    /// Copies `buffer.count` bytes of guest RAM at guest-physical `guestAddress` into `buffer`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at guestAddress: UInt64) -> Bool
    /// Copies `bytes` into guest RAM at guest-physical `guestAddress`.
    func write(_ bytes: UnsafeRawBufferPointer, at guestAddress: UInt64) -> Bool
}

/// The fw_cfg device: a set of read-only items selected by a 16-bit key and read byte by byte or by DMA.
///
/// Port offsets below are relative to 0x510: 0 is the selector (16-bit writes), 1 the data byte
/// (8-bit reads), 4...11 the DMA address register. Values passed to and returned from the port and DMA
/// register functions are exactly what the guest CPU's register holds, i.e. the bytes on the bus read
/// little-endian (what `DeviceModel.read`/`write` carry on x86). The DMA register itself is big-endian, so
/// SeaBIOS's `outl(cpu_to_be32(address), 0x518)` arrives here as `UInt32(address).byteSwapped`, and an
/// 8-byte read of offset 4 returns `0x51454d5520434647.byteSwapped`: the bytes "QEMU CFG" in guest memory.
///
/// The item set is built once (by `standard` or `setItem`/`addFile`) and rebuilt by the device on restart;
/// only `cursor` (and, between the two halves of a 64-bit DMA address, `dmaAddressLatch`) is runtime state.
public struct FirmwareConfig: Sendable {
    /// The legacy item keys (QEMU's FW_CFG_* constants) and the first file selector.
    public enum Key {
        /// FW_CFG_SIGNATURE: "QEMU".
        public static let signature: UInt16 = 0x0000
        /// FW_CFG_ID: u32 LE feature bits (`FirmwareConfig.idTraditional`, `FirmwareConfig.idDMA`).
        public static let id: UInt16 = 0x0001
        /// FW_CFG_UUID: 16 bytes.
        public static let uuid: UInt16 = 0x0002
        /// FW_CFG_RAM_SIZE: u64 LE, total guest RAM.
        public static let ramSize: UInt16 = 0x0003
        /// FW_CFG_NOGRAPHIC: u16 LE; non-zero makes SeaBIOS use COM1 as its console.
        public static let noGraphic: UInt16 = 0x0004
        /// FW_CFG_NB_CPUS: u16 LE, CPUs present at boot.
        public static let cpuCount: UInt16 = 0x0005
        /// FW_CFG_BOOT_MENU: u16 LE (SeaBIOS's legacy "etc/show-boot-menu").
        public static let bootMenu: UInt16 = 0x000E
        /// FW_CFG_MAX_CPUS: u16 LE (SeaBIOS's legacy "etc/max-cpus").
        public static let maxCPUs: UInt16 = 0x000F
        /// FW_CFG_FILE_DIR: the file directory, generated from `addFile`.
        public static let fileDirectory: UInt16 = 0x0019
        /// FW_CFG_FILE_FIRST: the selector of the first file in directory order.
        public static let firstFile: UInt16 = 0x0020
        /// FW_CFG_IRQ0_OVERRIDE (arch-local): u8, SeaBIOS's legacy "etc/irq0-override" (MP table only).
        public static let irq0Override: UInt16 = 0x8002
    }

    /// FW_CFG_ID bit 0: the traditional selector/data interface.
    public static let idTraditional: UInt32 = 0x1
    /// FW_CFG_ID bit 1: the DMA interface.
    public static let idDMA: UInt32 = 0x2
    /// The value of the 64-bit DMA address register when read: "QEMU CFG" as a big-endian integer.
    public static let dmaSignature: UInt64 = 0x5145_4D55_2043_4647
    /// The longest file name, in UTF-8 bytes (the directory's name field is 56 bytes, NUL-terminated).
    public static let maximumFileNameLength = 55
    /// How many files fit between `Key.firstFile` and the arch-local keys at 0x8000.
    public static let maximumFileCount = 0x8000 - Int(Key.firstFile)

    /// DMA control bits (the first big-endian u32 of the DMA descriptor).
    public enum DMAControl {
        /// Set by the device when the operation failed.
        public static let error: UInt32 = 0x01
        /// Copy item bytes into guest memory.
        public static let read: UInt32 = 0x02
        /// Advance the item offset without copying.
        public static let skip: UInt32 = 0x04
        /// Select the item in the upper 16 bits first.
        public static let select: UInt32 = 0x08
        /// Copy guest memory into the item (always refused: hv's items are read-only).
        public static let write: UInt32 = 0x10
    }

    /// One entry of QEMU's "etc/e820" file: u64 address, u64 length, u32 type, little-endian, 20 bytes.
    public struct E820Entry: Equatable, Sendable {
        /// E820 type 1: usable RAM.
        public static let ram: UInt32 = 1
        /// E820 type 2: reserved.
        public static let reserved: UInt32 = 2
        /// The size of one encoded entry.
        public static let encodedSize = 20

        /// First guest-physical address of the range.
        public var address: UInt64
        /// Length of the range in bytes.
        public var length: UInt64
        /// The E820 type (`ram` or `reserved`).
        public var type: UInt32

        /// An entry for `[address, address + length)` of `type`.
        public init(address: UInt64, length: UInt64, type: UInt32) {
            self.address = address
            self.length = length
            self.type = type
        }

        /// The 20 little-endian bytes of the entry.
        public var encoded: [UInt8] { littleEndian(address) + littleEndian(length) + littleEndian(type) }
    }

    private struct File: Sendable {
        var name: [UInt8]
        var bytes: [UInt8]
    }

    private var legacyItems: [UInt16: [UInt8]] = [:]
    private var files: [File] = []
    private var directory: [UInt8] = [0, 0, 0, 0]
    private var selector: UInt16 = 0
    private var offset: UInt32 = 0
    private var dmaAddress: UInt64 = 0

    /// An empty configuration: no legacy items, an empty file directory, selector 0 at offset 0.
    public init() {}

    // MARK: Building the item set

    /// Adds or replaces a legacy item.
    ///
    /// The file directory (0x0019) and the file selector range (0x0020...0x7FFF) belong to `addFile`; a key
    /// there is ignored. Items are limited to 4 GiB − 1 bytes (the offset register is 32 bits); longer ones
    /// are truncated.
    public mutating func setItem(_ key: UInt16, _ bytes: [UInt8]) {
        guard key != Key.fileDirectory, !(Key.firstFile..<0x8000).contains(key) else { return }
        legacyItems[key] = UInt64(bytes.count) <= UInt64(UInt32.max) ? bytes : Array(bytes[0..<Int(UInt32.max)])
    }

    /// Adds a named file (name ≤ 55 bytes); returns false if the name is too long or already present.
    ///
    /// Also refused: an empty name, a name containing NUL, a file of 4 GiB or more, and more than
    /// `maximumFileCount` files. Files are kept sorted by name (bytewise, as QEMU's `strcmp` does), and the
    /// n-th file in that order has selector 0x0020 + n, so adding a file renumbers the ones after it.
    @discardableResult
    public mutating func addFile(_ name: String, _ bytes: [UInt8]) -> Bool {
        let nameBytes = Array(name.utf8)
        guard !nameBytes.isEmpty, nameBytes.count <= Self.maximumFileNameLength, !nameBytes.contains(0),
              UInt64(bytes.count) <= UInt64(UInt32.max), files.count < Self.maximumFileCount else { return false }
        var index = 0
        while index < files.count, files[index].name.lexicographicallyPrecedes(nameBytes) { index += 1 }
        if index < files.count, files[index].name == nameBytes { return false }
        files.insert(File(name: nameBytes, bytes: bytes), at: index)
        rebuildDirectory()
        return true
    }

    /// The selector of the file called `name`, if present.
    public func selector(ofFile name: String) -> UInt16? {
        let nameBytes = Array(name.utf8)
        guard let index = files.firstIndex(where: { $0.name == nameBytes }) else { return nil }
        return Key.firstFile + UInt16(index)
    }

    /// The standard items for a VM.
    ///
    /// - Legacy items: signature "QEMU", id (traditional + DMA), a zero UUID, RAM size (below + above 4 GiB,
    ///   u64), no-graphics = 1 (hv has no display, only the 16550 at 0x3F8, so SeaBIOS's screen output goes
    ///   there; override with `setItem(Key.noGraphic, [0, 0])`), present and maximum CPUs (`cpus` clamped
    ///   to 1...65535, u16), boot menu (u16: 1 if `bootMenu`, else 0).
    /// - Files: "bootorder" (empty when `bootOrder` is empty, else its UTF-8 text plus a NUL, as QEMU
    ///   writes it), "etc/boot-fail-wait" (u32 LE milliseconds; 0xFFFFFFFF means never retry),
    ///   "etc/e820" (`e820Table`), "etc/show-boot-menu" (u16 LE, the same value as the legacy key; the file
    ///   wins in SeaBIOS's romfile lookup, so the two agree on purpose), and the ACPI tables with their
    ///   loader script ("etc/acpi/rsdp", "etc/acpi/tables", "etc/table-loader"; see `ACPITables`), and
    ///   the SMBIOS anchor and structures ("etc/smbios/smbios-anchor", "etc/smbios/smbios-tables").
    public static func standard(ramBelow4G: UInt64, ramAbove4G: UInt64, cpus: Int, bootMenu: Bool,
                                bootFailWaitMilliseconds: UInt32, bootOrder: String) -> FirmwareConfig {
        var config = FirmwareConfig()
        let (total, overflow) = ramBelow4G.addingReportingOverflow(ramAbove4G)
        let cpuCount = UInt16(clamping: max(cpus, 1))
        let menu: UInt16 = bootMenu ? 1 : 0
        config.setItem(Key.signature, Array("QEMU".utf8))
        config.setItem(Key.id, littleEndian(idTraditional | idDMA))
        config.setItem(Key.uuid, [UInt8](repeating: 0, count: 16))
        config.setItem(Key.ramSize, littleEndian(overflow ? UInt64.max : total))
        config.setItem(Key.noGraphic, littleEndian(UInt16(1)))
        config.setItem(Key.cpuCount, littleEndian(cpuCount))
        config.setItem(Key.maxCPUs, littleEndian(cpuCount))
        config.setItem(Key.bootMenu, littleEndian(menu))
        config.addFile("bootorder", bootOrder.isEmpty ? [] : Array(bootOrder.utf8) + [0])
        config.addFile("etc/boot-fail-wait", littleEndian(bootFailWaitMilliseconds))
        config.addFile("etc/e820", e820Table(ramBelow4G: ramBelow4G, ramAbove4G: ramAbove4G).flatMap(\.encoded))
        config.addFile("etc/show-boot-menu", littleEndian(menu))
        for file in ACPITables.firmwareFiles(cpus: cpus) { config.addFile(file.name, file.bytes) }
        let smbios = SMBIOSTables(cpus: cpus)
        config.addFile("etc/smbios/smbios-anchor", smbios.anchor)
        config.addFile("etc/smbios/smbios-tables", smbios.tables)
        return config
    }

    /// The memory map for "etc/e820", in address order.
    ///
    /// - `[0, 0x9FC00)` RAM and `[0x9FC00, 0xA0000)` reserved: conventional memory and SeaBIOS's initial
    ///   1 KiB EBDA (SeaBIOS reserves the EBDA itself too, and more if it grows it).
    /// - `[0xF0000, 0x100000)` reserved: the BIOS ROM (SeaBIOS also reserves it, and removes 0xA0000–0xF0000).
    /// - `[0x100000, ramBelow4G)` RAM, capped at 0xFFFBC000. SeaBIOS takes its RamSize from the highest RAM
    ///   end below 4 GiB, so this must end exactly at `ramBelow4G`.
    /// - `[0xFFFBC000, 0xFFFC0000)` reserved: KVM's identity-map page and real-mode TSS (hv's
    ///   `VirtualMachine.identityMapAddress`/`tssAddress`). SeaBIOS reserves this range itself only when
    ///   "etc/e820" is absent, so with the file present we must (QEMU does the same on KVM).
    /// - `[0xFFFC0000, 4 GiB)` reserved: the firmware image (SeaBIOS adds this one unconditionally as well).
    /// - `[4 GiB, 4 GiB + ramAbove4G)` RAM, when `ramAbove4G` is non-zero.
    ///
    /// QEMU itself puts only `[0, ramBelow4G)` and `[4 GiB, …)` RAM (plus the KVM reservation) in the file
    /// and lets SeaBIOS carve the holes; the split entries here describe the same final map to any other
    /// consumer too. Entries SeaBIOS doesn't know (types other than 1 and 2) are ignored by it; we emit none.
    public static func e820Table(ramBelow4G: UInt64, ramAbove4G: UInt64) -> [E820Entry] {
        let ebda: UInt64 = 0x9_FC00, videoStart: UInt64 = 0xA_0000
        let biosROM: UInt64 = 0xF_0000, highMemory: UInt64 = 0x10_0000
        let kvmPages: UInt64 = 0xFFFB_C000, firmware: UInt64 = 0xFFFC_0000, fourGiB: UInt64 = 0x1_0000_0000
        var table: [E820Entry] = []
        let lowEnd = min(ramBelow4G, ebda)
        if lowEnd > 0 { table.append(E820Entry(address: 0, length: lowEnd, type: E820Entry.ram)) }
        table.append(E820Entry(address: ebda, length: videoStart - ebda, type: E820Entry.reserved))
        table.append(E820Entry(address: biosROM, length: highMemory - biosROM, type: E820Entry.reserved))
        let highEnd = min(ramBelow4G, kvmPages)
        if highEnd > highMemory { table.append(E820Entry(address: highMemory, length: highEnd - highMemory, type: E820Entry.ram)) }
        table.append(E820Entry(address: kvmPages, length: firmware - kvmPages, type: E820Entry.reserved))
        table.append(E820Entry(address: firmware, length: fourGiB - firmware, type: E820Entry.reserved))
        if ramAbove4G > 0 {
            table.append(E820Entry(address: fourGiB, length: min(ramAbove4G, UInt64.max - fourGiB), type: E820Entry.ram))
        }
        return table
    }

    // MARK: Runtime state

    /// The selected key and the offset of the next byte to read from it.
    ///
    /// The device persists this across restarts. Any value may be restored: an unknown selector reads as an
    /// empty item and an offset past the end reads zeros.
    public var cursor: (selector: UInt16, offset: UInt32) {
        get { (selector, offset) }
        set {
            selector = newValue.selector
            offset = newValue.offset
        }
    }

    /// The DMA address register as latched so far (the high half written through 0x514 waits here for the
    /// low-half write that triggers the transfer; it is reset to 0 by every transfer, as in QEMU).
    public var dmaAddressLatch: UInt64 {
        get { dmaAddress }
        set { dmaAddress = newValue }
    }

    // MARK: Traditional interface

    /// Selects `value` (a 16-bit write to 0x510) and rewinds to its first byte.
    public mutating func writeSelector(_ value: UInt16) {
        selector = value
        offset = 0
    }

    /// The next byte of the selected item (an 8-bit read of 0x511), or 0 past its end or for an unknown key.
    public mutating func readData() -> UInt8 {
        let item = self.item(selector)
        guard UInt64(offset) < UInt64(item.count) else { return 0 }
        let byte = item[Int(offset)]
        offset += 1  // offset < item.count <= UInt32.max, so this cannot overflow.
        return byte
    }

    // MARK: Port dispatch

    /// A guest read of `size` bytes at port 0x510 + `offset` (the device's resource is 0x510, 12 ports).
    ///
    /// As in QEMU: an 8-bit read of 0x510 or 0x511 returns the next data byte; 0x514...0x51B return the DMA
    /// signature; anything else reads as all ones (an unclaimed bus).
    public mutating func readPort(offset: Int, size: Int) -> UInt64 {
        switch offset {
        case 0, 1: size == 1 ? UInt64(readData()) : Self.allOnes(size)
        case 4...11: readDMARegister(offset: offset, size: size)
        default: Self.allOnes(size)
        }
    }

    /// A guest write of `size` bytes of `value` at port 0x510 + `offset`.
    ///
    /// As in QEMU: a 16-bit write of 0x510 selects; writes to the data port are ignored; 0x514...0x51B go to
    /// `writeDMARegister`; anything else is ignored.
    public mutating func writePort(offset: Int, size: Int, value: UInt64, memory: some GuestMemoryIO) {
        switch offset {
        case 0 where size == 2: writeSelector(UInt16(truncatingIfNeeded: value))
        case 4...11: writeDMARegister(offset: offset, size: size, value: value, memory: memory)
        default: break
        }
    }

    // MARK: DMA interface

    /// Port offset 4..11 (0x514..0x51b) accesses; `size` 1, 2, 4 or 8.
    ///
    /// Returns the bytes of "QEMU CFG" at register offsets `offset − 4 ..< offset − 4 + size`, little-endian
    /// (the guest register value): a 4-byte read of 0x514 gives `0x51454d55.byteSwapped`, of 0x518
    /// `0x20434647.byteSwapped`, an 8-byte read of 0x514 `dmaSignature.byteSwapped`. Any other offset or
    /// size, or an access running past 0x51B, reads as all ones.
    public mutating func readDMARegister(offset: Int, size: Int) -> UInt64 {
        guard size == 1 || size == 2 || size == 4 || size == 8, offset >= 4, offset <= 12 - size else {
            return Self.allOnes(size)
        }
        var value: UInt64 = 0
        for i in 0..<size {
            let byte = UInt8(truncatingIfNeeded: Self.dmaSignature >> UInt64(8 * (7 - (offset - 4 + i))))
            value |= UInt64(byte) << UInt64(8 * i)
        }
        return value
    }

    /// Port offset 4..11 (0x514..0x51b) writes of the big-endian DMA address register; `value` is the guest
    /// register value (see the type's documentation).
    ///
    /// As in QEMU: a 4-byte write of offset 4 sets the high half and clears the low half; a 4-byte write of
    /// offset 8 ORs in the low half and starts the transfer; an 8-byte write of offset 4 sets the whole
    /// address and starts the transfer; every transfer resets the latched address to 0 (so SeaBIOS, which
    /// writes only the low half, always gets a high half of 0). Other offsets and sizes are ignored.
    public mutating func writeDMARegister(offset: Int, size: Int, value: UInt64, memory: some GuestMemoryIO) {
        switch (offset, size) {
        case (4, 4):
            dmaAddress = UInt64(UInt32(truncatingIfNeeded: value).byteSwapped) << 32
        case (8, 4):
            dmaAddress |= UInt64(UInt32(truncatingIfNeeded: value).byteSwapped)
            startDMA(memory: memory)
        case (4, 8):
            dmaAddress = value.byteSwapped
            startDMA(memory: memory)
        default:
            break
        }
    }

    private mutating func startDMA(memory: some GuestMemoryIO) {
        let descriptorAddress = dmaAddress
        dmaAddress = 0
        let status = transfer(descriptorAt: descriptorAddress, memory: memory)
        // Completion: control = 0 or the error bit. If even this write is refused there is nobody to tell.
        _ = Self.write(Self.bigEndian(status), to: memory, at: descriptorAddress)
    }

    /// Runs the descriptor at `descriptorAddress`; returns the completion control value.
    private mutating func transfer(descriptorAt descriptorAddress: UInt64, memory: some GuestMemoryIO) -> UInt32 {
        // Copy the descriptor out once: the guest may change it while we work.
        var descriptor = [UInt8](repeating: 0, count: 16)
        let fetched = descriptor.withUnsafeMutableBytes { Self.read(into: $0, from: memory, at: descriptorAddress) }
        guard fetched else { return DMAControl.error }
        let control = Self.bigEndianUInt32(descriptor, at: 0)
        let length = Self.bigEndianUInt32(descriptor, at: 4)
        let address = Self.bigEndianUInt32(descriptor, at: 8).widened << 32 | Self.bigEndianUInt32(descriptor, at: 12).widened

        if control & DMAControl.select != 0 { writeSelector(UInt16(truncatingIfNeeded: control >> 16)) }
        if control & DMAControl.read != 0 { return dmaRead(length: length, to: address, memory: memory) }
        if control & DMAControl.write != 0 { return DMAControl.error }
        if control & DMAControl.skip != 0 { skip(length) }
        return 0
    }

    /// Copies `length` bytes from the selected item at the current offset to guest `address`; bytes past
    /// the item's end are zeros (QEMU's behaviour) and do not advance the offset.
    private mutating func dmaRead(length: UInt32, to address: UInt64, memory: some GuestMemoryIO) -> UInt32 {
        guard length > 0 else { return 0 }
        guard !address.addingReportingOverflow(UInt64(length)).overflow else { return DMAControl.error }
        var destination = address
        var remaining = UInt64(length)

        let item = self.item(selector)
        if UInt64(offset) < UInt64(item.count) {
            let start = Int(offset)
            let count = Int(min(remaining, UInt64(item.count - start)))
            let copied = item.withUnsafeBytes { bytes in
                Self.write(UnsafeRawBufferPointer(rebasing: bytes[start..<(start + count)]), to: memory, at: destination)
            }
            guard copied else { return DMAControl.error }
            offset += UInt32(count)  // start + count <= item.count <= UInt32.max.
            destination += UInt64(count)
            remaining -= UInt64(count)
        }

        // Zero-fill the rest in bounded chunks; the first refused chunk ends the transfer with an error, so
        // the work is bounded by the guest RAM the buffer really covers.
        guard remaining > 0 else { return 0 }
        let zeros = [UInt8](repeating: 0, count: Int(min(remaining, 64 * 1024)))
        while remaining > 0 {
            let count = Int(min(remaining, UInt64(zeros.count)))
            let filled = zeros.withUnsafeBytes { Self.write(UnsafeRawBufferPointer(rebasing: $0[0..<count]), to: memory, at: destination) }
            guard filled else { return DMAControl.error }
            destination += UInt64(count)
            remaining -= UInt64(count)
        }
        return 0
    }

    /// Advances the offset by `length`, stopping at the item's end (QEMU does not move past it).
    private mutating func skip(_ length: UInt32) {
        let count = UInt64(item(selector).count)
        guard UInt64(offset) < count else { return }
        offset = UInt32(min(UInt64(offset) + UInt64(length), count))
    }

    // MARK: Helpers

    /// The bytes of key `key`: the directory, a file, a legacy item, or nothing.
    private func item(_ key: UInt16) -> [UInt8] {
        if key == Key.fileDirectory { return directory }
        if key >= Key.firstFile, Int(key - Key.firstFile) < files.count { return files[Int(key - Key.firstFile)].bytes }
        return legacyItems[key] ?? []
    }

    private mutating func rebuildDirectory() {
        var bytes = Self.bigEndian(UInt32(files.count))
        bytes.reserveCapacity(4 + 64 * files.count)
        for (index, file) in files.enumerated() {
            bytes += Self.bigEndian(UInt32(file.bytes.count))
            bytes += Self.bigEndian(Key.firstFile + UInt16(index))
            bytes += [0, 0]
            bytes += file.name + [UInt8](repeating: 0, count: 56 - file.name.count)
        }
        directory = bytes
    }

    private static func read(into buffer: UnsafeMutableRawBufferPointer, from memory: some GuestMemoryIO, at address: UInt64) -> Bool {
        guard !address.addingReportingOverflow(UInt64(buffer.count)).overflow else { return false }
        return memory.read(into: buffer, at: address)
    }

    private static func write(_ bytes: UnsafeRawBufferPointer, to memory: some GuestMemoryIO, at address: UInt64) -> Bool {
        guard !address.addingReportingOverflow(UInt64(bytes.count)).overflow else { return false }
        return memory.write(bytes, at: address)
    }

    private static func write(_ bytes: [UInt8], to memory: some GuestMemoryIO, at address: UInt64) -> Bool {
        bytes.withUnsafeBytes { write($0, to: memory, at: address) }
    }

    private static func allOnes(_ size: Int) -> UInt64 {
        switch size {
        case 1: 0xFF
        case 2: 0xFFFF
        case 4: 0xFFFF_FFFF
        default: UInt64.max
        }
    }

    private static func bigEndianUInt32(_ bytes: [UInt8], at index: Int) -> UInt32 {
        bytes[index..<(index + 4)].reduce(0) { $0 << 8 | UInt32($1) }
    }

    private static func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        (0..<(T.bitWidth / 8)).reversed().map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) }
    }
}

private func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<(T.bitWidth / 8)).map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) }
}

private extension UInt32 {
    var widened: UInt64 { UInt64(self) }
}

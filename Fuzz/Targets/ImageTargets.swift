import CHVShim
import Glibc
import HVBootLoader
import HVDeviceSDK
import HVSandbox
import HVSCSIDisk
import HVSerialUART

/// The user-file surface: images and binaries a customer supplies, and records a crashed device
/// leaves behind for its successor.
enum ImageTargets {
    /// A qcow2 image (header, L1/L2 and refcount tables, backing name) as a customer supplied it,
    /// opened by the disk process and then read, written and discarded at offsets the input picks.
    /// A write that succeeded within one cluster must read back, and the header's fixed part must
    /// never be overwritten.
    static let qcow2 = FuzzTarget("qcow2-image", covers: "qcow2 header, extensions, L1/L2 and refcount tables (disk device ← user image)") { data in
        var input = FuzzInput(data)
        let readOnly = input.u8() & 1 == 1
        let operations = input.bytes(64)
        let image = input.rest()
        let fd = hv_memfd_create("fuzz-qcow2", UInt32(hv_MFD_CLOEXEC))
        guard fd >= 0 else { fatalError("memfd_create failed") }
        defer { close(fd) }
        guard image.withUnsafeBytes({ pwrite(fd, $0.baseAddress, $0.count, 0) }) == image.count else { fatalError("cannot fill the image") }
        guard let disk = try? QCOW2Backend(fd: fd, readOnly: readOnly) else { return }
        var fixedHeader = [UInt8](repeating: 0, count: 48)
        _ = fixedHeader.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 48, 0) }
        let size = disk.byteCount
        guard size > 0 else { return }
        operations.withUnsafeBytes { opBytes in
            var ops = FuzzInput(opBytes)
            var buffer = [UInt8](repeating: 0, count: 4096)
            let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
            for _ in 0..<16 where !ops.isAtEnd {
                let offset = ops.integer(UInt64.self) % size
                let count = min(1 + ops.below(4096), Int(size - offset))
                switch ops.u8() % 4 {
                case 0:
                    _ = buffer.withUnsafeMutableBytes { disk.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: offset) }
                case 1:
                    let wrote = pattern.withUnsafeBytes { disk.write(UnsafeRawBufferPointer(rebasing: $0[0..<count]), at: offset) }
                    // Within one cluster a write must read back. Across clusters a hostile image
                    // may map two guest clusters onto one host cluster (its own data, aliased).
                    let cluster = disk.header.clusterSize
                    if wrote == nil && offset / cluster == (offset + UInt64(count) - 1) / cluster {
                        let read = buffer.withUnsafeMutableBytes { disk.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: offset) }
                        FuzzCheck.that(read == nil && buffer[0..<count] == pattern[0..<count], "a write at \(offset) of \(count) bytes does not read back")
                    }
                case 2: _ = disk.discard(at: offset, count: UInt64(count))
                default: _ = disk.flush()
                }
            }
        }
        var after = [UInt8](repeating: 0, count: 48)
        _ = after.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 48, 0) }
        FuzzCheck.that(after == fixedHeader, "the image's header was overwritten")
    }

    /// A multiboot kernel (what `--kernel` or hv-firecracker's kernel_image_path names) loaded into
    /// 64 MiB of guest RAM.
    static let multiboot = FuzzTarget("multiboot", covers: "multiboot header and a.out kludge / ELF loading (bios device ← user kernel)") { data in
        let memory = SinkRAM(ramSize: 64 << 20)
        _ = try? MultibootLoader(image: Array(data)).load(into: memory, commandLine: "console=ttyS0")
    }

    /// A Linux bzImage (setup header, protocol version, sizes, initrd placement) loaded into
    /// 64 MiB of guest RAM.
    static let bzImage = FuzzTarget("bzimage", covers: "Linux boot protocol setup header and bzImage layout (bios device ← user kernel)") { data in
        var input = FuzzInput(data)
        let initrd = [UInt8](repeating: 0xCC, count: input.below(8192))
        let kernel = input.rest()
        _ = try? LinuxSetupHeader(image: kernel)
        let memory = SinkRAM(ramSize: 64 << 20)
        _ = try? LinuxLoader(kernel: kernel, initrd: initrd).load(into: memory, ramAbove4G: 0, commandLine: "console=ttyS0", cpus: 2)
    }

    /// A device binary's ELF program headers and dynamic section, read by the jail to find the
    /// libraries it binds into the device's root (a plugin author's binary).
    static let elfDynamic = FuzzTarget("elf-dynamic", covers: "ELF program headers and dynamic section (jail ← plugin binary)") { data in
        let file = Array(data)
        _ = ELFDynamicInfo { offset, count in
            guard offset < UInt64(file.count), count >= 0 else { return offset == UInt64(file.count) ? [] : nil }
            let start = Int(offset)
            return Array(file[start..<min(file.count, start + min(count, file.count))])
        }
    }

    /// The records a crashed device leaves in its state page for its successor: the in-flight
    /// virtqueue record, a SCSI unit's sense state, the console journal.
    static let stateRecords = FuzzTarget("state-records", covers: "in-flight virtqueue record, LUN state, console journal (device ← its crashed predecessor)") { data in
        var input = FuzzInput(data)
        let queues = 1 + input.below(3)
        let size = UInt16(1) << UInt16(input.u8() % 11)
        let guestUsed = input.integer(UInt16.self)
        let heads = input.bytes(64)
        let bytes = input.rest()
        _ = LUNState(bytes: bytes)
        _ = ConsoleJournal(bytes: bytes)
        let storage = ByteStorage(bytes, count: InflightRecord.size(queueCount: queues))
        let record = InflightRecord(storage: storage, offset: 0, queueCount: queues)
        guard record.isValid else { return }
        for q in 0..<queues {
            let recovery = record.recover(q, size: size, guestUsed: guestUsed) { position in
                let i = Int(position) % 32
                return heads.count > 2 * i + 1 ? UInt16(heads[2 * i]) | UInt16(heads[2 * i + 1]) << 8 : nil
            }
            for head in recovery.resubmit + recovery.poisoned {
                FuzzCheck.that(head < size, "recovery names head \(head) of a \(size)-entry queue")
            }
        }
    }
}

/// Guest RAM for the loaders that only checks bounds: the loaders' work is the parsing, and a
/// 64 MiB copy per input would drown it.
final class SinkRAM: GuestPhysicalMemory {
    let ramSize: UInt64
    init(ramSize: UInt64) { self.ramSize = ramSize }
    func write(_ bytes: UnsafeRawBufferPointer, at guestAddress: UInt64) throws(GuestMemoryError) {
        try check(guestAddress, UInt64(bytes.count))
    }
    func zero(at guestAddress: UInt64, count: UInt64) throws(GuestMemoryError) { try check(guestAddress, count) }
    private func check(_ address: UInt64, _ count: UInt64) throws(GuestMemoryError) {
        let (end, overflow) = address.addingReportingOverflow(count)
        guard !overflow, end <= ramSize else { throw GuestMemoryError(address: address, count: count) }
    }
}

/// A state page in ordinary memory, for the in-flight record.
final class ByteStorage: InflightStorage {
    var bytes: [UInt8]
    init(_ initial: [UInt8], count: Int) {
        bytes = Array(initial.prefix(count)) + [UInt8](repeating: 0, count: max(0, count - initial.count))
    }
    func loadBytes(at offset: Int, count: Int) -> [UInt8] {
        guard offset >= 0, count >= 0, offset + count <= bytes.count else { return [] }
        return Array(bytes[offset..<offset + count])
    }
    func storeBytes(_ new: [UInt8], at offset: Int) {
        FuzzCheck.that(offset >= 0 && offset + new.count <= bytes.count, "in-flight record writes outside its page")
        bytes.replaceSubrange(offset..<offset + new.count, with: new)
    }
    func loadUInt16(at offset: Int) -> UInt16 {
        let b = loadBytes(at: offset, count: 2)
        return b.count == 2 ? UInt16(b[0]) | UInt16(b[1]) << 8 : 0
    }
    func storeUInt16(_ value: UInt16, at offset: Int) { storeBytes([UInt8(value & 0xFF), UInt8(value >> 8)], at: offset) }
    func loadByte(at offset: Int) -> UInt8 { loadBytes(at: offset, count: 1).first ?? 0 }
    func storeByte(_ value: UInt8, at offset: Int) { storeBytes([value], at: offset) }
}

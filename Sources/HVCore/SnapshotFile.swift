import CHVShim
import Glibc
import HVIPC
import HVKVM
import HVSys

/// A run of guest RAM a snapshot holds: `length` bytes at `offset` in the RAM memfd (and at the
/// same offset in the snapshot's memory file), with the CRC-32C of those bytes.
public struct MemoryExtent: Sendable, Equatable {
    public var offset: UInt64
    public var length: UInt64
    public var checksum: UInt32
}

/// A VM saved to a directory: `DIR/state` (everything but guest RAM, in checksummed sections)
/// and `DIR/memory` (guest RAM at its memfd offsets, a sparse file: pages the guest never wrote,
/// and pages of zeros, are holes). docs/snapshots.md describes the format.
public struct MachineSnapshot: Sendable {
    /// The format this build writes and reads.
    public static let formatVersion: UInt32 = 1
    static let magic: [UInt8] = Array("HVSNAP\r\n".utf8)

    /// The host layer's record (the VM definition, as JSON), opaque to the core.
    public var host: [UInt8]
    public var memoryBytes: UInt64
    /// The CPUID table the guest saw (kvm_cpuid_entry2 records), before the per-vCPU APIC IDs.
    public var cpuid: [kvm_cpuid_entry2]
    /// The guest TSC frequency, kHz.
    public var tscKHz: UInt32
    /// The guest's kvmclock when it was paused, ns.
    public var clock: UInt64
    public var vcpus: [VCPUSavedState]
    public var platform: PlatformSavedState
    /// `PCIBus.savedState()`.
    public var pci: [UInt8]
    public var devices: [DeviceSavedState]
    /// The firmware ROM's bytes (nil for a direct kernel boot).
    public var firmwareROM: [UInt8]?
    public var memoryExtents: [MemoryExtent]
    /// Where it was read from (empty for one being written).
    public internal(set) var directory: String = ""

    public var cpus: Int { vcpus.count }

    static func statePath(_ directory: String) -> String { directory + "/state" }
    static func memoryPath(_ directory: String) -> String { directory + "/memory" }

    // MARK: Sections

    enum Tag: UInt32 {
        case host = 1, machine, cpuid, vcpu, platform, pci, device, firmware, memory
    }

    private static func encodeBlobs(_ w: inout WireWriter, _ blobs: [[UInt8]]) {
        w.u32(UInt32(blobs.count))
        for b in blobs {
            w.u32(UInt32(b.count))
            w.raw(b)
        }
    }

    private static func decodeBlobs(_ r: inout WireReader, limit: Int = 64) throws(WireError) -> [[UInt8]] {
        let count = Int(try r.u32())
        guard count <= limit else { throw .invalidField("\(count) records") }
        var blobs: [[UInt8]] = []
        for _ in 0..<count { blobs.append(try r.raw(Int(try r.u32()))) }
        return blobs
    }

    private static func string(_ w: inout WireWriter, _ s: String) {
        let bytes = Array(s.utf8.prefix(1024))
        w.u16(UInt16(bytes.count))
        w.raw(bytes)
    }

    private static func string(_ r: inout WireReader) throws(WireError) -> String {
        String(decoding: try r.raw(Int(try r.u16())), as: UTF8.self)
    }

    func sections() -> [(Tag, [UInt8])] {
        var list: [(Tag, [UInt8])] = [(.host, host)]
        var m = WireWriter()
        m.u64(memoryBytes)
        m.u32(UInt32(vcpus.count))
        m.u32(tscKHz)
        m.u64(clock)
        m.u32(UInt32(VCPUSavedState.sizes.count))
        for size in VCPUSavedState.sizes { m.u32(UInt32(size)) }
        list.append((.machine, m.bytes))
        var c = WireWriter()
        c.u32(UInt32(cpuid.count))
        c.u32(UInt32(MemoryLayout<kvm_cpuid_entry2>.size))
        for var entry in cpuid { withUnsafeBytes(of: &entry) { c.raw(Array($0.prefix(MemoryLayout<kvm_cpuid_entry2>.size))) } }
        list.append((.cpuid, c.bytes))
        for v in vcpus {
            var w = WireWriter()
            w.u32(v.mpState)
            Self.encodeBlobs(&w, v.blobs)
            w.u32(UInt32(v.msrs.count))
            for msr in v.msrs {
                w.u32(msr.index)
                w.u64(msr.value)
            }
            list.append((.vcpu, w.bytes))
        }
        var p = WireWriter()
        Self.encodeBlobs(&p, platform.irqchips + [platform.pit])
        list.append((.platform, p.bytes))
        list.append((.pci, pci))
        for d in devices {
            var w = WireWriter()
            Self.string(&w, d.name)
            Self.string(&w, d.model)
            w.u16(d.stateVersion)
            Self.encodeBlobs(&w, [d.page])
            list.append((.device, w.bytes))
        }
        if let firmwareROM { list.append((.firmware, firmwareROM)) }
        var e = WireWriter()
        e.u32(UInt32(memoryExtents.count))
        for x in memoryExtents {
            e.u64(x.offset)
            e.u64(x.length)
            e.u32(x.checksum)
        }
        list.append((.memory, e.bytes))
        return list
    }

    /// The state file's bytes: a 32-byte header (magic, format, section count, the header's
    /// checksum, total length), then each section with its tag, length and checksum.
    func encodedState() -> [UInt8] {
        Self.stateFile(sections: sections().map { (tag: $0.0.rawValue, payload: $0.1) })
    }

    /// A state file holding `sections` (tags as numbers), with valid checksums: what `encodedState`
    /// writes, and what a fuzz target frames hostile sections in (a forger computes checksums too).
    package static func stateFile(sections list: [(tag: UInt32, payload: [UInt8])]) -> [UInt8] {
        var body = WireWriter()
        for (tag, payload) in list {
            body.u32(tag)
            body.u32(0)
            body.u64(UInt64(payload.count))
            body.u32(hv_crc32c(0, payload, UInt(payload.count)))
            body.u32(0)
            body.raw(payload)
        }
        var header = WireWriter()
        header.raw(magic)
        header.u32(formatVersion)
        header.u32(UInt32(list.count))
        header.u64(UInt64(32 + body.bytes.count))
        header.u32(hv_crc32c(0, header.bytes, UInt(header.bytes.count)))
        header.u32(0)
        return header.bytes + body.bytes
    }

    /// Decodes a state file; `name` prefixes every error.
    package static func decodeState(_ bytes: [UInt8], name: String) throws(SnapshotError) -> MachineSnapshot {
        guard bytes.count >= 32, Array(bytes[0..<8]) == magic else {
            throw SnapshotError("\(name) is not an hv snapshot (no snapshot header)")
        }
        var r = WireReader(bytes, offset: 8)
        let version: UInt32, count: Int, total: UInt64, headerCRC: UInt32, reserved: UInt32
        do throws(WireError) {
            version = try r.u32()
            count = Int(try r.u32())
            total = try r.u64()
            headerCRC = try r.u32()
            reserved = try r.u32()
        } catch { throw SnapshotError("\(name) is truncated") }
        guard headerCRC == hv_crc32c(0, Array(bytes[0..<24]), 24), reserved == 0 else {
            throw SnapshotError("\(name) is corrupt (its header fails its checksum)")
        }
        guard version == formatVersion else {
            throw SnapshotError("\(name) was written in snapshot format \(version); this hv reads format \(formatVersion) only")
        }
        guard total == UInt64(bytes.count) else {
            throw SnapshotError(total > UInt64(bytes.count)
                ? "\(name) is truncated (\(bytes.count) of \(total) bytes)"
                : "\(name) has \(UInt64(bytes.count) - total) bytes after its end")
        }
        var sections: [(Tag, [UInt8])] = []
        var at = 32
        for i in 0..<count {
            var h = WireReader(bytes, offset: at)
            let rawTag: UInt32, length: UInt64, crc: UInt32, reserved: (UInt32, UInt32)
            do throws(WireError) {
                rawTag = try h.u32()
                reserved.0 = try h.u32()
                length = try h.u64()
                crc = try h.u32()
                reserved.1 = try h.u32()
            } catch { throw SnapshotError("\(name) is truncated (in section \(i + 1) of \(count))") }
            guard reserved == (0, 0) else { throw SnapshotError("\(name) is corrupt (section \(i + 1) of \(count) has a damaged header)") }
            guard length <= UInt64(bytes.count - at - 24) else { throw SnapshotError("\(name) is truncated (in section \(i + 1) of \(count))") }
            let payload = Array(bytes[(at + 24)..<(at + 24 + Int(length))])
            guard hv_crc32c(0, payload, UInt(payload.count)) == crc else {
                throw SnapshotError("\(name) is corrupt (section \(i + 1) of \(count) fails its checksum)")
            }
            guard let tag = Tag(rawValue: rawTag) else { throw SnapshotError("\(name) has a section of unknown kind \(rawTag)") }
            sections.append((tag, payload))
            at += 24 + Int(length)
        }
        guard at == bytes.count else { throw SnapshotError("\(name) has bytes after its last section") }
        do throws(WireError) {
            return try decodeSections(sections)
        } catch {
            throw SnapshotError("\(name) is malformed (\(error))")
        }
    }

    private static func decodeSections(_ sections: [(Tag, [UInt8])]) throws(WireError) -> MachineSnapshot {
        func one(_ tag: Tag) throws(WireError) -> [UInt8] {
            let found = sections.filter { $0.0 == tag }
            guard found.count == 1 else { throw .invalidField("\(found.count) \(tag) sections") }
            return found[0].1
        }
        var m = WireReader(try one(.machine))
        let memoryBytes = try m.u64()
        let cpus = Int(try m.u32())
        let tscKHz = try m.u32()
        let clock = try m.u64()
        let sizeCount = Int(try m.u32())
        var sizes: [Int] = []
        for _ in 0..<min(sizeCount, 64) { sizes.append(Int(try m.u32())) }
        try m.finish()
        guard sizes == VCPUSavedState.sizes else {
            throw .invalidField("its vCPU state layouts (\(sizes)) are not this host's (\(VCPUSavedState.sizes)): it was saved on another architecture or kernel ABI")
        }
        var c = WireReader(try one(.cpuid))
        let entryCount = Int(try c.u32())
        let entrySize = Int(try c.u32())
        guard entrySize == MemoryLayout<kvm_cpuid_entry2>.size, entryCount <= 4096 else { throw .invalidField("CPUID table layout") }
        var cpuid: [kvm_cpuid_entry2] = []
        for _ in 0..<entryCount {
            let raw = try c.raw(entrySize)
            var entry = kvm_cpuid_entry2()
            withUnsafeMutableBytes(of: &entry) { $0.copyBytes(from: raw) }
            cpuid.append(entry)
        }
        try c.finish()
        var vcpus: [VCPUSavedState] = []
        for (tag, payload) in sections where tag == .vcpu {
            var r = WireReader(payload)
            let mp = try r.u32()
            let blobs = try decodeBlobs(&r)
            guard blobs.map(\.count) == VCPUSavedState.sizes else { throw .invalidField("vCPU \(vcpus.count) state sizes") }
            let msrCount = Int(try r.u32())
            guard msrCount <= 65536 else { throw .invalidField("\(msrCount) MSRs") }
            var msrs: [(index: UInt32, value: UInt64)] = []
            for _ in 0..<msrCount { msrs.append((try r.u32(), try r.u64())) }
            try r.finish()
            vcpus.append(VCPUSavedState(blobs: blobs, mpState: mp, msrs: msrs))
        }
        guard vcpus.count == cpus, cpus >= 1 else { throw .invalidField("\(vcpus.count) vCPU states for \(cpus) vCPUs") }
        var p = WireReader(try one(.platform))
        let platformBlobs = try decodeBlobs(&p)
        try p.finish()
        guard platformBlobs.count == 4, platformBlobs[0..<3].allSatisfy({ $0.count == PlatformSavedState.irqchipSize }),
              platformBlobs[3].count == PlatformSavedState.pitSize else { throw .invalidField("interrupt controller and PIT state sizes") }
        var devices: [DeviceSavedState] = []
        for (tag, payload) in sections where tag == .device {
            var r = WireReader(payload)
            let name = try string(&r), model = try string(&r)
            let version = try r.u16()
            let page = try decodeBlobs(&r)
            try r.finish()
            guard page.count == 1 else { throw .invalidField("device \(name)'s state") }
            devices.append(DeviceSavedState(name: name, model: model, stateVersion: version, page: page[0]))
        }
        let firmware = sections.filter { $0.0 == .firmware }
        guard firmware.count <= 1 else { throw .invalidField("two firmware sections") }
        var e = WireReader(try one(.memory))
        let extentCount = Int(try e.u32())
        var extents: [MemoryExtent] = []
        var end: UInt64 = 0
        for _ in 0..<extentCount {
            let x = MemoryExtent(offset: try e.u64(), length: try e.u64(), checksum: try e.u32())
            // In order, not overlapping, inside RAM: the restore trusts nothing else.
            guard x.offset >= end, x.length > 0, x.length <= memoryBytes, x.offset <= memoryBytes - x.length else {
                throw .invalidField("memory extent at 0x\(String(x.offset, radix: 16)) (+\(x.length)) is out of order or outside RAM")
            }
            end = x.offset + x.length
            extents.append(x)
        }
        try e.finish()
        return MachineSnapshot(host: try one(.host), memoryBytes: memoryBytes, cpuid: cpuid, tscKHz: tscKHz, clock: clock, vcpus: vcpus,
                               platform: PlatformSavedState(irqchips: Array(platformBlobs[0..<3]), pit: platformBlobs[3]),
                               pci: try one(.pci), devices: devices, firmwareROM: firmware.first?.1, memoryExtents: extents)
    }

    // MARK: Reading

    /// Reads and checks `directory`'s state file (the memory file is checked as it is loaded).
    public static func read(directory: String) throws(SnapshotError) -> MachineSnapshot {
        let path = statePath(directory)
        let file: FileDescriptor
        do { file = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: 256 << 20) } catch {
            throw SnapshotError("cannot read snapshot \(directory): \(error)")
        }
        let bytes: [UInt8]
        do { bytes = try file.readAll() } catch { throw SnapshotError("cannot read \(path): \(error)") }
        var snapshot = try decodeState(bytes, name: "snapshot \(directory)")
        snapshot.directory = directory
        return snapshot
    }

    /// Names the CPU features the guest saw that this host's KVM cannot give it (empty: none).
    public static func missingFeatures(saved: [kvm_cpuid_entry2], host: [kvm_cpuid_entry2]) -> [String] {
        CPUIDFeatures.missing(saved: saved, host: host)
    }
}

import CHVShim
import Glibc
import HVSys

/// Two of a vCPU's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+), read without taking the
/// vCPU out of the guest: whether it is blocked in KVM now (`blocking`: halted, or an AP waiting
/// for INIT/SIPI) and how many HLT instructions it has executed (`halt_exits`). The halt monitor
/// asks a vCPU for its registers only once these say it has stayed in one halt.
public final class VCPUStatistics: Sendable {
    private let file: FileDescriptor
    /// File offsets of the two values (each one u64).
    private let blockingOffset: Int64
    private let haltExitsOffset: Int64

    /// Reads the file's descriptors; nil when the kernel lacks the interface or either statistic.
    init?(vcpuFD: Int32) {
        let raw = hv_ioctl_val(vcpuFD, hv_KVM_GET_STATS_FD, 0)
        guard raw >= 0 else { return nil }
        file = FileDescriptor(owning: raw)
        // struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset (u32 each).
        guard let header = Self.read(file, at: 0, count: 24) else { return nil }
        let nameSize = Int(header.u32(at: 4)), count = Int(header.u32(at: 8))
        let descriptorsAt = Int64(header.u32(at: 16)), dataAt = Int64(header.u32(at: 20))
        // struct kvm_stats_desc: flags u32, exponent s16, size u16, offset u32, bucket_size u32, name[name_size].
        let stride = 16 + nameSize
        guard nameSize > 0, nameSize <= 256, count > 0, count <= 4096,
              let descriptors = Self.read(file, at: descriptorsAt, count: stride * count) else { return nil }
        var offsets: [String: Int64] = [:]
        for i in 0..<count {
            let base = i * stride
            let name = String(decoding: descriptors[(base + 16)..<(base + stride)].prefix { $0 != 0 }, as: UTF8.self)
            guard name == "blocking" || name == "halt_exits", descriptors.u16(at: base + 6) >= 1 else { continue }
            offsets[name] = dataAt + Int64(descriptors.u32(at: base + 8))
        }
        guard let blocking = offsets["blocking"], let haltExits = offsets["halt_exits"] else { return nil }
        blockingOffset = blocking
        haltExitsOffset = haltExits
    }

    /// Whether the vCPU is blocked in KVM now, and its HLT count; nil if a read fails.
    public func haltState() -> (blocking: Bool, haltExits: UInt64)? {
        guard let blocking = Self.read(file, at: blockingOffset, count: 8),
              let exits = Self.read(file, at: haltExitsOffset, count: 8) else { return nil }
        return (blocking.u64(at: 0) != 0, exits.u64(at: 0))
    }

    private static func read(_ file: FileDescriptor, at offset: Int64, count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        let n = bytes.withUnsafeMutableBytes { (try? file.read(into: $0, at: offset)) ?? -1 }
        return n == count ? bytes : nil
    }
}

private extension [UInt8] {
    func u16(at i: Int) -> UInt16 { UInt16(self[i]) | UInt16(self[i + 1]) << 8 }
    func u32(at i: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(self[i + $1]) << (8 * $1) } }
    func u64(at i: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(self[i + $1]) << (8 * $1) } }
}

import CHVShim
import Glibc

/// Anonymous shared memory backed by a memfd: guest RAM, rings and device state pages live in
/// these so that the trusted side owns them and can hand them to device processes as fds.
public enum MemFD {
    /// Creates a memfd of `size` bytes, sealed against shrinking so a peer that maps it can never
    /// be made to fault by a truncate.
    public static func create(name: String, size: Int) throws(SystemError) -> FileDescriptor {
        let raw = hv_memfd_create(name, UInt32(hv_MFD_CLOEXEC | hv_MFD_ALLOW_SEALING))
        try check("memfd_create \(name)", raw)
        let fd = FileDescriptor(owning: raw)
        try check("ftruncate memfd \(name) to \(size) bytes", ftruncate(raw, off_t(size)))
        try check("seal memfd \(name)", fcntl(raw, hv_F_ADD_SEALS, hv_F_SEAL_SHRINK | hv_F_SEAL_GROW))
        return fd
    }
}

/// A shared, read-write mapping of a file descriptor. Unmapped on deinit.
///
/// This is one of hv's few audited holders of a raw pointer. Unsafe assumptions:
/// - `base` stays valid until deinit, because only this object unmaps it;
/// - the mapping is `MAP_SHARED` and may be written concurrently by another process, so callers
///   must treat every byte read from it as untrusted and use atomics where ordering matters;
/// - the backing memfd is sealed against shrinking (see `MemFD.create`), so no access within
///   `count` can SIGBUS.
public final class SharedMapping: @unchecked Sendable {
    // @unchecked: immutable after init; concurrent access to the bytes is the callers' protocol.
    /// First byte of the mapping.
    public let base: UnsafeMutableRawPointer
    /// Length in bytes.
    public let count: Int

    /// Maps `count` bytes of `fd` from offset 0.
    public init(fd: FileDescriptor, count: Int, readOnly: Bool = false) throws(SystemError) {
        let prot = readOnly ? PROT_READ : PROT_READ | PROT_WRITE
        let p = mmap(nil, count, prot, MAP_SHARED, fd.rawValue, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap \(count) bytes of fd \(fd.rawValue)") }
        base = p
        self.count = count
    }

    deinit { munmap(base, count) }
}

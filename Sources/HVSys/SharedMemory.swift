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

    /// A memfd holding `bytes`, read from its start, sealed against any change: a small document
    /// handed to another process (a jail's stage-2 seccomp filter).
    public static func holding(_ bytes: [UInt8], name: String) throws(SystemError) -> FileDescriptor {
        let raw = hv_memfd_create(name, UInt32(hv_MFD_CLOEXEC | hv_MFD_ALLOW_SEALING))
        try check("memfd_create \(name)", raw)
        let fd = FileDescriptor(owning: raw)
        try fd.writeAll(bytes)
        try check("seal memfd \(name)", fcntl(raw, hv_F_ADD_SEALS, hv_F_SEAL_SHRINK | hv_F_SEAL_GROW | hv_F_SEAL_WRITE))
        try check("rewind memfd \(name)", Int32(truncatingIfNeeded: lseek(raw, 0, SEEK_SET)))
        return fd
    }

    /// Checks a region received from another process before anything maps it: it must be sealed
    /// against shrinking and growing (so no peer can truncate it under our mapping and make an
    /// access SIGBUS) and hold at least `minimumSize` bytes. Throws `EPERM` for a missing seal and
    /// `EINVAL` for a short region, with the reason in the operation text.
    public static func requireSealed(_ fd: FileDescriptor, minimumSize: Int) throws(SystemError) {
        let seals = fcntl(fd.rawValue, hv_F_GET_SEALS)
        let needed = hv_F_SEAL_SHRINK | hv_F_SEAL_GROW
        guard seals >= 0, seals & needed == needed else {
            throw SystemError("shared region fd \(fd.rawValue) is not a memfd sealed against shrinking and growing (F_SEAL_SHRINK|F_SEAL_GROW)",
                              Errno(rawValue: EPERM))
        }
        var st = stat()
        try check("fstat shared region fd \(fd.rawValue)", fstat(fd.rawValue, &st))
        guard Int(st.st_size) >= minimumSize else {
            throw SystemError("shared region fd \(fd.rawValue) is \(st.st_size) bytes, smaller than the \(minimumSize) mapped",
                              Errno(rawValue: EINVAL))
        }
    }
}

/// A shared, read-write mapping of a file descriptor. Unmapped on deinit.
///
/// This is one of hv's few audited holders of a raw pointer. Unsafe assumptions:
/// - `base` stays valid until deinit, because only this object unmaps it;
/// - the mapping is `MAP_SHARED` and may be written concurrently by another process, so callers
///   must treat every byte read from it as untrusted and use atomics where ordering matters;
/// - the backing memfd is sealed against shrinking and growing and holds at least `count` bytes,
///   which `init` checks (`MemFD.requireSealed`) before mapping, so no access within `count` can
///   SIGBUS, whoever else holds the region.
public final class SharedMapping: @unchecked Sendable {
    // @unchecked: immutable after init; concurrent access to the bytes is the callers' protocol.
    /// First byte of the mapping.
    public let base: UnsafeMutableRawPointer
    /// Length in bytes.
    public let count: Int

    /// Maps `count` bytes of `fd` from offset 0; `fd` must be a sealed memfd of at least `count`
    /// bytes (every region hv shares is made by `MemFD.create`), else this throws.
    public init(fd: FileDescriptor, count: Int, readOnly: Bool = false) throws(SystemError) {
        try MemFD.requireSealed(fd, minimumSize: count)
        let prot = readOnly ? PROT_READ : PROT_READ | PROT_WRITE
        let p = mmap(nil, count, prot, MAP_SHARED, fd.rawValue, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap \(count) bytes of fd \(fd.rawValue)") }
        base = p
        self.count = count
    }

    deinit { munmap(base, count) }
}

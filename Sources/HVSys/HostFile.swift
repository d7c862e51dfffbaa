import CHVShim
import Glibc

/// Kinds of file the trusted side accepts where an operator names a host path.
public struct HostFileKinds: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// A regular file.
    public static let regular = HostFileKinds(rawValue: 1)
    /// A block device (a disk or partition given as an image).
    public static let blockDevice = HostFileKinds(rawValue: 2)
    /// A character device (/dev/null, a terminal) as an output.
    public static let characterDevice = HostFileKinds(rawValue: 4)
}

/// Why a host file was refused: the open failed, it is the wrong kind, or it is too large to read whole.
public enum HostFileError: Error, Sendable, CustomStringConvertible {
    /// open(2) or fstat(2) failed.
    case system(Errno)
    /// It exists but is not one of the kinds asked for; `found` names what it is ("a FIFO (named pipe)").
    case wrongKind(found: String, wanted: HostFileKinds)
    /// It is larger than the caller reads whole.
    case tooLarge(size: Int64, limit: Int64)
    /// It is not beneath the directory the caller confines paths to, or a symbolic link or ".."
    /// in it leads out.
    case outside(root: String)

    public var description: String {
        switch self {
        case .system(let errno): return "\(errno)"
        case let .wrongKind(found, wanted):
            var names: [String] = []
            if wanted.contains(.regular) { names.append("a regular file") }
            if wanted.contains(.blockDevice) { names.append("a block device") }
            if wanted.contains(.characterDevice) { names.append("a character device") }
            return "it is \(found), not \(names.joined(separator: " or "))"
        case let .tooLarge(size, limit): return "it is \(size) bytes, more than the \(limit) hv reads"
        case let .outside(root): return "it is not beneath \(root) (this VM's files must be; symbolic links and '..' may not lead out)"
        }
    }

    /// The errno behind a failed open, if that is what happened.
    public var errno: Errno? {
        if case .system(let e) = self { return e }
        return nil
    }
}

extension FileDescriptor {
    /// Opens a path an operator named, without ever blocking: the open itself is non-blocking (a
    /// FIFO with no writer, or a device that waits for carrier, would otherwise hang the caller
    /// where no signal can reach it), the result must be one of `kinds` (checked with fstat on the
    /// opened descriptor, so nothing can be swapped in between), and when `maximumSize` is given
    /// the file must not be larger. O_NONBLOCK is cleared again before the descriptor is returned.
    /// `flags` must not contain O_TRUNC: truncate only once every other check has passed.
    ///
    /// With `beneath`, the path must name a file inside that directory, and the kernel resolves
    /// it there (openat2 RESOLVE_BENEATH): a symbolic link or ".." that leads out is refused, so
    /// whoever may write inside the directory cannot make the caller open a file elsewhere.
    public static func openHostFile(_ path: String, flags: Int32, mode: mode_t = 0o644, kinds: HostFileKinds,
                                    maximumSize: Int64? = nil, beneath root: String? = nil) throws(HostFileError) -> FileDescriptor {
        precondition(flags & O_TRUNC == 0, "openHostFile never truncates; call ftruncate after every check")
        let raw: Int32
        if let root {
            let prefix = root.utf8.last == UInt8(ascii: "/") ? root : root + "/"
            guard path.utf8.starts(with: prefix.utf8), path.utf8.count > prefix.utf8.count else { throw .outside(root: root) }
            let relative = String(decoding: path.utf8.dropFirst(prefix.utf8.count), as: UTF8.self)
            let directory = retryOnInterrupt { Glibc.open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
            guard directory >= 0 else { throw .system(.current) }
            defer { Glibc.close(directory) }
            raw = retryOnInterrupt { hv_openat2_beneath(directory, relative, flags | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, UInt32(mode)) }
            if raw < 0 && Errno.current.rawValue == EXDEV { throw .outside(root: root) }
        } else {
            raw = retryOnInterrupt { Glibc.open(path, flags | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, mode) }
        }
        guard raw >= 0 else {
            let failure = Errno.current
            // A FIFO opened for writing without a reader fails with ENXIO: name what it is instead.
            var st = stat()
            if failure.rawValue == ENXIO, stat(path, &st) == 0, st.st_mode & S_IFMT != S_IFREG {
                throw .wrongKind(found: Self.describeFileType(st.st_mode & S_IFMT), wanted: kinds)
            }
            throw .system(failure)
        }
        let fd = FileDescriptor(owning: raw)
        var st = stat()
        guard fstat(raw, &st) == 0 else { throw .system(.current) }
        let type = st.st_mode & S_IFMT
        let kind: HostFileKinds
        switch type {
        case S_IFREG: kind = .regular
        case S_IFBLK: kind = .blockDevice
        case S_IFCHR: kind = .characterDevice
        default: kind = []
        }
        guard !kind.isEmpty, kinds.contains(kind) else {
            throw .wrongKind(found: Self.describeFileType(type), wanted: kinds)
        }
        if let maximumSize, Int64(st.st_size) > maximumSize { throw .tooLarge(size: Int64(st.st_size), limit: maximumSize) }
        do { try fd.setNonBlocking(false) } catch { throw .system(error.errno) }
        return fd
    }

    /// "a FIFO (named pipe)", "a directory", … for a `st_mode & S_IFMT` value.
    public static func describeFileType(_ type: mode_t) -> String {
        switch type {
        case S_IFREG: return "a regular file"
        case S_IFDIR: return "a directory"
        case S_IFIFO: return "a FIFO (named pipe)"
        case S_IFSOCK: return "a socket"
        case S_IFBLK: return "a block device"
        case S_IFCHR: return "a character device"
        case S_IFLNK: return "a symbolic link"
        default: return "a special file"
        }
    }

    /// Takes an open-file-description write lock on the whole file without waiting (F_OFD_SETLK,
    /// the lock QEMU takes on images). It lasts as long as any descriptor for this open file
    /// (including those handed to device processes); false when another open file holds a lock.
    public func tryLockWholeFile(exclusive: Bool) -> Bool {
        var lock = flock()
        lock.l_type = Int16(exclusive ? F_WRLCK : F_RDLCK)
        lock.l_whence = Int16(SEEK_SET)
        lock.l_start = 0
        lock.l_len = 0
        lock.l_pid = 0
        return fcntl(rawValue, hv_F_OFD_SETLK, &lock) == 0
    }

    /// Drops the lock `tryLockWholeFile` took (on this open file description).
    public func unlockWholeFile() {
        var lock = flock()
        lock.l_type = Int16(F_UNLCK)
        lock.l_whence = Int16(SEEK_SET)
        _ = fcntl(rawValue, hv_F_OFD_SETLK, &lock)
    }
}

/// A lock file whose exclusive `flock` marks a live owner (a running VM, a segment's starter):
/// the lock dies with its holder, so a file left by a killed process is told apart from a live
/// one without guessing from timeouts. The path is re-checked after locking, so a holder that
/// removes the file on its way out (under the lock) never leaves a newcomer locking an orphan.
public enum PathLock {
    /// Locks `path` (creating it, mode 0600). Blocking waits for the holder; otherwise nil when
    /// another process holds it. Throws when the file cannot be opened or locked.
    public static func acquire(_ path: String, blocking: Bool) throws(SystemError) -> FileDescriptor? {
        while true {
            let fd = try FileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_NOFOLLOW, mode: 0o600)
            if retryOnInterrupt({ flock(fd.rawValue, LOCK_EX | (blocking ? 0 : LOCK_NB)) }) != 0 {
                if errno == EWOULDBLOCK { return nil }
                throw SystemError("lock \(path)")
            }
            var held = stat(), named = stat()
            guard fstat(fd.rawValue, &held) == 0 else { throw SystemError("fstat \(path)") }
            // Removed (or replaced) by its previous holder between our open and our lock: lock the new one.
            if stat(path, &named) == 0 && named.st_dev == held.st_dev && named.st_ino == held.st_ino { return fd }
        }
    }

    /// Whether another process holds `path`'s lock now; false when the file does not exist.
    public static func isHeld(_ path: String) -> Bool {
        let raw = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard raw >= 0 else { return false }
        defer { Glibc.close(raw) }
        if flock(raw, LOCK_SH | LOCK_NB) == 0 { return false }
        return errno == EWOULDBLOCK
    }
}

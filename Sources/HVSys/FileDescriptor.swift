import CHVShim
import Glibc

/// Owns one open file descriptor and closes it exactly once, when the last reference goes away
/// or `close()` is called. Every kernel handle in hv (KVM fds, memfds, eventfds, sockets, pidfds)
/// lives inside one of these, so no path can leak or double-close a descriptor.
public final class FileDescriptor: @unchecked Sendable {
    // @unchecked: `raw` is only mutated by close()/take(), which the owner calls once, at teardown.
    private var raw: Int32

    /// Takes ownership of `rawValue`.
    public init(owning rawValue: Int32) { raw = rawValue }

    deinit { if raw >= 0 { Glibc.close(raw) } }

    /// The descriptor number, or -1 once closed. Valid only while `self` is alive.
    public var rawValue: Int32 { raw }

    /// Closes now instead of at deinit.
    public func close() {
        if raw >= 0 { Glibc.close(raw) }
        raw = -1
    }

    /// Gives up ownership without closing: the caller now owns the number.
    public func take() -> Int32 {
        let r = raw
        raw = -1
        return r
    }

    /// A second descriptor for the same open file, close-on-exec.
    public func duplicate() throws(SystemError) -> FileDescriptor {
        let fd = fcntl(raw, F_DUPFD_CLOEXEC, 3)
        try check("dup fd \(raw)", fd)
        return FileDescriptor(owning: fd)
    }

    /// Opens a path, close-on-exec.
    public static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) throws(SystemError) -> FileDescriptor {
        let fd = retryOnInterrupt { Glibc.open(path, flags | O_CLOEXEC, mode) }
        try check("open \(path)", fd)
        return FileDescriptor(owning: fd)
    }

    /// Writes all of `bytes`, retrying short writes and EINTR.
    public func writeAll(_ bytes: UnsafeRawBufferPointer) throws(SystemError) {
        var offset = 0
        while offset < bytes.count {
            let n = retryOnInterrupt { Glibc.write(raw, bytes.baseAddress! + offset, bytes.count - offset) }
            try check("write fd \(raw)", n)
            offset += n
        }
    }

    /// Writes all bytes of an array.
    public func writeAll(_ bytes: [UInt8]) throws(SystemError) {
        var failure: SystemError?
        bytes.withUnsafeBytes { buffer in
            do throws(SystemError) { try writeAll(buffer) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// One read(2); returns 0 at end of file.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        let n = retryOnInterrupt { Glibc.read(raw, buffer.baseAddress, buffer.count) }
        try check("read fd \(raw)", n)
        return n
    }

    /// Reads at an offset (pread); returns the number of bytes read.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(SystemError) -> Int {
        let n = retryOnInterrupt { pread(raw, buffer.baseAddress, buffer.count, off_t(offset)) }
        try check("pread fd \(raw)", n)
        return n
    }

    /// Reads the whole file from offset 0 (pread, so the file position is untouched), until end
    /// of file: the size from fstat is only a first guess, since /proc files report 0.
    public func readAll() throws(SystemError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: max(Int(try size()), 4096))
        var done = 0
        while true {
            if done == bytes.count { bytes += [UInt8](repeating: 0, count: bytes.count) }
            let n = bytes.withUnsafeMutableBytes { buffer in
                retryOnInterrupt { pread(raw, buffer.baseAddress! + done, buffer.count - done, off_t(done)) }
            }
            try check("read fd \(raw)", n)
            if n == 0 { return Array(bytes.prefix(done)) }
            done += n
        }
    }

    /// Size of the open file, in bytes.
    public func size() throws(SystemError) -> Int64 {
        var st = stat()
        try check("fstat fd \(raw)", fstat(raw, &st))
        return Int64(st.st_size)
    }

    /// Sets or clears O_NONBLOCK.
    public func setNonBlocking(_ on: Bool) throws(SystemError) {
        let flags = fcntl(raw, F_GETFL)
        try check("fcntl F_GETFL", flags)
        try check("fcntl F_SETFL", fcntl(raw, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK))
    }
}

/// Waits for events on a set of descriptors.
public enum Poll {
    /// One descriptor of interest.
    public struct Interest: Sendable {
        public var fd: Int32
        public var events: Int16
        public init(fd: Int32, events: Int16 = Int16(POLLIN)) {
            self.fd = fd
            self.events = events
        }
    }

    /// poll(2) with `timeoutMilliseconds` (-1 waits forever). Returns `revents` per interest;
    /// an interrupted wait returns all zeros rather than throwing.
    public static func wait(_ interests: [Interest], timeoutMilliseconds: Int32) throws(SystemError) -> [Int16] {
        var fds = interests.map { pollfd(fd: $0.fd, events: $0.events, revents: 0) }
        let n = fds.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, nfds_t($0.count), timeoutMilliseconds) }
        if n == -1 {
            if errno == EINTR { return Array(repeating: 0, count: interests.count) }
            throw SystemError("poll")
        }
        return fds.map(\.revents)
    }
}

/// Monotonic time in nanoseconds.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

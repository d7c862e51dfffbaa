import Glibc

/// A POSIX error number, as returned by a failed system call.
public struct Errno: Error, Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The raw `errno` value.
    public let rawValue: Int32
    /// Wraps a raw `errno` value.
    public init(rawValue: Int32) { self.rawValue = rawValue }
    /// The calling thread's current `errno`.
    public static var current: Errno { Errno(rawValue: errno) }

    public static let interrupted = Errno(rawValue: EINTR)
    public static let wouldBlock = Errno(rawValue: EAGAIN)
    public static let noEntry = Errno(rawValue: ENOENT)
    public static let permissionDenied = Errno(rawValue: EACCES)
    public static let badFileDescriptor = Errno(rawValue: EBADF)
    public static let invalidArgument = Errno(rawValue: EINVAL)
    public static let brokenPipe = Errno(rawValue: EPIPE)
    public static let connectionReset = Errno(rawValue: ECONNRESET)
    public static let noSuchProcess = Errno(rawValue: ESRCH)

    public var description: String { String(cString: strerror(rawValue)) }
}

/// A failed system call: which operation, and why.
public struct SystemError: Error, Sendable, CustomStringConvertible {
    /// What was being done, e.g. `"open /dev/kvm"`.
    public let operation: String
    /// The kernel's answer.
    public let errno: Errno
    public init(_ operation: String, _ errno: Errno = .current) {
        self.operation = operation
        self.errno = errno
    }
    public var description: String { "\(operation): \(errno)" }
}

/// Runs `body` until it stops failing with EINTR. `body` returns -1 and sets errno on failure.
@inlinable
public func retryOnInterrupt<T: BinaryInteger>(_ body: () -> T) -> T {
    while true {
        let result = body()
        if result == -1 && errno == EINTR { continue }
        return result
    }
}

/// Throws `SystemError` when a raw syscall result is -1.
@inlinable
@discardableResult
public func check<T: BinaryInteger>(_ operation: @autoclosure () -> String, _ result: T) throws(SystemError) -> T {
    if result == -1 { throw SystemError(operation(), .current) }
    return result
}

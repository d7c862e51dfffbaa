import CHVShim
import Glibc

/// An eventfd: the kick and interrupt doorbells between the core, KVM and device processes.
public final class EventFD: Sendable {
    /// The owned descriptor.
    public let fd: FileDescriptor

    /// A new eventfd, close-on-exec; non-blocking when `nonBlocking`.
    /// With `semaphore`, each read takes one from the counter instead of all of it
    /// (EFD_SEMAPHORE): a work queue's "one job ready" signal for several waiting threads.
    public init(nonBlocking: Bool = false, semaphore: Bool = false) throws(SystemError) {
        // EFD_SEMAPHORE is 1 on Linux.
        let raw = hv_eventfd(0, hv_EFD_CLOEXEC | (nonBlocking ? hv_EFD_NONBLOCK : 0) | (semaphore ? 1 : 0))
        try check("eventfd", raw)
        fd = FileDescriptor(owning: raw)
    }

    /// Wraps a received eventfd.
    public init(adopting fd: FileDescriptor) { self.fd = fd }

    /// Adds one to the counter, waking a waiter.
    public func signal() {
        var one: UInt64 = 1
        _ = retryOnInterrupt { Glibc.write(fd.rawValue, &one, 8) }
    }

    /// Reads and resets the counter; returns 0 if it was zero on a non-blocking eventfd.
    @discardableResult
    public func drain() -> UInt64 {
        var value: UInt64 = 0
        let n = retryOnInterrupt { Glibc.read(fd.rawValue, &value, 8) }
        return n == 8 ? value : 0
    }
}

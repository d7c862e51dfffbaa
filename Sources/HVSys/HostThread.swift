import CHVShim
import Glibc

/// A dedicated OS thread (vCPU loops, ring waiters, supervisors): hv keeps these off Swift's
/// cooperative pool, where a thread blocked in KVM_RUN or poll would starve async work.
public enum HostThread {
    private final class Start: @unchecked Sendable {
        // @unchecked: handed from the creating thread to the new one exactly once.
        let body: @Sendable () -> Void
        let name: String
        init(_ name: String, _ body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Starts `body` on a new detached thread and returns its handle, which is valid only while
    /// the thread runs.
    @discardableResult
    public static func spawn(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) -> pthread_t {
        try start(name: name, joinable: false, body)
    }

    /// Starts `body` on a new joinable thread: its handle stays valid until the caller joins it
    /// (`pthread_join`, once), so it may be signalled (`pthread_kill`) even after it ended —
    /// vCPU threads, which a stop kicks whether or not they already returned.
    public static func spawnJoinable(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) -> pthread_t {
        try start(name: name, joinable: true, body)
    }

    private static func start(name: String, joinable: Bool, _ body: @escaping @Sendable () -> Void) throws(SystemError) -> pthread_t {
        let start = Unmanaged.passRetained(Start(name, body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let start = Unmanaged<Start>.fromOpaque(raw!).takeRetainedValue()
            _ = hv_set_thread_name(String(start.name.prefix(15)))
            start.body()
            return nil
        }, start)
        if rc != 0 {
            Unmanaged<Start>.fromOpaque(start).release()
            throw SystemError("pthread_create \(name)", Errno(rawValue: rc))
        }
        if !joinable { pthread_detach(thread) }
        return thread
    }
}

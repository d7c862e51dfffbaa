import Glibc
import HVKVM
import HVSys
import Synchronization

/// A VM's guest memory (RAM and firmware slots) registered with KVM on a thread of its own, and
/// waited for before the first vCPU runs. A VM's first `KVM_SET_USER_MEMORY_REGION` takes 5–11 ms
/// on this host while using almost no CPU (the kernel waits; later slots take ~0.05 ms), so it
/// runs while the device processes start, which need the memfd but not the slots.
final class MemorySlotRegistration: Sendable {
    private let state = Mutex<(thread: pthread_t?, failure: KVMError?)>((nil, nil))

    private init() {}

    /// Starts `register` on a thread (or, if no thread can be made, runs it now).
    static func start(_ register: @escaping @Sendable () throws(KVMError) -> Void) -> MemorySlotRegistration {
        let registration = MemorySlotRegistration()
        do {
            let thread = try HostThread.spawnJoinable(name: "hv-memslots") {
                do throws(KVMError) { try register() } catch { registration.state.withLock { $0.failure = error } }
            }
            registration.state.withLock { $0.thread = thread }
        } catch {
            do throws(KVMError) { try register() } catch { registration.state.withLock { $0.failure = error } }
        }
        return registration
    }

    /// Waits until the slots are registered and throws what failed. Called from one thread (the
    /// one that starts the vCPUs); later calls return at once.
    func wait() throws(KVMError) {
        let thread = state.withLock { s -> pthread_t? in
            defer { s.thread = nil }
            return s.thread
        }
        if let thread { pthread_join(thread, nil) }
        if let failure = state.withLock({ $0.failure }) { throw failure }
    }
}

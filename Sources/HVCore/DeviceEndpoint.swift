import Glibc
import HVIPC
import HVSys
import Synchronization

/// The core's side of one device's register ring. vCPU threads call `read`/`write`; the
/// supervisor changes `state` as the device process dies and comes back.
///
/// Guarantees while the device is away (crashed, restarting):
/// - writes are held in the ring (core-owned memory) and reach the restarted device in order;
/// - a read waits for the restarted device, up to `holdNanoseconds`; a read in flight when the
///   device died is replayed by the new process, since it was never committed;
/// - only once the device is given up for good do reads return all-ones and writes get dropped.
final class DeviceEndpoint: @unchecked Sendable {
    // @unchecked: `ring` and the eventfds are immutable and internally synchronised; the producer
    // side is serialised by `producer`; `state` is atomic.
    enum State: UInt8 {
        case running = 0
        case restarting = 1
        case failed = 2
    }

    let name: String
    let ring: RegisterRing
    let ringFD: FileDescriptor
    /// Core → device doorbell.
    let kick: EventFD
    /// Device → core doorbell.
    let reply: EventFD
    private let stateValue = Atomic<UInt8>(State.restarting.rawValue)
    /// Serialises producers (vCPU threads) so the shared ring stays single-producer.
    private let producer = Mutex<UInt64>(1)
    /// How long a vCPU waits for a restarting device before giving up on one access.
    let holdNanoseconds: UInt64 = 2_000_000_000
    /// Writes dropped because the device was gone for good (reported at shutdown).
    let droppedWrites = Atomic<UInt64>(0)
    /// Set when the device broke the ring protocol; the supervisor kills and restarts it.
    let faulted = Atomic<Bool>(false)
    var onFault: (@Sendable (String) -> Void)?

    init(name: String) throws(CoreError) {
        self.name = name
        do {
            (ringFD, ring) = try RegisterRing.create()
            kick = try EventFD(nonBlocking: true)
            reply = try EventFD(nonBlocking: true)
        } catch let e as RingError {
            throw .device(name: name, reason: e.description)
        } catch let e as SystemError {
            throw .system(e)
        } catch {
            throw .device(name: name, reason: "\(error)")
        }
    }

    var state: State {
        get { State(rawValue: stateValue.load(ordering: .acquiring)) ?? .failed }
        set { stateValue.store(newValue.rawValue, ordering: .releasing) }
    }

    private static func allOnes(_ size: Int) -> UInt64 { size >= 8 ? ~0 : (1 << (UInt64(size) * 8)) - 1 }

    /// A posted write.
    func write(_ op: RegisterRequest.Operation, resource: UInt16, offset: UInt64, size: Int, value: UInt64, vcpu: UInt32) {
        producer.withLock { nextTag in
            guard waitUntilUsable(forRead: false) else {
                droppedWrites.add(1, ordering: .relaxed)
                return
            }
            let request = RegisterRequest(operation: op, size: UInt8(size), resource: resource, vcpu: vcpu,
                                          offset: offset, data: value, tag: nextTag)
            nextTag &+= 1
            if !push(request) { droppedWrites.add(1, ordering: .relaxed) }
        }
    }

    /// A read: waits for the device's answer.
    func read(_ op: RegisterRequest.Operation, resource: UInt16, offset: UInt64, size: Int, vcpu: UInt32) -> UInt64 {
        producer.withLock { nextTag in
            guard waitUntilUsable(forRead: true) else { return Self.allOnes(size) }
            let tag = nextTag
            nextTag &+= 1
            let request = RegisterRequest(operation: op, size: UInt8(size), resource: resource, vcpu: vcpu,
                                          offset: offset, data: 0, tag: tag)
            guard push(request) else { return Self.allOnes(size) }
            return awaitResponse(tag: tag) ?? Self.allOnes(size)
        }
    }

    /// While the device restarts, waits (bounded). False when the access can't be delivered.
    private func waitUntilUsable(forRead: Bool) -> Bool {
        var deadline: UInt64 = 0
        while true {
            switch state {
            case .running: return true
            case .failed: return false
            case .restarting:
                // Writes can queue in the ring while there is room; reads need a live device.
                if !forRead && ring.requestsOutstanding() < ring.requestCapacity { return true }
                let now = monotonicNanoseconds()
                if deadline == 0 { deadline = now + holdNanoseconds }
                if now >= deadline { return false }
                usleep(500)
            }
        }
    }

    /// Publishes a request, waiting (bounded) for ring space. False if it could not be delivered.
    private func push(_ request: RegisterRequest) -> Bool {
        var deadline: UInt64 = 0
        while true {
            do {
                if try ring.pushRequest(request) {
                    if ring.requestConsumerNeedsWakeup() { kick.signal() }
                    return true
                }
            } catch {
                fault("\(error)")
                return false
            }
            if state == .failed { return false }
            let now = monotonicNanoseconds()
            if deadline == 0 { deadline = now + holdNanoseconds }
            if now >= deadline { return false }
            if ring.requestConsumerNeedsWakeup() { kick.signal() }
            sched_yield()
        }
    }

    /// A live device that leaves a read unanswered this long is hung: it is killed and restarted,
    /// and the replacement replays the read.
    let hungNanoseconds: UInt64 = 5_000_000_000

    private func awaitResponse(tag: UInt64) -> UInt64? {
        let spinUntil = monotonicNanoseconds() + 20_000
        var hungDeadline = monotonicNanoseconds() + hungNanoseconds
        var holdDeadline: UInt64 = 0
        while true {
            do {
                while let response = try ring.popResponse() {
                    // Stale answers (a replayed read's first reply) are skipped by tag.
                    if response.tag == tag { return response.data }
                }
            } catch {
                fault("\(error)")
                return nil
            }
            let now = monotonicNanoseconds()
            if now < spinUntil { continue }
            switch state {
            case .failed: return nil
            case .restarting:
                if holdDeadline == 0 { holdDeadline = now + holdNanoseconds }
                if now >= holdDeadline { return nil }
            case .running:
                holdDeadline = 0
                if now >= hungDeadline {
                    fault("no answer to a register read within \(hungNanoseconds / 1_000_000_000) s")
                    hungDeadline = now + hungNanoseconds
                }
            }
            if ring.setResponseConsumerSleeping(true) {
                ring.setResponseConsumerSleeping(false)
                continue
            }
            _ = try? Poll.wait([.init(fd: reply.fd.rawValue)], timeoutMilliseconds: 10)
            ring.setResponseConsumerSleeping(false)
            reply.drain()
        }
    }

    private func fault(_ why: String) {
        if !faulted.exchange(true, ordering: .acquiringAndReleasing) { onFault?(why) }
    }
}

import Dispatch
import Foundation
import HVHost
import Synchronization

/// One line of `GET /v1/events`.
struct Event: Encodable, Sendable {
    /// RFC 3339, UTC, milliseconds.
    var time: String
    /// `vm-created`, `vm-deleted`, `vm-started`, `vm-stopped`, `vm-paused`, `vm-resumed`,
    /// `vm-start-failed`, `device-restarted`, `device-failed`, `device-recovered`, `job-progress`,
    /// `job-finished`.
    var type: String
    var vm: String
    var device: String?
    /// `device-restarted`: how many times the device has been restarted in this VM's life.
    var restarts: UInt32?
    /// `vm-stopped`: `requested` (through hvd), `killed` (through hvd), `migrated` (moved to
    /// another host by a job) or `exited` (anything else: the guest powered off, `hvctl stop`, a
    /// crash).
    var reason: String?
    var message: String?
    /// `job-progress`, `job-finished`: the job's id (`reason` is a finished job's state).
    var job: String?

    init(type: String, vm: String, device: String? = nil, restarts: UInt32? = nil, reason: String? = nil, message: String? = nil, job: String? = nil) {
        time = Date.now.formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true).timeZone(separator: .omitted))
        self.type = type
        self.vm = vm
        self.device = device
        self.restarts = restarts
        self.reason = reason
        self.message = message
        self.job = job
    }
}

/// Turns what the VMs do into events. hvd asks each kept VM for its status twice a second (and
/// at once after it acted on one) and compares with what it saw last: a VM that appeared,
/// vanished, paused or resumed, a device whose restart count rose or that failed. What hvd
/// does itself and what happens behind its back (a guest powering off, `hvctl stop`, a device
/// crash) are told the same way, once.
final class EventMonitor: Sendable {
    private struct Seen: Sendable {
        var state: String
        var devices: [String: VMStatus.Device]
    }

    private struct State: Sendable {
        var seen: [String: Seen] = [:]
        var expectedStops: [String: String] = [:]
        var subscribers: [Int: (continuation: AsyncStream<Event>.Continuation, wants: @Sendable (Event) -> Bool)] = [:]
        var nextSubscriber = 0
    }

    private let state = Mutex(State())
    /// Observations run here, one at a time.
    private let queue = DispatchQueue(label: "hvd.events")
    private let names: @Sendable () -> [String]
    private let status: @Sendable (String) -> VMStatus?

    /// `names` lists the kept VMs; `status` asks one for its status (nil: not running).
    init(names: @escaping @Sendable () -> [String], status: @escaping @Sendable (String) -> VMStatus?) {
        self.names = names
        self.status = status
        timer = DispatchSource.makeTimerSource(queue: queue)
    }

    /// Sends `event` to every subscriber.
    func publish(_ event: Event) {
        state.withLock { s in
            for subscriber in s.subscribers.values where subscriber.wants(event) { subscriber.continuation.yield(event) }
        }
    }

    /// Every event from now on that `wants` takes, until the stream is dropped. A subscriber that
    /// falls 1024 events behind loses the oldest.
    func subscribe(wants: @escaping @Sendable (Event) -> Bool = { _ in true }) -> AsyncStream<Event> {
        let (stream, continuation) = AsyncStream<Event>.makeStream(bufferingPolicy: .bufferingNewest(1024))
        let id = state.withLock { s in
            let id = s.nextSubscriber
            s.nextSubscriber += 1
            s.subscribers[id] = (continuation, wants)
            return id
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.state.withLock { $0.subscribers.removeValue(forKey: id) }
        }
        return stream
    }

    /// The next `vm-stopped` of `name` gives this reason (hvd itself is stopping it).
    func expectStop(_ name: String, reason: String) {
        state.withLock { $0.expectedStops[name] = reason }
    }

    /// Drops what was seen of a deleted VM.
    func forget(_ name: String) {
        queue.async { self.state.withLock { $0.seen[name] = nil } }
    }

    /// Looks at VM `name` now (soon, on the monitor's queue).
    func observe(_ name: String) {
        queue.async { self.look(at: name, announce: true) }
    }

    /// Records every kept VM as it is without announcing anything (hvd starting: VMs already
    /// running are adopted), then looks again every `interval` seconds. Returns the names of
    /// the VMs found running.
    func start(interval: Double) -> [String] {
        let adopted = queue.sync {
            names().filter { name in
                look(at: name, announce: false)
                return state.withLock { $0.seen[name]?.state } != "stopped"
            }
        }
        timer.schedule(deadline: .now() + interval, repeating: interval)
        timer.setEventHandler { [self] in
            for name in names() { look(at: name, announce: true) }
        }
        timer.resume()
        return adopted
    }

    /// The polling timer. nonisolated(unsafe): set up once in `start`, before it fires; it then
    /// runs on `queue` alone.
    private nonisolated(unsafe) let timer: any DispatchSourceTimer

    /// On `queue` only.
    private func look(at name: String, announce: Bool) {
        let now = status(name)
        let devices = Dictionary((now?.devices ?? []).map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let (before, seen, reason) = state.withLock { s in
            let before = s.seen[name]
            // A VM whose guest has not started yet (or is rebooting) is still in its last state:
            // "vm-started" means the guest runs.
            let reported = now?.state ?? "stopped"
            let seen = Seen(state: reported == "starting" ? before?.state ?? "stopped" : reported, devices: devices)
            s.seen[name] = seen
            let reason = seen.state == "stopped" ? s.expectedStops.removeValue(forKey: name) : nil
            return (before, seen, reason)
        }
        guard announce else { return }
        let previous = before?.state ?? "stopped"
        switch (previous, seen.state) {
        case ("stopped", "running"): publish(Event(type: "vm-started", vm: name))
        case ("stopped", "paused"):
            publish(Event(type: "vm-started", vm: name))
            publish(Event(type: "vm-paused", vm: name))
        case ("running", "paused"): publish(Event(type: "vm-paused", vm: name))
        case ("paused", "running"): publish(Event(type: "vm-resumed", vm: name))
        case (_, "stopped") where previous != "stopped": publish(Event(type: "vm-stopped", vm: name, reason: reason ?? "exited"))
        default: break
        }
        guard seen.state != "stopped", previous != "stopped" else { return }
        for (device, now) in seen.devices.sorted(by: { $0.key < $1.key }) {
            guard let then = before?.devices[device] else { continue }
            if now.restarts > then.restarts {
                publish(Event(type: "device-restarted", vm: name, device: device, restarts: now.restarts))
            }
            if now.state == "failed" && then.state != "failed" {
                publish(Event(type: "device-failed", vm: name, device: device))
            } else if then.state == "failed" && now.state == "running" {
                publish(Event(type: "device-recovered", vm: name, device: device))
            }
        }
    }
}

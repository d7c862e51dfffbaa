import Foundation
import HVHost
import HVSys
import Synchronization

/// A long operation hvd runs for a client that does not wait for it: `POST …/snapshot` and
/// `POST …/migrate` answer 202 with one, `GET /v1/jobs/{id}` tells where it stands, events
/// (`job-progress`, `job-finished`) tell as it goes, `DELETE /v1/jobs/{id}` cancels a migration.
/// Jobs live in hvd's memory: the VM does the work, so a job whose hvd restarts is lost from the
/// list but not from the VM (its migration or snapshot goes on).
struct Job: Encodable, Sendable {
    var id: String
    /// `snapshot` or `migrate`.
    var type: String
    var vm: String
    /// `running`, `succeeded`, `failed` or `cancelled`.
    var state: String
    var started: String
    var finished: String?
    /// A migration's last progress report.
    var progress: MigrationProgressReport?
    /// A migration's outcome.
    var migration: MigrationResultReport?
    /// The VM's one-line report when it succeeded.
    var message: String?
    /// Why it failed, in one line.
    var error: String?

    enum CodingKeys: String, CodingKey { case id, type, vm, state, started, finished, progress, migration, message, error }
}

/// `POST /v1/vms/{name}/snapshot`.
struct SnapshotRequest: Decodable, Sendable {
    var path: String
    var stop: Bool

    enum CodingKeys: String, CodingKey, CaseIterable { case path, stop }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        path = try c.decode(String.self, forKey: .path)
        stop = try c.decodeIfPresent(Bool.self, forKey: .stop) ?? false
    }
}

/// `POST /v1/vms/{name}/migrate`: `hvctl migrate`'s options.
struct MigrateRequest: Decodable, Sendable {
    var to: String
    var maxDowntimeMs: UInt64?
    var timeoutSeconds: UInt64?
    var bandwidth: UInt64?
    var finishOnTimeout: Bool?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case to, maxDowntimeMs = "max_downtime_ms", timeoutSeconds = "timeout_seconds", bandwidth = "bandwidth_bytes_per_second"
        case finishOnTimeout = "finish_on_timeout"
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        to = try c.decode(String.self, forKey: .to)
        maxDowntimeMs = try c.decodeIfPresent(UInt64.self, forKey: .maxDowntimeMs)
        timeoutSeconds = try c.decodeIfPresent(UInt64.self, forKey: .timeoutSeconds)
        bandwidth = try c.decodeIfPresent(UInt64.self, forKey: .bandwidth)
        finishOnTimeout = try c.decodeIfPresent(Bool.self, forKey: .finishOnTimeout)
    }
}

/// The jobs hvd has run since it started (the last 100 finished ones, and every running one).
final class JobTable: Sendable {
    private struct State {
        var jobs: [String: Job] = [:]
        var order: [String] = []
        var next = 1
        var cancelling: Set<String> = []
    }

    private let state = Mutex(State())
    let events: EventMonitor

    init(events: EventMonitor) { self.events = events }

    var all: [Job] { state.withLock { s in s.order.compactMap { s.jobs[$0] } } }

    func get(_ id: String) -> Job? { state.withLock { $0.jobs[id] } }

    /// A job of `type` on `vm`, running from now; refused when that VM has one running already.
    func begin(_ type: String, vm: String) throws(APIError) -> Job {
        try state.withLock { (s: inout State) throws(APIError) -> Job in
            if let busy = s.order.compactMap({ s.jobs[$0] }).first(where: { $0.vm == vm && $0.state == "running" }) {
                throw .conflict("VM '\(vm)' has a \(busy.type) job running (\(busy.id)); wait for it or cancel it")
            }
            let job = Job(id: "job-\(s.next)", type: type, vm: vm, state: "running", started: Event(type: "", vm: "").time)
            s.next += 1
            s.jobs[job.id] = job
            s.order.append(job.id)
            // Keep every running job and the last 100 finished.
            let finished = s.order.filter { s.jobs[$0]?.state != "running" }
            for old in finished.dropLast(100) {
                s.jobs[old] = nil
                s.order.removeAll { $0 == old }
            }
            return job
        }
    }

    /// Notes that a client asked to cancel job `id`, so its failure is told as `cancelled`.
    func requestCancel(_ id: String) { _ = state.withLock { $0.cancelling.insert(id) } }

    func progress(_ id: String, _ report: MigrationProgressReport) {
        guard let job = update(id, { $0.progress = report }) else { return }
        events.publish(Event(type: "job-progress", vm: job.vm, message: "round \(report.round) (\(report.phase)): \(report.bytesSent >> 20) MiB sent",
                             job: job.id))
    }

    func finish(_ id: String, state given: String, message: String? = nil, error: String? = nil, migration: MigrationResultReport? = nil) {
        let time = Event(type: "", vm: "").time
        let state = given == "failed" && self.state.withLock({ $0.cancelling.remove(id) != nil }) ? "cancelled" : given
        guard let job = update(id, { job in
            job.state = state
            job.finished = time
            job.message = message
            job.error = error
            job.migration = migration
        }) else { return }
        events.publish(Event(type: "job-finished", vm: job.vm, reason: state, message: error ?? message, job: job.id))
    }

    @discardableResult
    private func update(_ id: String, _ change: (inout Job) -> Void) -> Job? {
        state.withLock { s in
            guard var job = s.jobs[id] else { return nil }
            change(&job)
            s.jobs[id] = job
            return job
        }
    }
}

extension VMService {
    /// Starts a snapshot of running VM `name` into `request.path` as a job.
    func snapshot(_ name: String, _ request: SnapshotRequest, _ scope: Scope) async throws(APIError) -> Job {
        _ = try keptForJob(name, scope, what: "snapshots")
        guard request.path.utf8.first == UInt8(ascii: "/"), !request.path.utf8.contains(0) else {
            throw .badRequest("path '\(request.path)' must be an absolute directory path")
        }
        guard case .live = await blocking({ vmPresence(name) }) else { throw .conflict("VM '\(name)' is not running") }
        let job = try jobs.begin("snapshot", vm: name)
        let jobs = self.jobs
        DispatchQueue.global().async {
            let reply = controlRequest(name, ControlRequest(.snapshot, path: request.path, stop: request.stop), timeoutSeconds: 600)
            switch reply {
            case .some(let r) where r.ok: jobs.finish(job.id, state: "succeeded", message: r.message)
            case .some(let r): jobs.finish(job.id, state: "failed", error: r.error ?? "the snapshot failed")
            case .none: jobs.finish(job.id, state: "failed", error: "VM '\(name)' did not answer within 600 s")
            }
        }
        events.observe(name)
        return job
    }

    /// Starts a live migration of running VM `name` as a job; its progress reports land in the job.
    func migrate(_ name: String, _ request: MigrateRequest, _ scope: Scope) async throws(APIError) -> Job {
        _ = try keptForJob(name, scope, what: "migrations")
        do { _ = try MigrationAddress.parse(request.to, flag: "to") } catch { throw .badRequest(error.message) }
        guard case .live = await blocking({ vmPresence(name) }) else { throw .conflict("VM '\(name)' is not running") }
        var control = ControlRequest(.migrate, path: request.to)
        control.maxDowntimeMs = request.maxDowntimeMs
        control.timeoutSeconds = request.timeoutSeconds
        control.bandwidth = request.bandwidth
        control.finishOnTimeout = request.finishOnTimeout
        let job = try jobs.begin("migrate", vm: name)
        let (jobs, events, request) = (self.jobs, self.events, control)
        DispatchQueue.global().async {
            let outcome = Self.streamMigration(name, request) { jobs.progress(job.id, $0) }
            switch outcome {
            case .success(let result):
                events.expectStop(name, reason: "migrated")
                jobs.finish(job.id, state: "succeeded", message: "moved to \(result.destination)", migration: result)
            case .failure(let error):
                jobs.finish(job.id, state: "failed", error: error.message)
            }
            events.observe(name)
        }
        return job
    }

    /// Cancels job `id`: a migration stops and the VM carries on here; a snapshot cannot be.
    func cancel(_ id: String, _ scope: Scope) async throws(APIError) -> Job {
        guard let job = jobs.get(id), let vm = store.get(job.vm), scope.sees(vm) else { throw .notFound("no job '\(id)' (see GET /v1/jobs)") }
        guard job.state == "running" else { throw .conflict("job \(id) has \(job.state) already") }
        guard job.type == "migrate" else { throw .conflict("a snapshot cannot be cancelled: it ends when its copy is made") }
        jobs.requestCancel(id)
        let reply = await blocking { controlRequest(job.vm, ControlRequest(.migrateCancel), timeoutSeconds: 10) }
        guard let reply, reply.ok else { throw .unprocessable(reply?.error ?? "VM '\(job.vm)' did not answer") }
        return jobs.get(id) ?? job
    }

    private func keptForJob(_ name: String, _ scope: Scope, what: String) throws(APIError) -> StoredVM {
        guard let vm = store.get(name), scope.sees(vm) else { throw APIError.noVM(name) }
        // They write where the admin says (a directory, another host): the admin's to start.
        if case .tenant = scope { throw .forbidden("tenants cannot start \(what); ask the host's admin") }
        return vm
    }

    /// Sends `migrate` and reads the VM's replies until the last one.
    private static func streamMigration(_ name: String, _ request: ControlRequest,
                                        progress: (MigrationProgressReport) -> Void) -> Result<MigrationResultReport, APIError> {
        guard let fd = connectTo(RunDirectory.socket(name)) else { return .failure(.unprocessable("VM '\(name)' does not answer")) }
        defer { close(fd) }
        guard ControlJSON.encode(request).withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) > 0 else {
            return .failure(.unprocessable("VM '\(name)' does not answer"))
        }
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return .failure(.unprocessable("VM '\(name)' ended the migration without a result (did it stop?)")) }
            guard let reply = try? ControlJSON.decode(ControlReply.self, Array(buffer.prefix(n))) else {
                return .failure(.unprocessable("VM '\(name)' sent a malformed reply"))
            }
            guard reply.ok else { return .failure(.unprocessable(reply.error ?? "the migration failed")) }
            if let result = reply.migration { return .success(result) }
            if let report = reply.progress { progress(report) }
        }
    }
}

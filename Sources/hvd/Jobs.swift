import Foundation
import HVHost
import HVSys
import Synchronization

/// hvd's jobs are HVHost's `HVDJob`, the type hvctl reads them as too.
typealias Job = HVDJob

/// `POST /v1/vms/{name}/incoming`: `hvctl run --incoming`'s options.
struct IncomingRequest: Decodable, Sendable {
    /// Where to wait: tcp:HOST:PORT.
    var address: String
    var keyFile: String?
    var insecurePlaintext: Bool?
    /// Whether hvd starts the VM that arrived when hvd itself starts.
    var autostart: Bool?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case address, keyFile = "key_file", insecurePlaintext = "insecure_plaintext", autostart
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        address = try c.decode(String.self, forKey: .address)
        keyFile = try c.decodeIfPresent(String.self, forKey: .keyFile)
        insecurePlaintext = try c.decodeIfPresent(Bool.self, forKey: .insecurePlaintext)
        autostart = try c.decodeIfPresent(Bool.self, forKey: .autostart)
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

    /// A job of `type` on `vm` (or, for a disk job, on image `disk`), running from now; refused
    /// when that VM or image has one running already.
    func begin(_ type: String, vm: String, disk: String? = nil) throws(APIError) -> Job {
        try state.withLock { (s: inout State) throws(APIError) -> Job in
            let running = s.order.compactMap({ s.jobs[$0] }).filter { $0.state == "running" }
            if let disk, let busy = running.first(where: { $0.disk == disk }) {
                throw .conflict("'\(disk)' has a \(busy.type) job running (\(busy.id)); wait for it or cancel it")
            }
            if !vm.isEmpty, let busy = running.first(where: { $0.vm == vm }) {
                throw .conflict("VM '\(vm)' has a \(busy.type) job running (\(busy.id)); wait for it or cancel it")
            }
            var job = Job(id: "job-\(s.next)", type: type, vm: vm, state: "running", started: Event(type: "", vm: "").time)
            job.disk = disk
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

    /// At hvd's stop: every running conversion is cancelled (each removes its destination) and
    /// every disk job is waited for, `seconds` at most; returns those that were still running.
    func settleDiskJobs(seconds: Double) -> [Job] {
        func running() -> [Job] { all.filter { $0.vm.isEmpty && $0.state == "running" } }
        for job in running() where job.type == "convert" { requestCancel(job.id) }
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while !running().isEmpty && monotonicNanoseconds() < deadline { usleep(10_000) }
        return running()
    }

    /// Notes that a client asked to cancel job `id`, so its failure is told as `cancelled`.
    func requestCancel(_ id: String) { _ = state.withLock { $0.cancelling.insert(id) } }

    /// Whether a client asked to cancel job `id`.
    func cancelRequested(_ id: String) -> Bool { state.withLock { $0.cancelling.contains(id) } }

    func progress(_ id: String, _ report: MigrationProgressReport) {
        guard let job = update(id, { $0.progress = report }) else { return }
        events.publish(Event(type: "job-progress", vm: job.vm, message: "round \(report.round) (\(report.phase)): \(report.bytesSent >> 20) MiB sent",
                             job: job.id))
    }

    /// A disk job's progress; an event each time another whole percent is done.
    func progress(_ id: String, done: UInt64, of total: UInt64) {
        var before: UInt64?
        guard let job = update(id, { job in
            before = job.bytesDone
            job.bytesDone = done
            job.bytesTotal = total
        }) else { return }
        func percent(_ bytes: UInt64?) -> UInt64? { bytes.map { total == 0 ? 100 : $0 * 100 / total } }
        guard percent(before) != percent(done) else { return }
        events.publish(Event(type: "job-progress", vm: job.vm, message: "\(percent(done) ?? 0)% of \(job.disk ?? "") (\(done >> 20) of \(total >> 20) MiB)",
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
        if let key = try await Self.migrationKey(file: request.keyFile, insecurePlaintext: request.insecurePlaintext) {
            control.migrationKey = key.hex
        } else {
            control.insecurePlaintext = true
        }
        let job = try jobs.begin("migrate", vm: name)
        let (jobs, events, request) = (self.jobs, self.events, control)
        DispatchQueue.global().async {
            let outcome = Self.streamMigration(name, request) { jobs.progress(job.id, $0) }
            switch outcome {
            case .success(let (result, message)):
                events.expectStop(name, reason: "migrated")
                jobs.finish(job.id, state: "succeeded", message: message ?? "migrated \(name) to \(result.destination)", migration: result)
            case .failure(let error):
                jobs.finish(job.id, state: "failed", error: error.message)
            }
            events.observe(name)
        }
        return job
    }

    /// The key a request's `key_file` names (checked as `hvctl --key` checks it), or nil for an
    /// explicit `insecure_plaintext`; neither, or both, is a bad request.
    static func migrationKey(file: String?, insecurePlaintext: Bool?) async throws(APIError) -> MigrationKey? {
        switch (file, insecurePlaintext ?? false) {
        case (let path?, false):
            guard path.hasPrefix("/") else { throw .badRequest("key_file must be an absolute path on hvd's host, not '\(path)'") }
            switch await blocking({ Result { () throws(UsageError) -> MigrationKey in try MigrationKey.load(path, flag: "key_file") } }) {
            case .success(let key): return key
            case .failure(let error): throw .badRequest(error.message)
            }
        case (nil, true):
            return nil
        case (nil, false):
            throw .badRequest("key_file is required: the key both hosts hold (\(MigrationKey.howToMakeOne)), or insecure_plaintext: true on a network nobody else can reach")
        case (_?, true):
            throw .badRequest("key_file and insecure_plaintext: true exclude each other")
        }
    }

    /// Waits for a VM that another host migrates here, as `name`: starts `hvctl run --incoming
    /// --detach` (the VM's core, on its own once it runs, as every VM hvd starts) and returns a
    /// job once it listens. The job succeeds when the VM runs here and hvd keeps its definition
    /// (as the source described it, under this name); it fails with the core's own reason (a
    /// refusal, a source that went away), or is cancelled while nothing has arrived yet.
    func receive(_ name: String, _ request: IncomingRequest, _ scope: Scope) async throws(APIError) -> Job {
        // It runs what another host sends, with the disks that host names: the admin's decision.
        guard case .admin = scope else { throw .forbidden("tenants cannot receive migrated VMs; ask the host's admin") }
        do { try RunDirectory.validate(name, flag: "name") } catch { throw .badRequest(error.message) }
        do { _ = try MigrationAddress.parse(request.address, flag: "address") } catch { throw .badRequest(error.message) }
        let key = try await Self.migrationKey(file: request.keyFile, insecurePlaintext: request.insecurePlaintext)
        guard store.get(name) == nil else {
            throw .conflict("a VM named '\(name)' exists already; give the VM that arrives another name")
        }
        try claim(name)
        defer { release(name) }
        if case .live = await blocking({ vmPresence(name) }) { throw .conflict("a VM named '\(name)' runs here already (not kept by hvd)") }
        let arguments = ["run", "--incoming", request.address, "--name", name, "--detach"]
            + (key == nil ? ["--insecure-plaintext"] : ["--key", request.keyFile ?? ""])
        let hvctl = self.hvctl
        let (status, said) = await blocking { runTool(hvctl, arguments, stdoutToo: true) }
        // hvctl's usage errors are the request's; anything else (the address in use) the host's.
        guard case .exited(0) = status else { throw status == .exited(2) ? .badRequest(said) : .unprocessable(said) }
        // "waiting for a VM on ADDRESS in the background (pid N); …": the core that waits.
        guard let open = said.range(of: "(pid "), let close = said[open.upperBound...].firstIndex(of: ")"),
              let pid = pid_t(said[open.upperBound..<close]) else {
            throw .unprocessable("hvctl did not say which process waits: \(said)")
        }
        let job = try jobs.begin("incoming", vm: name)
        let (jobs, events, store) = (self.jobs, self.events, self.store)
        let autostart = request.autostart ?? false
        DispatchQueue.global().async {
            Self.watchIncoming(name, pid: pid, job: job.id, autostart: autostart, jobs: jobs, events: events, store: store)
        }
        return job
    }

    /// Follows the waiting core `pid` until the VM runs (then keeps its definition) or the core
    /// ends without it; a cancel ends the core only while no source has begun to send.
    private static func watchIncoming(_ name: String, pid: pid_t, job: String, autostart: Bool,
                                      jobs: JobTable, events: EventMonitor, store: DefinitionStore) {
        var killed = false
        while true {
            let presence = vmPresence(name)
            if case .live = presence {
                // The name is taken at the source's HELLO; the control socket answers once the VM is built.
                if let reply = controlRequest(name, ControlRequest(.definition), timeoutSeconds: 5), reply.ok, let definition = reply.definition,
                   let status = controlRequest(name, ControlRequest(.status), timeoutSeconds: 5)?.status, status.state != "starting" {
                    let vm = StoredVM(definition: definition, autostart: autostart, owner: nil)
                    guard (try? store.add(vm)) == true else {
                        jobs.finish(job, state: "failed", error: "\(name) arrived and runs, but a VM of that name was created meanwhile: it runs here unkept")
                        return
                    }
                    events.publish(.init(type: "vm-created", vm: name))
                    events.observe(name)
                    jobs.finish(job, state: "succeeded", message: "\(name) arrived and runs here")
                    return
                }
            } else if Glibc.kill(pid, 0) != 0 && errno == ESRCH {
                jobs.finish(job, state: "failed", error: lastLine(of: RunDirectory.coreLog(name)) ?? "the waiting hvctl (pid \(pid)) ended")
                return
            } else if jobs.cancelRequested(job) && !killed, case .gone = vmPresence(name) {
                // Nothing has arrived (the name, taken at the source's HELLO, is free): ending
                // the core loses nothing. (Should a source begin right now, its migration fails
                // before GO and the VM runs on at the source.)
                Glibc.kill(pid, SIGTERM)
                killed = true
            }
            usleep(50_000)
        }
    }

    /// The last line of the file at `path` without hvctl's "hvctl: " prefix, if it has one.
    private static func lastLine(of path: String) -> String? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8),
              var line = text.split(separator: "\n").last.map(String.init) else { return nil }
        if line.hasPrefix("hvctl: ") { line.removeFirst(7) }
        return line
    }

    /// Cancels job `id`: a migration stops and the VM carries on here, a wait ends, a conversion
    /// stops and removes its destination; a snapshot or a commit cannot be.
    func cancel(_ id: String, _ scope: Scope) async throws(APIError) -> Job {
        guard let job = jobs.get(id), store.get(job.vm).map(scope.sees) ?? (scope.owner == nil) else {
            throw .notFound("no job '\(id)' (see GET /v1/jobs)")
        }
        guard job.state == "running" else { throw .conflict("job \(id) has \(job.state) already") }
        if job.type == "incoming" {
            // The watcher ends the waiting core, unless a source is already sending (then the
            // migration ends as the source decides: cancel it there).
            guard case .gone = await blocking({ vmPresence(job.vm) }) else {
                throw .conflict("a VM is arriving as '\(job.vm)' already; cancel the migration at its source")
            }
            jobs.requestCancel(id)
            return jobs.get(id) ?? job
        }
        if job.type == "convert" {
            // The conversion stops at its next step and removes what it wrote.
            jobs.requestCancel(id)
            return jobs.get(id) ?? job
        }
        guard job.type == "migrate" else {
            throw .conflict(job.type == "commit" ? "a commit cannot be cancelled: it is writing the backing image"
                                                 : "a snapshot cannot be cancelled: it ends when its copy is made")
        }
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

    /// Sends `migrate` and reads the VM's replies until the last one: its figures and its one-line report.
    private static func streamMigration(_ name: String, _ request: ControlRequest,
                                        progress: (MigrationProgressReport) -> Void) -> Result<(MigrationResultReport, String?), APIError> {
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
            if let result = reply.migration { return .success((result, reply.message)) }
            if let report = reply.progress { progress(report) }
        }
    }
}

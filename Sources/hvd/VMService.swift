import Dispatch
import Foundation
import HVHost
import HVSys
import Synchronization

/// What hvd does to VMs. Each VM is its own core process, started by `hvctl run --config
/// DEFINITION --detach` and driven over its control socket afterwards, so it keeps running when
/// hvd stops or crashes and hvd finds it again through the run directory when it comes back
/// (there is nothing to re-attach but the socket).
///
/// The control socket and the child processes are blocking calls: they run on a dispatch queue,
/// never on Swift concurrency's few threads.
final class VMService: Sendable {
    let store: DefinitionStore
    let events: EventMonitor
    let jobs: JobTable
    /// The `hvctl` that starts VMs (beside hvd's own binary unless `--hvctl` says otherwise).
    let hvctl: String
    let stateDirectory: String
    /// VMs being started or deleted. The two exclude each other (a definition deleted under a
    /// starting VM would leave it running unkept); a second request is refused, not queued.
    private let busy = Mutex<Set<String>>([])

    /// Marks `name` busy for the caller's start, delete or incoming migration.
    func claim(_ name: String) throws(APIError) {
        guard busy.withLock({ $0.insert(name).inserted }) else {
            throw .conflict("VM '\(name)' is being started or deleted by another request; try again when it is done")
        }
    }

    func release(_ name: String) { _ = busy.withLock { $0.remove(name) } }

    /// How long a VM may take to stop before the request reports it still running.
    static let stopTimeoutSeconds: Double = 30

    init(store: DefinitionStore, events: EventMonitor, hvctl: String, stateDirectory: String) {
        self.store = store
        self.events = events
        jobs = JobTable(events: events)
        self.hvctl = hvctl
        self.stateDirectory = stateDirectory
    }

    // MARK: Reading

    func list(_ scope: Scope) async -> [VMInfo] {
        let kept = store.all.filter(scope.sees)
        return await blocking { kept.map { self.info($0) } }
    }

    func inspect(_ name: String, _ scope: Scope) async throws(APIError) -> VMInfo {
        let vm = try kept(name, scope)
        return await blocking { self.info(vm) }
    }

    /// The VM's state as its control socket reports it (stopped when nothing answers).
    func info(_ vm: StoredVM) -> VMInfo {
        let status = liveStatus(vm.name)
        return VMInfo(name: vm.name, state: status?.state ?? "stopped", autostart: vm.autostart, definition: vm.definition, status: status)
    }

    /// The running VM's status, or nil when it is not running.
    func liveStatus(_ name: String) -> VMStatus? { Self.status(of: name) }

    /// The kept VM `name`, if `scope` may see it: another tenant's VM is "no VM" to a tenant.
    private func kept(_ name: String, _ scope: Scope) throws(APIError) -> StoredVM {
        guard let vm = store.get(name), scope.sees(vm) else { throw APIError.noVM(name) }
        return vm
    }

    /// The last `bytes` of the VM's console log (empty when it has none yet).
    func consoleTail(_ name: String, bytes: Int, _ scope: Scope) async throws(APIError) -> [UInt8] {
        _ = try kept(name, scope)
        return await blocking {
            let fd = open(RunDirectory.consoleLog(name), O_RDONLY | O_CLOEXEC | O_NONBLOCK)
            guard fd >= 0 else { return [] }
            defer { close(fd) }
            var st = stat()
            guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { return [] }
            let start = max(0, Int(st.st_size) - bytes)
            var buffer = [UInt8](repeating: 0, count: min(bytes, Int(st.st_size)))
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(start)) }
            return Array(buffer.prefix(max(0, n)))
        }
    }

    // MARK: Keeping definitions

    func create(_ request: CreateVMRequest, _ scope: Scope) async throws(APIError) -> VMInfo {
        do { try RunDirectory.validate(request.name, flag: "name") } catch { throw .badRequest(error.message) }
        var definition = request.definition
        if let inner = definition.name, inner != request.name {
            throw .badRequest("definition.name '\(inner)' differs from name '\(request.name)': give one name, or leave definition.name out")
        }
        definition.name = request.name
        // hvd has no terminal: the serial console goes to RUN_DIR/NAME.log and stays attachable.
        if definition.serial.output == .stdio { definition.serial.output = .console }
        if case .tenant(let tenant) = scope { definition = try tenant.confine(definition) }
        do { try definition.validate(naming: .keys) } catch { throw .badRequest("definition: \(error.message)") }
        for (key, path) in definition.hostPaths {
            guard path.utf8.first == UInt8(ascii: "/") else { throw .badRequest("definition.\(key) '\(path)' is relative: hvd needs absolute paths") }
            guard !path.utf8.contains(0) else { throw .badRequest("definition.\(key) contains a NUL byte") }
        }
        let vm = StoredVM(definition: definition, autostart: request.autostart, owner: scope.owner)
        guard try store.add(vm) else { throw .conflict("a VM named '\(request.name)' exists already; pick another name or DELETE /v1/vms/\(request.name)") }
        events.publish(.init(type: "vm-created", vm: vm.name))
        return await blocking { self.info(vm) }
    }

    func update(_ name: String, _ request: UpdateVMRequest, _ scope: Scope) async throws(APIError) -> VMInfo {
        var vm = try kept(name, scope)
        if let autostart = request.autostart { vm.autostart = autostart }
        try store.update(vm)
        let updated = vm
        return await blocking { self.info(updated) }
    }

    func delete(_ name: String, _ scope: Scope) async throws(APIError) {
        _ = try kept(name, scope)
        try claim(name)
        defer { release(name) }
        if case .live = await blocking({ vmPresence(name) }) {
            throw .conflict("VM '\(name)' is running; stop it first (POST /v1/vms/\(name)/stop)")
        }
        // Published while the VM is still kept, so a tenant's event stream still knows it is its own.
        events.publish(.init(type: "vm-deleted", vm: name))
        store.remove(name)
        events.forget(name)
    }

    // MARK: Running

    /// Starts the VM and returns once its guest runs (or with hvctl's own reason why not).
    func start(_ name: String, _ scope: Scope = .admin) async throws(APIError) -> VMInfo {
        let vm = try kept(name, scope)
        try claim(name)
        defer { release(name) }
        let definitionPath = store.definitionPath(name)
        let hvctl = self.hvctl
        let result: Result<Void, APIError> = await blocking {
            if case .live = vmPresence(name) { return .failure(.conflict("VM '\(name)' is already running")) }
            let (status, said) = runTool(hvctl, ["run", "--config", definitionPath, "--detach"])
            switch status {
            case .exited(0): return .success(())
            // hvctl's usage errors mean the definition is wrong; anything else, the host refused.
            case .exited(2): return .failure(.badRequest(said))
            default: return .failure(.unprocessable(said))
            }
        }
        try result.get()
        events.observe(name)
        return await blocking { self.info(vm) }
    }

    /// Asks the VM to stop and waits until its core has ended.
    func stop(_ name: String, _ scope: Scope) async throws(APIError) -> VMInfo {
        let vm = try kept(name, scope)
        try await ask(name, ControlRequest(.stop))
        try await waitUntilGone(name)
        return await blocking { self.info(vm) }
    }

    /// SIGKILL to the VM's core (its devices die with it).
    func kill(_ name: String, _ scope: Scope) async throws(APIError) -> VMInfo {
        let vm = try kept(name, scope)
        let result: Result<Void, APIError> = await blocking {
            guard case .live(let pid) = vmPresence(name) else { return .failure(.conflict("VM '\(name)' is not running")) }
            guard let pid, pid > 1 else { return .failure(.unprocessable("VM '\(name)' runs but its lock file names no pid")) }
            Glibc.kill(pid, SIGKILL)
            return .success(())
        }
        try result.get()
        events.expectStop(name, reason: "killed")
        try await waitUntilGone(name)
        return await blocking { self.info(vm) }
    }

    func pause(_ name: String, _ scope: Scope) async throws(APIError) -> VMInfo {
        let vm = try kept(name, scope)
        try await ask(name, ControlRequest(.pause))
        events.observe(name)
        return await blocking { self.info(vm) }
    }

    func resume(_ name: String, _ scope: Scope) async throws(APIError) -> VMInfo {
        let vm = try kept(name, scope)
        try await ask(name, ControlRequest(.resume))
        events.observe(name)
        return await blocking { self.info(vm) }
    }

    /// A request whose answer is a one-line report: CD-ROM changes, device restarts and upgrades.
    func act(_ name: String, _ given: ControlRequest, _ scope: Scope) async throws(APIError) -> ActionResult {
        _ = try kept(name, scope)
        var request = given
        if case .tenant(let tenant) = scope {
            // A device binary runs as the trusted side starts it: the admin's decision alone.
            guard request.command != .deviceUpgrade else { throw .forbidden("tenants cannot upgrade devices; ask the host's admin") }
            // A VM's CPU, memory and I/O share is the host's to give, not the tenant's to take.
            guard request.command != .setLimits else { throw .forbidden("tenants cannot change their VMs' limits; ask the host's admin") }
            // An ISO is the tenant's file: taken in its directory; the VM's core confines it there.
            request.path = request.path.map { absolutePath($0, against: tenant.files) }
        }
        if let path = request.path {
            guard path.utf8.first == UInt8(ascii: "/") else { throw .badRequest("path '\(path)' is relative: give an absolute path") }
            guard !path.utf8.contains(0) else { throw .badRequest("path contains a NUL byte") }
        }
        if let device = request.device, let status = liveStatus(name), !status.devices.contains(where: { $0.name == device }) {
            throw .notFound("VM '\(name)' has no device '\(device)' (its devices: \(status.devices.map(\.name).joined(separator: ", ")))")
        }
        let reply = try await ask(name, request)
        events.observe(name)
        return ActionResult(message: reply.message ?? "done")
    }

    /// Sends `request` to running VM `name`; a refusal is 422 with the VM's own reason.
    @discardableResult
    private func ask(_ name: String, _ request: ControlRequest) async throws(APIError) -> ControlReply {
        if request.command == .stop { events.expectStop(name, reason: "requested") }
        let result: Result<ControlReply, APIError> = await blocking {
            guard case .live(let pid) = vmPresence(name) else { return .failure(.conflict("VM '\(name)' is not running")) }
            // A device restart or upgrade waits for the new process to take over (or roll back).
            let seconds = request.command == .deviceRestart || request.command == .deviceUpgrade ? 40 : 10
            guard let reply = controlRequest(name, request, timeoutSeconds: seconds) else {
                return .failure(.unprocessable("VM '\(name)'\(pid.map { " (pid \($0))" } ?? "") did not answer on its control socket within \(seconds) s; try again, or POST /v1/vms/\(name)/kill"))
            }
            guard reply.ok else { return .failure(.unprocessable(reply.error ?? "VM '\(name)' refused '\(request.command.rawValue)'")) }
            return .success(reply)
        }
        return try result.get()
    }

    private func waitUntilGone(_ name: String) async throws(APIError) {
        let gone = await blocking {
            let deadline = monotonicNanoseconds() + UInt64(Self.stopTimeoutSeconds * 1e9)
            while monotonicNanoseconds() < deadline {
                if case .gone = vmPresence(name) { return true }
                usleep(10_000)
            }
            return false
        }
        events.observe(name)
        guard gone else { throw .conflict("VM '\(name)' has not stopped within \(Int(Self.stopTimeoutSeconds)) s; POST /v1/vms/\(name)/kill ends it") }
    }

    // MARK: hvd starting

    /// Starts every autostart VM that is not running; reports each one that does not start.
    func autostart() async {
        for vm in store.all where vm.autostart {
            if case .live = await blocking({ vmPresence(vm.name) }) { continue }
            do throws(APIError) {
                _ = try await start(vm.name)
                log("started VM \(vm.name) (autostart)")
            } catch {
                log("could not start VM \(vm.name) (autostart): \(error.message)")
                events.publish(.init(type: "vm-start-failed", vm: vm.name, message: error.message))
            }
        }
    }
}

/// Runs `path` with `arguments` and this process's environment; returns how it ended and its
/// last stderr line (with `stdoutToo`, its last line on stdout or stderr) without hvctl's
/// "hvctl: " prefix.
func runTool(_ path: String, _ arguments: [String], stdoutToo: Bool = false) -> (ChildProcess.Termination, String) {
    let run = runTool(path, arguments, stdout: stdoutToo ? .merged : .discarded)
    return (run.termination, run.said)
}

/// How `runTool` treats the child's standard output.
enum ToolOutput { case discarded, merged, captured }

/// A child run to its end: how it ended, its last line (see `runTool(_:_:stdoutToo:)`), and its
/// whole standard output when that was `captured` (at most 1 MiB).
struct ToolRun {
    var termination: ChildProcess.Termination
    var said: String
    var printed: [UInt8]
}

func runTool(_ path: String, _ arguments: [String], stdout: ToolOutput) -> ToolRun {
    var errPipe: [Int32] = [-1, -1], outPipe: [Int32] = [-1, -1]
    guard pipe(&errPipe) == 0 else { return ToolRun(termination: .exited(1), said: "cannot create a pipe: \(Errno.current)", printed: []) }
    if case .captured = stdout, pipe(&outPipe) != 0 {
        let why = "cannot create a pipe: \(Errno.current)"
        close(errPipe[0])
        close(errPipe[1])
        return ToolRun(termination: .exited(1), said: why, printed: [])
    }
    // Other children hvd starts at the same time must not inherit them (their end would hold them open).
    for fd in errPipe + outPipe where fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
    defer { close(devNull) }
    let environment = ProcessInfo.processInfo.environment.map { "\($0.key)=\($0.value)" }
    let stdoutFD: Int32 = switch stdout {
    case .discarded: devNull
    case .merged: errPipe[1]
    case .captured: outPipe[1]
    }
    let child: ChildProcess
    do {
        child = try ChildProcess.spawn(path: path, arguments: arguments, environment: environment,
                                       inherit: [(0, devNull), (1, stdoutFD), (2, errPipe[1])])
    } catch {
        for fd in errPipe + outPipe where fd >= 0 { close(fd) }
        return ToolRun(termination: .exited(1), said: "cannot run \(path): \(error)", printed: [])
    }
    close(errPipe[1])
    if outPipe[1] >= 0 { close(outPipe[1]) }
    // Both pipes are read as they fill: a child blocked writing one while this reads the
    // other would never end.
    var said: [UInt8] = [], printed: [UInt8] = []
    var open = [errPipe[0], outPipe[0]].filter { $0 >= 0 }
    var buffer = [UInt8](repeating: 0, count: 4096)
    while !open.isEmpty {
        var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        guard poll(&fds, nfds_t(fds.count), -1) >= 0 || errno == EINTR else { break }
        for entry in fds where entry.revents != 0 {
            let n = buffer.withUnsafeMutableBytes { read(entry.fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                close(entry.fd)
                open.removeAll { $0 == entry.fd }
                continue
            }
            if entry.fd == outPipe[0] {
                if printed.count < 1 << 20 { printed += buffer.prefix(n) }
            } else if said.count < 1 << 16 {
                said += buffer.prefix(n)
            }
        }
    }
    for fd in open { close(fd) }
    var status: Int32 = 0
    _ = retryOnInterrupt { waitpid(child.pid, &status, 0) }
    let termination: ChildProcess.Termination = status & 0x7F == 0 ? .exited((status >> 8) & 0xFF) : .signalled(status & 0x7F)
    let lines = String(decoding: said, as: UTF8.self).split(separator: "\n")
    var last = lines.last.map(String.init) ?? termination.description
    if last.hasPrefix("hvctl: ") { last.removeFirst(7) }
    return ToolRun(termination: termination, said: last, printed: printed)
}

/// hvd's own messages go to stderr, one line each (journald adds the time).
func log(_ line: String) {
    FileHandle.standardError.write(Data(("hvd: " + line + "\n").utf8))
}

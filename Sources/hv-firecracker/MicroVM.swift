import Dispatch
import Foundation
import HVFirecrackerModel
import HVHost
import HVSys
import Synchronization

/// The one microVM an `hv-firecracker` process serves, as Firecracker's API sees it: configured
/// piece by piece before `InstanceStart`, then running (or paused) until the guest ends, when the
/// process ends too.
///
/// The VM itself is hv's: `InstanceStart` turns the configuration into a `VMDefinition` and runs
/// `hvctl run --config` as a child whose serial console is this process's stdin and stdout (as
/// Firecracker's is), and which gets SIGTERM if this process dies, however it dies. Pause, resume
/// and status go over the VM's control socket. So the HTTP stack never shares a process with the
/// VM's core.
final class MicroVM: Sendable {
    /// What `GET /` reports (`--id`, or Firecracker's "anonymous-instance").
    let id: String
    /// The hv VM's name: `--id`, or one unique to this process when no id was given.
    let name: String
    let hvctl: String
    /// The API socket, removed when the VM ends (nil under `--no-api`).
    let apiSocket: String?
    let log: LogSink

    struct Configuration: Sendable {
        var machine = MachineConfiguration(vcpuCount: 1, memSizeMib: 128)
        var boot: BootSource?
        var drives: [Drive] = []
        var nics: [NetworkInterface] = []
        var logger: LoggerConfig?
        var metrics: MetricsConfig?
        var balloon: BalloonConfig?
    }

    private enum Phase: Sendable, Equatable { case notStarted, starting, started }

    private let configuration = Mutex(Configuration())
    private let phase = Mutex(Phase.notStarted)
    /// The definition file handed to hvctl, removed once the guest runs (or failed to).
    private let definitionPath: String
    /// hvctl's last stderr line: the reason when a start fails.
    private let lastError = Mutex("")
    /// The VM's core (hvctl), once launched.
    private let core = Mutex<ChildProcess?>(nil)

    init(id: String, name: String, hvctl: String, apiSocket: String?, log: LogSink) {
        self.id = id
        self.name = name
        self.hvctl = hvctl
        self.apiSocket = apiSocket
        self.log = log
        definitionPath = RunDirectory.path + "/" + name + ".firecracker.json"
    }

    // MARK: Reading

    var current: Configuration { configuration.withLock { $0 } }

    /// "Not started", "Running" or "Paused".
    func state() -> String {
        guard phase.withLock({ $0 }) == .started else { return "Not started" }
        return status()?.state == "paused" ? "Paused" : "Running"
    }

    func status() -> VMStatus? { controlRequest(name, ControlRequest(.status), timeoutSeconds: 2)?.status }

    // MARK: Configuring (before InstanceStart)

    private func beforeBoot<T>(_ body: (inout Configuration) throws(Fault) -> T) throws(Fault) -> T {
        guard phase.withLock({ $0 }) == .notStarted else { throw Fault("The requested operation is not supported after starting the microVM.") }
        var copy = current
        let result = try body(&copy)
        configuration.withLock { $0 = copy }
        return result
    }

    func putMachineConfiguration(_ m: MachineConfiguration, partial: Bool) throws(Fault) {
        try beforeBoot { (c: inout Configuration) throws(Fault) in
            if !partial {
                guard m.vcpuCount != nil else { throw Fault("machine-config: vcpu_count is missing") }
                guard m.memSizeMib != nil else { throw Fault("machine-config: mem_size_mib is missing") }
            }
            var merged = partial ? c.machine : MachineConfiguration()
            merged.vcpuCount = m.vcpuCount ?? merged.vcpuCount
            merged.memSizeMib = m.memSizeMib ?? merged.memSizeMib
            merged.smt = m.smt ?? merged.smt
            merged.trackDirtyPages = m.trackDirtyPages ?? merged.trackDirtyPages
            merged.cpuTemplate = m.cpuTemplate ?? merged.cpuTemplate
            merged.hugePages = m.hugePages ?? merged.hugePages
            if let n = merged.vcpuCount, !(1...32).contains(n) { throw Fault("machine-config: vcpu_count \(n) is out of range: 1 to 32") }
            if let mib = merged.memSizeMib, mib < 4 { throw Fault("machine-config: mem_size_mib \(mib) is too small: hv needs at least 4") }
            if merged.smt == true { throw Fault("machine-config: hv does not present SMT siblings; leave smt false") }
            if let t = merged.cpuTemplate, t != "None" { throw Fault("machine-config: hv has no CPU template '\(t)'; leave cpu_template out") }
            if let h = merged.hugePages, h != "None" { throw Fault("machine-config: hv does not back guest memory with huge pages ('\(h)'); leave huge_pages out") }
            c.machine = merged
        }
    }

    func putBootSource(_ b: BootSource) throws(Fault) {
        var boot = b
        boot.kernelImagePath = absolute(b.kernelImagePath)
        boot.initrdPath = b.initrdPath.map(absolute)
        _ = try KernelKind.of(boot.kernelImagePath)
        if let initrd = boot.initrdPath { try checkReadable(initrd, what: "initrd_path") }
        try beforeBoot { (c: inout Configuration) throws(Fault) in c.boot = boot }
    }

    func putDrive(_ d: Drive, pathID: String) throws(Fault) {
        guard d.driveId == pathID else { throw Fault("The id from the path [\(pathID)] does not match the id from the body [\(d.driveId)]") }
        guard d.socket == nil else { throw Fault("drive \(d.driveId): hv has no vhost-user-block backend; give path_on_host instead of socket") }
        guard let path = d.pathOnHost else { throw Fault("drive \(d.driveId): path_on_host is missing") }
        _ = try d.rateLimiter?.hvLimit("drive \(d.driveId): rate_limiter")
        if let cache = d.cacheType, !["Unsafe", "Writeback"].contains(cache) { throw Fault("drive \(d.driveId): cache_type must be Unsafe or Writeback, not \(cache)") }
        if let engine = d.ioEngine, !["Sync", "Async"].contains(engine) { throw Fault("drive \(d.driveId): io_engine must be Sync or Async, not \(engine)") }
        var drive = d
        drive.pathOnHost = absolute(path)
        try checkReadable(drive.pathOnHost ?? path, what: "drive \(d.driveId): path_on_host", writable: d.isReadOnly != true)
        try beforeBoot { (c: inout Configuration) throws(Fault) in
            if drive.isRootDevice, let root = c.drives.first(where: { $0.isRootDevice && $0.driveId != drive.driveId }) {
                throw Fault("drive \(drive.driveId): drive \(root.driveId) is the root device already; only one drive can be")
            }
            if let i = c.drives.firstIndex(where: { $0.driveId == drive.driveId }) { c.drives[i] = drive } else { c.drives.append(drive) }
        }
    }

    func patchDrive(_ d: PartialDrive, pathID: String) throws(Fault) {
        guard d.driveId == pathID else { throw Fault("The id from the path [\(pathID)] does not match the id from the body [\(d.driveId)]") }
        guard phase.withLock({ $0 }) == .started else { throw Fault("The requested operation is not supported before starting the microVM.") }
        guard let drive = current.drives.first(where: { $0.driveId == d.driveId }) else { throw Fault("drive \(d.driveId) does not exist") }
        if let path = d.pathOnHost, absolute(path) != drive.pathOnHost {
            throw Fault("drive \(d.driveId): hv cannot change a running drive's backing file yet (it has \(drive.pathOnHost ?? "none"))")
        }
        if let limiter = d.rateLimiter {
            // The running drive's limit, as Firecracker's PATCH: the device restarts with it.
            let device = "disk\(bootOrderedDrives(current).firstIndex { $0.driveId == d.driveId } ?? 0)"
            var request = ControlRequest(.setLimits)
            request.rates = [.init(device: device, limit: try limiter.hvLimit("drive \(d.driveId): rate_limiter"))]
            try applyRunning(request, what: "drive \(d.driveId)")
            updateCurrent { c in
                if let i = c.drives.firstIndex(where: { $0.driveId == d.driveId }) { c.drives[i].rateLimiter = limiter }
            }
        }
    }

    func putNetworkInterface(_ n: NetworkInterface, pathID: String) throws(Fault) {
        guard n.ifaceId == pathID else { throw Fault("The id from the path [\(pathID)] does not match the id from the body [\(n.ifaceId)]") }
        _ = try n.rxRateLimiter?.hvLimit("network interface \(n.ifaceId): rx_rate_limiter")
        _ = try n.txRateLimiter?.hvLimit("network interface \(n.ifaceId): tx_rate_limiter")
        if n.mtu != nil { throw Fault("network interface \(n.ifaceId): hv's NIC does not advertise an MTU; leave mtu out") }
        // The same checks hv makes of a NIC in a VM definition (tap name, MAC).
        var probe = VMDefinition()
        probe.nics = [VMDefinition.NIC(tap: n.hostDevName, mac: n.guestMac)]
        do { try probe.validate(naming: .keys) } catch { throw Fault("network interface \(n.ifaceId): \(error.message)") }
        try beforeBoot { (c: inout Configuration) throws(Fault) in
            if let other = c.nics.first(where: { $0.hostDevName == n.hostDevName && $0.ifaceId != n.ifaceId }) {
                throw Fault("network interface \(n.ifaceId): \(other.ifaceId) uses \(n.hostDevName) already")
            }
            if let i = c.nics.firstIndex(where: { $0.ifaceId == n.ifaceId }) { c.nics[i] = n } else { c.nics.append(n) }
        }
    }

    func patchNetworkInterface(_ n: PartialNetworkInterface, pathID: String) throws(Fault) {
        guard n.ifaceId == pathID else { throw Fault("The id from the path [\(pathID)] does not match the id from the body [\(n.ifaceId)]") }
        guard phase.withLock({ $0 }) == .started else { throw Fault("The requested operation is not supported before starting the microVM.") }
        guard let index = current.nics.firstIndex(where: { $0.ifaceId == n.ifaceId }) else { throw Fault("network interface \(n.ifaceId) does not exist") }
        guard n.rxRateLimiter != nil || n.txRateLimiter != nil else { return }
        // Firecracker's PATCH replaces the limiters given and keeps the others.
        let nic = current.nics[index]
        let rx = n.rxRateLimiter ?? nic.rxRateLimiter, tx = n.txRateLimiter ?? nic.txRateLimiter
        var request = ControlRequest(.setLimits)
        request.rates = [.init(device: "net\(index)", rx: try rx?.hvLimit("network interface \(n.ifaceId): rx_rate_limiter"),
                               tx: try tx?.hvLimit("network interface \(n.ifaceId): tx_rate_limiter"))]
        try applyRunning(request, what: "network interface \(n.ifaceId)")
        updateCurrent { c in
            c.nics[index].rxRateLimiter = rx
            c.nics[index].txRateLimiter = tx
        }
    }

    func putLogger(_ l: LoggerConfig) throws(Fault) {
        if let level = l.level, !["error", "warning", "warn", "info", "debug", "trace", "off"].contains(level.lowercased()) {
            throw Fault("logger: level must be Error, Warning, Info, Debug, Trace or Off, not \(level)")
        }
        try log.configure(l)
        configuration.withLock { $0.logger = l }
    }

    func putMetrics(_ m: MetricsConfig) throws(Fault) {
        guard current.metrics == nil else { throw Fault("Reinitialization of metrics not allowed.") }
        try log.openMetrics(absolute(m.metricsPath))
        configuration.withLock { $0.metrics = m }
    }

    /// Applies a whole `--config-file`, in Firecracker's order.
    func apply(_ full: FullVMConfiguration) throws(Fault) {
        if let l = full.logger { try putLogger(l) }
        if let m = full.metrics { try putMetrics(m) }
        if let m = full.machineConfig { try putMachineConfiguration(m, partial: false) }
        if let b = full.bootSource { try putBootSource(b) }
        for d in full.drives ?? [] { try putDrive(d, pathID: d.driveId) }
        for n in full.networkInterfaces ?? [] { try putNetworkInterface(n, pathID: n.ifaceId) }
        if let b = full.balloon { try putBalloon(b) }
    }

    // MARK: The balloon

    /// `PUT /balloon`, before the microVM starts.
    func putBalloon(_ b: BalloonConfig) throws(Fault) {
        _ = try b.hvBalloon()
        try beforeBoot { c throws(Fault) in c.balloon = b }
    }

    /// `PATCH /balloon`: the running balloon's new size.
    func patchBalloon(amountMiB: Int) throws(Fault) {
        guard phase.withLock({ $0 }) == .started else { throw Fault("The requested operation is not supported before starting the microVM.") }
        guard current.balloon != nil else { throw Fault("No balloon device configured: PUT /balloon before InstanceStart.") }
        guard amountMiB >= 0 else { throw Fault("balloon: amount_mib must not be negative") }
        var request = ControlRequest(.balloon)
        request.sizeMiB = UInt64(amountMiB)
        try applyRunning(request, what: "balloon")
        updateCurrent { $0.balloon?.amountMib = amountMiB }
    }

    /// `PATCH /balloon/statistics`: how often the guest is asked for statistics.
    func patchBalloonStatistics(intervalSeconds: Int) throws(Fault) {
        guard phase.withLock({ $0 }) == .started else { throw Fault("The requested operation is not supported before starting the microVM.") }
        guard current.balloon != nil else { throw Fault("No balloon device configured: PUT /balloon before InstanceStart.") }
        do { try VMDefinition.Balloon(statsIntervalSeconds: intervalSeconds).validate { _ in "balloon: stats_polling_interval_s" } } catch {
            throw Fault(error.message)
        }
        var request = ControlRequest(.balloon)
        request.statsIntervalSeconds = intervalSeconds
        try applyRunning(request, what: "balloon statistics")
        updateCurrent { $0.balloon?.statsPollingIntervalS = intervalSeconds }
    }

    /// `GET /balloon/statistics`: Firecracker's fields (target and actual size, and the guest's
    /// figures it has sent; absent ones are left out).
    func balloonStatistics() throws(Fault) -> [String: UInt64] {
        guard let configured = current.balloon else { throw Fault("No balloon device configured: PUT /balloon before InstanceStart.") }
        guard (configured.statsPollingIntervalS ?? 0) > 0 else { throw Fault("Statistics are not enabled: set stats_polling_interval_s.") }
        guard phase.withLock({ $0 }) == .started, let b = status()?.balloon else { throw Fault("The microVM is not running.") }
        var figures = b.stats ?? [:]
        figures["target_pages"] = UInt64(b.targetPages)
        figures["actual_pages"] = UInt64(b.actualPages)
        figures["target_mib"] = b.targetMiB
        figures["actual_mib"] = b.actualMiB
        return figures
    }

    // MARK: Running

    /// `InstanceStart`: returns once the guest runs.
    func start() throws(Fault) {
        try claimStart()
        do throws(Fault) {
            let c = current
            guard let boot = c.boot else { throw Fault("Cannot start microvm without kernel configuration.") }
            let definition = try hvDefinition(c, boot: boot)
            do {
                let fd = try FileDescriptor.open(definitionPath, flags: O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode: 0o600)
                defer { fd.close() }
                try fd.writeAll(Array(definition.encoded().utf8))
            } catch {
                throw Fault("cannot write \(definitionPath): \(error)")
            }
            defer { unlink(definitionPath) }  // read by hvctl at its start; not needed once the guest runs
            try launch(["run", "--config", definitionPath, "--exit-with-parent", String(getpid())])
        } catch {
            phase.withLock { $0 = .notStarted }
            throw error
        }
        log.info("Running the microVM as hv VM '\(name)'")
    }

    private func claimStart() throws(Fault) {
        let claimed = phase.withLock { p -> Bool in
            guard p == .notStarted else { return false }
            p = .starting
            return true
        }
        guard claimed else { throw Fault("The requested operation is not supported after starting the microVM.") }
    }

    /// The hv VM Firecracker's configuration describes.
    func hvDefinition(_ c: Configuration, boot: BootSource) throws(Fault) -> VMDefinition {
        var d = VMDefinition()
        d.name = name
        d.cpus = c.machine.vcpuCount ?? 1
        d.memoryMiB = UInt64(c.machine.memSizeMib ?? 128)
        // Firecracker ends when the guest reboots; so does this VM.
        d.onReset = .stop
        var cmdline = (boot.bootArgs ?? Self.defaultBootArgs).split(separator: " ").filter { token in
            // hv's disks and NICs are PCI functions: Firecracker's usual pci=off would hide them.
            if token == "pci=off" { log.info("dropped 'pci=off' from boot_args: hv's drives and NICs are PCI devices"); return false }
            return true
        }.joined(separator: " ")
        switch try KernelKind.of(boot.kernelImagePath) {
        case .bzImage:
            d.boot.kernel = boot.kernelImagePath
            d.boot.initrd = boot.initrdPath
        case .multiboot:
            guard boot.initrdPath == nil else { throw Fault("boot-source: initrd_path goes with a bzImage kernel; \(boot.kernelImagePath) is a multiboot kernel") }
            d.boot.multiboot = boot.kernelImagePath
        }
        // The root drive goes first, so it is the guest's first disk (sda: hv's disks are
        // virtio-scsi, where Firecracker's are virtio-blk vda), and the command line says so.
        let drives = bootOrderedDrives(c)
        if let root = drives.first, root.isRootDevice, !cmdline.split(separator: " ").contains(where: { $0.hasPrefix("root=") }) {
            let device = root.partuuid.map { "PARTUUID=\($0)" } ?? "/dev/sda"
            cmdline += (cmdline.isEmpty ? "" : " ") + "root=\(device) \(root.isReadOnly == true ? "ro" : "rw")"
        }
        d.boot.cmdline = cmdline
        d.disks = try drives.map { drive throws(Fault) in
            VMDefinition.Disk(path: drive.pathOnHost ?? "", readonly: drive.isReadOnly == true,
                              rateLimit: try drive.rateLimiter?.hvLimit("drive \(drive.driveId): rate_limiter"))
        }
        d.nics = try c.nics.map { nic throws(Fault) in
            VMDefinition.NIC(tap: nic.hostDevName, mac: nic.guestMac,
                             rxRateLimit: try nic.rxRateLimiter?.hvLimit("network interface \(nic.ifaceId): rx_rate_limiter"),
                             txRateLimit: try nic.txRateLimiter?.hvLimit("network interface \(nic.ifaceId): tx_rate_limiter"))
        }
        d.balloon = try c.balloon?.hvBalloon()
        d.serial.output = .stdio
        do { try d.validate(naming: .keys) } catch { throw Fault("the microVM's configuration: \(error.message)") }
        return d
    }

    /// Firecracker's default command line, less what would hide hv's devices (pci=off) or
    /// silence its console (8250.nr_uarts=0).
    static let defaultBootArgs = "reboot=k panic=1 nomodule i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce"

    // MARK: Snapshots

    /// `PUT /snapshot/create`: hv's snapshot of the paused VM in the directory `snapshot_path`
    /// (hv snapshots are directories: state, device states and sparse memory, docs/snapshots.md),
    /// with `mem_file_path` a symbolic link to the memory inside it. The VM stays paused.
    func createSnapshot(_ p: SnapshotCreateParams) throws(Fault) {
        guard phase.withLock({ $0 }) == .started else { throw Fault("The requested operation is not supported before starting the microVM.") }
        guard status()?.state == "paused" else { throw Fault("Cannot create a snapshot: the microVM must be paused (PATCH /vm {\"state\": \"Paused\"}) first") }
        if let type = p.snapshotType, type != "Full" { throw Fault("snapshot_type \(type): hv takes full snapshots only") }
        let directory = absolute(p.snapshotPath)
        let memory = absolute(p.memFilePath)
        var st = stat()
        if lstat(memory, &st) == 0, st.st_mode & S_IFMT != S_IFLNK {
            throw Fault("mem_file_path \(memory) exists and is not a link hv made; remove it or give another path")
        }
        guard let reply = controlRequest(name, ControlRequest(.snapshot, path: directory, stop: true), timeoutSeconds: 600) else {
            throw Fault("the microVM did not answer on its control socket")
        }
        guard reply.ok else { throw Fault(reply.error ?? "the snapshot failed") }
        unlink(memory)
        guard symlink(directory + "/memory", memory) == 0 else { throw Fault("cannot link mem_file_path \(memory) to \(directory)/memory: \(Errno.current)") }
        log.info("Saved the microVM to \(directory) (\(reply.message ?? ""))")
    }

    /// `PUT /snapshot/load`: a fresh hv-firecracker brings back what `createSnapshot` saved.
    func loadSnapshot(_ p: SnapshotLoadParams) throws(Fault) {
        let c = current
        guard c.boot == nil, c.drives.isEmpty, c.nics.isEmpty else {
            throw Fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        }
        if p.hasMemBackend { throw Fault("mem_backend: hv reads memory from the snapshot's own directory; give mem_file_path (or nothing)") }
        if p.hasOverrides { throw Fault("network_overrides, vsock_override and clock_realtime are not supported by hv; leave them out") }
        let directory = absolute(p.snapshotPath)
        if let memFile = p.memFilePath {
            let expected = directory + "/memory"
            guard let a = realpath(absolute(memFile), nil), let b = realpath(expected, nil) else {
                throw Fault("mem_file_path \(memFile): \(Errno.current)")
            }
            defer { free(a); free(b) }
            guard strcmp(a, b) == 0 else { throw Fault("mem_file_path \(memFile) is not \(expected), the memory of the snapshot at \(directory)") }
        }
        try claimStart()
        do throws(Fault) {
            try launch(["run", "--restore", directory, "--name", name, "--serial", "stdio", "--exit-with-parent", String(getpid())]
                       + (p.resumeVM == true ? [] : ["--paused"]))
        } catch {
            phase.withLock { $0 = .notStarted }
            throw error
        }
        log.info("Restored the microVM from \(directory)\(p.resumeVM == true ? "" : "; it stays paused")")
    }

    /// Runs hvctl with `arguments` on a thread of its own that lives as long as the VM (the parent
    /// death signal follows the thread that started the child), and returns once the guest runs.
    private func launch(_ arguments: [String]) throws(Fault) {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw Fault("cannot create a pipe: \(Errno.current)") }
        // Nothing else started meanwhile may inherit it (its end would hold the pipe open).
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        let started = DispatchSemaphore(value: 0)
        let child = Mutex<Result<ChildProcess, SystemError>?>(nil)
        let hvctl = self.hvctl
        do {
            _ = try HostThread.spawn(name: "hv-fc-vm") { [self] in
                let spawned = Result { () throws(SystemError) in
                    try ChildProcess.spawn(path: hvctl, arguments: arguments, environment: ProcessInfo.processInfo.environment.map { "\($0.key)=\($0.value)" },
                                           inherit: [(0, 0), (1, 1), (2, writeEnd)])
                }
                close(writeEnd)
                child.withLock { $0 = spawned }
                if case .success(let process) = spawned { core.withLock { $0 = process } }
                started.signal()
                guard case .success(let process) = spawned else { return }
                // A terminal's keystrokes and Ctrl-C go to the VM, as they would to Firecracker.
                if isatty(0) == 1, tcgetpgrp(0) == getpgrp() { _ = tcsetpgrp(0, process.pid) }
                var status: Int32 = 0
                _ = retryOnInterrupt { waitpid(process.pid, &status, 0) }
                self.ended(status & 0x7F == 0 ? .exited((status >> 8) & 0xFF) : .signalled(status & 0x7F))
            }
        } catch {
            close(readEnd)
            close(writeEnd)
            throw Fault("cannot start a thread: \(error)")
        }
        forwardErrors(from: readEnd)
        started.wait()
        guard case .success(let process) = child.withLock({ $0 }) else {
            if case .failure(let error) = child.withLock({ $0 }) { throw Fault("cannot run \(hvctl): \(error)") }
            throw Fault("cannot run \(hvctl)")
        }
        // Running once the VM's control socket says so; a VM that cannot start ends hvctl first.
        let deadline = DispatchTime.now() + .seconds(60)
        while DispatchTime.now() < deadline {
            if kill(process.pid, 0) != 0 || phase.withLock({ $0 }) == .notStarted { break }
            if let state = status()?.state, state == "running" || state == "paused" {
                phase.withLock { $0 = .started }
                return
            }
            usleep(10_000)
        }
        let reason = lastError.withLock { $0 }
        process.signal(SIGTERM)
        throw Fault(reason.isEmpty ? "the microVM did not start within 60 s" : reason)
    }

    /// hvctl's stderr goes on to ours; its last line is kept as the reason a start failed.
    private func forwardErrors(from fd: Int32) {
        _ = try? HostThread.spawn(name: "hv-fc-stderr") { [self] in
            var buffer = [UInt8](repeating: 0, count: 4096)
            var line: [UInt8] = []
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                _ = buffer.withUnsafeBytes { write(2, $0.baseAddress, n) }
                for b in buffer.prefix(n) {
                    if b == 0x0A {
                        var text = String(decoding: line, as: UTF8.self)
                        if text.hasPrefix("hvctl: ") { text.removeFirst(7) }
                        if !text.isEmpty { lastError.withLock { $0 = text } }
                        line.removeAll()
                    } else if line.count < 4096 {
                        line.append(b)
                    }
                }
            }
            close(fd)
        }
    }

    /// The VM ended: so does this process, with hvctl's status (0 when the guest powered off or
    /// rebooted, as Firecracker exits).
    private func ended(_ termination: ChildProcess.Termination) {
        let wasStarted = phase.withLock { p -> Bool in
            let was = p == .started
            p = .notStarted
            return was
        }
        guard wasStarted else { return }  // a start that failed: InstanceStart reports it
        log.info("The microVM ended: hvctl \(termination)")
        if current.metrics != nil { flushMetrics(final: true) }
        cleanUp()
        switch termination {
        case .exited(let code): exit(code)
        case .signalled(let sig): exit(128 + sig)
        }
    }

    /// This process was asked to stop (SIGTERM, SIGINT): the VM stops in order, and its end
    /// ends the process; without a VM, it returns.
    func stopOnSignal() {
        guard let process = core.withLock({ $0 }), phase.withLock({ $0 }) == .started else { return }
        process.signal(SIGTERM)
        while true { pause() }
    }

    /// Removes what this process made: the API socket.
    func cleanUp() {
        if let apiSocket { StagedSocketPath(apiSocket).remove() }
    }

    // MARK: After InstanceStart

    func pauseOrResume(_ target: VMState.State) throws(Fault) {
        guard phase.withLock({ $0 }) == .started else { throw Fault("The requested operation is not supported before starting the microVM.") }
        let wanted = target == .paused ? "paused" : "running"
        if status()?.state == wanted { return }
        let reply = controlRequest(name, ControlRequest(target == .paused ? .pause : .resume), timeoutSeconds: 10)
        guard let reply else { throw Fault("the microVM did not answer on its control socket") }
        guard reply.ok else { throw Fault(reply.error ?? "the microVM refused") }
        log.info(target == .paused ? "Paused the microVM" : "Resumed the microVM")
    }

    /// Sends a change to the running VM (a PATCH of a drive's or NIC's rate limiters).
    private func applyRunning(_ request: ControlRequest, what: String) throws(Fault) {
        guard let reply = controlRequest(name, request, timeoutSeconds: 10) else { throw Fault("\(what): the microVM did not answer on its control socket") }
        guard reply.ok else { throw Fault("\(what): \(reply.error ?? "the microVM refused")") }
        log.info("\(what): \(reply.message ?? "updated")")
    }

    private func updateCurrent(_ change: (inout Configuration) -> Void) {
        configuration.withLock { change(&$0) }
    }

    /// The drives in the order the VM has them: the root device first (disk0).
    func bootOrderedDrives(_ c: Configuration) -> [Drive] {
        c.drives.filter(\.isRootDevice) + c.drives.filter { !$0.isRootDevice }
    }

    func sendCtrlAltDel() throws(Fault) {
        guard phase.withLock({ $0 }) == .started else { throw Fault("The requested operation is not supported before starting the microVM.") }
        throw Fault("SendCtrlAltDel: hv's i8042 keyboard controller cannot inject keystrokes yet; end the microVM by signalling this process (SIGTERM stops it in order)")
    }

    /// `FlushMetrics`, and the last line written when the VM ends.
    func flushMetrics(final: Bool = false) {
        let s = phase.withLock({ $0 }) == .started ? status() : nil
        let record = MetricsRecord(utcTimestampMs: UInt64(Date().timeIntervalSince1970 * 1000), id: id, state: final ? "Ended" : state(),
                                   uptimeSeconds: s?.uptimeSeconds, vcpus: s?.cpus, memoryMib: s?.memoryMiB,
                                   devices: s?.devices.map { .init(name: $0.name, kind: $0.kind, state: $0.state, restarts: $0.restarts) })
        log.writeMetrics(ControlJSON.encode(record) + [0x0A])
    }

    func requireMetrics() throws(Fault) {
        guard current.metrics != nil else { throw Fault("Cannot flush metrics: the metrics system is not initialized; PUT /metrics first") }
    }

    // MARK: Helpers

    /// A path made absolute against this process's working directory, as Firecracker resolves them.
    func absolute(_ path: String) -> String { absolutePath(path) }

    private func checkReadable(_ path: String, what: String, writable: Bool = false) throws(Fault) {
        do {
            let fd = try FileDescriptor.openHostFile(path, flags: writable ? O_RDWR : O_RDONLY, kinds: [.regular, .blockDevice])
            fd.close()
        } catch {
            throw Fault("\(what) \(path): \(error)")
        }
    }
}

/// What `FlushMetrics` writes: one JSON line of what hv knows of the VM.
struct MetricsRecord: Encodable {
    var utcTimestampMs: UInt64
    var id: String
    var state: String
    var uptimeSeconds: UInt64?
    var vcpus: Int?
    var memoryMib: UInt64?
    var devices: [Device]?

    struct Device: Encodable { var name: String; var kind: String; var state: String; var restarts: UInt32 }

    enum CodingKeys: String, CodingKey {
        case utcTimestampMs = "utc_timestamp_ms", id, state, uptimeSeconds = "uptime_seconds", vcpus, memoryMib = "memory_mib", devices
    }
}

/// How `boot-source`'s kernel boots on hv: a bzImage by the Linux boot protocol, or a multiboot kernel.
enum KernelKind {
    case bzImage, multiboot

    static func of(_ path: String) throws(Fault) -> KernelKind {
        let head: [UInt8]
        do {
            let fd = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: [.regular])
            defer { fd.close() }
            var buffer = [UInt8](repeating: 0, count: 8192)
            let n = try buffer.withUnsafeMutableBytes { raw throws(SystemError) in try fd.read(into: raw, at: 0) }
            head = Array(buffer.prefix(n))
        } catch {
            throw Fault("boot-source: kernel_image_path \(path): \(error)")
        }
        // The boot protocol's header: "HdrS" at 0x202.
        if head.count >= 0x206, head[0x202..<0x206].elementsEqual("HdrS".utf8) { return .bzImage }
        // Multiboot v1: the magic, 4-byte aligned in the first 8 KiB, with its checksum.
        var offset = 0
        while offset + 12 <= head.count {
            func word(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(head[at + $1]) << (8 * $1) } }
            if word(offset) == 0x1BAD_B002, word(offset) &+ word(offset + 4) &+ word(offset + 8) == 0 { return .multiboot }
            offset += 4
        }
        if head.starts(with: [0x7F, 0x45, 0x4C, 0x46]) {
            throw Fault("boot-source: \(path) is an ELF vmlinux; hv boots a bzImage (arch/x86/boot/bzImage) or a multiboot kernel")
        }
        throw Fault("boot-source: \(path) is neither a bzImage nor a multiboot kernel")
    }
}

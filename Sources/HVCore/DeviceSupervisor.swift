import CHVShim
import CSeccomp
import Glibc
import HVIPC
import HVKVM
import HVSys
import Synchronization

/// What the core needs to start one device process.
public struct DeviceSpec: Sendable {
    /// Instance name for messages, e.g. "serial0".
    public var name: String
    /// Absolute path of the device executable (an interpreted plugin's interpreter).
    public var executable: String
    /// Arguments before the script and the instance name (an interpreted plugin's interpreter flags).
    public var arguments: [String] = []
    /// An interpreted plugin's script, as a host path: `executable` (its interpreter) runs it, a
    /// jailed device from hv's copy in `SandboxPlan.pluginDirectory`. `hvctl device upgrade`
    /// replaces this, not the interpreter. Nil for a native binary.
    public var script: String?
    /// Guest address ranges routed to it, in resource-index order.
    public var resources: [Resource]
    /// GSI of each of its interrupt lines (line i → GSI), wired through irqfd.
    public var interruptGSIs: [UInt32]
    /// Host files the trusted side opened for it, by hostIO index (the device's contract
    /// names the indices; a slot may be empty).
    public var hostFiles: [UInt16: FileDescriptor]
    /// Device-specific `key=value` lines.
    public var config: String
    /// What it is allowed to do.
    public var capabilities: Capabilities
    /// Whether it maps guest RAM.
    public var mapsGuestMemory: Bool
    /// How it is jailed; nil runs it unsandboxed (`hvctl run --no-sandbox`, debugging only).
    public var sandbox: SandboxPlan?
    /// The cgroups it runs in and its OOM score, applied before it runs (for a jailed device;
    /// an unsandboxed one is moved just after it starts); nil: the core's own.
    public var placement: ProcessPlacement?

    /// The process's command line with `script` in place of the spec's own: the executable, its
    /// arguments, the script where the process finds it, and the instance name.
    public func commandLine(script: String?) -> [String] {
        var line = [executable] + arguments
        if let script {
            line.append(sandbox == nil ? script : SandboxPlan.pluginDirectory + "/" + SandboxPlan.fileName(script))
        }
        return line + [name]
    }

    public init(name: String, executable: String, resources: [Resource] = [], interruptGSIs: [UInt32] = [],
                hostFiles: [UInt16: FileDescriptor] = [:], config: String = "", capabilities: Capabilities, mapsGuestMemory: Bool = false,
                sandbox: SandboxPlan? = nil) {
        self.sandbox = sandbox
        self.name = name
        self.executable = executable
        self.resources = resources
        self.interruptGSIs = interruptGSIs
        self.hostFiles = hostFiles
        self.config = config
        self.capabilities = capabilities
        self.mapsGuestMemory = mapsGuestMemory
    }
}

/// One device process and every durable resource behind it. The core owns the ring, the
/// doorbells, the interrupt eventfds and the state page; the process only borrows them, so a new
/// process picks up exactly where a dead one stopped.
final class ManagedDevice: @unchecked Sendable {
    // @unchecked: mutable fields are touched only by the supervisor thread (or by the main thread
    // before that thread starts).
    let spec: DeviceSpec
    let endpoint: DeviceEndpoint
    let statePage: FileDescriptor
    /// The bitmap in which the device marks the guest pages it writes (a device that maps guest
    /// memory only): a live migration copies those pages again. Kept across restarts.
    let dirtyLog: (file: FileDescriptor, bitmap: DirtyPageBitmap)?
    let interrupts: [EventFD]
    var process: ChildProcess?
    /// OOM kills its memory cgroup had counted when last looked at (see `describe`).
    var oomKillsSeen: UInt64 = 0
    /// How its last process ended during a handshake (nil: it was still running, or answered).
    var handshakeTermination: ChildProcess.Termination?
    /// Times it was started again because it was killed before the guest started.
    var startupRetries = 0
    /// The control channel of the live process. Under a lock: the control socket thread sends
    /// MEDIA_CHANGE on it while the supervisor thread may be replacing it.
    let controlChannel = Mutex<ControlChannel?>(nil)
    var control: ControlChannel? {
        get { controlChannel.withLock { $0 } }
        set { controlChannel.withLock { $0 = newValue } }
    }
    /// Host files the operator replaced while the VM ran (a new CD), by index; a restarted
    /// process gets these instead of the spec's. `nil` value: an empty placeholder (no medium).
    let hostFileOverrides = Mutex<[UInt16: FileDescriptor]>([:])
    var events: ControlChannel?
    var granted: Capabilities = []
    var generation: UInt32 = 0
    /// The generation of the first process: 0, or 1 when restored from a snapshot (its state
    /// page already holds the device's state, as after a restart).
    var firstGeneration: UInt32 = 0
    /// Restored from a snapshot: the state layout version the snapshot recorded, which the
    /// process must report.
    var expectedStateVersion: UInt16?
    /// What the live process reported in its handshake: its model name, its state layout version
    /// (0: it cannot be snapshotted) and whether it logs its guest-memory writes. Written by the
    /// thread doing the handshake.
    let reported = Mutex<(model: String, stateVersion: UInt16, logsDirtyPages: Bool)>(("", 0, false))
    var crashTimes: [UInt64] = []
    /// The guest access the device died serving the last times, and how many deaths in a row.
    var poisonSuspect: UInt32?
    var poisonStrikes = 0
    /// When the live process completed its handshake.
    var startedAt: UInt64?
    var restartAt: UInt64?
    var lastError: String?
    /// The read end of the live process's stderr (and its jail's): the core prefixes each line
    /// with the device's name, so no device can print lines that pass for hvctl's own.
    var stderrPipe: FileDescriptor?
    var stderrPartial: [UInt8] = []
    var stderrLimiter = LineRateLimiter()
    /// Published for other threads (the control socket): the live process's pid (0 while none)
    /// and how many times the device was restarted.
    let publishedPid = Atomic<Int32>(0)
    let restarts = Atomic<UInt32>(0)

    /// The binary the device runs now: the spec's, until an operator upgrades it. Written only by
    /// the supervisor thread; `publishedExecutable` is the copy other threads read.
    var executable: String {
        didSet { publishedExecutable.withLock { $0 = script ?? executable } }
    }
    /// An interpreted plugin's script now: the spec's, until an operator upgrades it (the
    /// interpreter stays). Supervisor thread only.
    var script: String? {
        didSet { publishedExecutable.withLock { $0 = script ?? executable } }
    }
    /// What the device runs, for other threads: its binary, or an interpreted plugin's script.
    let publishedExecutable: Mutex<String>
    /// The settings text HELLO carries: the spec's, until an operator reconfigures the device.
    /// Supervisor thread only.
    var config: String

    init(spec: DeviceSpec, memoryBytes: UInt64) throws(CoreError) {
        self.spec = spec
        config = spec.config
        executable = spec.executable
        script = spec.script
        publishedExecutable = Mutex(spec.script ?? spec.executable)
        endpoint = try DeviceEndpoint(name: spec.name)
        do {
            statePage = try MemFD.create(name: "hv-state-\(spec.name)", size: 4096)
            dirtyLog = spec.mapsGuestMemory ? try DirtyPageBitmap.create(name: "hv-dirty-\(spec.name)", memoryBytes: memoryBytes) : nil
            interrupts = try spec.interruptGSIs.map { _ throws(SystemError) in try EventFD() }
        } catch { throw .system(error) }
    }
}

extension ManagedDevice {
    /// The state page's bytes now (for a snapshot, or for the trusted side to read what the
    /// device publishes there); nil if it cannot be read.
    func readStatePage() -> [UInt8]? {
        var page = [UInt8](repeating: 0, count: DeviceSupervisor.statePageSize)
        let n = page.withUnsafeMutableBytes { pread(statePage.rawValue, $0.baseAddress, $0.count, 0) }
        return n == page.count ? page : nil
    }
}

/// A restored device's process that cannot take the snapshot's state.
struct RestoreRefused: Error, CustomStringConvertible {
    let description: String
}

/// What an operator asks of one device (`hvctl device VM restart|upgrade DEV`).
public enum DeviceAction: Sendable {
    /// Stop the process cleanly and start it again; revives a device given up after crashes.
    case restart
    /// Stop the process cleanly and start `binary` in its place, with the same resources and
    /// state; if it does not start, or dies within 300 ms, start the old one again.
    case upgrade(binary: String)
    /// Change the device's settings (its settings text's keys starting with one of `removing`
    /// dropped, then `setting` added): in place when the device takes RECONFIGURE, else by
    /// restarting the process with them (the same rollback as an upgrade; the guest sees nothing
    /// but a pause, the restart keeping the device's rings and state).
    case reconfigure(removing: [String], setting: [String: String])
}

/// Why an operator's device action failed, in one line.
public struct DeviceActionError: Error, Sendable, CustomStringConvertible {
    public let description: String
}

/// A token bucket for a device's stderr lines: a burst of 20, then 5 a second; what is dropped is
/// counted and reported once lines flow again, so a device cannot flood the operator's terminal.
struct LineRateLimiter {
    static let burst = 20.0
    static let perSecond = 5.0
    var tokens = LineRateLimiter.burst
    var last: UInt64 = 0
    var suppressed = 0

    /// Whether a line may be printed now; counts it as suppressed if not.
    mutating func admit(now: UInt64) -> Bool {
        if last != 0 { tokens = min(Self.burst, tokens + Double(now &- last) / 1e9 * Self.perSecond) }
        last = now
        guard tokens >= 1 else {
            suppressed += 1
            return false
        }
        tokens -= 1
        return true
    }
}

/// Starts device processes, watches them through pidfds, serves their device → core requests,
/// and restarts them with backoff when they die.
final class DeviceSupervisor: @unchecked Sendable {
    // @unchecked: after `startAll`, device state is owned by the supervisor thread; the only
    // cross-thread inputs are the atomics and the `wake` eventfd.
    let devices: [ManagedDevice]
    private let memory: GuestRAM
    private let vm: VirtualMachine
    private let wake: EventFD
    private let stopping = Atomic<Bool>(false)
    private let finished: EventFD
    private let verbose: Bool
    /// Called for SET_BOOT_STATE from a device with `bootControl`; returns the status to answer.
    var onBootState: (@Sendable (BootState) -> Status)?
    /// Called for SET_IRQ_LEVEL on the INTx line; false when the device has no PCI function.
    var onINTx: (@Sendable (DeviceEndpoint, Bool) -> Bool)?
    /// Serves ADD_DOORBELL (set by the machine, which knows where BARs are).
    var doorbells: DoorbellTable?
    /// Serves SET_MSI_ROUTE.
    let msiRouter: MSIRouter
    /// Called for SYSTEM_EVENT from a device with `bootControl`.
    var onSystemEvent: (@Sendable (SystemEvent) -> Void)?
    /// Called when a device dies before the guest has started (startup then fails).
    var onEarlyDeath: (@Sendable (String) -> Void)?
    /// True once the vCPUs run; before that a device death is a startup failure.
    let guestStarted = Atomic<Bool>(false)

    /// Give up on a device that crashed this many times within `crashWindow`.
    static let maximumCrashes = 10

    /// Records a crash (or failed restart) at `now` of a process that had been up for `uptime`;
    /// returns the delay before the next restart, or nil when the device crashed too often and is
    /// given up. 1 ms, then 10 ms, 20 ms, 40 ms … capped at 2 s: quick recovery from a one-off crash, no busy
    /// loop from a broken one. A process that served for `healthyUptime` before it died was not
    /// crash-looping (an operator's kill, an OOM kill, a rare bug): its history starts afresh, so
    /// it comes back in 1 ms however often that happens.
    private func recordCrash(_ d: ManagedDevice, now: UInt64, uptime: UInt64) -> UInt64? {
        if uptime >= Self.healthyUptime { d.crashTimes = [] }
        d.crashTimes = d.crashTimes.filter { now - $0 < Self.crashWindow } + [now]
        guard d.crashTimes.count <= Self.maximumCrashes else {
            d.endpoint.state = .failed
            return nil
        }
        // The first crash after a healthy run restarts at once (1 ms: the stall the guest sees is
        // the restart itself); a crash loop backs off from 10 ms.
        guard d.crashTimes.count > 1 else { return 1_000_000 }
        return min(UInt64(10_000_000) << UInt64(d.crashTimes.count - 2), 2_000_000_000)
    }
    static let crashWindow: UInt64 = 60_000_000_000
    static let healthyUptime: UInt64 = 100_000_000

    init(specs: [DeviceSpec], memory: GuestRAM, vm: VirtualMachine, verbose: Bool) throws(CoreError) {
        var devices: [ManagedDevice] = []
        for spec in specs { devices.append(try ManagedDevice(spec: spec, memoryBytes: memory.size)) }
        self.devices = devices
        self.memory = memory
        self.vm = vm
        self.verbose = verbose
        msiRouter = MSIRouter(vm: vm)
        do {
            wake = try EventFD(nonBlocking: true)
            finished = try EventFD()
        } catch { throw .system(error) }
        for d in devices {
            for (line, gsi) in zip(d.interrupts, d.spec.interruptGSIs) {
                do { try vm.registerIRQFD(line, gsi: gsi) } catch { throw .kvm(error) }
            }
            let wake = self.wake
            d.endpoint.onFault = { why in
                Diagnostics.line("device \(d.spec.name) misbehaved (\(why)); killing and restarting it")
                d.process?.signal(SIGKILL)
                wake.signal()
            }
        }
    }

    /// Starts every device and completes its handshake, on the calling thread. All processes
    /// are spawned first, so their jails and runtimes start up in parallel.
    func startAll() throws(CoreError) {
        var started: [(ManagedDevice, Spawned)] = []
        let ahead = spawnedAhead.withLock { list -> [Spawned]? in
            defer { list = nil }
            return list
        }
        do throws(CoreError) {
            if let ahead {
                for (d, s) in zip(devices, ahead) {
                    // One that ended while it waited (killed; or built with an SDK that gives up
                    // on a late HELLO) is simply started again.
                    if s.child.reapIfExited() == nil {
                        started.append((d, s))
                    } else {
                        drainStderr(d, final: true)
                        started.append((d, try spawn(d)))
                    }
                }
            } else {
                for d in devices { started.append((d, try spawn(d))) }
            }
            // Every HELLO first, then the replies: the processes wake and map what they were
            // given in parallel (waking one that has been asleep took up to 4 ms on this host).
            var hellos: [PendingHello] = []
            for (d, s) in started { hellos.append(try sendHello(d, s)) }
            for ((d, s), hello) in zip(started, hellos) {
                try launchBeforeTheGuest(d, spawned: s, helloSent: hello)
                d.endpoint.state = .running
            }
        } catch {
            for (d, s) in started where d.process == nil { s.child.killAndReap() }
            throw error
        }
    }

    /// Device processes started by `spawnAhead`, one per device in order, until `startAll`
    /// takes them over (or `abandonSpawnedAhead` ends them).
    private let spawnedAhead = Mutex<[Spawned]?>(nil)

    /// Starts every device process now, without its handshake: each gets through its jail and
    /// runtime start-up and waits for HELLO, which `startAll` sends. A migration's destination
    /// calls it when memory starts to arrive, so the switch-over only has the handshakes left.
    /// Call on the thread that will call `startAll` (a device dies with the thread that made it:
    /// `PR_SET_PDEATHSIG`).
    func spawnAhead() throws(CoreError) {
        var list: [Spawned] = []
        do throws(CoreError) {
            for d in devices { list.append(try spawn(d)) }
        } catch {
            for s in list { s.child.killAndReap() }
            throw error
        }
        spawnedAhead.withLock { $0 = list }
    }

    /// Ends the processes `spawnAhead` started that `startAll` has not taken over.
    func abandonSpawnedAhead() {
        let ahead = spawnedAhead.withLock { list -> [Spawned]? in
            defer { list = nil }
            return list
        }
        for s in ahead ?? [] { s.child.killAndReap() }
    }

    /// How many times a device killed before the guest started is started again.
    static let startupRetries = 3

    /// Completes the handshake of `spawned` (or spawns `d` first): while the guest has not run, a
    /// process killed during its start-up is replaced by a fresh one, as `mayStartAgain` allows.
    private func launchBeforeTheGuest(_ d: ManagedDevice, spawned: Spawned? = nil, helloSent: PendingHello? = nil) throws(CoreError) {
        var next = spawned
        var hello = helloSent
        while true {
            d.handshakeTermination = nil
            do throws(CoreError) {
                let process: Spawned
                if let next { process = next } else { process = try spawn(d) }
                if let hello { try finishHandshake(d, process, hello) } else { try handshake(d, process) }
                return
            } catch {
                guard let ended = d.handshakeTermination, mayStartAgain(d, ended: ended) else { throw error }
                d.startupRetries += 1
                Diagnostics.line("device \(d.spec.name) \(ended) during its start-up; starting it again")
                next = nil
                hello = nil
            }
        }
    }

    /// Whether device `d`, whose process ended as `ended` before the guest started, may simply
    /// be started afresh (same generation: for it nothing has happened yet): it was killed by a
    /// signal, not by its sandbox (SIGSYS) or the OOM killer, and it reported no error. What it
    /// did itself (an exit, an error, a sandbox violation) or a memory limit would happen again,
    /// and the operator is told at once instead.
    private func mayStartAgain(_ d: ManagedDevice, ended: ChildProcess.Termination) -> Bool {
        guard d.startupRetries < Self.startupRetries, case .signalled(let signal) = ended, signal != SIGSYS, d.lastError == nil else { return false }
        if signal == SIGKILL, let kills = d.spec.placement?.oomKillCount(), kills > d.oomKillsSeen { return false }
        return true
    }

    /// A device process that is running but has not completed its handshake yet.
    struct Spawned: Sendable {
        let child: ChildProcess
        let control: SeqPacketSocket
        let events: SeqPacketSocket
    }

    private func launch(_ d: ManagedDevice) throws(CoreError) {
        try handshake(d, try spawn(d))
    }

    /// Runs the supervision loop on a dedicated thread.
    func startThread() throws(CoreError) {
        do { try HostThread.spawn(name: "hv-supervisor") { [self] in loop() } } catch { throw .system(error) }
        threadRunning.store(true, ordering: .releasing)
    }
    private let threadRunning = Atomic<Bool>(false)

    private func spawn(_ d: ManagedDevice) throws(CoreError) -> Spawned {
        let spec = d.spec
        let (coreControl, deviceControl): (SeqPacketSocket, SeqPacketSocket)
        let (coreEvents, deviceEvents): (SeqPacketSocket, SeqPacketSocket)
        let child: ChildProcess
        let stderrRead: FileDescriptor, stderrWrite: FileDescriptor
        do {
            (coreControl, deviceControl) = try SeqPacketSocket.pair()
            (coreEvents, deviceEvents) = try SeqPacketSocket.pair()
            var ends: [Int32] = [-1, -1]
            try check("pipe for \(spec.name)'s stderr", pipe(&ends))
            (stderrRead, stderrWrite) = (FileDescriptor(owning: ends[0]), FileDescriptor(owning: ends[1]))
            _ = fcntl(ends[0], F_SETFD, FD_CLOEXEC)
            _ = fcntl(ends[1], F_SETFD, FD_CLOEXEC)
            try stderrRead.setNonBlocking(true)
            let inherit = [(InheritedDescriptor.control, deviceControl.fd.rawValue),
                           (InheritedDescriptor.events, deviceEvents.fd.rawValue)]
            let arguments = Array(spec.commandLine(script: d.script).dropFirst())
            if var sandbox = spec.sandbox {
                // The script is copied into the jail first, beside the files it brings.
                if let script = d.script { sandbox.pluginFiles.insert(script, at: 0) }
                child = try sandbox.spawn(executable: d.executable, arguments: arguments,
                                          memoryBytes: memory.size, inherit: inherit, stderr: stderrWrite.rawValue,
                                          placement: spec.placement)
            } else {
                child = try ChildProcess.spawn(path: d.executable, arguments: arguments,
                                               inherit: inherit + [(2, stderrWrite.rawValue)])
                do { try spec.placement?.apply(to: child.pid) } catch {
                    child.killAndReap()
                    throw error
                }
            }
        } catch {
            throw .device(name: spec.name, reason: "cannot start \(d.executable): \(error)")
        }
        deviceControl.fd.close()
        deviceEvents.fd.close()
        stderrWrite.close()
        d.stderrPipe = stderrRead
        d.stderrPartial = []
        return Spawned(child: child, control: coreControl, events: coreEvents)
    }

    private func handshake(_ d: ManagedDevice, _ spawned: Spawned) throws(CoreError) {
        try finishHandshake(d, spawned, try sendHello(d, spawned))
    }

    /// A HELLO sent to a device process whose reply `finishHandshake` waits for.
    struct PendingHello {
        let control: ControlChannel
        let offered: Capabilities
        /// The request, or why it could not be sent (reported by `finishHandshake`).
        let sent: Result<ControlChannel.SentRequest, ChannelError>
    }

    /// Sends device `d`'s HELLO to `spawned` without waiting for its reply. Throws only when
    /// the HELLO cannot be made (the process is then ended).
    private func sendHello(_ d: ManagedDevice, _ spawned: Spawned) throws(CoreError) -> PendingHello {
        let spec = d.spec
        let child = spawned.child
        let coreControl = spawned.control
        var fds: [Int32] = []
        var roles: [FDAssignment] = []
        func pass(_ fd: FileDescriptor, _ role: FDRole, _ index: UInt16 = 0) {
            fds.append(fd.rawValue)
            roles.append(FDAssignment(role: role, index: index))
        }
        if spec.mapsGuestMemory { pass(memory.memfd, .guestMemory) }
        // Every device may take part in snapshots; the ones that can say so. Those that map guest
        // memory may log their writes to it (live migration).
        var offered = spec.capabilities.union(.snapshot)
        if d.dirtyLog != nil { offered.insert(.dirtyLog) }
        if !spec.resources.isEmpty {
            pass(d.endpoint.ringFD, .registerRing)
            pass(d.endpoint.kick.fd, .ringKick)
            pass(d.endpoint.reply.fd, .ringReply)
            offered.insert(.registerRing)
        }
        if spec.capabilities.contains(.statePage) { pass(d.statePage, .statePage) }
        for (i, line) in d.interrupts.enumerated() { pass(line.fd, .interrupt, UInt16(i)) }
        let overrides = d.hostFileOverrides.withLock { $0 }
        for (i, file) in spec.hostFiles.sorted(by: { $0.key < $1.key }) { pass(overrides[i] ?? file, .hostIO, i) }

        let hello = Hello(capabilities: offered, restartGeneration: d.generation,
                          memoryRegions: spec.mapsGuestMemory ? memory.regions : [],
                          resources: spec.resources, fds: roles, config: d.config)
        let helloPayload: [UInt8]
        do { helloPayload = try hello.encode() } catch {
            child.killAndReap()
            throw .device(name: spec.name, reason: "its settings do not fit in a HELLO message (\(error))")
        }
        let control = ControlChannel(socket: coreControl)
        let sent: Result<ControlChannel.SentRequest, ChannelError>
        do { sent = .success(try control.sendRequest(.hello, payload: helloPayload, fds: fds)) } catch { sent = .failure(error) }
        return PendingHello(control: control, offered: offered, sent: sent)
    }

    /// Waits for the reply to `pending` (sent by `sendHello` to `spawned`), checks it, and makes
    /// the process device `d`'s; on failure the process is ended and why is thrown.
    private func finishHandshake(_ d: ManagedDevice, _ spawned: Spawned, _ pending: PendingHello) throws(CoreError) {
        let spec = d.spec
        let child = spawned.child
        let control = pending.control
        let offered = pending.offered
        do {
            let (frame, unexpected) = try control.awaitReply(to: try pending.sent.get(), timeoutMilliseconds: 10_000)
            guard unexpected.isEmpty else { throw ChannelError.malformed(.invalidField("device sent descriptors with its HELLO reply")) }
            let reply = try HelloReply.decode(frame.payload)
            guard reply.major == ProtocolVersion.major else {
                throw ChannelError.malformed(.invalidField("device speaks protocol \(reply.major).\(reply.minor)"))
            }
            guard offered.isSuperset(of: reply.capabilities) else {
                throw ChannelError.malformed(.invalidField("device claimed capabilities it was not offered"))
            }
            if !spec.resources.isEmpty && !reply.capabilities.contains(.registerRing) {
                throw ChannelError.malformed(.invalidField("device refused the register ring but owns registers"))
            }
            if d.generation == d.firstGeneration, let expected = d.expectedStateVersion {
                let version = reply.capabilities.contains(.snapshot) ? reply.stateVersion : 0
                guard version == expected else {
                    throw RestoreRefused(description: version == 0
                        ? "this build of \(d.executable) cannot restore a snapshot"
                        : "the snapshot holds its state in layout version \(expected); this build of \(d.executable) reads version \(version)")
                }
            }
            if reply.capabilities.contains(.dirtyLog), let log = d.dirtyLog {
                let (answer, _) = try control.request(.setDirtyLog, payload: [], fds: [log.file.rawValue], timeoutMilliseconds: 10_000)
                guard answer.status == Status.ok.rawValue else {
                    throw ChannelError.malformed(.invalidField("device refused its dirty-page log (status \(answer.status))"))
                }
            }
            d.granted = reply.capabilities
            d.reported.withLock {
                $0 = (reply.name, reply.capabilities.contains(.snapshot) ? reply.stateVersion : 0, reply.capabilities.contains(.dirtyLog))
            }
        } catch {
            var ended = child.reapIfExited()
            if ended == nil, case ChannelError.closed = error {
                // Its sockets close before it is a zombie: give a dying process a moment to end.
                _ = try? Poll.wait([Poll.Interest(fd: child.pidfd.rawValue)], timeoutMilliseconds: 200)
                ended = child.reapIfExited()
            }
            d.handshakeTermination = ended
            child.killAndReap()
            drainStderr(d, final: true)
            let why: String
            if case ChannelError.closed = error {
                why = "\(ended?.description ?? "exited") during the handshake" + (d.lastError.map { ": \($0)" } ?? "")
            } else if let e = error as? RestoreRefused {
                why = e.description
            } else if let e = error as? WireError {
                why = "malformed HELLO reply: \(e)"
            } else {
                why = "handshake failed: \(error)"
            }
            throw .device(name: spec.name, reason: why)
        }
        d.process = child
        d.startedAt = monotonicNanoseconds()
        d.publishedPid.store(child.pid, ordering: .releasing)
        if d.generation > d.firstGeneration { d.restarts.wrappingAdd(1, ordering: .relaxed) }
        d.control = control
        d.events = ControlChannel(socket: spawned.events)
        if verbose { Diagnostics.line("device \(spec.name) started (pid \(child.pid), generation \(d.generation))") }
    }

    // MARK: Supervision loop

    private func loop() {
        while !stopping.load(ordering: .acquiring) {
            var interests = [Poll.Interest(fd: wake.fd.rawValue)]
            var owners: [(ManagedDevice, isPidfd: Bool)] = []
            for d in devices {
                if let p = d.process {
                    interests.append(.init(fd: p.pidfd.rawValue))
                    owners.append((d, true))
                }
                if let e = d.events {
                    interests.append(.init(fd: e.socket.fd.rawValue))
                    owners.append((d, false))
                }
                if let pipe = d.stderrPipe {
                    interests.append(.init(fd: pipe.rawValue))
                    owners.append((d, false))
                }
            }
            let now = monotonicNanoseconds()
            let nextRestart = devices.compactMap(\.restartAt).min()
            let timeout: Int32 = nextRestart.map { $0 <= now ? 0 : Int32(min(($0 - now) / 1_000_000 + 1, 60_000)) } ?? -1
            guard let revents = try? Poll.wait(interests, timeoutMilliseconds: timeout) else { continue }
            if revents[0] != 0 { wake.drain() }
            if stopping.load(ordering: .acquiring) { break }
            // An action replaces processes: what this poll saw of the old ones is stale.
            if serveActions() { continue }
            for (i, (d, isPidfd)) in owners.enumerated() where revents[i + 1] != 0 {
                if isPidfd {
                    handleDeath(d)
                } else if interests[i + 1].fd == d.stderrPipe?.rawValue {
                    drainStderr(d, final: false)
                } else {
                    serveEvents(d)
                }
            }
            let after = monotonicNanoseconds()
            for d in devices {
                if let at = d.restartAt, at <= after { restart(d) }
            }
        }
        _ = serveActions(refusing: true)
        finished.signal()
    }

    private func handleDeath(_ d: ManagedDevice) {
        guard let p = d.process else { return }
        // Serve what the device said before dying (its last log line explains it).
        if d.events != nil { serveEvents(d, drainOnly: true) }
        drainStderr(d, final: true)
        let ended = p.reapIfExited() ?? { p.killAndReap(); return .signalled(SIGKILL) }()
        let startAgain = !guestStarted.load(ordering: .acquiring) && mayStartAgain(d, ended: ended)
        let how = describe(ended, of: d)
        let uptime = d.startedAt.map { monotonicNanoseconds() &- $0 } ?? 0
        notePoison(d)
        forgetProcess(d)
        if startAgain {
            // Killed before the guest ran: a fresh start, as if for the first time (a BIOS loads
            // the guest again and hands over the boot state again).
            d.startupRetries += 1
            Diagnostics.line("device \(d.spec.name) (pid \(p.pid)) \(how) before the guest started; starting it again")
            do { try launchBeforeTheGuest(d) } catch {
                d.endpoint.state = .failed
                onEarlyDeath?("\(error)")
            }
            return
        }
        if !guestStarted.load(ordering: .acquiring) {
            d.endpoint.state = .failed
            onEarlyDeath?(d.lastError.map { "device \(d.spec.name): \($0)" } ?? "device \(d.spec.name) \(how) before the guest started")
            return
        }
        let now = monotonicNanoseconds()
        guard let delay = recordCrash(d, now: now, uptime: uptime) else {
            Diagnostics.line("device \(d.spec.name) (pid \(p.pid)) \(how); it crashed \(d.crashTimes.count) times in \(Self.crashWindow / 1_000_000_000) s, giving up: its registers now read as all-ones")
            return
        }
        d.restartAt = now + delay
        Diagnostics.line("device \(d.spec.name) (pid \(p.pid)) \(how); the VM keeps running, restarting it in \(delay / 1_000_000) ms")
    }

    /// How a device ended, naming the syscall when its sandbox stopped it.
    private func describe(_ ended: ChildProcess.Termination, of d: ManagedDevice) -> String {
        if ended == .signalled(SIGKILL), let kills = d.spec.placement?.oomKillCount(), kills > d.oomKillsSeen {
            d.oomKillsSeen = kills
            return "was killed by the OOM killer: its own or its VM's memory limit was reached ('hvctl status' shows them)"
        }
        guard let plan = d.spec.sandbox else { return ended.description }
        let prefix = "sandbox: denied syscall "
        if ended == .exited(Int32(HV_SANDBOX_VIOLATION_STATUS)), let report = d.lastError, report.hasPrefix(prefix),
           let number = Int32(report.dropFirst(prefix.count)) {
            var name = "unknown"
            if let raw = seccomp_syscall_resolve_num_arch(UInt32(SCMP_ARCH_NATIVE), number) {
                name = String(cString: raw)
                free(raw)
            }
            return "was stopped by its sandbox: system call \(number) (\(name)) is not allowed by \(plan.profilePath)"
        }
        if ended == .signalled(SIGSYS) {
            return "was killed by its sandbox during start-up: a system call not allowed by \(plan.profilePath)"
        }
        return ended.description
    }

    private func restart(_ d: ManagedDevice) {
        d.restartAt = nil
        do {
            try relaunch(d)
        } catch {
            Diagnostics.line("\(error)")
            let now = monotonicNanoseconds()
            if let delay = recordCrash(d, now: now, uptime: 0) {
                d.restartAt = now + delay
            } else {
                Diagnostics.line("device \(d.spec.name) could not be restarted; giving up: its registers now read as all-ones")
            }
            return
        }
        Diagnostics.line("device \(d.spec.name) restarted (pid \(d.process?.pid ?? 0), restart \(d.generation)); output resumes")
    }

    /// Deaths in a row while serving the same guest access before that access is skipped.
    static let poisonStrikesToSkip = 3

    /// After a death: if the device died acting on the same guest register access three times in
    /// a row (each replay kills it again), its successor answers that access without serving it
    /// (a read gets all ones, a write is dropped) and carries on with the next.
    private func notePoison(_ d: ManagedDevice) {
        let ring = d.endpoint.ring
        guard let index = ring.requestBeingServed() else {
            d.poisonSuspect = nil
            d.poisonStrikes = 0
            return
        }
        d.poisonStrikes = d.poisonSuspect == index ? d.poisonStrikes + 1 : 1
        d.poisonSuspect = index
        guard d.poisonStrikes >= Self.poisonStrikesToSkip else { return }
        ring.poison(index)
        let what = ring.request(at: index).map { r in
            "\(r.operation.isRead ? "a read" : "a write of 0x\(String(r.data, radix: 16))") at offset 0x\(String(r.offset, radix: 16)) of resource \(r.resource)"
        } ?? "a guest access"
        Diagnostics.line("device \(d.spec.name) crashed \(d.poisonStrikes) times in a row serving \(what); its successor skips it (\(ring.request(at: index)?.operation.isRead == true ? "the guest reads all ones" : "the write is dropped")) and carries on")
        d.poisonSuspect = nil
        d.poisonStrikes = 0
    }

    /// Starts the device's next generation on the same ring, state page and eventfds; on success
    /// it is running, its ring re-kicked and every interrupt line signalled once.
    private func relaunch(_ d: ManagedDevice) throws(CoreError) {
        d.generation &+= 1
        // A ring the dead process left inconsistent would wedge the new one; the fault path
        // already reported it.
        d.endpoint.faulted.store(false, ordering: .releasing)
        d.endpoint.ring.clearPoisonIfCommitted()
        try launch(d)
        d.endpoint.state = .running
        // Re-kick: the new process drains whatever the old one left uncommitted; and signal every
        // interrupt line once, so no edge the dead process owed the guest is lost.
        d.endpoint.kick.signal()
        for line in d.interrupts { line.signal() }
    }

    // MARK: Operator actions (hvctl device NAME restart|upgrade)

    /// A request waiting for the supervisor thread, and the answer it gets.
    private final class PendingAction: @unchecked Sendable {
        // @unchecked: `result` is written by the supervisor thread before `done` is signalled and
        // read by the requester only after.
        let device: String
        let action: DeviceAction
        let done: EventFD
        var result: Result<String, DeviceActionError> = .failure(DeviceActionError(description: "not served"))
        init(device: String, action: DeviceAction) throws(SystemError) {
            self.device = device
            self.action = action
            done = try EventFD()
        }
    }
    private let pendingActions = Mutex<[PendingAction]>([])

    /// How long an upgraded binary must stay up after its handshake to be kept.
    static let upgradeGrace: UInt64 = 300_000_000

    /// Runs `action` on device `name` on the supervisor thread and waits for it (at most 30 s).
    /// Safe from any thread but the supervisor's.
    func perform(_ action: DeviceAction, on name: String) throws(DeviceActionError) -> String {
        guard threadRunning.load(ordering: .acquiring), !stopping.load(ordering: .acquiring) else {
            throw DeviceActionError(description: "the VM is not running")
        }
        guard devices.contains(where: { $0.spec.name == name }) else {
            throw DeviceActionError(description: "this VM has no device '\(name)' (see 'hvctl device VM ls')")
        }
        let pending: PendingAction
        do { pending = try PendingAction(device: name, action: action) } catch {
            throw DeviceActionError(description: "\(error)")
        }
        pendingActions.withLock { $0.append(pending) }
        wake.signal()
        guard let ready = try? Poll.wait([Poll.Interest(fd: pending.done.fd.rawValue)], timeoutMilliseconds: 30_000), ready[0] != 0 else {
            throw DeviceActionError(description: "the core did not finish within 30 s; see 'hvctl device VM ls'")
        }
        return try pending.result.get()
    }

    /// Serves every pending action; true if there was any.
    private func serveActions(refusing: Bool = false) -> Bool {
        let actions = pendingActions.withLock { list -> [PendingAction] in
            defer { list.removeAll() }
            return list
        }
        for pending in actions {
            if refusing {
                pending.result = .failure(DeviceActionError(description: "the VM is stopping"))
            } else if let d = devices.first(where: { $0.spec.name == pending.device }) {
                pending.result = act(pending.action, on: d)
            }
            pending.done.signal()
        }
        return !actions.isEmpty
    }

    private func act(_ action: DeviceAction, on d: ManagedDevice) -> Result<String, DeviceActionError> {
        let name = d.spec.name
        switch action {
        case .restart:
            quiesce(d)
            d.crashTimes = []
            d.restartAt = nil
            do { try relaunch(d) } catch {
                scheduleRestartAfterFailure(d)
                return .failure(DeviceActionError(description: "\(error)"))
            }
            Diagnostics.line("device \(name) restarted by the operator (pid \(d.process?.pid ?? 0))")
            return .success("restarted \(name) (pid \(d.process?.pid ?? 0))")
        case .reconfigure(let removing, let setting):
            var fields = SettingsText.decode(d.config).filter { key, _ in !removing.contains { key.hasPrefix($0) } }
            fields.merge(setting) { _, new in new }
            let old = d.config, new = SettingsText.encode(fields.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
            // In place first (RECONFIGURE): nothing restarts, nothing the device holds is lost.
            switch reconfigureInPlace(d, config: new) {
            case Status.ok.rawValue?:
                d.config = new
                Diagnostics.line("device \(name) reconfigured in place")
                return .success("reconfigured \(name) in place")
            case Status.invalidArgument.rawValue?:
                return .failure(DeviceActionError(description: "\(name) refused its new settings; it carries on with its old ones"))
            case Status.unknownType.rawValue?, nil:
                break  // it cannot change them in place, or there is no process to ask: a new process takes them
            case let status?:
                // DENIED: quiesced for a snapshot or a migration, which a restart must not disturb.
                return .failure(DeviceActionError(description: "\(name) cannot take new settings now (status \(status)); try again in a moment"))
            }
            switch replaceProcess(d, change: { $0.config = new }, undo: { $0.config = old }) {
            case .replaced:
                Diagnostics.line("device \(name) reconfigured (pid \(d.process?.pid ?? 0))")
                return .success("reconfigured \(name) (pid \(d.process?.pid ?? 0))")
            case .rolledBack(let why):
                return .failure(DeviceActionError(description: "\(name) refused its new settings: \(why); it carries on with its old ones"))
            case .lost(let why, let error):
                return .failure(DeviceActionError(description: "\(name) refused its new settings (\(why)) and did not restart with its old ones either (\(error))"))
            }
        case .upgrade(let binary) where d.script != nil:
            // An interpreted plugin: the new file is its script; its interpreter stays.
            if let refusal = refuseScript(binary, for: d) { return .failure(refusal) }
            let old = d.script
            return upgrade(d, to: binary, change: { $0.script = binary }, undo: { $0.script = old }, from: old ?? "")
        case .upgrade(let binary):
            var st = stat()
            guard stat(binary, &st) == 0, st.st_mode & S_IFMT == S_IFREG, access(binary, X_OK) == 0 else {
                return .failure(DeviceActionError(description: "'\(binary)' is not an executable file; \(name) keeps running \(d.executable)"))
            }
            let old = d.executable
            return upgrade(d, to: binary, change: { $0.executable = binary }, undo: { $0.executable = old }, from: old)
        }
    }

    /// Why `path` cannot replace interpreted device `d`'s script, or nil if it can.
    private func refuseScript(_ path: String, for d: ManagedDevice) -> DeviceActionError? {
        let name = d.spec.name, current = d.script ?? ""
        var st = stat()
        guard stat(path, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            return DeviceActionError(description: "'\(path)' is not a regular file (\(name) is interpreted: give its new script); it keeps running \(current)")
        }
        let directory = { (p: String) in String(p[..<(p.lastIndex(of: "/") ?? p.startIndex)]) }
        if let plan = d.spec.sandbox {
            // The jail copies every file into one directory by its name: the script must not
            // take the name of a module it brings.
            if plan.pluginFiles.contains(where: { SandboxPlan.fileName($0) == SandboxPlan.fileName(path) }) {
                return DeviceActionError(description: "'\(path)' has the name of a file \(name) brings (\(SandboxPlan.fileName(path))); rename the script")
            }
        } else if directory(path) != directory(current) {
            // Unsandboxed, the script runs where it is and finds its modules beside it.
            return DeviceActionError(description: "'\(path)' is not beside \(current): an unsandboxed script finds its modules in its own directory")
        }
        return nil
    }

    /// Replaces the program of `d` (`change`), rolling back (`undo`) to `old` if the new one does
    /// not take over.
    private func upgrade(_ d: ManagedDevice, to binary: String, change: (ManagedDevice) -> Void, undo: (ManagedDevice) -> Void,
                         from old: String) -> Result<String, DeviceActionError> {
        let name = d.spec.name
        let started = monotonicNanoseconds()
        switch replaceProcess(d, change: change, undo: undo) {
        case .replaced(let startedAt):
            let pause = (startedAt - started) / 1_000_000
            Diagnostics.line("device \(name) upgraded to \(binary) (pid \(d.process?.pid ?? 0))")
            return .success("upgraded \(name) to \(binary) (pid \(d.process?.pid ?? 0); the device was away for \(pause) ms)")
        case .rolledBack(let why):
            Diagnostics.line("device \(name): upgrade to \(binary) failed (\(why)); rolled back to \(old) (pid \(d.process?.pid ?? 0))")
            return .failure(DeviceActionError(description: "upgrade of \(name) to \(binary) failed: \(why); rolled back to \(old)"))
        case .lost(let why, let error):
            return .failure(DeviceActionError(description: "upgrade of \(name) to \(binary) failed (\(why)) and \(old) did not restart either (\(error))"))
        }
    }

    /// Sends the live process its new settings (RECONFIGURE); its reply's status, or nil when
    /// there is no process, the text is too long for the message, or it did not answer in 5 s.
    private func reconfigureInPlace(_ d: ManagedDevice, config: String) -> Int32? {
        guard let payload = Reconfigure(config: config).encode() else { return nil }
        return d.controlChannel.withLock { control -> Int32? in
            guard let control, let (reply, _) = try? control.request(.reconfigure, payload: payload, timeoutMilliseconds: 5000) else { return nil }
            return reply.status
        }
    }

    /// How `replaceProcess` ended.
    private enum Replacement {
        /// The new process runs; when it had taken over.
        case replaced(at: UInt64)
        /// It failed (why); the old one runs again.
        case rolledBack(String)
        /// It failed, and so did the old one; a restart is scheduled.
        case lost(String, any Error)
    }

    /// Stops the device's process cleanly, applies `change` (a new binary, new settings) and
    /// starts it again with the same state; if the new process does not start or dies within the
    /// grace period, `undo` and the old one takes the same state again.
    private func replaceProcess(_ d: ManagedDevice, change: (ManagedDevice) -> Void, undo: (ManagedDevice) -> Void) -> Replacement {
        quiesce(d)
        change(d)
        d.crashTimes = []
        d.restartAt = nil
        var why: String?
        var startedAt: UInt64 = 0
        do {
            try relaunch(d)
            startedAt = monotonicNanoseconds()
            why = diedWithinGrace(d)
        } catch {
            why = "\(error)"
        }
        guard let why else { return .replaced(at: startedAt) }
        quiesce(d)
        undo(d)
        do { try relaunch(d) } catch {
            scheduleRestartAfterFailure(d)
            return .lost(why, error)
        }
        return .rolledBack(why)
    }

    /// Nil when the freshly started process is still alive `upgradeGrace` later; else how it ended.
    private func diedWithinGrace(_ d: ManagedDevice) -> String? {
        guard let p = d.process else { return "it did not start" }
        let ready = try? Poll.wait([Poll.Interest(fd: p.pidfd.rawValue)], timeoutMilliseconds: Int32(Self.upgradeGrace / 1_000_000))
        guard let ready, ready[0] != 0 else { return nil }
        if d.events != nil { serveEvents(d, drainOnly: true) }
        drainStderr(d, final: true)
        let ended = p.reapIfExited() ?? .signalled(SIGKILL)
        let how = describe(ended, of: d) + (d.lastError.map { ": \($0)" } ?? "")
        forgetProcess(d)
        return "it \(how) right after starting"
    }

    /// Stops the live process, if any, the way a VM's stop does: let it take every request already
    /// in its ring, ask it to commit and exit (SHUTDOWN), and kill it if it does not within 1 s.
    /// What it still had in flight is in its state page for the next process.
    private func quiesce(_ d: ManagedDevice) {
        guard let p = d.process else { return }
        d.endpoint.state = .restarting
        let deadline = monotonicNanoseconds() + 1_000_000_000
        while d.endpoint.ring.requestsOutstanding() != 0 && monotonicNanoseconds() < deadline { usleep(200) }
        if let control = d.control { _ = try? control.request(.shutdown, payload: [], timeoutMilliseconds: 1000) }
        if (try? Poll.wait([Poll.Interest(fd: p.pidfd.rawValue)], timeoutMilliseconds: 1000))?.first == 0 { p.signal(SIGKILL) }
        if d.events != nil { serveEvents(d, drainOnly: true) }
        drainStderr(d, final: true)
        p.killAndReap()
        forgetProcess(d)
        d.lastError = nil
    }

    /// The device's process is gone (reaped): nothing of it is left to talk to, and until its
    /// successor's handshake the device is restarting.
    private func forgetProcess(_ d: ManagedDevice) {
        d.process = nil
        d.publishedPid.store(0, ordering: .releasing)
        d.control = nil
        d.events = nil
        d.startedAt = nil
        d.endpoint.state = .restarting
    }

    private func scheduleRestartAfterFailure(_ d: ManagedDevice) {
        let now = monotonicNanoseconds()
        if let delay = recordCrash(d, now: now, uptime: 0) { d.restartAt = now + delay } else { d.endpoint.state = .failed }
    }

    /// Reads what the device wrote to stderr and reports each whole line as `hv: device NAME: …`
    /// (control characters replaced, 300 characters at most, rate-limited). Before the guest
    /// starts, lines are kept as the device's last error instead, so a device that cannot start
    /// still fails hvctl with one line. `final`: the process is gone; report a partial last line
    /// and close the pipe.
    private func drainStderr(_ d: ManagedDevice, final: Bool) {
        guard let pipe = d.stderrPipe else { return }
        var buffer = [UInt8](repeating: 0, count: 4096)
        var ended = false
        while true {
            let n = buffer.withUnsafeMutableBytes { raw in retryOnInterrupt { Glibc.read(pipe.rawValue, raw.baseAddress, raw.count) } }
            if n > 0 {
                d.stderrPartial += buffer.prefix(n)
                // A line longer than anything sensible is cut, not buffered without bound.
                if d.stderrPartial.count > 4096 && !d.stderrPartial.contains(0x0A) { d.stderrPartial.append(0x0A) }
                continue
            }
            ended = n == 0
            break
        }
        var lines = d.stderrPartial.split(separator: 0x0A, omittingEmptySubsequences: false).map(Array.init)
        d.stderrPartial = lines.removeLast()
        if final || ended, !d.stderrPartial.isEmpty {
            lines.append(d.stderrPartial)
            d.stderrPartial = []
        }
        let started = guestStarted.load(ordering: .acquiring)
        for raw in lines where !raw.isEmpty {
            let text = String(decoding: raw.prefix(300).map { $0 < 0x20 || $0 == 0x7F ? UInt8(ascii: "?") : $0 }, as: UTF8.self)
            if !started {
                if d.lastError == nil { d.lastError = text }
                if verbose { Diagnostics.line("device \(d.spec.name): \(text)") }
                continue
            }
            let now = monotonicNanoseconds()
            let dropped = d.stderrLimiter.suppressed
            guard d.stderrLimiter.admit(now: now) else { continue }
            if dropped > 0 {
                d.stderrLimiter.suppressed = 0
                Diagnostics.line("device \(d.spec.name): (\(dropped) lines of its output suppressed)")
            }
            Diagnostics.line("device \(d.spec.name): \(text)")
        }
        if final || ended {
            d.stderrPipe = nil
        }
    }

    private func serveEvents(_ d: ManagedDevice, drainOnly: Bool = false) {
        guard let events = d.events else { return }
        while true {
            let frame: Frame
            do {
                (frame, _) = try events.receive(timeoutMilliseconds: 0)
            } catch {
                switch error {
                case .timedOut: return
                case .closed:
                    d.events = nil  // the pidfd reports the death itself
                    return
                default:
                    Diagnostics.line("device \(d.spec.name) sent a malformed message (\(error)); ignored")
                    if drainOnly { return }
                    continue
                }
            }
            handleEvent(frame, from: d, channel: events)
        }
    }

    private func handleEvent(_ frame: Frame, from d: ManagedDevice, channel: ControlChannel) {
        func answer(_ status: Status) {
            if !frame.flags.contains(.noReply) { try? channel.send(.reply(to: frame, status: status)) }
        }
        if frame.flags.contains(.reply) { return }
        switch MessageType(rawValue: frame.type) {
        case .log?:
            guard let record = try? LogRecord.decode(frame.payload) else { return answer(.malformed) }
            if record.level == .error { d.lastError = record.text }
            // Before the guest starts, a device's error becomes hvctl's one-line failure instead.
            let fatalAtStartup = record.level == .error && !guestStarted.load(ordering: .acquiring)
            // A sandbox report is folded into the death message that follows it.
            let sandboxReport = record.text.hasPrefix("sandbox: denied syscall ")
            if !fatalAtStartup && !sandboxReport && (record.level.rawValue >= LogRecord.Level.warning.rawValue || verbose) {
                Diagnostics.line("\(d.spec.name): \(record.text)")
            }
            answer(.ok)
        case .setBootState?:
            guard d.granted.contains(.bootControl) else { return answer(.denied) }
            guard let state = try? BootState.decode(frame.payload) else { return answer(.malformed) }
            answer(onBootState?(state) ?? .denied)
        case .systemEvent?:
            guard d.granted.contains(.bootControl) else { return answer(.denied) }
            guard let event = try? SystemEvent.decode(frame.payload) else { return answer(.malformed) }
            if verbose { Diagnostics.line("\(d.spec.name): the guest asked for \(event.kind == .powerOff ? "power-off" : "a reset")") }
            onSystemEvent?(event)
            answer(.ok)
        case .setIRQLevel?:
            guard d.granted.contains(.interruptLevel) else { return answer(.denied) }
            guard let level = try? IRQLevel.decode(frame.payload) else { return answer(.malformed) }
            if level.line == IRQLevel.pciINTx {
                return answer(onINTx?(d.endpoint, level.asserted) == true ? .ok : .invalidArgument)
            }
            guard Int(level.line) < d.spec.interruptGSIs.count else { return answer(.invalidArgument) }
            do { try vm.setIRQLine(d.spec.interruptGSIs[Int(level.line)], level: level.asserted) } catch {
                return answer(.internalError)
            }
            answer(.ok)
        case .addDoorbell?:
            guard d.granted.contains(.registerRing) else { return answer(.denied) }
            guard let request = try? DoorbellRequest.decode(frame.payload) else { return answer(.malformed) }
            guard Int(request.resource) < d.spec.resources.count, let doorbells else { return answer(.invalidArgument) }
            do {
                let eventfd = try doorbells.add(request, resource: d.spec.resources[Int(request.resource)], endpoint: d.endpoint)
                try? channel.send(.reply(to: frame), fds: [eventfd.fd.rawValue])
            } catch {
                Diagnostics.line("\(d.spec.name): doorbell refused: \(error)")
                answer(error.status)
            }
        case .setMSIRoute?:
            guard d.granted.contains(.msi) else { return answer(.denied) }
            guard let route = try? MSIRoute.decode(frame.payload) else { return answer(.malformed) }
            do {
                let eventfd = try msiRouter.apply(route, endpoint: d.endpoint)
                try? channel.send(.reply(to: frame), fds: eventfd.map { [$0.fd.rawValue] } ?? [])
            } catch {
                Diagnostics.line("\(d.spec.name): MSI route refused: \(error)")
                answer(error.status)
            }
        default:
            answer(.unknownType)
        }
    }

    /// Whether every device has committed every register access the guest made.
    func ringsDrained() -> Bool {
        devices.allSatisfy { $0.endpoint.state != .running || $0.endpoint.ring.requestsOutstanding() == 0 }
    }

    /// A copy of device `name`'s state page; nil if there is no such device or it cannot be read.
    func statePage(ofDevice name: String) -> [UInt8]? {
        devices.first(where: { $0.spec.name == name })?.readStatePage()
    }

    // MARK: Removable media

    /// Gives `device` a new medium for host file `hostFile` (`file`), or ejects it (`file` nil),
    /// and remembers it for restarts. Safe from any thread; waits for the device's answer.
    func changeMedium(device name: String, hostFile: UInt16, file: FileDescriptor?) throws(MediaChangeError) {
        guard let d = devices.first(where: { $0.spec.name == name }) else {
            throw MediaChangeError(description: "this VM has no device '\(name)'")
        }
        guard d.spec.hostFiles[hostFile] != nil else { throw MediaChangeError(description: "\(name) has no host file \(hostFile)") }
        // An empty memfd stands for "no medium" when a restarted process is handed its files.
        let placeholder: FileDescriptor
        do { placeholder = try file ?? MemFD.create(name: "hv-no-medium", size: 0) } catch {
            throw MediaChangeError(description: "cannot prepare the eject: \(error)")
        }
        let status: Int32? = d.controlChannel.withLock { control -> Int32? in
            guard let control else { return nil }
            let payload = MediaChange(hostFile: UInt32(hostFile), present: file != nil).encode()
            let fds = file.map { [$0.rawValue] } ?? []
            guard let (reply, _) = try? control.request(.mediaChange, payload: payload, fds: fds, timeoutMilliseconds: 5000) else { return -1 }
            return reply.status
        }
        switch status {
        case nil: throw MediaChangeError(description: "\(name) is restarting; try again in a moment")
        case .some(-1): throw MediaChangeError(description: "\(name) did not answer the media change")
        case .some(Status.ok.rawValue):
            d.hostFileOverrides.withLock { $0[hostFile] = placeholder }
        case .some(Status.unknownType.rawValue): throw MediaChangeError(description: "\(name) has no removable medium")
        default: throw MediaChangeError(description: "\(name) refused the medium")
        }
    }

    // MARK: Shutdown

    /// Stops supervising, lets each device finish its ring, asks it to exit, and reaps it.
    func shutdown() {
        stopping.store(true, ordering: .releasing)
        wake.signal()
        if threadRunning.load(ordering: .acquiring) { finished.drain() }
        for d in devices {
            // Everything the guest wrote must reach the device before it goes.
            let deadline = monotonicNanoseconds() + 1_000_000_000
            while d.process != nil && d.endpoint.ring.requestsOutstanding() != 0 && monotonicNanoseconds() < deadline {
                usleep(200)
            }
            d.endpoint.state = .failed
        }
        // Every SHUTDOWN is sent before any reply is awaited, and every process signalled before
        // any is reaped: the devices finish (a disk flushes) and die in parallel, not one by one.
        _ = withEveryControlChannel { channels in
            let sent = channels.map { control in try? control?.sendRequest(.shutdown, payload: []) }
            return zip(channels, sent).map { control, request -> Int32? in
                guard let control, let request else { return nil }
                return (try? control.awaitReply(to: request, timeoutMilliseconds: 1000)).map { $0.0.status }
            }
        }
        for d in devices { d.process?.signal(SIGKILL) }
        for d in devices {
            _ = d.process?.waitForExit()
            d.process = nil
            let dropped = d.endpoint.droppedWrites.load(ordering: .relaxed)
            if dropped > 0 { Diagnostics.line("device \(d.spec.name): \(dropped) guest writes could not be delivered") }
        }
    }
}

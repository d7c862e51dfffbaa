import CHVShim
import Glibc
import HVIPC
import HVSys

/// What a device does with forwarded guest register accesses. All methods run on the device's
/// single runtime thread, so a model needs no locking.
public protocol DeviceModel: AnyObject {
    /// A guest read of `size` bytes (1, 2, 4 or 8) at `offset` within resource `resource`
    /// (an index into `DeviceRuntime.resources`). Already bounds-checked by the runtime.
    func read(resource: Int, offset: UInt64, size: Int) -> UInt64
    /// A guest write. Writes are posted: the vCPU does not wait for them.
    func write(resource: Int, offset: UInt64, size: Int, value: UInt64)
    /// Make the effects of every access handled so far durable (e.g. write buffered output to the
    /// host). The runtime calls this before it commits requests as done and before it answers a
    /// read; a request is replayed after a crash if and only if it was not yet committed.
    func flush()
    /// When, on the monotonic clock (`monotonicNanoseconds()`), the model next needs
    /// `deadlineReached` even if the guest does nothing (a timer interrupt); nil for never.
    func nextDeadline() -> UInt64?
    /// Called on the runtime thread at or after `nextDeadline()`.
    func deadlineReached(now: UInt64)
    /// A snapshot is being taken (only for a device started with the `snapshot` capability):
    /// finish every piece of work taken from guest memory — complete it, so nothing writes guest
    /// memory after this returns — and store the whole state in the state page. `flush()` has
    /// already run and the register ring is committed. Return false if the work could not be
    /// finished: the snapshot is then given up and the device carries on. After this returns
    /// true the runtime serves nothing but the control socket until the core resumes it.
    /// Default: true (a device with nothing in flight whose state page is always current).
    func quiesce() -> Bool
}

extension DeviceModel {
    public func flush() {}
    public func quiesce() -> Bool { true }
    public func nextDeadline() -> UInt64? { nil }
    public func deadlineReached(now: UInt64) {}
}

/// The device-process runtime: handshake with the core, guest-memory mapping, the register-ring
/// loop and the device → core channel. A device's `main` is typically:
///
/// ```swift
/// let runtime = DeviceRuntime.startOrExit(name: "my-device", capabilities: [.registerRing, .statePage])
/// let model = MyModel(runtime: runtime)
/// runtime.run(model)
/// ```
///
/// See `Sources/HVDeviceSDK/README.md` for what a device may assume (its descriptors, its
/// sandbox) and the guarantees the runtime gives.
public final class DeviceRuntime: @unchecked Sendable {
    // @unchecked: a runtime belongs to the device's one thread; nothing here is shared.

    /// The HELLO as received.
    let hello: Hello
    /// Address ranges routed to this device, in the order requests refer to them.
    public var resources: [Resource] { hello.resources }
    /// 0 on the first start; n after the nth restart. A restarted device restores its state
    /// from `statePage` instead of resetting it.
    public var restartGeneration: UInt32 { hello.restartGeneration }
    /// The register ring's committed request index: every request before it has been served and
    /// its effects flushed. While a batch is being served this is where it began; in a restarted
    /// device, where the replay of what its predecessor left uncommitted begins. Nil without a ring.
    public var committedRequestIndex: UInt32? { ring?.committedRequestIndex() }
    /// The capabilities both sides agreed on.
    public let capabilities: Capabilities
    /// Device configuration from the trusted side: HELLO's `key=value` lines, decoded by
    /// `SettingsText` (`--device …,KEY=VALUE` for a plugin; a shipped device decodes its typed
    /// settings from this through its contract module).
    /// After an accepted RECONFIGURE, the new settings.
    public private(set) var config: [String: String]
    /// Guest RAM, if the core handed it over.
    public let guestMemory: GuestMemory?
    /// State that survives restarts, if granted.
    public let statePage: StatePage?
    /// Interrupt lines by line number.
    public let interrupts: [UInt16: InterruptLine]
    /// Host files opened by the trusted side for this device, by index.
    public let hostFiles: [UInt16: FileDescriptor]

    /// The host file in `slot` of the device's contract (e.g. `SCSIContract.HostFile.medium`).
    public func hostFile<Slot: RawRepresentable>(_ slot: Slot) -> FileDescriptor? where Slot.RawValue == UInt16 {
        hostFiles[slot.rawValue]
    }

    private let control: ControlChannel
    private let events: ControlChannel
    private let ring: RegisterRing?
    private let kick: EventFD?
    private let reply: EventFD?
    private var watchers: [(fd: Int32, enabled: () -> Bool, handler: () -> Void)] = []
    /// Watchers that are doorbells: polled on every pass of the spin loop, and served only after
    /// the register ring (see `watchDoorbell`).
    private var doorbellWatchers = 0
    /// Set while `run` is active: serves the register ring up to its published index now.
    private var catchUp: (() -> Void)?
    private let name: String

    /// Called on the runtime thread (between batches of register accesses) when the operator
    /// inserts a medium (`file` is its descriptor) or ejects it (`file` nil) for host file
    /// `hostFile`; return false to refuse (INVALID_ARGUMENT). Leave nil if the device has no
    /// removable media: MEDIA_CHANGE is then answered UNKNOWN_TYPE.
    public var onMediaChange: ((_ hostFile: UInt32, _ file: FileDescriptor?) -> Bool)?

    /// Called on the runtime thread (between batches of register accesses) when the operator
    /// changes the device's settings while it runs (RECONFIGURE, `hvctl set`, `hvctl balloon`):
    /// `config` is the whole new configuration, decoded like HELLO's. Apply it in place and
    /// return true (`config` then reads the new settings), or return false to refuse it and keep
    /// the old ones. Leave nil if the device cannot change settings in place: the core then
    /// restarts it with the new ones (the guest sees a short pause; state-page state is kept).
    public var onReconfigure: ((_ config: [String: String]) -> Bool)?

    /// How long the ring loop spins on an empty ring before sleeping, in nanoseconds.
    public var spinNanoseconds: UInt64 = 50_000

    /// Connects to the core on the inherited descriptors and completes the handshake; on any
    /// failure prints one line to stderr and exits with status 2. Waits for the core's HELLO
    /// with no deadline: the core may start the process long before it needs it (a migration's
    /// destination does), and a core that goes away ends the wait.
    ///
    /// A device that can be snapshotted asks for `.snapshot` (with `.statePage`) and names the
    /// version of its state page layout in `stateVersion` (1 or more; bump it whenever the layout
    /// changes): a snapshot records it, and a restore with another version is refused.
    public static func startOrExit(name: String, capabilities: Capabilities, stateVersion: UInt16 = 0) -> DeviceRuntime {
        dieWithParent()
        lockDown(name)
        do {
            return try DeviceRuntime(name: name, capabilities: capabilities, stateVersion: stateVersion)
        } catch {
            fail(name, "\(error)")
        }
    }

    /// Connects and handshakes, throwing on failure. See `startOrExit` for `stateVersion`.
    public init(name: String, capabilities wanted: Capabilities, stateVersion: UInt16 = 0) throws(DeviceError) {
        guard !wanted.contains(.snapshot) || (wanted.contains(.statePage) && stateVersion > 0) else {
            throw .protocolViolation("a device asking for .snapshot needs .statePage and a stateVersion of 1 or more")
        }
        self.name = name
        control = ControlChannel(socket: SeqPacketSocket(adopting: FileDescriptor(owning: InheritedDescriptor.control)))
        events = ControlChannel(socket: SeqPacketSocket(adopting: FileDescriptor(owning: InheritedDescriptor.events)))
        let frame: Frame
        var fds: [FileDescriptor]
        // No deadline: the core may start a device well before it needs it (a migration's
        // destination starts them as memory starts arriving) and sends HELLO when it does. A
        // core that goes away closes the socket, which ends this wait.
        do { (frame, fds) = try control.receive(timeoutMilliseconds: -1) } catch { throw .channel(error) }
        guard frame.type == MessageType.hello.rawValue, !frame.flags.contains(.reply) else {
            throw .protocolViolation("first message is type 0x\(String(frame.type, radix: 16)), expected HELLO")
        }
        let hello: Hello
        do { hello = try Hello.decode(frame.payload) } catch {
            try? control.send(.reply(to: frame, status: .malformed))
            throw .protocolViolation("HELLO: \(error)")
        }
        guard hello.major == ProtocolVersion.major else {
            try? control.send(.reply(to: frame, status: .unsupportedVersion))
            throw .protocolViolation("protocol major version \(hello.major), this SDK speaks \(ProtocolVersion.major)")
        }
        guard hello.fds.count == fds.count else {
            try? control.send(.reply(to: frame, status: .malformed))
            throw .protocolViolation("HELLO lists \(hello.fds.count) descriptors but \(fds.count) arrived")
        }
        self.hello = hello
        capabilities = wanted.intersection(hello.capabilities)
        config = SettingsText.decode(hello.config)

        var memory: GuestMemory?
        var ring: RegisterRing?
        var kick: EventFD?
        var reply: EventFD?
        var state: StatePage?
        var interrupts: [UInt16: InterruptLine] = [:]
        var host: [UInt16: FileDescriptor] = [:]
        for (assignment, fd) in zip(hello.fds, fds) {
            switch assignment.role {
            case .guestMemory: memory = try GuestMemory(fd: fd, regions: hello.memoryRegions)
            case .registerRing:
                do { ring = try RegisterRing(attaching: fd) } catch { throw .ring(error) }
            case .ringKick, .ringReply:
                // Doorbells are drained opportunistically; a blocking one would hang the loop.
                do { try fd.setNonBlocking(true) } catch { throw .system(error) }
                if assignment.role == .ringKick { kick = EventFD(adopting: fd) } else { reply = EventFD(adopting: fd) }
            case .statePage: state = try StatePage(fd: fd)
            case .interrupt: interrupts[assignment.index] = InterruptLine(doorbell: EventFD(adopting: fd))
            case .hostIO: host[assignment.index] = fd
            }
        }
        fds.removeAll()
        if capabilities.contains(.registerRing) && (ring == nil || kick == nil || reply == nil) {
            throw .protocolViolation("register ring granted without its ring, kick and reply descriptors")
        }
        guestMemory = memory
        self.ring = ring
        self.kick = kick
        self.reply = reply
        statePage = state
        self.interrupts = interrupts
        hostFiles = host
        let minor = min(hello.minor, ProtocolVersion.minor)
        do {
            let version = capabilities.contains(.snapshot) ? stateVersion : 0
            try control.send(.reply(to: frame, payload: HelloReply(minor: minor, capabilities: capabilities, name: name,
                                                                   stateVersion: version).encode()))
        } catch { throw .channel(error) }
        if capabilities.contains(.dirtyLog), let memory { try Self.receiveDirtyLog(control, memory) }
    }

    /// SET_DIRTY_LOG, which the core sends right after a HELLO reply that accepted `.dirtyLog`.
    private static func receiveDirtyLog(_ control: ControlChannel, _ memory: GuestMemory) throws(DeviceError) {
        let frame: Frame
        let fds: [FileDescriptor]
        do { (frame, fds) = try control.receive(timeoutMilliseconds: 10_000) } catch { throw .channel(error) }
        guard frame.type == MessageType.setDirtyLog.rawValue, !frame.flags.contains(.reply), fds.count == 1 else {
            try? control.send(.reply(to: frame, status: .malformed))
            throw .protocolViolation("expected SET_DIRTY_LOG with one descriptor after HELLO, got type 0x\(String(frame.type, radix: 16)) with \(fds.count)")
        }
        do {
            memory.dirtyLog = try DirtyPageBitmap(fd: fds[0], memoryBytes: memory.memfdBytes)
        } catch {
            try? control.send(.reply(to: frame, status: .malformed))
            throw .system(error)
        }
        do { try control.send(.reply(to: frame)) } catch { throw .channel(error) }
    }

    /// Descriptor on which a sandboxed device finds its lock-down seccomp filter (classic BPF).
    public static let lockDownFilterDescriptor: Int32 = LockDown.filterDescriptor

    /// Under hv's sandbox, installs the stricter second-stage seccomp filter that the core
    /// compiled from the device's profile (no execve, no open), and makes the process
    /// non-dumpable. Runs before the first message is read: no untrusted input has been seen yet.
    /// A denied syscall traps: the core hears which one, then the device exits.
    static func lockDown(_ name: String) {
        // One malloc arena for every thread: glibc gives each new thread's allocations an mmap'd
        // heap of its own, and shrinking such a heap reads /proc/sys/vm/overcommit_memory
        // (openat), which the sandbox refuses: a device whose I/O threads free large buffers
        // (hv-scsi on qcow2) was killed now and then. The main arena trims with brk instead.
        _ = hv_malloc_arena_max(1)
        do throws(LockDown.Failure) { try LockDown.apply(reportingDeniedSyscallsTo: InheritedDescriptor.events) } catch {
            fail(name, error.description)
        }
    }

    // MARK: Device → core

    /// Sends a log line to the core, which prints it with this device's name. Never blocks on the core.
    public func log(_ level: LogRecord.Level, _ text: String) {
        try? events.notify(.log, payload: LogRecord(level: level, text: text).encode())
    }

    /// Asks the core to set the boot vCPU's entry state (requires `bootControl`).
    public func setBootState(_ state: BootState) throws(DeviceError) {
        do { _ = try events.request(.setBootState, payload: state.encode(), timeoutMilliseconds: 10_000) } catch { throw .channel(error) }
    }

    /// Tells the core the guest powered the machine off or asked for a reset (requires
    /// `bootControl`). The core stops the vCPUs when it takes the message; on a reset it builds
    /// the VM afresh, so this process ends either way.
    public func signalSystemEvent(_ kind: SystemEvent.Kind) {
        // Waits for the core's answer: by the time the guest's register write that caused this is
        // committed, the core has taken the event (it must not mistake the halt that follows for
        // a power-off).
        _ = try? events.request(.systemEvent, payload: SystemEvent(kind).encode(), timeoutMilliseconds: 1000)
    }

    /// Drives a level-triggered interrupt line (requires `interruptLevel`). With `wait`, returns
    /// only once the core has applied it: lower a line that way inside a register read that
    /// acknowledges the interrupt, so the guest never sees the acknowledgement before the line
    /// drops (it would take the interrupt again, or a spurious one).
    public func setInterruptLevel(line: UInt32, asserted: Bool, wait: Bool = false) {
        let payload = IRQLevel(line: line, asserted: asserted).encode()
        if wait {
            _ = try? events.request(.setIRQLevel, payload: payload, timeoutMilliseconds: 1000)
        } else {
            try? events.notify(.setIRQLevel, payload: payload)
        }
    }

    /// Asks the core for a doorbell (KVM ioeventfd) on the register at `offset` of resource
    /// `resource`: guest writes of `length` bytes there (0: any width, MMIO only) then signal the
    /// returned eventfd instead of arriving on the register ring — no exit to the core, no ring
    /// entry. Nil when the core refuses (the register keeps working through the ring). Watch the
    /// eventfd with `watchDoorbell`.
    public func addDoorbell(resource: Int, offset: UInt32, length: UInt32) -> EventFD? {
        let request = DoorbellRequest(resource: UInt32(resource), offset: offset, length: length)
        guard let (reply, fds) = try? events.request(.addDoorbell, payload: request.encode(), timeoutMilliseconds: 1000),
              reply.status == Status.ok.rawValue, fds.count == 1 else { return nil }
        try? fds[0].setNonBlocking(true)
        return EventFD(adopting: fds[0])
    }

    /// Calls `handler` on the runtime thread when `doorbell` rings, after serving every register
    /// access the guest made before it: a doorbell write bypasses the ring, so without this a
    /// notification could overtake the configuration writes that preceded it. The eventfd is
    /// drained before `handler` runs.
    public func watchDoorbell(_ doorbell: EventFD, _ handler: @escaping () -> Void) {
        watchers.append((doorbell.fd.rawValue, { true }, { [unowned self] in
            _ = doorbell.drain()
            catchUp?()
            handler()
        }))
        doorbellWatchers += 1
    }

    /// Routes MSI-X vector `vector` of the device's PCI function to the message the guest
    /// programmed (requires `msi`); returns the vector's eventfd, which delivers the message once
    /// per `signal()`. Nil when the core refuses (e.g. an address outside the local APIC window).
    public func routeMSI(vector: UInt32, address: UInt64, data: UInt32) -> EventFD? {
        let route = MSIRoute(vector: vector, enabled: true, address: address, data: data)
        guard let (reply, fds) = try? events.request(.setMSIRoute, payload: route.encode(), timeoutMilliseconds: 1000),
              reply.status == Status.ok.rawValue, fds.count == 1 else { return nil }
        return EventFD(adopting: fds[0])
    }

    /// Calls `handler` on the runtime thread whenever `fd` is readable and `enabled()` is true
    /// (e.g. only while the device has room for input, so a full FIFO doesn't spin the loop).
    /// Handlers run between committed batches of register accesses, never in the middle of one.
    public func watch(fd: Int32, enabled: @escaping () -> Bool = { true }, _ handler: @escaping () -> Void) {
        watchers.append((fd, enabled, handler))
    }

    // MARK: The loop

    /// Serves register accesses and watched descriptors until the core says SHUTDOWN or goes away.
    public func run(_ model: some DeviceModel) -> Never {
        // A restarted device first finishes what the dead one left uncommitted.
        let start = ring?.committedRequestIndex() ?? 0
        let loop = LoopState(cursor: start, spinStart: monotonicNanoseconds(), committed: start)
        finalCommit = { [unowned self] in commit(model, loop, now: monotonicNanoseconds()) }
        catchUp = { [unowned self] in _ = serveRing(model, loop) }
        quiesceModel = { [unowned self] in
            // Whatever the core queued before the pause is served and committed first.
            catchUp?()
            finalCommit?()
            return model.quiesce()
        }
        while true { iterate(model, loop) }
    }

    /// The ring loop's state between iterations.
    /// A class, not a struct: SHUTDOWN handling commits from inside an iteration, and an
    /// `inout` struct would make that an exclusivity violation.
    final class LoopState {
        var cursor: UInt32
        var spinStart: UInt64
        var lastOthersPoll: UInt64 = 0
        /// Requests before this index are committed (their effects flushed).
        var committed: UInt32
        var lastCommit: UInt64 = 0
        /// The model's next deadline as last asked (re-asked after accesses and after it fires).
        var deadline: UInt64?
        var deadlineKnown = false
        init(cursor: UInt32, spinStart: UInt64, committed: UInt32) {
            self.cursor = cursor
            self.spinStart = spinStart
            self.committed = committed
        }
    }

    /// Flushes the model and commits everything served so far. Batching this (instead of once
    /// per access) keeps a polling guest from paying a host write(2) per register access; a crash
    /// replays at most the uncommitted batch, exactly, because its effects were never externalised.
    private func commit(_ model: some DeviceModel, _ loop: LoopState, now: UInt64) {
        guard let ring, loop.committed != loop.cursor else { return }
        model.flush()
        ring.commitRequests(upTo: loop.cursor)
        loop.committed = loop.cursor
        loop.lastCommit = now
    }

    /// A watcher's handler ran (a doorbell, a host descriptor): it may have changed the model's
    /// next deadline (a rate limiter that stopped taking requests), so it is asked again.
    private var handlersRan = false

    /// Set while `run` is active: flush and commit before the process exits on SHUTDOWN.
    private var finalCommit: (() -> Void)?
    /// Set while `run` is active: serve, commit and quiesce the model (QUIESCE).
    private var quiesceModel: (() -> Bool)?

    // One pass of the loop, kept out of line: Swift 6.3's loop-invariant code motion never
    // finishes on the whole loop inlined into `run` (release builds hang).
    @inline(never)
    private func iterate(_ model: some DeviceModel, _ loop: LoopState) {
        let served = serveRing(model, loop)
        var now = monotonicNanoseconds()
        if served || !loop.deadlineKnown || handlersRan {
            handlersRan = false
            loop.deadline = model.nextDeadline()
            loop.deadlineKnown = true
        }
        if let deadline = loop.deadline, deadline <= now {
            model.deadlineReached(now: now)
            loop.deadline = model.nextDeadline()
            now = monotonicNanoseconds()
        }
        if let ring, loop.cursor &- loop.committed >= ring.requestCapacity / 2 || now &- loop.lastCommit > 1_000_000 {
            commit(model, loop, now: now)
        }
        // Watched fds and the control socket get a look every millisecond even while the
        // ring is busy: a guest polling a status register must not starve host input.
        if now &- loop.lastOthersPoll > 1_000_000 {
            commit(model, loop, now: now)  // watchers run between committed batches
            loop.lastOthersPoll = now
            pollOthers(timeout: 0)
        }
        if served {
            loop.spinStart = now
            return
        }
        if ring != nil && now &- loop.spinStart < spinNanoseconds {
            // Doorbells bypass the ring: look at them while spinning too, or a busy device would
            // see them only once a millisecond.
            if doorbellWatchers > 0 { pollOthers(timeout: 0) }
            return
        }
        commit(model, loop, now: now)  // never sleep on uncommitted work
        if let ring, ring.setRequestConsumerSleeping(true, cursor: loop.cursor) {
            ring.setRequestConsumerSleeping(false, cursor: loop.cursor)
            return
        }
        // Sleep until a kick, a descriptor, or the model's next deadline.
        var timeout: Int32 = -1
        if let deadline = loop.deadline {
            timeout = deadline <= now ? 0 : Int32(min((deadline - now + 999_999) / 1_000_000, UInt64(Int32.max)))
        }
        pollOthers(timeout: timeout)
        ring?.setRequestConsumerSleeping(false, cursor: loop.cursor)
        kick?.drain()
        loop.spinStart = monotonicNanoseconds()
        loop.lastOthersPoll = loop.spinStart
    }

    /// Serves the ring up to its published index; whether there was anything.
    private func serveRing(_ model: some DeviceModel, _ loop: LoopState) -> Bool {
        guard let ring else { return false }
        let published = ring.publishedRequestIndex()
        guard published != loop.cursor else { return false }
        loop.cursor = serve(ring: ring, model: model, from: loop.cursor, to: published)
        return true
    }

    private func serve(ring: RegisterRing, model: some DeviceModel, from start: UInt32, to end: UInt32) -> UInt32 {
        var index = start
        // Never trust the distance: a corrupt index must not make us spin over garbage forever.
        let count = min(end &- start, ring.requestCapacity)
        for _ in 0..<count {
            if let request = ring.request(at: index) {
                if ring.isPoisoned(index) {
                    // It killed this device on every replay: answer it without serving it.
                    if request.operation.isRead { respond(to: request, with: ~0, ring: ring) }
                    log(.warning, "skipped the guest access that crashed this device on every replay (\(request.operation), resource \(request.resource), offset 0x\(String(request.offset, radix: 16)))")
                } else {
                    // Where a crash happens, for the core: a request that kills us on every replay is skipped.
                    ring.beginServing(index)
                    handle(request, at: index, ring: ring, model: model)
                    ring.endServing()
                }
            } else {
                log(.error, "ignored a register request with an unknown operation at index \(index)")
            }
            index &+= 1
        }
        return index
    }

    /// Answers a read, waking the core if it sleeps on the response ring.
    private func respond(to request: RegisterRequest, with value: UInt64, ring: RegisterRing) {
        while !ring.pushResponse(RegisterResponse(tag: request.tag, data: value)) {
            // The core consumes responses as it waits for them; a full ring means it is behind.
            sched_yield()
        }
        if ring.responseConsumerNeedsWakeup() { reply?.signal() }
    }

    private func handle(_ request: RegisterRequest, at index: UInt32, ring: RegisterRing, model: some DeviceModel) {
        let size = Int(request.size)
        let valid: Bool = {
            guard [1, 2, 4, 8].contains(size), Int(request.resource) < resources.count else { return false }
            let res = resources[Int(request.resource)]
            return res.kind.accepts(request.operation) && request.offset < res.length && UInt64(size) <= res.length - request.offset
        }()
        if request.operation.isRead {
            let value: UInt64
            if valid {
                // Ordered after every earlier write: the model applied them in order. Their host-
                // visible effects wait for the next commit (the guest cannot observe them sooner).
                value = model.read(resource: Int(request.resource), offset: request.offset, size: size)
            } else {
                value = ~0
            }
            respond(to: request, with: value, ring: ring)
        } else if valid {
            model.write(resource: Int(request.resource), offset: request.offset, size: size, value: request.data)
        }
        if !valid {
            log(.warning, "refused an out-of-range register request (resource \(request.resource), offset 0x\(String(request.offset, radix: 16)), size \(size))")
        }
    }

    private func pollOthers(timeout: Int32) {
        var interests = [Poll.Interest(fd: control.socket.fd.rawValue)]
        if let kick { interests.append(.init(fd: kick.fd.rawValue)) }
        let watchBase = interests.count
        // A disabled watcher polls fd -1, which poll(2) skips.
        interests += watchers.map { Poll.Interest(fd: $0.enabled() ? $0.fd : -1) }
        guard let revents = try? Poll.wait(interests, timeoutMilliseconds: timeout) else { return }
        if revents[0] != 0 { serviceControl() }
        for (i, watcher) in watchers.enumerated() where revents[watchBase + i] != 0 && interests[watchBase + i].fd >= 0 {
            watcher.handler()
            handlersRan = true
        }
    }

    private func serviceControl() {
        let frame: Frame
        let fds: [FileDescriptor]
        do { (frame, fds) = try control.receive(timeoutMilliseconds: 0) } catch {
            if case .closed = error {
                finalCommit?()
                exit(0)  // the core is gone; so are we
            }
            if case .timedOut = error { return }
            Self.fail(name, "control channel: \(error)")
        }
        guard !frame.flags.contains(.reply) else { return }
        switch MessageType(rawValue: frame.type) {
        case .shutdown?:
            finalCommit?()
            try? control.send(.reply(to: frame))
            exit(0)
        case .ping?, .resume?:
            try? control.send(.reply(to: frame))
        case .quiesce?:
            guard capabilities.contains(.snapshot), let quiesceModel else {
                return (try? control.send(.reply(to: frame, status: .unknownType))) ?? ()
            }
            guard quiesceModel() else { return (try? control.send(.reply(to: frame, status: .internalError))) ?? () }
            try? control.send(.reply(to: frame))
            stayQuiesced()
        case .mediaChange?:
            guard let handler = onMediaChange else { return (try? control.send(.reply(to: frame, status: .unknownType))) ?? () }
            guard let change = try? MediaChange.decode(frame.payload), fds.count == (change.present ? 1 : 0) else {
                return (try? control.send(.reply(to: frame, status: .malformed))) ?? ()
            }
            let accepted = handler(change.hostFile, fds.first)
            try? control.send(.reply(to: frame, status: accepted ? .ok : .invalidArgument))
        case .reconfigure?:
            guard let handler = onReconfigure else { return (try? control.send(.reply(to: frame, status: .unknownType))) ?? () }
            guard fds.isEmpty, let change = try? Reconfigure.decode(frame.payload) else {
                return (try? control.send(.reply(to: frame, status: .malformed))) ?? ()
            }
            let settings = SettingsText.decode(change.config)
            let accepted = handler(settings)
            if accepted { config = settings }
            try? control.send(.reply(to: frame, status: accepted ? .ok : .invalidArgument))
        default:
            if !frame.flags.contains(.noReply) { try? control.send(.reply(to: frame, status: .unknownType)) }
        }
    }

    /// After QUIESCE: serves nothing but the control socket — no ring, no watcher, no deadline —
    /// until RESUME (return) or SHUTDOWN (exit). The state is committed, so either is safe.
    private func stayQuiesced() {
        while true {
            let frame: Frame
            do { (frame, _) = try control.receive(timeoutMilliseconds: 60_000) } catch {
                if case .timedOut = error { continue }
                exit(0)  // the core is gone; everything was committed before QUIESCE's reply
            }
            guard !frame.flags.contains(.reply) else { continue }
            switch MessageType(rawValue: frame.type) {
            case .resume?:
                try? control.send(.reply(to: frame))
                return
            case .ping?, .quiesce?:
                try? control.send(.reply(to: frame))
            case .shutdown?:
                try? control.send(.reply(to: frame))
                exit(0)
            default:
                // A medium change waits for the resume: the core does not send one meanwhile.
                if !frame.flags.contains(.noReply) { try? control.send(.reply(to: frame, status: .denied)) }
            }
        }
    }

    /// Prints `name: message` to stderr and exits with status 2.
    public static func fail(_ name: String, _ message: String) -> Never {
        let line = "\(name): \(message)\n"
        _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
        exit(2)
    }
}

import CHVShim
import Glibc
import HVIPC
import HVKVM
import HVSys
import Synchronization

/// How a VM ended.
public enum MachineExit: Sendable, Equatable {
    /// Every vCPU halted with interrupts disabled (or was never started): the guest is done.
    case poweredOff
    /// The guest asked for a platform reset (i8042, port 0xCF9 or 0x92). The caller decides whether
    /// to build the VM afresh (a reboot) or to end.
    case resetRequested
    /// The operator asked for the stop (`hvctl stop NAME`).
    case stopRequested
    /// The operator typed the console escape sequence.
    case userQuit
    /// SIGINT, SIGTERM or SIGHUP.
    case signal(Int32)
    /// Triple fault, KVM error or a fatal core error, with a one-line reason.
    case failure(String)
    /// The VM now runs on another host (`hvctl migrate`); this copy is done.
    case migrated
}

/// A VM: KVM, guest RAM, vCPU threads, the I/O bus and the supervised device processes.
public final class Machine: @unchecked Sendable {
    // @unchecked: configuration is immutable; cross-thread state is atomic or under Mutex.
    public struct Configuration: Sendable {
        public var memoryBytes: UInt64
        public var cpus: Int
        public var devices: [DeviceSpec]
        public var verbose: Bool
        /// A memfd the BIOS device fills with the firmware image; the core maps it read-only just
        /// below 4 GiB, where the reset vector lives. Nil for direct (multiboot) boot.
        public var firmwareROM: FileDescriptor?
        /// A snapshot to bring back instead of booting (`hvctl run --restore`): its memory size,
        /// vCPUs and devices must be the ones configured here.
        public var restore: MachineSnapshot?
        /// With `restore` (or an incoming migration): leave the vCPUs paused (`resume()` starts them).
        public var startPaused: Bool
        /// A live migration arriving (`hvctl run --incoming`, its header received and its RAM
        /// allocated): the VM is built and its device processes started while memory is still
        /// being copied, with no `restore`; the state comes at the switch-over, through
        /// `applyArrivedState`, before `run`.
        public var incoming: IncomingMigration?
        /// A KVM VM made ahead, its first memory slot's fixed cost paid meanwhile (hvctl makes
        /// one as soon as it has its cgroups, so the wait is over before the devices are up). An
        /// incoming migration brings its own.
        public var preparedVM: PreparedVM?
        public init(memoryBytes: UInt64, cpus: Int, devices: [DeviceSpec], verbose: Bool = false,
                    firmwareROM: FileDescriptor? = nil, restore: MachineSnapshot? = nil, startPaused: Bool = false,
                    incoming: IncomingMigration? = nil, preparedVM: PreparedVM? = nil) {
            self.incoming = incoming
            self.preparedVM = preparedVM
            self.memoryBytes = memoryBytes
            self.cpus = cpus
            self.devices = devices
            self.verbose = verbose
            self.firmwareROM = firmwareROM
            self.restore = restore
            self.startPaused = startPaused
        }
    }

    /// Largest vCPU count accepted (the in-kernel xAPIC's 8-bit IDs, minus the IOAPIC's).
    public static let maximumCPUs = 254

    let configuration: Configuration
    let kvm: KVM
    let vm: VirtualMachine
    let ram: GuestRAM
    let firmwareMapping: SharedMapping?
    /// RAM and firmware slots, registered with KVM while the devices start.
    private let memorySlots: MemorySlotRegistration
    let vcpus: [VCPU]
    private let bus = IOBus()
    let pci: PCIBus
    let supervisor: DeviceSupervisor
    private let bootState = Mutex<BootState?>(nil)
    private let outcome = Mutex<MachineExit?>(nil)
    private let stopping = Atomic<Bool>(false)
    private let threads = Mutex<[pthread_t]>([])
    /// Halt probe: generation asked by the monitor, and per vCPU the last generation answered
    /// (shifted left by one) plus a "halted with IF=0" bit.
    private let probeGeneration = Atomic<UInt64>(0)
    private let probeAnswers: [ProbeAnswer]
    /// Every vCPU's halt statistics, when the kernel has them for all: a probe then kicks the
    /// vCPUs only once each is blocked in a halt it has not answered for yet.
    private let vcpuStatistics: [VCPUStatistics]?
    private final class ProbeAnswer: Sendable {
        let value = Atomic<UInt64>(0)
        /// What the vCPU was doing when last seen (VCPUState's raw value) and, when asked for, its RIP.
        let state = Atomic<UInt8>(VCPUState.notStarted.rawValue)
        let rip = Atomic<UInt64>(0)
        /// Exits to user space by kind, counted by the vCPU's own thread (relaxed: a counter read
        /// by status may lag by an exit, never tear).
        let exits = ExitCounts()
    }

    // Pause: vCPU threads park outside KVM_RUN while `pauseRequested` is set.
    private let pauseRequested = Atomic<Bool>(false)
    /// Readable from `resume()` (or `stop`) until the next `pause()`: parked vCPUs wait on it,
    /// so they run again at once rather than at their next poll.
    private let unparked: EventFD
    private let parkedVCPUs = Atomic<Int>(0)
    private let liveVCPUThreads = Atomic<Int>(0)
    /// Serialises pause and resume; holds the kvmclock read at the pause.
    let pauseState = Mutex<(paused: Bool, clock: UInt64?, since: UInt64)>((false, nil, 0))
    /// The CPUID table the guest sees (before the per-vCPU APIC IDs); a snapshot keeps it.
    let cpuidTable: [kvm_cpuid_entry2]
    /// Serialises snapshots (one at a time per VM).
    let snapshotLock = Mutex(())
    /// Set while a status request wants every vCPU's RIP; the next probe records it.
    private let registersWanted = Atomic<Bool>(false)
    /// The saved machine this VM carries on from (a snapshot, or a migration's state), once it
    /// is in place; nil for a VM that boots.
    private let restored = Mutex<MachineSnapshot?>(nil)

    /// Builds the VM and its platform. Nothing runs yet.
    public init(_ configuration: Configuration) throws(CoreError) {
        self.configuration = configuration
        guard (1...Self.maximumCPUs).contains(configuration.cpus) else {
            throw .configuration("--cpus \(configuration.cpus) is out of range: use 1 to \(Self.maximumCPUs)")
        }
        // Conflicting devices are refused before any resource is taken.
        try ResourceClaims.check(configuration.devices)
        let arriving = configuration.incoming
        let prepared = arriving?.takePreparedVM() ?? configuration.preparedVM
        if let prepared {
            kvm = prepared.kvm
            vm = prepared.vm
        } else {
            do {
                kvm = try KVM()
                vm = try kvm.createVM()
                try vm.createPlatform()
            } catch { throw .kvm(error) }
        }
        if let arriving {
            guard let received = arriving.ram, received.size == configuration.memoryBytes, configuration.restore == nil,
                  let hello = arriving.hello, hello.cpus == configuration.cpus else {
                throw .configuration("the incoming migration's memory or vCPUs do not match this VM")
            }
            ram = received
        } else {
            ram = try GuestRAM(size: configuration.memoryBytes)
        }
        let romMapping: SharedMapping?
        if let rom = configuration.firmwareROM {
            let size: Int64
            do { size = try rom.size() } catch { throw .system(error) }
            guard size >= 65536, size <= 16 << 20, size % 65536 == 0 else {
                throw .configuration("firmware ROM of \(size) bytes: it must be a multiple of 64 KiB, at most 16 MiB")
            }
            do { romMapping = try SharedMapping(fd: rom, count: Int(size), readOnly: true) } catch { throw .system(error) }
        } else {
            romMapping = nil
        }
        firmwareMapping = romMapping
        // Registered while the devices start; `run` waits for it before any vCPU runs. A VM that
        // arrives by migration registers nothing yet (RAM registered with KVM while the copy
        // writes it made the copy slow and erratic here): only the first slot's fixed cost is
        // paid, with a slot made and deleted (by `PreparedVM` while hvctl waited for the source,
        // else now), so the real ones take ~0.1 ms in the pause.
        if arriving != nil {
            memorySlots = prepared?.warmUp ?? MemorySlotRegistration.start { [vm, ram] () throws(KVMError) in
                try vm.warmUpMemorySlots(scratchPage: ram.mapping.base)
            }
        } else {
            // After a prepared VM's warm-up (begun long before), the real slots take ~0.1 ms.
            let warmUp = prepared?.warmUp
            memorySlots = MemorySlotRegistration.start { [vm, ram] () throws(KVMError) in
                try warmUp?.wait()
                try Self.registerMemory(ram, firmware: romMapping, with: vm)
            }
        }
        do throws(KVMError) {
            let supported = try kvm.supportedCPUID()
            var cpuid = supported
            // The guest keeps the CPU it saw; a host that cannot offer all of it is refused.
            if let saved = configuration.restore?.cpuid ?? arriving?.hello?.cpuid {
                let missing = MachineSnapshot.missingFeatures(saved: saved, host: supported)
                guard missing.isEmpty else {
                    throw KVMError.invalidState("this host's CPU lacks features the guest saw: \(missing.prefix(8).joined(separator: ", "))\(missing.count > 8 ? ", …" : ""); restore it on a host with the same CPU")
                }
                cpuid = saved
            }
            var list: [VCPU] = []
            for id in 0..<configuration.cpus {
                let vcpu = try vm.createVCPU(id: UInt32(id))
                try vcpu.setCPUID(cpuid)
                list.append(vcpu)
            }
            vcpus = list
            cpuidTable = cpuid
        } catch { throw .kvm(error) }
        probeAnswers = (0..<configuration.cpus).map { _ in ProbeAnswer() }
        let statistics = vcpus.compactMap { $0.openStatistics() }
        vcpuStatistics = statistics.count == vcpus.count ? statistics : nil
        do { unparked = try EventFD(nonBlocking: true) } catch { throw .system(error) }
        supervisor = try DeviceSupervisor(specs: configuration.devices, memory: ram, vm: vm, verbose: configuration.verbose)
        // Memory BARs may go anywhere that is not RAM, the firmware ROM, the IOAPIC or local APIC
        // windows, or another device's range.
        let ramRegions = ram.regions.map { ($0.guestPhysicalAddress, $0.size) }
        let romStart = firmwareMapping.map { (1 << 32) - UInt64($0.count) }
        let mmio = bus
        pci = PCIBus(bus: bus) { base, length in
            let (end, overflow) = base.addingReportingOverflow(length)
            guard !overflow else { return false }
            func overlaps(_ start: UInt64, _ size: UInt64) -> Bool { base < start &+ size && start < end }
            if ramRegions.contains(where: { overlaps($0.0, $0.1) }) { return false }
            if let romStart, overlaps(romStart, (1 << 32) - romStart) { return false }
            if overlaps(0xFEC0_0000, 0x1000) || overlaps(0xFEE0_0000, 0x10_0000) { return false }
            if overlaps(VirtualMachine.identityMapAddress, 0x4000) { return false }  // KVM's identity map and TSS
            return mmio.mmioIsFree(base: base, length: length)
        }
        bus.pciHost = pci
        let machineVM = vm
        pci.setIRQLine = { irq, level in try? machineVM.setIRQLine(irq, level: level) }
        supervisor.onINTx = { [pci] endpoint, level in pci.setINTx(endpoint: endpoint, asserted: level) }
        let fixedBases = supervisor.devices.map { (ObjectIdentifier($0.endpoint), $0.spec.resources) }
        let doorbells = DoorbellTable(vm: vm, verbose: configuration.verbose) { [pci] endpoint, resource in
            guard let resources = fixedBases.first(where: { $0.0 == ObjectIdentifier(endpoint) })?.1,
                  Int(resource) < resources.count else { return nil }
            let r = resources[Int(resource)]
            switch r.kind {
            case .pio, .mmio: return r.base
            case .pciMMIOBar, .pciPIOBar: return pci.routedAddress(endpoint: endpoint, resource: resource)
            case .pciConfig: return nil
            }
        }
        supervisor.doorbells = doorbells
        pci.onBARMoved = { endpoint, resource, base in doorbells.resourceMoved(endpoint: endpoint, resource: resource, base: base) }
        for d in supervisor.devices {
            // Functions first, so each BAR finds its function whatever the resource order.
            for (i, r) in d.spec.resources.enumerated() where r.kind == .pciConfig {
                guard let bdf = PCIBus.bdf(r.base), r.length == 256 else {
                    throw .configuration("\(d.spec.name): PCI_CONFIG resource \(i) must be base = bus/device/function, length 256")
                }
                try pci.addFunction(bdf: bdf, endpoint: d.endpoint, resource: UInt16(i))
            }
            for (i, r) in d.spec.resources.enumerated() {
                switch r.kind {
                case .pio, .mmio:
                    try bus.add(r.kind, base: r.base, length: r.length, endpoint: d.endpoint, resource: UInt16(i))
                case .pciMMIOBar, .pciPIOBar:
                    try pci.addBAR(r.kind, base: r.base, size: r.length, endpoint: d.endpoint, resource: UInt16(i))
                case .pciConfig:
                    break
                }
            }
        }
        if let restore = configuration.restore {
            try applyRestore(restore)
            let memoryFile: FileDescriptor
            do { memoryFile = try FileDescriptor.openHostFile(MachineSnapshot.memoryPath(restore.directory), flags: O_RDONLY, kinds: .regular) } catch {
                throw .configuration("cannot read snapshot \(restore.directory)'s memory: \(error)")
            }
            do throws(SnapshotError) { try ram.load(restore.memoryExtents, from: memoryFile, name: "snapshot \(restore.directory)") } catch {
                throw .configuration(error.description)
            }
        }
    }

    /// Registers guest RAM, and the firmware ROM read-only just below 4 GiB, with KVM.
    private static func registerMemory(_ ram: GuestRAM, firmware: SharedMapping?, with vm: VirtualMachine) throws(KVMError) {
        try ram.register(with: vm)
        if let rom = firmware {
            // Read-only slot ending at 4 GiB: guest writes to it exit as MMIO and are dropped.
            try vm.setMemoryRegion(slot: UInt32(ram.regions.count), guestAddress: (1 << 32) - UInt64(rom.count),
                                   size: UInt64(rom.count), hostAddress: rom.base, readOnly: true)
        }
    }

    /// The saved machine `restore` describes, put in place: the firmware as it was, the
    /// platform, each vCPU, PCI, and each device's state page (its process starts from it).
    private func applyRestore(_ restore: MachineSnapshot) throws(CoreError) {
        guard restore.memoryBytes == configuration.memoryBytes, restore.cpus == configuration.cpus else {
            throw .configuration("the snapshot is of a VM with \(restore.memoryBytes >> 20) MiB and \(restore.cpus) vCPUs, not \(configuration.memoryBytes >> 20) MiB and \(configuration.cpus)")
        }
        guard (restore.firmwareROM == nil) == (configuration.firmwareROM == nil) else {
            throw .configuration("the snapshot's boot mode (firmware or direct) is not this VM's")
        }
        guard Self.sameCPUID(restore.cpuid, cpuidTable) else {
            throw .configuration("the saved CPUID table differs from the one the VM was built with")
        }
        if let rom = configuration.firmwareROM, let mapping = firmwareMapping {
            // The firmware as it was when the snapshot was taken (hv-bios does not load it again).
            guard let bytes = restore.firmwareROM, bytes.count == mapping.count else {
                throw .configuration("the snapshot's firmware ROM does not match this VM's (\(restore.firmwareROM?.count ?? 0) bytes, not \(mapping.count))")
            }
            let n = bytes.withUnsafeBytes { pwrite(rom.rawValue, $0.baseAddress, $0.count, 0) }
            guard n == bytes.count else { throw .system(SystemError("cannot fill the firmware ROM", .current)) }
        }
        do throws(KVMError) {
            try vm.restorePlatform(restore.platform)
            for (vcpu, state) in zip(vcpus, restore.vcpus) {
                if restore.tscKHz != 0, try vcpu.tscKHz() != restore.tscKHz { try vcpu.setTSCKHz(restore.tscKHz) }
                try vcpu.restoreState(state)
            }
        } catch { throw .kvm(error) }
        try pci.restore(restore.pci)
        do throws(SnapshotError) { try supervisor.prepareRestore(restore.devices) } catch { throw .configuration(error.description) }
        restored.withLock { $0 = restore }
    }

    private static func sameCPUID(_ a: [kvm_cpuid_entry2], _ b: [kvm_cpuid_entry2]) -> Bool {
        a.withUnsafeBytes { x in b.withUnsafeBytes { y in x.elementsEqual(y) } }
    }

    /// Starts every device process now, ahead of `run`: they get ready (jail, runtime) while a
    /// migration copies memory, and `run` only completes their handshakes. For an incoming VM.
    public func startDeviceProcessesAhead() throws(CoreError) {
        try supervisor.spawnAhead()
    }

    /// Ends device processes started ahead that `run` has not taken over (a migration that failed
    /// before its switch-over). Safe to call more than once, from any thread.
    public func abandonDeviceProcessesAhead() {
        supervisor.abandonSpawnedAhead()
    }

    /// An incoming migration's machine state, received at its switch-over (the memory is in RAM
    /// already): puts it in place and registers the memory with KVM. Then `run` starts the VM
    /// paused (the caller resumes it on the source's GO).
    public func applyArrivedState(_ state: MachineSnapshot) throws(CoreError) {
        guard configuration.incoming != nil, restored.withLock({ $0 }) == nil else {
            throw .configuration("this VM is not waiting for a migration's state")
        }
        try applyRestore(state)
        do throws(KVMError) {
            try memorySlots.wait()  // the first slot's cost, long paid
            try Self.registerMemory(ram, firmware: firmwareMapping, with: vm)
        } catch { throw .kvm(error) }
    }

    // MARK: Pause and resume

    /// Whether the guest has started running (the boot state is in place and the vCPU threads
    /// are started); false while the VM is still being built.
    public var guestStarted: Bool { supervisor.guestStarted.load(ordering: .acquiring) }

    /// Whether the vCPUs are paused (`pause()`), and since when (monotonic nanoseconds).
    public var pausedSince: UInt64? {
        pauseState.withLock { $0.paused ? $0.since : nil }
    }

    /// Stops every vCPU outside the guest and lets the devices finish what the guest already
    /// asked of them; the guest's kvmclock is read so `resume()` can carry it on from here (what
    /// QEMU's `stop` and `cont` do). Device processes keep running: a paused VM's disks and NICs
    /// complete their requests and its console drains. Safe from any thread.
    public func pause() throws(MachineControlError) {
        try pauseState.withLock { state throws(MachineControlError) in
            guard !state.paused else { throw .alreadyInState("the VM is already paused") }
            guard supervisor.guestStarted.load(ordering: .acquiring), !stopping.load(ordering: .acquiring) else {
                throw .notRunning("the VM is not running guest code yet (or is stopping); try again")
            }
            _ = unparked.drain()
            pauseRequested.store(true, ordering: .releasing)
            kickAll()
            let deadline = monotonicNanoseconds() + 2_000_000_000
            while parkedVCPUs.load(ordering: .acquiring) < liveVCPUThreads.load(ordering: .acquiring) {
                if monotonicNanoseconds() > deadline || stopping.load(ordering: .acquiring) {
                    pauseRequested.store(false, ordering: .releasing)
                    unparked.signal()
                    throw .notRunning("the vCPUs did not stop within 2 s; the VM keeps running")
                }
                kickAll()
                usleep(200)
            }
            state.clock = try? vm.clock()
            // Devices drain: requests the guest queued before the pause are completed now.
            let drainDeadline = monotonicNanoseconds() + 1_000_000_000
            while !supervisor.ringsDrained() && monotonicNanoseconds() < drainDeadline { usleep(200) }
            state.paused = true
            state.since = monotonicNanoseconds()
        }
    }

    /// Resumes the vCPUs `pause()` stopped; the guest's kvmclock resumes from the value read at
    /// the pause, so the guest does not see the paused time pass on it. Safe from any thread.
    public func resume() throws(MachineControlError) {
        try pauseState.withLock { state throws(MachineControlError) in
            guard state.paused else { throw .alreadyInState("the VM is not paused") }
            if let clock = state.clock { try? vm.setClock(clock) }
            state.paused = false
            state.clock = nil
            pauseRequested.store(false, ordering: .releasing)
            unparked.signal()
        }
    }

    /// Every vCPU's state and, with `registers`, its RIP (read by the vCPU's own thread at the
    /// probe this asks for, within about 20 ms). Safe from any thread.
    public func vcpuStatus(registers: Bool = false) -> [VCPUStatus] {
        if registers {
            registersWanted.store(true, ordering: .releasing)
            if pausedSince == nil {
                wakeMonitor()  // it may be backing off, a second away from its next probe
                let deadline = monotonicNanoseconds() + 50_000_000
                while registersWanted.load(ordering: .acquiring) && monotonicNanoseconds() < deadline { usleep(1000) }
            } else {
                // Parked vCPUs are outside KVM_RUN: read them here.
                for (i, vcpu) in vcpus.enumerated() {
                    if let regs = try? vcpu.registers() { probeAnswers[i].rip.store(regs.rip, ordering: .releasing) }
                }
            }
            registersWanted.store(false, ordering: .releasing)
        }
        return probeAnswers.enumerated().map { i, a in
            VCPUStatus(id: i, state: VCPUState(rawValue: a.state.load(ordering: .acquiring)) ?? .running,
                       rip: registers ? a.rip.load(ordering: .acquiring) : nil, exits: a.exits.snapshot)
        }
    }

    /// One device process as the control socket reports it.
    public struct DeviceStatus: Sendable {
        public var name: String
        /// The live process, or nil while it is being restarted (or was given up).
        public var pid: Int32?
        public var restarts: UInt32
        /// "running", "restarting" or "failed".
        public var state: String
        /// The binary it runs (changed by an upgrade).
        public var executable: String
    }

    /// The device processes now. Safe from any thread.
    public func deviceStatus() -> [DeviceStatus] {
        supervisor.devices.map { d in
            let pid = d.publishedPid.load(ordering: .acquiring)
            let state: String
            switch d.endpoint.state {
            case .running: state = "running"
            case .restarting: state = "restarting"
            case .failed: state = "failed"
            }
            return DeviceStatus(name: d.spec.name, pid: pid == 0 ? nil : pid, restarts: d.restarts.load(ordering: .relaxed), state: state,
                                executable: d.publishedExecutable.withLock { $0 })
        }
    }

    /// Restarts device `name` cleanly (reviving one given up after crashes) or replaces its
    /// binary, keeping its rings, queues and state; returns a one-line report. Safe from any
    /// thread; waits for the supervisor thread to do it.
    public func perform(_ action: DeviceAction, on name: String) throws(DeviceActionError) -> String {
        try supervisor.perform(action, on: name)
    }

    /// Inserts `file` into (or, with nil, ejects the medium of) device `name`'s removable drive,
    /// host file `hostFile`. The guest sees a media change. Safe from any thread.
    public func changeMedium(device name: String, hostFile: UInt16, file: FileDescriptor?) throws(MediaChangeError) {
        try supervisor.changeMedium(device: name, hostFile: hostFile, file: file)
    }

    /// What device `name` keeps in its state page now (4096 bytes), or nil if the VM has no such
    /// device. The device writes the page at any time: its bytes are untrusted input. Safe from any
    /// thread.
    public func statePage(ofDevice name: String) -> [UInt8]? {
        supervisor.statePage(ofDevice: name)
    }

    /// Bytes of host memory the guest's RAM takes now (allocated pages of its memfd).
    public var guestRAMHostBytes: UInt64 { ram.hostBytes }

    /// Called once, from `run()`'s thread, when the vCPUs start running the guest.
    public var onGuestStarted: (@Sendable () -> Void)?

    /// Sends this VM's KVM handle over `socket` (see `VirtualMachine.lend(through:)`). Call when
    /// the VM will not run again: whoever holds the other end keeps its kernel state alive.
    public func lendKVMHandle(through socket: SeqPacketSocket) throws(SystemError) {
        try vm.lend(through: socket)
    }

    /// Requests a stop with `exit` (the first request wins).
    public func stop(_ exit: MachineExit) {
        outcome.withLock { if $0 == nil { $0 = exit } }
        stopping.store(true, ordering: .releasing)
        unparked.signal()
        wakeMonitor()
    }

    /// Wakes `run`'s thread, which may be sleeping until its next halt probe: it probes at once
    /// (it sees what it was woken for itself when it is the caller). The signal stays blocked, so
    /// one that arrives after `run` has left only lies pending.
    private func wakeMonitor() {
        if let thread = runThread.withLock({ $0 }), pthread_equal(thread, pthread_self()) == 0 { pthread_kill(thread, Self.wakeSignal) }
    }

    /// The thread in `run`, while it is there.
    private let runThread = Mutex<pthread_t?>(nil)
    /// Wakes `run`'s thread (from `stop`, a status that wants registers, a vCPU's first exit
    /// after a quiet spell); blocked in every thread and taken synchronously there.
    static let wakeSignal = SIGUSR2

    /// Blocks SIGINT, SIGTERM and SIGHUP (and hv's wake signal, SIGUSR2) in the calling thread
    /// (and so in every thread it starts later) and returns that set; `run` takes them
    /// synchronously. Call it before starting any thread, so none inherits a mask that would let
    /// a stop signal kill the process uncleanly.
    @discardableResult
    public static func blockStopSignals() -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP, wakeSignal] { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        return set
    }

    /// How often the halt monitor probes while the guest is busy, and at most how seldom once it
    /// idles (no port or MMIO exit since the last probe). Each wake-up of the monitor costs a
    /// context switch, and a probe that kicks takes every vCPU out of the guest: together most of
    /// what an idle VM costs (issue 21). While the monitor backs off it sleeps until its next
    /// probe, and the guest's first port or MMIO exit wakes it (`noteGuestActivity`), so a guest
    /// that prints and then halts with `cli; hlt` is still seen within a busy interval; only one
    /// that halts with no port or MMIO access after idling waits for the next probe, at most 1 s.
    /// With the vCPUs' statistics a probe reads them instead of kicking a vCPU that runs (or one
    /// still in a halt it answered for), so it is cheap enough to make every 2 ms; without them
    /// every probe kicks, every 10 ms.
    var busyProbeInterval: UInt64 { vcpuStatistics == nil ? 10_000_000 : 2_000_000 }
    static let idleProbeInterval: UInt64 = 1_000_000_000
    /// Set while the halt monitor backs off; the first port or MMIO exit clears it and wakes it.
    private let monitorBackedOff = Atomic<Bool>(false)

    /// Called by a vCPU thread on a port or MMIO exit: one relaxed load unless the monitor
    /// backs off, in which case the first exit wakes it.
    private func noteGuestActivity() {
        guard monitorBackedOff.load(ordering: .relaxed),
              monitorBackedOff.exchange(false, ordering: .acquiringAndReleasing) else { return }
        if let thread = runThread.withLock({ $0 }) { pthread_kill(thread, Self.wakeSignal) }
    }

    /// Port and MMIO exits of every vCPU so far: what tells a busy guest from an idle one.
    private func guestExits() -> UInt64 {
        probeAnswers.reduce(0) { $0 &+ $1.exits.io.load(ordering: .relaxed) &+ $1.exits.mmio.load(ordering: .relaxed) }
    }

    /// Runs the VM until it powers off, fails, or is stopped. Call from the main thread.
    public func run() -> MachineExit {
        // SIGINT/SIGTERM/SIGHUP are taken synchronously by this thread; every thread started from
        // here inherits the mask (device processes get a clean one from posix_spawn).
        var stopSignals = Self.blockStopSignals()
        VCPUKicker.install()
        signal(SIGPIPE, SIG_IGN)

        supervisor.onBootState = { [self] state in acceptBootState(state) }
        supervisor.onSystemEvent = { [self] event in
            // Stop at once: no vCPU should run guest code past a power-off or a reset.
            stop(event.kind == .powerOff ? .poweredOff : .resetRequested)
            kickAll()
        }
        supervisor.onEarlyDeath = { [self] why in stop(.failure(why)) }
        let restore = restored.withLock { $0 }
        if configuration.incoming != nil && restore == nil {
            supervisor.abandonSpawnedAhead()
            try? memorySlots.wait()
            return .failure("the migrated VM's state was never put in place")
        }
        do {
            try supervisor.startAll()
            try supervisor.startThread()
        } catch {
            supervisor.shutdown()
            try? memorySlots.wait()
            return .failure("\(error)")
        }
        do { try memorySlots.wait() } catch {
            supervisor.shutdown()
            return .failure("cannot register guest memory with KVM: \(error)")
        }

        if let restore {
            // The guest carries on from the snapshot: no boot state; its clock from the pause.
            if configuration.startPaused {
                pauseRequested.store(true, ordering: .releasing)
                pauseState.withLock { $0 = (true, restore.clock, monotonicNanoseconds()) }
            } else {
                do { try vm.setClock(restore.clock) } catch { stop(.failure("cannot restore the guest's clock: \(error)")) }
            }
        }
        // The BIOS device loads the guest and then names the entry state.
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while restore == nil && bootState.withLock({ $0 }) == nil && !stopping.load(ordering: .acquiring) {
            if monotonicNanoseconds() > deadline {
                stop(.failure("the BIOS device did not hand over a boot state within 30 s"))
                break
            }
            usleep(200)
        }
        if !stopping.load(ordering: .acquiring) {
            supervisor.guestStarted.store(true, ordering: .releasing)
            // The boot vCPU's thread last, and none after a failure: a VM whose threads cannot
            // all be made (a pids limit) stops before any guest instruction runs, so it leaves
            // one line, not a guest half started. (The others wait for the boot vCPU's INIT and
            // SIPI inside KVM; a restored VM's run at once, but as their threads are made.)
            for vcpu in vcpus.dropFirst() + vcpus.prefix(1) {
                do {
                    // Joinable: a vCPU that returned on its own (a triple fault, a reset) is
                    // still kicked at the stop, and a detached thread's handle dies with it.
                    let t = try HostThread.spawnJoinable(name: "hv-vcpu\(vcpu.id)") { [self] in vcpuLoop(vcpu) }
                    threads.withLock { $0.append(t) }
                } catch {
                    stop(.failure("cannot start vCPU thread: \(error)"))
                    break
                }
            }
            onGuestStarted?()
        }

        runThread.withLock { $0 = pthread_self() }
        var lastProbe = monotonicNanoseconds()
        var probeInterval = busyProbeInterval
        var exitsAtLastProbe = guestExits()
        var answeredHalts = [AnsweredHalt?](repeating: nil, count: vcpus.count)
        while !stopping.load(ordering: .acquiring) {
            if probeInterval > busyProbeInterval {
                monitorBackedOff.store(true, ordering: .releasing)
                // An exit between the last probe and the store above woke nobody: look once.
                if guestExits() != exitsAtLastProbe {
                    probeInterval = busyProbeInterval
                    monitorBackedOff.store(false, ordering: .releasing)
                }
            }
            let before = monotonicNanoseconds()
            let wait = lastProbe &+ probeInterval > before ? lastProbe &+ probeInterval - before : 0
            var timeout = timespec(tv_sec: Int(wait / 1_000_000_000), tv_nsec: Int(wait % 1_000_000_000))
            let sig = sigtimedwait(&stopSignals, nil, &timeout)
            monitorBackedOff.store(false, ordering: .releasing)
            if sig == Self.wakeSignal {
                // `stop`, a status that wants registers, or the guest's first exit after a quiet
                // spell: probe now, and every busy interval again.
                probeInterval = busyProbeInterval
                continue
            }
            if sig > 0 {
                stop(.signal(sig))
                break
            }
            let now = monotonicNanoseconds()
            guard now - lastProbe >= probeInterval else { continue }
            lastProbe = now
            // A paused guest is not probed (its vCPUs are parked); the loop only sleeps.
            if pauseRequested.load(ordering: .acquiring) { continue }
            // A guest that halts right after writing a reset or power-off register must not be
            // taken for powered off before the device has handled the write: only decide once
            // every device has committed what the guest wrote.
            if allVCPUsHalted(&answeredHalts) && supervisor.ringsDrained() { stop(.poweredOff) }
            // Back off while the guest idles.
            let exits = guestExits()
            probeInterval = exits == exitsAtLastProbe ? min(probeInterval * 2, Self.idleProbeInterval) : busyProbeInterval
            exitsAtLastProbe = exits
        }
        runThread.withLock { $0 = nil }
        // Let every vCPU leave the guest, then let the devices finish what the guest wrote.
        kickAll()
        supervisor.shutdown()
        joinVCPUThreads()
        return outcome.withLock { $0 } ?? .poweredOff
    }

    private func acceptBootState(_ state: BootState) -> Status {
        guard !supervisor.guestStarted.load(ordering: .acquiring) else { return .denied }
        guard state.vcpu == 0 else { return .invalidArgument }
        // The entry point, page tables and GDT must be guest RAM below 4 GiB, or the vCPU would
        // fault at once (a triple fault with no clue why).
        let lowTop = min(ram.size, GuestRAM.lowLimit)
        func inLowRAM(_ address: UInt64, _ count: UInt64) -> Bool {
            address < lowTop && count <= lowTop - address
        }
        switch state.mode {
        case .reset, .flat32:
            guard state.cr3 == 0, state.gdtBase == 0, state.gdtLimit == 0 else { return .invalidArgument }
            if state.mode == .flat32 {
                guard state.rip < lowTop, state.rip <= UInt64(UInt32.max) else { return .invalidArgument }
            }
        case .long64:
            guard inLowRAM(state.rip, 1), state.cr3 & 0xFFF == 0, inLowRAM(state.cr3, 4096),
                  state.gdtLimit >= 0x1F, inLowRAM(state.gdtBase, UInt64(state.gdtLimit) + 1) else { return .invalidArgument }
        }
        bootState.withLock { $0 = state }
        return .ok
    }

    /// Joins the vCPU threads once they have left their loops (at most 5 s; one still inside
    /// after that is detached instead, and ends on its own).
    private func joinVCPUThreads() {
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while liveVCPUThreads.load(ordering: .acquiring) > 0 && monotonicNanoseconds() < deadline { usleep(200) }
        let done = liveVCPUThreads.load(ordering: .acquiring) == 0
        for t in threads.withLock({ list in defer { list.removeAll() }; return list }) {
            if done { pthread_join(t, nil) } else { pthread_detach(t) }
        }
    }

    private func kickAll() {
        for vcpu in vcpus { vcpu.requestExit() }
        for t in threads.withLock({ $0 }) { VCPUKicker.kick(t) }
    }

    // MARK: Halt detection
    //
    // With the in-kernel irqchip, HLT never reaches user space. To notice a guest that is done
    // (`cli; hlt` on every vCPU), the monitor kicks each vCPU out of KVM_RUN; the vCPU thread
    // answers with its MP state and RFLAGS.IF, then re-enters the guest (still halted). Where
    // the kernel has vCPU statistics, the monitor first reads them: a vCPU that is not blocked,
    // or is still in the halt (same HLT count) it last answered was interruptible, rules the
    // guest out without any kick.

    /// A vCPU's answer to a kick while it was halted with interrupts enabled, and its HLT count
    /// then: while the count stays and it stays blocked, it is in that same halt (IF cannot
    /// change in a halt). Trusted for at most `idleProbeInterval`, so a vCPU that blocks again
    /// without a HLT (INIT, waiting for SIPI) is asked again.
    private struct AnsweredHalt {
        var haltExits: UInt64
        var at: UInt64
    }

    private func allVCPUsHalted(_ memo: inout [AnsweredHalt?]) -> Bool {
        var haltCounts: [UInt64] = []
        let now = monotonicNanoseconds()
        if let statistics = vcpuStatistics, !registersWanted.load(ordering: .acquiring) {
            var ruledOut = false
            for (i, vcpuStatistics) in statistics.enumerated() {
                guard let state = vcpuStatistics.haltState() else {
                    haltCounts = []  // unreadable: ask by kicking, as without statistics
                    ruledOut = false
                    break
                }
                // What status reports for a vCPU no kick asks: running, or blocked in a halt (or,
                // before its first HLT, waiting to be started).
                let seen: VCPUState = !state.blocking ? .running : state.haltExits == 0 ? .notStarted : .halted
                probeAnswers[i].state.store(seen.rawValue, ordering: .releasing)
                if !state.blocking { ruledOut = true }
                if let last = memo[i], last.haltExits == state.haltExits, now &- last.at < Self.idleProbeInterval { ruledOut = true }
                haltCounts.append(state.haltExits)
            }
            if ruledOut { return false }
        }
        let generation = probeGeneration.add(1, ordering: .acquiringAndReleasing).newValue
        kickAll()
        let deadline = monotonicNanoseconds() + 50_000_000
        while monotonicNanoseconds() < deadline {
            var answered = 0
            var halted = 0
            for a in probeAnswers {
                let v = a.value.load(ordering: .acquiring)
                if v >> 1 == generation {
                    answered += 1
                    if v & 1 == 1 { halted += 1 }
                }
            }
            if answered == vcpus.count {
                if haltCounts.count == vcpus.count {
                    for (i, a) in probeAnswers.enumerated() {
                        let interruptible = a.value.load(ordering: .acquiring) & 1 == 0 && a.state.load(ordering: .acquiring) == VCPUState.halted.rawValue
                        memo[i] = interruptible ? AnsweredHalt(haltExits: haltCounts[i], at: now) : nil
                    }
                }
                return halted == vcpus.count
            }
            if stopping.load(ordering: .acquiring) { return false }
            usleep(100)
        }
        return false
    }

    private func answerProbe(_ vcpu: VCPU) {
        let generation = probeGeneration.load(ordering: .acquiring)
        let slot = probeAnswers[Int(vcpu.id)]
        guard slot.value.load(ordering: .relaxed) >> 1 != generation else { return }
        var halted = false
        var seen = VCPUState.running
        if let mp = try? vcpu.mpState() {
            switch Int32(mp) {
            case KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED:
                halted = true  // an AP the guest never started
                seen = .notStarted
            case KVM_MP_STATE_HALTED:
                if let regs = try? vcpu.registers() { halted = regs.rflags & (1 << 9) == 0 }
                seen = .halted
            default:
                halted = false
            }
        }
        slot.state.store(seen.rawValue, ordering: .releasing)
        if registersWanted.load(ordering: .acquiring), let regs = try? vcpu.registers() {
            slot.rip.store(regs.rip, ordering: .releasing)
            if vcpu.id == UInt32(vcpus.count - 1) { registersWanted.store(false, ordering: .releasing) }
        }
        slot.value.store(generation << 1 | (halted ? 1 : 0), ordering: .releasing)
    }

    // MARK: vCPU threads

    private func vcpuLoop(_ vcpu: VCPU) {
        liveVCPUThreads.add(1, ordering: .acquiringAndReleasing)
        defer { liveVCPUThreads.subtract(1, ordering: .acquiringAndReleasing) }
        if vcpu.id == 0, let state = bootState.withLock({ $0 }) {
            do { try apply(state, to: vcpu) } catch {
                return stop(.failure("cannot set the boot vCPU's entry state: \(error)"))
            }
        }
        let slot = probeAnswers[Int(vcpu.id)]
        while !stopping.load(ordering: .acquiring) {
            if pauseRequested.load(ordering: .acquiring) {
                // An I/O exit is finished by KVM only on the next KVM_RUN (an IN's value reaches
                // RAX then): enter once with immediate_exit set, which completes it and runs no
                // guest instruction, so the registers a snapshot reads are an instruction boundary.
                vcpu.requestExit()
                _ = try? vcpu.runOnce()
                // Parked outside KVM_RUN until resumed or stopped: `unparked` wakes it (the
                // timeout is only a backstop).
                let before = slot.state.exchange(VCPUState.paused.rawValue, ordering: .acquiringAndReleasing)
                parkedVCPUs.add(1, ordering: .acquiringAndReleasing)
                while pauseRequested.load(ordering: .acquiring) && !stopping.load(ordering: .acquiring) {
                    _ = try? Poll.wait([.init(fd: unparked.fd.rawValue)], timeoutMilliseconds: 100)
                }
                parkedVCPUs.subtract(1, ordering: .acquiringAndReleasing)
                slot.state.store(before, ordering: .releasing)
                continue
            }
            let exit: VCPUExit
            do { exit = try vcpu.runOnce() } catch {
                return stop(.failure("\(error)"))
            }
            switch exit {
            case .io(let port, let size, let count, let isWrite):
                slot.exits.io.add(1, ordering: .relaxed)
                noteGuestActivity()
                for i in 0..<count {
                    if isWrite {
                        bus.pioWrite(port: port, size: size, value: vcpu.ioValue(i), vcpu: vcpu.id)
                    } else {
                        vcpu.setIOValue(i, bus.pioRead(port: port, size: size, vcpu: vcpu.id))
                    }
                }
            case .mmio(let address, let size, let isWrite, let value):
                slot.exits.mmio.add(1, ordering: .relaxed)
                noteGuestActivity()
                if isWrite {
                    bus.mmioWrite(address: address, size: size, value: value, vcpu: vcpu.id)
                } else {
                    vcpu.setMMIOReadValue(bus.mmioRead(address: address, size: size, vcpu: vcpu.id))
                }
            case .interrupted:
                slot.exits.interrupted.add(1, ordering: .relaxed)
                answerProbe(vcpu)
            case .halt:
                slot.exits.halt.add(1, ordering: .relaxed)
                answerProbe(vcpu)
                usleep(1000)
            case .shutdown:
                let rip = (try? vcpu.registers().rip).map { "0x" + String($0, radix: 16) } ?? "?"
                return stop(.failure("guest triple-faulted on vCPU \(vcpu.id) (rip \(rip)); the VM is stopped"))
            case .systemEvent(let type):
                switch Int32(type) {
                case KVM_SYSTEM_EVENT_SHUTDOWN: return stop(.poweredOff)
                case KVM_SYSTEM_EVENT_RESET: return stop(.resetRequested)
                default: return stop(.failure("guest requested system event \(type), which hv does not support"))
                }
            case .internalError(let suberror):
                let rip = (try? vcpu.registers().rip).map { "0x" + String($0, radix: 16) } ?? "?"
                return stop(.failure("KVM internal error on vCPU \(vcpu.id) (suberror \(suberror), rip \(rip)): KVM could not emulate the guest"))
            case .failedEntry(let reason):
                return stop(.failure("KVM refused to enter vCPU \(vcpu.id) (hardware reason 0x\(String(reason, radix: 16)))"))
            case .unhandled(let reason):
                return stop(.failure("vCPU \(vcpu.id) exited with unhandled KVM exit reason \(reason)"))
            }
        }
    }

    private func apply(_ state: BootState, to vcpu: VCPU) throws(KVMError) {
        guard state.mode != .reset else { return }
        var sregs = try vcpu.specialRegisters()
        func segment(selector: UInt16, type: UInt8, long: Bool = false) -> kvm_segment {
            // In long mode a 64-bit code segment has L=1 and D=0; everything else is a flat 4 GiB
            // 32-bit segment.
            kvm_segment(base: 0, limit: 0xFFFF_FFFF, selector: selector, type: type, present: 1, dpl: 0,
                        db: long ? 0 : 1, s: 1, l: long ? 1 : 0, g: 1, avl: 0, unusable: 0, padding: 0)
        }
        let data: kvm_segment
        switch state.mode {
        case .long64:
            // The Linux 64-bit boot protocol: __BOOT_CS 0x10 (64-bit code), __BOOT_DS 0x18, paging
            // with the loader's identity map, PAE, EFER.LME|LMA. The GDT in guest RAM holds the
            // same descriptors (the loader wrote it); KVM takes the hidden parts from here.
            sregs.cs = segment(selector: 0x10, type: 0xB, long: true)
            data = segment(selector: 0x18, type: 0x3)
            sregs.gdt.base = state.gdtBase
            sregs.gdt.limit = state.gdtLimit
            sregs.cr3 = state.cr3
            sregs.cr4 = 0x20  // PAE
            sregs.cr0 = (sregs.cr0 | 0x8000_0001) & ~UInt64(0x6000_0000)  // PG, PE on; caches on (CD, NW off)
            sregs.efer = 0x500  // LME | LMA
        default:
            sregs.cs = segment(selector: 0x08, type: 0xB)  // execute/read, accessed
            data = segment(selector: 0x10, type: 0x3)  // read/write, accessed
            sregs.cr0 = (sregs.cr0 | 0x1) & ~UInt64(0x8000_0000)  // PE on, PG off
            sregs.cr4 = 0
            sregs.efer = 0
        }
        sregs.ds = data
        sregs.es = data
        sregs.fs = data
        sregs.gs = data
        sregs.ss = data
        try vcpu.setSpecialRegisters(sregs)
        var regs = kvm_regs()
        regs.rip = state.rip
        regs.rsp = state.rsp
        regs.rax = state.rax
        regs.rbx = state.rbx
        regs.rsi = state.rsi
        regs.rflags = 0x2
        try vcpu.setRegisters(regs)
    }
}

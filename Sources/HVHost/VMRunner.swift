import Glibc
import HVBalloonContract
import HVCore
import HVIPC
import HVNetContract
import HVSCSIContract
import HVSerialContract
import HVSys
import Synchronization

/// Set once the guest has run in this process (a failure before that leaves no console log).
private let guestRan = Mutex(false)

/// Runs the VM `definition` describes in this process (which becomes its trusted core) until it
/// ends; returns hvctl's exit status. A definition that cannot run ends the process with one
/// line and status 1 or 2 (see `fail`), after undoing what was set up. `onRunning` is called
/// once, with the VM's name, when the guest first runs (`hvctl run --detach` returns then).
///
/// With `restore`, the first boot brings back that snapshot (taken of a VM with this
/// definition) instead of starting the guest afresh; `startPaused` leaves its vCPUs paused.
///
/// With `incoming` (`hvctl run --incoming`, its header already received and checked), the VM
/// arrives over a live migration instead: memory and state are received once the name is
/// reserved, the VM is built paused once the source has let go of the disks, and it runs on the
/// source's GO.
public func runVM(_ definition: VMDefinition, verbose: Bool, restore: MachineSnapshot? = nil, startPaused: Bool = false,
                  incoming: IncomingMigration? = nil, onRunning: (@Sendable (String) -> Void)? = nil) -> Int32 {
    let options = definition
    // Stop signals are taken synchronously (by the signal thread, and by Machine.run on the main
    // thread); block them before any thread (the console's, the supervisor's, vCPUs) exists, so
    // none of those inherits an unblocked mask and lets a SIGTERM kill hvctl without a clean stop.
    _ = Machine.blockStopSignals()
    let current = CurrentMachine()
    let hostMemory = hostMemoryBytes()
    let memoryBytes = options.memoryMiB << 20
    guard memoryBytes <= hostMemory else {
        fail("--memory \(options.memoryMiB)M does not fit: this host has \(hostMemory >> 20)M of RAM", status: 2)
    }

    // A definition's balloon against its RAM (flags were checked as they were parsed).
    do throws(UsageError) { try options.balloon?.checkFits(guestMemoryMiB: options.memoryMiB) { "balloon.\($0.rawValue)" } } catch {
        fail(error.message, status: 2)
    }
    // The name first: a VM that is refused because its name is taken must not touch anything.
    let name = options.name ?? "vm-\(getpid())"
    sweepStaleVMs()
    let server: ControlServer
    do {
        server = try ExitCleanup.creating { () throws(UsageError) -> ControlServer in
            let created = try ControlServer(name: name)
            ExitCleanup.add { created.close() }
            return created
        }
    } catch {
        fail(error.message, status: 2)
    }
    // The VM's cgroups, as early as can be: every device and switch starts after. hvctl moves
    // itself into `core` while it is still single-threaded (fast on v1, see ResourceGroups), so
    // the signal thread starts after; a signal meanwhile waits, blocked, for it.
    let resources = makeResourceGroups(name: name, options)
    // The KVM VM, made now that hvctl is in its cgroups (its kernel memory is charged there; the
    // warm-up's thread must come after hvctl's single-threaded move), while the rest is set up.
    // An arriving VM brings one made while it waited; if this fails, the Machine's own attempt says why.
    var preparedVM = incoming == nil ? try? PreparedVM() : nil
    startSignalWatcher(current)
    if let incoming {
        // Until GO, whatever ends this process tells the source why, so it carries on there.
        // Everything up to the machine and its device processes is made before the source is
        // told ACCEPT: a destination that cannot host the VM refuses it before memory is sent,
        // and the switch-over's pause is left with little to build.
        FailureReport.install { why in incoming.channel.refuse("the destination failed: \(why)") }
        do throws(MigrationError) { try incoming.allocateMemory() } catch { fail("migration of \(name) failed: \(error)") }
    }

    // The trusted side opens every host file; devices only receive descriptors. Nothing is
    // truncated until every check below has passed. An arriving VM's images are locked at the
    // switch-over, when the source has let go of them.
    let boot: BootFiles, disks: [DiskImage], cdrom: FileDescriptor?
    var outputs: [OutputFile] = []
    do {
        boot = try openBootFiles(options.boot, beneath: options.confinement)
        disks = try openDisks(options, lock: incoming == nil)
        cdrom = try openCDROM(options)
        if options.serial.output == .file, let path = options.serial.path { outputs.append(try OutputFile.open(path, what: "the --serial file")) }
        if options.serial.output == .console {
            let log = RunDirectory.consoleLog(name)
            let created = access(log, F_OK) != 0
            outputs.append(try OutputFile.open(log, what: "the console log"))
            // A VM that never ran leaves no empty log behind.
            if created { ExitCleanup.add { if !guestRan.withLock({ $0 }) { unlink(log) } } }
        }
        if let path = options.debugcon { outputs.append(try OutputFile.open(path, what: "the --debugcon file")) }
    } catch {
        fail(error.message)
    }
    // Every device is jailed under the VM's tenant unless --no-sandbox. A VM without --tenant
    // gets a tenant of its own, leased from the registry for as long as this process runs.
    let tenant: String?
    do throws(UsageError) {
        if !options.sandbox {
            tenant = nil
        } else if let named = options.tenant {
            _ = try TenantIDs.uid(for: named)
            tenant = named
        } else {
            let lease = try TenantRegistry.host.lease()
            TenantIDs.remember(lease)
            tenant = lease.name
        }
    } catch {
        fail(error.message)
    }
    sandboxSegments = options.sandbox
    sweepStaleSegments()
    let nics = attachNICs(options, vmName: name, verbose: verbose)

    var serialFiles: [SerialContract.HostFile: FileDescriptor] = [:]
    var console: Console?
    var consoleServer: ConsoleServer?
    do {
        switch options.serial.output {
        case .stdio:
            // A duplicate: wrapping fd 1 itself would close hvctl's stdout when the wrapper goes.
            serialFiles[.output] = FileDescriptor(owning: try check("dup stdout", fcntl(1, F_DUPFD_CLOEXEC, 3)))
            let c = try Console()
            serialFiles[.input] = c.deviceInput
            console = c
        case .none:
            serialFiles[.output] = try FileDescriptor.open("/dev/null", flags: O_WRONLY)
        case .file:
            serialFiles[.output] = outputs[0].file
        case .console:
            let server = try ExitCleanup.creating { () throws(UsageError) -> ConsoleServer in
                let created = try ConsoleServer(name: name, log: outputs[0].file)
                ExitCleanup.add { created.close() }
                return created
            }
            serialFiles[.output] = outputs[0].file
            serialFiles[.input] = server.deviceInput
            consoleServer = server
        }
    } catch let error as UsageError {
        fail(error.message)
    } catch {
        fail("cannot set up the serial port (\(options.serial.output.rawValue)): \(error)")
    }

    let debugOutput: FileDescriptor
    if options.debugcon != nil {
        debugOutput = outputs[outputs.count - 1].file
    } else {
        do { debugOutput = try FileDescriptor.open("/dev/null", flags: O_WRONLY) } catch {
            fail("cannot open /dev/null for the debug console: \(error.errno)")
        }
    }
    if tenant == nil {
        warn("WARNING: --no-sandbox: every device process runs unconfined, with hvctl's own privileges (root). A device bug or a hostile guest can take over this host. Use only for debugging.")
    }

    let started = monotonicNanoseconds()
    let control = VMControl(name: name, definition: options, bootMode: boot.mode.rawValue, tenant: tenant, started: started,
                            disks: disks, hasCDROM: cdrom != nil, nics: nics, current: current, resources: resources)
    do {
        try server.start(handler: control.handle, stream: control.stream, afterReply: control.afterReply)
        try consoleServer?.start()
    } catch {
        fail("cannot serve the control socket: \(error)")
    }
    if let console {
        do { try console.start { current.stop(.userQuit) } } catch { fail("cannot read the terminal: \(error)") }
    }
    defer { console?.restore() }
    // Said once, not at every reboot.
    let ioWarned = Mutex(false)
    // A reset builds the VM afresh (new RAM, devices and firmware), like a power cycle; only the
    // console, the image files and the tenant carry over.
    func prepareDevices() -> (devices: [DeviceSpec], firmwareROM: FileDescriptor?) {
        do {
            let rom = try boot.firmwareSize.map { size throws(SystemError) in try MemFD.create(name: "hv-firmware-rom", size: size) }
            // The live definition: rate limits changed while the VM ran survive a reboot.
            var devices = try platformDevices(control.live.withLock { $0 }, boot: boot, firmwareROM: rom, serialFiles: serialFiles,
                                              debugOutput: debugOutput, tenant: tenant, disks: disks, cdrom: cdrom, nics: nics)
            if let resources {
                for i in devices.indices {
                    // A disk's I/O limits apply to the whole disks its image and backing images lie on.
                    var blockDevices: [String] = []
                    if devices[i].name.hasPrefix("disk"), let k = Int(devices[i].name.dropFirst(4)), k < disks.count {
                        for file in [disks[k].file] + disks[k].backing.map(\.file) {
                            if let device = ResourceGroups.wholeDisk(holding: file), !blockDevices.contains(device) { blockDevices.append(device) }
                        }
                        if resources.limits.diskIO != nil && blockDevices.isEmpty && ioWarned.withLock({ warned in
                            defer { warned = true }
                            return !warned
                        }) {
                            warn("\(devices[i].name)'s image is on a file system without a block device: --disk-io-limit does not apply to it (its rate limit, bps= and iops=, does)")
                        }
                    }
                    devices[i].placement = try resources.placement(for: devices[i].name, blockDevices: blockDevices)
                }
            }
            return (devices, rom)
        } catch let error as UsageError {
            fail(error.message, status: 2)
        } catch {
            fail("cannot prepare the firmware ROM: \(error)")
        }
    }
    // A thread or process the pids limit refused: failures say which limit.
    func limitHint() -> String {
        guard let resources, resources.pidsLimitReached() else { return "" }
        return " (the VM reached its pids limit of \(resources.limits.pids); raise --pids-limit)"
    }
    var prepared = prepareDevices()
    var restoring = restore
    // A migrating VM's machine is built, and its device processes started, while its memory
    // arrives; the state received at the switch-over is put in place before it runs.
    var built: Machine?
    if let incoming {
        let machine: Machine
        do {
            machine = try Machine(.init(memoryBytes: memoryBytes, cpus: options.cpus, devices: prepared.devices, verbose: verbose,
                                        firmwareROM: prepared.firmwareROM, startPaused: true, incoming: incoming))
            try machine.startDeviceProcessesAhead()
        } catch {
            fail("cannot build the migrated VM: \(error)\(limitHint())")
        }
        // A failure from here to the switch-over ends those processes (weak: a machine that ran
        // and rebooted must not be kept alive by this).
        ExitCleanup.add { [weak machine] in machine?.abandonDeviceProcessesAhead() }
        do throws(MigrationError) {
            try incoming.accept()
            warn("receiving \(name) (\(options.memoryMiB) MiB) from the source")
            let state = try incoming.receiveMemoryAndState()
            if let why = lockDisks(disks) { throw incoming.refusing(why) }
            do throws(CoreError) { try machine.applyArrivedState(state) } catch {
                throw incoming.refusing("cannot build the migrated VM: \(error)")
            }
        } catch {
            fail("migration of \(name) failed: \(error)")
        }
        built = machine
    }
    // Every check has passed: only now are the console files emptied for this run.
    for output in outputs { output.truncate() }
    // `onRunning` is for the first boot only, not for each reboot.
    let once = Mutex(true)
    while true {
        let devices = prepared.devices, firmwareROM = prepared.firmwareROM
        let machine: Machine
        let arriving = built == nil ? nil : incoming
        if let prebuilt = built {
            machine = prebuilt
            built = nil
        } else {
            do {
                machine = try Machine(.init(memoryBytes: memoryBytes, cpus: options.cpus, devices: devices, verbose: verbose,
                                            firmwareROM: firmwareROM, restore: restoring, startPaused: startPaused,
                                            preparedVM: preparedVM))
                preparedVM = nil  // a reboot builds a VM of its own
            } catch {
                let hint = limitHint()
                fail(restoring == nil ? "\(error)\(hint)" : "cannot restore snapshot \(restoring!.directory): \(error)\(hint)")
            }
        }
        restoring = nil  // a reboot after a restore boots afresh
        machine.onGuestStarted = { [unowned machine] in
            if let arriving {
                // Built and paused, devices running: the source may let go now.
                do throws(MigrationError) {
                    try arriving.readyAndWaitForGo()
                } catch {
                    return machine.stop(.failure("migration of \(name) failed: \(error)"))
                }
                FailureReport.install(nil)
                if !arriving.sourcePaused { try? machine.resume() }
                arriving.confirm()
                warn("\(name) arrived and runs here")
            }
            guestRan.withLock { $0 = true }
            if let onRunning, once.withLock({ first in defer { first = false }; return first }) { onRunning(name) }
        }
        current.install(machine)
        let exit = machine.run()
        // Every way out but a reboot: the reaper tears the VM down after hvctl has gone.
        if case .resetRequested = exit, options.onReset != .stop {} else { resources?.outlive(machine) }
        switch exit {
        case .poweredOff:
            return 0
        case .resetRequested:
            if options.onReset == .stop {
                warn("the guest asked for a reset; stopping (--no-reboot)")
                return 0
            }
            if verbose { warn("the guest asked for a reset; rebooting") }
            prepared = prepareDevices()
        case .stopRequested:
            warn("stopped by 'hvctl stop \(name)'")
            return 0
        case .userQuit:
            console?.restore()
            _ = "\r\nhvctl: quit (Ctrl-A x)\n".withCString { Glibc.write(2, $0, strlen($0)) }  // ends the guest's unfinished line
            return 0
        case .signal(let sig):
            return 128 + sig
        case .failure(let why):
            console?.restore()
            fail(why + limitHint())
        case .migrated:
            return 0
        }
    }
}

/// Whole seconds from `start` to `now` (monotonic nanoseconds); 0 when `start` is later. A
/// status request reads the clock first: a pause that begins while it asks the devices and vCPUs
/// starts after `now`, and must read as just begun (an unsigned underflow here trapped and ended
/// the VM when hvd polled during a migration's pause).
func wholeSeconds(from start: UInt64, to now: UInt64) -> UInt64 {
    now > start ? (now - start) / 1_000_000_000 : 0
}

/// Answers the control socket's requests for one running VM (any number of reboots).
final class VMControl: Sendable {
    let name: String
    let definition: VMDefinition
    let bootMode: String
    let tenant: String?
    let started: UInt64
    let disks: [VMStatus.Disk]
    let nics: [VMStatus.NIC]
    let hasCDROM: Bool
    let current: CurrentMachine
    /// The ISO in the CD-ROM drive now (changed by cdrom-insert and cdrom-eject).
    let medium: Mutex<String?>
    /// The disks' image locks, which a migration hands over.
    let diskLocks: DiskLocks
    let migration = MigrationState()
    let consoleLog: String?

    /// The VM's cgroups; nil when it runs without.
    let resources: ResourceGroups?
    /// The definition as it stands now: `definition` with each `set-limits` applied (its
    /// limits and its disks' and NICs' rate limits). A reboot builds the devices from it, and a
    /// snapshot records it.
    let live: Mutex<VMDefinition>

    init(name: String, definition: VMDefinition, bootMode: String, tenant: String?, started: UInt64, disks: [DiskImage],
         hasCDROM: Bool, nics: [AttachedNIC], current: CurrentMachine, resources: ResourceGroups?) {
        self.resources = resources
        live = Mutex(definition)
        self.name = name
        self.definition = definition
        self.bootMode = bootMode
        self.tenant = tenant
        self.started = started
        self.disks = disks.enumerated().map { i, d in
            VMStatus.Disk(device: "disk\(i)", path: absolutePath(d.path), format: d.format.rawValue, readonly: d.readOnly,
                          backing: d.backing.isEmpty ? nil : d.backing.map { absolutePath($0.path) })
        }
        self.nics = nics.enumerated().map { i, n in
            var nic = VMStatus.NIC(device: "net\(i)", mac: formatMAC(n.mac))
            switch n.option.attachment {
            case .tap(let tap):
                nic.tap = tap
                nic.bridge = n.option.bridge
            case .segment(let segment): nic.segment = segment
            }
            return nic
        }
        self.hasCDROM = hasCDROM
        self.current = current
        diskLocks = DiskLocks(disks)
        medium = Mutex(definition.cdrom.map { absolutePath($0) })
        switch definition.serial.output {
        case .file: consoleLog = definition.serial.path.map { absolutePath($0) }
        case .console: consoleLog = absolutePath(RunDirectory.consoleLog(name))
        case .stdio, .none: consoleLog = nil
        }
    }

    /// Takes over the connection for the requests answered with several messages (`migrate`).
    @Sendable func stream(_ request: ControlRequest, _ client: Int32) -> Bool {
        guard request.command == .migrate else { return false }
        startMigration(request, client: client)
        return true
    }

    /// What an answered request does once its reply is sent.
    @Sendable func afterReply(_ request: ControlRequest) {
        if request.command == .stop { current.stop(.stopRequested) }
    }

    @Sendable func handle(_ request: ControlRequest) -> ControlReply {
        switch request.command {
        case .migrate:
            return .failure("migrate is answered on its own connection")  // `stream` takes it
        case .migrateCancel:
            guard migration.running.load(ordering: .acquiring) else { return .failure("\(name) is not being migrated") }
            migration.cancel.store(true, ordering: .releasing)
            return ControlReply(ok: true, message: "cancelling the migration of \(name); it carries on here")
        case .status:
            return ControlReply(ok: true, status: status(registers: request.registers ?? false))
        case .definition:
            var reply = ControlReply(ok: true)
            do throws(UsageError) { reply.definition = try VMDefinition.decode(snapshotRecord()) } catch {
                return .failure("cannot describe \(name): \(error.message)")
            }
            return reply
        case .setLimits:
            let change = request.limits ?? .init(), rates = request.rates ?? []
            guard !change.isEmpty || !rates.isEmpty else { return .failure("set-limits needs at least one limit") }
            var said: [String] = []
            if !change.isEmpty {
                guard let resources else { return .failure("\(name) runs without cgroups, so its limits cannot be changed") }
                guard change.diskIO == nil || resources.limitsDiskIO else {
                    return .failure("\(name) was started without disk I/O limits, so its disks have no I/O cgroups; start it with --disk-io-limit (or limits.disk_io) to change them while it runs")
                }
                let wanted = (live.withLock { $0.limits } ?? .init()).merging(change)
                do throws(UsageError) {
                    try wanted.validate { $0.flag }
                    try wanted.checkFits(guestMemoryMiB: definition.memoryMiB) { $0.flag }
                    try resources.apply(EffectiveLimits(wanted, guestMemoryMiB: definition.memoryMiB))
                } catch {
                    return .failure(error.message)
                }
                live.withLock { $0.limits = wanted }
                said.append("limits of \(name) set: " + describeLimits(resources.limits))
            }
            for rate in rates {
                switch changeRate(rate) {
                case .success(let line): said.append(line)
                case .failure(let why): return .failure((said + [why.message]).joined(separator: "; "))
                }
            }
            return ControlReply(ok: true, message: said.joined(separator: "; "))
        case .balloon:
            return changeBalloon(request)
        case .stop:
            // The stop itself waits for the reply (afterReply): a VM that ended first would
            // leave 'hvctl stop' without an answer, saying there was no such VM.
            return ControlReply(ok: true, message: "stopping")
        case .pause, .resume:
            guard let machine = current.machine else { return .failure("the VM is between boots; try again") }
            do throws(MachineControlError) {
                if request.command == .pause { try machine.pause() } else { try machine.resume() }
            } catch {
                return .failure(error.description)
            }
            return ControlReply(ok: true, message: request.command == .pause ? "paused" : "resumed")
        case .cdromEject, .cdromInsert:
            guard hasCDROM, let machine = current.machine else {
                return .failure("this VM has no CD-ROM drive (start it with --cdrom)")
            }
            var file: FileDescriptor?
            if request.command == .cdromInsert {
                guard let path = request.path, path.utf8.first == UInt8(ascii: "/") else { return .failure("cdrom-insert needs an absolute path") }
                switch openISO(path, what: "the ISO", beneath: definition.confinement) {
                case .success(let opened): file = opened
                case .failure(let error): return .failure(error.message)
                }
            }
            do throws(MediaChangeError) { try machine.changeMedium(device: "cdrom0", hostFile: SCSIContract.HostFile.medium.rawValue, file: file) } catch {
                return .failure(error.description)
            }
            medium.withLock { $0 = request.command == .cdromInsert ? request.path : nil }
            return ControlReply(ok: true)
        case .snapshot:
            guard let machine = current.machine else { return .failure("the VM is between boots; try again") }
            guard let path = request.path, path.utf8.first == UInt8(ascii: "/") else { return .failure("snapshot needs the directory's absolute path") }
            // A definition names a drive by its medium; an empty drive has none to restore with.
            guard !hasCDROM || medium.withLock({ $0 }) != nil else {
                return .failure("cannot snapshot \(name) while its CD-ROM drive is empty: insert a medium first ('hvctl cdrom \(name) insert ISO')")
            }
            do throws(SnapshotError) {
                let report = try machine.snapshot(to: path, host: snapshotRecord(), leavePaused: request.stop ?? false)
                let paused = report.pausedNanoseconds == 0 ? "" : ", guest stopped for \(report.pausedNanoseconds / 1_000_000) ms"
                let memory = report.memoryBytesWritten >= 1 << 20 ? "\(report.memoryBytesWritten >> 20) MiB" : "\(report.memoryBytesWritten >> 10) KiB"
                return ControlReply(ok: true, message: "saved \(name) to \(path): \(memory) of memory\(paused)\(request.stop == true ? "; the VM stays paused" : "")")
            } catch {
                return .failure(error.description)
            }
        case .deviceRestart, .deviceUpgrade:
            guard let machine = current.machine else { return .failure("the VM is between boots; try again") }
            guard let device = request.device else { return .failure("\(request.command.rawValue) needs a device") }
            let action: DeviceAction
            if request.command == .deviceUpgrade {
                guard let path = request.path, path.utf8.first == UInt8(ascii: "/") else { return .failure("device-upgrade needs the new binary's absolute path") }
                action = .upgrade(binary: path)
            } else {
                action = .restart
            }
            do throws(DeviceActionError) {
                return ControlReply(ok: true, message: try machine.perform(action, on: device))
            } catch {
                return .failure(error.description)
            }
        }
    }

    /// Applies one device's new rate limits: the device restarts with them (the guest sees a
    /// pause), and the live definition keeps them for reboots and snapshots.
    private func changeRate(_ rate: ControlRequest.RateChange) -> Result<String, UsageError> {
        guard let machine = current.machine else { return .failure(UsageError(message: "the VM is between boots; try again")) }
        let index = Int(rate.device.drop { !$0.isNumber })
        let isDisk = rate.device.hasPrefix("disk"), isNIC = rate.device.hasPrefix("net")
        let count = live.withLock { isDisk ? $0.disks.count : $0.nics.count }
        guard isDisk || isNIC, let index, "\(isDisk ? "disk" : "net")\(index)" == rate.device, index < count else {
            return .failure(UsageError(message: "\(name) has no disk or NIC '\(rate.device)' (see 'hvctl status \(name)')"))
        }
        for (limit, what) in [(rate.limit, "limit"), (rate.rx, "rx"), (rate.tx, "tx")] {
            do throws(UsageError) { try limit?.validate(field: "\(rate.device) \(what)") } catch { return .failure(error) }
        }
        if isDisk && (rate.rx != nil || rate.tx != nil) { return .failure(UsageError(message: "\(rate.device) is a disk: give its limit, not rx or tx")) }
        if isNIC && rate.limit != nil { return .failure(UsageError(message: "\(rate.device) is a NIC: give rx and tx limits")) }
        var setting: [String: String] = [:]
        let prefixes: [String]
        if isDisk {
            prefixes = [SCSIContract.Settings.rateLimitPrefix]
            for (key, value) in (rate.limit?.settings ?? .init()).fields(prefix: prefixes[0]) { setting[key] = value }
        } else {
            prefixes = [NetContract.Settings.receiveLimitPrefix, NetContract.Settings.transmitLimitPrefix]
            for (key, value) in (rate.rx?.settings ?? .init()).fields(prefix: prefixes[0]) { setting[key] = value }
            for (key, value) in (rate.tx?.settings ?? .init()).fields(prefix: prefixes[1]) { setting[key] = value }
        }
        do throws(DeviceActionError) {
            _ = try machine.perform(.reconfigure(removing: prefixes, setting: setting), on: rate.device)
        } catch {
            return .failure(UsageError(message: error.description))
        }
        live.withLock { d in
            if isDisk {
                d.disks[index].rateLimit = rate.limit
            } else {
                d.nics[index].rxRateLimit = rate.rx
                d.nics[index].txRateLimit = rate.tx
            }
        }
        func describe(_ l: VMDefinition.RateLimit?) -> String {
            guard let l, !l.isEmpty else { return "unlimited" }
            return [l.bandwidth.map { "\($0.size) bytes per \($0.refillTimeMs) ms" }, l.ops.map { "\($0.size) ops per \($0.refillTimeMs) ms" }]
                .compactMap { $0 }.joined(separator: ", ")
        }
        return .success(isDisk ? "\(rate.device) rate limit: \(describe(rate.limit))"
                        : "\(rate.device) rate limits: rx \(describe(rate.rx)), tx \(describe(rate.tx))")
    }

    /// What a snapshot keeps of the host side: the VM's definition, its paths absolute and its
    /// name set, from which `hvctl run --restore` builds the same VM.
    func snapshotRecord() -> [UInt8] {
        var saved = live.withLock { $0 }.resolvingPaths(against: absolutePath("."))
        saved.name = name
        // The guest's driver knows its NICs' addresses: a restore keeps them, under any name.
        for i in saved.nics.indices where i < nics.count { saved.nics[i].mac = nics[i].mac }
        // The medium in the drive now, which 'hvctl cdrom insert' may have changed.
        if hasCDROM, let now = medium.withLock({ $0 }) { saved.cdrom = now }
        return Array(saved.encoded().utf8)
    }

    func status(registers: Bool) -> VMStatus {
        let machine = current.machine
        let now = monotonicNanoseconds()
        let devices = (machine?.deviceStatus() ?? []).map { d in
            VMStatus.Device(name: d.name, kind: deviceKind(d.name), pid: d.pid, state: d.state, restarts: d.restarts, binary: d.executable)
        }
        let vcpus = (machine?.vcpuStatus(registers: registers) ?? []).map { v in
            VMStatus.VCPU(id: v.id, state: v.state.name, rip: v.rip.map { "0x" + String($0, radix: 16) },
                          exits: .init(io: v.exits.io, mmio: v.exits.mmio, interrupted: v.exits.interrupted, halt: v.exits.halt))
        }
        let pausedSince = machine?.pausedSince
        let standing = live.withLock { $0 }
        var liveDisks = disks, liveNICs = nics
        for i in liveDisks.indices where i < standing.disks.count { liveDisks[i].rateLimit = standing.disks[i].rateLimit }
        for i in liveNICs.indices where i < standing.nics.count {
            liveNICs[i].rxRateLimit = standing.nics[i].rxRateLimit
            liveNICs[i].txRateLimit = standing.nics[i].txRateLimit
        }
        let taps = liveNICs.contains { $0.tap != nil } ? TapTraffic.read() : [:]
        for i in liveNICs.indices {
            if let tap = liveNICs[i].tap {
                liveNICs[i].traffic = taps[tap]
            } else if let segment = liveNICs[i].segment {
                liveNICs[i].traffic = SegmentTraffic.read(segment: segment, vm: name, nic: liveNICs[i].device)
            }
        }
        return VMStatus(name: name, pid: getpid(), state: machine?.guestStarted != true ? "starting" : pausedSince == nil ? "running" : "paused", boot: bootMode,
                        uptimeSeconds: wholeSeconds(from: started, to: now),
                        pausedSeconds: pausedSince.map { wholeSeconds(from: $0, to: now) },
                        memoryMiB: definition.memoryMiB, cpus: definition.cpus, tenant: tenant, vcpus: vcpus, devices: devices,
                        disks: liveDisks, cdrom: hasCDROM ? VMStatus.CDROM(device: "cdrom0", medium: medium.withLock { $0 }) : nil, nics: liveNICs,
                        consoleLog: consoleLog, consoleAttachable: definition.serial.output == .console,
                        resources: resources.map { r in
                            let use = r.usage()
                            return VMStatus.Resources(cgroups: r.groups.map(\.directory), limits: r.limits, memoryBytes: use.memoryBytes, pids: use.pids)
                        },
                        guestMemoryHostBytes: machine?.guestRAMHostBytes,
                        balloon: standing.balloon == nil ? nil : balloonStatus(machine, now: now))
    }

    /// What hv-balloon published in its state page (untrusted bytes: a record that does not
    /// decode reads as a balloon whose driver has not started).
    private func balloonStatus(_ machine: Machine?, now: UInt64) -> VMStatus.Balloon {
        let page = machine?.statePage(ofDevice: Self.balloonDevice) ?? []
        let start = BalloonContract.statusOffset
        let record = page.count >= start ? BalloonContract.Status(decoding: Array(page[start...])) : nil
        return VMStatus.Balloon(record ?? BalloonContract.Status(), now: now)
    }

    /// The balloon's instance name.
    static let balloonDevice = "balloon0"

    /// Asks the guest to give up `sizeMiB` of its RAM (and/or changes how often it sends
    /// statistics): hv-balloon takes the new settings in place and interrupts the driver.
    private func changeBalloon(_ request: ControlRequest) -> ControlReply {
        guard let machine = current.machine else { return .failure("the VM is between boots; try again") }
        guard var balloon = live.withLock({ $0.balloon }) else {
            return .failure("\(name) has no balloon device: start it with --balloon on (or \"balloon\" in its definition)")
        }
        guard request.sizeMiB != nil || request.statsIntervalSeconds != nil else { return .failure("balloon needs size_mib or stats_interval_s") }
        if let size = request.sizeMiB { balloon.sizeMiB = size }
        if let interval = request.statsIntervalSeconds { balloon.statsIntervalSeconds = interval }
        do throws(UsageError) {
            try balloon.validate { _ in "the statistics interval" }
            try balloon.checkFits(guestMemoryMiB: definition.memoryMiB) { _ in "the balloon size" }
        } catch {
            return .failure(error.message)
        }
        let settings = balloon.settings
        let setting = ["target_pages": String(settings.targetPages), "stats_interval_s": String(settings.statisticsIntervalSeconds)]
        do throws(DeviceActionError) {
            _ = try machine.perform(.reconfigure(removing: ["target_pages", "stats_interval_s"], setting: setting), on: Self.balloonDevice)
        } catch {
            return .failure(error.description)
        }
        live.withLock { $0.balloon = balloon }
        let now = balloonStatus(machine, now: monotonicNanoseconds())
        var said = "balloon of \(name): asked for \(balloon.sizeMiB) MiB (it holds \(now.actualMiB) MiB now)"
        if !now.driverReady { said += "; no driver in the guest runs the balloon yet" }
        return ControlReply(ok: true, message: said, status: status(registers: false))
    }
}

/// Limits as one line: `cpu quota 0.5 CPUs, cpu weight 100, memory 512 MiB, no device cap, 1024 pids`.
public func describeLimits(_ limits: EffectiveLimits) -> String {
    var line = (limits.cpuQuota.map { "cpu quota \($0) CPUs" } ?? "no cpu quota") + ", cpu weight \(limits.cpuWeight), memory \(limits.memoryBytes >> 20) MiB, "
        + (limits.deviceMemoryBytes.map { "\($0 >> 20) MiB a device" } ?? "no device cap") + ", \(limits.pids) pids"
    if let io = limits.diskIO {
        let parts = [("read", io.readBps, "bytes/s"), ("write", io.writeBps, "bytes/s"), ("read", io.readIops, "ops/s"), ("write", io.writeIops, "ops/s")]
            .compactMap { what, value, unit in (value ?? 0) == 0 ? nil : "\(what) \(value!) \(unit)" }
        line += ", disk I/O " + parts.joined(separator: ", ")
    }
    return line
}

/// Makes the VM's cgroups (`ResourceGroups`). Where the host offers no cgroups hv can use, a VM
/// whose definition sets no limit runs without (saying so once); one that sets a limit is refused.
func makeResourceGroups(name: String, _ options: VMDefinition) -> ResourceGroups? {
    let explicit = options.limits ?? .init()
    do throws(UsageError) { try explicit.checkFits(guestMemoryMiB: options.memoryMiB) { "limits.\($0.rawValue)" } } catch {
        fail(error.message, status: 2)
    }
    let parent = getenv("HV_CGROUP_PARENT").flatMap { $0.pointee == 0 ? nil : String(cString: $0) }
    if parent == "none" {
        guard explicit.isEmpty else { fail("--cgroup-parent none runs the VM without cgroups, so it cannot have limits; leave the limits out", status: 2) }
        return nil
    }
    let layout = CGroupLayout.host()
    let effective = EffectiveLimits(explicit, guestMemoryMiB: options.memoryMiB)
    do throws(UsageError) {
        if layout.hierarchies.isEmpty {
            guard explicit.isEmpty else {
                throw UsageError(message: "this host offers hv no cgroup controller (cpu, memory or pids) to limit the VM with; leave the limits out")
            }
            // No cgroup hierarchy mounted at all (`ip netns exec` remounts /sys without one): the
            // VM runs without, as `hvctl status` says; nothing was asked that could not be done.
            return nil
        }
        let groups = try ResourceGroups.create(vm: name, layout: layout, parent: parent, limits: effective, explicit: explicit,
                                               reaperExecutable: executableDirectory() + "/hv-cgroup-reaper")
        segmentSwitchPlacement = groups.outside
        return groups
    } catch {
        guard explicit.isEmpty else { fail(error.message, status: 2) }
        warn("\(error.message); \(name) runs without resource limits")
        return nil
    }
}

/// The kind of a device, from its instance name (`serial0`, `disk1`, `net0`, `device0`, …).
public func deviceKind(_ name: String) -> String {
    for (prefix, kind) in [("serial", "serial"), ("bios", "bios"), ("disk", "disk"), ("cdrom", "cdrom"), ("net", "nic"), ("balloon", "balloon"), ("device", "plugin")]
        where name.hasPrefix(prefix) { return kind }
    return "?"
}

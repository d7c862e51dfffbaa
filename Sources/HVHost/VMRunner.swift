import Glibc
import HVCore
import HVIPC
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
    startSignalWatcher(current)
    let hostMemory = hostMemoryBytes()
    let memoryBytes = options.memoryMiB << 20
    guard memoryBytes <= hostMemory else {
        fail("--memory \(options.memoryMiB)M does not fit: this host has \(hostMemory >> 20)M of RAM", status: 2)
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
    var restore = restore
    if let incoming {
        // Until GO, whatever ends this process tells the source why, so it carries on there.
        FailureReport.install { why in incoming.channel.refuse("the destination failed: \(why)") }
        do throws(MigrationError) {
            try incoming.accept()
            warn("receiving \(name) (\(options.memoryMiB) MiB) from the source")
            restore = try incoming.receiveMemoryAndState()
        } catch {
            fail("migration of \(name) failed: \(error)")
        }
    }

    // The trusted side opens every host file; devices only receive descriptors. Nothing is
    // truncated until every check below has passed.
    let boot: BootFiles, disks: [DiskImage], cdrom: FileDescriptor?
    var outputs: [OutputFile] = []
    do {
        boot = try openBootFiles(options.boot, beneath: options.confinement)
        disks = try openDisks(options)
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
                            disks: disks, hasCDROM: cdrom != nil, nics: nics, current: current)
    do {
        try server.start(handler: control.handle, stream: control.stream)
        try consoleServer?.start()
    } catch {
        fail("cannot serve the control socket: \(error)")
    }
    if let console {
        do { try console.start { current.stop(.userQuit) } } catch { fail("cannot read the terminal: \(error)") }
    }
    defer { console?.restore() }
    // A reset builds the VM afresh (new RAM, devices and firmware), like a power cycle; only the
    // console, the image files and the tenant carry over.
    func prepareDevices() -> (devices: [DeviceSpec], firmwareROM: FileDescriptor?) {
        do {
            let rom = try boot.firmwareSize.map { size throws(SystemError) in try MemFD.create(name: "hv-firmware-rom", size: size) }
            let devices = try platformDevices(options, boot: boot, firmwareROM: rom, serialFiles: serialFiles,
                                              debugOutput: debugOutput, tenant: tenant, disks: disks, cdrom: cdrom, nics: nics)
            return (devices, rom)
        } catch let error as UsageError {
            fail(error.message, status: 2)
        } catch {
            fail("cannot prepare the firmware ROM: \(error)")
        }
    }
    var prepared = prepareDevices()
    var restoring = restore
    // Every check has passed: only now are the console files emptied for this run.
    for output in outputs { output.truncate() }
    // `onRunning` is for the first boot only, not for each reboot.
    let once = Mutex(true)
    while true {
        let devices = prepared.devices, firmwareROM = prepared.firmwareROM
        let machine: Machine
        do {
            let arriving = restoring == nil ? nil : incoming
            machine = try Machine(.init(memoryBytes: memoryBytes, cpus: options.cpus, devices: devices, verbose: verbose,
                                        firmwareROM: firmwareROM, restore: restoring, startPaused: startPaused || arriving != nil,
                                        incoming: arriving))
        } catch {
            if incoming != nil && restoring != nil { fail("cannot build the migrated VM: \(error)") }
            fail(restoring == nil ? "\(error)" : "cannot restore snapshot \(restoring!.directory): \(error)")
        }
        let arriving = restoring == nil ? nil : incoming
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
        switch machine.run() {
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
            fail(why)
        case .migrated:
            return 0
        }
    }
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

    init(name: String, definition: VMDefinition, bootMode: String, tenant: String?, started: UInt64, disks: [DiskImage],
         hasCDROM: Bool, nics: [AttachedNIC], current: CurrentMachine) {
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
        case .stop:
            current.stop(.stopRequested)
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

    /// What a snapshot keeps of the host side: the VM's definition, its paths absolute and its
    /// name set, from which `hvctl run --restore` builds the same VM.
    func snapshotRecord() -> [UInt8] {
        var saved = definition.resolvingPaths(against: absolutePath("."))
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
        return VMStatus(name: name, pid: getpid(), state: machine?.guestStarted != true ? "starting" : pausedSince == nil ? "running" : "paused", boot: bootMode,
                        uptimeSeconds: (now - started) / 1_000_000_000,
                        pausedSeconds: pausedSince.map { (now - $0) / 1_000_000_000 },
                        memoryMiB: definition.memoryMiB, cpus: definition.cpus, tenant: tenant, vcpus: vcpus, devices: devices,
                        disks: disks, cdrom: hasCDROM ? VMStatus.CDROM(device: "cdrom0", medium: medium.withLock { $0 }) : nil, nics: nics,
                        consoleLog: consoleLog, consoleAttachable: definition.serial.output == .console)
    }
}

/// The kind of a device, from its instance name (`serial0`, `disk1`, `net0`, `device0`, …).
public func deviceKind(_ name: String) -> String {
    for (prefix, kind) in [("serial", "serial"), ("bios", "bios"), ("disk", "disk"), ("cdrom", "cdrom"), ("net", "nic"), ("device", "plugin")]
        where name.hasPrefix(prefix) { return kind }
    return "?"
}

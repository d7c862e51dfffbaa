import Glibc
import HVCore
import HVIPC
import HVSys
import Synchronization

// hvctl: the operator's command. `hvctl run` builds a VM from flags and runs it in this process,
// which is the VM's trusted core; devices run as separate processes it supervises.

func warn(_ message: String) {
    let line = "hvctl: \(message)\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
}

/// What a running `hvctl run` must undo on every way out: its control socket and lock, its
/// segment memberships. Run by `exit` (atexit), so fail(), a signal during start-up and a normal
/// return all clean up the same way.
enum ExitCleanup {
    private static let actions = Mutex<[@Sendable () -> Void]>([])
    private static let installed = Atomic<Bool>(false)

    /// Adds `action`; actions run once, last added first.
    static func add(_ action: @escaping @Sendable () -> Void) {
        if !installed.exchange(true, ordering: .acquiringAndReleasing) { atexit { ExitCleanup.runAll() } }
        actions.withLock { $0.append(action) }
    }

    /// Held while a resource is created and its clean-up registered, so a signal never ends
    /// hvctl between the two (a lock file created, its removal not yet registered).
    private static let creating = Mutex<Void>(())

    /// Runs `body` (create something, register its clean-up) as one step against `exitNow`.
    static func creating<T>(_ body: () throws(UsageError) -> T) throws(UsageError) -> T {
        try creating.withLock { _ throws(UsageError) in try body() }
    }

    /// Exits with `status` (running every clean-up), but not in the middle of `creating`.
    static func exitNow(_ status: Int32) -> Never {
        creating.withLock { _ in exit(status) }
    }

    static func runAll() {
        let pending = actions.withLock { list -> [@Sendable () -> Void] in
            defer { list.removeAll() }
            return list
        }
        for action in pending.reversed() { action() }
    }
}

func fail(_ message: String, status: Int32 = 1) -> Never {
    let line = "hvctl: \(message)\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    exit(status)
}

/// Takes SIGINT/SIGTERM/SIGHUP for the whole life of `hvctl run` (they are blocked in every
/// thread). Before a VM exists — while files are opened, segments joined, devices spawned — a
/// signal ends hvctl at once, cleaning up on the way; once a VM runs it stops that VM, exactly
/// as Machine.run does when it takes the signal itself.
func startSignalWatcher(_ current: CurrentMachine) {
    var set = sigset_t()
    sigemptyset(&set)
    for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
    let signals = set
    do {
        try HostThread.spawn(name: "hv-signals") {
            var waitSet = signals
            while true {
                var sig: Int32 = 0
                guard sigwait(&waitSet, &sig) == 0 else { continue }
                if current.machine == nil {
                    current.stop(.signal(sig))
                    ExitCleanup.exitNow(128 + sig)
                }
                current.stop(.signal(sig))
            }
        }
    } catch {
        fail("cannot start the signal thread: \(error)")
    }
}

let topLevelHelp = """
usage: hvctl <command> [options]

commands:
  run       boot a VM (with no options: the built-in demo guest)
  sandbox   'sandbox show DEVICE': the effective sandbox profile of a device
  disk      'disk create PATH --size 20G': a new sparse raw disk image
  ls        list running VMs (their control sockets in $HV_RUN_DIR, default /run/hv)
  status    'status NAME [--json]': one running VM and its device processes
  stop      'stop NAME': stop a running VM
  cdrom     'cdrom NAME eject' or 'cdrom NAME insert ISO': change a running VM's CD
  device    'device NAME ls', 'device NAME restart DEV', 'device NAME upgrade DEV --binary PATH':
            a running VM's device processes; restart one, or replace its binary under the running guest
  net       'net ls [--json]': private network segments, their member NICs and traffic counters
  version   print hv's version and IPC protocol version
  help      show this help

'hvctl <command> --help' describes a command.
"""

/// Directory holding hvctl and the device executables built beside it.
func executableDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return "." }
    let path = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return String(path[..<slash])
}

func deviceExecutable(_ name: String) -> String {
    let path = executableDirectory() + "/" + name
    guard access(path, X_OK) == 0 else {
        fail("device executable '\(name)' not found next to hvctl (\(path)); rebuild hv with 'swift build'")
    }
    return path
}

func hostMemoryBytes() -> UInt64 {
    UInt64(max(sysconf(Int32(_SC_PHYS_PAGES)), 0)) * UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 0))
}

/// The VM that is running now; a reboot replaces it. The console's quit key reaches whichever
/// VM is current, and a quit typed between two boots is not lost.
final class CurrentMachine: @unchecked Sendable {
    // @unchecked: every field is under `lock`.
    private let lock = Mutex<(machine: Machine?, exit: MachineExit?)>((nil, nil))
    func install(_ machine: Machine) {
        let exit = lock.withLock { state -> MachineExit? in
            state.machine = machine
            return state.exit
        }
        if let exit { machine.stop(exit) }
    }
    /// Stops the current VM (and any the loop would build next) with `exit`.
    func stop(_ exit: MachineExit) {
        let machine = lock.withLock { state -> Machine? in
            if state.exit == nil { state.exit = exit }
            return state.machine
        }
        machine?.stop(exit)
    }
    var machine: Machine? { lock.withLock { $0.machine } }
}

/// The host files that stay open across reboots: the guest image, the initrd, the firmware.
struct BootFiles {
    var image: FileDescriptor
    var initrd: FileDescriptor?
    var firmwareSize: Int?
    var mode: String
}

/// Opens an input file the operator named, for reading: never blocks (a FIFO is refused, not
/// waited on), must be a regular file, and at most `maximumSize` when given. One line on failure.
func openInput(_ path: String, what: String, maximumSize: Int64? = nil) throws(UsageError) -> FileDescriptor {
    do { return try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: maximumSize) } catch {
        throw UsageError(message: "cannot open \(what) '\(path)': \(error)")
    }
}

/// The largest guest image, kernel or initrd hv loads (the BIOS device's own limit).
let maximumImageBytes: Int64 = 1 << 30

func openBootFiles(_ options: RunOptions) throws(UsageError) -> BootFiles {
    if let path = options.firmware {
        let image = try openInput(path, what: "firmware image")
        let size = (try? image.size()) ?? 0
        guard size >= 65536, size <= 16 << 20, size % 65536 == 0 else {
            throw UsageError(message: "firmware image '\(path)' is \(size) bytes: a BIOS image is a multiple of 64 KiB, at most 16 MiB (install Debian's 'seabios' package for --firmware seabios)")
        }
        return BootFiles(image: image, firmwareSize: Int(size), mode: "firmware")
    } else if let path = options.kernel {
        let image = try openInput(path, what: "kernel", maximumSize: maximumImageBytes)
        if (try? image.size()) == 0 { throw UsageError(message: "kernel '\(path)' is empty: give a bzImage") }
        var initrd: FileDescriptor?
        if let initrdPath = options.initrd { initrd = try openInput(initrdPath, what: "initrd", maximumSize: maximumImageBytes) }
        return BootFiles(image: image, initrd: initrd, mode: "linux")
    } else if let path = options.multiboot {
        let image = try openInput(path, what: "guest image", maximumSize: maximumImageBytes)
        if (try? image.size()) == 0 { throw UsageError(message: "guest image '\(path)' is empty") }
        return BootFiles(image: image, mode: "multiboot")
    } else {
        do {
            let image = try MemFD.create(name: "hv-demo-guest", size: DemoGuest.image().count)
            try image.writeAll(DemoGuest.image())
            return BootFiles(image: image, mode: "multiboot")
        } catch {
            throw UsageError(message: "cannot prepare the demo guest: \(error)")
        }
    }
}

/// A disk image the trusted side opened, locked and checked.
struct DiskImage {
    var path: String
    var file: FileDescriptor
    var readOnly: Bool
}

/// Opens an ISO read-only with a shared lock (several VMs may share an ISO; nobody may write it),
/// for --cdrom and for `hvctl cdrom insert`; the error is one line naming the image. The file must
/// be a regular file holding an ISO 9660 or UDF volume (checked from its content), and the open
/// never blocks: the control socket's thread runs this for `cdrom insert`.
func openISO(_ path: String, what: String) -> Result<FileDescriptor, UsageError> {
    let file: FileDescriptor
    do { file = try openInput(path, what: what) } catch { return .failure(error) }
    if let problem = ISOImage.problem(file) {
        return .failure(UsageError(message: "\(what) '\(path)' is not a CD image: \(problem)"))
    }
    guard flock(file.rawValue, LOCK_SH | LOCK_NB) == 0, file.tryLockWholeFile(exclusive: false) else {
        return .failure(UsageError(message: "\(what) '\(path)' is locked for writing by another process"))
    }
    return .success(file)
}

/// Recognises a CD image by content: an ISO 9660 volume descriptor ("CD001") or UDF's volume
/// recognition sequence ("BEA01", "NSR02", "NSR03") in the 2048-byte sectors from 16 on (ECMA-119
/// §8, ECMA-167 2/8.3).
enum ISOImage {
    static let sectorSize: Int64 = 2048
    static let firstDescriptorSector: Int64 = 16

    /// Why `file` is not a CD image, or nil when it is one.
    static func problem(_ file: FileDescriptor) -> String? {
        let size = (try? file.size()) ?? 0
        guard size >= (firstDescriptorSector + 1) * sectorSize else {
            return "it is \(size) bytes, too small to hold an ISO 9660 or UDF volume (at least \((firstDescriptorSector + 1) * sectorSize))"
        }
        let identifiers: [[UInt8]] = ["CD001", "BEA01", "NSR02", "NSR03"].map { Array($0.utf8) }
        var header = [UInt8](repeating: 0, count: 6)
        for sector in firstDescriptorSector..<min(firstDescriptorSector + 16, size / sectorSize) {
            let n = header.withUnsafeMutableBytes { (try? file.read(into: $0, at: sector * sectorSize)) ?? 0 }
            guard n == header.count else { break }
            if identifiers.contains(Array(header[1...5])) { return nil }
        }
        return "no ISO 9660 or UDF volume descriptor at sector 16 (make one with xorriso or genisoimage)"
    }
}

func openCDROM(_ options: RunOptions) throws(UsageError) -> FileDescriptor? {
    guard let path = options.cdrom else { return nil }
    return try openISO(path, what: "the --cdrom image").get()
}

/// Opens every --disk: a missing, unreadable, locked or empty image, one that is not whole
/// sectors, or the same file given twice is a one-line error before the VM starts.
func openDisks(_ options: RunOptions) throws(UsageError) -> [DiskImage] {
    var disks: [DiskImage] = []
    var seen: [(dev: UInt64, ino: UInt64, path: String)] = []
    for spec in options.disks {
        let parts = spec.split(separator: ",").map(String.init)
        let path = parts[0], readOnly = parts.count > 1
        let file: FileDescriptor
        do { file = try FileDescriptor.openHostFile(path, flags: readOnly ? O_RDONLY : O_RDWR, kinds: .regular) } catch {
            let denied = error.errno == .permissionDenied || error.errno?.rawValue == EROFS
            let hint = !readOnly && denied ? " (add ,readonly for a read-only disk)" : ""
            throw UsageError(message: "cannot open disk image '\(path)'\(readOnly ? "" : " for writing"): \(error)\(hint)")
        }
        var st = stat()
        guard fstat(file.rawValue, &st) == 0 else { throw UsageError(message: "cannot stat disk image '\(path)': \(Errno.current)") }
        if let other = seen.first(where: { $0.dev == UInt64(st.st_dev) && $0.ino == UInt64(st.st_ino) }) {
            throw UsageError(message: "disk image '\(path)' is given twice (also as '\(other.path)'): one process per image")
        }
        seen.append((UInt64(st.st_dev), UInt64(st.st_ino), path))
        guard st.st_size > 0, st.st_size % 512 == 0 else {
            throw UsageError(message: "disk image '\(path)' is \(st.st_size) bytes: a disk is a non-zero whole number of 512-byte sectors (make one with 'hvctl disk create')")
        }
        // Another VM (or tool) writing the same image would corrupt it: take a lock, shared for
        // read-only use, exclusive for writing; both the flock hv always took and an OFD byte-range
        // lock over the whole file, which QEMU's image locking also sees.
        guard flock(file.rawValue, (readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) == 0, file.tryLockWholeFile(exclusive: !readOnly) else {
            throw UsageError(message: "disk image '\(path)' is locked by another process (another VM using it?); stop that first")
        }
        disks.append(DiskImage(path: path, file: file, readOnly: readOnly))
    }
    return disks
}

/// An output file the operator named (--serial file:, --debugcon file:): opened for writing
/// without truncating, so a refused start (a name already taken, a file in use) destroys
/// nothing; locked so that two VMs never write one file; truncated only by `truncate()`, once
/// every check of the start-up has passed.
struct OutputFile {
    var path: String
    var file: FileDescriptor
    var isRegular: Bool

    static func open(_ path: String, what: String) throws(UsageError) -> OutputFile {
        let file: FileDescriptor
        do {
            file = try FileDescriptor.openHostFile(path, flags: O_WRONLY | O_CREAT | O_APPEND, kinds: [.regular, .characterDevice])
        } catch {
            throw UsageError(message: "cannot open \(what) '\(path)': \(error)")
        }
        var st = stat()
        let isRegular = fstat(file.rawValue, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
        if isRegular && !file.tryLockWholeFile(exclusive: true) {
            throw UsageError(message: "\(what) '\(path)' is in use (another VM writes its console there, or this VM names it twice); give another file")
        }
        return OutputFile(path: path, file: file, isRegular: isRegular)
    }

    /// Empties the file; a console starts afresh for every run.
    func truncate() {
        if isRegular { _ = ftruncate(file.rawValue, 0) }
    }
}

func run(_ options: RunOptions) -> Int32 {
    // Stop signals are taken synchronously (by the signal thread, and by Machine.run on the main
    // thread); block them before any thread (the console's, the supervisor's, vCPUs) exists, so
    // none of those inherits an unblocked mask and lets a SIGTERM kill hvctl without a clean stop.
    _ = Machine.blockStopSignals()
    let current = CurrentMachine()
    startSignalWatcher(current)
    let hostMemory = hostMemoryBytes()
    guard options.memory <= hostMemory else {
        fail("--memory \(options.memory >> 20)M does not fit: this host has \(hostMemory >> 20)M of RAM", status: 2)
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

    // The trusted side opens every host file; devices only receive descriptors. Nothing is
    // truncated until every check below has passed.
    let boot: BootFiles, disks: [DiskImage], cdrom: FileDescriptor?
    var outputs: [OutputFile] = []
    do {
        boot = try openBootFiles(options)
        disks = try openDisks(options)
        cdrom = try openCDROM(options)
        if options.serial.hasPrefix("file:") { outputs.append(try OutputFile.open(String(options.serial.dropFirst(5)), what: "the --serial file")) }
        if let path = options.debugcon { outputs.append(try OutputFile.open(path, what: "the --debugcon file")) }
    } catch {
        fail(error.message)
    }
    sandboxSegments = options.sandbox
    sweepStaleSegments()
    let nics = attachNICs(options, vmName: name, verbose: options.verbose)

    var serialFiles: [FileDescriptor] = []
    var console: Console?
    do {
        switch options.serial {
        case "stdio":
            // A duplicate: wrapping fd 1 itself would close hvctl's stdout when the wrapper goes.
            serialFiles.append(FileDescriptor(owning: try check("dup stdout", fcntl(1, F_DUPFD_CLOEXEC, 3))))
            let c = try Console()
            serialFiles.append(c.deviceInput)
            console = c
        case "none":
            serialFiles.append(try FileDescriptor.open("/dev/null", flags: O_WRONLY))
        default:
            serialFiles.append(outputs[0].file)
        }
    } catch {
        fail("cannot set up the serial port (\(options.serial)): \(error)")
    }

    let debugOutput: FileDescriptor
    if options.debugcon != nil {
        debugOutput = outputs[outputs.count - 1].file
    } else {
        do { debugOutput = try FileDescriptor.open("/dev/null", flags: O_WRONLY) } catch {
            fail("cannot open /dev/null for the debug console: \(error.errno)")
        }
    }
    // Every device is jailed under the VM's tenant unless --no-sandbox.
    let tenant = options.sandbox ? options.tenant ?? "vm-\(getpid())" : nil
    if tenant == nil {
        warn("WARNING: --no-sandbox: every device process runs unconfined, with hvctl's own privileges (root). A device bug or a hostile guest can take over this host. Use only for debugging.")
    }

    let started = monotonicNanoseconds()
    do {
        try server.start(status: {
            let devices = current.machine?.deviceStatus() ?? []
            let list = devices.map { d in
                "{\"name\": \(jsonString(d.name)), \"pid\": \(d.pid ?? 0), \"restarts\": \(d.restarts), \"state\": \(jsonString(d.state)), "
                    + "\"binary\": \(jsonString(d.executable))}"
            }
            return "{\"name\": \(jsonString(name)), \"pid\": \(getpid()), \"boot\": \(jsonString(boot.mode)), "
                + "\"uptime_seconds\": \((monotonicNanoseconds() - started) / 1_000_000_000), \"memory_mib\": \(options.memory >> 20), "
                + "\"cpus\": \(options.cpus), \"tenant\": \(jsonString(tenant ?? "none (--no-sandbox)")), \"devices\": [\(list.joined(separator: ", "))]}"
        }, stop: { current.stop(.stopRequested) }, other: { command in
            if command.hasPrefix("device ") { return deviceAction(command, machine: current.machine) }
            guard command.hasPrefix("cdrom ") else { return nil }
            guard cdrom != nil, let machine = current.machine else {
                return #"{"error": "this VM has no CD-ROM drive (start it with --cdrom)"}"#
            }
            var file: FileDescriptor?
            if command.hasPrefix("cdrom insert ") {
                switch openISO(String(command.dropFirst(13)), what: "the ISO") {
                case .success(let opened): file = opened
                case .failure(let error): return "{\"error\": \(jsonString(error.message))}"
                }
            } else if command != "cdrom eject" {
                return nil
            }
            do throws(MediaChangeError) { try machine.changeMedium(device: "cdrom0", file: file) } catch {
                return "{\"error\": \(jsonString(error.description))}"
            }
            return #"{"ok": true}"#
        })
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
    // Every check has passed: only now are the console files emptied for this run.
    for output in outputs { output.truncate() }
    while true {
        let devices = prepared.devices, firmwareROM = prepared.firmwareROM
        let machine: Machine
        do {
            machine = try Machine(.init(memoryBytes: options.memory, cpus: options.cpus, devices: devices, verbose: options.verbose,
                                        firmwareROM: firmwareROM))
        } catch {
            fail("\(error)")
        }
        current.install(machine)
        switch machine.run() {
        case .poweredOff:
            return 0
        case .resetRequested:
            if options.noReboot {
                warn("the guest asked for a reset; stopping (--no-reboot)")
                return 0
            }
            if options.verbose { warn("the guest asked for a reset; rebooting") }
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
        }
    }
}

/// Serves `device restart DEV` and `device upgrade DEV PATH` on the control socket.
func deviceAction(_ command: String, machine: Machine?) -> String {
    let words = command.split(separator: " ", maxSplits: 3).map(String.init)
    guard let machine else { return #"{"error": "the VM is between boots; try again"}"# }
    let action: DeviceAction
    switch (words.count, words.count > 1 ? words[1] : "") {
    case (3, "restart"): action = .restart
    case (4, "upgrade"): action = .upgrade(binary: words[3])
    default: return #"{"error": "unknown device command; use device restart DEV or device upgrade DEV PATH"}"#
    }
    do throws(DeviceActionError) {
        return "{\"ok\": \(jsonString(try machine.perform(action, on: words[2])))}"
    } catch {
        return "{\"error\": \(jsonString(error.description))}"
    }
}

/// The serial port, the BIOS/platform device and any --device plugins, each planned into its
/// tenant's sandbox.
func platformDevices(_ options: RunOptions, boot: BootFiles, firmwareROM: FileDescriptor?, serialFiles: [FileDescriptor],
                     debugOutput: FileDescriptor, tenant: String?, disks: [DiskImage], cdrom: FileDescriptor?,
                     nics: [AttachedNIC]) throws -> [DeviceSpec] {
    // The CD-ROM drive is PCI 00:0d.0; with one, the firmware boots it first.
    let cdromBDF: UInt64 = 0x0D << 3
    let bootOrder = cdrom == nil ? "" : "/pci@i0cf8/*@d/*@0/*@0,0"
    var biosFiles = [boot.image, firmwareROM ?? boot.image, debugOutput]
    if let initrd = boot.initrd { biosFiles.append(initrd) }
    var devices = [
        DeviceSpec(name: "serial0", executable: deviceExecutable("hv-serial"),
                   resources: [Resource(kind: .pio, base: 0x3F8, length: 8)], interruptGSIs: [4],
                   hostFiles: serialFiles, capabilities: [.statePage]),
        DeviceSpec(name: "bios", executable: deviceExecutable("hv-bios"),
                   resources: BIOSResources.all, interruptGSIs: [8, 1],  // RTC, keyboard
                   hostFiles: biosFiles,
                   config: ["mode=\(boot.mode)", "cpus=\(options.cpus)", "boot_menu=\(options.bootMenu ? 1 : 0)",
                            "initrd=\(boot.initrd == nil ? 0 : 1)", "boot_order=\(bootOrder)",
                            "cmdline=\(options.commandLine)"].joined(separator: "\n"),
                   capabilities: [.bootControl, .statePage], mapsGuestMemory: true),
    ]
    var profiles = ["serial0": "serial", "bios": "bios"]
    // Each disk is its own virtio-scsi adapter (PCI 00:04.0, 00:05.0, …) in its own process.
    for (i, disk) in disks.enumerated() {
        let bdf = UInt64((4 + i) << 3)
        devices.append(DeviceSpec(name: "disk\(i)", executable: deviceExecutable("hv-scsi"),
                                  resources: [Resource(kind: .pciConfig, base: bdf, length: 256),
                                              Resource(kind: .pciMMIOBar, base: bdf << 8, length: 0x4000)],
                                  hostFiles: [disk.file],
                                  config: "readonly=\(disk.readOnly ? 1 : 0)\nserial=hv-disk\(i)",
                                  capabilities: [.interruptLevel, .msi, .statePage], mapsGuestMemory: true))
        profiles["disk\(i)"] = "scsi"
    }
    if let cdrom {
        devices.append(DeviceSpec(name: "cdrom0", executable: deviceExecutable("hv-scsi"),
                                  resources: [Resource(kind: .pciConfig, base: cdromBDF, length: 256),
                                              Resource(kind: .pciMMIOBar, base: cdromBDF << 8, length: 0x4000)],
                                  hostFiles: [cdrom], config: "kind=cdrom", capabilities: [.interruptLevel, .msi, .statePage], mapsGuestMemory: true))
        profiles["cdrom0"] = "scsi"
    }
    // Each NIC is its own virtio-net process at PCI 00:10.0, 00:11.0, …
    for (i, nic) in nics.enumerated() {
        let bdf = UInt64((0x10 + i) << 3)
        devices.append(DeviceSpec(name: "net\(i)", executable: deviceExecutable("hv-net"),
                                  resources: [Resource(kind: .pciConfig, base: bdf, length: 256),
                                              Resource(kind: .pciMMIOBar, base: bdf << 8, length: 0x4000)],
                                  hostFiles: nic.files, config: "backend=\(nic.backend)\nmac=\(formatMAC(nic.mac))",
                                  capabilities: [.interruptLevel, .msi, .statePage], mapsGuestMemory: true))
        profiles["net\(i)"] = "net"
    }
    do {
        if let tenant {
            for i in devices.indices {
                guard let profile = profiles[devices[i].name] else { continue }
                devices[i].sandbox = try DeviceCatalog.plan(profilePath: try DeviceCatalog.builtInProfilePath(profile), tenant: tenant)
            }
        }
        for (i, spec) in options.plugins.enumerated() { devices.append(try pluginDevice(spec, index: i, tenant: tenant)) }
    } catch {
        throw UsageError(message: error.message)
    }
    return devices
}

/// The BIOS device's register windows, in the order its model numbers them (resource index).
enum BIOSResources {
    static let all: [Resource] = [
        Resource(kind: .pio, base: 0x70, length: 2),     // 0: CMOS/RTC
        Resource(kind: .pio, base: 0x402, length: 1),    // 1: debug console
        Resource(kind: .pio, base: 0x510, length: 2),    // 2: fw_cfg selector/data
        Resource(kind: .pio, base: 0x514, length: 8),    // 3: fw_cfg DMA
        Resource(kind: .pio, base: 0xCF9, length: 1),    // 4: PIIX3 reset control (the core's PCI host owns the rest of 0xCF8–0xCFF)
        Resource(kind: .pio, base: 0x92, length: 1),     // 5: port A (fast A20, fast reset)
        Resource(kind: .pio, base: 0x60, length: 1),     // 6: i8042 data
        Resource(kind: .pio, base: 0x64, length: 1),     // 7: i8042 status/command
        Resource(kind: .pio, base: 0x600, length: 16),   // 8: PIIX4 ACPI PM (PM1 event/control, PM timer)
        Resource(kind: .pciConfig, base: 0x00, length: 256),  // 9: 00:00.0 i440FX host bridge
        Resource(kind: .pciConfig, base: 0x08, length: 256),  // 10: 00:01.0 PIIX3 ISA bridge
        Resource(kind: .pciConfig, base: 0x0B, length: 256),  // 11: 00:01.3 PIIX4 power management
    ]
}

var arguments = CommandLine.arguments.dropFirst()
switch arguments.popFirst() {
case "run"?:
    do {
        guard let options = try RunOptions.parse(arguments) else {
            print(RunOptions.help)
            exit(0)
        }
        exit(run(options))
    } catch {
        fail("\(error.message); see 'hvctl run --help'", status: 2)
    }
case "sandbox"?:
    do { exit(try sandboxCommand(arguments)) } catch { fail(error.message, status: 2) }
case "cdrom"?:
    do { exit(try cdromCommand(arguments)) } catch { fail(error.message, status: 2) }
case "device"?:
    do { exit(try deviceCommand(arguments)) } catch { fail(error.message, status: 2) }
case "ls"?, "status"?, "stop"?:
    do { exit(try vmCommand(CommandLine.arguments[1], arguments)) } catch { fail(error.message, status: 2) }
case "disk"?:
    do { exit(try diskCommand(arguments)) } catch { fail(error.message, status: 2) }
case "net"?:
    do { exit(try netCommand(arguments)) } catch { fail(error.message, status: 2) }
case "version"?, "--version"?:
    print("hv 0.1.0 (IPC protocol \(ProtocolVersion.major).\(ProtocolVersion.minor))")
case "help"?, "-h"?, "--help"?:
    print(topLevelHelp)
case nil:
    fail("no command given; try 'hvctl run' to boot the demo guest, or 'hvctl help'", status: 2)
case let other?:
    fail("unknown command '\(other)'; see 'hvctl help'", status: 2)
}

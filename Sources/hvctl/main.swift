import ArgumentParser
import Glibc
import HVCore
import HVHost
import HVIPC
import HVSys
import Synchronization

// hvctl: the operator's command. It parses arguments and prints; the trusted host layer (HVHost)
// builds and runs VMs, and `hvctl run` is the VM's core process.
//
// Exit status, for every subcommand: 0 success, 1 a failure at run time (one line says why),
// 2 a usage error (a wrong flag, value or name), 128+N when `hvctl run` is stopped by signal N.
//
// Every command names itself (`commandName:`): without it, swift-argument-parser derives the
// name with String(describing:) of the type, whose first dynamic cast per type scans every
// protocol conformance in this static binary; for the 33 commands that was ~3 ms of each
// hvctl invocation, `hvctl run` included (BENCHMARKS.md, "Launch").

struct HVCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hvctl",
        abstract: "Run and manage hv virtual machines.",
        discussion: """
            Exit status: 0 on success, 1 on a failure at run time, 2 on a usage error; 'hvctl run' \
            also exits 128+N when stopped by signal N. Running VMs are found through their control \
            sockets in $HV_RUN_DIR (default /run/hv).
            """,
        version: "hv 0.1.0 (IPC protocol \(ProtocolVersion.major).\(ProtocolVersion.minor))",
        subcommands: [Run.self, List.self, Status.self, Start.self, Stop.self, Pause.self, Resume.self, Snapshot.self, Migrate.self, Console.self, Logs.self, CDROM.self, Device.self,
                      Disk.self, Net.self, Sandbox.self, Plugin.self, Tenant.self, SetLimits.self, Balloon.self, Version.self])
}

/// A rate limit for `status`: `  limit 10485760 bytes/1000 ms, 500 ops/1000 ms`; empty when none.
func describeRate(_ limit: VMDefinition.RateLimit?, _ label: String) -> String {
    guard let limit, !limit.isEmpty else { return "" }
    return label + [limit.bandwidth.map { "\($0.size) bytes/\($0.refillTimeMs) ms" }, limit.ops.map { "\($0.size) ops/\($0.refillTimeMs) ms" }]
        .compactMap { $0 }.joined(separator: ", ")
}

/// A VM name given as an argument, checked as `--name` is.
struct VMName: ParsableArguments {
    @Argument(help: ArgumentHelp("The VM's name (see 'hvctl ls').", valueName: "name"))
    var name: String

    mutating func validate() throws {
        try RunDirectory.validate(name, flag: "name")
    }
}

/// Sends `request` to VM `name`; ends hvctl with one line when it does not answer or refuses.
func ask(_ name: String, _ request: ControlRequest, timeoutSeconds: Int = 5) -> ControlReply {
    guard let reply = controlRequest(name, request, timeoutSeconds: timeoutSeconds) else { failNoAnswer(name) }
    if !reply.ok { fail(reply.error ?? "VM '\(name)' refused '\(request.command.rawValue)'") }
    return reply
}

/// hvd's answer to a change it is asked for, when hvd runs and keeps VM `name`; nil when it
/// does not (no hvd, or a VM hvd does not keep): the caller then talks to the VM itself.
func throughHVD(_ name: String, _ method: String, _ action: String, body: [UInt8]? = nil) -> HVDClient.Response? {
    guard let kept = HVDClient.request("GET", "/v1/vms/\(name)", timeoutSeconds: 5), kept.status == 200 else { return nil }
    guard let answer = HVDClient.request(method, "/v1/vms/\(name)\(action)", body: body, timeoutSeconds: 120) else {
        fail("hvd stopped answering on \(HVDClient.socketPath) during '\(action)'")
    }
    guard (200..<300).contains(answer.status) else { fail(answer.errorMessage) }
    return answer
}

/// Ends a command whose VM did not answer: either there is no such VM, or it runs and is not answering.
func failNoAnswer(_ name: String) -> Never {
    switch vmPresence(name) {
    case .gone: fail("no VM named '\(name)' is running (see 'hvctl ls')")
    case .live(let pid):
        fail("VM '\(name)'\(pid.map { " (pid \($0))" } ?? "") is running but did not answer on \(RunDirectory.socket(name)) within 5 s; try again, or 'kill \(pid.map { "\($0)" } ?? "PID")' to stop it")
    }
}

func pad(_ s: String, _ width: Int) -> String { s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count) }

/// A long operation's percentage on one stderr line, redrawn as it changes; nothing when stderr
/// is not a terminal.
struct TerminalProgress {
    let label: String
    let terminal = isatty(2) == 1
    private var shown = -1

    init(_ label: String) { self.label = label }

    mutating func show(_ done: UInt64, of total: UInt64) {
        let percent = total == 0 ? 100 : Int(done * 100 / total)
        guard terminal, percent != shown else { return }
        shown = percent
        let line = "\r\(label): \(percent)%"
        _ = line.withCString { write(2, $0, strlen($0)) }
    }

    /// Ends the line, if one was drawn.
    func end() {
        if terminal && shown >= 0 { _ = "\n".withCString { write(2, $0, 1) } }
    }
}

func printJSON<T: Encodable>(_ value: T) {
    print(String(decoding: ControlJSON.encode(value, pretty: true), as: UTF8.self))
}

// MARK: run

extension HVCtl {
    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "run",
            abstract: "Boot a VM (with no options: hv's built-in demo guest).",
            discussion: """
                The VM is described by the flags below or by a JSON document (--config); \
                --print-config prints the document the flags (or --restore's snapshot) describe instead of running it. With \
                --serial stdio on a terminal, keystrokes go to the guest; Ctrl-A x quits (Ctrl-A \
                Ctrl-A sends a literal Ctrl-A). Exits 0 when the guest powers off (ACPI S5), halts \
                every vCPU with interrupts disabled, or asks for a reset under --no-reboot (a reset \
                otherwise reboots the VM afresh); 1 on a guest or VMM failure; 2 on a usage error; \
                128+N when stopped by signal N.
                """)

        @OptionGroup var flags: DefinitionFlags
        @Option(help: ArgumentHelp("Run the VM this JSON document describes (see docs/vm-definition.md); --name may rename it.", valueName: "file"))
        var config: String?
        @Flag(help: "Print the VM's definition as JSON (paths made absolute) instead of running it.")
        var printConfig = false
        @Flag(name: [.long, .short], help: "Report device starts and debug logs on stderr.")
        var verbose = false
        @Flag(help: ArgumentHelp("""
            Run the VM in the background and return once the guest runs; its serial console goes to \
            $HV_RUN_DIR/NAME.log ('hvctl logs NAME') and 'hvctl console NAME' attaches to it.
            """))
        var detach = false
        @Option(help: ArgumentHelp("Bring back the VM saved in this directory by 'hvctl snapshot' (only --name, --serial, --detach, --paused, --clone, --mac and --print-config may be added).", valueName: "dir"))
        var restore: String?
        @Flag(help: "With --restore: leave the restored VM paused ('hvctl resume NAME' starts it).")
        var paused = false
        @Flag(help: ArgumentHelp("""
            With --restore: start a new VM (--name is required) from the snapshot, as a template: NICs get \
            MACs of the new name (or --mac), each writable disk a new qcow2 overlay on the template's \
            image in DIR/clones/NAME/, so the template's disks are never written.
            """))
        var clone = false
        @Option(help: ArgumentHelp("With --clone: the MAC of the clone's next NIC (repeat for each).", valueName: "mac"))
        var mac: [String] = []
        @Option(help: ArgumentHelp("""
            Wait on tcp:HOST:PORT for a VM that 'hvctl migrate NAME --to tcp:HOST:PORT' sends from another \
            host, and run it (only --name, --serial, --detach, -v and --key or --insecure-plaintext may be added).
            """, valueName: "address"))
        var incoming: String?
        @Option(help: ArgumentHelp("""
            With --incoming: the key file the source's 'hvctl migrate --key' names too (at least 32 random \
            bytes, mode 600). Only a host holding it can send this VM, and the stream is encrypted.
            """, valueName: "file"))
        var key: String?
        @Flag(help: ArgumentHelp("""
            With --incoming: take a VM over plain TCP, unauthenticated and unencrypted: anyone who can \
            reach the address can send this host a VM (and read its memory on the way). Only on a network \
            nobody else can reach.
            """))
        var insecurePlaintext = false
        /// For a program that runs hvctl as its VM (hv-firecracker): SIGTERM when that program
        /// dies, whatever kills it, so the VM stops in order instead of outliving it.
        @Option(help: .private) var exitWithParent: Int32?
        @Option(help: ArgumentHelp("""
            Put the VM's cgroups under this group (a path in each cgroup hierarchy, e.g. /hv.slice; \
            default: the group hvctl runs in; 'none': no cgroups, no limits). Also $HV_CGROUP_PARENT.
            """, valueName: "path"))
        var cgroupParent: String?

        func run() throws {
            if let cgroupParent {
                guard cgroupParent == "none" || (cgroupParent.hasPrefix("/") && !cgroupParent.split(separator: "/").contains("..")) else {
                    throw UsageError(message: "invalid --cgroup-parent '\(cgroupParent)': give an absolute group path such as /hv.slice, or none")
                }
                setenv("HV_CGROUP_PARENT", cgroupParent, 1)
            }
            if let parent = exitWithParent, !signalWhenParentDies(SIGTERM, parent: parent) {
                fail("--exit-with-parent \(parent): that process is gone")
            }
            var definition: VMDefinition
            var snapshot: MachineSnapshot?
            if let incoming {
                guard restore == nil, config == nil, !flags.anyGivenButSerial, !printConfig, !paused, !clone, mac.isEmpty else {
                    throw UsageError(message: "--incoming takes the VM as the source describes it: only --name, --serial, --detach, -v and --key or --insecure-plaintext may be added")
                }
                let address = try MigrationAddress.parse(incoming, flag: "--incoming")
                let sharedKey = try migrationKey(key, insecurePlaintext: insecurePlaintext)
                // OpenSSL is loaded now, while nothing waits for it, not when a source arrives.
                if sharedKey != nil, let why = MigrationKey.loadCryptography() { fail(why) }
                let security: MigrationSecurity = sharedKey.map { .sharedKey($0) } ?? .plaintext
                if let name = flags.name { try RunDirectory.validate(name, flag: "--name") }
                let serial = try flags.serial.map { s throws(UsageError) in try DefinitionFlags.serialOption(s) }
                if detach && flags.serial == "stdio" {
                    throw UsageError(message: "--detach and --serial stdio: a detached VM has no terminal; use --serial console (the default with --detach), file:PATH or none")
                }
                let listener: FileDescriptor
                do throws(UsageError) { listener = try address.listen() } catch { fail(error.message) }
                let wait = { () -> (VMDefinition, IncomingMigration) in
                    // The KVM VM is made, and its first memory slot's cost paid, while nothing
                    // waits for them (here: in the process that will run the VM, as KVM wants);
                    // if that fails, the arriving VM's build says why.
                    let preparedVM = try? PreparedVM()
                    warn("waiting for a VM on \(address)")
                    // A connection that cannot open the stream (not hv, another version, another
                    // key, silence) is dropped and the wait goes on: whoever can reach the port must
                    // not be able to end it. Only a source that passed the opening is the source.
                    var accepted: IncomingMigration?
                    while accepted == nil {
                        let socket: FileDescriptor
                        do throws(UsageError) { socket = try acceptMigration(on: listener, address: address) } catch { fail(error.message) }
                        let candidate = IncomingMigration(channel: MigrationChannel(socket: socket, peer: "source"), preparedVM: preparedVM)
                        do throws(MigrationError) {
                            try candidate.channel.establish(security, as: .destination)
                            accepted = candidate
                        } catch {
                            warn("refused a connection from \(peerDescription(socket)): \(error); still waiting on \(address)")
                            candidate.channel.close()
                        }
                    }
                    listener.close()
                    let arriving = accepted!
                    var definition: VMDefinition
                    do throws(MigrationError) {
                        let hello = try arriving.receiveHello()
                        do throws(UsageError) {
                            definition = try VMDefinition.decode(hello.host)
                            if let name = flags.name { definition.name = name }
                            try definition.validate(naming: .keys)
                        } catch {
                            throw arriving.refusing("its VM definition is invalid here (\(error.message))")
                        }
                        guard definition.memoryMiB << 20 == hello.memoryBytes, definition.cpus == hello.cpus else {
                            throw arriving.refusing("its definition does not match its memory and vCPUs")
                        }
                        try arriving.checkCPU()
                    } catch {
                        fail("migration refused: \(error)")
                    }
                    if let serial { definition.serial = serial } else if definition.serial.output == .file || definition.serial.output == .stdio {
                        // The source's console file or terminal is on the other host.
                        definition.serial = .init(output: detach ? .console : .stdio)
                    }
                    if detach && definition.serial.output == .stdio { definition.serial = .init(output: .console) }
                    return (definition, arriving)
                }
                if detach {
                    _ = mkdir(RunDirectory.path, 0o700)
                    let log = RunDirectory.coreLog(flags.name ?? "incoming-\(address.port)")
                    runDetachedIncoming(verbose: verbose, coreLog: log, address: address.description, wait: wait)
                }
                let (arrived, arriving) = wait()
                Glibc.exit(runVM(arrived, verbose: verbose, incoming: arriving))
            }
            guard key == nil, !insecurePlaintext else {
                throw UsageError(message: "--key and --insecure-plaintext go with --incoming (and with 'hvctl migrate')")
            }
            if let restore {
                guard config == nil, !flags.anyGivenButSerial else {
                    throw UsageError(message: "--restore brings back the whole VM as it was saved: only --name, --serial, --detach, --paused, --clone, --mac and --print-config may be added")
                }
                // A clone's overlays are made as its definition is: printing one would leave them.
                guard !(printConfig && clone) else {
                    throw UsageError(message: "--print-config with --clone: a clone's disk overlays are made with its definition; print the snapshot's own (without --clone)")
                }
                guard !clone || flags.name != nil else { throw UsageError(message: "--clone needs --name: a clone is a new VM with its own name") }
                guard clone || mac.isEmpty else { throw UsageError(message: "--mac goes with --clone (a restored VM keeps its MACs)") }
                let directory = absolutePath(restore)
                let saved: MachineSnapshot
                do throws(SnapshotError) { saved = try MachineSnapshot.read(directory: directory) } catch { fail(error.description) }
                do throws(UsageError) {
                    definition = try VMDefinition.decode(saved.host)
                    if let name = flags.name { definition.name = name }
                    try definition.validate(naming: .keys)
                } catch {
                    fail("snapshot \(directory): its VM definition is invalid (\(error.message))")
                }
                if let serial = flags.serial { definition.serial = try DefinitionFlags.serialOption(serial) }
                if clone {
                    do throws(UsageError) {
                        definition = try cloneDefinition(definition, snapshot: directory, name: flags.name ?? "", macs: mac)
                    } catch { fail(error.message) }
                    let made = cloneDirectory(snapshot: directory, name: flags.name ?? "")
                    UnstartedClone.discardAtExit(overlays: definition.disks.map(\.path).filter { $0.hasPrefix(made + "/") }, directory: made)
                }
                snapshot = saved
            } else if paused || clone || !mac.isEmpty {
                throw UsageError(message: "--paused, --clone and --mac go with --restore (a new VM can be paused with 'hvctl pause NAME' once it runs)")
            } else if let config {
                guard !flags.anyGiven else {
                    throw UsageError(message: "--config describes the whole VM: give its other settings in the file, not as flags (only --name may be added)")
                }
                do { definition = try VMDefinition.load(config, name: flags.name) } catch let error as VMDefinition.LoadError { fail(error.message) }
            } else {
                definition = try flags.definition()
            }
            if detach {
                // A detached VM has no terminal: its console is the log and the attach socket.
                guard flags.serial != "stdio" else {
                    throw UsageError(message: "--detach and --serial stdio: a detached VM has no terminal; use --serial console (the default with --detach), file:PATH or none")
                }
                if definition.serial.output == .stdio { definition.serial = .init(output: .console) }
            }
            if printConfig {
                print(definition.resolvingPaths(against: absolutePath(".")).encoded())
                return
            }
            if detach { runDetached(definition, verbose: verbose, restore: snapshot, startPaused: paused) }
            Glibc.exit(runVM(definition, verbose: verbose, restore: snapshot, startPaused: paused) { _ in UnstartedClone.ran() })
        }
    }
}

/// The disk overlays `run --restore --clone` made for a clone whose guest has not run yet. If
/// hvctl ends before it runs (a refusal, a lock, a device that would not start: `fail` exits
/// from anywhere), they are removed, so trying again under the same name is not refused for a
/// clone that never was. Once the guest runs they are the clone's disks.
enum UnstartedClone {
    private static let pending = Mutex<(overlays: [String], directory: String)?>(nil)

    static func discardAtExit(overlays: [String], directory: String) {
        guard !overlays.isEmpty else { return }
        pending.withLock { $0 = (overlays, directory) }
        atexit {
            UnstartedClone.pending.withLock { made in
                guard let (overlays, directory) = made else { return }
                for path in overlays { unlink(path) }
                rmdir(directory)
                made = nil
            }
        }
    }

    /// The guest runs (or, in `run --detach`'s waiting parent, the child owns the clone now).
    static func ran() { pending.withLock { $0 = nil } }
}

// MARK: ls, status, stop, pause, resume

extension HVCtl {
    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the running VMs.")
        @Flag(help: "Print a JSON array of every VM's status.") var json = false

        func run() throws {
            var statuses: [VMStatus] = []
            var silent: [(name: String, pid: Int32?)] = []
            for name in runningVMNames() {
                guard case .live(let pid) = vmPresence(name) else { continue }  // gone: its files were just removed
                if let reply = controlRequest(name, ControlRequest(.status)), let status = reply.status {
                    statuses.append(status)
                } else {
                    silent.append((name, pid))  // alive (it holds its lock) but not answering: say so, touch nothing
                }
            }
            if json {
                printJSON(statuses)
                return
            }
            print(pad("NAME", 20) + pad("STATE", 9) + pad("PID", 9) + pad("UPTIME", 9) + pad("MEMORY", 9) + pad("CPUS", 6) + "DEVICES")
            for s in statuses {
                let devices = s.devices.map { "\($0.name)(\($0.state), \($0.restarts) restarts)" }
                print(pad(s.name, 20) + pad(s.state, 9) + pad("\(s.pid)", 9) + pad("\(s.uptimeSeconds)s", 9) + pad("\(s.memoryMiB)M", 9)
                      + pad("\(s.cpus)", 6) + devices.joined(separator: " "))
            }
            for s in silent {
                print(pad(s.name, 20) + pad("?", 9) + pad(s.pid.map { "\($0)" } ?? "?", 9) + "(not answering on its control socket)")
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "status",
            abstract: "Show one running VM: its vCPUs, devices, disks, CD, NICs and tenant.")
        @OptionGroup var vm: VMName
        @Flag(help: "Print the status as JSON.") var json = false
        @Flag(help: "Also read every vCPU's instruction pointer.") var rip = false

        func run() throws {
            guard let s = ask(vm.name, ControlRequest(.status, registers: rip ? true : nil)).status else {
                fail("VM '\(vm.name)' answered without a status")
            }
            if json {
                printJSON(s)
                return
            }
            print("name:    \(s.name)")
            print("state:   \(s.state)\(s.pausedSeconds.map { " (for \($0) s)" } ?? "")")
            print("pid:     \(s.pid)")
            print("boot:    \(s.boot)")
            print("uptime:  \(s.uptimeSeconds) s")
            print("memory:  \(s.memoryMiB) MiB")
            print("cpus:    \(s.cpus)")
            print("tenant:  \(s.tenant ?? "none (--no-sandbox)")")
            if let r = s.resources {
                print("limits:  \(describeLimits(r.limits))")
                print("using:   " + (r.memoryBytes.map { "memory \($0 >> 20) MiB" } ?? "memory ?") + ", " + (r.pids.map { "\($0) pids" } ?? "? pids"))
                for group in r.cgroups { print("cgroup:  \(group)") }
            } else {
                print("limits:  none (no cgroups)")
            }
            for v in s.vcpus { print("vcpu:    \(pad("\(v.id)", 4))\(v.state)\(v.rip.map { "  rip \($0)" } ?? "")") }
            for d in s.disks {
                let backing = (d.backing ?? []).map { "  on \($0)" }.joined()
                print("disk:    \(pad(d.device, 8))\(d.path)  \(d.format)\(d.readonly ? "  readonly" : "")\(backing)\(describeRate(d.rateLimit, "  limit "))")
            }
            if let cd = s.cdrom { print("cdrom:   \(pad(cd.device, 8))\(cd.medium ?? "(empty)")") }
            for n in s.nics {
                print("nic:     \(pad(n.device, 8))\(n.mac)  \(n.tap.map { "tap \($0)" } ?? n.segment.map { "segment \($0)" } ?? "")\(n.bridge.map { " in bridge \($0)" } ?? "")"
                      + describeRate(n.rxRateLimit, "  rx limit ") + describeRate(n.txRateLimit, "  tx limit "))
            }
            for d in s.devices {
                print("device:  \(pad(d.name, 10))\(pad(d.state, 11))pid \(d.pid.map { "\($0)" } ?? "-")  restarts \(d.restarts)")
            }
        }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "start",
            abstract: "Start a VM hvd keeps (created through its API); returns once the guest runs.",
            discussion: "Needs hvd (docs/hvd.md), which keeps VM definitions; without it, run a VM with 'hvctl run'.")
        @OptionGroup var vm: VMName

        func run() throws {
            guard let answer = HVDClient.request("POST", "/v1/vms/\(vm.name)/start", timeoutSeconds: 120) else {
                fail("'hvctl start' needs hvd, which keeps VM definitions, and none answers on \(HVDClient.socketPath); start hvd, or run the VM with 'hvctl run'")
            }
            guard answer.status == 200 else { fail(answer.errorMessage) }
            print("started \(vm.name)")
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "stop",
            abstract: "Stop a running VM (its 'hvctl run' exits 0).",
            discussion: "A VM hvd keeps is stopped through hvd (so its audit log and events tell it), when hvd runs.")
        @OptionGroup var vm: VMName

        func run() throws {
            if throughHVD(vm.name, "POST", "/stop") != nil {
                print("stopped \(vm.name)")
                return
            }
            _ = ask(vm.name, ControlRequest(.stop))
            // Wait for the VM to go: it lets go of its lock once its devices are reaped.
            for _ in 0..<200 {
                if !PathLock.isHeld(RunDirectory.lock(vm.name)) { break }
                usleep(50_000)
            }
            print("stopped \(vm.name)")
        }
    }

    struct Pause: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "pause",
            abstract: "Stop every vCPU of a running VM; its devices finish what the guest asked of them.",
            discussion: "The guest's clock (kvmclock) does not advance while it is paused, as with QEMU's 'stop'. 'hvctl resume NAME' resumes it.")
        @OptionGroup var vm: VMName

        func run() throws {
            if throughHVD(vm.name, "POST", "/pause") == nil { _ = ask(vm.name, ControlRequest(.pause)) }
            print("paused \(vm.name)")
        }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "resume", abstract: "Resume the vCPUs of a VM 'hvctl pause' stopped.")
        @OptionGroup var vm: VMName

        func run() throws {
            if throughHVD(vm.name, "POST", "/resume") == nil { _ = ask(vm.name, ControlRequest(.resume)) }
            print("resumed \(vm.name)")
        }
    }
}

// MARK: snapshot

extension HVCtl {
    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot",
            abstract: "Save a running VM to a new directory; 'hvctl run --restore DIR' brings it back.",
            discussion: """
                The VM pauses while its vCPU, interrupt-controller, clock and device states and its \
                memory (sparse: pages never written take no space) are written, then resumes, or stays \
                paused with --stop. Disks are referenced by path, not copied: keep them unchanged to \
                restore, and stop the VM before restoring it under the same name (its disks are locked). \
                The directory appears complete or not at all.
                """)
        @OptionGroup var vm: VMName
        @Argument(help: ArgumentHelp("The directory to create.", valueName: "dir")) var directory: String
        @Flag(help: "Leave the VM paused once it is saved.") var stop = false

        func run() throws {
            let path = absolutePath(directory)
            guard path.utf8.first == UInt8(ascii: "/"), path.utf8.count < 4000 else { throw UsageError(message: "cannot resolve the directory '\(directory)'") }
            // Through hvd when it keeps the VM: its audit log and event stream tell the snapshot.
            if let answer = throughHVD(vm.name, "POST", "/snapshot", body: ControlJSON.encode(SnapshotRequest(path: path, stop: stop))) {
                print(Self.follow(answer, vm: vm.name) ?? "saved \(vm.name) to \(path)")
                return
            }
            let reply = ask(vm.name, ControlRequest(.snapshot, path: path, stop: stop), timeoutSeconds: 600)
            print(reply.message ?? "saved \(vm.name) to \(path)")
        }

        /// Follows hvd's snapshot job until it ends: its message, or hvctl ends with its error.
        static func follow(_ started: HVDClient.Response, vm: String) -> String? {
            // The VM's own limit for a snapshot is 600 s; hvd's job ends by then.
            let job = followHVDJob(started, what: "the snapshot of '\(vm)'", cancelOnInterrupt: false, seconds: 610)
            guard job.state == "succeeded" else { fail(job.error ?? "the snapshot of '\(vm)' \(job.state)") }
            return job.message
        }
    }
}

// MARK: migrate

extension HVCtl {
    struct Migrate: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "migrate",
            abstract: "Move a running VM live to another host, where 'hvctl run --incoming tcp:HOST:PORT' waits for it.",
            discussion: """
                Memory is copied while the guest runs, in rounds, until what is left fits in \
                --max-downtime; the VM then pauses, its last pages and its vCPU and device states go, \
                its disks (which both hosts must see at the same paths) are handed over, and it \
                resumes on the destination. This copy then ends ('hvctl run' exits 0). On any failure \
                before the hand-over — the network, the destination, a refusal, --cancel, a timeout — \
                the VM simply carries on here, with one line saying why.
                """)
        @OptionGroup var vm: VMName
        @Option(help: ArgumentHelp("Where the destination waits: tcp:HOST:PORT.", valueName: "address")) var to: String?
        @Option(help: ArgumentHelp("The longest pause the switch-over may cost, e.g. 100ms (default) or 1s.", valueName: "time"))
        var maxDowntime: String?
        @Option(help: ArgumentHelp("Give up when memory has not converged by then, e.g. 60s (default) or 5m.", valueName: "time"))
        var timeout: String?
        @Option(help: ArgumentHelp("The most the migration may send a second, e.g. 100M (MiB/s); default: no limit.", valueName: "rate"))
        var bandwidth: String?
        @Flag(help: "On timeout, switch over with a longer pause instead of giving up.") var finishOnTimeout = false
        @Flag(help: "Print progress and the result as JSON lines on stdout.") var json = false
        @Flag(help: "Cancel the migration of NAME under way; the VM carries on here.") var cancel = false
        @Option(help: ArgumentHelp("""
            The key file the destination's 'hvctl run --incoming --key' names too (at least 32 random bytes, \
            mode 600): each host proves it holds it, and the stream is encrypted and authenticated.
            """, valueName: "file"))
        var key: String?
        @Flag(help: "Send the VM over plain TCP, unauthenticated and unencrypted (a network nobody else can reach).")
        var insecurePlaintext = false

        func run() throws {
            if cancel {
                guard to == nil, maxDowntime == nil, timeout == nil, bandwidth == nil, !finishOnTimeout, key == nil, !insecurePlaintext else {
                    throw UsageError(message: "--cancel takes no other option")
                }
                // hvd's migration job of the VM, when hvd runs one: cancelled through hvd.
                if let job = HVDMigration.runningJob(of: vm.name) {
                    guard let answer = HVDClient.request("DELETE", "/v1/jobs/\(job)", timeoutSeconds: 15) else {
                        fail("hvd stopped answering on \(HVDClient.socketPath) while cancelling job \(job)")
                    }
                    guard answer.status == 200 else { fail(answer.errorMessage) }
                    print("cancelling the migration of \(vm.name) (hvd's job \(job)); it carries on here")
                    return
                }
                let reply = ask(vm.name, ControlRequest(.migrateCancel))
                print(reply.message ?? "cancelling")
                return
            }
            guard let to else { throw UsageError(message: "missing --to tcp:HOST:PORT (where 'hvctl run --incoming' waits)") }
            _ = try MigrationAddress.parse(to, flag: "--to")
            var request = ControlRequest(.migrate, path: to)
            if let maxDowntime { request.maxDowntimeMs = try parseDuration(maxDowntime, flag: "--max-downtime", bareUnit: 1_000_000) / 1_000_000 }
            if let timeout { request.timeoutSeconds = max(1, try parseDuration(timeout, flag: "--timeout", bareUnit: 1_000_000_000) / 1_000_000_000) }
            if let bandwidth { request.bandwidth = try parseRate(bandwidth) }
            request.finishOnTimeout = finishOnTimeout ? true : nil
            if let sharedKey = try migrationKey(key, insecurePlaintext: insecurePlaintext) {
                request.migrationKey = sharedKey.hex
            } else {
                request.insecurePlaintext = true
            }
            let terminal = isatty(2) == 1
            func report(_ progress: MigrationProgressReport) {
                if json {
                    print(String(decoding: ControlJSON.encode(progress), as: UTF8.self))
                    fflush(nil)
                } else {
                    let line = "round \(progress.round) (\(progress.phase)): \(progress.bytesSent >> 20) MiB sent, \(progress.dirtyBytes >> 10) KiB dirty at \(progress.dirtyRateBytesPerSecond >> 20) MiB/s, network \(progress.bandwidthBytesPerSecond >> 20) MiB/s, expected pause \(oneDecimal(progress.expectedDowntimeMilliseconds)) ms"
                    _ = (terminal ? "\r\u{1B}[K" + line : line + "\n").withCString { write(2, $0, strlen($0)) }
                }
            }
            func end(_ result: MigrationResultReport?, message: String?) {
                if terminal && !json { _ = "\n".withCString { write(2, $0, 1) } }
                if json, let result {
                    print(String(decoding: ControlJSON.encode(result), as: UTF8.self))
                } else {
                    print(message ?? "migrated \(vm.name)")
                }
            }
            // Ctrl-C cancels the migration (the VM carries on here) rather than leaving it running unseen.
            signal(SIGINT) { _ in interrupted.store(true, ordering: .relaxed) }

            // Through hvd when it keeps the VM: hvd's job does it (audited, in its events), and
            // hvd reads the key file, on this same host.
            let body = MigrateRequest(to: to, maxDowntimeMs: request.maxDowntimeMs, timeoutSeconds: request.timeoutSeconds,
                                         bandwidth: request.bandwidth, finishOnTimeout: request.finishOnTimeout,
                                         keyFile: key.map(absolutePath), insecurePlaintext: insecurePlaintext ? true : nil)
            if let started = throughHVD(vm.name, "POST", "/migrate", body: ControlJSON.encode(body)) {
                var reported: MigrationProgressReport?
                let job = followHVDJob(started, what: "the migration of '\(vm.name)'", cancelOnInterrupt: true) { job in
                    guard let progress = job.progress, progress != reported else { return }
                    reported = progress
                    report(progress)
                }
                guard job.state == "succeeded" else {
                    if reported != nil, terminal && !json { _ = "\n".withCString { write(2, $0, 1) } }
                    fail(job.error ?? "the migration of '\(vm.name)' \(job.state)")
                }
                end(job.migration, message: job.message)
                return
            }

            guard let fd = connectTo(RunDirectory.socket(vm.name)) else { failNoAnswer(vm.name) }
            defer { close(fd) }
            guard ControlJSON.encode(request).withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) > 0 else { failNoAnswer(vm.name) }
            var cancelSent = false
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                if poll(&p, 1, 200) <= 0 {
                    if interrupted.load(ordering: .relaxed) && !cancelSent {
                        cancelSent = true
                        _ = controlRequest(vm.name, ControlRequest(.migrateCancel))
                    }
                    continue
                }
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                guard n > 0 else { fail("VM '\(vm.name)' ended the migration without a result (did it stop?)") }
                let reply: ControlReply
                do throws(UsageError) { reply = try ControlJSON.decode(ControlReply.self, Array(buffer.prefix(n))) } catch {
                    fail("VM '\(vm.name)' sent a malformed reply: \(error.message)")
                }
                if let progress = reply.progress, reply.ok, reply.migration == nil, reply.message == nil {
                    report(progress)
                    continue
                }
                if !reply.ok, terminal && !json { _ = "\n".withCString { write(2, $0, 1) } }
                guard reply.ok else { fail(reply.error ?? "the migration failed") }
                end(reply.migration, message: reply.message)
                return
            }
        }
    }
}

/// `hvctl migrate` through hvd: its `POST …/migrate` job (`MigrateRequest`).
enum HVDMigration {
    /// The id of hvd's running migration job of VM `name`, if hvd runs one.
    static func runningJob(of name: String) -> String? {
        struct List: Decodable { var jobs: [HVDJob] }
        guard let answer = HVDClient.request("GET", "/v1/jobs", timeoutSeconds: 5), answer.status == 200,
              let list = try? ControlJSON.decode(List.self, answer.body) else { return nil }
        return list.jobs.last { $0.vm == name && $0.type == "migrate" && $0.state == "running" }?.id
    }
}

/// Follows the job hvd answered `started` with until it ends (`seconds` at most, when given),
/// calling `update` with each state of it read while it runs; with `cancelOnInterrupt`, Ctrl-C
/// asks hvd to cancel it. Returns the job as it ended; hvctl ends with one line if hvd stops
/// answering (the job goes on).
func followHVDJob(_ started: HVDClient.Response, what: String, cancelOnInterrupt: Bool, seconds: UInt64? = nil,
                  update: (HVDJob) -> Void = { _ in }) -> HVDJob {
    guard var job = try? ControlJSON.decode(HVDJob.self, started.body) else {
        fail("hvd answered \(what) without a job: \(String(decoding: started.body, as: UTF8.self))")
    }
    let deadline = seconds.map { monotonicNanoseconds() + $0 * 1_000_000_000 }
    var cancelSent = false
    while job.state == "running" {
        if let deadline, monotonicNanoseconds() > deadline { fail("hvd's job \(job.id), \(what), has not ended in \(seconds ?? 0) s") }
        usleep(20_000)
        if cancelOnInterrupt && interrupted.load(ordering: .relaxed) && !cancelSent {
            cancelSent = true
            _ = HVDClient.request("DELETE", "/v1/jobs/\(job.id)", timeoutSeconds: 15)
        }
        guard let answer = HVDClient.request("GET", "/v1/jobs/\(job.id)", timeoutSeconds: 10) else {
            fail("hvd stopped answering on \(HVDClient.socketPath) during \(what) (job \(job.id)); the job goes on")
        }
        guard answer.status == 200, let next = try? ControlJSON.decode(HVDJob.self, answer.body) else { fail(answer.errorMessage) }
        job = next
        if job.state == "running" { update(job) }
    }
    return job
}

/// What protects a migration: the key in the file the operator named, or (nil, said out loud
/// with --insecure-plaintext, and warned about) nothing.
func migrationKey(_ key: String?, insecurePlaintext: Bool) throws(UsageError) -> MigrationKey? {
    guard key == nil || !insecurePlaintext else { throw UsageError(message: "--key and --insecure-plaintext exclude each other") }
    if let key { return try MigrationKey.load(absolutePath(key), flag: "--key") }
    guard insecurePlaintext else {
        throw UsageError(message: "a migration needs the key both hosts hold: --key FILE (\(MigrationKey.howToMakeOne)), or --insecure-plaintext on a network nobody else can reach")
    }
    warn("warning: --insecure-plaintext: this migration is neither authenticated nor encrypted")
    return nil
}

/// Set by SIGINT while `hvctl migrate` waits.
let interrupted = Atomic<Bool>(false)

/// `value` with one decimal.
func oneDecimal(_ value: Double) -> String {
    let tenths = Int((value * 10).rounded())
    return "\(tenths / 10).\(tenths % 10)"
}

/// Nanoseconds in `text` (`250ms`, `2s`, `5m`; a bare number counts `bareUnit` nanoseconds).
func parseDuration(_ text: String, flag: String, bareUnit: UInt64) throws(UsageError) -> UInt64 {
    let units: [(String, UInt64)] = [("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000)]
    for (suffix, unit) in units where text.hasSuffix(suffix) {
        if let n = UInt64(text.dropLast(suffix.count)), n > 0, n <= 86_400_000 { return n * unit }
        break
    }
    if let n = UInt64(text), n > 0, n <= 86_400_000 { return n * bareUnit }
    throw UsageError(message: "invalid \(flag) '\(text)': use a whole number with ms, s or m, like 100ms or 60s")
}

/// Bytes a second in `text` (`100M` is 100 MiB/s; K, M, G; a bare number is bytes).
func parseRate(_ text: String) throws(UsageError) -> UInt64 {
    let units: [(String, UInt64)] = [("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)]
    for (suffix, unit) in units where text.uppercased().hasSuffix(suffix) {
        if let n = UInt64(text.dropLast()), n > 0, n <= 1 << 20 { return n * unit }
        break
    }
    if let n = UInt64(text), n >= 4096 { return n }
    throw UsageError(message: "invalid --bandwidth '\(text)': use a number of bytes a second with K, M or G, like 100M (at least 4096)")
}

// MARK: cdrom, device

extension HVCtl {
    struct CDROM: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "cdrom", abstract: "Change a running VM's CD: 'cdrom NAME eject' or 'cdrom NAME insert ISO'.",
            discussion: "The VM's core opens the ISO (it is the trusted side) and hands it to the CD-ROM drive's process; the guest sees a media change.")
        enum Action: String, ExpressibleByArgument, CaseIterable { case eject, insert }
        @OptionGroup var vm: VMName
        @Argument(help: "eject or insert.") var action: Action
        @Argument(help: ArgumentHelp("The ISO image to insert.", valueName: "iso")) var iso: String?

        mutating func validate() throws {
            switch action {
            case .eject where iso != nil: throw UsageError(message: "'cdrom NAME eject' takes no ISO")
            case .insert where iso == nil: throw UsageError(message: "'cdrom NAME insert' needs the ISO's path")
            default: break
            }
        }

        func run() throws {
            switch action {
            case .eject:
                if throughHVD(vm.name, "DELETE", "/cdrom") == nil { _ = ask(vm.name, ControlRequest(.cdromEject)) }
                print("ejected the CD of \(vm.name)")
            case .insert:
                let path = absolutePath(iso ?? "")
                guard path.utf8.first == UInt8(ascii: "/"), path.utf8.count < 4096 else { throw UsageError(message: "cannot resolve the ISO path '\(iso ?? "")'") }
                if throughHVD(vm.name, "PUT", "/cdrom", body: ControlJSON.encode(["path": path])) == nil {
                    _ = ask(vm.name, ControlRequest(.cdromInsert, path: path))
                }
                print("inserted \(path) into \(vm.name)")
            }
        }
    }

    struct Device: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "device",
            abstract: "A running VM's device processes: 'device NAME ls', 'device NAME restart DEV', 'device NAME upgrade DEV --binary PATH'.",
            discussion: "restart restarts one device process cleanly (reviving one given up after a crash loop); upgrade replaces its binary under the running guest (an interpreted plugin's script: its interpreter stays), rolled back if the new one cannot take over.")
        enum Action: String, ExpressibleByArgument, CaseIterable { case ls, restart, upgrade }
        @OptionGroup var vm: VMName
        @Argument(help: "ls, restart or upgrade.") var action: Action
        @Argument(help: ArgumentHelp("The device (see 'hvctl device NAME ls').", valueName: "dev")) var device: String?
        @Option(help: ArgumentHelp("upgrade: the new binary (an interpreted plugin's new script).", valueName: "path")) var binary: String?
        @Flag(help: "ls: print JSON.") var json = false

        mutating func validate() throws {
            switch action {
            case .ls:
                guard device == nil, binary == nil else { throw UsageError(message: "'device NAME ls' takes no device or --binary") }
            case .restart, .upgrade:
                guard device != nil else {
                    throw UsageError(message: "'hvctl device \(vm.name) \(action.rawValue)' needs a device name (see 'hvctl device \(vm.name) ls')")
                }
                guard (action == .upgrade) == (binary != nil) else {
                    throw UsageError(message: action == .upgrade ? "'hvctl device \(vm.name) upgrade' needs --binary PATH" : "--binary is for upgrade")
                }
                guard !json else { throw UsageError(message: "--json is for ls") }
            }
        }

        func run() throws {
            switch action {
            case .ls:
                let devices = ask(vm.name, ControlRequest(.status)).status?.devices ?? []
                if json {
                    printJSON(devices)
                    return
                }
                print(pad("DEVICE", 10) + pad("KIND", 8) + pad("PID", 9) + pad("STATE", 12) + pad("RESTARTS", 10) + "BINARY")
                for d in devices {
                    print(pad(d.name, 10) + pad(d.kind, 8) + pad(d.pid.map { "\($0)" } ?? "-", 9) + pad(d.state, 12) + pad("\(d.restarts)", 10) + d.binary)
                }
            case .restart:
                if let answer = throughHVD(vm.name, "POST", "/devices/\(device ?? "")/restart") {
                    print(answer.actionMessage ?? "restarted")
                } else {
                    print(ask(vm.name, ControlRequest(.deviceRestart, device: device), timeoutSeconds: 40).message ?? "restarted")
                }
            case .upgrade:
                let path = absolutePath(binary ?? "")
                if let answer = throughHVD(vm.name, "POST", "/devices/\(device ?? "")/upgrade", body: ControlJSON.encode(["path": path])) {
                    print(answer.actionMessage ?? "upgraded")
                } else {
                    print(ask(vm.name, ControlRequest(.deviceUpgrade, path: path, device: device), timeoutSeconds: 40).message ?? "upgraded")
                }
            }
        }
    }
}

// MARK: disk, net, sandbox, version

extension HVCtl {
    struct Disk: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "disk", abstract: "Disk images.", subcommands: [Create.self, Info.self, Resize.self, Convert.self, Commit.self])

        struct Create: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "create",
                abstract: "Create a disk image: a sparse raw image, or a thin qcow2 image (optionally an overlay on a backing image).",
                discussion: """
                    A raw image has its full size with no blocks allocated until written. A qcow2 image holds \
                    only what was written; with --backing it is a copy-on-write overlay (a linked clone) whose \
                    unwritten parts read from the backing image, which it never changes. A relative --backing \
                    path is stored as given and resolved from the new image's directory, as qemu-img does. An \
                    existing file is never overwritten.
                    """)
            @Argument(help: ArgumentHelp("The new image.", valueName: "path")) var path: String
            @Option(help: ArgumentHelp("Its size, e.g. 20G; whole 512-byte sectors. With --backing, defaults to the backing image's.", valueName: "size"))
            var size: String?
            @Option(help: ArgumentHelp("raw (default) or qcow2.", valueName: "format")) var format: String = "raw"
            @Option(help: ArgumentHelp("A backing image (raw or qcow2) for a qcow2 overlay.", valueName: "image")) var backing: String?

            func run() throws {
                guard let kind = VMDefinition.DiskFormat(rawValue: format) else {
                    throw UsageError(message: "invalid --format '\(format)': use raw or qcow2")
                }
                var bytes: UInt64?
                if let size {
                    let parsed = try parseSize(size, flag: "--size")
                    // SCSI addresses 512-byte blocks; a size that is not a whole number of them would hide a tail.
                    guard parsed % 512 == 0 else { throw UsageError(message: "--size \(parsed) is not a multiple of 512 bytes (a disk is whole sectors)") }
                    guard parsed > 0, parsed <= UInt64(Int64.max) else { throw UsageError(message: "--size must be more than 0 and less than 8 EiB") }
                    bytes = parsed
                }
                switch kind {
                case .raw:
                    guard backing == nil else { throw UsageError(message: "--backing needs --format qcow2 (a raw image has no backing file)") }
                    guard let bytes else { throw UsageError(message: "--size is needed for a raw image") }
                    do throws(UsageError) { try RawDisk.create(path, bytes: bytes) } catch { fail(error.message) }
                    print("created \(path): \(bytes) bytes (\(bytes >> 20) MiB), sparse raw image")
                case .qcow2:
                    guard bytes != nil || backing != nil else { throw UsageError(message: "--size is needed without --backing") }
                    let made: UInt64
                    do throws(UsageError) { made = try QCOW2Disk.create(path, size: bytes, backing: backing) } catch { fail(error.message) }
                    print("created \(path): \(made) bytes (\(made >> 20) MiB), qcow2 image\(backing.map { " on \($0)" } ?? "")")
                }
            }
        }

        struct Resize: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "resize",
                abstract: "Grow a raw or qcow2 image that no VM holds.",
                discussion: "The new space reads as zeros; the guest's partitions and file systems are its own to grow. Images never shrink.")
            @Argument(help: ArgumentHelp("The image.", valueName: "path")) var path: String
            @Argument(help: ArgumentHelp("Its new size, e.g. 40G; whole 512-byte sectors.", valueName: "size")) var size: String

            func run() throws {
                let bytes = try parseSize(size, flag: "size")
                let info: DiskInfo
                do throws(UsageError) { info = try DiskResize.grow(path, to: bytes) } catch { fail(error.message) }
                print("resized \(path) to \(info.virtualSize) bytes (\(info.virtualSize >> 20) MiB), \(info.format)")
            }
        }

        struct Convert: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "convert",
                abstract: "Copy an image, its backing chain flattened, into a new raw or qcow2 image.",
                discussion: """
                    Zero ranges are skipped: a raw copy is sparse, a qcow2 copy thin. The source and its chain \
                    may not be written meanwhile (they are share-locked); the destination must not exist, and \
                    is removed if the copy fails. Progress goes to stderr on a terminal.
                    """)
            @Argument(help: ArgumentHelp("The image to copy (raw or qcow2).", valueName: "source")) var source: String
            @Argument(help: ArgumentHelp("The new image.", valueName: "destination")) var destination: String
            @Option(help: ArgumentHelp("raw or qcow2.", valueName: "format")) var format: String

            func run() throws {
                guard let kind = VMDefinition.DiskFormat(rawValue: format) else {
                    throw UsageError(message: "invalid --format '\(format)': use raw or qcow2")
                }
                var progress = TerminalProgress("converting \(source)")
                do throws(UsageError) {
                    try DiskConvert.convert(source, to: destination, format: kind) { progress.show($0, of: $1) }
                } catch {
                    progress.end()
                    fail(error.message)
                }
                progress.end()
                print("converted \(source) to \(destination) (\(kind.rawValue))")
            }
        }

        struct Commit: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "commit",
                abstract: "Fold a qcow2 overlay's writes into its backing image, then empty the overlay.",
                discussion: """
                    Every cluster the overlay holds is written into its backing image (raw or qcow2, grown \
                    first if smaller); the overlay is then replaced by an empty one on the same backing file, \
                    so both read as the overlay did. Neither image may be in use. Other overlays on the same \
                    backing image see the change too: commit only into a base no other clone shares.
                    """)
            @Argument(help: ArgumentHelp("The overlay.", valueName: "overlay")) var overlay: String

            func run() throws {
                var progress = TerminalProgress("committing \(overlay)")
                let base: String
                do throws(UsageError) {
                    base = try DiskCommit.commit(overlay) { progress.show($0, of: $1) }
                } catch {
                    progress.end()
                    fail(error.message)
                }
                progress.end()
                print("committed \(overlay) into \(base)")
            }
        }

        struct Info: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "info",
                abstract: "Show a disk image's format, virtual and allocated size, and backing chain.",
                discussion: "The image is only read, never locked: an image a running VM writes can be inspected.")
            @Argument(help: ArgumentHelp("The image.", valueName: "path")) var path: String
            @Flag(help: "Print JSON.") var json = false

            func run() throws {
                let info: DiskInfo
                do throws(UsageError) { info = try DiskInfo.inspect(path) } catch { fail(error.message) }
                if json {
                    printJSON(info)
                    return
                }
                print("image:        \(info.path)")
                print("format:       \(info.format)")
                print("virtual size: \(info.virtualSize) bytes (\(info.virtualSize >> 20) MiB)")
                print("file size:    \(info.fileSize) bytes")
                print("allocated:    \(info.allocated) bytes")
                if let cluster = info.clusterSize { print("cluster size: \(cluster)") }
                for b in info.backing { print("backing:      \(b.path) (\(b.format))") }
            }
        }
    }

    struct Net: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "net", abstract: "Private network segments.", subcommands: [LS.self])

        struct LS: ParsableCommand {
            static let configuration = CommandConfiguration(commandName: "ls", abstract: "Every private segment on this host, its member NICs and their frame counters.")
            @Flag(help: "Print JSON.") var json = false

            func run() throws {
                let segments = segmentStatuses()
                if json {
                    print("[" + segments.map { render(.object($0)) }.joined(separator: ", ") + "]")
                    return
                }
                if segments.isEmpty {
                    print("no private network segments on this host")
                    return
                }
                print(pad("SEGMENT", 16) + pad("OWNER", 16) + pad("VM", 20) + pad("NIC", 6) + pad("MAC", 19) + pad("FRAMES-IN", 11) + pad("FRAMES-OUT", 11) + "DROPPED")
                for s in segments {
                    guard case .array(let list)? = s["members"] else { continue }
                    var owner = if case .string(let tenant)? = s["owner"] { tenant } else { "(host)" }
                    if case .array(let shared)? = s["shared_with"], !shared.isEmpty {
                        owner += "+" + shared.compactMap { if case .string(let t) = $0 { t } else { nil } }.joined(separator: "+")
                    }
                    for case .object(let m) in list {
                        print(pad(text(s, "segment"), 16) + pad(owner, 16) + pad(text(m, "vm"), 20) + pad(text(m, "nic"), 6) + pad(text(m, "mac"), 19)
                              + pad(String(number(m, "frames_from_vm")), 11) + pad(String(number(m, "frames_to_vm")), 11) + String(number(m, "dropped_to_vm")))
                    }
                }
            }
        }
    }

    struct Version: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "version", abstract: "Print hv's version and IPC protocol version.")
        func run() throws { print(HVCtl.configuration.version) }
    }
}

// MARK: Entry

/// The subcommand named on the command line, for the hint after a usage error.
func namedSubcommand() -> String? {
    let names = HVCtl.configuration.subcommands.map { $0._commandName }
    return CommandLine.arguments.dropFirst().first(where: { names.contains($0) })
}

let subcommandNames = HVCtl.configuration.subcommands.map { $0._commandName } + ["help"]
if CommandLine.arguments.count == 1 {
    fail("no command given; try 'hvctl run' to boot the demo guest, or 'hvctl --help'", status: 2)
}
if let first = CommandLine.arguments.dropFirst().first, !first.hasPrefix("-"), !subcommandNames.contains(first) {
    fail("unknown command '\(first)'; see 'hvctl --help'", status: 2)
}
do {
    var command = try HVCtl.parseAsRoot()
    try command.run()
} catch let error as UsageError {
    fail("\(error.message); see 'hvctl \(namedSubcommand().map { $0 + " " } ?? "")--help'", status: 2)
} catch {
    let code = HVCtl.exitCode(for: error)
    if code == .success {
        print(HVCtl.fullMessage(for: error))  // --help, --version, --generate-completion-script
        exit(0)
    }
    if let exitCode = error as? ExitCode { exit(exitCode.rawValue) }
    // A parse error: one line, and where to look.
    let full = HVCtl.message(for: error)
    var message = full.split(separator: "\n").first.map(String.init) ?? full
    if message.hasSuffix(".") { message.removeLast() }
    // ArgumentParser's sentences start with a capital; hvctl's lines do not.
    if let first = message.first, first.isUppercase, message.dropFirst().first?.isLowercase == true {
        message = first.lowercased() + message.dropFirst()
    }
    fail("\(message); see 'hvctl \(namedSubcommand().map { $0 + " " } ?? "")--help'",
         status: 2)
}

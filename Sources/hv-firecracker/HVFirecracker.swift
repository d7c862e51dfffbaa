import ArgumentParser
import Foundation
import HVFirecrackerModel
import HVHost
import HVSys
import Hummingbird
import Logging
import ServiceLifecycle

/// `hv-firecracker`: hv in Firecracker's place. It takes Firecracker's command line and serves
/// Firecracker's API for one microVM, so a tool configured with Firecracker's path (Kata's
/// `path`, firecracker-go-sdk's `FirecrackerBinary`, a Python client) runs hv instead. See
/// docs/firecracker.md for what is supported and how hv differs.
@main
struct HVFirecracker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hv-firecracker",
        abstract: "Run one hv VM behind Firecracker's API and command line.",
        discussion: """
            The guest's serial console is this process's stdin and stdout, as Firecracker's is. The process \
            ends when the guest powers off or reboots, with hvctl's exit status; SIGTERM stops the VM in \
            order. See docs/firecracker.md.
            """,
        version: "Firecracker v\(FirecrackerAPI.firecrackerVersion) (hv-firecracker: hv 0.1.0)")

    @Option(help: ArgumentHelp("Path of the API socket (Firecracker's default).", valueName: "path"))
    var apiSock = "/run/firecracker.socket"
    @Option(help: ArgumentHelp("MicroVM id: 1 to 64 letters, digits, '-' or '_' (also the hv VM's name).", valueName: "id"))
    var id: String?
    @Option(help: ArgumentHelp("Start the microVM at once from this JSON file (Firecracker's full configuration).", valueName: "file"))
    var configFile: String?
    @Flag(help: "Serve no API (needs --config-file).")
    var noApi = false
    @Option(help: ArgumentHelp("Log file or named pipe (else stderr).", valueName: "path"))
    var logPath: String?
    @Option(help: ArgumentHelp("Log level: Error, Warning, Info, Debug, Trace or Off.", valueName: "level"))
    var level: String?
    @Flag(help: "Show each log line's level.")
    var showLevel = false
    @Flag(help: "Show each log line's origin (file and line).")
    var showLogOrigin = false
    @Option(help: .hidden) var module: String?
    @Option(help: ArgumentHelp("Metrics file or named pipe.", valueName: "path"))
    var metricsPath: String?
    @Option(help: ArgumentHelp("Largest API request body, in bytes.", valueName: "bytes"))
    var httpApiMaxPayloadSize = 51_200
    @Option(help: ArgumentHelp("The hvctl that runs the VM (default: the one beside hv-firecracker).", valueName: "path"))
    var hvctl: String?

    // Firecracker flags that hv takes and explains (the jailer and SDKs pass some of them).
    @Flag(help: ArgumentHelp("Accepted; hv's devices run sandboxed whatever it says (see 'hvctl sandbox show').")) var noSeccomp = false
    @Option(help: .hidden) var seccompFilter: String?
    @Flag(help: .hidden) var bootTimer = false
    @Option(help: .hidden) var startTimeUs: UInt64?
    @Option(help: .hidden) var startTimeCpuUs: UInt64?
    @Option(help: .hidden) var parentCpuTimeUs: UInt64?
    @Option(help: .hidden) var mmdsSizeLimit: Int?
    @Option(help: .hidden) var metadata: String?

    mutating func validate() throws {
        if noApi && configFile == nil { throw ValidationError("--no-api needs --config-file: without the API, the configuration must come from a file") }
        guard (1024...(16 << 20)).contains(httpApiMaxPayloadSize) else { throw ValidationError("--http-api-max-payload-size must be 1024 to 16777216 bytes") }
        if let id {
            guard (1...64).contains(id.utf8.count), id.utf8.allSatisfy({ $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }) else {
                throw ValidationError("--id '\(id)': use 1 to 64 letters, digits, '-' or '_'")
            }
        }
        if seccompFilter != nil { throw ValidationError("--seccomp-filter: hv's sandbox profiles are its own (see 'hvctl sandbox show'); leave the flag out") }
        if metadata != nil { throw ValidationError("--metadata: hv-firecracker has no MMDS; leave the flag out") }
    }

    func run() async throws {
        umask(0o077)
        let reported = id ?? "anonymous-instance"
        // Without --id, a name of this process's own, so two default instances do not collide.
        let name = id ?? "firecracker-\(getpid())"
        let log = LogSink(id: reported)
        FirecrackerAPI.maximumPayload.withLock { $0 = httpApiMaxPayloadSize }
        if noSeccomp { log.info("--no-seccomp: hv's devices stay sandboxed; the flag changes nothing") }
        if bootTimer { log.info("--boot-timer: not supported by hv; ignored") }
        if logPath != nil || level != nil || showLevel || showLogOrigin {
            do throws(Fault) {
                try log.configure(LoggerConfig(logPath: logPath, level: level, showLevel: showLevel, showLogOrigin: showLogOrigin))
            } catch {
                die("\(error.message)")
            }
        }
        let hvctlPath = hvctl ?? executableDirectory() + "/hvctl"
        guard access(hvctlPath, X_OK) == 0 else { die("cannot run \(hvctlPath): \(Errno.current); give hvctl's path with --hvctl") }
        do {
            try FileManager.default.createDirectory(atPath: RunDirectory.path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            die("cannot create \(RunDirectory.path): \(error.localizedDescription)")
        }

        let vm = MicroVM(id: reported, name: name, hvctl: hvctlPath, apiSocket: noApi ? nil : apiSock, log: log)
        if let metricsPath {
            do throws(Fault) { try vm.putMetrics(MetricsConfig(metricsPath: metricsPath)) } catch { die("\(error.message)") }
        }

        // The API socket first (Firecracker refuses one that exists), so a configuration that
        // fails below leaves nothing behind.
        if !noApi {
            var st = stat()
            if lstat(apiSock, &st) == 0 {
                die("the API socket \(apiSock) exists; remove it first (Firecracker refuses it too)")
            }
        }
        if let configFile {
            let full: FullVMConfiguration
            do throws(UsageError) {
                let fd: FileDescriptor
                do { fd = try FileDescriptor.openHostFile(vm.absolute(configFile), flags: O_RDONLY, kinds: [.regular], maximumSize: 1 << 20) } catch {
                    throw UsageError(message: "\(error)")
                }
                defer { fd.close() }
                let bytes: [UInt8]
                do { bytes = try fd.readAll() } catch { throw UsageError(message: "\(error)") }
                full = try ControlJSON.decode(FullVMConfiguration.self, bytes)
            } catch {
                die("--config-file \(configFile): \(error.message)")
            }
            do throws(Fault) {
                try vm.apply(full)
                try vm.start()
            } catch {
                die("--config-file \(configFile): \(error.message)")
            }
        }
        if noApi {
            // The VM's thread ends the process when the guest ends.
            while true { try? await Task.sleep(for: .seconds(3600)) }
        }

        var logger = Logger(label: "hv-firecracker")
        logger.logLevel = .critical
        let socket = StagedSocketPath(apiSock)
        let app = Application(
            router: FirecrackerAPI.router(vm: vm),
            configuration: .init(address: .unixDomainSocket(path: socket.bindPath), serverName: "Firecracker API"),
            onServerRunning: { _ in
                if let problem = socket.publish() {
                    vm.cleanUp()
                    die(problem)
                }
                log.info("API server started on \(apiSock)")
            },
            logger: logger)
        let group = ServiceGroup(services: [app], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        do {
            try await group.run()
        } catch {
            vm.cleanUp()
            die("cannot serve \(apiSock): \(error)")
        }
        // SIGTERM or SIGINT: stop the VM in order (its end ends this process), or just go.
        log.info("Stopping on a signal")
        vm.stopOnSignal()
        vm.cleanUp()
    }
}

/// Ends hv-firecracker with one line on stderr.
func die(_ message: String) -> Never {
    let line = Array("hv-firecracker: \(message)\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(1)
}

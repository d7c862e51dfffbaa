import ArgumentParser
import Foundation
import HVHost
import HVSys
import Hummingbird
import Logging
import ServiceLifecycle

/// `hvd`: hv's API service. See api/hvd.yaml for the API and docs/hvd.md for the service.
@main
struct HVD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hvd",
        abstract: "hv's API service: keeps VM definitions and runs VMs for clients of an HTTP/JSON API on a Unix socket.",
        discussion: """
            The API is api/hvd.yaml (OpenAPI 3.1). Each VM runs as its own 'hvctl run' core: VMs keep \
            running when hvd stops or crashes, and hvd finds them again when it starts. SIGTERM or \
            SIGINT stops hvd (not the VMs).
            """,
        version: API.version)

    @Option(help: ArgumentHelp("The API's Unix socket (default: $HV_RUN_DIR/hvd/api.sock, $HV_RUN_DIR being /run/hv unless set). Only root may connect.", valueName: "path"))
    var socket: String?

    @Option(help: ArgumentHelp("Where VM definitions and the audit log are kept (default: $HV_STATE_DIR, or /var/lib/hv).", valueName: "dir"))
    var stateDir: String?

    @Option(help: ArgumentHelp("The hvctl that runs VMs (default: the one beside hvd).", valueName: "path"))
    var hvctl: String?

    @Option(help: ArgumentHelp("How often hvd looks at each VM for events, in milliseconds.", valueName: "ms"))
    var pollInterval: Int = 500

    @Option(name: .customLong("tenant"), help: ArgumentHelp("""
        Serve tenant NAME on a socket of its own, owned by UID (and GID; default: UID), through which         it sees and controls only its own VMs, confined to its files directory (repeatable).
        """, valueName: "name:uid[:gid]"))
    var tenants: [String] = []

    @Option(help: ArgumentHelp("Where tenants' sockets go: DIR/NAME/api.sock (default: /run/hvd-tenants, beside $HV_RUN_DIR).", valueName: "dir"))
    var tenantSockets: String?

    @Option(help: ArgumentHelp("Where tenants' files go: DIR/NAME, the tenant's own (default: /var/lib/hv-tenants, beside the state directory).", valueName: "dir"))
    var tenantFiles: String?

    mutating func validate() throws {
        guard (50...60_000).contains(pollInterval) else { throw ValidationError("--poll-interval must be 50 to 60000 ms") }
        for (flag, value) in [("--socket", socket), ("--state-dir", stateDir), ("--hvctl", hvctl), ("--tenant-sockets", tenantSockets),
                              ("--tenant-files", tenantFiles)] {
            if let value, value.utf8.first != UInt8(ascii: "/") { throw ValidationError("\(flag) '\(value)' must be an absolute path") }
        }
    }

    func run() async throws {
        // Sockets, definitions and the audit log are hvd's alone.
        umask(0o077)
        let socketPath = socket ?? RunDirectory.path + "/hvd/api.sock"
        let state = stateDir ?? ProcessInfo.processInfo.environment["HV_STATE_DIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/var/lib/hv"
        let hvctlPath = hvctl ?? executableDirectory() + "/hvctl"
        guard access(hvctlPath, X_OK) == 0 else { fail("cannot run \(hvctlPath): \(String(cString: strerror(errno))); give hvctl's path with --hvctl") }

        let socketDirectory = String(socketPath[..<(socketPath.lastIndex(of: "/") ?? socketPath.startIndex)])
        try makeDirectories(socketDirectory)
        // One hvd per socket: a lock held for hvd's whole life (Hummingbird replaces a socket file
        // it finds, so the lock is what keeps a second hvd from taking a live one's socket).
        let lock: FileDescriptor
        do {
            guard let held = try PathLock.acquire(socketPath + ".lock", blocking: false) else {
                fail("another hvd already serves \(socketPath); stop it first, or give this one another --socket")
            }
            lock = held
        } catch {
            fail("cannot lock \(socketPath).lock: \(error)")
        }
        defer { lock.close() }

        var logger = Logger(label: "hvd")
        logger.logLevel = .warning
        let store: DefinitionStore
        let audit: AuditLog
        let service: VMService
        let listeners: TenantListeners
        do throws(UsageError) {
            store = try DefinitionStore(stateDirectory: state)
            audit = try AuditLog(path: state + "/audit.log", socket: socketPath)
            let events = EventMonitor(names: { store.all.map(\.name) }, status: VMService.status(of:))
            service = VMService(store: store, events: events, hvctl: hvctlPath, stateDirectory: state)
            let sockets = tenantSockets ?? Self.beside(RunDirectory.path, "hvd-tenants")
            let files = tenantFiles ?? Self.beside(state, "hv-tenants")
            var given: [Tenant] = []
            for spec in tenants {
                let tenant = try Tenant.parse(spec, sockets: sockets, files: files)
                guard !given.contains(where: { $0.name == tenant.name }) else { throw UsageError(message: "--tenant \(tenant.name) is given twice") }
                given.append(tenant)
            }
            listeners = try TenantListeners(given: given, stateDirectory: state, sockets: sockets, files: files, service: service, logger: logger)
        } catch {
            fail(error.message)
        }
        for skipped in store.skipped { log("skipped the definition \(skipped); fix or remove it") }
        let adopted = service.events.start(interval: Double(pollInterval) / 1000)
        if !adopted.isEmpty { log("found \(adopted.count) VM\(adopted.count == 1 ? "" : "s") running: \(adopted.joined(separator: ", "))") }

        // Each socket's path appears only once it accepts (see StagedSocketPath); each tenant's
        // listener removes its own when it stops.
        let adminSocket = StagedSocketPath(socketPath)
        @Sendable func failServing(_ problem: String) -> Never {
            adminSocket.remove()
            fail(problem)
        }
        let app = Application(
            router: API.router(service: service, audit: audit, scope: .admin, tenants: listeners),
            configuration: .init(address: .unixDomainSocket(path: adminSocket.bindPath), serverName: "hvd"),
            onServerRunning: { _ in
                if let problem = adminSocket.publish() { failServing(problem) }
                log("serving \(store.all.count) VM definition\(store.all.count == 1 ? "" : "s") from \(state) on \(socketPath)")
                await service.autostart()
            },
            logger: logger)
        let group = ServiceGroup(services: [app, listeners], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        do {
            try await group.run()
        } catch let error as UsageError {
            failServing(error.message)
        } catch {
            failServing("cannot serve \(socketPath): \(error)")
        }
        adminSocket.remove()
        // Disk jobs are hvd's own work: a conversion stops and removes its copy, a commit ends.
        for job in service.jobs.settleDiskJobs(seconds: 30) {
            log("stopping with \(job.type) job \(job.id) of \(job.disk ?? "") unfinished")
        }
        log("stopped; the VMs keep running")
    }

    /// `name` in the directory that holds `path` (/run/hv → /run/hvd-tenants).
    static func beside(_ path: String, _ name: String) -> String {
        let trimmed = path.hasSuffix("/") ? String(path.dropLast()) : path
        let parent = trimmed[..<(trimmed.lastIndex(of: "/") ?? trimmed.startIndex)]
        return (parent.isEmpty ? "" : String(parent)) + "/" + name
    }

    private func makeDirectories(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            fail("cannot create \(path): \(error.localizedDescription)")
        }
    }
}

/// Ends hvd with one line on stderr.
func fail(_ message: String) -> Never {
    log(message)
    exit(1)
}

extension VMService {
    /// The running VM's status, or nil when it is not running.
    @Sendable static func status(of name: String) -> VMStatus? {
        guard case .live = vmPresence(name) else { return nil }
        return controlRequest(name, ControlRequest(.status), timeoutSeconds: 2)?.status
    }
}

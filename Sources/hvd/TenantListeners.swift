import Foundation
import HVHost
import Hummingbird
import Logging
import ServiceLifecycle
import Synchronization

/// A tenant as `GET /v1/tenants` shows it.
struct TenantInfo: Encodable, Sendable {
    var name: String
    var uid: UInt32
    var gid: UInt32
    var socket: String
    var files: String
    /// `command-line` (`hvd --tenant`) or `api` (`POST /v1/tenants`, kept in STATE/tenants.json).
    var origin: String
    /// How many VMs hvd keeps for it.
    var vms: Int
}

/// `GET /v1/tenants`.
struct TenantList: Encodable, Sendable {
    var tenants: [TenantInfo]
}

/// `POST /v1/tenants`.
struct CreateTenantRequest: Decodable, Sendable {
    var name: String
    var uid: UInt32
    var gid: UInt32?

    enum CodingKeys: String, CodingKey, CaseIterable { case name, uid, gid }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        uid = try c.decode(UInt32.self, forKey: .uid)
        gid = try c.decodeIfPresent(UInt32.self, forKey: .gid)
    }
}

/// The tenants hvd serves, each on a listener of its own: those given with `--tenant`, and those
/// the admin adds through the API, which are kept in STATE/tenants.json and served again when hvd
/// starts. Each listener is a Hummingbird application run in a task of its own, so a tenant can
/// be added or removed while hvd and every VM run; this service starts the listeners hvd starts
/// with and, when hvd stops, ends them all.
final class TenantListeners: Service, Sendable {
    /// The tenants `STATE/tenants.json` keeps (those added through the API).
    private struct Book: Codable {
        struct Entry: Codable { var name: String, uid: UInt32, gid: UInt32 }
        var tenants: [Entry]
    }

    private struct Served: Sendable {
        var tenant: Tenant
        var fromCommandLine: Bool
        /// The listener's own service group: shutting it down gracefully ends the listener.
        var group: ServiceGroup
        var listener: Task<Void, Never>
    }

    private let served = Mutex<[String: Served]>([:])
    /// Additions and removals one at a time: a name or uid is checked and taken in one step.
    private let changing = Mutex(false)
    private let bookPath: String
    private let auditPath: String
    private let socketsRoot: String
    private let filesRoot: String
    private let service: VMService
    private let logger: Logger
    /// The tenants hvd starts with: `--tenant`'s, then the book's.
    private let initial: [(Tenant, fromCommandLine: Bool)]
    /// Whether every one of `initial` is served (or was, and has been removed since).
    private let servedInitial = Mutex(false)

    /// Reads the book and checks it against `--tenant`'s (`given`); nothing is served yet.
    init(given: [Tenant], stateDirectory: String, sockets: String, files: String, service: VMService, logger: Logger) throws(UsageError) {
        bookPath = stateDirectory + "/tenants.json"
        auditPath = stateDirectory + "/audit.log"
        socketsRoot = sockets
        filesRoot = files
        self.service = service
        self.logger = logger
        var initial = given.map { ($0, fromCommandLine: true) }
        if let data = FileManager.default.contents(atPath: bookPath) {
            let book: Book
            do { book = try ControlJSON.decode(Book.self, Array(data)) } catch {
                throw UsageError(message: "\(bookPath): \(error.message); fix or remove it")
            }
            for entry in book.tenants {
                let tenant = try Tenant.make(name: entry.name, uid: entry.uid, gid: entry.gid, sockets: sockets, files: files, what: "\(bookPath): tenant '\(entry.name)'")
                if let twin = initial.first(where: { $0.0.name == tenant.name || $0.0.uid == tenant.uid }) {
                    throw UsageError(message: "\(bookPath) keeps tenant '\(tenant.name)' (uid \(tenant.uid)), and tenant '\(twin.0.name)' (uid \(twin.0.uid)) is given again: remove one of them")
                }
                initial.append((tenant, fromCommandLine: false))
            }
        }
        self.initial = initial
    }

    func run() async throws {
        for (tenant, fromCommandLine) in initial {
            do throws(UsageError) { try await serve(tenant, fromCommandLine: fromCommandLine) } catch {
                await stopAll()
                throw error
            }
        }
        servedInitial.withLock { $0 = true }
        try? await gracefulShutdown()
        await stopAll()
    }

    func list() -> [TenantInfo] {
        let vms = service.store.all
        return served.withLock { $0.values.sorted { $0.tenant.name < $1.tenant.name } }.map { s in
            TenantInfo(name: s.tenant.name, uid: s.tenant.uid, gid: s.tenant.gid, socket: s.tenant.socket, files: s.tenant.files,
                       origin: s.fromCommandLine ? "command-line" : "api", vms: vms.filter { $0.owner == s.tenant.name }.count)
        }
    }

    /// Adds tenant `request.name` and answers once its socket accepts; kept for hvd's next start.
    func add(_ request: CreateTenantRequest) async throws(APIError) -> TenantInfo {
        let tenant: Tenant
        do {
            tenant = try Tenant.make(name: request.name, uid: request.uid, gid: request.gid ?? request.uid, sockets: socketsRoot, files: filesRoot, what: "tenant")
        } catch {
            throw .badRequest(error.message)
        }
        try beginChange()
        defer { endChange() }
        // While hvd starts, the tenants it starts with count too: one may not be served yet.
        let starting = servedInitial.withLock { !$0 } ? initial.map(\.0) : []
        let taken = served.withLock { $0.values.map(\.tenant) } + starting
        if let twin = taken.first(where: { $0.name == tenant.name || $0.uid == tenant.uid }) {
            throw twin.name == tenant.name
                ? .conflict("tenant '\(tenant.name)' exists already (uid \(twin.uid)); DELETE /v1/tenants/\(tenant.name) first")
                : .conflict("uid \(tenant.uid) is tenant \(twin.name)'s already; give each tenant a uid of its own")
        }
        do throws(UsageError) { try await serve(tenant, fromCommandLine: false) } catch { throw .unprocessable(error.message) }
        do throws(APIError) { try writeBook() } catch {
            await stop(tenant.name)
            throw error
        }
        guard let info = list().first(where: { $0.name == tenant.name }) else {
            throw .internalFailure("tenant '\(tenant.name)' was served and is gone")
        }
        return info
    }

    /// Stops serving tenant `name` and forgets it; its files directory stays (its images are its own).
    func remove(_ name: String) async throws(APIError) {
        try beginChange()
        defer { endChange() }
        guard let entry = served.withLock({ $0[name] }) else { throw .notFound("no tenant '\(name)' (see GET /v1/tenants)") }
        guard !entry.fromCommandLine else {
            throw .conflict("tenant '\(name)' is given with hvd --tenant; remove it from hvd's command line")
        }
        let kept = service.store.all.filter { $0.owner == name }.map(\.name)
        guard kept.isEmpty else {
            throw .conflict("tenant '\(name)' has VMs (\(kept.joined(separator: ", "))); stop and delete them first")
        }
        await stop(name)
        // Its socket's directory is root's and empty now; its files directory is the tenant's.
        rmdir(String(entry.tenant.socket.dropLast("/api.sock".count)))
        try writeBook()
        log("stopped serving tenant \(name); its files stay in \(entry.tenant.files)")
    }

    private func beginChange() throws(APIError) {
        guard changing.withLock({ busy in
            defer { busy = true }
            return !busy
        }) else { throw .conflict("another request is adding or removing a tenant; try again when it is done") }
    }

    private func endChange() { changing.withLock { $0 = false } }

    /// Prepares the tenant's directories and serves its socket; returns once the socket accepts
    /// at its path, or with why it does not.
    private func serve(_ tenant: Tenant, fromCommandLine: Bool) async throws(UsageError) {
        try tenant.prepare()
        let audit = try AuditLog(path: auditPath, socket: tenant.socket)
        let staged = StagedSocketPath(tenant.socket)
        let ready = ReadySignal()
        let app = Application(
            router: API.router(service: service, audit: audit, scope: .tenant(tenant), tenants: self),
            configuration: .init(address: .unixDomainSocket(path: staged.bindPath), serverName: "hvd"),
            onServerRunning: { _ in
                // Owner and mode first, then the path: a tenant never sees its socket as root's.
                tenant.handOverSocket(at: staged.bindPath)
                ready.signal(staged.publish())
            },
            logger: logger)
        let group = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let listener = Task {
            do { try await group.run() } catch { ready.signal("cannot serve \(tenant.socket): \(error)") }
            ready.signal("the listener on \(tenant.socket) ended")
            staged.remove()
        }
        if let problem = await ready.wait() {
            await group.triggerGracefulShutdown()
            await listener.value
            throw UsageError(message: problem)
        }
        served.withLock { $0[tenant.name] = Served(tenant: tenant, fromCommandLine: fromCommandLine, group: group, listener: listener) }
        log("serving tenant \(tenant.name) (uid \(tenant.uid)) on \(tenant.socket), its files in \(tenant.files)")
    }

    private func stop(_ name: String) async {
        guard let entry = served.withLock({ $0.removeValue(forKey: name) }) else { return }
        await entry.group.triggerGracefulShutdown()
        await entry.listener.value
    }

    private func stopAll() async {
        for name in served.withLock({ Array($0.keys) }) { await stop(name) }
    }

    private func writeBook() throws(APIError) {
        let entries = served.withLock { $0.values.filter { !$0.fromCommandLine }.map(\.tenant) }
            .sorted { $0.name < $1.name }.map { Book.Entry(name: $0.name, uid: $0.uid, gid: $0.gid) }
        try DefinitionStore.replace(bookPath, with: ControlJSON.encode(Book(tenants: entries), pretty: true) + [0x0A])
    }
}

/// One value, given once (later ones are dropped), awaited by one waiter.
private final class ReadySignal: Sendable {
    private let state = Mutex<(value: String??, waiter: CheckedContinuation<String?, Never>?)>((nil, nil))

    /// nil: ready; a text: why not.
    func signal(_ problem: String?) {
        let waiter: CheckedContinuation<String?, Never>? = state.withLock { s in
            guard s.value == nil else { return nil }
            s.value = .some(problem)
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume(returning: problem)
    }

    func wait() async -> String? {
        await withCheckedContinuation { (continuation: CheckedContinuation<String?, Never>) in
            let given: String?? = state.withLock { s in
                if let value = s.value { return .some(value) }
                s.waiter = continuation
                return nil
            }
            if let given { continuation.resume(returning: given) }
        }
    }
}

import Foundation
import HVHost
import Hummingbird
import NIOCore
import ServiceLifecycle

/// The request context: Hummingbird's own, plus the connection, whose peer credentials the
/// audit log records.
struct HVDContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let channel: any Channel

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }

    /// Request bodies above this are refused with 413 (a VM definition is a few KiB).
    var maxUploadSize: Int { API.maximumBodyBytes }
}

/// The routes of api/hvd.yaml. Every handler answers JSON (`{"error": "…"}` with a 4xx status
/// for a bad request); none lets an error through to Hummingbird, whose own error bodies are
/// not the documented ones.
enum API {
    static let maximumBodyBytes = 1 << 20
    static let version = "hv 0.1.0 (hvd API v1)"

    /// The routes for one socket: the admin's (`scope` .admin) or a tenant's.
    static func router(service: VMService, audit: AuditLog, scope: Scope, tenants: TenantListeners) -> Router<HVDContext> {
        let router = Router(context: HVDContext.self)
        router.add(middleware: audit)

        router.get("/v1") { _, _ in
            let kept = service.store.all.filter(scope.sees)
            let running = await blocking { kept.filter { if case .live = vmPresence($0.name) { true } else { false } }.count }
            return json(ServiceInfo(version: version, runDirectory: RunDirectory.path, stateDirectory: service.stateDirectory,
                                    vms: kept.count, running: running))
        }
        router.get("/v1/vms") { _, _ in json(VMList(vms: await service.list(scope))) }
        router.post("/v1/vms") { request, _ in
            await answer(status: 201) { () async throws(APIError) in
                try await service.create(try await body(CreateVMRequest.self, request), scope)
            }
        }
        router.get("/v1/vms/:name") { _, context in
            await answer { () async throws(APIError) in try await service.inspect(try name(context), scope) }
        }
        router.patch("/v1/vms/:name") { request, context in
            await answer { () async throws(APIError) in try await service.update(try name(context), try await body(UpdateVMRequest.self, request), scope) }
        }
        router.delete("/v1/vms/:name") { _, context in
            await answerEmpty { () async throws(APIError) in try await service.delete(try name(context), scope) }
        }
        router.post("/v1/vms/:name/start") { _, context in
            await answer { () async throws(APIError) in try await service.start(try name(context), scope) }
        }
        router.post("/v1/vms/:name/stop") { _, context in
            await answer { () async throws(APIError) in try await service.stop(try name(context), scope) }
        }
        router.post("/v1/vms/:name/kill") { _, context in
            await answer { () async throws(APIError) in try await service.kill(try name(context), scope) }
        }
        router.post("/v1/vms/:name/pause") { _, context in
            await answer { () async throws(APIError) in try await service.pause(try name(context), scope) }
        }
        router.post("/v1/vms/:name/resume") { _, context in
            await answer { () async throws(APIError) in try await service.resume(try name(context), scope) }
        }
        router.put("/v1/vms/:name/cdrom") { request, context in
            await answer { () async throws(APIError) in
                let path = try await body(PathRequest.self, request).path
                return try await service.act(try name(context), ControlRequest(.cdromInsert, path: path), scope)
            }
        }
        router.delete("/v1/vms/:name/cdrom") { _, context in
            await answer { () async throws(APIError) in try await service.act(try name(context), ControlRequest(.cdromEject), scope) }
        }
        router.put("/v1/vms/:name/balloon") { request, context in
            await answer { () async throws(APIError) in
                let change = try await body(BalloonRequest.self, request)
                guard change.sizeMiB != nil || change.statsIntervalSeconds != nil else { throw .badRequest("give size_mib and/or stats_interval_s") }
                var control = ControlRequest(.balloon)
                control.sizeMiB = change.sizeMiB
                control.statsIntervalSeconds = change.statsIntervalSeconds
                return try await service.act(try name(context), control, scope)
            }
        }
        router.put("/v1/vms/:name/limits") { request, context in
            await answer { () async throws(APIError) in
                let change = try await body(LimitsRequest.self, request)
                guard !(change.limits ?? .init()).isEmpty || !(change.rates ?? []).isEmpty else {
                    throw .badRequest("give limits and/or rates to change")
                }
                var control = ControlRequest(.setLimits)
                control.limits = change.limits
                control.rates = change.rates
                return try await service.act(try name(context), control, scope)
            }
        }
        router.post("/v1/vms/:name/devices/:device/restart") { _, context in
            await answer { () async throws(APIError) in
                try await service.act(try name(context), ControlRequest(.deviceRestart, device: try device(context)), scope)
            }
        }
        router.post("/v1/vms/:name/devices/:device/upgrade") { request, context in
            await answer { () async throws(APIError) in
                let path = try await body(PathRequest.self, request).path
                return try await service.act(try name(context), ControlRequest(.deviceUpgrade, path: path, device: try device(context)), scope)
            }
        }
        router.post("/v1/vms/:name/snapshot") { request, context in
            await answer(status: 202) { () async throws(APIError) in
                try await service.snapshot(try name(context), try await body(SnapshotRequest.self, request), scope)
            }
        }
        router.post("/v1/vms/:name/restore") { request, context in
            await answer { () async throws(APIError) in
                try await service.restore(try name(context), try await body(RestoreRequest.self, request), scope)
            }
        }
        router.post("/v1/vms/:name/migrate") { request, context in
            await answer(status: 202) { () async throws(APIError) in
                try await service.migrate(try name(context), try await body(MigrateRequest.self, request), scope)
            }
        }
        router.post("/v1/vms/:name/incoming") { request, context in
            await answer(status: 202) { () async throws(APIError) in
                try await service.receive(try name(context), try await body(IncomingRequest.self, request), scope)
            }
        }
        router.post("/v1/disks/convert") { request, _ in
            await answer(status: 202) { () async throws(APIError) in
                try service.convertDisk(try await body(ConvertDiskRequest.self, request), scope)
            }
        }
        router.post("/v1/disks/commit") { request, _ in
            await answer(status: 202) { () async throws(APIError) in
                try service.commitDisk(try await body(CommitDiskRequest.self, request), scope)
            }
        }
        // Tenants are the host's admin's to add and remove.
        @Sendable func adminOnly() throws(APIError) {
            guard case .admin = scope else { throw .forbidden("only the host's admin manages tenants") }
        }
        router.get("/v1/tenants") { _, _ in
            await answer { () async throws(APIError) in
                try adminOnly()
                return TenantList(tenants: tenants.list())
            }
        }
        router.post("/v1/tenants") { request, _ in
            await answer(status: 201) { () async throws(APIError) in
                try adminOnly()
                return try await tenants.add(try await body(CreateTenantRequest.self, request))
            }
        }
        router.delete("/v1/tenants/:tenant") { _, context in
            await answerEmpty { () async throws(APIError) in
                try adminOnly()
                try await tenants.remove(context.parameters.get("tenant") ?? "")
            }
        }
        router.get("/v1/jobs") { _, _ in
            json(JobList(jobs: service.jobs.all.filter { job in service.store.get(job.vm).map(scope.sees) ?? (scope.owner == nil) }))
        }
        router.get("/v1/jobs/:id") { _, context in
            await answer { () async throws(APIError) in
                let id = context.parameters.get("id") ?? ""
                guard let job = service.jobs.get(id), service.store.get(job.vm).map(scope.sees) ?? (scope.owner == nil) else {
                    throw .notFound("no job '\(id)' (see GET /v1/jobs)")
                }
                return job
            }
        }
        router.delete("/v1/jobs/:id") { _, context in
            await answer { () async throws(APIError) in try await service.cancel(context.parameters.get("id") ?? "", scope) }
        }
        router.get("/v1/vms/:name/console") { request, context in
            do throws(APIError) {
                let vm = try name(context)
                let bytes = try consoleBytes(request)
                let tail = try await service.consoleTail(vm, bytes: bytes, scope)
                var headers = HTTPFields()
                headers[.contentType] = "text/plain; charset=utf-8"
                return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: tail)))
            } catch {
                return failure(error)
            }
        }
        router.get("/v1/events") { _, _ in
            // A tenant hears of its own VMs only (looked up as each event is sent).
            let stream = service.events.subscribe { event in
                guard case .tenant = scope else { return true }
                return service.store.get(event.vm).map(scope.sees) ?? false
            }
            var headers = HTTPFields()
            headers[.contentType] = "application/x-ndjson"
            headers[.cacheControl] = "no-store"
            return Response(status: .ok, headers: headers, body: ResponseBody { writer in
                // A first line at once, so a client knows it is subscribed before anything happens.
                try await writer.write(ByteBuffer(bytes: ControlJSON.encode(Event(type: "subscribed", vm: "")) + [0x0A]))
                // Until the client goes, or hvd stops: a watcher must not hold hvd's shutdown.
                for await event in stream.cancelOnGracefulShutdown() {
                    try await writer.write(ByteBuffer(bytes: ControlJSON.encode(event) + [0x0A]))
                }
                try await writer.finish(nil)
            })
        }
        router.get("/metrics") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
            return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: await Metrics.render(service, scope))))
        }
        return router
    }

    /// Every path the router serves, with its methods: what a 405 answer lists in `Allow`.
    static let paths: [(template: [Substring], methods: [String])] = [
        ("/v1", ["GET"]), ("/v1/vms", ["GET", "POST"]), ("/v1/vms/:name", ["GET", "PATCH", "DELETE"]),
        ("/v1/vms/:name/start", ["POST"]), ("/v1/vms/:name/stop", ["POST"]), ("/v1/vms/:name/kill", ["POST"]),
        ("/v1/vms/:name/pause", ["POST"]), ("/v1/vms/:name/resume", ["POST"]), ("/v1/vms/:name/cdrom", ["PUT", "DELETE"]),
        ("/v1/vms/:name/balloon", ["PUT"]), ("/v1/vms/:name/limits", ["PUT"]),
        ("/v1/vms/:name/devices/:device/restart", ["POST"]), ("/v1/vms/:name/devices/:device/upgrade", ["POST"]),
        ("/v1/vms/:name/console", ["GET"]), ("/v1/vms/:name/snapshot", ["POST"]), ("/v1/vms/:name/restore", ["POST"]), ("/v1/vms/:name/migrate", ["POST"]),
        ("/v1/vms/:name/incoming", ["POST"]), ("/v1/jobs", ["GET"]), ("/v1/jobs/:id", ["GET", "DELETE"]),
        ("/v1/disks/convert", ["POST"]), ("/v1/disks/commit", ["POST"]), ("/v1/tenants", ["GET", "POST"]), ("/v1/tenants/:tenant", ["DELETE"]), ("/v1/events", ["GET"]), ("/metrics", ["GET"]),
    ].map { ($0.0.split(separator: "/"), $0.1) }

    /// `?bytes=N` of `GET …/console`: 1 to 1 MiB, 64 KiB when absent.
    static func consoleBytes(_ request: Request) throws(APIError) -> Int {
        guard let text = request.uri.queryParameters.get("bytes") else { return 1 << 16 }
        guard let n = Int(text), (1...(1 << 20)).contains(n) else { throw .badRequest("bytes '\(text)' must be a whole number from 1 to 1048576") }
        return n
    }

    /// The methods `path` takes, or nil when no route has that shape.
    static func methods(allowedOn path: String) -> [String]? {
        let segments = path.split(separator: "/")
        return paths.first { route in
            route.template.count == segments.count && zip(route.template, segments).allSatisfy { $0.hasPrefix(":") || $0 == $1 }
        }?.methods
    }

    /// The `name` path parameter, checked as VM names are.
    static func name(_ context: HVDContext) throws(APIError) -> String {
        guard let name = context.parameters.get("name") else { throw .badRequest("the VM's name is missing from the path") }
        do { try RunDirectory.validate(name, flag: "VM name") } catch { throw .notFound(error.message) }
        return name
    }

    static func device(_ context: HVDContext) throws(APIError) -> String {
        guard let device = context.parameters.get("device"), (1...64).contains(device.utf8.count),
              device.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x7A).contains($0) }) else {
            throw .notFound("no such device: device names are lowercase letters and digits (disk0, net1, serial0; see GET /v1/vms/NAME)")
        }
        return device
    }

    /// The request's JSON body as `T`; errors name the key at fault.
    static func body<T: Decodable>(_ type: T.Type, _ request: Request) async throws(APIError) -> T {
        var request = request
        let buffer: ByteBuffer
        do { buffer = try await request.collectBody(upTo: maximumBodyBytes) } catch {
            throw .tooLarge("the request body is over \(maximumBodyBytes) bytes")
        }
        if let type = request.headers[.contentType], !type.lowercased().hasPrefix("application/json") {
            throw APIError(status: 415, message: "the body must be application/json, not \(type)")
        }
        let bytes = Array(buffer.readableBytesView)
        guard !bytes.isEmpty else { throw .badRequest("the request needs a JSON body") }
        do { return try ControlJSON.decode(type, bytes) } catch { throw .badRequest(error.message) }
    }

    static func json<T: Encodable>(_ value: T, status: Int = 200) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: .init(code: status), headers: headers,
                        body: ResponseBody(byteBuffer: ByteBuffer(bytes: ControlJSON.encode(value) + [0x0A])))
    }

    static func answer<T: Encodable>(status: Int = 200, _ body: () async throws(APIError) -> T) async -> Response {
        do { return json(try await body(), status: status) } catch { return failure(error) }
    }

    /// An error's response; the audit log gets its message too.
    static func failure(_ error: APIError) -> Response {
        FailureNote.current?.record(error.message)
        return json(APIError.Body(error: error.message), status: error.status)
    }

    static func answerEmpty(_ body: () async throws(APIError) -> Void) async -> Response {
        do {
            try await body()
            return Response(status: .noContent)
        } catch {
            return failure(error)
        }
    }
}

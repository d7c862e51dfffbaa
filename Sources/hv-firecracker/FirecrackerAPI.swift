import Foundation
import HVFirecrackerModel
import HVHost
import Hummingbird
import NIOCore
import Synchronization

/// The request context: Hummingbird's own, with Firecracker's payload limit
/// (`--http-api-max-payload-size`).
struct FirecrackerContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    init(source: ApplicationRequestContextSource) { coreContext = .init(source: source) }
    var maxUploadSize: Int { FirecrackerAPI.maximumPayload.withLock { $0 } }
}

/// Firecracker's API for one microVM, with its wire contract: JSON bodies, 204 for a change that
/// took, 200 with a body for a read, and 400 with `{"fault_message": "…"}` for anything refused,
/// including an unknown path or method.
enum FirecrackerAPI {
    static let maximumPayload = Mutex(51_200)
    static let firecrackerVersion = "1.10.1"
    static let vmmVersion = "1.10.1 (hv 0.1.0)"

    static func router(vm: MicroVM) -> Router<FirecrackerContext> {
        let router = Router(context: FirecrackerContext.self)
        router.add(middleware: FaultMiddleware())

        router.get("/") { _, _ in
            json(InstanceInfo(id: vm.id, state: await blocking { vm.state() }, vmmVersion: vmmVersion))
        }
        router.get("/version") { _, _ in json(FirecrackerVersion(firecrackerVersion: firecrackerVersion)) }
        router.get("/machine-config") { _, _ in json(vm.current.machine) }
        router.get("/vm/config") { _, _ in
            let c = vm.current
            return json(FullVMConfiguration(bootSource: c.boot, drives: c.drives, machineConfig: c.machine, networkInterfaces: c.nics,
                                            logger: c.logger, metrics: c.metrics, balloon: c.balloon))
        }
        router.put("/machine-config") { request, _ in
            await change { () async throws(Fault) in try vm.putMachineConfiguration(try await body(MachineConfiguration.self, request), partial: false) }
        }
        router.patch("/machine-config") { request, _ in
            await change { () async throws(Fault) in try vm.putMachineConfiguration(try await body(MachineConfiguration.self, request), partial: true) }
        }
        router.put("/boot-source") { request, _ in
            await change { () async throws(Fault) in try vm.putBootSource(try await body(BootSource.self, request)) }
        }
        router.put("/drives/:id") { request, context in
            await change { () async throws(Fault) in try vm.putDrive(try await body(Drive.self, request), pathID: try id(context)) }
        }
        router.patch("/drives/:id") { request, context in
            await change { () async throws(Fault) in try vm.patchDrive(try await body(PartialDrive.self, request), pathID: try id(context)) }
        }
        router.put("/network-interfaces/:id") { request, context in
            await change { () async throws(Fault) in try vm.putNetworkInterface(try await body(NetworkInterface.self, request), pathID: try id(context)) }
        }
        router.patch("/network-interfaces/:id") { request, context in
            await change { () async throws(Fault) in
                try vm.patchNetworkInterface(try await body(PartialNetworkInterface.self, request), pathID: try id(context))
            }
        }
        router.put("/balloon") { request, _ in
            await change { () async throws(Fault) in try vm.putBalloon(try await body(BalloonConfig.self, request)) }
        }
        router.patch("/balloon") { request, _ in
            await change { () async throws(Fault) in
                let update = try await body(BalloonUpdate.self, request)
                let result: Result<Void, Fault> = await blocking { Result { () throws(Fault) in try vm.patchBalloon(amountMiB: update.amountMib) } }
                try result.get()
            }
        }
        router.get("/balloon") { _, _ in
            guard let balloon = vm.current.balloon else { return fault("No balloon device configured: PUT /balloon before InstanceStart.") }
            return json(balloon)
        }
        router.get("/balloon/statistics") { _, _ in
            let result: Result<[String: UInt64], Fault> = await blocking { Result { () throws(Fault) in try vm.balloonStatistics() } }
            switch result {
            case .success(let figures): return json(figures)
            case .failure(let error): return fault(error.message)
            }
        }
        router.patch("/balloon/statistics") { request, _ in
            await change { () async throws(Fault) in
                let update = try await body(BalloonStatisticsUpdate.self, request)
                let result: Result<Void, Fault> = await blocking {
                    Result { () throws(Fault) in try vm.patchBalloonStatistics(intervalSeconds: update.statsPollingIntervalS) }
                }
                try result.get()
            }
        }
        router.put("/logger") { request, _ in
            await change { () async throws(Fault) in try vm.putLogger(try await body(LoggerConfig.self, request)) }
        }
        router.put("/metrics") { request, _ in
            await change { () async throws(Fault) in try vm.putMetrics(try await body(MetricsConfig.self, request)) }
        }
        router.put("/actions") { request, _ in
            await change { () async throws(Fault) in
                let action = try await body(InstanceActionInfo.self, request).actionType
                let result: Result<Void, Fault> = await blocking {
                    Result { () throws(Fault) in
                        switch action {
                        case .instanceStart: try vm.start()
                        case .sendCtrlAltDel: try vm.sendCtrlAltDel()
                        case .flushMetrics:
                            try vm.requireMetrics()
                            vm.flushMetrics()
                        }
                    }
                }
                try result.get()
            }
        }
        router.patch("/vm") { request, _ in
            await change { () async throws(Fault) in
                let target = try await body(VMState.self, request).state
                let result: Result<Void, Fault> = await blocking { Result { () throws(Fault) in try vm.pauseOrResume(target) } }
                try result.get()
            }
        }
        router.put("/snapshot/create") { request, _ in
            await change { () async throws(Fault) in
                let params = try await body(SnapshotCreateParams.self, request)
                let result: Result<Void, Fault> = await blocking { Result { () throws(Fault) in try vm.createSnapshot(params) } }
                try result.get()
            }
        }
        router.put("/snapshot/load") { request, _ in
            await change { () async throws(Fault) in
                let params = try await body(SnapshotLoadParams.self, request)
                let result: Result<Void, Fault> = await blocking { Result { () throws(Fault) in try vm.loadSnapshot(params) } }
                try result.get()
            }
        }
        return router
    }

    /// A drive's or interface's id from the path: Firecracker's rule (letters, digits, '_').
    static func id(_ context: FirecrackerContext) throws(Fault) -> String {
        guard let id = context.parameters.get("id"), (1...64).contains(id.utf8.count),
              id.utf8.allSatisfy({ $0 == UInt8(ascii: "_") || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }) else {
            throw Fault("Invalid ID: use 1 to 64 letters, digits and '_'")
        }
        return id
    }

    /// The request's JSON body as `T`; a fault names the field at fault.
    static func body<T: Decodable>(_ type: T.Type, _ request: Request) async throws(Fault) -> T {
        var request = request
        let limit = maximumPayload.withLock { $0 }
        let buffer: ByteBuffer
        do { buffer = try await request.collectBody(upTo: limit) } catch {
            throw Fault("Request payload is larger than the limit of \(limit) bytes allowed by the server (--http-api-max-payload-size)")
        }
        let bytes = Array(buffer.readableBytesView)
        guard !bytes.isEmpty else { throw Fault("Empty request body: this request needs a JSON body") }
        do { return try ControlJSON.decode(type, bytes) } catch { throw Fault("An error occurred when deserializing the json body of a request: \(error.message)") }
    }

    static func json<T: Encodable>(_ value: T, status: HTTPResponse.Status = .ok) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: ControlJSON.encode(value))))
    }

    static func fault(_ message: String) -> Response { json(Fault.Body(faultMessage: message), status: .badRequest) }

    /// 204 when `body` succeeds, else 400 with its fault.
    static func change(_ body: () async throws(Fault) -> Void) async -> Response {
        do {
            try await body()
            return Response(status: .noContent)
        } catch {
            return fault(error.message)
        }
    }
}

/// Turns Hummingbird's own errors (no such route, a body over the limit) into Firecracker's
/// 400 and `fault_message`.
struct FaultMiddleware: RouterMiddleware {
    typealias Context = FirecrackerContext

    func handle(_ request: Request, context: FirecrackerContext, next: (Request, FirecrackerContext) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as HTTPError where error.status == .notFound || error.status == .methodNotAllowed {
            return FirecrackerAPI.fault("Invalid request method and/or path: \(request.method) \(request.uri.path).")
        } catch let error as HTTPError where error.status == .contentTooLarge {
            return FirecrackerAPI.fault("Request payload is larger than the limit allowed by the server (--http-api-max-payload-size)")
        } catch {
            return FirecrackerAPI.json(Fault.Body(faultMessage: "\(error)"), status: .internalServerError)
        }
    }
}

import Foundation
import HVHost
import Hummingbird
import NIOCore
import Synchronization

/// Who is on the other end of a Unix socket connection (SO_PEERCRED), as the kernel saw it when
/// the client connected: it cannot be forged by the client.
struct PeerCredentials: Codable, Sendable {
    var pid: Int32
    var uid: UInt32
    var gid: UInt32

    /// The credentials of `channel`'s peer; nil when the channel is not a Unix socket.
    static func of(_ channel: any Channel) async -> PeerCredentials? {
        guard let provider = channel as? any SocketOptionProvider else { return nil }
        // `struct ucred` is { pid_t pid; uid_t uid; gid_t gid; }: three 32-bit fields, which is
        // this struct's layout; the kernel fills exactly sizeof(struct ucred) = 12 bytes.
        let future: EventLoopFuture<PeerCredentials> = provider.unsafeGetSocketOption(level: .socket, name: .init(rawValue: SO_PEERCRED))
        return try? await future.get()
    }
}

/// The audit log, STATE/audit.log: one JSON line for every request that changes something
/// (anything but GET and HEAD), written once it has been answered: when, who (the socket and
/// its peer's pid, uid and gid), what (method and path) and the result (status, and the error
/// when it failed). Lines are appended with one write(2) each, so lines from concurrent requests
/// never interleave.
///
/// As the first middleware it also turns Hummingbird's own errors (an unknown path, a method a
/// path does not take) into the API's `{"error": …}` bodies.
struct AuditLog: RouterMiddleware {
    typealias Context = HVDContext

    let path: String
    /// Which socket this router serves, as the log names it.
    let socket: String
    private let fd: Int32

    init(path: String, socket: String) throws(UsageError) {
        self.path = path
        self.socket = socket
        fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw UsageError(message: "cannot open the audit log \(path): \(String(cString: strerror(errno)))") }
    }

    struct Record: Encodable {
        var time: String
        var socket: String
        var peer: PeerCredentials?
        var method: String
        var path: String
        var status: Int
        var error: String?
    }

    func handle(_ request: Request, context: HVDContext, next: (Request, HVDContext) async throws -> Response) async throws -> Response {
        var response: Response
        let note = FailureNote()
        do {
            response = try await FailureNote.$current.withValue(note) { try await next(request, context) }
        } catch let error as HTTPError {
            if error.status == .notFound, let allowed = API.methods(allowedOn: request.uri.path) {
                // The router answers 404 for a path it knows under another method.
                let message = "\(request.method) is not allowed on \(request.uri.path): use \(allowed.joined(separator: ", "))"
                note.record(message)
                response = API.json(APIError.Body(error: message), status: 405)
                response.headers[.allow] = allowed.joined(separator: ", ")
            } else {
                let message = error.status == .notFound ? "no such path: \(request.uri.path) (see api/hvd.yaml)" : error.body ?? error.status.reasonPhrase
                note.record(message)
                response = API.json(APIError.Body(error: message), status: error.status.code)
            }
        } catch {
            note.record("\(error)")
            response = API.json(APIError.Body(error: "\(error)"), status: 500)
        }
        guard request.method != .get && request.method != .head else { return response }
        let failure = response.status.code >= 400 ? note.text : nil
        let record = Record(time: Event(type: "", vm: "").time, socket: socket, peer: await PeerCredentials.of(context.channel),
                            method: request.method.rawValue, path: request.uri.path, status: response.status.code, error: failure)
        let line = ControlJSON.encode(record) + [0x0A]
        let written = line.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        if written != line.count { log("cannot append to the audit log \(path): \(String(cString: strerror(errno)))") }
        return response
    }
}

/// Where a handler leaves its error message for the audit log: the middleware puts a fresh one
/// in the task-local before calling the handler, which runs in the same task.
final class FailureNote: Sendable {
    private let message = Mutex<String?>(nil)
    var text: String? { message.withLock { $0 } }
    func record(_ text: String) { message.withLock { $0 = text } }

    @TaskLocal static var current: FailureNote?
}

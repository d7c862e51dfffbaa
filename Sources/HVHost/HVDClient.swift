import Glibc
import HVSys

/// How hvctl talks to hvd, when one runs: HTTP/1.1 over hvd's admin socket, one request per
/// connection (`Connection: close`). hvctl stays usable without hvd; with it, the commands that
/// change a VM hvd keeps go through hvd, so they are in its audit log and its events name them
/// (`vm-stopped` with reason `requested`), and `hvctl start` starts a kept VM.
/// hvctl goes through hvd for start, stop, pause, resume, CD changes and device restarts and
/// upgrades; everything else talks to the VM's control socket.
public enum HVDClient {
    /// `$HVD_SOCKET`, or `$HV_RUN_DIR/hvd/api.sock`.
    public static var socketPath: String {
        if let v = getenv("HVD_SOCKET"), v.pointee != 0 { return String(cString: v) }
        return RunDirectory.path + "/hvd/api.sock"
    }

    public struct Response: Sendable {
        public var status: Int
        public var body: [UInt8]

        /// The `message` of an action's answer (a device restart or upgrade, a CD change).
        public var actionMessage: String? {
            struct ActionBody: Decodable { var message: String }
            return (try? ControlJSON.decode(ActionBody.self, body))?.message
        }

        /// The `error` of an error body, or the body as text.
        public var errorMessage: String {
            struct ErrorBody: Decodable { var error: String }
            return (try? ControlJSON.decode(ErrorBody.self, body))?.error ?? String(decoding: body, as: UTF8.self)
        }
    }

    /// One request to hvd; nil when no hvd listens on the socket (or it did not answer in time).
    public static func request(_ method: String, _ path: String, body: [UInt8]? = nil, timeoutSeconds: Int = 60) -> Response? {
        guard let fd = connectTo(socketPath, stream: true) else { return nil }
        defer { close(fd) }
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var head = "\(method) \(path) HTTP/1.1\r\nHost: hvd\r\nConnection: close\r\nUser-Agent: hvctl\r\n"
        if let body { head += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n" }
        let request = Array((head + "\r\n").utf8) + (body ?? [])
        var sent = 0
        while sent < request.count {
            let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            sent += n
        }
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while answer.count < 16 << 20 {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            answer += buffer.prefix(n)
        }
        return parse(answer)
    }

    /// A whole HTTP/1.1 response: the status line, headers, and a body by Content-Length,
    /// chunked, or up to the end.
    public static func parse(_ bytes: [UInt8]) -> Response? {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let end = bytes.indices.dropLast(3).first(where: { bytes[$0..<$0 + 4].elementsEqual(separator) }) else { return nil }
        let head = String(decoding: bytes[..<end], as: UTF8.self).split(separator: "\r\n", omittingEmptySubsequences: false)
        guard let statusLine = head.first, statusLine.hasPrefix("HTTP/1."), let status = Int(statusLine.split(separator: " ").dropFirst().first ?? "") else {
            return nil
        }
        var headers: [String: String] = [:]
        for line in head.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: " ")
        }
        var body = Array(bytes[(end + 4)...])
        if headers["transfer-encoding"]?.lowercased() == "chunked" {
            var decoded: [UInt8] = []
            var i = 0
            while let lineEnd = body.indices.dropFirst(i).first(where: { $0 + 1 < body.count && body[$0] == 13 && body[$0 + 1] == 10 }),
                  let size = Int(String(decoding: body[i..<lineEnd], as: UTF8.self).split(separator: ";").first ?? "", radix: 16), size > 0,
                  lineEnd + 2 + size <= body.count {
                decoded += body[(lineEnd + 2)..<(lineEnd + 2 + size)]
                i = lineEnd + 2 + size + 2
            }
            body = decoded
        } else if let length = headers["content-length"].flatMap({ Int($0) }), length <= body.count {
            body = Array(body.prefix(length))
        }
        return Response(status: status, body: body)
    }
}

private extension Substring {
    func trimmingCharacters(in set: Character) -> String {
        var s = self[...]
        while s.first == set { s = s.dropFirst() }
        while s.last == set { s = s.dropLast() }
        return String(s)
    }
}

import Foundation
import HVFirecrackerModel
import HVSys
import Synchronization

/// hv-firecracker's own log and metrics outputs, as Firecracker's: stderr until `PUT /logger`
/// (or `--log-path`) names a file or named pipe, then lines there; metrics lines to the file
/// `PUT /metrics` names. Files and pipes are opened read-write and non-blocking, as Firecracker
/// opens them, so a pipe with no reader yet neither fails nor blocks; a line that does not fit
/// a full pipe is dropped rather than stalling the API.
final class LogSink: Sendable {
    let id: String

    private struct Settings {
        var fd: Int32 = 2
        var showLevel = false
        var showOrigin = false
        /// Lines at or above this severity are written (0 error … 4 trace; -1 off).
        var threshold = 2
    }

    private let settings = Mutex(Settings())
    private let metrics = Mutex<Int32>(-1)

    init(id: String) { self.id = id }

    func configure(_ config: LoggerConfig) throws(Fault) {
        var new = settings.withLock { $0 }
        if let path = config.logPath {
            let fd = try Self.openOutput(path, what: "logger: log_path")
            if new.fd != 2 { close(new.fd) }
            new.fd = fd
        }
        if let level = config.level?.lowercased() {
            new.threshold = ["off": -1, "error": 0, "warning": 1, "warn": 1, "info": 2, "debug": 3, "trace": 4][level] ?? 2
        }
        new.showLevel = config.showLevel ?? new.showLevel
        new.showOrigin = config.showLogOrigin ?? new.showOrigin
        let configured = new
        settings.withLock { $0 = configured }
    }

    func openMetrics(_ path: String) throws(Fault) {
        let fd = try Self.openOutput(path, what: "metrics: metrics_path")
        metrics.withLock { $0 = fd }
    }

    func info(_ message: String, file: String = #fileID, line: Int = #line) { write(2, "INFO", message, file: file, line: line) }
    func error(_ message: String, file: String = #fileID, line: Int = #line) { write(0, "ERROR", message, file: file, line: line) }

    func writeMetrics(_ bytes: [UInt8]) {
        let fd = metrics.withLock { $0 }
        guard fd >= 0 else { return }
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }

    private func write(_ severity: Int, _ level: String, _ message: String, file: String, line: Int) {
        let s = settings.withLock { $0 }
        guard severity <= s.threshold else { return }
        // Firecracker's shape: TIME [ID:THREAD(:LEVEL)(:ORIGIN)] message
        var tag = "\(id):fc_api"
        if s.showLevel { tag += ":\(level)" }
        if s.showOrigin { tag += ":\(file):\(line)" }
        let text = Array("\(Self.timestamp()) [\(tag)] \(message)\n".utf8)
        _ = text.withUnsafeBytes { Glibc.write(s.fd, $0.baseAddress, $0.count) }
    }

    private static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = now.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ v: Int32, _ width: Int) -> String { String(repeating: "0", count: max(0, width - String(v).count)) + String(v) }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(now.tv_nsec / 1000), 6))"
    }

    private static func openOutput(_ path: String, what: String) throws(Fault) -> Int32 {
        let fd = retryOnInterrupt { open(path, O_RDWR | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC | O_NOCTTY, 0o600) }
        guard fd >= 0 else { throw Fault("\(what) \(path): \(Errno.current)") }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG || st.st_mode & S_IFMT == S_IFIFO else {
            close(fd)
            throw Fault("\(what) \(path): not a file or a named pipe")
        }
        return fd
    }
}

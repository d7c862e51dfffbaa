import Glibc
import HVCore
import HVSys
import Synchronization

// Live migration as the host layer sees it (docs/migration.md): the `tcp:HOST:PORT` addresses,
// the connection on each side, and what the control socket's `migrate` request does with them.
// The copying itself is the core's (HVCore's `Machine.migrate`, `IncomingMigration`).

public typealias MigrationError = HVCore.MigrationError
public typealias IncomingMigration = HVCore.IncomingMigration
public typealias MigrationChannel = HVCore.MigrationChannel

/// Where a migration goes or is awaited: `tcp:HOST:PORT` (HOST a name, an IPv4 address or an
/// IPv6 address in brackets).
public struct MigrationAddress: Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    public var description: String { host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)" }

    /// Parses `text`, given with `flag`; a bad one is a usage error naming both.
    public static func parse(_ text: String, flag: String) throws(UsageError) -> MigrationAddress {
        let hint = "invalid \(flag) '\(text)': use tcp:HOST:PORT, e.g. tcp:192.0.2.7:4444 or tcp:[2001:db8::7]:4444"
        guard text.hasPrefix("tcp:") else { throw UsageError(message: hint) }
        let rest = text.dropFirst(4)
        guard let colon = rest.lastIndex(of: ":") else { throw UsageError(message: hint) }
        var host = String(rest[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty, host.utf8.count <= 253, let port = UInt16(rest[rest.index(after: colon)...]), port > 0 else {
            throw UsageError(message: hint)
        }
        return MigrationAddress(host: host, port: port)
    }

    private func resolve(passive: Bool) throws(UsageError) -> (sockaddr_storage, socklen_t, Int32) {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw UsageError(message: "cannot resolve '\(host)' in \(description): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: UnsafeRawBufferPointer(start: first.pointee.ai_addr, count: Int(first.pointee.ai_addrlen))) }
        return (storage, first.pointee.ai_addrlen, first.pointee.ai_family)
    }

    /// Connects, giving up after `timeoutSeconds`.
    public func connect(timeoutSeconds: Int32 = 10) throws(UsageError) -> FileDescriptor {
        var (storage, length, family) = try resolve(passive: false)
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw UsageError(message: "cannot create a socket for \(description): \(Errno.current)") }
        let socketFD = FileDescriptor(owning: fd)
        let rc = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) } }
        if rc != 0 {
            guard errno == EINPROGRESS else { throw UsageError(message: "cannot connect to \(description): \(Errno.current)") }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            guard poll(&p, 1, timeoutSeconds * 1000) == 1 else {
                throw UsageError(message: "cannot connect to \(description): no answer within \(timeoutSeconds) s")
            }
            var error: Int32 = 0
            var size = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size)
            guard error == 0 else {
                throw UsageError(message: "cannot connect to \(description): \(Errno(rawValue: error))\(error == ECONNREFUSED ? " (is 'hvctl run --incoming \(description)' waiting there?)" : "")")
            }
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~Int32(O_NONBLOCK))
        return socketFD
    }

    /// Listens (one connection at a time).
    public func listen() throws(UsageError) -> FileDescriptor {
        var (storage, length, family) = try resolve(passive: true)
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw UsageError(message: "cannot create a socket for \(description): \(Errno.current)") }
        let socketFD = FileDescriptor(owning: fd)
        var on: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard rc == 0, Glibc.listen(fd, 1) == 0 else { throw UsageError(message: "cannot listen on \(description): \(Errno.current)") }
        return socketFD
    }
}

/// Waits for the source on `listener` and takes its first connection.
public func acceptMigration(on listener: FileDescriptor, address: MigrationAddress) throws(UsageError) -> FileDescriptor {
    while true {
        let fd = accept(listener.rawValue, nil, nil)
        if fd < 0 && errno == EINTR { continue }
        guard fd >= 0 else { throw UsageError(message: "cannot accept a migration on \(address): \(Errno.current)") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return FileDescriptor(owning: fd)
    }
}

/// Who is at the other end of connected socket `fd`: "192.0.2.7:51234", "[2001:db8::7]:51234".
public func peerDescription(_ fd: FileDescriptor) -> String {
    var storage = sockaddr_storage()
    var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
    let rc = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd.rawValue, $0, &length) } }
    guard rc == 0 else { return "an unknown peer" }
    var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
    let family = Int32(storage.ss_family)
    return withUnsafePointer(to: &storage) { pointer -> String in
        if family == AF_INET {
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { v4 in
                var address = v4.pointee.sin_addr
                inet_ntop(AF_INET, &address, &text, socklen_t(text.count))
                return "\(String(cString: text)):\(UInt16(bigEndian: v4.pointee.sin_port))"
            }
        }
        return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { v6 in
            var address = v6.pointee.sin6_addr
            inet_ntop(AF_INET6, &address, &text, socklen_t(text.count))
            return "[\(String(cString: text))]:\(UInt16(bigEndian: v6.pointee.sin6_port))"
        }
    }
}

/// Releases and retakes the image locks of a migrating VM's disks (the destination takes them
/// between the two when the migration succeeds).
struct DiskLocks: Sendable {
    let images: [(file: FileDescriptor, exclusive: Bool)]

    init(_ disks: [DiskImage]) {
        images = disks.map { ($0.file, !$0.readOnly) }
    }

    func release() {
        for image in images { unlockImage(image.file) }
    }

    /// Nil once every lock is held again, else why not.
    func retake() -> String? {
        // The destination lets go when it gives up; give it a moment to do so.
        for _ in 0..<50 {
            if images.allSatisfy({ lockImage($0.file, exclusive: $0.exclusive) }) { return nil }
            usleep(100_000)
        }
        return "another process holds a disk image (the destination?)"
    }
}

/// The progress report `hvctl migrate` prints (a `ControlReply.progress`).
public struct MigrationProgressReport: Codable, Equatable, Sendable {
    public var phase: String
    public var round: Int
    public var bytesSent: UInt64
    public var dirtyBytes: UInt64
    public var dirtyRateBytesPerSecond: UInt64
    public var bandwidthBytesPerSecond: UInt64
    public var expectedDowntimeMilliseconds: Double
    public var elapsedMilliseconds: Double

    init(_ p: MigrationProgress) {
        phase = p.phase
        round = p.round
        bytesSent = p.bytesSent
        dirtyBytes = p.dirtyBytes
        dirtyRateBytesPerSecond = p.dirtyRateBytesPerSecond
        bandwidthBytesPerSecond = p.bandwidthBytesPerSecond
        expectedDowntimeMilliseconds = Double(p.expectedDowntimeNanoseconds) / 1e6
        elapsedMilliseconds = Double(p.elapsedNanoseconds) / 1e6
    }

    enum CodingKeys: String, CodingKey {
        case phase, round, bytesSent = "bytes_sent", dirtyBytes = "dirty_bytes", dirtyRateBytesPerSecond = "dirty_rate_bytes_per_second",
             bandwidthBytesPerSecond = "bandwidth_bytes_per_second", expectedDowntimeMilliseconds = "expected_downtime_ms",
             elapsedMilliseconds = "elapsed_ms"
    }
}

/// What a finished migration reports (a `ControlReply.migration`).
public struct MigrationResultReport: Codable, Equatable, Sendable {
    public var destination: String
    public var rounds: Int
    public var bytesSent: UInt64
    public var totalMilliseconds: Double
    public var downtimeMilliseconds: Double

    enum CodingKeys: String, CodingKey {
        case destination, rounds, bytesSent = "bytes_sent", totalMilliseconds = "total_ms", downtimeMilliseconds = "downtime_ms"
    }
}

/// One migration at a time per VM, and its cancel flag.
final class MigrationState: Sendable {
    let running = Atomic<Bool>(false)
    let cancel = Atomic<Bool>(false)
}

extension VMControl {
    /// `migrate`: runs the migration on a thread of its own, reporting on `client` (the control
    /// connection, which it then owns): progress replies, then one final reply. On success the
    /// VM here ends (`hvctl run` exits 0).
    func startMigration(_ request: ControlRequest, client: Int32) {
        @Sendable func finish(_ reply: ControlReply) {
            _ = ControlJSON.encode(reply).withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            close(client)
        }
        guard let machine = current.machine else { return finish(.failure("the VM is between boots; try again")) }
        guard let to = request.path else { return finish(.failure("migrate needs the destination (tcp:HOST:PORT)")) }
        let address: MigrationAddress
        do throws(UsageError) { address = try MigrationAddress.parse(to, flag: "destination") } catch { return finish(.failure(error.message)) }
        let security: MigrationSecurity
        if let hex = request.migrationKey {
            do throws(UsageError) { security = .sharedKey(try MigrationKey(hex: hex)) } catch { return finish(.failure(error.message)) }
        } else if request.insecurePlaintext == true {
            security = .plaintext
        } else {
            return finish(.failure("migrate needs the key both hosts hold (--key FILE; \(MigrationKey.howToMakeOne)), or --insecure-plaintext on a network nobody else can reach"))
        }
        if let why = machine.migrationRefusal() { return finish(.failure(why)) }
        guard !hasCDROM || medium.withLock({ $0 }) != nil else {
            return finish(.failure("cannot migrate \(name) while its CD-ROM drive is empty: insert a medium first ('hvctl cdrom \(name) insert ISO')"))
        }
        guard !migration.running.exchange(true, ordering: .acquiringAndReleasing) else {
            return finish(.failure("\(name) is already being migrated ('hvctl migrate \(name) --cancel' stops that)"))
        }
        migration.cancel.store(false, ordering: .releasing)
        var options = MigrationOptions()
        if let ms = request.maxDowntimeMs { options.maximumDowntimeNanoseconds = ms * 1_000_000 }
        if let s = request.timeoutSeconds { options.timeoutNanoseconds = s * 1_000_000_000 }
        if let b = request.bandwidth { options.bandwidthBytesPerSecond = b }
        options.finishOnTimeout = request.finishOnTimeout ?? false
        let chosen = options
        let record = snapshotRecord()
        let locks = diskLocks
        let state = migration
        let name = self.name
        let current = self.current
        do {
            try HostThread.spawn(name: "hv-migrate") {
                defer { state.running.store(false, ordering: .releasing) }
                let socket: FileDescriptor
                do throws(UsageError) { socket = try address.connect() } catch { return finish(.failure(error.message)) }
                let channel = MigrationChannel(socket: socket)
                defer { channel.close() }
                do throws(MigrationError) { try channel.establish(security, as: .source) } catch {
                    return finish(.failure(error.description))
                }
                let hooks = MigrationHooks(
                    releaseDisks: { locks.release() },
                    retakeDisks: { locks.retake() },
                    progress: { p in
                        let reply = ControlReply(ok: true, progress: MigrationProgressReport(p))
                        _ = ControlJSON.encode(reply).withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                    },
                    cancelled: { state.cancel.load(ordering: .acquiring) })
                do throws(MigrationError) {
                    let report = try machine.migrate(over: channel, host: record, options: chosen, hooks: hooks)
                    let result = MigrationResultReport(destination: address.description, rounds: report.rounds, bytesSent: report.bytesSent,
                                                       totalMilliseconds: Double(report.totalNanoseconds) / 1e6,
                                                       downtimeMilliseconds: Double(report.downtimeNanoseconds) / 1e6)
                    let sent = report.bytesSent >= 1 << 20 ? "\(report.bytesSent >> 20) MiB" : "\(report.bytesSent >> 10) KiB"
                    var reply = ControlReply(ok: true, message: "migrated \(name) to \(address) in \(Int(result.totalMilliseconds)) ms (guest paused \(String(format2: result.downtimeMilliseconds)) ms, \(report.rounds) rounds, \(sent) sent)")
                    reply.migration = result
                    finish(reply)
                    warn("\(name) migrated to \(address); this copy ends")
                    current.stop(.migrated)
                } catch {
                    finish(.failure(error.description))
                }
            }
        } catch {
            state.running.store(false, ordering: .releasing)
            finish(.failure("cannot start the migration thread: \(error)"))
        }
    }
}

extension String {
    /// `value` with one decimal.
    init(format2 value: Double) {
        let tenths = Int((value * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10)"
    }
}

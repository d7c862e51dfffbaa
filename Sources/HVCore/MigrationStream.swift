import CHVShim
import Glibc
import HVIPC
import HVKVM
import HVSys

// The live-migration stream (docs/migration.md): one TCP connection from the source VM's core to
// the destination's. Every message is a frame — a 16-byte header (u32 type, u32 payload length,
// u32 CRC-32C of the payload, u32 reserved 0) and the payload — so a flipped bit, a truncated
// stream or a peer that is not hv is refused in one line instead of becoming guest memory.

/// Why a migration failed or was refused, in one line.
public struct MigrationError: Error, Sendable, CustomStringConvertible {
    public let description: String
    /// The source sent GO but never heard that the destination runs the VM: the VM may run
    /// there, so the source must not resume it by itself.
    public let outcomeUnknown: Bool
    public init(_ description: String, outcomeUnknown: Bool = false) {
        self.description = description
        self.outcomeUnknown = outcomeUnknown
    }
}

/// The frames of the stream, in the order a migration sends them.
public enum MigrationMessage: UInt32, Sendable {
    /// Source → destination, first: protocol version, the VM's size, CPUID and definition.
    case hello = 1
    /// Destination → source: it can take this VM (payload: magic and version).
    case accept = 2
    /// Either way: no (payload: one line of UTF-8 saying why). Ends the migration.
    case refuse = 3
    /// Source → destination: u64 memfd offset, then whole pages of guest memory.
    case pages = 4
    /// Source → destination: u64 memfd offset, u64 length: pages that are now all zeros.
    case zeroes = 5
    /// Source → destination: u8 (1: the VM was paused by the operator), then the machine state
    /// in the snapshot state format (vCPUs, irqchip, clock, PCI, every device's state page).
    case state = 6
    /// Source → destination: the source has let go of the disks; open them and get ready.
    case handover = 7
    /// Destination → source: the VM is built, its devices run, its vCPUs wait for GO.
    case ready = 8
    /// Source → destination: run it. From here on the source never runs the guest again.
    case go = 9
    /// Destination → source: the guest runs here.
    case done = 10
}

/// A connected migration socket with framing, checksums and timeouts.
public final class MigrationChannel: @unchecked Sendable {
    // @unchecked: used by one thread at a time (the migrating thread on either side).
    public static let version: UInt32 = 1
    static let magic: [UInt8] = Array("HVMIGR\r\n".utf8)
    static let headerSize = 16
    /// Largest payload of a pages frame (plus its offset), and of any frame (the machine state
    /// carries the firmware ROM).
    static let maximumChunk = 1 << 20
    static let maximumPayload = 64 << 20
    /// How long a peer may take no data (or send none) before the migration is given up.
    public static let stallSeconds = 10

    private let socket: FileDescriptor
    /// What the other end is, in errors: "destination" or "source".
    private let peer: String
    /// Bytes handed to the kernel so far, headers included.
    public private(set) var bytesSent: UInt64 = 0
    /// When non-zero, `send` sleeps to keep the average rate at or below this many bytes a second.
    var bandwidthLimit: UInt64 = 0
    private var limitStart: UInt64 = 0
    private var limitBytes: UInt64 = 0

    /// Takes over `socket` (a connected stream socket): sends time out after `stallSeconds`,
    /// and so does a connection whose peer stops acknowledging (data or keepalive probes).
    public init(socket: FileDescriptor, peer: String = "destination") {
        self.socket = socket
        self.peer = peer
        var timeout = timeval(tv_sec: Self.stallSeconds, tv_usec: 0)
        setsockopt(socket.rawValue, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        func option(_ level: Int32, _ name: Int32, _ value: Int32) {
            var v = value
            setsockopt(socket.rawValue, level, name, &v, socklen_t(MemoryLayout<Int32>.size))
        }
        let tcp = Int32(IPPROTO_TCP)
        option(tcp, TCP_NODELAY, 1)
        // A cut network leaves data in the send buffer unacknowledged, or a side waiting (for
        // READY, for GO) on a connection with nothing in flight: the user timeout ends the first,
        // keepalive probes every second turn the second into the first. Either way the error
        // comes within `stallSeconds`, not after the kernel's 15 minutes of retransmissions.
        option(tcp, 18 /* TCP_USER_TIMEOUT, ms */, Int32(Self.stallSeconds * 1000))
        option(SOL_SOCKET, SO_KEEPALIVE, 1)
        option(tcp, 4 /* TCP_KEEPIDLE */, 1)
        option(tcp, 5 /* TCP_KEEPINTVL */, 1)
        option(tcp, 6 /* TCP_KEEPCNT */, Int32(Self.stallSeconds))
    }

    /// The error for a failed send or receive on the connection to `peer`.
    private static func failure(_ peer: String) -> MigrationError {
        if errno == ETIMEDOUT {
            return MigrationError("the \(peer) stopped answering for \(stallSeconds) s (network down, or its host died)")
        }
        return MigrationError("the connection to the \(peer) failed: \(Errno.current)")
    }

    /// Closes the connection (the peer sees end of stream).
    public func close() { socket.close() }

    private func sendAll(_ base: UnsafeRawPointer, _ count: Int) throws(MigrationError) {
        var done = 0
        while done < count {
            let n = Glibc.send(socket.rawValue, base + done, count - done, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    throw MigrationError("the \(peer) took no data for \(Self.stallSeconds) s (network down, or it stopped)")
                }
                throw Self.failure(peer)
            }
            done += n
        }
    }

    /// A frame's 16-byte header: type, payload length, the payload's CRC32C, reserved.
    package static func frameHeader(type: UInt32, _ payload: UnsafeRawBufferPointer) -> [UInt8] {
        let crc = payload.count == 0 ? 0 : hv_crc32c(0, payload.baseAddress, UInt(payload.count))
        var header = [UInt8](repeating: 0, count: headerSize)
        for (i, v) in [type, UInt32(payload.count), crc, 0].enumerated() {
            for b in 0..<4 { header[4 * i + b] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(b))) }
        }
        return header
    }

    /// Sends one frame whose payload is `payload`.
    func send(_ type: MigrationMessage, _ payload: UnsafeRawBufferPointer) throws(MigrationError) {
        // Paced before anything goes out: a cancel heard while waiting leaves no half-sent frame.
        try throttle(UInt64(Self.headerSize + payload.count))
        let header = Self.frameHeader(type: type.rawValue, payload)
        var failure: MigrationError?
        header.withUnsafeBytes { h in
            do throws(MigrationError) { try sendAll(h.baseAddress!, h.count) } catch { failure = error }
        }
        if let failure { throw failure }
        if payload.count > 0 { try sendAll(payload.baseAddress!, payload.count) }
        bytesSent += UInt64(Self.headerSize + payload.count)
    }

    func send(_ type: MigrationMessage, _ payload: [UInt8] = []) throws(MigrationError) {
        var failure: MigrationError?
        payload.withUnsafeBytes { p in
            do throws(MigrationError) { try send(type, p) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Asked while `send` waits for the bandwidth limit: true abandons the send (a cancel).
    var cancelled: () -> Bool = { false }

    /// How much guest memory one frame should carry: at most an eighth of a second's worth under
    /// a bandwidth limit (whole pages, at least one), so progress, cancels and the limit itself
    /// work in small steps; otherwise `maximumChunk`.
    var chunkBytes: Int {
        guard bandwidthLimit > 0 else { return Self.maximumChunk }
        return Int(min(max(bandwidthLimit / 8, 4096), UInt64(Self.maximumChunk))) & ~4095
    }

    /// Waits until the bytes sent so far fit the limit's average rate, in slices of at most
    /// 50 ms so that a cancel is heard.
    private func throttle(_ bytes: UInt64) throws(MigrationError) {
        guard bandwidthLimit > 0 else { return }
        if limitStart == 0 { limitStart = monotonicNanoseconds() }
        limitBytes += bytes
        let due = limitStart + limitBytes * 1_000_000_000 / bandwidthLimit
        while true {
            let now = monotonicNanoseconds()
            guard due > now else { return }
            if cancelled() { throw MigrationError("cancelled; the VM carries on here") }
            usleep(UInt32(min((due - now) / 1000, 50_000)))
        }
    }

    /// Reads exactly `count` bytes into `base`, waiting at most `timeoutSeconds` for each part.
    private func receiveAll(_ base: UnsafeMutableRawPointer, _ count: Int, timeoutSeconds: Int, peer: String) throws(MigrationError) {
        var done = 0
        while done < count {
            var p = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, Int32(timeoutSeconds * 1000))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { throw MigrationError("the \(peer) sent nothing for \(timeoutSeconds) s") }
            let n = Glibc.recv(socket.rawValue, base + done, count - done, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw n == 0 ? MigrationError("the \(peer) closed the connection") : Self.failure(peer)
            }
            done += n
        }
    }

    /// Receives one frame; refuses a bad header, an oversized payload or a checksum mismatch.
    /// A REFUSE frame becomes an error carrying the peer's reason.
    func receive(timeoutSeconds: Int = stallSeconds, peer: String) throws(MigrationError) -> (MigrationMessage, [UInt8]) {
        var raw = [UInt8](repeating: 0, count: Self.headerSize)
        var failure: MigrationError?
        raw.withUnsafeMutableBytes { b in
            do throws(MigrationError) { try receiveAll(b.baseAddress!, b.count, timeoutSeconds: timeoutSeconds, peer: peer) } catch { failure = error }
        }
        if let failure { throw failure }
        func word(_ i: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(raw[4 * i + $1]) << (8 * UInt32($1)) } }
        if Array(raw[0..<8]) == Self.magic {
            throw MigrationError("the \(peer) sent a migration header where a frame was due (is it hv?)")
        }
        guard let type = MigrationMessage(rawValue: word(0)), word(3) == 0 else {
            throw MigrationError("the \(peer) is not speaking hv's migration protocol (frame type \(word(0)))")
        }
        let length = Int(word(1))
        guard length <= Self.maximumPayload else { throw MigrationError("the \(peer) sent a \(length)-byte frame, more than hv's \(Self.maximumPayload >> 20) MiB") }
        var payload = [UInt8](repeating: 0, count: length)
        if length > 0 {
            payload.withUnsafeMutableBytes { b in
                do throws(MigrationError) { try receiveAll(b.baseAddress!, b.count, timeoutSeconds: timeoutSeconds, peer: peer) } catch { failure = error }
            }
            if let failure { throw failure }
        }
        guard (length == 0 ? 0 : hv_crc32c(0, payload, UInt(length))) == word(2) else {
            throw MigrationError("a frame from the \(peer) failed its checksum (the stream is corrupt)")
        }
        if type == .refuse {
            throw MigrationError("the \(peer) refused: \(String(decoding: payload.prefix(1024), as: UTF8.self))")
        }
        return (type, payload)
    }

    /// Receives a frame that must be `expected`.
    func receive(_ expected: MigrationMessage, timeoutSeconds: Int = stallSeconds, peer: String) throws(MigrationError) -> [UInt8] {
        let (type, payload) = try receive(timeoutSeconds: timeoutSeconds, peer: peer)
        guard type == expected else { throw MigrationError("the \(peer) sent \(type) where \(expected) was due") }
        return payload
    }

    /// Sends REFUSE with `reason`, ignoring failure (the peer may be gone already).
    public func refuse(_ reason: String) {
        try? send(.refuse, Array(reason.utf8.prefix(1024)))
    }

    /// The magic and version both sides open with (HELLO and ACCEPT).
    package static func versionStamp() -> [UInt8] {
        var w = WireWriter()
        w.raw(magic)
        w.u32(version)
        return w.bytes
    }

    /// Checks a peer's magic and version; the reader is left after them.
    static func checkVersionStamp(_ r: inout WireReader, peer: String) throws(MigrationError) {
        guard (try? r.raw(8)) == magic else { throw MigrationError("the \(peer) is not an hv migration peer") }
        guard let theirs = try? r.u32() else { throw MigrationError("the \(peer) sent a truncated header") }
        guard theirs == version else {
            throw MigrationError("the \(peer) speaks hv migration protocol \(theirs), this hv speaks \(version): run the same hv version on both hosts")
        }
    }
}

/// What the source says of the VM before anything is copied; the destination accepts or refuses.
public struct MigrationHello: Sendable {
    /// The host layer's record of the VM (its definition), as a snapshot keeps it.
    public var host: [UInt8]
    public var memoryBytes: UInt64
    public var cpus: Int
    /// The CPUID table the guest sees: a destination whose CPU lacks part of it refuses.
    public var cpuid: [kvm_cpuid_entry2]

    func encode() -> [UInt8] {
        var w = WireWriter()
        w.raw(MigrationChannel.versionStamp())
        w.u64(memoryBytes)
        w.u32(UInt32(cpus))
        w.u32(UInt32(cpuid.count))
        w.u32(UInt32(MemoryLayout<kvm_cpuid_entry2>.size))
        for var entry in cpuid { withUnsafeBytes(of: &entry) { w.raw(Array($0.prefix(MemoryLayout<kvm_cpuid_entry2>.size))) } }
        w.u32(UInt32(host.count))
        w.raw(host)
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) throws(MigrationError) -> MigrationHello {
        var r = WireReader(bytes)
        try MigrationChannel.checkVersionStamp(&r, peer: "source")
        do throws(WireError) {
            let memoryBytes = try r.u64()
            let cpus = Int(try r.u32())
            let count = Int(try r.u32())
            let entrySize = Int(try r.u32())
            guard entrySize == MemoryLayout<kvm_cpuid_entry2>.size, count <= 256 else { throw WireError.invalidField("CPUID table") }
            var cpuid: [kvm_cpuid_entry2] = []
            for _ in 0..<count {
                let raw = try r.raw(entrySize)
                var entry = kvm_cpuid_entry2()
                withUnsafeMutableBytes(of: &entry) { $0.copyBytes(from: raw) }
                cpuid.append(entry)
            }
            let host = try r.raw(Int(try r.u32()))
            try r.finish()
            return MigrationHello(host: host, memoryBytes: memoryBytes, cpus: cpus, cpuid: cpuid)
        } catch {
            throw MigrationError("the source's migration header is malformed (\(error))")
        }
    }
}

import CHVShim
import Glibc
import HVIPC
import HVKVM
import HVSys

// The live-migration stream (docs/migration.md): one TCP connection from the source VM's core to
// the destination's. It opens with each side's 48-byte `MigrationOpening` (version, protection,
// nonce) and, with a shared key, each side's proof that it holds the key. Every message after
// that is a frame — a 16-byte header (u32 type, u32 payload length, u32 CRC-32C of the payload,
// u32 reserved 0) and the payload — so a flipped bit, a truncated stream or a peer that is not hv
// is refused in one line instead of becoming guest memory. With a key each frame travels sealed:
// u32 sealed length, then the frame encrypted and its 16-byte tag (MigrationSecurity.swift).

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
    /// 2: the opening and the shared key (version 1 began with HELLO, in the clear).
    public static let version: UInt32 = 2
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
    /// The ciphers each way once `establish` agreed a key; nil in the clear.
    private var sealing: (send: any MigrationCipher, receive: any MigrationCipher)?
    private var sentRecords: UInt64 = 0
    private var receivedRecords: UInt64 = 0
    /// Whether frames travel encrypted and authenticated (`establish` with a shared key).
    public var isSealed: Bool { sealing != nil }

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
        if let cipher = sealing?.send { return try sendSealed(type, payload, cipher) }
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

    /// Sends the frame as one sealed record: its length (also authenticated), then the frame
    /// encrypted with its tag. The frame is copied once, into the record, and sealed there.
    private func sendSealed(_ type: MigrationMessage, _ payload: UnsafeRawBufferPointer, _ cipher: any MigrationCipher) throws(MigrationError) {
        let sealedSize = Self.headerSize + payload.count + cipher.overhead
        let recordSize = 4 + sealedSize
        try throttle(UInt64(recordSize))
        let length = Self.littleEndian(UInt32(sealedSize))
        let header = Self.frameHeader(type: type.rawValue, payload)
        var record = [UInt8](unsafeUninitializedCapacity: recordSize) { buffer, initialized in
            let raw = UnsafeMutableRawBufferPointer(buffer)
            raw.copyBytes(from: length)
            UnsafeMutableRawBufferPointer(rebasing: raw[4..<(4 + Self.headerSize)]).copyBytes(from: header)
            if payload.count > 0 { UnsafeMutableRawBufferPointer(rebasing: raw[(4 + Self.headerSize)...]).copyMemory(from: payload) }
            // The tag's bytes are written by `seal`; until then they are zeros, never undefined.
            UnsafeMutableRawBufferPointer(rebasing: raw[(recordSize - cipher.overhead)...]).initializeMemory(as: UInt8.self, repeating: 0)
            initialized = recordSize
        }
        let counter = sentRecords
        let outcome = record.withUnsafeMutableBytes { r in
            Result { () throws(MigrationError) in try cipher.seal(UnsafeMutableRawBufferPointer(rebasing: r[4...]), associated: length, counter: counter) }
        }
        try outcome.get()
        sentRecords += 1
        var failure: MigrationError?
        record.withUnsafeBytes { r in
            do throws(MigrationError) { try sendAll(r.baseAddress!, r.count) } catch { failure = error }
        }
        if let failure { throw failure }
        bytesSent += UInt64(recordSize)
    }

    private static func littleEndian(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }

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
    /// With `deadline` (monotonic nanoseconds), all of it must have arrived by then.
    private func receiveAll(_ base: UnsafeMutableRawPointer, _ count: Int, timeoutSeconds: Int, peer: String,
                            deadline: UInt64? = nil) throws(MigrationError) {
        var done = 0
        while done < count {
            var p = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
            var milliseconds = timeoutSeconds * 1000
            if let deadline {
                let now = monotonicNanoseconds()
                guard now < deadline else {
                    throw MigrationError("the \(peer) did not complete the opening within \(timeoutSeconds) s")
                }
                milliseconds = min(milliseconds, Int((deadline - now + 999_999) / 1_000_000))
            }
            let ready = poll(&p, 1, Int32(milliseconds))
            if ready < 0 && errno == EINTR { continue }
            if ready == 0, deadline != nil { continue }  // the check above says which
            guard ready > 0 else { throw MigrationError("the \(peer) sent nothing for \(timeoutSeconds) s") }
            let n = Glibc.recv(socket.rawValue, base + done, count - done, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw n == 0 ? MigrationError("the \(peer) closed the connection") : Self.failure(peer)
            }
            done += n
        }
    }

    /// Reads exactly `count` bytes. Unless `zeroed`, the array is not cleared first (a large
    /// record is then written once, by the kernel; on failure nothing of it is used).
    private func receiveBytes(_ count: Int, timeoutSeconds: Int, peer: String, zeroed: Bool = true,
                              deadline: UInt64? = nil) throws(MigrationError) -> [UInt8] {
        // Uninitialized memory is never read: `receiveAll` fills every byte or throws.
        var bytes = zeroed ? [UInt8](repeating: 0, count: count)
            : [UInt8](unsafeUninitializedCapacity: count) { _, initialized in initialized = count }
        var failure: MigrationError?
        if count > 0 {
            bytes.withUnsafeMutableBytes { b in
                do throws(MigrationError) {
                    try receiveAll(b.baseAddress!, b.count, timeoutSeconds: timeoutSeconds, peer: peer, deadline: deadline)
                } catch { failure = error }
            }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Receives one frame; refuses a bad header, an oversized payload or a checksum mismatch (and
    /// with a key, a record that fails authentication). A REFUSE frame becomes an error carrying
    /// the peer's reason.
    func receive(timeoutSeconds: Int = stallSeconds, peer: String) throws(MigrationError) -> (MigrationMessage, [UInt8]) {
        let raw: [UInt8]
        var payload: [UInt8]
        if let cipher = sealing?.receive {
            let lengthBytes = try receiveBytes(4, timeoutSeconds: timeoutSeconds, peer: peer)
            let length = Int(Self.word(lengthBytes, 0))
            guard length >= Self.headerSize + cipher.overhead, length <= Self.headerSize + Self.maximumPayload + cipher.overhead else {
                throw MigrationError("the \(peer) sent a \(length)-byte record, not a sealed frame of at most \(Self.maximumPayload >> 20) MiB")
            }
            var record = try receiveBytes(length, timeoutSeconds: timeoutSeconds, peer: peer, zeroed: false)
            let counter = receivedRecords
            guard record.withUnsafeMutableBytes({ cipher.open($0, associated: lengthBytes, counter: counter) }) else {
                throw MigrationError("a frame from the \(peer) failed authentication (altered, replayed or injected on the way): the migration stops")
            }
            receivedRecords += 1
            raw = Array(record[0..<Self.headerSize])
            payload = Array(record[Self.headerSize..<(length - cipher.overhead)])
            guard Int(Self.word(raw, 1)) == payload.count else {
                throw MigrationError("a frame from the \(peer) says \(Self.word(raw, 1)) bytes and carries \(payload.count)")
            }
        } else {
            raw = try receiveBytes(Self.headerSize, timeoutSeconds: timeoutSeconds, peer: peer)
            payload = []
        }
        if Array(raw[0..<8]) == Self.magic {
            throw MigrationError("the \(peer) sent a migration header where a frame was due (is it hv?)")
        }
        guard let type = MigrationMessage(rawValue: Self.word(raw, 0)), Self.word(raw, 3) == 0 else {
            throw MigrationError("the \(peer) is not speaking hv's migration protocol (frame type \(Self.word(raw, 0)))")
        }
        let length = Int(Self.word(raw, 1))
        if sealing == nil {
            guard length <= Self.maximumPayload else { throw MigrationError("the \(peer) sent a \(length)-byte frame, more than hv's \(Self.maximumPayload >> 20) MiB") }
            payload = try receiveBytes(length, timeoutSeconds: timeoutSeconds, peer: peer)
        }
        guard (length == 0 ? 0 : hv_crc32c(0, payload, UInt(length))) == Self.word(raw, 2) else {
            throw MigrationError("a frame from the \(peer) failed its checksum (the stream is corrupt)")
        }
        if type == .refuse {
            throw MigrationError("the \(peer) refused: \(String(decoding: payload.prefix(1024), as: UTF8.self))")
        }
        return (type, payload)
    }

    /// The little-endian u32 at word `index` of `bytes`.
    private static func word(_ bytes: [UInt8], _ index: Int) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(bytes[4 * index + $1]) << (8 * UInt32($1)) }
    }

    /// Receives a frame that must be `expected`.
    func receive(_ expected: MigrationMessage, timeoutSeconds: Int = stallSeconds, peer: String) throws(MigrationError) -> [UInt8] {
        let (type, payload) = try receive(timeoutSeconds: timeoutSeconds, peer: peer)
        guard type == expected else { throw MigrationError("the \(peer) sent \(type) where \(expected) was due") }
        return payload
    }

    /// Opens the connection: each side sends its `MigrationOpening` (the source first; the
    /// destination answers after reading it, so both hear of a version or protection mismatch
    /// and each says it in its own words), then, with a shared key, each sends its proof that it
    /// holds the key and checks the other's. Nothing about the VM goes before this succeeds, and
    /// all of it must within `timeoutSeconds` (a peer trickling its opening is given up then).
    public func establish(_ security: MigrationSecurity, as role: MigrationRole, timeoutSeconds: Int = stallSeconds) throws(MigrationError) {
        let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds) * 1_000_000_000
        let schedule: (any MigrationKeySchedule)?
        if case .sharedKey(let s) = security { schedule = s } else { schedule = nil }
        let mine = MigrationOpening(version: Self.version,
                                    mode: schedule == nil ? MigrationOpening.plaintextMode : MigrationOpening.sharedKeyMode,
                                    nonce: schedule == nil ? [UInt8](repeating: 0, count: MigrationOpening.nonceSize) : try randomBytes(MigrationOpening.nonceSize))
        func sendOpening() throws(MigrationError) {
            let bytes = mine.encode()
            var failure: MigrationError?
            bytes.withUnsafeBytes { b in
                do throws(MigrationError) { try sendAll(b.baseAddress!, b.count) } catch { failure = error }
            }
            if let failure { throw failure }
            bytesSent += UInt64(bytes.count)
        }
        if role == .source { try sendOpening() }
        let raw = try receiveBytes(MigrationOpening.size, timeoutSeconds: timeoutSeconds, peer: peer, deadline: deadline)
        // The destination answers whatever came, so that a source of another version or
        // protection hears of it from its own side; it sends nothing to a peer that is not hv.
        let theirs = MigrationOpening.decode(raw)
        if role == .destination, theirs != nil { try sendOpening() }
        guard let theirs else {
            throw MigrationError("the \(peer) is not an hv migration peer of protocol \(Self.version) (an hv before 2026-12 speaks protocol 1: run the same hv version on both hosts)")
        }
        guard theirs.version == Self.version else {
            throw MigrationError("the \(peer) speaks hv migration protocol \(theirs.version), this hv speaks \(Self.version): run the same hv version on both hosts")
        }
        guard theirs.mode == mine.mode else {
            if mine.mode == MigrationOpening.plaintextMode {
                throw MigrationError("the \(peer) requires a migration key: give both hosts the same --key FILE")
            }
            throw MigrationError("the \(peer) runs without a migration key (--insecure-plaintext), this host requires one: give both hosts the same --key FILE")
        }
        guard let schedule else { return }
        let sourceNonce = role == .source ? mine.nonce : theirs.nonce
        let destinationNonce = role == .source ? theirs.nonce : mine.nonce
        guard !constantTimeEqual(sourceNonce, destinationNonce) else {
            throw MigrationError("the \(peer) echoed this host's nonce (a reflected connection): the migration stops")
        }
        let session = try schedule.session(sourceNonce: sourceNonce, destinationNonce: destinationNonce)
        let (myProof, theirProof) = role == .source ? (session.sourceProof, session.destinationProof) : (session.destinationProof, session.sourceProof)
        // Both proofs go out before either is checked: each side then tells its operator itself
        // that the keys differ, instead of one of them seeing only a closed connection.
        var failure: MigrationError?
        myProof.withUnsafeBytes { b in
            do throws(MigrationError) { try sendAll(b.baseAddress!, b.count) } catch { failure = error }
        }
        if let failure { throw failure }
        bytesSent += UInt64(myProof.count)
        let received = try receiveBytes(theirProof.count, timeoutSeconds: timeoutSeconds, peer: peer, deadline: deadline)
        guard constantTimeEqual(received, theirProof) else {
            throw MigrationError("the \(peer) holds a different migration key: give both hosts the same --key FILE")
        }
        sealing = role == .source ? (session.sourceToDestination, session.destinationToSource) : (session.destinationToSource, session.sourceToDestination)
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

import CLibcrypto
import Glibc
import HVCore
import HVSys

/// The secret both hosts of a migration hold (`hvctl run --incoming … --key FILE` and
/// `hvctl migrate … --key FILE`): HVCore's `MigrationChannel.establish` proves each side holds it,
/// then seals every frame. From the key and the connection's two nonces, HKDF-SHA256 derives a
/// fresh AES-256-GCM key each way and a proof key, so no two connections share a key and a
/// record cannot be replayed into another connection or reflected back (docs/migration.md).
/// HMAC-SHA256 and AES-256-GCM are the host's OpenSSL (`CLibcrypto`, loaded on first use).
public struct MigrationKey: MigrationKeySchedule {
    /// A key file holds at least this many bytes (32 random bytes: `head -c 32 /dev/urandom`).
    public static let minimumBytes = 32
    /// And at most this many (it is a key, not a document).
    public static let maximumBytes = 4096
    /// What `hvctl` and hvd tell an operator who gave no key.
    public static let howToMakeOne = "make one with '(umask 077; head -c 32 /dev/urandom > FILE)' and copy it to both hosts"

    private let secret: [UInt8]
    /// The key's bytes as hex: how `hvctl migrate` and hvd hand it to the VM's core over its
    /// control socket (which only the VM's owner can reach).
    public let hex: String

    /// A key of `bytes` (refused when shorter than `minimumBytes` or longer than `maximumBytes`).
    public init(bytes: [UInt8], from source: String = "the migration key") throws(UsageError) {
        guard bytes.count >= Self.minimumBytes else {
            throw UsageError(message: "\(source) is \(bytes.count) bytes; a migration key needs at least \(Self.minimumBytes) random bytes: \(Self.howToMakeOne)")
        }
        guard bytes.count <= Self.maximumBytes else {
            throw UsageError(message: "\(source) is \(bytes.count) bytes, more than a migration key's \(Self.maximumBytes)")
        }
        secret = bytes
        hex = bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    /// The key whose bytes `hex` spells (as `hex` gives them).
    public init(hex text: String) throws(UsageError) {
        var bytes: [UInt8] = []
        var digits = text.utf8.makeIterator()
        while let high = digits.next() {
            guard let low = digits.next(), let h = Self.nibble(high), let l = Self.nibble(low) else {
                throw UsageError(message: "the migration key is not hex")
            }
            bytes.append(h << 4 | l)
        }
        try self.init(bytes: bytes)
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        default: return nil
        }
    }

    /// Reads the key file at `path` (given with `flag`): a regular file, readable by its owner
    /// only, of `minimumBytes` to `maximumBytes`.
    public static func load(_ path: String, flag: String) throws(UsageError) -> MigrationKey {
        let fd: FileDescriptor
        do throws(HostFileError) {
            fd = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: Int64(maximumBytes))
        } catch {
            throw UsageError(message: "\(flag) \(path): \(error)")
        }
        defer { fd.close() }
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else { throw UsageError(message: "\(flag) \(path): \(Errno.current)") }
        guard st.st_mode & 0o077 == 0 else {
            throw UsageError(message: "\(flag) \(path): other users may read it (mode \(String(st.st_mode & 0o777, radix: 8))): chmod 600 \(path)")
        }
        var bytes = [UInt8](repeating: 0, count: maximumBytes + 1)
        var filled = 0
        while filled < bytes.count {
            let n = bytes.withUnsafeMutableBytes { read(fd.rawValue, $0.baseAddress! + filled, $0.count - filled) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw UsageError(message: "\(flag) \(path): \(Errno.current)") }
            if n == 0 { break }
            filled += n
        }
        return try MigrationKey(bytes: Array(bytes.prefix(filled)), from: "\(flag) \(path)")
    }

    /// Loads the host's OpenSSL (once per process); nil, or why it cannot be used.
    public static func loadCryptography() -> String? {
        var reason = [CChar](repeating: 0, count: 256)
        guard hv_libcrypto_load(&reason, reason.count) == 0 else {
            return String(decoding: reason.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return nil
    }

    public func session(sourceNonce: [UInt8], destinationNonce: [UInt8]) throws(MigrationError) -> MigrationSession {
        if let why = Self.loadCryptography() { throw MigrationError(why) }
        let derived = try Self.hkdfSHA256(secret: secret, salt: sourceNonce + destinationNonce,
                                          info: Array("hv migration protocol 2: AES-256-GCM each way, proofs".utf8), count: 96)
        let proofKey = Array(derived[64..<96])
        func proof(_ role: String) throws(MigrationError) -> [UInt8] {
            try Self.hmacSHA256(key: proofKey, Array("hv migration \(role) holds the key".utf8))
        }
        return MigrationSession(sourceToDestination: AESGCMRecordCipher(key: Array(derived[0..<32])),
                                destinationToSource: AESGCMRecordCipher(key: Array(derived[32..<64])),
                                sourceProof: try proof("source"), destinationProof: try proof("destination"))
    }

    static func hmacSHA256(key: [UInt8], _ data: [UInt8]) throws(MigrationError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        guard hv_hmac_sha256(key, key.count, data, data.count, &out) == 0 else { throw MigrationError("HMAC-SHA256 failed in OpenSSL") }
        return out
    }

    /// HKDF with SHA-256 (RFC 5869): extract, then expand to `count` bytes.
    static func hkdfSHA256(secret: [UInt8], salt: [UInt8], info: [UInt8], count: Int) throws(MigrationError) -> [UInt8] {
        let pseudorandomKey = try hmacSHA256(key: salt, secret)
        var output: [UInt8] = []
        var block: [UInt8] = []
        var counter: UInt8 = 1
        while output.count < count {
            block = try hmacSHA256(key: pseudorandomKey, block + info + [counter])
            output += block
            counter += 1
        }
        return Array(output.prefix(count))
    }
}

/// AES-256-GCM for one direction of one connection; the record counter is the nonce (96 bits:
/// four zero bytes and the counter, little-endian), never reused under one key.
struct AESGCMRecordCipher: MigrationCipher {
    let key: [UInt8]
    var overhead: Int { 16 }

    private static func nonce(_ counter: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 12)
        for i in 0..<8 { bytes[4 + i] = UInt8(truncatingIfNeeded: counter >> (8 * UInt64(i))) }
        return bytes
    }

    func seal(_ record: UnsafeMutableRawBufferPointer, associated: [UInt8], counter: UInt64) throws(MigrationError) {
        guard record.count >= overhead, let base = record.baseAddress?.assumingMemoryBound(to: UInt8.self) else {
            throw MigrationError("a migration record too short to seal")
        }
        // In place: OpenSSL's GCM allows its output to be its input.
        guard hv_aes256gcm_seal(key, Self.nonce(counter), associated, associated.count, base, record.count - overhead, base) == 0 else {
            throw MigrationError("AES-256-GCM encryption failed in OpenSSL")
        }
    }

    func open(_ record: UnsafeMutableRawBufferPointer, associated: [UInt8], counter: UInt64) -> Bool {
        guard record.count >= overhead, let base = record.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return false }
        return hv_aes256gcm_open(key, Self.nonce(counter), associated, associated.count, base, record.count, base) == 0
    }
}

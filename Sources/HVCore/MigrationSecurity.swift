import CHVShim
import Glibc

// How a migration's TCP connection is protected (docs/migration.md, "Security"). The core owns
// the protocol — the opening both sides send, the key proofs, the sealed records — and the host
// layer supplies the cryptography (HVHost `MigrationKey`: HKDF-SHA256 and AES-256-GCM on
// swift-crypto), so the core links no cryptography library.

/// How the operator chose to protect a migration: the same on both hosts, or the opening fails.
public enum MigrationSecurity: Sendable {
    /// No authentication and no encryption (`--insecure-plaintext`): for a network where nobody
    /// else can connect or listen.
    case plaintext
    /// A secret both hosts hold (`--key FILE`): each side proves it holds the key before anything
    /// else is said, and every frame after that is encrypted and authenticated.
    case sharedKey(any MigrationKeySchedule)
}

/// Which end of the connection this is.
public enum MigrationRole: Sendable {
    case source, destination
}

/// Derives one connection's keys from the shared secret and the two random nonces of its opening.
public protocol MigrationKeySchedule: Sendable {
    func session(sourceNonce: [UInt8], destinationNonce: [UInt8]) throws(MigrationError) -> MigrationSession
}

/// One connection's keys: a cipher each way, and the proof each side sends that it holds the key.
public struct MigrationSession: Sendable {
    public var sourceToDestination: any MigrationCipher
    public var destinationToSource: any MigrationCipher
    /// What the source sends to prove it holds the key (and the destination expects).
    public var sourceProof: [UInt8]
    /// What the destination sends to prove it holds the key.
    public var destinationProof: [UInt8]

    public init(sourceToDestination: any MigrationCipher, destinationToSource: any MigrationCipher,
                sourceProof: [UInt8], destinationProof: [UInt8]) {
        self.sourceToDestination = sourceToDestination
        self.destinationToSource = destinationToSource
        self.sourceProof = sourceProof
        self.destinationProof = destinationProof
    }
}

/// Authenticated encryption for one direction of one connection, in place (a record is copied
/// once, into the buffer it is sent from; guest memory is never written). `counter` numbers the
/// records sent that way (0, 1, 2, …): the cipher's nonce, so that a record replayed, dropped or
/// moved fails to open.
public protocol MigrationCipher: Sendable {
    /// Bytes `seal` adds to a record (the authentication tag).
    var overhead: Int { get }
    /// Encrypts the first `record.count - overhead` bytes of `record` in place and writes the
    /// tag over them and `associated` into its last `overhead` bytes.
    func seal(_ record: UnsafeMutableRawBufferPointer, associated: [UInt8], counter: UInt64) throws(MigrationError)
    /// Decrypts `record` (ciphertext, then tag) in place. False when it was not sealed by the key
    /// holder with this counter and associated data: its bytes are then garbage, not plaintext.
    func open(_ record: UnsafeMutableRawBufferPointer, associated: [UInt8], counter: UInt64) -> Bool
}

/// The 48 bytes each side sends first, in the clear: magic, protocol version, how it protects
/// the connection, and a random nonce (zeros without a key). `package`: the fuzz target sends one.
package struct MigrationOpening: Equatable {
    package static let size = 48
    package static let nonceSize = 32
    package var version: UInt32
    /// 0: plaintext; 1: a shared key (HKDF-SHA256, AES-256-GCM).
    package var mode: UInt32
    package var nonce: [UInt8]

    package static let plaintextMode: UInt32 = 0
    package static let sharedKeyMode: UInt32 = 1

    package init(version: UInt32, mode: UInt32, nonce: [UInt8]) {
        self.version = version
        self.mode = mode
        self.nonce = nonce
    }

    package func encode() -> [UInt8] {
        var bytes = MigrationChannel.magic
        for v in [version, mode] { for b in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(b)))) } }
        return bytes + nonce
    }

    /// Nil when `bytes` do not start with hv's magic.
    static func decode(_ bytes: [UInt8]) -> MigrationOpening? {
        guard bytes.count == size, Array(bytes[0..<8]) == MigrationChannel.magic else { return nil }
        func word(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) } }
        return MigrationOpening(version: word(8), mode: word(12), nonce: Array(bytes[16..<48]))
    }
}

/// `count` bytes from the kernel's random pool.
func randomBytes(_ count: Int) throws(MigrationError) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var filled = 0
    while filled < count {
        let n = bytes.withUnsafeMutableBytes { hv_getrandom($0.baseAddress! + filled, count - filled, 0) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw MigrationError("cannot read random bytes for the migration's nonce: \(errno)") }
        filled += n
    }
    return bytes
}

/// Whether `a` and `b` are equal, taking the same time wherever they differ.
func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for i in 0..<a.count { difference |= a[i] ^ b[i] }
    return difference == 0
}

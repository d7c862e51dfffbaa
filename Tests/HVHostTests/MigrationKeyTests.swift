import Foundation
import Glibc
@testable import HVCore
@testable import HVHost
import HVSys
import Synchronization
import XCTest

/// The migration stream's shared key (docs/migration.md, "Security"): two channels joined by a
/// relay that sees (and may alter) every byte between them, as a network would.
final class MigrationKeyTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-migkey-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    /// Copies bytes both ways between the source's socket and the destination's, keeping what
    /// the source sent and letting a test change a byte of it on the way.
    final class Relay: @unchecked Sendable {
        // @unchecked: `seen` is guarded by `lock`; the rest is set before the thread starts.
        let source: MigrationChannel
        let destination: MigrationChannel
        /// The relay's own end towards the destination: a test may write into it.
        let towardsDestination: Int32
        private let fromSource: Int32
        private let lock = NSLock()
        private var seen: [UInt8] = []
        private var flipAt: Int?

        init(flipSourceByteAt offset: Int? = nil) {
            var a: [Int32] = [0, 0], b: [Int32] = [0, 0]
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &a)
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &b)
            source = MigrationChannel(socket: FileDescriptor(owning: a[0]))
            destination = MigrationChannel(socket: FileDescriptor(owning: b[0]), peer: "source")
            fromSource = a[1]
            towardsDestination = b[1]
            flipAt = offset
            let thread = Thread { [self] in pump() }
            thread.start()
        }

        /// Everything the source has sent so far.
        var sourceBytes: [UInt8] { lock.withLock { seen } }

        private func pump() {
            var fds = [pollfd(fd: fromSource, events: Int16(POLLIN), revents: 0), pollfd(fd: towardsDestination, events: Int16(POLLIN), revents: 0)]
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while poll(&fds, 2, 10_000) > 0 {
                for (i, (from, to)) in [(fromSource, towardsDestination), (towardsDestination, fromSource)].enumerated() where fds[i].revents != 0 {
                    let n = recv(from, &buffer, buffer.count, 0)
                    guard n > 0 else { close(fromSource); close(towardsDestination); return }
                    if i == 0 {
                        lock.withLock {
                            if let at = flipAt, at >= seen.count, at < seen.count + n { buffer[at - seen.count] ^= 0x40 }
                            seen += buffer[0..<n]
                        }
                    }
                    _ = send(to, buffer, n, Int32(MSG_NOSIGNAL))
                }
            }
        }
    }

    private func key(_ byte: UInt8) throws -> MigrationKey { try MigrationKey(bytes: [UInt8](repeating: byte, count: 32)) }

    /// Both ends establish at once (the destination on a thread); each one's error, if any.
    private func establish(_ relay: Relay, source: MigrationSecurity, destination: MigrationSecurity) -> (String?, String?) {
        let destinationError = Mutex<String?>(nil)
        let done = DispatchSemaphore(value: 0)
        let channel = relay.destination
        Thread {
            do throws(MigrationError) { try channel.establish(destination, as: .destination) } catch { destinationError.withLock { $0 = error.description } }
            done.signal()
        }.start()
        var sourceError: String?
        do throws(MigrationError) { try relay.source.establish(source, as: .source) } catch { sourceError = error.description }
        done.wait()
        return (sourceError, destinationError.withLock { $0 })
    }

    private func message(_ body: () throws(MigrationError) -> Void) -> String? {
        do throws(MigrationError) { try body() } catch { return error.description }
        return nil
    }

    /// The same key on both ends: frames arrive whole, and nothing of them crosses the wire in
    /// the clear.
    func testWithTheSameKeyFramesArriveAndTheWireCarriesNoPlaintext() throws {
        let relay = Relay()
        let (s, d) = establish(relay, source: .sharedKey(try key(7)), destination: .sharedKey(try key(7)))
        XCTAssertNil(s)
        XCTAssertNil(d)
        XCTAssertTrue(relay.source.isSealed && relay.destination.isSealed)
        let secret = Array(String(repeating: "guest memory secret ", count: 400).utf8)
        try relay.source.send(.pages, secret)
        try relay.source.send(.handover)
        let (type, payload) = try relay.destination.receive(peer: "source")
        XCTAssertEqual(type, .pages)
        XCTAssertEqual(payload, secret)
        XCTAssertEqual(try relay.destination.receive(.handover, peer: "source"), [])
        // And the other way.
        try relay.destination.send(.ready)
        XCTAssertEqual(try relay.source.receive(.ready, peer: "destination"), [])
        let wire = relay.sourceBytes
        XCTAssertFalse(String(decoding: wire, as: UTF8.self).contains("guest memory"), "plaintext on the wire")
        XCTAssertGreaterThan(wire.count, secret.count)
    }

    /// Different keys: each side says so, and no frame is exchanged.
    func testDifferentKeysAreRefusedOnBothSides() throws {
        let (s, d) = establish(Relay(), source: .sharedKey(try key(1)), destination: .sharedKey(try key(2)))
        XCTAssertEqual(s, "the destination holds a different migration key: give both hosts the same --key FILE")
        XCTAssertEqual(d, "the source holds a different migration key: give both hosts the same --key FILE")
    }

    /// One side with a key, the other without: each side names what the other lacks or wants.
    func testAKeyAgainstPlaintextIsRefusedOnBothSides() throws {
        let (s, d) = establish(Relay(), source: .plaintext, destination: .sharedKey(try key(3)))
        XCTAssertEqual(s, "the destination requires a migration key: give both hosts the same --key FILE")
        XCTAssertEqual(d, "the source runs without a migration key (--insecure-plaintext), this host requires one: give both hosts the same --key FILE")
        let (s2, d2) = establish(Relay(), source: .sharedKey(try key(3)), destination: .plaintext)
        XCTAssertEqual(s2, "the destination runs without a migration key (--insecure-plaintext), this host requires one: give both hosts the same --key FILE")
        XCTAssertEqual(d2, "the source requires a migration key: give both hosts the same --key FILE")
    }

    /// A byte changed on the way, and a record sent twice: both fail authentication.
    func testAnAlteredOrReplayedRecordFailsAuthentication() throws {
        // Opening (48) and proof (32) go first; then the record: length (4), sealed frame.
        let relay = Relay(flipSourceByteAt: 48 + 32 + 4 + 20)
        let (s, d) = establish(relay, source: .sharedKey(try key(9)), destination: .sharedKey(try key(9)))
        XCTAssertNil(s)
        XCTAssertNil(d)
        try relay.source.send(.pages, [UInt8](repeating: 0xAB, count: 4096 + 8))
        XCTAssertEqual(message { () throws(MigrationError) in _ = try relay.destination.receive(peer: "source") },
                       "a frame from the source failed authentication (altered, replayed or injected on the way): the migration stops")

        let clean = Relay()
        let (s2, d2) = establish(clean, source: .sharedKey(try key(9)), destination: .sharedKey(try key(9)))
        XCTAssertNil(s2)
        XCTAssertNil(d2)
        try clean.source.send(.handover)
        XCTAssertEqual(try clean.destination.receive(.handover, peer: "source"), [])
        let record = Array(clean.sourceBytes.dropFirst(48 + 32))
        XCTAssertEqual(send(clean.towardsDestination, record, record.count, 0), record.count)
        XCTAssertEqual(message { () throws(MigrationError) in _ = try clean.destination.receive(peer: "source") },
                       "a frame from the source failed authentication (altered, replayed or injected on the way): the migration stops")
    }

    /// A peer of another protocol version, or one that is not hv at all, is named.
    func testAnotherVersionOrAForeignPeerIsNamed() throws {
        let relay = Relay()
        var opening = Array("HVMIGR\r\n".utf8) + [1, 0, 0, 0, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 32)
        XCTAssertEqual(send(relay.towardsDestination, &opening, opening.count, 0), opening.count)
        XCTAssertEqual(message { () throws(MigrationError) in try relay.destination.establish(.plaintext, as: .destination) },
                       "the source speaks hv migration protocol 1, this hv speaks 2: run the same hv version on both hosts")
        let foreign = Relay()
        var junk = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8) + [UInt8](repeating: 0x20, count: 21)
        XCTAssertEqual(send(foreign.towardsDestination, &junk, junk.count, 0), junk.count)
        XCTAssertTrue(message { () throws(MigrationError) in try foreign.destination.establish(.sharedKey(try! self.key(1)), as: .destination) }?
            .hasPrefix("the source is not an hv migration peer of protocol 2") == true)
    }

    /// The primitives from the host's OpenSSL give the published answers: HKDF-SHA256 (RFC 5869
    /// test case 1) and AES-256-GCM (McGrew and Viega's test case 14), and a changed tag fails.
    func testTheCryptographyMatchesPublishedVectors() throws {
        func bytes(_ hex: String) -> [UInt8] {
            var out: [UInt8] = []
            var i = hex.startIndex
            while i < hex.endIndex { let j = hex.index(i, offsetBy: 2); out.append(UInt8(hex[i..<j], radix: 16)!); i = j }
            return out
        }
        func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }
        _ = try MigrationKey(bytes: [UInt8](repeating: 1, count: 32)).session(sourceNonce: [1], destinationNonce: [2])  // loads libcrypto
        let okm = try MigrationKey.hkdfSHA256(secret: [UInt8](repeating: 0x0b, count: 22), salt: bytes("000102030405060708090a0b0c"),
                                              info: bytes("f0f1f2f3f4f5f6f7f8f9"), count: 42)
        XCTAssertEqual(hex(okm), "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
        let cipher = AESGCMRecordCipher(key: [UInt8](repeating: 0, count: 32))
        let zeros = [UInt8](repeating: 0, count: 16)
        var sealed = zeros + [UInt8](repeating: 0, count: 16)
        let sealError = sealed.withUnsafeMutableBytes { r -> String? in
            do throws(MigrationError) { try cipher.seal(r, associated: [], counter: 0) } catch { return error.description }
            return nil
        }
        XCTAssertNil(sealError)
        XCTAssertEqual(hex(sealed), "cea7403d4d606b6e074ec5d3baf39d18" + "d0d1c8a799996bf0265b98b5d48ab919")
        func opens(_ record: [UInt8], _ associated: [UInt8], _ counter: UInt64) -> [UInt8]? {
            var copy = record
            return copy.withUnsafeMutableBytes { cipher.open($0, associated: associated, counter: counter) } ? Array(copy.prefix(16)) : nil
        }
        XCTAssertEqual(opens(sealed, [], 0), zeros)
        XCTAssertNil(opens(sealed, [1], 0), "other associated data opened")
        XCTAssertNil(opens(sealed, [], 1), "another counter opened")
        sealed[31] ^= 1
        XCTAssertNil(opens(sealed, [], 0), "a changed tag opened")
    }

    /// A peer that trickles its opening, a byte at a time, each well within the per-read
    /// timeout, is given up when the whole opening's time is spent, not 48 reads later.
    func testATricklingOpeningIsGivenUpAtItsDeadline() throws {
        let relay = Relay()
        let opening = Array("HVMIGR\r\n".utf8) + [2, 0, 0, 0, 1, 0, 0, 0] + [UInt8](repeating: 3, count: 32)
        let writer = relay.towardsDestination
        let trickle = Thread {
            for byte in opening {
                var b = byte
                guard send(writer, &b, 1, Int32(MSG_NOSIGNAL)) == 1 else { return }
                Thread.sleep(forTimeInterval: 0.2)
            }
        }
        trickle.start()
        let started = Date()
        let refusal = message { () throws(MigrationError) in try relay.destination.establish(.sharedKey(try! self.key(4)), as: .destination, timeoutSeconds: 1) }
        XCTAssertEqual(refusal, "the source did not complete the opening within 1 s")
        XCTAssertLessThan(Date().timeIntervalSince(started), 2.5)
    }

    /// Key files: too short, readable by others, not a regular file, missing — one line each.
    func testBadKeyFilesAreRefusedInOneLine() throws {
        func write(_ name: String, _ bytes: [UInt8], mode: mode_t) -> String {
            let path = dir.appendingPathComponent(name).path
            XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
            chmod(path, mode)
            return path
        }
        func refusal(_ path: String) -> String? {
            do throws(UsageError) { _ = try MigrationKey.load(path, flag: "--key") } catch { return error.message }
            return nil
        }
        let good = write("good", (0..<32).map { UInt8($0) }, mode: 0o600)
        XCTAssertNil(refusal(good))
        XCTAssertEqual(try MigrationKey.load(good, flag: "--key").hex, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
        XCTAssertEqual(try MigrationKey(hex: try MigrationKey.load(good, flag: "--key").hex).hex, try MigrationKey.load(good, flag: "--key").hex)
        let short = write("short", Array("hunter2\n".utf8), mode: 0o600)
        XCTAssertEqual(refusal(short), "--key \(short) is 8 bytes; a migration key needs at least 32 random bytes: \(MigrationKey.howToMakeOne)")
        let open = write("open", [UInt8](repeating: 1, count: 32), mode: 0o644)
        XCTAssertEqual(refusal(open), "--key \(open): other users may read it (mode 644): chmod 600 \(open)")
        let fifo = dir.appendingPathComponent("fifo").path
        XCTAssertEqual(mkfifo(fifo, 0o600), 0)
        XCTAssertEqual(refusal(fifo), "--key \(fifo): it is a FIFO (named pipe), not a regular file")
        XCTAssertEqual(refusal(dir.path), "--key \(dir.path): it is a directory, not a regular file")
        XCTAssertEqual(refusal(dir.appendingPathComponent("missing").path), "--key \(dir.appendingPathComponent("missing").path): No such file or directory")
        XCTAssertEqual(refusal(write("huge", [UInt8](repeating: 1, count: 5000), mode: 0o600)).map { $0.contains("more than the 4096 hv reads") }, true)
    }
}

import CHVShim
import Glibc
@testable import HVCore
import HVKVM
import HVSys
import XCTest

/// The migration stream's framing and handshake over a socket pair: what a hostile or broken
/// peer sends is refused in one line, and a destination whose CPU lacks a feature the guest uses
/// says which before anything is copied.
final class MigrationStreamTests: XCTestCase {
    /// Two connected ends: (source, destination).
    private func pair() throws -> (MigrationChannel, MigrationChannel, Int32) {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds), 0)
        let raw = dup(fds[0])
        return (MigrationChannel(socket: FileDescriptor(owning: fds[0])), MigrationChannel(socket: FileDescriptor(owning: fds[1]), peer: "source"), raw)
    }

    private func message(_ body: () throws(MigrationError) -> Void) -> String? {
        do throws(MigrationError) { try body() } catch { return error.description }
        return nil
    }

    func testFramesArriveWholeAndCorruptOrForeignFramesAreRefused() throws {
        let (source, destination, raw) = try pair()
        defer { close(raw) }
        let payload = (0..<5000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try source.send(.pages, payload)
        let (type, received) = try destination.receive(peer: "source")
        XCTAssertEqual(type, .pages)
        XCTAssertEqual(received, payload)

        // A flipped payload byte: the CRC-32C in the header no longer matches.
        var frame = [UInt8](repeating: 0, count: 16) + Array("hello".utf8)
        frame[0] = 4
        frame[4] = 5
        let crc = hv_crc32c(0, Array("hello".utf8), 5)
        for i in 0..<4 { frame[8 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        frame[16] ^= 1
        XCTAssertEqual(send(raw, frame, frame.count, 0), frame.count)
        XCTAssertEqual(message { () throws(MigrationError) in _ = try destination.receive(peer: "source") }, "a frame from the source failed its checksum (the stream is corrupt)")

        // An unknown frame type, then a length beyond the limit.
        var foreign = [UInt8](repeating: 0, count: 16)
        foreign[0] = 99
        XCTAssertEqual(send(raw, foreign, 16, 0), 16)
        XCTAssertEqual(message { () throws(MigrationError) in _ = try destination.receive(peer: "source") }, "the source is not speaking hv's migration protocol (frame type 99)")
        var huge = [UInt8](repeating: 0, count: 16)
        huge[0] = 4
        huge[7] = 0x7F
        XCTAssertEqual(send(raw, huge, 16, 0), 16)
        XCTAssertTrue(message { () throws(MigrationError) in _ = try destination.receive(peer: "source") }?.hasPrefix("the source sent a 2130706432-byte frame, more than hv's") == true)
    }

    func testAPeerThatHangsUpOrRefusesIsNamed() throws {
        let (source, destination, raw) = try pair()
        destination.refuse("no room for this VM")
        XCTAssertEqual(message { () throws(MigrationError) in _ = try source.receive(.accept, peer: "destination") }, "the destination refused: no room for this VM")
        close(raw)
        destination.close()
        XCTAssertEqual(message { () throws(MigrationError) in _ = try source.receive(.accept, peer: "destination") }, "the destination closed the connection")
    }

    /// The guest saw a CPU feature this host's KVM does not offer: the destination refuses at
    /// the handshake, naming it, and the source hears why.
    func testADestinationWithoutACPUFeatureTheGuestUsesRefuses() throws {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { throw XCTSkip("needs /dev/kvm") }
        var cpuid = try KVM().supportedCPUID()
        // A CPUID 7.0 EBX feature bit this host lacks (and hv checks), claimed for the guest.
        guard let i = cpuid.firstIndex(where: { $0.function == 7 && $0.index == 0 }) else { throw XCTSkip("no CPUID leaf 7 on this host") }
        guard let bit = (0..<32).first(where: { cpuid[i].ebx & (1 << $0) == 0 && !CPUIDFeatures.missing(saved: [with(cpuid[i], ebxBit: $0)], host: cpuid).isEmpty }) else {
            throw XCTSkip("this host offers every CPUID 7.0 EBX feature hv checks")
        }
        cpuid[i] = with(cpuid[i], ebxBit: bit)
        let (source, destination, raw) = try pair()
        defer { close(raw) }
        try source.send(.hello, MigrationHello(host: Array("{}".utf8), memoryBytes: 32 << 20, cpus: 1, cpuid: cpuid).encode())
        let incoming = IncomingMigration(channel: destination)
        _ = try incoming.receiveHello()
        let refusal = message { () throws(MigrationError) in try incoming.checkCPU() }
        XCTAssertTrue(refusal?.hasPrefix("the destination's CPU lacks features the guest uses: ") == true, refusal ?? "accepted")
        XCTAssertEqual(message { () throws(MigrationError) in _ = try source.receive(.accept, peer: "destination") }, "the destination refused: \(refusal ?? "")")
    }

    private func with(_ entry: kvm_cpuid_entry2, ebxBit bit: Int) -> kvm_cpuid_entry2 {
        var e = entry
        e.ebx |= 1 << UInt32(bit)
        return e
    }
}

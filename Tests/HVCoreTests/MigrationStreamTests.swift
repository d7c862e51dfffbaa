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

    /// A source (or a snapshot file) claiming guest RAM no VM can have is refused with a reason;
    /// before, 2^63 bytes trapped converting to Int inside the destination's core.
    func testAnImpossibleGuestMemorySizeIsRefusedNotTrapped() throws {
        for size: UInt64 in [1 << 63, UInt64.max & ~4095, 0, 4097, GuestRAM.maximumBytes + 4096] {
            let (source, destination, raw) = try pair()
            defer { close(raw) }
            try source.send(.hello, MigrationHello(host: Array("{}".utf8), memoryBytes: size, cpus: 1, cpuid: []).encode())
            let incoming = IncomingMigration(channel: destination)
            _ = try incoming.receiveHello()
            let refusal = message { () throws(MigrationError) in try incoming.accept() }
            XCTAssertTrue(refusal?.contains("guest memory of \(size) bytes is impossible") == true, refusal ?? "accepted \(size) bytes")
        }
    }

    /// The guest saw a CPU feature this host's KVM does not offer: the destination refuses at
    /// the handshake, naming it, and the source hears why.
    func testADestinationWithoutACPUFeatureTheGuestUsesRefuses() throws {
        // KVM() fails the test with its own reason where /dev/kvm is missing: CI and this
        // machine have it.
        var cpuid = try KVM().supportedCPUID()
        // The first feature bit hv checks that this host's KVM does not offer, claimed for the
        // guest. Every x86 CPU lacks some (no CPU has every leaf-1/7/0x80000001 feature).
        var claimed: (entry: Int, register: Int, bit: Int)?
        search: for (i, entry) in cpuid.enumerated() {
            for register in 0..<4 {
                for bit in 0..<32 where !CPUIDFeatures.missing(saved: [with(entry, register, bit)], host: cpuid).isEmpty {
                    claimed = (i, register, bit)
                    break search
                }
            }
        }
        let (i, register, bit) = try XCTUnwrap(claimed, "this host's KVM offers every CPUID feature hv checks: no feature to claim")
        cpuid[i] = with(cpuid[i], register, bit)
        let (source, destination, raw) = try pair()
        defer { close(raw) }
        try source.send(.hello, MigrationHello(host: Array("{}".utf8), memoryBytes: 32 << 20, cpus: 1, cpuid: cpuid).encode())
        let incoming = IncomingMigration(channel: destination)
        _ = try incoming.receiveHello()
        let refusal = message { () throws(MigrationError) in try incoming.checkCPU() }
        XCTAssertTrue(refusal?.hasPrefix("the destination's CPU lacks features the guest uses: ") == true, refusal ?? "accepted")
        XCTAssertEqual(message { () throws(MigrationError) in _ = try source.receive(.accept, peer: "destination") }, "the destination refused: \(refusal ?? "")")
    }

    /// `entry` with bit `bit` of register `register` (eax, ebx, ecx, edx) set.
    private func with(_ entry: kvm_cpuid_entry2, _ register: Int, _ bit: Int) -> kvm_cpuid_entry2 {
        var e = entry
        let mask = UInt32(1) << UInt32(bit)
        switch register {
        case 0: e.eax |= mask
        case 1: e.ebx |= mask
        case 2: e.ecx |= mask
        default: e.edx |= mask
        }
        return e
    }
}

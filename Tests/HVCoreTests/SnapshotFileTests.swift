import CHVShim
@testable import HVCore
import HVKVM
import XCTest

/// The snapshot state file: what is written reads back the same, and every damaged, truncated or
/// foreign file is refused with a line that says which.
final class SnapshotFileTests: XCTestCase {
    private func entry(_ leaf: UInt32, _ subleaf: UInt32, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) -> kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = leaf
        e.index = subleaf
        e.flags = subleaf == 0 && leaf != 7 && leaf != 0xD ? 0 : 1
        (e.eax, e.ebx, e.ecx, e.edx) = (eax, ebx, ecx, edx)
        return e
    }

    private func sample() -> MachineSnapshot {
        let blobs = VCPUSavedState.sizes.enumerated().map { i, size in (0..<size).map { UInt8(truncatingIfNeeded: $0 * 7 + i) } }
        let vcpu = VCPUSavedState(blobs: blobs, mpState: 0, msrs: [(0x10, 123_456_789), (0xC000_0080, 0xD01)])
        var other = vcpu
        other.mpState = 1
        let chips = (0..<3).map { i in [UInt8(i), 0, 0, 0] + [UInt8](repeating: UInt8(i + 1), count: PlatformSavedState.irqchipSize - 4) }
        return MachineSnapshot(host: Array(#"{"name":"vm"}"#.utf8), memoryBytes: 64 << 20,
                               cpuid: [entry(1, 0, ecx: 0x8000_0001, edx: 0x1), entry(7, 0, ebx: 1 << 16)], tscKHz: 2_000_000,
                               clock: 987_654_321, vcpus: [vcpu, other],
                               platform: PlatformSavedState(irqchips: chips, pit: [UInt8](repeating: 9, count: PlatformSavedState.pitSize)),
                               pci: [1, 2, 3], devices: [DeviceSavedState(name: "serial0", model: "serial-16550a", stateVersion: 1,
                                                                          page: [UInt8](repeating: 0xAB, count: 4096))],
                               firmwareROM: [UInt8](repeating: 0x90, count: 512),
                               memoryExtents: [MemoryExtent(offset: 0, length: 4096, checksum: 1), MemoryExtent(offset: 1 << 20, length: 8192, checksum: 2)])
    }

    func testCRC32CIsCastagnoli() {
        let check = Array("123456789".utf8)
        XCTAssertEqual(hv_crc32c(0, check, UInt(check.count)), 0xE306_9283)
        // Continuing a checksum is the same as taking it at once.
        let first = hv_crc32c(0, Array(check[..<4]), 4)
        XCTAssertEqual(hv_crc32c(first, Array(check[4...]), 5), 0xE306_9283)
    }

    func testWhatIsWrittenReadsBackTheSame() throws {
        let snapshot = sample()
        let bytes = snapshot.encodedState()
        let read = try MachineSnapshot.decodeState(bytes, name: "s")
        XCTAssertEqual(read.host, snapshot.host)
        XCTAssertEqual(read.memoryBytes, snapshot.memoryBytes)
        XCTAssertEqual(read.cpuid.map(\.function), [1, 7])
        XCTAssertEqual(read.cpuid[1].ebx, 1 << 16)
        XCTAssertEqual(read.tscKHz, 2_000_000)
        XCTAssertEqual(read.clock, 987_654_321)
        XCTAssertEqual(read.vcpus, snapshot.vcpus)
        XCTAssertEqual(read.platform, snapshot.platform)
        XCTAssertEqual(read.pci, [1, 2, 3])
        XCTAssertEqual(read.devices, snapshot.devices)
        XCTAssertEqual(read.firmwareROM, snapshot.firmwareROM)
        XCTAssertEqual(read.memoryExtents, snapshot.memoryExtents)
        XCTAssertEqual(read.encodedState(), bytes)
    }

    private func refusal(_ bytes: [UInt8]) -> String {
        do {
            _ = try MachineSnapshot.decodeState(bytes, name: "snapshot S")
            return "accepted"
        } catch {
            return error.description
        }
    }

    func testEveryTruncationIsRefused() {
        let bytes = sample().encodedState()
        for length in 0..<bytes.count {
            let why = refusal(Array(bytes[..<length]))
            XCTAssertTrue(why.hasPrefix("snapshot S is truncated") || why.hasPrefix("snapshot S is not an hv snapshot"), "\(length): \(why)")
        }
    }

    func testEveryFlippedByteIsRefused() {
        let bytes = sample().encodedState()
        for offset in bytes.indices {
            var damaged = bytes
            damaged[offset] ^= 0x10
            let why = refusal(damaged)
            XCTAssertNotEqual(why, "accepted", "a flip at \(offset) went unnoticed")
            XCTAssertTrue(why.hasPrefix("snapshot S "), why)
        }
    }

    func testAnotherFormatVersionIsNamed() {
        var bytes = sample().encodedState()
        bytes[8] = 7
        let crc = hv_crc32c(0, Array(bytes[..<24]), 24)
        for i in 0..<4 { bytes[24 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        XCTAssertEqual(refusal(bytes), "snapshot S was written in snapshot format 7; this hv reads format 1 only")
        XCTAssertEqual(refusal(Array("not a snapshot at all, just some text".utf8)), "snapshot S is not an hv snapshot (no snapshot header)")
    }

    func testMemoryExtentsMustBeInOrderAndInsideRAM() {
        var s = sample()
        s.memoryExtents = [MemoryExtent(offset: 8192, length: 4096, checksum: 0), MemoryExtent(offset: 4096, length: 4096, checksum: 0)]
        XCTAssertTrue(refusal(s.encodedState()).contains("out of order or outside RAM"), refusal(s.encodedState()))
        s.memoryExtents = [MemoryExtent(offset: (64 << 20) - 4096, length: 8192, checksum: 0)]
        XCTAssertTrue(refusal(s.encodedState()).contains("out of order or outside RAM"))
        s.memoryExtents = [MemoryExtent(offset: UInt64.max - 10, length: 20, checksum: 0)]
        XCTAssertTrue(refusal(s.encodedState()).contains("out of order or outside RAM"))
    }

    func testMissingCPUFeaturesAreNamed() {
        let saved = [entry(1, 0, ecx: 1 << 28 | 1 << 20, edx: 1 << 26), entry(7, 0, ebx: 1 << 16 | 1 << 5 | 1 << 27)]
        let host = [entry(1, 0, ecx: 1 << 20, edx: 1 << 26), entry(7, 0, ebx: 1 << 5)]
        XCTAssertEqual(CPUIDFeatures.missing(saved: saved, host: host), ["avx", "avx512f", "CPUID 0x7.0 ebx bit 27"])
        XCTAssertEqual(CPUIDFeatures.missing(saved: saved, host: saved), [])
        // A host without the leaf at all lacks all of it.
        XCTAssertEqual(CPUIDFeatures.missing(saved: [entry(0x8000_0001, 0, edx: 1 << 29)], host: []), ["lm"])
    }
}

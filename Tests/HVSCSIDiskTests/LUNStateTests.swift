import HVSCSIDisk
import XCTest

/// A LUN's state survives its process: what a successor restores behaves as the LUN did, and
/// bytes a dead or hostile process left are refused rather than trusted.
final class LUNStateTests: XCTestCase {
    private func iso() -> SCSIDiskTests.MemoryBackend { SCSIDiskTests.MemoryBackend(blocks: 400) }
    private let tur: [UInt8] = [0, 0, 0, 0, 0, 0]

    func testACDROMsUnitAttentionLockAndEjectSurviveARestart() {
        let cd = SCSICDROM(medium: iso())
        XCTAssertEqual(cd.execute([0x1E, 0, 0, 0, 1, 0], dataOut: [], dataInCapacity: 0).status, .good, "PREVENT MEDIUM REMOVAL")
        cd.changeMedium(iso())  // the operator inserts another disc: a UNIT ATTENTION is pending
        let saved = LUNState(bytes: cd.savedState.bytes)!
        XCTAssertEqual(saved, cd.savedState)

        let successor = SCSICDROM(medium: iso())
        successor.restore(saved)
        let first = successor.execute(tur, dataOut: [], dataInCapacity: 0)
        XCTAssertEqual([first.sense.key, first.sense.asc], [0x06, 0x28], "the unit attention is reported by the successor")
        XCTAssertEqual(successor.execute(tur, dataOut: [], dataInCapacity: 0).status, .good, "once")
        let eject = successor.execute([0x1B, 0, 0, 0, 0x02, 0], dataOut: [], dataInCapacity: 0)
        XCTAssertEqual([eject.sense.key, eject.sense.asc], [0x05, 0x53], "the lock held across the restart")

        // The guest ejects; the core still hands the disc over after a restart, but it stays out.
        XCTAssertEqual(successor.execute([0x1E, 0, 0, 0, 0, 0], dataOut: [], dataInCapacity: 0).status, .good)
        XCTAssertEqual(successor.execute([0x1B, 0, 0, 0, 0x02, 0], dataOut: [], dataInCapacity: 0).status, .good)
        let third = SCSICDROM(medium: iso())
        third.restore(LUNState(bytes: successor.savedState.bytes)!)
        XCTAssertNil(third.medium)
        XCTAssertEqual(third.execute(tur, dataOut: [], dataInCapacity: 0).sense.asc, 0x3A, "no medium")
    }

    func testADisksPendingSenseSurvivesARestart() {
        let disk = SCSIDisk(backend: SCSIDiskTests.MemoryBackend(blocks: 16), readOnly: false, serial: "s")
        _ = disk.execute([0xFF], dataOut: [], dataInCapacity: 0)  // an invalid opcode leaves sense 05/20
        let successor = SCSIDisk(backend: SCSIDiskTests.MemoryBackend(blocks: 16), readOnly: false, serial: "s")
        successor.restore(LUNState(bytes: disk.savedState.bytes)!)
        let sense = successor.execute([0x03, 0, 0, 0, 18, 0], dataOut: [], dataInCapacity: 18).dataIn
        XCTAssertEqual([sense[2] & 0x0F, sense[12]], [0x05, 0x20], "REQUEST SENSE reports what the dead process owed")
    }

    func testHostileBytesAreNoState() {
        let good = LUNState(pendingSense: SCSISense(key: 5, asc: 0x24, ascq: 0), unitAttention: SCSISense(key: 6, asc: 0x28, ascq: 0),
                            mediaEvent: 2, removalPrevented: true, mediumPresent: false).bytes
        XCTAssertNotNil(LUNState(bytes: good))
        XCTAssertNil(LUNState(bytes: [UInt8](repeating: 0, count: 16)), "a page never written")
        XCTAssertNil(LUNState(bytes: Array(good.prefix(15))))
        for (offset, value) in [(4, UInt8(0x10)), (7, 2), (8, 0x1F), (11, 4), (12, 2), (13, 7)] {
            var bad = good
            bad[offset] = value
            XCTAssertNil(LUNState(bytes: bad), "byte \(offset) = \(value)")
        }
    }
}

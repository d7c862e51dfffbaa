import HVSCSIDisk
import XCTest

/// The CD-ROM LUN against MMC-6: identity, reads, the TOC, media events, eject and locking, and
/// refused writes.
final class SCSICDROMTests: XCTestCase {
    private func iso(_ sectors: Int) -> SCSIDiskTests.MemoryBackend {
        let b = SCSIDiskTests.MemoryBackend(blocks: sectors * 4)
        for i in 0..<b.bytes.count { b.bytes[i] = UInt8(truncatingIfNeeded: i / 2048) }
        return b
    }
    private func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - $0))) } }

    func testIdentityCapacityAndReads() {
        let cd = SCSICDROM(medium: iso(100))
        let inquiry = cd.execute([0x12, 0, 0, 0, 36, 0], dataOut: [], dataInCapacity: 36).dataIn
        XCTAssertEqual([inquiry[0], inquiry[1] & 0x80], [0x05, 0x80], "CD/DVD device, removable")
        XCTAssertEqual(cd.execute([0x25] + [UInt8](repeating: 0, count: 9), dataOut: [], dataInCapacity: 8).dataIn, be(99, 4) + be(2048, 4))
        let read = cd.execute([0x28, 0, 0, 0, 0, 7, 0, 0, 2, 0], dataOut: [], dataInCapacity: 4096)
        XCTAssertEqual(read.status, .good)
        XCTAssertEqual(read.dataIn.count, 4096)
        XCTAssertEqual([read.dataIn[0], read.dataIn[2048]], [7, 8], "2048-byte sectors 7 and 8")
        let past = cd.execute([0x28, 0, 0, 0, 0, 99, 0, 0, 2, 0], dataOut: [], dataInCapacity: 4096)
        XCTAssertEqual([past.sense.key, past.sense.asc], [0x05, 0x21])
    }

    func testTOCConfigurationAndModePages() {
        let cd = SCSICDROM(medium: iso(100))
        let toc = cd.execute([0x43, 0, 0, 0, 0, 0, 0, 0, 100, 0], dataOut: [], dataInCapacity: 100).dataIn
        XCTAssertEqual(Array(toc[0..<4]), [0, 18, 1, 1], "length, first and last track")
        XCTAssertEqual(Array(toc[4..<12]), [0, 0x14, 1, 0, 0, 0, 0, 0], "track 1: data, at LBA 0")
        XCTAssertEqual(Array(toc[12..<20]), [0, 0x14, 0xAA, 0] + be(100, 4), "lead-out after the last sector")
        let msf = cd.execute([0x43, 0x02, 0, 0, 0, 0, 0, 0, 100, 0], dataOut: [], dataInCapacity: 100).dataIn
        XCTAssertEqual(Array(msf[8..<12]), [0, 0, 2, 0], "MSF 00:02:00 is LBA 0")
        let config = cd.execute([0x46, 0, 0, 0, 0, 0, 0, 0, 255, 0], dataOut: [], dataInCapacity: 255).dataIn
        XCTAssertEqual(Array(config[6..<8]), [0x00, 0x08], "current profile: CD-ROM")
        let caps = cd.execute([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 255, 0], dataOut: [], dataInCapacity: 255).dataIn
        XCTAssertEqual(caps[8], 0x2A, "CD capabilities page after the 8-byte header")
    }

    func testWritesAreRefused() {
        let backend = iso(10)
        let cd = SCSICDROM(medium: backend)
        for op: UInt8 in [0x2A, 0xAA, 0x8A, 0x2E, 0x35] {
            let r = cd.execute([op] + [UInt8](repeating: 0, count: 15), dataOut: [UInt8](repeating: 0xFF, count: 2048), dataInCapacity: 0)
            XCTAssertEqual([r.status.rawValue, r.sense.key, r.sense.asc], [0x02, 0x07, 0x27], "opcode \(op): DATA PROTECT / write protected")
        }
        XCTAssertEqual(backend.bytes[0], 0)
    }

    func testEjectLockAndMediaChange() {
        let cd = SCSICDROM(medium: iso(10))
        XCTAssertEqual(cd.execute([0x1E, 0, 0, 0, 1, 0], dataOut: [], dataInCapacity: 0).status, .good, "prevent removal")
        var r = cd.execute([0x1B, 0, 0, 0, 0x02, 0], dataOut: [], dataInCapacity: 0)
        XCTAssertEqual([r.sense.key, r.sense.asc, r.sense.ascq], [0x05, 0x53, 0x02], "MEDIUM REMOVAL PREVENTED")
        XCTAssertNotNil(cd.medium)
        _ = cd.execute([0x1E, 0, 0, 0, 0, 0], dataOut: [], dataInCapacity: 0)
        XCTAssertEqual(cd.execute([0x1B, 0, 0, 0, 0x02, 0], dataOut: [], dataInCapacity: 0).status, .good, "eject")
        XCTAssertNil(cd.medium)
        r = cd.execute([0x00, 0, 0, 0, 0, 0], dataOut: [], dataInCapacity: 0)
        XCTAssertEqual([r.sense.key, r.sense.asc], [0x02, 0x3A], "NOT READY / MEDIUM NOT PRESENT")
        var event = cd.execute([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], dataOut: [], dataInCapacity: 8).dataIn
        XCTAssertEqual([event[4], event[5]], [3, 0], "media removal event, tray empty")

        // The operator removes and inserts media: UNIT ATTENTION once each time.
        cd.changeMedium(nil)
        r = cd.execute([0x00, 0, 0, 0, 0, 0], dataOut: [], dataInCapacity: 0)
        XCTAssertEqual([r.sense.key, r.sense.asc], [0x06, 0x3A], "UNIT ATTENTION / MEDIUM NOT PRESENT")
        r = cd.execute([0x00, 0, 0, 0, 0, 0], dataOut: [], dataInCapacity: 0)
        XCTAssertEqual([r.sense.key, r.sense.asc], [0x02, 0x3A], "then NOT READY")
        _ = cd.execute([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], dataOut: [], dataInCapacity: 8)
        // The operator inserts a new ISO: UNIT ATTENTION once, then ready; a new-media event.
        cd.changeMedium(iso(20))
        r = cd.execute([0x25] + [UInt8](repeating: 0, count: 9), dataOut: [], dataInCapacity: 8)
        XCTAssertEqual([r.sense.key, r.sense.asc], [0x06, 0x28], "UNIT ATTENTION / MEDIUM MAY HAVE CHANGED")
        XCTAssertEqual(cd.execute([0x25] + [UInt8](repeating: 0, count: 9), dataOut: [], dataInCapacity: 8).dataIn, be(19, 4) + be(2048, 4))
        event = cd.execute([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], dataOut: [], dataInCapacity: 8).dataIn
        XCTAssertEqual([event[4], event[5]], [2, 2], "new media event, media present")
        event = cd.execute([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], dataOut: [], dataInCapacity: 8).dataIn
        XCTAssertEqual(event[4], 0, "reported once")
    }

    func testHostileCDBsNeverTrap() {
        let cd = SCSICDROM(medium: iso(10))
        var x: UInt64 = 7
        for opcode in 0...255 {
            for length in [0, 1, 6, 10, 12, 16] {
                var cdb = [UInt8(opcode)] + (0..<max(0, length - 1)).map { _ -> UInt8 in x = x &* 6364136223846793005 &+ 1; return UInt8(truncatingIfNeeded: x >> 33) }
                if length == 0 { cdb = [] }
                _ = cd.execute(cdb, dataOut: [], dataInCapacity: Int(x % 8192))
            }
        }
    }
}

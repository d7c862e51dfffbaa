@testable import HVDeviceSDK
import XCTest

/// The in-flight record of a device that completes out of order: a successor, whatever instant its
/// predecessor was killed at, resubmits exactly the chains that had not reached the used ring, and
/// a chain that kills the device on every replay is completed with an error after three.
final class InflightRecordTests: XCTestCase {
    /// A state page stand-in: plain bytes.
    final class Buffer: InflightStorage {
        var bytes = [UInt8](repeating: 0, count: 4096)
        func loadBytes(at offset: Int, count: Int) -> [UInt8] { Array(bytes[offset..<min(offset + count, bytes.count)]) }
        func storeBytes(_ b: [UInt8], at offset: Int) { bytes.replaceSubrange(offset..<(offset + b.count), with: b) }
        func loadUInt16(at offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
        func storeUInt16(_ v: UInt16, at offset: Int) { bytes[offset] = UInt8(v & 0xFF); bytes[offset + 1] = UInt8(v >> 8) }
        func loadByte(at offset: Int) -> UInt8 { bytes[offset] }
        func storeByte(_ v: UInt8, at offset: Int) { bytes[offset] = v }
    }

    /// A driver and a device on one queue of 8, modelled step by step; `crashAfter` stops the
    /// device after that many record/ring steps (a kill), and the successor's recovery is checked
    /// against what the driver saw.
    private final class World {
        let page = Buffer()
        let record: InflightRecord
        var available: [UInt16] = []     // heads the driver published, in order
        var used: [UInt16] = []          // heads the device completed into the used ring
        var taken: UInt16 = 0
        var steps = 0
        let crashAfter: Int

        init(crashAfter: Int) {
            record = InflightRecord(storage: page, offset: 2048, queueCount: 3)
            record.clear()
            record.resetQueue(1)
            self.crashAfter = crashAfter
        }

        /// One step; false once the device is dead.
        func step(_ body: () -> Void) -> Bool {
            guard steps < crashAfter else { return false }
            body()
            steps += 1
            return true
        }

        func take() -> Bool {
            let head = available[Int(taken)]
            let next = taken + 1
            guard step({ self.record.taken(1, head: head, takenCount: next) }) else { return false }
            taken = next
            return step { self.record.serving(1, head: head) }
        }

        func complete(_ head: UInt16) -> Bool {
            guard step({ self.record.beginCompletion(1, head: head) }) else { return false }
            var ring = used
            guard step({ ring.append(head) }) else { return false }  // used element + index published
            used = ring
            let count = UInt16(used.count)
            return step { self.record.endCompletion(1, head: head, usedIndex: count) }
        }
    }

    func testEveryCrashPointIsRecoveredExactly() {
        // The driver offers heads 5, 2, 7, 0; the device takes all four and completes 2, 7, 5.
        for crashAfter in 0...40 {
            let w = World(crashAfter: crashAfter)
            w.available = [5, 2, 7, 0]
            var alive = true
            for _ in 0..<4 where alive { alive = w.take() }
            for head: UInt16 in [2, 7, 5] where alive { alive = w.complete(head) }
            // The successor.
            let r = w.record.recover(1, size: 8, guestUsed: UInt16(w.used.count)) { i in
                Int(i) < w.available.count ? w.available[Int(i)] : nil
            }
            XCTAssertNil(r.corrupt, "crash after \(crashAfter)")
            let outstanding = Set(w.available.prefix(Int(r.taken))).subtracting(w.used)
            XCTAssertEqual(Set(r.resubmit), outstanding, "crash after \(crashAfter): resubmit exactly what was taken and not used")
            XCTAssertTrue(Set(r.resubmit).isDisjoint(with: w.used), "crash after \(crashAfter): nothing completed twice")
            XCTAssertGreaterThanOrEqual(Int(r.taken), w.used.count)
            XCTAssertLessThanOrEqual(Int(r.taken), w.available.count)
            XCTAssertEqual(r.used, UInt16(w.used.count))
            XCTAssertEqual(r.poisoned, [])
        }
    }

    /// Killed between marking a head and counting it: the head is counted, and served once.
    func testAHeadMarkedButNotCountedIsCountedOnce() {
        let page = Buffer()
        let record = InflightRecord(storage: page, offset: 2048, queueCount: 3)
        record.clear()
        record.resetQueue(0)
        record.taken(0, head: 3, takenCount: 1)
        page.storeByte(1 << 1, at: 2048 + 8 + 8 + 9 / 8)  // head 9's bit, as `taken` sets it first
        page.storeByte(page.loadByte(at: 2048 + 8 + 8) | 1 << 3, at: 2048 + 8 + 8)
        let available: [UInt16] = [3, 9]
        let r = record.recover(0, size: 16, guestUsed: 0) { i in Int(i) < available.count ? available[Int(i)] : nil }
        XCTAssertEqual(r.taken, 2, "head 9 was taken: resume after it")
        XCTAssertEqual(r.resubmit, [3, 9])
    }

    func testAChainThatCrashesEveryReplayIsPoisonedAfterThree() {
        let page = Buffer()
        let record = InflightRecord(storage: page, offset: 2048, queueCount: 3)
        record.clear()
        record.resetQueue(2)
        record.taken(2, head: 4, takenCount: 1)
        record.taken(2, head: 6, takenCount: 2)
        for crash in 1...3 {
            // Each successor resubmits 4 and 6 and dies serving 6.
            record.serving(2, head: 6)
            let r = record.recover(2, size: 16, guestUsed: 0) { _ in nil }
            if crash < 3 {
                XCTAssertEqual(r.resubmit, [4, 6], "crash \(crash)")
                XCTAssertEqual(r.poisoned, [])
            } else {
                XCTAssertEqual(r.resubmit, [4], "the innocent chain is served again")
                XCTAssertEqual(r.poisoned, [6], "the third crash on 6 poisons it")
            }
        }
        // A crash while not serving anything clears the strikes.
        record.serving(2, head: 4)
        _ = record.recover(2, size: 16, guestUsed: 0) { _ in nil }
        let calm = record.recover(2, size: 16, guestUsed: 0) { _ in nil }
        XCTAssertEqual(calm.poisoned, [])
    }

    func testHostileRecordsResubmitNothingTheDriverDidNotOffer() {
        let page = Buffer()
        let record = InflightRecord(storage: page, offset: 2048, queueCount: 3)
        XCTAssertFalse(record.isValid, "a page never written")
        record.clear()
        XCTAssertTrue(record.isValid)
        // Every head marked, but only two chains were outstanding.
        page.storeBytes([UInt8](repeating: 0xFF, count: 128), at: 2048 + 8 + 136 + 8)
        page.storeUInt16(2, at: 2048 + 8 + 136)
        let r = record.recover(1, size: 256, guestUsed: 0) { _ in nil }
        XCTAssertNotNil(r.corrupt)
        XCTAssertEqual(r.resubmit, [])
        // Heads past the queue are never resubmitted.
        page.storeBytes([UInt8](repeating: 0, count: 128), at: 2048 + 8 + 136 + 8)
        page.storeByte(0x80, at: 2048 + 8 + 136 + 8 + 2)  // head 23
        page.storeUInt16(4, at: 2048 + 8 + 136)
        XCTAssertEqual(record.recover(1, size: 16, guestUsed: 0) { _ in nil }.resubmit, [])
        // A record for another queue count is not this device's.
        XCTAssertFalse(InflightRecord(storage: page, offset: 2048, queueCount: 2).isValid)
    }
}

import HVNetSwitch
import XCTest

final class LearningSwitchTests: XCTestCase {
    let a = MACAddress(parsing: "52:54:00:00:00:0a")!
    let b = MACAddress(parsing: "52:54:00:00:00:0b")!
    let c = MACAddress(parsing: "52:54:00:00:00:0c")!
    let broadcast = MACAddress(parsing: "ff:ff:ff:ff:ff:ff")!

    func testParsesAndPrintsAddresses() {
        XCTAssertEqual(MACAddress(parsing: "52-54-00-AB-cd-0F")?.description, "52:54:00:ab:cd:0f")
        XCTAssertNil(MACAddress(parsing: "52:54:00:ab:cd"))
        XCTAssertNil(MACAddress(parsing: "52:54:00:ab:cd:0g"))
        XCTAssertNil(MACAddress(parsing: "52:54:00:ab:cd:123"))
        // A sign is no hex digit, though UInt8(_:radix:) takes one (the device-settings fuzz target's find).
        XCTAssertNil(MACAddress(parsing: "+f:54:00:ab:cd:0f"))
        XCTAssertNil(MACAddress(parsing: "52:54:00:ab:cd:-0"))
        XCTAssertTrue(broadcast.isGroup)
        XCTAssertTrue(MACAddress(parsing: "01:00:5e:00:00:01")!.isGroup)
        XCTAssertFalse(a.isGroup)
        XCTAssertEqual(MACAddress(bytes: a.bytes), a)
    }

    func testBroadcastAndUnknownUnicastFloodThenLearnedUnicastGoesToOnePort() {
        var sw = LearningSwitch()
        // A (port 0) broadcasts an ARP request: flooded, and A is learned.
        XCTAssertEqual(sw.forward(from: 0, source: a, destination: broadcast, now: 1), .flood)
        XCTAssertEqual(sw.port(of: a, now: 1), 0)
        // B (port 1) answers A: A is known, so only port 0 gets it; B is learned.
        XCTAssertEqual(sw.forward(from: 1, source: b, destination: a, now: 2), .port(0))
        // A to B now goes to port 1 only; A to C (never seen) floods.
        XCTAssertEqual(sw.forward(from: 0, source: a, destination: b, now: 3), .port(1))
        XCTAssertEqual(sw.forward(from: 0, source: a, destination: c, now: 4), .flood)
        XCTAssertEqual(sw.count, 2)
    }

    func testFiltersFramesForTheSamePortAndDropsGroupSources() {
        var sw = LearningSwitch()
        _ = sw.forward(from: 0, source: a, destination: broadcast, now: 1)
        _ = sw.forward(from: 0, source: b, destination: broadcast, now: 1)  // B behind the same port (a bridge)
        XCTAssertEqual(sw.forward(from: 0, source: a, destination: b, now: 2), .drop)
        XCTAssertEqual(sw.forward(from: 2, source: broadcast, destination: a, now: 2), .drop)
        XCTAssertNil(sw.port(of: broadcast, now: 2))
    }

    func testStationsMoveAgeOutAndLeaveWithTheirPort() {
        var sw = LearningSwitch()
        sw.agingNanoseconds = 100
        _ = sw.forward(from: 0, source: a, destination: broadcast, now: 0)
        _ = sw.forward(from: 3, source: a, destination: broadcast, now: 10)  // A moved to port 3
        XCTAssertEqual(sw.forward(from: 1, source: b, destination: a, now: 20), .port(3))
        XCTAssertNil(sw.port(of: a, now: 200), "an entry older than the aging time is not used")
        XCTAssertEqual(sw.forward(from: 1, source: b, destination: a, now: 200), .flood)
        sw.age(now: 200)
        XCTAssertEqual(sw.count, 1, "only B, refreshed at 200, is left")
        sw.remove(port: 1)
        XCTAssertEqual(sw.count, 0)
    }

    func testTableCapacityBoundsWhatAHostileGuestCanMakeItLearn() {
        var sw = LearningSwitch()
        sw.capacity = 8
        for i in 0..<100 { _ = sw.forward(from: 0, source: MACAddress(value: 0x5254_0000_1000 + UInt64(i)), destination: broadcast, now: 1) }
        XCTAssertEqual(sw.count, 8)
        // A known station still refreshes and moves.
        _ = sw.forward(from: 2, source: MACAddress(value: 0x5254_0000_1000), destination: broadcast, now: 2)
        XCTAssertEqual(sw.port(of: MACAddress(value: 0x5254_0000_1000), now: 2), 2)
    }
}

import CHVShim
import Glibc
import HVIPC
import HVSys
import XCTest

/// A frame port as the NIC and the switch each map it, from one memfd.
final class FramePortTests: XCTestCase {
    private struct Fixture {
        let region: FileDescriptor
        let nicDoorbell: EventFD
        let switchDoorbell: EventFD
        let nic: FramePort
        let segment: FramePort

        init(slots: UInt32) throws {
            region = try FramePort.create(slotCount: slots, name: "test-port")
            nicDoorbell = try EventFD(nonBlocking: true)
            switchDoorbell = try EventFD(nonBlocking: true)
            nic = try FramePort(fd: region, side: .nic, peer: switchDoorbell)
            segment = try FramePort(fd: region, side: .segment, peer: nicDoorbell)
        }

        func poke(_ offset: Int, _ value: UInt32) throws {
            let map = try SharedMapping(fd: region, count: FramePortLayout.size(slotCount: nic.slotCount))
            map.base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self)
        }
    }

    private func frame(_ n: UInt8, length: Int = 60) -> [UInt8] {
        (0..<length).map { UInt8(truncatingIfNeeded: Int(n) &+ $0) }
    }

    private func take(_ port: FramePort) -> [UInt8]? {
        var out: [UInt8]?
        guard port.receive({ out = Array($0) }) else { return nil }
        return out
    }

    func testFramesCrossBothWaysAndWrapAround() throws {
        let f = try Fixture(slots: 4)
        for round in 0..<10 {
            let up = frame(UInt8(round), length: 14 + round * 150)
            XCTAssertTrue(up.withUnsafeBytes { f.nic.send($0) })
            XCTAssertEqual(f.segment.inboundCount, 1)
            XCTAssertEqual(f.segment.nextInboundLength, up.count)
            XCTAssertEqual(take(f.segment), up)
            let down = frame(UInt8(100 + round), length: FramePortLayout.maximumFrame - round)
            XCTAssertTrue(down.withUnsafeBytes { f.segment.send($0) })
            XCTAssertEqual(take(f.nic), down)
            XCTAssertNil(take(f.nic))
        }
        XCTAssertEqual(f.nic.corruptions, 0)
        XCTAssertEqual(f.segment.corruptions, 0)
    }

    func testAFullRingRefusesThenWakesTheProducerWhenTheConsumerTakes() throws {
        let f = try Fixture(slots: 4)
        for i in 0..<4 { XCTAssertTrue(frame(UInt8(i)).withUnsafeBytes { f.nic.send($0) }) }
        XCTAssertEqual(f.nic.outboundSpace, 0)
        XCTAssertFalse(frame(9).withUnsafeBytes { f.nic.send($0) }, "a full uplink refuses")
        f.nic.flush()
        XCTAssertEqual(f.switchDoorbell.drain(), 0, "the switch was awake (never asked to be woken)")
        XCTAssertEqual(take(f.segment), frame(0))
        f.segment.flush()
        XCTAssertEqual(f.nicDoorbell.drain(), 1, "the waiting NIC is signalled once a slot is free")
        XCTAssertTrue(frame(9).withUnsafeBytes { f.nic.send($0) })
        f.segment.flush()
        XCTAssertEqual(f.nicDoorbell.drain(), 0, "no second signal: the NIC no longer waits")
    }

    func testASleepingConsumerIsSignalledOncePerFlush() throws {
        let f = try Fixture(slots: 8)
        XCTAssertTrue(f.segment.prepareToSleep(), "nothing waiting: may sleep")
        for i in 0..<3 { XCTAssertTrue(frame(UInt8(i)).withUnsafeBytes { f.nic.send($0) }) }
        f.nic.flush()
        XCTAssertEqual(f.switchDoorbell.drain(), 1)
        XCTAssertFalse(f.segment.prepareToSleep(), "frames are waiting: do not sleep")
        f.segment.awake()
        XCTAssertTrue(frame(7).withUnsafeBytes { f.nic.send($0) })
        f.nic.flush()
        XCTAssertEqual(f.switchDoorbell.drain(), 0, "an awake consumer is not signalled")
    }

    func testAHostilePeerCannotMakeTheOtherSideReadOutsideTheRegion() throws {
        let f = try Fixture(slots: 4)
        // The NIC claims to have published 1000 frames: more than a ring holds.
        try f.poke(FramePortLayout.uplinkControlOffset + FramePortLayout.producerLine, 1000)
        XCTAssertEqual(f.segment.inboundCount, 0)
        XCTAssertNil(take(f.segment))
        XCTAssertEqual(f.segment.corruptions, 1)
        // A sane index with impossible lengths: each frame is skipped, never handed out.
        try f.poke(FramePortLayout.uplinkControlOffset + FramePortLayout.producerLine, 2)
        try f.poke(FramePortLayout.headerSize, 0xFFFF_FFF0)
        try f.poke(FramePortLayout.headerSize + Int(FramePortLayout.slotSize), 3)
        XCTAssertNil(f.segment.nextInboundLength)
        var handed = 0
        while f.segment.receive({ _ in handed += 1 }) {}
        XCTAssertEqual(handed, 0)
        XCTAssertEqual(f.segment.corruptions, 3)
        // The switch's own downlink index can't be rewound by the NIC scribbling on it.
        XCTAssertTrue(frame(1).withUnsafeBytes { f.segment.send($0) })
        try f.poke(FramePortLayout.downlinkControlOffset + FramePortLayout.consumerLine, 0xDEAD_BEEF)
        XCTAssertEqual(f.segment.outboundSpace, 0, "a consumer index from the future reads as no space")
    }

    func testBadRegionsAreRefused() throws {
        XCTAssertThrowsError(try FramePort.create(slotCount: 3, name: "bad"))
        let f = try Fixture(slots: 4)
        try f.poke(FramePortLayout.magicOffset, 0)
        XCTAssertThrowsError(try FramePort(fd: f.region, side: .nic, peer: f.switchDoorbell)) { error in
            XCTAssertEqual("\(error)", "frame port header invalid: magic is not HVFP")
        }
        let small = try MemFD.create(name: "small", size: 4096)
        XCTAssertThrowsError(try FramePort(fd: small, side: .nic, peer: f.switchDoorbell))
    }

    /// A region that is not sealed against shrinking and growing is refused before it is mapped:
    /// a peer could truncate it under the mapping and make every access a SIGBUS. So is a sealed
    /// region smaller than the port it claims to be.
    func testUnsealedOrShortRegionsAreRefused() throws {
        let good = try FramePort.create(name: "good")
        let size = FramePortLayout.size(slotCount: FramePortLayout.defaultSlotCount)
        for sealing in [false, true] {
            let raw = hv_memfd_create("hostile", UInt32(hv_MFD_CLOEXEC | (sealing ? hv_MFD_ALLOW_SEALING : 0)))
            XCTAssertGreaterThanOrEqual(raw, 0)
            let region = FileDescriptor(owning: raw)
            // A valid header, copied from a real port; sealed, it is one page short.
            XCTAssertEqual(ftruncate(raw, off_t(sealing ? size - 4096 : size)), 0)
            var header = [UInt8](repeating: 0, count: 4096)
            _ = try header.withUnsafeMutableBytes { try good.read(into: $0, at: 0) }
            try region.writeAll(header)
            if sealing { XCTAssertEqual(fcntl(raw, hv_F_ADD_SEALS, hv_F_SEAL_SHRINK | hv_F_SEAL_GROW), 0) }
            XCTAssertThrowsError(try FramePort(fd: region, side: .segment, peer: try EventFD())) { error in
                XCTAssertTrue("\(error)".contains(sealing ? "smaller than" : "not a memfd sealed against shrinking and growing"), "\(error)")
            }
        }
        XCTAssertNoThrow(try FramePort(fd: good, side: .segment, peer: try EventFD()))
    }

    /// A restarted NIC finds frames already waiting in its downlink: its standing request for a
    /// signal per frame must hold anyway, or the switch never signals it again (the NIC stopped
    /// receiving for good after a kill). The frames waiting are reported so it takes them at once.
    func testARestartedConsumerKeepsAskingForSignalsWhenFramesAreWaiting() throws {
        let f = try Fixture(slots: 8)
        XCTAssertFalse(f.nic.requestSignalsForEveryFrame(), "nothing waiting yet")
        for i in 0..<3 { XCTAssertTrue(frame(UInt8(i)).withUnsafeBytes { f.segment.send($0) }) }
        f.segment.flush()
        XCTAssertEqual(f.nicDoorbell.drain(), 1)
        // The NIC process dies here; its successor maps the same region.
        let successor = try FramePort(fd: f.region, side: .nic, peer: f.switchDoorbell)
        XCTAssertTrue(successor.requestSignalsForEveryFrame(), "three frames wait for the successor")
        for i in 0..<3 { XCTAssertEqual(take(successor), frame(UInt8(i))) }
        // Every later frame still signals it.
        for round in 0..<3 {
            XCTAssertTrue(frame(UInt8(10 + round)).withUnsafeBytes { f.segment.send($0) })
            f.segment.flush()
            XCTAssertEqual(f.nicDoorbell.drain(), 1, "round \(round): the switch signalled the restarted NIC")
            XCTAssertEqual(take(successor), frame(UInt8(10 + round)))
        }
    }
}

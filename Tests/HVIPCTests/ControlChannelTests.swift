import Dispatch
import Glibc
import HVIPC
import HVSys
import Synchronization
import XCTest

/// The control channel over a real SOCK_SEQPACKET pair, and the message decoders under fuzzing.
final class ControlChannelTests: XCTestCase {

    /// Runs `body` with the "device" end on its own thread; returns what it reported.
    private func onPeer(_ peer: ControlChannel, _ body: @escaping @Sendable (ControlChannel) throws -> String?) -> PeerResult {
        let result = PeerResult()
        do {
            try HostThread.spawn(name: "test-peer") {
                do {
                    if let problem = try body(peer) { result.problems.withLock { $0.append(problem) } }
                } catch {
                    result.problems.withLock { $0.append("peer: \(error)") }
                }
                result.done.signal()
            }
        } catch {
            XCTFail("cannot start the peer thread: \(error)")
            result.done.signal()
        }
        return result
    }

    private func finish(_ result: PeerResult, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(result.done.wait(timeout: .now() + 20), .success, "peer thread hung", file: file, line: line)
        XCTAssertEqual(result.problems.withLock { $0 }, [], file: file, line: line)
    }

    func testRequestReplyPassesUsableDescriptors() throws {
        let (a, b) = try SeqPacketSocket.pair()
        let core = ControlChannel(socket: a), device = ControlChannel(socket: b)
        let memory = try MemFD.create(name: "hv-test-state", size: 4096)
        let doorbell = try EventFD(nonBlocking: true)
        let hello = Hello(capabilities: [.registerRing, .statePage], restartGeneration: 2, memoryRegions: [],
                          resources: [Resource(kind: .pio, base: 0x3f8, length: 8)],
                          fds: [FDAssignment(role: .statePage, index: 0), FDAssignment(role: .interrupt, index: 0)],
                          config: "a=b\n")

        let peer = onPeer(device) { device in
            let (frame, fds) = try device.receive(timeoutMilliseconds: 10_000)
            guard frame.type == MessageType.hello.rawValue, frame.flags == [], frame.status == 0 else { return "unexpected frame \(frame)" }
            let received = try Hello.decode(frame.payload)
            guard received == hello else { return "HELLO changed in transit: \(received)" }
            guard fds.count == 2 else { return "\(fds.count) descriptors arrived, expected 2" }
            // Both arrive as new descriptors of this process, close-on-exec, and usable.
            guard fcntl(fds[0].rawValue, F_GETFD) & FD_CLOEXEC != 0 else { return "received fd is not close-on-exec" }
            guard try fds[0].size() == 4096 else { return "state page has the wrong size" }
            let page = try SharedMapping(fd: fds[0], count: 4096)
            page.base.storeBytes(of: 0x4856_5f4f_4b21_0000 as UInt64, toByteOffset: 8, as: UInt64.self)
            EventFD(adopting: fds[1]).signal()
            let reply = HelloReply(minor: 0, capabilities: [.registerRing], name: "test-device")
            try device.send(.reply(to: frame, payload: reply.encode()))
            return nil
        }
        let (reply, replyFDs) = try core.request(.hello, payload: hello.encode(), fds: [memory.rawValue, doorbell.fd.rawValue],
                                                  timeoutMilliseconds: 10_000)
        finish(peer)
        XCTAssertTrue(replyFDs.isEmpty)
        XCTAssertEqual(reply.flags, .reply)
        XCTAssertEqual(reply.status, Status.ok.rawValue)
        XCTAssertEqual(try HelloReply.decode(reply.payload), HelloReply(minor: 0, capabilities: [.registerRing], name: "test-device"))
        XCTAssertEqual(doorbell.drain(), 1, "the device's signal on the passed eventfd arrives here")
        let mine = try SharedMapping(fd: memory, count: 4096)
        XCTAssertEqual(mine.base.load(fromByteOffset: 8, as: UInt64.self), 0x4856_5f4f_4b21_0000, "both map the same memfd")
    }

    func testRequestIdsIncreaseAndNotifyIsNoReply() throws {
        let (a, b) = try SeqPacketSocket.pair()
        let core = ControlChannel(socket: a), device = ControlChannel(socket: b)
        try core.notify(.log, payload: LogRecord(level: .info, text: "x").encode())
        try core.notify(.setIRQLevel, payload: IRQLevel(line: 1, asserted: true).encode())
        let (first, _) = try device.receive(timeoutMilliseconds: 1000)
        let (second, _) = try device.receive(timeoutMilliseconds: 1000)
        XCTAssertEqual(first.flags, .noReply)
        XCTAssertEqual(first.type, MessageType.log.rawValue)
        XCTAssertEqual(try LogRecord.decode(first.payload), LogRecord(level: .info, text: "x"))
        XCTAssertEqual(second.type, MessageType.setIRQLevel.rawValue)
        XCTAssertNotEqual(first.id, second.id)
        XCTAssertEqual(second.id, first.id &+ 1)
        XCTAssertEqual(first.status, 0)
    }

    func testTimeoutWhenPeerNeverAnswers() throws {
        let (a, b) = try SeqPacketSocket.pair()
        let core = ControlChannel(socket: a)
        let started = monotonicNanoseconds()
        XCTAssertThrowsError(try core.request(.ping, payload: [], timeoutMilliseconds: 250)) { error in
            guard case ChannelError.timedOut = error else { return XCTFail("\(error)") }
        }
        let elapsed = monotonicNanoseconds() - started
        XCTAssertGreaterThanOrEqual(elapsed, 240_000_000)
        XCTAssertLessThan(elapsed, 5_000_000_000)
        // The request itself did reach the peer.
        let (ping, _) = try ControlChannel(socket: b).receive(timeoutMilliseconds: 0)
        XCTAssertEqual(ping.type, MessageType.ping.rawValue)
        // A zero timeout on an empty socket polls once and reports a timeout.
        XCTAssertThrowsError(try core.receive(timeoutMilliseconds: 0)) { error in
            guard case ChannelError.timedOut = error else { return XCTFail("\(error)") }
        }
    }

    func testClosedWhenPeerGoesAway() throws {
        do {
            let (a, b) = try SeqPacketSocket.pair()
            let core = ControlChannel(socket: a)
            b.fd.close()
            XCTAssertThrowsError(try core.receive(timeoutMilliseconds: 1000)) { error in
                guard case ChannelError.closed = error else { return XCTFail("receive: \(error)") }
            }
            XCTAssertThrowsError(try core.request(.ping, payload: [], timeoutMilliseconds: 1000)) { error in
                guard case ChannelError.closed = error else { return XCTFail("request: \(error)") }
            }
            XCTAssertThrowsError(try core.notify(.log, payload: [])) { error in
                guard case ChannelError.closed = error else { return XCTFail("notify: \(error)") }
            }
        }
        // A peer that dies while we wait: receive wakes up with `closed`, not a timeout.
        let (a, b) = try SeqPacketSocket.pair()
        let core = ControlChannel(socket: a)
        let peer = onPeer(ControlChannel(socket: b)) { device in
            usleep(100_000)
            device.socket.fd.close()
            return nil
        }
        let started = monotonicNanoseconds()
        XCTAssertThrowsError(try core.receive(timeoutMilliseconds: 10_000)) { error in
            guard case ChannelError.closed = error else { return XCTFail("\(error)") }
        }
        XCTAssertLessThan(monotonicNanoseconds() - started, 5_000_000_000)
        finish(peer)
    }

    func testMalformedFrames() throws {
        let (a, b) = try SeqPacketSocket.pair()
        let core = ControlChannel(socket: a)
        func expectMalformed(_ bytes: [UInt8], _ what: String, _ check: (WireError) -> Bool) throws {
            try b.send(bytes)
            XCTAssertThrowsError(try core.receive(timeoutMilliseconds: 1000), what) { error in
                guard case ChannelError.malformed(let wire) = error else { return XCTFail("\(what): \(error)") }
                XCTAssertTrue(check(wire), "\(what): \(wire)")
            }
        }
        let good = Frame(type: MessageType.log.rawValue, flags: .noReply, id: 3, payload: [1, 2, 3, 4]).encode()
        try expectMalformed([0xde, 0xad, 0xbe, 0xef], "garbage") { if case .truncated = $0 { true } else { false } }
        try expectMalformed(Array(good.prefix(15)), "short header") { if case .truncated = $0 { true } else { false } }
        try expectMalformed(Array(good.dropLast()), "payload shorter than its length") { if case .lengthMismatch = $0 { true } else { false } }
        try expectMalformed(good + [0], "payload longer than its length") { if case .lengthMismatch = $0 { true } else { false } }
        var lying = good
        lying[12] = 0xff
        try expectMalformed(lying, "huge length") { if case .lengthMismatch = $0 { true } else { false } }
        var flags = good
        flags[2] = 0x03
        try expectMalformed(flags, "REPLY and NO_REPLY") { if case .invalidField = $0 { true } else { false } }
        flags[2] = 0x10
        try expectMalformed(flags, "reserved flag") { if case .invalidField = $0 { true } else { false } }
        // A datagram larger than any frame may be is cut by the kernel and refused.
        let oversize = Frame(type: 1, id: 1, payload: [UInt8](repeating: 0x41, count: Frame.maximumSize)).encode()
        try expectMalformed(oversize, "oversize datagram") { if case .invalidField = $0 { true } else { false } }
        // After all that the channel still works.
        try b.send(good)
        XCTAssertEqual(try core.receive(timeoutMilliseconds: 1000).0, try Frame.decode(good))
    }

    func testWrongReplyIsMalformed() throws {
        let answers: [(String, @Sendable (Frame) -> Frame)] = [
            ("reply with another id", { @Sendable (f: Frame) in Frame(type: f.type, flags: .reply, id: f.id &+ 1) }),
            ("reply with another type", { @Sendable (f: Frame) in Frame(type: MessageType.shutdown.rawValue, flags: .reply, id: f.id) }),
            ("a request instead of a reply", { @Sendable (f: Frame) in Frame(type: f.type, id: f.id) }),
        ]
        for (what, answer) in answers {
            let (a, b) = try SeqPacketSocket.pair()
            let core = ControlChannel(socket: a)
            let peer = onPeer(ControlChannel(socket: b)) { device in
                let (frame, _) = try device.receive(timeoutMilliseconds: 10_000)
                try device.send(answer(frame))
                return nil
            }
            XCTAssertThrowsError(try core.request(.ping, payload: [], timeoutMilliseconds: 10_000), what) { error in
                guard case ChannelError.malformed = error else { return XCTFail("\(what): \(error)") }
            }
            finish(peer)
        }
    }

    func testNonOKStatusIsRejected() throws {
        for (status, expected) in [(Status.denied.rawValue, Status.denied), (Status.unsupportedVersion.rawValue, .unsupportedVersion),
                                   (Status.malformed.rawValue, .malformed), (Int32(99), .internalError), (Int32(-1), .internalError)] {
            let (a, b) = try SeqPacketSocket.pair()
            let core = ControlChannel(socket: a)
            let peer = onPeer(ControlChannel(socket: b)) { device in
                let (frame, _) = try device.receive(timeoutMilliseconds: 10_000)
                try device.send(Frame(type: frame.type, flags: .reply, id: frame.id, status: status))
                return nil
            }
            XCTAssertThrowsError(try core.request(.setBootState, payload: BootState(mode: .reset).encode(), timeoutMilliseconds: 10_000)) { error in
                guard case ChannelError.rejected(let got, _) = error else { return XCTFail("status \(status): \(error)") }
                XCTAssertEqual(got, expected, "status \(status)")
            }
            finish(peer)
        }
    }

    func testRandomDatagramsNeverTrapTheChannel() throws {
        let (a, b) = try SeqPacketSocket.pair()
        let core = ControlChannel(socket: a)
        var rng = LCG(seed: 0xC0FFEE)
        var accepted = 0
        for i in 0..<2000 {
            var bytes = rng.bytes(1 + rng.below(64))
            if i % 2 == 0 && bytes.count >= 16 {
                // Make half of them plausible: a consistent length and no reserved flags.
                let length = UInt32(bytes.count - 16)
                for k in 0..<4 { bytes[12 + k] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(k))) }
                bytes[2] &= 0x01
                bytes[3] = 0
            }
            try b.send(bytes)
            do {
                _ = try core.receive(timeoutMilliseconds: 1000)
                accepted += 1
            } catch {
                guard case .malformed = error else { return XCTFail("datagram \(i): \(error)") }
            }
        }
        XCTAssertGreaterThan(accepted, 0)
    }

    // MARK: Decoder fuzzing (deterministic)

    /// 10 000 random buffers per decoder, half of them mutations of a valid encoding so the
    /// decoders get past their first checks. Passing means: no trap, and anything accepted
    /// re-encodes to the same bytes (or, for text truncated on encode, decodes again).
    func testDecodersNeverTrapOnRandomInput() throws {
        let seeds: [(String, [UInt8])] = try [
            ("frame", Frame(type: 0x101, flags: .noReply, id: 9, payload: LogRecord(level: .info, text: "hi").encode()).encode()),
            ("hello", Hello(capabilities: [.registerRing], restartGeneration: 1,
                            memoryRegions: [MemoryRegion(guestPhysicalAddress: 0, size: 0x1000, memfdOffset: 0)],
                            resources: [Resource(kind: .mmio, base: 0xfee0_0000, length: 0x1000)],
                            fds: [FDAssignment(role: .guestMemory, index: 0)], config: "k=v").encode()),
            ("hello_reply", HelloReply(capabilities: [.statePage], name: "dev").encode()),
            ("log", LogRecord(level: .warning, text: "warn").encode()),
            ("set_boot_state", BootState(mode: .flat32, rip: 0x100000).encode()),
            ("set_irq_level", IRQLevel(line: 1, asserted: true).encode()),
            ("system_event", SystemEvent(.reset).encode()),
            ("media_change", MediaChange(hostFile: 0, present: true).encode()),
            ("reconfigure", try XCTUnwrap(Reconfigure(config: "rate_bw_size=1048576\n").encode())),
            ("add_doorbell", DoorbellRequest(resource: 1, offset: 0x3000, length: 0).encode()),
            ("set_msi_route", MSIRoute(vector: 2, enabled: true, address: 0xFEE0_0000, data: 0x41).encode()),
        ]
        var rng = LCG(seed: 0x5EED)
        for (name, seed) in seeds {
            var accepted = 0
            for i in 0..<10_000 {
                var input: [UInt8]
                if i % 2 == 0 {
                    input = rng.bytes(rng.below(160))
                } else {
                    input = seed
                    for _ in 0..<(1 + rng.below(4)) {
                        switch rng.below(4) {
                        case 0: if !input.isEmpty { input[rng.below(input.count)] = rng.byte() }
                        case 1: if !input.isEmpty { input.removeLast(1 + rng.below(min(input.count, 8))) }
                        case 2: input += rng.bytes(1 + rng.below(8))
                        default: if !input.isEmpty { input[rng.below(input.count)] ^= 1 << UInt8(rng.below(8)) }
                        }
                    }
                }
                if try roundTrips(name, input) { accepted += 1 }
            }
            XCTAssertGreaterThan(accepted, 0, "\(name): the mutations never produced a valid message")
        }
    }

    /// Decodes `input` as `layout`; if accepted, checks the value re-encodes consistently.
    private func roundTrips(_ layout: String, _ input: [UInt8]) throws -> Bool {
        do {
            switch layout {
            case "frame":
                let v = try Frame.decode(input)
                XCTAssertEqual(v.encode(), input)
            case "hello":
                let v = try Hello.decode(input)
                XCTAssertEqual(try Hello.decode(v.encode()), v)
            case "hello_reply":
                let v = try HelloReply.decode(input)
                let again = try HelloReply.decode(v.encode())
                XCTAssertEqual([again.major, again.minor], [v.major, v.minor])
                XCTAssertEqual(again.capabilities, v.capabilities)
            case "log":
                let v = try LogRecord.decode(input)
                XCTAssertEqual(try LogRecord.decode(v.encode()).level, v.level)
            case "set_boot_state":
                let v = try BootState.decode(input)
                XCTAssertEqual(v.encode(), input)
            case "set_irq_level":
                let v = try IRQLevel.decode(input)
                XCTAssertEqual(v.encode(), input)
            case "media_change":
                let v = try MediaChange.decode(input)
                XCTAssertEqual(v.encode(), input)
            case "reconfigure":
                let v = try Reconfigure.decode(input)
                XCTAssertEqual(try Reconfigure.decode(try XCTUnwrap(v.encode())), v)
            case "add_doorbell":
                let v = try DoorbellRequest.decode(input)
                XCTAssertEqual(v.encode(), input)
            case "set_msi_route":
                let v = try MSIRoute.decode(input)
                XCTAssertEqual(v.encode(), input)
            case "system_event":
                let v = try SystemEvent.decode(input)
                XCTAssertEqual(v.encode(), input)
            default:
                throw TestFailure("no decoder for \(layout)")
            }
            return true
        } catch let error as WireError {
            _ = error.description  // every error describes itself without trapping
            return false
        }
    }
}

/// What a peer thread reports back.
private final class PeerResult: Sendable {
    let problems = Mutex<[String]>([])
    let done = DispatchSemaphore(value: 0)
}

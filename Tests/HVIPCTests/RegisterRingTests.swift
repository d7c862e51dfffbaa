import Dispatch
import Glibc
import HVIPC
import HVSys
import Synchronization
import XCTest

/// The register ring as both sides use it: the core's view from `create`, the device's from
/// `init(attaching:)` on a duplicate of the same memfd.
final class RegisterRingTests: XCTestCase {

    private func request(_ tag: UInt64, _ op: RegisterRequest.Operation = .pioWrite) -> RegisterRequest {
        RegisterRequest(operation: op, size: 1 << UInt8(tag % 4), resource: UInt16(truncatingIfNeeded: tag % 3),
                        vcpu: UInt32(truncatingIfNeeded: tag % 5), offset: tag &* 3, data: ~tag, tag: tag)
    }

    func testPushAndPop() throws {
        let ring = try RingFixture(requestCapacity: 8, responseCapacity: 4)
        XCTAssertEqual(ring.device.requestCapacity, 8)
        XCTAssertEqual(ring.device.responseCapacity, 4)
        XCTAssertEqual(ring.device.publishedRequestIndex(), 0)
        XCTAssertEqual(ring.core.requestsOutstanding(), 0)

        let write = request(1)
        let read = RegisterRequest(operation: .mmioRead, size: 4, resource: 1, vcpu: 2, offset: 0x20, data: 0, tag: 2)
        XCTAssertTrue(try ring.core.pushRequest(write))
        XCTAssertTrue(try ring.core.pushRequest(read))
        XCTAssertEqual(ring.device.publishedRequestIndex(), 2)
        XCTAssertEqual(ring.core.requestsOutstanding(), 2)
        XCTAssertEqual(ring.device.request(at: 0), write)
        XCTAssertEqual(ring.device.request(at: 1), read)

        // Not committed yet: still outstanding (a restarted device would replay both).
        XCTAssertEqual(ring.device.committedRequestIndex(), 0)
        ring.device.commitRequests(upTo: 1)
        XCTAssertEqual(ring.core.requestsOutstanding(), 1)
        ring.device.commitRequests(upTo: 2)
        XCTAssertEqual(ring.core.requestsOutstanding(), 0)
        XCTAssertEqual(ring.u32(at: RingLayout.requestConsumerOffset), 2)
        XCTAssertEqual(ring.u32(at: RingLayout.requestProducerOffset), 2)

        XCTAssertNil(try ring.core.popResponse())
        XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: 2, data: 0xdead_beef)))
        XCTAssertEqual(try ring.core.popResponse(), RegisterResponse(tag: 2, data: 0xdead_beef))
        XCTAssertNil(try ring.core.popResponse())
        XCTAssertEqual(ring.u32(at: RingLayout.responseProducerOffset), 1)
        XCTAssertEqual(ring.u32(at: RingLayout.responseConsumerOffset), 1)
    }

    func testFullRingsRefuseMore() throws {
        let ring = try RingFixture(requestCapacity: 4, responseCapacity: 2)
        for tag in 0..<4 { XCTAssertTrue(try ring.core.pushRequest(request(UInt64(tag)))) }
        XCTAssertFalse(try ring.core.pushRequest(request(99)), "a full request ring must refuse")
        XCTAssertEqual(ring.u32(at: RingLayout.requestProducerOffset), 4, "a refused push publishes nothing")
        // Reading without committing frees nothing.
        XCTAssertEqual(ring.device.request(at: 0), request(0))
        XCTAssertFalse(try ring.core.pushRequest(request(99)))
        ring.device.commitRequests(upTo: 1)
        XCTAssertTrue(try ring.core.pushRequest(request(4)))
        XCTAssertFalse(try ring.core.pushRequest(request(99)))
        // The slot reused is slot 0, which now holds tag 4; 1...3 are untouched.
        XCTAssertEqual(ring.device.request(at: 4), request(4))
        for tag in 1..<4 { XCTAssertEqual(ring.device.request(at: UInt32(tag)), request(UInt64(tag))) }

        XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: 1, data: 1)))
        XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: 2, data: 2)))
        XCTAssertFalse(ring.device.pushResponse(RegisterResponse(tag: 3, data: 3)), "a full response ring must refuse")
        XCTAssertEqual(try ring.core.popResponse()?.tag, 1)
        XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: 3, data: 3)))
        XCTAssertEqual(try ring.core.popResponse()?.tag, 2)
        XCTAssertEqual(try ring.core.popResponse()?.tag, 3)
        XCTAssertNil(try ring.core.popResponse())
    }

    /// Many laps around small rings, with batch sizes that never line up with the capacity.
    func testWrapAroundManyTimes() throws {
        let ring = try RingFixture(requestCapacity: 4, responseCapacity: 2)
        var next: UInt64 = 0
        var expected: UInt64 = 0
        var cursor: UInt32 = 0
        var rng = LCG(seed: 7)
        for _ in 0..<20_000 {
            let batch = 1 + rng.below(4)
            var pushed = 0
            for _ in 0..<batch {
                if try ring.core.pushRequest(request(next)) {
                    next += 1
                    pushed += 1
                } else {
                    break
                }
            }
            XCTAssertGreaterThan(pushed, 0)
            let published = ring.device.publishedRequestIndex()
            while cursor != published {
                guard let r = ring.device.request(at: cursor) else { return XCTFail("slot \(cursor) unreadable") }
                XCTAssertEqual(r, request(expected))
                if r.tag != expected { return }
                expected += 1
                cursor &+= 1
                if rng.below(2) == 0 { ring.device.commitRequests(upTo: cursor) }
            }
            ring.device.commitRequests(upTo: cursor)
            // One read answered per batch, consumed at once.
            XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: expected, data: ~expected)))
            XCTAssertEqual(try ring.core.popResponse(), RegisterResponse(tag: expected, data: ~expected))
        }
        XCTAssertEqual(expected, next)
        XCTAssertGreaterThan(next, 20_000, "should have lapped the 4-entry ring thousands of times")
        XCTAssertEqual(ring.u32(at: RingLayout.requestProducerOffset), UInt32(truncatingIfNeeded: next))
    }

    /// Free-running u32 indices wrap from 0xffffffff to 0: slots and fullness stay right.
    func testIndicesWrapAtTwoToTheThirtyTwo() throws {
        let ring = try RingFixture(requestCapacity: 4, responseCapacity: 4)
        let start: UInt32 = 0xffff_fffd
        for offset in [RingLayout.requestProducerOffset, RingLayout.requestConsumerOffset,
                       RingLayout.responseProducerOffset, RingLayout.responseConsumerOffset] {
            ring.setU32(start, at: offset)
        }
        // The core keeps its own indices privately; a fresh core-role view starts from the page.
        ring.core = try RegisterRing(attaching: try ring.fd.duplicate())
        XCTAssertEqual(ring.core.requestsOutstanding(), 0)
        var index = start
        for tag in UInt64(0)..<64 {
            XCTAssertTrue(try ring.core.pushRequest(request(tag)))
            XCTAssertEqual(ring.device.publishedRequestIndex(), index &+ 1)
            XCTAssertEqual(ring.device.request(at: index), request(tag))
            // The entry sits in slot index & (capacity - 1).
            let slot = ring.bytes(at: ring.requestSlotOffset(index), count: RingLayout.requestEntrySize)
            XCTAssertEqual(slot[24..<32].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }, tag)
            index &+= 1
            ring.device.commitRequests(upTo: index)
            XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: tag, data: tag)))
            XCTAssertEqual(try ring.core.popResponse(), RegisterResponse(tag: tag, data: tag))
        }
        XCTAssertEqual(ring.u32(at: RingLayout.requestProducerOffset), start &+ 64)
        XCTAssertEqual(ring.u32(at: RingLayout.responseConsumerOffset), start &+ 64)

        // Fill the ring across the wrap: exactly `capacity` pushes fit.
        ring.setU32(0xffff_fffe, at: RingLayout.requestProducerOffset)
        ring.setU32(0xffff_fffe, at: RingLayout.requestConsumerOffset)
        ring.core = try RegisterRing(attaching: try ring.fd.duplicate())
        for tag in UInt64(0)..<4 { XCTAssertTrue(try ring.core.pushRequest(request(tag))) }
        XCTAssertFalse(try ring.core.pushRequest(request(4)))
        XCTAssertEqual(ring.core.requestsOutstanding(), 4)
        XCTAssertEqual(ring.u32(at: RingLayout.requestProducerOffset), 2)
    }

    func testTagsAndValuesRoundTrip() throws {
        let ring = try RingFixture(requestCapacity: 8, responseCapacity: 8)
        var rng = LCG(seed: 0x1234)
        let ops: [RegisterRequest.Operation] = [.pioRead, .pioWrite, .mmioRead, .mmioWrite]
        var specials: [UInt64] = [0, 1, UInt64(UInt32.max), UInt64(UInt32.max) + 1, UInt64.max - 1, UInt64.max, 0x8000_0000_0000_0000]
        for _ in 0..<200 { specials.append(rng.next()) }
        var cursor: UInt32 = 0
        for (i, tag) in specials.enumerated() {
            let r = RegisterRequest(operation: ops[i % 4], size: UInt8(truncatingIfNeeded: rng.next()),
                                    resource: UInt16(truncatingIfNeeded: rng.next()), vcpu: UInt32(truncatingIfNeeded: rng.next()),
                                    offset: rng.next(), data: rng.next(), tag: tag)
            XCTAssertTrue(try ring.core.pushRequest(r))
            XCTAssertEqual(ring.device.request(at: cursor), r)
            cursor &+= 1
            ring.device.commitRequests(upTo: cursor)
            let answer = RegisterResponse(tag: tag, data: rng.next())
            XCTAssertTrue(ring.device.pushResponse(answer))
            XCTAssertEqual(try ring.core.popResponse(), answer)
        }
    }

    /// The consumer announces sleep, fences, re-checks; the producer publishes, fences, reads the flag.
    func testSleepingFlagProtocol() throws {
        let ring = try RingFixture()
        // Device side, nothing published: it may sleep, and the core sees that it must kick.
        XCTAssertFalse(ring.core.requestConsumerNeedsWakeup())
        XCTAssertFalse(ring.device.setRequestConsumerSleeping(true, cursor: 0))
        XCTAssertEqual(ring.u32(at: RingLayout.requestConsumerSleepingOffset), 1)
        XCTAssertTrue(ring.core.requestConsumerNeedsWakeup())
        XCTAssertTrue(try ring.core.pushRequest(request(0)))
        XCTAssertTrue(ring.core.requestConsumerNeedsWakeup())
        // Woken: it clears the flag; the re-check reports the published request.
        XCTAssertTrue(ring.device.setRequestConsumerSleeping(false, cursor: 0))
        XCTAssertFalse(ring.core.requestConsumerNeedsWakeup())
        // Work published before the device announces sleep: the announcement says "don't sleep".
        XCTAssertTrue(ring.device.setRequestConsumerSleeping(true, cursor: 0))
        ring.device.setRequestConsumerSleeping(false, cursor: 0)
        // Caught up: sleeping is fine again.
        ring.device.commitRequests(upTo: 1)
        XCTAssertFalse(ring.device.setRequestConsumerSleeping(true, cursor: 1))
        ring.device.setRequestConsumerSleeping(false, cursor: 1)

        // Core side, waiting for a response.
        XCTAssertFalse(ring.device.responseConsumerNeedsWakeup())
        XCTAssertFalse(ring.core.setResponseConsumerSleeping(true))
        XCTAssertEqual(ring.u32(at: RingLayout.responseConsumerSleepingOffset), 1)
        XCTAssertTrue(ring.device.responseConsumerNeedsWakeup())
        XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: 0, data: 0)))
        XCTAssertTrue(ring.core.setResponseConsumerSleeping(false))
        XCTAssertFalse(ring.device.responseConsumerNeedsWakeup())
        XCTAssertTrue(ring.core.setResponseConsumerSleeping(true), "a response is waiting: don't sleep")
        ring.core.setResponseConsumerSleeping(false)
        XCTAssertNotNil(try ring.core.popResponse())
        XCTAssertFalse(ring.core.setResponseConsumerSleeping(true))
        ring.core.setResponseConsumerSleeping(false)
        XCTAssertEqual(ring.u32(at: RingLayout.responseConsumerSleepingOffset), 0)
    }

    /// A hostile or crashed peer can write anything into the indices: the core throws, never traps.
    func testCorruptIndicesThrowInsteadOfTrapping() throws {
        let ring = try RingFixture(requestCapacity: 8, responseCapacity: 4)
        XCTAssertTrue(try ring.core.pushRequest(request(0)))
        for garbage: UInt32 in [2, 9, 0x8000_0000, 0xffff_fff0, 0xdead_beef] {
            // Consumer ahead of the producer, or more than `capacity` behind it.
            ring.setU32(garbage, at: RingLayout.requestConsumerOffset)
            XCTAssertThrowsError(try ring.core.pushRequest(request(1)), "request consumer \(garbage)") { error in
                guard case RingError.corruptIndex = error else { return XCTFail("\(error)") }
            }
        }
        ring.setU32(1, at: RingLayout.requestConsumerOffset)
        XCTAssertTrue(try ring.core.pushRequest(request(1)), "a sane index works again")

        for garbage: UInt32 in [5, 0x7fff_ffff, 0xffff_ffff, 0x1234_5678] {
            ring.setU32(garbage, at: RingLayout.responseProducerOffset)
            XCTAssertThrowsError(try ring.core.popResponse(), "response producer \(garbage)") { error in
                guard case RingError.corruptIndex = error else { return XCTFail("\(error)") }
            }
        }
        ring.setU32(0, at: RingLayout.responseProducerOffset)
        XCTAssertNil(try ring.core.popResponse())

        // The device side is equally robust against a core gone wrong: a response consumer index
        // that makes no sense reads as "full", and any request index is masked into the ring.
        ring.setU32(0x8000_0000, at: RingLayout.responseConsumerOffset)
        XCTAssertFalse(ring.device.pushResponse(RegisterResponse(tag: 1, data: 1)))
        var rng = LCG(seed: 99)
        for _ in 0..<10_000 { _ = ring.device.request(at: UInt32(truncatingIfNeeded: rng.next())) }
        // Garbage in a slot is either a request or nil, never a trap.
        for slot in 0..<8 { ring.write(rng.bytes(RingLayout.requestEntrySize), at: ring.requestSlotOffset(UInt32(slot))) }
        for i in UInt32(0)..<8 { _ = ring.device.request(at: i) }
    }

    func testAttachRefusesBadHeaders() throws {
        let good = try RingFixture(requestCapacity: 16, responseCapacity: 8)
        let size = RingLayout.size(requestCapacity: 16, responseCapacity: 8)
        let page = good.bytes(at: 0, count: size)
        XCTAssertNoThrow(try RegisterRing(attaching: try memfd(size: size, contents: page)))

        func refused(_ what: String, size: Int, _ edit: (inout [UInt8]) -> Void) {
            var bytes = page
            edit(&bytes)
            do {
                _ = try RegisterRing(attaching: try memfd(size: size, contents: bytes))
                XCTFail("\(what): attached")
            } catch RingError.badHeader {
                // expected
            } catch {
                XCTFail("\(what): \(error)")
            }
        }
        func put32(_ bytes: inout [UInt8], _ offset: Int, _ value: UInt32) {
            for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
        }
        refused("wrong magic", size: size) { put32(&$0, RingLayout.magicOffset, 0x4752_5649) }
        refused("zero magic", size: size) { put32(&$0, RingLayout.magicOffset, 0) }
        refused("byte-swapped magic", size: size) { put32(&$0, RingLayout.magicOffset, RingLayout.magic.byteSwapped) }
        refused("version 2", size: size) { $0[RingLayout.versionOffset] = 2 }
        refused("version 0", size: size) { $0[RingLayout.versionOffset] = 0 }
        refused("request capacity 12", size: size) { put32(&$0, RingLayout.requestCapacityOffset, 12) }
        refused("request capacity 0", size: size) { put32(&$0, RingLayout.requestCapacityOffset, 0) }
        refused("response capacity 3", size: size) { put32(&$0, RingLayout.responseCapacityOffset, 3) }
        refused("response capacity 2^31", size: size) { put32(&$0, RingLayout.responseCapacityOffset, 0x8000_0000) }
        refused("request capacity 2^17", size: size) { put32(&$0, RingLayout.requestCapacityOffset, 1 << 17) }
        refused("request entry size", size: size) { put32(&$0, RingLayout.requestEntrySizeOffset, 16) }
        refused("response entry size", size: size) { put32(&$0, RingLayout.responseEntrySizeOffset, 32) }
        refused("capacities too big for the region", size: size) { put32(&$0, RingLayout.requestCapacityOffset, 32) }
        refused("file one byte short", size: size - 1) { _ in }
        refused("header-only file", size: RingLayout.headerSize) { _ in }
        refused("file shorter than a header", size: RingLayout.headerSize - 1) { _ in }
        refused("empty file", size: 0) { _ in }
        refused("file over 16 MiB", size: 16 << 20 + 4096) { _ in }
        // A larger-than-needed region is fine.
        XCTAssertNoThrow(try RegisterRing(attaching: try memfd(size: size + 4096, contents: page)))
    }

    /// A real producer thread and consumer thread, as the core's vCPU thread and a device would
    /// run them: 200k requests in order, every 1024th a read answered through the response ring,
    /// with the sleeping-flag protocol and eventfd doorbells on both sides.
    func testTwoThreadStress() throws {
        let ring = try RingFixture(requestCapacity: 64, responseCapacity: 8)
        let kick = try EventFD(nonBlocking: true)
        let reply = try EventFD(nonBlocking: true)
        let total: UInt64 = 200_000
        let shared = StressResults()
        let done = DispatchSemaphore(value: 0)
        let core = ring.core, device = ring.device
        let isRead = Self.isRead, value = Self.value

        try HostThread.spawn(name: "ring-consumer") {
            defer { done.signal() }
            var cursor = device.committedRequestIndex()
            var expected: UInt64 = 0
            var idleSince = monotonicNanoseconds()
            while expected < total {
                let published = device.publishedRequestIndex()
                if published == cursor {
                    if monotonicNanoseconds() - idleSince < 20_000 { continue }
                    if device.setRequestConsumerSleeping(true, cursor: cursor) {
                        device.setRequestConsumerSleeping(false, cursor: cursor)
                        continue
                    }
                    // A lost wake-up would show as a timeout here while work is pending.
                    let r = (try? Poll.wait([.init(fd: kick.fd.rawValue)], timeoutMilliseconds: 2000)) ?? [0]
                    device.setRequestConsumerSleeping(false, cursor: cursor)
                    kick.drain()
                    if r[0] == 0 && device.publishedRequestIndex() != cursor { shared.stalls.add(1, ordering: .relaxed) }
                    idleSince = monotonicNanoseconds()
                    continue
                }
                while cursor != published {
                    guard let r = device.request(at: cursor), r.tag == expected, r.data == (isRead(expected) ? 0 : value(expected)) else {
                        shared.failures.withLock { $0.append("request \(expected) arrived as \(String(describing: device.request(at: cursor)))") }
                        return
                    }
                    if r.operation.isRead {
                        while !device.pushResponse(RegisterResponse(tag: r.tag, data: value(r.tag))) { sched_yield() }
                        if device.responseConsumerNeedsWakeup() { reply.signal() }
                    }
                    expected += 1
                    cursor &+= 1
                }
                device.commitRequests(upTo: cursor)
                idleSince = monotonicNanoseconds()
            }
        }

        try HostThread.spawn(name: "ring-producer") {
            defer { done.signal() }
            do {
                for tag in 0..<total {
                    let read = isRead(tag)
                    let r = RegisterRequest(operation: read ? .mmioRead : .mmioWrite, size: 8, resource: 0, vcpu: 0,
                                            offset: 0, data: read ? 0 : value(tag), tag: tag)
                    while try !core.pushRequest(r) {
                        if core.requestConsumerNeedsWakeup() { kick.signal() }
                        sched_yield()
                    }
                    if core.requestConsumerNeedsWakeup() { kick.signal() }
                    guard read else { continue }
                    while true {
                        if let response = try core.popResponse() {
                            if response != RegisterResponse(tag: tag, data: value(tag)) {
                                shared.failures.withLock { $0.append("read \(tag) answered with \(response)") }
                                return
                            }
                            break
                        }
                        if core.setResponseConsumerSleeping(true) {
                            core.setResponseConsumerSleeping(false)
                            continue
                        }
                        let p = (try? Poll.wait([.init(fd: reply.fd.rawValue)], timeoutMilliseconds: 2000)) ?? [0]
                        core.setResponseConsumerSleeping(false)
                        reply.drain()
                        if p[0] == 0 { shared.stalls.add(1, ordering: .relaxed) }
                    }
                }
            } catch {
                shared.failures.withLock { $0.append("producer: \(error)") }
            }
        }

        let started = monotonicNanoseconds()
        for side in ["first", "second"] {
            if done.wait(timeout: .now() + 120) == .timedOut {
                return XCTFail("the \(side) thread did not finish in 120 s (failures: \(shared.failures.withLock { $0 }))")
            }
        }
        let seconds = Double(monotonicNanoseconds() - started) / 1e9
        XCTAssertEqual(shared.failures.withLock { $0 }, [])
        XCTAssertEqual(shared.stalls.load(ordering: .relaxed), 0, "a sleeper missed its wake-up")
        XCTAssertEqual(ring.core.requestsOutstanding(), 0)
        XCTAssertEqual(ring.u32(at: RingLayout.requestProducerOffset), UInt32(total))
        print("ring stress: \(total) requests in \(String(format: "%.2f", seconds)) s")
    }

    private static let isRead: @Sendable (UInt64) -> Bool = { $0 % 1024 == 1023 }
    private static let value: @Sendable (UInt64) -> UInt64 = { $0 &* 0x9e37_79b9_7f4a_7c15 }
}

/// What the stress test's threads report back.
private final class StressResults: Sendable {
    let failures = Mutex<[String]>([])
    let stalls = Atomic<Int>(0)
}

@testable import HVDeviceSDK
import HVSys
import XCTest

/// The split virtqueue against virtio 1.2 §2.7, driven the way a driver would (and a hostile one).
final class VirtqueueTests: XCTestCase {
    /// 1 MiB of guest RAM at guest-physical 0, in a memfd as the core hands it over.
    private func makeMemory() throws -> GuestMemory {
        let fd = try MemFD.create(name: "vq-test", size: 1 << 20)
        return try GuestMemory(fd: fd, regions: [MemoryRegion(guestPhysicalAddress: 0, size: 1 << 20, memfdOffset: 0)])
    }

    private let desc: UInt64 = 0x1000, avail: UInt64 = 0x2000, used: UInt64 = 0x3000

    private func put<T: FixedWidthInteger>(_ m: GuestMemory, _ value: T, at address: UInt64) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { try! m.write($0, at: address) }
    }

    private func get<T: FixedWidthInteger>(_ m: GuestMemory, _ type: T.Type, at address: UInt64) -> T {
        var v = T.zero
        withUnsafeMutableBytes(of: &v) { try! m.read(into: $0, at: address) }
        return T(littleEndian: v)
    }

    private func descriptor(_ m: GuestMemory, _ i: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0) {
        let at = desc + 16 * UInt64(i)
        put(m, address, at: at)
        put(m, length, at: at + 8)
        put(m, flags, at: at + 12)
        put(m, next, at: at + 14)
    }

    /// Makes `head` available in slot `slot` and publishes `index`.
    private func offer(_ m: GuestMemory, head: UInt16, slot: UInt16, index: UInt16, size: UInt16 = 8) {
        put(m, head, at: avail + 4 + 2 * UInt64(slot % size))
        put(m, index, at: avail + 2)
    }

    private func queue(_ m: GuestMemory, size: UInt16 = 8) throws -> SplitVirtqueue {
        try XCTUnwrap(SplitVirtqueue(size: size, descriptorTable: desc, availableRing: avail, usedRing: used, memory: m))
    }

    func testTakesAChainAndReturnsIt() throws {
        let m = try makeMemory()
        var q = try queue(m)
        XCTAssertNil(q.next(m), "nothing available yet")
        descriptor(m, 3, address: 0x8000, length: 16, flags: 1, next: 5)       // readable, next
        descriptor(m, 5, address: 0x9000, length: 100, flags: 2 | 1, next: 0)  // writable, next
        descriptor(m, 0, address: 0xA000, length: 4, flags: 2)                 // writable, last
        offer(m, head: 3, slot: 0, index: 1)
        let chain = try XCTUnwrap(q.next(m)).get()
        XCTAssertEqual(chain.head, 3)
        XCTAssertEqual(chain.readable, [VirtqueueBuffer(address: 0x8000, length: 16)])
        XCTAssertEqual(chain.writable, [VirtqueueBuffer(address: 0x9000, length: 100), VirtqueueBuffer(address: 0xA000, length: 4)])
        XCTAssertEqual([chain.readableLength, chain.writableLength], [16, 104])
        XCTAssertNil(q.next(m), "taken once")

        // Data out spans both writable buffers, from an offset.
        XCTAssertEqual(chain.write(Array(repeating: 0xAB, count: 10), at: 96, m), 8, "only 8 of 10 bytes fit after offset 96")
        XCTAssertEqual(get(m, UInt32.self, at: 0xA000), 0xABAB_ABAB)
        XCTAssertEqual(get(m, UInt32.self, at: 0x9000 + 96), 0xABAB_ABAB)

        q.complete(head: 3, written: 42, m)
        XCTAssertEqual(get(m, UInt16.self, at: used + 2), 1, "used idx published")
        XCTAssertEqual(get(m, UInt32.self, at: used + 4), 3, "used element: id")
        XCTAssertEqual(get(m, UInt32.self, at: used + 8), 42, "used element: len")
    }

    func testIndicesWrapAround() throws {
        let m = try makeMemory()
        var q = try queue(m)
        q.restore(nextAvailable: 65535, usedIndex: 65535)
        descriptor(m, 1, address: 0x8000, length: 8, flags: 0)
        offer(m, head: 1, slot: 65535, index: 0)  // one new entry: 65535 → 0
        let chain = try XCTUnwrap(q.next(m)).get()
        XCTAssertEqual(chain.head, 1)
        XCTAssertEqual(q.nextAvailable, 0)
        q.complete(head: 1, written: 0, m)
        XCTAssertEqual(get(m, UInt16.self, at: used + 2), 0)
        XCTAssertEqual(get(m, UInt32.self, at: used + 4 + 8 * 7), 1, "slot 65535 % 8 = 7")
    }

    func testHostileChainsFailOneRequestAndTheQueueGoesOn() throws {
        let m = try makeMemory()
        var q = try queue(m)
        var index: UInt16 = 0
        func expect(_ error: DescriptorChainError, line: UInt = #line) {
            index &+= 1
            put(m, index, at: avail + 2)
            guard case .failure(let e)? = q.next(m) else { return XCTFail("accepted", line: line) }
            XCTAssertEqual(e, error, line: line)
            XCTAssertFalse(e.description.isEmpty)
        }
        put(m, UInt16(9), at: avail + 4)                         // slot 0: head 9 ≥ size 8
        expect(.headOutOfRange(9))
        descriptor(m, 0, address: 0x8000, length: 8, flags: 1, next: 200)
        put(m, UInt16(0), at: avail + 4 + 2)
        expect(.nextOutOfRange(200))
        descriptor(m, 1, address: 0x8000, length: 8, flags: 1, next: 2)
        descriptor(m, 2, address: 0x8000, length: 8, flags: 1, next: 1)   // 1 → 2 → 1 …
        put(m, UInt16(1), at: avail + 4 + 4)
        expect(.loop(head: 1))
        descriptor(m, 3, address: 0xFFFF0, length: 0x100, flags: 0)       // runs past the 1 MiB of RAM
        put(m, UInt16(3), at: avail + 4 + 6)
        expect(.bufferOutsideRAM(address: 0xFFFF0, length: 0x100))
        descriptor(m, 4, address: 0x8000, length: 8, flags: 2 | 1, next: 5)
        descriptor(m, 5, address: 0x8000, length: 8, flags: 0)
        put(m, UInt16(4), at: avail + 4 + 8)
        expect(.readableAfterWritable(head: 4))
        descriptor(m, 6, address: 0x8000, length: 32, flags: 4)
        put(m, UInt16(6), at: avail + 4 + 10)
        expect(.indirectNotNegotiated(head: 6))
        descriptor(m, 7, address: UInt64.max - 3, length: 16, flags: 0)   // address + length overflows
        put(m, UInt16(7), at: avail + 4 + 12)
        expect(.bufferOutsideRAM(address: UInt64.max - 3, length: 16))
        // After all that, a good chain still works.
        descriptor(m, 2, address: 0x8000, length: 8, flags: 0)
        put(m, UInt16(2), at: avail + 4 + 14)
        index &+= 1
        put(m, index, at: avail + 2)
        XCTAssertEqual(try XCTUnwrap(q.next(m)).get().head, 2)
    }

    func testRandomRingsNeverTrap() throws {
        let m = try makeMemory()
        var q = try queue(m, size: 16)
        var x: UInt64 = 0x1234_5678
        func random() -> UInt64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x }
        var taken = 0
        for round in 0..<2000 {
            for i in 0..<16 {
                descriptor(m, UInt16(i), address: random() % (1 << 21), length: UInt32(random() % 8192),
                           flags: UInt16(random() % 8), next: UInt16(random() % 20))
                put(m, UInt16(random() % 20), at: avail + 4 + 2 * UInt64(i))
            }
            put(m, UInt16(truncatingIfNeeded: round + 1), at: avail + 2)
            if case .success(let chain)? = q.next(m) {
                taken += 1
                XCTAssertLessThanOrEqual(chain.readable.count + chain.writable.count, 16)
                q.complete(head: chain.head, written: 0, m)
            }
        }
        XCTAssertGreaterThan(taken, 0)
    }

    func testLayoutIsChecked() throws {
        let m = try makeMemory()
        XCTAssertNil(SplitVirtqueue(size: 6, descriptorTable: desc, availableRing: avail, usedRing: used, memory: m), "not a power of two")
        XCTAssertNil(SplitVirtqueue(size: 0, descriptorTable: desc, availableRing: avail, usedRing: used, memory: m))
        XCTAssertNil(SplitVirtqueue(size: 8, descriptorTable: desc + 8, availableRing: avail, usedRing: used, memory: m), "descriptors 16-aligned")
        XCTAssertNil(SplitVirtqueue(size: 8, descriptorTable: desc, availableRing: avail + 1, usedRing: used, memory: m), "avail 2-aligned")
        XCTAssertNil(SplitVirtqueue(size: 8, descriptorTable: desc, availableRing: avail, usedRing: used + 2, memory: m), "used 4-aligned")
        XCTAssertNil(SplitVirtqueue(size: 1024, descriptorTable: 0xFF000, availableRing: avail, usedRing: used, memory: m), "table past RAM")
        XCTAssertNil(SplitVirtqueue(size: 8, descriptorTable: desc, availableRing: avail, usedRing: UInt64.max - 3, memory: m))
    }

    func testNoInterruptFlag() throws {
        let m = try makeMemory()
        var q = try queue(m)
        XCTAssertTrue(q.needsInterrupt(m))
        put(m, UInt16(1), at: avail)
        XCTAssertFalse(q.needsInterrupt(m))
    }

    /// VIRTIO_RING_F_EVENT_IDX (virtio 1.2 §2.7.7, §2.7.10): interrupts only when the used index
    /// passes the driver's used_event, and the device's avail_event asks for the next kick.
    func testEventIndexSuppression() throws {
        let m = try makeMemory()
        var q = try queue(m)
        q.eventIndex = true
        let usedEvent = avail + 4 + 2 * 8, availEvent = used + 4 + 8 * 8
        for i in UInt16(0)..<4 { descriptor(m, i, address: 0x8000 + 0x100 * UInt64(i), length: 16, flags: 2) }
        put(m, UInt16(1), at: avail)  // NO_INTERRUPT is ignored under event indices

        // The driver wants an interrupt once the first buffer is used (used_event 0).
        put(m, UInt16(0), at: usedEvent)
        offer(m, head: 0, slot: 0, index: 1)
        var chain = try XCTUnwrap(q.next(m)).get()
        q.complete(head: chain.head, written: 0, m)
        XCTAssertTrue(q.needsInterrupt(m), "used index 1 passed used_event 0")
        XCTAssertNil(q.next(m))
        XCTAssertEqual(get(m, UInt16.self, at: availEvent), 1, "the device asks for a kick at the next chain")

        // used_event 2: no interrupt for the second buffer, one for the third.
        put(m, UInt16(2), at: usedEvent)
        offer(m, head: 1, slot: 1, index: 2)
        chain = try XCTUnwrap(q.next(m)).get()
        q.complete(head: chain.head, written: 0, m)
        XCTAssertFalse(q.needsInterrupt(m), "used index 2 has not passed used_event 2")
        offer(m, head: 2, slot: 2, index: 3)
        chain = try XCTUnwrap(q.next(m)).get()
        q.complete(head: chain.head, written: 0, m)
        XCTAssertTrue(q.needsInterrupt(m), "used index 3 passed used_event 2")
        XCTAssertFalse(q.needsInterrupt(m), "nothing new since")

        // Two completions at once that jump over used_event still interrupt once.
        put(m, UInt16(3), at: usedEvent)
        offer(m, head: 3, slot: 3, index: 4)
        offer(m, head: 0, slot: 4, index: 5)
        for _ in 0..<2 {
            chain = try XCTUnwrap(q.next(m)).get()
            q.complete(head: chain.head, written: 0, m)
        }
        XCTAssertTrue(q.needsInterrupt(m))
        XCTAssertNil(q.next(m))
        XCTAssertEqual(get(m, UInt16.self, at: availEvent), 5)
    }
}

import Atomics
import Glibc

/// One buffer of a descriptor chain: guest-physical address and length, already checked to lie
/// wholly inside guest RAM.
public struct VirtqueueBuffer: Equatable, Sendable {
    public let address: UInt64
    public let length: UInt32
}

/// A request taken from a virtqueue: the buffers the device reads (driver → device), then the
/// buffers it writes (device → driver), as the virtio spec orders them.
public struct DescriptorChain: Equatable, Sendable {
    /// The head descriptor's index: what `SplitVirtqueue.complete` hands back.
    public let head: UInt16
    public let readable: [VirtqueueBuffer]
    public let writable: [VirtqueueBuffer]
    public var readableLength: UInt64 { readable.reduce(0) { $0 + UInt64($1.length) } }
    public var writableLength: UInt64 { writable.reduce(0) { $0 + UInt64($1.length) } }
}

/// Why a chain was refused. The request fails; the queue and the device go on.
public enum DescriptorChainError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The available ring named a descriptor index past the queue size.
    case headOutOfRange(UInt16)
    /// A `next` field pointed past the queue size.
    case nextOutOfRange(UInt16)
    /// The chain is longer than the queue: it loops.
    case loop(head: UInt16)
    /// A buffer is not wholly inside guest RAM.
    case bufferOutsideRAM(address: UInt64, length: UInt32)
    /// A readable descriptor follows a writable one (the spec forbids it).
    case readableAfterWritable(head: UInt16)
    /// VIRTQ_DESC_F_INDIRECT, which this queue did not offer.
    case indirectNotNegotiated(head: UInt16)
    /// The ring itself could not be read (its addresses left guest RAM).
    case ringUnreadable

    public var description: String {
        switch self {
        case .headOutOfRange(let i): return "the available ring names descriptor \(i), past the queue"
        case .nextOutOfRange(let i): return "a descriptor's next is \(i), past the queue"
        case .loop(let h): return "the chain at descriptor \(h) loops"
        case .bufferOutsideRAM(let a, let l): return "a buffer [0x\(String(a, radix: 16)), +\(l)) is not guest RAM"
        case .readableAfterWritable(let h): return "the chain at descriptor \(h) has a readable buffer after a writable one"
        case .indirectNotNegotiated(let h): return "the chain at descriptor \(h) uses indirect descriptors, which were not offered"
        case .ringUnreadable: return "the queue's rings are not in guest RAM"
        }
    }
}

/// The device side of a split virtqueue (virtio 1.2 §2.7): it takes chains the driver made
/// available and returns them as used.
///
/// Everything the guest wrote is untrusted and may change under us: each descriptor is copied out
/// once, then checked (index in range, buffer inside guest RAM, chain no longer than the queue,
/// readable before writable). A bad chain is an error for that request only.
public struct SplitVirtqueue: Sendable {
    public let size: UInt16
    public let descriptorTable: UInt64
    public let availableRing: UInt64
    public let usedRing: UInt64
    /// The next available-ring slot the device will take.
    public private(set) var nextAvailable: UInt16 = 0
    /// The used ring's index as the device last published it.
    public private(set) var usedIndex: UInt16 = 0
    /// The head of the chain `next` last took, when it was a valid index: a refused chain is
    /// still completed (with nothing written), so the driver does not wait for it forever.
    public private(set) var lastHead: UInt16?
    /// VIRTIO_RING_F_EVENT_IDX was negotiated: the driver says when it wants an interrupt
    /// (used_event) and the device when it wants a notification (avail_event).
    public var eventIndex = false
    /// The used index when the device last decided about an interrupt.
    private var signalledUsedIndex: UInt16 = 0

    static let descriptorSize: UInt64 = 16
    static let flagNext: UInt16 = 1, flagWrite: UInt16 = 2, flagIndirect: UInt16 = 4

    /// Checks the layout the driver programmed: a power-of-two size up to 32768, each ring aligned
    /// as the spec requires and wholly inside guest RAM. Nil when any of that fails.
    public init?(size: UInt16, descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64, memory: GuestMemory) {
        guard size > 0, size <= 32768, size & (size - 1) == 0,
              descriptorTable % 16 == 0, availableRing % 2 == 0, usedRing % 4 == 0 else { return nil }
        let n = UInt64(size)
        guard memory.translate(descriptorTable, count: 16 * n) != nil,
              memory.translate(availableRing, count: 6 + 2 * n) != nil,
              memory.translate(usedRing, count: 6 + 8 * n) != nil else { return nil }
        self.size = size
        self.descriptorTable = descriptorTable
        self.availableRing = availableRing
        self.usedRing = usedRing
    }

    /// Resumes a queue at saved indices (a restarted device).
    public mutating func restore(nextAvailable: UInt16, usedIndex: UInt16) {
        self.nextAvailable = nextAvailable
        self.usedIndex = usedIndex
    }

    private func load16(_ memory: GuestMemory, _ address: UInt64) -> UInt16? {
        guard let p = memory.translate(address, count: 2) else { return nil }
        return UInt16(littleEndian: p.loadUnaligned(as: UInt16.self))
    }

    /// The next available chain: nil when the driver has made nothing new available;
    /// `.failure` for a chain that breaks the rules (its head, if valid, is still to be completed).
    public mutating func next(_ memory: GuestMemory) -> Result<DescriptorChain, DescriptorChainError>? {
        guard let availableIndex = load16(memory, availableRing + 2) else { return .failure(.ringUnreadable) }
        if availableIndex == nextAvailable {
            guard eventIndex, let availEvent = memory.translate(usedRing + 4 + 8 * UInt64(size), count: 2) else { return nil }
            // Ask for a notification when the next chain arrives, then look once more: the driver
            // may have added one before it could see the request.
            availEvent.storeBytes(of: nextAvailable.littleEndian, as: UInt16.self)
            memory.markDirty(usedRing + 4 + 8 * UInt64(size), count: 2)
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            guard let again = load16(memory, availableRing + 2), again != nextAvailable else { return nil }
        }
        // The ring entry is read after the index (acquire), as the driver wrote it before.
        atomicMemoryFence(ordering: .acquiring)
        guard let head = load16(memory, availableRing + 4 + 2 * UInt64(nextAvailable % size)) else {
            return .failure(.ringUnreadable)
        }
        nextAvailable &+= 1
        lastHead = head < size ? head : nil
        guard head < size else { return .failure(.headOutOfRange(head)) }
        return walk(head, memory).map { $0 }
    }

    /// Takes chain `head` again, without touching the available ring: a restarted device
    /// resubmitting what its predecessor had taken and not completed (the in-flight record).
    public mutating func retake(head: UInt16, _ memory: GuestMemory) -> Result<DescriptorChain, DescriptorChainError> {
        lastHead = head < size ? head : nil
        guard head < size else { return .failure(.headOutOfRange(head)) }
        return walk(head, memory)
    }

    /// The head the driver published at available-ring position `position`, if it has published
    /// that far (nil otherwise or when unreadable).
    public func availableHead(at position: UInt16, _ memory: GuestMemory) -> UInt16? {
        guard let published = load16(memory, availableRing + 2), published != position else { return nil }
        return load16(memory, availableRing + 4 + 2 * UInt64(position % size))
    }

    /// The used index as it stands in guest memory (the device's own, unless a hostile driver
    /// wrote over it).
    public func publishedUsedIndex(_ memory: GuestMemory) -> UInt16? { load16(memory, usedRing + 2) }

    private func walk(_ head: UInt16, _ memory: GuestMemory) -> Result<DescriptorChain, DescriptorChainError> {
        var readable: [VirtqueueBuffer] = [], writable: [VirtqueueBuffer] = []
        var index = head
        for _ in 0..<Int(size) {
            guard let p = memory.translate(descriptorTable + Self.descriptorSize * UInt64(index), count: Self.descriptorSize) else {
                return .failure(.ringUnreadable)
            }
            // Copy the descriptor out once; the guest may rewrite it meanwhile.
            let address = UInt64(littleEndian: p.loadUnaligned(as: UInt64.self))
            let length = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let flags = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
            let next = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
            if flags & Self.flagIndirect != 0 { return .failure(.indirectNotNegotiated(head: head)) }
            if length > 0 && memory.translate(address, count: UInt64(length)) == nil {
                return .failure(.bufferOutsideRAM(address: address, length: length))
            }
            let buffer = VirtqueueBuffer(address: address, length: length)
            if flags & Self.flagWrite != 0 {
                writable.append(buffer)
            } else {
                guard writable.isEmpty else { return .failure(.readableAfterWritable(head: head)) }
                readable.append(buffer)
            }
            guard flags & Self.flagNext != 0 else {
                return .success(DescriptorChain(head: head, readable: readable, writable: writable))
            }
            guard next < size else { return .failure(.nextOutOfRange(next)) }
            index = next
        }
        return .failure(.loop(head: head))
    }

    /// Returns chain `head` to the driver, saying `written` bytes of its writable buffers hold
    /// data. The used element is written before the index is published (release). While a dirty
    /// log is set, the chain's writable buffers and the used ring are logged as written.
    public mutating func complete(head: UInt16, written: UInt32, _ memory: GuestMemory) {
        let slot = usedRing + 4 + 8 * UInt64(usedIndex % size)
        guard let element = memory.translate(slot, count: 8), let index = memory.translate(usedRing + 2, count: 2) else { return }
        if memory.dirtyLog != nil, head < size, case .success(let chain) = walk(head, memory) {
            // Whatever the device wrote, it wrote into these (the chain as it stands now: a guest
            // that rewrote its descriptors meanwhile only spoils its own migration).
            for b in chain.writable { memory.markDirty(b.address, count: UInt64(b.length)) }
        }
        element.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
        element.storeBytes(of: written.littleEndian, toByteOffset: 4, as: UInt32.self)
        usedIndex &+= 1
        atomicMemoryFence(ordering: .releasing)
        index.storeBytes(of: usedIndex.littleEndian, as: UInt16.self)
        memory.markDirty(usedRing, count: 4 + 8 * UInt64(size))
    }

    /// Whether the driver wants an interrupt for the buffers used since the last call: with event
    /// indices, when the used index passed the driver's used_event; otherwise when
    /// VIRTQ_AVAIL_F_NO_INTERRUPT is clear.
    public mutating func needsInterrupt(_ memory: GuestMemory) -> Bool {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        guard eventIndex else { return (load16(memory, availableRing) ?? 0) & 1 == 0 }
        let old = signalledUsedIndex
        signalledUsedIndex = usedIndex
        guard let usedEvent = load16(memory, availableRing + 4 + 2 * UInt64(size)) else { return true }
        // vring_need_event: did the used index step over used_event since the last decision?
        return usedIndex &- usedEvent &- 1 < usedIndex &- old
    }
}

extension DescriptorChain {
    /// Bytes `[skipping, skipping + count)` of the chain's readable buffers (`writable` false) or
    /// writable buffers (true), as iovecs pointing into guest RAM: for vectored host I/O
    /// (`preadv`/`pwritev`) straight to or from the guest's buffers, with no copy. Nil when the
    /// buffers hold fewer bytes.
    ///
    /// Unsafe assumptions: the pointers are valid while `memory` lives (the device's whole life);
    /// every buffer was checked to lie inside guest RAM when the chain was taken; the guest may
    /// change the bytes while the I/O runs, which only affects its own data.
    public func ioVectors(writable: Bool, skipping: UInt64, count: UInt64, _ memory: GuestMemory) -> [iovec]? {
        var vectors: [iovec] = []
        var skip = skipping, left = count
        for b in (writable ? self.writable : readable) where left > 0 {
            if skip >= UInt64(b.length) {
                skip -= UInt64(b.length)
                continue
            }
            let n = min(UInt64(b.length) - skip, left)
            guard let p = memory.translate(b.address + skip, count: n) else { return nil }
            vectors.append(iovec(iov_base: p, iov_len: Int(n)))
            left -= n
            skip = 0
        }
        return left == 0 ? vectors : nil
    }

    /// The readable buffers' bytes, concatenated (at most `limit` bytes).
    public func readAll(_ memory: GuestMemory, limit: Int = 1 << 20) -> [UInt8] {
        var out: [UInt8] = []
        for b in readable {
            let n = min(Int(b.length), limit - out.count)
            guard n > 0, let p = memory.translate(b.address, count: UInt64(n)) else { break }
            out += UnsafeRawBufferPointer(start: p, count: n)
        }
        return out
    }

    /// Writes `bytes` across the writable buffers in order, starting `offset` bytes in; returns
    /// how many bytes fit.
    @discardableResult
    public func write(_ bytes: [UInt8], at offset: UInt64 = 0, _ memory: GuestMemory) -> Int {
        var skip = offset, done = 0
        for b in writable where done < bytes.count {
            if skip >= UInt64(b.length) {
                skip -= UInt64(b.length)
                continue
            }
            let n = min(Int(UInt64(b.length) - skip), bytes.count - done)
            guard let p = memory.translate(b.address + skip, count: UInt64(n)) else { break }
            bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + done, byteCount: n) }
            done += n
            skip = 0
        }
        return done
    }
}

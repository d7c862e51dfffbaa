import Atomics
import Glibc
import HVSys

/// Byte layout of a frame port region (normative: ipc-schema/README.md §17, "Frame ports").
///
/// A frame port joins one NIC process to its network segment's switch: two single-producer/
/// single-consumer rings of Ethernet frames in one shared memfd. `uplink` carries frames the
/// NIC sends (NIC → switch), `downlink` frames the NIC receives (switch → NIC).
public enum FramePortLayout {
    /// "HVFP" as a little-endian u32.
    public static let magic: UInt32 = 0x5046_5648
    public static let version: UInt16 = 1
    public static let headerSize = 4096

    public static let magicOffset = 0
    public static let versionOffset = 4
    public static let slotCountOffset = 8
    public static let slotSizeOffset = 12

    /// Per ring, four u32s, each on its own 64-byte cache line: producer index, consumer index,
    /// consumer-sleeping flag, producer-waiting (ring full) flag.
    public static let uplinkControlOffset = 64
    public static let downlinkControlOffset = 320
    public static let producerLine = 0, consumerLine = 64, consumerSleepingLine = 128, producerWaitingLine = 192

    /// Each slot: u32 frame length, u32 reserved (0), then the frame.
    public static let slotHeaderSize = 8
    public static let defaultSlotCount: UInt32 = 256
    public static let slotSize: UInt32 = 2048
    /// The largest frame a slot holds (an Ethernet frame without FCS, VLAN tag included, fits).
    public static var maximumFrame: Int { Int(slotSize) - slotHeaderSize }
    /// The smallest frame a port carries: an Ethernet header.
    public static let minimumFrame = 14

    /// Total bytes of a port with `slotCount` slots in each direction.
    public static func size(slotCount: UInt32) -> Int {
        headerSize + 2 * Int(slotCount) * Int(slotSize)
    }
}

/// Why a frame port could not be used.
public enum FramePortError: Error, Equatable, Sendable, CustomStringConvertible {
    case badHeader(String)
    case system(String)

    public var description: String {
        switch self {
        case .badHeader(let why): return "frame port header invalid: \(why)"
        case .system(let why): return "frame port: \(why)"
        }
    }
}

/// One side's view of a frame port (see `FramePortLayout`).
///
/// Indices are free-running u32s (slot = index & (count − 1)), published with release stores,
/// read with acquire loads. Each side keeps the indices it owns privately and only publishes
/// them, so a peer scribbling on the shared page cannot rewind them; every index read from the
/// peer is checked to lie within one ring's worth of our own, and every frame length is checked
/// against the slot. A corrupt index reads as "nothing to take" / "no space", never as an
/// out-of-bounds access.
///
/// Wake-ups: a consumer about to sleep sets its ring's `consumerSleeping` flag, fences and looks
/// again; a producer that finds its ring full sets `producerWaiting`, fences and looks again.
/// `flush()` fences and signals the peer's eventfd only when the peer asked for it.
///
/// This is one of hv's audited raw-pointer holders. Unsafe assumptions:
/// - `mapping` covers `FramePortLayout.size(slotCount:)` bytes, checked at init against the header
///   (the memfd is sealed against shrinking by `MemFD.create`);
/// - the peer may write any byte at any time, so frames are handed out as transient views of the
///   slot that callers copy once (they never re-read a slot to re-validate it);
/// - slot arithmetic is masked with `slotCount − 1`, so no computed address leaves the mapping.
public final class FramePort: @unchecked Sendable {
    // @unchecked: each side drives its view from one thread.
    public enum Side: Sendable {
        /// The NIC: produces on the uplink, consumes the downlink.
        case nic
        /// The switch: produces on the downlink, consumes the uplink.
        case segment
    }

    private struct Ring {
        let producer: UnsafeAtomic<UInt32>
        let consumer: UnsafeAtomic<UInt32>
        let consumerSleeping: UnsafeAtomic<UInt32>
        let producerWaiting: UnsafeAtomic<UInt32>
        let slots: UnsafeMutableRawPointer
    }

    private let mapping: SharedMapping
    /// Slots per direction (a power of two).
    public let slotCount: UInt32
    private let outbound: Ring
    private let inbound: Ring
    /// The peer's doorbell: signalled when it has frames to take or space to send into.
    private let peer: EventFD
    // Our own indices, authoritative on this side.
    private var produced: UInt32
    private var consumed: UInt32
    private var publishedSinceFlush = false
    private var consumedSinceFlush = false
    /// Frames the peer published with an impossible index or length (a broken or hostile peer).
    public private(set) var corruptions: UInt64 = 0

    /// Formats a new port region (the trusted side does this, then hands the memfd to both ends).
    public static func create(slotCount: UInt32 = FramePortLayout.defaultSlotCount, name: String) throws(FramePortError) -> FileDescriptor {
        guard slotCount >= 2, slotCount <= 4096, slotCount & (slotCount - 1) == 0 else {
            throw .badHeader("slot count \(slotCount) is not a power of two from 2 to 4096")
        }
        let size = FramePortLayout.size(slotCount: slotCount)
        do {
            let fd = try MemFD.create(name: name, size: size)
            let map = try SharedMapping(fd: fd, count: FramePortLayout.headerSize)
            map.base.storeBytes(of: FramePortLayout.magic.littleEndian, toByteOffset: FramePortLayout.magicOffset, as: UInt32.self)
            map.base.storeBytes(of: FramePortLayout.version.littleEndian, toByteOffset: FramePortLayout.versionOffset, as: UInt16.self)
            map.base.storeBytes(of: slotCount.littleEndian, toByteOffset: FramePortLayout.slotCountOffset, as: UInt32.self)
            map.base.storeBytes(of: FramePortLayout.slotSize.littleEndian, toByteOffset: FramePortLayout.slotSizeOffset, as: UInt32.self)
            return fd
        } catch {
            throw .system("\(error)")
        }
    }

    /// Maps a port region handed over as `fd`, as `side`; `peer` is the other side's eventfd.
    public init(fd: FileDescriptor, side: Side, peer: EventFD) throws(FramePortError) {
        let header: SharedMapping
        do { header = try SharedMapping(fd: fd, count: FramePortLayout.headerSize, readOnly: true) } catch { throw .system("\(error)") }
        func u32(_ offset: Int) -> UInt32 { UInt32(littleEndian: header.base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
        guard u32(FramePortLayout.magicOffset) == FramePortLayout.magic else { throw .badHeader("magic is not HVFP") }
        let version = UInt16(littleEndian: header.base.loadUnaligned(fromByteOffset: FramePortLayout.versionOffset, as: UInt16.self))
        guard version == FramePortLayout.version else { throw .badHeader("version \(version), expected \(FramePortLayout.version)") }
        let count = u32(FramePortLayout.slotCountOffset)
        guard count >= 2, count <= 4096, count & (count - 1) == 0 else { throw .badHeader("slot count \(count) is not a power of two from 2 to 4096") }
        guard u32(FramePortLayout.slotSizeOffset) == FramePortLayout.slotSize else { throw .badHeader("slot size is not \(FramePortLayout.slotSize)") }
        let size = FramePortLayout.size(slotCount: count)
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0, Int(st.st_size) >= size else { throw .badHeader("region is smaller than \(size) bytes") }
        do { mapping = try SharedMapping(fd: fd, count: size) } catch { throw .system("\(error)") }
        slotCount = count
        self.peer = peer
        let base = mapping.base
        func ring(_ control: Int, _ slots: Int) -> Ring {
            func atomic(_ line: Int) -> UnsafeAtomic<UInt32> {
                // The header page is page-aligned and each line offset is 64-byte aligned.
                UnsafeAtomic(at: (base + control + line).assumingMemoryBound(to: UnsafeAtomic<UInt32>.Storage.self))
            }
            return Ring(producer: atomic(FramePortLayout.producerLine), consumer: atomic(FramePortLayout.consumerLine),
                        consumerSleeping: atomic(FramePortLayout.consumerSleepingLine),
                        producerWaiting: atomic(FramePortLayout.producerWaitingLine), slots: base + slots)
        }
        let uplink = ring(FramePortLayout.uplinkControlOffset, FramePortLayout.headerSize)
        let downlink = ring(FramePortLayout.downlinkControlOffset, FramePortLayout.headerSize + Int(count) * Int(FramePortLayout.slotSize))
        (outbound, inbound) = side == .nic ? (uplink, downlink) : (downlink, uplink)
        // Resume where the previous holder of this side left off (a restarted NIC process).
        produced = outbound.producer.load(ordering: .relaxed)
        consumed = inbound.consumer.load(ordering: .relaxed)
    }

    private func slot(_ ring: Ring, _ index: UInt32) -> UnsafeMutableRawPointer {
        ring.slots + Int(index & (slotCount - 1)) * Int(FramePortLayout.slotSize)
    }

    /// Frames we may still send before the ring is full (0 also when the peer's index is corrupt).
    public var outboundSpace: Int {
        let used = produced &- outbound.consumer.load(ordering: .acquiring)
        return used > slotCount ? 0 : Int(slotCount - used)
    }

    /// With the outbound ring full: asks the peer to signal when it frees a slot, and returns
    /// true if one was freed meanwhile (then send now).
    public func waitForSpace() -> Bool {
        outbound.producerWaiting.store(1, ordering: .sequentiallyConsistent)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        guard outboundSpace > 0 else { return false }
        outbound.producerWaiting.store(0, ordering: .relaxed)
        return true
    }

    /// Sends one frame of `length` bytes, written by `fill` into the slot. Returns false when the
    /// ring is full; the peer is then asked to signal when it frees a slot.
    public func send(length: Int, _ fill: (UnsafeMutableRawBufferPointer) -> Void) -> Bool {
        precondition(length >= 0 && length <= FramePortLayout.maximumFrame, "frame length out of range")
        if outboundSpace == 0 && !waitForSpace() { return false }
        let p = slot(outbound, produced)
        p.storeBytes(of: UInt32(length).littleEndian, as: UInt32.self)
        p.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        fill(UnsafeMutableRawBufferPointer(start: p + FramePortLayout.slotHeaderSize, count: length))
        produced &+= 1
        outbound.producer.store(produced, ordering: .releasing)
        publishedSinceFlush = true
        return true
    }

    /// Sends a copy of `frame`; false when the ring is full.
    public func send(_ frame: UnsafeRawBufferPointer) -> Bool {
        send(length: frame.count) { $0.copyMemory(from: frame) }
    }

    /// Frames waiting to be taken (0 when the peer's index is corrupt).
    public var inboundCount: Int {
        let waiting = inbound.producer.load(ordering: .acquiring) &- consumed
        return waiting > slotCount ? 0 : Int(waiting)
    }

    /// Takes the next frame, handing `body` a view of it valid only during the call, and returns
    /// true; false when none is waiting. A frame whose length is impossible is skipped and counted.
    public func receive(_ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        let available = inbound.producer.load(ordering: .acquiring) &- consumed
        guard available != 0 else { return false }
        guard available <= slotCount else {
            corruptions &+= 1
            return false
        }
        let p = slot(inbound, consumed)
        let length = Int(UInt32(littleEndian: p.loadUnaligned(as: UInt32.self)))
        if length >= FramePortLayout.minimumFrame && length <= FramePortLayout.maximumFrame {
            body(UnsafeRawBufferPointer(start: p + FramePortLayout.slotHeaderSize, count: length))
        } else {
            corruptions &+= 1
        }
        consumed &+= 1
        inbound.consumer.store(consumed, ordering: .releasing)
        consumedSinceFlush = true
        return true
    }

    /// Length of the next waiting frame without taking it (nil when none, or it is invalid).
    public var nextInboundLength: Int? {
        let available = inbound.producer.load(ordering: .acquiring) &- consumed
        guard available != 0, available <= slotCount else { return nil }
        let length = Int(UInt32(littleEndian: slot(inbound, consumed).loadUnaligned(as: UInt32.self)))
        return length >= FramePortLayout.minimumFrame && length <= FramePortLayout.maximumFrame ? length : nil
    }

    /// Signals the peer once if, since the last flush, we published frames it is sleeping on or
    /// freed slots it is waiting for.
    public func flush() {
        guard publishedSinceFlush || consumedSinceFlush else { return }
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        var wake = false
        if publishedSinceFlush && outbound.consumerSleeping.load(ordering: .relaxed) != 0 { wake = true }
        if consumedSinceFlush && inbound.producerWaiting.load(ordering: .relaxed) != 0 {
            inbound.producerWaiting.store(0, ordering: .relaxed)
            wake = true
        }
        publishedSinceFlush = false
        consumedSinceFlush = false
        if wake { peer.signal() }
    }

    /// Before sleeping on our eventfd: asks the peer to signal new frames, and returns false if
    /// some arrived meanwhile (then do not sleep).
    public func prepareToSleep() -> Bool {
        inbound.consumerSleeping.store(1, ordering: .sequentiallyConsistent)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if inbound.producer.load(ordering: .acquiring) != consumed {
            inbound.consumerSleeping.store(0, ordering: .relaxed)
            return false
        }
        return true
    }

    /// Asks the peer to signal every frame it publishes from now on, for a consumer that never
    /// sleeps in `prepareToSleep` (it polls our eventfd among other things). Unlike
    /// `prepareToSleep`, the request stands even when frames are already waiting — then it
    /// returns true, and the caller must take them without waiting for a signal (which, for those
    /// frames, already went or never comes).
    public func requestSignalsForEveryFrame() -> Bool {
        inbound.consumerSleeping.store(1, ordering: .sequentiallyConsistent)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return inbound.producer.load(ordering: .acquiring) != consumed
    }

    /// After waking: stop asking for signals while we are busy.
    public func awake() {
        inbound.consumerSleeping.store(0, ordering: .relaxed)
    }
}

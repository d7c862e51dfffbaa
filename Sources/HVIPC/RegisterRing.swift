import Atomics
import HVSys

/// Byte layout of a register ring region (normative: ipc-schema/messages.json, "ring").
public enum RingLayout {
    /// "HVRG" as a little-endian u32.
    public static let magic: UInt32 = 0x4752_5648
    public static let version: UInt16 = 1
    /// The header page; entries start after it.
    public static let headerSize = 4096

    public static let magicOffset = 0
    public static let versionOffset = 4
    public static let requestCapacityOffset = 8
    public static let responseCapacityOffset = 12
    public static let requestEntrySizeOffset = 16
    public static let responseEntrySizeOffset = 20
    // Each index and flag sits on its own 64-byte cache line, so producer and consumer never
    // write the same line.
    public static let requestProducerOffset = 64
    public static let requestConsumerOffset = 128
    public static let requestConsumerSleepingOffset = 192
    public static let responseProducerOffset = 256
    public static let responseConsumerOffset = 320
    public static let responseConsumerSleepingOffset = 384
    /// The request the device is serving, and whether it is at it (device-written).
    public static let requestServingOffset = 448
    public static let requestServingActiveOffset = 512
    /// A request the device must answer without serving (core-written, while no device runs).
    public static let poisonedRequestOffset = 576
    public static let poisonedRequestValidOffset = 640

    public static let requestEntrySize = 32
    public static let responseEntrySize = 16

    /// Total bytes for the given capacities (both powers of two).
    public static func size(requestCapacity: UInt32, responseCapacity: UInt32) -> Int {
        headerSize + Int(requestCapacity) * requestEntrySize + Int(responseCapacity) * responseEntrySize
    }
}

/// One forwarded guest register access.
public struct RegisterRequest: Equatable, Sendable {
    public enum Operation: UInt8, Sendable {
        case pioRead = 1, pioWrite = 2, mmioRead = 3, mmioWrite = 4, configRead = 5, configWrite = 6
        public var isRead: Bool { self == .pioRead || self == .mmioRead || self == .configRead }
    }
    public var operation: Operation
    /// Access width in bytes: 1, 2, 4 or 8.
    public var size: UInt8
    /// Index into the device's HELLO resource table.
    public var resource: UInt16
    /// The vCPU that made the access (diagnostics only).
    public var vcpu: UInt32
    /// Offset from the resource's base.
    public var offset: UInt64
    /// Value written (writes); zero for reads.
    public var data: UInt64
    /// Sequence number; a read's response echoes it.
    public var tag: UInt64

    public init(operation: Operation, size: UInt8, resource: UInt16, vcpu: UInt32, offset: UInt64, data: UInt64, tag: UInt64) {
        self.operation = operation
        self.size = size
        self.resource = resource
        self.vcpu = vcpu
        self.offset = offset
        self.data = data
        self.tag = tag
    }
}

/// The answer to a read.
public struct RegisterResponse: Equatable, Sendable {
    public var tag: UInt64
    public var data: UInt64
    public init(tag: UInt64, data: UInt64) {
        self.tag = tag
        self.data = data
    }
}

/// Why a ring could not be used.
public enum RingError: Error, Equatable, Sendable, CustomStringConvertible {
    case badHeader(String)
    case corruptIndex(String)
    case system(String)

    public var description: String {
        switch self {
        case .badHeader(let why): return "register ring header invalid: \(why)"
        case .corruptIndex(let why): return "register ring index corrupt: \(why)"
        case .system(let why): return "register ring: \(why)"
        }
    }
}

/// A pair of single-producer/single-consumer rings in shared memory: requests flow core → device,
/// responses device → core. Indices are free-running u32s (slot = index & (capacity − 1)),
/// published with release stores and read with acquire loads. A consumer about to sleep sets its
/// `sleeping` flag, issues a full fence and re-checks the producer index; a producer issues a
/// full fence after publishing and signals the peer's eventfd only if the flag is set. Together
/// the two fences rule out a lost wake-up.
///
/// This is one of hv's audited raw-pointer holders. Unsafe assumptions:
/// - `mapping` covers `RingLayout.size(...)` bytes, checked at init against the header;
/// - the peer may write any value to any byte at any time, so every index read from the peer's
///   side is validated before use, and entries are copied out once before being interpreted;
/// - slot arithmetic is masked with `capacity − 1`, so no computed address leaves the mapping.
public final class RegisterRing: @unchecked Sendable {
    // @unchecked: the mapping is shared by design; each method documents which side calls it,
    // and each side calls its methods from one thread at a time (the core under a lock).
    private let mapping: SharedMapping
    /// Entries in the request ring.
    public let requestCapacity: UInt32
    /// Entries in the response ring.
    public let responseCapacity: UInt32
    private let requestProducer: UnsafeAtomic<UInt32>
    private let requestConsumer: UnsafeAtomic<UInt32>
    private let requestConsumerSleeping: UnsafeAtomic<UInt32>
    private let responseProducer: UnsafeAtomic<UInt32>
    private let responseConsumer: UnsafeAtomic<UInt32>
    private let responseConsumerSleeping: UnsafeAtomic<UInt32>
    private let requestServing: UnsafeAtomic<UInt32>
    private let requestServingActive: UnsafeAtomic<UInt32>
    private let poisonedRequest: UnsafeAtomic<UInt32>
    private let poisonedRequestValid: UnsafeAtomic<UInt32>
    // Core side: the indices the core itself owns, kept privately so a device scribbling on the
    // shared page cannot rewind them. Only the core's (serialised) producer path touches these.
    private var coreRequestHead: UInt32 = 0
    private var coreResponseTail: UInt32 = 0

    /// Creates and initialises a ring region (core side). Capacities must be powers of two.
    public static func create(requestCapacity: UInt32 = 256, responseCapacity: UInt32 = 64) throws(RingError) -> (FileDescriptor, RegisterRing) {
        precondition(requestCapacity.nonzeroBitCount == 1 && responseCapacity.nonzeroBitCount == 1, "ring capacities are powers of two")
        let size = RingLayout.size(requestCapacity: requestCapacity, responseCapacity: responseCapacity)
        do {
            let fd = try MemFD.create(name: "hv-register-ring", size: size)
            let mapping = try SharedMapping(fd: fd, count: size)
            let base = mapping.base
            base.storeBytes(of: RingLayout.magic.littleEndian, toByteOffset: RingLayout.magicOffset, as: UInt32.self)
            base.storeBytes(of: RingLayout.version.littleEndian, toByteOffset: RingLayout.versionOffset, as: UInt16.self)
            base.storeBytes(of: requestCapacity.littleEndian, toByteOffset: RingLayout.requestCapacityOffset, as: UInt32.self)
            base.storeBytes(of: responseCapacity.littleEndian, toByteOffset: RingLayout.responseCapacityOffset, as: UInt32.self)
            base.storeBytes(of: UInt32(RingLayout.requestEntrySize).littleEndian, toByteOffset: RingLayout.requestEntrySizeOffset, as: UInt32.self)
            base.storeBytes(of: UInt32(RingLayout.responseEntrySize).littleEndian, toByteOffset: RingLayout.responseEntrySizeOffset, as: UInt32.self)
            return (fd, RegisterRing(mapping: mapping, requestCapacity: requestCapacity, responseCapacity: responseCapacity))
        } catch {
            throw .system(error.description)
        }
    }

    /// Maps and validates a ring region received from the peer (device side).
    public convenience init(attaching fd: FileDescriptor) throws(RingError) {
        let size: Int64
        do { size = try fd.size() } catch { throw .system(error.description) }
        guard size >= Int64(RingLayout.headerSize), size <= 16 << 20 else { throw .badHeader("region size \(size)") }
        let mapping: SharedMapping
        do { mapping = try SharedMapping(fd: fd, count: Int(size)) } catch { throw .system(error.description) }
        let base = mapping.base
        func u32(_ offset: Int) -> UInt32 { UInt32(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
        guard u32(RingLayout.magicOffset) == RingLayout.magic else { throw .badHeader("magic") }
        let version = UInt16(littleEndian: base.loadUnaligned(fromByteOffset: RingLayout.versionOffset, as: UInt16.self))
        guard version == RingLayout.version else { throw .badHeader("version \(version), expected \(RingLayout.version)") }
        let req = u32(RingLayout.requestCapacityOffset), resp = u32(RingLayout.responseCapacityOffset)
        guard req.nonzeroBitCount == 1, resp.nonzeroBitCount == 1, req <= 65536, resp <= 65536 else {
            throw .badHeader("capacities \(req)/\(resp) are not powers of two up to 65536")
        }
        guard u32(RingLayout.requestEntrySizeOffset) == UInt32(RingLayout.requestEntrySize),
              u32(RingLayout.responseEntrySizeOffset) == UInt32(RingLayout.responseEntrySize) else { throw .badHeader("entry sizes") }
        guard Int(size) >= RingLayout.size(requestCapacity: req, responseCapacity: resp) else { throw .badHeader("region too small for its capacities") }
        self.init(mapping: mapping, requestCapacity: req, responseCapacity: resp)
        // An attached view that plays the core's role continues from the published state.
        coreRequestHead = requestProducer.load(ordering: .acquiring)
        coreResponseTail = responseConsumer.load(ordering: .acquiring)
    }

    private init(mapping: SharedMapping, requestCapacity: UInt32, responseCapacity: UInt32) {
        self.mapping = mapping
        self.requestCapacity = requestCapacity
        self.responseCapacity = responseCapacity
        func atomic(_ offset: Int) -> UnsafeAtomic<UInt32> {
            // The header page is 4096-byte aligned (mmap), and every offset is a multiple of 64.
            UnsafeAtomic(at: (mapping.base + offset).assumingMemoryBound(to: UnsafeAtomic<UInt32>.Storage.self))
        }
        requestProducer = atomic(RingLayout.requestProducerOffset)
        requestConsumer = atomic(RingLayout.requestConsumerOffset)
        requestConsumerSleeping = atomic(RingLayout.requestConsumerSleepingOffset)
        responseProducer = atomic(RingLayout.responseProducerOffset)
        responseConsumer = atomic(RingLayout.responseConsumerOffset)
        responseConsumerSleeping = atomic(RingLayout.responseConsumerSleepingOffset)
        requestServing = atomic(RingLayout.requestServingOffset)
        requestServingActive = atomic(RingLayout.requestServingActiveOffset)
        poisonedRequest = atomic(RingLayout.poisonedRequestOffset)
        poisonedRequestValid = atomic(RingLayout.poisonedRequestValidOffset)
    }

    // MARK: Poison requests (a request that kills the device every time it is replayed)

    /// Device side: about to act on request `index` (before the model sees it).
    public func beginServing(_ index: UInt32) {
        requestServing.store(index, ordering: .releasing)
        requestServingActive.store(1, ordering: .releasing)
    }

    /// Device side: done with the request `beginServing` named.
    public func endServing() { requestServingActive.store(0, ordering: .releasing) }

    /// Device side: whether request `index` is one the core declared poisoned (answer it without serving it).
    public func isPoisoned(_ index: UInt32) -> Bool {
        poisonedRequestValid.load(ordering: .acquiring) != 0 && poisonedRequest.load(ordering: .acquiring) == index
    }

    /// Core side, after the device died: the request it was acting on, if it died at it and the
    /// index lies among the uncommitted requests (anything else is a hostile or stale value).
    public func requestBeingServed() -> UInt32? {
        guard requestServingActive.load(ordering: .acquiring) != 0 else { return nil }
        let index = requestServing.load(ordering: .acquiring)
        let committed = requestConsumer.load(ordering: .acquiring)
        // A consumer index more than a ring behind the core's head is corrupt: nothing it
        // implies can be trusted (found by the ipc-register-ring fuzz target).
        let outstanding = coreRequestHead &- committed
        guard outstanding <= requestCapacity else { return nil }
        return index &- committed < outstanding ? index : nil
    }

    /// Core side, while no device process runs: the device must answer request `index` without
    /// serving it. Clears the device's serving flag, which the dead process left set.
    public func poison(_ index: UInt32) {
        requestServingActive.store(0, ordering: .relaxed)
        poisonedRequest.store(index, ordering: .relaxed)
        poisonedRequestValid.store(1, ordering: .releasing)
    }

    /// Core side, while no device process runs: forgets a poisoned request the device has
    /// committed past.
    public func clearPoisonIfCommitted() {
        guard poisonedRequestValid.load(ordering: .acquiring) != 0 else { return }
        let committed = requestConsumer.load(ordering: .acquiring)
        if poisonedRequest.load(ordering: .relaxed) &- committed >= coreRequestHead &- committed {
            poisonedRequestValid.store(0, ordering: .releasing)
        }
    }

    private var requestBase: UnsafeMutableRawPointer { mapping.base + RingLayout.headerSize }
    private var responseBase: UnsafeMutableRawPointer {
        mapping.base + RingLayout.headerSize + Int(requestCapacity) * RingLayout.requestEntrySize
    }

    // MARK: Core side (request producer, response consumer)

    /// Publishes a request. Returns false when the ring is full. Throws when the device's
    /// consumer index is impossible (the device is then faulty).
    public func pushRequest(_ request: RegisterRequest) throws(RingError) -> Bool {
        let head = coreRequestHead
        let tail = requestConsumer.load(ordering: .acquiring)
        let used = head &- tail
        guard used <= requestCapacity else { throw .corruptIndex("request consumer \(tail) vs producer \(head)") }
        if used == requestCapacity { return false }
        let slot = requestBase + Int(head & (requestCapacity - 1)) * RingLayout.requestEntrySize
        slot.storeBytes(of: request.operation.rawValue, toByteOffset: 0, as: UInt8.self)
        slot.storeBytes(of: request.size, toByteOffset: 1, as: UInt8.self)
        slot.storeBytes(of: request.resource.littleEndian, toByteOffset: 2, as: UInt16.self)
        slot.storeBytes(of: request.vcpu.littleEndian, toByteOffset: 4, as: UInt32.self)
        slot.storeBytes(of: request.offset.littleEndian, toByteOffset: 8, as: UInt64.self)
        slot.storeBytes(of: request.data.littleEndian, toByteOffset: 16, as: UInt64.self)
        slot.storeBytes(of: request.tag.littleEndian, toByteOffset: 24, as: UInt64.self)
        coreRequestHead = head &+ 1
        requestProducer.store(coreRequestHead, ordering: .releasing)
        return true
    }

    /// After publishing: true when the device announced it is going to sleep and must be kicked.
    public func requestConsumerNeedsWakeup() -> Bool {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return requestConsumerSleeping.load(ordering: .relaxed) != 0
    }

    /// Requests published but not yet consumed.
    public func requestsOutstanding() -> UInt32 {
        min(coreRequestHead &- requestConsumer.load(ordering: .acquiring), requestCapacity)
    }

    /// Takes the next response, if any. Throws when the device's producer index is impossible.
    public func popResponse() throws(RingError) -> RegisterResponse? {
        let tail = coreResponseTail
        let head = responseProducer.load(ordering: .acquiring)
        let available = head &- tail
        guard available <= responseCapacity else { throw .corruptIndex("response producer \(head) vs consumer \(tail)") }
        if available == 0 { return nil }
        let slot = responseBase + Int(tail & (responseCapacity - 1)) * RingLayout.responseEntrySize
        let response = RegisterResponse(tag: UInt64(littleEndian: slot.load(fromByteOffset: 0, as: UInt64.self)),
                                        data: UInt64(littleEndian: slot.load(fromByteOffset: 8, as: UInt64.self)))
        coreResponseTail = tail &+ 1
        responseConsumer.store(coreResponseTail, ordering: .releasing)
        return response
    }

    /// Core announces it will sleep waiting for a response (true) or is awake again (false).
    /// Returns, after a full fence, whether a response is already available (then don't sleep).
    @discardableResult
    public func setResponseConsumerSleeping(_ sleeping: Bool) -> Bool {
        responseConsumerSleeping.store(sleeping ? 1 : 0, ordering: .relaxed)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return responseProducer.load(ordering: .acquiring) != coreResponseTail
    }

    // MARK: Device side (request consumer, response producer)

    /// The device's consumer index as last published (where a restarted device resumes).
    public func committedRequestIndex() -> UInt32 { requestConsumer.load(ordering: .relaxed) }

    /// The core's producer index (acquire: entries before it are visible).
    public func publishedRequestIndex() -> UInt32 { requestProducer.load(ordering: .acquiring) }

    /// Copies the request at free-running index `index` out of the ring.
    public func request(at index: UInt32) -> RegisterRequest? {
        let slot = requestBase + Int(index & (requestCapacity - 1)) * RingLayout.requestEntrySize
        guard let op = RegisterRequest.Operation(rawValue: slot.load(fromByteOffset: 0, as: UInt8.self)) else { return nil }
        return RegisterRequest(operation: op,
                               size: slot.load(fromByteOffset: 1, as: UInt8.self),
                               resource: UInt16(littleEndian: slot.load(fromByteOffset: 2, as: UInt16.self)),
                               vcpu: UInt32(littleEndian: slot.load(fromByteOffset: 4, as: UInt32.self)),
                               offset: UInt64(littleEndian: slot.load(fromByteOffset: 8, as: UInt64.self)),
                               data: UInt64(littleEndian: slot.load(fromByteOffset: 16, as: UInt64.self)),
                               tag: UInt64(littleEndian: slot.load(fromByteOffset: 24, as: UInt64.self)))
    }

    /// Marks every request before `index` as fully processed (its effects are durable).
    public func commitRequests(upTo index: UInt32) { requestConsumer.store(index, ordering: .releasing) }

    /// Device announces it will sleep (true) or is awake (false). Returns, after a full fence,
    /// whether requests beyond `cursor` are already published (then don't sleep).
    @discardableResult
    public func setRequestConsumerSleeping(_ sleeping: Bool, cursor: UInt32) -> Bool {
        requestConsumerSleeping.store(sleeping ? 1 : 0, ordering: .relaxed)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return requestProducer.load(ordering: .acquiring) != cursor
    }

    /// Publishes a response. Returns false when the response ring is full.
    public func pushResponse(_ response: RegisterResponse) -> Bool {
        let head = responseProducer.load(ordering: .relaxed)
        let tail = responseConsumer.load(ordering: .acquiring)
        if head &- tail >= responseCapacity { return false }
        let slot = responseBase + Int(head & (responseCapacity - 1)) * RingLayout.responseEntrySize
        slot.storeBytes(of: response.tag.littleEndian, toByteOffset: 0, as: UInt64.self)
        slot.storeBytes(of: response.data.littleEndian, toByteOffset: 8, as: UInt64.self)
        responseProducer.store(head &+ 1, ordering: .releasing)
        return true
    }

    /// After publishing a response: true when the core is asleep and must be signalled.
    public func responseConsumerNeedsWakeup() -> Bool {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return responseConsumerSleeping.load(ordering: .relaxed) != 0
    }
}

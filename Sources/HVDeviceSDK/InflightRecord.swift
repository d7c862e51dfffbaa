import Atomics

/// Storage the in-flight record lives in: the state page, or a plain buffer in tests.
public protocol InflightStorage: AnyObject {
    func loadBytes(at offset: Int, count: Int) -> [UInt8]
    func storeBytes(_ bytes: [UInt8], at offset: Int)
    func loadUInt16(at offset: Int) -> UInt16
    func storeUInt16(_ value: UInt16, at offset: Int)
    func loadByte(at offset: Int) -> UInt8
    func storeByte(_ value: UInt8, at offset: Int)
}

extension StatePage: InflightStorage {}

/// Which virtqueue chains a device that completes out of order has taken and not completed,
/// kept where its successor finds them after a crash (ipc-schema/README.md §11.2, modelled on
/// vhost-user's inflight I/O tracking). Every step is one store, in an order from which every
/// crash point can be recovered; `recover` treats every byte as hostile.
///
/// Layout from `offset`: "HVIF" u32, version u16, queue count u16; then per queue 136 bytes:
/// `taken` u16, `used` u16, `completing` u16, `serving` u16, a 128-byte map of heads in flight;
/// then per queue 4 bytes: `strike_head` u16, `strikes` u16 (a chain that crashed the device on
/// each of its last replays).
public struct InflightRecord {
    public static let magic: UInt32 = 0x4649_5648  // "HVIF"
    public static let version: UInt16 = 1
    public static let queueBytes = 136
    public static let mapBytes = 128
    public static let maximumQueueSize = 1024
    public static let noHead: UInt16 = 0xFFFF
    /// Replays in a row a chain may crash the device before it is completed with an error instead.
    public static let strikesToSkip: UInt16 = 3

    public let storage: InflightStorage
    public let offset: Int
    public let queueCount: Int

    public init(storage: InflightStorage, offset: Int, queueCount: Int) {
        self.storage = storage
        self.offset = offset
        self.queueCount = queueCount
    }

    /// Bytes the record takes.
    public static func size(queueCount: Int) -> Int { 8 + queueCount * (queueBytes + 4) }

    private func queue(_ q: Int) -> Int { offset + 8 + q * Self.queueBytes }
    private func strikes(_ q: Int) -> Int { offset + 8 + queueCount * Self.queueBytes + q * 4 }

    /// A fresh record: no queue has taken anything (at first start, and on a driver's reset).
    public func clear() {
        var bytes = [UInt8](repeating: 0, count: Self.size(queueCount: queueCount))
        for i in 0..<4 { bytes[i] = UInt8(truncatingIfNeeded: Self.magic >> (8 * UInt32(i))) }
        bytes[4] = UInt8(Self.version)
        bytes[6] = UInt8(truncatingIfNeeded: queueCount)
        bytes[7] = UInt8(truncatingIfNeeded: queueCount >> 8)
        for q in 0..<queueCount {
            for field in [4, 6] { bytes[8 + q * Self.queueBytes + field] = 0xFF; bytes[8 + q * Self.queueBytes + field + 1] = 0xFF }
            bytes[8 + queueCount * Self.queueBytes + q * 4] = 0xFF
            bytes[8 + queueCount * Self.queueBytes + q * 4 + 1] = 0xFF
        }
        storage.storeBytes(bytes, at: offset)
    }

    /// Queue `q` newly enabled: it has taken and completed nothing.
    public func resetQueue(_ q: Int) { store(q, heads: [], taken: 0, used: 0) }

    /// Step 1 of taking a chain: mark its head (nil: the entry named no valid head), then count it.
    public func taken(_ q: Int, head: UInt16?, takenCount: UInt16) {
        if let head { setBit(q, head, true) }
        barrier()
        storage.storeUInt16(takenCount, at: queue(q))
    }

    /// The device starts acting on chain `head` (nil: it is done with the last one). A crash while
    /// a head is being served is a strike against it.
    public func serving(_ q: Int, head: UInt16?) {
        storage.storeUInt16(head ?? Self.noHead, at: queue(q) + 6)
    }

    /// Brackets a completion: `beginCompletion`, write the used element and index, `endCompletion`.
    public func beginCompletion(_ q: Int, head: UInt16) {
        storage.storeUInt16(head, at: queue(q) + 4)
        barrier()
    }

    public func endCompletion(_ q: Int, head: UInt16, usedIndex: UInt16) {
        barrier()
        setBit(q, head, false)
        storage.storeUInt16(usedIndex, at: queue(q) + 2)
        barrier()
        storage.storeUInt16(Self.noHead, at: queue(q) + 4)
    }

    /// What a successor does for queue `q`.
    public struct Recovery: Equatable, Sendable {
        /// Chains to serve again, before anything new, ascending.
        public var resubmit: [UInt16]
        /// Chains that crashed the device on `strikesToSkip` replays in a row: complete them with
        /// an error instead.
        public var poisoned: [UInt16]
        /// Where to resume taking from the available ring.
        public var taken: UInt16
        /// The used index to resume at.
        public var used: UInt16
        /// Set when the record made no sense (nothing is resubmitted then).
        public var corrupt: String?
    }

    /// Whether the storage holds a record of this layout for `queueCount` queues.
    public var isValid: Bool {
        let h = storage.loadBytes(at: offset, count: 8)
        guard h.count == 8 else { return false }
        let magic = h[0..<4].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
        return magic == Self.magic && UInt16(h[4]) | UInt16(h[5]) << 8 == Self.version
            && Int(UInt16(h[6]) | UInt16(h[7]) << 8) == queueCount
    }

    /// After a crash, for queue `q` of `size` entries: `guestUsed` is the used index in guest
    /// memory, `availableHead(i)` the head the driver published at available position i, if it
    /// published that far. Writes the normalised record back, so a crash of the successor finds it
    /// consistent too.
    public func recover(_ q: Int, size: UInt16, guestUsed: UInt16, availableHead: (UInt16) -> UInt16?) -> Recovery {
        var taken = storage.loadUInt16(at: queue(q))
        let used = storage.loadUInt16(at: queue(q) + 2)
        let completing = storage.loadUInt16(at: queue(q) + 4)
        let serving = storage.loadUInt16(at: queue(q) + 6)
        let map = storage.loadBytes(at: queue(q) + 8, count: Self.mapBytes)
        let limit = min(size, UInt16(Self.maximumQueueSize))
        var inFlight = Set((0..<limit).filter { map.count == Self.mapBytes && map[Int($0) / 8] & (1 << ($0 % 8)) != 0 })
        // The completion being made when the process died reached the used ring: it is done.
        if completing != Self.noHead && guestUsed == used &+ 1 { inFlight.remove(completing) }
        // A head marked taken whose count had not been advanced.
        if let head = availableHead(taken), inFlight.contains(head) { taken &+= 1 }
        var recovery = Recovery(resubmit: [], poisoned: [], taken: taken, used: guestUsed, corrupt: nil)
        guard inFlight.count <= Int(taken &- guestUsed) else {
            recovery.corrupt = "the in-flight record names \(inFlight.count) chains but \(taken &- guestUsed) were outstanding"
            store(q, heads: [], taken: taken, used: guestUsed)
            return recovery
        }
        // The chain the device was acting on when it died: a strike against it; three in a row
        // and it is not served again.
        var strikeHead = storage.loadUInt16(at: strikes(q))
        var strikeCount = storage.loadUInt16(at: strikes(q) + 2)
        if serving != Self.noHead && inFlight.contains(serving) {
            strikeCount = strikeHead == serving ? strikeCount &+ 1 : 1
            strikeHead = serving
            if strikeCount >= Self.strikesToSkip {
                inFlight.remove(serving)
                recovery.poisoned = [serving]
                strikeHead = Self.noHead
                strikeCount = 0
            }
        } else {
            strikeHead = Self.noHead
            strikeCount = 0
        }
        storage.storeUInt16(strikeHead, at: strikes(q))
        storage.storeUInt16(strikeCount, at: strikes(q) + 2)
        recovery.resubmit = inFlight.sorted()
        // A poisoned chain stays marked until the device completes it (with an error).
        store(q, heads: recovery.resubmit + recovery.poisoned, taken: taken, used: guestUsed)
        return recovery
    }

    private func store(_ q: Int, heads: [UInt16], taken: UInt16, used: UInt16) {
        var map = [UInt8](repeating: 0, count: Self.mapBytes)
        for h in heads where Int(h) < Self.maximumQueueSize { map[Int(h) / 8] |= 1 << (h % 8) }
        storage.storeBytes(map, at: queue(q) + 8)
        storage.storeUInt16(taken, at: queue(q))
        storage.storeUInt16(used, at: queue(q) + 2)
        storage.storeUInt16(Self.noHead, at: queue(q) + 4)
        storage.storeUInt16(Self.noHead, at: queue(q) + 6)
    }

    private func setBit(_ q: Int, _ head: UInt16, _ on: Bool) {
        guard Int(head) < Self.maximumQueueSize else { return }
        let at = queue(q) + 8 + Int(head) / 8
        let bit = UInt8(1) << UInt8(head % 8)
        let byte = storage.loadByte(at: at)
        storage.storeByte(on ? byte | bit : byte & ~bit, at: at)
    }

    /// Orders the record's stores against the guest-memory stores around them (and against a
    /// kill: program order is what the successor sees).
    private func barrier() { atomicMemoryFence(ordering: .sequentiallyConsistent) }
}

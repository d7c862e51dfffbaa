import Atomics
import Glibc
import HVIPC

/// What a virtio device plugin implements; `VirtioPCITransport` does the rest (PCI config space,
/// capabilities, feature negotiation, queue setup, notifications).
public protocol VirtioDevice: AnyObject {
    /// The virtio device ID (virtio 1.2 §5): 8 for SCSI host, 1 for network, …
    var deviceType: UInt16 { get }
    /// The PCI class code (class << 16 | subclass << 8 | prog-if), e.g. 0x010000 for SCSI storage.
    var pciClass: UInt32 { get }
    /// Device-specific feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    var features: UInt64 { get }
    /// Number of virtqueues.
    var queueCount: Int { get }
    /// Largest queue size the device accepts (a power of two ≤ 32768).
    var maxQueueSize: UInt16 { get }
    /// A read of the device-specific configuration structure.
    func readConfig(offset: Int, size: Int) -> UInt64
    /// A write to it.
    func writeConfig(offset: Int, size: Int, value: UInt64)
    /// The driver notified queue `index`, which is live (`transport.queues[index]` is set).
    func queueNotified(_ index: Int, transport: VirtioPCITransport)
    /// The driver reset the device: forget every request in flight.
    func reset()
    /// Whether the device completes each queue's chains in the order it takes them. Either way a
    /// device granted `statePage` is restarted after a crash without the driver noticing: the
    /// transport keeps its configuration in the state page and resumes every queue. An in-order
    /// device resumes at the used index, taking again every chain after it; any other device
    /// gets an in-flight record in the state page (which chains were taken and not completed) and
    /// is handed each of those chains again by `takeNext` before anything new. Either way a chain
    /// may be served twice (once by the dead process, once again), so serving it must be
    /// idempotent: reading or writing the same blocks, sending the same frame. Default: false.
    var completesInOrder: Bool { get }
    /// Completes, with an error the driver understands, a chain that crashed the device on each of
    /// its last three replays (out-of-order devices only). Default: completed with nothing written.
    func completePoisoned(_ chain: DescriptorChain, queue: Int, transport: VirtioPCITransport)
    /// A snapshot is being taken: complete every chain taken so far (with `transport.complete`),
    /// wait for work on other threads to finish, and save any state of the device's own in the
    /// state page. Return false if that cannot be done. Default: true (a device that completes
    /// each chain before returning from `queueNotified`).
    func quiesce(transport: VirtioPCITransport) -> Bool
    /// When, on the monotonic clock (`monotonicNanoseconds()`), the device next needs
    /// `deadlineReached` even if the driver does nothing (a timer); nil for never. Default: nil.
    func nextDeadline() -> UInt64?
    /// Called on the runtime thread at or after `nextDeadline()`.
    func deadlineReached(now: UInt64, transport: VirtioPCITransport)
}

extension VirtioDevice {
    public var completesInOrder: Bool { false }
    public func quiesce(transport: VirtioPCITransport) -> Bool { true }
    public func nextDeadline() -> UInt64? { nil }
    public func deadlineReached(now: UInt64, transport: VirtioPCITransport) {}
    public func completePoisoned(_ chain: DescriptorChain, queue: Int, transport: VirtioPCITransport) {
        transport.complete(queue: queue, head: chain.head, written: 0)
    }
}

/// The virtio-pci modern transport (virtio 1.2 §4.1) for a device process: serves its PCI config
/// space (a type-0 header with the virtio vendor capabilities) and its memory BAR, whose layout is
/// common configuration at 0x0000, ISR status at 0x1000, device configuration at 0x2000 and
/// notifications at 0x3000 (4 bytes per queue).
///
/// Declare the function to hvctl with `pci=DD.F,bar0=mmio:16384` (and `memory`), then:
///
/// ```swift
/// let transport = VirtioPCITransport(runtime: runtime, device: MyDevice())
/// runtime.run(transport)
/// ```
///
/// Interrupts: MSI-X when the device is granted `msi` (one vector per queue plus one for
/// configuration changes; table at BAR 0 + 0x1800, pending bits at 0x1C00), each vector an irqfd
/// the core routes; otherwise, or while the driver leaves MSI-X off, INTx (pin A), level-triggered,
/// routed through the chipset's PIRQ registers (needs `interruptLevel`), lowered by the ISR read.
///
/// Notifications: each queue's notify register is a doorbell (KVM ioeventfd) when the core grants
/// one, so a driver's kick reaches the device without an exit to the core.
///
/// Offers VIRTIO_F_VERSION_1 and VIRTIO_RING_F_EVENT_IDX besides the device's features.
public final class VirtioPCITransport: DeviceModel {
    public let runtime: DeviceRuntime
    public let device: any VirtioDevice
    /// The live queues (nil until the driver enables them).
    public private(set) var queues: [SplitVirtqueue?]
    /// Per queue, chains a dead predecessor had taken and not completed, to hand out again first.
    private var resubmit: [[UInt16]]
    /// Per queue, chains that crashed the device on every replay, to complete with an error.
    private var poisoned: [[UInt16]]
    /// Guest RAM (the device must be declared with `memory`).
    public let memory: GuestMemory?

    /// Size of BAR 0 this transport expects.
    public static let barSize: UInt64 = VirtioPCILayout.barSize
    static let versionFeature: UInt64 = 1 << 32
    static let eventIndexFeature: UInt64 = 1 << 29
    static let msixTableOffset = 0x1800, msixPBAOffset = 0x1C00
    /// No MSI-X vector (VIRTIO_MSI_NO_VECTOR).
    static let noVector: UInt16 = 0xFFFF
    static let commonOffset = 0x0000, isrOffset = 0x1000, deviceOffset = 0x2000, notifyOffset = 0x3000
    static let notifyMultiplier: UInt32 = 4

    private let configResource: Int?
    private let barResource: Int?

    // Common configuration state.
    private var deviceFeatureSelect: UInt32 = 0
    private var driverFeatureSelect: UInt32 = 0
    private var driverFeatures: UInt64 = 0
    private var status: UInt8 = 0
    private var configGeneration: UInt8 = 0
    private var queueSelect: UInt16 = 0
    private struct QueueSetup {
        var size: UInt16
        var enabled = false
        var descriptors: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
        var vector: UInt16 = 0xFFFF
    }
    private var setups: [QueueSetup]
    /// ISR status: bit 0 queue interrupt, bit 1 configuration change.
    public private(set) var isr: UInt8 = 0
    private var configVector: UInt16 = 0xFFFF

    // MSI-X (present when the core granted `msi`).
    private let msixVectors: Int
    private var msixEnabled = false
    private var msixFunctionMask = false
    /// The table as the guest wrote it: per vector address (8), data (4), vector control (4).
    private var msixTable: [UInt8]
    private var msixPending: [Bool]
    /// Each vector's irqfd, and whether the table changed since the core last routed it.
    private var msixEventFDs: [EventFD?]
    private var msixStale: [Bool]
    private var msixRefusalLogged: [Bool]
    /// The feature bits the driver accepted (meaningful once it set FEATURES_OK).
    public var negotiatedFeatures: UInt64 { driverFeatures }
    /// Whether the driver has set DRIVER_OK and not reset the device since.
    public var isDriverReady: Bool { status & 4 != 0 }
    /// Interrupts delivered through MSI-X and through INTx so far (for tests and statistics).
    public private(set) var msixDelivered: UInt64 = 0

    // Config space bytes the device owns that the guest may write.
    private var interruptLine: UInt8 = 0
    /// The PCI configuration-access capability's window: bar, offset, length.
    private var windowBAR: UInt8 = 0
    private var windowOffset: UInt32 = 0
    private var windowLength: UInt32 = 0

    public init(runtime: DeviceRuntime, device: any VirtioDevice) {
        self.runtime = runtime
        self.device = device
        memory = runtime.guestMemory
        configResource = runtime.resources.firstIndex { $0.kind == .pciConfig }
        barResource = runtime.resources.firstIndex { $0.kind == .pciMMIOBar && $0.base & 0xFF == 0 && $0.length >= Self.barSize }
        queues = Array(repeating: nil, count: device.queueCount)
        resubmit = Array(repeating: [], count: device.queueCount)
        poisoned = Array(repeating: [], count: device.queueCount)
        setups = Array(repeating: QueueSetup(size: device.maxQueueSize), count: device.queueCount)
        msixVectors = runtime.capabilities.contains(.msi) ? min(device.queueCount + 1, 64) : 0
        msixTable = (0..<msixVectors).flatMap { _ in [UInt8](repeating: 0, count: 12) + [1, 0, 0, 0] }  // masked at reset
        msixPending = Array(repeating: false, count: msixVectors)
        msixEventFDs = Array(repeating: nil, count: msixVectors)
        msixStale = Array(repeating: true, count: msixVectors)
        msixRefusalLogged = Array(repeating: false, count: msixVectors)
        if configResource == nil || barResource == nil {
            runtime.log(.error, "a virtio-pci device needs pci=DD.F and bar0=mmio:\(Self.barSize) (at least)")
        }
        if memory == nil { runtime.log(.error, "a virtio device needs guest memory: declare it with 'memory'") }
        if let barResource {
            // Each queue's notify register as a doorbell: the kick skips the core and the ring.
            for q in 0..<device.queueCount {
                let offset = UInt32(Self.notifyOffset) + UInt32(q) * Self.notifyMultiplier
                guard let doorbell = runtime.addDoorbell(resource: barResource, offset: offset, length: 0) else { break }
                runtime.watchDoorbell(doorbell) { [unowned self] in notified(q) }
            }
        }
        if restoreState() {
            runtime.log(.info, "resumed after a restart: configuration restored, queues resumed")
            completePoisonedChains()
            for q in queues.indices { notified(q) }
            // Anything the dead process completed but did not signal is signalled now.
            for q in queues.indices where status & 4 != 0 { signalUsedBuffers(queue: q) }
        } else {
            inflight?.clear()
        }
    }

    private func notified(_ index: Int) {
        if index < queues.count, queues[index] != nil, status & 4 != 0 { device.queueNotified(index, transport: self) }
    }

    // MARK: DeviceModel

    public func read(resource: Int, offset: UInt64, size: Int) -> UInt64 {
        if resource == configResource { return configRead(Int(offset), size) }
        if resource == barResource { return barRead(Int(offset), size) }
        return ~0
    }

    public func write(resource: Int, offset: UInt64, size: Int, value: UInt64) {
        if resource == configResource { configWrite(Int(offset), size, value) }
        if resource == barResource { barWrite(Int(offset), size, value) }
        if resource == configResource || (resource == barResource && Int(offset) < Self.notifyOffset) { saveState() }
    }

    /// DeviceModel: the device's own timer.
    public func nextDeadline() -> UInt64? { device.nextDeadline() }

    /// DeviceModel: the device's own timer fired.
    public func deadlineReached(now: UInt64) { device.deadlineReached(now: now, transport: self) }

    /// DeviceModel: the device completes what it holds; the configuration is saved again.
    public func quiesce() -> Bool {
        guard device.quiesce(transport: self) else { return false }
        saveState()
        return true
    }

    // MARK: Surviving a restart

    /// "HVVT" + layout version 1.
    private static let stateMagic: UInt32 = 0x5456_5648, stateVersion: UInt32 = 1

    /// The driver-visible configuration, as bytes in the state page (in-order devices only).
    private func saveState() {
        guard resumable, let page = runtime.statePage else { return }
        var b: [UInt8] = []
        func put(_ v: UInt64, _ n: Int) { for i in 0..<n { b.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
        put(UInt64(Self.stateMagic), 4); put(UInt64(Self.stateVersion), 4)
        put(UInt64(setups.count), 2); put(UInt64(msixVectors), 2)
        put(UInt64(status), 1); put(driverFeatures, 8); put(UInt64(configVector), 2)
        put(UInt64(deviceFeatureSelect), 4); put(UInt64(driverFeatureSelect), 4); put(UInt64(queueSelect), 2)
        put(msixEnabled ? 1 : 0, 1); put(msixFunctionMask ? 1 : 0, 1)
        put(UInt64(interruptLine), 1); put(UInt64(windowBAR), 1); put(UInt64(windowOffset), 4); put(UInt64(windowLength), 4)
        for q in setups {
            put(UInt64(q.size), 2); put(q.enabled ? 1 : 0, 1); put(UInt64(q.vector), 2)
            put(q.descriptors, 8); put(q.driver, 8); put(q.device, 8)
        }
        b += msixTable
        b += msixPending.map { $0 ? 1 : 0 }
        guard b.count <= Self.inflightOffset else { return }
        page.storeBytes(b)
    }

    /// Whether this transport survives a restart of its process: its configuration (and, for a
    /// device that completes out of order, its in-flight record) is kept in the state page.
    private var resumable: Bool {
        guard runtime.statePage != nil else { return false }
        return device.completesInOrder || inflight != nil
    }

    // MARK: In-flight record (devices that complete out of order)

    static let inflightOffset = 2048

    /// The record, for out-of-order devices with a state page big enough for their queues, up to
    /// 1024 entries each; nil otherwise.
    private lazy var inflight: InflightRecord? = {
        guard !device.completesInOrder, let page = runtime.statePage, device.maxQueueSize <= 1024,
              Self.inflightOffset + InflightRecord.size(queueCount: device.queueCount) <= page.count else { return nil }
        return InflightRecord(storage: page, offset: Self.inflightOffset, queueCount: device.queueCount)
    }()

    /// After a crash: takes back the configuration the dead process saved, resumes every live
    /// queue at its used index, and notifies the device of each so it takes again what was
    /// pending. False when there is nothing valid to restore.
    private func restoreState() -> Bool {
        guard resumable, runtime.restartGeneration > 0, let page = runtime.statePage, let memory else { return false }
        let b = page.loadBytes(count: page.count)
        // The layout saveState writes: a 45-byte header, 29 bytes per queue, then the MSI-X table and pending bits.
        guard 45 + 29 * setups.count + msixTable.count + msixPending.count <= b.count else { return false }
        var at = 0
        func get(_ n: Int) -> UInt64 {
            defer { at += n }
            return (0..<n).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) }
        }
        guard get(4) == UInt64(Self.stateMagic) else { return false }
        let version = get(4)
        guard version == UInt64(Self.stateVersion) else {
            // A state another version of this transport wrote (an upgrade, or a rollback): this
            // binary must not guess at it. Exiting makes the core roll an upgrade back.
            runtime.log(.error, "the state page holds virtio transport state version \(version); this binary reads version \(Self.stateVersion) only")
            exit(3)
        }
        guard get(2) == UInt64(setups.count), get(2) == UInt64(msixVectors) else { return false }
        status = UInt8(get(1)); driverFeatures = get(8); configVector = UInt16(get(2))
        deviceFeatureSelect = UInt32(get(4)); driverFeatureSelect = UInt32(get(4)); queueSelect = UInt16(get(2))
        msixEnabled = get(1) != 0; msixFunctionMask = get(1) != 0
        interruptLine = UInt8(get(1)); windowBAR = UInt8(get(1)); windowOffset = UInt32(get(4)); windowLength = UInt32(get(4))
        for q in setups.indices {
            setups[q].size = UInt16(get(2)); let enabled = get(1) != 0; setups[q].vector = UInt16(get(2))
            setups[q].descriptors = get(8); setups[q].driver = get(8); setups[q].device = get(8)
            if enabled { enableQueue(q, restoring: true) }
        }
        msixTable = Array(b[at..<(at + msixTable.count)]); at += msixTable.count
        msixPending = b[at..<(at + msixPending.count)].map { $0 != 0 }
        for q in queues.indices where queues[q] != nil {
            if device.completesInOrder {
                // The device wrote the used index itself; the driver never changes it. Everything
                // the driver made available after it was taken (or not) before the crash: take it again.
                guard let used = queues[q]!.publishedUsedIndex(memory) else { continue }
                queues[q]!.restore(nextAvailable: used, usedIndex: used)
            } else {
                // Out of order: the in-flight record says which chains the dead process held.
                let queue = queues[q]!
                guard let record = inflight, record.isValid, let guestUsed = queue.publishedUsedIndex(memory) else {
                    runtime.log(.warning, "queue \(q): no valid in-flight record; starting unconfigured (the driver must reset the device)")
                    writeStatus(0)
                    return false
                }
                let recovered = record.recover(q, size: queue.size, guestUsed: guestUsed) { queue.availableHead(at: $0, memory) }
                if let corrupt = recovered.corrupt { runtime.log(.warning, "queue \(q): \(corrupt); resubmitting none") }
                queues[q]!.restore(nextAvailable: recovered.taken, usedIndex: recovered.used)
                resubmit[q] = recovered.resubmit
                poisoned[q] = recovered.poisoned
                if !recovered.resubmit.isEmpty {
                    runtime.log(.info, "queue \(q): resubmitting \(recovered.resubmit.count) requests the previous process had in flight")
                }
            }
        }
        return true
    }

    /// Marks used buffers for the driver (ISR bit 0) and raises INTx, if the driver asked for
    /// interrupts on queue `index` and the device was granted `interruptLevel`. Reading the ISR
    /// lowers it again.
    public func signalUsedBuffers(queue index: Int) {
        guard let memory, index < queues.count, queues[index] != nil, queues[index]!.needsInterrupt(memory) else { return }
        if msixEnabled {
            fireMSIX(setups[index].vector)
            return
        }
        isr |= 1
        setINTx(true)
    }

    /// Tells the driver the device configuration changed (ISR bit 1, or the configuration vector).
    public func signalConfigurationChange() {
        configGeneration &+= 1
        if msixEnabled {
            fireMSIX(configVector)
            return
        }
        isr |= 2
        setINTx(true)
    }

    // MARK: MSI-X

    private func msixEntryMasked(_ v: Int) -> Bool { msixTable[16 * v + 12] & 1 != 0 }

    private func fireMSIX(_ vector: UInt16) {
        let v = Int(vector)
        guard v < msixVectors else { return }  // NO_VECTOR: the driver wants no interrupt
        if msixFunctionMask || msixEntryMasked(v) {
            msixPending[v] = true
            return
        }
        if msixStale[v] || msixEventFDs[v] == nil {
            let t = 16 * v
            func word(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(msixTable[t + at + $1]) << (8 * UInt32($1)) } }
            let address = UInt64(word(0)) | UInt64(word(4)) << 32
            msixEventFDs[v] = runtime.routeMSI(vector: UInt32(v), address: address, data: word(8))
            msixStale[v] = false
            if msixEventFDs[v] == nil {
                if !msixRefusalLogged[v] {
                    runtime.log(.warning, "MSI-X vector \(v): the core refused address 0x\(String(address, radix: 16)); its interrupts are dropped")
                    msixRefusalLogged[v] = true
                }
                return
            }
        }
        msixEventFDs[v]?.signal()
        msixDelivered &+= 1
    }

    /// Delivers what masking held back, once the vector and the function are unmasked.
    private func deliverPendingMSIX() {
        guard msixEnabled, !msixFunctionMask else { return }
        for v in 0..<msixVectors where msixPending[v] && !msixEntryMasked(v) {
            msixPending[v] = false
            fireMSIX(UInt16(v))
        }
    }

    private func msixRead(_ offset: Int, _ size: Int) -> UInt64 {
        var value: UInt64 = 0
        if offset >= Self.msixPBAOffset {
            for v in 0..<msixVectors where msixPending[v] { value |= 1 << UInt64(v) }
            return (value >> (8 * UInt64(offset - Self.msixPBAOffset))) & (size >= 8 ? ~0 : (1 << (8 * UInt64(size))) - 1)
        }
        let at = offset - Self.msixTableOffset
        for i in 0..<size where at + i < msixTable.count { value |= UInt64(msixTable[at + i]) << (8 * UInt64(i)) }
        return value
    }

    private func msixWrite(_ offset: Int, _ size: Int, _ value: UInt64) {
        guard offset < Self.msixPBAOffset else { return }  // pending bits are read-only
        let at = offset - Self.msixTableOffset
        for i in 0..<size where at + i < msixTable.count {
            msixTable[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))
            msixStale[(at + i) / 16] = true
        }
        deliverPendingMSIX()
    }

    private var intxHigh = false
    private func setINTx(_ high: Bool) {
        guard high != intxHigh, runtime.capabilities.contains(.interruptLevel) else { return }
        intxHigh = high
        // Lowering happens inside the ISR read: wait for the core, so the line is low before the
        // guest has the value (and sends its EOI).
        runtime.setInterruptLevel(line: IRQLevel.pciINTx, asserted: high, wait: !high)
    }

    /// The next request the driver made available on queue `index` (see `SplitVirtqueue.next`);
    /// nil when there is none, or the queue is not live.
    public func takeNext(queue index: Int) -> Result<DescriptorChain, DescriptorChainError>? {
        guard let memory, index < queues.count, queues[index] != nil else { return nil }
        // The device is done acting on the chain it took last (if any).
        inflight?.serving(index, head: nil)
        let taken: Result<DescriptorChain, DescriptorChainError>?
        if !resubmit[index].isEmpty {
            // What the previous process had taken and not completed comes first, as it was.
            taken = queues[index]!.retake(head: resubmit[index].removeFirst(), memory)
        } else {
            let before = queues[index]!.nextAvailable
            taken = queues[index]!.next(memory)
            if let record = inflight, queues[index]!.nextAvailable != before {
                record.taken(index, head: queues[index]!.lastHead, takenCount: queues[index]!.nextAvailable)
            }
        }
        // A crash from here until the next takeNext is a strike against this chain.
        if let record = inflight, taken != nil, let head = queues[index]!.lastHead { record.serving(index, head: head) }
        return taken
    }

    /// Chains that crashed the device on every replay, completed with an error after a restart
    /// (the device's `completePoisoned`), once the queues are live again.
    private func completePoisonedChains() {
        guard let memory else { return }
        for q in queues.indices where queues[q] != nil {
            for head in poisoned[q] {
                runtime.log(.warning, "queue \(q): the request at descriptor \(head) crashed this device \(InflightRecord.strikesToSkip) times in a row; it is completed with an error and the device carries on")
                switch queues[q]!.retake(head: head, memory) {
                case .success(let chain): device.completePoisoned(chain, queue: q, transport: self)
                case .failure: complete(queue: q, head: head, written: 0)
                }
            }
            poisoned[q] = []
        }
    }

    /// Completes, with nothing written, the chain `takeNext` last refused (when its head was a
    /// valid index), so the driver does not wait for it forever.
    public func completeRefused(queue index: Int) {
        guard index < queues.count, let head = queues[index]?.lastHead else { return }
        complete(queue: index, head: head, written: 0)
    }

    /// Completes `head` on queue `index` with `written` bytes.
    public func complete(queue index: Int, head: UInt16, written: UInt32) {
        guard let memory, index < queues.count, queues[index] != nil else { return }
        // Note the completion, make it, then forget the chain (InflightRecord's write order).
        inflight?.beginCompletion(index, head: head)
        queues[index]!.complete(head: head, written: written, memory)
        inflight?.endCompletion(index, head: head, usedIndex: queues[index]!.usedIndex)
        signalUsedBuffers(queue: index)
    }

    // MARK: PCI configuration space

    private static let capabilityStart = 0x40

    /// The header and capability list, as bytes (the core overrides command and BARs).
    private func configByte(_ r: Int) -> UInt8 {
        func le(_ v: UInt32, _ at: Int) -> UInt8 { UInt8(truncatingIfNeeded: v >> (8 * UInt32(r - at))) }
        switch r {
        case 0...1: return le(0x1AF4, 0)
        case 2...3: return le(0x1040 + UInt32(device.deviceType), 2)
        case 6: return 0x10                                     // status: capabilities list
        case 8: return 0x01                                     // revision 1: a modern device
        case 9...11: return le(device.pciClass, 9)
        case 0x2C...0x2D: return le(0x1AF4, 0x2C)               // subsystem vendor
        case 0x2E...0x2F: return le(0x40 + UInt32(device.deviceType), 0x2E)
        case 0x34: return UInt8(Self.capabilityStart)
        case 0x3C: return interruptLine
        case 0x3D: return 0x01                                  // INTA#
        case 0x40..<0x98: return capabilityByte(r)
        case 0x98..<0xA4 where msixVectors > 0: return msixCapabilityByte(r - 0x98)
        default: return 0
        }
    }

    /// virtio_pci_cap structures: common (0x40), notify (0x50), ISR (0x64), device (0x74),
    /// PCI configuration access (0x84).
    private func capabilityByte(_ r: Int) -> UInt8 {
        struct Cap { let at: Int, next: Int, length: Int, type: UInt8, offset: Int, size: UInt32 }
        let caps = [
            Cap(at: 0x40, next: 0x50, length: 16, type: 1, offset: Self.commonOffset, size: 0x40),
            Cap(at: 0x50, next: 0x64, length: 20, type: 2, offset: Self.notifyOffset, size: 0x1000),
            Cap(at: 0x64, next: 0x74, length: 16, type: 3, offset: Self.isrOffset, size: 4),
            Cap(at: 0x74, next: 0x84, length: 16, type: 4, offset: Self.deviceOffset, size: 0x1000),
            Cap(at: 0x84, next: msixVectors > 0 ? 0x98 : 0x00, length: 20, type: 5, offset: 0, size: 0),
        ]
        guard let cap = caps.first(where: { r >= $0.at && r < $0.at + $0.length }) else { return 0 }
        let i = r - cap.at
        func le(_ v: UInt32, _ at: Int) -> UInt8 { UInt8(truncatingIfNeeded: v >> (8 * UInt32(i - at))) }
        switch i {
        case 0: return 0x09                                     // vendor-specific
        case 1: return UInt8(cap.next)
        case 2: return UInt8(cap.length)
        case 3: return cap.type
        case 4: return cap.type == 5 ? windowBAR : 0            // BAR 0
        case 8...11: return cap.type == 5 ? le(windowOffset, 8) : le(UInt32(cap.offset), 8)
        case 12...15: return cap.type == 5 ? le(windowLength, 12) : le(cap.size, 12)
        case 16...19:
            if cap.type == 2 { return le(Self.notifyMultiplier, 16) }
            return le(UInt32(truncatingIfNeeded: windowRead()), 16)  // pci_cfg_data
        default: return 0
        }
    }

    /// The MSI-X capability (PCI 3.0 §6.8.2) at 0x98: table and pending bits in BAR 0.
    private func msixCapabilityByte(_ i: Int) -> UInt8 {
        let control = UInt16(msixVectors - 1) | (msixEnabled ? 0x8000 : 0) | (msixFunctionMask ? 0x4000 : 0)
        switch i {
        case 0: return 0x11
        case 1: return 0x00
        case 2: return UInt8(truncatingIfNeeded: control)
        case 3: return UInt8(truncatingIfNeeded: control >> 8)
        case 4...7: return UInt8(truncatingIfNeeded: UInt32(Self.msixTableOffset) >> (8 * UInt32(i - 4)))  // BIR 0
        case 8...11: return UInt8(truncatingIfNeeded: UInt32(Self.msixPBAOffset) >> (8 * UInt32(i - 8)))
        default: return 0
        }
    }

    private func setMSIXControl(_ high: UInt8) {
        let enable = high & 0x80 != 0
        if enable && !msixEnabled {
            // The guest may have rewritten the table while MSI-X was off: route afresh.
            for v in 0..<msixVectors { msixStale[v] = true }
            setINTx(false)
        }
        msixEnabled = enable
        msixFunctionMask = high & 0x40 != 0
        deliverPendingMSIX()
    }

    private func configRead(_ offset: Int, _ size: Int) -> UInt64 {
        // The access window's data is one access, not four byte reads.
        if (0x94..<0x98).contains(offset) { return windowRead() }
        var value: UInt64 = 0
        for i in 0..<size { value |= UInt64(configByte(offset + i)) << (8 * UInt64(i)) }
        return value
    }

    private func configWrite(_ offset: Int, _ size: Int, _ value: UInt64) {
        if offset == 0x94 {
            windowWrite(value)
            return
        }
        for i in 0..<size {
            let byte = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))
            switch offset + i {
            case 0x3C: interruptLine = byte
            case 0x9B where msixVectors > 0: setMSIXControl(byte)
            case 0x88: windowBAR = byte
            case 0x8C...0x8F: windowOffset = merge(windowOffset, byte, at: offset + i - 0x8C)
            case 0x90...0x93: windowLength = merge(windowLength, byte, at: offset + i - 0x90)
            default: break  // read-only
            }
        }
    }

    private func merge(_ old: UInt32, _ byte: UInt8, at index: Int) -> UInt32 {
        (old & ~(0xFF << (8 * UInt32(index)))) | UInt32(byte) << (8 * UInt32(index))
    }

    /// VIRTIO_PCI_CAP_PCI_CFG: an access to BAR `windowBAR` at `windowOffset`, `windowLength`
    /// (1, 2 or 4) bytes wide — how 16-bit firmware code reaches registers above 1 MiB.
    private func windowRead() -> UInt64 {
        guard windowBAR == 0, [1, 2, 4].contains(windowLength) else { return 0 }
        return barRead(Int(windowOffset), Int(windowLength))
    }

    private func windowWrite(_ value: UInt64) {
        guard windowBAR == 0, [1, 2, 4].contains(windowLength) else { return }
        barWrite(Int(windowOffset), Int(windowLength), value)
    }

    // MARK: BAR 0

    private func barRead(_ offset: Int, _ size: Int) -> UInt64 {
        switch offset {
        case Self.commonOffset..<Self.isrOffset: return commonRead(offset - Self.commonOffset, size)
        case Self.isrOffset..<(Self.isrOffset + 4):
            let v = isr
            isr = 0  // reading ISR acknowledges it and lowers INTx
            setINTx(false)
            return UInt64(v)
        case Self.msixTableOffset..<(Self.msixPBAOffset + 8) where msixVectors > 0: return msixRead(offset, size)
        case Self.deviceOffset..<Self.notifyOffset: return device.readConfig(offset: offset - Self.deviceOffset, size: size)
        default: return 0
        }
    }

    private func barWrite(_ offset: Int, _ size: Int, _ value: UInt64) {
        switch offset {
        case Self.commonOffset..<Self.isrOffset: commonWrite(offset - Self.commonOffset, size, value)
        case Self.msixTableOffset..<(Self.msixPBAOffset + 8) where msixVectors > 0: msixWrite(offset, size, value)
        case Self.deviceOffset..<Self.notifyOffset: device.writeConfig(offset: offset - Self.deviceOffset, size: size, value: value)
        case Self.notifyOffset..<(Self.notifyOffset + 0x1000):
            // Only without a doorbell (or through the PCI configuration access window).
            notified((offset - Self.notifyOffset) / Int(Self.notifyMultiplier))
        default: break
        }
    }

    private var selected: QueueSetup? { Int(queueSelect) < setups.count ? setups[Int(queueSelect)] : nil }

    /// The common configuration as a little-endian byte image of `virtio_pci_common_cfg`.
    private func commonImage() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 0x40)
        func put(_ v: UInt64, _ n: Int, _ at: Int) { for i in 0..<n { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        let offered = device.features | Self.versionFeature | Self.eventIndexFeature
        put(UInt64(deviceFeatureSelect), 4, 0x00)
        put(deviceFeatureSelect < 2 ? offered >> (32 * UInt64(deviceFeatureSelect)) : 0, 4, 0x04)
        put(UInt64(driverFeatureSelect), 4, 0x08)
        put(driverFeatureSelect < 2 ? driverFeatures >> (32 * UInt64(driverFeatureSelect)) : 0, 4, 0x0C)
        put(UInt64(configVector), 2, 0x10)
        put(UInt64(setups.count), 2, 0x12)
        put(UInt64(status), 1, 0x14)
        put(UInt64(configGeneration), 1, 0x15)
        put(UInt64(queueSelect), 2, 0x16)
        if let q = selected {
            put(UInt64(q.size), 2, 0x18)
            put(UInt64(q.vector), 2, 0x1A)
            put(q.enabled ? 1 : 0, 2, 0x1C)
            put(UInt64(queueSelect), 2, 0x1E)                   // queue_notify_off = the queue's index
            put(q.descriptors, 8, 0x20)
            put(q.driver, 8, 0x28)
            put(q.device, 8, 0x30)
        }
        return b
    }

    private func commonRead(_ offset: Int, _ size: Int) -> UInt64 {
        let image = commonImage()
        var value: UInt64 = 0
        for i in 0..<size where offset + i < image.count { value |= UInt64(image[offset + i]) << (8 * UInt64(i)) }
        return value
    }

    private func commonWrite(_ offset: Int, _ size: Int, _ value: UInt64) {
        // Merge the written bytes into the current image, then apply each field touched.
        var image = commonImage()
        for i in 0..<size where offset + i < image.count { image[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        func field(_ at: Int, _ n: Int) -> UInt64 { (0..<n).reduce(0) { $0 | UInt64(image[at + $1]) << (8 * UInt64($1)) } }
        let touched = offset..<(offset + size)
        func hit(_ at: Int, _ n: Int) -> Bool { touched.overlaps(at..<(at + n)) }
        if hit(0x00, 4) { deviceFeatureSelect = UInt32(field(0x00, 4)) }
        if hit(0x08, 4) { driverFeatureSelect = UInt32(field(0x08, 4)) }
        if hit(0x0C, 4), status & 8 == 0, driverFeatureSelect < 2 {
            let shift = 32 * UInt64(driverFeatureSelect)
            driverFeatures = (driverFeatures & ~(0xFFFF_FFFF << shift)) | field(0x0C, 4) << shift
        }
        if hit(0x10, 2) {
            // A vector the table does not have reads back as NO_VECTOR (virtio 1.2 §4.1.5.1.2).
            let v = UInt16(field(0x10, 2))
            configVector = Int(v) < msixVectors ? v : Self.noVector
        }
        if hit(0x14, 1) { writeStatus(UInt8(field(0x14, 1))) }
        if hit(0x16, 2) { queueSelect = UInt16(field(0x16, 2)) }
        guard Int(queueSelect) < setups.count, status & 4 == 0 || hit(0x1C, 2) else { return }
        let q = Int(queueSelect)
        if hit(0x18, 2) {
            let size = UInt16(field(0x18, 2))
            // A power of two no larger than what the device offers; anything else is ignored.
            if size > 0, size <= device.maxQueueSize, size & (size - 1) == 0 { setups[q].size = size }
        }
        if hit(0x1A, 2) {
            let v = UInt16(field(0x1A, 2))
            setups[q].vector = Int(v) < msixVectors ? v : Self.noVector
        }
        if hit(0x20, 8) { setups[q].descriptors = field(0x20, 8) }
        if hit(0x28, 8) { setups[q].driver = field(0x28, 8) }
        if hit(0x30, 8) { setups[q].device = field(0x30, 8) }
        if hit(0x1C, 2), field(0x1C, 2) == 1, !setups[q].enabled { enableQueue(q) }
    }

    private func enableQueue(_ q: Int, restoring: Bool = false) {
        let s = setups[q]
        guard let memory,
              let queue = SplitVirtqueue(size: s.size, descriptorTable: s.descriptors, availableRing: s.driver,
                                         usedRing: s.device, memory: memory) else {
            runtime.log(.warning, "queue \(q): the driver's rings are misaligned or not in guest RAM; the device needs a reset")
            status |= 0x40  // DEVICE_NEEDS_RESET
            return
        }
        setups[q].enabled = true
        queues[q] = queue
        queues[q]!.eventIndex = driverFeatures & Self.eventIndexFeature != 0
        if !restoring {
            // A newly enabled queue has taken and completed nothing.
            inflight?.resetQueue(q)
        }
    }

    private func writeStatus(_ value: UInt8) {
        if value == 0 {
            // Reset: everything back to its initial state.
            device.reset()
            status = 0
            driverFeatures = 0
            isr = 0
            setINTx(false)
            configVector = Self.noVector
            queueSelect = 0
            setups = Array(repeating: QueueSetup(size: device.maxQueueSize), count: device.queueCount)
            queues = Array(repeating: nil, count: device.queueCount)
            resubmit = Array(repeating: [], count: device.queueCount)
            poisoned = Array(repeating: [], count: device.queueCount)
            inflight?.clear()
            return
        }
        var next = value
        if value & 8 != 0 && status & 8 == 0 {
            // FEATURES_OK only for a subset of what was offered that includes VERSION_1.
            let offered = device.features | Self.versionFeature | Self.eventIndexFeature
            if driverFeatures & ~offered != 0 || driverFeatures & Self.versionFeature == 0 { next &= ~8 }
        }
        status = next | (status & 0x40)
    }
}

import Glibc
import HVBalloonContract
import HVDeviceSDK

// hv-balloon: a virtio memory balloon (virtio 1.2 §5.5) on the SDK's virtio-pci transport. The
// operator sets how many pages the guest should give up (`target_pages`, changed at run time by
// RECONFIGURE); the guest's driver hands pages over on the inflate queue, and this process gives
// their host memory back at once (MADV_REMOVE on its mapping of the guest-RAM memfd: the pages
// then take no host memory in any process until the guest writes them again). Pages taken back
// on the deflate queue need nothing: they read as zeros. Optional: the statistics queue (the
// guest's memory figures, asked for every `stats_interval_s`) and free page reporting (ranges the
// guest has free, given back like inflated pages while the guest keeps them).
//
// Queue numbers: inflate 0, deflate 1, statistics 2, free page hints 3 (never offered), reporting
// 4. Drivers disagree on whether queues that are not negotiated keep their number (the spec's
// table) or are skipped (Linux numbers the ones it uses in order), so with reporting negotiated,
// queue 3 is the reporting queue too, and so is queue 2 when statistics were not negotiated.

final class VirtioBalloon: VirtioDevice {
    static let statisticsFeature: UInt64 = 1 << 1
    static let deflateOnOOMFeature: UInt64 = 1 << 2
    static let reportingFeature: UInt64 = 1 << 5

    enum Role { case inflate, deflate, statistics, reporting, unused }

    let runtime: DeviceRuntime
    var settings: BalloonContract.Settings
    /// What is published in the state page (and taken back from it after a restart).
    var status = BalloonContract.Status()
    weak var transport: VirtioPCITransport?
    /// The statistics buffer the driver left with the device; completing it asks for fresh figures.
    private var statisticsHead: UInt16?
    private var nextStatisticsRequest: UInt64?
    private var refusals = 0

    init(runtime: DeviceRuntime, settings: BalloonContract.Settings) {
        self.runtime = runtime
        self.settings = settings
        if runtime.restartGeneration > 0, let page = runtime.statePage,
           let saved = BalloonContract.Status(decoding: page.loadBytes(at: BalloonContract.statusOffset, count: BalloonContract.Status.size)) {
            // A restart, a restore or a migration: the driver's `actual` and the counters carry on.
            status = saved
        }
        status.targetPages = settings.targetPages
        publish()
    }

    var deviceType: UInt16 { 5 }
    var pciClass: UInt32 { 0xFF_0000 }  // unclassified device, as other virtio balloons
    var features: UInt64 {
        Self.statisticsFeature | (settings.deflateOnOOM ? Self.deflateOnOOMFeature : 0) | (settings.freePageReporting ? Self.reportingFeature : 0)
    }
    var queueCount: Int { 5 }
    var maxQueueSize: UInt16 { 128 }
    /// Inflate, deflate and reporting chains complete as they are taken; the one statistics buffer
    /// is held until fresh figures are wanted. A restarted process resumes each queue at its used
    /// index, so it takes that buffer again.
    var completesInOrder: Bool { true }

    private var negotiated: UInt64 { transport?.negotiatedFeatures ?? 0 }

    func role(of queue: Int) -> Role {
        let statistics = negotiated & Self.statisticsFeature != 0, reporting = negotiated & Self.reportingFeature != 0
        switch queue {
        case 0: return .inflate
        case 1: return .deflate
        case 2: return statistics ? .statistics : reporting ? .reporting : .unused
        case 3, 4: return reporting ? .reporting : .unused
        default: return .unused
        }
    }

    /// struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val.
    func readConfig(offset: Int, size: Int) -> UInt64 {
        var bytes = [UInt8](repeating: 0, count: 16)
        for i in 0..<4 {
            bytes[i] = UInt8(truncatingIfNeeded: status.targetPages >> (8 * UInt32(i)))
            bytes[4 + i] = UInt8(truncatingIfNeeded: status.actualPages >> (8 * UInt32(i)))
        }
        var value: UInt64 = 0
        for i in 0..<size where offset >= 0 && offset + i < bytes.count { value |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        return value
    }

    /// The driver writes `actual` (the pages it holds in the balloon); nothing else is writable.
    func writeConfig(offset: Int, size: Int, value: UInt64) {
        guard offset == 4, size == 4 else { return }
        status.actualPages = UInt32(truncatingIfNeeded: value)
        publish()
    }

    func reset() {
        // The driver is gone: every page it had in the balloon is the guest's again.
        statisticsHead = nil
        nextStatisticsRequest = nil
        status.actualPages = 0
        status.driverReady = false
        publish()
    }

    func queueNotified(_ index: Int, transport: VirtioPCITransport) {
        self.transport = transport
        noteDriver(transport)
        switch role(of: index) {
        case .inflate: takePages(queue: index, transport, inflating: true)
        case .deflate: takePages(queue: index, transport, inflating: false)
        case .statistics: takeStatistics(queue: index, transport)
        case .reporting: takeReports(queue: index, transport)
        case .unused: eachChain(queue: index, transport) { transport.complete(queue: index, head: $0.head, written: 0) }
        }
        publish()
    }

    /// Hands `body` each chain the driver made available on `queue`; a malformed one is completed
    /// with nothing written (and logged).
    private func eachChain(queue: Int, _ transport: VirtioPCITransport, _ body: (DescriptorChain) -> Void) {
        while let taken = transport.takeNext(queue: queue) {
            switch taken {
            case .success(let chain): body(chain)
            case .failure(let error):
                refuse("queue \(queue): \(error)")
                transport.completeRefused(queue: queue)
            }
        }
    }

    private func noteDriver(_ transport: VirtioPCITransport) {
        status.driverReady = transport.isDriverReady
        status.statisticsNegotiated = negotiated & Self.statisticsFeature != 0
        status.reportingNegotiated = negotiated & Self.reportingFeature != 0
        status.deflateOnOOMNegotiated = negotiated & Self.deflateOnOOMFeature != 0
    }

    /// Inflate or deflate: each chain is an array of 32-bit page frame numbers (4 KiB pages).
    private func takePages(queue: Int, _ transport: VirtioPCITransport, inflating: Bool) {
        guard let memory = transport.memory else { return }
        eachChain(queue: queue, transport) { chain in
            // 256 frame numbers are what Linux sends at most; a buffer may carry up to 4096.
            let bytes = chain.readAll(memory, limit: 16384)
            let frames = bytes.count / 4
            if inflating {
                var run: (start: UInt64, pages: UInt64)?
                for i in 0..<frames {
                    let frame = UInt64(bytes[4 * i]) | UInt64(bytes[4 * i + 1]) << 8 | UInt64(bytes[4 * i + 2]) << 16 | UInt64(bytes[4 * i + 3]) << 24
                    // Neighbouring pages are given back with one call.
                    if let r = run, r.start + r.pages == frame {
                        run = (r.start, r.pages + 1)
                        continue
                    }
                    if let r = run { discard(r, memory) }
                    run = (frame, 1)
                }
                if let r = run { discard(r, memory) }
                status.inflatedPages &+= UInt64(frames)
            } else {
                status.deflatedPages &+= UInt64(frames)
            }
            transport.complete(queue: queue, head: chain.head, written: 0)
        }
    }

    private func discard(_ run: (start: UInt64, pages: UInt64), _ memory: GuestMemory) {
        let size = run.pages * BalloonContract.pageSize
        if memory.discard(run.start * BalloonContract.pageSize, count: size) != size {
            refuse("could not give back \(run.pages) page(s) at frame 0x\(String(run.start, radix: 16)): not guest RAM")
        }
    }

    /// Free page reporting: each buffer of a chain is a range of guest memory the guest has free
    /// (device-writable, so the driver knows the device may drop its contents).
    private func takeReports(queue: Int, _ transport: VirtioPCITransport) {
        guard let memory = transport.memory else { return }
        eachChain(queue: queue, transport) { chain in
            for buffer in chain.writable + chain.readable {
                status.reportedPages &+= memory.discard(buffer.address, count: UInt64(buffer.length)) / BalloonContract.pageSize
            }
            transport.complete(queue: queue, head: chain.head, written: 0)
        }
    }

    /// The statistics buffer: `{ le16 tag; le64 value }` entries, packed. Kept until the next request.
    private func takeStatistics(queue: Int, _ transport: VirtioPCITransport) {
        guard let memory = transport.memory else { return }
        eachChain(queue: queue, transport) { chain in
            // A driver sends one buffer at a time; an older one still held goes back first.
            if let held = statisticsHead { transport.complete(queue: queue, head: held, written: 0) }
            let bytes = chain.readAll(memory, limit: 10 * 64)
            var figures: [BalloonContract.Statistic: UInt64] = [:]
            for at in stride(from: 0, to: bytes.count - bytes.count % 10, by: 10) {
                let tag = UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8
                var value: UInt64 = 0
                for k in 0..<8 { value |= UInt64(bytes[at + 2 + k]) << (8 * UInt64(k)) }
                if let statistic = BalloonContract.Statistic(rawValue: tag) { figures[statistic] = value }
            }
            status.statistics = figures
            status.statisticsUpdatedAt = monotonicNanoseconds()
            statisticsHead = chain.head
            scheduleStatistics()
        }
    }

    private func scheduleStatistics() {
        let interval = UInt64(settings.statisticsIntervalSeconds) * 1_000_000_000
        nextStatisticsRequest = interval > 0 && statisticsHead != nil ? monotonicNanoseconds() + interval : nil
    }

    func nextDeadline() -> UInt64? { nextStatisticsRequest }

    func deadlineReached(now: UInt64, transport: VirtioPCITransport) {
        guard let due = nextStatisticsRequest, now >= due else { return }
        nextStatisticsRequest = nil
        // Handing the buffer back is the request: the driver refills it and sends it again.
        if let head = statisticsHead {
            statisticsHead = nil
            transport.complete(queue: 2, head: head, written: 0)
        }
    }

    /// A snapshot: the statistics buffer goes back to the driver (it sends it again afterwards).
    func quiesce(transport: VirtioPCITransport) -> Bool {
        if let head = statisticsHead {
            statisticsHead = nil
            transport.complete(queue: 2, head: head, written: 0)
        }
        publish()
        return true
    }

    /// New settings from the operator: the target (and the statistics interval) change at once,
    /// and a configuration-change interrupt tells the driver to look; the offered features cannot
    /// change under a driver that negotiated them.
    func reconfigure(_ next: BalloonContract.Settings, transport: VirtioPCITransport) -> Bool {
        guard next.deflateOnOOM == settings.deflateOnOOM, next.freePageReporting == settings.freePageReporting else {
            runtime.log(.warning, "refused new settings: deflate_on_oom and free_page_reporting cannot change while the VM runs")
            return false
        }
        let targetChanged = next.targetPages != settings.targetPages
        settings = next
        status.targetPages = next.targetPages
        scheduleStatistics()
        publish()
        if targetChanged { transport.signalConfigurationChange() }
        return true
    }

    /// Writes `status` to the state page, where the trusted side reads it.
    func publish() {
        runtime.statePage?.storeBytes(status.encode(), at: BalloonContract.statusOffset)
    }

    private func refuse(_ what: String) {
        refusals += 1
        if refusals <= 5 { runtime.log(.warning, "\(what)\(refusals == 5 ? " (further refusals are not logged)" : "")") }
    }
}

// State page layout (version 1): the virtio transport's configuration at 0, `BalloonContract.Status` at 3072.
let runtime = DeviceRuntime.startOrExit(name: "balloon", capabilities: [.registerRing, .interruptLevel, .msi, .statePage, .snapshot, .dirtyLog],
                                        stateVersion: 1)
let settings: BalloonContract.Settings
do { settings = try BalloonContract.Settings(decoding: runtime.config) } catch {
    runtime.log(.error, "\(error)")
    exit(2)
}
let balloon = VirtioBalloon(runtime: runtime, settings: settings)
let transport = VirtioPCITransport(runtime: runtime, device: balloon)
balloon.transport = transport
runtime.onReconfigure = { config in
    guard let next = try? BalloonContract.Settings(decoding: config) else { return false }
    return balloon.reconfigure(next, transport: transport)
}
runtime.run(transport)

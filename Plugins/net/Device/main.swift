import Glibc
import HVDeviceSDK
import HVNetContract
import HVNetSwitch

// hv-net: a virtio-net NIC (virtio 1.2 §5.1) on the SDK's virtio-pci transport. Queue 0 receives,
// queue 1 transmits; no control queue. Its frames go to a host tap (`backend=tap`, host file 0
// the tap the trusted side opened) or to a port on a private segment's switch (`backend=segment`,
// host files 0–2: the port region, this NIC's eventfd, the switch's eventfd for this port).
// Frames move between guest buffers and the backend directly: readv/writev on the tap straight
// into and out of guest RAM, one copy into or out of a port slot. Nothing passes through the core.

final class VirtioNet: VirtioDevice {
    static let checksumFeature: UInt64 = 1 << 0
    static let guestChecksumFeature: UInt64 = 1 << 1
    static let macFeature: UInt64 = 1 << 5
    static let mergeableFeature: UInt64 = 1 << 15
    static let statusFeature: UInt64 = 1 << 16
    /// struct virtio_net_hdr_v1: what precedes every frame in a buffer.
    static let headerSize = 12
    /// An Ethernet frame without FCS, with one VLAN tag; nothing larger is valid without TSO.
    static let maximumFrame = 1518
    static let receiveQueue = 0, transmitQueue = 1

    let runtime: DeviceRuntime
    let mac: [UInt8]
    let backend: any FrameBackend
    weak var transport: VirtioPCITransport?
    /// Receive chains taken from the driver and not yet filled.
    private var spare: [DescriptorChain] = []
    private(set) var framesSent: UInt64 = 0, framesReceived: UInt64 = 0
    private(set) var malformedSent: UInt64 = 0, oversizedReceived: UInt64 = 0
    private var refused = 0
    /// Meter the frames the guest receives and sends (`rx_rate_*`, `tx_rate_*`); nil: unlimited.
    private var receiveLimiter: RateLimiter?, transmitLimiter: RateLimiter?
    /// A limiter stopped a direction: its frames wait (in the host's queue or the guest's) until
    /// `nextDeadline`.
    private var receiveThrottled = false, transmitThrottled = false

    init(runtime: DeviceRuntime, mac: [UInt8], backend: any FrameBackend, receiveLimit: RateLimitSettings, transmitLimit: RateLimitSettings) {
        self.runtime = runtime
        self.mac = mac
        self.backend = backend
        receiveLimiter = receiveLimit.isUnlimited ? nil : RateLimiter(receiveLimit)
        transmitLimiter = transmitLimit.isUnlimited ? nil : RateLimiter(transmitLimit)
    }

    var deviceType: UInt16 { 1 }
    var pciClass: UInt32 { 0x02_0000 }  // network, Ethernet
    var features: UInt64 {
        Self.checksumFeature | (backend.offersGuestChecksum ? Self.guestChecksumFeature : 0)
            | Self.macFeature | Self.mergeableFeature | Self.statusFeature
    }
    var queueCount: Int { 2 }
    var maxQueueSize: UInt16 { 256 }
    /// Receive chains fill in the order taken, transmit chains complete at once: a restarted NIC
    /// process resumes the queues where the dead one stood.
    var completesInOrder: Bool { true }

    /// struct virtio_net_config: mac[6], status (LINK_UP), max_virtqueue_pairs (1).
    func readConfig(offset: Int, size: Int) -> UInt64 {
        let bytes = mac + [1, 0] + [1, 0]
        var value: UInt64 = 0
        for i in 0..<size where offset + i < bytes.count { value |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        return value
    }

    /// The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR; writes are ignored.
    func writeConfig(offset: Int, size: Int, value: UInt64) {}

    /// New rate limits (RECONFIGURE), carrying each bucket's tokens or debt over; frames a
    /// limit held back go now if the new one admits them.
    func changeLimits(receive: RateLimitSettings, transmit: RateLimitSettings) {
        receiveLimiter = RateLimiter.changed(receiveLimiter, to: receive)
        transmitLimiter = RateLimiter.changed(transmitLimiter, to: transmit)
        if let transport { deadlineReached(now: monotonicNanoseconds(), transport: transport) }
    }

    func reset() {
        spare.removeAll()
        receiveThrottled = false
        transmitThrottled = false
    }

    // MARK: Announcing the MAC

    /// When the next announcement goes out, and how many are left.
    private var announcementDue: UInt64?
    private var announcementsLeft = 0

    /// After a live migration, a restore or a restart, the switches between this NIC and its
    /// peers may still send its frames to the old port: RARP broadcasts from its MAC (as QEMU's
    /// self-announce does: five of them, 50 to 200 ms apart) teach them where it is now, whatever
    /// the guest does.
    func announce() {
        announcementsLeft = 5
        announcementDue = monotonicNanoseconds()
    }

    func nextDeadline() -> UInt64? {
        var deadlines: [UInt64] = announcementDue.map { [$0] } ?? []
        let now = monotonicNanoseconds()
        if receiveThrottled { deadlines.append(receiveLimiter?.nextAvailable(now: now) ?? now) }
        if transmitThrottled { deadlines.append(transmitLimiter?.nextAvailable(now: now) ?? now) }
        return deadlines.min()
    }

    func deadlineReached(now: UInt64, transport: VirtioPCITransport) {
        if receiveThrottled && receiveLimiter?.nextAvailable(now: now) == nil {
            receiveThrottled = false
            receive()
        }
        if transmitThrottled && transmitLimiter?.nextAvailable(now: now) == nil {
            transmitThrottled = false
            transmit()
        }
        guard let due = announcementDue, now >= due else { return }
        sendRARP()
        announcementsLeft -= 1
        let step = UInt64(5 - announcementsLeft) * 50_000_000
        announcementDue = announcementsLeft > 0 ? now + step : nil
    }

    /// One RARP "request reverse" (RFC 903, op 3) from and about this MAC, padded to the
    /// minimum Ethernet frame, behind a zeroed virtio-net header where the backend takes one.
    private func sendRARP() {
        var frame = [UInt8](repeating: 0, count: Self.headerSize + 60)
        let f = Self.headerSize
        for i in 0..<6 { frame[f + i] = 0xFF }
        frame.replaceSubrange(f + 6..<f + 12, with: mac)
        frame.replaceSubrange(f + 12..<f + 22, with: [0x80, 0x35, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03] as [UInt8])
        frame.replaceSubrange(f + 22..<f + 28, with: mac)   // sender hardware address
        frame.replaceSubrange(f + 32..<f + 38, with: mac)   // target hardware address
        let skip = backend.carriesVirtioHeader ? 0 : Self.headerSize
        let sent = frame.withUnsafeMutableBytes { b in
            backend.send([iovec(iov_base: b.baseAddress! + skip, iov_len: b.count - skip)], length: b.count - skip, checksum: nil)
        }
        if sent { framesSent &+= 1 }
        backend.flush()
    }

    func queueNotified(_ index: Int, transport: VirtioPCITransport) {
        self.transport = transport
        if index == Self.receiveQueue { receive() } else if index == Self.transmitQueue { transmit() }
    }

    /// The backend has frames, or space again.
    func backendReady() {
        backend.drainWake()
        guard transport?.isDriverReady == true else { return }
        receive()
        transmit()
    }

    /// Whether a frame could be placed now (takes the driver's receive buffers as needed); the
    /// tap is only watched while this holds, so frames wait in the host's queue, not in a spin.
    func canReceive() -> Bool {
        guard let transport, transport.isDriverReady else { return false }
        if receiveLimiter != nil && !receiveLimiter!.admits() {
            receiveThrottled = true
            return false
        }
        return fillSpare(needing: Self.headerSize + (backend.nextFrameLength ?? Self.maximumFrame), transport)
    }

    private var mergeable: Bool { (transport?.negotiatedFeatures ?? 0) & Self.mergeableFeature != 0 }

    /// Takes receive chains until they hold `bytes` (one chain only without MRG_RXBUF).
    private func fillSpare(needing bytes: Int, _ transport: VirtioPCITransport) -> Bool {
        while spareCapacity < bytes && (mergeable || spare.isEmpty) {
            guard let taken = transport.takeNext(queue: Self.receiveQueue) else { break }
            switch taken {
            case .success(let chain) where chain.writableLength >= UInt64(Self.headerSize) && chain.readable.isEmpty:
                spare.append(chain)
            case .success(let chain):
                noteRefusal("receive buffer \(chain.head) is not a device-writable buffer of at least \(Self.headerSize) bytes")
                transport.complete(queue: Self.receiveQueue, head: chain.head, written: 0)
            case .failure(let error):
                noteRefusal("\(error)")
                transport.completeRefused(queue: Self.receiveQueue)
            }
        }
        return !spare.isEmpty && (spareCapacity >= bytes || !mergeable)
    }

    private var spareCapacity: Int { spare.reduce(0) { $0 + Int(min($1.writableLength, 1 << 20)) } }

    private func noteRefusal(_ what: String) {
        refused += 1
        if refused <= 5 { runtime.log(.warning, "\(what)\(refused == 5 ? " (further refusals are not logged)" : "")") }
    }

    /// Backend → guest, while both have something.
    private func receive() {
        guard let transport, let memory = transport.memory else { return }
        let guestChecksum = transport.negotiatedFeatures & Self.guestChecksumFeature != 0
        backend.setGuestChecksum(guestChecksum)
        while canReceive() {
            // Vectors over the spare chains, after the header in the first.
            var vectors: [iovec] = []
            var capacities: [Int] = []
            for (k, chain) in spare.enumerated() {
                let cap = Int(min(chain.writableLength, 1 << 20))
                capacities.append(cap)
                let skip = k == 0 && !backend.carriesVirtioHeader ? Self.headerSize : 0
                guard cap > skip, let v = chain.ioVectors(writable: true, skipping: UInt64(skip), count: UInt64(cap - skip), memory) else { continue }
                vectors += v
            }
            let room = capacities.reduce(0, +) - (backend.carriesVirtioHeader ? 0 : Self.headerSize)
            guard let received = backend.receive(into: vectors, capacity: room) else { break }
            // A tap's own header stays only with GUEST_CSUM (its flags: NEEDS_CSUM or DATA_VALID; no
            // GSO is offered, so the tap sends none); otherwise it is replaced by zeros below.
            let length = backend.carriesVirtioHeader ? received - Self.headerSize : received
            if length <= 0 {
                oversizedReceived &+= 1
                continue
            }
            // Which chains the frame filled, and how much of each.
            var left = Self.headerSize + length
            var used = 0
            var written: [UInt32] = []
            while left > 0 && used < spare.count {
                let n = min(left, capacities[used])
                written.append(UInt32(n))
                left -= n
                used += 1
            }
            let count = [UInt8(truncatingIfNeeded: used), UInt8(truncatingIfNeeded: used >> 8)]
            if backend.carriesVirtioHeader && guestChecksum {
                spare[0].write(count, at: 10, memory)
            } else {
                spare[0].write([UInt8](repeating: 0, count: 10) + count, memory)
            }
            for k in 0..<used { transport.complete(queue: Self.receiveQueue, head: spare[k].head, written: written[k]) }
            spare.removeFirst(used)
            framesReceived &+= 1
            receiveLimiter?.consume(bytes: UInt64(length))
        }
        backend.flush()
    }

    /// What a transmitted frame's virtio-net header asks for.
    private enum TransmitHeader {
        /// Send it, finishing its checksum first if the driver left one (VIRTIO_NET_HDR_F_NEEDS_CSUM).
        case send(checksum: ChecksumRequest?)
        /// A wrong length, GSO (not offered), or a checksum request outside the frame or without
        /// VIRTIO_NET_F_CSUM negotiated: dropped.
        case malformed
    }

    private func transmitHeader(_ header: [UInt8], length: Int) -> TransmitHeader {
        guard header.count == Self.headerSize, length >= 14, length <= Self.maximumFrame, header[1] == 0 else { return .malformed }
        guard header[0] & 1 != 0 else { return .send(checksum: nil) }
        let start = Int(header[6]) | Int(header[7]) << 8, offset = Int(header[8]) | Int(header[9]) << 8
        guard (transport?.negotiatedFeatures ?? 0) & Self.checksumFeature != 0, start + offset + 2 <= length else { return .malformed }
        return .send(checksum: ChecksumRequest(start: start, offset: offset))
    }

    /// Guest → backend, while the backend takes frames.
    private func transmit() {
        guard let transport, let memory = transport.memory else { return }
        while backend.canSend {
            // Frames beyond the rate wait in the guest's queue.
            if transmitLimiter != nil && !transmitLimiter!.admits() {
                transmitThrottled = true
                break
            }
            guard let taken = transport.takeNext(queue: Self.transmitQueue) else { break }
            switch taken {
            case .success(let chain):
                let length = Int(min(chain.readableLength, 1 << 20)) - Self.headerSize
                transmitLimiter?.consume(bytes: UInt64(max(0, length)))
                let header = chain.readAll(memory, limit: Self.headerSize)
                let skip = backend.carriesVirtioHeader ? 0 : Self.headerSize
                if case .send(let checksum) = transmitHeader(header, length: length),
                   let vectors = chain.ioVectors(writable: false, skipping: UInt64(skip), count: UInt64(length + Self.headerSize - skip), memory) {
                    if backend.send(vectors, length: length + Self.headerSize - skip, checksum: checksum) { framesSent &+= 1 }
                } else {
                    malformedSent &+= 1
                    if malformedSent <= 3 {
                        runtime.log(.warning, "dropped a transmitted frame of \(length) bytes: an Ethernet frame is 14 to \(Self.maximumFrame) bytes behind a virtio-net header without GSO, whose checksum request (if any) lies inside it")
                    }
                }
                transport.complete(queue: Self.transmitQueue, head: chain.head, written: 0)
            case .failure(let error):
                noteRefusal("\(error)")
                transport.completeRefused(queue: Self.transmitQueue)
            }
        }
        backend.flush()
    }
}

// State page layout (version 1): the virtio transport's configuration at 0, this NIC's MAC at
// 3072 ("MAC1" then its six bytes).
let runtime = DeviceRuntime.startOrExit(name: "net", capabilities: [.registerRing, .interruptLevel, .msi, .statePage, .snapshot, .dirtyLog],
                                        stateVersion: 1)
let settings: NetContract.Settings
do { settings = try NetContract.Settings(decoding: runtime.config) } catch {
    runtime.log(.error, "\(error)")
    exit(2)
}
let mac = settings.mac.bytes
let backend: any FrameBackend
switch settings.backend {
case .tap:
    guard let tap = runtime.hostFile(NetContract.HostFile.tap) else {
        runtime.log(.error, "backend=tap but no tap descriptor was handed over")
        exit(2)
    }
    do { backend = try TapBackend(tap: tap) } catch {
        runtime.log(.error, "cannot use the tap: \(error)")
        exit(2)
    }
case .segment:
    guard let region = runtime.hostFile(NetContract.HostFile.portRegion), let mine = runtime.hostFile(NetContract.HostFile.portDoorbell),
          let theirs = runtime.hostFile(NetContract.HostFile.switchDoorbell) else {
        runtime.log(.error, "backend=segment needs the port region and both eventfds")
        exit(2)
    }
    do { backend = try SegmentBackend(region: region, doorbell: mine, switchDoorbell: theirs) } catch {
        runtime.log(.error, "cannot attach to the segment's port: \(error)")
        exit(2)
    }
}
let nic = VirtioNet(runtime: runtime, mac: mac, backend: backend, receiveLimit: settings.receiveLimit, transmitLimit: settings.transmitLimit)
runtime.watch(fd: backend.wakeDescriptor, enabled: { backend is SegmentBackend || nic.canReceive() }) { nic.backendReady() }
let transport = VirtioPCITransport(runtime: runtime, device: nic)
// `hvctl set --rate`: new rate limits apply at once; the backend and the MAC cannot change under
// a running guest.
runtime.onReconfigure = { config in
    guard let next = try? NetContract.Settings(decoding: config) else { return false }
    guard next.backend == settings.backend, next.mac == settings.mac else {
        runtime.log(.warning, "refused new settings: only the rate limits change while the VM runs")
        return false
    }
    nic.changeLimits(receive: next.receiveLimit, transmit: next.transmitLimit)
    return true
}
// A clone restored from a snapshot gets a MAC of its own while its driver still holds the
// template's: the configuration space says the new one, and a configuration-change interrupt
// tells the driver to look (a driver that caches its address keeps the old one until told).
let macRecord: [UInt8] = Array("MAC1".utf8) + mac
if let page = runtime.statePage {
    let saved = page.loadBytes(at: 3072, count: macRecord.count)
    if runtime.restartGeneration > 0, saved.starts(with: Array("MAC1".utf8)), saved != macRecord {
        runtime.log(.info, "MAC is now \(settings.mac) (was \(MACAddress(bytes: Array(saved[4...])))); configuration change signalled")
        transport.signalConfigurationChange()
    }
    page.storeBytes(macRecord, at: 3072)
}
// This process took over a running guest's NIC (a migration, a restore or a restart): tell the
// network where the MAC is now.
if runtime.restartGeneration > 0 { nic.announce() }
runtime.run(transport)

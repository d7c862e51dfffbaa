import Glibc
import HVDeviceSDK
import HVSCSIContract
import HVSCSIDisk

// hv-scsi: a virtio-scsi host adapter (virtio 1.2 §5.6) with one logical unit, target 0 LUN 0:
// a disk backed by a raw image (`kind=disk`) or a CD-ROM drive holding an ISO (`kind=cdrom`), the
// image opened by the trusted side (host file 0). Queues: 0 control, 1 event, 2 requests.
// Plain READs and WRITEs move data straight between the image and the guest's buffers: at once on
// the runtime thread when the host needs no wait for storage (cached data, overwrites into the page
// cache), else on a pool of I/O threads, several in flight; every other command runs on the
// runtime thread as it is taken.

final class VirtioSCSI: VirtioDevice {
    let runtime: DeviceRuntime
    let unit: any SCSILogicalUnit
    var senseSize: UInt32 = 96
    /// Chains refused so far (hostile or broken drivers).
    var refused = 0
    var cdbSize: UInt32 = 32
    /// The I/O threads; nil runs transfers inline (if the threads could not be started).
    let pool: IOPool?
    /// Bumped by each reset: completions of requests taken before it are dropped.
    var generation: UInt64 = 0
    weak var transport: VirtioPCITransport?
    /// Meters the request queue (`rate_bw`, `rate_ops`); nil: unlimited.
    var limiter: RateLimiter?
    /// The limiter stopped taking requests: they wait in the queue until `nextDeadline`.
    var throttled = false
    /// The bytes the request being served moves (what the limiter is paid).
    private var requestBytes: UInt64 = 0

    init(runtime: DeviceRuntime, unit: any SCSILogicalUnit, ioThreads: Int, rateLimit: RateLimitSettings) {
        self.runtime = runtime
        self.unit = unit
        limiter = rateLimit.isUnlimited ? nil : RateLimiter(rateLimit)
        var pool: IOPool?
        if ioThreads > 0 {
            do { pool = try IOPool(workers: ioThreads, unit: unit) } catch {
                runtime.log(.warning, "no I/O threads (\(error)); transfers run one at a time")
            }
        }
        self.pool = pool
        if let pool { runtime.watch(fd: pool.completions.fd.rawValue) { [unowned self] in finishJobs(pool.takeFinished()) } }
    }

    var deviceType: UInt16 { 8 }
    var pciClass: UInt32 { 0x01_0000 }  // mass storage, SCSI
    var features: UInt64 { 0 }
    var queueCount: Int { 3 }
    var maxQueueSize: UInt16 { 256 }

    /// struct virtio_scsi_config.
    func readConfig(offset: Int, size: Int) -> UInt64 {
        let fields: [UInt32] = [1, 126, UInt32(SCSIDisk.maximumTransferBlocks), 128, 16, senseSize, cdbSize]
        var bytes: [UInt8] = fields.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }
        bytes += [0, 0, 0, 0] + [0, 0, 0, 0]  // max_channel 0, max_target 0, max_lun 0
        var value: UInt64 = 0
        for i in 0..<size where offset + i < bytes.count { value |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        return value
    }

    func writeConfig(offset: Int, size: Int, value: UInt64) {
        // The driver may set sense_size (0x14) and cdb_size (0x18); keep them sane.
        if offset == 0x14 && size == 4 { senseSize = min(UInt32(truncatingIfNeeded: value), 96) }
        if offset == 0x18 && size == 4 { cdbSize = max(min(UInt32(truncatingIfNeeded: value), 32), 16) }
    }

    func nextDeadline() -> UInt64? { throttled ? limiter?.nextAvailable() ?? monotonicNanoseconds() : nil }

    func deadlineReached(now: UInt64, transport: VirtioPCITransport) {
        guard throttled, limiter?.nextAvailable(now: now) == nil else { return }
        throttled = false
        queueNotified(2, transport: transport)
    }

    func reset() {
        throttled = false
        // Let the I/O in flight finish (it writes guest memory), then forget it.
        if let pool { _ = pool.drainAll() }
        generation &+= 1
        senseSize = 96
        cdbSize = 32
    }

    /// A snapshot: every transfer in flight finishes and is completed, and the LUN is saved.
    func quiesce(transport: VirtioPCITransport) -> Bool {
        if let pool { finishJobs(pool.drainAll()) }
        saveLUN()
        return true
    }

    /// Completes transfers the I/O threads finished.
    private func finishJobs(_ jobs: [IOJob]) {
        guard let transport, let memory = transport.memory else { return }
        for job in jobs where job.generation == generation {
            let written = finishTransfer(job, errno: job.errno, memory)
            transport.complete(queue: job.queue, head: job.chain.head, written: written)
        }
        saveLUN()
    }

    /// Where the LUN's own state lives in the state page: after the transport's configuration
    /// and in-flight record (ipc-schema/README.md §11).
    static let lunStateOffset = 3584

    /// Saves the LUN's state after commands complete: a command is replayed after a crash only
    /// if it had not completed, and then against the state from before it, as it should be.
    func saveLUN() {
        guard let page = runtime.statePage else { return }
        let bytes = unit.savedState.bytes
        if bytes != savedLUN {
            page.storeBytes(bytes, at: Self.lunStateOffset)
            savedLUN = bytes
        }
    }
    private var savedLUN: [UInt8] = []

    /// After a restart: the LUN's state as the previous process left it, if it left a valid one.
    func restoreLUN() {
        guard runtime.restartGeneration > 0, let page = runtime.statePage,
              let state = LUNState(bytes: page.loadBytes(at: Self.lunStateOffset, count: LUNState.byteCount)) else { return }
        unit.restore(state)
        savedLUN = state.bytes
    }

    func queueNotified(_ index: Int, transport: VirtioPCITransport) {
        self.transport = transport
        guard let memory = transport.memory, index != 1 else { return }  // the event queue only holds buffers
        while true {
            // Requests beyond the rate wait in the guest's queue: back-pressure, never an error.
            if index == 2, limiter != nil, !limiter!.admits() {
                throttled = true
                return
            }
            guard let taken = transport.takeNext(queue: index) else { break }
            switch taken {
            case .success(let chain):
                requestBytes = 0
                let written = index == 0 ? control(chain, memory) : request(chain, memory, queue: index)
                if index == 2 { limiter?.consume(bytes: requestBytes) }
                if let written {
                    transport.complete(queue: index, head: chain.head, written: written)
                    saveLUN()
                }
            case .failure(let error):
                // A hostile guest can send these in a loop: name the first few, then count.
                refused += 1
                if refused <= 5 {
                    runtime.log(.warning, "queue \(index): refused a request: \(error)\(refused == 5 ? " (further refusals are not logged)" : "")")
                }
                transport.completeRefused(queue: index)
            }
        }
    }

    /// A request that crashed this adapter on each of its last three replays: CHECK CONDITION,
    /// HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00), which drivers report and retry or fail
    /// like any hardware error, instead of a fourth crash.
    func completePoisoned(_ chain: DescriptorChain, queue: Int, transport: VirtioPCITransport) {
        guard let memory = transport.memory, queue == 2, chain.writableLength >= UInt64(12 + senseSize) else {
            transport.complete(queue: queue, head: chain.head, written: 0)
            return
        }
        let reply = response(status: .checkCondition, sense: SCSISense(key: 0x04, asc: 0x44, ascq: 0),
                             residual: UInt32(min(chain.writableLength - UInt64(12 + senseSize), UInt64(UInt32.max))))
        transport.complete(queue: queue, head: chain.head, written: UInt32(chain.write(reply, memory)))
    }

    /// Task management and asynchronous notification requests: nothing is ever outstanding, so
    /// every TMF succeeds and no event is subscribed.
    private func control(_ chain: DescriptorChain, _ memory: GuestMemory) -> UInt32 {
        let zeros = [UInt8](repeating: 0, count: Int(min(chain.writableLength, 8)))
        return UInt32(chain.write(zeros, memory))
    }

    /// Serves one request; nil when it went to the I/O threads (completed later).
    private func request(_ chain: DescriptorChain, _ memory: GuestMemory, queue: Int) -> UInt32? {
        let headerSize = 19 + Int(cdbSize)
        let responseSize = 12 + Int(senseSize)
        let header = chain.readAll(memory, limit: headerSize)
        if header.count >= headerSize, chain.writableLength >= UInt64(responseSize), header[0] == 1, header[1] == 0,
           (UInt16(header[2]) << 8 | UInt16(header[3])) & 0x3FFF == 0 {
            // Target 0, LUN 0: a plain READ or WRITE moves its data without a copy.
            let cdb = Array(header[19..<headerSize])
            let dataInCapacity = Int(min(chain.writableLength - UInt64(responseSize), UInt64(Int32.max)))
            let dataOutCapacity = Int(min(chain.readableLength - UInt64(headerSize), UInt64(Int32.max)))
            if let transfer = unit.plannedTransfer(cdb, dataOutCapacity: dataOutCapacity, dataInCapacity: dataInCapacity),
               let vectors = chain.ioVectors(writable: !transfer.isWrite, skipping: UInt64(transfer.isWrite ? headerSize : responseSize),
                                             count: UInt64(transfer.byteCount), memory) {
                requestBytes = UInt64(transfer.byteCount)
                let job = IOJob(queue: queue, chain: chain, transfer: transfer, vectors: vectors,
                                dataInCapacity: dataInCapacity, generation: generation)
                if let pool {
                    if transferNow(transfer, vectors, pool: pool) { return finishTransfer(job, errno: nil, memory) }
                    pool.submit(job)
                    return nil
                }
                return finishTransfer(job, errno: unit.transfer(transfer, vectors: vectors), memory)
            }
        }
        let input = header.count < headerSize ? header
            : chain.readAll(memory, limit: headerSize + Int(SCSIDisk.maximumTransferBlocks * SCSIDisk.blockSize))
        guard input.count >= headerSize, chain.writableLength >= UInt64(responseSize) else {
            // Too short to carry a command or its answer: VIRTIO_SCSI_S_FAILURE if the response fits.
            var response = [UInt8](repeating: 0, count: min(Int(chain.writableLength), responseSize))
            if response.count >= 12 { response[11] = 9 }
            return UInt32(chain.write(response, memory))
        }
        let lun = Array(input[0..<8])
        let cdb = Array(input[19..<headerSize])
        let dataOut = Array(input[headerSize...])
        let dataInCapacity = Int(min(chain.writableLength - UInt64(responseSize), UInt64(Int32.max)))
        var response = [UInt8](repeating: 0, count: responseSize)
        var dataIn: [UInt8] = []
        let target = lun[0] == 1 ? lun[1] : 0xFF
        let lunNumber = (UInt16(lun[2]) << 8 | UInt16(lun[3])) & 0x3FFF
        if target != 0 {
            response[11] = 3  // VIRTIO_SCSI_S_BAD_TARGET
        } else if lunNumber != 0 {
            // No such LUN on this target: INQUIRY says so (peripheral qualifier 3), the rest fails.
            if cdb[0] == 0x12 {
                dataIn = [0x7F] + [UInt8](repeating: 0, count: 35)
            } else {
                response = self.response(status: .checkCondition, sense: SCSISense(key: 0x05, asc: 0x25, ascq: 0), residual: 0)
            }
        } else {
            let result = self.unit.execute(cdb, dataOut: dataOut, dataInCapacity: dataInCapacity)
            if let problem = self.unit.takeHostError() { runtime.log(.error, problem) }
            dataIn = Array(result.dataIn.prefix(dataInCapacity))
            response = self.response(status: result.status, sense: result.sense, residual: 0)
        }
        requestBytes = UInt64(dataOut.count + dataIn.count)
        setResidual(&response, UInt32(dataInCapacity - dataIn.count))
        var written = chain.write(response, memory)
        if !dataIn.isEmpty { written += chain.write(dataIn, at: UInt64(responseSize), memory) }
        return UInt32(written)
    }

    /// A WRITE done on this thread that took longer than this (the host throttles writers, or
    /// writes through to slow storage) sends WRITEs to the I/O threads for `slowWritePause`.
    static let slowWrite: UInt64 = 2_000_000
    static let slowWritePause: UInt64 = 1_000_000_000
    /// WRITEs go to the I/O threads until this time (monotonic nanoseconds).
    private var writesInPlaceFrom: UInt64 = 0
    private var slowWriteLogged = false

    /// Carries out `transfer` here at once if the host can do it without waiting for storage: a
    /// READ of data it has cached, a WRITE over data already in place (into its page cache). That
    /// beats an I/O thread: handing a request over and taking its completion back costs two
    /// thread wake-ups, more than the copy. False: it goes to the I/O threads.
    private func transferNow(_ transfer: SCSITransfer, _ vectors: [iovec], pool: IOPool) -> Bool {
        guard transfer.isWrite else {
            // Not past a WRITE still out: the READ might overtake it.
            return pool.writesInFlight == 0 && unit.transferIfImmediate(transfer, vectors: vectors, writes: false)
        }
        // Not past anything still out, which an overlapping WRITE must not overtake.
        let start = monotonicNanoseconds()
        guard pool.inFlight == 0, start >= writesInPlaceFrom else { return false }
        let done = unit.transferIfImmediate(transfer, vectors: vectors, writes: true)
        let took = monotonicNanoseconds() &- start
        if took > Self.slowWrite {
            writesInPlaceFrom = start &+ took &+ Self.slowWritePause
            if !slowWriteLogged {
                slowWriteLogged = true
                runtime.log(.info, "a write took \(took / 1_000_000) ms: writes go to the I/O threads for a while (not logged again)")
            }
        }
        return done
    }

    /// The virtio-scsi response for a planned transfer that ended (`errno` nil: it succeeded);
    /// returns the bytes written to the guest (the response, plus the data a READ brought).
    private func finishTransfer(_ job: IOJob, errno: Int32?, _ memory: GuestMemory) -> UInt32 {
        let result = unit.transferCompleted(job.transfer, errno: errno)
        if let problem = unit.takeHostError() { runtime.log(.error, problem) }
        let dataIn = !job.transfer.isWrite && result.status == .good ? job.transfer.byteCount : 0
        let reply = response(status: result.status, sense: result.sense, residual: UInt32(job.dataInCapacity - dataIn))
        return UInt32(job.chain.write(reply, memory) + dataIn)
    }

    /// struct virtio_scsi_cmd_resp with response VIRTIO_SCSI_S_OK: the SCSI status, the sense
    /// (for CHECK CONDITION, cut to the driver's sense_size) and the data-in residual.
    private func response(status: SCSIStatus, sense: SCSISense, residual: UInt32) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 12 + Int(senseSize))
        bytes[10] = status.rawValue
        if status == .checkCondition {
            let sense = sense.bytes.prefix(Int(senseSize))
            bytes.replaceSubrange(12..<(12 + sense.count), with: sense)
            bytes[0] = UInt8(sense.count)  // sense_len (le32)
        }
        setResidual(&bytes, residual)
        return bytes
    }

    private func setResidual(_ response: inout [UInt8], _ residual: UInt32) {
        for i in 0..<4 { response[4 + i] = UInt8(truncatingIfNeeded: residual >> (8 * UInt32(i))) }
    }
}

/// The qcow2 medium over its backing chain: each image the trusted side opened read-only, in
/// the format it named. The images' tables are parsed here, never by the trusted side beyond
/// their headers.
func qcow2Chain(top: FileDescriptor, settings: SCSIContract.Settings) throws(QCOW2Error) -> any BlockBackend {
    var backing: [(fd: Int32, qcow2: Bool)] = []
    for (depth, format) in settings.backingFormats.enumerated() {
        guard let file = runtime.hostFiles[SCSIContract.backingSlot(depth)] else {
            throw QCOW2Error("backing image \(depth + 1) of the chain was not handed over")
        }
        backing.append((file.rawValue, format == .qcow2))
    }
    return try QCOW2Backend.chain(top: top.rawValue, readOnly: settings.readOnly, backing: backing)
}

// The state page carries the transport's configuration and in-flight record: a killed adapter
// is restarted with every request it had taken resubmitted, and the guest never notices.
// State page layout (version 1): the virtio transport's configuration at 0, its in-flight record
// at 2048, the LUN's state at 3584.
let runtime = DeviceRuntime.startOrExit(name: "scsi", capabilities: [.registerRing, .interruptLevel, .msi, .statePage, .snapshot, .dirtyLog],
                                        stateVersion: 1)
let settings: SCSIContract.Settings
do { settings = try SCSIContract.Settings(decoding: runtime.config) } catch {
    runtime.log(.error, "\(error)")
    exit(2)
}
guard let image = runtime.hostFile(SCSIContract.HostFile.medium), let size = try? image.size(), size >= 0 else {
    runtime.log(.error, "no disk image was handed over")
    exit(2)
}
let unit: any SCSILogicalUnit
/// The medium's descriptor, kept open while it is in the drive.
nonisolated(unsafe) var mediumFile: FileDescriptor? = image
/// The adapter, once made (the media-change handler saves the LUN's state through it).
nonisolated(unsafe) var scsi: VirtioSCSI?
if settings.kind == .cdrom {
    // An empty file stands for an empty tray (the operator ejected the medium before a restart).
    let cd = SCSICDROM(medium: size >= 2048 ? FileBackend(fd: image.rawValue, byteCount: UInt64(size) & ~(SCSICDROM.blockSize - 1)) : nil)
    runtime.onMediaChange = { hostFile, file in
        guard hostFile == UInt32(SCSIContract.HostFile.medium.rawValue) else { return false }
        guard let file else {
            cd.changeMedium(nil)
            mediumFile = nil
            scsi?.saveLUN()
            return true
        }
        guard let newSize = try? file.size(), newSize >= 2048 else { return false }
        cd.changeMedium(FileBackend(fd: file.rawValue, byteCount: UInt64(newSize) & ~(SCSICDROM.blockSize - 1)))
        mediumFile = file
        scsi?.saveLUN()
        return true
    }
    unit = cd
} else {
    let backend: any BlockBackend
    switch settings.format {
    case .raw:
        backend = FileBackend(fd: image.rawValue, byteCount: UInt64(size) & ~(SCSIDisk.blockSize - 1))
    case .qcow2:
        do { backend = try qcow2Chain(top: image, settings: settings) } catch {
            runtime.log(.error, "\(error)")
            exit(2)
        }
    }
    unit = SCSIDisk(backend: backend, readOnly: settings.readOnly, serial: settings.serial)
}
// A CD-ROM serves its transfers inline, on the device's loop, where media changes are handled too.
let adapter = VirtioSCSI(runtime: runtime, unit: unit, ioThreads: settings.kind == .cdrom ? 0 : settings.ioThreads, rateLimit: settings.rateLimit)
scsi = adapter
// Before the transport resumes the queues (and resubmits what was in flight): the LUN's state first.
adapter.restoreLUN()
let transport = VirtioPCITransport(runtime: runtime, device: adapter)
// `hvctl set --rate`: a new rate limit applies at once, carrying over the bucket's debt; any
// other setting cannot change under a running guest.
runtime.onReconfigure = { config in
    guard let next = try? SCSIContract.Settings(decoding: config) else { return false }
    var unchanged = next
    unchanged.rateLimit = settings.rateLimit
    guard unchanged == settings else {
        runtime.log(.warning, "refused new settings: only the rate limit changes while the VM runs")
        return false
    }
    adapter.limiter = RateLimiter.changed(adapter.limiter, to: next.rateLimit)
    // Requests the old limit held back go now if the new one admits them.
    adapter.deadlineReached(now: monotonicNanoseconds(), transport: transport)
    return true
}
runtime.run(transport)

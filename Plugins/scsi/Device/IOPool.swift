import Glibc
import HVDeviceSDK
import HVSCSIDisk
import HVSys
import Synchronization

/// A READ or WRITE in flight: its request chain, the transfer the LUN planned, and the guest
/// buffers it moves bytes to or from.
struct IOJob: @unchecked Sendable {
    // @unchecked: `vectors` point into guest RAM, which stays mapped for the process's life; the
    // guest may change those bytes meanwhile, which only affects its own data (see
    // `DescriptorChain.ioVectors`). A job belongs to one thread at a time: the runtime thread,
    // then one worker, then the runtime thread again.
    let queue: Int
    let chain: DescriptorChain
    let transfer: SCSITransfer
    let vectors: [iovec]
    let dataInCapacity: Int
    /// The adapter's reset generation when it was taken: a reset forgets older requests.
    let generation: UInt64
    var errno: Int32?
}

/// Worker threads that carry out planned transfers, so several requests are in flight at once and
/// the runtime thread keeps taking requests (and serving registers) while the host does the I/O.
/// Data moves straight between the image and the guest's buffers (`preadv`/`pwritev`).
///
/// Threads are created after the device locked itself down; the scsi sandbox profile allows
/// `clone` only for threads (CLONE_THREAD | CLONE_VM), makes `clone3` fail with ENOSYS so libc
/// falls back to it, and caps the process at `nproc` tasks.
final class IOPool: @unchecked Sendable {
    // @unchecked: the queues are under mutexes; `unit` is used off the runtime thread only for
    // `transfer`, which reads nothing the runtime thread changes (a raw backend is immutable; a
    // qcow2 backend keeps its tables under its own lock).
    private let pendingJobs = Mutex<[IOJob]>([])
    private let finishedJobs = Mutex<[IOJob]>([])
    /// One count per pending job; each worker takes one at a time.
    private let work: EventFD
    /// Signalled when jobs finish; the runtime thread watches it.
    let completions: EventFD
    private let unit: any SCSILogicalUnit
    /// Jobs submitted and not yet taken back (runtime thread only).
    private(set) var inFlight = 0
    /// The WRITEs among them (runtime thread only).
    private(set) var writesInFlight = 0

    init(workers: Int, unit: any SCSILogicalUnit) throws(SystemError) {
        work = try EventFD(semaphore: true)
        completions = try EventFD(nonBlocking: true)
        self.unit = unit
        for i in 0..<workers {
            try HostThread.spawn(name: "scsi-io\(i)") { [self] in serve() }
        }
    }

    func submit(_ job: IOJob) {
        pendingJobs.withLock { $0.append(job) }
        inFlight += 1
        if job.transfer.isWrite { writesInFlight += 1 }
        work.signal()
    }

    /// Jobs finished since the last call, in the order they finished.
    func takeFinished() -> [IOJob] {
        _ = completions.drain()
        let jobs = finishedJobs.withLock { jobs -> [IOJob] in
            defer { jobs.removeAll(keepingCapacity: true) }
            return jobs
        }
        inFlight -= jobs.count
        writesInFlight -= jobs.reduce(0) { $0 + ($1.transfer.isWrite ? 1 : 0) }
        return jobs
    }

    /// Blocks until every submitted job finished; returns them (a reset waits for the I/O it
    /// cannot take back, as a real adapter lets its DMA finish).
    func drainAll() -> [IOJob] {
        var all: [IOJob] = []
        while inFlight > 0 {
            var pfd = pollfd(fd: completions.fd.rawValue, events: Int16(POLLIN), revents: 0)
            _ = poll(&pfd, 1, 100)
            all += takeFinished()
        }
        return all
    }

    private func serve() {
        while true {
            _ = work.drain()  // blocks; takes one (semaphore mode)
            guard var job = pendingJobs.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else { continue }
            job.errno = unit.transfer(job.transfer, vectors: job.vectors)
            finishedJobs.withLock { $0.append(job) }
            completions.signal()
        }
    }
}

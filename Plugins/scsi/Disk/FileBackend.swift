import CHVShim
import Glibc
import Synchronization

/// The image file as a block backend.
public final class FileBackend: BlockBackend, @unchecked Sendable {
    // @unchecked: `fd` and `byteCount` are immutable; `readsWithoutWaiting` is atomic.
    public let fd: Int32
    public let byteCount: UInt64
    /// Cleared when the host's kernel or file system refuses RWF_NOWAIT: no further tries.
    private let readsWithoutWaiting = Atomic<Bool>(true)
    /// `fd` is the open image (the device never opens files); `byteCount` whole sectors of it are the disk.
    public init(fd: Int32, byteCount: UInt64) {
        self.fd = fd
        self.byteCount = byteCount
    }
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int32? {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; return errno }
            if n == 0 {  // past the end of a file that shrank: zeros, as a sparse tail reads
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return nil
            }
            done += n
        }
        return nil
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Int32? {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; return errno }
            done += n
        }
        return nil
    }
    public func flush() -> Int32? { fdatasync(fd) == 0 ? nil : errno }

    public func read(into vectors: [iovec], count: Int, at offset: UInt64) -> Int32? {
        switch vectoredIO(fd, vectors, count: count, at: offset, { preadv($0, $1, $2, $3) }) {
        case .done: return nil
        case .failed(let e): return e
        case .ended(let rest):
            // Past the end of a file that shrank: the rest reads as zeros, as a sparse tail does.
            for v in rest { v.iov_base?.initializeMemory(as: UInt8.self, repeating: 0, count: v.iov_len) }
            return nil
        }
    }

    public func readIfCached(into vectors: [iovec], count: Int, at offset: UInt64) -> Bool {
        guard readsWithoutWaiting.load(ordering: .relaxed) else { return false }
        return readCachedWithoutWaiting(fd, vectors, count: count, at: offset) {
            readsWithoutWaiting.store(false, ordering: .relaxed)
        }
    }

    /// A raw image has no structure: every write is in place.
    public func writeInPlace(from vectors: [iovec], count: Int, at offset: UInt64) -> Bool {
        write(from: vectors, count: count, at: offset) == nil
    }

    public func write(from vectors: [iovec], count: Int, at offset: UInt64) -> Int32? {
        switch vectoredIO(fd, vectors, count: count, at: offset, { pwritev($0, $1, $2, $3) }) {
        case .done: return nil
        case .failed(let e): return e
        case .ended: return EIO
        }
    }

    public func discard(at offset: UInt64, count: UInt64) -> Int32? {
        // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: the blocks go back to the host.
        hv_fallocate(fd, 0x02 | 0x01, Int64(offset), Int64(count)) == 0 ? nil : errno
    }
}

/// Reads `count` bytes at `offset` of `fd` into `vectors` with RWF_NOWAIT; whether every byte
/// came from the page cache. A short read (part of the range cached), end of file, EAGAIN or any
/// error says no: the caller reads the whole range again the ordinary way, which handles each of
/// these. `unsupported` runs when the kernel or file system has no RWF_NOWAIT for reads.
func readCachedWithoutWaiting(_ fd: Int32, _ vectors: [iovec], count: Int, at offset: UInt64,
                              unsupported: () -> Void) -> Bool {
    switch vectoredIO(fd, vectors, count: count, at: offset, { hv_preadv_nowait($0, $1, $2, Int64($3)) }) {
    case .done: return true
    case .failed(let e):
        if e == EOPNOTSUPP || e == ENOSYS || e == EINVAL { unsupported() }
        return false
    case .ended: return false
    }
}

/// How a vectored transfer ended.
enum VectoredOutcome {
    case done
    case failed(Int32)
    /// The call moved nothing before `count` bytes: these vectors are left.
    case ended([iovec])
}

/// Runs `call` (preadv or pwritev on `fd`) until `count` bytes of `vectors` moved, resuming after
/// short transfers; shared by the raw and qcow2 backends.
func vectoredIO(_ fd: Int32, _ vectors: [iovec], count: Int, at offset: UInt64,
                _ call: (Int32, UnsafePointer<iovec>, Int32, off_t) -> Int) -> VectoredOutcome {
    var pending = vectors
    var done = 0
    while done < count {
        // At most IOV_MAX (1024) vectors per call; the loop goes on with the rest.
        let n = pending.withUnsafeBufferPointer { call(fd, $0.baseAddress!, Int32(min($0.count, 1024)), off_t(offset) + off_t(done)) }
        if n < 0 {
            if errno == EINTR { continue }
            return .failed(errno)
        }
        if n == 0 { return .ended(pending) }
        done += n
        // Drop what moved; trim the first vector left partly done.
        var skip = n
        while skip > 0, let first = pending.first {
            if skip >= first.iov_len {
                skip -= first.iov_len
                pending.removeFirst()
            } else {
                pending[0] = iovec(iov_base: first.iov_base.map { $0 + skip }, iov_len: first.iov_len - skip)
                skip = 0
            }
        }
    }
    return .done
}

import CHVShim
import Glibc

/// The image file as a block backend.
public final class FileBackend: BlockBackend {
    public let fd: Int32
    public let byteCount: UInt64
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
    public func discard(at offset: UInt64, count: UInt64) -> Int32? {
        // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: the blocks go back to the host.
        hv_fallocate(fd, 0x02 | 0x01, Int64(offset), Int64(count)) == 0 ? nil : errno
    }
}


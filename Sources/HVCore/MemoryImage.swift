import CHVShim
import Glibc
import HVSys

// Guest RAM to and from a snapshot's memory file. The file mirrors the RAM memfd byte for byte
// (same offsets) but is sparse: only runs of pages holding a non-zero byte are written, each
// with a CRC-32C, so a guest that touched 40 MiB of 1 GiB costs 40 MiB of disk and of copying.

/// lseek's whence values for sparse files (Linux), which Glibc's module does not export.
private let seekData: Int32 = 3, seekHole: Int32 = 4

extension GuestRAM {
    /// Largest run checksummed as one extent: a bad byte is located to within this much.
    static let maximumExtent: UInt64 = 64 << 20
    static let pageSize: UInt64 = 4096

    /// Whether the page at `offset` is all zeros (reads the mapping).
    func pageIsZero(_ offset: UInt64) -> Bool {
        // The mapping is page-aligned and `offset` a multiple of the page size.
        let words = UnsafeRawPointer(mapping.base + Int(offset)).assumingMemoryBound(to: UInt64.self)
        for i in 0..<Int(Self.pageSize / 8) where words[i] != 0 { return false }
        return true
    }

    /// Writes every page holding data to `file` at its memfd offset and sizes the file to the
    /// RAM's size; returns the extents written. The vCPUs and devices must not be writing RAM.
    func writeSparse(to file: FileDescriptor) throws(SnapshotError) -> [MemoryExtent] {
        var extents: [MemoryExtent] = []
        var position: UInt64 = 0
        while position < size {
            // SEEK_DATA/SEEK_HOLE skip what the guest never touched without reading it.
            let data = lseek(memfd.rawValue, off_t(position), seekData)
            if data < 0 { break }  // ENXIO: no data after position
            var hole = UInt64(lseek(memfd.rawValue, data, seekHole))
            if Int64(bitPattern: hole) < 0 || hole > size { hole = size }
            var page = UInt64(data) & ~(Self.pageSize - 1)
            while page < hole {
                // A run of non-zero pages, at most maximumExtent long.
                while page < hole && pageIsZero(page) { page += Self.pageSize }
                let start = page
                while page < hole && page - start < Self.maximumExtent && !pageIsZero(page) { page += Self.pageSize }
                guard page > start else { continue }
                let length = page - start
                let base = UnsafeRawPointer(mapping.base + Int(start))
                var written: UInt64 = 0
                while written < length {
                    let n = pwrite(file.rawValue, base + Int(written), Int(length - written), off_t(start + written))
                    if n < 0 && errno == EINTR { continue }
                    guard n > 0 else { throw SnapshotError("cannot write guest memory to the snapshot: \(Errno.current)") }
                    written += UInt64(n)
                }
                extents.append(MemoryExtent(offset: start, length: length, checksum: hv_crc32c(0, base, UInt(length))))
            }
            position = hole
        }
        guard ftruncate(file.rawValue, off_t(size)) == 0 else { throw SnapshotError("cannot size the snapshot's memory file: \(Errno.current)") }
        return extents
    }

    /// Reads `extents` of `file` into RAM and checks each one's checksum; `name` prefixes errors.
    /// RAM outside the extents stays as the memfd left it: zero.
    func load(_ extents: [MemoryExtent], from file: FileDescriptor, name: String) throws(SnapshotError) {
        for x in extents {
            guard x.offset + x.length <= size else { throw SnapshotError("\(name): memory extent at 0x\(String(x.offset, radix: 16)) lies outside guest RAM") }
            let base = mapping.base + Int(x.offset)
            var done: UInt64 = 0
            while done < x.length {
                let n = pread(file.rawValue, base + Int(done), Int(x.length - done), off_t(x.offset + done))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    throw SnapshotError(n == 0 ? "\(name): its memory file is truncated (it ends inside the extent at 0x\(String(x.offset, radix: 16)))"
                                               : "\(name): cannot read its memory file: \(Errno.current)")
                }
                done += UInt64(n)
            }
            guard hv_crc32c(0, UnsafeRawPointer(base), UInt(x.length)) == x.checksum else {
                throw SnapshotError("\(name): its memory is corrupt (the \(x.length) bytes at 0x\(String(x.offset, radix: 16)) fail their checksum)")
            }
        }
    }
}

import CHVShim
import CInflate
import Glibc
import Synchronization

/// A qcow2 image (version 2 or 3, 16-bit refcounts) as a block backend: guest offsets go
/// through the L1 and L2 tables to data clusters; a write to an unallocated cluster appends a
/// cluster to the file, counts it, and only then points the L2 entry at it (refcount before L2
/// before L1), so a process killed between two steps leaks a cluster at worst, never points at
/// garbage. Unallocated clusters read from the backing image, or as zeros; compressed clusters
/// (zlib, as `qemu-img convert -c` and cloud images write them) are inflated on read and
/// rewritten uncompressed when the guest writes them.
///
/// The image is hostile input: every table offset is checked against the file before it is
/// followed, and an entry pointing outside the image or over its header fails that request
/// (EIO, a MEDIUM ERROR to the guest) instead of being read or written.
///
/// Thread safety: the metadata (L1 table, refcount table, L2 cache, file end) is under one mutex;
/// data reads and overwrites of allocated clusters run outside it. `readIfCached` and
/// `writeInPlace` only try the lock, so the adapter's own thread never waits behind an I/O thread
/// that allocates.
public final class QCOW2Backend: BlockBackend, @unchecked Sendable {
    // @unchecked: `metadata` is a Mutex, `readsWithoutWaiting` atomic; `fd`, `header` and
    // `backing` are immutable. A backing backend is only read (FileBackend and QCOW2Backend
    // reads are safe from any thread).
    public let header: QCOW2Header
    public let byteCount: UInt64
    public let fd: Int32
    public let readOnly: Bool
    private let backing: (any BlockBackend)?
    private let metadata: Mutex<Metadata>
    /// Cleared when the host refuses RWF_NOWAIT reads of the image: no further tries.
    private let readsWithoutWaiting = Atomic<Bool>(true)

    /// L2 entry and L1 entry bits (the specification's names in comments).
    static let copiedFlag: UInt64 = 1 << 63       // QCOW_OFLAG_COPIED: refcount is exactly 1
    static let compressedFlag: UInt64 = 1 << 62   // QCOW_OFLAG_COMPRESSED
    static let zeroFlag: UInt64 = 1               // QCOW_OFLAG_ZERO (version 3)
    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00

    struct Metadata {
        var l1: [UInt64]
        var refcountTable: [UInt64]
        /// Where the refcount table is (it moves when it grows).
        var refcountTableOffset: UInt64
        /// Where the next cluster goes: the file's end, cluster-aligned.
        var fileEnd: UInt64
        /// L2 tables by offset; a handful (each one cluster).
        var l2Cache: [UInt64: [UInt64]] = [:]
        var l2Order: [UInt64] = []
        /// Every L2 table the L1 table names, and every refcount block: with the L1 and refcount
        /// tables, the clusters no guest data may live in (see `isStructure`).
        var l2Tables: Set<UInt64> = []
        var refcountBlocks: Set<UInt64> = []
    }

    /// Where a guest cluster's bytes are.
    enum Mapping: Equatable {
        case data(UInt64, copied: Bool)
        case zero
        case unallocated
        /// A compressed cluster: its L2 entry (host offset and sector count).
        case compressed(UInt64)
        case invalid
    }

    /// Opens `fd` (the image the trusted side opened and locked). `backing` serves unallocated
    /// clusters; nil reads them as zeros. Refuses, with the reason, an image hv cannot use.
    public init(fd: Int32, readOnly: Bool, backing: (any BlockBackend)? = nil) throws(QCOW2Error) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCOW2Error("cannot stat the image: errno \(errno)") }
        let fileSize = UInt64(st.st_size)
        var first = [UInt8](repeating: 0, count: 104)
        let n = first.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 72 else { throw QCOW2Error("the image is too short for a qcow2 header") }
        let header = try QCOW2Header.parse(Array(first.prefix(n)))
        try header.validate(fileSize: fileSize, readOnly: readOnly)
        let cluster = header.clusterSize
        func table(at offset: UInt64, entries: UInt64, _ what: String) throws(QCOW2Error) -> [UInt64] {
            var bytes = [UInt8](repeating: 0, count: Int(entries * 8))
            guard Self.readFully(fd, &bytes, at: offset) else { throw QCOW2Error("cannot read the qcow2 \(what)") }
            var out = [UInt64](repeating: 0, count: Int(entries))
            for i in 0..<Int(entries) { out[i] = bytes[i * 8..<i * 8 + 8].reduce(0) { $0 << 8 | UInt64($1) } }
            return out
        }
        let l1 = try table(at: header.l1TableOffset, entries: UInt64(header.l1Size), "L1 table")
        let refcounts = try table(at: header.refcountTableOffset, entries: UInt64(header.refcountTableClusters) * cluster / 8,
                                  "refcount table")
        for (i, o) in refcounts.enumerated() where o != 0 {
            guard o % cluster == 0, o >= cluster, o <= fileSize - min(fileSize, cluster) else {
                throw QCOW2Error("qcow2 refcount table entry \(i) points outside the image or over its header (offset \(o))")
            }
        }
        // No structure may lie in another: an L2 table or refcount block over the L1 or refcount
        // table, or an L2 table over a refcount block, would have hv's metadata updates rewrite
        // the other.
        var opened = Metadata(l1: l1, refcountTable: refcounts, refcountTableOffset: header.refcountTableOffset,
                              fileEnd: (fileSize + cluster - 1) / cluster * cluster)
        opened.refcountBlocks = Set(refcounts.filter { $0 != 0 })
        for o in opened.refcountBlocks where Self.inTables(o, header: header, opened) {
            throw QCOW2Error("qcow2 refcount block at offset \(o) lies in the image's L1 or refcount table")
        }
        for (i, e) in l1.enumerated() where e & Self.offsetMask != 0 {
            let o = e & Self.offsetMask
            guard o % cluster == 0, o >= cluster, o <= fileSize - min(fileSize, cluster) else {
                throw QCOW2Error("qcow2 L1 entry \(i) points outside the image or over its header (offset \(o))")
            }
            guard !Self.inTables(o, header: header, opened), !opened.refcountBlocks.contains(o) else {
                throw QCOW2Error("qcow2 L1 entry \(i) points at the image's L1 table, refcount table or a refcount block (offset \(o))")
            }
            opened.l2Tables.insert(o)
        }
        self.header = header
        self.fd = fd
        self.readOnly = readOnly
        self.backing = backing
        byteCount = header.size
        metadata = Mutex(opened)
        // Autoclear bits name extensions (bitmaps) hv does not keep up to date: a writer clears them.
        if !readOnly && header.autoclearFeatures != 0 {
            guard Self.writeFully(fd, [UInt8](repeating: 0, count: 8), at: QCOW2Header.autoclearFeaturesOffset) else {
                throw QCOW2Error("cannot clear the qcow2 autoclear features")
            }
        }
    }

    /// A qcow2 image over its backing chain (`backing`: nearest first, each read-only; raw
    /// layers are used at their file size), built from the bottom up.
    public static func chain(top: Int32, readOnly: Bool, backing: [(fd: Int32, qcow2: Bool)]) throws(QCOW2Error) -> QCOW2Backend {
        var below: (any BlockBackend)?
        for (depth, layer) in backing.enumerated().reversed() {
            if layer.qcow2 {
                do { below = try QCOW2Backend(fd: layer.fd, readOnly: true, backing: below) } catch {
                    throw QCOW2Error("backing image \(depth + 1): \(error)")
                }
            } else {
                var st = stat()
                guard fstat(layer.fd, &st) == 0 else { throw QCOW2Error("cannot stat backing image \(depth + 1)") }
                below = FileBackend(fd: layer.fd, byteCount: UInt64(st.st_size))
            }
        }
        return try QCOW2Backend(fd: top, readOnly: readOnly, backing: below)
    }

    // MARK: Reads

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int32? {
        let cluster = header.clusterSize
        var done = 0
        while done < buffer.count {
            let at = offset + UInt64(done)
            let inCluster = at & (cluster - 1)
            let n = min(Int(cluster - inCluster), buffer.count - done)
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n])
            let mapping = metadata.withLock { lookup(at, &$0) }
            switch mapping {
            case .data(let host, _):
                guard Self.readFully(fd, piece, at: host + inCluster) else { return EIO }
            case .zero:
                piece.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                if let e = readBelow(into: piece, at: at) { return e }
            case .compressed(let entry):
                guard let content = inflate(entry, fileEnd: metadata.withLock { $0.fileEnd }) else { return EIO }
                content.withUnsafeBytes { piece.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(inCluster)..<Int(inCluster) + n])) }
            case .invalid:
                return EIO
            }
            done += n
        }
        return nil
    }

    /// Where a compressed cluster's deflate stream lies in the file: its offset and length
    /// (the specification: `62 - (cluster_bits - 8)` bits of offset, then the count of 512-byte
    /// sectors it runs on beyond the first).
    private func compressedExtent(_ entry: UInt64) -> (offset: UInt64, length: UInt64) {
        let offsetBits = UInt64(62 - (header.clusterBits - 8))
        let offset = entry & ((1 << offsetBits) - 1)
        let sectors = (entry & ~Self.compressedFlag & ~Self.copiedFlag) >> offsetBits
        return (offset, (sectors + 1) * 512 - (offset & 511))
    }

    /// A compressed cluster, inflated; nil when its stream lies outside the file or is corrupt.
    private func inflate(_ entry: UInt64, fileEnd: UInt64) -> [UInt8]? {
        let cluster = header.clusterSize
        let (offset, length) = compressedExtent(entry)
        // A stream longer than two clusters is no compressed cluster QEMU writes: refuse it
        // before reading anything.
        guard offset >= cluster, offset < fileEnd, length <= 2 * cluster else { return nil }
        var stream = [UInt8](repeating: 0, count: Int(min(length, fileEnd - offset)))
        let got = stream.withUnsafeMutableBytes { buffer -> Int in
            var done = 0
            while done < buffer.count {
                let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }  // the last stream may end with the file
                done += n
            }
            return done
        }
        var content = [UInt8](repeating: 0, count: Int(cluster))
        let status = stream.withUnsafeBytes { input in
            content.withUnsafeMutableBytes { hv_inflate_raw(input.baseAddress, got, $0.baseAddress, $0.count) }
        }
        return status == 0 ? content : nil
    }

    /// What lies under this image at `at`: the backing image's bytes (zeros past its end), or zeros.
    private func readBelow(into piece: UnsafeMutableRawBufferPointer, at: UInt64) -> Int32? {
        guard let backing, at < backing.byteCount else {
            piece.initializeMemory(as: UInt8.self, repeating: 0)
            return nil
        }
        let available = Int(min(UInt64(piece.count), backing.byteCount - at))
        if let e = backing.read(into: UnsafeMutableRawBufferPointer(rebasing: piece[0..<available]), at: at) { return e }
        if available < piece.count {
            UnsafeMutableRawBufferPointer(rebasing: piece[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        return nil
    }

    // MARK: Writes

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Int32? {
        guard !readOnly else { return EROFS }
        let cluster = header.clusterSize
        var done = 0
        while done < buffer.count {
            let at = offset + UInt64(done)
            let inCluster = at & (cluster - 1)
            let n = min(Int(cluster - inCluster), buffer.count - done)
            let piece = UnsafeRawBufferPointer(rebasing: buffer[done..<done + n])
            // An overwrite of a cluster this image owns goes straight to it; anything else
            // allocates, under the lock, so two writers never allocate one cluster twice.
            let mapping = metadata.withLock { lookup(at, &$0) }
            if case .data(let host, copied: true) = mapping {
                guard Self.writeFully(fd, piece, at: host + inCluster) else { return errno == 0 ? EIO : errno }
            } else {
                let failure: Int32? = metadata.withLock { m in allocateAndWrite(piece, at: at, &m) }
                if let failure { return failure }
            }
            done += n
        }
        return nil
    }

    /// Writes `piece` (within one cluster) into a new cluster holding what the guest saw there
    /// before, then counts it and points the L2 entry at it.
    private func allocateAndWrite(_ piece: UnsafeRawBufferPointer, at: UInt64, _ m: inout Metadata) -> Int32? {
        let cluster = header.clusterSize
        let start = at & ~(cluster - 1)
        let inCluster = Int(at - start)
        let old = lookup(at, &m)  // again: another writer may have allocated it meanwhile
        var content: [UInt8]
        switch old {
        case .data(let host, copied: true):
            return Self.writeFully(fd, piece, at: host + UInt64(inCluster)) ? nil : EIO
        case .data(let host, copied: false):
            // Shared with something else (hv refuses writable images with snapshots, so only a
            // damaged image gets here): copy it before writing.
            content = [UInt8](repeating: 0, count: Int(cluster))
            guard Self.readFully(fd, &content, at: host) else { return EIO }
        case .zero:
            content = [UInt8](repeating: 0, count: Int(cluster))
        case .unallocated:
            content = [UInt8](repeating: 0, count: Int(cluster))
            if piece.count < Int(cluster),
               let e = content.withUnsafeMutableBytes({ readBelow(into: $0, at: start) }) { return e }
        case .compressed(let entry):
            guard let inflated = inflate(entry, fileEnd: m.fileEnd) else { return EIO }
            content = inflated
        case .invalid:
            return EIO
        }
        content.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: inCluster).copyMemory(from: piece.baseAddress!, byteCount: piece.count) }
        let host = m.fileEnd
        guard Self.writeFully(fd, content, at: host) else { return EIO }
        m.fileEnd += cluster
        if let e = setRefcount(host, 1, &m) { return e }
        if let e = setL2(at, host | Self.copiedFlag, &m) { return e }
        switch old {
        case .data(let previous, _): _ = release(previous, &m)
        case .compressed(let entry): releaseCompressed(entry, &m)
        default: break
        }
        return nil
    }

    /// Drops the references a compressed cluster's stream holds on the host clusters it spans.
    private func releaseCompressed(_ entry: UInt64, _ m: inout Metadata) {
        let cluster = header.clusterSize
        let (offset, length) = compressedExtent(entry)
        guard offset >= cluster, length <= 2 * cluster else { return }
        for host in stride(from: offset & ~(cluster - 1), through: (offset + length - 1) & ~(cluster - 1), by: Int(cluster)) {
            _ = release(host, &m)
        }
    }

    public func flush() -> Int32? { fdatasync(fd) == 0 ? nil : errno }

    /// Whole clusters in the range stop being allocated (version 3 marks them zero, so a backing
    /// image does not show through; version 2 without one forgets them) and give their space back
    /// to the host; the rest of the range is written with zeros.
    public func discard(at offset: UInt64, count: UInt64) -> Int32? {
        guard !readOnly else { return EROFS }
        let cluster = header.clusterSize
        var at = offset
        let end = offset + count
        while at < end {
            let n = min(cluster - (at & (cluster - 1)), end - at)
            if n == cluster && (header.version == 3 || backing == nil) {
                let failure: Int32? = metadata.withLock { m in
                    let old = lookup(at, &m)
                    if old == .unallocated && backing == nil { return nil }
                    if old == .zero { return nil }
                    if let e = setL2(at, header.version == 3 ? Self.zeroFlag : 0, &m) { return e }
                    if case .data(let host, _) = old { return release(host, &m) }
                    if case .compressed(let entry) = old { releaseCompressed(entry, &m) }
                    return nil
                }
                if let failure { return failure }
            } else {
                let zeros = [UInt8](repeating: 0, count: Int(n))
                if let e = zeros.withUnsafeBytes({ write($0, at: at) }) { return e }
            }
            at += n
        }
        return nil
    }

    // MARK: Resizing (no VM holds the image)

    /// Grows the image in `fd` to `size` bytes: a larger L1 table first when the current one
    /// cannot address the new size (written and counted at the file's end, switched to by one
    /// header write, the old one released), then the size field. The image must not be in use.
    public static func grow(fd: Int32, to size: UInt64) throws(QCOW2Error) {
        let image = try QCOW2Backend(fd: fd, readOnly: false)
        let header = image.header
        guard size > header.size else { throw QCOW2Error("the image is already \(header.size) bytes; hv only grows images") }
        guard size <= QCOW2Header.maximumVirtualSize else { throw QCOW2Error("\(size) bytes is larger than hv supports") }
        let needed = (size + header.bytesPerL1Entry - 1) / header.bytesPerL1Entry
        guard needed <= QCOW2Header.maximumL1Entries else { throw QCOW2Error("\(size) bytes needs a larger cluster size than this image's") }
        let failure: Int32? = image.metadata.withLock { m in
            guard needed > UInt64(m.l1.count) else { return nil }
            let cluster = header.clusterSize
            let clusters = (needed * 8 + cluster - 1) / cluster
            let table = m.fileEnd
            var bytes = [UInt8](repeating: 0, count: Int(clusters * cluster))
            for (i, e) in m.l1.enumerated() { bytes.replaceSubrange(i * 8..<i * 8 + 8, with: bigEndian(e)) }
            guard writeFully(fd, bytes, at: table) else { return EIO }
            m.fileEnd += clusters * cluster
            for c in stride(from: table, to: table + clusters * cluster, by: Int(cluster)) {
                if let e = image.setRefcount(c, 1, &m) { return e }
            }
            guard fdatasync(fd) == 0 else { return errno }
            // l1_size (4 bytes at 36) and l1_table_offset (8 at 40), in one write.
            let fields = (0..<4).map { UInt8(truncatingIfNeeded: UInt32(needed) >> UInt32(24 - 8 * $0)) } + bigEndian(table)
            guard writeFully(fd, fields, at: 36), fdatasync(fd) == 0 else { return EIO }
            let oldClusters = (UInt64(m.l1.count) * 8 + cluster - 1) / cluster
            for c in stride(from: header.l1TableOffset, to: header.l1TableOffset + oldClusters * cluster, by: Int(cluster)) {
                _ = image.release(c, &m)
            }
            m.l1 += [UInt64](repeating: 0, count: Int(needed) - m.l1.count)
            return nil
        }
        if let failure { throw QCOW2Error("cannot grow the L1 table: \(String(cString: strerror(failure)))") }
        guard writeFully(fd, bigEndian(size), at: 24), fdatasync(fd) == 0 else {
            throw QCOW2Error("cannot write the new size: \(String(cString: strerror(errno)))")
        }
    }

    /// Whether this image itself holds the cluster at guest offset `at` (data, compressed data or
    /// a zero marker), rather than leaving it to its backing image.
    public func holdsCluster(at: UInt64) -> Bool {
        switch metadata.withLock({ lookup(at, &$0) }) {
        case .data, .zero, .compressed: true
        case .unallocated, .invalid: false
        }
    }

    // MARK: Vectored I/O (guest buffers)

    /// Reads `count` bytes at `offset` into `vectors`: one `preadv` per run of clusters that lie
    /// one after another in the file (a whole request, in an image `qemu-img convert` wrote or hv
    /// filled in order), straight into the guest's buffers.
    public func read(into vectors: [iovec], count: Int, at offset: UInt64) -> Int32? {
        let runs = extents(at: offset, count: count)
        return forEachExtent(runs, vectors) { extent, pieces in
            if case .data(let host, _) = extent.mapping {
                return transfer(pieces, at: host, { preadv($0, $1, $2, $3) })
            }
            for (i, v) in pieces.enumerated() {
                let at = extent.at + UInt64(pieces[..<i].reduce(0) { $0 + $1.iov_len })
                if let e = read(into: UnsafeMutableRawBufferPointer(start: v.iov_base, count: v.iov_len), at: at) { return e }
            }
            return nil
        }
    }

    public func readIfCached(into vectors: [iovec], count: Int, at offset: UInt64) -> Bool {
        guard readsWithoutWaiting.load(ordering: .relaxed),
              // A writer allocating holds the lock across its I/O: never wait for it.
              let found = metadata.withLockIfAvailable({ extents(at: offset, count: count, &$0, cachedTablesOnly: true) }),
              let runs = found else { return false }
        // EAGAIN stands for "would wait" inside the walk; any other failure too ends it.
        let outcome = forEachExtent(runs, vectors) { extent, pieces in
            switch extent.mapping {
            case .data(let host, _):
                let cached = readCachedWithoutWaiting(fd, pieces, count: extent.length, at: host) {
                    readsWithoutWaiting.store(false, ordering: .relaxed)
                }
                return cached ? nil : EAGAIN
            case .zero:
                for v in pieces { v.iov_base?.initializeMemory(as: UInt8.self, repeating: 0, count: v.iov_len) }
                return nil
            case .unallocated:
                guard let backing else {
                    for v in pieces { v.iov_base?.initializeMemory(as: UInt8.self, repeating: 0, count: v.iov_len) }
                    return nil
                }
                // Within the backing image: its own cached read; past its end, the ordinary path.
                guard extent.at + UInt64(extent.length) <= backing.byteCount else { return EAGAIN }
                return backing.readIfCached(into: pieces, count: extent.length, at: extent.at) ? nil : EAGAIN
            case .compressed, .invalid:
                return EAGAIN  // inflating is work, and an invalid entry's error is the ordinary path's to report
            }
        }
        return outcome == nil
    }

    /// Writes `count` bytes from `vectors` at `offset`: overwrites of clusters this image owns
    /// go out in one `pwritev` per run of clusters that lie one after another in the file;
    /// anything else allocates.
    public func write(from vectors: [iovec], count: Int, at offset: UInt64) -> Int32? {
        guard !readOnly else { return EROFS }
        let runs = extents(at: offset, count: count)
        return forEachExtent(runs, vectors) { extent, pieces in
            if case .data(let host, copied: true) = extent.mapping {
                return transfer(pieces, at: host, { pwritev($0, $1, $2, $3) })
            }
            // Looked up again under the lock as it allocates: another writer may have meanwhile.
            for (i, v) in pieces.enumerated() {
                let at = extent.at + UInt64(pieces[..<i].reduce(0) { $0 + $1.iov_len })
                if let e = write(UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len), at: at) { return e }
            }
            return nil
        }
    }

    public func writeInPlace(from vectors: [iovec], count: Int, at offset: UInt64) -> Bool {
        guard !readOnly,
              let found = metadata.withLockIfAvailable({ extents(at: offset, count: count, &$0, cachedTablesOnly: true) }),
              let runs = found,
              runs.allSatisfy({ if case .data(_, copied: true) = $0.mapping { true } else { false } }) else { return false }
        return forEachExtent(runs, vectors) { extent, pieces in
            guard case .data(let host, _) = extent.mapping else { return EAGAIN }
            return transfer(pieces, at: host, { pwritev($0, $1, $2, $3) })
        } == nil
    }

    /// A run of guest bytes with one mapping: `.data`'s host offset is that of the run's first
    /// byte, and a data run may span clusters that lie one after another in the file; any other
    /// run is one cluster's share of the request.
    struct Extent: Equatable {
        let at: UInt64
        var length: Int
        let mapping: Mapping
    }

    /// The runs `count` bytes at `offset` map to, in order. With `cachedTablesOnly`, nil when a
    /// lookup would have to read an L2 table from the file.
    private func extents(at offset: UInt64, count: Int, _ m: inout Metadata, cachedTablesOnly: Bool) -> [Extent]? {
        let cluster = header.clusterSize
        var runs: [Extent] = []
        var done = 0
        while done < count {
            let at = offset + UInt64(done)
            let n = min(Int(cluster - (at & (cluster - 1))), count - done)
            if cachedTablesOnly && !tableIsCached(for: at, m) { return nil }
            var mapping = lookup(at, &m)
            if case .data(let host, let copied) = mapping {
                mapping = .data(host + (at & (cluster - 1)), copied: copied)
                if let last = runs.last, case .data(let lastHost, let lastCopied) = last.mapping,
                   lastCopied == copied, lastHost + UInt64(last.length) == host + (at & (cluster - 1)) {
                    runs[runs.count - 1].length += n
                    done += n
                    continue
                }
            }
            runs.append(Extent(at: at, length: n, mapping: mapping))
            done += n
        }
        return runs
    }

    /// The runs `count` bytes at `offset` map to, in order (under the lock; tables read as needed).
    func extents(at offset: UInt64, count: Int) -> [Extent] {
        metadata.withLock { extents(at: offset, count: count, &$0, cachedTablesOnly: false) ?? [] }
    }

    /// Calls `body` with each run and the parts of `vectors` that hold its bytes; stops at the
    /// first failure.
    private func forEachExtent(_ runs: [Extent], _ vectors: [iovec], _ body: (Extent, [iovec]) -> Int32?) -> Int32? {
        var vectorIndex = 0, vectorOffset = 0
        for run in runs {
            var pieces: [iovec] = []
            var gathered = 0
            while gathered < run.length {
                guard vectorIndex < vectors.count, let base = vectors[vectorIndex].iov_base else { return EFAULT }
                let v = vectors[vectorIndex]
                let n = min(v.iov_len - vectorOffset, run.length - gathered)
                pieces.append(iovec(iov_base: base + vectorOffset, iov_len: n))
                gathered += n
                vectorOffset += n
                if vectorOffset == v.iov_len {
                    vectorIndex += 1
                    vectorOffset = 0
                }
            }
            if let e = body(run, pieces) { return e }
        }
        return nil
    }

    /// One data run's buffers to or from the file at `host`; data clusters lie within the file,
    /// so running out of file is an I/O error.
    private func transfer(_ pieces: [iovec], at host: UInt64, _ call: (Int32, UnsafePointer<iovec>, Int32, off_t) -> Int) -> Int32? {
        switch vectoredIO(fd, pieces, count: pieces.reduce(0) { $0 + $1.iov_len }, at: host, call) {
        case .done: nil
        case .failed(let e): e
        case .ended: EIO
        }
    }

    // MARK: Metadata (under the lock)

    /// The mapping of guest offset `at`.
    private func lookup(_ at: UInt64, _ m: inout Metadata) -> Mapping {
        let cluster = header.clusterSize
        let l1Index = Int(at / header.bytesPerL1Entry)
        guard l1Index < m.l1.count else { return .unallocated }
        let l2Offset = m.l1[l1Index] & Self.offsetMask
        guard l2Offset != 0 else { return .unallocated }
        guard let table = l2Table(l2Offset, &m) else { return .invalid }
        let entry = table[Int((at / cluster) % header.l2Entries)]
        if entry & Self.compressedFlag != 0 { return .compressed(entry) }
        if header.version == 3 && entry & Self.zeroFlag != 0 { return .zero }
        let host = entry & Self.offsetMask
        guard host != 0 else { return .unallocated }
        guard host % cluster == 0, host >= cluster, host <= m.fileEnd - min(m.fileEnd, cluster) else { return .invalid }
        // Guest data over the image's own metadata: a write there would rewrite the tables (the
        // qcow2-image fuzz target's find). The request fails; the metadata stays as it is.
        guard !isStructure(host, m) else { return .invalid }
        return .data(host, copied: entry & Self.copiedFlag != 0)
    }

    /// Whether looking `at` up reads nothing from the file: its L2 table is cached, or it has none.
    private func tableIsCached(for at: UInt64, _ m: Metadata) -> Bool {
        let l1Index = Int(at / header.bytesPerL1Entry)
        guard l1Index < m.l1.count else { return true }
        let l2Offset = m.l1[l1Index] & Self.offsetMask
        return l2Offset == 0 || m.l2Cache[l2Offset] != nil
    }

    /// Whether the cluster at `host` lies in the L1 table or the refcount table.
    private static func inTables(_ host: UInt64, header: QCOW2Header, _ m: Metadata) -> Bool {
        let cluster = header.clusterSize
        func within(_ start: UInt64, _ bytes: UInt64) -> Bool { host >= start && host - start < (bytes + cluster - 1) / cluster * cluster }
        return within(header.l1TableOffset, UInt64(m.l1.count) * 8) || within(m.refcountTableOffset, UInt64(m.refcountTable.count) * 8)
    }

    /// Whether the cluster at `host` holds metadata: the L1 table, the refcount table, a refcount
    /// block or an L2 table.
    private func isStructure(_ host: UInt64, _ m: Metadata) -> Bool {
        Self.inTables(host, header: header, m) || m.refcountBlocks.contains(host) || m.l2Tables.contains(host)
    }

    /// The L2 table at `offset`, read (and checked) once and cached.
    private func l2Table(_ offset: UInt64, _ m: inout Metadata) -> [UInt64]? {
        if let table = m.l2Cache[offset] { return table }
        let cluster = header.clusterSize
        guard offset % cluster == 0, offset >= cluster, offset <= m.fileEnd - min(m.fileEnd, cluster),
              !Self.inTables(offset, header: header, m), !m.refcountBlocks.contains(offset) else { return nil }
        var bytes = [UInt8](repeating: 0, count: Int(cluster))
        guard Self.readFully(fd, &bytes, at: offset) else { return nil }
        var table = [UInt64](repeating: 0, count: Int(header.l2Entries))
        for i in table.indices { table[i] = bytes[i * 8..<i * 8 + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        cache(offset, table, &m)
        return table
    }

    private func cache(_ offset: UInt64, _ table: [UInt64], _ m: inout Metadata) {
        if m.l2Cache[offset] == nil {
            m.l2Order.append(offset)
            if m.l2Order.count > 32 { m.l2Cache[m.l2Order.removeFirst()] = nil }
        }
        m.l2Cache[offset] = table
    }

    /// Points guest offset `at`'s L2 entry at `value`, making the L2 table first if there is none.
    private func setL2(_ at: UInt64, _ value: UInt64, _ m: inout Metadata) -> Int32? {
        let cluster = header.clusterSize
        let l1Index = Int(at / header.bytesPerL1Entry)
        guard l1Index < m.l1.count else { return EIO }
        var l2Offset = m.l1[l1Index] & Self.offsetMask
        if l2Offset == 0 {
            // A new, empty table: written and counted before the L1 entry names it.
            l2Offset = m.fileEnd
            guard Self.writeFully(fd, [UInt8](repeating: 0, count: Int(cluster)), at: l2Offset) else { return EIO }
            m.fileEnd += cluster
            if let e = setRefcount(l2Offset, 1, &m) { return e }
            let entry = l2Offset | Self.copiedFlag
            guard Self.writeFully(fd, Self.bigEndian(entry), at: header.l1TableOffset + UInt64(l1Index) * 8) else { return EIO }
            m.l1[l1Index] = entry
            m.l2Tables.insert(l2Offset)
            cache(l2Offset, [UInt64](repeating: 0, count: Int(header.l2Entries)), &m)
        }
        guard var table = l2Table(l2Offset, &m) else { return EIO }
        let index = Int((at / cluster) % header.l2Entries)
        guard Self.writeFully(fd, Self.bigEndian(value), at: l2Offset + UInt64(index) * 8) else { return EIO }
        table[index] = value
        cache(l2Offset, table, &m)
        return nil
    }

    /// Drops one reference to the cluster at `host`; at zero its space goes back to the host.
    private func release(_ host: UInt64, _ m: inout Metadata) -> Int32? {
        guard let count = refcount(host, &m), count > 0 else { return nil }
        if let e = setRefcount(host, count - 1, &m) { return e }
        if count == 1 { _ = hv_fallocate(fd, 0x02 | 0x01, Int64(host), Int64(header.clusterSize)) }  // PUNCH_HOLE | KEEP_SIZE
        return nil
    }

    /// The refcount of the cluster at `host`; nil when its block cannot be read.
    func refcount(_ host: UInt64, _ m: inout Metadata) -> UInt16? {
        let index = host / header.clusterSize
        let blockIndex = Int(index / header.refcountsPerBlock)
        guard blockIndex < m.refcountTable.count else { return 0 }
        let block = m.refcountTable[blockIndex]
        guard block != 0 else { return 0 }
        var bytes: [UInt8] = [0, 0]
        guard Self.readFully(fd, &bytes, at: block + (index % header.refcountsPerBlock) * 2) else { return nil }
        return UInt16(bytes[0]) << 8 | UInt16(bytes[1])
    }

    /// Sets the refcount of the cluster at `host`, making refcount blocks (and a larger refcount
    /// table) as needed.
    private func setRefcount(_ host: UInt64, _ value: UInt16, _ m: inout Metadata) -> Int32? {
        let index = host / header.clusterSize
        let blockIndex = Int(index / header.refcountsPerBlock)
        if blockIndex >= m.refcountTable.count, let e = growRefcountTable(toCover: blockIndex, &m) { return e }
        if m.refcountTable[blockIndex] == 0, let e = addRefcountBlock(blockIndex, &m) { return e }
        let at = m.refcountTable[blockIndex] + (index % header.refcountsPerBlock) * 2
        return Self.writeFully(fd, [UInt8(value >> 8), UInt8(value & 0xFF)], at: at) ? nil : EIO
    }

    /// A new refcount block for table entry `blockIndex`, at the file's end, counting itself.
    private func addRefcountBlock(_ blockIndex: Int, _ m: inout Metadata) -> Int32? {
        let cluster = header.clusterSize
        let block = m.fileEnd
        guard Self.writeFully(fd, [UInt8](repeating: 0, count: Int(cluster)), at: block) else { return EIO }
        m.fileEnd += cluster
        guard Self.writeFully(fd, Self.bigEndian(block), at: m.refcountTableOffset + UInt64(blockIndex) * 8) else { return EIO }
        m.refcountTable[blockIndex] = block
        m.refcountBlocks.insert(block)
        // The block's own count: in itself when it covers its own cluster, else in another block.
        return setRefcount(block, 1, &m)
    }

    /// Moves the refcount table to the file's end with room for entry `blockIndex` and the blocks
    /// that count the new table itself; the header switches to it in one write; the old table's
    /// clusters are released.
    private func growRefcountTable(toCover blockIndex: Int, _ m: inout Metadata) -> Int32? {
        let cluster = header.clusterSize
        let perBlock = header.refcountsPerBlock
        var entries = max(UInt64(blockIndex + 1), UInt64(m.refcountTable.count) * 2)
        var newTable: [UInt64] = []
        var tableOffset: UInt64 = 0
        var tableClusters: UInt64 = 0
        var newBlocks: [UInt64] = []
        // The new table and any new blocks lie past the current end; size it until it covers them.
        while true {
            tableClusters = (entries * 8 + cluster - 1) / cluster
            guard tableClusters * cluster <= QCOW2Header.maximumRefcountTableBytes else { return EFBIG }
            newTable = m.refcountTable + [UInt64](repeating: 0, count: Int(entries) - m.refcountTable.count)
            tableOffset = m.fileEnd
            var end = tableOffset + tableClusters * cluster
            newBlocks = []
            var pending = Array(stride(from: tableOffset, to: end, by: Int(cluster)))
            var fits = true
            while let c = pending.popLast() {
                let b = Int(c / cluster / perBlock)
                guard b < newTable.count else { fits = false; break }
                if newTable[b] == 0 {
                    newTable[b] = end
                    newBlocks.append(end)
                    pending.append(end)
                    end += cluster
                }
            }
            if fits { break }
            entries *= 2
        }
        // Blocks (zeroed), then every new cluster's count, then the table, then the header.
        for block in newBlocks {
            guard Self.writeFully(fd, [UInt8](repeating: 0, count: Int(cluster)), at: block) else { return EIO }
        }
        let newEnd = tableOffset + tableClusters * cluster + UInt64(newBlocks.count) * cluster
        var bytes = [UInt8](repeating: 0, count: Int(tableClusters * cluster))
        for (i, e) in newTable.enumerated() { bytes.replaceSubrange(i * 8..<i * 8 + 8, with: Self.bigEndian(e)) }
        guard Self.writeFully(fd, bytes, at: tableOffset) else { return EIO }
        let oldOffset = m.refcountTableOffset
        let oldClusters = UInt64(m.refcountTable.count) * 8 / cluster
        m.fileEnd = newEnd
        m.refcountTable = newTable
        m.refcountBlocks.formUnion(newBlocks)
        for c in stride(from: tableOffset, to: newEnd, by: Int(cluster)) {
            let index = c / cluster
            let at = newTable[Int(index / perBlock)] + (index % perBlock) * 2
            guard Self.writeFully(fd, [0, 1], at: at) else { return EIO }
        }
        guard fdatasync(fd) == 0 else { return errno }
        var fields = Self.bigEndian(tableOffset)
        fields += (0..<4).map { UInt8(truncatingIfNeeded: UInt32(tableClusters) >> UInt32(24 - 8 * $0)) }
        guard Self.writeFully(fd, fields, at: QCOW2Header.refcountTableFieldsOffset) else { return EIO }
        guard fdatasync(fd) == 0 else { return errno }
        m.refcountTableOffset = tableOffset
        for c in stride(from: oldOffset, to: oldOffset + oldClusters * cluster, by: Int(cluster)) { _ = release(c, &m) }
        return nil
    }

    // MARK: I/O helpers

    static func bigEndian(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> UInt64(56 - 8 * $0)) } }

    static func readFully(_ fd: Int32, _ bytes: inout [UInt8], at offset: UInt64) -> Bool {
        bytes.withUnsafeMutableBytes { readFully(fd, $0, at: offset) }
    }

    static func readFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    static func writeFully(_ fd: Int32, _ bytes: [UInt8], at offset: UInt64) -> Bool {
        bytes.withUnsafeBytes { writeFully(fd, $0, at: offset) }
    }

    static func writeFully(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }
}

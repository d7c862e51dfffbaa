import Glibc

/// Why a qcow2 image cannot be used, in words an operator can act on.
public struct QCOW2Error: Error, Equatable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A qcow2 header (versions 2 and 3, the QEMU image format specification), parsed and checked
/// against the file it came from before anything in the file is trusted. Shared by the trusted
/// side (`hvctl disk info`, `disk create`, opening a `--disk`) and the disk process.
public struct QCOW2Header: Equatable, Sendable {
    public static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB]  // "QFI\xfb"
    /// Sizes the specification and QEMU bound: 32 MiB of L1 table, 8 MiB of refcount table.
    public static let maximumL1Entries: UInt64 = (32 << 20) / 8
    public static let maximumRefcountTableBytes: UInt64 = 8 << 20
    /// Virtual sizes above 2^55 bytes cannot be addressed with 9-bit clusters' tables anyway.
    public static let maximumVirtualSize: UInt64 = 1 << 55
    public static let maximumBackingNameBytes: UInt32 = 1023

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    /// The virtual disk's size in bytes.
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    /// Entries in one L2 table (one cluster of 8-byte entries).
    public var l2Entries: UInt64 { clusterSize / 8 }
    /// Bytes of guest disk one L1 entry covers.
    public var bytesPerL1Entry: UInt64 { clusterSize * l2Entries }
    /// Refcounts in one refcount block (16-bit entries).
    public var refcountsPerBlock: UInt64 { clusterSize / 2 }

    /// Byte offsets of the fields the disk process rewrites.
    static let autoclearFeaturesOffset: UInt64 = 88
    static let refcountTableFieldsOffset: UInt64 = 48

    /// The header's fields from the file's first bytes (at least 72; 104 for version 3). Checks
    /// only what needs no file size; `validate(fileSize:readOnly:)` does the rest.
    public static func parse(_ b: [UInt8]) throws(QCOW2Error) -> QCOW2Header {
        guard b.count >= 72, Array(b[0..<4]) == magic else { throw QCOW2Error("not a qcow2 image (no QFI\\xfb magic)") }
        func u32(_ o: Int) -> UInt32 { b[o..<o + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        func u64(_ o: Int) -> UInt64 { b[o..<o + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        let version = u32(4)
        guard version == 2 || version == 3 else { throw QCOW2Error("qcow2 version \(version) is not supported (2 and 3 are)") }
        var header = QCOW2Header(version: version, backingFileOffset: u64(8), backingFileSize: u32(16), clusterBits: u32(20),
                                 size: u64(24), cryptMethod: u32(32), l1Size: u32(36), l1TableOffset: u64(40),
                                 refcountTableOffset: u64(48), refcountTableClusters: u32(56), snapshotCount: u32(60),
                                 snapshotsOffset: u64(64), headerLength: 72)
        if version == 3 {
            guard b.count >= 104 else { throw QCOW2Error("the qcow2 version 3 header is truncated") }
            header.incompatibleFeatures = u64(72)
            header.compatibleFeatures = u64(80)
            header.autoclearFeatures = u64(88)
            header.refcountOrder = u32(96)
            header.headerLength = u32(100)
        }
        return header
    }

    /// Refuses what hv does not implement and structures that point outside the file or over
    /// the header; a writable open also refuses internal snapshots (their clusters are shared).
    public func validate(fileSize: UInt64, readOnly: Bool) throws(QCOW2Error) {
        guard (9...21).contains(clusterBits) else { throw QCOW2Error("qcow2 cluster size 2^\(clusterBits) is outside 512 bytes to 2 MiB") }
        guard cryptMethod == 0 else { throw QCOW2Error("the qcow2 image is encrypted (method \(cryptMethod)); hv does not read encrypted images") }
        if version == 3 {
            guard headerLength >= 104, headerLength % 8 == 0, UInt64(headerLength) <= clusterSize else {
                throw QCOW2Error("qcow2 header length \(headerLength) is invalid")
            }
            let names = ["dirty (not closed cleanly; repair it with 'qemu-img check -r all')", "corrupt (repair it with 'qemu-img check -r all')",
                         "external data file", "zstd compression", "extended L2 entries"]
            for bit in 0..<64 where incompatibleFeatures & (1 << UInt64(bit)) != 0 {
                let what = bit < names.count ? names[bit] : "unknown incompatible feature bit \(bit)"
                throw QCOW2Error("the qcow2 image is marked \(what); hv cannot use it")
            }
            guard refcountOrder == 4 else {
                throw QCOW2Error("qcow2 refcounts of \(1 << refcountOrder) bits are not supported (16 are; convert with 'qemu-img convert -O qcow2')")
            }
        }
        guard size <= Self.maximumVirtualSize else { throw QCOW2Error("qcow2 virtual size \(size) is larger than hv supports") }
        let needed = (size + bytesPerL1Entry - 1) / bytesPerL1Entry
        guard UInt64(l1Size) >= needed, UInt64(l1Size) <= Self.maximumL1Entries else {
            throw QCOW2Error("qcow2 L1 table of \(l1Size) entries does not fit a \(size)-byte disk")
        }
        func within(_ offset: UInt64, _ length: UInt64, _ what: String) throws(QCOW2Error) {
            guard offset % clusterSize == 0, offset >= clusterSize, offset <= fileSize, length <= fileSize - offset else {
                throw QCOW2Error("the qcow2 \(what) at offset \(offset) lies outside the image or over its header")
            }
        }
        if l1Size > 0 { try within(l1TableOffset, UInt64(l1Size) * 8, "L1 table") }
        let refcountBytes = UInt64(refcountTableClusters) * clusterSize
        guard refcountTableClusters > 0, refcountBytes <= Self.maximumRefcountTableBytes else {
            throw QCOW2Error("qcow2 refcount table of \(refcountTableClusters) clusters is invalid")
        }
        try within(refcountTableOffset, refcountBytes, "refcount table")
        if l1Size > 0 {
            let l1End = l1TableOffset + UInt64(l1Size) * 8
            guard l1End <= refcountTableOffset || refcountTableOffset + refcountBytes <= l1TableOffset else {
                throw QCOW2Error("the qcow2 L1 table and refcount table overlap")
            }
        }
        if backingFileOffset != 0 {
            guard backingFileSize > 0, backingFileSize <= Self.maximumBackingNameBytes,
                  backingFileOffset >= 72, backingFileOffset + UInt64(backingFileSize) <= min(clusterSize, fileSize) else {
                throw QCOW2Error("the qcow2 backing file name (offset \(backingFileOffset), \(backingFileSize) bytes) lies outside the header cluster")
            }
        }
        if snapshotCount > 0 && !readOnly {
            throw QCOW2Error("the qcow2 image has \(snapshotCount) internal snapshot(s); use it readonly, or delete them with 'qemu-img snapshot -d'")
        }
    }

    /// The header as version 3 writes it (104 bytes, no extensions follow).
    public func encoded() -> [UInt8] {
        var b: [UInt8] = []
        func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) } }
        func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
        b += Self.magic
        u32(version); u64(backingFileOffset); u32(backingFileSize); u32(clusterBits); u64(size); u32(cryptMethod)
        u32(l1Size); u64(l1TableOffset); u64(refcountTableOffset); u32(refcountTableClusters); u32(snapshotCount)
        u64(snapshotsOffset); u64(incompatibleFeatures); u64(compatibleFeatures); u64(autoclearFeatures)
        u32(refcountOrder); u32(headerLength)
        return b
    }

    /// A fresh, empty version 3 image's metadata for a `size`-byte disk: the header cluster, the
    /// refcount table, one refcount block and the L1 table, each cluster-aligned, every one of
    /// them counted once. `backingName` (and its format, as a header extension) go after the
    /// header in the first cluster.
    public static func newImage(size: UInt64, clusterBits: UInt32 = 16, backingName: String? = nil,
                                backingFormat: String? = nil) throws(QCOW2Error) -> [UInt8] {
        guard (9...21).contains(clusterBits) else { throw QCOW2Error("cluster size 2^\(clusterBits) is outside 512 bytes to 2 MiB") }
        guard size > 0, size <= maximumVirtualSize else { throw QCOW2Error("a qcow2 disk is 1 byte to 32 PiB") }
        let cluster = UInt64(1) << UInt64(clusterBits)
        let l1Entries = (size + cluster * (cluster / 8) - 1) / (cluster * (cluster / 8))
        guard l1Entries <= maximumL1Entries else { throw QCOW2Error("a \(size)-byte disk needs a larger cluster size") }
        let l1Clusters = max(1, (l1Entries * 8 + cluster - 1) / cluster)
        // Header, refcount table (1 cluster), refcount block, L1: the block covers them all as
        // long as 4 + l1Clusters ≤ cluster / 2, true for any cluster size and disk hv accepts
        // except the very largest disks with tiny clusters.
        let used = 3 + l1Clusters
        guard used <= cluster / 2 else { throw QCOW2Error("a \(size)-byte disk needs a larger cluster size") }
        var header = QCOW2Header(version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: clusterBits, size: size,
                                 cryptMethod: 0, l1Size: UInt32(l1Entries), l1TableOffset: 3 * cluster,
                                 refcountTableOffset: cluster, refcountTableClusters: 1, snapshotCount: 0, snapshotsOffset: 0,
                                 headerLength: 104)
        var image = [UInt8](repeating: 0, count: Int(used * cluster))
        if let backingName {
            let name = Array(backingName.utf8)
            // Extensions from byte 104: the backing format, then the end marker (8 zero bytes).
            var at = 104
            if let backingFormat {
                let format = Array(backingFormat.utf8)
                let ext: [UInt8] = [0xE2, 0x79, 0x2A, 0xCA] + (0..<4).map { UInt8(truncatingIfNeeded: UInt32(format.count) >> UInt32(24 - 8 * $0)) }
                image.replaceSubrange(at..<at + 8, with: ext)
                image.replaceSubrange(at + 8..<at + 8 + format.count, with: format)
                at += 8 + (format.count + 7) / 8 * 8
            }
            at += 8
            guard !name.isEmpty, name.count <= Int(maximumBackingNameBytes), at + name.count <= Int(cluster) else {
                throw QCOW2Error("backing file name '\(backingName)' is too long")
            }
            header.backingFileOffset = UInt64(at)
            header.backingFileSize = UInt32(name.count)
            image.replaceSubrange(at..<at + name.count, with: name)
        }
        let encoded = header.encoded()
        image.replaceSubrange(0..<encoded.count, with: encoded)
        // The refcount table's first entry: the refcount block in cluster 2.
        for i in 0..<8 { image[Int(cluster) + i] = UInt8(truncatingIfNeeded: (2 * cluster) >> UInt64(56 - 8 * i)) }
        // Refcount 1 for each metadata cluster.
        for c in 0..<Int(used) { image[Int(2 * cluster) + 2 * c + 1] = 1 }
        return image
    }
}

/// What the trusted side needs of a qcow2 image before handing it over: its checked header and
/// where its backing image is. Tables are not read here; the disk process does that.
public struct QCOW2ImageInfo: Equatable, Sendable {
    public var header: QCOW2Header
    /// The backing file name as the image stores it (relative names are relative to the
    /// image's own directory, as qemu-img resolves them).
    public var backingName: String?
    /// The backing format header extension ("raw", "qcow2", …), when present.
    public var backingFormat: String?

    /// Reads and checks `fd`'s header (`readOnly`: how the image will be used).
    public static func read(_ fd: Int32, readOnly: Bool) throws(QCOW2Error) -> QCOW2ImageInfo {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCOW2Error("cannot stat the image: errno \(errno)") }
        var first = [UInt8](repeating: 0, count: 104)
        let n = first.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 72 else { throw QCOW2Error("the image is too short for a qcow2 header") }
        let header = try QCOW2Header.parse(Array(first.prefix(n)))
        try header.validate(fileSize: UInt64(st.st_size), readOnly: readOnly)
        // The rest of the header cluster: extensions, then (usually) the backing name.
        let span = Int(min(header.clusterSize, UInt64(st.st_size)))
        var cluster = [UInt8](repeating: 0, count: span)
        guard QCOW2Backend.readFully(fd, &cluster, at: 0) else { throw QCOW2Error("cannot read the qcow2 header cluster") }
        var info = QCOW2ImageInfo(header: header)
        if header.backingFileOffset != 0 {
            let start = Int(header.backingFileOffset)
            let bytes = cluster[start..<start + Int(header.backingFileSize)]
            guard !bytes.contains(0), let name = String(validating: bytes, as: UTF8.self) else {
                throw QCOW2Error("the qcow2 backing file name is not a valid path")
            }
            info.backingName = name
        }
        // Header extensions: type (u32), length (u32), data padded to 8 bytes, up to type 0.
        var at = Int(header.headerLength)
        func u32(_ o: Int) -> UInt32 { cluster[o..<o + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        while at + 8 <= cluster.count {
            let type = u32(at), length = Int(u32(at + 4))
            guard type != 0 else { break }
            guard length <= cluster.count - at - 8 else { throw QCOW2Error("a qcow2 header extension runs past the header cluster") }
            if type == 0xE279_2ACA {  // backing file format name
                info.backingFormat = String(decoding: cluster[(at + 8)..<(at + 8 + length)], as: UTF8.self)
            }
            at += 8 + (length + 7) / 8 * 8
        }
        return info
    }

    public init(header: QCOW2Header, backingName: String? = nil, backingFormat: String? = nil) {
        self.header = header
        self.backingName = backingName
        self.backingFormat = backingFormat
    }
}

import Foundation
@testable import HVSCSIDisk
import XCTest

/// The qcow2 backend against QEMU's own tools: images hv makes and writes pass `qemu-img check`
/// and compare equal to a raw mirror of every write; images QEMU makes and writes read back; a
/// hostile header or table is refused by name, a bad entry fails only its request.
final class QCOW2Tests: XCTestCase {
    struct MissingTool: Error, CustomStringConvertible {
        var description: String { "qemu-img or qemu-io is not installed (test.sh installs qemu-utils)" }
    }


    private var dir: URL!

    override func setUpWithError() throws {
        // QEMU's tools are the judge: without them this is a failure, not a skip.
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img"), FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io") else {
            throw MissingTool()
        }
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-qcow2-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    private func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// Runs a QEMU tool; its exit status and output.
    @discardableResult
    private func qemu(_ tool: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/\(tool)")
        p.arguments = arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    private func open(_ name: String, readOnly: Bool = false) -> Int32 {
        Glibc.open(path(name), readOnly ? O_RDONLY : O_RDWR)
    }

    /// Writes `bytes` at `offset` through `backend` and into the raw mirror.
    private func write(_ backend: QCOW2Backend, mirror: Int32, _ bytes: [UInt8], at offset: UInt64,
                       file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertNil(bytes.withUnsafeBytes { backend.write($0, at: offset) }, file: file, line: line)
        XCTAssertEqual(bytes.withUnsafeBytes { pwrite(mirror, $0.baseAddress, $0.count, off_t(offset)) }, bytes.count, file: file, line: line)
    }

    private func read(_ backend: any BlockBackend, _ count: Int, at offset: UInt64) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0xEE, count: count)
        let e = bytes.withUnsafeMutableBytes { backend.read(into: $0, at: offset) }
        return e == nil ? bytes : nil
    }

    private func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    /// Every kind of write on one image: whole clusters, partial ones, across a boundary, far out
    /// (a second L2 table), then read back through a fresh open and judged by qemu-img.
    private func exercise(_ name: String, size: UInt64, file: StaticString = #filePath, line: UInt = #line) throws {
        let fd = open(name)
        defer { close(fd) }
        let mirror = Glibc.open(path(name + ".raw"), O_RDWR | O_CREAT | O_TRUNC, 0o600)
        defer { close(mirror) }
        XCTAssertEqual(ftruncate(mirror, off_t(size)), 0)
        let backend = try QCOW2Backend(fd: fd, readOnly: false)
        let cluster = backend.header.clusterSize
        write(backend, mirror: mirror, pattern(Int(cluster), seed: 1), at: 0, file: file, line: line)
        write(backend, mirror: mirror, pattern(3000, seed: 2), at: cluster * 3 + 1000, file: file, line: line)
        write(backend, mirror: mirror, pattern(Int(cluster), seed: 3), at: cluster * 5 + cluster / 2, file: file, line: line)
        write(backend, mirror: mirror, pattern(512, seed: 4), at: size - 512, file: file, line: line)
        write(backend, mirror: mirror, pattern(4096, seed: 5), at: size / 2 + 4096, file: file, line: line)
        // Overwrites of clusters already allocated.
        write(backend, mirror: mirror, pattern(700, seed: 6), at: 100, file: file, line: line)
        XCTAssertNil(backend.flush())
        XCTAssertEqual(read(backend, Int(cluster) * 2, at: cluster * 5), try readRaw(mirror, Int(cluster) * 2, at: cluster * 5), file: file, line: line)

        let again = try QCOW2Backend(fd: fd, readOnly: true)
        for (offset, count) in [(0, Int(cluster)), (cluster * 3, Int(cluster)), (size - 4096, 4096), (size / 2, 16384), (cluster * 9, 4096)] {
            XCTAssertEqual(read(again, count, at: offset), try readRaw(mirror, count, at: offset), "at \(offset)", file: file, line: line)
        }
        let check = try qemu("qemu-img", ["check", path(name)])
        XCTAssertEqual(check.status, 0, check.output, file: file, line: line)
        let compare = try qemu("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", path(name + ".raw"), path(name)])
        XCTAssertEqual(compare.status, 0, compare.output, file: file, line: line)
    }

    private func readRaw(_ fd: Int32, _ count: Int, at offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        XCTAssertEqual(bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }, count)
        return bytes
    }

    func testImagesHvMakesAreValidAndWritesAreWhatQemuReads() throws {
        let image = try QCOW2Header.newImage(size: 64 << 20)
        FileManager.default.createFile(atPath: path("new.qcow2"), contents: Data(image))
        let info = try qemu("qemu-img", ["info", "--output=json", path("new.qcow2")])
        XCTAssertTrue(info.output.contains(#""format": "qcow2""#) && info.output.contains(#""virtual-size": 67108864"#), info.output)
        XCTAssertEqual(try qemu("qemu-img", ["check", path("new.qcow2")]).status, 0)
        try exercise("new.qcow2", size: 64 << 20)
    }

    func testVectoredIOAcrossClustersMatchesQemu() throws {
        // 4 KiB guest pages, a request crossing cluster boundaries: allocating writes, overwrites
        // and reads each go through the vectored path.
        XCTAssertEqual(try qemu("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", path("v.qcow2"), "4M"]).status, 0)
        let fd = open("v.qcow2")
        defer { close(fd) }
        let backend = try QCOW2Backend(fd: fd, readOnly: false)
        let count = 40 << 10, offset: UInt64 = 10 << 10
        let pages = (0..<10).map { pattern(4096, seed: UInt8($0)) }
        let buffers = pages.map { page -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            b.copyBytes(from: page)
            return b
        }
        defer { buffers.forEach { $0.deallocate() } }
        let vectors = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: 4096) }
        XCTAssertNil(backend.write(from: vectors, count: count, at: offset))
        XCTAssertNil(backend.write(from: Array(vectors.prefix(3)), count: 12 << 10, at: offset))  // overwrite
        for b in buffers { b.initializeMemory(as: UInt8.self, repeating: 0) }
        XCTAssertNil(backend.read(into: vectors, count: count, at: offset))
        XCTAssertEqual(buffers.map { Array($0) }, pages)
        XCTAssertEqual(try qemu("qemu-img", ["check", path("v.qcow2")]).status, 0)
        let io = try qemu("qemu-io", ["-r", "-c", "read -P 0x28 \(offset + 4096 * 9 + 1) 1", path("v.qcow2")])
        XCTAssertTrue(io.output.contains("read 1/1 bytes") && !io.output.contains("failed"), "page 9's second byte is 0x28 (31 + 9): \(io.output)")
    }

    func testQemuMadeImagesWithSmallClustersGrowTheirRefcountTable() throws {
        // 512-byte clusters: one refcount block counts 256 clusters and qemu-img's one-cluster
        // table only 64 blocks, so writing a few MiB makes blocks and then moves the table.
        XCTAssertEqual(try qemu("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path("small.qcow2"), "16M"]).status, 0)
        try exercise("small.qcow2", size: 16 << 20)
        let fd = open("small.qcow2")
        defer { close(fd) }
        let backend = try QCOW2Backend(fd: fd, readOnly: false)
        let mirror = Glibc.open(path("small.qcow2.raw"), O_RDWR)
        defer { close(mirror) }
        // 12 MiB of data in 512-byte clusters: past the 8 MiB of file the first table can count.
        for i in 0..<48 { write(backend, mirror: mirror, pattern(256 << 10, seed: UInt8(i)), at: UInt64(i) * (256 << 10)) }
        XCTAssertEqual(read(backend, 4096, at: 47 * (256 << 10)), Array(pattern(256 << 10, seed: 47).prefix(4096)))
        let moved = try QCOW2Header.parse(try readRaw(fd, 104, at: 0))
        XCTAssertGreaterThan(moved.refcountTableClusters, 1, "the refcount table grew")
        let check = try qemu("qemu-img", ["check", path("small.qcow2")])
        XCTAssertEqual(check.status, 0, check.output)
        XCTAssertEqual(try qemu("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", path("small.qcow2.raw"), path("small.qcow2")]).status, 0)
    }

    func testReadsWhatQemuWroteAndTheBackingImageBelow() throws {
        // A raw base with a pattern, an overlay QEMU made on it, QEMU's own write into the overlay.
        FileManager.default.createFile(atPath: path("base.raw"), contents: Data(pattern(4 << 20, seed: 9)))
        XCTAssertEqual(try qemu("qemu-img", ["create", "-q", "-f", "qcow2", "-b", path("base.raw"), "-F", "raw", path("top.qcow2"), "8M"]).status, 0)
        XCTAssertEqual(try qemu("qemu-io", ["-c", "write -P 0x5a 1M 128k", path("top.qcow2")]).status, 0)
        let baseFD = open("base.raw", readOnly: true)
        defer { close(baseFD) }
        let base = FileBackend(fd: baseFD, byteCount: 4 << 20)
        let fd = open("top.qcow2")
        defer { close(fd) }
        let top = try QCOW2Backend(fd: fd, readOnly: false, backing: base)
        XCTAssertEqual(top.byteCount, 8 << 20)
        XCTAssertEqual(read(top, 4096, at: 4096), Array(pattern(4 << 20, seed: 9)[4096..<8192]))
        XCTAssertEqual(read(top, 4096, at: (1 << 20) + 8192), [UInt8](repeating: 0x5A, count: 4096))
        XCTAssertEqual(read(top, 4096, at: 6 << 20), [UInt8](repeating: 0, count: 4096), "past the base's end: zeros")
        // A partial write copies the rest of its cluster up from the base.
        XCTAssertNil([UInt8](repeating: 0xC3, count: 100).withUnsafeBytes { top.write($0, at: 300_000) })
        var expected = Array(pattern(4 << 20, seed: 9)[(300_000 - 1000)..<(300_000 + 1100)])
        expected.replaceSubrange(1000..<1100, with: [UInt8](repeating: 0xC3, count: 100))
        XCTAssertEqual(read(top, 2100, at: 300_000 - 1000), expected)
        let check = try qemu("qemu-img", ["check", path("top.qcow2")])
        XCTAssertEqual(check.status, 0, check.output)
        let io = try qemu("qemu-io", ["-r", "-c", "read -P 0xc3 300000 100", path("top.qcow2")])
        XCTAssertTrue(io.output.contains("read 100/100 bytes") && !io.output.contains("verification failed"), io.output)
    }

    func testGrowingMovesTheL1TableAndKeepsTheData() throws {
        // 512-byte clusters: one L1 cluster addresses 2 MiB, so growing 1 MiB → 64 MiB needs a new L1 table.
        XCTAssertEqual(try qemu("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path("g.qcow2"), "1M"]).status, 0)
        XCTAssertEqual(try qemu("qemu-io", ["-c", "write -P 0x3c 4k 8k", path("g.qcow2")]).status, 0)
        let fd = open("g.qcow2")
        defer { close(fd) }
        XCTAssertThrowsError(try QCOW2Backend.grow(fd: fd, to: 512 << 10)) { XCTAssertTrue("\($0)".contains("only grows")) }
        try QCOW2Backend.grow(fd: fd, to: 64 << 20)
        let grown = try QCOW2Backend(fd: fd, readOnly: false)
        XCTAssertEqual(grown.byteCount, 64 << 20)
        XCTAssertEqual(read(grown, 8192, at: 4096), [UInt8](repeating: 0x3C, count: 8192))
        XCTAssertNil(pattern(4096, seed: 1).withUnsafeBytes { grown.write($0, at: (64 << 20) - 4096) })
        XCTAssertEqual(read(grown, 4096, at: (64 << 20) - 4096), pattern(4096, seed: 1))
        let check = try qemu("qemu-img", ["check", path("g.qcow2")])
        XCTAssertEqual(check.status, 0, check.output)
        let info = try qemu("qemu-img", ["info", "--output=json", path("g.qcow2")])
        XCTAssertTrue(info.output.contains(#""virtual-size": 67108864"#), info.output)
    }

    func testDiscardFreesClustersAndReadsZeros() throws {
        XCTAssertEqual(try qemu("qemu-img", ["create", "-q", "-f", "qcow2", path("d.qcow2"), "8M"]).status, 0)
        let fd = open("d.qcow2")
        defer { close(fd) }
        let backend = try QCOW2Backend(fd: fd, readOnly: false)
        XCTAssertNil(pattern(256 << 10, seed: 7).withUnsafeBytes { backend.write($0, at: 0) })
        XCTAssertNil(backend.discard(at: 64 << 10, count: 128 << 10))
        XCTAssertNil(backend.discard(at: 1000, count: 24))  // a partial cluster: written with zeros
        XCTAssertEqual(read(backend, 128 << 10, at: 64 << 10), [UInt8](repeating: 0, count: 128 << 10))
        XCTAssertEqual(read(backend, 24, at: 1000), [UInt8](repeating: 0, count: 24))
        XCTAssertEqual(read(backend, 64 << 10, at: 192 << 10), Array(pattern(256 << 10, seed: 7)[(192 << 10)...]))
        let check = try qemu("qemu-img", ["check", path("d.qcow2")])
        XCTAssertEqual(check.status, 0, check.output)
        let map = try qemu("qemu-img", ["map", "--output=json", path("d.qcow2")])
        XCTAssertTrue(map.output.contains(#""start": 65536, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false"#), map.output)
    }

    func testCompressedClustersReadAndAreRewrittenWhenWritten() throws {
        // A compressed image as `qemu-img convert -c` makes them (cloud images ship so): streams
        // of several clusters share host clusters.
        var raw = [UInt8](repeating: 0, count: 1 << 20)
        for i in stride(from: 0, to: raw.count, by: 4096) { raw.replaceSubrange(i..<i + 16, with: pattern(16, seed: UInt8(truncatingIfNeeded: i >> 12))) }
        FileManager.default.createFile(atPath: path("c.raw"), contents: Data(raw))
        XCTAssertEqual(try qemu("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", path("c.raw"), path("c.qcow2")]).status, 0)
        let fd = open("c.qcow2")
        defer { close(fd) }
        let backend = try QCOW2Backend(fd: fd, readOnly: false)
        XCTAssertEqual(read(backend, raw.count, at: 0), raw)
        // A partial write into a compressed cluster: the rest of the cluster keeps its bytes.
        let mirror = Glibc.open(path("c.raw"), O_RDWR)
        defer { close(mirror) }
        write(backend, mirror: mirror, pattern(1000, seed: 77), at: (128 << 10) + 500)
        XCTAssertNil(backend.discard(at: 256 << 10, count: 64 << 10))
        XCTAssertEqual([UInt8](repeating: 0, count: 64 << 10).withUnsafeBytes { pwrite(mirror, $0.baseAddress, $0.count, 256 << 10) }, 64 << 10)
        XCTAssertEqual(read(backend, raw.count, at: 0), try readRaw(mirror, raw.count, at: 0))
        let check = try qemu("qemu-img", ["check", path("c.qcow2")])
        XCTAssertEqual(check.status, 0, check.output)
        XCTAssertEqual(try qemu("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", path("c.raw"), path("c.qcow2")]).status, 0)

        // A compressed entry whose stream lies past the end fails its own request only.
        let header = try QCOW2Header.parse(try readRaw(fd, 104, at: 0))
        let l2 = try readRaw(fd, 8, at: header.l1TableOffset).reduce(UInt64(0)) { $0 << 8 | UInt64($1) } & 0x00FF_FFFF_FFFF_FE00
        var entry = [UInt8](repeating: 0, count: 8)
        put64(&entry, 0, (1 << 62) | (1 << 40))
        XCTAssertEqual(entry.withUnsafeBytes { pwrite(fd, $0.baseAddress, 8, off_t(l2 + 8 * 10)) }, 8)
        let damaged = try QCOW2Backend(fd: fd, readOnly: true)
        XCTAssertNil(read(damaged, 512, at: 10 << 16))
        XCTAssertEqual(read(damaged, 512, at: 0), Array(raw.prefix(512)))
    }

    // MARK: Hostile images

    private func refusal(_ mutate: (inout [UInt8]) -> Void, readOnly: Bool = false) throws -> String {
        var image = try QCOW2Header.newImage(size: 16 << 20)
        mutate(&image)
        FileManager.default.createFile(atPath: path("bad.qcow2"), contents: Data(image))
        let fd = open("bad.qcow2")
        defer { close(fd) }
        do {
            _ = try QCOW2Backend(fd: fd, readOnly: readOnly)
            return "accepted"
        } catch {
            return error.description
        }
    }

    private func put32(_ image: inout [UInt8], _ offset: Int, _ v: UInt32) {
        for i in 0..<4 { image[offset + i] = UInt8(truncatingIfNeeded: v >> UInt32(24 - 8 * i)) }
    }

    private func put64(_ image: inout [UInt8], _ offset: Int, _ v: UInt64) {
        for i in 0..<8 { image[offset + i] = UInt8(truncatingIfNeeded: v >> UInt64(56 - 8 * i)) }
    }

    func testHostileHeadersAreRefusedByName() throws {
        XCTAssertEqual(try refusal { _ in }, "accepted")
        XCTAssertTrue(try refusal { self.put32(&$0, 4, 4) }.contains("version 4 is not supported"))
        XCTAssertTrue(try refusal { self.put32(&$0, 20, 30) }.contains("cluster size 2^30"))
        XCTAssertTrue(try refusal { self.put32(&$0, 32, 1) }.contains("encrypted"))
        XCTAssertTrue(try refusal { self.put64(&$0, 72, 1) }.contains("dirty"))
        XCTAssertTrue(try refusal { self.put64(&$0, 72, 2) }.contains("corrupt"))
        XCTAssertTrue(try refusal { self.put64(&$0, 72, 4) }.contains("external data file"))
        XCTAssertTrue(try refusal { self.put64(&$0, 72, 1 << 40) }.contains("unknown incompatible feature bit 40"))
        XCTAssertTrue(try refusal { self.put32(&$0, 96, 6) }.contains("refcounts of 64 bits"))
        XCTAssertTrue(try refusal { self.put64(&$0, 40, 0) }.contains("L1 table at offset 0"), "an L1 table over the header")
        XCTAssertTrue(try refusal { self.put64(&$0, 40, 1 << 40) }.contains("lies outside the image"))
        XCTAssertTrue(try refusal { self.put64(&$0, 48, 3 << 16) }.contains("overlap"))
        XCTAssertTrue(try refusal { self.put32(&$0, 36, 0) }.contains("does not fit"), "an L1 table too small for the disk")
        XCTAssertTrue(try refusal { self.put64(&$0, 24, UInt64.max) }.contains("larger than hv supports"))
        XCTAssertTrue(try refusal { self.put32(&$0, 60, 2) }.contains("2 internal snapshot(s)"))
        XCTAssertEqual(try refusal({ self.put32(&$0, 60, 2) }, readOnly: true), "accepted")
        XCTAssertTrue(try refusal { self.put64(&$0, 8, 60_000); self.put32(&$0, 16, 9000) }.contains("backing file name"))
        // Tables pointing outside the file.
        XCTAssertTrue(try refusal { self.put64(&$0, 3 << 16, 1 << 50) }.contains("L1 entry 0 points outside"))
        XCTAssertTrue(try refusal { self.put64(&$0, (1 << 16) + 8, 5) }.contains("refcount table entry 1"))
        XCTAssertTrue(try refusal { $0 = Array($0.prefix(50)) }.contains("too short"))
    }

    /// A 4 MiB qemu-made image whose first 128 KiB hold 0x22, opened: its descriptor, header and
    /// the offset of its first L2 table (found through the L1 table).
    private func imageWithData(_ name: String) throws -> (fd: Int32, header: QCOW2Header, l2: UInt64) {
        XCTAssertEqual(try qemu("qemu-img", ["create", "-q", "-f", "qcow2", path(name), "4M"]).status, 0)
        XCTAssertEqual(try qemu("qemu-io", ["-c", "write -P 0x22 0 128k", path(name)]).status, 0)
        let fd = open(name)
        let header = try QCOW2Header.parse(try readRaw(fd, 104, at: 0))
        let l2 = try readRaw(fd, 8, at: header.l1TableOffset).reduce(UInt64(0)) { $0 << 8 | UInt64($1) } & 0x00FF_FFFF_FFFF_FE00
        return (fd, header, l2)
    }

    func testAnL2EntryPointingOutsideFailsOnlyItsRequest() throws {
        let (fd, _, l1) = try imageWithData("l2.qcow2")
        defer { close(fd) }
        // Point the L2 table's second entry far past the end.
        var entry = [UInt8](repeating: 0, count: 8)
        put64(&entry, 0, (1 << 50) | (1 << 63))
        XCTAssertEqual(entry.withUnsafeBytes { pwrite(fd, $0.baseAddress, 8, off_t(l1 + 8)) }, 8)
        let backend = try QCOW2Backend(fd: fd, readOnly: false)
        XCTAssertEqual(read(backend, 512, at: 0), [UInt8](repeating: 0x22, count: 512))
        XCTAssertNil(read(backend, 512, at: 64 << 10), "a read of the bad cluster fails")
        XCTAssertNotNil([UInt8](repeating: 1, count: 512).withUnsafeBytes { backend.write($0, at: 64 << 10) }, "and so does a write")
        XCTAssertEqual(read(backend, 512, at: 2 << 20), [UInt8](repeating: 0, count: 512), "the rest of the disk is unaffected")
    }

    /// A hostile image whose L2 entry maps guest data onto its own L2 table (or any metadata):
    /// the request fails and the table stays as it was; an L1 entry naming the refcount table is
    /// refused when the image is opened. Before, the write went into the L2 table (found by the
    /// qcow2-image fuzz target).
    func testGuestDataOverTheImagesOwnMetadataIsRefused() throws {
        let (fd, header, l2) = try imageWithData("meta.qcow2")
        defer { close(fd) }
        // Guest cluster 1 (64 KiB) → the L2 table itself, marked as owned (COPIED).
        var entry = [UInt8](repeating: 0, count: 8)
        put64(&entry, 0, l2 | (1 << 63))
        XCTAssertEqual(entry.withUnsafeBytes { pwrite(fd, $0.baseAddress, 8, off_t(l2 + 8)) }, 8)
        let tableBefore = try readRaw(fd, Int(header.clusterSize), at: l2)
        let backend = try QCOW2Backend(fd: fd, readOnly: false)
        XCTAssertNotNil([UInt8](repeating: 0xEE, count: 512).withUnsafeBytes { backend.write($0, at: 64 << 10) }, "the write fails")
        XCTAssertNil(read(backend, 512, at: 64 << 10), "and so does a read")
        XCTAssertEqual(try readRaw(fd, Int(header.clusterSize), at: l2), tableBefore, "the L2 table is unchanged")
        XCTAssertEqual(read(backend, 512, at: 0), [UInt8](repeating: 0x22, count: 512), "the rest of the disk is unaffected")

        // The L1 entry pointing at the refcount table: refused at open, by name.
        put64(&entry, 0, header.refcountTableOffset | (1 << 63))
        XCTAssertEqual(entry.withUnsafeBytes { pwrite(fd, $0.baseAddress, 8, off_t(header.l1TableOffset)) }, 8)
        XCTAssertThrowsError(try QCOW2Backend(fd: fd, readOnly: true)) { error in
            XCTAssertTrue("\(error)".contains("qcow2 L1 entry 0 points at the image's L1 table, refcount table or a refcount block"), "\(error)")
        }
    }

    // MARK: Runs of clusters, and what the adapter's own thread may do at once

    /// A base with a pattern; an overlay QEMU wrote: 256 KiB of data at 0 (four 64 KiB clusters
    /// one after another in the file), a zero cluster at 256 KiB, nothing from 320 KiB on.
    private func overlayWithRuns() throws -> (top: QCOW2Backend, fd: Int32, base: FileBackend, baseFD: Int32) {
        FileManager.default.createFile(atPath: path("runs-base.raw"), contents: Data(pattern(4 << 20, seed: 3)))
        XCTAssertEqual(try qemu("qemu-img", ["create", "-q", "-f", "qcow2", "-b", path("runs-base.raw"), "-F", "raw", path("runs.qcow2"), "4M"]).status, 0)
        XCTAssertEqual(try qemu("qemu-io", ["-c", "write -P 0x11 0 256k", "-c", "write -z 256k 64k", path("runs.qcow2")]).status, 0)
        let baseFD = open("runs-base.raw", readOnly: true)
        let base = FileBackend(fd: baseFD, byteCount: 4 << 20)
        let fd = open("runs.qcow2")
        return (try QCOW2Backend(fd: fd, readOnly: false, backing: base), fd, base, baseFD)
    }

    func testClustersThatFollowInTheFileAreOneRun() throws {
        let (top, fd, _, baseFD) = try overlayWithRuns()
        defer { close(fd); close(baseFD) }
        let runs = top.extents(at: 0, count: 512 << 10)
        XCTAssertEqual(runs.map(\.at), [0, 256 << 10, 320 << 10, 384 << 10, 448 << 10], "one data run, then a cluster each: \(runs)")
        XCTAssertEqual(runs.map(\.length), [256 << 10, 64 << 10, 64 << 10, 64 << 10, 64 << 10])
        guard case .data(let host, copied: true) = runs[0].mapping else { return XCTFail("\(runs[0])") }
        XCTAssertEqual(runs[1].mapping, .zero)
        XCTAssertEqual(runs[2].mapping, .unallocated)
        // Within a cluster: the run starts at the byte asked for.
        XCTAssertEqual(top.extents(at: 1000, count: 128 << 10), [.init(at: 1000, length: 128 << 10, mapping: .data(host + 1000, copied: true))])
        // The vectored read over all of it: data, zeros, the base below.
        var expected = [UInt8](repeating: 0x11, count: 256 << 10) + [UInt8](repeating: 0, count: 64 << 10)
        expected += pattern(4 << 20, seed: 3)[(320 << 10)..<(512 << 10)]
        XCTAssertEqual(try vectoredRead(top, 512 << 10, at: 0), expected)
    }

    /// Reads `count` bytes at `offset` through the vectored path into 4 KiB pages; nil when it fails.
    private func vectoredRead(_ backend: any BlockBackend, _ count: Int, at offset: UInt64, cachedOnly: Bool = false) throws -> [UInt8]? {
        let pages = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        defer { pages.deallocate() }
        pages.initializeMemory(as: UInt8.self, repeating: 0xEE)
        let vectors = stride(from: 0, to: count, by: 4096).map { iovec(iov_base: pages.baseAddress! + $0, iov_len: min(4096, count - $0)) }
        if cachedOnly {
            return backend.readIfCached(into: vectors, count: count, at: offset) ? Array(pages) : nil
        }
        return backend.read(into: vectors, count: count, at: offset) == nil ? Array(pages) : nil
    }

    func testCachedReadsAndInPlaceWritesDoWhatTheOrdinaryPathDoes() throws {
        let (top, fd, base, baseFD) = try overlayWithRuns()
        defer { close(fd); close(baseFD) }
        // Everything was just written, so the host has it cached: read at once, the same bytes.
        let ordinary = try vectoredRead(top, 512 << 10, at: 0)
        XCTAssertNotNil(ordinary)
        XCTAssertEqual(try vectoredRead(top, 512 << 10, at: 0, cachedOnly: true), ordinary)
        XCTAssertEqual(try vectoredRead(base, 64 << 10, at: 4096, cachedOnly: true), try vectoredRead(base, 64 << 10, at: 4096))

        let sizeBefore = lseek(fd, 0, SEEK_END)
        let data = pattern(128 << 10, seed: 77)
        func writeInPlace(_ at: UInt64) -> Bool {
            data.withUnsafeBytes { top.writeInPlace(from: [iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)], count: $0.count, at: at) }
        }
        XCTAssertTrue(writeInPlace(64 << 10), "an overwrite of clusters the image holds")
        XCTAssertEqual(try vectoredRead(top, 128 << 10, at: 64 << 10), data)
        // A zero cluster and unallocated ones need allocating: not in place, and nothing written.
        XCTAssertFalse(writeInPlace(192 << 10), "half of it over the zero cluster")
        XCTAssertFalse(writeInPlace(320 << 10), "over clusters the base serves")
        XCTAssertEqual(lseek(fd, 0, SEEK_END), sizeBefore, "nothing was allocated")
        XCTAssertEqual(try vectoredRead(top, 64 << 10, at: 320 << 10), Array(pattern(4 << 20, seed: 3)[(320 << 10)..<(384 << 10)]))
        XCTAssertEqual(try vectoredRead(top, 64 << 10, at: 256 << 10), [UInt8](repeating: 0, count: 64 << 10))
        let readOnly = try QCOW2Backend(fd: fd, readOnly: true, backing: base)
        XCTAssertFalse(data.withUnsafeBytes { readOnly.writeInPlace(from: [iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)], count: $0.count, at: 0) })
        XCTAssertEqual(try qemu("qemu-img", ["check", path("runs.qcow2")]).status, 0)
        let io = try qemu("qemu-io", ["-r", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x11 192k 64k", path("runs.qcow2")])
        XCTAssertFalse(io.output.contains("fail"), io.output)
    }

    func testReadsOfDataTheHostHasNotCachedAreLeftToTheIOThreads() throws {
        FileManager.default.createFile(atPath: path("cold.raw"), contents: Data(pattern(1 << 20, seed: 5)))
        let fd = open("cold.raw")
        defer { close(fd) }
        XCTAssertEqual(fsync(fd), 0)
        XCTAssertEqual(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0)
        // The page cache drops clean pages on request, unless the file system keeps them (tmpfs).
        let map = mmap(nil, 1 << 20, PROT_READ, MAP_SHARED, fd, 0)!
        defer { munmap(map, 1 << 20) }
        var resident = [UInt8](repeating: 0, count: 256)
        XCTAssertEqual(mincore(map, 1 << 20, &resident), 0)
        guard resident.allSatisfy({ $0 & 1 == 0 }) else {
            throw XCTSkip("the file system of \(path("")) keeps files in memory: no uncached data to test with")
        }
        let raw = FileBackend(fd: fd, byteCount: 1 << 20)
        XCTAssertNil(try vectoredRead(raw, 256 << 10, at: 0, cachedOnly: true), "storage would be read: not at once")
        XCTAssertEqual(try vectoredRead(raw, 256 << 10, at: 0), Array(pattern(1 << 20, seed: 5).prefix(256 << 10)))
        XCTAssertEqual(try vectoredRead(raw, 256 << 10, at: 0, cachedOnly: true), Array(pattern(1 << 20, seed: 5).prefix(256 << 10)), "now cached")
    }
}

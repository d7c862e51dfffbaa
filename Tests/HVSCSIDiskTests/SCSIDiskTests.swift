import Glibc
import HVSCSIDisk
import XCTest

/// The disk LUN's command set against SBC-3/SPC-4, over memory and over a real sparse file.
final class SCSIDiskTests: XCTestCase {
    /// Blocks in memory; optionally failing, and recording discards.
    final class MemoryBackend: BlockBackend {
        var bytes: [UInt8]
        var failWith: Int32?
        var discards: [(UInt64, UInt64)] = []
        init(blocks: Int) { bytes = [UInt8](repeating: 0, count: blocks * 512) }
        var byteCount: UInt64 { UInt64(bytes.count) }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int32? {
            if let failWith { return failWith }
            buffer.copyBytes(from: bytes[Int(offset)..<Int(offset) + buffer.count])
            return nil
        }
        func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Int32? {
            if let failWith { return failWith }
            bytes.replaceSubrange(Int(offset)..<Int(offset) + buffer.count, with: buffer)
            return nil
        }
        func flush() -> Int32? { failWith }
        func discard(at offset: UInt64, count: UInt64) -> Int32? {
            discards.append((offset, count))
            bytes.replaceSubrange(Int(offset)..<Int(offset + count), with: repeatElement(0, count: Int(count)))
            return nil
        }
    }

    private func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - $0))) } }
    private func cdb10(_ op: UInt8, lba: UInt64, blocks: UInt64) -> [UInt8] { [op, 0] + be(lba, 4) + [0] + be(blocks, 2) + [0] }
    private func cdb16(_ op: UInt8, lba: UInt64, blocks: UInt64, flags: UInt8 = 0) -> [UInt8] { [op, flags] + be(lba, 8) + be(blocks, 4) + [0, 0] }

    func testInquiryStandardAndVPD() {
        let disk = SCSIDisk(backend: MemoryBackend(blocks: 64), readOnly: false, serial: "SER123")
        var r = disk.execute([0x12, 0, 0, 0, 96, 0], dataOut: [], dataInCapacity: 96)
        XCTAssertEqual(r.status, .good)
        XCTAssertEqual(r.dataIn.count, 36)
        XCTAssertEqual(r.dataIn[0], 0x00, "direct-access block device")
        XCTAssertEqual(String(decoding: r.dataIn[8..<16], as: UTF8.self), "HV      ")
        XCTAssertEqual(String(decoding: r.dataIn[16..<32], as: UTF8.self), "VIRTUAL DISK    ")
        r = disk.execute([0x12, 0, 0, 0, 4, 0], dataOut: [], dataInCapacity: 96)
        XCTAssertEqual(r.dataIn.count, 4, "allocation length caps the data")
        r = disk.execute([0x12, 1, 0x00, 0, 255, 0], dataOut: [], dataInCapacity: 255)
        XCTAssertEqual(Array(r.dataIn[4...]), [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2], "supported VPD pages")
        r = disk.execute([0x12, 1, 0x80, 0, 255, 0], dataOut: [], dataInCapacity: 255)
        XCTAssertEqual(String(decoding: r.dataIn[4...], as: UTF8.self), "SER123")
        r = disk.execute([0x12, 1, 0xB2, 0, 255, 0], dataOut: [], dataInCapacity: 255)
        XCTAssertEqual(r.dataIn[5] & 0xE0, 0xE0, "UNMAP and WRITE SAME(16/10) unmap supported")
        r = disk.execute([0x12, 1, 0xB0, 0, 255, 0], dataOut: [], dataInCapacity: 255)
        XCTAssertEqual(r.dataIn.count, 64)
        r = disk.execute([0x12, 1, 0x42, 0, 255, 0], dataOut: [], dataInCapacity: 255)
        XCTAssertEqual([r.status.rawValue, r.sense.key, r.sense.asc], [0x02, 0x05, 0x24], "unknown VPD page: invalid field")
    }

    func testCapacity() {
        let disk = SCSIDisk(backend: MemoryBackend(blocks: 2048), readOnly: false, serial: "s")
        let r10 = disk.execute([0x25] + [UInt8](repeating: 0, count: 9), dataOut: [], dataInCapacity: 8)
        XCTAssertEqual(r10.dataIn, be(2047, 4) + be(512, 4))
        let r16 = disk.execute([0x9E, 0x10] + [UInt8](repeating: 0, count: 8) + be(32, 4) + [0, 0], dataOut: [], dataInCapacity: 32)
        XCTAssertEqual(Array(r16.dataIn[0..<12]), be(2047, 8) + be(512, 4))
        XCTAssertEqual(r16.dataIn[14] & 0x80, 0x80, "LBPME: thin provisioned")
    }

    func testReadWriteRoundTripAndBounds() {
        let backend = MemoryBackend(blocks: 100)
        let disk = SCSIDisk(backend: backend, readOnly: false, serial: "s")
        let data = (0..<1024).map { UInt8(truncatingIfNeeded: $0 * 7) }
        XCTAssertEqual(disk.execute(cdb10(0x2A, lba: 10, blocks: 2), dataOut: data, dataInCapacity: 0).status, .good)
        XCTAssertEqual(disk.execute(cdb10(0x28, lba: 10, blocks: 2), dataOut: [], dataInCapacity: 1024).dataIn, data)
        XCTAssertEqual(disk.execute(cdb16(0x88, lba: 10, blocks: 2), dataOut: [], dataInCapacity: 1024).dataIn, data)
        XCTAssertEqual(Array(backend.bytes[5120..<6144]), data)
        // The last block is readable; one past it is not.
        XCTAssertEqual(disk.execute(cdb10(0x28, lba: 99, blocks: 1), dataOut: [], dataInCapacity: 512).status, .good)
        var r = disk.execute(cdb10(0x28, lba: 99, blocks: 2), dataOut: [], dataInCapacity: 1024)
        XCTAssertEqual([r.status.rawValue, r.sense.key, r.sense.asc], [0x02, 0x05, 0x21], "LBA out of range")
        r = disk.execute(cdb16(0x88, lba: UInt64.max, blocks: 2), dataOut: [], dataInCapacity: 1024)
        XCTAssertEqual(r.sense.asc, 0x21, "no overflow at the top of the LBA space")
        // REQUEST SENSE reports the last error once.
        r = disk.execute([0x03, 0, 0, 0, 18, 0], dataOut: [], dataInCapacity: 18)
        XCTAssertEqual([r.dataIn[0], r.dataIn[2], r.dataIn[12]], [0x70, 0x05, 0x21])
        r = disk.execute([0x03, 0, 0, 0, 18, 0], dataOut: [], dataInCapacity: 18)
        XCTAssertEqual(r.dataIn[2], 0, "cleared once reported")
        // A write whose data-out is short is refused, not half-done.
        r = disk.execute(cdb10(0x2A, lba: 0, blocks: 2), dataOut: [1, 2, 3], dataInCapacity: 0)
        XCTAssertEqual(r.sense.key, 0x05)
        XCTAssertEqual(backend.bytes[0], 0)
    }

    func testReadOnlyRefusesEveryWrite() {
        let backend = MemoryBackend(blocks: 16)
        let disk = SCSIDisk(backend: backend, readOnly: true, serial: "s")
        for cdb in [cdb10(0x2A, lba: 0, blocks: 1), cdb16(0x8A, lba: 0, blocks: 1), cdb16(0x93, lba: 0, blocks: 1, flags: 0x08),
                    [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]] {
            let r = disk.execute(cdb, dataOut: [UInt8](repeating: 0xFF, count: 512), dataInCapacity: 0)
            XCTAssertEqual([r.status.rawValue, r.sense.key, r.sense.asc], [0x02, 0x07, 0x27], "DATA PROTECT / write protected: \(cdb[0])")
        }
        XCTAssertTrue(backend.bytes.allSatisfy { $0 == 0 })
        XCTAssertTrue(backend.discards.isEmpty)
        XCTAssertEqual(disk.execute(cdb10(0x28, lba: 0, blocks: 1), dataOut: [], dataInCapacity: 512).status, .good)
        let mode = disk.execute([0x1A, 0, 0x3F, 0, 255, 0], dataOut: [], dataInCapacity: 255)
        XCTAssertEqual(mode.dataIn[2] & 0x80, 0x80, "MODE SENSE: write protected")
    }

    func testUnmapAndWriteSame() {
        let backend = MemoryBackend(blocks: 64)
        backend.bytes = [UInt8](repeating: 0xEE, count: 64 * 512)
        let disk = SCSIDisk(backend: backend, readOnly: false, serial: "s")
        let list = be(22, 2) + be(32, 2) + [0, 0, 0, 0] + be(4, 8) + be(2, 4) + [0, 0, 0, 0] + be(10, 8) + be(1, 4) + [0, 0, 0, 0]
        XCTAssertEqual(disk.execute([0x42, 0, 0, 0, 0, 0, 0, 0, UInt8(list.count), 0], dataOut: list, dataInCapacity: 0).status, .good)
        XCTAssertEqual(backend.discards.map { [$0.0, $0.1] }, [[2048, 1024], [5120, 512]])
        // WRITE SAME (16) with UNMAP discards; without it repeats the block.
        XCTAssertEqual(disk.execute(cdb16(0x93, lba: 20, blocks: 3, flags: 0x08), dataOut: [], dataInCapacity: 0).status, .good)
        XCTAssertEqual(backend.discards.last.map { [$0.0, $0.1] }, [20 * 512, 3 * 512])
        let block = (0..<512).map { UInt8(truncatingIfNeeded: $0) }
        XCTAssertEqual(disk.execute(cdb16(0x93, lba: 30, blocks: 2), dataOut: block, dataInCapacity: 0).status, .good)
        XCTAssertEqual(Array(backend.bytes[30 * 512..<31 * 512]), block)
        XCTAssertEqual(Array(backend.bytes[31 * 512..<32 * 512]), block)
        // A descriptor past the end is refused.
        let bad = be(14, 2) + be(16, 2) + [0, 0, 0, 0] + be(63, 8) + be(2, 4) + [0, 0, 0, 0]
        XCTAssertEqual(disk.execute([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], dataOut: bad, dataInCapacity: 0).sense.asc, 0x21)
    }

    func testHostErrorsBecomeSenseNotCorruption() {
        let backend = MemoryBackend(blocks: 16)
        let disk = SCSIDisk(backend: backend, readOnly: false, serial: "s")
        backend.failWith = EIO
        var r = disk.execute(cdb10(0x28, lba: 0, blocks: 1), dataOut: [], dataInCapacity: 512)
        XCTAssertEqual([r.status.rawValue, r.sense.key, r.sense.asc], [0x02, 0x03, 0x11], "MEDIUM ERROR / unrecovered read error")
        XCTAssertTrue(r.dataIn.isEmpty)
        r = disk.execute(cdb10(0x2A, lba: 0, blocks: 1), dataOut: [UInt8](repeating: 1, count: 512), dataInCapacity: 0)
        XCTAssertEqual([r.sense.key, r.sense.asc], [0x03, 0x0C], "MEDIUM ERROR / write error")
        r = disk.execute([0x35] + [UInt8](repeating: 0, count: 9), dataOut: [], dataInCapacity: 0)
        XCTAssertEqual(r.sense.key, 0x03, "a failed flush is reported")
        XCTAssertNotNil(disk.lastHostError)
    }

    func testOtherCommandsAndHostileCDBs() {
        let disk = SCSIDisk(backend: MemoryBackend(blocks: 16), readOnly: false, serial: "s")
        XCTAssertEqual(disk.execute([0x00, 0, 0, 0, 0, 0], dataOut: [], dataInCapacity: 0).status, .good)
        XCTAssertEqual(disk.execute([0xA0] + [UInt8](repeating: 0, count: 11), dataOut: [], dataInCapacity: 16).dataIn,
                       [0, 0, 0, 8, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 8), "REPORT LUNS: LUN 0")
        let r = disk.execute([0xC5, 0, 0, 0, 0, 0], dataOut: [], dataInCapacity: 0)
        XCTAssertEqual([r.status.rawValue, r.sense.key, r.sense.asc], [0x02, 0x05, 0x20], "invalid opcode")
        // Every opcode with short, empty and random CDBs: an answer, never a trap.
        var x: UInt64 = 99
        for opcode in 0...255 {
            for length in [0, 1, 6, 10, 16] {
                var cdb = [UInt8(opcode)] + (0..<max(0, length - 1)).map { _ -> UInt8 in x = x &* 6364136223846793005 &+ 1; return UInt8(truncatingIfNeeded: x >> 33) }
                if length == 0 { cdb = [] }
                _ = disk.execute(cdb, dataOut: [UInt8](repeating: 0, count: Int(x % 2048)), dataInCapacity: Int(x % 4096))
            }
        }
    }

    func testDiscardGivesSpaceBackToTheHost() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("hv-scsi-sparse-\(getpid()).img").path
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd); unlink(path) }
        XCTAssertEqual(ftruncate(fd, 8 << 20), 0)
        let disk = SCSIDisk(backend: FileBackend(fd: fd, byteCount: 8 << 20), readOnly: false, serial: "s")
        func allocated() -> Int64 { var st = stat(); fstat(fd, &st); return Int64(st.st_blocks) * 512 }
        let before = allocated()
        let data = [UInt8](repeating: 0x5A, count: 4096 * 256)  // 1 MiB
        XCTAssertEqual(disk.execute(cdb10(0x2A, lba: 2048, blocks: 2048), dataOut: data, dataInCapacity: 0).status, .good)
        XCTAssertEqual(disk.execute([0x35] + [UInt8](repeating: 0, count: 9), dataOut: [], dataInCapacity: 0).status, .good)
        let written = allocated()
        XCTAssertGreaterThanOrEqual(written - before, 1 << 20)
        let list = be(22, 2) + be(16, 2) + [0, 0, 0, 0] + be(2048, 8) + be(2048, 4) + [0, 0, 0, 0]
        XCTAssertEqual(disk.execute([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], dataOut: list, dataInCapacity: 0).status, .good)
        XCTAssertLessThanOrEqual(allocated(), before + 64 * 1024, "the discarded MiB went back to the host")
        XCTAssertEqual(disk.execute(cdb10(0x28, lba: 2048, blocks: 8), dataOut: [], dataInCapacity: 4096).dataIn,
                       [UInt8](repeating: 0, count: 4096), "discarded blocks read as zeros")
    }
}

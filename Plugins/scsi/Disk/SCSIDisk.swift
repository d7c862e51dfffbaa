import Glibc

/// A SCSI direct-access (disk) logical unit over a raw image, as a pure command interpreter:
/// the virtio-scsi device hands it a CDB and the data-out bytes, and it answers with a status,
/// sense data and data-in. All host I/O goes through `BlockBackend`, so tests can use memory.
///
/// Commands (SPC-4/SBC-3): TEST UNIT READY, REQUEST SENSE, INQUIRY (standard and VPD 0x00, 0x80,
/// 0x83, 0xB0, 0xB1, 0xB2), READ CAPACITY (10) and (16), MODE SENSE (6) and (10), READ and WRITE
/// (10/12/16), SYNCHRONIZE CACHE (10/16), UNMAP, WRITE SAME (16) with and without UNMAP, REPORT
/// LUNS, START STOP UNIT (accepted, no effect), PREVENT ALLOW MEDIUM REMOVAL (accepted). Anything
/// else is CHECK CONDITION / ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.

/// Where the blocks live. Errors are errno values.
public protocol BlockBackend: AnyObject {
    var byteCount: UInt64 { get }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int32?
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Int32?
    func flush() -> Int32?
    /// Gives the range's space back to the host (reads as zeros afterwards).
    func discard(at offset: UInt64, count: UInt64) -> Int32?
    /// Reads `count` bytes at `offset` straight into `vectors` (guest buffers, say), with no
    /// copy in between. Safe from any thread: a backend keeps no mutable state.
    func read(into vectors: [iovec], count: Int, at offset: UInt64) -> Int32?
    /// Writes `count` bytes from `vectors` at `offset`. Safe from any thread.
    func write(from vectors: [iovec], count: Int, at offset: UInt64) -> Int32?
    /// Reads like `read(into:count:at:)` if that needs no wait for storage (the host's page cache
    /// holds every byte) and nothing else holds the backend's locks; returns whether it did. False
    /// says nothing about what `vectors` hold now: read them again with `read(into:count:at:)`,
    /// which also reports any error. Never blocks, so the adapter's own thread may call it.
    func readIfCached(into vectors: [iovec], count: Int, at offset: UInt64) -> Bool
    /// Writes like `write(from:count:at:)` if that changes nothing in the image's structure (no
    /// cluster to allocate, no table to read) and needs no lock another thread holds; returns
    /// whether it did. False says nothing about what reached the image: write it again with
    /// `write(from:count:at:)`, which also reports any error. The write itself may still wait
    /// for the host (dirty-page throttling): the caller decides whether to risk that.
    func writeInPlace(from vectors: [iovec], count: Int, at offset: UInt64) -> Bool
}

extension BlockBackend {
    /// Vector by vector through `read(into:at:)`, for backends without vectored I/O.
    public func read(into vectors: [iovec], count: Int, at offset: UInt64) -> Int32? {
        eachVector(vectors, count: count, at: offset) { read(into: UnsafeMutableRawBufferPointer(start: $0, count: $1), at: $2) }
    }

    /// Vector by vector through `write(_:at:)`.
    public func write(from vectors: [iovec], count: Int, at offset: UInt64) -> Int32? {
        eachVector(vectors, count: count, at: offset) { write(UnsafeRawBufferPointer(start: $0, count: $1), at: $2) }
    }

    /// A backend that cannot tell whether a read would wait never reads without waiting.
    public func readIfCached(into vectors: [iovec], count: Int, at offset: UInt64) -> Bool { false }

    /// A backend that cannot tell whether a write changes its structure never writes in place.
    public func writeInPlace(from vectors: [iovec], count: Int, at offset: UInt64) -> Bool { false }

    /// Calls `io(base, length, offset)` for each vector's share of `count` bytes from `offset`.
    private func eachVector(_ vectors: [iovec], count: Int, at offset: UInt64,
                            _ io: (UnsafeMutableRawPointer, Int, UInt64) -> Int32?) -> Int32? {
        var at = offset, left = count
        for v in vectors where left > 0 {
            let n = min(v.iov_len, left)
            guard let base = v.iov_base else { return EFAULT }
            if let e = io(base, n, at) { return e }
            at += UInt64(n)
            left -= n
        }
        return left == 0 ? nil : EFAULT
    }
}

/// A READ or WRITE the adapter carries out itself, straight between the image and the guest's
/// buffers (`SCSIDisk.plannedTransfer`): no copy through the interpreter, and off its thread.
public struct SCSITransfer: Equatable, Sendable {
    public let isWrite: Bool
    /// Byte offset in the image.
    public let offset: UInt64
    public let byteCount: Int
    public let lba: UInt64
}

/// A logical unit the virtio-scsi adapter serves: `SCSIDisk` or `SCSICDROM`.
public protocol SCSILogicalUnit: AnyObject {
    /// Runs `cdb` with the driver's data-out bytes; data-in is at most `dataInCapacity` bytes.
    func execute(_ cdb: [UInt8], dataOut: [UInt8], dataInCapacity: Int) -> SCSIResult
    /// The last host I/O failure, described for the log.
    var lastHostError: String? { get set }
    /// What must survive a restart of the device's process (`LUNState`).
    var savedState: LUNState { get }
    /// Takes back a state a previous process saved.
    func restore(_ state: LUNState)
    /// The transfer `cdb` asks for when it is a plain READ or WRITE that passes every check, so the
    /// adapter may do the I/O itself (`transfer`, then `transferCompleted`); nil: use `execute`.
    func plannedTransfer(_ cdb: [UInt8], dataOutCapacity: Int, dataInCapacity: Int) -> SCSITransfer?
    /// Carries out a planned transfer against the guest's buffers. Safe from any thread.
    func transfer(_ t: SCSITransfer, vectors: [iovec]) -> Int32?
    /// Carries out a planned transfer at once if it can without waiting for storage: a READ of
    /// data the host has cached (`BlockBackend.readIfCached`), or, with `writes`, a WRITE that
    /// overwrites data in place (`BlockBackend.writeInPlace`). False: do it with `transfer`.
    func transferIfImmediate(_ t: SCSITransfer, vectors: [iovec], writes: Bool) -> Bool
    /// The command's outcome once its transfer ended (`errno` nil: it succeeded). Runtime thread.
    func transferCompleted(_ t: SCSITransfer, errno: Int32?) -> SCSIResult
}

extension SCSILogicalUnit {
    /// The host I/O failure since the last call (then forgotten).
    public func takeHostError() -> String? {
        defer { lastHostError = nil }
        return lastHostError
    }
}

extension SCSIDisk: SCSILogicalUnit {}
extension SCSICDROM: SCSILogicalUnit {
    public func plannedTransfer(_ cdb: [UInt8], dataOutCapacity: Int, dataInCapacity: Int) -> SCSITransfer? { nil }
    public func transfer(_ t: SCSITransfer, vectors: [iovec]) -> Int32? { EINVAL }
    public func transferIfImmediate(_ t: SCSITransfer, vectors: [iovec], writes: Bool) -> Bool { false }
    public func transferCompleted(_ t: SCSITransfer, errno: Int32?) -> SCSIResult { .check(.invalidField) }
}

/// SCSI status bytes.
public enum SCSIStatus: UInt8, Sendable {
    case good = 0x00
    case checkCondition = 0x02
}

/// Fixed-format sense data (SPC-4 §4.5.3).
public struct SCSISense: Equatable, Sendable {
    public var key: UInt8
    public var asc: UInt8
    public var ascq: UInt8
    public init(key: UInt8, asc: UInt8, ascq: UInt8) {
        self.key = key
        self.asc = asc
        self.ascq = ascq
    }
    public static let none = SCSISense(key: 0, asc: 0, ascq: 0)
    public static let invalidOpcode = SCSISense(key: 0x05, asc: 0x20, ascq: 0)
    public static let invalidField = SCSISense(key: 0x05, asc: 0x24, ascq: 0)
    public static let lbaOutOfRange = SCSISense(key: 0x05, asc: 0x21, ascq: 0)
    public static let parameterListLength = SCSISense(key: 0x05, asc: 0x1A, ascq: 0)
    public static let writeProtected = SCSISense(key: 0x07, asc: 0x27, ascq: 0)
    public static let unrecoveredReadError = SCSISense(key: 0x03, asc: 0x11, ascq: 0)
    public static let writeError = SCSISense(key: 0x03, asc: 0x0C, ascq: 0)

    /// 18 bytes, response code 0x70 (current error).
    public var bytes: [UInt8] {
        var b = [UInt8](repeating: 0, count: 18)
        b[0] = 0x70
        b[2] = key
        b[7] = 10
        b[12] = asc
        b[13] = ascq
        return b
    }
}

/// The outcome of one command.
public struct SCSIResult: Sendable {
    public var status: SCSIStatus
    public var sense: SCSISense
    public var dataIn: [UInt8]
    static func good(_ data: [UInt8] = []) -> SCSIResult { SCSIResult(status: .good, sense: .none, dataIn: data) }
    static func check(_ sense: SCSISense) -> SCSIResult { SCSIResult(status: .checkCondition, sense: sense, dataIn: []) }

    /// The result with data-in cut to the driver's `capacity` (an allocation length larger than
    /// the buffers the driver gave, as SCSI allows; found by the scsi-disk fuzz target).
    func cappingDataIn(at capacity: Int) -> SCSIResult {
        guard dataIn.count > capacity else { return self }
        var capped = self
        capped.dataIn = Array(dataIn.prefix(max(capacity, 0)))
        return capped
    }
}

public final class SCSIDisk {
    public static let blockSize: UInt64 = 512
    /// Largest transfer taken in one command (SeaBIOS and Linux stay far below).
    public static let maximumTransferBlocks: UInt64 = 8192
    public let backend: BlockBackend
    public let readOnly: Bool
    public let serial: String
    /// The sense of the last CHECK CONDITION, for REQUEST SENSE (cleared when reported).
    public internal(set) var pendingSense = SCSISense.none
    /// The last host I/O error, for the log (`takeHostError`).
    public var lastHostError: String?

    public init(backend: BlockBackend, readOnly: Bool, serial: String) {
        self.backend = backend
        self.readOnly = readOnly
        self.serial = serial
    }

    public var blockCount: UInt64 { backend.byteCount / Self.blockSize }

    /// Runs `cdb` with the driver's `dataOut` bytes; `allocation` caps data-in.
    public func execute(_ cdb: [UInt8], dataOut: [UInt8], dataInCapacity: Int) -> SCSIResult {
        guard let opcode = cdb.first else { return finish(.check(.invalidOpcode)) }
        let result: SCSIResult
        switch opcode {
        case 0x00: result = .good()                                           // TEST UNIT READY
        case 0x03: result = requestSense(cdb)
        case 0x12: result = inquiry(cdb)
        case 0x1A: result = modeSense(cdb, ten: false)
        case 0x5A: result = modeSense(cdb, ten: true)
        case 0x1B, 0x1E: result = .good()                                     // START STOP UNIT, PREVENT ALLOW
        case 0x25: result = readCapacity10()
        case 0x9E where cdb.count > 1 && cdb[1] & 0x1F == 0x10: result = readCapacity16(cdb)
        case 0x28, 0xA8, 0x88: result = read(cdb, dataInCapacity: dataInCapacity)
        case 0x2A, 0xAA, 0x8A: result = write(cdb, dataOut)
        case 0x35, 0x91:                                                      // SYNCHRONIZE CACHE
            if let e = backend.flush() { result = hostError(e, .writeError, "flush") } else { result = .good() }
        case 0x42: result = unmap(dataOut)
        case 0x93: result = writeSame16(cdb, dataOut)
        case 0xA0: result = reportLUNs()
        default: result = .check(.invalidOpcode)
        }
        return finish(result.cappingDataIn(at: dataInCapacity))
    }

    public func plannedTransfer(_ cdb: [UInt8], dataOutCapacity: Int, dataInCapacity: Int) -> SCSITransfer? {
        guard let opcode = cdb.first, [0x28, 0xA8, 0x88, 0x2A, 0xAA, 0x8A].contains(opcode),
              let (lba, blocks) = extent(cdb), blocks > 0, inRange(lba, blocks), blocks <= Self.maximumTransferBlocks else { return nil }
        // READ/WRITE (10) with FUA or DPO bits, and anything unusual, take the interpreter's path.
        let isWrite = [0x2A, 0xAA, 0x8A].contains(opcode)
        let bytes = Int(blocks * Self.blockSize)
        if isWrite {
            guard !readOnly, dataOutCapacity >= bytes else { return nil }
        } else {
            guard dataInCapacity >= bytes else { return nil }
        }
        return SCSITransfer(isWrite: isWrite, offset: lba * Self.blockSize, byteCount: bytes, lba: lba)
    }

    public func transfer(_ t: SCSITransfer, vectors: [iovec]) -> Int32? {
        t.isWrite ? backend.write(from: vectors, count: t.byteCount, at: t.offset) : backend.read(into: vectors, count: t.byteCount, at: t.offset)
    }

    public func transferIfImmediate(_ t: SCSITransfer, vectors: [iovec], writes: Bool) -> Bool {
        guard t.isWrite else { return backend.readIfCached(into: vectors, count: t.byteCount, at: t.offset) }
        return writes && backend.writeInPlace(from: vectors, count: t.byteCount, at: t.offset)
    }

    public func transferCompleted(_ t: SCSITransfer, errno: Int32?) -> SCSIResult {
        guard let errno else { return finish(.good()) }
        let blocks = UInt64(t.byteCount) / Self.blockSize
        return finish(t.isWrite ? hostError(errno, .writeError, "write of \(blocks) blocks at LBA \(t.lba)")
                                : hostError(errno, .unrecoveredReadError, "read of \(blocks) blocks at LBA \(t.lba)"))
    }

    private func finish(_ r: SCSIResult) -> SCSIResult {
        if r.status == .checkCondition { pendingSense = r.sense }
        return r
    }

    private func hostError(_ errno: Int32, _ sense: SCSISense, _ what: String) -> SCSIResult {
        lastHostError = "\(what) failed on the host (errno \(errno)); the guest gets sense \(String(sense.key, radix: 16))/\(String(sense.asc, radix: 16))"
        return .check(sense)
    }


    /// The CDB's LBA and block count, by opcode; nil when the CDB is too short.
    private func extent(_ cdb: [UInt8]) -> (lba: UInt64, blocks: UInt64)? {
        switch cdb[0] {
        case 0x28, 0x2A: return cdb.count >= 10 ? (u32(cdb, 2), u16(cdb, 7)) : nil
        case 0xA8, 0xAA: return cdb.count >= 12 ? (u32(cdb, 2), u32(cdb, 6)) : nil
        case 0x88, 0x8A, 0x93: return cdb.count >= 16 ? (u64(cdb, 2), u32(cdb, 10)) : nil
        default: return nil
        }
    }

    private func inRange(_ lba: UInt64, _ blocks: UInt64) -> Bool {
        lba <= blockCount && blocks <= blockCount - lba
    }

    private func requestSense(_ cdb: [UInt8]) -> SCSIResult {
        let sense = pendingSense
        pendingSense = .none
        let length = cdb.count > 4 ? Int(cdb[4]) : 18
        return .good(Array(sense.bytes.prefix(length)))
    }

    private func inquiry(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 6 else { return .check(.invalidField) }
        let allocation = Int(u16(cdb, 3))
        let evpd = cdb[1] & 1 != 0
        var data: [UInt8]
        if !evpd {
            guard cdb[2] == 0 else { return .check(.invalidField) }
            data = [0x00, 0x00, 0x05, 0x02, 31, 0, 0, 0x02]     // disk, SPC-3, response format 2, CMDQUE
            data += padded("HV", 8) + padded("VIRTUAL DISK", 16) + padded("0.1", 4)
        } else {
            let pages: [UInt8] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
            var body: [UInt8]
            switch cdb[2] {
            case 0x00: body = pages
            case 0x80: body = Array(serial.utf8.prefix(64))
            case 0x83:
                // One designator: T10 vendor ID, ASCII, "HV      " + serial.
                let id = padded("HV", 8) + Array(serial.utf8.prefix(64))
                body = [0x02, 0x01, 0x00, UInt8(id.count)] + id
            case 0xB0:
                // Block limits: maximum transfer, and UNMAP limits (SBC-3 §6.6.4).
                body = [UInt8](repeating: 0, count: 60)
                body.replaceSubrange(4..<8, with: be(Self.maximumTransferBlocks, 4))          // maximum transfer length
                body.replaceSubrange(16..<20, with: be(Self.maximumTransferBlocks, 4))        // maximum unmap LBA count
                body.replaceSubrange(20..<24, with: be(64, 4))                                // maximum unmap descriptors
                body.replaceSubrange(24..<28, with: be(8, 4))                                 // optimal unmap granularity (4 KiB)
                body.replaceSubrange(32..<40, with: be(Self.maximumTransferBlocks, 8))        // maximum write same length
            case 0xB1:
                body = [UInt8](repeating: 0, count: 60)
                body[1] = 0x01                                                                // non-rotating medium
            case 0xB2:
                body = [0, 0xE0 | 0x02, 0, 0]                                                 // LBPU, LBPWS, LBPWS10; thin provisioned
            default:
                return .check(.invalidField)
            }
            data = [0x00, cdb[2]] + be(UInt64(body.count), 2) + body
        }
        return .good(Array(data.prefix(allocation)))
    }

    private func modeSense(_ cdb: [UInt8], ten: Bool) -> SCSIResult {
        guard cdb.count >= (ten ? 10 : 6) else { return .check(.invalidField) }
        let page = cdb[2] & 0x3F
        let allocation = ten ? Int(u16(cdb, 7)) : Int(cdb[4])
        // Caching page (0x08): write cache enabled (the host page cache; SYNCHRONIZE CACHE flushes it).
        let caching: [UInt8] = [0x08, 0x12, 0x04] + [UInt8](repeating: 0, count: 17)
        var pages: [UInt8]
        switch page {
        case 0x08, 0x3F: pages = caching
        case 0x00: pages = []
        default: return .check(.invalidField)
        }
        let wp: UInt8 = readOnly ? 0x80 : 0
        let data: [UInt8] = ten ? be(UInt64(6 + pages.count), 2) + [0, wp, 0, 0, 0, 0] + pages
                                : [UInt8(3 + pages.count), 0, wp, 0] + pages
        return .good(Array(data.prefix(allocation)))
    }

    private func readCapacity10() -> SCSIResult {
        let last = blockCount == 0 ? 0 : blockCount - 1
        return .good(be(min(last, 0xFFFF_FFFF), 4) + be(Self.blockSize, 4))
    }

    private func readCapacity16(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 16 else { return .check(.invalidField) }
        let allocation = Int(u32(cdb, 10))
        var data = be(blockCount == 0 ? 0 : blockCount - 1, 8) + be(Self.blockSize, 4)
        data += [0, 0, 0x80, 0]  // LBPME: thin provisioning, UNMAP honoured
        data += [UInt8](repeating: 0, count: 16)
        return .good(Array(data.prefix(allocation)))
    }

    private func read(_ cdb: [UInt8], dataInCapacity: Int) -> SCSIResult {
        guard let (lba, blocks) = extent(cdb) else { return .check(.invalidField) }
        guard inRange(lba, blocks) else { return .check(.lbaOutOfRange) }
        guard blocks <= Self.maximumTransferBlocks, Int(blocks * Self.blockSize) <= dataInCapacity else { return .check(.invalidField) }
        var data = [UInt8](repeating: 0, count: Int(blocks * Self.blockSize))
        if let e = data.withUnsafeMutableBytes({ backend.read(into: $0, at: lba * Self.blockSize) }) {
            return hostError(e, .unrecoveredReadError, "read of \(blocks) blocks at LBA \(lba)")
        }
        return .good(data)
    }

    private func write(_ cdb: [UInt8], _ dataOut: [UInt8]) -> SCSIResult {
        guard let (lba, blocks) = extent(cdb) else { return .check(.invalidField) }
        guard !readOnly else { return .check(.writeProtected) }
        guard inRange(lba, blocks) else { return .check(.lbaOutOfRange) }
        guard blocks <= Self.maximumTransferBlocks, dataOut.count >= Int(blocks * Self.blockSize) else { return .check(.invalidField) }
        if let e = dataOut.withUnsafeBytes({ backend.write(UnsafeRawBufferPointer(rebasing: $0[0..<Int(blocks * Self.blockSize)]), at: lba * Self.blockSize) }) {
            return hostError(e, .writeError, "write of \(blocks) blocks at LBA \(lba)")
        }
        return .good()
    }

    private func unmap(_ parameters: [UInt8]) -> SCSIResult {
        guard !readOnly else { return .check(.writeProtected) }
        guard parameters.count >= 8 else { return parameters.isEmpty ? .good() : .check(.parameterListLength) }
        let length = Int(u16(parameters, 2))
        guard length % 16 == 0, 8 + length <= parameters.count else { return .check(.parameterListLength) }
        for i in stride(from: 8, to: 8 + length, by: 16) {
            let lba = u64(parameters, i), blocks = u32(parameters, i + 8)
            guard inRange(lba, blocks) else { return .check(.lbaOutOfRange) }
            if blocks > 0, let e = backend.discard(at: lba * Self.blockSize, count: blocks * Self.blockSize) {
                return hostError(e, .writeError, "discard of \(blocks) blocks at LBA \(lba)")
            }
        }
        return .good()
    }

    private func writeSame16(_ cdb: [UInt8], _ dataOut: [UInt8]) -> SCSIResult {
        guard let (lba, blocks) = extent(cdb) else { return .check(.invalidField) }
        guard !readOnly else { return .check(.writeProtected) }
        guard inRange(lba, blocks), blocks <= Self.maximumTransferBlocks else { return .check(.lbaOutOfRange) }
        if cdb[1] & 0x08 != 0 {  // UNMAP
            if blocks > 0, let e = backend.discard(at: lba * Self.blockSize, count: blocks * Self.blockSize) {
                return hostError(e, .writeError, "discard of \(blocks) blocks at LBA \(lba)")
            }
            return .good()
        }
        guard dataOut.count >= Int(Self.blockSize) else { return .check(.invalidField) }
        let block = Array(dataOut.prefix(Int(Self.blockSize)))
        for i in 0..<blocks {
            if let e = block.withUnsafeBytes({ backend.write($0, at: (lba + i) * Self.blockSize) }) {
                return hostError(e, .writeError, "write same at LBA \(lba + i)")
            }
        }
        return .good()
    }

    private func reportLUNs() -> SCSIResult {
        .good(be(8, 4) + [0, 0, 0, 0] + [UInt8](repeating: 0, count: 8))  // one LUN: 0
    }
}

/// An MMC CD-ROM logical unit over an ISO image (2048-byte blocks), as a pure command
/// interpreter like `SCSIDisk`.
///
/// Commands (MMC-6/SPC-4): TEST UNIT READY, REQUEST SENSE, INQUIRY (peripheral type 5,
/// removable), READ CAPACITY, READ (10) and (12), READ TOC/PMA/ATIP (formatted TOC, session info),
/// GET CONFIGURATION (profile list, core, removable medium), GET EVENT STATUS NOTIFICATION
/// (media class, polled), MODE SENSE (6/10: error recovery and CD capabilities pages), START STOP
/// UNIT (eject and load), PREVENT ALLOW MEDIUM REMOVAL, READ DISC INFORMATION, REPORT LUNS. Writes
/// are refused with DATA PROTECT / WRITE PROTECTED; an eject while removal is prevented with
/// ILLEGAL REQUEST / MEDIUM REMOVAL PREVENTED. After the operator changes the medium, the next
/// command gets UNIT ATTENTION once: MEDIUM MAY HAVE CHANGED (06/28) for an insertion, MEDIUM NOT
/// PRESENT (06/3A) for a removal; then NOT READY / MEDIUM NOT PRESENT (02/3A) while the tray is empty.
public final class SCSICDROM {
    public static let blockSize: UInt64 = 2048
    public static let maximumTransferBlocks: UInt64 = 2048
    /// The medium, nil when the tray is empty.
    public internal(set) var medium: BlockBackend?
    public internal(set) var removalPrevented = false
    /// A UNIT ATTENTION to report once (after the operator changed the medium).
    var unitAttention: SCSISense?
    var mediaEvent: UInt8 = 0  // 0 none, 1 eject request, 2 new media, 3 media removal
    public internal(set) var pendingSense = SCSISense.none
    public var lastHostError: String?

    public static let notReadyNoMedium = SCSISense(key: 0x02, asc: 0x3A, ascq: 0x00)
    public static let mediumChanged = SCSISense(key: 0x06, asc: 0x28, ascq: 0x00)
    public static let mediumRemoved = SCSISense(key: 0x06, asc: 0x3A, ascq: 0x00)
    public static let removalPreventedSense = SCSISense(key: 0x05, asc: 0x53, ascq: 0x02)

    public init(medium: BlockBackend?) {
        self.medium = medium
    }

    public var blockCount: UInt64 { (medium?.byteCount ?? 0) / Self.blockSize }

    /// Replaces the medium (nil: eject) as an operator would; the guest hears of it.
    public func changeMedium(_ new: BlockBackend?) {
        medium = new
        unitAttention = new == nil ? Self.mediumRemoved : Self.mediumChanged
        mediaEvent = new == nil ? 3 : 2
    }

    public func execute(_ cdb: [UInt8], dataOut: [UInt8], dataInCapacity: Int) -> SCSIResult {
        guard let opcode = cdb.first else { return finish(.check(.invalidOpcode)) }
        // INQUIRY, REQUEST SENSE, REPORT LUNS and GET EVENT STATUS never report UNIT ATTENTION.
        if let attention = unitAttention, ![0x12, 0x03, 0xA0, 0x4A].contains(opcode) {
            unitAttention = nil
            return finish(.check(attention))
        }
        let result: SCSIResult
        switch opcode {
        case 0x00: result = medium == nil ? .check(Self.notReadyNoMedium) : .good()
        case 0x03:
            let sense = pendingSense
            pendingSense = .none
            result = .good(Array(sense.bytes.prefix(cdb.count > 4 ? Int(cdb[4]) : 18)))
        case 0x12: result = inquiry(cdb)
        case 0x1A: result = modeSense(cdb, ten: false)
        case 0x5A: result = modeSense(cdb, ten: true)
        case 0x1B: result = startStop(cdb)
        case 0x1E:
            removalPrevented = cdb.count > 4 && cdb[4] & 0x01 != 0
            result = .good()
        case 0x25: result = readCapacity()
        case 0x28, 0xA8: result = read(cdb, dataInCapacity: dataInCapacity)
        case 0x43: result = readTOC(cdb)
        case 0x46: result = getConfiguration(cdb)
        case 0x4A: result = eventStatus(cdb)
        case 0x51: result = discInformation(cdb)
        case 0xA0: result = .good(be(8, 4) + [0, 0, 0, 0] + [UInt8](repeating: 0, count: 8))
        case 0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0x93, 0x42, 0x35, 0x91:
            result = .check(.writeProtected)  // WRITE, WRITE AND VERIFY, WRITE SAME, UNMAP, SYNCHRONIZE CACHE
        default: result = .check(.invalidOpcode)
        }
        return finish(result.cappingDataIn(at: dataInCapacity))
    }

    private func finish(_ r: SCSIResult) -> SCSIResult {
        if r.status == .checkCondition { pendingSense = r.sense }
        return r
    }


    private func inquiry(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 6 else { return .check(.invalidField) }
        let allocation = Int(u16(cdb, 3))
        if cdb[1] & 1 != 0 {
            // VPD: only the supported-pages page.
            guard cdb[2] == 0 else { return .check(.invalidField) }
            return .good(Array(([0x05, 0x00, 0x00, 0x01, 0x00] as [UInt8]).prefix(allocation)))
        }
        var data: [UInt8] = [0x05, 0x80, 0x05, 0x02, 31, 0, 0, 0]  // CD/DVD, removable, SPC-3
        data += padded("HV", 8) + padded("VIRTUAL CD-ROM", 16) + padded("0.1", 4)
        return .good(Array(data.prefix(allocation)))
    }

    private func readCapacity() -> SCSIResult {
        guard medium != nil else { return .check(Self.notReadyNoMedium) }
        return .good(be(blockCount == 0 ? 0 : blockCount - 1, 4) + be(Self.blockSize, 4))
    }

    private func read(_ cdb: [UInt8], dataInCapacity: Int) -> SCSIResult {
        guard let medium else { return .check(Self.notReadyNoMedium) }
        let lba: UInt64, blocks: UInt64
        if cdb[0] == 0x28 {
            guard cdb.count >= 10 else { return .check(.invalidField) }
            (lba, blocks) = (u32(cdb, 2), u16(cdb, 7))
        } else {
            guard cdb.count >= 12 else { return .check(.invalidField) }
            (lba, blocks) = (u32(cdb, 2), u32(cdb, 6))
        }
        guard lba <= blockCount, blocks <= blockCount - lba else { return .check(.lbaOutOfRange) }
        guard blocks <= Self.maximumTransferBlocks, Int(blocks * Self.blockSize) <= dataInCapacity else { return .check(.invalidField) }
        var data = [UInt8](repeating: 0, count: Int(blocks * Self.blockSize))
        if let e = data.withUnsafeMutableBytes({ medium.read(into: $0, at: lba * Self.blockSize) }) {
            lastHostError = "read of \(blocks) blocks at LBA \(lba) failed on the host (errno \(e)); the guest gets a medium error"
            return .check(.unrecoveredReadError)
        }
        return .good(data)
    }

    private func startStop(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 5 else { return .check(.invalidField) }
        let loadEject = cdb[4] & 0x02 != 0, start = cdb[4] & 0x01 != 0
        guard loadEject else { return .good() }
        if !start {
            guard !removalPrevented else { return .check(Self.removalPreventedSense) }
            if medium != nil {
                medium = nil
                mediaEvent = 3
            }
        }
        return .good()  // load with an empty tray: nothing to load (the operator inserts media)
    }

    private func readTOC(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 10 else { return .check(.invalidField) }
        guard medium != nil else { return .check(Self.notReadyNoMedium) }
        let msf = cdb[1] & 0x02 != 0
        let format = cdb[2] & 0x0F
        let allocation = Int(u16(cdb, 7))
        func address(_ lba: UInt64) -> [UInt8] {
            guard msf else { return be(lba, 4) }
            let frames = lba + 150
            return [0, UInt8(frames / (60 * 75)), UInt8((frames / 75) % 60), UInt8(frames % 75)]
        }
        var data: [UInt8]
        switch format {
        case 0:
            // Track 1 (data, starting at 0) and the lead-out.
            let tracks: [UInt8] = [0, 0x14, 1, 0] + address(0) + [0, 0x14, 0xAA, 0] + address(blockCount)
            data = be(UInt64(2 + tracks.count), 2) + [1, 1] + tracks
        case 1:
            // Session information: one session, its first track at 0.
            data = be(10, 2) + [1, 1] + [0, 0x14, 1, 0] + address(0)
        default:
            return .check(.invalidField)
        }
        return .good(Array(data.prefix(allocation)))
    }

    private func getConfiguration(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 10 else { return .check(.invalidField) }
        let allocation = Int(u16(cdb, 7))
        let current: UInt16 = medium == nil ? 0 : 0x0008  // CD-ROM profile, when a medium is in
        var features: [UInt8] = []
        features += [0x00, 0x00, 0x03, 4] + [0x00, 0x08, medium == nil ? 0 : 1, 0]  // profile list: CD-ROM
        features += [0x00, 0x01, 0x0B, 8] + be(1, 4) + [0x01, 0, 0, 0]            // core: SCSI, DBE
        features += [0x00, 0x03, 0x0B, 4] + [0x29, 0, 0, 0]                        // removable medium: tray, eject, lock
        let data = be(UInt64(4 + features.count), 4) + [0, 0] + be(UInt64(current), 2) + features
        return .good(Array(data.prefix(allocation)))
    }

    private func eventStatus(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 10, cdb[1] & 0x01 != 0 else { return .check(.invalidField) }  // polled only
        let allocation = Int(u16(cdb, 7))
        guard cdb[4] & 0x10 != 0 else {
            // No supported class asked for: header only, "no event available".
            return .good(Array((be(2, 2) + [0x80, 0x10]).prefix(allocation)))
        }
        let event = mediaEvent
        mediaEvent = 0
        let data = be(6, 2) + [0x04, 0x10] + [event, medium == nil ? 0x00 : 0x02, 0, 0]
        return .good(Array(data.prefix(allocation)))
    }

    private func discInformation(_ cdb: [UInt8]) -> SCSIResult {
        guard cdb.count >= 10 else { return .check(.invalidField) }
        guard medium != nil else { return .check(Self.notReadyNoMedium) }
        let allocation = Int(u16(cdb, 7))
        var data = [UInt8](repeating: 0, count: 34)
        data[1] = 32
        data[2] = 0x0E  // complete disc, last session complete
        data[3] = 1; data[4] = 1; data[5] = 1; data[6] = 1
        return .good(Array(data.prefix(allocation)))
    }

    private func modeSense(_ cdb: [UInt8], ten: Bool) -> SCSIResult {
        guard cdb.count >= (ten ? 10 : 6) else { return .check(.invalidField) }
        let page = cdb[2] & 0x3F
        let allocation = ten ? Int(u16(cdb, 7)) : Int(cdb[4])
        let errorRecovery: [UInt8] = [0x01, 0x06, 0, 5, 0, 0, 0, 0]
        // CD capabilities: reads CD-R/RW, can eject and lock, tray loading.
        var capabilities: [UInt8] = [0x2A, 0x12, 0x3B, 0, 0x71, 0x60, 0x29, 0] + [UInt8](repeating: 0, count: 12)
        capabilities[8] = 0x02; capabilities[9] = 0xC2  // maximum speed (obsolete field), 706 kB/s
        var pages: [UInt8]
        switch page {
        case 0x01: pages = errorRecovery
        case 0x2A: pages = capabilities
        case 0x3F: pages = errorRecovery + capabilities
        default: return .check(.invalidField)
        }
        let data: [UInt8] = ten ? be(UInt64(6 + pages.count), 2) + [0, 0, 0, 0, 0, 0] + pages
                                : [UInt8(3 + pages.count), 0, 0, 0] + pages
        return .good(Array(data.prefix(allocation)))
    }
}

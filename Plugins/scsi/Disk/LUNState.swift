/// What a logical unit must remember across a restart of its process, beyond the medium the core
/// hands back: the sense REQUEST SENSE would report, a UNIT ATTENTION not yet reported, the media
/// event GET EVENT STATUS would report, the PREVENT ALLOW lock, and whether the guest ejected the
/// medium. hv-scsi keeps it in its state page, so a crash between two commands is invisible.
public struct LUNState: Equatable, Sendable {
    public var pendingSense: SCSISense
    public var unitAttention: SCSISense?
    public var mediaEvent: UInt8
    public var removalPrevented: Bool
    /// False once the guest ejected the medium (START STOP UNIT), although the core still holds it.
    public var mediumPresent: Bool

    public init(pendingSense: SCSISense = .none, unitAttention: SCSISense? = nil, mediaEvent: UInt8 = 0,
                removalPrevented: Bool = false, mediumPresent: Bool = true) {
        self.pendingSense = pendingSense
        self.unitAttention = unitAttention
        self.mediaEvent = mediaEvent
        self.removalPrevented = removalPrevented
        self.mediumPresent = mediumPresent
    }

    /// "HVLU", then the fields, 16 bytes.
    public static let byteCount = 16
    static let tag: [UInt8] = Array("HVLU".utf8)

    public var bytes: [UInt8] {
        let ua = unitAttention ?? .none
        return Self.tag + [pendingSense.key, pendingSense.asc, pendingSense.ascq,
                           unitAttention == nil ? 0 : 1, ua.key, ua.asc, ua.ascq,
                           mediaEvent, removalPrevented ? 1 : 0, mediumPresent ? 1 : 0, 0, 0]
    }

    /// Reads a saved state back, validating every field (a dead or compromised process may have
    /// left anything): nil unless the tag matches and every value is one a LUN can hold.
    public init?(bytes b: [UInt8]) {
        guard b.count >= Self.byteCount, Array(b[0..<4]) == Self.tag,
              b[4] <= 0x0F, b[7] <= 1, b[8] <= 0x0F, b[11] <= 3, b[12] <= 1, b[13] <= 1 else { return nil }
        pendingSense = SCSISense(key: b[4], asc: b[5], ascq: b[6])
        unitAttention = b[7] == 1 ? SCSISense(key: b[8], asc: b[9], ascq: b[10]) : nil
        mediaEvent = b[11]
        removalPrevented = b[12] == 1
        mediumPresent = b[13] == 1
    }
}

extension SCSIDisk {
    /// The disk's share of `LUNState`: its pending sense.
    public var savedState: LUNState { LUNState(pendingSense: pendingSense) }
    /// Takes back what a previous process of this disk saved.
    public func restore(_ state: LUNState) { pendingSense = state.pendingSense }
}

extension SCSICDROM {
    public var savedState: LUNState {
        LUNState(pendingSense: pendingSense, unitAttention: unitAttention, mediaEvent: mediaEvent,
                 removalPrevented: removalPrevented, mediumPresent: medium != nil)
    }
    /// Takes back what a previous process of this drive saved; a medium the guest had ejected
    /// stays out, although the core hands it over again.
    public func restore(_ state: LUNState) {
        pendingSense = state.pendingSense
        unitAttention = state.unitAttention
        mediaEvent = state.mediaEvent
        removalPrevented = state.removalPrevented
        if !state.mediumPresent { medium = nil }
    }
}

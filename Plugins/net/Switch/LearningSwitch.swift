/// A 48-bit Ethernet address, held in the low bits of a UInt64 (first octet most significant).
public struct MACAddress: Hashable, Sendable, CustomStringConvertible {
    public let value: UInt64

    public init(value: UInt64) { self.value = value & 0xFFFF_FFFF_FFFF }

    /// The address in the first six bytes of `bytes` (a frame's destination, say).
    public init(_ bytes: UnsafeRawBufferPointer, at offset: Int = 0) {
        var v: UInt64 = 0
        for i in 0..<6 { v = v << 8 | UInt64(bytes[offset + i]) }
        value = v
    }

    public init(bytes: [UInt8]) {
        precondition(bytes.count == 6)
        value = bytes.reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// Parses `52:54:00:12:34:56` (or with '-'); nil if malformed.
    public init?(parsing text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).count == 6
            ? text.split(separator: ":", omittingEmptySubsequences: false)
            : text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var v: UInt64 = 0
        for p in parts {
            // Two hex digits exactly: UInt8(_:radix:) alone would take "+f".
            guard p.utf8.count == 2, p.utf8.allSatisfy({ $0 < 0x80 && Character(Unicode.Scalar($0)).isHexDigit }),
                  let octet = UInt8(p, radix: 16) else { return nil }
            v = v << 8 | UInt64(octet)
        }
        value = v
    }

    public var bytes: [UInt8] { (0..<6).map { UInt8(truncatingIfNeeded: value >> UInt64(40 - 8 * $0)) } }
    /// Group (multicast or broadcast) address: the first octet's low bit.
    public var isGroup: Bool { value >> 40 & 1 == 1 }
    public var isBroadcast: Bool { value == 0xFFFF_FFFF_FFFF }
    public var isZero: Bool { value == 0 }
    public var description: String {
        bytes.map { b in
            let hex = String(b, radix: 16)
            return hex.count == 1 ? "0" + hex : hex
        }.joined(separator: ":")
    }
}

/// Where a frame goes.
public enum Forwarding: Equatable, Sendable {
    /// To one port.
    case port(Int)
    /// To every port but the one it came in on (broadcast, multicast, unknown unicast).
    case flood
    /// Nowhere: the destination sits behind the port it came from, or the frame is invalid.
    case drop
}

/// The forwarding table of an Ethernet learning switch (IEEE 802.1D's filtering database, without
/// spanning tree or VLANs): it learns which port each source address sits behind, sends unicast
/// frames to that port, floods group and unknown destinations, filters frames whose destination
/// sits behind the port they came in on, and forgets addresses not seen for `agingNanoseconds`.
public struct LearningSwitch: Sendable {
    private struct Entry {
        var port: Int
        var lastSeen: UInt64
    }
    private var table: [UInt64: Entry] = [:]
    /// Addresses not seen for this long are forgotten (802.1D's default: 300 s).
    public var agingNanoseconds: UInt64 = 300_000_000_000
    /// Table size cap: a guest sending from random source addresses cannot grow the switch's
    /// memory without bound; past this, new addresses are not learned (their frames still flood).
    public var capacity = 4096

    public init() {}

    /// Learned addresses.
    public var count: Int { table.count }

    /// The port `address` was learned on, if it is known and fresh at `now`.
    public func port(of address: MACAddress, now: UInt64) -> Int? {
        guard let e = table[address.value], now &- e.lastSeen < agingNanoseconds else { return nil }
        return e.port
    }

    /// Learns from a frame that entered on `port`, and decides where it goes.
    public mutating func forward(from port: Int, source: MACAddress, destination: MACAddress, now: UInt64) -> Forwarding {
        // A group source address is not a station: 802.1D discards such frames.
        if source.isGroup { return .drop }
        if !source.isZero {
            if table[source.value] != nil || table.count < capacity {
                table[source.value] = Entry(port: port, lastSeen: now)
            }
        }
        if destination.isGroup { return .flood }
        guard let target = self.port(of: destination, now: now) else { return .flood }
        return target == port ? .drop : .port(target)
    }

    /// Forgets every address learned on `port` (it left the segment).
    public mutating func remove(port: Int) {
        table = table.filter { $0.value.port != port }
    }

    /// Forgets addresses older than the aging time.
    public mutating func age(now: UInt64) {
        table = table.filter { now &- $0.value.lastSeen < agingNanoseconds }
    }
}

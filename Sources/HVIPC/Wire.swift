/// Little-endian encoder for hv's wire protocol (ipc-schema/).
public struct WireWriter: Sendable {
    /// Bytes written so far.
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { append(v) }
    public mutating func u32(_ v: UInt32) { append(v) }
    public mutating func i32(_ v: Int32) { append(UInt32(bitPattern: v)) }
    public mutating func u64(_ v: UInt64) { append(v) }
    public mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    private mutating func append<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

/// Bounds-checked little-endian decoder. Every read past the end throws instead of trapping:
/// the bytes come from another process and are untrusted.
public struct WireReader: Sendable {
    private let bytes: [UInt8]
    /// Offset of the next byte to read.
    public private(set) var offset: Int
    public init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }
    /// Bytes left.
    public var remaining: Int { bytes.count - offset }

    public mutating func u8() throws(WireError) -> UInt8 { try integer() }
    public mutating func u16() throws(WireError) -> UInt16 { try integer() }
    public mutating func u32() throws(WireError) -> UInt32 { try integer() }
    public mutating func i32() throws(WireError) -> Int32 { Int32(bitPattern: try integer() as UInt32) }
    public mutating func u64() throws(WireError) -> UInt64 { try integer() }
    public mutating func raw(_ count: Int) throws(WireError) -> [UInt8] {
        guard count >= 0, count <= remaining else { throw .truncated(needed: count, at: offset, have: remaining) }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }
    /// Requires that the whole input was consumed (trailing garbage is malformed, not ignored).
    public func finish() throws(WireError) {
        if remaining != 0 { throw .trailingBytes(remaining) }
    }
    private mutating func integer<T: FixedWidthInteger>() throws(WireError) -> T {
        let size = MemoryLayout<T>.size
        guard size <= remaining else { throw .truncated(needed: size, at: offset, have: remaining) }
        var v: T = 0
        for i in 0..<size { v |= T(bytes[offset + i]) << (8 * i) }
        offset += size
        return v
    }
}

/// Why a message could not be decoded.
public enum WireError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncated(needed: Int, at: Int, have: Int)
    case trailingBytes(Int)
    case lengthMismatch(declared: UInt32, actual: Int)
    case unknownType(UInt16)
    case invalidField(String)

    public var description: String {
        switch self {
        case .truncated(let needed, let at, let have): return "message truncated: needed \(needed) bytes at offset \(at), \(have) left"
        case .trailingBytes(let n): return "message has \(n) unexpected trailing bytes"
        case .lengthMismatch(let declared, let actual): return "header declares a \(declared)-byte payload but \(actual) bytes arrived"
        case .unknownType(let t): return "unknown message type 0x\(String(t, radix: 16))"
        case .invalidField(let what): return "invalid field: \(what)"
        }
    }
}

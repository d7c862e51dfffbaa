import Foundation
import Glibc
import HVIPC
import HVSys
import XCTest

/// A test-local failure with a message.
struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

// MARK: JSON

/// A thin, read-only view of a value from JSONSerialization.
struct JSONValue {
    let raw: Any?
    init(_ raw: Any?) { self.raw = raw }

    subscript(key: String) -> JSONValue { JSONValue((raw as? [String: Any])?[key]) }
    var exists: Bool { raw != nil && !(raw is NSNull) }
    var array: [JSONValue] { ((raw as? [Any]) ?? []).map(JSONValue.init) }
    var object: [String: JSONValue] { ((raw as? [String: Any]) ?? [:]).mapValues(JSONValue.init) }
    var keys: [String] { Array(((raw as? [String: Any]) ?? [:]).keys) }
    var string: String? { raw as? String }

    /// An integer written as a JSON number or as a "0x…" string (how vectors.json writes u64s).
    var integer: Int64? {
        if let s = raw as? String {
            if s.hasPrefix("0x") { return UInt64(s.dropFirst(2), radix: 16).map { Int64(bitPattern: $0) } }
            return Int64(s)
        }
        if let n = raw as? NSNumber { return n.int64Value }
        return nil
    }

    /// The same, as an unsigned 64-bit value (hex strings above Int64.max keep their bits).
    var u64: UInt64? {
        if let s = raw as? String, s.hasPrefix("0x") { return UInt64(s.dropFirst(2), radix: 16) }
        if let n = raw as? NSNumber { return n.uint64Value }
        return integer.map { UInt64(bitPattern: $0) }
    }

    func string(_ what: String) throws -> String {
        guard let s = string else { throw TestFailure("\(what) is not a string: \(String(describing: raw))") }
        return s
    }

    func u64(_ what: String) throws -> UInt64 {
        guard let v = u64 else { throw TestFailure("\(what) is not an integer: \(String(describing: raw))") }
        return v
    }

    func int(_ what: String) throws -> Int {
        guard let v = integer, let i = Int(exactly: v) else { throw TestFailure("\(what) is not an integer: \(String(describing: raw))") }
        return i
    }

    func fixed<T: FixedWidthInteger>(_ type: T.Type, _ what: String) throws -> T {
        let wide = try u64(what)
        guard let v = T(exactly: wide) else { throw TestFailure("\(what) = \(wide) does not fit \(T.self)") }
        return v
    }
}

/// ipc-schema/ files, found from this source file's location.
enum SchemaFiles {
    static var repositoryRoot: URL {
        URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent()  // Tests/HVIPCTests
            .deletingLastPathComponent()  // Tests
            .deletingLastPathComponent()  // repository root
    }

    static func load(_ relativePath: String) throws -> JSONValue {
        let url = repositoryRoot.appendingPathComponent(relativePath)
        let data = try Data(contentsOf: url)
        return JSONValue(try JSONSerialization.jsonObject(with: data))
    }

    static func schema() throws -> Schema { Schema(try load("ipc-schema/messages.json")) }
    static func vectors() throws -> JSONValue { try load("ipc-schema/vectors.json") }
}

/// Lookups into messages.json.
struct Schema {
    let json: JSONValue
    init(_ json: JSONValue) { self.json = json }

    /// name → value of an enum.
    func enumValues(_ name: String) throws -> [String: UInt64] {
        let values = json["enums"][name]["values"].object
        guard !values.isEmpty else { throw TestFailure("schema has no enum \(name)") }
        return try values.mapValues { try $0.u64("enums.\(name)") }
    }

    /// An enum member given by name (or, in must-reject inputs, by number).
    func enumValue(_ name: String, _ value: JSONValue) throws -> UInt64 {
        if let member = value.string, !member.hasPrefix("0x") {
            guard let v = try enumValues(name)[member] else { throw TestFailure("\(member) is not in enum \(name)") }
            return v
        }
        return try value.u64("enum \(name) value")
    }

    /// name → bit number of a bitset.
    func bits(_ name: String) throws -> [String: Int] {
        let bits = json["bitsets"][name]["bits"].object
        guard !bits.isEmpty else { throw TestFailure("schema has no bitset \(name)") }
        return try bits.mapValues { try $0.int("bitsets.\(name)") }
    }

    /// A bitset value written as a list of bit names (unknown bits as "0x…" strings) or a number.
    func bitsetValue(_ name: String, _ value: JSONValue) throws -> UInt64 {
        if value.raw is [Any] {
            let table = try bits(name)
            var result: UInt64 = 0
            for item in value.array {
                if let bitName = item.string, let bit = table[bitName] {
                    result |= 1 << UInt64(bit)
                } else {
                    result |= try item.u64("bitset \(name) item")
                }
            }
            return result
        }
        return try value.u64("bitset \(name)")
    }

    func constant(_ name: String) throws -> Int { try json["constants"][name].int("constants.\(name)") }

    /// The layout's field named `field`.
    func field(_ layout: String, _ field: String) throws -> JSONValue {
        guard let f = json["layouts"][layout]["fields"].array.first(where: { $0["name"].string == field }) else {
            throw TestFailure("schema layout \(layout) has no field \(field)")
        }
        return f
    }
}

// MARK: Bytes

func hexString(_ bytes: [UInt8]) -> String {
    let digits: [Character] = Array("0123456789abcdef")
    var s = ""
    s.reserveCapacity(bytes.count * 2)
    for b in bytes {
        s.append(digits[Int(b >> 4)])
        s.append(digits[Int(b & 0xF)])
    }
    return s
}

func bytes(fromHex hex: String) throws -> [UInt8] {
    let chars = Array(hex.utf8)
    guard chars.count % 2 == 0 else { throw TestFailure("odd-length hex string") }
    func nibble(_ c: UInt8) throws -> UInt8 {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: throw TestFailure("bad hex digit \(c)")
        }
    }
    var out: [UInt8] = []
    out.reserveCapacity(chars.count / 2)
    var i = 0
    while i < chars.count {
        out.append(try nibble(chars[i]) << 4 | nibble(chars[i + 1]))
        i += 2
    }
    return out
}

/// A deterministic 64-bit linear congruential generator (Knuth's MMIX constants), high bits out.
struct LCG {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return state
    }
    mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next() >> 56) }
    mutating func below(_ n: Int) -> Int { Int((next() >> 33) % UInt64(n)) }
    mutating func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in byte() } }
}

// MARK: Rings

/// A ring created by the "core", a second view attached as the "device" would attach it, and a
/// raw mapping of the same memfd for poking at bytes directly.
final class RingFixture {
    let fd: FileDescriptor
    var core: RegisterRing
    let device: RegisterRing
    let raw: SharedMapping
    let requestCapacity: UInt32
    let responseCapacity: UInt32

    init(requestCapacity: UInt32 = 8, responseCapacity: UInt32 = 4) throws {
        (fd, core) = try RegisterRing.create(requestCapacity: requestCapacity, responseCapacity: responseCapacity)
        device = try RegisterRing(attaching: try fd.duplicate())
        raw = try SharedMapping(fd: fd, count: RingLayout.size(requestCapacity: requestCapacity, responseCapacity: responseCapacity))
        self.requestCapacity = requestCapacity
        self.responseCapacity = responseCapacity
    }

    func u32(at offset: Int) -> UInt32 { UInt32(littleEndian: raw.base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    func setU32(_ value: UInt32, at offset: Int) { raw.base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self) }

    func bytes(at offset: Int, count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: raw.base + offset, count: count))
    }

    func write(_ bytes: [UInt8], at offset: Int) {
        bytes.withUnsafeBytes { (raw.base + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    func requestSlotOffset(_ index: UInt32) -> Int {
        RingLayout.headerSize + Int(index & (requestCapacity - 1)) * RingLayout.requestEntrySize
    }

    func responseSlotOffset(_ index: UInt32) -> Int {
        RingLayout.headerSize + Int(requestCapacity) * RingLayout.requestEntrySize
            + Int(index & (responseCapacity - 1)) * RingLayout.responseEntrySize
    }
}

/// A sealed memfd of `size` bytes holding `contents` at offset 0.
func memfd(size: Int, contents: [UInt8]) throws -> FileDescriptor {
    let fd = try MemFD.create(name: "hv-test", size: size)
    guard size > 0 else { return fd }
    let mapping = try SharedMapping(fd: fd, count: size)
    let n = min(size, contents.count)
    if n > 0 { contents.withUnsafeBytes { mapping.base.copyMemory(from: $0.baseAddress!, byteCount: n) } }
    return fd
}

/// The settings text a device receives in HELLO (`Hello.config`): one `key=value` per line.
/// Values are escaped (`\\` for a backslash, `\n` for a newline) so any string survives, a
/// kernel command line included. Each shipped device's contract module (`HVBIOSContract`, …)
/// encodes its typed settings through this codec on the trusted side and decodes them in the
/// device, so a key is spelled once; `DeviceRuntime.config` is the decoded dictionary.
public enum SettingsText {
    /// `fields` as HELLO's config text, in the order given.
    public static func encode(_ fields: [(key: String, value: String)]) -> String {
        fields.map { "\($0.key)=\(escape($0.value))" }.joined(separator: "\n")
    }

    /// The fields of `text`; a line without `=` is a key with an empty value, the last of a
    /// repeated key wins. Lines and the `=` are found in the UTF-8 bytes, not in characters: a
    /// value ending in `\r` would otherwise join the next line into one `\r\n` character, and
    /// an `=` followed by a combining mark would not be an `=` (found by the device-settings
    /// fuzz target).
    public static func decode(_ text: String) -> [String: String] {
        var fields: [String: String] = [:]
        for line in text.utf8.split(separator: UInt8(ascii: "\n")) {
            if let eq = line.firstIndex(of: UInt8(ascii: "=")) {
                fields[String(decoding: line[..<eq], as: UTF8.self)] = unescape(line[line.index(after: eq)...])
            } else {
                fields[String(decoding: line, as: UTF8.self)] = ""
            }
        }
        return fields
    }

    static func escape(_ value: String) -> String {
        var out = String.UnicodeScalarView()
        for c in value.unicodeScalars {
            switch c {
            case "\\": out.append(contentsOf: "\\\\".unicodeScalars)
            case "\n": out.append(contentsOf: "\\n".unicodeScalars)
            default: out.append(c)
            }
        }
        return String(out)
    }

    static func unescape(_ value: Substring.UTF8View) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(value.count)
        var escaped = false
        for b in value {
            if escaped {
                out.append(b == UInt8(ascii: "n") ? UInt8(ascii: "\n") : b)
                escaped = false
            } else if b == UInt8(ascii: "\\") {
                escaped = true
            } else {
                out.append(b)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// A setting the device cannot use: which key, and what is wrong with it. The device logs it
/// and exits 2, as for any configuration it was not built for.
public struct SettingsError: Error, Equatable, Sendable, CustomStringConvertible {
    public let key: String
    public let problem: String

    public init(key: String, problem: String) {
        self.key = key
        self.problem = problem
    }

    public var description: String { "setting '\(key)' \(problem)" }
}

/// Typed reads of decoded settings, for contract modules.
public struct SettingsReader: Sendable {
    public let fields: [String: String]

    public init(_ fields: [String: String]) { self.fields = fields }

    /// The value of `key`, which must be present.
    public func string(_ key: String) throws(SettingsError) -> String {
        guard let value = fields[key] else { throw SettingsError(key: key, problem: "is missing") }
        return value
    }

    /// The value of `key`, or `fallback` when absent.
    public func string(_ key: String, default fallback: String) -> String { fields[key] ?? fallback }

    /// A decimal integer in `range`; `fallback` when absent (nil: required).
    public func int(_ key: String, in range: ClosedRange<Int>, default fallback: Int? = nil) throws(SettingsError) -> Int {
        guard let text = fields[key] else {
            if let fallback { return fallback }
            throw SettingsError(key: key, problem: "is missing")
        }
        guard let value = Int(text), range.contains(value) else {
            throw SettingsError(key: key, problem: "is '\(text)', not a number from \(range.lowerBound) to \(range.upperBound)")
        }
        return value
    }

    /// `1` or `0`; `fallback` when absent.
    public func bool(_ key: String, default fallback: Bool) throws(SettingsError) -> Bool {
        switch fields[key] {
        case nil: return fallback
        case "1": return true
        case "0": return false
        case let other?: throw SettingsError(key: key, problem: "is '\(other)', not 0 or 1")
        }
    }

    /// One of `T`'s raw values; `fallback` when absent (nil: required).
    public func choice<T: RawRepresentable & CaseIterable>(_ key: String, default fallback: T? = nil) throws(SettingsError) -> T
    where T.RawValue == String {
        guard let text = fields[key] else {
            if let fallback { return fallback }
            throw SettingsError(key: key, problem: "is missing")
        }
        guard let value = T(rawValue: text) else {
            throw SettingsError(key: key, problem: "is '\(text)', not one of \(T.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return value
    }
}

/// Encoding helpers for contract modules.
public extension Bool {
    /// `1` or `0`, as `SettingsReader.bool` reads it.
    var settingsValue: String { self ? "1" : "0" }
}

/// The two windows of a virtio-pci function as hv's board hands them to a device: its
/// configuration space and BAR 0 (memory), where the SDK's transport puts the common,
/// notification, ISR and device configuration structures. Defined once for the board
/// (HVHost) and the devices' transport (HVDeviceSDK).
public enum VirtioPCILayout {
    /// BAR 0's size.
    public static let barSize: UInt64 = 0x4000

    /// Configuration space and BAR 0 of function 00:`device`.`function`.
    public static func resources(device: UInt8, function: UInt8 = 0) -> [Resource] {
        let bdf = UInt64(device) << 3 | UInt64(function & 7)
        return [Resource(kind: .pciConfig, base: bdf, length: 256),
                Resource(kind: .pciMMIOBar, base: bdf << 8, length: barSize)]
    }
}

/// A rate limit as a device receives it in its settings: a bandwidth bucket (bytes) and an
/// operations bucket (requests or frames), each optional, with Firecracker's semantics: the
/// bucket holds `size` tokens and refills completely in `refillTimeMs`; `oneTimeBurst` extra
/// tokens are there at the start and never come back. Defined once for the trusted side (which
/// encodes a VM definition's limits) and the devices (which enforce them).
public struct RateLimitSettings: Equatable, Sendable {
    public struct Bucket: Equatable, Sendable {
        public var size: UInt64
        public var oneTimeBurst: UInt64
        public var refillTimeMs: UInt64

        public init(size: UInt64, oneTimeBurst: UInt64 = 0, refillTimeMs: UInt64) {
            self.size = size
            self.oneTimeBurst = oneTimeBurst
            self.refillTimeMs = refillTimeMs
        }
    }

    public var bandwidth: Bucket?
    public var ops: Bucket?

    public init(bandwidth: Bucket? = nil, ops: Bucket? = nil) {
        self.bandwidth = bandwidth
        self.ops = ops
    }

    public var isUnlimited: Bool { bandwidth == nil && ops == nil }

    /// The settings fields, each key behind `prefix` (`rate_`, `rx_rate_`, …): `PREFIXbw` and
    /// `PREFIXops` as `SIZE,BURST,REFILL_MS`; absent when unlimited.
    public func fields(prefix: String) -> [(key: String, value: String)] {
        var fields: [(key: String, value: String)] = []
        if let bandwidth { fields.append((prefix + "bw", "\(bandwidth.size),\(bandwidth.oneTimeBurst),\(bandwidth.refillTimeMs)")) }
        if let ops { fields.append((prefix + "ops", "\(ops.size),\(ops.oneTimeBurst),\(ops.refillTimeMs)")) }
        return fields
    }

    /// Reads what `fields(prefix:)` wrote.
    public init(reading reader: SettingsReader, prefix: String) throws(SettingsError) {
        func bucket(_ key: String) throws(SettingsError) -> Bucket? {
            guard let text = reader.fields[key] else { return nil }
            let parts = text.split(separator: ",", omittingEmptySubsequences: false).map { UInt64($0) }
            guard parts.count == 3, let size = parts[0], let burst = parts[1], let refill = parts[2], size > 0, refill > 0,
                  size <= 1 << 50, burst <= 1 << 50, refill <= 1 << 32 else {
                throw SettingsError(key: key, problem: "is '\(text)', not SIZE,BURST,REFILL_MS (size and refill time above 0)")
            }
            return Bucket(size: size, oneTimeBurst: burst, refillTimeMs: refill)
        }
        self.init(bandwidth: try bucket(prefix + "bw"), ops: try bucket(prefix + "ops"))
    }
}

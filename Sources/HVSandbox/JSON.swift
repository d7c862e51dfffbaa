// A small, strict RFC 8259 JSON parser for hv's configuration files (sandbox profiles).
//
// Strict means: exactly the RFC 8259 grammar and nothing more — no comments, no trailing commas, no
// single quotes, no leading zeros, no NaN/Infinity, no byte-order mark, only the escapes the RFC names,
// no unescaped control characters in strings, well-formed UTF-8 only, no lone surrogates. On top of the
// grammar it rejects duplicate object keys, documents larger than `JSONValue.maximumDocumentSize` and
// nesting deeper than `JSONValue.maximumNestingDepth`. It never traps on any input: every failure is a
// `JSONError` with a line, a column and a short reason.
//
// No Foundation: this file is used by the trusted side before a device is started.

/// A parsed JSON value.
///
/// Objects keep their members in document order (see `JSONObject`); numbers keep their literal text
/// (see `JSONNumber`), so nothing is rounded through a `Double`.
public enum JSONValue: Equatable, Sendable {
    /// An object: its members in document order, keys unique.
    case object(JSONObject)
    /// An array.
    case array([JSONValue])
    /// A string, with every escape decoded.
    case string(String)
    /// A number, kept as its literal text.
    case number(JSONNumber)
    /// `true` or `false`.
    case bool(Bool)
    /// `null`.
    case null

    /// The largest document `parse(_:)` accepts, in bytes (1 MiB).
    public static let maximumDocumentSize = 1 << 20

    /// The deepest nesting of arrays and objects `parse(_:)` accepts. A document whose top-level value is
    /// an array or object has depth 1.
    public static let maximumNestingDepth = 64

    /// Parses one JSON document (RFC 8259, strict; see the file comment for what is rejected).
    ///
    /// - Parameter bytes: the document, UTF-8 without a byte-order mark. Whitespace may surround the one
    ///   top-level value; anything else after it is an error.
    /// - Returns: the top-level value (any JSON value, not only an object or array).
    /// - Throws: `JSONError` with the line and column of the first problem.
    public static func parse(_ bytes: [UInt8]) throws(JSONError) -> JSONValue {
        var parser = JSONParser(bytes: bytes)
        return try parser.parseDocument()
    }

    /// The kind of value with an article, for error messages: "an object", "an array", "a string",
    /// "a number", "a boolean" or "null".
    public var typeName: String {
        switch self {
        case .object: return "an object"
        case .array: return "an array"
        case .string: return "a string"
        case .number: return "a number"
        case .bool: return "a boolean"
        case .null: return "null"
        }
    }
}

/// A JSON object: its members in document order. Keys are unique when it comes from `JSONValue.parse`.
public struct JSONObject: Equatable, Sendable {
    /// One `"key": value` member.
    public struct Member: Equatable, Sendable {
        /// The member's key, escapes decoded.
        public let key: String
        /// The member's value.
        public let value: JSONValue

        /// A member with `key` and `value`.
        public init(key: String, value: JSONValue) {
            self.key = key
            self.value = value
        }
    }

    /// The members in document order.
    public let members: [Member]

    /// An object with `members` in this order. The parser never produces duplicate keys; if `members`
    /// has some, lookups by key find the first.
    public init(_ members: [Member]) {
        self.members = members
    }

    /// The value of the member named `key`, or nil if there is none.
    ///
    /// Keys compare with Swift `String` equality (Unicode canonical equivalence).
    public subscript(key: String) -> JSONValue? {
        for member in members where member.key == key { return member.value }
        return nil
    }

    /// The keys in document order.
    public var keys: [String] { members.map(\.key) }

    /// The number of members.
    public var count: Int { members.count }

    /// Whether the object has no members.
    public var isEmpty: Bool { members.isEmpty }
}

/// A JSON number kept exactly as written (`-12`, `0.5`, `1e300`, `123456789012345678901234567890`).
///
/// Nothing is converted through a floating-point type. `uint64Value`/`int64Value` convert integer
/// literals exactly and refuse everything else, so a configuration field that needs an integer can
/// reject `1.5`, `1e3` and out-of-range values instead of rounding them. Two numbers are equal when their
/// literal text is equal (`1` and `1.0` are different numbers here).
public struct JSONNumber: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The literal text as it appeared in the document, e.g. `-0.5e10`.
    public let literal: String

    /// Builds the number a parser read; `literal` is known to match the RFC 8259 number grammar.
    init(validatedLiteral literal: String) {
        self.literal = literal
    }

    /// The number `value`, written in decimal.
    public init(_ value: UInt64) {
        literal = String(value)
    }

    /// The number `value`, written in decimal.
    public init(_ value: Int64) {
        literal = String(value)
    }

    /// Whether the literal is an integer literal: no fraction and no exponent (`10`, `-3`, but neither
    /// `10.0` nor `1e1`).
    public var isInteger: Bool {
        !literal.utf8.contains { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") }
    }

    /// Whether the literal starts with a minus sign (`-0` included).
    public var isNegative: Bool { literal.utf8.first == UInt8(ascii: "-") }

    /// The value as a `UInt64` if the literal is an integer literal in 0…2⁶⁴−1 (`-0` is 0), else nil.
    public var uint64Value: UInt64? {
        guard let (negative, magnitude) = integerMagnitude() else { return nil }
        if negative && magnitude != 0 { return nil }
        return magnitude
    }

    /// The value as an `Int64` if the literal is an integer literal in −2⁶³…2⁶³−1, else nil.
    public var int64Value: Int64? {
        guard let (negative, magnitude) = integerMagnitude() else { return nil }
        if negative {
            if magnitude <= UInt64(Int64.max) { return -Int64(magnitude) }
            if magnitude == UInt64(Int64.max) + 1 { return Int64.min }
            return nil
        }
        return magnitude <= UInt64(Int64.max) ? Int64(magnitude) : nil
    }

    /// The literal text.
    public var description: String { literal }

    /// Sign and magnitude of an integer literal, or nil if it is not one or the magnitude exceeds UInt64.
    private func integerMagnitude() -> (negative: Bool, magnitude: UInt64)? {
        var digits = literal.utf8[...]
        var negative = false
        if digits.first == UInt8(ascii: "-") {
            negative = true
            digits = digits.dropFirst()
        }
        guard !digits.isEmpty else { return nil }
        var magnitude: UInt64 = 0
        for byte in digits {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            let (times10, overflow1) = magnitude.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = times10.addingReportingOverflow(UInt64(byte - UInt8(ascii: "0")))
            if overflow1 || overflow2 { return nil }
            magnitude = sum
        }
        return (negative, magnitude)
    }
}

/// Why and where `JSONValue.parse` rejected a document.
public struct JSONError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What is wrong.
    public enum Reason: Equatable, Sendable, CustomStringConvertible {
        /// The document is larger than `JSONValue.maximumDocumentSize`.
        case documentTooLarge(size: Int, limit: Int)
        /// The document is empty or only whitespace.
        case emptyDocument
        /// The document starts with a UTF-8 byte-order mark.
        case byteOrderMark
        /// The document ends where `expected` was needed.
        case unexpectedEndOfInput(expected: String)
        /// `byte` appears where `expected` was needed.
        case unexpectedCharacter(UInt8, expected: String)
        /// A comma right before `]` or `}`.
        case trailingComma
        /// Something other than whitespace follows the top-level value.
        case trailingContent
        /// Arrays and objects nest deeper than `limit`.
        case nestingTooDeep(limit: Int)
        /// A number with a leading zero, such as `01` or `-00`.
        case leadingZero
        /// A malformed number; `detail` says what is missing.
        case invalidNumber(detail: String)
        /// A backslash followed by something other than `" \ / b f n r t u`; nil at end of input.
        case invalidEscape(UInt8?)
        /// `\u` not followed by four hexadecimal digits.
        case invalidUnicodeEscape
        /// A `\uD800`…`\uDFFF` escape that is not part of a high-then-low surrogate pair.
        case unpairedSurrogate
        /// An unescaped control character (U+0000…U+001F) inside a string.
        case controlCharacterInString(UInt8)
        /// Bytes that are not well-formed UTF-8 inside a string.
        case invalidUTF8
        /// An object has two members with the same key.
        case duplicateKey(String)

        /// A short, one-line explanation.
        public var description: String {
            switch self {
            case let .documentTooLarge(size, limit): return "document is \(size) bytes, more than the limit of \(limit)"
            case .emptyDocument: return "document is empty"
            case .byteOrderMark: return "byte-order mark is not allowed"
            case let .unexpectedEndOfInput(expected): return "unexpected end of input, expected \(expected)"
            case let .unexpectedCharacter(byte, expected): return "unexpected \(describeByte(byte)), expected \(expected)"
            case .trailingComma: return "trailing comma"
            case .trailingContent: return "unexpected content after the top-level value"
            case let .nestingTooDeep(limit): return "arrays and objects nest deeper than \(limit) levels"
            case .leadingZero: return "number has a leading zero"
            case let .invalidNumber(detail): return "invalid number: \(detail)"
            case let .invalidEscape(byte?): return "invalid escape \\\(describeEscapeByte(byte)) in string"
            case .invalidEscape(nil): return "unfinished escape at end of input"
            case .invalidUnicodeEscape: return "\\u must be followed by four hexadecimal digits"
            case .unpairedSurrogate: return "\\u escape is an unpaired UTF-16 surrogate"
            case let .controlCharacterInString(byte): return "unescaped control character \(hexByte(byte)) in string"
            case .invalidUTF8: return "string is not valid UTF-8"
            case let .duplicateKey(key): return "duplicate key \(quotedForMessage(key))"
            }
        }
    }

    /// What is wrong.
    public let reason: Reason
    /// Zero-based byte offset of the problem in the document.
    public let offset: Int
    /// One-based line of the problem (lines end at `\n`).
    public let line: Int
    /// One-based column of the problem, counted in Unicode scalars from the start of the line.
    public let column: Int

    /// An error with an explicit position.
    public init(reason: Reason, offset: Int, line: Int, column: Int) {
        self.reason = reason
        self.offset = offset
        self.line = line
        self.column = column
    }

    /// `line L, column C: reason`.
    public var description: String { "line \(line), column \(column): \(reason)" }
}

// MARK: - Parser

/// Recursive-descent parser over a byte array. Recursion is bounded by `JSONValue.maximumNestingDepth`.
private struct JSONParser {
    let bytes: [UInt8]
    var index = 0

    init(bytes: [UInt8]) {
        self.bytes = bytes
    }

    mutating func parseDocument() throws(JSONError) -> JSONValue {
        guard bytes.count <= JSONValue.maximumDocumentSize else {
            throw error(.documentTooLarge(size: bytes.count, limit: JSONValue.maximumDocumentSize), at: 0)
        }
        if bytes.count >= 3, bytes[0] == 0xEF, bytes[1] == 0xBB, bytes[2] == 0xBF {
            throw error(.byteOrderMark, at: 0)
        }
        skipWhitespace()
        guard index < bytes.count else { throw error(.emptyDocument, at: index) }
        let value = try parseValue(depth: 0)
        skipWhitespace()
        guard index == bytes.count else { throw error(.trailingContent, at: index) }
        return value
    }

    // MARK: Values

    mutating func parseValue(depth: Int) throws(JSONError) -> JSONValue {
        guard index < bytes.count else { throw error(.unexpectedEndOfInput(expected: "a value"), at: index) }
        switch bytes[index] {
        case UInt8(ascii: "{"): return try parseObject(depth: depth + 1)
        case UInt8(ascii: "["): return try parseArray(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try parseNumber())
        case UInt8(ascii: "t"):
            try expectKeyword("true")
            return .bool(true)
        case UInt8(ascii: "f"):
            try expectKeyword("false")
            return .bool(false)
        case UInt8(ascii: "n"):
            try expectKeyword("null")
            return .null
        case let byte:
            throw error(.unexpectedCharacter(byte, expected: "a value"), at: index)
        }
    }

    mutating func parseObject(depth: Int) throws(JSONError) -> JSONValue {
        guard depth <= JSONValue.maximumNestingDepth else {
            throw error(.nestingTooDeep(limit: JSONValue.maximumNestingDepth), at: index)
        }
        index += 1  // '{'
        var members: [JSONObject.Member] = []
        var seen: Set<String> = []
        skipWhitespace()
        if try peek(expected: "a string key or '}'") == UInt8(ascii: "}") {
            index += 1
            return .object(JSONObject(members))
        }
        while true {
            let keyOffset = index
            let next = try peek(expected: "a string key")
            guard next == UInt8(ascii: "\"") else {
                throw error(.unexpectedCharacter(next, expected: "a string key"), at: index)
            }
            let key = try parseString()
            guard seen.insert(key).inserted else { throw error(.duplicateKey(key), at: keyOffset) }
            skipWhitespace()
            let colon = try peek(expected: "':'")
            guard colon == UInt8(ascii: ":") else { throw error(.unexpectedCharacter(colon, expected: "':'"), at: index) }
            index += 1
            skipWhitespace()
            let value = try parseValue(depth: depth)
            members.append(JSONObject.Member(key: key, value: value))
            skipWhitespace()
            let separator = try peek(expected: "',' or '}'")
            switch separator {
            case UInt8(ascii: ","):
                let commaOffset = index
                index += 1
                skipWhitespace()
                if try peek(expected: "a string key") == UInt8(ascii: "}") { throw error(.trailingComma, at: commaOffset) }
            case UInt8(ascii: "}"):
                index += 1
                return .object(JSONObject(members))
            default:
                throw error(.unexpectedCharacter(separator, expected: "',' or '}'"), at: index)
            }
        }
    }

    mutating func parseArray(depth: Int) throws(JSONError) -> JSONValue {
        guard depth <= JSONValue.maximumNestingDepth else {
            throw error(.nestingTooDeep(limit: JSONValue.maximumNestingDepth), at: index)
        }
        index += 1  // '['
        var elements: [JSONValue] = []
        skipWhitespace()
        if try peek(expected: "a value or ']'") == UInt8(ascii: "]") {
            index += 1
            return .array(elements)
        }
        while true {
            elements.append(try parseValue(depth: depth))
            skipWhitespace()
            let separator = try peek(expected: "',' or ']'")
            switch separator {
            case UInt8(ascii: ","):
                let commaOffset = index
                index += 1
                skipWhitespace()
                if try peek(expected: "a value") == UInt8(ascii: "]") { throw error(.trailingComma, at: commaOffset) }
            case UInt8(ascii: "]"):
                index += 1
                return .array(elements)
            default:
                throw error(.unexpectedCharacter(separator, expected: "',' or ']'"), at: index)
            }
        }
    }

    mutating func expectKeyword(_ keyword: StaticString) throws(JSONError) {
        let text = keyword.withUTF8Buffer { Array($0) }
        for expectedByte in text {
            guard index < bytes.count else {
                throw error(.unexpectedEndOfInput(expected: "'\(keyword)'"), at: index)
            }
            guard bytes[index] == expectedByte else {
                throw error(.unexpectedCharacter(bytes[index], expected: "'\(keyword)'"), at: index)
            }
            index += 1
        }
    }

    // MARK: Numbers

    mutating func parseNumber() throws(JSONError) -> JSONNumber {
        let start = index
        if bytes[index] == UInt8(ascii: "-") { index += 1 }
        guard index < bytes.count, isDigit(bytes[index]) else {
            throw error(.invalidNumber(detail: "digit expected after '-'"), at: index)
        }
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
            if index < bytes.count, isDigit(bytes[index]) { throw error(.leadingZero, at: start) }
        } else {
            skipDigits()
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: ".") {
            index += 1
            guard index < bytes.count, isDigit(bytes[index]) else {
                throw error(.invalidNumber(detail: "digit expected after '.'"), at: index)
            }
            skipDigits()
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E") {
            index += 1
            if index < bytes.count, bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-") { index += 1 }
            guard index < bytes.count, isDigit(bytes[index]) else {
                throw error(.invalidNumber(detail: "digit expected in exponent"), at: index)
            }
            skipDigits()
        }
        return JSONNumber(validatedLiteral: String(decoding: bytes[start..<index], as: UTF8.self))
    }

    mutating func skipDigits() {
        while index < bytes.count, isDigit(bytes[index]) { index += 1 }
    }

    func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

    // MARK: Strings

    /// Parses a string starting at its opening quote; returns it with escapes decoded.
    mutating func parseString() throws(JSONError) -> String {
        index += 1  // opening '"'
        var utf8: [UInt8] = []
        while true {
            guard index < bytes.count else { throw error(.unexpectedEndOfInput(expected: "'\"' closing the string"), at: index) }
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "\""):
                index += 1
                return String(decoding: utf8, as: UTF8.self)
            case UInt8(ascii: "\\"):
                try parseEscape(into: &utf8)
            case 0x00..<0x20:
                throw error(.controlCharacterInString(byte), at: index)
            case 0x20..<0x80:
                utf8.append(byte)
                index += 1
            default:
                try copyUTF8Sequence(into: &utf8)
            }
        }
    }

    /// Validates one multi-byte UTF-8 sequence at `index` (RFC 3629: no overlong forms, no surrogates,
    /// nothing above U+10FFFF) and appends it.
    mutating func copyUTF8Sequence(into utf8: inout [UInt8]) throws(JSONError) {
        let lead = bytes[index]
        let length: Int
        var secondRange: ClosedRange<UInt8> = 0x80...0xBF
        switch lead {
        case 0xC2...0xDF: length = 2
        case 0xE0: length = 3; secondRange = 0xA0...0xBF
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED: length = 3; secondRange = 0x80...0x9F
        case 0xF0: length = 4; secondRange = 0x90...0xBF
        case 0xF1...0xF3: length = 4
        case 0xF4: length = 4; secondRange = 0x80...0x8F
        default: throw error(.invalidUTF8, at: index)
        }
        guard bytes.count - index >= length else { throw error(.invalidUTF8, at: index) }
        guard secondRange.contains(bytes[index + 1]) else { throw error(.invalidUTF8, at: index) }
        var offset = 2
        while offset < length {
            guard (0x80...0xBF).contains(bytes[index + offset]) else { throw error(.invalidUTF8, at: index) }
            offset += 1
        }
        utf8.append(contentsOf: bytes[index..<(index + length)])
        index += length
    }

    /// Decodes one escape starting at its backslash and appends its UTF-8.
    mutating func parseEscape(into utf8: inout [UInt8]) throws(JSONError) {
        let start = index
        index += 1  // '\'
        guard index < bytes.count else { throw error(.invalidEscape(nil), at: start) }
        let letter = bytes[index]
        index += 1
        switch letter {
        case UInt8(ascii: "\""): utf8.append(0x22)
        case UInt8(ascii: "\\"): utf8.append(0x5C)
        case UInt8(ascii: "/"): utf8.append(0x2F)
        case UInt8(ascii: "b"): utf8.append(0x08)
        case UInt8(ascii: "f"): utf8.append(0x0C)
        case UInt8(ascii: "n"): utf8.append(0x0A)
        case UInt8(ascii: "r"): utf8.append(0x0D)
        case UInt8(ascii: "t"): utf8.append(0x09)
        case UInt8(ascii: "u"):
            let unit = try parseHex4(escapeStart: start)
            var scalarValue = UInt32(unit)
            switch unit {
            case 0xD800...0xDBFF:
                // A high surrogate must be followed at once by a \u low surrogate.
                guard bytes.count - index >= 2, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") else {
                    throw error(.unpairedSurrogate, at: start)
                }
                let lowStart = index
                index += 2
                let low = try parseHex4(escapeStart: lowStart)
                guard (0xDC00...0xDFFF).contains(low) else { throw error(.unpairedSurrogate, at: start) }
                scalarValue = 0x10000 + ((UInt32(unit) - 0xD800) << 10) + (UInt32(low) - 0xDC00)
            case 0xDC00...0xDFFF:
                throw error(.unpairedSurrogate, at: start)
            default:
                break
            }
            guard let scalar = Unicode.Scalar(scalarValue) else { throw error(.unpairedSurrogate, at: start) }
            UTF8.encode(scalar) { utf8.append($0) }
        default:
            throw error(.invalidEscape(letter), at: start)
        }
    }

    /// Reads the four hex digits after `\u` (index is just past the `u`).
    mutating func parseHex4(escapeStart: Int) throws(JSONError) -> UInt16 {
        guard bytes.count - index >= 4 else { throw error(.invalidUnicodeEscape, at: escapeStart) }
        var value: UInt16 = 0
        for _ in 0..<4 {
            let byte = bytes[index]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw error(.invalidUnicodeEscape, at: escapeStart)
            }
            value = value << 4 | UInt16(digit)
            index += 1
        }
        return value
    }

    // MARK: Helpers

    mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x09, 0x0A, 0x0D: index += 1
            default: return
            }
        }
    }

    /// The byte at `index`, or an unexpected-end error naming `expected`.
    func peek(expected: String) throws(JSONError) -> UInt8 {
        guard index < bytes.count else { throw error(.unexpectedEndOfInput(expected: expected), at: index) }
        return bytes[index]
    }

    /// An error at byte `offset`, with its line and column.
    func error(_ reason: JSONError.Reason, at offset: Int) -> JSONError {
        let end = min(max(offset, 0), bytes.count)
        var line = 1
        var column = 1
        var position = 0
        while position < end {
            let byte = bytes[position]
            if byte == 0x0A {
                line += 1
                column = 1
            } else if byte & 0xC0 != 0x80 {
                column += 1  // Count scalars: continuation bytes do not start a new column.
            }
            position += 1
        }
        return JSONError(reason: reason, offset: end, line: line, column: column)
    }
}

// MARK: - Message helpers (shared with SandboxProfile.swift)

/// `'x'` for printable ASCII, else `byte 0xNN`.
func describeByte(_ byte: UInt8) -> String {
    if byte >= 0x21 && byte <= 0x7E { return "'\(Character(Unicode.Scalar(byte)))'" }
    return "byte \(hexByte(byte))"
}

/// The letter after a backslash in an escape, printable or as hex.
func describeEscapeByte(_ byte: UInt8) -> String {
    if byte >= 0x21 && byte <= 0x7E { return String(Character(Unicode.Scalar(byte))) }
    return "<\(hexByte(byte))>"
}

/// `0xNN`.
func hexByte(_ byte: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return "0x" + String(digits[Int(byte >> 4)]) + String(digits[Int(byte & 0xF)])
}

/// `text` in double quotes, safe for a one-line message: anything outside printable ASCII, `"` and `\`
/// are escaped, and long text is cut short with `…`.
func quotedForMessage(_ text: String, limit: Int = 64) -> String {
    var result = "\""
    var count = 0
    for scalar in text.unicodeScalars {
        if count == limit {
            result += "…"
            break
        }
        count += 1
        switch scalar {
        case "\"": result += "\\\""
        case "\\": result += "\\\\"
        case "\n": result += "\\n"
        case "\t": result += "\\t"
        case "\r": result += "\\r"
        case " "..."~": result.unicodeScalars.append(scalar)
        default: result += "\\u{" + String(scalar.value, radix: 16) + "}"
        }
    }
    return result + "\""
}

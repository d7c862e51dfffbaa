import Foundation
import HVSandbox
import XCTest

// MARK: - JSON parser

final class JSONParserTests: XCTestCase {
    func testParsesEveryKindOfValueAndKeepsKeyOrder() throws {
        let value = try parse(#" { "z": [1, -2.5e3, true, false, null], "a": {"": "x"}, "m": {} , "e": [] } "#)
        guard case let .object(object) = value else { return XCTFail("not an object: \(value)") }
        XCTAssertEqual(object.keys, ["z", "a", "m", "e"])
        XCTAssertEqual(object["z"], .array([.number(JSONNumber(UInt64(1))), .number(number("-2.5e3")), .bool(true), .bool(false), .null]))
        XCTAssertEqual(object["a"], .object(JSONObject([.init(key: "", value: .string("x"))])))
        XCTAssertEqual(object["m"], .object(JSONObject([])))
        XCTAssertEqual(object["e"], .array([]))
        XCTAssertNil(object["missing"])
        XCTAssertEqual(object.count, 4)
        XCTAssertEqual(value.typeName, "an object")
    }

    func testTopLevelScalarsAndWhitespace() throws {
        XCTAssertEqual(try parse("\t\r\n 7 \n"), .number(number("7")))
        XCTAssertEqual(try parse(#""s""#), .string("s"))
        XCTAssertEqual(try parse("null"), .null)
        XCTAssertEqual(try parse("true"), .bool(true))
        assertInvalid("", .emptyDocument)
        assertInvalid(" \n\t ", .emptyDocument)
        assertInvalid("1 2", .trailingContent)
        assertInvalid("{} {}", .trailingContent)
        assertInvalid("nulll", .trailingContent)
        assertInvalid("\u{0C}1", .unexpectedCharacter(0x0C, expected: "a value"))  // Form feed is not JSON whitespace.
        assertInvalid("1\u{0B}", .trailingContent)  // Nor is vertical tab.
        XCTAssertEqual(reason([0xEF, 0xBB, 0xBF] + Array("1".utf8)), .byteOrderMark)
    }

    func testKeywordsMustBeExact() {
        assertInvalid("tru", .unexpectedEndOfInput(expected: "'true'"))
        assertInvalid("True", .unexpectedCharacter(UInt8(ascii: "T"), expected: "a value"))
        assertInvalid("nul", .unexpectedEndOfInput(expected: "'null'"))
        assertInvalid("fals3", .unexpectedCharacter(UInt8(ascii: "3"), expected: "'false'"))
        assertInvalid("NaN", .unexpectedCharacter(UInt8(ascii: "N"), expected: "a value"))
        assertInvalid("Infinity", .unexpectedCharacter(UInt8(ascii: "I"), expected: "a value"))
        assertInvalid("undefined", .unexpectedCharacter(UInt8(ascii: "u"), expected: "a value"))
    }

    func testStringEscapesAndSurrogatePairs() throws {
        let text = #""\"\\\/\b\f\n\r\t\u0041\u00e9\u20AC\uD83D\uDE00\u0000 é€😀""#
        XCTAssertEqual(try parse(text), .string("\"\\/\u{8}\u{C}\n\r\tAé€😀\u{0} é€😀"))
        XCTAssertEqual(try parse(#""\uDBFF\uDFFF""#), .string("\u{10FFFF}"))
        XCTAssertEqual(try parse(#""\ud800\udc00""#), .string("\u{10000}"))
    }

    func testRejectsBadEscapes() {
        assertInvalid(#""\x""#, .invalidEscape(UInt8(ascii: "x")))
        assertInvalid(#""\'""#, .invalidEscape(UInt8(ascii: "'")))
        assertInvalid(#""\U0041""#, .invalidEscape(UInt8(ascii: "U")))
        assertInvalid(#""\u12""#, .invalidUnicodeEscape)
        assertInvalid(#""\u12G4""#, .invalidUnicodeEscape)
        assertInvalid(#""\u""#, .invalidUnicodeEscape)
        assertInvalid(#""\"#, .invalidEscape(nil))
        assertInvalid(#""\uD800""#, .unpairedSurrogate)
        assertInvalid(#""\uD800x""#, .unpairedSurrogate)
        assertInvalid(#""\uD800\u0041""#, .unpairedSurrogate)
        assertInvalid(#""\uD800\uD800""#, .unpairedSurrogate)
        assertInvalid(#""\uDC00""#, .unpairedSurrogate)
        assertInvalid(#""\uDFFF\uD800""#, .unpairedSurrogate)
        assertInvalid(#""\uD800\n""#, .unpairedSurrogate)
        assertInvalid(#""\uD800\uZZZZ""#, .invalidUnicodeEscape)
    }

    func testRejectsControlCharactersAndMalformedUTF8InStrings() {
        for byte in UInt8(0)..<0x20 {
            XCTAssertEqual(reason([0x22, byte, 0x22]), .controlCharacterInString(byte), "byte \(byte)")
        }
        XCTAssertNoThrow(try JSONValue.parse([0x22, 0x7F, 0x22]))  // DEL is not a control character to RFC 8259.
        let malformed: [[UInt8]] = [
            [0x80], [0xBF], [0xC0, 0x80], [0xC1, 0xBF], [0xC2], [0xC2, 0x41], [0xE0, 0x80, 0x80], [0xE0, 0xA0],
            [0xED, 0xA0, 0x80], [0xED, 0xBF, 0xBF], [0xF0, 0x80, 0x80, 0x80], [0xF4, 0x90, 0x80, 0x80],
            [0xF5, 0x80, 0x80, 0x80], [0xFE], [0xFF], [0xE2, 0x82], [0xF0, 0x9F, 0x98],
        ]
        for sequence in malformed {
            XCTAssertEqual(reason([0x22] + sequence + [0x22]), .invalidUTF8, "\(sequence)")
        }
        let wellFormed: [[UInt8]] = [[0xC2, 0x80], [0xDF, 0xBF], [0xE0, 0xA0, 0x80], [0xED, 0x9F, 0xBF], [0xEE, 0x80, 0x80],
                                     [0xF0, 0x90, 0x80, 0x80], [0xF4, 0x8F, 0xBF, 0xBF]]
        for sequence in wellFormed {
            XCTAssertEqual(try? JSONValue.parse([0x22] + sequence + [0x22]), .string(String(decoding: sequence, as: UTF8.self)))
        }
        assertInvalid("\"abc", .unexpectedEndOfInput(expected: "'\"' closing the string"))
        XCTAssertEqual(reason([0xC3, 0xA9]), .unexpectedCharacter(0xC3, expected: "a value"))  // Non-ASCII outside strings.
    }

    func testRejectsDuplicateKeysWithTheirPosition() throws {
        let error = try XCTUnwrap(parseError("{\n  \"a\": 1,\n  \"b\": {\"a\": 2},\n  \"a\": 3\n}"))
        XCTAssertEqual(error.reason, .duplicateKey("a"))
        XCTAssertEqual(error.line, 4)
        XCTAssertEqual(error.column, 3)
        XCTAssertEqual(error.description, "line 4, column 3: duplicate key \"a\"")
        assertInvalid(#"{"x": {"k": 1, "k": 1}}"#, .duplicateKey("k"))
        assertInvalid(#"{"\u0061": 1, "a": 2}"#, .duplicateKey("a"))  // Same key once decoded.
        XCTAssertNoThrow(try parse(#"[{"a": 1}, {"a": 2}]"#))
        XCTAssertNoThrow(try parse(#"{"a": 1, "A": 2, "a ": 3}"#))
    }

    func testRejectsTrailingCommasCommentsAndOtherLeniencies() {
        assertInvalid("[1,]", .trailingComma)
        assertInvalid("[1 , \n ]", .trailingComma)
        assertInvalid(#"{"a": 1,}"#, .trailingComma)
        assertInvalid("[,1]", .unexpectedCharacter(UInt8(ascii: ","), expected: "a value"))
        assertInvalid("[1,,2]", .unexpectedCharacter(UInt8(ascii: ","), expected: "a value"))
        assertInvalid("[1 2]", .unexpectedCharacter(UInt8(ascii: "2"), expected: "',' or ']'"))
        assertInvalid(#"{"a" 1}"#, .unexpectedCharacter(UInt8(ascii: "1"), expected: "':'"))
        assertInvalid(#"{"a": 1 "b": 2}"#, .unexpectedCharacter(UInt8(ascii: "\""), expected: "',' or '}'"))
        assertInvalid("{'a': 1}", .unexpectedCharacter(UInt8(ascii: "'"), expected: "a string key"))
        assertInvalid("{a: 1}", .unexpectedCharacter(UInt8(ascii: "a"), expected: "a string key"))
        assertInvalid("{1: 1}", .unexpectedCharacter(UInt8(ascii: "1"), expected: "a string key"))
        assertInvalid("// comment\n1", .unexpectedCharacter(UInt8(ascii: "/"), expected: "a value"))
        assertInvalid("/* c */ 1", .unexpectedCharacter(UInt8(ascii: "/"), expected: "a value"))
        assertInvalid("[1] // c", .trailingContent)
        assertInvalid("[1, /* c */ 2]", .unexpectedCharacter(UInt8(ascii: "/"), expected: "a value"))
        assertInvalid("'s'", .unexpectedCharacter(UInt8(ascii: "'"), expected: "a value"))
        assertInvalid("[1", .unexpectedEndOfInput(expected: "',' or ']'"))
        assertInvalid("[", .unexpectedEndOfInput(expected: "a value or ']'"))
        assertInvalid(#"{"a":"#, .unexpectedEndOfInput(expected: "a value"))
        assertInvalid("{", .unexpectedEndOfInput(expected: "a string key or '}'"))
        assertInvalid("]", .unexpectedCharacter(UInt8(ascii: "]"), expected: "a value"))
    }

    func testNumbers() throws {
        for literal in ["0", "-0", "7", "-7", "10", "1.5", "0.25", "-0.0", "1e10", "1E10", "1e+2", "1e-2", "-1.25e-3", "0e0",
                        "123456789012345678901234567890", "1e999999", "0.000000000000000000000000000001"] {
            XCTAssertEqual(try parse(literal), .number(number(literal)), literal)
            XCTAssertEqual(try parse("[\(literal)]"), .array([.number(number(literal))]), literal)
        }
        assertInvalid("01", .leadingZero)
        assertInvalid("-01", .leadingZero)
        assertInvalid("00", .leadingZero)
        assertInvalid("[007]", .leadingZero)
        assertInvalid("-", .invalidNumber(detail: "digit expected after '-'"))
        assertInvalid("-a", .invalidNumber(detail: "digit expected after '-'"))
        assertInvalid("1.", .invalidNumber(detail: "digit expected after '.'"))
        assertInvalid("1.e5", .invalidNumber(detail: "digit expected after '.'"))
        assertInvalid("1e", .invalidNumber(detail: "digit expected in exponent"))
        assertInvalid("1e+", .invalidNumber(detail: "digit expected in exponent"))
        assertInvalid(".5", .unexpectedCharacter(UInt8(ascii: "."), expected: "a value"))
        assertInvalid("+1", .unexpectedCharacter(UInt8(ascii: "+"), expected: "a value"))
        assertInvalid("0x10", .trailingContent)
        assertInvalid("1.5.2", .trailingContent)
        assertInvalid("--1", .invalidNumber(detail: "digit expected after '-'"))
    }

    func testExactIntegerConversions() {
        XCTAssertEqual(number("0").uint64Value, 0)
        XCTAssertEqual(number("-0").uint64Value, 0)
        XCTAssertEqual(number("-0").int64Value, 0)
        XCTAssertEqual(number("18446744073709551615").uint64Value, UInt64.max)
        XCTAssertNil(number("18446744073709551616").uint64Value)
        XCTAssertNil(number("123456789012345678901234567890").uint64Value)
        XCTAssertNil(number("123456789012345678901234567890").int64Value)
        XCTAssertEqual(number("9223372036854775807").int64Value, Int64.max)
        XCTAssertNil(number("9223372036854775808").int64Value)
        XCTAssertEqual(number("9223372036854775808").uint64Value, 1 << 63)
        XCTAssertEqual(number("-9223372036854775808").int64Value, Int64.min)
        XCTAssertNil(number("-9223372036854775809").int64Value)
        XCTAssertNil(number("-1").uint64Value)
        XCTAssertEqual(number("-1").int64Value, -1)
        for nonInteger in ["1.0", "1e0", "1E2", "0.5", "-2.0e1"] {
            XCTAssertFalse(number(nonInteger).isInteger, nonInteger)
            XCTAssertNil(number(nonInteger).uint64Value, nonInteger)
            XCTAssertNil(number(nonInteger).int64Value, nonInteger)
        }
        XCTAssertTrue(number("-12").isNegative)
        XCTAssertEqual(JSONNumber(Int64.min).literal, "-9223372036854775808")
        XCTAssertEqual(JSONNumber(UInt64.max).uint64Value, UInt64.max)
        XCTAssertNotEqual(number("1"), number("1.0"))  // Equality is on the literal text.
    }

    func testErrorLineAndColumnCountScalars() throws {
        let error = try XCTUnwrap(parseError("[\n  \"é€😀\", tru\n]"))
        XCTAssertEqual(error.line, 2)
        XCTAssertEqual(error.column, 13)  // Two spaces, a three-scalar string in quotes, ", tru": the newline after it.
        XCTAssertEqual(error.offset, Array("[\n  \"é€😀\", tru".utf8).count)
        let first = try XCTUnwrap(parseError("x"))
        XCTAssertEqual([first.line, first.column, first.offset], [1, 1, 0])
        XCTAssertEqual(first.description, "line 1, column 1: unexpected 'x', expected a value")
        let crlf = try XCTUnwrap(parseError("[1,\r\n2,\r\n]"))
        XCTAssertEqual([crlf.line, crlf.column], [2, 2])  // The trailing comma.
    }

    func testNestingDepthLimit() throws {
        let limit = JSONValue.maximumNestingDepth
        XCTAssertEqual(limit, 64)
        XCTAssertNoThrow(try parse(String(repeating: "[", count: limit) + String(repeating: "]", count: limit)))
        XCTAssertNoThrow(try parse(String(repeating: #"{"a":"#, count: limit) + "1" + String(repeating: "}", count: limit)))
        assertInvalid(String(repeating: "[", count: limit + 1) + String(repeating: "]", count: limit + 1), .nestingTooDeep(limit: limit))
        assertInvalid(String(repeating: #"{"a":["#, count: 33) + String(repeating: "]}", count: 33), .nestingTooDeep(limit: limit))
        // Far deeper than the limit, unterminated: rejected at the limit, without recursing further.
        let error = try XCTUnwrap(parseError(String(repeating: "[", count: 100_000)))
        XCTAssertEqual(error.reason, .nestingTooDeep(limit: limit))
        XCTAssertEqual(error.offset, limit)
    }

    func testSizeLimit() {
        let limit = JSONValue.maximumDocumentSize
        XCTAssertEqual(limit, 1 << 20)
        let fits = [UInt8(ascii: "\"")] + [UInt8](repeating: UInt8(ascii: "a"), count: limit - 2) + [UInt8(ascii: "\"")]
        XCTAssertEqual(try? JSONValue.parse(fits), .string(String(repeating: "a", count: limit - 2)))
        let tooBig = fits + [UInt8(ascii: " ")]
        XCTAssertEqual(reason(tooBig), .documentTooLarge(size: limit + 1, limit: limit))
    }

    func testRandomBytesNeverTrap() {
        var random = SplitMix64(seed: 0x5EED_0001)
        let alphabet = Array(#"{}[]:,"\ 0123456789-+.eEtrufalsn/u"#.utf8) + [0x00, 0x0A, 0x1F, 0x7F, 0x80, 0xC3, 0xA9, 0xED, 0xF0, 0xFF]
        var accepted = 0
        for round in 0..<20_000 {
            let count = Int(random.next() % 48)
            let buffer: [UInt8] = (0..<count).map { _ in
                round % 2 == 0 ? UInt8(truncatingIfNeeded: random.next()) : alphabet[Int(random.next() % UInt64(alphabet.count))]
            }
            if checkParseIsTotal(buffer) { accepted += 1 }
        }
        XCTAssertGreaterThan(accepted, 0)
    }

    func testMutatedDocumentsNeverTrapAndRoundTrip() {
        var random = SplitMix64(seed: 0x5EED_0002)
        let seed = Array(SandboxProfileTests.serialProfile.utf8)
        var accepted = 0
        for _ in 0..<3_000 {
            var buffer = seed
            for _ in 0...(random.next() % 4) {
                let position = Int(random.next() % UInt64(buffer.count))
                switch random.next() % 4 {
                case 0: buffer[position] = UInt8(truncatingIfNeeded: random.next())
                case 1: buffer.remove(at: position)
                case 2: buffer.insert(Array(#"{}[]:,"\0-e"#.utf8)[Int(random.next() % 11)], at: position)
                default: buffer.removeSubrange(position..<min(buffer.count, position + Int(random.next() % 16)))
                }
                if buffer.isEmpty { buffer = [0x20] }
            }
            if checkParseIsTotal(buffer) { accepted += 1 }
        }
        XCTAssertGreaterThan(accepted, 0)
    }

    // MARK: Helpers

    /// Parses `bytes`; on success, checks the value survives a write/parse round trip; on failure, that
    /// the error's position is inside the input. Returns whether it parsed.
    private func checkParseIsTotal(_ bytes: [UInt8]) -> Bool {
        do {
            let value = try JSONValue.parse(bytes)
            XCTAssertEqual(try? JSONValue.parse(Array(write(value).utf8)), value, "round trip of \(bytes)")
            return true
        } catch {
            XCTAssertTrue(error.offset >= 0 && error.offset <= bytes.count && error.line >= 1 && error.column >= 1, "\(bytes)")
            XCTAssertFalse(error.description.contains("\n"))
            return false
        }
    }

    private func write(_ value: JSONValue) -> String {
        switch value {
        case let .object(object):
            return "{" + object.members.map { writeString($0.key) + ":" + write($0.value) }.joined(separator: ",") + "}"
        case let .array(elements): return "[" + elements.map(write).joined(separator: ",") + "]"
        case let .string(text): return writeString(text)
        case let .number(number): return number.literal
        case let .bool(flag): return flag ? "true" : "false"
        case .null: return "null"
        }
    }

    private func writeString(_ text: String) -> String {
        var result = "\""
        for unit in text.utf16 {
            if unit >= 0x20 && unit < 0x7F && unit != 0x22 && unit != 0x5C {
                result.unicodeScalars.append(Unicode.Scalar(UInt8(unit)))
            } else {
                let hex = String(unit, radix: 16)
                result += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            }
        }
        return result + "\""
    }
}

// MARK: - Sandbox profiles

final class SandboxProfileTests: XCTestCase {
    static let serialProfile = #"""
    {
      "profile": "serial",
      "version": 1,
      "description": "16550A UART: register ring, console output and input",
      "namespaces": ["user", "pid", "mount", "net", "ipc", "uts"],
      "rlimits": { "nofile": 32, "nproc": 0, "core": 0, "fsize": "unlimited", "as_extra_mib": 512 },
      "startup_syscalls": ["openat", "execve", "access", "readlink", "newfstatat", "arch_prctl", "set_tid_address", "set_robust_list", "rseq", "prlimit64"],
      "syscalls": [
        "read", "write", "close",
        { "name": "ioctl", "allow_if": [ { "arg": 1, "op": "eq", "value": "0x5421" } ] },
        { "name": "mmap",  "allow_if": [ { "arg": 2, "op": "masked_eq", "mask": 4, "value": 0 } ] }
      ]
    }
    """#

    /// The x86-64 numbers of the syscalls these tests use, plus one libseccomp pseudo-syscall.
    static let syscallTable: [String: Int32] = [
        "read": 0, "write": 1, "close": 3, "mmap": 9, "mprotect": 10, "ioctl": 16, "access": 21, "futex": 202, "execve": 59,
        "fcntl": 72, "readlink": 89, "arch_prctl": 158, "set_tid_address": 218, "openat": 257, "newfstatat": 262,
        "set_robust_list": 273, "prlimit64": 302, "rseq": 334, "exit_group": 231, "socketcall": -101, "clone3": 435,
    ]

    static let source = "sandbox-profiles/serial.json"

    func testFullProfileLoadsIntoTheModel() throws {
        let profile = try load(Self.serialProfile)
        let t = Self.syscallTable
        let startupNames = ["openat", "execve", "access", "readlink", "newfstatat", "arch_prctl", "set_tid_address",
                            "set_robust_list", "rseq", "prlimit64"]
        let expected = SandboxProfile(
            name: "serial", version: 1, description: "16550A UART: register ring, console output and input",
            namespaces: [.user, .pid, .mount, .net, .ipc, .uts],
            limits: ResourceLimits(openFiles: 32, processes: 0, coreBytes: 0, fileSizeBytes: nil, addressSpaceExtraMiB: 512),
            startupSyscalls: startupNames.map { SyscallRule(name: $0, number: t[$0]!) },
            syscalls: [
                SyscallRule(name: "read", number: 0), SyscallRule(name: "write", number: 1), SyscallRule(name: "close", number: 3),
                SyscallRule(name: "ioctl", number: 16, conditions: [ArgumentCondition(argument: 1, operation: .eq, value: 0x5421)]),
                SyscallRule(name: "mmap", number: 9, conditions: [ArgumentCondition(argument: 2, operation: .maskedEq, value: 0, mask: 4)]),
            ])
        XCTAssertEqual(profile, expected)
        XCTAssertEqual(profile.syscalls[3].conditions[0].mask, UInt64.max)  // Non-masked ops compare the whole argument.
        XCTAssertEqual(profile.steadyStateSyscallCount, 5)
        XCTAssertEqual(profile.startupSyscallCount, 15)
        XCTAssertEqual(profile.startupRules, profile.syscalls + profile.startupSyscalls)
        XCTAssertEqual(profile.limits.addressSpaceLimit(guestRAMBytes: 256 << 20), 768 << 20)
    }

    func testOptionalKeysTakeTheirDefaults() throws {
        let profile = try load(#"{"profile": "min-1", "version": 1, "namespaces": ["user", "mount"], "syscalls": []}"#)
        XCTAssertEqual(profile.description, "")
        XCTAssertEqual(profile.namespaces, [.user, .mount])
        XCTAssertEqual(profile.limits, ResourceLimits.defaults)
        XCTAssertEqual(profile.limits, ResourceLimits(openFiles: 64, processes: 0, coreBytes: 0, fileSizeBytes: nil, addressSpaceExtraMiB: nil))
        XCTAssertEqual(profile.startupSyscalls, [])
        XCTAssertEqual(profile.syscalls, [])
        XCTAssertEqual(profile.steadyStateSyscallCount, 0)
        XCTAssertEqual(profile.startupSyscallCount, 0)
        XCTAssertNil(profile.limits.addressSpaceLimit(guestRAMBytes: 1 << 30))

        let partial = try load(#"{"profile": "p", "version": 1, "namespaces": ["user", "mount", "cgroup"], "rlimits": {"fsize": 4096, "nofile": "unlimited"}, "syscalls": []}"#)
        XCTAssertEqual(partial.limits, ResourceLimits(openFiles: nil, processes: 0, coreBytes: 0, fileSizeBytes: 4096, addressSpaceExtraMiB: nil))
        XCTAssertEqual(partial.namespaces, [.user, .mount, .cgroup])
    }

    /// The jail cannot run without a user and a mount namespace: a profile without them is
    /// refused with one line, not left to fail later with a bare EPERM.
    func testUserAndMountNamespacesAreRequired() throws {
        for (namespaces, missing) in [("[]", "user"), (#"["user"]"#, "mount"), (#"["mount", "pid"]"#, "user")] {
            let error = try XCTUnwrap(loadError(#"{"profile": "p", "version": 1, "namespaces": \#(namespaces), "syscalls": []}"#))
            XCTAssertEqual(error.problem, .requiredNamespaceMissing(missing), namespaces)
            XCTAssertTrue("\(error)".contains("namespaces must include \"\(missing)\""), "\(error)")
        }
    }

    func testSeveralEntriesForOneSyscallAreOredAndStartupRulesMerge() throws {
        let profile = try load(#"""
        {"profile": "p", "version": 1, "namespaces": ["user", "mount"],
         "startup_syscalls": ["ioctl", {"name": "fcntl", "allow_if": [{"arg": 1, "op": "eq", "value": 3}]}, "mprotect"],
         "syscalls": [
           {"name": "ioctl", "allow_if": [{"arg": 1, "op": "eq", "value": "0x5421"}]},
           {"name": "ioctl", "allow_if": [{"arg": 1, "op": "eq", "value": "0x5413"}, {"arg": 0, "op": "le", "value": 2}]},
           {"name": "fcntl", "allow_if": [{"arg": 1, "op": "eq", "value": 1}]},
           {"name": "futex", "allow_if": [{"arg": 1, "op": "ge", "value": 0}, {"arg": 1, "op": "lt", "value": "0xFF"},
                                           {"arg": 2, "op": "ne", "value": 18446744073709551615}, {"arg": 5, "op": "gt", "value": "0x0"}]},
           "read"]}
        """#)
        XCTAssertEqual(profile.syscalls.map(\.name), ["ioctl", "ioctl", "fcntl", "futex", "read"])
        XCTAssertEqual(profile.syscalls[1].conditions, [ArgumentCondition(argument: 1, operation: .eq, value: 0x5413),
                                                        ArgumentCondition(argument: 0, operation: .le, value: 2)])
        XCTAssertEqual(profile.syscalls[3].conditions.map(\.operation), [.ge, .lt, .ne, .gt])
        XCTAssertEqual(profile.syscalls[3].conditions.map(\.value), [0, 0xFF, UInt64.max, 0])
        XCTAssertEqual(profile.steadyStateSyscallCount, 4)
        XCTAssertEqual(profile.startupSyscallCount, 5)
        // During start-up the bare ioctl absorbs the conditional ones; both fcntl conditions stay OR-ed.
        XCTAssertEqual(profile.startupRules.map(\.description), [
            "fcntl if arg1 == 1", "futex if arg1 >= 0 and arg1 < 0xff and arg2 != 0xffffffffffffffff and arg5 > 0", "read",
            "ioctl", "fcntl if arg1 == 3", "mprotect",
        ])
    }

    func testRenderShowsTheEffectiveProfile() throws {
        let profile = try load(Self.serialProfile)
        let text = profile.render(header: ["uid/gid: 100042/100042 (tenant acme)"])
        XCTAssertEqual(text, """
        sandbox profile serial (profile format version 1)
        description: 16550A UART: register ring, console output and input
        uid/gid: 100042/100042 (tenant acme)
        namespaces: user, pid, mount, net, ipc, uts
        rlimits: nofile 32, nproc 0, core 0 bytes, fsize unlimited, address space guest RAM + 512 MiB
        syscalls after lock-down:
          close
          ioctl            if arg1 == 0x5421
          mmap             if (arg2 & 4) == 0
          read
          write
        syscalls during start-up only (until lock-down):
          access
          arch_prctl
          execve
          newfstatat
          openat
          prlimit64
          readlink
          rseq
          set_robust_list
          set_tid_address
        5 syscalls allowed after lock-down, 15 during start-up
        """)
    }

    func testRenderListsAlternativeConditionsUnderOneName() throws {
        let profile = try load(#"""
        {"profile": "p", "version": 1, "namespaces": ["user", "mount"], "rlimits": {"as_extra_mib": "unlimited", "fsize": 1},
         "syscalls": [{"name": "ioctl", "allow_if": [{"arg": 1, "op": "eq", "value": "0x5421"}]}, "write",
                      {"name": "ioctl", "allow_if": [{"arg": 1, "op": "eq", "value": 21523}, {"arg": 2, "op": "masked_eq", "mask": "0xff00", "value": "0x1200"}]}]}
        """#)
        let text = profile.render()
        XCTAssertTrue(text.contains("\n  ioctl  if arg1 == 0x5421\n         or if arg1 == 0x5413 and (arg2 & 0xff00) == 0x1200\n  write\n"), text)
        XCTAssertTrue(text.contains("namespaces: user, mount"), text)
        XCTAssertTrue(text.contains("fsize 1 bytes, address space unlimited"), text)
        XCTAssertTrue(text.contains("syscalls during start-up only (until lock-down):\n  (none)\n"), text)
        XCTAssertTrue(text.hasSuffix("\n2 syscalls allowed after lock-down, 2 during start-up"), text)
        XCTAssertFalse(text.hasPrefix("description"), text)
    }

    // MARK: Errors

    func testUnknownSyscallNamesTheFileTheListAndTheName() {
        assertError(replacing: #""read", "write""#, with: #""read", "frobnicate""#,
                    .unknownSyscall(name: "frobnicate", list: "syscalls"), at: "syscalls[1]",
                    description: #"sandbox-profiles/serial.json: unknown syscall "frobnicate" in syscalls (syscalls[1])"#)
        assertError(replacing: #""execve", "access""#, with: #""execve", "acess""#,
                    .unknownSyscall(name: "acess", list: "startup_syscalls"), at: "startup_syscalls[2]",
                    description: #"sandbox-profiles/serial.json: unknown syscall "acess" in startup_syscalls (startup_syscalls[2])"#)
        assertError(replacing: #"{ "name": "ioctl","#, with: #"{ "name": "ioctI","#,
                    .invalidSyscallName("ioctI"), at: "syscalls[3].name")
        assertError(replacing: #"{ "name": "ioctl","#, with: #"{ "name": "nosuch","#,
                    .unknownSyscall(name: "nosuch", list: "syscalls"), at: "syscalls[3].name")
        assertError(replacing: #""read", "write""#, with: #""read", "socketcall""#,
                    .notAnX86_64Syscall(name: "socketcall", number: -101), at: "syscalls[1]")
        assertError(replacing: #""read", "write""#, with: #""read", """#, .invalidSyscallName(""), at: "syscalls[1]")
    }

    func testNamespaceErrors() {
        assertError(replacing: #""ipc", "uts""#, with: #""ipc", "time""#, .unknownNamespace("time"), at: "namespaces[5]",
                    description: #"sandbox-profiles/serial.json: unknown namespace "time"; known namespaces are user, pid, mount, net, ipc, uts, cgroup (namespaces[5])"#)
        assertError(replacing: #""ipc", "uts""#, with: #""ipc", "pid""#, .duplicateNamespace("pid"), at: "namespaces[5]")
        assertError(replacing: #""ipc", "uts""#, with: #""ipc", 7"#, .wrongType(expected: "a string", found: "a number"), at: "namespaces[5]")
        assertError(replacing: #"["user", "pid", "mount", "net", "ipc", "uts"]"#, with: #""user""#,
                    .wrongType(expected: "an array", found: "a string"), at: "namespaces")
    }

    /// `enosys`: bare names the allowlists do not name, failing with ENOSYS in both stages.
    func testENOSYSList() throws {
        let base = #"{"profile": "scsi", "version": 1, "namespaces": ["user", "mount"], "syscalls": ["read", "write"]"#
        let profile = try load(base + #", "enosys": ["clone3"]}"#)
        XCTAssertEqual(profile.enosysSyscalls, [SyscallRule(name: "clone3", number: 435)])
        XCTAssertTrue(profile.render().contains("failing with ENOSYS: clone3"))
        XCTAssertEqual(try load(base + "}").enosysSyscalls, [])
        XCTAssertEqual(loadError(base + #", "enosys": ["write"]}"#)?.problem, .enosysConflict(name: "write"))
        XCTAssertEqual(loadError(base + #", "enosys": [{"name": "clone3", "allow_if": [{"arg": 0, "op": "eq", "value": 1}]}]}"#)?.problem,
                       .enosysConflict(name: "clone3"))
        XCTAssertEqual(loadError(base + #", "enosys": ["nosuch"]}"#)?.problem, .unknownSyscall(name: "nosuch", list: "enosys"))
    }

    func testUnknownKeysAreErrors() {
        assertError(replacing: #""version": 1,"#, with: #""version": 1, "seccomp": true,"#,
                    .unknownKey("seccomp", allowed: ["profile", "version", "description", "include", "namespaces", "rlimits", "startup_syscalls", "syscalls", "enosys"]),
                    at: "seccomp",
                    description: #"sandbox-profiles/serial.json: unknown key "seccomp"; allowed keys are profile, version, description, include, namespaces, rlimits, startup_syscalls, syscalls, enosys (seccomp)"#)
        assertError(replacing: #""nofile": 32"#, with: #""nofiles": 32"#,
                    .unknownKey("nofiles", allowed: ["nofile", "nproc", "core", "fsize", "as_extra_mib"]), at: "rlimits.nofiles")
        assertError(replacing: #"{ "name": "ioctl","#, with: #"{ "name": "ioctl", "action": "log","#,
                    .unknownKey("action", allowed: ["name", "allow_if"]), at: "syscalls[3].action")
        assertError(replacing: #""op": "eq","#, with: #""op": "eq", "comment": "TCGETS","#,
                    .unknownKey("comment", allowed: ["arg", "op", "value", "mask"]), at: "syscalls[3].allow_if[0].comment")
        assertError(replacing: #""version": 1,"#, with: #""version": 1, "a.b\n": 0,"#,
                    .unknownKey("a.b\n", allowed: ["profile", "version", "description", "include", "namespaces", "rlimits", "startup_syscalls", "syscalls", "enosys"]),
                    at: #"["a.b\n"]"#)
    }

    func testConditionErrors() {
        assertError(replacing: #""op": "eq""#, with: #""op": "equals""#, .unknownOperation("equals"), at: "syscalls[3].allow_if[0].op",
                    description: #"sandbox-profiles/serial.json: unknown op "equals"; allowed ops are eq, ne, lt, le, gt, ge, masked_eq (syscalls[3].allow_if[0].op)"#)
        assertError(replacing: #""op": "masked_eq", "mask": 4,"#, with: #""op": "masked_eq","#, .missingMask, at: "syscalls[4].allow_if[0]",
                    description: #"sandbox-profiles/serial.json: op masked_eq requires "mask" (syscalls[4].allow_if[0])"#)
        assertError(replacing: #""op": "eq","#, with: #""op": "eq", "mask": 4,"#, .maskWithoutMaskedEq(operation: "eq"),
                    at: "syscalls[3].allow_if[0].mask")
        assertError(replacing: #""arg": 1"#, with: #""arg": 6"#, .outOfRange(found: "6", allowed: "0 to 5"), at: "syscalls[3].allow_if[0].arg",
                    description: "sandbox-profiles/serial.json: 6 is out of range (allowed: 0 to 5) (syscalls[3].allow_if[0].arg)")
        assertError(replacing: #""arg": 1"#, with: #""arg": -1"#, .outOfRange(found: "-1", allowed: "0 to 5"), at: "syscalls[3].allow_if[0].arg")
        assertError(replacing: #""arg": 1"#, with: #""arg": 1.0"#, .notAnInteger(found: "1.0"), at: "syscalls[3].allow_if[0].arg")
        assertError(replacing: #""arg": 1"#, with: #""arg": "1""#, .wrongType(expected: "an argument index 0 to 5", found: "a string"),
                    at: "syscalls[3].allow_if[0].arg")
        assertError(replacing: #""value": "0x5421""#, with: #""value": 18446744073709551616"#,
                    .outOfRange(found: "18446744073709551616", allowed: "0 to 0xffffffffffffffff"), at: "syscalls[3].allow_if[0].value")
        assertError(replacing: #""value": "0x5421""#, with: #""value": "0x10000000000000000""#,
                    .invalidHexString("0x10000000000000000"), at: "syscalls[3].allow_if[0].value")
        assertError(replacing: #""value": "0x5421""#, with: #""value": "21505""#, .invalidHexString("21505"), at: "syscalls[3].allow_if[0].value")
        assertError(replacing: #""value": "0x5421""#, with: #""value": "0x""#, .invalidHexString("0x"), at: "syscalls[3].allow_if[0].value")
        assertError(replacing: #""value": "0x5421""#, with: #""value": "0X5421""#, .invalidHexString("0X5421"), at: "syscalls[3].allow_if[0].value")
        assertError(replacing: #""value": "0x5421""#, with: #""value": 1e3"#, .notAnInteger(found: "1e3"), at: "syscalls[3].allow_if[0].value")
        assertError(replacing: #""value": "0x5421""#, with: #""value": null"#,
                    .wrongType(expected: "an integer or a \"0x…\" string", found: "null"), at: "syscalls[3].allow_if[0].value")
        assertError(replacing: #""mask": 4, "value": 0"#, with: #""mask": 4, "value": 5"#, .valueOutsideMask(value: 5, mask: 4),
                    at: "syscalls[4].allow_if[0].value")
        assertError(replacing: #"{ "arg": 1, "op": "eq", "value": "0x5421" }"#, with: #"{ "arg": 1, "value": "0x5421" }"#,
                    .missingKey("op"), at: "syscalls[3].allow_if[0]")
        assertError(replacing: #"[ { "arg": 1, "op": "eq", "value": "0x5421" } ]"#, with: "[]", .emptyConditions(name: "ioctl"),
                    at: "syscalls[3].allow_if")
        assertError(replacing: #"[ { "arg": 1, "op": "eq", "value": "0x5421" } ]"#, with: "[ 1 ]",
                    .wrongType(expected: "an object", found: "a number"), at: "syscalls[3].allow_if[0]")
        assertError(replacing: #"{ "name": "ioctl", "allow_if": [ { "arg": 1, "op": "eq", "value": "0x5421" } ] }"#,
                    with: #"{ "name": "ioctl" }"#, .missingKey("allow_if"), at: "syscalls[3]")
        // The largest values are fine.
        XCTAssertNoThrow(try load(Self.serialProfile.replacingOccurrences(of: #""value": "0x5421""#, with: #""value": "0xFFFFffffffffffff""#)))
        XCTAssertNoThrow(try load(Self.serialProfile.replacingOccurrences(of: #""value": "0x5421""#, with: #""value": 18446744073709551615"#)))
        XCTAssertNoThrow(try load(Self.serialProfile.replacingOccurrences(of: #""arg": 1"#, with: #""arg": 5"#)))
    }

    func testDuplicateAndContradictoryEntries() {
        assertError(replacing: #""read", "write", "close","#, with: #""read", "write", "close", "ioctl","#,
                    .bareAndConditional(name: "ioctl", list: "syscalls"), at: "syscalls[4]")
        assertError(replacing: #"{ "name": "mmap","#, with: #""ioctl", { "name": "mmap","#,
                    .bareAndConditional(name: "ioctl", list: "syscalls"), at: "syscalls[4]",
                    description: #"sandbox-profiles/serial.json: syscall "ioctl" is in syscalls both unconditionally and with allow_if, which would make the condition meaningless (syscalls[4])"#)
        assertError(replacing: #""read", "write", "close","#, with: #""read", "write", "close", "read","#,
                    .duplicateSyscall(name: "read", list: "syscalls"), at: "syscalls[3]")
        assertError(replacing: #"{ "name": "mmap","#,
                    with: #"{ "name": "ioctl", "allow_if": [ { "arg": 1, "op": "eq", "value": 21537 } ] }, { "name": "mmap","#,
                    .duplicateSyscall(name: "ioctl", list: "syscalls"), at: "syscalls[4]")
        assertError(replacing: #""rseq", "prlimit64""#, with: #""rseq", "prlimit64", "read""#,
                    .alreadyAllowedBySyscalls(name: "read"), at: "startup_syscalls[10]")
        assertError(replacing: #""rseq", "prlimit64""#, with: #""rseq", "prlimit64", "openat""#,
                    .duplicateSyscall(name: "openat", list: "startup_syscalls"), at: "startup_syscalls[10]")
        // The same syscall conditional in syscalls and bare in startup_syscalls is allowed (wider during start-up).
        XCTAssertNoThrow(try load(Self.serialProfile.replacingOccurrences(of: #""rseq", "prlimit64""#, with: #""rseq", "prlimit64", "ioctl""#)))
    }

    func testVersionMustBeOne() {
        assertError(replacing: #""version": 1"#, with: #""version": 2"#, .unsupportedVersion(found: "2"), at: "version",
                    description: "sandbox-profiles/serial.json: unsupported profile format version 2; this hv reads profile format version 1 (version)")
        assertError(replacing: #""version": 1"#, with: #""version": "1""#, .unsupportedVersion(found: #""1""#), at: "version")
        assertError(replacing: #""version": 1"#, with: #""version": 1.0"#, .unsupportedVersion(found: "1.0"), at: "version")
        assertError(replacing: #""version": 1,"#, with: "", .missingKey("version"), at: "",
                    description: #"sandbox-profiles/serial.json: missing required key "version" (top level)"#)
        // A newer file is explained by its version, not by its new keys.
        assertError(replacing: #""version": 1,"#, with: #""version": 2, "landlock": {},"#, .unsupportedVersion(found: "2"), at: "version")
    }

    func testWrongTypesAndBadTopLevelValues() {
        assertError(replacing: #""profile": "serial""#, with: #""profile": 5"#, .wrongType(expected: "a string", found: "a number"), at: "profile")
        assertError(replacing: #""profile": "serial""#, with: #""profile": "Serial""#, .invalidProfileName("Serial"), at: "profile")
        assertError(replacing: #""profile": "serial","#, with: "", .missingKey("profile"), at: "")
        assertError(replacing: #""description": "16550A UART"#, with: #""description": "two\nlines"#,
                    .invalidDescription(reason: "must be one line without control characters"), at: "description")
        assertError(replacing: #""nofile": 32"#, with: #""nofile": true"#,
                    .wrongType(expected: "a non-negative integer or \"unlimited\"", found: "a boolean"), at: "rlimits.nofile")
        assertError(replacing: #""nofile": 32"#, with: #""nofile": "infinite""#,
                    .wrongType(expected: "a non-negative integer or \"unlimited\"", found: #"the string "infinite""#), at: "rlimits.nofile")
        assertError(replacing: #""nofile": 32"#, with: #""nofile": -1"#,
                    .outOfRange(found: "-1", allowed: "0 to 18446744073709551614, or \"unlimited\""), at: "rlimits.nofile")
        assertError(replacing: #""core": 0"#, with: #""core": 18446744073709551615"#,
                    .outOfRange(found: "18446744073709551615", allowed: "0 to 18446744073709551614, or \"unlimited\""), at: "rlimits.core")
        assertError(replacing: #""as_extra_mib": 512"#, with: #""as_extra_mib": 17592186044416"#,
                    .outOfRange(found: "17592186044416", allowed: "0 to 17592186044415 MiB, or \"unlimited\""), at: "rlimits.as_extra_mib")
        assertError(replacing: #""as_extra_mib": 512"#, with: #""as_extra_mib": 0.5"#, .notAnInteger(found: "0.5"), at: "rlimits.as_extra_mib")
        assertError(replacing: #""rlimits": {"#, with: #""rlimits": [ {"#, .wrongType(expected: "an object", found: "an array"), at: "rlimits",
                    alsoReplacing: #""as_extra_mib": 512 }"#, with: #""as_extra_mib": 512 } ]"#)
        assertError(replacing: #""read", "write""#, with: #""read", ["write"]"#,
                    .wrongType(expected: "a syscall name or an object with \"name\" and \"allow_if\"", found: "an array"), at: "syscalls[1]")
        assertError(replacing: #""startup_syscalls": ["openat""#, with: #""startup_syscalls": {}, "x": ["openat""#,
                    .unknownKey("x", allowed: ["profile", "version", "description", "include", "namespaces", "rlimits", "startup_syscalls", "syscalls", "enosys"]), at: "x")
        assertError(replacing: #""startup_syscalls": ["#, with: #""startup_syscalls": null, "unused": ["#,
                    .unknownKey("unused", allowed: ["profile", "version", "description", "include", "namespaces", "rlimits", "startup_syscalls", "syscalls", "enosys"]),
                    at: "unused")

        XCTAssertEqual(loadError("[1]")?.problem, .wrongType(expected: "an object", found: "an array"))
        XCTAssertEqual(loadError("[1]")?.description, "sandbox-profiles/serial.json: expected an object, found an array (top level)")
        XCTAssertEqual(loadError(#"{"version": 1, "profile": "p", "namespaces": ["user", "mount"], "startup_syscalls": null, "syscalls": []}"#)?.problem,
                       .wrongType(expected: "an array", found: "null"))
        XCTAssertEqual(loadError(#"{"version": 1, "profile": "p", "namespaces": ["user", "mount"]}"#)?.problem, .missingKey("syscalls"))
        XCTAssertEqual(loadError(#"{"version": 1, "profile": "p", "syscalls": []}"#)?.problem, .missingKey("namespaces"))
    }

    func testInvalidJSONReportsLineAndColumn() throws {
        let error = try XCTUnwrap(loadError(Self.serialProfile.replacingOccurrences(of: #""close","#, with: #""close",,"#)))
        guard case let .invalidJSON(json) = error.problem else { return XCTFail("\(error)") }
        XCTAssertEqual(json.reason, .unexpectedCharacter(UInt8(ascii: ","), expected: "a value"))
        XCTAssertEqual(error.description, "sandbox-profiles/serial.json: invalid JSON: unexpected ',', expected a value (line 9, column 30)")
        let duplicate = loadError(Self.serialProfile.replacingOccurrences(of: #""version": 1,"#, with: #""version": 1, "profile": "x","#))
        XCTAssertEqual(duplicate?.description, #"sandbox-profiles/serial.json: invalid JSON: duplicate key "profile" (line 3, column 17)"#)
    }

    func testErrorDescriptionsStayOnOneLine() throws {
        let error = try XCTUnwrap(loadError(#"{"version": 1, "profile": "p\u2028\n", "namespaces": ["user", "mount"], "syscalls": []}"#, source: "evil\nname.json"))
        XCTAssertEqual(error.description, #"evil\u{a}name.json: profile name "p\u{2028}\n" must be 1 to 64 characters of a-z, 0-9 and '-' (profile)"#)
        let long = String(repeating: "x", count: 500)
        let longError = try XCTUnwrap(loadError(#"{"version": 1, "profile": "p", "namespaces": ["\#(long)"], "syscalls": []}"#))
        XCTAssertLessThan(longError.description.count, 250)
        XCTAssertTrue(longError.description.contains("…"))
    }

    func testMutatedProfilesNeverTrapAndErrorsNameTheSource() {
        var random = SplitMix64(seed: 0x5EED_0003)
        let seed = Array(Self.serialProfile.utf8)
        var loaded = 0
        for _ in 0..<3_000 {
            var buffer = seed
            let position = Int(random.next() % UInt64(buffer.count))
            switch random.next() % 3 {
            case 0: buffer[position] = Array(#"019x-"{}[],:aez "#.utf8)[Int(random.next() % 16)]
            case 1: buffer.remove(at: position)
            default: buffer.insert(UInt8(truncatingIfNeeded: random.next()), at: position)
            }
            do {
                _ = try SandboxProfile.load(json: buffer, source: "m.json", resolveSyscall: { Self.syscallTable[$0] })
                loaded += 1
            } catch {
                XCTAssertTrue(error.description.hasPrefix("m.json: "), error.description)
                XCTAssertFalse(error.description.contains("\n"), error.description)
                XCTAssertTrue(error.description.hasSuffix(")"), error.description)
            }
        }
        XCTAssertGreaterThan(loaded, 0)
    }

    func testNamespaceFlagsAndLimitArithmetic() {
        XCTAssertEqual(Namespace.allCases.map(\.rawValue), ["user", "pid", "mount", "net", "ipc", "uts", "cgroup"])
        XCTAssertEqual(Namespace.allCases.reduce(Int32(0)) { $0 | $1.cloneFlag }, 0x7E02_0000)
        XCTAssertEqual(Namespace.mount.cloneFlag, 0x0002_0000)
        let limits = ResourceLimits(openFiles: 1, processes: 0, coreBytes: 0, fileSizeBytes: 0, addressSpaceExtraMiB: UInt64.max >> 20)
        XCTAssertNil(limits.addressSpaceLimit(guestRAMBytes: 1 << 20))  // Would overflow: unlimited.
        XCTAssertEqual(limits.addressSpaceLimit(guestRAMBytes: 0), (UInt64.max >> 20) << 20)
    }

    // MARK: Helpers

    /// Profiles compose: bases come first, a bare rule anywhere wins over conditional ones,
    /// identical rules appear once, unset rlimits and namespaces are inherited, and the flattened
    /// JSON reads back to the same rules.
    func testIncludedBasesMergeAndFlatten() throws {
        let base = try load(#"""
            {"profile": "base-x", "version": 1, "namespaces": ["user", "mount", "pid"],
             "rlimits": {"nofile": 16, "nproc": 0},
             "startup_syscalls": ["openat", "execve", {"name": "ioctl", "allow_if": [{"arg": 1, "op": "eq", "value": "0x5401"}]}],
             "syscalls": ["read", {"name": "mmap", "allow_if": [{"arg": 2, "op": "masked_eq", "mask": 4, "value": 0}]},
                          {"name": "fcntl", "allow_if": [{"arg": 1, "op": "le", "value": 4}]}]}
            """#, source: "base-x.json")
        var asked: [String] = []
        let text = #"""
            {"profile": "plugin", "version": 1, "include": ["base-x"], "rlimits": {"nproc": 2},
             "startup_syscalls": ["execve", "readlink"],
             "syscalls": ["write", "fcntl", {"name": "mmap", "allow_if": [{"arg": 2, "op": "masked_eq", "mask": 4, "value": 0}]}]}
            """#
        let profile = try SandboxProfile.load(json: Array(text.utf8), source: "plugin.json", resolveSyscall: { Self.syscallTable[$0] }) { name in
            asked.append(name)
            return base
        }
        XCTAssertEqual(asked, ["base-x"])
        XCTAssertEqual(profile.includes, ["base-x"])
        XCTAssertEqual(profile.namespaces, [.user, .mount, .pid])
        XCTAssertEqual(profile.limits.openFiles, 16, "inherited")
        XCTAssertEqual(profile.limits.processes, 2, "overridden")
        XCTAssertEqual(profile.syscalls.map(\.description), ["read", "mmap if (arg2 & 4) == 0", "fcntl", "write"])
        XCTAssertEqual(profile.startupSyscalls.map(\.name), ["openat", "execve", "ioctl", "readlink"])
        let flat = try load(profile.jsonText(), source: "flattened")
        XCTAssertEqual(flat.syscalls, profile.syscalls)
        XCTAssertEqual(flat.startupSyscalls, profile.startupSyscalls)
        XCTAssertEqual(flat.limits, profile.limits)
        XCTAssertEqual(flat.namespaces, profile.namespaces)
        XCTAssertEqual(flat.includes, [])
        // A base named twice, or include where nothing resolves bases: refused.
        XCTAssertEqual(loadError(#"{"profile": "p", "version": 1, "include": ["a"], "syscalls": []}"#)?.problem, .includeNotAllowed)
        XCTAssertThrowsError(try SandboxProfile.load(json: Array(#"{"profile": "p", "version": 1, "include": ["a", "a"]}"#.utf8), source: "p",
                                                     resolveSyscall: { Self.syscallTable[$0] }) { _ in base }) { error in
            XCTAssertEqual((error as? SandboxProfileError)?.problem, .duplicateInclude("a"))
        }
        // Without a base, namespaces and syscalls stay required.
        XCTAssertEqual(loadError(#"{"profile": "p", "version": 1, "syscalls": []}"#)?.problem, .missingKey("namespaces"))
    }

    private func load(_ text: String, source: String = SandboxProfileTests.source) throws -> SandboxProfile {
        try SandboxProfile.load(json: Array(text.utf8), source: source, resolveSyscall: { Self.syscallTable[$0] })
    }

    private func loadError(_ text: String, source: String = SandboxProfileTests.source) -> SandboxProfileError? {
        do {
            _ = try SandboxProfile.load(json: Array(text.utf8), source: source, resolveSyscall: { Self.syscallTable[$0] })
            return nil
        } catch {
            return error
        }
    }

    /// Loads the serial profile with `old` replaced by `new` (which must occur) and checks the error.
    private func assertError(replacing old: String, with new: String, _ problem: SandboxProfileError.Problem, at path: String,
                             description: String? = nil, alsoReplacing old2: String? = nil, with new2: String? = nil,
                             file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(Self.serialProfile.contains(old), "test fixture lacks \(old)", file: file, line: line)
        var text = Self.serialProfile.replacingOccurrences(of: old, with: new)
        if let old2, let new2 {
            XCTAssertTrue(text.contains(old2), "test fixture lacks \(old2)", file: file, line: line)
            text = text.replacingOccurrences(of: old2, with: new2)
        }
        guard let error = loadError(text) else { return XCTFail("loaded without error", file: file, line: line) }
        XCTAssertEqual(error.problem, problem, file: file, line: line)
        XCTAssertEqual(error.path, path, file: file, line: line)
        XCTAssertEqual(error.source, Self.source, file: file, line: line)
        XCTAssertTrue(error.description.hasPrefix(Self.source + ": "), error.description, file: file, line: line)
        XCTAssertTrue(error.description.hasSuffix(" (\(path.isEmpty ? "top level" : path))"), error.description, file: file, line: line)
        XCTAssertFalse(error.description.contains("\n"), error.description, file: file, line: line)
        if let description { XCTAssertEqual(error.description, description, file: file, line: line) }
    }
}

// MARK: - Shared helpers

/// A small seeded generator, so fuzz runs are reproducible.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private func parse(_ text: String) throws -> JSONValue { try JSONValue.parse(Array(text.utf8)) }

private func parseError(_ text: String) -> JSONError? {
    do {
        _ = try JSONValue.parse(Array(text.utf8))
        return nil
    } catch {
        return error
    }
}

private func reason(_ bytes: [UInt8]) -> JSONError.Reason? {
    do {
        _ = try JSONValue.parse(bytes)
        return nil
    } catch {
        return error.reason
    }
}

private func number(_ literal: String) -> JSONNumber {
    guard case let .number(number)? = try? JSONValue.parse(Array(literal.utf8)) else {
        XCTFail("\(literal) is not a JSON number")
        return JSONNumber(UInt64(0))
    }
    return number
}

private func assertInvalid(_ text: String, _ expected: JSONError.Reason, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(reason(Array(text.utf8)), expected, text, file: file, line: line)
}

/// The ELF dynamic-section reader behind the jail's library list.
final class ELFDynamicInfoTests: XCTestCase {
    private func info(_ bytes: [UInt8]) -> ELFDynamicInfo? {
        ELFDynamicInfo { offset, count in
            guard offset < UInt64(bytes.count) else { return [] }
            return Array(bytes[Int(offset)..<min(bytes.count, Int(offset) + count)])
        }
    }

    func testReadsARealBinarysNeedsAndRunPath() throws {
        // This test bundle's own runner is a Swift binary: it needs libswiftCore.so and has a RUNPATH.
        let path = CommandLine.arguments[0]
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let parsed = try XCTUnwrap(info(bytes), path)
        XCTAssertTrue(parsed.needed.contains("libc.so.6"), "\(parsed.needed)")
        let shell = try XCTUnwrap(info(try [UInt8](Data(contentsOf: URL(fileURLWithPath: "/bin/sh")))))
        XCTAssertTrue(shell.needed.contains("libc.so.6"), "\(shell.needed)")
    }

    func testMalformedFilesYieldNothing() throws {
        XCTAssertNil(info([]))
        XCTAssertNil(info(Array("#!/bin/sh\necho hi\n".utf8)))
        var header = [UInt8](repeating: 0, count: 64)
        header.replaceSubrange(0..<6, with: [0x7F, 0x45, 0x4C, 0x46, 2, 1])
        XCTAssertNil(info(header), "no program headers")
        // Program headers pointing past the end, absurd counts: nil, never a trap.
        header[0x20] = 0xFF; header[0x21] = 0xFF; header[0x36] = 56; header[0x38] = 0xFF
        XCTAssertNil(info(header))
        // A truncated real binary.
        let sh = try [UInt8](Data(contentsOf: URL(fileURLWithPath: "/bin/sh")))
        for cut in [64, 200, 1000, 4096] { _ = info(Array(sh.prefix(cut))) }
        // Random bytes behind a valid header.
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var junk = (0..<2048).map { _ in UInt8.random(in: 0...255, using: &rng) }
            junk.replaceSubrange(0..<6, with: [0x7F, 0x45, 0x4C, 0x46, 2, 1])
            _ = info(junk)
        }
    }
}

import Glibc
import HVSandbox
import HVSys

/// A device plugin's manifest: what the plugin is (its executable, or its script and the
/// interpreter that runs it), how it is jailed (its sandbox profile), what it claims on the
/// machine (ports, MMIO, a PCI function and its BARs, interrupt lines, guest memory) and the
/// settings it takes, with their types and defaults. `--device MANIFEST.json[,KEY=VALUE…]` adds
/// one; `hvctl plugin validate|info` checks one. docs/plugin-manifest.md is the reference.
///
/// Format version 1, one JSON object; relative paths are taken against the manifest's directory:
///
///     {
///       "manifest": 1,
///       "name": "port-counter",                      [a-z0-9-]+: the default instance name
///       "description": "…",                          optional, one line
///       "executable": "port_counter.py",             the binary, or the script when "interpreter" is given
///       "interpreter": { "path": "/usr/bin/python3", "arguments": ["-S", "-B"],
///                        "read_only_paths": ["/usr/lib/python3.*"] },   optional
///       "files": ["hvdevice.py"],                    optional: more files the script needs
///       "profile": "port_counter.profile.json",
///       "resources": { "pio": [{"base": "0x530", "length": 4}], "mmio": [],
///                      "pci": {"slot": "05.0", "bars": [{"index": 0, "type": "mmio", "size": 4096}]},
///                      "irqs": [5], "guest_memory": false },
///       "settings": { "start": {"type": "integer", "default": 0, "minimum": 0, "maximum": 65535,
///                               "description": "…"} }
///     }
public struct PluginManifest: Equatable, Sendable {
    /// The manifest format version this hv reads.
    public static let formatVersion = 1

    /// Whether `name` may name a plugin or an instance of one: 1 to 32 of a-z, 0-9 and -.
    static func isInstanceName(_ name: String) -> Bool {
        (1...32).contains(name.utf8.count) && name.utf8.allSatisfy { (0x61...0x7a).contains($0) || (0x30...0x39).contains($0) || $0 == 0x2d }
    }

    /// The largest manifest hv reads.
    public static let maximumBytes = 256 << 10
    /// The most bytes of script and extra files an interpreted plugin may bring into its jail.
    public static let maximumFileBytes: Int64 = 16 << 20

    /// The manifest file (as given).
    public var source: String
    public var name: String
    public var description: String
    /// Absolute path of the binary, or of the script when `interpreter` is set.
    public var executable: String
    public var interpreter: Interpreter?
    /// Absolute paths of the files a script brings along (copied beside it into the jail).
    public var files: [String]
    /// Absolute path of the sandbox profile.
    public var profile: String
    public var resources: Resources
    public var settings: [Setting]

    /// What runs an interpreted plugin.
    public struct Interpreter: Equatable, Sendable {
        /// Absolute path of the interpreter binary (opened by hv, like a native plugin's binary).
        public var path: String
        /// Its arguments before the script's path.
        public var arguments: [String]
        /// Host paths (glob patterns allowed) it needs read-only in the jail: its standard library.
        public var readOnlyPaths: [String]
    }

    /// What the plugin claims on the machine.
    public struct Resources: Equatable, Sendable {
        public var pio: [Range] = []
        public var mmio: [Range] = []
        public var pci: PCIFunction?
        /// GSIs, in the order the device sees them (`runtime.interrupts[0]`, `[1]`, …).
        public var irqs: [UInt32] = []
        public var guestMemory = false
    }

    public struct Range: Equatable, Sendable {
        public var base: UInt64
        public var length: UInt64
        public init(base: UInt64, length: UInt64) {
            self.base = base
            self.length = length
        }
    }

    public struct PCIFunction: Equatable, Sendable {
        /// Device number on bus 0 (1–31) and function (0–7).
        public var device: UInt16
        public var function: UInt16
        public var bars: [BAR]
        public var bdf: UInt16 { device << 3 | function }
    }

    public struct BAR: Equatable, Sendable {
        public enum Kind: String, Sendable { case mmio, pio }
        public var index: Int
        public var kind: Kind
        public var size: UInt64
    }

    /// One setting the device takes in its HELLO config (`runtime.settings`).
    public struct Setting: Equatable, Sendable {
        public enum Kind: String, Sendable { case string, integer, boolean }
        public var name: String
        public var kind: Kind
        /// The value when none is given; nil: the setting must be given.
        public var defaultValue: String?
        public var minimum: Int64?
        public var maximum: Int64?
        /// The only values a string setting may take; empty: any.
        public var choices: [String]
        public var description: String

        /// `text` as this setting's value, normalized (integers in decimal, booleans true/false),
        /// or why it is not one.
        public func value(_ text: String) -> Result<String, SettingProblem> {
            switch kind {
            case .string:
                if !choices.isEmpty && !choices.contains(text) { return .failure(.notAChoice(choices)) }
                if text.contains("\n") { return .failure(.newline) }
                return .success(text)
            case .integer:
                guard let n = parseInteger(text) else { return .failure(.notAnInteger) }
                if let minimum, n < minimum { return .failure(.outOfRange(minimum, maximum)) }
                if let maximum, n > maximum { return .failure(.outOfRange(minimum, maximum)) }
                return .success(String(n))
            case .boolean:
                switch text {
                case "true", "on", "yes", "1": return .success("true")
                case "false", "off", "no", "0": return .success("false")
                default: return .failure(.notABoolean)
                }
            }
        }
    }

    public enum SettingProblem: Error, Equatable, Sendable, CustomStringConvertible {
        case notAChoice([String]), newline, notAnInteger, outOfRange(Int64?, Int64?), notABoolean
        public var description: String {
            switch self {
            case .notAChoice(let c): return "use one of \(c.joined(separator: ", "))"
            case .newline: return "a value cannot hold a line break"
            case .notAnInteger: return "use an integer (decimal or 0x hex)"
            case .outOfRange(let lo, let hi): return "use an integer from \(lo.map(String.init) ?? "any") to \(hi.map(String.init) ?? "any")"
            case .notABoolean: return "use true or false"
            }
        }
    }

    /// Command-line keys `--device MANIFEST,…` keeps for itself, so no setting may use them.
    public static let reservedKeys = ["name", "irq", "pio", "pci", "profile", "memory"]

    // MARK: Reading

    /// Reads and checks the manifest at `path`, and that the files it names exist; one line on failure.
    public static func load(_ path: String) throws(UsageError) -> PluginManifest {
        let bytes: [UInt8]
        do {
            let file = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: Int64(maximumBytes))
            defer { file.close() }
            do { bytes = try file.readAll() } catch { throw HostFileError.system(error.errno) }
        } catch {
            throw UsageError(message: "cannot read plugin manifest '\(path)': \(error)")
        }
        var manifest = try parse(bytes, source: absolutePath(path))
        manifest.source = path
        try manifest.checkFiles()
        return manifest
    }

    /// Checks `bytes` as a manifest read from `source` (relative paths are resolved against its
    /// directory); nothing on disk is looked at.
    public static func parse(_ bytes: [UInt8], source: String) throws(UsageError) -> PluginManifest {
        var reader = ManifestReader(source: source)
        return try reader.manifest(bytes)
    }

    /// That each named file is where the manifest says, of the right kind.
    func checkFiles() throws(UsageError) {
        func fail(_ field: String, _ path: String, _ what: String) -> UsageError {
            UsageError(message: "plugin manifest \(source): \(field) '\(path)' \(what)")
        }
        func regular(_ path: String) -> stat? {
            var st = stat()
            guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return nil }
            return st
        }
        if let interpreter {
            guard regular(interpreter.path) != nil, access(interpreter.path, X_OK) == 0 else {
                throw fail("interpreter.path", interpreter.path, "is not an executable file")
            }
            var total: Int64 = 0
            for (field, path) in [("executable", executable)] + files.map({ ("files", $0) }) {
                guard let st = regular(path), access(path, R_OK) == 0 else { throw fail(field, path, "is not a readable file") }
                total += Int64(st.st_size)
            }
            guard total <= Self.maximumFileBytes else {
                throw UsageError(message: "plugin manifest \(source): executable and files hold \(total) bytes; at most \(Self.maximumFileBytes) go into a jail")
            }
            for pattern in interpreter.readOnlyPaths where Self.expand(pattern).isEmpty {
                throw fail("interpreter.read_only_paths", pattern, "matches nothing on this host")
            }
        } else {
            guard regular(executable) != nil, access(executable, X_OK) == 0 else {
                throw fail("executable", executable, "is not an executable file")
            }
        }
        guard regular(profile) != nil else { throw fail("profile", profile, "is not a file") }
    }

    /// The host paths `pattern` names (glob(3)); a pattern without wildcards names itself if it exists.
    public static func expand(_ pattern: String) -> [String] {
        var result = glob_t()
        defer { globfree(&result) }
        guard glob(pattern, 0, nil, &result) == 0 else { return [] }
        return (0..<Int(result.gl_pathc)).compactMap { result.gl_pathv[$0].map { String(cString: $0) } }
    }

    // MARK: Settings

    /// The device's settings from `given` (command-line `KEY=VALUE` pairs), defaults filled in,
    /// in manifest order; an unknown key, a bad value or a missing required one is one line.
    public func settingValues(_ given: [(key: String, value: String)]) throws(UsageError) -> [(key: String, value: String)] {
        var values: [String: String] = [:]
        for (key, value) in given {
            guard let setting = settings.first(where: { $0.name == key }) else {
                let known = settings.isEmpty ? "it takes none" : "it takes " + settings.map(\.name).joined(separator: ", ")
                throw UsageError(message: "plugin \(name) has no setting '\(key)': \(known)")
            }
            switch setting.value(value) {
            case .success(let v): values[key] = v
            case .failure(let problem): throw UsageError(message: "plugin \(name) setting \(key)='\(value)': \(problem)")
            }
        }
        var result: [(key: String, value: String)] = []
        for setting in settings {
            guard let value = values[setting.name] ?? setting.defaultValue else {
                throw UsageError(message: "plugin \(name) needs \(setting.name)=… (\(setting.kind.rawValue)\(setting.description.isEmpty ? "" : ": " + setting.description))")
            }
            result.append((setting.name, value))
        }
        return result
    }
}

/// An integer in decimal (optionally negative) or 0x hex.
func parseInteger(_ text: String) -> Int64? {
    if text.hasPrefix("0x") || text.hasPrefix("0X") { return UInt64(text.dropFirst(2), radix: 16).flatMap { Int64(exactly: $0) } }
    return Int64(text)
}

/// The checks of one manifest, each failure one line: "plugin manifest PATH: FIELD: problem".
private struct ManifestReader {
    let source: String
    let directory: String

    init(source: String) {
        self.source = source
        let slash = source.lastIndex(of: "/")
        directory = slash.map { String(source[..<$0]) } ?? "."
    }

    func fail(_ field: String, _ problem: String) -> UsageError {
        UsageError(message: "plugin manifest \(source): \(field): \(problem)")
    }

    func object(_ value: JSONValue?, _ field: String, keys: [String]) throws(UsageError) -> JSONObject {
        guard case .object(let o)? = value else { throw fail(field, "expected an object") }
        for key in o.keys where !keys.contains(key) {
            throw fail(field.isEmpty ? key : "\(field).\(key)", "unknown key (known: \(keys.joined(separator: ", ")))")
        }
        return o
    }

    func string(_ value: JSONValue?, _ field: String) throws(UsageError) -> String {
        guard case .string(let s)? = value else { throw fail(field, value == nil ? "required" : "expected a string") }
        return s
    }

    func array(_ value: JSONValue?, _ field: String) throws(UsageError) -> [JSONValue] {
        guard let value else { return [] }
        guard case .array(let a) = value else { throw fail(field, "expected an array") }
        return a
    }

    /// A non-negative integer, as a JSON number or a "0x…" string.
    func unsigned(_ value: JSONValue?, _ field: String, maximum: UInt64 = .max) throws(UsageError) -> UInt64 {
        let n: UInt64?
        switch value {
        case .number(let number)?: n = number.isInteger ? number.uint64Value : nil
        case .string(let s)? where s.hasPrefix("0x"): n = UInt64(s.dropFirst(2), radix: 16)
        case nil: throw fail(field, "required")
        default: n = nil
        }
        guard let n else { throw fail(field, "expected a non-negative integer (or a \"0x…\" string)") }
        guard n <= maximum else { throw fail(field, "\(n) is more than \(maximum)") }
        return n
    }

    /// `text` against the manifest's directory, with `.` and `..` taken out (for messages).
    func path(_ text: String) -> String {
        var parts: [Substring] = []
        let full = absolutePath(text, against: directory)
        for part in full.split(separator: "/") {
            if part == "." { continue }
            if part == ".." { _ = parts.popLast(); continue }
            parts.append(part)
        }
        return (full.hasPrefix("/") ? "/" : "") + parts.joined(separator: "/")
    }

    mutating func manifest(_ bytes: [UInt8]) throws(UsageError) -> PluginManifest {
        let root: JSONValue
        do { root = try JSONValue.parse(bytes) } catch { throw UsageError(message: "plugin manifest \(source): not JSON: \(error)") }
        let o = try object(root, "", keys: ["manifest", "name", "description", "executable", "interpreter", "files", "profile", "resources", "settings"])
        let version = try unsigned(o["manifest"], "manifest")
        guard version == UInt64(PluginManifest.formatVersion) else {
            throw fail("manifest", "format version \(version) is not one this hv reads (it reads \(PluginManifest.formatVersion))")
        }
        let name = try string(o["name"], "name")
        guard PluginManifest.isInstanceName(name) else {
            throw fail("name", "'\(name)' must be 1 to 32 of a-z, 0-9 and -")
        }
        let description = o["description"] == nil ? "" : try string(o["description"], "description")
        guard !description.contains("\n") else { throw fail("description", "must be one line") }
        let executable = try string(o["executable"], "executable")
        guard !executable.isEmpty else { throw fail("executable", "is empty") }
        var interpreter: PluginManifest.Interpreter?
        if let value = o["interpreter"] {
            let i = try object(value, "interpreter", keys: ["path", "arguments", "read_only_paths"])
            let path = try string(i["path"], "interpreter.path")
            guard path.hasPrefix("/") else { throw fail("interpreter.path", "'\(path)' must be absolute (an interpreter is a host program, not part of the plugin)") }
            var arguments: [String] = []
            for (n, a) in try array(i["arguments"], "interpreter.arguments").enumerated() { arguments.append(try string(a, "interpreter.arguments[\(n)]")) }
            var readOnly: [String] = []
            for (n, p) in try array(i["read_only_paths"], "interpreter.read_only_paths").enumerated() {
                let text = try string(p, "interpreter.read_only_paths[\(n)]")
                guard text.hasPrefix("/"), text != "/", !text.split(separator: "/").contains("..") else {
                    throw fail("interpreter.read_only_paths[\(n)]", "'\(text)' must be an absolute path below / without '..'")
                }
                readOnly.append(text)
            }
            interpreter = .init(path: path, arguments: arguments, readOnlyPaths: readOnly)
        }
        var files: [String] = []
        for (n, f) in try array(o["files"], "files").enumerated() {
            guard interpreter != nil else { throw fail("files", "only an interpreted plugin (with \"interpreter\") brings files; a binary is opened by hv") }
            let text = try string(f, "files[\(n)]")
            let base = text.split(separator: "/").last.map(String.init) ?? ""
            guard !base.isEmpty, base != "..", base != "." else { throw fail("files[\(n)]", "'\(text)' does not name a file") }
            files.append(path(text))
        }
        let names = ([executable] + files).map { $0.split(separator: "/").last.map(String.init) ?? "" }
        if let twice = names.first(where: { n in names.filter { $0 == n }.count > 1 }) {
            throw fail("files", "two files are named '\(twice)'; they sit side by side in the jail")
        }
        let profile = try string(o["profile"], "profile")
        let resources = try self.resources(o["resources"])
        let settings = try self.settings(o["settings"])
        return PluginManifest(source: source, name: name, description: description, executable: path(executable),
                              interpreter: interpreter, files: files, profile: path(profile), resources: resources, settings: settings)
    }

    func resources(_ value: JSONValue?) throws(UsageError) -> PluginManifest.Resources {
        var r = PluginManifest.Resources()
        guard let value else { return r }
        let o = try object(value, "resources", keys: ["pio", "mmio", "pci", "irqs", "guest_memory"])
        for (n, entry) in try array(o["pio"], "resources.pio").enumerated() {
            let field = "resources.pio[\(n)]"
            let e = try object(entry, field, keys: ["base", "length"])
            let base = try unsigned(e["base"], field + ".base", maximum: 0xFFFF)
            let length = try unsigned(e["length"], field + ".length", maximum: 0x10000)
            guard length > 0, base + length <= 0x10000 else { throw fail(field, "must be 1 or more ports inside the 64 KiB port space") }
            r.pio.append(.init(base: base, length: length))
        }
        for (n, entry) in try array(o["mmio"], "resources.mmio").enumerated() {
            let field = "resources.mmio[\(n)]"
            let e = try object(entry, field, keys: ["base", "length"])
            let base = try unsigned(e["base"], field + ".base")
            let length = try unsigned(e["length"], field + ".length")
            // Between the top of low RAM and the IOAPIC: never RAM, the ROM or the interrupt controllers.
            guard length > 0, base >= 0xC000_0000, base <= 0xFEC0_0000 - length else {
                throw fail(field, "must lie inside [0xc0000000, 0xfec00000), the window above low RAM and below the IOAPIC")
            }
            r.mmio.append(.init(base: base, length: length))
        }
        if let value = o["pci"] {
            let p = try object(value, "resources.pci", keys: ["slot", "bars"])
            let slot = try string(p["slot"], "resources.pci.slot")
            guard let bdf = PluginManifest.pciSlot(slot) else {
                throw fail("resources.pci.slot", "'\(slot)' must be DEVICE.FUNCTION on bus 0, device 01-1f in hex, e.g. 05.0")
            }
            var bars: [PluginManifest.BAR] = []
            for (n, entry) in try array(p["bars"], "resources.pci.bars").enumerated() {
                let field = "resources.pci.bars[\(n)]"
                let e = try object(entry, field, keys: ["index", "type", "size"])
                let index = Int(try unsigned(e["index"], field + ".index", maximum: 5))
                guard !bars.contains(where: { $0.index == index }) else { throw fail(field + ".index", "BAR \(index) is declared twice") }
                guard let kind = PluginManifest.BAR.Kind(rawValue: try string(e["type"], field + ".type")) else {
                    throw fail(field + ".type", "use mmio or pio")
                }
                let size = try unsigned(e["size"], field + ".size")
                let range: ClosedRange<UInt64> = kind == .mmio ? 16...(1 << 30) : 4...256
                guard size.nonzeroBitCount == 1, range.contains(size) else {
                    throw fail(field + ".size", "a \(kind.rawValue) BAR is a power of two from \(range.lowerBound) to \(range.upperBound) bytes")
                }
                bars.append(.init(index: index, kind: kind, size: size))
            }
            r.pci = .init(device: bdf >> 3, function: bdf & 7, bars: bars)
        }
        for (n, entry) in try array(o["irqs"], "resources.irqs").enumerated() {
            let irq = UInt32(try unsigned(entry, "resources.irqs[\(n)]", maximum: 23))
            guard !r.irqs.contains(irq) else { throw fail("resources.irqs[\(n)]", "IRQ \(irq) is listed twice") }
            r.irqs.append(irq)
        }
        if let value = o["guest_memory"] {
            guard case .bool(let b) = value else { throw fail("resources.guest_memory", "expected true or false") }
            r.guestMemory = b
        }
        return r
    }

    func settings(_ value: JSONValue?) throws(UsageError) -> [PluginManifest.Setting] {
        guard let value else { return [] }
        guard case .object(let o) = value else { throw fail("settings", "expected an object of settings by name") }
        var result: [PluginManifest.Setting] = []
        for member in o.members {
            let field = "settings.\(member.key)"
            guard !member.key.isEmpty, member.key.utf8.allSatisfy({ (0x61...0x7a).contains($0) || (0x30...0x39).contains($0) || $0 == 0x5f || $0 == 0x2d }) else {
                throw fail(field, "a setting's name is a-z, 0-9, _ and -")
            }
            guard !PluginManifest.reservedKeys.contains(member.key), !(member.key.hasPrefix("bar") && member.key.count == 4) else {
                throw fail(field, "'\(member.key)' is --device's own key; name the setting otherwise")
            }
            let s = try object(member.value, field, keys: ["type", "default", "minimum", "maximum", "choices", "description"])
            guard let kind = PluginManifest.Setting.Kind(rawValue: try string(s["type"], field + ".type")) else {
                throw fail(field + ".type", "use string, integer or boolean")
            }
            var setting = PluginManifest.Setting(name: member.key, kind: kind, defaultValue: nil, minimum: nil, maximum: nil, choices: [],
                                                 description: s["description"] == nil ? "" : try string(s["description"], field + ".description"))
            for (key, bound) in [("minimum", s["minimum"]), ("maximum", s["maximum"])] {
                guard let bound else { continue }
                guard kind == .integer else { throw fail("\(field).\(key)", "only an integer setting has one") }
                guard case .number(let n) = bound, let v = n.int64Value else { throw fail("\(field).\(key)", "expected an integer") }
                if key == "minimum" { setting.minimum = v } else { setting.maximum = v }
            }
            if let lo = setting.minimum, let hi = setting.maximum, lo > hi { throw fail(field, "minimum \(lo) is above maximum \(hi)") }
            for (n, c) in try array(s["choices"], field + ".choices").enumerated() {
                guard kind == .string else { throw fail(field + ".choices", "only a string setting has choices") }
                setting.choices.append(try string(c, "\(field).choices[\(n)]"))
            }
            if let d = s["default"] {
                let text: String
                switch (kind, d) {
                case (.string, .string(let v)): text = v
                case (.integer, .number(let v)) where v.int64Value != nil: text = v.literal
                case (.boolean, .bool(let v)): text = v ? "true" : "false"
                default: throw fail(field + ".default", "expected \(kind == .integer ? "an" : "a") \(kind.rawValue)")
                }
                switch setting.value(text) {
                case .success(let v): setting.defaultValue = v
                case .failure(let problem): throw fail(field + ".default", "\(problem)")
                }
            }
            result.append(setting)
        }
        return result
    }
}

extension PluginManifest {
    /// `DD.F` on bus 0 as a device << 3 | function number.
    static func pciSlot(_ text: some StringProtocol) -> UInt16? {
        let parts = text.split(separator: ".")
        guard parts.count == 2, parts[0].count <= 2, let device = UInt16(parts[0], radix: 16), let function = UInt16(parts[1]),
              (1...31).contains(device), function < 8 else { return nil }
        return device << 3 | function
    }
}

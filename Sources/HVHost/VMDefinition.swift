import FoundationEssentials
import Glibc
import HVCore
import HVSys

/// A VM as a document: everything needed to build and run it, and nothing about how it was asked
/// for. `hvctl run` builds one from its flags (`--print-config` prints it), `hvctl run --config`
/// reads one from a file, and the API service takes the same JSON. Unknown keys and wrong types
/// are refused with the key's path (`VMDefinition.decode`).
///
/// Paths are kept as given; `resolvingPaths(against:)` makes them absolute, which `--print-config`
/// does so the document means the same from any directory.
public struct VMDefinition: Codable, Equatable, Sendable {
    /// The VM's name in the run directory (`hvctl ls`, `status`, `stop`); nil: `vm-PID`.
    public var name: String?
    /// Guest RAM in MiB.
    public var memoryMiB: UInt64 = 256
    public var cpus: Int = 1
    public var boot = Boot()
    /// What a guest's reset request does: reboot the VM afresh, or stop it (exit 0).
    public var onReset: ResetAction = .reboot
    public var disks: [Disk] = []
    /// An ISO image in the CD-ROM drive; nil: no drive.
    public var cdrom: String?
    public var nics: [NIC] = []
    public var serial = Serial()
    /// Where the 0x402 debug port (SeaBIOS's log) is written; nil: discarded.
    public var debugcon: String?
    /// The tenant whose uid/gid the devices run as; nil: a fresh one per VM.
    public var tenant: String?
    /// False runs every device unconfined (debugging only; hvctl says so loudly).
    public var sandbox: Bool = true
    /// Third-party device processes, each `PATH,profile=FILE[,…]` as `--device` takes it.
    public var devices: [String] = []
    /// A directory every file the guest gets (kernel, initrd, multiboot image, disks and their
    /// backing files, ISOs) must resolve beneath, symbolic links and ".." included (checked by the
    /// kernel when each is opened); the system's SeaBIOS is allowed too. hvd sets it for a
    /// tenant's VMs, so a tenant names only files in its own directory. nil: no confinement.
    public var confinement: String?
    /// CPU, memory and process limits, enforced by the VM's cgroups; nil: hv's defaults.
    public var limits: Limits?
    /// A memory balloon device; nil: none.
    public var balloon: Balloon?

    public init() {}

    /// How the VM boots. With none of `firmware`, `kernel`, `multiboot`: hv's built-in demo guest.
    public struct Boot: Codable, Equatable, Sendable {
        /// Debian's SeaBIOS, what `--firmware seabios` means.
        public static let systemSeaBIOS = "/usr/share/seabios/bios-256k.bin"
        /// A BIOS image at the reset vector (SeaBIOS: `/usr/share/seabios/bios-256k.bin`).
        public var firmware: String?
        /// Let the firmware show its boot menu.
        public var menu: Bool = false
        /// A Linux bzImage, booted by the x86 boot protocol.
        public var kernel: String?
        /// Initial ramdisk for `kernel`.
        public var initrd: String?
        /// A multiboot v1 kernel.
        public var multiboot: String?
        /// The kernel's command line (`kernel`, `multiboot`).
        public var cmdline: String = ""
        public init() {}

        /// The boot mode's name, as `hvctl status` shows it.
        public var mode: String {
            firmware != nil ? "firmware" : kernel != nil ? "linux" : multiboot != nil ? "multiboot" : "demo"
        }
    }

    public enum ResetAction: String, Codable, Equatable, Sendable, CaseIterable {
        case reboot, stop
    }

    public struct Disk: Codable, Equatable, Sendable {
        public var path: String
        public var readonly: Bool = false
        /// The image's format; nil: detected from its content.
        public var format: DiskFormat?
        /// The guest's requests to this disk, metered; nil: unlimited.
        public var rateLimit: RateLimit?
        public init(path: String, readonly: Bool = false, format: DiskFormat? = nil, rateLimit: RateLimit? = nil) {
            self.path = path
            self.readonly = readonly
            self.format = format
            self.rateLimit = rateLimit
        }
    }

    /// The disk image formats hv reads and writes.
    public enum DiskFormat: String, Codable, Equatable, Sendable, CaseIterable {
        case raw, qcow2
    }

    /// A virtio-net NIC on a host tap or a private segment (exactly one of the two).
    public struct NIC: Codable, Equatable, Sendable {
        public var tap: String?
        public var segment: String?
        /// `52:54:00:12:34:56`; nil: derived from the VM's name and the NIC's index.
        public var mac: String?
        /// The host bridge the tap joins when the VM starts (tap only); nil: none.
        public var bridge: String?
        /// Other tenants whose VMs may join the segment, if this NIC creates it (segment only).
        /// A segment otherwise admits only VMs of the tenant that created it.
        public var sharedWith: [String]?
        /// Frames the guest receives, metered; nil: unlimited.
        public var rxRateLimit: RateLimit?
        /// Frames the guest sends, metered; nil: unlimited.
        public var txRateLimit: RateLimit?
        public init(tap: String? = nil, segment: String? = nil, mac: String? = nil, bridge: String? = nil, sharedWith: [String]? = nil,
                    rxRateLimit: RateLimit? = nil, txRateLimit: RateLimit? = nil) {
            self.tap = tap
            self.segment = segment
            self.mac = mac
            self.bridge = bridge
            self.sharedWith = sharedWith
            self.rxRateLimit = rxRateLimit
            self.txRateLimit = txRateLimit
        }
    }

    public struct Serial: Codable, Equatable, Sendable {
        public enum Output: String, Codable, Equatable, Sendable, CaseIterable {
            /// hvctl's terminal (keystrokes go to the guest); the VM cannot be detached.
            case stdio
            /// A file (`path`).
            case file
            /// RUN_DIR/NAME.log, and attachable with `hvctl console NAME` (what `--detach` uses).
            case console
            /// Discarded.
            case none
        }
        public var output: Output = .stdio
        /// The console file, for `output: file`.
        public var path: String?
        public init(output: Output = .stdio, path: String? = nil) {
            self.output = output
            self.path = path
        }
    }

    // MARK: Limits

    /// The longest command line: it travels in the BIOS device's settings, which the protocol caps
    /// at 4096 bytes with room kept for the other settings. Linux takes 2048 bytes unless built
    /// with a larger COMMAND_LINE_SIZE.
    public static let maximumCommandLineBytes = 3072
    public static let maximumDisks = 8
    public static let maximumNICs = 4
    /// Smallest guest RAM.
    public static let minimumMemoryMiB: UInt64 = 4
}

// MARK: Validation

extension VMDefinition {
    /// How a validation error names a field: by its `hvctl run` flag, or by its key path in the
    /// JSON document.
    public enum Naming: Sendable {
        case flags
        case keys
    }

    /// Checks every rule a definition must meet before anything is opened; the error names the
    /// field the way `naming` says. Host files are checked later, when they are opened.
    public func validate(naming: Naming) throws(UsageError) {
        let flags = naming == .flags
        func field(_ flag: String, _ key: String) -> String { flags ? flag : key }
        if let name { try RunDirectory.validate(name, flag: field("--name", "name")) }
        guard (1...Machine.maximumCPUs).contains(cpus) else {
            throw UsageError(message: "invalid \(field("--cpus", "cpus")) '\(cpus)': use a whole number from 1 to \(Machine.maximumCPUs)")
        }
        guard memoryMiB >= Self.minimumMemoryMiB else {
            throw UsageError(message: "\(field("--memory", "memory_mib")) \(memoryMiB)\(flags ? "M" : "") is too small: a guest needs at least \(Self.minimumMemoryMiB)M")
        }
        guard memoryMiB <= UInt64(1) << 32 else {
            throw UsageError(message: "\(field("--memory", "memory_mib")) \(memoryMiB)\(flags ? "M" : "") is too large")
        }
        let boots = [(field("--firmware", "boot.firmware"), boot.firmware), (field("--multiboot", "boot.multiboot"), boot.multiboot),
                     (field("--kernel", "boot.kernel"), boot.kernel)].filter { $0.1 != nil }.map(\.0)
        if boots.count > 1 {
            throw UsageError(message: "\(boots.joined(separator: " and ")) each choose how the VM boots: give one")
        }
        if boot.initrd != nil && boot.kernel == nil {
            throw UsageError(message: "\(field("--initrd", "boot.initrd")) needs \(field("--kernel", "boot.kernel")) (an initial ramdisk is for a Linux kernel)")
        }
        for (key, value) in [("boot.firmware", boot.firmware), ("boot.kernel", boot.kernel), ("boot.initrd", boot.initrd),
                             ("boot.multiboot", boot.multiboot), ("cdrom", cdrom), ("debugcon", debugcon), ("serial.path", serial.path)] {
            if let value, value.isEmpty { throw UsageError(message: "\(flags ? "a path" : key) is empty: give a file's path") }
        }
        guard !boot.cmdline.contains("\n"), !boot.cmdline.contains("\0") else {
            throw UsageError(message: "\(field("--cmdline", "boot.cmdline")) must not contain newlines or NUL bytes")
        }
        guard boot.cmdline.utf8.count <= Self.maximumCommandLineBytes else {
            throw UsageError(message: "\(field("--cmdline", "boot.cmdline")) is \(boot.cmdline.utf8.count) bytes: at most \(Self.maximumCommandLineBytes) are passed to the guest")
        }
        switch serial.output {
        case .file:
            guard serial.path != nil else { throw UsageError(message: "\(field("--serial file:", "serial.path")) is missing: give the console file's path") }
        case .stdio, .none, .console:
            guard serial.path == nil else { throw UsageError(message: "serial.path is only for serial.output \"file\"") }
        }
        guard disks.count <= Self.maximumDisks else { throw UsageError(message: "at most \(Self.maximumDisks) \(field("--disk", "disks")) images") }
        for (i, disk) in disks.enumerated() where disk.path.isEmpty || disk.path.hasPrefix(",") {
            throw UsageError(message: "invalid \(field("--disk", "disks[\(i)].path")) '\(disk.path)': use PATH[,readonly][,format=raw|qcow2]")
        }
        guard nics.count <= Self.maximumNICs else { throw UsageError(message: "at most \(Self.maximumNICs) \(field("--nic", "nics")) per VM") }
        for (i, nic) in nics.enumerated() {
            _ = try nic.option(where: field("--nic", "nics[\(i)]"))
            try nic.rxRateLimit?.validate(field: field("--nic \(i) rx", "nics[\(i)].rx_rate_limit"))
            try nic.txRateLimit?.validate(field: field("--nic \(i) tx", "nics[\(i)].tx_rate_limit"))
        }
        for (i, disk) in disks.enumerated() { try disk.rateLimit?.validate(field: field("--disk \(i)", "disks[\(i)].rate_limit")) }
        if let confinement {
            guard confinement.utf8.first == UInt8(ascii: "/"), !confinement.utf8.contains(0) else {
                throw UsageError(message: "confine_files_to '\(confinement)' must be an absolute path")
            }
            let root = confinement.hasSuffix("/") ? confinement : confinement + "/"
            var guestFiles = [("boot.kernel", boot.kernel), ("boot.initrd", boot.initrd), ("boot.multiboot", boot.multiboot), ("cdrom", cdrom)]
            if boot.firmware != Boot.systemSeaBIOS { guestFiles.append(("boot.firmware", boot.firmware)) }
            guestFiles += disks.enumerated().map { ("disks[\($0.offset)].path", $0.element.path) }
            for case let (key, path?) in guestFiles where !path.utf8.starts(with: root.utf8) || path.split(separator: "/").contains("..") {
                throw UsageError(message: "\(key) '\(path)' is not beneath \(confinement): this VM's files must be there")
            }
        }
        if let tenant {
            guard (1...64).contains(tenant.utf8.count), tenant.utf8.allSatisfy(RunDirectory.isNameByte) else {
                throw UsageError(message: "invalid \(field("--tenant", "tenant")) '\(tenant)': use 1 to 64 letters, digits, '.', '_' or '-'")
            }
        }
        try limits?.validate { flags ? $0.flag : "limits.\($0.rawValue)" }
        try balloon?.validate { flags ? "--balloon \($0 == .sizeMiB ? "size" : "stats")" : "balloon.\($0.rawValue)" }
        if flags { try balloon?.checkFits(guestMemoryMiB: memoryMiB) { _ in "--balloon size" } }
        // Flags are checked as a whole at once; a document's limit against its RAM at start.
        if flags { try limits?.checkFits(guestMemoryMiB: memoryMiB) { $0.flag } }
    }

    /// The same definition with every host path made absolute against `directory` (a config
    /// file's directory, or the current one).
    public func resolvingPaths(against directory: String) -> VMDefinition {
        func resolve(_ path: String?) -> String? { path.map { absolutePath($0, against: directory) } }
        var copy = self
        copy.boot.firmware = resolve(boot.firmware)
        copy.boot.kernel = resolve(boot.kernel)
        copy.boot.initrd = resolve(boot.initrd)
        copy.boot.multiboot = resolve(boot.multiboot)
        copy.cdrom = resolve(cdrom)
        copy.debugcon = resolve(debugcon)
        copy.serial.path = resolve(serial.path)
        for i in copy.disks.indices { copy.disks[i].path = absolutePath(disks[i].path, against: directory) }
        copy.devices = devices.map { spec in
            // The executable is the first field, `profile=` names a file too.
            var parts = spec.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            guard !parts.isEmpty else { return spec }
            parts[0] = absolutePath(parts[0], against: directory)
            for j in parts.indices.dropFirst() where parts[j].hasPrefix("profile=") {
                parts[j] = "profile=" + absolutePath(String(parts[j].dropFirst(8)), against: directory)
            }
            return parts.joined(separator: ",")
        }
        return copy
    }

    /// Every host path the definition names, with its key path (`disks[1].path`): what a service
    /// that takes definitions over an API checks before it keeps one.
    public var hostPaths: [(key: String, path: String)] {
        var paths: [(key: String, path: String)] = []
        for (key, value) in [("boot.firmware", boot.firmware), ("boot.kernel", boot.kernel), ("boot.initrd", boot.initrd),
                             ("boot.multiboot", boot.multiboot), ("cdrom", cdrom), ("debugcon", debugcon), ("serial.path", serial.path)] {
            if let value { paths.append((key, value)) }
        }
        for (i, disk) in disks.enumerated() { paths.append(("disks[\(i)].path", disk.path)) }
        for (i, spec) in devices.enumerated() {
            let parts = spec.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            if let binary = parts.first { paths.append(("devices[\(i)]", binary)) }
            for part in parts.dropFirst() where part.hasPrefix("profile=") { paths.append(("devices[\(i)] profile", String(part.dropFirst(8)))) }
        }
        return paths
    }
}

extension VMDefinition.NIC {
    /// What `--nic` takes, for error messages.
    public static let flagHint = "use tap=IFNAME[,bridge=BRIDGE] or net=SEGMENT[,shared=TENANT+…], optionally followed by ,mac=52:54:00:xx:xx:xx and rate limits ,rx_bps=RATE,tx_bps=RATE,rx_pps=N,tx_pps=N"

    /// The attachment this NIC names, checked; `what` names it in errors.
    func option(where what: String) throws(UsageError) -> NICOption {
        var spec: String
        switch (tap, segment) {
        case (let tap?, nil): spec = "tap=\(tap)"
        case (nil, let segment?): spec = "net=\(segment)"
        default: throw UsageError(message: "\(what) needs exactly one of tap or segment")
        }
        if let mac { spec += ",mac=\(mac)" }
        if let bridge { spec += ",bridge=\(bridge)" }
        if let sharedWith {
            guard segment != nil, !sharedWith.isEmpty else { throw UsageError(message: "\(what): shared_with lists tenants (at least one) and is for a segment only") }
            spec += ",shared=" + sharedWith.joined(separator: "+")
        }
        return try NICOption.parse(spec, what: what)
    }
}

// MARK: JSON

extension VMDefinition {
    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, memoryMiB = "memory_mib", cpus, boot, onReset = "on_reset", disks, cdrom, nics, serial, debugcon, tenant, sandbox, devices
        case confinement = "confine_files_to"
        case limits, balloon
    }

    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decodeIfPresent(String.self, forKey: .name)
        memoryMiB = try c.decodeIfPresent(UInt64.self, forKey: .memoryMiB) ?? memoryMiB
        cpus = try c.decodeIfPresent(Int.self, forKey: .cpus) ?? cpus
        boot = try c.decodeIfPresent(Boot.self, forKey: .boot) ?? boot
        onReset = try c.decodeIfPresent(ResetAction.self, forKey: .onReset) ?? onReset
        disks = try c.decodeIfPresent([Disk].self, forKey: .disks) ?? []
        cdrom = try c.decodeIfPresent(String.self, forKey: .cdrom)
        nics = try c.decodeIfPresent([NIC].self, forKey: .nics) ?? []
        serial = try c.decodeIfPresent(Serial.self, forKey: .serial) ?? serial
        debugcon = try c.decodeIfPresent(String.self, forKey: .debugcon)
        tenant = try c.decodeIfPresent(String.self, forKey: .tenant)
        sandbox = try c.decodeIfPresent(Bool.self, forKey: .sandbox) ?? true
        devices = try c.decodeIfPresent([String].self, forKey: .devices) ?? []
        confinement = try c.decodeIfPresent(String.self, forKey: .confinement)
        limits = try c.decodeIfPresent(Limits.self, forKey: .limits)
        balloon = try c.decodeIfPresent(Balloon.self, forKey: .balloon)
    }

    /// Reads a definition from JSON; an error is one line naming the key path (`disks[1].readonly`).
    public static func decode(_ bytes: [UInt8]) throws(UsageError) -> VMDefinition {
        do {
            return try JSONDecoder().decode(VMDefinition.self, from: Data(bytes))
        } catch let error as DecodingError {
            throw UsageError(message: describe(error))
        } catch {
            throw UsageError(message: "\(error)")
        }
    }

    /// The definition as pretty-printed JSON with sorted keys.
    public func encoded() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(self) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    package static func describe(_ error: DecodingError) -> String {
        func path(_ keys: [any CodingKey]) -> String {
            var text = ""
            for key in keys {
                if let index = key.intValue { text += "[\(index)]" } else { text += (text.isEmpty ? "" : ".") + key.stringValue }
            }
            return text.isEmpty ? "the document" : "'\(text)'"
        }
        switch error {
        case .typeMismatch(let type, let context):
            return "\(path(context.codingPath)) must be \(typeName(type))"
        case .valueNotFound(let type, let context):
            return "\(path(context.codingPath)) must be \(typeName(type)), not null"
        case .keyNotFound(let key, let context):
            return "\(path(context.codingPath + [key])) is missing"
        case .dataCorrupted(let context):
            if context.codingPath.isEmpty { return "not valid JSON: \(context.debugDescription)" }
            return "\(path(context.codingPath)): \(context.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }

    static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: "a string"
        case is Bool.Type: "true or false"
        case is Int.Type, is UInt64.Type: "a whole number"
        case is [Any].Type, is [Disk].Type, is [NIC].Type, is [String].Type: "an array"
        default: "an object"
        }
    }
}

extension VMDefinition.Boot {
    enum CodingKeys: String, CodingKey, CaseIterable { case firmware, menu, kernel, initrd, multiboot, cmdline }
    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        firmware = try c.decodeIfPresent(String.self, forKey: .firmware)
        menu = try c.decodeIfPresent(Bool.self, forKey: .menu) ?? false
        kernel = try c.decodeIfPresent(String.self, forKey: .kernel)
        initrd = try c.decodeIfPresent(String.self, forKey: .initrd)
        multiboot = try c.decodeIfPresent(String.self, forKey: .multiboot)
        cmdline = try c.decodeIfPresent(String.self, forKey: .cmdline) ?? ""
    }
}

extension VMDefinition.Disk {
    enum CodingKeys: String, CodingKey, CaseIterable { case path, readonly, format, rateLimit = "rate_limit" }
    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        path = try c.decode(String.self, forKey: .path)
        readonly = try c.decodeIfPresent(Bool.self, forKey: .readonly) ?? false
        format = try c.decodeIfPresent(VMDefinition.DiskFormat.self, forKey: .format)
        rateLimit = try c.decodeIfPresent(VMDefinition.RateLimit.self, forKey: .rateLimit)
    }
}

extension VMDefinition.NIC {
    enum CodingKeys: String, CodingKey, CaseIterable {
        case tap, segment, mac, bridge, sharedWith = "shared_with", rxRateLimit = "rx_rate_limit", txRateLimit = "tx_rate_limit"
    }
    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        tap = try c.decodeIfPresent(String.self, forKey: .tap)
        segment = try c.decodeIfPresent(String.self, forKey: .segment)
        mac = try c.decodeIfPresent(String.self, forKey: .mac)
        bridge = try c.decodeIfPresent(String.self, forKey: .bridge)
        sharedWith = try c.decodeIfPresent([String].self, forKey: .sharedWith)
        rxRateLimit = try c.decodeIfPresent(VMDefinition.RateLimit.self, forKey: .rxRateLimit)
        txRateLimit = try c.decodeIfPresent(VMDefinition.RateLimit.self, forKey: .txRateLimit)
    }
}

extension VMDefinition.Serial {
    enum CodingKeys: String, CodingKey, CaseIterable { case output, path }
    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        output = try c.decodeIfPresent(Output.self, forKey: .output) ?? .stdio
        path = try c.decodeIfPresent(String.self, forKey: .path)
    }
}

/// Any key, to list the keys an object has.
struct AnyCodingKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

extension Decoder {
    /// Throws for the first key of this object not in `known`, with its full path: a misspelt
    /// key is an error, not a silently ignored setting. A null value is refused too: every key is
    /// optional, so a key is left out, never null (encoders here never write null); except with
    /// `allowingNull`, for APIs whose clients send null for "not given" (Firecracker's).
    package func refuseUnknownKeys(_ known: [String], allowingNull: Bool = false) throws {
        let c = try container(keyedBy: AnyCodingKey.self)
        for key in c.allKeys.sorted(by: { $0.stringValue < $1.stringValue }) {
            guard known.contains(key.stringValue) else {
                throw DecodingError.dataCorrupted(.init(codingPath: codingPath + [key],
                                                        debugDescription: "unknown key (known: \(known.joined(separator: ", ")))"))
            }
            if !allowingNull, try c.decodeNil(forKey: key) {
                throw DecodingError.dataCorrupted(.init(codingPath: codingPath + [key], debugDescription: "null is not a value here; leave the key out"))
            }
        }
    }
}

/// `path` made absolute against `directory`.
extension VMDefinition {
    /// A definition file that could not be read (status 1; a bad document is a `UsageError`).
    public struct LoadError: Error {
        public let message: String
    }

    /// Reads, checks and resolves the definition in file `path` (`hvctl run --config`): `name`
    /// replaces the file's, and relative paths in it are relative to the file.
    public static func load(_ path: String, name: String? = nil) throws -> VMDefinition {
        let bytes: [UInt8]
        do {
            bytes = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: 1 << 20).readAll()
        } catch {
            throw LoadError(message: "cannot read VM definition '\(path)': \(error)")
        }
        var definition: VMDefinition
        do throws(UsageError) {
            definition = try VMDefinition.decode(bytes)
            if let name { definition.name = name }
            try definition.validate(naming: .keys)
        } catch {
            throw UsageError(message: "VM definition '\(path)': \(error.message)")
        }
        let absolute = absolutePath(path)
        let directory = absolute.lastIndex(of: "/").map { String(absolute[..<$0]) } ?? "."
        return definition.resolvingPaths(against: directory.isEmpty ? "/" : directory)
    }
}

public func absolutePath(_ path: String, against directory: String) -> String {
    path.utf8.first == UInt8(ascii: "/") || directory.isEmpty ? path : (directory.hasSuffix("/") ? directory : directory + "/") + path
}

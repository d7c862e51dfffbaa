// Sandbox profiles: the model and loader for the files in sandbox-profiles/ (one per device), which say
// which namespaces, rlimits and seccomp allowlist a device process gets. See DESIGN-BRIEF.md "Sandbox".
//
// File format (format version 1), one JSON object per file:
//
//     {
//       "profile": "serial",                       required, [a-z0-9-]+, at most 64 characters
//       "version": 1,                              required, the profile *format* version: must be 1
//       "description": "16550A UART …",            optional one line of text (default "")
//       "namespaces": ["user", "pid", "mount"],    required; subset of user pid mount net ipc uts cgroup
//       "rlimits": { "nofile": 32, "nproc": 0, "core": 0, "fsize": "unlimited", "as_extra_mib": 512 },
//                                                  optional, every key optional (defaults below)
//       "startup_syscalls": ["openat", "execve"],  optional: allowed from exec until the device locks down
//       "syscalls": [ "read",                      required: the steady-state allowlist
//         { "name": "ioctl", "allow_if": [ { "arg": 1, "op": "eq", "value": "0x5421" } ] } ],
//       "enosys": ["clone3"]                       optional: fail with ENOSYS instead of trapping, in both
//                                                  stages, so libc falls back to an older call (clone3 →
//                                                  clone, which the allowlist can filter by its flags)
//     }
//
// A syscall entry is a bare name (always allowed) or {"name", "allow_if": [conditions]}: the conditions
// of one entry are AND-ed, several entries with the same name are OR-ed. A condition is
// {"arg": 0…5, "op": eq|ne|lt|le|gt|ge|masked_eq, "value": V[, "mask": M]} where V and M are
// non-negative integers or "0x…" hex strings that fit in 64 bits; "mask" is required with masked_eq and
// allowed with nothing else. The loader is strict: unknown keys, duplicate entries, a bare name next to a
// conditional entry of the same syscall in the same list, and a start-up entry for a syscall `syscalls`
// already allows unconditionally are all errors, each reported on one line as
// "<source>: <what is wrong> (<field path>)".
//
// No Foundation.

/// One device's sandbox profile: its jail settings and seccomp allowlists, as loaded from
/// `sandbox-profiles/<device>.json` by `load(json:source:resolveSyscall:)`.
public struct SandboxProfile: Equatable, Sendable {
    /// The profile file format version this loader reads.
    public static let formatVersion = 1

    /// The profile's name (`[a-z0-9-]+`), normally the device's name.
    public let name: String
    /// The profile file format version (always `formatVersion` for a loaded profile).
    public let version: Int
    /// One line saying what the device is; may be empty.
    public let description: String
    /// The namespaces the device process gets, in file order, without duplicates.
    public let namespaces: [Namespace]
    /// The rlimits the device process gets.
    public let limits: ResourceLimits
    /// Rules in force only from exec until the device locks itself down (dynamic loader, runtime
    /// start-up), in file order. During start-up `syscalls` apply as well; see `startupRules`.
    public let startupSyscalls: [SyscallRule]
    /// The steady-state allowlist, in file order: rules in force for the device's whole life.
    public let syscalls: [SyscallRule]
    /// Syscalls that fail with ENOSYS (both stages) instead of stopping the device: for libc's
    /// fallbacks, e.g. `clone3`, whose flags seccomp cannot inspect, so pthread_create uses `clone`.
    public let enosysSyscalls: [SyscallRule]
    /// The base profiles this one was built on, by name, in file order (already merged in).
    public var includes: [String] = []

    /// A profile from its parts. `load(json:source:resolveSyscall:)` is the checked way to get one; this
    /// initializer checks nothing.
    public init(name: String, version: Int = SandboxProfile.formatVersion, description: String,
                namespaces: [Namespace], limits: ResourceLimits, startupSyscalls: [SyscallRule], syscalls: [SyscallRule],
                enosysSyscalls: [SyscallRule] = []) {
        self.enosysSyscalls = enosysSyscalls
        self.name = name
        self.version = version
        self.description = description
        self.namespaces = namespaces
        self.limits = limits
        self.startupSyscalls = startupSyscalls
        self.syscalls = syscalls
    }

    /// The number of distinct syscalls allowed after lock-down (distinct names in `syscalls`).
    public var steadyStateSyscallCount: Int { Set(syscalls.map(\.name)).count }

    /// The number of distinct syscalls allowed during start-up (distinct names in `startupSyscalls` ∪
    /// `syscalls`).
    public var startupSyscallCount: Int { Set(syscalls.map(\.name) + startupSyscalls.map(\.name)).count }

    /// The rules in force from exec until lock-down: `syscalls` followed by `startupSyscalls`, where an
    /// unconditional rule for a syscall replaces every conditional rule for the same syscall (it would
    /// allow everything they allow). Rules for one syscall are OR-ed, as in `syscalls`.
    public var startupRules: [SyscallRule] {
        let all = syscalls + startupSyscalls
        let unconditional = Set(all.filter(\.conditions.isEmpty).map(\.name))
        var seen: Set<SyscallRule> = []
        var result: [SyscallRule] = []
        for rule in all where rule.conditions.isEmpty || !unconditional.contains(rule.name) {
            if seen.insert(rule).inserted { result.append(rule) }
        }
        return result
    }
}

/// A Linux namespace a device process is put in.
public enum Namespace: String, CaseIterable, Equatable, Hashable, Sendable {
    /// User namespace (`CLONE_NEWUSER`).
    case user
    /// PID namespace (`CLONE_NEWPID`).
    case pid
    /// Mount namespace (`CLONE_NEWNS`).
    case mount
    /// Network namespace (`CLONE_NEWNET`).
    case net
    /// System V IPC / POSIX message queue namespace (`CLONE_NEWIPC`).
    case ipc
    /// Host name namespace (`CLONE_NEWUTS`).
    case uts
    /// Cgroup namespace (`CLONE_NEWCGROUP`).
    case cgroup

    /// The namespace's `CLONE_NEW*` flag for `clone(2)`/`unshare(2)` (Linux UAPI values).
    public var cloneFlag: Int32 {
        switch self {
        case .user: return 0x1000_0000
        case .pid: return 0x2000_0000
        case .mount: return 0x0002_0000
        case .net: return 0x4000_0000
        case .ipc: return 0x0800_0000
        case .uts: return 0x0400_0000
        case .cgroup: return 0x0200_0000
        }
    }
}

/// The rlimits of a device process. nil means unlimited (`RLIM_INFINITY`).
public struct ResourceLimits: Equatable, Hashable, Sendable {
    /// `RLIMIT_NOFILE`: the number of open file descriptors.
    public let openFiles: UInt64?
    /// `RLIMIT_NPROC`: processes/threads of the device's uid (0: the device cannot fork or make threads).
    public let processes: UInt64?
    /// `RLIMIT_CORE`: the largest core file, in bytes (0: none).
    public let coreBytes: UInt64?
    /// `RLIMIT_FSIZE`: the largest file the process may write, in bytes.
    public let fileSizeBytes: UInt64?
    /// `RLIMIT_AS` beyond guest RAM: MiB added on top of the guest RAM size (which a device may map).
    /// At most `UInt64.max >> 20`.
    public let addressSpaceExtraMiB: UInt64?

    /// The limits used for keys a profile leaves out: nofile 64, nproc 0, core 0, fsize unlimited,
    /// as_extra_mib unlimited.
    public static let defaults = ResourceLimits(openFiles: 64, processes: 0, coreBytes: 0, fileSizeBytes: nil,
                                                addressSpaceExtraMiB: nil)

    /// Limits from their parts.
    public init(openFiles: UInt64?, processes: UInt64?, coreBytes: UInt64?, fileSizeBytes: UInt64?,
                addressSpaceExtraMiB: UInt64?) {
        self.openFiles = openFiles
        self.processes = processes
        self.coreBytes = coreBytes
        self.fileSizeBytes = fileSizeBytes
        self.addressSpaceExtraMiB = addressSpaceExtraMiB
    }

    /// The `RLIMIT_AS` value in bytes for a VM with `guestRAMBytes` of RAM: guest RAM plus
    /// `addressSpaceExtraMiB` MiB, or nil (unlimited) if that is unlimited or does not fit in 64 bits.
    public func addressSpaceLimit(guestRAMBytes: UInt64) -> UInt64? {
        guard let extra = addressSpaceExtraMiB else { return nil }
        let (extraBytes, overflow1) = extra.multipliedReportingOverflow(by: 1 << 20)
        let (total, overflow2) = guestRAMBytes.addingReportingOverflow(extraBytes)
        return overflow1 || overflow2 || total == UInt64.max ? nil : total
    }
}

/// One allowlist entry: a syscall, allowed if all `conditions` hold (always, if there are none).
public struct SyscallRule: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The syscall's name, e.g. `ioctl`.
    public let name: String
    /// Its x86-64 number, as the resolver gave it.
    public let number: Int32
    /// Conditions on its arguments, AND-ed; empty means unconditional.
    public let conditions: [ArgumentCondition]

    /// A rule from its parts.
    public init(name: String, number: Int32, conditions: [ArgumentCondition] = []) {
        self.name = name
        self.number = number
        self.conditions = conditions
    }

    /// The conditions in readable form, `if arg1 == 0x5421 and arg2 != 0`, or "" when unconditional.
    public var conditionText: String {
        conditions.isEmpty ? "" : "if " + conditions.map(\.description).joined(separator: " and ")
    }

    /// `name` or `name if …`.
    public var description: String { conditions.isEmpty ? name : name + " " + conditionText }
}

/// A comparison of one syscall argument with a constant, as libseccomp's `scmp_arg_cmp` does it: on the
/// whole 64-bit argument.
public struct ArgumentCondition: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// How an argument is compared.
    public enum Operation: String, CaseIterable, Equatable, Hashable, Sendable {
        /// argument == value (`SCMP_CMP_EQ`).
        case eq
        /// argument != value (`SCMP_CMP_NE`).
        case ne
        /// argument < value, unsigned (`SCMP_CMP_LT`).
        case lt
        /// argument <= value, unsigned (`SCMP_CMP_LE`).
        case le
        /// argument > value, unsigned (`SCMP_CMP_GT`).
        case gt
        /// argument >= value, unsigned (`SCMP_CMP_GE`).
        case ge
        /// (argument & mask) == value (`SCMP_CMP_MASKED_EQ`).
        case maskedEq = "masked_eq"

        /// The comparison operator as written in `render()`.
        public var symbol: String {
            switch self {
            case .eq, .maskedEq: return "=="
            case .ne: return "!="
            case .lt: return "<"
            case .le: return "<="
            case .gt: return ">"
            case .ge: return ">="
            }
        }
    }

    /// Which argument, 0…5.
    public let argument: Int
    /// The comparison.
    public let operation: Operation
    /// The constant compared with (after masking, for `maskedEq`).
    public let value: UInt64
    /// The mask for `maskedEq`; `UInt64.max` (the whole argument) for every other operation.
    public let mask: UInt64

    /// A condition from its parts; `mask` only matters for `maskedEq`.
    public init(argument: Int, operation: Operation, value: UInt64, mask: UInt64 = UInt64.max) {
        self.argument = argument
        self.operation = operation
        self.value = value
        self.mask = mask
    }

    /// `arg1 == 0x5421`, or `(arg2 & 4) == 0` for `maskedEq`. Numbers below 16 are decimal, others hex.
    public var description: String {
        let subject = operation == .maskedEq ? "(arg\(argument) & \(readableNumber(mask)))" : "arg\(argument)"
        return "\(subject) \(operation.symbol) \(readableNumber(value))"
    }
}

/// Why a profile could not be loaded. `description` is one line:
/// `<source>: <what is wrong> (<field path>)`.
public struct SandboxProfileError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What is wrong.
    public enum Problem: Equatable, Sendable {
        /// The file is not valid JSON.
        case invalidJSON(JSONError)
        /// A required key is missing.
        case missingKey(String)
        /// A key the format does not have; `allowed` lists the keys that are.
        case unknownKey(String, allowed: [String])
        /// A value of the wrong JSON type; `expected` and `found` are phrases such as "a string".
        case wrongType(expected: String, found: String)
        /// `version` is not the format version this loader reads; `found` is the value as written.
        case unsupportedVersion(found: String)
        /// `profile` is not `[a-z0-9-]+` of at most 64 characters.
        case invalidProfileName(String)
        /// `description` is not one line of at most 256 characters.
        case invalidDescription(reason: String)
        /// A namespace name hv does not know.
        case unknownNamespace(String)
        /// A namespace listed twice.
        case duplicateNamespace(String)
        /// A namespace the jail cannot work without is missing.
        case requiredNamespaceMissing(String)
        /// A syscall name that is not `[a-z0-9_]+` of at most 64 characters.
        case invalidSyscallName(String)
        /// A syscall name the resolver does not know; `list` is `syscalls` or `startup_syscalls`.
        case unknownSyscall(name: String, list: String)
        /// The resolver knows the name but it is not a syscall on x86-64 (a negative pseudo-number).
        case notAnX86_64Syscall(name: String, number: Int32)
        /// The same syscall listed bare twice, or the same conditional entry twice, in one list.
        case duplicateSyscall(name: String, list: String)
        /// A bare name and a conditional entry for the same syscall in one list.
        case bareAndConditional(name: String, list: String)
        /// A start-up entry for a syscall `syscalls` already allows unconditionally.
        case alreadyAllowedBySyscalls(name: String)
        /// The file cannot be read: why.
        case unreadable(String)
        /// `include` where the reader resolves no base profiles.
        case includeNotAllowed
        /// A base profile named twice in `include`.
        case duplicateInclude(String)
        /// A base profile that cannot be loaded: what the loader said about it.
        case baseProfile(name: String, reason: String)
        /// An `enosys` entry with conditions, or for a syscall an allowlist also names.
        case enosysConflict(name: String)
        /// An `allow_if` list with no conditions.
        case emptyConditions(name: String)
        /// An `op` that is not one of the allowed operations.
        case unknownOperation(String)
        /// `masked_eq` without `mask`.
        case missingMask
        /// `mask` with an operation other than `masked_eq`.
        case maskWithoutMaskedEq(operation: String)
        /// A `masked_eq` value with bits outside the mask: the condition could never hold.
        case valueOutsideMask(value: UInt64, mask: UInt64)
        /// A number where an integer is required; `found` is the literal.
        case notAnInteger(found: String)
        /// A value outside its range; `found` as written, `allowed` describes the range.
        case outOfRange(found: String, allowed: String)
        /// A string where a "0x…" hex number was expected that is not one.
        case invalidHexString(String)
    }

    /// The file's name as the caller gave it.
    public let source: String
    /// What is wrong.
    public let problem: Problem
    /// Where: the field path, such as `syscalls[3].allow_if[0].op`; "" for the whole document.
    public let path: String

    /// An error in `source` at `path`.
    public init(source: String, problem: Problem, path: String) {
        self.source = source
        self.problem = problem
        self.path = path
    }

    /// The "what is wrong" part of `description`.
    public var message: String {
        switch problem {
        case let .invalidJSON(error): return "invalid JSON: \(error.reason)"
        case let .missingKey(key): return "missing required key \(quotedForMessage(key))"
        case let .unknownKey(key, allowed):
            return "unknown key \(quotedForMessage(key)); allowed keys are \(allowed.joined(separator: ", "))"
        case let .wrongType(expected, found): return "expected \(expected), found \(found)"
        case let .unsupportedVersion(found):
            return "unsupported profile format version \(found); this hv reads profile format version \(SandboxProfile.formatVersion)"
        case let .invalidProfileName(name):
            return "profile name \(quotedForMessage(name)) must be 1 to 64 characters of a-z, 0-9 and '-'"
        case let .invalidDescription(reason): return "description \(reason)"
        case let .unknownNamespace(name):
            return "unknown namespace \(quotedForMessage(name)); known namespaces are "
                + Namespace.allCases.map(\.rawValue).joined(separator: ", ")
        case let .duplicateNamespace(name): return "namespace \(quotedForMessage(name)) is listed twice"
        case let .requiredNamespaceMissing(name):
            return "namespaces must include \(quotedForMessage(name)): the jail maps the tenant's uid in a user namespace and builds the empty root in a mount namespace"
        case let .invalidSyscallName(name):
            return "\(quotedForMessage(name)) is not a syscall name (1 to 64 characters of a-z, 0-9 and '_')"
        case let .unknownSyscall(name, list): return "unknown syscall \(quotedForMessage(name)) in \(list)"
        case let .notAnX86_64Syscall(name, number):
            return "\(quotedForMessage(name)) is not a syscall on x86-64 (libseccomp pseudo-number \(number))"
        case let .duplicateSyscall(name, list): return "syscall \(quotedForMessage(name)) is listed twice in \(list)"
        case let .bareAndConditional(name, list):
            return "syscall \(quotedForMessage(name)) is in \(list) both unconditionally and with allow_if, "
                + "which would make the condition meaningless"
        case let .unreadable(reason): return "cannot read the profile: \(reason)"
        case .includeNotAllowed: return "include is not allowed here (the profile was expected to be resolved already)"
        case let .duplicateInclude(name): return "base profile \(quotedForMessage(name)) is included twice"
        case let .baseProfile(name, reason): return "base profile \(quotedForMessage(name)): \(reason)"
        case let .enosysConflict(name):
            return "\(name) in enosys must be a bare name that no allowlist names"
        case let .alreadyAllowedBySyscalls(name):
            return "syscall \(quotedForMessage(name)) is already allowed unconditionally by syscalls, "
                + "which also apply during start-up"
        case let .emptyConditions(name):
            return "allow_if for \(quotedForMessage(name)) is empty; list the syscall by name to allow it unconditionally"
        case let .unknownOperation(op):
            return "unknown op \(quotedForMessage(op)); allowed ops are "
                + ArgumentCondition.Operation.allCases.map(\.rawValue).joined(separator: ", ")
        case .missingMask: return "op masked_eq requires \"mask\""
        case let .maskWithoutMaskedEq(op): return "\"mask\" is only allowed with op masked_eq, not \(op)"
        case let .valueOutsideMask(value, mask):
            return "value \(readableNumber(value)) has bits outside mask \(readableNumber(mask)), so the condition could never hold"
        case let .notAnInteger(found): return "expected an integer, found \(found)"
        case let .outOfRange(found, allowed): return "\(found) is out of range (allowed: \(allowed))"
        case let .invalidHexString(text):
            return "expected an integer or a \"0x…\" hexadecimal string that fits in 64 bits, found \(quotedForMessage(text))"
        }
    }

    /// Where, in words: the field path, "top level", or the JSON error's line and column.
    public var location: String {
        if case let .invalidJSON(error) = problem { return "line \(error.line), column \(error.column)" }
        return path.isEmpty ? "top level" : path
    }

    /// One line: `<source>: <what is wrong> (<where>)`.
    public var description: String { "\(oneLine(source)): \(message) (\(oneLine(location)))" }
}

// MARK: - Loading

extension SandboxProfile {
    /// The top-level keys of format version 1.
    static let topLevelKeys = ["profile", "version", "description", "include", "namespaces", "rlimits", "startup_syscalls", "syscalls", "enosys"]
    /// The most base profiles one profile may include.
    public static let maximumIncludes = 8
    /// The keys of `rlimits`.
    static let rlimitKeys = ["nofile", "nproc", "core", "fsize", "as_extra_mib"]

    /// Loads and checks one profile file.
    ///
    /// - Parameters:
    ///   - json: the file's bytes.
    ///   - source: the file's name, used in every error (e.g. `sandbox-profiles/serial.json`).
    ///   - resolveSyscall: maps a syscall name to its x86-64 number, nil for an unknown name (hv passes
    ///     libseccomp's resolver). A negative number (libseccomp's pseudo-syscalls for names that exist
    ///     only on other architectures) is rejected.
    ///   - include: loads the base profile a name in `include` names (already merged with its own
    ///     bases); nil refuses `include` (for a profile the core has already flattened).
    /// - Returns: the profile, with its bases merged in: their rules come first, a syscall any of them
    ///   allows unconditionally stays unconditional, identical rules appear once, and `namespaces` and
    ///   each `rlimits` key the file leaves out come from the bases (the last base that sets one wins).
    /// - Throws: `SandboxProfileError` for the first problem found; its `description` is one line naming
    ///   `source`, what is wrong and the field path.
    public static func load(json: [UInt8], source: String, resolveSyscall: (String) -> Int32?,
                            include: ((String) throws(SandboxProfileError) -> SandboxProfile)? = nil) throws(SandboxProfileError) -> SandboxProfile {
        let document: JSONValue
        do throws(JSONError) {
            document = try JSONValue.parse(json)
        } catch {
            throw SandboxProfileError(source: source, problem: .invalidJSON(error), path: "")
        }
        let reader = ProfileReader(source: source)
        let root = try reader.object(document, at: "")

        // The version first: a newer file's unknown keys are better explained by its version.
        guard let version = root["version"] else { throw reader.fail(.missingKey("version"), at: "") }
        guard case let .number(number) = version, number.int64Value == Int64(formatVersion) else {
            throw reader.fail(.unsupportedVersion(found: renderedForMessage(version)), at: "version")
        }
        try reader.checkKeys(root, allowed: topLevelKeys, at: "")

        guard let nameValue = root["profile"] else { throw reader.fail(.missingKey("profile"), at: "") }
        let name = try reader.string(nameValue, at: "profile")
        guard isProfileName(name) else { throw reader.fail(.invalidProfileName(name), at: "profile") }

        var description = ""
        if let value = root["description"] {
            description = try reader.string(value, at: "description")
            try reader.checkDescription(description)
        }

        var bases: [SandboxProfile] = []
        var includes: [String] = []
        if let value = root["include"] {
            let names = try reader.array(value, at: "include")
            guard let include else { throw reader.fail(.includeNotAllowed, at: "include") }
            guard names.count <= maximumIncludes else {
                throw reader.fail(.outOfRange(found: "\(names.count) names", allowed: "at most \(maximumIncludes)"), at: "include")
            }
            for (index, entry) in names.enumerated() {
                let name = try reader.string(entry, at: "include[\(index)]")
                guard isProfileName(name) else { throw reader.fail(.invalidProfileName(name), at: "include[\(index)]") }
                guard !includes.contains(name) else { throw reader.fail(.duplicateInclude(name), at: "include[\(index)]") }
                includes.append(name)
                bases.append(try include(name))
            }
        }

        let namespaces: [Namespace]
        if let namespacesValue = root["namespaces"] {
            namespaces = try reader.namespaces(namespacesValue)
        } else if let base = bases.last {
            namespaces = base.namespaces
        } else {
            throw reader.fail(.missingKey("namespaces"), at: "")
        }

        let inherited = bases.last?.limits ?? ResourceLimits.defaults
        var limits = inherited
        if let value = root["rlimits"] { limits = try reader.limits(value, inheriting: inherited) }

        var startup: [SyscallRule] = []
        if let value = root["startup_syscalls"] {
            startup = try reader.syscallList(value, list: "startup_syscalls", resolveSyscall: resolveSyscall)
        }
        var syscalls: [SyscallRule] = []
        if let syscallsValue = root["syscalls"] {
            syscalls = try reader.syscallList(syscallsValue, list: "syscalls", resolveSyscall: resolveSyscall)
        } else if bases.isEmpty {
            throw reader.fail(.missingKey("syscalls"), at: "")
        }

        let unconditional = Set(syscalls.filter(\.conditions.isEmpty).map(\.name))
        if let index = startup.firstIndex(where: { unconditional.contains($0.name) }) {
            throw reader.fail(.alreadyAllowedBySyscalls(name: startup[index].name), at: reader.entryPath("startup_syscalls", startup, index))
        }
        if !bases.isEmpty {
            syscalls = merged(bases.map(\.syscalls) + [syscalls])
            let allowed = Set(syscalls.filter(\.conditions.isEmpty).map(\.name))
            startup = merged(bases.map(\.startupSyscalls) + [startup]).filter { !allowed.contains($0.name) }
        }

        var enosys: [SyscallRule] = []
        if let value = root["enosys"] {
            enosys = try reader.syscallList(value, list: "enosys", resolveSyscall: resolveSyscall)
        }
        if !bases.isEmpty { enosys = merged(bases.map(\.enosysSyscalls) + [enosys]) }
        if !enosys.isEmpty {
            let allowed = Set((syscalls + startup).map(\.name))
            if let index = enosys.firstIndex(where: { !$0.conditions.isEmpty || allowed.contains($0.name) }) {
                throw reader.fail(.enosysConflict(name: enosys[index].name), at: reader.entryPath("enosys", enosys, index))
            }
        }

        // The jail needs both: the tenant's uid is mapped in a new user namespace (without one the
        // core's uid_map write fails with a bare EPERM), and pivot_root needs a mount namespace.
        // Checked last, so every other mistake in the file is reported first.
        for required in [Namespace.user, .mount] where !namespaces.contains(required) {
            throw reader.fail(.requiredNamespaceMissing(required.rawValue), at: "namespaces")
        }
        var profile = SandboxProfile(name: name, version: formatVersion, description: description, namespaces: namespaces,
                                     limits: limits, startupSyscalls: startup, syscalls: syscalls, enosysSyscalls: enosys)
        profile.includes = includes
        return profile
    }

    /// Rule lists joined in order: a syscall allowed unconditionally by any list is one bare rule
    /// (at its first place), and a conditional rule that appears twice is kept once.
    static func merged(_ lists: [[SyscallRule]]) -> [SyscallRule] {
        let all = lists.flatMap { $0 }
        let bare = Set(all.filter(\.conditions.isEmpty).map(\.name))
        var seen: Set<SyscallRule> = []
        var placedBare: Set<String> = []
        var result: [SyscallRule] = []
        for rule in all {
            if bare.contains(rule.name) {
                guard placedBare.insert(rule.name).inserted else { continue }
                result.append(SyscallRule(name: rule.name, number: rule.number))
            } else if seen.insert(rule).inserted {
                result.append(rule)
            }
        }
        return result
    }
}

/// Typed accessors that report failures as `SandboxProfileError`s for one source file.
private struct ProfileReader {
    let source: String

    func fail(_ problem: SandboxProfileError.Problem, at path: String) -> SandboxProfileError {
        SandboxProfileError(source: source, problem: problem, path: path)
    }

    func object(_ value: JSONValue, at path: String) throws(SandboxProfileError) -> JSONObject {
        guard case let .object(object) = value else { throw fail(.wrongType(expected: "an object", found: value.typeName), at: path) }
        return object
    }

    func array(_ value: JSONValue, at path: String) throws(SandboxProfileError) -> [JSONValue] {
        guard case let .array(array) = value else { throw fail(.wrongType(expected: "an array", found: value.typeName), at: path) }
        return array
    }

    func string(_ value: JSONValue, at path: String) throws(SandboxProfileError) -> String {
        guard case let .string(string) = value else { throw fail(.wrongType(expected: "a string", found: value.typeName), at: path) }
        return string
    }

    func checkKeys(_ object: JSONObject, allowed: [String], at path: String) throws(SandboxProfileError) {
        for key in object.keys where !allowed.contains(key) {
            throw fail(.unknownKey(key, allowed: allowed), at: child(path, key))
        }
    }

    func required(_ object: JSONObject, _ key: String, at path: String) throws(SandboxProfileError) -> JSONValue {
        guard let value = object[key] else { throw fail(.missingKey(key), at: path) }
        return value
    }

    /// A JSON integer in 0…`maximum`; `allowed` describes the range for the error message.
    func integer(_ value: JSONValue, at path: String, maximum: UInt64, allowed: String, expected: String) throws(SandboxProfileError) -> UInt64 {
        guard case let .number(number) = value else { throw fail(.wrongType(expected: expected, found: value.typeName), at: path) }
        guard number.isInteger else { throw fail(.notAnInteger(found: renderedForMessage(value)), at: path) }
        guard let result = number.uint64Value, result <= maximum else {
            throw fail(.outOfRange(found: renderedForMessage(value), allowed: allowed), at: path)
        }
        return result
    }

    /// A condition constant: a JSON integer or a "0x…" string, fitting in 64 bits.
    func constant(_ value: JSONValue, at path: String) throws(SandboxProfileError) -> UInt64 {
        switch value {
        case .number:
            return try integer(value, at: path, maximum: UInt64.max, allowed: "0 to 0xffffffffffffffff",
                               expected: "an integer or a \"0x…\" string")
        case let .string(text):
            guard let parsed = parseHex(text) else { throw fail(.invalidHexString(text), at: path) }
            return parsed
        default:
            throw fail(.wrongType(expected: "an integer or a \"0x…\" string", found: value.typeName), at: path)
        }
    }

    func checkDescription(_ description: String) throws(SandboxProfileError) {
        var count = 0
        for scalar in description.unicodeScalars {
            count += 1
            let value = scalar.value
            if value < 0x20 || (0x7F...0x9F).contains(value) || value == 0x2028 || value == 0x2029 {
                throw fail(.invalidDescription(reason: "must be one line without control characters"), at: "description")
            }
        }
        if count > 256 { throw fail(.invalidDescription(reason: "is longer than 256 characters"), at: "description") }
    }

    func namespaces(_ value: JSONValue) throws(SandboxProfileError) -> [Namespace] {
        var result: [Namespace] = []
        for (index, element) in try array(value, at: "namespaces").enumerated() {
            let path = "namespaces[\(index)]"
            let name = try string(element, at: path)
            guard let namespace = Namespace(rawValue: name) else { throw fail(.unknownNamespace(name), at: path) }
            guard !result.contains(namespace) else { throw fail(.duplicateNamespace(name), at: path) }
            result.append(namespace)
        }
        return result
    }

    /// The `rlimits` object; a key it leaves out keeps its value in `defaults`.
    func limits(_ value: JSONValue, inheriting defaults: ResourceLimits = .defaults) throws(SandboxProfileError) -> ResourceLimits {
        let object = try object(value, at: "rlimits")
        try checkKeys(object, allowed: SandboxProfile.rlimitKeys, at: "rlimits")
        func limit(_ key: String, _ fallback: UInt64?, maximum: UInt64, allowed: String) throws(SandboxProfileError) -> UInt64? {
            guard let value = object[key] else { return fallback }
            let path = "rlimits." + key
            let expected = "a non-negative integer or \"unlimited\""
            switch value {
            case .string("unlimited"): return nil
            case .number: return try integer(value, at: path, maximum: maximum, allowed: allowed, expected: expected)
            case .string: throw fail(.wrongType(expected: expected, found: "the string \(renderedForMessage(value))"), at: path)
            default: throw fail(.wrongType(expected: expected, found: value.typeName), at: path)
            }
        }
        // UInt64.max is RLIM_INFINITY: a finite limit must be below it.
        let finite = "0 to \(UInt64.max - 1), or \"unlimited\""
        return ResourceLimits(
            openFiles: try limit("nofile", defaults.openFiles, maximum: UInt64.max - 1, allowed: finite),
            processes: try limit("nproc", defaults.processes, maximum: UInt64.max - 1, allowed: finite),
            coreBytes: try limit("core", defaults.coreBytes, maximum: UInt64.max - 1, allowed: finite),
            fileSizeBytes: try limit("fsize", defaults.fileSizeBytes, maximum: UInt64.max - 1, allowed: finite),
            addressSpaceExtraMiB: try limit("as_extra_mib", defaults.addressSpaceExtraMiB, maximum: UInt64.max >> 20,
                                            allowed: "0 to \(UInt64.max >> 20) MiB, or \"unlimited\""))
    }

    func syscallList(_ value: JSONValue, list: String,
                     resolveSyscall: (String) -> Int32?) throws(SandboxProfileError) -> [SyscallRule] {
        var rules: [SyscallRule] = []
        var seen: Set<SyscallRule> = []
        var bare: Set<String> = []
        var conditional: Set<String> = []
        for (index, entry) in try array(value, at: list).enumerated() {
            let path = "\(list)[\(index)]"
            let rule: SyscallRule
            switch entry {
            case let .string(name):
                rule = SyscallRule(name: name, number: try resolve(name, list: list, at: path, resolveSyscall))
                guard !conditional.contains(name) else { throw fail(.bareAndConditional(name: name, list: list), at: path) }
                bare.insert(name)
            case let .object(object):
                try checkKeys(object, allowed: ["name", "allow_if"], at: path)
                let name = try string(try required(object, "name", at: path), at: path + ".name")
                let number = try resolve(name, list: list, at: path + ".name", resolveSyscall)
                let conditionsPath = path + ".allow_if"
                let conditionValues = try array(try required(object, "allow_if", at: path), at: conditionsPath)
                guard !conditionValues.isEmpty else { throw fail(.emptyConditions(name: name), at: conditionsPath) }
                var conditions: [ArgumentCondition] = []
                for (conditionIndex, conditionValue) in conditionValues.enumerated() {
                    conditions.append(try condition(conditionValue, at: "\(conditionsPath)[\(conditionIndex)]"))
                }
                rule = SyscallRule(name: name, number: number, conditions: conditions)
                guard !bare.contains(name) else { throw fail(.bareAndConditional(name: name, list: list), at: path) }
                conditional.insert(name)
            default:
                throw fail(.wrongType(expected: "a syscall name or an object with \"name\" and \"allow_if\"", found: entry.typeName),
                           at: path)
            }
            guard seen.insert(rule).inserted else { throw fail(.duplicateSyscall(name: rule.name, list: list), at: path) }
            rules.append(rule)
        }
        return rules
    }

    func resolve(_ name: String, list: String, at path: String,
                 _ resolveSyscall: (String) -> Int32?) throws(SandboxProfileError) -> Int32 {
        guard isSyscallName(name) else { throw fail(.invalidSyscallName(name), at: path) }
        guard let number = resolveSyscall(name) else { throw fail(.unknownSyscall(name: name, list: list), at: path) }
        guard number >= 0 else { throw fail(.notAnX86_64Syscall(name: name, number: number), at: path) }
        return number
    }

    func condition(_ value: JSONValue, at path: String) throws(SandboxProfileError) -> ArgumentCondition {
        let object = try object(value, at: path)
        try checkKeys(object, allowed: ["arg", "op", "value", "mask"], at: path)
        let argument = try integer(try required(object, "arg", at: path), at: path + ".arg", maximum: 5, allowed: "0 to 5",
                                   expected: "an argument index 0 to 5")
        let opText = try string(try required(object, "op", at: path), at: path + ".op")
        guard let operation = ArgumentCondition.Operation(rawValue: opText) else {
            throw fail(.unknownOperation(opText), at: path + ".op")
        }
        let constant = try constant(try required(object, "value", at: path), at: path + ".value")
        var mask = UInt64.max
        if operation == .maskedEq {
            guard let maskValue = object["mask"] else { throw fail(.missingMask, at: path) }
            mask = try self.constant(maskValue, at: path + ".mask")
            guard constant & ~mask == 0 else { throw fail(.valueOutsideMask(value: constant, mask: mask), at: path + ".value") }
        } else if object["mask"] != nil {
            throw fail(.maskWithoutMaskedEq(operation: opText), at: path + ".mask")
        }
        return ArgumentCondition(argument: Int(argument), operation: operation, value: constant, mask: mask)
    }

    /// The path of `rules[index]` in `list` (rules are one per entry, so the index is the entry's).
    func entryPath(_ list: String, _ rules: [SyscallRule], _ index: Int) -> String {
        rules[index].conditions.isEmpty ? "\(list)[\(index)]" : "\(list)[\(index)].name"
    }

    func child(_ path: String, _ key: String) -> String {
        let plain = !key.isEmpty && key.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
        let component = plain ? key : "[\(quotedForMessage(key, limit: 32))]"
        if path.isEmpty { return component }
        return plain ? path + "." + component : path + component
    }
}

// MARK: - Rendering

extension SandboxProfile {
    /// The effective profile in readable form, for `hvctl sandbox show DEVICE`: the name and format
    /// version, the description, the caller's `header` lines (e.g. the device's uid/gid), namespaces,
    /// rlimits, the steady-state syscalls one per line sorted by name with their conditions
    /// (`ioctl  if arg1 == 0x5421`; further entries for the same syscall follow as `or if …` lines), the
    /// start-up-only rules likewise, and a last line with the counts:
    /// "N syscalls allowed after lock-down, M during start-up".
    ///
    /// Lines are separated by `\n`; there is no trailing newline.
    public func render(header: [String] = []) -> String {
        var lines = ["sandbox profile \(name) (profile format version \(version))"]
        if !description.isEmpty { lines.append("description: \(description)") }
        lines += header
        if !includes.isEmpty { lines.append("built on: \(includes.joined(separator: ", ")) (merged into what follows)") }
        lines.append("namespaces: " + (namespaces.isEmpty ? "none" : namespaces.map(\.rawValue).joined(separator: ", ")))
        lines.append("rlimits: " + renderLimits())
        // One name column for both lists, so their conditions line up.
        let width = ((syscalls + startupSyscalls).map(\.name.count).max() ?? 0) + 2
        lines.append("syscalls after lock-down:")
        lines += renderRules(syscalls, width: width)
        lines.append("syscalls during start-up only (until lock-down):")
        lines += renderRules(startupSyscalls, width: width)
        if !enosysSyscalls.isEmpty { lines.append("failing with ENOSYS: " + enosysSyscalls.map(\.name).joined(separator: ", ")) }
        lines.append("\(steadyStateSyscallCount) \(steadyStateSyscallCount == 1 ? "syscall" : "syscalls") allowed after lock-down, "
            + "\(startupSyscallCount) during start-up")
        return lines.joined(separator: "\n")
    }

    /// The profile as one self-contained profile file (bases merged, no `include`), which `load`
    /// reads back to an equal profile (less `includes`): what `hvctl sandbox show` prints and the jail applies.
    public func jsonText() -> String {
        func text(_ s: String) -> String {
            var out = "\""
            for scalar in s.unicodeScalars {
                switch scalar {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case _ where scalar.value < 0x20: out += "\\u00" + (scalar.value < 0x10 ? "0" : "") + String(scalar.value, radix: 16)
                default: out.unicodeScalars.append(scalar)
                }
            }
            return out + "\""
        }
        func limit(_ v: UInt64?) -> String { v.map(String.init) ?? "\"unlimited\"" }
        func rules(_ list: [SyscallRule]) -> String {
            "[" + list.map { rule in
                guard !rule.conditions.isEmpty else { return text(rule.name) }
                let conditions = rule.conditions.map { c in
                    "{\"arg\": \(c.argument), \"op\": \"\(c.operation.rawValue)\", \"value\": \"0x\(String(c.value, radix: 16))\""
                        + (c.operation == .maskedEq ? ", \"mask\": \"0x\(String(c.mask, radix: 16))\"" : "") + "}"
                }
                return "{\"name\": \(text(rule.name)), \"allow_if\": [\(conditions.joined(separator: ", "))]}"
            }.joined(separator: ", ") + "]"
        }
        return "{\"profile\": \(text(name)), \"version\": \(version), " + (description.isEmpty ? "" : "\"description\": \(text(description)), ")
            + "\"namespaces\": [\(namespaces.map { text($0.rawValue) }.joined(separator: ", "))], "
            + "\"rlimits\": {\"nofile\": \(limit(limits.openFiles)), \"nproc\": \(limit(limits.processes)), \"core\": \(limit(limits.coreBytes)), "
            + "\"fsize\": \(limit(limits.fileSizeBytes)), \"as_extra_mib\": \(limit(limits.addressSpaceExtraMiB))}, "
            + "\"startup_syscalls\": \(rules(startupSyscalls)), \"syscalls\": \(rules(syscalls)), \"enosys\": \(rules(enosysSyscalls))}\n"
    }

    private func renderLimits() -> String {
        func value(_ limit: UInt64?, unit: String = "") -> String { limit.map { "\($0)\(unit)" } ?? "unlimited" }
        let addressSpace = limits.addressSpaceExtraMiB.map { "guest RAM + \($0) MiB" } ?? "unlimited"
        return "nofile \(value(limits.openFiles)), nproc \(value(limits.processes)), core \(value(limits.coreBytes, unit: " bytes")), "
            + "fsize \(value(limits.fileSizeBytes, unit: " bytes")), address space \(addressSpace)"
    }

    private func renderRules(_ rules: [SyscallRule], width: Int) -> [String] {
        guard !rules.isEmpty else { return ["  (none)"] }
        let ordered = rules.enumerated().sorted { lhs, rhs in
            lhs.element.name != rhs.element.name ? lhs.element.name < rhs.element.name : lhs.offset < rhs.offset
        }.map(\.element)
        var lines: [String] = []
        var previous: String?
        for rule in ordered {
            if rule.conditions.isEmpty {
                lines.append("  " + rule.name)
            } else if rule.name == previous {
                lines.append("  " + String(repeating: " ", count: width) + "or " + rule.conditionText)
            } else {
                lines.append("  " + rule.name + String(repeating: " ", count: width - rule.name.count) + rule.conditionText)
            }
            previous = rule.name
        }
        return lines
    }
}

// MARK: - Helpers

/// `[a-z0-9-]{1,64}`.
private func isProfileName(_ name: String) -> Bool {
    let bytes = Array(name.utf8)
    return (1...64).contains(bytes.count) && bytes.allSatisfy { byte in
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
            || byte == UInt8(ascii: "-")
    }
}

/// `[a-z0-9_]{1,64}`.
private func isSyscallName(_ name: String) -> Bool {
    let bytes = Array(name.utf8)
    return (1...64).contains(bytes.count) && bytes.allSatisfy { byte in
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
            || byte == UInt8(ascii: "_")
    }
}

/// `0x` followed by one or more hex digits whose value fits in 64 bits.
private func parseHex(_ text: String) -> UInt64? {
    let bytes = Array(text.utf8)
    guard bytes.count > 2, bytes[0] == UInt8(ascii: "0"), bytes[1] == UInt8(ascii: "x") else { return nil }
    var value: UInt64 = 0
    for byte in bytes[2...] {
        let digit: UInt64
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt64(byte - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt64(byte - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt64(byte - UInt8(ascii: "A") + 10)
        default: return nil
        }
        guard value >> 60 == 0 else { return nil }
        value = value << 4 | digit
    }
    return value
}

/// Decimal below 16, else `0x…`.
private func readableNumber(_ value: UInt64) -> String {
    value < 16 ? String(value) : "0x" + String(value, radix: 16)
}

/// A short one-line rendering of a JSON value for messages: numbers as written, strings quoted.
private func renderedForMessage(_ value: JSONValue) -> String {
    switch value {
    case let .number(number): return number.literal.count > 40 ? String(number.literal.prefix(40)) + "…" : number.literal
    case let .string(text): return quotedForMessage(text)
    case let .bool(flag): return flag ? "true" : "false"
    case .null: return "null"
    case .object, .array: return value.typeName
    }
}

/// `text` with control characters escaped, so a caller-supplied name cannot break the one-line format.
private func oneLine(_ text: String) -> String {
    var result = ""
    for scalar in text.unicodeScalars {
        let value = scalar.value
        if value < 0x20 || (0x7F...0x9F).contains(value) || value == 0x2028 || value == 0x2029 {
            result += "\\u{" + String(value, radix: 16) + "}"
        } else {
            result.unicodeScalars.append(scalar)
        }
    }
    return result
}

import CHVShim
import CSeccomp
import Glibc
import HVSandbox
import HVSys

/// Everything a device's jail needs, decided here by the trusted core before the clone: the
/// steps that build its root, its rlimits and its two seccomp programs. The clone3 child performs
/// them (`hv_jail_enter` in CHVShim, async-signal-safe C) and then execs the device: no second
/// executable and no second language runtime start between the clone and the device, and no
/// profile is parsed or filter compiled in the jailed process.
struct JailPlan {
    /// One step under the new root (see `hv_jail_step` in hv_shim.h).
    struct Step: Equatable {
        enum Kind: Int32 { case makeDirectory = 1, symlink = 2, bind = 3, copy = 4 }
        var kind: Kind
        /// The path in the new root, prefixed with `JailPlan.root`.
        var path: String
        /// The link's target (symlink) or the host path bound there (bind).
        var source: String = ""
        /// Bind: the mount point is a directory (else an empty file).
        var directory = false
        /// Bind: the flags of its read-only remount.
        var flags: UInt = 0
        /// Copy: the descriptor whose contents the new file holds.
        var fd: Int32 = -1
    }

    /// Where the new root is built (in the child's own mount namespace, so any directory will do).
    static let root = "/mnt"
    /// The x86-64 psABI fixes the dynamic loader's path; it is exposed after the profile's paths.
    static let dynamicLoader = "/lib64/ld-linux-x86-64.so.2"

    var steps: [Step] = []
    /// Host paths bound so far (a path under one of them is already visible).
    private var bound: [String] = []
    /// Paths in the new root made so far (directories and links), so each is made once.
    private var made: Set<String> = []

    /// Exposes each of `paths` that exists, read-only, at the same path in the new root, then
    /// the dynamic loader; a path's symbolic links are recreated on the way (Debian's /lib →
    /// usr/lib) so the loader's paths resolve. Throws on a cycle of links (more than 16).
    mutating func expose(_ paths: [String]) throws(SystemError) {
        for path in paths + [Self.dynamicLoader] where access(path, F_OK) == 0 { try expose(path, depth: 0) }
    }

    private mutating func expose(_ path: String, depth: Int) throws(SystemError) {
        guard depth < 16 else { throw SystemError("expose \(path) in a jail: too many symbolic links", Errno(rawValue: ELOOP)) }
        if bound.contains(where: { path == $0 || path.hasPrefix($0 + "/") }) { return }  // already visible
        let parts = path.split(separator: "/").map(String.init)
        var prefix = ""
        for (i, part) in parts.enumerated() {
            prefix += "/" + part
            let inside = Self.root + prefix
            if let target = Self.linkTarget(prefix) {
                if made.insert(inside).inserted { steps.append(Step(kind: .symlink, path: inside, source: target)) }
                if bound.contains(where: { prefix.hasPrefix($0 + "/") }) { return }  // the link lives in a bound tree
                let resolved = target.utf8.first == UInt8(ascii: "/") ? target : String(prefix[..<prefix.lastIndex(of: "/")!]) + "/" + target
                let rest = parts[(i + 1)...].joined(separator: "/")
                try expose(rest.isEmpty ? resolved : resolved + "/" + rest, depth: depth + 1)
                return
            }
            if i < parts.count - 1 {
                if made.insert(inside).inserted { steps.append(Step(kind: .makeDirectory, path: inside)) }
                continue
            }
            made.insert(inside)
            steps.append(Step(kind: .bind, path: inside, source: prefix, directory: Self.isDirectory(prefix),
                              flags: Self.readOnlyRemountFlags(for: prefix)))
            bound.append(prefix)
        }
    }

    /// Copies each file (a descriptor hv opened) into `/plugin/NAME` of the new root.
    mutating func copy(_ files: [(fd: Int32, name: String)], into directory: String) {
        guard !files.isEmpty else { return }
        steps.append(Step(kind: .makeDirectory, path: Self.root + directory))
        for file in files { steps.append(Step(kind: .copy, path: Self.root + directory + "/" + file.name, fd: file.fd)) }
    }

    /// The remount that makes a bind read-only must keep the flags the kernel locked on the
    /// source mount (statvfs(3) ST_NOEXEC 8, ST_NOATIME 1024, ST_RELATIME 4096; the Glibc module
    /// drops the macros).
    static func readOnlyRemountFlags(for source: String) -> UInt {
        var vfs = statvfs()
        _ = statvfs(source, &vfs)
        var flags = UInt(MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        if vfs.f_flag & 8 != 0 { flags |= UInt(MS_NOEXEC) }
        if vfs.f_flag & 1024 != 0 { flags |= UInt(MS_NOATIME) }
        if vfs.f_flag & 4096 != 0 { flags |= UInt(MS_RELATIME) }
        return flags
    }

    static func linkTarget(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(path, &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    // MARK: Seccomp

    /// The profile's two programs as classic BPF: `startup` (the lock-down rules plus what the
    /// dynamic loader and the runtime's start need), loaded by the child just before the exec,
    /// and `lockdown`, which the device's SDK installs before it reads any message. Both trap on
    /// a violation: before the SDK installs its SIGSYS reporter the default disposition kills the
    /// process; after, the reporter names the syscall to the core. (Stacked filters take the most
    /// severe action, so a KILL start-up stage would pre-empt the lock-down stage's report.)
    static func seccompPrograms(for profile: SandboxProfile) throws(SystemError) -> (startup: [UInt8], lockdown: [UInt8]) {
        (try program(profile, rules: profile.startupRules), try program(profile, rules: profile.syscalls))
    }

    private static func program(_ profile: SandboxProfile, rules: [SyscallRule]) throws(SystemError) -> [UInt8] {
        guard let ctx = seccomp_init(SCMP_ACT_TRAP) else { throw SystemError("seccomp_init", Errno(rawValue: ENOMEM)) }
        defer { seccomp_release(ctx) }
        for rule in rules {
            var conditions = rule.conditions.map { c -> scmp_arg_cmp in
                let op: scmp_compare
                switch c.operation {
                case .eq: op = SCMP_CMP_EQ
                case .ne: op = SCMP_CMP_NE
                case .lt: op = SCMP_CMP_LT
                case .le: op = SCMP_CMP_LE
                case .gt: op = SCMP_CMP_GT
                case .ge: op = SCMP_CMP_GE
                case .maskedEq: op = SCMP_CMP_MASKED_EQ
                }
                return scmp_arg_cmp(arg: UInt32(c.argument), op: op,
                                    datum_a: c.operation == .maskedEq ? c.mask : c.value,
                                    datum_b: c.operation == .maskedEq ? c.value : 0)
            }
            let rc = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, rule.number, UInt32(conditions.count), &conditions)
            if rc != 0 { throw SystemError("seccomp rule for \(rule.name) in \(profile.name)", Errno(rawValue: -rc)) }
        }
        // SCMP_ACT_ERRNO(ENOSYS), a macro the importer drops: 0x00050000 | errno.
        for rule in profile.enosysSyscalls {
            let rc = seccomp_rule_add_array(ctx, 0x0005_0000 | UInt32(ENOSYS), rule.number, 0, nil)
            if rc != 0 { throw SystemError("seccomp ENOSYS rule for \(rule.name) in \(profile.name)", Errno(rawValue: -rc)) }
        }
        // libseccomp 2.5 exports only to a descriptor.
        let raw = hv_memfd_create("hv-seccomp", UInt32(hv_MFD_CLOEXEC))
        try check("memfd_create for a seccomp filter", raw)
        let exported = FileDescriptor(owning: raw)
        let rc = seccomp_export_bpf(ctx, exported.rawValue)
        if rc != 0 { throw SystemError("export the seccomp filter of \(profile.name)", Errno(rawValue: -rc)) }
        var bytes = [UInt8](repeating: 0, count: Int(try exported.size()))
        let n = bytes.withUnsafeMutableBytes { (try? exported.read(into: $0, at: 0)) ?? -1 }
        guard n == bytes.count, !bytes.isEmpty else { throw SystemError("read back the seccomp filter of \(profile.name)", Errno(rawValue: EIO)) }
        return bytes
    }
}

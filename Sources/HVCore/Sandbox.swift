import CHVShim
import Glibc
import HVSandbox
import HVSys

/// How one device process is jailed: which profile, which tenant identity, which host paths it
/// may see (read-only). Built by hvctl; applied by `DeviceSupervisor` and `hv-jail`.
public struct SandboxPlan: Sendable {
    /// The trusted jail stage (`hv-jail`), next to hvctl.
    public var jailExecutable: String
    /// The device's profile file, e.g. sandbox-profiles/serial.json.
    public var profilePath: String
    /// The parsed profile (validated at VM start, before anything runs).
    public var profile: SandboxProfile
    /// The uid/gid the device runs as outside its user namespace: its tenant's, from the host's
    /// tenant registry (`TenantRegistry` in HVHost), which gives every tenant name its own.
    public var outsideUID: uid_t
    public var outsideGID: gid_t
    /// Host paths bind-mounted read-only into the device's otherwise empty root.
    public var exposedPaths: [String]
    /// Host files copied into the jail's root under `/plugin/` (an interpreted plugin's script and
    /// modules). hv opens them, so they need not be reachable by the tenant's uid, unlike
    /// `exposedPaths`; the copies are read-only and go away with the process.
    public var pluginFiles: [String] = []
    /// The directory inside the jail that holds `pluginFiles`.
    public static let pluginDirectory = "/plugin"
    /// The most files `pluginFiles` may hold (each is a descriptor handed to hv-jail).
    public static let maximumPluginFiles = 32
    /// The name a plugin file has in `pluginDirectory`: its host path's last component.
    public static func fileName(_ path: String) -> String {
        path.split(separator: "/").last.map(String.init) ?? path
    }

    public init(jailExecutable: String, profilePath: String, profile: SandboxProfile, outsideUID: uid_t,
                outsideGID: gid_t, exposedPaths: [String]) {
        self.jailExecutable = jailExecutable
        self.profilePath = profilePath
        self.profile = profile
        self.outsideUID = outsideUID
        self.outsideGID = outsideGID
        self.exposedPaths = exposedPaths
    }

    /// The library directories to expose in a jail: those this process has mapped, those that
    /// `executables` (and, in turn, their libraries) need by their DT_NEEDED and RUNPATH entries,
    /// and the loader's cache.
    public static func runtimeLibraryPaths(for executables: [String] = []) -> [String] {
        var dirs: [String] = []
        func add(_ dir: String) {
            // Canonical paths, as /proc/self/maps shows them (Debian's /lib is a link to /usr/lib).
            var resolved = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
            let canonical = realpath(dir, &resolved) != nil
                ? String(decoding: resolved.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : dir
            if !dirs.contains(canonical) { dirs.append(canonical) }
        }
        if let fd = try? FileDescriptor.open("/proc/self/maps", flags: O_RDONLY), let bytes = try? fd.readAll() {
            for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
                guard let slash = line.firstIndex(of: "/") else { continue }
                let path = String(line[slash...])
                guard path.contains(".so"), let dirEnd = path.lastIndex(of: "/") else { continue }
                add(String(path[..<dirEnd]))
            }
        }
        // What the device binaries themselves need, found as the dynamic loader would: their
        // RUNPATH, then the default directories. (The core may be linked statically, or against
        // fewer libraries than a device.)
        let defaults = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib", "/lib"]
        var pending = executables, seen = Set<String>()
        while let path = pending.popLast(), seen.count < 256 {
            guard seen.insert(path).inserted, let info = elfDynamicInfo(path) else { continue }
            let origin = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
            let search = info.runPaths.map { $0.replacing("$ORIGIN", with: origin) } + defaults
            for library in info.needed where !library.contains("/") {
                guard let dir = search.first(where: { access($0 + "/" + library, R_OK) == 0 }) else { continue }
                add(dir)
                pending.append(dir + "/" + library)
            }
        }
        for extra in ["/etc/ld.so.cache"] where access(extra, F_OK) == 0 && !dirs.contains(extra) {
            dirs.append(extra)
        }
        return dirs
    }

    /// The dynamic section of the ELF file at `path`, read with bounded preads.
    static func elfDynamicInfo(_ path: String) -> ELFDynamicInfo? {
        guard let file = try? FileDescriptor.open(path, flags: O_RDONLY) else { return nil }
        return ELFDynamicInfo { offset, count in
            guard count >= 0, count <= 1 << 20, offset <= UInt64(Int64.max) else { return nil }
            var bytes = [UInt8](repeating: 0, count: count)
            let n = bytes.withUnsafeMutableBytes { (try? file.read(into: $0, at: Int64(offset))) ?? -1 }
            return n < 0 ? nil : Array(bytes.prefix(n))
        }
    }

    /// Descriptors hv-jail receives: the device executable and the profile, opened by the core.
    static let jailDeviceFD: Int32 = 7
    static let jailProfileFD: Int32 = 8
    /// hv-jail's descriptors from here on are `pluginFiles`, in order.
    static let jailFirstPluginFileFD: Int32 = 9

    /// clone3 flags for the profile's namespaces.
    var cloneFlags: UInt64 {
        profile.namespaces.reduce(0) { $0 | UInt64($1.cloneFlag) }
    }

    /// Starts `executable` under the jail with `inherit` (child fd → parent fd) and returns it.
    /// A `detached` process outlives its parent (in a session of its own) instead of dying with
    /// it; `stderr` is the parent descriptor it writes its messages to.
    /// `placement` (cgroups, OOM score) is applied while the child waits, before the jail runs
    /// (v1 groups the child joins itself, as its first act after the wait).
    public func spawn(executable: String, arguments: [String], memoryBytes: UInt64,
                      inherit: [(child: Int32, parent: Int32)], detached: Bool = false, stderr: Int32 = 2,
                      placement: ProcessPlacement? = nil) throws(SystemError) -> ChildProcess {
        var sync: [Int32] = [-1, -1]
        try check("pipe", pipe(&sync))
        let syncRead = FileDescriptor(owning: sync[0])
        let syncWrite = FileDescriptor(owning: sync[1])
        _ = fcntl(sync[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(sync[1], F_SETFD, FD_CLOEXEC)
        let devNull = try FileDescriptor.open("/dev/null", flags: O_RDWR)

        // Opened here, by the trusted side: the jailed child runs as the tenant's uid and may not be
        // able to traverse the directories hv is installed in (a 0700 build tree, say).
        // Regular files only, opened without blocking: a path swapped for a FIFO since it was
        // checked must fail here, not hang the core.
        func openRegular(_ path: String) throws(SystemError) -> FileDescriptor {
            do { return try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular) } catch {
                throw SystemError("open \(path): \(error)", error.errno ?? Errno(rawValue: EINVAL))
            }
        }
        let jail = try openRegular(jailExecutable)
        let deviceBinary = try openRegular(executable)
        // The profile as loaded and checked here, its bases merged: hv-jail applies exactly what
        // `hvctl sandbox show` prints, whatever happens to the files meanwhile.
        let profileFile = try MemFD.holding(Array(profile.jsonText().utf8), name: "hv-profile")
        guard pluginFiles.count <= Self.maximumPluginFiles else {
            throw SystemError("\(executable) brings \(pluginFiles.count) files; at most \(Self.maximumPluginFiles) go into a jail", Errno(rawValue: E2BIG))
        }
        let copied = try pluginFiles.map { path throws(SystemError) in try openRegular(path) }

        var argv = [jailExecutable, "--profile", profilePath, "--memory", String(memoryBytes)]
        for p in exposedPaths { argv += ["--expose", p] }
        for (i, path) in pluginFiles.enumerated() {
            argv += ["--plugin-file", "\(Self.jailFirstPluginFileFD + Int32(i)):" + Self.fileName(path)]
        }
        if detached { argv.append("--outlive-parent") }
        argv += ["--", executable] + arguments
        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        let cEnv: [UnsafeMutablePointer<CChar>?] = [nil]
        defer { cArgs.forEach { free($0) } }
        // The device's stdin and stdout are /dev/null; stderr is what the caller gives (for a VM's
        // device, a pipe the core reads and prefixes, so a device cannot pose as hvctl).
        let mapping = [(Int32(0), devNull.rawValue), (Int32(1), devNull.rawValue), (Int32(2), stderr),
                       (Self.jailDeviceFD, deviceBinary.rawValue), (Self.jailProfileFD, profileFile.rawValue)]
            + copied.enumerated().map { (Self.jailFirstPluginFileFD + Int32($0.offset), $0.element.rawValue) } + inherit
        let childFDs = mapping.map(\.0)
        let parentFDs = mapping.map(\.1)
        // v1 groups the child joins itself, before hv-jail runs; the rest is done by pid below.
        let (taskFiles, byPID) = try placement?.openingV1TaskFiles() ?? ([], nil)
        let joinFDs = taskFiles.map(\.rawValue)
        var pidfd: Int32 = -1
        // The mapping holds bare numbers: every owner must outlive the clone, which dups them
        // (an optimized build otherwise closes an owner right after its last use above).
        let pid = withExtendedLifetime((jail, deviceBinary, profileFile, copied, devNull, taskFiles)) {
            hv_spawn_in_namespaces(jail.rawValue, cArgs, cEnv, childFDs, parentFDs, Int32(mapping.count),
                                   joinFDs, Int32(joinFDs.count), cloneFlags, detached ? 0 : 1, syncRead.rawValue, &pidfd)
        }
        try check("clone3 into new namespaces for \(executable)", pid)
        let child = ChildProcess(pid: pid, pidfd: FileDescriptor(owning: pidfd))
        do {
            // Inside uid/gid 0 is the tenant's id outside; nothing else is mapped.
            try writeProcFile("/proc/\(pid)/uid_map", "0 \(outsideUID) 1\n")
            try writeProcFile("/proc/\(pid)/gid_map", "0 \(outsideGID) 1\n")
            try byPID?.apply(to: pid)
        } catch {
            try? syncWrite.writeAll(Array("x".utf8))
            child.killAndReap()
            throw error
        }
        try syncWrite.writeAll(Array("g".utf8))
        return child
    }

    private func writeProcFile(_ path: String, _ text: String) throws(SystemError) {
        let fd = try FileDescriptor.open(path, flags: O_WRONLY)
        try fd.writeAll(Array(text.utf8))
    }
}

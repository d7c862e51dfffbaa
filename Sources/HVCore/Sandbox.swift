import CHVShim
import Glibc
import HVSandbox
import HVSys

/// How one device process is jailed: which profile, which tenant identity, which host paths it
/// may see (read-only). Built by hvctl; applied by `DeviceSupervisor`, whose clone3 child builds
/// the jail (`JailPlan`, `hv_jail_enter`) before it execs the device.
public struct SandboxPlan: Sendable {
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
    /// The most files `pluginFiles` may hold (each is a descriptor the jail copies from).
    public static let maximumPluginFiles = 32
    /// The name a plugin file has in `pluginDirectory`: its host path's last component.
    public static func fileName(_ path: String) -> String {
        path.split(separator: "/").last.map(String.init) ?? path
    }

    public init(profilePath: String, profile: SandboxProfile, outsideUID: uid_t,
                outsideGID: gid_t, exposedPaths: [String]) {
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

    /// Descriptors the device process gets besides stdio and `inherit`: the stage-2 seccomp
    /// filter (read by the SDK's `LockDown`) and, until its exec, its own binary.
    static let stage2FilterFD: Int32 = 5
    static let deviceBinaryFD: Int32 = 7

    /// clone3 flags for the profile's namespaces.
    var cloneFlags: UInt64 {
        profile.namespaces.reduce(0) { $0 | UInt64($1.cloneFlag) }
    }

    /// Starts `executable` under the jail with `inherit` (child fd → parent fd) and returns it.
    /// A `detached` process outlives its parent (in a session of its own) instead of dying with
    /// it; `stderr` is the parent descriptor it writes its messages to.
    /// `placement` (cgroups, OOM score) is applied while the child waits, before the jail is built
    /// (v1 groups the child joins itself, as its first act after the wait).
    ///
    /// The jail is planned here (`JailPlan`: the root's steps, the rlimits, both seccomp programs
    /// compiled from the profile as loaded and checked, so the device gets exactly what `hvctl
    /// sandbox show` prints) and built by the clone3 child itself before it execs the device.
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
        let deviceBinary = try openRegular(executable)
        guard pluginFiles.count <= Self.maximumPluginFiles else {
            throw SystemError("\(executable) brings \(pluginFiles.count) files; at most \(Self.maximumPluginFiles) go into a jail", Errno(rawValue: E2BIG))
        }
        let copied = try pluginFiles.map { path throws(SystemError) in try openRegular(path) }

        // The root: mount points for what the device may see, and an interpreted plugin's files
        // (the tmpfs sized to fit them, no more).
        var plan = JailPlan()
        try plan.expose(exposedPaths)
        plan.copy(zip(copied, pluginFiles).map { ($0.rawValue, Self.fileName($1)) }, into: Self.pluginDirectory)
        var pluginBytes = 0
        for file in copied { pluginBytes += (Int(try file.size()) + 4095) / 4096 * 4096 }
        let programs = try JailPlan.seccompPrograms(for: profile)
        let stage2 = try MemFD.holding(programs.lockdown, name: "hv-seccomp-stage2")
        // Linux RLIMIT_* numbers (some are macros the Glibc module drops); nil is no limit.
        let limits: [(Int32, UInt64?)] = [(7, profile.limits.openFiles), (6, profile.limits.processes), (4, profile.limits.coreBytes),
                                          (1, profile.limits.fileSizeBytes), (9, profile.limits.addressSpaceLimit(guestRAMBytes: memoryBytes))]
        let cLimits = limits.map { hv_jail_limit(resource: $0.0, value: $0.1 ?? UInt64.max) }

        let argv = [executable] + arguments
        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        let cEnv: [UnsafeMutablePointer<CChar>?] = [strdup("HV_SANDBOXED=1"), nil]
        var cStrings: [UnsafeMutablePointer<CChar>?] = []
        func c(_ text: String) -> UnsafePointer<CChar>? {
            let copy = strdup(text)
            cStrings.append(copy)
            return UnsafePointer(copy)
        }
        let cSteps = plan.steps.map { step in
            hv_jail_step(kind: step.kind.rawValue, directory: step.directory ? 1 : 0, fd: step.fd, flags: step.flags,
                         path: c(step.path), source: c(step.source))
        }
        let cRoot = c(JailPlan.root), cRootOptions = c("size=\(64 * 1024 + pluginBytes),mode=0755")
        defer { (cArgs + cEnv + cStrings).forEach { free($0) } }
        // The device's stdin and stdout are /dev/null; stderr is what the caller gives (for a VM's
        // device, a pipe the core reads and prefixes, so a device cannot pose as hvctl).
        let mapping = [(Int32(0), devNull.rawValue), (Int32(1), devNull.rawValue), (Int32(2), stderr),
                       (Self.stage2FilterFD, stage2.rawValue), (Self.deviceBinaryFD, deviceBinary.rawValue)] + inherit
        let childFDs = mapping.map(\.0)
        let parentFDs = mapping.map(\.1)
        // v1 groups the child joins itself, before its jail is built; the rest is done by pid below.
        let (taskFiles, byPID) = try placement?.openingV1TaskFiles() ?? ([], nil)
        let joinFDs = taskFiles.map(\.rawValue)
        var pidfd: Int32 = -1
        // The mapping and the jail hold bare numbers and pointers: every owner must outlive the
        // clone, which dups them (an optimized build otherwise closes an owner right after its
        // last use above).
        let pid = withExtendedLifetime((deviceBinary, stage2, copied, devNull, taskFiles)) {
            cSteps.withUnsafeBufferPointer { steps in
                cLimits.withUnsafeBufferPointer { limitList in
                    programs.startup.withUnsafeBytes { startup in
                        var jail = hv_jail(root: cRoot, root_options: cRootOptions, steps: steps.baseAddress, nsteps: Int32(steps.count),
                                           limits: limitList.baseAddress, nlimits: Int32(limitList.count), outlive_parent: detached ? 1 : 0,
                                           startup_filter: startup.baseAddress, startup_filter_bytes: UInt(startup.count))
                        return hv_spawn_in_namespaces(&jail, deviceBinary.rawValue, cArgs, cEnv, childFDs, parentFDs, Int32(mapping.count),
                                                      joinFDs, Int32(joinFDs.count), cloneFlags, detached ? 0 : 1, syncRead.rawValue, &pidfd)
                    }
                }
            }
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

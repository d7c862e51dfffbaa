import Glibc
import HVCore
import HVSys
import Synchronization

/// One cgroup hierarchy hv can place VMs in: a v1 hierarchy (one or more controllers mounted
/// together, e.g. `cpu,cpuacct`) or the v2 unified tree.
public struct CGroupHierarchy: Equatable, Sendable {
    public enum Version: String, Sendable { case v1, v2 }
    public var version: Version
    /// Where it is mounted, e.g. /sys/fs/cgroup/memory.
    public var mountPoint: String
    /// This process's group in it, as a directory: where VMs go unless told otherwise.
    public var ownGroup: String
    /// The controllers hv uses (of `CGroupLayout.controllers`) that this hierarchy offers.
    public var controllers: [String]
}

/// The cgroup hierarchies of this host that offer the controllers hv limits VMs with. Hosts have
/// cgroup v2 (one tree), the v1 layout (a hierarchy per controller), or a hybrid of both (v1
/// controllers plus an often empty v2 tree); each controller is used where it is mounted.
public struct CGroupLayout: Equatable, Sendable {
    /// cpu (quota, weight), memory (limits, OOM), pids (process count), and the block I/O
    /// controller (v1 `blkio`, v2 `io`), used only by VMs with disk I/O limits.
    public static let controllers = ["cpu", "memory", "pids", "blkio", "io"]
    /// The block I/O controller's names.
    public static let ioControllers = ["blkio", "io"]

    public var hierarchies: [CGroupHierarchy]

    public func hierarchy(for controller: String) -> CGroupHierarchy? {
        hierarchies.first { $0.controllers.contains(controller) }
    }

    /// Reads the layout from `mountinfo` (/proc/self/mountinfo) and `selfCgroup`
    /// (/proc/self/cgroup); `enabledControllers` gives a v2 group's `cgroup.controllers`.
    public static func detect(mountinfo: String, selfCgroup: String, enabledControllers: (String) -> [String]) -> CGroupLayout {
        var v1Paths: [String: String] = [:], v2Path: String?
        for line in selfCgroup.split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
            guard fields.count == 3 else { continue }
            if fields[0] == "0" && fields[1].isEmpty { v2Path = fields[2] }
            for controller in fields[1].split(separator: ",") { v1Paths[String(controller)] = fields[2] }
        }
        func relative(_ path: String, to root: String) -> String {
            if root == "/" { return path == "/" ? "" : path }
            if path == root { return "" }
            return path.hasPrefix(root + "/") ? String(path.dropFirst(root.count)) : path
        }
        var hierarchies: [CGroupHierarchy] = [], taken = Set<String>()
        var unified: (mountPoint: String, root: String)?
        for line in mountinfo.split(separator: "\n") {
            let fields = line.split(separator: " ").map(String.init)
            guard let dash = fields.firstIndex(of: "-"), dash >= 5, fields.count > dash + 3 else { continue }
            let root = fields[3], mountPoint = fields[4], type = fields[dash + 1]
            if type == "cgroup2" {
                if unified == nil { unified = (mountPoint, root) }
                continue
            }
            guard type == "cgroup" else { continue }
            let options = fields[dash + 3].split(separator: ",").map(String.init)
            let offered = controllers.filter { options.contains($0) && !taken.contains($0) }
            guard let first = offered.first, let path = v1Paths[first] else { continue }
            offered.forEach { taken.insert($0) }
            hierarchies.append(CGroupHierarchy(version: .v1, mountPoint: mountPoint, ownGroup: mountPoint + relative(path, to: root), controllers: offered))
        }
        if let unified, let v2Path {
            let own = unified.mountPoint + relative(v2Path, to: unified.root)
            let enabled = enabledControllers(own)
            let offered = controllers.filter { !taken.contains($0) && enabled.contains($0) }
            if !offered.isEmpty {
                hierarchies.append(CGroupHierarchy(version: .v2, mountPoint: unified.mountPoint, ownGroup: own, controllers: offered))
            }
        }
        return CGroupLayout(hierarchies: hierarchies)
    }

    /// This host's layout, as this process sees it.
    public static func host() -> CGroupLayout {
        func read(_ path: String) -> String {
            guard let fd = try? FileDescriptor.open(path, flags: O_RDONLY), let bytes = try? fd.readAll() else { return "" }
            return String(decoding: bytes, as: UTF8.self)
        }
        return detect(mountinfo: read("/proc/self/mountinfo"), selfCgroup: read("/proc/self/cgroup")) { group in
            read(group + "/cgroup.controllers").split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init)
        }
    }
}

/// A VM's cgroups: a group `hv-NAME-PID` under the parent (by default the group hvctl runs in)
/// in each hierarchy, holding `core` (hvctl: the vCPUs and the VM's own threads) and a group per
/// device process. The VM's group carries the VM's limits (CPU quota and weight, memory, pids);
/// a device's group its own memory cap, if one is set. A device that runs away is OOM-killed
/// alone and restarted: devices are the OOM killer's first choice (oom_score_adj 500), so the
/// core is never taken while a device is there.
///
/// Groups are removed when hvctl ends, however it ends (`kill -9` included), by
/// `hv-cgroup-reaper`: a small process started with the groups, outside them, that waits for
/// hvctl's end (a socket only hvctl holds closes) and for the groups to empty, then removes them.
/// hvctl also lends it the VM's KVM handle on the way out (`outlive`), so that KVM's teardown of
/// the VM, which waits out grace periods (about 16 ms here, most of it the in-kernel PIT's),
/// happens there rather than in hvctl's exit.
public final class ResourceGroups: Sendable {
    /// Each hierarchy with the VM's group directory in it.
    public let groups: [(hierarchy: CGroupHierarchy, directory: String)]
    private let current: Mutex<EffectiveLimits>
    /// Each disk device's block devices (`MAJ:MIN` of the whole disks its images lie on), which
    /// its I/O limits apply to.
    private let blockDevices = Mutex<[String: [String]]>([:])
    /// hvctl's end of the socket to the reaper; its closing at hvctl's exit is the reaper's signal.
    private let reaperChannel = Mutex<SeqPacketSocket?>(nil)

    /// The OOM score devices get: they are restartable, the core is not.
    static let deviceOOMScoreAdjust: Int32 = 500

    private init(groups: [(hierarchy: CGroupHierarchy, directory: String)], limits: EffectiveLimits) {
        self.groups = groups
        current = Mutex(limits)
    }

    /// The limits in force.
    public var limits: EffectiveLimits { current.withLock { $0 } }

    /// Creates the VM's groups under `parent` (a group path such as `/hv.slice`, the same in every
    /// hierarchy; nil: hvctl's own group in each), sets `limits`, starts the reaper and moves
    /// hvctl into `core`. `explicit` names the limits the user set: a controller one of them
    /// needs that the host does not offer is an error; hv's defaults are applied where they can be.
    public static func create(vm name: String, layout: CGroupLayout, parent: String?, limits: EffectiveLimits,
                              explicit: VMDefinition.Limits, reaperExecutable: String) throws(UsageError) -> ResourceGroups {
        var needed: [(VMDefinition.Limits.Field, String)] = []
        if explicit.cpuQuota != nil { needed.append((.cpuQuota, "cpu")) }
        if explicit.cpuWeight != nil { needed.append((.cpuWeight, "cpu")) }
        if explicit.memoryMiB != nil { needed.append((.memoryMiB, "memory")) }
        if explicit.deviceMemoryMiB != nil { needed.append((.deviceMemoryMiB, "memory")) }
        if explicit.pids != nil { needed.append((.pids, "pids")) }
        for (field, controller) in needed where layout.hierarchy(for: controller) == nil {
            throw UsageError(message: "\(field.flag) needs the cgroup '\(controller)' controller, which this host does not offer (see /proc/self/cgroup and /proc/self/mountinfo); leave \(field.flag) out or enable the controller")
        }
        // The block I/O hierarchy only for a VM that limits its disks' I/O: each further
        // hierarchy is another group to make, set and join at every start.
        let limitsIO = limits.diskIO != nil
        if limitsIO && !CGroupLayout.ioControllers.contains(where: { layout.hierarchy(for: $0) != nil }) {
            throw UsageError(message: "\(VMDefinition.Limits.Field.diskIO.flag) needs the cgroup 'io' (v2) or 'blkio' (v1) controller, which this host does not offer; leave it out (a disk's rate_limit meters the guest's requests without it)")
        }
        let layout = CGroupLayout(hierarchies: layout.hierarchies.compactMap { hierarchy -> CGroupHierarchy? in
            var used = hierarchy
            if !limitsIO { used.controllers.removeAll { CGroupLayout.ioControllers.contains($0) } }
            return used.controllers.isEmpty ? nil : used
        })
        let groupName = "hv-\(name)-\(getpid())"
        var made: [(hierarchy: CGroupHierarchy, directory: String)] = []
        func undo() { for g in made { removeGroup(g.directory) } }
        for hierarchy in layout.hierarchies {
            let parentDirectory = parent.map { hierarchy.mountPoint + ($0 == "/" ? "" : $0) } ?? hierarchy.ownGroup
            var st = stat()
            guard stat(parentDirectory, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
                undo()
                throw UsageError(message: "the cgroup parent \(parentDirectory) (\(hierarchy.controllers.joined(separator: ","))) does not exist; create and delegate it first, or leave --cgroup-parent out")
            }
            sweepStaleGroups(in: parentDirectory)
            let directory = parentDirectory + "/" + groupName
            guard mkdir(directory, 0o755) == 0 || errno == EEXIST, mkdir(directory + "/core", 0o755) == 0 || errno == EEXIST else {
                let why = Errno.current
                undo()
                throw UsageError(message: "cannot create the VM's cgroup \(directory): \(why)\(why == .permissionDenied ? "; run hvctl as root, or give --cgroup-parent a group delegated to you" : "")")
            }
            made.append((hierarchy, directory))
        }
        let groups = ResourceGroups(groups: made, limits: limits)
        do throws(UsageError) {
            let reaperLauncher = try groups.startReaper(reaperExecutable)
            // After hvctl's move (a thread made before it would block the move's fast path).
            defer { groups.reapInBackground(reaperLauncher, reaperExecutable) }
            let v1Only = made.allSatisfy { $0.hierarchy.version == .v1 }
            // hvctl goes into `core` before v2 controllers are enabled: a v2 group with controllers
            // enabled for its children may hold no process itself, and hvctl's own group may be the parent.
            if !v1Only { try groups.join(pid: getpid(), member: "core") }
            for (hierarchy, directory) in made where hierarchy.version == .v2 {
                let parentDirectory = String(directory[..<directory.lastIndex(of: "/")!])
                let enable = hierarchy.controllers.map { "+" + $0 }.joined(separator: " ")
                for group in [parentDirectory, directory] {
                    do { try write(enable, to: group + "/cgroup.subtree_control") } catch {
                        throw UsageError(message: "cannot enable the \(hierarchy.controllers.joined(separator: ", ")) controllers in \(group): \(error.errno)\(error.errno == Errno(rawValue: EBUSY) ? " (the group holds processes other than hvctl; run hvctl in a group of its own, e.g. systemd-run --scope -p Delegate=yes, or give --cgroup-parent)" : "")")
                    }
                }
            }
            try groups.apply(limits)
            if v1Only {
                // hvctl moves itself while it has one thread, by writing 0 into `core`'s `tasks`:
                // at once, where a move by pid first waits out an RCU grace period (about 10 ms
                // here) and holds up every fork and new thread meanwhile. Every thread made after
                // (the vCPUs', the devices' supervisors) is born in `core`; devices join their own
                // groups themselves as they start (`SandboxPlan.spawn`).
                let core = ProcessPlacement(cgroupDirectories: made.map { $0.directory + "/core" })
                let movedAtOnce: Bool
                do { movedAtOnce = try core.applyToSingleThreadedSelf() } catch {
                    throw UsageError(message: "cannot move hvctl into the VM's cgroup core: \(error)")
                }
                if !movedAtOnce {
                    // Threads already run: the move by pid, overlapped with building the VM.
                    do {
                        _ = try HostThread.spawn(name: "hv-cgroup-join") {
                            do throws(UsageError) { try groups.join(pid: getpid(), member: "core") } catch { warn(error.message) }
                        }
                    } catch {
                        try groups.join(pid: getpid(), member: "core")
                    }
                }
            }
        } catch {
            groups.abandon()
            throw error
        }
        return groups
    }

    /// Outside the VM's groups: where hvctl started on v1; the v2 root on v2, the one group
    /// that may hold processes beside enabled controllers (hvctl's own may now be the VM's parent).
    /// For the reaper, and for a segment's switch, which outlives the VM that starts it.
    public var outside: ProcessPlacement {
        ProcessPlacement(cgroupDirectories: groups.map { $0.hierarchy.version == .v1 ? $0.hierarchy.ownGroup : $0.hierarchy.mountPoint })
    }

    /// The placement of device `member` (its group made, its memory limit set, and for a disk
    /// its I/O limits on `blockDevices`, the `MAJ:MIN` of the whole disks its images lie on).
    public func placement(for member: String, blockDevices devices: [String] = []) throws(UsageError) -> ProcessPlacement {
        var directories: [String] = []
        let limits = self.limits
        blockDevices.withLock { $0[member] = devices }
        for (hierarchy, directory) in groups {
            let group = directory + "/" + member
            guard mkdir(group, 0o755) == 0 || errno == EEXIST else {
                throw UsageError(message: "cannot create the cgroup \(group) for device \(member): \(Errno.current)")
            }
            for (file, value) in Self.deviceSettings(hierarchy, limits, blockDevices: devices) { try Self.set(file, value, in: group) }
            directories.append(group)
        }
        return ProcessPlacement(cgroupDirectories: directories, oomScoreAdjust: Self.deviceOOMScoreAdjust)
    }

    /// Whether the VM's disks can get I/O limits: it has groups in the block I/O hierarchy (made
    /// only for a VM started with disk I/O limits).
    public var limitsDiskIO: Bool {
        groups.contains { group in group.hierarchy.controllers.contains { CGroupLayout.ioControllers.contains($0) } }
    }

    /// Sets `limits` on the VM's group and its devices' (at start and by `hvctl set`).
    public func apply(_ limits: EffectiveLimits) throws(UsageError) {
        let devices = blockDevices.withLock { $0 }
        for (hierarchy, directory) in groups {
            for (file, value) in Self.vmSettings(hierarchy, limits) { try Self.set(file, value, in: directory) }
            for member in Self.subgroups(of: directory) where member != "core" {
                for (file, value) in Self.deviceSettings(hierarchy, limits, blockDevices: devices[member] ?? []) {
                    try Self.set(file, value, in: directory + "/" + member)
                }
            }
        }
        current.withLock { $0 = limits }
    }

    /// The files and values that put `limits` on a VM's group in `hierarchy`, in the order they
    /// are written (v1: `cpu.cfs_*`, `cpu.shares`, `memory.limit_in_bytes`; v2: `cpu.max`,
    /// `cpu.weight`, `memory.max`; both `pids.max`).
    static func vmSettings(_ hierarchy: CGroupHierarchy, _ limits: EffectiveLimits) -> [(file: String, value: String)] {
        let v1 = hierarchy.version == .v1
        var settings: [(file: String, value: String)] = []
        if hierarchy.controllers.contains("cpu") {
            let quota = limits.cpuQuota.map { Int(($0 * 100_000).rounded()) }
            if v1 {
                settings += [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", quota.map { "\($0)" } ?? "-1"),
                             ("cpu.shares", "\(max(2, UInt64(limits.cpuWeight) * 1024 / 100))")]
            } else {
                settings += [("cpu.max", (quota.map { "\($0)" } ?? "max") + " 100000"), ("cpu.weight", "\(limits.cpuWeight)")]
            }
        }
        if hierarchy.controllers.contains("memory") { settings.append((v1 ? "memory.limit_in_bytes" : "memory.max", "\(limits.memoryBytes)")) }
        if hierarchy.controllers.contains("pids") { settings.append(("pids.max", "\(limits.pids)")) }
        return settings
    }

    /// The files and values for one device's group: its memory cap, if it has one of its own,
    /// and a disk's I/O limits on each of `blockDevices` (v1: `blkio.throttle.*_device`, 0 for no
    /// limit; v2: `io.max`, `max` for none; throttling is not hierarchical on v1, so it goes on
    /// the device's own group on both). Written whenever the hierarchy has the controller, so a
    /// limit removed at run time is removed from the kernel too.
    static func deviceSettings(_ hierarchy: CGroupHierarchy, _ limits: EffectiveLimits, blockDevices: [String] = []) -> [(file: String, value: String)] {
        var settings: [(file: String, value: String)] = []
        if hierarchy.controllers.contains("memory"), let bytes = limits.deviceMemoryBytes {
            settings.append((hierarchy.version == .v1 ? "memory.limit_in_bytes" : "memory.max", "\(bytes)"))
        }
        let io = limits.diskIO ?? VMDefinition.Limits.DiskIO()
        for device in blockDevices {
            if hierarchy.version == .v1 && hierarchy.controllers.contains("blkio") {
                settings += [("blkio.throttle.read_bps_device", "\(device) \(io.readBps ?? 0)"),
                             ("blkio.throttle.write_bps_device", "\(device) \(io.writeBps ?? 0)"),
                             ("blkio.throttle.read_iops_device", "\(device) \(io.readIops ?? 0)"),
                             ("blkio.throttle.write_iops_device", "\(device) \(io.writeIops ?? 0)")]
            } else if hierarchy.version == .v2 && hierarchy.controllers.contains("io") {
                func value(_ v: UInt64?) -> String { (v ?? 0) == 0 ? "max" : "\(v!)" }
                settings.append(("io.max", "\(device) rbps=\(value(io.readBps)) wbps=\(value(io.writeBps)) riops=\(value(io.readIops)) wiops=\(value(io.writeIops))"))
            }
        }
        return settings
    }

    /// What the VM uses now: memory (bytes) and processes/threads, where the host counts them.
    public func usage() -> (memoryBytes: UInt64?, pids: UInt64?) {
        var memory: UInt64?, pids: UInt64?
        for (hierarchy, directory) in groups {
            if hierarchy.controllers.contains("memory") {
                memory = Self.readNumber(directory + (hierarchy.version == .v1 ? "/memory.usage_in_bytes" : "/memory.current"))
            }
            if hierarchy.controllers.contains("pids") { pids = Self.readNumber(directory + "/pids.current") }
        }
        return (memory, pids)
    }

    /// Whether the pids limit has refused a fork or a thread. `pids.events` counts them; v1
    /// counts in the group that forked (`core`, a device's), v2 in the limited one: read all.
    public func pidsLimitReached() -> Bool {
        guard let (_, directory) = groups.first(where: { $0.hierarchy.controllers.contains("pids") }) else { return false }
        return ([directory] + Self.subgroups(of: directory).map { directory + "/" + $0 }).contains { group in
            guard let fd = try? FileDescriptor.open(group + "/pids.events", flags: O_RDONLY), let bytes = try? fd.readAll() else { return false }
            return String(decoding: bytes, as: UTF8.self).split(separator: "\n").contains { line in
                let fields = line.split(separator: " ")
                return fields.count == 2 && fields[0] == "max" && (UInt64(fields[1]) ?? 0) > 0
            }
        }
    }

    func join(pid: pid_t, member: String) throws(UsageError) {
        do { try ProcessPlacement(cgroupDirectories: groups.map { $0.directory + "/" + member }).apply(to: pid) } catch {
            throw UsageError(message: "cannot move process \(pid) into the VM's cgroup \(member): \(error)")
        }
    }

    /// Starts `hv-cgroup-reaper` with the groups to remove, moved to where hvctl started (v1) or
    /// to the v2 root (which alone may hold processes beside enabled controllers). Returns its
    /// first process, which exits at once, for `reapInBackground`: waiting for it here would
    /// put the Swift runtime's start-up on the VM's launch, and a thread to wait for it made now
    /// would stop hvctl from moving itself into `core` as a single thread.
    private func startReaper(_ executable: String) throws(UsageError) -> ChildProcess {
        let (ours, theirs): (SeqPacketSocket, SeqPacketSocket)
        do { (ours, theirs) = try SeqPacketSocket.pair() } catch {
            throw UsageError(message: "cannot make a socket for the cgroup reaper: \(error)")
        }
        // On v1 it is born where hvctl still is (outside the VM's groups); on v2 it goes to the root.
        let moves = groups.filter { $0.hierarchy.version == .v2 }.flatMap { ["--move-to", $0.hierarchy.mountPoint] }
        let launcher: ChildProcess
        do {
            let null = try FileDescriptor.open("/dev/null", flags: O_RDWR)
            // It forks and its first process exits at once: the reaper is no child of hvctl's.
            launcher = try ChildProcess.spawn(path: executable, arguments: moves + groups.map(\.directory),
                                              inherit: [(0, null.rawValue), (1, null.rawValue), (2, null.rawValue), (3, theirs.fd.rawValue)])
        } catch {
            throw UsageError(message: "cannot start \(executable): \(error); rebuild hv with 'swift build'")
        }
        // Our end stays open for the rest of hvctl's life: its closing (at any exit) is the
        // reaper's signal. Never inherited: it is close-on-exec and devices get only the
        // descriptors they are handed.
        reaperChannel.withLock { $0 = ours }
        return launcher
    }

    /// Lends the reaper `machine`'s KVM handle, when the VM has run its course and hvctl is about
    /// to exit: the reaper closes it once hvctl is gone, before it removes the groups, so KVM's
    /// teardown of the VM (grace periods, the in-kernel PIT's worker) is not on hvctl's exit.
    /// Guest memory is hvctl's and goes with it; the reaper only holds the VM's kernel state, for
    /// milliseconds. Without a reaper (or if the lending fails) hvctl's exit tears the VM down.
    public func outlive(_ machine: Machine) {
        reaperChannel.withLock { channel in
            guard let channel else { return }
            try? machine.lendKVMHandle(through: channel)
        }
    }

    /// Reaps the reaper's first process in a thread of its own: its start-up (the Swift
    /// runtime's loading, several milliseconds) stays off the VM's critical path.
    private func reapInBackground(_ launcher: ChildProcess, _ executable: String) {
        do {
            _ = try HostThread.spawn(name: "hv-reaper-start") {
                let started = launcher.waitForExit()
                if started != .exited(0) { warn("\(executable) did not start (it \(started)): the VM's cgroups stay behind if hvctl is killed") }
            }
        } catch {
            _ = launcher.waitForExit()
        }
    }

    /// Undoes a half-made set of groups (a failure while creating them): hvctl leaves them for its
    /// original ones and they are removed now (a reaper already started removes them too, at exit).
    private func abandon() {
        _ = try? outside.apply(to: getpid())
        for g in groups { Self.removeGroup(g.directory) }
    }

    /// Removes a VM group and its subgroups (each must be empty of processes).
    static func removeGroup(_ directory: String) {
        for member in subgroups(of: directory) { rmdir(directory + "/" + member) }
        rmdir(directory)
    }

    /// Removes `hv-NAME-PID` groups whose hvctl is gone and which are empty (a reaper that was
    /// killed too); a group still holding processes fails to go and is left alone.
    static func sweepStaleGroups(in parent: String) {
        for name in subgroups(of: parent) where name.hasPrefix("hv-") {
            guard let dash = name.lastIndex(of: "-"), let pid = Int32(name[name.index(after: dash)...]), pid > 0,
                  kill(pid, 0) != 0 && errno == ESRCH else { continue }
            removeGroup(parent + "/" + name)
        }
    }

    static func subgroups(of directory: String) -> [String] {
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            guard entry.pointee.d_type == UInt8(DT_DIR) else { continue }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// `MAJ:MIN` of the whole disk the file `fd` lies on (a partition's disk); nil when its file
    /// system has no block device (tmpfs, overlay, NFS) or the device is not in /sys/dev/block.
    public static func wholeDisk(holding fd: FileDescriptor) -> String? {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else { return nil }
        let dev = UInt64(st.st_dev)
        // glibc's encoding of dev_t (gnu_dev_major/minor are macros Swift does not import).
        let major = (dev >> 8) & 0xFFF | (dev >> 32) & 0xFFFF_F000, minor = dev & 0xFF | (dev >> 12) & 0xFFFF_FF00
        guard major != 0 else { return nil }
        let node = "/sys/dev/block/\(major):\(minor)"
        guard access(node, F_OK) == 0 else { return nil }
        // A partition's directory sits inside its disk's: the disk's `dev` is one level up.
        guard access(node + "/partition", F_OK) == 0 else { return "\(major):\(minor)" }
        guard let file = try? FileDescriptor.open(node + "/../dev", flags: O_RDONLY), let bytes = try? file.readAll() else { return nil }
        let text = String(decoding: bytes, as: UTF8.self).split(separator: "\n").first.map(String.init) ?? ""
        return text.contains(":") ? text : nil
    }

    private static func set(_ file: String, _ value: String, in directory: String) throws(UsageError) {
        do { try write(value, to: directory + "/" + file) } catch {
            throw UsageError(message: "cannot set \(directory)/\(file) to \(value): \(error.errno)\(error.errno == Errno(rawValue: EBUSY) ? " (the group already uses more than that)" : "")")
        }
    }

    private static func write(_ value: String, to path: String) throws(SystemError) {
        let fd = try FileDescriptor.open(path, flags: O_WRONLY)
        try fd.writeAll(Array((value + "\n").utf8))
    }

    private static func readNumber(_ path: String) -> UInt64? {
        guard let fd = try? FileDescriptor.open(path, flags: O_RDONLY), let bytes = try? fd.readAll() else { return nil }
        return UInt64(String(decoding: bytes, as: UTF8.self).split(separator: "\n").first ?? "")
    }
}

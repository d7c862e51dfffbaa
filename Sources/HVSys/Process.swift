import CHVShim
import Glibc

/// A child process, tracked through a pidfd so its death can be polled alongside other fds and
/// its pid can never be confused with a recycled one.
public final class ChildProcess: Sendable {
    /// The child's pid (for messages; signal it through `pidfd`).
    public let pid: pid_t
    /// A pidfd: readable once the child has exited.
    public let pidfd: FileDescriptor

    /// Adopts a child started some other way (e.g. clone3 into new namespaces).
    public init(pid: pid_t, pidfd: FileDescriptor) {
        self.pid = pid
        self.pidfd = pidfd
    }

    /// Starts `path` with `arguments`. `inherit` maps child descriptor numbers to parent descriptors;
    /// every other descriptor of the parent is close-on-exec in hv, so only these reach the child.
    public static func spawn(path: String, arguments: [String], environment: [String] = [],
                             inherit: [(child: Int32, parent: Int32)]) throws(SystemError) -> ChildProcess {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // dup2 onto a number equal to the source would keep FD_CLOEXEC; go through a free slot first.
        for (child, parent) in inherit {
            if child == parent {
                posix_spawn_file_actions_adddup2(&actions, parent, 100 + child)
                posix_spawn_file_actions_adddup2(&actions, 100 + child, child)
                posix_spawn_file_actions_addclose(&actions, 100 + child)
            } else {
                posix_spawn_file_actions_adddup2(&actions, parent, child)
            }
        }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Children start with default signal dispositions and an empty mask, whatever the core set.
        var all = sigset_t()
        sigfillset(&all)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setsigmask(&attr, &none)
        // Its own process group: a Ctrl-C on the terminal reaches hvctl, which then stops the
        // devices in order, instead of killing every device at once.
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP))

        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
        if rc != 0 { throw SystemError("spawn \(path)", Errno(rawValue: rc)) }
        let pidfd = hv_pidfd_open(pid)
        if pidfd < 0 {
            let e = Errno.current
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            throw SystemError("pidfd_open \(pid)", e)
        }
        return ChildProcess(pid: pid, pidfd: FileDescriptor(owning: pidfd))
    }

    /// Sends a signal through the pidfd (never hits a recycled pid).
    public func signal(_ sig: Int32) { _ = hv_pidfd_send_signal(pidfd.rawValue, sig) }

    /// How a child ended.
    public enum Termination: Sendable, Equatable, CustomStringConvertible {
        case exited(Int32)
        case signalled(Int32)
        public var description: String {
            switch self {
            case .exited(let code): return "exited with status \(code)"
            case .signalled(let sig): return "killed by signal \(sig) (\(String(cString: strsignal(sig))))"
            }
        }
    }

    /// Reaps the child if it has exited; nil while it still runs.
    public func reapIfExited() -> Termination? {
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        guard r == pid else { return nil }
        // WIFEXITED etc. are macros; decode the classic wait status layout.
        let sig = status & 0x7f
        if sig == 0 { return .exited((status >> 8) & 0xff) }
        return .signalled(sig)
    }

    /// Waits for the child to end, and reaps it.
    public func waitForExit() -> Termination {
        var status: Int32 = 0
        _ = retryOnInterrupt { waitpid(pid, &status, 0) }
        let sig = status & 0x7f
        return sig == 0 ? .exited((status >> 8) & 0xff) : .signalled(sig)
    }

    /// Kills and reaps, blocking until gone.
    public func killAndReap() {
        signal(SIGKILL)
        var status: Int32 = 0
        _ = retryOnInterrupt { waitpid(pid, &status, 0) }
    }
}

/// Arranges for this process to receive SIGKILL when its parent dies, and exits at once if the
/// parent is already gone. Device processes call this first.
public func dieWithParent() {
    _ = hv_prctl(PR_SET_PDEATHSIG, UInt(SIGKILL), 0, 0, 0)
    if getppid() == 1 { _exit(1) }
}

/// Arranges for `signal` to reach this process when `parent` (the process that started it)
/// dies; false when `parent` is already gone (this process has been re-parented). Unlike
/// `dieWithParent`, the signal can be one the process handles, so it can shut down in order.
public func signalWhenParentDies(_ signal: Int32, parent: pid_t) -> Bool {
    _ = hv_prctl(PR_SET_PDEATHSIG, UInt(signal), 0, 0, 0)
    return getppid() == parent
}

/// Closes every descriptor from `first` up, whatever opened it: a process that outlives its
/// parent (a detached VM) must not keep the parent's pipes and sockets open, or whoever waits
/// for their end-of-file (a shell's `$(…)`, Foundation's `Process`) waits as long as the VM runs.
public func closeDescriptors(from first: Int32) {
    _ = hv_close_range(UInt32(first), UInt32.max)
}

/// Where a new process goes before it runs its own code: the cgroups it joins (a directory per
/// hierarchy: one on cgroup v2, one per controller on v1) and how readily the OOM killer picks it.
/// The parent applies it while the child waits, or hands the child its v1 groups' `tasks` files to
/// join them itself before it runs anything else (see `SandboxPlan.spawn`), so no instruction of
/// the device runs outside its limits.
public struct ProcessPlacement: Sendable, Equatable {
    /// cgroup directories the process goes into (v1: one per hierarchy; v2: one).
    public var cgroupDirectories: [String]
    /// /proc/PID/oom_score_adj (-1000…1000); nil leaves the inherited value.
    public var oomScoreAdjust: Int32?

    public init(cgroupDirectories: [String], oomScoreAdjust: Int32? = nil) {
        self.cgroupDirectories = cgroupDirectories
        self.oomScoreAdjust = oomScoreAdjust
    }

    /// Moves `pid` (the whole process, every thread) into the groups and sets its OOM score.
    public func apply(to pid: pid_t) throws(SystemError) {
        for directory in cgroupDirectories {
            try Self.write("\(pid)\n", to: directory + "/cgroup.procs")
        }
        if let oomScoreAdjust { try Self.write("\(oomScoreAdjust)\n", to: "/proc/\(pid)/oom_score_adj") }
    }

    /// The placement split for a new process that joins its cgroup v1 groups itself: the `tasks`
    /// file of each v1 directory (v2 groups have none), opened here for the child to write `0`
    /// into while it has a single thread, and the rest (v2 directories, the OOM score) for
    /// `apply(to:)`. On v1, a move by pid takes `cgroup_threadgroup_rwsem` for writing, which
    /// first waits out an RCU grace period (~10 ms on this host) and stalls every fork and new
    /// thread of the host meanwhile; a thread moving only itself does not take it.
    public func openingV1TaskFiles() throws(SystemError) -> (taskFiles: [FileDescriptor], rest: ProcessPlacement) {
        var taskFiles: [FileDescriptor] = [], rest = ProcessPlacement(cgroupDirectories: [], oomScoreAdjust: oomScoreAdjust)
        for directory in cgroupDirectories {
            if Self.isV1Group(directory) {
                taskFiles.append(try FileDescriptor.open(directory + "/tasks", flags: O_WRONLY))
            } else {
                rest.cgroupDirectories.append(directory)
            }
        }
        return (taskFiles, rest)
    }

    /// Moves the calling process into the groups, all v1, if it has one thread: `0` into each
    /// directory's `tasks` file (no RCU grace period, see `openingV1TaskFiles`). False, having
    /// moved nothing, when it has more than one thread (a `tasks` write moves only the caller) or
    /// a directory is not v1; the caller then moves it by pid (`apply(to:)`).
    public func applyToSingleThreadedSelf() throws(SystemError) -> Bool {
        guard Self.threadCount() == 1, cgroupDirectories.allSatisfy(Self.isV1Group) else { return false }
        for directory in cgroupDirectories { try Self.write("0", to: directory + "/tasks") }
        if let oomScoreAdjust { try Self.write("\(oomScoreAdjust)\n", to: "/proc/self/oom_score_adj") }
        return true
    }

    /// Whether `directory` is a cgroup v1 group: v1 groups have a `tasks` file, v2 groups none.
    private static func isV1Group(_ directory: String) -> Bool {
        access(directory + "/tasks", F_OK) == 0
    }

    /// This process's thread count (/proc/self/status `Threads:`); nil if unreadable.
    static func threadCount() -> Int? {
        guard let fd = try? FileDescriptor.open("/proc/self/status", flags: O_RDONLY), let bytes = try? fd.readAll() else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("Threads:") {
            return Int(line.dropFirst("Threads:".count).trimmingPrefix(while: { $0 == " " || $0 == "\t" }))
        }
        return nil
    }

    private static func write(_ text: String, to path: String) throws(SystemError) {
        let fd = try FileDescriptor.open(path, flags: O_WRONLY)
        try fd.writeAll(Array(text.utf8))
    }

    /// How many processes the OOM killer has killed in the memory group among
    /// `cgroupDirectories` (v1 `memory.oom_control`, v2 `memory.events`); nil if none says.
    public func oomKillCount() -> UInt64? {
        for directory in cgroupDirectories {
            for file in ["/memory.oom_control", "/memory.events"] {
                guard let fd = try? FileDescriptor.open(directory + file, flags: O_RDONLY), let bytes = try? fd.readAll() else { continue }
                for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
                    let fields = line.split(separator: " ")
                    if fields.count == 2 && fields[0] == "oom_kill", let count = UInt64(fields[1]) { return count }
                }
            }
        }
        return nil
    }
}

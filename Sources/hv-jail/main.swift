import CHVShim
import CLibcap
import CSeccomp
import Glibc
import HVSandbox
import HVSys

// hv-jail: trusted code that turns a freshly cloned process into a sandboxed device.
//
// The core starts it with clone3 in new user, pid, mount, net, ipc and uts namespaces, maps
// uid/gid 0 inside (and nothing else) to the VM's tenant uid/gid outside, and hands it fds 0–4. hv-jail
// then builds an empty, read-only root holding just what the device needs, pivots into it, drops
// every capability and privilege, applies rlimits and the profile's seccomp filter, and execs the
// device. The filter it loads allows the device's start-up syscalls too (the dynamic loader needs
// openat/mmap); the device SDK installs the second, stricter stage (fd 5, pre-compiled here) before
// it reads any message, so execve/openat are gone before untrusted input is touched.
//
// usage: hv-jail --profile FILE --memory BYTES [--expose PATH]... -- DEVICE [ARG]...
// The core also hands over fd 7 (the DEVICE executable) and fd 8 (the profile FILE), opened with
// its own rights: this process is already the tenant's uid and may not be able to reach either
// path (nor could it bind a file from the parent's mount namespace). The device is executed from
// fd 7, so its binary never appears in the new root; the paths only name things in messages.

let newRoot = "/mnt"
let stage2FD: Int32 = 5
let deviceFD: Int32 = 7
let profileFD: Int32 = 8

func die(_ message: String) -> Never {
    let line = "hv-jail: \(message)\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    _exit(126)
}

func require(_ ok: Bool, _ what: @autoclosure () -> String) {
    if !ok { die("\(what()): \(Errno.current)") }
}

// MARK: Arguments

var profilePath: String?
var memoryBytes: UInt64 = 0
var exposed: [String] = []
var device: [String] = []
/// A segment's switch serves several VMs: it must not die with the VM that happened to start it.
var outliveParent = false
/// Files the core opened for an interpreted plugin (its script, its modules), by descriptor.
var pluginFiles: [(fd: Int32, name: String)] = []
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--profile": profilePath = args.popFirst()
    case "--memory": memoryBytes = args.popFirst().flatMap { UInt64($0) } ?? 0
    case "--expose": if let p = args.popFirst() { exposed.append(p) }
    case "--outlive-parent": outliveParent = true
    case "--plugin-file":
        // FD:NAME, a file the core opened for an interpreted plugin, copied into /plugin/NAME.
        guard let spec = args.popFirst(), let colon = spec.firstIndex(of: ":"), let fd = Int32(spec[..<colon]), fd > profileFD,
              case let name = String(spec[spec.index(after: colon)...]), !name.isEmpty, name != ".", name != "..", !name.contains("/") else {
            die("--plugin-file takes FD:NAME")
        }
        pluginFiles.append((fd, name))
    case "--": device = Array(args); args = []
    default: die("unknown argument '\(a)'")
    }
}
guard let profilePath, let devicePath = device.first, devicePath.utf8.first == UInt8(ascii: "/") else {
    die("usage: hv-jail --profile FILE --memory BYTES [--expose PATH]... [--outlive-parent] -- /path/to/device [ARG]...")
}

// The profile is read before the root disappears; the core already validated it once.
let profile: SandboxProfile
do {
    profile = try SandboxProfile.load(json: try FileDescriptor(owning: profileFD).readAll(), source: profilePath) { name in
        let n = seccomp_syscall_resolve_name(name)
        return n == __NR_SCMP_ERROR ? nil : n
    }
} catch {
    die("\(error)")
}

// MARK: Filesystem: an empty tmpfs root with read-only binds of exactly what the device needs

require(mount(nil, "/", nil, UInt(MS_REC | MS_PRIVATE), nil) == 0, "make mounts private")
// The root holds mount points, and an interpreted plugin's files: sized to fit them, no more.
var pluginBytes = 0
for file in pluginFiles {
    var st = stat()
    require(fstat(file.fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG, "plugin file \(file.name) (fd \(file.fd)) is a regular file")
    pluginBytes += (Int(st.st_size) + 4095) / 4096 * 4096
}
require(mount("hv-device-root", newRoot, "tmpfs", UInt(MS_NOSUID | MS_NODEV), "size=\(64 * 1024 + pluginBytes),mode=0755") == 0, "mount tmpfs on \(newRoot)")
if !pluginFiles.isEmpty {
    require(mkdir(newRoot + "/plugin", 0o755) == 0, "mkdir /plugin")
    for file in pluginFiles {
        let bytes: [UInt8]
        do { bytes = try FileDescriptor(owning: file.fd).readAll() } catch { die("read plugin file \(file.name): \(error)") }
        let out = open(newRoot + "/plugin/" + file.name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o444)
        require(out >= 0, "create /plugin/\(file.name)")
        let written = bytes.withUnsafeBytes { write(out, $0.baseAddress, $0.count) }
        require(written == bytes.count, "write /plugin/\(file.name)")
        close(out)
    }
}

func isSymlink(_ path: String) -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink(path, &buffer, buffer.count - 1)
    guard n > 0 else { return nil }
    return String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

func isDirectory(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
}

nonisolated(unsafe) var bound: [String] = []

/// Bind-mounts host `source` at `inside` (in the new root) and remounts it read-only. The remount
/// must keep the flags the kernel locked on the source mount.
func mountReadOnly(_ source: String, at inside: String, recursive: Bool) {
    require(mount(source, inside, nil, UInt(recursive ? MS_BIND | MS_REC : MS_BIND), nil) == 0, "bind \(source)")
    var vfs = statvfs()
    _ = statvfs(source, &vfs)
    var flags = UInt(MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    // statvfs(3) ST_* bits (not exported by the Glibc module): NOEXEC 8, NOATIME 1024, RELATIME 4096.
    if vfs.f_flag & 8 != 0 { flags |= UInt(MS_NOEXEC) }
    if vfs.f_flag & 1024 != 0 { flags |= UInt(MS_NOATIME) }
    if vfs.f_flag & 4096 != 0 { flags |= UInt(MS_RELATIME) }
    require(mount(nil, inside, nil, flags, nil) == 0, "remount \(source) read-only")
}  // hv-jail is single-threaded

/// Makes host `path` visible read-only at the same path in the new root, recreating any
/// symlinks on the way (e.g. Debian's /lib → usr/lib) so the dynamic loader's paths resolve.
func expose(_ path: String, depth: Int = 0) {
    guard depth < 16 else { die("too many symlinks exposing \(path)") }
    if bound.contains(where: { path == $0 || path.hasPrefix($0 + "/") }) { return }  // already visible
    let parts = path.split(separator: "/").map(String.init)
    var prefix = ""
    for (i, part) in parts.enumerated() {
        prefix += "/" + part
        let inside = newRoot + prefix
        if let target = isSymlink(prefix) {
            if isSymlink(inside) == nil { _ = symlink(target, inside) }
            if bound.contains(where: { prefix.hasPrefix($0 + "/") }) { return }  // the link lives in a bound tree
            let resolved = target.utf8.first == UInt8(ascii: "/") ? target : String(prefix[..<prefix.lastIndex(of: "/")!]) + "/" + target
            let rest = parts[(i + 1)...].joined(separator: "/")
            expose(rest.isEmpty ? resolved : resolved + "/" + rest, depth: depth + 1)
            return
        }
        if i < parts.count - 1 {
            _ = mkdir(inside, 0o755)
            continue
        }
        if isDirectory(prefix) {
            _ = mkdir(inside, 0o755)
        } else {
            let fd = open(inside, O_CREAT | O_WRONLY | O_CLOEXEC, 0o444)
            if fd >= 0 { close(fd) }
        }
        mountReadOnly(prefix, at: inside, recursive: true)
        bound.append(prefix)
    }
}

// The x86-64 psABI fixes the dynamic loader's path; expose it last, through its symlinks.
for path in exposed + ["/lib64/ld-linux-x86-64.so.2"] where access(path, F_OK) == 0 { expose(path) }
// The device executable is not in the new root at all: it is executed from the core's descriptor.
require(mkdir(newRoot + "/.old", 0o700) == 0, "mkdir \(newRoot)/.old")
require(hv_pivot_root(newRoot, newRoot + "/.old") == 0, "pivot_root")
require(chdir("/") == 0, "chdir /")
require(umount2("/.old", Int32(MNT_DETACH)) == 0, "detach the old root")
_ = rmdir("/.old")
require(mount(nil, "/", nil, UInt(MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV), nil) == 0, "make the root read-only")
_ = sethostname("hv-device", 9)

// MARK: Credentials
//
// The device stays uid 0 *inside* its user namespace (the tenant's uid outside, the only id
// mapped), but with no capabilities at all, now or after execve: the bounding, inheritable and
// ambient sets are emptied, and SECBIT_NOROOT (locked) stops the kernel from granting root
// capabilities on exec.

require(setgroups(0, nil) == 0, "drop supplementary groups")
for cap in 0...Int32(CAP_LAST_CAP) { _ = hv_prctl(PR_CAPBSET_DROP, UInt(cap), 0, 0, 0) }
// SECBIT_NOROOT | _LOCKED | NO_SETUID_FIXUP | _LOCKED | KEEP_CAPS_LOCKED | NO_CAP_AMBIENT_RAISE | _LOCKED
require(hv_prctl(PR_SET_SECUREBITS, 0xEF, 0, 0, 0) == 0, "lock securebits")
let empty = cap_init()
require(cap_set_proc(empty) == 0, "drop capabilities")
cap_free(UnsafeMutableRawPointer(empty))
_ = hv_prctl(PR_CAP_AMBIENT, UInt(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
require(hv_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "no_new_privs")
// After the credential change: the kernel clears the parent-death signal on setuid.
if outliveParent {
    // Its own session: the starting VM's terminal signals (Ctrl-C, hang-up) do not reach it.
    _ = setsid()
} else {
    require(hv_prctl(PR_SET_PDEATHSIG, UInt(SIGKILL), 0, 0, 0) == 0, "pdeathsig")
}

// MARK: Resource limits

// Linux RLIMIT_* numbers (some are macros the Glibc module drops).
func limit(_ resource: Int32, _ value: UInt64?, _ name: String) {
    let v = value.map { rlim_t($0) } ?? rlim_t.max  // RLIM_INFINITY
    var r = rlimit(rlim_cur: v, rlim_max: v)
    require(setrlimit(__rlimit_resource_t(resource), &r) == 0, "setrlimit \(name)")
}
limit(7, profile.limits.openFiles, "nofile")
limit(6, profile.limits.processes, "nproc")
limit(4, profile.limits.coreBytes, "core")
limit(1, profile.limits.fileSizeBytes, "fsize")
limit(9, profile.limits.addressSpaceLimit(guestRAMBytes: memoryBytes), "as")

// MARK: Seccomp

/// Both stages trap on a violation. Before the SDK installs its SIGSYS reporter the default
/// disposition kills the process; after, the reporter names the syscall to the core and exits.
/// (Stacked filters take the most severe action, so a KILL start-up stage would pre-empt the
/// lock-down stage's report for syscalls both deny.)
func filter(including startup: Bool) -> scmp_filter_ctx {
    guard let ctx = seccomp_init(SCMP_ACT_TRAP) else { die("seccomp_init failed") }
    let rules = startup ? profile.startupRules : profile.syscalls
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
        if rc != 0 { die("seccomp rule for \(rule.name): \(Errno(rawValue: -rc))") }
    }
    // SCMP_ACT_ERRNO(ENOSYS), a macro the importer drops: 0x00050000 | errno.
    for rule in profile.enosysSyscalls {
        let rc = seccomp_rule_add_array(ctx, 0x0005_0000 | UInt32(ENOSYS), rule.number, 0, nil)
        if rc != 0 { die("seccomp ENOSYS rule for \(rule.name): \(Errno(rawValue: -rc))") }
    }
    return ctx
}

// Stage 2 (what the device keeps for its lifetime) is exported as BPF for the SDK to install.
let lockdown = filter(including: false)
let stage2 = hv_memfd_create("hv-seccomp-stage2", UInt32(hv_MFD_CLOEXEC))
require(stage2 >= 0, "memfd for the stage-2 filter")
require(seccomp_export_bpf(lockdown, stage2) == 0, "export the stage-2 filter")
seccomp_release(lockdown)
require(lseek(stage2, 0, SEEK_SET) == 0, "rewind the stage-2 filter")
require(dup2(stage2, stage2FD) == stage2FD, "place the stage-2 filter on fd 5")
// dup2 onto itself (memfd_create may have returned 5) keeps close-on-exec: clear it explicitly.
require(fcntl(stage2FD, F_SETFD, 0) == 0, "keep the stage-2 filter across exec")
// Only 0–2, the two channels and the stage-2 filter survive into the device; the executable's
// descriptor stays open until the exec, which closes it.
require(fcntl(deviceFD, F_SETFD, FD_CLOEXEC) == 0, "mark the device executable close-on-exec")
_ = hv_close_range(UInt32(stage2FD + 1), UInt32(deviceFD - 1))
_ = hv_close_range(UInt32(deviceFD + 1), UInt32.max)

let startup = filter(including: true)
let argv: [UnsafeMutablePointer<CChar>?] = device.map { strdup($0) } + [nil]
let envp: [UnsafeMutablePointer<CChar>?] = [strdup("HV_SANDBOXED=1"), nil]
let rc = seccomp_load(startup)
if rc != 0 { die("load the seccomp filter: \(Errno(rawValue: -rc))") }
hv_execveat_fd(deviceFD, argv, envp)
die("exec \(devicePath): \(Errno.current)")

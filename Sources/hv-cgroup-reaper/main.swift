import Glibc
import CHVShim
import HVSys

// hv-cgroup-reaper [--move-to DIR]... DIR...: removes a VM's cgroups (each DIR with its
// subgroups) once the hvctl that made them has ended, however it ended. hvctl starts it with
// fd 3 one end of a socket pair whose other end only hvctl holds: end of file there means hvctl
// is gone (exit, crash or kill -9). Its devices die with it (parent-death signal), leaving the
// groups empty; a group can be removed only when empty, so this retries for up to a minute, then
// gives up (the next VM started under the same parent sweeps what is left).
//
// On its way out hvctl may send the VM's KVM descriptor over that socket: it is closed here,
// after hvctl has gone and before the groups are removed, so KVM's teardown of the VM (which
// waits out grace periods: ~16 ms for the in-kernel PIT alone) is not part of hvctl's exit.
//
// It leaves hvctl at once (forks; the first process exits and hvctl reaps it), so it is nobody's
// child that anyone counts, and moves itself to each `--move-to` group (the v2 root: on v2,
// hvctl's own group may become the VM's parent, which may hold no process). Glibc only: it lives
// as long as its VM, so it should cost little.

signal(SIGHUP, SIG_IGN)
signal(SIGINT, SIG_IGN)
signal(SIGPIPE, SIG_IGN)

var arguments = Array(CommandLine.arguments.dropFirst())
var moveTo: [String] = []
while arguments.count >= 2 && arguments[0] == "--move-to" {
    moveTo.append(arguments[1])
    arguments.removeFirst(2)
}
let directories = arguments.filter { $0.hasPrefix("/") }
guard !directories.isEmpty, directories.count == arguments.count else {
    let usage = "usage: hv-cgroup-reaper [--move-to DIR]... DIR... (run by hvctl, with fd 3 a pipe)\n"
    _ = usage.withCString { write(2, $0, strlen($0)) }
    exit(2)
}

// hvctl, watched through a pidfd: its end of the socket closes early in its exit, but the VM's
// descriptor must be closed here only once hvctl has wholly gone, or hvctl's own (deferred) close
// of the VM would be the last one after all.
let hvctlProcess = hv_pidfd_open(getppid())
let child = fork()
if child != 0 { _exit(child > 0 ? 0 : 1) }
_ = setsid()
for group in moveTo {
    let fd = open(group + "/cgroup.procs", O_WRONLY)
    if fd >= 0 {
        let line = "\(getpid())\n"
        _ = line.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }
}

let hvctl = SeqPacketSocket(adopting: FileDescriptor(owning: 3))
var held: [FileDescriptor] = []
while true {
    // nil: hvctl's end is closed. An error (not a socket: an older hvctl's pipe) ends the wait too.
    guard let message = try? hvctl.receive(maxBytes: 64) else { break }
    held += message.fds
}
if !held.isEmpty {
    // Closing the last descriptor of the VM is what makes KVM tear it down.
    var gone = pollfd(fd: hvctlProcess, events: Int16(POLLIN), revents: 0)
    if hvctlProcess >= 0 { while poll(&gone, 1, 10_000) < 0 && errno == EINTR {} }
    held.removeAll()
}

func subgroups(_ directory: String) -> [String] {
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

/// Removes `directory` and its subgroups; true once it is gone.
func remove(_ directory: String) -> Bool {
    for name in subgroups(directory) { _ = remove(directory + "/" + name) }
    return rmdir(directory) == 0 || errno == ENOENT
}

var pending = Array(directories)
for _ in 0..<6000 where !pending.isEmpty {
    pending.removeAll(where: remove)
    if !pending.isEmpty { usleep(10_000) }
}
exit(pending.isEmpty ? 0 : 1)

import Glibc
import HVIPC
import HVSandbox
import HVSys
import Synchronization

// The control socket of a running VM: `hvctl run` (the VM's core) listens on
// RUN_DIR/NAME.sock, and `hvctl ls`, `hvctl status NAME` and `hvctl stop NAME` talk to it.
// One SOCK_SEQPACKET message each way: a command ("status", "stop"), then a JSON answer.
// The directory is root's, mode 0700, and each socket 0600: only the operator reaches a VM.

enum RunDirectory {
    /// `HV_RUN_DIR`, or /run/hv.
    static var path: String {
        if let v = getenv("HV_RUN_DIR"), v.pointee != 0 { return String(cString: v) }
        return "/run/hv"
    }
    static func socket(_ name: String) -> String { path + "/" + name + ".sock" }
    /// The lock a running VM holds (see `ControlServer`).
    static func lock(_ name: String) -> String { path + "/" + name + ".lock" }

    /// VM names are file names in the run directory: the same rule as tenant names.
    static func validate(_ name: String, flag: String) throws(UsageError) {
        guard (1...64).contains(name.utf8.count), name.utf8.first != UInt8(ascii: "."),
              name.utf8.allSatisfy({ $0 == 0x2D || $0 == 0x2E || $0 == 0x5F || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }) else {
            throw UsageError(message: "invalid \(flag) '\(name)': use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'")
        }
    }
}

/// A Unix socket address for `path`, or nil when the path does not fit `sun_path`.
func unixAddress(_ path: String) -> sockaddr_un? {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, b) in bytes.enumerated() { raw[i] = b }
        raw[bytes.count] = 0
    }
    return address
}

func connectTo(_ path: String) -> Int32? {
    guard var address = unixAddress(path) else { return nil }
    let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return nil }
    let r = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    if r != 0 {
        close(fd)
        return nil
    }
    return fd
}

/// The listening side, owned by `hvctl run`.
///
/// Liveness is a lock, not a guess: the VM holds an exclusive `flock` on RUN_DIR/NAME.lock (which
/// also records its pid) for its whole life and binds NAME.sock only while holding it. A socket
/// whose lock nobody holds belongs to a VM that died without cleaning up and may be removed; one
/// whose lock is held is never removed, however slowly it answers.
final class ControlServer: @unchecked Sendable {
    // @unchecked: `fd`, `path` and `lock` are immutable; `closed` is atomic; the handler closures are Sendable.
    let path: String
    let lockPath: String
    private let fd: Int32
    private let lock: FileDescriptor
    private let closed = Atomic<Bool>(false)

    /// Most connections served at once; past that the one idle longest is dropped.
    static let maximumClients = 16
    /// How long a connection may stay silent before it is dropped.
    static let clientTimeoutNanoseconds: UInt64 = 2_000_000_000

    /// Locks RUN_DIR/NAME.lock and binds RUN_DIR/NAME.sock. A live VM of that name is an error; a
    /// stale socket (its VM died without cleaning up) is replaced.
    init(name: String) throws(UsageError) {
        let dir = RunDirectory.path
        if mkdir(dir, 0o700) != 0 && errno != EEXIST {
            throw UsageError(message: "cannot create the run directory \(dir): \(String(cString: strerror(errno)))")
        }
        path = RunDirectory.socket(name)
        lockPath = RunDirectory.lock(name)
        var held: FileDescriptor?
        // A sweeper (hvctl ls) may hold the lock for an instant while it checks a stale socket.
        for attempt in 0..<20 {
            do { held = try PathLock.acquire(lockPath, blocking: false) } catch {
                throw UsageError(message: "cannot lock \(lockPath): \(error.errno)")
            }
            if held != nil || attempt == 19 { break }
            usleep(10_000)
        }
        guard let held else {
            throw UsageError(message: "a VM named '\(name)' is already running (\(path)); pick another --name or 'hvctl stop \(name)'")
        }
        lock = held
        _ = ftruncate(held.rawValue, 0)
        try? held.writeAll(Array("\(getpid())\n".utf8))
        unlink(path)
        guard var address = unixAddress(path) else {
            unlink(lockPath)
            throw UsageError(message: "the socket path \(path) is too long; set HV_RUN_DIR to a shorter directory")
        }
        fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            unlink(lockPath)
            throw UsageError(message: "cannot create the control socket: \(String(cString: strerror(errno)))")
        }
        let old = umask(0o177)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(old)
        guard bound == 0, listen(fd, 64) == 0 else {
            let e = errno
            Glibc.close(fd)
            unlink(lockPath)
            throw UsageError(message: "cannot listen on \(path): \(String(cString: strerror(e)))")
        }
    }

    /// Serves commands on a thread of its own until `close()`. Every connection is polled, so
    /// clients that connect and say nothing cost a slot each for at most 2 s and never hold up
    /// the others; a command is one message, its answer one message.
    func start(status: @escaping @Sendable () -> String, stop: @escaping @Sendable () -> Void,
               other: @escaping @Sendable (String) -> String?) throws(SystemError) {
        let listener = fd
        try HostThread.spawn(name: "hv-control") { [self] in
            var clients: [(fd: Int32, since: UInt64)] = []
            defer { for c in clients { Glibc.close(c.fd) } }
            while !closed.load(ordering: .acquiring) {
                var interests = [Poll.Interest(fd: listener)]
                for c in clients { interests.append(Poll.Interest(fd: c.fd)) }
                guard let revents = try? Poll.wait(interests, timeoutMilliseconds: clients.isEmpty ? -1 : 250) else {
                    usleep(10_000)
                    continue
                }
                if closed.load(ordering: .acquiring) || revents[0] & Int16(POLLHUP | POLLERR | POLLNVAL) != 0 { return }
                let now = monotonicNanoseconds()
                var keep: [(fd: Int32, since: UInt64)] = []
                for (i, c) in clients.enumerated() {
                    let r = revents[i + 1]
                    if r & Int16(POLLIN) != 0 {
                        var buffer = [UInt8](repeating: 0, count: 4352)
                        let n = buffer.withUnsafeMutableBytes { recv(c.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                        if n > 0 {
                            let command = String(decoding: buffer.prefix(n), as: UTF8.self)
                            let answer: String
                            switch command {
                            case "status": answer = status()
                            case "stop":
                                answer = #"{"stopping":true}"#
                                stop()
                            default: answer = other(command) ?? #"{"error":"unknown command; use status, stop or cdrom"}"#
                            }
                            _ = Array(answer.utf8).withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                        }
                        Glibc.close(c.fd)
                    } else if r != 0 || now &- c.since > Self.clientTimeoutNanoseconds {
                        Glibc.close(c.fd)  // hung up, or silent too long
                    } else {
                        keep.append(c)
                    }
                }
                clients = keep
                if revents[0] & Int16(POLLIN) != 0 {
                    let client = accept(listener, nil, nil)
                    if client >= 0 {
                        _ = fcntl(client, F_SETFD, FD_CLOEXEC)  // accept4 is not in the Glibc module
                        if clients.count >= Self.maximumClients {
                            Glibc.close(clients.removeFirst().fd)  // the one silent longest makes room
                        }
                        clients.append((client, now))
                    }
                }
            }
        }
    }

    /// Stops listening and removes the socket and then the lock file (still holding the lock, so
    /// a VM of the same name starting now either waits for it or locks a fresh file).
    func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        unlink(path)
        unlink(lockPath)
        shutdown(fd, Int32(SHUT_RDWR))  // wakes the serving thread, which then ends
        lock.close()
    }
}

/// What is known of a VM whose socket is in the run directory.
enum VMPresence {
    /// Its lock is held: the VM runs (it may still be slow to answer).
    case live(pid: Int32?)
    /// Nobody holds its lock: the VM is gone; its files were removed.
    case gone
}

/// Whether the VM `name` is alive; a dead one's socket and lock file are removed on the way.
func vmPresence(_ name: String) -> VMPresence {
    let lockPath = RunDirectory.lock(name)
    if PathLock.isHeld(lockPath) {
        var pid: Int32?
        if let fd = try? FileDescriptor.open(lockPath, flags: O_RDONLY), let bytes = try? fd.readAll() {
            pid = Int32(String(decoding: bytes.filter { (0x30...0x39).contains($0) }, as: UTF8.self))
        }
        return .live(pid: pid)
    }
    // Take the lock ourselves, so a VM of this name starting right now is not robbed of its socket.
    let held: FileDescriptor
    do {
        guard let lock = try PathLock.acquire(lockPath, blocking: false) else { return .live(pid: nil) }
        held = lock
    } catch {
        return .gone  // no run directory, or one we cannot write: no VM of that name here
    }
    unlink(RunDirectory.socket(name))
    unlink(lockPath)
    held.close()
    return .gone
}

/// Removes the sockets of VMs that died without cleaning up (SIGKILL, a crash); live ones stay.
func sweepStaleVMs() {
    for name in names() { _ = vmPresence(name) }
}

/// Sends `command` to the VM called `name` and returns its answer, or nil when no such VM runs.
func controlRequest(_ name: String, _ command: String, timeoutSeconds: Int = 5) -> JSONObject? {
    guard let fd = connectTo(RunDirectory.socket(name)) else { return nil }
    defer { close(fd) }
    var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    guard Array(command.utf8).withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) > 0 else { return nil }
    var buffer = [UInt8](repeating: 0, count: 65536)
    let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
    guard n > 0, case .object(let object)? = try? JSONValue.parse(Array(buffer.prefix(n))) else { return nil }
    return object
}

// MARK: Commands

/// The names in `directory` that end in one of `suffixes` (each 5 bytes: ".sock", ".lock"),
/// without the suffix, each once, sorted.
func entryStems(in directory: String, suffixes: [String]) -> [String] {
    guard let dir = opendir(directory) else { return [] }
    defer { closedir(dir) }
    var found = Set<String>()
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        for suffix in suffixes where name.hasSuffix(suffix) { found.insert(String(name.dropLast(suffix.utf8.count))) }
    }
    return found.sorted()
}

/// The VMs with a socket or a lock file in the run directory (a lock file alone is a VM that died
/// between taking its lock and binding its socket).
func names() -> [String] { entryStems(in: RunDirectory.path, suffixes: [".sock", ".lock"]) }

func number(_ o: JSONObject, _ key: String) -> UInt64 {
    if case .number(let n)? = o[key] { return n.uint64Value ?? 0 }
    return 0
}

func text(_ o: JSONObject, _ key: String) -> String {
    if case .string(let s)? = o[key] { return s }
    return "?"
}

func devices(_ o: JSONObject) -> [JSONObject] {
    guard case .array(let list)? = o["devices"] else { return [] }
    return list.compactMap { if case .object(let d) = $0 { return d } else { return nil } }
}

func pad(_ s: String, _ width: Int) -> String { s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count) }

/// Ends a command whose VM did not answer: either there is no such VM, or it runs and is not answering.
func failNoAnswer(_ name: String) -> Never {
    switch vmPresence(name) {
    case .gone: fail("no VM named '\(name)' is running (see 'hvctl ls')")
    case .live(let pid):
        fail("VM '\(name)'\(pid.map { " (pid \($0))" } ?? "") is running but did not answer on \(RunDirectory.socket(name)) within 5 s; try again, or 'kill \(pid.map { "\($0)" } ?? "PID")' to stop it")
    }
}

/// `hvctl cdrom NAME eject` and `hvctl cdrom NAME insert ISO`: the running VM's core opens the
/// ISO (it is the trusted side) and hands it to the CD-ROM drive's process.
func cdromCommand(_ arguments: ArraySlice<String>) throws(UsageError) -> Int32 {
    let usage = "usage: hvctl cdrom NAME eject | hvctl cdrom NAME insert ISO"
    var rest = arguments
    guard let name = rest.popFirst(), let verb = rest.popFirst() else { throw UsageError(message: usage) }
    try RunDirectory.validate(name, flag: "name")
    let command: String
    switch verb {
    case "eject":
        guard rest.isEmpty else { throw UsageError(message: usage) }
        command = "cdrom eject"
    case "insert":
        guard let path = rest.popFirst(), rest.isEmpty else { throw UsageError(message: usage) }
        let absolute = absolutePath(path)
        guard absolute.hasPrefix("/") else { throw UsageError(message: "cannot resolve '\(path)': no current directory") }
        guard absolute.utf8.count < 4096 else { throw UsageError(message: "the ISO path is too long") }
        command = "cdrom insert " + absolute
    default:
        throw UsageError(message: "unknown cdrom action '\(verb)'; \(usage)")
    }
    guard let answer = controlRequest(name, command) else { failNoAnswer(name) }
    if case .string(let error)? = answer["error"] { fail(error) }
    print(verb == "eject" ? "ejected the CD of \(name)" : "inserted \(command.dropFirst(13)) into \(name)")
    return 0
}

/// The kind of a device, from its instance name (`serial0`, `disk1`, `net0`, `device0`, …).
func deviceKind(_ name: String) -> String {
    for (prefix, kind) in [("serial", "serial"), ("bios", "bios"), ("disk", "disk"), ("cdrom", "cdrom"), ("net", "nic"), ("device", "plugin")]
        where name.hasPrefix(prefix) { return kind }
    return "?"
}

/// `hvctl device NAME ls [--json]`, `hvctl device NAME restart DEV`,
/// `hvctl device NAME upgrade DEV --binary PATH`: a running VM's device processes.
func deviceCommand(_ arguments: ArraySlice<String>) throws(UsageError) -> Int32 {
    let usage = "usage: hvctl device NAME ls [--json] | hvctl device NAME restart DEV | hvctl device NAME upgrade DEV --binary PATH"
    var rest = arguments
    if let first = rest.first, first == "-h" || first == "--help" {
        print(usage)
        return 0
    }
    guard let name = rest.popFirst(), !name.hasPrefix("-"), let verb = rest.popFirst() else { throw UsageError(message: usage) }
    try RunDirectory.validate(name, flag: "name")
    switch verb {
    case "ls":
        let json = rest.first == "--json"
        if json { rest.removeFirst() }
        guard rest.isEmpty else { throw UsageError(message: "unexpected arguments after 'ls'; \(usage)") }
        guard let o = controlRequest(name, "status") else { failNoAnswer(name) }
        let list = devices(o)
        if json {
            print("[" + list.map { d in
                render(.object(JSONObject(d.members + [.init(key: "kind", value: .string(deviceKind(text(d, "name"))))])))
            }.joined(separator: ", ") + "]")
            return 0
        }
        print(pad("DEVICE", 10) + pad("KIND", 8) + pad("PID", 9) + pad("STATE", 12) + pad("RESTARTS", 10) + "BINARY")
        for d in list {
            let pid = number(d, "pid")
            print(pad(text(d, "name"), 10) + pad(deviceKind(text(d, "name")), 8) + pad(pid == 0 ? "-" : "\(pid)", 9)
                  + pad(text(d, "state"), 12) + pad("\(number(d, "restarts"))", 10) + text(d, "binary"))
        }
        return 0
    case "restart", "upgrade":
        guard let device = rest.popFirst(), !device.hasPrefix("-") else { throw UsageError(message: "'hvctl device \(name) \(verb)' needs a device name (see 'hvctl device \(name) ls'); \(usage)") }
        var command = "device \(verb) \(device)"
        if verb == "upgrade" {
            guard rest.popFirst() == "--binary", let binary = rest.popFirst() else {
                throw UsageError(message: "'hvctl device \(name) upgrade' needs --binary PATH; \(usage)")
            }
            command += " " + absolutePath(binary)
        }
        guard rest.isEmpty else { throw UsageError(message: "unexpected arguments; \(usage)") }
        guard let answer = controlRequest(name, command, timeoutSeconds: 40) else { failNoAnswer(name) }
        if case .string(let error)? = answer["error"] { fail(error) }
        print(text(answer, "ok"))
        return 0
    default:
        throw UsageError(message: "unknown device action '\(verb)'; \(usage)")
    }
}

/// `path` made absolute against the current directory (the VM's core may run elsewhere).
func absolutePath(_ path: String) -> String {
    guard !path.hasPrefix("/") else { return path }
    var buffer = [CChar](repeating: 0, count: 4096)
    guard getcwd(&buffer, buffer.count) != nil else { return path }
    return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + "/" + path
}

/// `hvctl ls`, `hvctl status NAME [--json]`, `hvctl stop NAME`.
func vmCommand(_ verb: String, _ arguments: ArraySlice<String>) throws(UsageError) -> Int32 {
    var rest = arguments
    switch verb {
    case "ls":
        guard rest.isEmpty else { throw UsageError(message: "'hvctl ls' takes no arguments") }
        print(pad("NAME", 20) + pad("PID", 9) + pad("UPTIME", 9) + pad("MEMORY", 9) + pad("CPUS", 6) + "DEVICES")
        for name in names() {
            guard case .live(let pid) = vmPresence(name) else { continue }  // gone: its files were just removed
            guard let o = controlRequest(name, "status") else {
                // Alive (it holds its lock) but not answering within the timeout: say so, touch nothing.
                print(pad(name, 20) + pad(pid.map { "\($0)" } ?? "?", 9) + "(not answering on its control socket)")
                continue
            }
            let devs = devices(o).map { "\(text($0, "name"))(\(text($0, "state")), \(number($0, "restarts")) restarts)" }
            print(pad(name, 20) + pad("\(number(o, "pid"))", 9) + pad("\(number(o, "uptime_seconds"))s", 9)
                  + pad("\(number(o, "memory_mib"))M", 9) + pad("\(number(o, "cpus"))", 6) + devs.joined(separator: " "))
        }
        return 0
    case "status", "stop":
        guard let name = rest.popFirst() else { throw UsageError(message: "'hvctl \(verb)' needs a VM name (see 'hvctl ls')") }
        let json = rest.first == "--json"
        if json { rest.removeFirst() }
        guard rest.isEmpty, verb == "status" || !json else { throw UsageError(message: "unexpected arguments after '\(name)'") }
        try RunDirectory.validate(name, flag: "name")
        guard let o = controlRequest(name, verb) else { failNoAnswer(name) }
        if verb == "stop" {
            // Wait for the VM to go: it lets go of its lock once its devices are reaped.
            for _ in 0..<200 {
                if !PathLock.isHeld(RunDirectory.lock(name)) { break }
                usleep(50_000)
            }
            print("stopped \(name)")
            return 0
        }
        if json {
            var parts: [String] = []
            for m in o.members { parts.append("\(jsonString(m.key)): \(render(m.value))") }
            print("{" + parts.joined(separator: ", ") + "}")
            return 0
        }
        print("name:    \(text(o, "name"))")
        print("pid:     \(number(o, "pid"))")
        print("boot:    \(text(o, "boot"))")
        print("uptime:  \(number(o, "uptime_seconds")) s")
        print("memory:  \(number(o, "memory_mib")) MiB")
        print("cpus:    \(number(o, "cpus"))")
        print("tenant:  \(text(o, "tenant"))")
        for d in devices(o) {
            let pid = number(d, "pid")
            print("device:  \(pad(text(d, "name"), 10))\(pad(text(d, "state"), 11))pid \(pid == 0 ? "-" : "\(pid)")  restarts \(number(d, "restarts"))")
        }
        return 0
    default:
        throw UsageError(message: "unknown command '\(verb)'")
    }
}

func render(_ v: JSONValue) -> String {
    switch v {
    case .string(let s): return jsonString(s)
    case .number(let n): return n.literal
    case .bool(let b): return b ? "true" : "false"
    case .null: return "null"
    case .array(let a): return "[" + a.map(render).joined(separator: ", ") + "]"
    case .object(let o): return "{" + o.members.map { "\(jsonString($0.key)): \(render($0.value))" }.joined(separator: ", ") + "}"
    }
}

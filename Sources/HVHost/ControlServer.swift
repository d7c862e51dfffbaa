import Glibc
import HVIPC
import HVSandbox
import HVSys
import Synchronization

// The control socket of a running VM: `hvctl run` (the VM's core) listens on
// RUN_DIR/NAME.sock, and `hvctl ls`, `status`, `stop`, `pause`, … talk to it: one SOCK_SEQPACKET
// message each way, a ControlRequest then a ControlReply (ControlProtocol.swift, ipc-schema/control.md).
// The directory is root's, mode 0700, and each socket 0600: only the operator reaches a VM.

public enum RunDirectory {
    /// `HV_RUN_DIR`, or /run/hv.
    public static var path: String {
        if let v = getenv("HV_RUN_DIR"), v.pointee != 0 { return String(cString: v) }
        return "/run/hv"
    }
    public static func socket(_ name: String) -> String { path + "/" + name + ".sock" }
    /// The lock a running VM holds (see `ControlServer`).
    public static func lock(_ name: String) -> String { path + "/" + name + ".lock" }
    /// The attach socket of a VM whose serial port is `console` (see `ConsoleServer`).
    public static func console(_ name: String) -> String { path + "/" + name + ".console" }
    /// The serial console log of a VM whose serial port is `console`; kept after the VM ends.
    public static func consoleLog(_ name: String) -> String { path + "/" + name + ".log" }
    /// What a detached VM's core (hvctl itself) reports once it runs in the background.
    public static func coreLog(_ name: String) -> String { path + "/" + name + ".core.log" }

    /// A byte allowed in VM, segment and tenant names: letters, digits, '.', '_', '-'.
    static func isNameByte(_ b: UInt8) -> Bool {
        b == 0x2D || b == 0x2E || b == 0x5F || (0x30...0x39).contains(b) || (0x41...0x5A).contains(b) || (0x61...0x7A).contains(b)
    }

    /// VM names are file names in the run directory: the same rule as tenant names.
    public static func validate(_ name: String, flag: String) throws(UsageError) {
        guard (1...64).contains(name.utf8.count), name.utf8.first != UInt8(ascii: "."), name.utf8.allSatisfy(isNameByte) else {
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

/// A connected AF_UNIX socket to `path` (SOCK_SEQPACKET, as control and segment sockets are, or
/// SOCK_STREAM for a console socket), or nil.
public func connectTo(_ path: String, stream: Bool = false) -> Int32? {
    guard var address = unixAddress(path) else { return nil }
    let type = stream ? Int32(SOCK_STREAM.rawValue) : Int32(SOCK_SEQPACKET.rawValue)
    let fd = socket(AF_UNIX, type | Int32(SOCK_CLOEXEC.rawValue), 0)
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
    /// the others; a command is one message, its answer one message — except where `stream`
    /// takes the connection over (it returns true and then owns the descriptor: `migrate`
    /// answers with several messages).
    /// `afterReply` runs once a request's reply is on its way: what must not happen before the
    /// client has its answer (a stop, whose VM may exit at once).
    func start(handler: @escaping @Sendable (ControlRequest) -> ControlReply,
               stream: (@Sendable (ControlRequest, Int32) -> Bool)? = nil,
               afterReply: (@Sendable (ControlRequest) -> Void)? = nil) throws(SystemError) {
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
                        var buffer = [UInt8](repeating: 0, count: 8192)
                        let n = buffer.withUnsafeMutableBytes { recv(c.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                        if n > 0 {
                            let reply: ControlReply
                            var answered: ControlRequest?
                            do throws(UsageError) {
                                let request = try ControlJSON.decode(ControlRequest.self, Array(buffer.prefix(n)))
                                // Handed over: the stream handler owns the descriptor now.
                                if let stream, stream(request, c.fd) { continue }
                                reply = handler(request)
                                answered = request
                            } catch {
                                reply = .failure("malformed request: \(error.message) (see ipc-schema/control.md)")
                            }
                            _ = ControlJSON.encode(reply).withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                            if let answered, reply.ok { afterReply?(answered) }
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
public enum VMPresence: Sendable {
    /// Its lock is held: the VM runs (it may still be slow to answer).
    case live(pid: Int32?)
    /// Nobody holds its lock: the VM is gone; its files were removed.
    case gone
}

/// Whether the VM `name` is alive; a dead one's socket and lock file are removed on the way.
///
/// A held lock with no pid in it is either a VM between taking its lock and writing its pid, or
/// another process probing as this function does (it holds the lock for a few system calls):
/// both last an instant, so it looks again for up to 50 ms before calling the VM live. Without
/// that, two concurrent probes of a VM that is not running (hvd's event poll and a request)
/// could each take the other for a live VM that does not answer.
public func vmPresence(_ name: String) -> VMPresence {
    let lockPath = RunDirectory.lock(name)
    for _ in 0..<50 {
        if PathLock.isHeld(lockPath) {
            if let fd = try? FileDescriptor.open(lockPath, flags: O_RDONLY), let bytes = try? fd.readAll(),
               let pid = Int32(String(decoding: bytes.filter { (0x30...0x39).contains($0) }, as: UTF8.self)) {
                return .live(pid: pid)
            }
        } else {
            // Take the lock ourselves, so a VM of this name starting right now is not robbed of its socket.
            let taken: FileDescriptor?
            do { taken = try PathLock.acquire(lockPath, blocking: false) } catch {
                return .gone  // no run directory, or one we cannot write: no VM of that name here
            }
            if let held = taken {
                unlink(RunDirectory.socket(name))
                unlink(RunDirectory.console(name))
                unlink(lockPath)
                held.close()
                return .gone
            }
        }
        usleep(1000)
    }
    return .live(pid: nil)
}

/// Removes the sockets of VMs that died without cleaning up (SIGKILL, a crash); live ones stay.
public func sweepStaleVMs() {
    for name in runningVMNames() { _ = vmPresence(name) }
}

/// Sends `request` to the VM called `name` and returns its reply, or nil when no such VM answers.
public func controlRequest(_ name: String, _ request: ControlRequest, timeoutSeconds: Int = 5) -> ControlReply? {
    guard let fd = connectTo(RunDirectory.socket(name)) else { return nil }
    defer { close(fd) }
    var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    guard ControlJSON.encode(request).withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) > 0 else { return nil }
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
    guard n > 0 else { return nil }
    return try? ControlJSON.decode(ControlReply.self, Array(buffer.prefix(n)))
}

// MARK: Commands

/// The names in `directory` that end in one of `suffixes` (each 5 bytes: ".sock", ".lock"),
/// without the suffix, each once, sorted.
public func entryStems(in directory: String, suffixes: [String]) -> [String] {
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
public func runningVMNames() -> [String] { entryStems(in: RunDirectory.path, suffixes: [".sock", ".lock"]) }


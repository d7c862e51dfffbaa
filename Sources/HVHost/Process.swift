import Dispatch
import Glibc
import HVCore
import HVIPC
import HVSys
import Synchronization


/// Writes `hvctl: message` to stderr.
public func warn(_ message: String) {
    let line = "hvctl: \(message)\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
}

/// What a running `hvctl run` must undo on every way out: its control socket and lock, its
/// segment memberships. Run by `exit` (atexit), so fail(), a signal during start-up and a normal
/// return all clean up the same way.
public enum ExitCleanup {
    private static let actions = Mutex<[@Sendable () -> Void]>([])
    private static let installed = Atomic<Bool>(false)

    /// Adds `action`; actions run once, last added first.
    public static func add(_ action: @escaping @Sendable () -> Void) {
        if !installed.exchange(true, ordering: .acquiringAndReleasing) { atexit { ExitCleanup.runAll() } }
        actions.withLock { $0.append(action) }
    }

    /// Held while a resource is created and its clean-up registered, so a signal never ends
    /// hvctl between the two (a lock file created, its removal not yet registered).
    private static let creating = Mutex<Void>(())

    /// Runs `body` (create something, register its clean-up) as one step against `exitNow`.
    static func creating<T>(_ body: () throws(UsageError) -> T) throws(UsageError) -> T {
        try creating.withLock { _ throws(UsageError) in try body() }
    }

    /// Exits with `status` (running every clean-up), but not in the middle of `creating`.
    static func exitNow(_ status: Int32) -> Never {
        creating.withLock { _ in exit(status) }
    }

    static func runAll() {
        let pending = actions.withLock { list -> [@Sendable () -> Void] in
            defer { list.removeAll() }
            return list
        }
        for action in pending.reversed() { action() }
    }
}

/// Ends the process with `hvctl: message` on stderr and `status` (1: a failure at run time; 2: a
/// usage error), running every `ExitCleanup` action on the way.
public func fail(_ message: String, status: Int32 = 1) -> Never {
    FailureReport.report(message)
    let line = "hvctl: \(message)\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    exit(status)
}

/// Who else must hear why hvctl fails: an incoming migration tells its source, so the VM carries
/// on there with the destination's reason.
enum FailureReport {
    private static let hook = Mutex<(@Sendable (String) -> Void)?>(nil)
    static func install(_ action: (@Sendable (String) -> Void)?) { hook.withLock { $0 = action } }
    static func report(_ message: String) {
        let action = hook.withLock { current -> (@Sendable (String) -> Void)? in
            defer { current = nil }
            return current
        }
        action?(message)
    }
}

/// Takes SIGINT/SIGTERM/SIGHUP for the whole life of `hvctl run` (they are blocked in every
/// thread). Before a VM exists — while files are opened, segments joined, devices spawned — a
/// signal ends hvctl at once, cleaning up on the way; once a VM runs it stops that VM, exactly
/// as Machine.run does when it takes the signal itself.
func startSignalWatcher(_ current: CurrentMachine) {
    var set = sigset_t()
    sigemptyset(&set)
    for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
    let signals = set
    do {
        try HostThread.spawn(name: "hv-signals") {
            var waitSet = signals
            while true {
                var sig: Int32 = 0
                guard sigwait(&waitSet, &sig) == 0 else { continue }
                if current.machine == nil {
                    current.stop(.signal(sig))
                    ExitCleanup.exitNow(128 + sig)
                }
                current.stop(.signal(sig))
            }
        }
    } catch {
        fail("cannot start the signal thread: \(error)")
    }
}

/// Directory holding the running executable: hvctl and the device executables are built beside
/// each other (and hvd and hv-firecracker beside hvctl).
public func executableDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return "." }
    let path = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return String(path[..<slash])
}

func deviceExecutable(_ name: String) -> String {
    let path = executableDirectory() + "/" + name
    guard access(path, X_OK) == 0 else {
        fail("device executable '\(name)' not found next to hvctl (\(path)); rebuild hv with 'swift build'")
    }
    return path
}

public func hostMemoryBytes() -> UInt64 {
    UInt64(max(sysconf(Int32(_SC_PHYS_PAGES)), 0)) * UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 0))
}

/// Runs `body` on a dispatch thread and awaits its result: for blocking system calls (control
/// sockets, child processes) in the control plane's async code, never on Swift concurrency's
/// few threads.
public func blocking<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(returning: body()) }
    }
}

/// `path` made absolute against the current directory (the VM's core may run elsewhere).
public func absolutePath(_ path: String) -> String {
    guard path.utf8.first != UInt8(ascii: "/") else { return path }
    var buffer = [CChar](repeating: 0, count: 4096)
    guard getcwd(&buffer, buffer.count) != nil else { return path }
    return absolutePath(path, against: String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
}

/// A mistake in what the operator asked for (a flag, a definition, a name), reported as one
/// line; hvctl exits 2 for it.
public struct UsageError: Error, Sendable {
    public let message: String
    public init(message: String) { self.message = message }
}

/// The VM that is running now; a reboot replaces it. The console's quit key reaches whichever
/// VM is current, and a quit typed between two boots is not lost.
final class CurrentMachine: @unchecked Sendable {
    // @unchecked: every field is under `lock`.
    private let lock = Mutex<(machine: Machine?, exit: MachineExit?)>((nil, nil))
    func install(_ machine: Machine) {
        let exit = lock.withLock { state -> MachineExit? in
            state.machine = machine
            return state.exit
        }
        if let exit { machine.stop(exit) }
    }
    /// Stops the current VM (and any the loop would build next) with `exit`.
    func stop(_ exit: MachineExit) {
        let machine = lock.withLock { state -> Machine? in
            if state.exit == nil { state.exit = exit }
            return state.machine
        }
        machine?.stop(exit)
    }
    var machine: Machine? { lock.withLock { $0.machine } }
}


extension UsageError: CustomStringConvertible {
    public var description: String { message }
}

/// Raw disk images.
/// Creates the file for a new disk image at `path`, mode 0600; an existing file is never touched
/// (O_EXCL). The error is one line.
func createNewImage(_ path: String) throws(UsageError) -> Int32 {
    let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    if fd < 0 {
        let e = errno
        if e == EEXIST { throw UsageError(message: "'\(path)' already exists: hvctl never overwrites a disk image; remove it or pick another path") }
        throw UsageError(message: "cannot create '\(path)': \(String(cString: strerror(e)))")
    }
    return fd
}

public enum RawDisk {
    /// Creates a sparse raw image of `bytes` at `path`: full size, no blocks allocated. An
    /// existing file is never touched (O_EXCL); a failure is one line.
    public static func create(_ path: String, bytes: UInt64) throws(UsageError) {
        let fd = try createNewImage(path)
        defer { close(fd) }
        if ftruncate(fd, off_t(bytes)) != 0 {
            let e = errno
            unlink(path)
            throw UsageError(message: "cannot size '\(path)' to \(bytes) bytes: \(String(cString: strerror(e)))")
        }
    }
}

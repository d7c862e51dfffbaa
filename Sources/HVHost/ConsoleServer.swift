import Glibc
import HVSys
import Synchronization

// A detached VM's serial console (`--serial console`, which `--detach` chooses): the serial device
// writes the guest's output to RUN_DIR/NAME.log, a regular file, so its restart journal keeps the
// log exact across device crashes; `hvctl console NAME` attaches through RUN_DIR/NAME.console.
//
// Attach protocol (AF_UNIX, SOCK_STREAM, socket mode 0600): the VM answers a connection with one
// byte, `A` (attached) or `B` (another client is attached; the connection is closed). Then every
// byte the client sends is serial input, and the client receives the guest's output from the
// moment it attached. Escape keys are the client's business: the VM never interprets input.

/// The attach socket of one VM's console and the thread that serves it.
final class ConsoleServer: @unchecked Sendable {
    // @unchecked: the descriptors are immutable; `closed` is atomic; the thread owns the rest.
    let socketPath: String
    let logPath: String
    /// The read end of the serial device's input pipe (host file 1 of the serial device).
    let deviceInput: FileDescriptor
    private let inputWrite: FileDescriptor
    /// The console log, opened for reading (the serial device has the writing descriptor).
    private let log: FileDescriptor
    private let listener: Int32
    private let closed = Atomic<Bool>(false)

    /// Byte answered to a new connection.
    static let attached = UInt8(ascii: "A")
    static let busy = UInt8(ascii: "B")

    /// Binds RUN_DIR/NAME.console; `log` is the console log the serial device writes.
    init(name: String, log: FileDescriptor) throws(UsageError) {
        socketPath = RunDirectory.console(name)
        logPath = RunDirectory.consoleLog(name)
        // The same open file, for reading: /proc/self/fd names it even if the path is replaced.
        do { self.log = try FileDescriptor.open("/proc/self/fd/\(log.rawValue)", flags: O_RDONLY | O_CLOEXEC) } catch {
            throw UsageError(message: "cannot read back the console log \(logPath): \(error)")
        }
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw UsageError(message: "cannot create the console's input pipe: \(Errno.current)") }
        deviceInput = FileDescriptor(owning: fds[0])
        inputWrite = FileDescriptor(owning: fds[1])
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        // Never block the console thread on a guest that does not read its input.
        _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)
        unlink(socketPath)
        guard var address = unixAddress(socketPath) else {
            throw UsageError(message: "the console socket path \(socketPath) is too long; set HV_RUN_DIR to a shorter directory")
        }
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { throw UsageError(message: "cannot create the console socket: \(Errno.current)") }
        let old = umask(0o177)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(old)
        guard bound == 0, listen(listener, 8) == 0 else {
            let e = Errno.current
            Glibc.close(listener)
            throw UsageError(message: "cannot listen on \(socketPath): \(e)")
        }
    }

    /// Serves attaches on a thread of its own until `close()`. With nobody attached it sleeps in
    /// poll; with a client, it forwards the log's new bytes every 20 ms and the client's input at once.
    func start() throws(SystemError) {
        try HostThread.spawn(name: "hv-console-srv") { [self] in
            var client: Int32 = -1
            var sent: Int64 = 0           // how much of the log the client has
            var pending: [UInt8] = []     // input the guest has not taken yet
            defer { if client >= 0 { Glibc.close(client) } }
            func drop() {
                if client >= 0 { Glibc.close(client) }
                client = -1
                pending = []
            }
            while !closed.load(ordering: .acquiring) {
                var interests = [Poll.Interest(fd: listener)]
                if client >= 0 {
                    interests.append(Poll.Interest(fd: client, events: pending.isEmpty ? Int16(POLLIN) : 0))
                    if !pending.isEmpty { interests.append(Poll.Interest(fd: inputWrite.rawValue, events: Int16(POLLOUT))) }
                }
                guard let revents = try? Poll.wait(interests, timeoutMilliseconds: client >= 0 ? 20 : -1) else {
                    usleep(10_000)
                    continue
                }
                if closed.load(ordering: .acquiring) || revents[0] & Int16(POLLHUP | POLLERR | POLLNVAL) != 0 { return }
                if revents[0] & Int16(POLLIN) != 0 {
                    let incoming = accept(listener, nil, nil)
                    if incoming >= 0 {
                        _ = fcntl(incoming, F_SETFD, FD_CLOEXEC)
                        var answer = client >= 0 ? Self.busy : Self.attached
                        _ = send(incoming, &answer, 1, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
                        if client >= 0 {
                            Glibc.close(incoming)
                        } else {
                            client = incoming
                            sent = (try? log.size()) ?? 0
                        }
                    }
                }
                guard client >= 0 else { continue }
                // The client's keystrokes, to the serial device's input.
                if interests.count > 1, revents[1] & Int16(POLLIN | POLLHUP | POLLERR) != 0 && pending.isEmpty {
                    var buffer = [UInt8](repeating: 0, count: 4096)
                    let n = buffer.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                    if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) {
                        drop()
                        continue
                    }
                    if n > 0 { pending = Array(buffer.prefix(n)) }
                }
                if !pending.isEmpty {
                    let n = pending.withUnsafeBytes { Glibc.write(inputWrite.rawValue, $0.baseAddress, $0.count) }
                    if n > 0 { pending.removeFirst(n) }
                }
                // The guest's new output, from the log.
                guard let size = try? log.size() else { continue }
                if size < sent { sent = 0 }  // the log was emptied (a new boot's console)
                while sent < size {
                    var chunk = [UInt8](repeating: 0, count: Int(min(size - sent, 65536)))
                    let got = chunk.withUnsafeMutableBytes { (try? log.read(into: $0, at: sent)) ?? 0 }
                    guard got > 0 else { break }
                    let n = chunk.withUnsafeBytes { send(client, $0.baseAddress, got, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                    if n < 0 {
                        if errno != EAGAIN && errno != EINTR { drop() }
                        break  // a slow terminal: the rest goes on the next turn
                    }
                    sent += Int64(n)
                    if n < got { break }
                }
            }
        }
    }

    /// Stops serving and removes the socket (the log stays, for `hvctl logs`).
    func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        unlink(socketPath)
        shutdown(listener, Int32(SHUT_RDWR))
    }
}

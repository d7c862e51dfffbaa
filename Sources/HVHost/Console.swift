import Glibc
import HVCore
import HVSys

/// The operator's terminal when the guest's serial port is on stdio: raw mode while the VM runs,
/// input forwarded to the serial device through a pipe, and an escape sequence to quit.
///
/// Escape: Ctrl-A then `x` quits; Ctrl-A then Ctrl-A sends one Ctrl-A to the guest.
final class Console: @unchecked Sendable {
    // @unchecked: `saved` is written once before the input thread starts and read at restore.
    private var saved: termios?
    /// The read end of the pipe the serial device gets as its input.
    let deviceInput: FileDescriptor
    private let pipeWrite: FileDescriptor

    init() throws(SystemError) {
        var fds: [Int32] = [-1, -1]
        try check("pipe", pipe(&fds))
        deviceInput = FileDescriptor(owning: fds[0])
        pipeWrite = FileDescriptor(owning: fds[1])
        // pipe2(O_CLOEXEC) is not in the Glibc module; no other thread spawns before this runs.
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
    }

    /// Starts forwarding stdin. On a terminal: raw mode and escape handling; otherwise bytes
    /// pass through untouched until end of input.
    func start(onQuit: @escaping @Sendable () -> Void) throws(SystemError) {
        let terminal = isatty(0) == 1
        if terminal { saved = TerminalMode.makeRaw(0) }
        let out = pipeWrite
        try HostThread.spawn(name: "hv-console") {
            var buffer = [UInt8](repeating: 0, count: 256)
            var escape = ConsoleEscape(allowsDetach: false)
            while true {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                let (forward, action) = terminal ? escape.filter(buffer.prefix(n)) : (Array(buffer.prefix(n)), nil)
                // A blocking write: when the guest stops reading, the pipe fills and typing waits,
                // rather than losing keystrokes.
                do { try out.writeAll(forward) } catch { break }
                if action == .quit {
                    onQuit()
                    return
                }
            }
        }
    }

    /// Puts the terminal back as it was.
    func restore() {
        if let saved { TerminalMode.restore(0, saved) }
    }
}

/// A terminal in raw mode while hv owns it.
public enum TerminalMode {
    /// Puts terminal `fd` in raw mode (keeping "\n" → "\r\n" on output) and returns how it was.
    public static func makeRaw(_ fd: Int32) -> termios? {
        var t = termios()
        guard tcgetattr(fd, &t) == 0 else { return nil }
        let saved = t
        cfmakeraw(&t)
        t.c_oflag |= tcflag_t(OPOST | ONLCR)
        tcsetattr(fd, TCSANOW, &t)
        return saved
    }

    public static func restore(_ fd: Int32, _ saved: termios) {
        var t = saved
        tcsetattr(fd, TCSANOW, &t)
    }
}

/// The console's escape keys, typed after Ctrl-A: `x` quits (`hvctl run`) or stops the VM
/// (`hvctl console`), `d` detaches (`hvctl console`), Ctrl-A sends one Ctrl-A to the guest; any
/// other key is sent after a Ctrl-A.
public struct ConsoleEscape: Sendable {
    public static let escapeByte: UInt8 = 0x01

    public enum Action: Sendable, Equatable {
        case quit
        case detach
    }

    private var escaped = false
    public let allowsDetach: Bool

    public init(allowsDetach: Bool) {
        self.allowsDetach = allowsDetach
    }

    /// The bytes to send to the guest and, when an escape key was typed, what it asks for (the
    /// bytes after it are not looked at).
    public mutating func filter(_ bytes: some Sequence<UInt8>) -> (forward: [UInt8], action: Action?) {
        var forward: [UInt8] = []
        for byte in bytes {
            if escaped {
                escaped = false
                switch byte {
                case UInt8(ascii: "x"), UInt8(ascii: "X"): return (forward, .quit)
                case UInt8(ascii: "d") where allowsDetach, UInt8(ascii: "D") where allowsDetach: return (forward, .detach)
                case Self.escapeByte: forward.append(byte)
                default: forward += [Self.escapeByte, byte]
                }
            } else if byte == Self.escapeByte {
                escaped = true
            } else {
                forward.append(byte)
            }
        }
        return (forward, nil)
    }
}

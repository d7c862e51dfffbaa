import Glibc
import HVCore
import HVSys

/// The operator's terminal when the guest's serial port is on stdio: raw mode while the VM runs,
/// input forwarded to the serial device through a pipe, and an escape sequence to quit.
///
/// Escape: Ctrl-A then `x` quits; Ctrl-A then Ctrl-A sends one Ctrl-A to the guest.
final class Console: @unchecked Sendable {
    // @unchecked: `saved` is written once before the input thread starts and read at restore.
    static let escapeByte: UInt8 = 0x01
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
        if terminal {
            var t = termios()
            if tcgetattr(0, &t) == 0 {
                saved = t
                cfmakeraw(&t)
                t.c_oflag |= tcflag_t(OPOST | ONLCR)  // keep "\n" → "\r\n" on output
                tcsetattr(0, TCSANOW, &t)
            }
        }
        let out = pipeWrite
        try HostThread.spawn(name: "hv-console") {
            var buffer = [UInt8](repeating: 0, count: 256)
            var escaped = false
            while true {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                var forward: [UInt8] = []
                for byte in buffer.prefix(n) {
                    if !terminal {
                        forward.append(byte)
                    } else if escaped {
                        escaped = false
                        if byte == UInt8(ascii: "x") || byte == UInt8(ascii: "X") {
                            onQuit()
                            return
                        }
                        forward.append(Console.escapeByte)
                        if byte != Console.escapeByte { forward.append(byte) }
                    } else if byte == Console.escapeByte {
                        escaped = true
                    } else {
                        forward.append(byte)
                    }
                }
                // A blocking write: when the guest stops reading, the pipe fills and typing waits,
                // rather than losing keystrokes.
                do { try out.writeAll(forward) } catch { break }
            }
        }
    }

    /// Puts the terminal back as it was.
    func restore() {
        if var t = saved { tcsetattr(0, TCSANOW, &t) }
    }
}

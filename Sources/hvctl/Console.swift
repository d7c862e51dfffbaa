import ArgumentParser
import Glibc
import HVHost
import HVSys

// `hvctl run --detach`, `hvctl console NAME`, `hvctl logs NAME`.

/// The line a detached VM's core writes on its start-up pipe once the guest runs (then its
/// stderr goes to RUN_DIR/NAME.core.log). Everything before it is relayed as hvctl's own stderr.
private let readyMarker = "\u{1}hv-ready "

/// Runs `definition` in a child process in a session of its own and returns (exits) once the
/// guest runs, with the child's one-line error and exit status if it never gets there.
func runDetached(_ definition: VMDefinition, verbose: Bool, restore: MachineSnapshot? = nil, startPaused: Bool = false) -> Never {
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else { fail("cannot create the start-up pipe: \(Errno.current)") }
    // No thread runs yet (the VM's come later, in the child), so fork is safe here.
    let child = fork()
    guard child >= 0 else { fail("cannot start the VM in the background: \(Errno.current)") }
    if child == 0 {
        close(fds[0])
        _ = setsid()
        let devNull = open("/dev/null", O_RDWR)
        dup2(devNull, 0)
        dup2(devNull, 1)
        dup2(fds[1], 2)  // start-up errors reach the waiting parent
        closeDescriptors(from: 3)
        exit(runVM(definition, verbose: verbose, restore: restore, startPaused: startPaused) { name in
            UnstartedClone.ran()
            // The guest runs: tell the parent, then keep the core's messages in a log of its own.
            let log = open(RunDirectory.coreLog(name), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            let line = readyMarker + name + "\n"
            _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
            dup2(log >= 0 ? log : 0, 2)  // 0 is /dev/null
            if log >= 0 { close(log) }
        })
    }
    close(fds[1])
    // A clone's overlays are the child's to keep or discard.
    UnstartedClone.ran()
    // Until EOF: the child closes its end once the guest runs, or by ending.
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fds[0], $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        bytes += buffer.prefix(n)
    }
    close(fds[0])
    let said = String(decoding: bytes, as: UTF8.self)
    if let marker = said.firstRange(of: readyMarker) {
        let before = said[..<marker.lowerBound]
        if !before.isEmpty { _ = String(before).withCString { Glibc.write(2, $0, strlen($0)) } }
        let name = said[marker.upperBound...].prefix { $0 != "\n" }
        print("started VM \(name) (pid \(child)) in the background; 'hvctl console \(name)' attaches, 'hvctl logs \(name)' shows its console")
        exit(0)
    }
    // It ended before the guest ran: its own words, and its status.
    _ = said.withCString { Glibc.write(2, $0, strlen($0)) }
    var status: Int32 = 0
    while waitpid(child, &status, 0) < 0 && errno == EINTR {}
    let exited = status & 0x7F == 0
    exit(exited ? (status >> 8) & 0xFF : 1)
}

/// `hvctl run --incoming ADDRESS --detach`: returns once the listener is up (its socket is made
/// before this); a child in a session of its own waits for the VM (`wait`) and runs it, its
/// messages in `coreLog`.
func runDetachedIncoming(verbose: Bool, coreLog: String, address: String, wait: () -> (VMDefinition, IncomingMigration)) -> Never {
    let child = fork()
    guard child >= 0 else { fail("cannot wait in the background: \(Errno.current)") }
    if child == 0 {
        _ = setsid()
        let devNull = open("/dev/null", O_RDWR)
        dup2(devNull, 0)
        dup2(devNull, 1)
        let log = open(coreLog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        dup2(log >= 0 ? log : devNull, 2)
        let (definition, arriving) = wait()
        exit(runVM(definition, verbose: verbose, incoming: arriving))
    }
    print("waiting for a VM on \(address) in the background (pid \(child)); its messages go to \(coreLog)")
    exit(0)
}

extension HVCtl {
    struct Console: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "console",
            abstract: "Attach to a detached VM's serial console.",
            discussion: """
                Keystrokes go to the guest. Ctrl-A d detaches (the VM keeps running; attach again at \
                any time), Ctrl-A x stops the VM, Ctrl-A Ctrl-A sends one Ctrl-A. One client at a time. \
                The VM must run with --detach (or --serial console).
                """)
        @OptionGroup var vm: VMName

        func run() throws {
            let name = vm.name
            guard let fd = connectTo(RunDirectory.console(name), stream: true) else {
                switch vmPresence(name) {
                case .gone: fail("no VM named '\(name)' is running (see 'hvctl ls')")
                case .live: fail("VM '\(name)' has no console to attach to: its serial port is on a terminal, a file or nothing; start it with --detach (or --serial console)")
                }
            }
            let socket = FileDescriptor(owning: fd)
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var answer: UInt8 = 0
            guard recv(fd, &answer, 1, 0) == 1 else { fail("VM '\(name)' did not answer on its console socket") }
            guard answer == UInt8(ascii: "A") else {
                fail("the console of '\(name)' is attached in another 'hvctl console'; detach that one first (Ctrl-A d)")
            }
            timeout = timeval(tv_sec: 0, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))

            let terminal = isatty(0) == 1
            let saved = terminal ? TerminalMode.makeRaw(0) : nil
            func restore() { if let saved { TerminalMode.restore(0, saved) } }
            say("attached to the console of \(name); Ctrl-A d detaches, Ctrl-A x stops the VM")
            var escape = ConsoleEscape(allowsDetach: true)
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                guard let revents = try? Poll.wait([Poll.Interest(fd: 0), Poll.Interest(fd: fd)], timeoutMilliseconds: -1) else { continue }
                if revents[1] != 0 {
                    let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                    if n <= 0 {
                        restore()
                        say("VM '\(name)' stopped")
                        Glibc.exit(0)
                    }
                    var off = 0
                    while off < n {
                        let w = buffer[off..<n].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
                        if w <= 0 { if errno == EINTR { continue } else { break } }
                        off += w
                    }
                }
                if revents[0] != 0 {
                    let n = buffer.withUnsafeMutableBytes { Glibc.read(0, $0.baseAddress, $0.count) }
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 {  // no more input: leave the VM running
                        restore()
                        Glibc.exit(0)
                    }
                    let (forward, action) = terminal ? escape.filter(buffer.prefix(n)) : (Array(buffer.prefix(n)), nil)
                    if !forward.isEmpty, (try? socket.writeAll(forward)) == nil {
                        restore()
                        say("VM '\(name)' stopped")
                        Glibc.exit(0)
                    }
                    switch action {
                    case .detach?:
                        restore()
                        say("detached from \(name); it keeps running ('hvctl console \(name)' attaches again)")
                        Glibc.exit(0)
                    case .quit?:
                        restore()
                        _ = ask(name, ControlRequest(.stop))
                        for _ in 0..<200 where PathLock.isHeld(RunDirectory.lock(name)) { usleep(50_000) }
                        say("stopped \(name)")
                        Glibc.exit(0)
                    case nil:
                        break
                    }
                }
            }
        }

        /// A line on stderr that starts at the left margin, whatever the guest left on the terminal.
        private func say(_ text: String) {
            let line = "\nhvctl: \(text)\n"  // the terminal (raw or not) turns "\n" into "\r\n"
            _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
        }
    }

    struct Logs: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "logs",
            abstract: "Print a VM's serial console log (a detached VM's, or its --serial file).",
            discussion: "With -f, keep printing what the guest writes until the VM stops. A detached VM's log stays in $HV_RUN_DIR/NAME.log after it ends.")
        @OptionGroup var vm: VMName
        @Flag(name: [.short, .customLong("follow")], help: "Follow the log until the VM stops.") var follow = false

        func run() throws {
            let name = vm.name
            var path = RunDirectory.consoleLog(name)
            if case .live = vmPresence(name), let status = controlRequest(name, ControlRequest(.status))?.status {
                guard let log = status.consoleLog else {
                    fail("VM '\(name)' does not log its console: its serial port is on a terminal or nowhere (run it with --detach, --serial console or --serial file:PATH)")
                }
                path = log
            } else if access(path, F_OK) != 0 {
                fail("no console log for '\(name)': no VM of that name runs, or ran detached, here (see 'hvctl ls')")
            }
            let file: FileDescriptor
            do { file = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular) } catch {
                fail("cannot read the console log '\(path)': \(error)")
            }
            var offset: Int64 = 0
            func copyNew() {
                var buffer = [UInt8](repeating: 0, count: 65536)
                if let size = try? file.size(), size < offset { offset = 0 }  // emptied for a new run
                while true {
                    let n = buffer.withUnsafeMutableBytes { (try? file.read(into: $0, at: offset)) ?? 0 }
                    guard n > 0 else { return }
                    var off = 0
                    while off < n {
                        let w = buffer[off..<n].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
                        guard w > 0 else { Glibc.exit(errno == EPIPE ? 0 : 1) }
                        off += w
                    }
                    offset += Int64(n)
                }
            }
            copyNew()
            guard follow else { return }
            while PathLock.isHeld(RunDirectory.lock(name)) {
                usleep(100_000)
                copyNew()
            }
            copyNew()
        }
    }
}

import Foundation
import XCTest

/// Regression tests for a red-team pass: bad host files (FIFOs, devices, oversized inputs),
/// signals during start-up, a running VM's console, busy and wedged control sockets, hostile and
/// idle segment clients, unclear messages and leftovers. Every case ends in one line, in time,
/// and leaves nothing behind.
final class RobustnessTests: XCTestCase {
    private var work: URL!
    private var runDirectory: URL { work.appendingPathComponent("run") }

    override func setUpWithError() throws {
        try Harness.requireKVM()
        work = FileManager.default.temporaryDirectory.appendingPathComponent("hv-robust-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", runDirectory.path, 1)  // inherited by every hvctl this test starts
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: work)
    }

    private func path(_ name: String) -> String { work.appendingPathComponent(name).path }

    private func fifo(_ name: String) -> String {
        let p = path(name)
        mkfifo(p, 0o600)
        return p
    }

    /// What the run directory holds (sockets, locks, segment files), recursively, by relative name.
    private func leftovers() -> [String] {
        guard let e = FileManager.default.enumerator(atPath: runDirectory.path) else { return [] }
        return e.compactMap { $0 as? String }.filter { $0 != "net" }.sorted()
    }

    private func assertOneLine(_ r: (status: Int32, stdout: String, stderr: String), status: Int32, mentions: String,
                               _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.status, status, "\(what): \(r.stderr)", file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "\(what): expected one line: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("hvctl: "), "\(what): \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.contains(mentions), "\(what): expected '\(mentions)' in: \(r.stderr)", file: file, line: line)
    }

    /// Runs hvctl that must finish on its own within `seconds`.
    private func quick(_ arguments: [String], within seconds: TimeInterval = 5,
                       file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, stdout: String, stderr: String) {
        let started = Date()
        let r = try runHvctl(arguments, timeout: seconds + 10, file: file, line: line)
        XCTAssertLessThan(Date().timeIntervalSince(started), seconds, "\(arguments) took too long", file: file, line: line)
        return r
    }

    // MARK: Defect 1: a command line too long for the protocol

    func testAnOverlongCommandLineIsOneLineNotATrap() throws {
        let guest = try Harness.testGuest()
        for length in [4300, 66000] {
            let r = try quick(["run", "--multiboot", guest, "--cmdline", String(repeating: "x", count: length), "--name", "long"])
            assertOneLine(r, status: 2, mentions: "--cmdline is \(length) bytes: at most 3072", "cmdline of \(length)")
            XCTAssertFalse(r.stderr.contains("Fatal error"), r.stderr)
        }
        XCTAssertEqual(leftovers(), [])
    }

    // MARK: Defects 2 and 8: host files of the wrong kind, never blocking, never read forever

    func testHostFilesOfTheWrongKindAreRefusedAtOnceInOneLine() throws {
        let guest = try Harness.testGuest()
        let f = fifo("f")
        let serial = Harness.repositoryRoot.appendingPathComponent("sandbox-profiles/serial.json").path
        var profile = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: serial))) as! [String: Any]
        profile["namespaces"] = [String]()
        let noNamespaces = path("no-namespaces.json")
        try JSONSerialization.data(withJSONObject: profile).write(to: URL(fileURLWithPath: noNamespaces))
        let zeroROM = path("zero.rom")
        try Data(count: 65536).write(to: URL(fileURLWithPath: zeroROM))
        let smallISO = path("small.iso")
        try Data(count: 2049).write(to: URL(fileURLWithPath: smallISO))
        let rogue = Harness.productsDirectory.appendingPathComponent("hv-rogue-device").path
        let cases: [(arguments: [String], status: Int32, mentions: String)] = [
            (["--multiboot", f], 1, "cannot open guest image '\(f)': it is a FIFO (named pipe), not a regular file"),
            (["--multiboot", "/dev/zero"], 1, "cannot open guest image '/dev/zero': it is a character device"),
            (["--multiboot", work.path], 1, "it is a directory"),
            (["--kernel", guest, "--initrd", f], 1, "cannot open initrd '\(f)': it is a FIFO"),
            (["--kernel", f], 1, "cannot open kernel '\(f)': it is a FIFO"),
            (["--firmware", f], 1, "cannot open firmware image '\(f)': it is a FIFO"),
            (["--multiboot", guest, "--cdrom", f], 1, "cannot open the --cdrom image '\(f)': it is a FIFO"),
            (["--multiboot", guest, "--disk", f], 1, "cannot open disk image '\(f)' for writing: it is a FIFO"),
            (["--multiboot", guest, "--serial", "file:\(f)"], 1, "cannot open the --serial file '\(f)': it is a FIFO"),
            (["--multiboot", guest, "--serial", "none", "--debugcon", "file:\(f)"], 1, "cannot open the --debugcon file '\(f)': it is a FIFO"),
            (["--multiboot", guest, "--device", "\(rogue),profile=\(f),pio=0x520:2"], 2, "cannot read sandbox profile '\(f)': it is a FIFO"),
            (["--multiboot", guest, "--device", "\(rogue),profile=/dev/zero,pio=0x520:2"], 2, "cannot read sandbox profile '/dev/zero': it is a character device"),
            (["--multiboot", guest, "--device", "\(f),profile=\(serial),pio=0x520:2"], 2, "is not an executable file"),
            (["--multiboot", guest, "--device", "\(rogue),profile=\(noNamespaces),pio=0x520:2"], 2, "namespaces must include \"user\""),
            (["--firmware", zeroROM], 1, "no code at its reset vector"),
            (["--multiboot", guest, "--cdrom", smallISO], 1, "is not a CD image: it is 2049 bytes"),
            (["--multiboot", guest, "--disk", "/dev/zero"], 1, "cannot open disk image '/dev/zero' for writing: it is a character device"),
            (["--multiboot", guest, "--disk", work.path + ",readonly"], 1, "it is a directory"),
            (["--multiboot", guest, "--cdrom", work.path], 1, "cannot open the --cdrom image '\(work.path)': it is a directory"),
            (["--firmware", "/dev/zero"], 1, "cannot open firmware image '/dev/zero': it is a character device"),
            (["--kernel", "/dev/zero"], 1, "cannot open kernel '/dev/zero': it is a character device"),
            (["--kernel", guest, "--initrd", work.path], 1, "cannot open initrd '\(work.path)': it is a directory"),
            (["--multiboot", guest, "--serial", "file:\(work.path)"], 1, "cannot open the --serial file '\(work.path)'"),
            (["--multiboot", guest, "--serial", "none", "--debugcon", "file:\(work.path)"], 1, "cannot open the --debugcon file '\(work.path)'"),
            (["--multiboot", guest, "--device", "\(rogue),profile=\(work.path),pio=0x520:2"], 2, "cannot read sandbox profile '\(work.path)': it is a directory"),
            (["--multiboot", guest, "--device", "\(work.path),profile=\(serial),pio=0x520:2"], 2, "is not an executable file"),
            (["--multiboot", guest, "--device", "\(rogue),profile=\(serial),pio=0x520:2,k=\(String(repeating: "v", count: 5000))"], 1, "its settings do not fit in a HELLO message"),
            (["--memory", "4097K"], 2, "guest RAM is a whole number of MiB"),
            (["--memory", "3"], 2, "--memory 3 is too small"),
            (["--cpus", "1024"], 2, "invalid --cpus '1024': use a whole number from 1 to 254"),
        ]
        for c in cases {
            let r = try quick(["run", "--name", "bad"] + c.arguments)
            assertOneLine(r, status: c.status, mentions: c.mentions, c.arguments.joined(separator: " "))
            XCTAssertEqual(leftovers(), [], "after \(c.arguments)")
        }
    }

    /// A bare --memory number is MiB, as in QEMU.
    func testABareMemorySizeIsMiB() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "48", "--name", "mib"])
        XCTAssertTrue(vm.waitForOutput("idle: ready"), vm.stderr)
        let s = try runHvctl(["status", "mib", "--json"])
        XCTAssertTrue(s.stdout.contains("\"memory_mib\" : 48"), s.stdout)
        XCTAssertEqual(try runHvctl(["stop", "mib"]).status, 0)
        XCTAssertEqual(vm.waitForExit(), 0)
    }

    // MARK: Defect 2: signals stop hvctl at any point of start-up

    func testSignalsStopHvctlWhileStartUpIsBlocked() throws {
        let guest = try Harness.testGuest()
        // Hold the segment's lock: the VM's start-up waits for it, as it would behind a slow joiner.
        try FileManager.default.createDirectory(at: runDirectory.appendingPathComponent("net"), withIntermediateDirectories: true)
        let lockPath = runDirectory.appendingPathComponent("net/held.lock").path
        let lock = open(lockPath, O_RDWR | O_CREAT, 0o600)
        XCTAssertEqual(flock(lock, LOCK_EX), 0)
        defer { close(lock) }
        for sig in [SIGTERM, SIGINT, SIGHUP] {
            let vm = try VMProcess(["run", "--multiboot", guest, "--nic", "net=held", "--name", "blocked"])
            Thread.sleep(forTimeInterval: 1)
            XCTAssertTrue(vm.process.isRunning, "start-up is waiting for the segment lock")
            let sent = Date()
            kill(vm.process.processIdentifier, sig)
            XCTAssertEqual(vm.waitForExit(timeout: 10), 128 + sig, vm.stderr)
            XCTAssertLessThan(Date().timeIntervalSince(sent), 1.0, "signal \(sig) took too long")
            XCTAssertFalse(FileManager.default.fileExists(atPath: runDirectory.appendingPathComponent("blocked.sock").path))
            XCTAssertFalse(FileManager.default.fileExists(atPath: runDirectory.appendingPathComponent("blocked.lock").path))
        }
    }

    /// SIGTERM at moments spread over a firmware boot (spawning devices, their handshakes, loading
    /// SeaBIOS, running it): hvctl ends with 143 at once and leaves no socket, lock or process.
    func testSIGTERMAtEveryStageOfAStartLeavesNothing() throws {
        // Live device processes on this host (tests run one at a time, so any extra one is a
        // leftover). Zombies do not count: a detached VM of an earlier test that ends meanwhile
        // leaves its devices' zombies to init, which here may never reap them.
        func devices() -> Int {
            let all = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
            return all.filter { pid in
                let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? ""
                let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
                let state = stat.range(of: ") ").map { stat[$0.upperBound...].prefix(1) } ?? ""
                return (comm.hasPrefix("hv-serial") || comm.hasPrefix("hv-bios")) && state != "Z" && state != "X"
            }.count
        }
        let before = devices()
        for delay in [0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4] {
            let vm = try VMProcess(["run", "--firmware", "seabios", "--serial", "none", "--name", "sigvm"])
            Thread.sleep(forTimeInterval: delay)
            let sent = Date()
            kill(vm.process.processIdentifier, SIGTERM)
            let status = vm.waitForExit(timeout: 10)
            // Before hvctl's first instruction blocks the signal, SIGTERM's default action ends it.
            let killedEarly = vm.process.terminationReason == .uncaughtSignal && status == SIGTERM
            XCTAssertTrue(status == 128 + SIGTERM || killedEarly, "after \(delay) s: status \(status) \(vm.stderr)")
            XCTAssertLessThan(Date().timeIntervalSince(sent), 1.5, "SIGTERM after \(delay) s took too long")
            XCTAssertEqual(leftovers(), [], "after \(delay) s")
        }
        Thread.sleep(forTimeInterval: 0.2)
        XCTAssertEqual(devices(), before, "device processes outlived their VM")
    }

    // MARK: Defect 3: a running VM's console file

    func testARunningVMsConsoleFileIsNeverTruncated() throws {
        let guest = try Harness.testGuest()
        let console = path("console.log")
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--name", "owner", "--serial", "file:\(console)"])
        var text = ""
        for _ in 0..<300 where !text.contains("idle: ready") {
            Thread.sleep(forTimeInterval: 0.05)
            text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        }
        XCTAssertTrue(text.contains("idle: ready"), text + vm.stderr)
        let sameName = try quick(["run", "--multiboot", guest, "--name", "owner", "--serial", "file:\(console)"])
        assertOneLine(sameName, status: 2, mentions: "a VM named 'owner' is already running", "same name")
        XCTAssertEqual(try String(contentsOfFile: console, encoding: .utf8), text, "the refused VM truncated the console")
        let sameFile = try quick(["run", "--multiboot", guest, "--name", "other", "--serial", "file:\(console)"])
        assertOneLine(sameFile, status: 1, mentions: "the --serial file '\(console)' is in use", "same console file")
        XCTAssertEqual(try String(contentsOfFile: console, encoding: .utf8), text, "the refused VM truncated the console")
        XCTAssertEqual(try runHvctl(["stop", "owner"]).status, 0)
        XCTAssertEqual(vm.waitForExit(), 0)
        XCTAssertEqual(leftovers(), [])
    }

    // MARK: Defects 4 and 5: busy and wedged control sockets

    /// A small ISO 9660 image made by xorriso (test.sh installs it).
    private func makeISO() throws -> String {
        let dir = work.appendingPathComponent("iso-root")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data("hello from a CD\n".utf8).write(to: dir.appendingPathComponent("hello.txt"))
        let iso = path("small-but-real.iso")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/xorriso")
        p.arguments = ["-as", "mkisofs", "-quiet", "-o", iso, dir.path]
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw Harness.MissingBuild(description: "xorriso failed (test.sh installs it)") }
        return iso
    }

    private func connect(_ socketPath: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in socketPath.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        XCTAssertEqual(rc, 0, "connect \(socketPath)")
        return fd
    }

    func testIdleClientsNeitherStallNorUnlistTheControlSocket() throws {
        let guest = try Harness.testGuest()
        let iso = try makeISO()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--name", "busy", "--cdrom", iso])
        XCTAssertTrue(vm.waitForOutput("idle: ready"), vm.stderr)
        let socketPath = runDirectory.appendingPathComponent("busy.sock").path
        let idle = (0..<20).map { _ in connect(socketPath) }
        defer { idle.forEach { close($0) } }
        let ls = try quick(["ls"], within: 4)
        XCTAssertEqual(ls.status, 0, ls.stderr)
        XCTAssertTrue(ls.stdout.contains("busy "), ls.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: socketPath), "ls removed a live VM's socket")
        XCTAssertEqual(try quick(["status", "busy"], within: 4).status, 0)

        // A FIFO offered as a CD: refused at once, and the control thread keeps serving.
        let insert = try quick(["cdrom", "busy", "insert", fifo("cd-fifo")], within: 4)
        assertOneLine(insert, status: 1, mentions: "it is a FIFO (named pipe)", "cdrom insert FIFO")
        let small = path("small.iso")
        try Data(count: 2049).write(to: URL(fileURLWithPath: small))
        assertOneLine(try quick(["cdrom", "busy", "insert", small], within: 4), status: 1, mentions: "is not a CD image", "cdrom insert 2049 bytes")
        XCTAssertEqual(try quick(["cdrom", "busy", "insert", iso], within: 4).status, 0)
        XCTAssertEqual(try quick(["status", "busy"], within: 4).status, 0)
        XCTAssertEqual(try quick(["stop", "busy"], within: 8).status, 0)
        XCTAssertEqual(vm.waitForExit(), 0)
        XCTAssertEqual(leftovers(), [])
    }

    // MARK: Defect 9: what a killed VM leaves is swept; what a live one has is not

    func testAKilledVMsSocketIsSweptAndALiveOnesIsKept() throws {
        let guest = try Harness.testGuest()
        let victim = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--name", "victim"])
        let survivor = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--name", "survivor"])
        XCTAssertTrue(victim.waitForOutput("idle: ready") && survivor.waitForOutput("idle: ready"), victim.stderr + survivor.stderr)
        kill(victim.process.processIdentifier, SIGKILL)
        victim.process.waitUntilExit()
        XCTAssertEqual(leftovers(), ["survivor.lock", "survivor.sock", "victim.lock", "victim.sock"])
        // The next VM's start sweeps the dead one's files (ls would too) and keeps the live one's.
        let next = try runHvctl(["run", "--multiboot", guest, "--serial", "none", "--name", "next"])
        XCTAssertEqual(next.status, 0, next.stderr)
        XCTAssertEqual(leftovers(), ["survivor.lock", "survivor.sock"])
        XCTAssertEqual(try runHvctl(["stop", "survivor"]).status, 0)
        XCTAssertEqual(survivor.waitForExit(), 0)
        XCTAssertEqual(leftovers(), [])
    }

    // MARK: Defects 6, 7 and 9: hostile and idle segment clients, and a segment's leftovers

    func testSegmentsRefuseUnsealedPortsSurviveIdleClientsAndLeaveNothing() throws {
        let guest = try Harness.testGuest()
        let responder = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=netpeer ip=10.9.0.1",
                                       "--nic", "net=lab,mac=52:54:00:00:00:01", "--name", "responder"])
        XCTAssertTrue(responder.waitForOutput("link up"), responder.stdout + responder.stderr)
        let segmentSocket = runDirectory.appendingPathComponent("net/lab.sock").path
        // A join whose port region is an unsealed memfd, shrunk after the join, and 20 idle
        // connections held open while a VM joins: python3 is the hostile client.
        let script = """
        import array, os, socket, sys, time
        path = sys.argv[1]
        fd = os.memfd_create("hostile-port", 0)
        os.ftruncate(fd, 1 << 20)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        s.sendmsg([b"join vm=evil nic=net0 mac=52:54:00:66:66:66"],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd, os.eventfd(0), os.eventfd(0)]))])
        s.settimeout(5)
        print(s.recv(4096).decode(), flush=True)
        os.ftruncate(fd, 0)
        idle = []
        for _ in range(20):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.connect(path)
            idle.append(c)
        print("idle connections open", flush=True)
        time.sleep(float(sys.argv[2]))
        """
        let hostile = Process()
        hostile.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        hostile.arguments = ["-c", script, segmentSocket, "20"]
        let out = Pipe()
        hostile.standardOutput = out
        try hostile.run()
        defer { if hostile.isRunning { hostile.terminate() } }
        var said = ""
        let deadline = Date().addingTimeInterval(10)
        while !said.contains("idle connections open") && Date() < deadline {
            said += String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        }
        XCTAssertTrue(said.contains("error frame port: shared region") && said.contains("is not a memfd sealed against shrinking and growing"), said)
        XCTAssertTrue(said.contains("idle connections open"), said)
        // With every idle connection still open, a VM joins and pings the responder.
        let pinger = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=netping ip=10.9.0.2 peer=10.9.0.1 count=2",
                                    "--nic", "net=lab,mac=52:54:00:00:00:02", "--name", "pinger"])
        XCTAssertTrue(pinger.waitForOutput("net: ping done sent=2 received=2"), pinger.stdout + pinger.stderr)
        XCTAssertTrue(responder.process.isRunning, "the switch or the responder died")
        hostile.terminate()
        for (name, vm) in [("pinger", pinger), ("responder", responder)] {
            XCTAssertEqual(try runHvctl(["stop", name]).status, 0)
            XCTAssertEqual(vm.waitForExit(), 0)
        }
        // The last VM out removed the segment's socket and lock.
        XCTAssertEqual(leftovers(), [])
    }
}

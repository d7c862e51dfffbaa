import Foundation
import XCTest

/// hv-firecracker, hv in Firecracker's place: a third-party Firecracker client (PyPI's
/// hysn-firecracker-python) drives a VM through it; Firecracker's `--config-file --no-api`
/// runs one to its end; bad command lines and configurations are refused in one line; and a
/// SIGKILLed hv-firecracker takes its VM (and the VM's tap) with it.
final class FirecrackerTests: XCTestCase {
    private var dir: URL!
    private var runDir: String { dir.appendingPathComponent("run").path }
    private static var binary: String { Harness.productsDirectory.appendingPathComponent("hv-firecracker").path }
    private static var python: String { Harness.repositoryRoot.appendingPathComponent(".build/pyenv/bin/python").path }
    /// A tap name of this test run's own (taps are host-wide).
    private let tap = "hvfc\(getpid() % 100_000)"

    override func setUpWithError() throws {
        try Harness.requireKVM()
        // Lowercase: requests-unixsocket carries the socket path as a URL host, which gets lowercased.
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-fc-\(getpid())-\(UUID().uuidString.prefix(8).lowercased())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", runDir, 1)
    }

    override func tearDown() {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? [] where name.hasSuffix(".sock") {
            _ = try? runHvctl(["stop", String(name.dropLast(5))])
        }
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func disk() throws -> String {
        let path = dir.appendingPathComponent("rootfs.img").path
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: nil))
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.truncate(atOffset: 16 << 20)
        try handle.close()
        return path
    }

    private func tapExists() -> Bool { FileManager.default.fileExists(atPath: "/sys/class/net/\(tap)") }

    func testAFirecrackerClientFromPyPIDrivesAVM() throws {
        let client = Harness.repositoryRoot.appendingPathComponent("Tests/FirecrackerClient/drive_hv_firecracker.py").path
        guard FileManager.default.isExecutableFile(atPath: Self.python),
              (try? tool(Self.python, ["-c", "import requests_unixsocket, sysconfig, os; assert os.path.exists(os.path.join(sysconfig.get_paths()['purelib'], 'firecracker', 'api.py'))"]))?.status == 0 else {
            throw Harness.MissingBuild(description: "hysn-firecracker-python (in .build/pyenv) is missing: test.sh installs it")
        }
        let socket = dir.appendingPathComponent("firecracker.socket").path
        let run = try tool(Self.python, [client, Self.binary, Harness.hvctl, socket, "fc-client", try Harness.testGuest(), try disk(), tap])
        XCTAssertEqual(run.status, 0, run.output)
        XCTAssertTrue(run.output.hasSuffix("ok\n"), run.output)
        XCTAssertFalse(tapExists(), "the VM's tap outlived it")
        XCTAssertEqual(try runHvctl(["ls", "--json"]).stdout.filter { !$0.isWhitespace }, "[]", "a VM outlived hv-firecracker")
    }

    func testConfigFileWithoutAPIRunsTheGuestToItsEnd() throws {
        let config = dir.appendingPathComponent("vm.json")
        try Data("""
            {"boot-source": {"kernel_image_path": "\(try Harness.testGuest())", "boot_args": "mode=ticks count=3 delay=10"},
             "machine-config": {"vcpu_count": 2, "mem_size_mib": 32}, "drives": [], "network-interfaces": [],
             "logger": {"log_path": "\(dir.path)/fc.log", "level": "Info", "show_level": true}, "balloon": null}
            """.utf8).write(to: config)
        let r = try runHvctl(["--no-api", "--config-file", config.path, "--id", "fc-file"], timeout: 60, executable: Self.binary)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("tick 3\n") && r.stdout.contains("hv-testguest: done"), r.stdout)
        let log = try String(contentsOfFile: dir.path + "/fc.log", encoding: .utf8)
        XCTAssertTrue(log.contains("[fc-file:fc_api:INFO] Running the microVM as hv VM 'fc-file'"), log)
        XCTAssertTrue(log.contains("The microVM ended: hvctl exited with status 0"), log)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: runDir).filter { !$0.hasSuffix(".log") }, [], "files left in the run directory")
    }

    func testBadCommandLinesAndConfigurationsAreRefusedInOneLine() throws {
        let guest = try Harness.testGuest()
        func refused(_ arguments: [String], _ text: String, file: StaticString = #filePath, line: UInt = #line) throws {
            let r = try runHvctl(arguments, timeout: 30, executable: Self.binary)
            XCTAssertNotEqual(r.status, 0, file: file, line: line)
            XCTAssertTrue(r.stderr.contains(text), "\(r.stderr) does not say \(text)", file: file, line: line)
            XCTAssertEqual(r.stderr.split(separator: "\n").filter { !$0.hasPrefix("Usage:") && !$0.hasPrefix("  See ") && !$0.isEmpty }.count, 1,
                           r.stderr, file: file, line: line)
        }
        func config(_ text: String) throws -> String {
            let url = dir.appendingPathComponent("c\(UUID().uuidString.prefix(6)).json")
            try Data(text.utf8).write(to: url)
            return url.path
        }
        try refused(["--no-api"], "--no-api needs --config-file")
        try refused(["--id", "a/b"], "--id 'a/b'")
        try refused(["--seccomp-filter", "/x"], "hv's sandbox profiles are its own")
        let taken = dir.appendingPathComponent("taken.socket").path
        FileManager.default.createFile(atPath: taken, contents: nil)
        try refused(["--api-sock", taken], "the API socket \(taken) exists")
        try refused(["--no-api", "--config-file", try config("{\"vsock\": {\"guest_cid\": 3, \"uds_path\": \"/tmp/v.sock\"}}")], "has no vsock device")
        try refused(["--no-api", "--config-file", try config("{\"balloon\": {\"amount_mib\": 1}}")], "'balloon.deflate_on_oom' is missing")
        try refused(["--no-api", "--config-file", try config("{\"balloon\": {\"amount_mib\": 1, \"deflate_on_oom\": false, \"free_page_hinting\": true}}")],
                    "hv has no free page hinting")
        try refused(["--no-api", "--config-file", try config("{\"machine-config\": {\"vcpu_count\": 1}}")], "mem_size_mib is missing")
        try refused(["--no-api", "--config-file", try config("{\"boot-source\": {\"kernel_image_path\": \"/etc/hostname\"}}")],
                    "is neither a bzImage nor a multiboot kernel")
        try refused(["--no-api", "--config-file", try config("{\"boot-source\": {\"kernel_image_path\": \"\(guest)\"}, \"drives\": [{\"drive_id\": \"d\", \"path_on_host\": \"/nonexistent.img\", \"is_root_device\": true}]}")],
                    "/nonexistent.img: No such file or directory")
        try refused(["--no-api", "--config-file", try config("{\"machine-config\": {\"vcpu_count\": 1, \"mem_size_mib\": 32}}")],
                    "Cannot start microvm without kernel configuration")
        try refused(["--no-api", "--config-file", dir.path + "/none.json"], "none.json")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: runDir), [], "files left in the run directory")
    }

    /// Firecracker's clients wait for the socket's path and then connect: the path must not
    /// appear before the server listens (bind and listen are two calls; CI's benchmark once
    /// connected between them and was refused). Ten starts, each connected the moment the path shows.
    func testTheAPISocketAcceptsAsSoonAsItsPathExists() throws {
        for i in 0..<10 {
            let socket = dir.appendingPathComponent("race\(i).socket").path
            let fc = try VMProcess(["--api-sock", socket, "--id", "race\(i)"], executable: Self.binary)
            let deadline = Date().addingTimeInterval(30)
            while access(socket, F_OK) != 0 && fc.process.isRunning && Date() < deadline { usleep(50) }
            XCTAssertEqual(access(socket, F_OK), 0, "no socket after 30 s: \(fc.stderr)")
            let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (j, byte) in socket.utf8.enumerated() { raw[j] = byte }
            }
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            let reason = String(cString: strerror(errno))
            close(fd)
            XCTAssertEqual(connected, 0, "start \(i): connect to a socket whose path exists: \(reason)")
            fc.process.terminate()
            fc.process.waitUntilExit()
        }
        // Nothing left: neither the sockets nor their staging names.
        let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.contains("socket") || $0.hasSuffix(".binding") }
        XCTAssertEqual(left, [], "hv-firecracker left these behind")
    }

    /// Killing Firecracker is how many clients end a VM: the VM must not outlive hv-firecracker.
    func testSIGKILLOfHVFirecrackerEndsItsVM() throws {
        let config = dir.appendingPathComponent("vm.json")
        try Data("""
            {"boot-source": {"kernel_image_path": "\(try Harness.testGuest())", "boot_args": "mode=ticks count=100000 delay=50"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
             "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "\(tap)"}]}
            """.utf8).write(to: config)
        let socket = dir.appendingPathComponent("fc.socket").path
        let fc = try VMProcess(["--api-sock", socket, "--config-file", config.path, "--id", "fc-kill"], executable: Self.binary)
        let deadline = Date().addingTimeInterval(30)
        while !fc.stdout.contains("tick 2") && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        XCTAssertTrue(fc.stdout.contains("tick 2"), fc.stderr)
        XCTAssertTrue(tapExists())
        let r = try tool("/usr/bin/curl", ["-s", "--unix-socket", socket, "http://localhost/"])
        XCTAssertTrue(r.output.contains("\"state\":\"Running\""), r.output)
        kill(fc.process.processIdentifier, SIGKILL)
        fc.process.waitUntilExit()
        let gone = Date().addingTimeInterval(15)
        while (tapExists() || (try? runHvctl(["ls", "--json"]).stdout.contains("fc-kill")) == true) && Date() < gone {
            Thread.sleep(forTimeInterval: 0.05)
        }
        XCTAssertFalse(tapExists(), "the VM's tap outlived hv-firecracker")
        XCTAssertFalse(try runHvctl(["ls", "--json"]).stdout.contains("fc-kill"), "the VM outlived hv-firecracker")
    }
}

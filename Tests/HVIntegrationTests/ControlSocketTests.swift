import Foundation
import XCTest

/// The running VM's control socket: `hvctl ls`, `hvctl status NAME`, `hvctl stop NAME`.
final class ControlSocketTests: XCTestCase {
    private var runDirectory: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        runDirectory = FileManager.default.temporaryDirectory.appendingPathComponent("hv-run-\(getpid())")
        setenv("HV_RUN_DIR", runDirectory.path, 1)  // inherited by every hvctl this test starts
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: runDirectory)
    }

    private func status(_ name: String) throws -> [String: Any] {
        let r = try runHvctl(["status", name, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
    }

    func testListStatusRestartCountAndStop() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--name", "ctl-test"])
        XCTAssertTrue(vm.waitForOutput("idle: ready"), vm.stderr)

        // The socket is the operator's alone.
        var st = stat()
        XCTAssertEqual(stat(runDirectory.path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o700)
        XCTAssertEqual(stat(runDirectory.appendingPathComponent("ctl-test.sock").path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)

        let ls = try runHvctl(["ls"])
        XCTAssertEqual(ls.status, 0, ls.stderr)
        let row = try XCTUnwrap(ls.stdout.split(separator: "\n").first { $0.hasPrefix("ctl-test ") }, ls.stdout)
        XCTAssertTrue(row.contains(" \(vm.process.processIdentifier) "), String(row))
        XCTAssertTrue(row.contains("serial0(running, 0 restarts)"), String(row))

        var s = try status("ctl-test")
        XCTAssertEqual(s["name"] as? String, "ctl-test")
        XCTAssertEqual(s["pid"] as? Int, Int(vm.process.processIdentifier))
        XCTAssertEqual(s["boot"] as? String, "multiboot")
        XCTAssertEqual(s["memory_mib"] as? Int, 32)
        var devices = try XCTUnwrap(s["devices"] as? [[String: Any]])
        XCTAssertEqual(devices.map { $0["name"] as? String }, ["serial0", "bios"])
        let serialPid = try XCTUnwrap(devices[0]["pid"] as? Int)
        XCTAssertGreaterThan(serialPid, 0)

        // A crashed device is restarted, and the control socket says so.
        kill(pid_t(serialPid), SIGKILL)
        let deadline = Date().addingTimeInterval(10)
        repeat {
            Thread.sleep(forTimeInterval: 0.05)
            s = try status("ctl-test")
            devices = try XCTUnwrap(s["devices"] as? [[String: Any]])
        } while Date() < deadline && !(devices[0]["restarts"] as? Int == 1 && devices[0]["state"] as? String == "running")
        XCTAssertEqual(devices[0]["restarts"] as? Int, 1, "\(devices)")
        XCTAssertNotEqual(devices[0]["pid"] as? Int, serialPid)

        // A second VM cannot take the name.
        let dup = try runHvctl(["run", "--multiboot", guest, "--name", "ctl-test"])
        XCTAssertEqual(dup.status, 2)
        XCTAssertTrue(dup.stderr.contains("a VM named 'ctl-test' is already running"), dup.stderr)

        let stop = try runHvctl(["stop", "ctl-test"])
        XCTAssertEqual(stop.status, 0, stop.stderr)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
        XCTAssertTrue(vm.stderr.contains("stopped by 'hvctl stop ctl-test'"), vm.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: runDirectory.appendingPathComponent("ctl-test.sock").path))
        XCTAssertFalse(try runHvctl(["ls"]).stdout.contains("ctl-test"))
    }

    func testMistakesGetOneLine() throws {
        var r = try runHvctl(["stop", "nobody-here"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("no VM named 'nobody-here' is running"), r.stderr)
        r = try runHvctl(["status", "../etc"])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.contains("invalid name '../etc'"), r.stderr)
        r = try runHvctl(["run", "--name", "a/b"])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.contains("invalid --name 'a/b'"), r.stderr)
        r = try runHvctl(["status"])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.contains("missing expected argument '<name>'"), r.stderr)
    }

    func testAStaleSocketIsReplaced() throws {
        // A VM killed with SIGKILL leaves its socket behind; the name is free again.
        let guest = try Harness.testGuest()
        let first = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--name", "stale"])
        XCTAssertTrue(first.waitForOutput("idle: ready"), first.stderr)
        kill(first.process.processIdentifier, SIGKILL)
        first.process.waitUntilExit()
        XCTAssertTrue(FileManager.default.fileExists(atPath: runDirectory.appendingPathComponent("stale.sock").path))
        let second = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--name", "stale"])
        XCTAssertTrue(second.waitForOutput("idle: ready"), second.stderr)
        XCTAssertEqual(try status("stale")["pid"] as? Int, Int(second.process.processIdentifier))
        XCTAssertEqual(try runHvctl(["stop", "stale"]).status, 0)
        XCTAssertEqual(second.waitForExit(timeout: 30), 0, second.stderr)
    }
}

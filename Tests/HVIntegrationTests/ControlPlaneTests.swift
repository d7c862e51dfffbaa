import Foundation
import XCTest

/// hvctl as an operator meets it: help everywhere, the exit-code contract, VM definitions,
/// pause/resume, image formats and image locks shared with QEMU.
final class ControlPlaneTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-cp-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", dir.appendingPathComponent("run").path, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func status(_ name: String) throws -> [String: Any] {
        let r = try runHvctl(["status", name, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
    }

    func testEverySubcommandHasHelpAndCompletionIsGenerated() throws {
        let commands: [[String]] = [[], ["run"], ["ls"], ["status"], ["start"], ["stop"], ["pause"], ["resume"], ["snapshot"], ["console"], ["logs"], ["cdrom"], ["device"], ["disk"],
                                    ["disk", "create"], ["disk", "info"], ["disk", "resize"], ["disk", "convert"], ["disk", "commit"], ["net"], ["net", "ls"], ["sandbox"], ["sandbox", "show"], ["version"]]
        for command in commands {
            let r = try runHvctl(command + ["--help"])
            XCTAssertEqual(r.status, 0, "\(command): \(r.stderr)")
            XCTAssertTrue(r.stdout.contains("USAGE: hvctl \(command.joined(separator: " "))"), "\(command): \(r.stdout)")
            XCTAssertEqual(r.stderr, "", "\(command)")
        }
        // `hvctl help status` is the same as `hvctl status --help`.
        XCTAssertTrue(try runHvctl(["help", "status"]).stdout.contains("USAGE: hvctl status <name>"))
        for shell in ["bash", "zsh", "fish"] {
            let r = try runHvctl(["--generate-completion-script", shell])
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertTrue(r.stdout.contains("pause") && r.stdout.contains("print-config"), shell)
        }
        let v = try runHvctl(["--version"])
        XCTAssertTrue(v.stdout.hasPrefix("hv "), v.stdout)
    }

    /// 0 success, 1 a failure at run time, 2 a usage error; every error is one line.
    func testExitCodeContract() throws {
        let bad = dir.appendingPathComponent("bad.json").path
        try Data(#"{"cpus": 2, "disks": [{"path": "x.img", "redonly": true}]}"#.utf8).write(to: URL(fileURLWithPath: bad))
        let cases: [(arguments: [String], status: Int32, mentions: String)] = [
            ([], 2, "no command given"),
            (["launch"], 2, "unknown command 'launch'"),
            (["run", "--frobnicate"], 2, "unknown option '--frobnicate'"),
            (["run", "--cpus", "300"], 2, "invalid --cpus '300'"),
            (["run", "--cpus", "two"], 2, "invalid --cpus 'two'"),
            (["run", "--memory", "12X"], 2, "invalid --memory '12X'"),
            (["run", "--nic", "bridge=br0"], 2, "invalid --nic 'bridge=br0'"),
            (["run", "--config", bad], 2, "VM definition '\(bad)': 'disks[0].redonly': unknown key"),
            (["run", "--config", bad, "--cpus", "2"], 2, "--config describes the whole VM"),
            (["run", "--config", dir.appendingPathComponent("missing.json").path], 1, "cannot read VM definition"),
            (["status"], 2, "missing expected argument '<name>'"),
            (["status", "../etc"], 2, "invalid name '../etc'"),
            (["status", "nosuchvm"], 1, "no VM named 'nosuchvm' is running"),
            (["stop", "nosuchvm"], 1, "no VM named 'nosuchvm' is running"),
            (["pause", "nosuchvm"], 1, "no VM named 'nosuchvm' is running"),
            (["resume"], 2, "missing expected argument '<name>'"),
            (["cdrom", "vm1", "spin"], 2, "'spin'"),
            (["cdrom", "vm1", "insert"], 2, "'cdrom NAME insert' needs the ISO's path"),
            (["device", "vm1", "restart"], 2, "needs a device name"),
            (["device", "vm1", "upgrade", "disk0"], 2, "needs --binary PATH"),
            (["disk", "create", "/nonexistent-dir/x.img", "--size", "1M"], 1, "cannot create '/nonexistent-dir/x.img'"),
            (["disk", "create", dir.appendingPathComponent("y.img").path, "--size", "1000"], 2, "not a multiple of 512"),
            (["net", "ls", "--yaml"], 2, "unknown option '--yaml'"),
            (["sandbox", "show", "gpu"], 2, "unknown device 'gpu'"),
        ]
        for c in cases {
            let r = try runHvctl(c.arguments)
            XCTAssertEqual(r.status, c.status, "\(c.arguments): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(c.mentions), "\(c.arguments): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(c.arguments): \(r.stderr)")
        }
    }

    /// `--print-config` → `--config` gives the same VM; the document runs.
    func testConfigRoundTripRunsTheSameVM() throws {
        try Harness.requireKVM()
        let guest = try Harness.testGuest()
        let image = dir.appendingPathComponent("data.img").path
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "8M"]).status, 0)
        let flags = ["--multiboot", guest, "--cmdline", "mode=idle", "--memory", "48", "--cpus", "2", "--disk", image + ",readonly",
                     "--nic", "net=cp-lab", "--serial", "file:" + dir.appendingPathComponent("console.log").path, "--no-reboot"]
        let printed = try runHvctl(["run", "--print-config"] + flags)
        XCTAssertEqual(printed.status, 0, printed.stderr)
        let config = dir.appendingPathComponent("vm.json")
        try Data(printed.stdout.utf8).write(to: config)
        let again = try runHvctl(["run", "--config", config.path, "--print-config"])
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertEqual(again.stdout, printed.stdout)
        let doc = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(printed.stdout.utf8)) as? [String: Any])
        XCTAssertEqual(doc["memory_mib"] as? Int, 48)
        XCTAssertEqual(doc["on_reset"] as? String, "stop")

        let vm = try VMProcess(["run", "--config", config.path, "--name", "fromdoc"])
        defer { vm.terminateAndWait() }
        let log = dir.appendingPathComponent("console.log").path
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, !((try? String(contentsOfFile: log, encoding: .utf8))?.contains("idle: ready") ?? false) { Thread.sleep(forTimeInterval: 0.1) }
        let s = try status("fromdoc")
        XCTAssertEqual(s["memory_mib"] as? Int, 48)
        XCTAssertEqual(s["cpus"] as? Int, 2)
        XCTAssertEqual(s["state"] as? String, "running")
        let disks = try XCTUnwrap(s["disks"] as? [[String: Any]])
        XCTAssertEqual(disks.first?["path"] as? String, image)
        XCTAssertEqual(disks.first?["readonly"] as? Bool, true)
        XCTAssertEqual(disks.first?["format"] as? String, "raw")
        let nics = try XCTUnwrap(s["nics"] as? [[String: Any]])
        XCTAssertEqual(nics.first?["segment"] as? String, "cp-lab")
        XCTAssertEqual((nics.first?["mac"] as? String)?.hasPrefix("52:54:00:"), true)
        XCTAssertEqual((s["vcpus"] as? [Any])?.count, 2)
        let ls = try runHvctl(["ls", "--json"])
        let list = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(ls.stdout.utf8)) as? [[String: Any]], ls.stdout)
        XCTAssertEqual(list.map { $0["name"] as? String }, ["fromdoc"])
        XCTAssertEqual(try runHvctl(["stop", "fromdoc"]).status, 0)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
    }

    /// A paused guest makes no progress: a guest printing a line every 50 ms of TSC time prints
    /// none while paused, and carries on after resume.
    /// The halt monitor reads the vCPUs' KVM statistics (`blocking`, `halt_exits`) instead of
    /// kicking them out of the guest: a vCPU that never halts is never kicked by it (it was every
    /// 10 ms), and status still reports it running.
    func testTheHaltMonitorDoesNotKickAVCPUThatRuns() throws {
        try Harness.requireKVM()
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let version = release.split(separator: ".").prefix(2).compactMap { Int($0.prefix { $0.isNumber }) }
        guard version.count == 2, (version[0], version[1]) >= (5, 16) else { throw XCTSkip("KVM's vCPU 'blocking' statistic needs Linux 5.16; this is \(release)") }
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=pioread count=4000000000", "--name", "busy"])
        defer { vm.terminateAndWait() }
        XCTAssertTrue(vm.waitForOutput("hv-testguest: mode=pioread"), vm.stdout + vm.stderr)
        Thread.sleep(forTimeInterval: 1.0)
        let s = try status("busy")
        let vcpu = try XCTUnwrap((s["vcpus"] as? [[String: Any]])?.first, "\(s)")
        XCTAssertEqual(vcpu["state"] as? String, "running")
        let exits = try XCTUnwrap(vcpu["exits"] as? [String: Any], "\(vcpu)")
        XCTAssertGreaterThan(exits["io"] as? Int ?? 0, 1000, "\(exits)")
        XCTAssertLessThanOrEqual(exits["interrupted"] as? Int ?? .max, 2, "the halt monitor kicked a running vCPU: \(exits)")
    }

    func testPauseStopsEveryVCPUAndResumeCarriesOn() throws {
        try Harness.requireKVM()
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=ticks count=100000 delay=50", "--cpus", "2", "--name", "ticker"])
        defer { vm.terminateAndWait() }
        XCTAssertTrue(vm.waitForOutput("tick 3\n"), vm.stdout + vm.stderr)
        let pause = try runHvctl(["pause", "ticker"])
        XCTAssertEqual(pause.status, 0, pause.stderr)
        Thread.sleep(forTimeInterval: 0.2)  // the last line the serial device had taken reaches stdout
        let before = vm.stdout.components(separatedBy: "tick ").count
        Thread.sleep(forTimeInterval: 1.0)
        XCTAssertEqual(vm.stdout.components(separatedBy: "tick ").count, before, "the guest ran while paused")
        var s = try status("ticker")
        XCTAssertEqual(s["state"] as? String, "paused")
        XCTAssertEqual((s["vcpus"] as? [[String: Any]])?.map { $0["state"] as? String }, ["paused", "paused"])
        let again = try runHvctl(["pause", "ticker"])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.contains("already paused"), again.stderr)
        let rip = try runHvctl(["status", "ticker", "--rip"])
        XCTAssertTrue(rip.stdout.contains("rip 0x"), rip.stdout)

        XCTAssertEqual(try runHvctl(["resume", "ticker"]).status, 0)
        XCTAssertTrue(vm.waitForOutput("tick \(before + 3)\n", timeout: 10), String(vm.stdout.suffix(200)))
        s = try status("ticker")
        XCTAssertEqual(s["state"] as? String, "running")
        XCTAssertEqual(try runHvctl(["resume", "ticker"]).status, 1, "not paused")
        XCTAssertEqual(try runHvctl(["stop", "ticker"]).status, 0)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
    }

    /// VMDK, VHD and qcow (version 1) images are refused by name, never used as raw; a disk image
    /// is not a CD.
    func testForeignImageFormatsAreRefusedByName() throws {
        let guest = try Harness.testGuest()
        for (format, name) in [("vmdk", "VMDK"), ("vpc", "VHD (vpc)"), ("qcow", "qcow (version 1)")] {
            let image = dir.appendingPathComponent("disk.\(format)").path
            let made = try tool("/usr/bin/qemu-img", ["create", "-q", "-f", format, image, "16M"])
            XCTAssertEqual(made.status, 0, made.output)
            let r = try runHvctl(["run", "--multiboot", guest, "--disk", image, "--serial", "none"])
            XCTAssertEqual(r.status, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains("disk image '\(image)' is a \(name) image; hv reads raw and qcow2 images"), r.stderr)
            let cd = try runHvctl(["run", "--multiboot", guest, "--cdrom", image, "--serial", "none"])
            XCTAssertEqual(cd.status, 1, cd.stderr)
            XCTAssertTrue(cd.stderr.contains("is not a CD image"), cd.stderr)
        }
    }

    /// hv's image locks are the ones QEMU takes: neither opens an image the other is writing.
    func testImageLocksAreSharedWithQEMU() throws {
        try Harness.requireKVM()
        let guest = try Harness.testGuest()
        let image = dir.appendingPathComponent("shared.img").path
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "8M"]).status, 0)
        // QEMU holds it (qemu-io keeps it open read-write for 3 s): hv refuses it.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
        holder.arguments = ["-f", "raw", "-c", "sleep 3000", image]
        try holder.run()
        Thread.sleep(forTimeInterval: 0.5)
        let refused = try runHvctl(["run", "--multiboot", guest, "--disk", image, "--serial", "none"])
        XCTAssertEqual(refused.status, 1, refused.stderr)
        XCTAssertTrue(refused.stderr.contains("is locked by another process"), refused.stderr)
        holder.waitUntilExit()

        // hv holds it: QEMU cannot open it.
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--disk", image, "--name", "holder"])
        defer { vm.terminateAndWait() }
        XCTAssertTrue(vm.waitForOutput("idle: ready"), vm.stderr)
        let qemu = try tool("/usr/bin/qemu-io", ["-f", "raw", "-c", "read 0 512", image])
        XCTAssertNotEqual(qemu.status, 0, qemu.output)
        XCTAssertTrue(qemu.output.contains("Failed to lock byte") || qemu.output.contains("Failed to get"), qemu.output)
        XCTAssertEqual(try runHvctl(["stop", "holder"]).status, 0)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
    }
}

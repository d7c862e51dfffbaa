import Foundation
import XCTest

/// The memory balloon (hv-balloon) with hv's test guest as its driver: the pages the guest puts
/// in the balloon leave the host's books at once (the guest-RAM memfd's allocation and the VM's
/// memory cgroup), pages it takes back read zero, free page reports are given back too, the
/// guest's statistics reach `hvctl balloon`, and the balloon survives `kill -9` of its process.
final class BalloonTests: XCTestCase {
    private var dir: URL!
    private let mib = 1 << 20

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-balloon-\(getpid())")
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

    /// Host memory of the guest's RAM, and the VM's memory cgroup's use (nil without cgroups).
    private func hostMemory(_ name: String) throws -> (guestRAM: Int, cgroup: Int?) {
        let s = try status(name)
        let ram = try XCTUnwrap(s["guest_memory_host_bytes"] as? Int, "no guest_memory_host_bytes")
        return (ram, (s["resources"] as? [String: Any])?["memory_bytes"] as? Int)
    }

    private func balloon(_ name: String) throws -> [String: Any] {
        let r = try runHvctl(["balloon", name, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
    }

    /// Guest: 64 MiB, 4 MiB filled from 16 MiB up, the bottom 1 MiB of it reported free. The
    /// balloon takes 3 MiB (host memory drops by exactly that), statistics come every second;
    /// `kill -9` of hv-balloon loses nothing (the driver's `actual`, the counters); deflating to
    /// 1 MiB hands 2 MiB back, which read zero in the guest before it fills them again.
    func testInflatedPagesLeaveTheHostAndComeBackZeroed() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--name", "squeezed", "--multiboot", guest, "--cmdline", "mode=balloon count=4", "--memory", "64M",
                                "--balloon", "stats=1,free_page_reporting"])
        defer { vm.terminateAndWait() }
        XCTAssertTrue(vm.waitForOutput("balloon: reported 256 pages free", timeout: 60), vm.stdout + vm.stderr)
        XCTAssertTrue(vm.stdout.contains("balloon: ready offered=20000022 filled=1024 pages total=67108864 held=0"), vm.stdout)
        // The report was served before the guest printed its line: 256 pages given back.
        var b = try balloon("squeezed")
        XCTAssertEqual(b["reported_pages"] as? Int, 256, "\(b)")
        XCTAssertEqual(b["driver_ready"] as? Bool, true, "\(b)")
        XCTAssertEqual(b["free_page_reporting"] as? Bool, true, "\(b)")
        let before = try hostMemory("squeezed")
        XCTAssertGreaterThanOrEqual(before.guestRAM, 3 * mib, "the guest's 3 MiB still filled are not on the host")

        let inflate = try runHvctl(["balloon", "squeezed", "3M", "--wait"])
        XCTAssertEqual(inflate.status, 0, inflate.stderr)
        XCTAssertTrue(inflate.stdout.hasPrefix("balloon of squeezed: asked for 3 MiB"), inflate.stdout)
        XCTAssertTrue(inflate.stdout.contains("balloon:   asked for 3 MiB, the guest holds 3 MiB (driver ready; statistics, free page reporting)"), inflate.stdout)
        XCTAssertTrue(vm.waitForOutput("balloon: inflated, holds 768 pages"), vm.stdout)
        let inflated = try hostMemory("squeezed")
        XCTAssertEqual(Double(before.guestRAM - inflated.guestRAM), Double(3 * mib), accuracy: Double(mib) / 8,
                       "guest RAM on the host: \(before.guestRAM) bytes before, \(inflated.guestRAM) after a 3 MiB balloon")
        if let was = before.cgroup, let now = inflated.cgroup {
            XCTAssertGreaterThanOrEqual(was - now, 2 * mib, "the VM's memory cgroup: \(was) bytes before, \(now) after")
        }

        // Statistics: free memory is what the guest left unfilled plus what the balloon holds.
        let deadline = Date().addingTimeInterval(10)
        repeat {
            b = try balloon("squeezed")
            if let stats = b["stats"] as? [String: Int], stats["free_memory"] == (64 - 16 - 4 + 3) * mib { break }
            Thread.sleep(forTimeInterval: 0.2)
        } while Date() < deadline
        let stats = try XCTUnwrap(b["stats"] as? [String: Int], "\(b)")
        XCTAssertEqual(stats["total_memory"], 64 * mib, "\(b)")
        XCTAssertEqual(stats["free_memory"], 47 * mib, "\(b)")
        XCTAssertLessThan(try XCTUnwrap(b["stats_age_ms"] as? Int), 5000, "\(b)")
        XCTAssertTrue(vm.stdout.contains("balloon: stats sent 1\n"), "the device never asked for fresh statistics: \(vm.stdout)")

        // kill -9: the restarted process takes the balloon back from its state page.
        let pid = try XCTUnwrap(vm.children(named: "hv-balloon").first)
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        let restartDeadline = Date().addingTimeInterval(15)
        while vm.children(named: "hv-balloon").first.map({ $0 == pid }) ?? true, Date() < restartDeadline { Thread.sleep(forTimeInterval: 0.05) }
        b = try balloon("squeezed")
        XCTAssertEqual(b["actual_mib"] as? Int, 3, "\(b)")
        XCTAssertEqual(b["inflated_pages"] as? Int, 768, "\(b)")

        let deflate = try runHvctl(["balloon", "squeezed", "1M", "--wait"])
        XCTAssertEqual(deflate.status, 0, deflate.stderr)
        XCTAssertTrue(vm.waitForOutput("balloon: deflated, holds 256 pages, returned pages read zero=1"), vm.stdout)
        let deflated = try hostMemory("squeezed")
        XCTAssertEqual(Double(deflated.guestRAM - inflated.guestRAM), Double(2 * mib), accuracy: Double(mib) / 8,
                       "guest RAM on the host: \(inflated.guestRAM) bytes with 3 MiB ballooned, \(deflated.guestRAM) with 1 MiB")
        b = try balloon("squeezed")
        XCTAssertEqual(b["deflated_pages"] as? Int, 512, "\(b)")
        let list = try runHvctl(["device", "squeezed", "ls"])
        XCTAssertTrue(list.stdout.contains("balloon0  balloon"), list.stdout)
        XCTAssertFalse(vm.stderr.contains("refused"), vm.stderr)

        // A snapshot carries the balloon (its size, what the driver holds, the counters), and the
        // restored guest's driver carries on with it.
        let snapshot = dir.appendingPathComponent("snap").path
        let saved = try runHvctl(["snapshot", "squeezed", snapshot, "--stop"])
        XCTAssertEqual(saved.status, 0, saved.stderr)
        vm.terminateAndWait()
        let restored = try VMProcess(["run", "--restore", snapshot, "--name", "unsqueezed"])
        defer { restored.terminateAndWait() }
        // The restored guest carries on where it was: answering the device's statistics requests.
        XCTAssertTrue(restored.waitForOutput("balloon: stats sent"), restored.stdout + restored.stderr)
        b = try balloon("unsqueezed")
        XCTAssertEqual([b["target_mib"] as? Int, b["actual_mib"] as? Int, b["inflated_pages"] as? Int, b["deflated_pages"] as? Int], [1, 1, 768, 512], "\(b)")
        let emptied = try runHvctl(["balloon", "unsqueezed", "0", "--wait"])
        XCTAssertEqual(emptied.status, 0, emptied.stderr)
        XCTAssertTrue(restored.waitForOutput("balloon: deflated, holds 0 pages, returned pages read zero=1"), restored.stdout)
    }

    /// A balloon larger than the guest, a VM without one, and bad flags or keys: one line each.
    func testBadBalloonRequestsAreRefusedWithOneLine() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--name", "plain", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M"])
        defer { vm.terminateAndWait() }
        XCTAssertTrue(vm.waitForOutput("hv-testguest: mode=idle"), vm.stdout + vm.stderr)
        let none = try runHvctl(["balloon", "plain", "8M"])
        XCTAssertEqual(none.status, 1, none.stderr)
        XCTAssertEqual(none.stderr, "hvctl: plain has no balloon device: start it with --balloon on (or \"balloon\" in its definition)\n")

        let ballooned = try VMProcess(["run", "--name", "small", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--balloon", "on"])
        defer { ballooned.terminateAndWait() }
        XCTAssertTrue(ballooned.waitForOutput("hv-testguest: mode=idle"), ballooned.stdout + ballooned.stderr)
        let big = try runHvctl(["balloon", "small", "64M"])
        XCTAssertEqual(big.stderr, "hvctl: the balloon size 64 MiB is more than the guest's 32 MiB of RAM\n")
        let odd = try runHvctl(["balloon", "small", "1500K"])
        XCTAssertEqual(odd.status, 2, odd.stderr)
        XCTAssertTrue(odd.stderr.hasPrefix("hvctl: invalid size '1500K': give whole MiB, such as 64M"), odd.stderr)
        XCTAssertEqual(odd.stderr.split(separator: "\n").count, 1, odd.stderr)
        // No driver runs in mode=idle: the request is taken, and --wait says why it never completes.
        let asked = try runHvctl(["balloon", "small", "4M"])
        XCTAssertEqual(asked.status, 0, asked.stderr)
        XCTAssertEqual(asked.stdout, "balloon of small: asked for 4 MiB (it holds 0 MiB now); no driver in the guest runs the balloon yet\n")

        for (flags, message) in [
            (["--balloon", "size=lots"], "hvctl: invalid --balloon size 'lots'"),
            (["--balloon", "size=64M", "--memory", "32M"], "hvctl: --balloon size 64 MiB is more than the guest's 32 MiB of RAM"),
            (["--balloon", "stats=-1"], "hvctl: --balloon stats '-1' must be 0 (never) to 86400 seconds"),
            (["--balloon", "inflate"], "hvctl: invalid --balloon 'inflate': use --balloon on or --balloon size=SIZE"),
        ] {
            let r = try runHvctl(["run", "--multiboot", guest] + flags)
            XCTAssertEqual(r.status, 2, "\(flags): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix(message), "\(flags): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        let config = dir.appendingPathComponent("vm.json").path
        try #"{"memory_mib": 32, "balloon": {"size_mib": 33}}"#.write(toFile: config, atomically: true, encoding: .utf8)
        let tooBig = try runHvctl(["run", "--config", config])
        XCTAssertEqual(tooBig.status, 2, tooBig.stderr)
        XCTAssertEqual(tooBig.stderr, "hvctl: balloon.size_mib 33 MiB is more than the guest's 32 MiB of RAM\n")
        try #"{"balloon": {"size": 4}}"#.write(toFile: config, atomically: true, encoding: .utf8)
        let unknown = try runHvctl(["run", "--config", config])
        XCTAssertEqual(unknown.status, 2, unknown.stderr)
        XCTAssertTrue(unknown.stderr.hasPrefix("hvctl: "), unknown.stderr)
        XCTAssertTrue(unknown.stderr.contains("size"), unknown.stderr)
    }
}

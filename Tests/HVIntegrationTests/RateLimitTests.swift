import Foundation
import XCTest

/// Disk and NIC rate limits (Firecracker's token buckets, in the device processes): the guest
/// gets the configured rate (±15 %) and not more, waits instead of failing, and a limit changed
/// while the VM runs takes effect.
final class RateLimitTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-rates-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", dir.appendingPathComponent("run").path, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func disk(_ mib: Int) throws -> String {
        let path = dir.appendingPathComponent("disk-\(UUID().uuidString.prefix(8)).img").path
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: nil))
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.truncate(atOffset: UInt64(mib) << 20)
        try handle.close()
        return path
    }

    /// Seconds from `start` appearing in the VM's output to `end`.
    private func phase(_ vm: VMProcess, _ start: String, _ end: String, timeout: TimeInterval = 60) -> TimeInterval? {
        guard vm.waitForOutput(start, timeout: timeout) else { return nil }
        let began = Date()
        guard vm.waitForOutput(end, timeout: timeout) else { return nil }
        return Date().timeIntervalSince(began)
    }

    private func assertWithin(_ seconds: TimeInterval?, expected: TimeInterval, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        guard let seconds else { return XCTFail("\(what) did not finish", file: file, line: line) }
        XCTAssertGreaterThanOrEqual(seconds, expected * 0.85, "\(what) went faster than its limit: \(seconds) s, expected \(expected) s", file: file, line: line)
        XCTAssertLessThanOrEqual(seconds, expected * 1.15 + 0.1, "\(what) was slower than its limit allows: \(seconds) s, expected \(expected) s", file: file, line: line)
    }

    /// Bytes the disk's device process has read so far (/proc/PID/io `rchar`): what it took
    /// from the image for the guest, counted by the host, whatever the guest's own pace.
    private func bytesRead(_ vm: VMProcess) -> (pid: pid_t, bytes: Double)? {
        guard let pid = vm.children(named: "hv-scsi").first,
              let text = try? String(contentsOfFile: "/proc/\(pid)/io", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("rchar: ") }),
              let bytes = Double(line.dropFirst(7)) else { return nil }
        return (pid, bytes)
    }

    /// The read rate of the disk's device once the bucket's first `burst` bytes are spent,
    /// measured over `seconds`.
    private func readRate(_ vm: VMProcess, after burst: Double, over seconds: TimeInterval) -> Double? {
        let deadline = Date().addingTimeInterval(30)
        var start = bytesRead(vm)
        while let s = start, s.bytes < burst, Date() < deadline {
            Thread.sleep(forTimeInterval: 0.05)
            start = bytesRead(vm)
        }
        guard let first = start, first.bytes >= burst else { return nil }
        let began = Date()
        Thread.sleep(forTimeInterval: seconds)
        guard let last = bytesRead(vm), last.pid == first.pid else { return nil }
        return (last.bytes - first.bytes) / Date().timeIntervalSince(began)
    }

    private func assertRate(_ rate: Double?, _ expected: Double, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        guard let rate else { return XCTFail("\(what): the disk's device could not be measured", file: file, line: line) }
        XCTAssertEqual(rate, expected, accuracy: expected * 0.15, "\(what): \(rate / 1_048_576) MiB/s", file: file, line: line)
    }

    /// A disk limited to 4 MiB/s reads at that rate (the guest reads as fast as it can); raised
    /// to 8 MiB/s while the VM runs, it reads at 8; limited to 10 requests a second of 256 KiB,
    /// at 2.5 MiB/s. The guest sees no error.
    func testADiskGetsItsRateAndNoMoreAndTheRateChangesWhileItRuns() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--name", "metered", "--multiboot", guest, "--cmdline", "mode=vscsibench mib=64", "--memory", "64M",
                                "--disk", "\(try disk(128)),bps=4M"])
        defer { _ = try? runHvctl(["stop", "metered"]); vm.waitForExit() }
        XCTAssertTrue(vm.waitForOutput("bench: seqread start"), vm.stdout + vm.stderr)
        let status = try runHvctl(["status", "metered"])
        XCTAssertTrue(status.stdout.contains("limit 4194304 bytes/1000 ms"), status.stdout)
        let mib = 1_048_576.0
        assertRate(readRate(vm, after: 5 * mib, over: 2), 4 * mib, "limited to 4 MiB/s")
        let device = vm.children(named: "hv-scsi").first
        let raised = try runHvctl(["set", "metered", "--rate", "disk0:bps=8M"])
        XCTAssertEqual(raised.status, 0, raised.stderr)
        XCTAssertEqual(raised.stdout, "disk0 rate limit: 8388608 bytes per 1000 ms\n")
        // In place (RECONFIGURE): the same process, its bucket's debt carried over, not refilled.
        XCTAssertEqual(vm.children(named: "hv-scsi").first, device, "the disk's process was restarted for a new rate")
        assertRate(readRate(vm, after: 0, over: 1.5), 8 * mib, "raised to 8 MiB/s")
        let ops = try runHvctl(["set", "metered", "--rate", "disk0:bps=0,iops=10"])
        XCTAssertEqual(ops.status, 0, ops.stderr)
        XCTAssertEqual(ops.stdout, "disk0 rate limit: 10 ops per 1000 ms\n")
        assertRate(readRate(vm, after: 11 * 262_144, over: 2), 10 * 262_144, "10 requests of 256 KiB a second")
        let after = try runHvctl(["status", "metered"])
        XCTAssertTrue(after.stdout.contains("limit 10 ops/1000 ms") && !after.stdout.contains("bytes/1000 ms"), after.stdout)
        XCTAssertFalse(vm.stderr.contains("refused"), vm.stderr)
        let wrong = try runHvctl(["set", "metered", "--rate", "disk7:bps=1M"])
        XCTAssertEqual(wrong.status, 2, wrong.stderr)
        XCTAssertTrue(wrong.stderr.hasPrefix("hvctl: invalid --rate 'disk7:bps=1M': metered has no disk or NIC 'disk7' (its disks and NICs: disk0)"), wrong.stderr)
        let bad = try runHvctl(["set", "metered", "--rate", "disk0:tx_bps=1M"])
        XCTAssertTrue(bad.stderr.hasPrefix("hvctl: invalid --rate 'disk0:tx_bps=1M': a disk takes bps=RATE and iops=N"), bad.stderr)
    }

    /// tx_pps=200 on the sender: 600 datagrams, 200 from the full bucket, reach the sink over 2 s,
    /// every one of them (the guest waited, nothing was dropped). The bucket's first burst stays
    /// below the 256 slots of the sink's port: a larger one can overflow it while a loaded host
    /// has not yet scheduled the sink, and the switch then drops, as a switch does.
    func testANICSendsAtItsFrameRateAndLosesNothing() throws {
        let guest = try Harness.testGuest()
        let segment = "rate\(getpid())"
        let sink = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=netsink ip=10.9.0.2 port=7000", "--memory", "32M",
                                  "--nic", "net=\(segment),mac=52:54:00:00:0c:02"])
        defer { sink.process.terminate(); sink.waitForExit() }
        XCTAssertTrue(sink.waitForOutput("net: nic0 mac"), sink.stdout + sink.stderr)
        let sender = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=netblast ip=10.9.0.1 peer=10.9.0.2 count=600 size=100 port=7000",
                                    "--memory", "32M", "--nic", "net=\(segment),mac=52:54:00:00:0c:01,tx_pps=200"])
        defer { sender.process.terminate(); sender.waitForExit() }
        assertWithin(phase(sink, "bench: net rx start", "bench: net rx end"), expected: 2.0, "600 frames at 200 a second")
        // The end marker may arrive before the rest of its line: wait for the count itself.
        XCTAssertTrue(sink.waitForOutput("bench: net rx end received=600 ", timeout: 10), sink.stdout + sender.stdout)
        XCTAssertFalse(sender.stdout.contains("stalled"), sender.stdout)
    }

    func testBadRateLimitsAreRefusedWithOneLine() throws {
        let guest = try Harness.testGuest()
        for (flags, message) in [
            (["--disk", "/dev/null,bps=fast"], "hvctl: invalid --disk bps '"),
            (["--disk", "/dev/null,iops=-1"], "hvctl: invalid --disk iops '-1'"),
            (["--nic", "net=x,rx_bps=1Q"], "hvctl: invalid --nic rx_bps '1Q'"),
            (["--nic", "net=x,tx_pps=many"], "hvctl: invalid --nic tx_pps 'many'"),
        ] {
            let r = try runHvctl(["run", "--multiboot", guest] + flags)
            XCTAssertEqual(r.status, 2, "\(flags): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix(message), "\(flags): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        let config = dir.appendingPathComponent("vm.json").path
        try #"{"disks": [{"path": "/dev/null", "rate_limit": {"bandwidth": {"size": 0, "refill_time_ms": 1000}}}]}"#.write(toFile: config, atomically: true, encoding: .utf8)
        let zero = try runHvctl(["run", "--config", config])
        XCTAssertEqual(zero.status, 2, zero.stderr)
        XCTAssertTrue(zero.stderr.hasPrefix("hvctl: VM definition '\(config)': invalid disks[0].rate_limit.bandwidth: size is 1 to 2^50 tokens"), zero.stderr)
    }
}

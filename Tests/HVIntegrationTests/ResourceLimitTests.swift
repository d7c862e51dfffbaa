import Foundation
import XCTest

/// Each VM runs in cgroups of its own (this host's v1 hierarchies: cpu, memory, pids): the limits
/// hold, change at run time, a device over its memory limit is OOM-killed alone and restarted, and
/// no group is left behind however hvctl ends.
final class ResourceLimitTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        // This machine and CI have the v1 layout (cpu, memory, pids hierarchies); the v2 side is
        // checked over its files in ResourceGroupsTests.
        guard getuid() == 0, ["cpu", "memory", "pids"].allSatisfy({ FileManager.default.fileExists(atPath: "/sys/fs/cgroup/\($0)/cgroup.procs") }) else {
            throw XCTSkip("needs root and the cgroup v1 cpu, memory and pids hierarchies")
        }
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-limits-\(getpid())")
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

    private func cgroups(_ name: String) throws -> [String] {
        let resources = try XCTUnwrap(try status(name)["resources"] as? [String: Any], "no resources in the status")
        return try XCTUnwrap(resources["cgroups"] as? [String])
    }

    private func read(_ path: String) -> String {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// utime + stime of a process, in seconds (every thread: the vCPUs are hvctl's threads).
    private func cpuSeconds(_ pid: pid_t) -> Double {
        let text = read("/proc/\(pid)/stat")
        guard let close = text.lastIndex(of: ")") else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    private func waitUntilGone(_ paths: [String], seconds: Double = 10) -> [String] {
        let deadline = Date().addingTimeInterval(seconds)
        var left = paths
        while !left.isEmpty && Date() < deadline {
            left = left.filter { FileManager.default.fileExists(atPath: $0) }
            if !left.isEmpty { Thread.sleep(forTimeInterval: 0.05) }
        }
        return left
    }

    /// A VM spinning in its guest at --cpu-quota 0.2 gets about 20 % of a CPU (never much more),
    /// a second VM stays responsive meanwhile, and `hvctl set` raises the quota at run time.
    func testACPUQuotaHoldsChangesAtRunTimeAndANeighbourStaysResponsive() throws {
        let guest = try Harness.testGuest()
        let spinner = try VMProcess(["run", "--name", "spinner", "--multiboot", guest, "--cmdline", "mode=spin", "--memory", "32M",
                                     "--serial", "none", "--cpu-quota", "0.2"])
        let neighbour = try VMProcess(["run", "--name", "neighbour", "--multiboot", guest, "--cmdline", "mode=echo", "--memory", "32M"])
        defer {
            _ = try? runHvctl(["stop", "spinner"])
            neighbour.write(".")
            spinner.waitForExit()
            neighbour.waitForExit()
        }
        XCTAssertTrue(neighbour.waitForOutput("echo: ready"), neighbour.stderr)
        let groups = try cgroups("spinner")
        let cpuGroup = try XCTUnwrap(groups.first { $0.hasPrefix("/sys/fs/cgroup/cpu/") || $0.contains("/cpu,") }, "\(groups)")
        XCTAssertEqual(read(cpuGroup + "/cpu.cfs_quota_us"), "20000")
        let pid = spinner.process.processIdentifier
        func share(over seconds: Double) -> Double {
            let before = cpuSeconds(pid), start = Date()
            Thread.sleep(forTimeInterval: seconds)
            return (cpuSeconds(pid) - before) / Date().timeIntervalSince(start)
        }
        Thread.sleep(forTimeInterval: 1)  // past the guest's start
        let limited = share(over: 3)
        XCTAssertLessThanOrEqual(limited, 0.2 * 1.15 + 0.02, "the quota of 0.2 CPUs did not hold: \(limited)")
        XCTAssertGreaterThan(limited, 0.05, "the spinning guest got no CPU at all: \(limited)")
        XCTAssertNotEqual(read(cpuGroup + "/cpu.stat").split(separator: "\n").first { $0.hasPrefix("nr_throttled ") }, "nr_throttled 0")
        // The neighbour answers a keystroke within a second while the spinner runs.
        let asked = Date()
        neighbour.write("q")
        XCTAssertTrue(neighbour.waitForOutput("Q", timeout: 5), neighbour.stdout)
        XCTAssertLessThan(Date().timeIntervalSince(asked), 1.0)
        // Raised while it runs.
        let set = try runHvctl(["set", "spinner", "--cpu-quota", "0.6"])
        XCTAssertEqual(set.status, 0, set.stderr)
        XCTAssertTrue(set.stdout.hasPrefix("limits of spinner set: cpu quota 0.6 CPUs"), set.stdout)
        XCTAssertEqual(read(cpuGroup + "/cpu.cfs_quota_us"), "60000")
        let raised = share(over: 3)
        XCTAssertLessThanOrEqual(raised, 0.6 * 1.15 + 0.02, "\(raised)")
        XCTAssertGreaterThan(raised, 0.2 * 1.15 + 0.02, "raising the quota to 0.6 CPUs changed nothing: \(raised)")
        let limits = try XCTUnwrap((try status("spinner")["resources"] as? [String: Any])?["limits"] as? [String: Any])
        XCTAssertEqual(limits["cpu_quota"] as? Double, 0.6)
    }

    /// A device that allocates past its own cap (--device-memory-limit), or past the VM's limit
    /// (--memory-limit), is OOM-killed (and named as such), never the core, and restarted; the VM
    /// finishes its work.
    func testADeviceOverAMemoryLimitIsKilledAloneAndRestarted() throws {
        let guest = try Harness.testGuest()
        let rogue = Harness.productsDirectory.appendingPathComponent("hv-rogue-device").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        for limit in [["--device-memory-limit", "48M"], ["--memory-limit", "96M"]] {
            let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=probe port=1312 count=2", "--memory", "32M"] + limit
                                 + ["--device", "\(rogue),profile=\(profile),pio=0x520:2,attack=memory"])
            XCTAssertEqual(r.status, 0, "\(limit): \(r.stderr)")
            XCTAssertFalse(r.stderr.contains("SUCCEEDED"), r.stderr)
            XCTAssertTrue(r.stderr.contains("device device0 (pid ") && r.stderr.contains("was killed by the OOM killer: its own or its VM's memory limit was reached"),
                          "\(limit): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("device0 restarted"), r.stderr)
            XCTAssertEqual(r.stdout.components(separatedBy: "probe: port=0x520 value=0x42").count - 1, 2, r.stdout)
            XCTAssertTrue(r.stdout.hasSuffix("hv-testguest: done\n"), r.stdout)
        }
        XCTAssertEqual(waitUntilGone(vmGroupsHere()), [], "a VM with a crashing device left cgroups behind")
    }

    /// Every `hv-…` group below this process's own groups (where hvctl puts VMs by default).
    private func vmGroupsHere() -> [String] {
        read("/proc/self/cgroup").split(separator: "\n").flatMap { line -> [String] in
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
            guard fields.count == 3, ["cpu", "memory", "pids"].contains(fields[1]) else { return [] }
            let parent = "/sys/fs/cgroup/\(fields[1])\(fields[2] == "/" ? "" : fields[2])"
            return ((try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []).filter { $0.hasPrefix("hv-") }.map { parent + "/" + $0 }
        }
    }

    /// --pids-limit is the VM's: one vCPU thread too many is refused, and the error says which limit.
    func testThePidsLimitHolds() throws {
        let guest = try Harness.testGuest()
        let tooMany = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=hello", "--memory", "32M", "--serial", "none",
                                    "--cpus", "12", "--pids-limit", "16"])
        XCTAssertEqual(tooMany.status, 1, tooMany.stderr)
        XCTAssertTrue(tooMany.stderr.hasSuffix("(the VM reached its pids limit of 16; raise --pids-limit)\n"), tooMany.stderr)
        XCTAssertEqual(tooMany.stderr.split(separator: "\n").count, 1, tooMany.stderr)
        let enough = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=hello", "--memory", "32M", "--cpus", "2", "--pids-limit", "32"])
        XCTAssertEqual(enough.status, 0, enough.stderr)
    }

    /// The VM's groups (default limits) are there while it runs and gone after a normal stop and
    /// after `kill -9` of hvctl; the reaper goes too.
    func testNoCgroupIsLeftBehindHoweverTheVMEnds() throws {
        let guest = try Harness.testGuest()
        for ending in ["stop", "kill -9"] {
            let vm = try VMProcess(["run", "--name", "reaped", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--serial", "none"])
            XCTAssertTrue(waitForStatus("reaped"), vm.stderr)
            let groups = try cgroups("reaped")
            XCTAssertEqual(groups.count, 3, "cpu, memory and pids hierarchies here: \(groups)")
            for group in groups {
                XCTAssertTrue(FileManager.default.fileExists(atPath: group + "/core"), group)
                XCTAssertEqual(read(group + "/core/cgroup.procs").split(separator: "\n").first.map(String.init), "\(vm.process.processIdentifier)")
                XCTAssertTrue(FileManager.default.fileExists(atPath: group + "/serial0"), group)
            }
            let memory = try XCTUnwrap(groups.first { $0.contains("/memory/") })
            XCTAssertEqual(read(memory + "/memory.limit_in_bytes"), "\((32 + 256) << 20)", "default: guest RAM + 256 MiB")
            XCTAssertGreaterThan(UInt64(read(memory + "/serial0/memory.limit_in_bytes")) ?? 0, UInt64(1) << 40, "no cap of a device's own by default")
            let serial = try XCTUnwrap(vm.children(named: "hv-serial").first)
            XCTAssertEqual(read("/proc/\(serial)/oom_score_adj"), "500")
            // hvctl moves itself while it has one thread and a device joins its groups itself
            // before it runs (neither by pid, which waits out an RCU grace period): every thread
            // of either, those made afterwards included, is in its group in every hierarchy.
            for (pid, member) in [(vm.process.processIdentifier, "core"), (serial, "serial0")] {
                let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")
                XCTAssertGreaterThan(tasks.count, member == "core" ? 2 : 0, "\(pid) \(tasks)")
                for task in tasks {
                    let lines = read("/proc/\(pid)/task/\(task)/cgroup").split(separator: "\n").map { $0.split(separator: ":", maxSplits: 2).map(String.init) }
                    for group in groups {
                        let hierarchy = group.hasPrefix("/sys/fs/cgroup/cpu") ? "cpu" : group.hasPrefix("/sys/fs/cgroup/memory") ? "memory" : "pids"
                        let line = lines.first { $0.count == 3 && $0[1].split(separator: ",").contains(Substring(hierarchy)) }
                        XCTAssertEqual(line.map { $0[2].hasSuffix("/" + URL(fileURLWithPath: group).lastPathComponent + "/" + member) }, true,
                                       "thread \(task) of \(pid) (\(read("/proc/\(pid)/task/\(task)/comm"))) is not in \(group)/\(member): \(lines)")
                    }
                }
            }
            if ending == "stop" {
                XCTAssertEqual(try runHvctl(["stop", "reaped"]).status, 0)
            } else {
                kill(vm.process.processIdentifier, SIGKILL)
            }
            vm.waitForExit()
            XCTAssertEqual(waitUntilGone(groups), [], "\(ending) left cgroups behind")
            XCTAssertTrue(Self.processes(named: "hv-cgroup-reaper").filter { read("/proc/\($0)/cmdline").contains("hv-reaped-") }.isEmpty,
                          "the reaper outlived its groups")
        }
    }

    /// hvctl lends the reaper the VM's KVM descriptor on its way out, so that KVM's teardown of
    /// the VM happens after hvctl's exit, not in it. The reaper must hold what it is lent until
    /// hvctl has wholly gone (closing it as soon as hvctl's socket closes would leave hvctl's own
    /// deferred close the last one), then close it, then remove the groups. Here Python plays
    /// hvctl, a FIFO's write end plays the VM, and a plain directory the group.
    func testTheReaperHoldsWhatHvctlLendsItUntilHvctlHasGone() throws {
        let group = dir.appendingPathComponent("hv-lent-group").path
        let fifo = dir.appendingPathComponent("lent.fifo").path
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)
        XCTAssertEqual(mkfifo(fifo, 0o600), 0)
        let watch = open(fifo, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(watch, 0)
        defer { close(watch) }
        let hvctl = Process()
        hvctl.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        hvctl.arguments = ["-c", """
            import os, socket, subprocess, sys, time
            reaper, group, fifo = sys.argv[1:4]
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            lent = os.open(fifo, os.O_WRONLY)
            subprocess.run([reaper, group], preexec_fn=lambda: os.dup2(theirs.fileno(), 3), pass_fds=(3,), check=True)
            theirs.close()
            socket.send_fds(ours, [b"kvm-vm"], [lent])
            os.close(lent)
            ours.close()
            print("lent", flush=True)
            time.sleep(0.5)
            """, Harness.productsDirectory.appendingPathComponent("hv-cgroup-reaper").path, group, fifo]
        let out = Pipe()
        hvctl.standardOutput = out
        try hvctl.run()
        var said = ""
        while !said.contains("\n") {
            let more = out.fileHandleForReading.availableData
            if more.isEmpty { break }
            said += String(decoding: more, as: UTF8.self)
        }
        XCTAssertEqual(said, "lent\n")
        // "hvctl" has closed its copy and its socket, but still runs: the reaper holds on.
        var fd = pollfd(fd: watch, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&fd, 1, 200), 0, "the reaper let go of the VM while hvctl still ran")
        hvctl.waitUntilExit()
        XCTAssertEqual(hvctl.terminationStatus, 0)
        XCTAssertEqual(poll(&fd, 1, 10_000), 1, "the reaper kept the VM after hvctl had gone")
        XCTAssertNotEqual(fd.revents & Int16(POLLHUP), 0)
        XCTAssertEqual(waitUntilGone([group]), [], "the reaper did not remove the group")
    }

    func testBadLimitsAreRefusedWithOneLine() throws {
        let guest = try Harness.testGuest()
        for (flags, message) in [
            (["--cpu-quota", "0"], "hvctl: invalid --cpu-quota '0.0': give CPUs from 0.01"),
            (["--cpu-weight", "0"], "hvctl: invalid --cpu-weight '0': give a weight from 1 to 10000"),
            (["--memory-limit", "100M"], "hvctl: --memory-limit 100 MiB is too small for 256 MiB of guest RAM: give at least 288 MiB"),
            (["--device-memory-limit", "1M"], "hvctl: --device-memory-limit 1 MiB is too small"),
            (["--memory-limit", "1.5G"], "hvctl: invalid --memory-limit '1.5G': use a size like 256M or 2G"),
            (["--pids-limit", "3"], "hvctl: invalid --pids-limit '3': give from 16"),
            (["--cgroup-parent", "/no-such-parent", "--pids-limit", "64"], "hvctl: the cgroup parent /sys/fs/cgroup/"),
            (["--cgroup-parent", "relative"], "hvctl: invalid --cgroup-parent 'relative'"),
            (["--cgroup-parent", "none", "--cpu-quota", "1"], "hvctl: --cgroup-parent none runs the VM without cgroups"),
        ] {
            let r = try runHvctl(["run", "--multiboot", guest] + flags)
            XCTAssertEqual(r.status, 2, "\(flags): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix(message), "\(flags): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        let vm = try VMProcess(["run", "--name", "limited", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--serial", "none"])
        defer { _ = try? runHvctl(["stop", "limited"]); vm.waitForExit() }
        XCTAssertTrue(waitForStatus("limited"), vm.stderr)
        let nothing = try runHvctl(["set", "limited"])
        XCTAssertEqual(nothing.status, 2)
        let tooSmall = try runHvctl(["set", "limited", "--memory-limit", "40M"])
        XCTAssertEqual(tooSmall.status, 1)
        XCTAssertEqual(tooSmall.stderr, "hvctl: --memory-limit 40 MiB is too small for 32 MiB of guest RAM: give at least 64 MiB (guest RAM + 32 MiB for the core and devices)\n")
        let unknown = try runHvctl(["set", "nosuchvm", "--pids-limit", "64"])
        XCTAssertTrue(unknown.stderr.hasPrefix("hvctl: no VM named 'nosuchvm'"), unknown.stderr)
        // Without cgroups, a VM runs, and says it has no limits.
        let free = try runHvctl(["run", "--cgroup-parent", "none", "--multiboot", guest, "--cmdline", "mode=hello", "--memory", "32M"])
        XCTAssertEqual(free.status, 0, free.stderr)
    }

    /// `--disk-io-limit read_bps=8M` on a disk whose image lies on this host's block device (its
    /// pages dropped from the page cache first): past the kernel's first burst, the disk's device
    /// process reads it from the device at 8 MiB/s (±20 %, its /proc/PID/io read_bytes) through
    /// v1's blkio throttle, set on its own group for that device; removed at run time, the rule goes.
    func testADiskIOLimitThrottlesTheBlockDeviceUnderTheImage() throws {
        guard FileManager.default.fileExists(atPath: "/sys/fs/cgroup/blkio/cgroup.procs") else { throw XCTSkip("needs the cgroup v1 blkio hierarchy") }
        let image = dir.appendingPathComponent("io.img").path
        let mib = 1 << 20
        do {
            XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
            let handle = try XCTUnwrap(FileHandle(forWritingAtPath: image))
            var chunk = [UInt8](repeating: 0, count: mib)
            for i in 0..<96 {
                for k in stride(from: 0, to: mib, by: 512) { chunk[k] = UInt8(truncatingIfNeeded: i &* 31 &+ k / 512) }
                try handle.write(contentsOf: Data(chunk))
            }
            try handle.synchronize()
            // Out of the page cache: the guest's reads must reach the device.
            XCTAssertEqual(posix_fadvise(handle.fileDescriptor, 0, 0, POSIX_FADV_DONTNEED), 0)
            try handle.close()
        }
        var st = stat()
        XCTAssertEqual(stat(image, &st), 0)
        guard st.st_dev >> 8 != 0 else { throw XCTSkip("\(dir.path) is on a file system without a block device") }
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--name", "throttled", "--multiboot", guest, "--cmdline", "mode=vscsibench count=96", "--memory", "32M",
                                "--disk", image, "--disk-io-limit", "read_bps=8M"])
        defer { _ = try? runHvctl(["stop", "throttled"]); vm.waitForExit() }
        XCTAssertTrue(vm.waitForOutput("bench: seqread start"), vm.stdout + vm.stderr)
        let disk = try XCTUnwrap(vm.children(named: "hv-scsi").first)
        func readBytes() -> Double {
            let text = (try? String(contentsOfFile: "/proc/\(disk)/io", encoding: .utf8)) ?? ""
            return Double(text.split(separator: "\n").first { $0.hasPrefix("read_bytes: ") }?.dropFirst(12) ?? "0") ?? 0
        }
        // The kernel lets a first burst through (about 14 MiB here, at once), then holds the rate,
        // letting reads through in steps (8 MiB about once a second, sometimes 4 MiB sooner). A
        // fixed window would see one, two or three steps by chance, so the rate is taken from one
        // step to one at least 3 s later (the image is 96 MiB: the burst and six steps fit in it);
        // each point is the step's time and the count once that step has settled.
        let deadline = Date().addingTimeInterval(20)
        while readBytes() < Double(20 * mib) && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        func nextStep(after earliest: Date) -> (bytes: Double, time: Date)? {
            var before = readBytes()
            while Date() < deadline {
                Thread.sleep(forTimeInterval: 0.005)
                let now = readBytes()
                defer { before = now }
                guard now != before, Date() >= earliest else { continue }
                let time = Date()
                Thread.sleep(forTimeInterval: 0.2)
                return (readBytes(), time)
            }
            return nil
        }
        // The first change may still be the burst's tail: the rate is measured from the step after it.
        let settling = try XCTUnwrap(nextStep(after: Date()), "the device process read nothing past the burst")
        let first = try XCTUnwrap(nextStep(after: settling.time.addingTimeInterval(0.5)), "the device process stopped reading")
        let last = try XCTUnwrap(nextStep(after: first.time.addingTimeInterval(3)), "the device process stopped reading")
        let rate = (last.bytes - first.bytes) / last.time.timeIntervalSince(first.time)
        XCTAssertEqual(rate, Double(8 * mib), accuracy: Double(8 * mib) * 0.2, "read from the device at \(rate / Double(mib)) MiB/s")
        let group = try XCTUnwrap(try cgroups("throttled").first { $0.hasPrefix("/sys/fs/cgroup/blkio/") }, "no blkio group")
        let rule = read(group + "/disk0/blkio.throttle.read_bps_device")
        XCTAssertTrue(rule.hasSuffix(" 8388608") && rule.contains(":"), rule)
        let status = try runHvctl(["status", "throttled"])
        XCTAssertTrue(status.stdout.contains("disk I/O read 8388608 bytes/s"), status.stdout)
        let removed = try runHvctl(["set", "throttled", "--disk-io-limit", "read_bps=0"])
        XCTAssertEqual(removed.status, 0, removed.stderr)
        XCTAssertEqual(read(group + "/disk0/blkio.throttle.read_bps_device"), "", "the rule is gone")

        // A VM started without disk I/O limits has no I/O groups to change.
        let plain = try VMProcess(["run", "--name", "unthrottled", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--serial", "none"])
        defer { _ = try? runHvctl(["stop", "unthrottled"]); plain.waitForExit() }
        XCTAssertTrue(waitForStatus("unthrottled"), plain.stderr)
        XCTAssertFalse(try cgroups("unthrottled").contains { $0.hasPrefix("/sys/fs/cgroup/blkio/") }, "a VM without I/O limits pays no blkio move")
        let late = try runHvctl(["set", "unthrottled", "--disk-io-limit", "read_bps=1M"])
        XCTAssertEqual(late.status, 1)
        XCTAssertTrue(late.stderr.hasPrefix("hvctl: unthrottled was started without disk I/O limits"), late.stderr)
        let bad = try runHvctl(["run", "--multiboot", guest, "--disk-io-limit", "read_bps=fast"])
        XCTAssertEqual(bad.status, 2)
        XCTAssertTrue(bad.stderr.hasPrefix("hvctl: invalid --disk-io-limit read_bps 'fast'"), bad.stderr)
    }

    private func waitForStatus(_ name: String, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let r = try? runHvctl(["status", name, "--json"]), r.status == 0, r.stdout.contains("\"resources\"") { return true }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return false
    }

    private static func processes(named name: String) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }.filter { pid in
            ((try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? "").contains(name)
        }
    }
}

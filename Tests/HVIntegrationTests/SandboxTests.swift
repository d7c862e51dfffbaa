import Foundation
import XCTest

/// The sandbox holds: every device is jailed by default, a hostile device is stopped and named
/// without harming the VM, and tenants are kept apart.
final class SandboxTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    private static func status(_ pid: pid_t) -> [String: String] {
        let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    /// Field 5 of /proc/PID/stat (after the parenthesised command name).
    private static func processGroup(_ pid: pid_t) -> pid_t? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        return fields.count > 2 ? pid_t(fields[2]) : nil
    }

    /// A device's stderr reaches the operator only through the core: prefixed with its name, with
    /// control characters replaced, and throttled; it cannot forge a line of hvctl's.
    func testADevicesStderrIsPrefixedCleanedAndThrottled() throws {
        let r = try runRogue("stderr")
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertFalse(lines.contains { $0.hasPrefix("hvctl: stopped") }, "a forged hvctl line got through: \(r.stderr)")
        XCTAssertTrue(lines.contains("hv: device device0: hvctl: stopped by 'hvctl stop vm' (forged)"), r.stderr)
        XCTAssertFalse(r.stderr.contains("\u{1B}"), "an escape sequence reached the terminal")
        XCTAssertTrue(lines.contains("hv: device device0: ?[2Jrogue: screen cleared"), r.stderr)
        let flood = lines.filter { $0.hasPrefix("hv: device device0: rogue: flood line") }.count
        XCTAssertGreaterThan(flood, 0, r.stderr)
        XCTAssertLessThanOrEqual(flood, 20, "throttled to a burst of 20 lines: \(flood) flood lines")
        XCTAssertTrue(r.stderr.contains("rogue: attack stderr refused: wrote"), r.stderr)
    }

    /// Issue 13: a guest access that crashes its device on every replay (a poison request) does
    /// not take the device down for good: after three crashes on it, the successor skips that one
    /// access (a write is dropped), says so in one line, and serves the next ones.
    func testAPoisonRequestIsSkippedAndTheDeviceCarriesOn() throws {
        let guest = try Harness.testGuest()
        let rogue = Harness.productsDirectory.appendingPathComponent("hv-rogue-device").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=probe port=1312 count=3 poke=173",
                              "--device", "\(rogue),profile=\(profile),pio=0x520:2,attack=poison"], timeout: 60)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stderr.components(separatedBy: "killed by signal 11").count - 1, 3, r.stderr)
        XCTAssertTrue(r.stderr.contains("device device0 crashed 3 times in a row serving a write of 0xad at offset 0x1 of resource 0; its successor skips it (the write is dropped) and carries on"), r.stderr)
        XCTAssertFalse(r.stderr.contains("giving up"), r.stderr)
        // The device is still serving: every read after the poisoned write is answered.
        XCTAssertEqual(r.stdout.components(separatedBy: "probe: port=0x520 value=0x42").count - 1, 3, r.stdout)
        XCTAssertTrue(r.stdout.hasSuffix("hv-testguest: done\n"), r.stdout)
    }

    private static func namespace(_ pid: pid_t, _ kind: String) -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/\(kind)")) ?? "?"
    }

    func testEveryDeviceIsJailedByDefault() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=echo"])
        XCTAssertTrue(vm.waitForOutput("echo: ready"), vm.stdout + vm.stderr)
        let devices = vm.children(named: "hv-")
        XCTAssertEqual(devices.count, 2, "hv-serial and hv-bios")
        for pid in devices {
            let s = Self.status(pid)
            let uid = Int(s["Uid"]?.split(separator: "\t").first ?? "") ?? 0
            XCTAssertGreaterThanOrEqual(uid, 2_000_000, "device \(pid) runs as a tenant uid: \(s["Uid"] ?? "?")")
            for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                XCTAssertEqual(s[cap], "0000000000000000", "\(cap) of device \(pid)")
            }
            XCTAssertEqual(s["NoNewPrivs"], "1")
            XCTAssertEqual(s["Seccomp"], "2", "seccomp filter mode")
            XCTAssertEqual(s["NSpid"]?.split(separator: "\t").last, "1", "pid 1 of its own pid namespace")
            for kind in ["user", "pid", "mnt", "net", "ipc", "uts"] {
                XCTAssertNotEqual(Self.namespace(pid, kind), Self.namespace(getpid(), kind), "\(kind) namespace of device \(pid)")
            }
            let limits = (try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)) ?? ""
            XCTAssertTrue(limits.contains { _ in true } && limits.split(separator: "\n").contains { $0.hasPrefix("Max core file size") && $0.contains(" 0 ") })
            // The profile's nofile (base-device: 32), soft and hard alike.
            XCTAssertTrue(limits.split(separator: "\n").contains { $0.hasPrefix("Max open files") && $0.split(separator: " ").filter { !$0.isEmpty }.dropFirst(3).prefix(2) == ["32", "32"] }, limits)
            // Its root holds no host files beyond the read-only library binds, and is read-only itself.
            XCTAssertFalse(FileManager.default.fileExists(atPath: "/proc/\(pid)/root/etc/passwd"))
            XCTAssertFalse(FileManager.default.fileExists(atPath: "/proc/\(pid)/root/home"))
            let mounts = (try? String(contentsOfFile: "/proc/\(pid)/mountinfo", encoding: .utf8)) ?? ""
            let root = mounts.split(separator: "\n").map { $0.split(separator: " ") }.first { $0.count > 5 && $0[4] == "/" }
            XCTAssertEqual(root.map { $0[5].split(separator: ",").contains("ro") }, true, "the device's root is not read-only: \(mounts)")
            for line in mounts.split(separator: "\n") {
                XCTAssertTrue(line.split(separator: " ")[5].split(separator: ",").contains("ro"), "a mount in the device's root is writable: \(line)")
            }
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
            XCTAssertLessThanOrEqual(fds.count, 12, "only handed-over descriptors: \(fds)")
            // Its own process group (a terminal's Ctrl-C reaches hvctl only), and a stderr that is
            // a pipe to the core, never hvctl's own stderr.
            XCTAssertEqual(Self.processGroup(pid), pid, "device \(pid) leads a process group of its own")
            XCTAssertNotEqual(Self.processGroup(pid), Self.processGroup(vm.process.processIdentifier))
            let stderrTarget = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/2")) ?? "?"
            let hvctlStderr = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vm.process.processIdentifier)/fd/2")) ?? "?"
            XCTAssertTrue(stderrTarget.hasPrefix("pipe:"), stderrTarget)
            XCTAssertNotEqual(stderrTarget, hvctlStderr, "a device must not hold hvctl's stderr")
        }
        vm.write(".")
        XCTAssertEqual(vm.waitForExit(), 0, vm.stderr)
    }

    private func runRogue(_ attack: String, extra: String = "") throws -> (status: Int32, stdout: String, stderr: String) {
        let guest = try Harness.testGuest()
        let rogue = Harness.productsDirectory.appendingPathComponent("hv-rogue-device").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        return try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=probe port=1312 count=2",
                             "--device", "\(rogue),profile=\(profile),pio=0x520:2,attack=\(attack)\(extra)"])
    }

    func testHostileDeviceIsStoppedNamedAndRestartedWhileTheVMRuns() throws {
        let expected = ["open": "openat", "socket": "socket", "execve": "execve", "kill": "kill",
                        "rlimit": "prlimit64", "mount": "mount", "mmap-exec": "mmap", "fork": "clone"]
        for (attack, syscall) in expected.sorted(by: { $0.key < $1.key }) {
            let r = try runRogue(attack)
            XCTAssertEqual(r.status, 0, "\(attack): the VM must survive: \(r.stderr)")
            XCTAssertFalse(r.stderr.contains("SUCCEEDED"), "\(attack) got through the sandbox: \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("was stopped by its sandbox: system call") && r.stderr.contains("(\(syscall)) is not allowed"),
                          "\(attack): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("device0 restarted"), "\(attack): \(r.stderr)")
            // The read in flight when the device died was replayed to its successor.
            XCTAssertEqual(r.stdout.components(separatedBy: "probe: port=0x520 value=0x42").count - 1, 2, "\(attack): \(r.stdout)")
            XCTAssertTrue(r.stdout.hasSuffix("hv-testguest: done\n"), "\(attack): \(r.stdout)")
        }
    }

    /// ADD_DOORBELL and SET_MSI_ROUTE from a hostile device: only its own registers, only with `msi`.
    func testHostileDeviceGetsNoDoorbellOrInterruptRouteItDoesNotOwn() throws {
        let r = try runRogue("doorbell")
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("rogue: attack doorbell refused: foreign false, past end false, any-width port false, msi false; its own register true"), r.stderr)
        XCTAssertTrue(r.stderr.contains("doorbell refused: offset 0x2 (+1) is past the end of resource 0"), r.stderr)
        XCTAssertTrue(r.stderr.contains("doorbell refused: a port doorbell needs a width"), r.stderr)
        XCTAssertTrue(r.stdout.hasSuffix("hv-testguest: done\n"), r.stdout)
    }

    func testHostileDeviceCannotWriteOutsideGuestMemory() throws {
        let r = try runRogue("guest-memory", extra: ",memory")
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("rogue: attack guest-memory refused: guest-physical range"), r.stderr)
        XCTAssertTrue(r.stdout.hasSuffix("hv-testguest: done\n"), r.stdout)
    }

    func testTenantsRunAsDifferentUsersAndCannotReachEachOther() throws {
        let guest = try Harness.testGuest()
        let alice = try VMProcess(["run", "--tenant", "alice", "--multiboot", guest, "--cmdline", "mode=echo"])
        let bob = try VMProcess(["run", "--tenant", "bob", "--multiboot", guest, "--cmdline", "mode=echo"])
        defer {
            alice.write(".")
            bob.write(".")
            alice.waitForExit()
            bob.waitForExit()
        }
        XCTAssertTrue(alice.waitForOutput("echo: ready") && bob.waitForOutput("echo: ready"))
        guard let a = alice.children(named: "hv-serial").first, let b = bob.children(named: "hv-serial").first else {
            return XCTFail("serial devices not found")
        }
        let uidA = Self.status(a)["Uid"]?.split(separator: "\t").first.map(String.init) ?? "?"
        let uidB = Self.status(b)["Uid"]?.split(separator: "\t").first.map(String.init) ?? "?"
        XCTAssertNotEqual(uidA, uidB)
        // A process with alice's device identity (and none of the seccomp limits) still can't
        // signal bob's device or read its /proc entries.
        func asUser(_ uid: String, _ command: [String]) throws -> Int32 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            p.arguments = ["--reuid=\(uid)", "--regid=\(uid)", "--clear-groups", "--inh-caps=-all", "--"] + command
            p.standardError = FileHandle.nullDevice
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            p.waitUntilExit()
            return p.terminationStatus
        }
        func asAlice(_ command: [String]) throws -> Int32 { try asUser(uidA, command) }
        // Control: bob's own identity can signal bob's device, so a refusal below is the sandbox.
        XCTAssertEqual(try asUser(uidB, ["/bin/kill", "-0", String(b)]), 0, "control: same-tenant signal should work")
        XCTAssertNotEqual(try asAlice(["/bin/kill", "-0", String(b)]), 0, "alice signalled bob's device")
        XCTAssertNotEqual(try asAlice(["/bin/cat", "/proc/\(b)/environ"]), 0, "alice read bob's /proc/PID/environ")
        XCTAssertNotEqual(try asAlice(["/bin/ls", "/proc/\(b)/fd"]), 0, "alice listed bob's descriptors")
        XCTAssertNotEqual(try asAlice(["/bin/cat", "/proc/\(b)/maps"]), 0, "alice read bob's memory map")
    }

    /// Tenant uids come from the host's registry: `cust619` and `cust2680`, which the old hash
    /// gave one uid, run as two; a VM without --tenant runs as a leased `vm:PID` tenant that goes
    /// with it; a tenant with a running VM cannot be removed.
    func testTenantUIDsComeFromTheRegistryAndNeverCollide() throws {
        let state = FileManager.default.temporaryDirectory.appendingPathComponent("hv-state-\(getpid())")
        try FileManager.default.createDirectory(at: state, withIntermediateDirectories: true)
        setenv("HV_STATE_DIR", state.path, 1)
        defer {
            unsetenv("HV_STATE_DIR")
            try? FileManager.default.removeItem(at: state)
        }
        let guest = try Harness.testGuest()
        let first = try VMProcess(["run", "--tenant", "cust619", "--multiboot", guest, "--cmdline", "mode=echo", "--memory", "32M"])
        let second = try VMProcess(["run", "--tenant", "cust2680", "--multiboot", guest, "--cmdline", "mode=echo", "--memory", "32M"])
        let own = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=echo", "--memory", "32M"])
        var running = [first, second, own]
        defer { for vm in running { vm.write("."); vm.waitForExit() } }
        XCTAssertTrue(running.allSatisfy { $0.waitForOutput("echo: ready") }, running.map(\.stderr).joined())
        func uid(_ vm: VMProcess) -> UInt32? {
            vm.children(named: "hv-serial").first.flatMap { Self.status($0)["Uid"]?.split(separator: "\t").first.flatMap { UInt32($0) } }
        }
        let uids = running.map(uid)
        XCTAssertEqual(Set(uids.compactMap { $0 }).count, 3, "\(uids)")
        let list = try runHvctl(["tenant", "ls", "--json"])
        XCTAssertEqual(list.status, 0, list.stderr)
        let tenants = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]], list.stdout)
        func registered(_ name: String) -> UInt32? { (tenants.first { $0["name"] as? String == name }?["uid"] as? NSNumber)?.uint32Value }
        XCTAssertEqual(registered("cust619"), uids[0])
        XCTAssertEqual(registered("cust2680"), uids[1])
        XCTAssertEqual(registered("vm:\(own.process.processIdentifier)"), uids[2])
        let busy = try runHvctl(["tenant", "rm", "cust619"])
        XCTAssertEqual(busy.status, 2, busy.stderr)
        XCTAssertTrue(busy.stderr.hasPrefix("hvctl: tenant 'cust619' still has VMs vm-\(first.process.processIdentifier); stop them first"), busy.stderr)
        for vm in running { vm.write("."); XCTAssertEqual(vm.waitForExit(), 0, vm.stderr) }
        running = []
        let after = try runHvctl(["tenant", "ls"])
        XCTAssertTrue(after.stdout.contains("cust619") && after.stdout.contains("cust2680"), after.stdout)
        XCTAssertFalse(after.stdout.contains("vm:"), "a VM's own tenant outlived it: \(after.stdout)")
        let removed = try runHvctl(["tenant", "rm", "cust619"])
        XCTAssertEqual(removed.status, 0, removed.stderr)
        XCTAssertFalse(try runHvctl(["tenant", "ls"]).stdout.contains("cust619"))
        let unknown = try runHvctl(["tenant", "rm", "cust619"])
        XCTAssertTrue(unknown.stderr.hasPrefix("hvctl: no tenant 'cust619' is registered ('hvctl tenant ls' lists them)"), unknown.stderr)
    }

    func testNoSandboxIsLoudAndUnconfined() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--no-sandbox", "--multiboot", guest, "--cmdline", "mode=echo"])
        XCTAssertTrue(vm.waitForOutput("echo: ready"), vm.stdout + vm.stderr)
        XCTAssertTrue(vm.stderr.contains("hvctl: WARNING: --no-sandbox"), vm.stderr)
        if let pid = vm.children(named: "hv-serial").first {
            XCTAssertEqual(Self.status(pid)["Seccomp"], "0")
        }
        vm.write(".")
        XCTAssertEqual(vm.waitForExit(), 0, vm.stderr)
    }

    func testSandboxShowPrintsTheEffectiveProfile() throws {
        let r = try runHvctl(["sandbox", "show", "serial", "--tenant", "alice"])
        XCTAssertEqual(r.status, 0, r.stderr)
        for text in ["sandbox profile serial", "namespaces: user, pid, mount, net, ipc, uts", "tenant 'alice'",
                     "rlimits: nofile 32", "syscalls after lock-down:", "fcntl", "if arg1 <= 4", "allowed after lock-down"] {
            XCTAssertTrue(r.stdout.contains(text), "missing '\(text)' in:\n\(r.stdout)")
        }
        XCTAssertFalse(r.stdout.split(separator: "\n").contains { $0.trimmingCharacters(in: .whitespaces).hasPrefix("socket") })
        let bios = try runHvctl(["sandbox", "show", "bios"])
        XCTAssertEqual(bios.status, 0, bios.stderr)
        let unknown = try runHvctl(["sandbox", "show", "gpu"])
        XCTAssertEqual(unknown.status, 2)
        XCTAssertTrue(unknown.stderr.hasPrefix("hvctl: unknown device 'gpu'"), unknown.stderr)
    }

    func testBrokenProfilesAreRefusedBeforeAnythingRuns() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-profiles-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let rogue = Harness.productsDirectory.appendingPathComponent("hv-rogue-device").path
        let good = try String(contentsOf: Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json"), encoding: .utf8)
        let cases: [(String, String, String)] = [
            ("unknown-syscall", good.replacingOccurrences(of: "\"rt_sigaction\"", with: "\"rt_sigactoin\""), "unknown syscall \"rt_sigactoin\""),
            ("malformed", String(good.dropLast(3)), "invalid JSON"),
            ("bad-namespace", good.replacingOccurrences(of: "\"include\": [\"base-device\"],", with: "\"include\": [\"base-device\"], \"namespaces\": [\"user\", \"mount\", \"time\"],"), "namespace"),
            ("unknown-base", good.replacingOccurrences(of: "\"base-device\"", with: "\"base-gpu\""), "base profile \"base-gpu\""),
        ]
        for (name, text, expected) in cases {
            let path = dir.appendingPathComponent("\(name).json")
            try text.write(to: path, atomically: true, encoding: .utf8)
            let r = try runHvctl(["run", "--device", "\(rogue),profile=\(path.path),pio=0x520:2"])
            XCTAssertEqual(r.status, 2, "\(name): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(name): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(path.path) && r.stderr.contains(expected), "\(name): \(r.stderr)")
        }
        let noProfile = try runHvctl(["run", "--device", "\(rogue),pio=0x520:2"])
        XCTAssertEqual(noProfile.status, 2)
        XCTAssertTrue(noProfile.stderr.contains("has no profile=FILE"), noProfile.stderr)
    }
}

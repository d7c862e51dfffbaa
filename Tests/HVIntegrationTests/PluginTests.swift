import Foundation
import XCTest

/// Third-party plugins the way their authors ship them: the example plugins under
/// Plugins/examples/, copied out of the tree with their manifests, run sandboxed against the test
/// guest's probe; the Python one killed with SIGKILL and restarted like any device; conflicts
/// refused naming the owner; `hvctl plugin validate|info` on good and bad manifests.
final class PluginTests: XCTestCase {
    private var dir: URL!
    private var runDirectory: URL { dir.appendingPathComponent("run") }

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-plugins-\(getpid())-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(at: runDirectory, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", runDirectory.path, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    /// Copies `Plugins/<relative>` to the same place under this test's directory: a plugin built
    /// and run from outside hv's tree, as a third party has it.
    private func copyOut(_ relative: String) throws -> URL {
        let target = dir.appendingPathComponent(relative)
        try FileManager.default.createDirectory(at: target.deletingLastPathComponent(), withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: Harness.repositoryRoot.appendingPathComponent("Plugins/\(relative)"), to: target)
        return target
    }

    private func pythonCounter() throws -> String {
        _ = try copyOut("sdk/python")
        return try copyOut("examples/python-counter").appendingPathComponent("manifest.json").path
    }

    /// Starts VM `vm` with the plugin `device` and the test guest's probe running `ops`; once the
    /// guest printed `until`, returns the VM and the pid of its device `named`.
    private func runProbe(vm name: String, device: String, named: String, ops: String, until: String) throws -> (VMProcess, Int) {
        let vm = try VMProcess(["run", "--name", name, "--multiboot", try Harness.testGuest(), "--cmdline", "mode=poke ops=\(ops)",
                                "--device", device])
        XCTAssertTrue(vm.waitForOutput(until), vm.stdout + vm.stderr)
        let r = try runHvctl(["status", name, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let status = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
        let devices = status["devices"] as? [[String: Any]] ?? []
        let pid = try XCTUnwrap(devices.first { $0["name"] as? String == named }?["pid"] as? Int, "\(devices) \(vm.stderr)")
        return (vm, pid)
    }

    /// The Python example runs jailed (its own uid, seccomp, no capabilities), counts, and keeps
    /// its count across `kill -9`: the guest reads on as if nothing happened.
    func testPythonPluginRunsSandboxedAndSurvivesSIGKILL() throws {
        let manifest = try pythonCounter()
        let ops = "outl:0x530:3,inl:0x530,sleep:4000,inl:0x530,outl:0x530:4,inl:0x530"
        let (vm, pid) = try runProbe(vm: "pyc", device: "\(manifest),start=5", named: "py-counter", ops: ops, until: "poke: inl 0x530 = 0x8")
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        XCTAssertTrue(status.contains("Seccomp:\t2"), status)
        XCTAssertTrue(status.contains("NoNewPrivs:\t1"), status)
        XCTAssertTrue(status.contains("CapEff:\t0000000000000000"), status)
        XCTAssertFalse(status.contains("Uid:\t0\t"), "the device runs as its tenant's uid, not root: \(status)")
        let command = try String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8).split(separator: "\0")
        XCTAssertEqual(command.map(String.init), ["/usr/bin/python3", "-S", "-E", "-B", "-u", "/plugin/counter.py", "py-counter"])

        kill(pid_t(pid), SIGKILL)
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        let reads = vm.stdout.split(separator: "\n").filter { $0.hasPrefix("poke: inl 0x530") }
        XCTAssertEqual(reads, ["poke: inl 0x530 = 0x8", "poke: inl 0x530 = 0x8", "poke: inl 0x530 = 0xc"], vm.stdout)
        XCTAssertTrue(vm.stderr.contains("device py-counter (pid \(pid)) killed by signal 9"), vm.stderr)
        XCTAssertTrue(vm.stderr.contains("device py-counter restarted"), vm.stderr)
    }

    /// A script beside the Python example's manifest, and a manifest variant that runs it.
    private func pythonVariant(of manifest: String, name: String, script: String, source: String) throws -> String {
        let directory = URL(fileURLWithPath: manifest).deletingLastPathComponent()
        try source.write(to: directory.appendingPathComponent(script), atomically: true, encoding: .utf8)
        var json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: manifest))) as? [String: Any])
        json["name"] = name
        json["executable"] = script
        let path = directory.appendingPathComponent("\(name).json")
        try JSONSerialization.data(withJSONObject: json).write(to: path)
        return path.path
    }

    /// A Python device that makes a system call its profile allows only during start-up
    /// (getcwd) is stopped by the sandbox, and the SDK's SIGSYS reporter names the call, as the
    /// Swift SDK's does; its successor serves the same write and the guest carries on.
    func testPythonPluginStoppedByItsSandboxIsNamedAndRestarted() throws {
        let counter = try pythonCounter()
        let manifest = try pythonVariant(of: counter, name: "py-rogue", script: "rogue.py", source: """
            import os
            import hvdevice

            class Rogue(hvdevice.Device):
                model = "py-rogue"

                def start(self, runtime, restored):
                    self.value = 0
                    self.first_process = runtime.generation == 0

                def read(self, resource, offset, size):
                    return self.value >> (8 * offset)

                def write(self, resource, offset, size, value):
                    if value == 0xDEAD and self.first_process:
                        os.getcwd()  # allowed during start-up only: the lock-down filter traps it
                    self.value = value

            hvdevice.run(Rogue)

            """)
        let r = try runHvctl(["run", "--multiboot", try Harness.testGuest(), "--cmdline", "mode=poke ops=outl:0x530:0xdead,inl:0x530",
                              "--device", manifest], timeout: 60)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("device py-rogue (pid ") && r.stderr.contains(
            ") was stopped by its sandbox: system call 79 (getcwd) is not allowed by \(URL(fileURLWithPath: counter).deletingLastPathComponent().path)/counter.profile.json"),
            r.stderr)
        XCTAssertTrue(r.stderr.contains("device py-rogue restarted"), r.stderr)
        XCTAssertTrue(r.stdout.contains("poke: inl 0x530 = 0xdead"), r.stdout)
    }

    /// The Python SDK's SIGSYS reporter is machine code: its bytes are what GNU as makes of the
    /// assembly listed beside them, so a reader can trust the listing.
    func testThePythonSIGSYSReporterIsItsListedAssembly() throws {
        let source = try String(contentsOf: Harness.repositoryRoot.appendingPathComponent("Plugins/sdk/python/hvdevice.py"), encoding: .utf8)
        let lines = source.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let first = try XCTUnwrap(lines.firstIndex { $0.hasSuffix("assembled from:") }) + 1
        let codeLine = try XCTUnwrap(lines.firstIndex { $0.hasPrefix("_SIGSYS_REPORTER = bytes.fromhex(") })
        let listing = lines[first..<codeLine].compactMap { line -> String? in
            guard line.hasPrefix("#"), line.count > 1 else { return nil }
            return String(line.dropFirst())
        }
        XCTAssertGreaterThan(listing.count, 40, "the listing was not found")
        var hex = ""
        for line in lines[(codeLine + 1)...] {
            guard let open = line.firstIndex(of: "\""), let close = line.lastIndex(of: "\""), open < close else { break }
            hex += line[line.index(after: open)..<close]
            if line.hasSuffix(")") { break }
        }
        let work = dir.appendingPathComponent("sigsys")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        let assembly = ".intel_syntax noprefix\n.text\n" + listing.joined(separator: "\n") + "\ntemplate:\n"
        try assembly.write(to: work.appendingPathComponent("h.s"), atomically: true, encoding: .utf8)
        let assembled = try tool("/usr/bin/as", ["--64", "-o", work.appendingPathComponent("h.o").path, work.appendingPathComponent("h.s").path])
        XCTAssertEqual(assembled.status, 0, assembled.output)
        let copied = try tool("/usr/bin/objcopy", ["-O", "binary", "-j", ".text", work.appendingPathComponent("h.o").path, work.appendingPathComponent("h.bin").path])
        XCTAssertEqual(copied.status, 0, copied.output)
        let bytes = try Data(contentsOf: work.appendingPathComponent("h.bin"))
        XCTAssertEqual(bytes.map { String(format: "%02x", $0) }.joined(), hex)
        XCTAssertEqual(bytes.count, 131)
    }

    /// `hvctl device upgrade` on an interpreted plugin replaces its script, not its interpreter:
    /// the new script takes over the count where the old one left it; a script that is not a
    /// file, or that takes the name of a module the plugin brings, is refused and the old one runs on.
    func testAnInterpretedPluginIsUpgradedToANewScript() throws {
        let manifest = try pythonCounter()
        let directory = URL(fileURLWithPath: manifest).deletingLastPathComponent()
        let original = try String(contentsOf: directory.appendingPathComponent("counter.py"), encoding: .utf8)
        let v2 = directory.appendingPathComponent("counter-v2.py").path
        // Version 2 adds ten times what the guest writes.
        let source = original.replacingOccurrences(of: "self.value = (self.value + value) & 0xFFFFFFFF",
                                                   with: "self.value = (self.value + 10 * value) & 0xFFFFFFFF")
        XCTAssertNotEqual(source, original, "the example's write changed; update this test")
        try source.write(toFile: v2, atomically: true, encoding: .utf8)
        let ops = "outl:0x530:3,inl:0x530,sleep:5000,inl:0x530,outl:0x530:4,inl:0x530"
        let (vm, pid) = try runProbe(vm: "pyup", device: "\(manifest),start=5", named: "py-counter", ops: ops, until: "poke: inl 0x530 = 0x8")
        defer { _ = try? runHvctl(["stop", "pyup"]); vm.waitForExit() }

        let missing = try runHvctl(["device", "pyup", "upgrade", "py-counter", "--binary", directory.appendingPathComponent("nope.py").path])
        XCTAssertNotEqual(missing.status, 0)
        XCTAssertTrue(missing.stderr.contains("nope.py' is not a regular file (py-counter is interpreted: give its new script); it keeps running"), missing.stderr)
        let clash = directory.appendingPathComponent("elsewhere")
        try FileManager.default.createDirectory(at: clash, withIntermediateDirectories: true)
        try source.write(to: clash.appendingPathComponent("hvdevice.py"), atomically: true, encoding: .utf8)
        let named = try runHvctl(["device", "pyup", "upgrade", "py-counter", "--binary", clash.appendingPathComponent("hvdevice.py").path])
        XCTAssertNotEqual(named.status, 0)
        XCTAssertTrue(named.stderr.contains("has the name of a file py-counter brings (hvdevice.py); rename the script"), named.stderr)

        let upgraded = try runHvctl(["device", "pyup", "upgrade", "py-counter", "--binary", v2], timeout: 60)
        XCTAssertEqual(upgraded.status, 0, upgraded.stderr)
        XCTAssertTrue(upgraded.stdout.hasPrefix("upgraded py-counter to \(v2) (pid "), upgraded.stdout)
        let ls = try runHvctl(["device", "pyup", "ls"])
        XCTAssertTrue(ls.stdout.split(separator: "\n").contains { $0.hasPrefix("py-counter") && $0.hasSuffix(v2) }, ls.stdout)
        let devices = try runHvctl(["status", "pyup", "--json"])
        let status = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(devices.stdout.utf8)) as? [String: Any])
        let newPid = try XCTUnwrap((status["devices"] as? [[String: Any]])?.first { $0["name"] as? String == "py-counter" }?["pid"] as? Int)
        XCTAssertNotEqual(newPid, pid)
        let command = try String(contentsOfFile: "/proc/\(newPid)/cmdline", encoding: .utf8).split(separator: "\0").map(String.init)
        XCTAssertEqual(command, ["/usr/bin/python3", "-S", "-E", "-B", "-u", "/plugin/counter-v2.py", "py-counter"])

        XCTAssertTrue(vm.waitForOutput("poke: end", timeout: 60), vm.stdout + vm.stderr)
        // 5 + 3 = 8 by the old script, kept across the upgrade; then 8 + 10 * 4 = 48 by the new one.
        let reads = vm.stdout.split(separator: "\n").filter { $0.hasPrefix("poke: inl 0x530") }
        XCTAssertEqual(reads, ["poke: inl 0x530 = 0x8", "poke: inl 0x530 = 0x8", "poke: inl 0x530 = 0x30"], vm.stdout)
    }

    /// A device killed during its start-up, before the guest ran (CPython takes a while to start,
    /// so the kill lands there), is started afresh, and the VM boots as if nothing had happened.
    /// What a device does to itself at start-up (an exit, an error, its sandbox) still fails the
    /// start at once, in one line (`testBadDisksAreRefusedBeforeTheVMStarts` and others).
    func testADeviceKilledDuringItsStartUpIsStartedAgain() throws {
        let manifest = try pythonCounter()
        let vm = try VMProcess(["run", "--multiboot", try Harness.testGuest(), "--cmdline", "mode=poke ops=inl:0x530",
                                "--device", "\(manifest),start=5"])
        var killed: pid_t?
        let deadline = Date().addingTimeInterval(20)
        while killed == nil && vm.process.isRunning && Date() < deadline {
            if let pid = vm.children(named: "py-counter").first {
                kill(pid, SIGKILL)
                killed = pid
            } else {
                usleep(500)
            }
        }
        XCTAssertNotNil(killed, "the device process never showed up: \(vm.stderr)")
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        XCTAssertTrue(vm.stdout.contains("poke: inl 0x530 = 0x5"), vm.stdout + vm.stderr)
        XCTAssertTrue(vm.stderr.contains("device py-counter killed by signal 9 (Killed) during its start-up; starting it again"), vm.stderr)
    }

    /// The C example, built with gcc from its own source (it includes nothing of hv's), runs
    /// under its base-device profile; killed between two reads, it continues the same sequence.
    func testCPluginBuiltWithGCCContinuesItsSequenceAfterSIGKILL() throws {
        let source = try copyOut("examples/c-rng")
        let build = try tool("/usr/bin/gcc", ["-O2", "-Wall", "-Wextra", "-Werror", "-o", source.appendingPathComponent("rng").path,
                                               source.appendingPathComponent("rng.c").path])
        XCTAssertEqual(build.status, 0, build.output)
        let manifest = source.appendingPathComponent("manifest.json").path
        let ops = "inl:0x550,sleep:4000,inl:0x550,outl:0x554:42,inl:0x550"
        let (vm, pid) = try runProbe(vm: "crng", device: "\(manifest),seed=42", named: "c-rng", ops: ops, until: "poke: inl 0x550 = ")
        XCTAssertTrue(try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8).contains("Seccomp:\t2"))
        kill(pid_t(pid), SIGKILL)
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        // xorshift32 from 42: 0xad4528, then 0xa90a34ac; reseeded with 42, 0xad4528 again.
        let reads = vm.stdout.split(separator: "\n").filter { $0.hasPrefix("poke: inl 0x550") }
        XCTAssertEqual(reads, ["poke: inl 0x550 = 0xad4528", "poke: inl 0x550 = 0xa90a34ac", "poke: inl 0x550 = 0xad4528"], vm.stdout)
        XCTAssertTrue(vm.stderr.contains("device c-rng restarted"), vm.stderr)
    }

    /// The Swift example is its own package depending on hv's SDK by path, built with SwiftPM
    /// as its author would; as a virtio-rng PCI function, sandboxed, it feeds the test guest's
    /// driver random bytes, no more per request than its `max_bytes` setting.
    func testSwiftVirtioRNGPluginBuiltOutOfTreeFeedsTheGuest() throws {
        let package = try copyOut("examples/swift-rng")
        let swift = try toolchainExecutable("swift")
        setenv("HV_SOURCE", Harness.repositoryRoot.path, 1)
        defer { unsetenv("HV_SOURCE") }
        let build = try tool(swift, ["build", "-c", "release", "--package-path", package.path])
        XCTAssertEqual(build.status, 0, build.output)
        let manifest = package.appendingPathComponent("manifest.json").path
        let vm = try VMProcess(["run", "--name", "srng", "--multiboot", try Harness.testGuest(), "--cmdline", "mode=rng count=6",
                                "--device", "\(manifest),max_bytes=48"])
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        let lines = vm.stdout.split(separator: "\n").filter { $0.hasPrefix("rng: ") }
        XCTAssertEqual(lines.filter { $0.hasPrefix("rng: 48 bytes: ") }.count, 6, vm.stdout)
        XCTAssertTrue(lines.contains("rng: distinct=6 of 6"), vm.stdout)
    }

    /// Ports, IRQ lines and a second instance that collide are refused before anything runs,
    /// each in one line naming what holds the resource.
    func testConflictsAreRefusedNamingTheOwner() throws {
        let manifest = try pythonCounter()
        let guest = try Harness.testGuest()
        // Variants of the manifest beside it: one with a fixed MMIO window, one a PCI function at
        // the balloon's slot.
        func variant(_ name: String, _ resources: [String: Any]) throws -> String {
            var json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: manifest))) as? [String: Any])
            json["name"] = name
            var r = json["resources"] as? [String: Any] ?? [:]
            r.merge(resources) { $1 }
            json["resources"] = r
            let path = URL(fileURLWithPath: manifest).deletingLastPathComponent().appendingPathComponent("\(name).json")
            try JSONSerialization.data(withJSONObject: json).write(to: path)
            return path.path
        }
        let mmio = try variant("py-mmio", ["mmio": [["base": "0xd0000000", "length": 4096]]])
        let pci = try variant("py-pci", ["pci": ["slot": "0e.0", "bars": [] as [Any]]])
        let cases: [([String], String)] = [
            (["--device", manifest, "--device", manifest], "overlaps py-counter"),
            (["--device", mmio, "--device", "\(mmio),pio=0x540:4"], "overlaps py-mmio"),
            (["--balloon", "on", "--device", pci], "declares PCI function 00:0e.0, which"),
            (["--device", "\(manifest),pio=0x3f8:8"], "overlaps serial0"),
            (["--device", "\(manifest),irq=4"], "IRQ 4, which is"),
            (["--device", "\(manifest),colour=red"], "plugin py-counter has no setting 'colour': it takes start"),
            (["--device", "\(manifest),start=-1"], "setting start='-1': use an integer from 0 to 4294967295"),
        ]
        for (flags, expected) in cases {
            let r = try runHvctl(["run", "--multiboot", guest] + flags)
            XCTAssertNotEqual(r.status, 0, "\(flags)")
            XCTAssertTrue(r.stderr.contains(expected), "\(flags): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(flags): \(r.stderr)")
        }
        // Two instances side by side with their own ports and names work.
        let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=poke ops=inl:0x530,inl:0x540",
                              "--device", "\(manifest),start=1", "--device", "\(manifest),start=2,pio=0x540:4,name=second"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("poke: inl 0x530 = 0x1") && r.stdout.contains("poke: inl 0x540 = 0x2"), r.stdout)
    }

    func testPluginValidateAndInfo() throws {
        let manifest = try pythonCounter()
        let ok = try runHvctl(["plugin", "validate", manifest])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(ok.stdout.contains("valid: plugin py-counter, profile 'py-counter'"), ok.stdout)
        XCTAssertTrue(ok.stdout.hasSuffix("; no conflict with serial0, bios\n"), ok.stdout)

        // Conflicts are found before any VM runs: with the board's devices, and with a VM
        // definition's devices (here its disk's PCI function, and the same plugin already in it).
        let definition = dir.appendingPathComponent("vm.json")
        try #"{"disks": [{"path": "/dev/null"}], "devices": ["\#(manifest)"]}"#.write(to: definition, atomically: true, encoding: .utf8)
        var pciJSON = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: manifest))) as? [String: Any])
        pciJSON["name"] = "py-pci"
        pciJSON["resources"] = ["pci": ["slot": "0f.0", "bars": [] as [Any]]]
        let pciVariant = URL(fileURLWithPath: manifest).deletingLastPathComponent().appendingPathComponent("py-pci.json")
        try JSONSerialization.data(withJSONObject: pciJSON).write(to: pciVariant)
        for (arguments, expected) in [
            (["irq=4"], "hvctl: py-counter wants IRQ 4, which is serial0's; give it a free line (free: 3, 5, 6, 7, 10, "),
            (["pio=0x3f8:8"], "hvctl: py-counter wants pio [0x3f8, +8) which overlaps serial0"),
            (["--config", definition.path], "hvctl: py-counter1 wants pio [0x530, +4) which overlaps py-counter"),
            (["--config", definition.path, "pio=0x540:4", "pci=04.0"], "hvctl: py-pci1 declares PCI function 00:04.0, which disk0 already has"),
        ] {
            let r = try runHvctl(["plugin", "validate", arguments.contains("pci=04.0") ? pciVariant.path : manifest] + arguments)
            XCTAssertEqual(r.status, 2, "\(arguments): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix(expected), "\(arguments): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        // A definition that cannot be read, or is not one, is named in one line.
        let notThere = dir.appendingPathComponent("none.json").path
        let unreadable = try runHvctl(["plugin", "validate", manifest, "--config", notThere])
        XCTAssertEqual(unreadable.status, 1, unreadable.stderr)
        XCTAssertEqual(unreadable.stderr, "hvctl: cannot read VM definition '\(notThere)': No such file or directory\n")
        let wrong = dir.appendingPathComponent("wrong.json")
        try #"{"disks": 3}"#.write(to: wrong, atomically: true, encoding: .utf8)
        let malformed = try runHvctl(["plugin", "validate", manifest, "--config", wrong.path])
        XCTAssertEqual(malformed.status, 2, malformed.stderr)
        XCTAssertTrue(malformed.stderr.hasPrefix("hvctl: VM definition '\(wrong.path)': 'disks'"), malformed.stderr)
        XCTAssertEqual(malformed.stderr.split(separator: "\n").count, 1, malformed.stderr)
        let fits = try runHvctl(["plugin", "validate", manifest, "--config", definition.path, "pio=0x540:4", "name=second"])
        XCTAssertEqual(fits.status, 0, fits.stderr)
        XCTAssertTrue(fits.stdout.hasSuffix("no conflict with serial0, bios, disk0, py-counter (\(definition.path))\n"), fits.stdout)

        let info = try runHvctl(["plugin", "info", manifest, "start=9", "--json"])
        XCTAssertEqual(info.status, 0, info.stderr)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any], info.stdout)
        XCTAssertEqual(json["name"] as? String, "py-counter")
        XCTAssertEqual(json["interpreted"] as? Bool, true)
        XCTAssertEqual(json["command"] as? [String], ["/usr/bin/python3", "-S", "-E", "-B", "-u", "/plugin/counter.py", "py-counter"])
        let settings = try XCTUnwrap(json["settings"] as? [[String: Any]])
        XCTAssertEqual(settings.first?["value"] as? String, "9")
        let resources = try XCTUnwrap(json["resources"] as? [[String: Any]])
        XCTAssertEqual(resources.first?["base"] as? Int, 0x530)
        XCTAssertEqual((json["plugin_files"] as? [String])?.map { ($0 as NSString).lastPathComponent }, ["counter.py", "hvdevice.py"])
        let text = try runHvctl(["plugin", "info", manifest])
        XCTAssertTrue(text.stdout.contains("ports: 0x530-0x533 (4 bytes)"), text.stdout)
        XCTAssertTrue(text.stdout.contains("setting start = 0  (integer, default 0"), text.stdout)

        // A broken manifest: exit 2, one line naming the file and the field.
        let bad = dir.appendingPathComponent("bad.json")
        try #"{"manifest": 1, "name": "x", "executable": "x", "profile": "p.json", "resources": {"irqs": [99]}}"#
            .write(to: bad, atomically: true, encoding: .utf8)
        let refused = try runHvctl(["plugin", "validate", bad.path])
        XCTAssertEqual(refused.status, 2)
        XCTAssertTrue(refused.stderr.hasPrefix("hvctl: plugin manifest \(bad.path): resources.irqs[0]: 99 is more than 23"), refused.stderr)
        XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
        // A profile the manifest names that does not load is named too.
        let profileBroken = URL(fileURLWithPath: manifest).deletingLastPathComponent().appendingPathComponent("counter.profile.json")
        try #"{"profile": "py-counter", "version": 1, "include": ["base-device"], "syscalls": ["frobnicate"]}"#
            .write(to: profileBroken, atomically: true, encoding: .utf8)
        let badProfile = try runHvctl(["plugin", "validate", manifest])
        XCTAssertEqual(badProfile.status, 2)
        XCTAssertTrue(badProfile.stderr.contains("unknown syscall \"frobnicate\""), badProfile.stderr)
    }
}

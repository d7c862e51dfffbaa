import Foundation
import XCTest

/// `hvctl run --kernel`: hv's 64-bit boot-protocol probe (a bzImage-format payload, built by gcc
/// at test time) prints what it received, and ends the VM through ACPI power-off or one of the
/// PC's reset paths. Linux itself cannot run on this machine's nested KVM (see the design brief).
final class LinuxBootTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    private func lines(_ text: String, _ prefix: String) -> [String] {
        text.split(separator: "\n").map(String.init).filter { $0.hasPrefix(prefix) }
    }

    func testProbeReceivesExactlyWhatWasPassed() throws {
        let probe = try Harness.bootProbe()
        let initrd = FileManager.default.temporaryDirectory.appendingPathComponent("hv-initrd-\(getpid()).bin")
        defer { try? FileManager.default.removeItem(at: initrd) }
        var bytes = [UInt8](repeating: 0, count: 300_001)
        var x: UInt32 = 12345
        for i in bytes.indices { x = x &* 1_103_515_245 &+ 12345; bytes[i] = UInt8(truncatingIfNeeded: x >> 16) }
        try Data(bytes).write(to: initrd)
        var fnv: UInt32 = 2_166_136_261
        for b in bytes { fnv = (fnv ^ UInt32(b)) &* 16_777_619 }

        let cmdline = "console=ttyS0 root=/dev/ram0 ünï=✓ quiet"
        let r = try runHvctl(["run", "--kernel", probe, "--initrd", initrd.path, "--cmdline", cmdline, "--memory", "64M"], timeout: 60)
        XCTAssertEqual(r.status, 0, "ACPI power-off must end the VM with status 0: \(r.stderr)")
        let out = r.stdout
        XCTAssertEqual(lines(out, "probe: entry"), ["probe: entry rsi=0x00007000 cs=0x10 ds=0x18 es=0x18 ss=0x18 pg=1 pae=1 lma=1 if=0"], out)
        XCTAssertEqual(lines(out, "probe: gdt"), ["probe: gdt limit=0x001f cs_desc=0x00af9b000000ffff ds_desc=0x00cf93000000ffff"])
        XCTAssertEqual(lines(out, "probe: cr3"), ["probe: cr3 page-aligned=1"])
        let image = try Data(contentsOf: URL(fileURLWithPath: probe))
        let initSize = (0..<4).reduce(UInt32(0)) { $0 | UInt32(image[0x260 + $1]) << (8 * UInt32($1)) }
        XCTAssertEqual(lines(out, "probe: version"),
                       [String(format: "probe: version=0x020f loader=0xff loadflags=0x01 boot_flag=0xaa55 pref=0x01000000 init_size=0x%08x sentinel=0", initSize)])
        XCTAssertEqual(lines(out, "probe: cmdline"), ["probe: cmdline=\"\(cmdline)\""])
        // The e820 map: hv's fixed layout for 64 MiB below 4 GiB.
        XCTAssertEqual(lines(out, "probe: e820"), [
            "probe: e820 entries=6",
            "probe: e820 0x0000000000000000 0x000000000009fc00 1",
            "probe: e820 0x000000000009fc00 0x0000000000000400 2",
            "probe: e820 0x00000000000f0000 0x0000000000010000 2",
            "probe: e820 0x0000000000100000 0x0000000003f00000 1",
            "probe: e820 0x00000000fffbc000 0x0000000000004000 2",
            "probe: e820 0x00000000fffc0000 0x0000000000040000 2",
        ])
        // The initrd as high as RAM allows, page-aligned, every byte intact.
        let address = ((64 << 20) - bytes.count) & ~0xFFF
        XCTAssertEqual(lines(out, "probe: initrd"), [String(format: "probe: initrd addr=0x%08x size=%d fnv=0x%08x aligned=1", address, bytes.count, fnv)])
        // The ACPI tables lead to the PM block and the S5 sleep type, with valid checksums.
        XCTAssertEqual(lines(out, "probe: acpi"), ["probe: acpi rsdp=0x000e0000 checksums=ok pm1a_cnt=0x0604 pm_tmr=0x0608 s5=0"])
        XCTAssertEqual(lines(out, "probe: pm timer"), ["probe: pm timer advances=1"])
        XCTAssertTrue(out.hasSuffix("probe: power off via ACPI\n"), out)
    }

    func testResetPathsEndTheVMUnderNoReboot() throws {
        let probe = try Harness.bootProbe()
        for (end, said) in [("kbd", "i8042"), ("cf9", "0xcf9"), ("port92", "port 0x92")] {
            let r = try runHvctl(["run", "--kernel", probe, "--memory", "32M", "--cmdline", "probe.end=\(end)", "--no-reboot"], timeout: 60)
            XCTAssertEqual(r.status, 0, "\(end): \(r.stderr)")
            XCTAssertEqual(lines(r.stdout, "probe: entry").count, 1, "\(end): booted once")
            XCTAssertTrue(r.stdout.contains("probe: reset via \(said)"), r.stdout)
            XCTAssertTrue(r.stderr.contains("the guest asked for a reset; stopping (--no-reboot)"), "\(end): \(r.stderr)")
        }
    }

    func testResetRebootsTheVMAfresh() throws {
        let probe = try Harness.bootProbe()
        let vm = try VMProcess(["run", "--kernel", probe, "--memory", "32M", "--cmdline", "probe.end=kbd"])
        // Only whole lines count: the last one may be cut (by the poll here, or by the SIGTERM).
        func entries() -> [String] {
            let out = vm.stdout
            return lines(String(out[..<(out.lastIndex(of: "\n") ?? out.startIndex)]), "probe: entry")
        }
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline && vm.process.isRunning && entries().count < 3 { Thread.sleep(forTimeInterval: 0.02) }
        XCTAssertTrue(vm.process.isRunning, "a reset must reboot, not end the VM: \(vm.stderr)")
        kill(vm.process.processIdentifier, SIGTERM)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 128 + SIGTERM, vm.stderr)
        let seen = entries()
        XCTAssertGreaterThanOrEqual(seen.count, 3, vm.stdout)
        // Each boot sees the same fresh machine: the same entry state and boot_params.
        XCTAssertEqual(Set(seen).count, 1, "\(seen)")
    }

    func testHaltWithInterruptsOffEndsTheVM() throws {
        let r = try runHvctl(["run", "--kernel", try Harness.bootProbe(), "--memory", "32M", "--cmdline", "probe.end=halt"], timeout: 60)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.hasSuffix("probe: halt\n"), r.stdout)
    }

    func testBadKernelsGetOneLine() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-kernels-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let good = try Data(contentsOf: URL(fileURLWithPath: try Harness.bootProbe()))
        var old = good
        old[0x206] = 0x0A
        let cases: [(String, Data, String)] = [
            ("truncated", good.prefix(0x300), "too small for a bzImage"),
            ("elf", Data([0x7F, 0x45, 0x4C, 0x46]) + Data(repeating: 0, count: 8192), "not a bzImage"),
            ("old", old, "boot protocol 2.10"),
        ]
        for (name, bytes, message) in cases {
            let path = dir.appendingPathComponent(name).path
            try bytes.write(to: URL(fileURLWithPath: path))
            let r = try runHvctl(["run", "--kernel", path, "--memory", "32M"], timeout: 30)
            XCTAssertEqual(r.status, 1, "\(name): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(message), "\(name): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(name): one line, got \(r.stderr)")
            XCTAssertFalse(r.stderr.contains("Fatal error"), r.stderr)
        }
        // The kernel needs 16 MiB + init_size; 16M of RAM is too little.
        let small = try runHvctl(["run", "--kernel", try Harness.bootProbe(), "--memory", "16M"], timeout: 30)
        XCTAssertEqual(small.status, 1)
        XCTAssertTrue(small.stderr.contains("raise --memory"), small.stderr)
    }

    func testKernelFlagMistakesAreUsageErrors() throws {
        let probe = try Harness.bootProbe()
        var r = try runHvctl(["run", "--initrd", probe])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.contains("--initrd needs --kernel"), r.stderr)
        r = try runHvctl(["run", "--kernel", probe, "--firmware", "seabios"])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.contains("give one"), r.stderr)
        r = try runHvctl(["run", "--kernel", "/nonexistent/bzImage"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("cannot open kernel '/nonexistent/bzImage'"), r.stderr)
        r = try runHvctl(["run", "--kernel", probe, "--initrd", "/nonexistent/initrd"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("cannot open initrd '/nonexistent/initrd'"), r.stderr)
    }
}

import Foundation
import XCTest

/// qcow2 disks end to end, with QEMU's tools as the judge: a guest's I/O on a linked clone (an
/// overlay hv made on a compressed image QEMU made), through kills of the disk process; the base
/// never changes and QEMU cannot write it meanwhile; damaged images and chains are refused in
/// one line.
final class QCOW2DiskTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-qcow2vm-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", dir.appendingPathComponent("run").path, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func testGuestIOOnALinkedCloneThroughDiskProcessKills() throws {
        let guest = try Harness.testGuest()
        // The template: made by QEMU, compressed as cloud images are (the disk process inflates
        // its clusters when the guest's writes copy them up).
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", path("plain.qcow2"), "16M"]).status, 0)
        XCTAssertEqual(try tool("/usr/bin/qemu-io", ["-c", "write -P 0x5a 0 1M", path("plain.qcow2")]).status, 0)
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["convert", "-c", "-O", "qcow2", path("plain.qcow2"), path("base.qcow2")]).status, 0)
        let clone = try runHvctl(["disk", "create", path("clone.qcow2"), "--format", "qcow2", "--backing", "base.qcow2"])
        XCTAssertEqual(clone.status, 0, clone.stderr)
        let info = try runHvctl(["disk", "info", path("clone.qcow2"), "--json"])
        XCTAssertTrue(info.stdout.contains(#""format" : "qcow2""#) && info.stdout.contains(#""virtual_size" : 16777216"#)
                      && info.stdout.contains(path("base.qcow2")), info.stdout)

        let rounds = 200
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=vscsistress count=\(rounds)", "--disk", path("clone.qcow2"), "--name", "clone"])
        XCTAssertTrue(vm.waitForOutput("vscsi: ready"), vm.stdout + vm.stderr)
        let status = try runHvctl(["status", "clone"])
        XCTAssertTrue(status.stdout.contains("qcow2  on \(path("base.qcow2"))"), status.stdout)
        // QEMU may not write the template while a clone reads it.
        let write = try tool("/usr/bin/qemu-io", ["-c", "write -P 0x77 0 4k", path("base.qcow2")])
        XCTAssertNotEqual(write.status, 0, write.output)
        // Kill the disk process in the middle of allocating writes; each time it comes back.
        var kills = 0
        while kills < 5 && !vm.stdout.contains("vscsistress: done") {
            Thread.sleep(forTimeInterval: 0.2)
            guard let pid = vm.children(named: "hv-scsi").first else { continue }
            kill(pid, SIGKILL)
            kills += 1
            let deadline = Date().addingTimeInterval(10)
            while vm.stderr.components(separatedBy: "device disk0 restarted").count - 1 < kills && Date() < deadline {
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
        XCTAssertEqual(kills, 5, "the guest finished before five kills: \(vm.stdout.suffix(300))")
        XCTAssertTrue(vm.waitForOutput("vscsistress: done", timeout: 120), vm.stdout.suffix(500) + vm.stderr)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
        XCTAssertTrue(vm.stdout.contains("vscsistress: done rounds=\(rounds) requests=\(rounds * 8) errors=0 mismatches=0 duplicates=0"),
                      vm.stdout.suffix(800) + vm.stderr)

        // qemu-img's verdict: consistent (a kill between counting a cluster and using it may leak
        // one, exit status 3, never more).
        let check = try tool("/usr/bin/qemu-img", ["check", path("clone.qcow2")])
        XCTAssertTrue(check.status == 0 || check.status == 3, check.output)
        XCTAssertFalse(check.output.contains("ERROR"), check.output)
        // What the guest did not write still reads from the template, through QEMU too; the
        // template itself is untouched.
        let through = try tool("/usr/bin/qemu-io", ["-r", "-c", "read -P 0x5a 512k 512k", path("clone.qcow2")])
        XCTAssertTrue(through.output.contains("read 524288/524288 bytes") && !through.output.contains("verification failed"), through.output)
        let base = try tool("/usr/bin/qemu-io", ["-r", "-c", "read -P 0x5a 0 1M", path("base.qcow2")])
        XCTAssertTrue(base.output.contains("read 1048576/1048576 bytes") && !base.output.contains("verification failed"), base.output)
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["check", path("base.qcow2")]).status, 0)

        // The clone, its chain flattened, as a raw and as a qcow2 image: identical for QEMU.
        for (name, format) in [("flat.img", "raw"), ("flat.qcow2", "qcow2")] {
            let converted = try runHvctl(["disk", "convert", path("clone.qcow2"), path(name), "--format", format])
            XCTAssertEqual(converted.status, 0, converted.stderr)
            let compare = try tool("/usr/bin/qemu-img", ["compare", path("clone.qcow2"), path(name)])
            XCTAssertEqual(compare.status, 0, compare.output)
        }
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["check", path("flat.qcow2")]).status, 0)
        let again = try runHvctl(["disk", "convert", path("clone.qcow2"), path("flat.img"), "--format", "raw"])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.contains("already exists"), again.stderr)
    }

    func testResizeGrowsImagesNoVMHolds() throws {
        let guest = try Harness.testGuest()
        XCTAssertEqual(try runHvctl(["disk", "create", path("r.qcow2"), "--size", "8M", "--format", "qcow2"]).status, 0)
        XCTAssertEqual(try runHvctl(["disk", "create", path("r.img"), "--size", "8M"]).status, 0)
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--disk", path("r.qcow2"), "--name", "holder"])
        defer { vm.terminateAndWait() }
        XCTAssertTrue(vm.waitForOutput("idle: ready"), vm.stderr)
        let busy = try runHvctl(["disk", "resize", path("r.qcow2"), "16M"])
        XCTAssertEqual(busy.status, 1)
        XCTAssertTrue(busy.stderr.contains("is in use"), busy.stderr)
        let copy = try runHvctl(["disk", "convert", path("r.qcow2"), path("copy.img"), "--format", "raw"])
        XCTAssertEqual(copy.status, 1)
        XCTAssertTrue(copy.stderr.contains("is being written"), copy.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("copy.img")))
        XCTAssertEqual(try runHvctl(["stop", "holder"]).status, 0)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)

        for image in ["r.qcow2", "r.img"] {
            let grown = try runHvctl(["disk", "resize", path(image), "1G"])
            XCTAssertEqual(grown.status, 0, grown.stderr)
            XCTAssertTrue(grown.stdout.contains("to 1073741824 bytes"), grown.stdout)
            let info = try tool("/usr/bin/qemu-img", ["info", "--output=json", path(image)])
            XCTAssertTrue(info.output.contains(#""virtual-size": 1073741824"#), info.output)
            let shrink = try runHvctl(["disk", "resize", path(image), "8M"])
            XCTAssertEqual(shrink.status, 1)
            XCTAssertTrue(shrink.stderr.contains("only grows"), shrink.stderr)
        }
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["check", path("r.qcow2")]).status, 0)
        // The guest sees the new size.
        let seen = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=vscsi", "--disk", path("r.qcow2")])
        XCTAssertTrue(seen.waitForOutput("vscsi: wrote 1MiB=", timeout: 60), seen.stdout + seen.stderr)
        seen.write("x")
        XCTAssertEqual(seen.waitForExit(timeout: 60), 0, seen.stderr)
        XCTAssertTrue(seen.stdout.contains("vscsi: capacity status=0 blocks=2097152"), seen.stdout)
    }

    /// The same guest workload under hv and under QEMU, each on a fresh qcow2 image qemu-img
    /// made: the two images hold the same disk.
    func testTheSameGuestWritesTheSameDiskUnderHvAndQEMU() throws {
        let guest = try Harness.testGuest()
        let qemuBinary = "/usr/bin/qemu-system-x86_64"
        guard FileManager.default.isExecutableFile(atPath: qemuBinary) else {
            throw Harness.MissingBuild(description: "\(qemuBinary) is missing (test.sh installs qemu-system-x86)")
        }
        for name in ["by-hv.qcow2", "by-qemu.qcow2"] {
            XCTAssertEqual(try tool("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", path(name), "16M"]).status, 0)
        }
        let workload = "mode=vscsistress count=40"
        let hv = try runHvctl(["run", "--multiboot", guest, "--cmdline", workload, "--disk", path("by-hv.qcow2")], timeout: 120)
        XCTAssertEqual(hv.status, 0, hv.stderr)
        XCTAssertTrue(hv.stdout.contains("errors=0 mismatches=0 duplicates=0"), hv.stdout)

        // QEMU does not exit when the guest halts: stop it (SIGTERM, a clean exit) once it is done.
        let qemu = try VMProcess(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", "64M", "-nodefaults",
                                  "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", guest, "-append", workload,
                                  "-device", "virtio-scsi-pci,disable-legacy=on,addr=0x4,id=scsi0",
                                  "-drive", "file=\(path("by-qemu.qcow2")),if=none,id=d0,format=qcow2",
                                  "-device", "scsi-hd,drive=d0,bus=scsi0.0"], executable: qemuBinary)
        XCTAssertTrue(qemu.waitForOutput("hv-testguest: done", timeout: 120), qemu.stdout.suffix(500) + qemu.stderr)
        qemu.terminateAndWait()
        XCTAssertTrue(qemu.stdout.contains("errors=0 mismatches=0 duplicates=0"), qemu.stdout)

        let compare = try tool("/usr/bin/qemu-img", ["compare", path("by-hv.qcow2"), path("by-qemu.qcow2")])
        XCTAssertEqual(compare.status, 0, compare.output)
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["check", path("by-hv.qcow2")]).status, 0)
    }

    func testCommitFoldsAnOverlayIntoItsBase() throws {
        for baseFormat in ["raw", "qcow2"] {
            let base = path("base-\(baseFormat)"), top = path("top-\(baseFormat).qcow2"), expected = path("expected-\(baseFormat).raw")
            XCTAssertEqual(try tool("/usr/bin/qemu-img", ["create", "-q", "-f", baseFormat, base, "8M"]).status, 0)
            XCTAssertEqual(try tool("/usr/bin/qemu-io", ["-f", baseFormat, "-c", "write -P 0x11 0 1M", base]).status, 0)
            XCTAssertEqual(try runHvctl(["disk", "create", top, "--format", "qcow2", "--backing", base]).status, 0)
            XCTAssertEqual(try tool("/usr/bin/qemu-io", ["-c", "write -P 0x22 512k 1M", "-c", "write -z 3M 64k", top]).status, 0)
            XCTAssertEqual(try tool("/usr/bin/qemu-img", ["convert", "-O", "raw", top, expected]).status, 0)
            let committed = try runHvctl(["disk", "commit", top])
            XCTAssertEqual(committed.status, 0, committed.stderr)
            XCTAssertTrue(committed.stdout.contains("committed \(top) into \(base)"), committed.stdout)
            // Base and (emptied) overlay both read what the overlay did.
            for image in [base, top] {
                let compare = try tool("/usr/bin/qemu-img", ["compare", "-F", "raw", image, expected])
                XCTAssertEqual(compare.status, 0, "\(image): \(compare.output)")
            }
            XCTAssertEqual(try tool("/usr/bin/qemu-img", ["check", top]).status, 0)
            if baseFormat == "qcow2" { XCTAssertEqual(try tool("/usr/bin/qemu-img", ["check", base]).status, 0) }
        }
        let plain = try runHvctl(["disk", "commit", path("base-qcow2")])
        XCTAssertEqual(plain.status, 1)
        XCTAssertTrue(plain.stderr.contains("has no backing file"), plain.stderr)
    }

    func testDamagedImagesAndChainsAreRefusedInOneLine() throws {
        let guest = try Harness.testGuest()
        func refused(_ disk: String, _ expected: String, file: StaticString = #filePath, line: UInt = #line) throws {
            let r = try runHvctl(["run", "--multiboot", guest, "--disk", disk, "--serial", "none"])
            XCTAssertEqual(r.status, 1, r.stderr, file: file, line: line)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr, file: file, line: line)
            XCTAssertTrue(r.stderr.contains(expected), r.stderr, file: file, line: line)
        }
        // Marked dirty (incompatible feature bit 0 at byte 79).
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", path("dirty.qcow2"), "8M"]).status, 0)
        let handle = try FileHandle(forUpdating: dir.appendingPathComponent("dirty.qcow2"))
        try handle.seek(toOffset: 79)
        handle.write(Data([1]))
        try handle.close()
        try refused(path("dirty.qcow2"), "is marked dirty")
        // Two overlays naming each other.
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", path("a.qcow2"), "8M"]).status, 0)
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", path("b.qcow2")]).status, 0)
        XCTAssertEqual(try tool("/usr/bin/qemu-img", ["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", path("a.qcow2")]).status, 0)
        try refused(path("b.qcow2"), "loops")
        // A backing file that is gone.
        XCTAssertEqual(try runHvctl(["disk", "create", path("base.img"), "--size", "8M"]).status, 0)
        XCTAssertEqual(try runHvctl(["disk", "create", path("orphan.qcow2"), "--format", "qcow2", "--backing", "base.img"]).status, 0)
        try FileManager.default.removeItem(atPath: path("base.img"))
        try refused(path("orphan.qcow2"), "cannot open backing file '\(path("base.img"))'")
        // format=qcow2 on a raw image.
        XCTAssertEqual(try runHvctl(["disk", "create", path("plain.img"), "--size", "8M"]).status, 0)
        try refused(path("plain.img") + ",format=qcow2", "is not a qcow2 image")
        // Usage errors for disk create.
        XCTAssertEqual(try runHvctl(["disk", "create", path("x.qcow2"), "--format", "vmdk", "--size", "8M"]).status, 2)
        XCTAssertEqual(try runHvctl(["disk", "create", path("y.img"), "--backing", path("plain.img")]).status, 2)
        XCTAssertEqual(try runHvctl(["disk", "create", path("z.qcow2"), "--format", "qcow2"]).status, 2)
    }
}

import Foundation
import XCTest

/// `hvctl disk create`: thin-provisioned raw images, and refusals that protect existing data.
final class DiskTests: XCTestCase {
    func testCreatesASparseImageOfTheExactSize() throws {
        guard FileManager.default.isExecutableFile(atPath: Harness.hvctl) else { throw Harness.MissingBuild(description: "hvctl not built") }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-disk-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("a.img").path

        var r = try runHvctl(["disk", "create", image, "--size", "20G"])
        XCTAssertEqual(r.status, 0, r.stderr)
        var st = stat()
        XCTAssertEqual(stat(image, &st), 0)
        XCTAssertEqual(Int64(st.st_size), 20 << 30)
        XCTAssertLessThanOrEqual(Int64(st.st_blocks) * 512, 1 << 20, "thin-provisioned: nothing allocated")
        XCTAssertEqual(st.st_mode & 0o777, 0o600)

        // An existing image is never overwritten, even with the same size.
        try Data("data".utf8).write(to: URL(fileURLWithPath: image))
        r = try runHvctl(["disk", "create", image, "--size", "1G"])
        XCTAssertEqual(r.status, 1, "a well-formed command that fails at run time exits 1")
        XCTAssertTrue(r.stderr.contains("already exists"), r.stderr)
        XCTAssertEqual(try String(contentsOfFile: image, encoding: .utf8), "data")

        for (args, message) in [(["disk", "create", dir.appendingPathComponent("b.img").path, "--size", "1000"], "not a multiple of 512"),
                                (["disk", "create", "--size", "1G"], "missing expected argument '<path>'"),
                                (["disk", "create", dir.appendingPathComponent("c.img").path], "--size is needed for a raw image"),
                                (["disk", "create", "/nonexistent-dir/x.img", "--size", "1M"], "cannot create '/nonexistent-dir/x.img'"),
                                (["disk", "resize", image], "missing expected argument '<size>'")] {
            r = try runHvctl(args)
            // Usage errors exit 2; a path that cannot be created is a run-time failure, 1.
            XCTAssertEqual(r.status, message.hasPrefix("cannot create") ? 1 : 2, "\(args)")
            XCTAssertTrue(r.stderr.contains(message), "\(args): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("b.img").path))
    }
}

/// `--disk`: a raw image on a virtio-scsi adapter in its own sandboxed process, booted by SeaBIOS
/// (its virtio-scsi driver is the acceptance client).
final class VirtioSCSIDiskTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-vscsi-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    /// A 1 MiB image: hv's boot sector, then a message in sector 1 for it to read and print.
    private func bootDisk(_ name: String) throws -> String {
        let guestDir = URL(fileURLWithPath: try Harness.testGuest()).deletingLastPathComponent()
        var image = try Data(contentsOf: guestDir.appendingPathComponent("mbr.bin"))
        XCTAssertEqual(image.count, 512)
        var sector = Data("hv-disk: sector 1 came through virtio-scsi\r\n".utf8)
        sector.append(Data(repeating: 0, count: 512 - sector.count))
        image.append(sector)
        image.append(Data(repeating: 0, count: (1 << 20) - image.count))
        let path = dir.appendingPathComponent(name).path
        try image.write(to: URL(fileURLWithPath: path))
        return path
    }

    func testSeaBIOSBootsFromTheDiskAndReadsIt() throws {
        for readOnly in [false, true] {
            let disk = try bootDisk("boot-\(readOnly).img")
            let r = try runHvctl(["run", "--firmware", "seabios", "--disk", disk + (readOnly ? ",readonly" : "")], timeout: 60)
            XCTAssertEqual(r.status, 0, "the boot sector halts with interrupts off: \(r.stderr)")
            let lines = r.stdout.replacingOccurrences(of: "\r", with: "").split(separator: "\n").map(String.init)
            XCTAssertTrue(lines.contains("Booting from Hard Disk..."), r.stdout)
            XCTAssertTrue(lines.contains("hv-mbr: booted from the disk"), r.stdout)
            XCTAssertTrue(lines.contains("hv-disk: sector 1 came through virtio-scsi"), r.stdout)
            XCTAssertFalse(r.stderr.contains("refused"), r.stderr)
        }
    }

    /// Issue 13: SeaBIOS boots from the disk while hv-bios and hv-scsi are killed, in turn, at
    /// random moments of the boot: it still boots, reads its sector, and nothing is reset.
    func testSeaBIOSBootsWhileTheBIOSAndDiskProcessesAreKilled() throws {
        let disk = try bootDisk("boot-killed.img")
        let vm = try VMProcess(["run", "--firmware", "seabios", "--disk", disk])
        // The kills start once the firmware runs: a device killed before the guest started fails
        // the start with its one-line error (nothing has run yet to keep), which is not this test.
        XCTAssertTrue(vm.waitForOutput("SeaBIOS (version", timeout: 60), vm.stdout + vm.stderr)
        var kills = 0
        let deadline = Date().addingTimeInterval(60)
        while vm.process.isRunning && kills < 8 && Date() < deadline {
            Thread.sleep(forTimeInterval: Double.random(in: 0.1...0.3))
            let name = kills % 2 == 0 ? "hv-bios" : "hv-scsi"
            if let pid = vm.children(named: name).first {
                kill(pid, SIGKILL)
                kills += 1
            }
        }
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        XCTAssertGreaterThanOrEqual(kills, 2, "the boot finished before the test could kill anything")
        let lines = vm.stdout.replacingOccurrences(of: "\r", with: "").split(separator: "\n").map(String.init)
        XCTAssertTrue(lines.contains("hv-mbr: booted from the disk"), vm.stdout + vm.stderr)
        XCTAssertTrue(lines.contains("hv-disk: sector 1 came through virtio-scsi"), vm.stdout + vm.stderr)
        XCTAssertEqual(vm.stdout.components(separatedBy: "SeaBIOS (version").count - 1, 1, "the firmware started over: \(vm.stdout)")
        XCTAssertEqual(vm.stderr.components(separatedBy: "restarted (pid").count - 1, kills, vm.stderr)
    }

    func testBadDisksAreRefusedBeforeTheVMStarts() throws {
        let good = try bootDisk("good.img")
        let odd = dir.appendingPathComponent("odd.img").path
        try Data(repeating: 0, count: 1000).write(to: URL(fileURLWithPath: odd))
        let empty = dir.appendingPathComponent("empty.img").path
        try Data().write(to: URL(fileURLWithPath: empty))
        let cases: [([String], Int32, String)] = [
            (["--disk", "/nonexistent/disk.img"], 1, "cannot open disk image '/nonexistent/disk.img' for writing"),
            (["--disk", good, "--disk", good], 1, "is given twice"),
            (["--disk", odd], 1, "is 1000 bytes: a disk is a non-zero whole number of 512-byte sectors"),
            (["--disk", empty], 1, "disk image '\(empty)' is 0 bytes"),
            (["--disk", "\(good),bogus"], 2, "invalid --disk"),
            (["--disk", dir.path], 1, "Is a directory"),
        ]
        for (args, status, message) in cases {
            let r = try runHvctl(["run"] + args, timeout: 30)
            XCTAssertEqual(r.status, status, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(message), "\(args): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(args): one line: \(r.stderr)")
        }
        // An image another process holds for writing is refused, not shared.
        let fd = open(good, O_RDWR)
        XCTAssertEqual(flock(fd, LOCK_EX), 0)
        let locked = try runHvctl(["run", "--disk", good], timeout: 30)
        close(fd)
        XCTAssertEqual(locked.status, 1)
        XCTAssertTrue(locked.stderr.contains("is locked by another process"), locked.stderr)
    }
}

/// hv's own guest drives virtio-scsi directly (Tests/Guests/guest.c, mode=vscsi): identity,
/// capacity, a written pattern read back, two requests in flight, hostile chains that fail alone,
/// and discards that give the image's blocks back to the host.
final class VirtioSCSIGuestTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    private func allocated(_ path: String) -> Int64 {
        var st = stat()
        stat(path, &st)
        return Int64(st.st_blocks) * 512
    }

    func testGuestDriverWritesReadsSurvivesHostileChainsAndDiscards() throws {
        try guestDriver(format: "raw")
    }

    /// The same on a qcow2 image: the guest's discards free its clusters in the file (issue 16).
    func testGuestDriverOnAQCOW2Disk() throws {
        try guestDriver(format: "qcow2")
    }

    private func guestDriver(format: String) throws {
        let guest = try Harness.testGuest()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-vscsi-guest-\(getpid())-\(format)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("d.\(format)").path
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "8M", "--format", format]).status, 0)
        let empty = allocated(image)

        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=vscsi", "--disk", image])
        XCTAssertTrue(vm.waitForOutput("vscsi: wrote 1MiB=yes", timeout: 60), vm.stdout + vm.stderr)
        let written = allocated(image)
        XCTAssertGreaterThanOrEqual(written - empty, 1 << 20, "the guest's 1 MiB reached the image")
        vm.write("x")
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        XCTAssertLessThanOrEqual(allocated(image), written - (1 << 20) + 64 * 1024, "UNMAP gave the MiB back to the host")

        let lines = vm.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix("vscsi: ") }
        XCTAssertEqual(lines, [
            "vscsi: ready status=f",
            "vscsi: inquiry status=0 type=0 vendor=HV       product=VIRTUAL DISK    ",
            "vscsi: capacity status=0 blocks=16384",
            "vscsi: write status=0 sense=0/0",
            "vscsi: read status=0 pattern=match",
            "vscsi: in flight completed=2 status=0,0",
            "vscsi: hostile outside-ram completed=1 len=0",
            "vscsi: hostile loop completed=1 len=0",
            "vscsi: hostile length completed=1 len=0",
            "vscsi: alive after hostile chains: tur status=0",
            "vscsi: wrote 1MiB=yes",
            "vscsi: unmap status=0",
        ], vm.stdout)
        // The device named what it refused, and was never restarted.
        XCTAssertTrue(vm.stderr.contains("a buffer [0xf0000000, +51) is not guest RAM"), vm.stderr)
        XCTAssertTrue(vm.stderr.contains("loops"), vm.stderr)
        XCTAssertFalse(vm.stderr.contains("restarting"), vm.stderr)
        if format == "qcow2" {
            let check = try tool("/usr/bin/qemu-img", ["check", image])
            XCTAssertEqual(check.status, 0, check.output)
        }
    }

    func testReadOnlyDiskRefusesWritesWithDataProtect() throws {
        let guest = try Harness.testGuest()
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("hv-vscsi-ro-\(getpid()).img").path
        defer { unlink(image) }
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "8M"]).status, 0)
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=vscsi", "--disk", image + ",readonly"])
        XCTAssertTrue(vm.waitForOutput("vscsi: wrote 1MiB=", timeout: 60), vm.stdout + vm.stderr)
        vm.write("x")
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        XCTAssertTrue(vm.stdout.contains("vscsi: write status=2 sense=7/27"), "CHECK CONDITION, DATA PROTECT / WRITE PROTECTED: \(vm.stdout)")
        XCTAssertTrue(vm.stdout.contains("vscsi: read status=0 pattern=n/a"), vm.stdout)
        XCTAssertTrue(vm.stdout.contains("vscsi: wrote 1MiB=no"), vm.stdout)
        XCTAssertTrue(vm.stdout.contains("vscsi: unmap status=2"), vm.stdout)
        var st = stat()
        stat(image, &st)
        XCTAssertEqual(st.st_blocks, 0, "nothing written to a read-only image")
    }
}

/// `hvctl cdrom NAME eject|insert`: the operator changes the CD of a running VM, and the guest's
/// own driver sees it (UNIT ATTENTION, empty tray, media events, the new capacity).
final class CDROMMediaChangeTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    func testEjectAndInsertWhileTheGuestWatches() throws {
        let guest = try Harness.testGuest()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-cdchange-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer {
            unsetenv("HV_RUN_DIR")
            try? FileManager.default.removeItem(at: dir)
        }
        setenv("HV_RUN_DIR", dir.appendingPathComponent("run").path, 1)
        let first = dir.appendingPathComponent("first.iso").path, second = dir.appendingPathComponent("second.iso").path
        // Blank volumes whose sector 16 carries an ISO 9660 descriptor's identifier ("\u{1}CD001"),
        // which is what hv checks before it takes a file as a CD.
        for (path, sectors) in [(first, 50), (second, 70)] {
            var volume = Data(repeating: 0, count: 2048 * sectors)
            volume.replaceSubrange(2048 * 16..<(2048 * 16 + 6), with: [1] + Array("CD001".utf8))
            try volume.write(to: URL(fileURLWithPath: path))
        }

        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=vscsicd", "--cdrom", first, "--name", "cdvm"])
        XCTAssertTrue(vm.waitForOutput("vscsicd: waiting", timeout: 60), vm.stdout + vm.stderr)
        var r = try runHvctl(["cdrom", "cdvm", "eject"])
        XCTAssertEqual(r.status, 0, r.stderr)
        vm.write("x")
        let waitingTwice = { vm.stdout.components(separatedBy: "vscsicd: waiting").count - 1 >= 2 }
        let deadline = Date().addingTimeInterval(30)
        while !waitingTwice() && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        r = try runHvctl(["cdrom", "cdvm", "insert", second])
        XCTAssertEqual(r.status, 0, r.stderr)
        vm.write("y")
        XCTAssertEqual(vm.waitForExit(timeout: 60), 0, vm.stderr)
        let lines = vm.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix("vscsicd: ") && $0 != "vscsicd: waiting" }
        XCTAssertEqual(lines, [
            "vscsicd: start tur status=0 sense=0/0",
            "vscsicd: blocks=50",
            "vscsicd: after eject tur status=2 sense=6/3a",   // UNIT ATTENTION, MEDIUM NOT PRESENT
            "vscsicd: then tur status=2 sense=2/3a",          // NOT READY, MEDIUM NOT PRESENT
            "vscsicd: media event=3 present=0",               // media removal
            "vscsicd: after insert tur status=2 sense=6/28",  // UNIT ATTENTION, MEDIUM MAY HAVE CHANGED
            "vscsicd: then tur status=0 sense=0/0",
            "vscsicd: blocks=70",
        ], vm.stdout)
    }

    func testCDROMCommandMistakes() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-cdmistake-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer {
            unsetenv("HV_RUN_DIR")
            try? FileManager.default.removeItem(at: dir)
        }
        setenv("HV_RUN_DIR", dir.path, 1)
        var r = try runHvctl(["cdrom", "nobody", "eject"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("no VM named 'nobody' is running"), r.stderr)
        r = try runHvctl(["cdrom", "nobody", "spin"])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.contains("the value 'spin' is invalid for '<action>'"), r.stderr)
        // A VM without a drive says so; a bad ISO is refused by the VM's core.
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--memory", "32M", "--name", "nocd"])
        XCTAssertTrue(vm.waitForOutput("idle: ready"), vm.stderr)
        r = try runHvctl(["cdrom", "nocd", "eject"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("this VM has no CD-ROM drive"), r.stderr)
        XCTAssertEqual(try runHvctl(["stop", "nocd"]).status, 0)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
    }
}

/// INTx: the adapter's INTA# routed by the core through the PIIX3 PIRQ register the guest
/// programmed, level-triggered on the in-kernel PIC, lowered by the ISR read before the guest sees
/// its value; VIRTQ_AVAIL_F_NO_INTERRUPT honoured.
final class VirtioSCSIInterruptTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    func testOneInterruptPerCompletionThroughPIRQRouting() throws {
        let guest = try Harness.testGuest()
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("hv-vscsi-irq-\(getpid()).img").path
        defer { unlink(image) }
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "8M"]).status, 0)
        let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=vscsiirq", "--disk", image], timeout: 60)
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix("vscsiirq: ") }
        XCTAssertEqual(lines, [
            "vscsiirq: interrupts=1 isr=1 used=1",        // one completion, one interrupt, ISR bit 0
            "vscsiirq: after waiting interrupts=1",       // the ISR read lowered the line: no second one
            "vscsiirq: suppressed interrupts=1 used=2",   // NO_INTERRUPT: completed without one
            "vscsiirq: interrupts=2 used=3 spurious=0",
        ], r.stdout)
    }

    /// MSI-X through the core's GSI routes and an irqfd per vector, the kick through a doorbell
    /// (ioeventfd) that follows the BAR, and event-index suppression.
    func testMSIXMaskingAndEventIndexWithDoorbellKicks() throws {
        let guest = try Harness.testGuest()
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("hv-vscsi-msix-\(getpid()).img").path
        defer { unlink(image) }
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "8M"]).status, 0)
        let r = try runHvctl(["run", "--verbose", "--multiboot", guest, "--cmdline", "mode=vscsimsix", "--disk", image], timeout: 60)
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix("vscsimsix: ") }
        XCTAssertEqual(lines, [
            "vscsimsix: vectors=4 table=1800 pba=1c00 queue_vector_60=ffff",  // 3 queues + config; a vector past the table reads NO_VECTOR
            "vscsimsix: interrupts=1 isr=0 used=1",                           // MSI-X, not INTx: the ISR stays 0
            "vscsimsix: masked interrupts=1 pending=2 used=2",                // masked: held in the pending bit of vector 1
            "vscsimsix: unmasked interrupts=2 pending=0",                     // delivered on unmask
            "vscsimsix: event index interrupts=2 used=3 avail_event=3",       // used_event asked for none yet; the device asks for the next kick
            "vscsimsix: event index interrupts=3 used=4",
        ], r.stdout)
        // The request queue's notify register became a doorbell where the guest put BAR 0.
        XCTAssertTrue(r.stderr.contains("disk0: doorbell at offset 0x3008 of resource 1 at address 0xe0003008"), r.stderr)
    }
}

/// Issue 13: `kill -9` of the disk's process in the middle of guest I/O loses nothing. The guest
/// writes and verifies 4 KiB patterns with four requests in flight while the test kills hv-scsi
/// twenty times at random moments: every request completes exactly once with GOOD status, every
/// word reads back as written, the guest is never reset, and the image holds what it wrote.
final class DiskRestartTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    /// The guest's pattern (Tests/Guests/guest.c, stress_word).
    private func stressWord(_ round: UInt32, _ lba: UInt32, _ i: UInt32) -> UInt32 {
        let v = round &* 2654435761 ^ (lba &* 40503 &+ i &* 2246822519)
        return v ^ (v >> 15)
    }

    func testKillingTheDiskProcessTwentyTimesLosesNoIO() throws {
        let guest = try Harness.testGuest()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-diskkill-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer {
            unsetenv("HV_RUN_DIR")
            try? FileManager.default.removeItem(at: dir)
        }
        setenv("HV_RUN_DIR", dir.appendingPathComponent("run").path, 1)
        let image = dir.appendingPathComponent("disk.img").path
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "16M"]).status, 0)
        // Enough rounds that twenty kills land before the guest is done on a fast host too; the loop
        // below stops early once they have.
        let rounds: UInt32 = 300
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=vscsistress count=\(rounds)", "--disk", image, "--name", "stress"])
        XCTAssertTrue(vm.waitForOutput("vscsi: ready"), vm.stdout + vm.stderr)
        var kills = 0
        while kills < 20 && vm.process.isRunning && !vm.stdout.contains("vscsistress: done") {
            Thread.sleep(forTimeInterval: Double.random(in: 0.05...0.25))
            guard let pid = vm.children(named: "hv-scsi").first else { continue }
            kill(pid, SIGKILL)
            kills += 1
            let deadline = Date().addingTimeInterval(10)
            while vm.stderr.components(separatedBy: "device disk0 restarted").count - 1 < kills && Date() < deadline {
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
        XCTAssertEqual(kills, 20, "the guest finished before twenty kills; make it run longer: \(vm.stdout.suffix(300))")
        XCTAssertTrue(vm.waitForOutput("vscsistress: done", timeout: 120), vm.stdout.suffix(500) + vm.stderr)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
        XCTAssertTrue(vm.stdout.contains("vscsistress: done rounds=\(rounds) requests=\(rounds * 8) errors=0 mismatches=0 duplicates=0"),
                      vm.stdout.suffix(800) + vm.stderr)
        XCTAssertEqual(vm.stdout.components(separatedBy: "hv-testguest: mode=vscsistress").count - 1, 1, "the guest was reset")
        XCTAssertEqual(vm.stderr.components(separatedBy: "device disk0 restarted").count - 1, 20, vm.stderr)
        XCTAssertFalse(vm.stderr.contains("giving up"), vm.stderr)

        // The image holds the last sixteen rounds' writes, word for word.
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        var wrong = 0
        for round in (rounds - 16)..<rounds {
            for slot in UInt32(0)..<4 {
                let lba = (round % 16) * 32 + slot * 8
                for i in UInt32(0)..<1024 {
                    let at = Int(lba) * 512 + Int(i) * 4
                    let word = data[at..<(at + 4)].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
                    if word != stressWord(round, lba, i) { wrong += 1 }
                }
            }
        }
        XCTAssertEqual(wrong, 0, "words on the image differ from what the guest wrote")
    }
}

/// `hvctl device NAME ls|restart|upgrade`: an operator replaces a device's binary under a running
/// guest (the guest's I/O goes on), a binary that cannot take over is rolled back, and a device
/// given up after a crash loop is revived.
final class DeviceUpgradeTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-upgrade-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", dir.appendingPathComponent("run").path, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func deviceList(_ vm: String) throws -> [[String: Any]] {
        let r = try runHvctl(["device", vm, "ls", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]], r.stdout)
    }

    func testUpgradeDuringDiskIOAndRollbackOfABinaryThatCannotStart() throws {
        let guest = try Harness.testGuest()
        let image = dir.appendingPathComponent("disk.img").path
        XCTAssertEqual(try runHvctl(["disk", "create", image, "--size", "16M"]).status, 0)
        // "A second build of the same binary": a copy elsewhere, so the binary path really changes.
        let second = dir.appendingPathComponent("hv-scsi-2").path
        try FileManager.default.copyItem(atPath: Harness.productsDirectory.appendingPathComponent("hv-scsi").path, toPath: second)
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=vscsistress count=150", "--disk", image, "--name", "upg"])
        XCTAssertTrue(vm.waitForOutput("vscsi: ready"), vm.stdout + vm.stderr)
        var devices = try deviceList("upg")
        XCTAssertEqual(devices.map { $0["name"] as? String }, ["serial0", "bios", "disk0"])
        XCTAssertEqual(devices.map { $0["kind"] as? String }, ["serial", "bios", "disk"])
        let table = try runHvctl(["device", "upg", "ls"])
        XCTAssertTrue(table.stdout.hasPrefix("DEVICE    KIND    PID"), table.stdout)

        Thread.sleep(forTimeInterval: 0.5)
        let up = try runHvctl(["device", "upg", "upgrade", "disk0", "--binary", second])
        XCTAssertEqual(up.status, 0, up.stderr)
        XCTAssertTrue(up.stdout.hasPrefix("upgraded disk0 to \(second)"), up.stdout)
        devices = try deviceList("upg")
        XCTAssertEqual(devices[2]["binary"] as? String, second)
        XCTAssertEqual(devices[2]["state"] as? String, "running")

        // A binary that exits at once: rolled back to the one that ran, with a one-line reason.
        let bad = try runHvctl(["device", "upg", "upgrade", "disk0", "--binary", "/bin/false"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertEqual(bad.stderr.split(separator: "\n").count, 1, bad.stderr)
        XCTAssertTrue(bad.stderr.contains("upgrade of disk0 to /bin/false failed") && bad.stderr.contains("rolled back to \(second)"), bad.stderr)
        XCTAssertEqual(try deviceList("upg")[2]["binary"] as? String, second)
        // Not an executable file: refused before anything stops.
        let missing = try runHvctl(["device", "upg", "upgrade", "disk0", "--binary", "/nonexistent/hv-scsi"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("is not an executable file; disk0 keeps running \(second)"), missing.stderr)
        let help = try runHvctl(["device", "--help"])
        XCTAssertEqual(help.status, 0)
        XCTAssertTrue(help.stdout.contains("USAGE: hvctl device <name> <action> [<dev>]"), help.stdout)
        let noVerb = try runHvctl(["device", "upg"])
        XCTAssertEqual(noVerb.status, 2, "a usage error")
        let unknown = try runHvctl(["device", "upg", "restart", "disk7"])
        XCTAssertEqual(unknown.status, 1)
        XCTAssertTrue(unknown.stderr.contains("this VM has no device 'disk7'"), unknown.stderr)

        // Through all of it the guest's I/O went on: every request exactly once, every word intact.
        XCTAssertTrue(vm.waitForOutput("vscsistress: done", timeout: 120), vm.stdout.suffix(500) + vm.stderr)
        // The whole line once the VM has ended (the summary may arrive in more than one read).
        XCTAssertEqual(vm.waitForExit(timeout: 30), 0, vm.stderr)
        XCTAssertTrue(vm.stdout.contains("vscsistress: done rounds=150 requests=1200 errors=0 mismatches=0 duplicates=0"), String(vm.stdout.suffix(800)))
    }

    func testRestartRevivesADeviceGivenUpAfterACrashLoop() throws {
        let guest = try Harness.testGuest()
        let vm = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=echo", "--name", "loop"])
        XCTAssertTrue(vm.waitForOutput("echo: ready"), vm.stdout + vm.stderr)
        // Kill serial0 the moment each successor appears, until the core gives up on it.
        let deadline = Date().addingTimeInterval(60)
        var last: pid_t = 0
        while !vm.stderr.contains("giving up") && Date() < deadline {
            if let pid = vm.children(named: "hv-serial").first, pid != last {
                kill(pid, SIGKILL)
                last = pid
            }
            Thread.sleep(forTimeInterval: 0.002)
        }
        XCTAssertTrue(vm.stderr.contains("device serial0") && vm.stderr.contains("giving up"), vm.stderr)
        Thread.sleep(forTimeInterval: 0.2)
        XCTAssertEqual(try deviceList("loop")[0]["state"] as? String, "failed")
        let r = try runHvctl(["device", "loop", "restart", "serial0"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.hasPrefix("restarted serial0 (pid "), r.stdout)
        XCTAssertEqual(try deviceList("loop")[0]["state"] as? String, "running")
        // The console works again: the guest echoes what is typed.
        vm.write("zq")
        XCTAssertTrue(vm.waitForOutput("ZQ"), vm.stdout)
        XCTAssertEqual(try runHvctl(["stop", "loop"]).status, 0)
        XCTAssertEqual(vm.waitForExit(), 0, vm.stderr)
    }
}

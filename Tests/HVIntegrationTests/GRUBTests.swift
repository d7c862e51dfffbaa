import Foundation
import XCTest

/// Acceptance with software no one here wrote: SeaBIOS boots a GRUB ISO (made by grub-mkrescue at
/// test time) from hv's virtio-scsi CD-ROM; GRUB, through SeaBIOS's INT 13h, lists the disks,
/// prints the MD5 of a 2 MiB file on an ext2 disk on hv's virtio-scsi disk — while the disk's and
/// the CD's processes are killed — and halts through hv's ACPI tables, so the VM ends with status 0.
final class GRUBTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    private func run(_ tool: String, _ arguments: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [tool] + arguments
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0 else {
            throw Harness.MissingBuild(description: "\(tool) failed (test.sh installs grub-pc-bin, xorriso, mtools, e2fsprogs): \(text)")
        }
        return text
    }

    /// A fresh directory `name` holding iso/boot/grub/grub.cfg: GRUB on the serial console, no
    /// menu delay, then `commands`.
    private func grubTree(_ name: String, commands: String) throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(getpid())")
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("iso/boot/grub"), withIntermediateDirectories: true)
        try """
            serial --unit=0 --speed=115200
            terminal_input serial
            terminal_output serial
            set timeout=0

            """.appending(commands).write(to: dir.appendingPathComponent("iso/boot/grub/grub.cfg"), atomically: true, encoding: .utf8)
        return dir
    }

    func testSeaBIOSBootsAGRUBISOFromTheCDROMAndGRUBReadsTheDisk() throws {
        let dir = try grubTree("hv-grub", commands: """
            insmod ext2
            insmod hashsum
            echo "hv-grub: started"
            ls
            md5sum (hd0)/big.bin
            echo "hv-grub: done"
            halt

            """)
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("fs"), withIntermediateDirectories: true)
        var bytes = [UInt8](repeating: 0, count: 2 << 20)
        var x: UInt32 = 2024
        for i in bytes.indices { x = x &* 1_664_525 &+ 1_013_904_223; bytes[i] = UInt8(truncatingIfNeeded: x >> 24) }
        let big = dir.appendingPathComponent("fs/big.bin")
        try Data(bytes).write(to: big)
        let md5 = String(try run("md5sum", [big.path]).prefix(32))
        let raw = dir.appendingPathComponent("disk.img").path, iso = dir.appendingPathComponent("grub.iso").path
        _ = try run("mkfs.ext2", ["-q", "-d", dir.appendingPathComponent("fs").path, "-F", raw, "8M"])
        _ = try run("grub-mkrescue", ["-o", iso, dir.appendingPathComponent("iso").path, "--modules=ext2 hashsum"])
        // Issue 16: the disk is a three-level chain: an hv overlay on a QEMU overlay on the raw
        // file system; GRUB's reads fall through both to the raw image.
        let middle = dir.appendingPathComponent("middle.qcow2").path, disk = dir.appendingPathComponent("top.qcow2").path
        _ = try run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw", middle])
        XCTAssertEqual(try runHvctl(["disk", "create", disk, "--format", "qcow2", "--backing", middle]).status, 0)

        // Issue 13: while GRUB reads the disk, its process (and once the CD's) is killed at random
        // moments; every read it had in flight is resubmitted, and the checksum still matches.
        let vm = try VMProcess(["run", "--firmware", "seabios", "--cdrom", iso, "--disk", disk])
        XCTAssertTrue(vm.waitForOutput("hv-grub: started", timeout: 300), vm.stdout.suffix(2000) + vm.stderr)
        var kills: [String] = []
        for victim in ["disk0", "disk0", "cdrom0", "disk0", "disk0"] {
            Thread.sleep(forTimeInterval: Double.random(in: 0.3...1.0))
            guard vm.process.isRunning, !vm.stdout.contains("(hd0)/big.bin"), let pid = vm.children(named: victim).first else { break }
            kill(pid, SIGKILL)
            kills.append(victim)
        }
        let status = vm.waitForExit(timeout: 300)
        let r = (status: status, stdout: vm.stdout, stderr: vm.stderr)
        XCTAssertGreaterThanOrEqual(kills.count, 2, "GRUB finished before the test could kill its disk: \(r.stdout.suffix(500))")
        XCTAssertEqual(r.stderr.components(separatedBy: "restarted (pid").count - 1, kills.count, r.stderr)
        XCTAssertEqual(r.status, 0, "GRUB's halt powers off through the ACPI tables: \(r.stderr)")
        let out = r.stdout.replacingOccurrences(of: "\r", with: "")
        XCTAssertTrue(out.contains("Booting from DVD/CD..."), out.suffix(2000).description)
        XCTAssertTrue(out.contains("hv-grub: started"), out.suffix(2000).description)
        XCTAssertTrue(out.contains("(hd0)"), "GRUB lists the disk: \(out.suffix(2000))")
        XCTAssertTrue(out.contains("\(md5)  (hd0)/big.bin"), "GRUB's MD5 must equal the host's \(md5): \(out.suffix(2000))")
        XCTAssertTrue(out.contains("hv-grub: done"), out.suffix(2000).description)
        XCTAssertFalse(r.stderr.contains("refused"), r.stderr)
        XCTAssertEqual(try run("qemu-img", ["check", disk]).contains("No errors"), true)
    }

    /// SeaBIOS boots GRUB from a qcow2 disk (a hybrid GRUB ISO converted with compression, as
    /// cloud images are shipped).
    func testSeaBIOSBootsGRUBFromACompressedQCOW2Disk() throws {
        let dir = try grubTree("hv-grubq", commands: """
            echo "hv-grub: booted from the disk"
            halt

            """)
        defer { try? FileManager.default.removeItem(at: dir) }
        let iso = dir.appendingPathComponent("grub.iso").path, disk = dir.appendingPathComponent("grub.qcow2").path
        _ = try run("grub-mkrescue", ["-o", iso, dir.appendingPathComponent("iso").path])
        _ = try run("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", iso, disk])
        let vm = try VMProcess(["run", "--firmware", "seabios", "--disk", disk])
        XCTAssertEqual(vm.waitForExit(timeout: 300), 0, vm.stderr)
        let out = vm.stdout.replacingOccurrences(of: "\r", with: "")
        XCTAssertTrue(out.contains("Booting from Hard Disk..."), out.suffix(2000).description)
        XCTAssertTrue(out.contains("hv-grub: booted from the disk"), out.suffix(2000).description)
    }
}

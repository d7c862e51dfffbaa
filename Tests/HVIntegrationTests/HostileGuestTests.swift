import Foundation
import XCTest

/// The hostile-guest suite (issue 20): hv's test guest in `mode=hostile` attacks every device of a
/// fully equipped VM — random port and MMIO reads and writes, PCI config spaces rewritten, BARs
/// moved anywhere, virtqueues with random sizes and descriptor tables, MSI-X entries pointing
/// anywhere, fw_cfg DMA of any length to any address — with a fixed seed, a bounded number of
/// operations per device. Every device may refuse; none may crash, hang or be restarted, and the
/// VM runs to its end. (`bench --only hostile` runs it long with a random seed.)
final class HostileGuestTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    /// The lines that mean a device died, was killed or was given up on, the core forwarded a
    /// request no device may be sent, or the VM itself failed.
    static let failures = ["restarting it", "misbehaved", "giving up", "could not be restarted", "crashed", "KVM internal error",
                           "killed by signal", "hung", "out-of-range register request"]

    private func runHostile(seed: UInt32, count: Int, file: StaticString = #filePath, line: UInt = #line) throws {
        let guest = try Harness.testGuest()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-hostile-\(getpid())-\(seed)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let disk = dir.appendingPathComponent("disk.img").path
        XCTAssertTrue(FileManager.default.createFile(atPath: disk, contents: Data(count: 8 << 20)))
        let iso = dir.appendingPathComponent("cd.iso").path
        var volume = Data(repeating: 0, count: 2048 * 40)
        volume.replaceSubrange(2048 * 16..<(2048 * 16 + 6), with: [1] + Array("CD001".utf8))
        try volume.write(to: URL(fileURLWithPath: iso))
        let pciDevice = Harness.productsDirectory.appendingPathComponent("hv-pci-testdevice").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        let r = try runHvctl(["run", "--memory", "16M", "--multiboot", guest, "--cmdline", "mode=hostile seed=\(seed) count=\(count)",
                              "--disk", disk, "--cdrom", iso, "--nic", "net=hostile-\(getpid())-\(seed)", "--balloon", "on",
                              "--device", "\(pciDevice),profile=\(profile),pci=03.0,bar0=mmio:4096,bar1=pio:16"],
                             timeout: 300, file: file, line: line)
        let output = r.stdout + r.stderr
        XCTAssertEqual(r.status, 0, output, file: file, line: line)
        XCTAssertTrue(r.stdout.contains("hostile: done seed=\(seed)"), output, file: file, line: line)
        // The guest reached every function: the bios's three, the disk adapter, the CD adapter,
        // the balloon, the NIC and the third-party PCI function.
        let functions = r.stdout.split(separator: "\n").filter { $0.contains("hostile: pci 00:") }
        XCTAssertGreaterThanOrEqual(functions.count, 8, output, file: file, line: line)
        XCTAssertTrue(r.stdout.contains("id=11e91234"), "the third-party PCI function was not attacked:\n\(output)", file: file, line: line)
        for failure in Self.failures {
            XCTAssertFalse(output.contains(failure), "'\(failure)' after the hostile guest (seed \(seed)):\n\(output)", file: file, line: line)
        }
    }

    func testNoDeviceCrashesUnderAHostileGuest() throws {
        try runHostile(seed: 1, count: 600)
    }

    func testNoDeviceCrashesUnderAHostileGuestSecondSeed() throws {
        try runHostile(seed: 20_260_612, count: 600)
    }
}

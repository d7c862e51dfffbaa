import Foundation
import XCTest

/// The BIOS device's platform: real firmware (Debian's SeaBIOS) boots to its banner and reports
/// that there is nothing to boot; the RTC gives the guest the host's time.
final class FirmwareTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    func testSeaBIOSBootsToItsBannerAndNoBootableDevice() throws {
        guard FileManager.default.fileExists(atPath: "/usr/share/seabios/bios-256k.bin") else {
            return XCTFail("Debian's seabios package is not installed: test.sh installs it (apt-get install seabios)")
        }
        let console = FileManager.default.temporaryDirectory.appendingPathComponent("hv-seabios-\(getpid()).txt")
        defer { try? FileManager.default.removeItem(at: console) }
        let debug = FileManager.default.temporaryDirectory.appendingPathComponent("hv-seabios-debug-\(getpid()).txt")
        defer { try? FileManager.default.removeItem(at: debug) }
        let vm = try VMProcess(["run", "--firmware", "seabios", "--serial", "file:\(console.path)", "--debugcon", "file:\(debug.path)"])
        let deadline = Date().addingTimeInterval(120)
        var text = ""
        while Date() < deadline && vm.process.isRunning {
            text = (try? String(contentsOf: console, encoding: .utf8)) ?? ""
            if text.contains("No bootable device") { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        kill(vm.process.processIdentifier, SIGTERM)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 128 + SIGTERM, vm.stderr)
        XCTAssertTrue(text.contains("SeaBIOS (version"), "no banner in:\n\(text.suffix(2000))\nstderr: \(vm.stderr)")
        XCTAssertTrue(text.contains("No bootable device"), "no boot failure message in:\n\(text.suffix(2000))")
        XCTAssertFalse(text.contains("Press ESC for boot menu"), "the boot menu must be off unless --boot-menu")
        // SeaBIOS's own log: it ran hv's ACPI table-loader script, found the DSDT (and in it the
        // PS/2 keyboard, which it then initialised through hv's i8042), and moved the PM block
        // where hv decodes it.
        let log = (try? String(contentsOf: debug, encoding: .utf8)) ?? ""
        for line in ["Moving pm_base to 0x600", "ACPI: parse DSDT", "PS2 keyboard initialized"] {
            XCTAssertTrue(log.contains(line), "'\(line)' missing from SeaBIOS's log:\n\(log.suffix(3000))")
        }
        XCTAssertFalse(log.contains("internal error"), log)
    }

    func testGuestReadsTheHostTimeFromTheRTC() throws {
        let guest = try Harness.testGuest()
        let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=rtc"])
        XCTAssertEqual(r.status, 0, r.stderr)
        guard let line = r.stdout.split(separator: "\n").first(where: { $0.hasPrefix("rtc: ") }) else {
            return XCTFail("no rtc line in: \(r.stdout)")
        }
        let formatter = ISO8601DateFormatter()
        guard let guestTime = formatter.date(from: String(line.dropFirst(5))) else {
            return XCTFail("unparsable time in '\(line)'")
        }
        XCTAssertLessThan(abs(guestTime.timeIntervalSinceNow), 3, "guest RTC \(line) vs host \(formatter.string(from: Date()))")
    }

    func testRTCPeriodicInterruptReachesTheGuestOnIRQ8() throws {
        let guest = try Harness.testGuest()
        let start = Date()
        // The guest remaps the PIC, enables the RTC's 64 Hz periodic interrupt and counts 16 of
        // them while halted with interrupts enabled: nothing but the RTC can wake it.
        let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=rtcirq count=16"], timeout: 30)
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("rtcirq: 16 periodic interrupts"), r.stdout + r.stderr)
        // 16 periods of 1/64 s cannot pass in less than 15/64 s: no spurious or early interrupts.
        XCTAssertGreaterThan(elapsed, 15.0 / 64.0)
    }

    func testFirmwareThatIsNotABIOSImageIsRefused() throws {
        let junk = FileManager.default.temporaryDirectory.appendingPathComponent("hv-junk-fw-\(getpid()).bin")
        try Data(repeating: 0x90, count: 1000).write(to: junk)
        defer { try? FileManager.default.removeItem(at: junk) }
        let r = try runHvctl(["run", "--firmware", junk.path])
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("multiple of 64 KiB"), r.stderr)
        let missing = try runHvctl(["run", "--firmware", "/nonexistent/bios.bin"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("cannot open firmware image '/nonexistent/bios.bin'"), missing.stderr)
    }
}

import Foundation
import XCTest

/// The core's PCI bus: config mechanism #1 routed per function, BARs sized from the device's
/// declaration and placed where the guest (or SeaBIOS) programs them. The function under test is
/// hv-pci-testdevice, a third-party-style plugin (1234:11e9) with a 4 KiB memory BAR 0 and a
/// 16-byte I/O BAR 1.
final class PCITests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    private var testDevice: String {
        let exe = Harness.productsDirectory.appendingPathComponent("hv-pci-testdevice").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        return "\(exe),profile=\(profile),pci=03.0,bar0=mmio:4096,bar1=pio:16"
    }

    func testGuestSizesPlacesMovesAndDisablesBARs() throws {
        let guest = try Harness.testGuest()
        let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=pcibar", "--device", testDevice], timeout: 60)
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix("pcibar: ") }
        XCTAssertEqual(lines, [
            "pcibar: 00:0.0 id=12378086 class=60000",      // i440FX, from hv-bios through the core
            "pcibar: 00:1.0 id=70008086 class=60100",      // PIIX3 (00:01.3 is function 3, not scanned)
            "pcibar: 00:3.0 id=11e91234 class=ff0000",     // the plugin's function
            "pcibar: sizing bar0=fffff000 bar1=fffffff1 bar2=0",
            "pcibar: bar0=e0000000 bar1=c101 command=3",
            "pcibar: mmio=deadbeef pio=12345678",
            "pcibar: moved mmio=deadbeef old=ffffffff",
            "pcibar: decode off mmio=ffffffff pio=12345678",
            "pcibar: over ram bar0=100000 ram=0",
            "pcibar: absent=ffffffff",
        ], r.stdout)
        XCTAssertTrue(r.stderr.contains("the guest put BAR 0 of PCI function 00:03.0 at 0x100000 (+4096), which is not free; it is not routed"), r.stderr)
    }

    func testSeaBIOSFindsAndMapsAPluginFunction() throws {
        let debug = FileManager.default.temporaryDirectory.appendingPathComponent("hv-pci-seabios-\(getpid()).txt")
        defer { try? FileManager.default.removeItem(at: debug) }
        let vm = try VMProcess(["run", "--firmware", "seabios", "--serial", "none", "--debugcon", "file:\(debug.path)", "--device", testDevice])
        let deadline = Date().addingTimeInterval(60)
        var log = ""
        while Date() < deadline && vm.process.isRunning {
            log = (try? String(contentsOf: debug, encoding: .utf8)) ?? ""
            if log.contains("No bootable device") || log.contains("Boot failed") { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        kill(vm.process.processIdentifier, SIGTERM)
        XCTAssertEqual(vm.waitForExit(timeout: 30), 128 + SIGTERM, vm.stderr)
        for line in ["Found 4 PCI devices", "PCI: map device bdf=00:03.0  bar 0, addr", "PCI: map device bdf=00:03.0  bar 1, addr",
                     "PCI: init bdf=00:03.0 id=1234:11e9"] {
            XCTAssertTrue(log.contains(line), "'\(line)' missing from SeaBIOS's log:\n\(log.prefix(3000))")
        }
        XCTAssertFalse(vm.stderr.contains("not free"), vm.stderr)
    }

    /// `mode=poke` is the plugin author's probe: the same device exercised from the command line
    /// alone, its BARs placed with pciwrite, then port and MMIO accesses in hex.
    func testAPluginAuthorPokesADeviceFromTheCommandLine() throws {
        let guest = try Harness.testGuest()
        let ops = "pciread:0x18:0,pciwrite:0x18:0x10:0xe0000000,pciwrite:0x18:0x14:0xc100,pciwrite:0x18:4:3,"
            + "writel:0xe0000010:0xcafe,readl:0xe0000010,outl:0xc104:0x1234,inl:0xc104,inb:0x3ff,nonsense"
        let r = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=poke ops=\(ops)", "--device", testDevice], timeout: 60)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout.split(separator: "\n").filter { $0.hasPrefix("poke: ") }, [
            "poke: pciread 0x18:0x0 = 0x11e91234",
            "poke: pciwrite 0x18:0x10 <- 0xe0000000", "poke: pciwrite 0x18:0x14 <- 0xc100", "poke: pciwrite 0x18:0x4 <- 0x3",
            "poke: writel 0xe0000010 <- 0xcafe", "poke: readl 0xe0000010 = 0xcafe",
            "poke: outl 0xc104 <- 0x1234", "poke: inl 0xc104 = 0x1234",
            "poke: inb 0x3ff = 0x0",
            "poke: bad op 'nonsense'", "poke: end",
        ])
    }

    func testBadPCIDeclarationsAreRefused() throws {
        let exe = Harness.productsDirectory.appendingPathComponent("hv-pci-testdevice").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        let cases: [(String, Int32, String)] = [
            ("pci=01.0", 1, "declares PCI function 00:01.0, which bios already has"),
            ("pci=03.0,bar0=mmio:3000", 1, "size 3000 must be a power of two"),
            ("pci=03.0,bar0=pio:4096", 1, "size 4096 must be a power of two from 4 to 256"),
            ("bar0=mmio:4096", 2, "bar0= needs pci=DD.F before it"),
            ("pci=3", 2, "invalid --device pci '3'"),
            ("pci=03.0,bar6=mmio:4096", 2, "invalid --device bar6"),
            // COM1's line, the PIT's, the ACPI SCI's, and one line twice.
            ("pio=0x510:2,irq=4", 2, "device0 wants IRQ 4, which is serial0's; give it a free line (free: 3, 5, 6, 7, 10, 11,"),
            ("pio=0x510:2,irq=0", 2, "device0 wants IRQ 0, which is the PIT's"),
            ("pio=0x510:2,irq=9", 2, "device0 wants IRQ 9, which is the ACPI SCI's"),
            ("pio=0x510:2,irq=5,irq=5", 2, "device0 wants IRQ 5, which is device0's"),
        ]
        for (fields, status, message) in cases {
            let r = try runHvctl(["run", "--device", "\(exe),profile=\(profile),\(fields)"], timeout: 30)
            XCTAssertEqual(r.status, status, "\(fields): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(message), "\(fields): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(fields): one line: \(r.stderr)")
        }
    }
}

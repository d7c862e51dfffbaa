import HVBIOSContract
import HVHost
import HVIPC
import HVNetContract
import HVNetSwitch
import HVSCSIContract
import XCTest

/// The shipped devices' contracts: what the trusted side encodes is what the device decodes, and
/// settings a device was not built for are refused by key.
final class DeviceContractTests: XCTestCase {
    /// What the device sees: HELLO's config text through the SDK's decoder.
    private func handed(_ text: String) -> [String: String] { SettingsText.decode(text) }

    func testSettingsTextCarriesAnyString() {
        let hostile = "console=ttyS0 a=b\nmode=firmware\\n \\ end\\"
        let text = SettingsText.encode([("cmdline", hostile), ("empty", ""), ("k", "=")])
        XCTAssertEqual(text.split(separator: "\n").count, 3, "one line per field, whatever the value holds")
        XCTAssertEqual(handed(text), ["cmdline": hostile, "empty": "", "k": "="])
        // A bare key is present with an empty value; the last of a repeated key wins.
        XCTAssertEqual(handed("flag\nx=1\nx=2"), ["flag": "", "x": "2"])
        // Lines and `=` are bytes, not characters: a value ending in CR does not swallow the next
        // line ("\r\n" is one Character), nor does a combining mark hide an `=`.
        let crlf = SettingsText.encode([("cmdline", "quiet\r"), ("mode", "hello"), ("accent", "\u{301}e"), ("crlf", "a\r\nb")])
        XCTAssertEqual(handed(crlf), ["cmdline": "quiet\r", "mode": "hello", "accent": "\u{301}e", "crlf": "a\r\nb"])
        XCTAssertEqual(handed("k=\u{301}v"), ["k": "\u{301}v"])
    }

    func testBIOSSettingsRoundTrip() throws {
        let settings = BIOSContract.Settings(mode: .linux, cpus: 4, bootMenu: true,
                                             bootOrder: ["/pci@i0cf8/*@d/*@0/*@0,0", "/pci@i0cf8/*@4/*@0/*@0,0"],
                                             commandLine: "console=ttyS0 init=/bin/sh\nsecond line \\ backslash")
        XCTAssertEqual(try BIOSContract.Settings(decoding: handed(settings.encoded)), settings)
        let minimal = BIOSContract.Settings(mode: .firmware)
        XCTAssertEqual(try BIOSContract.Settings(decoding: handed(minimal.encoded)), minimal)
        XCTAssertEqual(try BIOSContract.Settings(decoding: ["mode": "multiboot"]), BIOSContract.Settings(mode: .multiboot))
    }

    func testBIOSRefusesSettingsItWasNotBuiltFor() {
        func problem(_ config: [String: String]) -> String {
            do {
                _ = try BIOSContract.Settings(decoding: config)
                return "accepted"
            } catch { return error.description }
        }
        XCTAssertEqual(problem([:]), "setting 'mode' is missing")
        XCTAssertEqual(problem(["mode": "uefi"]), "setting 'mode' is 'uefi', not one of multiboot, linux, firmware")
        XCTAssertEqual(problem(["mode": "linux", "cpus": "0"]), "setting 'cpus' is '0', not a number from 1 to 255")
        XCTAssertEqual(problem(["mode": "linux", "cpus": "two"]), "setting 'cpus' is 'two', not a number from 1 to 255")
        XCTAssertEqual(problem(["mode": "linux", "boot_menu": "yes"]), "setting 'boot_menu' is 'yes', not 0 or 1")
    }

    func testBIOSWindowsAreThePCPlatformsAndDoNotOverlap() {
        XCTAssertEqual(BIOSContract.resources.count, BIOSContract.Window.allCases.count)
        XCTAssertEqual(BIOSContract.Window.cmosRTC.resource, Resource(kind: .pio, base: 0x70, length: 2))
        XCTAssertEqual(BIOSContract.Window.firmwareConfig.resource, Resource(kind: .pio, base: 0x510, length: 2))
        XCTAssertEqual(BIOSContract.Window.powerManagementConfig.resource, Resource(kind: .pciConfig, base: 0x0B, length: 256))
        for (i, a) in BIOSContract.resources.enumerated() {
            for b in BIOSContract.resources[(i + 1)...] where a.kind == b.kind {
                // A PCI configuration window's base is a function number; a port window's, a range.
                if a.kind == .pciConfig {
                    XCTAssertNotEqual(a.base, b.base)
                } else {
                    XCTAssertTrue(a.base + a.length <= b.base || b.base + b.length <= a.base, "\(a) overlaps \(b)")
                }
            }
        }
        XCTAssertEqual(BIOSContract.interruptGSIs, [8, 1])
    }

    func testSCSISettingsRoundTripAndBounds() throws {
        let disk = SCSIContract.Settings(kind: .disk, readOnly: true, serial: "hv-disk3", ioThreads: 0)
        XCTAssertEqual(try SCSIContract.Settings(decoding: handed(disk.encoded)), disk)
        let cd = SCSIContract.Settings(kind: .cdrom)
        XCTAssertEqual(try SCSIContract.Settings(decoding: handed(cd.encoded)), cd)
        // A plugin-style config with nothing in it is a writable disk with the defaults.
        XCTAssertEqual(try SCSIContract.Settings(decoding: [:]), SCSIContract.Settings(kind: .disk))
        XCTAssertThrowsError(try SCSIContract.Settings(decoding: ["io_threads": "9"]))
        XCTAssertThrowsError(try SCSIContract.Settings(decoding: ["kind": "tape"]))
        XCTAssertThrowsError(try SCSIContract.Settings(decoding: ["serial": String(repeating: "x", count: 65)]))
    }

    func testNetSettingsRoundTripAndBadMAC() throws {
        let nic = NetContract.Settings(backend: .segment, mac: MACAddress(bytes: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]))
        XCTAssertEqual(nic.encoded, "backend=segment\nmac=52:54:00:12:34:56")
        XCTAssertEqual(try NetContract.Settings(decoding: handed(nic.encoded)), nic)
        XCTAssertThrowsError(try NetContract.Settings(decoding: ["backend": "tap"]))
        do {
            _ = try NetContract.Settings(decoding: ["backend": "tap", "mac": "52:54:00"])
            XCTFail("a short MAC was accepted")
        } catch {
            XCTAssertEqual(error.key, "mac")
        }
        // Every host file slot is distinct: a tap and a segment port never share an index.
        XCTAssertEqual(Set(NetContract.HostFile.allCases.map(\.rawValue)).count, NetContract.HostFile.allCases.count)
    }

    func testConsoleEscapeKeys() {
        var attached = ConsoleEscape(allowsDetach: true)
        XCTAssertEqual(attached.filter(Array("ab".utf8)).forward, Array("ab".utf8))
        let detach = attached.filter([0x01, UInt8(ascii: "d"), UInt8(ascii: "z")])
        XCTAssertEqual(detach.action, .detach)
        XCTAssertEqual(detach.forward, [])
        // Ctrl-A Ctrl-A is one Ctrl-A; Ctrl-A and another key send both; the escape may span reads.
        XCTAssertEqual(attached.filter([0x01, 0x01, 0x01, UInt8(ascii: "q")]).forward, [0x01, 0x01, UInt8(ascii: "q")])
        XCTAssertNil(attached.filter([UInt8(ascii: "k"), 0x01]).action)
        XCTAssertEqual(attached.filter([UInt8(ascii: "X")]).action, .quit)

        // `hvctl run` on a terminal has nothing to detach from: Ctrl-A d goes to the guest.
        var foreground = ConsoleEscape(allowsDetach: false)
        let typed = foreground.filter([0x01, UInt8(ascii: "d"), 0x01, UInt8(ascii: "D")])
        XCTAssertNil(typed.action)
        XCTAssertEqual(typed.forward, [0x01, UInt8(ascii: "d"), 0x01, UInt8(ascii: "D")])
        XCTAssertEqual(foreground.filter([0x01, UInt8(ascii: "x")]).action, .quit)
    }
}

import Foundation
import HVCore
import HVHost
import HVIPC
import HVSandbox
import XCTest

/// Plugin manifests: a good one becomes the device it describes (resources, settings typed and
/// defaulted, overrides from the command line), every bad one is one line naming its field; and
/// the shipped sandbox profiles, built on base-device, flatten to what the jail applies.
final class PluginManifestTests: XCTestCase {
    private static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    override func setUp() {
        setenv("HV_PROFILE_DIR", Self.repository.appendingPathComponent("sandbox-profiles").path, 1)
    }

    override func tearDown() {
        // The tests of other targets share this process and start hvctl, which reads it.
        unsetenv("HV_PROFILE_DIR")
    }

    private static let good = #"""
        {
          "manifest": 1,
          "name": "port-counter",
          "description": "counts",
          "executable": "counter.py",
          "interpreter": {"path": "/usr/bin/python3", "arguments": ["-S", "-B"], "read_only_paths": ["/usr/lib/python3.*"]},
          "files": ["hvdevice.py"],
          "profile": "counter.profile.json",
          "resources": {"pio": [{"base": "0x530", "length": 4}], "irqs": [5],
                        "pci": {"slot": "06.0", "bars": [{"index": 0, "type": "mmio", "size": 4096}]}},
          "settings": {
            "start": {"type": "integer", "default": 7, "minimum": 0, "maximum": 65535, "description": "first value"},
            "mode": {"type": "string", "default": "up", "choices": ["up", "down"]},
            "loud": {"type": "boolean", "default": false},
            "label": {"type": "string"}
          }
        }
        """#

    private func parse(_ text: String) throws -> PluginManifest {
        try PluginManifest.parse(Array(text.utf8), source: "/plugins/counter/manifest.json")
    }

    func testAGoodManifestDescribesTheDevice() throws {
        let m = try parse(Self.good)
        XCTAssertEqual(m.name, "port-counter")
        XCTAssertEqual(m.executable, "/plugins/counter/counter.py")
        XCTAssertEqual(m.files, ["/plugins/counter/hvdevice.py"])
        XCTAssertEqual(m.profile, "/plugins/counter/counter.profile.json")
        XCTAssertEqual(m.interpreter?.arguments, ["-S", "-B"])
        XCTAssertEqual(m.resources.pio, [.init(base: 0x530, length: 4)])
        XCTAssertEqual(m.resources.irqs, [5])
        XCTAssertEqual(m.resources.pci?.bdf, 6 << 3)
        XCTAssertEqual(m.settings.map(\.name), ["start", "mode", "loud", "label"])

        let values = try m.settingValues([("label", "a b"), ("loud", "on"), ("start", "0x10")])
        XCTAssertEqual(values.map { "\($0.key)=\($0.value)" }, ["start=16", "mode=up", "loud=true", "label=a b"])

        // The device, unsandboxed (nothing on disk is needed for that but the files beside the script).
        let spec = try m.device(["label=x", "irq=9", "pci=07.0", "name=counter2"], index: 3, jail: .unsandboxed)
        XCTAssertEqual(spec.name, "counter2")
        XCTAssertEqual(spec.executable, "/usr/bin/python3")
        XCTAssertEqual(spec.arguments, ["-S", "-B"])
        XCTAssertEqual(spec.script, "/plugins/counter/counter.py")
        XCTAssertEqual(spec.commandLine(script: spec.script), ["/usr/bin/python3", "-S", "-B", "/plugins/counter/counter.py", "counter2"])
        XCTAssertEqual(spec.interruptGSIs, [9])
        XCTAssertEqual(spec.resources.map(\.kind), [.pio, .pciConfig, .pciMMIOBar])
        XCTAssertEqual(spec.resources[1].base, 7 << 3)
        XCTAssertEqual(spec.resources[2].base, UInt64(7 << 3) << 8 | 0)
        XCTAssertEqual(SettingsText.decode(spec.config), ["start": "7", "mode": "up", "loud": "false", "label": "x"])
        XCTAssertNil(spec.sandbox)
        XCTAssertEqual(try m.device(["label=x"], index: 2, jail: .unsandboxed).name, "port-counter2")
    }

    func testBadSettingsOnTheCommandLineAreOneLineEach() throws {
        let m = try parse(Self.good)
        let cases: [([String], String)] = [
            ([], "plugin port-counter needs label=… (string)"),
            (["label=x", "colour=red"], "plugin port-counter has no setting 'colour': it takes start, mode, loud, label"),
            (["label=x", "start=70000"], "setting start='70000': use an integer from 0 to 65535"),
            (["label=x", "start=ten"], "setting start='ten': use an integer (decimal or 0x hex)"),
            (["label=x", "mode=sideways"], "setting mode='sideways': use one of up, down"),
            (["label=x", "loud=maybe"], "setting loud='maybe': use true or false"),
            (["label=x", "irq=24"], "invalid --device irq '24': use 0 to 23"),
            (["label=x", "pci=00.0"], "invalid --device pci '00.0'"),
            (["label=x", "pio=0xffff:2"], "invalid --device pio '0xffff:2'"),
            (["label=x", "profile=/etc/x.json"], "profile comes from the manifest"),
            (["label=x", "name=Bad_Name"], "invalid --device name 'Bad_Name'"),
            (["label"], "invalid --device field 'label' for plugin port-counter: use KEY=VALUE"),
        ]
        for (fields, expected) in cases {
            XCTAssertThrowsError(try m.device(fields, index: 0, jail: .unsandboxed), "\(fields)") { error in
                let message = (error as? UsageError)?.message ?? "\(error)"
                XCTAssertTrue(message.contains(expected), "\(fields): \(message)")
                XCTAssertFalse(message.contains("\n"))
            }
        }
    }

    /// A table of bad manifests: each refused in one line naming the field.
    func testBadManifestsNameTheField() throws {
        func replacing(_ old: String, _ new: String) -> String {
            precondition(Self.good.contains(old), old)
            return Self.good.replacingOccurrences(of: old, with: new)
        }
        let cases: [(String, String)] = [
            ("{", "not JSON"),
            ("[]", ": expected an object"),
            (replacing(#""manifest": 1"#, #""manifest": 2"#), "manifest: format version 2 is not one this hv reads (it reads 1)"),
            (replacing(#""manifest": 1,"#, ""), "manifest: required"),
            (replacing(#""name": "port-counter""#, #""name": "Port Counter""#), "name: 'Port Counter' must be 1 to 32 of a-z, 0-9 and -"),
            (replacing(#""description": "counts","#, #""description": "counts", "colour": 1,"#), "colour: unknown key"),
            (replacing(#""executable": "counter.py""#, #""executable": """#), "executable: is empty"),
            (replacing(#""executable": "counter.py","#, ""), "executable: required"),
            (replacing(#""path": "/usr/bin/python3""#, #""path": "python3""#), "interpreter.path: 'python3' must be absolute"),
            (replacing(#""read_only_paths": ["/usr/lib/python3.*"]"#, #""read_only_paths": ["/usr/../etc"]"#), "interpreter.read_only_paths[0]"),
            (replacing(#""read_only_paths": ["/usr/lib/python3.*"]"#, #""read_only_paths": ["/"]"#), "interpreter.read_only_paths[0]"),
            (replacing(#""files": ["hvdevice.py"]"#, #""files": ["lib/counter.py"]"#), "files: two files are named 'counter.py'"),
            (replacing(#""files": ["hvdevice.py"]"#, #""files": ["sub/.."]"#), "files[0]: 'sub/..' does not name a file"),
            (replacing(#""profile": "counter.profile.json","#, ""), "profile: required"),
            (replacing(#""base": "0x530", "length": 4"#, #""base": "0xfffe", "length": 4"#), "resources.pio[0]: must be 1 or more ports inside the 64 KiB port space"),
            (replacing(#""base": "0x530", "length": 4"#, #""base": "0x530", "length": 0"#), "resources.pio[0]: must be 1 or more ports"),
            (replacing(#""base": "0x530", "length": 4"#, #""base": -1, "length": 4"#), "resources.pio[0].base: expected a non-negative integer"),
            (replacing(#""base": "0x530", "length": 4"#, #""base": "0x530", "len": 4"#), "resources.pio[0].len: unknown key"),
            (replacing(#""irqs": [5]"#, #""irqs": [5, 5]"#), "resources.irqs[1]: IRQ 5 is listed twice"),
            (replacing(#""irqs": [5]"#, #""irqs": [24]"#), "resources.irqs[0]: 24 is more than 23"),
            (replacing(#""irqs": [5]"#, #""irqs": [5], "mmio": [{"base": 4096, "length": 4096}]"#), "resources.mmio[0]: must lie inside [0xc0000000, 0xfec00000)"),
            (replacing(#""irqs": [5]"#, #""irqs": [5], "mmio": [{"base": "0xfebff000", "length": 8192}]"#), "resources.mmio[0]: must lie inside"),
            (replacing(#""irqs": [5]"#, #""irqs": [5], "guest_memory": "yes""#), "resources.guest_memory: expected true or false"),
            (replacing(#""slot": "06.0""#, #""slot": "20.0""#), "resources.pci.slot: '20.0' must be DEVICE.FUNCTION"),
            (replacing(#""slot": "06.0""#, #""slot": "06.8""#), "resources.pci.slot"),
            (replacing(#""size": 4096"#, #""size": 4000"#), "resources.pci.bars[0].size: a mmio BAR is a power of two from 16 to 1073741824 bytes"),
            (replacing(#""index": 0, "type": "mmio""#, #""index": 6, "type": "mmio""#), "resources.pci.bars[0].index: 6 is more than 5"),
            (replacing(#""type": "mmio""#, #""type": "rom""#), "resources.pci.bars[0].type: use mmio or pio"),
            (replacing(#"{"index": 0, "type": "mmio", "size": 4096}"#, #"{"index": 0, "type": "mmio", "size": 4096}, {"index": 0, "type": "pio", "size": 16}"#),
             "resources.pci.bars[1].index: BAR 0 is declared twice"),
            (replacing(#""type": "integer", "default": 7"#, #""type": "float", "default": 7"#), "settings.start.type: use string, integer or boolean"),
            (replacing(#""type": "integer", "default": 7"#, #""type": "integer", "default": "7""#), "settings.start.default: expected an integer"),
            (replacing(#""default": 7, "minimum": 0"#, #""default": 7, "minimum": 9"#), "settings.start.default: use an integer from 9 to 65535"),
            (replacing(#""minimum": 0, "maximum": 65535"#, #""minimum": 10, "maximum": 1"#), "settings.start: minimum 10 is above maximum 1"),
            (replacing(#""default": "up", "choices": ["up", "down"]"#, #""default": "left", "choices": ["up", "down"]"#), "settings.mode.default: use one of up, down"),
            (replacing(#""loud": {"type": "boolean", "default": false}"#, #""loud": {"type": "boolean", "choices": ["x"]}"#), "settings.loud.choices: only a string setting has choices"),
            (replacing(#""loud": {"type": "boolean", "default": false}"#, #""irq": {"type": "integer"}"#), "settings.irq: 'irq' is --device's own key"),
            (replacing(#""loud": {"type": "boolean", "default": false}"#, #""Loud": {"type": "boolean"}"#), "settings.Loud: a setting's name is a-z, 0-9, _ and -"),
            (replacing(#""loud": {"type": "boolean", "default": false}"#, #""loud": {"type": "boolean", "unit": "x"}"#), "settings.loud.unit: unknown key"),
        ]
        for (text, expected) in cases {
            XCTAssertThrowsError(try parse(text), expected) { error in
                let message = (error as? UsageError)?.message ?? "\(error)"
                XCTAssertTrue(message.hasPrefix("plugin manifest /plugins/counter/manifest.json: "), message)
                XCTAssertTrue(message.contains(expected), "expected '\(expected)' in: \(message)")
                XCTAssertFalse(message.contains("\n"), message)
            }
        }
        // A native plugin brings no files (hv opens its binary).
        let native = Self.good.replacingOccurrences(of: #""interpreter": {"path": "/usr/bin/python3", "arguments": ["-S", "-B"], "read_only_paths": ["/usr/lib/python3.*"]},"#, with: "")
        XCTAssertThrowsError(try parse(native)) { error in
            XCTAssertTrue((error as? UsageError)?.message.contains("files: only an interpreted plugin") == true, "\(error)")
        }
    }

    /// Files named by a manifest are checked when it is loaded from disk.
    func testMissingFilesAreNamed() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-manifest-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("manifest.json").path
        try Self.good.write(toFile: path, atomically: true, encoding: .utf8)
        func loadError() -> String {
            do { _ = try PluginManifest.load(path); return "" } catch { return error.message }
        }
        XCTAssertTrue(loadError().contains("executable '\(dir.path)/counter.py' is not a readable file"), loadError())
        try "pass\n".write(to: dir.appendingPathComponent("counter.py"), atomically: true, encoding: .utf8)
        XCTAssertTrue(loadError().contains("files '\(dir.path)/hvdevice.py' is not a readable file"), loadError())
        try "pass\n".write(to: dir.appendingPathComponent("hvdevice.py"), atomically: true, encoding: .utf8)
        XCTAssertTrue(loadError().contains("profile '\(dir.path)/counter.profile.json' is not a file"), loadError())
        try #"{"profile": "counter", "version": 1, "include": ["base-device"]}"#.write(to: dir.appendingPathComponent("counter.profile.json"), atomically: true, encoding: .utf8)
        XCTAssertEqual(loadError(), "")
        XCTAssertThrowsError(try PluginManifest.load(dir.appendingPathComponent("nothing.json").path)) { error in
            XCTAssertTrue((error as? UsageError)?.message.hasPrefix("cannot read plugin manifest '\(dir.path)/nothing.json'") == true, "\(error)")
        }
    }

    /// Every shipped profile, built on base-device, flattens to JSON that loads back to itself:
    /// what the jail applies is what `hvctl sandbox show` prints.
    func testShippedProfilesRoundTripThroughTheirFlatForm() throws {
        let dir = Self.repository.appendingPathComponent("sandbox-profiles")
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".json") }
        XCTAssertGreaterThanOrEqual(names.count, 7)
        for name in names {
            let profile = try DeviceCatalog.loadProfile(dir.appendingPathComponent(name).path)
            if name != "base-device.json" { XCTAssertEqual(profile.includes, ["base-device"], name) }
            let flat = try SandboxProfile.load(json: Array(profile.jsonText().utf8), source: "flat " + name, resolveSyscall: DeviceCatalog.resolveSyscall)
            var expected = profile
            expected.includes = []
            XCTAssertEqual(flat, expected, name)
        }
        // A base that includes itself, or one that is missing, is one line naming it.
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("hv-profiles-\(getpid())")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        try #"{"profile": "loop", "version": 1, "include": ["loop"]}"#.write(to: tmp.appendingPathComponent("loop.json"), atomically: true, encoding: .utf8)
        try #"{"profile": "serial", "version": 1}"#.write(to: tmp.appendingPathComponent("serial.json"), atomically: true, encoding: .utf8)
        setenv("HV_PROFILE_DIR", tmp.path, 1)
        XCTAssertThrowsError(try DeviceCatalog.loadProfile(tmp.appendingPathComponent("loop.json").path)) { error in
            XCTAssertTrue("\(error)".contains("includes itself through loop → loop") || (error as? UsageError)?.message.contains("includes itself through loop → loop") == true, "\(error)")
        }
        try #"{"profile": "p", "version": 1, "include": ["base-gpu"]}"#.write(to: tmp.appendingPathComponent("p.json"), atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try DeviceCatalog.loadProfile(tmp.appendingPathComponent("p.json").path)) { error in
            let message = (error as? UsageError)?.message ?? ""
            XCTAssertTrue(message.contains("base profile \"base-gpu\"") && message.contains("base-gpu.json"), message)
        }
    }
}

import ArgumentParser
import HVCore
import HVHost
import HVIPC
import HVSandbox

extension HVCtl {
    struct Plugin: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "plugin",
            abstract: "Device plugins described by a manifest (docs/plugin-manifest.md).",
            subcommands: [Validate.self, Info.self])

        struct Validate: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "validate",
                abstract: "Check a plugin manifest, its files and its sandbox profile, and that it fits the VM it would join; one line naming the field or the conflict on a problem.",
                discussion: """
                    The plugin's ports, MMIO ranges, PCI function and IRQ lines are checked against the devices hv puts on \
                    every board (serial0, bios), or, with --config, against every device of that VM definition (its disks, \
                    CD-ROM, NICs, balloon and other plugins, which the plugin joins last). KEY=VALUE arguments are taken as \
                    'hvctl run --device MANIFEST,KEY=VALUE…' takes them.
                    """)
            @Argument(help: ArgumentHelp("The manifest.", valueName: "manifest.json")) var manifest: String
            @Argument(help: ArgumentHelp("Settings and overrides as --device takes them.", valueName: "key=value")) var fields: [String] = []
            @Option(help: ArgumentHelp("A VM definition (as 'hvctl run --config' takes) to check the plugin against.", valueName: "file.json"))
            var config: String?

            func run() throws {
                let m = try PluginManifest.load(manifest)
                var definition = VMDefinition()
                if let config {
                    do { definition = try VMDefinition.load(config) } catch let error as VMDefinition.LoadError { fail(error.message) }
                }
                let spec = try m.device(fields, index: definition.devices.count, jail: .preview)
                let others = try checkPlugin(spec, fitsInto: definition).joined(separator: ", ")
                let profile = spec.sandbox?.profile
                print("\(manifest): valid: plugin \(m.name), profile '\(profile?.name ?? "?")' "
                      + "(\(profile?.steadyStateSyscallCount ?? 0) syscalls after lock-down), "
                      + "\(m.settings.count) setting\(m.settings.count == 1 ? "" : "s"); no conflict with \(others)\(config.map { " (\($0))" } ?? "")")
            }
        }

        struct Info: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "info",
                abstract: "Print what a plugin would get: its command, jail, ports, MMIO, PCI function, IRQ lines and settings.",
                discussion: """
                    KEY=VALUE arguments are taken as 'hvctl run --device MANIFEST,KEY=VALUE…' takes them: \
                    settings, and name=, irq=, pio=, pci= overriding the manifest's resources.
                    """)
            @Argument(help: ArgumentHelp("The manifest.", valueName: "manifest.json")) var manifest: String
            @Argument(help: ArgumentHelp("Settings and overrides as --device takes them.", valueName: "key=value")) var fields: [String] = []
            @Flag(help: "Print JSON.") var json = false

            func run() throws {
                let m = try PluginManifest.load(manifest)
                let spec = try m.device(fields, index: 0, jail: .preview)
                let settings = SettingsText.decode(spec.config)
                let plan = spec.sandbox
                let command = spec.commandLine(script: spec.script)
                let copied = (spec.script.map { [$0] } ?? []) + (plan?.pluginFiles ?? [])
                let ranges = spec.resources.filter { $0.kind == .pio || $0.kind == .mmio }
                let pci = m.resources.pci.map { _ in spec.resources.first { $0.kind == .pciConfig }.map { UInt16($0.base) } } ?? nil
                let bars = spec.resources.filter { $0.kind == .pciMMIOBar || $0.kind == .pciPIOBar }
                func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
                func slot(_ bdf: UInt16) -> String {
                    let d = String(bdf >> 3, radix: 16)
                    return "00:\(d.count < 2 ? "0" + d : d).\(bdf & 7)"
                }
                if json {
                    var out = "{\"name\": \(jsonString(m.name)), \"instance\": \(jsonString(spec.name)), \"manifest\": \(jsonString(manifest)), "
                    out += "\"description\": \(jsonString(m.description)), \"command\": [\(command.map(jsonString).joined(separator: ", "))], "
                    out += "\"interpreted\": \(m.interpreter != nil), \"profile\": \(jsonString(m.profile)), "
                    out += "\"profile_name\": \(jsonString(plan?.profile.name ?? "")), "
                    out += "\"resources\": [" + ranges.map { "{\"kind\": \"\($0.kind == .pio ? "pio" : "mmio")\", \"base\": \($0.base), \"length\": \($0.length)}" }.joined(separator: ", ") + "], "
                    out += "\"pci\": " + (pci.map { "{\"slot\": \(jsonString(slot($0))), \"bars\": [" + bars.map { "{\"index\": \($0.base & 0xff), \"type\": \"\($0.kind == .pciMMIOBar ? "mmio" : "pio")\", \"size\": \($0.length)}" }.joined(separator: ", ") + "]}" } ?? "null") + ", "
                    out += "\"irqs\": [\(spec.interruptGSIs.map(String.init).joined(separator: ", "))], \"guest_memory\": \(spec.mapsGuestMemory), "
                    out += "\"settings\": [" + m.settings.map { s in
                        "{\"name\": \(jsonString(s.name)), \"type\": \"\(s.kind.rawValue)\", \"value\": \(jsonString(settings[s.name] ?? "")), "
                            + "\"default\": \(s.defaultValue.map(jsonString) ?? "null"), \"description\": \(jsonString(s.description))}"
                    }.joined(separator: ", ") + "], "
                    out += "\"read_only_paths\": [\((plan?.exposedPaths ?? []).map(jsonString).joined(separator: ", "))], "
                    out += "\"plugin_files\": [\((plan == nil ? [] : copied).map(jsonString).joined(separator: ", "))]}"
                    print(out)
                    return
                }
                var lines = ["plugin \(m.name) (manifest format \(PluginManifest.formatVersion))\(m.description.isEmpty ? "" : ": " + m.description)",
                             "instance: \(spec.name)",
                             "runs: \(command.joined(separator: " "))" + (m.interpreter == nil ? "" : "  (interpreted)")]
                if let plan {
                    lines.append("profile: \(m.profile) ('\(plan.profile.name)': \(plan.profile.startupSyscallCount) syscalls during start-up, \(plan.profile.steadyStateSyscallCount) after lock-down; 'hvctl sandbox show \(m.profile)' lists them)")
                    lines.append("jail root: read-only \(plan.exposedPaths.joined(separator: ", "))")
                    if !copied.isEmpty {
                        lines.append("copied into \(SandboxPlan.pluginDirectory)/: " + copied.joined(separator: ", "))
                    }
                }
                for r in ranges {
                    lines.append("\(r.kind == .pio ? "ports" : "mmio"): \(hex(r.base))-\(hex(r.base + r.length - 1)) (\(r.length) bytes)")
                }
                if let pci {
                    lines.append("pci: \(slot(pci))" + bars.map { ", BAR\($0.base & 0xff) \($0.kind == .pciMMIOBar ? "mmio" : "pio") \($0.length) bytes" }.joined())
                }
                for (i, irq) in spec.interruptGSIs.enumerated() { lines.append("irq: \(irq) (the device's interrupt line \(i))") }
                lines.append("guest memory: \(spec.mapsGuestMemory ? "mapped (read and write)" : "not mapped")")
                if m.settings.isEmpty { lines.append("settings: none") }
                for s in m.settings {
                    var line = "setting \(s.name) = \(settings[s.name] ?? "?")  (\(s.kind.rawValue)"
                    if let d = s.defaultValue { line += ", default \(d)" } else { line += ", required" }
                    if s.minimum != nil || s.maximum != nil { line += ", \(s.minimum.map(String.init) ?? "…") to \(s.maximum.map(String.init) ?? "…")" }
                    if !s.choices.isEmpty { line += ", one of \(s.choices.joined(separator: "|"))" }
                    line += ")" + (s.description.isEmpty ? "" : " " + s.description)
                    lines.append(line)
                }
                print(lines.joined(separator: "\n"))
            }
        }
    }
}

import ArgumentParser
import HVHost
import HVIPC
import HVSandbox

extension HVCtl {
    struct Sandbox: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "sandbox", abstract: "Device sandboxes.", subcommands: [Show.self])

        struct Show: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "show",
                abstract: "Print the effective sandbox of a device: its syscalls, namespaces, ids, root and descriptors.")
            @Argument(help: ArgumentHelp("serial, bios, scsi, net, switch, or a profile's path (*.json).", valueName: "device"))
            var device: String
            @Option(help: ArgumentHelp("The tenant whose ids to show.", valueName: "name")) var tenant = "default"

            func run() throws {
                let path: String
                if device.hasSuffix(".json") {
                    path = device
                } else if DeviceCatalog.builtIn.contains(where: { $0.name == device }) {
                    path = try DeviceCatalog.builtInProfilePath(device)
                } else {
                    throw UsageError(message: "unknown device '\(device)': use one of \(DeviceCatalog.builtIn.map(\.name).joined(separator: ", ")), or a profile path")
                }
                // Shown, not registered: a tenant gets its uid when its first VM runs.
                let registered = try TenantRegistry.host.registeredUID(tenant)
                let plan = try DeviceCatalog.plan(profilePath: path, outsideID: registered ?? 0)
                let ids = registered.map { "uid \($0) / gid \($0)" } ?? "a uid / gid of its own (assigned when its first VM runs)"
                // The segment switch is not a VM's device: its tenant is its segment's, and it gets a socket, not HELLO.
                let isSwitch = device == "switch"
                print(plan.profile.render(header: [
                    "profile file: \(path)",
                    "runs as: uid 0 / gid 0 inside its own user namespace = \(ids) on the host (tenant '\(tenant)'); no other id is mapped"
                        + (isSwitch ? "; a segment NAME's switch runs as tenant 'segment:NAME', which no VM's --tenant can name (see its uid with --tenant segment:NAME)" : ""),
                    "capabilities: none (bounding, inheritable, permitted, effective and ambient sets emptied; SECBIT_NOROOT locked); no_new_privs; non-dumpable",
                    "root: empty read-only tmpfs with only these read-only binds: \(plan.exposedPaths.joined(separator: ", ")) (the \(isSwitch ? "switch" : "device") runs from a descriptor the core opened)",
                    isSwitch ? "descriptors: only the segment's listening socket (fd 3), bound by the VM that started it, and what each joining VM sends (its port)"
                        : "descriptors: only those the core hands over (control, events, and what HELLO carries)",
                ]))
            }
        }
    }
}

// Reading the segment switches' JSON answers (hand-written JSON: the switch is a device-side
// process without Foundation).

func render(_ v: JSONValue) -> String {
    switch v {
    case .string(let s): return jsonString(s)
    case .number(let n): return n.literal
    case .bool(let b): return b ? "true" : "false"
    case .null: return "null"
    case .array(let a): return "[" + a.map(render).joined(separator: ", ") + "]"
    case .object(let o): return "{" + o.members.map { "\(jsonString($0.key)): \(render($0.value))" }.joined(separator: ", ") + "}"
    }
}

func number(_ o: JSONObject, _ key: String) -> UInt64 {
    if case .number(let n)? = o[key] { return n.uint64Value ?? 0 }
    return 0
}

func text(_ o: JSONObject, _ key: String) -> String {
    if case .string(let s)? = o[key] { return s }
    return "?"
}

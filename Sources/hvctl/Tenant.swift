import ArgumentParser
import HVHost
import HVIPC

extension HVCtl {
    struct Tenant: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "tenant",
            abstract: "The tenants this host runs devices for, each with a uid/gid of its own.",
            discussion: """
                A tenant is registered, with a fresh uid/gid, the first time a VM runs with --tenant \
                NAME; a VM run without --tenant gets a tenant of its own ('vm:PID') for as long as it \
                runs. The registry is $HV_STATE_DIR/tenants (default /var/lib/hv/tenants).
                """,
            subcommands: [LS.self, RM.self])

        struct LS: ParsableCommand {
            static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the registered tenants, their uids, VMs and segments.")
            @Flag(help: "Print JSON.") var json = false

            func run() throws {
                let entries = try TenantRegistry.host.entries()
                let usage = TenantUsage.now()
                if json {
                    let items = entries.map { e in
                        "{\"name\": \(jsonString(e.name)), \"uid\": \(e.uid), \"gid\": \(e.uid), \"leased_by_pid\": \(e.holder.map { "\($0.pid)" } ?? "null"), "
                            + "\"vms\": [\(usage.vms(of: e).map(jsonString).joined(separator: ", "))], "
                            + "\"segments\": [\(usage.segments(of: e).map(jsonString).joined(separator: ", "))]}"
                    }
                    print("[" + items.joined(separator: ", ") + "]")
                    return
                }
                if entries.isEmpty {
                    print("no tenants registered (\(TenantRegistry.host.path))")
                    return
                }
                print(pad("TENANT", 24) + pad("UID/GID", 10) + pad("VMS", 30) + "SEGMENTS")
                for e in entries {
                    let vms = usage.vms(of: e), segments = usage.segments(of: e)
                    print(pad(e.name, 24) + pad("\(e.uid)", 10) + pad(vms.isEmpty ? "-" : vms.joined(separator: ","), 30)
                          + (segments.isEmpty ? "-" : segments.joined(separator: ",")))
                }
            }
        }

        struct RM: ParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "rm", abstract: "Forget a tenant that has no VM or segment now; its uid is not reused until the rest of the range has been.")
            @Argument(help: ArgumentHelp("The tenant's name (see 'hvctl tenant ls').", valueName: "name")) var name: String

            func run() throws {
                let registry = TenantRegistry.host
                guard let entry = try registry.entries().first(where: { $0.name == name }) else {
                    throw UsageError(message: "no tenant '\(name)' is registered ('hvctl tenant ls' lists them)")
                }
                let usage = TenantUsage.now()
                if entry.holder != nil {
                    throw UsageError(message: "tenant '\(name)' is VM process \(entry.holder!.pid)'s own; it goes when that VM stops")
                }
                let vms = usage.vms(of: entry), segments = usage.segments(of: entry)
                guard vms.isEmpty && segments.isEmpty else {
                    throw UsageError(message: "tenant '\(name)' still has " + (vms.isEmpty ? "" : "VMs \(vms.joined(separator: ", "))")
                                     + (vms.isEmpty || segments.isEmpty ? "" : " and ") + (segments.isEmpty ? "" : "segments \(segments.joined(separator: ", "))")
                                     + "; stop them first")
                }
                _ = try registry.remove(name)
                print("tenant '\(name)' (uid \(entry.uid)) removed")
            }
        }
    }
}

/// Which running VMs and segments each tenant has now.
struct TenantUsage {
    /// VM name and its tenant, as each VM's control socket reports it.
    var vmTenants: [(vm: String, tenant: String)]
    /// Segment name and its owner (nil: the host's).
    var segmentOwners: [(segment: String, owner: String?)]

    static func now() -> TenantUsage {
        var vms: [(String, String)] = []
        for name in runningVMNames() {
            guard case .live = vmPresence(name), let status = controlRequest(name, ControlRequest(.status))?.status,
                  let tenant = status.tenant else { continue }
            vms.append((name, tenant))
        }
        var segments: [(String, String?)] = []
        for s in segmentStatuses() {
            guard case .string(let segment)? = s["segment"] else { continue }
            if case .string(let owner)? = s["owner"] { segments.append((segment, owner)) } else { segments.append((segment, nil)) }
        }
        return TenantUsage(vmTenants: vms, segmentOwners: segments)
    }

    func vms(of entry: TenantRegistry.Entry) -> [String] {
        vmTenants.filter { $0.tenant == entry.name }.map(\.vm)
    }

    /// The segments the tenant owns, or (for a switch's own tenant, `segment:NAME`) runs.
    func segments(of entry: TenantRegistry.Entry) -> [String] {
        segmentOwners.filter { $0.owner == entry.name || "segment:" + $0.segment == entry.name }.map(\.segment)
    }
}

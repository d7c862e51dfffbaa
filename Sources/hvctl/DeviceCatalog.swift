import CSeccomp
import Glibc
import HVCore
import HVIPC
import HVSandbox
import HVSys

/// Where hv finds its device executables and sandbox profiles, and how it turns a device into
/// a sandbox plan.
enum DeviceCatalog {
    /// The devices hv ships, by the name `hvctl sandbox show` takes.
    static let builtIn: [(name: String, executable: String)] = [("serial", "hv-serial"), ("bios", "hv-bios"), ("scsi", "hv-scsi"), ("net", "hv-net"), ("switch", "hv-switch")]

    /// `sandbox-profiles/`: $HV_PROFILE_DIR, else beside hvctl, else the source tree hvctl was built in.
    static func profileDirectory() -> String? {
        if let env = getenv("HV_PROFILE_DIR") { return String(cString: env) }
        var dir = executableDirectory()
        for _ in 0..<5 {
            let candidate = dir + "/sandbox-profiles"
            if access(candidate + "/serial.json", R_OK) == 0 { return candidate }
            guard let slash = dir.lastIndex(of: "/"), slash != dir.startIndex else { break }
            dir = String(dir[..<slash])
        }
        return nil
    }

    /// The largest sandbox profile hv reads.
    static let maximumProfileBytes: Int64 = 1 << 20

    static func resolveSyscall(_ name: String) -> Int32? {
        let n = seccomp_syscall_resolve_name(name)
        return n == __NR_SCMP_ERROR ? nil : n
    }

    /// Loads and validates a profile file; a bad one is a one-line error naming the file.
    static func loadProfile(_ path: String) throws(UsageError) -> SandboxProfile {
        let bytes: [UInt8]
        do {
            // A profile is a small JSON file: never a FIFO to block on or /dev/zero to read forever.
            let file = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: maximumProfileBytes)
            do { bytes = try file.readAll() } catch { throw HostFileError.system(error.errno) }
        } catch {
            throw UsageError(message: "cannot read sandbox profile '\(path)': \(error)")
        }
        do {
            return try SandboxProfile.load(json: bytes, source: path, resolveSyscall: resolveSyscall)
        } catch {
            throw UsageError(message: "\(error)")
        }
    }

    static func builtInProfilePath(_ device: String) throws(UsageError) -> String {
        guard let dir = profileDirectory() else {
            throw UsageError(message: "cannot find sandbox-profiles/ (looked beside hvctl and above it); set HV_PROFILE_DIR")
        }
        return "\(dir)/\(device).json"
    }

    /// Library directories to expose in every jail: the same for every device, so read once.
    static let libraryPaths = SandboxPlan.runtimeLibraryPaths()

    /// The jail plan for a device run by `tenant`.
    static func plan(profilePath: String, tenant: String) throws(UsageError) -> SandboxPlan {
        let jail = executableDirectory() + "/hv-jail"
        guard access(jail, X_OK) == 0 else {
            throw UsageError(message: "hv-jail not found next to hvctl (\(jail)); rebuild hv with 'swift build'")
        }
        let id = SandboxPlan.tenantID(tenant)
        return SandboxPlan(jailExecutable: jail, profilePath: profilePath, profile: try loadProfile(profilePath),
                           outsideUID: id, outsideGID: id, exposedPaths: libraryPaths)
    }
}

/// `hvctl sandbox show DEVICE [--tenant NAME]`.
func sandboxCommand(_ arguments: ArraySlice<String>) throws(UsageError) -> Int32 {
    var rest = arguments
    guard rest.popFirst() == "show" else {
        throw UsageError(message: "usage: hvctl sandbox show DEVICE [--tenant NAME] (devices: \(DeviceCatalog.builtIn.map(\.name).joined(separator: ", ")), or a profile path)")
    }
    guard let device = rest.popFirst() else { throw UsageError(message: "hvctl sandbox show needs a device name") }
    var tenant = "default"
    while let flag = rest.popFirst() {
        guard flag == "--tenant", let name = rest.popFirst() else { throw UsageError(message: "unknown option '\(flag)' for 'hvctl sandbox show'") }
        tenant = name
    }
    let path: String
    if device.hasSuffix(".json") {
        path = device
    } else if DeviceCatalog.builtIn.contains(where: { $0.name == device }) {
        path = try DeviceCatalog.builtInProfilePath(device)
    } else {
        throw UsageError(message: "unknown device '\(device)': use one of \(DeviceCatalog.builtIn.map(\.name).joined(separator: ", ")), or a profile path")
    }
    let plan = try DeviceCatalog.plan(profilePath: path, tenant: tenant)
    // The segment switch is not a VM's device: its tenant is its segment's, and it gets a socket, not HELLO.
    let isSwitch = device == "switch"
    print(plan.profile.render(header: [
        "profile file: \(path)",
        "runs as: uid 0 / gid 0 inside its own user namespace = uid \(plan.outsideUID) / gid \(plan.outsideGID) on the host (tenant '\(tenant)'); no other id is mapped"
            + (isSwitch ? "; a segment NAME's switch runs as tenant 'segment:NAME', which no VM's --tenant can name (see its uid with --tenant segment:NAME)" : ""),
        "capabilities: none (bounding, inheritable, permitted, effective and ambient sets emptied; SECBIT_NOROOT locked); no_new_privs; non-dumpable",
        "root: empty read-only tmpfs with only these read-only binds: \(plan.exposedPaths.joined(separator: ", ")) (the \(isSwitch ? "switch" : "device") runs from a descriptor the core opened)",
        isSwitch ? "descriptors: only the segment's listening socket (fd 3), bound by the VM that started it, and what each joining VM sends (its port)"
            : "descriptors: only those the core hands over (control, events, and what HELLO carries)",
    ]))
    return 0
}

import CSeccomp
import Glibc
import HVCore
import HVIPC
import HVSandbox
import HVSys

/// Where hv finds its device executables and sandbox profiles, and how it turns a device into
/// a sandbox plan.
public enum DeviceCatalog {
    /// The devices hv ships, by the name `hvctl sandbox show` takes.
    public static let builtIn: [(name: String, executable: String)] = [("serial", "hv-serial"), ("bios", "hv-bios"), ("scsi", "hv-scsi"), ("net", "hv-net"), ("switch", "hv-switch"), ("balloon", "hv-balloon")]

    /// `sandbox-profiles/`: $HV_PROFILE_DIR, else beside hvctl, else the source tree hvctl was built in.
    public static func profileDirectory() -> String? {
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
    public static let maximumProfileBytes: Int64 = 1 << 20

    public static func resolveSyscall(_ name: String) -> Int32? {
        let n = seccomp_syscall_resolve_name(name)
        return n == __NR_SCMP_ERROR ? nil : n
    }

    /// Loads and validates a profile file, with the base profiles it includes merged in; a bad
    /// one is a one-line error naming the file.
    public static func loadProfile(_ path: String) throws(UsageError) -> SandboxProfile {
        do {
            return try loadProfile(path, including: [])
        } catch {
            if case .unreadable(let reason) = error.problem, error.source == path {
                throw UsageError(message: "cannot read sandbox profile '\(path)': \(reason)")
            }
            throw UsageError(message: "\(error)")
        }
    }

    /// The base profile `name`: `sandbox-profiles/NAME.json` of this hv (where `base-device.json`
    /// and the other shared policies live), so a plugin's profile names it instead of copying it.
    public static func baseProfilePath(_ name: String) throws(UsageError) -> String {
        guard let dir = profileDirectory() else {
            throw UsageError(message: "cannot find sandbox-profiles/ for base profile '\(name)' (looked beside hvctl and above it); set HV_PROFILE_DIR")
        }
        return "\(dir)/\(name).json"
    }

    /// `path`'s profile; `chain` names the bases being loaded above it (a cycle is an error).
    private static func loadProfile(_ path: String, including chain: [String]) throws(SandboxProfileError) -> SandboxProfile {
        let bytes: [UInt8]
        do {
            // A profile is a small JSON file: never a FIFO to block on or /dev/zero to read forever.
            let file = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, maximumSize: maximumProfileBytes)
            defer { file.close() }
            do { bytes = try file.readAll() } catch { throw HostFileError.system(error.errno) }
        } catch {
            throw SandboxProfileError(source: path, problem: .unreadable("\(error)"), path: "")
        }
        return try SandboxProfile.load(json: bytes, source: path, resolveSyscall: resolveSyscall) { name throws(SandboxProfileError) in
            guard !chain.contains(name), chain.count < 4 else {
                throw SandboxProfileError(source: path, problem: .baseProfile(name: name, reason: chain.contains(name)
                    ? "includes itself through \((chain + [name]).joined(separator: " → "))" : "includes nest deeper than 4"), path: "include")
            }
            let basePath: String
            do throws(UsageError) { basePath = try baseProfilePath(name) } catch {
                throw SandboxProfileError(source: path, problem: .baseProfile(name: name, reason: error.message), path: "include")
            }
            do throws(SandboxProfileError) { return try loadProfile(basePath, including: chain + [name]) } catch {
                if case .baseProfile = error.problem { throw error }
                throw SandboxProfileError(source: path, problem: .baseProfile(name: name, reason: error.description), path: "include")
            }
        }
    }

    public static func builtInProfilePath(_ device: String) throws(UsageError) -> String {
        guard let dir = profileDirectory() else {
            throw UsageError(message: "cannot find sandbox-profiles/ (looked beside hvctl and above it); set HV_PROFILE_DIR")
        }
        return "\(dir)/\(device).json"
    }

    /// Library directories to expose in the jails of hv's own devices: what their binaries need
    /// (they are built together, by one toolchain), so read once.
    public static let libraryPaths = SandboxPlan.runtimeLibraryPaths(
        for: builtIn.map { executableDirectory() + "/" + $0.executable })

    /// The jail plan for a device run by `tenant`; `executable` is a third-party device's binary,
    /// whose own library needs are exposed too.
    public static func plan(profilePath: String, tenant: String, executable: String? = nil) throws(UsageError) -> SandboxPlan {
        try plan(profilePath: profilePath, outsideID: try TenantIDs.uid(for: tenant), executable: executable)
    }

    /// The jail plan for a device run as host uid/gid `outsideID`.
    public static func plan(profilePath: String, outsideID id: UInt32, executable: String? = nil) throws(UsageError) -> SandboxPlan {
        SandboxPlan(profilePath: profilePath, profile: try loadProfile(profilePath), outsideUID: id, outsideGID: id,
                    exposedPaths: executable.map { SandboxPlan.runtimeLibraryPaths(for: [$0]) } ?? libraryPaths)
    }
}


import Glibc
import HVSys

/// How one NIC asks to join a segment: its VM's tenant and, should it create the segment, whom
/// it shares it with.
struct SegmentAccess {
    /// The VM's `--tenant`; nil for VMs run without one.
    var tenant: String?
    var sharedWith: [String]
}

/// Who may put a NIC on a private segment. A segment belongs to the tenant whose VM created it
/// (its first member); VMs of any other tenant are refused, unless the creator listed them with
/// `shared=` (`shared_with` in a definition). VMs run without `--tenant` are the host's own: they
/// share segments among themselves, as before tenants existed, but not with any named tenant.
///
/// The record is `$HV_RUN_DIR/net/NAME.owner`, written and checked under the segment's lock, and
/// removed with the segment's socket and lock when its last member leaves (or by the sweep of
/// segments whose switch is gone). It outlives a crash of the switch, so the segment's members
/// rejoin it and no other tenant can take the name in between.
struct SegmentOwnership: Equatable {
    /// The tenant that created the segment; nil: the host's own VMs.
    var owner: String?
    /// The other tenants admitted, sorted.
    var sharedWith: [String]

    init(owner: String?, sharedWith: [String]) {
        self.owner = owner
        self.sharedWith = Array(Set(sharedWith)).sorted()
    }

    static func file(_ segment: String) -> String { SegmentDirectory.path + "/" + segment + ".owner" }

    func admits(_ tenant: String?) -> Bool {
        tenant == owner || tenant.map(sharedWith.contains) == true
    }

    /// The record, if the segment has one; a damaged record admits only the host's VMs.
    static func read(_ segment: String) -> SegmentOwnership? {
        guard let fd = try? FileDescriptor.open(file(segment), flags: O_RDONLY | O_NOFOLLOW), let bytes = try? fd.readAll() else { return nil }
        var owner: String?, shared: [String] = []
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let fields = line.split(separator: " ").map(String.init)
            if fields.first == "owner", fields.count == 2, fields[1] != "-" { owner = fields[1] }
            if fields.first == "shared" { shared = Array(fields.dropFirst()) }
        }
        return SegmentOwnership(owner: owner, sharedWith: shared)
    }

    func write(_ segment: String) throws(SystemError) {
        let fd = try FileDescriptor.open(Self.file(segment), flags: O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600)
        try fd.writeAll(Array("owner \(owner ?? "-")\nshared \(sharedWith.joined(separator: " "))\n".utf8))
    }

    static func describe(_ tenant: String?) -> String {
        tenant.map { "tenant '\($0)'" } ?? "the host's own VMs (run without --tenant)"
    }

    /// Checks (or, for a new segment, records) that a VM of `tenant` may join `segment`, under
    /// the segment's lock. Returns whether this call created the record.
    static func claim(_ segment: String, tenant: String?, sharedWith: [String]) -> Result<Bool, UsageError> {
        let mine = SegmentOwnership(owner: tenant, sharedWith: sharedWith)
        guard let existing = read(segment) else {
            do { try mine.write(segment) } catch {
                return .failure(UsageError(message: "cannot record the owner of segment '\(segment)': \(error)"))
            }
            return .success(true)
        }
        guard existing.admits(tenant) else {
            let remedy = tenant.map { "use a segment of your own, or have its creator start it with shared=\($0)" } ?? "use a segment of your own, or run the VM as that tenant (--tenant)"
            return .failure(UsageError(message: "cannot join segment '\(segment)': it belongs to \(describe(existing.owner)), and \(describe(tenant)) may not join it; \(remedy)"))
        }
        if !mine.sharedWith.isEmpty && mine.sharedWith != existing.sharedWith {
            let now = existing.sharedWith.isEmpty ? "with no other tenant" : "with " + existing.sharedWith.joined(separator: "+")
            return .failure(UsageError(message: "cannot join segment '\(segment)' with shared=\(mine.sharedWith.joined(separator: "+")): it is already shared \(now); a segment's sharing is set by the VM that creates it, so leave shared= out"))
        }
        return .success(false)
    }
}

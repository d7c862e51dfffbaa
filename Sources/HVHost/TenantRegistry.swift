import Glibc
import HVSys
import Synchronization

/// The host's record of which uid/gid each tenant's devices run as. Ids were once a hash of the
/// name, and two names could share one silently; now each name gets its own id from this
/// registry, allocated under a lock and kept in a file, so two names never share a uid.
///
/// Two kinds of entry:
/// - **named** (`alice`, `segment:lan`): kept until `hvctl tenant rm` removes it, so a tenant
///   keeps its uid across its VMs' lives;
/// - **leased** (`vm:PID`, the default tenant of a VM run without `--tenant`): held by that
///   hvctl process and freed once it is gone (seen at the next allocation, even after `kill -9`).
///
/// Ids come from 2,000,000–2,999,999, far above Debian's regular and system ranges, handed out
/// from a cursor that only moves forward (wrapping), so a freed uid is not handed out again until
/// the rest of the range has been.
///
/// The file (`$HV_STATE_DIR/tenants`, default /var/lib/hv/tenants) is text, one entry per line:
/// `UID NAME` or `UID NAME HOLDER-PID@START-TIME`, plus a `next UID` line; it is replaced
/// atomically (written beside, then renamed) under `tenants.lock`.
public struct TenantRegistry: Sendable {
    /// The first and last uid the registry hands out.
    public static let idRange: ClosedRange<UInt32> = 2_000_000...2_999_999

    /// One registered tenant.
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var uid: UInt32
        /// For a leased entry, the hvctl process holding it: its pid and its start time (in clock
        /// ticks since boot, /proc/PID/stat field 22), so a reused pid is not mistaken for it.
        public var holder: (pid: Int32, startTime: UInt64)?

        public init(name: String, uid: UInt32, holder: (pid: Int32, startTime: UInt64)? = nil) {
            self.name = name
            self.uid = uid
            self.holder = holder
        }

        public static func == (a: Entry, b: Entry) -> Bool {
            a.name == b.name && a.uid == b.uid && a.holder?.pid == b.holder?.pid && a.holder?.startTime == b.holder?.startTime
        }
    }

    /// The registry file.
    public let path: String
    /// Whether a leased entry's holder still runs; replaceable in tests.
    let isAlive: @Sendable (Int32, UInt64) -> Bool

    public init(path: String) {
        self.init(path: path) { pid, start in processStartTime(pid) == start }
    }

    init(path: String, isAlive: @escaping @Sendable (Int32, UInt64) -> Bool) {
        self.path = path
        self.isAlive = isAlive
    }

    /// The host's registry: `$HV_STATE_DIR/tenants`, or /var/lib/hv/tenants.
    public static var host: TenantRegistry {
        let state = getenv("HV_STATE_DIR").flatMap { $0.pointee != 0 ? String(cString: $0) : nil } ?? "/var/lib/hv"
        return TenantRegistry(path: state + "/tenants")
    }

    /// The uid of tenant `name`, registering it (with a fresh uid) if it is new.
    public func uid(for name: String) throws(UsageError) -> UInt32 {
        try update { (entries: inout [Entry], next: inout UInt32) throws(UsageError) -> UInt32 in
            if let known = entries.first(where: { $0.name == name }) { return known.uid }
            guard !name.hasPrefix("vm:") else {
                throw UsageError(message: "tenant '\(name)' is a VM's own tenant and its VM is gone; give the VM a tenant with --tenant NAME")
            }
            let uid = try Self.allocate(&next, avoiding: entries)
            entries.append(Entry(name: name, uid: uid))
            return uid
        }
    }

    /// A fresh tenant for one VM, held by process `pid` (this one by default) until it exits:
    /// named `vm:PID`, which no `--tenant` can name (':' is not allowed there).
    public func lease(for pid: Int32 = getpid()) throws(UsageError) -> Entry {
        guard let start = processStartTime(pid) else {
            throw UsageError(message: "cannot read the start time of process \(pid) in /proc; is /proc mounted?")
        }
        let name = "vm:\(pid)"
        return try update { (entries: inout [Entry], next: inout UInt32) throws(UsageError) -> Entry in
            // A previous holder of this pid is gone (pruned), or is this very process (kept).
            if let mine = entries.first(where: { $0.name == name }) { return mine }
            let entry = Entry(name: name, uid: try Self.allocate(&next, avoiding: entries), holder: (pid, start))
            entries.append(entry)
            return entry
        }
    }

    /// The uid tenant `name` has now, without registering it.
    public func registeredUID(_ name: String) throws(UsageError) -> UInt32? {
        try entries().first { $0.name == name }?.uid
    }

    /// Every registered tenant (leases whose holder is gone are left out, and pruned).
    public func entries() throws(UsageError) -> [Entry] {
        try update { entries, _ in entries }
    }

    /// Forgets tenant `name`; its uid is not handed out again until the cursor comes round.
    /// Returns false when no such tenant is registered.
    public func remove(_ name: String) throws(UsageError) -> Bool {
        try update { entries, _ in
            guard let i = entries.firstIndex(where: { $0.name == name }) else { return false }
            entries.remove(at: i)
            return true
        }
    }

    /// The next free uid from the cursor on (wrapping), moving the cursor past it.
    static func allocate(_ next: inout UInt32, avoiding entries: [Entry]) throws(UsageError) -> UInt32 {
        let used = Set(entries.map(\.uid))
        let size = UInt64(idRange.count)
        for step in 0..<size {
            let candidate = idRange.lowerBound + UInt32((UInt64(next - idRange.lowerBound) + step) % size)
            if !used.contains(candidate) {
                next = candidate == idRange.upperBound ? idRange.lowerBound : candidate + 1
                return candidate
            }
        }
        throw UsageError(message: "the tenant registry is full (\(size) tenants); remove unused ones with 'hvctl tenant rm NAME'")
    }

    /// Reads the file under its lock, drops dead leases, runs `change`, and writes the result back
    /// if anything changed.
    private func update<T>(_ change: (inout [Entry], inout UInt32) throws(UsageError) -> T) throws(UsageError) -> T {
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        if !directory.isEmpty && mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw UsageError(message: "cannot create \(directory) for the tenant registry: \(Errno.current); set HV_STATE_DIR to a writable directory")
        }
        let lock: FileDescriptor?
        do { lock = try PathLock.acquire(path + ".lock", blocking: true) } catch {
            throw UsageError(message: "cannot lock the tenant registry \(path).lock: \(error.errno); tenants need root (or HV_STATE_DIR set to a writable directory)")
        }
        defer { lock?.close() }
        let text: String
        do {
            let fd = try FileDescriptor.open(path, flags: O_RDONLY | O_NOFOLLOW)
            text = String(decoding: try fd.readAll(), as: UTF8.self)
        } catch where error.errno == .noEntry {
            text = ""
        } catch {
            throw UsageError(message: "cannot read the tenant registry \(path): \(error.errno)")
        }
        let (read, cursor) = try Self.parse(text, path: path)
        var entries = read.filter { entry in entry.holder.map { isAlive($0.pid, $0.startTime) } ?? true }
        var next = cursor
        let result = try change(&entries, &next)
        if entries != read || next != cursor { try write(entries, next: next) }
        return result
    }

    /// The file's entries and cursor; a line it cannot read is an error naming the line.
    static func parse(_ text: String, path: String) throws(UsageError) -> ([Entry], UInt32) {
        var entries: [Entry] = [], next = idRange.lowerBound
        for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let fields = line.split(separator: " ")
            if fields.isEmpty || fields[0].hasPrefix("#") { continue }
            func bad() -> UsageError {
                UsageError(message: "the tenant registry \(path) is damaged at line \(number + 1) ('\(line.prefix(60))'); repair or remove that line")
            }
            if fields[0] == "next" {
                guard fields.count == 2, let value = UInt32(fields[1]), idRange.contains(value) else { throw bad() }
                next = value
                continue
            }
            guard (2...3).contains(fields.count), let uid = UInt32(fields[0]), idRange.contains(uid) else { throw bad() }
            var entry = Entry(name: String(fields[1]), uid: uid)
            if fields.count == 3 {
                let parts = fields[2].split(separator: "@")
                guard parts.count == 2, let pid = Int32(parts[0]), let start = UInt64(parts[1]) else { throw bad() }
                entry.holder = (pid, start)
            }
            guard !entries.contains(where: { $0.name == entry.name || $0.uid == entry.uid }) else { throw bad() }
            entries.append(entry)
        }
        return (entries, next)
    }

    static func render(_ entries: [Entry], next: UInt32) -> String {
        var text = "# hv's tenant registry: UID NAME [HOLDER-PID@START], one uid per name. Change it with 'hvctl tenant'.\nnext \(next)\n"
        for e in entries.sorted(by: { $0.uid < $1.uid }) {
            text += "\(e.uid) \(e.name)" + (e.holder.map { " \($0.pid)@\($0.startTime)" } ?? "") + "\n"
        }
        return text
    }

    private func write(_ entries: [Entry], next: UInt32) throws(UsageError) {
        let temporary = path + ".new"
        do throws(SystemError) {
            let fd = try FileDescriptor.open(temporary, flags: O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o644)
            try fd.writeAll(Array(Self.render(entries, next: next).utf8))
            guard fsync(fd.rawValue) == 0 else { throw SystemError("fsync \(temporary)") }
        } catch {
            unlink(temporary)
            throw UsageError(message: "cannot write the tenant registry \(temporary): \(error.errno)")
        }
        guard rename(temporary, path) == 0 else {
            let why = Errno.current
            unlink(temporary)
            throw UsageError(message: "cannot replace the tenant registry \(path): \(why)")
        }
    }
}

/// When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); nil if it is gone.
public func processStartTime(_ pid: Int32) -> UInt64? {
    guard let fd = try? FileDescriptor.open("/proc/\(pid)/stat", flags: O_RDONLY), let bytes = try? fd.readAll() else { return nil }
    let text = String(decoding: bytes, as: UTF8.self)
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    guard let close = text.lastIndex(of: ")") else { return nil }
    let fields = text[text.index(after: close)...].split(separator: " ")
    // fields[0] is field 3 (state), so field 22 is fields[19].
    return fields.count > 19 ? UInt64(fields[19]) : nil
}

/// The uid each tenant name resolves to in this process, asked of the host's registry once per
/// name: a VM's devices are planned many times (restarts, upgrades, reboots) under one tenant.
enum TenantIDs {
    private static let cache = Mutex<[String: UInt32]>([:])

    static func uid(for tenant: String) throws(UsageError) -> UInt32 {
        if let known = cache.withLock({ $0[tenant] }) { return known }
        let uid = try TenantRegistry.host.uid(for: tenant)
        cache.withLock { $0[tenant] = uid }
        return uid
    }

    /// Records a lease this process took, so device plans find it without asking again.
    static func remember(_ entry: TenantRegistry.Entry) {
        cache.withLock { $0[entry.name] = entry.uid }
    }
}

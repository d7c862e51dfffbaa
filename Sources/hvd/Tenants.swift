import Foundation
import HVHost

/// A tenant hvd serves on a socket of its own (`hvd --tenant NAME:UID[:GID]`): through it the
/// tenant sees and controls only the VMs it created, and those VMs may only use files in the
/// tenant's directory, NICs on the tenant's own segments, and hv's sandbox.
struct Tenant: Sendable, Equatable {
    var name: String
    var uid: UInt32
    var gid: UInt32
    /// SOCKETS/NAME/api.sock: the directory is root's (0755), so the tenant cannot swap the
    /// socket for something else; the socket is the tenant's, mode 0600.
    var socket: String
    /// FILES/NAME, the tenant's (0700): where its kernels, images and ISOs go. Its VMs' paths are
    /// resolved here and confined here by the kernel (`confine_files_to`).
    var files: String

    /// Parses `NAME:UID[:GID]` (GID defaults to UID).
    static func parse(_ spec: String, sockets: String, files: String) throws(UsageError) -> Tenant {
        let parts = spec.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard (2...3).contains(parts.count), let uid = UInt32(parts[1]), let gid = parts.count == 3 ? UInt32(parts[2]) : uid else {
            throw UsageError(message: "--tenant '\(spec)': use NAME:UID or NAME:UID:GID (numbers)")
        }
        return try make(name: parts[0], uid: uid, gid: gid, sockets: sockets, files: files, what: "--tenant '\(spec)'")
    }

    /// Tenant `name` with its socket in `sockets` and its files in `files`; `what` names it in errors.
    static func make(name: String, uid: UInt32, gid: UInt32, sockets: String, files: String, what: String) throws(UsageError) -> Tenant {
        do { try RunDirectory.validate(name, flag: "name") } catch { throw UsageError(message: "\(what): \(error.message)") }
        guard uid != 0 else { throw UsageError(message: "\(what): a tenant is not root; give it a uid of its own") }
        return Tenant(name: name, uid: uid, gid: gid, socket: "\(sockets)/\(name)/api.sock", files: "\(files)/\(name)")
    }

    /// Creates the tenant's directories (or checks the ones there): the socket's directory is
    /// root's, the files directory the tenant's.
    func prepare() throws(UsageError) {
        let socketDirectory = String(socket.dropLast("/api.sock".count))
        let socketsRoot = String(socketDirectory[..<(socketDirectory.lastIndex(of: "/") ?? socketDirectory.startIndex)])
        let filesRoot = String(files[..<(files.lastIndex(of: "/") ?? files.startIndex)])
        for (path, mode) in [(socketsRoot, mode_t(0o711)), (filesRoot, 0o711), (socketDirectory, 0o755)] {
            try Self.directory(path, mode: mode, owner: (0, 0))
        }
        try Self.directory(files, mode: 0o700, owner: (uid, gid))
    }

    /// Makes `path` a directory (not a link) with `mode` and `owner`, creating parents as root's.
    private static func directory(_ path: String, mode: mode_t, owner: (UInt32, UInt32)) throws(UsageError) {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o711])
        } catch {
            throw UsageError(message: "cannot create \(path): \(error.localizedDescription)")
        }
        var st = stat()
        guard lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw UsageError(message: "\(path) is not a directory; remove it so hvd can make one")
        }
        guard lchown(path, owner.0, owner.1) == 0, chmod(path, mode) == 0 else {
            throw UsageError(message: "cannot set the owner and mode of \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// Gives the bound socket, at `path`, to the tenant.
    func handOverSocket(at path: String) {
        if lchown(path, uid, gid) != 0 || chmod(path, 0o600) != 0 {
            log("cannot give \(socket) to uid \(uid): \(String(cString: strerror(errno)))")
        }
    }

    /// The definition a tenant asked for, made one it may run: every rule it breaks is a 400 or
    /// 403 naming the key. Relative file paths are taken in the tenant's directory, and the VM is
    /// confined to it; the devices run as the tenant.
    func confine(_ given: VMDefinition) throws(APIError) -> VMDefinition {
        var d = given
        if let t = d.tenant, t != name {
            throw .forbidden("definition.tenant '\(t)': your VMs run as tenant '\(name)'; leave tenant out")
        }
        d.tenant = name
        guard d.confinement == nil else { throw .forbidden("definition.confine_files_to is hvd's to set; leave it out") }
        guard d.sandbox else { throw .forbidden("definition.sandbox: a tenant's VMs always run sandboxed; leave sandbox out") }
        guard d.devices.isEmpty else { throw .forbidden("definition.devices: tenants cannot add device processes") }
        guard d.limits == nil else { throw .forbidden("definition.limits: a tenant's limits are the host's to set; leave them out") }
        guard d.debugcon == nil else { throw .forbidden("definition.debugcon: tenants cannot write host files; leave it out") }
        guard d.serial.output != .file else {
            throw .forbidden("definition.serial.output 'file': a tenant's console is 'console' (read it with GET /v1/vms/NAME/console) or 'none'")
        }
        for (i, nic) in d.nics.enumerated() {
            if nic.tap != nil || nic.bridge != nil {
                throw .forbidden("definition.nics[\(i)]: tenants attach NICs to their own segments ('\(name).NAME'), not to host taps or bridges")
            }
            if let segment = nic.segment, !segment.hasPrefix(name + ".") {
                throw .forbidden("definition.nics[\(i)].segment '\(segment)': a tenant's segments are named '\(name).NAME'")
            }
        }
        func inFiles(_ path: String?) -> String? { path.map { absolutePath($0, against: files) } }
        d.boot.kernel = inFiles(d.boot.kernel)
        d.boot.initrd = inFiles(d.boot.initrd)
        d.boot.multiboot = inFiles(d.boot.multiboot)
        if let firmware = d.boot.firmware { d.boot.firmware = firmware == "seabios" ? VMDefinition.Boot.systemSeaBIOS : inFiles(firmware) }
        d.cdrom = inFiles(d.cdrom)
        for i in d.disks.indices { d.disks[i].path = absolutePath(d.disks[i].path, against: files) }
        d.confinement = files
        return d
    }
}

/// Whose request it is: the admin socket's (everything) or a tenant's (its own VMs).
enum Scope: Sendable {
    case admin
    case tenant(Tenant)

    /// The owner a VM created in this scope gets.
    var owner: String? {
        if case .tenant(let t) = self { return t.name }
        return nil
    }

    func sees(_ vm: StoredVM) -> Bool {
        switch self {
        case .admin: return true
        case .tenant(let t): return vm.owner == t.name
        }
    }
}

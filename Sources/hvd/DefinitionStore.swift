import Foundation
import HVHost
import Synchronization

/// A VM hvd keeps: its definition and how hvd treats it.
struct StoredVM: Codable, Equatable, Sendable {
    /// What `hvctl run --config` runs; its `name` is the VM's name.
    var definition: VMDefinition
    /// Started when hvd starts (if it is not running already).
    var autostart: Bool
    /// The tenant that created it through its socket; nil: the admin's.
    var owner: String?

    var name: String { definition.name ?? "" }
}

/// The definitions hvd keeps, one directory per VM under STATE/vms/NAME: `definition.json` (the
/// VMDefinition exactly as `hvctl run --config` reads it) and `settings.json` (hvd's own
/// settings). Files are replaced by rename, so a crash leaves the old file or the new one.
final class DefinitionStore: Sendable {
    let directory: String
    private let vms: Mutex<[String: StoredVM]>

    /// Loads every definition under `stateDirectory`/vms, creating the directories as needed.
    /// A definition that no longer reads is reported in `skipped` and left on disk untouched.
    init(stateDirectory: String) throws(UsageError) {
        directory = stateDirectory + "/vms"
        for dir in [stateDirectory, directory] where mkdir(dir, 0o700) != 0 && errno != EEXIST {
            throw UsageError(message: "cannot create the state directory \(dir): \(String(cString: strerror(errno))); pick another with --state-dir")
        }
        var loaded: [String: StoredVM] = [:]
        var skipped: [String] = []
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        for name in names.sorted() where !name.hasPrefix(".") {
            do throws(UsageError) {
                let definition = try VMDefinition.decode(Self.read(directory + "/" + name + "/definition.json"))
                let settings = try ControlJSON.decode(Settings.self, Self.read(directory + "/" + name + "/settings.json"))
                guard definition.name == name else { throw UsageError(message: "its name is '\(definition.name ?? "")'") }
                loaded[name] = StoredVM(definition: definition, autostart: settings.autostart, owner: settings.owner)
            } catch {
                skipped.append("\(name) (\(error.message))")
            }
        }
        vms = Mutex(loaded)
        self.skipped = skipped
    }

    /// Definitions found on disk that could not be read, with why.
    let skipped: [String]

    struct Settings: Codable {
        var autostart: Bool
        var owner: String?
    }

    var all: [StoredVM] { vms.withLock { $0.values.sorted { $0.name < $1.name } } }

    func get(_ name: String) -> StoredVM? { vms.withLock { $0[name] } }

    func definitionPath(_ name: String) -> String { directory + "/" + name + "/definition.json" }

    /// Keeps a new VM; false when one of that name is kept already.
    func add(_ vm: StoredVM) throws(APIError) -> Bool {
        let dir = directory + "/" + vm.name
        return try vms.withLock { (vms: inout [String: StoredVM]) throws(APIError) -> Bool in
            guard vms[vm.name] == nil else { return false }
            guard mkdir(dir, 0o700) == 0 || errno == EEXIST else { throw APIError.internalFailure("cannot create \(dir): \(String(cString: strerror(errno)))") }
            try Self.write(vm, to: dir)
            vms[vm.name] = vm
            return true
        }
    }

    /// Replaces a kept VM's settings.
    func update(_ vm: StoredVM) throws(APIError) {
        try vms.withLock { (vms: inout [String: StoredVM]) throws(APIError) in
            try Self.write(vm, to: directory + "/" + vm.name)
            vms[vm.name] = vm
        }
    }

    /// Forgets VM `name` and removes its directory.
    func remove(_ name: String) {
        vms.withLock { vms in
            vms[name] = nil
            try? FileManager.default.removeItem(atPath: directory + "/" + name)
        }
    }

    private static func write(_ vm: StoredVM, to dir: String) throws(APIError) {
        try replace(dir + "/definition.json", with: Array(vm.definition.encoded().utf8) + [0x0A])
        try replace(dir + "/settings.json", with: ControlJSON.encode(Settings(autostart: vm.autostart, owner: vm.owner), pretty: true) + [0x0A])
    }

    /// Replaces the file at `path` by rename: a crash leaves the old file or the new one.
    static func replace(_ path: String, with bytes: [UInt8]) throws(APIError) {
        let temporary = path + ".new"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw APIError.internalFailure("cannot write \(temporary): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw APIError.internalFailure("cannot write \(temporary): \(String(cString: strerror(errno)))") }
            done += n
        }
        guard fsync(fd) == 0, rename(temporary, path) == 0 else {
            throw APIError.internalFailure("cannot replace \(path): \(String(cString: strerror(errno)))")
        }
    }

    private static func read(_ path: String) throws(UsageError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else { throw UsageError(message: "cannot read \(path)") }
        return Array(data)
    }
}

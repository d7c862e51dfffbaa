import HVHost
import HVSys

/// `POST /v1/vms/{name}/restore`: `hvctl run --restore`'s options.
struct RestoreRequest: Decodable, Sendable {
    /// The snapshot's directory, as `POST …/snapshot` (or `hvctl snapshot`) wrote it.
    var path: String
    /// Leave the restored VM paused (`POST …/resume` starts it).
    var paused: Bool
    /// Start a new VM from the snapshot as a template (`hvctl run --restore --clone`).
    var clone: Bool
    /// With `clone`: the MACs of the clone's NICs, in order (the rest derive from its name).
    var macs: [String]
    /// Whether hvd starts the VM when hvd starts; for a VM restored under a new name.
    var autostart: Bool?

    enum CodingKeys: String, CodingKey, CaseIterable { case path, paused, clone, macs, autostart }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        path = try c.decode(String.self, forKey: .path)
        paused = try c.decodeIfPresent(Bool.self, forKey: .paused) ?? false
        clone = try c.decodeIfPresent(Bool.self, forKey: .clone) ?? false
        macs = try c.decodeIfPresent([String].self, forKey: .macs) ?? []
        autostart = try c.decodeIfPresent(Bool.self, forKey: .autostart)
    }
}

extension VMService {
    /// Brings back the VM saved in `request.path` as `name` and answers once it runs (or is
    /// paused): the kept VM `name` itself when the snapshot is of it (it must be stopped), a new
    /// kept VM when no VM has that name, or with `clone` a new VM made from the snapshot as a
    /// template (its own MACs, its writable disks as overlays in the snapshot's `clones/NAME/`).
    ///
    /// The snapshot is read and checked by hvctl before anything runs (`run --restore
    /// --print-config`), and a new VM is kept under its name before it starts, so no other
    /// request can take the name meanwhile; if the restore fails it is forgotten again.
    func restore(_ name: String, _ request: RestoreRequest, _ scope: Scope) async throws(APIError) -> VMInfo {
        // A snapshot is a host directory naming host disks, written where the admin said.
        guard case .admin = scope else { throw .forbidden("tenants cannot restore snapshots; ask the host's admin") }
        do { try RunDirectory.validate(name, flag: "name") } catch { throw .badRequest(error.message) }
        guard request.path.utf8.first == UInt8(ascii: "/"), !request.path.utf8.contains(0) else {
            throw .badRequest("path '\(request.path)' must be the absolute path of a snapshot's directory")
        }
        guard request.clone || request.macs.isEmpty else { throw .badRequest("macs goes with clone: true (a restored VM keeps its MACs)") }
        for (i, mac) in request.macs.enumerated() {
            guard let octets = parseMAC(mac), octets[0] & 1 == 0 else {
                throw .badRequest("macs[\(i)] '\(mac)' is not a unicast MAC: give six hex octets, like 52:54:00:12:34:56")
            }
        }
        let kept = store.get(name)
        if request.clone, kept != nil {
            throw .conflict("a VM named '\(name)' exists already; a clone is a new VM: give it another name")
        }
        if kept != nil, request.autostart != nil {
            throw .badRequest("autostart is for a VM restored under a new name; VM '\(name)' is kept: PATCH /v1/vms/\(name) sets it")
        }
        try claim(name)
        defer { release(name) }
        if case .live = await blocking({ vmPresence(name) }) {
            throw .conflict("VM '\(name)' is running; stop it first (POST /v1/vms/\(name)/stop), or restore under another name")
        }

        // What the snapshot holds, read and checked as a restore reads it.
        let hvctl = self.hvctl
        let path = request.path
        let printed = await blocking { runTool(hvctl, ["run", "--restore", path, "--print-config"], stdout: .captured) }
        guard case .exited(0) = printed.termination else { throw printed.termination == .exited(2) ? .badRequest(printed.said) : .unprocessable(printed.said) }
        let saved: VMDefinition
        do { saved = try VMDefinition.decode(printed.printed) } catch {
            throw .unprocessable("hvctl printed no definition for snapshot \(path): \(error.message)")
        }
        if kept != nil, !request.clone, saved.name != name {
            throw .conflict("snapshot \(path) holds VM '\(saved.name ?? "")', not '\(name)': restore it under a name hvd does not keep, or as a clone")
        }

        // A new VM is kept (as it will run: a clone with its overlays, never the template's
        // disks) before it starts, so the name is its own.
        var placeholder = saved
        placeholder.name = name
        if request.clone {
            guard request.macs.count <= saved.nics.count else {
                throw .badRequest("macs names \(request.macs.count) MACs, but the snapshot's VM has \(saved.nics.count) NICs")
            }
            do { placeholder = try cloneDefinition(saved, snapshot: path, name: name, macs: request.macs, makingOverlays: false) } catch {
                throw .badRequest(error.message)
            }
        }
        if placeholder.serial.output == .stdio { placeholder.serial = .init(output: .console) }
        let isNew = kept == nil
        if isNew {
            guard try store.add(StoredVM(definition: placeholder, autostart: request.autostart ?? false, owner: nil)) else {
                throw .conflict("a VM named '\(name)' was created meanwhile; restore under another name")
            }
        }
        var arguments = ["run", "--restore", path, "--name", name, "--detach"]
        if request.paused { arguments.append("--paused") }
        if request.clone { arguments += ["--clone"] + request.macs.flatMap { ["--mac", $0] } }
        let restoring = arguments
        let run = await blocking { runTool(hvctl, restoring, stdout: .discarded) }
        guard case .exited(0) = run.termination else {
            if isNew { store.remove(name) }
            // hvctl's usage errors are the request's; anything else the host's or the snapshot's.
            throw run.termination == .exited(2) ? .badRequest(run.said) : .unprocessable(run.said)
        }
        if isNew {
            // The definition it runs (a clone's overlays and MACs among it) is the one kept.
            if let reply = await blocking({ controlRequest(name, ControlRequest(.definition), timeoutSeconds: 10) }), reply.ok, let running = reply.definition {
                try store.update(StoredVM(definition: running, autostart: request.autostart ?? false, owner: nil))
            }
            events.publish(.init(type: "vm-created", vm: name))
        }
        events.observe(name)
        guard let vm = store.get(name) else { throw .internalFailure("VM '\(name)' runs but is no longer kept") }
        return await blocking { self.info(vm) }
    }
}

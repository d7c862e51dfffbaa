import Glibc
import HVCore
import HVSys

// Snapshots as hvctl sees them: the core's types, so `hvctl run --restore` can read a snapshot
// (and refuse a bad one in one line) before it builds anything.

/// A VM saved by `hvctl snapshot` (see HVCore's `MachineSnapshot`).
public typealias MachineSnapshot = HVCore.MachineSnapshot
/// Why a snapshot could not be taken, read or restored, in one line.
public typealias SnapshotError = HVCore.SnapshotError

/// Where a clone's disk overlays live: `SNAPSHOT/clones/NAME/`.
public func cloneDirectory(snapshot: String, name: String) -> String { snapshot + "/clones/" + name }

/// The definition of a clone of the VM `definition` describes (as a snapshot recorded it): the
/// name `name`, NICs with MACs derived from the new name (or `macs`, in NIC order), and each
/// writable disk replaced by a new qcow2 overlay (in `cloneDirectory`) whose backing file is the
/// template's image, so a clone never writes the template. Read-only disks and the CD are shared.
/// Refuses an overlay that exists already (a clone of that name ran before from this snapshot:
/// its disks do not match the snapshot's memory any more). With `makingOverlays` false, only the
/// definition: no file is made or checked.
public func cloneDefinition(_ definition: VMDefinition, snapshot: String, name: String, macs: [String],
                            makingOverlays: Bool = true) throws(UsageError) -> VMDefinition {
    var clone = definition
    clone.name = name
    guard macs.count <= clone.nics.count else {
        throw UsageError(message: "--mac given \(macs.count) times, but the snapshot's VM has \(clone.nics.count) NICs")
    }
    for i in clone.nics.indices {
        if i < macs.count {
            guard let mac = parseMAC(macs[i]), mac[0] & 1 == 0 else {
                throw UsageError(message: "invalid --mac '\(macs[i])': use six hex octets of a unicast address, like 52:54:00:12:34:56")
            }
            clone.nics[i].mac = formatMAC(mac)
        } else {
            clone.nics[i].mac = nil  // derived from the clone's name
        }
    }
    // The template's serial file belongs to the template: a clone's goes to its own log.
    if clone.serial.output == .file { clone.serial = .init(output: .console) }
    let writable = clone.disks.indices.filter { !clone.disks[$0].readonly }
    guard !writable.isEmpty else { return clone }
    let directory = cloneDirectory(snapshot: snapshot, name: name)
    guard makingOverlays else {
        for i in writable { clone.disks[i] = VMDefinition.Disk(path: directory + "/disk\(i).qcow2", readonly: false, format: .qcow2) }
        return clone
    }
    for path in [snapshot + "/clones", directory] where mkdir(path, 0o700) != 0 && errno != EEXIST {
        throw UsageError(message: "cannot create \(path): \(Errno.current)")
    }
    for i in writable {
        let overlay = directory + "/disk\(i).qcow2"
        guard access(overlay, F_OK) != 0 else {
            throw UsageError(message: "\(overlay) exists: a clone named '\(name)' was made from this snapshot before; remove that directory or pick another --name")
        }
        _ = try QCOW2Disk.create(overlay, size: nil, backing: clone.disks[i].path)
        clone.disks[i] = VMDefinition.Disk(path: overlay, readonly: false, format: .qcow2)
    }
    return clone
}

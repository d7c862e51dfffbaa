import HVCore

// Snapshots as hvctl sees them: the core's types, so `hvctl run --restore` can read a snapshot
// (and refuse a bad one in one line) before it builds anything.

/// A VM saved by `hvctl snapshot` (see HVCore's `MachineSnapshot`).
public typealias MachineSnapshot = HVCore.MachineSnapshot
/// Why a snapshot could not be taken, read or restored, in one line.
public typealias SnapshotError = HVCore.SnapshotError

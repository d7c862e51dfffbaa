import CHVShim
import Glibc
import HVKVM
import HVSys

/// What `Machine.snapshot` wrote.
public struct SnapshotReport: Sendable {
    /// Bytes of guest RAM written (pages holding data).
    public var memoryBytesWritten: UInt64
    /// Size of the state file.
    public var stateBytes: Int
    /// How long the guest was stopped for it, ns (0 if it was already paused).
    public var pausedNanoseconds: UInt64
}

extension Machine {
    /// Saves the running VM to `directory` (which must not exist; it appears complete or not at
    /// all): every vCPU's state, the in-kernel irqchip and PIT, the guest's clock, the core's PCI
    /// state, every device's state page (each device quiesced first, so no request is half done
    /// and nothing writes guest memory during the copy), the firmware ROM and guest RAM
    /// (sparse). `host` is the host layer's record, kept as it is. The vCPUs are paused for the
    /// copy and resumed after it, unless `leavePaused` or the VM was already paused. Safe from
    /// any thread.
    public func snapshot(to directory: String, host: [UInt8], leavePaused: Bool) throws(SnapshotError) -> SnapshotReport {
        try snapshotLock.withLock { _ throws(SnapshotError) -> SnapshotReport in
            let refusing = supervisor.devicesWithoutSnapshots()
            guard refusing.isEmpty else {
                throw SnapshotError("cannot snapshot: \(refusing.joined(separator: ", ")) cannot be snapshotted (its device does not support it)")
            }
            guard access(directory, F_OK) != 0 else { throw SnapshotError("\(directory) already exists; name a new directory") }
            let parent = directory.lastIndex(of: "/").map { String(directory[..<$0]) } ?? "."
            guard access(parent.isEmpty ? "/" : parent, W_OK) == 0 else {
                throw SnapshotError("cannot create \(directory): \(parent.isEmpty ? "/" : parent) is not a writable directory (\(Errno.current))")
            }
            let wasPaused = pausedSince != nil
            let pausedAt = monotonicNanoseconds()
            if !wasPaused {
                do throws(MachineControlError) { try pause() } catch { throw SnapshotError("cannot pause the VM: \(error)") }
            }
            var succeeded = false
            defer {
                // The VM carries on after a failure whatever was asked; after success, unless told not to.
                if !wasPaused && (!succeeded || !leavePaused) { try? resume() }
            }
            let restartsBefore = supervisor.restartCounts()
            let devices = try supervisor.quiesceForSnapshot()
            let temporary = directory + ".partial-\(getpid())"
            var devicesResumed = false
            defer {
                if !devicesResumed { supervisor.resumeAfterSnapshot() }
                if !succeeded { removeSnapshotDirectory(temporary) }
            }
            guard mkdir(temporary, 0o700) == 0 else { throw SnapshotError("cannot create \(temporary): \(Errno.current)") }

            let state = try captureState(host: host, devices: devices)
            let memoryFile: FileDescriptor, stateFile: FileDescriptor
            do {
                memoryFile = try FileDescriptor.open(MachineSnapshot.memoryPath(temporary), flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
                stateFile = try FileDescriptor.open(MachineSnapshot.statePath(temporary), flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
            } catch { throw SnapshotError("cannot create the snapshot's files: \(error)") }
            var snapshot = state
            snapshot.memoryExtents = try ram.writeSparse(to: memoryFile)
            // Guest memory is copied: the devices may carry on (the vCPUs stay paused until resume).
            supervisor.resumeAfterSnapshot()
            devicesResumed = true
            guard supervisor.restartCounts() == restartsBefore else {
                throw SnapshotError("a device restarted during the snapshot, so its state may not match guest memory; try again")
            }
            let encoded = snapshot.encodedState()
            do { try stateFile.writeAll(encoded) } catch { throw SnapshotError("cannot write the snapshot's state: \(error)") }
            // Durable before it gets its name: a crash leaves the .partial directory, never a torn snapshot.
            guard fsync(memoryFile.rawValue) == 0, fsync(stateFile.rawValue) == 0 else {
                throw SnapshotError("cannot flush the snapshot to disk: \(Errno.current)")
            }
            guard rename(temporary, directory) == 0 else { throw SnapshotError("cannot rename \(temporary) to \(directory): \(Errno.current)") }
            let parentFD = open(parent.isEmpty ? "/" : parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if parentFD >= 0 {
                fsync(parentFD)
                close(parentFD)
            }
            succeeded = true
            return SnapshotReport(memoryBytesWritten: snapshot.memoryExtents.reduce(0) { $0 + $1.length }, stateBytes: encoded.count,
                                  pausedNanoseconds: wasPaused ? 0 : monotonicNanoseconds() - pausedAt)
        }
    }

    /// Everything but guest RAM, read while the vCPUs are parked and the devices quiesced.
    func captureState(host: [UInt8], devices: [DeviceSavedState]) throws(SnapshotError) -> MachineSnapshot {
        do {
            // Asked here, not at start-up: only a snapshot needs KVM's list of saveable MSRs.
            let msrIndices = try kvm.saveableMSRs()
            let vcpuStates = try vcpus.map { vcpu throws(KVMError) in try vcpu.saveState(msrIndices: msrIndices) }
            let platform = try vm.savePlatform()
            let clock = try pauseState.withLock { $0.clock } ?? vm.clock()
            var rom: [UInt8]?
            if let firmwareMapping {
                rom = Array(UnsafeRawBufferPointer(start: firmwareMapping.base, count: firmwareMapping.count))
            }
            return MachineSnapshot(host: host, memoryBytes: ram.size, cpuid: cpuidTable, tscKHz: try vcpus[0].tscKHz(), clock: clock,
                                   vcpus: vcpuStates, platform: platform, pci: pci.savedState(), devices: devices,
                                   firmwareROM: rom, memoryExtents: [])
        } catch {
            throw SnapshotError("cannot read the VM's state from KVM: \(error)")
        }
    }

    private func removeSnapshotDirectory(_ path: String) {
        unlink(MachineSnapshot.statePath(path))
        unlink(MachineSnapshot.memoryPath(path))
        rmdir(path)
    }
}

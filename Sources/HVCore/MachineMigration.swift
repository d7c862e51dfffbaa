import CHVShim
import Glibc
import HVIPC
import HVKVM
import HVSys

// Live migration, the source side (docs/migration.md). Guest memory is copied while the guest
// runs, in rounds: the first sends every page holding data, each later one the pages written
// since — by the vCPUs (KVM's dirty log) and by the device processes (each device's dirty-page
// bitmap, ipc-schema/README.md §5.4c). Once what is left would take no longer than the allowed
// downtime, the VM pauses, its devices quiesce, the last pages and the machine state go, the
// disks are let go, and the destination runs the guest on GO. Until GO any failure resumes the
// VM here; after GO the source never runs the guest again.

/// How a live migration may behave.
public struct MigrationOptions: Sendable {
    /// The longest pause the switch-over may cost (what the last round is sized for).
    public var maximumDowntimeNanoseconds: UInt64 = 100_000_000
    /// Give up (or, with `finishOnTimeout`, switch over anyway) when memory has not converged by then.
    public var timeoutNanoseconds: UInt64 = 60_000_000_000
    /// Average bytes a second the stream may use; 0: as fast as the network goes.
    public var bandwidthBytesPerSecond: UInt64 = 0
    /// On timeout, finish with a longer pause instead of cancelling.
    public var finishOnTimeout = false
    public init() {}
}

/// Where a running migration stands.
public struct MigrationProgress: Sendable {
    /// "memory" while rounds run, "switch-over" once the VM is paused.
    public var phase: String
    /// Round number: 1 is the full copy.
    public var round: Int
    public var bytesSent: UInt64
    /// Pages written since the last round, as bytes.
    public var dirtyBytes: UInt64
    /// How fast the guest and devices dirty memory, bytes a second (over the last round).
    public var dirtyRateBytesPerSecond: UInt64
    /// How fast the stream goes, bytes a second.
    public var bandwidthBytesPerSecond: UInt64
    /// What switching over now would cost.
    public var expectedDowntimeNanoseconds: UInt64
    public var elapsedNanoseconds: UInt64
}

/// What a finished migration cost.
public struct MigrationReport: Sendable {
    public var rounds: Int
    public var bytesSent: UInt64
    public var totalNanoseconds: UInt64
    /// From the pause here to the destination's word that the guest runs there.
    public var downtimeNanoseconds: UInt64
}

/// What the host layer does around the switch-over, and how it follows the migration.
public struct MigrationHooks: Sendable {
    /// Let go of the disks' image locks (the destination takes them next).
    public var releaseDisks: @Sendable () -> Void
    /// Take them back after a failed switch-over; nil on success, else why not.
    public var retakeDisks: @Sendable () -> String?
    /// Called at each round's end and a few times a second during one.
    public var progress: @Sendable (MigrationProgress) -> Void
    /// Polled between chunks: true aborts the migration (the VM goes on here).
    public var cancelled: @Sendable () -> Bool
    public init(releaseDisks: @escaping @Sendable () -> Void, retakeDisks: @escaping @Sendable () -> String?,
                progress: @escaping @Sendable (MigrationProgress) -> Void, cancelled: @escaping @Sendable () -> Bool) {
        self.releaseDisks = releaseDisks
        self.retakeDisks = retakeDisks
        self.progress = progress
        self.cancelled = cancelled
    }
}

extension Machine {
    /// The devices that would leave stale guest memory behind a migration: they map guest
    /// memory but do not log their writes to it, as "name (model)".
    func devicesWithoutDirtyLogs() -> [String] {
        supervisor.devices.compactMap { d in
            let reported = d.reported.withLock { $0 }
            guard d.dirtyLog != nil, !reported.logsDirtyPages else { return nil }
            return "\(d.spec.name) (\(reported.model.isEmpty ? d.publishedExecutable.withLock { $0 } : reported.model))"
        }
    }

    /// Why this VM cannot be migrated (devices that cannot save their state or log their writes
    /// to guest memory, named), or nil. The host layer asks before it connects anywhere.
    public func migrationRefusal() -> String? {
        let refusing = supervisor.devicesWithoutSnapshots() + devicesWithoutDirtyLogs()
        guard !refusing.isEmpty else { return nil }
        return "cannot migrate: \(refusing.joined(separator: ", ")) cannot be migrated (its device does not support it)"
    }

    /// Switches KVM's dirty log on or off for every RAM slot.
    private func setDirtyLogging(_ on: Bool) throws(KVMError) {
        for (slot, r) in ram.regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: r.guestPhysicalAddress, size: r.size,
                                   hostAddress: ram.mapping.base + Int(r.memfdOffset), logDirty: on)
        }
    }

    /// The pages written since the last call, by the vCPUs and by every device: one bit per page
    /// of the RAM memfd.
    private func takeDirtyPages() throws(KVMError) -> [UInt64] {
        let pages = Int(ram.size / GuestRAM.pageSize)
        var words = [UInt64](repeating: 0, count: (pages + 63) / 64)
        for (slot, r) in ram.regions.enumerated() {
            let log = try vm.takeDirtyLog(slot: UInt32(slot), pages: Int(r.size / GuestRAM.pageSize))
            // Regions start at multiples of 256 KiB of the memfd (MiB-sized RAM, a 3 GiB split).
            let first = Int(r.memfdOffset / GuestRAM.pageSize / 64)
            for (i, w) in log.enumerated() where w != 0 && first + i < words.count { words[first + i] |= w }
        }
        for d in supervisor.devices { d.dirtyLog?.bitmap.take(into: &words) }
        return words
    }

    /// Sends the memfd pages `[first, first + count)`: runs holding data as PAGES frames (copied
    /// first, so the checksum matches what is sent even if the guest writes meanwhile), runs of
    /// zero pages as ZEROES unless `skipZeroes` (the first round: the destination's RAM is zero).
    private func sendPages(_ first: UInt64, _ count: UInt64, skipZeroes: Bool, over channel: MigrationChannel,
                           buffer: inout [UInt8]) throws(MigrationError) {
        let pageSize = GuestRAM.pageSize
        var page = first
        let end = first + count
        let chunkPages = UInt64(channel.chunkBytes) / pageSize
        while page < end {
            let zero = ram.pageIsZero(page * pageSize)
            var runEnd = page + 1
            while runEnd < end && runEnd - page < chunkPages && ram.pageIsZero(runEnd * pageSize) == zero { runEnd += 1 }
            let offset = page * pageSize, length = (runEnd - page) * pageSize
            if zero {
                if !skipZeroes {
                    var w = WireWriter()
                    w.u64(offset)
                    w.u64(length)
                    try channel.send(.zeroes, w.bytes)
                }
            } else {
                var failure: MigrationError?
                buffer.withUnsafeMutableBytes { b in
                    b.storeBytes(of: offset.littleEndian, as: UInt64.self)
                    (b.baseAddress! + 8).copyMemory(from: ram.mapping.base + Int(offset), byteCount: Int(length))
                    do throws(MigrationError) { try channel.send(.pages, UnsafeRawBufferPointer(rebasing: b[0..<(8 + Int(length))])) } catch { failure = error }
                }
                if let failure { throw failure }
            }
            page = runEnd
        }
    }

    /// Migrates this VM over `channel` (connected to a destination that runs
    /// `hvctl run --incoming`). Returns once the destination runs the guest; the VM here is then
    /// paused for good and the caller ends it. On any failure before GO the VM runs on here as
    /// before, its disks retaken; a failure after GO (`outcomeUnknown`) leaves it paused, as
    /// the destination may run it. Safe from any thread; one snapshot or migration at a time.
    public func migrate(over channel: MigrationChannel, host: [UInt8], options: MigrationOptions,
                        hooks: MigrationHooks) throws(MigrationError) -> MigrationReport {
        try snapshotLock.withLock { _ throws(MigrationError) -> MigrationReport in
            if let why = migrationRefusal() { throw MigrationError(why) }
            guard supervisor.guestStarted.load(ordering: .acquiring) else { throw MigrationError("the VM is not running guest code yet; try again") }
            let started = monotonicNanoseconds()
            channel.bandwidthLimit = options.bandwidthBytesPerSecond
            channel.cancelled = hooks.cancelled
            try channel.send(.hello, MigrationHello(host: host, memoryBytes: ram.size, cpus: vcpus.count, cpuid: cpuidTable).encode())
            // The destination checks its CPU, the disks and the name before anything is copied.
            var accept = WireReader(try channel.receive(.accept, timeoutSeconds: 60, peer: "destination"))
            try MigrationChannel.checkVersionStamp(&accept, peer: "destination")

            do throws(KVMError) {
                try setDirtyLogging(true)
                _ = try takeDirtyPages()  // from here on, every write is seen
            } catch { throw MigrationError("cannot log the guest's memory writes: \(error)") }
            defer { try? setDirtyLogging(false) }

            var buffer = [UInt8](repeating: 0, count: 8 + MigrationChannel.maximumChunk)
            var round = 1
            var lastReport = monotonicNanoseconds()
            func check() throws(MigrationError) {
                if hooks.cancelled() { throw MigrationError("cancelled; the VM carries on here") }
            }

            // Round 1: every page holding data (SEEK_DATA skips what the guest never touched).
            let pageSize = GuestRAM.pageSize
            var position: UInt64 = 0
            let roundStart = monotonicNanoseconds()
            while position < ram.size {
                let data = lseek(ram.memfd.rawValue, off_t(position), 3 /* SEEK_DATA */)
                if data < 0 { break }
                var hole = UInt64(lseek(ram.memfd.rawValue, data, 4 /* SEEK_HOLE */))
                if Int64(bitPattern: hole) < 0 || hole > ram.size { hole = ram.size }
                var page = UInt64(data) / pageSize
                let last = (hole + pageSize - 1) / pageSize
                while page < last {
                    try check()
                    let n = min(last - page, UInt64(channel.chunkBytes) / pageSize)
                    try sendPages(page, n, skipZeroes: true, over: channel, buffer: &buffer)
                    page += n
                    if monotonicNanoseconds() - lastReport > 250_000_000 {
                        lastReport = monotonicNanoseconds()
                        hooks.progress(MigrationProgress(phase: "memory", round: 1, bytesSent: channel.bytesSent, dirtyBytes: 0, dirtyRateBytesPerSecond: 0,
                                                         bandwidthBytesPerSecond: rate(channel.bytesSent, lastReport - roundStart),
                                                         expectedDowntimeNanoseconds: 0, elapsedNanoseconds: lastReport - started))
                    }
                }
                position = hole
            }
            // A round that sent little says little about the network: assume at least 1 MiB/s,
            // or the --bandwidth limit when that is lower (else the pause is underestimated).
            let floor: UInt64 = options.bandwidthBytesPerSecond > 0 ? min(options.bandwidthBytesPerSecond, 1 << 20) : 1 << 20
            var bandwidth = max(rate(channel.bytesSent, monotonicNanoseconds() - roundStart), floor)
            var previous = (time: roundStart, sent: UInt64(0))

            // Later rounds: what was written since, until the rest fits in the allowed pause.
            while true {
                try check()
                let now = monotonicNanoseconds()
                let dirty: [UInt64]
                do throws(KVMError) { dirty = try takeDirtyPages() } catch { throw MigrationError("cannot read the dirty log: \(error)") }
                let dirtyBytes = UInt64(dirty.reduce(0) { $0 + $1.nonzeroBitCount }) * pageSize
                let roundTime = max(now - previous.time, 1)
                bandwidth = max(rate(channel.bytesSent - previous.sent, roundTime), bandwidth / 2, floor)
                let expected = dirtyBytes * 1_000_000_000 / bandwidth
                hooks.progress(MigrationProgress(phase: "memory", round: round, bytesSent: channel.bytesSent, dirtyBytes: dirtyBytes,
                                                 dirtyRateBytesPerSecond: rate(dirtyBytes, roundTime), bandwidthBytesPerSecond: bandwidth,
                                                 expectedDowntimeNanoseconds: expected, elapsedNanoseconds: now - started))
                // Switch over with these pages still to send: they go while the VM is paused.
                if expected <= options.maximumDowntimeNanoseconds {
                    return try switchOver(channel, host: host, pending: dirty, hooks: hooks, started: started, rounds: round, buffer: &buffer)
                }
                if now - started > options.timeoutNanoseconds {
                    guard options.finishOnTimeout else {
                        throw MigrationError("memory did not converge within \(options.timeoutNanoseconds / 1_000_000_000) s (the guest writes \(rate(dirtyBytes, roundTime) >> 20) MiB/s, the network takes \(bandwidth >> 20) MiB/s); cancelled, the VM carries on here. Give a longer --timeout, a larger --max-downtime, or --finish-on-timeout")
                    }
                    return try switchOver(channel, host: host, pending: dirty, hooks: hooks, started: started, rounds: round, buffer: &buffer)
                }
                round += 1
                previous = (now, channel.bytesSent)
                try sendDirtyPages(dirty, over: channel, buffer: &buffer, check: check)
            }
        }
    }

    private func rate(_ bytes: UInt64, _ nanoseconds: UInt64) -> UInt64 {
        nanoseconds == 0 ? 0 : UInt64(Double(bytes) * 1e9 / Double(nanoseconds))
    }

    /// Sends every page set in `dirty` (one bit per memfd page).
    private func sendDirtyPages(_ dirty: [UInt64], over channel: MigrationChannel, buffer: inout [UInt8],
                                check: () throws(MigrationError) -> Void) throws(MigrationError) {
        for (i, word) in dirty.enumerated() where word != 0 {
            try check()
            var w = word
            while w != 0 {
                let bit = UInt64(w.trailingZeroBitCount)
                var run: UInt64 = 1
                while bit + run < 64 && w & (1 << (bit + run)) != 0 { run += 1 }
                try sendPages(UInt64(i) * 64 + bit, run, skipZeroes: false, over: channel, buffer: &buffer)
                w &= run == 64 ? 0 : ~(((UInt64(1) << run) - 1) << bit)
            }
        }
    }

    /// The pause: the last pages, the machine state, the disks, then GO.
    private func switchOver(_ channel: MigrationChannel, host: [UInt8], pending: [UInt64], hooks: MigrationHooks, started: UInt64,
                            rounds: Int, buffer: inout [UInt8]) throws(MigrationError) -> MigrationReport {
                var pending = pending
                let wasPaused = pausedSince != nil
                let pausedAt = monotonicNanoseconds()
                if !wasPaused {
                    do throws(MachineControlError) { try pause() } catch { throw MigrationError("cannot pause the VM: \(error)") }
                }
                var committed = false
                var devicesQuiesced = false
                var disksReleased = false
                defer {
                    if !committed {
                        // Not handed over: the VM goes on here as before.
                        if disksReleased, let why = hooks.retakeDisks() {
                            warnMigration("cannot take the disks back after the failed migration (\(why)); the VM stays paused")
                        } else {
                            if devicesQuiesced { supervisor.resumeAfterSnapshot() }
                            if !wasPaused { try? resume() }
                        }
                    }
                }
                let restartsBefore = supervisor.restartCounts()
                let devices: [DeviceSavedState]
                do throws(SnapshotError) { devices = try supervisor.quiesceForSnapshot() } catch { throw MigrationError(error.description) }
                devicesQuiesced = true
                // Nothing writes guest memory now: the last round is exact.
                do throws(KVMError) {
                    let last = try takeDirtyPages()
                    for i in pending.indices { pending[i] |= last[i] }
                } catch { throw MigrationError("cannot read the dirty log: \(error)") }
                try sendDirtyPages(pending, over: channel, buffer: &buffer) { () throws(MigrationError) in }
                guard supervisor.restartCounts() == restartsBefore else {
                    throw MigrationError("a device restarted during the switch-over; the VM carries on here, try again")
                }
                let state: MachineSnapshot
                do throws(SnapshotError) { state = try captureState(host: host, devices: devices) } catch { throw MigrationError(error.description) }
                try channel.send(.state, [wasPaused ? 1 : 0] + state.encodedState())
                try? setDirtyLogging(false)
                hooks.releaseDisks()
                disksReleased = true
                try channel.send(.handover)
                hooks.progress(MigrationProgress(phase: "switch-over", round: rounds + 1, bytesSent: channel.bytesSent, dirtyBytes: 0, dirtyRateBytesPerSecond: 0,
                                                 bandwidthBytesPerSecond: 0, expectedDowntimeNanoseconds: 0, elapsedNanoseconds: monotonicNanoseconds() - started))
                _ = try channel.receive(.ready, timeoutSeconds: 60, peer: "destination")
                // The point of no return: after GO the guest may run there, so never here again.
                channel.cancelled = { false }
                try channel.send(.go)
                committed = true
                do {
                    _ = try channel.receive(.done, timeoutSeconds: 30, peer: "destination")
                } catch {
                    throw MigrationError("the destination did not confirm that it runs the VM (\(error)); the VM stays paused here: check the destination, then stop or resume this one", outcomeUnknown: true)
                }
                let now = monotonicNanoseconds()
                return MigrationReport(rounds: rounds + 1, bytesSent: channel.bytesSent, totalNanoseconds: now - started,
                                       downtimeNanoseconds: wasPaused ? 0 : now - pausedAt)
    }
}

/// One line on stderr, as the core reports what it cannot return.
private func warnMigration(_ text: String) {
    let line = "hvctl: \(text)\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
}

import Glibc
import HVIPC
import HVSys

/// One device's part of a snapshot: its state page, and what its process said it was.
public struct DeviceSavedState: Sendable, Equatable {
    /// The instance name ("serial0", "disk1", …): a restore matches devices by it.
    public var name: String
    /// The model name from the device's handshake ("serial-16550a", "scsi", …).
    public var model: String
    /// The state page layout version the device reported.
    public var stateVersion: UInt16
    /// The whole state page.
    public var page: [UInt8]

    public init(name: String, model: String, stateVersion: UInt16, page: [UInt8]) {
        self.name = name
        self.model = model
        self.stateVersion = stateVersion
        self.page = page
    }
}

/// Why a snapshot could not be taken or restored, in one line.
public struct SnapshotError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension DeviceSupervisor {
    static let statePageSize = 4096

    /// The devices whose processes cannot be snapshotted (they did not accept SNAPSHOT), as
    /// "name (model)".
    func devicesWithoutSnapshots() -> [String] {
        devices.compactMap { d in
            let reported = d.reported.withLock { $0 }
            return reported.stateVersion == 0 ? "\(d.spec.name) (\(reported.model.isEmpty ? d.publishedExecutable.withLock { $0 } : reported.model))" : nil
        }
    }

    /// Sends QUIESCE to every device (the vCPUs must be paused and the rings drained) and reads
    /// each state page. On failure every device already quiesced is resumed. Every QUIESCE is
    /// sent before any reply is awaited: the processes, often asleep, wake and finish their work
    /// in parallel (waking an idle one took up to a few ms on this host), which shortens a
    /// migration's pause and a snapshot's.
    func quiesceForSnapshot() throws(SnapshotError) -> [DeviceSavedState] {
        // Per device: its reply's status; nil while it is restarting, -1 without an answer.
        let statuses: [Int32?] = withEveryControlChannel { channels in
            let sent: [ControlChannel.SentRequest??] = zip(devices, channels).map { d, control in
                guard let control, d.endpoint.state == .running else { return .none }
                return .some(try? control.sendRequest(.quiesce, payload: []))
            }
            return zip(channels, sent).map { control, request -> Int32? in
                guard let control, let request else { return nil }
                guard let request else { return -1 }
                do throws(ChannelError) {
                    return try control.awaitReply(to: request, timeoutMilliseconds: 5000).0.status
                } catch {
                    if case .rejected(let status, _) = error { return status.rawValue }
                    return -1
                }
            }
        }
        // Resumed if this fails: those that quiesced, and those that did not answer in time (they
        // may still quiesce).
        let quiesced = zip(devices, statuses).filter { $0.1 == Status.ok.rawValue || $0.1 == -1 }.map(\.0)
        var states: [DeviceSavedState] = []
        for (d, status) in zip(devices, statuses) {
            guard status == Status.ok.rawValue else {
                resumeAfterSnapshot(quiesced)
                switch status {
                case nil: throw SnapshotError("device \(d.spec.name) is restarting; try again in a moment")
                case .some(-1): throw SnapshotError("device \(d.spec.name) did not answer QUIESCE within 5 s; the VM carries on")
                case .some(Status.unknownType.rawValue): throw SnapshotError("device \(d.spec.name) cannot be snapshotted")
                default: throw SnapshotError("device \(d.spec.name) could not finish its work in flight; the VM carries on")
                }
            }
            guard let page = d.readStatePage() else {
                resumeAfterSnapshot(quiesced)
                throw SnapshotError("cannot read device \(d.spec.name)'s state page: \(Errno.current)")
            }
            let reported = d.reported.withLock { $0 }
            states.append(DeviceSavedState(name: d.spec.name, model: reported.model, stateVersion: reported.stateVersion, page: page))
        }
        return states
    }

    /// Runs `body` holding every device's control channel lock (taken in device order, the only
    /// code that holds more than one), so no other request on those channels can take a reply
    /// meant for `body`'s.
    func withEveryControlChannel(from index: Int = 0, holding held: [ControlChannel?] = [],
                                         _ body: ([ControlChannel?]) -> [Int32?]) -> [Int32?] {
        guard index < devices.count else { return body(held) }
        return devices[index].controlChannel.withLock { control in
            withEveryControlChannel(from: index + 1, holding: held + [control], body)
        }
    }

    /// Sends RESUME to `devices` (all by default).
    func resumeAfterSnapshot(_ which: [ManagedDevice]? = nil) {
        for d in which ?? devices {
            d.controlChannel.withLock { control in _ = try? control?.request(.resume, payload: [], timeoutMilliseconds: 1000) }
        }
    }

    /// How many times each device was restarted so far: a snapshot during which one changed
    /// saw a process that was not quiesced.
    func restartCounts() -> [UInt32] { devices.map { $0.restarts.load(ordering: .acquiring) } }

    /// Before `startAll`: each device starts from its saved state page, as a restarted process
    /// would, and must report the same state layout version.
    func prepareRestore(_ states: [DeviceSavedState]) throws(SnapshotError) {
        let names = Set(devices.map(\.spec.name))
        if let extra = states.first(where: { !names.contains($0.name) }) {
            throw SnapshotError("the snapshot has a device \(extra.name) (\(extra.model)) that this VM lacks")
        }
        for d in devices {
            guard let saved = states.first(where: { $0.name == d.spec.name }) else {
                throw SnapshotError("the snapshot has no state for device \(d.spec.name)")
            }
            guard saved.page.count == Self.statePageSize else { throw SnapshotError("device \(d.spec.name)'s saved state is not one page") }
            let n = saved.page.withUnsafeBytes { pwrite(d.statePage.rawValue, $0.baseAddress, $0.count, 0) }
            guard n == Self.statePageSize else { throw SnapshotError("cannot fill device \(d.spec.name)'s state page: \(Errno.current)") }
            d.generation = 1
            d.firstGeneration = 1
            d.expectedStateVersion = saved.stateVersion
        }
    }
}

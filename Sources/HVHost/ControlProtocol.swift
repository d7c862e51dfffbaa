import FoundationEssentials

// The per-VM control protocol: what `hvctl` (or any tool) sends to a running VM's control socket,
// RUN_DIR/NAME.sock (AF_UNIX, SOCK_SEQPACKET), and what the VM answers. One request message, one
// reply message, each a JSON object; ipc-schema/control.md documents every request and field.
// Both sides compile these types: the protocol is defined once.

/// One request to a running VM.
public struct ControlRequest: Codable, Equatable, Sendable {
    public enum Command: String, Codable, Equatable, Sendable, CaseIterable {
        /// The VM's `VMStatus`.
        case status
        /// Stop the VM (its `hvctl run` exits 0).
        case stop
        /// Stop every vCPU; devices drain.
        case pause
        /// Resume the vCPUs `pause` stopped.
        case resume
        /// Eject the CD-ROM drive's medium.
        case cdromEject = "cdrom-eject"
        /// Insert the ISO at `path` (absolute) into the CD-ROM drive.
        case cdromInsert = "cdrom-insert"
        /// Restart device `device` cleanly.
        case deviceRestart = "device-restart"
        /// Replace device `device`'s binary with the one at `path` (absolute).
        case deviceUpgrade = "device-upgrade"
        /// Save the VM to the directory `path` (absolute, not existing yet); with `stop`, leave
        /// it paused afterwards.
        case snapshot
        /// Migrate the VM live to `path` (`tcp:HOST:PORT`, where `hvctl run --incoming` waits),
        /// with `max_downtime_ms`, `timeout_seconds`, `bandwidth` and `finish_on_timeout`. The
        /// connection stays open: progress replies (`progress`), then one final reply (`ok` with
        /// `migration`, or `error`).
        case migrate
        /// Cancel the migration under way; the VM carries on here.
        case migrateCancel = "migrate-cancel"
        /// Change the VM's resource limits: the fields `limits` sets replace the ones in force.
        case setLimits = "set-limits"
        /// Ask the guest to give up `size_mib` of its RAM to the balloon (and/or change
        /// `stats_interval_s`); the reply's `status` carries the balloon as it stands.
        case balloon
        /// The VM's definition as it runs now (the reply's `definition`): what a VM that arrived
        /// by migration is, for hvd to keep.
        case definition
    }
    public var command: Command
    /// An absolute host path: the ISO (`cdrom-insert`) or the new binary (`device-upgrade`).
    public var path: String?
    /// A device's instance name (`disk0`, `net1`): `device-restart`, `device-upgrade`.
    public var device: String?
    /// `status`: also read every vCPU's instruction pointer.
    public var registers: Bool?
    /// `snapshot`: leave the VM paused once it is saved.
    public var stop: Bool?
    /// `migrate`: the longest pause the switch-over may cost, in milliseconds (default 100).
    public var maxDowntimeMs: UInt64?
    /// `migrate`: give up when memory has not converged after this many seconds (default 60).
    public var timeoutSeconds: UInt64?
    /// `migrate`: the most bytes a second the migration may send (default: no limit).
    public var bandwidth: UInt64?
    /// `migrate`: on timeout, switch over with a longer pause instead of cancelling.
    public var finishOnTimeout: Bool?
    /// `migrate`: the key both hosts hold, as hex (`MigrationKey.hex`); nil only with
    /// `insecurePlaintext`.
    public var migrationKey: String?
    /// `migrate`: send in the clear, unauthenticated (the operator's explicit choice).
    public var insecurePlaintext: Bool?
    /// `set-limits`: the limits to change.
    public var limits: VMDefinition.Limits?
    /// `set-limits`: devices' new rate limits.
    public var rates: [RateChange]?
    /// `balloon`: the balloon's new size, in MiB.
    public var sizeMiB: UInt64?
    /// `balloon`: how often to ask the guest for statistics, in seconds (0: never).
    public var statsIntervalSeconds: Int?

    /// A device's rate limits as they are to be: a disk's `limit`, a NIC's `rx` and `tx`; each
    /// replaces the one in force, and one left out (or null) means unlimited.
    public struct RateChange: Codable, Equatable, Sendable {
        /// `disk0`, `net1`.
        public var device: String
        public var limit: VMDefinition.RateLimit?
        public var rx: VMDefinition.RateLimit?
        public var tx: VMDefinition.RateLimit?

        public init(device: String, limit: VMDefinition.RateLimit? = nil, rx: VMDefinition.RateLimit? = nil, tx: VMDefinition.RateLimit? = nil) {
            self.device = device
            self.limit = limit
            self.rx = rx
            self.tx = tx
        }
    }

    public init(_ command: Command, path: String? = nil, device: String? = nil, registers: Bool? = nil, stop: Bool? = nil) {
        self.command = command
        self.path = path
        self.device = device
        self.registers = registers
        self.stop = stop
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case command, path, device, registers, stop, maxDowntimeMs = "max_downtime_ms", timeoutSeconds = "timeout_seconds", bandwidth,
             finishOnTimeout = "finish_on_timeout", migrationKey = "migration_key", insecurePlaintext = "insecure_plaintext", limits, rates, sizeMiB = "size_mib", statsIntervalSeconds = "stats_interval_s"
    }

    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        command = try c.decode(Command.self, forKey: .command)
        path = try c.decodeIfPresent(String.self, forKey: .path)
        device = try c.decodeIfPresent(String.self, forKey: .device)
        registers = try c.decodeIfPresent(Bool.self, forKey: .registers)
        stop = try c.decodeIfPresent(Bool.self, forKey: .stop)
        maxDowntimeMs = try c.decodeIfPresent(UInt64.self, forKey: .maxDowntimeMs)
        timeoutSeconds = try c.decodeIfPresent(UInt64.self, forKey: .timeoutSeconds)
        bandwidth = try c.decodeIfPresent(UInt64.self, forKey: .bandwidth)
        finishOnTimeout = try c.decodeIfPresent(Bool.self, forKey: .finishOnTimeout)
        migrationKey = try c.decodeIfPresent(String.self, forKey: .migrationKey)
        insecurePlaintext = try c.decodeIfPresent(Bool.self, forKey: .insecurePlaintext)
        limits = try c.decodeIfPresent(VMDefinition.Limits.self, forKey: .limits)
        rates = try c.decodeIfPresent([RateChange].self, forKey: .rates)
        sizeMiB = try c.decodeIfPresent(UInt64.self, forKey: .sizeMiB)
        statsIntervalSeconds = try c.decodeIfPresent(Int.self, forKey: .statsIntervalSeconds)
    }
}

/// The answer to one `ControlRequest`.
public struct ControlReply: Codable, Equatable, Sendable {
    /// Whether the request was carried out.
    public var ok: Bool
    /// Why not, in one line (when `ok` is false).
    public var error: String?
    /// A one-line report of what was done (device restart, upgrade).
    public var message: String?
    /// For `status`.
    public var status: VMStatus?
    /// `migrate`: where the migration stands (a reply that is not the last).
    public var progress: MigrationProgressReport?
    /// `migrate`: what the finished migration cost (the last reply).
    public var migration: MigrationResultReport?
    /// `definition`: the VM's definition as it runs now.
    public var definition: VMDefinition?

    public init(ok: Bool, error: String? = nil, message: String? = nil, status: VMStatus? = nil, progress: MigrationProgressReport? = nil) {
        self.ok = ok
        self.error = error
        self.message = message
        self.status = status
        self.progress = progress
    }

    public static func failure(_ why: String) -> ControlReply { ControlReply(ok: false, error: why) }
}

/// A running VM as `hvctl status` and `hvctl ls` show it.
public struct VMStatus: Codable, Equatable, Sendable {
    public var name: String
    /// The pid of its `hvctl run` (the VM's core).
    public var pid: Int32
    /// "starting" (the VM is being built or rebooted; the guest does not run yet), "running" or "paused".
    public var state: String
    /// "demo", "multiboot", "linux" or "firmware".
    public var boot: String
    public var uptimeSeconds: UInt64
    /// How long it has been paused, when it is.
    public var pausedSeconds: UInt64?
    public var memoryMiB: UInt64
    public var cpus: Int
    /// The tenant its devices run as; nil under `--no-sandbox`.
    public var tenant: String?
    public var vcpus: [VCPU]
    public var devices: [Device]
    public var disks: [Disk]
    public var cdrom: CDROM?
    public var nics: [NIC]
    /// The file the serial console is written to (`--serial file:`, or RUN_DIR/NAME.log for a
    /// detached VM); nil when it goes to a terminal or nowhere.
    public var consoleLog: String?
    /// Whether `hvctl console NAME` can attach (the serial port is `console`).
    public var consoleAttachable: Bool
    /// Its cgroups, limits and use; nil when it runs without cgroups.
    public var resources: Resources? = nil
    /// Host memory its guest RAM takes now (pages never touched, or given back by a balloon, take none).
    public var guestMemoryHostBytes: UInt64? = nil
    /// Its memory balloon; nil when it has none.
    public var balloon: Balloon? = nil

    public struct Resources: Codable, Equatable, Sendable {
        /// The VM's group in each hierarchy (`core` and a group per device are inside).
        public var cgroups: [String]
        public var limits: EffectiveLimits
        /// Memory the whole VM uses now (guest RAM touched, the core, devices, page cache).
        public var memoryBytes: UInt64?
        /// Processes and threads in the VM now.
        public var pids: UInt64?

        enum CodingKeys: String, CodingKey {
            case cgroups, limits, memoryBytes = "memory_bytes", pids
        }
    }

    public struct VCPU: Codable, Equatable, Sendable {
        public var id: Int
        /// "running", "halted", "paused" or "not-started".
        public var state: String
        /// The instruction pointer (hex), when asked for.
        public var rip: String?
        /// Exits to user space since the VM started, by kind (absent from older cores).
        public var exits: Exits?

        public struct Exits: Codable, Equatable, Sendable {
            /// Port I/O forwarded to a device (or the core's own ports).
            public var io: UInt64
            /// MMIO forwarded to a device.
            public var mmio: UInt64
            /// Kicked out of the guest (pause, status probes, stop).
            public var interrupted: UInt64
            /// HLT with no in-kernel irqchip to wait in (rare: hv uses KVM's).
            public var halt: UInt64
        }
    }

    public struct Device: Codable, Equatable, Sendable {
        public var name: String
        /// "serial", "bios", "disk", "cdrom", "nic" or "plugin".
        public var kind: String
        public var pid: Int32?
        /// "running", "restarting" or "failed".
        public var state: String
        public var restarts: UInt32
        public var binary: String
    }

    public struct Disk: Codable, Equatable, Sendable {
        public var device: String
        public var path: String
        /// "raw" or "qcow2".
        public var format: String
        public var readonly: Bool
        /// A qcow2 disk's backing chain, nearest first (absent when it has none).
        public var backing: [String]?
        /// Its rate limit (absent: unlimited).
        public var rateLimit: VMDefinition.RateLimit?

        enum CodingKeys: String, CodingKey { case device, path, format, readonly, backing, rateLimit = "rate_limit" }
    }

    public struct CDROM: Codable, Equatable, Sendable {
        public var device: String
        /// The ISO in the drive; nil when it is empty.
        public var medium: String?
    }

    public struct NIC: Codable, Equatable, Sendable {
        public var device: String
        public var mac: String
        public var tap: String?
        public var segment: String?
        /// The host bridge the tap joined, if any.
        public var bridge: String?
        /// Its rate limits, host → guest and guest → host (absent: unlimited).
        public var rxRateLimit: VMDefinition.RateLimit?
        public var txRateLimit: VMDefinition.RateLimit?
        /// The NIC's frames and drops: a tap's from the host kernel's counters of the tap, a
        /// segment NIC's from its switch's (`SegmentTraffic`); absent when neither answers.
        public var traffic: Traffic?

        enum CodingKeys: String, CodingKey {
            case device, mac, tap, segment, bridge, rxRateLimit = "rx_rate_limit", txRateLimit = "tx_rate_limit", traffic
        }

        /// Counted by the host's kernel on the tap (or by the segment's switch), named from the
        /// guest's side: what the host receives on the tap is what the guest sent.
        public struct Traffic: Codable, Equatable, Sendable {
            public var sentFrames: UInt64
            public var sentBytes: UInt64
            public var receivedFrames: UInt64
            public var receivedBytes: UInt64
            /// Frames the guest sent that the host dropped.
            public var sentDropped: UInt64
            /// Frames for the guest the tap dropped (its queue full: the NIC did not take them).
            public var receivedDropped: UInt64

            enum CodingKeys: String, CodingKey {
                case sentFrames = "sent_frames", sentBytes = "sent_bytes", receivedFrames = "received_frames", receivedBytes = "received_bytes"
                case sentDropped = "sent_dropped", receivedDropped = "received_dropped"
            }
        }
    }

    enum CodingKeys: String, CodingKey {
        case name, pid, state, boot, uptimeSeconds = "uptime_seconds", pausedSeconds = "paused_seconds", memoryMiB = "memory_mib", cpus,
             tenant, vcpus, devices, disks, cdrom, nics, consoleLog = "console_log", consoleAttachable = "console_attachable", resources,
             guestMemoryHostBytes = "guest_memory_host_bytes", balloon
    }
}

/// JSON as the control protocol writes it: compact, keys sorted, so a reply is one stable line.
public enum ControlJSON {
    public static func encode<T: Encodable>(_ value: T, pretty: Bool = false) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        return (try? Array(encoder.encode(value))) ?? Array("{}".utf8)
    }

    public static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) throws(UsageError) -> T {
        do {
            return try JSONDecoder().decode(type, from: Data(bytes))
        } catch let error as DecodingError {
            throw UsageError(message: VMDefinition.describe(error))
        } catch {
            throw UsageError(message: "\(error)")
        }
    }
}

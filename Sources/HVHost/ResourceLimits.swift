import HVCore

extension VMDefinition {
    /// What a VM may use of the host, enforced by its cgroups (`ResourceGroups`): the whole VM's
    /// CPU time and weight, its memory and process count, and each device process's memory.
    /// Every field is optional; nil is hv's default (below). `hvctl run --cpu-quota …` and
    /// `limits` in a definition set them; `hvctl set NAME …` changes them while the VM runs.
    public struct Limits: Codable, Equatable, Sendable {
        /// CPU time the whole VM (vCPUs and devices) may use, in CPUs: 0.2 is 20 % of one CPU, 2
        /// is two CPUs' worth. Default: no quota.
        public var cpuQuota: Double?
        /// The VM's share of contended CPU, 1–10000 (cgroup v2's `cpu.weight`; v1's `cpu.shares`
        /// is weight × 1024 / 100). Default 100.
        public var cpuWeight: UInt32?
        /// The whole VM's memory (guest RAM, the core, every device, their page cache), in MiB.
        /// Default: guest RAM + `defaultOverheadMiB`.
        public var memoryMiB: UInt64?
        /// Each device process's own memory cap, in MiB: a device over it is OOM-killed alone and
        /// restarted like any crashed device. Default: none of its own, only the VM's; a device
        /// that runs away hits the VM's limit instead, and the OOM killer takes a device first
        /// (oom_score_adj 500), never the core while a device is there. (A device's page cache,
        /// a disk's above all, and the guest pages it wrote first are charged to it: a cap of its
        /// own would squeeze those too, so it is for when a device is not trusted to behave.)
        public var deviceMemoryMiB: UInt64?
        /// Processes and threads in the whole VM. Default `defaultPids`.
        public var pids: UInt64?

        public init(cpuQuota: Double? = nil, cpuWeight: UInt32? = nil, memoryMiB: UInt64? = nil, deviceMemoryMiB: UInt64? = nil, pids: UInt64? = nil) {
            self.cpuQuota = cpuQuota
            self.cpuWeight = cpuWeight
            self.memoryMiB = memoryMiB
            self.deviceMemoryMiB = deviceMemoryMiB
            self.pids = pids
        }

        /// Memory beyond guest RAM a VM may use by default: the core, four or five devices, their
        /// page cache and the kernel's page tables. Measured: see ARCHITECTURE.md "Resource limits".
        public static let defaultOverheadMiB: UInt64 = 256
        /// Processes and threads per VM by default: the core's threads and every device's, with room.
        public static let defaultPids: UInt64 = 1024
        /// The fewest processes and threads a VM can start with.
        public static let minimumPids: UInt64 = 16

        /// Whether nothing is set (every default).
        public var isEmpty: Bool { self == Limits() }

        /// `self` with every field `other` sets replaced.
        public func merging(_ other: Limits) -> Limits {
            Limits(cpuQuota: other.cpuQuota ?? cpuQuota, cpuWeight: other.cpuWeight ?? cpuWeight, memoryMiB: other.memoryMiB ?? memoryMiB,
                   deviceMemoryMiB: other.deviceMemoryMiB ?? deviceMemoryMiB, pids: other.pids ?? pids)
        }

        /// Checks each value on its own; `field` names a field in the error as the caller's user
        /// knows it (a flag or a key path). Whether the memory limit fits the guest's RAM is
        /// `checkFits`, at start: a document is valid whatever RAM it is later given.
        public func validate(field: (Field) -> String) throws(UsageError) {
            if let cpuQuota {
                guard cpuQuota.isFinite, cpuQuota >= 0.01, cpuQuota <= 1024 else {
                    throw UsageError(message: "invalid \(field(.cpuQuota)) '\(cpuQuota)': give CPUs from 0.01 (1 % of one CPU) to 1024")
                }
            }
            if let cpuWeight, !(1...10_000).contains(cpuWeight) {
                throw UsageError(message: "invalid \(field(.cpuWeight)) '\(cpuWeight)': give a weight from 1 to 10000 (default 100)")
            }
            if let memoryMiB, memoryMiB < VMDefinition.minimumMemoryMiB + 32 || memoryMiB > UInt64(1) << 40 {
                throw UsageError(message: "invalid \(field(.memoryMiB)) '\(memoryMiB)': give \(VMDefinition.minimumMemoryMiB + 32) MiB to 1 PiB, and at least the guest's RAM + 32 MiB")
            }
            if let deviceMemoryMiB, deviceMemoryMiB < 16 || deviceMemoryMiB > UInt64(1) << 40 {
                throw UsageError(message: "\(field(.deviceMemoryMiB)) \(deviceMemoryMiB) MiB is too small: a device process needs at least 16 MiB")
            }
            if let pids, pids < Self.minimumPids || pids > 4_194_304 {
                throw UsageError(message: "invalid \(field(.pids)) '\(pids)': give from \(Self.minimumPids) (the core's and devices' threads) to 4194304")
            }
        }

        /// Checks that the memory limit leaves room for `guestMemoryMiB` of guest RAM and the
        /// VM's own 32 MiB.
        public func checkFits(guestMemoryMiB: UInt64, field: (Field) -> String) throws(UsageError) {
            if let memoryMiB, memoryMiB < guestMemoryMiB + 32 {
                throw UsageError(message: "\(field(.memoryMiB)) \(memoryMiB) MiB is too small for \(guestMemoryMiB) MiB of guest RAM: give at least \(guestMemoryMiB + 32) MiB (guest RAM + 32 MiB for the core and devices)")
            }
        }

        /// A limit's field, for messages.
        public enum Field: String, Sendable {
            case cpuQuota = "cpu_quota", cpuWeight = "cpu_weight", memoryMiB = "memory_mib", deviceMemoryMiB = "device_memory_mib", pids

            /// The `hvctl run`/`hvctl set` flag.
            public var flag: String {
                switch self {
                case .cpuQuota: return "--cpu-quota"
                case .cpuWeight: return "--cpu-weight"
                case .memoryMiB: return "--memory-limit"
                case .deviceMemoryMiB: return "--device-memory-limit"
                case .pids: return "--pids-limit"
                }
            }
        }

        enum CodingKeys: String, CodingKey, CaseIterable {
            case cpuQuota = "cpu_quota", cpuWeight = "cpu_weight", memoryMiB = "memory_mib", deviceMemoryMiB = "device_memory_mib", pids
        }

        public init(from decoder: any Decoder) throws {
            try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
            let c = try decoder.container(keyedBy: CodingKeys.self)
            cpuQuota = try c.decodeIfPresent(Double.self, forKey: .cpuQuota)
            cpuWeight = try c.decodeIfPresent(UInt32.self, forKey: .cpuWeight)
            memoryMiB = try c.decodeIfPresent(UInt64.self, forKey: .memoryMiB)
            deviceMemoryMiB = try c.decodeIfPresent(UInt64.self, forKey: .deviceMemoryMiB)
            pids = try c.decodeIfPresent(UInt64.self, forKey: .pids)
        }
    }
}

/// The limits a VM's cgroups get: its definition's, with hv's defaults filled in.
public struct EffectiveLimits: Codable, Equatable, Sendable {
    /// nil: no quota.
    public var cpuQuota: Double?
    public var cpuWeight: UInt32
    public var memoryBytes: UInt64
    /// nil: no cap of a device's own (the VM's applies).
    public var deviceMemoryBytes: UInt64?
    public var pids: UInt64

    public init(_ limits: VMDefinition.Limits, guestMemoryMiB: UInt64) {
        cpuQuota = limits.cpuQuota
        cpuWeight = limits.cpuWeight ?? 100
        memoryBytes = (limits.memoryMiB ?? guestMemoryMiB + VMDefinition.Limits.defaultOverheadMiB) << 20
        deviceMemoryBytes = limits.deviceMemoryMiB.map { $0 << 20 }
        pids = limits.pids ?? VMDefinition.Limits.defaultPids
    }

    enum CodingKeys: String, CodingKey {
        case cpuQuota = "cpu_quota", cpuWeight = "cpu_weight", memoryBytes = "memory_bytes", deviceMemoryBytes = "device_memory_bytes", pids
    }
}

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
        /// Each disk device process's I/O to the block device its image (and its backing
        /// images) lie on: cgroup v2's `io.max`, v1's `blkio.throttle.*` (which meters reads, and
        /// writes only where they reach the device from the process itself: v1 charges buffered
        /// writeback to no group). Default: none. A disk on a file system without a block device
        /// (tmpfs, overlay) is not limited by it; its `rate_limit` meters the guest's requests
        /// wherever the image lies.
        public var diskIO: DiskIO?

        /// Bytes and operations a second, each optional (absent or 0: not limited).
        public struct DiskIO: Codable, Equatable, Sendable {
            public var readBps: UInt64?
            public var writeBps: UInt64?
            public var readIops: UInt64?
            public var writeIops: UInt64?

            public init(readBps: UInt64? = nil, writeBps: UInt64? = nil, readIops: UInt64? = nil, writeIops: UInt64? = nil) {
                self.readBps = readBps
                self.writeBps = writeBps
                self.readIops = readIops
                self.writeIops = writeIops
            }

            /// Whether nothing is limited.
            public var isEmpty: Bool { [readBps, writeBps, readIops, writeIops].allSatisfy { ($0 ?? 0) == 0 } }

            /// `self` with every field `other` sets replaced.
            public func merging(_ other: DiskIO) -> DiskIO {
                DiskIO(readBps: other.readBps ?? readBps, writeBps: other.writeBps ?? writeBps, readIops: other.readIops ?? readIops,
                       writeIops: other.writeIops ?? writeIops)
            }

            enum CodingKeys: String, CodingKey, CaseIterable {
                case readBps = "read_bps", writeBps = "write_bps", readIops = "read_iops", writeIops = "write_iops"
            }

            public init(from decoder: any Decoder) throws {
                try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
                let c = try decoder.container(keyedBy: CodingKeys.self)
                readBps = try c.decodeIfPresent(UInt64.self, forKey: .readBps)
                writeBps = try c.decodeIfPresent(UInt64.self, forKey: .writeBps)
                readIops = try c.decodeIfPresent(UInt64.self, forKey: .readIops)
                writeIops = try c.decodeIfPresent(UInt64.self, forKey: .writeIops)
            }

            /// `--disk-io-limit`'s syntax.
            public static let flagHint = "use read_bps=RATE,write_bps=RATE,read_iops=N,write_iops=N (RATE: bytes a second, e.g. 10M; 0: no limit)"
        }

        public init(cpuQuota: Double? = nil, cpuWeight: UInt32? = nil, memoryMiB: UInt64? = nil, deviceMemoryMiB: UInt64? = nil, pids: UInt64? = nil,
                    diskIO: DiskIO? = nil) {
            self.cpuQuota = cpuQuota
            self.cpuWeight = cpuWeight
            self.memoryMiB = memoryMiB
            self.deviceMemoryMiB = deviceMemoryMiB
            self.pids = pids
            self.diskIO = diskIO
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
                   deviceMemoryMiB: other.deviceMemoryMiB ?? deviceMemoryMiB, pids: other.pids ?? pids,
                   diskIO: other.diskIO.map { (diskIO ?? DiskIO()).merging($0) } ?? diskIO)
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
            if let diskIO {
                for (name, value) in [("read_bps", diskIO.readBps), ("write_bps", diskIO.writeBps)] {
                    if let value, value != 0 && value < 4096 || value > UInt64(1) << 50 {
                        throw UsageError(message: "invalid \(field(.diskIO)) \(name) '\(value)': give bytes a second from 4096 (4K) to 1P, or 0 for no limit")
                    }
                }
                for (name, value) in [("read_iops", diskIO.readIops), ("write_iops", diskIO.writeIops)] {
                    if let value, value > 1 << 40 {
                        throw UsageError(message: "invalid \(field(.diskIO)) \(name) '\(value)': give operations a second up to 2^40, or 0 for no limit")
                    }
                }
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
            case diskIO = "disk_io"

            /// The `hvctl run`/`hvctl set` flag.
            public var flag: String {
                switch self {
                case .cpuQuota: return "--cpu-quota"
                case .cpuWeight: return "--cpu-weight"
                case .memoryMiB: return "--memory-limit"
                case .deviceMemoryMiB: return "--device-memory-limit"
                case .pids: return "--pids-limit"
                case .diskIO: return "--disk-io-limit"
                }
            }
        }

        enum CodingKeys: String, CodingKey, CaseIterable {
            case cpuQuota = "cpu_quota", cpuWeight = "cpu_weight", memoryMiB = "memory_mib", deviceMemoryMiB = "device_memory_mib", pids
            case diskIO = "disk_io"
        }

        public init(from decoder: any Decoder) throws {
            try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
            let c = try decoder.container(keyedBy: CodingKeys.self)
            cpuQuota = try c.decodeIfPresent(Double.self, forKey: .cpuQuota)
            cpuWeight = try c.decodeIfPresent(UInt32.self, forKey: .cpuWeight)
            memoryMiB = try c.decodeIfPresent(UInt64.self, forKey: .memoryMiB)
            deviceMemoryMiB = try c.decodeIfPresent(UInt64.self, forKey: .deviceMemoryMiB)
            pids = try c.decodeIfPresent(UInt64.self, forKey: .pids)
            diskIO = try c.decodeIfPresent(DiskIO.self, forKey: .diskIO)
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
    /// nil: no I/O limit on the disks' block devices.
    public var diskIO: VMDefinition.Limits.DiskIO?

    public init(_ limits: VMDefinition.Limits, guestMemoryMiB: UInt64) {
        cpuQuota = limits.cpuQuota
        cpuWeight = limits.cpuWeight ?? 100
        memoryBytes = (limits.memoryMiB ?? guestMemoryMiB + VMDefinition.Limits.defaultOverheadMiB) << 20
        deviceMemoryBytes = limits.deviceMemoryMiB.map { $0 << 20 }
        pids = limits.pids ?? VMDefinition.Limits.defaultPids
        diskIO = limits.diskIO.flatMap { $0.isEmpty ? nil : $0 }
    }

    enum CodingKeys: String, CodingKey {
        case cpuQuota = "cpu_quota", cpuWeight = "cpu_weight", memoryBytes = "memory_bytes", deviceMemoryBytes = "device_memory_bytes", pids
        case diskIO = "disk_io"
    }
}

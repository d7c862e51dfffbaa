import HVIPC

/// What the trusted side hands hv-balloon (a virtio memory balloon, virtio 1.2 §5.5) and what the
/// device publishes back, compiled by both. Its windows are `VirtioPCILayout.resources(device:)`;
/// it has no host files.
public enum BalloonContract {
    /// The balloon's page: virtio-balloon counts in 4 KiB pages whatever the guest's page size.
    public static let pageSize: UInt64 = 4096

    /// The balloon's settings.
    public struct Settings: Equatable, Sendable {
        /// How many pages the guest is asked to give up (the balloon's size); changed at run time
        /// with RECONFIGURE (`hvctl balloon NAME SIZE`).
        public var targetPages: UInt32
        /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest takes pages back from the balloon
        /// rather than run out of memory.
        public var deflateOnOOM: Bool
        /// How often the device asks the guest for fresh memory statistics, in seconds; 0: only
        /// the statistics the driver sends on its own (once, when it starts).
        public var statisticsIntervalSeconds: Int
        /// Offer VIRTIO_BALLOON_F_REPORTING: the guest reports pages it has free, and the device
        /// gives their host memory back.
        public var freePageReporting: Bool

        public static let maximumStatisticsInterval = 86_400

        public init(targetPages: UInt32 = 0, deflateOnOOM: Bool = false, statisticsIntervalSeconds: Int = 0, freePageReporting: Bool = false) {
            self.targetPages = targetPages
            self.deflateOnOOM = deflateOnOOM
            self.statisticsIntervalSeconds = statisticsIntervalSeconds
            self.freePageReporting = freePageReporting
        }

        /// The settings as HELLO's config text.
        public var encoded: String {
            SettingsText.encode([("target_pages", String(targetPages)), ("deflate_on_oom", deflateOnOOM.settingsValue),
                                 ("stats_interval_s", String(statisticsIntervalSeconds)),
                                 ("free_page_reporting", freePageReporting.settingsValue)])
        }

        /// The settings the device was handed (`DeviceRuntime.config`).
        public init(decoding config: [String: String]) throws(SettingsError) {
            let reader = SettingsReader(config)
            targetPages = UInt32(try reader.int("target_pages", in: 0...Int(UInt32.max), default: 0))
            deflateOnOOM = try reader.bool("deflate_on_oom", default: false)
            statisticsIntervalSeconds = try reader.int("stats_interval_s", in: 0...Self.maximumStatisticsInterval, default: 0)
            freePageReporting = try reader.bool("free_page_reporting", default: false)
        }
    }

    /// The guest's memory statistics (virtio 1.2 §5.5.6.3, and the tags Linux added since), by tag.
    public enum Statistic: UInt16, CaseIterable, Sendable {
        case swapIn = 0, swapOut, majorFaults, minorFaults, freeMemory, totalMemory, availableMemory, diskCaches,
             hugetlbAllocations, hugetlbFailures, oomKills, allocationStalls, asyncScans, directScans, asyncReclaims, directReclaims

        /// The name the API and `hvctl balloon` print (Firecracker's where it has one).
        public var name: String {
            switch self {
            case .swapIn: "swap_in"
            case .swapOut: "swap_out"
            case .majorFaults: "major_faults"
            case .minorFaults: "minor_faults"
            case .freeMemory: "free_memory"
            case .totalMemory: "total_memory"
            case .availableMemory: "available_memory"
            case .diskCaches: "disk_caches"
            case .hugetlbAllocations: "hugetlb_allocations"
            case .hugetlbFailures: "hugetlb_failures"
            case .oomKills: "oom_kills"
            case .allocationStalls: "alloc_stalls"
            case .asyncScans: "async_scans"
            case .directScans: "direct_scans"
            case .asyncReclaims: "async_reclaims"
            case .directReclaims: "direct_reclaims"
            }
        }
    }

    /// Where in its state page the device keeps `Status`: after the virtio transport's
    /// configuration (0–2047).
    public static let statusOffset = 3072

    /// What the driver has done, as the device publishes it in its state page: the trusted side
    /// reads it for `hvctl balloon` (treating it as untrusted input: any bytes decode to values
    /// or to nil), and a restarted device takes its counters and the driver's `actual` back.
    public struct Status: Equatable, Sendable {
        /// The pages the driver says the balloon holds (its `actual` configuration field).
        public var actualPages: UInt32 = 0
        /// The size the device last asked for.
        public var targetPages: UInt32 = 0
        /// The driver finished its set-up (DRIVER_OK) and has not reset the device since.
        public var driverReady = false
        /// Features the driver accepted.
        public var statisticsNegotiated = false, reportingNegotiated = false, deflateOnOOMNegotiated = false
        /// Pages the driver put in the balloon, took out of it, and reported free, since the VM started.
        public var inflatedPages: UInt64 = 0, deflatedPages: UInt64 = 0, reportedPages: UInt64 = 0
        /// When the last statistics came, on the monotonic clock (0: none yet).
        public var statisticsUpdatedAt: UInt64 = 0
        /// The last statistics the guest sent, by tag.
        public var statistics: [Statistic: UInt64] = [:]

        public init() {}

        /// "BLN1".
        static let magic: UInt32 = 0x314E_4C42
        /// Bytes `encode` writes.
        public static let size = 48 + 4 + 8 * Statistic.allCases.count

        public func encode() -> [UInt8] {
            var w = WireWriter()
            w.u32(Self.magic)
            w.u32(actualPages)
            w.u32(targetPages)
            w.u32((driverReady ? 1 : 0) | (statisticsNegotiated ? 2 : 0) | (reportingNegotiated ? 4 : 0) | (deflateOnOOMNegotiated ? 8 : 0))
            w.u64(inflatedPages)
            w.u64(deflatedPages)
            w.u64(reportedPages)
            w.u64(statisticsUpdatedAt)
            var present: UInt32 = 0
            for s in Statistic.allCases where statistics[s] != nil { present |= 1 << UInt32(s.rawValue) }
            w.u32(present)
            for s in Statistic.allCases { w.u64(statistics[s] ?? 0) }
            return w.bytes
        }

        /// Nil when the bytes do not start with a status record.
        public init?(decoding bytes: [UInt8]) {
            guard bytes.count >= Self.size else { return nil }
            var r = WireReader(Array(bytes.prefix(Self.size)))
            guard (try? r.u32()) == Self.magic,
                  let actual = try? r.u32(), let target = try? r.u32(), let flags = try? r.u32(),
                  let inflated = try? r.u64(), let deflated = try? r.u64(), let reported = try? r.u64(),
                  let updated = try? r.u64(), let present = try? r.u32() else { return nil }
            actualPages = actual
            targetPages = target
            driverReady = flags & 1 != 0
            statisticsNegotiated = flags & 2 != 0
            reportingNegotiated = flags & 4 != 0
            deflateOnOOMNegotiated = flags & 8 != 0
            inflatedPages = inflated
            deflatedPages = deflated
            reportedPages = reported
            statisticsUpdatedAt = updated
            for s in Statistic.allCases {
                guard let value = try? r.u64() else { return nil }
                if present & 1 << UInt32(s.rawValue) != 0 { statistics[s] = value }
            }
        }
    }
}

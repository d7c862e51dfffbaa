import FoundationEssentials
import HVBalloonContract

// The memory balloon as the host sees it: the definition's `balloon`, the `--balloon` flag, what
// `hvctl balloon` reports, and the device's settings (BalloonContract).

extension VMDefinition {
    /// A virtio memory balloon (hv-balloon): the guest gives up `sizeMiB` of its RAM, whose host
    /// memory is freed; `hvctl balloon NAME SIZE` changes the size while the VM runs.
    public struct Balloon: Codable, Equatable, Sendable {
        /// How much of the guest's RAM the balloon should hold, in MiB (Firecracker's `amount_mib`).
        public var sizeMiB: UInt64 = 0
        /// Let the guest take pages back from the balloon rather than run out of memory.
        public var deflateOnOOM: Bool = false
        /// How often to ask the guest for its memory statistics, in seconds (0: never).
        public var statsIntervalSeconds: Int = 0
        /// Give back the host memory of pages the guest reports free (free page reporting).
        public var freePageReporting: Bool = false

        public init(sizeMiB: UInt64 = 0, deflateOnOOM: Bool = false, statsIntervalSeconds: Int = 0, freePageReporting: Bool = false) {
            self.sizeMiB = sizeMiB
            self.deflateOnOOM = deflateOnOOM
            self.statsIntervalSeconds = statsIntervalSeconds
            self.freePageReporting = freePageReporting
        }

        /// The definition's keys (which name a field in errors).
        public enum CodingKeys: String, CodingKey, CaseIterable {
            case sizeMiB = "size_mib", deflateOnOOM = "deflate_on_oom", statsIntervalSeconds = "stats_interval_s",
                 freePageReporting = "free_page_reporting"
        }

        public init(from decoder: any Decoder) throws {
            try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
            let c = try decoder.container(keyedBy: CodingKeys.self)
            sizeMiB = try c.decodeIfPresent(UInt64.self, forKey: .sizeMiB) ?? 0
            deflateOnOOM = try c.decodeIfPresent(Bool.self, forKey: .deflateOnOOM) ?? false
            statsIntervalSeconds = try c.decodeIfPresent(Int.self, forKey: .statsIntervalSeconds) ?? 0
            freePageReporting = try c.decodeIfPresent(Bool.self, forKey: .freePageReporting) ?? false
        }

        /// Checks the balloon's fields; `field` names one for the message.
        public func validate(field: (CodingKeys) -> String) throws(UsageError) {
            guard sizeMiB <= UInt64(1) << 32 else { throw UsageError(message: "\(field(.sizeMiB)) \(sizeMiB) MiB is more than any guest's RAM") }
            guard (0...BalloonContract.Settings.maximumStatisticsInterval).contains(statsIntervalSeconds) else {
                throw UsageError(message: "\(field(.statsIntervalSeconds)) '\(statsIntervalSeconds)' must be 0 (never) to \(BalloonContract.Settings.maximumStatisticsInterval) seconds")
            }
        }

        /// Checks the balloon fits the guest's RAM: at parse time for flags, when the VM starts for
        /// a definition (whose memory may change until then, as its limits' may).
        public func checkFits(guestMemoryMiB: UInt64, field: (CodingKeys) -> String) throws(UsageError) {
            guard sizeMiB <= guestMemoryMiB else {
                throw UsageError(message: "\(field(.sizeMiB)) \(sizeMiB) MiB is more than the guest's \(guestMemoryMiB) MiB of RAM")
            }
        }

        /// What hv-balloon is handed.
        public var settings: BalloonContract.Settings {
            BalloonContract.Settings(targetPages: UInt32(clamping: sizeMiB << 20 / BalloonContract.pageSize), deflateOnOOM: deflateOnOOM,
                                     statisticsIntervalSeconds: statsIntervalSeconds, freePageReporting: freePageReporting)
        }

        /// `--balloon`'s syntax.
        public static let flagHint = "use --balloon on or --balloon size=SIZE,stats=SECONDS,deflate_on_oom,free_page_reporting (each optional)"

        /// Parses `--balloon SPEC`: `on`, or comma-separated `size=SIZE` (`parseMiB` turns it into
        /// whole MiB, as the other memory flags do), `stats=SECONDS`, `deflate_on_oom`,
        /// `free_page_reporting`.
        public init(flag spec: String, parseMiB: (String) throws(UsageError) -> UInt64) throws(UsageError) {
            self.init()
            guard spec != "on" else { return }
            for part in spec.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
                let (key, value) = part.firstIndex(of: "=").map { (String(part[..<$0]), String(part[part.index(after: $0)...])) } ?? (part, "")
                switch key {
                case "size" where !value.isEmpty:
                    sizeMiB = try parseMiB(value)
                case "stats" where !value.isEmpty:
                    guard let seconds = Int(value) else { throw UsageError(message: "invalid --balloon stats '\(value)': give seconds, such as 5") }
                    statsIntervalSeconds = seconds
                case "deflate_on_oom" where value.isEmpty: deflateOnOOM = true
                case "free_page_reporting" where value.isEmpty: freePageReporting = true
                default: throw UsageError(message: "invalid --balloon '\(spec)': \(Self.flagHint)")
                }
            }
        }
    }
}

extension VMStatus {
    /// The balloon as `hvctl balloon` and the API report it.
    public struct Balloon: Codable, Equatable, Sendable {
        /// The size asked for, and what the guest's driver says the balloon holds, in MiB.
        public var targetMiB: UInt64
        public var actualMiB: UInt64
        /// The same, in 4 KiB pages.
        public var targetPages: UInt32
        public var actualPages: UInt32
        /// Whether a driver in the guest runs the balloon.
        public var driverReady: Bool
        /// What the driver accepted: statistics, free page reporting, deflate on OOM.
        public var statistics: Bool
        public var freePageReporting: Bool
        public var deflateOnOOM: Bool
        /// Pages put in the balloon, taken out of it, and reported free since the VM started.
        public var inflatedPages: UInt64
        public var deflatedPages: UInt64
        public var reportedPages: UInt64
        /// The guest's last memory statistics (`free_memory`, `total_memory`, …; bytes or counts,
        /// as the guest sent them), and how old they are; absent before the first.
        public var stats: [String: UInt64]?
        public var statsAgeMs: UInt64?

        enum CodingKeys: String, CodingKey {
            case targetMiB = "target_mib", actualMiB = "actual_mib", targetPages = "target_pages", actualPages = "actual_pages",
                 driverReady = "driver_ready", statistics, freePageReporting = "free_page_reporting", deflateOnOOM = "deflate_on_oom",
                 inflatedPages = "inflated_pages", deflatedPages = "deflated_pages", reportedPages = "reported_pages", stats,
                 statsAgeMs = "stats_age_ms"
        }

        /// From what the device published in its state page (`now`: the monotonic clock).
        public init(_ s: BalloonContract.Status, now: UInt64) {
            let pagesPerMiB = UInt64((1 << 20) / BalloonContract.pageSize)
            targetPages = s.targetPages
            actualPages = s.actualPages
            targetMiB = UInt64(s.targetPages) / pagesPerMiB
            actualMiB = UInt64(s.actualPages) / pagesPerMiB
            driverReady = s.driverReady
            statistics = s.statisticsNegotiated
            freePageReporting = s.reportingNegotiated
            deflateOnOOM = s.deflateOnOOMNegotiated
            inflatedPages = s.inflatedPages
            deflatedPages = s.deflatedPages
            reportedPages = s.reportedPages
            if s.statisticsUpdatedAt != 0 {
                stats = Dictionary(uniqueKeysWithValues: s.statistics.map { ($0.key.name, $0.value) })
                statsAgeMs = now >= s.statisticsUpdatedAt ? (now - s.statisticsUpdatedAt) / 1_000_000 : 0
            }
        }
    }
}

import HVHost

// Firecracker's API bodies (src/firecracker/swagger/firecracker.yaml in Firecracker's repository),
// with its field names. Decoding is as strict as Firecracker's (unknown fields refused, naming
// them); null is "not given", as Firecracker's own decoder takes it. Fields hv cannot honour are
// refused by `MicroVM` with a fault naming them, never ignored.

/// `PUT|PATCH /machine-config`; `GET /machine-config` answers the current one.
struct MachineConfiguration: Codable, Sendable, Equatable {
    var vcpuCount: Int?
    var memSizeMib: Int?
    var smt: Bool?
    var trackDirtyPages: Bool?
    var cpuTemplate: String?
    var hugePages: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case vcpuCount = "vcpu_count", memSizeMib = "mem_size_mib", smt, trackDirtyPages = "track_dirty_pages"
        case cpuTemplate = "cpu_template", hugePages = "huge_pages"
    }

    init(vcpuCount: Int? = nil, memSizeMib: Int? = nil) {
        self.vcpuCount = vcpuCount
        self.memSizeMib = memSizeMib
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vcpuCount = try c.decodeIfPresent(Int.self, forKey: .vcpuCount)
        memSizeMib = try c.decodeIfPresent(Int.self, forKey: .memSizeMib)
        smt = try c.decodeIfPresent(Bool.self, forKey: .smt)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        cpuTemplate = try c.decodeIfPresent(String.self, forKey: .cpuTemplate)
        hugePages = try c.decodeIfPresent(String.self, forKey: .hugePages)
    }
}

/// `PUT /balloon` and `GET /balloon`: hv-balloon, configured before the microVM starts.
struct BalloonConfig: Codable, Sendable, Equatable {
    var amountMib: Int
    var deflateOnOom: Bool
    var statsPollingIntervalS: Int?
    var freePageHinting: Bool?
    var freePageReporting: Bool?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case amountMib = "amount_mib", deflateOnOom = "deflate_on_oom", statsPollingIntervalS = "stats_polling_interval_s"
        case freePageHinting = "free_page_hinting", freePageReporting = "free_page_reporting"
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        amountMib = try c.decode(Int.self, forKey: .amountMib)
        deflateOnOom = try c.decode(Bool.self, forKey: .deflateOnOom)
        statsPollingIntervalS = try c.decodeIfPresent(Int.self, forKey: .statsPollingIntervalS)
        freePageHinting = try c.decodeIfPresent(Bool.self, forKey: .freePageHinting)
        freePageReporting = try c.decodeIfPresent(Bool.self, forKey: .freePageReporting)
    }

    /// hv's balloon for this configuration; a fault names what hv cannot do.
    func hvBalloon() throws(Fault) -> VMDefinition.Balloon {
        guard amountMib >= 0 else { throw Fault("balloon: amount_mib must not be negative") }
        guard freePageHinting != true else {
            throw Fault("balloon: hv has no free page hinting; free_page_reporting gives free pages back to the host instead")
        }
        let balloon = VMDefinition.Balloon(sizeMiB: UInt64(amountMib), deflateOnOOM: deflateOnOom,
                                           statsIntervalSeconds: statsPollingIntervalS ?? 0, freePageReporting: freePageReporting == true)
        do { try balloon.validate { "balloon: \($0 == .sizeMiB ? "amount_mib" : "stats_polling_interval_s")" } } catch { throw Fault(error.message) }
        return balloon
    }
}

/// `PATCH /balloon`.
struct BalloonUpdate: Decodable, Sendable {
    var amountMib: Int
    enum CodingKeys: String, CodingKey, CaseIterable { case amountMib = "amount_mib" }
    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        amountMib = try decoder.container(keyedBy: CodingKeys.self).decode(Int.self, forKey: .amountMib)
    }
}

/// `PATCH /balloon/statistics`.
struct BalloonStatisticsUpdate: Decodable, Sendable {
    var statsPollingIntervalS: Int
    enum CodingKeys: String, CodingKey, CaseIterable { case statsPollingIntervalS = "stats_polling_interval_s" }
    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        statsPollingIntervalS = try decoder.container(keyedBy: CodingKeys.self).decode(Int.self, forKey: .statsPollingIntervalS)
    }
}

/// `PUT /boot-source`.
struct BootSource: Codable, Sendable, Equatable {
    var kernelImagePath: String
    var bootArgs: String?
    var initrdPath: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case kernelImagePath = "kernel_image_path", bootArgs = "boot_args", initrdPath = "initrd_path"
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        kernelImagePath = try c.decode(String.self, forKey: .kernelImagePath)
        bootArgs = try c.decodeIfPresent(String.self, forKey: .bootArgs)
        initrdPath = try c.decodeIfPresent(String.self, forKey: .initrdPath)
    }
}

/// A token bucket of a rate limiter (`refill_time` in milliseconds), as hv's devices enforce it.
struct TokenBucket: Codable, Sendable, Equatable {
    var size: Int64
    var oneTimeBurst: Int64?
    var refillTime: Int64

    enum CodingKeys: String, CodingKey, CaseIterable { case size, oneTimeBurst = "one_time_burst", refillTime = "refill_time" }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        size = try c.decode(Int64.self, forKey: .size)
        oneTimeBurst = try c.decodeIfPresent(Int64.self, forKey: .oneTimeBurst)
        refillTime = try c.decode(Int64.self, forKey: .refillTime)
    }
}

struct RateLimiter: Codable, Sendable, Equatable {
    var bandwidth: TokenBucket?
    var ops: TokenBucket?

    enum CodingKeys: String, CodingKey, CaseIterable { case bandwidth, ops }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        bandwidth = try c.decodeIfPresent(TokenBucket.self, forKey: .bandwidth)
        ops = try c.decodeIfPresent(TokenBucket.self, forKey: .ops)
    }

    /// Whether it limits anything (`{}` does not: clients send it for "no limit").
    var limits: Bool { bandwidth != nil || ops != nil }

    /// hv's rate limit for it (nil: unlimited); a bucket hv cannot take is a fault naming `what`.
    func hvLimit(_ what: String) throws(Fault) -> VMDefinition.RateLimit? {
        guard limits else { return nil }
        func bucket(_ b: TokenBucket?, _ name: String) throws(Fault) -> VMDefinition.RateLimit.Bucket? {
            guard let b else { return nil }
            guard b.size > 0, b.refillTime > 0, (b.oneTimeBurst ?? 0) >= 0 else {
                throw Fault("\(what).\(name): size and refill_time must be above 0 and one_time_burst not negative")
            }
            return .init(size: UInt64(b.size), oneTimeBurst: b.oneTimeBurst.map { UInt64($0) }, refillTimeMs: UInt64(b.refillTime))
        }
        let limit = VMDefinition.RateLimit(bandwidth: try bucket(bandwidth, "bandwidth"), ops: try bucket(ops, "ops"))
        do { try limit.validate(field: what) } catch { throw Fault(error.message) }
        return limit
    }
}

/// `PUT /drives/{drive_id}`.
struct Drive: Codable, Sendable, Equatable {
    var driveId: String
    var pathOnHost: String?
    var isRootDevice: Bool
    var isReadOnly: Bool?
    var partuuid: String?
    var cacheType: String?
    var ioEngine: String?
    var rateLimiter: RateLimiter?
    var socket: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id", pathOnHost = "path_on_host", isRootDevice = "is_root_device", isReadOnly = "is_read_only", partuuid
        case cacheType = "cache_type", ioEngine = "io_engine", rateLimiter = "rate_limiter", socket
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        isRootDevice = try c.decode(Bool.self, forKey: .isRootDevice)
        isReadOnly = try c.decodeIfPresent(Bool.self, forKey: .isReadOnly)
        partuuid = try c.decodeIfPresent(String.self, forKey: .partuuid)
        cacheType = try c.decodeIfPresent(String.self, forKey: .cacheType)
        ioEngine = try c.decodeIfPresent(String.self, forKey: .ioEngine)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
        socket = try c.decodeIfPresent(String.self, forKey: .socket)
    }
}

/// `PATCH /drives/{drive_id}`.
struct PartialDrive: Codable, Sendable, Equatable {
    var driveId: String
    var pathOnHost: String?
    var rateLimiter: RateLimiter?

    enum CodingKeys: String, CodingKey, CaseIterable { case driveId = "drive_id", pathOnHost = "path_on_host", rateLimiter = "rate_limiter" }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
    }
}

/// `PUT /network-interfaces/{iface_id}`.
struct NetworkInterface: Codable, Sendable, Equatable {
    var ifaceId: String
    var hostDevName: String
    var guestMac: String?
    var mtu: Int?
    var rxRateLimiter: RateLimiter?
    var txRateLimiter: RateLimiter?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id", hostDevName = "host_dev_name", guestMac = "guest_mac", mtu
        case rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter"
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        hostDevName = try c.decode(String.self, forKey: .hostDevName)
        guestMac = try c.decodeIfPresent(String.self, forKey: .guestMac)
        mtu = try c.decodeIfPresent(Int.self, forKey: .mtu)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }
}

/// `PATCH /network-interfaces/{iface_id}` (rate limiters after boot).
struct PartialNetworkInterface: Codable, Sendable, Equatable {
    var ifaceId: String
    var rxRateLimiter: RateLimiter?
    var txRateLimiter: RateLimiter?

    enum CodingKeys: String, CodingKey, CaseIterable { case ifaceId = "iface_id", rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter" }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }
}

/// `PUT /logger`.
struct LoggerConfig: Codable, Sendable, Equatable {
    var logPath: String?
    var level: String?
    var showLevel: Bool?
    var showLogOrigin: Bool?
    var module: String?

    enum CodingKeys: String, CodingKey, CaseIterable { case logPath = "log_path", level, showLevel = "show_level", showLogOrigin = "show_log_origin", module }

    init(logPath: String?, level: String?, showLevel: Bool?, showLogOrigin: Bool?) {
        self.logPath = logPath
        self.level = level
        self.showLevel = showLevel
        self.showLogOrigin = showLogOrigin
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        logPath = try c.decodeIfPresent(String.self, forKey: .logPath)
        level = try c.decodeIfPresent(String.self, forKey: .level)
        showLevel = try c.decodeIfPresent(Bool.self, forKey: .showLevel)
        showLogOrigin = try c.decodeIfPresent(Bool.self, forKey: .showLogOrigin)
        module = try c.decodeIfPresent(String.self, forKey: .module)
    }
}

/// `PUT /metrics`.
struct MetricsConfig: Codable, Sendable, Equatable {
    var metricsPath: String

    enum CodingKeys: String, CodingKey, CaseIterable { case metricsPath = "metrics_path" }

    init(metricsPath: String) { self.metricsPath = metricsPath }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        metricsPath = try decoder.container(keyedBy: CodingKeys.self).decode(String.self, forKey: .metricsPath)
    }
}

/// `PUT /actions`.
struct InstanceActionInfo: Decodable, Sendable {
    enum Action: String, Decodable, Sendable { case instanceStart = "InstanceStart", sendCtrlAltDel = "SendCtrlAltDel", flushMetrics = "FlushMetrics" }
    var actionType: Action

    enum CodingKeys: String, CodingKey, CaseIterable { case actionType = "action_type" }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        actionType = try decoder.container(keyedBy: CodingKeys.self).decode(Action.self, forKey: .actionType)
    }
}

/// `PATCH /vm`.
struct VMState: Decodable, Sendable {
    enum State: String, Decodable, Sendable { case paused = "Paused", resumed = "Resumed" }
    var state: State

    enum CodingKeys: String, CodingKey, CaseIterable { case state }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        state = try decoder.container(keyedBy: CodingKeys.self).decode(State.self, forKey: .state)
    }
}

/// `PUT /snapshot/create`. hv's snapshot is a directory: `snapshot_path` names it, and
/// `mem_file_path` becomes a link to the memory image inside it.
struct SnapshotCreateParams: Decodable, Sendable {
    var snapshotPath: String
    var memFilePath: String
    var snapshotType: String?

    enum CodingKeys: String, CodingKey, CaseIterable { case snapshotPath = "snapshot_path", memFilePath = "mem_file_path", snapshotType = "snapshot_type" }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decode(String.self, forKey: .memFilePath)
        snapshotType = try c.decodeIfPresent(String.self, forKey: .snapshotType)
    }
}

/// `PUT /snapshot/load`.
struct SnapshotLoadParams: Decodable, Sendable {
    var snapshotPath: String
    var memFilePath: String?
    var resumeVM: Bool?
    var enableDiffSnapshots: Bool?
    var trackDirtyPages: Bool?
    var hasMemBackend: Bool
    var hasOverrides: Bool

    enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotPath = "snapshot_path", memFilePath = "mem_file_path", resumeVM = "resume_vm", enableDiffSnapshots = "enable_diff_snapshots"
        case trackDirtyPages = "track_dirty_pages", memBackend = "mem_backend", networkOverrides = "network_overrides"
        case vsockOverride = "vsock_override", clockRealtime = "clock_realtime"
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decodeIfPresent(String.self, forKey: .memFilePath)
        resumeVM = try c.decodeIfPresent(Bool.self, forKey: .resumeVM)
        enableDiffSnapshots = try c.decodeIfPresent(Bool.self, forKey: .enableDiffSnapshots)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        func given(_ key: CodingKeys) throws -> Bool { try c.contains(key) && !c.decodeNil(forKey: key) }
        hasMemBackend = try given(.memBackend)
        hasOverrides = try given(.networkOverrides) || given(.vsockOverride) || given(.clockRealtime)
    }
}

/// `--config-file` and `GET /vm/config`: the whole microVM.
struct FullVMConfiguration: Codable, Sendable {
    var bootSource: BootSource?
    var drives: [Drive]?
    var machineConfig: MachineConfiguration?
    var networkInterfaces: [NetworkInterface]?
    var logger: LoggerConfig?
    var metrics: MetricsConfig?
    var balloon: BalloonConfig?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case bootSource = "boot-source", drives, machineConfig = "machine-config", networkInterfaces = "network-interfaces", logger, metrics, balloon
    }

    /// Devices Firecracker has and hv does not: a configuration naming one is refused.
    static let unsupportedSections = ["vsock", "mmds-config", "entropy", "cpu-config", "pmem", "memory-hotplug", "serial"]

    init(bootSource: BootSource?, drives: [Drive], machineConfig: MachineConfiguration, networkInterfaces: [NetworkInterface],
         logger: LoggerConfig?, metrics: MetricsConfig?, balloon: BalloonConfig?) {
        self.balloon = balloon
        self.bootSource = bootSource
        self.drives = drives
        self.machineConfig = machineConfig
        self.networkInterfaces = networkInterfaces
        self.logger = logger
        self.metrics = metrics
    }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue) + Self.unsupportedSections, allowingNull: true)
        let c = try decoder.container(keyedBy: AnySectionKey.self)
        for section in Self.unsupportedSections where c.contains(AnySectionKey(section)) {
            if try !c.decodeNil(forKey: AnySectionKey(section)) {
                throw DecodingError.dataCorrupted(.init(codingPath: [AnySectionKey(section)],
                                                        debugDescription: "hv-firecracker has no \(section) device; leave it out"))
            }
        }
        let k = try decoder.container(keyedBy: CodingKeys.self)
        bootSource = try k.decodeIfPresent(BootSource.self, forKey: .bootSource)
        drives = try k.decodeIfPresent([Drive].self, forKey: .drives)
        machineConfig = try k.decodeIfPresent(MachineConfiguration.self, forKey: .machineConfig)
        networkInterfaces = try k.decodeIfPresent([NetworkInterface].self, forKey: .networkInterfaces)
        logger = try k.decodeIfPresent(LoggerConfig.self, forKey: .logger)
        metrics = try k.decodeIfPresent(MetricsConfig.self, forKey: .metrics)
        balloon = try k.decodeIfPresent(BalloonConfig.self, forKey: .balloon)
    }
}

struct AnySectionKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ string: String) { stringValue = string }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

/// `GET /`.
struct InstanceInfo: Encodable, Sendable {
    var appName = "Firecracker"
    var id: String
    var state: String
    var vmmVersion: String

    enum CodingKeys: String, CodingKey { case appName = "app_name", id, state, vmmVersion = "vmm_version" }
}

/// `GET /version`.
struct FirecrackerVersion: Encodable, Sendable {
    var firecrackerVersion: String
    enum CodingKeys: String, CodingKey { case firecrackerVersion = "firecracker_version" }
}

/// Every error: HTTP 400 and `{"fault_message": "…"}`, as Firecracker answers.
struct Fault: Error, Sendable {
    var message: String
    init(_ message: String) { self.message = message }
    struct Body: Encodable { var faultMessage: String; enum CodingKeys: String, CodingKey { case faultMessage = "fault_message" } }
}

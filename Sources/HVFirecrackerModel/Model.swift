import HVHost

// Firecracker's API bodies (src/firecracker/swagger/firecracker.yaml in Firecracker's repository),
// with its field names: hv-firecracker's contract with its clients, a module of its own so the
// fuzz target `firecracker-api` decodes bodies exactly as the API process does. Decoding is as
// strict as Firecracker's (unknown fields refused, naming them); null is "not given", as
// Firecracker's own decoder takes it. Fields hv cannot honour are refused by `MicroVM` with a
// fault naming them, never ignored.

/// `PUT|PATCH /machine-config`; `GET /machine-config` answers the current one.
package struct MachineConfiguration: Codable, Sendable, Equatable {
    package var vcpuCount: Int?
    package var memSizeMib: Int?
    package var smt: Bool?
    package var trackDirtyPages: Bool?
    package var cpuTemplate: String?
    package var hugePages: String?

    package enum CodingKeys: String, CodingKey, CaseIterable {
        case vcpuCount = "vcpu_count", memSizeMib = "mem_size_mib", smt, trackDirtyPages = "track_dirty_pages"
        case cpuTemplate = "cpu_template", hugePages = "huge_pages"
    }

    package init(vcpuCount: Int? = nil, memSizeMib: Int? = nil) {
        self.vcpuCount = vcpuCount
        self.memSizeMib = memSizeMib
    }

    package init(from decoder: any Decoder) throws {
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
package struct BalloonConfig: Codable, Sendable, Equatable {
    package var amountMib: Int
    package var deflateOnOom: Bool
    package var statsPollingIntervalS: Int?
    package var freePageHinting: Bool?
    package var freePageReporting: Bool?

    package enum CodingKeys: String, CodingKey, CaseIterable {
        case amountMib = "amount_mib", deflateOnOom = "deflate_on_oom", statsPollingIntervalS = "stats_polling_interval_s"
        case freePageHinting = "free_page_hinting", freePageReporting = "free_page_reporting"
    }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        amountMib = try c.decode(Int.self, forKey: .amountMib)
        deflateOnOom = try c.decode(Bool.self, forKey: .deflateOnOom)
        statsPollingIntervalS = try c.decodeIfPresent(Int.self, forKey: .statsPollingIntervalS)
        freePageHinting = try c.decodeIfPresent(Bool.self, forKey: .freePageHinting)
        freePageReporting = try c.decodeIfPresent(Bool.self, forKey: .freePageReporting)
    }

    /// hv's balloon for this configuration; a fault names what hv cannot do.
    package func hvBalloon() throws(Fault) -> VMDefinition.Balloon {
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
package struct BalloonUpdate: Decodable, Sendable {
    package var amountMib: Int
    package enum CodingKeys: String, CodingKey, CaseIterable { case amountMib = "amount_mib" }
    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        amountMib = try decoder.container(keyedBy: CodingKeys.self).decode(Int.self, forKey: .amountMib)
    }
}

/// `PATCH /balloon/statistics`.
package struct BalloonStatisticsUpdate: Decodable, Sendable {
    package var statsPollingIntervalS: Int
    package enum CodingKeys: String, CodingKey, CaseIterable { case statsPollingIntervalS = "stats_polling_interval_s" }
    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        statsPollingIntervalS = try decoder.container(keyedBy: CodingKeys.self).decode(Int.self, forKey: .statsPollingIntervalS)
    }
}

/// `PUT /boot-source`.
package struct BootSource: Codable, Sendable, Equatable {
    package var kernelImagePath: String
    package var bootArgs: String?
    package var initrdPath: String?

    package enum CodingKeys: String, CodingKey, CaseIterable {
        case kernelImagePath = "kernel_image_path", bootArgs = "boot_args", initrdPath = "initrd_path"
    }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        kernelImagePath = try c.decode(String.self, forKey: .kernelImagePath)
        bootArgs = try c.decodeIfPresent(String.self, forKey: .bootArgs)
        initrdPath = try c.decodeIfPresent(String.self, forKey: .initrdPath)
    }
}

/// A token bucket of a rate limiter (`refill_time` in milliseconds), as hv's devices enforce it.
package struct TokenBucket: Codable, Sendable, Equatable {
    package var size: Int64
    package var oneTimeBurst: Int64?
    package var refillTime: Int64

    package enum CodingKeys: String, CodingKey, CaseIterable { case size, oneTimeBurst = "one_time_burst", refillTime = "refill_time" }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        size = try c.decode(Int64.self, forKey: .size)
        oneTimeBurst = try c.decodeIfPresent(Int64.self, forKey: .oneTimeBurst)
        refillTime = try c.decode(Int64.self, forKey: .refillTime)
    }
}

package struct RateLimiter: Codable, Sendable, Equatable {
    package var bandwidth: TokenBucket?
    package var ops: TokenBucket?

    package enum CodingKeys: String, CodingKey, CaseIterable { case bandwidth, ops }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        bandwidth = try c.decodeIfPresent(TokenBucket.self, forKey: .bandwidth)
        ops = try c.decodeIfPresent(TokenBucket.self, forKey: .ops)
    }

    /// Whether it limits anything (`{}` does not: clients send it for "no limit").
    package var limits: Bool { bandwidth != nil || ops != nil }

    /// hv's rate limit for it (nil: unlimited); a bucket hv cannot take is a fault naming `what`.
    package func hvLimit(_ what: String) throws(Fault) -> VMDefinition.RateLimit? {
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
package struct Drive: Codable, Sendable, Equatable {
    package var driveId: String
    package var pathOnHost: String?
    package var isRootDevice: Bool
    package var isReadOnly: Bool?
    package var partuuid: String?
    package var cacheType: String?
    package var ioEngine: String?
    package var rateLimiter: RateLimiter?
    package var socket: String?

    package enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id", pathOnHost = "path_on_host", isRootDevice = "is_root_device", isReadOnly = "is_read_only", partuuid
        case cacheType = "cache_type", ioEngine = "io_engine", rateLimiter = "rate_limiter", socket
    }

    package init(from decoder: any Decoder) throws {
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
package struct PartialDrive: Codable, Sendable, Equatable {
    package var driveId: String
    package var pathOnHost: String?
    package var rateLimiter: RateLimiter?

    package enum CodingKeys: String, CodingKey, CaseIterable { case driveId = "drive_id", pathOnHost = "path_on_host", rateLimiter = "rate_limiter" }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
    }
}

/// `PUT /network-interfaces/{iface_id}`.
package struct NetworkInterface: Codable, Sendable, Equatable {
    package var ifaceId: String
    package var hostDevName: String
    package var guestMac: String?
    package var mtu: Int?
    package var rxRateLimiter: RateLimiter?
    package var txRateLimiter: RateLimiter?

    package enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id", hostDevName = "host_dev_name", guestMac = "guest_mac", mtu
        case rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter"
    }

    package init(from decoder: any Decoder) throws {
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
package struct PartialNetworkInterface: Codable, Sendable, Equatable {
    package var ifaceId: String
    package var rxRateLimiter: RateLimiter?
    package var txRateLimiter: RateLimiter?

    package enum CodingKeys: String, CodingKey, CaseIterable { case ifaceId = "iface_id", rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter" }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }
}

/// `PUT /logger`.
package struct LoggerConfig: Codable, Sendable, Equatable {
    package var logPath: String?
    package var level: String?
    package var showLevel: Bool?
    package var showLogOrigin: Bool?
    package var module: String?

    package enum CodingKeys: String, CodingKey, CaseIterable { case logPath = "log_path", level, showLevel = "show_level", showLogOrigin = "show_log_origin", module }

    package init(logPath: String?, level: String?, showLevel: Bool?, showLogOrigin: Bool?) {
        self.logPath = logPath
        self.level = level
        self.showLevel = showLevel
        self.showLogOrigin = showLogOrigin
    }

    package init(from decoder: any Decoder) throws {
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
package struct MetricsConfig: Codable, Sendable, Equatable {
    package var metricsPath: String

    package enum CodingKeys: String, CodingKey, CaseIterable { case metricsPath = "metrics_path" }

    package init(metricsPath: String) { self.metricsPath = metricsPath }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        metricsPath = try decoder.container(keyedBy: CodingKeys.self).decode(String.self, forKey: .metricsPath)
    }
}

/// `PUT /actions`.
package struct InstanceActionInfo: Decodable, Sendable {
    package enum Action: String, Decodable, Sendable { case instanceStart = "InstanceStart", sendCtrlAltDel = "SendCtrlAltDel", flushMetrics = "FlushMetrics" }
    package var actionType: Action

    package enum CodingKeys: String, CodingKey, CaseIterable { case actionType = "action_type" }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        actionType = try decoder.container(keyedBy: CodingKeys.self).decode(Action.self, forKey: .actionType)
    }
}

/// `PATCH /vm`.
package struct VMState: Decodable, Sendable {
    package enum State: String, Decodable, Sendable { case paused = "Paused", resumed = "Resumed" }
    package var state: State

    package enum CodingKeys: String, CodingKey, CaseIterable { case state }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        state = try decoder.container(keyedBy: CodingKeys.self).decode(State.self, forKey: .state)
    }
}

/// `PUT /snapshot/create`. hv's snapshot is a directory: `snapshot_path` names it, and
/// `mem_file_path` becomes a link to the memory image inside it.
package struct SnapshotCreateParams: Decodable, Sendable {
    package var snapshotPath: String
    package var memFilePath: String
    package var snapshotType: String?

    package enum CodingKeys: String, CodingKey, CaseIterable { case snapshotPath = "snapshot_path", memFilePath = "mem_file_path", snapshotType = "snapshot_type" }

    package init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue), allowingNull: true)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decode(String.self, forKey: .memFilePath)
        snapshotType = try c.decodeIfPresent(String.self, forKey: .snapshotType)
    }
}

/// `PUT /snapshot/load`.
package struct SnapshotLoadParams: Decodable, Sendable {
    package var snapshotPath: String
    package var memFilePath: String?
    package var resumeVM: Bool?
    package var enableDiffSnapshots: Bool?
    package var trackDirtyPages: Bool?
    package var hasMemBackend: Bool
    package var hasOverrides: Bool

    package enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotPath = "snapshot_path", memFilePath = "mem_file_path", resumeVM = "resume_vm", enableDiffSnapshots = "enable_diff_snapshots"
        case trackDirtyPages = "track_dirty_pages", memBackend = "mem_backend", networkOverrides = "network_overrides"
        case vsockOverride = "vsock_override", clockRealtime = "clock_realtime"
    }

    package init(from decoder: any Decoder) throws {
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
package struct FullVMConfiguration: Codable, Sendable {
    package var bootSource: BootSource?
    package var drives: [Drive]?
    package var machineConfig: MachineConfiguration?
    package var networkInterfaces: [NetworkInterface]?
    package var logger: LoggerConfig?
    package var metrics: MetricsConfig?
    package var balloon: BalloonConfig?

    package enum CodingKeys: String, CodingKey, CaseIterable {
        case bootSource = "boot-source", drives, machineConfig = "machine-config", networkInterfaces = "network-interfaces", logger, metrics, balloon
    }

    /// Devices Firecracker has and hv does not: a configuration naming one is refused.
    package static let unsupportedSections = ["vsock", "mmds-config", "entropy", "cpu-config", "pmem", "memory-hotplug", "serial"]

    package init(bootSource: BootSource?, drives: [Drive], machineConfig: MachineConfiguration, networkInterfaces: [NetworkInterface],
         logger: LoggerConfig?, metrics: MetricsConfig?, balloon: BalloonConfig?) {
        self.balloon = balloon
        self.bootSource = bootSource
        self.drives = drives
        self.machineConfig = machineConfig
        self.networkInterfaces = networkInterfaces
        self.logger = logger
        self.metrics = metrics
    }

    package init(from decoder: any Decoder) throws {
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

package struct AnySectionKey: CodingKey {
    package var stringValue: String
    package var intValue: Int? { nil }
    package init(_ string: String) { stringValue = string }
    package init(stringValue: String) { self.stringValue = stringValue }
    package init?(intValue: Int) { nil }
}

/// `GET /`.
package struct InstanceInfo: Encodable, Sendable {
    package var appName = "Firecracker"
    package var id: String
    package var state: String
    package var vmmVersion: String

    package init(id: String, state: String, vmmVersion: String) {
        self.id = id
        self.state = state
        self.vmmVersion = vmmVersion
    }

    package enum CodingKeys: String, CodingKey { case appName = "app_name", id, state, vmmVersion = "vmm_version" }
}

/// `GET /version`.
package struct FirecrackerVersion: Encodable, Sendable {
    package var firecrackerVersion: String
    package enum CodingKeys: String, CodingKey { case firecrackerVersion = "firecracker_version" }
    package init(firecrackerVersion: String) { self.firecrackerVersion = firecrackerVersion }
}

/// Every error: HTTP 400 and `{"fault_message": "…"}`, as Firecracker answers.
package struct Fault: Error, Sendable {
    package var message: String
    package init(_ message: String) { self.message = message }
    package struct Body: Encodable {
        package var faultMessage: String
        enum CodingKeys: String, CodingKey { case faultMessage = "fault_message" }
        package init(faultMessage: String) { self.faultMessage = faultMessage }
    }
}

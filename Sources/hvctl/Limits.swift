import ArgumentParser
import HVHost

/// The resource-limit flags, for `hvctl run` and `hvctl set`.
struct LimitFlags: ParsableArguments {
    @Option(help: ArgumentHelp("CPU time the whole VM may use, in CPUs (0.2 = 20 % of one CPU; default: no quota).", valueName: "cpus"))
    var cpuQuota: Double?
    @Option(help: ArgumentHelp("The VM's share of contended CPU, 1-10000 (default 100).", valueName: "weight"))
    var cpuWeight: UInt32?
    @Option(help: ArgumentHelp("The whole VM's memory: guest RAM, core, devices, page cache (default: guest RAM + 256M).", valueName: "size"))
    var memoryLimit: String?
    @Option(help: ArgumentHelp("Each device process's own memory cap; one over it is OOM-killed and restarted (default: only the VM's limit).", valueName: "size"))
    var deviceMemoryLimit: String?
    @Option(help: ArgumentHelp("Processes and threads in the whole VM (default 1024).", valueName: "count"))
    var pidsLimit: UInt64?
    @Option(help: ArgumentHelp("Each disk's I/O to the block device its image lies on (cgroup io/blkio): read_bps=RATE,write_bps=RATE,read_iops=N,write_iops=N; 0 removes one.", valueName: "limits"))
    var diskIOLimit: String?

    var anyGiven: Bool { limits() != nil }

    /// The limits given; nil when none is. Sizes are checked by `limitsChecked()`.
    func limits() -> VMDefinition.Limits? {
        let l = VMDefinition.Limits(cpuQuota: cpuQuota, cpuWeight: cpuWeight, memoryMiB: memoryLimit.map { _ in 0 },
                                    deviceMemoryMiB: deviceMemoryLimit.map { _ in 0 }, pids: pidsLimit,
                                    diskIO: diskIOLimit.map { _ in VMDefinition.Limits.DiskIO() })
        return l.isEmpty ? nil : l
    }

    /// The limits given, sizes parsed (whole MiB); nil when none is.
    func limitsChecked() throws(UsageError) -> VMDefinition.Limits? {
        func mib(_ text: String?, _ flag: String) throws(UsageError) -> UInt64? {
            guard let text else { return nil }
            return try parseMiB(text, flag: flag, example: "512M")
        }
        guard var l = limits() else { return nil }
        l.memoryMiB = try mib(memoryLimit, "--memory-limit")
        l.deviceMemoryMiB = try mib(deviceMemoryLimit, "--device-memory-limit")
        if let diskIOLimit { l.diskIO = try Self.diskIO(diskIOLimit) }
        return l
    }

    /// `read_bps=10M,write_iops=200,…`.
    static func diskIO(_ spec: String) throws(UsageError) -> VMDefinition.Limits.DiskIO {
        var io = VMDefinition.Limits.DiskIO()
        for part in spec.split(separator: ",", omittingEmptySubsequences: false) {
            guard let equals = part.firstIndex(of: "=") else {
                throw UsageError(message: "invalid --disk-io-limit '\(spec)': \(VMDefinition.Limits.DiskIO.flagHint)")
            }
            let key = String(part[..<equals]), value = String(part[part.index(after: equals)...])
            switch key {
            case "read_bps", "write_bps":
                let bytes = value == "0" ? 0 : try parseSize(value, flag: "--disk-io-limit \(key)")
                if key == "read_bps" { io.readBps = bytes } else { io.writeBps = bytes }
            case "read_iops", "write_iops":
                guard let n = UInt64(value) else { throw UsageError(message: "invalid --disk-io-limit \(key) '\(value)': give operations a second, e.g. 200") }
                if key == "read_iops" { io.readIops = n } else { io.writeIops = n }
            default:
                throw UsageError(message: "invalid --disk-io-limit '\(spec)': \(VMDefinition.Limits.DiskIO.flagHint)")
            }
        }
        return io
    }
}

extension HVCtl {
    struct SetLimits: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "set", abstract: "Change a running VM's resource limits (its cgroups); what is not given stays.",
            discussion: "'hvctl status NAME' shows the limits in force and what the VM uses.")
        @OptionGroup var vm: VMName
        @OptionGroup var limits: LimitFlags
        @Option(name: .customLong("rate"), help: ArgumentHelp("""
            A disk's or NIC's rate limit: disk0:bps=10M,iops=500 or net0:rx_bps=1M,tx_bps=1M,rx_pps=N,tx_pps=N \
            (a second's worth; 0 removes that limit, 'none' all of the device's; what is not named stays). Repeatable.
            """, valueName: "device:limits"))
        var rates: [String] = []

        func run() throws {
            let change = try limits.limitsChecked()
            guard change != nil || !rates.isEmpty else {
                throw UsageError(message: "give at least one limit to change, e.g. --cpu-quota 0.5, --disk-io-limit read_bps=10M or --rate disk0:bps=10M")
            }
            var request = ControlRequest(.setLimits)
            request.limits = change
            if !rates.isEmpty {
                // The limits in force, which the shorthands edit.
                guard let status = ask(vm.name, ControlRequest(.status)).status else { fail("\(vm.name) sent no status") }
                request.rates = try rates.map { spec throws(UsageError) in try Self.rateChange(spec, status: status) }
            }
            // Through hvd when it keeps the VM, so the change is in its audit log.
            struct Body: Encodable {
                var limits: VMDefinition.Limits?
                var rates: [ControlRequest.RateChange]?
            }
            if let answer = throughHVD(vm.name, "PUT", "/limits", body: ControlJSON.encode(Body(limits: request.limits, rates: request.rates))) {
                print(answer.actionMessage ?? "limits set")
            } else {
                print(ask(vm.name, request).message ?? "limits set")
            }
        }

        /// `DEV:k=v,…` (or `DEV:none`) applied to the device's limits in `status`.
        static func rateChange(_ spec: String, status: VMStatus) throws(UsageError) -> ControlRequest.RateChange {
            guard let colon = spec.firstIndex(of: ":") else {
                throw UsageError(message: "invalid --rate '\(spec)': use DEVICE:LIMITS, e.g. disk0:bps=10M,iops=500 or net0:tx_bps=1M")
            }
            let device = String(spec[..<colon]), text = String(spec[spec.index(after: colon)...])
            let parts = text == "none" ? [] : text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            if let disk = status.disks.first(where: { $0.device == device }) {
                var limit = text == "none" ? nil : disk.rateLimit
                for part in parts where !(try RateShorthand.apply(part, to: &limit, prefix: "", opsKey: "iops", what: "--rate \(device)")) {
                    throw UsageError(message: "invalid --rate '\(spec)': a disk takes bps=RATE and iops=N (0: no limit), or none")
                }
                return ControlRequest.RateChange(device: device, limit: limit)
            }
            if let nic = status.nics.first(where: { $0.device == device }) {
                var rx = text == "none" ? nil : nic.rxRateLimit, tx = text == "none" ? nil : nic.txRateLimit
                for part in parts {
                    if try RateShorthand.apply(part, to: &rx, prefix: "rx_", opsKey: "pps", what: "--rate \(device)") { continue }
                    if try RateShorthand.apply(part, to: &tx, prefix: "tx_", opsKey: "pps", what: "--rate \(device)") { continue }
                    throw UsageError(message: "invalid --rate '\(spec)': a NIC takes rx_bps=, tx_bps=, rx_pps=, tx_pps= (0: no limit), or none")
                }
                return ControlRequest.RateChange(device: device, rx: rx, tx: tx)
            }
            throw UsageError(message: "invalid --rate '\(spec)': \(status.name) has no disk or NIC '\(device)' (its disks and NICs: \((status.disks.map(\.device) + status.nics.map(\.device)).joined(separator: ", ")))")
        }
    }
}

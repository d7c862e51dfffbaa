import Foundation
import HVHost
import Prometheus

/// `GET /metrics`: every kept VM in Prometheus's text format, read afresh at each scrape from
/// the VM's control socket (state, restarts) and from /proc (CPU time of each vCPU thread and
/// device process, resident memory). Nothing is cached, so a scrape never reports a VM that
/// has gone.
enum Metrics {
    /// The metrics of the VMs `scope` sees.
    static func render(_ service: VMService, _ scope: Scope) async -> [UInt8] {
        let kept = service.store.all.filter(scope.sees)
        return await blocking {
            let registry = PrometheusCollectorRegistry()
            var states = ["starting": 0, "running": 0, "paused": 0, "stopped": 0]
            for vm in kept {
                let labels = [("vm", vm.name)]
                let status = service.liveStatus(vm.name)
                let state = status?.state ?? "stopped"
                states[state, default: 0] += 1
                registry.makeGauge(name: "hv_vm_up", labels: labels, help: "1 while the VM's core runs (starting, running or paused), else 0.")
                    .set(Int64(status == nil ? 0 : 1))
                registry.makeGauge(name: "hv_vm_paused", labels: labels, help: "1 while the VM is paused.").set(Int64(state == "paused" ? 1 : 0))
                registry.makeGauge(name: "hv_vm_memory_bytes", labels: labels, help: "Guest RAM the VM is defined with.")
                    .set(Int64(vm.definition.memoryMiB << 20))
                registry.makeGauge(name: "hv_vm_vcpus", labels: labels, help: "vCPUs the VM is defined with.").set(Int64(vm.definition.cpus))
                guard let status else { continue }
                registry.makeGauge(name: "hv_vm_uptime_seconds", labels: labels, help: "Seconds since the VM's core started.")
                    .set(Int64(status.uptimeSeconds))
                if let resident = ProcFS.residentBytes(status.pid) {
                    registry.makeGauge(name: "hv_vm_core_resident_bytes", labels: labels,
                                       help: "Resident memory of the VM's core process, guest RAM it has touched included.").set(resident)
                }
                for (vcpu, seconds) in ProcFS.vcpuSeconds(status.pid) {
                    registry.makeCounter(name: "hv_vcpu_seconds_total", labels: labels + [("vcpu", String(vcpu))],
                                         help: "CPU time of each vCPU thread (guest and host mode).").increment(by: seconds)
                }
                for vcpu in status.vcpus {
                    guard let exits = vcpu.exits else { continue }
                    for (kind, count) in [("io", exits.io), ("mmio", exits.mmio), ("interrupted", exits.interrupted), ("halt", exits.halt)] {
                        registry.makeCounter(name: "hv_vcpu_exits_total", labels: labels + [("vcpu", String(vcpu.id)), ("kind", kind)],
                                             help: "Exits to user space by kind (port I/O, MMIO, kicks, halts); KVM's in-kernel exits are not counted.")
                            .increment(by: Int64(count))
                    }
                }
                for device in status.devices {
                    let deviceLabels = labels + [("device", device.name), ("kind", device.kind)]
                    registry.makeGauge(name: "hv_device_up", labels: deviceLabels, help: "1 while the device process runs.")
                        .set(Int64(device.state == "running" ? 1 : 0))
                    registry.makeCounter(name: "hv_device_restarts_total", labels: deviceLabels,
                                         help: "Times the device process was restarted (crashes, restarts and upgrades).")
                        .increment(by: Int64(device.restarts))
                    if let pid = device.pid, let seconds = ProcFS.cpuSeconds(pid) {
                        registry.makeCounter(name: "hv_device_cpu_seconds_total", labels: deviceLabels,
                                             help: "CPU time of the device's current process.").increment(by: seconds)
                    }
                    if let pid = device.pid, let resident = ProcFS.residentBytes(pid) {
                        registry.makeGauge(name: "hv_device_resident_bytes", labels: deviceLabels,
                                           help: "Resident memory of the device's process.").set(resident)
                    }
                    // The kernel's count of the process's I/O, not the device's own word: a disk's
                    // guest reads and writes of its image (preadv/pwritev, page cache hits
                    // included), plus a few bytes per doorbell (eventfd) read or write.
                    if let pid = device.pid, let io = ProcFS.io(pid) {
                        for (name, key, help) in [
                            ("hv_device_read_bytes_total", "rchar", "Bytes the device's current process read (a disk: the guest's reads of its image, cached or not)."),
                            ("hv_device_written_bytes_total", "wchar", "Bytes the device's current process wrote (a disk: the guest's writes to its image)."),
                            ("hv_device_read_calls_total", "syscr", "Read system calls of the device's current process (a disk: about one per guest read, plus doorbell reads)."),
                            ("hv_device_write_calls_total", "syscw", "Write system calls of the device's current process (a disk: about one per guest write, plus doorbell writes)."),
                            ("hv_device_storage_read_bytes_total", "read_bytes", "Bytes the device's current process had fetched from storage (page cache misses)."),
                            ("hv_device_storage_written_bytes_total", "write_bytes", "Bytes the device's current process dirtied for storage."),
                        ] {
                            if let value = io[key] { registry.makeCounter(name: name, labels: deviceLabels, help: help).increment(by: value) }
                        }
                    }
                }
                for nic in status.nics {
                    guard let traffic = nic.traffic else { continue }
                    let nicLabels = labels + [("device", nic.device)]
                    for (name, value, help) in [
                        ("hv_nic_sent_frames_total", traffic.sentFrames, "Frames the guest sent (the host kernel's count of a tap, the switch's of a segment port)."),
                        ("hv_nic_sent_bytes_total", traffic.sentBytes, "Bytes the guest sent."),
                        ("hv_nic_received_frames_total", traffic.receivedFrames, "Frames the tap or the segment passed to the guest's NIC."),
                        ("hv_nic_received_bytes_total", traffic.receivedBytes, "Bytes the tap or the segment passed to the guest's NIC."),
                        ("hv_nic_sent_dropped_total", traffic.sentDropped, "Frames the guest sent that the host dropped."),
                        ("hv_nic_received_dropped_total", traffic.receivedDropped, "Frames for the guest the tap or the segment dropped (the NIC did not take them in time)."),
                    ] {
                        registry.makeCounter(name: name, labels: nicLabels, help: help).increment(by: Int64(clamping: value))
                    }
                }
            }
            for (state, count) in states.sorted(by: { $0.key < $1.key }) {
                registry.makeGauge(name: "hv_vms", labels: [("state", state)], help: "VMs hvd keeps, by state.").set(Int64(count))
            }
            if let resident = ProcFS.residentBytes(getpid()) {
                registry.makeGauge(name: "hvd_resident_bytes", help: "Resident memory of hvd itself.").set(resident)
            }
            var text: [UInt8] = []
            registry.emit(into: &text)
            return text
        }
    }
}

/// What /proc tells about a process.
enum ProcFS {
    static let clockTicks = Double(sysconf(Int32(_SC_CLK_TCK)))
    static let pageSize = Int64(sysconf(Int32(_SC_PAGESIZE)))

    /// utime + stime of /proc/PID[/task/TID]/stat, in seconds.
    static func cpuSeconds(_ pid: Int32, thread: Int32? = nil) -> Double? {
        let path = "/proc/\(pid)" + (thread.map { "/task/\($0)" } ?? "") + "/stat"
        guard let text = try? String(contentsOfFile: path, encoding: .utf8), let end = text.lastIndex(of: ")") else { return nil }
        // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
        let fields = text[text.index(after: end)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / clockTicks
    }

    /// The thread's name (`comm`).
    static func threadName(_ pid: Int32, _ tid: Int32) -> String? {
        (try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// CPU seconds of each vCPU thread of a VM's core (named `hv-vcpuN`), by vCPU number.
    static func vcpuSeconds(_ pid: Int32) -> [(Int, Double)] {
        let tids = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []).compactMap { Int32($0) }
        return tids.compactMap { tid -> (Int, Double)? in
            guard let name = threadName(pid, tid), name.hasPrefix("hv-vcpu"), let vcpu = Int(name.dropFirst(7)),
                  let seconds = cpuSeconds(pid, thread: tid) else { return nil }
            return (vcpu, seconds)
        }.sorted { $0.0 < $1.0 }
    }

    /// The counters of /proc/PID/io (rchar, wchar, syscr, syscw, read_bytes, write_bytes, …).
    static func io(_ pid: Int32) -> [String: Int64]? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/io", encoding: .utf8) else { return nil }
        var counters: [String: Int64] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            if parts.count == 2, let value = Int64(parts[1].trimmingCharacters(in: .whitespaces)) { counters[String(parts[0])] = value }
        }
        return counters
    }

    /// Resident set size from /proc/PID/statm.
    static func residentBytes(_ pid: Int32) -> Int64? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/statm", encoding: .utf8) else { return nil }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = Int64(fields[1]) else { return nil }
        return pages * pageSize
    }
}

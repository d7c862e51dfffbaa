import ArgumentParser
import Glibc
import HVHost
import HVSys

extension HVCtl {
    struct Balloon: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "balloon",
            abstract: "A running VM's memory balloon: 'balloon NAME' shows it, 'balloon NAME SIZE' asks the guest to give up SIZE of its RAM.",
            discussion: """
                The VM needs a balloon device (hvctl run --balloon on, or "balloon" in its definition) and a balloon \
                driver in the guest. The pages the guest puts in the balloon are given back to the host at once; \
                SIZE 0 lets the guest take them all back.
                """)
        @OptionGroup var vm: VMName
        @Argument(help: ArgumentHelp("Guest RAM the balloon should hold: 64M, 1G, or a number of MiB.", valueName: "size"))
        var size: String?
        @Option(help: ArgumentHelp("Seconds between the guest's memory statistics (0: never asked for).", valueName: "seconds"))
        var statsInterval: Int?
        @Flag(help: "Wait (at most 60 s) until the guest's driver holds SIZE.") var wait = false
        @Flag(help: "Print the balloon as JSON.") var json = false

        mutating func validate() throws {
            if wait && size == nil { throw UsageError(message: "--wait needs a SIZE to wait for") }
        }

        func run() throws {
            var target: UInt64?
            if size == "0" {
                target = 0
            } else if let size {
                target = try parseMiB(size, flag: "size", example: "64M")
            }
            if target != nil || statsInterval != nil {
                var request = ControlRequest(.balloon)
                request.sizeMiB = target
                request.statsIntervalSeconds = statsInterval
                var body: [String: Int] = [:]
                body["size_mib"] = target.map { Int($0) }
                body["stats_interval_s"] = statsInterval
                let message: String
                if let answer = throughHVD(vm.name, "PUT", "/balloon", body: ControlJSON.encode(body)) {
                    message = answer.actionMessage ?? "balloon of \(vm.name) changed"
                } else {
                    message = ask(vm.name, request).message ?? "balloon of \(vm.name) changed"
                }
                if !json { print(message) }
            }
            var balloon = try current()
            if wait, let target {
                let deadline = monotonicNanoseconds() + 60_000_000_000
                while balloon.balloon.actualMiB != target {
                    guard monotonicNanoseconds() < deadline else {
                        fail("the guest's balloon holds \(balloon.balloon.actualMiB) MiB after 60 s, not the \(target) MiB asked for\(balloon.balloon.driverReady ? "" : " (no driver in the guest runs the balloon)")")
                    }
                    usleep(100_000)
                    balloon = try current()
                }
            }
            if json {
                printJSON(balloon.balloon)
                return
            }
            guard size == nil && statsInterval == nil || wait else { return }
            let b = balloon.balloon
            let features = [b.statistics ? "statistics" : nil, b.freePageReporting ? "free page reporting" : nil, b.deflateOnOOM ? "deflate on OOM" : nil]
                .compactMap { $0 }
            print("balloon:   asked for \(b.targetMiB) MiB, the guest holds \(b.actualMiB) MiB"
                  + (b.driverReady ? " (driver ready\(features.isEmpty ? "" : "; " + features.joined(separator: ", ")))" : " (no driver in the guest yet)"))
            if let host = balloon.hostBytes {
                print("guest RAM: \(mebibytes(host)) of \(balloon.memoryMiB) MiB on the host")
            }
            print("pages:     \(b.inflatedPages) inflated, \(b.deflatedPages) deflated, \(b.reportedPages) reported free")
            if let stats = b.stats {
                let shown = stats.sorted { $0.key < $1.key }.map { key, value in
                    key.hasSuffix("_memory") || key == "disk_caches" ? "\(key) \(mebibytes(value)) MiB" : "\(key) \(value)"
                }
                print("guest:     \(shown.joined(separator: ", "))\(b.statsAgeMs.map { " (\($0 / 1000) s ago)" } ?? "")")
            }
        }

        private func current() throws -> (balloon: VMStatus.Balloon, hostBytes: UInt64?, memoryMiB: UInt64) {
            guard let status = ask(vm.name, ControlRequest(.status)).status else { fail("VM '\(vm.name)' answered without a status") }
            guard let balloon = status.balloon else {
                throw UsageError(message: "\(vm.name) has no balloon device: start it with --balloon on (or \"balloon\" in its definition)")
            }
            return (balloon, status.guestMemoryHostBytes, status.memoryMiB)
        }

        private func mebibytes(_ bytes: UInt64) -> String {
            let tenths = bytes * 10 / (1 << 20)
            return "\(tenths / 10).\(tenths % 10)"
        }
    }
}

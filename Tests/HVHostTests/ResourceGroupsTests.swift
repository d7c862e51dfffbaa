@testable import HVHost
import Foundation
import HVSys
import XCTest

/// Reading the host's cgroup layout (v1, v2, hybrid, inside a container) and what each limit
/// writes on either version: the v2 side is checked here, over the files it would write.
final class ResourceGroupsTests: XCTestCase {
    /// This CI machine: v1 controllers each in their own hierarchy (memory only writable below
    /// the shell's group), plus a v2 tree with no controller hv uses.
    func testTheHybridLayoutUsesTheV1Hierarchies() {
        let mountinfo = """
            30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
            31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
            32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
            34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
            38 30 0:34 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
            40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
            """
        let selfCgroup = "8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n"
        let layout = CGroupLayout.detect(mountinfo: mountinfo, selfCgroup: selfCgroup) { _ in ["hugetlb"] }
        XCTAssertEqual(layout.hierarchies, [
            CGroupHierarchy(version: .v1, mountPoint: "/sys/fs/cgroup/cpu", ownGroup: "/sys/fs/cgroup/cpu", controllers: ["cpu"]),
            CGroupHierarchy(version: .v1, mountPoint: "/sys/fs/cgroup/memory", ownGroup: "/sys/fs/cgroup/memory/process_api/abc", controllers: ["memory"]),
            CGroupHierarchy(version: .v1, mountPoint: "/sys/fs/cgroup/pids", ownGroup: "/sys/fs/cgroup/pids", controllers: ["pids"]),
        ])
    }

    func testAPureV2HostUsesTheUnifiedTreeWithItsEnabledControllers() {
        let mountinfo = "25 20 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
        var asked: [String] = []
        let layout = CGroupLayout.detect(mountinfo: mountinfo, selfCgroup: "0::/system.slice/hv.service\n") { group in
            asked.append(group)
            return ["cpuset", "cpu", "io", "memory", "pids"]
        }
        XCTAssertEqual(asked, ["/sys/fs/cgroup/system.slice/hv.service"])
        XCTAssertEqual(layout.hierarchies, [
            CGroupHierarchy(version: .v2, mountPoint: "/sys/fs/cgroup", ownGroup: "/sys/fs/cgroup/system.slice/hv.service", controllers: ["cpu", "memory", "pids", "io"]),
        ])
        // A controller not enabled here is not offered (limits needing it are refused).
        let partial = CGroupLayout.detect(mountinfo: mountinfo, selfCgroup: "0::/\n") { _ in ["memory"] }
        XCTAssertNil(partial.hierarchy(for: "cpu"))
        XCTAssertEqual(partial.hierarchy(for: "memory")?.ownGroup, "/sys/fs/cgroup")
    }

    /// In a container the mount's root is the container's group: paths are taken relative to it;
    /// co-mounted controllers share one hierarchy; a second mount of one hierarchy is ignored.
    func testContainerRootsAndCoMountedControllers() {
        let mountinfo = """
            50 40 0:40 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
            51 40 0:41 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
            52 40 0:41 /docker/abc /mnt/again rw - cgroup cgroup rw,memory
            """
        let layout = CGroupLayout.detect(mountinfo: mountinfo, selfCgroup: "3:cpu,cpuacct:/docker/abc/inner\n2:memory:/docker/abc\n") { _ in [] }
        XCTAssertEqual(layout.hierarchies, [
            CGroupHierarchy(version: .v1, mountPoint: "/sys/fs/cgroup/cpu,cpuacct", ownGroup: "/sys/fs/cgroup/cpu,cpuacct/inner", controllers: ["cpu"]),
            CGroupHierarchy(version: .v1, mountPoint: "/sys/fs/cgroup/memory", ownGroup: "/sys/fs/cgroup/memory", controllers: ["memory"]),
        ])
        XCTAssertNil(layout.hierarchy(for: "pids"))
        XCTAssertEqual(CGroupLayout.detect(mountinfo: "", selfCgroup: "") { _ in [] }.hierarchies, [])
    }

    func testWhatEachVersionWritesForTheLimits() {
        let limits = EffectiveLimits(.init(cpuQuota: 0.25, cpuWeight: 50, memoryMiB: 512, pids: 64), guestMemoryMiB: 256)
        let all = ["cpu", "memory", "pids"]
        let v1 = ResourceGroups.vmSettings(CGroupHierarchy(version: .v1, mountPoint: "/", ownGroup: "/", controllers: all), limits)
        XCTAssertEqual(v1.map { "\($0.file)=\($0.value)" }, ["cpu.cfs_period_us=100000", "cpu.cfs_quota_us=25000", "cpu.shares=512",
                                                             "memory.limit_in_bytes=536870912", "pids.max=64"])
        let v2 = ResourceGroups.vmSettings(CGroupHierarchy(version: .v2, mountPoint: "/", ownGroup: "/", controllers: all), limits)
        XCTAssertEqual(v2.map { "\($0.file)=\($0.value)" }, ["cpu.max=25000 100000", "cpu.weight=50", "memory.max=536870912", "pids.max=64"])
        let memoryOnly = CGroupHierarchy(version: .v2, mountPoint: "/", ownGroup: "/", controllers: ["memory"])
        XCTAssertEqual(ResourceGroups.deviceSettings(memoryOnly, limits).map(\.file), [], "no cap of a device's own unless asked")
        let capped = EffectiveLimits(.init(deviceMemoryMiB: 48), guestMemoryMiB: 256)
        XCTAssertEqual(ResourceGroups.deviceSettings(memoryOnly, capped).map { "\($0.file)=\($0.value)" }, ["memory.max=\(48 << 20)"])
        // Defaults: no quota, weight 100, guest RAM + 256 MiB, 1024 pids.
        let defaults = EffectiveLimits(.init(), guestMemoryMiB: 128)
        let plain = ResourceGroups.vmSettings(CGroupHierarchy(version: .v2, mountPoint: "/", ownGroup: "/", controllers: all), defaults)
        XCTAssertEqual(plain.map { "\($0.file)=\($0.value)" }, ["cpu.max=max 100000", "cpu.weight=100", "memory.max=\(384 << 20)", "pids.max=1024"])
        XCTAssertEqual(ResourceGroups.vmSettings(CGroupHierarchy(version: .v1, mountPoint: "/", ownGroup: "/", controllers: ["cpu"]), defaults)
            .map { "\($0.file)=\($0.value)" }, ["cpu.cfs_period_us=100000", "cpu.cfs_quota_us=-1", "cpu.shares=1024"])
    }

    /// Disk I/O limits go on a disk device's own group for each whole disk its images lie on
    /// (throttling is not hierarchical on v1); a limit removed is written as "none".
    func testWhatEachVersionWritesForDiskIOLimits() {
        let io = VMDefinition.Limits.DiskIO(readBps: 4 << 20, writeIops: 200)
        let limits = EffectiveLimits(.init(diskIO: io), guestMemoryMiB: 64)
        let v1 = CGroupHierarchy(version: .v1, mountPoint: "/", ownGroup: "/", controllers: ["blkio"])
        XCTAssertEqual(ResourceGroups.deviceSettings(v1, limits, blockDevices: ["254:0"]).map { "\($0.file)=\($0.value)" },
                       ["blkio.throttle.read_bps_device=254:0 4194304", "blkio.throttle.write_bps_device=254:0 0",
                        "blkio.throttle.read_iops_device=254:0 0", "blkio.throttle.write_iops_device=254:0 200"])
        let v2 = CGroupHierarchy(version: .v2, mountPoint: "/", ownGroup: "/", controllers: ["memory", "io"])
        XCTAssertEqual(ResourceGroups.deviceSettings(v2, limits, blockDevices: ["8:0", "253:1"]).map { "\($0.file)=\($0.value)" },
                       ["io.max=8:0 rbps=4194304 wbps=max riops=max wiops=200", "io.max=253:1 rbps=4194304 wbps=max riops=max wiops=200"])
        // Removed at run time (all zero): written as no limit; a device without block devices gets nothing.
        let removed = EffectiveLimits(.init(diskIO: .init(readBps: 0)), guestMemoryMiB: 64)
        XCTAssertNil(removed.diskIO)
        XCTAssertEqual(ResourceGroups.deviceSettings(v2, removed, blockDevices: ["8:0"]).map(\.value), ["8:0 rbps=max wbps=max riops=max wiops=max"])
        XCTAssertEqual(ResourceGroups.deviceSettings(v2, limits).count, 0)
        XCTAssertEqual(VMDefinition.Limits(diskIO: io).merging(.init(diskIO: .init(readBps: 0, readIops: 50))).diskIO,
                       .init(readBps: 0, readIops: 50, writeIops: 200))
        XCTAssertEqual(describeLimits(limits), "no cpu quota, cpu weight 100, memory 320 MiB, no device cap, 1024 pids, disk I/O read 4194304 bytes/s, write 200 ops/s")
        XCTAssertThrowsError(try VMDefinition.Limits(diskIO: .init(writeBps: 100)).validate { $0.flag }) {
            XCTAssertEqual(($0 as? UsageError)?.message, "invalid --disk-io-limit write_bps '100': give bytes a second from 4096 (4K) to 1P, or 0 for no limit")
        }
    }

    func testLimitsInADefinitionAreCheckedByKeyPath() throws {
        func message(_ json: String) -> String {
            do {
                let d = try VMDefinition.decode(Array(json.utf8))
                try d.validate(naming: .keys)
                return "valid"
            } catch { return error.message }
        }
        XCTAssertEqual(message(#"{"limits": {"cpu_quota": 0.5, "memory_mib": 512, "pids": 100}}"#), "valid")
        XCTAssertTrue(message(#"{"limits": {"cpu": 1}}"#).contains("'limits.cpu'"), message(#"{"limits": {"cpu": 1}}"#))
        // A document's memory limit is checked against its RAM when the VM starts, not here.
        XCTAssertEqual(message(#"{"memory_mib": 256, "limits": {"memory_mib": 100}}"#), "valid")
        XCTAssertEqual(message(#"{"limits": {"memory_mib": 20}}"#), "invalid limits.memory_mib '20': give 36 MiB to 1 PiB, and at least the guest's RAM + 32 MiB")
        XCTAssertThrowsError(try VMDefinition.Limits(memoryMiB: 100).checkFits(guestMemoryMiB: 256) { "limits.\($0.rawValue)" }) { error in
            XCTAssertEqual((error as? UsageError)?.message,
                           "limits.memory_mib 100 MiB is too small for 256 MiB of guest RAM: give at least 288 MiB (guest RAM + 32 MiB for the core and devices)")
        }
        XCTAssertEqual(message(#"{"limits": {"cpu_weight": 20000}}"#), "invalid limits.cpu_weight '20000': give a weight from 1 to 10000 (default 100)")
        let merged = VMDefinition.Limits(cpuQuota: 1, pids: 64).merging(.init(cpuQuota: 0.5, memoryMiB: 600))
        XCTAssertEqual(merged, VMDefinition.Limits(cpuQuota: 0.5, memoryMiB: 600, pids: 64))
    }

    /// How a new process's placement splits: the `tasks` file of a v1 group is opened for the
    /// child to write 0 into (it joins itself, without the global lock a move by pid takes), a
    /// group without one (v2) is left to the move by pid; and a process with more than one
    /// thread never moves itself that way (a `tasks` write moves only the calling thread).
    func testPlacementSplitsV1GroupsJoinedByTheChildFromTheRest() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("hv-placement-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let v1 = root + "/v1", v2 = root + "/v2"
        for directory in [v1, v2] { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        XCTAssertTrue(FileManager.default.createFile(atPath: v1 + "/tasks", contents: nil))
        let placement = ProcessPlacement(cgroupDirectories: [v1, v2], oomScoreAdjust: 500)
        let (taskFiles, rest) = try placement.openingV1TaskFiles()
        XCTAssertEqual(taskFiles.count, 1)
        XCTAssertEqual(rest, ProcessPlacement(cgroupDirectories: [v2], oomScoreAdjust: 500))
        try taskFiles[0].writeAll(Array("0".utf8))
        XCTAssertEqual(try String(contentsOfFile: v1 + "/tasks", encoding: .utf8), "0", "the descriptor is the v1 group's tasks file")

        // Another thread runs: nothing is written, and the caller is told to move by pid.
        try Data().write(to: URL(fileURLWithPath: v1 + "/tasks"))
        let release = DispatchSemaphore(value: 0), started = DispatchSemaphore(value: 0)
        let thread = Thread { started.signal(); release.wait() }
        thread.start()
        started.wait()
        defer { release.signal() }
        XCTAssertFalse(try ProcessPlacement(cgroupDirectories: [v1]).applyToSingleThreadedSelf())
        XCTAssertEqual(try String(contentsOfFile: v1 + "/tasks", encoding: .utf8), "")
        XCTAssertFalse(try ProcessPlacement(cgroupDirectories: [v2]).applyToSingleThreadedSelf(), "a v2 group has no tasks file")
    }
}

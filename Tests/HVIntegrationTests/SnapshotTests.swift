import Foundation
import XCTest

/// Snapshots, restores and clones (`hvctl snapshot`, `hvctl run --restore [--clone]`) with hv's
/// test guest: a TSC-paced counter, disk I/O in flight, a NIC pinging a peer on a segment, three
/// clones of one template, and every kind of bad snapshot refused in one line.
final class SnapshotTests: XCTestCase {
    private var dir: URL!
    private var runDir: String { dir.appendingPathComponent("run").path }

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-snap-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", runDir, 1)
    }

    override func tearDown() {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? [] where name.hasSuffix(".sock") {
            _ = try? runHvctl(["stop", String(name.dropLast(5))])
        }
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// Starts the test guest in the background as VM `name`.
    private func detached(_ name: String, _ cmdline: String, _ extra: [String] = []) throws {
        let r = try runHvctl(["run", "--multiboot", try Harness.testGuest(), "--cmdline", cmdline, "--memory", "32M", "--name", name, "--detach"] + extra)
        XCTAssertEqual(r.status, 0, r.stderr)
    }

    private func log(_ name: String) -> String {
        (try? String(contentsOfFile: "\(runDir)/\(name).log", encoding: .utf8)) ?? ""
    }

    private func waitForLog(_ name: String, _ text: String, timeout: TimeInterval = 60) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if log(name).contains(text) { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return false
    }

    /// Waits until process `pid` (a VM's core) has ended, its devices reaped and images unlocked.
    private func waitForEnd(_ pid: Int32, timeout: TimeInterval = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if kill(pid, 0) != 0 { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return false
    }

    private func status(_ name: String) throws -> [String: Any] {
        let r = try runHvctl(["status", name, "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
    }

    private func ticks(_ text: String) -> [Int] {
        text.split(separator: "\n").compactMap { $0.hasPrefix("tick ") ? Int($0.dropFirst(5)) : nil }
    }

    /// The guest's TSC-paced counter carries on from where it was: no tick lost, none twice,
    /// still paced (the TSC continued, it did not jump), and the VM powers off at the end.
    func testRestoredGuestCarriesOnCountingFromWhereItWas() throws {
        try detached("counter", "mode=ticks count=30 delay=50")
        XCTAssertTrue(waitForLog("counter", "tick 5"), log("counter"))
        let snapshot = path("counter.snap")
        let saved = try runHvctl(["snapshot", "counter", snapshot, "--stop"])
        XCTAssertEqual(saved.status, 0, saved.stderr)
        XCTAssertTrue(saved.stdout.hasPrefix("saved counter to \(snapshot): "), saved.stdout)
        // Paused: the console holds exactly what the guest printed before the snapshot (the
        // devices drained), possibly ending inside a line.
        let before = log("counter")
        let atSnapshot = ticks(before).last ?? 0
        XCTAssertGreaterThanOrEqual(atSnapshot, 5)
        // Resumed, the original carries on to its end: every tick once, then it powers off. (It
        // is not stopped: a stop raced the guest's own end, and lost when the host was slow.)
        let resumed = try runHvctl(["resume", "counter"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertTrue(waitForLog("counter", "hv-testguest: done\n"), log("counter"))
        XCTAssertEqual(ticks(log("counter")), Array(1...30), log("counter"))
        // Gone once its control socket is (a detached core's zombie may linger, unreaped).
        let socket = "\(runDir)/counter.sock", deadline = Date().addingTimeInterval(30)
        while FileManager.default.fileExists(atPath: socket) && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: socket), "the original VM did not end after its guest did")
        XCTAssertTrue(FileManager.default.fileExists(atPath: snapshot + "/state"))

        let output = path("restored.out")
        let started = Date()
        let restored = try runHvctl(["run", "--restore", snapshot, "--serial", "file:\(output)"], timeout: 60)
        let elapsed = Date().timeIntervalSince(started)
        XCTAssertEqual(restored.status, 0, restored.stderr)
        let text = try String(contentsOfFile: output, encoding: .utf8)
        // What the guest printed before the snapshot and after the restore is one unbroken count.
        let whole = ticks(before + text)
        XCTAssertEqual(whole, Array(1...30), before + "|" + text)
        XCTAssertTrue(text.hasSuffix("hv-testguest: done\n"), text)
        XCTAssertFalse(text.contains("mode=ticks"), "the restored guest booted again: \(text)")
        let first = atSnapshot + 1
        // Paced by the TSC as before: a TSC that jumped ahead would print the rest at once.
        XCTAssertGreaterThan(elapsed, Double(30 - first) * 0.05 * 0.5, text)

        // Restored paused: nothing runs until 'hvctl resume', then it carries on the same way.
        let paused = try runHvctl(["run", "--restore", snapshot, "--paused", "--detach", "--name", "again"])
        XCTAssertEqual(paused.status, 0, paused.stderr)
        XCTAssertEqual(try status("again")["state"] as? String, "paused")
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertEqual(log("again"), "")
        XCTAssertEqual(try runHvctl(["resume", "again"]).status, 0)
        XCTAssertTrue(waitForLog("again", "tick \(first + 1)\n"), log("again"))
        XCTAssertEqual(ticks(before + log("again")).prefix(first + 1), ArraySlice(1...(first + 1)), log("again"))
    }

    /// A snapshot taken while the disk has requests in flight loses none: the restored guest
    /// finishes its write-then-verify rounds without an error, a mismatch or a duplicate, and
    /// is never reset.
    func testSnapshotWithDiskIOInFlightLosesNothing() throws {
        let image = path("disk.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
        XCTAssertEqual(truncate(image, 16 << 20), 0)
        try detached("writer", "mode=vscsistress count=120", ["--disk", image])
        XCTAssertTrue(waitForLog("writer", "vscsi: ready"), log("writer"))
        Thread.sleep(forTimeInterval: 0.3)
        let snapshot = path("writer.snap")
        let saved = try runHvctl(["snapshot", "writer", snapshot, "--stop"])
        XCTAssertEqual(saved.status, 0, saved.stderr)
        XCTAssertTrue(saved.stdout.contains("the VM stays paused"), saved.stdout)
        XCTAssertEqual(try status("writer")["state"] as? String, "paused")
        XCTAssertFalse(log("writer").contains("vscsistress: done"), "the guest finished before the snapshot: make it work longer")
        XCTAssertEqual(try runHvctl(["stop", "writer"]).status, 0)

        let output = path("writer.out")
        let restored = try runHvctl(["run", "--restore", snapshot, "--serial", "file:\(output)"], timeout: 120)
        XCTAssertEqual(restored.status, 0, restored.stderr)
        let text = try String(contentsOfFile: output, encoding: .utf8)
        XCTAssertTrue(text.contains("vscsistress: done rounds=120 requests=960 errors=0 mismatches=0 duplicates=0"), text)
        XCTAssertFalse(text.contains("hv-testguest: mode="), "the restored guest was reset: \(text)")
    }

    /// A NIC on a segment pings its peer again after a restore.
    func testRestoredNICPingsItsPeerAgain() throws {
        let segment = "s\(getpid())"
        try detached("peer", "mode=netpeer ip=10.9.0.2", ["--nic", "net=\(segment),mac=52:54:00:5a:00:02"])
        try detached("pinger", "mode=netping ip=10.9.0.1 peer=10.9.0.2 count=100000", ["--nic", "net=\(segment),mac=52:54:00:5a:00:01"])
        XCTAssertTrue(waitForLog("pinger", "net: reply seq 3 "), log("pinger") + log("peer"))
        let snapshot = path("pinger.snap")
        XCTAssertEqual(try runHvctl(["snapshot", "pinger", snapshot, "--stop"]).status, 0)
        let replies = log("pinger").split(separator: "\n").filter { $0.hasPrefix("net: reply seq ") }.count
        XCTAssertEqual(try runHvctl(["stop", "pinger"]).status, 0)

        // Same name, same MAC: it takes the stopped VM's place on the segment.
        let restored = try runHvctl(["run", "--restore", snapshot, "--detach"])
        XCTAssertEqual(restored.status, 0, restored.stderr)
        XCTAssertTrue(waitForLog("pinger", "net: reply seq "), log("pinger"))
        // The log is read while the guest writes it: a last line may be cut short ("net: reply seq ").
        let seqs = log("pinger").split(separator: "\n").filter { $0.hasPrefix("net: reply seq ") }
            .compactMap { $0.split(separator: " ").dropFirst(3).first.flatMap { Int($0) } }
        XCTAssertGreaterThanOrEqual(seqs.first ?? 0, replies, log("pinger"))
        XCTAssertEqual(try status("pinger")["state"] as? String, "running")
    }

    /// Three clones of one snapshot run side by side, each with its own MAC and its own overlay
    /// on the template's disk, which none of them changes; a fourth under a used name is refused,
    /// and one refused before it ran (the template still running) leaves no overlay behind.
    func testClonesRunSideBySideOnOverlaysAndLeaveTheTemplateUnchanged() throws {
        let image = path("template.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
        XCTAssertEqual(truncate(image, 16 << 20), 0)
        let segment = "c\(getpid())"
        try detached("template", "mode=vscsistress count=40", ["--disk", image, "--nic", "net=\(segment),mac=52:54:00:5b:00:01"])
        XCTAssertTrue(waitForLog("template", "vscsi: ready"), log("template"))
        let snapshot = path("template.snap")
        XCTAssertEqual(try runHvctl(["snapshot", "template", snapshot, "--stop"]).status, 0)
        // Not while the template holds its disk: refused, and the overlay made for it is gone.
        let early = try runHvctl(["run", "--restore", snapshot, "--clone", "--name", "clone1"])
        XCTAssertEqual(early.status, 1, early.stderr)
        XCTAssertTrue(early.stderr.contains("is locked by a process writing it"), early.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(snapshot)/clones/clone1"), "a clone that never ran left its overlay")
        XCTAssertEqual(try runHvctl(["stop", "template"]).status, 0)
        let before = try Data(contentsOf: URL(fileURLWithPath: image))

        var macs: Set<String> = []
        var pids: [Int32] = []
        // Restored paused: a clone left running could finish its work and power off before
        // its status is read (it did once under CI's load).
        for i in 1...3 {
            let r = try runHvctl(["run", "--restore", snapshot, "--clone", "--name", "clone\(i)", "--detach", "--paused"])
            XCTAssertEqual(r.status, 0, r.stderr)
        }
        for i in 1...3 {
            let s = try status("clone\(i)")
            XCTAssertEqual(s["state"] as? String, "paused")
            pids.append(try XCTUnwrap(s["pid"] as? Int32))
            let nic = try XCTUnwrap((s["nics"] as? [[String: Any]])?.first)
            macs.insert(try XCTUnwrap(nic["mac"] as? String))
            let disk = try XCTUnwrap((s["disks"] as? [[String: Any]])?.first)
            XCTAssertEqual(disk["path"] as? String, "\(snapshot)/clones/clone\(i)/disk0.qcow2")
            XCTAssertEqual(disk["backing"] as? [String], [image])
        }
        XCTAssertEqual(macs.count, 3, "\(macs)")
        XCTAssertFalse(macs.contains("52:54:00:5b:00:01"))
        for i in 1...3 { XCTAssertEqual(try runHvctl(["resume", "clone\(i)"]).status, 0) }
        for i in 1...3 {
            XCTAssertTrue(waitForLog("clone\(i)", "hv-testguest: done", timeout: 120), log("clone\(i)"))
            XCTAssertTrue(log("clone\(i)").contains("vscsistress: done rounds=40 requests=320 errors=0 mismatches=0 duplicates=0"), log("clone\(i)"))
            XCTAssertTrue(waitForEnd(pids[i - 1]), "clone\(i) did not power off")
            // Once under CI load qemu-img found the image still locked just after the core was
            // reaped (cause not found yet; see the #18 closing note): allow the lock 5 s to go.
            var check = try tool("/usr/bin/qemu-img", ["check", "\(snapshot)/clones/clone\(i)/disk0.qcow2"])
            let lockDeadline = Date().addingTimeInterval(5)
            while check.status != 0 && check.output.contains("lock") && Date() < lockDeadline {
                Thread.sleep(forTimeInterval: 0.1)
                check = try tool("/usr/bin/qemu-img", ["check", "\(snapshot)/clones/clone\(i)/disk0.qcow2"])
            }
            XCTAssertEqual(check.status, 0, check.output)
        }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: image)), before, "a clone wrote the template's disk")

        let again = try runHvctl(["run", "--restore", snapshot, "--clone", "--name", "clone1"])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.contains("a clone named 'clone1' was made from this snapshot before"), again.stderr)
        XCTAssertEqual(again.stderr.filter { $0 == "\n" }.count, 1, again.stderr)
    }

    /// Bad snapshots and bad requests are refused in one line, leaving nothing behind.
    func testBadSnapshotsAreRefusedInOneLine() throws {
        try detached("source", "mode=ticks count=100000 delay=50")
        XCTAssertTrue(waitForLog("source", "tick 2"), log("source"))
        let good = path("good.snap")
        XCTAssertEqual(try runHvctl(["snapshot", "source", good]).status, 0)
        // The target exists: refused, the VM carries on.
        let exists = try runHvctl(["snapshot", "source", good])
        XCTAssertEqual(exists.status, 1)
        XCTAssertEqual(exists.stderr, "hvctl: \(good) already exists; name a new directory\n")
        XCTAssertEqual(try status("source")["state"] as? String, "running")
        XCTAssertEqual(try runHvctl(["stop", "source"]).status, 0)

        let state = try Data(contentsOf: URL(fileURLWithPath: good + "/state"))
        let memory = try Data(contentsOf: URL(fileURLWithPath: good + "/memory"))
        func variant(_ name: String, state newState: Data? = nil, memory newMemory: Data? = nil) throws -> String {
            let d = path(name)
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: false)
            try (newState ?? state).write(to: URL(fileURLWithPath: d + "/state"))
            try (newMemory ?? memory).write(to: URL(fileURLWithPath: d + "/memory"))
            return d
        }
        func refused(_ snapshot: String, _ expected: String, file: StaticString = #filePath, line: UInt = #line) throws {
            let r = try runHvctl(["run", "--restore", snapshot, "--name", "bad"])
            XCTAssertEqual(r.status, 1, r.stderr, file: file, line: line)
            XCTAssertTrue(r.stderr.hasPrefix("hvctl: ") && r.stderr.contains(expected), r.stderr, file: file, line: line)
            XCTAssertEqual(r.stderr.filter { $0 == "\n" }.count, 1, r.stderr, file: file, line: line)
        }
        // A byte flipped inside a section, a truncated file, another format version (with a
        // valid header checksum), an empty directory.
        var flipped = state
        flipped[flipped.count - 10] ^= 0x40
        try refused(try variant("flipped", state: flipped), "is corrupt (section")
        // --print-config reads the state file as a restore does: the saved definition, or the same refusal.
        let printed = try runHvctl(["run", "--restore", good, "--print-config"])
        XCTAssertEqual(printed.status, 0, printed.stderr)
        let definition = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(printed.stdout.utf8)) as? [String: Any], printed.stdout)
        XCTAssertEqual(definition["name"] as? String, "source")
        let corrupt = try runHvctl(["run", "--restore", path("flipped"), "--print-config"])
        XCTAssertEqual(corrupt.status, 1, corrupt.stderr)
        XCTAssertTrue(corrupt.stderr.contains("is corrupt (section") && corrupt.stdout.isEmpty, corrupt.stderr + corrupt.stdout)
        let cloned = try runHvctl(["run", "--restore", good, "--print-config", "--clone", "--name", "c"])
        XCTAssertEqual(cloned.status, 2, cloned.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: good + "/clones"))
        try refused(try variant("short", state: state.prefix(state.count - 100)), "is truncated")
        var newer = state
        newer[8] = 2
        let crc = crc32c(Array(newer.prefix(24)))
        for i in 0..<4 { newer[24 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        try refused(try variant("newer", state: newer), "was written in snapshot format 2; this hv reads format 1 only")
        try FileManager.default.createDirectory(atPath: path("empty"), withIntermediateDirectories: false)
        try refused(path("empty"), "cannot read snapshot \(path("empty"))")
        // Guest memory: truncated, or a byte changed.
        let lastData = try XCTUnwrap(memory.lastIndex(where: { $0 != 0 }))
        try refused(try variant("memshort", memory: memory.prefix(lastData)), "its memory file is truncated")
        var bent = memory
        bent[lastData] ^= 1
        try refused(try variant("membent", memory: bent), "its memory is corrupt")
        // A guest that saw a CPU feature this host's KVM cannot give.
        try refused(try variant("cpu", state: try withUnsupportedFeature(state)), "this host's CPU lacks features the guest saw:")
        // A device whose build reads another state layout than the snapshot holds.
        try refused(try variant("layout", state: try withDeviceStateVersion9(state)), "the snapshot holds its state in layout version 9; this build of")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: runDir).filter { $0.hasPrefix("bad") }, [])
    }

    /// SeaBIOS snapshotted in the middle of its boot carries on from there after a restore:
    /// firmware ROM, real-mode state, fw_cfg and timers come back; it does not start over.
    func testFirmwareSnapshottedMidBootCarriesOn() throws {
        let r = try runHvctl(["run", "--firmware", "seabios", "--name", "firmware", "--detach"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(waitForLog("firmware", "SeaBIOS (version"), log("firmware"))
        let snapshot = path("firmware.snap")
        XCTAssertEqual(try runHvctl(["snapshot", "firmware", snapshot, "--stop"]).status, 0)
        let before = log("firmware")
        XCTAssertFalse(before.contains("No bootable device"), "SeaBIOS finished before the snapshot: \(before)")
        XCTAssertEqual(try runHvctl(["stop", "firmware"]).status, 0)
        XCTAssertEqual(try runHvctl(["run", "--restore", snapshot, "--detach", "--name", "firmware2"]).status, 0)
        XCTAssertTrue(waitForLog("firmware2", "No bootable device", timeout: 60), log("firmware2"))
        XCTAssertFalse(log("firmware2").contains("SeaBIOS (version"), "the firmware started over: \(log("firmware2"))")
    }

    /// The snapshot records the CD in the drive now (after 'hvctl cdrom insert'); an empty drive
    /// cannot be brought back by a definition, so it is refused.
    func testSnapshotRecordsTheCDInTheDriveAndRefusesAnEmptyDrive() throws {
        var isos: [String] = []
        for name in ["first", "second"] {
            let content = path("\(name)-content")
            try FileManager.default.createDirectory(atPath: content, withIntermediateDirectories: true)
            try Data(name.utf8).write(to: URL(fileURLWithPath: content + "/README"))
            let iso = path("\(name).iso")
            let made = try tool("/usr/bin/xorriso", ["-as", "mkisofs", "-quiet", "-o", iso, content])
            XCTAssertEqual(made.status, 0, made.output)
            isos.append(iso)
        }
        try detached("reader", "mode=ticks count=100000 delay=50", ["--cdrom", isos[0]])
        XCTAssertTrue(waitForLog("reader", "tick 1"), log("reader"))
        XCTAssertEqual(try runHvctl(["cdrom", "reader", "eject"]).status, 0)
        let empty = try runHvctl(["snapshot", "reader", path("empty.snap")])
        XCTAssertEqual(empty.status, 1)
        XCTAssertTrue(empty.stderr.contains("while its CD-ROM drive is empty"), empty.stderr)
        XCTAssertEqual(try runHvctl(["cdrom", "reader", "insert", isos[1]]).status, 0)
        XCTAssertEqual(try runHvctl(["snapshot", "reader", path("reader.snap")]).status, 0)
        let state = try Data(contentsOf: URL(fileURLWithPath: path("reader.snap") + "/state"))
        XCTAssertNotNil(state.range(of: Data(isos[1].utf8)), "the snapshot does not name the CD now in the drive")
        XCTAssertNil(state.range(of: Data(isos[0].utf8)), "the snapshot names the CD ejected before it")
    }

    /// A device that cannot be snapshotted (a plugin without SNAPSHOT) makes the snapshot refuse, naming it.
    func testAPluginThatCannotSnapshotIsNamed() throws {
        let exe = Harness.productsDirectory.appendingPathComponent("hv-pci-testdevice").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        try detached("plugged", "mode=ticks count=100000 delay=50", ["--device", "\(exe),profile=\(profile),pci=03.0,bar0=mmio:4096,bar1=pio:16"])
        XCTAssertTrue(waitForLog("plugged", "tick 1"), log("plugged"))
        let r = try runHvctl(["snapshot", "plugged", path("plugged.snap")])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("device0 (pci-testdevice) cannot be snapshotted"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("plugged.snap")))
        XCTAssertEqual(try status("plugged")["state"] as? String, "running")
    }

    /// The state file with the first section of kind `tag` changed by `change` (in place, same
    /// length) and its checksum made good again (docs/snapshots.md has the layout).
    private func rewritingSection(_ state: Data, tag: UInt32, _ change: (inout [UInt8]) throws -> Void) throws -> Data {
        var bytes = [UInt8](state)
        var at = 32
        while at < bytes.count {
            let length = Int(littleEndian32(bytes, at + 8)), payload = at + 24
            if littleEndian32(bytes, at) == tag {
                var section = Array(bytes[payload..<(payload + length)])
                try change(&section)
                bytes.replaceSubrange(payload..<(payload + length), with: section)
                let crc = crc32c(section)
                for i in 0..<4 { bytes[at + 16 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
                return Data(bytes)
            }
            at = payload + length
        }
        throw MalformedSnapshotFixture(description: "the snapshot has no section of kind \(tag)")
    }

    /// One CPU feature bit set in leaf 7's EBX that this host's KVM does not offer.
    private func withUnsupportedFeature(_ state: Data) throws -> Data {
        try rewritingSection(state, tag: 3) { p in  // cpuid: count, entry size, entries
            let count = Int(littleEndian32(p, 0)), size = Int(littleEndian32(p, 4))
            for i in 0..<count {
                let e = 8 + i * size
                guard littleEndian32(p, e) == 7, littleEndian32(p, e + 4) == 0 else { continue }
                let ebx = littleEndian32(p, e + 16)
                let bit = try XCTUnwrap((0..<32).first { ebx & (1 << UInt32($0)) == 0 }, "leaf 7 has every EBX bit")
                let value = ebx | 1 << UInt32(bit)
                for j in 0..<4 { p[e + 16 + j] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(j))) }
                return
            }
            // Every x86-64 KVM host reports leaf 7; a snapshot without it is this test's failure.
            throw MalformedSnapshotFixture(description: "the snapshot's CPUID table has no leaf 7")
        }
    }

    /// The first device's state recorded in layout version 9.
    private func withDeviceStateVersion9(_ state: Data) throws -> Data {
        try rewritingSection(state, tag: 7) { p in  // device: name, model (u16 length each), version
            let name = Int(p[0]) | Int(p[1]) << 8
            let model = Int(p[2 + name]) | Int(p[3 + name]) << 8
            p[4 + name + model] = 9
            p[5 + name + model] = 0
        }
    }
}

/// A snapshot these tests take lacks what they expected to change in it.
private struct MalformedSnapshotFixture: Error, CustomStringConvertible {
    let description: String
}

/// The little-endian u32 at `at`.
private func littleEndian32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
    (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) }
}

/// CRC-32C (Castagnoli), bit by bit: what the snapshot format checksums with.
func crc32c(_ bytes: [UInt8]) -> UInt32 {
    var crc: UInt32 = ~0
    for b in bytes {
        crc ^= UInt32(b)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
}

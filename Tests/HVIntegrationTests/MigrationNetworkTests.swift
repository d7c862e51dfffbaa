import Foundation
import XCTest

/// Live migration between two "hosts" that are network namespaces on this machine: A and B,
/// joined by a veth pair that carries the migration, each with a bridge `br0` the VM's tap joins,
/// and a third namespace C (the peers' LAN: one bridge with a veth to each host's br0) pinging the
/// guest, which counts and checks a disk pattern at the same time (`mode=migrant`). The tap is re-created at the destination (same name, same MAC, same bridge), the NIC's
/// RARP announcements move C's bridge over to host B, and the pings resume. A destination
/// killed halfway and a network cut halfway each leave the VM running at the source.
final class MigrationNetworkTests: XCTestCase {
    private var dir: URL!
    /// The key both "hosts" hold.
    private var keyFile = ""
    private var hostA: NetworkNamespace!
    private var hostB: NetworkNamespace!
    private var peers: NetworkNamespace!
    private var runA: String { dir.appendingPathComponent("a").path }
    private var runB: String { dir.appendingPathComponent("b").path }
    private let guestMAC = "52:54:00:aa:00:01"
    private let guestIP = "10.98.0.2"

    override func setUpWithError() throws {
        try requireNetworkTools()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-mignet-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        keyFile = try Harness.migrationKey(in: dir)
        let tag = "\(getpid())"
        hostA = try NetworkNamespace("hvm-a-\(tag)")
        hostB = try NetworkNamespace("hvm-b-\(tag)")
        peers = try NetworkNamespace("hvm-c-\(tag)")
        // Interface names live in their namespace, so they can be short and fixed.
        try setUp([
            ["ip", "link", "add", "mig", "netns", hostA.name, "type", "veth", "peer", "name", "mig", "netns", hostB.name],
            ["ip", "-n", hostA.name, "addr", "add", "10.99.0.1/24", "dev", "mig"],
            ["ip", "-n", hostB.name, "addr", "add", "10.99.0.2/24", "dev", "mig"],
            ["ip", "-n", hostA.name, "link", "set", "mig", "up"],
            ["ip", "-n", hostB.name, "link", "set", "mig", "up"],
            ["ip", "-n", peers.name, "link", "add", "lan", "type", "bridge"],
            ["ip", "-n", peers.name, "addr", "add", "10.98.0.1/24", "dev", "lan"],
            ["ip", "-n", peers.name, "link", "set", "lan", "up"],
        ])
        for (host, port) in [(hostA!, "toA"), (hostB!, "toB")] {
            try setUp([
                ["ip", "-n", host.name, "link", "add", "br0", "type", "bridge"],
                ["ip", "-n", host.name, "link", "set", "br0", "up"],
                ["ip", "link", "add", "uplink", "netns", host.name, "type", "veth", "peer", "name", port, "netns", peers.name],
                ["ip", "-n", host.name, "link", "set", "uplink", "master", "br0"],
                ["ip", "-n", host.name, "link", "set", "uplink", "up"],
                ["ip", "-n", peers.name, "link", "set", port, "master", "lan"],
                ["ip", "-n", peers.name, "link", "set", port, "up"],
            ])
        }
    }

    override func tearDown() {
        for (host, runDir) in [(hostA, dir.map { _ in runA }), (hostB, dir.map { _ in runB })] {
            guard let host, let runDir else { continue }
            for name in (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? [] where name.hasSuffix(".sock") {
                _ = try? host.run(["env", "HV_RUN_DIR=\(runDir)", Harness.hvctl, "stop", String(name.dropLast(5))])
            }
        }
        hostA = nil
        hostB = nil
        peers = nil
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    private func setUp(_ commands: [[String]]) throws {
        for command in commands {
            let r = try host(command)
            guard r.status == 0 else { throw MissingNetworkSetup(description: "\(command.joined(separator: " ")): \(r.output)") }
        }
    }

    /// hvctl on `host` with its own run directory, to completion.
    private func hvctl(_ host: NetworkNamespace, _ arguments: [String], timeout: TimeInterval = 60) throws -> (status: Int32, output: String) {
        try host.run(["env", "HV_RUN_DIR=\(host === hostA ? runA : runB)", Harness.hvctl] + arguments, timeout: timeout)
    }

    /// The processes whose command line (arguments joined by spaces) satisfies `matching`.
    private func processes(_ matching: (String) -> Bool) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry in
            guard let pid = pid_t(entry), let raw = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { return nil }
            let line = String(decoding: raw.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
            return line.hasPrefix(Harness.hvctl) && matching(line) ? pid : nil
        }
    }

    /// hvctl on `host` in the background (`ip netns exec` and `env` exec it).
    private func startHvctl(_ host: NetworkNamespace, _ arguments: [String]) throws -> VMProcess {
        try VMProcess(["netns", "exec", host.name, "env", "HV_RUN_DIR=\(host === hostA ? runA : runB)", Harness.hvctl] + arguments,
                      executable: "/usr/sbin/ip")
    }

    /// The test guest answering ARP and pings at `guestIP`, its NIC on tap hvm0 in br0, at host A
    /// (`mode=netpeer`, or another mode that answers pings, with `extra` flags).
    private func startGuestAtA(_ cmdline: String = "mode=netpeer", _ extra: [String] = []) throws {
        let r = try hvctl(hostA, ["run", "--multiboot", try Harness.testGuest(), "--cmdline", "\(cmdline) ip=\(guestIP)", "--memory", "32M",
                                  "--name", "web", "--detach", "--nic", "tap=hvm0,bridge=br0,mac=\(guestMAC)"] + extra)
        XCTAssertEqual(r.status, 0, r.output)
        let ping = try peers.run(["ping", "-c", "3", "-W", "5", guestIP], timeout: 30)
        XCTAssertEqual(ping.status, 0, "the guest at host A does not answer: \(ping.output)")
    }

    /// `hvctl run --incoming` at host B, waiting on its end of the migration link; the console
    /// goes to b.out.
    private func incomingAtB(_ port: Int) throws -> VMProcess {
        let vm = try startHvctl(hostB, ["run", "--incoming", "tcp:10.99.0.2:\(port)", "--key", keyFile, "--serial", "file:\(dir.appendingPathComponent("b.out").path)"])
        let deadline = Date().addingTimeInterval(10)
        while !vm.stderr.contains("waiting for a VM") && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        XCTAssertTrue(vm.stderr.contains("waiting for a VM"), vm.stderr)
        return vm
    }

    /// Waits until the destination has accepted the VM: memory starts to flow.
    private func waitForAccept(_ destination: VMProcess) -> Bool {
        let deadline = Date().addingTimeInterval(10)
        while !destination.stderr.contains("receiving web") && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        return destination.stderr.contains("receiving web")
    }

    /// `hvctl ls` on `host`.
    private func state(_ host: NetworkNamespace) -> String {
        (try? hvctl(host, ["ls"]).output) ?? ""
    }

    func testTheVMMovesToAnotherHostItsTapFollowsAndPingsResume() throws {
        // A bridge that does not exist is refused in one line, and the tap made for it is gone.
        let missing = try hvctl(hostA, ["run", "--multiboot", try Harness.testGuest(), "--nic", "tap=hvm0,bridge=nosuch"])
        XCTAssertEqual(missing.status, 1, missing.output)
        XCTAssertEqual(missing.output, "hvctl: cannot add tap 'hvm0' to bridge 'nosuch': there is no bridge 'nosuch' on this host (create it with 'ip link add nosuch type bridge')\n")
        XCTAssertNotEqual(try hostA.run(["ip", "link", "show", "hvm0"]).status, 0, "the tap made for the refused bridge was left behind")

        // The guest counts (a tick every 100 ms), writes and verifies a disk pattern, and answers
        // pings, all at once; the disk is at the same path for both hosts.
        let image = dir.appendingPathComponent("disk.img").path
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
        XCTAssertEqual(truncate(image, 16 << 20), 0)
        try startGuestAtA("mode=migrant count=60", ["--disk", image])
        let sourceLog = { (try? String(contentsOfFile: "\(self.runA)/web.log", encoding: .utf8)) ?? "" }
        var deadline = Date().addingTimeInterval(90)
        while !sourceLog().contains("migrant: pass 10\n") && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        XCTAssertTrue(sourceLog().contains("migrant: pass 10\n"), sourceLog())
        let capture = try peers.start(["tcpdump", "-l", "-n", "-e", "-i", "toB"])
        defer { capture.stop() }
        XCTAssertTrue(capture.waitForOutput("listening on toB", timeout: 10), capture.output)
        // Ten pings a second from the LAN, across the whole migration.
        let pinger = try peers.start(["ping", "-i", "0.1", "-c", "120", "-W", "1", guestIP])
        defer { pinger.stop() }
        Thread.sleep(forTimeInterval: 2)

        let destination = try incomingAtB(47000)
        let moved = try hvctl(hostA, ["migrate", "web", "--to", "tcp:10.99.0.2:47000", "--key", keyFile])
        XCTAssertEqual(moved.status, 0, moved.output + destination.stderr)
        XCTAssertTrue(moved.output.contains("migrated web to tcp:10.99.0.2:47000 in "), moved.output)
        // The source returns once the destination said GO; the destination's own line follows.
        deadline = Date().addingTimeInterval(10)
        while !destination.stderr.contains("web arrived and runs here") && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        XCTAssertTrue(destination.stderr.contains("web arrived and runs here"), destination.stderr)

        // The tap left host A with the VM (once the source has exited) and exists at host B, in its br0.
        deadline = Date().addingTimeInterval(10)
        while try hostA.run(["ip", "link", "show", "hvm0"]).status == 0 && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        XCTAssertNotEqual(try hostA.run(["ip", "link", "show", "hvm0"]).status, 0, "host A kept the tap")
        let tapB = try hostB.run(["ip", "link", "show", "hvm0"])
        XCTAssertTrue(tapB.output.contains("master br0") && tapB.output.contains("UP"), tapB.output)
        XCTAssertFalse(state(hostA).contains("web"))
        let status = try hvctl(hostB, ["status", "web"])
        XCTAssertTrue(status.output.contains("tap hvm0 in bridge br0"), status.output)

        // The pings resume: every one of the last 30 is answered, and few were lost in between.
        XCTAssertEqual(pinger.wait(timeout: 40), 0, pinger.output)
        let answered = Set(pinger.output.split(separator: "\n").compactMap { line -> Int? in
            guard let r = line.range(of: "icmp_seq=") else { return nil }
            return Int(line[r.upperBound...].prefix { $0.isNumber })
        })
        XCTAssertTrue((91...120).allSatisfy(answered.contains), "the pings did not resume after the migration: \(pinger.output.suffix(1500))")
        XCTAssertGreaterThanOrEqual(answered.count, 100, pinger.output)
        // The destination's NIC announced the MAC from host B's side of the LAN.
        capture.stop(SIGINT)
        XCTAssertTrue(capture.output.contains("\(guestMAC) > ff:ff:ff:ff:ff:ff, ethertype Reverse ARP (0x8035)")
                      && capture.output.contains("Reverse Request who-is \(guestMAC) tell \(guestMAC)"), capture.output)

        // The disk check ran to its end at host B without an error, and the count has no gap.
        let arrived = dir.appendingPathComponent("b.out").path
        let destinationLog = { (try? String(contentsOfFile: arrived, encoding: .utf8)) ?? "" }
        deadline = Date().addingTimeInterval(120)
        while !destinationLog().contains("migrant: done") && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        XCTAssertTrue(destinationLog().contains("migrant: done passes=60 errors=0 mismatches=0\n"), sourceLog() + "|" + destinationLog())
        XCTAssertFalse(destinationLog().contains("hv-testguest: mode="), "the guest booted again at host B")
        let ticks = (sourceLog() + destinationLog()).split(separator: "\n").compactMap { line -> Int? in
            line.hasPrefix("tick ") ? Int(line.dropFirst(5)) : nil
        }
        XCTAssertGreaterThan(ticks.count, 20)
        XCTAssertEqual(ticks, Array(1...max(ticks.count, 1)), "the guest's count has a gap or repeats across the migration")

        XCTAssertEqual(try hvctl(hostB, ["stop", "web"]).status, 0)
        XCTAssertEqual(destination.waitForExit(timeout: 30), 0, destination.stderr)
        XCTAssertNotEqual(try hostB.run(["ip", "link", "show", "hvm0"]).status, 0, "host B kept the tap after the VM stopped")
    }

    func testADestinationKilledOrANetworkCutHalfwayLeavesTheVMRunningAtTheSource() throws {
        try startGuestAtA()

        // The destination is SIGKILLed while memory goes over at 64 KiB/s.
        let killed = try incomingAtB(47001)
        let first = try startHvctl(hostA, ["migrate", "web", "--to", "tcp:10.99.0.2:47001", "--bandwidth", "64K", "--key", keyFile])
        XCTAssertTrue(waitForAccept(killed), first.stdout + first.stderr + killed.stderr)
        Thread.sleep(forTimeInterval: 0.5)
        // Found by its command line: the process Foundation started need not be hvctl itself.
        let victim = processes { $0.contains("--incoming") && $0.contains("tcp:10.99.0.2:47001") }
        XCTAssertEqual(victim.count, 1, "the destination's hvctl")
        victim.forEach { kill($0, SIGKILL) }
        XCTAssertEqual(first.waitForExit(timeout: 30), 1, first.stdout + first.stderr)
        XCTAssertTrue(first.stderr.contains("the VM carries on here") || first.stderr.contains("the destination"), first.stderr)
        XCTAssertTrue(state(hostA).contains("running"), state(hostA))
        var ping = try peers.run(["ping", "-c", "3", "-W", "5", guestIP], timeout: 30)
        XCTAssertEqual(ping.status, 0, "the guest stopped answering at host A after the destination died: \(ping.output)")

        // The migration link goes down halfway: both sides give up within the stall limit.
        let cut = try incomingAtB(47002)
        let second = try startHvctl(hostA, ["migrate", "web", "--to", "tcp:10.99.0.2:47002", "--bandwidth", "64K", "--key", keyFile])
        XCTAssertTrue(waitForAccept(cut), second.stdout + second.stderr + cut.stderr)
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(try hostA.run(["ip", "link", "set", "mig", "down"]).status, 0)
        XCTAssertEqual(second.waitForExit(timeout: 40), 1, second.stdout + second.stderr)
        XCTAssertTrue(second.stderr.contains("stopped answering") || second.stderr.contains("took no data"), second.stderr)
        XCTAssertNotEqual(cut.waitForExit(timeout: 40), 0, cut.stderr)
        XCTAssertTrue(cut.stderr.contains("migration of web failed"), cut.stderr)
        XCTAssertTrue(state(hostA).contains("running"), state(hostA))
        ping = try peers.run(["ping", "-c", "3", "-W", "5", guestIP], timeout: 30)
        XCTAssertEqual(ping.status, 0, "the guest stopped answering at host A after the cut: \(ping.output)")
        // Nothing of the VM was left at host B: no tap, no VM.
        XCTAssertNotEqual(try hostB.run(["ip", "link", "show", "hvm0"]).status, 0, "host B kept a tap")
        XCTAssertFalse(state(hostB).contains("web"), state(hostB))
    }
}

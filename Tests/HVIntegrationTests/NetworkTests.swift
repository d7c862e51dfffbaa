import Foundation
import XCTest

/// A host program (ip, dnsmasq, tcpdump, ping) started with posix_spawn, its output in a file.
/// Not Foundation's Process: its child monitor can block in wait4 on one long-lived child and then
/// never notices the others exit.
final class HostProcess {
    let pid: pid_t
    private let outputPath: String
    private var status: Int32?

    init(_ arguments: [String]) throws {
        outputPath = FileManager.default.temporaryDirectory.appendingPathComponent("hv-host-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawnp(&child, arguments[0], &actions, nil, argv, environ)
        guard rc == 0 else { throw NSError(domain: "hv", code: Int(rc), userInfo: [NSLocalizedDescriptionKey: "cannot start \(arguments[0])"]) }
        pid = child
    }

    deinit {
        if status == nil { stop(SIGKILL) }
        unlink(outputPath)
    }

    var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }

    var isRunning: Bool {
        guard status == nil else { return false }
        var st: Int32 = 0
        let r = waitpid(pid, &st, WNOHANG)
        if r == pid { status = (st & 0x7F) == 0 ? (st >> 8) & 0xFF : 128 + (st & 0x7F) } else if r < 0 { status = -1 }
        return status == nil
    }

    /// Waits for exit (killing it after `timeout`) and returns its status.
    @discardableResult
    func wait(timeout: TimeInterval) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        if isRunning { stop(SIGKILL) }
        return status ?? -1
    }

    /// Sends `signal` and reaps.
    func stop(_ signal: Int32 = SIGTERM) {
        guard isRunning else { return }
        kill(pid, signal)
        _ = wait(timeout: 10)
    }

    /// Waits until the output contains `text`.
    func waitForOutput(_ text: String, timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if output.contains(text) { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return false
    }
}

/// Runs a host command to completion: (status, stdout + stderr).
@discardableResult
func host(_ arguments: [String], timeout: TimeInterval = 30) throws -> (status: Int32, output: String) {
    let p = try HostProcess(arguments)
    let status = p.wait(timeout: timeout)
    return (status, p.output)
}

/// A network namespace the test creates and removes: all test traffic stays inside it.
final class NetworkNamespace {
    let name: String
    init(_ name: String) throws {
        self.name = name
        _ = try? host(["ip", "netns", "del", name])
        let r = try host(["ip", "netns", "add", name])
        guard r.status == 0 else { throw NSError(domain: "hv", code: 1, userInfo: [NSLocalizedDescriptionKey: "ip netns add \(name): \(r.output)"]) }
        try run(["ip", "link", "set", "lo", "up"])
    }

    @discardableResult
    func run(_ command: [String], timeout: TimeInterval = 30) throws -> (status: Int32, output: String) {
        try host(["ip", "netns", "exec", name] + command, timeout: timeout)
    }

    /// `command` inside the namespace, in the background (dnsmasq, tcpdump).
    func start(_ command: [String]) throws -> HostProcess {
        try HostProcess(["ip", "netns", "exec", name] + command)
    }

    /// hvctl inside the namespace.
    func startVM(_ arguments: [String]) throws -> VMProcess {
        try VMProcess(["netns", "exec", name, Harness.hvctl] + arguments, executable: "/usr/sbin/ip")
    }

    deinit { _ = try? host(["ip", "netns", "del", name]) }
}

/// The tools the network tests drive as real peers. test.sh installs them and CI runs as root, so
/// a missing one is a broken setup: the test fails and says what to install, it is not skipped.
struct MissingNetworkSetup: Error, CustomStringConvertible {
    let description: String
}

func requireNetworkTools() throws {
    try Harness.requireKVM()
    for tool in ["/usr/sbin/ip", "/usr/sbin/dnsmasq", "/usr/bin/tcpdump", "/usr/bin/ping"] where access(tool, X_OK) != 0 {
        throw MissingNetworkSetup(description: "\(tool) is missing: run test.sh, which installs iproute2, dnsmasq-base, tcpdump and iputils-ping")
    }
    guard getuid() == 0 else { throw MissingNetworkSetup(description: "the network tests make namespaces and taps: run them as root (test.sh in CI is)") }
}

/// `--nic tap=…`: hv's test guest behind a host tap, against dnsmasq, ping and tcpdump in a
/// network namespace the test creates.
final class TapNetworkTests: XCTestCase {
    func testGuestGetsADHCPLeaseAnswersPingAndTheCaptureShowsItsMAC() throws {
        try requireNetworkTools()
        let guest = try Harness.testGuest()
        let ns = try NetworkNamespace("hvt-tap-\(getpid())")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-tap-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let runDir = dir.appendingPathComponent("run").path
        setenv("HV_RUN_DIR", runDir, 1)
        defer { unsetenv("HV_RUN_DIR") }

        // The host side: a tap with an address, dnsmasq serving DHCP on it, tcpdump watching it.
        XCTAssertEqual(try ns.run(["ip", "tuntap", "add", "dev", "hvtap0", "mode", "tap"]).status, 0)
        XCTAssertEqual(try ns.run(["ip", "addr", "add", "10.77.0.1/24", "dev", "hvtap0"]).status, 0)
        XCTAssertEqual(try ns.run(["ip", "link", "set", "hvtap0", "up"]).status, 0)
        let capture = try ns.start(["tcpdump", "-l", "-n", "-e", "-vv", "-i", "hvtap0"])
        defer { capture.stop() }
        let leases = dir.appendingPathComponent("leases").path
        let dnsmasq = try ns.start(["dnsmasq", "--no-daemon", "--interface=hvtap0", "--bind-interfaces", "--port=0", "--no-resolv",
                                    "--no-hosts", "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0", "--dhcp-leasefile=\(leases)",
                                    "--pid-file=", "--log-dhcp", "--dhcp-authoritative"])
        defer { dnsmasq.stop() }
        XCTAssertTrue(capture.waitForOutput("listening on hvtap0", timeout: 10), capture.output)
        XCTAssertTrue(dnsmasq.isRunning, dnsmasq.output)

        // nic0 on the existing tap; nic1 on a tap hv creates (and brings up) itself.
        let vm = try ns.startVM(["run", "--multiboot", guest, "--cmdline", "mode=netdhcp", "--memory", "32M", "--name", "tapvm",
                               "--nic", "tap=hvtap0,mac=52:54:00:12:34:56", "--nic", "tap=hvnew0"])
        defer { vm.terminateAndWait() }
        XCTAssertTrue(vm.waitForOutput("net: nic0 mac 52:54:00:12:34:56 link up", timeout: 30), vm.stdout + vm.stderr)
        XCTAssertTrue(vm.waitForOutput("net: lease ", timeout: 60), "no lease: \(vm.stdout) \(vm.stderr) dnsmasq: \(dnsmasq.output)")
        // The serial port delivers the line a character at a time: wait for all of it.
        let lineDeadline = Date().addingTimeInterval(10)
        while Date() < lineDeadline, !(vm.stdout.components(separatedBy: "net: lease ").last ?? "").contains("\n") {
            Thread.sleep(forTimeInterval: 0.01)
        }
        let line = try XCTUnwrap(vm.stdout.split(separator: "\n").first { $0.hasPrefix("net: lease ") })
        let address = String(line.split(separator: " ")[2])
        XCTAssertTrue(address.hasPrefix("10.77.0."), String(line))
        XCTAssertTrue(line.contains("server 10.77.0.1 mask 255.255.255.0"), String(line))
        let created = try ns.run(["ip", "link", "show", "hvnew0"])
        XCTAssertTrue(created.output.contains("UP"), created.output)

        // The host's own ping reaches the guest (ARP, then ICMP echo both ways).
        let ping = try ns.run(["ping", "-c", "3", "-W", "10", address], timeout: 60)
        XCTAssertEqual(ping.status, 0, ping.output + vm.stdout)
        XCTAssertTrue(ping.output.contains("3 received"), ping.output)
        XCTAssertTrue(vm.waitForOutput("net: echo seq 3 from 10.77.0.1", timeout: 10), vm.stdout)
        // The tap's own counters, as `hvctl status` reports them from the guest's side: it sent the
        // DHCP discover and request, its ARP announcement and three echo replies, and received the
        // offer, the ack and three echo requests; the second NIC's tap is counted too.
        let status = try runHvctl(["status", "tapvm", "--json"])
        XCTAssertEqual(status.status, 0, status.stderr)
        let nics = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any])?["nics"] as? [[String: Any]])
        let traffic = try XCTUnwrap(nics.first?["traffic"] as? [String: Any], status.stdout)
        XCTAssertGreaterThanOrEqual(traffic["sent_frames"] as? Int ?? 0, 6, status.stdout)
        XCTAssertGreaterThanOrEqual(traffic["received_frames"] as? Int ?? 0, 5, status.stdout)
        XCTAssertGreaterThanOrEqual(traffic["sent_bytes"] as? Int ?? 0, 6 * 42, status.stdout)
        XCTAssertNotNil(traffic["sent_dropped"] as? Int, status.stdout)
        XCTAssertNotNil(nics.last?["traffic"] as? [String: Any], status.stdout)

        vm.process.terminate()
        vm.waitForExit(timeout: 20)
        Thread.sleep(forTimeInterval: 0.3)
        capture.stop(SIGINT)
        let frames = capture.output
        XCTAssertTrue(frames.contains("52:54:00:12:34:56 > ff:ff:ff:ff:ff:ff"), "the DHCP discover is a broadcast from the NIC's MAC: \(frames)")
        XCTAssertTrue(frames.contains("DHCP-Message (53), length 1: Discover"), frames)
        XCTAssertTrue(frames.contains("DHCP-Message (53), length 1: Request"), frames)
        // The guest's ARP: its announcement after the lease (the host then needs no request).
        XCTAssertTrue(frames.contains("52:54:00:12:34:56 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806)")
                      && frames.contains("Request who-has \(address) tell \(address)"), "the guest's ARP announcement: \(frames)")
        XCTAssertTrue(frames.contains("52:54:00:12:34:56 > ") && frames.contains("ICMP echo reply"), frames)
        XCTAssertFalse(frames.contains("bad cksum") || frames.contains("wrong"), "tcpdump found a bad checksum: \(frames)")
        // The guest's checksum requests cross the tap in its virtio-net header (IFF_VNET_HDR): the
        // host kernel takes the datagrams, which a malformed header would make it refuse.
        let receiver = try ns.start(["python3", "-c", """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.77.0.1", 7000)); s.settimeout(60)
            print("ready", flush=True)
            n = 0
            while n < 20:
                if s.recv(2048)[:4] != b"END!": n += 1
            print("got", n, flush=True)
            """])
        defer { receiver.stop() }
        XCTAssertTrue(receiver.waitForOutput("ready", timeout: 10), receiver.output)
        let sender = try ns.startVM(["run", "--multiboot", guest, "--cmdline", "mode=netblast ip=10.77.0.9 peer=10.77.0.1 count=20 size=100 port=7000 csum=1",
                                     "--memory", "32M", "--nic", "tap=hvtap0,mac=52:54:00:12:34:57"])
        defer { sender.terminateAndWait() }
        XCTAssertTrue(sender.waitForOutput("net: checksum offload on", timeout: 30), sender.stdout + sender.stderr)
        XCTAssertTrue(receiver.waitForOutput("got 20", timeout: 30), receiver.output + sender.stdout)
        sender.process.terminate()
        sender.waitForExit(timeout: 20)

        // VIRTIO_NET_F_GUEST_CSUM: with it negotiated, the NIC turns the tap's checksum offload on
        // and the host's datagrams reach the guest with their checksums partial (NEEDS_CSUM), as a
        // host stack leaves them for a device; without it, they arrive whole and the guest checks them.
        for (offload, expected) in [(1, "checksummed=0 bad=0 offloaded=20"), (0, "checksummed=20 bad=0 offloaded=0")] {
            // A fresh address and MAC for each guest, so the host's neighbour cache holds nothing stale.
            let sinkAddress = "10.77.0.\(10 + offload)"
            let sink = try ns.startVM(["run", "--multiboot", guest, "--cmdline", "mode=netsink ip=\(sinkAddress) port=7001 csum=\(offload)",
                                       "--memory", "32M", "--nic", "tap=hvtap0,mac=52:54:00:12:34:5\(8 + offload)"])
            defer { sink.terminateAndWait() }
            XCTAssertTrue(sink.waitForOutput("net: nic0 mac", timeout: 30), sink.stdout + sink.stderr)
            if offload == 1 { XCTAssertTrue(sink.waitForOutput("net: receive checksum offload on\n", timeout: 10), sink.stdout) }
            let send = try ns.run(["python3", "-c", """
                import socket, time
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for i in range(20): s.sendto(bytes(100), ("\(sinkAddress)", 7001)); time.sleep(0.005)
                for i in range(3): s.sendto(b"END!" + bytes(96), ("\(sinkAddress)", 7001)); time.sleep(0.05)
                """])
            XCTAssertEqual(send.status, 0, send.output)
            XCTAssertTrue(sink.waitForOutput("received=20 bytes=2000 \(expected)\n", timeout: 30), sink.stdout + sink.stderr)
            sink.process.terminate()
            sink.waitForExit(timeout: 20)
        }

        // The tap hv created went away with the VM; the one it was given stays.
        XCTAssertNotEqual(try ns.run(["ip", "link", "show", "hvnew0"]).status, 0)
        XCTAssertEqual(try ns.run(["ip", "link", "show", "hvtap0"]).status, 0)
    }
}

/// `--nic net=…`: private segments between VMs, each segment a learning switch in its own process.
final class SegmentNetworkTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-seg-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", dir.appendingPathComponent("run").path, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func mac(_ n: Int) -> String { "52:54:00:00:00:\(n < 16 ? "0" : "")\(String(n, radix: 16))" }

    private func start(_ name: String, _ cmdline: String, _ nics: [String]) throws -> VMProcess {
        try VMProcess(["run", "--multiboot", try Harness.testGuest(), "--cmdline", cmdline, "--memory", "32M", "--name", name]
                      + nics.flatMap { ["--nic", $0] })
    }

    private func segments() throws -> [[String: Any]] {
        let r = try runHvctl(["net", "ls", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]], r.stdout)
    }

    func testTwoVMsTalkASwitchLearnsSegmentsAreIsolatedABridgeForwardsAndANICCrashDisturbsNoOne() throws {
        let a = "t\(getpid())a", b = "t\(getpid())b", c = "t\(getpid())c"
        // Segment A: a responder, a promiscuous watcher, and one leg of a bridging VM (and, later, a
        // pinger and a stranger sending to an unknown MAC); segment B: the
        // other leg and a second responder; segment C: a watcher alone.
        var vms: [VMProcess] = []
        defer { vms.forEach { $0.terminateAndWait() } }
        let peer = try start("peer", "mode=netpeer ip=10.9.0.2", ["net=\(a),mac=\(mac(2))"])
        let watcher = try start("watcher", "mode=netsniff", ["net=\(a),mac=\(mac(9))"])
        let loner = try start("loner", "mode=netsniff", ["net=\(c),mac=\(mac(12))"])
        let bridge = try start("bridge", "mode=netbridge", ["net=\(a),mac=\(mac(10))", "net=\(b),mac=\(mac(11))"])
        vms += [peer, watcher, loner, bridge]
        XCTAssertTrue(bridge.waitForOutput("net: bridging nic0 and nic1"), bridge.stdout + bridge.stderr)
        for vm in [peer, watcher, loner] { XCTAssertTrue(vm.waitForOutput("net: nic0 mac"), vm.stdout + vm.stderr) }

        // A duplicate MAC on a segment is refused with one line, before the VM starts.
        let twin = try runHvctl(["run", "--multiboot", try Harness.testGuest(), "--cmdline", "mode=idle", "--nic", "net=\(a),mac=\(mac(2))"])
        XCTAssertEqual(twin.status, 1)
        XCTAssertEqual(twin.stderr, "hvctl: cannot join segment '\(a)': MAC \(mac(2)) is already on segment \(a) (VM peer, net0); give this NIC another mac=\n")

        // Two VMs on one segment: ARP and ICMP echo both ways.
        let pinger = try start("pinger", "mode=netping ip=10.9.0.1 peer=10.9.0.2 count=3", ["net=\(a),mac=\(mac(1))"])
        vms.append(pinger)
        XCTAssertTrue(pinger.waitForOutput("net: ping done sent=3 received=3", timeout: 60), pinger.stdout + pinger.stderr)
        XCTAssertTrue(pinger.stdout.contains("net: peer 10.9.0.2 is at \(mac(2))"), pinger.stdout)
        XCTAssertTrue(peer.waitForOutput("net: echo seq 3 from 10.9.0.1"), peer.stdout)

        // The watcher saw the flooded ARP broadcast, but none of the unicast echoes: the switch
        // learned where both stations sit.
        XCTAssertTrue(watcher.waitForOutput("net: frame dst=ff:ff:ff:ff:ff:ff src=\(mac(1)) type=0806"), watcher.stdout)
        XCTAssertFalse(watcher.stdout.contains("type=0800"), watcher.stdout)

        // Unknown unicast floods: an echo request to a MAC the switch never saw reaches the watcher too.
        let stranger = try start("stranger", "mode=netping ip=10.9.0.7 peer=10.9.0.8 peermac=52:54:00:00:00:77 count=1",
                                 ["net=\(a),mac=\(mac(7))"])
        vms.append(stranger)
        XCTAssertTrue(watcher.waitForOutput("net: frame dst=52:54:00:00:00:77 src=\(mac(7)) type=0800"), watcher.stdout + stranger.stdout)

        // Kill the watcher's NIC process mid-run: the core restarts it, and the others go on.
        let nicPids = watcher.children(named: "hv-net")
        XCTAssertEqual(nicPids.count, 1)
        kill(nicPids[0], SIGKILL)
        let restartDeadline = Date().addingTimeInterval(10)
        while !watcher.stderr.contains("net0 restarted") && Date() < restartDeadline { Thread.sleep(forTimeInterval: 0.05) }
        XCTAssertTrue(watcher.stderr.contains("device net0 restarted"), watcher.stderr)

        // A VM with two NICs forwards between segments: a station on segment B reaches the
        // responder on segment A through the bridging VM.
        let far = try start("far", "mode=netping ip=10.9.0.3 peer=10.9.0.2 count=3", ["net=\(b),mac=\(mac(3))"])
        vms.append(far)
        XCTAssertTrue(far.waitForOutput("net: ping done sent=3 received=3", timeout: 60), far.stdout + far.stderr + bridge.stdout)
        XCTAssertTrue(peer.waitForOutput("net: echo seq 3 from 10.9.0.3"), peer.stdout)
        // The restarted NIC resumed where the dead one stood: its guest, never reset, still
        // receives (the far station's ARP broadcast, flooded through the bridge).
        XCTAssertTrue(watcher.waitForOutput("src=\(mac(3)) type=0806"), watcher.stdout + watcher.stderr)

        // `hvctl net ls`: three segments, their members and counters; segment C carried nothing.
        let list = try segments()
        let byName = Dictionary(uniqueKeysWithValues: list.map { ($0["segment"] as? String ?? "?", $0) })
        XCTAssertEqual(Set(byName.keys), [a, b, c])
        let membersA = try XCTUnwrap(byName[a]?["members"] as? [[String: Any]])
        XCTAssertEqual(Set(membersA.compactMap { $0["vm"] as? String }), ["peer", "watcher", "bridge", "pinger", "stranger"])
        let peerRow = try XCTUnwrap(membersA.first { $0["vm"] as? String == "peer" })
        XCTAssertGreaterThanOrEqual(peerRow["frames_to_vm"] as? Int ?? 0, 8, "\(peerRow)")  // 2 ARP + 6 echoes at least
        XCTAssertGreaterThanOrEqual(peerRow["frames_from_vm"] as? Int ?? 0, 8, "\(peerRow)")
        let lonerRow = try XCTUnwrap((byName[c]?["members"] as? [[String: Any]])?.first)
        XCTAssertEqual(lonerRow["frames_to_vm"] as? Int, 0, "\(lonerRow)")
        XCTAssertFalse(loner.stdout.contains("net: frame"), "segment C saw traffic from elsewhere: \(loner.stdout)")
        let table = try runHvctl(["net", "ls"])
        XCTAssertTrue(table.stdout.contains("\(a) ") && table.stdout.contains(" pinger ") && table.stdout.contains(mac(1)), table.stdout)

        // A VM that leaves takes its port with it; the segment stays up for the rest.
        pinger.process.terminate()
        pinger.waitForExit(timeout: 20)
        let deadline = Date().addingTimeInterval(10)
        var names: Set<String> = []
        repeat {
            let members = (try segments().first { $0["segment"] as? String == a }?["members"] as? [[String: Any]]) ?? []
            names = Set(members.compactMap { $0["vm"] as? String })
            if !names.contains("pinger") { break }
            Thread.sleep(forTimeInterval: 0.1)
        } while Date() < deadline
        XCTAssertEqual(names, ["peer", "watcher", "bridge", "stranger"])
        for vm in vms where vm !== pinger { XCTAssertTrue(vm.process.isRunning, vm.stderr) }
    }

    /// One datagram to a segment's socket and its answer (nil when the switch hung up).
    private func ask(_ segment: String, _ text: String) -> String? {
        let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = Array((dir.appendingPathComponent("run/net/\(segment).sock").path).utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.enumerated() { raw[i] = b }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { return nil }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = Array(text.utf8).withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var buffer = [UInt8](repeating: 0, count: 65536)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        return n > 0 ? String(decoding: buffer.prefix(n), as: UTF8.self) : nil
    }

    func testASegmentSwitchAnswersMalformedRequestsAndKeepsForwarding() throws {
        let segment = "t\(getpid())m"
        let peer = try start("peer", "mode=netpeer ip=10.9.0.2", ["net=\(segment),mac=\(mac(2))"])
        defer { peer.terminateAndWait() }
        XCTAssertTrue(peer.waitForOutput("net: nic0 mac"), peer.stdout + peer.stderr)
        XCTAssertEqual(ask(segment, "join vm=x nic=y mac=52:54:00:00:00:33"),
                       "error malformed join request (needs vm=, nic=, mac= and three descriptors)")
        XCTAssertEqual(ask(segment, "join vm=x nic=y"), "error malformed join request (needs vm=, nic=, mac= and three descriptors)")
        XCTAssertEqual(ask(segment, "join nonsense"), "error malformed join request")
        XCTAssertEqual(ask(segment, "\u{1}\u{2}garbage"), "error unknown request (expected join or status)")
        XCTAssertTrue(ask(segment, "status")?.hasPrefix("{\"segment\": \"\(segment)\"") == true)
        // Still forwarding for its members.
        let pinger = try start("pinger", "mode=netping ip=10.9.0.1 peer=10.9.0.2 count=2", ["net=\(segment),mac=\(mac(1))"])
        defer { pinger.terminateAndWait() }
        XCTAssertTrue(pinger.waitForOutput("net: ping done sent=2 received=2", timeout: 60), pinger.stdout + pinger.stderr)
    }

    /// Host pids whose command line names the segment's switch.
    private func switchPids(_ segment: String) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry in
            guard let pid = pid_t(entry), let raw = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { return nil }
            let args = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            return args.first?.hasSuffix("/hv-switch") == true && args.dropFirst().first == segment ? pid : nil
        }
    }

    /// Issue 13: the receiving side's NIC process is killed ten times while its peer pings it
    /// without pause; after every restart the pings are answered again. (A restarted NIC that
    /// found frames waiting used to withdraw its request for signals and never receive again.)
    func testPingsResumeAfterEveryKillOfTheReceivingNIC() throws {
        let segment = "t\(getpid())r"
        let responder = try start("responder", "mode=netpeer ip=10.9.0.2", ["net=\(segment),mac=\(mac(2))"])
        defer { responder.terminateAndWait() }
        let pinger = try start("pinger", "mode=netping ip=10.9.0.1 peer=10.9.0.2 count=100000", ["net=\(segment),mac=\(mac(1))"])
        defer { pinger.terminateAndWait() }
        let replies = { pinger.stdout.components(separatedBy: "net: reply seq").count - 1 }
        XCTAssertTrue(pinger.waitForOutput("net: reply seq 3 "), pinger.stdout + pinger.stderr)
        for kill in 1...10 {
            let nic = responder.children(named: "hv-net")
            XCTAssertEqual(nic.count, 1, "kill \(kill)")
            guard let pid = nic.first else { break }
            Glibc.kill(pid, SIGKILL)
            var deadline = Date().addingTimeInterval(10)
            while responder.stderr.components(separatedBy: "device net0 restarted").count - 1 < kill && Date() < deadline {
                Thread.sleep(forTimeInterval: 0.02)
            }
            let before = replies()
            deadline = Date().addingTimeInterval(15)
            while replies() < before + 3 && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
            XCTAssertGreaterThanOrEqual(replies(), before + 3, "kill \(kill): pings did not resume; \(responder.stderr)")
        }
        XCTAssertTrue(responder.process.isRunning && pinger.process.isRunning)
    }

    func testASegmentSurvivesItsSwitchBeingKilled() throws {
        let segment = "t\(getpid())k"
        let peer = try start("peer", "mode=netpeer ip=10.9.0.2", ["net=\(segment),mac=\(mac(2))"])
        defer { peer.terminateAndWait() }
        let first = try start("first", "mode=netping ip=10.9.0.1 peer=10.9.0.2 count=2", ["net=\(segment),mac=\(mac(1))"])
        defer { first.terminateAndWait() }
        XCTAssertTrue(first.waitForOutput("net: ping done sent=2 received=2", timeout: 60), first.stdout + first.stderr)

        let pids = switchPids(segment)
        XCTAssertEqual(pids.count, 1)
        kill(pids[0], SIGKILL)
        // Each member's core joins again with the same port; one of them starts a new switch.
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, switchPids(segment).isEmpty || !((try? segments()) ?? []).contains(where: { ($0["members"] as? [[String: Any]])?.count == 2 }) {
            Thread.sleep(forTimeInterval: 0.05)
        }
        XCTAssertTrue(peer.stderr.contains("segment '\(segment)': its switch went away; net0 joins again"), peer.stderr)
        XCTAssertEqual(switchPids(segment).count, 1)

        // The guests never noticed: a newcomer reaches both, and the first one's NIC still answers.
        let newcomer = try start("newcomer", "mode=netping ip=10.9.0.3 peer=10.9.0.1 count=2", ["net=\(segment),mac=\(mac(3))"])
        defer { newcomer.terminateAndWait() }
        XCTAssertTrue(newcomer.waitForOutput("net: ping done sent=2 received=2", timeout: 60), newcomer.stdout + newcomer.stderr)
        XCTAssertTrue(first.waitForOutput("net: echo seq 2 from 10.9.0.3"), first.stdout)
        XCTAssertTrue(peer.process.isRunning && first.process.isRunning)
    }

    func testTheNICFinishesChecksumsTheGuestLeavesToIt() throws {
        // VIRTIO_NET_F_CSUM: the sender leaves each UDP checksum partial (the pseudo-header sum) and
        // asks the device to finish it; the NIC process does so while copying into the port, and
        // the receiving guest verifies every checksum.
        let segment = "t\(getpid())c"
        let sink = try start("sink", "mode=netsink ip=10.9.0.2 port=7000", ["net=\(segment),mac=\(mac(2))"])
        defer { sink.terminateAndWait() }
        XCTAssertTrue(sink.waitForOutput("net: nic0 mac"), sink.stdout + sink.stderr)
        for (offload, expected) in [(1, "checksummed=20 bad=0 offloaded=0"), (0, "checksummed=0 bad=0 offloaded=0")] {
            let sender = try start("sender\(offload)", "mode=netblast ip=10.9.0.1 peer=10.9.0.2 count=20 size=100 port=7000 csum=\(offload)",
                                   ["net=\(segment),mac=\(mac(1))"])
            defer { sender.terminateAndWait() }
            XCTAssertTrue(sender.waitForOutput("bench: net tx end sent=20", timeout: 60), sender.stdout + sender.stderr)
            if offload == 1 { XCTAssertTrue(sender.stdout.contains("net: checksum offload on"), sender.stdout) }
            XCTAssertTrue(sink.waitForOutput("received=20 bytes=2000 \(expected)\n", timeout: 30), sink.stdout)
            sender.process.terminate()
            sender.waitForExit(timeout: 20)
            sink.process.isRunning ? () : XCTFail(sink.stderr)
            // The next round's lines must be new ones.
            if offload == 1 { XCTAssertEqual(sink.stdout.components(separatedBy: "bench: net rx end").count, 2) }
        }
    }

    func testBadNICOptionsAreRefusedWithOneLine() throws {
        let guest = try Harness.testGuest()
        for (nics, message) in [
            (["bogus"], "invalid --nic 'bogus': use tap=IFNAME[,bridge=BRIDGE] or net=SEGMENT[,shared=TENANT+…], optionally followed by ,mac=52:54:00:xx:xx:xx and rate limits"),
            (["net=x,shared=a/b"], "invalid --nic shared tenant 'a/b'"),
            (["tap=t0,shared=bob"], "invalid --nic 'tap=t0,shared=bob'"),
            (["net=x,bridge=br0"], "invalid --nic 'net=x,bridge=br0': use tap=IFNAME[,bridge=BRIDGE]"),
            (["tap=t0,bridge=a/b"], "invalid --nic bridge name 'a/b'"),
            (["net=a/b"], "invalid --nic net= 'a/b'"),
            (["tap=averyveryverylongname"], "invalid --nic tap name 'averyveryverylongname'"),
            (["net=x,mac=01:00:5e:00:00:01"], "invalid --nic mac '01:00:5e:00:00:01': a NIC needs a unicast address"),
            (["net=x,mac=52:54:00:zz:00:01"], "invalid --nic mac '52:54:00:zz:00:01': use six hex octets"),
            (["net=x", "net=x", "net=x", "net=x", "net=x"], "at most 4 --nic per VM"),
        ] {
            let r = try runHvctl(["run", "--multiboot", guest] + nics.flatMap { ["--nic", $0] })
            XCTAssertEqual(r.status, 2, "\(nics): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(message), "\(nics): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        let twice = try runHvctl(["run", "--multiboot", guest, "--nic", "net=x,mac=52:54:00:00:00:01", "--nic", "net=y,mac=52:54:00:00:00:01"])
        XCTAssertEqual(twice.status, 2)
        XCTAssertEqual(twice.stderr, "hvctl: --nic 1 and --nic 0 both have MAC 52:54:00:00:00:01; give each NIC its own mac=\n")
        let empty = try runHvctl(["net", "ls"])
        XCTAssertEqual(empty.stdout, "no private network segments on this host\n")
    }

    /// A segment belongs to the tenant whose VM created it: another tenant's VM (or a VM without a
    /// tenant) is refused with one line, unless the creator shared it; the record goes with the
    /// segment's last member.
    func testASegmentBelongsToTheTenantThatCreatedIt() throws {
        let guest = try Harness.testGuest()
        let owned = "owned-\(getpid())", shared = "shared-\(getpid())"
        func run(_ name: String, _ tenant: String?, _ nic: String) throws -> VMProcess {
            try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=echo", "--memory", "32M", "--name", name, "--nic", nic]
                          + (tenant.map { ["--tenant", $0] } ?? []))
        }
        /// Runs a VM with `nic` to its end: refused at once, or joined (then told to finish).
        func join(_ tenant: String?, _ nic: String) throws -> (status: Int32, stderr: String) {
            let vm = try run("joiner", tenant, nic)
            if vm.waitForOutput("echo: ready") { vm.write(".") }
            return (vm.waitForExit(), vm.stderr)
        }
        let alice = try run("alice1", "alice", "net=\(owned)")
        let sharing = try run("alice2", "alice", "net=\(shared),shared=bob+carol")
        var running = [alice, sharing]
        defer {
            for vm in running { vm.write("."); vm.waitForExit() }
        }
        XCTAssertTrue(alice.waitForOutput("echo: ready") && sharing.waitForOutput("echo: ready"), alice.stderr + sharing.stderr)
        for (tenant, who) in [("bob", "tenant 'bob'"), (nil, "the host's own VMs (run without --tenant)")] {
            let refused = try join(tenant, "net=\(owned)")
            XCTAssertEqual(refused.status, 1, refused.stderr)
            XCTAssertTrue(refused.stderr.hasPrefix("hvctl: cannot join segment '\(owned)': it belongs to tenant 'alice', and \(who) may not join it;"), refused.stderr)
            XCTAssertEqual(refused.stderr.split(separator: "\n").count, 1, refused.stderr)
        }
        // The same tenant joins; a tenant the creator named joins the shared one; another does not.
        let again = try join("alice", "net=\(owned)")
        XCTAssertEqual(again.status, 0, again.stderr)
        let bob = try join("bob", "net=\(shared)")
        XCTAssertEqual(bob.status, 0, bob.stderr)
        let dave = try join("dave", "net=\(shared)")
        XCTAssertTrue(dave.stderr.contains("it belongs to tenant 'alice', and tenant 'dave' may not join it"), dave.stderr)
        // A joiner cannot change the sharing.
        let widen = try join("alice", "net=\(shared),shared=dave")
        XCTAssertTrue(widen.stderr.contains("it is already shared with bob+carol"), widen.stderr)
        let listed = try segments()
        let ownedStatus = try XCTUnwrap(listed.first { $0["segment"] as? String == owned })
        XCTAssertEqual(ownedStatus["owner"] as? String, "alice")
        let sharedStatus = try XCTUnwrap(listed.first { $0["segment"] as? String == shared })
        XCTAssertEqual(sharedStatus["shared_with"] as? [String], ["bob", "carol"])
        let table = try runHvctl(["net", "ls"])
        XCTAssertTrue(table.stdout.contains("alice+bob+carol"), table.stdout)
        // Once its members are gone the segment and its record are gone: another tenant may create it.
        running.removeFirst()
        alice.write(".")
        XCTAssertEqual(alice.waitForExit(), 0, alice.stderr)
        let runDirectory = dir.appendingPathComponent("run/net").path
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(runDirectory)/\(owned).owner"))
        let bobsNow = try join("bob", "net=\(owned)")
        XCTAssertEqual(bobsNow.status, 0, bobsNow.stderr)
    }
}

import Foundation
import XCTest

/// Live migration (`hvctl migrate NAME --to`, `hvctl run --incoming`) between two "hosts" on
/// this machine: two run directories, over loopback TCP. The guest counts on with no tick lost,
/// disk reads that only the device writes into guest memory survive the switch-over, and every
/// failure (nobody listening, a wrong protocol version, a cancel) leaves the VM running at the source.
final class MigrationTests: XCTestCase {
    private var dir: URL!
    /// The key both "hosts" hold.
    private var key = ""
    private var source: String { dir.appendingPathComponent("a").path }
    private var destination: String { dir.appendingPathComponent("b").path }

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-mig-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        key = try Harness.migrationKey(in: dir)
    }

    override func tearDown() {
        for runDir in [source, destination] {
            setenv("HV_RUN_DIR", runDir, 1)
            for name in (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? [] where name.hasSuffix(".sock") {
                _ = try? runHvctl(["stop", String(name.dropLast(5))])
            }
        }
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    private func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// A free TCP port on loopback.
    private func freePort() -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return UInt16(bigEndian: address.sin_port)
    }

    private func hvctl(_ runDir: String, _ arguments: [String], timeout: TimeInterval = 60) throws -> (status: Int32, stdout: String, stderr: String) {
        setenv("HV_RUN_DIR", runDir, 1)
        return try runHvctl(arguments, timeout: timeout)
    }

    /// Starts the test guest detached at the source as `name`.
    private func start(_ name: String, _ cmdline: String, _ extra: [String] = []) throws {
        let r = try hvctl(source, ["run", "--multiboot", try Harness.testGuest(), "--cmdline", cmdline, "--memory", "32M", "--name", name, "--detach"] + extra)
        XCTAssertEqual(r.status, 0, r.stderr)
    }

    /// `hvctl run --incoming` at the destination, its console in `output`.
    private func incoming(_ port: UInt16, output: String, security: [String]? = nil) throws -> VMProcess {
        setenv("HV_RUN_DIR", destination, 1)
        let vm = try VMProcess(["run", "--incoming", "tcp:127.0.0.1:\(port)", "--serial", "file:\(output)"] + (security ?? ["--key", key]))
        let deadline = Date().addingTimeInterval(10)
        while !vm.stderr.contains("waiting for a VM") && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        return vm
    }

    private func log(_ name: String) -> String {
        (try? String(contentsOfFile: "\(source)/\(name).log", encoding: .utf8)) ?? ""
    }

    private func waitFor(_ text: String, timeout: TimeInterval = 60, in read: () -> String) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if read().contains(text) { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return false
    }

    private func ticks(_ text: String) -> [Int] {
        text.split(separator: "\n").compactMap { $0.hasPrefix("tick ") ? Int($0.dropFirst(5)) : nil }
    }

    private func state(_ name: String) throws -> String? {
        let r = try hvctl(source, ["status", name, "--json"])
        guard r.status == 0 else { return nil }
        return (try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])?["state"] as? String
    }

    /// The TSC-paced counter moves to the destination mid-count: what it printed at the source
    /// and at the destination is one unbroken count, the source ends (exit 0, no VM left there),
    /// and the destination runs it to the end.
    func testMigratedGuestCarriesOnCountingAtTheDestination() throws {
        try start("counter", "mode=ticks count=40 delay=50")
        XCTAssertTrue(waitFor("tick 5\n", in: { log("counter") }), log("counter"))
        let port = freePort()
        let output = path("dest.out")
        let destinationVM = try incoming(port, output: output)
        let moved = try hvctl(source, ["migrate", "counter", "--key", key, "--to", "tcp:127.0.0.1:\(port)", "--json"])
        XCTAssertEqual(moved.status, 0, moved.stderr)
        let result = try XCTUnwrap(moved.stdout.split(separator: "\n").last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }, moved.stdout)
        XCTAssertEqual(result["destination"] as? String, "tcp:127.0.0.1:\(port)")
        XCTAssertGreaterThan(result["rounds"] as? Int ?? 0, 1, moved.stdout)
        XCTAssertLessThan(result["downtime_ms"] as? Double ?? 1e9, 1000, moved.stdout)
        XCTAssertEqual(destinationVM.waitForExit(timeout: 60), 0, destinationVM.stderr)
        XCTAssertTrue(destinationVM.stderr.contains("counter arrived and runs here"), destinationVM.stderr)
        let here = log("counter"), there = try String(contentsOfFile: output, encoding: .utf8)
        XCTAssertEqual(ticks(here + there), Array(1...40), here + "|" + there)
        XCTAssertTrue(there.hasSuffix("hv-testguest: done\n"), there)
        XCTAssertFalse(there.contains("mode=ticks"), "the guest booted again at the destination: \(there)")
        // The source is gone: no VM, socket or lock left in its run directory.
        XCTAssertEqual(try hvctl(source, ["ls"]).stdout.contains("counter"), false)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: source).filter { $0.hasSuffix(".sock") || $0.hasSuffix(".lock") }, [])
    }

    /// Disk reads land in pages only the device writes (the vCPU never touches them, nor the used
    /// ring's page), with new contents every pass: the destination must still see every block the
    /// source's device read before the switch-over — the device-side dirty log at work — and the
    /// disk image changes hands.
    func testDeviceWritesToGuestMemoryReachTheDestination() throws {
        let image = path("disk.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
        XCTAssertEqual(truncate(image, 16 << 20), 0)
        try start("reader", "mode=vscsireadback count=30", ["--disk", image])
        XCTAssertTrue(waitFor("vscsireadback: pass 10\n", timeout: 90, in: { log("reader") }), log("reader"))
        let port = freePort()
        let output = path("reader.out")
        let destinationVM = try incoming(port, output: output)
        // 64 KiB/s stretches the first round over seconds, while the device completes dozens of
        // reads into pages already sent: only its dirty log brings them over again. (With the
        // SDK's marking switched off this test fails with hundreds of mismatches.)
        let moved = try hvctl(source, ["migrate", "reader", "--key", key, "--to", "tcp:127.0.0.1:\(port)", "--bandwidth", "64K", "--max-downtime", "2s"])
        XCTAssertEqual(moved.status, 0, moved.stderr)
        XCTAssertTrue(moved.stdout.hasPrefix("migrated reader to tcp:127.0.0.1:\(port) in "), moved.stdout)
        XCTAssertEqual(destinationVM.waitForExit(timeout: 120), 0, destinationVM.stderr)
        let there = try String(contentsOfFile: output, encoding: .utf8)
        XCTAssertTrue(there.contains("vscsireadback: done reads=1920 errors=0 mismatches=0"), log("reader") + "|" + there)
    }

    /// Bad flags and addresses: one line each, exit 2 (1 for a name that does not resolve),
    /// nothing contacted.
    func testBadMigrationFlagsAreRefusedWithOneLine() throws {
        for (arguments, status, message) in [
            (["migrate", "x", "--to", "bogus"], Int32(2), "invalid --to 'bogus': use tcp:HOST:PORT"),
            (["migrate", "x", "--to", "tcp:127.0.0.1:0"], 2, "invalid --to 'tcp:127.0.0.1:0': use tcp:HOST:PORT"),
            (["migrate", "x", "--to", "tcp:127.0.0.1:1", "--bandwidth", "fast"], 2, "invalid --bandwidth 'fast'"),
            (["migrate", "x", "--to", "tcp:127.0.0.1:1", "--max-downtime", "0ms"], 2, "invalid --max-downtime '0ms'"),
            (["migrate", "x", "--to", "tcp:127.0.0.1:1", "--timeout", "5h"], 2, "invalid --timeout '5h'"),
            (["migrate", "x"], 2, "missing --to tcp:HOST:PORT"),
            (["migrate", "x", "--cancel", "--to", "tcp:127.0.0.1:1"], 2, "--cancel takes no other option"),
            (["run", "--incoming", "udp:1:2"], 2, "invalid --incoming 'udp:1:2': use tcp:HOST:PORT"),
            (["run", "--incoming", "tcp:nohost.invalid:5", "--key", key], 1, "cannot resolve 'nohost.invalid' in tcp:nohost.invalid:5"),
            // The stream's protection: a key, or plaintext said out loud; never by default.
            (["migrate", "x", "--to", "tcp:127.0.0.1:1"], 2, "a migration needs the key both hosts hold: --key FILE"),
            (["run", "--incoming", "tcp:127.0.0.1:1"], 2, "a migration needs the key both hosts hold: --key FILE"),
            (["migrate", "x", "--to", "tcp:127.0.0.1:1", "--key", key, "--insecure-plaintext"], 2, "--key and --insecure-plaintext exclude each other"),
            (["migrate", "x", "--to", "tcp:127.0.0.1:1", "--key", "/nonexistent.key"], 2, "--key /nonexistent.key: No such file or directory"),
            (["run", "--key", key], 2, "--key and --insecure-plaintext go with --incoming"),
            (["run", "--incoming", "tcp:127.0.0.1:1", "--multiboot", "/bin/true"], 2, "--incoming takes the VM as the source describes it"),
        ] {
            let r = try hvctl(destination, arguments)
            XCTAssertEqual(r.status, status, "\(arguments): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("hvctl: \(message)"), "\(arguments): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
    }

    /// A guest that rewrites 2 MiB without pause over a 4 MiB/s link would need a 500 ms pause:
    /// after --timeout the migration gives up and the VM runs on; with --finish-on-timeout it
    /// switches over anyway, with the longer pause.
    func testAMigrationThatDoesNotConvergeGivesUpOrFinishesWhenAsked() throws {
        try start("busy", "mode=memdirty count=2")
        XCTAssertTrue(waitFor("memdirty: ready", timeout: 120, in: { log("busy") }), log("busy"))
        let port = freePort()
        // Over plain TCP, as the operator may choose explicitly (and is warned).
        let destinationVM = try incoming(port, output: path("busy.out"), security: ["--insecure-plaintext"])
        let given = try hvctl(source, ["migrate", "busy", "--insecure-plaintext", "--to", "tcp:127.0.0.1:\(port)", "--bandwidth", "4M", "--timeout", "2s"])
        XCTAssertTrue(given.stderr.hasPrefix("hvctl: warning: --insecure-plaintext: this migration is neither authenticated nor encrypted\n"), given.stderr)
        XCTAssertEqual(given.status, 1, given.stdout)
        XCTAssertTrue(given.stderr.contains("memory did not converge within 2 s") && given.stderr.contains("cancelled, the VM carries on here"), given.stderr)
        XCTAssertNotEqual(destinationVM.waitForExit(timeout: 30), 0)
        XCTAssertEqual(try state("busy"), "running")

        let again = freePort()
        let secondVM = try incoming(again, output: path("busy2.out"))
        let finished = try hvctl(source, ["migrate", "busy", "--key", key, "--to", "tcp:127.0.0.1:\(again)", "--bandwidth", "4M", "--timeout", "1s",
                                          "--finish-on-timeout", "--json"])
        XCTAssertEqual(finished.status, 0, finished.stderr)
        let result = try XCTUnwrap(JSONSerialization.jsonObject(with: Data((finished.stdout.split(separator: "\n").last ?? "").utf8)) as? [String: Any])
        XCTAssertGreaterThan(result["downtime_ms"] as? Double ?? 0, 100, finished.stdout)
        XCTAssertTrue(secondVM.process.isRunning, secondVM.stderr)
        // The source returns once the destination said GO; the destination's own line follows.
        XCTAssertTrue(waitFor("busy arrived and runs here", timeout: 10) { secondVM.stderr }, secondVM.stderr)
        XCTAssertEqual(try hvctl(destination, ["stop", "busy"]).status, 0)
        XCTAssertEqual(secondVM.waitForExit(timeout: 30), 0, secondVM.stderr)
    }

    /// A third-party device that cannot save its state (no SNAPSHOT) cannot move: the migration
    /// is refused before anything is sent, naming it.
    func testAPluginThatCannotMigrateIsNamed() throws {
        let exe = Harness.productsDirectory.appendingPathComponent("hv-pci-testdevice").path
        let profile = Harness.repositoryRoot.appendingPathComponent("Tests/RogueDevice/rogue.json").path
        try start("plugged", "mode=ticks count=100000 delay=50", ["--device", "\(exe),profile=\(profile),pci=03.0,bar0=mmio:4096,bar1=pio:16"])
        XCTAssertTrue(waitFor("tick 1\n", in: { log("plugged") }), log("plugged"))
        let r = try hvctl(source, ["migrate", "plugged", "--key", key, "--to", "tcp:127.0.0.1:\(freePort())"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("cannot migrate: device0 (pci-testdevice) cannot be migrated"), r.stderr)
        XCTAssertEqual(try state("plugged"), "running")
    }

    /// Nobody listening, a peer speaking another protocol version, and a cancel: each is one
    /// line, and the VM runs on at the source as before.
    func testFailedMigrationsLeaveTheVMRunningAtTheSource() throws {
        try start("stay", "mode=ticks count=100000 delay=50")
        XCTAssertTrue(waitFor("tick 2\n", in: { log("stay") }), log("stay"))

        let nobody = try hvctl(source, ["migrate", "stay", "--key", key, "--to", "tcp:127.0.0.1:\(freePort())"])
        XCTAssertEqual(nobody.status, 1)
        XCTAssertTrue(nobody.stderr.contains("cannot connect to tcp:127.0.0.1:"), nobody.stderr)
        XCTAssertEqual(try state("stay"), "running")

        // A peer that answers with protocol version 99.
        let port = freePort()
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var on: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        XCTAssertEqual(withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }, 0)
        XCTAssertEqual(listen(listener, 1), 0)
        let peer = Thread {
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            // The source's opening (48 bytes: magic, version, protection, nonce), answered in kind.
            var opening = [UInt8](repeating: 0, count: 48)
            _ = recv(fd, &opening, 48, Int32(MSG_WAITALL))
            let reply = Array("HVMIGR\r\n".utf8) + [99, 0, 0, 0, 1, 0, 0, 0] + [UInt8](repeating: 7, count: 32)
            _ = send(fd, reply, reply.count, 0)
            Thread.sleep(forTimeInterval: 1)
            close(fd)
        }
        peer.start()
        let mismatch = try hvctl(source, ["migrate", "stay", "--key", key, "--to", "tcp:127.0.0.1:\(port)"])
        close(listener)
        XCTAssertEqual(mismatch.status, 1)
        XCTAssertTrue(mismatch.stderr.contains("the destination speaks hv migration protocol 99, this hv speaks 2"), mismatch.stderr)
        XCTAssertEqual(try state("stay"), "running")

        // A destination holding another key: both sides say so, nothing is sent, the VM runs on;
        // the destination drops that connection and goes on waiting (whoever reaches its port
        // cannot end the wait), and a plain TCP client that is not hv is dropped the same way.
        let otherKey = try Harness.migrationKey(in: dir, name: "other.key")
        let keyPort = freePort()
        let wrongKeyVM = try incoming(keyPort, output: path("wrongkey.out"), security: ["--key", otherKey])
        let wrongKey = try hvctl(source, ["migrate", "stay", "--key", key, "--to", "tcp:127.0.0.1:\(keyPort)"])
        XCTAssertEqual(wrongKey.status, 1)
        XCTAssertEqual(wrongKey.stderr, "hvctl: the destination holds a different migration key: give both hosts the same --key FILE\n")
        XCTAssertTrue(waitFor("still waiting on tcp:127.0.0.1:\(keyPort)", timeout: 10) { wrongKeyVM.stderr }, wrongKeyVM.stderr)
        XCTAssertTrue(wrongKeyVM.stderr.contains("refused a connection from 127.0.0.1:") && wrongKeyVM.stderr.contains("the source holds a different migration key"),
                      wrongKeyVM.stderr)
        let stranger = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var to = sockaddr_in()
        to.sin_family = sa_family_t(AF_INET)
        to.sin_port = keyPort.bigEndian
        to.sin_addr.s_addr = inet_addr("127.0.0.1")
        XCTAssertEqual(withUnsafePointer(to: &to) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(stranger, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }, 0)
        let junk = Array("GET / HTTP/1.0\r\n\r\n".utf8) + [UInt8](repeating: 0x41, count: 30)
        XCTAssertEqual(send(stranger, junk, junk.count, 0), junk.count)
        XCTAssertTrue(waitFor("is not an hv migration peer", timeout: 10) { wrongKeyVM.stderr }, wrongKeyVM.stderr)
        close(stranger)
        XCTAssertTrue(wrongKeyVM.process.isRunning, "a failed opening ended the wait: \(wrongKeyVM.stderr)")
        wrongKeyVM.terminateAndWait()
        XCTAssertEqual(try state("stay"), "running")

        // Cancelled while memory is copied slowly (4 KiB a second): the destination gives up too.
        let slowPort = freePort()
        let destinationVM = try incoming(slowPort, output: path("never.out"))
        setenv("HV_RUN_DIR", source, 1)
        let migrating = try VMProcess(["migrate", "stay", "--key", key, "--to", "tcp:127.0.0.1:\(slowPort)", "--bandwidth", "4096"])
        Thread.sleep(forTimeInterval: 1.5)
        // The destination starts the VM's device processes while memory is copied (the pause
        // then has only their handshakes left); they end with the migration that failed.
        let startedAhead = destinationVM.children(named: "hv-serial") + destinationVM.children(named: "hv-bios")
        XCTAssertEqual(startedAhead.count, 2, "device processes at the destination during the copy: \(startedAhead)")
        let cancel = try hvctl(source, ["migrate", "stay", "--cancel"])
        let cancelledAt = Date()
        XCTAssertEqual(cancel.status, 0, cancel.stderr)
        XCTAssertEqual(migrating.waitForExit(timeout: 30), 1)
        // Heard while the stream waits out the bandwidth limit, not after the frame in hand.
        XCTAssertLessThan(Date().timeIntervalSince(cancelledAt), 3, "the cancel took effect only \(Date().timeIntervalSince(cancelledAt)) s later")
        XCTAssertTrue(migrating.stderr.contains("cancelled; the VM carries on here"), migrating.stderr)
        XCTAssertNotEqual(destinationVM.waitForExit(timeout: 30), 0)
        XCTAssertTrue(destinationVM.stderr.contains("migration of stay failed"), destinationVM.stderr)
        for pid in startedAhead { XCTAssertNotEqual(kill(pid, 0), 0, "device process \(pid) outlived the failed migration") }
        XCTAssertEqual(try state("stay"), "running")
        let before = ticks(log("stay")).last ?? 0
        XCTAssertTrue(waitFor("tick \(before + 2)\n", in: { log("stay") }), "the VM does not run on after the cancel")
        // Nothing was left at the destination.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: destination).filter { $0.hasSuffix(".sock") || $0.hasSuffix(".lock") }, [])
    }
}

import Foundation
import XCTest

/// hvd, hv's API service, driven end to end with curl over its Unix socket: the lifecycle of a VM
/// with the event stream, metrics and audit log watching; VMs outliving hvd (SIGKILL) and coming
/// back with autostart; bad requests refused with the field named; and schemathesis fuzzing the
/// API against api/hvd.yaml while a VM runs beside it.
final class HVDTests: XCTestCase {
    private var dir: URL!
    private var runDir: String { dir.appendingPathComponent("run").path }
    private var stateDir: String { dir.appendingPathComponent("state").path }
    private var socket: String { runDir + "/hvd/api.sock" }
    private var hvd: VMProcess?
    private var background: [VMProcess] = []

    private static var hvdPath: String { Harness.productsDirectory.appendingPathComponent("hvd").path }

    override func setUpWithError() throws {
        try Harness.requireKVM()
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/curl") else { throw Harness.MissingBuild(description: "curl is missing: test.sh installs it") }
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-hvd-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", runDir, 1)
        setenv("HV_STATE_DIR", stateDir, 1)
    }

    override func tearDown() {
        background.forEach { $0.terminateAndWait() }
        hvd?.terminateAndWait()
        for name in (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? [] where name.hasSuffix(".sock") {
            _ = try? runHvctl(["stop", String(name.dropLast(5))])
        }
        unsetenv("HV_RUN_DIR")
        unsetenv("HV_STATE_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    // MARK: Helpers

    /// Starts hvd and waits until it answers.
    @discardableResult
    private func startHVD(_ extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws -> VMProcess {
        let process = try VMProcess(["--poll-interval", "100"] + extra, executable: Self.hvdPath)
        hvd = process
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if (try? call("GET", "/v1"))?.status == 200 { return process }
            XCTAssertTrue(process.process.isRunning, "hvd ended: \(process.stderr)", file: file, line: line)
            Thread.sleep(forTimeInterval: 0.05)
        }
        XCTFail("hvd did not answer on \(socket): \(process.stderr)", file: file, line: line)
        return process
    }

    /// One request with curl (to hvd's admin socket, or `on` another); the status and the body.
    private func call(_ method: String, _ path: String, _ body: String? = nil, contentType: String = "application/json",
                      on socket: String? = nil) throws -> (status: Int, body: String) {
        var arguments = ["-sS", "--unix-socket", socket ?? self.socket, "-X", method, "-o", "-", "-w", "\n%{http_code}", "http://hvd" + path]
        // The body goes through a file: a large one would not fit in an argument list.
        let file = dir.appendingPathComponent("body-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: file) }
        if let body {
            try Data(body.utf8).write(to: file)
            arguments += ["-H", "content-type: \(contentType)", "--data-binary", "@" + file.path]
        }
        let r = try tool("/usr/bin/curl", arguments)
        let lines = r.output.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
    }

    private func object(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], text, file: file, line: line)
    }

    /// `POST /v1/vms` for the test guest counting ticks.
    private func create(_ name: String, ticks: Int = 100_000, autostart: Bool = false, extra: String = "") throws -> (status: Int, body: String) {
        let guest = try Harness.testGuest()
        return try call("POST", "/v1/vms", """
            {"name": "\(name)", "autostart": \(autostart), "definition": {"memory_mib": 32, \(extra)
             "boot": {"multiboot": "\(guest)", "cmdline": "mode=ticks count=\(ticks) delay=50"}}}
            """)
    }

    private func consoleLog(_ name: String) -> String {
        (try? String(contentsOfFile: "\(runDir)/\(name).log", encoding: .utf8)) ?? ""
    }

    private func waitFor(_ what: String, timeout: TimeInterval = 30, _ condition: () -> Bool, file: StaticString = #filePath, line: UInt = #line) {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition() { return }
            Thread.sleep(forTimeInterval: 0.02)
        }
        XCTFail("timed out waiting for \(what)", file: file, line: line)
    }

    /// The event lines a `curl -N …/v1/events` has printed so far.
    private func events(_ stream: VMProcess) -> [[String: Any]] {
        stream.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
    }

    private func subscribe() throws -> VMProcess {
        let stream = try VMProcess(["-sN", "--unix-socket", socket, "http://hvd/v1/events"], executable: "/usr/bin/curl")
        background.append(stream)
        waitFor("the event stream's first line") { stream.stdout.contains("\"subscribed\"") }
        return stream
    }

    private func pid(_ name: String) throws -> Int32? {
        let info = try object(try call("GET", "/v1/vms/\(name)").body)
        return (info["status"] as? [String: Any])?["pid"] as? Int32
    }

    // MARK: Tests

    func testVMLifecycleWithEventsMetricsAndAuditLog() throws {
        try startHVD()
        let stream = try subscribe()
        let created = try create("web1")
        XCTAssertEqual(created.status, 201, created.body)
        let info = try object(created.body)
        XCTAssertEqual(info["state"] as? String, "stopped")
        // hvd has no terminal: the console goes to the run directory's log.
        XCTAssertEqual((info["definition"] as? [String: Any]).flatMap { $0["serial"] as? [String: Any] }?["output"] as? String, "console")

        let started = try call("POST", "/v1/vms/web1/start")
        XCTAssertEqual(started.status, 200, started.body)
        XCTAssertEqual(try object(started.body)["state"] as? String, "running")
        waitFor("the guest's third tick") { consoleLog("web1").contains("tick 3\n") }
        // hvctl sees the same VM: it is an ordinary hv VM, its own process.
        let listed = try runHvctl(["status", "web1", "--json"])
        XCTAssertEqual(listed.status, 0, listed.stderr)

        let metrics = try call("GET", "/metrics")
        XCTAssertEqual(metrics.status, 200)
        XCTAssertTrue(metrics.body.contains("hv_vm_up{vm=\"web1\"} 1"), metrics.body)
        XCTAssertTrue(metrics.body.contains("hv_vm_memory_bytes{vm=\"web1\"} 33554432"), metrics.body)
        XCTAssertTrue(metrics.body.contains("hv_vcpu_seconds_total{vm=\"web1\",vcpu=\"0\"}"), metrics.body)
        // The guest writes its console through port I/O: every byte an exit the core counts.
        let ioExits = metrics.body.split(separator: "\n").first { $0.hasPrefix("hv_vcpu_exits_total{vm=\"web1\",vcpu=\"0\",kind=\"io\"}") }
        XCTAssertGreaterThan(Double(ioExits?.split(separator: " ").last ?? "") ?? 0, 100, metrics.body)
        XCTAssertTrue(metrics.body.contains("hv_device_restarts_total{vm=\"web1\",device=\"serial0\",kind=\"serial\"} 0"), metrics.body)

        XCTAssertEqual(try object(try call("POST", "/v1/vms/web1/pause").body)["state"] as? String, "paused")
        let restart = try call("POST", "/v1/vms/web1/devices/serial0/restart")
        XCTAssertEqual(restart.status, 200, restart.body)
        XCTAssertEqual(try object(try call("POST", "/v1/vms/web1/resume").body)["state"] as? String, "running")
        let stopped = try call("POST", "/v1/vms/web1/stop")
        XCTAssertEqual(stopped.status, 200, stopped.body)
        XCTAssertEqual(try object(stopped.body)["state"] as? String, "stopped")
        XCTAssertEqual(try runHvctl(["status", "web1"]).status, 1, "the VM's core still runs after stop")

        let kinds = ["vm-created", "vm-started", "vm-paused", "device-restarted", "vm-resumed", "vm-stopped"]
        waitFor("the events \(kinds)") { events(stream).map { $0["type"] as? String ?? "" }.filter(kinds.contains) == kinds }
        let stop = events(stream).first { $0["type"] as? String == "vm-stopped" }
        XCTAssertEqual(stop?["reason"] as? String, "requested", stream.stdout)
        XCTAssertEqual(events(stream).first { $0["type"] as? String == "device-restarted" }?["device"] as? String, "serial0")

        XCTAssertEqual(try call("GET", "/metrics").body.contains("hv_vm_up{vm=\"web1\"} 0"), true)
        XCTAssertEqual(try call("DELETE", "/v1/vms/web1").status, 204)
        XCTAssertEqual(try call("GET", "/v1/vms/web1").status, 404)
        waitFor("vm-deleted") { events(stream).contains { $0["type"] as? String == "vm-deleted" } }
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateDir + "/vms/web1"))

        // Every request but GET, once, with who sent it (curl: this test's uid) and the result.
        let audit = try String(contentsOfFile: stateDir + "/audit.log", encoding: .utf8).split(separator: "\n").map { try object(String($0)) }
        XCTAssertEqual(audit.map { "\($0["method"] ?? "") \($0["path"] ?? "") \($0["status"] ?? "")" },
                       ["POST /v1/vms 201", "POST /v1/vms/web1/start 200", "POST /v1/vms/web1/pause 200",
                        "POST /v1/vms/web1/devices/serial0/restart 200", "POST /v1/vms/web1/resume 200",
                        "POST /v1/vms/web1/stop 200", "DELETE /v1/vms/web1 204"])
        for record in audit {
            let peer = try XCTUnwrap(record["peer"] as? [String: Any], "\(record)")
            XCTAssertEqual(peer["uid"] as? UInt32, getuid())
            XCTAssertGreaterThan(peer["pid"] as? Int32 ?? 0, 0)
        }
    }

    func testVMsOutliveHVDAndAutostartBringsThemBack() throws {
        try startHVD()
        let created = try create("auto", autostart: true); XCTAssertEqual(created.status, 201, created.body)
        XCTAssertEqual(try create("manual").status, 201)
        hvd?.terminateAndWait()
        // Autostart: hvd starts 'auto' (only) when it starts.
        try startHVD()
        waitFor("autostart") { consoleLog("auto").contains("tick 2\n") }
        XCTAssertEqual(try object(try call("GET", "/v1/vms/manual").body)["state"] as? String, "stopped")
        let first = try XCTUnwrap(try pid("auto"))

        // hvd SIGKILLed: the VM carries on, and the next hvd adopts it as it is (same core, not
        // started again), and can stop it.
        kill(try XCTUnwrap(hvd).process.processIdentifier, SIGKILL)
        hvd?.process.waitUntilExit()
        let ticks = consoleLog("auto").components(separatedBy: "tick ").count
        waitFor("ticks while hvd is gone") { consoleLog("auto").components(separatedBy: "tick ").count > ticks + 2 }
        let again = try startHVD()
        XCTAssertEqual(try pid("auto"), first, "hvd started the VM again instead of adopting it")
        XCTAssertTrue(again.stderr.contains("found 1 VM running: auto"), again.stderr)
        let list = try object(try call("GET", "/v1/vms").body)["vms"] as? [[String: Any]]
        XCTAssertEqual(list?.map { "\($0["name"] ?? "") \($0["state"] ?? "")" }, ["auto running", "manual stopped"])
        let stream = try subscribe()
        XCTAssertEqual(try call("POST", "/v1/vms/auto/stop").status, 200)
        waitFor("vm-stopped") { events(stream).contains { $0["type"] as? String == "vm-stopped" } }

        // A VM that ends behind hvd's back is told as exited (hvctl pointed away from hvd, which
        // it would otherwise go through).
        XCTAssertEqual(try call("POST", "/v1/vms/manual/start").status, 200)
        setenv("HVD_SOCKET", dir.appendingPathComponent("no-hvd.sock").path, 1)
        defer { unsetenv("HVD_SOCKET") }
        XCTAssertEqual(try runHvctl(["stop", "manual"]).status, 0)
        unsetenv("HVD_SOCKET")
        waitFor("vm-stopped (exited)") { events(stream).contains { $0["type"] as? String == "vm-stopped" && $0["vm"] as? String == "manual" && $0["reason"] as? String == "exited" } }

        // Killed through the API: reason "killed", and nothing is left running.
        XCTAssertEqual(try call("POST", "/v1/vms/manual/start").status, 200)
        let killed = try call("POST", "/v1/vms/manual/kill")
        XCTAssertEqual(killed.status, 200, killed.body)
        XCTAssertEqual(try object(killed.body)["state"] as? String, "stopped")
        waitFor("vm-stopped (killed)") { events(stream).contains { $0["vm"] as? String == "manual" && $0["reason"] as? String == "killed" } }

        // With hvd restarted and 'auto' stopped, autostart starts it afresh.
        hvd?.terminateAndWait()
        try startHVD()
        waitFor("autostart after a restart") { (try? self.pid("auto")).flatMap { $0 } != nil }
        XCTAssertNotEqual(try pid("auto"), first)
        XCTAssertEqual(try object(try call("GET", "/v1/vms/manual").body)["state"] as? String, "stopped")
    }

    func testBadRequestsAreRefusedNamingTheField() throws {
        try startHVD()
        func refused(_ method: String, _ path: String, _ body: String?, _ status: Int, _ text: String, contentType: String = "application/json",
                     file: StaticString = #filePath, line: UInt = #line) throws {
            let r = try call(method, path, body, contentType: contentType)
            XCTAssertEqual(r.status, status, r.body, file: file, line: line)
            let message = try object(r.body, file: file, line: line)["error"] as? String ?? ""
            XCTAssertTrue(message.contains(text), "\(message) does not say \(text)", file: file, line: line)
            XCTAssertFalse(message.contains("\n"), message, file: file, line: line)
        }
        try refused("POST", "/v1/vms", "{\"name\": \"a\", ", 400, "not valid JSON")
        try refused("POST", "/v1/vms", "{\"name\": \"a\", \"definition\": {\"disks\": [{\"path\": \"/x\", \"redonly\": true}]}}", 400,
                    "'definition.disks[0].redonly': unknown key")
        try refused("POST", "/v1/vms", "{\"name\": \"a\", \"definition\": {\"cpus\": \"two\"}}", 400, "'definition.cpus' must be a whole number")
        try refused("POST", "/v1/vms", "{\"name\": \"a\", \"definition\": {\"cdrom\": null}}", 400, "'definition.cdrom': null is not a value here")
        try refused("POST", "/v1/vms", "{\"name\": \"a\", \"definition\": {\"disks\": [{\"path\": \"disk.img\"}]}}", 400,
                    "definition.disks[0].path 'disk.img' is relative")
        try refused("POST", "/v1/vms", "{\"name\": \"a\", \"definition\": {\"cpus\": 999}}", 400, "definition: invalid cpus '999'")
        try refused("POST", "/v1/vms", "{\"name\": \"../etc\"}", 400, "invalid name '../etc'")
        try refused("POST", "/v1/vms", "{\"name\": \"a\"}", 415, "application/json", contentType: "text/plain")
        try refused("POST", "/v1/vms", "{\"name\": \"a\", \"x\": \"" + String(repeating: "x", count: 1 << 21) + "\"}", 413, "over 1048576 bytes")
        try refused("PUT", "/v1/vms", "{}", 405, "PUT is not allowed on /v1/vms: use GET, POST")
        try refused("GET", "/v2/vms", nil, 404, "no such path: /v2/vms")
        try refused("POST", "/v1/vms/nobody/start", nil, 404, "no VM named 'nobody'")

        // A name taken; a VM that cannot start (its disk is missing) says why and leaves nothing.
        XCTAssertEqual(try create("a", extra: "\"disks\": [{\"path\": \"\(dir.path)/missing.img\"}],").status, 201)
        try refused("POST", "/v1/vms", "{\"name\": \"a\"}", 409, "a VM named 'a' exists already")
        try refused("POST", "/v1/vms/a/start", nil, 422, "missing.img")
        XCTAssertEqual(try runHvctl(["ls"]).stdout.split(separator: "\n").count, 1, "a VM was left running")
        try refused("POST", "/v1/vms/a/stop", nil, 409, "VM 'a' is not running")
        try refused("PATCH", "/v1/vms/a", "{\"autostart\": \"yes\"}", 400, "'autostart' must be true or false")

        // One hvd per socket.
        let second = try runHvctl(["--poll-interval", "100"], timeout: 20, executable: Self.hvdPath)
        XCTAssertEqual(second.status, 1)
        XCTAssertEqual(second.stderr, "hvd: another hvd already serves \(socket); stop it first, or give this one another --socket\n")
        XCTAssertEqual(try call("GET", "/v1").status, 200, "hvd stopped serving")
    }

    /// Tenant sockets: each tenant sees and controls its own VMs only, names files in its own
    /// directory (confined there by the kernel, symbolic links included), and cannot reach host
    /// taps, device processes or upgrades.
    func testTenantSocketsSeeAndControlOnlyTheirOwnVMs() throws {
        try startHVD(["--tenant", "alice:61001", "--tenant", "bob:61002:61003"])
        let alice = dir.appendingPathComponent("hvd-tenants/alice/api.sock").path
        let bob = dir.appendingPathComponent("hvd-tenants/bob/api.sock").path
        let aliceFiles = dir.appendingPathComponent("hv-tenants/alice").path
        let bobFiles = dir.appendingPathComponent("hv-tenants/bob").path
        // Owners and modes hvd set.
        for (path, uid, gid, mode) in [(alice, 61001, 61001, 0o600), (bob, 61002, 61003, 0o600), (aliceFiles, 61001, 61001, 0o700), (bobFiles, 61002, 61003, 0o700)] {
            var st = stat()
            XCTAssertEqual(lstat(path, &st), 0, path)
            XCTAssertEqual([Int(st.st_uid), Int(st.st_gid), Int(st.st_mode & 0o777)], [uid, gid, mode], path)
        }
        try FileManager.default.copyItem(atPath: try Harness.testGuest(), toPath: aliceFiles + "/guest.elf")

        // Alice creates and starts a VM with a path relative to her directory.
        let created = try call("POST", "/v1/vms", """
            {"name": "a1", "definition": {"memory_mib": 32, "boot": {"multiboot": "guest.elf", "cmdline": "mode=ticks count=100000 delay=50"}}}
            """, on: alice)
        XCTAssertEqual(created.status, 201, created.body)
        let definition = try XCTUnwrap(try object(created.body)["definition"] as? [String: Any])
        XCTAssertEqual(definition["tenant"] as? String, "alice")
        XCTAssertEqual(definition["confine_files_to"] as? String, aliceFiles)
        XCTAssertEqual((definition["boot"] as? [String: Any])?["multiboot"] as? String, aliceFiles + "/guest.elf")
        XCTAssertEqual(try call("POST", "/v1/vms/a1/start", on: alice).status, 200)
        waitFor("alice's console") { (try? self.call("GET", "/v1/vms/a1/console?bytes=4096", on: alice).body.contains("tick 2")) == true }
        XCTAssertTrue(try call("GET", "/v1/vms", on: socket).body.contains("\"a1\""), "the admin sees every VM")

        // Bob sees nothing of it, and cannot touch it: another tenant's VM does not exist for him.
        XCTAssertEqual((try object(try call("GET", "/v1/vms", on: bob).body)["vms"] as? [Any])?.count, 0)
        for (method, path) in [("GET", "/v1/vms/a1"), ("POST", "/v1/vms/a1/stop"), ("POST", "/v1/vms/a1/kill"), ("POST", "/v1/vms/a1/pause"),
                               ("DELETE", "/v1/vms/a1"), ("GET", "/v1/vms/a1/console"), ("POST", "/v1/vms/a1/devices/serial0/restart")] {
            let r = try call(method, path, on: bob)
            XCTAssertEqual(r.status, 404, "\(method) \(path): \(r.body)")
            XCTAssertTrue(r.body.contains("no VM named 'a1'"), r.body)
        }
        XCTAssertFalse(try call("GET", "/metrics", on: bob).body.contains("a1"), "bob's metrics show alice's VM")
        XCTAssertEqual(try object(try call("GET", "/v1", on: bob).body)["vms"] as? Int, 0)

        // What a tenant may not ask for.
        func refused(_ body: String, _ status: Int, _ text: String, on socket: String, file: StaticString = #filePath, line: UInt = #line) throws {
            let r = try call("POST", "/v1/vms", body, on: socket)
            XCTAssertEqual(r.status, status, r.body, file: file, line: line)
            XCTAssertTrue(r.body.contains(text), "\(r.body) does not say \(text)", file: file, line: line)
        }
        try refused(#"{"name": "b1", "definition": {"disks": [{"path": "/etc/passwd"}]}}"#, 400, "is not beneath \(bobFiles)", on: bob)
        try refused(#"{"name": "b1", "definition": {"disks": [{"path": "../alice/guest.elf"}]}}"#, 400, "is not beneath", on: bob)
        try refused(#"{"name": "b1", "definition": {"nics": [{"tap": "tap0"}]}}"#, 403, "not to host taps", on: bob)
        try refused(#"{"name": "b1", "definition": {"nics": [{"segment": "lab"}]}}"#, 403, "'bob.NAME'", on: bob)
        try refused(#"{"name": "b1", "definition": {"devices": ["/bin/true,profile=/x"]}}"#, 403, "cannot add device processes", on: bob)
        try refused(#"{"name": "b1", "definition": {"sandbox": false}}"#, 403, "always run sandboxed", on: bob)
        try refused(#"{"name": "b1", "definition": {"tenant": "alice"}}"#, 403, "your VMs run as tenant 'bob'", on: bob)
        try refused(#"{"name": "b1", "definition": {"confine_files_to": "/"}}"#, 403, "hvd's to set", on: bob)
        let upgrade = try call("POST", "/v1/vms/a1/devices/serial0/upgrade", #"{"path": "/bin/true"}"#, on: alice)
        XCTAssertEqual(upgrade.status, 403, upgrade.body)
        let loosen = try call("PUT", "/v1/vms/a1/limits", #"{"limits": {"cpu_weight": 10000}}"#, on: alice)
        XCTAssertEqual(loosen.status, 403, loosen.body)
        XCTAssertTrue(loosen.body.contains("tenants cannot change their VMs' limits"), loosen.body)
        let restore = try call("POST", "/v1/vms/a2/restore", #"{"path": "/var/lib/snapshots/x"}"#, on: alice)
        XCTAssertEqual(restore.status, 403, restore.body)
        XCTAssertTrue(restore.body.contains("tenants cannot restore snapshots"), restore.body)

        // A symbolic link in Bob's directory that leads out is refused by the kernel when the VM
        // opens it, however hvd's own check of the name went.
        XCTAssertEqual(symlink("/etc/hostname", bobFiles + "/escape.img"), 0)
        XCTAssertEqual(try call("POST", "/v1/vms", #"{"name": "b2", "definition": {"memory_mib": 32, "disks": [{"path": "escape.img"}]}}"#, on: bob).status, 201)
        let escaped = try call("POST", "/v1/vms/b2/start", on: bob)
        XCTAssertEqual(escaped.status, 422, escaped.body)
        XCTAssertTrue(escaped.body.contains("is not beneath \(bobFiles)"), escaped.body)
        XCTAssertEqual(try object(try call("GET", "/v1/vms/b2", on: bob).body)["state"] as? String, "stopped")

        // The audit log names the socket each request came through.
        let audit = try String(contentsOfFile: stateDir + "/audit.log", encoding: .utf8)
        XCTAssertTrue(audit.contains("\"socket\":\"\(bob)\"") && audit.contains("\"path\":\"/v1/vms/a1/stop\""), audit)
        XCTAssertEqual(try call("POST", "/v1/vms/a1/stop", on: alice).status, 200)
    }

    /// Tenants added and removed while hvd and a tenant's VM run: a new tenant's socket is served
    /// at once (owned by its uid) and again after hvd restarts; names and uids are one tenant's;
    /// a tenant with VMs, or one from the command line, is not removed; a removed tenant's
    /// socket is gone. Only the admin manages tenants.
    func testTenantsAreAddedAndRemovedWhileHVDRuns() throws {
        let flags = ["--tenant", "alice:61001"]
        try startHVD(flags)
        let alice = dir.appendingPathComponent("hvd-tenants/alice/api.sock").path
        let carol = dir.appendingPathComponent("hvd-tenants/carol/api.sock").path
        let carolFiles = dir.appendingPathComponent("hv-tenants/carol").path
        try FileManager.default.copyItem(atPath: try Harness.testGuest(), toPath: dir.appendingPathComponent("hv-tenants/alice/guest.elf").path)
        let vm = #"{"name": "%@", "definition": {"memory_mib": 32, "boot": {"multiboot": "guest.elf", "cmdline": "mode=ticks count=100000 delay=50"}}}"#
        XCTAssertEqual(try call("POST", "/v1/vms", vm.replacingOccurrences(of: "%@", with: "a1"), on: alice).status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/a1/start", on: alice).status, 200)
        let pid = try self.pid("a1")

        let added = try call("POST", "/v1/tenants", #"{"name": "carol", "uid": 61004}"#)
        XCTAssertEqual(added.status, 201, added.body)
        let info = try object(added.body)
        XCTAssertEqual(info["socket"] as? String, carol)
        XCTAssertEqual(info["origin"] as? String, "api")
        for (path, mode) in [(carol, 0o600), (carolFiles, 0o700)] {
            var st = stat()
            XCTAssertEqual(lstat(path, &st), 0, path)
            XCTAssertEqual([Int(st.st_uid), Int(st.st_gid), Int(st.st_mode & 0o777)], [61004, 61004, mode], path)
        }
        // Carol's socket is a tenant's: her own VMs, nobody else's, and no tenants to manage.
        try FileManager.default.copyItem(atPath: try Harness.testGuest(), toPath: carolFiles + "/guest.elf")
        XCTAssertEqual(try call("POST", "/v1/vms", vm.replacingOccurrences(of: "%@", with: "c1"), on: carol).status, 201)
        XCTAssertEqual(try call("GET", "/v1/vms/a1", on: carol).status, 404)
        XCTAssertEqual(try call("GET", "/v1/tenants", on: carol).status, 403)
        XCTAssertEqual(try call("POST", "/v1/tenants", #"{"name": "mallory", "uid": 61009}"#, on: alice).status, 403)
        // A name or a uid is one tenant's; root is no tenant.
        for (body, status, text) in [(#"{"name": "carol", "uid": 61005}"#, 409, "tenant 'carol' exists already"),
                                     (#"{"name": "dave", "uid": 61001}"#, 409, "uid 61001 is tenant alice's already"),
                                     (#"{"name": "dave", "uid": 0}"#, 400, "a tenant is not root"),
                                     (#"{"name": ".dave", "uid": 61006}"#, 400, "invalid name '.dave'"),
                                     (#"{"name": "dave", "uid": 61006, "home": "/"}"#, 400, "home")] {
            let r = try call("POST", "/v1/tenants", body)
            XCTAssertEqual(r.status, status, "\(body): \(r.body)")
            XCTAssertTrue(r.body.contains(text), "\(body): \(r.body)")
        }
        XCTAssertEqual(try call("POST", "/v1/tenants", #"{"name": "dave", "uid": 61006, "gid": 61007}"#).status, 201)
        // Not while it has VMs, nor one hvd's command line gives.
        let busy = try call("DELETE", "/v1/tenants/carol")
        XCTAssertEqual(busy.status, 409, busy.body)
        XCTAssertTrue(busy.body.contains("tenant 'carol' has VMs (c1)"), busy.body)
        let given = try call("DELETE", "/v1/tenants/alice")
        XCTAssertEqual(given.status, 409, given.body)
        XCTAssertTrue(given.body.contains("remove it from hvd's command line"), given.body)
        XCTAssertEqual(try call("DELETE", "/v1/tenants/nobody").status, 404)
        XCTAssertEqual(try call("DELETE", "/v1/vms/c1", on: carol).status, 204)
        XCTAssertEqual(try call("DELETE", "/v1/tenants/carol").status, 204)
        XCTAssertFalse(FileManager.default.fileExists(atPath: carol), "carol's socket is left")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("hvd-tenants/carol").path), "carol's socket directory is left")
        XCTAssertTrue(FileManager.default.fileExists(atPath: carolFiles + "/guest.elf"), "carol's files went with her")

        // Kept across a restart of hvd; the tenant's VM ran on throughout.
        hvd?.terminateAndWait()
        try startHVD(flags)
        let tenants = try XCTUnwrap(try object(try call("GET", "/v1/tenants").body)["tenants"] as? [[String: Any]])
        XCTAssertEqual(tenants.compactMap { $0["name"] as? String }, ["alice", "dave"])
        XCTAssertEqual(tenants.compactMap { $0["origin"] as? String }, ["command-line", "api"])
        XCTAssertEqual(tenants.last?["gid"] as? Int, 61007)
        XCTAssertEqual(try call("GET", "/v1/vms", on: dir.appendingPathComponent("hvd-tenants/dave/api.sock").path).status, 200)
        // One the book brought back is removed and added again like any other.
        XCTAssertEqual(try call("DELETE", "/v1/tenants/dave").status, 204)
        XCTAssertEqual(try call("POST", "/v1/tenants", #"{"name": "dave", "uid": 61006}"#).status, 201)
        XCTAssertEqual(try self.pid("a1"), pid, "alice's VM did not run on")
        let audit = try String(contentsOfFile: stateDir + "/audit.log", encoding: .utf8)
        XCTAssertTrue(audit.contains("\"method\":\"DELETE\",\"path\":\"/v1/tenants/carol\"") && audit.contains("\"status\":204"), audit)
        XCTAssertEqual(try call("POST", "/v1/vms/a1/stop", on: alice).status, 200)
    }

    /// A disk's I/O in /metrics, as the kernel counts its device process's: a guest that has
    /// written and read back 64 blocks of 4 KiB ten times has moved at least 2.5 MiB each way in
    /// at least 640 calls each way.
    func testADisksIOShowsInMetrics() throws {
        try startHVD()
        let image = dir.appendingPathComponent("metrics.img").path
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
        XCTAssertEqual(truncate(image, 4 << 20), 0)
        let guest = try Harness.testGuest()
        XCTAssertEqual(try call("POST", "/v1/vms", """
            {"name": "disky", "definition": {"memory_mib": 32, "disks": [{"path": "\(image)"}],
             "boot": {"multiboot": "\(guest)", "cmdline": "mode=vscsireadback count=100000"}}}
            """).status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/disky/start").status, 200)
        waitFor("ten passes of the disk pattern", timeout: 60) { consoleLog("disky").contains("vscsireadback: pass 10\n") }
        let io = try call("GET", "/metrics").body
        func counter(_ name: String) -> Double {
            io.split(separator: "\n").first { $0.hasPrefix("\(name){vm=\"disky\",device=\"disk0\",kind=\"disk\"}") }
                .flatMap { Double($0.split(separator: " ").last ?? "") } ?? -1
        }
        XCTAssertGreaterThanOrEqual(counter("hv_device_read_bytes_total"), 640 * 4096, io)
        XCTAssertGreaterThanOrEqual(counter("hv_device_written_bytes_total"), 640 * 4096, io)
        XCTAssertGreaterThanOrEqual(counter("hv_device_read_calls_total"), 640, io)
        XCTAssertGreaterThanOrEqual(counter("hv_device_write_calls_total"), 640, io)
        XCTAssertGreaterThanOrEqual(counter("hv_device_storage_read_bytes_total"), 0, io)
        XCTAssertGreaterThanOrEqual(counter("hv_device_storage_written_bytes_total"), 0, io)
        XCTAssertEqual(try call("POST", "/v1/vms/disky/stop").status, 200)
    }

    /// A NIC on a segment in /metrics and in the VM's status, as its segment's switch counts it:
    /// a guest pinging its peer has sent and received at least as many frames as it has had
    /// replies, and the two sides' counts mirror each other.
    func testASegmentNICsTrafficShowsInMetrics() throws {
        try startHVD()
        let guest = try Harness.testGuest()
        let segment = "m\(getpid())"
        for (name, cmdline, mac) in [("peer", "mode=netpeer ip=10.9.0.2", "52:54:00:5d:00:02"),
                                     ("pinger", "mode=netping ip=10.9.0.1 peer=10.9.0.2 count=100000", "52:54:00:5d:00:01")] {
            XCTAssertEqual(try call("POST", "/v1/vms", """
                {"name": "\(name)", "definition": {"memory_mib": 32, "nics": [{"segment": "\(segment)", "mac": "\(mac)"}],
                 "boot": {"multiboot": "\(guest)", "cmdline": "\(cmdline)"}}}
                """).status, 201)
            XCTAssertEqual(try call("POST", "/v1/vms/\(name)/start").status, 200)
        }
        waitFor("five replies", timeout: 60) { consoleLog("pinger").contains("net: reply seq 5 ") }
        XCTAssertEqual(try call("POST", "/v1/vms/pinger/pause").status, 200)
        XCTAssertEqual(try call("POST", "/v1/vms/peer/pause").status, 200)
        Thread.sleep(forTimeInterval: 0.2)  // the switch forwards what the ports still held
        let text = try call("GET", "/metrics").body
        func counter(_ name: String, _ vm: String) -> Double {
            text.split(separator: "\n").first { $0.hasPrefix("\(name){vm=\"\(vm)\",device=\"net0\"}") }
                .flatMap { Double($0.split(separator: " ").last ?? "") } ?? -1
        }
        XCTAssertGreaterThanOrEqual(counter("hv_nic_sent_frames_total", "pinger"), 5, text)
        XCTAssertGreaterThanOrEqual(counter("hv_nic_received_frames_total", "pinger"), 5, text)
        XCTAssertGreaterThanOrEqual(counter("hv_nic_sent_bytes_total", "pinger"), 5 * 60, text)
        XCTAssertEqual(counter("hv_nic_sent_dropped_total", "pinger"), 0, text)
        // Two members: what one sent, the other received (both paused, so nothing is in flight).
        XCTAssertEqual(counter("hv_nic_sent_frames_total", "pinger"), counter("hv_nic_received_frames_total", "peer"), text)
        XCTAssertEqual(counter("hv_nic_received_bytes_total", "pinger"), counter("hv_nic_sent_bytes_total", "peer"), text)
        let status = try XCTUnwrap(try object(try call("GET", "/v1/vms/pinger").body)["status"] as? [String: Any])
        let traffic = try XCTUnwrap((status["nics"] as? [[String: Any]])?.first?["traffic"] as? [String: Any], "\(status)")
        XCTAssertEqual(Double(traffic["sent_frames"] as? Int ?? -1), counter("hv_nic_sent_frames_total", "pinger"), "\(traffic)")
        for name in ["pinger", "peer"] { XCTAssertEqual(try call("POST", "/v1/vms/\(name)/stop").status, 200) }
    }

    /// Disk conversions and commits as jobs, checked by qemu-img and qemu-io: a qcow2 image
    /// converted to raw compares identical; a conversion cancelled halfway leaves no destination;
    /// an overlay's writes, committed, are in its base; bad requests are refused before any job.
    func testDiskConversionsAndCommitsRunAsJobs() throws {
        try startHVD()
        func path(_ name: String) -> String { dir.appendingPathComponent(name).path }
        func run(_ tool: String, _ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
            let r = try HVIntegrationTests.tool("/usr/bin/" + tool, arguments)
            XCTAssertEqual(r.status, 0, "\(tool) \(arguments): \(r.output)", file: file, line: line)
            return r.output
        }
        let base = path("base.qcow2"), copy = path("copy.raw"), overlay = path("overlay.qcow2")
        _ = try run("qemu-img", ["create", "-q", "-f", "qcow2", base, "64M"])
        _ = try run("qemu-io", ["-c", "write -P 0xab 1M 2M", base])
        let stream = try subscribe()

        let converted = finished(try job(try call("POST", "/v1/disks/convert", #"{"source": "\#(base)", "destination": "\#(copy)", "format": "raw"}"#)))
        XCTAssertEqual(converted["state"] as? String, "succeeded", "\(converted)")
        XCTAssertEqual(converted["vm"] as? String, "")
        XCTAssertEqual(converted["disk"] as? String, copy)
        XCTAssertEqual(converted["bytes_done"] as? Int, 64 << 20, "\(converted)")
        XCTAssertEqual(converted["bytes_total"] as? Int, 64 << 20, "\(converted)")
        XCTAssertEqual(converted["message"] as? String, "converted \(base) to \(copy) (raw)")
        XCTAssertTrue(try run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", base, copy]).contains("Images are identical"))
        let id = try XCTUnwrap(converted["id"] as? String)
        waitFor("the conversion's events") {
            let mine = self.events(stream).filter { $0["job"] as? String == id }
            return mine.contains { $0["type"] as? String == "job-progress" && ($0["message"] as? String)?.hasPrefix("100% of \(copy)") == true }
                && mine.contains { $0["type"] as? String == "job-finished" && $0["reason"] as? String == "succeeded" }
        }

        // Refused before any job.
        let refusals: [(action: String, body: String, status: Int, text: String)] = [
            ("convert", #"{"source": "base.qcow2", "destination": "\#(path("x"))", "format": "raw"}"#, 400, "source 'base.qcow2' must be an absolute path"),
            ("convert", #"{"source": "\#(base)", "destination": "\#(path("x"))", "format": "vmdk"}"#, 400, "format 'vmdk': use raw or qcow2"),
            ("convert", #"{"source": "\#(path("none"))", "destination": "\#(path("x"))", "format": "raw"}"#, 422, "cannot open disk image '\(path("none"))'"),
            ("convert", #"{"source": "\#(base)", "destination": "\#(copy)", "format": "qcow2"}"#, 409, "'\(copy)' exists"),
            ("commit", #"{"overlay": "\#(path("none"))"}"#, 422, "cannot open disk image"),
        ]
        for (action, body, status, text) in refusals {
            let r = try call("POST", "/v1/disks/\(action)", body)
            XCTAssertEqual(r.status, status, "\(body): \(r.body)")
            XCTAssertTrue(r.body.contains(text), "\(body): \(r.body)")
        }

        // Cancelled while it copies: failed as cancelled, and no destination left.
        let big = path("big.raw"), bigCopy = path("big.qcow2")
        XCTAssertTrue(FileManager.default.createFile(atPath: big, contents: nil))
        XCTAssertEqual(truncate(big, 64 << 30), 0)
        let long = try job(try call("POST", "/v1/disks/convert", #"{"source": "\#(big)", "destination": "\#(bigCopy)", "format": "qcow2"}"#))
        waitFor("the long conversion to begin") { ((try? self.object(try self.call("GET", "/v1/jobs/\(long)").body))?["bytes_done"] as? Int ?? 0) > 0 }
        XCTAssertEqual(try call("DELETE", "/v1/jobs/\(long)").status, 200)
        let cancelled = finished(long)
        XCTAssertEqual(cancelled["state"] as? String, "cancelled", "\(cancelled)")
        XCTAssertLessThan(cancelled["bytes_done"] as? Int ?? .max, 64 << 30, "\(cancelled)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: bigCopy), "a cancelled conversion left its destination")

        // An overlay's writes committed into its base, which then reads them.
        _ = try run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay])
        _ = try run("qemu-io", ["-c", "write -P 0xcd 8M 1M", overlay])
        let committed = finished(try job(try call("POST", "/v1/disks/commit", #"{"overlay": "\#(overlay)"}"#)))
        XCTAssertEqual(committed["state"] as? String, "succeeded", "\(committed)")
        XCTAssertEqual(committed["message"] as? String, "committed \(overlay) into \(base)")
        for image in [base, overlay] {
            let read = try run("qemu-io", ["-c", "read -P 0xcd 8M 1M", "-c", "read -P 0xab 1M 2M", image])
            XCTAssertFalse(read.contains("Pattern verification failed"), "\(image): \(read)")
        }
        _ = try run("qemu-img", ["check", "-q", base])
        let late = try call("DELETE", "/v1/jobs/\(try XCTUnwrap(committed["id"] as? String))")
        XCTAssertEqual(late.status, 409, late.body)

        // hvd stopped (SIGTERM) during a conversion, with a client watching its events: it stops at
        // once (the event stream ends), the conversion ends and its copy goes with it.
        let unfinished = try job(try call("POST", "/v1/disks/convert", #"{"source": "\#(big)", "destination": "\#(bigCopy)", "format": "raw"}"#))
        waitFor("the conversion to begin") { ((try? self.object(try self.call("GET", "/v1/jobs/\(unfinished)").body))?["bytes_done"] as? Int ?? 0) > 0 }
        let process = try XCTUnwrap(hvd)
        process.terminateAndWait()
        XCTAssertEqual(process.process.terminationStatus, 0, process.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: bigCopy), "hvd stopped and left an unfinished conversion's destination")
    }

    /// The id of the job a 202 answer carries.
    private func job(_ r: (status: Int, body: String), file: StaticString = #filePath, line: UInt = #line) throws -> String {
        XCTAssertEqual(r.status, 202, r.body, file: file, line: line)
        return try XCTUnwrap(try object(r.body, file: file, line: line)["id"] as? String, file: file, line: line)
    }

    /// Job `id` once it is no longer running (at most 60 s).
    private func finished(_ id: String, file: StaticString = #filePath, line: UInt = #line) -> [String: Any] {
        var last: [String: Any] = [:]
        waitFor("job \(id)", timeout: 60, {
            last = (try? self.object(try self.call("GET", "/v1/jobs/\(id)").body)) ?? [:]
            return (last["state"] as? String) != "running"
        }, file: file, line: line)
        return last
    }

    /// Long operations as jobs: a snapshot and a live migration (to a destination on loopback, in
    /// a run directory of its own, as another host would be) started through the API, followed
    /// through GET /v1/jobs/{id} and the event stream.
    func testSnapshotAndMigrationRunAsJobs() throws {
        try startHVD()
        XCTAssertEqual(try create("mover").status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/mover/start").status, 200)
        let stream = try subscribe()

        let snapshot = dir.appendingPathComponent("snap").path
        let snapshotJob = try job(try call("POST", "/v1/vms/mover/snapshot", #"{"path": "\#(snapshot)"}"#))
        let saved = finished(snapshotJob)
        XCTAssertEqual(saved["state"] as? String, "succeeded", "\(saved)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: snapshot + "/memory"), "no memory file in the snapshot")
        XCTAssertEqual(try object(try call("GET", "/v1/vms/mover").body)["state"] as? String, "running")
        let cancelDone = try call("DELETE", "/v1/jobs/\(snapshotJob)")
        XCTAssertEqual(cancelDone.status, 409, cancelDone.body)

        // Refused before any job starts.
        XCTAssertEqual(try call("POST", "/v1/vms/mover/snapshot", #"{"path": "relative"}"#).status, 400)
        XCTAssertEqual(try call("POST", "/v1/vms/mover/migrate", #"{"to": "udp:1.2.3.4:5"}"#).status, 400)
        // No key and no explicit plaintext; a key file others may read.
        let keyless = try call("POST", "/v1/vms/mover/migrate", #"{"to": "tcp:127.0.0.1:1"}"#)
        XCTAssertEqual(keyless.status, 400, keyless.body)
        XCTAssertTrue(keyless.body.contains("key_file is required"), keyless.body)
        let keyFile = try Harness.migrationKey(in: dir)
        chmod(keyFile, 0o644)
        let readable = try call("POST", "/v1/vms/mover/migrate", #"{"to": "tcp:127.0.0.1:1", "key_file": "\#(keyFile)"}"#)
        XCTAssertEqual(readable.status, 400, readable.body)
        XCTAssertTrue(readable.body.contains("other users may read it"), readable.body)
        chmod(keyFile, 0o600)
        XCTAssertEqual(try call("GET", "/v1/jobs/job-999").status, 404)

        // The destination "host": its own run directory.
        let port = 30_000 + Int(getpid() % 20_000)
        let destinationRun = dir.appendingPathComponent("destination").path
        setenv("HV_RUN_DIR", destinationRun, 1)
        let destination = try VMProcess(["run", "--incoming", "tcp:127.0.0.1:\(port)", "--name", "moved", "--key", keyFile])
        background.append(destination)
        setenv("HV_RUN_DIR", runDir, 1)
        waitFor("the destination to listen") { destination.stderr.contains("waiting for a VM") }
        let migrateJob = try job(try call("POST", "/v1/vms/mover/migrate", #"{"to": "tcp:127.0.0.1:\#(port)", "max_downtime_ms": 500, "key_file": "\#(keyFile)"}"#))
        let moved = finished(migrateJob)
        XCTAssertEqual(moved["state"] as? String, "succeeded", "\(moved)")
        XCTAssertNotNil((moved["migration"] as? [String: Any])?["downtime_ms"], "\(moved)")
        XCTAssertEqual(try object(try call("GET", "/v1/vms/mover").body)["state"] as? String, "stopped")
        // The VM keeps its console setting: on the destination its log is in that run directory.
        let ticksBefore = consoleLog("mover").components(separatedBy: "tick ").count - 1
        waitFor("the guest's ticks on the destination") {
            let log = (try? String(contentsOfFile: destinationRun + "/moved.log", encoding: .utf8)) ?? ""
            return log.contains("tick \(ticksBefore + 2)\n")
        }
        waitFor("job-finished and vm-stopped events") {
            let all = self.events(stream)
            return all.contains { $0["type"] as? String == "job-finished" && $0["job"] as? String == migrateJob && $0["reason"] as? String == "succeeded" }
                && all.contains { $0["type"] as? String == "vm-stopped" && $0["reason"] as? String == "migrated" }
        }
        let jobs = try XCTUnwrap(try object(try call("GET", "/v1/jobs").body)["jobs"] as? [[String: Any]])
        XCTAssertEqual(jobs.compactMap { $0["id"] as? String }, [snapshotJob, migrateJob])
        destination.terminateAndWait()
    }

    /// Restores through the API: a kept VM saved (`stop`) and killed comes back where it was, its
    /// count carrying on; a clone of the same snapshot is kept under its own name, paused, with a
    /// MAC and a disk overlay of its own, and the template's disk is never written; and what
    /// cannot be restored is refused before anything runs, in one line.
    func testSnapshotsAreRestoredAndClonedThroughTheAPI() throws {
        try startHVD()
        let image = dir.appendingPathComponent("template.img").path
        let pattern = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        try pattern.write(to: URL(fileURLWithPath: image))
        let segment = "r\(getpid())"
        XCTAssertEqual(try create("tmpl", extra: #""disks": [{"path": "\#(image)"}], "nics": [{"segment": "\#(segment)", "mac": "52:54:00:5c:00:01"}],"#).status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/tmpl/start").status, 200)
        waitFor("the guest's third tick") { self.consoleLog("tmpl").contains("tick 3\n") }
        let snapshot = dir.appendingPathComponent("tmpl.snap").path
        let saved = finished(try job(try call("POST", "/v1/vms/tmpl/snapshot", #"{"path": "\#(snapshot)", "stop": true}"#)))
        XCTAssertEqual(saved["state"] as? String, "succeeded", "\(saved)")
        // Paused since the copy: the console holds what the guest printed before it.
        let before = consoleLog("tmpl")
        XCTAssertEqual(try call("POST", "/v1/vms/tmpl/kill").status, 200)
        let stream = try subscribe()

        // Refused before anything runs.
        func refused(_ name: String, _ body: String, _ status: Int, _ text: String, file: StaticString = #filePath, line: UInt = #line) throws {
            let r = try call("POST", "/v1/vms/\(name)/restore", body)
            XCTAssertEqual(r.status, status, r.body, file: file, line: line)
            XCTAssertTrue(r.body.contains(text), "\(r.body) does not say \(text)", file: file, line: line)
        }
        try refused("x", #"{"path": "tmpl.snap"}"#, 400, "must be the absolute path of a snapshot's directory")
        try refused("x", #"{"path": "\#(snapshot)", "macs": ["52:54:00:5c:00:09"]}"#, 400, "macs goes with clone: true")
        try refused("x", #"{"path": "\#(snapshot)", "clone": true, "macs": ["01:00:00:00:00:01"]}"#, 400, "macs[0] '01:00:00:00:00:01' is not a unicast MAC")
        try refused("x", #"{"path": "\#(snapshot)", "clone": true, "macs": ["52:54:00:5c:00:08", "52:54:00:5c:00:09"]}"#, 400, "macs names 2 MACs, but the snapshot's VM has 1 NICs")
        try refused("x", #"{"path": "\#(dir.path)/nowhere"}"#, 422, "\(dir.path)/nowhere")
        try refused("x", #"{"path": "\#(dir.path)"}"#, 422, dir.path)
        try refused("tmpl", #"{"path": "\#(snapshot)", "clone": true}"#, 409, "a clone is a new VM")
        XCTAssertEqual(try create("other").status, 201)
        try refused("other", #"{"path": "\#(snapshot)"}"#, 409, "holds VM 'tmpl', not 'other'")
        try refused("tmpl", #"{"path": "\#(snapshot)", "autostart": true}"#, 400, "PATCH /v1/vms/tmpl sets it")
        XCTAssertEqual(try call("GET", "/v1/vms/x").status, 404, "a refused restore left VM 'x' kept")
        XCTAssertEqual(try object(try call("GET", "/v1/vms/other").body)["state"] as? String, "stopped")
        XCTAssertFalse(FileManager.default.fileExists(atPath: snapshot + "/clones/x"), "a refused clone left its overlay")

        // The kept VM itself carries on counting from where it was: not booted again.
        let restored = try call("POST", "/v1/vms/tmpl/restore", #"{"path": "\#(snapshot)"}"#)
        XCTAssertEqual(restored.status, 200, restored.body)
        XCTAssertEqual(try object(restored.body)["state"] as? String, "running", restored.body)
        let atSnapshot = before.split(separator: "\n").compactMap { $0.hasPrefix("tick ") ? Int($0.dropFirst(5)) : nil }.last ?? 0
        waitFor("the restored guest's ticks") { self.consoleLog("tmpl").contains("tick \(atSnapshot + 2)\n") }
        let whole = (before + consoleLog("tmpl")).split(separator: "\n").compactMap { $0.hasPrefix("tick ") ? Int($0.dropFirst(5)) : nil }
        XCTAssertEqual(Array(whole.prefix(atSnapshot + 2)), Array(1...(atSnapshot + 2)), before + "|" + consoleLog("tmpl"))
        XCTAssertFalse(consoleLog("tmpl").contains("mode=ticks"), "the restored guest booted again: \(consoleLog("tmpl"))")
        try refused("tmpl", #"{"path": "\#(snapshot)"}"#, 409, "VM 'tmpl' is running")

        // Not while the template writes its disk: refused, leaving no VM and no overlay behind.
        try refused("copy", #"{"path": "\#(snapshot)", "clone": true}"#, 422, "is locked by a process writing it")
        XCTAssertEqual(try call("GET", "/v1/vms/copy").status, 404, "a failed clone left VM 'copy' kept")
        XCTAssertFalse(FileManager.default.fileExists(atPath: snapshot + "/clones/copy"), "a failed clone left its overlay")
        XCTAssertEqual(try call("POST", "/v1/vms/tmpl/stop").status, 200)

        // A clone: a new kept VM, paused, with its own MAC and an overlay on the template's disk.
        let cloned = try call("POST", "/v1/vms/copy/restore", #"{"path": "\#(snapshot)", "clone": true, "paused": true}"#)
        XCTAssertEqual(cloned.status, 200, cloned.body)
        let copy = try object(cloned.body)
        XCTAssertEqual(copy["state"] as? String, "paused", cloned.body)
        let overlay = "\(snapshot)/clones/copy/disk0.qcow2"
        let kept = try XCTUnwrap(copy["definition"] as? [String: Any])
        XCTAssertEqual((kept["disks"] as? [[String: Any]])?.first?["path"] as? String, overlay, cloned.body)
        let status = try XCTUnwrap(copy["status"] as? [String: Any])
        let mac = try XCTUnwrap((status["nics"] as? [[String: Any]])?.first?["mac"] as? String, cloned.body)
        XCTAssertNotEqual(mac, "52:54:00:5c:00:01")
        XCTAssertEqual((status["disks"] as? [[String: Any]])?.first?["backing"] as? [String], [image], cloned.body)
        XCTAssertEqual(try call("POST", "/v1/vms/copy/resume").status, 200)
        waitFor("the clone's ticks") { self.consoleLog("copy").contains("tick \(atSnapshot + 2)\n") }
        waitFor("vm-created for the clone") {
            self.events(stream).contains { $0["type"] as? String == "vm-created" && $0["vm"] as? String == "copy" }
        }
        XCTAssertEqual(try call("POST", "/v1/vms/copy/stop").status, 200)
        // Kept: it starts again (afresh, from its definition: the overlay on the template's image).
        XCTAssertEqual(try call("POST", "/v1/vms/copy/start").status, 200)
        waitFor("the clone's fresh boot") { self.consoleLog("copy").contains("tick 1\n") }
        XCTAssertEqual(try call("POST", "/v1/vms/copy/stop").status, 200)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: image)), pattern, "the template's disk was written")
    }

    /// A VM arrives through the API: `POST /v1/vms/{name}/incoming` waits (a job), a migration
    /// through the same hvd sends it, and hvd keeps it under the new name, running. A source
    /// with another key fails on its side and is dropped on this one, which waits on until the
    /// job is cancelled: no process, port or name is left.
    func testAVMArrivesThroughTheAPI() throws {
        try startHVD()
        XCTAssertEqual(try create("traveller").status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/traveller/start").status, 200)
        let key = try Harness.migrationKey(in: dir)
        let otherKey = try Harness.migrationKey(in: dir, name: "other.key")
        let base = 30_010 + Int(getpid() % 20_000)

        // Refused before anything listens.
        XCTAssertEqual(try call("POST", "/v1/vms/x/incoming", #"{"address": "tcp:127.0.0.1:\#(base)"}"#).status, 400)
        XCTAssertEqual(try call("POST", "/v1/vms/x/incoming", #"{"address": "udp:1:2", "insecure_plaintext": true}"#).status, 400)
        XCTAssertEqual(try call("POST", "/v1/vms/traveller/incoming", #"{"address": "tcp:127.0.0.1:\#(base)", "key_file": "\#(key)"}"#).status, 409)

        // Another key at the destination: the migration fails with the source's reason, the VM
        // runs on, and the destination logs the refused connection and goes on waiting until
        // its job is cancelled (the listener goes, the name stays free).
        let wrongWait = try job(try call("POST", "/v1/vms/stranger/incoming", #"{"address": "tcp:127.0.0.1:\#(base)", "key_file": "\#(otherKey)"}"#))
        let wrongSend = try job(try call("POST", "/v1/vms/traveller/migrate", #"{"to": "tcp:127.0.0.1:\#(base)", "key_file": "\#(key)"}"#))
        let sendFailed = finished(wrongSend)
        XCTAssertEqual(sendFailed["error"] as? String, "the destination holds a different migration key: give both hosts the same --key FILE", "\(sendFailed)")
        XCTAssertEqual(try object(try call("GET", "/v1/vms/traveller").body)["state"] as? String, "running")
        waitFor("the destination to log the refused connection") {
            let log = (try? String(contentsOfFile: self.runDir + "/stranger.core.log", encoding: .utf8)) ?? ""
            return log.contains("the source holds a different migration key") && log.contains("still waiting on tcp:127.0.0.1:\(base)")
        }
        XCTAssertEqual(try object(try call("GET", "/v1/jobs/\(wrongWait)").body)["state"] as? String, "running")
        XCTAssertEqual(try call("DELETE", "/v1/jobs/\(wrongWait)").status, 200)
        XCTAssertEqual(finished(wrongWait)["state"] as? String, "cancelled")
        XCTAssertEqual(try call("GET", "/v1/vms/stranger").status, 404)
        // SO_REUSEADDR: the refused connection's TIME_WAIT may stay; a listener may not.
        let listener = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        var on: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(base).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        XCTAssertEqual(bound, 0, "the cancelled wait still holds its port")

        // The same key: the VM moves, and hvd keeps it under its new name.
        let wait = try job(try call("POST", "/v1/vms/arrived/incoming", #"{"address": "tcp:127.0.0.1:\#(base + 1)", "key_file": "\#(key)", "autostart": true}"#))
        let send = try job(try call("POST", "/v1/vms/traveller/migrate", #"{"to": "tcp:127.0.0.1:\#(base + 1)", "key_file": "\#(key)"}"#))
        let sent = finished(send)
        XCTAssertEqual(sent["state"] as? String, "succeeded", "\(sent)")
        let arrivedJob = finished(wait)
        XCTAssertEqual(arrivedJob["state"] as? String, "succeeded", "\(arrivedJob)")
        XCTAssertEqual(arrivedJob["message"] as? String, "arrived arrived and runs here")
        let arrived = try object(try call("GET", "/v1/vms/arrived").body)
        XCTAssertEqual(arrived["state"] as? String, "running", "\(arrived)")
        XCTAssertEqual(arrived["autostart"] as? Bool, true)
        XCTAssertEqual((arrived["definition"] as? [String: Any])?["memory_mib"] as? Int, 32, "\(arrived)")
        XCTAssertEqual(try object(try call("GET", "/v1/vms/traveller").body)["state"] as? String, "stopped")
        let ticksBefore = consoleLog("traveller").components(separatedBy: "tick ").count - 1
        waitFor("the guest's ticks under its new name") { self.consoleLog("arrived").contains("tick \(ticksBefore + 2)\n") }
        XCTAssertEqual(try call("POST", "/v1/vms/arrived/stop").status, 200)
    }

    /// hvctl uses hvd when it runs: `hvctl start` starts a kept VM, and stop/pause/resume, device
    /// and CD actions and snapshots (hvd's job, followed to its end) of a kept VM go through hvd
    /// (its audit log and events tell them); a VM hvd does not keep, and every VM when no hvd
    /// runs, is driven directly as before.
    func testHvctlGoesThroughHVDWhenItRuns() throws {
        try startHVD()
        XCTAssertEqual(try create("cli").status, 201)
        let stream = try subscribe()
        let started = try runHvctl(["start", "cli"])
        XCTAssertEqual(started.status, 0, started.stderr)
        XCTAssertEqual(started.stdout, "started cli\n")
        // A device the VM does not have is not found (404), naming the ones it has.
        let missing = try call("POST", "/v1/vms/cli/devices/disk7/restart")
        XCTAssertEqual(missing.status, 404, missing.body)
        XCTAssertTrue(missing.body.contains("VM 'cli' has no device 'disk7' (its devices: serial0, bios"), missing.body)
        for command in [["pause", "cli"], ["resume", "cli"], ["device", "cli", "restart", "serial0"], ["set", "cli", "--pids-limit", "512"]] {
            let r = try runHvctl(command)
            XCTAssertEqual(r.status, 0, "\(command): \(r.stderr)")
        }
        // A snapshot is hvd's job, followed to its end; a failed one ends hvctl with its reason.
        let snapshot = dir.appendingPathComponent("cli.snap").path
        let saved = try runHvctl(["snapshot", "cli", snapshot])
        XCTAssertEqual(saved.status, 0, saved.stderr)
        XCTAssertTrue(saved.stdout.hasPrefix("saved cli to \(snapshot): "), saved.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: snapshot + "/state"))
        let again = try runHvctl(["snapshot", "cli", snapshot])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.hasPrefix("hvctl: ") && again.stderr.contains(snapshot) && again.stderr.filter { $0 == "\n" }.count == 1, again.stderr)
        XCTAssertEqual(try runHvctl(["stop", "cli"]).status, 0)
        let audit = try String(contentsOfFile: stateDir + "/audit.log", encoding: .utf8)
        XCTAssertTrue(audit.contains("\"path\":\"/v1/vms/cli/limits\""), "hvctl set is not in hvd's audit log: \(audit)")
        for action in ["start", "pause", "resume", "devices/serial0/restart", "snapshot", "stop"] {
            XCTAssertTrue(audit.contains("\"path\":\"/v1/vms/cli/\(action)\""), "hvctl \(action) is not in hvd's audit log: \(audit)")
        }
        waitFor("vm-stopped with reason requested") {
            self.events(stream).contains { $0["type"] as? String == "vm-stopped" && $0["vm"] as? String == "cli" && $0["reason"] as? String == "requested" }
        }
        let nobody = try runHvctl(["start", "nobody"])
        XCTAssertEqual(nobody.status, 1)
        XCTAssertEqual(nobody.stderr, "hvctl: no VM named 'nobody' (see GET /v1/vms)\n")

        // A VM hvd does not keep is hvctl's alone, as before.
        let guest = try Harness.testGuest()
        let own = try runHvctl(["run", "--multiboot", guest, "--cmdline", "mode=ticks count=100000 delay=50", "--memory", "32M", "--detach", "--name", "own"])
        XCTAssertEqual(own.status, 0, own.stderr)
        XCTAssertEqual(try runHvctl(["pause", "own"]).status, 0)
        XCTAssertEqual(try runHvctl(["stop", "own"]).status, 0)
        XCTAssertFalse(try String(contentsOfFile: stateDir + "/audit.log", encoding: .utf8).contains("/v1/vms/own"))

        // Without hvd: start says what it needs; the rest works directly.
        hvd?.terminateAndWait()
        let alone = try runHvctl(["start", "cli"])
        XCTAssertEqual(alone.status, 1)
        XCTAssertTrue(alone.stderr.contains("'hvctl start' needs hvd"), alone.stderr)
    }

    /// `hvctl migrate` of a VM hvd keeps is hvd's job: hvctl follows it (progress as JSON lines,
    /// then the result), `hvctl migrate --cancel` cancels it through hvd (the first hvctl ends
    /// with the reason, the VM carries on), and both are in hvd's audit log.
    func testHvctlMigrateGoesThroughHVD() throws {
        try startHVD()
        XCTAssertEqual(try create("walker").status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/walker/start").status, 200)
        let key = try Harness.migrationKey(in: dir)
        let port = 30_020 + Int(getpid() % 20_000)
        let destinationRun = dir.appendingPathComponent("destination").path
        setenv("HV_RUN_DIR", destinationRun, 1)
        let destination = try VMProcess(["run", "--incoming", "tcp:127.0.0.1:\(port)", "--name", "walked", "--key", key])
        background.append(destination)
        setenv("HV_RUN_DIR", runDir, 1)
        waitFor("the destination to listen") { destination.stderr.contains("waiting for a VM") }

        // At 4 KiB/s it would take hours: cancelled through hvd, the VM carries on here.
        let slow = try VMProcess(["migrate", "walker", "--to", "tcp:127.0.0.1:\(port)", "--key", key, "--bandwidth", "4096", "--json"])
        background.append(slow)
        waitFor("hvd's migration job") { (try? self.call("GET", "/v1/jobs").body.contains("\"running\"")) == true }
        let cancel = try runHvctl(["migrate", "walker", "--cancel"])
        XCTAssertEqual(cancel.status, 0, cancel.stderr)
        XCTAssertTrue(cancel.stdout.contains("hvd's job"), cancel.stdout)
        waitFor("the cancelled hvctl migrate to end") { !slow.process.isRunning }
        XCTAssertEqual(slow.process.terminationStatus, 1, slow.stderr)
        XCTAssertTrue(slow.stderr.hasPrefix("hvctl: ") && slow.stderr.contains("cancel"), slow.stderr)
        XCTAssertEqual(try object(try call("GET", "/v1/vms/walker").body)["state"] as? String, "running")
        // The destination gave up with it; another one waits.
        XCTAssertNotEqual(destination.waitForExit(timeout: 30), 0)
        setenv("HV_RUN_DIR", destinationRun, 1)
        let second = try VMProcess(["run", "--incoming", "tcp:127.0.0.1:\(port + 1)", "--name", "walked", "--key", key])
        background.append(second)
        setenv("HV_RUN_DIR", runDir, 1)
        waitFor("the second destination to listen") { second.stderr.contains("waiting for a VM") }

        // Then for real: progress lines and the result as JSON, the VM gone from here.
        let moved = try runHvctl(["migrate", "walker", "--to", "tcp:127.0.0.1:\(port + 1)", "--key", key, "--json"], timeout: 120)
        XCTAssertEqual(moved.status, 0, moved.stderr)
        let last = try XCTUnwrap(moved.stdout.split(separator: "\n").last.map(String.init))
        let result = try object(last)
        XCTAssertEqual(result["destination"] as? String, "tcp:127.0.0.1:\(port + 1)", last)
        XCTAssertNotNil(result["downtime_ms"], last)
        XCTAssertEqual(try object(try call("GET", "/v1/vms/walker").body)["state"] as? String, "stopped")
        let jobs = try XCTUnwrap(try object(try call("GET", "/v1/jobs").body)["jobs"] as? [[String: Any]])
        XCTAssertEqual(jobs.compactMap { $0["state"] as? String }, ["cancelled", "succeeded"], "\(jobs)")
        XCTAssertTrue((jobs.last?["message"] as? String)?.hasPrefix("migrated walker to tcp:127.0.0.1:\(port + 1) in ") == true, "\(jobs)")
        let audit = try String(contentsOfFile: stateDir + "/audit.log", encoding: .utf8)
        XCTAssertEqual(audit.components(separatedBy: "\"path\":\"/v1/vms/walker/migrate\"").count - 1, 2, audit)
        XCTAssertTrue(audit.contains("\"method\":\"DELETE\",\"path\":\"/v1/jobs/"), audit)
        second.terminateAndWait()
    }

    /// schemathesis (PyPI) generates requests from api/hvd.yaml, valid and not, and checks every
    /// answer against the document: no 5xx, the documented statuses, bodies and content types,
    /// 405 for methods a path does not take. It also reuses names it reads from responses, so the
    /// VM running beside it gets paused, killed and deleted by valid requests: afterwards hvd's
    /// account of what runs must match the host's, and hvd must still start and run a VM.
    /// (Starting VMs is left out: the fuzzer would start hundreds; so are snapshots, migrations
    /// and disk jobs, which would write to and connect to whatever the fuzzer made up. Restores,
    /// which only read, are fuzzed in a run of their own that accepts a made-up snapshot's 422.)
    func testAPIFuzzedAgainstItsOpenAPIDocument() throws {
        let schemathesis = Harness.repositoryRoot.appendingPathComponent(".build/pyenv/bin/schemathesis").path
        guard FileManager.default.isExecutableFile(atPath: schemathesis), FileManager.default.isExecutableFile(atPath: "/usr/bin/socat") else {
            throw Harness.MissingBuild(description: "schemathesis (in .build/pyenv) or socat is missing: test.sh installs them")
        }
        try startHVD()
        XCTAssertEqual(try create("victim").status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/victim/start").status, 200)
        // schemathesis speaks TCP: socat carries loopback connections to hvd's socket.
        let port = 20_000 + Int(getpid() % 20_000)
        let proxy = try VMProcess(["TCP-LISTEN:\(port),bind=127.0.0.1,fork,reuseaddr", "UNIX-CONNECT:\(socket)"], executable: "/usr/bin/socat")
        background.append(proxy)
        Thread.sleep(forTimeInterval: 0.3)
        let run = try tool(schemathesis, ["run", Harness.repositoryRoot.appendingPathComponent("api/hvd.yaml").path,
                                          "--url", "http://127.0.0.1:\(port)", "--max-examples", "25", "--seed", "1",
                                          "--exclude-operation-id", "startVM", "--exclude-operation-id", "streamEvents",
                                          // These write snapshots and images where they are told, connect or listen
                                          // where they are told: not for generated paths and addresses (testSnapshotAnd-
                                          // MigrationRunAsJobs, testAVMArrivesThroughTheAPI, testDiskConversionsAnd-
                                          // CommitsRunAsJobs drive them).
                                          "--exclude-operation-id", "snapshotVM", "--exclude-operation-id", "migrateVM",
                                          "--exclude-operation-id", "receiveVM", "--exclude-operation-id", "restoreVM",
                                          "--exclude-operation-id", "convertDisk", "--exclude-operation-id", "commitDisk",
                                          "--generation-database", "none", "--no-color", "--request-timeout", "40"])
        XCTAssertEqual(run.status, 0, String(run.output.suffix(6000)))
        XCTAssertTrue(run.output.contains(" passed"), String(run.output.suffix(2000)))
        // Restores read the directory they are told, which the fuzzer makes up: a valid request
        // naming no snapshot is refused (422), which is not a failure here; any other surprise is.
        let restores = try tool(schemathesis, ["run", Harness.repositoryRoot.appendingPathComponent("api/hvd.yaml").path,
                                               "--url", "http://127.0.0.1:\(port)", "--max-examples", "25", "--seed", "1",
                                               "--include-operation-id", "restoreVM", "--exclude-checks", "positive_data_acceptance",
                                               "--generation-database", "none", "--no-color", "--request-timeout", "40"])
        XCTAssertEqual(restores.status, 0, String(restores.output.suffix(6000)))
        XCTAssertTrue(restores.output.contains(" passed"), String(restores.output.suffix(2000)))
        XCTAssertTrue(try XCTUnwrap(hvd).process.isRunning, "hvd died")
        // What hvd says runs is what runs: every VM with a live core has a kept definition that hvd
        // reports running or paused, and nothing hvd reports running is gone.
        let kept = try XCTUnwrap(try object(try call("GET", "/v1/vms").body)["vms"] as? [[String: Any]])
        let live = Set(kept.filter { ($0["state"] as? String) != "stopped" }.compactMap { $0["name"] as? String })
        let listed = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(try runHvctl(["ls", "--json"]).stdout.utf8)) as? [[String: Any]])
        XCTAssertEqual(Set(listed.compactMap { $0["name"] as? String }), live, "hvd's view and the host's differ")
        // And hvd still does its job.
        XCTAssertEqual(try create("after").status, 201)
        XCTAssertEqual(try call("POST", "/v1/vms/after/start").status, 200)
        waitFor("the new VM's ticks") { consoleLog("after").components(separatedBy: "tick ").count > 3 }
        XCTAssertTrue(try XCTUnwrap(hvd).process.isRunning, "hvd died")
    }
}

import Foundation
import XCTest

/// `hvctl run --detach`, `hvctl console NAME` through a real pseudo-terminal, `hvctl logs NAME`.
final class ConsoleAttachTests: XCTestCase {
    private var dir: URL!

    override func setUpWithError() throws {
        try Harness.requireKVM()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-con-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", dir.path, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(at: dir)
    }

    /// `hvctl console NAME` on a pseudo-terminal: what it prints, and what is typed at it.
    private final class Attached {
        let process = Process()
        let master: Int32
        private(set) var output = ""

        init(_ name: String) throws {
            // posix_openpt by hand (the Glibc module lacks it): /dev/ptmx, unlock (TIOCSPTLCK), number (TIOCGPTN).
            master = open("/dev/ptmx", O_RDWR | O_NOCTTY)
            var unlock: Int32 = 0, number: UInt32 = 0
            guard master >= 0, ioctl(master, 0x4004_5431, &unlock) == 0, ioctl(master, 0x8004_5430, &number) == 0,
                  let slave = FileHandle(forUpdatingAtPath: "/dev/pts/\(number)") else {
                throw Harness.MissingBuild(description: "no pseudo-terminal: \(String(cString: strerror(errno)))")
            }
            process.executableURL = URL(fileURLWithPath: Harness.hvctl)
            process.arguments = ["console", name]
            process.standardInput = slave
            process.standardOutput = slave
            process.standardError = slave
            try process.run()
            try slave.close()
            _ = fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK)
        }

        /// Reads until `text` has appeared; false after `timeout`.
        func wait(for text: String, timeout: TimeInterval = 10) -> Bool {
            let deadline = Date().addingTimeInterval(timeout)
            var buffer = [UInt8](repeating: 0, count: 4096)
            while !output.contains(text) && Date() < deadline {
                let n = read(master, &buffer, buffer.count)
                if n > 0 { output += String(decoding: buffer.prefix(n), as: UTF8.self) } else { usleep(10_000) }
            }
            return output.contains(text)
        }

        func type(_ text: String) {
            _ = Array(text.utf8).withUnsafeBytes { write(master, $0.baseAddress, $0.count) }
        }

        func waitForExit(timeout: TimeInterval = 15) -> Int32? {
            let deadline = Date().addingTimeInterval(timeout)
            while process.isRunning && Date() < deadline {
                _ = wait(for: "\u{0}", timeout: 0.05)  // keep draining the terminal
            }
            if process.isRunning {
                process.terminate()
                return nil
            }
            close(master)
            return process.terminationStatus
        }
    }

    func testDetachAttachTypeDetachReattachAndStop() throws {
        let guest = try Harness.testGuest()
        let started = try runHvctl(["run", "--detach", "--multiboot", guest, "--cmdline", "mode=echo", "--memory", "32M", "--name", "con"])
        XCTAssertEqual(started.status, 0, started.stderr)
        XCTAssertTrue(started.stdout.contains("started VM con"), started.stdout)
        // It runs on without its parent: listed, and its console logged.
        XCTAssertTrue(try runHvctl(["ls"]).stdout.contains("con "))
        var logged = ""
        for _ in 0..<100 where !logged.contains("echo: ready") {
            logged = try runHvctl(["logs", "con"]).stdout
            usleep(100_000)
        }
        XCTAssertTrue(logged.contains("echo: ready"), logged)

        let first = try Attached("con")
        XCTAssertTrue(first.wait(for: "attached to the console of con"), first.output)
        // One client at a time.
        let second = try runHvctl(["console", "con"])
        XCTAssertEqual(second.status, 1)
        XCTAssertTrue(second.stderr.contains("is attached in another 'hvctl console'"), second.stderr)
        first.type("abc")
        XCTAssertTrue(first.wait(for: "ABC"), first.output)
        first.type("\u{1}d")
        XCTAssertEqual(first.waitForExit(), 0, first.output)
        XCTAssertTrue(first.output.contains("detached from con"), first.output)
        XCTAssertTrue(try runHvctl(["ls"]).stdout.contains("con "), "detaching keeps the VM running")

        let again = try Attached("con")
        XCTAssertTrue(again.wait(for: "attached to the console of con"), again.output)
        again.type("xyz")
        XCTAssertTrue(again.wait(for: "XYZ"), again.output)
        again.type("\u{1}x")
        XCTAssertEqual(again.waitForExit(), 0, again.output)
        XCTAssertTrue(again.output.contains("stopped con"), again.output)

        // Gone, leaving only its logs behind.
        XCTAssertEqual(try runHvctl(["ls", "--json"]).stdout.filter { !$0.isWhitespace }, "[]")
        let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        XCTAssertEqual(left, ["con.core.log", "con.log"])
        let log = try runHvctl(["logs", "con"])
        XCTAssertEqual(log.status, 0)
        XCTAssertTrue(log.stdout.contains("echo: ready") && log.stdout.contains("ABCXYZ"), log.stdout)
        let core = try String(contentsOf: dir.appendingPathComponent("con.core.log"), encoding: .utf8)
        XCTAssertTrue(core.contains("stopped by 'hvctl stop con'"), core)
    }

    func testFollowingLogsEndsWithTheVMAndMistakesGetOneLine() throws {
        let guest = try Harness.testGuest()
        XCTAssertEqual(try runHvctl(["run", "--detach", "--multiboot", guest, "--cmdline", "mode=ticks count=20 delay=20", "--name", "tk"]).status, 0)
        let followed = try runHvctl(["logs", "tk", "-f"], timeout: 60)
        XCTAssertEqual(followed.status, 0, followed.stderr)
        XCTAssertTrue(followed.stdout.contains("tick 20\nhv-testguest: done"), followed.stdout)

        // A detached start that fails says why, exits 1 and leaves no VM behind.
        let bad = try runHvctl(["run", "--detach", "--multiboot", "/nonexistent/kernel.elf", "--name", "bad"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertEqual(bad.stderr.split(separator: "\n").count, 1, bad.stderr)
        XCTAssertTrue(bad.stderr.contains("cannot open guest image '/nonexistent/kernel.elf'"), bad.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("bad.sock").path))
        XCTAssertEqual(try runHvctl(["run", "--detach", "--serial", "stdio"]).status, 2)

        // A VM on a terminal has no console to attach to, and no log.
        let fg = try VMProcess(["run", "--multiboot", guest, "--cmdline", "mode=idle", "--name", "fg"])
        defer { fg.terminateAndWait() }
        XCTAssertTrue(fg.waitForOutput("idle: ready"), fg.stderr)
        let attach = try runHvctl(["console", "fg"])
        XCTAssertEqual(attach.status, 1)
        XCTAssertTrue(attach.stderr.contains("has no console to attach to"), attach.stderr)
        let logs = try runHvctl(["logs", "fg"])
        XCTAssertEqual(logs.status, 1)
        XCTAssertTrue(logs.stderr.contains("does not log its console"), logs.stderr)
        XCTAssertEqual(try runHvctl(["console", "nosuch"]).status, 1)
        XCTAssertEqual(try runHvctl(["logs", "nosuch"]).status, 1)
        XCTAssertEqual(try runHvctl(["stop", "fg"]).status, 0)
    }
}

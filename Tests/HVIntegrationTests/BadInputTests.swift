import Foundation
import XCTest

/// Every operator mistake gets one clear line and a distinct exit status; never a trap or a hang.
final class BadInputTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireKVM() }

    private func assertOneLineError(_ arguments: [String], status: Int32, mentions: String,
                                    file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try runHvctl(arguments, timeout: 30, file: file, line: line)
        XCTAssertEqual(r.status, status, "status for \(arguments): stderr \(r.stderr)", file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "expected exactly one line, got: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("hvctl: "), r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.contains(mentions), "expected '\(mentions)' in: \(r.stderr)", file: file, line: line)
        XCTAssertFalse(r.stderr.contains("Fatal error"), r.stderr, file: file, line: line)
    }

    func testMissingImage() throws {
        try assertOneLineError(["run", "--multiboot", "/nonexistent/kernel.elf"], status: 1,
                               mentions: "cannot open guest image '/nonexistent/kernel.elf': No such file or directory")
    }

    func testImageThatIsNotMultiboot() throws {
        let junk = FileManager.default.temporaryDirectory.appendingPathComponent("hv-junk-\(getpid()).bin")
        try Data((0..<20000).map { UInt8(truncatingIfNeeded: $0 &* 7) }).write(to: junk)
        defer { try? FileManager.default.removeItem(at: junk) }
        try assertOneLineError(["run", "--multiboot", junk.path], status: 1, mentions: "multiboot")
    }

    func testTruncatedImage() throws {
        let guest = try Data(contentsOf: URL(fileURLWithPath: try Harness.testGuest()))
        let cut = FileManager.default.temporaryDirectory.appendingPathComponent("hv-cut-\(getpid()).elf")
        try guest.prefix(5000).write(to: cut)
        defer { try? FileManager.default.removeItem(at: cut) }
        try assertOneLineError(["run", "--multiboot", cut.path], status: 1, mentions: "bios")
    }

    func testEmptyImage() throws {
        let empty = FileManager.default.temporaryDirectory.appendingPathComponent("hv-empty-\(getpid()).elf")
        try Data().write(to: empty)
        defer { try? FileManager.default.removeItem(at: empty) }
        try assertOneLineError(["run", "--multiboot", empty.path], status: 1, mentions: "is empty")
    }

    func testUnknownFlag() throws {
        try assertOneLineError(["run", "--frobnicate"], status: 2, mentions: "unknown option '--frobnicate'")
    }

    func testUnknownCommand() throws {
        try assertOneLineError(["launch"], status: 2, mentions: "unknown command 'launch'")
    }

    func testMalformedMemorySize() throws {
        try assertOneLineError(["run", "--memory", "12X"], status: 2, mentions: "invalid --memory '12X'")
    }

    func testMemoryThatDoesNotFit() throws {
        try assertOneLineError(["run", "--memory", "64T"], status: 2, mentions: "does not fit")
    }

    func testMemoryTooSmall() throws {
        try assertOneLineError(["run", "--memory", "1M"], status: 2, mentions: "too small")
    }

    func testZeroCPUs() throws {
        try assertOneLineError(["run", "--cpus", "0"], status: 2, mentions: "invalid --cpus '0'")
    }

    func testTooManyCPUs() throws {
        try assertOneLineError(["run", "--cpus", "999"], status: 2, mentions: "invalid --cpus '999': use a whole number from 1 to 254")
    }

    func testMissingFlagValue() throws {
        try assertOneLineError(["run", "--multiboot"], status: 2, mentions: "missing value for '--multiboot <file>'")
    }

    func testBadSerialMode() throws {
        try assertOneLineError(["run", "--serial", "tcp:1234"], status: 2, mentions: "invalid --serial 'tcp:1234'")
    }

    func testUnwritableSerialFile() throws {
        try assertOneLineError(["run", "--serial", "file:/nonexistent/dir/out.txt"], status: 1, mentions: "serial")
    }
}

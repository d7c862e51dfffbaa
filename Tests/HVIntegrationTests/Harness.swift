import Foundation
import XCTest

/// Paths and helpers shared by the KVM integration tests: they run the real `hvctl` and device
/// executables built by `swift build`, with hv's own test guest built by gcc at test time.
enum Harness {
    static let repositoryRoot: URL = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }  // Tests/HVIntegrationTests/Harness.swift
        return url
    }()

    /// The directory holding this test binary, where SwiftPM also puts hvctl and the devices.
    static let productsDirectory: URL = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var url = URL(fileURLWithPath: exe).deletingLastPathComponent()
        // On Linux the XCTest bundle is `<products>/hvPackageTests.xctest`, a plain executable.
        if url.lastPathComponent.hasSuffix(".xctest") { url.deleteLastPathComponent() }
        return url
    }()

    static var hvctl: String { productsDirectory.appendingPathComponent("hvctl").path }

    struct MissingBuild: Error, CustomStringConvertible {
        let description: String
    }

    static func requireKVM() throws {
        guard FileManager.default.isReadableFile(atPath: "/dev/kvm") && FileManager.default.isWritableFile(atPath: "/dev/kvm") else {
            throw XCTSkip("/dev/kvm is not usable here (needs KVM and permission)")
        }
        guard FileManager.default.isExecutableFile(atPath: hvctl) else {
            throw MissingBuild(description: "hvctl not built at \(hvctl): run 'swift build' before 'swift test' (test.sh does)")
        }
    }

    /// A migration key file in `directory` (32 random bytes, mode 600), as an operator makes one
    /// for both hosts of a migration; its path.
    static func migrationKey(in directory: URL, name: String = "migration.key") throws -> String {
        let path = directory.appendingPathComponent(name).path
        var bytes = [UInt8](repeating: 0, count: 32)
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255) }
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes), attributes: [.posixPermissions: 0o600]) else {
            throw MissingBuild(description: "cannot write \(path)")
        }
        return path
    }

    private static let guestLock = NSLock()
    nonisolated(unsafe) private static var guestPath: String?

    /// Builds Tests/Guests once per test run, into the build directory (so nothing is left in /tmp).
    static func testGuest() throws -> String {
        guestLock.lock()
        defer { guestLock.unlock() }
        if let guestPath { return guestPath }
        let out = productsDirectory.appendingPathComponent("hv-testguest")
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        let build = Process()
        build.executableURL = URL(fileURLWithPath: "/bin/bash")
        build.arguments = [repositoryRoot.appendingPathComponent("Tests/Guests/build.sh").path, out.path]
        try build.run()
        build.waitUntilExit()
        guard build.terminationStatus == 0 else {
            throw NSError(domain: "hv", code: 1, userInfo: [NSLocalizedDescriptionKey: "Tests/Guests/build.sh failed (is gcc installed?)"])
        }
        let path = out.appendingPathComponent("testguest.elf").path
        guestPath = path
        return path
    }

    /// The 64-bit Linux boot-protocol probe (a bzImage-format file), built with the test guest.
    static func bootProbe() throws -> String {
        let guest = try testGuest()
        return URL(fileURLWithPath: guest).deletingLastPathComponent().appendingPathComponent("bootparams-probe.bzImage").path
    }
}

/// One running `hvctl` with captured stdout/stderr and a writable stdin.
final class VMProcess: @unchecked Sendable {
    let process = Process()
    private let stdoutPipe = Pipe()
    private let stderrPipe = Pipe()
    let stdinPipe = Pipe()
    private let lock = NSLock()
    private var stdoutData = Data()
    private var stderrData = Data()
    /// Pipes whose end of file the handlers have seen (0, 1 or 2).
    private var pipesAtEnd = 0

    init(_ arguments: [String], executable: String = Harness.hvctl) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = stdoutPipe
        process.standardError = stderrPipe
        process.standardInput = stdinPipe
        stdoutPipe.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            if d.isEmpty { h.readabilityHandler = nil }
            self?.lock.withLock {
                self?.stdoutData.append(d)
                if d.isEmpty { self?.pipesAtEnd += 1 }
            }
        }
        stderrPipe.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            if d.isEmpty { h.readabilityHandler = nil }
            self?.lock.withLock {
                self?.stderrData.append(d)
                if d.isEmpty { self?.pipesAtEnd += 1 }
            }
        }
        try process.run()
    }

    var stdout: String { lock.withLock { String(decoding: stdoutData, as: UTF8.self) } }
    var stderr: String { lock.withLock { String(decoding: stderrData, as: UTF8.self) } }

    /// Waits until stdout contains `text`; false on timeout or exit without it.
    func waitForOutput(_ text: String, timeout: TimeInterval = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if stdout.contains(text) { return true }
            if !process.isRunning {
                Thread.sleep(forTimeInterval: 0.05)
                return stdout.contains(text)
            }
            Thread.sleep(forTimeInterval: 0.01)
        }
        return false
    }

    /// Waits for exit and returns the status; kills the VM and fails after `timeout`.
    @discardableResult
    func waitForExit(timeout: TimeInterval = 60, file: StaticString = #filePath, line: UInt = #line) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        if process.isRunning {
            process.interrupt()
            kill(process.processIdentifier, SIGKILL)
            XCTFail("hvctl did not exit within \(timeout) s; stdout: \(stdout.suffix(500)) stderr: \(stderr)", file: file, line: line)
            process.waitUntilExit()
        }
        // Let the readability handlers drain the pipes to their end of file: a fixed 50 ms pause
        // lost output under CI's load. A VM `--detach` started keeps its stderr (it reports
        // there), so the wait is bounded: 1 s.
        let drained = Date().addingTimeInterval(1)
        while lock.withLock({ pipesAtEnd }) < 2 && Date() < drained { Thread.sleep(forTimeInterval: 0.005) }
        return process.terminationStatus
    }

    /// Stops hvctl with SIGTERM (its clean stop) and waits for it, at most 10 s, so nothing it
    /// removes or leaves on its way out races the test's own clean-up. Harmless if it has exited.
    func terminateAndWait() {
        guard process.isRunning else { return }
        process.terminate()
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    /// Types `text` into hvctl's stdin; a VM that has already exited is the test's failure to
    /// report, never a SIGPIPE that kills the whole test run.
    func write(_ text: String) {
        signal(SIGPIPE, SIG_IGN)
        try? stdinPipe.fileHandleForWriting.write(contentsOf: Data(text.utf8))
    }

    /// Child pids of hvctl whose command line contains `name`.
    func children(named name: String) -> [pid_t] {
        let pid = process.processIdentifier
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        var result: [pid_t] = []
        for task in tasks {
            guard let list = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/children", encoding: .utf8) else { continue }
            for child in list.split(separator: " ").compactMap({ pid_t($0) }) {
                let cmdline = (try? String(contentsOfFile: "/proc/\(child)/cmdline", encoding: .utf8)) ?? ""
                if cmdline.contains(name) { result.append(child) }
            }
        }
        return result
    }
}

/// Runs hvctl (or `executable`) to completion and returns (status, stdout, stderr).
func runHvctl(_ arguments: [String], stdin: String? = nil, timeout: TimeInterval = 60, executable: String = Harness.hvctl,
              file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, stdout: String, stderr: String) {
    let vm = try VMProcess(arguments, executable: executable)
    if let stdin { vm.write(stdin) }
    try? vm.stdinPipe.fileHandleForWriting.close()
    let status = vm.waitForExit(timeout: timeout, file: file, line: line)
    return (status, vm.stdout, vm.stderr)
}

/// Runs a third-party tool (qemu-img, qemu-io, …) to its end: its exit status and its stdout and
/// stderr together.
/// A Swift toolchain program (`swift`, `swiftc`, `swift-symbolgraph-extract`) from PATH. The
/// toolchain that builds these tests has them all, so a missing one is an error, not a skip.
func toolchainExecutable(_ name: String) throws -> String {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"
    guard let found = path.split(separator: ":").map({ "\($0)/\(name)" }).first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw NSError(domain: "hv", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(name) is not on PATH; it ships with the Swift toolchain that built these tests"])
    }
    return found
}

func tool(_ path: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = arguments
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

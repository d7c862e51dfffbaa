@testable import HVHost
import Foundation
import HVSys
import Synchronization
import XCTest

/// `vmPresence`: how hvctl, hvd and the console tell a running VM from one that died. Its race
/// (found while fuzzing hvd's API, issue 20): a probe of a VM that is not running holds the VM's
/// lock for a few system calls, and a second probe at that instant took it for a VM between
/// taking its lock and writing its pid, so it reported a live VM that never answered.
final class VMPresenceTests: XCTestCase {
    private var dir = ""

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-presence-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        setenv("HV_RUN_DIR", dir, 1)
    }

    override func tearDown() {
        unsetenv("HV_RUN_DIR")
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// Probes from four threads at once, round after round, of a VM whose lock and socket files
    /// a dead VM left behind: every probe says gone, and the files go.
    func testConcurrentProbesOfAVMThatDiedAllSayGone() throws {
        for round in 0..<200 {
            XCTAssertTrue(FileManager.default.createFile(atPath: RunDirectory.lock("ghost"), contents: Data()))
            XCTAssertTrue(FileManager.default.createFile(atPath: RunDirectory.socket("ghost"), contents: Data()))
            let live = Atomic<Int>(0)
            DispatchQueue.concurrentPerform(iterations: 4) { _ in
                if case .live = vmPresence("ghost") { live.add(1, ordering: .relaxed) }
            }
            XCTAssertEqual(live.load(ordering: .relaxed), 0, "round \(round): a probe took another probe for a live VM")
            XCTAssertFalse(FileManager.default.fileExists(atPath: RunDirectory.socket("ghost")), "round \(round)")
        }
    }

    /// A VM that holds its lock with its pid in it is live, and its files stay; one that holds it
    /// without a pid for longer than a VM takes to write one is still called live (it may be slow).
    func testAVMHoldingItsLockIsLive() throws {
        let held = try XCTUnwrap(try PathLock.acquire(RunDirectory.lock("alive"), blocking: false))
        XCTAssertTrue(FileManager.default.createFile(atPath: RunDirectory.socket("alive"), contents: Data()))
        guard case .live(pid: nil) = vmPresence("alive") else { return XCTFail("a held lock without a pid is a VM starting") }
        try held.writeAll(Array("\(getpid())\n".utf8))
        guard case .live(let pid) = vmPresence("alive"), pid == getpid() else { return XCTFail("the holder's pid is read back") }
        XCTAssertTrue(FileManager.default.fileExists(atPath: RunDirectory.socket("alive")), "a live VM's socket is left alone")
        held.close()
        guard case .gone = vmPresence("alive") else { return XCTFail("released: gone") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: RunDirectory.lock("alive")))
    }
}

import Foundation
@testable import HVHost
import Synchronization
import XCTest

/// The tenant registry: one uid per name, never shared, kept across runs, leases freed with
/// their holder, a damaged file refused with the line named.
final class TenantRegistryTests: XCTestCase {
    private var dir: URL!
    private var path: String { dir.appendingPathComponent("tenants").path }

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-tenants-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(at: dir)
    }

    /// The two names the old hash gave one uid (2,606,730) now get two, and keep them.
    func testNamesThatHashedAlikeGetTheirOwnUIDsAndKeepThem() throws {
        let registry = TenantRegistry(path: path)
        let a = try registry.uid(for: "cust619"), b = try registry.uid(for: "cust2680")
        XCTAssertNotEqual(a, b)
        XCTAssertTrue(TenantRegistry.idRange.contains(a) && TenantRegistry.idRange.contains(b))
        let reopened = TenantRegistry(path: path)
        XCTAssertEqual(try reopened.uid(for: "cust619"), a)
        XCTAssertEqual(try reopened.uid(for: "cust2680"), b)
        XCTAssertEqual(try reopened.registeredUID("cust619"), a)
        XCTAssertNil(try reopened.registeredUID("nobody"))
    }

    /// Many threads, each with its own open file (so the lock is really contended), register
    /// overlapping names: every name ends with one uid, and no two names share one.
    func testConcurrentRegistrationsNeverShareAUID() throws {
        let results = Mutex<[String: Set<UInt32>]>([:])
        let failures = Mutex<[String]>([])
        let path = self.path
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            let registry = TenantRegistry(path: path)
            for i in 0..<25 {
                let name = "t\((i + worker * 7) % 60)"
                do throws(UsageError) {
                    let uid = try registry.uid(for: name)
                    results.withLock { _ = $0[name, default: []].insert(uid) }
                } catch {
                    failures.withLock { $0.append(error.message) }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        let byName = results.withLock { $0 }
        XCTAssertTrue(byName.values.allSatisfy { $0.count == 1 }, "\(byName)")
        let uids = byName.values.compactMap(\.first)
        XCTAssertEqual(Set(uids).count, uids.count)
        XCTAssertEqual(try TenantRegistry(path: path).entries().count, byName.count)
    }

    /// A VM's own tenant is leased: listed while its holder runs, gone (and its uid not handed
    /// straight out again) once the holder is.
    func testLeasesAreFreedWithTheirHolder() throws {
        let alive = Mutex<Bool>(true)
        let registry = TenantRegistry(path: path) { pid, _ in pid == getpid() && alive.withLock { $0 } }
        let lease = try registry.lease()
        XCTAssertEqual(lease.name, "vm:\(getpid())")
        XCTAssertEqual(try registry.lease(), lease, "asking again returns the same lease")
        XCTAssertEqual(try registry.entries().map(\.name), [lease.name])
        alive.withLock { $0 = false }
        XCTAssertEqual(try registry.entries(), [])
        let next = try registry.uid(for: "alice")
        XCTAssertNotEqual(next, lease.uid, "a freed uid is not reused at once")
        // A VM's tenant cannot be registered by name once its lease is gone.
        XCTAssertThrowsError(try registry.uid(for: lease.name)) { error in
            XCTAssertTrue((error as? UsageError)?.message.contains("is a VM's own tenant") == true, "\(error)")
        }
    }

    func testRemovedTenantsAreForgottenAndTheCursorWraps() throws {
        let registry = TenantRegistry(path: path)
        let a = try registry.uid(for: "alice")
        XCTAssertTrue(try registry.remove("alice"))
        XCTAssertFalse(try registry.remove("alice"))
        XCTAssertNotEqual(try registry.uid(for: "alice"), a)
        var next = TenantRegistry.idRange.upperBound
        let entries = [TenantRegistry.Entry(name: "x", uid: TenantRegistry.idRange.lowerBound)]
        XCTAssertEqual(try TenantRegistry.allocate(&next, avoiding: entries), TenantRegistry.idRange.upperBound)
        XCTAssertEqual(next, TenantRegistry.idRange.lowerBound)
        XCTAssertEqual(try TenantRegistry.allocate(&next, avoiding: entries), TenantRegistry.idRange.lowerBound + 1)
    }

    func testADamagedRegistryIsRefusedNamingTheLine() throws {
        for (text, line) in [("next 2000001\n2000000 alice\nbogus\n", 3), ("2000000 alice\n2000000 bob\n", 2),
                             ("2000000 alice\n2000001 alice\n", 2), ("5 root\n", 1), ("2000000 vm:1 1@x\n", 1)] {
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try TenantRegistry(path: path).uid(for: "carol"), text) { error in
                let message = (error as? UsageError)?.message ?? "\(error)"
                XCTAssertTrue(message.hasPrefix("the tenant registry \(path) is damaged at line \(line) "), message)
            }
        }
        // Comments and blank lines are fine.
        try "# kept\n\n2000007 alice\n".write(toFile: path, atomically: true, encoding: .utf8)
        XCTAssertEqual(try TenantRegistry(path: path).uid(for: "alice"), 2_000_007)
    }

    func testProcessStartTimeTellsAReusedPidApart() {
        XCTAssertNotNil(processStartTime(getpid()))
        XCTAssertEqual(processStartTime(getpid()), processStartTime(getpid()))
        XCTAssertNil(processStartTime(Int32.max))
    }
}

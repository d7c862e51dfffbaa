import Foundation
import XCTest

/// `hvctl disk create`: thin-provisioned raw images, and refusals that protect existing data.
final class DiskTests: XCTestCase {
    func testCreatesASparseImageOfTheExactSize() throws {
        guard FileManager.default.isExecutableFile(atPath: Harness.hvctl) else { throw Harness.MissingBuild(description: "hvctl not built") }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-disk-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("a.img").path

        var r = try runHvctl(["disk", "create", image, "--size", "20G"])
        XCTAssertEqual(r.status, 0, r.stderr)
        var st = stat()
        XCTAssertEqual(stat(image, &st), 0)
        XCTAssertEqual(Int64(st.st_size), 20 << 30)
        XCTAssertLessThanOrEqual(Int64(st.st_blocks) * 512, 1 << 20, "thin-provisioned: nothing allocated")
        XCTAssertEqual(st.st_mode & 0o777, 0o600)

        // An existing image is never overwritten, even with the same size.
        try Data("data".utf8).write(to: URL(fileURLWithPath: image))
        r = try runHvctl(["disk", "create", image, "--size", "1G"])
        XCTAssertEqual(r.status, 2)
        XCTAssertTrue(r.stderr.contains("already exists"), r.stderr)
        XCTAssertEqual(try String(contentsOfFile: image, encoding: .utf8), "data")

        for (args, message) in [(["disk", "create", dir.appendingPathComponent("b.img").path, "--size", "1000"], "not a multiple of 512"),
                                (["disk", "create", "--size", "1G"], "needs a PATH"),
                                (["disk", "create", dir.appendingPathComponent("c.img").path], "needs --size"),
                                (["disk", "create", "/nonexistent-dir/x.img", "--size", "1M"], "cannot create '/nonexistent-dir/x.img'"),
                                (["disk", "resize", image], "unknown disk subcommand")] {
            r = try runHvctl(args)
            XCTAssertEqual(r.status, 2, "\(args)")
            XCTAssertTrue(r.stderr.contains(message), "\(args): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("b.img").path))
    }
}

import Foundation
import HVHost
import HVSys
import XCTest

/// `confine_files_to`: names outside the directory are refused when the definition is checked,
/// and the kernel refuses, at open, whatever a symbolic link or ".." would lead out to.
final class ConfinementTests: XCTestCase {
    private var root: String!

    override func setUpWithError() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("hv-confine-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: root + "/sub", withIntermediateDirectories: true)
        XCTAssertTrue(FileManager.default.createFile(atPath: root + "/inside.img", contents: Data(count: 512)))
        XCTAssertEqual(symlink("/etc/hostname", root + "/out.img"), 0)
        XCTAssertEqual(symlink("../inside.img", root + "/sub/back.img"), 0)
        XCTAssertEqual(symlink(root + "/inside.img", root + "/absolute.img"), 0)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: root) }

    private func open(_ path: String) -> Result<Void, HostFileError> {
        do {
            let fd = try FileDescriptor.openHostFile(path, flags: O_RDONLY, kinds: .regular, beneath: root)
            fd.close()
            return .success(())
        } catch {
            return .failure(error)
        }
    }

    func testOpensBeneathTheRootAndNothingElse() {
        XCTAssertNoThrow(try open(root + "/inside.img").get())
        XCTAssertNoThrow(try open(root + "/sub/back.img").get(), "a link that stays inside is followed")
        let root: String = self.root
        let dotDot: String = root + "/../" + (root as NSString).lastPathComponent + "/../etc/hostname"
        let outside: [String] = [root + "/out.img", dotDot, "/etc/hostname", root + "/absolute.img", root + "x/inside.img", root]
        for path in outside {
            guard case .failure(let error) = open(path) else { return XCTFail("\(path) was opened") }
            XCTAssertTrue("\(error)".contains("is not beneath \(root)"), "\(path): \(error)")
        }
        guard case .failure(let missing) = open(root + "/missing.img") else { return XCTFail("a missing file was opened") }
        XCTAssertEqual(missing.errno, .noEntry)
    }

    func testDefinitionNamesOutsideTheRootAreRefused() throws {
        var d = VMDefinition()
        d.confinement = root
        d.disks = [.init(path: root + "/inside.img")]
        d.boot.firmware = VMDefinition.Boot.systemSeaBIOS
        XCTAssertNoThrow(try d.validate(naming: .keys))
        for bad in ["/etc/passwd", root + "/../x.img", root + "x/y.img"] {
            d.disks = [.init(path: bad)]
            XCTAssertThrowsError(try d.validate(naming: .keys)) { error in
                XCTAssertEqual((error as? UsageError)?.message, "disks[0].path '\(bad)' is not beneath \(self.root!): this VM's files must be there")
            }
        }
        d.disks = []
        d.boot.firmware = nil
        d.boot.kernel = "/boot/vmlinuz"
        XCTAssertThrowsError(try d.validate(naming: .keys))
        d.boot.kernel = nil
        d.confinement = "relative/dir"
        XCTAssertThrowsError(try d.validate(naming: .keys))
    }
}

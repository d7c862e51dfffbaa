import Foundation
import HVFuzzTargets
import XCTest

/// Every committed seed and every reproducer of a crash once found (`Fuzz/corpus/TARGET/`,
/// `Fuzz/regressions/TARGET/`) run through its target in-process: a fixed bug that comes back
/// fails here, without libFuzzer (the short libFuzzer runs are `bench/fuzz --ci`, from test.sh).
final class FuzzRegressionTests: XCTestCase {
    private let fuzzRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fuzz")

    private func inputs(_ folder: String, _ target: String) throws -> [URL] {
        let dir = fuzzRoot.appendingPathComponent(folder).appendingPathComponent(target)
        guard FileManager.default.fileExists(atPath: dir.path) else { return [] }
        return try FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)
            .filter { !$0.lastPathComponent.hasPrefix(".") }.sorted { $0.path < $1.path }
    }

    func testEveryTargetHasASeedCorpus() throws {
        for target in FuzzTargets.all {
            XCTAssertFalse(try inputs("corpus", target.name).isEmpty, "Fuzz/corpus/\(target.name) holds no seed")
        }
    }

    func testNoFolderNamesAnUnknownTarget() throws {
        let names = Set(FuzzTargets.all.map(\.name))
        for folder in ["corpus", "regressions", "dict"] {
            let dir = fuzzRoot.appendingPathComponent(folder)
            guard FileManager.default.fileExists(atPath: dir.path) else { continue }
            for entry in try FileManager.default.contentsOfDirectory(atPath: dir.path) where !entry.hasPrefix(".") {
                let name = folder == "dict" ? String(entry.dropLast(".dict".count)) : entry
                XCTAssertTrue(names.contains(name), "Fuzz/\(folder)/\(entry) is for no target (the targets: \(names.sorted()))")
            }
        }
    }

    func testSeedsAndReproducersRunWithoutAFinding() throws {
        var ran = 0
        for target in FuzzTargets.all {
            for file in try inputs("corpus", target.name) + inputs("regressions", target.name) {
                let bytes = try Data(contentsOf: file)
                bytes.withUnsafeBytes { target.run($0) }
                ran += 1
            }
        }
        XCTAssertGreaterThan(ran, FuzzTargets.all.count)
    }
}

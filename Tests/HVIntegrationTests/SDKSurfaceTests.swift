import Foundation
import XCTest

/// The device SDK's public surface is a contract with plugin authors: `api/device-sdk.txt` lists
/// every public symbol of HVDeviceSDK (from the compiler's symbol graph of the built module), and
/// a change to it must be deliberate (rerun with HV_UPDATE_SDK_API=1 and commit the file). A
/// plugin written against the public API compiles; one that names hv's internals (the wire
/// codecs, the syscall layer) does not.
final class SDKSurfaceTests: XCTestCase {
    private static var baseline: URL { Harness.repositoryRoot.appendingPathComponent("api/device-sdk.txt") }
    private static var modules: URL { Harness.productsDirectory.appendingPathComponent("Modules") }

    /// Where the compiler finds the C modules HVDeviceSDK's interface depends on.
    private static var clangFlags: [String] {
        let atomics = Harness.repositoryRoot.appendingPathComponent(".build/checkouts/swift-atomics/Sources/_AtomicsShims/include").path
        return ["-I", modules.path, "-I", atomics,
                "-Xcc", "-fmodule-map-file=" + Harness.productsDirectory.appendingPathComponent("CHVShim.build/module.modulemap").path]
    }

    /// One line per public symbol: its kind, its path and its declaration, sorted.
    static func surface() throws -> [String] {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("hv-sdk-surface-\(getpid())")
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: out) }
        let r = try tool(try toolchainExecutable("swift-symbolgraph-extract"),
                         ["-module-name", "HVDeviceSDK", "-target", "x86_64-unknown-linux-gnu", "-minimum-access-level", "public",
                          "-output-dir", out.path] + clangFlags)
        guard r.status == 0 else { throw NSError(domain: "hv", code: 1, userInfo: [NSLocalizedDescriptionKey: r.output]) }
        let data = try Data(contentsOf: out.appendingPathComponent("HVDeviceSDK.symbols.json"))
        let graph = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        let symbols = try XCTUnwrap(graph["symbols"] as? [[String: Any]])
        return symbols.compactMap { symbol -> String? in
            guard let kind = (symbol["kind"] as? [String: Any])?["identifier"] as? String,
                  let path = symbol["pathComponents"] as? [String] else { return nil }
            let fragments = (symbol["declarationFragments"] as? [[String: Any]] ?? []).compactMap { $0["spelling"] as? String }.joined()
            return "\(kind) \(path.joined(separator: ".")): \(fragments.split(whereSeparator: \.isNewline).joined(separator: " "))"
        }.sorted()
    }

    func testThePublicSurfaceIsTheCommittedOne() throws {
        let current = try Self.surface()
        XCTAssertGreaterThan(current.count, 50)
        if ProcessInfo.processInfo.environment["HV_UPDATE_SDK_API"] == "1" {
            try (current.joined(separator: "\n") + "\n").write(to: Self.baseline, atomically: true, encoding: .utf8)
            return
        }
        let committed = try String(contentsOf: Self.baseline, encoding: .utf8).split(separator: "\n").map(String.init)
        let added = current.filter { !committed.contains($0) }, removed = committed.filter { !current.contains($0) }
        XCTAssertTrue(added.isEmpty && removed.isEmpty, """
            HVDeviceSDK's public API changed; if that is meant, run the tests with HV_UPDATE_SDK_API=1 and commit api/device-sdk.txt.
            added:
            \(added.joined(separator: "\n"))
            removed:
            \(removed.joined(separator: "\n"))
            """)
        // The internals stay out: nothing of the wire codecs or the syscall layer is re-exported.
        for hidden in ["ControlChannel", "RegisterRing", "LockDown", "Errno", "SharedMapping"] {
            XCTAssertFalse(current.contains { $0.contains(" \(hidden)") && $0.hasPrefix("swift.typealias") }, hidden)
        }
    }

    func testAPluginOnThePublicAPICompilesAndOneReachingForInternalsDoesNot() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hv-sdk-plugin-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let swiftc = try toolchainExecutable("swiftc")
        func typecheck(_ source: String) throws -> (status: Int32, output: String) {
            let file = dir.appendingPathComponent("main.swift")
            try source.write(to: file, atomically: true, encoding: .utf8)
            return try tool(swiftc, ["-typecheck", "-swift-version", "6", file.path] + Self.clangFlags)
        }
        let plugin = """
            import HVDeviceSDK

            final class Scratch: DeviceModel {
                var value: UInt64 = 0
                func read(resource: Int, offset: UInt64, size: Int) -> UInt64 { value }
                func write(resource: Int, offset: UInt64, size: Int, value: UInt64) { self.value = value }
                func nextDeadline() -> UInt64? { monotonicNanoseconds() + 1_000_000 }
            }

            let wanted: Capabilities = [.registerRing, .statePage]
            let runtime = DeviceRuntime.startOrExit(name: "scratch", capabilities: wanted)
            runtime.log(.info, "SDK \\(SDKVersion.sdk.major).\\(SDKVersion.sdk.minor), protocol \\(SDKVersion.ipcProtocol.major)")
            let first: Resource? = runtime.resources.first
            let files: [UInt16: FileDescriptor] = runtime.hostFiles
            _ = (first, files, runtime.config["speed"])
            runtime.run(Scratch())
            """
        let good = try typecheck(plugin)
        XCTAssertEqual(good.status, 0, good.output)
        for (name, use) in [("ControlChannel", "ControlChannel.self"), ("RegisterRing", "RegisterRing.self"),
                            ("LockDown", "LockDown.self"), ("Errno", "Errno(rawValue: 1)"), ("MemFD", "MemFD.self")] {
            let bad = try typecheck("import HVDeviceSDK\n_ = \(use)\n")
            XCTAssertNotEqual(bad.status, 0, "\(name) is visible to a plugin")
            XCTAssertTrue(bad.output.contains("cannot find '\(name)' in scope"), bad.output)
        }
    }
}

// swift-tools-version:6.0
import PackageDescription

// A third-party hv device plugin: its own package, depending on hv's SDK by path. Inside an hv
// checkout the SDK is three directories up; elsewhere, point HV_SOURCE at an hv checkout:
//     HV_SOURCE=/path/to/hv swift build -c release
let hv = Context.environment["HV_SOURCE"] ?? "../../.."

/// SwiftPM names a path dependency after its directory (lowercased): that name is what
/// `.product(name:package:)` takes, and it is the checkout's, whatever it was cloned as.
func packageIdentity(of path: String, from directory: String) -> String {
    var parts = path.hasPrefix("/") ? [] : directory.split(separator: "/").map(String.init)
    for part in path.split(separator: "/") {
        if part == ".." { _ = parts.popLast() } else if part != "." { parts.append(String(part)) }
    }
    return (parts.last ?? "hv").lowercased()
}

let package = Package(
    name: "swift-rng",
    dependencies: [.package(path: hv)],
    targets: [
        .executableTarget(
            name: "swift-rng",
            dependencies: [.product(name: "HVDeviceSDK", package: packageIdentity(of: hv, from: Context.packageDirectory))],
            swiftSettings: [.swiftLanguageMode(.v6)]),
    ]
)

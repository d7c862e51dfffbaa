// swift-tools-version:6.0
import PackageDescription

// hv: a KVM hypervisor built like a microkernel. See ARCHITECTURE.md for the map.
let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "hv",
    products: [
        .executable(name: "hvctl", targets: ["hvctl"]),
        .executable(name: "hv-serial", targets: ["hv-serial"]),
        .executable(name: "hv-bios", targets: ["hv-bios"]),
        .executable(name: "hv-scsi", targets: ["hv-scsi"]),
        .executable(name: "hv-net", targets: ["hv-net"]),
        .executable(name: "hv-switch", targets: ["hv-switch"]),
        .executable(name: "hv-balloon", targets: ["hv-balloon"]),
        .executable(name: "hv-cgroup-reaper", targets: ["hv-cgroup-reaper"]),
        .executable(name: "hvd", targets: ["hvd"]),
        .executable(name: "hv-firecracker", targets: ["hv-firecracker"]),
        .library(name: "HVDeviceSDK", targets: ["HVDeviceSDK"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        // hvd only: the HTTP server on its Unix sockets, and the Prometheus text format.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // Documentation only: `swift package generate-documentation --target HVDeviceSDK` builds the SDK's DocC catalogue.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // Thin C shim: fixed-arity wrappers for variadic/macro-only kernel interfaces.
        .target(name: "CHVShim", path: "Sources/CHVShim"),
        // zlib's raw inflate for qcow2's compressed clusters (a C macro Swift cannot call); only hv-scsi links it.
        .target(name: "CInflate", path: "Sources/CInflate", linkerSettings: [.linkedLibrary("z")]),
        // OpenSSL's libcrypto (HMAC-SHA256, AES-256-GCM) for the migration stream's shared key,
        // dlopen'ed on first use rather than linked (headers from libssl-dev); only HVHost links it.
        .target(name: "CLibcrypto", path: "Sources/CLibcrypto"),
        // Typed syscall layer: Errno, owned file descriptors, memfd, eventfd, sockets with fd passing.
        .target(name: "HVSys", dependencies: ["CHVShim"], path: "Sources/HVSys", swiftSettings: strict),
        // /dev/kvm: system, VM, vCPU, guest memory.
        .target(name: "HVKVM", dependencies: ["HVSys", "CHVShim", .product(name: "Atomics", package: "swift-atomics")], path: "Sources/HVKVM", swiftSettings: strict),
        // Wire protocol (ipc-schema/), shared-memory rings, control channel.
        .target(name: "HVIPC", dependencies: ["HVSys", .product(name: "Atomics", package: "swift-atomics")],
                path: "Sources/HVIPC", swiftSettings: strict),
        // Public device SDK: the device-process runtime.
        .target(name: "HVDeviceSDK", dependencies: ["HVIPC", "HVSys", "CHVShim", .product(name: "Atomics", package: "swift-atomics")],
                path: "Sources/HVDeviceSDK", exclude: ["README.md"],
                swiftSettings: strict),
        // libseccomp, for the jails' filters (Debian: libseccomp-dev).
        .systemLibrary(name: "CSeccomp", path: "Sources/CSeccomp", pkgConfig: "libseccomp", providers: [.apt(["libseccomp-dev"])]),
        // Sandbox profiles: the format, its loader and its rendering (pure Swift).
        .target(name: "HVSandbox", path: "Sources/HVSandbox", swiftSettings: strict),
        // Removes a VM's cgroups once its hvctl has ended, however it ended, and tears its KVM VM down (Glibc and HVSys only).
        .executableTarget(name: "hv-cgroup-reaper", dependencies: ["HVSys", "CHVShim"], path: "Sources/hv-cgroup-reaper", swiftSettings: strict),
        // The trusted VMM core.
        .target(name: "HVCore", dependencies: ["HVKVM", "HVIPC", "HVSys", "HVSandbox", "CSeccomp"], path: "Sources/HVCore", swiftSettings: strict),
        // The trusted host layer: turns a VMDefinition into a running machine (board layout, host
        // files, taps and segments, the control server). Uses FoundationEssentials for JSON; the
        // core's vCPU path and the devices never link it.
        .target(name: "HVHost", dependencies: ["HVCore", "HVSys", "HVIPC", "HVSandbox", "HVNetSwitch", "CSeccomp", "CHVShim",
                                              "HVSerialContract", "HVBIOSContract", "HVSCSIContract", "HVNetContract", "HVBalloonContract", "HVSCSIDisk", "CLibcrypto"],
                path: "Sources/HVHost", swiftSettings: strict),
        // The operator's command: argument parsing and printing only.
        .executableTarget(name: "hvctl", dependencies: ["HVHost", "HVSys", "HVIPC", "HVSandbox",
                                                        .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          path: "Sources/hvctl", swiftSettings: strict,
                          // The Swift runtime, FoundationEssentials and swift-argument-parser linked in
                          // statically: dynamically, loading them and scanning their conformance records
                          // cost 4–7 ms to the first guest byte; statically, hvctl starts as fast as it did
                          // without them (BENCHMARKS.md). The jail finds the devices' own libraries from
                          // their ELF headers, not from what hvctl has mapped.
                          linkerSettings: [.unsafeFlags(["-static-stdlib", "-Xlinker", "-l_FoundationCShims",
                                                         "-Xlinker", "-l_FoundationCollections"])]),
        // The API service: HTTP/JSON on Unix sockets (api/hvd.yaml), definitions kept under a state
        // directory, each VM started as its own `hvctl run --detach` core and driven over its
        // control socket, so the HTTP stack never enters a VM's process.
        .executableTarget(name: "hvd", dependencies: ["HVHost", "HVSys",
                                                      .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                                      .product(name: "Hummingbird", package: "hummingbird"),
                                                      .product(name: "Prometheus", package: "swift-prometheus"),
                                                      .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                                                      .product(name: "NIOCore", package: "swift-nio"),
                                                      .product(name: "Logging", package: "swift-log")],
                          path: "Sources/hvd", swiftSettings: strict),
        // Firecracker's API bodies, decoded as hv-firecracker does (and as the fuzz target does).
        .target(name: "HVFirecrackerModel", dependencies: ["HVHost"], path: "Sources/HVFirecrackerModel", swiftSettings: strict),
        .executableTarget(name: "hv-firecracker", dependencies: ["HVHost", "HVSys", "HVFirecrackerModel",
                                                                 .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                                                 .product(name: "Hummingbird", package: "hummingbird"),
                                                                 .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                                                                 .product(name: "NIOCore", package: "swift-nio"),
                                                                 .product(name: "Logging", package: "swift-log")],
                          path: "Sources/hv-firecracker", swiftSettings: strict),

        // Devices shipped with hv, built only on the public SDK. Each has a contract module, compiled by the
        // device and by the trusted side (HVHost): its windows, interrupt lines, host files and settings by name.
        .target(name: "HVSerialContract", dependencies: ["HVIPC"], path: "Plugins/serial/Contract", swiftSettings: strict),
        .target(name: "HVBIOSContract", dependencies: ["HVIPC"], path: "Plugins/bios/Contract", swiftSettings: strict),
        .target(name: "HVSCSIContract", dependencies: ["HVIPC"], path: "Plugins/scsi/Contract", swiftSettings: strict),
        .target(name: "HVNetContract", dependencies: ["HVIPC", "HVNetSwitch"], path: "Plugins/net/Contract", swiftSettings: strict),
        .target(name: "HVSerialUART", path: "Plugins/serial/UART", swiftSettings: strict),
        .executableTarget(name: "hv-serial", dependencies: ["HVDeviceSDK", "HVSerialUART", "HVSerialContract"],
                          path: "Plugins/serial/Device", swiftSettings: strict),
        .target(name: "HVBootLoader", path: "Plugins/bios/Loader", swiftSettings: strict),
        .executableTarget(name: "hv-bios", dependencies: ["HVDeviceSDK", "HVBootLoader", "HVBIOSContract"],
                          path: "Plugins/bios/Device", swiftSettings: strict),

        // virtio-scsi disk: the SCSI command interpreter (pure, unit-tested) and the device process.
        .target(name: "HVSCSIDisk", dependencies: ["CHVShim", "CInflate"], path: "Plugins/scsi/Disk", swiftSettings: strict),
        .executableTarget(name: "hv-scsi", dependencies: ["HVDeviceSDK", "HVSCSIDisk", "HVSCSIContract"], path: "Plugins/scsi/Device",
                          swiftSettings: strict),

        // virtio-net NIC and the private segments' learning switch (its forwarding table pure, unit-tested).
        .executableTarget(name: "hv-net", dependencies: ["HVDeviceSDK", "HVNetSwitch", "HVNetContract"], path: "Plugins/net/Device", swiftSettings: strict),
        .target(name: "HVNetSwitch", path: "Plugins/net/Switch", swiftSettings: strict),
        .executableTarget(name: "hv-switch", dependencies: ["HVIPC", "HVSys", "HVNetSwitch"], path: "Plugins/net/SwitchProcess",
                          swiftSettings: strict),

        // virtio memory balloon: gives the pages a guest hands over back to the host.
        .target(name: "HVBalloonContract", dependencies: ["HVIPC"], path: "Plugins/balloon/Contract", swiftSettings: strict),
        .executableTarget(name: "hv-balloon", dependencies: ["HVDeviceSDK", "HVBalloonContract"], path: "Plugins/balloon/Device", swiftSettings: strict),

        // Test-only hostile device, run as a third-party plugin under its own profile.
        .executableTarget(name: "hv-rogue-device", dependencies: ["HVDeviceSDK"], path: "Tests/RogueDevice",
                          exclude: ["rogue.json"], swiftSettings: strict),
        // Test-only PCI function (config space, a memory BAR and an I/O BAR) for the PCI bus tests.
        .executableTarget(name: "hv-pci-testdevice", dependencies: ["HVDeviceSDK"], path: "Tests/PCITestDevice",
                          swiftSettings: strict),
        // Fuzz targets (issue 20): one thin entry point per parser of untrusted bytes, and `hv-fuzz`,
        // which replays inputs as built here and runs libFuzzer when `bench/fuzz` builds it.
        .target(name: "HVFuzzTargets", dependencies: ["HVIPC", "HVSys", "CHVShim", "HVDeviceSDK", "HVSCSIDisk", "HVBootLoader",
                                                      "HVSandbox", "HVNetSwitch", "HVSerialUART", "HVCore", "HVHost", "HVFirecrackerModel"],
                path: "Fuzz/Targets", swiftSettings: strict),
        .executableTarget(name: "hv-fuzz", dependencies: ["HVFuzzTargets"], path: "Fuzz/Driver", swiftSettings: strict),
        .testTarget(name: "HVFuzzTests", dependencies: ["HVFuzzTargets"], path: "Tests/HVFuzzTests", swiftSettings: strict),
        .testTarget(name: "HVDeviceSDKTests", dependencies: ["HVDeviceSDK", "HVSys"], path: "Tests/HVDeviceSDKTests",
                    swiftSettings: strict),
        .testTarget(name: "HVSCSIDiskTests", dependencies: ["HVSCSIDisk"], path: "Tests/HVSCSIDiskTests", swiftSettings: strict),
        .testTarget(name: "HVIPCTests", dependencies: ["HVIPC", "HVSys", "CHVShim"], path: "Tests/HVIPCTests",
                    resources: [], swiftSettings: strict),
        .testTarget(name: "HVSerialUARTTests", dependencies: ["HVSerialUART"], path: "Tests/HVSerialUARTTests",
                    swiftSettings: strict),
        .testTarget(name: "HVBootLoaderTests", dependencies: ["HVBootLoader"], path: "Tests/HVBootLoaderTests",
                    swiftSettings: strict),
        .testTarget(name: "HVNetSwitchTests", dependencies: ["HVNetSwitch"], path: "Tests/HVNetSwitchTests", swiftSettings: strict),
        .testTarget(name: "HVSandboxTests", dependencies: ["HVSandbox"], path: "Tests/HVSandboxTests", swiftSettings: strict),
        .testTarget(name: "HVHostTests", dependencies: ["HVHost", "HVSys", "HVIPC", "HVBIOSContract", "HVSCSIContract", "HVNetContract", "HVBalloonContract"], path: "Tests/HVHostTests", swiftSettings: strict),
        .testTarget(name: "HVCoreTests", dependencies: ["HVCore", "HVKVM", "CHVShim"], path: "Tests/HVCoreTests", swiftSettings: strict),
        .testTarget(name: "HVIntegrationTests", dependencies: ["HVSys"], path: "Tests/HVIntegrationTests",
                    exclude: [], swiftSettings: strict),
    ]
)

// What a plugin sees when it imports HVDeviceSDK: the SDK's own types (DeviceRuntime,
// DeviceModel, GuestMemory, StatePage, VirtioPCITransport, …) and, under these names, the few
// wire and host types its API takes and returns. The rest of the wire protocol's codecs (HVIPC)
// and of the syscall layer (HVSys) are hv's internals: not exported, free to change between
// releases. `Tests/HVIntegrationTests/SDKSurfaceTests.swift` holds the SDK to
// `Sources/HVDeviceSDK/API.txt`, and checks that a plugin naming an internal type does not compile.
public import HVIPC
public import HVSys

/// The SDK's version, and the IPC protocol version it speaks (ipc-schema/README.md §8). A plugin
/// built against an SDK with the same major version runs on any hv whose protocol major matches.
public enum SDKVersion {
    /// This SDK's version: major changes break source compatibility of this module's API.
    public static let sdk = (major: 1, minor: 0)
    /// The IPC protocol version (major, minor) this SDK negotiates; minor is what it can speak at most.
    public static let ipcProtocol = (major: ProtocolVersion.major, minor: ProtocolVersion.minor)
}

/// What a device may do, negotiated in the handshake (ipc-schema §6.4): ask for what you use in
/// `DeviceRuntime.startOrExit(name:capabilities:)`.
public typealias Capabilities = HVIPC.Capabilities
/// An address range routed to the device (ports, fixed MMIO, a PCI function's configuration space
/// or BAR); register requests name one by its index in `DeviceRuntime.resources`.
public typealias Resource = HVIPC.Resource
/// A LOG message; its `Level` is what `DeviceRuntime.log(_:_:)` takes.
public typealias LogRecord = HVIPC.LogRecord
/// Where the firmware or loaded guest starts (platform devices, `BOOT_CONTROL`).
public typealias BootState = HVIPC.BootState
/// A power-off or reset request (platform devices, `BOOT_CONTROL`).
public typealias SystemEvent = HVIPC.SystemEvent
/// A guest RAM region as HELLO describes it (`GuestMemory.regions`).
public typealias MemoryRegion = HVIPC.MemoryRegion
/// Typed reads of `DeviceRuntime.config` with one-line errors naming the key.
public typealias SettingsReader = HVIPC.SettingsReader
/// A rate limit as a device receives it in its settings (`RateLimiter`).
public typealias RateLimitSettings = HVIPC.RateLimitSettings
/// An open descriptor the device owns (its host files).
public typealias FileDescriptor = HVSys.FileDescriptor
/// An eventfd (doorbells, MSI routes).
public typealias EventFD = HVSys.EventFD

/// Nanoseconds on the monotonic clock: the time base of `DeviceModel.nextDeadline()` and `RateLimiter`.
@inlinable public func monotonicNanoseconds() -> UInt64 { HVSys.monotonicNanoseconds() }

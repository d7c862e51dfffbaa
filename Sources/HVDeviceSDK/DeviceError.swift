import HVIPC
import HVSys

/// Everything that can go wrong in a device process's runtime: what kind of failure, and one line
/// saying what happened (what `DeviceRuntime.startOrExit` logs before it exits).
public struct DeviceError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The core sent something the protocol does not allow.
        case protocolViolation
        /// The control or event channel failed.
        case channel
        /// The register ring could not be attached.
        case ring
        /// A system call failed.
        case system
        /// The device's own configuration is unusable.
        case configuration
    }

    public let kind: Kind
    public let description: String

    /// The device's own configuration is unusable: `why`, in one line.
    public static func configuration(_ why: String) -> DeviceError { .init(kind: .configuration, description: "configuration: \(why)") }

    // The wire and syscall errors stay internal: a plugin sees their text, not their types.
    static func protocolViolation(_ why: String) -> DeviceError { .init(kind: .protocolViolation, description: "protocol violation by the core: \(why)") }
    static func channel(_ error: ChannelError) -> DeviceError { .init(kind: .channel, description: "control channel: \(error)") }
    static func ring(_ error: RingError) -> DeviceError { .init(kind: .ring, description: error.description) }
    static func system(_ error: SystemError) -> DeviceError { .init(kind: .system, description: error.description) }
}

import HVIPC
import HVSys

/// Everything that can go wrong in a device process's runtime.
public enum DeviceError: Error, Sendable, CustomStringConvertible {
    /// The core sent something the protocol does not allow.
    case protocolViolation(String)
    /// The control or event channel failed.
    case channel(ChannelError)
    /// The register ring could not be attached.
    case ring(RingError)
    /// A system call failed.
    case system(SystemError)
    /// The device's own configuration is unusable.
    case configuration(String)

    public var description: String {
        switch self {
        case .protocolViolation(let why): return "protocol violation by the core: \(why)"
        case .channel(let e): return "control channel: \(e)"
        case .ring(let e): return e.description
        case .system(let e): return e.description
        case .configuration(let why): return "configuration: \(why)"
        }
    }
}

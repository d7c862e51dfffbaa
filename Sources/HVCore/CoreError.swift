import HVIPC
import HVKVM
import HVSys

/// Why the core could not build or run a VM. Every case reads as one line for the operator.
public enum CoreError: Error, Sendable, CustomStringConvertible {
    case kvm(KVMError)
    case system(SystemError)
    case configuration(String)
    case device(name: String, reason: String)

    public var description: String {
        switch self {
        case .kvm(let e): return e.description
        case .system(let e): return e.description
        case .configuration(let why): return why
        case .device(let name, let reason): return "device \(name): \(reason)"
        }
    }
}

/// Why a removable medium could not be changed (`Machine.changeMedium`), in one line.
public struct MediaChangeError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

import Synchronization
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

/// Why `Machine.pause()` or `resume()` did nothing, in one line.
public enum MachineControlError: Error, Sendable, CustomStringConvertible {
    /// Already paused (pause) or not paused (resume).
    case alreadyInState(String)
    /// The guest is not running yet, is stopping, or its vCPUs did not stop in time.
    case notRunning(String)

    public var description: String {
        switch self {
        case .alreadyInState(let why), .notRunning(let why): return why
        }
    }
}

/// What a vCPU is doing, as `Machine.vcpuStatus` reports it.
public enum VCPUState: UInt8, Sendable {
    /// In the guest (or about to enter it).
    case running
    /// Halted (HLT), waiting for an interrupt.
    case halted
    /// Parked by `Machine.pause()`.
    case paused
    /// An application processor the guest has not started (no INIT/SIPI yet).
    case notStarted

    /// The word `hvctl status` prints.
    public var name: String {
        switch self {
        case .running: "running"
        case .halted: "halted"
        case .paused: "paused"
        case .notStarted: "not-started"
        }
    }
}

/// One vCPU as the control socket reports it.
public struct VCPUStatus: Sendable {
    public var id: Int
    public var state: VCPUState
    /// The instruction pointer, when asked for.
    public var rip: UInt64?
    /// Exits to user space since the VM started, by kind.
    public var exits: VCPUExitCounts
}

/// A vCPU's exits to user space by kind: port I/O, MMIO (both forwarded to devices), interrupted
/// (a kick or signal: pause, probe, stop) and halt. Exits KVM handles in the kernel (the in-kernel
/// LAPIC and irqchip, ioeventfds) never reach user space and are not counted.
public struct VCPUExitCounts: Sendable, Equatable {
    public var io: UInt64
    public var mmio: UInt64
    public var interrupted: UInt64
    public var halt: UInt64
}

/// The counters behind `VCPUExitCounts`, one set per vCPU, written by that vCPU's thread alone.
final class ExitCounts: Sendable {
    let io = Atomic<UInt64>(0)
    let mmio = Atomic<UInt64>(0)
    let interrupted = Atomic<UInt64>(0)
    let halt = Atomic<UInt64>(0)

    var snapshot: VCPUExitCounts {
        VCPUExitCounts(io: io.load(ordering: .relaxed), mmio: mmio.load(ordering: .relaxed),
                       interrupted: interrupted.load(ordering: .relaxed), halt: halt.load(ordering: .relaxed))
    }
}

import CHVShim
import Glibc
import HVSys

/// Everything that can go wrong talking to /dev/kvm, phrased for the operator.
public enum KVMError: Error, Sendable, CustomStringConvertible {
    case unavailable(String)
    case unsupportedAPI(Int32)
    case missingCapability(String)
    case ioctl(String, Errno)
    /// A saved state KVM cannot take as it is (a snapshot from another kernel ABI or CPU).
    case invalidState(String)

    public var description: String {
        switch self {
        case .unavailable(let why): return why
        case .unsupportedAPI(let v): return "/dev/kvm speaks KVM API version \(v), hv needs 12"
        case .missingCapability(let cap): return "this host's KVM lacks \(cap), which hv needs"
        case .ioctl(let what, let e): return "KVM \(what) failed: \(e)"
        case .invalidState(let why): return why
        }
    }
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer?, _ what: @autoclosure () -> String) throws(KVMError) -> Int32 {
    let r = hv_ioctl_ptr(fd, request, arg)
    if r < 0 { throw .ioctl(what(), .current) }
    return r
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ request: UInt, value: UInt, _ what: @autoclosure () -> String) throws(KVMError) -> Int32 {
    let r = hv_ioctl_val(fd, request, value)
    if r < 0 { throw .ioctl(what(), .current) }
    return r
}

/// The KVM subsystem (/dev/kvm).
public final class KVM: Sendable {
    let fd: FileDescriptor

    /// Capabilities hv cannot run without, with the names operators will search for.
    public static let requiredCapabilities: [(Int32, String)] = [
        (KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
        (KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP (in-kernel interrupt controller)"),
        (KVM_CAP_PIT2, "KVM_CAP_PIT2 (in-kernel PIT)"),
        (KVM_CAP_IRQFD, "KVM_CAP_IRQFD"),
        (KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD"),
        (KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"),
        (KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
        (KVM_CAP_MP_STATE, "KVM_CAP_MP_STATE"),
        (KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
    ]

    /// Opens /dev/kvm and checks the API version and every required capability.
    public init(path: String = "/dev/kvm") throws(KVMError) {
        let raw = Glibc.open(path, O_RDWR | O_CLOEXEC)
        if raw < 0 {
            let e = Errno.current
            switch e {
            case .noEntry:
                throw .unavailable("\(path) does not exist: this host has no KVM (enable virtualization, or load kvm_intel/kvm_amd)")
            case .permissionDenied, Errno(rawValue: EPERM):
                throw .unavailable("permission denied opening \(path): run as root or add this user to the 'kvm' group")
            default:
                throw .unavailable("cannot open \(path): \(e)")
            }
        }
        fd = FileDescriptor(owning: raw)
        let version = hv_ioctl_val(raw, hv_KVM_GET_API_VERSION, 0)
        guard version == KVM_API_VERSION else { throw .unsupportedAPI(version) }
        for (cap, name) in Self.requiredCapabilities where hv_ioctl_val(raw, hv_KVM_CHECK_EXTENSION, UInt(cap)) <= 0 {
            throw .missingCapability(name)
        }
    }

    /// KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        max(0, hv_ioctl_val(fd.rawValue, hv_KVM_CHECK_EXTENSION, UInt(capability)))
    }

    /// Size of each vCPU's shared kvm_run area.
    public func vcpuMapSize() throws(KVMError) -> Int {
        Int(try kvmIoctl(fd.rawValue, hv_KVM_GET_VCPU_MMAP_SIZE, value: 0, "GET_VCPU_MMAP_SIZE"))
    }

    /// The CPUID leaves this host's KVM can expose to a guest.
    public func supportedCPUID() throws(KVMError) -> [kvm_cpuid_entry2] {
        var capacity = 128
        while true {
            let table = CPUIDTable(capacity: capacity)
            let r = hv_ioctl_ptr(fd.rawValue, hv_KVM_GET_SUPPORTED_CPUID, table.raw)
            if r == 0 { return table.entries }
            if errno == E2BIG && capacity < 4096 {
                capacity *= 2
                continue
            }
            throw .ioctl("GET_SUPPORTED_CPUID", .current)
        }
    }

    /// Creates a VM.
    public func createVM() throws(KVMError) -> VirtualMachine {
        let raw = try kvmIoctl(fd.rawValue, hv_KVM_CREATE_VM, value: 0, "CREATE_VM")
        return VirtualMachine(fd: FileDescriptor(owning: raw), kvm: self)
    }
}

/// A heap-allocated `struct kvm_cpuid2` with room for `capacity` entries (a flexible array member,
/// which Swift cannot express directly).
final class CPUIDTable {
    let raw: UnsafeMutableRawPointer
    let capacity: Int
    init(capacity: Int) {
        self.capacity = capacity
        let bytes = MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        raw.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(capacity)
    }
    convenience init(entries: [kvm_cpuid_entry2]) {
        self.init(capacity: entries.count)
        let base = (raw + MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        for (i, e) in entries.enumerated() { base[i] = e }
    }
    var entries: [kvm_cpuid_entry2] {
        let n = min(Int(raw.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent), capacity)
        let base = (raw + MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        return (0..<n).map { base[$0] }
    }
    deinit { raw.deallocate() }
}

import Atomics
import CHVShim
import Glibc
import HVSys

/// Why KVM_RUN returned.
public enum VCPUExit: Sendable {
    /// Port I/O. For `in`, fill values with `setIOValue`; for `out`, read them with `ioValue`.
    case io(port: UInt16, size: Int, count: Int, isWrite: Bool)
    /// MMIO outside any memory slot. For reads, answer with `setMMIOReadValue`.
    case mmio(address: UInt64, size: Int, isWrite: Bool, value: UInt64)
    /// HLT reached user space (only without an in-kernel irqchip).
    case halt
    /// Triple fault or other shutdown condition.
    case shutdown
    /// KVM_RUN was interrupted by a kick (signal or immediate_exit).
    case interrupted
    /// KVM_EXIT_SYSTEM_EVENT (e.g. a PSCI/ACPI shutdown or reset on some platforms).
    case systemEvent(UInt32)
    /// KVM could not emulate something.
    case internalError(suberror: UInt32)
    /// Hardware refused VM entry.
    case failedEntry(reason: UInt64)
    /// An exit reason hv does not handle.
    case unhandled(UInt32)
}

/// One virtual CPU and its shared kvm_run area. Used only by its own thread, except
/// `requestExit`, which any thread may call.
///
/// Audited raw-pointer holder. Unsafe assumptions:
/// - `run` maps `runSize` bytes and stays mapped until deinit;
/// - KVM writes the area only while this thread is inside KVM_RUN; between runs this thread
///   owns it, except `immediate_exit`, which other threads set atomically;
/// - the I/O data window (`io.data_offset`, `size × count`) is checked to lie inside the area.
public final class VCPU: @unchecked Sendable {
    // @unchecked: see above; the only cross-thread access is the atomic immediate_exit byte.
    /// The vCPU index (also its APIC ID).
    public let id: UInt32
    let fd: FileDescriptor
    private let run: UnsafeMutablePointer<kvm_run>
    private let runSize: Int
    private let immediateExit: UnsafeAtomic<UInt8>

    init(id: UInt32, fd: FileDescriptor, run: UnsafeMutableRawPointer, runSize: Int) {
        self.id = id
        self.fd = fd
        self.run = run.assumingMemoryBound(to: kvm_run.self)
        self.runSize = runSize
        let offset = MemoryLayout<kvm_run>.offset(of: \kvm_run.immediate_exit)!
        immediateExit = UnsafeAtomic(at: (run + offset).assumingMemoryBound(to: UnsafeAtomic<UInt8>.Storage.self))
    }

    deinit { munmap(UnsafeMutableRawPointer(run), runSize) }

    /// Makes the current or next KVM_RUN return `.interrupted` promptly. Pair it with a signal to
    /// the vCPU thread (see `VCPUKicker`) to interrupt a run already in progress.
    public func requestExit() { immediateExit.store(1, ordering: .sequentiallyConsistent) }

    /// Enters the guest until the next exit that needs user space.
    public func runOnce() throws(KVMError) -> VCPUExit {
        let r = hv_ioctl_val(fd.rawValue, hv_KVM_RUN, 0)
        if r < 0 {
            let e = Errno.current
            if e == .interrupted || e == .wouldBlock {
                immediateExit.store(0, ordering: .sequentiallyConsistent)
                return .interrupted
            }
            throw .ioctl("RUN on vCPU \(id)", e)
        }
        let reason = Int32(run.pointee.exit_reason)
        switch reason {
        case KVM_EXIT_IO:
            let io = run.pointee.io
            return .io(port: io.port, size: Int(io.size), count: Int(io.count), isWrite: io.direction == UInt8(KVM_EXIT_IO_OUT))
        case KVM_EXIT_MMIO:
            let mmio = run.pointee.mmio
            let size = Int(min(mmio.len, 8))
            var value: UInt64 = 0
            withUnsafeBytes(of: mmio.data) { bytes in
                for i in 0..<size { value |= UInt64(bytes[i]) << (8 * UInt64(i)) }
            }
            return .mmio(address: mmio.phys_addr, size: size, isWrite: mmio.is_write != 0, value: value)
        case KVM_EXIT_HLT: return .halt
        case KVM_EXIT_SHUTDOWN: return .shutdown
        case KVM_EXIT_INTR:
            immediateExit.store(0, ordering: .sequentiallyConsistent)
            return .interrupted
        case KVM_EXIT_SYSTEM_EVENT: return .systemEvent(run.pointee.system_event.type)
        case KVM_EXIT_INTERNAL_ERROR: return .internalError(suberror: run.pointee.`internal`.suberror)
        case KVM_EXIT_FAIL_ENTRY: return .failedEntry(reason: run.pointee.fail_entry.hardware_entry_failure_reason)
        default: return .unhandled(UInt32(bitPattern: reason))
        }
    }

    private func ioSlot(_ index: Int) -> UnsafeMutableRawPointer? {
        let io = run.pointee.io
        let offset = Int(io.data_offset) + index * Int(io.size)
        guard index >= 0, index < Int(io.count), offset >= 0, offset + Int(io.size) <= runSize else { return nil }
        return UnsafeMutableRawPointer(run) + offset
    }

    /// The `index`th value of an `out` exit.
    public func ioValue(_ index: Int) -> UInt64 {
        guard let p = ioSlot(index) else { return 0 }
        switch run.pointee.io.size {
        case 1: return UInt64(p.load(as: UInt8.self))
        case 2: return UInt64(p.loadUnaligned(as: UInt16.self))
        default: return UInt64(p.loadUnaligned(as: UInt32.self))
        }
    }

    /// Supplies the `index`th value of an `in` exit.
    public func setIOValue(_ index: Int, _ value: UInt64) {
        guard let p = ioSlot(index) else { return }
        switch run.pointee.io.size {
        case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
        case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: value), as: UInt16.self)
        default: p.storeBytes(of: UInt32(truncatingIfNeeded: value), as: UInt32.self)
        }
    }

    /// Supplies the value of an MMIO read exit.
    public func setMMIOReadValue(_ value: UInt64) {
        withUnsafeMutableBytes(of: &run.pointee.mmio.data) { bytes in
            for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        }
    }

    public func registers() throws(KVMError) -> kvm_regs {
        var regs = kvm_regs()
        _ = try kvmIoctl(fd.rawValue, hv_KVM_GET_REGS, &regs, "GET_REGS")
        return regs
    }

    public func setRegisters(_ regs: kvm_regs) throws(KVMError) {
        var regs = regs
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_REGS, &regs, "SET_REGS")
    }

    public func specialRegisters() throws(KVMError) -> kvm_sregs {
        var sregs = kvm_sregs()
        _ = try kvmIoctl(fd.rawValue, hv_KVM_GET_SREGS, &sregs, "GET_SREGS")
        return sregs
    }

    public func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError) {
        var sregs = sregs
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_SREGS, &sregs, "SET_SREGS")
    }

    /// This vCPU's halt statistics, read from any thread without a kick; nil on kernels without
    /// `KVM_GET_STATS_FD` or its `blocking` statistic.
    public func openStatistics() -> VCPUStatistics? { VCPUStatistics(vcpuFD: fd.rawValue) }

    /// KVM_MP_STATE_* of this vCPU (runnable, uninitialized, init-received, halted, sipi-received).
    public func mpState() throws(KVMError) -> UInt32 {
        var state = kvm_mp_state()
        _ = try kvmIoctl(fd.rawValue, hv_KVM_GET_MP_STATE, &state, "GET_MP_STATE")
        return state.mp_state
    }

    /// Installs the CPUID table, with this vCPU's APIC ID patched into leaves 0x1, 0xB and 0x1F.
    public func setCPUID(_ supported: [kvm_cpuid_entry2]) throws(KVMError) {
        var entries = supported
        for i in entries.indices {
            switch entries[i].function {
            case 0x1:
                entries[i].ebx = (entries[i].ebx & 0x00FF_FFFF) | (id << 24)
            case 0xB, 0x1F:
                entries[i].edx = id
            default:
                break
            }
        }
        let table = CPUIDTable(entries: entries)
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_CPUID2, table.raw, "SET_CPUID2")
    }
}

/// Delivers the kick signal that interrupts a vCPU thread blocked in KVM_RUN. The handler does
/// nothing; its only effect is that KVM_RUN returns EINTR.
public enum VCPUKicker {
    /// The signal hv uses to kick vCPU threads.
    public static let signal: Int32 = SIGUSR1

    /// Installs the empty handler (without SA_RESTART). Call once, before starting vCPU threads.
    public static func install() {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(signal, &action, nil)
    }

    /// Kicks `thread` (whose vCPU must already have `requestExit()` set, to close the race
    /// where the signal lands just before KVM_RUN).
    public static func kick(_ thread: pthread_t) { pthread_kill(thread, signal) }
}

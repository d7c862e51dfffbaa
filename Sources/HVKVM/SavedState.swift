import CHVShim
import Glibc
import HVSys

// Snapshot and restore of what KVM keeps: each vCPU's architectural state and the in-kernel
// platform (PIC, IOAPIC, PIT). The states are kept in the kernel's own binary layouts (the
// structures of <linux/kvm.h> for x86-64, fixed by the kernel's ABI), so hv saves exactly what
// KVM reports and gives it back unchanged; `VCPUSavedState.sizes` guards against a layout this
// build does not share.

/// One vCPU's state as KVM reports it, in the order a restore must apply it.
public struct VCPUSavedState: Sendable, Equatable {
    /// kvm_regs, kvm_sregs, kvm_xsave, kvm_xcrs, kvm_debugregs, kvm_lapic_state and
    /// kvm_vcpu_events, each as the kernel wrote it.
    public var regs: [UInt8], sregs: [UInt8], xsave: [UInt8], xcrs: [UInt8], debugRegisters: [UInt8], lapic: [UInt8], events: [UInt8]
    /// KVM_MP_STATE_* (runnable, halted, waiting for INIT/SIPI, …).
    public var mpState: UInt32
    /// Every MSR KVM lists as saveable that this vCPU could read: (index, value).
    public var msrs: [(index: UInt32, value: UInt64)]

    /// The byte sizes of the kernel structures above, in field order; a saved state whose sizes
    /// differ came from another architecture or kernel ABI and is refused.
    public static let sizes = [MemoryLayout<kvm_regs>.size, MemoryLayout<kvm_sregs>.size, MemoryLayout<kvm_xsave>.size,
                               MemoryLayout<kvm_xcrs>.size, MemoryLayout<kvm_debugregs>.size,
                               MemoryLayout<kvm_lapic_state>.size, MemoryLayout<kvm_vcpu_events>.size]

    public var blobs: [[UInt8]] { [regs, sregs, xsave, xcrs, debugRegisters, lapic, events] }

    public init(blobs: [[UInt8]], mpState: UInt32, msrs: [(index: UInt32, value: UInt64)]) {
        precondition(blobs.count == Self.sizes.count)
        (regs, sregs, xsave, xcrs, debugRegisters, lapic, events) = (blobs[0], blobs[1], blobs[2], blobs[3], blobs[4], blobs[5], blobs[6])
        self.mpState = mpState
        self.msrs = msrs
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.blobs == b.blobs && a.mpState == b.mpState && a.msrs.map(\.index) == b.msrs.map(\.index) && a.msrs.map(\.value) == b.msrs.map(\.value)
    }
}

/// The in-kernel platform: the two PICs and the IOAPIC (kvm_irqchip each) and the PIT
/// (kvm_pit_state2).
public struct PlatformSavedState: Sendable, Equatable {
    public var irqchips: [[UInt8]]
    public var pit: [UInt8]
    public static let irqchipSize = MemoryLayout<kvm_irqchip>.size
    public static let pitSize = MemoryLayout<kvm_pit_state2>.size
    public init(irqchips: [[UInt8]], pit: [UInt8]) {
        self.irqchips = irqchips
        self.pit = pit
    }
}

/// Reads a kernel structure of `size` bytes with `request`.
private func readStructure(_ fd: Int32, _ request: UInt, size: Int, prefill: [UInt8] = [], _ what: String) throws(KVMError) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: size)
    for (i, b) in prefill.enumerated() { bytes[i] = b }
    let r = bytes.withUnsafeMutableBytes { hv_ioctl_ptr(fd, request, $0.baseAddress) }
    if r < 0 { throw .ioctl(what, .current) }
    return bytes
}

/// Hands a kernel structure back with `request`, refusing one of the wrong size.
private func writeStructure(_ fd: Int32, _ request: UInt, _ bytes: [UInt8], size: Int, _ what: String) throws(KVMError) {
    guard bytes.count == size else { throw .invalidState("\(what): \(bytes.count) bytes saved, this kernel's structure has \(size)") }
    var copy = bytes
    let r = copy.withUnsafeMutableBytes { hv_ioctl_ptr(fd, request, $0.baseAddress) }
    if r < 0 { throw .ioctl(what, .current) }
}

extension KVM {
    /// The MSRs KVM can save and restore for a guest (KVM_GET_MSR_INDEX_LIST).
    public func saveableMSRs() throws(KVMError) -> [UInt32] {
        var count: UInt32 = 0
        // struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; }: asked with room for none, KVM
        // answers E2BIG and the count.
        var header = [UInt32](repeating: 0, count: 1)
        _ = header.withUnsafeMutableBytes { hv_ioctl_ptr(fd.rawValue, hv_KVM_GET_MSR_INDEX_LIST, $0.baseAddress) }
        count = header[0]
        guard count > 0, count < 65536 else { return [] }
        var list = [UInt32](repeating: 0, count: Int(count) + 1)
        list[0] = count
        let r = list.withUnsafeMutableBytes { hv_ioctl_ptr(fd.rawValue, hv_KVM_GET_MSR_INDEX_LIST, $0.baseAddress) }
        if r < 0 { throw .ioctl("GET_MSR_INDEX_LIST", .current) }
        return Array(list[1...Int(min(list[0], count))])
    }
}

extension VCPU {
    /// Reads everything KVM keeps for this vCPU. Call only while the vCPU is outside KVM_RUN
    /// (its thread parked), so the state is one instant's.
    public func saveState(msrIndices: [UInt32]) throws(KVMError) -> VCPUSavedState {
        let s = VCPUSavedState.sizes
        let raw = fd.rawValue
        let blobs = [
            try readStructure(raw, hv_KVM_GET_REGS, size: s[0], "GET_REGS on vCPU \(id)"),
            try readStructure(raw, hv_KVM_GET_SREGS, size: s[1], "GET_SREGS on vCPU \(id)"),
            try readStructure(raw, hv_KVM_GET_XSAVE, size: s[2], "GET_XSAVE on vCPU \(id)"),
            try readStructure(raw, hv_KVM_GET_XCRS, size: s[3], "GET_XCRS on vCPU \(id)"),
            try readStructure(raw, hv_KVM_GET_DEBUGREGS, size: s[4], "GET_DEBUGREGS on vCPU \(id)"),
            try readStructure(raw, hv_KVM_GET_LAPIC, size: s[5], "GET_LAPIC on vCPU \(id)"),
            try readStructure(raw, hv_KVM_GET_VCPU_EVENTS, size: s[6], "GET_VCPU_EVENTS on vCPU \(id)"),
        ]
        return VCPUSavedState(blobs: blobs, mpState: try mpState(), msrs: try readMSRs(msrIndices))
    }

    /// Gives this vCPU a saved state, in the order KVM needs (as Firecracker and QEMU apply it):
    /// the CPUID must already be set; MP state, registers, special registers (APIC base
    /// included), extended state, debug registers, then the local APIC, the MSRs (the TSC among
    /// them) and last the pending events. Call before the vCPU first runs.
    public func restoreState(_ state: VCPUSavedState) throws(KVMError) {
        let s = VCPUSavedState.sizes
        let raw = fd.rawValue
        var mp = kvm_mp_state(mp_state: state.mpState)
        _ = try kvmIoctl(raw, hv_KVM_SET_MP_STATE, &mp, "SET_MP_STATE on vCPU \(id)")
        try writeStructure(raw, hv_KVM_SET_REGS, state.regs, size: s[0], "SET_REGS on vCPU \(id)")
        try writeStructure(raw, hv_KVM_SET_SREGS, state.sregs, size: s[1], "SET_SREGS on vCPU \(id)")
        try writeStructure(raw, hv_KVM_SET_XSAVE, state.xsave, size: s[2], "SET_XSAVE on vCPU \(id)")
        try writeStructure(raw, hv_KVM_SET_XCRS, state.xcrs, size: s[3], "SET_XCRS on vCPU \(id)")
        try writeStructure(raw, hv_KVM_SET_DEBUGREGS, state.debugRegisters, size: s[4], "SET_DEBUGREGS on vCPU \(id)")
        try writeStructure(raw, hv_KVM_SET_LAPIC, state.lapic, size: s[5], "SET_LAPIC on vCPU \(id)")
        try writeMSRs(state.msrs)
        try writeStructure(raw, hv_KVM_SET_VCPU_EVENTS, state.events, size: s[6], "SET_VCPU_EVENTS on vCPU \(id)")
    }

    /// The guest TSC frequency KVM gives this vCPU, in kHz.
    public func tscKHz() throws(KVMError) -> UInt32 {
        UInt32(truncatingIfNeeded: try kvmIoctl(fd.rawValue, hv_KVM_GET_TSC_KHZ, value: 0, "GET_TSC_KHZ"))
    }

    /// Makes the guest's TSC tick at `khz` (TSC scaling), as on the host it was saved on.
    public func setTSCKHz(_ khz: UInt32) throws(KVMError) {
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_TSC_KHZ, value: UInt(khz), "SET_TSC_KHZ \(khz)")
    }

    // struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry { __u32 index; __u32
    // reserved; __u64 data; } entries[]; }: built as 64-bit words (header, then two per entry).

    /// Reads `indices`; KVM stops at the first MSR it cannot read, which is skipped.
    private func readMSRs(_ indices: [UInt32]) throws(KVMError) -> [(index: UInt32, value: UInt64)] {
        var result: [(index: UInt32, value: UInt64)] = []
        var rest = indices[...]
        while !rest.isEmpty {
            var words = [UInt64](repeating: 0, count: 1 + 2 * rest.count)
            words[0] = UInt64(rest.count)
            for (i, index) in rest.enumerated() { words[1 + 2 * i] = UInt64(index) }
            let r = words.withUnsafeMutableBytes { hv_ioctl_ptr(fd.rawValue, hv_KVM_GET_MSRS, $0.baseAddress) }
            if r < 0 { throw .ioctl("GET_MSRS on vCPU \(id)", .current) }
            let read = min(Int(r), rest.count)
            for i in 0..<read { result.append((UInt32(truncatingIfNeeded: words[1 + 2 * i]), words[2 + 2 * i])) }
            rest = rest.dropFirst(read + 1)  // the one after the last read failed: skip it
        }
        return result
    }

    /// Writes saved MSRs. One KVM refuses here (a feature this host's KVM lacks) fails the restore.
    private func writeMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        guard !msrs.isEmpty else { return }
        var words = [UInt64](repeating: 0, count: 1 + 2 * msrs.count)
        words[0] = UInt64(msrs.count)
        for (i, m) in msrs.enumerated() {
            words[1 + 2 * i] = UInt64(m.index)
            words[2 + 2 * i] = m.value
        }
        let r = words.withUnsafeMutableBytes { hv_ioctl_ptr(fd.rawValue, hv_KVM_SET_MSRS, $0.baseAddress) }
        if r < 0 { throw .ioctl("SET_MSRS on vCPU \(id)", .current) }
        if Int(r) < msrs.count {
            let m = msrs[Int(r)]
            throw .invalidState("this host's KVM refuses MSR 0x\(String(m.index, radix: 16)) = 0x\(String(m.value, radix: 16)) on vCPU \(id)")
        }
    }
}

extension VirtualMachine {
    /// The PICs, the IOAPIC and the PIT as KVM holds them.
    public func savePlatform() throws(KVMError) -> PlatformSavedState {
        var chips: [[UInt8]] = []
        for chip in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            // kvm_irqchip starts with its chip_id (u32), which selects what is read.
            let id = UInt32(chip)
            chips.append(try readStructure(fd.rawValue, hv_KVM_GET_IRQCHIP, size: PlatformSavedState.irqchipSize,
                                           prefill: [UInt8(id & 0xFF), 0, 0, 0], "GET_IRQCHIP \(chip)"))
        }
        let pit = try readStructure(fd.rawValue, hv_KVM_GET_PIT2, size: PlatformSavedState.pitSize, "GET_PIT2")
        return PlatformSavedState(irqchips: chips, pit: pit)
    }

    /// Gives the in-kernel platform a saved state (after `createPlatform`, before any vCPU runs).
    public func restorePlatform(_ state: PlatformSavedState) throws(KVMError) {
        guard state.irqchips.count == 3 else { throw .invalidState("the saved interrupt controllers are incomplete") }
        for (i, chip) in state.irqchips.enumerated() {
            guard chip.count >= 4, chip[0] == UInt8(i), chip[1...3].allSatisfy({ $0 == 0 }) else {
                throw .invalidState("saved interrupt controller \(i) names another chip")
            }
            try writeStructure(fd.rawValue, hv_KVM_SET_IRQCHIP, chip, size: PlatformSavedState.irqchipSize, "SET_IRQCHIP \(i)")
        }
        try writeStructure(fd.rawValue, hv_KVM_SET_PIT2, state.pit, size: PlatformSavedState.pitSize, "SET_PIT2")
    }
}

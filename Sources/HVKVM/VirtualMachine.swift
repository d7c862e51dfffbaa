import CHVShim
import Glibc
import HVSys

/// A KVM virtual machine: memory slots, the in-kernel irqchip and PIT, irqfds, ioeventfds, vCPUs.
public final class VirtualMachine: Sendable {
    let fd: FileDescriptor
    let kvm: KVM

    init(fd: FileDescriptor, kvm: KVM) {
        self.fd = fd
        self.kvm = kvm
    }

    /// The addresses KVM needs for its real-mode TSS (3 pages) and identity-map page on Intel;
    /// placed just below the BIOS area at the top of 4 GiB, as other VMMs do.
    public static let tssAddress: UInt64 = 0xFFFB_D000
    public static let identityMapAddress: UInt64 = 0xFFFB_C000

    /// Sets up the platform pieces that live in the kernel: TSS, identity map, irqchip (PIC, IOAPIC,
    /// LAPICs) and PIT.
    public func createPlatform() throws(KVMError) {
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_TSS_ADDR, value: UInt(Self.tssAddress), "SET_TSS_ADDR")
        var identity = Self.identityMapAddress
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_IDENTITY_MAP_ADDR, &identity, "SET_IDENTITY_MAP_ADDR")
        _ = try kvmIoctl(fd.rawValue, hv_KVM_CREATE_IRQCHIP, value: 0, "CREATE_IRQCHIP")
        var pit = kvm_pit_config()
        pit.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)
        _ = try kvmIoctl(fd.rawValue, hv_KVM_CREATE_PIT2, &pit, "CREATE_PIT2")
    }

    /// Maps host memory at `hostAddress` into the guest at `guestAddress`.
    public func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UnsafeMutableRawPointer, readOnly: Bool = false) throws(KVMError) {
        var region = kvm_userspace_memory_region(slot: slot, flags: readOnly ? UInt32(KVM_MEM_READONLY) : 0,
                                                 guest_phys_addr: guestAddress, memory_size: size,
                                                 userspace_addr: UInt64(UInt(bitPattern: hostAddress)))
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_USER_MEMORY_REGION, &region, "SET_USER_MEMORY_REGION slot \(slot)")
    }

    /// Wires an eventfd to a GSI: each signal injects an edge on that interrupt line.
    public func registerIRQFD(_ eventfd: EventFD, gsi: UInt32) throws(KVMError) {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(eventfd.fd.rawValue)
        irqfd.gsi = gsi
        _ = try kvmIoctl(fd.rawValue, hv_KVM_IRQFD, &irqfd, "IRQFD gsi \(gsi)")
    }

    /// Sets an interrupt line's level (in-kernel PIC/IOAPIC).
    public func setIRQLine(_ irq: UInt32, level: Bool) throws(KVMError) {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        _ = try kvmIoctl(fd.rawValue, hv_KVM_IRQ_LINE, &line, "IRQ_LINE \(irq)")
    }

    /// Creates vCPU `id` and maps its kvm_run area.
    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let raw = try kvmIoctl(fd.rawValue, hv_KVM_CREATE_VCPU, value: UInt(id), "CREATE_VCPU \(id)")
        let vcpuFD = FileDescriptor(owning: raw)
        let size = try kvm.vcpuMapSize()
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, raw, 0)
        guard let p, p != MAP_FAILED else { throw .ioctl("mmap kvm_run of vCPU \(id)", .current) }
        return VCPU(id: id, fd: vcpuFD, run: p, runSize: size)
    }
}

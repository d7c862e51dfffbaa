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

    /// Sends a copy of the VM's descriptor over `socket`. KVM destroys a VM when its last
    /// descriptor (and every vCPU's) closes, which waits out grace periods, the in-kernel PIT's
    /// worker (~16 ms measured here) among them; a process that holds the copy moves that wait
    /// to its own close. Only trusted hv processes may get it: it is full control of the VM.
    public func lend(through socket: SeqPacketSocket) throws(SystemError) {
        try socket.send(Array("kvm-vm".utf8), fds: [fd.rawValue])
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
    /// With `logDirty`, KVM records every page the vCPUs write (see `takeDirtyLog`); setting a
    /// slot again with the same addresses switches the log on or off while the guest runs.
    public func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UnsafeMutableRawPointer, readOnly: Bool = false,
                                logDirty: Bool = false) throws(KVMError) {
        let flags = (readOnly ? UInt32(KVM_MEM_READONLY) : 0) | (logDirty ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0)
        var region = kvm_userspace_memory_region(slot: slot, flags: flags,
                                                 guest_phys_addr: guestAddress, memory_size: size,
                                                 userspace_addr: UInt64(UInt(bitPattern: hostAddress)))
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_USER_MEMORY_REGION, &region, "SET_USER_MEMORY_REGION slot \(slot)")
    }

    /// Pays the fixed cost of a VM's first memory slot now: a VM's first
    /// `KVM_SET_USER_MEMORY_REGION` waits 5–14 ms in the kernel on this host (almost no CPU; later
    /// ones take ~0.1 ms), so one page is mapped as slot 0 at guest address 0 and deleted again.
    /// Call before any slot exists; `scratchPage` must stay mapped for the call's duration.
    public func warmUpMemorySlots(scratchPage: UnsafeMutableRawPointer) throws(KVMError) {
        try setMemoryRegion(slot: 0, guestAddress: 0, size: 4096, hostAddress: scratchPage)
        try setMemoryRegion(slot: 0, guestAddress: 0, size: 0, hostAddress: scratchPage)
    }

    /// The pages of slot `slot` (`pages` of them) the vCPUs wrote since logging began or since
    /// the last call, one bit per page, in 64-bit words; KVM clears its log and write-protects
    /// those pages again, so the next call reports only newer writes.
    public func takeDirtyLog(slot: UInt32, pages: Int) throws(KVMError) -> [UInt64] {
        var words = [UInt64](repeating: 0, count: (pages + 63) / 64)
        let rc = words.withUnsafeMutableBytes { hv_kvm_get_dirty_log(fd.rawValue, slot, $0.baseAddress) }
        if rc < 0 { throw .ioctl("GET_DIRTY_LOG slot \(slot)", .current) }
        return words
    }

    /// Wires an eventfd to a GSI: each signal injects an edge on that interrupt line.
    public func registerIRQFD(_ eventfd: EventFD, gsi: UInt32) throws(KVMError) {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(eventfd.fd.rawValue)
        irqfd.gsi = gsi
        _ = try kvmIoctl(fd.rawValue, hv_KVM_IRQFD, &irqfd, "IRQFD gsi \(gsi)")
    }

    /// Registers (`assign`) or removes a doorbell: a guest write of `length` bytes (0: any width,
    /// MMIO only) at `address` signals `eventfd` inside KVM, without an exit to userspace. Removal
    /// must repeat the registration's parameters.
    public func setIOEventFD(_ eventfd: EventFD, address: UInt64, length: UInt32, pio: Bool, assign: Bool) throws(KVMError) {
        var request = kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = eventfd.fd.rawValue
        var flags: UInt32 = 0
        // enum kvm_ioeventfd_flag_nr: datamatch 0, pio 1, deassign 2 (an anonymous C enum).
        if pio { flags |= 1 << 1 }
        if !assign { flags |= 1 << 2 }
        request.flags = flags
        let what = "IOEVENTFD \(assign ? "assign" : "deassign") \(pio ? "port" : "address") 0x\(String(address, radix: 16))"
        _ = try kvmIoctl(fd.rawValue, hv_KVM_IOEVENTFD, &request, what)
    }

    /// One message-signalled interrupt route: GSI `gsi` delivers the MSI (`address`, `data`).
    public struct MSIRoute: Sendable, Equatable {
        public var gsi: UInt32
        public var address: UInt64
        public var data: UInt32
        public init(gsi: UInt32, address: UInt64, data: UInt32) {
            self.gsi = gsi
            self.address = address
            self.data = data
        }
    }

    /// GSIs 0–23 belong to the in-kernel PIC and IOAPIC; message-signalled routes start here.
    public static let firstMSIGSI: UInt32 = 24

    /// Replaces KVM's GSI routing table with the PC's irqchip routes — the same table KVM
    /// installs with the irqchip (GSI 0–15 to the PIC and the IOAPIC pin of the same number,
    /// 16–23 to the IOAPIC) — plus `msi`. KVM takes the whole table each time.
    public func setGSIRouting(msi: [MSIRoute]) throws(KVMError) {
        // struct kvm_irq_routing { u32 nr; u32 flags; struct kvm_irq_routing_entry entries[]; },
        // each entry { u32 gsi, type, flags, pad; union (32 bytes) }: built as bytes, since the
        // flexible array and the union do not import into Swift as usable types.
        let entrySize = MemoryLayout<kvm_irq_routing_entry>.size
        let headerSize = MemoryLayout<kvm_irq_routing>.size
        var entries: [(gsi: UInt32, type: UInt32, words: [UInt32])] = []
        for gsi in UInt32(0)..<24 {
            if gsi < 16 { entries.append((gsi, UInt32(KVM_IRQ_ROUTING_IRQCHIP), [gsi < 8 ? UInt32(KVM_IRQCHIP_PIC_MASTER) : UInt32(KVM_IRQCHIP_PIC_SLAVE), gsi % 8])) }
            entries.append((gsi, UInt32(KVM_IRQ_ROUTING_IRQCHIP), [UInt32(KVM_IRQCHIP_IOAPIC), gsi]))
        }
        for route in msi {
            entries.append((route.gsi, UInt32(KVM_IRQ_ROUTING_MSI),
                            [UInt32(truncatingIfNeeded: route.address), UInt32(truncatingIfNeeded: route.address >> 32), route.data]))
        }
        var bytes = [UInt8](repeating: 0, count: headerSize + entrySize * entries.count)
        func put(_ value: UInt32, _ at: Int) { for i in 0..<4 { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) } }
        put(UInt32(entries.count), 0)
        for (i, e) in entries.enumerated() {
            let base = headerSize + i * entrySize
            put(e.gsi, base)
            put(e.type, base + 4)
            for (j, w) in e.words.enumerated() { put(w, base + 16 + 4 * j) }
        }
        let rc = bytes.withUnsafeMutableBytes { hv_ioctl_ptr(fd.rawValue, hv_KVM_SET_GSI_ROUTING, $0.baseAddress) }
        if rc < 0 { throw .ioctl("SET_GSI_ROUTING (\(entries.count) routes)", .current) }
    }

    /// Sets an interrupt line's level (in-kernel PIC/IOAPIC).
    public func setIRQLine(_ irq: UInt32, level: Bool) throws(KVMError) {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        _ = try kvmIoctl(fd.rawValue, hv_KVM_IRQ_LINE, &line, "IRQ_LINE \(irq)")
    }

    /// The guest's kvmclock (nanoseconds), as KVM_GET_CLOCK reads it.
    public func clock() throws(KVMError) -> UInt64 {
        var data = kvm_clock_data()
        _ = try kvmIoctl(fd.rawValue, hv_KVM_GET_CLOCK, &data, "GET_CLOCK")
        return data.clock
    }

    /// Sets the guest's kvmclock to `nanoseconds` (KVM_SET_CLOCK): after a pause, the guest's
    /// clock carries on from where it stopped, as QEMU's `cont` does.
    public func setClock(_ nanoseconds: UInt64) throws(KVMError) {
        var data = kvm_clock_data()
        data.clock = nanoseconds
        _ = try kvmIoctl(fd.rawValue, hv_KVM_SET_CLOCK, &data, "SET_CLOCK")
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

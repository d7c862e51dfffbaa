import Glibc
import HVIPC
import HVKVM
import HVSys

/// Guest RAM: one memfd, mapped once here and once in each device that needs it. Below 4 GiB the
/// PC needs a hole for MMIO and firmware, so RAM above `lowLimit` continues at 4 GiB.
public final class GuestRAM: Sendable {
    /// Where low RAM stops (3 GiB, leaving [3 GiB, 4 GiB) for MMIO, the LAPIC/IOAPIC and the BIOS).
    public static let lowLimit: UInt64 = 0xC000_0000
    /// The memfd devices map.
    public let memfd: FileDescriptor
    let mapping: SharedMapping
    /// The guest-physical layout, in the form HELLO carries it.
    public let regions: [MemoryRegion]
    /// Total bytes.
    public let size: UInt64

    /// The most guest RAM a VM may have: 4 PiB, the VM definition's own limit (2^32 MiB).
    public static let maximumBytes: UInt64 = 1 << 52

    /// Refuses a size no VM can have (zero, not whole pages, past `maximumBytes`): the size can
    /// come from a snapshot file or a migration source, not only from a checked definition.
    init(size: UInt64) throws(CoreError) {
        guard size > 0, size % Self.pageSize == 0, size <= Self.maximumBytes else {
            throw .configuration("guest memory of \(size) bytes is impossible: it must be whole 4 KiB pages, from 4 KiB to 4 PiB")
        }
        self.size = size
        do {
            memfd = try MemFD.create(name: "hv-guest-ram", size: Int(size))
            mapping = try SharedMapping(fd: memfd, count: Int(size))
        } catch { throw .system(error) }
        let low = min(size, Self.lowLimit)
        var regions = [MemoryRegion(guestPhysicalAddress: 0, size: low, memfdOffset: 0)]
        if size > low {
            regions.append(MemoryRegion(guestPhysicalAddress: 1 << 32, size: size - low, memfdOffset: low))
        }
        self.regions = regions
    }

    /// Bytes of host memory the guest's RAM takes now: the memfd's allocated pages. Pages the
    /// guest never touched, and pages a balloon gave back, take none.
    public var hostBytes: UInt64 {
        var st = stat()
        guard fstat(memfd.rawValue, &st) == 0 else { return 0 }
        return UInt64(max(st.st_blocks, 0)) * 512
    }

    func register(with vm: VirtualMachine) throws(KVMError) {
        for (slot, r) in regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: r.guestPhysicalAddress, size: r.size,
                                   hostAddress: mapping.base + Int(r.memfdOffset))
        }
    }
}

import HVKVM
import HVSys

/// A KVM VM with its platform, made ahead, and the fixed cost of its first memory slot paid
/// meanwhile on a thread of its own (a VM's first `KVM_SET_USER_MEMORY_REGION` waits 5–14 ms in
/// the kernel here; see `VirtualMachine.warmUpMemorySlots`). `hvctl run --incoming` makes one
/// while it waits for the source, and the arriving VM's `Machine` takes it over
/// (`IncomingMigration.preparedVM`), so neither cost lands on the migration, nor in its pause;
/// any other `hvctl run` makes one as soon as it has its cgroups (`Configuration.preparedVM`),
/// so the wait is over before its devices have started.
public final class PreparedVM: Sendable {
    let kvm: KVM
    let vm: VirtualMachine
    /// The page the warm-up slot maps (a sealed memfd: the audited way hv maps memory).
    private let scratch: SharedMapping
    /// The warm-up, which the machine waits for before it registers its own slots.
    let warmUp: MemorySlotRegistration

    /// Opens KVM, makes the VM and its platform, and starts the warm-up.
    public init() throws(CoreError) {
        do {
            kvm = try KVM()
            vm = try kvm.createVM()
            try vm.createPlatform()
        } catch { throw .kvm(error) }
        do { scratch = try SharedMapping(fd: try MemFD.create(name: "hv-slot-warm-up", size: 4096), count: 4096) } catch {
            throw .system(error)
        }
        warmUp = MemorySlotRegistration.start { [vm, scratch] () throws(KVMError) in
            try vm.warmUpMemorySlots(scratchPage: scratch.base)
        }
    }
}

import CHVShim
import Glibc
import HVIPC
import HVKVM
import HVSys

/// The destination side of a live migration (`hvctl run --incoming`): reads the source's header,
/// accepts or refuses, receives guest memory into RAM while the source runs, then the machine
/// state; the host layer builds the VM from them (paused), says READY, and runs it on GO.
public final class IncomingMigration: @unchecked Sendable {
    // @unchecked: used by one thread at a time (hvctl's main thread).
    public let channel: MigrationChannel
    public private(set) var hello: MigrationHello?
    /// The RAM the memory went into; `Machine` takes it over (`Configuration.incomingRAM`).
    public private(set) var ram: GuestRAM?
    /// Whether the operator had paused the VM on the source (it then stays paused here).
    public private(set) var sourcePaused = false

    /// A VM made while the destination waited (see `PreparedVM`), which the arriving machine
    /// takes over; nil builds one then.
    private var preparedVM: PreparedVM?

    public init(channel: MigrationChannel, preparedVM: PreparedVM? = nil) {
        self.channel = channel
        self.preparedVM = preparedVM
    }

    /// The prepared VM, handed over once.
    func takePreparedVM() -> PreparedVM? {
        defer { preparedVM = nil }
        return preparedVM
    }

    /// Reads the source's header (the version is checked here; a mismatch is refused at once).
    public func receiveHello() throws(MigrationError) -> MigrationHello {
        let payload = try channel.receive(.hello, timeoutSeconds: 60, peer: "source")
        let decoded: MigrationHello
        do throws(MigrationError) { decoded = try MigrationHello.decode(payload) } catch {
            channel.refuse(error.description)
            throw error
        }
        hello = decoded
        return decoded
    }

    /// Whether this host's CPU offers what the guest saw; refuses (and throws) if not.
    public func checkCPU() throws(MigrationError) {
        guard let hello else { return }
        let supported: [kvm_cpuid_entry2]
        do { supported = try KVM().supportedCPUID() } catch { throw refusing("cannot read this host's CPUID: \(error)") }
        let missing = MachineSnapshot.missingFeatures(saved: hello.cpuid, host: supported)
        guard missing.isEmpty else {
            throw refusing("the destination's CPU lacks features the guest uses: \(missing.prefix(8).joined(separator: ", "))\(missing.count > 8 ? ", …" : "")")
        }
    }

    /// Refuses the migration with `reason` and returns the error to throw here.
    public func refusing(_ reason: String) -> MigrationError {
        channel.refuse(reason)
        return MigrationError(reason)
    }

    /// Allocates the VM's RAM, which the memory is received into (a `Machine` built before
    /// `accept` takes it over); refuses the migration if it cannot.
    public func allocateMemory() throws(MigrationError) {
        guard let hello else { throw MigrationError("no migration header was received") }
        guard ram == nil else { return }
        do throws(CoreError) { ram = try GuestRAM(size: hello.memoryBytes) } catch {
            throw refusing("the destination cannot allocate \(hello.memoryBytes >> 20) MiB of guest memory: \(error)")
        }
    }

    /// Accepts the VM (allocating its RAM if `allocateMemory` was not called) and says so: the
    /// source starts sending memory.
    public func accept() throws(MigrationError) {
        try allocateMemory()
        try channel.send(.accept, MigrationChannel.versionStamp())
    }

    /// Receives memory until the machine state and the source's HANDOVER have arrived; returns
    /// the state (its `host` is the VM's definition). `progress` gets the bytes received so far.
    public func receiveMemoryAndState(progress: (UInt64) -> Void = { _ in }) throws(MigrationError) -> MachineSnapshot {
        guard let ram else { throw MigrationError("accept() first") }
        var received: UInt64 = 0
        var state: MachineSnapshot?
        while true {
            let (type, payload) = try channel.receive(timeoutSeconds: MigrationChannel.stallSeconds * 6, peer: "source")
            received += UInt64(payload.count + MigrationChannel.headerSize)
            switch type {
            case .pages:
                guard payload.count > 8, (payload.count - 8) % Int(GuestRAM.pageSize) == 0 else {
                    throw refusing("the source sent a pages frame of \(payload.count) bytes, not whole pages")
                }
                var r = WireReader(payload)
                let offset = (try? r.u64()) ?? UInt64.max
                let length = UInt64(payload.count - 8)
                guard offset % GuestRAM.pageSize == 0, offset <= ram.size, length <= ram.size - offset else {
                    throw refusing("the source sent pages at 0x\(String(offset, radix: 16)), outside guest memory")
                }
                payload.withUnsafeBytes { (ram.mapping.base + Int(offset)).copyMemory(from: $0.baseAddress! + 8, byteCount: Int(length)) }
            case .zeroes:
                var r = WireReader(payload)
                guard let offset = try? r.u64(), let length = try? r.u64(), (try? r.finish()) != nil,
                      offset % GuestRAM.pageSize == 0, length % GuestRAM.pageSize == 0, offset <= ram.size, length <= ram.size - offset else {
                    throw refusing("the source sent a malformed zeroes frame")
                }
                (ram.mapping.base + Int(offset)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(length))
            case .state:
                guard let flag = payload.first else { throw refusing("the source sent an empty machine state") }
                do throws(SnapshotError) {
                    state = try MachineSnapshot.decodeState(Array(payload.dropFirst()), name: "the migration stream")
                } catch {
                    throw refusing(error.description)
                }
                sourcePaused = flag == 1
            case .handover:
                guard let state else { throw refusing("the source handed over before sending the machine state") }
                guard state.memoryBytes == ram.size, state.cpus == hello?.cpus else {
                    throw refusing("the machine state does not match the header (memory or vCPUs)")
                }
                return state
            default:
                throw refusing("the source sent \(type) while memory was being copied")
            }
            progress(received)
        }
    }

    /// Tells the source the VM is built and waits for GO (at most `timeoutSeconds`); after GO
    /// the caller resumes the VM and calls `confirm()`.
    public func readyAndWaitForGo(timeoutSeconds: Int = 30) throws(MigrationError) {
        try channel.send(.ready)
        _ = try channel.receive(.go, timeoutSeconds: timeoutSeconds, peer: "source")
    }

    /// Tells the source the guest runs here; it then ends its copy.
    public func confirm() {
        try? channel.send(.done)
        channel.close()
    }
}

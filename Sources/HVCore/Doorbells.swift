import HVIPC
import HVKVM
import HVSys
import Synchronization

/// Doorbells (KVM ioeventfds) that device processes asked for with ADD_DOORBELL: a guest write to
/// one register (a virtio queue notification, say) signals an eventfd inside KVM, so neither the
/// core nor the register ring sees it. The core owns each eventfd for the life of the VM; a
/// restarted device asking again gets the same one.
///
/// A doorbell on a PCI BAR follows the BAR: when the guest moves it, or turns decoding off, the
/// registration moves with it (`resourceMoved`).
final class DoorbellTable: @unchecked Sendable {
    // @unchecked: all mutable state is under `state`.

    /// Doorbells one device may hold.
    static let perDeviceLimit = 64

    struct Doorbell {
        let endpoint: ObjectIdentifier
        let resource: UInt16
        let offset: UInt64
        let length: UInt32
        let pio: Bool
        let eventfd: EventFD
        /// The guest address it is registered at now (nil: not registered).
        var bound: UInt64?
    }

    private let state = Mutex<[Doorbell]>([])
    private let vm: VirtualMachine
    /// Where a resource of a device sits in the guest's address space now (nil: nowhere).
    private let locate: @Sendable (DeviceEndpoint, UInt16) -> UInt64?
    private let verbose: Bool

    init(vm: VirtualMachine, verbose: Bool, locate: @escaping @Sendable (DeviceEndpoint, UInt16) -> UInt64?) {
        self.vm = vm
        self.verbose = verbose
        self.locate = locate
    }

    /// The doorbell for `request` on `endpoint`, whose resource `request.resource` is `resource`:
    /// created and registered on first use, the same one afterwards.
    func add(_ request: DoorbellRequest, resource: Resource, endpoint: DeviceEndpoint) throws(DoorbellError) -> EventFD {
        let pio: Bool
        switch resource.kind {
        case .pio, .pciPIOBar: pio = true
        case .mmio, .pciMMIOBar: pio = false
        case .pciConfig: throw .invalid("resource \(request.resource) is PCI configuration space, which has no doorbells")
        }
        guard [0, 1, 2, 4, 8].contains(request.length) else { throw .invalid("width \(request.length) is not 0, 1, 2, 4 or 8") }
        guard !(pio && request.length == 0) else { throw .invalid("a port doorbell needs a width") }
        let width = UInt64(max(request.length, 1))
        guard UInt64(request.offset) + width <= resource.length else {
            throw .invalid("offset 0x\(String(request.offset, radix: 16)) (+\(width)) is past the end of resource \(request.resource)")
        }
        let id = ObjectIdentifier(endpoint)
        let index = UInt16(request.resource)
        return try state.withLock { (doorbells) throws(DoorbellError) -> EventFD in
            if let existing = doorbells.first(where: {
                $0.endpoint == id && $0.resource == index && $0.offset == UInt64(request.offset) && $0.length == request.length
            }) {
                return existing.eventfd
            }
            guard doorbells.filter({ $0.endpoint == id }).count < Self.perDeviceLimit else {
                throw .invalid("the device already has \(Self.perDeviceLimit) doorbells")
            }
            let eventfd: EventFD
            do { eventfd = try EventFD(nonBlocking: true) } catch { throw .failed("\(error)") }
            var doorbell = Doorbell(endpoint: id, resource: index, offset: UInt64(request.offset), length: request.length,
                                    pio: pio, eventfd: eventfd, bound: nil)
            // Looked up under the lock: a BAR move racing with this waits for it, then rebinds.
            if let base = locate(endpoint, index) {
                do { try bind(&doorbell, at: base + doorbell.offset) } catch { throw .failed("\(error)") }
            }
            if verbose { report(doorbell, endpoint) }
            doorbells.append(doorbell)
            return eventfd
        }
    }

    /// Moves every doorbell on `endpoint`'s resource `resource` to `base` (nil: unregisters them).
    func resourceMoved(endpoint: DeviceEndpoint, resource: UInt16, base: UInt64?) {
        let id = ObjectIdentifier(endpoint)
        state.withLock { doorbells in
            for i in doorbells.indices where doorbells[i].endpoint == id && doorbells[i].resource == resource {
                let target = base.map { $0 + doorbells[i].offset }
                guard target != doorbells[i].bound else { continue }
                do {
                    try unbind(&doorbells[i])
                    if let target { try bind(&doorbells[i], at: target) }
                    if verbose { report(doorbells[i], endpoint) }
                } catch {
                    // The register still works through the core and the ring, only slower.
                    Diagnostics.line("\(endpoint.name): doorbell at offset 0x\(String(doorbells[i].offset, radix: 16)) not moved: \(error)")
                }
            }
        }
    }

    private func report(_ d: Doorbell, _ endpoint: DeviceEndpoint) {
        let place = d.bound.map { "at \(d.pio ? "port" : "address") 0x\(String($0, radix: 16))" } ?? "not mapped"
        Diagnostics.line("\(endpoint.name): doorbell at offset 0x\(String(d.offset, radix: 16)) of resource \(d.resource) \(place)")
    }

    private func bind(_ d: inout Doorbell, at address: UInt64) throws(KVMError) {
        try vm.setIOEventFD(d.eventfd, address: address, length: d.length, pio: d.pio, assign: true)
        d.bound = address
    }

    private func unbind(_ d: inout Doorbell) throws(KVMError) {
        guard let address = d.bound else { return }
        d.bound = nil
        try vm.setIOEventFD(d.eventfd, address: address, length: d.length, pio: d.pio, assign: false)
    }
}

/// Why a doorbell or an MSI route was refused; `invalid` is the device's mistake, `failed` the host's.
enum DoorbellError: Error, CustomStringConvertible {
    case invalid(String)
    case failed(String)
    var description: String {
        switch self {
        case .invalid(let why), .failed(let why): return why
        }
    }
    var status: Status {
        switch self {
        case .invalid: return .invalidArgument
        case .failed: return .internalError
        }
    }
}

/// Message-signalled interrupt routes (MSI-X) of every device: one GSI and one irqfd per device
/// vector, kept for the life of the VM, and KVM's GSI routing table rebuilt from them.
final class MSIRouter: @unchecked Sendable {
    // @unchecked: all mutable state is under `state`.

    /// Vectors one device may route.
    static let perDeviceLimit = 256
    /// All message-signalled GSIs of the VM (KVM allows 4096 routes on x86, the irqchip uses 40).
    static let gsiLimit: UInt32 = 2048

    private struct Key: Hashable {
        let endpoint: ObjectIdentifier
        let vector: UInt32
    }
    private struct Vector {
        let gsi: UInt32
        let eventfd: EventFD
        var message: (address: UInt64, data: UInt32)?
    }
    private struct State {
        var vectors: [Key: Vector] = [:]
        var nextGSI = VirtualMachine.firstMSIGSI
    }
    private let state = Mutex(State())
    private let vm: VirtualMachine

    init(vm: VirtualMachine) { self.vm = vm }

    /// Applies `route` for `endpoint`. Returns the vector's irqfd when the route is enabled.
    func apply(_ route: MSIRoute, endpoint: DeviceEndpoint) throws(DoorbellError) -> EventFD? {
        guard route.vector < HVIPC.MSIRoute.vectorLimit else { throw .invalid("vector \(route.vector) is past 2047") }
        if route.enabled {
            // The local APIC window with an xAPIC destination: anything else is not an MSI on a PC.
            guard route.address & 0xFFFF_FFFF_FFF0_0000 == 0xFEE0_0000 else {
                throw .invalid("address 0x\(String(route.address, radix: 16)) is not in the local APIC window 0xFEE00000")
            }
        } else {
            guard route.address == 0, route.data == 0 else { throw .invalid("a MASKED route carries no message") }
        }
        let key = Key(endpoint: ObjectIdentifier(endpoint), vector: route.vector)
        return try state.withLock { (s) throws(DoorbellError) -> EventFD? in
            if s.vectors[key] == nil {
                guard route.enabled else { return nil }  // masking a vector never routed: nothing to do
                guard s.vectors.keys.filter({ $0.endpoint == key.endpoint }).count < Self.perDeviceLimit else {
                    throw .invalid("the device already routes \(Self.perDeviceLimit) vectors")
                }
                guard s.nextGSI < VirtualMachine.firstMSIGSI + Self.gsiLimit else { throw .failed("the VM has no free GSI left") }
                let eventfd: EventFD
                do {
                    eventfd = try EventFD(nonBlocking: true)
                    try vm.registerIRQFD(eventfd, gsi: s.nextGSI)
                } catch { throw .failed("\(error)") }
                s.vectors[key] = Vector(gsi: s.nextGSI, eventfd: eventfd, message: nil)
                s.nextGSI += 1
            }
            let previous = s.vectors[key]!.message
            s.vectors[key]!.message = route.enabled ? (route.address, route.data) : nil
            if previous?.address != s.vectors[key]!.message?.address || previous?.data != s.vectors[key]!.message?.data {
                let routes = s.vectors.values.compactMap { v in
                    v.message.map { VirtualMachine.MSIRoute(gsi: v.gsi, address: $0.address, data: $0.data) }
                }
                do { try vm.setGSIRouting(msi: routes.sorted { $0.gsi < $1.gsi }) } catch {
                    s.vectors[key]!.message = previous
                    throw .failed("\(error)")
                }
            }
            return route.enabled ? s.vectors[key]!.eventfd : nil
        }
    }
}

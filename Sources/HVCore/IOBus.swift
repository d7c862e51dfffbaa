import HVIPC
import Synchronization

/// Routes guest port and MMIO accesses to the device that registered the range. The core
/// routes; it never interprets what a device's registers mean. Ports 0xCF8–0xCFF go to the PCI
/// host (`pciHost`), which is the core's own.
final class IOBus: @unchecked Sendable {
    // @unchecked: the route tables are under `routes`; `pciHost` is set once before the vCPUs start.
    struct Route {
        let base: UInt64
        let length: UInt64
        let endpoint: DeviceEndpoint
        let resource: UInt16
    }
    private struct Tables {
        var pio: [Route] = []
        var mmio: [Route] = []
    }
    // Fixed ranges are added before the vCPUs start; PCI BARs move while they run.
    private let routes = Mutex(Tables())
    var pciHost: PCIBus?

    func add(_ kind: Resource.Kind, base: UInt64, length: UInt64, endpoint: DeviceEndpoint, resource: UInt16) throws(CoreError) {
        try routes.withLock { t throws(CoreError) in
            let list = kind == .pio ? t.pio : t.mmio
            let clash = list.first { ResourceClaims.overlap(base, length, $0.base, $0.length) }
            try ResourceClaims.claimRange(kind, base: base, length: length, by: endpoint.name, owner: clash?.endpoint.name)
            let route = Route(base: base, length: length, endpoint: endpoint, resource: resource)
            if kind == .pio { t.pio.append(route) } else { t.mmio.append(route) }
        }
    }

    /// Drops the route of `endpoint`'s `resource`, if it has one.
    func remove(_ kind: Resource.Kind, endpoint: DeviceEndpoint, resource: UInt16) {
        routes.withLock { t in
            if kind == .pio {
                t.pio.removeAll { $0.endpoint === endpoint && $0.resource == resource }
            } else {
                t.mmio.removeAll { $0.endpoint === endpoint && $0.resource == resource }
            }
        }
    }

    /// Whether no MMIO route overlaps [base, base + length).
    func mmioIsFree(base: UInt64, length: UInt64) -> Bool {
        routes.withLock { t in !t.mmio.contains { base < $0.base + $0.length && $0.base < base + length } }
    }

    private func find(_ kind: Resource.Kind, _ address: UInt64, _ size: Int) -> Route? {
        routes.withLock { t in
            for r in (kind == .pio ? t.pio : t.mmio) where address >= r.base && address - r.base < r.length {
                // An access straddling the end of a range belongs to nobody, as on a real bus.
                return UInt64(size) <= r.length - (address - r.base) ? r : nil
            }
            return nil
        }
    }

    /// Unclaimed reads float high, as on a PC's ISA bus.
    private static func unclaimed(_ size: Int) -> UInt64 { size >= 8 ? ~0 : (1 << (UInt64(size) * 8)) - 1 }

    func pioRead(port: UInt16, size: Int, vcpu: UInt32) -> UInt64 {
        if let host = pciHost, host.handles(port: port, size: size) { return host.pioRead(port: port, size: size, vcpu: vcpu) }
        guard let r = find(.pio, UInt64(port), size) else { return Self.unclaimed(size) }
        return r.endpoint.read(.pioRead, resource: r.resource, offset: UInt64(port) - r.base, size: size, vcpu: vcpu)
    }

    func pioWrite(port: UInt16, size: Int, value: UInt64, vcpu: UInt32) {
        if let host = pciHost, host.handles(port: port, size: size) { return host.pioWrite(port: port, size: size, value: value, vcpu: vcpu) }
        guard let r = find(.pio, UInt64(port), size) else { return }
        r.endpoint.write(.pioWrite, resource: r.resource, offset: UInt64(port) - r.base, size: size, value: value, vcpu: vcpu)
    }

    func mmioRead(address: UInt64, size: Int, vcpu: UInt32) -> UInt64 {
        guard let r = find(.mmio, address, size) else { return Self.unclaimed(size) }
        return r.endpoint.read(.mmioRead, resource: r.resource, offset: address - r.base, size: size, vcpu: vcpu)
    }

    func mmioWrite(address: UInt64, size: Int, value: UInt64, vcpu: UInt32) {
        guard let r = find(.mmio, address, size) else { return }
        r.endpoint.write(.mmioWrite, resource: r.resource, offset: address - r.base, size: size, value: value, vcpu: vcpu)
    }
}

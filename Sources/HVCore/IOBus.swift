import HVIPC

/// Routes guest port and MMIO accesses to the device that registered the range. The core
/// routes; it never interprets what a device's registers mean.
final class IOBus: @unchecked Sendable {
    // @unchecked: built before the vCPUs start, read-only afterwards.
    struct Route {
        let base: UInt64
        let length: UInt64
        let endpoint: DeviceEndpoint
        let resource: UInt16
    }
    private var pio: [Route] = []
    private var mmio: [Route] = []

    func add(_ kind: Resource.Kind, base: UInt64, length: UInt64, endpoint: DeviceEndpoint, resource: UInt16) throws(CoreError) {
        let routes = kind == .pio ? pio : mmio
        if let clash = routes.first(where: { base < $0.base + $0.length && $0.base < base + length }) {
            throw .configuration("\(endpoint.name) wants \(kind) [0x\(String(base, radix: 16)), +\(length)) which overlaps \(clash.endpoint.name)")
        }
        let route = Route(base: base, length: length, endpoint: endpoint, resource: resource)
        if kind == .pio { pio.append(route) } else { mmio.append(route) }
    }

    private static func find(_ routes: [Route], _ address: UInt64, _ size: Int) -> Route? {
        for r in routes where address >= r.base && address - r.base < r.length {
            // An access straddling the end of a range belongs to nobody, as on a real bus.
            return UInt64(size) <= r.length - (address - r.base) ? r : nil
        }
        return nil
    }

    /// Unclaimed reads float high, as on a PC's ISA bus.
    private static func unclaimed(_ size: Int) -> UInt64 { size >= 8 ? ~0 : (1 << (UInt64(size) * 8)) - 1 }

    func pioRead(port: UInt16, size: Int, vcpu: UInt32) -> UInt64 {
        guard let r = Self.find(pio, UInt64(port), size) else { return Self.unclaimed(size) }
        return r.endpoint.read(.pioRead, resource: r.resource, offset: UInt64(port) - r.base, size: size, vcpu: vcpu)
    }

    func pioWrite(port: UInt16, size: Int, value: UInt64, vcpu: UInt32) {
        guard let r = Self.find(pio, UInt64(port), size) else { return }
        r.endpoint.write(.pioWrite, resource: r.resource, offset: UInt64(port) - r.base, size: size, value: value, vcpu: vcpu)
    }

    func mmioRead(address: UInt64, size: Int, vcpu: UInt32) -> UInt64 {
        guard let r = Self.find(mmio, address, size) else { return Self.unclaimed(size) }
        return r.endpoint.read(.mmioRead, resource: r.resource, offset: address - r.base, size: size, vcpu: vcpu)
    }

    func mmioWrite(address: UInt64, size: Int, value: UInt64, vcpu: UInt32) {
        guard let r = Self.find(mmio, address, size) else { return }
        r.endpoint.write(.mmioWrite, resource: r.resource, offset: address - r.base, size: size, value: value, vcpu: vcpu)
    }
}

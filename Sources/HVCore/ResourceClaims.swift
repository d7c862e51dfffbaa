import HVIPC

/// What devices claim of the guest's address spaces, checked before anything exists: no two
/// devices on overlapping ports or MMIO ranges, no two on one PCI function, every function on
/// bus 0. `Machine` checks its devices here before building the VM, and `hvctl plugin validate`
/// checks a plugin against a VM's devices without starting one. `IOBus` and `PCIBus` keep the
/// same rules as invariants, with the same messages.
public enum ResourceClaims {
    /// Throws the first conflict among `devices`, naming both devices.
    public static func check(_ devices: [DeviceSpec]) throws(CoreError) {
        var ranges: [(kind: Resource.Kind, base: UInt64, length: UInt64, owner: String)] = []
        var functions: [UInt16: String] = [:]
        for device in devices {
            for r in device.resources where r.kind == .pciConfig {
                guard let bdf = PCIBus.bdf(r.base) else { continue }  // the core refuses a malformed one itself
                try claimFunction(bdf, by: device.name, owner: functions[bdf])
                functions[bdf] = device.name
            }
            for r in device.resources where r.kind == .pio || r.kind == .mmio {
                try claimRange(r.kind, base: r.base, length: r.length, by: device.name,
                               owner: ranges.first { $0.kind == r.kind && overlap(r.base, r.length, $0.base, $0.length) }?.owner)
                ranges.append((r.kind, r.base, r.length, device.name))
            }
        }
    }

    /// Whether [a, a + m) and [b, b + n) share an address.
    static func overlap(_ a: UInt64, _ m: UInt64, _ b: UInt64, _ n: UInt64) -> Bool { a < b &+ n && b < a &+ m }

    /// Refuses `claimant`'s range when `owner` (a device whose range overlaps it) is not nil.
    static func claimRange(_ kind: Resource.Kind, base: UInt64, length: UInt64, by claimant: String, owner: String?) throws(CoreError) {
        if let owner {
            throw .configuration("\(claimant) wants \(kind) [0x\(String(base, radix: 16)), +\(length)) which overlaps \(owner)")
        }
    }

    /// Refuses `claimant`'s PCI function off bus 0, or when `owner` already has it.
    static func claimFunction(_ bdf: UInt16, by claimant: String, owner: String?) throws(CoreError) {
        guard bdf >> 8 == 0 else {
            throw .configuration("\(claimant) declares PCI function \(PCIBus.describe(bdf)): hv has one PCI bus, bus 00")
        }
        if let owner {
            throw .configuration("\(claimant) declares PCI function \(PCIBus.describe(bdf)), which \(owner) already has")
        }
    }
}

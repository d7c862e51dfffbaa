import HVIPC
import Synchronization

/// PCI configuration mechanism #1 (the 0xCF8 address latch and the 0xCFC–0xCFF data window) and
/// the BARs of every PCI function a device process declares.
///
/// The core keeps what decides where guest accesses go: each function's command register (I/O and
/// memory decode), its BARs (sized by the device's declaration, placed where the guest writes
/// them) and the expansion-ROM BAR (none: reads 0). Every other byte of config space belongs to
/// the device and is forwarded as CONFIG_READ/CONFIG_WRITE on its PCI_CONFIG resource. When the
/// guest moves a BAR or toggles decoding, the core moves the BAR's route on the I/O bus, refusing
/// placements over guest RAM, the firmware, the local APIC/IOAPIC windows or another device.
final class PCIBus: @unchecked Sendable {
    // @unchecked: all mutable state is under `state`.

    /// Largest number of BARs in a type-0 header.
    static let barCount = 6

    struct BAR {
        let kind: Resource.Kind  // .pciMMIOBar or .pciPIOBar
        let size: UInt64
        let resource: UInt16
        /// The register as the guest last wrote it (before masking).
        var register: UInt32 = 0

        /// What the guest reads: the address bits the size allows, plus the type bits.
        var value: UInt32 {
            let mask = ~UInt32(truncatingIfNeeded: size - 1)
            return kind == .pciPIOBar ? (register & mask & 0xFFFF_FFFC) | 0x1 : register & mask & 0xFFFF_FFF0
        }
        var address: UInt64 { UInt64(value & (kind == .pciPIOBar ? 0xFFFF_FFFC : 0xFFFF_FFF0)) }
    }

    struct Function {
        let bdf: UInt16
        let endpoint: DeviceEndpoint
        let configResource: UInt16
        var bars: [BAR?] = Array(repeating: nil, count: PCIBus.barCount)
        var command: UInt16 = 0
        /// Where each BAR is routed now (nil: not routed).
        var routed: [UInt64?] = Array(repeating: nil, count: PCIBus.barCount)
    }

    private struct State {
        var latch: UInt32 = 0
        var functions: [UInt16: Function] = [:]
        /// PIIX3 PIRQA–D routing (00:01.0, 0x60–0x63): bit 7 disables, bits 3..0 the ISA IRQ.
        var pirq: [UInt8] = [0x80, 0x80, 0x80, 0x80]
        /// Functions whose INTx pin is asserted now.
        var intxAsserted: Set<UInt16> = []
        /// ISA IRQs the core drives high for INTx now.
        var irqsHigh: Set<UInt32> = []
    }
    /// The PCI-to-ISA bridge whose 0x60–0x63 route PIRQs (PIIX3's place).
    static let pirqRouter: UInt16 = 0x08
    private let state = Mutex(State())
    private let bus: IOBus
    /// Told when the guest moves a BAR (resource index of the device) or stops decoding it (nil).
    var onBARMoved: (@Sendable (DeviceEndpoint, UInt16, UInt64?) -> Void)?

    /// Where the BAR that is `endpoint`'s resource `resource` is routed now (nil: nowhere).
    func routedAddress(endpoint: DeviceEndpoint, resource: UInt16) -> UInt64? {
        state.withLock { s in
            for f in s.functions.values where f.endpoint === endpoint {
                for (i, bar) in f.bars.enumerated() where bar?.resource == resource { return f.routed[i] }
            }
            return nil
        }
    }

    /// Drives an ISA IRQ line (the in-kernel PIC and IOAPIC).
    var setIRQLine: (@Sendable (UInt32, Bool) -> Void)?
    /// Whether a guest-physical range may hold a memory BAR (not RAM, firmware or APIC windows).
    private let memoryRangeIsFree: @Sendable (UInt64, UInt64) -> Bool

    init(bus: IOBus, memoryRangeIsFree: @escaping @Sendable (UInt64, UInt64) -> Bool) {
        self.bus = bus
        self.memoryRangeIsFree = memoryRangeIsFree
    }

    /// The bus/device/function of a PCI_CONFIG resource's `base`, or nil when out of range.
    static func bdf(_ base: UInt64) -> UInt16? {
        base <= 0xFFFF ? UInt16(base) : nil
    }

    static func describe(_ bdf: UInt16) -> String {
        func hex(_ v: UInt16, _ width: Int) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(hex(bdf >> 8, 2)):\(hex((bdf >> 3) & 0x1F, 2)).\(bdf & 7)"
    }

    // MARK: Declaration (before the guest runs)

    func addFunction(bdf: UInt16, endpoint: DeviceEndpoint, resource: UInt16) throws(CoreError) {
        try state.withLock { s throws(CoreError) in
            try ResourceClaims.claimFunction(bdf, by: endpoint.name, owner: s.functions[bdf]?.endpoint.name)
            s.functions[bdf] = Function(bdf: bdf, endpoint: endpoint, configResource: resource)
        }
    }

    func addBAR(_ kind: Resource.Kind, base: UInt64, size: UInt64, endpoint: DeviceEndpoint, resource: UInt16) throws(CoreError) {
        let bdf = UInt16(truncatingIfNeeded: base >> 8), index = Int(base & 0xFF)
        let name = "\(endpoint.name): BAR \(index) of PCI function \(Self.describe(bdf))"
        try state.withLock { s throws(CoreError) in
            guard base >> 24 == 0, index < Self.barCount else { throw .configuration("\(name): BAR index out of range (0-5)") }
            guard var function = s.functions[bdf], function.endpoint === endpoint else {
                throw .configuration("\(name): the device has no PCI_CONFIG resource for that function")
            }
            let minimum: UInt64 = kind == .pciPIOBar ? 4 : 16
            let maximum: UInt64 = kind == .pciPIOBar ? 256 : 1 << 31
            guard size >= minimum, size <= maximum, size & (size - 1) == 0 else {
                throw .configuration("\(name): size \(size) must be a power of two from \(minimum) to \(maximum)")
            }
            guard function.bars[index] == nil else { throw .configuration("\(name) is declared twice") }
            function.bars[index] = BAR(kind: kind, size: size, resource: resource)
            s.functions[bdf] = function
        }
    }

    // MARK: Guest accesses

    /// Ports 0xCF8–0xCFF, except a byte at 0xCF9 (the chipset's reset control, a device's).
    func handles(port: UInt16, size: Int) -> Bool {
        (0xCF8...0xCFF).contains(port) && !(port == 0xCF9 && size == 1)
    }

    func pioRead(port: UInt16, size: Int, vcpu: UInt32) -> UInt64 {
        if port == 0xCF8 {
            return size == 4 ? UInt64(state.withLock { $0.latch }) : Self.ones(size)
        }
        guard port >= 0xCFC, let (function, register) = selected(offset: Int(port - 0xCFC)) else { return Self.ones(size) }
        let size = min(size, 4 - (register & 3))
        // A dword at 0xCFD keeps three bytes of the data window: three byte reads, since a device
        // only takes 1-, 2-, 4- and 8-byte requests (found by the hostile guest).
        guard size == 3 else { return configRead(function, register: register, size: size, vcpu: vcpu) }
        return (0..<3).reduce(0) { $0 | configRead(function, register: register + $1, size: 1, vcpu: vcpu) << (8 * UInt64($1)) }
    }

    func pioWrite(port: UInt16, size: Int, value: UInt64, vcpu: UInt32) {
        if port == 0xCF8 {
            if size == 4 { state.withLock { $0.latch = UInt32(truncatingIfNeeded: value) & 0x80FF_FFFC } }
            return
        }
        guard port >= 0xCFC, let (function, register) = selected(offset: Int(port - 0xCFC)) else { return }
        let size = min(size, 4 - (register & 3))
        guard size == 3 else { return configWrite(function, register: register, size: size, value: value, vcpu: vcpu) }
        for i in 0..<3 { configWrite(function, register: register + i, size: 1, value: value >> (8 * UInt64(i)) & 0xFF, vcpu: vcpu) }
    }

    private func selected(offset: Int) -> (UInt16, Int)? {
        state.withLock { s in
            guard s.latch & 0x8000_0000 != 0 else { return nil }
            let bdf = UInt16(truncatingIfNeeded: s.latch >> 8)
            guard s.functions[bdf] != nil else { return nil }
            return (bdf, Int(s.latch & 0xFC) + offset)
        }
    }

    private static func ones(_ size: Int) -> UInt64 { size >= 8 ? ~0 : (1 << (UInt64(size) * 8)) - 1 }

    /// Bytes the core answers itself: command (0x04–0x05), BARs (0x10–0x27), expansion ROM
    /// (0x30–0x33), and on the PIRQ router its routing registers (0x60–0x63), since the core
    /// routes INTx.
    static func coreOwns(_ register: Int, of bdf: UInt16) -> Bool {
        (0x04...0x05).contains(register) || (0x10...0x27).contains(register) || (0x30...0x33).contains(register)
            || (bdf == pirqRouter && (0x60...0x63).contains(register))
    }

    // MARK: INTx

    /// The ISA IRQ function `bdf`'s INTA# reaches now, or nil when its PIRQ is disabled.
    private static func irq(of bdf: UInt16, _ s: State) -> UInt32? {
        let device = Int(bdf >> 3) & 0x1F, pin = 1
        let route = s.pirq[(pin - 1 + device - 1 + 4) & 3]
        guard route & 0x80 == 0 else { return nil }
        let irq = UInt32(route & 0x0F)
        // PIIX3 accepts 3–7, 9–12, 14 and 15.
        return [3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15].contains(irq) ? irq : nil
    }

    /// Sets function `bdf`'s INTx pin; false when the device has no such function.
    func setINTx(endpoint: DeviceEndpoint, asserted: Bool) -> Bool {
        let found = state.withLock { s -> Bool in
            guard let f = s.functions.first(where: { $0.value.endpoint === endpoint }) else { return false }
            if asserted { s.intxAsserted.insert(f.key) } else { s.intxAsserted.remove(f.key) }
            return true
        }
        if found { updateIRQLines() }
        return found
    }

    /// Drives every INTx-routed IRQ to the OR of the functions routed to it (lines are shared).
    private func updateIRQLines() {
        let changes = state.withLock { s -> [(UInt32, Bool)] in
            let wanted = Set(s.intxAsserted.compactMap { Self.irq(of: $0, s) })
            let changes = wanted.subtracting(s.irqsHigh).map { ($0, true) } + s.irqsHigh.subtracting(wanted).map { ($0, false) }
            s.irqsHigh = wanted
            return changes
        }
        for (irq, level) in changes { setIRQLine?(irq, level) }
    }

    func configRead(_ bdf: UInt16, register: Int, size: Int, vcpu: UInt32) -> UInt64 {
        let range = register..<(register + size)
        var value: UInt64 = 0
        var endpoint: DeviceEndpoint?
        var resource: UInt16 = 0
        state.withLock { s in
            guard let f = s.functions[bdf] else { return }
            for r in range where Self.coreOwns(r, of: bdf) {
                value |= UInt64(Self.coreByte(f, r, s)) << (8 * UInt64(r - register))
            }
            if range.contains(where: { !Self.coreOwns($0, of: bdf) }) {
                endpoint = f.endpoint
                resource = f.configResource
            }
        }
        guard let endpoint else { return value }
        // The device's bytes, outside the lock (the read may wait for a restarting device).
        let device = endpoint.read(.configRead, resource: resource, offset: UInt64(register), size: size, vcpu: vcpu)
        for r in range where !Self.coreOwns(r, of: bdf) {
            value |= ((device >> (8 * UInt64(r - register))) & 0xFF) << (8 * UInt64(r - register))
        }
        return value
    }

    func configWrite(_ bdf: UInt16, register: Int, size: Int, value: UInt64, vcpu: UInt32) {
        let range = register..<(register + size)
        var forward: (DeviceEndpoint, UInt16)?
        var moved: Function?
        var pirqChanged = false
        state.withLock { s in
            guard var f = s.functions[bdf] else { return }
            var routingChanged = false
            for r in range where Self.coreOwns(r, of: bdf) {
                let byte = UInt8(truncatingIfNeeded: value >> (8 * UInt64(r - register)))
                switch r {
                case 0x04:
                    // I/O space, memory space, bus master, and the rest the core does not model.
                    f.command = (f.command & 0xFF00) | UInt16(byte & 0x07)
                    routingChanged = true
                case 0x05:
                    f.command = (f.command & 0x00FF) | UInt16(byte & 0x04) << 8  // INTx disable
                case 0x60...0x63 where bdf == Self.pirqRouter:
                    s.pirq[r - 0x60] = byte & 0x8F
                    pirqChanged = true
                case 0x10...0x27:
                    let index = (r - 0x10) / 4, shift = UInt32(8 * ((r - 0x10) % 4))
                    if var bar = f.bars[index] {
                        bar.register = (bar.register & ~(0xFF << shift)) | UInt32(byte) << shift
                        f.bars[index] = bar
                        routingChanged = true
                    }
                default:
                    break  // the expansion ROM BAR: none
                }
            }
            s.functions[bdf] = f
            if routingChanged { moved = f }
            if range.contains(where: { !Self.coreOwns($0, of: bdf) }) { forward = (f.endpoint, f.configResource) }
        }
        if let moved { reroute(moved) }
        if pirqChanged { updateIRQLines() }
        if let (endpoint, resource) = forward {
            endpoint.write(.configWrite, resource: resource, offset: UInt64(register), size: size, value: value, vcpu: vcpu)
        }
    }

    private static func coreByte(_ f: Function, _ register: Int, _ s: State) -> UInt8 {
        switch register {
        case 0x60...0x63 where f.bdf == pirqRouter: return s.pirq[register - 0x60]
        case 0x04: return UInt8(truncatingIfNeeded: f.command)
        case 0x05: return UInt8(truncatingIfNeeded: f.command >> 8)
        case 0x10...0x27:
            let index = (register - 0x10) / 4
            guard let bar = f.bars[index] else { return 0 }
            return UInt8(truncatingIfNeeded: bar.value >> UInt32(8 * ((register - 0x10) % 4)))
        default:
            return 0
        }
    }

    /// Moves each BAR's route to where the function's registers now put it.
    private func reroute(_ snapshot: Function) {
        for index in 0..<Self.barCount {
            guard let bar = snapshot.bars[index] else { continue }
            let decodes = bar.kind == .pciPIOBar ? snapshot.command & 0x1 != 0 : snapshot.command & 0x2 != 0
            var target: UInt64? = decodes && bar.address != 0 ? bar.address : nil
            let kind: Resource.Kind = bar.kind == .pciPIOBar ? .pio : .mmio
            let current = state.withLock { $0.functions[snapshot.bdf]?.routed[index] ?? nil }
            guard target != current else { continue }
            bus.remove(kind, endpoint: snapshot.endpoint, resource: bar.resource)
            if let address = target {
                let fits = kind == .pio ? address + bar.size <= 0x1_0000 : memoryRangeIsFree(address, bar.size)
                do throws(CoreError) {
                    guard fits else { throw .configuration("it is not free") }
                    try bus.add(kind, base: address, length: bar.size, endpoint: snapshot.endpoint, resource: bar.resource)
                } catch {
                    Diagnostics.line("\(snapshot.endpoint.name): the guest put BAR \(index) of PCI function \(Self.describe(snapshot.bdf)) at 0x\(String(address, radix: 16)) (+\(bar.size)), which is not free; it is not routed")
                    target = nil
                }
            }
            state.withLock { $0.functions[snapshot.bdf]?.routed[index] = target }
            onBARMoved?(snapshot.endpoint, bar.resource, target)
        }
    }

    // MARK: Snapshot

    /// What the core keeps of the PCI bus, as bytes: the address latch, the PIRQ routes, and per
    /// function (by bus/device/function) its command register, BAR registers and INTx pin.
    func savedState() -> [UInt8] {
        state.withLock { s in
            var w = WireWriter()
            w.u32(s.latch)
            w.raw(s.pirq)
            w.u16(UInt16(s.functions.count))
            for (bdf, f) in s.functions.sorted(by: { $0.key < $1.key }) {
                w.u16(bdf)
                w.u16(f.command)
                w.u8(s.intxAsserted.contains(bdf) ? 1 : 0)
                for bar in f.bars { w.u32(bar?.register ?? 0) }
            }
            return w.bytes
        }
    }

    /// Puts the bus back as `savedState` described it (before any device or vCPU runs): routes
    /// every BAR where the guest had placed it and drives the INTx lines that were asserted.
    /// The functions must be the same as when it was saved.
    func restore(_ bytes: [UInt8]) throws(CoreError) {
        var r = WireReader(bytes)
        var saved: [(bdf: UInt16, command: UInt16, intx: Bool, bars: [UInt32])] = []
        let latch: UInt32, pirq: [UInt8]
        do throws(WireError) {
            latch = try r.u32()
            pirq = try r.raw(4)
            let count = Int(try r.u16())
            for _ in 0..<count {
                let bdf = try r.u16(), command = try r.u16(), intx = try r.u8() != 0
                var bars: [UInt32] = []
                for _ in 0..<Self.barCount { bars.append(try r.u32()) }
                saved.append((bdf, command, intx, bars))
            }
            try r.finish()
        } catch {
            throw .configuration("the snapshot's PCI bus state is malformed (\(error))")
        }
        let moved = try state.withLock { s throws(CoreError) -> [Function] in
            guard Set(saved.map(\.bdf)) == Set(s.functions.keys) else {
                throw .configuration("the snapshot's PCI functions (\(saved.map { Self.describe($0.bdf) }.sorted().joined(separator: ", "))) are not this VM's")
            }
            s.latch = latch
            s.pirq = pirq
            for f in saved {
                s.functions[f.bdf]!.command = f.command
                for i in 0..<Self.barCount where s.functions[f.bdf]!.bars[i] != nil { s.functions[f.bdf]!.bars[i]!.register = f.bars[i] }
                if f.intx { s.intxAsserted.insert(f.bdf) }
            }
            return Array(s.functions.values)
        }
        for f in moved { reroute(f) }
        updateIRQLines()
    }
}

// Control-channel messages of hv IPC v1. The layouts here are normative in
// ipc-schema/messages.json; Tests/HVIPCTests checks every constant and every test vector
// against that file, so this code and the schema cannot drift apart.

/// Protocol version spoken by this library.
public enum ProtocolVersion {
    /// Peers with a different major version refuse each other.
    public static let major: UInt32 = 1
    /// Peers settle on the lower minor version. Minor 1 added QUIESCE, RESUME, the SNAPSHOT
    /// capability and HELLO_REPLY's state_version; minor 2 the DIRTY_LOG capability and
    /// SET_DIRTY_LOG (live migration); minor 3 RECONFIGURE (settings changed in place).
    public static let minor: UInt32 = 3
}

/// Feature bits negotiated in the handshake. A device may accept only bits the core offered.
public struct Capabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Register accesses arrive on the shared-memory register ring.
    public static let registerRing = Capabilities(rawValue: 1 << 0)
    /// A core-owned state page survives device restarts.
    public static let statePage = Capabilities(rawValue: 1 << 1)
    /// The platform device's rights: SET_BOOT_STATE (the boot vCPU's entry state) and SYSTEM_EVENT
    /// (power-off, reset). Granted to the BIOS device only.
    public static let bootControl = Capabilities(rawValue: 1 << 2)
    /// The device may drive level-triggered interrupt lines with SET_IRQ_LEVEL.
    public static let interruptLevel = Capabilities(rawValue: 1 << 3)
    /// The device may route message-signalled interrupts (MSI-X) with SET_MSI_ROUTE.
    public static let msi = Capabilities(rawValue: 1 << 4)
    /// The device can be snapshotted: it answers QUIESCE and RESUME, keeps all of its state in
    /// the state page, and restores from a page it did not write itself (a snapshot's) when
    /// started with a restart generation above 0. It names its state page layout's version in
    /// HELLO_REPLY's `stateVersion`.
    public static let snapshot = Capabilities(rawValue: 1 << 5)
    /// The device logs its guest-memory writes: after SET_DIRTY_LOG hands it a bitmap, it sets
    /// the bit of every page it writes, once written (ipc-schema/README.md §5.4c). A VM can be
    /// migrated live only when every device that maps guest memory accepted this.
    public static let dirtyLog = Capabilities(rawValue: 1 << 6)
}

/// Message type numbers.
public enum MessageType: UInt16, Sendable, CaseIterable {
    // core → device, on the control socket
    case hello = 0x0001
    case shutdown = 0x0002
    case ping = 0x0003
    case mediaChange = 0x0004
    case quiesce = 0x0005
    case resume = 0x0006
    case setDirtyLog = 0x0007
    case reconfigure = 0x0008
    // device → core, on the event socket
    case log = 0x0101
    case setBootState = 0x0102
    case setIRQLevel = 0x0103
    case systemEvent = 0x0104
    case addDoorbell = 0x0105
    case setMSIRoute = 0x0106
}

/// Header flag bits.
public struct MessageFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// This frame answers the request with the same id.
    public static let reply = MessageFlags(rawValue: 1 << 0)
    /// The sender expects no reply.
    public static let noReply = MessageFlags(rawValue: 1 << 1)
}

/// Status carried in every reply.
public enum Status: Int32, Sendable, CaseIterable {
    case ok = 0
    case unknownType = 1
    case malformed = 2
    case unsupportedVersion = 3
    case denied = 4
    case invalidArgument = 5
    case internalError = 6
}

/// One datagram on a control socket: a 16-byte header and a payload.
public struct Frame: Equatable, Sendable {
    /// Size of the fixed header.
    public static let headerSize = 16
    /// Largest datagram either side sends or accepts.
    public static let maximumSize = 65536

    public var type: UInt16
    public var flags: MessageFlags
    public var id: UInt32
    public var status: Int32
    public var payload: [UInt8]

    public init(type: UInt16, flags: MessageFlags = [], id: UInt32, status: Int32 = 0, payload: [UInt8] = []) {
        self.type = type
        self.flags = flags
        self.id = id
        self.status = status
        self.payload = payload
    }

    /// A reply to `request` carrying `status` and `payload`.
    public static func reply(to request: Frame, status: Status = .ok, payload: [UInt8] = []) -> Frame {
        Frame(type: request.type, flags: .reply, id: request.id, status: status.rawValue, payload: payload)
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u16(type)
        w.u16(flags.rawValue)
        w.u32(id)
        w.i32(status)
        w.u32(UInt32(payload.count))
        w.raw(payload)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(WireError) -> Frame {
        var r = WireReader(bytes)
        let type = try r.u16()
        let flags = MessageFlags(rawValue: try r.u16())
        let id = try r.u32()
        let status = try r.i32()
        let length = try r.u32()
        guard Int(length) == r.remaining else { throw .lengthMismatch(declared: length, actual: r.remaining) }
        if flags.contains(.reply) && flags.contains(.noReply) { throw .invalidField("flags: REPLY and NO_REPLY together") }
        if flags.rawValue & ~0x3 != 0 { throw .invalidField("flags: reserved bits 0x\(String(flags.rawValue, radix: 16))") }
        return Frame(type: type, flags: flags, id: id, status: status, payload: try r.raw(Int(length)))
    }
}

/// A region of guest RAM inside the guest-memory memfd.
public struct MemoryRegion: Equatable, Sendable {
    public var guestPhysicalAddress: UInt64
    public var size: UInt64
    public var memfdOffset: UInt64
    public init(guestPhysicalAddress: UInt64, size: UInt64, memfdOffset: UInt64) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.memfdOffset = memfdOffset
    }
}

/// A guest-visible address range the core routes to the device.
public struct Resource: Equatable, Sendable {
    /// What kind of address space.
    public enum Kind: UInt8, Sendable {
        /// Fixed port range at `base`.
        case pio = 1
        /// Fixed guest-physical range at `base`.
        case mmio = 2
        /// A PCI function's configuration space: `base` is its bus/device/function
        /// (`bus << 8 | device << 3 | function`), `length` 256. The core keeps the command
        /// register and the BARs; every other byte arrives as CONFIG_READ/CONFIG_WRITE.
        case pciConfig = 3
        /// A memory BAR, placed where the guest programs it: `base` is `bdf << 8 | barIndex`.
        case pciMMIOBar = 4
        /// An I/O BAR, placed where the guest programs it: `base` is `bdf << 8 | barIndex`.
        case pciPIOBar = 5

        /// The register operations that address a resource of this kind.
        public func accepts(_ operation: RegisterRequest.Operation) -> Bool {
            switch (self, operation) {
            case (.pio, .pioRead), (.pio, .pioWrite), (.pciPIOBar, .pioRead), (.pciPIOBar, .pioWrite),
                 (.mmio, .mmioRead), (.mmio, .mmioWrite), (.pciMMIOBar, .mmioRead), (.pciMMIOBar, .mmioWrite),
                 (.pciConfig, .configRead), (.pciConfig, .configWrite):
                return true
            default:
                return false
            }
        }
    }
    public var kind: Kind
    public var base: UInt64
    public var length: UInt64
    public init(kind: Kind, base: UInt64, length: UInt64) {
        self.kind = kind
        self.base = base
        self.length = length
    }
}

/// What a descriptor passed with HELLO is for.
public enum FDRole: UInt16, Sendable {
    /// The guest-memory memfd (map with the HELLO's memory regions).
    case guestMemory = 1
    /// The register-ring memfd.
    case registerRing = 2
    /// eventfd the core signals when it publishes requests (device sleeps on it).
    case ringKick = 3
    /// eventfd the device signals when it publishes responses (core sleeps on it).
    case ringReply = 4
    /// eventfd wired to a KVM irqfd; `index` is the device's interrupt line number.
    case interrupt = 5
    /// The device's state page memfd (4096 bytes, survives restarts).
    case statePage = 6
    /// A host file the trusted side opened for the device (image, console); `index` orders them.
    case hostIO = 7
}

/// The role of one passed descriptor; the i-th entry describes the i-th descriptor.
public struct FDAssignment: Equatable, Sendable {
    public var role: FDRole
    public var index: UInt16
    public init(role: FDRole, index: UInt16) {
        self.role = role
        self.index = index
    }
}

/// HELLO (core → device): everything the device gets, besides the descriptors themselves.
public struct Hello: Equatable, Sendable {
    public var major: UInt32 = ProtocolVersion.major
    public var minor: UInt32 = ProtocolVersion.minor
    public var capabilities: Capabilities
    /// 0 on first start, incremented on every restart of this device.
    public var restartGeneration: UInt32
    public var memoryRegions: [MemoryRegion]
    public var resources: [Resource]
    public var fds: [FDAssignment]
    /// Device-specific configuration, UTF-8 `key=value` pairs separated by newlines.
    public var config: String

    public init(capabilities: Capabilities, restartGeneration: UInt32, memoryRegions: [MemoryRegion],
                resources: [Resource], fds: [FDAssignment], config: String) {
        self.capabilities = capabilities
        self.restartGeneration = restartGeneration
        self.memoryRegions = memoryRegions
        self.resources = resources
        self.fds = fds
        self.config = config
    }

    public static let maximumConfigBytes = 4096
    public static let maximumTableEntries = 64

    /// Encodes the payload; a table or a config larger than the protocol carries (the limits
    /// `decode` enforces) is refused here rather than truncated or trapped on.
    public func encode() throws(WireError) -> [UInt8] {
        let config = Array(self.config.utf8)
        guard config.count <= Self.maximumConfigBytes else {
            throw .invalidField("hello: config is \(config.count) bytes, longer than \(Self.maximumConfigBytes)")
        }
        guard memoryRegions.count <= Self.maximumTableEntries, resources.count <= Self.maximumTableEntries,
              fds.count <= Self.maximumTableEntries else {
            throw .invalidField("hello: table larger than \(Self.maximumTableEntries) entries")
        }
        var w = WireWriter()
        w.u32(major)
        w.u32(minor)
        w.u64(capabilities.rawValue)
        w.u32(restartGeneration)
        w.u16(UInt16(memoryRegions.count))
        w.u16(UInt16(resources.count))
        w.u16(UInt16(fds.count))
        w.u16(UInt16(config.count))
        w.u32(0)
        for m in memoryRegions {
            w.u64(m.guestPhysicalAddress)
            w.u64(m.size)
            w.u64(m.memfdOffset)
        }
        for r in resources {
            w.u8(r.kind.rawValue)
            w.u8(0)
            w.u16(0)
            w.u32(0)
            w.u64(r.base)
            w.u64(r.length)
        }
        for f in fds {
            w.u16(f.role.rawValue)
            w.u16(f.index)
        }
        w.raw(config)
        return w.bytes
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> Hello {
        var r = WireReader(payload)
        let major = try r.u32()
        let minor = try r.u32()
        let caps = Capabilities(rawValue: try r.u64())
        let generation = try r.u32()
        let regionCount = Int(try r.u16())
        let resourceCount = Int(try r.u16())
        let fdCount = Int(try r.u16())
        let configLength = Int(try r.u16())
        guard try r.u32() == 0 else { throw .invalidField("hello: reserved word is not zero") }
        guard regionCount <= maximumTableEntries, resourceCount <= maximumTableEntries, fdCount <= maximumTableEntries else {
            throw .invalidField("hello: table larger than \(maximumTableEntries) entries")
        }
        guard configLength <= maximumConfigBytes else { throw .invalidField("hello: config longer than \(maximumConfigBytes) bytes") }
        var regions: [MemoryRegion] = []
        for _ in 0..<regionCount {
            let m = MemoryRegion(guestPhysicalAddress: try r.u64(), size: try r.u64(), memfdOffset: try r.u64())
            guard m.guestPhysicalAddress.addingReportingOverflow(m.size).overflow == false,
                  m.memfdOffset.addingReportingOverflow(m.size).overflow == false else {
                throw .invalidField("hello: memory region overflows 64 bits")
            }
            regions.append(m)
        }
        var resources: [Resource] = []
        for _ in 0..<resourceCount {
            let rawKind = try r.u8()
            guard let kind = Resource.Kind(rawValue: rawKind) else { throw .invalidField("hello: resource kind \(rawKind)") }
            guard try r.u8() == 0, try r.u16() == 0, try r.u32() == 0 else { throw .invalidField("hello: resource reserved bytes") }
            let res = Resource(kind: kind, base: try r.u64(), length: try r.u64())
            guard res.length > 0, res.base.addingReportingOverflow(res.length).overflow == false else {
                throw .invalidField("hello: resource range empty or overflowing")
            }
            resources.append(res)
        }
        var fds: [FDAssignment] = []
        for _ in 0..<fdCount {
            let rawRole = try r.u16()
            guard let role = FDRole(rawValue: rawRole) else { throw .invalidField("hello: fd role \(rawRole)") }
            fds.append(FDAssignment(role: role, index: try r.u16()))
        }
        let config = try r.raw(configLength)
        try r.finish()
        var hello = Hello(capabilities: caps, restartGeneration: generation, memoryRegions: regions,
                          resources: resources, fds: fds, config: String(decoding: config, as: UTF8.self))
        hello.major = major
        hello.minor = minor
        return hello
    }
}

/// HELLO's reply (device → core): the version and capabilities the device accepts, and its name.
public struct HelloReply: Equatable, Sendable {
    public var major: UInt32
    public var minor: UInt32
    public var capabilities: Capabilities
    /// Short device model name, e.g. "serial-16550a" (at most 64 bytes).
    public var name: String
    /// The version of the device's state page layout, when it accepts SNAPSHOT (0 otherwise): a
    /// snapshot records it, and a restore refuses a device whose version differs.
    public var stateVersion: UInt16

    public init(major: UInt32 = ProtocolVersion.major, minor: UInt32 = ProtocolVersion.minor,
                capabilities: Capabilities, name: String, stateVersion: UInt16 = 0) {
        self.major = major
        self.minor = minor
        self.capabilities = capabilities
        self.name = name
        self.stateVersion = stateVersion
    }

    public static let maximumNameBytes = 64

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(major)
        w.u32(minor)
        w.u64(capabilities.rawValue)
        let name = Array(self.name.utf8.prefix(Self.maximumNameBytes))
        w.u16(UInt16(name.count))
        w.u16(stateVersion)
        w.raw(name)
        return w.bytes
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> HelloReply {
        var r = WireReader(payload)
        let major = try r.u32()
        let minor = try r.u32()
        let caps = Capabilities(rawValue: try r.u64())
        let length = Int(try r.u16())
        let stateVersion = try r.u16()
        guard length <= maximumNameBytes else { throw .invalidField("hello reply: name longer than \(maximumNameBytes) bytes") }
        let name = try r.raw(length)
        try r.finish()
        return HelloReply(major: major, minor: minor, capabilities: caps, name: String(decoding: name, as: UTF8.self),
                          stateVersion: stateVersion)
    }
}

/// LOG (device → core, NO_REPLY): a line for the operator.
public struct LogRecord: Equatable, Sendable {
    public enum Level: UInt8, Sendable {
        case debug = 0, info = 1, warning = 2, error = 3
    }
    public var level: Level
    public var text: String
    public init(level: Level, text: String) {
        self.level = level
        self.text = text
    }
    public static let maximumTextBytes = 4096

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u8(level.rawValue)
        w.u8(0)
        let text = Array(self.text.utf8.prefix(Self.maximumTextBytes))
        w.u16(UInt16(text.count))
        w.raw(text)
        return w.bytes
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> LogRecord {
        var r = WireReader(payload)
        let rawLevel = try r.u8()
        guard let level = Level(rawValue: rawLevel) else { throw .invalidField("log: level \(rawLevel)") }
        guard try r.u8() == 0 else { throw .invalidField("log: reserved byte is not zero") }
        let length = Int(try r.u16())
        guard length <= maximumTextBytes else { throw .invalidField("log: text longer than \(maximumTextBytes) bytes") }
        let text = try r.raw(length)
        try r.finish()
        return LogRecord(level: level, text: String(decoding: text, as: UTF8.self))
    }
}

/// SET_BOOT_STATE (device → core): the entry state of the boot vCPU. Needs `bootControl`.
public struct BootState: Equatable, Sendable {
    /// How the core sets up segments and control registers before applying the registers below.
    public enum Mode: UInt32, Sendable {
        /// Leave the architectural reset state (firmware at the reset vector); registers ignored.
        case reset = 0
        /// 32-bit protected mode, flat 4 GiB code (0x08) and data (0x10) segments, paging off:
        /// the multiboot v1 machine state.
        case flat32 = 1
        /// 64-bit long mode as the Linux 64-bit boot protocol requires: paging on with `cr3`,
        /// CR4.PAE, EFER.LME|LMA, GDTR from `gdtBase`/`gdtLimit`, 64-bit code selector 0x10, flat
        /// data selector 0x18, interrupts off.
        case long64 = 2
    }
    public var vcpu: UInt32
    public var mode: Mode
    public var rip: UInt64
    public var rsp: UInt64
    public var rax: UInt64
    public var rbx: UInt64
    public var rsi: UInt64
    /// `long64`: the page-table root. Zero otherwise.
    public var cr3: UInt64
    /// `long64`: guest-physical address of the GDT. Zero otherwise.
    public var gdtBase: UInt64
    /// `long64`: the GDT limit. Zero otherwise.
    public var gdtLimit: UInt16

    public init(vcpu: UInt32 = 0, mode: Mode, rip: UInt64 = 0, rsp: UInt64 = 0, rax: UInt64 = 0, rbx: UInt64 = 0, rsi: UInt64 = 0,
                cr3: UInt64 = 0, gdtBase: UInt64 = 0, gdtLimit: UInt16 = 0) {
        self.vcpu = vcpu
        self.mode = mode
        self.rip = rip
        self.rsp = rsp
        self.rax = rax
        self.rbx = rbx
        self.rsi = rsi
        self.cr3 = cr3
        self.gdtBase = gdtBase
        self.gdtLimit = gdtLimit
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(vcpu)
        w.u32(mode.rawValue)
        w.u64(rip)
        w.u64(rsp)
        w.u64(rax)
        w.u64(rbx)
        w.u64(rsi)
        w.u64(cr3)
        w.u64(gdtBase)
        w.u16(gdtLimit)
        w.u16(0)
        w.u32(0)
        return w.bytes
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> BootState {
        var r = WireReader(payload)
        let vcpu = try r.u32()
        let rawMode = try r.u32()
        guard let mode = Mode(rawValue: rawMode) else { throw .invalidField("boot state: mode \(rawMode)") }
        let s = BootState(vcpu: vcpu, mode: mode, rip: try r.u64(), rsp: try r.u64(), rax: try r.u64(),
                          rbx: try r.u64(), rsi: try r.u64(), cr3: try r.u64(), gdtBase: try r.u64(), gdtLimit: try r.u16())
        guard try r.u16() == 0, try r.u32() == 0 else { throw .invalidField("boot state: reserved bytes are not zero") }
        try r.finish()
        return s
    }
}

/// MEDIA_CHANGE (core → device): a removable medium was inserted (its descriptor rides along) or
/// ejected.
public struct MediaChange: Equatable, Sendable {
    /// The HOST_IO index the medium replaces.
    public var hostFile: UInt32
    public var present: Bool
    public init(hostFile: UInt32, present: Bool) {
        self.hostFile = hostFile
        self.present = present
    }
    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(hostFile)
        w.u32(present ? 1 : 0)
        return w.bytes
    }
    public static func decode(_ payload: [UInt8]) throws(WireError) -> MediaChange {
        var r = WireReader(payload)
        let hostFile = try r.u32()
        let present = try r.u32()
        guard present <= 1 else { throw .invalidField("media change: present \(present) is not 0 or 1") }
        try r.finish()
        return MediaChange(hostFile: hostFile, present: present == 1)
    }
}

/// RECONFIGURE (core → device, minor 3): the device's whole new settings, in HELLO's
/// configuration format (`SettingsText`), to apply in place.
public struct Reconfigure: Equatable, Sendable {
    public var config: String
    public init(config: String) { self.config = config }
    public static let maximumConfigBytes = 4096

    /// Nil when the text is longer than `maximumConfigBytes`.
    public func encode() -> [UInt8]? {
        let text = Array(config.utf8)
        guard text.count <= Self.maximumConfigBytes else { return nil }
        var w = WireWriter()
        w.u16(UInt16(text.count))
        w.u16(0)
        w.raw(text)
        return w.bytes
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> Reconfigure {
        var r = WireReader(payload)
        let length = Int(try r.u16())
        guard length <= maximumConfigBytes else { throw .invalidField("reconfigure: config longer than \(maximumConfigBytes) bytes") }
        guard try r.u16() == 0 else { throw .invalidField("reconfigure: reserved field is not zero") }
        let text = try r.raw(length)
        try r.finish()
        return Reconfigure(config: String(decoding: text, as: UTF8.self))
    }
}

/// SYSTEM_EVENT (device → core, usually NO_REPLY): the guest powered off or asked for a reset.
public struct SystemEvent: Equatable, Sendable {
    public enum Kind: UInt32, Sendable, CaseIterable {
        /// The guest turned the machine off (ACPI S5); the VM ends.
        case powerOff = 1
        /// The guest asked for a platform reset; the VM restarts unless the operator said not to.
        case reset = 2
    }
    public var kind: Kind
    public init(_ kind: Kind) { self.kind = kind }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(kind.rawValue)
        w.u32(0)
        return w.bytes
    }

    public static func decode(_ payload: [UInt8]) throws(WireError) -> SystemEvent {
        var r = WireReader(payload)
        let raw = try r.u32()
        guard let kind = Kind(rawValue: raw) else { throw .invalidField("system event: event \(raw)") }
        guard try r.u32() == 0 else { throw .invalidField("system event: reserved word is not zero") }
        try r.finish()
        return SystemEvent(kind)
    }
}

/// SET_IRQ_LEVEL (device → core, usually NO_REPLY): drive one of the device's interrupt lines.
public struct IRQLevel: Equatable, Sendable {
    /// The `line` that means the INTx pin of the device's PCI function: the core routes it
    /// through the chipset's PIRQ routing to an ISA IRQ.
    public static let pciINTx: UInt32 = 0xFFFF_FFFF
    public var line: UInt32
    public var asserted: Bool
    public init(line: UInt32, asserted: Bool) {
        self.line = line
        self.asserted = asserted
    }
    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(line)
        w.u32(asserted ? 1 : 0)
        return w.bytes
    }
    public static func decode(_ payload: [UInt8]) throws(WireError) -> IRQLevel {
        var r = WireReader(payload)
        let line = try r.u32()
        let level = try r.u32()
        guard level <= 1 else { throw .invalidField("irq level: level \(level) is not 0 or 1") }
        try r.finish()
        return IRQLevel(line: line, asserted: level == 1)
    }
}

/// ADD_DOORBELL (device → core, expects a reply carrying an eventfd): a guest write to one
/// register that KVM signals on an eventfd instead of exiting to the core (KVM_IOEVENTFD).
public struct DoorbellRequest: Equatable, Sendable {
    /// Index of the resource (HELLO order) holding the register.
    public var resource: UInt32
    /// The register's offset within the resource.
    public var offset: UInt32
    /// The access width that rings it (1, 2, 4, 8), or 0 for any width (MMIO only).
    public var length: UInt32
    public init(resource: UInt32, offset: UInt32, length: UInt32) {
        self.resource = resource
        self.offset = offset
        self.length = length
    }
    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(resource)
        w.u32(offset)
        w.u32(length)
        w.u32(0)
        return w.bytes
    }
    public static func decode(_ payload: [UInt8]) throws(WireError) -> DoorbellRequest {
        var r = WireReader(payload)
        let resource = try r.u32()
        let offset = try r.u32()
        let length = try r.u32()
        guard try r.u32() == 0 else { throw .invalidField("add doorbell: reserved word is not zero") }
        try r.finish()
        return DoorbellRequest(resource: resource, offset: offset, length: length)
    }
}

/// SET_MSI_ROUTE (device → core, expects a reply; needs `msi`): points one of the device's
/// message-signalled vectors at the message the guest programmed (ENABLED, the reply carries the
/// vector's irqfd) or removes its route (MASKED).
public struct MSIRoute: Equatable, Sendable {
    /// Largest vector number + 1 (the MSI-X table limit).
    public static let vectorLimit: UInt32 = 2048
    public var vector: UInt32
    public var enabled: Bool
    public var address: UInt64
    public var data: UInt32
    public init(vector: UInt32, enabled: Bool, address: UInt64, data: UInt32) {
        self.vector = vector
        self.enabled = enabled
        self.address = address
        self.data = data
    }
    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(vector)
        w.u32(enabled ? 1 : 0)
        w.u64(address)
        w.u32(data)
        w.u32(0)
        return w.bytes
    }
    public static func decode(_ payload: [UInt8]) throws(WireError) -> MSIRoute {
        var r = WireReader(payload)
        let vector = try r.u32()
        let state = try r.u32()
        guard state <= 1 else { throw .invalidField("msi route: state \(state) is not MASKED or ENABLED") }
        let address = try r.u64()
        let data = try r.u32()
        guard try r.u32() == 0 else { throw .invalidField("msi route: reserved word is not zero") }
        try r.finish()
        return MSIRoute(vector: vector, enabled: state == 1, address: address, data: data)
    }
}

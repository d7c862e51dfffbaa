import Glibc
import HVCore
import HVIPC

/// Parses `--device PATH,profile=FILE[,pio=BASE:LEN][,irq=N][,memory][,pci=DD.F[,barN=mmio|pio:SIZE]...][,KEY=VALUE]...`
/// into a device spec: a third-party device process, jailed under its own profile like hv's own.
/// `pci=DD.F` makes it PCI function 00:DD.F (its config space arrives as CONFIG_READ/WRITE on a
/// PCI_CONFIG resource); each `barN=` declares BAR N, which the guest's firmware places.
/// `tenant` is nil with `--no-sandbox`.
func pluginDevice(_ text: String, index: Int, tenant: String?) throws(UsageError) -> DeviceSpec {
    try pluginDevice(text, index: index, jail: tenant.map { .tenant($0) } ?? .unsandboxed)
}

/// `pluginDevice(_:index:tenant:)` with the jail given: `.preview` plans one without a tenant.
func pluginDevice(_ text: String, index: Int, jail: PluginManifest.Jail) throws(UsageError) -> DeviceSpec {
    let fields = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
    if let first = fields.first, first.hasSuffix(".json") {
        return try PluginManifest.load(first).device(fields.dropFirst(), index: index, jail: jail)
    }
    guard let path = fields.first, path.utf8.first == UInt8(ascii: "/") else {
        throw UsageError(message: "invalid --device '\(text)': start with the device executable's absolute path")
    }
    var st = stat()
    guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, access(path, X_OK) == 0 else {
        throw UsageError(message: "--device: '\(path)' is not an executable file")
    }
    var spec = DeviceSpec(name: "device\(index)", executable: path, capabilities: [.statePage])
    var profile: String?
    var pciFunction: UInt16?
    var config: [(key: String, value: String)] = []
    func number(_ s: Substring) -> UInt64? {
        s.hasPrefix("0x") ? UInt64(s.dropFirst(2), radix: 16) : UInt64(s)
    }
    for field in fields.dropFirst() {
        let parts = field.split(separator: "=", maxSplits: 1)
        let key = parts.first.map(String.init) ?? ""
        let value = parts.count > 1 ? parts[1] : ""
        switch key {
        case "profile": profile = String(value)
        case "memory" where parts.count == 1: spec.mapsGuestMemory = true
        case "pio":
            let range = value.split(separator: ":")
            guard range.count == 2, let base = number(range[0]), let length = number(range[1]),
                  length > 0, base + length <= 0x10000 else {
                throw UsageError(message: "invalid --device pio '\(value)': use BASE:LENGTH within the 64 KiB port space, e.g. pio=0x510:2")
            }
            spec.resources.append(Resource(kind: .pio, base: base, length: length))
        case "pci":
            guard pciFunction == nil, let bdf = PluginManifest.pciSlot(value) else {
                throw UsageError(message: "invalid --device pci '\(value)': use DEVICE.FUNCTION on bus 0, device 01-1f in hex, e.g. pci=03.0, once")
            }
            pciFunction = bdf
            spec.capabilities.formUnion([.interruptLevel, .msi])  // its own INTx and MSI-X, as above
            spec.resources.append(Resource(kind: .pciConfig, base: UInt64(bdf), length: 256))
        case let bar where bar.hasPrefix("bar") && bar.count == 4:
            let parts = value.split(separator: ":")
            guard let bdf = pciFunction else { throw UsageError(message: "--device \(bar)= needs pci=DD.F before it") }
            guard let index = UInt64(bar.dropFirst(3)), index < 6, parts.count == 2, parts[0] == "mmio" || parts[0] == "pio",
                  let size = number(parts[1]) else {
                throw UsageError(message: "invalid --device \(bar) '\(value)': use barN=mmio:SIZE or barN=pio:SIZE with N from 0 to 5")
            }
            spec.resources.append(Resource(kind: parts[0] == "mmio" ? .pciMMIOBar : .pciPIOBar,
                                           base: UInt64(bdf) << 8 | index, length: size))
        case "irq":
            guard let irq = number(value), irq < 24 else { throw UsageError(message: "invalid --device irq '\(value)': use 0 to 23") }
            spec.interruptGSIs.append(UInt32(irq))
        case "name":
            guard !value.isEmpty else { throw UsageError(message: "--device name= needs a value") }
            spec.name = String(value)
        default:
            guard parts.count == 2 else { throw UsageError(message: "invalid --device field '\(field)': use KEY=VALUE") }
            config.append((key, String(value)))
        }
    }
    spec.config = SettingsText.encode(config)
    if jail != .unsandboxed {
        guard let profile else {
            throw UsageError(message: "--device \(path) has no profile=FILE: every device runs sandboxed (or pass --no-sandbox to debug)")
        }
        if case .tenant(let tenant) = jail {
            spec.sandbox = try DeviceCatalog.plan(profilePath: profile, tenant: tenant, executable: path)
        } else {
            spec.sandbox = try DeviceCatalog.plan(profilePath: profile, outsideID: 0, executable: path)
        }
    }
    return spec
}

extension PluginManifest {
    /// How the device is to run.
    public enum Jail: Equatable, Sendable {
        /// Unsandboxed (`--no-sandbox`).
        case unsandboxed
        /// Jailed as this tenant.
        case tenant(String)
        /// Jailed, for showing what it would get (no tenant is registered).
        case preview
    }

    /// The device this manifest describes, with `fields` (`name=`, `irq=`, `pio=`, `pci=` and
    /// settings as `KEY=VALUE`) applied: `--device MANIFEST.json,…`, jailed as `jail` says.
    /// `irq=`, `pio=` and `pci=` replace what the manifest asks for (a second instance of a
    /// plugin needs its own ports and lines); repeated `irq=`/`pio=` give several.
    public func device(_ fields: some Sequence<String>, index: Int, jail: Jail) throws(UsageError) -> DeviceSpec {
        var r = resources
        var instance = index == 0 ? name : "\(name)\(index)"
        var irqs: [UInt32]?, pio: [Range]?
        var given: [(key: String, value: String)] = []
        for field in fields {
            let parts = field.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty else {
                throw UsageError(message: "invalid --device field '\(field)' for plugin \(name): use KEY=VALUE")
            }
            let (key, value) = (parts[0], parts[1])
            switch key {
            case "name":
                guard Self.isInstanceName(value) else {
                    throw UsageError(message: "invalid --device name '\(value)': use 1 to 32 of a-z, 0-9 and -")
                }
                instance = value
            case "irq":
                guard let irq = parseInteger(value), (0...23).contains(irq) else { throw UsageError(message: "invalid --device irq '\(value)': use 0 to 23") }
                irqs = (irqs ?? []) + [UInt32(irq)]
            case "pio":
                let range = value.split(separator: ":").map(String.init)
                guard range.count == 2, let base = parseInteger(range[0]), let length = parseInteger(range[1]),
                      base >= 0, length > 0, base + length <= 0x10000 else {
                    throw UsageError(message: "invalid --device pio '\(value)': use BASE:LENGTH within the 64 KiB port space, e.g. pio=0x510:2")
                }
                pio = (pio ?? []) + [Range(base: UInt64(base), length: UInt64(length))]
            case "pci":
                guard r.pci != nil else { throw UsageError(message: "plugin \(name) is not a PCI device; its manifest has no resources.pci") }
                guard let bdf = Self.pciSlot(value) else {
                    throw UsageError(message: "invalid --device pci '\(value)': use DEVICE.FUNCTION on bus 0, device 01-1f in hex, e.g. pci=03.0")
                }
                r.pci?.device = bdf >> 3
                r.pci?.function = bdf & 7
            case "profile", "memory":
                throw UsageError(message: "--device \(source): \(key) comes from the manifest; edit it there")
            default:
                given.append((key, value))
            }
        }
        if let irqs { r.irqs = irqs }
        if let pio { r.pio = pio }

        let executablePath = interpreter?.path ?? executable
        var spec = DeviceSpec(name: instance, executable: executablePath, capabilities: [.statePage])
        spec.resources = r.pio.map { Resource(kind: .pio, base: $0.base, length: $0.length) }
            + r.mmio.map { Resource(kind: .mmio, base: $0.base, length: $0.length) }
        if let pci = r.pci {
            // A PCI function interrupts through its own INTx pin and MSI-X table; the core
            // confines SET_IRQ_LEVEL and SET_MSI_ROUTE to this function.
            spec.capabilities.formUnion([.interruptLevel, .msi])
            spec.resources.append(Resource(kind: .pciConfig, base: UInt64(pci.bdf), length: 256))
            for bar in pci.bars {
                spec.resources.append(Resource(kind: bar.kind == .mmio ? .pciMMIOBar : .pciPIOBar, base: UInt64(pci.bdf) << 8 | UInt64(bar.index), length: bar.size))
            }
        }
        spec.interruptGSIs = r.irqs
        spec.mapsGuestMemory = r.guestMemory
        spec.config = SettingsText.encode(try settingValues(given))
        if let interpreter {
            let directory = { (path: String) in path[..<(path.lastIndex(of: "/") ?? path.startIndex)] }
            if case .unsandboxed = jail, let apart = files.first(where: { directory($0) != directory(executable) }) {
                throw UsageError(message: "--no-sandbox runs plugin \(name)'s script where it is, so its files must sit beside it: \(apart) does not")
            }
            // Unsandboxed, the script runs where it is; jailed, from hv's copy under /plugin.
            spec.arguments = interpreter.arguments
            spec.script = executable
        }
        if jail != .unsandboxed {
            var plan: SandboxPlan
            switch jail {
            case .tenant(let tenant): plan = try DeviceCatalog.plan(profilePath: profile, tenant: tenant, executable: executablePath)
            default: plan = try DeviceCatalog.plan(profilePath: profile, outsideID: 0, executable: executablePath)
            }
            if let interpreter {
                plan.exposedPaths += interpreter.readOnlyPaths.flatMap { Self.expand($0) }
                plan.pluginFiles = files  // the script goes first when the process starts
            }
            spec.sandbox = plan
        }
        return spec
    }
}

import Glibc
import HVCore
import HVIPC

/// Parses `--device PATH,profile=FILE[,pio=BASE:LEN][,irq=N][,memory][,pci=DD.F[,barN=mmio|pio:SIZE]...][,KEY=VALUE]...`
/// into a device spec: a third-party device process, jailed under its own profile like hv's own.
/// `pci=DD.F` makes it PCI function 00:DD.F (its config space arrives as CONFIG_READ/WRITE on a
/// PCI_CONFIG resource); each `barN=` declares BAR N, which the guest's firmware places.
/// `tenant` is nil with `--no-sandbox`.
func pluginDevice(_ text: String, index: Int, tenant: String?) throws(UsageError) -> DeviceSpec {
    let fields = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
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
            let parts = value.split(separator: ".")
            guard pciFunction == nil, parts.count == 2, let device = UInt16(parts[0], radix: 16), let function = UInt16(parts[1]),
                  (1...31).contains(device), function < 8 else {
                throw UsageError(message: "invalid --device pci '\(value)': use DEVICE.FUNCTION on bus 0, device 01-1f in hex, e.g. pci=03.0, once")
            }
            pciFunction = device << 3 | function
            spec.resources.append(Resource(kind: .pciConfig, base: UInt64(device << 3 | function), length: 256))
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
    if let tenant {
        guard let profile else {
            throw UsageError(message: "--device \(path) has no profile=FILE: every device runs sandboxed (or pass --no-sandbox to debug)")
        }
        spec.sandbox = try DeviceCatalog.plan(profilePath: profile, tenant: tenant, executable: path)
    }
    return spec
}

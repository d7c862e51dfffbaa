import Glibc
import HVCore
import HVIPC

/// Parses `--device PATH,profile=FILE[,pio=BASE:LEN][,irq=N][,memory][,KEY=VALUE]...` into a
/// device spec: a third-party device process, jailed under its own profile like hv's own.
/// `tenant` is nil with `--no-sandbox`.
func pluginDevice(_ text: String, index: Int, tenant: String?) throws(UsageError) -> DeviceSpec {
    let fields = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
    guard let path = fields.first, path.hasPrefix("/") else {
        throw UsageError(message: "invalid --device '\(text)': start with the device executable's absolute path")
    }
    guard access(path, X_OK) == 0 else { throw UsageError(message: "--device: '\(path)' is not an executable file") }
    var spec = DeviceSpec(name: "device\(index)", executable: path, capabilities: [.statePage])
    var profile: String?
    var config: [String] = []
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
        case "irq":
            guard let irq = number(value), irq < 24 else { throw UsageError(message: "invalid --device irq '\(value)': use 0 to 23") }
            spec.interruptGSIs.append(UInt32(irq))
        case "name":
            guard !value.isEmpty else { throw UsageError(message: "--device name= needs a value") }
            spec.name = String(value)
        default:
            guard parts.count == 2 else { throw UsageError(message: "invalid --device field '\(field)': use KEY=VALUE") }
            config.append(field)
        }
    }
    spec.config = config.joined(separator: "\n")
    if let tenant {
        guard let profile else {
            throw UsageError(message: "--device \(path) has no profile=FILE: every device runs sandboxed (or pass --no-sandbox to debug)")
        }
        spec.sandbox = try DeviceCatalog.plan(profilePath: profile, tenant: tenant)
    }
    return spec
}

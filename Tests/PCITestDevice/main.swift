import HVDeviceSDK

// A test-only PCI function (1234:11e9, class 0xFF "unassigned") for the PCI bus tests: its config
// space is a type-0 header with IDs and class; BAR 0 is 4 KiB of memory and BAR 1 16 bytes of
// I/O, both plain scratch registers that read back what was written. The core owns the command
// register and the BARs, and places the BARs wherever the guest programs them; this device only
// ever sees offsets within each BAR.

final class PCITestFunction: DeviceModel {
    let runtime: DeviceRuntime
    /// BAR 0's 4 KiB, then BAR 1's 16 bytes, as 64-bit words.
    var scratch = [UInt64](repeating: 0, count: 512 + 2)

    init(runtime: DeviceRuntime) {
        self.runtime = runtime
    }

    func read(resource: Int, offset: UInt64, size: Int) -> UInt64 {
        let kind = runtime.resources[resource].kind
        switch kind {
        case .pciConfig:
            // Vendor 1234, device 11e9, status 0, revision 1, class ff0000, header type 0,
            // interrupt pin A. The command register and BARs read here are the core's, not these.
            let header: [UInt32] = [0x11E9_1234, 0, 0xFF00_0001, 0]
            var value: UInt64 = 0
            for i in 0..<size {
                let register = Int(offset) + i
                var byte: UInt8 = 0
                if register < 16 { byte = UInt8(truncatingIfNeeded: header[register / 4] >> (8 * UInt32(register % 4))) }
                if register == 0x3D { byte = 1 }
                value |= UInt64(byte) << (8 * UInt64(i))
            }
            return value
        case .pciMMIOBar:
            return scratch[Int(offset / 8)] >> (8 * (offset % 8)) & mask(size)
        default:
            return scratch[512 + Int(offset / 8)] >> (8 * (offset % 8)) & mask(size)
        }
    }

    func write(resource: Int, offset: UInt64, size: Int, value: UInt64) {
        let kind = runtime.resources[resource].kind
        guard kind != .pciConfig else { return }
        let slot = (kind == .pciMMIOBar ? 0 : 512) + Int(offset / 8), shift = 8 * (offset % 8)
        scratch[slot] = (scratch[slot] & ~(mask(size) << shift)) | (value & mask(size)) << shift
    }

    private func mask(_ size: Int) -> UInt64 { size >= 8 ? ~0 : (1 << (8 * UInt64(size))) - 1 }
}

let runtime = DeviceRuntime.startOrExit(name: "pci-testdevice", capabilities: [.registerRing])
runtime.run(PCITestFunction(runtime: runtime))

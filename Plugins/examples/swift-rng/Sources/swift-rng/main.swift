import HVDeviceSDK

// A virtio entropy device (virtio 1.2 §5.4) as an hv plugin, on the SDK's virtio-pci transport:
// the driver offers device-writable buffers on its one queue; the device fills each with random
// bytes (at most `max_bytes`, a manifest setting) and hands it back. Chains complete in order
// and filling one twice is harmless, so a restarted process simply resumes at the used index.

final class VirtioRNG: VirtioDevice {
    let runtime: DeviceRuntime
    let maxBytes: Int
    private var generator = SystemRandomNumberGenerator()  // getrandom(2): allowed by base-device
    private var refusals = 0

    init(runtime: DeviceRuntime) {
        self.runtime = runtime
        // The manifest declares max_bytes as an integer from 1 to 65536 with a default, so hv
        // has checked it; a device still treats its input as untrusted.
        maxBytes = min(max(Int(runtime.config["max_bytes"] ?? "") ?? 4096, 1), 65536)
    }

    var deviceType: UInt16 { 4 }           // entropy source
    var pciClass: UInt32 { 0xFF_0000 }     // unclassified, as other virtio-rng devices
    var features: UInt64 { 0 }             // none beyond VERSION_1, which the transport adds
    var queueCount: Int { 1 }              // requestq
    var maxQueueSize: UInt16 { 64 }
    var completesInOrder: Bool { true }

    func readConfig(offset: Int, size: Int) -> UInt64 { 0 }   // no configuration structure
    func writeConfig(offset: Int, size: Int, value: UInt64) {}
    func reset() {}

    func queueNotified(_ index: Int, transport: VirtioPCITransport) {
        guard let memory = transport.memory else { return }
        while let taken = transport.takeNext(queue: index) {
            switch taken {
            case .success(let chain):
                let count = Int(min(chain.writableLength, UInt64(maxBytes)))
                var bytes = [UInt8](repeating: 0, count: count)
                for start in stride(from: 0, to: count, by: 8) {
                    withUnsafeBytes(of: generator.next()) { random in
                        for k in 0..<min(8, count - start) { bytes[start + k] = random[k] }
                    }
                }
                let written = chain.write(bytes, memory)
                transport.complete(queue: index, head: chain.head, written: UInt32(written))
            case .failure(let error):
                refusals += 1
                if refusals <= 5 { runtime.log(.warning, "refused a request: \(error)") }
                transport.completeRefused(queue: index)
            }
        }
    }
}

let runtime = DeviceRuntime.startOrExit(name: "swift-rng", capabilities: [.registerRing, .interruptLevel, .msi, .statePage])
let transport = VirtioPCITransport(runtime: runtime, device: VirtioRNG(runtime: runtime))
runtime.run(transport)

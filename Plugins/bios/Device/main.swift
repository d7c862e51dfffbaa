import Glibc
import HVBootLoader
import HVDeviceSDK

// The BIOS device: loads the guest into RAM and tells the core where the boot vCPU starts.
// Guest images are untrusted input, so they are parsed here, in a sandboxed process, and never
// in the core. Host file 0 is the image, opened by the trusted side; config `cmdline=` is the
// command line handed to the guest.

/// Guest RAM as the multiboot loader sees it: the low region, starting at guest-physical 0.
struct LowRAM: GuestPhysicalMemory {
    let memory: GuestMemory
    var ramSize: UInt64 { memory.lowRAMSize }
    func write(_ bytes: UnsafeRawBufferPointer, at guestAddress: UInt64) throws(GuestMemoryError) {
        do { try memory.write(bytes, at: guestAddress) } catch {
            throw GuestMemoryError(address: error.address, count: error.count)
        }
    }
    func zero(at guestAddress: UInt64, count: UInt64) throws(GuestMemoryError) {
        do { try memory.zero(at: guestAddress, count: count) } catch {
            throw GuestMemoryError(address: error.address, count: error.count)
        }
    }
}

/// Largest image accepted; a bigger file is refused before anything is read into memory.
let maximumImageBytes: Int64 = 512 << 20

/// Why the guest could not be loaded, in one line.
struct LoadFailure: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}

func loadGuest(_ runtime: DeviceRuntime) -> Result<Void, LoadFailure> {
    guard let image = runtime.hostFiles[0], let memory = runtime.guestMemory else {
        return .failure(LoadFailure("no guest image or guest memory was handed over"))
    }
    let size: Int64
    do { size = try image.size() } catch { return .failure(LoadFailure("cannot stat the guest image: \(error.errno)")) }
    guard size > 0 else { return .failure(LoadFailure("the guest image is empty")) }
    guard size <= maximumImageBytes else { return .failure(LoadFailure("the guest image is \(size) bytes, larger than the \(maximumImageBytes >> 20) MiB limit")) }
    let bytes: [UInt8]
    do { bytes = try image.readAll() } catch { return .failure(LoadFailure("cannot read the guest image: \(error.errno)")) }
    let entry: MultibootEntry
    do {
        entry = try MultibootLoader(image: bytes).load(into: LowRAM(memory: memory), commandLine: runtime.config["cmdline"] ?? "")
    } catch {
        return .failure(LoadFailure(error.description))
    }
    do {
        try runtime.setBootState(BootState(mode: .flat32, rip: UInt64(entry.entryPoint),
                                           rax: UInt64(MultibootEntry.bootloaderMagic), rbx: UInt64(entry.infoAddress)))
    } catch {
        return .failure(LoadFailure("the core refused the boot state: \(error)"))
    }
    return .success(())
}

/// The BIOS owns no registers yet (fw_cfg, CMOS and friends come with firmware boot).
final class Firmware: DeviceModel {
    func read(resource: Int, offset: UInt64, size: Int) -> UInt64 { ~0 }
    func write(resource: Int, offset: UInt64, size: Int, value: UInt64) {}
}

let runtime = DeviceRuntime.startOrExit(name: "bios", capabilities: [.bootControl])
// A restarted BIOS must not load the guest again: it is already running.
if runtime.restartGeneration == 0 {
    if case .failure(let failure) = loadGuest(runtime) {
        runtime.log(.error, failure.reason)
        exit(2)
    }
}
runtime.run(Firmware())

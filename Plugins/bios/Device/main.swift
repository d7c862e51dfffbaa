import Glibc
import HVBIOSContract
import HVBootLoader
import HVDeviceSDK
import HVSys  // the firmware ROM mapping: hv's own platform wiring, not SDK API

// The BIOS device: the PC platform's firmware-facing pieces, in a sandboxed process.
//
// What it is handed (windows, interrupt lines, host files, settings) is named in BIOSContract.
// - Boot: in `multiboot` mode it parses the guest image (untrusted) into guest RAM and names the
//   entry state; in `linux` mode it loads a bzImage and an initrd (when handed one) by the 64-bit
//   Linux boot protocol; in `firmware` mode it copies the firmware image into the ROM memfd the
//   core maps read-only below 4 GiB, puts the BIOS's last 128 KiB at 0xE0000 as real PCs shadow
//   it, and lets the vCPU start at the reset vector.
// - Registers: CMOS/RTC (0x70–0x71, IRQ 8), the 0x402 debug console (to the debug output), fw_cfg
//   (0x510–0x511 and DMA at 0x514–0x51B), the config space of the i440FX host bridge, PIIX3 ISA
//   bridge and PIIX4 PM function (forwarded by the core's PCI host) and reset control at 0xCF9,
//   system control port A (0x92: fast A20, fast reset), the i8042 keyboard controller (0x60,
//   0x64, IRQ 1) and the ACPI PM block (0x600–0x60F: power-off, PM timer).
// - ACPI tables describing all that: fw_cfg files for SeaBIOS, or placed at 0xE0000 for direct boots.
// - Power-off (ACPI S5) and reset requests (i8042, 0xCF9, 0x92) go to the core as SYSTEM_EVENT.
// Images and guest-written registers are untrusted input: all of it is parsed here, never in the core.

/// Guest RAM as the loaders see it: the low region, starting at guest-physical 0.
struct LowRAM: GuestPhysicalMemory, GuestMemoryIO {
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
    func read(into buffer: UnsafeMutableRawBufferPointer, at address: UInt64) -> Bool {
        (try? memory.read(into: buffer, at: address)) != nil
    }
    func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) -> Bool {
        (try? memory.write(bytes, at: address)) != nil
    }
}

/// Why the guest could not be loaded, in one line.
struct LoadFailure: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}

/// Largest image accepted; a bigger file is refused before anything is read into memory.
let maximumImageBytes: Int64 = 512 << 20

func readImage(_ runtime: DeviceRuntime) throws(LoadFailure) -> [UInt8] {
    guard let image = runtime.hostFile(BIOSContract.HostFile.guestImage) else { throw LoadFailure("no guest image was handed over") }
    let size: Int64
    do { size = try image.size() } catch { throw LoadFailure("cannot stat the image: \(error.errno)") }
    guard size > 0 else { throw LoadFailure("the image is empty") }
    guard size <= maximumImageBytes else { throw LoadFailure("the image is \(size) bytes, larger than the \(maximumImageBytes >> 20) MiB limit") }
    do { return try image.readAll() } catch { throw LoadFailure("cannot read the image: \(error.errno)") }
}

func write(_ bytes: [UInt8], at address: UInt64, into memory: GuestMemory, what: String) throws(LoadFailure) {
    let failure = bytes.withUnsafeBytes { b -> GuestMemoryAccessError? in
        do throws(GuestMemoryAccessError) {
            try memory.write(b, at: address)
            return nil
        } catch {
            return error
        }
    }
    if let failure { throw LoadFailure("guest RAM is too small for \(what): \(failure)") }
}

func loadMultiboot(_ runtime: DeviceRuntime, _ memory: GuestMemory, _ settings: BIOSContract.Settings) throws(LoadFailure) {
    let bytes = try readImage(runtime)
    let entry: MultibootEntry
    do {
        entry = try MultibootLoader(image: bytes).load(into: LowRAM(memory: memory), commandLine: settings.commandLine)
    } catch {
        throw LoadFailure(error.description)
    }
    // The ACPI tables, where an OS scans for them (the multiboot loader keeps below 0xA0000 and
    // above 1 MiB).
    let acpi = ACPITables.placed(cpus: settings.cpus)
    try write(acpi.rsdp, at: ACPITables.directRSDPAddress, into: memory, what: "the ACPI tables")
    try write(acpi.tables, at: ACPITables.directTablesAddress, into: memory, what: "the ACPI tables")
    do {
        try runtime.setBootState(BootState(mode: .flat32, rip: UInt64(entry.entryPoint),
                                           rax: UInt64(MultibootEntry.bootloaderMagic), rbx: UInt64(entry.infoAddress)))
    } catch {
        throw LoadFailure("the core refused the boot state: \(error)")
    }
}

func loadLinux(_ runtime: DeviceRuntime, _ memory: GuestMemory, _ settings: BIOSContract.Settings) throws(LoadFailure) {
    let kernel = try readImage(runtime)
    var initrd: [UInt8] = []
    if let file = runtime.hostFile(BIOSContract.HostFile.initrd) {
        let size: Int64
        do { size = try file.size() } catch { throw LoadFailure("cannot stat the initrd: \(error.errno)") }
        guard size <= maximumImageBytes else { throw LoadFailure("the initrd is \(size) bytes, larger than the \(maximumImageBytes >> 20) MiB limit") }
        do { initrd = try file.readAll() } catch { throw LoadFailure("cannot read the initrd: \(error.errno)") }
    }
    let low = memory.lowRAMSize
    let total = memory.regions.reduce(0) { $0 + $1.size }
    let entry: LinuxEntry
    do {
        entry = try LinuxLoader(kernel: kernel, initrd: initrd)
            .load(into: LowRAM(memory: memory), ramAbove4G: total - low, commandLine: settings.commandLine,
                  cpus: settings.cpus)
    } catch {
        throw LoadFailure(error.description)
    }
    do {
        try runtime.setBootState(BootState(mode: .long64, rip: entry.entryPoint, rsp: entry.stackPointer, rsi: entry.bootParams,
                                           cr3: entry.pageTableRoot, gdtBase: entry.gdtBase, gdtLimit: entry.gdtLimit))
    } catch {
        throw LoadFailure("the core refused the boot state: \(error)")
    }
}

func loadFirmware(_ runtime: DeviceRuntime, _ memory: GuestMemory) throws(LoadFailure) {
    let bytes = try readImage(runtime)
    guard let romFD = runtime.hostFile(BIOSContract.HostFile.firmwareROM) else { throw LoadFailure("no firmware ROM was handed over") }
    let romSize: Int64
    do { romSize = try romFD.size() } catch { throw LoadFailure("cannot stat the firmware ROM: \(error.errno)") }
    guard Int64(bytes.count) == romSize, romSize % 65536 == 0 else {
        throw LoadFailure("the firmware image is \(bytes.count) bytes but the ROM is \(romSize): a BIOS image is a multiple of 64 KiB")
    }
    // The vCPU's first instruction is the image's 16 bytes below 4 GiB, the reset vector. Blank
    // there (erased flash reads 0xFF, a zero-filled file 0x00) is no firmware at all: the vCPU
    // would run through the blank and the VM would end without a word.
    let resetVector = bytes.suffix(16)
    if resetVector.allSatisfy({ $0 == 0 }) || resetVector.allSatisfy({ $0 == 0xFF }) {
        throw LoadFailure("the firmware image has no code at its reset vector (its last 16 bytes are all 0x\(resetVector.first == 0 ? "00" : "FF")): it is not a BIOS image")
    }
    do {
        let rom = try SharedMapping(fd: romFD, count: Int(romSize))
        bytes.withUnsafeBytes { rom.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    } catch {
        throw LoadFailure("cannot map the firmware ROM: \(error)")
    }
    // The legacy BIOS area: the image's last 128 KiB at 0xE0000–0xFFFFF, where the reset vector's
    // far jump lands (real chipsets alias the top of the flash there).
    let legacy = min(bytes.count, 128 << 10)
    try write(Array(bytes.suffix(legacy)), at: 0x10_0000 - UInt64(legacy), into: memory, what: "the legacy BIOS area")
    do { try runtime.setBootState(BootState(mode: .reset)) } catch {
        throw LoadFailure("the core refused the boot state: \(error)")
    }
}

/// Everything that must survive a restart of this process, kept in the state page.
struct PlatformState: BitwiseCopyable {
    static let magicValue: UInt32 = 0x4856_4253  // "HVBS"
    var magic: UInt32
    var cmos: CMOS
    var pci: PCIHostBridge
    var keyboard: I8042
    var power: ACPIPowerManagement
    var fwSelector: UInt16
    var fwOffset: UInt32
}

final class Platform: DeviceModel {
    private let runtime: DeviceRuntime
    private var state: PlatformState
    private var fwcfg: FirmwareConfig
    private let memory: LowRAM?
    private let console: FileDescriptor?
    private var pendingConsole: [UInt8] = []
    private var irqHigh = false
    private var keyboardIRQHigh = false
    /// Set once a power-off or reset went to the core: the machine is ending, ignore the rest.
    private var ended = false

    init(runtime: DeviceRuntime, settings: BIOSContract.Settings) {
        self.runtime = runtime
        let low = runtime.guestMemory?.lowRAMSize ?? 0
        let total = runtime.guestMemory?.regions.reduce(0) { $0 + $1.size } ?? 0
        let cpus = settings.cpus
        fwcfg = FirmwareConfig.standard(ramBelow4G: low, ramAbove4G: total - low, cpus: cpus,
                                        bootMenu: settings.bootMenu,
                                        bootFailWaitMilliseconds: 60_000,
                                        bootOrder: settings.bootOrder.joined(separator: "\n"))
        memory = runtime.guestMemory.map { LowRAM(memory: $0) }
        console = runtime.hostFile(BIOSContract.HostFile.debugOutput)
        let fresh = PlatformState(magic: PlatformState.magicValue,
                                  cmos: CMOS(ramBelow4G: low, ramAbove4G: total - low, cpus: cpus),
                                  pci: PCIHostBridge(), keyboard: I8042(), power: ACPIPowerManagement(),
                                  fwSelector: 0, fwOffset: 0)
        if runtime.restartGeneration > 0, let page = runtime.statePage, page.load(PlatformState.self).magic == PlatformState.magicValue {
            var restored = page.load(PlatformState.self)
            restored.cmos.sanitize()
            restored.keyboard.sanitize()
            state = restored
            fwcfg.cursor = (state.fwSelector, state.fwOffset)
        } else {
            state = fresh
        }
    }

    private static func now() -> (seconds: Int64, nanoseconds: Int64) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return (Int64(ts.tv_sec), Int64(ts.tv_sec) &* 1_000_000_000 &+ Int64(ts.tv_nsec))
    }

    /// The host bridge function whose configuration space `window` is.
    private static func pciFunction(_ window: BIOSContract.Window) -> PCIHostBridge.Function? {
        switch window {
        case .hostBridgeConfig: .host
        case .isaBridgeConfig: .isa
        case .powerManagementConfig: .pm
        default: nil
        }
    }

    func read(resource: Int, offset: UInt64, size: Int) -> UInt64 {
        defer { afterAccess() }
        guard let window = BIOSContract.Window(rawValue: resource) else { return ~0 }
        switch window {
        case .cmosRTC:
            let t = Self.now()
            state.cmos.tick(nowNanoseconds: t.nanoseconds)
            return offset == 0 ? UInt64(state.cmos.readIndex()) : UInt64(state.cmos.readData(now: t.seconds))
        case .debugConsole: return 0xE9  // Bochs/QEMU debug-console presence byte
        case .firmwareConfig: return offset == 1 ? UInt64(fwcfg.readData()) : 0
        case .firmwareConfigDMA: return fwcfg.readDMARegister(offset: Int(offset) + 4, size: size)
        case .resetControl: return UInt64(state.pci.resetControl)
        case .hostBridgeConfig, .isaBridgeConfig, .powerManagementConfig:
            guard let function = Self.pciFunction(window) else { return ~0 }
            return UInt64(state.pci.readConfig(function, register: Int(offset), size: size))
        case .portA: return 0x02  // A20 enabled (KVM never masks A20)
        case .keyboardData:
            let byte = state.keyboard.readData()
            keyboardIRQHigh = false  // reading the buffer drops IRQ 1; the next byte raises it again
            return UInt64(byte)
        case .keyboardCommand: return UInt64(state.keyboard.readStatus())
        case .powerManagement: return UInt64(state.power.read(offset: Int(offset), size: size, nowNanoseconds: HVSys.monotonicNanoseconds()))
        }
    }

    /// Hands a power-off or reset to the core, once.
    private func end(_ kind: SystemEvent.Kind, _ why: String) {
        guard !ended else { return }
        ended = true
        runtime.log(.info, why)
        flush()
        runtime.signalSystemEvent(kind)
    }

    func write(resource: Int, offset: UInt64, size: Int, value: UInt64) {
        defer { afterAccess() }
        guard let window = BIOSContract.Window(rawValue: resource) else { return }
        switch window {
        case .cmosRTC:
            let t = Self.now()
            state.cmos.tick(nowNanoseconds: t.nanoseconds)
            if offset == 0 { state.cmos.writeIndex(UInt8(truncatingIfNeeded: value)) } else {
                state.cmos.writeData(UInt8(truncatingIfNeeded: value), now: t.seconds)
            }
        case .debugConsole:
            pendingConsole.append(UInt8(truncatingIfNeeded: value))
            if pendingConsole.count >= 4096 { flush() }
        case .firmwareConfig: if offset == 0 { fwcfg.writeSelector(UInt16(truncatingIfNeeded: value)) }
        case .firmwareConfigDMA:
            if let memory { fwcfg.writeDMARegister(offset: Int(offset) + 4, size: size, value: value, memory: memory) }
        case .resetControl:
            if state.pci.writeResetControl(UInt8(truncatingIfNeeded: value)) { end(.reset, "the guest asked for a reset (port 0xCF9)") }
        case .hostBridgeConfig, .isaBridgeConfig, .powerManagementConfig:
            guard let function = Self.pciFunction(window) else { return }
            state.pci.writeConfig(function, register: Int(offset), size: size, value: UInt32(truncatingIfNeeded: value))
        case .portA:
            if value & 1 != 0 { end(.reset, "the guest asked for a reset (port 0x92 fast reset)") }
        case .keyboardData:
            if state.keyboard.writeData(UInt8(truncatingIfNeeded: value)) == .reset {
                end(.reset, "the guest asked for a reset (i8042 output port)")
            }
        case .keyboardCommand:
            if state.keyboard.writeCommand(UInt8(truncatingIfNeeded: value)) == .reset {
                end(.reset, "the guest asked for a reset (i8042 command 0x\(String(value & 0xFF, radix: 16)))")
            }
        case .powerManagement:
            switch state.power.write(offset: Int(offset), size: size, value: UInt32(truncatingIfNeeded: value)) {
            case .none: break
            case .powerOff: end(.powerOff, "the guest powered off (ACPI S5)")
            case .unsupportedSleep(let type):
                runtime.log(.warning, "the guest asked for ACPI sleep type \(type); hv supports only S5 (power-off), the request is ignored")
            }
        }
    }

    /// The RTC's next enabled interrupt, mapped from the wall clock onto the runtime's monotonic clock.
    func nextDeadline() -> UInt64? {
        let wall = Self.now().nanoseconds
        guard let next = state.cmos.nextInterruptNanoseconds(after: wall) else { return nil }
        return HVSys.monotonicNanoseconds() &+ UInt64(max(next - wall, 0))
    }

    func deadlineReached(now: UInt64) {
        state.cmos.tick(nowNanoseconds: Self.now().nanoseconds)
        afterAccess()
    }

    private func afterAccess() {
        let cursor = fwcfg.cursor
        state.fwSelector = cursor.selector
        state.fwOffset = cursor.offset
        // ISA IRQ 8 is edge-triggered at the PIC: deliver the rising edge.
        let high = state.cmos.interruptLine
        if high && !irqHigh { runtime.interrupts[BIOSContract.Interrupt.rtc.rawValue]?.pulse() }
        irqHigh = high
        // IRQ 1 is edge-triggered too: one edge per byte the keyboard controller loads.
        let keyboardHigh = state.keyboard.interruptLine
        if keyboardHigh && !keyboardIRQHigh { runtime.interrupts[BIOSContract.Interrupt.keyboard.rawValue]?.pulse() }
        keyboardIRQHigh = keyboardHigh
    }

    func flush() {
        if !pendingConsole.isEmpty {
            try? console?.writeAll(pendingConsole)  // debug output: a failing sink loses only the log
        }
        pendingConsole.removeAll(keepingCapacity: true)
        runtime.statePage?.store(state)
    }
}

// State page layout (version 1): PlatformState at 0.
let runtime = DeviceRuntime.startOrExit(name: "bios", capabilities: [.registerRing, .statePage, .bootControl, .snapshot, .dirtyLog], stateVersion: 1)
let settings: BIOSContract.Settings
do { settings = try BIOSContract.Settings(decoding: runtime.config) } catch {
    runtime.log(.error, "\(error)")
    exit(2)
}
// A restarted BIOS must not load the guest again: it is already running.
if runtime.restartGeneration == 0 {
    do throws(LoadFailure) {
        guard let memory = runtime.guestMemory else { throw LoadFailure("no guest memory was handed over") }
        switch settings.mode {
        case .firmware: try loadFirmware(runtime, memory)
        case .linux: try loadLinux(runtime, memory, settings)
        case .multiboot: try loadMultiboot(runtime, memory, settings)
        }
    } catch {
        runtime.log(.error, error.reason)
        exit(2)
    }
}
runtime.run(Platform(runtime: runtime, settings: settings))

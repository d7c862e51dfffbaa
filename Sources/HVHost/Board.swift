import Glibc
import HVBalloonContract
import HVBIOSContract
import HVCore
import HVIPC
import HVNetContract
import HVSCSIContract
import HVSerialContract
import HVSys
import Synchronization

/// The devices hv itself puts on the board, each with what it claims (ports, MMIO, its PCI
/// function, IRQ lines), its executable, capabilities and built-in profile name, before any file
/// is opened: the serial port, the BIOS/platform device, a virtio-scsi adapter per disk (and the
/// CD-ROM drive's), a virtio-net function per NIC, and the balloon. `platformDevices` hands them
/// their files and settings; `checkPlugin` checks a plugin against them.
func boardDevices(disks: Int, cdrom: Bool, nics: Int, balloon: Bool) -> [(spec: DeviceSpec, profile: String)] {
    func virtioPCI(_ name: String, _ executable: String, _ slot: UInt8) -> DeviceSpec {
        DeviceSpec(name: name, executable: deviceExecutable(executable), resources: VirtioPCILayout.resources(device: slot),
                   capabilities: [.interruptLevel, .msi, .statePage], mapsGuestMemory: true)
    }
    var devices = [
        (DeviceSpec(name: "serial0", executable: deviceExecutable("hv-serial"),
                    resources: [SerialContract.registers], interruptGSIs: [SerialContract.interruptGSI], capabilities: [.statePage]), "serial"),
        (DeviceSpec(name: "bios", executable: deviceExecutable("hv-bios"),
                    resources: BIOSContract.resources, interruptGSIs: BIOSContract.interruptGSIs,
                    capabilities: [.bootControl, .statePage], mapsGuestMemory: true), "bios"),
    ]
    // Each disk is its own virtio-scsi adapter in its own process, and so is the CD-ROM drive.
    for i in 0..<disks { devices.append((virtioPCI("disk\(i)", "hv-scsi", PCISlots.disk(i)), "scsi")) }
    if cdrom { devices.append((virtioPCI("cdrom0", "hv-scsi", PCISlots.cdrom), "scsi")) }
    // Each NIC is its own virtio-net process.
    for i in 0..<nics { devices.append((virtioPCI("net\(i)", "hv-net", PCISlots.nic(i)), "net")) }
    if balloon { devices.append((virtioPCI(VMControl.balloonDevice, "hv-balloon", PCISlots.balloon), "balloon")) }
    return devices
}

/// The board's devices with their host files and settings, and any --device plugins, each
/// planned into its tenant's sandbox. What each shipped device is handed is named by its
/// contract module.
func platformDevices(_ options: VMDefinition, boot: BootFiles, firmwareROM: FileDescriptor?,
                     serialFiles: [SerialContract.HostFile: FileDescriptor],
                     debugOutput: FileDescriptor, tenant: String?, disks: [DiskImage], cdrom: FileDescriptor?,
                     nics: [AttachedNIC]) throws -> [DeviceSpec] {
    let board = boardDevices(disks: disks.count, cdrom: cdrom != nil, nics: nics.count, balloon: options.balloon != nil)
    var devices = board.map(\.spec)
    func give(_ name: String, files: [UInt16: FileDescriptor], config: String = "") {
        guard let i = devices.firstIndex(where: { $0.name == name }) else { return }
        devices[i].hostFiles = files
        devices[i].config = config
    }
    give("serial0", files: hostFileTable(serialFiles))
    // With a CD-ROM drive, the firmware boots it first.
    let bootOrder = cdrom == nil ? [] : ["/pci@i0cf8/*@\(String(PCISlots.cdrom, radix: 16))/*@0/*@0,0"]
    var biosFiles: [BIOSContract.HostFile: FileDescriptor] = [.guestImage: boot.image, .debugOutput: debugOutput]
    biosFiles[.firmwareROM] = firmwareROM
    biosFiles[.initrd] = boot.initrd
    let biosSettings = BIOSContract.Settings(mode: boot.mode, cpus: options.cpus, bootMenu: options.boot.menu,
                                             bootOrder: bootOrder, commandLine: options.boot.cmdline)
    give("bios", files: hostFileTable(biosFiles), config: biosSettings.encoded)
    for (i, disk) in disks.enumerated() {
        let settings = SCSIContract.Settings(kind: .disk, readOnly: disk.readOnly, serial: "hv-disk\(i)",
                                             format: disk.format == .qcow2 ? .qcow2 : .raw,
                                             backingFormats: disk.backing.map { $0.format == .qcow2 ? .qcow2 : .raw },
                                             rateLimit: i < options.disks.count ? options.disks[i].rateLimit?.settings ?? .init() : .init())
        var files = hostFileTable([SCSIContract.HostFile.medium: disk.file])
        for (depth, image) in disk.backing.enumerated() { files[SCSIContract.backingSlot(depth)] = image.file }
        give("disk\(i)", files: files, config: settings.encoded)
    }
    if let cdrom {
        give("cdrom0", files: hostFileTable([SCSIContract.HostFile.medium: cdrom]),
             config: SCSIContract.Settings(kind: .cdrom, readOnly: true, serial: "hv-cdrom0").encoded)
    }
    for (i, nic) in nics.enumerated() {
        var settings = nic.settings
        if i < options.nics.count {
            settings.receiveLimit = options.nics[i].rxRateLimit?.settings ?? .init()
            settings.transmitLimit = options.nics[i].txRateLimit?.settings ?? .init()
        }
        give("net\(i)", files: hostFileTable(nic.hostFiles), config: settings.encoded)
    }
    if let balloon = options.balloon { give(VMControl.balloonDevice, files: [:], config: balloon.settings.encoded) }
    do {
        if let tenant {
            for (i, planned) in board.enumerated() {
                devices[i].sandbox = try DeviceCatalog.plan(profilePath: try DeviceCatalog.builtInProfilePath(planned.profile), tenant: tenant)
            }
        }
        for (i, spec) in options.devices.enumerated() { devices.append(try pluginDevice(spec, index: i, tenant: tenant)) }
        try checkInterruptLines(devices)
    } catch {
        throw UsageError(message: error.message)
    }
    return devices
}

/// Checks that `plugin` fits into the VM `options` describes, as `hvctl run` would find when it
/// starts it: its ports, MMIO, PCI function and IRQ lines are free of the board's devices and
/// of the definition's other plugins. The definition's plugins are planned jailed (`.preview`),
/// without a tenant. Returns the names of the devices it was checked against.
@discardableResult
public func checkPlugin(_ plugin: DeviceSpec, fitsInto options: VMDefinition) throws(UsageError) -> [String] {
    var devices = boardDevices(disks: options.disks.count, cdrom: options.cdrom != nil, nics: options.nics.count,
                               balloon: options.balloon != nil).map(\.spec)
    for (i, text) in options.devices.enumerated() { devices.append(try pluginDevice(text, index: i, jail: .preview)) }
    devices.append(plugin)
    try checkInterruptLines(devices)
    do throws(CoreError) { try ResourceClaims.check(devices) } catch { throw UsageError(message: "\(error)") }
    return devices.dropLast().map(\.name)
}

/// Lines the platform itself uses: the PIT's, the PICs' cascade, the ACPI SCI (FADT SCI_INT).
let platformInterruptLines: [UInt32: String] = [0: "the PIT's", 2: "the PICs' cascade", 9: "the ACPI SCI's"]

/// Refuses two devices on one interrupt line, or a device on a line the platform uses: a device
/// pulses its line (an edge), and two pulsing one line lose each other's interrupts. Port, MMIO
/// and PCI conflicts are the core's to refuse (`IOBus`, `PCIBus`); lines are checked here, where
/// the board knows whose each one is.
func checkInterruptLines(_ devices: [DeviceSpec]) throws(UsageError) {
    var owners: [UInt32: String] = [:]
    for device in devices {
        for gsi in device.interruptGSIs {
            if let owner = platformInterruptLines[gsi] ?? owners[gsi].map({ "\($0)'s" }) {
                let used = Set(platformInterruptLines.keys).union(owners.keys).union(device.interruptGSIs)
                let free = (1..<24).filter { !used.contains(UInt32($0)) }.map(String.init).joined(separator: ", ")
                throw UsageError(message: "\(device.name) wants IRQ \(gsi), which is \(owner); give it a free line (free: \(free))")
            }
            owners[gsi] = device.name
        }
    }
}

/// Where the board puts its PCI functions (bus 0). 00:00.0 and 00:01.x are the host bridge's
/// (`BIOSContract`); plugins choose theirs with `pci=DD.F`.
enum PCISlots {
    /// Disk i's virtio-scsi adapter: 00:04.0, 00:05.0, … (at most `VMDefinition.maximumDisks`).
    static func disk(_ i: Int) -> UInt8 { UInt8(4 + i) }
    /// The CD-ROM drive's adapter, 00:0d.0.
    static let cdrom: UInt8 = 0x0D
    /// The memory balloon, 00:0e.0.
    static let balloon: UInt8 = 0x0E
    /// NIC i's virtio-net function: 00:10.0, 00:11.0, …
    static func nic(_ i: Int) -> UInt8 { UInt8(0x10 + i) }
}

/// A contract's named host files as the core's hostIO table.
func hostFileTable<Slot: RawRepresentable & Hashable>(_ files: [Slot: FileDescriptor]) -> [UInt16: FileDescriptor]
where Slot.RawValue == UInt16 {
    Dictionary(uniqueKeysWithValues: files.map { ($0.key.rawValue, $0.value) })
}

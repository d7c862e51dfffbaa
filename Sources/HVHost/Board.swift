import Glibc
import HVCore
import HVIPC
import HVSys
import Synchronization

/// The serial port, the BIOS/platform device and any --device plugins, each planned into its
/// tenant's sandbox.
func platformDevices(_ options: VMDefinition, boot: BootFiles, firmwareROM: FileDescriptor?, serialFiles: [FileDescriptor],
                     debugOutput: FileDescriptor, tenant: String?, disks: [DiskImage], cdrom: FileDescriptor?,
                     nics: [AttachedNIC]) throws -> [DeviceSpec] {
    // The CD-ROM drive is PCI 00:0d.0; with one, the firmware boots it first.
    let cdromBDF: UInt64 = 0x0D << 3
    let bootOrder = cdrom == nil ? "" : "/pci@i0cf8/*@d/*@0/*@0,0"
    var biosFiles = [boot.image, firmwareROM ?? boot.image, debugOutput]
    if let initrd = boot.initrd { biosFiles.append(initrd) }
    var devices = [
        DeviceSpec(name: "serial0", executable: deviceExecutable("hv-serial"),
                   resources: [Resource(kind: .pio, base: 0x3F8, length: 8)], interruptGSIs: [4],
                   hostFiles: serialFiles, capabilities: [.statePage]),
        DeviceSpec(name: "bios", executable: deviceExecutable("hv-bios"),
                   resources: BIOSResources.all, interruptGSIs: [8, 1],  // RTC, keyboard
                   hostFiles: biosFiles,
                   config: ["mode=\(boot.mode)", "cpus=\(options.cpus)", "boot_menu=\(options.boot.menu ? 1 : 0)",
                            "initrd=\(boot.initrd == nil ? 0 : 1)", "boot_order=\(bootOrder)",
                            "cmdline=\(options.boot.cmdline)"].joined(separator: "\n"),
                   capabilities: [.bootControl, .statePage], mapsGuestMemory: true),
    ]
    var profiles = ["serial0": "serial", "bios": "bios"]
    // Each disk is its own virtio-scsi adapter (PCI 00:04.0, 00:05.0, …) in its own process.
    for (i, disk) in disks.enumerated() {
        let bdf = UInt64((4 + i) << 3)
        devices.append(DeviceSpec(name: "disk\(i)", executable: deviceExecutable("hv-scsi"),
                                  resources: [Resource(kind: .pciConfig, base: bdf, length: 256),
                                              Resource(kind: .pciMMIOBar, base: bdf << 8, length: 0x4000)],
                                  hostFiles: [disk.file],
                                  config: "readonly=\(disk.readOnly ? 1 : 0)\nserial=hv-disk\(i)",
                                  capabilities: [.interruptLevel, .msi, .statePage], mapsGuestMemory: true))
        profiles["disk\(i)"] = "scsi"
    }
    if let cdrom {
        devices.append(DeviceSpec(name: "cdrom0", executable: deviceExecutable("hv-scsi"),
                                  resources: [Resource(kind: .pciConfig, base: cdromBDF, length: 256),
                                              Resource(kind: .pciMMIOBar, base: cdromBDF << 8, length: 0x4000)],
                                  hostFiles: [cdrom], config: "kind=cdrom", capabilities: [.interruptLevel, .msi, .statePage], mapsGuestMemory: true))
        profiles["cdrom0"] = "scsi"
    }
    // Each NIC is its own virtio-net process at PCI 00:10.0, 00:11.0, …
    for (i, nic) in nics.enumerated() {
        let bdf = UInt64((0x10 + i) << 3)
        devices.append(DeviceSpec(name: "net\(i)", executable: deviceExecutable("hv-net"),
                                  resources: [Resource(kind: .pciConfig, base: bdf, length: 256),
                                              Resource(kind: .pciMMIOBar, base: bdf << 8, length: 0x4000)],
                                  hostFiles: nic.files, config: "backend=\(nic.backend)\nmac=\(formatMAC(nic.mac))",
                                  capabilities: [.interruptLevel, .msi, .statePage], mapsGuestMemory: true))
        profiles["net\(i)"] = "net"
    }
    do {
        if let tenant {
            for i in devices.indices {
                guard let profile = profiles[devices[i].name] else { continue }
                devices[i].sandbox = try DeviceCatalog.plan(profilePath: try DeviceCatalog.builtInProfilePath(profile), tenant: tenant)
            }
        }
        for (i, spec) in options.devices.enumerated() { devices.append(try pluginDevice(spec, index: i, tenant: tenant)) }
    } catch {
        throw UsageError(message: error.message)
    }
    return devices
}

/// The BIOS device's register windows, in the order its model numbers them (resource index).
enum BIOSResources {
    static let all: [Resource] = [
        Resource(kind: .pio, base: 0x70, length: 2),     // 0: CMOS/RTC
        Resource(kind: .pio, base: 0x402, length: 1),    // 1: debug console
        Resource(kind: .pio, base: 0x510, length: 2),    // 2: fw_cfg selector/data
        Resource(kind: .pio, base: 0x514, length: 8),    // 3: fw_cfg DMA
        Resource(kind: .pio, base: 0xCF9, length: 1),    // 4: PIIX3 reset control (the core's PCI host owns the rest of 0xCF8–0xCFF)
        Resource(kind: .pio, base: 0x92, length: 1),     // 5: port A (fast A20, fast reset)
        Resource(kind: .pio, base: 0x60, length: 1),     // 6: i8042 data
        Resource(kind: .pio, base: 0x64, length: 1),     // 7: i8042 status/command
        Resource(kind: .pio, base: 0x600, length: 16),   // 8: PIIX4 ACPI PM (PM1 event/control, PM timer)
        Resource(kind: .pciConfig, base: 0x00, length: 256),  // 9: 00:00.0 i440FX host bridge
        Resource(kind: .pciConfig, base: 0x08, length: 256),  // 10: 00:01.0 PIIX3 ISA bridge
        Resource(kind: .pciConfig, base: 0x0B, length: 256),  // 11: 00:01.3 PIIX4 power management
    ]
}


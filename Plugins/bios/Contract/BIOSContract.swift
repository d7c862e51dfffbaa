import HVIPC

/// What the trusted side hands hv-bios (the guest loader and the PC platform: CMOS/RTC, fw_cfg,
/// i8042, reset ports, ACPI PM, the i440FX/PIIX host bridge functions), compiled by both: the
/// board (HVHost) builds the device from it and the device dispatches by these names.
public enum BIOSContract {
    /// The device's register windows; a window's raw value is its resource index in HELLO.
    public enum Window: Int, CaseIterable, Sendable {
        case cmosRTC
        /// Bochs/QEMU debug console (port 0x402): SeaBIOS's log.
        case debugConsole
        /// fw_cfg selector and data.
        case firmwareConfig
        /// fw_cfg DMA address.
        case firmwareConfigDMA
        /// PIIX3 reset control (0xCF9; the core's PCI host owns the rest of 0xCF8–0xCFF).
        case resetControl
        /// Port A: fast A20 and fast reset.
        case portA
        case keyboardData
        case keyboardCommand
        /// PIIX4 ACPI PM: PM1 event/control and the PM timer.
        case powerManagement
        /// 00:00.0, the i440FX host bridge's configuration space.
        case hostBridgeConfig
        /// 00:01.0, the PIIX3 ISA bridge's.
        case isaBridgeConfig
        /// 00:01.3, the PIIX4 power management function's.
        case powerManagementConfig

        /// Where the guest finds it.
        public var resource: Resource {
            switch self {
            case .cmosRTC: Resource(kind: .pio, base: 0x70, length: 2)
            case .debugConsole: Resource(kind: .pio, base: 0x402, length: 1)
            case .firmwareConfig: Resource(kind: .pio, base: 0x510, length: 2)
            case .firmwareConfigDMA: Resource(kind: .pio, base: 0x514, length: 8)
            case .resetControl: Resource(kind: .pio, base: 0xCF9, length: 1)
            case .portA: Resource(kind: .pio, base: 0x92, length: 1)
            case .keyboardData: Resource(kind: .pio, base: 0x60, length: 1)
            case .keyboardCommand: Resource(kind: .pio, base: 0x64, length: 1)
            case .powerManagement: Resource(kind: .pio, base: 0x600, length: 16)
            case .hostBridgeConfig: Resource(kind: .pciConfig, base: 0x00, length: 256)
            case .isaBridgeConfig: Resource(kind: .pciConfig, base: 0x08, length: 256)
            case .powerManagementConfig: Resource(kind: .pciConfig, base: 0x0B, length: 256)
            }
        }
    }

    /// Every window, in resource-index order.
    public static var resources: [Resource] { Window.allCases.map(\.resource) }

    /// The device's interrupt lines; a line's raw value is its index in HELLO.
    public enum Interrupt: UInt16, CaseIterable, Sendable {
        /// The RTC's (ISA IRQ 8, edge).
        case rtc
        /// The i8042 keyboard's (ISA IRQ 1, edge).
        case keyboard

        public var gsi: UInt32 {
            switch self {
            case .rtc: 8
            case .keyboard: 1
            }
        }
    }

    /// Every line's GSI, in index order.
    public static var interruptGSIs: [UInt32] { Interrupt.allCases.map(\.gsi) }

    /// The host files, by HELLO hostIO index.
    public enum HostFile: UInt16, CaseIterable, Sendable {
        /// The multiboot kernel, the Linux bzImage, or the firmware image.
        case guestImage = 0
        /// The firmware image again, as the memfd the core maps as the ROM below 4 GiB
        /// (`firmware` mode only).
        case firmwareROM = 1
        /// Where the debug console's bytes go (a file, or /dev/null).
        case debugOutput = 2
        /// The Linux initrd (`linux` mode, when given).
        case initrd = 3
    }

    /// How the guest starts.
    public enum BootMode: String, CaseIterable, Sendable {
        /// A multiboot (v1) ELF kernel, entered in 32-bit protected mode.
        case multiboot
        /// A bzImage through the Linux 64-bit boot protocol.
        case linux
        /// Firmware (SeaBIOS) from the reset vector.
        case firmware
    }

    /// The device's settings.
    public struct Settings: Equatable, Sendable {
        public var mode: BootMode
        /// vCPUs, for the ACPI MADT, CMOS and fw_cfg.
        public var cpus: Int
        /// Whether SeaBIOS shows its boot menu.
        public var bootMenu: Bool
        /// Boot devices, first first, as OpenFirmware paths (fw_cfg `bootorder`).
        public var bootOrder: [String]
        /// The kernel command line (multiboot and Linux).
        public var commandLine: String

        public static let maximumCPUs = 255

        public init(mode: BootMode, cpus: Int = 1, bootMenu: Bool = false, bootOrder: [String] = [], commandLine: String = "") {
            self.mode = mode
            self.cpus = cpus
            self.bootMenu = bootMenu
            self.bootOrder = bootOrder
            self.commandLine = commandLine
        }

        /// The settings as HELLO's config text.
        public var encoded: String {
            SettingsText.encode([("mode", mode.rawValue), ("cpus", String(cpus)), ("boot_menu", bootMenu.settingsValue),
                                 ("boot_order", bootOrder.joined(separator: "\n")), ("cmdline", commandLine)])
        }

        /// The settings the device was handed (`DeviceRuntime.config`).
        public init(decoding config: [String: String]) throws(SettingsError) {
            let reader = SettingsReader(config)
            mode = try reader.choice("mode")
            cpus = try reader.int("cpus", in: 1...Self.maximumCPUs, default: 1)
            bootMenu = try reader.bool("boot_menu", default: false)
            bootOrder = reader.string("boot_order", default: "").split(separator: "\n").map(String.init)
            commandLine = reader.string("cmdline", default: "")
        }
    }
}

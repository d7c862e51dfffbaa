import ArgumentParser
import Glibc
import HVHost

/// Parses a size such as `256M`, `2G`, `65536K` or a plain byte count.
/// A size in whole MiB as the memory flags take it: 512M, 2G, or a bare number of MiB (as QEMU's
/// `-m`); `example` is the size the error suggests.
func parseMiB(_ text: String, flag: String, example: String) throws(UsageError) -> UInt64 {
    let bytes = try parseSize(text.allSatisfy(\.isNumber) ? text + "M" : text, flag: flag)
    guard bytes % (1 << 20) == 0 else { throw UsageError(message: "invalid \(flag) '\(text)': give whole MiB, such as \(example)") }
    return bytes >> 20
}

func parseSize(_ text: String, flag: String) throws(UsageError) -> UInt64 {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    var digits = Substring(text)
    var scale: UInt64 = 1
    if let last = text.last?.uppercased().first, let unit = units[last] {
        scale = unit
        digits = digits.dropLast()
    }
    if digits.hasSuffix("i") || digits.hasSuffix("B") { digits = digits.dropLast() }
    guard let value = UInt64(digits), value > 0 else {
        throw UsageError(message: "invalid \(flag) '\(text)': use a size like 256M or 2G")
    }
    let (bytes, overflow) = value.multipliedReportingOverflow(by: scale)
    guard !overflow else { throw UsageError(message: "invalid \(flag) '\(text)': too large") }
    return bytes
}

/// The flags of `hvctl run` that describe the VM. They become a `VMDefinition`; `--config` gives
/// one instead, and the two do not mix.
struct DefinitionFlags: ParsableArguments {
    @Option(help: ArgumentHelp("Boot a multiboot (v1) kernel: ELF32 or a.out-kludge image.", valueName: "file"))
    var multiboot: String?
    @Option(help: ArgumentHelp("Boot a Linux bzImage by the x86 boot protocol (64-bit entry).", valueName: "file"))
    var kernel: String?
    @Option(help: ArgumentHelp("Initial ramdisk for --kernel.", valueName: "file"))
    var initrd: String?
    @Option(help: ArgumentHelp("Boot firmware: 'seabios' (Debian's /usr/share/seabios/bios-256k.bin) or a path.", valueName: "fw"))
    var firmware: String?
    @Flag(help: "Let the firmware show its boot menu (off by default: no menu delay).")
    var bootMenu = false
    @Option(help: ArgumentHelp("Write the 0x402 debug port (SeaBIOS's log) to PATH.", valueName: "file:PATH"))
    var debugcon: String?
    @Option(name: .customLong("cmdline"), help: ArgumentHelp("The kernel's command line (--multiboot, --kernel), at most 3072 bytes.", valueName: "str"))
    var commandLine: String?
    @Option(help: ArgumentHelp("A disk image (raw or qcow2, detected; format= to insist) on a virtio-scsi adapter (its own sandboxed process); up to 8. bps= (bytes a second, e.g. 10M) and iops= limit the guest's requests.", valueName: "path[,readonly][,format=raw|qcow2][,bps=RATE][,iops=N]"))
    var disk: [String] = []
    @Option(help: ArgumentHelp("An ISO image in a virtio-scsi CD-ROM drive; the firmware boots it first.", valueName: "iso"))
    var cdrom: String?
    @Option(help: ArgumentHelp("""
        A virtio-net NIC on host tap IFNAME (created and brought up if missing; with bridge=, made \
        a port of that host bridge), or on private segment SEGMENT shared with the other VMs on \
        this host that join it; up to 4. A segment belongs to the tenant whose VM creates it: only \
        that tenant's VMs may join, and those shared=A+B names (VMs without --tenant are the \
        host's own and share among themselves). Without mac=, the MAC is 52:54:00 and a hash of \
        the VM's name and the NIC's index.
        """, valueName: "tap=IFNAME[,bridge=BR]|net=SEGMENT[,shared=T+…][,mac=MAC]"))
    var nic: [String] = []
    @Flag(help: "End the VM (exit 0) when the guest asks for a reset, instead of rebooting it.")
    var noReboot = false
    @Option(help: ArgumentHelp("Guest RAM, e.g. 256M or 2G; a bare number is MiB (default 256M).", valueName: "size"))
    var memory: String?
    @Option(help: ArgumentHelp("Number of vCPUs, 1 to 254 (default 1).", valueName: "n"))
    var cpus: String?
    @Option(help: ArgumentHelp("""
        Where the serial port goes: stdio (default), file:PATH, none, or console ($HV_RUN_DIR/NAME.log, \
        attachable with 'hvctl console NAME'; what --detach uses).
        """, valueName: "mode"))
    var serial: String?
    @Option(help: ArgumentHelp("The VM's name for 'hvctl ls/status/stop/…' (default: vm-PID).", valueName: "name"))
    var name: String?
    @Option(help: ArgumentHelp("Run this VM's devices as tenant NAME's uid/gid (default: one per VM).", valueName: "name"))
    var tenant: String?
    @OptionGroup var limitFlags: LimitFlags
    @Option(help: ArgumentHelp("A memory balloon ('hvctl balloon NAME SIZE' then reclaims guest RAM): on, or size= (what to reclaim at start), stats= (seconds between guest statistics), deflate_on_oom, free_page_reporting.", valueName: "on|size=SIZE,stats=S,deflate_on_oom,free_page_reporting"))
    var balloon: String?
    @Option(name: .customLong("device"), help: ArgumentHelp(
        "Add a third-party device process: PATH,profile=FILE[,pio=BASE:LEN][,irq=N][,memory][,pci=DD.F[,barN=mmio|pio:SIZE]…][,KEY=VALUE]…",
        valueName: "spec"))
    var plugins: [String] = []
    @Flag(help: "Run devices unconfined (debugging only; prints a warning).")
    var noSandbox = false

    /// Whether any flag that describes the VM was given (they conflict with --config).
    /// What `--serial TEXT` asks for.
    static func serialOption(_ serial: String) throws(UsageError) -> VMDefinition.Serial {
        switch serial {
        case "stdio": return .init(output: .stdio)
        case "none": return .init(output: .none)
        case "console": return .init(output: .console)
        case let s where s.hasPrefix("file:") && s.count > 5: return .init(output: .file, path: String(s.dropFirst(5)))
        default: throw UsageError(message: "invalid --serial '\(serial)': use stdio, file:PATH, console or none")
        }
    }

    /// Whether a flag other than --name and --serial was given (what --restore refuses).
    var anyGivenButSerial: Bool {
        var copy = self
        copy.serial = nil
        return copy.anyGiven
    }

    var anyGiven: Bool {
        multiboot != nil || kernel != nil || initrd != nil || firmware != nil || bootMenu || debugcon != nil || commandLine != nil
            || !disk.isEmpty || cdrom != nil || !nic.isEmpty || noReboot || memory != nil || cpus != nil || serial != nil
            || tenant != nil || !plugins.isEmpty || noSandbox || limitFlags.anyGiven || balloon != nil
    }

    /// The definition these flags describe; errors name the flag.
    func definition() throws(UsageError) -> VMDefinition {
        var d = VMDefinition()
        d.name = name
        if let firmware { d.boot.firmware = firmware == "seabios" ? VMDefinition.Boot.systemSeaBIOS : firmware }
        d.boot.kernel = kernel
        d.boot.initrd = initrd
        d.boot.multiboot = multiboot
        d.boot.menu = bootMenu
        d.boot.cmdline = commandLine ?? ""
        d.onReset = noReboot ? .stop : .reboot
        if let debugcon {
            guard debugcon.hasPrefix("file:"), debugcon.count > 5 else {
                throw UsageError(message: "invalid --debugcon '\(debugcon)': use file:PATH")
            }
            d.debugcon = String(debugcon.dropFirst(5))
        }
        if let memory {
            // A bare number is MiB, as in QEMU's -m.
            let bytes = try parseSize(memory.allSatisfy(\.isNumber) ? memory + "M" : memory, flag: "--memory")
            guard bytes >= VMDefinition.minimumMemoryMiB << 20 else {
                throw UsageError(message: "--memory \(memory) is too small: a guest needs at least \(VMDefinition.minimumMemoryMiB)M")
            }
            guard bytes % (1 << 20) == 0 else {
                throw UsageError(message: "invalid --memory '\(memory)': guest RAM is a whole number of MiB; use a size such as 256M")
            }
            d.memoryMiB = bytes >> 20
        }
        if let cpus {
            guard let n = Int(cpus), n > 0 else {
                throw UsageError(message: "invalid --cpus '\(cpus)': use a whole number from 1 to 254")
            }
            d.cpus = n
        }
        if let serial { d.serial = try Self.serialOption(serial) }
        for spec in disk {
            let parts = spec.split(separator: ",", omittingEmptySubsequences: false)
            guard let path = parts.first, !path.isEmpty else {
                throw UsageError(message: "invalid --disk '\(spec)': use PATH[,readonly][,format=raw|qcow2]")
            }
            var disk = VMDefinition.Disk(path: String(path))
            for option in parts.dropFirst() {
                if option == "readonly" {
                    disk.readonly = true
                } else if option.hasPrefix("format="), let format = VMDefinition.DiskFormat(rawValue: String(option.dropFirst(7))) {
                    disk.format = format
                } else if try RateShorthand.apply(String(option), to: &disk.rateLimit, prefix: "", opsKey: "iops", what: "--disk") {
                    continue
                } else {
                    throw UsageError(message: "invalid --disk '\(spec)': use PATH[,readonly][,format=raw|qcow2][,bps=RATE][,iops=N]")
                }
            }
            d.disks.append(disk)
        }
        d.cdrom = cdrom
        for spec in nic {
            guard d.nics.count < VMDefinition.maximumNICs else { throw UsageError(message: "at most \(VMDefinition.maximumNICs) --nic per VM") }
            var parts = spec.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            let first = parts.removeFirst()
            var nic = VMDefinition.NIC()
            if first.hasPrefix("tap=") { nic.tap = String(first.dropFirst(4)) } else if first.hasPrefix("net=") { nic.segment = String(first.dropFirst(4)) } else {
                throw UsageError(message: "invalid --nic '\(spec)': \(VMDefinition.NIC.flagHint)")
            }
            for part in parts {
                if part.hasPrefix("bridge="), nic.bridge == nil, nic.tap != nil {
                    nic.bridge = String(part.dropFirst(7))
                    continue
                }
                if try RateShorthand.apply(part, to: &nic.rxRateLimit, prefix: "rx_", opsKey: "pps", what: "--nic") { continue }
                if try RateShorthand.apply(part, to: &nic.txRateLimit, prefix: "tx_", opsKey: "pps", what: "--nic") { continue }
                if part.hasPrefix("shared="), nic.sharedWith == nil, nic.segment != nil {
                    nic.sharedWith = part.dropFirst(7).split(separator: "+", omittingEmptySubsequences: false).map(String.init)
                    continue
                }
                guard part.hasPrefix("mac="), nic.mac == nil else { throw UsageError(message: "invalid --nic '\(spec)': \(VMDefinition.NIC.flagHint)") }
                nic.mac = String(part.dropFirst(4))
            }
            d.nics.append(nic)
        }
        d.tenant = tenant
        d.limits = try limitFlags.limitsChecked()
        d.balloon = try balloon.map { spec throws(UsageError) in
            try VMDefinition.Balloon(flag: spec) { text throws(UsageError) in try parseMiB(text, flag: "--balloon size", example: "64M") }
        }
        d.sandbox = !noSandbox
        d.devices = plugins
        try d.validate(naming: .flags)
        return d
    }
}

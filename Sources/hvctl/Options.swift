import Glibc
import HVCore

/// A command-line mistake, reported as one line plus a hint, exit status 2.
struct UsageError: Error {
    let message: String
}

/// Parses a size such as `256M`, `2G`, `65536K` or a plain byte count.
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

/// Options of `hvctl run`.
struct RunOptions {
    var multiboot: String?
    var kernel: String?
    var initrd: String?
    var firmware: String?
    var noReboot = false
    var bootMenu = false
    var debugcon: String?
    var commandLine = ""
    var memory: UInt64 = 256 << 20
    var cpus = 1
    var serial = "stdio"
    var verbose = false
    var sandbox = true
    var tenant: String?
    var name: String?
    var disks: [String] = []
    var cdrom: String?
    var plugins: [String] = []
    var nics: [NICOption] = []

    /// The longest --cmdline: it travels in the BIOS device's settings, which the protocol caps at
    /// 4096 bytes (Hello.maximumConfigBytes) with room kept for the other settings. Linux on x86
    /// takes 2048 bytes unless built with a larger COMMAND_LINE_SIZE.
    static let maximumCommandLineBytes = 3072

    static let help = """
    usage: hvctl run [options]

    Boots a VM. With none of --multiboot, --kernel or --firmware, boots hv's built-in demo guest.

    options:
      --multiboot FILE   boot a multiboot (v1) kernel: ELF32 or a.out-kludge image
      --kernel FILE      boot a Linux bzImage by the x86 boot protocol (64-bit entry)
      --initrd FILE      initial ramdisk for --kernel
      --firmware FW      boot firmware: 'seabios' (Debian's /usr/share/seabios/bios-256k.bin) or a path
      --boot-menu        let the firmware show its boot menu (off by default: no menu delay)
      --debugcon file:PATH  write the 0x402 debug port (SeaBIOS's log) to PATH (default: discarded)
      --cmdline STR      command line passed to the kernel (--multiboot, --kernel)
      --disk PATH[,readonly]  a raw disk image on a virtio-scsi adapter (its own sandboxed process); repeatable
      --cdrom ISO        an ISO image in a virtio-scsi CD-ROM drive (its own sandboxed process); firmware boots it first
      --nic tap=IFNAME[,mac=MAC]  a virtio-net NIC on host tap IFNAME (created, and brought up, if missing)
      --nic net=SEGMENT[,mac=MAC] a virtio-net NIC on private segment SEGMENT, shared with the other VMs on
                         this host that join it; up to 4 --nic, each its own sandboxed process. Without
                         mac=, the MAC is 52:54:00 and a hash of the VM's --name and the NIC's index
      --no-reboot        end the VM (exit 0) when the guest asks for a reset, instead of rebooting it
      --memory SIZE      guest RAM, e.g. 256M or 2G; a bare number is MiB (default 256M)
      --cpus N           number of vCPUs, 1 to 254 (default 1)
      --serial MODE      where the serial port goes: stdio (default), file:PATH, or none
      --name NAME        the VM's name for 'hvctl ls/status/stop/cdrom' (default: vm-PID)
      --tenant NAME      run this VM's devices as tenant NAME's uid/gid (default: one per VM)
      --device SPEC      add a third-party device process: PATH,profile=FILE[,pio=BASE:LEN][,irq=N][,memory][,pci=DD.F[,barN=mmio|pio:SIZE]...][,KEY=VALUE]...
      --no-sandbox       run devices unconfined (debugging only; prints a warning)
      --verbose          report device starts and debug logs on stderr
      -h, --help         show this help

    With --serial stdio on a terminal, keystrokes go to the guest; type Ctrl-A x to quit
    (Ctrl-A Ctrl-A sends a literal Ctrl-A). hvctl exits 0 when the guest powers off (ACPI S5) or
    halts every vCPU with interrupts disabled, or asks for a reset under --no-reboot (a reset
    otherwise reboots the VM afresh); 1 on a guest or VMM failure (the reason is printed),
    2 on a usage error, and 128+N when stopped by signal N (SIGINT, SIGTERM).
    """

    static func parse(_ arguments: ArraySlice<String>) throws(UsageError) -> RunOptions? {
        var options = RunOptions()
        var rest = arguments
        func value(_ flag: String) throws(UsageError) -> String {
            guard let v = rest.popFirst() else { throw UsageError(message: "\(flag) needs a value") }
            return v
        }
        while let arg = rest.popFirst() {
            // Accept --flag=value as well as --flag value.
            var flag = arg
            if arg.hasPrefix("--"), let eq = arg.firstIndex(of: "=") {
                flag = String(arg[..<eq])
                rest.insert(String(arg[arg.index(after: eq)...]), at: rest.startIndex)
            }
            switch flag {
            case "-h", "--help": return nil
            case "--multiboot": options.multiboot = try value(flag)
            case "--kernel": options.kernel = try value(flag)
            case "--initrd": options.initrd = try value(flag)
            case "--no-reboot": options.noReboot = true
            case "--firmware":
                let fw = try value(flag)
                options.firmware = fw == "seabios" ? "/usr/share/seabios/bios-256k.bin" : fw
            case "--boot-menu": options.bootMenu = true
            case "--debugcon":
                let mode = try value(flag)
                guard mode.hasPrefix("file:"), mode.count > 5 else {
                    throw UsageError(message: "invalid --debugcon '\(mode)': use file:PATH")
                }
                options.debugcon = String(mode.dropFirst(5))
            case "--cmdline":
                options.commandLine = try value(flag)
                guard !options.commandLine.contains("\n"), !options.commandLine.contains("\0") else {
                    throw UsageError(message: "--cmdline must not contain newlines or NUL bytes")
                }
                guard options.commandLine.utf8.count <= Self.maximumCommandLineBytes else {
                    throw UsageError(message: "--cmdline is \(options.commandLine.utf8.count) bytes: at most \(Self.maximumCommandLineBytes) are passed to the guest")
                }
            case "--memory":
                let text = try value(flag)
                // A bare number is MiB, as in QEMU's -m.
                let bytes = try parseSize(text.allSatisfy(\.isNumber) ? text + "M" : text, flag: flag)
                guard bytes % 4096 == 0 else {
                    throw UsageError(message: "invalid --memory '\(text)': guest RAM is whole 4 KiB pages; use a multiple of 4K, such as 256M")
                }
                guard bytes >= 4 << 20 else {
                    throw UsageError(message: "--memory \(text) is too small: a guest needs at least 4M")
                }
                options.memory = bytes
            case "--cpus":
                let text = try value(flag)
                guard let n = Int(text), (1...Machine.maximumCPUs).contains(n) else {
                    throw UsageError(message: "invalid --cpus '\(text)': use a whole number from 1 to \(Machine.maximumCPUs)")
                }
                options.cpus = n
            case "--serial":
                let mode = try value(flag)
                guard mode == "stdio" || mode == "none" || (mode.hasPrefix("file:") && mode.count > 5) else {
                    throw UsageError(message: "invalid --serial '\(mode)': use stdio, file:PATH or none")
                }
                options.serial = mode
            case "--verbose", "-v": options.verbose = true
            case "--no-sandbox": options.sandbox = false
            case "--tenant":
                let name = try value(flag)
                guard (1...64).contains(name.utf8.count),
                      name.utf8.allSatisfy({ $0 == 0x2D || $0 == 0x2E || $0 == 0x5F || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }) else {
                    throw UsageError(message: "invalid --tenant '\(name)': use 1 to 64 letters, digits, '.', '_' or '-'")
                }
                options.tenant = name
            case "--device": options.plugins.append(try value(flag))
            case "--nic":
                guard options.nics.count < NICOption.maximumPerVM else { throw UsageError(message: "at most \(NICOption.maximumPerVM) --nic per VM") }
                options.nics.append(try NICOption.parse(try value(flag)))
            case "--cdrom":
                guard options.cdrom == nil else { throw UsageError(message: "one --cdrom per VM") }
                options.cdrom = try value(flag)
            case "--disk":
                let spec = try value(flag)
                guard !spec.isEmpty, !spec.hasPrefix(","), spec.split(separator: ",").dropFirst().allSatisfy({ $0 == "readonly" }) else {
                    throw UsageError(message: "invalid --disk '\(spec)': use PATH or PATH,readonly")
                }
                guard options.disks.count < 8 else { throw UsageError(message: "at most 8 --disk images") }
                options.disks.append(spec)
            case "--name":
                let name = try value(flag)
                try RunDirectory.validate(name, flag: "--name")
                options.name = name
            default:
                throw UsageError(message: "unknown option '\(arg)' for 'hvctl run'")
            }
        }
        let boots = [("--firmware", options.firmware), ("--multiboot", options.multiboot), ("--kernel", options.kernel)]
            .filter { $0.1 != nil }.map(\.0)
        if boots.count > 1 {
            throw UsageError(message: "\(boots.joined(separator: " and ")) each choose how the VM boots: give one")
        }
        if options.initrd != nil && options.kernel == nil {
            throw UsageError(message: "--initrd needs --kernel (an initial ramdisk is for a Linux kernel)")
        }
        return options
    }
}

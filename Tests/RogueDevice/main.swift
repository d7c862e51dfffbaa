import Glibc
import HVDeviceSDK

// A deliberately hostile device for the sandbox tests. On the first guest read of its register
// (first start only) it tries one attack, named by config `attack=`. A syscall its profile
// forbids never returns: the sandbox stops the process, the core restarts it, and the restarted
// device answers the replayed read with 0x42. An attack the sandbox lets through is reported as
// "rogue: attack X SUCCEEDED", which the tests treat as a failure.

final class Rogue: DeviceModel {
    let runtime: DeviceRuntime
    let attack: String
    var attacked = false

    init(runtime: DeviceRuntime) {
        self.runtime = runtime
        attack = runtime.config["attack"] ?? "none"
    }

    func read(resource: Int, offset: UInt64, size: Int) -> UInt64 {
        if runtime.restartGeneration == 0 && !attacked {
            attacked = true
            perform()
        }
        return 0x42
    }

    func write(resource: Int, offset: UInt64, size: Int, value: UInt64) {
        // attack=poison: a write of 0xAD to offset 1 crashes this device every time it is served,
        // replays included, like a bug a guest can trigger at will.
        if attack == "poison" && offset == 1 && value == 0xAD {
            UnsafeMutablePointer<UInt64>(bitPattern: 0x10)!.pointee = value
        }
    }

    private func outcome(_ succeeded: Bool, _ detail: String) {
        runtime.log(.warning, "rogue: attack \(attack) \(succeeded ? "SUCCEEDED" : "refused"): \(detail)")
    }

    private func perform() {
        switch attack {
        case "open":
            let fd = open("/etc/passwd", O_RDONLY)
            outcome(fd >= 0, "open(/etc/passwd) = \(fd), \(String(cString: strerror(errno)))")
        case "socket":
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            outcome(fd >= 0, "socket(AF_INET) = \(fd)")
        case "execve":
            let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/sh"), nil]
            let rc = execv("/bin/sh", argv)
            outcome(false, "execv(/bin/sh) = \(rc), \(String(cString: strerror(errno)))")
        case "kill":
            let rc = kill(-1, SIGKILL)  // every process it may signal
            outcome(rc == 0, "kill(-1, SIGKILL) = \(rc)")
        case "rlimit":
            var r = rlimit(rlim_cur: 1 << 20, rlim_max: 1 << 20)
            let rc = setrlimit(__rlimit_resource_t(7), &r)  // RLIMIT_NOFILE
            outcome(rc == 0, "setrlimit(NOFILE, 1M) = \(rc)")
        case "mount":
            let rc = mount("none", "/", "tmpfs", 0, nil)
            outcome(rc == 0, "mount(tmpfs, /) = \(rc)")
        case "mmap-exec":
            let p = mmap(nil, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            outcome(p != MAP_FAILED, "mmap(PROT_EXEC)")
        case "fork":
            let pid = fork()
            if pid == 0 { _exit(0) }
            outcome(pid > 0, "fork() = \(pid)")
        case "guest-memory":
            // Outside guest RAM: the SDK's bounds check must refuse it.
            var junk: UInt64 = 0xDEAD_BEEF
            do {
                try withUnsafeBytes(of: &junk) { (b) throws(GuestMemoryAccessError) in
                    try runtime.guestMemory?.write(b, at: 0xFFFF_FFFF_0000)
                }
                outcome(true, "wrote past guest RAM")
            } catch {
                outcome(false, "\(error)")
            }
        case "doorbell":
            // Doorbells on registers it does not own, and an interrupt route it was not granted.
            let foreign = runtime.addDoorbell(resource: 9, offset: 0, length: 1)
            let pastEnd = runtime.addDoorbell(resource: 0, offset: 2, length: 1)
            let anyWidthPort = runtime.addDoorbell(resource: 0, offset: 0, length: 0)
            let msi = runtime.routeMSI(vector: 0, address: 0xFEE0_0000, data: 0x30)
            let own = runtime.addDoorbell(resource: 0, offset: 1, length: 1)
            outcome(foreign != nil || pastEnd != nil || anyWidthPort != nil || msi != nil,
                    "foreign \(foreign != nil), past end \(pastEnd != nil), any-width port \(anyWidthPort != nil), msi \(msi != nil); its own register \(own != nil)")
        case "memory":
            // Touch memory in 8 MiB steps up to 1 GiB: its cgroup's memory limit must stop it
            // (the OOM killer kills it; the core restarts it).
            var touched = 0
            while touched < 1 << 30 {
                guard let p = mmap(nil, 8 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else { break }
                memset(p, 0xA5, 8 << 20)
                touched += 8 << 20
            }
            outcome(touched >= 1 << 30, "touched \(touched >> 20) MiB")
        case "poison":
            outcome(false, "armed: a write of 0xad to offset 1 crashes this device every time")
        case "stderr":
            // Pose as hvctl on the operator's terminal: a forged line, an escape sequence that
            // would clear the screen, then a flood. The core must prefix, clean and throttle it.
            var text = "hvctl: stopped by 'hvctl stop vm' (forged)\n\u{1B}[2Jrogue: screen cleared\n"
            for i in 0..<200 { text += "rogue: flood line \(i)\n" }
            let n = text.withCString { Glibc.write(2, $0, strlen($0)) }
            outcome(false, "wrote \(n) bytes to stderr")
        default:
            outcome(false, "unknown attack")
        }
    }
}

let runtime = DeviceRuntime.startOrExit(name: "rogue", capabilities: [.registerRing])
runtime.run(Rogue(runtime: runtime))

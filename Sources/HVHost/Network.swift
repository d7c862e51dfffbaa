import CHVShim
import Glibc
import HVCore
import HVIPC
import HVNetContract
import HVNetSwitch
import HVSandbox
import HVSys
import Synchronization

/// One `--nic` as given: where it attaches and its MAC, if given.
struct NICOption: Equatable {
    enum Attachment: Equatable {
        /// A host tap interface (created if missing).
        case tap(String)
        /// A private in-memory segment shared with other VMs on this host.
        case segment(String)
    }
    var attachment: Attachment
    var mac: [UInt8]?
    /// The host bridge a tap joins (`bridge=`).
    var bridge: String?
    /// The other tenants whose VMs may join the segment this NIC creates (`shared=A+B`).
    var sharedWith: [String] = []

    static let maximumPerVM = 4
    static var hint: String { VMDefinition.NIC.flagHint }

    /// Whether `name` can name a host interface: IFNAMSIZ is 16 with the NUL; '/', ':' and
    /// whitespace are not allowed.
    static func isInterfaceName(_ name: String) -> Bool {
        (1...15).contains(name.utf8.count) && name != "." && name != ".."
            && name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "/") && $0 != UInt8(ascii: ":") })
    }

    /// Parses `tap=NAME[,bridge=BRIDGE][,mac=MAC]` or `net=NAME[,shared=TENANT+…][,mac=MAC]`.
    static func parse(_ spec: String, what: String = "--nic") throws(UsageError) -> NICOption {
        var parts = spec.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let first = parts.first, let eq = first.firstIndex(of: "=") else { throw UsageError(message: "invalid \(what) '\(spec)': \(hint)") }
        parts.removeFirst()
        let kind = first[..<eq], name = String(first[first.index(after: eq)...])
        var option: NICOption
        switch kind {
        case "tap":
            guard isInterfaceName(name) else {
                throw UsageError(message: "invalid \(what) tap name '\(name)': a host interface name is 1 to 15 printable characters without '/', ':' or spaces")
            }
            option = NICOption(attachment: .tap(name))
        case "net":
            try RunDirectory.validate(name, flag: what == "--nic" ? "--nic net=" : what + " segment")
            option = NICOption(attachment: .segment(name))
        default:
            throw UsageError(message: "invalid \(what) '\(spec)': \(hint)")
        }
        for part in parts {
            if part.hasPrefix("bridge="), option.bridge == nil, case .tap = option.attachment {
                let bridge = String(part.dropFirst(7))
                guard isInterfaceName(bridge) else {
                    throw UsageError(message: "invalid \(what) bridge name '\(bridge)': a host interface name is 1 to 15 printable characters without '/', ':' or spaces")
                }
                option.bridge = bridge
                continue
            }
            if part.hasPrefix("shared="), option.sharedWith.isEmpty, case .segment = option.attachment {
                let names = part.dropFirst(7).split(separator: "+", omittingEmptySubsequences: false).map(String.init)
                for tenant in names {
                    guard (1...64).contains(tenant.utf8.count), tenant.utf8.allSatisfy(RunDirectory.isNameByte) else {
                        throw UsageError(message: "invalid \(what) shared tenant '\(tenant)': use tenant names (1 to 64 letters, digits, '.', '_' or '-') joined by '+'")
                    }
                }
                option.sharedWith = names
                continue
            }
            guard part.hasPrefix("mac="), option.mac == nil else { throw UsageError(message: "invalid \(what) '\(spec)': \(hint)") }
            let text = String(part.dropFirst(4))
            guard let mac = parseMAC(text) else {
                throw UsageError(message: "invalid \(what) mac '\(text)': use six hex octets like 52:54:00:12:34:56")
            }
            guard mac[0] & 1 == 0, mac != [0, 0, 0, 0, 0, 0] else {
                throw UsageError(message: "invalid \(what) mac '\(text)': a NIC needs a unicast address (the first octet's low bit clear)")
            }
            option.mac = mac
        }
        return option
    }

    /// The MAC used when none is given: QEMU's locally used 52:54:00 prefix, then three bytes of a
    /// hash of the VM's name and the NIC's index, so a named VM keeps its addresses across runs.
    static func generatedMAC(vm: String, index: Int) -> [UInt8] {
        var hash: UInt32 = 0x811C_9DC5
        for byte in "\(vm)/net\(index)".utf8 {
            hash ^= UInt32(byte)
            hash = hash &* 0x0100_0193
        }
        return [0x52, 0x54, 0x00, UInt8(truncatingIfNeeded: hash >> 16), UInt8(truncatingIfNeeded: hash >> 8), UInt8(truncatingIfNeeded: hash)]
    }
}

/// The six octets of `text` (`52:54:00:12:34:56`), or nil when it is not a MAC address.
public func parseMAC(_ text: String) -> [UInt8]? { MACAddress(parsing: text)?.bytes }

func formatMAC(_ mac: [UInt8]) -> String { MACAddress(bytes: mac).description }

/// A NIC ready to hand to its device process: the descriptors the trusted side opened.
struct AttachedNIC {
    var option: NICOption
    var mac: [UInt8]
    /// tap: [tap]; segment: [port region, NIC eventfd, switch eventfd], as `joinSegment` makes them.
    var files: [FileDescriptor]

    /// What hv-net is handed.
    var settings: NetContract.Settings {
        if case .tap = option.attachment { return NetContract.Settings(backend: .tap, mac: MACAddress(bytes: mac)) }
        return NetContract.Settings(backend: .segment, mac: MACAddress(bytes: mac))
    }
    var hostFiles: [NetContract.HostFile: FileDescriptor] {
        if case .tap = option.attachment { return [.tap: files[0]] }
        return [.portRegion: files[0], .portDoorbell: files[1], .switchDoorbell: files[2]]
    }
    var describe: String {
        switch option.attachment {
        case .tap(let name): return "tap \(name)"
        case .segment(let name): return "segment \(name)"
        }
    }
}

/// Opens every --nic (taps, segment ports) before the VM starts; any failure ends hvctl with one line.
func attachNICs(_ definition: VMDefinition, vmName: String, verbose: Bool) -> [AttachedNIC] {
    var options: [NICOption] = []
    for (i, nic) in definition.nics.enumerated() {
        do { options.append(try nic.option(where: "--nic \(i)")) } catch { fail(error.message, status: 2) }
    }
    // Segments belong to tenants; VMs without --tenant (or --no-sandbox) are the host's own.
    let tenant = definition.sandbox ? definition.tenant : nil
    // Every MAC is settled before anything is opened or joined.
    var macs: [[UInt8]] = []
    for (i, option) in options.enumerated() {
        let mac = option.mac ?? NICOption.generatedMAC(vm: vmName, index: i)
        if let other = macs.firstIndex(of: mac) {
            fail("--nic \(i) and --nic \(other) both have MAC \(formatMAC(mac)); give each NIC its own mac=", status: 2)
        }
        macs.append(mac)
    }
    var attached: [AttachedNIC] = []
    var memberships: [SegmentKeeper.Member] = []
    // A NIC that cannot attach ends hvctl; the segments joined so far are left properly first.
    func abandon(_ error: UsageError) -> Never {
        (try? SegmentKeeper(memberships, verbose: verbose))?.leaveAll()
        fail(error.message)
    }
    for (i, option) in options.enumerated() {
        let mac = macs[i]
        switch option.attachment {
        case .tap(let name):
            switch openTap(name) {
            case .success(let tap):
                if let bridge = option.bridge, case .failure(let error) = joinBridge(tap: name, bridge: bridge) { abandon(error) }
                attached.append(AttachedNIC(option: option, mac: mac, files: [tap]))
            case .failure(let error): abandon(error)
            }
        case .segment(let name):
            let access = SegmentAccess(tenant: tenant, sharedWith: option.sharedWith)
            switch joinSegment(name, vm: vmName, nic: "net\(i)", mac: mac, access: access, verbose: verbose) {
            case .success(let nic):
                attached.append(AttachedNIC(option: option, mac: mac, files: nic.files))
                memberships.append(.init(segment: name, vm: vmName, nic: "net\(i)", mac: mac, access: access, files: nic.files,
                                         connection: nic.membership, socket: nic.socket))
            case .failure(let error): abandon(error)
            }
        }
    }
    // The keeper's thread holds it (and every membership) for the rest of hvctl's life; at exit
    // it leaves each segment, and the last member out cleans the segment up.
    do {
        let keeper = try SegmentKeeper(memberships, verbose: verbose)
        try keeper.start()
        if !memberships.isEmpty { ExitCleanup.add { keeper.leaveAll() } }
    } catch {
        fail("cannot watch the segment memberships: \(error)")
    }
    return attached
}

// MARK: Taps

private let tunSetInterface: UInt = 0x4004_54CA  // TUNSETIFF = _IOW('T', 202, int)
private let tunSetOffload: UInt = 0x4004_54D0    // TUNSETOFFLOAD = _IOW('T', 208, unsigned int)
private let tunSetHeaderSize: UInt = 0x4004_54D8 // TUNSETVNETHDRSZ = _IOW('T', 216, int)
private let interfaceTap: Int16 = 0x0002, interfaceNoPacketInfo: Int16 = 0x1000, interfaceVirtioHeader: Int16 = 0x4000

/// A zeroed `struct ifreq` (40 bytes) naming interface `name` (at most 15 bytes, checked by
/// `NICOption.isInterfaceName`); the union after the name, at offset 16, is the caller's.
private func interfaceRequest(_ name: String) -> [UInt8] {
    var request = [UInt8](repeating: 0, count: 40)
    for (k, b) in name.utf8.prefix(15).enumerated() { request[k] = b }
    return request
}

/// Opens (creating if missing) the tap `name` and brings a tap hv created up.
func openTap(_ name: String) -> Result<FileDescriptor, UsageError> {
    let existed = if_nametoindex(name) != 0
    let tun: FileDescriptor
    do { tun = try FileDescriptor.open("/dev/net/tun", flags: O_RDWR | O_CLOEXEC) } catch {
        return .failure(UsageError(message: "cannot open /dev/net/tun for tap '\(name)': \(error.errno) (load the tun module, or run where /dev/net/tun exists)"))
    }
    // struct ifreq: the name (IFNAMSIZ bytes), then the flags (a short) at offset 16; 40 bytes in all.
    var request = interfaceRequest(name)
    // With the 12-byte virtio-net header: the guest's checksum requests reach the host kernel as they are.
    let flags = interfaceTap | interfaceNoPacketInfo | interfaceVirtioHeader
    request[16] = UInt8(truncatingIfNeeded: flags)
    request[17] = UInt8(truncatingIfNeeded: flags >> 8)
    let rc = request.withUnsafeMutableBytes { hv_ioctl_ptr(tun.rawValue, tunSetInterface, $0.baseAddress) }
    if rc != 0 {
        let e = Errno.current
        let why: String
        switch e.rawValue {
        case EPERM: why = "creating or attaching a tap needs CAP_NET_ADMIN: run hvctl as root, or create it first with 'ip tuntap add dev \(name) mode tap user USER'"
        case EBUSY: why = "another process holds it (another VM?)"
        case EINVAL: why = "'\(name)' exists and is not a tap interface"
        default: why = "\(e)"
        }
        return .failure(UsageError(message: "cannot attach tap '\(name)': \(why)"))
    }
    // The header is virtio 1's (12 bytes, with num_buffers). No offload toward the guest: a tap
    // another VMM left with offloads on would otherwise hand over partial checksums or GSO frames
    // the guest never agreed to.
    var headerSize: Int32 = 12
    guard hv_ioctl_ptr(tun.rawValue, tunSetHeaderSize, &headerSize) == 0, hv_ioctl_val(tun.rawValue, tunSetOffload, 0) == 0 else {
        return .failure(UsageError(message: "cannot set up tap '\(name)' for virtio-net headers: \(Errno.current)"))
    }
    if !existed {
        // A tap hv created lives as long as this VM; bring it up so the host side can use it.
        let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if s >= 0 {
            defer { close(s) }
            var ifr = interfaceRequest(name)
            let up = ifr.withUnsafeMutableBytes { raw -> Int32 in
                guard hv_ioctl_ptr(s, UInt(SIOCGIFFLAGS), raw.baseAddress) == 0 else { return -1 }
                raw[16] |= UInt8(truncatingIfNeeded: IFF_UP)
                return hv_ioctl_ptr(s, UInt(SIOCSIFFLAGS), raw.baseAddress)
            }
            if up != 0 { warn("created tap '\(name)' but could not bring it up: \(Errno.current)") }
        }
    }
    return .success(tun)
}

/// Makes the tap `tap` a port of the host bridge `bridge` (SIOCBRADDIF), unless it is one
/// already. A tap hv created leaves the bridge when the VM ends (the tap goes with it).
func joinBridge(tap: String, bridge: String) -> Result<Void, UsageError> {
    var link = [CChar](repeating: 0, count: 256)
    let length = readlink("/sys/class/net/\(tap)/master", &link, link.count - 1)
    if length > 0, String(decoding: link[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self).hasSuffix("/" + bridge) { return .success(()) }
    let index = if_nametoindex(tap)
    guard index != 0 else { return .failure(UsageError(message: "cannot add tap '\(tap)' to bridge '\(bridge)': the tap is gone")) }
    let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard s >= 0 else { return .failure(UsageError(message: "cannot add tap '\(tap)' to bridge '\(bridge)': \(Errno.current)")) }
    defer { close(s) }
    // struct ifreq: the bridge's name, then ifr_ifindex (an int) at offset 16.
    var request = interfaceRequest(bridge)
    withUnsafeBytes(of: Int32(index).littleEndian) { request.replaceSubrange(16..<20, with: $0) }
    let siocBridgeAddInterface: UInt = 0x89A2
    guard request.withUnsafeMutableBytes({ hv_ioctl_ptr(s, siocBridgeAddInterface, $0.baseAddress) }) != 0 else { return .success(()) }
    let e = Errno.current
    let why: String
    switch e.rawValue {
    case ENODEV: why = "there is no bridge '\(bridge)' on this host (create it with 'ip link add \(bridge) type bridge')"
    case EPERM: why = "joining a bridge needs CAP_NET_ADMIN: run hvctl as root"
    case EBUSY: why = "the tap is already a port of another bridge"
    case EOPNOTSUPP, EINVAL: why = "'\(bridge)' is not a bridge"
    default: why = "\(e)"
    }
    return .failure(UsageError(message: "cannot add tap '\(tap)' to bridge '\(bridge)': \(why)"))
}

// MARK: Segments

/// Where segments' sockets live: $HV_RUN_DIR/net.
enum SegmentDirectory {
    static var path: String { RunDirectory.path + "/net" }
    static func socket(_ name: String) -> String { path + "/" + name + ".sock" }
    static func lock(_ name: String) -> String { path + "/" + name + ".lock" }
}

/// Joins `segment`, starting its switch if none runs: the port's descriptors and the membership.
/// `port` rejoins with an existing port (after the switch died), so the NIC process keeps its own.
func joinSegment(_ segment: String, vm: String, nic: String, mac: [UInt8], access: SegmentAccess, verbose: Bool,
                 port: [FileDescriptor]? = nil) -> Result<(files: [FileDescriptor], membership: SeqPacketSocket, socket: FileIdentity?), UsageError> {
    for dir in [RunDirectory.path, SegmentDirectory.path] where mkdir(dir, 0o700) != 0 && errno != EEXIST {
        return .failure(UsageError(message: "cannot create \(dir): \(Errno.current)"))
    }
    // One starter at a time per segment: whoever holds the lock and finds no switch starts one.
    // The last member to leave removes the lock file under the lock (see `SegmentKeeper.leaveAll`).
    let lock: FileDescriptor
    do {
        guard let held = try PathLock.acquire(SegmentDirectory.lock(segment), blocking: true) else {
            return .failure(UsageError(message: "cannot lock \(SegmentDirectory.lock(segment))"))
        }
        lock = held
    } catch {
        return .failure(UsageError(message: "cannot lock \(SegmentDirectory.lock(segment)): \(error.errno)"))
    }
    defer { lock.close() }
    let createdOwnership: Bool
    switch SegmentOwnership.claim(segment, tenant: access.tenant, sharedWith: access.sharedWith) {
    case .success(let created): createdOwnership = created
    case .failure(let error): return .failure(error)
    }
    // A segment this call would have created, but could not, leaves no owner behind.
    var joined = false
    defer { if createdOwnership && !joined && Glibc.access(SegmentDirectory.socket(segment), F_OK) != 0 { unlink(SegmentOwnership.file(segment)) } }
    let files: [FileDescriptor]
    if let port {
        files = port
    } else {
        do {
            files = [try FramePort.create(name: "hv-port-\(segment)-\(vm)-\(nic)"), try EventFD(nonBlocking: true).fd,
                     try EventFD(nonBlocking: true).fd]
        } catch {
            return .failure(UsageError(message: "cannot create the port for segment '\(segment)': \(error)"))
        }
    }
    var lastError = ""
    // A switch whose last member just left may exit between our connect and our join: try again.
    for _ in 0..<3 {
        let connection: SeqPacketSocket
        if let fd = connectTo(SegmentDirectory.socket(segment)) {
            connection = SeqPacketSocket(adopting: FileDescriptor(owning: fd))
        } else {
            if case .failure(let error) = startSwitch(segment, verbose: verbose) { return .failure(error) }
            guard let fd = connectTo(SegmentDirectory.socket(segment)) else {
                return .failure(UsageError(message: "started the switch for segment '\(segment)' but cannot connect to it: \(Errno.current)"))
            }
            connection = SeqPacketSocket(adopting: FileDescriptor(owning: fd))
        }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(connection.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        do {
            try connection.send(Array("join vm=\(vm) nic=\(nic) mac=\(formatMAC(mac))".utf8),
                                fds: files.map(\.rawValue))
            guard let reply = try connection.receive() else {
                lastError = "the switch closed the connection"
                continue
            }
            let text = String(decoding: reply.bytes, as: UTF8.self)
            if text == "ok" {
                timeout = timeval(tv_sec: 0, tv_usec: 0)
                setsockopt(connection.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                // Which socket file this switch listens on (we hold the lock: it is this switch's),
                // so leaving removes that file and never a newer switch's at the same path.
                joined = true
                return .success((files: files, membership: connection, socket: FileIdentity(path: SegmentDirectory.socket(segment))))
            }
            return .failure(UsageError(message: "cannot join segment '\(segment)': \(text.hasPrefix("error ") ? String(text.dropFirst(6)) : text)"))
        } catch {
            lastError = "\(error)"
        }
    }
    return .failure(UsageError(message: "cannot join segment '\(segment)': \(lastError)"))
}

/// Binds the segment's socket and starts its switch (sandboxed unless the VM runs --no-sandbox),
/// detached: it serves every VM on the segment and exits when the last one leaves.
private func startSwitch(_ segment: String, verbose: Bool) -> Result<Void, UsageError> {
    let path = SegmentDirectory.socket(segment)
    unlink(path)
    guard var address = unixAddress(path) else {
        return .failure(UsageError(message: "the socket path \(path) is too long; set HV_RUN_DIR to a shorter directory"))
    }
    let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return .failure(UsageError(message: "cannot create a socket for segment '\(segment)': \(Errno.current)")) }
    let listener = FileDescriptor(owning: fd)
    let old = umask(0o177)
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    umask(old)
    guard bound == 0, listen(fd, 16) == 0 else {
        return .failure(UsageError(message: "cannot listen on \(path): \(Errno.current)"))
    }
    let executable = deviceExecutable("hv-switch")
    let stderr: FileDescriptor
    do { stderr = verbose ? FileDescriptor(owning: try check("dup stderr", fcntl(2, F_DUPFD_CLOEXEC, 3))) : try FileDescriptor.open("/dev/null", flags: O_WRONLY) } catch {
        return .failure(UsageError(message: "cannot start the switch for segment '\(segment)': \(error)"))
    }
    do {
        if sandboxSegments {
            let plan = try DeviceCatalog.plan(profilePath: try DeviceCatalog.builtInProfilePath("switch"), tenant: "segment:\(segment)")  // ":" is not allowed in --tenant: no VM can share its uid
            _ = try plan.spawn(executable: executable, arguments: [segment], memoryBytes: 0,
                               inherit: [(3, listener.rawValue)], detached: true, stderr: stderr.rawValue, placement: segmentSwitchPlacement)
        } else {
            let child = try ChildProcess.spawn(path: executable, arguments: [segment], inherit: [(2, stderr.rawValue), (3, listener.rawValue)])
            try segmentSwitchPlacement?.apply(to: child.pid)
        }
    } catch let error as UsageError {
        return .failure(error)
    } catch {
        return .failure(UsageError(message: "cannot start the switch for segment '\(segment)': \(error)"))
    }
    return .success(())
}

/// Watches this VM's segment memberships. If a segment's switch dies (a crash, a kill), the
/// connection hangs up; the keeper joins again with the same port, starting a new switch if no
/// other member already has, so the NIC processes never notice more than a pause. When hvctl
/// exits, `leaveAll` leaves each segment explicitly, and the last member removes the segment's
/// socket and lock file, so a segment leaves nothing behind.
final class SegmentKeeper: @unchecked Sendable {
    // @unchecked: `members` is touched only by the keeper thread after start(), and by leaveAll()
    // only once that thread has stopped (`stopped`), or never started.
    struct Member {
        var segment: String, vm: String, nic: String, mac: [UInt8], access: SegmentAccess, files: [FileDescriptor], connection: SeqPacketSocket
        /// The switch's socket file as it was when this member joined.
        var socket: FileIdentity?
    }
    private var members: [Member]
    private let verbose: Bool
    private let leaving = Atomic<Bool>(false)
    private let stopped = Atomic<Bool>(true)
    private let wake: EventFD

    init(_ members: [Member], verbose: Bool) throws(SystemError) {
        self.members = members
        self.verbose = verbose
        wake = try EventFD(nonBlocking: true)
    }

    func start() throws(SystemError) {
        guard !members.isEmpty else { return }
        stopped.store(false, ordering: .releasing)
        _ = try HostThread.spawn(name: "hv-segments") { [self] in
            defer { stopped.store(true, ordering: .releasing) }
            while !leaving.load(ordering: .acquiring) {
                let ready: [Int16]
                var interests = [Poll.Interest(fd: wake.fd.rawValue)]
                interests += members.map { Poll.Interest(fd: $0.connection.fd.rawValue) }
                do { ready = try Poll.wait(interests, timeoutMilliseconds: -1) } catch {
                    usleep(100_000)  // poll itself failing (it should not): never spin
                    continue
                }
                if leaving.load(ordering: .acquiring) { return }
                for (i, revents) in ready.dropFirst().enumerated() where revents != 0 {
                    let m = members[i]
                    // Anything the switch sends unasked, or its hang-up, means it is gone.
                    _ = try? m.connection.receive()
                    warn("segment '\(m.segment)': its switch went away; \(m.nic) joins again")
                    var delay: UInt32 = 50_000
                    while !leaving.load(ordering: .acquiring) {
                        switch joinSegment(m.segment, vm: m.vm, nic: m.nic, mac: m.mac, access: m.access, verbose: verbose, port: m.files) {
                        case .success(let joined):
                            members[i].connection = joined.membership
                            members[i].socket = joined.socket
                            warn("segment '\(m.segment)': \(m.nic) joined again")
                        case .failure(let error):
                            warn("\(error.message); trying again")
                            usleep(delay)
                            delay = min(delay * 2, 2_000_000)
                            continue
                        }
                        break
                    }
                }
            }
        }
    }

    /// Leaves every segment (at exit). Under each segment's lock, so no VM joins in between: say
    /// `leave`; the switch answers `left N` with the members that remain, and when none does it
    /// exits, and this member removes the segment's socket and lock file.
    func leaveAll() {
        leaving.store(true, ordering: .releasing)
        wake.signal()
        for _ in 0..<100 where !stopped.load(ordering: .acquiring) { usleep(10_000) }
        guard stopped.load(ordering: .acquiring) else { return }  // stuck rejoining: leave by hanging up
        for m in members {
            guard let lock = try? PathLock.acquire(SegmentDirectory.lock(m.segment), blocking: true) else { continue }
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(m.connection.fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            if (try? m.connection.send(Array("leave".utf8))) != nil, let reply = try? m.connection.receive(),
               String(decoding: reply.bytes, as: UTF8.self) == "left 0",
               let joined = m.socket, FileIdentity(path: SegmentDirectory.socket(m.segment)) == joined {
                unlink(SegmentDirectory.socket(m.segment))
                unlink(SegmentOwnership.file(m.segment))
                unlink(SegmentDirectory.lock(m.segment))
            }
            m.connection.fd.close()
            lock.close()
        }
    }
}

/// A file's identity (device and inode), to tell a file from a newer one at the same path.
struct FileIdentity: Equatable {
    var device: UInt64
    var inode: UInt64
    init?(path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
    }
}

/// Removes what segments whose switch is gone left behind (a switch killed with its last member,
/// a VM killed with SIGKILL): a socket nobody listens on, its owner record, a lock file with no
/// socket. A segment
/// being joined right now (its lock held) is left alone.
func sweepStaleSegments() {
    for segment in entryStems(in: SegmentDirectory.path, suffixes: [".sock", ".lock", ".owner"]) {
        guard let lock = try? PathLock.acquire(SegmentDirectory.lock(segment), blocking: false) else { continue }
        if let fd = connectTo(SegmentDirectory.socket(segment)) {
            close(fd)  // a live switch: the connection it sees is dropped after its 2 s grace
        } else {
            unlink(SegmentDirectory.socket(segment))
            unlink(SegmentOwnership.file(segment))
            unlink(SegmentDirectory.lock(segment))
        }
        lock.close()
    }
}

/// Whether segment switches run sandboxed (off only under --no-sandbox).
nonisolated(unsafe) var sandboxSegments = true

/// Where a segment's switch goes: out of the VM's cgroups (hvctl runs in them), since it serves
/// every VM on the segment and outlives the one that started it. Set with the VM's cgroups.
nonisolated(unsafe) var segmentSwitchPlacement: ProcessPlacement?

// MARK: Segment status

/// The status of every private segment on this host, as each switch reports it (a JSON object
/// per segment: its name, members and their frame counters), with its owner (null: the host's
/// own VMs) and the tenants it is shared with.
public func segmentStatuses() -> [JSONObject] {
    sweepStaleSegments()
    var segments: [JSONObject] = []
    for name in entryStems(in: SegmentDirectory.path, suffixes: [".sock"]) {
        guard let object = switchStatus(name, timeout: timeval(tv_sec: 5, tv_usec: 0)) else { continue }  // a switch that has exited
        // Whose segment it is: the host's record, not the (sandboxed) switch's word.
        let ownership = SegmentOwnership.read(name)
        segments.append(JSONObject(object.members + [
            .init(key: "owner", value: ownership?.owner.map { .string($0) } ?? .null),
            .init(key: "shared_with", value: .array((ownership?.sharedWith ?? []).map { .string($0) })),
        ]))
    }
    return segments
}

/// What segment `name`'s switch answers to `status` (its members and their counters), or nil
/// when no switch answers within `timeout`.
func switchStatus(_ name: String, timeout: timeval) -> JSONObject? {
    guard let fd = connectTo(SegmentDirectory.socket(name)) else { return nil }
    let connection = SeqPacketSocket(adopting: FileDescriptor(owning: fd))
    var timeout = timeout
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    guard (try? connection.send(Array("status".utf8))) != nil, let reply = try? connection.receive(),
          case .object(let object)? = try? JSONValue.parse(reply.bytes) else { return nil }
    return object
}

/// A segment NIC's frames as its segment's switch counts them: no host interface carries a
/// segment's frames, so the switch is the one place they are counted. (The switch is sandboxed
/// like every device: its counts are its word, good for metrics, not for billing a tenant.) A
/// guest's frames are never dropped on their way to the switch (the NIC waits for room in its
/// port), so `sentDropped` is 0; `receivedDropped` is what the switch could not hand to the NIC.
enum SegmentTraffic {
    /// The counters of NIC `nic` of VM `vm` on `segment`; nil when the switch does not answer
    /// within 200 ms or does not list it.
    static func read(segment: String, vm: String, nic: String) -> VMStatus.NIC.Traffic? {
        // The status is asked on the control socket's thread: a stuck switch must not hold it.
        guard let status = switchStatus(segment, timeout: timeval(tv_sec: 0, tv_usec: 200_000)),
              case .array(let members)? = status["members"] else { return nil }
        for case .object(let member) in members {
            guard case .string(vm)? = member["vm"], case .string(nic)? = member["nic"] else { continue }
            func count(_ key: String) -> UInt64 {
                if case .number(let n)? = member[key] { return n.uint64Value ?? 0 }
                return 0
            }
            return .init(sentFrames: count("frames_from_vm"), sentBytes: count("bytes_from_vm"), receivedFrames: count("frames_to_vm"),
                         receivedBytes: count("bytes_to_vm"), sentDropped: 0, receivedDropped: count("dropped_to_vm"))
        }
        return nil
    }
}

/// The host kernel's counters of every interface in this process's network namespace (where the
/// VM's core made or opened its taps), from /proc/self/net/dev, as `VMStatus.NIC.Traffic` seen
/// from the guest: the tap's receive side is what the guest sent.
enum TapTraffic {
    static func read() -> [String: VMStatus.NIC.Traffic] {
        guard let file = try? FileDescriptor.open("/proc/self/net/dev", flags: O_RDONLY), let bytes = try? file.readAll() else { return [:] }
        return parse(String(decoding: bytes, as: UTF8.self))
    }

    /// `/proc/net/dev`'s lines "NAME: rx bytes packets errs drop fifo frame compressed multicast
    /// tx bytes packets errs drop …" by interface name.
    static func parse(_ text: String) -> [String: VMStatus.NIC.Traffic] {
        var traffic: [String: VMStatus.NIC.Traffic] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            guard let name = line[..<colon].split(separator: " ").last.map(String.init) else { continue }
            let fields = line[line.index(after: colon)...].split(separator: " ").compactMap { UInt64($0) }
            guard fields.count >= 12 else { continue }
            traffic[name] = .init(sentFrames: fields[1], sentBytes: fields[0], receivedFrames: fields[9], receivedBytes: fields[8],
                                  sentDropped: fields[3], receivedDropped: fields[11])
        }
        return traffic
    }
}

import Glibc
import HVIPC
import HVNetSwitch
import HVSys

// hv-switch: one private network segment, a learning Ethernet switch in a sandboxed process of
// its own. It is started by the first VM that joins the segment (`hvctl run --nic net=NAME`)
// and outlives it; it exits when the last member leaves.
//
// Descriptors: 3 is a listening SOCK_SEQPACKET socket the trusted side bound at
// $HV_RUN_DIR/net/NAME.sock; 5 is the lock-down seccomp filter under the sandbox. It opens
// nothing itself. Each member's core connects and sends `join vm=VM nic=NIC mac=MAC` with three
// descriptors: the port region (FramePort), the NIC's eventfd and this port's eventfd. The
// connection stays open while the member is on the segment; its hang-up is the leave. A
// connection that sends `status` gets the segment as JSON (`hvctl net ls`). See
// ipc-schema/README.md §17.
//
// One thread moves every frame: from each port's uplink into the downlinks the forwarding table
// picks. A downlink that is full drops the frame for that port only (a switch's full egress
// queue), so no member can stall the segment for the others.

let listenerFD: Int32 = 3
let maximumMembers = 32
let framesPerPortPerRound = 64

func hvSay(_ segment: String, _ text: String) {
    let line = "hv-switch[\(segment)]: \(text)\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// The segment's name: the listening socket's file name (the argument list does not survive the
/// jail on every Swift runtime, the socket's address always does).
func segmentNameFromListener() -> String? {
    var address = sockaddr_un()
    var length = socklen_t(MemoryLayout<sockaddr_un>.size)
    let rc = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listenerFD, $0, &length) }
    }
    guard rc == 0 else { return nil }
    let path = withUnsafeBytes(of: address.sun_path) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    guard path.hasSuffix(".sock"), let slash = path.lastIndex(of: "/") else { return nil }
    return String(path[path.index(after: slash)...].dropLast(5))
}

guard let segmentName = segmentNameFromListener() ?? CommandLine.arguments.dropFirst().first else {
    _ = "usage: hv-switch SEGMENT, with a listening socket at .../SEGMENT.sock on fd 3 (started by hvctl run --nic net=SEGMENT)\n".withCString { write(2, $0, strlen($0)) }
    exit(2)
}

/// One member NIC.
final class Member {
    let connection: SeqPacketSocket
    let vm: String
    let nic: String
    let mac: MACAddress
    let port: FramePort
    let doorbell: EventFD
    let id: Int
    var framesIn: UInt64 = 0, bytesIn: UInt64 = 0
    var framesOut: UInt64 = 0, bytesOut: UInt64 = 0
    var dropped: UInt64 = 0

    init(connection: SeqPacketSocket, vm: String, nic: String, mac: MACAddress, port: FramePort, doorbell: EventFD, id: Int) {
        self.connection = connection
        self.vm = vm
        self.nic = nic
        self.mac = mac
        self.port = port
        self.doorbell = doorbell
        self.id = id
    }
}

/// The segment: its members, their ports and the forwarding table.
final class Segment {
    let segmentName: String
    init(name: String) {
        segmentName = name
        lastAging = started
    }
    func say(_ text: String) { hvSay(segmentName, text) }

        var members: [Member] = []
    /// Connections that have not joined (yet): a status query, or a join on its way, with when
    /// each was accepted. Each gets `pendingGrace` to say something; when all `maximumPending`
    /// slots are taken, the oldest makes room, so idle connections can never lock joiners out.
    var pending: [(connection: SeqPacketSocket, since: UInt64)] = []
    static let maximumPending = 16
    static let pendingGrace: UInt64 = 2_000_000_000
    var forwarding = LearningSwitch()
    var nextID = 0
    var everJoined = false
    let started = monotonicNanoseconds()
    var lastAging: UInt64 = 0
    var flooded: UInt64 = 0, filtered: UInt64 = 0

    func statusJSON() -> String {
        let ports = members.map { m in
            "{\"vm\": \(jsonString(m.vm)), \"nic\": \(jsonString(m.nic)), \"mac\": \"\(m.mac)\", "
                + "\"frames_from_vm\": \(m.framesIn), \"bytes_from_vm\": \(m.bytesIn), "
                + "\"frames_to_vm\": \(m.framesOut), \"bytes_to_vm\": \(m.bytesOut), \"dropped_to_vm\": \(m.dropped)}"
        }
        return "{\"segment\": \(jsonString(segmentName)), \"learned\": \(forwarding.count), "
            + "\"flooded\": \(flooded), \"filtered\": \(filtered), \"members\": [\(ports.joined(separator: ", "))]}"
    }

    /// `join vm=VM nic=NIC mac=MAC` with [port region, NIC eventfd, switch eventfd]: a member or an error line.
    func join(_ message: SeqPacketSocket.Message, on connection: SeqPacketSocket) -> String {
        var fields: [String: String] = [:]
        for word in String(decoding: message.bytes, as: UTF8.self).split(separator: " ").dropFirst() {
            guard let eq = word.firstIndex(of: "=") else { return "error malformed join request" }
            fields[String(word[..<eq])] = String(word[word.index(after: eq)...])
        }
        guard let vm = fields["vm"], let nic = fields["nic"], let macText = fields["mac"], message.fds.count == 3, !message.truncated else {
            return "error malformed join request (needs vm=, nic=, mac= and three descriptors)"
        }
        guard let mac = MACAddress(parsing: macText), !mac.isGroup, !mac.isZero else {
            return "error MAC \(macText) is not a unicast Ethernet address"
        }
        if let other = members.first(where: { $0.mac == mac }) {
            return "error MAC \(mac) is already on segment \(segmentName) (VM \(other.vm), \(other.nic)); give this NIC another mac="
        }
        guard members.count < maximumMembers else { return "error segment \(segmentName) is full (\(maximumMembers) NICs)" }
        let port: FramePort
        do {
            let nicDoorbell = EventFD(adopting: message.fds[1])
            port = try FramePort(fd: message.fds[0], side: .segment, peer: nicDoorbell)
        } catch {
            return "error \(error)"
        }
        let doorbell = EventFD(adopting: message.fds[2])
        try? doorbell.fd.setNonBlocking(true)
        message.fds[0].close()  // the mapping stays
        members.append(Member(connection: connection, vm: vm, nic: nic, mac: mac, port: port, doorbell: doorbell, id: nextID))
        nextID += 1
        everJoined = true
        say("\(vm) \(nic) (\(mac)) joined")
        return "ok"
    }

    func leave(_ index: Int) {
        let m = members.remove(at: index)
        forwarding.remove(port: m.id)
        say("\(m.vm) \(m.nic) (\(m.mac)) left")
    }

    /// Moves up to a batch of frames from every uplink; true if any moved.
    func forwardRound(now: UInt64) -> Bool {
        var moved = false
        for (i, source) in members.enumerated() {
            var n = 0
            while n < framesPerPortPerRound, source.port.receive({ frame in
                source.framesIn &+= 1
                source.bytesIn &+= UInt64(frame.count)
                let decision = forwarding.forward(from: source.id, source: MACAddress(frame, at: 6), destination: MACAddress(frame), now: now)
                func deliver(_ m: Member) {
                    if m.port.send(frame) {
                        m.framesOut &+= 1
                        m.bytesOut &+= UInt64(frame.count)
                    } else {
                        m.dropped &+= 1
                    }
                }
                switch decision {
                case .port(let id):
                    if let target = members.first(where: { $0.id == id }) { deliver(target) }
                case .flood:
                    flooded &+= 1
                    for (j, m) in members.enumerated() where j != i { deliver(m) }
                case .drop:
                    filtered &+= 1
                }
            }) {
                n += 1
            }
            if n > 0 { moved = true }
        }
        for m in members { m.port.flush() }
        return moved
    }

    func serveControl(_ revents: [Int16], pendingBase: Int) {
        // Members' connections: anything but a hang-up is a protocol error, also answered by leaving.
        var index = members.count - 1
        while index >= 0 {
            let r = revents[1 + index * 2]
            if r & Int16(POLLHUP | POLLERR | POLLNVAL) != 0 || (r & Int16(POLLIN) != 0) {
                let message = r & Int16(POLLIN) != 0 ? try? members[index].connection.receive() : nil
                if let message, message.bytes == Array("status".utf8) {
                    try? members[index].connection.send(Array(statusJSON().utf8))
                } else if let message, message.bytes == Array("leave".utf8) {
                    // An orderly leave: the member learns how many remain, so the last one out
                    // removes the segment's socket (it holds the segment's lock meanwhile).
                    let connection = members[index].connection
                    leave(index)
                    try? connection.send(Array("left \(members.count)".utf8))
                } else {
                    leave(index)
                }
            }
            index -= 1
        }
        let now = monotonicNanoseconds()
        for (k, entry) in pending.enumerated().reversed() {
            let r = revents[pendingBase + k]
            guard r != 0 else {
                if now &- entry.since > Self.pendingGrace { pending.remove(at: k) }  // silent too long
                continue
            }
            let connection = entry.connection
            pending.remove(at: k)
            guard r & Int16(POLLIN) != 0, let message = try? connection.receive(), !message.bytes.isEmpty else { continue }
            if message.bytes == Array("status".utf8) {
                try? connection.send(Array(statusJSON().utf8))
                continue
            }
            guard message.bytes.starts(with: Array("join ".utf8)) else {
                try? connection.send(Array("error unknown request (expected join or status)".utf8))
                continue
            }
            let answer = join(message, on: connection)
            try? connection.send(Array(answer.utf8))
        }
        if revents[0] & Int16(POLLIN) != 0 {
            let fd = accept(listenerFD, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                if pending.count >= Self.maximumPending { pending.removeFirst() }  // the oldest, silent longest, makes room
                pending.append((SeqPacketSocket(adopting: FileDescriptor(owning: fd)), now))
            }
        }
    }


    func run() -> Never {
        say("segment up")
        while true {
            let now = monotonicNanoseconds()
            if now &- lastAging > 1_000_000_000 {
                forwarding.age(now: now)
                lastAging = now
            }
            let busy = forwardRound(now: now)
            // Sleep only once every port has asked to be woken and nothing slipped in meanwhile.
            var idle = !busy
            if idle {
                for m in members where !m.port.prepareToSleep() { idle = false }
            }
            var interests = [Poll.Interest(fd: listenerFD)]
            for m in members {
                interests.append(Poll.Interest(fd: m.connection.fd.rawValue))
                interests.append(Poll.Interest(fd: m.doorbell.fd.rawValue))
            }
            let pendingBase = interests.count
            for c in pending { interests.append(Poll.Interest(fd: c.connection.fd.rawValue)) }
            let revents: [Int16]
            // With connections pending, wake in time to drop the silent ones.
            do { revents = try Poll.wait(interests, timeoutMilliseconds: idle ? (pending.isEmpty ? 1000 : 250) : 0) } catch {
                say("\(error)")
                exit(1)
            }
            for m in members {
                m.port.awake()
                _ = m.doorbell.drain()
            }
            serveControl(revents, pendingBase: pendingBase)
            if members.isEmpty {
                if everJoined && pending.isEmpty {
                    say("last member left; segment down")
                    exit(0)
                }
                if !everJoined && monotonicNanoseconds() &- started > 30_000_000_000 {
                    say("nobody joined within 30 s; segment down")
                    exit(0)
                }
            }
        }

    }
}

signal(SIGPIPE, SIG_IGN)
// The profile's second stage (no exec, no open); the switch has no core to report a denial to.
do throws(LockDown.Failure) { try LockDown.apply(reportingDeniedSyscallsTo: -1) } catch {
    hvSay(segmentName, error.description)
    exit(2)
}
Segment(name: segmentName).run()

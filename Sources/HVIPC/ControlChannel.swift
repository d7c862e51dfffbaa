import Glibc
import HVSys

/// Why a control-channel exchange failed.
public enum ChannelError: Error, Sendable, CustomStringConvertible {
    /// The peer closed its end (it exited or crashed).
    case closed
    /// No answer within the request's timeout.
    case timedOut(String)
    /// The peer sent bytes that are not a valid frame or payload.
    case malformed(WireError)
    /// The peer answered with a non-OK status.
    case rejected(Status, String)
    /// A system call failed.
    case system(SystemError)

    public var description: String {
        switch self {
        case .closed: return "peer closed the channel"
        case .timedOut(let what): return "no reply to \(what) in time"
        case .malformed(let e): return "malformed message: \(e)"
        case .rejected(let status, let what): return "\(what) rejected with status \(status)"
        case .system(let e): return e.description
        }
    }
}

/// Request/reply framing over a SOCK_SEQPACKET socket. Every request carries an id and either
/// expects a reply within a timeout or is flagged NO_REPLY. One thread uses a channel at a time.
public final class ControlChannel: @unchecked Sendable {
    // @unchecked: `nextID` is touched only by the single thread that owns this end.
    /// The socket underneath.
    public let socket: SeqPacketSocket
    private var nextID: UInt32 = 1

    public init(socket: SeqPacketSocket) { self.socket = socket }

    /// Sends a frame with optional descriptors (owned by the caller).
    public func send(_ frame: Frame, fds: [Int32] = []) throws(ChannelError) {
        do { try socket.send(frame.encode(), fds: fds) } catch {
            if error.errno == .brokenPipe || error.errno == .connectionReset { throw .closed }
            throw .system(error)
        }
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for one frame.
    public func receive(timeoutMilliseconds: Int32) throws(ChannelError) -> (Frame, [FileDescriptor]) {
        let deadline = timeoutMilliseconds < 0 ? UInt64.max : monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
        while true {
            let now = monotonicNanoseconds()
            let wait = deadline == .max ? Int32(-1) : Int32(min(deadline > now ? (deadline - now + 999_999) / 1_000_000 : 0, UInt64(Int32.max)))
            let revents: [Int16]
            do { revents = try Poll.wait([.init(fd: socket.fd.rawValue)], timeoutMilliseconds: wait) } catch { throw .system(error) }
            if revents[0] == 0 {
                if monotonicNanoseconds() >= deadline { throw .timedOut("message") }
                continue
            }
            let message: SeqPacketSocket.Message?
            do { message = try socket.receive(maxBytes: Frame.maximumSize) } catch {
                if error.errno == .connectionReset { throw .closed }
                throw .system(error)
            }
            guard let message else { throw .closed }
            if message.truncated { throw .malformed(.invalidField("datagram or descriptor list truncated")) }
            do { return (try Frame.decode(message.bytes), message.fds) } catch { throw .malformed(error) }
        }
    }

    /// Sends a request and waits for its reply; a non-OK status throws `.rejected`.
    public func request(_ type: MessageType, payload: [UInt8], fds: [Int32] = [], timeoutMilliseconds: Int32) throws(ChannelError) -> (Frame, [FileDescriptor]) {
        let sent = try sendRequest(type, payload: payload, fds: fds)
        return try awaitReply(to: sent, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// A request sent by `sendRequest`, whose reply `awaitReply` waits for.
    public struct SentRequest: Sendable {
        public let type: MessageType
        public let id: UInt32
    }

    /// Sends a request without waiting: requests to several peers are sent first and their
    /// replies collected after (the peers then work, and wake, in parallel).
    public func sendRequest(_ type: MessageType, payload: [UInt8], fds: [Int32] = []) throws(ChannelError) -> SentRequest {
        let id = nextID
        nextID &+= 1
        try send(Frame(type: type.rawValue, id: id, payload: payload), fds: fds)
        return SentRequest(type: type, id: id)
    }

    /// Waits for the reply to `sent`; a non-OK status throws `.rejected`.
    public func awaitReply(to sent: SentRequest, timeoutMilliseconds: Int32) throws(ChannelError) -> (Frame, [FileDescriptor]) {
        let id = sent.id, type = sent.type
        let deadline = timeoutMilliseconds < 0 ? UInt64.max : monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
        var reply: Frame
        var replyFDs: [FileDescriptor]
        while true {
            let now = monotonicNanoseconds()
            let left = deadline == .max ? Int32(-1) : Int32(min(deadline > now ? (deadline - now) / 1_000_000 : 0, UInt64(Int32.max)))
            (reply, replyFDs) = try receive(timeoutMilliseconds: left)
            // A reply to an earlier request that timed out arrives late: skip it.
            if reply.flags.contains(.reply) && reply.id != id && id &- reply.id < 1 << 31 { continue }
            break
        }
        guard reply.flags.contains(.reply), reply.id == id, reply.type == type.rawValue else {
            throw .malformed(.invalidField("expected the reply to \(type) #\(id), got type 0x\(String(reply.type, radix: 16)) #\(reply.id)"))
        }
        guard reply.status == Status.ok.rawValue else {
            throw .rejected(Status(rawValue: reply.status) ?? .internalError, "\(type)")
        }
        return (reply, replyFDs)
    }

    /// Sends a NO_REPLY message.
    public func notify(_ type: MessageType, payload: [UInt8]) throws(ChannelError) {
        let id = nextID
        nextID &+= 1
        try send(Frame(type: type.rawValue, flags: .noReply, id: id, payload: payload))
    }
}

/// Descriptor numbers a device process inherits; everything else arrives in HELLO.
public enum InheritedDescriptor {
    /// The control socket (core → device requests).
    public static let control: Int32 = 3
    /// The event socket (device → core requests).
    public static let events: Int32 = 4
}

import CHVShim
import Glibc

/// One end of a Unix `SOCK_SEQPACKET` socket pair: message boundaries are kept, and file
/// descriptors travel with messages (SCM_RIGHTS). The control channels of hv's IPC use these.
public final class SeqPacketSocket: Sendable {
    /// The owned descriptor.
    public let fd: FileDescriptor

    /// Wraps an existing descriptor (e.g. one inherited by a device process at a fixed number).
    public init(adopting fd: FileDescriptor) { self.fd = fd }

    /// A connected pair, both ends close-on-exec.
    public static func pair() throws(SystemError) -> (SeqPacketSocket, SeqPacketSocket) {
        var fds: [Int32] = [-1, -1]
        let r = socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
        try check("socketpair(AF_UNIX, SOCK_SEQPACKET)", r)
        return (SeqPacketSocket(adopting: FileDescriptor(owning: fds[0])),
                SeqPacketSocket(adopting: FileDescriptor(owning: fds[1])))
    }

    /// Sends one message with optional descriptors (at most 16). The descriptors stay owned by the caller.
    public func send(_ bytes: [UInt8], fds: [Int32] = []) throws(SystemError) {
        let n = bytes.withUnsafeBytes { buf in
            fds.withUnsafeBufferPointer { fdBuf in
                retryOnInterrupt { hv_send_with_fds(fd.rawValue, buf.baseAddress, buf.count, fdBuf.baseAddress, Int32(fdBuf.count)) }
            }
        }
        try check("send on control socket", n)
    }

    /// A received message.
    public struct Message: Sendable {
        /// The payload.
        public var bytes: [UInt8]
        /// Descriptors that came with it, now owned by the receiver.
        public var fds: [FileDescriptor]
        /// True when the payload or descriptor list was cut short (the message is then invalid).
        public var truncated: Bool
    }

    /// Receives one message (blocking unless the socket is non-blocking). Returns nil when the peer
    /// has closed its end.
    public func receive(maxBytes: Int = 65536) throws(SystemError) -> Message? {
        var buffer = [UInt8](repeating: 0, count: maxBytes)
        var rawFds = [Int32](repeating: -1, count: Int(HV_MAX_PASSED_FDS))
        var count: Int32 = 0
        var truncated: Int32 = 0
        let n = buffer.withUnsafeMutableBytes { buf in
            rawFds.withUnsafeMutableBufferPointer { fdBuf in
                retryOnInterrupt {
                    hv_recv_with_fds(fd.rawValue, buf.baseAddress, buf.count, fdBuf.baseAddress, Int32(fdBuf.count), &count, &truncated)
                }
            }
        }
        try check("receive on control socket", n)
        let fds = rawFds.prefix(Int(count)).map { FileDescriptor(owning: $0) }
        if n == 0 && fds.isEmpty { return nil }
        return Message(bytes: Array(buffer.prefix(n)), fds: fds, truncated: truncated != 0)
    }

    /// Shuts down both directions, waking a peer blocked in receive.
    public func shutdown() { _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR)) }
}

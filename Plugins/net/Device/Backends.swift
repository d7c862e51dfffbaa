import CHVShim
import Glibc
import HVDeviceSDK
import HVIPC  // the segment frame port: hv's own wiring, not SDK API
import HVSys

/// A checksum the driver left for the device (VIRTIO_NET_HDR_F_NEEDS_CSUM): the Internet checksum
/// of the frame from `start` on goes into the 16 bits at `start + offset`.
struct ChecksumRequest {
    var start: Int
    var offset: Int
}

/// Where a NIC's frames go and come from: a host tap device, or a port on a private segment's
/// switch. Frames are Ethernet frames without FCS; a backend that `carriesVirtioHeader` takes and
/// gives them behind the 12-byte virtio-net header.
protocol FrameBackend: AnyObject {
    /// Whether frames cross with their virtio-net header (the tap, opened with IFF_VNET_HDR).
    var carriesVirtioHeader: Bool { get }
    /// Whether it can hand the guest frames whose checksum is left partial (VIRTIO_NET_F_GUEST_CSUM).
    var offersGuestChecksum: Bool { get }
    /// Turns that on or off, as the driver negotiated.
    func setGuestChecksum(_ on: Bool)
    /// Readable when frames may have arrived (or, for a port, when space was freed).
    var wakeDescriptor: Int32 { get }
    /// Resets the wake descriptor after it fired.
    func drainWake()
    /// Whether a frame can be sent now; when false, the backend arranges a wake-up for when it can.
    var canSend: Bool { get }
    /// Sends the frame held in `vectors` (`length` bytes in all, the header first if the backend
    /// carries it), completing `checksum` first unless the backend hands that on; false if dropped.
    func send(_ vectors: [iovec], length: Int, checksum: ChecksumRequest?) -> Bool
    /// The next frame's length, if the backend can tell before taking it (a port can, a tap can't).
    var nextFrameLength: Int? { get }
    /// Takes the next frame into `vectors`; its length, or nil when none is waiting. A frame
    /// longer than the vectors is dropped and reported as 0.
    func receive(into vectors: [iovec], capacity: Int) -> Int?
    /// Tells the peer about what was sent or taken since the last flush.
    func flush()
}

/// A tap device the trusted side opened (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte header,
/// offloads to the guest off): one frame per read or write, the guest's header passed to the host
/// kernel as it is, so a checksum the guest left undone is finished there.
final class TapBackend: FrameBackend {
    let tap: FileDescriptor
    /// Frames the host side would not take (the tap's queue full): what a real NIC drops on a
    /// jammed link.
    var sendFailures: UInt64 = 0

    init(tap: FileDescriptor) throws(SystemError) {
        self.tap = tap
        try tap.setNonBlocking(true)
    }

    var carriesVirtioHeader: Bool { true }
    var offersGuestChecksum: Bool { true }
    /// Whether the tap now hands over partial checksums (TUN_F_CSUM); hvctl opened it with none.
    private var guestChecksum = false

    func setGuestChecksum(_ on: Bool) {
        guard on != guestChecksum else { return }
        // TUNSETOFFLOAD with TUN_F_CSUM (1) or nothing: the sandbox allows this one ioctl request.
        if hv_ioctl_val(tap.rawValue, 0x4004_54D0, on ? 1 : 0) == 0 { guestChecksum = on }
    }

    var wakeDescriptor: Int32 { tap.rawValue }
    func drainWake() {}
    var canSend: Bool { true }
    var nextFrameLength: Int? { nil }
    func flush() {}

    func send(_ vectors: [iovec], length: Int, checksum: ChecksumRequest?) -> Bool {
        let fd = tap.rawValue
        let n = vectors.withUnsafeBufferPointer { buffer in retryOnInterrupt { writev(fd, buffer.baseAddress, Int32(buffer.count)) } }
        if n != length {
            sendFailures &+= 1
            return false
        }
        return true
    }

    func receive(into vectors: [iovec], capacity: Int) -> Int? {
        let fd = tap.rawValue
        let n = vectors.withUnsafeBufferPointer { buffer in retryOnInterrupt { readv(fd, buffer.baseAddress, Int32(buffer.count)) } }
        guard n > 0 else { return nil }  // EAGAIN: nothing waiting
        return n
    }
}

/// A port on a private segment: the frame rings shared with the segment's switch process.
final class SegmentBackend: FrameBackend {
    let port: FramePort
    let doorbell: EventFD

    init(region: FileDescriptor, doorbell: FileDescriptor, switchDoorbell: FileDescriptor) throws(FramePortError) {
        self.doorbell = EventFD(adopting: doorbell)
        try? doorbell.setNonBlocking(true)
        port = try FramePort(fd: region, side: .nic, peer: EventFD(adopting: switchDoorbell))
        // The NIC sleeps inside the runtime's loop, which this backend does not see: ask the
        // switch to signal after every batch it delivers, always. One eventfd write per batch.
        // Frames that arrived while no process served the port (a restart) were signalled to
        // the dead one: wake ourselves for them. (prepareToSleep withdrew the request when
        // frames were waiting, and a restarted NIC then never heard from the switch again.)
        if port.requestSignalsForEveryFrame() { self.doorbell.signal() }
    }

    var carriesVirtioHeader: Bool { false }
    /// Frames on a segment always carry whole checksums.
    var offersGuestChecksum: Bool { false }
    func setGuestChecksum(_ on: Bool) {}
    var wakeDescriptor: Int32 { doorbell.fd.rawValue }
    func drainWake() { _ = doorbell.drain() }
    var canSend: Bool { port.outboundSpace > 0 || port.waitForSpace() }
    var nextFrameLength: Int? { port.nextInboundLength }
    func flush() { port.flush() }

    func send(_ vectors: [iovec], length: Int, checksum: ChecksumRequest?) -> Bool {
        guard length <= FramePortLayout.maximumFrame else { return false }
        return port.send(length: length) { slot in
            var at = 0
            for v in vectors {
                guard let base = v.iov_base else { continue }
                (slot.baseAddress! + at).copyMemory(from: base, byteCount: v.iov_len)
                at += v.iov_len
            }
            // The other members may not take partial checksums: finish it here, in the copy.
            if let checksum { finishChecksum(UnsafeMutableRawBufferPointer(slot), checksum) }
        }
    }

    func receive(into vectors: [iovec], capacity: Int) -> Int? {
        var length: Int?
        let took = port.receive { frame in
            guard frame.count <= capacity else {
                length = 0
                return
            }
            var at = 0
            for v in vectors where at < frame.count {
                guard let base = v.iov_base else { continue }
                let n = min(v.iov_len, frame.count - at)
                base.copyMemory(from: frame.baseAddress! + at, byteCount: n)
                at += n
            }
            length = frame.count
        }
        return took ? length ?? 0 : nil
    }
}

/// Stores the Internet checksum (RFC 1071) of `frame[request.start...]` at `request.start +
/// request.offset`, big-endian; the field's current content (the pseudo-header sum the driver put
/// there) is part of the sum, as virtio's NEEDS_CSUM requires. The caller checked the bounds.
func finishChecksum(_ frame: UnsafeMutableRawBufferPointer, _ request: ChecksumRequest) {
    var sum: UInt32 = 0
    var i = request.start
    while i + 1 < frame.count {
        sum &+= UInt32(frame[i]) << 8 | UInt32(frame[i + 1])
        i += 2
    }
    if i < frame.count { sum &+= UInt32(frame[i]) << 8 }
    while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
    let result = ~UInt16(truncatingIfNeeded: sum)
    frame[request.start + request.offset] = UInt8(result >> 8)
    frame[request.start + request.offset + 1] = UInt8(truncatingIfNeeded: result)
}

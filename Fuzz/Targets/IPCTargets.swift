import HVIPC
import HVNetSwitch
import HVSys

/// The core ← device surface: what a compromised device process can put on its sockets and in
/// the memory it shares with the core or the switch.
enum IPCTargets {
    /// A datagram on a device's socket: the frame header, then the payload decoder its type selects
    /// (as `DeviceEndpoint` and the SDK runtime do). Whatever decodes must encode back to a value
    /// that decodes to itself.
    static let frame = FuzzTarget("ipc-frame", covers: "IPC frame header and every message payload decoder (core ← device, device ← core)") { data in
        guard let frame = try? Frame.decode(Array(data)) else { return }
        FuzzCheck.that(try! Frame.decode(frame.encode()) == frame, "frame round trip")
        let p = frame.payload
        switch MessageType(rawValue: frame.type) {
        case .hello:
            roundTrip("HELLO", p, Hello.decode) { try? $0.encode() }
            roundTrip("HELLO reply", p, HelloReply.decode) { $0.encode() }
        case .log: roundTrip("LOG", p, LogRecord.decode) { $0.encode() }
        case .setBootState: roundTrip("SET_BOOT_STATE", p, BootState.decode) { $0.encode() }
        case .mediaChange: roundTrip("MEDIA_CHANGE", p, MediaChange.decode) { $0.encode() }
        case .reconfigure: roundTrip("RECONFIGURE", p, Reconfigure.decode) { $0.encode() }
        case .systemEvent: roundTrip("SYSTEM_EVENT", p, SystemEvent.decode) { $0.encode() }
        case .setIRQLevel: roundTrip("SET_IRQ_LEVEL", p, IRQLevel.decode) { $0.encode() }
        case .addDoorbell: roundTrip("ADD_DOORBELL", p, DoorbellRequest.decode) { $0.encode() }
        case .setMSIRoute: roundTrip("SET_MSI_ROUTE", p, MSIRoute.decode) { $0.encode() }
        case .shutdown, .ping, .quiesce, .resume, .setDirtyLog, nil:
            break
        }
    }

    /// Whatever `decode` takes must come back from its own encoding (nil: too large to encode).
    static func roundTrip<Message: Equatable>(_ name: String, _ payload: [UInt8], _ decode: ([UInt8]) throws -> Message,
                                              _ encode: (Message) -> [UInt8]?) {
        guard let message = try? decode(payload), let again = encode(message) else { return }
        FuzzCheck.that((try? decode(again)) == message, "\(name) does not round-trip")
    }

    /// The register ring's shared page, scribbled on by a hostile device between the core's own
    /// operations. The core must never trap, never count more outstanding requests than the ring
    /// holds, and never name a request being served outside the uncommitted ones.
    static let registerRing = FuzzTarget("ipc-register-ring", covers: "register ring indices and entries written by a hostile device (core ← device)") { data in
        let capacity: UInt32 = 8
        guard let (fd, core) = try? RegisterRing.create(requestCapacity: capacity, responseCapacity: capacity),
              let shared = try? SharedMapping(fd: fd, count: RingLayout.size(requestCapacity: capacity, responseCapacity: capacity)) else {
            fatalError("cannot create a register ring")
        }
        // The words a device may write: its own indices and flags, and any entry.
        let deviceWords = [RingLayout.requestConsumerOffset, RingLayout.requestConsumerSleepingOffset, RingLayout.responseProducerOffset,
                           RingLayout.requestServingOffset, RingLayout.requestServingActiveOffset,
                           RingLayout.poisonedRequestOffset, RingLayout.poisonedRequestValidOffset, RingLayout.requestProducerOffset]
        var input = FuzzInput(data)
        var pushed: UInt32 = 0
        while !input.isAtEnd {
            switch input.u8() % 9 {
            case 0:
                let op = RegisterRequest.Operation(rawValue: 1 + input.u8() % 6) ?? .pioRead
                if (try? core.pushRequest(RegisterRequest(operation: op, size: 4, resource: 0, vcpu: 0, offset: 0, data: 0, tag: UInt64(pushed)))) == true {
                    pushed &+= 1
                }
            case 1: _ = try? core.popResponse()
            case 2:
                let word = deviceWords[input.below(deviceWords.count)]
                shared.base.storeBytes(of: input.integer(UInt32.self), toByteOffset: word, as: UInt32.self)
            case 3:
                let entries = shared.count - RingLayout.headerSize
                let at = RingLayout.headerSize + input.below(entries - 8)
                shared.base.storeBytes(of: input.integer(UInt64.self), toByteOffset: at, as: UInt64.self)
            case 4:
                if let index = core.requestBeingServed() {
                    FuzzCheck.that(index &- core.committedRequestIndex() < capacity, "request being served \(index) lies outside the ring")
                }
            case 5: core.poison(input.integer(UInt32.self))
            case 6: core.clearPoisonIfCommitted()
            case 7: FuzzCheck.that(core.requestsOutstanding() <= capacity, "more requests outstanding than the ring holds")
            default: _ = core.setResponseConsumerSleeping(input.bool())
            }
        }
        // A device restarted on this region attaches to whatever the last one left.
        _ = try? RegisterRing(attaching: fd)
    }

    /// A frame port's NIC half written by a hostile NIC process, read by the switch side, whose
    /// frames then go through the learning switch as hv-switch forwards them.
    static let framePort = FuzzTarget("ipc-frame-port", covers: "frame port slots and indices from a hostile NIC, into the learning switch (switch ← NIC)") { data in
        let slots: UInt32 = 4
        guard let fd = try? FramePort.create(slotCount: slots, name: "fuzz-frame-port"),
              let shared = try? SharedMapping(fd: fd, count: FramePortLayout.size(slotCount: slots)),
              let peer = try? EventFD(nonBlocking: true),
              let port = try? FramePort(fd: fd, side: .segment, peer: peer) else {
            fatalError("cannot create a frame port")
        }
        var input = FuzzInput(data)
        var forwarding = LearningSwitch()
        var now: UInt64 = 0
        // The NIC owns the uplink's producer and slots and the downlink's consumer.
        let nicWords = [FramePortLayout.uplinkControlOffset + FramePortLayout.producerLine,
                        FramePortLayout.uplinkControlOffset + FramePortLayout.consumerSleepingLine,
                        FramePortLayout.downlinkControlOffset + FramePortLayout.consumerLine,
                        FramePortLayout.downlinkControlOffset + FramePortLayout.producerWaitingLine]
        while !input.isAtEnd {
            switch input.u8() % 5 {
            case 0:
                shared.base.storeBytes(of: input.integer(UInt32.self), toByteOffset: nicWords[input.below(nicWords.count)], as: UInt32.self)
            case 1:
                let slot = FramePortLayout.headerSize + input.below(Int(slots)) * Int(FramePortLayout.slotSize)
                let bytes = input.chunk()
                shared.base.advanced(by: slot).copyMemory(from: bytes, byteCount: bytes.count)
            case 2:
                _ = port.receive { frame in
                    FuzzCheck.that(frame.count >= FramePortLayout.minimumFrame && frame.count <= FramePortLayout.maximumFrame,
                                   "frame of \(frame.count) bytes handed to the switch")
                    now += 1_000_000
                    _ = forwarding.forward(from: 1, source: MACAddress(frame, at: 6), destination: MACAddress(frame, at: 0), now: now)
                }
            case 3:
                let frame = [UInt8](repeating: input.u8(), count: 14 + input.below(64))
                _ = frame.withUnsafeBytes { port.send($0) }
            default:
                FuzzCheck.that(port.inboundCount <= Int(slots) && port.outboundSpace <= Int(slots), "port counts beyond its slots")
                port.flush()
                _ = port.nextInboundLength
            }
        }
    }

    /// A device's settings text (HELLO's config, RECONFIGURE) and the typed readers over it.
    static let deviceSettings = FuzzTarget("device-settings", covers: "device settings text and typed setting readers (device ← core, hvctl --device KEY=VALUE)") { data in
        let text = String(decoding: data, as: UTF8.self)
        let fields = SettingsText.decode(text)
        let again = SettingsText.decode(SettingsText.encode(fields.sorted { $0.key < $1.key }.map { (key: $0.key, value: $0.value) }))
        FuzzCheck.that(again == fields, "settings text does not round-trip: \(fields) became \(again)")
        let reader = SettingsReader(fields)
        for key in fields.keys.prefix(8) {
            _ = try? reader.int(key, in: -1000...1000)
            _ = try? reader.bool(key, default: false)
        }
        _ = try? RateLimitSettings(reading: reader, prefix: "rate")
        _ = try? RateLimitSettings(reading: reader, prefix: "")
    }
}

import HVIPC
import HVNetSwitch

/// What the trusted side hands hv-net (a virtio-net NIC), compiled by both. Its windows are
/// `VirtioPCILayout.resources(device:)`.
public enum NetContract {
    /// The host files, by HELLO hostIO index: a tap, or the three pieces of a segment port.
    public enum HostFile: UInt16, CaseIterable, Sendable {
        /// backend tap: the tap device's descriptor (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).
        case tap = 0
        /// backend segment: the port's shared frame region (`FramePort`).
        case portRegion = 1
        /// backend segment: the eventfd the switch rings for this NIC.
        case portDoorbell = 2
        /// backend segment: the eventfd this NIC rings for the switch.
        case switchDoorbell = 3
    }

    /// Where the NIC's frames go.
    public enum Backend: String, CaseIterable, Sendable {
        case tap
        case segment
    }

    /// The NIC's settings.
    public struct Settings: Equatable, Sendable {
        public var backend: Backend
        public var mac: MACAddress
        /// Frames the guest receives (host → guest): bytes and frames; unlimited by default.
        public var receiveLimit: RateLimitSettings
        /// Frames the guest sends (guest → host).
        public var transmitLimit: RateLimitSettings

        /// The keys a rate limit's fields go under (`rx_rate_bw`, `tx_rate_ops`, …).
        public static let receiveLimitPrefix = "rx_rate_", transmitLimitPrefix = "tx_rate_"

        public init(backend: Backend, mac: MACAddress, receiveLimit: RateLimitSettings = .init(), transmitLimit: RateLimitSettings = .init()) {
            self.backend = backend
            self.mac = mac
            self.receiveLimit = receiveLimit
            self.transmitLimit = transmitLimit
        }

        /// The settings as HELLO's config text.
        public var encoded: String {
            SettingsText.encode([("backend", backend.rawValue), ("mac", mac.description)]
                                + receiveLimit.fields(prefix: Self.receiveLimitPrefix) + transmitLimit.fields(prefix: Self.transmitLimitPrefix))
        }

        /// The settings the device was handed (`DeviceRuntime.config`).
        public init(decoding config: [String: String]) throws(SettingsError) {
            let reader = SettingsReader(config)
            backend = try reader.choice("backend")
            let text = try reader.string("mac")
            guard let mac = MACAddress(parsing: text) else {
                throw SettingsError(key: "mac", problem: "is '\(text)', not a MAC address like 52:54:00:12:34:56")
            }
            self.mac = mac
            receiveLimit = try RateLimitSettings(reading: reader, prefix: Self.receiveLimitPrefix)
            transmitLimit = try RateLimitSettings(reading: reader, prefix: Self.transmitLimitPrefix)
        }
    }
}

import HVIPC

/// What the trusted side hands hv-scsi (a virtio-scsi adapter with one disk or CD-ROM unit),
/// compiled by both. Its windows are `VirtioPCILayout.resources(device:)`.
public enum SCSIContract {
    /// The host files, by HELLO hostIO index.
    public enum HostFile: UInt16, CaseIterable, Sendable {
        /// The disk image, or the CD's medium (an empty file for an empty tray). A media
        /// change replaces this one.
        case medium = 0
    }

    /// What the unit is.
    public enum Kind: String, CaseIterable, Sendable {
        case disk
        case cdrom
    }

    /// The adapter's settings.
    public struct Settings: Equatable, Sendable {
        public var kind: Kind
        /// A disk that refuses writes (WRITE PROTECT in MODE SENSE); a CD-ROM always does.
        public var readOnly: Bool
        /// The unit serial number the guest reads (VPD page 0x80), e.g. `hv-disk0`.
        public var serial: String
        /// Threads serving transfers, 0 to 3 (the sandbox allows the process four tasks);
        /// 0 runs them inline on the device's loop.
        public var ioThreads: Int

        public static let maximumIOThreads = 3

        public init(kind: Kind, readOnly: Bool = false, serial: String = "hv-disk", ioThreads: Int = maximumIOThreads) {
            self.kind = kind
            self.readOnly = readOnly
            self.serial = serial
            self.ioThreads = ioThreads
        }

        /// The settings as HELLO's config text.
        public var encoded: String {
            SettingsText.encode([("kind", kind.rawValue), ("readonly", readOnly.settingsValue), ("serial", serial),
                                 ("io_threads", String(ioThreads))])
        }

        /// The settings the device was handed (`DeviceRuntime.config`).
        public init(decoding config: [String: String]) throws(SettingsError) {
            let reader = SettingsReader(config)
            kind = try reader.choice("kind", default: Kind.disk)
            readOnly = try reader.bool("readonly", default: false)
            serial = reader.string("serial", default: "hv-disk")
            guard serial.utf8.count <= 64 else { throw SettingsError(key: "serial", problem: "is longer than 64 bytes") }
            ioThreads = try reader.int("io_threads", in: 0...Self.maximumIOThreads, default: Self.maximumIOThreads)
        }
    }
}

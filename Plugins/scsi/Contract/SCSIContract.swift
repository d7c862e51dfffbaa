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

    /// The hostIO index of the image `depth` levels below the medium in its backing chain
    /// (0: the medium's own backing file), opened read-only by the trusted side.
    public static func backingSlot(_ depth: Int) -> UInt16 { UInt16(1 + depth) }

    /// The longest backing chain the trusted side opens.
    public static let maximumBackingDepth = 16

    /// An image's format.
    public enum Format: String, CaseIterable, Sendable {
        case raw
        case qcow2
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
        /// The medium's format.
        public var format: Format
        /// The formats of the backing chain below a qcow2 medium, nearest first: the image in
        /// `backingSlot(i)` has format `backingFormats[i]`.
        public var backingFormats: [Format]
        /// The guest's requests: bytes moved and requests; unlimited by default.
        public var rateLimit: RateLimitSettings

        public static let maximumIOThreads = 3
        /// The keys the rate limit's fields go under (`rate_bw`, `rate_ops`).
        public static let rateLimitPrefix = "rate_"

        public init(kind: Kind, readOnly: Bool = false, serial: String = "hv-disk", ioThreads: Int = maximumIOThreads,
                    format: Format = .raw, backingFormats: [Format] = [], rateLimit: RateLimitSettings = .init()) {
            self.kind = kind
            self.readOnly = readOnly
            self.serial = serial
            self.ioThreads = ioThreads
            self.format = format
            self.backingFormats = backingFormats
            self.rateLimit = rateLimit
        }

        /// The settings as HELLO's config text.
        public var encoded: String {
            SettingsText.encode([("kind", kind.rawValue), ("readonly", readOnly.settingsValue), ("serial", serial),
                                 ("io_threads", String(ioThreads)), ("format", format.rawValue),
                                 ("backing_formats", backingFormats.map(\.rawValue).joined(separator: ","))]
                                + rateLimit.fields(prefix: Self.rateLimitPrefix))
        }

        /// The settings the device was handed (`DeviceRuntime.config`).
        public init(decoding config: [String: String]) throws(SettingsError) {
            let reader = SettingsReader(config)
            kind = try reader.choice("kind", default: Kind.disk)
            readOnly = try reader.bool("readonly", default: false)
            serial = reader.string("serial", default: "hv-disk")
            guard serial.utf8.count <= 64 else { throw SettingsError(key: "serial", problem: "is longer than 64 bytes") }
            ioThreads = try reader.int("io_threads", in: 0...Self.maximumIOThreads, default: Self.maximumIOThreads)
            format = try reader.choice("format", default: Format.raw)
            var chain: [Format] = []
            for name in reader.string("backing_formats", default: "").split(separator: ",") {
                guard let f = Format(rawValue: String(name)) else {
                    throw SettingsError(key: "backing_formats", problem: "names '\(name)', not raw or qcow2")
                }
                chain.append(f)
            }
            guard chain.count <= SCSIContract.maximumBackingDepth else {
                throw SettingsError(key: "backing_formats", problem: "lists \(chain.count) images, more than \(SCSIContract.maximumBackingDepth)")
            }
            guard chain.isEmpty || format == .qcow2 else { throw SettingsError(key: "backing_formats", problem: "is set for a raw medium") }
            backingFormats = chain
            rateLimit = try RateLimitSettings(reading: reader, prefix: Self.rateLimitPrefix)
        }
    }
}

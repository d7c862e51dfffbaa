import HVIPC

extension VMDefinition {
    /// A disk's or a NIC direction's rate limit, with Firecracker's token buckets: `bandwidth`
    /// counts bytes, `ops` requests (disk) or frames (NIC). A bucket holds `size` tokens, refills
    /// completely in `refill_time_ms`, and `one_time_burst` extra tokens are there at the start
    /// only. Requests beyond the rate wait in the guest's queue: it sees back-pressure, never an
    /// error. `hvctl run --disk PATH,bps=10M,iops=500` and `--nic …,rx_bps=,tx_bps=,rx_pps=,tx_pps=`
    /// are shorthands for buckets that refill in one second; `hvctl set NAME --rate DEV:…` changes
    /// them while the VM runs.
    public struct RateLimit: Codable, Equatable, Sendable {
        public struct Bucket: Codable, Equatable, Sendable {
            public var size: UInt64
            public var oneTimeBurst: UInt64?
            public var refillTimeMs: UInt64

            public init(size: UInt64, oneTimeBurst: UInt64? = nil, refillTimeMs: UInt64) {
                self.size = size
                self.oneTimeBurst = oneTimeBurst
                self.refillTimeMs = refillTimeMs
            }

            enum CodingKeys: String, CodingKey, CaseIterable {
                case size, oneTimeBurst = "one_time_burst", refillTimeMs = "refill_time_ms"
            }

            public init(from decoder: any Decoder) throws {
                try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
                let c = try decoder.container(keyedBy: CodingKeys.self)
                size = try c.decode(UInt64.self, forKey: .size)
                oneTimeBurst = try c.decodeIfPresent(UInt64.self, forKey: .oneTimeBurst)
                refillTimeMs = try c.decode(UInt64.self, forKey: .refillTimeMs)
            }

            /// `count` tokens a second.
            public static func perSecond(_ count: UInt64) -> Bucket { Bucket(size: count, refillTimeMs: 1000) }

            var settings: RateLimitSettings.Bucket { .init(size: size, oneTimeBurst: oneTimeBurst ?? 0, refillTimeMs: refillTimeMs) }
        }

        public var bandwidth: Bucket?
        public var ops: Bucket?

        public init(bandwidth: Bucket? = nil, ops: Bucket? = nil) {
            self.bandwidth = bandwidth
            self.ops = ops
        }

        enum CodingKeys: String, CodingKey, CaseIterable { case bandwidth, ops }

        public init(from decoder: any Decoder) throws {
            try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
            let c = try decoder.container(keyedBy: CodingKeys.self)
            bandwidth = try c.decodeIfPresent(Bucket.self, forKey: .bandwidth)
            ops = try c.decodeIfPresent(Bucket.self, forKey: .ops)
        }

        /// What the device is handed.
        public var settings: RateLimitSettings { .init(bandwidth: bandwidth?.settings, ops: ops?.settings) }

        public var isEmpty: Bool { bandwidth == nil && ops == nil }

        /// Checks each bucket; `field` names this limit in the error (`disks[0].rate_limit`).
        public func validate(field: String) throws(UsageError) {
            for (name, bucket) in [("bandwidth", bandwidth), ("ops", ops)] {
                guard let bucket else { continue }
                guard (1...(UInt64(1) << 50)).contains(bucket.size), (1...3_600_000).contains(bucket.refillTimeMs),
                      (bucket.oneTimeBurst ?? 0) <= UInt64(1) << 50 else {
                    throw UsageError(message: "invalid \(field).\(name): size is 1 to 2^50 tokens, refill_time_ms 1 to 3600000, one_time_burst at most 2^50")
                }
            }
        }
    }
}

/// The shorthands for rate limits: `bps=SIZE` (bytes a second: 10M, 1G), `iops=N` / `pps=N`
/// (requests or frames a second), each a bucket that refills in one second.
public enum RateShorthand {
    /// Reads `bps=`/`iops=` (disks, `what` "--disk") or `rx_bps=`, `tx_bps=`, `rx_pps=`,
    /// `tx_pps=` (NICs) from `part`; false when `part` is none of them. A value of 0 removes
    /// that bucket.
    public static func apply(_ part: String, to limit: inout VMDefinition.RateLimit?, prefix: String, opsKey: String, what: String) throws(UsageError) -> Bool {
        let bps = prefix + "bps=", ops = prefix + opsKey + "="
        guard part.hasPrefix(bps) || part.hasPrefix(ops) else { return false }
        let isBandwidth = part.hasPrefix(bps)
        let text = String(part.dropFirst(isBandwidth ? bps.count : ops.count))
        let value: UInt64
        if isBandwidth {
            value = text == "0" ? 0 : try parseRate(text, flag: what + " " + bps.dropLast())
        } else {
            guard let n = UInt64(text) else { throw UsageError(message: "invalid \(what) \(ops.dropLast()) '\(text)': give a whole number a second (0: no limit)") }
            value = n
        }
        var l = limit ?? VMDefinition.RateLimit()
        if isBandwidth { l.bandwidth = value == 0 ? nil : .perSecond(value) } else { l.ops = value == 0 ? nil : .perSecond(value) }
        limit = l.isEmpty ? nil : l
        return true
    }

    /// `10M`, `512K`, `1G`, or bytes.
    static func parseRate(_ text: String, flag: String) throws(UsageError) -> UInt64 {
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        var digits = Substring(text), scale: UInt64 = 1
        if let last = text.last?.uppercased().first, let unit = units[last] {
            scale = unit
            digits = digits.dropLast()
        }
        guard let n = UInt64(digits), n > 0, n <= (UInt64(1) << 50) / scale else {
            throw UsageError(message: "invalid \(flag) '\(text)': give bytes a second such as 10M or 512K (0: no limit)")
        }
        return n * scale
    }
}

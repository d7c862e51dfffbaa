import HVIPC
import HVSys

/// A token bucket with Firecracker's semantics: `size` tokens, refilled continuously so that an
/// empty bucket is full again after the refill time, plus a one-time burst spent first and never
/// refilled. A request is let through while the bucket is not in debt, and then pays its whole
/// cost, which may put it in debt: a request larger than the bucket still passes (after the debt
/// of the previous ones is paid), and the average rate is exact.
public struct TokenBucket: Sendable {
    public let size: UInt64
    public let refillNanoseconds: UInt64
    /// Tokens now; negative is a debt.
    public private(set) var budget: Int64
    /// What is left of the one-time burst.
    public private(set) var burst: UInt64
    private var lastRefill: UInt64

    public init(_ settings: RateLimitSettings.Bucket, now: UInt64 = monotonicNanoseconds()) {
        size = settings.size
        refillNanoseconds = max(1, settings.refillTimeMs) * 1_000_000
        budget = Int64(clamping: settings.size)
        burst = settings.oneTimeBurst
        lastRefill = now
    }

    /// Adds the tokens earned since the last refill (up to `size`).
    public mutating func refill(now: UInt64) {
        guard now > lastRefill else { return }
        let full = Int64(clamping: size)
        // tokens = elapsed × size / refill time; an overflow means far more than a bucketful.
        let (product, overflow) = (now - lastRefill).multipliedReportingOverflow(by: size)
        let earned = overflow ? UInt64.max : product / refillNanoseconds
        guard earned > 0 else { return }
        // What fits before the bucket is full (budget ≤ size; the difference fits in 64 bits).
        let room = UInt64(bitPattern: full &- budget)
        if earned >= room {
            budget = full
            lastRefill = now
            return
        }
        budget = budget &+ Int64(bitPattern: earned)
        // Only the time the earned tokens took is used up, so slow refills are not lost to rounding.
        let (spent, spentOverflow) = earned.multipliedReportingOverflow(by: refillNanoseconds)
        lastRefill = spentOverflow ? now : lastRefill + spent / size
    }

    /// Whether a request may go now (the bucket is not in debt, or the burst is not spent).
    public mutating func admits(now: UInt64) -> Bool {
        refill(now: now)
        return budget > 0 || burst > 0
    }

    /// Pays `tokens`, from the burst first.
    public mutating func consume(_ tokens: UInt64, now: UInt64) {
        refill(now: now)
        let fromBurst = min(burst, tokens)
        burst -= fromBurst
        budget = budget &- Int64(clamping: tokens - fromBurst)
    }

    /// A bucket with `settings` that carries on from this one: its tokens (at most the new size)
    /// or its debt, so a limit changed at run time neither refills nor forgives anything; the
    /// new one-time burst is granted.
    public func changed(to settings: RateLimitSettings.Bucket, now: UInt64) -> TokenBucket {
        var copy = self
        copy.refill(now: now)
        var next = TokenBucket(settings, now: now)
        next.budget = min(copy.budget, next.budget)
        return next
    }

    /// When the bucket will admit again (now, if it does).
    public func availableAt(now: UInt64) -> UInt64 {
        if budget > 0 || burst > 0 { return now }
        // From `budget` ≤ 0 to 1 token.
        let needed = UInt64(1 - budget)
        let (product, overflow) = needed.multipliedReportingOverflow(by: refillNanoseconds)
        let wait = overflow ? UInt64.max / 2 : (product + size - 1) / size
        return max(now, lastRefill &+ wait)
    }
}

/// A device's rate limiter: a bandwidth bucket (bytes) and an operations bucket (requests or
/// frames), either optional. The device asks `admits` before it takes the next request from the
/// guest's queue and pays with `consume` once it knows the request's size; while it does not
/// admit, the device leaves requests in the queue (the guest sees back-pressure, never an error)
/// and sleeps until `nextAvailable` (its `nextDeadline`).
public struct RateLimiter: Sendable {
    public private(set) var bandwidth: TokenBucket?
    public private(set) var ops: TokenBucket?

    public init(_ settings: RateLimitSettings, now: UInt64 = monotonicNanoseconds()) {
        bandwidth = settings.bandwidth.map { TokenBucket($0, now: now) }
        ops = settings.ops.map { TokenBucket($0, now: now) }
    }

    public var isUnlimited: Bool { bandwidth == nil && ops == nil }

    public mutating func admits(now: UInt64 = monotonicNanoseconds()) -> Bool {
        let b = bandwidth?.admits(now: now) ?? true
        let o = ops?.admits(now: now) ?? true
        return b && o
    }

    /// Pays for one operation of `bytes`.
    public mutating func consume(bytes: UInt64, now: UInt64 = monotonicNanoseconds()) {
        bandwidth?.consume(bytes, now: now)
        ops?.consume(1, now: now)
    }

    /// The limiter for new `settings` (a device's RECONFIGURE), carrying each bucket's tokens or
    /// debt over (`TokenBucket.changed`); nil when the new settings are unlimited.
    public static func changed(_ old: RateLimiter?, to settings: RateLimitSettings, now: UInt64 = monotonicNanoseconds()) -> RateLimiter? {
        guard !settings.isUnlimited else { return nil }
        var next = RateLimiter(settings, now: now)
        if let previous = old?.bandwidth, let b = settings.bandwidth { next.bandwidth = previous.changed(to: b, now: now) }
        if let previous = old?.ops, let o = settings.ops { next.ops = previous.changed(to: o, now: now) }
        return next
    }

    /// When the limiter admits again; nil when it admits now.
    public func nextAvailable(now: UInt64 = monotonicNanoseconds()) -> UInt64? {
        let at = max(bandwidth?.availableAt(now: now) ?? now, ops?.availableAt(now: now) ?? now)
        return at > now ? at : nil
    }
}

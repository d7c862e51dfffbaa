import HVDeviceSDK
import HVIPC
import XCTest

/// Token buckets with Firecracker's semantics, on a clock the test drives.
final class RateLimiterTests: XCTestCase {
    private let ms: UInt64 = 1_000_000

    func testABucketAdmitsItsSizeThenRefillsAtItsRate() {
        var bucket = TokenBucket(.init(size: 1000, refillTimeMs: 100), now: 0)
        XCTAssertTrue(bucket.admits(now: 0))
        bucket.consume(1000, now: 0)
        XCTAssertFalse(bucket.admits(now: 0))
        XCTAssertEqual(bucket.availableAt(now: 0), 100_000, "1 token takes 0.1 ms at 1000 tokens / 100 ms")
        XCTAssertTrue(bucket.admits(now: 50 * ms))
        XCTAssertEqual(bucket.budget, 500)
        // Never more than the size, however long it waits.
        _ = bucket.admits(now: 10_000 * ms)
        XCTAssertEqual(bucket.budget, 1000)
    }

    /// A request larger than the bucket passes when the bucket is not in debt, and its debt
    /// holds the next one back for as long as the rate says.
    func testALargeRequestGoesIntoDebtAndTheAverageRateHolds() {
        var bucket = TokenBucket(.init(size: 100, refillTimeMs: 10), now: 0)  // 10 000 tokens a second
        bucket.consume(1000, now: 0)
        XCTAssertEqual(bucket.budget, -900)
        XCTAssertFalse(bucket.admits(now: 50 * ms))
        XCTAssertEqual(bucket.availableAt(now: 50 * ms), 90 * ms + 100_000)
        XCTAssertTrue(bucket.admits(now: 91 * ms))
        // Over a second of steady demand, about 10 000 tokens get through.
        var now: UInt64 = 1000 * ms, passed: UInt64 = 0
        var steady = TokenBucket(.init(size: 100, refillTimeMs: 10), now: now)
        let end = now + 1000 * ms
        while now < end {
            if steady.admits(now: now) {
                steady.consume(64, now: now)
                passed += 64
            } else {
                now = steady.availableAt(now: now)
            }
        }
        XCTAssertEqual(Double(passed), 10_100, accuracy: 200, "the size, then the rate")
    }

    /// A limit changed at run time (RECONFIGURE) keeps the debt and never refills the bucket;
    /// removing every limit gives no limiter at all.
    func testAChangedLimitCarriesTheDebtOverAndRefillsNothing() {
        var old = RateLimiter(.init(bandwidth: .init(size: 1000, refillTimeMs: 1000)), now: 0)
        old.consume(bytes: 3000, now: 0)
        XCTAssertEqual(old.bandwidth?.budget, -2000)
        let raised = RateLimiter.changed(old, to: .init(bandwidth: .init(size: 8000, refillTimeMs: 1000), ops: .init(size: 5, refillTimeMs: 1000)), now: 500 * ms)
        // Half a second at the old rate paid 500 of the debt; the new size does not forgive the rest.
        XCTAssertEqual(raised?.bandwidth?.budget, -1500)
        XCTAssertEqual(raised?.ops?.budget, 5, "a bucket that did not exist starts full")
        XCTAssertEqual(raised?.nextAvailable(now: 500 * ms), 500 * ms + 187_625_000, "1501 tokens at 8000 a second")
        var rich = RateLimiter(.init(bandwidth: .init(size: 10_000, refillTimeMs: 1000)), now: 0)
        rich.consume(bytes: 1000, now: 0)
        XCTAssertEqual(RateLimiter.changed(rich, to: .init(bandwidth: .init(size: 4000, refillTimeMs: 1000)), now: 0)?.bandwidth?.budget, 4000,
                       "tokens beyond the new size are dropped")
        XCTAssertNil(RateLimiter.changed(rich, to: .init(), now: 0))
    }

    func testTheOneTimeBurstIsSpentFirstAndNeverComesBack() {
        var bucket = TokenBucket(.init(size: 100, oneTimeBurst: 500, refillTimeMs: 1000), now: 0)
        bucket.consume(400, now: 0)
        XCTAssertEqual(bucket.burst, 100)
        XCTAssertEqual(bucket.budget, 100)
        bucket.consume(250, now: 0)
        XCTAssertEqual(bucket.burst, 0)
        XCTAssertEqual(bucket.budget, -50)
        _ = bucket.admits(now: 100_000 * ms)
        XCTAssertEqual(bucket.burst, 0)
        XCTAssertEqual(bucket.budget, 100)
    }

    func testALimiterNeedsBothBucketsAndSaysWhenItAdmitsAgain() {
        var limiter = RateLimiter(.init(bandwidth: .init(size: 1 << 20, refillTimeMs: 1000), ops: .init(size: 2, refillTimeMs: 1000)), now: 0)
        XCTAssertTrue(limiter.admits(now: 0))
        limiter.consume(bytes: 4096, now: 0)
        limiter.consume(bytes: 4096, now: 0)
        XCTAssertFalse(limiter.admits(now: 0), "two operations a second")
        XCTAssertEqual(limiter.nextAvailable(now: 0), 500 * ms)
        XCTAssertTrue(limiter.admits(now: 500 * ms))
        XCTAssertNil(limiter.nextAvailable(now: 500 * ms))
        var free = RateLimiter(.init(), now: 0)
        XCTAssertTrue(free.isUnlimited)
        free.consume(bytes: 1 << 40, now: 0)
        XCTAssertTrue(free.admits(now: 0))
    }

    func testHugeSizesAndTimesDoNotOverflow() {
        var bucket = TokenBucket(.init(size: 1 << 50, refillTimeMs: 1 << 32), now: 0)
        bucket.consume(UInt64.max / 2, now: 0)
        XCTAssertFalse(bucket.admits(now: 1))
        XCTAssertGreaterThan(bucket.availableAt(now: 1), 1)
        XCTAssertTrue(bucket.admits(now: UInt64.max / 2))
    }

    func testSettingsRoundTripAndBadValuesAreNamed() throws {
        let settings = RateLimitSettings(bandwidth: .init(size: 10_485_760, oneTimeBurst: 1 << 20, refillTimeMs: 1000), ops: .init(size: 100, refillTimeMs: 1000))
        let text = SettingsText.encode(settings.fields(prefix: "rate_"))
        XCTAssertEqual(text, "rate_bw=10485760,1048576,1000\nrate_ops=100,0,1000")
        XCTAssertEqual(try RateLimitSettings(reading: SettingsReader(SettingsText.decode(text)), prefix: "rate_"), settings)
        XCTAssertEqual(try RateLimitSettings(reading: SettingsReader([:]), prefix: "rate_"), RateLimitSettings())
        for bad in ["1,2", "0,0,10", "10,0,0", "x,0,1"] {
            XCTAssertThrowsError(try RateLimitSettings(reading: SettingsReader(["tx_ops": bad]), prefix: "tx_")) { error in
                XCTAssertEqual((error as? SettingsError)?.key, "tx_ops")
            }
        }
    }
}

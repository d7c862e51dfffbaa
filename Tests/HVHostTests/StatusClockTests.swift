@testable import HVHost
import XCTest

/// The durations `hvctl status` reports. A status request reads the clock before it asks the
/// devices and vCPUs; a pause that begins in between (hvd polls status while a migration pauses
/// the VM) started after that reading, and the unsigned subtraction trapped and ended the VM's
/// core (found in session 20: 5 runs in about 70 of `testAVMArrivesThroughTheAPI`).
final class StatusClockTests: XCTestCase {
    func testAPauseThatBeganAfterTheReadingIsJustBegun() {
        XCTAssertEqual(wholeSeconds(from: 5_000_000_001, to: 5_000_000_000), 0)
        XCTAssertEqual(wholeSeconds(from: .max, to: 0), 0)
    }

    func testWholeSecondsRoundDown() {
        XCTAssertEqual(wholeSeconds(from: 1_000, to: 1_000), 0)
        XCTAssertEqual(wholeSeconds(from: 0, to: 2_999_999_999), 2)
        XCTAssertEqual(wholeSeconds(from: 1, to: 3_000_000_001), 3)
    }
}

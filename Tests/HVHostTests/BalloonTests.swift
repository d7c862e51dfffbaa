import HVBalloonContract
import HVHost
import HVIPC
import XCTest

/// The balloon's contract (settings, the status record the device publishes) and its definition.
final class BalloonContractTests: XCTestCase {
    func testSettingsRoundTripAndBadValuesAreNamed() throws {
        let settings = BalloonContract.Settings(targetPages: 4096, deflateOnOOM: true, statisticsIntervalSeconds: 5, freePageReporting: true)
        XCTAssertEqual(try BalloonContract.Settings(decoding: SettingsText.decode(settings.encoded)), settings)
        XCTAssertEqual(try BalloonContract.Settings(decoding: [:]), BalloonContract.Settings())
        XCTAssertThrowsError(try BalloonContract.Settings(decoding: ["target_pages": "-1"])) { XCTAssertEqual(($0 as? SettingsError)?.key, "target_pages") }
        XCTAssertThrowsError(try BalloonContract.Settings(decoding: ["stats_interval_s": "86401"]))
    }

    /// The record is untrusted input to the host: it round-trips, and anything else reads as nil.
    func testTheStatusRecordRoundTripsAndGarbageIsRefused() {
        var status = BalloonContract.Status()
        status.actualPages = 768
        status.targetPages = 1024
        status.driverReady = true
        status.reportingNegotiated = true
        status.inflatedPages = 5000
        status.deflatedPages = 4232
        status.reportedPages = 256
        status.statisticsUpdatedAt = 123_456_789
        status.statistics = [.freeMemory: 47 << 20, .totalMemory: 64 << 20, .directReclaims: 3]
        let bytes = status.encode()
        XCTAssertEqual(bytes.count, BalloonContract.Status.size)
        XCTAssertEqual(BalloonContract.Status(decoding: bytes + [1, 2, 3]), status)
        XCTAssertNil(BalloonContract.Status(decoding: Array(bytes.dropLast())))
        XCTAssertNil(BalloonContract.Status(decoding: [UInt8](repeating: 0, count: 4096)))
        var wrongMagic = bytes
        wrongMagic[0] ^= 1
        XCTAssertNil(BalloonContract.Status(decoding: wrongMagic))
        let report = VMStatus.Balloon(status, now: 1_123_456_789)
        XCTAssertEqual(report.actualMiB, 3)
        XCTAssertEqual(report.targetMiB, 4)
        XCTAssertEqual(report.stats, ["free_memory": 47 << 20, "total_memory": 64 << 20, "direct_reclaims": 3])
        XCTAssertEqual(report.statsAgeMs, 1000)
        XCTAssertNil(VMStatus.Balloon(BalloonContract.Status(), now: 5).stats, "no statistics before the first")
    }

    func testTheDefinitionAndTheFlag() throws {
        let parse: (String) throws(UsageError) -> UInt64 = { text throws(UsageError) in
            guard let n = UInt64(text.dropLast()), text.hasSuffix("M") else { throw UsageError(message: "bad size \(text)") }
            return n
        }
        XCTAssertEqual(try VMDefinition.Balloon(flag: "on", parseMiB: parse), VMDefinition.Balloon())
        XCTAssertEqual(try VMDefinition.Balloon(flag: "size=64M,stats=5,deflate_on_oom,free_page_reporting", parseMiB: parse),
                       VMDefinition.Balloon(sizeMiB: 64, deflateOnOOM: true, statsIntervalSeconds: 5, freePageReporting: true))
        XCTAssertThrowsError(try VMDefinition.Balloon(flag: "size=", parseMiB: parse))
        XCTAssertThrowsError(try VMDefinition.Balloon(flag: "deflate_on_oom=yes", parseMiB: parse))
        XCTAssertEqual(VMDefinition.Balloon(sizeMiB: 16).settings.targetPages, 4096)
        let d = try VMDefinition.decode(Array(#"{"memory_mib": 128, "balloon": {"size_mib": 16, "stats_interval_s": 2}}"#.utf8))
        XCTAssertEqual(d.balloon, VMDefinition.Balloon(sizeMiB: 16, statsIntervalSeconds: 2))
        XCTAssertNoThrow(try d.validate(naming: .keys))
        XCTAssertThrowsError(try VMDefinition.Balloon(sizeMiB: 129).checkFits(guestMemoryMiB: 128) { "balloon.\($0.rawValue)" }) {
            XCTAssertEqual(($0 as? UsageError)?.message, "balloon.size_mib 129 MiB is more than the guest's 128 MiB of RAM")
        }
        XCTAssertEqual(try VMDefinition.decode(Array(d.encoded().utf8)), d, "the definition round-trips with its balloon")
        XCTAssertThrowsError(try VMDefinition.decode(Array(#"{"balloon": {"amount_mib": 16}}"#.utf8))) {
            XCTAssertTrue(($0 as? UsageError)?.message.contains("amount_mib") == true, "\($0)")
        }
    }
}

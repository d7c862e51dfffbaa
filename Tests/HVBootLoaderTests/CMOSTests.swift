import HVBootLoader
import XCTest

final class CMOSTests: XCTestCase {
    // MARK: Clock registers

    /// 2038-01-19T03:14:08Z, the first second past 2^31.
    private let y2038: Int64 = 2_147_483_648
    /// 1999-12-31T23:59:59Z.
    private let lastSecondOf1999: Int64 = 946_684_799
    /// 2000-02-29T00:00:00Z.
    private let leapDay2000: Int64 = 951_782_400

    func testClockInBCD24Hour() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        //                                    sec   min   hour  wday  mday  mon   year  cent
        assertClock(&cmos, now: 0, [0x00, 0x00, 0x00, 0x05, 0x01, 0x01, 0x70, 0x19])  // Thu 1970-01-01
        assertClock(&cmos, now: leapDay2000, [0x00, 0x00, 0x00, 0x03, 0x29, 0x02, 0x00, 0x20])  // Tue 2000-02-29
        assertClock(&cmos, now: 951_868_799, [0x59, 0x59, 0x23, 0x03, 0x29, 0x02, 0x00, 0x20])
        assertClock(&cmos, now: 951_868_800, [0x00, 0x00, 0x00, 0x04, 0x01, 0x03, 0x00, 0x20])  // Wed 2000-03-01
        assertClock(&cmos, now: y2038, [0x08, 0x14, 0x03, 0x03, 0x19, 0x01, 0x38, 0x20])  // Tue 2038-01-19
        assertClock(&cmos, now: lastSecondOf1999, [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19])  // Fri
        assertClock(&cmos, now: lastSecondOf1999 + 1, [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20])  // Sat
        // 2100 is not a leap year: 28 February is followed by 1 March (a Monday).
        assertClock(&cmos, now: 4_107_542_400, [0x00, 0x00, 0x00, 0x02, 0x01, 0x03, 0x00, 0x21])
    }

    func testClockInBinary24Hour() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0B, 0x06)
        assertClock(&cmos, now: y2038, [8, 14, 3, 3, 19, 1, 38, 20])
        assertClock(&cmos, now: lastSecondOf1999, [59, 59, 23, 6, 31, 12, 99, 19])
        assertClock(&cmos, now: leapDay2000, [0, 0, 0, 3, 29, 2, 0, 20])
    }

    func testClockIn12HourMode() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0B, 0x00)  // BCD, 12-hour.
        XCTAssertEqual(cmos.read(0x04, now: lastSecondOf1999), 0x91)  // 11 PM
        XCTAssertEqual(cmos.read(0x04, now: y2038), 0x03)  // 3 AM
        XCTAssertEqual(cmos.read(0x04, now: leapDay2000), 0x12)  // Midnight: 12 AM
        XCTAssertEqual(cmos.read(0x04, now: leapDay2000 + 12 * 3600), 0x92)  // Noon: 12 PM
        XCTAssertEqual(cmos.read(0x04, now: leapDay2000 + 13 * 3600), 0x81)  // 1 PM
        XCTAssertEqual(cmos.read(0x00, now: lastSecondOf1999), 0x59)  // Other fields unchanged.
        cmos.write(0x0B, 0x04)  // Binary, 12-hour.
        XCTAssertEqual(cmos.read(0x04, now: lastSecondOf1999), 0x80 | 11)
        XCTAssertEqual(cmos.read(0x04, now: leapDay2000), 12)
        XCTAssertEqual(cmos.read(0x07, now: lastSecondOf1999), 31)
    }

    /// Every day from 1970 to 2399 against a reference calendar that counts days one at a time.
    func testCalendarAgainstDayByDayReference() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0B, 0x06)  // Binary.
        var (year, month, day, weekday) = (1970, 1, 1, 5)
        var days: Int64 = 0
        while year < 2400 {
            let now = days * 86_400 + 43_210  // 12:00:10
            let read = [0x07, 0x08, 0x09, 0x32, 0x06].map { Int(cmos.read(UInt8($0), now: now)) }
            guard read == [day, month, year % 100, year / 100, weekday] else {
                XCTFail("\(year)-\(month)-\(day) (weekday \(weekday)): registers read \(read)")
                return
            }
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
            let length = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1]
            day += 1
            if day > length { day = 1; month += 1 }
            if month > 12 { month = 1; year += 1 }
            weekday = weekday % 7 + 1
            days += 1
        }
    }

    func testUpdateInProgressNeverReadsSet() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0A, 0xA6)  // UIP is read-only.
        for now in Int64(0)..<2000 { XCTAssertEqual(cmos.read(0x0A, now: now) & 0x80, 0) }
        XCTAssertEqual(cmos.read(0x0A), 0x26)
    }

    // MARK: Power-on contents

    func testPowerOnRegistersAndFirmwareBytes() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        XCTAssertEqual(cmos.read(0x0A), 0x26)
        XCTAssertEqual(cmos.read(0x0B), 0x02)
        XCTAssertEqual(cmos.read(0x0C), 0x00)
        XCTAssertEqual(cmos.read(0x0D), 0x80)
        XCTAssertEqual(cmos.read(0x0F), 0x00)  // Shutdown status: normal boot.
        XCTAssertEqual(cmos.read(0x10), 0x00)  // No floppies.
        XCTAssertEqual(cmos.read(0x12), 0x00)  // No CMOS-described disks.
        XCTAssertEqual(cmos.read(0x14), 0x06)  // Coprocessor and PS/2 mouse.
        XCTAssertEqual(cmos.read(0x38), 0x00)  // Boot order: from fw_cfg / defaults.
        XCTAssertEqual(cmos.read(0x3D), 0x00)
        XCTAssertEqual(cmos.read(0x01), 0x00)  // Alarm registers.
        XCTAssertEqual(cmos.read(0x03), 0x00)
        XCTAssertEqual(cmos.read(0x05), 0x00)
        XCTAssertFalse(cmos.interruptLine)
        XCTAssertEqual(cmos.readIndex(), 0x05)
    }

    func testMemorySizeBytesFor64MiB() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        XCTAssertEqual(cmos.word(0x15), 640)
        XCTAssertEqual(cmos.word(0x17), 0xFC00)  // 63 MiB above 1 MiB, under the cap.
        XCTAssertEqual(cmos.word(0x30), 0xFC00)
        XCTAssertEqual(cmos.word(0x34), 0x0300)  // 48 MiB above 16 MiB in 64 KiB units.
        XCTAssertEqual(cmos.highMemoryUnits(), 0)
        XCTAssertEqual(cmos.read(0x5F), 0)
        XCTAssertEqual(cmos.checksum(), 0x80 + 0x02 + 0x00 + 0xFC + 0x06)
    }

    func testMemorySizeBytesFor256MiB() {
        var cmos = CMOS(ramBelow4G: 256 << 20, ramAbove4G: 0, cpus: 2)
        XCTAssertEqual(cmos.word(0x15), 640)
        XCTAssertEqual(cmos.word(0x17), 0xFFC0)  // Capped at 65 472 KiB.
        XCTAssertEqual(cmos.word(0x30), 0xFFC0)
        XCTAssertEqual(UInt64(cmos.word(0x17)), CMOS.extendedMemoryCapKiB)
        XCTAssertEqual(cmos.word(0x34), 0x0F00)  // 240 MiB / 64 KiB.
        XCTAssertEqual(cmos.highMemoryUnits(), 0)
        XCTAssertEqual(cmos.read(0x5F), 1)
        // SeaBIOS's CMOS sizing (no e820 from fw_cfg): (0x34/0x35 << 16) + 16 MiB.
        XCTAssertEqual((UInt64(cmos.word(0x34)) << 16) + (16 << 20), 256 << 20)
    }

    func testMemorySizeBytesFor3GiBPlus1GiBAbove4GiB() {
        var cmos = CMOS(ramBelow4G: 3 << 30, ramAbove4G: 1 << 30, cpus: 4)
        XCTAssertEqual(cmos.word(0x15), 640)
        XCTAssertEqual(cmos.word(0x17), 0xFFC0)
        XCTAssertEqual(cmos.word(0x30), 0xFFC0)
        XCTAssertEqual(cmos.word(0x34), 0xBF00)  // (3 GiB - 16 MiB) / 64 KiB.
        XCTAssertEqual(cmos.read(0x5B), 0x00)
        XCTAssertEqual(cmos.read(0x5C), 0x40)
        XCTAssertEqual(cmos.read(0x5D), 0x00)
        XCTAssertEqual(cmos.highMemoryUnits() << 16, 1 << 30)
        XCTAssertEqual(cmos.read(0x5F), 3)
    }

    func testMemoryAndCPUEdgeValuesAreClampedNotTruncated() {
        var tiny = CMOS(ramBelow4G: 512 << 10, ramAbove4G: 0, cpus: 0)
        XCTAssertEqual(tiny.word(0x15), 512)
        XCTAssertEqual(tiny.word(0x17), 0)
        XCTAssertEqual(tiny.word(0x34), 0)
        XCTAssertEqual(tiny.read(0x5F), 0)  // cpus clamped to 1.

        var sixteen = CMOS(ramBelow4G: 16 << 20, ramAbove4G: 0, cpus: 1)
        XCTAssertEqual(sixteen.word(0x17), 15 << 10)
        XCTAssertEqual(sixteen.word(0x34), 0)

        var huge = CMOS(ramBelow4G: .max, ramAbove4G: .max, cpus: .max)
        XCTAssertEqual(huge.word(0x34), 0xFF00)  // Below-4G RAM taken as at most 4 GiB.
        XCTAssertEqual(huge.highMemoryUnits(), 0xFF_FFFF)
        XCTAssertEqual(huge.read(0x5F), 255)

        var negative = CMOS(ramBelow4G: 0, ramAbove4G: 0, cpus: .min)
        XCTAssertEqual(negative.word(0x15), 0)
        XCTAssertEqual(negative.read(0x5F), 0)
    }

    // MARK: Index register and RAM

    func testIndexBit7IsNMIDisableAndMaskedOff() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.writeIndex(0x80 | 0x14)
        XCTAssertEqual(cmos.readIndex(), 0x94)
        XCTAssertTrue(cmos.nmiDisabled)
        XCTAssertEqual(cmos.readData(now: 0), 0x06)
        cmos.writeIndex(0x80 | 0x40)
        cmos.writeData(0xA5, now: 0)
        XCTAssertEqual(cmos.read(0x40), 0xA5)
        XCTAssertFalse(cmos.nmiDisabled)
        XCTAssertEqual(cmos.read(0x80 | 0x00, now: y2038), 0x08)  // Seconds, through the NMI bit.
    }

    func testRAMIsReadWriteAndStatusRegistersAreProtected() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        for address in UInt8(0x0E)...0x7F where address != 0x32 {
            cmos.write(address, address ^ 0x5A)
        }
        for address in UInt8(0x0E)...0x7F where address != 0x32 {
            XCTAssertEqual(cmos.read(address), address ^ 0x5A, "address \(address)")
        }
        cmos.write(0x01, 0x45)  // Alarm registers are plain storage.
        XCTAssertEqual(cmos.read(0x01), 0x45)
        cmos.write(0x0C, 0xFF)
        XCTAssertEqual(cmos.read(0x0C), 0x00)
        cmos.write(0x0D, 0x00)
        XCTAssertEqual(cmos.read(0x0D), 0x80)
    }

    func testTimeWritesWithSETClearTakeEffectAtOnce() {
        // SeaBIOS's INT 1Ah AH=03h/05h write the time and date registers without setting SET first.
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        let host = y2038  // 2038-01-19T03:14:08Z, a Tuesday
        cmos.write(0x04, 0x21, now: host)  // hours
        cmos.write(0x02, 0x05, now: host)  // minutes
        cmos.write(0x00, 0x30, now: host)  // seconds
        assertClock(&cmos, now: host, [0x30, 0x05, 0x21, 0x03, 0x19, 0x01, 0x38, 0x20])
        assertClock(&cmos, now: host + 31, [0x01, 0x06, 0x21, 0x03, 0x19, 0x01, 0x38, 0x20])  // it keeps running
        cmos.write(0x07, 0x04, now: host)  // day of month
        cmos.write(0x08, 0x07, now: host)  // month
        cmos.write(0x09, 0x26, now: host)  // year
        assertClock(&cmos, now: host, [0x30, 0x05, 0x21, 0x07, 0x04, 0x07, 0x26, 0x20])  // Sat 4 July 2026
        cmos.write(0x06, 0x02, now: host)  // day of week: derived from the date, so unchanged
        XCTAssertEqual(cmos.read(0x06, now: host), 0x07)
    }

    // MARK: Interrupts

    func testReadingRegisterCClearsFlagsAndLowersTheLine() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0B, 0x42)  // PIE, 24-hour.
        let start: Int64 = 1_000 * 1_000_000_000
        cmos.tick(nowNanoseconds: start)
        cmos.tick(nowNanoseconds: start + 2_000_000)
        XCTAssertTrue(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0xC0)  // IRQF | PF
        XCTAssertFalse(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0x00)
    }

    func testUpdateEndedAfterCrossingASecondRaisesTheLineWithUIE() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0A, 0x20)  // Periodic rate 0, so PF stays out of the way.
        cmos.write(0x0B, 0x12)  // UIE, 24-hour.
        let second: Int64 = 1_000_000_000, base = y2038 * 1_000_000_000
        cmos.tick(nowNanoseconds: base + second / 2)
        cmos.tick(nowNanoseconds: base + 9 * second / 10)
        XCTAssertFalse(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0x00)
        cmos.tick(nowNanoseconds: base + second + 1)
        XCTAssertTrue(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0x90)  // IRQF | UF
        XCTAssertFalse(cmos.interruptLine)

        // Without UIE the flag is still set, but the line stays low and IRQF clear.
        cmos.write(0x0B, 0x02)
        cmos.tick(nowNanoseconds: base + 2 * second)
        XCTAssertFalse(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0x10)
        // Enabling UIE while UF is pending raises the line.
        cmos.tick(nowNanoseconds: base + 3 * second)
        cmos.write(0x0B, 0x12)
        XCTAssertTrue(cmos.interruptLine)
        cmos.write(0x0B, 0x02)
        XCTAssertFalse(cmos.interruptLine)
    }

    func testUpdatesAreInhibitedWhileSETAndTheFirstTickOnlyRecordsTime() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0A, 0x20)
        cmos.write(0x0B, 0x12)
        cmos.tick(nowNanoseconds: 5_000_000_000)  // First call: baseline only.
        XCTAssertEqual(cmos.read(0x0C), 0x00)
        cmos.tick(nowNanoseconds: 4_000_000_000)  // Backwards: baseline only.
        XCTAssertEqual(cmos.read(0x0C), 0x00)
        cmos.write(0x0B, 0x92)  // SET (clears UIE).
        XCTAssertEqual(cmos.read(0x0B), 0x82)
        cmos.tick(nowNanoseconds: 9_000_000_000)
        XCTAssertEqual(cmos.read(0x0C), 0x00)
        cmos.write(0x0B, 0x02)
        cmos.tick(nowNanoseconds: 10_000_000_000)
        XCTAssertEqual(cmos.read(0x0C), 0x10)
    }

    func testAlarmMatchesExactTime() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0A, 0x20)
        cmos.write(0x01, 0x08)  // 03:14:08, BCD
        cmos.write(0x03, 0x14)
        cmos.write(0x05, 0x03)
        cmos.write(0x0B, 0x22)  // AIE
        let second: Int64 = 1_000_000_000
        cmos.tick(nowNanoseconds: (y2038 - 3) * second + 1)
        cmos.tick(nowNanoseconds: (y2038 - 1) * second + 1)  // Through :06 and :07: no match.
        XCTAssertFalse(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0x10)
        cmos.tick(nowNanoseconds: y2038 * second + 1)  // The update to 03:14:08.
        XCTAssertTrue(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0xB0)  // IRQF | AF | UF
        cmos.tick(nowNanoseconds: (y2038 + 1) * second)
        XCTAssertEqual(cmos.read(0x0C), 0x10)

        // The same alarm in binary and in 12-hour BCD (3 AM).
        cmos.write(0x0B, 0x26)
        cmos.write(0x01, 8)
        cmos.write(0x03, 14)
        cmos.write(0x05, 3)
        cmos.tick(nowNanoseconds: (y2038 + 86_400) * second)  // A whole day: matched somewhere.
        XCTAssertEqual(cmos.read(0x0C) & 0x20, 0x20)
        cmos.write(0x0B, 0x20)
        cmos.write(0x01, 0x08)
        cmos.write(0x03, 0x14)
        cmos.write(0x05, 0x83)  // 3 PM: no match at 3 AM.
        cmos.tick(nowNanoseconds: (y2038 + 86_400 - 1) * second)
        _ = cmos.read(0x0C)
        cmos.tick(nowNanoseconds: (y2038 + 86_400 + 1) * second)
        XCTAssertEqual(cmos.read(0x0C) & 0x20, 0)
        cmos.write(0x05, 0x03)
        cmos.tick(nowNanoseconds: (2 * 86_400 + y2038 - 1) * second)
        _ = cmos.read(0x0C)
        cmos.tick(nowNanoseconds: (2 * 86_400 + y2038) * second)
        XCTAssertEqual(cmos.read(0x0C) & 0x20, 0x20)
    }

    func testAlarmDontCareFields() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0A, 0x20)
        cmos.write(0x01, 0x30)  // Every minute at :30.
        cmos.write(0x03, 0xC0)
        cmos.write(0x05, 0xFF)
        cmos.write(0x0B, 0x22)
        let second: Int64 = 1_000_000_000
        let minute = y2038 - 8  // 03:14:00
        cmos.tick(nowNanoseconds: (minute + 10) * second)
        cmos.tick(nowNanoseconds: (minute + 29) * second)  // :11 ... :29
        XCTAssertFalse(cmos.interruptLine)
        cmos.tick(nowNanoseconds: (minute + 31) * second)  // :30, :31
        XCTAssertTrue(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0xB0)
        cmos.tick(nowNanoseconds: (minute + 89) * second)  // :32 ... next minute's :29
        XCTAssertEqual(cmos.read(0x0C), 0x10)
        cmos.tick(nowNanoseconds: (minute + 95) * second)  // The next minute's :30.
        XCTAssertEqual(cmos.read(0x0C), 0xB0)

        // All three don't-care: every second matches.
        cmos.write(0x01, 0xC5)
        cmos.tick(nowNanoseconds: (minute + 96) * second)
        XCTAssertEqual(cmos.read(0x0C), 0xB0)

        // Across midnight: alarm 00:00:05 (hours and minutes given), interval 23:59:58 -> 00:00:06.
        cmos.write(0x01, 0x05)
        cmos.write(0x03, 0x00)
        cmos.write(0x05, 0x00)
        let midnight: Int64 = 951_868_800  // 2000-03-01T00:00:00Z
        cmos.tick(nowNanoseconds: (midnight - 3) * second)
        _ = cmos.read(0x0C)
        cmos.tick(nowNanoseconds: (midnight + 4) * second)
        XCTAssertEqual(cmos.read(0x0C) & 0x20, 0)
        cmos.tick(nowNanoseconds: (midnight + 6) * second)
        XCTAssertEqual(cmos.read(0x0C) & 0x20, 0x20)
        cmos.tick(nowNanoseconds: (midnight + 86_400 - 2) * second)
        _ = cmos.read(0x0C)
        cmos.tick(nowNanoseconds: (midnight + 86_400 + 6) * second)  // Wraps past midnight.
        XCTAssertEqual(cmos.read(0x0C) & 0x20, 0x20)

        // An invalid BCD alarm never matches, even over two days.
        cmos.write(0x01, 0x5A)
        cmos.tick(nowNanoseconds: (midnight + 3 * 86_400) * second)
        XCTAssertEqual(cmos.read(0x0C) & 0x20, 0)
    }

    func testPeriodicInterrupt() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0B, 0x42)  // PIE; register A = 0x26: rate 6, 976.5625 µs.
        let start: Int64 = 1_000 * 1_000_000_000  // On a period boundary.
        cmos.tick(nowNanoseconds: start)
        cmos.tick(nowNanoseconds: start + 900_000)
        XCTAssertFalse(cmos.interruptLine)
        cmos.tick(nowNanoseconds: start + 976_563)
        XCTAssertTrue(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0xC0)
        // Many periods collapse into one flag.
        cmos.tick(nowNanoseconds: start + 50_000_000)
        XCTAssertEqual(cmos.read(0x0C), 0xC0)

        // Rate 15: 500 ms.
        cmos.write(0x0A, 0x2F)
        cmos.tick(nowNanoseconds: start + 400_000_000)
        XCTAssertFalse(cmos.interruptLine)
        cmos.tick(nowNanoseconds: start + 500_000_000)
        XCTAssertTrue(cmos.interruptLine)
        _ = cmos.read(0x0C)

        // Rate 0: off.
        cmos.write(0x0A, 0x20)
        cmos.tick(nowNanoseconds: start + 900_000_000)
        XCTAssertEqual(cmos.read(0x0C), 0x00)

        // PIE clear: PF is set, the line stays low.
        cmos.write(0x0A, 0x26)
        cmos.write(0x0B, 0x02)
        cmos.tick(nowNanoseconds: start + 910_000_000)
        XCTAssertFalse(cmos.interruptLine)
        XCTAssertEqual(cmos.read(0x0C), 0x40)

        // Divider held in reset: no flags at all.
        cmos.write(0x0A, 0x66)
        cmos.write(0x0B, 0x52)
        cmos.tick(nowNanoseconds: start + 3_000_000_000)
        XCTAssertEqual(cmos.read(0x0C), 0x00)
    }

    // MARK: Guest-set time

    func testGuestSetsTimeWithSETAndItKeepsRunning() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        let host = y2038
        cmos.write(0x0B, 0x82, now: host)  // SET, 24-hour, BCD.
        XCTAssertEqual(cmos.read(0x00, now: host + 30), 0x08)  // Frozen at the time SET was written.
        for (register, value) in [(0x00, 0x56), (0x02, 0x34), (0x04, 0x12), (0x07, 0x15), (0x08, 0x06), (0x09, 0x10),
                                  (0x32, 0x20)] as [(UInt8, UInt8)] {
            cmos.write(register, value, now: host)
        }
        XCTAssertEqual(cmos.read(0x04, now: host + 100), 0x12)  // Reads back while SET.
        cmos.write(0x0B, 0x02, now: host)  // Clear SET: 2010-06-15T12:34:56Z from now on.
        assertClock(&cmos, now: host, [0x56, 0x34, 0x12, 0x03, 0x15, 0x06, 0x10, 0x20])
        assertClock(&cmos, now: host + 65, [0x01, 0x36, 0x12, 0x03, 0x15, 0x06, 0x10, 0x20])
        assertClock(&cmos, now: host + 86_400 * 16, [0x56, 0x34, 0x12, 0x05, 0x01, 0x07, 0x10, 0x20])  // Thu 1 July

        // Set in binary 12-hour form: 11:59:59 PM on 1999-12-31, then a second later it is 2000.
        cmos.write(0x0B, 0x84, now: host)
        for (register, value) in [(0x00, 59), (0x02, 59), (0x04, 0x80 | 11), (0x07, 31), (0x08, 12), (0x09, 99),
                                  (0x32, 19)] as [(UInt8, UInt8)] {
            cmos.write(register, value, now: host)
        }
        cmos.write(0x0B, 0x04, now: host)  // Clear SET, same format.
        assertClock(&cmos, now: host, [59, 59, 0x80 | 11, 6, 31, 12, 99, 19])
        cmos.write(0x0B, 0x06, now: host)  // 24-hour reads of the same clock.
        assertClock(&cmos, now: host, [59, 59, 23, 6, 31, 12, 99, 19])
        assertClock(&cmos, now: host + 1, [0, 0, 0, 7, 1, 1, 0, 20])
    }

    func testGuestSetTimeWithInvalidFieldsIsClamped() {
        var cmos = CMOS(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1)
        cmos.write(0x0B, 0x82, now: 0)
        for (register, value) in [(0x00, 0xFF), (0x02, 0x7A), (0x04, 0x99), (0x07, 0x31), (0x08, 0x02), (0x09, 0x23),
                                  (0x32, 0x20)] as [(UInt8, UInt8)] {
            cmos.write(register, value, now: 0)
        }
        cmos.write(0x0B, 0x02, now: 0)
        // 2023-02-31 clamps to 2023-02-28; the time fields clamp to 23:59:59.
        assertClock(&cmos, now: 0, [0x59, 0x59, 0x23, 0x03, 0x28, 0x02, 0x23, 0x20])
    }

    // MARK: Untrusted state

    func testStructIsBitwiseCopyable() {
        func requireBitwiseCopyable<T: BitwiseCopyable>(_: T.Type) -> Int { MemoryLayout<T>.size }
        XCTAssertLessThanOrEqual(requireBitwiseCopyable(CMOS.self), 160)
    }

    func testSanitizeOnGarbageThenRandomOperationsNeverTrap() {
        var cmos = CMOS(ramBelow4G: 3 << 30, ramAbove4G: 1 << 30, cpus: 4)
        withUnsafeMutableBytes(of: &cmos) { bytes in
            for offset in bytes.indices { bytes[offset] = 0xFF }
        }
        cmos.sanitize()
        XCTAssertEqual(cmos.read(0x0D), 0x80)
        XCTAssertEqual(cmos.read(0x0A) & 0x80, 0)
        XCTAssertEqual(cmos.read(0x0C) & 0x0F, 0)
        var random = SplitMix64(seed: 0xC305)
        runRandomOperations(on: &cmos, count: 10_000, random: &random)
    }

    func testRandomOperationsOnUnsanitizedGarbageNeverTrap() {
        var random = SplitMix64(seed: 0x146818)
        for fill in [UInt8(0xFF), 0x80, 0x7F, 0x00] {
            var cmos = CMOS(ramBelow4G: 0, ramAbove4G: 0, cpus: 1)
            withUnsafeMutableBytes(of: &cmos) { bytes in
                for offset in bytes.indices { bytes[offset] = fill == 0 ? UInt8(truncatingIfNeeded: random.next()) : fill }
            }
            runRandomOperations(on: &cmos, count: 2_500, random: &random)
        }
    }

    // MARK: Helpers

    private func assertClock(_ cmos: inout CMOS, now: Int64, _ expected: [UInt8], file: StaticString = #filePath,
                             line: UInt = #line) {
        let read = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map { cmos.read(UInt8($0), now: now) }
        XCTAssertEqual(read.map(hex), expected.map(hex), "now = \(now)", file: file, line: line)
    }

    private func hex(_ byte: UInt8) -> String {
        "0x" + String(byte, radix: 16, uppercase: true)
    }

    private func runRandomOperations(on cmos: inout CMOS, count: Int, random: inout SplitMix64) {
        let extremes: [Int64] = [.min, .max, .min + 1, .max - 1, 0, -1, 1, 253_402_300_799, -62_167_219_200,
                                 1 << 40, -(1 << 40)]
        func time(_ random: inout SplitMix64) -> Int64 {
            let raw = random.next()
            switch raw % 4 {
            case 0: return extremes[Int(raw >> 8 % UInt64(extremes.count))]
            case 1: return Int64(bitPattern: raw)
            default: return Int64(raw >> 34)  // Plausible times around now.
            }
        }
        var checksum: UInt64 = 0
        for _ in 0..<count {
            let raw = random.next()
            switch raw % 6 {
            case 0: cmos.writeIndex(UInt8(truncatingIfNeeded: raw >> 8))
            case 1: checksum &+= UInt64(cmos.readData(now: time(&random)))
            case 2: cmos.writeData(UInt8(truncatingIfNeeded: raw >> 8), now: time(&random))
            case 3:
                // Favour registers A and B so the clock modes, SET and the interrupt enables all get exercised.
                cmos.writeIndex([0x0A, 0x0B, 0x01, 0x03, 0x05, 0x00, 0x32][Int(raw >> 8 % 7)])
                cmos.writeData(UInt8(truncatingIfNeeded: raw >> 16), now: time(&random))
            case 4: cmos.tick(nowNanoseconds: time(&random))
            default:
                if cmos.interruptLine { checksum &+= 1 }
                checksum &+= UInt64(cmos.readIndex())
            }
        }
        // Every register of the final state still reads, and the status registers keep their invariants.
        for register in UInt8(0)...0x7F { checksum &+= UInt64(cmos.read(register, now: time(&random))) }
        XCTAssertEqual(cmos.read(0x0D), 0x80)
        XCTAssertEqual(cmos.read(0x0A) & 0x80, 0)
        _ = checksum
    }
}

/// Port access as firmware does it: select the register at 0x70, then access 0x71.
extension CMOS {
    fileprivate mutating func read(_ register: UInt8, now: Int64 = 0) -> UInt8 {
        writeIndex(register)
        return readData(now: now)
    }

    fileprivate mutating func write(_ register: UInt8, _ value: UInt8, now: Int64 = 0) {
        writeIndex(register)
        writeData(value, now: now)
    }

    /// The little-endian 16-bit value at `register`, `register` + 1.
    fileprivate mutating func word(_ register: UInt8) -> UInt16 {
        UInt16(read(register)) | UInt16(read(register + 1)) << 8
    }

    /// The 24-bit count of 64 KiB units above 4 GiB at 0x5B-0x5D.
    fileprivate mutating func highMemoryUnits() -> UInt64 {
        UInt64(read(0x5B)) | UInt64(read(0x5C)) << 8 | UInt64(read(0x5D)) << 16
    }

    /// The AT checksum at 0x2E (high byte) and 0x2F.
    fileprivate mutating func checksum() -> UInt16 {
        UInt16(read(0x2E)) << 8 | UInt16(read(0x2F))
    }
}

/// A small deterministic generator (SplitMix64) so the random-operation tests are reproducible.
private struct SplitMix64 {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

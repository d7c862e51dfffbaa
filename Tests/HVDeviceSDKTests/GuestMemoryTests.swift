@testable import HVDeviceSDK
import Glibc
import HVSys
import XCTest

/// `GuestMemory.zero` gives whole pages back instead of writing them, and writes only the partial
/// pages at either end: the range reads as zeros, its neighbours keep their bytes, and the host
/// memory behind the whole pages is freed.
final class GuestMemoryTests: XCTestCase {
    private let size = 4 << 20

    func testZeroClearsExactlyTheRangeAndFreesItsWholePages() throws {
        let fd = try MemFD.create(name: "zero-test", size: size)
        let memory = try GuestMemory(fd: fd, regions: [MemoryRegion(guestPhysicalAddress: 0, size: UInt64(size), memfdOffset: 0)])
        let pattern = [UInt8](repeating: 0xA5, count: size)
        try pattern.withUnsafeBytes { try memory.write($0, at: 0) }
        XCTAssertEqual(residentPages(fd), size / 4096)

        // From the middle of page 2 to the middle of page 200: pages 3…199 are whole.
        let start: UInt64 = 2 * 4096 + 100, end: UInt64 = 200 * 4096 + 7
        try memory.zero(at: start, count: end - start)
        // Before reading back: a read of a hole in a shared memfd mapping allocates the page again.
        XCTAssertEqual(residentPages(fd), size / 4096 - 197, "the 197 whole pages were written, not given back")
        var back = [UInt8](repeating: 0, count: size)
        try back.withUnsafeMutableBytes { try memory.read(into: $0, at: 0) }
        XCTAssertTrue(back[..<Int(start)].allSatisfy { $0 == 0xA5 }, "bytes before the range changed")
        XCTAssertTrue(back[Int(start)..<Int(end)].allSatisfy { $0 == 0 }, "the range is not all zeros")
        XCTAssertTrue(back[Int(end)...].allSatisfy { $0 == 0xA5 }, "bytes after the range changed")

        // Inside one page, and a range that is exactly whole pages.
        try memory.zero(at: 300 * 4096 + 5, count: 10)
        try memory.zero(at: 250 * 4096, count: 4 * 4096)
        try back.withUnsafeMutableBytes { try memory.read(into: $0, at: 0) }
        XCTAssertEqual(back[(300 * 4096 + 4)...(300 * 4096 + 15)].map { $0 }, [0xA5] + [UInt8](repeating: 0, count: 10) + [0xA5])
        XCTAssertTrue(back[(250 * 4096)..<(254 * 4096)].allSatisfy { $0 == 0 })
        XCTAssertEqual(back[254 * 4096], 0xA5)
        XCTAssertThrowsError(try memory.zero(at: UInt64(size) - 10, count: 20), "past the end of guest RAM")
    }

    /// The memfd's pages that hold data (lseek SEEK_DATA/SEEK_HOLE), in pages.
    private func residentPages(_ fd: FileDescriptor) -> Int {
        var pages = 0, offset: off_t = 0
        while offset < off_t(size) {
            let data = lseek(fd.rawValue, offset, 3)  // SEEK_DATA
            guard data >= 0 else { break }
            let hole = lseek(fd.rawValue, data, 4)  // SEEK_HOLE
            pages += Int((hole - data) / 4096)
            offset = hole
        }
        return pages
    }
}

import HVHost
import XCTest

/// hvctl's HTTP/1.1 reader for hvd's answers: bodies by Content-Length, chunked, or to the end;
/// anything that is not an HTTP response is nil, never a trap.
final class HVDClientTests: XCTestCase {
    private func parse(_ text: String) -> HVDClient.Response? { HVDClient.parse(Array(text.utf8)) }

    func testBodiesByLengthChunksAndEnd() {
        let sized = parse("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"message\":1}extra")
        XCTAssertEqual(sized?.status, 200)
        XCTAssertEqual(sized.map { String(decoding: $0.body, as: UTF8.self) }, "{\"message\":1}")
        let chunked = parse("HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n9\r\n{\"error\":\r\n7;ext=1\r\n\"gone\"}\r\n0\r\n\r\n")
        XCTAssertEqual(chunked?.status, 404)
        XCTAssertEqual(chunked?.errorMessage, "gone")
        let toEnd = parse("HTTP/1.0 204 No Content\r\n\r\n")
        XCTAssertEqual(toEnd?.status, 204)
        XCTAssertEqual(toEnd?.body, [])
        XCTAssertEqual(parse("HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"message\":\"done\"}")?.actionMessage, "done")
    }

    func testWhatIsNotAResponseIsNil() {
        for text in ["", "HTTP/1.1 200 OK\r\n", "SSH-2.0-OpenSSH\r\n\r\n", "HTTP/1.1 abc OK\r\n\r\n", "\r\n\r\n"] {
            XCTAssertNil(parse(text), text.debugDescription)
        }
        // A chunk size past the end stops the decoding instead of reading out of bounds.
        XCTAssertEqual(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\nabc")?.body, [])
    }
}

import HVSerialUART
import XCTest

/// The serial device's output journal: at every point a kill can land between writing a batch of
/// console output and committing its requests, the successor's replay skips exactly the bytes
/// that already reached the console.
final class ConsoleJournalTests: XCTestCase {
    /// Plays one batch of `bytes` output bytes, written in `chunks`, killed after `writesDone`
    /// of them (and, for a regular file, whether the kill came before the journal was stored):
    /// returns (bytes on the console, bytes the successor skips).
    private func crash(regular: Bool, batchStart: UInt32, chunks: [Int], writesDone: Int) -> (onConsole: UInt64, skipped: UInt64) {
        let previous = ConsoleJournal(batch: batchStart &- 7, base: regular ? 100 : nil, written: 55)  // an older, committed batch
        var console: UInt64 = 1000
        var journal = ConsoleJournal.forWriting(previous, committed: batchStart, outputSize: regular ? console : nil)
        for chunk in chunks.prefix(writesDone) {
            console += UInt64(chunk)
            if !regular { journal.written += UInt64(chunk) }
        }
        // The successor: the ring's committed index is still the batch's start.
        let saved = ConsoleJournal(bytes: journal.bytes)!
        return (console - 1000, saved.alreadyWritten(committed: batchStart, outputSize: regular ? console : nil))
    }

    func testTheSuccessorSkipsExactlyWhatReachedTheConsole() {
        for regular in [true, false] {
            for start: UInt32 in [0, 41, UInt32.max] {
                let chunks = [4096, 4096, 700]
                for done in 0...chunks.count {
                    let r = crash(regular: regular, batchStart: start, chunks: chunks, writesDone: done)
                    XCTAssertEqual(r.skipped, r.onConsole, "regular \(regular), start \(start), \(done) writes done")
                }
            }
        }
    }

    func testAJournalOfACommittedBatchSkipsNothing() {
        // The dead process committed the batch (the ring's index moved on) and wrote nothing since.
        let journal = ConsoleJournal(batch: 10, base: 500)
        XCTAssertEqual(journal.alreadyWritten(committed: 12, outputSize: 900), 0)
        XCTAssertEqual(ConsoleJournal(batch: 10, base: nil, written: 300).alreadyWritten(committed: 11, outputSize: nil), 0)
    }

    func testOneJournalPerBatch() {
        let first = ConsoleJournal.forWriting(nil, committed: 5, outputSize: 10)
        XCTAssertEqual(first, ConsoleJournal(batch: 5, base: 10))
        // A second write in the same batch keeps the batch's start, wherever the file is now.
        XCTAssertEqual(ConsoleJournal.forWriting(first, committed: 5, outputSize: 4106), first)
        XCTAssertEqual(ConsoleJournal.forWriting(first, committed: 9, outputSize: 4106), ConsoleJournal(batch: 9, base: 4106))
    }

    func testHostileOrTornBytesAreNoJournal() {
        let good = ConsoleJournal(batch: 3, base: nil, written: 77)
        XCTAssertEqual(ConsoleJournal(bytes: good.bytes), good)
        XCTAssertNil(ConsoleJournal(bytes: [UInt8](repeating: 0, count: 24)), "a page never written")
        XCTAssertNil(ConsoleJournal(bytes: Array(good.bytes.prefix(20))), "short")
        var torn = good.bytes
        torn[0] = 0  // the tag is cleared first and set last: a torn store has none
        XCTAssertNil(ConsoleJournal(bytes: torn))
        // A file someone truncated under the VM: nothing to skip, never a negative count.
        XCTAssertEqual(ConsoleJournal(batch: 1, base: 5000).alreadyWritten(committed: 1, outputSize: 10), 0)
        XCTAssertLessThanOrEqual(MemoryLayout<UART16550>.size, 2048, "the UART's registers must stay below the journal")
    }
}

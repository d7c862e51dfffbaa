/// How much of a batch of console output already reached the host, so a restarted serial device
/// never writes it twice.
///
/// The device externalises output only when it commits ring requests, but write(2) and the
/// commit are two steps: a process killed between them leaves bytes on the console for requests
/// its successor replays, which regenerates the same bytes. The journal, kept in the core-owned
/// state page, names the batch (the ring's committed index while its output is written) and how
/// far its output got: for a regular file, the file's size before the batch (exact whatever
/// instant the kill lands, since hv is the file's only writer); for a pipe or terminal, the
/// bytes counted after each write (exact but for the instant between a write's return and the
/// count's store). The successor skips that many of the bytes its replay produces.
public struct ConsoleJournal: Equatable, Sendable {
    /// The ring's committed request index while this batch's output was written.
    public var batch: UInt32
    /// The output file's size before the batch's first write; nil when the output is not a
    /// regular file.
    public var base: UInt64?
    /// Bytes of the batch written so far (counted for outputs that are not regular files).
    public var written: UInt64

    public init(batch: UInt32, base: UInt64?, written: UInt64 = 0) {
        self.batch = batch
        self.base = base
        self.written = written
    }

    /// The journal to keep before output is written while `committed` is the ring's committed
    /// index: `current` if it already describes this batch, else a new one starting at
    /// `outputSize` (nil for a pipe or terminal).
    public static func forWriting(_ current: ConsoleJournal?, committed: UInt32, outputSize: UInt64?) -> ConsoleJournal {
        if let current, current.batch == committed { return current }
        return ConsoleJournal(batch: committed, base: outputSize)
    }

    /// After a restart, with `committed` the ring's committed index (where the replay starts) and
    /// the output's size now: how many of the replayed batch's bytes already reached the output.
    /// 0 when the journal is of a batch that was committed (its successor has not written yet).
    public func alreadyWritten(committed: UInt32, outputSize: UInt64?) -> UInt64 {
        guard batch == committed else { return 0 }
        if let base {
            guard let outputSize, outputSize >= base else { return 0 }  // truncated by someone else: nothing to skip
            return outputSize - base
        }
        return written
    }

    // MARK: Its bytes in the state page

    /// Bytes the journal takes: tag, batch, base (UInt64.max for none), written.
    public static let byteCount = 24
    /// "HVSJ": a page holding a journal.
    public static let tag: UInt32 = 0x4A53_5648

    /// The little-endian image, tag first.
    public var bytes: [UInt8] {
        func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
        return le(UInt64(Self.tag), 4) + le(UInt64(batch), 4) + le(base ?? .max, 8) + le(written, 8)
    }

    /// Reads a journal back; nil for anything but a whole one (a page never written, or torn).
    public init?(bytes: [UInt8]) {
        guard bytes.count >= Self.byteCount else { return nil }
        func le(_ at: Int, _ n: Int) -> UInt64 { (0..<n).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
        guard le(0, 4) == UInt64(Self.tag) else { return nil }
        batch = UInt32(le(4, 4))
        let rawBase = le(8, 8)
        base = rawBase == .max ? nil : rawBase
        written = le(16, 8)
    }
}

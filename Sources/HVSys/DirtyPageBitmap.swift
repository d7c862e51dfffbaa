import CHVShim
import Glibc

/// A dirty-page bitmap in a sealed memfd, shared by one device process (which marks the pages of
/// guest memory it writes) and the core (which takes the marks during a live migration). Layout
/// (ipc-schema/README.md §5.4c): bit i of little-endian u64 word w stands for the 4 KiB page at
/// offset (64 w + i) · 4096 of the guest-memory memfd.
///
/// Audited raw-pointer holder. Unsafe assumptions:
/// - the mapping holds `wordCount` aligned u64 words (checked at init: the memfd is sealed and at
///   least that large, and mmap returns page-aligned memory);
/// - the other process may set bits at any time: every access is atomic (OR to mark, exchange to
///   take), so no mark is ever lost between a read and a clear;
/// - a hostile peer may write anything here: the core only ever learns from it which pages to
///   copy again, never an address it acts on otherwise.
public final class DirtyPageBitmap: @unchecked Sendable {
    // @unchecked: the words are only touched atomically; the rest is immutable.
    public static let pageSize: UInt64 = 4096
    private let mapping: SharedMapping
    /// Pages covered.
    public let pages: UInt64
    private var wordCount: Int { Int((pages + 63) / 64) }

    /// Bytes a bitmap for `memoryBytes` of guest memory occupies in its memfd (a whole number of
    /// host pages).
    public static func memfdSize(memoryBytes: UInt64) -> Int {
        let words = (memoryBytes / pageSize + 63) / 64
        return Int(max(4096, (words * 8 + 4095) & ~4095))
    }

    /// Creates a bitmap for `memoryBytes` of guest memory: the memfd to pass, and the core's view of it.
    public static func create(name: String, memoryBytes: UInt64) throws(SystemError) -> (FileDescriptor, DirtyPageBitmap) {
        let fd = try MemFD.create(name: name, size: memfdSize(memoryBytes: memoryBytes))
        return (fd, try DirtyPageBitmap(fd: fd, memoryBytes: memoryBytes))
    }

    /// Maps the bitmap in `fd` (checked: sealed, large enough) for `memoryBytes` of guest memory.
    public init(fd: FileDescriptor, memoryBytes: UInt64) throws(SystemError) {
        pages = memoryBytes / Self.pageSize
        mapping = try SharedMapping(fd: fd, count: Self.memfdSize(memoryBytes: memoryBytes))
    }

    private func word(_ index: Int) -> UnsafeMutablePointer<UInt64> {
        // In range (callers check against wordCount) and 8-byte aligned (page-aligned base).
        (mapping.base + index * 8).assumingMemoryBound(to: UInt64.self)
    }

    /// Marks the pages holding memfd bytes `[offset, offset + count)`; call after writing them.
    /// Pages past the end are ignored.
    public func mark(offset: UInt64, count: UInt64) {
        guard count > 0, offset / Self.pageSize < pages else { return }
        let first = offset / Self.pageSize
        let last = min((offset &+ (count - 1)) / Self.pageSize, pages - 1)
        var page = first
        while page <= last {
            let index = Int(page / 64)
            let shift = page % 64
            // Bits of this word from `page` to `last` (at most to the word's end).
            let span = min(64 - shift, last - page + 1)
            let bits = span == 64 ? UInt64.max : ((UInt64(1) << span) - 1) << shift
            let p = word(index)
            // Most writes hit pages already marked since the last take: a plain load saves the locked OR.
            if hv_atomic_load_u64(p) & bits != bits { hv_atomic_or_u64(p, bits) }
            page += span
        }
    }

    /// Takes every mark (clearing it) and ORs it into `words`, which must hold one u64 per 64 pages.
    public func take(into words: inout [UInt64]) {
        let n = min(words.count, wordCount)
        for i in 0..<n {
            let p = word(i)
            if hv_atomic_load_u64(p) != 0 { words[i] |= hv_atomic_exchange_u64(p, 0) }
        }
    }

    /// Clears every mark.
    public func clear() {
        for i in 0..<wordCount { _ = hv_atomic_exchange_u64(word(i), 0) }
    }
}

import Glibc
import HVIPC
import HVSys

/// Why a guest-memory access was refused.
public struct GuestMemoryAccessError: Error, Equatable, Sendable, CustomStringConvertible {
    /// First guest-physical address of the refused access.
    public let address: UInt64
    /// Its length in bytes.
    public let count: UInt64
    public var description: String {
        "guest-physical range [0x\(String(address, radix: 16)), +0x\(String(count, radix: 16))) is not guest RAM"
    }
}

/// The guest's RAM, mapped into this device process from the memfd the core handed over.
///
/// Audited raw-pointer holder. Unsafe assumptions:
/// - each region's `[memfdOffset, memfdOffset + size)` lies inside the mapping (checked at init);
/// - the guest and other devices write this memory concurrently: never assume a value read twice
///   is the same, copy descriptors out once before validating them;
/// - every access goes through `translate`, which refuses any range not wholly inside one region.
///
/// **Live migration.** A device started with the `.dirtyLog` capability must have every write it
/// makes to guest memory logged, or a migrated guest finds stale bytes there: `write`, `zero`
/// and virtqueue completions (`VirtioPCITransport.complete`) log theirs; a device that writes
/// through a pointer from `translate` (or `DescriptorChain.ioVectors`) without completing the
/// chain through the transport calls `markDirty` after the write.
public final class GuestMemory: @unchecked Sendable {
    // @unchecked: immutable once the runtime's handshake is over (the dirty log is set during it);
    // concurrent access to guest bytes is inherent (see above).
    private let mapping: SharedMapping
    /// The RAM regions, as the core described them in HELLO.
    public let regions: [MemoryRegion]
    /// Where writes are logged, once the core handed a bitmap over (SET_DIRTY_LOG).
    var dirtyLog: DirtyPageBitmap?
    /// Bytes of the memfd the regions cover.
    let memfdBytes: UInt64

    package init(fd: FileDescriptor, regions: [MemoryRegion]) throws(DeviceError) {
        var end: UInt64 = 0
        for r in regions {
            let (regionEnd, overflow) = r.memfdOffset.addingReportingOverflow(r.size)
            guard !overflow else { throw .protocolViolation("memory region overflows") }
            end = max(end, regionEnd)
        }
        let fdSize: Int64
        do { fdSize = try fd.size() } catch { throw .system(error) }
        guard end <= UInt64(max(fdSize, 0)), end > 0 else {
            throw .protocolViolation("memory regions end at \(end) but the guest-memory memfd has \(fdSize) bytes")
        }
        do { mapping = try SharedMapping(fd: fd, count: Int(end)) } catch { throw .system(error) }
        self.regions = regions
        memfdBytes = end
    }

    /// Records that the guest-physical range `[address, address + count)` was written (after
    /// writing it), for live migration; a no-op while no dirty log is set and for addresses
    /// outside RAM. `write`, `zero` and virtqueue completions call it themselves.
    public func markDirty(_ address: UInt64, count: UInt64) {
        guard let dirtyLog, count > 0 else { return }
        for r in regions where address >= r.guestPhysicalAddress {
            let offset = address - r.guestPhysicalAddress
            guard offset < r.size else { continue }
            dirtyLog.mark(offset: r.memfdOffset + offset, count: min(count, r.size - offset))
            return
        }
    }

    /// Bytes of RAM starting at guest-physical 0 (the first region, if it starts at 0).
    public var lowRAMSize: UInt64 {
        regions.first { $0.guestPhysicalAddress == 0 }?.size ?? 0
    }

    /// A pointer to `count` bytes at `address`, or nil if the range is not wholly inside one RAM region.
    public func translate(_ address: UInt64, count: UInt64) -> UnsafeMutableRawPointer? {
        for r in regions where address >= r.guestPhysicalAddress {
            let offset = address - r.guestPhysicalAddress
            guard offset <= r.size, count <= r.size - offset else { continue }
            return mapping.base + Int(r.memfdOffset + offset)
        }
        return nil
    }

    /// Copies `bytes` into guest RAM at `address`.
    public func write(_ bytes: UnsafeRawBufferPointer, at address: UInt64) throws(GuestMemoryAccessError) {
        guard let p = translate(address, count: UInt64(bytes.count)) else {
            throw GuestMemoryAccessError(address: address, count: UInt64(bytes.count))
        }
        if let src = bytes.baseAddress { p.copyMemory(from: src, byteCount: bytes.count) }
        markDirty(address, count: UInt64(bytes.count))
    }

    /// Copies guest RAM at `address` into `buffer`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: UInt64) throws(GuestMemoryAccessError) {
        guard let p = translate(address, count: UInt64(buffer.count)) else {
            throw GuestMemoryAccessError(address: address, count: UInt64(buffer.count))
        }
        if let dst = buffer.baseAddress { dst.copyMemory(from: p, byteCount: buffer.count) }
    }

    /// Zero-fills `count` bytes at `address`. The whole pages of the range are given back to the
    /// host (as `discard` does: they read as zeros and take no memory) rather than written, so
    /// zeroing a large range (a kernel's BSS) touches no page; only a partial page at either end
    /// is written.
    public func zero(at address: UInt64, count: UInt64) throws(GuestMemoryAccessError) {
        guard count <= UInt64(Int.max), let p = translate(address, count: count) else {
            throw GuestMemoryAccessError(address: address, count: count)
        }
        let pageMask: UInt64 = 4095
        let end = address + count  // no overflow: `translate` found the range inside guest RAM
        let first = min((address + pageMask) & ~pageMask, end), last = max(end & ~pageMask, first)
        if last > first, discard(first, count: last - first) == last - first {
            p.initializeMemory(as: UInt8.self, repeating: 0, count: Int(first - address))
            (p + Int(last - address)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(end - last))
        } else {
            p.initializeMemory(as: UInt8.self, repeating: 0, count: Int(count))
        }
        markDirty(address, count: count)
    }

    /// Gives the host back the RAM behind the whole 4 KiB pages of `[address, address + count)`:
    /// they read as zeros from then on, in the guest and in every process that maps guest memory,
    /// and take no host memory until written again. For pages the guest gave up (a balloon's
    /// inflated pages, free page reporting). Returns the bytes given back: 0 when the range is not
    /// wholly inside one RAM region or the host refused.
    @discardableResult
    public func discard(_ address: UInt64, count: UInt64) -> UInt64 {
        let pageMask: UInt64 = 4095
        let (end, overflow) = address.addingReportingOverflow(count)
        guard !overflow, address <= UInt64.max - pageMask else { return 0 }
        let first = (address + pageMask) & ~pageMask, last = end & ~pageMask
        guard last > first, let p = translate(first, count: last - first) else { return 0 }
        // Unsafe assumption: `p` is page-aligned (the mapping is, and regions start on pages of the
        // memfd) and `[p, p + length)` lies inside this process's shared mapping of the guest-RAM
        // memfd (`translate` checked). MADV_REMOVE frees the memfd's pages behind it (a hole punch,
        // which the memfd's seals allow): every mapping, the core's and KVM's included, then reads
        // zeros there.
        guard madvise(p, Int(last - first), MADV_REMOVE) == 0 else { return 0 }
        markDirty(first, count: last - first)
        return last - first
    }
}

/// One of the device's interrupt lines: an eventfd the core wired to a KVM irqfd.
public struct InterruptLine: Sendable {
    private let doorbell: EventFD
    init(doorbell: EventFD) { self.doorbell = doorbell }
    /// Delivers one edge on the line (ISA-style edge-triggered interrupt).
    public func pulse() { doorbell.signal() }
}

/// A page of memory owned by the core that survives this process: keep device state here and a
/// restarted device resumes where the dead one stopped. Treat its contents as untrusted on restart
/// (the process that died may have written anything) and validate before use.
public final class StatePage: @unchecked Sendable {
    // @unchecked: used only by the device's single runtime thread.
    private let mapping: SharedMapping
    /// Usable bytes.
    public var count: Int { mapping.count }
    init(fd: FileDescriptor) throws(DeviceError) {
        do { mapping = try SharedMapping(fd: fd, count: 4096) } catch { throw .system(error) }
    }

    /// Reads a value stored at offset 0. `T` must be plain data that any bit pattern can represent
    /// safely after the caller's validation (integers, tuples of integers).
    public func load<T: BitwiseCopyable>(_ type: T.Type) -> T {
        precondition(MemoryLayout<T>.size <= count, "state larger than the state page")
        return mapping.base.loadUnaligned(as: T.self)
    }

    /// Stores a value at offset 0.
    public func store<T: BitwiseCopyable>(_ value: T) {
        precondition(MemoryLayout<T>.size <= count, "state larger than the state page")
        mapping.base.storeBytes(of: value, as: T.self)
    }

    /// Stores `bytes` from offset 0 (at most `count`).
    public func storeBytes(_ bytes: [UInt8]) {
        precondition(bytes.count <= count, "state larger than the state page")
        bytes.withUnsafeBytes { mapping.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    /// The first `count` bytes (validate before use: a dead process may have left anything).
    public func loadBytes(count n: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: mapping.base, count: min(n, count)))
    }

    /// `n` bytes from `offset` (clipped to the page; validate before use).
    public func loadBytes(at offset: Int, count n: Int) -> [UInt8] {
        guard offset >= 0, offset < count else { return [] }
        return Array(UnsafeRawBufferPointer(start: mapping.base + offset, count: min(n, count - offset)))
    }

    /// Stores `bytes` at `offset`; bytes past the page's end are not stored.
    public func storeBytes(_ bytes: [UInt8], at offset: Int) {
        guard offset >= 0, offset < count else { return }
        let n = min(bytes.count, count - offset)
        bytes.withUnsafeBytes { (mapping.base + offset).copyMemory(from: $0.baseAddress!, byteCount: n) }
    }

    /// The little-endian u16 at `offset` (0 outside the page).
    public func loadUInt16(at offset: Int) -> UInt16 {
        guard offset >= 0, offset + 2 <= count else { return 0 }
        return UInt16(littleEndian: mapping.base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }

    /// Stores a little-endian u16 at `offset` (ignored outside the page). A single aligned store:
    /// a process killed around it leaves the old value or the new one, never a mix.
    public func storeUInt16(_ value: UInt16, at offset: Int) {
        guard offset >= 0, offset + 2 <= count else { return }
        mapping.base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt16.self)
    }

    /// The byte at `offset` (0 outside the page).
    public func loadByte(at offset: Int) -> UInt8 {
        guard offset >= 0, offset < count else { return 0 }
        return mapping.base.load(fromByteOffset: offset, as: UInt8.self)
    }

    /// Stores one byte at `offset` (ignored outside the page).
    public func storeByte(_ value: UInt8, at offset: Int) {
        guard offset >= 0, offset < count else { return }
        mapping.base.storeBytes(of: value, toByteOffset: offset, as: UInt8.self)
    }
}

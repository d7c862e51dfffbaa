/// Where the loader writes. Addresses are guest-physical.
///
/// The bios device implements this over its mapping of guest RAM; tests implement it in memory.
public protocol GuestPhysicalMemory {
    /// Bytes of guest RAM starting at guest-physical 0 (RAM is contiguous from 0 up to this size for the loader's purposes).
    var ramSize: UInt64 { get }
    /// Copies bytes into guest RAM. Implementations bounds-check and throw; the loader also checks first.
    func write(_ bytes: UnsafeRawBufferPointer, at guestAddress: UInt64) throws(GuestMemoryError)
    /// Zero-fills a range (for .bss).
    func zero(at guestAddress: UInt64, count: UInt64) throws(GuestMemoryError)
}

/// A write to guest memory that fell outside guest RAM.
public struct GuestMemoryError: Error, Equatable {
    /// Guest-physical address of the refused write.
    public let address: UInt64
    /// Length of the refused write in bytes.
    public let count: UInt64

    /// Describes a refused write of `count` bytes at `address`.
    public init(address: UInt64, count: UInt64) {
        self.address = address
        self.count = count
    }
}

// Big-endian field helpers shared by the LUNs: SCSI CDBs and parameter data are big-endian.

/// `v` as `n` big-endian bytes.
func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - $0))) } }
func u16(_ b: [UInt8], _ i: Int) -> UInt64 { UInt64(b[i]) << 8 | UInt64(b[i + 1]) }
func u32(_ b: [UInt8], _ i: Int) -> UInt64 { u16(b, i) << 16 | u16(b, i + 2) }
func u64(_ b: [UInt8], _ i: Int) -> UInt64 { u32(b, i) << 32 | u32(b, i + 4) }

/// ASCII text space-padded (or cut) to `n` bytes, as INQUIRY's identification fields are.
func padded(_ s: String, _ n: Int) -> [UInt8] {
    let b = Array(s.utf8.prefix(n))
    return b + [UInt8](repeating: 0x20, count: n - b.count)
}

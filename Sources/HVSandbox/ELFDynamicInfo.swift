/// What an ELF64 little-endian executable or shared object asks of the dynamic loader: the
/// libraries it needs (DT_NEEDED) and where it says to look for them (DT_RUNPATH, or the older
/// DT_RPATH). The jail uses it to expose exactly the library directories a device binary needs,
/// whatever the trusted side itself is linked against.
///
/// The parser is bounds-checked at every step and reads only through `read`, so a malformed or
/// hostile file yields nil (or fewer names), never a trap.
public struct ELFDynamicInfo: Equatable, Sendable {
    public var needed: [String]
    public var runPaths: [String]

    public init(needed: [String], runPaths: [String]) {
        self.needed = needed
        self.runPaths = runPaths
    }

    /// Most program headers and dynamic entries looked at; real binaries have tens.
    static let maximumProgramHeaders = 256
    static let maximumDynamicEntries = 4096

    /// Parses the file `read(offset, count)` returns bytes of (fewer at its end); nil when it is
    /// not a 64-bit little-endian ELF file with a dynamic section.
    public init?(read: (_ offset: UInt64, _ count: Int) -> [UInt8]?) {
        guard let header = read(0, 64), header.count == 64, header[0..<4] == [0x7F, 0x45, 0x4C, 0x46],
              header[4] == 2 /* ELFCLASS64 */, header[5] == 1 /* ELFDATA2LSB */ else { return nil }
        func u16(_ b: [UInt8], _ at: Int) -> UInt64 { UInt64(b[at]) | UInt64(b[at + 1]) << 8 }
        func u32(_ b: [UInt8], _ at: Int) -> UInt64 { u16(b, at) | u16(b, at + 2) << 16 }
        func u64(_ b: [UInt8], _ at: Int) -> UInt64 { u32(b, at) | u32(b, at + 4) << 32 }
        let phoff = u64(header, 0x20), phentsize = Int(u16(header, 0x36)), phnum = Int(u16(header, 0x38))
        guard phentsize >= 56, phnum <= Self.maximumProgramHeaders, let table = read(phoff, phentsize * phnum),
              table.count == phentsize * phnum else { return nil }
        var loads: [(vaddr: UInt64, offset: UInt64, size: UInt64)] = []
        var dynamic: (offset: UInt64, size: UInt64)?
        for i in 0..<phnum {
            let at = i * phentsize
            switch u32(table, at) {
            case 1: loads.append((u64(table, at + 16), u64(table, at + 8), u64(table, at + 32)))  // PT_LOAD
            case 2: dynamic = (u64(table, at + 8), u64(table, at + 32))                          // PT_DYNAMIC
            default: break
            }
        }
        guard let dynamic else { return nil }
        let count = Int(min(dynamic.size / 16, UInt64(Self.maximumDynamicEntries)))
        guard count > 0, let entries = read(dynamic.offset, count * 16), entries.count == count * 16 else { return nil }
        var neededOffsets: [UInt64] = [], runPath: UInt64?, rPath: UInt64?, strtab: UInt64?, strsz: UInt64?
        for i in 0..<count {
            let tag = u64(entries, i * 16), value = u64(entries, i * 16 + 8)
            switch tag {
            case 0: break                         // DT_NULL
            case 1: neededOffsets.append(value)   // DT_NEEDED
            case 5: strtab = value                // DT_STRTAB (an address)
            case 10: strsz = value                // DT_STRSZ
            case 15: rPath = value                // DT_RPATH
            case 29: runPath = value              // DT_RUNPATH
            default: continue
            }
            if tag == 0 { break }
        }
        // The string table is named by address: find the loadable segment that holds it.
        guard let strtab, let strsz, strsz <= 1 << 20,
              let segment = loads.first(where: { strtab >= $0.vaddr && strtab - $0.vaddr < $0.size }),
              case let (start, overflow) = segment.offset.addingReportingOverflow(strtab - segment.vaddr), !overflow else { return nil }
        // Only the few strings named are read, not the table: a binary with the Swift runtime
        // linked in exports hundreds of KiB of symbol names (reading them all for every device
        // binary cost ~2 ms of each VM's launch).
        func string(_ offset: UInt64) -> String? {
            guard offset < strsz, let bytes = read(start + offset, Int(min(strsz - offset, 4096))),
                  let end = bytes.firstIndex(of: 0) else { return nil }
            return String(decoding: bytes[..<end], as: UTF8.self)
        }
        needed = neededOffsets.compactMap(string)
        runPaths = (runPath ?? rPath).flatMap(string)?.split(separator: ":").map(String.init) ?? []
    }
}

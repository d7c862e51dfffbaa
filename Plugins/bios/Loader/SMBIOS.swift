/// SMBIOS 2.8 tables for firmware, as QEMU hands them to SeaBIOS: the fw_cfg files
/// "etc/smbios/smbios-anchor" (a 31-byte 2.1-style entry point) and "etc/smbios/smbios-tables"
/// (the structures). SeaBIOS adds its own type 0 (BIOS information), fills in the table address
/// and both checksums, and copies the result to the F segment (biostables.c,
/// smbios_romfile_setup). Without these files SeaBIOS builds legacy tables itself, which costs
/// ~0.3 s of emulated instructions on this machine's nested KVM.
///
/// Structures: type 1 (system: "hv", "hv virtual machine"), type 3 (chassis), one type 4
/// (processor) per vCPU, type 32 (boot status: no errors) and type 127 (end of table).
public struct SMBIOSTables: Sendable {
    /// The entry point with the table length, structure count and largest structure filled in
    /// (address and checksums are SeaBIOS's to set, as with QEMU's anchor).
    public let anchor: [UInt8]
    /// The structures, back to back, each followed by its strings and a double NUL.
    public let tables: [UInt8]
    public let structureCount: Int
    public let largestStructure: Int

    public init(cpus: Int, version: String = "0.1.0") {
        var structures: [[UInt8]] = []
        var handle: UInt16 = 0x100
        func structure(_ type: UInt8, _ formatted: [UInt8], strings: [String]) {
            var s: [UInt8] = [type, UInt8(4 + formatted.count), UInt8(truncatingIfNeeded: handle), UInt8(truncatingIfNeeded: handle >> 8)]
            s += formatted
            for string in strings { s += Array(string.utf8) + [0] }
            if strings.isEmpty { s += [0] }
            s += [0]
            structures.append(s)
            handle &+= 1
        }
        // Type 1, system information: manufacturer 1, product 2, version 3, no serial, zero UUID,
        // wake-up type 6 (power switch), no SKU or family.
        structure(1, [1, 2, 3, 0] + [UInt8](repeating: 0, count: 16) + [6, 0, 0],
                  strings: ["hv", "hv virtual machine", version])
        // Type 3, chassis: manufacturer 1, type 1 (other), no version/serial/asset tag, states
        // safe (3), security none (3).
        structure(3, [1, 0x01, 0, 0, 0, 3, 3, 3, 3], strings: ["hv"])
        // Type 4 per vCPU: socket "CPU n", central processor (3), family "other" (1),
        // manufacturer 2, no ID, no version string, no voltage/clock data, populated and enabled
        // (0x41), upgrade "other" (1), no cache handles.
        for cpu in 0..<max(1, min(cpus, 255)) {
            let noCache: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
            structure(4, [1, 3, 1, 2] + [UInt8](repeating: 0, count: 8) + [0, 0, 0, 0, 0, 0, 0, 0, 0x41, 1] + noCache,
                      strings: ["CPU \(cpu)", "hv"])
        }
        // Type 32, system boot information: no errors detected.
        structure(32, [0, 0, 0, 0, 0, 0, 0], strings: [])
        // Type 127, end of table.
        structure(127, [], strings: [])

        tables = structures.flatMap { $0 }
        structureCount = structures.count
        largestStructure = structures.map(\.count).max() ?? 0

        var a = Array("_SM_".utf8)
        a += [0, 0x1F, 2, 8]                                            // checksum, length, version 2.8
        a += [UInt8(truncatingIfNeeded: largestStructure), UInt8(truncatingIfNeeded: largestStructure >> 8)]
        a += [0, 0, 0, 0, 0, 0]                                         // entry point revision, formatted area
        a += Array("_DMI_".utf8) + [0]                                  // intermediate anchor, checksum
        a += [UInt8(truncatingIfNeeded: tables.count), UInt8(truncatingIfNeeded: tables.count >> 8)]
        a += [0, 0, 0, 0]                                               // table address: SeaBIOS's
        a += [UInt8(truncatingIfNeeded: structureCount), UInt8(truncatingIfNeeded: structureCount >> 8)]
        a += [0x28]                                                     // BCD revision 2.8
        anchor = a
    }
}

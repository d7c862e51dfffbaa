import HVBootLoader
import XCTest

/// hv's ACPI tables against the ACPI specification's layouts, placed for direct boot and linked by
/// a re-implementation of SeaBIOS's table-loader (romfile_loader.c) for firmware boot.
final class ACPITests: XCTestCase {
    /// Guest memory as a flat map from address to byte, for following table pointers.
    private struct Memory {
        var bytes: [UInt64: UInt8] = [:]
        mutating func place(_ data: [UInt8], at address: UInt64) {
            for (i, b) in data.enumerated() { bytes[address + UInt64(i)] = b }
        }
        func slice(_ address: UInt64, _ count: Int) -> [UInt8] { (0..<count).map { bytes[address + UInt64($0)] ?? 0 } }
        func u8(_ a: UInt64) -> UInt8 { bytes[a] ?? 0 }
        func u16(_ a: UInt64) -> UInt16 { UInt16(u8(a)) | UInt16(u8(a + 1)) << 8 }
        func u32(_ a: UInt64) -> UInt32 { UInt32(u16(a)) | UInt32(u16(a + 2)) << 16 }
        func u64(_ a: UInt64) -> UInt64 { UInt64(u32(a)) | UInt64(u32(a + 4)) << 32 }
        func signature(_ a: UInt64) -> String { String(decoding: slice(a, 4), as: UTF8.self) }
    }

    private func sum(_ bytes: [UInt8]) -> UInt8 { bytes.reduce(0, &+) }

    /// Follows RSDP → RSDT → tables as an OS does, checking every checksum; returns the tables by
    /// signature.
    private func walk(_ m: Memory, rsdp: UInt64, file: StaticString = #filePath, line: UInt = #line) -> [String: UInt64] {
        XCTAssertEqual(String(decoding: m.slice(rsdp, 8), as: UTF8.self), "RSD PTR ", file: file, line: line)
        XCTAssertEqual(sum(m.slice(rsdp, 20)), 0, "RSDP checksum", file: file, line: line)
        XCTAssertEqual(m.u8(rsdp + 15), 0, "RSDP revision 0 (RSDT)", file: file, line: line)
        let rsdt = UInt64(m.u32(rsdp + 16))
        XCTAssertEqual(m.signature(rsdt), "RSDT", file: file, line: line)
        let length = Int(m.u32(rsdt + 4))
        XCTAssertEqual(sum(m.slice(rsdt, length)), 0, "RSDT checksum", file: file, line: line)
        var found: [String: UInt64] = ["RSDT": rsdt]
        for i in 0..<(length - 36) / 4 {
            let t = UInt64(m.u32(rsdt + 36 + UInt64(4 * i)))
            XCTAssertEqual(sum(m.slice(t, Int(m.u32(t + 4)))), 0, "\(m.signature(t)) checksum", file: file, line: line)
            found[m.signature(t)] = t
        }
        if let fadt = found["FACP"] {
            let dsdt = UInt64(m.u32(fadt + 40)), facs = UInt64(m.u32(fadt + 36))
            XCTAssertEqual(m.signature(dsdt), "DSDT", file: file, line: line)
            XCTAssertEqual(sum(m.slice(dsdt, Int(m.u32(dsdt + 4)))), 0, "DSDT checksum", file: file, line: line)
            XCTAssertEqual(m.signature(facs), "FACS", file: file, line: line)
            XCTAssertEqual(facs % 64, 0, "FACS is 64-byte aligned", file: file, line: line)
            found["DSDT"] = dsdt
            found["FACS"] = facs
        }
        return found
    }

    func testDirectBootTablesDescribeThePlatform() {
        let t = ACPITables.placed(cpus: 3)
        var m = Memory()
        m.place(t.rsdp, at: ACPITables.directRSDPAddress)
        m.place(t.tables, at: ACPITables.directTablesAddress)
        // An OS scanning 0xE0000–0xFFFFF on 16-byte boundaries finds the RSDP.
        XCTAssertEqual(ACPITables.directRSDPAddress % 16, 0)
        XCTAssertGreaterThanOrEqual(ACPITables.directRSDPAddress, 0xE_0000)
        XCTAssertLessThanOrEqual(ACPITables.directTablesAddress + UInt64(t.tables.count), 0xF_0000, "inside the legacy hole, not the BIOS area")
        let tables = walk(m, rsdp: ACPITables.directRSDPAddress)
        XCTAssertEqual(Set(tables.keys), ["RSDT", "FACP", "APIC", "DSDT", "FACS"])

        let fadt = tables["FACP"]!
        XCTAssertEqual(m.u32(fadt + 4), 244, "FADT revision 3 length")
        XCTAssertEqual(m.u8(fadt + 8), 3)
        XCTAssertEqual(m.u16(fadt + 46), 9, "SCI_INT")
        XCTAssertEqual(m.u32(fadt + 48), 0, "no SMI_CMD: always in ACPI mode")
        XCTAssertEqual(m.u32(fadt + 56), UInt32(ACPIPowerManagement.base), "PM1a_EVT_BLK")
        XCTAssertEqual(m.u32(fadt + 64), UInt32(ACPIPowerManagement.base) + 4, "PM1a_CNT_BLK")
        XCTAssertEqual(m.u32(fadt + 76), UInt32(ACPIPowerManagement.base) + 8, "PM_TMR_BLK")
        XCTAssertEqual([m.u8(fadt + 88), m.u8(fadt + 89), m.u8(fadt + 91)], [4, 2, 4], "block lengths")
        XCTAssertEqual(m.u8(fadt + 108), 0x32, "CMOS century register")
        XCTAssertEqual(m.u16(fadt + 109) & 0x2, 0x2, "IAPC_BOOT_ARCH: an 8042 is present")
        XCTAssertEqual(m.u32(fadt + 112) & (1 << 10), 1 << 10, "RESET_REG_SUP")
        XCTAssertEqual([m.u8(fadt + 116), m.u8(fadt + 117)], [1, 8], "RESET_REG: 8-bit system I/O")
        XCTAssertEqual(m.u64(fadt + 120), 0xCF9)
        XCTAssertEqual(m.u8(fadt + 128), 0x06, "RESET_VALUE")
        // The FADT's PM block is where the PM model powers off.
        var pm = ACPIPowerManagement()
        XCTAssertEqual(pm.write(offset: Int(m.u32(fadt + 64)) - Int(ACPIPowerManagement.base), size: 2, value: 1 << 13), .powerOff)

        let madt = tables["APIC"]!
        XCTAssertEqual(m.u32(madt + 36), 0xFEE0_0000)
        var entry = madt + 44
        let end = madt + UInt64(m.u32(madt + 4))
        var lapics: [UInt8] = [], ioapics: [UInt32] = [], overrides: [[UInt32]] = []
        while entry < end {
            let type = m.u8(entry), length = UInt64(m.u8(entry + 1))
            XCTAssertGreaterThan(length, 0)
            switch type {
            case 0:
                XCTAssertEqual(m.u32(entry + 4) & 1, 1, "enabled")
                lapics.append(m.u8(entry + 3))
            case 1: ioapics.append(m.u32(entry + 4))
            case 2: overrides.append([UInt32(m.u8(entry + 3)), m.u32(entry + 4), UInt32(m.u16(entry + 8))])
            default: XCTFail("unexpected MADT entry \(type)")
            }
            entry += max(length, 1)
        }
        XCTAssertEqual(lapics, [0, 1, 2], "one local APIC per vCPU, APIC ID = index")
        XCTAssertEqual(ioapics, [0xFEC0_0000])
        XCTAssertEqual(overrides, [[0, 2, 0], [9, 9, 0xD]], "IRQ 0 → GSI 2; SCI level/high")

        let dsdt = tables["DSDT"]!
        let aml = m.slice(dsdt + 36, Int(m.u32(dsdt + 4)) - 36)
        XCTAssertEqual(Array(aml.prefix(12)), [0x08] + Array("_S5_".utf8) + [0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00],
                       "Name(_S5, Package(4){0,0,0,0}): SLP_TYP 0 is soft-off")
        XCTAssertNotNil(find(aml, [0x0C, 0x41, 0xD0, 0x03, 0x03]), "_HID EISAID PNP0303")
        XCTAssertNotNil(find(aml, [0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01, 0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01, 0x22, 0x02, 0x00, 0x79, 0x00]),
                        "_CRS: ports 0x60, 0x64 and IRQ 1")
        // Package lengths are consistent: the scope's and device's PkgLength reach exactly the end.
        let scope = 12
        XCTAssertEqual(aml[scope], 0x10)
        XCTAssertEqual(scope + 1 + Int(aml[scope + 1]), aml.count, "Scope(\\_SB) PkgLength")
        XCTAssertEqual(Array(aml[(scope + 7)..<(scope + 9)]), [0x5B, 0x82], "Device()")
        XCTAssertEqual(scope + 9 + Int(aml[scope + 9]), aml.count, "Device(KBD) PkgLength")
    }

    func testTableLoaderScriptAsSeaBIOSRunsIt() throws {
        let files = Dictionary(uniqueKeysWithValues: ACPITables.firmwareFiles(cpus: 2).map { ($0.name, $0.bytes) })
        let script = try XCTUnwrap(files["etc/table-loader"])
        XCTAssertEqual(script.count % 128, 0)
        // SeaBIOS's romfile_loader: allocate, then add pointers and checksums, in script order.
        var m = Memory()
        var placed: [String: UInt64] = [:]
        var nextHigh: UInt64 = 0x0FFF_0000, nextFSEG: UInt64 = 0xF_5000
        func name(_ c: ArraySlice<UInt8>) -> String { String(decoding: c.prefix { $0 != 0 }, as: UTF8.self) }
        func u32(_ c: ArraySlice<UInt8>, _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(c[c.startIndex + at + $1]) << (8 * UInt32($1)) } }
        for start in stride(from: 0, to: script.count, by: 128) {
            let c = script[start..<start + 128]
            switch u32(c, 0) {
            case 1:
                let file = name(c[(start + 4)..<(start + 60)]), align = UInt64(u32(c, 60)), zone = c[start + 64]
                let data = try XCTUnwrap(files[file], file)
                XCTAssertTrue([1, 2].contains(zone))
                var address = zone == 2 ? nextFSEG : nextHigh
                address = (address + align - 1) / align * align
                if zone == 2 { nextFSEG = address + UInt64(data.count) } else { nextHigh = address + UInt64(data.count) }
                placed[file] = address
                m.place(data, at: address)
            case 2:
                let dest = name(c[(start + 4)..<(start + 60)]), src = name(c[(start + 60)..<(start + 116)])
                let offset = UInt64(u32(c, 116)), size = c[start + 120]
                XCTAssertEqual(size, 4)
                let at = try XCTUnwrap(placed[dest]) + offset, base = try XCTUnwrap(placed[src])
                let value = m.u32(at) &+ UInt32(base)
                m.place((0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * UInt32($0))) }, at: at)
            case 3:
                let file = name(c[(start + 4)..<(start + 60)])
                let base = try XCTUnwrap(placed[file])
                let offset = UInt64(u32(c, 60)), from = UInt64(u32(c, 64)), length = Int(u32(c, 68))
                m.place([m.u8(base + offset) &- sum(m.slice(base + from, length))], at: base + offset)
            default:
                XCTFail("unknown command \(u32(c, 0))")
            }
        }
        XCTAssertEqual(placed.count, 2)
        XCTAssertEqual(try XCTUnwrap(placed["etc/acpi/rsdp"]) >> 16, 0xF, "the RSDP in the F segment, where OSes scan")
        let tables = walk(m, rsdp: try XCTUnwrap(placed["etc/acpi/rsdp"]))
        XCTAssertEqual(Set(tables.keys), ["RSDT", "FACP", "APIC", "DSDT", "FACS"])
        XCTAssertEqual(m.u32(tables["FACP"]! + 64), UInt32(ACPIPowerManagement.base) + 4)
    }

    func testFirmwareConfigCarriesTheACPIFiles() {
        let config = FirmwareConfig.standard(ramBelow4G: 64 << 20, ramAbove4G: 0, cpus: 1, bootMenu: false,
                                             bootFailWaitMilliseconds: 0, bootOrder: "")
        for file in ["etc/acpi/rsdp", "etc/acpi/tables", "etc/table-loader"] {
            XCTAssertNotNil(config.selector(ofFile: file), file)
        }
    }

    private func find(_ hay: [UInt8], _ needle: [UInt8]) -> Int? {
        guard hay.count >= needle.count else { return nil }
        return (0...(hay.count - needle.count)).first { Array(hay[$0..<$0 + needle.count]) == needle }
    }
}

/// The SMBIOS files SeaBIOS copies instead of building its own tables (biostables.c).
final class SMBIOSTests: XCTestCase {
    func testAnchorAndStructuresAsSeaBIOSReadsThem() throws {
        let t = SMBIOSTables(cpus: 2)
        let a = t.anchor
        // SeaBIOS takes the anchor only if it is exactly a 2.1-style entry point with "_SM_".
        XCTAssertEqual(a.count, 31)
        XCTAssertEqual(Array(a[0..<4]), Array("_SM_".utf8))
        XCTAssertEqual(a[5], 0x1F, "entry point length")
        XCTAssertEqual([a[6], a[7]], [2, 8], "SMBIOS 2.8")
        XCTAssertEqual(Array(a[16..<21]), Array("_DMI_".utf8))
        // …and the tables file only if its size is the anchor's table length.
        XCTAssertEqual(Int(a[22]) | Int(a[23]) << 8, t.tables.count)
        XCTAssertEqual(Int(a[28]) | Int(a[29]) << 8, t.structureCount)
        XCTAssertEqual(Int(a[8]) | Int(a[9]) << 8, t.largestStructure)

        // Walk the structures as smbios_next does: formatted length, then strings to a double NUL.
        var offset = 0
        var types: [UInt8] = []
        var strings: [[String]] = []
        var handles = Set<Int>()
        while offset < t.tables.count {
            let type = t.tables[offset], length = Int(t.tables[offset + 1])
            XCTAssertGreaterThanOrEqual(length, 4)
            XCTAssertTrue(handles.insert(Int(t.tables[offset + 2]) | Int(t.tables[offset + 3]) << 8).inserted, "unique handles")
            // The string set ends at the first double NUL (just "00 00" when there are none).
            var end = offset + length
            while !(t.tables[end] == 0 && t.tables[end + 1] == 0) { end += 1 }
            let found = t.tables[(offset + length)..<end].split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            end += 2
            types.append(type)
            strings.append(found)
            offset = end
        }
        XCTAssertEqual(offset, t.tables.count, "the structures fill the file exactly")
        XCTAssertEqual(types, [1, 3, 4, 4, 32, 127])
        XCTAssertEqual(types.count, t.structureCount)
        XCTAssertEqual(strings[0], ["hv", "hv virtual machine", "0.1.0"])
        XCTAssertEqual(strings[2], ["CPU 0", "hv"])
        XCTAssertEqual(strings[3], ["CPU 1", "hv"])
        // Type 1 is the 2.4+ layout (27 bytes) with its string indices 1, 2, 3.
        XCTAssertEqual(Array(t.tables[1...8]), [27, 0x00, 0x01, 1, 2, 3, 0, 0])
        XCTAssertFalse(types.contains(0), "type 0 is SeaBIOS's to add")
    }
}

import Glibc
import HVBootLoader
import HVDeviceSDK
import HVIPC
import HVSCSIDisk
import HVSerialUART
import HVSys

/// The device ← guest surface: what a hostile guest can write to a device's registers and put in
/// its own RAM for a device to walk.
enum GuestTargets {
    /// 64 KiB of guest RAM at guest-physical 0, in a memfd as the core hands it over (made once:
    /// a memfd per input would cost more than the walk).
    static let ram: (fd: FileDescriptor, memory: GuestMemory) = {
        do {
            let fd = try MemFD.create(name: "fuzz-guest-ram", size: 1 << 16)
            return (fd, try GuestMemory(fd: fd, regions: [MemoryRegion(guestPhysicalAddress: 0, size: 1 << 16, memfdOffset: 0)]))
        } catch {
            fatalError("cannot make fuzz guest RAM: \(error)")
        }
    }()

    /// A split virtqueue whose rings and descriptors the guest wrote: every chain the device takes
    /// must lie inside guest RAM, and reading, writing and completing it must stay there.
    static let virtqueue = FuzzTarget("virtqueue", covers: "split virtqueue descriptor chains, available and used rings (device ← guest)") { data in
        let memory = ram.memory
        var input = FuzzInput(data)
        let size = UInt16(1) << UInt16(input.u8() % 9)               // 1 … 256
        let table = UInt64(input.integer(UInt16.self)) & ~15
        let avail = UInt64(input.integer(UInt16.self)) & ~1
        let used = UInt64(input.integer(UInt16.self)) & ~3
        let eventIndex = input.bool()
        // The guest's RAM: zeroes, then the rest of the input from the descriptor table on.
        _ = try? memory.zero(at: 0, count: 1 << 16)
        let image = input.rest()
        image.withUnsafeBytes { bytes in
            let n = min(bytes.count, (1 << 16) - Int(table))
            if n > 0 { try? memory.write(UnsafeRawBufferPointer(rebasing: bytes[0..<n]), at: table) }
        }
        guard var queue = SplitVirtqueue(size: size, descriptorTable: table, availableRing: avail, usedRing: used, memory: memory) else { return }
        queue.eventIndex = eventIndex
        for _ in 0..<Int(size) + 2 {
            guard let taken = queue.next(memory) else { break }
            switch taken {
            case .success(let chain):
                // An empty buffer may name any address (nothing is ever read or written there).
                for b in chain.readable + chain.writable where b.length > 0 {
                    FuzzCheck.that(memory.translate(b.address, count: UInt64(b.length)) != nil, "chain buffer outside guest RAM")
                }
                FuzzCheck.that(chain.readable.count + chain.writable.count <= Int(size), "chain longer than the queue")
                _ = chain.readAll(memory, limit: 4096)
                _ = chain.ioVectors(writable: true, skipping: 3, count: min(chain.writableLength, 4096), memory)
                let written = chain.write([UInt8](repeating: 0xA5, count: 64), at: 1, memory)
                queue.complete(head: chain.head, written: UInt32(written), memory)
            case .failure:
                if let head = queue.lastHead { queue.complete(head: head, written: 0, memory) }
            }
            _ = queue.needsInterrupt(memory)
        }
        _ = queue.retake(head: UInt16(truncatingIfNeeded: image.count), memory)
    }

    /// A 1 MiB disk image in a memfd, for the SCSI interpreters.
    static let diskImage: FileDescriptor = {
        do { return try MemFD.create(name: "fuzz-disk", size: 1 << 20) } catch { fatalError("cannot make a fuzz disk: \(error)") }
    }()

    /// One SCSI command after another as the virtio-scsi adapter hands them over: CDB, data-out,
    /// data-in capacity; for READ/WRITE the fast path (planned transfer into the guest's buffers).
    static func runSCSI(_ data: UnsafeRawBufferPointer, execute: ([UInt8], [UInt8], Int) -> SCSIResult,
                        planned: (([UInt8], Int, Int) -> SCSITransfer?)? = nil,
                        transfer: ((SCSITransfer, [iovec]) -> Int32?)? = nil) {
        var input = FuzzInput(data)
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while !input.isAtEnd {
            let cdb = input.bytes(Int(input.u8() % 17))
            let dataOut = input.bytes(Int(input.integer(UInt16.self) % 8193))
            let capacity = Int(input.integer(UInt16.self))
            if let planned, let t = planned(cdb, dataOut.count, capacity) {
                FuzzCheck.that(t.byteCount <= max(capacity, dataOut.count), "planned transfer larger than the guest's buffers")
                guard t.byteCount <= buffer.count else { continue }
                _ = buffer.withUnsafeMutableBytes { b in transfer?(t, [iovec(iov_base: b.baseAddress, iov_len: t.byteCount)]) }
                continue
            }
            let result = execute(cdb, dataOut, capacity)
            FuzzCheck.that(result.dataIn.count <= capacity, "\(result.dataIn.count) bytes of data-in for a capacity of \(capacity)")
        }
    }

    static let scsiDisk = FuzzTarget("scsi-disk", covers: "SCSI block command interpreter: CDBs, data-out (UNMAP, WRITE SAME), READ/WRITE fast path (device ← guest)") { data in
        let readOnly = data.first.map { $0 & 0x80 != 0 } ?? false
        let disk = SCSIDisk(backend: FileBackend(fd: diskImage.rawValue, byteCount: 1 << 20), readOnly: readOnly, serial: "fuzz")
        runSCSI(UnsafeRawBufferPointer(rebasing: data.dropFirst(data.isEmpty ? 0 : 1)),
                execute: disk.execute, planned: disk.plannedTransfer, transfer: disk.transfer)
    }

    static let scsiCDROM = FuzzTarget("scsi-cdrom", covers: "SCSI MMC (CD-ROM) command interpreter, medium present or not (device ← guest)") { data in
        let present = data.first.map { $0 & 1 == 1 } ?? true
        let cd = SCSICDROM(medium: present ? FileBackend(fd: diskImage.rawValue, byteCount: 1 << 20) : nil)
        runSCSI(UnsafeRawBufferPointer(rebasing: data.dropFirst(data.isEmpty ? 0 : 1)), execute: { cdb, out, cap in
            if cdb.first == 0xFF { cd.changeMedium(cd.medium == nil ? FileBackend(fd: diskImage.rawValue, byteCount: 1 << 20) : nil) }
            return cd.execute(cdb, dataOut: out, dataInCapacity: cap)
        })
    }

    /// The 16550A's registers under any sequence of reads, writes and received bytes.
    static let uart = FuzzTarget("uart-16550", covers: "16550A UART registers (serial device ← guest)") { data in
        var uart = UART16550()
        var input = FuzzInput(data)
        while !input.isAtEnd {
            switch input.u8() % 5 {
            case 0: _ = uart.read(offset: input.u8())
            case 1: _ = uart.write(offset: input.u8(), value: input.u8())
            case 2: _ = uart.receive(input.u8())
            case 3: uart.receiveIdle()
            default: uart.sanitize()
            }
        }
    }

    /// The bios device's platform registers: CMOS/RTC, i8042, the i440FX/PIIX config spaces, the
    /// reset control register and ACPI power management, with a clock the input moves.
    static let platform = FuzzTarget("bios-platform", covers: "CMOS/RTC, i8042, PCI host bridge config space, ACPI PM registers (bios device ← guest)") { data in
        var cmos = CMOS(ramBelow4G: 512 << 20, ramAbove4G: 0, cpus: 2)
        var keyboard = I8042()
        var bridge = PCIHostBridge()
        var pm = ACPIPowerManagement()
        var now: Int64 = 1_700_000_000_000_000_000
        var input = FuzzInput(data)
        while !input.isAtEnd {
            let size = 1 << (input.u8() % 3)
            switch input.u8() % 12 {
            case 0: cmos.writeIndex(input.u8())
            case 1: _ = cmos.readIndex()
            case 2: _ = cmos.readData(now: now)
            case 3: cmos.writeData(input.u8(), now: now)
            case 4:
                now &+= Int64(input.integer(UInt32.self))
                cmos.tick(nowNanoseconds: now)
                if let next = cmos.nextInterruptNanoseconds(after: now) { FuzzCheck.that(next > now, "RTC interrupt due in the past") }
            case 5: cmos.sanitize(); keyboard.sanitize()
            case 6: _ = keyboard.writeCommand(input.u8())
            case 7: _ = keyboard.writeData(input.u8()); _ = keyboard.readStatus()
            case 8: _ = keyboard.readData()
            case 9:
                let function = PCIHostBridge.Function.allCases[input.below(3)]
                let register = Int(input.integer(Int16.self))
                if input.bool() { bridge.writeConfig(function, register: register, size: size, value: input.integer(UInt32.self)) }
                else { _ = bridge.readConfig(function, register: register, size: size) }
            case 10: _ = bridge.writeResetControl(input.u8())
            default:
                let offset = Int(input.integer(Int8.self))
                if input.bool() { _ = pm.write(offset: offset, size: size, value: input.integer(UInt32.self)) }
                else { _ = pm.read(offset: offset, size: size, nowNanoseconds: UInt64(now)) }
            }
        }
    }

    /// The item set hv-bios builds (ACPI tables, e820, SMBIOS), made once: building it costs
    /// more than the accesses under test.
    static let firmwareConfigTemplate: FirmwareConfig = {
        var config = FirmwareConfig.standard(ramBelow4G: 1 << 16, ramAbove4G: 0, cpus: 2, bootMenu: false, bootFailWaitMilliseconds: 0, bootOrder: "")
        _ = config.addFile("etc/fuzz", [UInt8](repeating: 0x5A, count: 300))
        return config
    }()

    /// fw_cfg as SeaBIOS and a hostile guest drive it: selector, data port, and DMA descriptors
    /// anywhere in (and beyond) guest RAM. No DMA may touch anything outside RAM.
    static let firmwareConfig = FuzzTarget("fw-cfg", covers: "fw_cfg selector, data port and DMA descriptors (bios device ← guest)") { data in
        var config = firmwareConfigTemplate
        let memory = CheckedRAM(memory: ram.memory)
        _ = try? ram.memory.zero(at: 0, count: 1 << 16)
        var input = FuzzInput(data)
        while !input.isAtEnd {
            let size = 1 << (input.u8() % 4)
            switch input.u8() % 6 {
            case 0: config.writeSelector(input.integer(UInt16.self))
            case 1: _ = config.readData()
            case 2: _ = config.readPort(offset: input.below(16), size: size)
            case 3: config.writePort(offset: input.below(16), size: size, value: input.integer(UInt64.self), memory: memory)
            case 4: _ = config.readDMARegister(offset: input.below(16), size: size)
            default:
                // A DMA descriptor in guest RAM (control, length, address: big-endian), then its address.
                let at = UInt64(input.integer(UInt16.self)) & 0xFFF0
                let descriptor = input.bytes(16)
                descriptor.withUnsafeBytes { try? ram.memory.write($0, at: at) }
                let address = input.bool() ? at : input.integer(UInt64.self)
                config.writeDMARegister(offset: 4, size: 8, value: address.bigEndian, memory: memory)
            }
        }
    }
}

/// fw_cfg's view of guest RAM over the fuzz RAM: every access is checked before it is made.
struct CheckedRAM: GuestMemoryIO {
    let memory: GuestMemory
    func read(into buffer: UnsafeMutableRawBufferPointer, at guestAddress: UInt64) -> Bool {
        (try? memory.read(into: buffer, at: guestAddress)) != nil
    }
    func write(_ bytes: UnsafeRawBufferPointer, at guestAddress: UInt64) -> Bool {
        (try? memory.write(bytes, at: guestAddress)) != nil
    }
}

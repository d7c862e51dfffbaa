// MC146818A real-time clock and CMOS RAM (ports 0x70/0x71, IRQ 8), laid out the way PC firmware (SeaBIOS) reads
// it on a QEMU-like machine.
//
// This runs in the sandboxed bios device and every input (port writes, the clock values it is handed, and the state
// itself when it is restored from a shared page) is untrusted: every field is a plain integer, so any bit pattern is a
// valid value, every register byte is decoded leniently, and all arithmetic on times is saturating or bounded, so no
// input can trap.
//
// Time model: the clock is the host's wall clock (UTC) plus a whole-second guest offset. Time registers are computed
// from the clock on every read, so there is no update cycle to race with and UIP always reads 0. While register B's
// SET bit is 1 the time registers are frozen in CMOS RAM, the guest writes them there, and clearing SET turns them back
// into an offset from the host clock, so the guest's time keeps running from what it set.

/// The MC146818A real-time clock and its 128 bytes of CMOS RAM, as a PC (ports 0x70/0x71, IRQ 8) presents it.
///
/// Registers (index written to port 0x70, data at port 0x71):
/// - 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1 = Sunday), 0x07 day of month, 0x08 month,
///   0x09 year (two digits) and 0x32 century: the host's UTC clock plus the guest's offset, in BCD or binary
///   (register B bit 2) and 24- or 12-hour form (register B bit 1; in 12-hour form hour bit 7 = PM). Writes are
///   ignored unless register B's SET bit (bit 7) is 1.
/// - 0x01, 0x03, 0x05: seconds, minutes and hours alarm; a value with bits 7 and 6 set (0xC0-0xFF) matches anything.
/// - 0x0A register A: bit 7 UIP is always 0 (see `readData(now:)`); bits 6..4 divider (0b010 is the normal
///   32.768 kHz time base, 0b11x holds the divider in reset and stops all flags); bits 3..0 periodic rate.
/// - 0x0B register B: SET, PIE, AIE, UIE, SQWE (stored, no effect), DM, 24/12, DSE (stored, no effect).
/// - 0x0C register C: IRQF, PF, AF, UF; read-only; reading it returns and clears the flags and lowers IRQ 8.
/// - 0x0D register D: read-only, always 0x80 (valid RAM and time).
/// - 0x0E-0x7F: RAM the guest reads and writes freely (0x32, the century, is a time register as above).
///
/// RAM contents at `init`, as SeaBIOS reads them on QEMU (`src/fw/paravirt.c`, `src/boot.c`, `src/clock.c`):
/// - 0x0F shutdown status 0 (normal boot); 0x10 floppy types 0 (none); 0x12 hard-disk types 0 (none).
/// - 0x14 equipment byte 0x06 (`equipmentByte`): math coprocessor present and PS/2 mouse, no floppies: what QEMU
///   writes with no floppy drive. SeaBIOS does not read it (it builds the BIOS data area's equipment word itself);
///   older BIOSes copied it there.
/// - 0x15/0x16 base memory in KiB: 640 (less only if there is less RAM than that below 4 GiB).
/// - 0x17/0x18 and 0x30/0x31 extended memory in KiB above 1 MiB, capped at `extendedMemoryCapKiB`.
/// - 0x34/0x35 RAM between 16 MiB and 4 GiB in 64 KiB units (0 with 16 MiB or less). SeaBIOS sizes RAM from this
///   pair (plus 16 MiB), or from 0x30/0x31 when it is 0, whenever fw_cfg offers no e820 table.
/// - 0x38 and 0x3D boot-order bytes 0: no boot devices named here and bit 0 of 0x38 clear, so SeaBIOS keeps its
///   floppy signature check and takes the boot order from fw_cfg's `bootorder` file or its defaults.
/// - 0x5B/0x5C/0x5D RAM above 4 GiB in 64 KiB units, 24 bits, little-endian (capped at 0xFF_FFFF units).
/// - 0x5F vCPU count minus 1 (the count is clamped to 1...256).
/// - 0x2E/0x2F the standard AT checksum of 0x10-0x2D (sum, high byte first), computed once here.
/// - Every other byte, including the alarm registers, is 0.
///
/// The struct holds only fixed-size integers (no arrays, strings, classes, enums or `Bool`s), so it is
/// `BitwiseCopyable`, can live in a shared state page, and every bit pattern is a value it can operate on without
/// trapping; call `sanitize()` after restoring it from untrusted memory to bring derived fields back to their
/// invariants.
public struct CMOS: Sendable, BitwiseCopyable {
    /// The cap on the extended-memory words at 0x17/0x18 and 0x30/0x31: 65 472 KiB (0xFFC0), the largest multiple of
    /// 64 KiB that fits the 16-bit field, i.e. 64 MiB - 64 KiB above 1 MiB.
    public static let extendedMemoryCapKiB: UInt64 = 0xFFC0
    /// The equipment byte written at 0x14: 0x06, coprocessor (bit 1) and PS/2 mouse (bit 2), no floppy drives
    /// (bits 0 and 7..6 clear), as QEMU sets it.
    public static let equipmentByte: UInt8 = 0x06

    // MARK: State (plain integers only: see the type's documentation)

    /// The 128 bytes of CMOS RAM, in address order. Registers A, B, C and the alarm registers live here; the time
    /// registers hold meaningful values only while register B's SET bit is 1 (they are frozen there).
    private var ram: RAMBytes
    /// The last byte written to port 0x70: bit 7 NMI disable (kept, no effect), bits 6..0 the selected register.
    private var index: UInt8
    /// Bit 0: `lastTickNanoseconds` holds the time of a previous `tick`. Other bits are ignored.
    private var tickFlags: UInt8
    /// Guest time minus host time, in seconds. Kept within ±`Limits.maxOffsetSeconds`.
    private var offsetSeconds: Int64
    /// Host wall-clock time of the previous `tick`, in nanoseconds since the Unix epoch.
    private var lastTickNanoseconds: Int64

    /// Powers on the clock and fills CMOS RAM for a machine with `ramBelow4G` bytes of guest RAM below 4 GiB
    /// (contiguous from 0; values above 4 GiB are treated as 4 GiB), `ramAbove4G` bytes above 4 GiB and `cpus`
    /// vCPUs (clamped to 1...256).
    ///
    /// Register A = 0x26 (32.768 kHz time base, 976.5625 µs periodic rate), B = 0x02 (24-hour, BCD, no interrupts),
    /// C = 0, D = 0x80; the guest offset is 0, so the clock reads the host's UTC time.
    public init(ramBelow4G: UInt64, ramAbove4G: UInt64, cpus: Int) {
        ram = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        index = 0
        tickFlags = 0
        offsetSeconds = 0
        lastTickNanoseconds = 0

        setByte(Register.a, 0x26)
        setByte(Register.b, RegisterB.hour24)
        setByte(Register.c, 0)
        setByte(Register.d, RegisterD.validRAMAndTime)

        let kiB: UInt64 = 1024, miB: UInt64 = 1024 * 1024, unit64KiB: UInt64 = 64 * 1024
        let below = min(ramBelow4G, 1 << 32)
        setWord(Layout.baseMemory, min(below / kiB, 640))
        let extended = below > miB ? min((below - miB) / kiB, Self.extendedMemoryCapKiB) : 0
        setWord(Layout.extendedMemory, extended)
        setWord(Layout.extendedMemoryCopy, extended)
        setWord(Layout.memoryAbove16M, below > 16 * miB ? min((below - 16 * miB) / unit64KiB, 0xFFFF) : 0)
        let high = min(ramAbove4G / unit64KiB, 0xFF_FFFF)
        setByte(Layout.memoryAbove4G, UInt8(truncatingIfNeeded: high))
        setByte(Layout.memoryAbove4G + 1, UInt8(truncatingIfNeeded: high >> 8))
        setByte(Layout.memoryAbove4G + 2, UInt8(truncatingIfNeeded: high >> 16))
        setByte(Layout.cpuCountMinusOne, UInt8(truncatingIfNeeded: max(1, min(cpus, 256)) - 1))
        setByte(Layout.equipment, Self.equipmentByte)
        // 0x0F shutdown status, 0x10 floppies, 0x12 disks, 0x38/0x3D boot order: 0 from the zeroed RAM above.

        var sum: UInt64 = 0
        for address in Layout.checksummedFirst...Layout.checksummedLast { sum += UInt64(byte(address)) }
        setByte(Layout.checksum, UInt8(truncatingIfNeeded: sum >> 8))
        setByte(Layout.checksum + 1, UInt8(truncatingIfNeeded: sum))
    }

    // MARK: Port 0x70

    /// Port 0x70 write: bit 7 = NMI disable (kept, no effect), bits 6..0 select the register (0..127).
    public mutating func writeIndex(_ value: UInt8) {
        index = value
    }

    /// The last byte written to port 0x70, NMI-disable bit included (0 before any write).
    ///
    /// Port 0x70 is write-only on real PCs: this accessor is for the device and for state inspection. A device that
    /// wants to mimic hardware answers guest reads of port 0x70 with 0xFF instead of calling it.
    public func readIndex() -> UInt8 {
        index
    }

    /// Whether the guest's last write to port 0x70 had bit 7 (NMI disable) set. Kept only; it has no effect here.
    public var nmiDisabled: Bool {
        index & 0x80 != 0
    }

    // MARK: Port 0x71

    /// Port 0x71 read of the register selected by the last `writeIndex` (its bits 6..0).
    ///
    /// `now` is the host wall-clock time in seconds since the Unix epoch, UTC (the caller passes it so tests are
    /// deterministic). Time registers are computed from `now` plus the guest offset at every read (or, while
    /// register B's SET bit is 1, read from the frozen copy the guest is editing), clamped to years 0000...9999.
    /// Register A's UIP bit (7) always reads 0: the registers are never mid-update, and firmware that polls UIP with
    /// a timeout (SeaBIOS `rtc_updating`) proceeds at once. Reading register C returns IRQF, PF, AF and UF and then
    /// clears them, lowering `interruptLine`. Call `tick(nowNanoseconds:)` first so the flags are current.
    public mutating func readData(now: Int64) -> UInt8 {
        let register = Int(index & 0x7F)
        switch register {
        case Register.seconds, Register.minutes, Register.hours, Register.dayOfWeek, Register.dayOfMonth,
             Register.month, Register.year, Register.century:
            return timeRegister(register, now: now)
        case Register.a:
            return byte(Register.a) & ~RegisterA.updateInProgress
        case Register.c:
            let value = registerC
            setByte(Register.c, 0)
            return value
        case Register.d:
            return RegisterD.validRAMAndTime
        default:
            return byte(register)
        }
    }

    /// Port 0x71 write to the register selected by the last `writeIndex` (its bits 6..0).
    ///
    /// - Time registers (0x00, 0x02, 0x04, 0x06-0x09, 0x32): stored in the frozen copy while register B's SET bit is
    ///   1. With SET clear the write takes effect at once, as on the chip and in QEMU (SeaBIOS's INT 1Ah time and
    ///   date setters write that way): the running time with that one field replaced becomes the guest time (the day
    ///   of week is recomputed from the date, so writing it alone changes nothing). When SET goes from 1 to 0 the frozen registers are decoded in register B's new format
    ///   (out-of-range fields are clamped, the day of week is recomputed from the date) and the guest offset becomes
    ///   that time minus `now`, so the guest clock keeps running from what it set.
    /// - Register A: bits 6..0 stored (UIP is read-only).
    /// - Register B: stored; writing SET = 1 clears UIE (as on the MC146818A); SET going from 0 to 1 freezes the
    ///   current time (at `now`) into the time registers, in register B's new format.
    /// - Registers C and D: read-only, ignored.
    /// - Everything else, alarm registers included: plain RAM.
    public mutating func writeData(_ value: UInt8, now: Int64) {
        let register = Int(index & 0x7F)
        switch register {
        case Register.seconds, Register.minutes, Register.hours, Register.dayOfWeek, Register.dayOfMonth,
             Register.month, Register.year, Register.century:
            if byte(Register.b) & RegisterB.set != 0 {
                setByte(register, value)
            } else {
                // Freeze the running time, replace the field, and run on from there.
                let format = byte(Register.b)
                freezeTime(now: now, format: format)
                setByte(register, value)
                setOffsetFromFrozenTime(format: format, now: now)
            }
        case Register.a:
            setByte(Register.a, value & ~RegisterA.updateInProgress)
        case Register.b:
            writeRegisterB(value, now: now)
        case Register.c, Register.d:
            break
        default:
            setByte(register, value)
        }
    }

    // MARK: Interrupts and time-driven state

    /// Level of IRQ 8: register C's IRQF, i.e. a periodic, alarm or update-ended flag (PF, AF, UF in register C) is
    /// set while its enable in register B (PIE, AIE, UIE) is set. Reading register C clears the flags and lowers it.
    public var interruptLine: Bool {
        byte(Register.c) & byte(Register.b) & RegisterC.flags != 0
    }

    /// Advances the time-driven state to `nowNanoseconds`, the host wall-clock time in nanoseconds since the Unix
    /// epoch, UTC (the same clock as `now` in `readData(now:)`, at finer resolution).
    ///
    /// For the interval since the previous call, (previous, `nowNanoseconds`], this sets in register C:
    /// - PF if at least one periodic tick falls in it: ticks are at the multiples of the period selected by
    ///   register A bits 3..0 on the 32.768 kHz time base (rate 1 = 3.90625 ms, 2 = 7.8125 ms, 3...15 =
    ///   2^(rate-1) / 32 768 s: 122.070 µs ... 500 ms; 0 = off);
    /// - UF if a second boundary falls in it, unless register B's SET bit is 1 (updates are inhibited);
    /// - AF if, at any second boundary in it (SET clear), the guest time matches the alarm registers, read in
    ///   register B's current format, where a value with bits 7..6 set (0xC0-0xFF) matches anything and a value that
    ///   is not a valid time never matches.
    ///
    /// Flags are set whether or not their interrupt is enabled (as on the chip); `interruptLine` reports the enabled
    /// ones. None are set while register A's divider bits hold the divider in reset (0b11x). Any number of periods or
    /// seconds elapsed collapse into one flag each, as on the chip when register C is not read in time. The first
    /// call (and a call with a time before the previous one) only records the time. Call it before each access to
    /// ports 0x70/0x71 and whenever the device's timer for IRQ 8 expires.
    public mutating func tick(nowNanoseconds: Int64) {
        defer {
            lastTickNanoseconds = nowNanoseconds
            tickFlags = TickFlags.started
        }
        guard tickFlags & TickFlags.started != 0, nowNanoseconds > lastTickNanoseconds else { return }
        let previous = lastTickNanoseconds
        let registerA = byte(Register.a), registerB = byte(Register.b)
        guard registerA & RegisterA.dividerResetMask != RegisterA.dividerResetMask else { return }

        var flags = byte(Register.c) & RegisterC.flags
        if let shift = Self.periodicShift(rate: registerA & RegisterA.rateMask),
           Self.timeBaseCycles(nowNanoseconds) >> shift > Self.timeBaseCycles(previous) >> shift {
            flags |= RegisterC.periodic
        }
        if registerB & RegisterB.set == 0 {
            let previousSecond = Time.floorDivide(previous, Time.nanosecondsPerSecond)
            let nowSecond = Time.floorDivide(nowNanoseconds, Time.nanosecondsPerSecond)
            if nowSecond > previousSecond {
                flags |= RegisterC.updateEnded
                // Both seconds lie within ±9.3e9, so their difference cannot overflow.
                let firstGuestSecond = Time.saturatingAdd(previousSecond + 1, offsetSeconds)
                if alarm(format: registerB).matches(from: firstGuestSecond, count: nowSecond - previousSecond) {
                    flags |= RegisterC.alarm
                }
            }
        }
        setByte(Register.c, flags)
    }

    /// When the device should next call `tick` so that an enabled interrupt reaches IRQ 8 on time:
    /// the next periodic tick if PIE is set, the next second boundary if UIE or AIE is set; nil when
    /// no interrupt is enabled (then nothing needs the device awake).
    public func nextInterruptNanoseconds(after now: Int64) -> Int64? {
        let registerA = byte(Register.a), registerB = byte(Register.b)
        guard registerA & RegisterA.dividerResetMask != RegisterA.dividerResetMask, now >= 0, now < Int64.max / 2 else { return nil }
        var next: Int64?
        // PIE, AIE, UIE sit at the same bit positions as PF, AF, UF in register C.
        if registerB & RegisterC.periodic != 0, let shift = Self.periodicShift(rate: registerA & RegisterA.rateMask) {
            // The first 32.768 kHz cycle count past `now` that is a multiple of the period.
            let period = Int64(1) << shift
            let cycle = (Self.timeBaseCycles(now) / period + 1) * period
            let seconds = cycle / 32_768, remainder = cycle % 32_768
            next = seconds * Time.nanosecondsPerSecond + (remainder * Time.nanosecondsPerSecond + 32_767) / 32_768
        }
        if registerB & (RegisterC.alarm | RegisterC.updateEnded) != 0 {
            let boundary = (Time.floorDivide(now, Time.nanosecondsPerSecond) + 1) * Time.nanosecondsPerSecond
            next = min(next ?? boundary, boundary)
        }
        return next
    }

    // MARK: Restoring

    /// Brings every field back to its invariants after the struct was restored from untrusted memory: register A's
    /// UIP bit and register C's low bits clear, register D = 0x80, the tick bookkeeping flag 0 or 1, the guest
    /// offset within ±2^40 s. Other bytes (RAM, register B, the frozen time registers) are valid whatever they hold.
    /// No operation traps even without this call; it only makes the state one `init` and the port operations could
    /// have produced.
    public mutating func sanitize() {
        setByte(Register.a, byte(Register.a) & ~RegisterA.updateInProgress)
        setByte(Register.c, byte(Register.c) & RegisterC.flags)
        setByte(Register.d, RegisterD.validRAMAndTime)
        tickFlags &= TickFlags.started
        offsetSeconds = Time.clampOffset(offsetSeconds)
    }
}

// MARK: - Registers and layout

extension CMOS {
    /// 128 bytes of CMOS RAM as sixteen words, accessed bytewise in memory order.
    typealias RAMBytes = (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                          UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64)

    enum Register {
        static let seconds = 0x00, secondsAlarm = 0x01, minutes = 0x02, minutesAlarm = 0x03
        static let hours = 0x04, hoursAlarm = 0x05, dayOfWeek = 0x06, dayOfMonth = 0x07, month = 0x08, year = 0x09
        static let a = 0x0A, b = 0x0B, c = 0x0C, d = 0x0D
        static let century = 0x32
    }

    enum RegisterA {
        static let updateInProgress: UInt8 = 0x80
        /// Divider bits 6..5 both set: DV = 0b11x, divider chain held in reset.
        static let dividerResetMask: UInt8 = 0x60
        static let rateMask: UInt8 = 0x0F
    }

    enum RegisterB {
        static let set: UInt8 = 0x80
        static let updateEndedEnable: UInt8 = 0x10
        static let binary: UInt8 = 0x04
        static let hour24: UInt8 = 0x02
    }

    enum RegisterC {
        static let irq: UInt8 = 0x80
        static let periodic: UInt8 = 0x40
        static let alarm: UInt8 = 0x20
        static let updateEnded: UInt8 = 0x10
        /// PF, AF, UF: the same bit positions as PIE, AIE, UIE in register B.
        static let flags: UInt8 = 0x70
    }

    enum RegisterD {
        static let validRAMAndTime: UInt8 = 0x80
    }

    enum TickFlags {
        static let started: UInt8 = 0x01
    }

    /// CMOS RAM addresses of the configuration PC firmware reads.
    enum Layout {
        static let equipment = 0x14
        static let baseMemory = 0x15
        static let extendedMemory = 0x17
        static let checksummedFirst = 0x10, checksummedLast = 0x2D, checksum = 0x2E
        static let extendedMemoryCopy = 0x30
        static let memoryAbove16M = 0x34
        static let memoryAbove4G = 0x5B
        static let cpuCountMinusOne = 0x5F
    }

    // MARK: RAM access (addresses are masked to 0..127, so no access is out of bounds)

    func byte(_ address: Int) -> UInt8 {
        withUnsafeBytes(of: ram) { $0[address & 0x7F] }
    }

    mutating func setByte(_ address: Int, _ value: UInt8) {
        withUnsafeMutableBytes(of: &ram) { $0[address & 0x7F] = value }
    }

    /// Stores the low 16 bits of `value` little-endian at `address`, `address` + 1.
    mutating func setWord(_ address: Int, _ value: UInt64) {
        setByte(address, UInt8(truncatingIfNeeded: value))
        setByte(address + 1, UInt8(truncatingIfNeeded: value >> 8))
    }

    /// Register C as the guest reads it: the flags plus IRQF.
    var registerC: UInt8 {
        let flags = byte(Register.c) & RegisterC.flags
        return interruptLine ? flags | RegisterC.irq : flags
    }

    // MARK: Time registers

    /// Host seconds plus the guest offset, clamped to the years 0000...9999 the registers can show.
    func guestSeconds(now: Int64) -> Int64 {
        min(max(Time.saturatingAdd(now, offsetSeconds), Time.minimumSeconds), Time.maximumSeconds)
    }

    func timeRegister(_ register: Int, now: Int64) -> UInt8 {
        let format = byte(Register.b)
        if format & RegisterB.set != 0 { return byte(register) }
        return Self.encode(register, of: CivilTime(seconds: guestSeconds(now: now)), format: format)
    }

    /// The value of time register `register` for `time` in the BCD/binary and 12/24-hour format of register B
    /// value `format`.
    static func encode(_ register: Int, of time: CivilTime, format: UInt8) -> UInt8 {
        let binary = format & RegisterB.binary != 0
        switch register {
        case Register.seconds: return BCD.encode(time.second, binary: binary)
        case Register.minutes: return BCD.encode(time.minute, binary: binary)
        case Register.hours:
            if format & RegisterB.hour24 != 0 { return BCD.encode(time.hour, binary: binary) }
            let hour12 = time.hour % 12 == 0 ? 12 : time.hour % 12
            return BCD.encode(hour12, binary: binary) | (time.hour >= 12 ? 0x80 : 0)
        case Register.dayOfWeek: return BCD.encode(time.weekday, binary: binary)
        case Register.dayOfMonth: return BCD.encode(time.day, binary: binary)
        case Register.month: return BCD.encode(time.month, binary: binary)
        case Register.year: return BCD.encode(time.year % 100, binary: binary)
        case Register.century: return BCD.encode(time.year / 100, binary: binary)
        default: return 0
        }
    }

    mutating func writeRegisterB(_ value: UInt8, now: Int64) {
        let old = byte(Register.b)
        var new = value
        if new & RegisterB.set != 0 { new &= ~RegisterB.updateEndedEnable }
        if old & RegisterB.set == 0, new & RegisterB.set != 0 {
            freezeTime(now: now, format: new)
        } else if old & RegisterB.set != 0, new & RegisterB.set == 0 {
            setOffsetFromFrozenTime(format: new, now: now)
        }
        setByte(Register.b, new)
    }

    /// Copies the running guest time at `now` into the time registers, in register B value `format`.
    mutating func freezeTime(now: Int64, format: UInt8) {
        let time = CivilTime(seconds: guestSeconds(now: now))
        for register in [Register.seconds, Register.minutes, Register.hours, Register.dayOfWeek,
                         Register.dayOfMonth, Register.month, Register.year, Register.century] {
            setByte(register, Self.encode(register, of: time, format: format))
        }
    }

    /// Makes the time in the registers (read in `format`) the guest time at `now`.
    mutating func setOffsetFromFrozenTime(format: UInt8, now: Int64) {
        let (difference, overflow) = frozenSeconds(format: format).subtractingReportingOverflow(now)
        offsetSeconds = overflow ? (now < 0 ? Time.maxOffsetSeconds : -Time.maxOffsetSeconds)
                                 : Time.clampOffset(difference)
    }

    /// The frozen time registers decoded leniently in register B value `format`: invalid BCD digits count at face
    /// value, then each field is clamped to its range (day to the month's length); the day of week is ignored.
    func frozenSeconds(format: UInt8) -> Int64 {
        let binary = format & RegisterB.binary != 0
        func field(_ register: Int, _ low: Int, _ high: Int) -> Int {
            min(max(BCD.decodeLenient(byte(register), binary: binary), low), high)
        }
        let hourByte = byte(Register.hours)
        let hour: Int
        if format & RegisterB.hour24 != 0 {
            hour = min(BCD.decodeLenient(hourByte, binary: binary), 23)
        } else {
            let hour12 = min(max(BCD.decodeLenient(hourByte & 0x7F, binary: binary), 1), 12)
            hour = hour12 % 12 + (hourByte & 0x80 != 0 ? 12 : 0)
        }
        let year = field(Register.century, 0, 99) * 100 + field(Register.year, 0, 99)
        let month = field(Register.month, 1, 12)
        let day = min(field(Register.dayOfMonth, 1, 31), Time.daysInMonth(year: year, month: month))
        let days = Time.daysFromCivil(year: Int64(year), month: Int64(month), day: Int64(day))
        return days * Time.secondsPerDay + Int64(hour * 3600 + field(Register.minutes, 0, 59) * 60
                                                 + field(Register.seconds, 0, 59))
    }

    // MARK: Periodic interrupt

    /// log2 of the periodic interrupt's period in 32.768 kHz cycles for register A rate `rate` (nil: off).
    static func periodicShift(rate: UInt8) -> Int64? {
        switch rate {
        case 0: return nil
        case 1, 2: return Int64(rate) + 6  // 3.90625 ms and 7.8125 ms, as the datasheet's table gives them.
        default: return Int64(rate & 0x0F) - 1
        }
    }

    /// Whole 32.768 kHz cycles since the epoch at `nanoseconds` (floored; never overflows: |result| < 2^49).
    static func timeBaseCycles(_ nanoseconds: Int64) -> Int64 {
        let seconds = Time.floorDivide(nanoseconds, Time.nanosecondsPerSecond)
        let remainder = Time.floorModulo(nanoseconds, Time.nanosecondsPerSecond)
        return seconds * 32_768 + remainder * 32_768 / Time.nanosecondsPerSecond
    }

    // MARK: Alarm

    func alarm(format: UInt8) -> Alarm {
        let binary = format & RegisterB.binary != 0
        func plain(_ register: Int, limit: Int) -> ClosedRangeOfInt {
            let value = byte(register)
            if value & 0xC0 == 0xC0 { return ClosedRangeOfInt(low: 0, high: limit) }
            guard let decoded = BCD.decodeStrict(value, binary: binary), decoded <= limit else { return .empty }
            return ClosedRangeOfInt(low: decoded, high: decoded)
        }
        let hours: ClosedRangeOfInt
        let hourByte = byte(Register.hoursAlarm)
        if hourByte & 0xC0 == 0xC0 {
            hours = ClosedRangeOfInt(low: 0, high: 23)
        } else if format & RegisterB.hour24 != 0 {
            hours = plain(Register.hoursAlarm, limit: 23)
        } else if let hour12 = BCD.decodeStrict(hourByte & 0x7F, binary: binary), (1...12).contains(hour12) {
            let hour = hour12 % 12 + (hourByte & 0x80 != 0 ? 12 : 0)
            hours = ClosedRangeOfInt(low: hour, high: hour)
        } else {
            hours = .empty
        }
        return Alarm(seconds: plain(Register.secondsAlarm, limit: 59), minutes: plain(Register.minutesAlarm, limit: 59),
                     hours: hours)
    }
}

// MARK: - Helpers

extension CMOS {
    /// An inclusive range of small integers that may be empty (`low > high`), unlike `ClosedRange`, which traps.
    struct ClosedRangeOfInt {
        var low: Int
        var high: Int

        static let empty = ClosedRangeOfInt(low: 1, high: 0)

        var isEmpty: Bool { low > high }
    }

    /// The times of day the alarm registers match: each field is one value, every value (don't care) or none.
    struct Alarm {
        var seconds: ClosedRangeOfInt
        var minutes: ClosedRangeOfInt
        var hours: ClosedRangeOfInt

        /// Whether any of the `count` (≥ 1) consecutive guest seconds starting at `first` (seconds since the epoch)
        /// matches.
        func matches(from first: Int64, count: Int64) -> Bool {
            guard count > 0, !seconds.isEmpty, !minutes.isEmpty, !hours.isEmpty else { return false }
            if count >= Time.secondsPerDay { return true }
            let start = Int(Time.floorModulo(first, Time.secondsPerDay))
            let end = start + Int(count) - 1  // At most 2 * 86 400 - 2.
            if let match = nextMatch(atOrAfter: start), match <= end { return true }
            if end >= Int(Time.secondsPerDay), let match = nextMatch(atOrAfter: 0), match <= end - Int(Time.secondsPerDay) {
                return true
            }
            return false
        }

        /// The first second of the day at or after `secondOfDay` (0..<86 400) that matches, or nil.
        func nextMatch(atOrAfter secondOfDay: Int) -> Int? {
            let startHour = secondOfDay / 3600, startMinute = secondOfDay / 60 % 60, startSecond = secondOfDay % 60
            var hour = max(hours.low, startHour)
            while hour <= hours.high {
                var minute = max(minutes.low, hour == startHour ? startMinute : 0)
                while minute <= minutes.high {
                    let second = max(seconds.low, hour == startHour && minute == startMinute ? startSecond : 0)
                    if second <= seconds.high { return hour * 3600 + minute * 60 + second }
                    minute += 1
                }
                hour += 1
            }
            return nil
        }
    }

    /// BCD (two decimal digits per byte) or binary register values.
    enum BCD {
        /// `value` (0...99; larger values are reduced modulo 100) as a register byte.
        static func encode(_ value: Int, binary: Bool) -> UInt8 {
            let value = ((value % 100) + 100) % 100
            return binary ? UInt8(value) : UInt8(((value / 10) << 4) | (value % 10))
        }

        /// The byte's value with BCD digits 10-15 taken at face value (0...255 binary, 0...165 BCD).
        static func decodeLenient(_ byte: UInt8, binary: Bool) -> Int {
            binary ? Int(byte) : Int(byte >> 4) * 10 + Int(byte & 0x0F)
        }

        /// The byte's value, or nil if it is not valid BCD (in BCD mode).
        static func decodeStrict(_ byte: UInt8, binary: Bool) -> Int? {
            if binary { return Int(byte) }
            guard byte >> 4 <= 9, byte & 0x0F <= 9 else { return nil }
            return Int(byte >> 4) * 10 + Int(byte & 0x0F)
        }
    }

    /// A UTC date and time in the proleptic Gregorian calendar.
    struct CivilTime {
        var year: Int, month: Int, day: Int, hour: Int, minute: Int, second: Int
        /// 1 = Sunday ... 7 = Saturday.
        var weekday: Int

        /// The date and time `seconds` after the Unix epoch; `seconds` must lie within
        /// `Time.minimumSeconds...Time.maximumSeconds` (callers clamp), which keeps every step far from overflow.
        init(seconds: Int64) {
            let days = Time.floorDivide(seconds, Time.secondsPerDay)
            let secondOfDay = Int(Time.floorModulo(seconds, Time.secondsPerDay))
            (year, month, day) = Time.civilFromDays(days)
            hour = secondOfDay / 3600
            minute = secondOfDay / 60 % 60
            second = secondOfDay % 60
            // 1970-01-01 was a Thursday: weekday 5 with Sunday = 1.
            weekday = Int(Time.floorModulo(days + 4, 7)) + 1
        }
    }

    /// Calendar arithmetic (days since 1970-01-01 in the proleptic Gregorian calendar, 400-year eras of 146 097 days)
    /// and overflow-free helpers.
    enum Time {
        static let secondsPerDay: Int64 = 86_400
        static let nanosecondsPerSecond: Int64 = 1_000_000_000
        /// 0000-01-01T00:00:00Z.
        static let minimumSeconds: Int64 = -62_167_219_200
        /// 9999-12-31T23:59:59Z.
        static let maximumSeconds: Int64 = 253_402_300_799
        /// Bound on the guest offset: 2^40 s (about 34 800 years) reaches any year 0000...9999 from any plausible host
        /// time, and keeps host + offset far from overflow for host times within ±2^62.
        static let maxOffsetSeconds: Int64 = 1 << 40

        static func clampOffset(_ offset: Int64) -> Int64 {
            min(max(offset, -maxOffsetSeconds), maxOffsetSeconds)
        }

        static func saturatingAdd(_ a: Int64, _ b: Int64) -> Int64 {
            let (sum, overflow) = a.addingReportingOverflow(b)
            return overflow ? (b < 0 ? .min : .max) : sum
        }

        /// ⌊a / b⌋ for b > 0 (never overflows: Int64.min / b with b > 1 is in range).
        static func floorDivide(_ a: Int64, _ b: Int64) -> Int64 {
            let quotient = a / b
            return a % b < 0 ? quotient - 1 : quotient
        }

        /// a mod b in 0..<b for b > 0.
        static func floorModulo(_ a: Int64, _ b: Int64) -> Int64 {
            let remainder = a % b
            return remainder < 0 ? remainder + b : remainder
        }

        static func isLeapYear(_ year: Int) -> Bool {
            year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
        }

        /// Days in `month` (1...12) of `year`.
        static func daysInMonth(year: Int, month: Int) -> Int {
            switch month {
            case 2: return isLeapYear(year) ? 29 : 28
            case 4, 6, 9, 11: return 30
            default: return 31
            }
        }

        /// (year, month 1...12, day 1...31) of the day `days` after 1970-01-01.
        ///
        /// Shifts the year to start on 1 March, so the leap day is the last day of the shifted year, and splits the day
        /// count into 400-year eras (146 097 days each), the year of the era, the day of the year and the month (a
        /// March-based month has 153 days per 5 months, hence (5 * dayOfYear + 2) / 153).
        static func civilFromDays(_ days: Int64) -> (year: Int, month: Int, day: Int) {
            let shifted = days + 719_468  // Days from 0000-03-01 to 1970-01-01.
            let era = floorDivide(shifted, 146_097)
            let dayOfEra = shifted - era * 146_097  // 0...146 096
            let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365  // 0...399
            let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)  // 0...365, from 1 March
            let marchMonth = (5 * dayOfYear + 2) / 153  // 0 = March ... 11 = February
            let day = dayOfYear - (153 * marchMonth + 2) / 5 + 1
            let month = marchMonth < 10 ? marchMonth + 3 : marchMonth - 9
            let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
            return (Int(year), Int(month), Int(day))
        }

        /// Days from 1970-01-01 to `year`-`month`-`day` (month 1...12, day 1...31; the inverse of `civilFromDays`).
        static func daysFromCivil(year: Int64, month: Int64, day: Int64) -> Int64 {
            let marchYear = month <= 2 ? year - 1 : year
            let era = floorDivide(marchYear, 400)
            let yearOfEra = marchYear - era * 400  // 0...399
            let dayOfYear = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1  // 0...365
            let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear  // 0...146 096
            return era * 146_097 + dayOfEra - 719_468
        }
    }
}

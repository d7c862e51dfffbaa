/// The guest `hvctl run` boots when given no image: a multiboot (a.out-kludge) flat binary,
/// hand-assembled here so hvctl needs no toolchain at run time. It prints `message` through the
/// 16550 at 0x3F8 — polling LSR.THRE before each byte, as a real driver must — then halts with
/// interrupts disabled, which hv treats as power-off.
enum DemoGuest {
    static let loadAddress: UInt32 = 0x0010_0000

    static let message = """

    Hello from hv!

    You are reading a guest running on KVM. Every character it prints is an I/O-port write
    forwarded over a shared-memory ring to hv-serial, a separate device process that emulates
    a 16550A UART.

    The demo guest now halts with interrupts off; hvctl sees that and exits.
    Boot your own multiboot kernel with: hvctl run --multiboot FILE [--cmdline STR]


    """

    static func image() -> [UInt8] {
        let headerSize: UInt32 = 32
        let entry = loadAddress + headerSize
        var code: [UInt8] = []
        func emit(_ bytes: UInt8...) { code += bytes }
        func imm32(_ v: UInt32) { code += withUnsafeBytes(of: v.littleEndian, Array.init) }

        let codeSize: UInt32 = 0x22  // bytes from `entry` to the message, fixed by the listing below
        emit(0xBE); imm32(entry + codeSize)   // 00: mov esi, message
        emit(0xAC)                            // 05: next: lodsb
        emit(0x84, 0xC0)                      // 06: test al, al
        emit(0x74, 0x14)                      // 08: jz done (+0x14 → 1E)
        emit(0x88, 0xC4)                      // 0A: mov ah, al
        emit(0x66, 0xBA, 0xFD, 0x03)          // 0C: mov dx, 0x3FD (LSR)
        emit(0xEC)                            // 10: wait: in al, dx
        emit(0xA8, 0x20)                      // 11: test al, 0x20 (THRE)
        emit(0x74, 0xFB)                      // 13: jz wait
        emit(0x66, 0xBA, 0xF8, 0x03)          // 15: mov dx, 0x3F8 (THR)
        emit(0x88, 0xE0)                      // 19: mov al, ah
        emit(0xEE)                            // 1B: out dx, al
        emit(0xEB, 0xE7)                      // 1C: jmp next (−0x19 → 05)
        emit(0xFA)                            // 1E: done: cli
        emit(0xF4)                            // 1F: hlt
        emit(0xEB, 0xFC)                      // 20: jmp done
        precondition(code.count == Int(codeSize), "demo guest listing and codeSize disagree")
        code += Array(message.utf8) + [0]

        // Multiboot header with the a.out kludge (flag 16): load the whole file at loadAddress.
        let magic: UInt32 = 0x1BAD_B002
        let flags: UInt32 = 1 << 16
        var image: [UInt8] = []
        for word in [magic, flags, 0 &- (magic &+ flags), loadAddress, loadAddress, 0, 0, entry] {
            image += withUnsafeBytes(of: word.littleEndian, Array.init)
        }
        return image + code
    }
}

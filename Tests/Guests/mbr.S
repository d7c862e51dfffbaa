/*
 * hv-mbr: a boot sector for the disk tests. The BIOS (SeaBIOS, through hv's virtio-scsi disk)
 * loads it at 0x7C00; it prints a line through INT 10h (SeaBIOS copies that to the serial port),
 * reads the disk's second sector through INT 13h extended read, prints it (a NUL-terminated
 * string), lets a few timer ticks pass (SeaBIOS's serial console flushes on them), and halts
 * with interrupts off, which ends the VM.
 */
    .code16
    .section .text
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7C00, %sp
    mov %dl, drive
    mov $booted, %si
    call print
    mov $0x42, %ah
    mov drive, %dl
    mov $packet, %si
    int $0x13
    jc failed
    mov $0x8000, %si
    call print
    jmp done
failed:
    mov $readerror, %si
    call print
done:
    /* SeaBIOS's serial console drains its buffer from the timer interrupt: give it a few ticks. */
    mov $8, %cx
    sti
3:  hlt
    loop 3b
    cli
1:  hlt
    jmp 1b

print:
    lodsb
    test %al, %al
    jz 2f
    mov $0x0E, %ah
    mov $0x0007, %bx
    int $0x10
    jmp print
2:  ret

drive:      .byte 0
booted:     .asciz "hv-mbr: booted from the disk\r\n"
readerror:  .asciz "hv-mbr: INT 13h read failed\r\n"
    .balign 4
packet:     .byte 16, 0          /* disk address packet: size, reserved */
            .word 1              /* one sector */
            .word 0x8000, 0x0000 /* to 0000:8000 */
            .quad 1              /* LBA 1 */

    .org 510
    .byte 0x55, 0xAA

    .section .note.GNU-stack, "", @progbits

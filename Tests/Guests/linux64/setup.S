/*
 * hv-bootparams-probe: the real-mode part of a bzImage, reduced to the setup header
 * (Documentation/arch/x86/boot.rst). hv never runs real-mode setup code: a 64-bit loader reads
 * this header and enters the protected-mode part at its start + 0x200. Offsets are the
 * protocol's; .org keeps them exact (the assembler fails if a field overruns).
 */
    .section .setup, "a"
    .org 0x1F1
setup_sects:        .byte 1                   /* real-mode part = (1 + 1) sectors */
root_flags:         .word 0
syssize:            .long probe_syssize       /* protected-mode part in 16-byte units */
ram_size:           .word 0
vid_mode:           .word 0xFFFF
root_dev:           .word 0
boot_flag:          .word 0xAA55
    .org 0x200
jump:               .byte 0xEB, header_end - 0x202
header:             .ascii "HdrS"
version:            .word 0x020F
realmode_swtch:     .long 0
start_sys_seg:      .word 0x1000
kernel_version:     .word 0
type_of_loader:     .byte 0
loadflags:          .byte 0x01                /* LOADED_HIGH */
setup_move_size:    .word 0x8000
code32_start:       .long 0x100000
ramdisk_image:      .long 0
ramdisk_size:       .long 0
bootsect_kludge:    .long 0
heap_end_ptr:       .word 0
ext_loader_ver:     .byte 0
ext_loader_type:    .byte 0
cmd_line_ptr:       .long 0
initrd_addr_max:    .long 0x7FFFFFFF
kernel_alignment:   .long 0x200000
relocatable_kernel: .byte 0
min_alignment:      .byte 21
xloadflags:         .word 0x0001              /* XLF_KERNEL_64 */
cmdline_size:       .long 2047
hardware_subarch:   .long 0
hardware_subarch_data: .quad 0
payload_offset:     .long 0
payload_length:     .long 0
setup_data:         .quad 0
pref_address:       .quad 0x1000000
init_size:          .long probe_init_size
handover_offset:    .long 0
kernel_info_offset: .long 0
header_end:
    .org 0x400

    .section .note.GNU-stack, "", @progbits

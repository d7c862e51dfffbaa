/*
 * The protected-mode part. A real kernel has its 32-bit entry at offset 0 and the 64-bit entry
 * at 0x200; this probe supports only the 64-bit one, so the first 0x200 bytes are HLT.
 */
    .section .head, "ax"
    .code64
    .fill 0x200, 1, 0xF4
    .globl startup_64
startup_64:
    /* RSI = boot_params. Keep the loader's segment state for the report: no reloads here. */
    mov %rsi, %rdi
    lea probe_stack_top(%rip), %rsp
    call probe_main
1:  cli
    hlt
    jmp 1b

    .section .bss
    .balign 16
    .space 16384
probe_stack_top:

    .section .note.GNU-stack, "", @progbits

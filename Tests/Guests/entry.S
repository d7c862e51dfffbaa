/*
 * hv-testguest entry: multiboot header, BSP start-up, AP real-mode
 * trampoline and the shared halt loop. The C side lives in guest.c.
 */

#define MB_MAGIC        0x1BADB002
#define MB_FLAGS        0x00000003      /* page-align modules, want memory info */

#define SEL_CODE        0x08
#define SEL_DATA        0x10

#define BSP_STACK_SIZE  16384
#define AP_STACK_SHIFT  12              /* 4 KiB per AP is plenty for ap_main */
#define MAX_APS         63

/* The trampoline runs from its copy at 0x8000, not from where it is linked. */
#define TRAMP_BASE      0x8000
#define TRAMP(sym)      (TRAMP_BASE + ((sym) - tramp_start))

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl _start
_start:
        /* Multiboot guarantees flat segments but not a usable GDTR or stack. */
        cli
        cld
        lgdt gdt_desc
        ljmp $SEL_CODE, $1f
1:      movl $SEL_DATA, %ecx
        movl %ecx, %ds
        movl %ecx, %es
        movl %ecx, %fs
        movl %ecx, %gs
        movl %ecx, %ss
        movl $bsp_stack_top, %esp
        xorl %ebp, %ebp
        pushl %ebx                      /* multiboot info (physical address) */
        pushl %eax                      /* multiboot magic */
        call kmain
        jmp halt_forever

        /* All vCPUs halted with IF=0 is what the hypervisor treats as power-off. */
        .globl halt_forever
halt_forever:
        cli
        hlt
        jmp halt_forever

/*
 * AP entry: a STARTUP IPI with vector 0x08 starts the AP in real mode at
 * CS=0x0800, IP=0, i.e. at the BSP's copy of this code at 0x8000.
 */
        .code16
        .globl tramp_start, tramp_end
tramp_start:
        cli
        cld
        xorw %ax, %ax
        movw %ax, %ds
        lgdtl TRAMP(tramp_gdt_desc)     /* 32-bit form: 16-bit lgdt drops base bits 31:24 */
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $SEL_CODE, $ap_entry32
tramp_gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt
tramp_end:

        .code32
ap_entry32:
        movl $SEL_DATA, %ecx
        movl %ecx, %ds
        movl %ecx, %es
        movl %ecx, %fs
        movl %ecx, %gs
        movl %ecx, %ss
        /* APs start concurrently, so each claims its own stack by ticket. */
        movl $1, %eax
        lock xaddl %eax, ap_ticket
        cmpl $MAX_APS, %eax
        jae halt_forever
        incl %eax
        shll $AP_STACK_SHIFT, %eax
        leal ap_stacks(%eax), %esp
        xorl %ebp, %ebp
        call ap_main
        jmp halt_forever

        .section .rodata
        .align 8
gdt:
        /* Accessed bits preset so the CPU never writes to the table. */
        .quad 0
        .quad 0x00CF9B000000FFFF        /* SEL_CODE: flat 4 GiB, 32-bit, execute/read */
        .quad 0x00CF93000000FFFF        /* SEL_DATA: flat 4 GiB, read/write */
gdt_end:
        .align 4
gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt

        .bss
        .align 16
bsp_stack:
        .skip BSP_STACK_SIZE
bsp_stack_top:
ap_ticket:
        .skip 4
        .align 16
ap_stacks:
        .skip MAX_APS << AP_STACK_SHIFT

        .section .note.GNU-stack, "", @progbits

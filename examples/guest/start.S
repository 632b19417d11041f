/* Entry of the test guests: a multiboot header (flag 16: with address fields, for the
   a.out-kludge build), a stack, then kmain(eax = magic, ebx = information structure). */
#define FLAGS (0x3 | ADDRESS_FLAG)

    .section .multiboot, "a"
    .align 4
multiboot_header:
    .long 0x1BADB002
    .long FLAGS
    .long -(0x1BADB002 + FLAGS)
#if ADDRESS_FLAG
    .long multiboot_header
    .long _start_of_image
    .long _edata
    .long _end
    .long _start
#endif

    .text
    .globl _start
_start:
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
1:  cli
    hlt
    jmp 1b

    .bss
    .align 16
    .space 16384
stack_top:

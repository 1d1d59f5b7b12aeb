"""`dirty-pages MIB`: the Linux guest's heavy memory load, a static x86-64 program of 185 bytes.

It maps MIB MiB of anonymous memory and then writes a 32-bit word to every page of it, over and
over, each sweep a new non-zero value; once the first sweep is done (every page is real memory),
it writes `swept` to its standard output. One store dirties a whole page, so it dirties pages as
fast as the vCPU can store, far faster than copying them, and every dirty page holds data, never
a page QEMU could send as zero. It exits 1 on a missing or zero size, or when the memory cannot
be mapped.

The value is the whole sweep counter, not its low byte: QEMU's dirty-rate sampling compares
hashes of pages a second apart, and a byte repeats every 128 sweeps (odd values only), so a
guest sweeping a multiple of 128 times a second looked idle.

The guest has no compiler and the build machine needs none: the machine code below is
assembled from this source (GNU as, AT&T syntax), and `elf` wraps it in a minimal ELF header.

        mov (%rsp), %rcx            # argc
        cmp $2, %rcx
        jb exit
        mov 16(%rsp), %rsi          # argv[1], decimal MiB
        xor %eax, %eax
    parse:
        movzbl (%rsi), %edx
        sub $48, %edx
        cmp $9, %edx
        ja parsed
        imul $10, %rax, %rax
        add %rdx, %rax
        inc %rsi
        jmp parse
    parsed:
        shl $20, %rax
        test %rax, %rax
        jz exit
        mov %rax, %r12              # size in bytes
        xor %edi, %edi              # mmap(NULL, size, PROT_READ|PROT_WRITE,
        mov %r12, %rsi              #      MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)
        mov $3, %edx
        mov $0x22, %r10d
        mov $-1, %r8
        xor %r9d, %r9d
        mov $9, %eax
        syscall
        cmp $-4095, %rax
        jae exit
        mov %rax, %rbx
        xor %ecx, %ecx
        xor %r13d, %r13d            # said "swept" yet
    sweep:
        inc %ecx
        or $1, %cl                  # never zero
        xor %edx, %edx
    page:
        mov %ecx, (%rbx,%rdx)
        add $4096, %rdx
        cmp %r12, %rdx
        jb page
        test %r13d, %r13d
        jnz sweep
        inc %r13d
        mov %ecx, %r14d             # syscall clobbers rcx
        mov $1, %eax                # write(1, "swept\n", 6)
        mov $1, %edi
        lea swept(%rip), %rsi
        mov $6, %edx
        syscall
        mov %r14d, %ecx
        jmp sweep
    exit:
        mov $60, %eax               # exit(1)
        mov $1, %edi
        syscall
    swept:
        .ascii "swept\n"
"""

from __future__ import annotations

import struct

__all__ = ["elf"]

CODE = bytes.fromhex(
    "488b0c244883f9020f8299000000488b74241031c00fb61683ea3083fa09770c486bc00a4801d048"
    "ffc6ebe948c1e0144885c074724989c431ff4c89e6ba0300000041ba2200000049c7c0ffffffff45"
    "31c9b8090000000f05483d01f0ffff73464889c331c94531edffc180c90131d2890c134881c20010"
    "00004c39e272f14585ed75e541ffc54189ceb801000000bf01000000488d3518000000ba06000000"
    "0f054489f1ebc2b83c000000bf010000000f0573776570740a"
)
_BASE = 0x400000
_ELF_HEADER = 64
_PROGRAM_HEADER = 56


def elf() -> bytes:
    """The program as an executable: an ELF header, one loadable segment, the code."""
    entry = _BASE + _ELF_HEADER + _PROGRAM_HEADER
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        0x3E,  # x86-64
        1,
        entry,
        _ELF_HEADER,  # program headers follow this header
        0,  # no section headers
        0,
        _ELF_HEADER,
        _PROGRAM_HEADER,
        1,
        0,
        0,
        0,
    )
    size = _ELF_HEADER + _PROGRAM_HEADER + len(CODE)
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return header + segment + CODE

#!/usr/bin/env bash
# Builds hv-testguest (a multiboot v1 ELF32 kernel) as OUTDIR/testguest.elf, and
# hv-bootparams-probe (a 64-bit bzImage-format payload for the Linux boot protocol) as
# OUTDIR/bootparams-probe.bzImage, and a boot sector for the disk tests as OUTDIR/mbr.bin.
# Needs only gcc and binutils: no multilib, libc or libgcc for i386.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
for tool in gcc ld objcopy; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: '$tool' not found; install gcc and binutils to build the test guest" >&2
        exit 1
    fi
done

src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$1
mkdir -p "$out"

cflags=(-m32 -ffreestanding -fno-pic -fno-pie -fno-stack-protector
        -fno-asynchronous-unwind-tables -mno-sse -mno-mmx -nostdlib -O2)

gcc "${cflags[@]}" -c "$src/entry.S" -o "$out/entry.o"
gcc "${cflags[@]}" -c "$src/guest.c" -o "$out/guest.o"
ld -m elf_i386 -T "$src/linker.ld" -nostdlib -o "$out/testguest.elf" "$out/entry.o" "$out/guest.o"

# The 64-bit boot-protocol probe: a flat bzImage-format file (see linux64/linker.ld).
cflags64=(-m64 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -fno-asynchronous-unwind-tables
          -mno-sse -mno-mmx -mno-red-zone -nostdlib -O2)
gcc "${cflags64[@]}" -c "$src/linux64/setup.S" -o "$out/probe-setup.o"
gcc "${cflags64[@]}" -c "$src/linux64/head64.S" -o "$out/probe-head.o"
gcc "${cflags64[@]}" -c "$src/linux64/probe.c" -o "$out/probe.o"
ld -m elf_x86_64 -T "$src/linux64/linker.ld" -nostdlib --no-warn-rwx-segments -o "$out/bootparams-probe.elf" \
    "$out/probe-setup.o" "$out/probe-head.o" "$out/probe.o"
objcopy -O binary "$out/bootparams-probe.elf" "$out/bootparams-probe.bzImage"

# A boot sector for the disk tests (16-bit code at 0x7C00, 512 bytes ending in 55 AA).
gcc -m32 -c "$src/mbr.S" -o "$out/mbr.o"
ld -m elf_i386 -Ttext 0x7C00 -e _start --oformat binary -o "$out/mbr.bin" "$out/mbr.o"

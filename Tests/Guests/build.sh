#!/usr/bin/env bash
# Builds hv-testguest (a multiboot v1 ELF32 kernel) as OUTDIR/testguest.elf.
# Needs only gcc and binutils: no multilib, libc or libgcc for i386.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
for tool in gcc ld; do
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

#!/usr/bin/env bash
# hv's first command on a fresh Debian machine: install what hv needs, build it, and boot the
# built-in demo VM. Extra arguments go to `hvctl run` (e.g. ./install.sh --cpus 2).
set -euo pipefail
cd "$(dirname "$0")"

packages=(gcc binutils libc6-dev bsdutils util-linux pkg-config libseccomp-dev zlib1g-dev libssl-dev seabios)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install.sh: need root to install ${missing[*]} (run with sudo)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "install.sh: the Swift 6 toolchain is not on PATH (see https://swift.org/install)" >&2; exit 1; }

swift build -c release --static-swift-stdlib 2>&1 | grep -vE '^(\[|Building|Compiling|Write|Linking|Planning)' || true
test -x .build/release/hvctl || { echo "install.sh: build failed; run 'swift build -c release' to see why" >&2; exit 1; }
echo "hv built: .build/release/hvctl (devices beside it). Booting the demo VM:" >&2
exec .build/release/hvctl run "$@"

#!/usr/bin/env bash
# hv's whole test suite: unit tests, KVM integration tests with hv's own guests, schema
# conformance, and the benchmark harness's own tests. Needs /dev/kvm and root (or kvm group).
set -euo pipefail
cd "$(dirname "$0")"
log=$(mktemp)
trap 'rm -f "$log" "$log.py"' EXIT

packages=(gcc binutils libc6-dev bsdutils util-linux pkg-config libseccomp-dev zlib1g-dev libssl-dev python3 seabios
          grub-pc-bin grub-common xorriso mtools e2fsprogs iproute2 dnsmasq-base tcpdump iputils-ping qemu-utils qemu-system-x86
          curl socat python3-venv)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Third-party API clients from PyPI, in a venv under .build: schemathesis fuzzes hvd's API
# against api/hvd.yaml; hysn-firecracker-python's client drives hv-firecracker (installed
# without its VM manager's dependencies: the tests use its API client, which needs only
# requests-unixsocket).
if [[ ! -x .build/pyenv/bin/schemathesis || ! -f .build/pyenv/.hv-clients-1 ]]; then
    echo "== installing API clients (schemathesis, hysn-firecracker-python) into .build/pyenv"
    python3 -m venv .build/pyenv
    .build/pyenv/bin/pip install -q --disable-pip-version-check 'schemathesis>=4,<5' 'requests-unixsocket==0.4.1'
    .build/pyenv/bin/pip install -q --disable-pip-version-check --no-deps 'hysn-firecracker-python==1.0.7'
    touch .build/pyenv/.hv-clients-1
fi

echo "== schema vectors are current"
python3 ipc-schema/tools/vectors.py --check

echo "== benchmark harness unit tests"
python3 -m unittest bench/test_bench.py 2>&1 | tee "$log.py" | tail -3

echo "== swift build"
swift build --build-tests 2>&1 | { grep -E 'error|warning: unre|Build' || true; }

echo "== device SDK documentation (DocC; a broken symbol link fails)"
swift package --disable-sandbox generate-documentation --target HVDeviceSDK --warnings-as-errors \
    --output-path .build/sdk-docs 2>&1 | { grep -E 'error|warning|Generated' || true; }
test -d .build/sdk-docs

echo "== swift test"
swift test --skip-build --disable-swift-testing 2>&1 | tee "$log" | grep -vE "^Test Case '.*' (started|passed)"


echo "== fuzz targets: each libFuzzer target for 20 000 executions from a fixed seed on its committed seeds (bench/fuzz --ci)"
python3 bench/fuzz --ci

echo "== benchmark harness end to end (--quick: hv and QEMU side by side; figures, no timing assertions)"
python3 bench/bench.py --quick

# One closing line for the whole suite: XCTest's total plus the harness's unit tests.
xc=$(grep -E "Executed [0-9]+ tests?, with [0-9]+ failures?" "$log" | tail -1 | sed -E 's/.*Executed ([0-9]+) tests?, with ([0-9]+) failures?.*/\1 \2/')
py=$(grep -E "^Ran [0-9]+ tests?" "$log.py" | sed -E 's/Ran ([0-9]+).*/\1/')
set -- $xc
echo "hv: $(( $1 + py )) passed, $2 failed"

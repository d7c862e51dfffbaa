#!/usr/bin/env python3
"""hv benchmarks, side by side with QEMU in the same run.

Usage:
    python3 bench/bench.py [--quick] [--runs N] [--json OUT] [--plot PNG]
                           [--no-build] [--keep-going]

Builds hv in release mode, the hv test guest (Tests/Guests/build.sh) and a
bare-KVM reference program (bench/kvm_exit.c), then runs every case several
times, interleaving hv and QEMU (hv, QEMU, hv, QEMU, ...), and prints one
table: median (min-max) for each side, the hv/QEMU ratio and the target.
BENCHMARKS.md explains each case.

Python 3 standard library only (matplotlib is optional, for --plot).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

GUEST_RAM = "256M"
GUEST_RAM_BYTES = 256 << 20

# Serial markers printed by Tests/Guests/guest.c (a contract with the guest).
MODE_MARKER = b"hv-testguest: mode="
DONE_MARKER = b"hv-testguest: done"
THROUGHPUT_MARKER = b"throughput: bytes="
PIOREAD_RE = re.compile(rb"pioread: count=(\d+) cycles=(\d+)")

# The hv guest-RAM memfd as it appears in /proc/PID/smaps (Sources/HVCore/GuestRAM.swift).
HV_GUEST_RAM_NAME = "/memfd:hv-guest-ram"

# A fresh release build takes a few minutes on 2 cores; far longer means the compiler is stuck.
BUILD_TIMEOUT_S = 1200

QEMU_BASE_ARGS = [
    "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", GUEST_RAM,
    "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
]


# ----------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in bench/test_bench.py)
# ----------------------------------------------------------------------------------------------

def parse_pioread(text: bytes | str) -> Optional[tuple[int, int]]:
    """Returns (count, cycles) from the guest's `pioread: count=N cycles=C` line, or None."""
    if isinstance(text, str):
        text = text.encode()
    m = PIOREAD_RE.search(text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2))


class MarkerScanner:
    """Finds markers in a byte stream that arrives in chunks, recording when each first appears.

    Markers may straddle chunk boundaries. Each marker is recorded once, with the timestamp of
    the chunk that completed it and the stream offset just past its end.
    """

    def __init__(self, markers: Iterable[bytes]):
        self.markers = list(markers)
        self.data = bytearray()
        self.found: dict[bytes, tuple[int, int]] = {}  # marker -> (time_ns, end offset)
        self.first_ns: Optional[int] = None
        self.first_len = 0
        self.last_ns: Optional[int] = None
        self._overlap = max((len(m) for m in self.markers), default=1) - 1

    def feed(self, chunk: bytes, t_ns: int) -> list[bytes]:
        """Adds a chunk received at t_ns; returns the markers it completed."""
        if not chunk:
            return []
        if self.first_ns is None:
            self.first_ns = t_ns
            self.first_len = len(chunk)
        self.last_ns = t_ns
        start = max(0, len(self.data) - self._overlap)
        self.data += chunk
        new = []
        for m in self.markers:
            if m in self.found:
                continue
            i = self.data.find(m, start)
            if i >= 0:
                self.found[m] = (t_ns, i + len(m))
                new.append(m)
        return new

    def time_of(self, marker: bytes) -> Optional[int]:
        hit = self.found.get(marker)
        return hit[0] if hit else None

    def offset_of(self, marker: bytes) -> Optional[int]:
        hit = self.found.get(marker)
        return hit[1] if hit else None


def throughput_bps(scanner: MarkerScanner, end_marker: bytes = THROUGHPUT_MARKER) -> Optional[float]:
    """Bytes per second on the pipe, from the first chunk to the chunk that ends the payload.

    The bytes of the first chunk were already there at the first timestamp, so they are not
    counted; the payload ends where the guest's `throughput: bytes=` line starts.
    """
    end = scanner.found.get(end_marker)
    if end is None or scanner.first_ns is None:
        return None
    t_end, end_off = end
    payload_end = end_off - len(end_marker)
    nbytes = payload_end - scanner.first_len
    dt = (t_end - scanner.first_ns) / 1e9
    if nbytes <= 0 or dt <= 0:
        return None
    return nbytes / dt


@dataclass
class Stats:
    median: float
    min: float
    max: float
    n: int


def summarize(samples: Sequence[float]) -> Optional[Stats]:
    vals = [float(s) for s in samples if s is not None]
    if not vals:
        return None
    return Stats(statistics.median(vals), min(vals), max(vals), len(vals))


def fmt_num(x: float) -> str:
    """Three significant digits, no exponent for the ranges used here."""
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_stats(s: Optional[Stats], unit: str = "") -> str:
    if s is None:
        return "—"
    u = f" {unit}" if unit else ""
    if s.n == 1:
        return f"{fmt_num(s.median)}{u}"
    return f"{fmt_num(s.median)} ({fmt_num(s.min)}–{fmt_num(s.max)}){u}"


def ratio(a: Optional[Stats], b: Optional[Stats]) -> Optional[float]:
    if a is None or b is None or b.median == 0:
        return None
    return a.median / b.median


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "—"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    if r >= 0.1:
        return f"{r:.2f}×"
    return f"{r:.3f}×"


def parse_smaps(text: str) -> list[dict]:
    """Parses /proc/PID/smaps into [{'range', 'name', 'size_kb', 'pss_kb', 'rss_kb'}]."""
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+\S+\s+\S+\s+\S+\s+\S+\s*(.*)$")
    field_re = re.compile(r"^(\w+):\s+(\d+) kB")
    entries: list[dict] = []
    cur: Optional[dict] = None
    for line in text.splitlines():
        h = header.match(line)
        if h:
            cur = {"start": int(h.group(1), 16), "end": int(h.group(2), 16),
                   "name": h.group(3).strip(), "size_kb": 0, "pss_kb": 0, "rss_kb": 0}
            entries.append(cur)
            continue
        f = field_re.match(line)
        if f and cur is not None:
            key, val = f.group(1), int(f.group(2))
            if key == "Size":
                cur["size_kb"] = val
            elif key == "Pss":
                cur["pss_kb"] = val
            elif key == "Rss":
                cur["rss_kb"] = val
    return entries


def parse_rollup_pss(text: str) -> int:
    """Pss in kB from /proc/PID/smaps_rollup."""
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    if not m:
        raise ValueError("no Pss line in smaps_rollup")
    return int(m.group(1))


def pss_of_named(entries: list[dict], name: str) -> int:
    """Total Pss (kB) of the mappings whose path is `name` (a trailing ' (deleted)' allowed)."""
    return sum(e["pss_kb"] for e in entries
               if e["name"] == name or e["name"].startswith(name + " "))


def qemu_ram_block(entries: list[dict], ram_bytes: int = GUEST_RAM_BYTES) -> Optional[dict]:
    """QEMU's guest RAM: the anonymous mapping whose size is RAM (allowing a little alignment)."""
    lo, hi = ram_bytes // 1024, (ram_bytes + (4 << 20)) // 1024
    cands = [e for e in entries if e["name"] == "" and lo <= e["size_kb"] <= hi]
    if not cands:
        return None
    return max(cands, key=lambda e: e["size_kb"])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with a header rule; every cell left-aligned."""
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def line(cells):
        return "  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def verdict(ok: Optional[bool]) -> str:
    return "—" if ok is None else ("yes" if ok else "NO")


# ----------------------------------------------------------------------------------------------
# Running guests
# ----------------------------------------------------------------------------------------------

def now_ns() -> int:
    return time.perf_counter_ns()


@dataclass
class Capture:
    argv: list[str]
    scanner: MarkerScanner
    t_spawn: int
    exit_ns: Optional[int] = None
    returncode: Optional[int] = None
    timed_out: bool = False
    stopped_by_us: bool = False
    probe_result: object = None
    stderr: str = ""

    def since_spawn_ms(self, t: Optional[int]) -> Optional[float]:
        return None if t is None else (t - self.t_spawn) / 1e6

    def head(self, n: int = 200) -> str:
        return bytes(self.scanner.data[:n]).decode(errors="replace")

    def tail(self, n: int = 300) -> str:
        return bytes(self.scanner.data[-n:]).decode(errors="replace")


def peek(f, limit: int = 1 << 20) -> bytes:
    """What a child has written so far to the file `f` it shares with us, read with pread.

    The child writes at the file description's shared offset; seeking and reading here would move
    that offset under it, and a write landing between our seek(0) and read() then overwrites the
    start of its own output (this garbled "idle: ready" in the density case once in tens of runs).
    pread leaves the offset alone."""
    return os.pread(f.fileno(), limit, 0)

class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket: hvd's and hv-firecracker's transport."""

    def __init__(self, path: str, timeout: float = 60):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def unix_http(path: str, method: str, url: str, body: Optional[dict] = None) -> tuple[int, bytes]:
    """One request; the status and the body."""
    conn = UnixHTTPConnection(path)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if payload is not None else {}
        conn.request(method, url, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rss_kib(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def wait_path(path: Path, timeout_s: float, nonempty: bool = False) -> Optional[int]:
    """now_ns() when `path` exists (and has a byte, with `nonempty`), or None on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if path.stat().st_size > 0 or not nonempty:
                return now_ns()
        except OSError:
            pass
        time.sleep(0.0005)
    return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU time so far of every thread of `pids` (/proc/PID/task/TID/schedstat: nanoseconds)."""
    total = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (by scanning /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LiveGuest:
    """A VM running in the background (hv or QEMU); its output lines timestamped as they arrive."""

    def __init__(self, argv: list[str], env: Optional[dict], stamper: Optional[Path] = None):
        """With `stamper` (bench/tsline.c), the output goes through it and each line carries the
        time tsline read it, rather than the time this process's reader thread got to it."""
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env)
        self.stamper = None
        if stamper:
            self.stamper = subprocess.Popen([str(stamper)], stdin=self.proc.stdout, stdout=subprocess.PIPE)
            self.proc.stdout.close()
        self.lines: list[tuple[int, bytes]] = []
        # With a stamper: every piece of output as written (stamp, text, whether it ended a line).
        self.pieces: list[tuple[int, bytes, bool]] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        pending = b""
        unfinished = b""  # with a stamper: the pieces of a line not yet ended
        source = (self.stamper or self.proc).stdout
        while True:
            chunk = os.read(source.fileno(), 65536)
            if not chunk:
                break
            t = now_ns()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            if not self.stamper:
                with self.lock:
                    self.lines += [(t, line) for line in complete]
                continue
            for entry in complete:
                stamp, _, text = entry.partition(b" ")
                ends_line = not text.startswith(b"~")
                if not ends_line:
                    text = text[1:]
                with self.lock:
                    self.pieces.append((int(stamp), text, ends_line))
                    unfinished += text
                    if ends_line:
                        self.lines.append((int(stamp), unfinished))
                        unfinished = b""

    def wait_for(self, prefix: bytes, timeout_s: float) -> Optional[tuple[int, bytes]]:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            with self.lock:
                new = self.lines[seen:]
                seen = len(self.lines)
            for t, line in new:
                if line.startswith(prefix):
                    return t, line
            if self.proc.poll() is not None and not self.reader.is_alive():
                return None
            time.sleep(0.005)
        return None

    def text(self) -> str:
        with self.lock:
            return b"\n".join(line for _, line in self.lines).decode(errors="replace")

    def stop(self) -> None:
        stop(self.proc)
        if self.stamper:
            self.stamper.wait(5)
        self.reader.join(5)


def console_output(pieces: list[tuple[int, bytes, bool]]) -> list[tuple[int, bool]]:
    """When each piece of a guest's console output (`LiveGuest.pieces`, stamped by tsline) was
    written, and whether it ended a line. The VM's own messages share the pipe (hvctl's stderr,
    QEMU's warnings) and are left out; one that cut into a guest line leaves that line's start
    unfinished."""
    out = []
    for t, text, ends_line in pieces:
        for marker in (b"hvctl: ", b"qemu-system"):
            cut = text.find(marker)
            if cut >= 0:
                text, ends_line = text[:cut], False
        if text:
            out.append((t, ends_line))
    return out


def console_pause_ms(source: list[tuple[int, bytes, bool]], dest: list[tuple[int, bytes, bool]],
                     line_interval_ms: float = 2.0) -> Optional[float]:
    """A migration's pause as the guest's console shows it, timed on the host the same way for
    hv and QEMU: from the last output written at the source to the first at the destination,
    less the `line_interval_ms` the guest waits between its lines when the source's last output
    ended a line (stopped inside a line, the guest writes its next byte at once). None until both
    sides have written something."""
    before, after = console_output(source), console_output(dest)
    if not before or not after:
        return None
    (last, ended_line), (first, _) = before[-1], after[0]
    return max((first - last) / 1e6 - (line_interval_ms if ended_line else 0.0), 0.0)


def run_capture(argv: list[str], *, timeout_s: float, markers: Iterable[bytes] = (),
                stop_on: Optional[bytes] = None,
                probe: Optional[tuple[bytes, float, Callable[[int], object]]] = None,
                exit_grace_s: float = 10.0, env: Optional[dict] = None) -> Capture:
    """Spawns argv with stdout on a pipe and watches it.

    The clock starts just before spawn. Stops the process when `stop_on` appears (QEMU never
    exits on a guest halt), or `probe[1]` seconds after `probe[0]` appears, once `probe[2](pid)`
    has run. Otherwise waits for the process to exit by itself (hv exits on a guest halt) and
    records when. Whatever happens, the process is gone on return.
    """
    marks = list(markers)
    for extra in (stop_on, probe[0] if probe else None):
        if extra is not None and extra not in marks:
            marks.append(extra)
    scanner = MarkerScanner(marks)
    errf = tempfile.TemporaryFile()
    t0 = now_ns()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                            cwd=REPO, env=env)
    cap = Capture(argv=argv, scanner=scanner, t_spawn=t0)
    fd = proc.stdout.fileno()
    # A pidfd turns readable when the process exits, so its exit time is as exact as a byte's.
    try:
        pidfd: Optional[int] = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    deadline = t0 + int(timeout_s * 1e9)
    probe_due: Optional[int] = None
    eof = False
    drain_until: Optional[int] = None
    try:
        while True:
            t = now_ns()
            if proc.returncode is None and proc.poll() is not None:
                cap.exit_ns = t
                cap.returncode = proc.returncode
                # stdout may still be held by a device process; drain a little then give up.
                drain_until = t + int(1e9)
                if pidfd is not None:
                    os.close(pidfd)
                    pidfd = None
            if eof or (drain_until is not None and t >= drain_until):
                break
            if probe_due is not None and t >= probe_due:
                cap.probe_result = probe[2](proc.pid)
                cap.stopped_by_us = True
                break
            if t >= deadline:
                cap.timed_out = True
                break
            wait_ns = min(deadline - t, int(50e6))
            if probe_due is not None:
                wait_ns = min(wait_ns, probe_due - t)
            watch = [fd] if pidfd is None else [fd, pidfd]
            r, _, _ = select.select(watch, [], [], max(0, wait_ns) / 1e9)
            if fd not in r:
                continue
            t = now_ns()
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                eof = True
                continue
            new = scanner.feed(chunk, t)
            if stop_on is not None and stop_on in new:
                cap.stopped_by_us = True
                break
            if probe is not None and probe[0] in new:
                probe_due = t + int(probe[1] * 1e9)
        if cap.returncode is None:
            if not (cap.stopped_by_us or cap.timed_out):
                # EOF on stdout: the process should be exiting by itself.
                try:
                    proc.wait(exit_grace_s)
                    cap.exit_ns = now_ns()
                    cap.returncode = proc.returncode
                except subprocess.TimeoutExpired:
                    cap.timed_out = True
    finally:
        if pidfd is not None:
            os.close(pidfd)
        leftovers = descendants(proc.pid) if proc.poll() is None else []
        stop(proc)
        for c in leftovers:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdout.close()
        errf.seek(0)
        cap.stderr = errf.read().decode(errors="replace")
        errf.close()
    return cap


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------

@dataclass
class Env:
    hvctl: Path
    qemu: str
    guest: Path
    kvm_exit: Path
    tsc_hz: float
    tsc_source: str
    tmp: Path


def sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(str(a) for a in argv), flush=True)
    return subprocess.run(argv, check=True, **kw)


def ensure_prerequisites() -> None:
    missing = [t for t in ("qemu-system-x86_64", "gcc", "ld") if shutil.which(t) is None]
    if missing:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            print(f"missing {', '.join(missing)}: installing qemu-system-x86 gcc", flush=True)
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            if subprocess.run(["apt-get", "install", "-y", "qemu-system-x86", "gcc"], env=env).returncode:
                sh(["apt-get", "update"], env=env)
                sh(["apt-get", "install", "-y", "qemu-system-x86", "gcc"], env=env)
        else:
            sys.exit(f"bench: missing {', '.join(missing)}. Install them (Debian: "
                     "`sudo apt-get install -y qemu-system-x86 gcc`) or run this script as root, "
                     "which installs them itself.")
    if shutil.which("swift") is None:
        sys.exit("bench: `swift` not found; hv needs a Swift 6 toolchain on PATH")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("bench: /dev/kvm is missing or not accessible (need read/write access)")


def builds_running() -> list[str]:
    """Other processes that would skew timings: Swift builds (any user)."""
    r = subprocess.run(["pgrep", "-af", "swift-build"], capture_output=True, text=True)
    me = os.getpid()
    return [l for l in r.stdout.splitlines() if l and int(l.split()[0]) != me]


def wait_for_quiet(max_wait_s: float = 900) -> Optional[str]:
    """Waits while a swift build runs (it would skew every timing on 2 cores)."""
    t_end = time.monotonic() + max_wait_s
    said = False
    while True:
        busy = builds_running()
        if not busy:
            return None
        if time.monotonic() >= t_end:
            return f"a swift build was still running after {max_wait_s:.0f} s of waiting: " + busy[0]
        if not said:
            print(f"waiting for a running swift build to finish before timing: {busy[0]}", flush=True)
            said = True
        time.sleep(5)


def build_all(tmp: Path, skip_swift: bool, bin_dir: Optional[str]) -> tuple[Path, Path, Path]:
    if bin_dir:
        bin_dir = Path(bin_dir).resolve()
    else:
        if not skip_swift:
            try:
                sh(["swift", "build", "-c", "release"], cwd=REPO, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                sys.exit(f"bench: `swift build -c release` did not finish in {BUILD_TIMEOUT_S} s (a "
                         "compiler hang?); build elsewhere and pass --bin-dir (see BENCHMARKS.md)")
        bin_dir = Path(subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=REPO,
                                      check=True, capture_output=True, text=True).stdout.strip())
    hvctl = bin_dir / "hvctl"
    for exe in ("hvctl", "hv-serial", "hv-bios"):
        if not (bin_dir / exe).exists():
            sys.exit(f"bench: {bin_dir / exe} is missing; run `swift build -c release`")
    sh([str(REPO / "Tests/Guests/build.sh"), str(tmp)], stdout=subprocess.DEVNULL)
    guest = tmp / "testguest.elf"
    kvm_exit = tmp / "kvm_exit"
    sh(["gcc", "-O2", "-Wall", "-o", str(kvm_exit), str(REPO / "bench/kvm_exit.c")])
    sh(["gcc", "-O2", "-Wall", "-o", str(tmp / "tsline"), str(REPO / "bench/tsline.c")])
    return hvctl, guest, kvm_exit


def parse_kv(text: str) -> dict[str, str]:
    return dict(l.split("=", 1) for l in text.splitlines() if "=" in l)


def tsc_rate(kvm_exit: Path) -> tuple[float, str]:
    """The guest TSC rate: KVM_GET_TSC_KHZ, else host rdtsc over a 100 ms sleep, else cpuinfo."""
    try:
        kv = parse_kv(subprocess.run([str(kvm_exit), "--tsc"], check=True, capture_output=True,
                                     text=True).stdout)
        khz = int(kv.get("tsc_khz_kvm", "0"))
        cal = float(kv.get("tsc_hz_calibrated", "0"))
        if khz > 0:
            note = f"KVM_GET_TSC_KHZ {khz} kHz"
            if cal > 0:
                note += f"; rdtsc over 100 ms sleep: {cal / 1e6:.1f} MHz"
            return khz * 1e3, note
        if cal > 0:
            return cal, "rdtsc over a 100 ms sleep"
    except (subprocess.CalledProcessError, ValueError, OSError):
        pass
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    if m:
        return float(m.group(1)) * 1e6, "/proc/cpuinfo cpu MHz (last resort)"
    sys.exit("bench: cannot determine the TSC rate")


def machine_info() -> dict:
    cpu = "unknown"
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()
    return {
        "cpu": cpu, "kernel": platform.release(), "cores": os.cpu_count(),
        "commit": commit, "dirty": bool(dirty), "qemu": qv[0] if qv else "unknown",
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclass
class Row:
    case: str
    hv: Optional[Stats] = None
    qemu: Optional[Stats] = None
    unit: str = ""
    target: str = ""
    met: Optional[bool] = None
    note: str = ""
    text: Optional[str] = None  # replaces the numbers, e.g. "not yet"
    show_ratio: bool = True

    def cells(self) -> list[str]:
        if self.text is not None:
            return [self.case, self.text, "", "", self.target, self.note]
        r = fmt_ratio(ratio(self.hv, self.qemu)) if self.show_ratio else "—"
        met = verdict(self.met)
        if self.note:
            met = f"{met} ({self.note})" if self.met is not None else self.note
        return [self.case, fmt_stats(self.hv, self.unit), fmt_stats(self.qemu, self.unit), r,
                self.target, met]


TABLE_HEADERS = ["case", "hv median (min–max)", "QEMU median (min–max)", "hv/QEMU", "target", "met"]


class Bench:
    def __init__(self, env: Env, runs: int, quick: bool):
        self.env = env
        self.storm_kills = 100
        self.hostile_ops: Optional[int] = None
        self.hostile_seed: Optional[int] = None
        self.runs = runs
        self.quick = quick
        self.samples: dict[str, dict[str, list]] = {}
        self.problems: list[str] = []
        self.first_bytes: dict[str, str] = {}
        # hvctl looks for sandbox-profiles/ beside itself and above; a --bin-dir outside the
        # repository needs it named.
        self.hv_env = dict(os.environ)
        if "HV_PROFILE_DIR" not in self.hv_env and (REPO / "sandbox-profiles").is_dir():
            self.hv_env["HV_PROFILE_DIR"] = str(REPO / "sandbox-profiles")

    # -- plumbing --

    def hv_argv(self, cmdline: str) -> list[str]:
        return [str(self.env.hvctl), "run", "--multiboot", str(self.env.guest), "--cmdline", cmdline,
                "--memory", GUEST_RAM, "--serial", "stdio"]

    def qemu_argv(self, cmdline: str) -> list[str]:
        return [self.env.qemu, *QEMU_BASE_ARGS, "-kernel", str(self.env.guest), "-append", cmdline]

    def record(self, case: str, side: str, value) -> None:
        self.samples.setdefault(case, {}).setdefault(side, []).append(value)

    def get(self, case: str, side: str) -> Optional[Stats]:
        return summarize([v for v in self.samples.get(case, {}).get(side, []) if v is not None])

    def problem(self, side: str, what: str, cap: Capture) -> None:
        msg = (f"{side} {what}: argv={' '.join(cap.argv[-4:])!r} rc={cap.returncode} "
               f"timed_out={cap.timed_out} output head={cap.head(120)!r} tail={cap.tail(160)!r}")
        if cap.stderr.strip():
            msg += f" stderr={cap.stderr.strip()[-400:]!r}"
        self.problems.append(msg)
        print("  PROBLEM: " + msg, flush=True)

    def guest_run(self, side: str, cmdline: str, timeout_s: float, markers: Sequence[bytes] = (),
                  probe=None) -> Capture:
        if side == "hv":
            cap = run_capture(self.hv_argv(cmdline), timeout_s=timeout_s, markers=markers,
                              probe=probe, env=self.hv_env)
            if probe is None and (cap.returncode != 0 or DONE_MARKER not in cap.scanner.found):
                self.problem("hv", f"did not finish cleanly ({cmdline})", cap)
        else:
            cap = run_capture(self.qemu_argv(cmdline), timeout_s=timeout_s, markers=markers,
                              stop_on=None if probe else DONE_MARKER, probe=probe)
            if probe is None and DONE_MARKER not in cap.scanner.found:
                self.problem("QEMU", f"did not finish ({cmdline})", cap)
        return cap

    def interleaved(self, fn: Callable[[str, int], None], sides=("hv", "qemu"), runs: Optional[int] = None) -> None:
        for i in range(self.runs if runs is None else runs):
            # A swift build (another engineer's, CI's) would skew every timing on 2 cores.
            note = wait_for_quiet()
            if note:
                self.problems.append(note)
            for side in sides:
                fn(side, i)

    # -- warm-up --

    def warm_up(self) -> None:
        print("warm-up (discarded): hello under hv and QEMU", flush=True)
        for side in ("hv", "qemu"):
            self.guest_run(side, "mode=hello", timeout_s=120, markers=[DONE_MARKER])

    # -- a. forwarded PIO read --

    def case_pioread(self) -> list[Row]:
        count = 10000 if self.quick else 100000
        cmd = f"mode=pioread count={count}"
        print(f"case: PIO read round trip ({cmd}), bare exit N={count}", flush=True)
        hz = self.env.tsc_hz

        def one(side, i):
            if side == "bare":
                r = subprocess.run([str(self.env.kvm_exit), str(count)], capture_output=True,
                                   text=True, timeout=600)
                kv = parse_kv(r.stdout)
                if r.returncode != 0 or "ns_per_exit" not in kv:
                    self.problems.append(f"kvm_exit failed: rc={r.returncode} {r.stderr.strip()!r}")
                    v = None
                else:
                    v = float(kv["ns_per_exit"]) / 1e3
                self.record("pioread", "bare", v)
                print(f"  run {i + 1} bare: {v and round(v, 2)} µs/exit", flush=True)
                return
            cap = self.guest_run(side, cmd, timeout_s=60 + count * 100e-6, markers=[DONE_MARKER])
            parsed = parse_pioread(cap.scanner.data)
            v = None
            if parsed is None or parsed[0] != count:
                self.problem(side, "printed no valid pioread line", cap)
            else:
                v = parsed[1] / count / hz * 1e6
            self.record("pioread", side, v)
            # Cross-check of the TSC conversion: host wall time from the guest's first line to
            # its last, which brackets the timed loop (plus printing ~60 bytes).
            t_done = cap.scanner.time_of(DONE_MARKER)
            wall = None
            if t_done is not None and cap.scanner.first_ns is not None:
                wall = (t_done - cap.scanner.first_ns) / 1e3 / count
            self.record("pioread_wall", side, wall)
            print(f"  run {i + 1} {side}: {v and round(v, 2)} µs/access "
                  f"(host wall clock: {wall and round(wall, 2)} µs/access)", flush=True)

        self.interleaved(one, sides=("hv", "qemu", "bare"))
        hv, qemu, bare = (self.get("pioread", s) for s in ("hv", "qemu", "bare"))
        hv_bare = ratio(hv, bare)
        return [
            Row("PIO read round trip, guest inb 0x3FF", hv, qemu, unit="µs", target="hv ≤ 2× bare exit",
                met=None if hv_bare is None else hv_bare <= 2.0,
                note=f"hv/bare {fmt_ratio(hv_bare)}"),
            Row("  bare KVM PIO exit (kvm_exit.c, not hv)", bare, None, unit="µs",
                target="reference", show_ratio=False),
        ]

    # -- b. time to first serial byte / done --

    def case_time_to_x(self) -> list[Row]:
        print("case: launch → first serial byte / done (mode=hello)", flush=True)

        def one(side, i):
            cap = self.guest_run(side, "mode=hello", timeout_s=120, markers=[DONE_MARKER])
            first = cap.since_spawn_ms(cap.scanner.first_ns)
            done = cap.since_spawn_ms(cap.scanner.time_of(DONE_MARKER))
            self.record("first_byte", side, first)
            self.record("done", side, done)
            if side == "hv":
                self.record("exit", side, cap.since_spawn_ms(cap.exit_ns) if cap.returncode == 0 else None)
            self.first_bytes.setdefault(side, cap.head(40))
            print(f"  run {i + 1} {side}: first byte {first and round(first, 1)} ms, "
                  f"done {done and round(done, 1)} ms"
                  + (f", exit {cap.since_spawn_ms(cap.exit_ns) and round(cap.since_spawn_ms(cap.exit_ns), 1)} ms"
                     if side == "hv" else ""), flush=True)

        self.interleaved(one)
        s = {k: (self.get(k, "hv"), self.get(k, "qemu")) for k in ("first_byte", "done")}
        hv_first, q_first = s["first_byte"]
        r = ratio(hv_first, q_first)
        met = None
        if hv_first is not None:
            met = hv_first.median <= 50 and (r is None or r <= 0.1)
        return [
            Row("launch → first serial byte (hello)", hv_first, q_first, unit="ms",
                target="hv ≤ 50 ms and ≤ 0.1× QEMU", met=met),
            Row("launch → 'hv-testguest: done' (hello)", *s["done"], unit="ms", target="—"),
            Row("launch → hvctl exit on guest halt (hello)", self.get("exit", "hv"), None, unit="ms",
                target="— (QEMU does not exit)", show_ratio=False),
        ]

    # -- c. serial throughput --

    def case_throughput(self) -> list[Row]:
        nbytes = 20480 if self.quick else 204800
        cmd = f"mode=throughput bytes={nbytes}"
        print(f"case: serial throughput ({cmd})", flush=True)

        def one(side, i):
            cap = self.guest_run(side, cmd, timeout_s=60 + nbytes * 300e-6,
                                 markers=[THROUGHPUT_MARKER, DONE_MARKER])
            bps = throughput_bps(cap.scanner)
            if bps is None:
                self.problem(side, "no throughput measured", cap)
            else:
                got = cap.scanner.offset_of(THROUGHPUT_MARKER) - len(THROUGHPUT_MARKER) \
                    - len(b"hv-testguest: mode=throughput\n")
                if got != nbytes:
                    self.problem(side, f"payload is {got} bytes, expected {nbytes}", cap)
            self.record("throughput", side, None if bps is None else bps / 1024)
            print(f"  run {i + 1} {side}: {bps and round(bps / 1024, 1)} KiB/s", flush=True)

        self.interleaved(one)
        hv, qemu = self.get("throughput", "hv"), self.get("throughput", "qemu")
        r = ratio(hv, qemu)
        return [Row(f"serial throughput, {nbytes // 1024} KiB polled", hv, qemu, unit="KiB/s",
                    target="hv ≥ QEMU", met=None if r is None else r >= 1.0)]

    # -- memory PSS --

    @staticmethod
    def read_text(path: str) -> Optional[str]:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    def hv_pss(self, pid: int) -> dict:
        total = ram = 0
        procs = []
        for p in [pid, *descendants(pid)]:
            rollup = self.read_text(f"/proc/{p}/smaps_rollup")
            smaps = self.read_text(f"/proc/{p}/smaps")
            comm = (self.read_text(f"/proc/{p}/comm") or "?").strip()
            if rollup is None or smaps is None:
                continue
            pss = parse_rollup_pss(rollup)
            g = pss_of_named(parse_smaps(smaps), HV_GUEST_RAM_NAME)
            procs.append({"pid": p, "comm": comm, "pss_kb": pss, "guest_ram_pss_kb": g})
            total += pss
            ram += g
        return {"total_kb": total, "guest_ram_kb": ram, "processes": procs}

    def qemu_pss(self, pid: int, ram_bytes: int = GUEST_RAM_BYTES) -> dict:
        total = ram = 0
        procs = []
        for p in [pid, *descendants(pid)]:
            rollup = self.read_text(f"/proc/{p}/smaps_rollup")
            smaps = self.read_text(f"/proc/{p}/smaps")
            if rollup is None or smaps is None:
                continue
            pss = parse_rollup_pss(rollup)
            block = qemu_ram_block(parse_smaps(smaps), ram_bytes) if p == pid else None
            g = block["pss_kb"] if block else 0
            if p == pid and block is None:
                self.problems.append(f"QEMU: no anonymous ~{ram_bytes >> 20} MiB mapping found in smaps")
            procs.append({"pid": p, "comm": (self.read_text(f"/proc/{p}/comm") or "?").strip(),
                          "pss_kb": pss, "guest_ram_pss_kb": g,
                          "ram_block_kb": block["size_kb"] if block else None})
            total += pss
            ram += g
        return {"total_kb": total, "guest_ram_kb": ram, "processes": procs}

    def case_memory(self) -> list[Row]:
        # pioread with a count far beyond the sampling point keeps the 256 MiB VM running
        # (each access is an exit: several µs here) while printing nothing until the end.
        cmd = "mode=pioread count=4000000000"
        settle = 1.0
        print(f"case: memory PSS, {GUEST_RAM} guest, sampled {settle:.0f} s after the guest's "
              f"first line ({cmd})", flush=True)

        def one(side, i):
            fn = self.hv_pss if side == "hv" else self.qemu_pss
            cap = self.guest_run(side, cmd, timeout_s=120, markers=[MODE_MARKER],
                                 probe=(MODE_MARKER, settle, fn))
            res = cap.probe_result
            if not isinstance(res, dict) or res["total_kb"] == 0:
                self.problem(side, "was not running when PSS was to be sampled", cap)
                res = None
            elif DONE_MARKER in cap.scanner.data:
                self.problem(side, "guest finished before PSS was sampled", cap)
            self.record("pss_total", side, res and res["total_kb"] / 1024)
            self.record("pss_excl", side, res and (res["total_kb"] - res["guest_ram_kb"]) / 1024)
            self.record("pss_detail", side, res)
            if res:
                who = ", ".join(f"{p['comm']} {p['pss_kb'] / 1024:.1f}" for p in res["processes"])
                print(f"  run {i + 1} {side}: total {res['total_kb'] / 1024:.1f} MiB, guest RAM "
                      f"{res['guest_ram_kb'] / 1024:.1f} MiB [{who}]", flush=True)

        self.interleaved(one)
        ex_hv, ex_q = self.get("pss_excl", "hv"), self.get("pss_excl", "qemu")
        r = ratio(ex_hv, ex_q)
        return [
            Row("memory PSS, all VMM processes, 256 MiB guest", self.get("pss_total", "hv"),
                self.get("pss_total", "qemu"), unit="MiB", target="—"),
            Row("memory PSS excluding guest RAM", ex_hv, ex_q, unit="MiB", target="hv < QEMU",
                met=None if r is None else r < 1.0),
        ]

    # -- sandbox cost (issue #5): the same hv case with and without the jail --

    def case_sandbox(self) -> list[Row]:
        count = 10000 if self.quick else 100000
        print(f"case: sandbox cost: launch → first byte and PIO round trip (count={count}), "
              "jailed vs --no-sandbox", flush=True)

        def one(side, i):
            extra = [] if side == "hv" else ["--no-sandbox"]
            cap = run_capture(self.hv_argv("mode=hello") + extra, timeout_s=120, markers=[DONE_MARKER], env=self.hv_env)
            first = cap.since_spawn_ms(cap.scanner.first_ns)
            self.record("sb_first", side, first)
            cap = run_capture(self.hv_argv(f"mode=pioread count={count}") + extra, timeout_s=120,
                              markers=[DONE_MARKER], env=self.hv_env)
            parsed = parse_pioread(cap.scanner.data)
            v = parsed[1] / count / self.env.tsc_hz * 1e6 if parsed and parsed[0] == count else None
            self.record("sb_pio", side, v)
            print(f"  run {i + 1} {side}: first byte {first and round(first, 1)} ms, {v and round(v, 2)} µs/access",
                  flush=True)

        self.interleaved(one, sides=("hv", "hv-unsandboxed"))
        f_sb, f_no = self.get("sb_first", "hv"), self.get("sb_first", "hv-unsandboxed")
        p_sb, p_no = self.get("sb_pio", "hv"), self.get("sb_pio", "hv-unsandboxed")
        extra = f"+{f_sb.median - f_no.median:.1f} ms" if f_sb and f_no else "?"
        return [
            Row("sandbox cost: first byte, jailed vs --no-sandbox", f_sb, f_no, unit="ms",
                target="report (2 jailed devices)", note=f"{extra} for jailing; QEMU column = unsandboxed hv"),
            Row("sandbox cost: PIO round trip, jailed vs unjailed", p_sb, p_no, unit="µs",
                target="≈ 1× (seccomp off the hot path)", note="QEMU column = unsandboxed hv"),
        ]

    # -- plugins (issue #19): a forwarded register read served by a device in each language --

    def case_plugins(self) -> list[Row]:
        """The same guest read loop (`mode=pioread`) against hv-serial and against a plugin in
        Swift on hv's SDK (the test device hv-rogue-device, harmless without attack=), in C
        (Plugins/examples/c-rng, built here with gcc) and in Python (Plugins/examples/python-counter),
        every one jailed. Reported per read, with each plugin's ratio to hv-serial."""
        count = 5000 if self.quick else 50000
        print(f"case: plugin round trip: forwarded register read (count={count}), hv-serial vs Swift, C and Python plugins",
              flush=True)
        work = Path(tempfile.mkdtemp(prefix="hvbench-plugins-"))
        try:
            shutil.copytree(REPO / "Plugins/examples/c-rng", work / "c-rng")
            sh(["gcc", "-O2", "-Wall", "-o", str(work / "c-rng/rng"), str(work / "c-rng/rng.c")])
            rogue = self.env.hvctl.parent / "hv-rogue-device"
            devices = {
                "serial": ([], ""),
                "swift": (["--device", f"{rogue},profile={REPO / 'Tests/RogueDevice/rogue.json'},pio=0x520:4"], " port=0x520"),
                "c": (["--device", str(work / "c-rng/manifest.json")], " port=0x550"),
                "python": (["--device", str(REPO / "Plugins/examples/python-counter/manifest.json")], " port=0x530"),
            }

            def one(side, i):
                extra, port = devices[side]
                cap = run_capture(self.hv_argv(f"mode=pioread count={count}{port}") + extra, timeout_s=300,
                                  markers=[DONE_MARKER], env=self.hv_env)
                parsed = parse_pioread(cap.scanner.data)
                v = parsed[1] / count / self.env.tsc_hz * 1e6 if parsed and parsed[0] == count else None
                if v is None:
                    self.problem(side, "printed no valid pioread line", cap)
                self.record("plugin_read", side, v)
                print(f"  run {i + 1} {side}: {v and round(v, 2)} µs/read", flush=True)

            self.interleaved(one, sides=tuple(devices))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        serial = self.get("plugin_read", "serial")
        return [Row(f"plugin register read: {label} plugin vs hv-serial", self.get("plugin_read", side), serial, unit="µs",
                    target="report", note="QEMU column = hv-serial (Swift, hv's own device)")
                for side, label in (("swift", "Swift (SDK)"), ("c", "C"), ("python", "Python"))]

    # -- scale (part 1): VMs started per second, back to back --

    def case_vm_rate(self) -> list[Row]:
        n = 5 if self.quick else 20
        print(f"case: VMs started per second ({n} hello VMs back to back, launch → exit)", flush=True)

        def one(side, i):
            if side != "hv":
                return
            start = now_ns()
            ok = 0
            for _ in range(n):
                cap = run_capture(self.hv_argv("mode=hello"), timeout_s=120, markers=[DONE_MARKER], env=self.hv_env)
                ok += cap.returncode == 0
            rate = n / ((now_ns() - start) / 1e9) if ok == n else None
            self.record("vm_rate", "hv", rate)
            print(f"  run {i + 1}: {rate and round(rate, 1)} VMs/s", flush=True)

        self.interleaved(one, sides=("hv",))
        return [Row("VMs started per second (sequential, full life)", self.get("vm_rate", "hv"), None,
                    unit="VM/s", target="≫ QEMU (QEMU: <1/s, ≈3.6 s to first byte)", show_ratio=False)]

    # -- scale (part 2): how many idle VMs run at once --

    def case_vms_at_once(self) -> list[Row]:
        cap = 8 if self.quick else 100
        print(f"case: VMs running at once (idle guests, 32 MiB each, up to {cap}), and 'hvctl ls' over them", flush=True)

        def one(side, i):
            if side != "hv":
                return
            procs, outs = [], []
            up = 0
            idle_cpu = None
            # Their own run directory, so 'hvctl ls' sees exactly these VMs.
            env = dict(self.hv_env, HV_RUN_DIR=str(self.env.tmp / f"run-at-once-{i}"))
            try:
                for k in range(cap):
                    out = tempfile.TemporaryFile()
                    err = tempfile.TemporaryFile()
                    argv = [str(self.env.hvctl), "run", "--multiboot", str(self.env.guest), "--cmdline", "mode=idle",
                            "--memory", "32M", "--serial", "stdio"]
                    procs.append(subprocess.Popen(argv, stdout=out, stderr=err,
                                                  stdin=subprocess.DEVNULL, env=env))
                    outs += [out, err]
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        if b"idle: ready" in peek(out) or procs[-1].poll() is not None:
                            break
                        time.sleep(0.005)
                    if b"idle: ready" not in peek(out):
                        # Say why: what hvctl printed, and whether it is still running.
                        state = "still running" if procs[-1].poll() is None else f"exit status {procs[-1].poll()}"
                        said = " | ".join(peek(err).decode(errors="replace").strip().splitlines()[-3:]) or "nothing on stderr"
                        self.problems.append(f"VM {k + 1} did not come up within 30 s ({state}; stdout {peek(out)[-80:]!r}; "
                                             f"stderr: {said}); stopped at {up} VMs")
                        break
                    up += 1
                alive = sum(p.poll() is None for p in procs)
                pss = sum(self.hv_pss(p.pid)["total_kb"] for p in procs if p.poll() is None) / 1024
                # What they cost while idle: the CPU time of all their processes over a few
                # seconds (the halt monitor's probes are most of it: issue 21).
                window = 5 if self.quick else 20
                pids = [q for p in procs if p.poll() is None for q in (p.pid, *descendants(p.pid))]
                before, t0 = cpu_seconds(pids), time.monotonic()
                time.sleep(window)
                idle_cpu = 100 * (cpu_seconds(pids) - before) / (time.monotonic() - t0) / max(alive, 1)
                self.record("at_once_cpu", "hv", idle_cpu)
                # The operator's view of them all: `hvctl ls` asks every VM's control socket.
                for argv in (["ls"], ["ls", "--json"]):
                    t0 = now_ns()
                    listed = subprocess.run([str(self.env.hvctl)] + argv, capture_output=True, env=env, timeout=120)
                    ms = (now_ns() - t0) / 1e6
                    rows = listed.stdout.decode(errors="replace").count('"uptime_seconds"') if argv[-1] == "--json" \
                        else len(listed.stdout.splitlines()) - 1
                    ok = listed.returncode == 0 and rows == alive
                    self.record("ls_json_ms" if argv[-1] == "--json" else "ls_ms", "hv", ms if ok else None)
                    if not ok:
                        self.problems.append(f"hvctl {' '.join(argv)} listed {rows} of {alive} VMs (exit {listed.returncode})")
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                clean = 0
                for p in procs:
                    try:
                        clean += p.wait(timeout=30) == 128 + signal.SIGTERM
                    except subprocess.TimeoutExpired:
                        p.kill()
                for o in outs:
                    o.close()
                if clean != len(procs):
                    self.problems.append(f"{len(procs) - clean} of {len(procs)} VMs did not stop cleanly on SIGTERM")
            self.record("at_once", "hv", alive if alive == up else None)
            self.record("at_once_pss", "hv", pss / max(alive, 1))
            print(f"  run {i + 1}: {up} started, {alive} alive together, {pss:.0f} MiB PSS in all "
                  f"({pss / max(alive, 1):.1f} MiB per VM), {'?' if idle_cpu is None else round(idle_cpu, 3)} % of a core per idle VM, {clean} stopped cleanly", flush=True)

        self.interleaved(one, sides=("hv",))
        return [
            Row(f"VMs running at once (idle, 32 MiB; cap {cap})", self.get("at_once", "hv"), None, unit="VMs",
                target="all up to the cap", show_ratio=False,
                met=None if self.get("at_once", "hv") is None else self.get("at_once", "hv").min >= cap),
            Row("  PSS per running VM (all its processes)", self.get("at_once_pss", "hv"), None, unit="MiB",
                target="report", show_ratio=False),
            Row("  CPU per idle VM (1 vCPU; all its processes)", self.get("at_once_cpu", "hv"), None, unit="% core",
                target="≤ 0.05 % per idle vCPU (issue 21)", show_ratio=False,
                met=None if self.get("at_once_cpu", "hv") is None else self.get("at_once_cpu", "hv").median <= 0.05),
            Row(f"  'hvctl ls' with them all running", self.get("ls_ms", "hv"), None, unit="ms",
                target="report", show_ratio=False),
            Row(f"  'hvctl ls --json' with them all running", self.get("ls_json_ms", "hv"), None, unit="ms",
                target="report", show_ratio=False),
        ]

    # -- noisy neighbour (issue #23): a victim's round trips beside a tenant burning CPU --

    @staticmethod
    def cpu_cgroup(name: str, quota_cpus: float) -> Optional[Path]:
        """A cgroup with a CPU quota (v1 cpu hierarchy or v2), below this process's own group,
        for QEMU processes to be held to the same limit as `hvctl run --cpu-quota`."""
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        v1 = next((l.split(":", 2)[2] for l in lines if ":cpu," in l or ":cpu:" in l or l.split(":")[1:2] == ["cpu,cpuacct"]), None)
        if v1 is not None and Path("/sys/fs/cgroup/cpu/cgroup.procs").exists():
            d = Path("/sys/fs/cgroup/cpu" + v1.rstrip("/")) / name
            d.mkdir(exist_ok=True)
            (d / "cpu.cfs_period_us").write_text("100000")
            (d / "cpu.cfs_quota_us").write_text(str(int(quota_cpus * 100000)))
            return d
        v2 = next((l.split(":", 2)[2] for l in lines if l.startswith("0::")), None)
        if v2 is not None and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            d = Path("/sys/fs/cgroup" + v2.rstrip("/")) / name
            d.mkdir(exist_ok=True)
            (d / "cpu.max").write_text(f"{int(quota_cpus * 100000)} 100000")
            return d
        return None

    def case_noisy(self) -> list[Row]:
        """A victim tenant's round trips beside a noisy one, with and without limits on the noisy
        one. Victim: its PIO round trip (`mode=pioread`, a forwarded register access), its disk's
        4 KiB read round trip at queue depth 1 (`mode=vscsilat`), and (hv only: QEMU's NICs need a
        bridge) a VM→VM ping over a private segment (`mode=netping`, guest-timed). Noisy tenant:
        a VM spinning its vCPU (`mode=spin`), a VM reading its disk flat out (`mode=vscsibench`
        over a sparse 1 GiB image), and (hv) a VM blasting UDP at a sink on a segment of its own.
        Conditions: the victim alone; beside the noisy tenant unlimited; beside it limited (hv:
        `--cpu-quota 0.2`, `--disk …,bps=4M`, `--nic …,tx_pps=2000`; QEMU: the spinning VM in a
        cgroup with the same CFS quota, the disk with `throttling.bps-total=4194304`)."""
        pio_count = 20000 if self.quick else 100000
        lat_count = 300 if self.quick else 1000
        pings = 50 if self.quick else 200
        quota = 0.2
        print(f"case: noisy neighbour: victim PIO (count={pio_count}), disk QD1 4 KiB reads ({lat_count}) and VM→VM ping ({pings}, hv) "
              f"alone, beside a noisy tenant, and beside it limited", flush=True)
        run_dir = self.env.tmp / "noisy-run"
        run_dir.mkdir(exist_ok=True)
        env = dict(self.hv_env, HV_RUN_DIR=str(run_dir))
        victim_disk = self.env.tmp / "noisy-victim.img"
        with open(victim_disk, "wb") as f:
            for k in range(16):
                f.write(bytes([k + 1]) * (1 << 20))
        hog_disk = self.env.tmp / "noisy-hog.img"
        with open(hog_disk, "wb") as f:
            f.truncate(1 << 30)
        # QEMU's two noisy VMs share one group: twice the quota, as two hv VMs at `quota` each.
        group = self.cpu_cgroup(f"hv-bench-noisy-{os.getpid()}", 2 * quota)
        if group is None:
            self.problems.append("noisy: no cpu cgroup to hold QEMU's spinning neighbour to a quota")
        seg_victim, seg_noisy = f"net=nv{os.getpid()}", f"net=nn{os.getpid()}"

        def hv_vm(cmd: str, name: str, extra: list[str]) -> LiveGuest:
            argv = [str(self.env.hvctl), "run", "--multiboot", str(self.env.guest), "--cmdline", cmd, "--memory", "32M",
                    "--serial", "stdio", "--name", name, *extra]
            return LiveGuest(argv, env)

        def qemu_vm(cmd: str, extra: list[str]) -> LiveGuest:
            argv = [self.env.qemu, *[x if x != GUEST_RAM else "32M" for x in QEMU_BASE_ARGS], "-kernel", str(self.env.guest),
                    "-append", cmd, *extra]
            return LiveGuest(argv, None)

        def qemu_disk(path: Path, throttle: bool) -> list[str]:
            drive = f"file={path},if=none,id=d0,format=raw,cache=writeback,readonly=on" + (",throttling.bps-total=4194304" if throttle else "")
            return ["-device", "virtio-scsi-pci,disable-legacy=on,addr=0x4,id=scsi0", "-drive", drive, "-device", "scsi-hd,drive=d0,bus=scsi0.0"]

        def neighbours(side: str, i: int, limited: bool) -> Optional[list[LiveGuest]]:
            """The noisy tenant's CPU and disk VMs (each held to the quota when `limited`)."""
            cpu = ["--cpu-quota", str(quota)] if limited else []
            if side == "hv":
                vms = [hv_vm("mode=spin", f"spin{i}", cpu),
                       hv_vm("mode=vscsibench count=1024", f"hog{i}", cpu + ["--disk", f"{hog_disk},readonly" + (",bps=4M" if limited else "")])]
            else:
                vms = [qemu_vm("mode=spin", []), qemu_vm("mode=vscsibench count=1024", qemu_disk(hog_disk, limited))]
            if not all(g.wait_for(r, 60) for g, r in zip(vms, [b"spin: ready", b"bench: seqread start"])):
                return None
            if side == "qemu" and limited and group is not None:
                for g in vms:
                    (group / "cgroup.procs").write_text(str(g.proc.pid))
            return vms

        def net_neighbours(i: int, limited: bool) -> Optional[list[LiveGuest]]:
            """hv's noisy tenant's NIC pair on a segment of its own: a blaster and its sink."""
            cpu = ["--cpu-quota", str(quota)] if limited else []
            vms = [hv_vm("mode=netsink ip=10.8.0.2 port=5001", f"sink{i}", cpu + ["--nic", f"{seg_noisy},mac=52:54:00:00:0e:02"])]
            if vms[0].wait_for(b"net: nic0 mac", 60) is None:
                return vms
            vms.append(hv_vm("mode=netblast ip=10.8.0.1 peer=10.8.0.2 count=100000000 size=1000 port=5001", f"blast{i}",
                             cpu + ["--nic", f"{seg_noisy},mac=52:54:00:00:0e:01" + (",tx_pps=2000" if limited else "")]))
            return vms if vms[1].wait_for(b"bench: net tx start", 60) else None

        def one(side, i):
            for condition in ("alone", "noisy", "limited"):
                noisy: list[LiveGuest] = []
                try:
                    if condition != "alone":
                        started = neighbours(side, i, condition == "limited")
                        if started is None:
                            self.problems.append(f"noisy: the {side} noisy tenant did not start ({condition})")
                            return
                        noisy += started
                    cap = self.guest_run(side, f"mode=pioread count={pio_count}", timeout_s=300, markers=[DONE_MARKER])
                    parsed = parse_pioread(cap.scanner.data)
                    pio = parsed[1] / pio_count / self.env.tsc_hz * 1e6 if parsed and parsed[0] == pio_count else None
                    self.record(f"noisy_pio_{condition}", side, pio)
                    cmd = f"mode=vscsilat count={lat_count} size=16"
                    if side == "hv":
                        disk = hv_vm(cmd, f"victim{i}", ["--disk", f"{victim_disk},readonly"])
                    else:
                        disk = qemu_vm(cmd, qemu_disk(victim_disk, False))
                    try:
                        end = disk.wait_for(b"bench: disklat end", 180)
                        m = re.search(rb"median=(\d+) p90=(\d+) p99=(\d+) errors=0", end[1]) if end else None
                        self.record(f"noisy_disk_{condition}", side, float(m.group(1)) if m else None)
                        self.record(f"noisy_disk99_{condition}", side, float(m.group(3)) if m else None)
                        if m is None:
                            self.problems.append(f"noisy: {side} victim disk ({condition}): {disk.text()[-200:]!r}")
                    finally:
                        disk.stop()
                    rtt = None
                    if side == "hv":
                        if condition != "alone":
                            started = net_neighbours(i, condition == "limited")
                            noisy += started or []
                            if started is None:
                                self.problems.append(f"noisy: the hv noisy tenant's NICs did not start ({condition})")
                        peer = hv_vm("mode=netpeer ip=10.9.0.2", f"peer{i}", ["--nic", f"{seg_victim},mac=52:54:00:00:0d:02"])
                        pinger = None
                        try:
                            if peer.wait_for(b"net: nic0 mac", 60):
                                pinger = hv_vm(f"mode=netping ip=10.9.0.1 peer=10.9.0.2 count={pings}", f"pinger{i}",
                                               ["--nic", f"{seg_victim},mac=52:54:00:00:0d:01"])
                                if pinger.wait_for(b"net: ping done", 180):
                                    times = [int(t) for t in re.findall(r"time=(\d+) us", pinger.text())]
                                    rtt = statistics.median(times) if times else None
                        finally:
                            peer.stop()
                            if pinger:
                                pinger.stop()
                        self.record(f"noisy_net_{condition}", side, rtt)
                    print(f"  run {i + 1} {side} {condition}: PIO {pio and round(pio, 2)} µs, disk {m and m.group(1).decode()} µs "
                          f"(p99 {m and m.group(3).decode()}), ping {rtt} µs", flush=True)
                finally:
                    for g in noisy:
                        g.stop()

        try:
            self.interleaved(one, runs=1 if self.quick else None)
        finally:
            if group is not None:
                try:
                    group.rmdir()
                except OSError as e:
                    self.problems.append(f"noisy: cannot remove {group}: {e}")
            for f in (victim_disk, hog_disk):
                f.unlink(missing_ok=True)
        rows = []
        for key, what, unit, noise in [("pio", "PIO round trip", "µs", "CPU, disk"), ("disk", "disk 4 KiB read round trip (median)", "µs", "CPU, disk"),
                                       ("disk99", "disk 4 KiB read round trip (p99)", "µs", "CPU, disk"),
                                       ("net", "VM→VM ping (median; hv only)", "µs", "CPU, disk, NIC")]:
            alone = self.get(f"noisy_{key}_alone", "hv")
            for condition, label, target in [
                ("alone", f"noisy neighbour: victim's {what}, alone", "≤ QEMU"),
                ("noisy", f"  beside a noisy tenant ({noise}), no limits", "report"),
                ("limited", "  beside it limited (0.2 CPU a VM, 4 MiB/s disk, 2000 pps)", "≤ 1.5× alone"),
            ]:
                hv, q = self.get(f"noisy_{key}_{condition}", "hv"), self.get(f"noisy_{key}_{condition}", "qemu")
                row = Row(label, hv, q, unit=unit, target=target if q is not None or condition != "alone" else "report")
                if condition == "alone" and q is not None:
                    row.met = None if hv is None else hv.median <= q.median
                elif condition == "limited":
                    row.met = None if hv is None or alone is None else hv.median <= 1.5 * alone.median
                    row.note = "" if hv is None or alone is None else f"{hv.median / alone.median:.2f}× alone"
                rows.append(row)
        return rows

    # -- density (issue #23): idle 64 MiB guests before and after ballooning --

    def case_density(self) -> list[Row]:
        """N idle 64 MiB guests that each wrote `fill` MiB, hv (hv-balloon, `hvctl balloon`)
        against QEMU (virtio-balloon-pci, QMP `balloon`), the same guest driving both balloons
        (hv's test guest, `mode=balloon`): PSS per VM with everything the guest wrote resident,
        then once each balloon holds all but 1 MiB of it; and what that makes VMs per GiB."""
        n = 2 if self.quick else 8
        fill = 4 if self.quick else 8
        take = fill - 1
        ready = b"balloon: ready"
        run_dir = self.env.tmp / "density-run"
        run_dir.mkdir(exist_ok=True)
        env = dict(self.hv_env, HV_RUN_DIR=str(run_dir))
        print(f"case: density: {n} idle 64 MiB guests that wrote {fill} MiB each, PSS per VM before and after "
              f"ballooning {take} MiB (hv-balloon vs QEMU's virtio-balloon-pci)", flush=True)

        def one(side, i):
            guests: list[LiveGuest] = []
            qmps: list[str] = []
            names = [f"dense{i}-{k}" for k in range(n)]
            try:
                for k in range(n):
                    if side == "hv":
                        argv = [str(self.env.hvctl), "run", "--multiboot", str(self.env.guest), "--cmdline", f"mode=balloon count={fill}",
                                "--memory", "64M", "--serial", "stdio", "--balloon", "on", "--name", names[k]]
                    else:
                        qmp = str(self.env.tmp / f"qmp-dense-{i}-{k}.sock")
                        qmps.append(qmp)
                        argv = [self.env.qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", "64M", "-nodefaults",
                                "-display", "none", "-no-reboot", "-serial", "stdio", "-device", "virtio-balloon-pci,disable-legacy=on",
                                "-qmp", f"unix:{qmp},server=on,wait=off", "-kernel", str(self.env.guest), "-append", f"mode=balloon count={fill}"]
                    guests.append(LiveGuest(argv, env if side == "hv" else None))
                if not all(g.wait_for(ready, 120) for g in guests):
                    self.problems.append(f"density: a {side} guest's balloon driver did not start: "
                                         f"{[g.text()[-200:] for g in guests if ready not in g.text().encode()]}")
                    return
                time.sleep(0.5)
                pss = self.hv_pss if side == "hv" else (lambda pid: self.qemu_pss(pid, 64 << 20))
                before = sum(pss(g.proc.pid)["total_kb"] for g in guests) / 1024 / n
                for k, g in enumerate(guests):
                    if side == "hv":
                        r = subprocess.run([str(self.env.hvctl), "balloon", names[k], f"{take}M", "--wait"], capture_output=True, env=env,
                                           timeout=120)
                        if r.returncode != 0:
                            self.problems.append(f"density: hvctl balloon {names[k]}: {r.stderr.decode(errors='replace').strip()}")
                            return
                    else:
                        # QEMU's balloon takes the guest's memory size, not the balloon's.
                        self.qmp(qmps[k], {"execute": "balloon", "arguments": {"value": (64 - take) << 20}})
                        deadline = time.monotonic() + 60
                        while self.qmp(qmps[k], {"execute": "query-balloon"})[0].get("return", {}).get("actual") != (64 - take) << 20:
                            if time.monotonic() > deadline:
                                self.problems.append(f"density: QEMU's balloon did not reach {take} MiB within 60 s")
                                return
                            time.sleep(0.05)
                time.sleep(0.5)
                after = sum(pss(g.proc.pid)["total_kb"] for g in guests) / 1024 / n
                self.record("dense_before", side, before)
                self.record("dense_after", side, after)
                self.record("dense_per_gib", side, 1024 / after)
                print(f"  run {i + 1} {side}: PSS per VM {before:.1f} MiB before, {after:.1f} MiB after ballooning {take} MiB "
                      f"({1024 / after:.0f} VMs per GiB)", flush=True)
            finally:
                for g in guests:
                    g.stop()
                for q in qmps:
                    if os.path.exists(q):
                        os.unlink(q)

        self.interleaved(one)
        return [
            Row(f"density: PSS per idle 64 MiB VM ({fill} MiB written)", self.get("dense_before", "hv"), self.get("dense_before", "qemu"),
                unit="MiB", target="≤ QEMU", met=None if self.get("dense_before", "hv") is None or self.get("dense_before", "qemu") is None
                else self.get("dense_before", "hv").median <= self.get("dense_before", "qemu").median),
            Row(f"  after ballooning {take} MiB of it", self.get("dense_after", "hv"), self.get("dense_after", "qemu"), unit="MiB",
                target=f"≤ QEMU, ≈ {take} MiB less", met=None if self.get("dense_after", "hv") is None or self.get("dense_after", "qemu") is None
                else self.get("dense_after", "hv").median <= self.get("dense_after", "qemu").median),
            Row("  64 MiB VMs per GiB of host memory, ballooned", self.get("dense_per_gib", "hv"), self.get("dense_per_gib", "qemu"),
                unit="VMs", target="≥ QEMU", met=None if self.get("dense_per_gib", "hv") is None or self.get("dense_per_gib", "qemu") is None
                else self.get("dense_per_gib", "hv").median >= self.get("dense_per_gib", "qemu").median),
        ]

    # -- SeaBIOS (issue #3): the same firmware image under both VMMs --

    def case_seabios(self) -> list[Row]:
        banner, nobootable = b"SeaBIOS (version", b"No bootable device"
        bios = "/usr/share/seabios/bios-256k.bin"
        if not os.path.exists(bios):
            return [self.not_yet("SeaBIOS banner", "≤ 0.5× QEMU", "Debian's seabios package is not installed")]
        print("case: SeaBIOS banner and 'No bootable device' (no disks)", flush=True)

        def one(side, i):
            if side == "hv":
                argv = [str(self.env.hvctl), "run", "--firmware", bios, "--memory", GUEST_RAM, "--serial", "stdio"]
                cap = run_capture(argv, timeout_s=120, markers=[banner, nobootable], stop_on=nobootable, env=self.hv_env)
            else:
                # -nographic makes QEMU tell SeaBIOS (fw_cfg) to use the serial console, as hv does.
                argv = [self.env.qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", GUEST_RAM,
                        "-nodefaults", "-nographic", "-serial", "stdio", "-bios", bios]
                cap = run_capture(argv, timeout_s=120, markers=[banner, nobootable], stop_on=nobootable)
            b = cap.since_spawn_ms(cap.scanner.time_of(banner))
            n = cap.since_spawn_ms(cap.scanner.time_of(nobootable))
            if b is None or n is None:
                self.problem(side, "SeaBIOS did not reach 'No bootable device'", cap)
            self.record("sb_banner", side, b)
            self.record("sb_noboot", side, n)
            print(f"  run {i + 1} {side}: banner {b and round(b)} ms, no bootable device {n and round(n)} ms", flush=True)

        self.interleaved(one)
        rows = []
        for key, name in (("sb_banner", "SeaBIOS banner"), ("sb_noboot", "SeaBIOS 'No bootable device'")):
            hv, q = self.get(key, "hv"), self.get(key, "qemu")
            r = ratio(hv, q)
            rows.append(Row(name, hv, q, unit="ms", target="hv ≤ 0.5× QEMU", met=None if r is None else r <= 0.5))
        return rows

    # -- ISO → GRUB (issue #4): the same GRUB ISO from a virtio-scsi CD-ROM under both VMMs --

    def case_grub(self) -> list[Row]:
        name, target = "ISO boot to GRUB prompt (virtio-scsi CD)", "hv ≤ 0.5× QEMU"
        if self.quick:
            return [self.not_yet(name, target, "skipped by --quick: about a minute per boot on this machine")]
        tools = [t for t in ("grub-mkrescue", "xorriso", "mformat") if shutil.which(t) is None]
        if tools:
            return [self.not_yet(name, target, f"{', '.join(tools)} not installed (apt-get install grub-pc-bin xorriso mtools)")]
        print("case: ISO boot to GRUB's prompt from a virtio-scsi CD-ROM (SeaBIOS → El Torito → GRUB)", flush=True)
        work = self.env.tmp / "grub"
        (work / "iso/boot/grub").mkdir(parents=True, exist_ok=True)
        (work / "iso/boot/grub/grub.cfg").write_text(
            "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
            "set timeout=0\necho \"hv-grub: prompt\"\nhalt\n")
        iso = work / "grub.iso"
        subprocess.run(["grub-mkrescue", "-o", str(iso), str(work / "iso")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bios = "/usr/share/seabios/bios-256k.bin"
        marker = b"hv-grub: prompt"

        def one(side, i):
            if side == "hv":
                argv = [str(self.env.hvctl), "run", "--firmware", bios, "--memory", GUEST_RAM, "--serial", "stdio",
                        "--cdrom", str(iso)]
                cap = run_capture(argv, timeout_s=300, markers=[marker], stop_on=marker, env=self.hv_env)
            else:
                argv = [self.env.qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", GUEST_RAM,
                        "-nodefaults", "-nographic", "-serial", "stdio", "-bios", bios,
                        "-device", "virtio-scsi-pci,id=scsi0,disable-legacy=on",
                        "-drive", f"if=none,id=cd,file={iso},format=raw,media=cdrom,readonly=on",
                        "-device", "scsi-cd,drive=cd,bus=scsi0.0,bootindex=0"]
                cap = run_capture(argv, timeout_s=300, markers=[marker], stop_on=marker)
            t = cap.since_spawn_ms(cap.scanner.time_of(marker))
            if t is None:
                self.problem(side, "GRUB did not reach its prompt", cap)
            self.record("grub", side, t)
            print(f"  run {i + 1} {side}: GRUB prompt at {t and round(t)} ms", flush=True)

        self.interleaved(one, runs=min(self.runs, 2))
        hv, q = self.get("grub", "hv"), self.get("grub", "qemu")
        r = ratio(hv, q)
        return [Row(name, hv, q, unit="ms", target=target, met=None if r is None else r <= 0.5)]

    # -- virtio-scsi disk, as the guest sees it --

    # The guest's vscsibench phases (mode=vscsibench), their markers and their row names.
    VSCSIBENCH_PHASES = ("seqread", "seqwrite", "randread")
    VSCSIBENCH_NAMES = {"seqread": ("sequential read, 256 KiB × 4 in flight", "MiB/s"),
                        "seqwrite": ("sequential write, 256 KiB × 4 in flight", "MiB/s"),
                        "randread": ("random 4 KiB read, 4 in flight", "IOPS")}
    VSCSIBENCH_CLEAN = b"bench: errors=0\n"
    VSCSIBENCH_MARKS = {p: (f"bench: {p} start\n".encode(), f"bench: {p} end\n".encode()) for p in VSCSIBENCH_PHASES}
    VSCSIBENCH_ALL_MARKS = [m for pair in VSCSIBENCH_MARKS.values() for m in pair] + [VSCSIBENCH_CLEAN, DONE_MARKER]

    def vscsibench_passes(self) -> int:
        """Sequential passes over the disk per phase: one pass over 64 MiB lasts ~50 ms (16 MiB,
        `--quick`: ~12 ms), too short to time steadily on a shared machine (±25 % run to run)."""
        return 8

    def vscsibench_values(self, side: str, cap: Capture, mib: int, passes: int) -> dict:
        """MiB/s (or IOPS) per phase from one vscsibench run's markers; None where it failed."""
        clean = self.VSCSIBENCH_CLEAN
        if clean not in cap.scanner.found:
            self.problem(side, "vscsibench did not finish without errors", cap)
        values = {}
        for p in self.VSCSIBENCH_PHASES:
            t0, t1 = (cap.scanner.time_of(m) for m in self.VSCSIBENCH_MARKS[p])
            ok = t0 is not None and t1 is not None and t1 > t0 and clean in cap.scanner.found
            amount = mib * 256 if p == "randread" else mib * passes
            # The guest's own TSC timing of the phase when it has one: the markers' host
            # timestamps also count how late the serial device wrote them.
            m = re.search(rb"bench: " + p.encode() + rb" us=(\d+)\n", bytes(cap.scanner.data))
            seconds = int(m.group(1)) / 1e6 if m and int(m.group(1)) > 0 else ((t1 - t0) / 1e9 if ok else None)
            values[p] = amount / seconds if ok and seconds else None
        return values

    def case_scsi(self) -> list[Row]:
        mib = 16 if self.quick else 64
        print(f"case: virtio-scsi disk seen by the guest (mode=vscsibench: {self.vscsibench_passes()} passes over {mib} MiB of "
              f"sequential reads and writes in 256 KiB requests, {mib * 256} random 4 KiB reads, 4 in flight; mode=vscsilat: "
              f"4 KiB reads and writes one at a time), QEMU (virtio-scsi-pci + scsi-hd) and the host reading and writing "
              f"the same image file", flush=True)
        image = self.env.tmp / "scsi-bench.img"
        with open(image, "wb") as f:
            f.write(os.urandom(mib << 20))
        phases, all_marks = self.VSCSIBENCH_PHASES, self.VSCSIBENCH_ALL_MARKS
        passes = self.vscsibench_passes()
        cmd = f"mode=vscsibench count={mib} passes={passes}"

        def host_side():
            # The same requests from a host process on the same file (page cache warm, as the guests' is).
            fd = os.open(image, os.O_RDWR)
            try:
                chunk, small = bytearray(256 << 10), bytearray(4096)
                t0 = time.perf_counter()
                for off in range(0, (mib << 20) * passes, len(chunk)):
                    os.preadv(fd, [chunk], off % (mib << 20))
                t1 = time.perf_counter()
                for off in range(0, (mib << 20) * passes, len(chunk)):
                    os.pwritev(fd, [chunk], off % (mib << 20))
                t2 = time.perf_counter()
                rng = random.Random(12345)
                blocks = (mib << 20) // 4096
                for _ in range(mib * 256):
                    os.preadv(fd, [small], rng.randrange(blocks) * 4096)
                t3 = time.perf_counter()
            finally:
                os.close(fd)
            return {"seqread": mib * passes / (t1 - t0), "seqwrite": mib * passes / (t2 - t1), "randread": mib * 256 / (t3 - t2)}

        def run_on(side, guest_cmd, markers):
            if side == "hv":
                return run_capture(self.hv_argv(guest_cmd) + ["--disk", str(image)], timeout_s=180, markers=markers, env=self.hv_env)
            argv = self.qemu_argv(guest_cmd) + [
                "-device", "virtio-scsi-pci,disable-legacy=on,addr=0x4,id=scsi0",
                "-drive", f"file={image},if=none,id=d0,format=raw,cache=writeback",
                "-device", "scsi-hd,drive=d0,bus=scsi0.0"]
            return run_capture(argv, timeout_s=180, markers=markers, stop_on=DONE_MARKER)

        def one(side, i):
            if side == "host":
                values = host_side()
            else:
                values = self.vscsibench_values(side, run_on(side, cmd, all_marks), mib, passes)
            for p in phases:
                self.record(f"scsi_{p}", side, values[p])
            if side != "host":
                values.update(self.disk_round_trips(side, run_on, mib, "scsi"))
            print(f"  run {i + 1} {side}: " + ", ".join(
                f"{p} {round(v) if v else v}{' IOPS' if p == 'randread' else ' µs' if 'QD1' in p else ' MiB/s'}" for p, v in values.items()), flush=True)

        self.interleaved(one, sides=("hv", "qemu", "host"))
        rows = []
        names = self.VSCSIBENCH_NAMES
        for p in phases:
            hv, q, host = (self.get(f"scsi_{p}", side) for side in ("hv", "qemu", "host"))
            share = None if hv is None or host is None else hv.median / host.median
            target = "hv ≥ 80% of the host" + (f" ({host.median:.0f} {names[p][1]})" if host else "")
            rows.append(Row(f"virtio-scsi {names[p][0]}", hv, q, unit=names[p][1], target=target,
                            met=None if share is None else share >= 0.8,
                            note="" if share is None else f"{share * 100:.0f}% of the host"))
        return rows + self.round_trip_rows("scsi", "virtio-scsi", "hv", "≤ QEMU")

    def disk_round_trips(self, side: str, run_on, mib: int, prefix: str) -> dict:
        """One 4 KiB READ at a time, then one WRITE (`mode=vscsilat`, timed by the guest from its
        kick to the completion): each kind's median round trip in µs, recorded as
        PREFIX_lat_read and PREFIX_lat_write. `run_on(side, guest_cmd, markers)` runs the guest."""
        lat_count = 500 if self.quick else 2000
        values = {}
        for kind, extra in (("read", ""), ("write", " write=1")):
            cap = run_on(side, f"mode=vscsilat count={lat_count} size={mib}{extra}", [DONE_MARKER])
            m = re.search(rb"disklat end count=\d+ median=(\d+) p90=\d+ p99=\d+ errors=0", bytes(cap.scanner.data))
            if m is None:
                self.problem(side, f"vscsilat ({kind}s) did not finish without errors", cap)
            values[f"{kind} QD1"] = float(m.group(1)) if m else None
            self.record(f"{prefix}_lat_{kind}", side, values[f"{kind} QD1"])
        return values

    def round_trip_rows(self, prefix: str, label: str, hv_side: str, target: str, raw_side: Optional[str] = None) -> list[Row]:
        """Rows for `disk_round_trips`' samples: `hv_side` against QEMU (lower is better)."""
        rows = []
        for kind in ("read", "write"):
            hv, q = self.get(f"{prefix}_lat_{kind}", hv_side), self.get(f"{prefix}_lat_{kind}", "qemu")
            raw = self.get(f"{prefix}_lat_{kind}", raw_side) if raw_side else None
            rows.append(Row(f"{label} 4 KiB {kind} round trip, 1 in flight", hv, q, unit="µs", target=target,
                            met=None if hv is None or q is None else hv.median <= q.median,
                            note="" if raw is None else f"hv raw {raw.median:.0f} µs"))
        return rows

    def case_qcow2(self) -> list[Row]:
        """The same guest disk workload as case_scsi on a qcow2 image (fully allocated, converted
        from the same random data): hv's qcow2 path against its raw path and against QEMU's qcow2;
        then one 4 KiB request at a time (`mode=vscsilat`, reads and writes), the round trip a
        request pays when nothing overlaps it."""
        mib = 16 if self.quick else 64
        passes = self.vscsibench_passes()
        print(f"case: qcow2 disk (mode=vscsibench count={mib} passes={passes}; mode=vscsilat, reads and writes) — "
              f"hv raw, hv qcow2 and QEMU qcow2 on copies of one image", flush=True)
        raw = self.env.tmp / "qcow2-bench.img"
        with open(raw, "wb") as f:
            f.write(os.urandom(mib << 20))
        images = {}
        for side in ("hv-qcow2", "qemu"):
            images[side] = self.env.tmp / f"qcow2-bench-{side}.qcow2"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(images[side])], check=True)
        phases, all_marks = self.VSCSIBENCH_PHASES, self.VSCSIBENCH_ALL_MARKS
        cmd = f"mode=vscsibench count={mib} passes={passes}"

        def run_on(side, guest_cmd, markers):
            if side == "qemu":
                argv = self.qemu_argv(guest_cmd) + [
                    "-device", "virtio-scsi-pci,disable-legacy=on,addr=0x4,id=scsi0",
                    "-drive", f"file={images[side]},if=none,id=d0,format=qcow2,cache=writeback",
                    "-device", "scsi-hd,drive=d0,bus=scsi0.0"]
                return run_capture(argv, timeout_s=180, markers=markers, stop_on=DONE_MARKER)
            image = raw if side == "hv-raw" else images[side]
            return run_capture(self.hv_argv(guest_cmd) + ["--disk", str(image)], timeout_s=180, markers=markers, env=self.hv_env)

        def one(side, i):
            values = self.vscsibench_values(side, run_on(side, cmd, all_marks), mib, passes)
            for p in phases:
                self.record(f"qcow2_{p}", side, values[p])
            values.update(self.disk_round_trips(side, run_on, mib, "qcow2"))
            print(f"  run {i + 1} {side}: " + ", ".join(
                f"{p} {round(v) if v else v}{' IOPS' if p == 'randread' else ' µs' if 'QD1' in p else ' MiB/s'}" for p, v in values.items()), flush=True)

        self.interleaved(one, sides=("hv-raw", "hv-qcow2", "qemu"))
        rows = []
        names = self.VSCSIBENCH_NAMES
        for p in phases:
            hv, q, hv_raw = (self.get(f"qcow2_{p}", side) for side in ("hv-qcow2", "qemu", "hv-raw"))
            share = None if hv is None or hv_raw is None else hv.median / hv_raw.median
            beats = None if hv is None or q is None else hv.median >= q.median
            rows.append(Row(f"qcow2 {names[p][0]}", hv, q, unit=names[p][1], target="≥ QEMU qcow2 and ≥ 0.9× hv raw",
                            met=None if share is None or beats is None else (beats and share >= 0.9),
                            note="" if share is None else f"{share:.2f}× hv raw"))
        return rows + self.round_trip_rows("qcow2", "qcow2", "hv-qcow2", "≤ QEMU qcow2", raw_side="hv-raw")

    # -- snapshots (issue #15) --

    def qmp(self, path: str, *commands: dict, timeout_s: float = 30) -> list[dict]:
        """Runs QMP commands on QEMU's monitor socket; returns each command's answer."""
        import socket
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        s.settimeout(timeout_s)
        f = s.makefile("rwb")

        def answer() -> dict:
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg or "QMP" in msg:
                    return msg

        answer()  # greeting
        out = []
        for cmd in ({"execute": "qmp_capabilities"}, *commands):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            out.append(answer())
        s.close()
        return out[1:]

    def case_snapshot(self) -> list[Row]:
        """Snapshot and restore of one guest that wrote `fill` MiB, hv (`hvctl snapshot` /
        `run --restore`) against QEMU (migration to a file and `-incoming` from it); and the memory
        of N clones of one snapshot against N VMs started afresh."""
        # First touches of guest pages are slow on a nested-KVM host (≈ 2 MiB/s here), so the
        # guests write a few MiB; the RAM sizes are the issue's.
        fill = 4 if self.quick else 32
        sizes = ["256M"] if self.quick else ["256M", "1G"]
        clones = 4 if self.quick else 20
        clone_fill = 4 if self.quick else 8
        cmd = f"mode=memfill count={fill}"
        clone_cmd = f"mode=memfill count={clone_fill}"
        ready = b"memfill: ready"
        run_dir = self.env.tmp / "snap-run"
        run_dir.mkdir(exist_ok=True)
        env = dict(self.hv_env, HV_RUN_DIR=str(run_dir))
        hv = str(self.env.hvctl)
        print(f"case: snapshot and restore ({', '.join(sizes)} guests that wrote {fill} MiB; hv vs QEMU migrate-to-file), "
              f"and {clones} clones vs {clones} fresh VMs", flush=True)

        def du(path: Path) -> float:
            out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()
            return int(out[0]) / 1024 if out else 0.0

        def wait_log(name: str, text: bytes, timeout_s: float = 300) -> bool:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    if text in (run_dir / f"{name}.log").read_bytes():
                        return True
                except OSError:
                    pass
                time.sleep(0.02)
            return False

        def hvctl(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
            return subprocess.run([hv, *args], capture_output=True, text=True, env=env, timeout=timeout_s)

        def one(side: str, i: int) -> None:
            for size in sizes:
                key = f"snap_{size}"
                snap = self.env.tmp / f"snap-{side}-{size}-{i}"
                if side == "hv":
                    name = f"s{i}{size}"
                    r = hvctl("run", "--multiboot", str(self.env.guest), "--cmdline", cmd, "--memory", size,
                              "--name", name, "--detach")
                    if r.returncode != 0 or not wait_log(name, ready):
                        self.problems.append(f"hv snapshot {size}: guest did not get ready: {r.stderr.strip()}")
                        hvctl("stop", name)
                        continue
                    t0 = now_ns()
                    r = hvctl("snapshot", name, str(snap), "--stop")
                    save_ms = (now_ns() - t0) / 1e6
                    hvctl("stop", name)
                    t0 = now_ns()
                    r2 = hvctl("run", "--restore", str(snap), "--detach", "--name", name + "r")
                    restore_ms = (now_ns() - t0) / 1e6
                    hvctl("stop", name + "r")
                    if r.returncode != 0 or r2.returncode != 0:
                        self.problems.append(f"hv snapshot {size}: {r.stderr.strip()} {r2.stderr.strip()}")
                        continue
                    size_mib = du(snap)
                    shutil.rmtree(snap, ignore_errors=True)
                else:
                    qmp = str(self.env.tmp / f"qmp-{i}-{size}.sock")
                    base = [self.env.qemu, *[a if a != GUEST_RAM else size for a in QEMU_BASE_ARGS],
                            "-kernel", str(self.env.guest), "-append", cmd, "-qmp", f"unix:{qmp},server=on,wait=off"]
                    guest = LiveGuest(base, None)
                    try:
                        if guest.wait_for(ready, 300) is None:
                            self.problems.append(f"QEMU snapshot {size}: guest did not get ready: {guest.text()[-300:]}")
                            continue
                        t0 = now_ns()
                        self.qmp(qmp, {"execute": "migrate", "arguments": {"uri": f"exec:cat > {snap}"}})
                        while self.qmp(qmp, {"execute": "query-migrate"})[0].get("return", {}).get("status") not in ("completed", "failed"):
                            time.sleep(0.001)
                        save_ms = (now_ns() - t0) / 1e6
                    finally:
                        guest.stop()
                    if os.path.exists(qmp):
                        os.unlink(qmp)
                    t0 = now_ns()
                    restored = LiveGuest(base + ["-incoming", f"exec:cat {snap}"], None)
                    try:
                        while self.qmp(qmp, {"execute": "query-status"})[0].get("return", {}).get("status") != "running":
                            if restored.proc.poll() is not None or now_ns() - t0 > 120e9:
                                break
                            time.sleep(0.001)
                        restore_ms = (now_ns() - t0) / 1e6
                    finally:
                        restored.stop()
                    size_mib = snap.stat().st_size / (1 << 20)
                    snap.unlink()
                self.record(f"{key}_save", side, save_ms)
                self.record(f"{key}_restore", side, restore_ms)
                self.record(f"{key}_size", side, size_mib)
                print(f"  run {i + 1} {side} {size}: snapshot {save_ms:.0f} ms, restore to running {restore_ms:.0f} ms, "
                      f"{size_mib:.1f} MiB on disk", flush=True)

        self.interleaved(one, runs=1 if self.quick else min(self.runs, 3))

        # Memory: N clones of one snapshot against N VMs started afresh, all idle after the fill.
        def pss_of(names: list[str]) -> Optional[float]:
            total = 0
            for n in names:
                r = hvctl("status", n, "--json")
                if r.returncode != 0:
                    return None
                total += self.hv_pss(json.loads(r.stdout)["pid"])["total_kb"]
            return total / 1024

        fresh = [f"fresh{k}" for k in range(clones)]
        for n in fresh:
            hvctl("run", "--multiboot", str(self.env.guest), "--cmdline", clone_cmd, "--memory", "64M", "--name", n, "--detach")
        fresh_ok = all(wait_log(n, ready, timeout_s=900) for n in fresh)
        fresh_pss = pss_of(fresh) if fresh_ok else None
        for n in fresh:
            hvctl("stop", n)
        template = self.env.tmp / "snap-template"
        hvctl("run", "--multiboot", str(self.env.guest), "--cmdline", clone_cmd, "--memory", "64M", "--name", "template", "--detach")
        clone_names = [f"clone{k}" for k in range(clones)]
        clone_pss = None
        if wait_log("template", ready) and hvctl("snapshot", "template", str(template), "--stop").returncode == 0:
            hvctl("stop", "template")
            started = [hvctl("run", "--restore", str(template), "--clone", "--name", n, "--detach").returncode == 0 for n in clone_names]
            time.sleep(1.0)
            clone_pss = pss_of(clone_names) if all(started) else None
            for n in clone_names:
                hvctl("stop", n)
        else:
            hvctl("stop", "template")
        if fresh_pss is None or clone_pss is None:
            self.problems.append("snapshot: the clone/fresh PSS comparison did not run to the end")
        self.record("clones_pss", "hv", clone_pss)
        self.record("clones_pss", "hv-fresh", fresh_pss)
        print(f"  {clones} clones: {clone_pss and round(clone_pss, 1)} MiB PSS; {clones} fresh VMs: "
              f"{fresh_pss and round(fresh_pss, 1)} MiB", flush=True)

        rows = []
        for size in sizes:
            key = f"snap_{size}"
            rows += [
                Row(f"snapshot, {size} guest ({fill} MiB written)", self.get(f"{key}_save", "hv"), self.get(f"{key}_save", "qemu"),
                    unit="ms", target="≤ QEMU migrate-to-file"),
                Row(f"restore to guest running, {size} guest", self.get(f"{key}_restore", "hv"), self.get(f"{key}_restore", "qemu"),
                    unit="ms", target="≤ QEMU (Firecracker: < 8 ms)"),
                Row(f"snapshot size on disk, {size} guest", self.get(f"{key}_size", "hv"), self.get(f"{key}_size", "qemu"),
                    unit="MiB", target="sparse (≈ memory written)"),
            ]
        rows.append(Row(f"PSS of {clones} idle clones vs {clones} fresh VMs (64 MiB, {clone_fill} MiB written)",
                        self.get("clones_pss", "hv"), self.get("clones_pss", "hv-fresh"), unit="MiB",
                        target="clones ≪ fresh VMs", note="QEMU column = fresh hv VMs; see ARCHITECTURE.md, Snapshots"))
        for r in rows[:-1]:
            r.met = None if r.hv is None or r.qemu is None else r.hv.median <= r.qemu.median
        return rows

    # -- live migration (issue #18) --

    def hv_migrate_once(self, what: str, tag: str, size: str, cmd: str, ready: bytes, security: list[str],
                        measure: Optional[Callable[[LiveGuest, LiveGuest], object]] = None) -> Optional[tuple[dict, object]]:
        """Starts hv's test guest (`cmd`, `size` of RAM) as VM `tag` in a run directory of its
        own, waits for `ready` on its console, migrates it over loopback to `hvctl run
        --incoming` in another run directory (`security`: `--key FILE` or `--insecure-plaintext`,
        given to both sides), and returns `hvctl migrate --json`'s result with what
        `measure(source, destination)` returned before both ended; None, with the problem noted,
        when a step failed."""
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        hv = str(self.env.hvctl)
        env_a = dict(self.hv_env, HV_RUN_DIR=str(self.env.tmp / f"{tag}-a"))
        env_b = dict(self.hv_env, HV_RUN_DIR=str(self.env.tmp / f"{tag}-b"))
        stamper = self.env.tmp / "tsline"
        source = LiveGuest([hv, "run", "--multiboot", str(self.env.guest), "--cmdline", cmd, "--memory", size,
                            "--name", tag, "--serial", "stdio"], env_a, stamper)
        dest = None
        try:
            if source.wait_for(ready, 300) is None:
                self.problems.append(f"{what}: guest did not get ready: {source.text()[-300:]}")
                return None
            dest = LiveGuest([hv, "run", "--incoming", f"tcp:127.0.0.1:{port}", "--serial", "stdio"] + security, env_b, stamper)
            if dest.wait_for(b"hvctl: waiting for a VM", 30) is None:
                self.problems.append(f"{what}: the destination did not listen: {dest.text()[-300:]}")
                return None
            r = subprocess.run([hv, "migrate", tag, "--to", f"tcp:127.0.0.1:{port}", "--json"] + security,
                               capture_output=True, text=True, env=env_a, timeout=300)
            result = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None
            if not result or "total_ms" not in result:
                self.problems.append(f"{what}: {r.stderr.strip()[-300:]}")
                return None
            measured = measure(source, dest) if measure else None
            subprocess.run([hv, "stop", tag], capture_output=True, env=env_b, timeout=60)
            return result, measured
        finally:
            source.stop()
            if dest:
                dest.stop()

    def case_migration(self) -> list[Row]:
        """Live migration over loopback of an idle guest and of one that keeps dirtying memory,
        hv (`hvctl migrate` to `hvctl run --incoming`) against QEMU (QMP `migrate` to
        `-incoming tcp:`), each with its own defaults for the allowed pause (hv 100 ms, QEMU
        300 ms). Downtime is what each side reports (hv: from the pause to the destination's
        confirmation that the guest runs; QEMU: query-migrate's `downtime`, which ends when the
        source is done and leaves out the destination's start). Both restore the guest's clocks
        as they were, so the guest cannot see the pause on its own TSC; the idle guest therefore
        prints a tick every 2 ms and the host times the silence on the serial port between the
        last tick at the source and the first at the destination: the pause as its peers see it,
        measured the same way for both."""
        import socket
        sizes = ["256M"] if self.quick else ["256M", "1G"]
        loads = [("idle", "mode=ticks count=100000000 delay=2", b"tick 10"),
                 ("dirtying", "mode=memdirty count=4 delay=2", b"tick 10")]
        print(f"case: live migration over loopback ({', '.join(sizes)} guests, idle (a serial tick every 2 ms) and "
              f"dirtying 4 MiB without pause; hv vs QEMU)", flush=True)

        def silence_ms(source: LiveGuest, dest: LiveGuest) -> Optional[float]:
            """The pause as the guest's console shows it (`console_pause_ms`), once the
            destination has printed something (at most 10 s)."""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with source.lock, dest.lock:
                    before, after = list(source.pieces), list(dest.pieces)
                pause = console_pause_ms(before, after)
                if pause is not None:
                    return pause
                time.sleep(0.01)
            return None

        def free_port() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        # hv migrates with a shared key (encrypted and authenticated), as its users must unless
        # they say --insecure-plaintext; QEMU's stream is plain TCP.
        key_file = self.env.tmp / "migration.key"
        key_file.write_bytes(os.urandom(32))
        key_file.chmod(0o600)

        def one(side: str, i: int) -> None:
            for size in sizes:
                for load, cmd, ready in loads:
                    key = f"mig_{size}_{load}"
                    port = free_port()
                    if side == "hv":
                        done = self.hv_migrate_once(f"hv migration {size} {load}", f"m{i}{size}{load}", size, cmd, ready,
                                                    ["--key", str(key_file)],
                                                    measure=silence_ms)
                        if done is None:
                            continue
                        result, silence = done
                        total, down, sent = result["total_ms"], result["downtime_ms"], result["bytes_sent"] / (1 << 20)
                    else:
                        qmp_src, qmp_dst = str(self.env.tmp / f"qmp-ms-{i}.sock"), str(self.env.tmp / f"qmp-md-{i}.sock")
                        base = [self.env.qemu, *[x if x != GUEST_RAM else size for x in QEMU_BASE_ARGS],
                                "-kernel", str(self.env.guest), "-append", cmd]
                        source = LiveGuest(base + ["-qmp", f"unix:{qmp_src},server=on,wait=off"], None, self.env.tmp / "tsline")
                        dest = None
                        try:
                            if source.wait_for(ready, 300) is None:
                                self.problems.append(f"QEMU migration {size} {load}: guest did not get ready: {source.text()[-300:]}")
                                continue
                            dest = LiveGuest(base + ["-qmp", f"unix:{qmp_dst},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"], None,
                                             self.env.tmp / "tsline")
                            self.qmp(qmp_dst, {"execute": "query-status"})  # listening once QMP answers
                            self.qmp(qmp_src, {"execute": "migrate", "arguments": {"uri": f"tcp:127.0.0.1:{port}"}})
                            deadline = time.monotonic() + 300
                            info: dict = {}
                            while time.monotonic() < deadline:
                                info = self.qmp(qmp_src, {"execute": "query-migrate"})[0].get("return", {})
                                if info.get("status") in ("completed", "failed", "cancelled"):
                                    break
                                time.sleep(0.01)
                            if info.get("status") != "completed":
                                self.problems.append(f"QEMU migration {size} {load}: {info}")
                                continue
                            total, down = float(info.get("total-time", 0)), float(info.get("downtime", 0))
                            sent = info.get("ram", {}).get("transferred", 0) / (1 << 20)
                            silence = silence_ms(source, dest)
                        finally:
                            source.stop()
                            if dest:
                                dest.stop()
                            for q in (qmp_src, qmp_dst):
                                if os.path.exists(q):
                                    os.unlink(q)
                    self.record(f"{key}_total", side, total)
                    self.record(f"{key}_down", side, down)
                    self.record(f"{key}_sent", side, sent)
                    self.record(f"{key}_silence", side, silence)
                    print(f"  run {i + 1} {side} {size} {load}: total {total:.0f} ms, downtime {down:.1f} ms, "
                          f"{sent:.1f} MiB sent" + (f", serial silent {silence:.1f} ms" if silence is not None else ""), flush=True)

        self.interleaved(one, runs=1 if self.quick else min(self.runs, 3))
        rows = []
        for size in sizes:
            for load, _, _ in loads:
                key = f"mig_{size}_{load}"
                # The issue's targets: below QEMU on every row, and at most 100 ms for an idle
                # 256 MiB guest. The pause is the guest's, seen the same way for both: the silence
                # on its serial port. The downtimes each side reports are not comparable (QEMU's
                # ends when the source has sent its last byte, hv's when the destination confirms
                # that the guest runs there) and are reported only.
                cap = 100.0 if (size, load) == ("256M", "idle") else None
                silent = Row(f"migration pause seen on the serial port, {size} guest, {load}", self.get(f"{key}_silence", "hv"),
                             self.get(f"{key}_silence", "qemu"), unit="ms", target="≤ QEMU" + (", ≤ 100 ms" if cap else ""),
                             note="host clock, same method both sides")
                if silent.hv is not None and silent.qemu is not None:
                    silent.met = silent.hv.median <= silent.qemu.median and (cap is None or silent.hv.median <= cap)
                rows += [
                    Row(f"migration total time, {size} guest, {load}", self.get(f"{key}_total", "hv"), self.get(f"{key}_total", "qemu"),
                        unit="ms", target="≤ QEMU"),
                    silent,
                    Row(f"migration downtime as reported, {size} guest, {load}", self.get(f"{key}_down", "hv"),
                        self.get(f"{key}_down", "qemu"), unit="ms", target="report",
                        note="hv: to the destination's confirmation; QEMU: to the source's last byte"),
                ]
                rows += [
                    Row(f"migration data sent, {size} guest, {load}", self.get(f"{key}_sent", "hv"), self.get(f"{key}_sent", "qemu"),
                        unit="MiB", target="≤ QEMU"),
                ]
        for r in rows:
            if r.met is None and r.target != "report" and r.hv is not None and r.qemu is not None:
                r.met = r.hv.median <= r.qemu.median
        return rows

    # -- network --

    def case_migration_key(self) -> list[Row]:
        """What the stream's shared key costs: the same hv migrating the same guests with `--key`
        and with `--insecure-plaintext` on both sides, interleaved (the QEMU column is hv in
        plaintext). A 256 MiB guest idle and dirtying 4 MiB (as in `migration`), and a 1 GiB
        guest that wrote 128 MiB (quick: 32) and idles: the stream's throughput."""
        fill = 32 if self.quick else 128
        loads = [("256M", "idle", "mode=ticks count=100000000 delay=2", b"tick 10"),
                 ("256M", "dirtying", "mode=memdirty count=4 delay=2", b"tick 10"),
                 ("1G", f"{fill} MiB written", f"mode=memfill count={fill}", b"memfill: ready")]
        key_file = self.env.tmp / "migration-ab.key"
        key_file.write_bytes(os.urandom(32))
        key_file.chmod(0o600)
        print("case: migration with the shared key against --insecure-plaintext (hv both sides, interleaved)", flush=True)

        def one(side: str, i: int) -> None:
            security = ["--key", str(key_file)] if side == "hv" else ["--insecure-plaintext"]
            for size, load, cmd, ready in loads:
                done = self.hv_migrate_once(f"migration_key {side} {size} {load}", f"mk{i}{side}{size}", size, cmd, ready, security)
                if done is None:
                    continue
                result = done[0]
                self.record(f"mk_total_{size}_{load}", side, result["total_ms"])
                self.record(f"mk_down_{size}_{load}", side, result["downtime_ms"])
                print(f"  run {i + 1} {'key' if side == 'hv' else 'plaintext'} {size} {load}: total {result['total_ms']:.0f} ms, "
                      f"downtime {result['downtime_ms']:.1f} ms", flush=True)

        self.interleaved(one, sides=("hv", "plain"))
        rows = []
        for size, load, _, _ in loads:
            for kind, label in (("total", "total time"), ("down", "downtime")):
                rows.append(Row(f"migration {label} with the key, {size} guest, {load}", self.get(f"mk_{kind}_{size}_{load}", "hv"),
                                self.get(f"mk_{kind}_{size}_{load}", "plain"), unit="ms", target="report",
                                note="QEMU column = hv with --insecure-plaintext"))
        return rows

    def case_net(self) -> list[Row]:
        """virtio-net: VM→VM (hv: a private segment; QEMU: two taps on a Linux bridge) and VM→host
        over a tap (hv and QEMU both virtio-net + tap), all in a network namespace made here; and
        the host's ping round trip to a guest over the tap."""
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("ping"):
            self.problems.append("network: needs root, ip and ping (iproute2, iputils-ping); not run")
            return [self.not_yet("network", "≥ QEMU", "needs root, ip and ping")]
        count = 2000 if self.quick else 20000
        big, small = 1472, 18  # UDP payloads: 1514-byte and 60-byte Ethernet frames
        print(f"case: virtio-net, {count} UDP datagrams of {big} and of {small} bytes (mode=netblast → netsink or the "
              f"host), VM→VM and VM→host, and the host's ping round trip; hv (segment / tap) vs QEMU (bridge / tap)", flush=True)
        ns = f"hvbench{os.getpid()}"
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sh(["ip", "netns", "add", ns])
        run_dir = self.env.tmp / "run"
        env = dict(self.hv_env, HV_RUN_DIR=str(run_dir))

        def nsx(*argv, check=True, **kw):
            return subprocess.run(["ip", "netns", "exec", ns, *argv], check=check, **kw)

        try:
            nsx("ip", "link", "set", "lo", "up")
            nsx("ip", "tuntap", "add", "dev", "hvbtap", "mode", "tap")
            nsx("ip", "addr", "add", "10.78.0.1/24", "dev", "hvbtap")
            nsx("ip", "link", "set", "hvbtap", "up")
            nsx("ip", "link", "add", "hvbbr", "type", "bridge")
            for t in ("hvbq1", "hvbq2"):
                nsx("ip", "tuntap", "add", "dev", t, "mode", "tap")
                nsx("ip", "link", "set", t, "master", "hvbbr")
                nsx("ip", "link", "set", t, "up")
            nsx("ip", "link", "set", "hvbbr", "up")

            def guest(side: str, cmd: str, nic: str, mac: str, name: str) -> LiveGuest:
                if side == "hv":
                    argv = ["ip", "netns", "exec", ns, *self.hv_argv(cmd), "--memory", "32M", "--name", name,
                            "--nic", f"{nic},mac={mac}"]
                    return LiveGuest(argv, env)
                netdev = f"tap,id=n0,ifname={nic},script=no,downscript=no"
                argv = ["ip", "netns", "exec", ns, *self.qemu_argv(cmd), "-netdev", netdev,
                        "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={mac}"]
                return LiveGuest(argv, None)

            def vm_to_vm(side: str, i: int, size: int) -> Optional[float]:
                seg = f"net=bench{os.getpid()}"
                sink = guest(side, "mode=netsink ip=10.9.0.2 port=5001", seg if side == "hv" else "hvbq2",
                             "52:54:00:00:0b:02", f"sink{i}")
                blaster = None
                try:
                    if sink.wait_for(b"net: nic0 mac", 60) is None:
                        self.problems.append(f"{side} netsink did not start: {sink.text()[-300:]!r}")
                        return None
                    blaster = guest(side, f"mode=netblast ip=10.9.0.1 peer=10.9.0.2 count={count} size={size} port=5001",
                                    seg if side == "hv" else "hvbq1", "52:54:00:00:0b:01", f"blast{i}")
                    start = sink.wait_for(b"bench: net rx start", 120)
                    end = sink.wait_for(b"bench: net rx end", 180)
                    if start is None or end is None:
                        self.problems.append(f"{side} VM→VM blast did not finish: sink {sink.text()[-300:]!r} "
                                             f"blaster {blaster.text()[-300:]!r}")
                        return None
                    got = re.search(rb"received=(\d+)", end[1])
                    return int(got.group(1)) / ((end[0] - start[0]) / 1e9) if got else None
                finally:
                    sink.stop()
                    if blaster:
                        blaster.stop()

            receiver = textwrap.dedent("""
                import json, socket, sys, time
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                s.bind(("10.78.0.1", 5001)); s.settimeout(120)
                print("ready", flush=True)
                n = nbytes = 0; first = last = None
                while True:
                    try:
                        data = s.recv(65536)
                    except socket.timeout:
                        break
                    now = time.perf_counter()
                    if data[:4] == b"END!":
                        break
                    first = first or now; last = now; n += 1; nbytes += len(data)
                    s.settimeout(10)
                print(json.dumps({"n": n, "bytes": nbytes, "s": (last - first) if n > 1 else None}), flush=True)
            """)

            def vm_to_host(side: str, i: int, size: int) -> Optional[float]:
                rx = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", receiver],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                vm = None
                try:
                    if rx.stdout.readline().strip() != "ready":
                        return None
                    vm = guest(side, f"mode=netblast ip=10.78.0.2 peer=10.78.0.1 count={count} size={size} port=5001",
                               "tap=hvbtap" if side == "hv" else "hvbtap", "52:54:00:00:0b:03", f"tx{i}")
                    try:
                        out, _ = rx.communicate(timeout=240)
                    except subprocess.TimeoutExpired:
                        self.problems.append(f"{side} VM→host blast did not finish: {vm.text()[-300:]!r}")
                        return None
                    result = json.loads(out.strip().splitlines()[-1])
                    return result["n"] / result["s"] if result.get("s") else None
                finally:
                    if rx.poll() is None:
                        rx.kill()
                    if vm:
                        vm.stop()

            def host_ping(side: str, i: int) -> Optional[float]:
                vm = guest(side, "mode=netpeer ip=10.78.0.2", "tap=hvbtap" if side == "hv" else "hvbtap",
                           "52:54:00:00:0b:04", f"ping{i}")
                try:
                    if vm.wait_for(b"net: nic0 mac", 60) is None:
                        return None
                    nsx("ping", "-c", "3", "-W", "5", "10.78.0.2", check=False, capture_output=True)  # warm ARP
                    n = 20 if self.quick else 100
                    r = nsx("ping", "-c", str(n), "-i", "0.01", "-q", "10.78.0.2", check=False, capture_output=True, text=True)
                    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
                    return float(m.group(1)) * 1000 if m else None
                finally:
                    vm.stop()

            def vm_ping(side: str, i: int) -> Optional[float]:
                seg = f"net=bench{os.getpid()}"
                peer = guest(side, "mode=netpeer ip=10.9.0.2", seg if side == "hv" else "hvbq2", "52:54:00:00:0b:02", f"peer{i}")
                pinger = None
                try:
                    if peer.wait_for(b"net: nic0 mac", 60) is None:
                        return None
                    n = 20 if self.quick else 100
                    pinger = guest(side, f"mode=netping ip=10.9.0.1 peer=10.9.0.2 count={n}",
                                   seg if side == "hv" else "hvbq1", "52:54:00:00:0b:01", f"pinger{i}")
                    if pinger.wait_for(b"net: ping done", 120) is None:
                        self.problems.append(f"{side} VM→VM ping did not finish: {pinger.text()[-300:]!r}")
                        return None
                    times = [int(m) for m in re.findall(r"time=(\d+) us", pinger.text())]
                    return statistics.median(times) if times else None
                finally:
                    peer.stop()
                    if pinger:
                        pinger.stop()

            def one(side, i):
                v = {
                    "vm_big": vm_to_vm(side, i, big), "vm_small": vm_to_vm(side, i, small), "vm_rtt": vm_ping(side, i),
                    "host_big": vm_to_host(side, i, big), "host_small": vm_to_host(side, i, small),
                    "rtt": host_ping(side, i),
                }
                for k, x in v.items():
                    self.record(f"net_{k}", side, x)
                print(f"  run {i + 1} {side}: " + ", ".join(f"{k} {x:.0f}" if x else f"{k} -" for k, x in v.items()), flush=True)

            self.interleaved(one)
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

        rows = []
        for key, label, unit, scale in [
            ("vm_big", "net VM→VM, 1514-byte frames (hv: private segment; QEMU: bridge)", "MiB/s", big / (1 << 20)),
            ("vm_small", "net VM→VM, 60-byte frames (hv: private segment; QEMU: bridge)", "kpps", 1e-3),
            ("host_big", "net VM→host over a tap, 1514-byte frames", "MiB/s", big / (1 << 20)),
            ("host_small", "net VM→host over a tap, 60-byte frames", "kpps", 1e-3),
        ]:
            hv, q = (self.get(f"net_{key}", side) for side in ("hv", "qemu"))
            hv, q = (None if x is None else Stats(x.median * scale, x.min * scale, x.max * scale, x.n) for x in (hv, q))
            rows.append(Row(label, hv, q, unit=unit, target="≥ QEMU", met=None if hv is None or q is None else hv.median >= q.median))
        for key, label in [("vm_rtt", "net VM→VM ICMP round trip, as the guest times it (median)"),
                           ("rtt", "net host→VM ping round trip over a tap (average)")]:
            hv, q = self.get(f"net_{key}", "hv"), self.get(f"net_{key}", "qemu")
            rows.append(Row(label, hv, q, unit="µs", target="≤ QEMU", met=None if hv is None or q is None else hv.median <= q.median))
        return rows

    # -- the API services: hvd and hv-firecracker --

    def start_hvd(self, name: str, poll_ms: int) -> tuple[subprocess.Popen, Path, dict, Path, object]:
        """A release hvd with run and state directories of its own under tmp/NAME: the process,
        its socket, the environment hvctl needs to see its VMs, the run directory and its log."""
        base = self.env.tmp / name
        run_dir, state_dir = base / "run", base / "state"
        for d in (run_dir, state_dir):
            d.mkdir(parents=True, exist_ok=True)
        env = dict(self.hv_env, HV_RUN_DIR=str(run_dir), HV_STATE_DIR=str(state_dir))
        log = open(base / "hvd.log", "w+b")
        hvd = subprocess.Popen([str(self.env.hvctl.parent / "hvd"), "--poll-interval", str(poll_ms)], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        return hvd, run_dir / "hvd" / "api.sock", env, run_dir, log

    def case_api(self) -> list[Row]:
        print("case: API services — hvd create+start → first guest byte, VMs per second through hvd, "
              "hv-firecracker spawn → first guest byte; resident memory", flush=True)
        bin_dir = self.env.hvctl.parent
        hvd_bin, fc_bin = bin_dir / "hvd", bin_dir / "hv-firecracker"
        if not hvd_bin.exists() or not fc_bin.exists():
            return [Row("API services", text="hvd or hv-firecracker missing from " + str(bin_dir))]
        hvd, sock, env, run_dir, hvd_log = self.start_hvd("api", poll_ms=500)
        base = self.env.tmp / "api"
        mib = GUEST_RAM_BYTES >> 20
        rates: list[float] = []
        hvd_rss: list[float] = []
        try:
            if wait_path(sock, 30) is None:
                self.problems.append(f"hvd did not open its socket within 30 s: {peek(hvd_log)[-400:]!r}")
                return [Row("API services", text="hvd did not start")]
            counter = [0]

            def create_start(name: str, cmdline: str) -> Optional[int]:
                definition = {"memory_mib": mib, "boot": {"multiboot": str(self.env.guest), "cmdline": cmdline}}
                status, text = unix_http(str(sock), "POST", "/v1/vms", {"name": name, "definition": definition})
                if status != 201:
                    self.problems.append(f"hvd create {name}: {status} {text[:200]!r}")
                    return None
                status, text = unix_http(str(sock), "POST", f"/v1/vms/{name}/start")
                if status != 200:
                    self.problems.append(f"hvd start {name}: {status} {text[:200]!r}")
                    return None
                return now_ns()

            def forget(name: str) -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    status, _ = unix_http(str(sock), "DELETE", f"/v1/vms/{name}")
                    if status == 204:
                        return
                    time.sleep(0.05)  # still running: hello ends by itself

            def one(side, i):
                if side == "qemu":
                    cap = self.guest_run("qemu", "mode=hello", timeout_s=120, markers=[DONE_MARKER])
                    self.record("api_first_byte", "qemu", cap.since_spawn_ms(cap.scanner.first_ns))
                    return
                # The baseline: the same guest by `hvctl run` itself.
                cap = self.guest_run("hv", "mode=hello", timeout_s=120, markers=[DONE_MARKER])
                self.record("api_hvctl_first_byte", "hv", cap.since_spawn_ms(cap.scanner.first_ns))
                counter[0] += 1
                name = f"bench{counter[0]}"
                t0 = now_ns()
                started = create_start(name, "mode=hello")
                first = wait_path(run_dir / f"{name}.log", 30, nonempty=True) if started else None
                self.record("api_first_byte", "hv", (first - t0) / 1e6 if first else None)
                self.record("api_start_returned", "hv", (started - t0) / 1e6 if started else None)
                print(f"  run {i + 1} hvd: start returned {started and round((started - t0) / 1e6, 1)} ms, "
                      f"first byte {first and round((first - t0) / 1e6, 1)} ms", flush=True)
                forget(name)

            self.interleaved(one)

            # VMs per second through the API: n create+start requests back to back.
            n = 5 if self.quick else 20
            names = []
            t0 = now_ns()
            for _ in range(n):
                counter[0] += 1
                names.append(f"bench{counter[0]}")
                if create_start(names[-1], "mode=hello") is None:
                    break
            else:
                rates.append(n / ((now_ns() - t0) / 1e9))
            rss = rss_kib(hvd.pid)
            if rss:
                hvd_rss.append(rss / 1024)
            for name in names:
                forget(name)
        finally:
            hvd.terminate()
            try:
                hvd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                hvd.kill()
                hvd.wait()

        # hv-firecracker: spawn → API → InstanceStart → first guest byte on its stdout.
        fc_rss: list[float] = []
        core_rss: list[float] = []
        for i in range(self.runs):
            fc_sock = base / f"fc{i}.sock"
            t0 = now_ns()
            fc = subprocess.Popen([str(fc_bin), "--api-sock", str(fc_sock), "--id", f"fcbench{i}"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            first = None
            try:
                if wait_path(fc_sock, 30) is None:
                    self.problems.append(f"hv-firecracker did not open its socket: {fc.stderr.read(400) if fc.poll() is not None else ''!r}")
                    continue
                calls = [("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mib}),
                         ("PUT", "/boot-source", {"kernel_image_path": str(self.env.guest), "boot_args": "mode=ticks count=3 delay=200"}),
                         ("PUT", "/actions", {"action_type": "InstanceStart"})]
                for method, url, body in calls:
                    status, text = unix_http(str(fc_sock), method, url, body)
                    if status != 204:
                        self.problems.append(f"hv-firecracker {method} {url}: {status} {text[:200]!r}")
                        break
                else:
                    ready, _, _ = select.select([fc.stdout], [], [], 30)
                    if ready and os.read(fc.stdout.fileno(), 1):
                        first = now_ns()
                    rss = rss_kib(fc.pid)
                    cores = [p for p in descendants(fc.pid)]
                    if rss:
                        fc_rss.append(rss / 1024)
                    if cores and rss_kib(cores[0]):
                        core_rss.append(rss_kib(cores[0]) / 1024)
            finally:
                stop(fc)
            self.record("fc_first_byte", "hv", (first - t0) / 1e6 if first else None)
            print(f"  run {i + 1} hv-firecracker: first byte {first and round((first - t0) / 1e6, 1)} ms", flush=True)

        first_hv, first_q = self.get("api_first_byte", "hv"), self.get("api_first_byte", "qemu")
        direct = self.get("api_hvctl_first_byte", "hv")
        fc_first = self.get("fc_first_byte", "hv")
        return [
            Row("hvd: create+start request → first guest byte", first_hv, first_q, unit="ms",
                target="≤ hvctl run + 20 ms", met=None if first_hv is None or direct is None else first_hv.median <= direct.median + 20,
                note="QEMU: launch → first byte"),
            Row("  the same guest by hvctl run (launch → first byte)", direct, first_q, unit="ms", target="—"),
            Row("hvd: create+start request → start answered", self.get("api_start_returned", "hv"), None, unit="ms",
                target="—", show_ratio=False),
            Row("hvd: VMs created and started per second", summarize(rates), None, unit="VM/s", target="—",
                show_ratio=False),
            Row("hvd resident memory (after the runs)", summarize(hvd_rss), None, unit="MiB", target="—", show_ratio=False),
            Row("hv-firecracker: spawn → API → InstanceStart → first guest byte", fc_first, None, unit="ms",
                target="Firecracker: ≤ 125 ms to guest init", met=None if fc_first is None else fc_first.median <= 125,
                show_ratio=False),
            Row("hv-firecracker process resident memory", summarize(fc_rss), None, unit="MiB",
                target="Firecracker: ≤ 5 MiB VMM overhead", met=None if not fc_rss else statistics.median(fc_rss) <= 5,
                note="API process only; the VM's core is the next row", show_ratio=False),
            Row("hv-firecracker's VM core (hvctl) resident memory", summarize(core_rss), None, unit="MiB", target="—",
                show_ratio=False),
        ]

    # -- hvd's API fuzzed at length (the CI test runs a short version) --

    def case_api_fuzz(self) -> list[Row]:
        schemathesis = REPO / ".build/pyenv/bin/schemathesis"
        hvd_bin = self.env.hvctl.parent / "hvd"
        socat = shutil.which("socat")
        if not schemathesis.exists() or not hvd_bin.exists() or not socat:
            return [Row("hvd API fuzzing (schemathesis)", text="needs .build/pyenv (test.sh), socat and a release hvd")]
        examples = 100 if self.quick else 1000
        print(f"case: hvd's API fuzzed by schemathesis, {examples} examples per operation, a VM running beside it", flush=True)
        hvd, sock, env, _, hvd_log = self.start_hvd("api-fuzz", poll_ms=200)
        port = 40000 + os.getpid() % 20000
        proxy = None
        try:
            if wait_path(sock, 30) is None:
                self.problems.append(f"hvd did not open its socket within 30 s: {peek(hvd_log)[-400:]!r}")
                return [Row("hvd API fuzzing (schemathesis)", text="hvd did not start")]
            definition = {"memory_mib": 32, "boot": {"multiboot": str(self.env.guest), "cmdline": "mode=ticks count=1000000 delay=50"}}
            unix_http(str(sock), "POST", "/v1/vms", {"name": "victim", "definition": definition})
            unix_http(str(sock), "POST", "/v1/vms/victim/start")
            proxy = subprocess.Popen([socat, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{sock}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            t0 = time.monotonic()
            run = subprocess.run([str(schemathesis), "run", str(REPO / "api/hvd.yaml"), "--url", f"http://127.0.0.1:{port}",
                                  "--max-examples", str(examples), "--exclude-operation-id", "startVM",
                                  "--exclude-operation-id", "streamEvents", "--exclude-operation-id", "snapshotVM",
                                  "--exclude-operation-id", "migrateVM", "--exclude-operation-id", "receiveVM",
                                  "--generation-database", "none", "--no-color",
                                  "--request-timeout", "40"], capture_output=True, text=True, timeout=3600)
            elapsed = time.monotonic() - t0
            alive = hvd.poll() is None
            summary = [line.strip() for line in run.stdout.splitlines() if "passed" in line or "failed" in line][-4:]
            print("  " + "\n  ".join(summary), flush=True)
            if run.returncode != 0 or not alive:
                self.problems.append(f"schemathesis found failures (rc {run.returncode}, hvd alive: {alive}): {run.stdout[-3000:]!r}")
            return [Row("hvd API fuzzing (schemathesis)", text=f"{'no failure' if run.returncode == 0 and alive else 'FAILURES'}; "
                        f"{examples} examples/operation in {elapsed:.0f} s", target="no failure, hvd alive",
                        note="; ".join(summary[-2:]))]
        finally:
            if proxy:
                stop(proxy)
            stop(hvd)
            # Whatever still runs in this run directory (the victim, unless the fuzzer stopped it).
            listed = subprocess.run([str(self.env.hvctl), "ls", "--json"], env=env, capture_output=True, text=True)
            for vm in json.loads(listed.stdout or "[]"):
                subprocess.run([str(self.env.hvctl), "stop", vm["name"]], env=env, capture_output=True)

    # -- kill storms: lossless restart (issue 13) --

    @staticmethod
    def _cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def _children_named(self, pid: int, name: str) -> list[int]:
        """Descendants of `pid` whose command line contains `name` (a device's instance name)."""
        return [p for p in descendants(pid) if name in self._cmdline(p)]

    def _processes_named(self, name: str) -> list[int]:
        """Every process whose command line contains `name` (a detached segment switch)."""
        return [int(d) for d in os.listdir("/proc") if d.isdigit() and name in self._cmdline(int(d))]

    def _storm(self, argv: list[str], victims: Sequence[tuple[int, str]], kills: int, gap_s: tuple[float, float],
               done: Callable[[bytes], bool], timeout_s: float, restarted: str,
               after_kills_s: Optional[float] = None) -> dict:
        """Runs hvctl (argv), kills the named device process `kills` times at random gaps, and
        returns its stdout, the exit status, and the delay from each kill to the core's
        `device … restarted` line (the guest-visible stall of a device that serves no I/O in between)."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=REPO, env=self.hv_env)
        out, err_lines = bytearray(), []

        def pump(stream, sink, lines):
            for line in iter(stream.readline, b""):
                if lines is not None:
                    lines.append((now_ns(), line.decode(errors="replace")))
                else:
                    sink.extend(line)
        threads = [threading.Thread(target=pump, args=(proc.stdout, out, None), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, None, err_lines), daemon=True)]
        for t in threads:
            t.start()
        rng = random.Random(4242)
        kill_times: list[int] = []
        deadline = time.monotonic() + timeout_s
        while len(kill_times) < kills and proc.poll() is None and time.monotonic() < deadline and not done(bytes(out)):
            time.sleep(rng.uniform(*gap_s))
            owner, name = victims[len(kill_times) % len(victims)]
            pids = self._processes_named(name) if owner < 0 else self._children_named(owner or proc.pid, name)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                kill_times.append(now_ns())
        rc = None
        # A workload that ends by itself is waited for; one that runs forever (a ping loop) gets
        # `after_kills_s` to show it resumed after the last kill.
        if after_kills_s is not None:
            deadline = min(deadline, time.monotonic() + after_kills_s)
        while time.monotonic() < deadline and not done(bytes(out)) and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        else:
            rc = proc.returncode
        for t in threads:
            t.join(timeout=5)
        restarts = [t for t, line in err_lines if restarted in line]
        stalls = []
        for k in kill_times:
            after = [t for t in restarts if t > k]
            if after:
                stalls.append((after[0] - k) / 1e6)
        return {"out": bytes(out), "rc": rc, "kills": len(kill_times), "stalls": stalls,
                "stderr": "".join(line for _, line in err_lines)}

    @staticmethod
    def _percentile(values: Sequence[float], q: float) -> Optional[float]:
        if not values:
            return None
        v = sorted(values)
        return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]

    def _storm_row(self, name: str, r: dict, verdict: str, ok: bool) -> Row:
        p50, p99 = self._percentile(r["stalls"], 0.5), self._percentile(r["stalls"], 0.99)
        stall = "n/a" if p50 is None else f"restart p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        text = f"{r['kills']} kills: {verdict}; {stall}"
        met = ok and p99 is not None and p99 <= 20
        return Row(f"kill storm: {name}", text=text, target="0 lost/duplicated/corrupt, no reset; p99 ≤ 20 ms",
                   note=("met" if met else "not met") + " (no other VMM survives this: no QEMU column)")

    # -- the hostile-guest suite at length (the CI test runs 600 operations with fixed seeds) --
    def case_hostile(self) -> list[Row]:
        ops = self.hostile_ops or (2000 if self.quick else 1_000_000)
        seed = self.hostile_seed or random.randrange(1, 2 ** 31)
        print(f"case: hostile guest, seed {seed} (again: --hostile-seed {seed}), {ops} operations per device", flush=True)
        disk = self.env.tmp / "hostile.img"
        disk.write_bytes(b"")
        os.truncate(disk, 8 << 20)
        iso = self.env.tmp / "hostile.iso"
        volume = bytearray(2048 * 40)
        volume[2048 * 16:2048 * 16 + 6] = b"\x01CD001"
        iso.write_bytes(bytes(volume))
        pci = self.env.hvctl.parent / "hv-pci-testdevice"
        profile = REPO / "Tests/RogueDevice/rogue.json"
        argv = [str(self.env.hvctl), "run", "--multiboot", str(self.env.guest), "--cmdline", f"mode=hostile seed={seed} count={ops}",
                "--memory", "16M", "--serial", "stdio", "--disk", str(disk), "--cdrom", str(iso), "--nic", f"net=hostile-{os.getpid()}",
                "--balloon", "on", "--device", f"{pci},profile={profile},pci=03.0,bar0=mmio:4096,bar1=pio:16"]
        t0 = time.monotonic()
        run = subprocess.run(argv, capture_output=True, env=self.hv_env, timeout=max(600, ops // 50))
        elapsed = time.monotonic() - t0
        out = run.stdout.decode(errors="replace") + run.stderr.decode(errors="replace")
        functions = re.findall(r"hostile: pci 00:\S+ id=\S+ (\d+) ops", out)
        pio = sum(int(n) for n in re.findall(r"hostile: pio (\d+) ops", out))
        total = pio + sum(int(n) for n in functions)
        failures = [f for f in ["restarting it", "misbehaved", "giving up", "could not be restarted", "crashed", "KVM internal error",
                                "killed by signal", "hung", "out-of-range register request"] if f in out]
        ok = run.returncode == 0 and f"hostile: done seed={seed}" in out and not failures
        if not ok:
            self.problems.append(f"hostile guest, seed {seed}: rc {run.returncode}, {failures}: {out[-3000:]!r}")
        print(f"  {len(functions)} PCI functions and the legacy ports, {total} operations in {elapsed:.0f} s: "
              f"{'no device crashed' if ok else 'FAILURES ' + ', '.join(failures)}", flush=True)
        return [Row(f"hostile guest: {ops} ops × {len(functions)} PCI functions + ports", text=f"{'no crash, no restart' if ok else 'FAILURES'}; "
                    f"{total} ops in {elapsed:.0f} s ({total / max(elapsed, 0.001):.0f}/s)", target="no crash, no restart, VM runs to its end",
                    note=f"seed {seed}")]

    def case_kill_storms(self) -> list[Row]:
        names = ["hv-scsi", "hv-serial", "hv-bios", "hv-net", "hv-switch", "upgrade pause"]
        if self.quick:
            return [self.not_yet(f"kill storm: {n}", "0 lost, p99 ≤ 20 ms", "skipped by --quick (minutes per device)")
                    for n in names]
        kills = self.storm_kills
        print(f"case: kill storms: {kills} × kill -9 of each device kind during guest I/O", flush=True)
        rows = []
        run_dir = self.env.tmp / "storm-run"
        self.hv_env["HV_RUN_DIR"] = str(run_dir)
        try:
            # hv-scsi: write/verify with four 4 KiB requests in flight.
            image = self.env.tmp / "storm.img"
            subprocess.run([str(self.env.hvctl), "disk", "create", str(image), "--size", "16M"], check=True,
                           capture_output=True, env=self.hv_env)
            argv = self.hv_argv(f"mode=vscsistress count={max(100, kills * 6)}") + ["--disk", str(image)]
            r = self._storm(argv, [(0, "disk0")], kills, (0.12, 0.3), lambda o: b"vscsistress: done" in o, 600,
                            "device disk0 restarted")
            m = re.search(rb"vscsistress: done rounds=(\d+) requests=(\d+) errors=(\d+) mismatches=(\d+) duplicates=(\d+)", r["out"])
            ok = bool(m) and m.group(3) == m.group(4) == m.group(5) == b"0" and r["out"].count(b"mode=vscsistress") == 1
            verdict = (f"{int(m.group(2))} requests, {int(m.group(3))} errors, {int(m.group(4))} mismatches, "
                       f"{int(m.group(5))} duplicates, {r['out'].count(MODE_MARKER) - 1} resets") if m else "the guest did not finish"
            rows.append(self._storm_row("hv-scsi", r, verdict, ok))
            print(f"  hv-scsi: {rows[-1].text}", flush=True)

            print("  hv-serial: a flood of numbered lines to a file ...", flush=True)
            # hv-serial: a flood of numbered lines to a file; every line exactly once.
            console = self.env.tmp / "storm-console.txt"
            lines = max(20000, kills * 600)
            argv = [a for a in self.hv_argv(f"mode=flood lines={lines}") if a not in ("--serial", "stdio")]
            argv += ["--serial", f"file:{console}"]
            r = self._storm(argv, [(0, "serial0")], kills, (0.12, 0.3), lambda o: False, 600, "device serial0 restarted")
            got = [l for l in console.read_bytes().split(b"\n") if l.startswith(b"line ")]
            expected = [b"line %05d" % i for i in range(lines)]
            expected_set, got_set = set(expected), set(got)
            lost = len(expected_set - got_set)
            dup = len(got) - len(got_set)
            corrupt = sum(1 for l in got if l not in expected_set)
            ok = lost == dup == corrupt == 0 and got == expected
            rows.append(self._storm_row("hv-serial", r, f"{len(got)} lines, {lost} lost, {dup} duplicated, {corrupt} corrupt", ok))
            print(f"  hv-serial: {rows[-1].text}", flush=True)

            # hv-bios: SeaBIOS boots from a disk, again and again, killed during each boot.
            boots, booted, stalls, bios_kills, resets = 0, 0, [], 0, 0
            mbr = self.env.guest.parent / "mbr.bin"
            disk = self.env.tmp / "storm-boot.img"
            data = mbr.read_bytes() + b"hv-disk: sector 1 came through virtio-scsi\r\n".ljust(512, b"\0")
            disk.write_bytes(data.ljust(1 << 20, b"\0"))
            while bios_kills < kills and boots < 3 * kills:
                argv = [str(self.env.hvctl), "run", "--firmware", "seabios", "--disk", str(disk), "--serial", "stdio"]
                r = self._storm(argv, [(0, "bios")], 3, (0.05, 0.6), lambda o: b"sector 1 came through" in o, 60,
                                "device bios restarted")
                boots += 1
                bios_kills += r["kills"]
                stalls += r["stalls"]
                booted += b"sector 1 came through" in r["out"]
                resets += max(0, r["out"].count(b"SeaBIOS (version") - 1)
            r = {"kills": bios_kills, "stalls": stalls}
            rows.append(self._storm_row("hv-bios", r, f"{booted}/{boots} SeaBIOS boots reached the disk, {resets} resets",
                                        booted == boots and resets == 0))
            print(f"  hv-bios: {rows[-1].text}", flush=True)

            # hv-net and hv-switch: two VMs on a segment, one pinging the other without pause.
            for victim, label in (("net0", "hv-net"), ("hv-switch", "hv-switch")):
                seg = f"storm{os.getpid()}{label[-3:]}"
                responder = subprocess.Popen(self.hv_argv("mode=netpeer ip=10.9.0.2") + ["--nic", f"net={seg},mac=52:54:00:00:00:02",
                                             "--name", f"resp-{seg}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, cwd=REPO, env=self.hv_env)
                time.sleep(1.0)
                argv = self.hv_argv("mode=netping ip=10.9.0.1 peer=10.9.0.2 count=1000000") + ["--nic", f"net={seg},mac=52:54:00:00:00:01"]
                # The pinger's own NIC (it receives every reply), or the segment's switch.
                target = (0, "net0") if victim == "net0" else (-1, f"hv-switch {seg}")
                r = self._storm(argv, [target], kills, (0.3, 0.6), lambda o: False, 900,
                                "device net0 restarted" if victim == "net0" else "net0 joined again", after_kills_s=5)
                responder.send_signal(signal.SIGTERM)
                try:
                    responder.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    responder.kill()
                replies = r["out"].count(b"net: reply seq")
                last_seq = max([int(x) for x in re.findall(rb"net: reply seq (\d+)", r["out"])] or [0])
                lost = last_seq - replies
                resumed = replies > 0 and last_seq > 0
                # A frame in flight when a NIC or the switch dies is lost, as on a link that flaps;
                # what counts is that pings resume after every kill.
                rows.append(self._storm_row(label, r, f"{replies} pings answered, {lost} lost ({lost / max(1, r['kills']):.1f} per kill, "
                                                      f"dropped like a link flap), pings resumed: {'yes' if resumed else 'NO'}", resumed))
                print(f"  {label}: {rows[-1].text}", flush=True)

            # Upgrade pause: hv-scsi replaced by a copy of itself 20 times during write/verify.
            copies = [self.env.tmp / f"hv-scsi-{i}" for i in range(2)]
            for c in copies:
                shutil.copy(self.env.hvctl.parent / "hv-scsi", c)
            image2 = self.env.tmp / "upgrade.img"
            subprocess.run([str(self.env.hvctl), "disk", "create", str(image2), "--size", "16M"], check=True,
                           capture_output=True, env=self.hv_env)
            vm = subprocess.Popen(self.hv_argv("mode=vscsistress count=3000") + ["--disk", str(image2), "--name", "upgrade"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=self.hv_env)
            time.sleep(1.5)
            pauses = []
            for i in range(20):
                a = subprocess.run([str(self.env.hvctl), "device", "upgrade", "upgrade", "disk0", "--binary", str(copies[i % 2])],
                                   capture_output=True, text=True, env=self.hv_env, timeout=60)
                m = re.search(r"away for (\d+) ms", a.stdout)
                if m:
                    pauses.append(float(m.group(1)))
            vm.send_signal(signal.SIGTERM)
            out, _ = vm.communicate(timeout=30)
            p50, p99 = self._percentile(pauses, 0.5), self._percentile(pauses, 0.99)
            rows.append(Row("upgrade pause (hv-scsi replaced under write/verify)",
                            text=f"{len(pauses)}/20 upgrades; device away p50 {p50} ms, p99 {p99} ms" if pauses else "no upgrade succeeded",
                            target="a short pause, no I/O error", note="no other VMM can do this"))
            print(f"  upgrade: {rows[-1].text}", flush=True)
        finally:
            self.hv_env.pop("HV_RUN_DIR", None)
        return rows

    # -- not yet --

    @staticmethod
    def not_yet(case: str, target: str, why: str) -> Row:
        return Row(case, text="not yet", target=target, note=why)

    @classmethod
    def cases_not_yet(cls) -> list[Row]:
        return []


def plot_time_to_x(bench: Bench, path: str) -> Optional[str]:
    """Bar chart of the time-to-X cases (median, min–max whiskers), log scale."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written"
    cases = [("first_byte", "first serial byte"), ("done", "'hv-testguest: done'"),
             ("exit", "hvctl exit\n(QEMU never exits)")]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    width = 0.38
    for j, (side, colour, label) in enumerate((("hv", "#2a7ab9", "hv"), ("qemu", "#c0504d", "QEMU 7.2"))):
        for i, (key, _) in enumerate(cases):
            s = bench.get(key, side)
            if s is None:
                continue
            x = i + (j - 0.5) * width
            ax.bar(x, s.median, width, yerr=[[s.median - s.min], [s.max - s.median]], capsize=3,
                   color=colour, label=label if i == 0 else None)
            text = f"{s.median:.0f} ms" if s.median >= 10 else f"{s.median:.1f} ms"
            ax.annotate(text, (x, s.max), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=8)
    ax.axhline(50, color="#2a7ab9", linestyle=":", linewidth=1, label="hv target: first byte ≤ 50 ms")
    ax.set_yscale("log")
    ax.set_ylim(5, ax.get_ylim()[1] * 5)  # headroom for the legend
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"launch → {c[1]}" for c in cases], fontsize=8)
    ax.set_ylabel("ms after spawn (log scale)")
    ax.set_title(f"hv-testguest mode=hello: time to X (median, min–max of {bench.runs} runs)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def end_on_termination() -> None:
    """Makes SIGTERM and SIGHUP (timeout(1), a cancelled CI job, a closed terminal) unwind the
    way Ctrl-C does: every `finally` runs, so the VMs a case started are stopped and the
    temporary directory is removed, where the default action left both behind."""
    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="hv benchmarks, side by side with QEMU")
    ap.add_argument("--quick", action="store_true", help="small sizes and 2 runs (~2 minutes; CI)")
    ap.add_argument("--runs", type=int, help="runs per case and side (default 5, --quick 2)")
    ap.add_argument("--json", metavar="OUT", help="also write samples and the table as JSON")
    ap.add_argument("--plot", metavar="PNG", help="plot the time-to-X cases (needs matplotlib)")
    ap.add_argument("--no-build", action="store_true",
                    help="skip `swift build -c release` (use the existing release build)")
    ap.add_argument("--bin-dir", metavar="DIR",
                    help="use hvctl, hv-serial and hv-bios from DIR instead of building release")
    ap.add_argument("--only", metavar="CASE", action="append",
                    help="run only this case (repeatable): pioread, time_to_x, throughput, memory, density, noisy, seabios, "
                         "sandbox, plugins, vm_rate, vms_at_once, grub, scsi, qcow2, snapshot, migration, migration_key, net, api, api_fuzz, "
                         "hostile, kill_storms")
    ap.add_argument("--kills", type=int, default=100, help="kills per device kind in the kill storms (default 100)")
    ap.add_argument("--hostile-ops", type=int, help="operations per device for --only hostile (default 10^6, --quick 2000)")
    ap.add_argument("--hostile-seed", type=int, help="the hostile guest's seed (default: a random one, printed)")
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    if runs < 1:
        ap.error("--runs must be at least 1")

    t_start = time.monotonic()
    end_on_termination()
    ensure_prerequisites()
    with tempfile.TemporaryDirectory(prefix="hv-bench-") as tmpdir:
        tmp = Path(tmpdir)
        hvctl, guest, kvm_exit = build_all(tmp, args.no_build, args.bin_dir)
        quiet_note = wait_for_quiet()
        if quiet_note:
            print("WARNING: " + quiet_note, flush=True)
        hz, hz_src = tsc_rate(kvm_exit)
        env = Env(hvctl=hvctl, qemu=shutil.which("qemu-system-x86_64"), guest=guest,
                  kvm_exit=kvm_exit, tsc_hz=hz, tsc_source=hz_src, tmp=tmp)
        info = machine_info()
        print(f"TSC {hz / 1e6:.3f} MHz ({hz_src})", flush=True)
        bench = Bench(env, runs, args.quick)
        bench.storm_kills = args.kills
        bench.hostile_ops, bench.hostile_seed = args.hostile_ops, args.hostile_seed
        bench.warm_up()
        rows: list[Row] = []
        cases = ["pioread", "time_to_x", "throughput", "memory", "density", "noisy", "seabios", "sandbox", "plugins", "vm_rate", "vms_at_once",
                 "grub", "scsi", "qcow2", "snapshot", "migration", "migration_key", "net", "api", "kill_storms"]
        # Long runs only when asked for by name.
        cases_on_request = ["api_fuzz", "hostile"]
        for name in args.only or cases:
            if name not in cases + cases_on_request:
                sys.exit(f"bench: unknown case '{name}'; cases: {', '.join(cases + cases_on_request)}")
            rows += getattr(bench, f"case_{name}")()
        rows += bench.cases_not_yet()

    elapsed = time.monotonic() - t_start
    table = format_table(TABLE_HEADERS, [r.cells() for r in rows])
    header = (f"hv benchmarks — {'quick' if args.quick else 'full'} run, {runs} run(s) per case "
              f"and side, interleaved hv/QEMU\n"
              f"machine: {info['cpu']}, kernel {info['kernel']}, {info['cores']} cores; "
              f"{info['qemu']}\n"
              f"hv commit {info['commit'][:12]}{' + uncommitted changes' if info['dirty'] else ''}; "
              f"guest TSC {hz / 1e6:.1f} MHz ({hz_src}); total {elapsed:.0f} s")
    print()
    print(header)
    print()
    print(table)
    if bench.problems:
        print("\nproblems:")
        for p in bench.problems:
            print("  - " + p)
    if args.plot:
        why = plot_time_to_x(bench, args.plot)
        print(f"\nplot: {why}" if why else f"\nplot written to {args.plot}")
    if args.json:
        out = {"machine": info, "runs": runs, "quick": args.quick, "tsc_hz": hz, "tsc_source": hz_src,
               "elapsed_s": elapsed, "samples": bench.samples, "first_bytes": bench.first_bytes,
               "problems": bench.problems, "header": header, "table": table}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"JSON written to {args.json}")
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Writes the seed corpora under Fuzz/corpus/TARGET/ (committed; run again when a format changes).

Seeds are real traffic and real files wherever hv has them: the IPC schema's test vectors, hv's
own test guests (a multiboot ELF and a bzImage), images made by qemu-img and qemu-io, the shipped
sandbox profiles and plugin manifests, a snapshot of the demo guest taken by hvctl (pass its
directory with --snapshot DIR, or the seeds that need one are left as they are), and by-hand
sequences for the register-level targets. Needs gcc, binutils, qemu-utils.

usage: Fuzz/make-seeds.py [--snapshot DIR]
"""
import argparse, json, os, shutil, struct, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "Fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


def u16(v): return struct.pack("<H", v & 0xFFFF)
def u32(v): return struct.pack("<I", v & 0xFFFFFFFF)
def u64(v): return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def ipc():
    vectors = json.load(open(os.path.join(ROOT, "ipc-schema", "vectors.json")))["vectors"]
    for v in vectors:
        if "frame_hex" in v:
            put("ipc-frame", v["name"], bytes.fromhex(v["frame_hex"]))
    # Register ring: push, pop, scribble on indices and entries, ask what is served.
    put("ipc-register-ring", "push-pop", bytes([0, 0, 0, 1, 1, 7]))
    put("ipc-register-ring", "device-lies", bytes([0, 1, 0, 2, 0, 9, 0, 0, 0, 1, 2, 2, 0xFF, 0xFF, 0, 0, 1, 7, 4, 2, 3, 5, 0, 0, 0, 2, 4, 1, 0, 0, 0, 4, 5, 5, 0, 0, 0, 6, 4]))
    put("ipc-register-ring", "entries", bytes([0, 0, 3, 16, 0, 0, 0] + list(range(8)) + [1, 2, 2, 1, 0, 0, 0, 1, 1]))
    # Frame port: the NIC publishes a frame in slot 0, the switch takes it.
    frame = bytes([0xFF] * 6 + [2, 0, 0, 0, 0, 1] + [8, 0] + [0] * 46)
    slot = u32(len(frame)) + u32(0) + frame
    put("ipc-frame-port", "one-frame", bytes([1, 0, 0, 0, 0, len(slot)]) + slot + bytes([0, 0, 1, 0, 0, 0, 2, 4, 3, 7, 10]))
    put("ipc-frame-port", "bad-length", bytes([1, 0, 0, 0, 0, 8]) + u32(9999) + u32(0) + bytes([0, 0, 2, 0, 0, 0, 2, 2, 4]))
    put("ipc-frame-port", "corrupt-index", bytes([0, 0, 0xFF, 0xFF, 0, 0, 2, 4, 0, 2, 0, 0, 0, 0x80, 4]))
    put("device-settings", "disk", b"path=/disk.img\nreadonly=1\nserial=hv0001\nrate_bw=1048576,0,100\nrate_ops=100,10,1000")
    put("device-settings", "escapes", b"name=a\\nb\\\\c\nempty=\nflag\n=novalue\nrate_bw=1,2")


def virtqueue_seed(size, table, avail, used, event, descriptors, heads, avail_index, extra=b""):
    mem = bytearray(0x3000)
    for i, (addr, length, flags, nxt) in enumerate(descriptors):
        struct.pack_into("<QIHH", mem, 16 * i, addr, length, flags, nxt)
    a = avail - table
    struct.pack_into("<HH", mem, a, 0, avail_index)
    for i, h in enumerate(heads):
        struct.pack_into("<H", mem, a + 4 + 2 * i, h)
    head = bytes([size.bit_length() - 1]) + u16(table) + u16(avail) + u16(used) + bytes([event])
    return head + bytes(mem) + extra


def guest():
    # size 8, table at 0x1000, avail at 0x1100, used at 0x1200 (offsets from the table).
    t, a, u = 0x1000, 0x1100, 0x1200
    put("virtqueue", "read-write-chain", virtqueue_seed(8, t, a, u, 0, [(0x4000, 16, 1, 1), (0x5000, 64, 2, 0)], [0], 1))
    put("virtqueue", "two-chains-event-idx", virtqueue_seed(8, t, a, u, 1, [(0x4000, 32, 0, 0), (0x5000, 8, 3, 2), (0x6000, 8, 2, 0)], [0, 1], 2))
    put("virtqueue", "loop", virtqueue_seed(4, t, a, u, 0, [(0x4000, 16, 1, 1), (0x4000, 16, 1, 0)], [0], 1))
    put("virtqueue", "outside-ram", virtqueue_seed(4, t, a, u, 0, [(0xFFFF_0000, 4096, 2, 0)], [0], 1))
    put("virtqueue", "indirect", virtqueue_seed(4, t, a, u, 0, [(0x4000, 32, 4, 0)], [0], 1))

    def scsi(cdb, out=b"", cap=4096):
        return bytes([len(cdb)]) + bytes(cdb) + u16(len(out)) + bytes(out) + u16(cap)
    disk = [scsi([0x00] + [0] * 5), scsi([0x12, 0, 0, 0, 96, 0], cap=96), scsi([0x12, 1, 0x80, 0, 255, 0], cap=255),
            scsi([0x12, 1, 0x83, 0, 255, 0], cap=255), scsi([0x12, 1, 0xB0, 0, 64, 0]), scsi([0x12, 1, 0xB2, 0, 64, 0]),
            scsi([0x25] + [0] * 9, cap=8), scsi([0x9E, 0x10] + [0] * 11 + [32, 0, 0], cap=32),
            scsi([0x28, 0, 0, 0, 0, 8, 0, 0, 2, 0], cap=1024), scsi([0x2A, 0, 0, 0, 0, 9, 0, 0, 1, 0], out=b"\xAB" * 200, cap=0),
            scsi([0x2A, 0, 0, 0, 0, 9, 0, 0, 1, 0], cap=0), scsi([0x88, 0] + [0] * 7 + [4] + [0, 0, 0, 1, 0, 0], cap=512),
            scsi([0x1A, 0, 0x3F, 0, 255, 0], cap=255), scsi([0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0], cap=255),
            scsi([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], out=u16(22)[::-1] + u16(16)[::-1] + b"\0" * 4 + struct.pack(">QI", 16, 8) + b"\0" * 4, cap=0),
            scsi([0x93, 0x08] + [0] * 7 + [32] + [0, 0, 0, 4, 0, 0], out=b"\0" * 512, cap=0),
            scsi([0x35] + [0] * 9), scsi([0x03, 0, 0, 0, 18, 0], cap=18), scsi([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], cap=256),
            scsi([0xFF] * 6)]
    put("scsi-disk", "driver-start", bytes([0]) + b"".join(disk[:8]))
    put("scsi-disk", "io", bytes([0]) + b"".join(disk[8:12]))
    put("scsi-disk", "modes-unmap-writesame", bytes([0]) + b"".join(disk[12:]))
    put("scsi-disk", "read-only", bytes([0x80]) + disk[9] + disk[15] + disk[14] + disk[17])
    cd = [scsi([0x00] * 6), scsi([0x12, 0, 0, 0, 96, 0], cap=96), scsi([0x25] + [0] * 9, cap=8),
          scsi([0x43, 0, 0, 0, 0, 0, 0, 0x03, 0x24, 0], cap=804), scsi([0x43, 2, 1, 0, 0, 0, 0, 0, 64, 0], cap=64),
          scsi([0x46, 2, 0, 0, 0, 0, 0, 0, 255, 0], cap=255), scsi([0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], cap=8),
          scsi([0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0], cap=2048), scsi([0x1E, 0, 0, 0, 1, 0]), scsi([0x1B, 0, 0, 0, 2, 0]),
          scsi([0xFF]), scsi([0x00] * 6), scsi([0x03, 0, 0, 0, 18, 0], cap=18), scsi([0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], cap=34),
          scsi([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 255, 0], cap=255), scsi([0xBD, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], cap=8)]
    put("scsi-cdrom", "with-medium", bytes([1]) + b"".join(cd))
    put("scsi-cdrom", "empty-tray", bytes([0]) + b"".join(cd[:8]))
    # UART: DLAB, divisor, LCR, FIFO, IER, THR, bytes in, status reads.
    put("uart-16550", "linux-setup", bytes([1, 3, 0x80, 1, 0, 1, 1, 1, 0, 1, 3, 3, 1, 2, 0xC7, 1, 4, 0x0B, 1, 1, 0x0F,
                                           1, 0, 0x41, 0, 5, 2, 0x61, 2, 0x62, 0, 2, 0, 0, 0, 5, 3, 0, 6, 4, 0, 7, 1, 7, 0x55, 0, 7]))
    put("uart-16550", "loopback-fifo", bytes([1, 4, 0x10, 1, 2, 0x01, 1, 0, 0x58, 0, 0] + [2, 0x30] * 20 + [0, 5, 3, 0, 2, 4]))
    # Platform: CMOS reads of the RTC and memory, an RTC alarm and periodic rate, i8042 commands,
    # PCI config of each function, reset control, PM1 enable and sleep.
    cmos = bytes([0, 0, 0, 0x00, 0, 2, 0, 0, 0x0A, 0, 3, 0x2F, 0, 0, 0x0B, 0, 3, 0x62, 0, 4, 0, 0, 0x10, 0, 0, 0x0C, 0, 2,
                  0, 0, 0x34, 0, 2, 0, 0, 0x5B, 0, 2, 0, 5])
    kbd = bytes([0, 6, 0x20, 0, 8, 0, 6, 0x60, 0, 7, 0x47, 0, 6, 0xAA, 0, 8, 0, 6, 0xD1, 0, 7, 0xDF, 0, 6, 0xFE])
    pci = bytes([2, 9, 0, 0, 0, 0, 2, 9, 1, 0x59, 0, 1, 0x33, 0, 0, 0, 0, 9, 2, 0x90, 0, 1, 0x01, 0xB1, 0, 0, 2, 9, 2, 0x80, 0, 1, 1, 0, 0, 0,
                 0, 10, 0x02, 0, 10, 0x06])
    pm = bytes([1, 11, 2, 1, 0x20, 0, 0, 0, 1, 11, 4, 1, 0x01, 0, 0, 0, 1, 11, 8, 0, 1, 11, 4, 1, 0x00, 0x20, 0, 0])
    put("bios-platform", "cmos-rtc", cmos)
    put("bios-platform", "i8042", kbd)
    put("bios-platform", "pci-reset-pm", pci + pm)
    # fw_cfg: signature, id, file directory by the data port; then a DMA read of the file
    # directory and a DMA write of a selector, the way SeaBIOS does them.
    sel = lambda k: bytes([1, 0]) + u16(k)
    data = lambda n: bytes([0, 1]) * n
    desc = lambda control, length, address: struct.pack(">IIQ", control, length, address)
    put("fw-cfg", "ports", sel(0) + data(4) + sel(1) + data(4) + sel(0x19) + data(64) + bytes([3, 2]) + bytes([0, 0, 0, 0, 0, 0, 0, 0]))
    put("fw-cfg", "dma", bytes([3, 5]) + u16(0x100) + desc(0x19 << 16 | 0x8 | 0x2, 64, 0x200) + bytes([1]) +
        bytes([3, 5]) + u16(0x100) + desc(0x2 | 0x4, 16, 0x300) + bytes([1]) + bytes([2, 4, 4]))
    put("fw-cfg", "dma-anywhere", bytes([3, 5]) + u16(0xFFF0) + desc(0x2, 0xFFFFFFFF, 0xFFFF_FFFF_FFFF_0000) + bytes([0]) + u64(0xFFF0))


def images(tmp):
    def qemu(*args):
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)

    def img(name, create, io=(), convert=None):
        path = os.path.join(tmp, name)
        qemu("qemu-img", "create", "-q", "-f", "qcow2", *create, path, "64K")
        for cmd in io:
            qemu("qemu-io", "-f", "qcow2", "-c", cmd, path)
        if convert:
            out = path + ".c"
            qemu("qemu-img", "convert", "-q", "-O", "qcow2", *convert, path, out)
            path = out
        ops = bytes([0] * 0) + u64(0) + u16(600) + bytes([0]) + u64(1024) + u16(4000) + bytes([1]) + u64(30000) + u16(512) + bytes([2]) + u64(9) + u16(100) + bytes([1]) + u64(0) + u16(1) + bytes([3])
        ops = (ops + bytes(64))[:64]
        put("qcow2-image", name, bytes([0]) + ops + open(path, "rb").read())
    open(os.path.join(tmp, "base.raw"), "wb").write(b"\x77" * 65536)
    img("v3-empty", ["-o", "cluster_size=512"])
    img("v2-written", ["-o", "cluster_size=512,compat=0.10"], ["write -P 0x5a 0 4k", "write -P 0x11 32k 1k"])
    img("v3-zero-discard", ["-o", "cluster_size=512"], ["write -P 0x22 0 8k", "write -z 1k 2k", "discard 4k 1k"])
    img("backing-name", ["-o", "cluster_size=512", "-b", "base.raw", "-F", "raw"])
    img("compressed", ["-o", "cluster_size=4096"], ["write -P 0x33 0 16k"], convert=["-c", "-o", "cluster_size=4096"])

    out = os.path.join(tmp, "guests")
    subprocess.run(["bash", os.path.join(ROOT, "Tests", "Guests", "build.sh"), out], check=True, stdout=subprocess.DEVNULL)
    put("multiboot", "testguest.elf", open(os.path.join(out, "testguest.elf"), "rb").read())
    # The a.out kludge form: header with flags bit 16 and load addresses.
    kludge = struct.pack("<III", 0x1BADB002, 0x00010003, (-(0x1BADB002 + 0x00010003)) & 0xFFFFFFFF)
    kludge += struct.pack("<IIIII", 0x100000, 0x100000, 0x100040, 0x101000, 0x100020)
    put("multiboot", "aout-kludge", kludge + b"\xF4" * 32)
    bz = open(os.path.join(out, "bootparams-probe.bzImage"), "rb").read()
    put("bzimage", "bootparams-probe", u32(100) + bz)

    # A small dynamically linked ELF with a run path, as the jail reads device binaries.
    src = os.path.join(tmp, "tiny.c")
    open(src, "w").write("int puts(const char *); int main(void) { return puts(\"hv\"); }\n")
    exe = os.path.join(tmp, "tiny")
    subprocess.run(["gcc", "-Os", "-s", "-o", exe, src, "-Wl,-rpath,/opt/hv/lib", "-Wl,-z,noseparate-code",
                    "-Wl,--build-id=none"], check=True)
    put("elf-dynamic", "tiny-rpath", open(exe, "rb").read())

    # State records: an in-flight record (2 queues, heads 3 and 5 in flight, a completion under
    # way), a LUN state with a unit attention, a console journal.
    queues = 2
    rec = bytearray(8 + queues * 140)
    struct.pack_into("<IHH", rec, 0, 0x46495648, 1, queues)
    struct.pack_into("<HHHH", rec, 8, 4, 2, 3, 5)
    rec[8 + 8] = (1 << 3) | (1 << 5)
    struct.pack_into("<I", rec, 8 + queues * 136, 2)
    heads = b"".join(u16(h) for h in [3, 5, 1, 2, 3, 4, 5, 6] * 4)
    put("state-records", "inflight", bytes([queues - 1, 3]) + u16(3) + heads + bytes(rec))
    pre = bytes([0, 0]) + u16(0) + bytes(64)
    put("state-records", "lun-state", pre + b"HVLU" + bytes([5, 0x24, 0, 1, 6, 0x28, 0, 2, 1, 1, 0, 0]))
    put("state-records", "console-journal", pre + u32(0x4A535648) + u32(7) + u64(4096) + u64(100))


def documents(snapshot):
    profiles = os.path.join(ROOT, "sandbox-profiles")
    for name in sorted(os.listdir(profiles)):
        if name.endswith(".json"):
            text = open(os.path.join(profiles, name), "rb").read().replace(b'"base-device"', b'"base"')
            put("sandbox-profile", name, text)
            put("json", "profile-" + name, text)
    for example in ["c-rng", "python-counter", "swift-rng"]:
        text = open(os.path.join(ROOT, "Plugins", "examples", example, "manifest.json"), "rb").read()
        put("plugin-manifest", example + ".json", text)
        put("json", "manifest-" + example + ".json", text)
    put("json", "edge-cases", b'{"a": [1, -2.5e10, true, false, null, "\\u00e9\\ud83d\\ude00\\n"], "b": {}, "c": [], "d": 18446744073709551615}')
    for req in [{"command": "status"}, {"command": "stop"}, {"command": "cdrom-insert", "path": "/srv/a.iso"},
                {"command": "device-upgrade", "device": "serial0", "path": "/opt/hv/hv-serial"},
                {"command": "snapshot", "path": "/srv/snap", "stop": True}, {"command": "status", "registers": True}]:
        put("control-request", req["command"] + ("-r" if req.get("registers") else ""), json.dumps(req).encode())
    vm = {"name": "web1", "cpus": 2, "memory_mib": 256, "boot": {"multiboot": "/srv/guest.elf", "cmdline": "mode=count"},
          "disks": [{"path": "/srv/disk.qcow2", "format": "qcow2", "rate_limit": {"bandwidth": {"size": 1048576, "refill_time_ms": 100}}},
                    {"path": "/srv/ro.img", "readonly": True}],
          "cdrom": "/srv/cd.iso", "nics": [{"segment": "lan", "mac": "52:54:00:12:34:56"}, {"tap": "tap0"}],
          "serial": {"output": "file", "path": "/srv/console.log"}, "autostart": True}
    put("vm-definition", "full", json.dumps(vm, indent=1).encode())
    put("vm-definition", "minimal", b'{"name": "a", "boot": {"kernel": "k"}}')
    if snapshot:
        state = open(os.path.join(snapshot, "state"), "rb").read()
        put("snapshot-state", "demo-guest", b"\x00" + state)
        # The same sections framed by the target (odd first byte), so mutations keep checksums.
        sections, at = [], 32
        count = struct.unpack_from("<I", state, 12)[0]
        for _ in range(count):
            tag, _, length = struct.unpack_from("<IIQ", state, at)
            sections.append((tag, state[at + 24:at + 24 + length]))
            at += 24 + length
        framed = b"".join(bytes([t]) + u16(len(p)) + p for t, p in sections if len(p) < 65536)
        put("snapshot-state", "demo-guest-framed", b"\x01" + framed)
        memory = struct.unpack_from("<Q", dict(sections)[2], 0)[0]
        hello = u64(memory) + u32(1) + u32(0) + u32(40) + u32(len(dict(sections)[1])) + dict(sections)[1]
        frames = [(1, hello), (4, u64(0) + b"\x90" * 4096), (5, u64(8192) + u64(4096)), (6, b"\x00" + state[:65000] if len(state) < 65000 else b"\x00"), (7, b"")]
        put("migration-stream", "demo-guest", b"\x01" + b"".join(bytes([t]) + u16(len(p)) + p for t, p in frames))
        # The opening itself (48 bytes: magic, version 2, protection, nonce) as a raw stream: in the
        # clear, then with a key (bit 1: the destination holds one), a proof and a sealed record after it.
        def opening(mode, nonce):
            return b"HVMIGR\r\n" + u32(2) + u32(mode) + nonce
        put("migration-stream", "opening-plaintext", b"\x00" + opening(0, bytes(32)) + bytes(16))
        put("migration-stream", "opening-key", b"\x02" + opening(1, bytes([0x11]) * 32) + bytes([0x22]) * 32 + u32(48) + bytes(48))
    else:
        for target in ["snapshot-state", "migration-stream"]:
            if not os.path.isdir(os.path.join(CORPUS, target)):
                sys.exit(f"make-seeds: {target} needs a snapshot: pass --snapshot DIR (hvctl snapshot NAME DIR of the demo guest)")
    # The learning switch: stations on three ports talk, one leaves, time passes.
    put("learning-switch", "three-stations", bytes([0, 1, 1, 0, 2, 0, 2, 0, 2, 0, 1, 0, 1, 1, 0, 0, 1, 2, 3, 0, 0, 0x10, 0, 1, 0, 2, 0, 1]))


def firecracker():
    """Firecracker API bodies as Firecracker's own getting-started guide sends them (first byte:
    which body the firecracker-api target decodes)."""
    limiter = {"bandwidth": {"size": 1048576, "one_time_burst": 0, "refill_time": 100}, "ops": {"size": 100, "refill_time": 1000}}
    boot = {"kernel_image_path": "/srv/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off", "initrd_path": None}
    drive = {"drive_id": "rootfs", "path_on_host": "/srv/rootfs.ext4", "is_root_device": True, "is_read_only": False, "rate_limiter": limiter}
    nic = {"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0", "rx_rate_limiter": limiter}
    machine = {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False, "track_dirty_pages": False}
    balloon = {"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 1}
    bodies = [
        (0, "machine-config", machine), (1, "balloon", balloon), (2, "balloon-update", {"amount_mib": 32}),
        (3, "balloon-statistics", {"stats_polling_interval_s": 5}), (4, "boot-source", boot), (5, "rate-limiter", limiter),
        (6, "drive", drive), (7, "drive-patch", {"drive_id": "rootfs", "path_on_host": "/srv/other.ext4"}),
        (8, "network-interface", nic), (9, "network-interface-patch", {"iface_id": "eth0", "tx_rate_limiter": limiter}),
        (10, "logger", {"log_path": "/tmp/fc.log", "level": "Debug", "show_level": True, "show_log_origin": True}),
        (11, "metrics", {"metrics_path": "/tmp/fc.metrics"}), (12, "actions", {"action_type": "InstanceStart"}),
        (13, "vm-state", {"state": "Paused"}),
        (14, "snapshot-create", {"snapshot_type": "Full", "snapshot_path": "/srv/snap", "mem_file_path": "/srv/mem"}),
        (14, "snapshot-load", {"snapshot_path": "/srv/snap", "mem_backend": {"backend_path": "/srv/mem", "backend_type": "File"}, "resume_vm": True}),
        (15, "config-file", {"boot-source": boot, "drives": [drive], "machine-config": machine, "network-interfaces": [nic],
                             "balloon": balloon, "logger": None, "vsock": None}),
    ]
    for kind, name, body in bodies:
        put("firecracker-api", name, bytes([kind]) + json.dumps(body).encode())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshot", help="a snapshot directory of the demo guest (hvctl snapshot)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ipc()
        guest()
        images(tmp)
        documents(a.snapshot)
        firecracker()
    for target in sorted(os.listdir(CORPUS)):
        files = os.listdir(os.path.join(CORPUS, target))
        print(f"{target:20} {len(files):3} seeds, {sum(os.path.getsize(os.path.join(CORPUS, target, f)) for f in files):7} bytes")


if __name__ == "__main__":
    main()

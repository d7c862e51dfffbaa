"""hvdevice: write an hv device plugin in Python.

A device is a class with ``read`` and ``write`` methods for the guest's register accesses, and
``save``/``restore`` for the state that must survive a crash; ``hvdevice.run(MyDevice)`` does the
rest: it locks the process down under hv's seccomp filter, answers the core's HELLO, serves the
register ring in order, commits the device's state to the core-owned state page, and answers
SHUTDOWN. Everything here follows ipc-schema/README.md (protocol 1.0) and uses the standard
library only, so it runs in hv's jail with nothing but the interpreter's own files.

A minimal device::

    import hvdevice

    class Scratch(hvdevice.Device):
        model = "scratch"
        def start(self, runtime, restored):
            if not restored:
                self.value = 0
        def read(self, resource, offset, size):
            return self.value
        def write(self, resource, offset, size, value):
            self.value = value
        def save(self):
            return self.value.to_bytes(8, "little")
        def restore(self, data):
            self.value = int.from_bytes(data[:8], "little")

    hvdevice.run(Scratch)

Rules a plugin author must know:

* Import every module before calling ``run``: once the device is locked down, ``openat`` is gone,
  so an ``import`` inside ``read`` fails.
* ``read`` and ``write`` must not block and must not touch the host: the guest's vCPU waits on each
  read. What they change lives in the object until the next commit, when ``save()`` is written to
  the state page; a crash before that replays the uncommitted requests from the last saved state,
  so a device that keeps its state in ``save``/``restore`` loses nothing.
* ``restore`` gets bytes another (possibly dead halfway, possibly compromised) process wrote:
  check them before use. At most ``Device.MAX_STATE`` bytes are kept.
"""

import ctypes
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
import zlib

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0

# Message types, flags, statuses (README §6).
HELLO, SHUTDOWN, PING = 0x0001, 0x0002, 0x0003
LOG = 0x0101
FLAG_REPLY, FLAG_NO_REPLY = 0x1, 0x2
OK, UNKNOWN_TYPE, MALFORMED, UNSUPPORTED_VERSION = 0, 1, 2, 3
CAP_REGISTER_RING, CAP_STATE_PAGE = 0x1, 0x2
ROLE_REGISTER_RING, ROLE_RING_KICK, ROLE_RING_REPLY, ROLE_INTERRUPT, ROLE_STATE_PAGE = 2, 3, 4, 5, 6
RESOURCE_KINDS = {1: "pio", 2: "mmio", 3: "pci_config", 4: "pci_mmio_bar", 5: "pci_pio_bar"}
# Which ring operations fit which resource kind (README §9.3).
OPERATION_KINDS = {1: ("pio", "pci_pio_bar"), 2: ("pio", "pci_pio_bar"), 3: ("mmio", "pci_mmio_bar"),
                   4: ("mmio", "pci_mmio_bar"), 5: ("pci_config",), 6: ("pci_config",)}
READS = (1, 3, 5)
LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERROR = 0, 1, 2, 3

CONTROL_FD, EVENTS_FD, LOCKDOWN_FD = 3, 4, 5
# The exit status after a reported seccomp violation (README §2): the core names the system call.
SANDBOX_VIOLATION_STATUS = 159
F_GET_SEALS, F_SEAL_SHRINK, F_SEAL_GROW = 1034, 0x2, 0x4
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 4, 22, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
# A locked instruction is a full fence on x86-64: the ring's sleep protocol needs one (README §9.5).
_fence_word = ctypes.c_int(0)
_libc.pthread_spin_init(ctypes.byref(_fence_word), 0)  # its "unlocked" value is libc's business


def fence():
    """A full memory fence (seq_cst), through a locked read-modify-write in libc."""
    _libc.pthread_spin_lock(ctypes.byref(_fence_word))
    _libc.pthread_spin_unlock(ctypes.byref(_fence_word))


class Device:
    """Subclass this; ``run`` makes one instance per process and calls these."""

    #: The device model name sent in the HELLO reply.
    model = "python-device"
    #: The most bytes ``save`` may return.
    MAX_STATE = 2000

    def start(self, runtime, restored):
        """Called once after the handshake. ``restored`` is True when ``restore`` has just been
        given the state a previous process of this device saved (a restart)."""

    def read(self, resource, offset, size):
        """A guest read of ``size`` bytes at ``offset`` in resource number ``resource``; return an int."""
        return (1 << (8 * size)) - 1

    def write(self, resource, offset, size, value):
        """A guest write."""

    def save(self):
        """The state to keep across a crash, as bytes (called at each commit)."""
        return b""

    def restore(self, data):
        """Rebuild the state from what ``save`` returned in an earlier process."""


class Resource:
    """One address range routed to the device: ``kind`` ("pio", "mmio", "pci_config", …), ``base``, ``length``."""

    def __init__(self, kind, base, length):
        self.kind, self.base, self.length = kind, base, length

    def __repr__(self):
        return f"Resource({self.kind}, 0x{self.base:x}, {self.length})"


class Runtime:
    """What the core handed the device: its instance name, settings, resources and interrupt lines."""

    def __init__(self, name):
        self.name = name
        self.settings = {}
        self.resources = []
        self.generation = 0
        self.interrupts = {}
        self._seq = 0

    def log(self, level, text):
        """One line to the operator (WARNING and ERROR are always shown, with the instance name)."""
        data = text.replace("\n", " ").encode("utf-8", "replace")[:4096]
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        frame = struct.pack("<HHIiI", LOG, FLAG_NO_REPLY, self._seq, 0, 4 + len(data))
        try:
            os.write(EVENTS_FD, frame + struct.pack("<BBH", level, 0, len(data)) + data)
        except OSError:
            pass

    def raise_interrupt(self, line=0):
        """An edge on the device's interrupt line ``line`` (its order in the manifest's irqs)."""
        os.write(self.interrupts[line], (1).to_bytes(8, "little"))


def fail(runtime_or_name, text):
    """Log one ERROR line (the operator sees it as the device's last error) and exit 2."""
    name = runtime_or_name.name if isinstance(runtime_or_name, Runtime) else runtime_or_name
    if isinstance(runtime_or_name, Runtime):
        runtime_or_name.log(LOG_ERROR, text)
    try:
        os.write(2, f"{name}: {text}\n".encode("utf-8", "replace"))
    except OSError:
        pass
    os._exit(2)


# struct sigaction as glibc lays it out on x86-64: handler, a 1024-bit mask, flags, restorer.
class _SigAction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


SA_SIGINFO = 4
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20

# README §2's SIGSYS reporter: one LOG frame (NO_REPLY, id 0xffffffff, level ERROR, text
# "sandbox: denied syscall N") on the events socket, then exit_group(159). It must be native
# code: only siginfo holds the system call's number, Python's own handlers never see siginfo and
# run only after the trapped call has returned; and a ctypes callback needs libffi's closure
# allocator, which itself makes calls (statfs, temporary files) no device profile allows. So it
# is these 131 bytes of x86-64 (hv runs on x86-64 hosts only), assembled from:
#
#   handler:                          # void handler(int sig, siginfo_t *info, void *context)
#       mov   eax, [rsi + 24]         # info->si_syscall
#       sub   rsp, 80                 # the frame is built here: the template, then the digits
#       lea   rsi, [rip + template]   # (the 44 template bytes follow the code)
#       xor   ecx, ecx
#   1:  mov   dl, [rsi + rcx]         # copy the template
#       mov   [rsp + rcx], dl
#       inc   ecx
#       cmp   ecx, 44
#       jne   1b
#       lea   r9, [rsp + 80]          # the decimal digits, last first, at the top of the area
#       mov   ecx, 10
#   2:  xor   edx, edx
#       div   ecx
#       add   dl, 48                  # '0'
#       dec   r9
#       mov   [r9], dl
#       test  eax, eax
#       jnz   2b
#       lea   rdi, [rsp + 44]         # moved down behind the template
#   3:  mov   dl, [r9]
#       mov   [rdi], dl
#       inc   r9
#       inc   rdi
#       lea   rax, [rsp + 80]
#       cmp   r9, rax
#       jne   3b
#       mov   rdx, rdi
#       sub   rdx, rsp                # the frame's length
#       lea   eax, [rdx - 16]
#       mov   [rsp + 12], eax         # the header's payload length
#       lea   eax, [rdx - 20]
#       mov   [rsp + 18], ax          # the LOG record's text length
#       mov   rsi, rsp
#       mov   edi, 4                  # EVENTS_FD
#       mov   eax, 1                  # write
#       syscall
#       mov   edi, 159                # SANDBOX_VIOLATION_STATUS
#       mov   eax, 231                # exit_group
#       syscall
#       hlt
_SIGSYS_REPORTER = bytes.fromhex(
    "8b46184883ec50488d357500000031c98a140e88140cffc183f92c75f34c8d4c2450b90a00000031d2f7f180c2"
    "3049ffc941881185c075ef488d7c242c418a11881749ffc148ffc7488d4424504939c175eb4889fa4829e28d42"
    "f08944240c8d42ec66894424124889e6bf04000000b8010000000f05bf9f000000b8e70000000f05f4")
_SIGSYS_TEMPLATE = (struct.pack("<HHIiI", LOG, FLAG_NO_REPLY, 0xFFFFFFFF, 0, 0) + struct.pack("<BBH", LOG_ERROR, 0, 0)
                    + b"sandbox: denied syscall ")


def _install_sigsys_reporter(name):
    """Map the reporter (written, then made read-only and executable) and make it SIGSYS's handler."""
    assert len(_SIGSYS_REPORTER) == 131 and len(_SIGSYS_TEMPLATE) == 44 and EVENTS_FD == 4
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = _libc.mmap(None, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if page in (None, ctypes.c_void_p(-1).value):
        fail(name, f"cannot map the SIGSYS reporter: {os.strerror(ctypes.get_errno())}")
    code = _SIGSYS_REPORTER + _SIGSYS_TEMPLATE
    ctypes.memmove(page, code, len(code))
    if _libc.mprotect(page, 4096, PROT_READ | PROT_EXEC) != 0:
        fail(name, f"cannot make the SIGSYS reporter executable: {os.strerror(ctypes.get_errno())}")
    action = _SigAction()
    action.handler = page
    action.flags = SA_SIGINFO
    if _libc.sigaction(signal.SIGSYS, ctypes.byref(action), None) != 0:
        fail(name, f"cannot install the SIGSYS reporter: {os.strerror(ctypes.get_errno())}")


def _lock_down(name):
    """README §2: read the filter from fd 5, install the SIGSYS reporter, become non-dumpable,
    install the filter."""
    if os.environ.get("HV_SANDBOXED") != "1":
        return
    program = b""
    while True:
        chunk = os.read(LOCKDOWN_FD, 65536)
        if not chunk:
            break
        program += chunk
    os.close(LOCKDOWN_FD)
    if not program or len(program) % 8:
        fail(name, "the lock-down filter on fd 5 is empty or not whole instructions")
    buffer = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _install_sigsys_reporter(name)
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        fail(name, "prctl(PR_SET_DUMPABLE) failed")
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        fail(name, f"cannot install the lock-down filter: {os.strerror(ctypes.get_errno())}")


def _map_sealed(fd, size, what, name):
    """Map a core-owned region after checking its seals and size (README §7)."""
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    if seals & (F_SEAL_SHRINK | F_SEAL_GROW) != (F_SEAL_SHRINK | F_SEAL_GROW):
        fail(name, f"the {what} is not sealed against shrinking and growing")
    if os.fstat(fd).st_size < size:
        fail(name, f"the {what} is smaller than {size} bytes")
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _settings(text):
    """HELLO's config: key=value lines, with \\\\ and \\n escapes (README §5.1)."""
    settings = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, _, raw = line.partition("=")
        value, i = [], 0
        while i < len(raw):
            c = raw[i]
            if c == "\\" and i + 1 < len(raw):
                i += 1
                value.append("\n" if raw[i] == "n" else raw[i])
            else:
                value.append(c)
            i += 1
        settings[key] = "".join(value)
    return settings


class _StatePage:
    """Two slots of [sequence, length, crc32, data]: a process killed halfway through a save
    leaves the other slot intact."""

    SLOT = 2048

    def __init__(self, page):
        self.page = page
        self.sequence = 0
        self.last = None

    def load(self):
        best = None
        for slot in (0, 1):
            base = slot * self.SLOT
            sequence, length, crc = struct.unpack_from("<III", self.page, base)
            if length > self.SLOT - 12:
                continue
            data = bytes(self.page[base + 12:base + 12 + length])
            if sequence and zlib.crc32(data) == crc and (best is None or sequence > best[0]):
                best = (sequence, data)
        if best is None:
            return None
        self.sequence, self.last = best
        return best[1]

    def save(self, data):
        if data == self.last:
            return
        self.sequence = (self.sequence + 1) & 0xFFFFFFFF or 1
        base = (self.sequence & 1) * self.SLOT
        struct.pack_into("<III", self.page, base, 0, len(data), zlib.crc32(data))
        self.page[base + 12:base + 12 + len(data)] = data
        struct.pack_into("<I", self.page, base, self.sequence)  # last: the slot is whole
        self.last = data


def run(device_class):
    """Run ``device_class`` as this process's device, until SHUTDOWN or the core goes away."""
    name = sys.argv[1] if len(sys.argv) > 1 else "device"
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(0)
    # The socket object first: CPython asks the kernel about the descriptor (getsockname), which
    # the lock-down filter need not allow.
    control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, CONTROL_FD)
    _lock_down(name)
    runtime = Runtime(name)

    # HELLO (README §5.1, §8).
    try:
        message, ancillary, _, _ = control.recvmsg(65536, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC)
    except OSError as error:
        fail(name, f"cannot read HELLO: {error}")
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"<{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    if len(message) < 16:
        os._exit(0)  # the core closed the socket
    kind, flags, request_id, _, length = struct.unpack_from("<HHIiI", message)
    payload = message[16:]

    def reply(kind, request_id, status, body=b""):
        control.sendmsg([struct.pack("<HHIiI", kind, FLAG_REPLY, request_id, status, len(body)) + body])

    if kind != HELLO or flags & FLAG_REPLY or length != len(payload) or len(payload) < 32:
        fail(name, "the first message was not a well-formed HELLO")
    major, minor, offered, generation, regions, resources, fd_count, config_length, reserved = \
        struct.unpack_from("<IIQIHHHHI", payload)
    if major != PROTOCOL_MAJOR:
        reply(HELLO, request_id, UNSUPPORTED_VERSION)
        fail(name, f"the core speaks protocol {major}.x; this SDK speaks {PROTOCOL_MAJOR}.x")
    end = 32 + 24 * regions + 24 * resources + 4 * fd_count + config_length
    if reserved or fd_count != len(fds) or end != len(payload):
        reply(HELLO, request_id, MALFORMED)
        fail(name, "malformed HELLO")
    at = 32 + 24 * regions
    for _ in range(resources):
        code, r0, r1, r2, base, size = struct.unpack_from("<BBHIQQ", payload, at)
        runtime.resources.append(Resource(RESOURCE_KINDS.get(code, "unknown"), base, size))
        at += 24
    roles = {}
    for fd in fds:
        role, index = struct.unpack_from("<HH", payload, at)
        at += 4
        if role == ROLE_INTERRUPT:
            runtime.interrupts[index] = fd
        else:
            roles[role] = fd
    runtime.settings = _settings(payload[at:at + config_length].decode("utf-8", "replace"))
    runtime.generation = generation
    runtime._seq = 0

    if not (offered & CAP_STATE_PAGE) or ROLE_STATE_PAGE not in roles:
        reply(HELLO, request_id, MALFORMED)
        fail(name, "no state page offered: a Python device keeps its state there")
    state = _StatePage(_map_sealed(roles[ROLE_STATE_PAGE], 4096, "state page", name))
    accepted = CAP_STATE_PAGE
    ring = None
    if runtime.resources:
        if not (offered & CAP_REGISTER_RING) or ROLE_REGISTER_RING not in roles:
            reply(HELLO, request_id, MALFORMED)
            fail(name, "resources routed without a register ring")
        ring = _Ring(roles[ROLE_REGISTER_RING], roles.get(ROLE_RING_KICK), roles.get(ROLE_RING_REPLY), name)
        accepted |= CAP_REGISTER_RING

    device = device_class()
    saved = state.load() if generation > 0 else None
    if saved is not None:
        device.restore(saved)
    device.start(runtime, saved is not None)
    model = device.model.encode()[:64]
    reply(HELLO, request_id, OK, struct.pack("<IIQHH", PROTOCOL_MAJOR, min(minor, PROTOCOL_MINOR), accepted, len(model), 0) + model)
    state.save(device.save())

    poller = select.poll()
    poller.register(CONTROL_FD, select.POLLIN)
    if ring is not None:
        poller.register(ring.kick, select.POLLIN)
    while True:
        if ring is not None and ring.serve(device, runtime, state):
            continue
        if ring is not None and (ring.spin() or not ring.prepare_to_sleep()):
            continue
        try:
            events = poller.poll(1000)
        except InterruptedError:
            events = []
        if ring is not None:
            ring.woke()
        for fd, _ in events:
            if fd != CONTROL_FD:
                continue
            message = control.recvmsg(65536)[0]  # recvmsg: recv() is recvfrom, which profiles leave out
            if len(message) < 16:
                os._exit(0)  # the core is gone
            kind, flags, request_id, _, length = struct.unpack_from("<HHIiI", message)
            if flags & FLAG_REPLY or flags & FLAG_NO_REPLY:
                continue
            if kind == SHUTDOWN:
                if ring is not None:
                    ring.serve(device, runtime, state)
                state.save(device.save())
                reply(SHUTDOWN, request_id, OK)
                os._exit(0)
            reply(kind, request_id, OK if kind == PING else UNKNOWN_TYPE)


class _Ring:
    """The device's side of the register ring (README §9)."""

    def __init__(self, fd, kick, reply, name):
        header = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
        magic, version, _, rc, sc, request_size, response_size = struct.unpack_from("<IHHIIII", header)
        header.close()
        if magic != 0x47525648 or version != 1 or request_size != 32 or response_size != 16 \
                or rc & (rc - 1) or sc & (sc - 1) or not 1 <= rc <= 65536 or not 1 <= sc <= 65536:
            fail(name, "the register ring's header is not one this SDK reads")
        size = 4096 + rc * 32 + sc * 16
        if size > 16 << 20:
            fail(name, "the register ring is larger than 16 MiB")
        self.memory = _map_sealed(fd, size, "register ring", name)
        self.rc, self.sc = rc, sc
        self.kick, self.reply = kick, reply
        self.name = name
        if kick is not None:
            # fcntl, not os.set_blocking (an ioctl in CPython), so F_GETFL/F_SETFL is all it needs.
            fcntl.fcntl(kick, fcntl.F_SETFL, fcntl.fcntl(kick, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.cursor = self.u32(128)  # request_consumer: resume at the first uncommitted request

    def u32(self, offset):
        return struct.unpack_from("<I", self.memory, offset)[0]

    def set_u32(self, offset, value):
        struct.pack_into("<I", self.memory, offset, value & 0xFFFFFFFF)

    def serve(self, device, runtime, state):
        """Handle what is published; True if there was anything. Commits before returning."""
        published = self.u32(64)
        pending = (published - self.cursor) & 0xFFFFFFFF
        if pending == 0:
            return False
        for _ in range(min(pending, self.rc)):
            index = self.cursor
            entry = bytes(self.memory[4096 + (index & (self.rc - 1)) * 32:4096 + (index & (self.rc - 1)) * 32 + 32])
            operation, size, resource, _, offset, data, tag = struct.unpack("<BBHIQQQ", entry)
            poisoned = self.u32(640) != 0 and self.u32(576) == index
            self.set_u32(448, index)
            self.set_u32(512, 1)
            value = None
            valid = (operation in OPERATION_KINDS and size in (1, 2, 4, 8) and resource < len(runtime.resources)
                     and runtime.resources[resource].kind in OPERATION_KINDS[operation]
                     and offset < runtime.resources[resource].length and size <= runtime.resources[resource].length - offset)
            mask = (1 << (8 * size)) - 1 if size in (1, 2, 4, 8) else 0xFFFFFFFFFFFFFFFF
            if poisoned:
                runtime.log(LOG_WARNING, f"request {index} was poisoned (it killed this device three times): answered without serving")
            elif not valid:
                runtime.log(LOG_WARNING, f"invalid register request: operation {operation}, size {size}, resource {resource}, offset {offset}")
            elif operation in READS:
                try:
                    value = int(device.read(resource, offset, size)) & mask
                except Exception as error:  # a bug in the device must not kill the VM's access
                    runtime.log(LOG_ERROR, f"read failed: {error!r}")
            else:
                try:
                    device.write(resource, offset, size, data & mask)
                except Exception as error:
                    runtime.log(LOG_ERROR, f"write failed: {error!r}")
            if operation in READS:
                self.respond(tag, 0xFFFFFFFFFFFFFFFF if value is None else value)
            self.set_u32(512, 0)
            self.cursor = (self.cursor + 1) & 0xFFFFFFFF
        # Commit: the state first, then the consumer index (x86 keeps stores in order).
        state.save(device.save())
        self.set_u32(128, self.cursor)
        return True

    def respond(self, tag, value):
        capacity_base = 4096 + self.rc * 32
        while True:
            producer, consumer = self.u32(256), self.u32(320)
            if (producer - consumer) & 0xFFFFFFFF < self.sc:
                break
            os.sched_yield()
        struct.pack_into("<QQ", self.memory, capacity_base + (producer & (self.sc - 1)) * 16, tag, value)
        self.set_u32(256, producer + 1)
        fence()
        if self.u32(384) != 0 and self.reply is not None:
            try:
                os.write(self.reply, (1).to_bytes(8, "little"))
            except BlockingIOError:
                pass

    def spin(self, nanoseconds=50_000):
        """Watch the ring for a while before sleeping (README §9.5); True if work arrived."""
        until = time.monotonic_ns() + nanoseconds
        while time.monotonic_ns() < until:
            if self.u32(64) != self.cursor:
                return True
        return False

    def prepare_to_sleep(self):
        """Raise the sleeping flag; False (flag lowered) if work arrived meanwhile."""
        self.set_u32(192, 1)
        fence()
        if self.u32(64) != self.cursor:
            self.set_u32(192, 0)
            fence()
            return False
        return True

    def woke(self):
        self.set_u32(192, 0)
        fence()
        try:
            while True:
                os.read(self.kick, 8)
        except BlockingIOError:
            pass

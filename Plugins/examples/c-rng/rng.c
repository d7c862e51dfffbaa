/*
 * An hv device plugin in C, written from ipc-schema/README.md alone (protocol 1.0): a
 * pseudo-random number generator at eight I/O ports.
 *
 *   port base+0, 4-byte read:  the next 32-bit number (xorshift32)
 *   port base+4, 4-byte write: reseed (0 is taken as 1)
 *
 * The generator's state lives in the state page, saved at every commit, so a device killed
 * between two reads continues the same sequence. Build: cc -O2 -Wall -o rng rng.c
 * Run:   hvctl run --device Plugins/examples/c-rng/manifest.json,seed=42 …
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

enum { CONTROL_FD = 3, EVENTS_FD = 4, LOCKDOWN_FD = 5 };
enum { HELLO = 1, SHUTDOWN = 2, PING = 3, LOG = 0x101 };
enum { FLAG_REPLY = 1, FLAG_NO_REPLY = 2 };
enum { OK = 0, UNKNOWN_TYPE = 1, MALFORMED = 2, UNSUPPORTED_VERSION = 3 };
enum { CAP_REGISTER_RING = 1, CAP_STATE_PAGE = 2 };
enum { ROLE_REGISTER_RING = 2, ROLE_RING_KICK = 3, ROLE_RING_REPLY = 4, ROLE_STATE_PAGE = 6 };
enum { OP_PIO_READ = 1, OP_PIO_WRITE = 2 };

struct frame_header { uint16_t type, flags; uint32_t id; int32_t status; uint32_t length; };

static const char *instance = "rng";
static uint32_t log_id;

/* One datagram each way. sendmsg/recvmsg, not send/recv: libc makes those sendto/recvfrom,
 * which hv's base-device profile does not allow. */
static void send_frame(int fd, const void *data, size_t length)
{
    struct iovec iov = { (void *)data, length };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    (void)sendmsg(fd, &msg, MSG_NOSIGNAL);
}

static ssize_t receive_frame(int fd, void *data, size_t length)
{
    struct iovec iov = { data, length };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    return recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
}

static void say(int level, const char *fmt, ...)
{
    struct { struct frame_header h; uint8_t level, reserved; uint16_t length; char text[256]; } __attribute__((packed)) m;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(m.text, sizeof m.text, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n > (int)sizeof m.text - 1) n = sizeof m.text - 1;
    m.h = (struct frame_header){ LOG, FLAG_NO_REPLY, ++log_id, 0, (uint32_t)(4 + n) };
    m.level = (uint8_t)level; m.reserved = 0; m.length = (uint16_t)n;
    send_frame(EVENTS_FD, &m, sizeof m.h + 4 + (size_t)n);
}

/* One ERROR line (the operator sees it as the device's last error), then exit 2. */
static void die(const char *what)
{
    say(3, "%s", what);
    dprintf(2, "%s: %s\n", instance, what);
    _exit(2);
}

/* README §2: the filter on fd 5 goes in before any message is read. */
static void lock_down(void)
{
    const char *sandboxed = getenv("HV_SANDBOXED");
    if (!sandboxed || strcmp(sandboxed, "1") != 0)
        return;
    static struct sock_filter program[4096];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(LOCKDOWN_FD, (char *)program + have, sizeof program - have);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        have += (size_t)n;
    }
    close(LOCKDOWN_FD);
    if (have == 0 || have % sizeof program[0]) die("the lock-down filter on fd 5 is empty or not whole instructions");
    struct sock_fprog fprog = { (unsigned short)(have / sizeof program[0]), program };
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0) != 0)
        die("cannot install the lock-down filter");
}

/* Map a core-owned memfd after checking its seals and size (README §7). */
static void *map_sealed(int fd, size_t size, const char *what)
{
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) die(what);
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < size) die(what);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) die(what);
    return p;
}

/* The register ring (README §9): header fields at fixed offsets, each in its own cache line. */
static volatile uint8_t *ring;
static uint32_t rc, sc;
static int kick_fd = -1, reply_fd = -1;
#define FIELD(offset) ((volatile uint32_t *)(ring + (offset)))
enum { REQ_PRODUCER = 64, REQ_CONSUMER = 128, REQ_SLEEPING = 192, RSP_PRODUCER = 256, RSP_CONSUMER = 320,
       RSP_SLEEPING = 384, SERVING = 448, SERVING_ACTIVE = 512, POISONED = 576, POISONED_VALID = 640 };

/* The device: one resource (the ports), its state in the state page. */
struct state { uint32_t magic, value; };
#define STATE_MAGIC 0x474e5248u /* "HRNG" */
static struct state *saved;      /* the state page */
static struct state live;        /* what the requests since the last commit made of it */
static uint64_t port_count;

static uint64_t serve_read(uint64_t offset, uint8_t size)
{
    if (offset != 0 || size != 4) return ~0ull;
    uint32_t x = live.value;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    live.value = x;
    return x;
}

static void serve_write(uint64_t offset, uint8_t size, uint64_t data)
{
    if (offset == 4 && size == 4) live.value = (uint32_t)data ? (uint32_t)data : 1;
}

static void respond(uint64_t tag, uint64_t data)
{
    uint32_t producer = *FIELD(RSP_PRODUCER);
    while (producer - __atomic_load_n(FIELD(RSP_CONSUMER), __ATOMIC_ACQUIRE) >= sc)
        sched_yield();
    volatile uint64_t *slot = (volatile uint64_t *)(ring + 4096 + (size_t)rc * 32 + (size_t)(producer & (sc - 1)) * 16);
    slot[0] = tag;
    slot[1] = data;
    __atomic_store_n(FIELD(RSP_PRODUCER), producer + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(FIELD(RSP_SLEEPING), __ATOMIC_RELAXED) != 0) {
        uint64_t one = 1;
        (void)write(reply_fd, &one, sizeof one);
    }
}

/* Serve what is published, then commit (state first, then the consumer index). */
static int serve(uint32_t *cursor)
{
    uint32_t published = __atomic_load_n(FIELD(REQ_PRODUCER), __ATOMIC_ACQUIRE);
    uint32_t pending = published - *cursor;
    if (pending == 0) return 0;
    if (pending > rc) pending = rc; /* never trust the distance further than one capacity */
    for (uint32_t i = 0; i < pending; i++) {
        uint8_t entry[32];
        memcpy(entry, (const void *)(ring + 4096 + (size_t)(*cursor & (rc - 1)) * 32), sizeof entry); /* copied once */
        uint8_t operation = entry[0], size = entry[1];
        uint16_t resource; uint64_t offset, data, tag;
        memcpy(&resource, entry + 2, 2); memcpy(&offset, entry + 8, 8); memcpy(&data, entry + 16, 8); memcpy(&tag, entry + 24, 8);
        int poisoned = *FIELD(POISONED_VALID) && *FIELD(POISONED) == *cursor;
        *FIELD(SERVING) = *cursor;
        __atomic_store_n(FIELD(SERVING_ACTIVE), 1, __ATOMIC_RELEASE);
        int valid = (operation == OP_PIO_READ || operation == OP_PIO_WRITE) && (size == 1 || size == 2 || size == 4 || size == 8)
                    && resource == 0 && offset < port_count && size <= port_count - offset;
        uint64_t mask = size >= 8 ? ~0ull : (1ull << (8 * size)) - 1;
        if (poisoned) say(2, "request %u was poisoned: answered without serving", *cursor);
        else if (!valid) say(2, "invalid register request: operation %u, size %u, resource %u, offset %llu",
                             operation, size, resource, (unsigned long long)offset);
        if (operation == OP_PIO_READ || operation == 3 || operation == 5)
            respond(tag, valid && !poisoned ? serve_read(offset, size) & mask : ~0ull);
        else if (valid && !poisoned)
            serve_write(offset, size, data & mask);
        __atomic_store_n(FIELD(SERVING_ACTIVE), 0, __ATOMIC_RELEASE);
        (*cursor)++;
    }
    *saved = live;
    __atomic_store_n(FIELD(REQ_CONSUMER), *cursor, __ATOMIC_RELEASE);
    return 1;
}

static void reply(uint16_t type, uint32_t id, int32_t status, const void *body, uint32_t length)
{
    uint8_t out[128];
    struct frame_header h = { type, FLAG_REPLY, id, status, length };
    memcpy(out, &h, sizeof h);
    if (length) memcpy(out + sizeof h, body, length);
    send_frame(CONTROL_FD, out, sizeof h + length);
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

int main(int argc, char **argv)
{
    if (argc > 1) instance = argv[1];
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 0;
    lock_down();

    /* HELLO with its descriptors (README §5.1, §7). */
    static uint8_t message[65536];
    union { struct cmsghdr align; char buffer[CMSG_SPACE(16 * sizeof(int))]; } control;
    struct iovec iov = { message, sizeof message };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer };
    ssize_t n = recvmsg(CONTROL_FD, &msg, MSG_CMSG_CLOEXEC);
    if (n < 16) return 0;
    int fds[16], fd_total = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && fd_total < 16; i++)
                memcpy(&fds[fd_total++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    struct frame_header h;
    memcpy(&h, message, sizeof h);
    const uint8_t *p = message + 16;
    size_t length = (size_t)n - 16;
    if (h.type != HELLO || (h.flags & FLAG_REPLY) || h.length != length || length < 32) die("the first message was not a HELLO");
    uint32_t major = rd32(p);  /* the minor (p + 4) needs no look: this device speaks minor 0, the lowest */
    uint64_t offered = rd64(p + 8);
    uint32_t generation = rd32(p + 16);
    uint16_t regions = rd16(p + 20), resources = rd16(p + 22), fd_count = rd16(p + 24), config_length = rd16(p + 26);
    if (major != 1) { reply(HELLO, h.id, UNSUPPORTED_VERSION, NULL, 0); die("the core speaks another protocol major"); }
    size_t end = 32 + 24 * (size_t)regions + 24 * (size_t)resources + 4 * (size_t)fd_count + config_length;
    if (rd32(p + 28) != 0 || fd_count != fd_total || end != length || resources != 1 || p[32 + 24 * regions] != 1) {
        reply(HELLO, h.id, MALFORMED, NULL, 0);
        die("HELLO is malformed or does not give one port range");
    }
    port_count = rd64(p + 32 + 24 * (size_t)regions + 16);
    const uint8_t *roles = p + 32 + 24 * (size_t)regions + 24 * (size_t)resources;
    int ring_fd = -1, state_fd = -1;
    for (int i = 0; i < fd_count; i++) {
        uint16_t role = rd16(roles + 4 * i);
        if (role == ROLE_REGISTER_RING) ring_fd = fds[i];
        else if (role == ROLE_RING_KICK) kick_fd = fds[i];
        else if (role == ROLE_RING_REPLY) reply_fd = fds[i];
        else if (role == ROLE_STATE_PAGE) state_fd = fds[i];
    }
    if (!(offered & CAP_REGISTER_RING) || !(offered & CAP_STATE_PAGE) || ring_fd < 0 || kick_fd < 0 || reply_fd < 0 || state_fd < 0)
        die("HELLO lacks the register ring or the state page");

    /* The seed setting: key=value lines (README §5.1); this device's values need no unescaping. */
    uint32_t seed = 1;
    const char *config = (const char *)roles + 4 * fd_count;
    for (size_t at = 0; at < config_length;) {
        size_t line_end = at;
        while (line_end < config_length && config[line_end] != '\n') line_end++;
        if (line_end - at > 5 && memcmp(config + at, "seed=", 5) == 0) {
            char number[16] = { 0 };
            memcpy(number, config + at + 5, line_end - at - 5 < 15 ? line_end - at - 5 : 15);
            seed = (uint32_t)strtoul(number, NULL, 0);
        }
        at = line_end + 1;
    }

    /* The ring's header is checked once and copied (README §9.2). */
    struct stat st;
    if (fstat(ring_fd, &st) != 0 || st.st_size < 4096 || st.st_size > (16 << 20)) die("the register ring's size is wrong");
    const uint8_t *header = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ring_fd, 0);
    if (header == MAP_FAILED) die("cannot map the register ring");
    rc = rd32(header + 8); sc = rd32(header + 12);
    if (rd32(header) != 0x47525648u || rd16(header + 4) != 1 || rd32(header + 16) != 32 || rd32(header + 20) != 16
        || !rc || rc > 65536 || (rc & (rc - 1)) || !sc || sc > 65536 || (sc & (sc - 1))
        || (uint64_t)st.st_size < 4096 + (uint64_t)rc * 32 + (uint64_t)sc * 16)
        die("the register ring's header is not one this device reads");
    munmap((void *)header, 4096);
    ring = map_sealed(ring_fd, 4096 + (size_t)rc * 32 + (size_t)sc * 16, "the register ring is not sealed or too small");
    saved = map_sealed(state_fd, 4096, "the state page is not sealed or too small");
    fcntl(kick_fd, F_SETFL, fcntl(kick_fd, F_GETFL) | O_NONBLOCK);

    /* A restart takes the state a predecessor saved, if it is whole; a first start the seed. */
    struct state copy = *saved;
    if (generation > 0 && copy.magic == STATE_MAGIC && copy.value != 0) live = copy;
    else live = (struct state){ STATE_MAGIC, seed ? seed : 1 };
    *saved = live;
    say(1, "rng at value %u (restart generation %u)", live.value, generation);

    struct { uint32_t major, minor; uint64_t capabilities; uint16_t name_length, state_version; char name[5]; } __attribute__((packed))
        hello = { 1, 0, CAP_REGISTER_RING | CAP_STATE_PAGE, 5, 0, { 'c', '-', 'r', 'n', 'g' } };
    reply(HELLO, h.id, OK, &hello, sizeof hello);

    uint32_t cursor = *FIELD(REQ_CONSUMER);  /* resume at the first uncommitted request */
    for (;;) {
        if (serve(&cursor)) continue;
        /* Spin ~50 µs before sleeping (README §9.5): a guest reading in a loop never waits for a wake-up. */
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        int arrived = 0;
        do {
            __builtin_ia32_pause();
            if (__atomic_load_n(FIELD(REQ_PRODUCER), __ATOMIC_ACQUIRE) != cursor) { arrived = 1; break; }
            clock_gettime(CLOCK_MONOTONIC, &now);
        } while ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) < 50000);
        if (arrived) continue;
        /* Sleep (README §9.5): flag, fence, look again, then poll the kick and the control socket. */
        __atomic_store_n(FIELD(REQ_SLEEPING), 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(FIELD(REQ_PRODUCER), __ATOMIC_ACQUIRE) != cursor) {
            __atomic_store_n(FIELD(REQ_SLEEPING), 0, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            continue;
        }
        struct pollfd waits[2] = { { kick_fd, POLLIN, 0 }, { CONTROL_FD, POLLIN, 0 } };
        int ready = poll(waits, 2, 1000);
        __atomic_store_n(FIELD(REQ_SLEEPING), 0, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint64_t drained;
        while (read(kick_fd, &drained, sizeof drained) > 0)
            ;
        if (ready > 0 && (waits[1].revents & (POLLIN | POLLHUP))) {
            ssize_t got = receive_frame(CONTROL_FD, message, sizeof message);
            if (got < 16) return 0; /* the core is gone */
            memcpy(&h, message, sizeof h);
            if (h.flags & (FLAG_REPLY | FLAG_NO_REPLY)) continue;
            if (h.type == SHUTDOWN) {
                serve(&cursor);
                reply(SHUTDOWN, h.id, OK, NULL, 0);
                return 0;
            }
            reply(h.type, h.id, h.type == PING ? OK : UNKNOWN_TYPE, NULL, 0);
        }
    }
}

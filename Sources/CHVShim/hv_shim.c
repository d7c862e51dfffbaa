#define _GNU_SOURCE
#include <linux/openat2.h>
#include "hv_shim.h"

#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <pthread.h>

int hv_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int hv_ioctl_val(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }

int hv_prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5) {
    return prctl(option, arg2, arg3, arg4, arg5);
}

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
int hv_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
int hv_pidfd_send_signal(int pidfd, int sig) { return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0); }
pid_t hv_gettid(void) { return (pid_t)syscall(SYS_gettid); }

ssize_t hv_getrandom(void *buf, size_t len, unsigned int flags) { return (ssize_t)syscall(SYS_getrandom, buf, len, flags); }

int hv_set_thread_name(const char *name) { return pthread_setname_np(pthread_self(), name); }

int hv_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int hv_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
const int hv_MFD_CLOEXEC = MFD_CLOEXEC, hv_MFD_ALLOW_SEALING = MFD_ALLOW_SEALING;
const int hv_EFD_CLOEXEC = EFD_CLOEXEC, hv_EFD_NONBLOCK = EFD_NONBLOCK;
const int hv_F_ADD_SEALS = F_ADD_SEALS, hv_F_SEAL_SHRINK = F_SEAL_SHRINK, hv_F_SEAL_GROW = F_SEAL_GROW, hv_F_SEAL_WRITE = F_SEAL_WRITE,
          hv_F_SEAL_SEAL = F_SEAL_SEAL, hv_F_GET_SEALS = F_GET_SEALS;
const int hv_F_OFD_SETLK = F_OFD_SETLK, hv_F_OFD_GETLK = F_OFD_GETLK;

ssize_t hv_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > HV_MAX_PASSED_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char bytes[CMSG_SPACE(sizeof(int) * HV_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

ssize_t hv_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union { char bytes[CMSG_SPACE(sizeof(int) * HV_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                          .msg_controllen = sizeof control.bytes };
    *nfds = 0;
    *truncated = 0;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *received = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < maxfds) fds[(*nfds)++] = received[i];
            else { close(received[i]); *truncated = 1; }   // never leak an fd we can't hand back
        }
    }
    return n;
}

const unsigned long hv_KVM_GET_API_VERSION = KVM_GET_API_VERSION, hv_KVM_CREATE_VM = KVM_CREATE_VM,
    hv_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION, hv_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE,
    hv_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID, hv_KVM_CREATE_VCPU = KVM_CREATE_VCPU,
    hv_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION, hv_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR,
    hv_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR, hv_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP,
    hv_KVM_CREATE_PIT2 = KVM_CREATE_PIT2, hv_KVM_IRQFD = KVM_IRQFD, hv_KVM_IOEVENTFD = KVM_IOEVENTFD,
    hv_KVM_RUN = KVM_RUN, hv_KVM_GET_REGS = KVM_GET_REGS, hv_KVM_SET_REGS = KVM_SET_REGS,
    hv_KVM_GET_SREGS = KVM_GET_SREGS, hv_KVM_SET_SREGS = KVM_SET_SREGS, hv_KVM_SET_CPUID2 = KVM_SET_CPUID2,
    hv_KVM_GET_MP_STATE = KVM_GET_MP_STATE, hv_KVM_SET_MP_STATE = KVM_SET_MP_STATE,
    hv_KVM_IRQ_LINE = KVM_IRQ_LINE, hv_KVM_SET_GSI_ROUTING = KVM_SET_GSI_ROUTING,
    hv_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS, hv_KVM_SET_FPU = KVM_SET_FPU,
    hv_KVM_GET_CLOCK = KVM_GET_CLOCK, hv_KVM_SET_CLOCK = KVM_SET_CLOCK,
    hv_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS, hv_KVM_GET_XSAVE = KVM_GET_XSAVE, hv_KVM_SET_XSAVE = KVM_SET_XSAVE,
    hv_KVM_GET_XCRS = KVM_GET_XCRS, hv_KVM_SET_XCRS = KVM_SET_XCRS, hv_KVM_GET_LAPIC = KVM_GET_LAPIC,
    hv_KVM_SET_LAPIC = KVM_SET_LAPIC, hv_KVM_GET_MSRS = KVM_GET_MSRS, hv_KVM_SET_MSRS = KVM_SET_MSRS,
    hv_KVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST, hv_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS,
    hv_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS, hv_KVM_GET_IRQCHIP = KVM_GET_IRQCHIP, hv_KVM_SET_IRQCHIP = KVM_SET_IRQCHIP,
    hv_KVM_GET_PIT2 = KVM_GET_PIT2, hv_KVM_SET_PIT2 = KVM_SET_PIT2, hv_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ,
    hv_KVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ,
    hv_KVM_GET_STATS_FD = _IO(KVMIO, 0xce) /* KVM_GET_STATS_FD, spelled out for older headers */;

static unsigned int hv_crc32c_table[256];

static void hv_crc32c_init_table(void) {
    for (unsigned int i = 0; i < 256; i++) {
        unsigned int c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        hv_crc32c_table[i] = c;
    }
}

__attribute__((target("sse4.2")))
static unsigned int hv_crc32c_hardware(unsigned int crc, const unsigned char *p, unsigned long n) {
    unsigned long long c = crc;
    while (n >= 8) {
        unsigned long long word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8; n -= 8;
    }
    unsigned int c32 = (unsigned int)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

unsigned int hv_crc32c(unsigned int crc, const void *data, unsigned long length) {
    const unsigned char *p = data;
    crc = ~crc;
    if (__builtin_cpu_supports("sse4.2")) {
        crc = hv_crc32c_hardware(crc, p, length);
    } else {
        static int ready;  // threads racing here each build the same table; release/acquire orders it
        if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) { hv_crc32c_init_table(); __atomic_store_n(&ready, 1, __ATOMIC_RELEASE); }
        while (length--) crc = hv_crc32c_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    }
    return ~crc;
}

int hv_jail_enter(const struct hv_jail *jail, int err_fd);  // hv_jail.c
void hv_jail_limit(const struct hv_jail *jail);

int hv_spawn_in_namespaces(const struct hv_jail *jail, int exec_fd, char *const argv[], char *const envp[],
                           const int *child_fds, const int *parent_fds, int nfds,
                           const int *join_fds, int njoin,
                           unsigned long long namespace_flags, int new_process_group, int sync_read_fd, int *pidfd_out) {
    if (nfds < 0 || nfds > 32 || njoin < 0 || njoin > 8) { errno = EINVAL; return -1; }
    int pidfd = -1;
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_PIDFD | namespace_flags;
    args.pidfd = (unsigned long long)(uintptr_t)&pidfd;
    args.exit_signal = SIGCHLD;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0) return -1;
    if (pid > 0) {
        *pidfd_out = pidfd;
        return (int)pid;
    }
    // Child: only async-signal-safe calls from here to execve.
    char byte;
    while (read(sync_read_fd, &byte, 1) < 0 && errno == EINTR) {}
    if (byte != 'g') _exit(127);   // the parent could not set us up: give up quietly
    // Into the cgroups before anything of the device runs (see the header for why not by pid).
    for (int i = 0; i < njoin; i++) {
        if (write(join_fds[i], "0", 1) == 1) continue;
        int err = errno, stderr_fd = -1;
        for (int k = 0; k < nfds; k++) if (child_fds[k] == 2) stderr_fd = parent_fds[k];
        if (stderr_fd >= 0) {
            static const char prefix[] = "hv: a device process could not join its cgroup (writing 0 to its v1 tasks file failed, errno ";
            char digits[12];
            int nd = 0;
            unsigned int e = (unsigned int)err;
            do { digits[sizeof digits - 1 - nd++] = (char)('0' + e % 10); e /= 10; } while (e && nd < (int)sizeof digits);
            (void)!write(stderr_fd, prefix, sizeof prefix - 1);
            (void)!write(stderr_fd, digits + sizeof digits - nd, (size_t)nd);
            (void)!write(stderr_fd, ")\n", 2);
        }
        _exit(127);
    }
    // Its own process group, as for every device: a terminal's Ctrl-C reaches hvctl only, which
    // stops the devices in order. (A detached process makes its own session in its jail instead,
    // which a group leader could not.)
    if (new_process_group && setpgid(0, 0) != 0) _exit(127);
    if (namespace_flags & CLONE_NEWUSER) {
        // Still kuid 0, which the new namespace does not map: become its uid/gid 0 (the tenant's
        // ids outside). Raw syscalls: glibc's wrappers would try to sync threads this child lacks.
        if (syscall(SYS_setgroups, 0, NULL) != 0) _exit(127);
        if (syscall(SYS_setresgid, 0, 0, 0) != 0) _exit(127);
        if (syscall(SYS_setresuid, 0, 0, 0) != 0) _exit(127);
    }
    if (jail) {
        int stderr_fd = -1;
        for (int k = 0; k < nfds; k++) if (child_fds[k] == 2) stderr_fd = parent_fds[k];
        hv_jail_enter(jail, stderr_fd);
    }
    // Park every source above any target first, so moving one can't clobber another.
    int parked[32];
    for (int i = 0; i < nfds; i++) {
        parked[i] = fcntl(parent_fds[i], F_DUPFD_CLOEXEC, 64);
        if (parked[i] < 0) _exit(127);
    }
    for (int i = 0; i < nfds; i++) {
        if (dup2(parked[i], child_fds[i]) < 0) _exit(127);   // dup2 clears close-on-exec
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
    if (jail) {
        // Only 0–5 reach the device (stdio, its two channels, the stage-2 filter); the binary on
        // 7 goes with the exec. Then the start-up filter, which still allows what the dynamic
        // loader and the runtime's start need; the SDK installs the stage-2 one before reading
        // any message.
        if (fcntl(7, F_SETFD, FD_CLOEXEC) != 0) _exit(126);
        (void)syscall(SYS_close_range, 6, 6, 0);
        (void)syscall(SYS_close_range, 8, ~0U, 0);
        hv_jail_limit(jail);
        if (hv_install_seccomp_filter(jail->startup_filter, jail->startup_filter_bytes) != 0) {
            static const char message[] = "jail: cannot load the start-up seccomp filter\n";
            (void)!write(2, message, sizeof message - 1);
            _exit(126);
        }
        hv_execveat_fd(7, argv, envp);
        static const char message[] = "jail: cannot execute the device\n";
        (void)!write(2, message, sizeof message - 1);
        _exit(126);
    }
    hv_execveat_fd(exec_fd, argv, envp);
    _exit(127);
}

int hv_execveat_fd(int fd, char *const argv[], char *const envp[]) {
    return (int)syscall(SYS_execveat, fd, "", argv, envp, AT_EMPTY_PATH);
}

int hv_pivot_root(const char *new_root, const char *put_old) { return (int)syscall(SYS_pivot_root, new_root, put_old); }

int hv_close_range(unsigned int first, unsigned int last) { return (int)syscall(SYS_close_range, first, last, 0); }

int hv_openat2_beneath(int dirfd, const char *path, int flags, unsigned int mode) {
    /* openat2 refuses a mode without O_CREAT or O_TMPFILE (EINVAL), where openat ignores it. */
    struct open_how how = { .flags = (unsigned long long)(unsigned int)flags,
                            .mode = (flags & (O_CREAT | __O_TMPFILE)) ? mode : 0,
                            .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS };
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}
int hv_malloc_arena_max(int arenas) { return mallopt(M_ARENA_MAX, arenas); }

int hv_fallocate(int fd, int mode, long long offset, long long length) { return fallocate(fd, mode, (off_t)offset, (off_t)length); }
long hv_preadv_nowait(int fd, const void *vectors, int count, long long offset) {
    return preadv2(fd, (const struct iovec *)vectors, count, (off_t)offset, RWF_NOWAIT);
}

int hv_install_seccomp_filter(const void *instructions, size_t length_bytes) {
    if (length_bytes == 0 || length_bytes % sizeof(struct sock_filter) != 0 ||
        length_bytes / sizeof(struct sock_filter) > BPF_MAXINSNS) { errno = EINVAL; return -1; }
    struct sock_fprog program = {
        .len = (unsigned short)(length_bytes / sizeof(struct sock_filter)),
        .filter = (struct sock_filter *)instructions,
    };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0);
}

static int hv_sigsys_events_fd = -1;

static void hv_sigsys_handler(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)context;
    static const char prefix[] = "sandbox: denied syscall ";
    unsigned char frame[16 + 4 + 48];
    char digits[12];
    int nd = 0;
    unsigned int nr = (unsigned int)info->si_syscall;
    do { digits[nd++] = (char)('0' + nr % 10); nr /= 10; } while (nr && nd < (int)sizeof digits);
    unsigned int text = (unsigned int)(sizeof prefix - 1) + (unsigned int)nd;
    unsigned int payload = 4 + text;
    unsigned char *p = frame;
    // Frame header, little-endian: type, flags (NO_REPLY), id, status, payload length.
    *p++ = 0x01; *p++ = 0x01; *p++ = 0x02; *p++ = 0x00;
    *p++ = 0xFF; *p++ = 0xFF; *p++ = 0xFF; *p++ = 0xFF;
    *p++ = 0; *p++ = 0; *p++ = 0; *p++ = 0;
    *p++ = (unsigned char)payload; *p++ = (unsigned char)(payload >> 8); *p++ = 0; *p++ = 0;
    // LOG payload: level 3 (error), reserved, u16 text length, text.
    *p++ = 3; *p++ = 0; *p++ = (unsigned char)text; *p++ = (unsigned char)(text >> 8);
    for (unsigned int i = 0; i < sizeof prefix - 1; i++) *p++ = (unsigned char)prefix[i];
    while (nd > 0) *p++ = (unsigned char)digits[--nd];
    if (hv_sigsys_events_fd >= 0) (void)write(hv_sigsys_events_fd, frame, (size_t)(p - frame));
    syscall(SYS_exit_group, HV_SANDBOX_VIOLATION_STATUS);
}

int hv_install_sigsys_reporter(int events_fd) {
    hv_sigsys_events_fd = events_fd;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = hv_sigsys_handler;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGSYS, &action, NULL);
}

int hv_kvm_get_dirty_log(int vm_fd, unsigned int slot, void *bitmap) {
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof log);
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log);
}

void hv_atomic_or_u64(unsigned long long *word, unsigned long long bits) {
    __atomic_fetch_or(word, bits, __ATOMIC_SEQ_CST);
}

unsigned long long hv_atomic_exchange_u64(unsigned long long *word, unsigned long long value) {
    return __atomic_exchange_n(word, value, __ATOMIC_SEQ_CST);
}

unsigned long long hv_atomic_load_u64(const unsigned long long *word) {
    return __atomic_load_n(word, __ATOMIC_RELAXED);
}

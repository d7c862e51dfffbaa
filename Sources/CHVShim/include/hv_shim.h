// CHVShim: the only C in hv's core. Each function exists because Swift cannot call the
// underlying interface directly: ioctl/prctl/syscall are variadic, KVM request numbers are
// _IOW()-style macros the Clang importer drops, and SCM_RIGHTS needs the CMSG_* macros.
// Nothing here holds state or makes decisions; the typed Swift layer (HVSys, HVKVM) does.
#ifndef HV_SHIM_H
#define HV_SHIM_H

#include <linux/kvm.h>
#include <linux/prctl.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

// ioctl(2) is variadic: Swift cannot call it. One wrapper per argument shape.
int hv_ioctl_ptr(int fd, unsigned long request, void *arg);
int hv_ioctl_val(int fd, unsigned long request, unsigned long arg);

// prctl(2) is variadic.
int hv_prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);

// syscall(2) is variadic; these have no glibc wrapper on every supported glibc.
int hv_pidfd_open(pid_t pid);
int hv_pidfd_send_signal(int pidfd, int sig);
pid_t hv_gettid(void);
// getrandom(2): the migration stream's nonces.
ssize_t hv_getrandom(void *buf, size_t len, unsigned int flags);

// memfd_create/eventfd need _GNU_SOURCE-only headers the Glibc module may not expose.
int hv_memfd_create(const char *name, unsigned int flags);
int hv_eventfd(unsigned int initval, int flags);
extern const int hv_MFD_CLOEXEC, hv_MFD_ALLOW_SEALING, hv_EFD_CLOEXEC, hv_EFD_NONBLOCK;
extern const int hv_F_ADD_SEALS, hv_F_SEAL_SHRINK, hv_F_SEAL_GROW, hv_F_SEAL_WRITE, hv_F_SEAL_SEAL, hv_F_GET_SEALS;
// Open-file-description locks (F_OFD_*): _GNU_SOURCE-only, and the kind QEMU takes on images.
extern const int hv_F_OFD_SETLK, hv_F_OFD_GETLK;

// SCM_RIGHTS fd passing needs CMSG_* macros. At most HV_MAX_PASSED_FDS descriptors per message.
#define HV_MAX_PASSED_FDS 16
// Returns bytes sent or -1 (errno set).
ssize_t hv_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
// Returns bytes received or -1 (errno set). *nfds gets the number of descriptors received
// (close-on-exec set); *truncated is nonzero if the payload or the descriptors were cut.
ssize_t hv_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated);

// pthread_setname_np is _GNU_SOURCE-only.
int hv_set_thread_name(const char *name);

// Starting a sandboxed device: fork+exec from a multithreaded process must run only
// async-signal-safe code in the child, so the whole child side lives here, in C.
// clone3(CLONE_PIDFD | namespace flags); the child waits for one byte on `sync_read_fd` (the
// parent writes its uid/gid maps meanwhile), moves parent_fds[i] onto child_fds[i], empties its
// signal mask, and executes the file open on `exec_fd` (execveat with AT_EMPTY_PATH: the child,
// already the tenant's uid, may not be able to traverse the path the trusted side opened it by).
// Before any of that, right after the byte, it writes "0" into each of `join_fds` (cgroup v1
// `tasks` files the parent opened): a single-threaded process moving itself that way skips the
// global lock a move by pid takes, and with it an RCU grace period (ResourceGroups.swift); on a
// failed write it says so on the descriptor that becomes its stderr and exits 127.
// With `jail` (not NULL), the child then builds the device's jail itself (hv_jail_enter, below)
// and executes the device from child fd 7 (a mapping must put the device's binary there, and the
// stage-2 filter on 5); without, it executes `exec_fd`.
// Returns the child's pid (and *pidfd_out) or -1 with errno set. The child exits 127 if it
// cannot exec, 126 if it cannot build its jail (having said why on its stderr).
struct hv_jail;
int hv_spawn_in_namespaces(const struct hv_jail *jail, int exec_fd, char *const argv[], char *const envp[],
                           const int *child_fds, const int *parent_fds, int nfds,
                           const int *join_fds, int njoin,
                           unsigned long long namespace_flags, int new_process_group, int sync_read_fd, int *pidfd_out);

// A device's jail, as the clone3 child of hv_spawn_in_namespaces builds it: every decision (what
// the root holds, the limits, the seccomp programs) is made beforehand by the trusted parent
// (`SandboxPlan` in HVCore); this only performs the steps, async-signal-safe, in order:
// make mounts private; a tmpfs on `root` (`root_options`); `steps` under it; pivot_root into it
// and detach the old root; remount it read-only; hostname "hv-device"; drop every capability
// (bounding set, securebits locked, capset to empty, ambient cleared) and set no_new_privs;
// a session of its own (`outlive_parent`) or SIGKILL at the parent's death. Then the spawn moves
// the descriptors into place, sets the rlimits (a low RLIMIT_NOFILE would refuse the moves) and,
// last, just before the exec, loads the start-up seccomp program.
enum hv_jail_step_kind {
    HV_JAIL_MKDIR = 1,      // mkdir `path` (0755; one that exists is fine)
    HV_JAIL_SYMLINK = 2,    // symlink `path` → `source` (one that exists is fine)
    HV_JAIL_BIND = 3,       // a mount point at `path` (a directory if `directory`, else an empty file),
                            // `source` bound there (recursively), remounted with `flags`
    HV_JAIL_COPY = 4,       // a new file `path` (0444) holding what descriptor `fd` reads to its end
};
struct hv_jail_step {
    int kind;
    int directory;
    int fd;
    unsigned long flags;
    const char *path;       // inside the new root: already prefixed with `root`
    const char *source;
};
struct hv_jail_limit {
    int resource;           // RLIMIT_*
    unsigned long long value;  // both soft and hard; RLIM_INFINITY for none
};
struct hv_jail {
    const char *root;
    const char *root_options;
    const struct hv_jail_step *steps;
    int nsteps;
    const struct hv_jail_limit *limits;
    int nlimits;
    int outlive_parent;
    const void *startup_filter;     // classic BPF (struct sock_filter[]), as libseccomp exports it
    unsigned long startup_filter_bytes;
};

// execveat(fd, "", argv, envp, AT_EMPTY_PATH): runs an executable from a descriptor (no wrapper
// in older glibc). Returns only on failure (-1, errno set).
int hv_execveat_fd(int fd, char *const argv[], char *const envp[]);

// pivot_root(2) has no glibc wrapper.
int hv_pivot_root(const char *new_root, const char *put_old);
// close_range(2) may lack a wrapper in the Glibc module.
int hv_close_range(unsigned int first, unsigned int last);
/* openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS: `path` (relative) must resolve beneath
 * `dirfd`, symbolic links and ".." included; EXDEV when it would leave it. (No glibc wrapper.) */
int hv_openat2_beneath(int dirfd, const char *path, int flags, unsigned int mode);

// mallopt(M_ARENA_MAX, n): malloc.h is not in the Glibc module.
int hv_malloc_arena_max(int arenas);

/// fallocate(2) (a GNU extension Swift's Glibc module does not export): the SCSI disk punches
/// holes (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) to give discarded blocks back to the host.
int hv_fallocate(int fd, int mode, long long offset, long long length);
/// preadv2(2) with RWF_NOWAIT (a GNU extension Swift's Glibc module does not export): reads only
/// what the host's page cache already holds, failing with EAGAIN instead of waiting for storage;
/// the SCSI disk serves such reads on its own thread instead of handing them to an I/O thread.
long hv_preadv_nowait(int fd, const void *vectors, int count, long long offset);
// Installs a classic-BPF seccomp filter (PR_SET_SECCOMP needs a struct sock_fprog).
int hv_install_seccomp_filter(const void *instructions, size_t length_bytes);

// Seccomp violation reporter for sandboxed devices. The lock-down filter's default action is
// SECCOMP_RET_TRAP; this SIGSYS handler (async-signal-safe, so C) writes one LOG frame
// (ipc-schema: type 0x0101, NO_REPLY, level error, text "sandbox: denied syscall N") on
// `events_fd` and exits with HV_SANDBOX_VIOLATION_STATUS. The lock-down profile allows no
// rt_sigaction, so a compromised device cannot replace the handler, and a blocked SIGSYS is
// forced through by the kernel (killing the process).
#define HV_SANDBOX_VIOLATION_STATUS 159
int hv_install_sigsys_reporter(int events_fd);

// KVM ioctl request numbers (macros built from _IO/_IOR/_IOW/_IOWR).
extern const unsigned long hv_KVM_GET_API_VERSION, hv_KVM_CREATE_VM, hv_KVM_CHECK_EXTENSION,
    hv_KVM_GET_VCPU_MMAP_SIZE, hv_KVM_GET_SUPPORTED_CPUID, hv_KVM_CREATE_VCPU,
    hv_KVM_SET_USER_MEMORY_REGION, hv_KVM_SET_TSS_ADDR, hv_KVM_SET_IDENTITY_MAP_ADDR,
    hv_KVM_CREATE_IRQCHIP, hv_KVM_CREATE_PIT2, hv_KVM_IRQFD, hv_KVM_IOEVENTFD, hv_KVM_RUN,
    hv_KVM_GET_REGS, hv_KVM_SET_REGS, hv_KVM_GET_SREGS, hv_KVM_SET_SREGS, hv_KVM_SET_CPUID2,
    hv_KVM_GET_MP_STATE, hv_KVM_SET_MP_STATE, hv_KVM_IRQ_LINE, hv_KVM_SET_GSI_ROUTING,
    hv_KVM_GET_VCPU_EVENTS, hv_KVM_SET_FPU, hv_KVM_GET_CLOCK, hv_KVM_SET_CLOCK,
    // Snapshot and restore: the rest of a vCPU's and the in-kernel platform's state.
    hv_KVM_SET_VCPU_EVENTS, hv_KVM_GET_XSAVE, hv_KVM_SET_XSAVE, hv_KVM_GET_XCRS, hv_KVM_SET_XCRS,
    hv_KVM_GET_LAPIC, hv_KVM_SET_LAPIC, hv_KVM_GET_MSRS, hv_KVM_SET_MSRS, hv_KVM_GET_MSR_INDEX_LIST,
    hv_KVM_GET_DEBUGREGS, hv_KVM_SET_DEBUGREGS, hv_KVM_GET_IRQCHIP, hv_KVM_SET_IRQCHIP,
    hv_KVM_GET_PIT2, hv_KVM_SET_PIT2, hv_KVM_GET_TSC_KHZ, hv_KVM_SET_TSC_KHZ,
    // A vCPU's binary statistics (Linux 5.14+): the halt monitor reads whether it is blocked.
    hv_KVM_GET_STATS_FD;

// Live migration: the pages the vCPUs wrote to slot `slot` since the last call, one bit per page
// into `bitmap` (KVM_GET_DIRTY_LOG, which also write-protects them again). struct kvm_dirty_log's
// union does not import into Swift, hence a function.
int hv_kvm_get_dirty_log(int vm_fd, unsigned int slot, void *bitmap);

// Dirty-page bitmaps shared between processes: each device sets bits in its own with an atomic OR,
// the core takes them with an atomic exchange, so no bit set concurrently is lost.
void hv_atomic_or_u64(unsigned long long *word, unsigned long long bits);
unsigned long long hv_atomic_exchange_u64(unsigned long long *word, unsigned long long value);
unsigned long long hv_atomic_load_u64(const unsigned long long *word);

// CRC-32C (Castagnoli, the iSCSI/ext4 checksum) of `length` bytes, continuing from `crc` (0 to
// start). C because the SSE4.2 crc32 instruction is what makes checksumming a 1 GiB snapshot
// cheap; hosts without it get the table-driven version.
unsigned int hv_crc32c(unsigned int crc, const void *data, unsigned long length);

#endif

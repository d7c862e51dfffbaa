// The device jail's steps, run by the clone3 child of hv_spawn_in_namespaces between its start and
// the device's exec. A child of a multithreaded process: only async-signal-safe calls (no malloc,
// no stdio). Nothing here decides anything: the trusted parent computed every path, flag and
// limit (`SandboxPlan` in HVCore); see hv_shim.h, `struct hv_jail`.
#define _GNU_SOURCE
#include "hv_shim.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int hv_jail_enter(const struct hv_jail *jail, int err_fd);
void hv_jail_limit(const struct hv_jail *jail);

static void say(int fd, const char *text) {
    if (fd >= 0 && text) (void)!write(fd, text, strlen(text));
}

// "jail: WHAT PATH: errno N" on the device's stderr (the core prefixes and reports it), then exit 126.
static void fail(int err_fd, const char *what, const char *path) {
    int err = errno;
    char digits[12];
    int nd = 0;
    unsigned int e = (unsigned int)err;
    do { digits[sizeof digits - 1 - nd++] = (char)('0' + e % 10); e /= 10; } while (e && nd < (int)sizeof digits);
    say(err_fd, "jail: ");
    say(err_fd, what);
    if (path) { say(err_fd, " "); say(err_fd, path); }
    say(err_fd, ": errno ");
    if (err_fd >= 0) (void)!write(err_fd, digits + sizeof digits - nd, (size_t)nd);
    say(err_fd, "\n");
    _exit(126);
}

static void copy_file(int err_fd, const struct hv_jail_step *step) {
    int out = open(step->path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0444);
    if (out < 0) fail(err_fd, "create", step->path);
    char buffer[16384];
    off_t offset = 0;
    for (;;) {
        ssize_t n = pread(step->fd, buffer, sizeof buffer, offset);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail(err_fd, "read the plugin file for", step->path);
        if (n == 0) break;
        for (ssize_t done = 0; done < n;) {
            ssize_t w = write(out, buffer + done, (size_t)(n - done));
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) fail(err_fd, "write", step->path);
            done += w;
        }
        offset += n;
    }
    close(out);
}

int hv_jail_enter(const struct hv_jail *jail, int err_fd) {
    // The root: an empty tmpfs holding mount points (and an interpreted plugin's files), read-only
    // binds of exactly what the device needs, nothing of the host besides.
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) fail(err_fd, "make mounts private", NULL);
    if (mount("hv-device-root", jail->root, "tmpfs", MS_NOSUID | MS_NODEV, jail->root_options) != 0) fail(err_fd, "mount tmpfs on", jail->root);
    for (int i = 0; i < jail->nsteps; i++) {
        const struct hv_jail_step *step = &jail->steps[i];
        switch (step->kind) {
        case HV_JAIL_MKDIR:
            if (mkdir(step->path, 0755) != 0 && errno != EEXIST) fail(err_fd, "mkdir", step->path);
            break;
        case HV_JAIL_SYMLINK:
            if (symlink(step->source, step->path) != 0 && errno != EEXIST) fail(err_fd, "symlink", step->path);
            break;
        case HV_JAIL_BIND:
            if (step->directory) {
                if (mkdir(step->path, 0755) != 0 && errno != EEXIST) fail(err_fd, "mkdir", step->path);
            } else {
                int point = open(step->path, O_CREAT | O_WRONLY | O_CLOEXEC, 0444);
                if (point < 0) fail(err_fd, "create the mount point", step->path);
                close(point);
            }
            if (mount(step->source, step->path, NULL, MS_BIND | MS_REC, NULL) != 0) fail(err_fd, "bind", step->source);
            if (mount(NULL, step->path, NULL, step->flags, NULL) != 0) fail(err_fd, "remount read-only", step->source);
            break;
        case HV_JAIL_COPY:
            copy_file(err_fd, step);
            break;
        default:
            errno = EINVAL;
            fail(err_fd, "unknown jail step for", step->path);
        }
    }
    char old[4096];
    size_t rootLength = strlen(jail->root);
    if (rootLength + sizeof "/.old" > sizeof old) { errno = ENAMETOOLONG; fail(err_fd, "the root path", jail->root); }
    memcpy(old, jail->root, rootLength);
    memcpy(old + rootLength, "/.old", sizeof "/.old");
    if (mkdir(old, 0700) != 0) fail(err_fd, "mkdir", old);
    if (syscall(SYS_pivot_root, jail->root, old) != 0) fail(err_fd, "pivot_root into", jail->root);
    if (chdir("/") != 0) fail(err_fd, "chdir", "/");
    if (umount2("/.old", MNT_DETACH) != 0) fail(err_fd, "detach the old root", NULL);
    (void)rmdir("/.old");
    if (mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0) fail(err_fd, "make the root read-only", NULL);
    (void)sethostname("hv-device", 9);

    // Credentials. The device stays uid 0 inside its user namespace (the tenant's uid outside,
    // the only id mapped), with no capability now or after exec: bounding set emptied, securebits
    // NOROOT | NO_SETUID_FIXUP | KEEP_CAPS_LOCKED | NO_CAP_AMBIENT_RAISE, each locked (0xEF),
    // effective/permitted/inheritable sets emptied, ambient cleared, no_new_privs.
    for (unsigned long cap = 0; cap < 64; cap++) (void)prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    if (prctl(PR_SET_SECUREBITS, 0xEF, 0, 0, 0) != 0) fail(err_fd, "lock securebits", NULL);
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct none[2];
    memset(none, 0, sizeof none);
    if (syscall(SYS_capset, &header, none) != 0) fail(err_fd, "drop capabilities", NULL);
    (void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail(err_fd, "set no_new_privs", NULL);
    // After the credential change: the kernel clears the parent-death signal on setuid.
    if (jail->outlive_parent) {
        // Its own session: the starting VM's terminal signals (Ctrl-C, hang-up) do not reach it.
        (void)setsid();
    } else if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) {
        fail(err_fd, "set the parent-death signal", NULL);
    }
    return 0;
}

// The rlimits, once the descriptors are in place (a low RLIMIT_NOFILE would refuse the moves).
// On fd 2 now: the device's stderr.
void hv_jail_limit(const struct hv_jail *jail) {
    for (int i = 0; i < jail->nlimits; i++) {
        struct rlimit limit = { .rlim_cur = (rlim_t)jail->limits[i].value, .rlim_max = (rlim_t)jail->limits[i].value };
        if (setrlimit((__rlimit_resource_t)jail->limits[i].resource, &limit) != 0) fail(2, "set an rlimit", NULL);
    }
}

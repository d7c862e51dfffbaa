#define _GNU_SOURCE
#include "hv_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
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

int hv_set_thread_name(const char *name) { return pthread_setname_np(pthread_self(), name); }

int hv_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int hv_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
const int hv_MFD_CLOEXEC = MFD_CLOEXEC, hv_MFD_ALLOW_SEALING = MFD_ALLOW_SEALING;
const int hv_EFD_CLOEXEC = EFD_CLOEXEC, hv_EFD_NONBLOCK = EFD_NONBLOCK;
const int hv_F_ADD_SEALS = F_ADD_SEALS, hv_F_SEAL_SHRINK = F_SEAL_SHRINK, hv_F_SEAL_GROW = F_SEAL_GROW,
          hv_F_SEAL_SEAL = F_SEAL_SEAL;

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
    hv_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS, hv_KVM_SET_FPU = KVM_SET_FPU;

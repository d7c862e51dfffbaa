/*
 * kvm_exit: the cost of a bare KVM PIO exit to user space, the floor under
 * hv's forwarded register access. Part of hv's benchmark harness
 * (bench/bench.py); not part of hv.
 *
 * Creates a VM with one vCPU in real mode and no in-kernel devices, so
 * every port access exits to this process. The guest runs
 *
 *         mov ecx, N
 *         mov dx, PORT
 *     1:  in al, dx          ; KVM_EXIT_IO, answered with 0xff here
 *         dec ecx
 *         jnz 1b
 *         hlt                ; KVM_EXIT_HLT (no in-kernel irqchip)
 *
 * and the whole KVM_RUN loop is timed with CLOCK_MONOTONIC, so the result
 * includes the guest's own loop instructions, like hv-testguest's pioread
 * loop does.
 *
 * It also reports the vCPU's TSC rate (KVM_GET_TSC_KHZ), which is the rate
 * of the guest's rdtsc, and a host-side calibration of rdtsc over a 100 ms
 * sleep, so bench.py can turn guest cycle counts into nanoseconds.
 *
 * Usage: kvm_exit [N [PORT]]        (default N=100000, PORT=0x3ff)
 *        kvm_exit --tsc             (only the TSC rates)
 * Output: key=value lines:
 *   tsc_khz_kvm=…  tsc_hz_calibrated=…  exits=…  ns_total=…  ns_per_exit=…
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define GUEST_MEM   0x10000
#define CODE_ADDR   0x1000

static void die(const char *what)
{
    fprintf(stderr, "kvm_exit: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Host rdtsc ticks per second, measured over a 100 ms sleep. */
static double calibrate_tsc(void)
{
    struct timespec nap = { 0, 100 * 1000 * 1000 };
    uint64_t t0 = now_ns(), c0 = rdtsc();
    nanosleep(&nap, NULL);
    uint64_t t1 = now_ns(), c1 = rdtsc();
    return (double)(c1 - c0) * 1e9 / (double)(t1 - t0);
}

int main(int argc, char **argv)
{
    int tsc_only = argc > 1 && strcmp(argv[1], "--tsc") == 0;
    uint32_t n = (!tsc_only && argc > 1) ? (uint32_t)strtoul(argv[1], NULL, 0) : 100000;
    uint16_t port = (!tsc_only && argc > 2) ? (uint16_t)strtoul(argv[2], NULL, 0) : 0x3ff;
    if (n == 0)
        n = 1;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");

    uint8_t *mem = mmap(NULL, GUEST_MEM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = GUEST_MEM, .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    uint8_t code[] = {
        0x66, 0xB9, 0, 0, 0, 0,     /* mov ecx, imm32 */
        0xBA, 0, 0,                 /* mov dx, imm16 */
        0xEC,                       /* 1: in al, dx */
        0x66, 0x49,                 /* dec ecx */
        0x75, 0xFB,                 /* jnz 1b (-5) */
        0xF4,                       /* hlt */
    };
    memcpy(&code[2], &n, 4);
    memcpy(&code[7], &port, 2);
    memcpy(mem + CODE_ADDR, code, sizeof code);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    int khz = ioctl(vcpu, KVM_GET_TSC_KHZ, 0);
    printf("tsc_khz_kvm=%d\n", khz > 0 ? khz : 0);
    printf("tsc_hz_calibrated=%.0f\n", calibrate_tsc());
    if (tsc_only)
        return 0;

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = CODE_ADDR, .rflags = 0x2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    uint64_t exits = 0;
    uint64_t t0 = now_ns();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.direction == KVM_EXIT_IO_IN)
                memset((uint8_t *)run + run->io.data_offset, 0xff, (size_t)run->io.size * run->io.count);
            exits++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT)
            break;
        fprintf(stderr, "kvm_exit: unexpected exit reason %u after %llu exits\n",
                run->exit_reason, (unsigned long long)exits);
        return 1;
    }
    uint64_t t1 = now_ns();

    if (exits != n) {
        fprintf(stderr, "kvm_exit: expected %u exits, saw %llu\n", n, (unsigned long long)exits);
        return 1;
    }
    printf("exits=%llu\n", (unsigned long long)exits);
    printf("ns_total=%llu\n", (unsigned long long)(t1 - t0));
    printf("ns_per_exit=%.1f\n", (double)(t1 - t0) / (double)exits);
    return 0;
}

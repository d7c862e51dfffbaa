// What Linux's KSM can merge of hv-like guest memory (ARCHITECTURE.md, "Memory overcommit").
// Four 64 MiB "guests", 3/4 of their pages identical across guests and 1/4 unique to each, as
// private anonymous memory (what KSM scans) or as a shared memfd (hv's guest RAM, which devices
// map), all madvise(MADV_MERGEABLE); KSM runs three full scans (at most 10 s); prints the guests'
// PSS before and after and KSM's counters. Needs root; puts KSM's settings back as it found them.
//
//   gcc -O2 -o /tmp/ksm_probe bench/ksm_probe.c && /tmp/ksm_probe private && /tmp/ksm_probe memfd
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { GUESTS = 4 };
static const size_t guest_bytes = (size_t)64 << 20;

static long ksm_read(const char *knob) {
    char path[128];
    snprintf(path, sizeof path, "/sys/kernel/mm/ksm/%s", knob);
    FILE *f = fopen(path, "r");
    long v = -1;
    if (f) {
        if (fscanf(f, "%ld", &v) != 1) v = -1;
        fclose(f);
    }
    return v;
}

static void ksm_write(const char *knob, long value) {
    char path[128];
    snprintf(path, sizeof path, "/sys/kernel/mm/ksm/%s", knob);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, "%ld", value) < 0 || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

static long pss_kib(pid_t pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int)pid);
    FILE *f = fopen(path, "r");
    long kib = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Pss:", 4)) kib = atol(line + 4);
    if (f) fclose(f);
    return kib;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 2 || (strcmp(argv[1], "private") && strcmp(argv[1], "memfd"))) {
        fprintf(stderr, "usage: %s private|memfd\n", argv[0]);
        return 2;
    }
    int shared = !strcmp(argv[1], "memfd");
    long run = ksm_read("run"), scan = ksm_read("pages_to_scan"), sleep_ms = ksm_read("sleep_millisecs");
    if (run < 0) {
        fprintf(stderr, "no KSM on this kernel (/sys/kernel/mm/ksm)\n");
        return 1;
    }
    pid_t guests[GUESTS];
    for (int g = 0; g < GUESTS; g++) {
        if ((guests[g] = fork()) == 0) {
            char *m;
            if (shared) {
                int fd = memfd_create("guest-ram", 0);
                if (fd < 0 || ftruncate(fd, guest_bytes) != 0) _exit(1);
                m = mmap(NULL, guest_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            } else {
                m = mmap(NULL, guest_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            }
            if (m == MAP_FAILED) _exit(1);
            for (size_t p = 0; p < guest_bytes / 4096; p++) {
                unsigned *w = (unsigned *)(m + p * 4096);
                for (int i = 0; i < 1024; i++) w[i] = (p % 4 == 3 ? p * 7919u + g * 104729u : p * 31u) ^ i;
            }
            if (madvise(m, guest_bytes, MADV_MERGEABLE) != 0) perror("madvise(MADV_MERGEABLE)");
            pause();
            _exit(0);
        }
    }
    sleep(1);
    long before = 0, after = 0;
    for (int g = 0; g < GUESTS; g++) before += pss_kib(guests[g]);
    ksm_write("pages_to_scan", 20000);
    ksm_write("sleep_millisecs", 10);
    long scans = ksm_read("full_scans");
    double start = now();
    ksm_write("run", 1);
    while (ksm_read("full_scans") < scans + 3 && now() - start < 10) usleep(50000);
    double took = now() - start;
    for (int g = 0; g < GUESTS; g++) after += pss_kib(guests[g]);
    printf("%s: %d guests x %zu MiB, 3/4 of pages alike: PSS %ld MiB before, %ld MiB after KSM (%.1f s, %ld full scans); "
           "pages_shared %ld, pages_sharing %ld\n", shared ? "shared memfd" : "private anonymous", GUESTS, guest_bytes >> 20,
           before >> 10, after >> 10, took, ksm_read("full_scans") - scans, ksm_read("pages_shared"), ksm_read("pages_sharing"));
    for (int g = 0; g < GUESTS; g++) {
        kill(guests[g], SIGKILL);
        waitpid(guests[g], NULL, 0);
    }
    ksm_write("run", 2);  // unmerge whatever is left, then put everything back
    ksm_write("run", run);
    ksm_write("pages_to_scan", scan);
    ksm_write("sleep_millisecs", sleep_ms);
    return 0;
}

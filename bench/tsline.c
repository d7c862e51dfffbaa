/*
 * tsline: copies stdin to stdout in pieces, each prefixed with the CLOCK_MONOTONIC time
 * (nanoseconds) at which the read that brought it returned: every line the read completed, then
 * what it left unfinished, marked with "~" before its text (the rest of that line comes as a
 * piece of its own). bench.py pipes a guest's console through it where it times gaps in the
 * output (a migration's pause): a process that does nothing but block in read(2) stamps output
 * as it is written, where a Python reader thread competing for the GIL on two busy cores
 * stamped it up to ~10 ms late.
 */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
    static char buf[65536];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0)
            break;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        unsigned long long ns = (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
        ssize_t start = 0;
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] != '\n')
                continue;
            printf("%llu %.*s\n", ns, (int)(i - start), buf + start);
            start = i + 1;
        }
        if (start < n)
            printf("%llu ~%.*s\n", ns, (int)(n - start), buf + start);
        fflush(stdout);
    }
    return 0;
}

/* dirty: keep a working set of N MiB dirty at R MiB/s (0 = flat out) and emit a heartbeat
 * "HB <seq> <guest_monotonic_ns> <pages_dirtied>\n" every 10 ms on the virtio-serial port
 * "org.hvsim.heartbeat" (or stdout with --stdout), so a host can see every gap and lost beat.
 * usage: dirty WSS_MIB RATE_MIB_S [--seconds S] [--stdout]
 */
#include "common.h"
#include <pthread.h>
#include <sys/mman.h>

static volatile uint64_t dirtied;
static volatile int stop;
static int hb_fd = 1;

static void *heartbeat(void *arg) {
    (void)arg;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t seq = 0; !stop; seq++) {
        char line[96];
        int n = snprintf(line, sizeof line, "HB %llu %llu %llu\n", (unsigned long long)seq,
                         (unsigned long long)mono_ns(), (unsigned long long)dirtied);
        if (write_all(hb_fd, line, (size_t)n) < 0 && errno != EAGAIN) usleep(1000);
        next.tv_nsec += 10000000;
        if (next.tv_nsec >= 1000000000) { next.tv_nsec -= 1000000000; next.tv_sec++; }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) { }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: dirty WSS_MIB RATE_MIB_S [--seconds S] [--stdout]\n");
        return 2;
    }
    long wss = atol(argv[1]);
    double rate = atof(argv[2]);
    double seconds = 0;
    int use_stdout = 0;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--stdout")) use_stdout = 1;
        else { fprintf(stderr, "dirty: unknown argument %s\n", argv[i]); return 2; }
    }
    if (wss <= 0 || rate < 0) { fprintf(stderr, "dirty: WSS_MIB must be > 0 and RATE >= 0\n"); return 2; }
    if (!use_stdout) {
        hb_fd = open_vport("org.hvsim.heartbeat", O_WRONLY);
        if (hb_fd < 0) { fprintf(stderr, "dirty: no virtio-serial port org.hvsim.heartbeat\n"); return 1; }
    }
    size_t pages = (size_t)wss * 256;
    volatile uint64_t *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) { perror("dirty: mmap"); return 1; }
    pthread_t t;
    pthread_create(&t, NULL, heartbeat, NULL);
    uint64_t start = mono_ns();
    double pages_per_ns = rate * 256.0 / 1e9;
    size_t p = 0;
    uint64_t gen = 0;
    while (!stop) {
        uint64_t now = mono_ns();
        if (seconds > 0 && (double)(now - start) / 1e9 >= seconds) break;
        uint64_t budget = rate > 0 ? (uint64_t)((double)(now - start) * pages_per_ns) - dirtied : 4096;
        if (budget == 0) { usleep(500); continue; }
        if (budget > 4096) budget = 4096;
        for (uint64_t k = 0; k < budget; k++) {
            mem[p * 512] = ++gen;
            if (++p == pages) p = 0;
        }
        dirtied += budget;
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("dirty: pages_dirtied=%llu\n", (unsigned long long)dirtied);
    return 0;
}

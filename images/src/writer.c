/* hvsim-writer: the guest application whose data a cross-cloud migration moves.
 *
 * Appends fixed-size, sequence-numbered, checksummed records to a file (on the ext4 data disk)
 * and acknowledges each one on stdout only after fdatasync() returned, so every acknowledged
 * record is durable and can be checked later (at the destination of a migration):
 *
 *   record (RS bytes, RS = -s, default 4096, little-endian):
 *     0  u32 magic "HVRC"   4 u32 RS   8 u64 seq   16 u64 guest CLOCK_MONOTONIC ns
 *     24 u64 xxh64 of the whole record with this field zeroed (seed = seq)
 *     32 payload: 64-bit words derived from (seq, word index), so a misplaced or stale record fails
 *
 *   hvsim-writer -f FILE [-s RS] [-r KiB/s] [-p PORT]      write; on start, recover the file: keep the
 *          longest valid prefix (seq 1, 2, ...), truncate a torn tail, continue with the next seq
 *     stdout: "RECOVER <records> <last_seq>", then "ACK <seq> <xxh64 hex>" per record, "STOP <last_seq>"
 *     SIGTERM/SIGINT: finish the record in flight (ack it), print STOP, exit 0 (the quiesce)
 *     -p PORT: a TCP status port on 0.0.0.0 answering "hvsim-writer <host> <last_seq>\n" (the service)
 *   hvsim-writer -V -f FILE [-s RS]                        verify: print "R <seq> <xxh64 hex>" per valid
 *          record, then "VERIFY <records> <last_seq> <bad>" (bad = records after the valid prefix)
 */
#include "common.h"
#include "xxh64.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

#define MAGIC 0x43525648u /* "HVRC" little-endian */
#define HDR 32

static volatile sig_atomic_t stop_flag;
static volatile uint64_t last_seq;
static char hostname_buf[64];

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static void fill(uint8_t *rec, uint32_t rs, uint64_t seq, uint64_t t_ns) {
    uint32_t magic = MAGIC;
    uint64_t zero = 0;
    memcpy(rec, &magic, 4); memcpy(rec + 4, &rs, 4); memcpy(rec + 8, &seq, 8);
    memcpy(rec + 16, &t_ns, 8); memcpy(rec + 24, &zero, 8);
    for (uint32_t j = 0; HDR + 8 * (j + 1) <= rs; j++) {
        uint64_t w = page_word(0x5EC0, seq, j);
        memcpy(rec + HDR + 8 * j, &w, 8);
    }
    uint64_t h = xxh64(rec, rs, seq);
    memcpy(rec + 24, &h, 8);
}

/* 1 if rec is the valid record number seq. */
static int valid(uint8_t *rec, uint32_t rs, uint64_t seq, uint64_t *hash) {
    uint32_t magic, size;
    uint64_t s, h, zero = 0;
    memcpy(&magic, rec, 4); memcpy(&size, rec + 4, 4); memcpy(&s, rec + 8, 8); memcpy(&h, rec + 24, 8);
    if (magic != MAGIC || size != rs || s != seq) return 0;
    memcpy(rec + 24, &zero, 8);
    uint64_t c = xxh64(rec, rs, seq);
    memcpy(rec + 24, &h, 8);
    if (c != h) return 0;
    for (uint32_t j = 0; HDR + 8 * (j + 1) <= rs; j++) {
        uint64_t w;
        memcpy(&w, rec + HDR + 8 * j, 8);
        if (w != page_word(0x5EC0, seq, j)) return 0;
    }
    *hash = h;
    return 1;
}

/* Scan the valid prefix; returns its record count. verbose: print "R seq hash" lines. */
static uint64_t scan(int fd, uint32_t rs, int verbose, uint64_t *bad) {
    uint8_t *rec = malloc(rs);
    uint64_t n = 0, h;
    struct stat st;
    if (!rec || fstat(fd, &st) < 0) { perror("hvsim-writer: scan"); exit(1); }
    uint64_t total = (uint64_t)st.st_size / rs;
    while (n < total && pread(fd, rec, rs, (off_t)(n * rs)) == (ssize_t)rs && valid(rec, rs, n + 1, &h)) {
        if (verbose) printf("R %llu %016llx\n", (unsigned long long)(n + 1), (unsigned long long)h);
        n++;
    }
    *bad = total - n + (((uint64_t)st.st_size % rs) ? 1 : 0);
    free(rec);
    return n;
}

static void *status_server(void *arg) {
    int port = *(int *)arg;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = INADDR_ANY};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 16) < 0) {
        fprintf(stderr, "hvsim-writer: status port %d: %s\n", port, strerror(errno));
        return NULL;
    }
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) continue;
        char line[128];
        int n = snprintf(line, sizeof line, "hvsim-writer %s %llu\n", hostname_buf, (unsigned long long)last_seq);
        write_all(c, line, (size_t)n);
        close(c);
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *file = NULL;
    uint32_t rs = 4096;
    double rate_kib = 256;
    int verify = 0, port = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-f") && i + 1 < argc) file = argv[++i];
        else if (!strcmp(argv[i], "-s") && i + 1 < argc) rs = (uint32_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) rate_kib = atof(argv[++i]);
        else if (!strcmp(argv[i], "-p") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-V")) verify = 1;
        else { fprintf(stderr, "hvsim-writer: unknown argument %s\n", argv[i]); return 2; }
    }
    if (!file || rs < 64 || rs > (1u << 20) || rs % 8 || rate_kib < 0 || port < 0 || port > 65535) {
        fprintf(stderr, "usage: hvsim-writer -f FILE [-s RECSIZE 64..1M, multiple of 8] [-r KiB/s] [-p PORT] [-V]\n");
        return 2;
    }
    gethostname(hostname_buf, sizeof hostname_buf - 1);
    uint64_t bad = 0;
    if (verify) {
        int fd = open(file, O_RDONLY);
        if (fd < 0) { fprintf(stderr, "hvsim-writer: %s: %s\n", file, strerror(errno)); return 1; }
        uint64_t n = scan(fd, rs, 1, &bad);
        printf("VERIFY %llu %llu %llu\n", (unsigned long long)n, (unsigned long long)n, (unsigned long long)bad);
        return 0;
    }
    int fd = open(file, O_RDWR | O_CREAT, 0644);
    if (fd < 0) { fprintf(stderr, "hvsim-writer: %s: %s\n", file, strerror(errno)); return 1; }
    uint64_t n = scan(fd, rs, 0, &bad);
    if (ftruncate(fd, (off_t)(n * rs)) < 0 || fdatasync(fd) < 0) { perror("hvsim-writer: truncate"); return 1; }
    last_seq = n;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("RECOVER %llu %llu\n", (unsigned long long)n, (unsigned long long)n);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    pthread_t th;
    if (port) pthread_create(&th, NULL, status_server, &port);
    uint8_t *rec = malloc(rs);
    if (!rec) return 1;
    double interval_ns = rate_kib > 0 ? (double)rs / (rate_kib * 1024.0) * 1e9 : 0;
    uint64_t t0 = mono_ns(), k = 0;
    while (!stop_flag) {
        uint64_t seq = last_seq + 1;
        fill(rec, rs, seq, mono_ns());
        if (pwrite(fd, rec, rs, (off_t)((seq - 1) * rs)) != (ssize_t)rs || fdatasync(fd) < 0) {
            fprintf(stderr, "hvsim-writer: write of record %llu failed: %s\n", (unsigned long long)seq, strerror(errno));
            return 1;
        }
        uint64_t h;
        memcpy(&h, rec + 24, 8);
        last_seq = seq;
        printf("ACK %llu %016llx\n", (unsigned long long)seq, (unsigned long long)h);
        k++;
        if (interval_ns > 0) {
            uint64_t due = t0 + (uint64_t)(interval_ns * (double)k);
            struct timespec ts = {.tv_sec = (time_t)(due / 1000000000ull), .tv_nsec = (long)(due % 1000000000ull)};
            while (!stop_flag && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) { }
        }
    }
    printf("STOP %llu\n", (unsigned long long)last_seq);
    return 0;
}

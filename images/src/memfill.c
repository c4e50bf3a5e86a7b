/* memfill: fill N MiB of anonymous memory with a verifiable per-page pattern, then keep it and
 * serve verification passes ("retouch") on a unix socket. The foreground process returns once the
 * fill is done ("FILLED pages=N secs=S"); a background child holds the memory.
 * usage: memfill MIB [--seed S] [--sock PATH]     (default socket /run/memfill.sock)
 * protocol: client sends "seq|rev|rand [SEED]\n" or "quit\n";
 *           reply "OK order=O pages=N bad=B secs=S first_bad=I\n"
 */
#include "common.h"
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

static uint64_t *mem;
static size_t pages;
static uint64_t seed = 0x68767369;

static void fill(void) {
    for (size_t i = 0; i < pages; i++)
        for (size_t j = 0; j < 512; j++) mem[i * 512 + j] = page_word(seed, i, j);
}

static int check_page(size_t i) {
    for (size_t j = 0; j < 512; j++)
        if (mem[i * 512 + j] != page_word(seed, i, j)) return 0;
    return 1;
}

static void serve(int lfd) {
    size_t *perm = malloc(pages * sizeof *perm);
    for (;;) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) continue;
        char req[64] = {0};
        ssize_t n = read(c, req, sizeof req - 1);
        if (n <= 0) { close(c); continue; }
        char order[16] = {0};
        unsigned long long rseed = 1;
        sscanf(req, "%15s %llu", order, &rseed);
        if (!strcmp(order, "quit")) { write_all(c, "BYE\n", 4); close(c); exit(0); }
        for (size_t i = 0; i < pages; i++) perm[i] = i;
        if (!strcmp(order, "rev")) {
            for (size_t i = 0; i < pages; i++) perm[i] = pages - 1 - i;
        } else if (!strcmp(order, "rand")) {
            uint64_t x = rseed ? rseed : 1;
            for (size_t i = pages - 1; i > 0; i--) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                size_t k = (size_t)(x % (i + 1));
                size_t t = perm[i]; perm[i] = perm[k]; perm[k] = t;
            }
        } else if (strcmp(order, "seq")) {
            write_all(c, "ERR unknown order\n", 18);
            close(c);
            continue;
        }
        uint64_t t0 = mono_ns();
        size_t bad = 0, first_bad = (size_t)-1;
        for (size_t i = 0; i < pages; i++)
            if (!check_page(perm[i])) { if (!bad) first_bad = perm[i]; bad++; }
        double secs = (double)(mono_ns() - t0) / 1e9;
        char out[160];
        int m = snprintf(out, sizeof out, "OK order=%s pages=%zu bad=%zu secs=%.4f first_bad=%lld\n",
                         order, pages, bad, secs, bad ? (long long)first_bad : -1LL);
        write_all(c, out, (size_t)m);
        close(c);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: memfill MIB [--seed S] [--sock PATH]\n"); return 2; }
    long mib = atol(argv[1]);
    const char *sock = "/run/memfill.sock";
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--sock") && i + 1 < argc) sock = argv[++i];
        else { fprintf(stderr, "memfill: unknown argument %s\n", argv[i]); return 2; }
    }
    if (mib <= 0) { fprintf(stderr, "memfill: MIB must be > 0\n"); return 2; }
    pages = (size_t)mib * 256;
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", sock);
    unlink(sock);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4) < 0) {
        perror("memfill: socket");
        return 1;
    }
    int p[2];
    if (pipe(p) < 0) return 1;
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        setsid();
        mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) { dprintf(p[1], "ERR mmap failed\n"); _exit(1); }
        uint64_t t0 = mono_ns();
        fill();
        dprintf(p[1], "FILLED pages=%zu secs=%.4f\n", pages, (double)(mono_ns() - t0) / 1e9);
        close(p[1]);
        int dn = open("/dev/null", O_RDWR);
        dup2(dn, 0); dup2(dn, 1); dup2(dn, 2);
        serve(lfd);
        _exit(0);
    }
    close(p[1]);
    close(lfd);
    char msg[128] = {0};
    ssize_t n = read(p[0], msg, sizeof msg - 1);
    if (n <= 0 || strncmp(msg, "FILLED", 6)) {
        fprintf(stderr, "memfill: child failed: %s\n", n > 0 ? msg : "no report");
        return 1;
    }
    fputs(msg, stdout);
    return 0;
}

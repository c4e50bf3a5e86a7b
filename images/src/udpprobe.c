/* udpprobe: send a UDP probe every INTERVAL to an echo peer (udpecho), record every echo, and
 * optionally keep a TCP stream through the same peer; print one JSON report.
 *
 * usage: udpprobe -t IP [-p PORT] [-i INTERVAL_US] [-d SECONDS] [-w WAIT_MS] [-T] [-g GAP_MS] [-r FILE]
 *   -t IP          peer address (IPv4)
 *   -p PORT        peer port (default 7777)
 *   -i US          probe interval in microseconds (default 1000)
 *   -d SECONDS     stop after this long (default 0: until SIGTERM/SIGINT)
 *   -w MS          after stopping, keep listening this long for late echoes (default 300; with -T
 *                  also until the TCP stream has drained, at most 10 s more)
 *   -T             also run a TCP stream check: 16 bytes every 10 ms, every byte must come back
 *   -g MS          list echo gaps of at least this many ms (default 5)
 *   -r FILE        write one line per probe: "seq send_ns first_echo_ns echoes"
 *   -R             real-time scheduling (SCHED_FIFO 10) if permitted: on a busy host the
 *                  prober's own wake-up latency would otherwise show up as network gaps
 * Times are CLOCK_MONOTONIC nanoseconds (the clock Python's time.monotonic_ns() reads).
 * Probes are sent on an absolute-time schedule (clock_nanosleep TIMER_ABSTIME); if the prober
 * itself is late by more than one interval it reports that ("max_send_late_ms"): a gap caused
 * by the prober, not the network.
 *
 * JSON fields: sent, received (distinct), lost, duplicates (extra echoes of a probe),
 * max_gap_ms (largest interval between consecutive distinct echoes, counted from the first send
 * and, if the last probes were lost, to the last send + WAIT), max_gap_from_ns/to_ns,
 * gaps (list [from_ns, to_ns] >= GAP_MS, at most 256), lost_ranges ([first_seq, last_seq,
 * first_send_ns, last_send_ns], at most 256), rtt_ms {p50, p99, max}, first_send_ns,
 * last_send_ns, interval_us, max_send_late_ms, tcp {...} with -T.
 */
#define _GNU_SOURCE
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>

#define MAGIC 0x48565052u /* "HVPR" */
#define MAX_LIST 256
#define TCP_CHUNK 16
#define TCP_EVERY_NS 10000000ull
#define TCP_WAIT_NS 10000000000ull /* after the end: wait up to 10 s for the stream to drain */

struct probe { uint32_t magic, seq; uint64_t send_ns; uint64_t pad[2]; };

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t *send_ns, *echo_ns;
static uint32_t *echoes;
static size_t cap, nsent;
static uint64_t *arrivals;   /* distinct echo arrival times, in arrival order */
static size_t narr, arrcap;

static void grow(void) {
    size_t ncap = cap ? cap * 2 : 65536;
    send_ns = realloc(send_ns, ncap * sizeof *send_ns);
    echo_ns = realloc(echo_ns, ncap * sizeof *echo_ns);
    echoes = realloc(echoes, ncap * sizeof *echoes);
    if (!send_ns || !echo_ns || !echoes) { fprintf(stderr, "udpprobe: out of memory\n"); exit(1); }
    memset(echo_ns + cap, 0, (ncap - cap) * sizeof *echo_ns);
    memset(echoes + cap, 0, (ncap - cap) * sizeof *echoes);
    cap = ncap;
}

static void add_arrival(uint64_t t) {
    if (narr == arrcap) {
        arrcap = arrcap ? arrcap * 2 : 65536;
        arrivals = realloc(arrivals, arrcap * sizeof *arrivals);
        if (!arrivals) { fprintf(stderr, "udpprobe: out of memory\n"); exit(1); }
    }
    arrivals[narr++] = t;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* TCP stream check state */
static int tfd = -1;
static uint64_t tcp_sent, tcp_echoed, tcp_last_send, tcp_last_progress, tcp_max_stall, tcp_waiting_since;
static int tcp_bad;
static char tcp_err[128];
static char tcp_pending[TCP_CHUNK];
static size_t tcp_pending_len;

static void tcp_fail(const char *what) {
    if (!tcp_bad) snprintf(tcp_err, sizeof tcp_err, "%s: %s", what, strerror(errno));
    tcp_bad = 1;
    if (tfd >= 0) { close(tfd); tfd = -1; }
}

static uint8_t stream_byte(uint64_t i) { return (uint8_t)(i * 131u + (i >> 8) * 7u + 1u); }

static void tcp_send(uint64_t now) {
    if (tfd < 0) return;
    if (tcp_pending_len == 0) {
        if (now - tcp_last_send < TCP_EVERY_NS) return;
        for (size_t k = 0; k < TCP_CHUNK; k++) tcp_pending[k] = (char)stream_byte(tcp_sent + k);
        tcp_pending_len = TCP_CHUNK;
        tcp_last_send = now;
    }
    ssize_t w = send(tfd, tcp_pending + (TCP_CHUNK - tcp_pending_len), tcp_pending_len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w > 0) {
        if (tcp_echoed == tcp_sent) tcp_waiting_since = now;   /* bytes outstanding from now on */
        tcp_sent += (uint64_t)w;
        tcp_pending_len -= (size_t)w;
    }
    else if (w < 0 && errno != EAGAIN && errno != EINTR) tcp_fail("tcp send");
}

static void tcp_recv(uint64_t now) {
    if (tfd < 0) return;
    char b[4096];
    for (;;) {
        ssize_t r = recv(tfd, b, sizeof b, MSG_DONTWAIT);
        if (r == 0) { errno = ECONNRESET; tcp_fail("tcp closed by peer"); return; }
        if (r < 0) { if (errno != EAGAIN && errno != EINTR) tcp_fail("tcp recv"); return; }
        for (ssize_t k = 0; k < r; k++) {
            if ((uint8_t)b[k] != stream_byte(tcp_echoed + (uint64_t)k)) {
                errno = EILSEQ;
                tcp_fail("tcp echo out of order or corrupted");
                return;
            }
        }
        if (tcp_echoed + (uint64_t)r > tcp_sent) { errno = EPROTO; tcp_fail("tcp echoed more than sent"); return; }
        uint64_t since = tcp_waiting_since > tcp_last_progress ? tcp_waiting_since : tcp_last_progress;
        if (now - since > tcp_max_stall) tcp_max_stall = now - since;   /* longest wait for an echo */
        tcp_echoed += (uint64_t)r;
        tcp_last_progress = now;
    }
}

static void handle_udp(int u) {
    for (int k = 0; k < 256; k++) {
        struct probe p;
        ssize_t r = recv(u, &p, sizeof p, MSG_DONTWAIT);
        if (r < 0) return;
        uint64_t now = mono_ns();
        if (r != (ssize_t)sizeof p || p.magic != MAGIC || p.seq >= nsent || p.send_ns != send_ns[p.seq]) continue;
        if (echoes[p.seq]++ == 0) { echo_ns[p.seq] = now; add_arrival(now); }
    }
}

int main(int argc, char **argv) {
    const char *target = NULL, *raw = NULL;
    int port = 7777, tcp = 0, realtime = 0, opt;
    long interval_us = 1000, wait_ms = 300;
    double duration = 0, gap_ms = 5;
    while ((opt = getopt(argc, argv, "t:p:i:d:w:Tg:r:R")) != -1) {
        switch (opt) {
        case 't': target = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'i': interval_us = atol(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': wait_ms = atol(optarg); break;
        case 'T': tcp = 1; break;
        case 'g': gap_ms = atof(optarg); break;
        case 'r': raw = optarg; break;
        case 'R': realtime = 1; break;
        default:
            fprintf(stderr, "usage: udpprobe -t IP [-p PORT] [-i US] [-d S] [-w MS] [-T] [-g MS] [-r FILE] [-R]\n");
            return 2;
        }
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (!target || inet_pton(AF_INET, target, &sa.sin_addr) != 1 || port < 1 || port > 65535 ||
        interval_us < 50 || interval_us > 1000000 || duration < 0 || wait_ms < 0 || wait_ms > 600000) {
        fprintf(stderr, "udpprobe: need -t IPv4, port 1..65535, interval 50..1000000 us, wait 0..600000 ms\n");
        return 2;
    }
    if (realtime) {
        struct sched_param sp = {.sched_priority = 10};
        if (sched_setscheduler(0, SCHED_FIFO, &sp) != 0) realtime = 0;
    }
    struct sigaction act = {.sa_handler = on_signal};
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    signal(SIGPIPE, SIG_IGN);
    int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (u < 0 || connect(u, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("udpprobe: udp socket"); return 1; }
    int rcv = 4 << 20;
    setsockopt(u, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    if (tcp) {
        tfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(tfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct timeval tv = {2, 0};
        setsockopt(tfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(tfd, (struct sockaddr *)&sa, sizeof sa) < 0) tcp_fail("tcp connect");
    }
    printf("{\"ready\": true}\n");
    fflush(stdout);

    uint64_t interval_ns = (uint64_t)interval_us * 1000ull;
    uint64_t start = mono_ns(), next = start, max_late = 0;
    uint64_t end = duration > 0 ? start + (uint64_t)(duration * 1e9) : UINT64_MAX;
    tcp_last_progress = start;
    struct pollfd pf[2] = {{u, POLLIN, 0}, {tfd, POLLIN, 0}};
    int draining = 0;
    uint64_t drain_until = 0;
    for (;;) {
        uint64_t now = mono_ns();
        if (!draining && (stop || now >= end)) {
            draining = 1;
            drain_until = now + (uint64_t)wait_ms * 1000000ull;
        }
        if (draining) {
            int tcp_waiting = tcp && tfd >= 0 && tcp_echoed < tcp_sent && now < drain_until + TCP_WAIT_NS;
            if (now >= drain_until && !tcp_waiting) break;
        } else if (now >= next) {
            if (nsent == cap) grow();
            struct probe p = {MAGIC, (uint32_t)nsent, now, {0, 0}};
            send_ns[nsent] = now;
            nsent++;
            send(u, &p, sizeof p, MSG_DONTWAIT);
            if (now - next > max_late) max_late = now - next;
            next += interval_ns;
            if (now > next + interval_ns) next = now + interval_ns;   /* we were descheduled: don't burst */
        }
        if (tcp && !draining) tcp_send(now);
        uint64_t until = draining ? (now < drain_until ? drain_until : now + 10000000ull) : next;
        now = mono_ns();
        uint64_t wait = until > now ? until - now : 0;
        if (tcp && !draining && wait > TCP_EVERY_NS) wait = TCP_EVERY_NS;
        struct timespec ts = {(time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull)};
        pf[1].fd = tfd;
        int n = ppoll(pf, tcp ? 2 : 1, &ts, NULL);
        if (n < 0 && errno != EINTR) { perror("udpprobe: ppoll"); return 1; }
        if (n > 0 && (pf[0].revents & POLLIN)) handle_udp(u);
        if (n > 0 && tcp && tfd >= 0 && pf[1].revents) tcp_recv(mono_ns());
    }
    uint64_t last_send = nsent ? send_ns[nsent - 1] : start;

    /* report */
    size_t received = 0, duplicates = 0;
    for (size_t i = 0; i < nsent; i++) {
        if (echoes[i]) { received++; duplicates += echoes[i] - 1; }
    }
    /* the echo timeline starts at the first send and, if the last probes got no echo, ends at the
     * last send plus the wait: a blackout that never ended is a gap too */
    if (nsent && !echoes[nsent - 1]) add_arrival(last_send + (uint64_t)wait_ms * 1000000ull);
    uint64_t max_gap = 0, gap_from = 0, gap_to = 0, prev = start;
    for (size_t i = 0; i < narr; i++) {
        uint64_t g = arrivals[i] - prev;
        if (g > max_gap) { max_gap = g; gap_from = prev; gap_to = arrivals[i]; }
        prev = arrivals[i];
    }
    printf("{\"sent\": %zu, \"received\": %zu, \"lost\": %zu, \"duplicates\": %zu, \"interval_us\": %ld, ",
           nsent, received, nsent - received, duplicates, interval_us);
    printf("\"realtime\": %s, \"first_send_ns\": %llu, \"last_send_ns\": %llu, \"max_send_late_ms\": %.3f, ",
           realtime ? "true" : "false", (unsigned long long)start, (unsigned long long)last_send, max_late / 1e6);
    printf("\"max_gap_ms\": %.3f, \"max_gap_from_ns\": %llu, \"max_gap_to_ns\": %llu, \"gaps\": [",
           max_gap / 1e6, (unsigned long long)gap_from, (unsigned long long)gap_to);
    int listed = 0;
    prev = start;
    for (size_t i = 0; i < narr && listed < MAX_LIST; i++) {
        if ((double)(arrivals[i] - prev) >= gap_ms * 1e6) {
            printf("%s[%llu, %llu]", listed++ ? ", " : "", (unsigned long long)prev, (unsigned long long)arrivals[i]);
        }
        prev = arrivals[i];
    }
    printf("], \"lost_ranges\": [");
    listed = 0;
    for (size_t i = 0; i < nsent && listed < MAX_LIST;) {
        if (echoes[i]) { i++; continue; }
        size_t j = i;
        while (j + 1 < nsent && !echoes[j + 1]) j++;
        printf("%s[%zu, %zu, %llu, %llu]", listed++ ? ", " : "", i, j, (unsigned long long)send_ns[i],
               (unsigned long long)send_ns[j]);
        i = j + 1;
    }
    printf("], ");
    uint64_t *rtt = malloc((received ? received : 1) * sizeof *rtt);
    size_t nr = 0;
    for (size_t i = 0; i < nsent && rtt; i++) if (echoes[i]) rtt[nr++] = echo_ns[i] - send_ns[i];
    if (rtt && nr) qsort(rtt, nr, sizeof *rtt, cmp_u64);
    printf("\"rtt_ms\": {\"p50\": %.3f, \"p99\": %.3f, \"max\": %.3f}",
           nr ? rtt[nr / 2] / 1e6 : 0.0, nr ? rtt[(nr * 99) / 100 < nr ? (nr * 99) / 100 : nr - 1] / 1e6 : 0.0,
           nr ? rtt[nr - 1] / 1e6 : 0.0);
    if (tcp) {
        if (!tcp_bad && tcp_echoed < tcp_sent) { errno = ETIMEDOUT; tcp_fail("tcp echo incomplete at the end"); }
        printf(", \"tcp\": {\"ok\": %s, \"sent\": %llu, \"echoed\": %llu, \"max_stall_ms\": %.3f, \"error\": \"%s\"}",
               tcp_bad ? "false" : "true", (unsigned long long)tcp_sent, (unsigned long long)tcp_echoed,
               tcp_max_stall / 1e6, tcp_err);
    }
    printf("}\n");
    fflush(stdout);
    if (raw) {
        FILE *f = fopen(raw, "w");
        if (!f) { perror("udpprobe: raw file"); return 1; }
        for (size_t i = 0; i < nsent; i++)
            fprintf(f, "%zu %llu %llu %u\n", i, (unsigned long long)send_ns[i], (unsigned long long)echo_ns[i],
                    echoes[i]);
        fclose(f);
    }
    free(rtt);
    return 0;
}

/* hvsim-migrate: the migration agents of a cross-cloud migration (US20170371696), pushed into the
 * source and destination guests through the guest agent and removed at the end.
 *
 *   hvsim-migrate recv --dev DEV --listen PORT --cert C --key K --ca CA --state FILE [--session HEX]
 *   hvsim-migrate send --dev DEV --connect IP:PORT --cert C --key K --ca CA --ctl FIFO [--rate B/s]
 *                      [--session HEX] [--corrupt-seq N] [--resume ROUNDS]
 *   hvsim-migrate hash --dev DEV [--chunk BYTES] [--list]     xxh64 per chunk, and one digest of the list
 *
 * Transport: TLS 1.3 (OpenSSL, linked statically), mutual: each side presents a certificate of the
 * migration's CA and verifies the peer's; the source also checks the destination's IP SAN.
 *
 * Wire format (little-endian): a 40-byte header, then <length> payload bytes
 *   u32 magic "HVMG" | u8 type | u8 version (1) | u16 flags (0) | u32 length | u32 reserved (0)
 *   u64 seq | u64 offset | u64 check = xxh64(payload, seed = seq ^ offset)
 * types: HELLO 1 (src->dst: u64 disk size, u32 block size, u32 0, 16-byte session)
 *        WELCOME 2 (dst->src: u64 disk size, u64 applied seq, 16-byte session)
 *        DATA 3 (bytes for [offset, offset+length)), ZERO 4 (u64 length of zeros at offset),
 *        ROUND 5 (u64 round, u64 final), ACK 6 (seq = every message <= seq is on the destination's
 *        disk, fdatasync'ed, recorded in its state file), REFUSE 7 (seq refused, reason text),
 *        PING 8 (keepalive), BYE 9 (end; the destination syncs, acks and exits)
 * The destination validates every field: magic, version, type, flags, reserved, lengths (a block
 * multiple, at most 1 MiB), offsets (block aligned, inside its disk, no overflow), the sequence
 * (exactly the next one; an already applied one is counted and dropped) and the checksum. A corrupt
 * message is refused (REFUSE, connection closed, nothing written); a malformed one closes the
 * connection. The source resends from the destination's applied seq after a reconnect: what was
 * acknowledged is never resent.
 *
 * Change tracking (source): the kernel's block:block_rq_complete tracepoint, in a private tracefs
 * instance filtered on the disk's device number, is the write log. A write completes before the
 * event is recorded and before we read the block, so a round cut by a trace_marker line gets every
 * write completed before the cut; later writes land in the next round. If the ring buffer overran,
 * the round falls back to rereading the whole disk and comparing per-block xxh64 hashes.
 *
 * Source control (lines on the FIFO --ctl): "round" (cut and copy one round), "final" (the
 * application is quiesced: cut, copy the rest, end with a final ROUND, exit), "rate N" (bytes/s,
 * 0 = unlimited), "dirty FILE" (mark the byte ranges listed in FILE, lines "OFFSET LENGTH", block
 * aligned and inside the disk, for the next round: answered "DIRTY marked_bytes=N bad=M"), "quit".
 * Progress on stdout: "STAT k=v ...", "ROUND n done k=v ...", "FINAL ...".
 *
 * Resuming (after the orchestrator's restart killed the agents): "send --resume ROUNDS" starts with
 * ROUNDS rounds (0 or more) counted as done; its first round copies only what is marked dirty (no
 * whole-disk first round, no zero skipping: the destination is not fresh), numbering goes on.
 * The orchestrator marks what differs between the two disks (per-chunk hashes of both, taken after
 * this agent's READY: from then on the write log has every later write) with "dirty FILE".
 */
#define _GNU_SOURCE
#include "common.h"
#include "xxh64.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <linux/fs.h>

#define MAGIC 0x474D5648u
#define VERSION 1
#define HDR_LEN 40
#define BLK 4096u
#define MAX_PAYLOAD (1u << 20)
#define MAX_EXTENT (256u << 10)
#define MAX_ZERO (64ull << 20)
#define RING 4096
#define WINDOW_BYTES (8u << 20)
enum { HELLO = 1, WELCOME, DATA, ZERO, ROUND, ACK, REFUSE, PING, BYE };

struct hdr { uint32_t magic; uint8_t type, version; uint16_t flags; uint32_t length, reserved;
             uint64_t seq, offset, check; };

static const char *opt_dev, *opt_cert, *opt_key, *opt_ca, *opt_ctl, *opt_state, *opt_connect;
static int opt_port;
static uint8_t session[16];
static double now_s(void) { return (double)mono_ns() / 1e9; }

static void die(const char *what) {
    fprintf(stdout, "ERROR %s: %s\n", what, errno ? strerror(errno) : "");
    fflush(stdout);
    exit(3);
}

static void put_hdr(uint8_t *b, const struct hdr *h) {
    memcpy(b, &h->magic, 4); b[4] = h->type; b[5] = h->version; memcpy(b + 6, &h->flags, 2);
    memcpy(b + 8, &h->length, 4); memcpy(b + 12, &h->reserved, 4); memcpy(b + 16, &h->seq, 8);
    memcpy(b + 24, &h->offset, 8); memcpy(b + 32, &h->check, 8);
}
static void get_hdr(const uint8_t *b, struct hdr *h) {
    memcpy(&h->magic, b, 4); h->type = b[4]; h->version = b[5]; memcpy(&h->flags, b + 6, 2);
    memcpy(&h->length, b + 8, 4); memcpy(&h->reserved, b + 12, 4); memcpy(&h->seq, b + 16, 8);
    memcpy(&h->offset, b + 24, 8); memcpy(&h->check, b + 32, 8);
}

static int hexsession(const char *s) {
    if (strlen(s) != 32) return -1;
    for (int i = 0; i < 16; i++) { unsigned v; if (sscanf(s + 2 * i, "%2x", &v) != 1) return -1; session[i] = (uint8_t)v; }
    return 0;
}

/* ---- TLS ------------------------------------------------------------------------------------ */
static SSL_CTX *tls_ctx(int server) {
    OPENSSL_init_ssl(OPENSSL_INIT_NO_LOAD_CONFIG, NULL);
    SSL_CTX *c = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!c) die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION);
    SSL_CTX_set_ciphersuites(c, "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256");
    if (SSL_CTX_use_certificate_chain_file(c, opt_cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(c, opt_key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(c) != 1 ||
        SSL_CTX_load_verify_locations(c, opt_ca, NULL) != 1) {
        ERR_print_errors_fp(stdout);
        errno = 0;
        die("TLS credentials");
    }
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    if (server) SSL_CTX_set_options(c, SSL_OP_PRIORITIZE_CHACHA);
    return c;
}

static int set_timeouts(int fd, int seconds) {
    struct timeval tv = {.tv_sec = seconds};
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) | setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int ssl_read_all(SSL *s, void *buf, size_t n) {
    uint8_t *p = buf;
    while (n > 0) {
        int r = SSL_read(s, p, n > (1u << 30) ? (1 << 30) : (int)n);
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}
static int ssl_write_all(SSL *s, const void *buf, size_t n) {
    const uint8_t *p = buf;
    while (n > 0) {
        int r = SSL_write(s, p, (int)n);
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}
static int send_msg(SSL *s, uint8_t type, uint64_t seq, uint64_t off, const void *payload, uint32_t len) {
    static uint8_t *buf;
    if (!buf) buf = malloc(HDR_LEN + MAX_PAYLOAD);
    struct hdr h = {MAGIC, type, VERSION, 0, len, 0, seq, off, xxh64(payload, len, seq ^ off)};
    put_hdr(buf, &h);
    if (len) memcpy(buf + HDR_LEN, payload, len);
    return ssl_write_all(s, buf, HDR_LEN + len);
}

static uint64_t dev_size(int fd) {
    struct stat st;
    uint64_t sz = 0;
    if (fstat(fd, &st) < 0) die("fstat");
    if (S_ISBLK(st.st_mode)) { if (ioctl(fd, BLKGETSIZE64, &sz) < 0) die("BLKGETSIZE64"); }
    else sz = (uint64_t)st.st_size;
    return sz;
}

/* ---- destination ------------------------------------------------------------------------------ */
static uint64_t applied, dups, refused, conns, bytes_in, msgs_in;
static int devfd = -1;

static void save_state(void) {
    char tmp[512], line[128];
    if (fdatasync(devfd) < 0) die("fdatasync");
    snprintf(tmp, sizeof tmp, "%s.tmp", opt_state);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) die("state file");
    int n = snprintf(line, sizeof line, "applied %llu\n", (unsigned long long)applied);
    for (int i = 0; i < 16; i++) n += snprintf(line + n, sizeof line - (size_t)n, "%02x", session[i]);
    line[n++] = '\n';
    if (write_all(fd, line, (size_t)n) < 0 || fsync(fd) < 0) die("state write");
    close(fd);
    if (rename(tmp, opt_state) < 0) die("state rename");
}

static void load_state(int have_session) {
    FILE *f = fopen(opt_state, "r");
    if (!f) return;
    unsigned long long a;
    char hex[64] = "";
    if (fscanf(f, "applied %llu\n%63s", &a, hex) == 2) {
        uint8_t mine[16];
        memcpy(mine, session, 16);
        if (hexsession(hex) == 0) {
            if (have_session && memcmp(mine, session, 16) != 0) {
                errno = 0;
                die("state file belongs to another migration session");
            }
            applied = a;
        }
    }
    fclose(f);
}

static void stat_recv(const char *what) {
    printf("RECV %s applied=%llu bytes=%llu msgs=%llu dup=%llu refused=%llu conns=%llu\n", what,
           (unsigned long long)applied, (unsigned long long)bytes_in, (unsigned long long)msgs_in,
           (unsigned long long)dups, (unsigned long long)refused, (unsigned long long)conns);
    fflush(stdout);
}

/* Validate one message; returns NULL if acceptable, else the reason. */
static const char *check_msg(const struct hdr *h, uint64_t size) {
    if (h->magic != MAGIC) return "bad magic";
    if (h->version != VERSION) return "unsupported version";
    if (h->flags || h->reserved) return "nonzero flags/reserved";
    if (h->length > MAX_PAYLOAD) return "length over 1 MiB";
    switch (h->type) {
    case DATA:
        if (h->length == 0 || h->length % BLK || h->offset % BLK) return "DATA not block aligned";
        if (h->offset > size || h->length > size - h->offset) return "DATA beyond the disk";
        return NULL;
    case ZERO:
        if (h->length != 8) return "ZERO payload must be 8 bytes";
        return NULL;
    case ROUND: return h->length == 16 ? NULL : "ROUND payload must be 16 bytes";
    case PING: case BYE: return h->length == 0 ? NULL : "PING/BYE carry no payload";
    case HELLO: return h->length == 32 ? NULL : "HELLO payload must be 32 bytes";
    default: return "unknown message type";
    }
}

/* Serve one connection: 1 = the source said BYE, -1 = the connection is finished (broken, refused,
 * malformed, or a new connection from the source is waiting on the listening socket). */
static int serve(SSL *s, int ls, uint64_t size, uint8_t *buf) {
    uint8_t hb[HDR_LEN];
    struct hdr h;
    int unsynced = 0;
    uint64_t unsynced_bytes = 0;
    for (;;) {
        if (SSL_pending(s) == 0) {
            struct pollfd p[2] = {{.fd = SSL_get_fd(s), .events = POLLIN}, {.fd = ls, .events = POLLIN}};
            int ready = poll(p, 2, 0);
            if (unsynced && (ready == 0 || unsynced >= 16 || unsynced_bytes >= (2u << 20))) {
                save_state();
                if (send_msg(s, ACK, applied, 0, NULL, 0) < 0) return -1;
                unsynced = 0;
                unsynced_bytes = 0;
            }
            if (ready == 0) ready = poll(p, 2, 8000);       /* the source pings every second */
            if (ready <= 0) { printf("LINK idle for 8 s\n"); return -1; }
            if (p[1].revents & POLLIN) { printf("LINK the source reconnected\n"); return -1; }
        }
        if (ssl_read_all(s, hb, HDR_LEN) < 0) return -1;
        get_hdr(hb, &h);
        const char *bad = check_msg(&h, size);
        if (bad) { printf("PROTOCOL %s (type %u seq %llu)\n", bad, h.type, (unsigned long long)h.seq); return -1; }
        if (h.length && ssl_read_all(s, buf, h.length) < 0) return -1;
        if (xxh64(buf, h.length, h.seq ^ h.offset) != h.check) {
            refused++;
            char why[96];
            int n = snprintf(why, sizeof why, "checksum mismatch at offset %llu", (unsigned long long)h.offset);
            printf("REFUSED seq=%llu %s\n", (unsigned long long)h.seq, why);
            send_msg(s, REFUSE, h.seq, h.offset, why, (uint32_t)n);
            return -1;
        }
        if (h.type == PING) { if (send_msg(s, ACK, applied, 0, NULL, 0) < 0) return -1; continue; }
        if (h.type == HELLO) { printf("PROTOCOL HELLO twice\n"); return -1; }
        if (h.type == BYE) {
            save_state();
            send_msg(s, ACK, applied, 0, NULL, 0);
            stat_recv("done");
            return 1;
        }
        if (h.seq <= applied) { dups++; continue; }
        if (h.seq != applied + 1) { printf("PROTOCOL seq %llu after %llu\n", (unsigned long long)h.seq, (unsigned long long)applied); return -1; }
        if (h.type == DATA) {
            if (pwrite(devfd, buf, h.length, (off_t)h.offset) != (ssize_t)h.length) die("pwrite");
            bytes_in += h.length;
        } else if (h.type == ZERO) {
            uint64_t zl;
            memcpy(&zl, buf, 8);
            if (zl == 0 || zl % BLK || h.offset % BLK || zl > MAX_ZERO || h.offset > size || zl > size - h.offset) {
                printf("PROTOCOL bad ZERO extent %llu+%llu\n", (unsigned long long)h.offset, (unsigned long long)zl);
                return -1;
            }
            uint64_t range[2] = {h.offset, zl};
            if (ioctl(devfd, BLKZEROOUT, range) < 0) {
                static uint8_t z[MAX_EXTENT];
                for (uint64_t o = 0; o < zl; o += sizeof z) {
                    size_t n = zl - o < sizeof z ? (size_t)(zl - o) : sizeof z;
                    if (pwrite(devfd, z, n, (off_t)(h.offset + o)) != (ssize_t)n) die("pwrite zero");
                }
            }
        } else if (h.type == ROUND) {
            uint64_t r[2];
            memcpy(r, buf, 16);
            applied = h.seq;
            save_state();
            printf("ROUND %llu applied\n", (unsigned long long)r[0]);
            stat_recv("round");
            if (send_msg(s, ACK, applied, 0, NULL, 0) < 0) return -1;
            continue;
        }
        applied = h.seq;
        msgs_in++;
        unsynced++;
        unsynced_bytes += h.length;
    }
}

static int do_recv(int have_session) {
    devfd = open(opt_dev, O_RDWR);
    if (devfd < 0) die(opt_dev);
    uint64_t size = dev_size(devfd);
    load_state(have_session);
    SSL_CTX *ctx = tls_ctx(1);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_port), .sin_addr.s_addr = INADDR_ANY};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 4) < 0) die("listen");
    uint8_t *buf = malloc(MAX_PAYLOAD);
    printf("LISTEN port=%d size=%llu applied=%llu\n", opt_port, (unsigned long long)size, (unsigned long long)applied);
    fflush(stdout);
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) continue;
        set_timeouts(c, 15);
        SSL *s = SSL_new(ctx);
        SSL_set_fd(s, c);
        int rc = -1;
        uint8_t hb[HDR_LEN];
        struct hdr h;
        if (SSL_accept(s) == 1 && ssl_read_all(s, hb, HDR_LEN) == 0) {
            get_hdr(hb, &h);
            const char *bad = check_msg(&h, size);
            if (!bad && h.type != HELLO) bad = "first message is not HELLO";
            if (!bad && ssl_read_all(s, buf, h.length) < 0) bad = "short HELLO";
            if (!bad && xxh64(buf, h.length, h.seq ^ h.offset) != h.check) bad = "HELLO checksum";
            uint64_t src_size = 0;
            uint32_t bs = 0;
            if (!bad) { memcpy(&src_size, buf, 8); memcpy(&bs, buf + 8, 4); }
            if (!bad && bs != BLK) bad = "block size differs";
            if (!bad && src_size != size) bad = "disk sizes differ";
            if (!bad && have_session && memcmp(buf + 16, session, 16) != 0) bad = "wrong session";
            if (bad) {
                printf("PROTOCOL handshake: %s\n", bad);
                send_msg(s, REFUSE, 0, 0, bad, (uint32_t)strlen(bad));
            } else {
                uint8_t w[32];
                memcpy(w, &size, 8); memcpy(w + 8, &applied, 8); memcpy(w + 16, session, 16);
                conns++;
                stat_recv("connected");
                if (send_msg(s, WELCOME, 0, 0, w, 32) == 0) rc = serve(s, ls, size, buf);
            }
        } else {
            ERR_print_errors_fp(stdout);
            printf("TLS handshake failed\n");
        }
        SSL_shutdown(s);
        SSL_free(s);
        close(c);
        stat_recv("disconnected");
        if (rc == 1) return 0;
    }
}

/* ---- source --------------------------------------------------------------------------------- */
struct pend { uint64_t seq, offset; uint32_t len; uint8_t type; uint64_t arg[2]; };
static struct pend ring[RING];
static uint64_t next_seq = 1, acked, resend_from, inflight_bytes;
static uint8_t *cur, *nxt;          /* dirty bitmaps: this round's work, the next round's */
static uint64_t *bh;                /* xxh64 of each block as last read */
static uint64_t nblocks, dsize, cursor, round_no, round_seq, round_bytes, round_blocks, sent_total, resent;
static double round_t0, last_ack_t, last_send_t, rate_bps, tokens, tok_t;
static int tracefd = -1, round_active, round_sent, final_mode, corrupt_seq_done;
static uint64_t opt_corrupt_seq, opt_resume, reconnects, overruns_seen;
static int resumed;                 /* --resume: the destination is not fresh */
static char devmm[32], tdir[128];

static inline void setb(uint8_t *m, uint64_t b) { m[b >> 3] |= (uint8_t)(1u << (b & 7)); }
static inline int getb(const uint8_t *m, uint64_t b) { return m[b >> 3] >> (b & 7) & 1; }
static uint64_t popcount(const uint8_t *m) {
    uint64_t n = 0;
    for (uint64_t i = 0; i < (nblocks + 7) / 8; i++) n += (uint64_t)__builtin_popcount(m[i]);
    return n;
}

static void twrite(const char *file, const char *val) {
    char p[256];
    snprintf(p, sizeof p, "%s/%s", tdir, file);
    int fd = open(p, O_WRONLY | O_TRUNC);
    if (fd < 0 || write_all(fd, val, strlen(val)) < 0) { fprintf(stdout, "ERROR tracefs %s: %s\n", p, strerror(errno)); exit(3); }
    close(fd);
}

static uint64_t trace_overruns(void) {
    uint64_t total = 0;
    for (int cpu = 0; cpu < 64; cpu++) {
        char p[256], line[128];
        snprintf(p, sizeof p, "%s/per_cpu/cpu%d/stats", tdir, cpu);
        FILE *f = fopen(p, "r");
        if (!f) break;
        while (fgets(line, sizeof line, f)) {
            unsigned long long v;
            if (sscanf(line, "overrun: %llu", &v) == 1 || sscanf(line, "dropped events: %llu", &v) == 1) total += v;
        }
        fclose(f);
    }
    return total;
}

static void trace_setup(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) die("fstat dev");
    snprintf(devmm, sizeof devmm, "%u,%u", major(st.st_rdev), minor(st.st_rdev));
    if (access("/sys/kernel/tracing/instances", F_OK) != 0) mount("nodev", "/sys/kernel/tracing", "tracefs", 0, NULL);
    snprintf(tdir, sizeof tdir, "/sys/kernel/tracing/instances/hvmig");
    rmdir(tdir);
    if (mkdir(tdir, 0700) < 0) die("tracefs instance");
    twrite("buffer_size_kb", "8192");
    char f[64];
    snprintf(f, sizeof f, "dev == %llu", (unsigned long long)(((uint64_t)major(st.st_rdev) << 20) | minor(st.st_rdev)));
    twrite("events/block/block_rq_complete/filter", f);
    twrite("events/block/block_rq_complete/enable", "1");
    twrite("tracing_on", "1");
    char p[256];
    snprintf(p, sizeof p, "%s/trace_pipe", tdir);
    tracefd = open(p, O_RDONLY | O_NONBLOCK);
    if (tracefd < 0) die("trace_pipe");
}

static void trace_remove(void) {
    if (!tdir[0]) return;
    if (tracefd >= 0) close(tracefd);
    char p[256];
    snprintf(p, sizeof p, "%s/tracing_on", tdir);
    int fd = open(p, O_WRONLY);
    if (fd >= 0) { write_all(fd, "0", 1); close(fd); }
    snprintf(p, sizeof p, "%s/events/block/block_rq_complete/enable", tdir);
    fd = open(p, O_WRONLY);
    if (fd >= 0) { write_all(fd, "0", 1); close(fd); }
    rmdir(tdir);
}

/* Parse trace lines into nxt; returns 1 when the marker "HVMIG-CUT <want>" was seen. */
static int trace_drain(uint64_t want) {
    static char buf[1 << 16];
    static size_t have;
    int seen = 0;
    for (;;) {
        ssize_t r = read(tracefd, buf + have, sizeof buf - have - 1);
        if (r <= 0) break;
        have += (size_t)r;
        buf[have] = 0;
        char *line = buf, *nl;
        while ((nl = memchr(line, '\n', (size_t)(buf + have - line)))) {
            *nl = 0;
            char *ev = strstr(line, "block_rq_complete: ");
            char *mk = strstr(line, "HVMIG-CUT ");
            if (ev) {
                char mm[32], rwbs[16];
                unsigned long long sector;
                unsigned nr;
                char *paren = strstr(ev, ") ");
                if (sscanf(ev + 19, "%31s %15s", mm, rwbs) == 2 && paren &&
                    sscanf(paren + 2, "%llu + %u", &sector, &nr) == 2 && !strcmp(mm, devmm) &&
                    !strchr(rwbs, 'R') && nr > 0) {
                    uint64_t a = sector * 512 / BLK, b = (sector * 512 + (uint64_t)nr * 512 + BLK - 1) / BLK;
                    for (uint64_t k = a; k < b && k < nblocks; k++) setb(nxt, k);
                }
            } else if (mk) {
                unsigned long long n;
                if (sscanf(mk + 10, "%llu", &n) == 1 && n == want) seen = 1;
            }
            line = nl + 1;
        }
        have = (size_t)(buf + have - line);
        memmove(buf, line, have);
        if (have >= sizeof buf - 1) have = 0;      /* an absurd line: drop it */
    }
    return seen;
}

static void trace_cut(uint64_t n) {
    char m[64];
    snprintf(m, sizeof m, "HVMIG-CUT %llu\n", (unsigned long long)n);
    char p[256];
    snprintf(p, sizeof p, "%s/trace_marker", tdir);
    int fd = open(p, O_WRONLY);
    if (fd < 0 || write_all(fd, m, strlen(m)) < 0) die("trace_marker");
    close(fd);
    double t0 = now_s();
    while (!trace_drain(n)) {
        if (now_s() - t0 > 10) { errno = 0; die("trace marker never came back"); }
        struct pollfd pf = {.fd = tracefd, .events = POLLIN};
        poll(&pf, 1, 50);
    }
}

static uint8_t *rbuf;

static int read_blocks(uint64_t off, uint32_t len) {
    return pread(devfd, rbuf, len, (off_t)off) == (ssize_t)len ? 0 : -1;
}

static int is_zero(const uint8_t *p, size_t n) {
    const uint64_t *q = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++) if (q[i]) return 0;
    return 1;
}

/* Whole-disk rescan after a trace overrun: every block whose hash changed is dirty. */
static void rescan(void) {
    uint64_t changed = 0;
    for (uint64_t off = 0; off < dsize; off += MAX_EXTENT) {
        uint32_t len = (uint32_t)(dsize - off < MAX_EXTENT ? dsize - off : MAX_EXTENT);
        if (read_blocks(off, len) < 0) die("rescan read");
        for (uint32_t i = 0; i < len / BLK; i++) {
            uint64_t b = off / BLK + i;
            if (xxh64(rbuf + i * BLK, BLK, b) != bh[b]) { setb(nxt, b); changed++; }
        }
    }
    printf("RESCAN changed_blocks=%llu\n", (unsigned long long)changed);
}

static void start_round(void) {
    round_no++;
    trace_cut(round_no);
    uint64_t ov = trace_overruns();
    if (ov != overruns_seen && (round_no > 1 || resumed)) {
        printf("OVERRUN events_lost=%llu: falling back to a hash rescan\n", (unsigned long long)(ov - overruns_seen));
        rescan();
    }
    overruns_seen = ov;
    if (round_no == 1 && !resumed) memset(cur, 0xff, (nblocks + 7) / 8);
    else for (uint64_t i = 0; i < (nblocks + 7) / 8; i++) cur[i] |= nxt[i];
    memset(nxt, 0, (nblocks + 7) / 8);
    cursor = 0; round_active = 1; round_sent = 0; round_bytes = 0; round_blocks = 0;
    round_t0 = now_s();
    printf("ROUND %llu start pending_bytes=%llu\n", (unsigned long long)round_no, (unsigned long long)(popcount(cur) * BLK));
    fflush(stdout);
}

static SSL_CTX *sctx;
static SSL *ssl;
static int sock = -1;

static void disconnect(const char *why) {
    if (ssl) { SSL_free(ssl); ssl = NULL; }
    if (sock >= 0) { close(sock); sock = -1; }
    inflight_bytes = 0;
    printf("LINK down reason=\"%s\" acked=%llu next=%llu\n", why, (unsigned long long)acked, (unsigned long long)next_seq);
    fflush(stdout);
}

static int try_connect(void) {
    char host[64];
    int port;
    const char *colon = strrchr(opt_connect, ':');
    if (!colon || (size_t)(colon - opt_connect) >= sizeof host) { errno = 0; die("--connect IP:PORT"); }
    memcpy(host, opt_connect, (size_t)(colon - opt_connect));
    host[colon - opt_connect] = 0;
    port = atoi(colon + 1);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) { errno = 0; die("--connect: not an IPv4 address"); }
    sock = socket(AF_INET, SOCK_STREAM, 0);
    set_timeouts(sock, 5);
    if (connect(sock, (struct sockaddr *)&a, sizeof a) < 0) { close(sock); sock = -1; return -1; }
    ssl = SSL_new(sctx);
    SSL_set_fd(ssl, sock);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host);
    if (SSL_connect(ssl) != 1) { ERR_print_errors_fp(stdout); disconnect("TLS handshake"); return -1; }
    uint8_t p[32] = {0};
    uint32_t bs = BLK;
    memcpy(p, &dsize, 8); memcpy(p + 8, &bs, 4); memcpy(p + 16, session, 16);
    uint8_t hb[HDR_LEN], w[200];
    struct hdr h;
    if (send_msg(ssl, HELLO, 0, 0, p, 32) < 0 || ssl_read_all(ssl, hb, HDR_LEN) < 0) { disconnect("handshake"); return -1; }
    get_hdr(hb, &h);
    if (h.magic != MAGIC || h.length > sizeof w || ssl_read_all(ssl, w, h.length) < 0 ||
        xxh64(w, h.length, h.seq ^ h.offset) != h.check) { disconnect("bad WELCOME"); return -1; }
    if (h.type == REFUSE) {
        printf("ERROR destination refused the handshake: %.*s\n", (int)h.length, w);
        fflush(stdout);
        exit(4);
    }
    uint64_t dst_size, dst_applied;
    if (h.type != WELCOME || h.length != 32) { disconnect("bad WELCOME"); return -1; }
    memcpy(&dst_size, w, 8); memcpy(&dst_applied, w + 8, 8);
    if (dst_size != dsize) { printf("ERROR destination disk is %llu bytes, ours %llu\n", (unsigned long long)dst_size, (unsigned long long)dsize); exit(4); }
    if (dst_applied < acked || dst_applied >= next_seq) {
        printf("ERROR destination applied seq %llu outside what we sent (acked %llu, next %llu)\n",
               (unsigned long long)dst_applied, (unsigned long long)acked, (unsigned long long)next_seq);
        fflush(stdout);
        exit(5);
    }
    acked = dst_applied;
    resend_from = acked + 1;
    last_ack_t = now_s();
    if (reconnects++ > 0) printf("RESUME from_seq=%llu unacked=%llu\n", (unsigned long long)resend_from,
                                 (unsigned long long)(next_seq - resend_from));
    printf("LINK up acked=%llu\n", (unsigned long long)acked);
    fflush(stdout);
    return 0;
}

static int transmit(const struct pend *m, int again) {
    static uint8_t payload[MAX_PAYLOAD];
    const uint8_t *pl = NULL;
    uint32_t len = 0;
    if (m->type == DATA) {
        if (again) { if (read_blocks(m->offset, m->len) < 0) die("reread"); }
        len = m->len;
        pl = rbuf;
        if (opt_corrupt_seq && m->seq == opt_corrupt_seq && !corrupt_seq_done) {
            /* fault injection: the checksum is of the right bytes, one byte on the wire is not */
            static uint8_t hb[HDR_LEN];
            struct hdr h = {MAGIC, DATA, VERSION, 0, len, 0, m->seq, m->offset, xxh64(rbuf, len, m->seq ^ m->offset)};
            put_hdr(hb, &h);
            memcpy(payload, rbuf, len);
            payload[len / 2] ^= 0x5a;
            corrupt_seq_done = 1;
            printf("CORRUPTED seq=%llu (fault injection)\n", (unsigned long long)m->seq);
            return ssl_write_all(ssl, hb, HDR_LEN) < 0 || ssl_write_all(ssl, payload, len) < 0 ? -1 : 0;
        }
    } else if (m->type == ZERO) {
        memcpy(payload, &m->arg[0], 8); pl = payload; len = 8;
    } else if (m->type == ROUND) {
        memcpy(payload, m->arg, 16); pl = payload; len = 16;
    }
    if (send_msg(ssl, m->type, m->seq, m->offset, pl, len) < 0) return -1;
    last_send_t = now_s();
    inflight_bytes += len + HDR_LEN;
    return 0;
}

/* The throttle is a token bucket charged with the bytes actually sent (header + payload), after
 * the message is built: a message is sent only when the bucket is not in debt, then its real size
 * is taken (the bucket may go into debt by one message). Charging the extent's size before
 * reading it (as before) counted trimmed zero blocks and ZERO extents that never crossed the
 * link, so the payload ran ~10 % under the set rate. */
static int throttle_ready(void) {
    if (rate_bps <= 0) return 1;
    double t = now_s();
    tokens += (t - tok_t) * rate_bps;
    tok_t = t;
    double cap = rate_bps * 0.1 > MAX_EXTENT + HDR_LEN ? rate_bps * 0.1 : MAX_EXTENT + HDR_LEN;
    if (tokens > cap) tokens = cap;
    return tokens >= 0;
}

static void throttle_charge(uint64_t bytes) {
    if (rate_bps > 0) tokens -= (double)bytes;
}

/* Build the next message of the round from the cursor; returns 0 if one was queued and sent. */
static int next_message(void) {
    while (cursor < nblocks && !getb(cur, cursor)) cursor++;
    if (cursor >= nblocks) return 1;
    uint64_t start = cursor, end = cursor;
    while (end < nblocks && getb(cur, end) && (end - start) * BLK < MAX_EXTENT) end++;
    uint32_t len = (uint32_t)((end - start) * BLK);
    if (!throttle_ready()) return 2;
    if (read_blocks(start * BLK, len) < 0) die("read");
    /* within the extent: hash each block; in round 1 skip leading/trailing zero runs */
    uint64_t s = start, e = end;
    for (uint64_t b = start; b < end; b++) bh[b] = xxh64(rbuf + (b - start) * BLK, BLK, b);
    for (uint64_t b = start; b < end; b++) cur[b >> 3] &= (uint8_t)~(1u << (b & 7));
    cursor = end;
    int zero = is_zero(rbuf, len);
    if (round_no == 1 && !resumed) {
        while (s < e && is_zero(rbuf + (s - start) * BLK, BLK)) s++;
        while (e > s && is_zero(rbuf + (e - 1 - start) * BLK, BLK)) e--;
        if (s == e) return 0;   /* all zero: the destination is fresh; nothing sent, nothing charged */
        if (s != start) memmove(rbuf, rbuf + (s - start) * BLK, (e - s) * BLK);
        len = (uint32_t)((e - s) * BLK);
    }
    struct pend *m = &ring[next_seq % RING];
    memset(m, 0, sizeof *m);
    m->seq = next_seq++;
    m->offset = s * BLK;
    if (zero && (round_no > 1 || resumed)) { m->type = ZERO; m->arg[0] = len; m->len = 0; }
    else { m->type = DATA; m->len = len; }
    round_bytes += m->len; round_blocks += e - s; sent_total += m->len;
    throttle_charge(HDR_LEN + (m->type == ZERO ? 8 : m->len));
    if (ssl && resend_from == m->seq) {
        if (transmit(m, 0) < 0) { disconnect("send failed"); return 0; }
        resend_from = next_seq;
    }
    return 0;
}

static void stat_send(void) {
    printf("STAT round=%llu active=%d sent=%llu acked_seq=%llu next_seq=%llu pending=%llu dirty=%llu rate=%.0f link=%s "
           "reconnects=%llu resent=%llu\n", (unsigned long long)round_no, round_active, (unsigned long long)sent_total,
           (unsigned long long)acked, (unsigned long long)next_seq, (unsigned long long)(popcount(cur) * BLK),
           (unsigned long long)(popcount(nxt) * BLK), rate_bps, ssl ? "up" : "down",
           (unsigned long long)(reconnects ? reconnects - 1 : 0), (unsigned long long)resent);
    fflush(stdout);
}

/* "dirty FILE": the ranges of FILE are marked for the next round; every line is validated. */
static void load_dirty(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { printf("DIRTY error=\"%s\"\n", strerror(errno)); return; }
    unsigned long long off, len;
    uint64_t marked = 0, bad = 0;
    char line[128];
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%llu %llu", &off, &len) != 2 || off % BLK || len % BLK || len == 0 || off >= dsize ||
            len > dsize - off) { bad++; continue; }
        for (uint64_t b = off / BLK; b < (off + len) / BLK; b++)
            if (!getb(nxt, b) && !getb(cur, b)) { setb(nxt, b); marked++; }
    }
    fclose(f);
    printf("DIRTY marked_bytes=%llu bad=%llu\n", (unsigned long long)(marked * BLK), (unsigned long long)bad);
}

static void ctl_line(char *l) {
    if (!strncmp(l, "round", 5)) { if (!round_active) start_round(); }
    else if (!strncmp(l, "final", 5)) {
        final_mode = 1;
        if (!round_active) start_round();
        else {   /* fold everything written until now into the running round */
            round_no++;
            trace_cut(round_no);
            for (uint64_t i = 0; i < (nblocks + 7) / 8; i++) cur[i] |= nxt[i];
            memset(nxt, 0, (nblocks + 7) / 8);
            cursor = 0;
            round_sent = 0;
            round_t0 = now_s();
        }
    } else if (!strncmp(l, "rate ", 5)) { rate_bps = atof(l + 5); if (tokens > 0) tokens = 0; tok_t = now_s(); printf("RATE %.0f\n", rate_bps); }
    else if (!strncmp(l, "stat", 4)) stat_send();
    else if (!strncmp(l, "dirty ", 6)) load_dirty(l + 6);
    else if (!strncmp(l, "quit", 4)) { trace_remove(); printf("QUIT\n"); fflush(stdout); exit(0); }
    else printf("CTL unknown command\n");
    fflush(stdout);
}

static int do_send(void) {
    devfd = open(opt_dev, O_RDONLY | O_DIRECT);
    if (devfd < 0) die(opt_dev);
    dsize = dev_size(devfd);
    if (dsize % BLK) { errno = 0; die("disk size is not a multiple of 4096"); }
    nblocks = dsize / BLK;
    cur = calloc((nblocks + 7) / 8, 1); nxt = calloc((nblocks + 7) / 8, 1); bh = calloc(nblocks, 8);
    if (posix_memalign((void **)&rbuf, 4096, MAX_PAYLOAD) || !cur || !nxt || !bh) die("memory");
    int ctl = open(opt_ctl, O_RDWR | O_NONBLOCK);
    if (ctl < 0) die(opt_ctl);
    trace_setup(devfd);
    overruns_seen = trace_overruns();
    if (opt_resume > 1000000) { errno = 0; die("--resume: at most 1000000 rounds"); }
    round_no = opt_resume;          /* resumed: the next round copies only what is marked dirty */
    sctx = tls_ctx(0);
    signal(SIGPIPE, SIG_IGN);
    printf("READY size=%llu blocks=%llu dev=%s resumed=%llu\n", (unsigned long long)dsize, (unsigned long long)nblocks,
           devmm, (unsigned long long)opt_resume);
    fflush(stdout);
    char cbuf[512];
    size_t clen = 0;
    double last_stat = 0, last_try = -10;
    tok_t = now_s();
    for (;;) {
        ssize_t r = read(ctl, cbuf + clen, sizeof cbuf - clen - 1);
        if (r > 0) {
            clen += (size_t)r;
            cbuf[clen] = 0;
            char *nl;
            while ((nl = memchr(cbuf, '\n', clen))) {
                *nl = 0;
                ctl_line(cbuf);
                clen -= (size_t)(nl + 1 - cbuf);
                memmove(cbuf, nl + 1, clen);
            }
            if (clen >= sizeof cbuf - 1) clen = 0;
        }
        trace_drain(0);
        double t = now_s();
        if (!ssl && t - last_try > 0.5) { last_try = t; try_connect(); }
        int busy = 0;
        if (ssl) {
            /* acknowledgements */
            struct pollfd pf = {.fd = sock, .events = POLLIN};
            while (SSL_pending(ssl) > 0 || poll(&pf, 1, 0) > 0) {
                uint8_t hb[HDR_LEN], w[256];
                struct hdr h;
                if (ssl_read_all(ssl, hb, HDR_LEN) < 0) { disconnect("read failed"); break; }
                get_hdr(hb, &h);
                if (h.magic != MAGIC || h.length > sizeof w || (h.length && ssl_read_all(ssl, w, h.length) < 0) ||
                    xxh64(w, h.length, h.seq ^ h.offset) != h.check) { disconnect("bad reply"); break; }
                if (h.type == ACK) {
                    if (h.seq > acked && h.seq < next_seq) {
                        for (uint64_t q = acked + 1; q <= h.seq; q++) {
                            struct pend *m = &ring[q % RING];
                            uint32_t l = m->len + HDR_LEN + (m->type == ZERO ? 8 : m->type == ROUND ? 16 : 0);
                            inflight_bytes = inflight_bytes > l ? inflight_bytes - l : 0;
                        }
                        acked = h.seq;
                        last_ack_t = now_s();
                    }
                } else if (h.type == REFUSE) {
                    printf("REFUSED seq=%llu reason=\"%.*s\"\n", (unsigned long long)h.seq, (int)h.length, w);
                    disconnect("destination refused a message");
                    break;
                } else { disconnect("unexpected message"); break; }
            }
        }
        if (ssl) {
            /* resend what the destination has not applied (after a reconnect) */
            while (ssl && resend_from < next_seq && inflight_bytes < WINDOW_BYTES) {
                struct pend *m = &ring[resend_from % RING];
                if (transmit(m, 1) < 0) { disconnect("resend failed"); break; }
                resent++;
                resend_from++;
                busy = 1;
            }
            while (ssl && round_active && !round_sent && resend_from == next_seq && inflight_bytes < WINDOW_BYTES &&
                   next_seq - acked < RING - 2) {
                int rc = next_message();
                if (rc == 2) break;          /* throttled */
                if (rc == 1) {               /* the round's last message */
                    struct pend *m = &ring[next_seq % RING];
                    memset(m, 0, sizeof *m);
                    m->seq = next_seq++; m->type = ROUND; m->arg[0] = round_no; m->arg[1] = (uint64_t)final_mode;
                    round_seq = m->seq;
                    round_sent = 1;
                    if (transmit(m, 0) < 0) { disconnect("send failed"); break; }
                    resend_from = next_seq;
                    break;
                }
                busy = 1;
            }
            if (ssl && round_active && round_sent && acked >= round_seq) {
                double secs = now_s() - round_t0;
                printf("ROUND %llu done bytes=%llu blocks=%llu secs=%.3f dirty=%llu final=%d\n", (unsigned long long)round_no,
                       (unsigned long long)round_bytes, (unsigned long long)round_blocks, secs,
                       (unsigned long long)(popcount(nxt) * BLK), final_mode);
                fflush(stdout);
                round_active = 0;
                if (final_mode) {
                    send_msg(ssl, BYE, 0, 0, NULL, 0);
                    uint8_t hb[HDR_LEN];
                    ssl_read_all(ssl, hb, HDR_LEN);
                    trace_remove();
                    printf("FINAL rounds=%llu sent=%llu resent=%llu reconnects=%llu\n", (unsigned long long)round_no,
                           (unsigned long long)sent_total, (unsigned long long)resent,
                           (unsigned long long)(reconnects ? reconnects - 1 : 0));
                    fflush(stdout);
                    return 0;
                }
            }
            if (ssl && now_s() - last_send_t > 1.0) {
                if (send_msg(ssl, PING, 0, 0, NULL, 0) < 0) disconnect("keepalive failed");
                last_send_t = now_s();
            }
            if (ssl && acked + 1 < next_seq && now_s() - last_ack_t > 6.0) disconnect("no acknowledgement for 6 s");
        }
        if (t - last_stat > 0.5) { stat_send(); last_stat = t; }
        if (!busy) {
            struct pollfd pf[3] = {{.fd = ctl, .events = POLLIN}, {.fd = tracefd, .events = POLLIN},
                                   {.fd = ssl ? sock : -1, .events = POLLIN}};
            poll(pf, 3, 20);
        }
    }
}

/* ---- hash ------------------------------------------------------------------------------------ */
static int do_hash(uint64_t chunk, int list) {
    int fd = open(opt_dev, O_RDONLY | O_DIRECT);
    if (fd < 0) die(opt_dev);
    uint64_t size = dev_size(fd);
    uint8_t *b;
    if (chunk == 0 || chunk % BLK || chunk > MAX_PAYLOAD || posix_memalign((void **)&b, 4096, chunk)) { errno = 0; die("--chunk"); }
    uint64_t n = 0, acc = 0;
    double t0 = now_s();
    for (uint64_t off = 0; off < size; off += chunk, n++) {
        size_t len = size - off < chunk ? (size_t)(size - off) : (size_t)chunk;
        if (pread(fd, b, len, (off_t)off) != (ssize_t)len) die("pread");
        uint64_t h = xxh64(b, len, off);
        if (list) printf("C %llu %016llx\n", (unsigned long long)off, (unsigned long long)h);
        acc = xxh64(&h, 8, acc);   /* chained: the digest depends on every chunk and its order */
    }
    printf("HASH size=%llu chunks=%llu digest=%016llx secs=%.3f\n", (unsigned long long)size, (unsigned long long)n,
           (unsigned long long)acc, now_s() - t0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: hvsim-migrate send|recv|hash ...\n"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argv[1];
    int have_session = 0, list = 0;
    uint64_t chunk = 65536;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--list")) { list = 1; continue; }
        if (!v) { fprintf(stderr, "hvsim-migrate: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--dev")) opt_dev = v;
        else if (!strcmp(a, "--cert")) opt_cert = v;
        else if (!strcmp(a, "--key")) opt_key = v;
        else if (!strcmp(a, "--ca")) opt_ca = v;
        else if (!strcmp(a, "--ctl")) opt_ctl = v;
        else if (!strcmp(a, "--state")) opt_state = v;
        else if (!strcmp(a, "--connect")) opt_connect = v;
        else if (!strcmp(a, "--listen")) opt_port = atoi(v);
        else if (!strcmp(a, "--rate")) rate_bps = atof(v);
        else if (!strcmp(a, "--chunk")) chunk = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--corrupt-seq")) opt_corrupt_seq = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--resume")) { opt_resume = strtoull(v, NULL, 10); resumed = 1; }
        else if (!strcmp(a, "--session")) { if (hexsession(v) < 0) { fprintf(stderr, "hvsim-migrate: --session: 32 hex digits\n"); return 2; } have_session = 1; }
        else { fprintf(stderr, "hvsim-migrate: unknown option %s\n", a); return 2; }
    }
    if (!opt_dev) { fprintf(stderr, "hvsim-migrate: --dev is required\n"); return 2; }
    if (!strcmp(mode, "hash")) return do_hash(chunk, list);
    if (!opt_cert || !opt_key || !opt_ca) { fprintf(stderr, "hvsim-migrate: --cert, --key and --ca are required\n"); return 2; }
    if (!strcmp(mode, "recv")) {
        if (!opt_state || opt_port <= 0 || opt_port > 65535) { fprintf(stderr, "hvsim-migrate recv: --state and --listen PORT\n"); return 2; }
        return do_recv(have_session);
    }
    if (!strcmp(mode, "send")) {
        if (!opt_connect || !opt_ctl || rate_bps < 0) { fprintf(stderr, "hvsim-migrate send: --connect IP:PORT and --ctl FIFO\n"); return 2; }
        return do_send();
    }
    fprintf(stderr, "hvsim-migrate: unknown mode %s\n", mode);
    return 2;
}

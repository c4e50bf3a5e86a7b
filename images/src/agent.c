/* hvsim guest agent: runs host commands over the virtio-serial port "org.hvsim.agent".
 *
 * Protocol version 2 (header lines end in '\n'; payloads are raw bytes of the given length; the
 * host side is hvsim/core/agent.py, which validates every field: this guest is not trusted):
 *   guest -> host  HELLO 2                                   (on start)
 *   host -> guest  PING <id>                       guest -> host  PONG <id> <uptime_ns>
 *   host -> guest  EXEC <id> <timeout_ms> <len>\n<command bytes, run by /bin/sh -c>
 *        buffered: stdout and stderr are each kept up to MAX_OUT (8 MiB) bytes; the rest is read
 *        and counted but dropped, and DONE says so (flags, totals).
 *   host -> guest  STREAM <id> <timeout_ms> <window> <len>\n<command bytes>
 *        streamed: output goes out as it comes, in DATA chunks of at most MAX_CHUNK bytes, never more
 *        than the host granted: <window> bytes at the start, plus what each ACK grants. A command
 *        whose host stops granting blocks on its pipe (the other commands go on).
 *   guest -> host  DATA <id> <fd> <len>\n<bytes>             (STREAM only; fd 1 = stdout, 2 = stderr)
 *   host -> guest  ACK <id> <bytes>                          (STREAM only: grants <bytes> more)
 *   guest -> host  DONE <id> <exit_code> <signal> <timed_out> <outlen> <errlen> <flags> <outtotal> <errtotal>\n
 *                  <stdout: outlen bytes><stderr: errlen bytes>
 *        flags: bit 0 stdout truncated, bit 1 stderr truncated (EXEC); totals: bytes the command
 *        wrote to each stream (EXEC) or sent in DATA (STREAM, where outlen = errlen = 0).
 *   host -> guest  KILL <id>          kills the command's process group; a STREAM's unsent output
 *                                     is then discarded (its DONE still comes).
 * Many commands may run at once; DONE replies arrive in completion order, after a STREAM's DATA.
 */
#include "common.h"
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#define MAX_JOBS 64
#define MAX_OUT (8u << 20)       /* buffered output kept per stream (EXEC) */
#define MAX_CMD (1u << 20)       /* longest command */
#define MAX_CHUNK 65536u         /* longest DATA payload */
#define MAX_WINDOW (64ull << 20) /* most a host may have outstanding for one STREAM */

struct buf { char *p; size_t len, cap; };
struct job {
    int used;
    unsigned long id;
    pid_t pid;
    int fd[2];
    struct buf out[2];
    unsigned long long total[2];
    int truncated[2];
    int exited, status, timed_out;
    int stream, discard;
    unsigned long long credit;   /* STREAM: bytes we may still send */
    uint64_t deadline;
};
static struct job jobs[MAX_JOBS];
static int port = -1;

static void buf_add(struct buf *b, int *truncated, const char *p, size_t n) {
    size_t room = MAX_OUT - b->len;
    if (n > room) { *truncated = 1; n = room; }
    if (n == 0) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) { *truncated = 1; return; }
        b->p = q; b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void send_all(const void *p, size_t n) {
    /* The port is nonblocking for reads; block for writes so replies are never torn. */
    int fl = fcntl(port, F_GETFL);
    fcntl(port, F_SETFL, fl & ~O_NONBLOCK);
    if (write_all(port, p, n) < 0) fprintf(stderr, "hvsim-agent: write: %s\n", strerror(errno));
    fcntl(port, F_SETFL, fl);
}

static void sendf(const char *fmt, unsigned long a, unsigned long long b) {
    char line[128];
    int n = snprintf(line, sizeof line, fmt, a, b);
    send_all(line, (size_t)n);
}

/* A command that could not start: exit code 125 and a message on its stderr. */
static void refuse(unsigned long id, const char *msg) {
    char hdr[160];
    size_t len = strlen(msg);
    int n = snprintf(hdr, sizeof hdr, "DONE %lu 125 0 0 0 %zu 0 0 %zu\n", id, len, len);
    send_all(hdr, (size_t)n);
    send_all(msg, len);
}

static void start_job(unsigned long id, unsigned long timeout_ms, int stream, unsigned long long window,
                      const char *cmd) {
    int slot = -1;
    for (int i = 0; i < MAX_JOBS; i++) if (!jobs[i].used) { slot = i; break; }
    if (slot < 0) { refuse(id, "hvsim-agent: too many concurrent commands\n"); return; }
    int po[2], pe[2];
    if (pipe(po) < 0) { refuse(id, "hvsim-agent: pipe failed\n"); return; }
    if (pipe(pe) < 0) { close(po[0]); close(po[1]); refuse(id, "hvsim-agent: pipe failed\n"); return; }
    pid_t pid = fork();
    if (pid < 0) {
        close(po[0]); close(po[1]); close(pe[0]); close(pe[1]);
        refuse(id, "hvsim-agent: fork failed\n");
        return;
    }
    if (pid == 0) {
        setsid();
        int dn = open("/dev/null", O_RDONLY);
        dup2(dn, 0); dup2(po[1], 1); dup2(pe[1], 2);
        close(po[0]); close(pe[0]); close(po[1]); close(pe[1]); close(port);
        signal(SIGPIPE, SIG_DFL);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    close(po[1]); close(pe[1]);
    struct job *j = &jobs[slot];
    memset(j, 0, sizeof *j);
    j->used = 1; j->id = id; j->pid = pid;
    j->fd[0] = po[0]; j->fd[1] = pe[0];
    j->stream = stream;
    j->credit = window > MAX_WINDOW ? MAX_WINDOW : window;
    fcntl(po[0], F_SETFL, O_NONBLOCK);
    fcntl(pe[0], F_SETFL, O_NONBLOCK);
    j->deadline = timeout_ms ? mono_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
}

/* May we read job j's pipes now? A STREAM only with window left (or once its output is discarded). */
static int may_read(const struct job *j) {
    return !j->stream || j->discard || j->credit > 0;
}

/* Read what pipe k of job j has. Returns 1 when it is drained (EOF or nothing more right now),
 * 0 when a STREAM ran out of window first. */
static int drain(struct job *j, int k) {
    static char tmp[MAX_CHUNK];
    while (j->fd[k] >= 0) {
        if (!may_read(j)) return 0;
        size_t want = sizeof tmp;
        if (j->stream && !j->discard && j->credit < want) want = (size_t)j->credit;
        ssize_t r = read(j->fd[k], tmp, want);
        if (r > 0) {
            size_t n = (size_t)r;
            j->total[k] += n;
            if (!j->stream) {
                buf_add(&j->out[k], &j->truncated[k], tmp, n);
            } else if (!j->discard) {
                char hdr[96];
                int h = snprintf(hdr, sizeof hdr, "DATA %lu %d %zu\n", j->id, k + 1, n);
                send_all(hdr, (size_t)h);
                send_all(tmp, n);
                j->credit -= n;
            }
            continue;
        }
        if (r == 0) { close(j->fd[k]); j->fd[k] = -1; break; }
        if (errno == EINTR) continue;
        break; /* EAGAIN: nothing more right now */
    }
    return 1;
}

static void finish(struct job *j) {
    for (int k = 0; k < 2; k++) if (j->fd[k] >= 0) { close(j->fd[k]); j->fd[k] = -1; }
    int code = WIFEXITED(j->status) ? WEXITSTATUS(j->status) : 128 + WTERMSIG(j->status);
    int sig = WIFSIGNALED(j->status) ? WTERMSIG(j->status) : 0;
    int flags = (j->truncated[0] ? 1 : 0) | (j->truncated[1] ? 2 : 0);
    char hdr[256];
    int n = snprintf(hdr, sizeof hdr, "DONE %lu %d %d %d %zu %zu %d %llu %llu\n", j->id, code, sig, j->timed_out,
                     j->out[0].len, j->out[1].len, flags, j->total[0], j->total[1]);
    send_all(hdr, (size_t)n);
    if (j->out[0].len) send_all(j->out[0].p, j->out[0].len);
    if (j->out[1].len) send_all(j->out[1].p, j->out[1].len);
    free(j->out[0].p); free(j->out[1].p);
    j->used = 0;
}

static struct job *find_job(unsigned long id) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && jobs[i].id == id) return &jobs[i];
    return NULL;
}

static void kill_job(unsigned long id) {
    struct job *j = find_job(id);
    if (!j) return;
    if (!j->exited) kill(-j->pid, SIGKILL);
    j->discard = 1; /* nobody reads a killed STREAM's output any more */
}

static void ack_job(unsigned long id, unsigned long long n) {
    struct job *j = find_job(id);
    if (!j || !j->stream) return;
    j->credit = (j->credit + n > MAX_WINDOW) ? MAX_WINDOW : j->credit + n;
}

/* Input state: either reading a header line or an EXEC/STREAM payload. */
static char inbuf[MAX_CMD + 256];
static size_t inlen;

static void process_input(void) {
    for (;;) {
        char *nl = memchr(inbuf, '\n', inlen);
        if (!nl) {
            if (inlen >= sizeof inbuf - 1) inlen = 0; /* garbage without newline: resync */
            return;
        }
        size_t hlen = (size_t)(nl - inbuf) + 1;
        *nl = 0;
        unsigned long id = 0, tmo = 0, len = 0;
        unsigned long long win = 0;
        int stream = 0;
        int is_exec = sscanf(inbuf, "EXEC %lu %lu %lu", &id, &tmo, &len) == 3;
        if (!is_exec && sscanf(inbuf, "STREAM %lu %lu %llu %lu", &id, &tmo, &win, &len) == 4) is_exec = stream = 1;
        if (is_exec) {
            if (len > MAX_CMD) { inlen = 0; return; }
            if (inlen < hlen + len) { *nl = '\n'; return; } /* wait for the payload */
            char *cmd = malloc(len + 1);
            if (cmd) {
                memcpy(cmd, inbuf + hlen, len);
                cmd[len] = 0;
                start_job(id, tmo, stream, win, cmd);
                free(cmd);
            } else {
                refuse(id, "hvsim-agent: out of memory\n");
            }
            hlen += len;
        } else if (sscanf(inbuf, "PING %lu", &id) == 1) {
            sendf("PONG %lu %llu\n", id, (unsigned long long)mono_ns());
        } else if (sscanf(inbuf, "KILL %lu", &id) == 1) {
            kill_job(id);
        } else if (sscanf(inbuf, "ACK %lu %llu", &id, &win) == 2) {
            ack_job(id, win);
        }
        memmove(inbuf, inbuf + hlen, inlen - hlen);
        inlen -= hlen;
    }
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    for (int tries = 0; port < 0; tries++) {
        port = open_vport("org.hvsim.agent", O_RDWR | O_NONBLOCK);
        if (port < 0) {
            if (tries % 50 == 0) fprintf(stderr, "hvsim-agent: waiting for port org.hvsim.agent\n");
            usleep(100000);
        }
    }
    send_all("HELLO 2\n", 8);
    for (;;) {
        struct pollfd pfd[1 + 2 * MAX_JOBS];
        struct job *owner[1 + 2 * MAX_JOBS];
        int which[1 + 2 * MAX_JOBS];
        int n = 0;
        pfd[n].fd = port; pfd[n].events = POLLIN; owner[n] = NULL; n++;
        uint64_t now = mono_ns();
        int wait_ms = 50;
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used || !may_read(j)) continue;
            for (int k = 0; k < 2; k++) if (j->fd[k] >= 0) {
                pfd[n].fd = j->fd[k]; pfd[n].events = POLLIN; owner[n] = j; which[n] = k; n++;
            }
        }
        int r = poll(pfd, (nfds_t)n, wait_ms);
        if (r > 0) {
            if (pfd[0].revents & POLLIN) {
                ssize_t got = read(port, inbuf + inlen, sizeof inbuf - 1 - inlen);
                if (got > 0) { inlen += (size_t)got; process_input(); }
                else if (got == 0) usleep(20000);      /* host not connected */
            } else if (pfd[0].revents & (POLLHUP | POLLERR)) {
                usleep(20000);
            }
            for (int i = 1; i < n; i++)
                if (pfd[i].revents && owner[i]->used) drain(owner[i], which[i]);
        }
        now = mono_ns();
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used) continue;
            if (!j->exited && j->deadline && now > j->deadline) {
                j->timed_out = 1;
                kill(-j->pid, SIGKILL);
                j->deadline = 0;
                j->discard = 1; /* a STREAM whose host stopped granting must still finish */
            }
            if (!j->exited) {
                pid_t w = waitpid(j->pid, &j->status, WNOHANG);
                if (w == j->pid) j->exited = 1;
            }
            /* done once it exited and what it wrote before is out (a STREAM may wait for window) */
            if (j->exited) {
                int d0 = drain(j, 0), d1 = drain(j, 1);
                if (d0 && d1) finish(j);
            }
        }
    }
}

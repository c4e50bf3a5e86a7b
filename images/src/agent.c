/* hvsim guest agent: runs host commands over the virtio-serial port "org.hvsim.agent".
 *
 * Protocol (header lines end in '\n'; payloads are raw bytes of the given length):
 *   host -> guest  PING <id>                       guest -> host  PONG <id> <uptime_ns>
 *   host -> guest  EXEC <id> <timeout_ms> <len>\n<command bytes, run by /bin/sh -c>
 *   guest -> host  DONE <id> <exit_code> <signal> <timed_out> <outlen> <errlen>\n<stdout><stderr>
 *   host -> guest  KILL <id>                       (kills the command's process group)
 *   guest -> host  HELLO 1                         (on start)
 * Many commands may run at once; DONE replies arrive in completion order.
 */
#include "common.h"
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#define MAX_JOBS 64
#define MAX_OUT (8u << 20)
#define MAX_CMD (1u << 20)

struct buf { char *p; size_t len, cap; };
struct job {
    int used;
    unsigned long id;
    pid_t pid;
    int fd[2];
    struct buf out[2];
    int exited, status, timed_out;
    uint64_t deadline;
};
static struct job jobs[MAX_JOBS];
static int port = -1;

static void buf_add(struct buf *b, const char *p, size_t n) {
    if (b->len + n > MAX_OUT) n = MAX_OUT - b->len;
    if (n == 0) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) return;
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

static void start_job(unsigned long id, unsigned long timeout_ms, const char *cmd) {
    int slot = -1;
    for (int i = 0; i < MAX_JOBS; i++) if (!jobs[i].used) { slot = i; break; }
    if (slot < 0) {
        const char *msg = "hvsim-agent: too many concurrent commands\n";
        char hdr[128];
        int n = snprintf(hdr, sizeof hdr, "DONE %lu 125 0 0 0 %zu\n", id, strlen(msg));
        send_all(hdr, (size_t)n);
        send_all(msg, strlen(msg));
        return;
    }
    int po[2], pe[2];
    if (pipe(po) < 0 || pipe(pe) < 0) return;
    pid_t pid = fork();
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
    fcntl(po[0], F_SETFL, O_NONBLOCK);
    fcntl(pe[0], F_SETFL, O_NONBLOCK);
    j->deadline = timeout_ms ? mono_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
}

static void drain(struct job *j, int k) {
    char tmp[65536];
    while (j->fd[k] >= 0) {
        ssize_t r = read(j->fd[k], tmp, sizeof tmp);
        if (r > 0) { buf_add(&j->out[k], tmp, (size_t)r); continue; }
        if (r == 0) { close(j->fd[k]); j->fd[k] = -1; }
        break;
    }
}

static void finish(struct job *j) {
    drain(j, 0); drain(j, 1);
    for (int k = 0; k < 2; k++) if (j->fd[k] >= 0) { close(j->fd[k]); j->fd[k] = -1; }
    int code = WIFEXITED(j->status) ? WEXITSTATUS(j->status) : 128 + WTERMSIG(j->status);
    int sig = WIFSIGNALED(j->status) ? WTERMSIG(j->status) : 0;
    char hdr[160];
    int n = snprintf(hdr, sizeof hdr, "DONE %lu %d %d %d %zu %zu\n", j->id, code, sig, j->timed_out,
                     j->out[0].len, j->out[1].len);
    send_all(hdr, (size_t)n);
    send_all(j->out[0].p, j->out[0].len);
    send_all(j->out[1].p, j->out[1].len);
    free(j->out[0].p); free(j->out[1].p);
    j->used = 0;
}

static void kill_job(unsigned long id) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && jobs[i].id == id && !jobs[i].exited) kill(-jobs[i].pid, SIGKILL);
}

/* Input state: either reading a header line or an EXEC payload. */
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
        if (sscanf(inbuf, "EXEC %lu %lu %lu", &id, &tmo, &len) == 3) {
            if (len > MAX_CMD) { inlen = 0; return; }
            if (inlen < hlen + len) { *nl = '\n'; return; } /* wait for the payload */
            char *cmd = malloc(len + 1);
            memcpy(cmd, inbuf + hlen, len);
            cmd[len] = 0;
            start_job(id, tmo, cmd);
            free(cmd);
            hlen += len;
        } else if (sscanf(inbuf, "PING %lu", &id) == 1) {
            sendf("PONG %lu %llu\n", id, (unsigned long long)mono_ns());
        } else if (sscanf(inbuf, "KILL %lu", &id) == 1) {
            kill_job(id);
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
    send_all("HELLO 1\n", 8);
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
            if (!j->used) continue;
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
                if (pfd[i].revents) drain(owner[i], which[i]);
        }
        now = mono_ns();
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used) continue;
            if (!j->exited && j->deadline && now > j->deadline) {
                j->timed_out = 1;
                kill(-j->pid, SIGKILL);
                j->deadline = 0;
            }
            if (!j->exited) {
                pid_t w = waitpid(j->pid, &j->status, WNOHANG);
                if (w == j->pid) j->exited = 1;
            }
            if (j->exited) finish(j);
        }
    }
}

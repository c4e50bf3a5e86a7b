/* udpecho: echo UDP datagrams and TCP byte streams on one IPv4 port (the network prober's peer).
 * usage: udpecho [-p PORT] [-b ADDR] [-d] [-q] [-R]
 *   -p PORT  port for both UDP and TCP (default 7777)
 *   -b ADDR  bind address (default 0.0.0.0)
 *   -d       daemonize (fork, setsid, stdio to /dev/null); the parent prints "udpecho pid=N" and exits
 *   -q       quiet (no per-client messages)
 *   -R       real-time scheduling (SCHED_FIFO 10) if permitted
 * A UDP datagram (at most 2048 bytes; longer ones are truncated by the kernel and dropped here) is
 * sent back to its sender unchanged. A TCP client (at most 32 at once) gets every byte back in
 * order. SIGTERM/SIGINT exit. One thread, poll().
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

#define MAX_CLIENTS 32
#define BUF 2048

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { struct pollfd pf = {fd, POLLOUT, 0}; poll(&pf, 1, 1000); continue; }
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    int port = 7777, daemonize = 0, quiet = 0, realtime = 0, opt;
    const char *bind_addr = "0.0.0.0";
    while ((opt = getopt(argc, argv, "p:b:dqR")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'b': bind_addr = optarg; break;
        case 'd': daemonize = 1; break;
        case 'q': quiet = 1; break;
        case 'R': realtime = 1; break;
        default: fprintf(stderr, "usage: udpecho [-p PORT] [-b ADDR] [-d] [-q] [-R]\n"); return 2;
        }
    }
    if (port < 1 || port > 65535) { fprintf(stderr, "udpecho: bad port %d\n", port); return 2; }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, bind_addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "udpecho: bad bind address %s\n", bind_addr);
        return 2;
    }
    int one = 1;
    int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (u < 0 || l < 0) { perror("udpecho: socket"); return 1; }
    setsockopt(u, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(u, (struct sockaddr *)&sa, sizeof sa) < 0 || bind(l, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        listen(l, 8) < 0) {
        perror("udpecho: bind/listen");
        return 1;
    }
    if (daemonize) {
        pid_t pid = fork();
        if (pid < 0) { perror("udpecho: fork"); return 1; }
        if (pid > 0) { printf("udpecho pid=%d port=%d\n", (int)pid, port); fflush(stdout); return 0; }
        setsid();
        int nul = open("/dev/null", O_RDWR);
        if (nul >= 0) { dup2(nul, 0); dup2(nul, 1); dup2(nul, 2); if (nul > 2) close(nul); }
        quiet = 1;
    } else {
        printf("udpecho listening on %s:%d (udp+tcp)\n", bind_addr, port);
        fflush(stdout);
    }
    if (realtime) {
        struct sched_param sp = {.sched_priority = 10};
        sched_setscheduler(0, SCHED_FIFO, &sp);   /* best effort */
    }
    struct sigaction act = {.sa_handler = on_signal};
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct pollfd fds[2 + MAX_CLIENTS];
    int nclients = 0;
    char buf[BUF];
    fds[0] = (struct pollfd){u, POLLIN, 0};
    fds[1] = (struct pollfd){l, POLLIN, 0};
    while (!stop) {
        int n = poll(fds, (nfds_t)(2 + nclients), 1000);
        if (n < 0) { if (errno == EINTR) continue; perror("udpecho: poll"); return 1; }
        if (fds[0].revents & POLLIN) {
            for (int k = 0; k < 64; k++) {   /* drain a burst, bounded */
                struct sockaddr_in from;
                socklen_t fl = sizeof from;
                ssize_t r = recvfrom(u, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC, (struct sockaddr *)&from, &fl);
                if (r < 0) break;
                if (r > (ssize_t)sizeof buf) continue;   /* oversized: not ours, drop */
                sendto(u, buf, (size_t)r, MSG_DONTWAIT, (struct sockaddr *)&from, fl);
            }
        }
        if ((fds[1].revents & POLLIN) && nclients < MAX_CLIENTS) {
            int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0) {
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                fds[2 + nclients++] = (struct pollfd){c, POLLIN, 0};
                if (!quiet) { fprintf(stderr, "udpecho: tcp client %d\n", nclients); }
            }
        }
        for (int i = 0; i < nclients; i++) {
            struct pollfd *pf = &fds[2 + i];
            if (!(pf->revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t r = recv(pf->fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r > 0 && send_all(pf->fd, buf, (size_t)r) == 0) continue;
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            close(pf->fd);
            fds[2 + i] = fds[2 + --nclients];
            i--;
        }
    }
    return 0;
}

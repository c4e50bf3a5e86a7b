/* retouch: ask a running memfill to re-read its memory in seq, rev or rand order, verifying
 * every page. Prints memfill's report; exits 0 only if every page verified.
 * usage: retouch seq|rev|rand|quit [--seed S] [--sock PATH]
 */
#include "common.h"
#include <sys/socket.h>
#include <sys/un.h>

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: retouch seq|rev|rand|quit [--seed S] [--sock PATH]\n"); return 2; }
    const char *sock = "/run/memfill.sock";
    unsigned long long seed = 1;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--sock") && i + 1 < argc) sock = argv[++i];
        else { fprintf(stderr, "retouch: unknown argument %s\n", argv[i]); return 2; }
    }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", sock);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("retouch: connect"); return 1; }
    char req[64];
    int n = snprintf(req, sizeof req, "%s %llu\n", argv[1], seed);
    write_all(fd, req, (size_t)n);
    char out[256] = {0};
    size_t got = 0;
    ssize_t r;
    while (got < sizeof out - 1 && (r = read(fd, out + got, sizeof out - 1 - got)) > 0) got += (size_t)r;
    fputs(out, stdout);
    if (!strncmp(out, "BYE", 3)) return 0;
    return (strncmp(out, "OK", 2) == 0 && strstr(out, " bad=0 ")) ? 0 : 1;
}

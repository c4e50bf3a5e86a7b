/* Shared helpers for hvsim guest programs. */
#ifndef HVSIM_COMMON_H
#define HVSIM_COMMON_H
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Find /dev/vportNpM whose virtio-serial port name equals `name`. Returns an fd or -1. */
static inline int open_vport(const char *name, int flags) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    struct dirent *e;
    int fd = -1;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[512], buf[256];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) buf[--n] = 0;
        if (strcmp(buf, name) == 0) {
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            fd = open(path, flags);
            break;
        }
    }
    closedir(d);
    return fd;
}

static inline uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Per-page verifiable pattern: word j of page i under seed s. */
static inline uint64_t page_word(uint64_t seed, uint64_t page, uint64_t j) {
    uint64_t x = seed ^ (page * 0x9E3779B97F4A7C15ull) ^ (j * 0xBF58476D1CE4E5B9ull);
    x ^= x >> 31;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 29;
    return x;
}
#endif

/* Shared by bench/loadgen.c and bench/sink.c: the deterministic byte pattern a bulk stream carries,
 * clocks and small helpers. Invariant: payload byte k of a stream whose 8-byte header says s is
 * pattern[(s + k) % PATTERN_LEN], so the sink can check every byte, its order and its stream. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Odd and not a power of two, so a lost or repeated chunk of any usual size shifts the pattern. */
#define PATTERN_LEN (1048576u + 4093u)
/* Largest single send/recv; the pattern is stored twice so any window up to PATTERN_LEN is contiguous. */
#define CHUNK (1u << 20)

static inline unsigned char *pattern_make(void) {
    unsigned char *p = malloc(2 * (size_t)PATTERN_LEN);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    if (!p) { perror("malloc"); exit(1); }
    for (size_t i = 0; i < PATTERN_LEN; i++) {
        /* xorshift64*: incompressible bytes, identical in both programs. */
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
        p[i] = (unsigned char)((x * 0x2545F4914F6CDD1Dull) >> 56);
    }
    memcpy(p + PATTERN_LEN, p, PATTERN_LEN);
    return p;
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;
    if (!f) { fprintf(stderr, "%s: %s\n", path, strerror(errno)); exit(2); }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) { fprintf(stderr, "%s: short read\n", path); exit(2); }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static inline void set_nonblock(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Reads exactly len bytes (blocking socket); 0 on success, -1 on EOF or error. */
static inline int read_exact(int fd, unsigned char *buf, size_t len) {
    while (len) {
        ssize_t n = read(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static inline int write_all(int fd, const unsigned char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

#endif

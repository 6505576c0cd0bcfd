/* The benchmark's client. Every connection starts with the same real ClientHello (a file made by
 * Python's ssl module); what follows depends on the mode. Results are one JSON object on stdout.
 *
 *   loadgen bulk PORT HELLO --streams N --seconds S
 *       N threads, one blocking stream each: hello, 8-byte pattern offset, then the pattern
 *       (common.h) in 1 MiB writes, sent right after the hello without waiting for an answer;
 *       after S seconds half-close and wait for the sink to close.
 *   loadgen rate PORT HELLO --clients C --seconds S [--threads T]
 *       C connections in flight (epoll, T threads): connect, hello, read the 1-byte answer (the
 *       latency sample), read to EOF, close, again; for S seconds. p50/p99 of connect-to-answer.
 *   loadgen idle PORT HELLO --conns N [--concurrency K]
 *       opens N connections (hello, 1-byte answer), prints the count, holds them until stdin ends
 *       or says "close", then resets them (no TIME_WAIT left behind) and prints again.
 */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>

static unsigned char *hello;
static size_t hello_len;
static uint16_t port;

static const char *opt(int argc, char **argv, const char *name, const char *dflt) {
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    return dflt;
}

static struct sockaddr_in target(void) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* ---------------------------------------------------------------- bulk */

struct stream {
    int index;
    double seconds;
    pthread_barrier_t *go;
    uint64_t start, sent, t_start, t_end;
    int ok;
    char err[96];
};

static unsigned char *pattern;

static void *bulk_stream(void *p) {
    struct stream *s = p;
    struct sockaddr_in a = target();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    /* Streams start at different pattern offsets, so bytes that cross streams are caught too. */
    uint64_t start = ((uint64_t)s->index * 104729u * 7u + 13u) % PATTERN_LEN, deadline;
    size_t off = (size_t)start;
    s->start = start;
    unsigned char scratch[256];
    int connected = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (!connected) snprintf(s->err, sizeof s->err, "connect: %s", strerror(errno));
    pthread_barrier_wait(s->go);
    if (!connected) return NULL;
    s->t_start = now_ns();
    deadline = s->t_start + (uint64_t)(s->seconds * 1e9);
    if (write_all(fd, hello, hello_len) || write_all(fd, (unsigned char *)&start, 8)) {
        snprintf(s->err, sizeof s->err, "write hello: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    while (now_ns() < deadline) {
        ssize_t n = write(fd, pattern + off, CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { snprintf(s->err, sizeof s->err, "write: %s", strerror(errno)); close(fd); return NULL; }
        s->sent += (uint64_t)n;
        off += (size_t)n;
        if (off >= PATTERN_LEN) off -= PATTERN_LEN;
    }
    shutdown(fd, SHUT_WR);
    /* The sink closes once it has read our FIN: the end of the stream as it saw it. */
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (;;) {
        ssize_t n = read(fd, scratch, sizeof scratch);
        if (n > 0) continue;
        if (n < 0 && errno == EINTR) continue;
        if (n == 0) s->ok = 1;
        else snprintf(s->err, sizeof s->err, "waiting for the close: %s", strerror(errno));
        break;
    }
    s->t_end = now_ns();
    close(fd);
    return NULL;
}

static int run_bulk(int streams, double seconds) {
    pthread_t *t = calloc((size_t)streams, sizeof *t);
    struct stream *s = calloc((size_t)streams, sizeof *s);
    pthread_barrier_t go;
    pattern = pattern_make();
    pthread_barrier_init(&go, NULL, (unsigned)streams);
    for (int i = 0; i < streams; i++) {
        s[i] = (struct stream){.index = i, .seconds = seconds, .go = &go};
        pthread_create(&t[i], NULL, bulk_stream, &s[i]);
    }
    for (int i = 0; i < streams; i++) pthread_join(t[i], NULL);
    printf("{\"mode\":\"bulk\",\"streams\":[");
    for (int i = 0; i < streams; i++)
        printf("%s{\"index\":%d,\"start\":%llu,\"sent\":%llu,\"t_start\":%llu,\"t_end\":%llu,\"ok\":%s,\"err\":\"%s\"}",
               i ? "," : "", i, (unsigned long long)s[i].start, (unsigned long long)s[i].sent, (unsigned long long)s[i].t_start,
               (unsigned long long)s[i].t_end, s[i].ok ? "true" : "false", s[i].err);
    printf("]}\n");
    return 0;
}

/* ---------------------------------------------------------------- rate */

enum phase { P_FREE, P_CONNECTING, P_WAIT_ANSWER, P_WAIT_EOF };

struct client {
    int fd;
    uint8_t phase;
    uint64_t t0;
};

struct rate_thread {
    int clients;
    double seconds;
    uint64_t *lat;
    size_t nlat, caplat;
    unsigned long long ok, errors, no_eof, connect_errors;
    char first_err[96];
};

static void rate_error(struct rate_thread *r, const char *what) {
    r->errors++;
    if (!r->first_err[0]) snprintf(r->first_err, sizeof r->first_err, "%s: %s", what, strerror(errno));
}

static void client_close(int ep, struct client *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->phase = P_FREE;
}

static void client_start(int ep, struct client *c, struct rate_thread *r) {
    struct sockaddr_in a = target();
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    c->t0 = now_ns();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS) {
        r->connect_errors++;
        rate_error(r, "connect");
        close(c->fd);
        c->fd = -1;
        c->phase = P_FREE;
        return;
    }
    c->phase = P_CONNECTING;
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void *rate_loop(void *p) {
    struct rate_thread *r = p;
    struct client *cl = calloc((size_t)r->clients, sizeof *cl);
    struct epoll_event evs[256];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    uint64_t start = now_ns(), end = start + (uint64_t)(r->seconds * 1e9);
    unsigned char buf[512];
    for (int i = 0; i < r->clients; i++) client_start(ep, &cl[i], r);
    for (;;) {
        uint64_t now = now_ns();
        if (now >= end) break;
        int n = epoll_wait(ep, evs, 256, 50);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            struct client *c = evs[i].data.ptr;
            if (c->phase == P_CONNECTING) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err) { errno = err; r->connect_errors++; rate_error(r, "connect"); client_close(ep, c); }
                else if (write(c->fd, hello, hello_len) != (ssize_t)hello_len) { rate_error(r, "write hello"); client_close(ep, c); }
                else {
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                    c->phase = P_WAIT_ANSWER;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            } else if (c->phase == P_WAIT_ANSWER || c->phase == P_WAIT_EOF) {
                for (;;) {
                    ssize_t k = read(c->fd, buf, sizeof buf);
                    if (k < 0 && errno == EAGAIN) break;
                    if (k < 0 && errno == EINTR) continue;
                    if (k > 0 && c->phase == P_WAIT_ANSWER) {
                        if (r->nlat == r->caplat) {
                            r->caplat = r->caplat ? 2 * r->caplat : 65536;
                            r->lat = realloc(r->lat, r->caplat * sizeof *r->lat);
                        }
                        r->lat[r->nlat++] = now - c->t0;
                        r->ok++;
                        c->phase = P_WAIT_EOF;
                        continue;
                    }
                    if (k > 0) continue;
                    if (c->phase == P_WAIT_ANSWER) { errno = k < 0 ? errno : ECONNRESET; rate_error(r, "no answer"); }
                    client_close(ep, c);
                    break;
                }
            }
            if (c->phase == P_FREE) client_start(ep, c, r);
        }
        /* A connection stuck for 5 s counts as an error and is replaced. */
        for (int i = 0; i < r->clients; i++) {
            struct client *c = &cl[i];
            if (c->phase == P_FREE) { client_start(ep, c, r); continue; }
            if (now > c->t0 && now - c->t0 > 5000000000ull) {
                if (c->phase == P_WAIT_EOF) r->no_eof++;
                else { errno = ETIMEDOUT; rate_error(r, "stuck"); }
                client_close(ep, c);
                client_start(ep, c, r);
            }
        }
    }
    for (int i = 0; i < r->clients; i++)
        if (cl[i].phase != P_FREE) client_close(ep, &cl[i]);
    close(ep);
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int run_rate(int clients, int threads, double seconds) {
    pthread_t *t = calloc((size_t)threads, sizeof *t);
    struct rate_thread *r = calloc((size_t)threads, sizeof *r);
    uint64_t t0 = now_ns(), t1, *all;
    size_t total = 0, k = 0;
    unsigned long long ok = 0, errors = 0, no_eof = 0, cerr = 0;
    const char *first_err = "";
    for (int i = 0; i < threads; i++) {
        r[i].clients = clients / threads + (i < clients % threads);
        r[i].seconds = seconds;
        pthread_create(&t[i], NULL, rate_loop, &r[i]);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        total += r[i].nlat;
        ok += r[i].ok;
        errors += r[i].errors;
        no_eof += r[i].no_eof;
        cerr += r[i].connect_errors;
        if (!first_err[0] && r[i].first_err[0]) first_err = r[i].first_err;
    }
    t1 = now_ns();
    all = malloc((total ? total : 1) * sizeof *all);
    for (int i = 0; i < threads; i++) {
        memcpy(all + k, r[i].lat, r[i].nlat * sizeof *all);
        k += r[i].nlat;
    }
    qsort(all, total, sizeof *all, cmp_u64);
#define PCT(q) (total ? all[(size_t)((double)(total - 1) * (q))] / 1000.0 : 0.0)
    printf("{\"mode\":\"rate\",\"clients\":%d,\"threads\":%d,\"seconds\":%.6f,\"ok\":%llu,\"errors\":%llu,"
           "\"connect_errors\":%llu,\"no_eof\":%llu,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
           "\"max_us\":%.1f,\"first_error\":\"%s\"}\n",
           clients, threads, (double)(t1 - t0) / 1e9, ok, errors, cerr, no_eof, PCT(0.50), PCT(0.90),
           PCT(0.99), PCT(1.0), first_err);
    return 0;
}

/* ---------------------------------------------------------------- idle */

static int run_idle(int conns, int concurrency) {
    int ep = epoll_create1(EPOLL_CLOEXEC), *fds = malloc((size_t)conns * sizeof(int));
    uint8_t *phase = calloc((size_t)conns, 1); /* 0 unused, 1 connecting, 2 waiting, 3 open, 4 failed */
    int started = 0, in_flight = 0, open = 0, failed = 0;
    uint64_t t0 = now_ns(), deadline = t0 + 60000000000ull;
    struct epoll_event evs[256];
    struct sockaddr_in a = target();
    char err[96] = "", line[64];
    unsigned char buf[64];
    while ((open + failed < conns) && now_ns() < deadline) {
        while (in_flight < concurrency && started < conns) {
            int i = started++, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
            fds[i] = fd;
            if (fd < 0 || (connect(fd, (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS)) {
                if (!err[0]) snprintf(err, sizeof err, "connect: %s", strerror(errno));
                if (fd >= 0) close(fd);
                phase[i] = 4;
                failed++;
                continue;
            }
            phase[i] = 1;
            in_flight++;
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
        int n = epoll_wait(ep, evs, 256, 100);
        for (int e = 0; e < n; e++) {
            int i = (int)evs[e].data.u32, fd = fds[i];
            if (phase[i] == 1) {
                int so = 0;
                socklen_t l = sizeof so;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &l);
                if (!so && write(fd, hello, hello_len) == (ssize_t)hello_len) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                    phase[i] = 2;
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                    continue;
                }
                if (!err[0]) snprintf(err, sizeof err, "connect: %s", strerror(so ? so : errno));
            } else if (phase[i] == 2) {
                ssize_t k = read(fd, buf, sizeof buf);
                if (k < 0 && errno == EAGAIN) continue;
                if (k > 0) {
                    /* Open: stop watching it; it stays idle until the end. */
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    phase[i] = 3;
                    open++;
                    in_flight--;
                    continue;
                }
                if (!err[0]) snprintf(err, sizeof err, "no answer: %s", k ? strerror(errno) : "closed");
            } else {
                continue;
            }
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            close(fd);
            phase[i] = 4;
            failed++;
            in_flight--;
        }
    }
    printf("{\"mode\":\"idle\",\"open\":%d,\"failed\":%d,\"pending\":%d,\"seconds\":%.3f,\"first_error\":\"%s\"}\n",
           open, failed, conns - open - failed, (double)(now_ns() - t0) / 1e9, err);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) && strncmp(line, "close", 5)) {}
    /* Reset instead of FIN: thousands of TIME_WAIT entries would only disturb the next workload. */
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    int still = 0;
    for (int i = 0; i < started; i++) {
        if (phase[i] == 3) {
            char c;
            /* Count the ones the proxy has already dropped while they sat idle. */
            if (recv(fds[i], &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN) still++;
            setsockopt(fds[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        if (phase[i] == 1 || phase[i] == 2 || phase[i] == 3) close(fds[i]);
    }
    printf("{\"mode\":\"idle_closed\",\"still_open\":%d}\n", still);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: loadgen bulk|rate|idle PORT HELLO [options]\n");
        return 2;
    }
    port = (uint16_t)atoi(argv[2]);
    hello = read_file(argv[3], &hello_len);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(argv[1], "bulk"))
        return run_bulk(atoi(opt(argc, argv, "--streams", "1")), atof(opt(argc, argv, "--seconds", "3")));
    if (!strcmp(argv[1], "rate"))
        return run_rate(atoi(opt(argc, argv, "--clients", "32")), atoi(opt(argc, argv, "--threads", "1")),
                        atof(opt(argc, argv, "--seconds", "3")));
    if (!strcmp(argv[1], "idle"))
        return run_idle(atoi(opt(argc, argv, "--conns", "10000")), atoi(opt(argc, argv, "--concurrency", "256")));
    fprintf(stderr, "loadgen: unknown mode %s\n", argv[1]);
    return 2;
}

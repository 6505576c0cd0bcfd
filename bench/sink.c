/* The benchmark's backend: three loopback services, each expecting one known ClientHello first.
 *   bulk  one thread per connection: checks every payload byte against the pattern (common.h) and
 *         prints one JSON line per stream when the client half-closes;
 *   rate  answers 1 byte and closes at once (the server closes first, so no client port sits in
 *         TIME_WAIT and tens of thousands of connections per second stay possible);
 *   idle  answers 1 byte and holds the connection until the client closes it.
 * The first stdout line gives the ports. stdin: "stats" prints counters; EOF ends the process.
 *
 *   sink --bulk-hello F --rate-hello F --idle-hello F [--threads N]
 */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>

enum kind { K_NONE, K_RATE, K_IDLE };

struct service {
    unsigned char *hello;
    size_t hello_len;
};

/* Per-fd state for the epoll services; an fd belongs to one thread's epoll at a time. */
struct conn {
    uint32_t got;
    uint8_t kind;
    uint8_t answered;
};

static struct service svc_bulk, svc_rate, svc_idle;
static unsigned char *pattern;
static struct conn *conns;
static size_t max_fds;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long st_rate_answered, st_idle_answered, st_idle_open, st_hello_bad, st_bulk_streams,
    st_bulk_bad, st_accept_errors;

#define ADD(counter, v) __atomic_add_fetch(&(counter), (v), __ATOMIC_RELAXED)
#define GET(counter) __atomic_load_n(&(counter), __ATOMIC_RELAXED)

static int listen_on(uint16_t port, int reuseport) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 4096)) { perror("bind/listen"); exit(1); }
    return fd;
}

static uint16_t port_of(int fd) {
    struct sockaddr_in a;
    socklen_t l = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &l);
    return ntohs(a.sin_port);
}

struct bulk_arg { int fd; };

static void *bulk_conn(void *p) {
    int fd = ((struct bulk_arg *)p)->fd;
    unsigned char *buf = malloc(CHUNK), *hello = malloc(svc_bulk.hello_len), hdr[8];
    uint64_t start = 0, bytes = 0, t_first = 0, t_last = 0;
    int hello_ok = 0, ok = 0;
    char err[128] = "";
    free(p);
    if (read_exact(fd, hello, svc_bulk.hello_len) < 0) {
        snprintf(err, sizeof err, "eof before the ClientHello ended");
    } else if (!(hello_ok = memcmp(hello, svc_bulk.hello, svc_bulk.hello_len) == 0)) {
        snprintf(err, sizeof err, "ClientHello differs from the one sent");
    } else if (read_exact(fd, hdr, 8) < 0) {
        snprintf(err, sizeof err, "eof before the stream header");
    } else {
        memcpy(&start, hdr, 8);
        ok = start < PATTERN_LEN;
        if (!ok) snprintf(err, sizeof err, "bad stream header");
        size_t off = (size_t)(start % PATTERN_LEN);
        t_first = now_ns();
        for (;;) {
            ssize_t n = read(fd, buf, CHUNK);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) { ok = 0; snprintf(err, sizeof err, "read: %s", strerror(errno)); break; }
            if (n == 0) break;
            t_last = now_ns();
            if (ok && memcmp(buf, pattern + off, (size_t)n) != 0) {
                size_t i = 0;
                long found = -1;
                while (buf[i] == pattern[off + i]) i++;
                /* Where in the pattern the wrong bytes come from tells a reorder or a shift within
                 * the stream from bytes of another stream (streams start at different offsets). */
                if ((size_t)n - i >= 32) {
                    unsigned char *at = memmem(pattern, PATTERN_LEN + 31, buf + i, 32);
                    if (at) found = (long)(at - pattern);
                }
                ok = 0;
                snprintf(err, sizeof err, "byte %llu differs: pattern offset %zu expected, %ld found",
                         (unsigned long long)(bytes + i), (off + i) % PATTERN_LEN, found);
            }
            bytes += (uint64_t)n;
            off += (size_t)n;
            if (off >= PATTERN_LEN) off -= PATTERN_LEN;
        }
    }
    ADD(st_bulk_streams, 1);
    if (!ok) ADD(st_bulk_bad, 1);
    pthread_mutex_lock(&out_lock);
    printf("{\"ev\":\"bulk\",\"start\":%llu,\"bytes\":%llu,\"ok\":%s,\"hello_ok\":%s,\"t_first\":%llu,"
           "\"t_last\":%llu,\"err\":\"%s\"}\n",
           (unsigned long long)start, (unsigned long long)bytes, ok ? "true" : "false",
           hello_ok ? "true" : "false", (unsigned long long)t_first, (unsigned long long)t_last, err);
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
    close(fd);
    free(buf);
    free(hello);
    return NULL;
}

static void *bulk_accept(void *p) {
    int lfd = *(int *)p;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        pthread_t t;
        struct bulk_arg *a;
        if (fd < 0) { if (errno != EINTR) { ADD(st_accept_errors, 1); usleep(1000); } continue; }
        a = malloc(sizeof *a);
        a->fd = fd;
        if (pthread_create(&t, &attr, bulk_conn, a)) { close(fd); free(a); }
    }
    return NULL;
}

struct loop_arg { int rate_fd, idle_fd; };

static void drop(int ep, int fd) {
    if (conns[fd].kind == K_IDLE && conns[fd].answered) __atomic_sub_fetch(&st_idle_open, 1, __ATOMIC_RELAXED);
    conns[fd].kind = K_NONE;
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
}

static void on_readable(int ep, int fd, unsigned char *tmp, size_t tmplen) {
    struct conn *c = &conns[fd];
    const struct service *s = c->kind == K_RATE ? &svc_rate : &svc_idle;
    for (;;) {
        ssize_t n = read(fd, tmp, tmplen);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n <= 0) { drop(ep, fd); return; }
        if (c->answered) continue; /* nothing more is expected; ignore it */
        if (c->got + (size_t)n > s->hello_len || memcmp(tmp, s->hello + c->got, (size_t)n) != 0) {
            ADD(st_hello_bad, 1);
            drop(ep, fd);
            return;
        }
        c->got += (uint32_t)n;
        if (c->got < s->hello_len) continue;
        if (write(fd, "A", 1) != 1) { drop(ep, fd); return; }
        c->answered = 1;
        if (c->kind == K_RATE) {
            ADD(st_rate_answered, 1);
            drop(ep, fd);
            return;
        }
        ADD(st_idle_answered, 1);
        ADD(st_idle_open, 1);
    }
}

static void *event_loop(void *p) {
    struct loop_arg *a = p;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN}, evs[256];
    unsigned char *tmp = malloc(65536);
    ev.data.fd = a->rate_fd;
    epoll_ctl(ep, EPOLL_CTL_ADD, a->rate_fd, &ev);
    ev.data.fd = a->idle_fd;
    epoll_ctl(ep, EPOLL_CTL_ADD, a->idle_fd, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == a->rate_fd || fd == a->idle_fd) {
                for (;;) {
                    int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) {
                        if (errno != EAGAIN && errno != EINTR) ADD(st_accept_errors, 1);
                        break;
                    }
                    if ((size_t)cfd >= max_fds) { close(cfd); ADD(st_accept_errors, 1); continue; }
                    conns[cfd] = (struct conn){.kind = fd == a->rate_fd ? K_RATE : K_IDLE};
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                    /* The hello is usually there already: do not wait for another wakeup. */
                    on_readable(ep, cfd, tmp, 65536);
                }
            } else if (conns[fd].kind != K_NONE) {
                on_readable(ep, fd, tmp, 65536);
            }
        }
    }
    return NULL;
}

static const char *arg(int argc, char **argv, const char *name, const char *dflt) {
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    if (!dflt) { fprintf(stderr, "sink: %s is required\n", name); exit(2); }
    return dflt;
}

int main(int argc, char **argv) {
    int threads = atoi(arg(argc, argv, "--threads", "2"));
    struct rlimit rl;
    char line[64];
    int bulk_fd, rate0, idle0;
    pthread_t t;

    svc_bulk.hello = read_file(arg(argc, argv, "--bulk-hello", NULL), &svc_bulk.hello_len);
    svc_rate.hello = read_file(arg(argc, argv, "--rate-hello", NULL), &svc_rate.hello_len);
    svc_idle.hello = read_file(arg(argc, argv, "--idle-hello", NULL), &svc_idle.hello_len);
    pattern = pattern_make();
    getrlimit(RLIMIT_NOFILE, &rl);
    max_fds = rl.rlim_cur;
    conns = calloc(max_fds, sizeof *conns);

    bulk_fd = listen_on(0, 0);
    rate0 = listen_on(0, 1);
    idle0 = listen_on(0, 1);
    pthread_create(&t, NULL, bulk_accept, &bulk_fd);
    for (int i = 0; i < threads; i++) {
        /* One SO_REUSEPORT listener per thread: the kernel spreads new connections over them. */
        struct loop_arg *a = malloc(sizeof *a);
        a->rate_fd = i == 0 ? rate0 : listen_on(port_of(rate0), 1);
        a->idle_fd = i == 0 ? idle0 : listen_on(port_of(idle0), 1);
        set_nonblock(a->rate_fd);
        set_nonblock(a->idle_fd);
        pthread_create(&t, NULL, event_loop, a);
    }
    printf("{\"ev\":\"ports\",\"bulk\":%u,\"rate\":%u,\"idle\":%u}\n", port_of(bulk_fd), port_of(rate0),
           port_of(idle0));
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "stats", 5)) continue;
        pthread_mutex_lock(&out_lock);
        printf("{\"ev\":\"stats\",\"rate_answered\":%llu,\"idle_answered\":%llu,\"idle_open\":%llu,"
               "\"hello_bad\":%llu,\"bulk_streams\":%llu,\"bulk_bad\":%llu,\"accept_errors\":%llu}\n",
               GET(st_rate_answered), GET(st_idle_answered), GET(st_idle_open), GET(st_hello_bad),
               GET(st_bulk_streams), GET(st_bulk_bad), GET(st_accept_errors));
        fflush(stdout);
        pthread_mutex_unlock(&out_lock);
    }
    return 0;
}

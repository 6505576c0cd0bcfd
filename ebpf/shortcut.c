/* shortcut.c: the local-backend short-circuit. A sock_ops program on a cgroup v2 sees every TCP
 * connection accepted by that cgroup's processes; it captures (inserts into shortcut_socks) only a
 * connection the proxy registered in shortcut_conns before connecting, keyed by its 4-tuple. An
 * sk_msg program on shortcut_socks then sends the backend's sendmsg() straight to the client
 * socket's egress (shortcut_peers, no programs of its own), skipping the loopback connection.
 * A non-blocking backend (O_NONBLOCK on its socket) stays on the loopback path (see shortcut_msg). Invariant: no socket the proxy did not register is ever touched; a captured socket's bytes either
 * reach the client socket or fail the backend's sendmsg() (SK_DROP: EACCES), never vanish; capture
 * happens when the backend's socket becomes ESTABLISHED, before the backend can accept() and write,
 * so no byte of a captured connection takes the loopback path before a redirected one. */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include "shortcut.h"

struct sockhash_tuple_t {
	struct shortcut_key key;
	__u64 leaf;  /* 8 bytes: a userspace lookup then returns the socket's cookie (4 bytes: ENOSPC) */
	int (*update)(struct shortcut_key *, __u64 *);
	int (*delete)(struct shortcut_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct sockhash_tuple_t shortcut_socks = { .max_entries = SHORTCUT_MAX_SOCKS };
BPF_ANNOTATE_KV_PAIR(shortcut_socks, struct shortcut_key, __u64);

struct sockhash_cookie_t {
	__u64 key;
	__u64 leaf;
	int (*update)(__u64 *, __u64 *);
	int (*delete)(__u64 *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct sockhash_cookie_t shortcut_peers = { .max_entries = SHORTCUT_MAX_CONNS };
BPF_ANNOTATE_KV_PAIR(shortcut_peers, __u64, __u64);

BPF_HASH(shortcut_conns, struct shortcut_key, struct shortcut_conn, SHORTCUT_MAX_CONNS);
BPF_PERCPU_ARRAY(shortcut_stats, struct shortcut_stats, 1);

#define ADD(field, v) __sync_fetch_and_add(&(field), (v))
#define O_NONBLOCK_FLAG 04000

/* bpf_probe_read_kernel by its helper number (BCC would rewrite the named helper; see splice.c). */
static long (*read_kernel)(void *dst, u32 size, const void *src) = (void *)BPF_FUNC_probe_read_kernel;

/* Whether the backend socket's file is non-blocking (O_NONBLOCK). Offsets from the running kernel's
 * BTF (-DSHORTCUT_OFF_*, see kernel/shortcut.py). */
static __always_inline int backend_nonblocking(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct tcp_sock *tp;
	void *sock = 0, *file = 0;
	u32 flags = 0;

	if (!sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	read_kernel(&sock, sizeof(sock), (char *)tp + SHORTCUT_OFF_SK_SOCKET);
	if (!sock)
		return 0;
	read_kernel(&file, sizeof(file), (char *)sock + SHORTCUT_OFF_SOCKET_FILE);
	if (!file)
		return 0;
	read_kernel(&flags, sizeof(flags), (char *)file + SHORTCUT_OFF_F_FLAGS);
	return (flags & O_NONBLOCK_FLAG) != 0;
}

/* remote_port of sock_ops and sk_msg contexts: the 16-bit network-order port, in the upper half of
 * the word on current kernels (the lower half on old ones). */
static __always_inline __u32 remote_port(__u32 raw)
{
	if (raw >> 16)
		return bpf_ntohl(raw);
	return bpf_ntohs((__u16)raw);
}

int shortcut_ops(struct bpf_sock_ops *skops)
{
	struct shortcut_key key = {};
	struct shortcut_conn *conn;
	struct shortcut_stats *st;
	u32 zero = 0;
	int err;

	if (skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	st = shortcut_stats.lookup(&zero);
	if (!st)
		return 1;
	key.family = skops->family;
	key.local_port = skops->local_port;
	key.remote_port = remote_port(skops->remote_port);
	if (key.family == AF_INET) {
		key.local_ip[0] = skops->local_ip4;
		key.remote_ip[0] = skops->remote_ip4;
	} else if (key.family == AF_INET6) {
		key.local_ip[0] = skops->local_ip6[0];
		key.local_ip[1] = skops->local_ip6[1];
		key.local_ip[2] = skops->local_ip6[2];
		key.local_ip[3] = skops->local_ip6[3];
		key.remote_ip[0] = skops->remote_ip6[0];
		key.remote_ip[1] = skops->remote_ip6[1];
		key.remote_ip[2] = skops->remote_ip6[2];
		key.remote_ip[3] = skops->remote_ip6[3];
	} else {
		return 1;
	}
	conn = shortcut_conns.lookup(&key);
	if (!conn) {
		ADD(st->foreign, 1);
		return 1;
	}
	err = shortcut_socks.sock_hash_update(skops, &key, BPF_NOEXIST);
	if (err) {
		conn->error = err;
		conn->state = SHORTCUT_REFUSED;
		ADD(st->refused, 1);
	} else {
		conn->state = SHORTCUT_CAPTURED;
		ADD(st->captured, 1);
	}
	return 1;
}

int shortcut_msg(struct sk_msg_md *msg)
{
	struct shortcut_key key = {};
	struct shortcut_conn *conn;
	struct shortcut_stats *st;
	u32 zero = 0;
	u32 size = msg->size;
	int verdict;

	st = shortcut_stats.lookup(&zero);
	if (!st)
		return SK_PASS;
	key.family = msg->family;
	key.local_port = msg->local_port;
	key.remote_port = remote_port(msg->remote_port);
	if (key.family == AF_INET) {
		key.local_ip[0] = msg->local_ip4;
		key.remote_ip[0] = msg->remote_ip4;
	} else {
		key.local_ip[0] = msg->local_ip6[0];
		key.local_ip[1] = msg->local_ip6[1];
		key.local_ip[2] = msg->local_ip6[2];
		key.local_ip[3] = msg->local_ip6[3];
		key.remote_ip[0] = msg->remote_ip6[0];
		key.remote_ip[1] = msg->remote_ip6[1];
		key.remote_ip[2] = msg->remote_ip6[2];
		key.remote_ip[3] = msg->remote_ip6[3];
	}
	conn = shortcut_conns.lookup(&key);
	if (!conn) {
		/* The proxy released the connection (its sockets are closing): the loopback connection
		 * carries this to the proxy's closed socket, which answers with a reset. */
		ADD(st->pass_msgs, 1);
		return SK_PASS;
	}
	/* A non-blocking backend gets a short write or EAGAIN from the redirect when the client's send
	 * buffer is full, then waits for EPOLLOUT on its own socket, which nothing raises when the
	 * client's buffer drains: an edge-triggered server (nginx) stalls for good (measured, see
	 * docs/operations.md). The client's fill cannot be read here (sk_msg may not release a socket
	 * looked up in a sockhash), so a non-blocking backend's connection stays on the loopback path,
	 * where its own socket gives it the usual backpressure: for good, from its first message. */
	if (conn->passing) {
		ADD(conn->pass_bytes, size);
		ADD(st->pass_msgs, 1);
		return SK_PASS;
	}
	if (backend_nonblocking(msg)) {
		conn->passing = 1;
		ADD(conn->pass_bytes, size);
		ADD(st->fallbacks, 1);
		ADD(st->pass_msgs, 1);
		return SK_PASS;
	}
	verdict = shortcut_peers.msg_redirect_hash(msg, &conn->client, 0);
	if (verdict == SK_PASS) {
		ADD(conn->redir_bytes, size);
		ADD(conn->redir_msgs, 1);
		conn->last_ns = bpf_ktime_get_ns();
		ADD(st->redir_bytes, size);
		ADD(st->redir_msgs, 1);
		return SK_PASS;
	}
	/* The client socket left shortcut_peers (closed): fail the backend's sendmsg (EACCES) rather
	 * than deliver to nobody. */
	ADD(conn->drop_msgs, 1);
	ADD(st->drop_msgs, 1);
	return SK_DROP;
}

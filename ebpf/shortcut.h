/* shortcut.h: structs and constants of the local-backend short-circuit (shortcut.c), mirrored in
 * sniproxy/kernel/shortcut.py. Invariant: a field added here is added there in the same change
 * (tests/kernel/test_shortcut_maps.py compares sizes and offsets through BTF). */
#ifndef SNIPROXY_SHORTCUT_H
#define SNIPROXY_SHORTCUT_H

/* Overridable at compile time (-D): connections the proxy may register, and backend sockets the
 * sock_ops program may capture. Tests shrink them to fill a map on purpose. */
#ifndef SHORTCUT_MAX_CONNS
#define SHORTCUT_MAX_CONNS 65536
#endif
#ifndef SHORTCUT_MAX_SOCKS
#define SHORTCUT_MAX_SOCKS 65536
#endif

/* shortcut_conn.state */
enum shortcut_state {
	SHORTCUT_EXPECTED = 0,  /* registered by the proxy; the backend has not accepted yet */
	SHORTCUT_CAPTURED = 1,  /* the backend's socket is in shortcut_socks: its sends are redirected */
	SHORTCUT_REFUSED = 2,   /* inserting it failed (shortcut_conn.error): it stays on loopback */
};

/* A TCP connection as its backend (server) end sees it: local = the backend's listening address,
 * remote = the address and port the proxy bound before connect(). Ports in host order, addresses
 * as on the wire (an IPv4 address in the first word of its array, the rest zero). */
struct shortcut_key {
	__u32 family;        /* AF_INET or AF_INET6 */
	__u32 local_port;
	__u32 remote_port;
	__u32 local_ip[4];
	__u32 remote_ip[4];
};

/* One registered connection (shortcut_conns value). The proxy writes it whole before connect();
 * afterwards only the programs write it (state, error: sock_ops; counters: sk_msg, atomic adds). */
struct shortcut_conn {
	__u64 client;        /* cookie of the client socket: its key in shortcut_peers */
	/* Sizes of the messages redirected to the client's egress, as the verdict saw them, before
	 * the push (which may take only part of one: the rest goes back to the sender as a short write
	 * and is counted again if resent). The exact count is measured on the client socket by the
	 * proxy (access log shortcut_bytes). */
	__u64 redir_bytes;
	__u64 redir_msgs;
	__u64 drop_msgs;     /* messages refused because the client socket is gone (EACCES to the backend) */
	__u64 last_ns;       /* CLOCK_MONOTONIC of the last redirect (the proxy's idle timeout reads it) */
	__u32 state;         /* enum shortcut_state */
	__s32 error;         /* the failed insert's errno (negative), when state is SHORTCUT_REFUSED */
	/* Set (for good) by the verdict at a non-blocking backend's first message: every message then
	 * takes the loopback path (see shortcut.c). */
	__u32 passing;
	__u32 pad;
	__u64 pass_bytes;    /* bytes sent over loopback since `passing` was set */
};

/* Per-CPU totals (shortcut_stats, one slot). */
struct shortcut_stats {
	__u64 captured;      /* backend sockets inserted into shortcut_socks */
	__u64 refused;       /* registered connections whose insert failed (left on loopback) */
	__u64 foreign;       /* passive connections in the cgroup the proxy did not register (untouched) */
	__u64 redir_bytes;
	__u64 redir_msgs;
	__u64 drop_msgs;     /* redirect failed: the client socket was closed */
	__u64 pass_msgs;     /* messages sent over loopback: released connection, or `passing` */
	__u64 fallbacks;     /* captured connections left on the loopback path: non-blocking backend */
};

#endif /* SNIPROXY_SHORTCUT_H */

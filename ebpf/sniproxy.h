/* sniproxy.h: the one definition of every struct, map size and constant shared by the BPF programs
 * (splice.c, and later dns_cache.c / xdp_filter.c) and mirrored in sniproxy/kernel/maps.py.
 * Invariant: a field added here is added to maps.py in the same change (tests/kernel/test_maps.py
 * compares sizes and offsets through BTF). Named structs only, so BTF shows field names in bpftool. */
#ifndef SNIPROXY_H
#define SNIPROXY_H

/* Sockets in sock_map (two per spliced connection). */
#define SNIPROXY_MAX_SOCKETS 65536
/* Pages in each splice_eventsN ring buffer. */
#define SNIPROXY_EVENT_PAGES 16
/* Worker processes that can splice: one splice_eventsN ring each (N = conn_ctl.worker), since a ring
 * has a single consumer and a hold must wake the process that owns the connection. splice.c spells
 * the rings out (BCC allows no map call inside a macro): keep the two in step. */
#define SNIPROXY_MAX_WORKERS 16
/* Queue limit used when splice_cfg.queue_limit is 0: redirected-but-not-yet-sent bytes toward one
 * socket above which the verdict stops redirecting and leaves bytes with the source socket. */
#define SNIPROXY_DEFAULT_QUEUE_LIMIT (24ULL << 20)
/* conn_ctl.release_at value that keeps a direction in userspace until the proxy releases it. */
#define SNIPROXY_HOLD_ALL 0xffffffffffffffffULL

/* Why the verdict started leaving bytes to userspace (splice_event.reason). */
enum splice_hold_reason {
	SPLICE_HOLD_NO_PEER = 1,       /* conn_map or the peer's conn_stats missing */
	SPLICE_HOLD_QUEUE = 2,         /* queue toward the peer above splice_cfg.queue_limit */
	SPLICE_HOLD_REDIRECT_FAIL = 3, /* bpf_sk_redirect_hash failed (peer not in sock_map) */
};

/* Per-CPU counters (traffic_stats, one slot). Sum over CPUs for totals. */
struct traffic_stats {
	__u64 redir_bytes;   /* received bytes redirected by the verdict to the peer's egress */
	__u64 redir_pkts;
	__u64 redir_fail;    /* bpf_sk_redirect_hash failures (bytes then left to userspace) */
	__u64 pass_bytes;    /* received bytes left to userspace (SK_PASS, length > 0) */
	__u64 pass_pkts;
	__u64 held_bytes;    /* of pass: because the queue toward the peer was above the limit */
	__u64 held_pkts;
	__u64 no_peer_pkts;  /* of pass: no peer mapping (not yet set up, or torn down) */
	__u64 fin_pkts;      /* zero-length skbs (a bare FIN): always SK_PASS, never redirected */
	__u64 unknown_pkts;  /* skbs of a socket without conn_stats (SK_PASS) */
	__u64 msg_bytes;     /* bytes seen leaving a socket by the sk_msg program (both paths) */
	__u64 msg_count;
	__u64 events;        /* hold notifications written to splice_events */
	__u64 events_lost;   /* hold notifications the ring buffer had no room for */
};

/* Per socket (conn_stats, key: socket cookie). The verdict writes the rx side, sk_msg the tx side,
 * the peer's verdict adds to queued and this socket's sk_msg takes it off again. */
struct conn_stats {
	__u64 peer;          /* the other socket's cookie */
	__u64 start_ns;      /* CLOCK_MONOTONIC (bpf_ktime_get_ns) when the pair was added */
	__u64 last_ns;       /* last byte in or out */
	__u64 rx_bytes;      /* received and seen by the verdict (= redir + pass): each byte of the
	                      * connection that arrived while spliced is counted here exactly once */
	__u64 rx_pkts;
	__u64 redir_bytes;   /* of rx: redirected to the peer's egress */
	__u64 redir_pkts;
	__u64 pass_bytes;    /* of rx: left in this socket's receive queue for userspace */
	__u64 pass_pkts;
	__u64 tx_bytes;      /* seen leaving by sk_msg. Exact for redirected bytes; measured here: a
	                      * userspace send whose push hit EAGAIN leaves the psock's verdict cached
	                      * and the retry is not shown to sk_msg, so this can miss userspace bytes */
	__u64 tx_msgs;
	__s64 queued;        /* redirected toward this socket, not yet through its sk_msg */
	__u64 held_pkts;     /* of pass: because this socket's peer had more than the limit queued */
};

/* Per socket (conn_ctl, key: socket cookie), written only by userspace. The verdict redirects only
 * while conn_stats.pass_bytes == release_at: every byte it ever left to userspace has been forwarded,
 * so a redirected byte can never overtake one that userspace still has to copy. */
struct conn_ctl {
	__u64 release_at;
	/* Of the peer's conn_stats.queued: what that count still showed when userspace released this
	 * direction, having proved from TCP_INFO that every redirected byte was in the peer's send queue
	 * (sk_msg misses sends: measured, after a userspace send hit EAGAIN inside tcp_bpf the psock
	 * reuses its cached verdict and sk_msg does not run for the next send). Queue depth = queued - this. */
	__s64 queued_adj;
	__u32 worker;        /* the process that owns the connection: its ring gets the hold events */
	__u32 pad;
};

/* Knobs (splice_cfg, one slot), set by userspace. */
struct splice_cfg {
	__u64 queue_limit;   /* bytes; 0: SNIPROXY_DEFAULT_QUEUE_LIMIT */
};

/* Per socket (sk_cookie socket storage): lets sk_msg, which cannot call bpf_get_socket_cookie,
 * find the socket's conn_stats. Written by userspace (map key: the socket's fd). */
struct sock_tag {
	__u64 cookie;
};

/* splice_events ring buffer record: the verdict began leaving a socket's bytes to userspace. */
struct splice_event {
	__u64 cookie;
	__u64 pass_bytes;    /* conn_stats.pass_bytes before this skb */
	__u32 reason;        /* enum splice_hold_reason */
	__u32 len;           /* length of the skb that started the hold */
};

#endif /* SNIPROXY_H */

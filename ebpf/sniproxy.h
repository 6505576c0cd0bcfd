/* sniproxy.h: the one definition of every struct, map size and constant shared by the BPF programs
 * (splice.c, and later dns_cache.c / xdp_filter.c) and mirrored in sniproxy/kernel/maps.py.
 * Invariant: a field added here is added to maps.py in the same change (tests/kernel/test_maps.py
 * compares sizes and offsets through BTF). Named structs only, so BTF shows field names in bpftool. */
#ifndef SNIPROXY_H
#define SNIPROXY_H

/* Sockets in sock_map (two per spliced connection), and slots in splice_state. */
#define SNIPROXY_MAX_SOCKETS 65536
/* Pages in each splice_eventsN ring buffer. */
#define SNIPROXY_EVENT_PAGES 16
/* Worker processes that can splice: one splice_eventsN ring each (N = splice_slot.worker), since a
 * ring has a single consumer and a hold must wake the process that owns the connection. splice.c
 * spells the rings out (BCC allows no map call inside a macro): keep the two in step. */
#define SNIPROXY_MAX_WORKERS 16
/* Queue limit used when splice_cfg.queue_limit is 0: bytes put toward one socket and not yet
 * acknowledged by its remote end (the psock queue plus the socket's send queue) above which the
 * verdict stops redirecting and leaves bytes with the source socket. */
#define SNIPROXY_DEFAULT_QUEUE_LIMIT (24ULL << 20)
/* Toward a peer that drains fast the limit grows to what it acknowledged in the last
 * SNIPROXY_DRAIN_ROOM_NS at the rate of the verdict's last sample (taken every
 * SNIPROXY_DRAIN_SAMPLE_NS at most), up to SNIPROXY_DRAIN_MAX_FACTOR times the limit. A sender faster
 * than the kernel path fills any queue and each hold costs a userspace copy; a slow reader, whose
 * bound is the one that matters, keeps the plain limit. */
#define SNIPROXY_DRAIN_SAMPLE_NS 10000000ULL
#define SNIPROXY_DRAIN_ROOM_NS 80000000ULL
#define SNIPROXY_DRAIN_MAX_FACTOR 8
/* splice_slot.release_at value that keeps a direction in userspace until the proxy releases it. */
#define SNIPROXY_HOLD_ALL 0xffffffffffffffffULL
/* Head-overlap trimming (see splice.c, trim_overlap): bpf_skb_adjust_room removes at most 0xfff bytes
 * a call, so an overlap of up to SNIPROXY_TRIM_ROUNDS * 4095 bytes (4 MiB) can be trimmed. */
#define SNIPROXY_TRIM_STEP 4095
#ifndef SNIPROXY_TRIM_ROUNDS /* tests build a verdict with 0 to reach the reset path */
#define SNIPROXY_TRIM_ROUNDS 1024
#endif

/* Why the verdict started leaving bytes to userspace (splice_event.reason). */
enum splice_hold_reason {
	SPLICE_HOLD_NO_PEER = 1,       /* the peer is not in sock_map (not yet, or closed) */
	SPLICE_HOLD_QUEUE = 2,         /* bytes in flight toward the peer above splice_cfg.queue_limit */
	SPLICE_HOLD_REDIRECT_FAIL = 3, /* bpf_sk_redirect_hash failed */
	SPLICE_HOLD_BROKEN = 4,        /* an skb repeats bytes already delivered and could not be trimmed */
};

/* Per-CPU counters (traffic_stats, one slot). Sum over CPUs for totals. */
struct traffic_stats {
	__u64 redir_bytes;   /* received bytes redirected by the verdict to the peer's egress */
	__u64 redir_pkts;
	__u64 redir_fail;    /* bpf_sk_redirect_hash failures (bytes then left to userspace) */
	__u64 pass_bytes;    /* received bytes left to userspace (SK_PASS, length > 0) */
	__u64 pass_pkts;
	__u64 held_bytes;    /* of pass: because the bytes in flight toward the peer were above the limit */
	__u64 held_pkts;
	__u64 no_peer_pkts;  /* of pass: the peer is not in sock_map */
	__u64 fin_pkts;      /* zero-length skbs (a bare FIN): dropped, TCP has recorded the FIN */
	__u64 unknown_pkts;  /* skbs of a socket without a slot (SK_PASS) */
	__u64 events;        /* hold notifications written to splice_events */
	__u64 events_lost;   /* hold notifications the ring buffer had no room for */
	__u64 trim_pkts;     /* skbs that began before the socket's next unread byte (a partial retransmit) */
	__u64 trim_bytes;    /* the repeated bytes cut off their heads */
	__u64 trim_fail;     /* such skbs that could not be trimmed: their connection is reset */
};

/* Per spliced socket: one element of splice_state, an mmap-able array that the proxy reads and
 * writes as memory (no bpf() call per access); splice_slots maps the socket's cookie to its index.
 * The first block is written only by userspace, the second only by the verdict (atomic adds), so
 * neither ever overwrites the other's fields. */
struct splice_slot {
	__u64 cookie;        /* this socket's cookie (its sock_map key) */
	__u64 peer;          /* the peer socket's cookie */
	/* The verdict redirects only while pass_bytes == release_at: every byte it ever left to
	 * userspace has been forwarded, so a redirected byte can never overtake one being copied. */
	__u64 release_at;
	/* Bytes ever written into the peer's stream other than by this verdict's redirects, as
	 * tcpi_bytes_acked counts them (SYN included): written_total(peer) at insertion plus what the
	 * proxy wrote to it since. In flight toward the peer = toward_base + redir_bytes - its bytes_acked. */
	__u64 toward_base;
	__u64 start_ns;      /* CLOCK_MONOTONIC when the pair was added */
	__u32 worker;        /* the process that owns the connection: its ring gets the hold events */
	__u32 pad;
	__u64 rx_bytes;      /* received and seen by the verdict (= redir + pass) */
	__u64 redir_bytes;   /* of rx: redirected to the peer's egress */
	__u64 pass_bytes;    /* of rx: left in this socket's receive queue for userspace */
	__u64 held_pkts;     /* of pass: because the bytes in flight toward the peer were above the limit */
	__u64 last_ns;       /* last byte received */
	__u64 drain_ns;      /* when the verdict last sampled the peer's bytes_acked */
	__u64 drain_acked;   /* the peer's bytes_acked then */
	__u64 drain_room;    /* what the peer acknowledges in SNIPROXY_DRAIN_ROOM_NS at that sample's rate */
	__u32 next_seq;      /* TCP sequence number of the next byte this socket has not delivered */
	__u32 seq_known;     /* next_seq is set (from the socket's copied_seq at the first skb seen) */
	__u64 trim_bytes;    /* repeated bytes cut off skb heads (see traffic_stats.trim_bytes) */
	__u64 broken;        /* nonzero: an skb could not be trimmed; userspace must reset the pair */
};

/* Knobs (splice_cfg, one slot), set by userspace. */
struct splice_cfg {
	__u64 queue_limit;   /* bytes; 0: SNIPROXY_DEFAULT_QUEUE_LIMIT */
};

/* splice_events ring buffer record: the verdict began leaving a socket's bytes to userspace. */
struct splice_event {
	__u64 cookie;
	__u64 pass_bytes;    /* splice_slot.pass_bytes before this skb */
	__u32 reason;        /* enum splice_hold_reason */
	__u32 len;           /* length of the skb that started the hold */
};

#endif /* SNIPROXY_H */

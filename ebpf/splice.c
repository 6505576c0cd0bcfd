/* splice.c: the kernel half of SpliceRelay. An sk_skb stream verdict moves each received skb to the
 * peer socket's egress (sock_map, conn_map); an sk_msg program counts every byte leaving a socket.
 * Invariant: a redirect happens only while nothing this socket left to userspace is still unforwarded
 * (conn_ctl.release_at) and the queue toward the peer is below the limit; otherwise SK_PASS, never
 * SK_DROP for an skb with data, so no acknowledged byte is ever thrown away. Compiled by BCC with -I<ebpf dir>. */
#include <uapi/linux/bpf.h>
#include "sniproxy.h"

BPF_SOCKHASH(sock_map, u64, SNIPROXY_MAX_SOCKETS);
BPF_HASH(conn_map, u64, u64, SNIPROXY_MAX_SOCKETS);
BPF_PERCPU_ARRAY(traffic_stats, struct traffic_stats, 1);
BPF_HASH(conn_stats, u64, struct conn_stats, SNIPROXY_MAX_SOCKETS);
/* Not preallocated: userspace replaces elements while the verdict reads them; freed after RCU. */
BPF_F_TABLE("hash", u64, struct conn_ctl, conn_ctl, SNIPROXY_MAX_SOCKETS, BPF_F_NO_PREALLOC);
BPF_ARRAY(splice_cfg, struct splice_cfg, 1);
BPF_SK_STORAGE(sk_cookie, struct sock_tag);
/* One ring per worker process (SNIPROXY_MAX_WORKERS of them, written out: see sniproxy.h). */
BPF_RINGBUF_OUTPUT(splice_events0, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events1, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events2, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events3, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events4, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events5, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events6, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events7, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events8, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events9, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events10, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events11, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events12, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events13, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events14, SNIPROXY_EVENT_PAGES);
BPF_RINGBUF_OUTPUT(splice_events15, SNIPROXY_EVENT_PAGES);

#define ADD(field, v) __sync_fetch_and_add(&(field), (v))

static __always_inline struct traffic_stats *traffic(void)
{
	u32 zero = 0;
	return traffic_stats.lookup(&zero);
}

static __always_inline u64 queue_limit(void)
{
	u32 zero = 0;
	struct splice_cfg *cfg = splice_cfg.lookup(&zero);
	if (cfg && cfg->queue_limit)
		return cfg->queue_limit;
	return SNIPROXY_DEFAULT_QUEUE_LIMIT;
}

/* Wake the worker that owns the connection: 0 when written, < 0 when its ring is full (or unknown). */
static __always_inline int announce(u32 worker, struct splice_event *ev)
{
	switch (worker) {
	case 0: return splice_events0.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 1: return splice_events1.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 2: return splice_events2.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 3: return splice_events3.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 4: return splice_events4.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 5: return splice_events5.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 6: return splice_events6.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 7: return splice_events7.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 8: return splice_events8.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 9: return splice_events9.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 10: return splice_events10.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 11: return splice_events11.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 12: return splice_events12.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 13: return splice_events13.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 14: return splice_events14.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	case 15: return splice_events15.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
	}
	return -1;
}

int splice_verdict(struct __sk_buff *skb)
{
	struct traffic_stats *ts = traffic();
	u32 len = skb->len;
	u64 cookie, peer_key;
	u64 *peer;
	u64 passed;
	u32 reason = 0;
	struct conn_stats *st, *pst;
	struct conn_ctl *ctl;
	struct splice_event ev = {};

	if (!ts)
		return SK_PASS;
	/* A bare FIN arrives as a zero-length skb. Redirecting it sets EPIPE on the peer; passing it is
	 * no better when this socket's receive memory is full (held bytes not read yet): it then goes
	 * through the psock backlog, whose ingress of 0 bytes "fails" and reports EPIPE on this socket,
	 * resetting a healthy connection (seen: 50 MB both ways, reset at the client's FIN). It carries
	 * no byte, and TCP has already recorded the FIN (RCV_SHUTDOWN, EPOLLRDHUP, recv() == 0), so
	 * dropping it loses nothing. */
	if (len == 0) {
		ADD(ts->fin_pkts, 1);
		return SK_DROP;
	}
	cookie = bpf_get_socket_cookie(skb);
	st = conn_stats.lookup(&cookie);
	if (!st) {
		ADD(ts->unknown_pkts, 1);
		return SK_PASS;
	}
	ADD(st->rx_bytes, len);
	ADD(st->rx_pkts, 1);
	st->last_ns = bpf_ktime_get_ns();

	passed = st->pass_bytes;
	ctl = conn_ctl.lookup(&cookie);
	peer = conn_map.lookup(&cookie);
	if (!ctl || !peer) {
		reason = SPLICE_HOLD_NO_PEER;
		ADD(ts->no_peer_pkts, 1);
		goto pass;
	}
	if (passed != ctl->release_at)
		goto pass; /* userspace still forwards earlier bytes: stay behind them */
	peer_key = *peer;
	pst = conn_stats.lookup(&peer_key);
	if (!pst) {
		reason = SPLICE_HOLD_NO_PEER;
		ADD(ts->no_peer_pkts, 1);
		goto pass;
	}
	if (pst->queued - ctl->queued_adj > (s64)queue_limit()) {
		reason = SPLICE_HOLD_QUEUE;
		ADD(ts->held_bytes, len);
		ADD(ts->held_pkts, 1);
		ADD(st->held_pkts, 1);
		goto pass;
	}
	ADD(pst->queued, (s64)len);
	if (sock_map.sk_redirect_hash(skb, &peer_key, 0) == SK_PASS) {
		ADD(st->redir_bytes, len);
		ADD(st->redir_pkts, 1);
		ADD(ts->redir_bytes, len);
		ADD(ts->redir_pkts, 1);
		return SK_PASS;
	}
	ADD(pst->queued, -(s64)len);
	ADD(ts->redir_fail, 1);
	reason = SPLICE_HOLD_REDIRECT_FAIL;
pass:
	ADD(st->pass_bytes, len);
	ADD(st->pass_pkts, 1);
	ADD(ts->pass_bytes, len);
	ADD(ts->pass_pkts, 1);
	/* First byte of a hold the proxy did not ask for: wake it up to forward what stays here. */
	if (ctl && reason && passed == ctl->release_at) {
		ev.cookie = cookie;
		ev.pass_bytes = passed;
		ev.reason = reason;
		ev.len = len;
		if (announce(ctl->worker, &ev) == 0)
			ADD(ts->events, 1);
		else
			ADD(ts->events_lost, 1);
	}
	return SK_PASS;
}

/* Runs for every byte leaving a socket in sock_map: written by userspace, or redirected here by the
 * verdict (then sent from the psock's backlog). Counts them and takes redirected ones off `queued`;
 * userspace writes only after proving the queue empty, so what is queued is always the first to leave.
 * The count only errs high (a missed send), which holds a direction early; userspace corrects it at
 * the next release (conn_ctl.queued_adj). */
int redirect_msg(struct sk_msg_md *msg)
{
	struct traffic_stats *ts = traffic();
	struct bpf_sock *sk = msg->sk;
	struct sock_tag *tag;
	struct conn_stats *st;
	u64 cookie;
	u32 size = msg->size;
	s64 queued, take;

	if (ts) {
		ADD(ts->msg_bytes, size);
		ADD(ts->msg_count, 1);
	}
	if (!sk)
		return SK_PASS;
	tag = sk_cookie.sk_storage_get(sk, 0, 0);
	if (!tag)
		return SK_PASS;
	cookie = tag->cookie;
	st = conn_stats.lookup(&cookie);
	if (!st)
		return SK_PASS;
	ADD(st->tx_bytes, size);
	ADD(st->tx_msgs, 1);
	st->last_ns = bpf_ktime_get_ns();
	queued = st->queued;
	if (queued > 0) {
		take = queued < (s64)size ? queued : (s64)size;
		ADD(st->queued, -take);
	}
	return SK_PASS;
}

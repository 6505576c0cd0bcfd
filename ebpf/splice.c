/* splice.c: the kernel half of a handed-off connection. An sk_skb stream verdict moves each received
 * skb to the peer socket's egress (sock_map). No sk_msg program is attached to these sockets: any
 * sk_msg program makes the psock send every redirected byte through tcp_bpf_sendmsg, one more copy
 * (measured: 0.63-0.66x the CPU per GB without it). The queue toward a socket is bounded from the
 * peer's own TCP state instead: what was put toward it minus what its remote end acknowledged.
 * Invariant: a redirect happens only while nothing this socket left to userspace is still unforwarded
 * (splice_slot.release_at) and the bytes in flight toward the peer are below the limit; otherwise
 * SK_PASS, never SK_DROP for an skb with data, so no acknowledged byte is ever thrown away.
 * Every skb is cut to the bytes not delivered before (trim_overlap): the kernel can hand the verdict
 * a retransmitted skb that repeats bytes already delivered.
 * Compiled by BCC with -I<ebpf dir> and -D offsets from the running kernel's BTF (BCC compiles
 * against headers that need not match the running kernel): SNIPROXY_TCP_BYTES_ACKED_OFF,
 * SNIPROXY_TCP_COPIED_SEQ_OFF (struct tcp_sock), SNIPROXY_SKB_SK_OFF and SNIPROXY_SKB_CB_OFF
 * (struct sk_buff; TCP_SKB_CB's first field is the skb's sequence number). */
#include <uapi/linux/bpf.h>
#include "sniproxy.h"

/* BPF_SOCKHASH without lookup(); the same map with it: the verdict looks the peer socket up to read
 * how much of what was sent toward it has been acknowledged. */
struct sock_map_table_t {
	u64 key;
	int leaf;
	void *(*lookup)(u64 *);
	int (*update)(u64 *, int *);
	int (*delete)(u64 *);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct sock_map_table_t sock_map = { .max_entries = SNIPROXY_MAX_SOCKETS };
BPF_ANNOTATE_KV_PAIR(sock_map, u64, int);

/* bpf_probe_read_kernel by its helper number: BCC would rewrite the named helper to bpf_probe_read
 * when it cannot probe the kernel for it (as it cannot without CAP_SYS_ADMIN), which sk_skb may not call. */
static long (*read_kernel)(void *dst, u32 size, const void *src) = (void *)BPF_FUNC_probe_read_kernel;

BPF_HASH(splice_slots, u64, u32, SNIPROXY_MAX_SOCKETS);
BPF_F_TABLE("array", u32, struct splice_slot, splice_state, SNIPROXY_MAX_SOCKETS, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(traffic_stats, struct traffic_stats, 1);
BPF_ARRAY(splice_cfg, struct splice_cfg, 1);
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

/* A partial retransmit (seq < rcv_nxt < end_seq) is queued whole, and tcp_read_skb, which feeds the
 * verdict, hands over whole skbs without the offset tcp_recvmsg skips: the repeated head would be
 * delivered twice (seen: 95,232 extra bytes at a client, after retransmits on loopback). Cut the head
 * to the socket's next undelivered byte: next_seq, a cursor the verdict keeps, started from
 * copied_seq (where userspace stopped reading) at the first skb. Returns the bytes cut, or < 0 when
 * the skb could not be cut (then the pair must be reset: delivering it would corrupt the stream).
 * The ctx pointer is the kernel's sk_buff: read with bpf_probe_read_kernel at BTF offsets. */
static __always_inline int trim_overlap(struct __sk_buff *skb, struct splice_slot *slot, u32 len)
{
	u32 seq = 0, expected = 0, over;
	void *own = 0;

	read_kernel(&seq, sizeof(seq), (char *)skb + SNIPROXY_SKB_CB_OFF);
	if (slot->seq_known) {
		expected = slot->next_seq;
	} else {
		read_kernel(&own, sizeof(own), (char *)skb + SNIPROXY_SKB_SK_OFF);
		if (!own)
			return -1;
		read_kernel(&expected, sizeof(expected), (char *)own + SNIPROXY_TCP_COPIED_SEQ_OFF);
		slot->seq_known = 1;
	}
	over = expected - seq;
	if ((s32)over <= 0) {
		slot->next_seq = seq + len;
		return 0;
	}
	if (over >= len)
		return -1; /* all of it delivered before: TCP never queues such an skb */
	slot->next_seq = seq + len;
	for (int i = 0; i < SNIPROXY_TRIM_ROUNDS && over > 0; i++) {
		u32 step = over > SNIPROXY_TRIM_STEP ? SNIPROXY_TRIM_STEP : over;
		if (bpf_skb_adjust_room(skb, -(s32)step, 0, 0))
			return -1;
		over -= step;
	}
	if (over)
		return -1;
	return expected - seq;
}

int splice_verdict(struct __sk_buff *skb)
{
	struct traffic_stats *ts = traffic();
	u32 len = skb->len;
	u64 cookie, peer_key, passed, acked = 0, now, limit;
	u32 *index;
	u32 reason = 0;
	int trimmed;
	struct splice_slot *slot;
	struct bpf_sock *peer_sk;
	struct tcp_sock *tp;
	struct splice_event ev = {};

	if (!ts)
		return SK_PASS;
	/* A bare FIN arrives as a zero-length skb. Redirecting it sets EPIPE on the peer; passing it is
	 * no better when this socket's receive memory is full (held bytes not read yet): it then goes
	 * through the psock backlog, whose ingress of 0 bytes "fails" and reports EPIPE on this socket,
	 * resetting a healthy connection. It carries no byte, and TCP has already recorded the FIN
	 * (RCV_SHUTDOWN, EPOLLRDHUP, recv() == 0), so dropping it loses nothing. */
	if (len == 0) {
		ADD(ts->fin_pkts, 1);
		return SK_DROP;
	}
	cookie = bpf_get_socket_cookie(skb);
	index = splice_slots.lookup(&cookie);
	if (!index) {
		ADD(ts->unknown_pkts, 1);
		return SK_PASS;
	}
	slot = splice_state.lookup(index);
	if (!slot) {
		ADD(ts->unknown_pkts, 1);
		return SK_PASS;
	}
	passed = slot->pass_bytes;
	trimmed = slot->broken ? -1 : trim_overlap(skb, slot, len);
	if (trimmed < 0) {
		/* Left to userspace, which resets the pair instead of forwarding it; woken once. */
		if (!slot->broken) {
			ADD(ts->trim_fail, 1);
			reason = SPLICE_HOLD_BROKEN;
		}
		slot->broken = 1;
		len = skb->len;
		ADD(slot->rx_bytes, len);
		goto pass;
	}
	if (trimmed > 0) {
		len = skb->len;
		ADD(ts->trim_pkts, 1);
		ADD(ts->trim_bytes, trimmed);
		ADD(slot->trim_bytes, trimmed);
	}
	ADD(slot->rx_bytes, len);
	now = bpf_ktime_get_ns();
	slot->last_ns = now;
	if (passed != slot->release_at)
		goto pass; /* userspace still forwards earlier bytes: stay behind them */
	peer_key = slot->peer;
	peer_sk = sock_map.lookup(&peer_key);
	if (!peer_sk) {
		reason = SPLICE_HOLD_NO_PEER;
		ADD(ts->no_peer_pkts, 1);
		goto pass;
	}
	tp = bpf_skc_to_tcp_sock(peer_sk);
	if (tp)
		read_kernel(&acked, sizeof(acked), (char *)tp + SNIPROXY_TCP_BYTES_ACKED_OFF);
	bpf_sk_release(peer_sk);
	if (now - slot->drain_ns >= SNIPROXY_DRAIN_SAMPLE_NS) {
		slot->drain_room = (acked - slot->drain_acked) * SNIPROXY_DRAIN_ROOM_NS / (now - slot->drain_ns);
		slot->drain_ns = now;
		slot->drain_acked = acked;
	}
	limit = queue_limit();
	if (slot->drain_room > limit)
		limit = slot->drain_room < limit * SNIPROXY_DRAIN_MAX_FACTOR ? slot->drain_room
									      : limit * SNIPROXY_DRAIN_MAX_FACTOR;
	if ((s64)(slot->toward_base + slot->redir_bytes - acked) > (s64)limit) {
		reason = SPLICE_HOLD_QUEUE;
		ADD(ts->held_bytes, len);
		ADD(ts->held_pkts, 1);
		ADD(slot->held_pkts, 1);
		goto pass;
	}
	if (sock_map.sk_redirect_hash(skb, &peer_key, 0) == SK_PASS) {
		ADD(slot->redir_bytes, len);
		ADD(ts->redir_bytes, len);
		ADD(ts->redir_pkts, 1);
		return SK_PASS;
	}
	ADD(ts->redir_fail, 1);
	reason = SPLICE_HOLD_REDIRECT_FAIL;
pass:
	ADD(slot->pass_bytes, len);
	ADD(ts->pass_bytes, len);
	ADD(ts->pass_pkts, 1);
	/* First byte of a hold the proxy did not ask for: wake it up to forward what stays here. */
	if (reason && (passed == slot->release_at || reason == SPLICE_HOLD_BROKEN)) {
		ev.cookie = cookie;
		ev.pass_bytes = passed;
		ev.reason = reason;
		ev.len = len;
		if (announce(slot->worker, &ev) == 0)
			ADD(ts->events, 1);
		else
			ADD(ts->events_lost, 1);
	}
	return SK_PASS;
}

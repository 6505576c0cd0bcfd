/* xdp_filter.c: the ingress allow-list in front of the proxy's listeners. A TCP packet whose
 * destination port is in xdp_ports passes only when its source matches ip_whitelist (LPM trie, IPv4
 * and IPv6 keyed by family); it is dropped otherwise. Invariant: everything else passes (ARP, ICMP,
 * UDP, other ports, non-IP), so the filter can never cut a host off from its management traffic;
 * every packet access is bounds-checked and every loop is bounded. Compiled by BCC with -I<ebpf>. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "xdp_filter.h"

BPF_LPM_TRIE(ip_whitelist, struct ip_whitelist_key, u8, XDP_MAX_ALLOW);
BPF_HASH(xdp_ports, u16, u8, XDP_MAX_PORTS);
BPF_PERCPU_ARRAY(xdp_stats, struct xdp_verdicts, 1);

/* Not every kernel's uapi headers name these. */
#define SP_ETH_P_8021Q 0x8100
#define SP_ETH_P_8021AD 0x88A8
#define SP_IP_OFFSET_MASK 0x1fff
#define SP_IP6_OFFSET_MASK 0xfff8
/* Extension headers are at most 2 KiB each; an offset past this means a chain we do not follow. */
#define SP_MAX_L4_OFFSET 4096

enum classification {
	NOT_GATED = 0,   /* not TCP to a gated port: always passes */
	GATED = 1,       /* TCP to a gated port, or an IP packet we cannot see the port of: check source */
};

struct vlan_tag {
	__be16 tci;
	__be16 encapsulated_proto;
};

/* A TCP destination port at data + off, if the packet holds it: gated when it is in xdp_ports. A TCP
 * packet too short to hold its ports is judged by its source, never waved through. */
static __always_inline int classify_tcp(void *data, void *end, u32 off)
{
	struct {
		__be16 source;
		__be16 dest;
	} *ports;
	u16 port;

	if (off > SP_MAX_L4_OFFSET)
		return GATED;
	ports = data + off;
	if ((void *)(ports + 1) > end)
		return GATED;
	port = bpf_ntohs(ports->dest);
	return xdp_ports.lookup(&port) ? GATED : NOT_GATED;
}

static __always_inline int classify_v4(void *data, void *end, u32 off, struct ip_whitelist_key *key)
{
	struct iphdr *ip = data + off;
	u32 ihl;

	if ((void *)(ip + 1) > end)
		return NOT_GATED; /* not even an IP header: the stack drops it */
	ihl = ip->ihl * 4;
	if (ip->protocol != IPPROTO_TCP || ihl < sizeof(*ip))
		return NOT_GATED;
	/* A later fragment has no TCP header; its first fragment carries the ports and is judged. */
	if (ip->frag_off & bpf_htons(SP_IP_OFFSET_MASK))
		return NOT_GATED;
	key->prefixlen = 8 + 32;
	key->family = XDP_FAMILY_V4;
	__builtin_memcpy(key->addr, &ip->saddr, 4);
	return classify_tcp(data, end, off + ihl);
}

static __always_inline int classify_v6(void *data, void *end, u32 off, struct ip_whitelist_key *key)
{
	struct ipv6hdr *ip6 = data + off;
	u8 *hdr;
	u8 next;
	u32 i;

	if ((void *)(ip6 + 1) > end)
		return NOT_GATED;
	key->prefixlen = 8 + 128;
	key->family = XDP_FAMILY_V6;
	__builtin_memcpy(key->addr, &ip6->saddr, 16);
	next = ip6->nexthdr;
	off += sizeof(*ip6);
#pragma unroll
	for (i = 0; i < XDP_MAX_EXT_HDRS; i++) {
		if (next == IPPROTO_TCP)
			return classify_tcp(data, end, off);
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
		    next != IPPROTO_FRAGMENT && next != IPPROTO_AH)
			return NOT_GATED; /* UDP, ICMPv6, ESP, no next header, ... */
		if (off > SP_MAX_L4_OFFSET)
			return GATED;
		hdr = data + off;
		if ((void *)(hdr + 8) > end) /* every extension header is at least 8 bytes */
			return GATED;
		if (next == IPPROTO_FRAGMENT) {
			if (((hdr[2] << 8) | hdr[3]) & SP_IP6_OFFSET_MASK)
				return NOT_GATED; /* later fragment: no TCP header here */
			off += 8;
		} else if (next == IPPROTO_AH) {
			off += (hdr[1] + 2) * 4;
		} else {
			off += (hdr[1] + 1) * 8;
		}
		next = hdr[0];
	}
	if (next == IPPROTO_TCP)
		return classify_tcp(data, end, off);
	/* A chain longer than we follow: the source decides, so it cannot smuggle a SYN past us. */
	return GATED;
}

int xdp_ip_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct vlan_tag *vlan;
	struct ip_whitelist_key key = {};
	struct xdp_verdicts *stats;
	int action = XDP_PASS;
	int class = NOT_GATED;
	u32 zero = 0;
	u32 off = sizeof(*eth);
	u16 proto;

	if ((void *)(eth + 1) > end)
		goto out;
	proto = eth->h_proto;
	if (proto == bpf_htons(SP_ETH_P_8021Q) || proto == bpf_htons(SP_ETH_P_8021AD)) {
		vlan = data + off;
		if ((void *)(vlan + 1) > end)
			goto out;
		proto = vlan->encapsulated_proto;
		off += sizeof(*vlan);
	}
	if (proto == bpf_htons(ETH_P_IP))
		class = classify_v4(data, end, off, &key);
	else if (proto == bpf_htons(ETH_P_IPV6))
		class = classify_v6(data, end, off, &key);
	if (class == GATED && !ip_whitelist.lookup(&key))
		action = XDP_DROP;
out:
	stats = xdp_stats.lookup(&zero);
	if (stats) {
		if (class == NOT_GATED)
			stats->not_gated++;
		else if (action == XDP_DROP)
			stats->dropped++;
		else
			stats->passed++;
	}
	return action;
}

/* xdp_filter.h: the structs and constants of the XDP allow-list (xdp_filter.c), mirrored with ctypes
 * in sniproxy/kernel/xdp.py. Invariant: a field changed here is changed there in the same change
 * (tests/kernel/test_xdp_maps.py compares sizes and offsets through the maps' BTF). Named structs
 * only, so bpftool prints field names. Kept apart from sniproxy.h, which the splice programs own. */
#ifndef SNIPROXY_XDP_FILTER_H
#define SNIPROXY_XDP_FILTER_H

/* CIDR entries in ip_whitelist (both families together). */
#define XDP_MAX_ALLOW 16384
/* Listening ports in xdp_ports. */
#define XDP_MAX_PORTS 1024
/* IPv6 extension headers followed before giving up on finding the TCP header. */
#define XDP_MAX_EXT_HDRS 8

/* ip_whitelist_key.family: the first byte the trie matches, so one trie holds both families and an
 * IPv4 entry can never match an IPv6 source. */
#define XDP_FAMILY_V4 4
#define XDP_FAMILY_V6 6

/* ip_whitelist (LPM trie) key. prefixlen counts the bits after it that must match: 8 for family plus
 * the CIDR's prefix length (10.0.0.0/8 is prefixlen 16). */
struct ip_whitelist_key {
	__u32 prefixlen;
	__u8 family;
	__u8 addr[16];   /* network byte order; IPv4 uses the first 4 bytes, the rest stay zero */
} __attribute__((packed));

/* Per-CPU verdict counters (xdp_stats, one slot); sum over CPUs for totals. Every packet the program
 * sees is counted exactly once. */
struct xdp_verdicts {
	__u64 passed;     /* TCP to a gated port from a source in ip_whitelist */
	__u64 dropped;    /* TCP to a gated port from any other source (XDP_DROP) */
	__u64 not_gated;  /* everything else: other ports, UDP, ICMP, ARP, non-IP (XDP_PASS) */
};

#endif /* SNIPROXY_XDP_FILTER_H */

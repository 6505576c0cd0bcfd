/* dns_cache.h: the layout of the pinned dns_cache map (key, value, flags), mirrored by ctypes in
 * sniproxy/kernel/dnsmap.py. Invariant: a change here changes DNS_CACHE_VERSION or the value size,
 * so an entry written by another build is never read with the wrong layout (dnsmap.py checks both;
 * tests/kernel/test_dns_cache.py compares the mirror with the kernel's BTF).
 * Addresses are stored as text so `bpftool map dump` shows them as they are written in a config. */
#ifndef SNIPROXY_DNS_CACHE_H
#define SNIPROXY_DNS_CACHE_H

/* A hostname is at most 253 characters; the key is the lower-cased name, NUL-terminated and
 * zero-padded to this size, so two different names never share a key. */
#define DNS_NAME_LEN 256
/* Addresses kept per family; a longer answer is cut to its first DNS_MAX_ADDRS. */
#define DNS_MAX_ADDRS 8
#define DNS_V4_LEN 16  /* "255.255.255.255" + NUL */
#define DNS_V6_LEN 46  /* INET6_ADDRSTRLEN */
/* Bumped whenever struct dns_entry changes meaning; entries of another version are misses. */
#define DNS_CACHE_VERSION 1

/* dns_entry.flags */
#define DNS_F_A 0x1        /* an A query was answered (addresses or a clean "no such record") */
#define DNS_F_AAAA 0x2     /* an AAAA query was answered */
#define DNS_F_NXDOMAIN 0x4 /* the name does not exist (cached for [resolver] negative_ttl) */

struct dns_key {
	char name[DNS_NAME_LEN];
};

struct dns_entry {
	__u64 expires_ns;  /* CLOCK_BOOTTIME: never served at or after this instant */
	__u64 inserted_ns; /* CLOCK_BOOTTIME when it was written */
	__u32 ttl_ms;      /* the lifetime it was given: the answer's TTL bounded by min_ttl/max_ttl */
	__u8 version;      /* DNS_CACHE_VERSION */
	__u8 flags;        /* DNS_F_* */
	__u8 n_v4;         /* used slots of v4 */
	__u8 n_v6;         /* used slots of v6 */
	char v4[DNS_MAX_ADDRS][DNS_V4_LEN];
	char v6[DNS_MAX_ADDRS][DNS_V6_LEN];
};

#endif

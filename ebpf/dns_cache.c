/* dns_cache.c: the resolver's shared answer cache, an LRU hash pinned at <pin_dir>/dns_cache so every
 * process of the proxy (and the next one, after a restart) sees the same entries, and dns_lookup, the
 * program the proxy reads it through. Invariant: the map is only written from userspace; the program
 * only reads. Compiled by BCC with -I<ebpf dir> -DDNS_CACHE_SIZE=<n>; sniproxy/kernel/dnsmap.py pins
 * the map BCC creates, or, when a pin exists, swaps the pinned map in for this one before the program
 * is loaded (not BPF_TABLE_PINNED: BCC reopens a pin by id, which needs CAP_SYS_ADMIN).
 *
 * Why a program for reads: a bpf(BPF_MAP_LOOKUP_ELEM) from userspace does not set the LRU reference
 * bit, so a map read only through syscalls evicts in insertion order, hot names included. A lookup
 * made by a BPF program does set it. The proxy runs dns_lookup with BPF_PROG_TEST_RUN on a buffer
 * holding a struct dns_key followed by room for a struct dns_entry: XDP_PASS and the entry copied
 * after the key on a hit, XDP_DROP on a miss. Listing tools use plain syscalls and leave the order be. */
#include <uapi/linux/bpf.h>
#include "dns_cache.h"

#ifndef DNS_CACHE_SIZE
#error "DNS_CACHE_SIZE must be defined ([resolver] cache_size)"
#endif

BPF_TABLE("lru_hash", struct dns_key, struct dns_entry, dns_cache, DNS_CACHE_SIZE);

int dns_lookup(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct dns_key *key = data;
	struct dns_entry *out = (void *)(key + 1);
	struct dns_entry *entry;
	int verdict = XDP_ABORTED;

	if ((void *)(out + 1) > data_end)
		goto done;
	entry = dns_cache.lookup(key);
	if (!entry) {
		verdict = XDP_DROP;
		goto done;
	}
	__builtin_memcpy(out, entry, sizeof(*out));
	verdict = XDP_PASS;
done:
	return verdict;
}

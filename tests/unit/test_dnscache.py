# CachedAnswer semantics (which mode an answer can serve, address order), MemoryDnsCache expiry and
# LRU bound, the `sniproxy dns` listing, and the [resolver] kernel_cache switch. Pure: no sockets,
# no BPF.
from __future__ import annotations

import time

import pytest

from sniproxy.config import ConfigError, parse_config
from sniproxy.dnscache import QUERIED_A, QUERIED_AAAA, CachedAnswer, MemoryDnsCache, now, render

BOTH = QUERIED_A | QUERIED_AAAA
MODES = ("ipv4_first", "ipv6_first", "ipv4_only", "ipv6_only")


def answer(v4=(), v6=(), ttl=60.0, queried=BOTH, nxdomain=False, at=None) -> CachedAnswer:
    at = now() if at is None else at
    return CachedAnswer(tuple(v4), tuple(v6), at + ttl, ttl, at, queried, nxdomain)


def test_clock_is_boottime() -> None:
    # Shared with the kernel map and other processes: CLOCK_BOOTTIME, never time.monotonic().
    assert abs(now() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 0.1


@pytest.mark.parametrize("mode, expected", [
    ("ipv4_first", ["192.0.2.1", "192.0.2.2", "2001:db8::1"]),
    ("ipv6_first", ["2001:db8::1", "192.0.2.1", "192.0.2.2"]),
    ("ipv4_only", ["192.0.2.1", "192.0.2.2"]),
    ("ipv6_only", ["2001:db8::1"]),
])
def test_addresses_follow_the_mode(mode: str, expected: list[str]) -> None:
    a = answer(["192.0.2.1", "192.0.2.2"], ["2001:db8::1"])
    assert a.answers(mode)
    assert a.addresses(mode) == expected


def test_an_answer_lacking_a_record_type_does_not_serve_a_mode_that_needs_it() -> None:
    v4_only_query = answer(["192.0.2.1"], queried=QUERIED_A)  # made by an ipv4_only resolver
    assert v4_only_query.answers("ipv4_only")
    assert not v4_only_query.answers("ipv6_only")
    # Dual-stack modes take it: it has addresses (an AAAA that failed is not worth waiting for).
    assert v4_only_query.answers("ipv4_first") and v4_only_query.answers("ipv6_first")


def test_a_negative_answer_serves_only_the_types_it_covers() -> None:
    no_a = answer(queried=QUERIED_A)  # A said "no such record"; AAAA never asked
    assert no_a.negative
    assert no_a.answers("ipv4_only")
    assert not no_a.answers("ipv6_only") and not no_a.answers("ipv4_first")
    nxdomain = answer(queried=BOTH, nxdomain=True)
    assert all(nxdomain.answers(m) for m in MODES)
    assert all(nxdomain.addresses(m) == [] for m in MODES)


def test_memory_cache_never_serves_an_expired_answer() -> None:
    cache = MemoryDnsCache(10)
    cache.put("live.test", answer(["192.0.2.1"], ttl=60))
    cache.put("dead.test", answer(["192.0.2.2"], ttl=-1))  # already expired: not even stored
    short = answer(["192.0.2.3"], ttl=0.05)
    cache.put("short.test", short)
    assert cache.get("live.test").v4 == ("192.0.2.1",)
    assert cache.get("dead.test") is None
    assert cache.get("short.test") == short
    time.sleep(0.06)
    assert cache.get("short.test") is None


def test_memory_cache_is_bounded_and_flushes() -> None:
    cache = MemoryDnsCache(3)
    for i in range(5):
        cache.put(f"n{i}.test", answer([f"192.0.2.{i}"]))
    assert [cache.get(f"n{i}.test") is not None for i in range(5)] == [False, False, True, True, True]
    assert cache.flush("n4.test") == 1
    assert cache.flush("n4.test") == 0
    assert cache.flush() == 2
    assert cache.get("n3.test") is None


def test_render_lists_live_names_sorted_and_counts_expired_ones() -> None:
    at = now()
    entries = [
        ("b.test", answer(["192.0.2.1"], ["2001:db8::1"], ttl=300, at=at - 13)),
        ("a.test", answer(ttl=5, nxdomain=True, at=at)),
        ("c.test", answer(queried=QUERIED_A, ttl=5, at=at)),
        ("gone.test", answer(["192.0.2.9"], ttl=1, at=at - 10)),
    ]
    lines = render(entries, at)
    assert lines[0].split() == ["NAME", "LEFT/TTL", "ADDRESSES"]
    assert lines[1].split() == ["a.test", "5s/5s", "NXDOMAIN"]
    assert lines[2].split() == ["b.test", "287s/300s", "192.0.2.1,", "2001:db8::1"]
    assert lines[3].split()[:2] == ["c.test", "5s/5s"] and lines[3].endswith("no address")
    assert lines[4] == "3 name(s) cached, 1 expired (not served)"
    assert render([], at)[1:] == ["0 name(s) cached"]


_MINIMAL = '[[listener]]\nbind = "127.0.0.1:8443"\ntable = "t"\n[table.t]\nroutes = []\n'


def test_kernel_cache_is_on_by_default_and_independent_of_splice() -> None:
    assert parse_config(_MINIMAL).resolver.kernel_cache is True
    off = parse_config(_MINIMAL + "[resolver]\nkernel_cache = false\n[ebpf]\nsplice = true\n")
    assert off.resolver.kernel_cache is False and off.ebpf.splice is True
    on = parse_config(_MINIMAL + "[resolver]\nkernel_cache = true\n[ebpf]\nsplice = false\n")
    assert on.resolver.kernel_cache is True and on.ebpf.splice is False


@pytest.mark.parametrize("value", ["1", '"false"', "0"])
def test_kernel_cache_must_be_a_boolean(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_MINIMAL + f"[resolver]\nkernel_cache = {value}\n")
    assert err.value.key_path == "resolver.kernel_cache" and "true or false" in str(err.value)

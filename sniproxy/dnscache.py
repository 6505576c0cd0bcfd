# Where resolved answers live between lookups. DnsCache is the interface the resolver sees;
# MemoryDnsCache keeps answers in this process (cachetools), BpfDnsCache in the pinned dns_cache map
# that every proxy process shares and that survives a restart. Invariant: an entry is never served at
# or after its expiry, and every time here is CLOCK_BOOTTIME (now()), so expiries mean the same thing
# in every process and across suspend.
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

import cachetools
import structlog

if TYPE_CHECKING:
    from sniproxy.kernel.dnsmap import DnsMap

log = structlog.get_logger("sniproxy.dnscache")

# Which record types an answer covers (same bits as DNS_F_* in ebpf/dns_cache.h).
QUERIED_A = 0x1
QUERIED_AAAA = 0x2
_NXDOMAIN = 0x4
# Addresses kept per family (DNS_MAX_ADDRS): enough to try within one connect_timeout.
MAX_ADDRESSES = 8

_MODE_NEEDS = {"ipv4_only": QUERIED_A, "ipv6_only": QUERIED_AAAA,
               "ipv4_first": QUERIED_A | QUERIED_AAAA, "ipv6_first": QUERIED_A | QUERIED_AAAA}


def now() -> float:
    """Seconds on CLOCK_BOOTTIME: system-wide, immune to wall-clock steps, counts suspend."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class CachedAnswer(NamedTuple):
    # A NamedTuple, not a frozen dataclass: one is built on every kernel-map hit, and this is the
    # cheapest immutable record to build.
    v4: tuple[str, ...]
    v6: tuple[str, ...]
    expires: float  # now() deadline; at or after it the answer is gone
    ttl: float  # the lifetime it was given (the answer's TTL clamped to [min_ttl, max_ttl])
    inserted: float
    queried: int = QUERIED_A | QUERIED_AAAA  # record types that were answered (QUERIED_*)
    nxdomain: bool = False  # the name does not exist

    @property
    def negative(self) -> bool:
        return not self.v4 and not self.v6

    def answers(self, mode: str) -> bool:
        """Whether this entry can answer a lookup in `mode` without a query. An answer made under
        another mode may lack a record type this mode needs; a dual-stack lookup accepts an answer
        where one type failed but the other gave addresses (that is what the resolver returned)."""
        if self.nxdomain:
            return True
        needs = _MODE_NEEDS[mode]
        if self.queried & needs == needs:
            return True
        if needs == QUERIED_A | QUERIED_AAAA:
            return bool(self.v4 or self.v6)
        return False

    def addresses(self, mode: str) -> list[str]:
        """The addresses to try, in the order `mode` asks for."""
        if mode == "ipv4_first":
            return [*self.v4, *self.v6]
        if mode == "ipv6_first":
            return [*self.v6, *self.v4]
        return list(self.v4 if mode == "ipv4_only" else self.v6)


class DnsCache(Protocol):
    kind: str

    def get(self, name: str) -> CachedAnswer | None: ...
    def put(self, name: str, answer: CachedAnswer) -> None: ...
    def flush(self, name: str | None = None) -> int: ...
    def close(self) -> None: ...


class MemoryDnsCache:
    """In-process, least-recently-used beyond `size` names, each entry dropped at its expiry."""

    kind = "memory"

    def __init__(self, size: int) -> None:
        self._entries: cachetools.TLRUCache[str, CachedAnswer] = cachetools.TLRUCache(
            maxsize=size, ttu=lambda _key, answer, _now: answer.expires, timer=now
        )

    def get(self, name: str) -> CachedAnswer | None:
        answer = self._entries.get(name)
        if answer is not None and answer.expires <= now():
            return None
        return answer

    def put(self, name: str, answer: CachedAnswer) -> None:
        if answer.expires > now():
            self._entries[name] = answer

    def flush(self, name: str | None = None) -> int:
        if name is None:
            count = len(self._entries)
            self._entries.clear()
            return count
        return int(self._entries.pop(name, None) is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._entries.clear()


class BpfDnsCache:
    """The pinned dns_cache LRU map. The kernel evicts the least recently used names beyond
    [resolver] cache_size; reads by the proxy count as uses. A kernel error never fails a lookup: it
    is logged once and the lookup goes on as a miss."""

    kind = "kernel"

    def __init__(self, dns_map: DnsMap) -> None:
        from sniproxy.kernel.dnsmap import Entry, boottime_ns

        self._map = dns_map
        self._entry = Entry
        self._clock_ns = boottime_ns
        self._warned: set[str] = set()

    @property
    def path(self) -> str:
        return self._map.path

    def get(self, name: str) -> CachedAnswer | None:
        try:
            entry = self._map.lookup(name)
        except ValueError:  # not a possible key (over 255 bytes, not ASCII): never cached
            return None
        except OSError as exc:
            self._warn("lookup", exc)
            return None
        if entry is None or entry.expires_ns <= self._clock_ns():
            return None
        return _answer(entry)

    def put(self, name: str, answer: CachedAnswer) -> None:
        entry = self._entry(
            expires_ns=int(answer.expires * 1e9), inserted_ns=int(answer.inserted * 1e9),
            ttl_ms=max(0, min(int(answer.ttl * 1000), 0xFFFF_FFFF)),
            flags=answer.queried | (_NXDOMAIN if answer.nxdomain else 0),
            v4=answer.v4[:MAX_ADDRESSES], v6=answer.v6[:MAX_ADDRESSES])
        try:
            self._map.update(name, entry)
        except ValueError:
            pass  # not a possible key: such a name is simply not cached
        except OSError as exc:
            self._warn("update", exc)

    def flush(self, name: str | None = None) -> int:
        if name is None:
            return self._map.clear()
        try:
            return int(self._map.delete(name))
        except ValueError:
            return 0  # not a possible key, so not cached

    def entries(self) -> Iterator[tuple[str, CachedAnswer]]:
        """Every entry, expired ones included, without changing the LRU order (for listing)."""
        for name, entry in self._map.items():
            yield name, _answer(entry)

    def close(self) -> None:
        self._map.close()

    def _warn(self, what: str, exc: Exception) -> None:
        if what not in self._warned:  # once per kind of failure, not once per connection
            self._warned.add(what)
            log.warning("dns_cache_error", operation=what, error=str(exc), path=self._map.path)


def _answer(entry) -> CachedAnswer:  # noqa: ANN001 - sniproxy.kernel.dnsmap.Entry
    return CachedAnswer(v4=entry.v4, v6=entry.v6, expires=entry.expires_ns / 1e9,
                        ttl=entry.ttl_ms / 1000, inserted=entry.inserted_ns / 1e9,
                        queried=entry.flags & (QUERIED_A | QUERIED_AAAA),
                        nxdomain=bool(entry.flags & _NXDOMAIN))


def render(entries: list[tuple[str, CachedAnswer]], at: float) -> list[str]:
    """`sniproxy dns` output: one line per live name (sorted), then a summary line."""
    live = sorted((name, answer) for name, answer in entries if answer.expires > at)
    expired = len(entries) - len(live)
    width = max([len("NAME"), *(len(name) for name, _ in live)])
    lines = [f"{'NAME':<{width}}  {'LEFT/TTL':>11}  ADDRESSES"]
    for name, answer in live:
        left = f"{answer.expires - at:.0f}s/{answer.ttl:.0f}s"
        if answer.nxdomain:
            shown = "NXDOMAIN"
        elif answer.negative:
            shown = "no address"
        else:
            shown = ", ".join((*answer.v4, *answer.v6))
        lines.append(f"{name:<{width}}  {left:>11}  {shown}")
    lines.append(f"{len(live)} name(s) cached" + (f", {expired} expired (not served)" if expired else ""))
    return lines

# Where resolved answers live between lookups. DnsCache is the interface the resolver sees;
# MemoryDnsCache keeps answers in-process (cachetools, per-entry TTL). Expired entries are never served.
from __future__ import annotations

import dataclasses
import time
from typing import Protocol

import cachetools


@dataclasses.dataclass(frozen=True)
class CachedAnswer:
    addresses: tuple[str, ...]  # empty: a cached negative answer (NXDOMAIN / no address)
    expires: float  # time.monotonic() deadline
    ttl: float


class DnsCache(Protocol):
    def get(self, name: str) -> CachedAnswer | None: ...
    def put(self, name: str, answer: CachedAnswer) -> None: ...
    def flush(self, name: str | None = None) -> None: ...


class MemoryDnsCache:
    def __init__(self, size: int) -> None:
        self._entries: cachetools.TLRUCache[str, CachedAnswer] = cachetools.TLRUCache(
            maxsize=size, ttu=lambda _key, answer, _now: answer.expires, timer=time.monotonic
        )

    def get(self, name: str) -> CachedAnswer | None:
        answer = self._entries.get(name)
        if answer is not None and answer.expires <= time.monotonic():
            return None
        return answer

    def put(self, name: str, answer: CachedAnswer) -> None:
        self._entries[name] = answer

    def flush(self, name: str | None = None) -> None:
        if name is None:
            self._entries.clear()
        else:
            self._entries.pop(name, None)

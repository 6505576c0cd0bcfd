# Chooses how relayed bytes move: the kernel splice when this process can load it, else userspace
# copy. The decision and its reason are logged once at start; a failure here never stops the proxy.
# Also sets up the XDP allow-list ([xdp]): unlike splice it is a security control, so when it is
# enabled and cannot be attached the proxy does not start (DataPlaneError) rather than run unfiltered.
# And picks the resolver's cache ([resolver] kernel_cache, independent of splice): the pinned dns_cache
# map when asked for and BPF can be used, else memory (logged with the reason).
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import structlog

from sniproxy.config import EbpfConfig, XdpConfig
from sniproxy.relay import Relay

log = structlog.get_logger("sniproxy.dataplane")


@contextlib.contextmanager
def open_relay(config: EbpfConfig) -> Iterator[Relay]:
    """The relay for this configuration, with the local-backend short-circuit when
    [ebpf] shortcut_cgroup is set and loads (either mode: it only moves backend -> client)."""
    with _open_relay(config) as relay, open_shortcut(config) as shortcut:
        relay.shortcut = shortcut
        yield relay


@contextlib.contextmanager
def open_shortcut(config: EbpfConfig) -> Iterator[object | None]:
    """The sock_ops program attached to [ebpf] shortcut_cgroup for the block, detached after; None
    when unset or when it cannot load (logged with the reason: like splice it fails open, the
    connections then take the loopback path)."""
    if config.shortcut_cgroup is None:
        yield None
        return
    try:
        from sniproxy.kernel.probe import probe
        from sniproxy.kernel.shortcut import ShortcutMaps
        from sniproxy.relay.shortcut import Shortcut
    except ImportError as exc:
        log.warning("shortcut", enabled=False, reason=f"kernel data plane not importable: {exc}")
        yield None
        return
    support = probe()
    if not support.available:
        log.warning("shortcut", enabled=False, reason=support.reason)
        yield None
        return
    try:
        maps = ShortcutMaps.load(config.shortcut_cgroup, config.pin_dir)
    except Exception as exc:  # KernelError and anything BCC raises
        log.warning("shortcut", enabled=False, cgroup=config.shortcut_cgroup, reason=str(exc))
        yield None
        return
    try:
        log.info("shortcut", enabled=True, cgroup=config.shortcut_cgroup, programs=maps.prog_ids)
        yield Shortcut(maps, config.shortcut_cgroup)
    finally:
        totals = {}
        with contextlib.suppress(OSError):
            totals = maps.stats().as_dict()
        maps.close()
        log.info("shortcut_detached", cgroup=config.shortcut_cgroup, **totals)


@contextlib.contextmanager
def _open_relay(config: EbpfConfig) -> Iterator[Relay]:
    copy = Relay()
    if not config.splice:
        log.info("relay_mode", mode="copy", reason="splice disabled by [ebpf] splice = false")
        yield copy
        return
    try:
        from sniproxy.kernel.loader import DataPlane
        from sniproxy.kernel.probe import probe
    except ImportError as exc:  # the kernel package itself failed to import: still serve
        log.warning("relay_mode", mode="copy", reason=f"kernel data plane not importable: {exc}")
        yield copy
        return
    support = probe()
    if not support.available:
        log.warning("relay_mode", mode="copy", reason=support.reason)
        yield copy
        return
    try:
        plane = DataPlane.load(config.pin_dir, queue_limit=config.queue_limit)
    except Exception as exc:  # KernelError and anything BCC raises: fall back, say why
        log.warning("relay_mode", mode="copy", reason=f"eBPF splice failed to load: {exc}")
        yield copy
        return
    try:
        log.info("relay_mode", mode="splice", pin_dir=config.pin_dir, splice_after=config.splice_after,
                 queue_limit=config.queue_limit)
        yield Relay(plane.splice_table, splice_after=config.splice_after)
    finally:
        plane.close()


# --------------------------------------------------------------------------------------------------
# XDP allow-list


class DataPlaneError(Exception):
    """A kernel part the configuration requires could not be set up; the proxy must not start."""


class XdpGate:
    """The running XDP allow-list as the server sees it: replace the CIDRs, read the counters."""

    def __init__(self, allow_list: object) -> None:
        self._allow_list = allow_list

    def replace(self, cidrs: Iterable[str]) -> tuple[list[str], list[str]]:
        """Make the live allow-list hold exactly cidrs, in place (adds before deletes). Returns
        (added, removed). Raises DataPlaneError, leaving the previous list whole."""
        from sniproxy.kernel.errors import KernelError
        from sniproxy.kernel.xdp import parse_network

        try:
            diff = self._allow_list.replace(parse_network(c) for c in cidrs)  # type: ignore[attr-defined]
        except KernelError as exc:
            raise DataPlaneError(str(exc)) from exc
        return [str(n) for n in diff.added], [str(n) for n in diff.removed]

    def verdicts(self) -> dict[str, int]:
        return self._allow_list.verdicts().as_dict()  # type: ignore[attr-defined]


@contextlib.contextmanager
def open_xdp(config: XdpConfig, pin_dir: str, ports: Iterable[int]) -> Iterator[XdpGate | None]:
    """Attach the allow-list to config.interfaces gating `ports` (the listeners' ports) for the
    duration of the block; detach on the way out. Yields None when [xdp] is disabled."""
    if not config.enabled:
        yield None
        return
    ports = sorted(set(ports))
    try:
        from sniproxy.kernel.errors import KernelError
        from sniproxy.kernel.probe import probe
        from sniproxy.kernel.xdp import open_filter, parse_network
    except ImportError as exc:
        raise DataPlaneError(f"[xdp] enabled but the kernel layer is not importable: {exc}") from exc
    support = probe()
    if not support.available:
        raise DataPlaneError(f"[xdp] enabled but XDP cannot be used here: {support.reason}")
    try:
        allow_list = open_filter(pin_dir, config.interfaces, config.mode, ports,
                                 [parse_network(c) for c in config.allow])
    except KernelError as exc:
        raise DataPlaneError(f"[xdp] could not attach the allow-list: {exc}") from exc
    try:
        for a in allow_list.attachments:
            if a.replaced:
                log.warning("xdp_replaced_stale", interface=a.ifname, program=a.replaced)
        log.info("xdp_attached", interfaces={a.ifname: a.mode for a in allow_list.attachments},
                 ports=ports, allow=list(config.allow), pin_dir=pin_dir)
        yield XdpGate(allow_list)
    finally:
        verdicts: dict[str, int] = {}
        with contextlib.suppress(KernelError):
            verdicts = allow_list.verdicts().as_dict()
        allow_list.close()
        log.info("xdp_detached", interfaces=list(config.interfaces), **verdicts)


class PinnedAllowList:
    """The live allow-list a running proxy pinned under pin_dir, for `sniproxy allow`. Edits reach
    the kernel at once and are not written to any config file. Kernel failures raise DataPlaneError,
    a malformed CIDR raises ValueError."""

    def __init__(self, pin_dir: str) -> None:
        from sniproxy.kernel.errors import KernelError
        from sniproxy.kernel.xdp import PinnedAllowList as Pinned

        self._kernel_error = KernelError
        try:
            self._map = Pinned(pin_dir)
        except KernelError as exc:
            raise DataPlaneError(str(exc)) from exc

    def _call(self, fn, *args):  # noqa: ANN001, ANN202
        try:
            return fn(*args)
        except self._kernel_error as exc:
            raise DataPlaneError(str(exc)) from exc

    @staticmethod
    def _network(cidr: str):  # noqa: ANN205
        from sniproxy.kernel.xdp import parse_network

        return parse_network(cidr)

    def entries(self) -> list[str]:
        return [str(n) for n in self._call(self._map.entries)]

    def add(self, cidr: str) -> bool:
        return self._call(self._map.add, self._network(cidr))

    def delete(self, cidr: str) -> bool:
        return self._call(self._map.delete, self._network(cidr))

    def in_use(self) -> bool | None:
        """Whether a running filter uses this list; None when this process cannot tell."""
        return self._call(self._map.in_use)

    def verdicts(self) -> dict[str, int] | None:
        verdicts = self._call(self._map.verdicts)
        return None if verdicts is None else verdicts.as_dict()

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> PinnedAllowList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# DNS cache

if TYPE_CHECKING:
    from sniproxy.config import ResolverConfig
    from sniproxy.dnscache import BpfDnsCache, DnsCache


@contextlib.contextmanager
def open_dns_cache(ebpf: EbpfConfig, resolver: ResolverConfig) -> Iterator[DnsCache]:
    """The resolver's cache: the pinned dns_cache map under ebpf.pin_dir (shared by every proxy
    process, kept across restarts) when [resolver] kernel_cache is on and this process may use BPF,
    else in-process memory. [ebpf] splice plays no part. One `dns_cache` log line says which and why;
    like splice, a failure here never stops the proxy."""
    from sniproxy.dnscache import BpfDnsCache, MemoryDnsCache

    def memory(reason: str, warn: bool = True) -> MemoryDnsCache:
        (log.warning if warn else log.info)("dns_cache", mode="memory", reason=reason)
        return MemoryDnsCache(resolver.cache_size)

    cache: DnsCache
    if not resolver.kernel_cache:
        cache = memory("[resolver] kernel_cache = false", warn=False)
    else:
        try:
            from sniproxy.kernel.dnsmap import DnsMap
            from sniproxy.kernel.probe import probe
        except ImportError as exc:
            cache = memory(f"kernel data plane not importable: {exc}")
        else:
            support = probe()
            if not support.available:
                cache = memory(support.reason)
            else:
                try:
                    dns_map = DnsMap.load(ebpf.pin_dir, resolver.cache_size)
                except Exception as exc:  # KernelError and anything BCC raises: fall back, say why
                    cache = memory(f"the dns_cache map failed to load: {exc}")
                else:
                    cache = BpfDnsCache(dns_map)
                    log.info("dns_cache", mode="kernel", path=dns_map.path, size=dns_map.info.max_entries)
    try:
        yield cache
    finally:
        cache.close()


def pinned_dns_cache(pin_dir: str) -> BpfDnsCache:
    """The dns_cache map a proxy pinned under pin_dir, for `sniproxy dns` (no compile, and reads do
    not change the LRU order). Raises DataPlaneError when there is none."""
    from sniproxy.dnscache import BpfDnsCache
    from sniproxy.kernel.dnsmap import DnsMap
    from sniproxy.kernel.errors import KernelError

    try:
        return BpfDnsCache(DnsMap.open(pin_dir))
    except KernelError as exc:
        raise DataPlaneError(str(exc)) from exc

# This host's own addresses, as the kernel's `local` routing table lists them (every address of every
# interface, 127/8 and ::1, and any AnyIP `ip route add local PREFIX` route), in both families. Kept
# current by a netlink subscription to address and route changes that the event loop reads: on any
# change to the local table (or a lost notification) the table is dumped again.
# Invariant: after start(), contains() answers from a dump at least as new as the last change the
# kernel reported to this process; before start() (or when netlink is unavailable) it is False.
from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct

import structlog

__all__ = ["LocalAddresses"]

log = structlog.get_logger("sniproxy.localaddrs")

_NETLINK_ROUTE = 0
_SOL_NETLINK = 270
_NETLINK_GET_STRICT_CHK = 12
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE = 24, 25, 26
_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RT_TABLE_LOCAL = 255
_RTA_DST, _RTA_TABLE = 1, 15
_RTN_LOCAL, _RTN_ANYCAST = 2, 4
# RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
_GROUPS = 0x10 | 0x40 | 0x100 | 0x400
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _messages(data: bytes):  # noqa: ANN202 - yields (type, payload)
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        yield kind, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def _local_route(payload: bytes) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The destination of an RTM_NEWROUTE message when it is a local (or anycast) route of the local
    table, else None."""
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, _proto, _scope, kind, _flags = _RTMSG.unpack_from(payload)
    if kind not in (_RTN_LOCAL, _RTN_ANYCAST) or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    dst = None
    offset = _RTMSG.size
    while offset + _RTATTR.size <= len(payload):
        length, attr = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        value = payload[offset + _RTATTR.size : offset + length]
        if attr == _RTA_TABLE and len(value) == 4:
            table = struct.unpack("=I", value)[0]
        elif attr == _RTA_DST:
            dst = value
        offset += _align(length)
    if table != _RT_TABLE_LOCAL:
        return None
    size = 4 if family == socket.AF_INET else 16
    if dst is None or len(dst) != size:  # the default route's destination is absent: never local
        return None
    return ipaddress.ip_network((int.from_bytes(dst, "big"), dst_len), strict=False)


def _table_changed(data: bytes) -> bool:
    """Does a batch of notifications touch the local table (or any address)?"""
    for kind, payload in _messages(data):
        if kind in (_RTM_NEWADDR, _RTM_DELADDR):
            return True
        if kind in (_RTM_NEWROUTE, _RTM_DELROUTE) and len(payload) >= _RTMSG.size:
            # rtm_table is one byte; a table id above 255 says RT_TABLE_COMPAT (252) here.
            if payload[4] in (_RT_TABLE_LOCAL, 252):
                return True
    return False


def dump_local_networks() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """One RTM_GETROUTE dump of the local table, both families. Raises OSError."""
    found: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE) as sock:
        # Let the kernel filter by table (Linux >= 4.20); without it the dump holds every table and
        # the filter below does the same job.
        try:
            sock.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
        except OSError:
            pass
        sock.bind((0, 0))
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            request = _RTMSG.pack(family, 0, 0, 0, _RT_TABLE_LOCAL, 0, 0, 0, 0)
            header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), _RTM_GETROUTE,
                                    _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
            sock.sendto(header + request, (0, 0))
            done = False
            while not done:
                data = sock.recv(1 << 16)
                for kind, payload in _messages(data):
                    if kind == _NLMSG_DONE:
                        done = True
                    elif kind == _NLMSG_ERROR:
                        code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                        if code == errno.EAFNOSUPPORT:  # IPv6 disabled in this kernel
                            done = True
                            continue
                        raise OSError(code, f"netlink route dump: {os.strerror(code)}")
                    elif kind == _RTM_NEWROUTE:
                        network = _local_route(payload)
                        if network is not None:
                            found.add(network)
    return found


class LocalAddresses:
    """contains(ip): is `ip` an address of this host? See the header for how it stays current."""

    def __init__(self) -> None:
        self._exact: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset()
        self._prefixes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self._watch: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Subscribe first, then dump: a change between the two is then seen twice, never missed."""
        try:
            watch = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)
            try:
                watch.bind((0, _GROUPS))
            except BaseException:
                watch.close()
                raise
        except OSError as exc:
            # Fail closed would refuse every dynamic route; fail open keeps serving and says so once.
            log.error("local_addresses_unavailable", error=str(exc),
                      consequence="dynamic routes are not checked against this host's own addresses")
            return
        self._watch, self._loop = watch, loop
        self.refresh()
        loop.add_reader(watch.fileno(), self._on_change)

    def refresh(self) -> None:
        try:
            networks = dump_local_networks()
        except OSError as exc:
            log.error("local_addresses_refresh_failed", error=str(exc), kept="previous list")
            return
        self._exact = frozenset(n.network_address for n in networks if n.prefixlen == n.max_prefixlen)
        self._prefixes = tuple(n for n in networks if n.prefixlen != n.max_prefixlen)
        log.debug("local_addresses", addresses=sorted(str(a) for a in self._exact),
                  prefixes=[str(n) for n in self._prefixes])

    def _on_change(self) -> None:
        assert self._watch is not None
        changed = False
        while True:
            try:
                data = self._watch.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # ENOBUFS: notifications were lost; dump again
                    log.error("local_addresses_watch_failed", error=str(exc))
                changed = True
                continue
            changed = changed or _table_changed(data)
        if changed:
            self.refresh()

    def contains(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if ip in self._exact:
            return True
        return any(ip.version == n.version and ip in n for n in self._prefixes)

    def close(self) -> None:
        if self._watch is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._watch.fileno())
            self._watch.close()
            self._watch = None

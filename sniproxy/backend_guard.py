# Owns which addresses a dynamic route (a backend host the client chose through its SNI) may reach:
# an explicit deny list of special-purpose ranges, the IPv4 address inside NAT64 and 6to4 addresses,
# and this host's own addresses (supplied by the caller: see localaddrs.py). Pure: no sockets.
# Invariant: an address passes only if neither it nor the IPv4 address it embeds is denied or local,
# unless a network the table lists in allow_private_backends holds it.
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["DENIED_NETWORKS", "BackendGuard", "Refusal", "denied_range", "embedded_ipv4"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Written out instead of trusting ipaddress.is_global, whose tables missed fec0::/10, ::/96 and
# ::ffff:0:0:0/96 and pass NAT64 addresses without looking inside (issue 15). Sources: the IANA IPv4
# and IPv6 Special-Purpose Address Registries, plus deprecated ranges nobody should route to.
DENIED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in (
        ("0.0.0.0/8", "this network (unspecified)"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (and limited broadcast)"),
        ("::/96", "IPv4-compatible, unspecified or loopback"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::ffff:0:0:0/96", "IPv4-translated (SIIT)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments (Teredo, ORCHID, benchmarking...)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing SIDs"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a connection to `ip` really reaches: the low 32 bits of a well-known NAT64
    address (a NAT64 gateway forwards there), bits 16..47 of a 6to4 one. None when none is embedded."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def denied_range(ip: IPAddress) -> str | None:
    """'<network> (<why>)' for the first deny-list range holding `ip`, else None."""
    for network, why in DENIED_NETWORKS:
        if ip.version == network.version and ip in network:
            return f"{network} ({why})"
    return None


@dataclass(frozen=True)
class Refusal:
    outcome: str  # the access log's outcome: "backend_refused" (special range) | "backend_self"
    reason: str


class BackendGuard:
    """The check for one table: its allow_private_backends networks, and a predicate telling whether an
    address belongs to this host (the caller's current view of every interface)."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._allow = tuple(ipaddress.ip_network(n) for n in allow)

    def _allowed_explicitly(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._allow)

    def refusal(self, address: str, is_local: Callable[[IPAddress], bool] | None = None) -> Refusal | None:
        """Why a dynamic route may not connect to `address` (an IP literal), or None if it may."""
        ip = ipaddress.ip_address(address)
        if self._allowed_explicitly(ip):
            return None
        candidates: list[IPAddress] = [ip]
        inner = embedded_ipv4(ip)
        if inner is not None:
            candidates.append(inner)
        for candidate in candidates:
            label = "" if candidate is ip else f"the IPv4 address {candidate} inside "
            if candidate is not ip and self._allowed_explicitly(candidate):
                continue
            rng = denied_range(candidate)
            if rng is not None:
                return Refusal("backend_refused", f"{label}{address} is in {rng}")
            if is_local is not None and is_local(candidate):
                return Refusal("backend_self", f"{label}{address} is an address of this host: the "
                               "proxy would connect to itself")
        return None

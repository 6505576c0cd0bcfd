"""ebpf/xdp_filter.c run by the real kernel on hand-built frames (BPF_PROG_TEST_RUN): a table of good,
odd and truncated packets with the verdict and the counter each must produce; the LPM allow-list; the
in-place replace; pins and the C/ctypes struct mirrors. No interface is touched here (test_xdp_netns.py
attaches to veths)."""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import json
import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from sniproxy.kernel import xdp
from sniproxy.kernel.errors import KernelError
from sniproxy.kernel.loader import pin_fd
from sniproxy.kernel.probe import probe
from sniproxy.kernel.xdp import XDP_DROP, XDP_PASS, PinnedAllowList, XdpAllowList, parse_network

PORT = 8443
ALLOWED_V4 = "10.1.2.3"
DENIED_V4 = "192.0.2.9"
ALLOWED_V6 = "fd00::1:5"
DENIED_V6 = "2001:db8::9"
ALLOW = ["10.0.0.0/8", "198.51.100.7/32", "fd00::/8"]

# --------------------------------------------------------------------------------------------------
# Frames

MAC_DST, MAC_SRC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
SYN = 0x02


def eth(ethertype: int, payload: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    tags = b"".join(struct.pack("!HH", tpid, 100) for tpid in vlans)
    return MAC_DST + MAC_SRC + tags + struct.pack("!H", ethertype) + payload


def tcp(dport: int, sport: int = 40000, flags: int = SYN) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(dport: int, sport: int = 40000, data: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def icmp_echo() -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"


def ipv4(src: str, l4: bytes, proto: int = 6, frag: int = 0, options: bytes = b"",
         dst: str = "10.9.9.9") -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), 7, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return head + options + l4


def ipv6(src: str, l4: bytes, nexthdr: int = 6, ext: tuple[tuple[int, bytes], ...] = (),
         dst: str = "fd00::9") -> bytes:
    """ext: (header type, body) pairs in order; each body is already padded to its length."""
    chain = b""
    types = [t for t, _ in ext] + [nexthdr]
    for (_t, body), following in zip(ext, types[1:]):
        chain += bytes([following]) + body
    first = types[0]
    return (struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(l4), first, 64,
                        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
            + chain + l4)


HOP, ROUTING, FRAGMENT, DSTOPTS, AH = 0, 43, 44, 60, 51


def opts(units: int = 0) -> bytes:
    """Body of a hop-by-hop / destination options header: 8 * (units + 1) bytes minus next-header."""
    return bytes([units]) + bytes(6 + 8 * units)  # hdr ext len, then PadN-free zero padding


def frag6(offset: int, more: bool) -> bytes:
    return b"\x00" + struct.pack("!HI", (offset << 3) | int(more), 42)


def ah() -> bytes:
    return bytes([4]) + bytes(22)  # (4 + 2) * 4 = 24 bytes with the next-header byte


def arp() -> bytes:
    return eth(0x0806, struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_SRC,
                                   bytes([192, 0, 2, 9]), b"\0" * 6, bytes([10, 9, 9, 9])))


V4, V6, VLAN_Q, VLAN_AD = 0x0800, 0x86DD, 0x8100, 0x88A8
PASSED, DROPPED, NOT_GATED = "passed", "dropped", "not_gated"

# (id, frame, verdict, counter)
CASES = [
    ("v4 syn allowed", eth(V4, ipv4(ALLOWED_V4, tcp(PORT))), XDP_PASS, PASSED),
    ("v4 syn denied", eth(V4, ipv4(DENIED_V4, tcp(PORT))), XDP_DROP, DROPPED),
    ("v4 ack denied (every segment, not just SYN)", eth(V4, ipv4(DENIED_V4, tcp(PORT, flags=0x10))),
     XDP_DROP, DROPPED),
    ("v4 /32 entry", eth(V4, ipv4("198.51.100.7", tcp(PORT))), XDP_PASS, PASSED),
    ("v4 next to /32 entry", eth(V4, ipv4("198.51.100.8", tcp(PORT))), XDP_DROP, DROPPED),
    ("v4 other port denied", eth(V4, ipv4(DENIED_V4, tcp(22))), XDP_PASS, NOT_GATED),
    ("v4 udp to gated port denied", eth(V4, ipv4(DENIED_V4, udp(PORT), proto=17)), XDP_PASS, NOT_GATED),
    ("v4 icmp denied", eth(V4, ipv4(DENIED_V4, icmp_echo(), proto=1)), XDP_PASS, NOT_GATED),
    ("v4 ip options denied", eth(V4, ipv4(DENIED_V4, tcp(PORT), options=b"\x01" * 40)), XDP_DROP, DROPPED),
    ("v4 ip options allowed", eth(V4, ipv4(ALLOWED_V4, tcp(PORT), options=b"\x01" * 8)), XDP_PASS, PASSED),
    ("v4 first fragment denied", eth(V4, ipv4(DENIED_V4, tcp(PORT), frag=0x2000)), XDP_DROP, DROPPED),
    ("v4 later fragment (no tcp header)", eth(V4, ipv4(DENIED_V4, b"\0" * 16, frag=0x2003)),
     XDP_PASS, NOT_GATED),
    ("v4 tcp too short for ports, denied", eth(V4, ipv4(DENIED_V4, b"\x9c")), XDP_DROP, DROPPED),
    ("v4 tcp too short for ports, allowed", eth(V4, ipv4(ALLOWED_V4, b"\x9c")), XDP_PASS, PASSED),
    ("v4 truncated ip header", eth(V4, ipv4(DENIED_V4, tcp(PORT))[:12]), XDP_PASS, NOT_GATED),
    ("v4 bad ihl", eth(V4, bytes([0x43]) + ipv4(DENIED_V4, tcp(PORT))[1:]), XDP_PASS, NOT_GATED),
    ("802.1Q v4 denied", eth(V4, ipv4(DENIED_V4, tcp(PORT)), vlans=(VLAN_Q,)), XDP_DROP, DROPPED),
    ("802.1Q v4 allowed", eth(V4, ipv4(ALLOWED_V4, tcp(PORT)), vlans=(VLAN_Q,)), XDP_PASS, PASSED),
    ("802.1ad v6 denied", eth(V6, ipv6(DENIED_V6, tcp(PORT)), vlans=(VLAN_AD,)), XDP_DROP, DROPPED),
    ("802.1Q truncated tag", eth(VLAN_Q, b"\x00"), XDP_PASS, NOT_GATED),
    ("two vlan tags: not parsed, passes", eth(V4, ipv4(DENIED_V4, tcp(PORT)), vlans=(VLAN_AD, VLAN_Q)),
     XDP_PASS, NOT_GATED),
    ("arp", arp(), XDP_PASS, NOT_GATED),
    ("bare ethernet header", eth(V4, b""), XDP_PASS, NOT_GATED),
    ("v6 syn allowed", eth(V6, ipv6(ALLOWED_V6, tcp(PORT))), XDP_PASS, PASSED),
    ("v6 syn denied", eth(V6, ipv6(DENIED_V6, tcp(PORT))), XDP_DROP, DROPPED),
    ("v6 other port denied", eth(V6, ipv6(DENIED_V6, tcp(443))), XDP_PASS, NOT_GATED),
    ("v6 udp denied", eth(V6, ipv6(DENIED_V6, udp(PORT), nexthdr=17)), XDP_PASS, NOT_GATED),
    ("v6 icmpv6 with hop-by-hop (MLD)", eth(V6, ipv6(DENIED_V6, b"\x8f" + bytes(7), nexthdr=58,
                                                    ext=((HOP, opts()),))), XDP_PASS, NOT_GATED),
    ("v6 hop+dst+routing then tcp, denied",
     eth(V6, ipv6(DENIED_V6, tcp(PORT), ext=((HOP, opts(1)), (DSTOPTS, opts()), (ROUTING, opts())))),
     XDP_DROP, DROPPED),
    ("v6 ext headers then tcp, allowed", eth(V6, ipv6(ALLOWED_V6, tcp(PORT), ext=((HOP, opts()),))),
     XDP_PASS, PASSED),
    ("v6 ah then tcp, denied", eth(V6, ipv6(DENIED_V6, tcp(PORT), ext=((AH, ah()),))), XDP_DROP, DROPPED),
    ("v6 first fragment, denied", eth(V6, ipv6(DENIED_V6, tcp(PORT), ext=((FRAGMENT, frag6(0, True)),))),
     XDP_DROP, DROPPED),
    ("v6 later fragment", eth(V6, ipv6(DENIED_V6, bytes(16), ext=((FRAGMENT, frag6(3, False)),))),
     XDP_PASS, NOT_GATED),
    ("v6 chain longer than followed, denied: source decides",
     eth(V6, ipv6(DENIED_V6, tcp(PORT), ext=((DSTOPTS, opts()),) * 9)), XDP_DROP, DROPPED),
    ("v6 chain longer than followed, allowed",
     eth(V6, ipv6(ALLOWED_V6, tcp(PORT), ext=((DSTOPTS, opts()),) * 9)), XDP_PASS, PASSED),
    ("v6 ext header cut short, denied", eth(V6, ipv6(DENIED_V6, b"", nexthdr=6, ext=((HOP, opts()),))[:-4]),
     XDP_DROP, DROPPED),
    ("v6 truncated header", eth(V6, ipv6(DENIED_V6, tcp(PORT))[:30]), XDP_PASS, NOT_GATED),
    # The trie is keyed by family: an IPv6 source whose first bytes equal an allowed IPv4 prefix, or an
    # IPv4-mapped IPv6 address of an allowed IPv4 host, is not let in by the IPv4 entry.
    ("v6 source with a v4 prefix's bytes", eth(V6, ipv6("a00::1", tcp(PORT))), XDP_DROP, DROPPED),
    ("v4-mapped v6 source", eth(V6, ipv6("::ffff:10.1.2.3", tcp(PORT))), XDP_DROP, DROPPED),
]


@pytest.fixture(scope="module")
def pin_dir() -> str:
    return f"/sys/fs/bpf/sniproxy-test-xdpf-{os.getpid()}"


@pytest.fixture(scope="module")
def gate(pin_dir: str) -> Iterator[XdpAllowList]:
    support = probe()
    assert support.available, f"kernel data plane unavailable here: {support.reason}"
    loaded = XdpAllowList.load(pin_dir, [PORT, 9443], [parse_network(c) for c in ALLOW])
    try:
        yield loaded
    finally:
        loaded.close()
        assert not os.path.exists(pin_dir), f"{pin_dir} left behind"


@pytest.fixture
def allow_list(gate: XdpAllowList) -> Iterator[XdpAllowList]:
    gate.replace(parse_network(c) for c in ALLOW)
    yield gate
    gate.replace(parse_network(c) for c in ALLOW)


@pytest.mark.parametrize("frame, verdict, counter", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_frame_verdict_and_counter(allow_list: XdpAllowList, frame: bytes, verdict: int, counter: str):
    before = allow_list.verdicts().as_dict()
    assert allow_list.run(frame) == verdict
    after = allow_list.verdicts().as_dict()
    # Exactly one counter moves, by one.
    assert {k: after[k] - before[k] for k in after} == {k: int(k == counter) for k in after}


def test_every_truncation_of_a_gated_frame_is_handled(allow_list: XdpAllowList):
    """Each prefix of a VLAN-tagged IPv6 SYN with extension headers: never aborted, never a pass of
    a denied source that reached the ports, and only PASS or DROP (bounds checks hold everywhere)."""
    frame = eth(V6, ipv6(DENIED_V6, tcp(PORT), ext=((HOP, opts()), (FRAGMENT, frag6(0, True)))),
                vlans=(VLAN_Q,))
    for n in range(14, len(frame) + 1):
        assert allow_list.run(frame[:n]) in (XDP_PASS, XDP_DROP), n
    assert allow_list.run(frame) == XDP_DROP


def test_lpm_longest_prefix_and_whole_family(allow_list: XdpAllowList):
    allow_list.replace([parse_network("10.1.0.0/16"), parse_network("::/0")])
    run = lambda src: allow_list.run(eth(V4, ipv4(src, tcp(PORT))))  # noqa: E731
    assert run("10.1.0.0") == run("10.1.255.255") == XDP_PASS
    assert run("10.2.0.0") == run("10.0.255.255") == XDP_DROP
    # ::/0 lets every IPv6 source in and no IPv4 one.
    assert allow_list.run(eth(V6, ipv6(DENIED_V6, tcp(PORT)))) == XDP_PASS
    assert run("0.0.0.0") == XDP_DROP


def test_only_listed_ports_are_gated(gate: XdpAllowList):
    assert gate.ports() == [PORT, 9443]
    assert gate.run(eth(V4, ipv4(DENIED_V4, tcp(9443)))) == XDP_DROP
    assert gate.run(eth(V4, ipv4(DENIED_V4, tcp(9444)))) == XDP_PASS


def test_replace_reports_the_difference_and_keeps_the_rest(allow_list: XdpAllowList):
    diff = allow_list.replace(parse_network(c) for c in ["10.0.0.0/8", "192.0.2.0/24", "fd00::/8"])
    assert [str(n) for n in diff.added] == ["192.0.2.0/24"]
    assert [str(n) for n in diff.removed] == ["198.51.100.7/32"]
    assert [str(n) for n in allow_list.entries()] == ["10.0.0.0/8", "192.0.2.0/24", "fd00::/8"]
    assert allow_list.replace(parse_network(c) for c in ["10.0.0.0/8", "192.0.2.0/24", "fd00::/8"]) \
        == xdp.AllowDiff((), ())
    assert allow_list.run(eth(V4, ipv4(DENIED_V4, tcp(PORT)))) == XDP_PASS


def test_replace_refuses_an_empty_list(allow_list: XdpAllowList):
    with pytest.raises(KernelError, match="empty"):
        allow_list.replace([])
    assert [str(n) for n in allow_list.entries()] == ALLOW


def test_failed_replace_takes_its_additions_back(allow_list: XdpAllowList):
    """More entries than the trie holds: the kernel refuses one addition; the old list stays whole."""
    too_many = [ipaddress.IPv4Network((0x0B000000 + (i << 8), 24)) for i in range(xdp.XDP_MAX_ALLOW + 1)]
    with pytest.raises(KernelError):
        allow_list.replace(too_many)
    assert [str(n) for n in allow_list.entries()] == ALLOW


def test_replace_in_place_never_opens_or_closes_the_gate(allow_list: XdpAllowList):
    """While another thread swaps between two lists that both hold A and neither holds D, every one of
    A's packets passes and every one of D's is dropped (adds land before deletes)."""
    lists = [[parse_network(c) for c in ("10.0.0.0/8", "192.0.2.0/25")],
             [parse_network(c) for c in ("10.1.2.3/32", "192.0.2.128/25", "fd00::/8")]]
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            allow_list.replace(lists[swaps % 2])
            swaps += 1

    a = eth(V4, ipv4(ALLOWED_V4, tcp(PORT)))
    d = eth(V4, ipv4("198.51.100.7", tcp(PORT)))  # only in ALLOW, never in either swapped list
    thread = threading.Thread(target=swap)
    thread.start()
    verdicts_a: list[int] = []
    verdicts_d: list[int] = []
    try:
        # Until 3000 of each and at least 20 swaps: how many swaps a fixed number of runs overlaps
        # depends on how the GIL is shared (it was once 10 in 6000 runs on a loaded machine).
        deadline = time.monotonic() + 60
        while swaps < 1 and time.monotonic() < deadline:  # D is allowed until the first swap is done
            time.sleep(0.001)
        while (len(verdicts_a) < 3000 or swaps <= 20) and time.monotonic() < deadline:
            verdicts_a.append(allow_list.run(a))
            verdicts_d.append(allow_list.run(d))
    finally:
        stop.set()
        thread.join()
    assert swaps > 20
    assert set(verdicts_a) == {XDP_PASS}
    assert set(verdicts_d) == {XDP_DROP}


def test_maps_are_pinned_and_readable_by_path(gate: XdpAllowList, pin_dir: str):
    assert sorted(os.listdir(pin_dir)) == ["ip_whitelist", "xdp_ports", "xdp_stats"]
    with PinnedAllowList(pin_dir) as pinned:
        assert pinned.entries() == gate.entries()
        assert pinned.verdicts().as_dict() == gate.verdicts().as_dict()
        assert pinned.in_use()  # the loaded program references this map
    dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{pin_dir}/xdp_stats"],
                                     check=True, capture_output=True, text=True).stdout)
    # -j prints raw bytes plus a "formatted" object that BTF gives field names
    assert set(dump[0]["formatted"]["values"][0]["value"]) == {"passed", "dropped", "not_gated"}


def test_pinned_allow_list_edits_reach_the_program(allow_list: XdpAllowList, pin_dir: str):
    frame = eth(V4, ipv4(DENIED_V4, tcp(PORT)))
    with PinnedAllowList(pin_dir) as pinned:
        assert pinned.add(parse_network("192.0.2.0/24"))
        assert not pinned.add(parse_network("192.0.2.0/24"))
        assert allow_list.run(frame) == XDP_PASS
        assert pinned.delete(parse_network("192.0.2.0/24"))
        assert not pinned.delete(parse_network("192.0.2.0/24"))
        assert allow_list.run(frame) == XDP_DROP


def test_pinned_allow_list_refuses_a_missing_or_foreign_pin(gate: XdpAllowList):
    with pytest.raises(KernelError, match="no allow-list pinned"):
        PinnedAllowList(f"/sys/fs/bpf/sniproxy-test-none-{os.getpid()}")
    foreign = f"/sys/fs/bpf/sniproxy-test-foreign-{os.getpid()}"
    os.makedirs(foreign)
    try:
        pin_fd(gate.fds["xdp_stats"], f"{foreign}/ip_whitelist")  # a per-CPU array under that name
        with pytest.raises(KernelError, match="not a sniproxy ip_whitelist map"):
            PinnedAllowList(foreign)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{foreign}/ip_whitelist")
        os.rmdir(foreign)


def test_load_replaces_stale_pins_and_close_is_idempotent():
    pin = f"/sys/fs/bpf/sniproxy-test-xdps-{os.getpid()}"
    first = XdpAllowList.load(pin, [1], [parse_network("10.0.0.0/8")])
    try:
        # A second load over the first one's pins (as after a crash) takes the pins over.
        second = XdpAllowList.load(pin, [1], [parse_network("192.0.2.0/24")])
        try:
            with PinnedAllowList(pin) as pinned:
                assert [str(n) for n in pinned.entries()] == ["192.0.2.0/24"]
        finally:
            second.close()
            second.close()
        assert not os.path.exists(pin)
    finally:
        first.close()
    assert not os.path.exists(pin)


def test_load_refuses_an_empty_allow_list_or_no_ports():
    pin = f"/sys/fs/bpf/sniproxy-test-xdpe-{os.getpid()}"
    with pytest.raises(KernelError, match="empty"):
        XdpAllowList.load(pin, [1], [])
    with pytest.raises(KernelError, match="ports"):
        XdpAllowList.load(pin, [], [parse_network("10.0.0.0/8")])
    assert not os.path.exists(pin)


def _btf_struct(pin_path: str, name: str) -> dict:
    show = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned", pin_path],
                                     check=True, capture_output=True, text=True).stdout)
    btf = json.loads(subprocess.run(["bpftool", "-j", "btf", "dump", "id", str(show["btf_id"])],
                                    check=True, capture_output=True, text=True).stdout)
    return next(t for t in btf["types"] if t.get("kind") == "STRUCT" and t.get("name") == name)


@pytest.mark.parametrize("name, pinned", [("ip_whitelist_key", "ip_whitelist"), ("xdp_verdicts", "xdp_stats")])
def test_ctypes_mirrors_match_btf(gate: XdpAllowList, pin_dir: str, name: str, pinned: str):
    mirror = xdp.MIRRORS[name]
    btf = _btf_struct(f"{pin_dir}/{pinned}", name)
    assert btf["size"] == ct.sizeof(mirror)
    assert [(m["name"], m["bits_offset"] // 8) for m in btf["members"]] == \
        [(f, getattr(mirror, f).offset) for f, _ in mirror._fields_]

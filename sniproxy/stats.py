# `sniproxy stats`: what the kernel counted, read from the maps a splice-mode proxy pinned under
# pin_dir (the proxy itself is never contacted): totals from traffic_stats, the top handed-off
# connections by bytes from splice_slots/splice_state, named by their sockets' addresses (sock_diag). Invariant: read-only; no map is written.
from __future__ import annotations

import ctypes as ct
import errno
import json
import os
import socket
import struct
import sys
import time
from typing import Any, TextIO

from sniproxy.kernel import maps
from sniproxy.kernel.dnsmap import map_info, obj_get
from sniproxy.kernel.errors import KernelError

_TCP_LISTEN = 10
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3


class StatsError(Exception):
    """The pinned maps cannot be read; the message says why and what to check."""


def _open(pin_dir: str, name: str, value_size: int | None) -> int:
    path = os.path.join(pin_dir, name)
    try:
        fd = obj_get(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise StatsError(f"no {name} map pinned at {path}: is the proxy running with "
                             f"[ebpf] splice = true and this pin_dir?") from None
        raise StatsError(f"opening {path} failed: {exc.strerror} (reading pinned maps needs root, "
                         f"or CAP_BPF and read access to {pin_dir})") from None
    size = map_info(fd).value_size
    if value_size is not None and size != value_size:
        os.close(fd)
        # A proxy of another version pinned a different layout: refuse rather than misread it.
        raise StatsError(f"{path} holds {size}-byte values, this sniproxy expects {value_size}")
    return fd


def _tcp_sockets() -> tuple[dict[int, tuple[str, str]], set[tuple[str, int]]]:
    """{socket cookie: (local, remote)} of this network namespace's TCP sockets, and the listening
    (address, port) pairs, from one NETLINK_SOCK_DIAG dump per address family."""
    sockets: dict[int, tuple[str, str]] = {}
    listening: set[tuple[str, int]] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + bytes(48)
        header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                             _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           _NETLINK_SOCK_DIAG) as nl:
            nl.send(header + request)
            done = False
            while not done:
                data = nl.recv(1 << 16)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == _NLMSG_DONE or length < 16:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        raise OSError(-struct.unpack_from("=i", data, offset + 16)[0], "sock_diag dump failed")
                    msg = offset + 16  # struct inet_diag_msg
                    _family, state = struct.unpack_from("=BB", data, msg)
                    sport, dport = struct.unpack_from(">HH", data, msg + 4)
                    width = 4 if family == socket.AF_INET else 16
                    src = socket.inet_ntop(family, data[msg + 8:msg + 8 + width])
                    dst = socket.inet_ntop(family, data[msg + 24:msg + 24 + width])
                    low, high = struct.unpack_from("=II", data, msg + 44)
                    local = f"[{src}]:{sport}" if width == 16 else f"{src}:{sport}"
                    remote = f"[{dst}]:{dport}" if width == 16 else f"{dst}:{dport}"
                    if state == _TCP_LISTEN:
                        listening.add((src, sport))
                    else:
                        sockets[low | high << 32] = (local, remote)
                    offset += (length + 3) & ~3
    return sockets, listening


def _is_accepted(local: str, listening: set[tuple[str, int]]) -> bool:
    """A socket whose local address:port is a listener's was accepted: the client side. The kernel
    never gives an outgoing connection a local port that a listener holds."""
    host, _, port = local.rpartition(":")
    host = host.strip("[]")
    return any(int(port) == lport and laddr in (host, "0.0.0.0", "::") for laddr, lport in listening)


def collect_shortcut(pin_dir: str, top: int = 10) -> dict[str, Any] | None:
    """The local-backend short-circuit's part ([ebpf] shortcut_cgroup), or None when its maps are
    not pinned: totals, and the registered connections (backend end, proxy end, whether captured,
    the bytes the sk_msg program redirected to the client)."""
    from sniproxy.kernel import shortcut

    if not os.path.exists(os.path.join(pin_dir, "shortcut_stats")):
        return None
    fds: list[int] = []
    try:
        stats_fd = _open(pin_dir, "shortcut_stats", ct.sizeof(shortcut.ShortcutStats))
        fds.append(stats_fd)
        conns_fd = _open(pin_dir, "shortcut_conns", ct.sizeof(shortcut.ShortcutConn))
        fds.append(conns_fd)
        totals = shortcut.read_stats(stats_fd).as_dict()
        entries = shortcut.entries(conns_fd)
    except OSError as exc:
        raise StatsError(f"reading the shortcut maps under {pin_dir} failed: {exc}") from None
    finally:
        for fd in fds:
            os.close(fd)
    states = {shortcut.EXPECTED: "expected", shortcut.CAPTURED: "captured", shortcut.REFUSED: "refused"}
    connections = []
    for key, conn in entries:
        backend_end, proxy_end = shortcut.key_text(key)
        connections.append({"backend": backend_end, "proxy": proxy_end, "state": states.get(conn.state, "?"),
                            "redir_bytes": conn.redir_bytes, "redir_msgs": conn.redir_msgs,
                            "drop_msgs": conn.drop_msgs})
    connections.sort(key=lambda c: c["redir_bytes"], reverse=True)
    return {"totals": totals, "connections_total": len(connections),
            "captured": sum(c["state"] == "captured" for c in connections), "connections": connections[:top]}


def collect(pin_dir: str, top: int = 10) -> dict[str, Any]:
    """Everything `sniproxy stats` prints, as plain data."""
    short = collect_shortcut(pin_dir, top)
    if short is not None and not os.path.exists(os.path.join(pin_dir, "traffic_stats")):
        return {"pin_dir": pin_dir, "shortcut": short}  # [ebpf] splice = false, shortcut on
    report = _collect_splice(pin_dir, top)
    if short is not None:
        report["shortcut"] = short
    return report


def _collect_splice(pin_dir: str, top: int) -> dict[str, Any]:
    fds: list[int] = []
    try:
        traffic_fd = _open(pin_dir, "traffic_stats", ct.sizeof(maps.TrafficStats))
        fds.append(traffic_fd)
        slots_fd = _open(pin_dir, "splice_slots", ct.sizeof(ct.c_uint32))
        fds.append(slots_fd)
        state_fd = _open(pin_dir, "splice_state", ct.sizeof(maps.SpliceSlot))
        fds.append(state_fd)
        sock_fd = _open(pin_dir, "sock_map", None)  # only its keys are counted
        fds.append(sock_fd)
        traffic = maps.read_traffic(traffic_fd)
        per_socket: dict[int, maps.SpliceSlot] = {}
        index = ct.c_uint32()
        for cookie in maps.keys_u64(slots_fd):
            value = maps.SpliceSlot()
            # else: removed while we read
            if maps.lookup(slots_fd, ct.c_uint64(cookie), index) and maps.lookup(state_fd, index, value):
                per_socket[cookie] = value
        spliced_sockets = len(maps.keys_u64(sock_fd))
    except OSError as exc:
        raise StatsError(f"reading the maps under {pin_dir} failed: {exc}") from None
    finally:
        for fd in fds:
            os.close(fd)

    try:
        addresses, listening = _tcp_sockets()
    except OSError:  # addresses are a convenience: the counters stand on their own
        addresses, listening = {}, set()
    now = time.monotonic_ns()  # CLOCK_MONOTONIC, as bpf_ktime_get_ns
    connections = []
    seen: set[int] = set()
    for cookie, stats in per_socket.items():
        if cookie in seen:
            continue
        pair = [cookie] + ([stats.peer] if stats.peer in per_socket else [])
        seen.update(pair)
        sides = []
        for c in pair:
            s = per_socket[c]
            local, remote = addresses.get(c, (None, None))
            role = None
            if local is not None and listening:
                role = "client" if _is_accepted(local, listening) else "backend"
            fields = s.as_dict()
            for internal in ("cookie", "peer", "start_ns", "last_ns", "release_at", "toward_base", "worker"):
                del fields[internal]
            sides.append({"role": role, "cookie": c, "local": local, "remote": remote, **fields})
        sides.sort(key=lambda side: side["role"] != "client")
        roles = {side["role"]: side for side in sides}
        known = set(roles) == {"client", "backend"}
        connections.append({
            "bytes": sum(side["rx_bytes"] for side in sides),
            "bytes_up": roles["client"]["rx_bytes"] if known else None,
            "bytes_down": roles["backend"]["rx_bytes"] if known else None,
            "age_seconds": round(max(0, now - min(per_socket[c].start_ns for c in pair)) / 1e9, 3),
            "idle_seconds": round(max(0, now - max(per_socket[c].last_ns for c in pair)) / 1e9, 3),
            "sides": sides,
        })
    connections.sort(key=lambda item: item["bytes"], reverse=True)
    totals = traffic.as_dict()
    return {
        "pin_dir": pin_dir,
        # Every byte that arrived on a spliced socket is counted once: redirected by the kernel, or
        # left to the proxy to forward (the ClientHello, read before splicing, is not in here).
        "totals": {"bytes": totals["redir_bytes"] + totals["pass_bytes"], **totals},
        "spliced_sockets": spliced_sockets,
        "connections_total": len(connections),
        "connections": connections[:top],
    }


def open_counter_maps(pin_dir: str) -> dict[str, int]:
    """The maps kernel_counters() reads, opened once: a process that drops its privileges after
    start (a metrics endpoint) opens them before, since the pins are then out of its reach."""
    fds: dict[str, int] = {}
    try:
        fds["traffic_stats"] = _open(pin_dir, "traffic_stats", ct.sizeof(maps.TrafficStats))
        fds["splice_slots"] = _open(pin_dir, "splice_slots", ct.sizeof(ct.c_uint32))
        fds["sock_map"] = _open(pin_dir, "sock_map", None)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def kernel_counters(pin_dir: str, opened: dict[str, int] | None = None) -> dict[str, Any]:
    """The cheap part of collect(), for a metrics scrape: traffic_stats totals, the sockets in
    sock_map, and the handed-off pairs splice_slots tracks (two entries each). No sock_diag dump,
    nothing per connection kept. `opened`: fds from open_counter_maps (kept open)."""
    fds: list[int] = []
    try:
        if opened is None:
            opened = open_counter_maps(pin_dir)
            fds = list(opened.values())
        traffic_fd, slots_fd, sock_fd = opened["traffic_stats"], opened["splice_slots"], opened["sock_map"]
        traffic = maps.read_traffic(traffic_fd).as_dict()
        tracked = len(maps.keys_u64(slots_fd))
        sockets = len(maps.keys_u64(sock_fd))
    except OSError as exc:
        raise StatsError(f"reading the maps under {pin_dir} failed: {exc}") from None
    finally:
        for fd in fds:
            os.close(fd)
    return {"traffic": traffic, "sockets": sockets, "pairs": (tracked + 1) // 2}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError(n)


def render_shortcut(short: dict[str, Any]) -> list[str]:
    t = short["totals"]
    lines = [
        f"shortcut        {short['captured']} captured of {short['connections_total']} registered connection(s); "
        f"ever captured {t['captured']}, refused {t['refused']} (map full or insert failed), other "
        f"connections seen in the cgroup {t['foreign']}",
        f"shortcut bytes  {t['redir_bytes']} ({_size(t['redir_bytes'])}) redirected backend -> client in "
        f"{t['redir_msgs']} message(s); refused (client gone) {t['drop_msgs']}",
    ]
    if short["connections"]:
        lines.append(f"{'REDIRECTED':>10} {'STATE':>9}  BACKEND <- PROXY")
        for conn in short["connections"]:
            lines.append(f"{_size(conn['redir_bytes']):>10} {conn['state']:>9}  {conn['backend']} <- {conn['proxy']}")
    return lines


def render(report: dict[str, Any]) -> list[str]:
    if "totals" not in report:
        return [f"pin_dir {report['pin_dir']}", *render_shortcut(report["shortcut"])]
    t = report["totals"]
    lines = [
        f"pin_dir {report['pin_dir']}",
        f"spliced bytes   {t['bytes']} ({_size(t['bytes'])}): redirected by the kernel {t['redir_bytes']}, "
        f"left to the proxy {t['pass_bytes']} (held back {t['held_bytes']})",
        f"packets         redirected {t['redir_pkts']}, passed {t['pass_pkts']}, redirect failures "
        f"{t['redir_fail']}, no peer {t['no_peer_pkts']}, fin {t['fin_pkts']}",
        f"retransmits     {t['trim_pkts']} skb(s) repeating delivered bytes, {t['trim_bytes']} byte(s) "
        f"cut, {t['trim_fail']} uncuttable (connection reset)",
        f"open            {report['connections_total']} connection(s), {report['spliced_sockets']} "
        f"socket(s) in sock_map",
    ]
    if report["connections"]:
        lines.append("")
        lines.append(f"{'BYTES':>10} {'UP':>10} {'DOWN':>10} {'AGE':>8} {'IDLE':>8}  CLIENT -> BACKEND")
        for conn in report["connections"]:
            ends = " -> ".join(side["remote"] or f"cookie {side['cookie']}" for side in conn["sides"])
            lines.append(f"{_size(conn['bytes']):>10} {_size(conn['bytes_up']):>10} "
                         f"{_size(conn['bytes_down']):>10} {conn['age_seconds']:>7.1f}s "
                         f"{conn['idle_seconds']:>7.1f}s  {ends}")
    if report.get("shortcut"):
        lines.append("")
        lines.extend(render_shortcut(report["shortcut"]))
    return lines


def run(pin_dir: str, top: int, as_json: bool, out: TextIO = sys.stdout) -> int:
    """The `stats` command: 0 on success, 1 (with the reason on stderr) when the maps cannot be read."""
    try:
        report = collect(pin_dir, top)
    except (StatsError, KernelError) as exc:
        print(f"sniproxy: {exc}", file=sys.stderr)
        return 1
    if as_json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write("\n".join(render(report)) + "\n")
    return 0

# Loading, pinning and unloading the data plane; BTF field names in bpftool; ctypes mirrors that agree
# with the C structs (through the kernel's BTF); typed errors from the compiler and from the kernel.
from __future__ import annotations

import ctypes as ct
import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sniproxy.kernel import maps
from sniproxy.kernel.errors import KernelError, SpliceUnavailable
from sniproxy.kernel.loader import PINNED_MAPS, DataPlane
from sniproxy.kernel.probe import probe


def _bpftool(*args: str) -> object:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_probe_says_available_here() -> None:
    support = probe()
    assert support.available, support.reason
    assert support.reason.endswith(".")


def test_maps_are_pinned_and_traffic_stats_dump_shows_field_names(dataplane: DataPlane, pin_dir: str) -> None:
    assert sorted(os.listdir(pin_dir)) == sorted(PINNED_MAPS)
    out = subprocess.run(["bpftool", "map", "dump", "pinned", f"{pin_dir}/traffic_stats"],
                         check=True, capture_output=True, text=True).stdout
    for field in ("redir_bytes", "pass_bytes", "held_pkts", "fin_pkts", "events_lost"):
        assert field in out, out[:500]
    shown = _bpftool("map", "show", "pinned", f"{pin_dir}/sock_map")
    assert shown["type"] == "sockhash" and shown["name"] == "sock_map"


def test_ctypes_mirrors_match_btf(dataplane: DataPlane, pin_dir: str) -> None:
    state = _bpftool("map", "show", "pinned", f"{pin_dir}/splice_state")
    btf_ids = {state["btf_id"]}
    # splice_event appears only in the program's BTF (a ring buffer record, not a map value). Other
    # processes on this machine may load splice.c too: take our program (it uses our splice_state).
    btf_ids |= {p["btf_id"] for p in _bpftool("prog", "show")
                if p.get("name") == "splice_verdict" and "btf_id" in p and state["id"] in p.get("map_ids", [])}
    structs = {}
    for btf_id in btf_ids:
        for t in _bpftool("btf", "dump", "id", str(btf_id))["types"]:
            if t.get("kind") == "STRUCT" and t.get("name"):
                structs[t["name"]] = t
    for name, mirror in maps.MIRRORS.items():
        if name == "splice_event" and name not in structs:
            # A ring buffer record: BCC loads no program BTF, so only the size can be checked (below).
            assert ct.sizeof(mirror) == 24
            continue
        assert name in structs, f"struct {name} not in BTF"
        c = structs[name]
        assert c["size"] == ct.sizeof(mirror), name
        c_fields = [(m["name"], m["bits_offset"] // 8) for m in c["members"]]
        py_fields = [(f, getattr(mirror, f).offset) for f, _ in mirror._fields_]
        assert c_fields == py_fields, name


def test_load_twice_replaces_stale_pins_and_close_is_idempotent(tmp_path: Path) -> None:
    pin_dir = f"/sys/fs/bpf/sniproxy-test-{os.getpid()}-reload"
    first = DataPlane.load(pin_dir)
    map_ids = set()
    try:
        map_ids.add(_bpftool("map", "show", "pinned", f"{pin_dir}/sock_map")["id"])
        second = DataPlane.load(pin_dir)  # first still holds its maps: the pins are replaced
        map_ids.add(_bpftool("map", "show", "pinned", f"{pin_dir}/sock_map")["id"])
        assert len(map_ids) == 2
        second.close()
        second.close()
    finally:
        first.close()
        first.close()
    assert not os.path.exists(pin_dir)
    # No program of either load is left (attached programs would keep using those maps).
    left = [p for p in _bpftool("prog", "show") if map_ids & set(p.get("map_ids", []))]
    assert left == []


def test_compile_error_is_a_typed_error_with_the_compiler_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("int splice_verdict(struct __sk_buff *skb) { return undefined_symbol; }\n")
    with pytest.raises(KernelError) as info:
        DataPlane.load(f"/sys/fs/bpf/sniproxy-test-{os.getpid()}-bad", source=bad)
    assert "undefined_symbol" in str(info.value)
    assert not os.path.exists(f"/sys/fs/bpf/sniproxy-test-{os.getpid()}-bad")


def test_socket_after_fin_is_refused_with_a_typed_error(dataplane: DataPlane) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    a.shutdown(socket.SHUT_WR)
    b.recv(1)  # b got the FIN: CLOSE_WAIT
    with pytest.raises(SpliceUnavailable):
        dataplane.splice_table.add_pair(b, a, 0, 0)
    assert dataplane.splice_table.entries() == {"sock_map": 0, "splice_slots": 0}
    for s in (a, b, srv):
        s.close()


def _connected() -> tuple[socket.socket, socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    srv.close()
    return a, b


def test_socket_whose_peer_cannot_follow_keeps_every_byte(dataplane: DataPlane) -> None:
    """a goes into sock_map, b is refused (its peer half-closed): a stays mapped, and what a received
    meanwhile and after is read from it whole and in order (taking it out would purge the psock)."""
    table = dataplane.splice_table
    client, a = _connected()
    backend_peer, b = _connected()
    backend_peer.shutdown(socket.SHUT_WR)
    b.recv(1)  # CLOSE_WAIT: sock_map refuses it
    client.sendall(b"before-")
    with pytest.raises(SpliceUnavailable):
        table.add_pair(a, b, 0, 0)
    assert table.entries() == {"sock_map": 1, "splice_slots": 0}
    client.sendall(b"after")
    client.shutdown(socket.SHUT_WR)
    a.settimeout(5)
    got = b""
    while chunk := a.recv(100):
        got += chunk
    assert got == b"before-after"
    a.close()  # closing it is what takes it out of sock_map
    assert table.entries()["sock_map"] == 0
    for s in (client, backend_peer, b):
        s.close()


def test_bytes_queued_before_insertion_are_redirected_without_more_data(dataplane: DataPlane) -> None:
    """Pitfall: an inserted socket's verdict first runs when more data arrives; a client that sent its
    request early and waits for the answer would wait forever. add_pair kicks the verdict."""
    table = dataplane.splice_table
    client, a = _connected()
    b, backend = _connected()
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.05)  # in a's receive queue before a is in sock_map
    pair = table.add_pair(a, b, 0, 0)
    try:
        backend.settimeout(5)
        assert backend.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
        assert pair.a.redir_bytes == len(b"GET / HTTP/1.1\r\n\r\n")  # the slot is shared memory
    finally:
        for s in (client, a, b, backend):
            s.close()
        table.remove(pair)


def test_hold_event_wakes_only_the_worker_that_added_the_pair(dataplane: DataPlane) -> None:
    """[server] workers: each worker process consumes its own ring (splice_slot.worker picks it). A hold
    on a pair worker 1 added must make ring 1 readable, in worker 1's process, and leave ring 0 alone.
    The child is forked like a worker: it opens its ring after the fork, on a SpliceTable of its own."""
    from sniproxy.kernel.splice import SpliceTable

    client, a = _connected()
    b, backend = _connected()
    parent_ring = dataplane.splice_table.events_fd  # ring 0, consumed in this process
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker"
        result = {}
        try:
            table = SpliceTable(dataplane.fds, dataplane._state, open_events=dataplane._open_events,
                                read_events=dataplane._read_events)
            table.use_worker(1, 2)
            ring = table.events_fd
            pair = table.add_pair(a, b, 0, 0)
            # With a peer that is not in sock_map the verdict holds this socket's bytes
            # (SPLICE_HOLD_NO_PEER). The slot is memory shared with the kernel: no map call.
            pair.a.peer = 1
            client.sendall(b"held")
            result["ring_readable"] = bool(select.select([ring], [], [], 5)[0])
            result["events"] = [[e.cookie, e.reason] for e in table.read_events()]
            result["cookie"] = pair.a_cookie
            for s in (a, b):
                s.close()
            table.remove(pair)
        except BaseException as e:  # reported to the parent, which fails the test
            result["error"] = repr(e)
        finally:
            os.write(report_w, json.dumps(result).encode())
            os._exit(0)
    os.close(report_w)
    with os.fdopen(report_r) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    try:
        assert "error" not in result, result
        assert result["ring_readable"]
        assert result["events"] == [[result["cookie"], maps.HOLD_NO_PEER]]
        assert not select.select([parent_ring], [], [], 0.2)[0], "ring 0 was woken for worker 1's pair"
        assert dataplane.splice_table.read_events() == []
    finally:
        for s in (client, a, b, backend):
            s.close()


def test_worker_limit_matches_the_rings_compiled(dataplane: DataPlane) -> None:
    """[server] workers is capped at the number of splice_eventsN rings splice.c spells out."""
    import re

    from sniproxy.config import MAX_WORKERS
    from sniproxy.kernel.loader import EBPF_DIR, EVENT_RINGS

    header = (EBPF_DIR / "sniproxy.h").read_text()
    source = (EBPF_DIR / "splice.c").read_text()
    (defined,) = re.findall(r"#define SNIPROXY_MAX_WORKERS (\d+)", header)
    assert int(defined) == maps.SNIPROXY_MAX_WORKERS == MAX_WORKERS == len(EVENT_RINGS)
    assert len(re.findall(r"BPF_RINGBUF_OUTPUT\(splice_events\d+,", source)) == MAX_WORKERS
    assert len(re.findall(r"case \d+: return splice_events\d+\.ringbuf_output", source)) == MAX_WORKERS
    assert all(dataplane.fds[name] >= 0 for name in EVENT_RINGS)


def test_configured_queue_limit_reaches_the_verdict(pin_dir: str) -> None:
    """[ebpf] queue_limit is what the verdict reads (the pinned splice_cfg map, as bpftool shows it),
    and the default is the header's SNIPROXY_DEFAULT_QUEUE_LIMIT, so an absent key changes nothing."""
    import re

    import structlog

    from sniproxy.config import EbpfConfig
    from sniproxy.dataplane import open_relay
    from sniproxy.kernel.loader import EBPF_DIR

    header = (EBPF_DIR / "sniproxy.h").read_text()
    (shift,) = re.findall(r"#define SNIPROXY_DEFAULT_QUEUE_LIMIT \(24ULL << (\d+)\)", header)
    assert EbpfConfig().queue_limit == 24 << int(shift) == maps.SNIPROXY_DEFAULT_QUEUE_LIMIT
    config = EbpfConfig(pin_dir=f"{pin_dir}-ql", queue_limit=3 << 20)
    with structlog.testing.capture_logs() as logs, open_relay(config) as relay:
        assert relay.mode == "splice"
        dumped = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                                            os.path.join(config.pin_dir, "splice_cfg")],
                                           capture_output=True, text=True, check=True).stdout)
        value = bytes(int(b, 16) for b in dumped[0]["value"])
        assert int.from_bytes(value[:8], "little") == 3 << 20
    assert [e["queue_limit"] for e in logs if e["event"] == "relay_mode"] == [3 << 20]

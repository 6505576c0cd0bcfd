"""Listening sockets on reload: binding all or nothing, and the supervisor's offers to a worker over a
real SOCK_SEQPACKET pair with SCM_RIGHTS (newest offer wins, nothing taken is left open)."""
from __future__ import annotations

import os
import socket

import pytest

from sniproxy.config import Address, ListenerConfig
from sniproxy.listeners import (ListenerError, LocalBinder, WorkerInbox, WorkerSockets, listener_name,
                                offer, ungated)
from tests.conftest import free_port


def listener(port: int, host: str = "127.0.0.1") -> ListenerConfig:
    return ListenerConfig(bind=Address(host, port), protocol="tls", table="default")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inbox = WorkerInbox(theirs.detach())
    yield ours, inbox
    ours.close()
    inbox.close()


def listening(port: int = 0) -> socket.socket:
    return socket.create_server(("127.0.0.1", port))


def test_offered_sockets_are_the_supervisors_and_the_rest_is_closed(pair):
    ours, inbox = pair
    socks = [listening() for _ in range(3)]
    configs = [listener(s.getsockname()[1]) for s in socks]
    before = open_fds()
    offer(ours.fileno(), 1, [(listener_name(c), s) for c, s in zip(configs, socks)])
    got = inbox.acquire([configs[2], configs[0]])
    assert [g.getsockname() for g in got] == [socks[2].getsockname(), socks[0].getsockname()]
    # The same kernel socket: a client queued on the supervisor's copy is accepted through ours.
    client = socket.create_connection(socks[2].getsockname())
    got[0].settimeout(5)
    conn, _ = got[0].accept()
    conn.close()
    client.close()
    assert open_fds() == before + 2  # the one not asked for was closed
    for g in got:
        g.close()
    for s in socks:
        s.close()


def test_the_newest_offer_wins_and_older_ones_are_closed(pair):
    ours, inbox = pair
    old, new = listening(), listening()
    name = listener_name(listener(5555))
    before = open_fds()
    offer(ours.fileno(), 1, [(name, old)])
    offer(ours.fileno(), 2, [(name, new)])
    (got,) = inbox.acquire([listener(5555)])
    assert got.getsockname() == new.getsockname()
    got.close()
    assert open_fds() == before
    old.close()
    new.close()


def test_a_listener_not_offered_is_an_error_and_nothing_stays_open(pair):
    ours, inbox = pair
    sock = listening()
    before = open_fds()
    offer(ours.fileno(), 1, [(listener_name(listener(1111)), sock)])
    with pytest.raises(ListenerError, match="127.0.0.1:2222: the supervisor offered no socket"):
        inbox.acquire([listener(1111), listener(2222)])
    assert open_fds() == before
    # Nothing is left queued either: the next reload starts clean.
    with pytest.raises(ListenerError):
        inbox.acquire([listener(1111)])
    sock.close()


def test_acquiring_nothing_drains_the_offers(pair):
    ours, inbox = pair
    sock = listening()
    port = sock.getsockname()[1]
    offer(ours.fileno(), 1, [(listener_name(listener(port)), sock)])
    sock.close()
    assert inbox.acquire(()) == []
    # The last reference was the one in flight: the port no longer listens.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_an_offer_larger_than_one_message_arrives_whole(pair):
    ours, inbox = pair
    socks = [socket.socket() for _ in range(450)]  # SCM_MAX_FD is 253 per message
    configs = [listener(10000 + i) for i in range(len(socks))]
    before = open_fds()
    offer(ours.fileno(), 7, [(listener_name(c), s) for c, s in zip(configs, socks)])
    got = inbox.acquire(configs)
    assert [g.fileno() != s.fileno() for g, s in zip(got, socks)] == [True] * len(socks)
    assert [g.family for g in got] == [s.family for s in socks]
    for g in got:
        g.close()
    assert open_fds() == before
    for s in socks:
        s.close()


def test_local_binder_is_all_or_nothing():
    free, taken = free_port(), free_port()
    blocker = listening(taken)
    try:
        with pytest.raises(ListenerError, match=f"cannot bind 127.0.0.1:{taken}: Address already in use"):
            LocalBinder().acquire([listener(free), listener(taken)])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", free), timeout=5)
    finally:
        blocker.close()
    (sock,) = LocalBinder().acquire([listener(free)])
    assert sock.getsockname() == ("127.0.0.1", free)
    sock.close()


def test_worker_sockets_follow_the_listeners_all_or_nothing():
    a, b, c = free_port(), free_port(), free_port()
    sockets = WorkerSockets([listener(a), listener(b)])
    try:
        blocker = listening(c)
        try:
            with pytest.raises(ListenerError, match=f"127.0.0.1:{c}"):
                sockets.update([listener(a), listener(c)])
        finally:
            blocker.close()
        # Nothing changed: a and b still listen.
        assert [s.getsockname()[1] for _, s in sockets.shared()] == [a, b]
        added, removed = sockets.update([listener(c), listener(a)])
        assert (added, removed) == ([f"127.0.0.1:{c}"], [f"127.0.0.1:{b}"])
        # Config order, for a worker started from the new file.
        assert [name for name, _ in sockets.shared()] == [f"127.0.0.1:{c}", f"127.0.0.1:{a}"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", b), timeout=5)
        socket.create_connection(("127.0.0.1", c), timeout=5).close()
    finally:
        sockets.close()


def test_worker_sockets_are_plain_binds_a_second_binder_is_refused():
    """No SO_REUSEPORT: another process of the same user cannot join the port and take clients."""
    a = free_port()
    sockets = WorkerSockets([listener(a)])
    try:
        ((_, sock),) = sockets.shared()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        with pytest.raises(OSError, match="Address already in use"):
            WorkerSockets([listener(a)])
        intruder = socket.socket()
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="Address already in use"):
            intruder.bind(("127.0.0.1", a))
        intruder.close()
    finally:
        sockets.close()


def test_ungated_names_the_first_port_the_xdp_filter_does_not_guard():
    assert ungated([listener(443)], None) is None
    assert ungated([listener(443), listener(443, "::1")], frozenset({443, 80})) is None
    why = ungated([listener(443), listener(8080)], frozenset({443}))
    assert why is not None and "127.0.0.1:8080: port 8080 is not among the ports" in why

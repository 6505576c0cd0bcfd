"""sniproxy.balancer: least connections with a round-robin tie-break, hold-down after a failed connect,
health-check results, and forgetting backends a reload dropped. Time is passed in, so no waiting."""

from __future__ import annotations

import math
from collections import Counter

from sniproxy.balancer import Balancer

A, B, C = "10.0.0.1:443", "10.0.0.2:443", "unix:/run/c.sock"


def pick(balancer: Balancer, backends, now: float = 0.0) -> str:
    return balancer.order(backends, now)[0]


def test_short_connections_alternate():
    bal = Balancer(hold_down=10)
    picks = []
    for _ in range(6):
        first = pick(bal, (A, B))
        bal.connected(first)
        bal.released(first)
        picks.append(first)
    assert picks == [A, B, A, B, A, B]


def test_least_connections_wins_over_rotation():
    bal = Balancer(hold_down=10)
    for _ in range(3):
        bal.connected(A)  # three long connections on A
    picks = []
    for _ in range(3):
        first = pick(bal, (A, B))
        bal.connected(first)
        picks.append(first)
    assert picks == [B, B, B]  # B catches up to A's three before A gets another
    assert Counter(pick(bal, (A, B)) for _ in range(4)) == Counter({A: 2, B: 2})  # even again: rotate


def test_order_holds_every_backend_once():
    bal = Balancer(hold_down=10)
    bal.failed(B, now=0.0, reason="refused")
    for _ in range(5):
        order = bal.order((A, B, C), 1.0)
        assert sorted(order) == sorted((A, B, C))
        assert order[-1] == B


def test_hold_down_expires():
    bal = Balancer(hold_down=5)
    assert bal.failed(A, now=100.0, reason="refused") is True
    assert {pick(bal, (A, B), now) for now in (100.0, 102.0, 104.9) for _ in range(2)} == {B}
    assert {pick(bal, (A, B), 105.1) for _ in range(2)} == {A, B}
    assert not bal.is_down(A, 105.1)
    # A failure while held (every backend was down, so it was tried) extends the hold, logged once.
    assert bal.failed(A, now=200.0, reason="refused") is True
    assert bal.failed(A, now=201.0, reason="refused") is False
    assert bal.is_down(A, 205.5) and not bal.is_down(A, 206.1)


def test_all_down_still_tried_earliest_rotation():
    bal = Balancer(hold_down=5)
    bal.failed(A, now=0.0, reason="x")
    bal.failed(B, now=0.0, reason="x")
    assert sorted(bal.order((A, B), 1.0)) == [A, B]


def test_zero_hold_down_never_skips():
    bal = Balancer(hold_down=0)
    assert bal.failed(A, now=0.0, reason="x") is False
    assert not bal.is_down(A, 0.0)


def test_success_lifts_hold():
    bal = Balancer(hold_down=5)
    bal.failed(A, now=0.0, reason="x")
    assert bal.connected(A) is True  # tried anyway (all down) and it worked: log backend_up
    assert not bal.is_down(A, 1.0)
    assert bal.state(A).open == 1
    assert bal.connected(A) is False


def test_health_check_down_until_a_check_passes():
    bal = Balancer(hold_down=5)
    assert bal.checked(A, ok=False, now=0.0, reason="refused") is True
    assert bal.state(A).down_until == math.inf
    assert bal.is_down(A, 1e9)
    assert bal.failed(A, now=1.0, reason="refused") is False  # a connect failure keeps the longer hold
    assert bal.state(A).down_until == math.inf
    assert bal.checked(A, ok=False, now=2.0) is False
    assert bal.checked(A, ok=True, now=3.0) is True
    assert not bal.is_down(A, 3.0)
    assert bal.checked(A, ok=True, now=4.0) is False


def test_released_never_below_zero():
    bal = Balancer(hold_down=5)
    bal.released(A)
    bal.connected(A)
    bal.released(A)
    bal.released(A)
    assert bal.state(A).open == 0


def test_retain_keeps_open_backends():
    bal = Balancer(hold_down=5)
    bal.connected(A)
    bal.failed(B, now=0.0, reason="x")
    bal.order((A, B), 0.0)
    bal.retain({C})
    assert bal.state(A).open == 1  # still counted: its connection will call released()
    assert not bal.is_down(B, 0.0)  # forgotten
    bal.released(A)
    bal.retain({C})
    assert bal.state(A).open == 0

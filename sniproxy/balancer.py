# Owns the choice among a route's backends when the config lists several, and what this process
# knows about each: the connections it has open to it, and whether it is held down (its last connect
# failed less than hold_down ago, or its last health check failed). Pure: no sockets, no asyncio; the
# caller passes the time. Invariant: order() returns every backend it is given exactly once, held-down
# ones last, so they are tried only after every other one failed, never dropped outright.
#
# Policy: least connections, ties broken round-robin. A TLS proxy's connections live from milliseconds
# (one API call) to hours (HTTP/2, WebSockets); round-robin alone keeps sending every other connection
# to a backend that already holds the long ones, while the fewest-open rule evens them out, and among
# equals (short connections: usually all at 0) the rotation spreads them like round-robin does.
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["BackendState", "Balancer"]

B = TypeVar("B", bound=Hashable)


@dataclass
class BackendState:
    open: int = 0  # connections of this process currently relayed to it
    down_until: float = 0.0  # monotonic seconds; math.inf: until a health check passes
    reason: str | None = None  # why it is down (the last connect or check error)

    def down(self, now: float) -> bool:
        return self.down_until > now


class Balancer:
    def __init__(self, hold_down: float) -> None:
        self.hold_down = hold_down
        self._states: dict[Hashable, BackendState] = {}
        self._next: dict[tuple[Hashable, ...], int] = {}  # round-robin position per backend list

    def state(self, backend: Hashable) -> BackendState:
        state = self._states.get(backend)
        if state is None:
            state = self._states[backend] = BackendState()
        return state

    def order(self, backends: Sequence[B], now: float) -> list[B]:
        """The order to try `backends` in for one new connection: up before held down, then fewest
        open connections, then the rotation (which advances by one each call)."""
        group = tuple(backends)
        if len(group) < 2:
            return list(group)
        start = self._next.get(group, 0) % len(group)
        self._next[group] = start + 1
        rotated = group[start:] + group[:start]

        def rank(backend: B) -> tuple[bool, int]:
            state = self._states.get(backend)
            return (False, 0) if state is None else (state.down(now), state.open)

        return sorted(rotated, key=rank)  # stable: equals keep the rotation's order

    def connected(self, backend: Hashable) -> bool:
        """A connection to `backend` succeeded (and is now open). True when it was down until now."""
        state = self.state(backend)
        state.open += 1
        was_down = state.down_until > 0
        state.down_until, state.reason = 0.0, None
        return was_down

    def released(self, backend: Hashable) -> None:
        """A connection counted by connected() ended."""
        state = self._states.get(backend)
        if state is not None and state.open > 0:
            state.open -= 1

    def failed(self, backend: Hashable, now: float, reason: str) -> bool:
        """A connect to `backend` failed: hold it down for hold_down seconds (a longer hold from a
        failed health check stays). True when it was up until now."""
        state = self.state(backend)
        was_up = not state.down(now)
        state.down_until = max(state.down_until, now + self.hold_down)
        state.reason = reason
        return was_up and state.down(now)

    def checked(self, backend: Hashable, ok: bool, now: float, reason: str | None = None) -> bool:
        """A health check's result: a failure holds the backend down until a check passes, a pass
        lifts any hold. True when that changed whether it is down."""
        state = self.state(backend)
        was_down = state.down(now)
        if ok:
            state.down_until, state.reason = 0.0, None
        else:
            state.down_until, state.reason = math.inf, reason
        return was_down != state.down(now)

    def is_down(self, backend: Hashable, now: float) -> bool:
        state = self._states.get(backend)
        return state is not None and state.down(now)

    def retain(self, backends: Iterable[Hashable]) -> None:
        """Forget backends the config no longer names (a reload), except while connections to them
        are open: released() must still find their count."""
        keep = set(backends)
        for backend in [b for b, s in self._states.items() if b not in keep and s.open == 0]:
            del self._states[backend]
        for group in [g for g in self._next if not set(g) <= keep]:
            del self._next[group]

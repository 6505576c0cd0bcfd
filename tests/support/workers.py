# Workers share the listening sockets: which one takes a connection is a race, so one burst of
# connections may all go to one worker. Tests that need every worker to serve repeat the burst until
# each has, and fail only when one never does (a worker that does not accept).
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


async def until_every_worker_served(proxy: Any, burst: Callable[[], Awaitable[int]], workers: int = 2,
                                    rounds: int = 20,
                                    where: Callable[[dict[str, Any]], bool] = lambda e: True,
                                    ) -> list[dict[str, Any]]:
    """Run burst() (it returns how many connections it made, each ending in one access event) until
    the access events that satisfy `where` name every worker, at most `rounds` times; returns those
    events. The events logged before the first burst count too."""
    expected = len(proxy.access_events())
    for _ in range(rounds):
        expected += await burst()
        events = [e for e in await proxy.access(count=expected) if where(e)]
        if {e.get("worker") for e in events} >= set(range(workers)):
            return events
    raise AssertionError(f"after {rounds} bursts, not every one of {workers} workers served a connection: "
                         f"{sorted({e.get('worker') for e in events}, key=str)}")

# Mixed traffic with faults (garbage, slowloris, NXDOMAIN, refused, aborted and stalled backends,
# SIGHUP every second) against one proxy, in copy and splice mode; afterwards nothing is lost or
# leaked. SOAK_SECONDS sets the length (60 here; `make soak` runs longer).
from __future__ import annotations

import os

import pytest

from tests.support.soak import run_soak

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))


@pytest.mark.slow
@pytest.mark.parametrize("relay_mode", ["copy", "splice"])
async def test_soak(start_proxy, ca, dns, relay_mode):
    report = await run_soak(start_proxy, ca, dns, duration=SOAK_SECONDS)
    print(f"\nsoak {relay_mode}: {report.connections} connections, {report.completed} verified transfers, "
          f"outcomes {dict(report.outcomes)}, fds {report.fds}, RSS {report.rss[0] >> 20}->"
          f"{report.rss[1] >> 20} MiB, maps {report.map_entries}")
    assert report.problems == []
    assert report.completed > 100 and sum(report.scenarios.values()) == report.connections
    if relay_mode == "splice":
        assert report.map_entries == {"sock_map": 0, "splice_slots": 0}

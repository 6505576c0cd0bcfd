# Fixtures for tests that need the real kernel data plane: root, BCC, bpffs. Nothing here is mocked;
# when the kernel path cannot load, these tests FAIL (they never skip). The DataPlane is compiled
# once per session into /sys/fs/bpf/sniproxy-test-<pid> and always closed and unpinned afterwards.
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import uvloop

from sniproxy.kernel.loader import DataPlane
from sniproxy.kernel.probe import probe
from sniproxy.relay import Relay


def pytest_asyncio_loop_factories(config, item):  # noqa: ANN001 - pytest-asyncio hook
    # The server runs on uvloop: so do these tests.
    return {"uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kernel" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def pin_dir() -> str:
    return f"/sys/fs/bpf/sniproxy-test-{os.getpid()}"


@pytest.fixture(scope="session")
def dataplane(pin_dir: str) -> Iterator[DataPlane]:
    support = probe()
    assert support.available, f"kernel data plane unavailable here: {support.reason}"
    plane = DataPlane.load(pin_dir)
    try:
        yield plane
    finally:
        plane.close()
        assert not os.path.exists(pin_dir), f"{pin_dir} left behind"


@pytest.fixture
def relay(dataplane: DataPlane) -> Iterator[Relay]:
    """A relay that hands every connection to the kernel at once (splice_after = 0): these tests are
    about the kernel path; test_handoff.py covers the hand-off at other points."""
    dataplane.set_queue_limit(0)
    yield Relay(dataplane.splice_table, splice_after=0)
    dataplane.set_queue_limit(0)
    # Every test leaves the per-connection maps empty.
    assert dataplane.splice_table.entries() == {"sock_map": 0, "splice_slots": 0}

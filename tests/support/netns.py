# Network namespaces for tests: enter one from the calling thread (sockets made inside stay in it),
# and create a private one that is always deleted. Invariant: a thread leaves netns() in the namespace
# it entered with, or the process aborts (a test process in a stray namespace would poison the rest).
from __future__ import annotations

import contextlib
import ctypes as ct
import os
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the calling thread in network namespace `name` for the block. A socket keeps the namespace
    it was created in, so sockets made here talk from inside it after the block ends."""
    libc = ct.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ct.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would poison the test process
                os.abort()
    finally:
        os.close(own)
        os.close(target)


@contextlib.contextmanager
def private_netns(name: str) -> Iterator[str]:
    """A new namespace `name` with lo up, deleted afterwards whatever happened (its devices and
    sockets go with it)."""
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)

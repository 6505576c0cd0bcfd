# Throwaway cgroup v2 directories for the short-circuit tests: made under the cgroup2 mount found in
# /proc/mounts (the hybrid layout here mounts it at /sys/fs/cgroup/unified), named per test run so
# concurrent runs in other worktrees never share one, and always removed (processes moved out first).
from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

from sniproxy.kernel.shortcut import cgroup2_mounts

_RUN = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
_counter = itertools.count()


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def sweep_stale() -> list[str]:
    """Remove what a killed test run (SIGKILL, or a timeout's SIGTERM that skipped the finally
    blocks) left: its empty cgroups and its short-circuit pins (which keep the sk_msg program and
    the maps loaded; the sock_ops attachment is a bpf_link and died with the process). Only names
    this module and the short-circuit tests make, and only of processes that no longer exist."""
    removed = []
    for name in os.listdir(root()):
        m = re.fullmatch(r"sniproxy-test-[a-z]+-(\d+)-[0-9a-f]{6}-\d+", name)
        if m and not _alive(int(m[1])):
            path = os.path.join(root(), name)
            with contextlib.suppress(OSError):
                if not pids(path):
                    os.rmdir(path)
                    removed.append(path)
    for name in os.listdir("/sys/fs/bpf"):
        m = re.fullmatch(r"sniproxy-test-(\d+)-(.*shortcut.*|nginx|dp2?)", name)
        if m and not _alive(int(m[1])):
            path = os.path.join("/sys/fs/bpf", name)
            with contextlib.suppress(OSError):
                for pin in os.listdir(path):
                    if pin.startswith("shortcut_"):
                        os.unlink(os.path.join(path, pin))
                os.rmdir(path)
                removed.append(path)
    return removed


def root() -> str:
    mounts = cgroup2_mounts()
    assert mounts, "no cgroup2 hierarchy mounted (no cgroup2 line in /proc/mounts)"
    return mounts[0]


def own_cgroup() -> str:
    """This process's cgroup v2 directory."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(root(), line.strip()[3:].lstrip("/"))
    raise AssertionError("no cgroup v2 line in /proc/self/cgroup")


def pids(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(p) for p in f.read().split()]


def move(pid: int, path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


@contextlib.contextmanager
def temporary(label: str = "sc") -> Iterator[str]:
    """A fresh cgroup for the block; on the way out every process left in it is moved back to this
    process's cgroup (and killed if it was a child the test forgot), then it is removed."""
    path = os.path.join(root(), f"sniproxy-test-{label}-{_RUN}-{next(_counter)}")
    home = own_cgroup()
    os.mkdir(path)
    try:
        yield path
    finally:
        for _ in range(50):
            left = pids(path)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    move(pid, home)
            time.sleep(0.02)
        os.rmdir(path)
        assert not os.path.exists(path)


@contextlib.contextmanager
def inside(path: str) -> Iterator[None]:
    """Run the block with this process in cgroup `path` (sockets made meanwhile belong to it), then
    move back: a listener created here puts its accepted sockets under path's sock_ops programs."""
    home = own_cgroup()
    move(os.getpid(), path)
    try:
        yield
    finally:
        move(os.getpid(), home)


def spawn(path: str, argv: list[str], **kwargs) -> subprocess.Popen:  # noqa: ANN003
    """Start argv as a process in cgroup `path` from its first instruction (it moves itself in
    before exec), as a systemd service would be."""
    return subprocess.Popen(["/bin/sh", "-c", f'echo $$ > "{path}/cgroup.procs" && exec "$@"', "sh", *argv],
                            **kwargs)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

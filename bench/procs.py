# Processes and /proc for the benchmark: starting children that die with the harness, stopping a
# child's whole process group, and reading CPU time, RSS and kernel socket memory.
# Invariant: only process groups this harness created are ever signalled.
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from typing import IO

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the harness dies without cleaning up (kill -9)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def stop_group(proc: subprocess.Popen, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Stops a child started with start_new_session=True and everything in its process group."""
    pgid = proc.pid
    if proc.poll() is None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # workers that outlived their master
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def communicate_with_rusage(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """Reads stdout to the end and reaps the child with wait4: (output, its CPU seconds)."""
    chunks: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args[0]} did not finish within {timeout} s")
        time.sleep(0.05)
    reader.join(5)
    return "".join(chunks), usage.ru_utime + usage.ru_stime


def readline(stream: IO[str], timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise TimeoutError(f"no line within {timeout} s")
    return box[0]


def tree(root: int) -> list[int]:
    """root and all its descendants (nginx's workers, our proxy's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def sockstat() -> dict[str, int]:
    """TCP line of /proc/net/sockstat, with `mem` converted from pages to bytes."""
    out: dict[str, int] = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                out = {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    out["mem_bytes"] = out.get("mem", 0) * PAGE
    return out


def slab_bytes() -> int:
    """Kernel slab memory (socket structs, inodes, dentries live there; buffers are in sockstat mem)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1]) * 1024
    return 0


def nofile_hard() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile(want: int = 65536) -> int:
    """fd limit for this process and every child: `want` if root may raise the hard limit
    (CAP_SYS_RESOURCE), else the hard limit as it is. Returns the limit in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, PermissionError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard

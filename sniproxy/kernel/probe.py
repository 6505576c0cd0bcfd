# What this kernel and process can do for the splice data plane, with one human sentence when it
# cannot. Invariant: probe() has no side effects (it mounts, loads and attaches nothing).
from __future__ import annotations

import dataclasses
import importlib.util
import os

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


@dataclasses.dataclass(frozen=True)
class KernelSupport:
    available: bool
    reason: str


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _has(caps: int, cap: int) -> bool:
    return bool(caps >> cap & 1)


def probe() -> KernelSupport:
    caps = _effective_caps()
    if not ((_has(caps, CAP_BPF) or _has(caps, CAP_SYS_ADMIN)) and _has(caps, CAP_NET_ADMIN)):
        return KernelSupport(False, "The process lacks CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; run as root or grant them.")
    if importlib.util.find_spec("bcc") is None:
        return KernelSupport(False, "The bcc Python module is not importable; install python3-bpfcc and use a venv with system site-packages.")
    release = os.uname().release
    if not (os.path.isdir(f"/lib/modules/{release}/build") or os.path.exists("/sys/kernel/kheaders.tar.xz")):
        return KernelSupport(False, f"Kernel headers for {release} are missing (/lib/modules/{release}/build); install linux-headers.")
    with open("/proc/filesystems") as f:
        has_bpffs = any(line.split()[-1] == "bpf" for line in f if line.strip())
    if not has_bpffs:
        return KernelSupport(False, "This kernel has no bpf filesystem, so maps cannot be pinned.")
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[2] == "bpf" for line in f)
    if not mounted and not _has(caps, CAP_SYS_ADMIN):
        return KernelSupport(False, "No bpffs is mounted and the process lacks CAP_SYS_ADMIN to mount one on /sys/fs/bpf.")
    return KernelSupport(True, "The kernel splice data plane can be used.")

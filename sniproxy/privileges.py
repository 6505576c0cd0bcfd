# Drops the process's capabilities once the listeners are bound and the BPF objects are loaded, so an
# exploited proxy holds none of the powers it only needed at start. Invariant: after drop_capabilities()
# the effective, permitted, inheritable, ambient and bounding sets hold only `keep`.
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_LAST_FALLBACK = 40

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAP_SETPCAP = 8

_NAMES = {CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN",
          CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@dataclasses.dataclass(frozen=True)
class Dropped:
    before: int  # effective mask before
    after: int
    kept: tuple[str, ...]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _last_cap() -> int:
    try:
        return int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        return _CAP_LAST_FALLBACK


def effective_mask() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def drop_capabilities(keep: frozenset[int] = frozenset()) -> Dropped:
    """Reduce every capability set to `keep` (a subset of what the process has). Raises OSError."""
    libc = _libc()
    before = effective_mask()
    if before == 0:
        return Dropped(0, 0, ())
    # The bounding set first: dropping from it needs CAP_SETPCAP, which the capset below removes.
    if before & (1 << CAP_SETPCAP):
        for cap in range(_last_cap() + 1):
            if cap not in keep and libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err != 22:  # EINVAL: the kernel does not know this capability
                    raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    mask = sum(1 << cap for cap in keep) & before
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    after = effective_mask()
    return Dropped(before, after, tuple(_NAMES.get(c, str(c)) for c in sorted(keep) if after & (1 << c)))

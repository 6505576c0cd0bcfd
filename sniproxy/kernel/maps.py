# ctypes mirrors of the structs in ebpf/sniproxy.h and typed access to BPF maps by fd.
# Invariant: every struct here has the same size and field offsets as its C twin (checked against the
# kernel's BTF by tests/kernel/test_maps.py); this module and loader.py are the only bpf syscall users.
from __future__ import annotations

import ctypes as ct
import errno
import os

import functools


@functools.cache
def _libbcc() -> ct.CDLL:
    """libbcc's map syscall wrappers (loaded with use_errno); imported on first use so that importing
    this module works where bcc is absent (probe() reports that)."""
    import bcc.libbcc

    return bcc.libbcc.lib

SNIPROXY_MAX_SOCKETS = 65536
SNIPROXY_DEFAULT_QUEUE_LIMIT = 24 << 20
SNIPROXY_MAX_WORKERS = 16
SNIPROXY_HOLD_ALL = 0xFFFF_FFFF_FFFF_FFFF

HOLD_NO_PEER = 1
HOLD_QUEUE = 2
HOLD_REDIRECT_FAIL = 3
HOLD_BROKEN = 4

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class TrafficStats(ct.Structure):
    _fields_ = [
        ("redir_bytes", ct.c_uint64),
        ("redir_pkts", ct.c_uint64),
        ("redir_fail", ct.c_uint64),
        ("pass_bytes", ct.c_uint64),
        ("pass_pkts", ct.c_uint64),
        ("held_bytes", ct.c_uint64),
        ("held_pkts", ct.c_uint64),
        ("no_peer_pkts", ct.c_uint64),
        ("fin_pkts", ct.c_uint64),
        ("unknown_pkts", ct.c_uint64),
        ("events", ct.c_uint64),
        ("events_lost", ct.c_uint64),
        ("trim_pkts", ct.c_uint64),
        ("trim_bytes", ct.c_uint64),
        ("trim_fail", ct.c_uint64),
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}


class SpliceSlot(ct.Structure):
    _fields_ = [
        ("cookie", ct.c_uint64),
        ("peer", ct.c_uint64),
        ("release_at", ct.c_uint64),
        ("toward_base", ct.c_uint64),
        ("start_ns", ct.c_uint64),
        ("worker", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("rx_bytes", ct.c_uint64),
        ("redir_bytes", ct.c_uint64),
        ("pass_bytes", ct.c_uint64),
        ("held_pkts", ct.c_uint64),
        ("last_ns", ct.c_uint64),
        ("drain_ns", ct.c_uint64),
        ("drain_acked", ct.c_uint64),
        ("drain_room", ct.c_uint64),
        ("next_seq", ct.c_uint32),
        ("seq_known", ct.c_uint32),
        ("trim_bytes", ct.c_uint64),
        ("broken", ct.c_uint64),
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_ if name != "pad"}


class SpliceCfg(ct.Structure):
    _fields_ = [("queue_limit", ct.c_uint64)]


class SpliceEvent(ct.Structure):
    _fields_ = [
        ("cookie", ct.c_uint64),
        ("pass_bytes", ct.c_uint64),
        ("reason", ct.c_uint32),
        ("len", ct.c_uint32),
    ]


# C struct name -> mirror, for the BTF comparison test.
MIRRORS: dict[str, type[ct.Structure]] = {
    "traffic_stats": TrafficStats,
    "splice_slot": SpliceSlot,
    "splice_cfg": SpliceCfg,
    "splice_event": SpliceEvent,
}


class MapError(OSError):
    """A bpf map syscall failed; errno is the kernel's."""


def _check(res: int, what: str) -> None:
    if res >= 0:
        return
    err = ct.get_errno() if res == -1 else -res
    if err == 0:
        err = ct.get_errno() or errno.EIO
    raise MapError(err, f"{what}: {os.strerror(err)}")


def update(fd: int, key: ct._SimpleCData | ct.Structure, value: ct._SimpleCData | ct.Structure,
           flags: int = BPF_ANY, what: str = "bpf_map_update_elem") -> None:
    _check(_libbcc().bpf_update_elem(fd, ct.byref(key), ct.byref(value), flags), what)


def delete(fd: int, key: ct._SimpleCData | ct.Structure, what: str = "bpf_map_delete_elem") -> bool:
    """Delete key; False when it was not there."""
    res = _libbcc().bpf_delete_elem(fd, ct.byref(key))
    if res < 0:
        err = ct.get_errno() if res == -1 else -res
        if err == errno.ENOENT:
            return False
        _check(res, what)
    return True


def lookup(fd: int, key: ct._SimpleCData | ct.Structure, value: ct._SimpleCData | ct.Structure) -> bool:
    """Fill value; False when key is absent."""
    res = _libbcc().bpf_lookup_elem(fd, ct.byref(key), ct.byref(value))
    if res < 0:
        err = ct.get_errno() if res == -1 else -res
        if err == errno.ENOENT:
            return False
        _check(res, "bpf_map_lookup_elem")
    return True


def update_batch(fd: int, keys: ct.Array, values: ct.Array, what: str = "bpf_map_update_batch") -> None:
    """One bpf() call for several elements (BPF_MAP_UPDATE_BATCH): all or an error naming the map."""
    count = ct.c_uint32(len(keys))
    res = _libbcc().bpf_map_update_batch(fd, ct.byref(keys), ct.byref(values), ct.byref(count), None)
    _check(res, what)


def delete_batch(fd: int, keys: ct.Array, what: str = "bpf_map_delete_batch") -> int:
    """One bpf() call deleting several keys (BPF_MAP_DELETE_BATCH). Stops at the first absent key
    (ENOENT): returns how many were deleted."""
    count = ct.c_uint32(len(keys))
    res = _libbcc().bpf_map_delete_batch(fd, ct.byref(keys), ct.byref(count), None)
    if res < 0:
        err = ct.get_errno() if res == -1 else -res
        if err != errno.ENOENT:
            _check(res, what)
    return count.value


def keys_u64(fd: int) -> list[int]:
    """All u64 keys of a hash map (for checks and cleanup; not for hot paths)."""
    out: list[int] = []
    key = ct.c_uint64(0)
    nxt = ct.c_uint64(0)
    res = _libbcc().bpf_get_first_key(fd, ct.byref(nxt), ct.sizeof(nxt))
    while res == 0:
        out.append(nxt.value)
        key.value = nxt.value
        res = _libbcc().bpf_get_next_key(fd, ct.byref(key), ct.byref(nxt))
    return out


def ncpus() -> int:
    """Possible CPUs: the number of slots of a per-CPU map value."""
    with open("/sys/devices/system/cpu/possible") as f:
        total = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            total += int(hi or lo) - int(lo) + 1
        return total


def read_traffic(fd: int) -> TrafficStats:
    """traffic_stats summed over all CPUs."""
    n = ncpus()
    values = (TrafficStats * n)()
    key = ct.c_uint32(0)
    res = _libbcc().bpf_lookup_elem(fd, ct.byref(key), ct.byref(values))
    _check(res, "traffic_stats lookup")
    total = TrafficStats()
    for name, _ in TrafficStats._fields_:
        setattr(total, name, sum(getattr(v, name) for v in values))
    return total

# The pinned dns_cache map (ebpf/dns_cache.c): the only code that creates, opens, reads or writes it.
# Invariant: a map is used only after its type, key size and value size were checked against the
# ctypes mirrors below, so a stale pin of another layout is replaced (with a warning), never misread.
# Pins are opened with BPF_OBJ_GET only (never by map id), so CAP_BPF is enough: no CAP_SYS_ADMIN.
from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno
import functools
import os
import platform
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import structlog

from .errors import KernelError
from .loader import _captured_stderr, ensure_bpffs

log = structlog.get_logger("sniproxy.kernel.dnsmap")

EBPF_DIR = Path(__file__).resolve().parents[2] / "ebpf"
DNS_SRC = EBPF_DIR / "dns_cache.c"
MAP_NAME = "dns_cache"
PROG_NAME = "dns_lookup"

# ebpf/dns_cache.h
DNS_NAME_LEN = 256
DNS_MAX_ADDRS = 8
DNS_V4_LEN = 16
DNS_V6_LEN = 46
DNS_CACHE_VERSION = 1
DNS_F_A = 0x1
DNS_F_AAAA = 0x2
DNS_F_NXDOMAIN = 0x4

# uapi/linux/bpf.h
_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_GET_NEXT_KEY = 4
_BPF_OBJ_PIN = 6
_BPF_OBJ_GET = 7
_BPF_PROG_TEST_RUN = 10
_BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_TYPE_LRU_HASH = 9
_BPF_ANY = 0
_XDP_PASS = 2
# When a pin exists the program is compiled against a stand-in map of this size (then swapped out).
_STAND_IN_SIZE = 1


class DnsKey(ct.Structure):
    _fields_ = [("name", ct.c_char * DNS_NAME_LEN)]


class DnsEntry(ct.Structure):
    _fields_ = [
        ("expires_ns", ct.c_uint64),
        ("inserted_ns", ct.c_uint64),
        ("ttl_ms", ct.c_uint32),
        ("version", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("n_v4", ct.c_uint8),
        ("n_v6", ct.c_uint8),
        ("v4", (ct.c_char * DNS_V4_LEN) * DNS_MAX_ADDRS),
        ("v6", (ct.c_char * DNS_V6_LEN) * DNS_MAX_ADDRS),
    ]


# C struct name -> mirror, for the BTF comparison test.
MIRRORS: dict[str, type[ct.Structure]] = {"dns_key": DnsKey, "dns_entry": DnsEntry}


class _Lookup(ct.Structure):
    """The dns_lookup program's packet: the key in, the entry out (see ebpf/dns_cache.c)."""

    _fields_ = [("key", DnsKey), ("entry", DnsEntry)]


class _TestRunAttr(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32), ("data_size_in", ct.c_uint32),
                ("data_size_out", ct.c_uint32), ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32), ("ctx_size_in", ct.c_uint32),
                ("ctx_size_out", ct.c_uint32), ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
                ("_pad", ct.c_uint32)]


class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("_pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
                ("btf_vmlinux_value_type_id", ct.c_uint32), ("netns_dev", ct.c_uint64),
                ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("_rest", ct.c_uint8 * 20)]


class Entry(NamedTuple):
    """One decoded dns_entry. Times are CLOCK_BOOTTIME nanoseconds."""

    expires_ns: int
    inserted_ns: int
    ttl_ms: int
    flags: int
    v4: tuple[str, ...]
    v6: tuple[str, ...]


def boottime_ns() -> int:
    """The clock of every time in the map: system-wide (so shared across processes), unaffected by
    wall-clock steps, and running through suspend (so a TTL is real elapsed time)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@functools.cache
def _libc() -> ct.CDLL:
    return ct.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ct.Structure | ct.Array) -> int:
    """The bpf syscall; -errno on failure (callers decide which errors are normal)."""
    res = _libc().syscall(_NR_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    return res if res >= 0 else -ct.get_errno()


def _check(res: int, what: str) -> int:
    if res < 0:
        raise OSError(-res, f"{what}: {os.strerror(-res)}")
    return res


def obj_get(path: str) -> int:
    """A new fd for the BPF object pinned at path (BPF_OBJ_GET)."""
    buf = ct.create_string_buffer(path.encode())
    attr = (ct.c_uint64 * 2)()
    attr[0] = ct.addressof(buf)
    return _check(_bpf(_BPF_OBJ_GET, attr), f"opening {path}")


def obj_pin(fd: int, path: str) -> int:
    """Pin fd at path (BPF_OBJ_PIN); 0 or -errno (EEXIST: someone pinned there first)."""
    buf = ct.create_string_buffer(path.encode())
    attr = (ct.c_uint64 * 2)()
    attr[0] = ct.addressof(buf)
    attr[1] = fd  # bpf_fd in the low half, file_flags 0
    return _bpf(_BPF_OBJ_PIN, attr)


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    attr = (ct.c_uint64 * 2)()
    attr[0] = fd | (ct.sizeof(info) << 32)  # bpf_fd, info_len
    attr[1] = ct.addressof(info)
    _check(_bpf(_BPF_OBJ_GET_INFO_BY_FD, attr), "BPF_OBJ_GET_INFO_BY_FD")
    return info


def layout_problem(info: MapInfo) -> str | None:
    """Why a map cannot be used as dns_cache (None: it can). max_entries is not part of the layout."""
    want = (BPF_MAP_TYPE_LRU_HASH, ct.sizeof(DnsKey), ct.sizeof(DnsEntry))
    have = (info.type, info.key_size, info.value_size)
    if have == want:
        return None
    return (f"type {info.type}, key {info.key_size} B, value {info.value_size} B; this build needs "
            f"type {want[0]} (lru_hash), key {want[1]} B, value {want[2]} B")


def encode_name(name: str) -> bytes:
    raw = name.encode("ascii")
    if not raw or len(raw) >= DNS_NAME_LEN or b"\0" in raw:
        raise ValueError(f"{name!r} cannot be a dns_cache key")
    return raw


_HEAD = struct.Struct("<QQIBBBB")
_V4_AT = DnsEntry.v4.offset
_V6_AT = DnsEntry.v6.offset


def _decode(raw: bytes) -> Entry | None:
    """An Entry from a dns_entry's bytes (struct unpacking: several times faster than walking the
    ctypes arrays, and this runs on every cache hit); None for another layout version."""
    expires, inserted, ttl_ms, version, flags, n4, n6 = _HEAD.unpack_from(raw)
    if version != DNS_CACHE_VERSION:
        return None
    v4 = tuple(raw[at:at + DNS_V4_LEN].partition(b"\0")[0].decode()
               for at in range(_V4_AT, _V4_AT + DNS_V4_LEN * min(n4, DNS_MAX_ADDRS), DNS_V4_LEN))
    v6 = tuple(raw[at:at + DNS_V6_LEN].partition(b"\0")[0].decode()
               for at in range(_V6_AT, _V6_AT + DNS_V6_LEN * min(n6, DNS_MAX_ADDRS), DNS_V6_LEN))
    return Entry(expires, inserted, ttl_ms, flags, v4, v6)


def _encode(entry: Entry) -> DnsEntry:
    e = DnsEntry(expires_ns=entry.expires_ns, inserted_ns=entry.inserted_ns, ttl_ms=entry.ttl_ms,
                 version=DNS_CACHE_VERSION, flags=entry.flags,
                 n_v4=min(len(entry.v4), DNS_MAX_ADDRS), n_v6=min(len(entry.v6), DNS_MAX_ADDRS))
    for i, address in enumerate(entry.v4[:DNS_MAX_ADDRS]):
        e.v4[i].value = address.encode()
    for i, address in enumerate(entry.v6[:DNS_MAX_ADDRS]):
        e.v6[i].value = address.encode()
    return e


@dataclasses.dataclass
class _Loaded:
    bpf: object
    map_fd: int  # BCC's table fd: cleanup() closes it
    prog_fd: int

    def close(self) -> None:
        self.bpf.cleanup()  # type: ignore[attr-defined]  # closes map and program fds


class DnsMap:
    """An open dns_cache map. `load()` (the proxy) also has the dns_lookup program, so its reads mark
    entries as recently used; `open()` (the CLI) reads with plain syscalls and changes no LRU order.
    Not thread-safe: one lookup buffer per instance (the proxy uses it from its event loop)."""

    def __init__(self, path: str, fd: int, loaded: _Loaded | None = None) -> None:
        self.path = path
        self.fd = fd
        self._loaded = loaded
        self.info = map_info(fd)
        problem = layout_problem(self.info)
        if problem is not None:
            raise KernelError(f"{path} is not a usable dns_cache", problem)
        # The lookup packet lives in a bytearray so the key goes in and the entry comes out by
        # slicing: cheaper than ctypes field access on the hot path.
        self._mem = bytearray(ct.sizeof(_Lookup))
        self._anchor = ct.c_char.from_buffer(self._mem)  # keeps the buffer's address fixed
        mem_at = ct.addressof(self._anchor)
        self._run = _TestRunAttr(prog_fd=loaded.prog_fd if loaded else 0,
                                 data_size_in=ct.sizeof(_Lookup), data_size_out=ct.sizeof(_Lookup),
                                 data_in=mem_at, data_out=mem_at, repeat=1)
        self._run_at = ct.c_void_p(ct.addressof(self._run))  # a bare int would pass as a 32-bit int
        self._elem = _ElemAttr(map_fd=fd, key=mem_at, value=mem_at + _Lookup.entry.offset)
        self._syscall = _libc().syscall
        self._closed = False

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, pin_dir: str) -> DnsMap:
        """The map pinned under pin_dir, for reading and flushing; no compile. KernelError when there
        is none or it has another layout."""
        path = os.path.join(pin_dir, MAP_NAME)
        try:
            fd = obj_get(path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise KernelError(f"no dns_cache is pinned at {path}") from None
            raise KernelError(f"opening {path} failed", os.strerror(e.errno or errno.EIO)) from None
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def load(cls, pin_dir: str, size: int) -> DnsMap:
        """Open the pinned map (creating it when absent) with room for `size` names, and load the
        dns_lookup program against it. A pin of another layout is replaced with a warning; a pin of
        the same layout but another size is replaced by a map of the new size, keeping its live
        entries. Never needs CAP_SYS_ADMIN: pins are opened with BPF_OBJ_GET, never by map id.
        Raises KernelError with the compiler's or the kernel's message."""
        path = os.path.join(pin_dir, MAP_NAME)
        ensure_bpffs(pin_dir)
        try:
            os.makedirs(pin_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise KernelError(f"creating {pin_dir} failed", e.strerror or str(e)) from e
        reuse, carry = _check_pin(path, size)
        try:
            loaded = _load(path, size, reuse)
            try:
                dns_map = cls(path, loaded.map_fd, loaded)
            except BaseException:
                loaded.close()
                raise
            if carry is not None:
                kept = dns_map._copy_from(carry)
                log.warning("dns_cache_resized", path=path, size=size, entries_kept=kept)
        finally:
            if carry is not None:
                os.close(carry)
        return dns_map

    def _copy_from(self, old_fd: int) -> int:
        now = boottime_ns()
        kept = 0
        for name, entry in _iterate(old_fd):
            if entry is not None and entry.expires_ns > now and kept < self.info.max_entries:
                self.update(name, entry)
                kept += 1
        return kept

    # -- entries --------------------------------------------------------------------------------

    def lookup(self, name: str) -> Entry | None:
        """The entry for name, or None. Through dns_lookup when loaded (marks it recently used).
        An entry of another layout version reads as None. Expiry is the caller's to check."""
        mem = self._mem
        mem[:DNS_NAME_LEN] = encode_name(name).ljust(DNS_NAME_LEN, b"\0")
        if self._loaded is not None:
            if self._syscall(_NR_BPF, _BPF_PROG_TEST_RUN, self._run_at, ct.sizeof(_TestRunAttr)) < 0:
                _check(-ct.get_errno(), "dns_lookup")
            if self._run.retval != _XDP_PASS:
                return None
        else:
            res = _bpf(_BPF_MAP_LOOKUP_ELEM, self._elem)
            if res == -errno.ENOENT:
                return None
            _check(res, "dns_cache lookup")
        return _decode(bytes(mem[DNS_NAME_LEN:]))

    def update(self, name: str, entry: Entry) -> None:
        key = DnsKey()
        key.name = encode_name(name)
        value = _encode(entry)
        attr = _ElemAttr(map_fd=self.fd, key=ct.addressof(key), value=ct.addressof(value), flags=_BPF_ANY)
        _check(_bpf(_BPF_MAP_UPDATE_ELEM, attr), "dns_cache update")

    def delete(self, name: str) -> bool:
        """Remove name; False when it was not there."""
        key = DnsKey()
        key.name = encode_name(name)
        attr = _ElemAttr(map_fd=self.fd, key=ct.addressof(key))
        res = _bpf(_BPF_MAP_DELETE_ELEM, attr)
        if res == -errno.ENOENT:
            return False
        _check(res, "dns_cache delete")
        return True

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every entry of this layout version, without touching the LRU order."""
        for name, entry in _iterate(self.fd):
            if entry is not None:
                yield name, entry

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        removed = 0
        for name in [name for name, _ in _iterate(self.fd)]:
            removed += self.delete(name)
        return removed

    def close(self) -> None:
        """Release this process's handles; the pinned map and its entries stay. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._loaded is not None:
            self._loaded.close()
        else:
            os.close(self.fd)

    def __enter__(self) -> DnsMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _iterate(fd: int) -> Iterator[tuple[str, Entry | None]]:
    """(name, entry) for every key; entry None for another layout version. A key deleted while we
    walk makes the kernel restart from the first key, so names already seen are skipped."""
    key, nxt, value = DnsKey(), DnsKey(), DnsEntry()
    attr = _ElemAttr(map_fd=fd, key=0, value=ct.addressof(nxt))
    seen: set[bytes] = set()
    while True:
        res = _bpf(_BPF_MAP_GET_NEXT_KEY, attr)
        if res == -errno.ENOENT:
            return
        _check(res, "dns_cache get_next_key")
        raw = nxt.name
        ct.memmove(ct.addressof(key), ct.addressof(nxt), ct.sizeof(key))
        attr.key = ct.addressof(key)
        if raw in seen:
            continue
        seen.add(raw)
        look = _ElemAttr(map_fd=fd, key=ct.addressof(key), value=ct.addressof(value))
        res = _bpf(_BPF_MAP_LOOKUP_ELEM, look)
        if res == -errno.ENOENT:
            continue  # evicted or deleted between the two calls
        _check(res, "dns_cache lookup")
        yield raw.decode("ascii", errors="replace"), _decode(bytes(value))


def _check_pin(path: str, size: int) -> tuple[int | None, int | None]:
    """Check an existing pin before using it. Returns (reuse, carry): an fd of the pinned map when it
    can be used as is, or an fd of an old map of another size whose entries go into a new one (its
    pin already removed). Unpins what cannot be used at all."""
    try:
        fd = obj_get(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None, None
        # Not a BPF object we can open (e.g. a program pinned under that name): replace it.
        log.warning("dns_cache_replaced", path=path, reason=f"cannot open the existing pin: {e.strerror}")
        _unpin(path)
        return None, None
    try:
        info = map_info(fd)
    except OSError as e:
        os.close(fd)
        log.warning("dns_cache_replaced", path=path, reason=f"the existing pin is not a map: {e.strerror}")
        _unpin(path)
        return None, None
    problem = layout_problem(info)
    if problem is not None:
        os.close(fd)
        log.warning("dns_cache_replaced", path=path, reason=f"the pinned map has another layout: {problem}")
        _unpin(path)
        return None, None
    if info.max_entries != size:
        _unpin(path)
        return None, fd
    return fd, None


def _unpin(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _load(path: str, size: int, pinned_fd: int | None) -> _Loaded:
    """dns_lookup bound to the map pinned at path; takes ownership of pinned_fd.
    No pin (pinned_fd None): BCC creates the map (with BTF, for bpftool) and it is pinned here.
    A pin: BCC compiles against a one-entry stand-in map whose fd is then replaced by the pinned map
    before the program is loaded. BCC's own BPF_TABLE_PINNED would reopen the pin by map id
    (BPF_MAP_GET_FD_BY_ID), which the kernel allows only with CAP_SYS_ADMIN.
    Two proxies starting at once may both find no pin: the one that loses the race to pin it uses
    the winner's map."""
    for _attempt in range(2):
        if pinned_fd is not None:
            try:
                problem = layout_problem(map_info(pinned_fd))
                if problem is not None:
                    raise KernelError(f"{path} is not a usable dns_cache", problem)
                bpf, stand_in_fd = _compile(_STAND_IN_SIZE)
                # The program's instructions name the stand-in by its fd number, which the kernel
                # resolves at load time: make that number refer to the pinned map. dup2 frees the
                # stand-in (nothing else holds it); BCC's cleanup closes the number as before.
                try:
                    os.dup2(pinned_fd, stand_in_fd, inheritable=False)
                except BaseException:
                    bpf.cleanup()  # type: ignore[attr-defined]
                    raise
            finally:
                os.close(pinned_fd)
            try:
                prog_fd = _load_program(bpf)
            except BaseException:
                bpf.cleanup()  # type: ignore[attr-defined]
                raise
            return _Loaded(bpf, stand_in_fd, prog_fd)
        bpf, map_fd = _compile(size)
        try:
            res = obj_pin(map_fd, path)
            if res == -errno.EEXIST:
                bpf.cleanup()  # type: ignore[attr-defined]
                try:
                    pinned_fd = obj_get(path)
                except OSError as e:
                    raise KernelError(f"opening {path} failed", e.strerror or str(e)) from None
                continue
            if res < 0:
                raise KernelError(f"pinning {path} failed", os.strerror(-res))
            prog_fd = _load_program(bpf)
        except BaseException:
            bpf.cleanup()  # type: ignore[attr-defined]  # safe twice
            raise
        return _Loaded(bpf, map_fd, prog_fd)
    raise KernelError(f"pinning {path} failed", "another process replaced the pin while we loaded")


def _compile(size: int) -> tuple[object, int]:
    """BCC's module for dns_cache.c with a map of `size` entries, and that map's fd (owned by BCC)."""
    try:
        from bcc import BPF
        import bcc.libbcc
    except ImportError as e:
        raise KernelError("the bcc Python module is not importable", str(e)) from e
    cflags = [f"-I{EBPF_DIR}", f"-DDNS_CACHE_SIZE={int(size)}"]
    with _captured_stderr() as messages:
        try:
            bpf = BPF(src_file=str(DNS_SRC).encode(), cflags=cflags)
        except Exception as e:  # BCC raises a bare Exception
            error: Exception = e
        else:
            map_fd = bcc.libbcc.lib.bpf_table_fd(bpf.module, MAP_NAME.encode())
            if map_fd < 0:
                bpf.cleanup()
                raise KernelError(f"compiling {DNS_SRC}: no {MAP_NAME} map in the object")
            return bpf, map_fd
    raise KernelError(f"loading {DNS_SRC} failed", messages().strip() or str(error))


def _load_program(bpf: object) -> int:
    from bcc import BPF

    with _captured_stderr() as messages:
        try:
            fn = bpf.load_func(PROG_NAME.encode(), BPF.XDP)  # type: ignore[attr-defined]
        except Exception as e:  # BCC raises a bare Exception with the verifier's log on fd 2
            error = e
        else:
            return fn.fd
    raise KernelError(f"loading {PROG_NAME} failed", messages().strip() or str(error))

# The local-backend short-circuit's kernel half: compiles ebpf/shortcut.c, attaches its sock_ops
# program to one cgroup v2 directory and its sk_msg program to shortcut_socks, pins the maps under
# pin_dir, and gives the relay two calls per connection: register() before the backend connect(),
# release() once both sockets are closed. Invariant: while a ShortcutMaps is open both programs are
# attached; after close() nothing of it is attached to the cgroup or pinned (a test checks bpftool),
# and a proxy that dies leaves nothing attached either (the cgroup attachment is a bpf_link).
from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno
import ipaddress
import os
import socket
from pathlib import Path

from . import maps
from .errors import KernelError, SpliceError, SpliceTableFull
from .loader import EBPF_DIR, PinDir, _captured_stderr, btf_offsets, ensure_bpffs, pin_fd
from .splice import socket_cookie

SHORTCUT_SRC = EBPF_DIR / "shortcut.c"
PINNED_MAPS = ("shortcut_conns", "shortcut_socks", "shortcut_peers", "shortcut_stats")

# enum shortcut_state (ebpf/shortcut.h)
EXPECTED, CAPTURED, REFUSED = 0, 1, 2

_BPF_CGROUP_SOCK_OPS = 3
_BPF_SK_MSG_VERDICT = 7
_NR_BPF = 321  # x86_64
_BPF_LINK_CREATE = 28


class ShortcutKey(ct.Structure):
    _fields_ = [
        ("family", ct.c_uint32),
        ("local_port", ct.c_uint32),
        ("remote_port", ct.c_uint32),
        ("local_ip", ct.c_uint8 * 16),
        ("remote_ip", ct.c_uint8 * 16),
    ]


class ShortcutConn(ct.Structure):
    _fields_ = [
        ("client", ct.c_uint64),
        ("redir_bytes", ct.c_uint64),
        ("redir_msgs", ct.c_uint64),
        ("drop_msgs", ct.c_uint64),
        ("last_ns", ct.c_uint64),
        ("state", ct.c_uint32),
        ("error", ct.c_int32),
        ("passing", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("pass_bytes", ct.c_uint64),
    ]


class ShortcutStats(ct.Structure):
    _fields_ = [
        ("captured", ct.c_uint64),
        ("refused", ct.c_uint64),
        ("foreign", ct.c_uint64),
        ("redir_bytes", ct.c_uint64),
        ("redir_msgs", ct.c_uint64),
        ("drop_msgs", ct.c_uint64),
        ("pass_msgs", ct.c_uint64),
        ("fallbacks", ct.c_uint64),
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}


MIRRORS: dict[str, type[ct.Structure]] = {
    "shortcut_key": ShortcutKey,
    "shortcut_conn": ShortcutConn,
    "shortcut_stats": ShortcutStats,
}


def make_key(backend: tuple[str, int], proxy: tuple[str, int]) -> ShortcutKey:
    """The key of a connection as its backend end sees it: local = the backend's address, remote =
    the proxy's bound address and port."""
    local, remote = ipaddress.ip_address(backend[0]), ipaddress.ip_address(proxy[0])
    if local.version != remote.version:
        raise ValueError(f"address families differ: {backend[0]} and {proxy[0]}")
    key = ShortcutKey()
    key.family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    key.local_port, key.remote_port = backend[1], proxy[1]
    ct.memmove(key.local_ip, local.packed, len(local.packed))
    ct.memmove(key.remote_ip, remote.packed, len(remote.packed))
    return key


def key_text(key: ShortcutKey) -> tuple[str, str]:
    """(backend end, proxy end) of a key as "ip:port" strings."""
    size = 4 if key.family == socket.AF_INET else 16

    def text(raw: ct.Array, port: int) -> str:
        ip = ipaddress.ip_address(bytes(raw)[:size])
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"

    return text(key.local_ip, key.local_port), text(key.remote_ip, key.remote_port)


def cgroup2_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] == "cgroup2"]


def check_cgroup(path: str) -> None:
    """path must be a directory of a mounted cgroup v2 hierarchy (the hybrid layout mounts it at
    /sys/fs/cgroup/unified, a unified one at /sys/fs/cgroup). Raises KernelError saying which."""
    real = os.path.realpath(path)
    mounts = cgroup2_mounts()
    if not mounts:
        raise KernelError("no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/self/mounts)")
    if not any(real == m or real.startswith(m.rstrip("/") + "/") for m in mounts):
        raise KernelError(f"{path} is not in a cgroup v2 hierarchy", "cgroup2 is mounted at " + ", ".join(mounts))
    if not os.path.isfile(os.path.join(real, "cgroup.procs")):
        raise KernelError(f"{path} is not a cgroup directory (no cgroup.procs)")


@dataclasses.dataclass(frozen=True)
class Registration:
    """One connection the kernel may capture: its key, and the client's key in shortcut_peers."""

    key: ShortcutKey
    client_cookie: int


class ShortcutMaps:
    """The loaded short-circuit. Use ShortcutMaps.load(cgroup, pin_dir); close() undoes it."""

    def __init__(self, bpf: object, cgroup: str, pin_dir: str) -> None:
        self._bpf = bpf
        self.cgroup = cgroup
        self.pin_dir = pin_dir
        self._lib = _lib()
        self._cgroup_fd = -1
        self._link_fd = -1
        self._attached: list[tuple[int, int, int]] = []  # (prog fd, target fd, attach type)
        self._pins: PinDir | None = None
        self._closed = False
        self.prog_ids: dict[str, int] = {}
        self.fds = {name: self._lib.bpf_table_fd(bpf.module, name.encode())  # type: ignore[attr-defined]
                    for name in PINNED_MAPS}
        missing = [n for n, fd in self.fds.items() if fd < 0]
        if missing:
            raise KernelError("maps missing after compile", ", ".join(missing))

    @classmethod
    def load(cls, cgroup: str, pin_dir: str, *, max_conns: int | None = None,
             max_socks: int | None = None) -> ShortcutMaps:
        """Compile shortcut.c, attach sk_msg to shortcut_socks, then sock_ops to the cgroup (last:
        nothing can be captured before the redirect is in place), pin the maps. KernelError on any
        failure, with everything undone."""
        try:
            from bcc import BPF
        except ImportError as e:  # pragma: no cover - probe() reports this first
            raise KernelError("the bcc Python module is not importable", str(e)) from e
        check_cgroup(cgroup)
        ensure_bpffs(pin_dir)
        # BCC compiles against Debian's headers, which need not match the running kernel's layout:
        # the verdict reads these fields at the offsets the running kernel's BTF gives.
        off = btf_offsets({"sock": ("sk_socket",), "socket": ("file",), "file": ("f_flags",)})
        cflags = [f"-I{EBPF_DIR}",
                  f"-DSHORTCUT_OFF_SK_SOCKET={off[('sock', 'sk_socket')]}",
                  f"-DSHORTCUT_OFF_SOCKET_FILE={off[('socket', 'file')]}",
                  f"-DSHORTCUT_OFF_F_FLAGS={off[('file', 'f_flags')]}"]
        if max_conns:
            cflags.append(f"-DSHORTCUT_MAX_CONNS={max_conns}")
        if max_socks:
            cflags.append(f"-DSHORTCUT_MAX_SOCKS={max_socks}")
        with _captured_stderr() as messages:
            try:
                bpf = BPF(src_file=str(SHORTCUT_SRC).encode(), cflags=cflags)
            except Exception as e:  # BCC raises a bare Exception
                compile_error: Exception | None = e
            else:
                compile_error = None
        if compile_error is not None:
            raise KernelError(f"compiling {SHORTCUT_SRC} failed", messages().strip() or str(compile_error))
        plane = cls(bpf, cgroup, pin_dir)
        try:
            try:
                os.makedirs(pin_dir, mode=0o700, exist_ok=True)
            except OSError as e:
                raise KernelError(f"creating {pin_dir} failed", e.strerror or str(e)) from e
            plane._attach(BPF)
            plane._pin_all()
        except BaseException:
            plane.close()
            raise
        return plane

    def _attach(self, BPF: type) -> None:  # noqa: N803
        with _captured_stderr() as messages:
            try:
                msg = self._bpf.load_func(b"shortcut_msg", BPF.SK_MSG)  # type: ignore[attr-defined]
                ops = self._bpf.load_func(b"shortcut_ops", BPF.SOCK_OPS)  # type: ignore[attr-defined]
            except Exception as e:
                load_error: Exception | None = e
            else:
                load_error = None
        if load_error is not None:
            raise KernelError("the verifier rejected shortcut.c", messages().strip() or str(load_error))
        self._attach_one(msg.fd, self.fds["shortcut_socks"], _BPF_SK_MSG_VERDICT, 0, "shortcut_msg to shortcut_socks")
        try:
            self._cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError(f"opening the cgroup {self.cgroup} failed", e.strerror or str(e)) from e
        # Through a bpf_link held by this process (and inherited by forked workers): closing it, or
        # the process dying even by SIGKILL, detaches the program; a legacy cgroup attachment would
        # outlive the proxy, and after the privilege drop it could no longer detach it.
        attr = (ct.c_uint32 * 16)()
        attr[0], attr[1], attr[2], attr[3] = ops.fd, self._cgroup_fd, _BPF_CGROUP_SOCK_OPS, 0
        libc = ct.CDLL(None, use_errno=True)
        fd = libc.syscall(_NR_BPF, _BPF_LINK_CREATE, ct.byref(attr), ct.sizeof(attr))
        if fd < 0:
            raise KernelError(f"attaching shortcut_ops to the cgroup {self.cgroup} failed",
                              os.strerror(ct.get_errno()))
        self._link_fd = fd
        self.prog_ids = {"shortcut_msg": _prog_id(msg.fd), "shortcut_ops": _prog_id(ops.fd)}

    def _attach_one(self, prog_fd: int, target_fd: int, kind: int, flags: int, what: str) -> None:
        res = self._lib.bpf_prog_attach(prog_fd, target_fd, kind, flags)
        if res < 0:
            err = ct.get_errno() if res == -1 else -res
            raise KernelError(f"attaching {what} failed", os.strerror(err))
        self._attached.append((prog_fd, target_fd, kind))

    def _pin_all(self) -> None:
        self._pins = PinDir(self.pin_dir)
        for name in PINNED_MAPS:
            path = os.path.join(self.pin_dir, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale pin from an earlier run
            pin_fd(self.fds[name], path)
            self._pins.names.append(name)

    # -- per connection ------------------------------------------------------------------------------
    def register(self, client: socket.socket, backend: tuple[str, int], proxy: tuple[str, int]) -> Registration:
        """Before connect(): put the client socket into shortcut_peers and the expected connection
        into shortcut_conns. Raises SpliceError (SpliceTableFull when a map is full) with nothing
        left behind; the connection then stays on the normal path."""
        try:
            key = make_key(backend, proxy)
        except ValueError as e:
            raise SpliceError(str(e)) from e
        cookie = socket_cookie(client)
        try:
            maps.update(self.fds["shortcut_peers"], ct.c_uint64(cookie), ct.c_uint64(client.fileno()),
                        maps.BPF_ANY, what="shortcut_peers")
        except maps.MapError as e:
            raise _error(e, "shortcut_peers") from e
        conn = ShortcutConn(client=cookie)
        try:
            maps.update(self.fds["shortcut_conns"], key, conn, maps.BPF_NOEXIST, what="shortcut_conns")
        except maps.MapError as e:
            with contextlib.suppress(maps.MapError):
                maps.delete(self.fds["shortcut_peers"], ct.c_uint64(cookie))
            raise _error(e, "shortcut_conns") from e
        return Registration(key, cookie)

    def read(self, reg: Registration) -> ShortcutConn | None:
        conn = ShortcutConn()
        return conn if maps.lookup(self.fds["shortcut_conns"], reg.key, conn) else None

    def release(self, reg: Registration) -> ShortcutConn | None:
        """After both of the proxy's sockets are closed: read the connection's counters and delete
        its entries (the backend socket leaves shortcut_socks, so its later sends take the loopback
        path to the proxy's closed socket and meet a reset). Returns the last counters."""
        conn = self.read(reg)
        with contextlib.suppress(maps.MapError):
            maps.delete(self.fds["shortcut_conns"], reg.key)
        with contextlib.suppress(maps.MapError):
            maps.delete(self.fds["shortcut_socks"], reg.key)
        with contextlib.suppress(maps.MapError):
            maps.delete(self.fds["shortcut_peers"], ct.c_uint64(reg.client_cookie))
        return conn

    # -- inspection ----------------------------------------------------------------------------------
    def stats(self) -> ShortcutStats:
        return read_stats(self.fds["shortcut_stats"])

    def captured_keys(self) -> list[ShortcutKey]:
        """Keys of the backend sockets in shortcut_socks now."""
        return keys(self.fds["shortcut_socks"])

    def registered(self) -> list[tuple[ShortcutKey, ShortcutConn]]:
        return entries(self.fds["shortcut_conns"])

    def close(self) -> None:
        """Detach both programs, unpin the maps, release everything. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for prog_fd, target_fd, kind in reversed(self._attached):
            self._lib.bpf_prog_detach2(prog_fd, target_fd, kind)
        self._attached.clear()
        if self._link_fd >= 0:
            os.close(self._link_fd)
            self._link_fd = -1
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._pins is not None:
            self._pins.unpin_all()
        self._bpf.cleanup()  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ShortcutMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lib() -> ct.CDLL:
    import bcc.libbcc

    return bcc.libbcc.lib


def _prog_id(fd: int) -> int:
    """The kernel's id of a loaded program (what bpftool lists), from /proc/self/fdinfo."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    return 0


def _error(err: OSError, what: str) -> SpliceError:
    if err.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
        return SpliceTableFull(f"{what}: map full ({errno.errorcode.get(err.errno, err.errno)})", err.errno)
    return SpliceError(f"{what}: {err.strerror or err}", err.errno)


def keys(fd: int) -> list[ShortcutKey]:
    out: list[ShortcutKey] = []
    key, nxt = ShortcutKey(), ShortcutKey()
    res = _lib().bpf_get_first_key(fd, ct.byref(nxt), ct.sizeof(nxt))
    while res == 0:
        out.append(ShortcutKey.from_buffer_copy(nxt))
        ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
        res = _lib().bpf_get_next_key(fd, ct.byref(key), ct.byref(nxt))
    return out


def entries(fd: int) -> list[tuple[ShortcutKey, ShortcutConn]]:
    out = []
    for key in keys(fd):
        conn = ShortcutConn()
        if maps.lookup(fd, key, conn):
            out.append((key, conn))
    return out


def read_stats(fd: int) -> ShortcutStats:
    """shortcut_stats summed over all CPUs."""
    values = (ShortcutStats * maps.ncpus())()
    res = _lib().bpf_lookup_elem(fd, ct.byref(ct.c_uint32(0)), ct.byref(values))
    if res < 0:
        raise maps.MapError(ct.get_errno() or errno.EIO, "shortcut_stats lookup")
    total = ShortcutStats()
    for name, _ in ShortcutStats._fields_:
        setattr(total, name, sum(getattr(v, name) for v in values))
    return total

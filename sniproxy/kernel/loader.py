# Compiles ebpf/splice.c with BCC once, attaches its verdict to sock_map, pins the maps under pin_dir
# and undoes all of it in close(). Invariant: while a DataPlane is open its programs are attached
# before any socket can be inserted, and after close() nothing of it is attached or pinned.
from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import mmap
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from . import maps
from .errors import KernelError
from .splice import SpliceTable

EBPF_DIR = Path(__file__).resolve().parents[2] / "ebpf"
SPLICE_SRC = EBPF_DIR / "splice.c"
DEFAULT_PIN_DIR = "/sys/fs/bpf/sniproxy"
BPFFS_ROOT = "/sys/fs/bpf"

# Maps pinned under pin_dir (the names a user sees in bpftool).
PINNED_MAPS = ("sock_map", "splice_slots", "splice_state", "traffic_stats", "splice_cfg")

# The verdict's hold notifications: one ring per worker process (splice_slot.worker picks it).
EVENT_RINGS = tuple(f"splice_events{i}" for i in range(maps.SNIPROXY_MAX_WORKERS))

_NR_BPF = 321  # x86_64
_BPF_OBJ_PIN = 6


def btf_offsets(fields: dict[str, tuple[str, ...]]) -> dict[tuple[str, str], int]:
    """Byte offsets of struct members in the running kernel, from its BTF (bpftool): {(struct,
    member): offset} for every member asked for in `fields` ({struct: (member, ...)}). Raises
    KernelError naming what is missing."""
    try:
        out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelError("reading the kernel's BTF with bpftool failed", str(e)) from e
    found: dict[tuple[str, str], int] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("["):
            current = None
            for struct in fields:
                if f" STRUCT '{struct}' " in line and (struct, fields[struct][0]) not in found:
                    current = struct
        elif current is not None:
            for member in fields[current]:
                if line.strip().startswith(f"'{member}' ") and (current, member) not in found:
                    found[(current, member)] = int(line.split("bits_offset=")[1].split()[0]) // 8
    missing = [f"{s}.{m}" for s, ms in fields.items() for m in ms if (s, m) not in found]
    if missing:
        raise KernelError("the kernel's BTF lacks " + ", ".join(missing))
    return found


def splice_cflags() -> list[str]:
    """The -D offsets splice.c reads kernel structs at, from the running kernel's BTF. BCC compiles
    against Debian's headers, which need not match the running kernel's struct layout, so the
    verdict reads these fields at these offsets rather than by name."""
    off = btf_offsets({"tcp_sock": ("bytes_acked", "copied_seq"), "sk_buff": ("sk", "cb")})
    return [f"-DSNIPROXY_TCP_BYTES_ACKED_OFF={off[('tcp_sock', 'bytes_acked')]}",
            f"-DSNIPROXY_TCP_COPIED_SEQ_OFF={off[('tcp_sock', 'copied_seq')]}",
            f"-DSNIPROXY_SKB_SK_OFF={off[('sk_buff', 'sk')]}",
            f"-DSNIPROXY_SKB_CB_OFF={off[('sk_buff', 'cb')]}"]


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """BCC prints compiler and verifier messages on fd 2 and raises a bare Exception without them:
    capture fd 2 so the typed error can carry the message (it is echoed back to stderr too)."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        text = ""
        try:
            os.dup2(tmp.fileno(), 2)
            yield lambda: text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            if text:
                os.write(2, text.encode())


def _bpf_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] == "bpf"]


def ensure_bpffs(pin_dir: str) -> None:
    """Make sure pin_dir lies on a bpf filesystem, mounting /sys/fs/bpf if that is what it needs."""
    pin = os.path.abspath(pin_dir)
    if any(pin == m or pin.startswith(m.rstrip("/") + "/") for m in _bpf_mounts()):
        return
    if not (pin == BPFFS_ROOT or pin.startswith(BPFFS_ROOT + "/")):
        raise KernelError(f"{pin_dir} is not on a bpf filesystem")
    libc = ct.CDLL(None, use_errno=True)
    # mode=0700: the kernel's default for a new bpffs is 1777, where any user may create the pin
    # directory first (issue 15); systemd mounts /sys/fs/bpf 0700 too.
    if libc.mount(b"bpf", BPFFS_ROOT.encode(), b"bpf", 0, b"mode=0700") != 0:
        err = ct.get_errno()
        raise KernelError(f"mounting bpffs on {BPFFS_ROOT} failed", os.strerror(err))


def pin_fd(fd: int, path: str) -> None:
    """BPF_OBJ_PIN (libbcc does not export it): attr = {u64 pathname, u32 bpf_fd, u32 file_flags}."""
    libc = ct.CDLL(None, use_errno=True)
    buf = ct.create_string_buffer(path.encode())
    attr = (ct.c_uint64 * 3)()
    attr[0] = ct.addressof(buf)
    attr[1] = fd  # bpf_fd in the low half, file_flags 0
    if libc.syscall(_NR_BPF, _BPF_OBJ_PIN, ct.byref(attr), ct.sizeof(attr)) != 0:
        err = ct.get_errno()
        raise KernelError(f"pinning {path} failed", os.strerror(err))


class PinDir:
    """Unpins by name through a descriptor of pin_dir opened while the process was privileged: after
    the proxy switched to its unprivileged user ([server] user) a root-only /sys/fs/bpf above pin_dir
    (mode 0700 under systemd) no longer lets it resolve the path, but unlinking in a directory it
    owns, through that descriptor, still works."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.names: list[str] = []

    def unpin_all(self) -> None:
        """Unlink every name pinned through this object, then pin_dir itself when that leaves it empty
        (only possible while the parent is writable: an empty directory left behind is harmless)."""
        if self._fd < 0:
            return
        for name in self.names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._fd)
        self.names.clear()
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(OSError):
            os.rmdir(self.path)  # only when empty: other components may pin here too


class DataPlane:
    """The loaded splice programs and their maps. Use DataPlane.load(pin_dir), or as a context manager."""

    def __init__(self, bpf: object, pin_dir: str, created_dir: bool) -> None:
        self._bpf = bpf
        self.pin_dir = pin_dir
        self._created_dir = created_dir
        self._attached: list[tuple[object, int, int]] = []
        self._pins: PinDir | None = None
        self._events: list[maps.SpliceEvent] = []
        self._closed = False
        lib = self._lib()
        self.fds = {
            name: lib.bpf_table_fd(bpf.module, name.encode())  # type: ignore[attr-defined]
            for name in (*PINNED_MAPS, *EVENT_RINGS)
        }
        missing = [n for n, fd in self.fds.items() if fd < 0]
        if missing:
            raise KernelError("maps missing after compile", ", ".join(missing))
        # splice_state is read and written as memory: no bpf() call per access (BPF_F_MMAPABLE). A
        # shared mapping, so forked workers see the same slots.
        self._state = mmap.mmap(self.fds["splice_state"], maps.SNIPROXY_MAX_SOCKETS * ct.sizeof(maps.SpliceSlot),
                                mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.splice_table = SpliceTable(self.fds, self._state, open_events=self._open_events,
                                        read_events=self._read_events)

    @staticmethod
    def _lib() -> ct.CDLL:
        import bcc.libbcc

        return bcc.libbcc.lib

    @classmethod
    def load(cls, pin_dir: str = DEFAULT_PIN_DIR, *, queue_limit: int | None = None,
             source: Path = SPLICE_SRC, defines: tuple[str, ...] = ()) -> DataPlane:
        """Compile splice.c, attach its verdict to sock_map, pin the maps under pin_dir (replacing
        stale pins of an earlier run). Raises KernelError with the compiler's/kernel's message.
        defines: extra -D flags, only for tests that need a fault no real traffic can produce."""
        try:
            from bcc import BPF, BPFAttachType
        except ImportError as e:  # pragma: no cover - probe() reports this first
            raise KernelError("the bcc Python module is not importable", str(e)) from e
        ensure_bpffs(pin_dir)
        offsets = splice_cflags()
        with _captured_stderr() as messages:
            try:
                bpf = BPF(src_file=str(Path(source).resolve()).encode(),
                          cflags=[f"-I{EBPF_DIR}", *offsets, *(f"-D{d}" for d in defines)])
            except Exception as e:  # BCC raises a bare Exception
                compile_error: Exception | None = e
            else:
                compile_error = None
        if compile_error is not None:
            raise KernelError(f"compiling {source} failed", messages().strip() or str(compile_error))
        created = False
        try:
            if not os.path.isdir(pin_dir):
                os.makedirs(pin_dir, mode=0o700, exist_ok=True)
                created = True
        except OSError as e:
            bpf.cleanup()
            raise KernelError(f"creating {pin_dir} failed", e.strerror or str(e)) from e
        plane = cls(bpf, pin_dir, created)
        try:
            with _captured_stderr() as messages:
                try:
                    verdict = bpf.load_func(b"splice_verdict", BPF.SK_SKB)
                except Exception as e:
                    load_error: Exception | None = e
                else:
                    load_error = None
            if load_error is not None:
                raise KernelError("the verifier rejected splice.c", messages().strip() or str(load_error))
            sock_map = plane.fds["sock_map"]
            for fn, kind in ((verdict, BPFAttachType.SK_SKB_STREAM_VERDICT),):
                res = plane._lib().bpf_prog_attach(fn.fd, sock_map, kind, 0)
                if res < 0:
                    err = ct.get_errno() if res == -1 else -res
                    raise KernelError(f"attaching {fn.name.decode()} to sock_map failed", os.strerror(err))
                plane._attached.append((fn, sock_map, kind))
            if queue_limit is not None:
                plane.set_queue_limit(queue_limit)
            plane._pin_all()
        except BaseException:
            plane.close()
            raise
        return plane

    def _pin_all(self) -> None:
        self._pins = PinDir(self.pin_dir)
        for name in PINNED_MAPS:
            path = os.path.join(self.pin_dir, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale pin from an earlier run
            pin_fd(self.fds[name], path)
            self._pins.names.append(name)

    def _open_events(self, worker: int) -> int:
        """Consume ring `worker` in this process (after the fork, in a worker: a ring has one consumer,
        and BCC's consumer state must not be shared with the parent). Returns its pollable fd."""
        name = EVENT_RINGS[worker]
        self._bpf[name.encode()].open_ring_buffer(self._on_event)  # type: ignore[index]
        return self.fds[name]

    def _on_event(self, _ctx: object, data: int, size: int) -> int:
        if size >= ct.sizeof(maps.SpliceEvent):
            self._events.append(maps.SpliceEvent.from_buffer_copy(ct.string_at(data, ct.sizeof(maps.SpliceEvent))))
        return 0

    def _read_events(self) -> list[maps.SpliceEvent]:
        if self._closed:
            return []
        self._bpf.ring_buffer_consume()  # type: ignore[attr-defined]
        events, self._events = self._events, []
        return events

    def set_queue_limit(self, limit: int) -> None:
        """Bytes queued toward a socket above which the verdict leaves bytes to userspace (0: default)."""
        maps.update(self.fds["splice_cfg"], ct.c_uint32(0), maps.SpliceCfg(limit), what="splice_cfg")

    def traffic(self) -> maps.TrafficStats:
        return maps.read_traffic(self.fds["traffic_stats"])

    def close(self) -> None:
        """Detach both programs, unpin the maps, release everything. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for fn, fd, kind in reversed(self._attached):
            self._lib().bpf_prog_detach2(fn.fd, fd, kind)  # type: ignore[attr-defined]
        self._attached.clear()
        with contextlib.suppress(BufferError, ValueError):
            self._state.close()
        if self._pins is not None:
            self._pins.unpin_all()
        else:  # closed before pinning
            with contextlib.suppress(OSError):
                os.rmdir(self.pin_dir)
        self._bpf.cleanup()  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

# Owns the pin directory as a whole: puts it on bpffs (loader.ensure_bpffs mounts one mode 0700 when
# needed), creates it 0700, refuses one another user could tamper with, and holds an exclusive flock on
# it for the life of the proxy. Invariant: while a PinDirLock is held, no other sniproxy starts on the
# same directory (it would replace this one's pins, and its stop would delete them).
from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable

from .errors import KernelError
from .loader import ensure_bpffs

__all__ = ["PinDirBusy", "PinDirLock", "PinDirUnsafe", "claim"]


class PinDirBusy(KernelError):
    """A live proxy holds the pin directory."""


class PinDirUnsafe(KernelError):
    """The pin directory (or a parent) could be renamed, emptied or filled by another user."""


def _holder(st: os.stat_result) -> int | None:
    """The pid holding a flock on the inode `st` describes, from /proc/locks (None if not found)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def _check_parents(path: str, trusted: frozenset[int]) -> None:
    """Each parent must be owned by root (or us), or not writable by others, or sticky: otherwise its
    owner could rename the pin directory away and put their own in its place."""
    parent = os.path.dirname(path)
    while True:
        st = os.lstat(parent)
        if st.st_uid not in trusted and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise PinDirUnsafe(f"{parent} (a parent of the pin directory) is writable by others and "
                               f"owned by uid {st.st_uid}")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


class PinDirLock:
    """The held pin directory. close() releases the lock (the directory and its pins stay)."""

    def __init__(self, path: str, fd: int, created: bool) -> None:
        self.path = path
        self.created = created
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with the last descriptor (forked workers' too)
            self._fd = None

    def __enter__(self) -> PinDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def claim(pin_dir: str, owners: Iterable[int] = ()) -> PinDirLock:
    """Make `pin_dir` safe to pin into, and this process's alone. It may be owned by root, this
    process's user, or one of `owners` (the proxy's [server] user). Raises PinDirBusy, PinDirUnsafe,
    or KernelError (not on bpffs, cannot mount or create it)."""
    path = os.path.abspath(pin_dir)
    trusted = frozenset((0, os.geteuid(), *owners))
    ensure_bpffs(path)
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, 0o700)
        created = True
    except OSError as exc:
        raise KernelError(f"creating {path} failed", exc.strerror or str(exc)) from exc
    try:
        # O_NOFOLLOW: a symlink planted in the pin directory's place is refused, not followed.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = "it is a symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
        raise PinDirUnsafe(f"cannot use {path} as the pin directory: {why}") from exc
    try:
        st = os.fstat(fd)  # the directory we hold, not whatever the path names a moment later
        if st.st_uid not in trusted:
            raise PinDirUnsafe(f"{path} is owned by uid {st.st_uid}, not root or the proxy's user "
                               f"(uids {', '.join(map(str, sorted(trusted)))}): that user could rename "
                               f"or delete the pins; remove it, or use another [ebpf] pin_dir")
        if st.st_mode & 0o022:
            raise PinDirUnsafe(f"{path} is writable by group or others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it (the proxy creates it 0700)")
        _check_parents(path, trusted)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise KernelError(f"locking {path} failed", exc.strerror or str(exc)) from exc
            pid = _holder(st)
            who = f"pid {pid}" if pid is not None else "another process"
            raise PinDirBusy(f"{path} is in use by another sniproxy ({who}): two proxies on one pin_dir "
                             f"replace and delete each other's pins; give this one its own "
                             f"[ebpf] pin_dir") from None
    except BaseException:
        os.close(fd)
        raise
    return PinDirLock(path, fd, created)

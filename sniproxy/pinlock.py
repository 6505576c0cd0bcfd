# Holds the [ebpf] pin_dir for the proxy's life when anything of it pins there (splice, the kernel DNS
# cache, XDP): kernel/pindir.py checks the directory's owner and mode and takes its lock. A live
# proxy on the same directory, or a directory another user could tamper with, stops the start
# (DataPlaneError); a process that cannot use BPF at all skips this, as its data plane parts do.
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import structlog

from sniproxy.config import Config
from sniproxy.dataplane import DataPlaneError

log = structlog.get_logger("sniproxy.dataplane")


def uses_pin_dir(config: Config) -> bool:
    return config.ebpf.splice or config.resolver.kernel_cache or config.xdp.enabled


@contextlib.contextmanager
def hold_pin_dir(config: Config, user_uid: int | None = None) -> Iterator[None]:
    """`user_uid`: [server] user's, which may own pin_dir (the proxy hands it over before switching,
    so it can unpin at stop)."""
    if not uses_pin_dir(config):
        yield
        return
    try:
        from sniproxy.kernel.errors import KernelError
        from sniproxy.kernel.pindir import PinDirBusy, PinDirUnsafe, claim
        from sniproxy.kernel.probe import probe
    except ImportError:  # the data plane parts say why they fall back (or, for XDP, refuse)
        yield
        return
    if not probe().available:
        yield
        return
    pin_dir = config.ebpf.pin_dir
    try:
        lock = claim(pin_dir, owners=() if user_uid is None else (user_uid,))
    except (PinDirBusy, PinDirUnsafe) as exc:
        raise DataPlaneError(f"[ebpf] pin_dir: {exc}") from exc
    except KernelError as exc:  # e.g. not on bpffs: each part then reports its own fallback
        log.warning("pin_dir_unavailable", pin_dir=pin_dir, reason=str(exc))
        yield
        return
    with lock:
        log.info("pin_dir_locked", pin_dir=lock.path, created=lock.created)
        yield

# Chooses how relayed bytes move: the kernel splice when this process can load it, else userspace
# copy. The decision and its reason are logged once at start; a failure here never stops the proxy.
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import structlog

from sniproxy.config import EbpfConfig
from sniproxy.relay import CopyRelay, Relay

log = structlog.get_logger("sniproxy.dataplane")


@contextlib.contextmanager
def open_relay(config: EbpfConfig) -> Iterator[Relay]:
    copy = CopyRelay()
    if not config.splice:
        log.info("relay_mode", mode="copy", reason="splice disabled by [ebpf] splice = false")
        yield copy
        return
    try:
        from sniproxy.kernel.loader import DataPlane
        from sniproxy.kernel.probe import probe
        from sniproxy.splice_relay import SpliceRelay
    except ImportError as exc:  # the kernel package itself failed to import: still serve
        log.warning("relay_mode", mode="copy", reason=f"kernel data plane not importable: {exc}")
        yield copy
        return
    support = probe()
    if not support.available:
        log.warning("relay_mode", mode="copy", reason=support.reason)
        yield copy
        return
    try:
        plane = DataPlane.load(config.pin_dir)
    except Exception as exc:  # KernelError and anything BCC raises: fall back, say why
        log.warning("relay_mode", mode="copy", reason=f"eBPF splice failed to load: {exc}")
        yield copy
        return
    try:
        log.info("relay_mode", mode="splice", pin_dir=config.pin_dir)
        yield SpliceRelay(plane.splice_table, copy)
    finally:
        plane.close()

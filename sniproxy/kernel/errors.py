# Typed errors of the kernel data plane. Everything above sniproxy.kernel catches these (never a bare
# Exception from BCC): KernelError means the data plane as a whole is unusable, SpliceError means one
# connection cannot be spliced and is copied instead.
from __future__ import annotations


class KernelError(Exception):
    """Loading, attaching or pinning the BPF data plane failed. `detail` holds the compiler's or the
    kernel's own message."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message if not detail else f"{message}: {detail}")
        self.detail = detail


class SpliceError(Exception):
    """This connection cannot be spliced; the caller copies it in userspace instead."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SpliceUnavailable(SpliceError):
    """The kernel refused the socket (EOPNOTSUPP: not ESTABLISHED, e.g. a FIN already arrived)."""


class SpliceTableFull(SpliceError):
    """No room in sock_map / splice_slots / this worker's share of splice_state (E2BIG, ENOSPC, ENOMEM)."""

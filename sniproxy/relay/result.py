# What a relayed connection reports when it ends: how it ended and how many bytes went each way by
# which path. Plain values, filled in by sniproxy.relay and read by the access log.
from __future__ import annotations

import dataclasses
import enum


class Outcome(str, enum.Enum):
    """How a relayed connection ended (the access log's `outcome` field)."""

    CLOSED = "closed"  # both directions finished with FIN
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"  # cut by the server's drain deadline
    # Reset by the proxy: the kernel handed the splice verdict an skb repeating bytes already delivered
    # and it could not be cut (see ebpf/splice.c, trim_overlap); forwarding it would corrupt the stream.
    SPLICE_ERROR = "splice_error"


@dataclasses.dataclass
class RelayResult:
    mode: str  # "splice" when the connection was handed to the kernel, else "copy"
    bytes_up: int  # client -> backend, including the ClientHello
    bytes_down: int  # backend -> client
    outcome: Outcome
    # Why a relay that may splice kept this connection in userspace (under splice_after, a FIN
    # before the hand-off, the kernel refused the sockets), or None.
    fallback_reason: str | None = None
    kernel_bytes: int = 0  # of bytes_up + bytes_down: moved by the kernel's redirect
    kernel_up: int = 0  # of bytes_up: moved by the kernel's redirect (the metrics split by path)
    kernel_down: int = 0  # of bytes_down: likewise
    # The local-backend short-circuit ([ebpf] shortcut_cgroup): whether the backend's socket was
    # captured, the bytes_down its sk_msg redirect moved (included in bytes_down, not in
    # kernel_bytes), and why a registered connection was not captured.
    shortcut: bool = False
    shortcut_bytes: int = 0
    shortcut_fallback: str | None = None

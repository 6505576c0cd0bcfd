# sd_notify(3) over the $NOTIFY_SOCKET datagram socket: READY, RELOADING, STOPPING, WATCHDOG, STATUS.
# Invariant: without NOTIFY_SOCKET every call is a no-op, and a failed send is logged but never raised,
# so the proxy behaves the same under systemd, under another supervisor and in a terminal.
from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("sniproxy.systemd")

# A full receive queue on the manager's side must not stall the event loop for long.
_SEND_TIMEOUT = 1.0


def _address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@"):  # abstract namespace: a leading NUL byte instead of the "@"
        return b"\0" + value[1:].encode()
    return None  # e.g. "vsock:..." (systemd >= 254 for VMs): not supported here


class Notifier:
    """Sends state changes to the service manager. Build it with from_environ()."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _address(socket_path) if socket_path else None
        if socket_path and self._address is None:
            log.warning("sd_notify_unsupported", notify_socket=socket_path)
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        watchdog: int | None = None
        # WATCHDOG_PID names the process the watchdog is meant for; a child that inherited the
        # variables must not ping on its parent's behalf.
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            watchdog = int(env["WATCHDOG_USEC"]) or None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @classmethod
    def disabled(cls) -> Notifier:
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the manager's timeout, as sd_watchdog_enabled(3) advises."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send one datagram of KEY=VALUE lines. True when it was sent."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:  # once: a dead manager socket would otherwise log on every ping
                log.warning("sd_notify_failed", error=str(exc), message=message.decode(errors="replace"))
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        # systemd >= 253 (Type=notify-reload) wants the CLOCK_MONOTONIC time of the reload request;
        # older managers ignore the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}",
                           *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloaded(self, error: str | None) -> bool:
        """How a reload ended (None: in force). systemd learns it from the STATUS= sent with READY=1;
        a worker's notifier passes it to its supervisor."""
        return False

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

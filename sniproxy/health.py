# Active health checks ([backends] health_check_interval): every interval, one connect (TCP or unix,
# no bytes sent) to each backend of a route or fallback that lists several, each under
# health_check_timeout; the result goes to the Balancer, and a change is logged (backend_down /
# backend_up). Invariant: at most one round runs at a time, and stop() leaves no task or socket behind.
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

import structlog

from sniproxy.balancer import Balancer
from sniproxy.config import Address, BackendAddress, Config, UnixAddress, parse_backend_address
from sniproxy.resolver import Resolver

log = structlog.get_logger("sniproxy.health")

__all__ = ["HealthChecker", "balanced_backends"]


def balanced_backends(config: Config) -> set[BackendAddress]:
    """The backends that sniproxy.balancer chooses among: those of routes and fallbacks that list
    more than one (a lone backend is always tried, so its state changes nothing)."""
    found: set[BackendAddress] = set()
    for table in config.tables.values():
        for route in table.routes:
            if isinstance(route.backend, tuple) and len(route.backend) > 1:
                found.update(parse_backend_address(text) for text in route.backend)
        if isinstance(table.fallback, tuple) and len(table.fallback) > 1:
            found.update(table.fallback)
    return {a if isinstance(a, UnixAddress) else Address(a.host.lower(), a.port) for a in found}


class HealthChecker:
    def __init__(self, balancer: Balancer, resolver: Callable[[], Resolver | None]) -> None:
        self.balancer = balancer
        self._resolver = resolver  # the server's current one (it changes on reload)
        self._backends: set[BackendAddress] = set()
        self._interval = 0.0
        self._timeout = 2.0
        self._task: asyncio.Task[None] | None = None

    def configure(self, config: Config) -> None:
        """Check what `config` balances, at its interval; start, restart or stop the loop to match.
        Needs a running event loop when checks are on."""
        settings = config.backends
        self._backends = balanced_backends(config)
        changed = (settings.health_check_interval, settings.health_check_timeout) != (
            self._interval, self._timeout)
        self._interval, self._timeout = settings.health_check_interval, settings.health_check_timeout
        running = self._task is not None and not self._task.done()
        wanted = self._interval > 0 and bool(self._backends)
        if running and (changed or not wanted):
            assert self._task is not None
            self._task.cancel()
            self._task = None
            running = False
        if wanted and not running:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        log.info("health_checks", interval=self._interval, timeout=self._timeout,
                 backends=sorted(str(b) for b in self._backends))
        while True:
            started = time.monotonic()
            backends = sorted(self._backends, key=str)
            await asyncio.gather(*(self.check(b) for b in backends))
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def check(self, backend: BackendAddress) -> bool:
        """One check of `backend`, recorded in the balancer. True when it passed."""
        error: str | None = None
        try:
            await asyncio.wait_for(self._connect(backend), self._timeout)
        except TimeoutError:
            error = f"health check: no connect within {self._timeout:g} s"
        except OSError as exc:
            error = f"health check: {os.strerror(exc.errno) if exc.errno else exc}"
        changed = self.balancer.checked(backend, error is None, time.monotonic(), error)
        if changed and error is None:
            log.info("backend_up", backend=str(backend), by="health_check")
        elif changed:
            log.warning("backend_down", backend=str(backend), reason=error, until="a health check passes")
        return error is None

    async def _connect(self, backend: BackendAddress) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(backend, UnixAddress):
            targets: list[tuple[int, object]] = [(socket.AF_UNIX, backend.path)]
        else:
            resolver = self._resolver()
            if resolver is None:
                raise OSError(0, "no resolver")
            try:
                addresses = await resolver.resolve(backend.host)
            except Exception as exc:  # ResolveError: the name does not resolve now
                raise OSError(0, f"resolve {backend.host}: {exc}") from None
            targets = [(socket.AF_INET6 if ":" in a else socket.AF_INET, (a, backend.port))
                       for a in addresses]
        last: OSError | None = None
        for family, address in targets:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                await loop.sock_connect(sock, address)
                return
            except OSError as exc:
                last = exc
            finally:
                sock.close()
        raise last if last is not None else OSError(0, "no address")

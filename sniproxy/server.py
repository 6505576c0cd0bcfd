# The server's lifecycle: bind listeners, accept, hold the set of live connections, reload on SIGHUP,
# drain on SIGTERM/SIGINT. Signal handlers only set events; the serve() coroutine does the work.
# Invariant: every accepted socket becomes a tracked Connection (in _connections until its on_done) or
# is closed (and logged) at once.
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import signal
import socket
from _socket import socket as raw_socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from sniproxy import metrics
from sniproxy.balancer import Balancer
from sniproxy.config import Config, ConfigError, ListenerConfig, load_config
from sniproxy.connection import Connection, Policy, access_level, access_log, peer_text
from sniproxy.dataplane import DataPlaneError, XdpGate
from sniproxy.health import HealthChecker, balanced_backends
from sniproxy.listeners import ListenerError, ListenerSource, LocalBinder, bind_listener, ungated
from sniproxy.listeners import listener_name as _listener_name
from sniproxy.localaddrs import LocalAddresses
from sniproxy.relay import Relay
from sniproxy.resolver import Resolver
from sniproxy.routing import RouteTable
from sniproxy.systemd import Notifier

log = structlog.get_logger("sniproxy.server")

# After EMFILE/ENFILE the listening socket stays readable; stop watching it for a moment instead of
# spinning on accept() at 100% CPU.
_ACCEPT_BACKOFF = 0.1
# How often STATUS= is refreshed for `systemctl status` when no shorter watchdog interval applies.
_STATUS_INTERVAL = 5.0


def build_policies(config: Config, is_local: Callable[[Any], bool] | None = None) -> dict[str, Policy]:
    """One Policy per listener name; a pure function of the config (and of the process's view of
    its own addresses) so reload can swap them whole."""
    tables = {name: RouteTable.from_config(table) for name, table in config.tables.items()}
    return {
        _listener_name(listener): Policy(
            table=tables[listener.table],
            limits=config.limits,
            access_log=config.log.access_log,
            trusted_proxies=(tuple(ipaddress.ip_network(n) for n in listener.trusted)
                             if listener.accept_proxy_protocol else None),
            protocol=listener.protocol,
            is_local=is_local,
        )
        for listener in config.listeners
    }


@dataclass
class _Listening:
    name: str
    sock: socket.socket
    paused: bool = False
    kind: tuple[int, int, int] = (0, 0, 0)  # family, type, proto of its accepted sockets, as ints

    def __post_init__(self) -> None:
        self.kind = (int(self.sock.family), int(self.sock.type), self.sock.proto)


@dataclass
class Server:
    config: Config
    relay: Relay = field(default_factory=Relay)
    resolver: Resolver | None = None
    reloads: int = 0
    notifier: Notifier = field(default_factory=Notifier.disabled)  # the CLI passes the real one
    xdp: XdpGate | None = None  # the running XDP allow-list ([xdp] enabled), replaced on reload
    # Processes sharing the listeners ([server] workers): max_connections is split evenly between
    # them; max_connections_per_ip holds in each (a worker cannot see the others' connections).
    workers: int = 1
    # Where a reload that adds listeners gets their sockets: bound here, or (a worker) offered by the
    # supervisor, which binds the listening sockets every worker shares.
    listener_source: ListenerSource = field(default_factory=LocalBinder)

    def __post_init__(self) -> None:
        self.local_addresses = LocalAddresses()
        self._policies = build_policies(self.config, self.local_addresses.contains)
        # The XDP filter gates the ports it attached with; a reload may not open another one.
        self._gated_ports = (frozenset(lst.bind.port for lst in self.config.listeners)
                             if self.xdp is not None else None)
        self._listening: list[_Listening] = []
        self._connections: set[Connection] = set()
        self._all_done: asyncio.Future[None] | None = None  # set when _connections empties (drain)
        self._per_ip: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.rejected_over_limit = 0
        self.accepted = 0
        self.last_reload_error: str | None = None  # why the last reload was rejected; None: it was not
        self._heartbeat: asyncio.TimerHandle | None = None
        if self.resolver is None:
            self.resolver = Resolver(self.config.resolver)
        # A reload with a new [resolver] swaps self.resolver for new connections; each connection
        # keeps the one it started with, so an old one is closed only when its last user ends.
        self._resolver_users: dict[Resolver, int] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Kept across reloads: open counts and hold-downs of backends the new file still names.
        self.balancer = Balancer(self.config.backends.hold_down)
        self._health = HealthChecker(self.balancer, lambda: self.resolver)

    # -- lifecycle ------------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every listener; all or nothing, so a failed start leaves no port half-open."""
        try:
            for listener in self.config.listeners:
                self._listening.append(_Listening(_listener_name(listener), bind_listener(listener)))
        except BaseException:
            self._close_listeners()
            raise

    def adopt(self, sockets: list[socket.socket]) -> None:
        """Serve on listening sockets bound elsewhere (a worker's share, one per listener, in config
        order) instead of bind()."""
        if len(sockets) != len(self.config.listeners):
            raise ValueError(f"{len(sockets)} sockets for {len(self.config.listeners)} listeners")
        self._listening = [_Listening(_listener_name(listener), sock)
                           for listener, sock in zip(self.config.listeners, sockets, strict=True)]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [entry.sock.getsockname()[:2] for entry in self._listening]

    @property
    def live_connections(self) -> int:
        return len(self._connections)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def serve(self, install_signal_handlers: bool = True) -> None:
        """Accept until asked to stop, then drain. bind() must have been called."""
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        if install_signal_handlers:
            for sig, action in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                                (signal.SIGHUP, self.request_reload)):
                loop.add_signal_handler(sig, action)
                handled.append(sig)
        # Before the first accept: a dynamic route must know this host's addresses from the start.
        self.local_addresses.start(loop)
        for entry in self._listening:
            self._watch(entry)
        log.info("listening", listeners=[e.name for e in self._listening], relay=self.relay.mode)
        # Listeners are bound and the relay (BPF objects included) was opened before serve(): ready.
        self.notifier.ready(self.status_line())
        self._schedule_heartbeat()
        self._health.configure(self.config)
        try:
            while not self._stop.is_set():
                stop_wait = asyncio.ensure_future(self._stop.wait())
                reload_wait = asyncio.ensure_future(self._reload.wait())
                try:
                    await asyncio.wait({stop_wait, reload_wait}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop_wait.cancel()
                    reload_wait.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    self.notifier.reloading()
                    self._last_reload_ok = self.reload()
                    metrics.reload_done(self._last_reload_ok)
                    self.notifier.reloaded(self.last_reload_error)
                    self.notifier.ready(self.status_line())
        finally:
            self.notifier.stopping(f"stopping: draining {len(self._connections)} connection(s)")
            try:
                # Handlers stay while draining: a repeated SIGTERM (systemd signals the whole cgroup,
                # and a worker's supervisor forwards its own) must not cut the drain short.
                await self._drain()
            finally:
                for sig in handled:
                    loop.remove_signal_handler(sig)
                if self._heartbeat is not None:
                    self._heartbeat.cancel()
                    self._heartbeat = None
                self.local_addresses.close()

    def reload(self) -> bool:
        """Re-read the config file; new connections use it, established ones keep what they had.
        Listeners follow the file: new ones are bound (all or nothing, before anything else changes),
        removed ones stop accepting while their connections finish. False (and last_reload_error
        says why) when the file was rejected."""
        ok = self._reload_file()
        if ok:
            self.last_reload_error = None
        return ok

    def _rejected(self, error: str) -> bool:
        log.error("reload_failed", error=error, kept="previous configuration")
        self.last_reload_error = error
        return False

    def _reload_file(self) -> bool:
        try:
            config = load_config(self.config.source)
            policies = build_policies(config, self.local_addresses.contains)
        except ConfigError as exc:
            self.listener_source.acquire(())  # close whatever a supervisor offered for this reload
            return self._rejected(str(exc))
        running = {entry.name for entry in self._listening}
        added = [lst for lst in config.listeners if _listener_name(lst) not in running]
        try:
            why = ungated(added, self._gated_ports)
            if why is not None:
                self.listener_source.acquire(())
                raise ListenerError(why)
            sockets = self.listener_source.acquire(added)
        except ListenerError as exc:
            return self._rejected(str(exc))
        if config.metrics != self.config.metrics:
            log.warning("reload_metrics_unchanged", reason="[metrics] needs a restart")
            config = dataclasses.replace(config, metrics=self.config.metrics)
        if config.ebpf != self.config.ebpf:
            # The kernel data plane is compiled, attached and pinned once, at start, before privileges
            # are dropped: a worker could not load it again.
            log.warning("reload_ebpf_unchanged", reason="[ebpf] needs a restart")
            config = dataclasses.replace(config, ebpf=self.config.ebpf)
        built = self._reload_resolver(config)
        if built is None:
            for sock in sockets:
                sock.close()
            return False
        config, resolver = built
        config = self._reload_xdp(config)
        if config is None:
            for sock in sockets:
                sock.close()
            if resolver is not None:
                self._retire(resolver)
            return False
        self.config = config
        self._policies = policies
        if resolver is not None:
            self._swap_resolver(resolver)
        self.balancer.hold_down = config.backends.hold_down
        self.balancer.retain(balanced_backends(config))
        self._health.configure(config)
        self._swap_listeners(config, added, sockets)
        self.reloads += 1
        log.info("reloaded", source=config.source, reloads=self.reloads)
        return True

    def _swap_listeners(self, config: Config, added: list[ListenerConfig], sockets: list[socket.socket]) -> None:
        """Start accepting on the new sockets; stop on the listeners gone from `config`. Their
        connections are tasks of their own and finish as they would have (drain, idle timeout)."""
        wanted = {_listener_name(lst) for lst in config.listeners}
        loop = asyncio.get_running_loop()
        for entry in [e for e in self._listening if e.name not in wanted]:
            if not entry.paused:
                loop.remove_reader(entry.sock.fileno())
            entry.sock.close()
            self._listening.remove(entry)
            log.info("listener_removed", listener=entry.name,
                     open_connections=len(self._connections))
        for listener, sock in zip(added, sockets, strict=True):
            entry = _Listening(_listener_name(listener), sock)
            self._listening.append(entry)
            self._watch(entry)
            log.info("listener_added", listener=entry.name, protocol=listener.protocol,
                     table=listener.table)

    def _reload_resolver(self, config: Config) -> tuple[Config, Resolver | None] | None:
        """A new Resolver (sharing the running cache) when [resolver] changed, else None in the
        pair. cache_size and kernel_cache need a restart: the cache is opened once, at start.
        None when the resolver could not be built."""
        running = self.config.resolver
        new = dataclasses.replace(config.resolver, cache_size=running.cache_size,
                                  kernel_cache=running.kernel_cache)
        if new != config.resolver:
            log.warning("reload_resolver_unchanged", reason="[resolver] cache_size and kernel_cache "
                        "need a restart; the rest of [resolver] is reloaded")
            config = dataclasses.replace(config, resolver=new)
        if new == running:
            return config, None
        assert self.resolver is not None
        try:
            return config, Resolver(new, self.resolver.cache)
        except Exception as exc:  # c-ares refusing the channel: keep the running one
            self._rejected(f"resolver: {exc}")
            return None

    def _swap_resolver(self, resolver: Resolver) -> None:
        old = self.resolver
        self.resolver = resolver
        cfg = resolver.config
        log.info("resolver_reloaded", nameservers=[str(a) for a in cfg.nameservers], mode=cfg.mode,
                 timeout=cfg.timeout, tries=cfg.tries, min_ttl=cfg.min_ttl, max_ttl=cfg.max_ttl,
                 negative_ttl=cfg.negative_ttl,
                 old_resolver_users=self._resolver_users.get(old, 0) if old is not None else 0)
        if old is not None and not self._resolver_users.get(old):
            self._retire(old)

    def _retire(self, resolver: Resolver) -> None:
        """Close a resolver no connection uses any more. Not at once while it has users: close()
        cancels its queries in flight, which would fail those connections."""
        self._resolver_users.pop(resolver, None)
        task = asyncio.get_running_loop().create_task(self._close_resolver(resolver))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_resolver(resolver: Resolver) -> None:
        await resolver.close()
        log.info("resolver_closed", nameservers=[str(a) for a in resolver.config.nameservers])

    def _reload_xdp(self, config: Config) -> Config | None:
        """Put the new xdp.allow into the running filter in place (no detach: adds land before
        deletes). Interfaces, mode and enabled need a restart. None when the kernel refused."""
        running = self.config.xdp
        new = config.xdp
        if (new.enabled, new.interfaces, new.mode) != (running.enabled, running.interfaces, running.mode):
            log.warning("reload_xdp_unchanged", reason="[xdp] enabled, interfaces and mode need a "
                        "restart; only xdp.allow is reloaded")
        if self.xdp is None or not new.enabled:
            return dataclasses.replace(config, xdp=running)
        try:
            added, removed = self.xdp.replace(new.allow)
        except DataPlaneError as exc:
            self._rejected(f"xdp.allow: {exc}")
            return None
        if added or removed:
            log.info("xdp_allow_replaced", added=added, removed=removed, entries=len(new.allow))
        return dataclasses.replace(config, xdp=dataclasses.replace(running, allow=new.allow))

    def status_line(self) -> str:
        """One line for systemd's STATUS= (shown by `systemctl status`)."""
        line = (f"relay={self.relay.mode} connections={len(self._connections)} accepted={self.accepted} "
                f"over_limit={self.rejected_over_limit} reloads={self.reloads}")
        # A rejected file leaves the old config running: show that, and why, next to the reload count.
        return line if self.last_reload_error is None else f"{line} last_reload=failed: {self.last_reload_error}"

    def _schedule_heartbeat(self) -> None:
        # A timer on the event loop itself: if the loop stalls, the pings stop and systemd's
        # WatchdogSec= restarts the service.
        if not self.notifier.enabled:
            return
        interval = min(self.notifier.watchdog_interval or _STATUS_INTERVAL, _STATUS_INTERVAL)
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._beat)

    def _beat(self) -> None:
        if self.notifier.watchdog_interval is not None:
            self.notifier.watchdog()
        if not self._stop.is_set():
            self.notifier.status(self.status_line())
        self._schedule_heartbeat()

    async def _drain(self) -> None:
        self._close_listeners()
        await self._health.stop()
        grace = self.config.limits.shutdown_grace
        if self._connections:
            log.info("draining", connections=len(self._connections), grace_seconds=grace)
            await self._connections_closed(grace)
            for connection in list(self._connections):
                connection.cancel()
            await self._connections_closed(None)
        for resolver in list(self._resolver_users):
            if resolver is not self.resolver:  # its connections were cut above
                self._retire(resolver)
        if self._closing:
            await asyncio.wait(set(self._closing))
        if self.resolver is not None:
            await self.resolver.close()
        log.info("stopped")

    async def _connections_closed(self, timeout: float | None) -> None:
        """Until every connection has ended, or `timeout` seconds."""
        if not self._connections:
            return
        self._all_done = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._all_done], timeout=timeout)

    def _close_listeners(self) -> None:
        loop = asyncio.get_event_loop()
        for entry in self._listening:
            if not entry.paused:
                loop.remove_reader(entry.sock.fileno())
            entry.sock.close()
        self._listening.clear()

    # -- accepting ------------------------------------------------------------------------------

    def _watch(self, entry: _Listening) -> None:
        entry.paused = False
        # Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt here, none per
        # connection.
        with contextlib.suppress(OSError):
            entry.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        loop.add_reader(entry.sock.fileno(), self._accept, entry, loop)

    def _accept(self, entry: _Listening, loop: asyncio.AbstractEventLoop) -> None:
        """One connection per wake-up, as nginx's default (multi_accept off): every worker watches the
        same listening socket, so the next connection goes to whichever worker is back in its loop
        first, never to one that is still busy with a batch. Measured in `make bench` (2 workers,
        rate workload): 0.71x nginx's connections/s and p99 1.17x, against 0.60x and 1.42x when a
        wake-up accepted up to 64."""
        listening = entry.sock
        family, kind, proto = entry.kind
        try:
            # socket.accept() without its Python wrapper's enum conversions, into the C socket type
            # itself (socket.socket's Python __init__ and close() cost ~1 us each per connection, for
            # io-reference counting only makefile() needs); non-blocking from here on (one ioctl:
            # accept4 in Python sets no SOCK_NONBLOCK).
            fd, address = listening._accept()
            client = raw_socket(family, kind, proto, fd)
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up while queued
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("accept_paused", listener=entry.name, error=exc.strerror,
                            retry_seconds=_ACCEPT_BACKOFF)
                loop.remove_reader(entry.sock.fileno())
                entry.paused = True
                loop.call_later(_ACCEPT_BACKOFF, self._resume_accept, entry)
                return
            if exc.errno == errno.EPROTO:
                return
            raise
        self._start_connection(entry, client, address, loop)

    def _resume_accept(self, entry: _Listening) -> None:
        if entry in self._listening and entry.paused:
            self._watch(entry)

    def _start_connection(self, entry: _Listening, client: socket.socket, address: tuple,
                          loop: asyncio.AbstractEventLoop) -> None:
        client.setblocking(False)
        policy = self._policies[entry.name]
        limits = policy.limits
        ip = address[0]
        outcome = None
        if len(self._connections) >= max(1, limits.max_connections // self.workers):
            outcome = "over_limit"
        elif limits.max_connections_per_ip and self._per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            outcome = "over_limit_per_ip"
        if outcome is not None:
            # Closed before reading a byte: shedding load must cost next to nothing.
            self.rejected_over_limit += 1
            client.close()
            metrics.connection_rejected(entry.name, outcome)
            if policy.access_log:
                getattr(access_log, access_level(outcome))("access", client=peer_text(address),
                                listener=entry.name, outcome=outcome, state="accepted",
                                bytes_up=0, bytes_down=0, duration_ms=0.0)
            return
        self.accepted += 1
        resolver = self.resolver
        assert resolver is not None
        connection = Connection(client, address, entry.name, policy, resolver, self.relay, loop,
                                self.balancer, self._connection_done)
        self._connections.add(connection)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._resolver_users[resolver] = self._resolver_users.get(resolver, 0) + 1
        connection.start()  # may end (and call _connection_done) before it returns

    def _connection_done(self, connection: Connection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)
        ip, resolver = connection.peer_ip, connection.resolver
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]
        users = self._resolver_users.get(resolver)
        if users is None:  # already retired by _drain
            return
        if users > 1:
            self._resolver_users[resolver] = users - 1
        else:
            del self._resolver_users[resolver]
            if resolver is not self.resolver:
                self._retire(resolver)


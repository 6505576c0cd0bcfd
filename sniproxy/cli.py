# Command-line entry point: argument parsing and exit codes only. The only place that exits.
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import sys
from typing import TYPE_CHECKING

import structlog

from sniproxy import __version__
from sniproxy import log as logconf
from sniproxy.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    import socket

    from sniproxy.dataplane import XdpGate
    from sniproxy.dnscache import DnsCache
    from sniproxy.listeners import WorkerSockets
    from sniproxy.privileges import Account
    from sniproxy.relay import Relay

DEFAULT_CONFIG = "config.toml"
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sniproxy", description="TLS SNI proxy with an eBPF data plane")
    parser.add_argument("--version", action="version", version=f"sniproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    run.add_argument("--log-format", choices=("json", "console"), help="override [log] format")
    check = commands.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    allow = commands.add_parser("allow", help="show or edit the running proxy's XDP allow-list "
                                "(live only: config.toml is not changed)")
    allow.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                       help="config file whose [ebpf] pin_dir to use (default: %(default)s)")
    allow.add_argument("--pin-dir", help="bpffs directory of the running proxy (overrides -c)")
    allow_ops = allow.add_subparsers(dest="allow_command", required=True)
    _pin_options(allow_ops.add_parser("list", help="print the live allow-list and the filter's counters"))
    _pin_options(allow_ops.add_parser("add", help="let a CIDR in")).add_argument("cidr")
    delete = _pin_options(allow_ops.add_parser("del", help="stop letting a CIDR in"))
    delete.add_argument("cidr")
    delete.add_argument("--force", action="store_true", help="allow removing the last entry")
    dns = commands.add_parser("dns", help="list the pinned DNS cache (names, addresses, TTL left), "
                              "or flush it; no running proxy needed")
    dns.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                     help="config file whose [ebpf] pin_dir to use (default: %(default)s)")
    dns.add_argument("--pin-dir", help="bpffs directory holding dns_cache (overrides -c)")
    dns_ops = dns.add_subparsers(dest="dns_command")
    _pin_options(dns_ops.add_parser("flush", help="forget one name, or every name")).add_argument(
        "name", nargs="?")
    stats = commands.add_parser("stats", help="print the kernel's byte counters and the top spliced "
                                "connections from the pinned maps; no running proxy needed")
    stats.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                       help="config file whose [ebpf] pin_dir to use (default: %(default)s)")
    stats.add_argument("--pin-dir", help="bpffs directory of the proxy's maps (overrides -c)")
    stats.add_argument("--top", type=int, default=10, help="connections to list (default: %(default)s)")
    stats.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    return parser


def _pin_options(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """-c/--pin-dir accepted after the action too (`sniproxy allow list -c FILE`). SUPPRESS: when
    not given here, the value parsed before the action (or its default) stands."""
    sub.add_argument("-c", "--config", default=argparse.SUPPRESS,
                     help="config file whose [ebpf] pin_dir to use")
    sub.add_argument("--pin-dir", default=argparse.SUPPRESS, help="bpffs directory (overrides -c)")
    return sub


def _check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"sniproxy: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    routes = sum(len(t.routes) for t in config.tables.values())
    print(f"{path}: ok ({len(config.listeners)} listener(s), {len(config.tables)} table(s), {routes} route(s))")
    return 0


def _run(path: str, log_format: str | None) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"sniproxy: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logconf.configure(log_format or config.log.format, config.log.level)
    from sniproxy.privileges import PrivilegeError, lookup_user
    from sniproxy.workers import worker_count

    try:
        user = lookup_user(config.server.user)  # before any set-up: a missing user is a config error
    except PrivilegeError as exc:
        print(f"sniproxy: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    workers = worker_count(config.server.workers)
    return _run_one(config, user) if workers == 1 else _run_workers(config, workers, user)


def _run_one(config: Config, user: Account) -> int:
    import uvloop

    from sniproxy.dataplane import DataPlaneError, open_dns_cache, open_relay, open_xdp
    from sniproxy.pinlock import hold_pin_dir
    from sniproxy.resolver import Resolver
    from sniproxy.server import Server
    from sniproxy.systemd import Notifier

    phase = ["start"]  # where an error ends the run: logged as start_failed, serve_failed or stop_failed

    async def main() -> None:
        with hold_pin_dir(config, user.uid), open_relay(config.ebpf) as relay:
            # The XDP gate goes up before the listeners bind: no client outside the allow-list can
            # finish a handshake into the accept queue in between.
            ports = [listener.bind.port for listener in config.listeners]
            with open_xdp(config.xdp, config.ebpf.pin_dir, ports) as xdp, \
                    open_dns_cache(config.ebpf, config.resolver) as dns_cache, \
                    _metrics(config, relay, xdp, dns_cache, 1):
                resolver = Resolver(config.resolver, dns_cache)
                server = Server(config, relay=relay, xdp=xdp, resolver=resolver,
                                notifier=Notifier.from_environ())
                server.bind()
                _drop_privileges(config, user)
                phase[0] = "serve"
                await server.serve()
                phase[0] = "stop"  # what is left: unpinning and detaching on the way out

    from sniproxy.privileges import PrivilegeError

    try:
        uvloop.run(main())
    except (OSError, DataPlaneError, PrivilegeError) as exc:  # e.g. the address is taken: one line, not a traceback
        structlog.get_logger("sniproxy").error(f"{phase[0]}_failed", error=str(exc))
        return 1
    return 0


def _run_workers(config: Config, workers: int, user: Account) -> int:
    """The supervisor: BPF objects, XDP, the DNS cache map and every worker's listening sockets are
    set up here once, privileges dropped, then the workers are forked (they inherit all of it)."""
    from sniproxy.dataplane import DataPlaneError, open_dns_cache, open_relay, open_xdp
    from sniproxy.listeners import WorkerSockets
    from sniproxy.pinlock import hold_pin_dir
    from sniproxy.privileges import PrivilegeError
    from sniproxy.systemd import Notifier
    from sniproxy.workers import Supervisor

    phase = "start"  # where an error ends the run: logged as start_failed, serve_failed or stop_failed
    try:
        with hold_pin_dir(config, user.uid), open_relay(config.ebpf) as relay:
            ports = [listener.bind.port for listener in config.listeners]
            with open_xdp(config.xdp, config.ebpf.pin_dir, ports) as xdp, \
                    open_dns_cache(config.ebpf, config.resolver) as dns_cache, \
                    _metrics(config, relay, xdp, dns_cache, workers):
                sockets = WorkerSockets(config.listeners)
                # What a worker started from now on serves: the last file whose listeners were bound.
                current = [config]
                gated = frozenset(ports) if xdp is not None else None
                try:
                    _drop_privileges(config, user)

                    def serve(index: int, channel: int, inbox: int) -> int:
                        # Worker 0 alone applies xdp.allow on reload: one writer for the shared list.
                        return _serve_worker(current[0], relay, xdp if index == 0 else None, dns_cache,
                                             [sock for _, sock in sockets.shared()], index,
                                             workers, channel, inbox)

                    def reconfigure() -> str | None:
                        new = _supervisor_reload(config.source, sockets, gated)
                        if isinstance(new, str):
                            return new
                        current[0] = new
                        return None

                    phase = "serve"
                    code = Supervisor(workers, sockets, serve, Notifier.from_environ(),
                                      config.limits.shutdown_grace, reconfigure,
                                      on_worker_exit=lambda index: relay.forget_worker(index, workers)).run()
                    phase = "stop"
                    return code
                finally:
                    sockets.close()
    except (OSError, DataPlaneError, PrivilegeError) as exc:
        structlog.get_logger("sniproxy").error(f"{phase}_failed", error=str(exc))
        return 1


def _supervisor_reload(source: str, sockets: WorkerSockets,
                       gated: frozenset[int] | None) -> Config | str:
    """The supervisor's part of SIGHUP: bind the new file's new listeners for every worker and close
    the removed ones' sockets. The new Config, or why not (logged) when the file or a bind failed: the
    workers then refuse their reload too, for want of the sockets."""
    from sniproxy.listeners import ListenerError, listener_name, ungated

    log = structlog.get_logger("sniproxy.workers")
    try:
        config = load_config(source)
        running = {listener_name(lst) for lst in sockets.listeners}
        why = ungated([lst for lst in config.listeners if listener_name(lst) not in running], gated)
        if why is not None:
            raise ListenerError(why)
        added, removed = sockets.update(config.listeners)
    except (ConfigError, ListenerError) as exc:
        log.error("reload_failed", error=str(exc), kept="previous listeners")
        return str(exc)
    if added or removed:
        log.info("listeners_rebound", added=added, removed=removed)
    return config


def _serve_worker(config: Config, relay: Relay, xdp: XdpGate | None, dns_cache: DnsCache,
                  sockets: list[socket.socket], index: int, workers: int, channel: int,
                  inbox: int) -> int:
    """One worker's life, in the forked child: its own event loop, resolver and connections."""
    import uvloop

    from sniproxy.listeners import WorkerInbox
    from sniproxy.resolver import Resolver
    from sniproxy.server import Server
    from sniproxy.workers import ChannelNotifier

    relay.use_worker(index, workers)

    async def main() -> None:
        resolver = Resolver(config.resolver, dns_cache)
        server = Server(config, relay=relay, xdp=xdp, resolver=resolver, notifier=ChannelNotifier(channel),
                        workers=workers, listener_source=WorkerInbox(inbox))
        server.adopt(list(sockets))
        await server.serve()

    uvloop.run(main())
    return 0


def _metrics(config: Config, relay: Relay, xdp: XdpGate | None, dns_cache: DnsCache,
             workers: int) -> contextlib.AbstractContextManager[object]:
    """The /metrics endpoint ([metrics] bind) for the block, in this process: the one holding the
    kernel objects, and the workers' supervisor."""
    from sniproxy import metrics

    sources = metrics.KernelSources(
        relay_mode=relay.mode,
        splice_pin_dir=config.ebpf.pin_dir if relay.mode == "splice" else None,
        dns_pin_dir=config.ebpf.pin_dir if dns_cache.kind == "kernel" else None,
        xdp=xdp)
    return metrics.serving(config.metrics.bind, workers, sources)


def _drop_privileges(config: Config, user: Account) -> None:
    """Listeners are bound and BPF objects loaded and pinned: no capability is needed any more, nor
    uid 0. Map updates go through file descriptors already open, XDP is held by a bpf_link whose fd
    this process owns, and unpinning at stop is an unlink in pin_dir, which the user then owns, through
    a descriptor opened before the drop (kernel.loader.PinDir). Raises PrivilegeError: keeping what
    was meant to be dropped is a failed start, never a warning."""
    from sniproxy.privileges import drop_privileges

    log = structlog.get_logger("sniproxy")
    if os.geteuid() != 0 and os.geteuid() != user.uid:
        log.warning("user_unchanged", user=config.server.user, uid=os.geteuid(),
                    reason="not started as root: the proxy keeps running as the user that started it")
    # The metrics' multiprocess files are written by the workers, which run as `user` too.
    owned = [config.ebpf.pin_dir, *filter(None, [os.environ.get("PROMETHEUS_MULTIPROC_DIR")])]
    done = drop_privileges(user, owned=owned)
    log.info("capabilities_dropped", before=f"{done.capabilities.before:#x}",
             after=f"{done.capabilities.after:#x}", kept=list(done.capabilities.kept),
             user=pwd_name(done.uid), uid=done.uid, gid=done.gid, no_new_privs=done.no_new_privs)


def pwd_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _pin_dir(args: argparse.Namespace) -> str | None:
    """--pin-dir, else [ebpf] pin_dir of the config file; None (after saying why) if that is invalid."""
    if args.pin_dir is not None:
        return args.pin_dir
    try:
        return load_config(args.config).ebpf.pin_dir
    except ConfigError as exc:
        print(f"sniproxy: invalid config: {exc} (or pass --pin-dir)", file=sys.stderr)
        return None


def _allow(args: argparse.Namespace) -> int:
    """`sniproxy allow list | add CIDR | del CIDR` on the allow-list the running proxy pinned."""
    pin_dir = _pin_dir(args)
    if pin_dir is None:
        return EXIT_CONFIG
    from sniproxy.dataplane import DataPlaneError, PinnedAllowList

    not_saved = (f"live allow-list only: {args.config} is not changed, and the next restart or "
                 f"SIGHUP sets the list back to its xdp.allow")
    try:
        with PinnedAllowList(pin_dir) as allow_list:
            if allow_list.in_use() is False:
                print(f"sniproxy: warning: no running XDP filter uses the allow-list in {pin_dir} "
                      f"(left behind by a proxy that was killed?)", file=sys.stderr)
            if args.allow_command == "list":
                for cidr in allow_list.entries():
                    print(cidr)
                verdicts = allow_list.verdicts()
                if verdicts is not None:
                    print(" ".join(f"{k}={v}" for k, v in verdicts.items()), file=sys.stderr)
                return 0
            cidr = str(ipaddress.ip_network(args.cidr.strip(), strict=True))
            if args.allow_command == "add":
                added = allow_list.add(cidr)
                print(f"{'added' if added else 'already present:'} {cidr} ({not_saved})")
                return 0
            if args.allow_command == "del":
                entries = allow_list.entries()
                if cidr not in entries:
                    print(f"sniproxy: {cidr} is not in the allow-list", file=sys.stderr)
                    return 1
                if entries == [cidr] and not args.force:
                    print(f"sniproxy: refusing to remove the last entry ({cidr}): every client would "
                          f"be dropped; use --force to do it anyway", file=sys.stderr)
                    return 1
                allow_list.delete(cidr)
                print(f"removed {cidr} ({not_saved})")
                return 0
    except ValueError as exc:  # a malformed CIDR
        print(f"sniproxy: not a CIDR: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DataPlaneError as exc:
        print(f"sniproxy: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.allow_command)


def _dns(args: argparse.Namespace) -> int:
    """`sniproxy dns [flush [NAME]]` on the dns_cache map pinned under [ebpf] pin_dir."""
    pin_dir = _pin_dir(args)
    if pin_dir is None:
        return EXIT_CONFIG
    from sniproxy.dataplane import DataPlaneError, pinned_dns_cache
    from sniproxy.dnscache import now, render

    try:
        cache = pinned_dns_cache(pin_dir)
    except DataPlaneError as exc:
        print(f"sniproxy: {exc}", file=sys.stderr)
        return 1
    try:
        if args.dns_command == "flush":
            name = args.name.lower().rstrip(".") if args.name else None
            removed = cache.flush(name)
            if name is not None and not removed:
                print(f"sniproxy: {name} is not cached", file=sys.stderr)
                return 1
            print(f"flushed {name if name else f'{removed} name(s)'}")
            return 0
        for line in render(list(cache.entries()), now()):
            print(line)
        return 0
    except OSError as exc:
        print(f"sniproxy: {cache.path}: {exc}", file=sys.stderr)
        return 1
    finally:
        cache.close()


def _stats(args: argparse.Namespace) -> int:
    pin_dir = _pin_dir(args)
    if pin_dir is None:
        return EXIT_CONFIG
    from sniproxy import stats

    return stats.run(pin_dir, max(args.top, 0), args.json)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a pipe closed early shows here, inside the try, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`sniproxy stats --json | head -c 900`): no traceback. Point stdout at
        # /dev/null so the interpreter's final flush does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    if args.command == "run":
        return _run(args.config, args.log_format)
    if args.command == "allow":
        return _allow(args)
    if args.command == "dns":
        return _dns(args)
    if args.command == "stats":
        return _stats(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

# Command-line entry point: argument parsing and exit codes only. The only place that exits.
from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from sniproxy import __version__
from sniproxy import log as logconf
from sniproxy.config import ConfigError, load_config

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
    return parser


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
    import uvloop

    from sniproxy.dataplane import open_relay
    from sniproxy.server import Server

    async def main() -> None:
        with open_relay(config.ebpf) as relay:
            server = Server(config, relay=relay)
            server.bind()
            await server.serve()

    try:
        uvloop.run(main())
    except OSError as exc:  # e.g. the listen address is taken: say so in one line, not a traceback
        structlog.get_logger("sniproxy").error("start_failed", error=str(exc))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    if args.command == "run":
        return _run(args.config, args.log_format)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

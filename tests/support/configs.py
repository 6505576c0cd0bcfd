# TOML text for test proxies: small builders so each test states only the routes it is about.
from __future__ import annotations


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def listener(bind: str, table: str = "default") -> str:
    return f'[[listener]]\nbind = {toml_str(bind)}\nprotocol = "tls"\ntable = {toml_str(table)}\n\n'


def table(name: str, routes: list[tuple[str, str]], fallback: str | None = None) -> str:
    lines = [f"[table.{name}]", "routes = ["]
    lines += [f"  {{ match = {toml_str(m)}, backend = {toml_str(b)} }}," for m, b in routes]
    lines.append("]")
    if fallback:
        lines.append(f"fallback = {toml_str(fallback)}")
    return "\n".join(lines) + "\n\n"


def common(nameserver: str | None = None, splice: bool = False, pin_dir: str | None = None,
           limits: dict[str, float] | None = None) -> str:
    out = "[resolver]\n"
    out += f"nameservers = [{toml_str(nameserver)}]\n" if nameserver else "nameservers = []\n"
    out += "timeout = 1.0\n\n[limits]\n"
    merged = {"client_hello_timeout": 5.0, "connect_timeout": 3.0, "idle_timeout": 60.0,
              "max_connections": 10000, "shutdown_grace": 5.0}
    merged.update(limits or {})
    out += "".join(f"{k} = {v}\n" for k, v in merged.items())
    out += f"\n[log]\nformat = \"json\"\n\n[ebpf]\nsplice = {'true' if splice else 'false'}\n"
    if pin_dir:
        out += f"pin_dir = {toml_str(pin_dir)}\n"
    return out

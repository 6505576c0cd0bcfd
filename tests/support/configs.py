# TOML text for test proxies: small builders so each test states only the routes it is about.
from __future__ import annotations


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def listener(bind: str, table: str = "default", protocol: str = "tls") -> str:
    return (f'[[listener]]\nbind = {toml_str(bind)}\nprotocol = {toml_str(protocol)}\n'
            f'table = {toml_str(table)}\n\n')


def table(name: str, routes: list[tuple[str, ...]], fallback: str | None = None,
          allow_private: bool | list[str] = False) -> str:
    """routes: (match, backend) or (match, backend, proxy_protocol) tuples."""
    lines = [f"[table.{name}]", "routes = ["]
    for route in routes:
        extra = f", proxy_protocol = {toml_str(route[2])}" if len(route) > 2 else ""
        lines.append(f"  {{ match = {toml_str(route[0])}, backend = {toml_str(route[1])}{extra} }},")
    lines.append("]")
    if fallback:
        lines.append(f"fallback = {toml_str(fallback)}")
    if allow_private is True:
        lines.append("allow_private_backends = true")
    elif allow_private:
        lines.append("allow_private_backends = [" + ", ".join(toml_str(n) for n in allow_private) + "]")
    return "\n".join(lines) + "\n\n"


def common(nameserver: str | None = None, splice: bool = False, pin_dir: str | None = None,
           limits: dict[str, float] | None = None, kernel_cache: bool | None = None,
           splice_after: int = 0) -> str:
    """kernel_cache defaults to `splice`, so a proxy that splices in its own pin_dir also caches names
    there, and one that does not never touches the shared default pin dir. A splicing proxy hands
    every connection to the kernel at once (splice_after = 0) unless told otherwise: these tests are
    about the kernel path; tests/kernel/test_handoff.py covers the threshold."""
    out = "[resolver]\n"
    out += f"nameservers = [{toml_str(nameserver)}]\n" if nameserver else "nameservers = []\n"
    kernel = splice if kernel_cache is None else kernel_cache
    out += f"kernel_cache = {'true' if kernel else 'false'}\n"
    out += "timeout = 1.0\n\n[limits]\n"
    merged = {"client_hello_timeout": 5.0, "connect_timeout": 3.0, "idle_timeout": 60.0,
              "max_connections": 10000, "shutdown_grace": 5.0}
    merged.update(limits or {})
    out += "".join(f"{k} = {v}\n" for k, v in merged.items())
    out += f"\n[log]\nformat = \"json\"\n\n[ebpf]\nsplice = {'true' if splice else 'false'}\n"
    if splice:
        out += f"splice_after = {splice_after}\n"
    if pin_dir:
        out += f"pin_dir = {toml_str(pin_dir)}\n"
    return out

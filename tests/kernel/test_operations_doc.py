"""docs/operations.md's `bpftool map show pinned` listing against the real maps (issue 15: it said
conn_ctl values are 16 B when they were 24; the relay rework since replaced those maps). Every map the
splice data plane, the DNS cache and the XDP allow-list pin is loaded for real into one pin_dir, and
the names, types, key/value sizes and max_entries bpftool reports must be the ones the doc shows."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path

from sniproxy.kernel.dnsmap import DnsMap
from sniproxy.kernel.loader import DataPlane
from sniproxy.kernel.probe import probe
from sniproxy.kernel.xdp import XdpAllowList, parse_network

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_SHOW = re.compile(r"^\s+\d+: (\w+)\s+name (\w+)\s+flags \S+\n\s+key (\d+)B\s+value (\d+)B\s+max_entries (\d+)",
                   re.M)


def documented() -> tuple[list[str], dict[str, tuple[str, int, int, int]]]:
    text = DOC.read_text()
    ls = re.search(r"\$ ls /sys/fs/bpf/sniproxy\n\s+(.+)\n", text)
    assert ls is not None, "no `ls /sys/fs/bpf/sniproxy` line in docs/operations.md"
    shown = {m[2]: (m[1], int(m[3]), int(m[4]), int(m[5])) for m in _SHOW.finditer(text)}
    return ls.group(1).split(), shown


def test_the_documented_maps_are_the_real_ones():
    assert probe().available, probe().reason
    names, shown = documented()
    pin_dir = f"/sys/fs/bpf/sniproxy-test-doc-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(DataPlane.load(pin_dir))
        stack.enter_context(DnsMap.load(pin_dir, 10000))
        stack.enter_context(XdpAllowList.load(pin_dir, [8443], [parse_network("10.200.0.0/24")]))
        real = sorted(os.listdir(pin_dir))
        info = {}
        for name in real:
            out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", os.path.join(pin_dir, name)],
                                 capture_output=True, text=True, check=True).stdout
            m = json.loads(out)
            info[name] = (m["type"], m["bytes_key"], m["bytes_value"], m["max_entries"])
        stack.callback(lambda: [os.unlink(os.path.join(pin_dir, n)) for n in os.listdir(pin_dir)
                                if n == "dns_cache"])
    with contextlib.suppress(OSError):
        os.rmdir(pin_dir)
    assert sorted(names) == real
    assert set(shown) == set(real)
    for name in real:
        assert shown[name] == info[name], (name, shown[name], info[name])

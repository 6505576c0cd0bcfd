"""relay.handoff.BufferSizes: what a handed-off socket's buffers are set to, from the process's
capability and the machine's sysctls (given here as values: the decision is a table)."""
from __future__ import annotations

import pytest

from sniproxy.relay.handoff import BufferSizes

MiB = 1 << 20


def sysctls(wmem_max: int, tcp_wmem_max: int = 4 * MiB, rmem_max: int = 208 * 1024,
            tcp_rmem_max: int = 6 * MiB):
    values = {"net.core.wmem_max": [wmem_max], "net.ipv4.tcp_wmem": [4096, 16384, tcp_wmem_max],
              "net.core.rmem_max": [rmem_max], "net.ipv4.tcp_rmem": [4096, 131072, tcp_rmem_max]}
    return lambda name: values[name]


def test_with_cap_net_admin_every_size_is_forced():
    sizes = BufferSizes.plan(16 * MiB, 2 * MiB, privileged=True, sysctl=sysctls(208 * 1024))
    assert (sizes.sndbuf, sizes.rcvbuf) == (16 * MiB, 2 * MiB)


def test_unprivileged_under_the_cap_gets_what_it_asks():
    # What systemd/sniproxy-sysctl.conf sets up: net.core.wmem_max = 8 MiB, the default send buffer.
    sizes = BufferSizes.plan(8 * MiB, None, privileged=False, sysctl=sysctls(8 * MiB))
    assert (sizes.sndbuf, sizes.rcvbuf, sizes.note) == (8 * MiB, None, "as configured")


def test_a_cap_at_least_half_of_autotuning_is_used_and_said():
    sizes = BufferSizes.plan(16 * MiB, None, privileged=False, sysctl=sysctls(4 * MiB, tcp_wmem_max=4 * MiB))
    assert sizes.sndbuf == 4 * MiB
    assert "net.core.wmem_max = 4194304" in sizes.note


@pytest.mark.parametrize("wmem_max", [208 * 1024, 1 * MiB])
def test_a_cap_below_autotuning_leaves_the_buffer_alone(wmem_max):
    # Debian's default net.core.wmem_max (208 KiB) would lock a 416 KiB buffer, well below the 4 MiB
    # that autotuning reaches: locking it would make the kernel path slower than no setting at all.
    sizes = BufferSizes.plan(16 * MiB, None, privileged=False, sysctl=sysctls(wmem_max))
    assert sizes.sndbuf is None
    assert "autotuning" in sizes.note and "CAP_NET_ADMIN" in sizes.note


def test_receive_buffer_follows_the_same_rule():
    assert BufferSizes.plan(None, 2 * MiB, privileged=False, sysctl=sysctls(0, rmem_max=4 * MiB)).rcvbuf == 2 * MiB
    assert BufferSizes.plan(None, 2 * MiB, privileged=False, sysctl=sysctls(0)).rcvbuf is None


def test_the_shipped_sysctl_file_lets_unprivileged_workers_have_the_default_buffers():
    # systemd/sniproxy-sysctl.conf raises net.core.{w,r}mem_max so that workers without
    # CAP_NET_ADMIN get DEFAULT_SNDBUF and HANDOFF_RCVBUF as they are: kept in step here.
    from pathlib import Path

    from sniproxy.relay.handoff import DEFAULT_SNDBUF, HANDOFF_RCVBUF

    conf = Path(__file__).resolve().parents[2] / "systemd" / "sniproxy-sysctl.conf"
    caps = dict(line.split(" = ") for line in conf.read_text().splitlines() if line and not line.startswith("#"))
    sizes = BufferSizes.plan(DEFAULT_SNDBUF, HANDOFF_RCVBUF, privileged=False, sysctl=sysctls(
        int(caps["net.core.wmem_max"]), rmem_max=int(caps["net.core.rmem_max"]), tcp_rmem_max=32 * MiB))
    assert (sizes.sndbuf, sizes.rcvbuf, sizes.note) == (DEFAULT_SNDBUF, HANDOFF_RCVBUF, "as configured")

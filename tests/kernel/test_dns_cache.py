# The pinned dns_cache map on this kernel: layout (ctypes mirrors vs BTF), what bpftool shows, pins
# that survive and are reused, stale pins of another layout or size, expiry, LRU order under the
# proxy's reads (on a created and on a reopened pin), a race to pin, the `sniproxy dns` command,
# [resolver] kernel_cache and the fallback to memory, and the restart tests: a second proxy process
# serves names the first one resolved without asking the DNS server, also with only the systemd
# unit's four capabilities. Nothing is mocked; every test pins under its own
# /sys/fs/bpf/sniproxy-test-dns-* directory and removes it.
from __future__ import annotations

import ctypes as ct
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from sniproxy.config import Address, EbpfConfig, ResolverConfig
from sniproxy.dataplane import open_dns_cache
from sniproxy.dnscache import QUERIED_A, QUERIED_AAAA, BpfDnsCache, CachedAnswer, MemoryDnsCache, now
from sniproxy.kernel import dnsmap
from sniproxy.kernel.dnsmap import DnsMap
from sniproxy.kernel.probe import probe
from sniproxy.resolver import Resolver
from tests.conftest import free_port
from tests.support import configs
from tests.support.backends import TlsBackend, client_context, server_context, who
from tests.support.pins import remove_pin_dir
from tests.support.proxyproc import REPO

BOTH = QUERIED_A | QUERIED_AAAA
_dirs = itertools.count()


@pytest.fixture
def pin_dir() -> Iterator[str]:
    assert probe().available, f"kernel data plane unavailable here: {probe().reason}"
    path = f"/sys/fs/bpf/sniproxy-test-dns-{os.getpid()}-{next(_dirs)}"
    yield path
    remove_pin_dir(path)
    assert not os.path.exists(path)


@pytest.fixture
def cache(pin_dir: str) -> Iterator[BpfDnsCache]:
    c = BpfDnsCache(DnsMap.load(pin_dir, 1024))
    yield c
    c.close()


def answer(v4=(), v6=(), ttl=60.0, queried=BOTH, nxdomain=False) -> CachedAnswer:
    at = now()
    return CachedAnswer(tuple(v4), tuple(v6), at + ttl, ttl, at, queried, nxdomain)


def bpftool(*args: str) -> object:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def sniproxy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sniproxy", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def open_lru_sizes() -> list[int]:
    """max_entries of every lru_hash map this process holds an fd of (from /proc/self/fdinfo)."""
    sizes = []
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if info.get("map_type", "").strip() == str(dnsmap.BPF_MAP_TYPE_LRU_HASH):
            sizes.append(int(info["max_entries"]))
    return sizes


def test_ctypes_mirrors_match_btf(cache: BpfDnsCache, pin_dir: str) -> None:
    shown = bpftool("map", "show", "pinned", f"{pin_dir}/dns_cache")
    assert shown["type"] == "lru_hash" and shown["name"] == "dns_cache" and shown["max_entries"] == 1024
    structs = {t["name"]: t for t in bpftool("btf", "dump", "id", str(shown["btf_id"]))["types"]
               if t.get("kind") == "STRUCT" and t.get("name")}
    for name, mirror in dnsmap.MIRRORS.items():
        c = structs[name]
        assert c["size"] == ct.sizeof(mirror), name
        assert [(m["name"], m["bits_offset"] // 8) for m in c["members"]] == \
            [(f, getattr(mirror, f).offset) for f, _ in mirror._fields_], name


def test_bpftool_dump_shows_hostnames_and_addresses(cache: BpfDnsCache, pin_dir: str) -> None:
    cache.put("app.example.test", answer(["192.0.2.1", "192.0.2.2"], ["2001:db8::1"]))
    text = subprocess.run(["bpftool", "map", "dump", "pinned", f"{pin_dir}/dns_cache"],
                          check=True, capture_output=True, text=True).stdout
    assert '"name": "app.example.test"' in text
    assert '"v4": ["192.0.2.1","192.0.2.2",""' in text and '"v6": ["2001:db8::1",""' in text
    (entry,) = bpftool("map", "dump", "pinned", f"{pin_dir}/dns_cache")
    value = entry["formatted"]["value"] if "formatted" in entry else entry["value"]
    assert value["n_v4"] == 2 and value["n_v6"] == 1 and value["flags"] == BOTH
    assert value["version"] == dnsmap.DNS_CACHE_VERSION and value["ttl_ms"] == 60000


def test_keys_are_whole_names_and_entries_round_trip(cache: BpfDnsCache) -> None:
    long_name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters: the longest hostname
    names = ["a.test", "a.test.example", "aa.test", long_name, long_name[:-1] + "c"]
    for i, name in enumerate(names):
        cache.put(name, answer([f"192.0.2.{i}"]))
    for i, name in enumerate(names):
        assert cache.get(name).v4 == (f"192.0.2.{i}",), name
    full = answer([f"198.51.100.{i}" for i in range(8)],
                  [f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}" for i in range(8)])
    cache.put("full.test", full)
    got = cache.get("full.test")
    assert got.v4 == full.v4 and got.v6 == full.v6 and got.queried == BOTH and not got.nxdomain
    assert got.expires == pytest.approx(full.expires, abs=1e-6) and got.ttl == 60.0
    cache.put("nx.test", answer(ttl=5, nxdomain=True))
    assert cache.get("nx.test").nxdomain and cache.get("nx.test").negative
    cache.put("a-only.test", answer(queried=QUERIED_A))
    assert cache.get("a-only.test").queried == QUERIED_A
    # A name that cannot be a key is never cached, quietly (it is not a map failure).
    with capture_logs() as logs:
        cache.put("x" * 300, answer(["192.0.2.1"]))
        assert cache.get("x" * 300) is None and cache.flush("x" * 300) == 0
    assert logs == []


def test_expired_entries_are_never_served(cache: BpfDnsCache) -> None:
    cache.put("stale.test", answer(["192.0.2.9"], ttl=0.05))
    assert cache.get("stale.test") is not None
    import time

    time.sleep(0.06)
    assert cache.get("stale.test") is None
    # Still in the map (the kernel has no per-entry TTL) until overwritten or evicted:
    assert [n for n, _ in cache.entries()] == ["stale.test"]
    cache.put("stale.test", answer(["192.0.2.10"]))
    assert cache.get("stale.test").v4 == ("192.0.2.10",)


def test_the_pin_survives_close_and_is_reused_without_a_compile(pin_dir: str) -> None:
    first = BpfDnsCache(DnsMap.load(pin_dir, 1024))
    first.put("kept.test", answer(["192.0.2.3"]))
    first.close()
    assert os.path.exists(f"{pin_dir}/dns_cache")
    reader = BpfDnsCache(DnsMap.open(pin_dir))  # what `sniproxy dns` uses: no BCC, no program
    try:
        assert reader.get("kept.test").v4 == ("192.0.2.3",)
    finally:
        reader.close()
    second = BpfDnsCache(DnsMap.load(pin_dir, 1024))
    try:
        assert second.get("kept.test").v4 == ("192.0.2.3",)
    finally:
        second.close()


def test_a_reopened_pin_is_the_map_the_program_reads(pin_dir: str) -> None:
    DnsMap.load(pin_dir, 1024).close()
    pinned_id = bpftool("map", "show", "pinned", f"{pin_dir}/dns_cache")["id"]
    dns_map = DnsMap.load(pin_dir, 1024)
    try:
        assert dns_map.info.id == pinned_id
        # The program reads the pinned map, not the stand-in it was compiled against, and the
        # stand-in is gone: no one-entry lru_hash is left open in this process.
        readers = [p for p in bpftool("prog", "show") if pinned_id in p.get("map_ids", [])]
        assert [(p["name"], p["map_ids"]) for p in readers] == [("dns_lookup", [pinned_id])]
        assert open_lru_sizes().count(1) == 0 and 1024 in open_lru_sizes()
        at = dnsmap.boottime_ns()
        dns_map.update("seen.test", dnsmap.Entry(at + 10**10, at, 10_000, BOTH, ("192.0.2.1",), ()))
        assert dns_map.lookup("seen.test").v4 == ("192.0.2.1",)  # through dns_lookup
    finally:
        dns_map.close()
    assert not [p for p in bpftool("prog", "show") if pinned_id in p.get("map_ids", [])]


def test_the_loser_of_a_race_to_pin_uses_the_winners_map(pin_dir: str) -> None:
    # Two proxies starting at once both find no pin: the one whose BPF_OBJ_PIN gets EEXIST must
    # load its program against the map the other one pinned, not keep a private map.
    winner = DnsMap.load(pin_dir, 1024)
    loser = dnsmap._load(f"{pin_dir}/dns_cache", 1024, None)  # as if it had found no pin
    try:
        assert dnsmap.map_info(loser.map_fd).id == winner.info.id
        at = dnsmap.boottime_ns()
        winner.update("race.test", dnsmap.Entry(at + 10**10, at, 10_000, BOTH, ("192.0.2.8",), ()))
        assert DnsMap(winner.path, loser.map_fd, loser).lookup("race.test").v4 == ("192.0.2.8",)
    finally:
        loser.close()
        winner.close()


@pytest.mark.parametrize("spec", [
    ("lru_hash", 256, 8),    # another value layout: BCC would reuse it silently
    ("hash", 256, ct.sizeof(dnsmap.DnsEntry)),  # right sizes, wrong map type
])
def test_a_stale_pin_of_another_layout_is_replaced_with_a_warning(pin_dir: str, spec) -> None:
    kind, key, value = spec
    os.makedirs(pin_dir)
    subprocess.run(["bpftool", "map", "create", f"{pin_dir}/dns_cache", "type", kind, "key", str(key),
                    "value", str(value), "entries", "16", "name", "dns_cache"], check=True)
    with capture_logs() as logs:
        dns_map = DnsMap.load(pin_dir, 1024)
    try:
        (warning,) = [e for e in logs if e["event"] == "dns_cache_replaced"]
        assert warning["log_level"] == "warning" and "another layout" in warning["reason"]
        assert dns_map.info.value_size == ct.sizeof(dnsmap.DnsEntry) and dns_map.info.max_entries == 1024
        shown = bpftool("map", "show", "pinned", f"{pin_dir}/dns_cache")
        assert shown["type"] == "lru_hash" and shown["bytes_value"] == ct.sizeof(dnsmap.DnsEntry)
    finally:
        dns_map.close()


def test_a_new_cache_size_replaces_the_map_and_keeps_live_entries(pin_dir: str) -> None:
    small = BpfDnsCache(DnsMap.load(pin_dir, 64))
    small.put("live.test", answer(["192.0.2.4"]))
    small.put("dead.test", answer(["192.0.2.5"], ttl=-1))
    small.close()
    with capture_logs() as logs:
        big = BpfDnsCache(DnsMap.load(pin_dir, 4096))
    try:
        (warning,) = [e for e in logs if e["event"] == "dns_cache_resized"]
        assert warning["entries_kept"] == 1 and warning["size"] == 4096
        assert bpftool("map", "show", "pinned", f"{pin_dir}/dns_cache")["max_entries"] == 4096
        assert [n for n, _ in big.entries()] == ["live.test"]
    finally:
        big.close()


@pytest.mark.parametrize("pin", ["created", "reopened"])
def test_the_proxys_reads_keep_hot_names_in_the_lru(pin_dir: str, pin: str) -> None:
    if pin == "reopened":  # the program is then loaded against a map another process pinned
        DnsMap.load(pin_dir, 1024).close()
    dns_map = DnsMap.load(pin_dir, 1024)
    cache = BpfDnsCache(dns_map)
    try:
        hot = [f"hot{i}.test" for i in range(50)]
        for name in hot:
            cache.put(name, answer(["192.0.2.1"]))
        for batch in range(30):  # 3000 new names through a 1024-entry map
            for name in hot:
                assert cache.get(name) is not None, f"{name} evicted after batch {batch}"
            for i in range(100):
                cache.put(f"cold{batch}-{i}.test", answer(["192.0.2.2"]))
        assert all(cache.get(name) is not None for name in hot)
        assert cache.get("cold0-0.test") is None  # the least recently used went
        assert len(list(cache.entries())) <= 1024
    finally:
        cache.close()


def test_syscall_reads_do_not_count_as_uses(pin_dir: str) -> None:
    # Why the proxy reads through the dns_lookup program: the same pattern read with plain
    # BPF_MAP_LOOKUP_ELEM (what `sniproxy dns` does) leaves the LRU in insertion order.
    loaded = DnsMap.load(pin_dir, 1024)
    writer = BpfDnsCache(loaded)
    reader = BpfDnsCache(DnsMap.open(pin_dir))
    try:
        hot = [f"hot{i}.test" for i in range(50)]
        for name in hot:
            writer.put(name, answer(["192.0.2.1"]))
        for batch in range(30):
            for name in hot:
                reader.get(name)
            for i in range(100):
                writer.put(f"cold{batch}-{i}.test", answer(["192.0.2.2"]))
        assert sum(reader.get(name) is not None for name in hot) == 0
    finally:
        reader.close()
        writer.close()


def test_a_failing_map_is_a_miss_logged_once_not_an_error(pin_dir: str) -> None:
    DnsMap.load(pin_dir, 64).close()
    dns_map = DnsMap.open(pin_dir)
    cache = BpfDnsCache(dns_map)
    os.close(dns_map.fd)  # every syscall on it now fails with EBADF
    dns_map._closed = True
    with capture_logs() as logs:
        assert cache.get("any.test") is None
        assert cache.get("other.test") is None
        cache.put("any.test", answer(["192.0.2.1"]))
    assert [(e["event"], e["operation"]) for e in logs] == [("dns_cache_error", "lookup"),
                                                             ("dns_cache_error", "update")]


async def test_resolver_on_the_kernel_map_is_shared_by_a_second_resolver(dns, pin_dir: str) -> None:
    dns.add("shared.test", ["192.0.2.7"], ttl=300)
    config = ResolverConfig(nameservers=(Address(dns.host, dns.port),), timeout=1.0, tries=1)
    first = Resolver(config, BpfDnsCache(DnsMap.load(pin_dir, 1024)))
    assert await first.resolve("shared.test") == ["192.0.2.7"]
    await first.close()
    first.cache.close()
    second = Resolver(config, BpfDnsCache(DnsMap.load(pin_dir, 1024)))
    try:
        assert await second.resolve("shared.test") == ["192.0.2.7"]
        assert dns.count("shared.test") == 2  # the first resolver's A and AAAA only
    finally:
        await second.close()
        second.cache.close()


def test_open_dns_cache_falls_back_to_memory_with_one_reason(tmp_path) -> None:
    resolver = ResolverConfig()
    with capture_logs() as logs, open_dns_cache(EbpfConfig(splice=True, pin_dir=str(tmp_path)), resolver) as c:
        assert isinstance(c, MemoryDnsCache)
    (event,) = [e for e in logs if e["event"] == "dns_cache"]
    assert event["mode"] == "memory" and "not on a bpf filesystem" in event["reason"]
    assert event["log_level"] == "warning"


def test_kernel_cache_false_keeps_names_in_memory_even_when_splicing(pin_dir: str) -> None:
    with capture_logs() as logs, open_dns_cache(EbpfConfig(splice=True, pin_dir=pin_dir),
                                                ResolverConfig(kernel_cache=False)) as c:
        assert isinstance(c, MemoryDnsCache)
    (event,) = [e for e in logs if e["event"] == "dns_cache"]
    assert event["mode"] == "memory" and event["reason"] == "[resolver] kernel_cache = false"
    assert event["log_level"] == "info"  # asked for, not a degradation
    assert not os.path.exists(f"{pin_dir}/dns_cache")


def test_kernel_cache_true_uses_the_map_even_without_splice(pin_dir: str) -> None:
    with capture_logs() as logs, open_dns_cache(EbpfConfig(splice=False, pin_dir=pin_dir),
                                                ResolverConfig(kernel_cache=True)) as c:
        assert isinstance(c, BpfDnsCache) and c.path == f"{pin_dir}/dns_cache"
    (event,) = [e for e in logs if e["event"] == "dns_cache"]
    assert event["mode"] == "kernel"


def test_open_dns_cache_uses_the_kernel_map_when_it_can(pin_dir: str) -> None:
    with capture_logs() as logs, open_dns_cache(EbpfConfig(splice=True, pin_dir=pin_dir),
                                                ResolverConfig(cache_size=2048)) as c:
        assert isinstance(c, BpfDnsCache) and c.path == f"{pin_dir}/dns_cache"
    (event,) = [e for e in logs if e["event"] == "dns_cache"]
    assert event["mode"] == "kernel" and event["size"] == 2048
    assert os.path.exists(f"{pin_dir}/dns_cache")  # closed, still pinned for the next process


def test_cli_lists_and_flushes_the_pinned_cache(cache: BpfDnsCache, pin_dir: str, tmp_path) -> None:
    cache.put("b.test", answer(["192.0.2.1"], ["2001:db8::1"], ttl=300))
    cache.put("a.test", answer(ttl=5, nxdomain=True))
    cache.put("old.test", answer(["192.0.2.2"], ttl=-5))
    config = tmp_path / "sniproxy.toml"
    config.write_text(configs.listener("127.0.0.1:8443") + configs.table("default", [])
                      + configs.common(splice=True, pin_dir=pin_dir))
    listing = sniproxy("dns", "-c", str(config))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[1].split() == ["a.test", "5s/5s", "NXDOMAIN"]
    assert lines[2].split()[0] == "b.test" and lines[2].endswith("192.0.2.1, 2001:db8::1")
    assert lines[3] == "2 name(s) cached, 1 expired (not served)"
    flushed = sniproxy("dns", "--pin-dir", pin_dir, "flush", "B.test.")
    assert flushed.returncode == 0 and flushed.stdout.strip() == "flushed b.test"
    assert cache.get("b.test") is None and cache.get("a.test") is not None
    again = sniproxy("dns", "--pin-dir", pin_dir, "flush", "b.test")
    assert again.returncode == 1 and "not cached" in again.stderr
    everything = sniproxy("dns", "--pin-dir", pin_dir, "flush")
    assert everything.returncode == 0 and everything.stdout.strip() == "flushed 2 name(s)"
    assert list(cache.entries()) == []
    missing = sniproxy("dns", "--pin-dir", f"{pin_dir}-none")
    assert missing.returncode == 1 and "no dns_cache is pinned" in missing.stderr


async def test_a_restarted_proxy_serves_names_from_the_pinned_map_without_a_query(
        ca, dns, start_proxy, pin_dir: str) -> None:
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    try:
        dns.add("backend.test", ["127.0.0.1"], ttl=300)
        port = free_port()
        text = (configs.listener(f"127.0.0.1:{port}")
                + configs.table("default", [("app.test", f"backend.test:{backend.port}")])
                + configs.common(dns.address, splice=True, pin_dir=pin_dir))
        first = start_proxy(text)
        assert [e["mode"] for e in first.events() if e.get("event") == "dns_cache"] == ["kernel"]
        assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
        assert dns.count("backend.test") == 2  # A and AAAA, once
        first.stop()
        assert os.path.exists(f"{pin_dir}/dns_cache")

        second = start_proxy(text)
        assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
        (event,) = await second.access()
        assert event["outcome"] == "closed" and event["backend"] == f"127.0.0.1:{backend.port}"
        assert dns.count("backend.test") == 2  # served from the map the first process filled

        # And it is the map that answered: flush the name and the running proxy asks again.
        assert sniproxy("dns", "--pin-dir", pin_dir, "flush", "backend.test").returncode == 0
        assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
        assert dns.count("backend.test") == 4
    finally:
        await backend.close()


async def test_a_copy_mode_proxy_caches_names_in_the_kernel_map(ca, dns, start_proxy, pin_dir: str) -> None:
    # [ebpf] splice = false, [resolver] kernel_cache = true: bytes are copied in userspace, names
    # still go to the pinned map (what `sniproxy dns` lists).
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    try:
        dns.add("copy-backend.test", ["127.0.0.1"], ttl=300)
        port = free_port()
        proxy = start_proxy(configs.listener(f"127.0.0.1:{port}")
                            + configs.table("default", [("app.test", f"copy-backend.test:{backend.port}")])
                            + configs.common(dns.address, splice=False, pin_dir=pin_dir, kernel_cache=True))
        modes = {e["event"]: e["mode"] for e in proxy.events() if e.get("event") in ("relay_mode", "dns_cache")}
        assert modes == {"relay_mode": "copy", "dns_cache": "kernel"}
        assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
        listing = sniproxy("dns", "--pin-dir", pin_dir)
        assert listing.returncode == 0 and "copy-backend.test" in listing.stdout, listing
    finally:
        await backend.close()


# As the systemd unit starts the proxy, exactly (docs/operations.md): the `sniproxy` user with these
# ambient capabilities and nothing else (no CAP_SYS_ADMIN).
UNIT_CAPS = ("bpf", "net_admin", "perfmon", "net_bind_service", "dac_override")
UNIT_CAP_EFF = (1 << 39) | (1 << 38) | (1 << 12) | (1 << 10) | (1 << 1)  # 000000c000001402
_CAPS = ",".join(f"+{c}" for c in UNIT_CAPS)
AS_THE_UNIT = ["setpriv", "--reuid=sniproxy", "--regid=sniproxy", "--init-groups", f"--inh-caps=-all,{_CAPS}",
               f"--ambient-caps={_CAPS}", f"--bounding-set=-all,{_CAPS}", "--"]


def effective_caps_under(prefix: list[str]) -> int:
    # Read from a process started the same way: the proxy itself may drop capabilities once started.
    status = subprocess.run([*prefix, "cat", "/proc/self/status"], check=True, capture_output=True,
                            text=True).stdout
    (line,) = [line for line in status.splitlines() if line.startswith("CapEff:")]
    return int(line.split()[1], 16)


async def test_a_restart_with_only_the_units_capabilities_reuses_the_pinned_map(
        ca, dns, start_proxy, pin_dir: str) -> None:
    # BCC's own reopen of a pin (BPF_TABLE_PINNED) goes through BPF_MAP_GET_FD_BY_ID, which needs
    # CAP_SYS_ADMIN: under the unit every start after the first fell back to memory.
    backend = await TlsBackend("app", server_context(ca, "app.test")).start()
    try:
        dns.add("caps-backend.test", ["127.0.0.1"], ttl=300)
        port = free_port()
        text = (configs.listener(f"127.0.0.1:{port}")
                + configs.table("default", [("app.test", f"caps-backend.test:{backend.port}")])
                + configs.common(dns.address, splice=True, pin_dir=pin_dir)
                # The capabilities are the point here, not the user switch (setpriv keeps uid 0 and
                # lacks CAP_SETUID): the nspawn tests run the real unit, as its User=.
                + '\n[server]\nuser = "root"\n')
        assert effective_caps_under(AS_THE_UNIT) == UNIT_CAP_EFF
        for run in ("first", "second"):
            proxy = start_proxy(text, argv_prefix=AS_THE_UNIT)
            (relay,) = [e for e in proxy.events() if e.get("event") == "relay_mode"]
            (cache,) = [e for e in proxy.events() if e.get("event") == "dns_cache"]
            assert (relay["mode"], cache["mode"]) == ("splice", "kernel"), (run, relay, cache)
            assert await who("127.0.0.1", port, "app.test", client_context(ca)) == "backend=app alpn=None"
            (event,) = await proxy.access()
            assert event["outcome"] == "closed" and event["backend"] == f"127.0.0.1:{backend.port}"
            assert proxy.stop() == 0
            # A and AAAA once, by the first run; the second run answered from the pinned map.
            assert dns.count("caps-backend.test") == 2, run
        assert os.path.exists(f"{pin_dir}/dns_cache")
    finally:
        await backend.close()

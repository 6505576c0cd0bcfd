# XdpAllowList: compiles ebpf/xdp_filter.c, fills and pins its maps (ip_whitelist, xdp_ports,
# xdp_stats), attaches it to interfaces through bpf_links owned by this process, replaces the allow-list
# in place, and undoes it all in close(). Invariant: the maps are filled before any attach, replace()
# adds before it deletes, and a link dies with its process, so a crashed proxy leaves no filter behind.
from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno
import functools
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import maps
from .errors import KernelError
from .loader import PinDir, _captured_stderr, ensure_bpffs, pin_fd

EBPF_DIR = Path(__file__).resolve().parents[2] / "ebpf"
XDP_SRC = EBPF_DIR / "xdp_filter.c"
PROG_NAME = "xdp_ip_filter"
PINNED_MAPS = ("ip_whitelist", "xdp_ports", "xdp_stats")

# ebpf/xdp_filter.h
XDP_MAX_ALLOW = 16384
XDP_MAX_PORTS = 1024
XDP_FAMILY_V4 = 4
XDP_FAMILY_V6 = 6

# uapi/linux/bpf.h and if_link.h (this module issues these syscalls itself: libbcc exports none of them)
_NR_BPF = 321  # x86_64
_BPF_OBJ_GET = 7
_BPF_PROG_TEST_RUN = 10
_BPF_PROG_GET_NEXT_ID = 11
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_LINK_CREATE = 28
_BPF_LINK_DETACH = 34
_BPF_XDP = 37
_BPF_MAP_TYPE_LPM_TRIE = 11
_BPF_PROG_TYPE_XDP = 6
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2

MODES = {"native": (XDP_FLAGS_DRV_MODE,), "generic": (XDP_FLAGS_SKB_MODE,),
         "auto": (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE)}
_MODE_NAMES = {XDP_FLAGS_DRV_MODE: "native", XDP_FLAGS_SKB_MODE: "generic"}


class IpWhitelistKey(ct.Structure):
    _pack_ = 1
    _fields_ = [("prefixlen", ct.c_uint32), ("family", ct.c_uint8), ("addr", ct.c_uint8 * 16)]


class XdpVerdicts(ct.Structure):
    _fields_ = [("passed", ct.c_uint64), ("dropped", ct.c_uint64), ("not_gated", ct.c_uint64)]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}


# C struct name -> mirror, for the BTF comparison test.
MIRRORS: dict[str, type[ct.Structure]] = {"ip_whitelist_key": IpWhitelistKey, "xdp_verdicts": XdpVerdicts}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------------------------------
# bpf syscalls


@functools.cache
def _libc() -> ct.CDLL:
    return ct.CDLL(None, use_errno=True)


@functools.cache
def _libbpf() -> ct.CDLL:
    """libbpf.so.1 (BCC links against it) for its netlink XDP query/detach."""
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_xdp_query_id.argtypes = [ct.c_int, ct.c_int, ct.POINTER(ct.c_uint32)]
    lib.bpf_xdp_detach.argtypes = [ct.c_int, ct.c_uint32, ct.c_void_p]
    return lib


def _bpf(cmd: int, attr: ct.Array, what: str) -> int:
    res = _libc().syscall(_NR_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if res < 0:
        err = ct.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return res


def _attr() -> ct.Array:
    return (ct.c_uint32 * 32)()  # zeroed; large enough for every command used here


def _obj_get(path: str) -> int:
    buf = ct.create_string_buffer(path.encode())
    attr = _attr()
    ct.c_uint64.from_buffer(attr, 0).value = ct.addressof(buf)
    return _bpf(_BPF_OBJ_GET, attr, f"opening {path}")


class _MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16), ("_rest", ct.c_uint8 * 64)]


class _ProgInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
                ("map_ids", ct.c_uint64), ("name", ct.c_char * 16), ("_rest", ct.c_uint8 * 152)]


def _info(fd: int, info: ct.Structure, what: str) -> None:
    attr = _attr()
    attr[0] = fd
    attr[1] = ct.sizeof(info)
    ct.c_uint64.from_buffer(attr, 8).value = ct.addressof(info)
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr, what)


def _prog_info(prog_id: int, map_ids: ct.Array | None = None) -> _ProgInfo | None:
    """Name, type and (optionally) map ids of a loaded program; None when it is gone."""
    attr = _attr()
    attr[0] = prog_id
    try:
        fd = _bpf(_BPF_PROG_GET_FD_BY_ID, attr, f"program {prog_id}")
    except OSError as e:
        # EPERM: looking programs up by id needs CAP_SYS_ADMIN, which CAP_BPF alone does not give.
        if e.errno in (errno.ENOENT, errno.EPERM):
            return None
        raise
    try:
        info = _ProgInfo()
        if map_ids is not None:
            info.nr_map_ids = len(map_ids)
            info.map_ids = ct.addressof(map_ids)
        _info(fd, info, f"program {prog_id} info")
        return info
    finally:
        os.close(fd)


def _prog_ids() -> Iterable[int]:
    attr = _attr()
    while True:
        try:
            _bpf(_BPF_PROG_GET_NEXT_ID, attr, "listing programs")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        attr[0] = attr[1]  # start_id = next_id
        yield attr[1]


def xdp_program_on(ifname: str) -> tuple[int, str] | None:
    """(id, name) of the XDP program attached to ifname in any mode, or None."""
    ifindex = _ifindex(ifname)
    prog_id = ct.c_uint32(0)
    res = _libbpf().bpf_xdp_query_id(ifindex, 0, ct.byref(prog_id))
    if res < 0:
        raise KernelError(f"querying the XDP program of {ifname} failed", os.strerror(-res))
    if prog_id.value == 0:
        return None
    info = _prog_info(prog_id.value)
    return (prog_id.value, info.name.decode(errors="replace") if info else "<unknown: needs CAP_SYS_ADMIN>")


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise KernelError(f"interface {ifname!r} does not exist") from None


# --------------------------------------------------------------------------------------------------
# The allow-list map


def parse_network(text: str) -> Network:
    """A CIDR ("10.0.0.0/8", "fd00::/8") or a single address. Host bits must be zero."""
    return ipaddress.ip_network(text.strip(), strict=True)


def _key(net: Network) -> IpWhitelistKey:
    key = IpWhitelistKey()
    key.prefixlen = 8 + net.prefixlen
    key.family = XDP_FAMILY_V4 if net.version == 4 else XDP_FAMILY_V6
    packed = net.network_address.packed
    ct.memmove(key.addr, packed, len(packed))
    return key


def _network(key: IpWhitelistKey) -> Network:
    raw = bytes(key.addr)
    if key.family == XDP_FAMILY_V4:
        return ipaddress.IPv4Network((raw[:4], key.prefixlen - 8))
    return ipaddress.IPv6Network((raw, key.prefixlen - 8))


def sort_networks(nets: Iterable[Network]) -> list[Network]:
    return sorted(nets, key=lambda n: (n.version, n.network_address.packed, n.prefixlen))


@dataclasses.dataclass(frozen=True)
class AllowDiff:
    added: tuple[Network, ...]
    removed: tuple[Network, ...]


class AllowListMap:
    """Typed access to an ip_whitelist map by fd (the live one of a loaded filter, or a pinned one)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def entries(self) -> list[Network]:
        out: list[Network] = []
        lib = maps._libbcc()
        key, nxt = IpWhitelistKey(), IpWhitelistKey()
        res = lib.bpf_get_first_key(self.fd, ct.byref(nxt), ct.sizeof(nxt))
        for _ in range(XDP_MAX_ALLOW + 1):  # bounded even if the map changes underneath
            if res != 0:
                break
            out.append(_network(nxt))
            ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
            res = lib.bpf_get_next_key(self.fd, ct.byref(key), ct.byref(nxt))
        return sort_networks(out)

    def add(self, net: Network) -> bool:
        """False when net was already there."""
        try:
            maps.update(self.fd, _key(net), ct.c_uint8(1), maps.BPF_NOEXIST, what=f"adding {net}")
        except maps.MapError as e:
            if e.errno == errno.EEXIST:
                return False
            raise KernelError(f"adding {net} to ip_whitelist failed", e.strerror or str(e)) from e
        return True

    def delete(self, net: Network) -> bool:
        """False when net was not there."""
        try:
            return maps.delete(self.fd, _key(net), what=f"deleting {net}")
        except maps.MapError as e:
            raise KernelError(f"deleting {net} from ip_whitelist failed", e.strerror or str(e)) from e

    def replace(self, nets: Iterable[Network]) -> AllowDiff:
        """Make the map hold exactly nets. Every addition lands before the first deletion, so at no
        moment is a source outside both the old and the new list allowed, or one in both refused. On a
        failed addition the additions are taken back and the old list stays whole."""
        want = set(nets)
        have = set(self.entries())
        added = sort_networks(want - have)
        removed = sort_networks(have - want)
        done: list[Network] = []
        try:
            for net in added:
                if self.add(net):
                    done.append(net)
        except KernelError:
            for net in done:
                with contextlib.suppress(KernelError):
                    self.delete(net)
            raise
        for net in removed:
            self.delete(net)
        return AllowDiff(tuple(added), tuple(removed))


def _read_verdicts(fd: int) -> XdpVerdicts:
    values = (XdpVerdicts * maps.ncpus())()
    if not maps.lookup(fd, ct.c_uint32(0), values):
        raise KernelError("xdp_stats has no slot 0")
    total = XdpVerdicts()
    for name, _ in XdpVerdicts._fields_:
        setattr(total, name, sum(getattr(v, name) for v in values))
    return total


class PinnedAllowList(AllowListMap):
    """The allow-list a running proxy pinned under pin_dir, for `sniproxy allow ...`."""

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        path = os.path.join(pin_dir, "ip_whitelist")
        try:
            fd = _obj_get(path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise KernelError(f"no allow-list pinned at {path}",
                                  "is the proxy running with [xdp] enabled = true?") from None
            raise KernelError(f"opening {path} failed", e.strerror or str(e)) from None
        super().__init__(fd)
        info = _MapInfo()
        try:
            _info(fd, info, path)
        except OSError as e:
            self.close()
            raise KernelError(f"reading {path} failed", e.strerror or str(e)) from None
        if (info.type, info.key_size, info.value_size) != (
                _BPF_MAP_TYPE_LPM_TRIE, ct.sizeof(IpWhitelistKey), 1):
            self.close()
            raise KernelError(f"{path} is not a sniproxy ip_whitelist map",
                              f"type {info.type}, key {info.key_size} bytes, value {info.value_size}")
        self.map_id = info.id

    def verdicts(self) -> XdpVerdicts | None:
        """The filter's counters, when its xdp_stats is pinned beside the allow-list."""
        try:
            fd = _obj_get(os.path.join(self.pin_dir, "xdp_stats"))
        except OSError:
            return None
        try:
            return _read_verdicts(fd)
        finally:
            os.close(fd)

    def in_use(self) -> bool | None:
        """True when a loaded xdp_ip_filter program uses this map (a proxy killed with SIGKILL leaves
        its pins behind, but its program and links die with it). None when this process may not list
        programs (that needs CAP_SYS_ADMIN)."""
        try:
            for prog_id in _prog_ids():
                ids = (ct.c_uint32 * 16)()
                info = _prog_info(prog_id, ids)
                if info is None or info.type != _BPF_PROG_TYPE_XDP or info.name.decode() != PROG_NAME:
                    continue
                if self.map_id in list(ids)[:min(info.nr_map_ids, len(ids))]:
                    return True
        except PermissionError:
            return None
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedAllowList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# The loaded filter


@dataclasses.dataclass(frozen=True)
class Attachment:
    ifname: str
    ifindex: int
    mode: str  # "native" or "generic"
    link_fd: int
    replaced: str = ""  # "" or a description of the stale sniproxy program this attach removed


class XdpAllowList:
    """The compiled filter, its maps and its attachments. XdpAllowList.load(...), then attach(ifname)."""

    def __init__(self, bpf: object, pin_dir: str) -> None:
        self._bpf = bpf
        self.pin_dir = pin_dir
        self._pins: PinDir | None = None
        self.attachments: list[Attachment] = []
        self._closed = False
        lib = maps._libbcc()
        self.fds = {name: lib.bpf_table_fd(bpf.module, name.encode()) for name in PINNED_MAPS}  # type: ignore[attr-defined]
        missing = [n for n, fd in self.fds.items() if fd < 0]
        if missing:
            raise KernelError("maps missing after compile", ", ".join(missing))
        self.allow_list = AllowListMap(self.fds["ip_whitelist"])
        self.prog_fd = -1

    @classmethod
    def load(cls, pin_dir: str, ports: Iterable[int], allow: Iterable[Network]) -> XdpAllowList:
        """Compile and load the program, fill xdp_ports and ip_whitelist, pin the maps under pin_dir
        (replacing stale pins of an earlier run). Attaches nothing. Raises KernelError."""
        try:
            from bcc import BPF
        except ImportError as e:  # pragma: no cover - probe() reports this first
            raise KernelError("the bcc Python module is not importable", str(e)) from e
        ports = sorted(set(ports))
        allow = list(allow)
        if not ports or len(ports) > XDP_MAX_PORTS:
            raise KernelError(f"the XDP filter needs 1..{XDP_MAX_PORTS} ports to gate, got {len(ports)}")
        if not allow:
            raise KernelError("refusing an empty allow-list: it would drop every client")
        ensure_bpffs(pin_dir)
        with _captured_stderr() as messages:
            try:
                bpf = BPF(src_file=str(XDP_SRC).encode(), cflags=[f"-I{EBPF_DIR}"])
                fn = bpf.load_func(PROG_NAME.encode(), BPF.XDP)
            except Exception as e:  # BCC raises a bare Exception with the message on stderr
                error: Exception | None = e
            else:
                error = None
        if error is not None:
            raise KernelError(f"compiling or loading {XDP_SRC} failed", messages().strip() or str(error))
        try:
            gate = cls(bpf, pin_dir)
        except BaseException:
            bpf.cleanup()
            raise
        try:
            gate.prog_fd = fn.fd
            for port in ports:
                maps.update(gate.fds["xdp_ports"], ct.c_uint16(port), ct.c_uint8(1), what="xdp_ports")
            gate.allow_list.replace(allow)
            os.makedirs(pin_dir, exist_ok=True)
            gate._pins = PinDir(pin_dir)
            for name in PINNED_MAPS:
                path = os.path.join(pin_dir, name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale pin from an earlier run
                pin_fd(gate.fds[name], path)
                gate._pins.names.append(name)
        except maps.MapError as e:
            gate.close()
            raise KernelError("filling the XDP maps failed", str(e)) from e
        except BaseException:
            gate.close()
            raise
        return gate

    # -- attach -----------------------------------------------------------------------------------
    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        """Attach through a bpf_link held by this process: closing it (or the process dying, even by
        SIGKILL) detaches the program. A stale xdp_ip_filter attached the legacy way (netlink, which
        outlives its process) is removed first; any other XDP program on the interface is an error."""
        if mode not in MODES:
            raise KernelError(f"unknown XDP mode {mode!r} (expected one of {', '.join(MODES)})")
        ifindex = _ifindex(ifname)
        replaced = self._remove_stale(ifname, ifindex)
        errors: list[str] = []
        for flags in MODES[mode]:
            attr = _attr()
            attr[0], attr[1], attr[2], attr[3] = self.prog_fd, ifindex, _BPF_XDP, flags
            try:
                link_fd = _bpf(_BPF_LINK_CREATE, attr, f"attaching to {ifname}")
            except OSError as e:
                errors.append(f"{_MODE_NAMES[flags]}: {e.strerror}")
                continue
            attachment = Attachment(ifname, ifindex, _MODE_NAMES[flags], link_fd, replaced)
            self.attachments.append(attachment)
            return attachment
        raise KernelError(f"attaching {PROG_NAME} to {ifname} ({mode}) failed", "; ".join(errors))

    def _remove_stale(self, ifname: str, ifindex: int) -> str:
        current = xdp_program_on(ifname)
        if current is None:
            return ""
        prog_id, name = current
        if name != PROG_NAME:
            raise KernelError(f"{ifname} already has XDP program {name!r} (id {prog_id})",
                              "sniproxy only replaces its own filter; detach it first")
        for flags in (XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE):
            res = _libbpf().bpf_xdp_detach(ifindex, flags, None)
            if res == -errno.EBUSY:
                raise KernelError(f"{ifname} already has {PROG_NAME} (id {prog_id}) held by a live bpf_link",
                                  "another sniproxy is running with this interface")
            if res < 0:
                raise KernelError(f"removing stale {PROG_NAME} (id {prog_id}) from {ifname} failed",
                                  os.strerror(-res))
        if xdp_program_on(ifname) is not None:
            raise KernelError(f"stale {PROG_NAME} (id {prog_id}) on {ifname} could not be removed")
        return f"{PROG_NAME} id {prog_id}"

    def detach(self, attachment: Attachment) -> None:
        attr = _attr()
        attr[0] = attachment.link_fd
        with contextlib.suppress(OSError):  # the interface may be gone already: the link is defunct
            _bpf(_BPF_LINK_DETACH, attr, f"detaching from {attachment.ifname}")
        os.close(attachment.link_fd)
        self.attachments.remove(attachment)

    # -- live state --------------------------------------------------------------------------------
    def replace(self, allow: Iterable[Network]) -> AllowDiff:
        allow = list(allow)
        if not allow:
            raise KernelError("refusing an empty allow-list: it would drop every client")
        return self.allow_list.replace(allow)

    def entries(self) -> list[Network]:
        return self.allow_list.entries()

    def ports(self) -> list[int]:
        return _keys_u16(self.fds["xdp_ports"])

    def verdicts(self) -> XdpVerdicts:
        return _read_verdicts(self.fds["xdp_stats"])

    def run(self, frame: bytes, repeat: int = 1) -> int:
        """Run the program on one Ethernet frame in the kernel (BPF_PROG_TEST_RUN) and return its
        action (XDP_PASS / XDP_DROP). Counts in xdp_stats like real traffic; for checks and tests."""
        buf = ct.create_string_buffer(frame, len(frame))
        out = ct.create_string_buffer(len(frame) + 256)
        attr = _attr()
        attr[0] = self.prog_fd
        attr[2] = len(frame)
        attr[3] = len(out)
        ct.c_uint64.from_buffer(attr, 16).value = ct.addressof(buf)
        ct.c_uint64.from_buffer(attr, 24).value = ct.addressof(out)
        attr[8] = repeat
        try:
            _bpf(_BPF_PROG_TEST_RUN, attr, "test run")
        except OSError as e:
            raise KernelError(f"running {PROG_NAME} on a test frame failed", e.strerror or str(e)) from e
        return attr[1]

    # -- teardown ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach from every interface, unpin the maps, release the program. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for attachment in list(self.attachments):
            self.detach(attachment)
        if self._pins is not None:  # then pin_dir itself, when empty: the splice maps may be there too
            self._pins.unpin_all()
        self._bpf.cleanup()  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> XdpAllowList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _keys_u16(fd: int) -> list[int]:
    lib = maps._libbcc()
    out: list[int] = []
    key, nxt = ct.c_uint16(0), ct.c_uint16(0)
    res = lib.bpf_get_first_key(fd, ct.byref(nxt), ct.sizeof(nxt))
    for _ in range(XDP_MAX_PORTS + 1):
        if res != 0:
            break
        out.append(nxt.value)
        key.value = nxt.value
        res = lib.bpf_get_next_key(fd, ct.byref(key), ct.byref(nxt))
    return sorted(out)


def open_filter(pin_dir: str, interfaces: Sequence[str], mode: str, ports: Iterable[int],
                allow: Iterable[Network]) -> XdpAllowList:
    """Load the filter and attach it to every interface; all or nothing."""
    gate = XdpAllowList.load(pin_dir, ports, allow)
    try:
        for ifname in interfaces:
            gate.attach(ifname, mode)
    except BaseException:
        gate.close()
        raise
    return gate

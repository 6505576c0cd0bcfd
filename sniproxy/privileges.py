# Drops the process's privileges once the listeners are bound and the BPF objects are loaded, so an
# exploited proxy holds none of the powers it only needed at start: its capabilities, uid 0 (for
# [server] user) and the right to gain any back (PR_SET_NO_NEW_PRIVS). Invariant: after
# drop_privileges() the process has no effective, permitted, inheritable or ambient capability, runs
# as the configured user when it was started as root, and has no_new_privs set.
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import pwd
from collections.abc import Iterable

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_LAST_FALLBACK = 40
_PR_SET_NO_NEW_PRIVS = 38

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAP_SETPCAP = 8
CAP_SETGID = 6
CAP_SETUID = 7

_NAMES = {CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN",
          CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@dataclasses.dataclass(frozen=True)
class Dropped:
    before: int  # effective mask before
    after: int
    kept: tuple[str, ...]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _last_cap() -> int:
    try:
        return int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        return _CAP_LAST_FALLBACK


def effective_mask() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def drop_capabilities(keep: frozenset[int] = frozenset(), bounding: frozenset[int] | None = None) -> Dropped:
    """Reduce every capability set to `keep` (a subset of what the process has), the bounding set to
    `bounding` (default: `keep`). Raises OSError."""
    bounding = keep if bounding is None else bounding
    libc = _libc()
    before = effective_mask()
    if before == 0:
        return Dropped(0, 0, ())
    # The bounding set first: dropping from it needs CAP_SETPCAP, which the capset below removes.
    if before & (1 << CAP_SETPCAP):
        for cap in range(_last_cap() + 1):
            if cap not in bounding and libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err != 22:  # EINVAL: the kernel does not know this capability
                    raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    mask = sum(1 << cap for cap in keep) & before
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    after = effective_mask()
    return Dropped(before, after, tuple(_NAMES.get(c, str(c)) for c in sorted(keep) if after & (1 << c)))


class PrivilegeError(Exception):
    """The proxy could not shed what it must not keep (it should not serve)."""


@dataclasses.dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def lookup_user(name: str) -> Account:
    """[server] user as uid/gid; raises PrivilegeError naming the key when there is no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"server.user: no user {name!r} on this system (scripts/setup.sh and "
                             f"scripts/install.sh create the 'sniproxy' system user)") from None
    return Account(name, entry.pw_uid, entry.pw_gid)


@dataclasses.dataclass(frozen=True)
class Privileges:
    """What drop_privileges() did: the capability masks around it and who the process is now."""

    capabilities: Dropped
    uid: int
    gid: int
    switched: bool  # setuid() to [server] user happened here (the process was started as root)
    no_new_privs: bool


def no_new_privs() -> bool:
    for line in open("/proc/self/status"):
        if line.startswith("NoNewPrivs:"):
            return line.split()[1] == "1"
    return False


def drop_privileges(user: Account, owned: Iterable[str] = ()) -> Privileges:
    """Started as root: hand `owned` (pin_dir: the proxy unpins there at stop) to `user`, drop every
    capability and switch to `user`. Started as anyone else (systemd's User=): drop every capability.
    Then set no_new_privs either way. Raises PrivilegeError (the caller must not serve then)."""
    libc = _libc()
    switch = os.geteuid() == 0 and user.uid != 0
    try:
        if switch:
            for path in owned:
                if os.path.exists(path):
                    os.chown(path, user.uid, user.gid)
                    if os.path.isdir(path) and not os.path.ismount(path):
                        for name in os.listdir(path):  # files made there before the switch
                            child = os.path.join(path, name)
                            if os.path.isfile(child) and not os.path.islink(child):
                                os.chown(child, user.uid, user.gid)
        # Capabilities first: dropping the bounding set needs CAP_SETPCAP, which setuid() below
        # removes; setuid() itself keeps working (CAP_SETUID stays effective until the switch).
        dropped = drop_capabilities(frozenset((CAP_SETUID, CAP_SETGID)) if switch else frozenset(),
                                    bounding=frozenset())
        if switch:
            os.setgroups([])
            os.setresgid(user.gid, user.gid, user.gid)
            # From uid 0 to another uid the kernel clears the permitted and effective sets as well.
            os.setresuid(user.uid, user.uid, user.uid)
            dropped = dataclasses.replace(dropped, after=effective_mask(), kept=())
            drop_capabilities(frozenset())
            if effective_mask() != 0:
                raise PrivilegeError(f"capabilities left after switching to {user.name}: {effective_mask():#x}")
    except OSError as exc:
        how = (f"switching to user {user.name!r} needs CAP_SETUID and CAP_SETGID; or start the proxy as "
               f"that user (systemd's User=)") if switch else "capset must be allowed (seccomp)"
        raise PrivilegeError(f"dropping privileges failed: {exc} ({how})") from exc
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")
    return Privileges(dropped, os.getuid(), os.getgid(), switch, no_new_privs())

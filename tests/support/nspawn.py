# A booted systemd (PID 1) in a systemd-nspawn container, for the tests of the unit and of the Debian
# package: its root is an overlay (tmpfs upper dir) of a lower tree left untouched - this machine's own
# / by default, or a cached fresh Debian root - with a private bpffs on /sys/fs/bpf. The container
# shares the host's network namespace, so loopback works both ways. close() powers it off and removes
# every mount and the temp dir, whatever state start() reached.
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# Host units enabled on this machine that would otherwise start inside a container of its own / (postgresql
# would even bind the shared loopback).
HOST_MASK = ("postgresql.service", "e2scrub_reap.service", "systemd-timesyncd.service", "systemd-pstore.service",
             "getty@tty1.service", "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
             "e2scrub_all.timer", "fstrim.timer", "man-db.timer")


class Container:
    """A booted systemd container. run() executes a command inside it (all its namespaces)."""

    def __init__(self, name: str, *, lower: Path = Path("/"), nspawn_args: Sequence[str] = (),
                 mask: Sequence[str] = HOST_MASK, unit: str = "sniproxy") -> None:
        self.name = name
        self.lower = lower
        self.nspawn_args = list(nspawn_args)
        self.mask = tuple(mask)
        self.unit = unit  # whose journal an AssertionError from systemctl() shows
        self.base = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
        self.root = self.base / "root"
        self.bpffs = self.base / "bpf"  # the container's /sys/fs/bpf, seen from the host
        self._mounts: list[Path] = []
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid = 0  # the container's systemd, as seen from the host

    def _mount(self, *argv: str, target: Path) -> None:
        subprocess.run(["mount", *argv, str(target)], check=True, capture_output=True)
        self._mounts.append(target)

    def start(self) -> Container:
        self._mount("-t", "tmpfs", "-o", "size=2g,mode=0700", "tmpfs", target=self.base)
        for d in ("upper", "work", "root", "bpf"):
            (self.base / d).mkdir()
        self._mount("-t", "overlay", "-o",
                    f"lowerdir={self.lower},upperdir={self.base}/upper,workdir={self.base}/work",
                    "overlay", target=self.root)
        # A new bpffs instance (pins stay private), mode 0700 root as systemd mounts /sys/fs/bpf: the
        # service's unprivileged user cannot even look up paths in it once its capabilities are gone.
        self._mount("-t", "bpf", "-o", "mode=0700", "bpf", target=self.bpffs)
        argv = ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=passive",
                f"--machine={self.name}", "-D", str(self.root),
                "--system-call-filter=bpf", "--capability=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON",
                f"--bind={self.bpffs}:/sys/fs/bpf", *self.nspawn_args,
                *(f"systemd.mask={u}" for u in self.mask)]
        self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.base / "nspawn.log", "wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited: {self.log()}")
            found = subprocess.run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
                                   capture_output=True, text=True).stdout.split()
            if found:
                self.pid = int(found[0])
                state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
                if state.stdout.strip() in ("running", "degraded"):
                    return self
            time.sleep(0.2)
        raise AssertionError(f"container did not boot: {self.log()}")

    def log(self) -> str:
        path = self.base / "nspawn.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], capture_output=True, text=True,
                             timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = self.run("systemctl", "--no-pager", *args, check=False)
        if check and res.returncode != 0:
            journal = self.run("journalctl", "-u", self.unit, "-n", "40", "--no-pager", check=False).stdout
            raise AssertionError(f"systemctl {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n"
                                 f"{res.stderr}\njournal:\n{journal}")
        return res

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", f"cat > {path}", input=text)

    def close(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # systemd in the container: clean poweroff
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(10)
        for target in reversed(self._mounts):
            res = subprocess.run(["umount", str(target)], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
        self._mounts.clear()
        shutil.rmtree(self.base, ignore_errors=True)


def low_free_port() -> int:
    """A free port below 1024 on loopback: the unit must bind it with CAP_NET_BIND_SERVICE only. The
    search starts at a place drawn from the pid: containers of concurrent runs share the host's
    loopback, and two runs both taking the first free port (700) made one's next start fail."""
    first = os.getpid() % 300
    for port in (700 + (first + i) % 300 for i in range(300)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def bpftool(*args: str) -> object:
    res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else None


def kernel_objects(bpffs: Path) -> dict[str, dict[str, int]]:
    """IDs of the service's pinned maps and of the programs using them (from the host). IDs are not
    reused soon, so "this ID no longer exists" later means the object was freed."""
    maps = {p.name: bpftool("map", "show", "pinned", str(p))["id"] for p in sorted((bpffs / "sniproxy").iterdir())}
    progs = {p["name"]: p["id"] for p in bpftool("prog", "show") if set(maps.values()) & set(p.get("map_ids", []))}
    return {"maps": maps, "progs": progs}

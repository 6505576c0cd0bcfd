# A fresh Debian 12 root for the package test: mmdebstrap's minbase plus systemd, and a local file
# repository (/srv/debs, the only apt source) holding every .deb that installing the package under test
# needs (its Depends and Recommends, resolved by apt against that root) and Debian's own `sniproxy`
# for the Conflicts test. So `apt install ./the.deb` inside the container works without a network and
# shows that the package's declared dependencies are enough. Built once and cached outside the checkout,
# under $SNIPROXY_TEST_CACHE (default /var/cache/sniproxy-tests), keyed by the package's dependency fields;
# the container only ever overlays it, so the cached tree stays fresh.
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("SNIPROXY_TEST_CACHE", "/var/cache/sniproxy-tests"))
SUITE = "bookworm"
MIRRORS = (f"deb http://deb.debian.org/debian {SUITE} main",
           f"deb http://deb.debian.org/debian {SUITE}-updates main",
           f"deb http://deb.debian.org/debian-security {SUITE}-security main")
# Bumped when the recipe below changes, so a stale cached root is not reused.
RECIPE = "2"
EXTRA_DOWNLOADS = ("sniproxy",)  # Debian's C sniproxy, which the package conflicts with


def _fields(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Pre-Depends", "Recommends", "Conflicts"],
                          check=True, capture_output=True, text=True).stdout


def fresh_debian_root(deb: Path) -> Path:
    """The cached root for this package's dependencies, building it first if needed (about a minute
    and a half; then a few hundred MB under CACHE)."""
    key = hashlib.sha256(f"{RECIPE}\n{SUITE}\n{EXTRA_DOWNLOADS}\n{_fields(deb)}".encode()).hexdigest()[:16]
    root = CACHE / f"{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it built
        if (root / "srv/debs/Packages").exists():
            return root
        build = CACHE / f".build-{key}"
        shutil.rmtree(build, ignore_errors=True)
        apt = 'APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get --yes --download-only install'
        hooks = [
            # Downloaded with the root's own apt state, so exactly what that root lacks.
            # Recommends too (mmdebstrap turns them off): apt installs them by default.
            f"{apt} -o APT::Install-Recommends=true {deb.resolve()}",
            f"{apt} {' '.join(EXTRA_DOWNLOADS)}",
            'mkdir -p "$1/srv/debs" && mv "$1"/var/cache/apt/archives/*.deb "$1/srv/debs/"',
            'cd "$1/srv/debs" && dpkg-scanpackages --multiversion . > Packages 2>/dev/null',
            'echo "deb [trusted=yes] file:/srv/debs ./" > "$1/etc/apt/sources.list"',
            'rm -f "$1"/etc/apt/sources.list.d/*',
        ]
        argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--include=systemd,systemd-sysv",
                *(f"--customize-hook={h}" for h in hooks), SUITE, str(build), *MIRRORS]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            shutil.rmtree(build, ignore_errors=True)
            raise AssertionError(f"mmdebstrap exited {res.returncode}:\n{res.stderr[-4000:]}")
        for old in CACHE.glob(f"{SUITE}-*"):  # earlier keys: superseded
            shutil.rmtree(old, ignore_errors=True)
        build.rename(root)
    return root

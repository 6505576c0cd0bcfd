# What a non-editable install (`make install`, `make deb`) ships is decided by pyproject.toml's explicit
# package list, and the .deb's version by debian/changelog: both drift silently from the tree unless
# checked here (an editable dev venv sees every module whatever the list says).
from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_subpackage_is_shipped() -> None:
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sniproxy").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert "ebpf" in listed  # the BPF C sources, read by path at run time


def test_one_version_in_pyproject_module_and_debian_changelog() -> None:
    import sniproxy

    changelog = subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "debian/changelog"), "-S", "Version"],
                               check=True, capture_output=True, text=True).stdout.strip()
    assert PYPROJECT["project"]["version"] == sniproxy.__version__ == changelog

#!/usr/bin/env bash
# `make deb`: builds the Debian package sniproxy-ebpf_<version>_<arch>.deb into $OUTDIR (default dist/)
# with dpkg-buildpackage and debhelper (debian/). Two steps:
#   1. online: pip builds sniproxy's own wheel (its build backend needs a newer setuptools than
#      Debian 12's: PEP 639 `license`) and downloads the wheels of pyproject.toml's [project]
#      dependencies (pip's cache makes a second run cheap), into the build copy's debian/wheels;
#   2. offline: dpkg-buildpackage -b in that copy; debian/rules installs from those wheels only.
# The build runs in a temporary copy: debhelper writes into debian/ and the checkout may be shared.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=${OUTDIR:-$top/dist}
PIP_PYTHON=${PIP_PYTHON:-$top/.venv/bin/python}

log() { printf 'build-deb: %s\n' "$*" >&2; }

# One version everywhere: pyproject.toml, sniproxy/__init__.py and debian/changelog.
version=$(/usr/bin/python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$top/pyproject.toml")
module_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/sniproxy/__init__.py")
deb_version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
if [ "$version" != "$module_version" ] || [ "$version" != "$deb_version" ]; then
  log "versions differ: pyproject.toml $version, sniproxy/__init__.py $module_version, debian/changelog $deb_version"
  log "add a debian/changelog entry (dch -v $version) when bumping the version"
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="$work/sniproxy-ebpf-$version"
mkdir "$src"
cp -a "$top/pyproject.toml" "$top/README.md" "$top/config.toml" "$top/sniproxy" "$top/ebpf" "$top/systemd" \
  "$top/docs" "$top/debian" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$src/debian/wheels"

deps=$(/usr/bin/python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
  "$top/pyproject.toml")
log "building the sniproxy wheel"
"$PIP_PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$src/debian/wheels" "$src"
rm -rf "$src/build" "$src"/*.egg-info
log "downloading wheels for: $(echo $deps)"
# Binary wheels only, for this machine's interpreter: the same ones a `make setup` venv gets.
# shellcheck disable=SC2086
"$PIP_PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --dest "$src/debian/wheels" $deps

log "dpkg-buildpackage in $src"
(cd "$src" && dpkg-buildpackage -b -us -uc) > "$work/build.log" 2>&1 || {
  tail -n 60 "$work/build.log" >&2; log "dpkg-buildpackage failed (full log above, last 60 lines)"; exit 1; }

mkdir -p "$OUTDIR"
for deb in "$work"/*.deb; do
  install -m 0644 "$deb" "$OUTDIR/"
  log "built $OUTDIR/$(basename "$deb")"
done

#!/usr/bin/env bash
# Installs sniproxy as a system service (as root; `make install` runs it after scripts/setup.sh):
#   $PREFIX (default /opt/sniproxy)   its own venv, from Debian's python3 with system site-packages (bcc)
#   $CONFDIR/config.toml              the shipped config.toml, only when no config exists there yet
#   $UNITDIR/sniproxy.service         the unit, with $PREFIX and $CONFDIR substituted
# Idempotent: a second run upgrades the package in place and never touches an existing config.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/sniproxy}
CONFDIR=${CONFDIR:-/etc/sniproxy}
UNITDIR=${UNITDIR:-/etc/systemd/system}
PYTHON=${PYTHON:-/usr/bin/python3}

log() { printf 'install: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "run this as root"; exit 1; }

# A venv made by another interpreter (or a half-made one) is rebuilt rather than patched.
if ! "$PREFIX/bin/python" -c 'import sys; sys.exit(0 if sys.base_prefix == "/usr" else 1)' 2>/dev/null; then
  log "creating venv $PREFIX"
  rm -rf "$PREFIX"
  "$PYTHON" -m venv --system-site-packages "$PREFIX"
fi

# Build from a copy: pip builds in the source tree, and the checkout may be read-only or shared.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -a "$top/pyproject.toml" "$top/README.md" "$top/sniproxy" "$top/ebpf" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
log "installing sniproxy into $PREFIX"
"$PREFIX/bin/python" -m pip install -q --upgrade "$src" >/dev/null

if "$PREFIX/bin/python" -c 'import bcc' 2>/dev/null; then
  log "bcc found: the eBPF splice data plane is available"
else
  log "warning: python3-bpfcc is not importable from $PREFIX; the proxy will copy in userspace"
fi

install -d -m 0755 "$PREFIX/share/doc/sniproxy"
install -m 0644 "$top/docs/operations.md" "$top/docs/configuration.md" "$PREFIX/share/doc/sniproxy/"

install -d -m 0755 "$CONFDIR"
if [ -e "$CONFDIR/config.toml" ]; then
  log "kept existing $CONFDIR/config.toml"
else
  install -m 0644 "$top/config.toml" "$CONFDIR/config.toml"
  log "installed $CONFDIR/config.toml"
fi
"$PREFIX/bin/sniproxy" check -c "$CONFDIR/config.toml" >&2 || log "warning: fix $CONFDIR/config.toml before starting"

install -d -m 0755 "$UNITDIR"
sed -e "s|/opt/sniproxy|$PREFIX|g" -e "s|/etc/sniproxy|$CONFDIR|g" "$top/systemd/sniproxy.service" \
  > "$UNITDIR/sniproxy.service.tmp"
chmod 0644 "$UNITDIR/sniproxy.service.tmp"
mv -f "$UNITDIR/sniproxy.service.tmp" "$UNITDIR/sniproxy.service"
log "installed $UNITDIR/sniproxy.service"

# Only when systemd is the running init (not in a chroot, container build or non-systemd host).
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  log "start it with: systemctl enable --now sniproxy"
else
  log "systemd is not running here; the unit is installed for its next boot"
fi

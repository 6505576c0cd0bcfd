#!/usr/bin/env bash
# Installs sniproxy as a system service (as root; `make install` runs it after scripts/setup.sh):
#   $PREFIX (default /opt/sniproxy)   its own venv, from Debian's python3 with system site-packages (bcc)
#   $CONFDIR/config.toml              the shipped config.toml, only when no config exists there yet
#   $UNITDIR/$UNIT_NAME.service       the unit (default sniproxy.service), $PREFIX and $CONFDIR substituted
#   the `sniproxy` system user         the proxy's processes run as it ([server] user, the unit's User=)
# Idempotent: a second run upgrades the package in place and never touches an existing config.
# Debian's own `sniproxy` package (the C sniproxy) owns the unit name sniproxy.service and the init
# script /etc/init.d/sniproxy: while any of it is on the machine this script installs nothing under
# that name (it would shadow theirs, and `systemctl enable sniproxy` would enable their init script
# too); it says so and exits 1. UNIT_NAME=sniproxy-ebpf installs ours beside theirs instead.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/sniproxy}
CONFDIR=${CONFDIR:-/etc/sniproxy}
UNITDIR=${UNITDIR:-/etc/systemd/system}
PYTHON=${PYTHON:-/usr/bin/python3}
UNIT_NAME=${UNIT_NAME:-sniproxy}

log() { printf 'install: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "run this as root"; exit 1; }
case "$UNIT_NAME" in
  ''|*/*|*.service) log "UNIT_NAME must be a bare unit name such as sniproxy-ebpf (got '$UNIT_NAME')"; exit 2 ;;
esac

# What of Debian's C sniproxy is on this machine: the package (installed, or removed with its
# conffiles left, init script included) and the files that claim the name.
debian_sniproxy() {
  local status
  status=$(dpkg-query -W -f='${Status} ${Version}' sniproxy 2>/dev/null || true)
  case "$status" in
    *" installed "*|*" config-files "*) printf "Debian package sniproxy %s (%s)\n" "${status##* }" "${status% *}" ;;
  esac
  local f
  # /lib is /usr/lib on a merged-/usr system: each file once.
  for f in /etc/init.d/sniproxy /lib/systemd/system/sniproxy.service /usr/lib/systemd/system/sniproxy.service; do
    [ -e "$f" ] && readlink -f "$f"
  done | awk '!seen[$0]++'
  return 0
}
if [ "$UNIT_NAME" = sniproxy ]; then
  found=$(debian_sniproxy)
  if [ -n "$found" ]; then
    log "Debian's sniproxy (the C proxy) is on this machine and owns the name sniproxy.service:"
    printf '%s\n' "$found" | sed 's/^/install:   /' >&2
    log "installing ours as sniproxy.service would shadow its unit, and 'systemctl enable sniproxy' would"
    log "also enable its init script. Nothing was installed. Either remove it (apt-get purge sniproxy)"
    log "or install ours under another name: make install UNIT_NAME=sniproxy-ebpf"
    exit 1
  fi
fi

# The proxy's processes run as this user (the unit's User=, [server] user); same as scripts/setup.sh.
if ! getent passwd sniproxy >/dev/null; then
  adduser --system --group --no-create-home --home /nonexistent --shell /usr/sbin/nologin --quiet sniproxy
  log "created system user sniproxy"
fi

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

# The cap on send buffers the unprivileged workers may ask for (systemd/sniproxy-sysctl.conf), now and
# at boot; raised only, never lowered below what the machine already allows.
SYSCTLDIR=${SYSCTLDIR:-/etc/sysctl.d}
install -d -m 0755 "$SYSCTLDIR"
install -m 0644 "$top/systemd/sniproxy-sysctl.conf" "$SYSCTLDIR/30-sniproxy.conf"
for key in net.core.wmem_max net.core.rmem_max; do
  want=$(sed -n "s/^$key = //p" "$top/systemd/sniproxy-sysctl.conf")
  if [ "$(cat "/proc/sys/$(echo "$key" | tr . /)")" -lt "$want" ]; then
    sysctl -q -w "$key=$want" && log "raised $key to $want"
  fi
done
log "installed $SYSCTLDIR/30-sniproxy.conf"

install -d -m 0755 "$UNITDIR"
unit="$UNITDIR/$UNIT_NAME.service"
sed -e "s|/opt/sniproxy|$PREFIX|g" -e "s|/etc/sniproxy|$CONFDIR|g" "$top/systemd/sniproxy.service" \
  > "$unit.tmp"
chmod 0644 "$unit.tmp"
mv -f "$unit.tmp" "$unit"
log "installed $unit"

# Only when systemd is the running init (not in a chroot, container build or non-systemd host).
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  log "start it with: systemctl enable --now $UNIT_NAME"
else
  log "systemd is not running here; the unit is installed for its next boot"
fi

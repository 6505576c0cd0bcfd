#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (as root): system packages, the kernel-header links
# BCC needs, and a venv (.venv) built from Debian's python3 so that Debian's `bcc` module imports.
# A second run only checks stamps and returns in about a second.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
venv="$top/.venv"
apt_packages=(python3 python3-venv python3-dev python3-bpfcc bpftool linux-headers-amd64 iproute2
              procps openssl curl gcc make systemd-container
              # `make deb` (dpkg-buildpackage) and its test's fresh Debian root (mmdebstrap).
              dpkg-dev debhelper dh-python python3-all python3-pip mmdebstrap)
# `setup.sh --bench` (only `make bench`) also installs the peers the benchmark compares against; their
# packaged services are never started (see install_packages) and the bench runs them from temp configs.
bench_packages=(nginx libnginx-mod-stream haproxy sniproxy)
# bench/xdp_drop.py: the same allow-list as nftables rules, and trafgen (netsniff-ng) for the SYN flood.
bench_packages+=(nftables netsniff-ng)
bench=0
case "${1:-}" in
  --bench) bench=1; apt_packages+=("${bench_packages[@]}") ;;
  "") ;;
  *) printf 'usage: %s [--bench]\n' "$0" >&2; exit 2 ;;
esac

log() { printf 'setup: %s\n' "$*" >&2; }

missing_packages() {
  local p
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$p"
  done
}

install_packages() {
  local missing
  missing=$(missing_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages ($(echo $missing)); run this as root once"; exit 1
  fi
  log "installing Debian packages: $(echo $missing)"
  apt-get update -q >/dev/null
  # Daemons (nginx, haproxy, sniproxy) must not start on install: invoke-rc.d asks policy-rc.d, and
  # 101 means "not allowed". An existing policy-rc.d is the machine's own and is left as it is.
  local policy=/usr/sbin/policy-rc.d own_policy=0 rc=0
  if [ ! -e "$policy" ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && own_policy=1
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null || rc=$?
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
  [ "$rc" = 0 ] || { log "apt-get install failed ($rc)"; exit "$rc"; }
}

# After installing the peers nothing of theirs may listen (the system configs bind 80/443).
check_no_peer_listening() {
  local found
  found=$(ss -Hltnp '( sport = :80 or sport = :443 )' 2>/dev/null | grep -E '"(nginx|haproxy|sniproxy)"' || true)
  [ -z "$found" ] && return 0
  log "a packaged peer daemon is listening; stop it before benchmarking:"; printf '%s\n' "$found" >&2
  exit 1
}

# BCC compiles against /lib/modules/$(uname -r)/{build,source}. No Debian package matches this VM's
# kernel, so point them at the newest Debian headers; that is enough for networking programs.
link_kernel_headers() {
  local mod="/lib/modules/$(uname -r)" build common
  [ -e "$mod/build/include" ] && [ -e "$mod/source/include" ] && return 0
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$build" ] || [ -z "$common" ]; then
    log "no linux-headers under /usr/src: the eBPF data plane will be unavailable"; return 0
  fi
  [ "$(id -u)" = 0 ] || { log "cannot link kernel headers without root"; return 0; }
  mkdir -p "$mod"
  ln -sfn "$build" "$mod/build"
  ln -sfn "$common" "$mod/source"
  log "linked $mod/build -> $build and $mod/source -> $common"
}

make_venv() {
  local stamp="$venv/.setup-stamp" want
  want=$(cat "$top/pyproject.toml" | sha256sum | cut -d' ' -f1)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  log "creating venv in $venv"
  # Debian's interpreter with system site-packages: the only way to import Debian's bcc module.
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e "$top[test]"
  echo "$want" > "$stamp"
}

# The bench extra (matplotlib for the chart) only for `make bench`, so `make test` never pulls it.
bench_venv() {
  local stamp="$venv/.bench-stamp" want
  want=$(cat "$top/pyproject.toml" | sha256sum | cut -d' ' -f1)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  log "installing the bench extra into $venv"
  "$venv/bin/python" -m pip install -q -e "$top[test,bench]"
  echo "$want" > "$stamp"
}

install_packages
link_kernel_headers
make_venv
if [ "$bench" = 1 ]; then
  bench_venv
  check_no_peer_listening
fi

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
# The metrics tests scrape the proxy with a real Prometheus server (and promtool), started from a
# temp config on loopback; the packaged service is disabled (disable_packaged_prometheus) and its
# recommended node exporter is not installed.
quiet_packages=(prometheus)
# `setup.sh --bench` (only `make bench`) also installs the peers the benchmark compares against; their
# packaged services are never started (see install_packages) and the bench runs them from temp configs.
bench_packages=(nginx libnginx-mod-stream haproxy sniproxy)
# bench/xdp_drop.py: the same allow-list as nftables rules, and trafgen (netsniff-ng) for the SYN flood.
bench_packages+=(nftables netsniff-ng)
bench=0 docs=0
case "${1:-}" in
  --bench) bench=1; apt_packages+=("${bench_packages[@]}") ;;
  --docs) docs=1 ;;
  "") ;;
  *) printf 'usage: %s [--bench | --docs]\n' "$0" >&2; exit 2 ;;
esac

log() { printf 'setup: %s\n' "$*" >&2; }

missing_packages() {
  local p
  for p in "${apt_packages[@]}" "${quiet_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$p"
  done
}

install_packages() {
  local missing
  missing=$(missing_packages)
  [ -z "$missing" ] && return 0
  local quiet=() rest=() p q
  for p in $missing; do
    for q in "${quiet_packages[@]}"; do [ "$p" = "$q" ] && { quiet+=("$p"); continue 2; }; done
    rest+=("$p")
  done
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
  if [ "${#rest[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${rest[@]}" >/dev/null || rc=$?
  fi
  if [ "$rc" = 0 ] && [ "${#quiet[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${quiet[@]}" >/dev/null || rc=$?
  fi
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
  [ "$rc" = 0 ] || { log "apt-get install failed ($rc)"; exit "$rc"; }
}

# Tests run their own Prometheus on a free loopback port; the packaged one must not come up at boot
# (and listen on :9090). Disabling is a no-op once done, and without systemd there is nothing to do.
disable_packaged_prometheus() {
  [ -e /lib/systemd/system/prometheus.service ] || return 0
  command -v systemctl >/dev/null || return 0
  systemctl is-enabled --quiet prometheus.service 2>/dev/null || return 0
  [ "$(id -u)" = 0 ] || { log "prometheus.service is enabled; run this as root once to disable it"; return 0; }
  systemctl disable --now prometheus.service >/dev/null 2>&1 || systemctl disable prometheus.service >/dev/null 2>&1 || true
  log "disabled the packaged prometheus.service (tests start their own)"
}

# After installing the peers nothing of theirs may listen (the system configs bind 80/443).
check_no_peer_listening() {
  local found
  found=$(ss -Hltnp '( sport = :80 or sport = :443 )' 2>/dev/null | grep -E '"(nginx|haproxy|sniproxy)"' || true)
  [ -z "$found" ] && return 0
  log "a packaged peer daemon is listening; stop it before benchmarking:"; printf '%s\n' "$found" >&2
  exit 1
}

# The proxy's processes run as this user once set up ([server] user, docs/operations.md): a system
# user and group, no home, no login shell. Same in scripts/install.sh.
ensure_system_user() {
  getent passwd sniproxy >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { log "no 'sniproxy' user; run this as root once to create it"; return 0; }
  adduser --system --group --no-create-home --home /nonexistent --shell /usr/sbin/nologin \
    --quiet sniproxy
  log "created system user sniproxy"
}

# tests/integration/test_systemd_nspawn.py installs Debian's C sniproxy inside a container (never on
# this machine) to check that `make install` does not clash with it: its .deb and the libraries it
# needs, downloaded once (not installed) into .cache/.
debian_sniproxy_debs=(sniproxy libev4 libudns0 libpcre3 lsb-base)
fetch_test_debs() {
  local dir="$top/.cache/debian-sniproxy" p missing=()
  for p in "${debian_sniproxy_debs[@]}"; do
    compgen -G "$dir/${p}_*.deb" >/dev/null || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  [ "$(id -u)" = 0 ] || { log "cannot download test packages without root"; return 0; }
  mkdir -p "$dir"
  log "downloading (not installing) for the tests: ${missing[*]}"
  (cd "$dir" && { apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >/dev/null 2>&1 \
     || { apt-get update -q >/dev/null && apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >/dev/null; }; }) \
    || { log "downloading ${missing[*]} failed"; exit 1; }
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

# The docs extra (matplotlib for docs/dashboard.png) only for `make dashboard-png`.
docs_venv() {
  local stamp="$venv/.docs-stamp" want
  want=$(cat "$top/pyproject.toml" | sha256sum | cut -d' ' -f1)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  log "installing the docs extra into $venv"
  "$venv/bin/python" -m pip install -q -e "$top[test,docs]"
  echo "$want" > "$stamp"
}

# What `make install` and the package set at boot (systemd/sniproxy-sysctl.conf), here for this boot
# only: `make run` and `make bench` run unprivileged workers like an installed proxy. Raised only.
raise_buffer_caps() {
  local key want
  [ "$(id -u)" = 0 ] || return 0
  for key in net.core.wmem_max net.core.rmem_max; do
    want=$(sed -n "s/^$key = //p" "$top/systemd/sniproxy-sysctl.conf")
    if [ "$(cat "/proc/sys/$(echo "$key" | tr . /)")" -lt "$want" ]; then
      sysctl -q -w "$key=$want" && log "raised $key to $want (this boot)"
    fi
  done
}

install_packages
raise_buffer_caps
disable_packaged_prometheus
link_kernel_headers
ensure_system_user
fetch_test_debs
make_venv
if [ "$docs" = 1 ]; then
  docs_venv
fi
if [ "$bench" = 1 ]; then
  bench_venv
  check_no_peer_listening
fi

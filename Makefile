# The README's commands. Each target does its own idempotent set-up first (scripts/setup.sh).
PY := .venv/bin/python
CONFIG ?= config.toml
PYTEST_ARGS ?=

.PHONY: setup run test check bench fuzz install deb clean dashboard-png

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m sniproxy run -c $(CONFIG)

check: setup
	$(PY) -m sniproxy check -c $(CONFIG)

# The whole suite: unit, integration (real TLS, real DNS on loopback) and kernel (real eBPF, as root).
test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# Peers side by side (docs/benchmarks.md): installs nginx, haproxy, sniproxy and matplotlib first.
BENCH_ARGS ?=
bench:
	@bash scripts/setup.sh --bench
	$(PY) bench/run_all.py $(BENCH_ARGS)

# docs/dashboard.png: the dashboard's main graphs from a real run (a 2-worker splice+XDP proxy under
# traffic, scraped by a real Prometheus), drawn with matplotlib from Prometheus's query API. As root.
DASHBOARD_SECONDS ?= 150
dashboard-png:
	@bash scripts/setup.sh --docs
	$(PY) scripts/dashboard_png.py --seconds $(DASHBOARD_SECONDS) --out docs/dashboard.png

# A few minutes of mixed traffic and faults in copy and splice mode (60 s each inside `make test`).
SOAK_SECONDS ?= 120
soak: setup
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -s -q tests/integration/test_soak.py

# Ten minutes of coverage-guided fuzzing of the ClientHello and PROXY header readers.
FUZZ_SECONDS ?= 600
fuzz: setup
	mkdir -p .fuzz/corpus
	$(PY) fuzz/fuzz_client_hello.py -max_total_time=$(FUZZ_SECONDS) -timeout=5 -artifact_prefix=.fuzz/ .fuzz/corpus

# As root: a venv in /opt/sniproxy, /etc/sniproxy/config.toml (never overwritten), the systemd unit.
# PREFIX=, CONFDIR=, UNITDIR= relocate them; UNIT_NAME= names the unit (default sniproxy; needed
# beside Debian's C sniproxy package, which owns that name: see docs/operations.md).
install: setup
	bash scripts/install.sh

# The Debian package sniproxy-ebpf_<version>_<arch>.deb in $(OUTDIR) (dpkg-buildpackage, debian/; docs/operations.md).
OUTDIR ?= dist
deb: setup
	OUTDIR=$(abspath $(OUTDIR)) bash scripts/build-deb.sh

clean:
	rm -rf .venv .pytest_cache .hypothesis dist

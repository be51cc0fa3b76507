# Quick start: `make run` builds and starts the daemons with a local config under .joblet/;
# `make test` runs everything CI runs.

SHELL := /bin/bash
CARGO ?= cargo
JOBLET_DIR := $(CURDIR)/.joblet

.PHONY: all build deps promtool rules test test-cgroup2 test-deb test-alerts deb install fmt clippy run bench clean-run

all: build

# RocksDB's bindings are generated at build time and need libclang. Installed when missing.
deps:
	@if ! ldconfig -p | grep -q 'libclang-14\|libclang\.so'; then \
		echo "make: installing libclang (needed to build RocksDB's bindings)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang1-14 libclang-common-14-dev >/dev/null; \
	fi

# promtool (Debian package prometheus) checks and unit-tests the alert rules.
promtool:
	@if ! command -v promtool >/dev/null; then \
		echo "make: installing promtool (Debian package prometheus) for the alert rule tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	fi

rules: promtool
	promtool check rules deploy/prometheus/alerts.yml
	promtool check config deploy/prometheus/prometheus.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml

build: deps
	$(CARGO) build --workspace --bins

fmt:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps fmt rules
	$(CARGO) test --workspace
	$(MAKE) --no-print-directory clippy
	$(MAKE) --no-print-directory test-cgroup2
	$(MAKE) --no-print-directory test-deb
	$(MAKE) --no-print-directory test-alerts

# core's cgroup and limits tests in a throw-away QEMU guest whose only hierarchy is cgroup v2
# (../shared/tools/cgroup2-vm.sh), at the root and in a systemd-like delegated cgroup.
test-cgroup2: deps
	scripts/test-cgroup2.sh

# The shipped alert rules (for: and windows shortened) in Debian's prometheus and
# prometheus-alertmanager against the real daemons: core down, persist down, persist stopped,
# persist's disk full; each alert must reach Alertmanager and resolve (~3.5 min).
test-alerts: deps
	scripts/test-alerts.sh

# The Debian package installed, used and purged on this machine (root; no systemd needed).
test-deb: deps
	scripts/test-deb.sh

# The Debian package (cargo-deb): target/debian/joblet_<version>_<arch>.deb. PROFILE=dev
# packages the dev build (a release build compiles RocksDB again, ~25 min on 2 cores).
PROFILE ?= release
deb: deps
	@command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
	cargo deb -p joblet-core --profile $(PROFILE)

# For hosts without dpkg: binaries to $(PREFIX)/bin, units (pointing there) to
# $(SYSTEMD_DIR), reference configs to /etc/joblet unless present. DESTDIR for staging.
PREFIX ?= /usr/local
SYSTEMD_DIR ?= /lib/systemd/system
install:
	@[ -x target/release/joblet-core ] || { echo "make install: build first: cargo build --release --workspace --bins" >&2; exit 1; }
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SYSTEMD_DIR) $(DESTDIR)/etc/joblet $(DESTDIR)$(PREFIX)/share/doc/joblet
	install -m 755 target/release/joblet-core target/release/joblet-persist target/release/rnx $(DESTDIR)$(PREFIX)/bin/
	for unit in deploy/systemd/*.service; do \
		sed 's|/usr/bin/|$(PREFIX)/bin/|g' $$unit > $(DESTDIR)$(SYSTEMD_DIR)/$$(basename $$unit); \
	done
	for config in deploy/config/*.yml; do \
		[ -e $(DESTDIR)/etc/joblet/$$(basename $$config) ] || install -m 644 $$config $(DESTDIR)/etc/joblet/; \
	done
	cp -r deploy/README.md deploy/prometheus deploy/grafana $(DESTDIR)$(PREFIX)/share/doc/joblet/
	@echo "make install: next: useradd --system joblet, certificates and start: see $(PREFIX)/share/doc/joblet/README.md"

run: build
	@scripts/run-local.sh

# Release build (RocksDB is compiled once more, optimised, the first time), then each benchmark
# program prints its table: figures beside a baseline measured in the same run.
bench: deps
	$(CARGO) build --release --workspace --bins
	./target/release/ipc
	./target/release/persist
	./target/release/persist --direct-io
	./target/release/core
	./target/release/core --durability sync
	./target/release/storage
	./target/release/catalogue
	./target/release/reattach

clean-run:
	rm -rf $(JOBLET_DIR)

# Quick start: `make run` builds and starts the daemons with a local config under .joblet/;
# `make test` runs everything CI runs.

SHELL := /bin/bash
CARGO ?= cargo
JOBLET_DIR := $(CURDIR)/.joblet

.PHONY: all build deps promtool rules test test-cgroup2 fmt clippy run bench clean-run

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

# core's cgroup and limits tests in a throw-away QEMU guest whose only hierarchy is cgroup v2
# (../shared/tools/cgroup2-vm.sh), at the root and in a systemd-like delegated cgroup.
test-cgroup2: deps
	scripts/test-cgroup2.sh

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
	./target/release/catalogue
	./target/release/reattach

clean-run:
	rm -rf $(JOBLET_DIR)

#!/usr/bin/env bash
# `make test-cgroup2`: core's cgroup and limits tests on a cgroup v2 host, in a throw-away QEMU
# guest whose only hierarchy is cgroup v2 (../shared/tools/cgroup2-vm.sh): once with the tests in
# the root cgroup, once in a systemd-like delegated cgroup (/system.slice/joblet.service), as the
# shipped unit runs core. Nothing is compiled in the guest: the test binary is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
vm="${CGROUP2_VM:-../shared/tools/cgroup2-vm.sh}"
if [ ! -x "$vm" ]; then
    echo "test-cgroup2: $vm is missing (set CGROUP2_VM)" >&2
    exit 1
fi
cargo build --workspace --bins
binary=$(cargo test -p joblet-core --test it --no-run --message-format=json \
    | grep -o '"executable":"[^"]*/it-[^"]*"' | head -1 | cut -d'"' -f4)
[ -x "$binary" ] || { echo "test-cgroup2: no test binary" >&2; exit 1; }
tests=(limits:: jobs::stop jobs::the_job_runs_under_its_own_init survive::)
run_tests='cd core && "$0" "$@" --test-threads 1'
status=0
echo "== cgroup v2, tests at the root cgroup"
"$vm" --timeout 1200 --env JOBLET_TEST_SCRATCH=/mnt/scratch -- \
    sh -c "$run_tests" "$binary" "${tests[@]}" || status=1
echo "== cgroup v2, delegated: /system.slice/joblet.service (the tests in a leaf of it)"
delegated='mkdir -p /sys/fs/cgroup/system.slice/joblet.service/tests &&
    echo $$ > /sys/fs/cgroup/system.slice/joblet.service/tests/cgroup.procs &&
    cd core && exec "$0" "$@" --test-threads 1'
"$vm" --timeout 1200 --cgroup /system.slice/joblet.service --env JOBLET_TEST_SCRATCH=/mnt/scratch -- \
    sh -c "$delegated" "$binary" "${tests[@]}" || status=1
exit $status

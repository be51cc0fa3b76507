#!/usr/bin/env bash
# `make test-deb`: the Debian package as an operator gets it. Builds it from the dev build
# (a release build compiles RocksDB again), installs it with dpkg on this machine, checks
# the files, user and certificates, runs the ExecStartPre checks and systemd-analyze on the
# installed units, starts both daemons from the installed files as the units would (there is
# no systemd as PID 1 here: persist as the joblet user, its runtime directory made as
# systemd makes it), runs a job through the installed rnx and its admin config, then removes
# and purges the package and checks what remains.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "test-deb: $*" >&2; exit 1; }
if dpkg -s joblet >/dev/null 2>&1; then
    fail "a joblet package is installed on this machine; not replacing it"
fi
# What the test (and the package) needs; a fresh Debian machine may lack some.
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v adduser >/dev/null || missing+=(adduser)
command -v ss >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-deb: installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for port in 50051 50052 9091 9092; do
    if ss -ltn "sport = :$port" | grep -q LISTEN; then
        fail "port $port is in use (the daemons of make run?); the installed configs use it"
    fi
done
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
cargo build --workspace --bins
# The dev build (cargo-deb warns that it is meant for release builds; the package is the same).
cargo deb -p joblet-core --no-build --profile dev --no-strip --quiet --output target/debian/joblet-test.deb
deb=target/debian/joblet-test.deb
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if dpkg -s joblet >/dev/null 2>&1; then dpkg -P joblet >/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== install"
dpkg -i "$deb"
for file in /usr/bin/joblet-core /usr/bin/joblet-persist /usr/bin/rnx \
    /lib/systemd/system/joblet-core.service /lib/systemd/system/joblet-persist.service \
    /etc/joblet/joblet-config.yml /etc/joblet/persist-config.yml \
    /usr/share/doc/joblet/README.md /usr/share/doc/joblet/prometheus/alerts.yml \
    /etc/joblet/certs/ca.pem /etc/joblet/certs/rnx-config.yml; do
    [ -e "$file" ] || fail "$file is missing after install"
done
getent passwd joblet >/dev/null || fail "no joblet user"
[ "$(stat -c %U:%a /etc/joblet/certs/server-key.pem)" = joblet:600 ] \
    || fail "server-key.pem is $(stat -c %U:%a /etc/joblet/certs/server-key.pem), not joblet:600"
[ "$(stat -c %a /etc/joblet/certs/rnx-config.yml)" = 600 ] || fail "rnx-config.yml is not 0600"
dpkg-query -W -f='${Conffiles}\n' joblet | grep -q /etc/joblet/persist-config.yml \
    || fail "the configs are not conffiles"

echo "== the units: systemd-analyze verify and security"
# systemd older than 254 does not know DelegateSubgroup= (deploy/README.md says what then).
systemd-analyze verify /lib/systemd/system/joblet-persist.service \
    /lib/systemd/system/joblet-core.service >"$work/verify" 2>&1 || true
if grep -v "Unknown key 'DelegateSubgroup'" "$work/verify"; then
    fail "systemd-analyze verify complained"
fi
# The exposure levels the units promise (1.4 and 5.9 today): persist <= 2.5, core <= 6.0.
systemd-analyze security --offline=true --threshold=25 /lib/systemd/system/joblet-persist.service >/dev/null \
    || fail "joblet-persist.service is rated above 2.5"
systemd-analyze security --offline=true --threshold=60 /lib/systemd/system/joblet-core.service >/dev/null \
    || fail "joblet-core.service is rated above 6.0"

echo "== start both daemons from the installed files, as the units do"
install -d -m 0700 -o joblet -g joblet /run/joblet-persist
runuser -u joblet -- /usr/bin/joblet-persist --config /etc/joblet/persist-config.yml --check-config
/usr/bin/joblet-core --config /etc/joblet/joblet-config.yml --check-config \
    --persist-config /etc/joblet/persist-config.yml
runuser -u joblet -- /usr/bin/joblet-persist --config /etc/joblet/persist-config.yml \
    >"$work/persist.out" 2>"$work/persist.err" &
pids+=($!)
for _ in $(seq 100); do grep -q ready "$work/persist.out" && break; sleep 0.1; done
grep -q ready "$work/persist.out" || { cat "$work/persist.err"; fail "persist did not start"; }
/usr/bin/joblet-core --config /etc/joblet/joblet-config.yml >"$work/core.out" 2>"$work/core.err" &
pids+=($!)
for _ in $(seq 100); do grep -q ready "$work/core.out" && break; sleep 0.1; done
grep -q ready "$work/core.out" || { cat "$work/core.err"; fail "core did not start"; }

echo "== a job through the installed rnx and its admin config"
export RNX_CONFIG=/etc/joblet/certs/rnx-config.yml
rnx config show
out=$(rnx job run --follow -- sh -c 'seq 1 1000; echo from-the-package')
[ "$(echo "$out" | tail -1)" = from-the-package ] || fail "job output: $out"
[ "$(echo "$out" | wc -l)" = 1001 ] || fail "job output has $(echo "$out" | wc -l) lines"
id=$(rnx job list --json | grep -o '"uuid": *"[^"]*"' | head -1 | cut -d'"' -f4)
[ -n "$id" ] || fail "rnx job list shows no job"
# The job's history, from persist once it has stored it (rnx reads history there first).
for _ in $(seq 100); do
    [ "$(rnx job log "$id" 2>/dev/null | wc -l)" = 1001 ] && break; sleep 0.1
done
[ "$(rnx job log "$id" | wc -l)" = 1001 ] || fail "rnx job log $id: not 1001 lines"
rnx status
# What persist stored is owned by its user alone.
[ "$(stat -c %U /var/lib/joblet-persist)" = joblet ] || fail "persist's data is not joblet's"
for pid in "${pids[@]}"; do kill "$pid"; done
wait
pids=()

echo "== remove, then purge"
dpkg -r joblet
[ ! -e /usr/bin/joblet-core ] || fail "binaries left after remove"
[ -e /etc/joblet/persist-config.yml ] || fail "remove took the configuration"
[ -e /etc/joblet/certs/ca.pem ] || fail "remove took the certificates"
dpkg -P joblet
for path in /etc/joblet /var/lib/joblet /var/lib/joblet-persist /lib/systemd/system/joblet-core.service; do
    [ ! -e "$path" ] || fail "$path is left after purge"
done
echo "test-deb: ok (the joblet user stays, as Debian leaves system users)"

#!/usr/bin/env bash
# `make test-alerts`: the shipped alert rules against the real programs. Starts joblet-persist
# (its data on a small tmpfs) and joblet-core from the dev build, Debian's prometheus and
# prometheus-alertmanager with a copy of deploy/prometheus/alerts.yml whose `for:` and range
# windows are shortened (generated from the real file: same expressions, same labels), then
# provokes each failure an operator meets and checks that the expected alert reaches
# Alertmanager's API and is resolved after recovery:
#   core down, persist down, persist stopped (SIGSTOP) while a job writes, persist's disk full
#   (another file filling the volume, then a job's output).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
bin="$top/target/debug"
fail() { echo "test-alerts: FAIL: $*" >&2; exit 1; }
say() { echo "test-alerts: $*"; }
[ "$(id -u)" = 0 ] || fail "needs root (joblet-core runs jobs in cgroups; the disk is a tmpfs)"

missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
command -v ss >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian starts the services it installs; this test runs its own, on its own ports.
PROM=29090 AM=29093 CORE_GRPC=29051 PERSIST_GRPC=29052 CORE_METRICS=29091 PERSIST_METRICS=29092
for port in $PROM $AM $CORE_GRPC $PERSIST_GRPC $CORE_METRICS $PERSIST_METRICS; do
    if ss -ltn "sport = :$port" | grep -q LISTEN; then fail "port $port is in use"; fi
done
cargo build --workspace --bins

work=$(mktemp -d)
declare -A pid=()
cleanup() {
    for name in "${!pid[@]}"; do
        kill -CONT "${pid[$name]}" 2>/dev/null || true
        kill "${pid[$name]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    umount -l "$work/persist-data" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The rules as shipped, with every `for:` 10 s and every range window 30 s.
sed -E -e 's/^( +for: ).*/\110s/' -e 's/\[[0-9]+m\]/[30s]/g' deploy/prometheus/alerts.yml \
    > "$work/alerts.yml"
promtool check rules "$work/alerts.yml" >/dev/null
cat > "$work/prometheus.yml" <<YAML
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files: [alerts.yml]
alerting:
  alertmanagers:
    - static_configs: [{targets: ["127.0.0.1:$AM"]}]
scrape_configs:
  - job_name: joblet-core
    static_configs: [{targets: ["127.0.0.1:$CORE_METRICS"]}]
  - job_name: joblet-persist
    static_configs: [{targets: ["127.0.0.1:$PERSIST_METRICS"]}]
YAML
cat > "$work/alertmanager.yml" <<YAML
route: {receiver: log, group_wait: 1s, group_interval: 1s, repeat_interval: 1h}
receivers: [{name: log}]
YAML
mkdir -p "$work/persist-data"
mount -t tmpfs -o size=32m tmpfs "$work/persist-data"
cat > "$work/persist.yml" <<YAML
data_dir: $work/persist-data
ipc: {socket: $work/persist.sock}
grpc: {listen: "127.0.0.1:$PERSIST_GRPC", insecure: true}
metrics: {listen: "127.0.0.1:$PERSIST_METRICS"}
storage: {flush_interval: 500ms}
YAML
cat > "$work/core.yml" <<YAML
grpc: {listen: "127.0.0.1:$CORE_GRPC", insecure: true}
metrics: {listen: "127.0.0.1:$CORE_METRICS"}
state_dir: $work/core-state
cgroup: {parent: joblet-test-alerts}
persist: {socket: $work/persist.sock, query_address: "127.0.0.1:$PERSIST_GRPC", query_tls: null, reconnect_delay: 2s}
jobs: {work_root: $work/work, on_core_shutdown: stop}
YAML
cat > "$work/rnx.yml" <<YAML
nodes:
  default: {address: "127.0.0.1:$CORE_GRPC", persistAddress: "127.0.0.1:$PERSIST_GRPC"}
YAML
rnx() { "$bin/rnx" --config "$work/rnx.yml" "$@"; }

start() { # name, command...
    local name=$1; shift
    "$@" >>"$work/$name.log" 2>&1 &
    pid[$name]=$!
}
start_persist() { start persist "$bin/joblet-persist" --config "$work/persist.yml"; }
start_core() { start core "$bin/joblet-core" --config "$work/core.yml"; }
stop() { # name
    kill "${pid[$1]}" 2>/dev/null || true
    wait "${pid[$1]}" 2>/dev/null || true
    unset "pid[$1]"
}
ready() { # url
    for _ in $(seq 300); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

start prometheus prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$PROM" --rules.alert.resend-delay=1s
start alertmanager prometheus-alertmanager --config.file="$work/alertmanager.yml" \
    --storage.path="$work/am" --web.listen-address="127.0.0.1:$AM" --cluster.listen-address=
start_persist
start_core
ready "http://127.0.0.1:$PROM/-/ready" || fail "prometheus did not start: $(tail "$work/prometheus.log")"
ready "http://127.0.0.1:$AM/-/ready" || fail "alertmanager did not start: $(tail "$work/alertmanager.log")"
ready "http://127.0.0.1:$CORE_METRICS/metrics" || fail "joblet-core did not start: $(tail "$work/core.log")"
ready "http://127.0.0.1:$PERSIST_METRICS/metrics" || fail "joblet-persist did not start: $(tail "$work/persist.log")"

# The alert names Alertmanager holds as active, one per line.
active() {
    curl -fsS "http://127.0.0.1:$AM/api/v2/alerts?active=true&silenced=false&inhibited=false" \
        | jq -r '.[] | select(.status.state == "active") | .labels.alertname' | sort -u
}
wait_alert() { # "fires"|"resolves", alert, seconds
    local want=$1 alert=$2 deadline=$((SECONDS + $3))
    while [ $SECONDS -lt $deadline ]; do
        if active | grep -qx "$alert"; then
            [ "$want" = fires ] && { say "  $alert fired"; return 0; }
        else
            [ "$want" = resolves ] && { say "  $alert resolved"; return 0; }
        fi
        sleep 1
    done
    fail "$alert did not $want within $3 s (active: $(active | tr '\n' ' '))"
}
quiet() { # nothing may fire while healthy
    local firing
    firing=$(active)
    [ -z "$firing" ] || fail "alerts fire on a healthy node: $firing"
}

say "healthy: both daemons up, a job runs"
rnx job run -- sh -c 'echo hello' >/dev/null
sleep 20
quiet

say "core down"
stop core
wait_alert fires JobletCoreDown 60
start_core
ready "http://127.0.0.1:$CORE_METRICS/metrics"
wait_alert resolves JobletCoreDown 60

say "persist down"
stop persist
wait_alert fires JobletPersistDown 60
wait_alert fires JobletIpcDisconnected 60
start_persist
ready "http://127.0.0.1:$PERSIST_METRICS/metrics"
wait_alert resolves JobletPersistDown 60
wait_alert resolves JobletIpcDisconnected 60

say "persist stopped (SIGSTOP) while a job writes: the connection stays up, nothing is acknowledged"
writer=$(rnx job run -- sh -c 'while true; do echo line; sleep 0.05; done')
sleep 3
kill -STOP "${pid[persist]}"
wait_alert fires JobletReplicationStalled 90
kill -CONT "${pid[persist]}"
wait_alert resolves JobletReplicationStalled 90
rnx job stop "$writer" >/dev/null

say "persist's disk full: another file takes 27 of its 32 MB, then a job writes 60 MB"
dd if=/dev/zero of="$work/persist-data/junk" bs=1M count=27 status=none
wait_alert fires JobletPersistFilesystemFull 60
rnx job run -- sh -c 'head -c 45000000 /dev/urandom | base64 -w 148' >/dev/null
wait_alert fires JobletPersistStoreFailing 120
wait_alert fires JobletReplicationStalled 60
rm "$work/persist-data/junk"
mount -o remount,size=512m "$work/persist-data"
wait_alert resolves JobletPersistFilesystemFull 60
wait_alert resolves JobletPersistStoreFailing 120
wait_alert resolves JobletReplicationStalled 60
behind=$(curl -fsS "http://127.0.0.1:$CORE_METRICS/metrics" \
    | awk '/^joblet_core_replication_behind_lines\{/ { sum += $2 } END { print sum + 0 }')
[ "$behind" = 0 ] || fail "$behind lines still behind after the disk has room"

say "recovered: nothing fires"
sleep 5
quiet
say "ok: every provoked alert reached Alertmanager and resolved"

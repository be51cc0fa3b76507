#!/usr/bin/env bash
# `make run`: a local joblet under .joblet/ (git-ignored): configs, data, spool, sockets, and
# the rnx client config. Starts joblet-persist and joblet-core, runs a demo job through rnx,
# then keeps both daemons in the foreground until Ctrl-C, which stops them cleanly.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dir="$top/.joblet"
bin="$top/target/debug"
mkdir -p "$dir"
chmod 700 "$dir"

if [ "$(id -u)" != 0 ]; then
    echo "run: joblet-core manages cgroups and namespaces and needs root" >&2
    exit 1
fi

write_if_missing() {
    local file=$1
    if [ ! -f "$file" ]; then
        cat > "$file"
        echo "run: wrote $file"
    else
        cat > /dev/null
    fi
}

# Mutual TLS from the start: a CA, server and client certificates, and the rnx configs.
if [ ! -f "$dir/certs/ca.pem" ]; then
    "$bin/rnx" certs init --out "$dir/certs" --host localhost
    cp "$dir/certs/rnx-config.yml" "$dir/rnx-config.yml"
    cp "$dir/certs/viewer-rnx-config.yml" "$dir/viewer-rnx-config.yml"
fi

write_if_missing "$dir/persist-config.yml" <<YAML
# Written by make run; edit freely (reference: deploy/config/persist-config.yml).
data_dir: $dir/persist-data
ipc:
  socket: $dir/persist.sock
grpc:
  listen: 127.0.0.1:50052
  tls:
    cert: $dir/certs/server.pem
    key: $dir/certs/server-key.pem
    ca: $dir/certs/ca.pem
metrics:
  listen: 127.0.0.1:9092
retention:
  logs: 7d
  metrics: 30d
YAML

write_if_missing "$dir/joblet-config.yml" <<YAML
# Written by make run; edit freely (reference: deploy/config/joblet-config.yml).
grpc:
  listen: 127.0.0.1:50051
  tls:
    cert: $dir/certs/server.pem
    key: $dir/certs/server-key.pem
    ca: $dir/certs/ca.pem
metrics:
  listen: 127.0.0.1:9091
state_dir: $dir/core-state
persist:
  enabled: true
  socket: $dir/persist.sock
  query_address: 127.0.0.1:50052
  query_tls:
    cert: $dir/certs/core-client.pem
    key: $dir/certs/core-client-key.pem
    ca: $dir/certs/ca.pem
jobs:
  work_root: $dir/work
YAML

pids=()
stop() {
    trap - INT TERM EXIT
    echo
    echo "run: stopping"
    # core first: it flushes replication to persist (running jobs run on under their
    # supervisors, jobs.on_core_shutdown: keep, and the next `make run` re-attaches them).
    for (( i=${#pids[@]}-1; i>=0; i-- )); do
        kill -TERM "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true
    done
    echo "run: stopped"
}
trap stop INT TERM EXIT

wait_for_line() { # file, pattern
    for _ in $(seq 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

start() { # name, config
    "$bin/$1" --config "$2" > "$dir/$1.out" 2> "$dir/$1.log" &
    pids+=($!)
    if ! wait_for_line "$dir/$1.out" "ready"; then
        echo "run: $1 did not start:" >&2
        cat "$dir/$1.log" >&2
        exit 1
    fi
    echo "run: $(cat "$dir/$1.out")  (log: $dir/$1.log)"
}

start joblet-persist "$dir/persist-config.yml"
start joblet-core "$dir/joblet-config.yml"

rnx=("$bin/rnx" --config "$dir/rnx-config.yml")
echo
echo "run: demo job"
echo "\$ rnx job run --max-memory 64 --follow -- sh -c '...'"
"${rnx[@]}" job run --max-memory 64 --follow -- sh -c \
    'echo "hello from job $JOBLET_JOB_ID, running as pid $$ on $(hostname)"; for i in 1 2 3; do echo "step $i"; echo "warning $i" >&2; sleep 0.5; done' || true
demo=$("${rnx[@]}" job list --json | tail -n 1 | sed 's/.*"uuid":"\([^"]*\)".*/\1/')
echo
echo "\$ rnx job log --timestamps ${demo:0:8}"
sleep 1
"${rnx[@]}" job log --timestamps "${demo:0:8}"
echo
echo "\$ rnx job metrics ${demo:0:8}"
"${rnx[@]}" job metrics "${demo:0:8}"
echo
echo "\$ rnx status"
"${rnx[@]}" status || true
cat <<TEXT

run: both daemons are running. In another terminal try:
  alias rnx='$bin/rnx --config $dir/rnx-config.yml'
  rnx job run -- sh -c 'for i in \$(seq 100); do echo line \$i; sleep 0.1; done'
  rnx job list
  rnx job log -f <id>               # history from persist, then live from core
  rnx job metrics --chart <id>
  rnx job run --max-cpu 50 --follow -- sh -c 'timeout 3 sh -c "while :; do :; done"'
A read-only (viewer) client: $bin/rnx --config $dir/viewer-rnx-config.yml job list
Metrics: http://127.0.0.1:9091/metrics (core), http://127.0.0.1:9092/metrics (persist)
Press Ctrl-C to stop both.
TEXT
wait

#!/usr/bin/env bash
# `make run`: a local joblet under .joblet/ (git-ignored): config, data and sockets, then the
# daemons in the foreground until Ctrl-C, which stops them cleanly.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
dir="$top/.joblet"
bin="$top/target/debug"
mkdir -p "$dir"
chmod 700 "$dir"

if [ ! -f "$dir/persist-config.yml" ]; then
    cat > "$dir/persist-config.yml" <<YAML
# Written by make run; edit freely (reference: deploy/config/persist-config.yml).
data_dir: $dir/persist-data
ipc:
  socket: $dir/persist.sock
grpc:
  listen: 127.0.0.1:50052
metrics:
  listen: 127.0.0.1:9092
retention:
  logs: 7d
  metrics: 30d
YAML
    echo "run: wrote $dir/persist-config.yml"
fi

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
    echo "run: stopped"
}
trap stop INT TERM EXIT

"$bin/joblet-persist" --config "$dir/persist-config.yml" 2>"$dir/persist.log" &
pids+=($!)
echo "run: joblet-persist starting (log: $dir/persist.log)"
for _ in $(seq 100); do
    [ -S "$dir/persist.sock" ] && break
    sleep 0.1
done
if [ ! -S "$dir/persist.sock" ]; then
    echo "run: joblet-persist did not start:" >&2
    cat "$dir/persist.log" >&2
    exit 1
fi
echo "run: joblet-persist listening: gRPC 127.0.0.1:50052, metrics http://127.0.0.1:9092/metrics, IPC $dir/persist.sock"
echo "run: joblet-core and rnx are not built yet; press Ctrl-C to stop"
wait

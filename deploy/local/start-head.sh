#!/usr/bin/env bash
# Starts a Ray head node on this machine, on a loopback address, with token authentication.
# Parameters (environment, with defaults):
#   RAY             ray executable            (.venv/bin/ray of this checkout)
#   NODE_IP         the head's address        (127.0.0.2; see below)
#   RAY_PORT        GCS port                  (6379)
#   DASHBOARD_PORT  dashboard + job server    (8265)
#   HEAD_CPUS       CPUs the head offers      (1)
#   METRICS_PORT    Ray's Prometheus metrics  (8080)
#   AGENT_PORT      dashboard agent's HTTP    (52365)
#   CLIENT_PORT     Ray Client server         (10001)
#   RAY_TEMP_DIR    this node's sessions, logs, sockets, job working dirs   (/tmp/ray-vlm-head-$RAY_PORT)
#   RAY_AUTH_MODE   token, or disabled        (token)
#   BLOCK           1: stay in the foreground; Ctrl-C stops the head   (0)
# Then: deploy/local/start-worker.sh, and deploy/local/README.md.
# Every node on this machine needs a temp dir of its own: a node started without one shares
# the head's, and then its log monitor forwards every worker's output a second time and its
# runtime-env agent deletes job working dirs the head's job drivers run in. Keep the path
# short (Ray puts unix sockets under it, ~100 characters at most). Ray's address file is in
# it too, so `ray status` needs `--address $NODE_IP:$RAY_PORT` (and RAY_AUTH_MODE=token).
# NODE_IP is a loopback address other than 127.0.0.1 because Ray, where multi-node clusters
# are enabled (Linux), replaces 127.0.0.1 by the machine's outward address: the nodes would
# then talk through that interface. Any 127.x.y.z reaches this machine only (Linux routes
# all of 127.0.0.0/8 to the loopback device). The dashboard and job server stay on 127.0.0.1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
NODE_IP="${NODE_IP:-127.0.0.2}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HEAD_CPUS:-1}"
METRICS_PORT="${METRICS_PORT:-8080}"
AGENT_PORT="${AGENT_PORT:-52365}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/ray-vlm-head-$RAY_PORT}"
BLOCK="${BLOCK:-0}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Training workers started on this machine inherit these: gloo on loopback, and every
# worker's exporter announces itself where `vlm monitor` or a Prometheus can find it.
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
export VLM_METRICS_SD_DIR="${VLM_METRICS_SD_DIR:-$ROOT/runs/prometheus-targets}"
mkdir -p "$VLM_METRICS_SD_DIR"

if [ "$RAY_AUTH_MODE" = token ]; then
  # Creates ~/.ray/auth_token once; every node, driver and `vlm cluster` call on this
  # machine reads the same file.
  "$RAY" get-auth-token --generate > /dev/null
  echo "auth: token in ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} (RAY_AUTH_MODE=token)"
fi

args=(start --head --node-ip-address="$NODE_IP" --port="$RAY_PORT"
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT"
      --metrics-export-port="$METRICS_PORT" --dashboard-agent-listen-port="$AGENT_PORT"
      --ray-client-server-port="$CLIENT_PORT" --temp-dir="$RAY_TEMP_DIR"
      --num-cpus="$HEAD_CPUS" --disable-usage-stats)
if [ "$BLOCK" = 1 ]; then args+=(--block); fi
echo "+ $RAY ${args[*]}"
"$RAY" "${args[@]}"
echo "head: $NODE_IP:$RAY_PORT; job server and dashboard: http://127.0.0.1:$DASHBOARD_PORT"
echo "temp dir (sessions, logs): $RAY_TEMP_DIR; status: RAY_AUTH_MODE=$RAY_AUTH_MODE $RAY status --address $NODE_IP:$RAY_PORT"
echo "metrics targets: $VLM_METRICS_SD_DIR"

#!/usr/bin/env bash
# Starts a second Ray node on this machine that joins the head of start-head.sh.
# Parameters (environment, with defaults):
#   RAY             ray executable                    (.venv/bin/ray of this checkout)
#   HEAD_ADDRESS    the head's GCS address            (127.0.0.2:6379)
#   NODE_IP         this node's address               (127.0.0.3: a loopback address of its
#                   own, as another machine has; not 127.0.0.1, see start-head.sh)
#   WORKER_CPUS     CPUs this node offers             (2)
#   METRICS_PORT    this node's Ray metrics port      (8081: the head has 8080)
#   AGENT_PORT      this node's dashboard agent port  (52366: the head's agent has 52365)
#   RAY_TEMP_DIR    this node's sessions, logs, sockets, job working dirs  (/tmp/ray-vlm-worker-$AGENT_PORT)
#   RAY_AUTH_MODE   must match the head's             (token)
#   BLOCK           1: stay in the foreground; Ctrl-C stops this node   (0)
# The temp dir must be this node's own, never the head's (see start-head.sh): a node without
# --temp-dir uses the head's, and two nodes in one temp dir print every worker line twice
# and delete each other's job working dirs. The default is keyed by AGENT_PORT, which every
# node on this machine needs its own of anyway.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
HEAD_ADDRESS="${HEAD_ADDRESS:-127.0.0.2:6379}"
NODE_IP="${NODE_IP:-127.0.0.3}"
WORKER_CPUS="${WORKER_CPUS:-2}"
METRICS_PORT="${METRICS_PORT:-8081}"
AGENT_PORT="${AGENT_PORT:-52366}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/ray-vlm-worker-$AGENT_PORT}"
BLOCK="${BLOCK:-0}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
export VLM_METRICS_SD_DIR="${VLM_METRICS_SD_DIR:-$ROOT/runs/prometheus-targets}"
mkdir -p "$VLM_METRICS_SD_DIR"

if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] \
    && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  echo "no auth token: run start-head.sh first (it writes ~/.ray/auth_token), or set RAY_AUTH_TOKEN" >&2
  exit 1
fi

# Another loopback address than the head's, other ports: two Ray nodes on one machine, as on two machines.
args=(start --address="$HEAD_ADDRESS" --node-ip-address="$NODE_IP" --num-cpus="$WORKER_CPUS"
      --metrics-export-port="$METRICS_PORT" --dashboard-agent-listen-port="$AGENT_PORT"
      --temp-dir="$RAY_TEMP_DIR" --disable-usage-stats)
if [ "$BLOCK" = 1 ]; then args+=(--block); fi
echo "+ $RAY ${args[*]}"
"$RAY" "${args[@]}"
echo "worker node joined $HEAD_ADDRESS with $WORKER_CPUS CPUs; temp dir (sessions, logs): $RAY_TEMP_DIR"

#!/usr/bin/env bash
# Runs N processes of the pipeline on this machine, joined by jax.distributed on 127.0.0.1, each with
# DEVICES simulated CPU devices: the multi-host code path (per-host data slices, collective checkpoints)
# without a cluster.
#
# Usage: launch/local.sh [ARGS FOR latent_diffusion.main...]
#   NUM_PROCESSES  number of processes (default 2)
#   DEVICES        CPU devices per process (default 4)
#   PORT           coordinator port on 127.0.0.1 (default 12355)
#   PYTHON         interpreter (default python3)
# Example: NUM_PROCESSES=2 launch/local.sh --config=configs/txt2img.py:smoke --workdir=/tmp/ldm
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES="${DEVICES:-4}"
PORT="${PORT:-12355}"
PYTHON="${PYTHON:-python3}"
for var in NUM_PROCESSES DEVICES PORT; do
  if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: $var must be a positive integer, got '${!var}'" >&2
    exit 2
  fi
done

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" JAX_PLATFORMS=cpu \
    "$PYTHON" -m latent_diffusion.main --coordinator_address="127.0.0.1:${PORT}" \
    --num_processes="$NUM_PROCESSES" --process_id="$i" "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
trap - EXIT
exit "$status"

#!/usr/bin/env bash
# Runs the pipeline on a Cloud TPU VM pod slice: creates the slice (or reuses it), installs this repository on
# every worker, runs the same `python -m latent_diffusion.main --distributed ...` on all workers with a gs://
# workdir, and restarts after a preemption or a failure until every stage is done. Each restart resumes from
# the newest checkpoint (the stages save one when the TPU maintenance/preemption notice arrives).
#
# Usage: TPU_NAME=ldm ZONE=us-central2-b ACCELERATOR=v4-32 WORKDIR=gs://bucket/ldm REPO=https://... \
#          launch/tpu_pod.sh [--config.FIELD=VALUE ...]
#   TPU_NAME      TPU VM name (required)
#   ZONE          GCP zone (required)
#   WORKDIR       gs://bucket/path that every worker can write (required)
#   REPO          git URL of this repository (or your fork) to install on the workers (required)
#   ACCELERATOR   slice type (default v4-8)
#   RUNTIME       TPU VM software version (default: the Cloud TPU docs' image for the generation:
#                 tpu-ubuntu2204-base for v4 and older, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
#                 v2-alpha-tpuv6e for v6e)
#   PYTHON        Python (>= 3.11) for the workers' virtualenv (default python3.11: the images' Ubuntu 22.04
#                 python3 is 3.10, so it is installed from the deadsnakes PPA when missing)
#   CONFIG        config file and arguments (default configs/txt2img.py)
#   EXTRAS        the package extras to install on the workers (default tpu; tpu,web reads parquet and
#                 ArrayRecord shards)
#   SPOT          1 to create a spot (preemptible) slice (default 0)
#   MAX_RESTARTS  restarts after a preemption or failure before giving up (default 20)
#   PROJECT       GCP project (default: gcloud's configured project)
#   DRY_RUN       1 to print every command it would run (for a slice that does not exist yet) and stop
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME, the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${WORKDIR:?set WORKDIR, a gs://bucket/path}"
: "${REPO:?set REPO, the git URL of this repository}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
case "$ACCELERATOR" in
  v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME="${RUNTIME:-$default_runtime}"
PYTHON="${PYTHON:-python3.11}"
DRY_RUN="${DRY_RUN:-0}"
CONFIG="${CONFIG:-configs/txt2img.py}"
EXTRAS="${EXTRAS:-tpu}"
SPOT="${SPOT:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "launch/tpu_pod.sh: WORKDIR must be gs://... (every worker writes it), got '$WORKDIR'" >&2
  exit 2
fi
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || ! [[ "$SPOT" =~ ^[01]$ ]] || ! [[ "$DRY_RUN" =~ ^[01]$ ]]; then
  echo "launch/tpu_pod.sh: MAX_RESTARTS must be a number, SPOT and DRY_RUN 0 or 1" >&2
  exit 2
fi
if [[ "$DRY_RUN" == 0 ]]; then
  command -v gcloud >/dev/null || { echo "launch/tpu_pod.sh: gcloud not found (install the Google Cloud CLI)" >&2
                                    exit 2; }
fi

# Runs a command, or with DRY_RUN=1 prints it, quoted as a shell would read it.
run_or_print() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  where+=(--project="$PROJECT")
fi

state() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo ABSENT
    return
  fi
  "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || echo ABSENT
}

create_and_install() {
  local spot=()
  if [[ "$SPOT" == 1 ]]; then
    spot=(--spot)
  fi
  echo "Creating $TPU_NAME ($ACCELERATOR, $RUNTIME) in $ZONE"
  run_or_print "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${spot[@]}"
  run_or_print "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="set -e
    if ! command -v $PYTHON >/dev/null; then
      sudo apt-get update -q && sudo apt-get install -yq software-properties-common
      sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -yq $PYTHON $PYTHON-venv
    fi
    rm -rf ~/latent_diffusion && git clone -q '$REPO' ~/latent_diffusion && cd ~/latent_diffusion
    $PYTHON -m venv .venv && . .venv/bin/activate && pip install -q -e '.[$EXTRAS]'"
}

# Quote the pipeline arguments once, for the remote shell.
args=""
for arg in "$@"; do
  args+=" $(printf '%q' "$arg")"
done
run="cd ~/latent_diffusion && . .venv/bin/activate && python -m latent_diffusion.main --distributed \
--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$args"

for ((attempt = 0; attempt <= MAX_RESTARTS; attempt++)); do
  case "$(state)" in
    READY) ;;
    ABSENT) create_and_install ;;
    PREEMPTED | TERMINATED)
      echo "$TPU_NAME was preempted; recreating it"
      "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
      create_and_install ;;
    *) echo "Waiting for $TPU_NAME (state $(state))"; sleep 60; continue ;;
  esac
  echo "Run $attempt: $run"
  if run_or_print "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$run"; then
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "Dry run: nothing was run."
      exit 0
    fi
    echo "All stages done; results in $WORKDIR"
    exit 0
  fi
  echo "The run stopped (preemption or failure); resuming from the newest checkpoint" >&2
  sleep 30
done
echo "launch/tpu_pod.sh: giving up after $MAX_RESTARTS restarts" >&2
exit 1

#!/usr/bin/env bash
# The planner runs behind the README's "Planning a TPU run" table: the paper's configs at their batch sizes and
# a Stable-Diffusion-2-sized UNet at 512 px, on v4-32, v5e-64, v5p-128 and v6e-64, each at the config's batch and
# the largest per-chip batch that fits. Compile-only (libtpu), on any host; at paper scale each compile takes
# minutes, so this runs for hours on 2 cores. Usage: bash benchmarks/plan_table.sh [TOPOLOGY ...] > plans.md
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=3
topologies=("$@")
if [[ ${#topologies[@]} -eq 0 ]]; then
  topologies=(v5p-128 v6e-64 v5e-64 v4-32)
fi
# Stable Diffusion 2's UNet (heads of 64 channels, 1024-wide context, v-prediction) at 512 px, bf16; a
# text embedding without transformer layers stands in for the frozen OpenCLIP encoder.
sd2=(--config=configs/txt2img.py --config.ldm.unet.num_head_channels=64 --config.ldm.conditioning.width=1024
     --config.ldm.conditioning.depth=0 --config.data.resolution=512 --config.ldm.parameterization=v
     --config.ldm.unet.dtype=bfloat16)
plan() { echo "### $*"; python -m latent_diffusion.plan "$@"; }
for topology in "${topologies[@]}"; do
  # A v5e chip (16 GiB) cannot hold txt2img's or the SD-2-sized UNet's replicated state: fsdp there.
  mesh=()
  if [[ $topology == v5e* || $topology == v5litepod* ]]; then
    mesh=(--config.mesh.fsdp=-1 --config.mesh.data=1)
  fi
  # --find_batch compiles the config's batch first, so each table has its row beside the largest that fits.
  plan --config=configs/class_cond.py --topology="$topology" --stage=ldm --find_batch
  plan --config=configs/txt2img.py --topology="$topology" --stage=autoencoder --find_batch
  plan --config=configs/txt2img.py "${mesh[@]}" --topology="$topology" --stage=ldm --find_batch
  plan "${sd2[@]}" "${mesh[@]}" --topology="$topology" --stage=ldm --find_batch
done

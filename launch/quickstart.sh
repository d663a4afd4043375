#!/usr/bin/env bash
# The main job on a fresh CPU machine: install, adapt the embedded SmolLM2-135M into a diffusion LM
# on the embedded Shakespeare corpus (a short run with a progress bar), then sample from it twice:
# prefix-conditioned and unconditional.
#
#   bash launch/quickstart.sh                       # defaults below
#   STEPS=300 OUT=out/qs bash launch/quickstart.sh  # longer; extra arguments go to train_adapt.py
#   SKIP_INSTALL=1 bash launch/quickstart.sh        # the requirements are already installed
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-out/quickstart}"
STEPS="${STEPS:-60}"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python -m pip install -q -r requirements.txt
  python -m pip install -q --no-deps -r requirements-embedded.txt
fi

# 60 steps of 4 x 128 tokens: ~4 minutes on 2 idle CPU cores (~3 s/step). Attention is annealed from
# causal to bidirectional over the first 20 steps; validation (3 held-out plays, fixed noise) at
# steps 0, 20, 40 and 60; one checkpoint at the end (out/quickstart/final).
python train_adapt.py --out_dir "$OUT" --overwrite --max_steps "$STEPS" --seq_len 128 --batch_size 4 \
  --lr 1e-4 --min_lr 1e-5 --warmup_steps 5 --anneal_steps 20 --eval_every 20 --eval_batches 2 \
  --save_every 0 --keep_last 1 "$@"

# the DiffuLLaMA sampler: on this short Shakespeare run the confidence-ordered samplers (low_confidence,
# threshold) commit newlines first and print blank lines (docs/sampling.md)
python sample.py --model_name "$OUT/final" --prompt "Romeo." --gen_len 48 --diffusion_steps 32
python sample.py --model_name "$OUT/final" --gen_len 48 --diffusion_steps 32

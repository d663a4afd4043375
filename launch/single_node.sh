#!/usr/bin/env bash
# One machine: torchrun --standalone, one process per GPU (all visible GPUs), or NPROC processes.
#
#   bash launch/single_node.sh --data corpus/ --batch_size 64 --max_steps 10000    # every GPU here
#   NPROC=2 bash launch/single_node.sh --max_steps 10 --out_dir out/ddp_cpu       # 2 CPU processes (gloo)
#   NPROC=4 SCRIPT=train_sft.py bash launch/single_node.sh ...                     # another script
#
# Every argument is passed to the training script (train_adapt.py by default). --batch_size is the
# global batch: it must be a multiple of NPROC. On CPU each process uses OMP_NUM_THREADS threads
# (torchrun sets 1 unless you set it; NPROC x OMP_NUM_THREADS should not exceed the cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="${SCRIPT:-train_adapt.py}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$(python -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi
exec torchrun --standalone --nproc_per_node="$NPROC" "$ROOT/$SCRIPT" "$@"

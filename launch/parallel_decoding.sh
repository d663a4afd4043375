#!/usr/bin/env bash
# The parallel-decoding recipe on a fine-tuned task, end to end: the AR-SFT baseline (the parent fine-tuned
# as a causal LM), diffusion SFT, self-distillation (the SFT model's own right answers), certainty
# fine-tuning on them beside a control run without the certainty term, then the sampler benchmark of the
# three diffusion models against the AR-SFT baseline and its plot (docs/training.md#parallel-decoding).
#
#   bash launch/parallel_decoding.sh                                   # synthetic_sort, the embedded SmolLM2-135M
#   MODEL=out/adapt/final OUT=out/pd STEPS=1000 bash launch/parallel_decoding.sh    # an adapted checkpoint
#                                      (its AR-SFT baseline fine-tunes the AR model it was adapted from)
#   STAGES="bench plot" bash launch/parallel_decoding.sh               # only some stages (the runs exist)
#   MODEL=out/adapt/final TASK=../shared/data/gsm8k_train.json EVAL=../shared/data/gsm8k_test.json SEQ_LEN=320 \
#     EVAL_N=0 STEPS=2000 N_PROMPTS=500 GEN_LEN=128 BLOCK=32 bash launch/parallel_decoding.sh   # GSM8K (a GPU's job)
#
# Environment (all optional): MODEL (default smollm2-135m), AR_MODEL (the AR-SFT baseline's start: default the AR
# parent of MODEL, MODEL itself when it is a causal LM), TASK (synthetic_sort; a built-in task or an
# {"instruction", "output"} file with EVAL its test file), OUT (out/parallel_decoding), STEPS (SFT steps of
# both baselines, 360), CERT_STEPS (certainty and control steps, 200), DISTILL_N (training prompts the SFT
# model answers, 800), N_PROMPTS (held-out benchmark problems at batch 8, 40), N_PROMPTS_B1
# (the first of them at batch 1, 20), CONFIGS (the benchmark's diffusion configurations, each also with the
# dual cache), STAGES (any of: ar sft distill certainty control bench plot; default all in that order),
# BATCHES (the benchmark's batch sizes, "8 1"), DTYPE (of the training runs, bfloat16; the benchmark runs in
# float32), SEQ_LEN (the longest training sequence, 128; GSM8K needs 320), EVAL_N (test problems answered during
# training, 40; 0 = none), GEN_LEN and BLOCK (the benchmark's longest answer, default the longest reference + 1,
# and its block length, default one block).
# About 3.5 hours on 2 CPU cores at one thread a job (ar and sft side by side, then certainty and control;
# the benchmark is about 40 minutes a model).
# A training stage whose run folder already has a checkpoint continues that run (--resume; a finished one does
# nothing), and the benchmark runs only the rows its results file lacks; distill refuses to overwrite its file, so
# after a stop, rerun with the stages still to do in STAGES.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-smollm2-135m}"
AR_MODEL="${AR_MODEL:-$(python -c '
import sys
from common import DataError
from model import ar_parent
try:
    print(ar_parent(sys.argv[1]))
except DataError as e:
    sys.exit("parallel_decoding.sh: MODEL " + str(e).replace("--model_name ", ""))' "$MODEL")}"
TASK="${TASK:-synthetic_sort}"
EVAL="${EVAL:-$TASK}"
OUT="${OUT:-out/parallel_decoding}"
STEPS="${STEPS:-360}"
CERT_STEPS="${CERT_STEPS:-200}"
DISTILL_N="${DISTILL_N:-800}"
N_PROMPTS="${N_PROMPTS:-40}"
N_PROMPTS_B1="${N_PROMPTS_B1:-20}"
CONFIGS="${CONFIGS:-low_confidence,threshold0.9,threshold0.7,threshold0.5,factor1.0,eb0.5}"
STAGES="${STAGES:-ar sft distill certainty control bench plot}"
BATCHES="${BATCHES:-8 1}"
DTYPE="${DTYPE:-bfloat16}"   # training; float32 on a CPU without native bf16 (AVX-512 BF16), where bf16 is slow
SEQ_LEN="${SEQ_LEN:-128}"
EVAL_N="${EVAL_N:-40}"
mkdir -p "$OUT"
# evaluation during training on the first EVAL_N test problems (none when 0: an answer costs a sampler call)
EVALUATE=(); [ "$EVAL_N" != 0 ] && EVALUATE=(--eval_data "$EVAL" --eval_n "$EVAL_N" --eval_batch_size 40)
# the benchmark's answer length and blocks, when set
SAMPLING=(); [ -n "${GEN_LEN:-}" ] && SAMPLING+=(--gen_len "$GEN_LEN"); [ -n "${BLOCK:-}" ] && SAMPLING+=(--block_length "$BLOCK")

COMMON=(--data "$TASK" "${EVALUATE[@]}" --synthetic_n 5000 --batch_size 8
        --lr 2e-4 --min_lr 2e-5 --warmup_steps 20 --seq_len "$SEQ_LEN" --keep_last 1 --dtype "$DTYPE")
has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { if has "$1"; then shift; "$@"; fi; }   # stage NAME command...: run it if NAME is in STAGES
resume() { if [ -e "$1/latest" ]; then echo --resume; fi; }   # a run with a checkpoint is continued, never replaced

# the two baselines at the same budget: the AR parent as a causal LM, and diffusion SFT of MODEL
stage ar python train_sft.py --model_name "$AR_MODEL" --ar "${COMMON[@]}" --max_steps "$STEPS" --eval_every 120 \
  --save_every 120 --out_dir "$OUT/ar" $(resume "$OUT/ar")
stage sft python train_sft.py --model_name "$MODEL" "${COMMON[@]}" --max_steps "$STEPS" --eval_every 120 \
  --save_every 120 --out_dir "$OUT/sft" $(resume "$OUT/sft")

# the SFT model's own answers to training prompts, kept where the checker accepts them
stage distill python train_sft.py --model_name "$OUT/sft" --data "$TASK" --synthetic_n "$DISTILL_N" --distill_n "$DISTILL_N" \
  --sampler threshold --threshold 0.9 --distill "$OUT/distilled.json"

# certainty fine-tuning on them (the entropy of the predictions already right, weight 2 at temperature 0.5),
# and the same run without the certainty term: what the extra steps alone give
CERT=(--data "$OUT/distilled.json" "${EVALUATE[@]}" --batch_size 8
      --lr 1e-4 --min_lr 1e-5 --warmup_steps 10 --seq_len "$SEQ_LEN" --keep_last 1 --max_steps "$CERT_STEPS"
      --eval_every 100 --save_every 100 --dtype "$DTYPE")
stage certainty python train_sft.py --model_name "$OUT/sft" "${CERT[@]}" --certainty_weight 2 --certainty_temp 0.5 \
  --out_dir "$OUT/certainty" $(resume "$OUT/certainty")
stage control python train_sft.py --model_name "$OUT/sft" "${CERT[@]}" --out_dir "$OUT/control" $(resume "$OUT/control")

# accuracy, tokens per forward and tokens/s on held-out problems, with and without the dual cache, at batch 8
# (N_PROMPTS) and batch 1 (the first N_PROMPTS_B1); one thread, timed by process CPU time; every answer kept
if has bench; then
  DUAL=$(echo "$CONFIGS" | tr ',' '\n' | sed 's/$/+dual/' | paste -sd, -)
  for M in sft certainty control; do
    for B in $BATCHES; do
      N=$([ "$B" = 1 ] && echo "$N_PROMPTS_B1" || echo "$N_PROMPTS")
      OMP_NUM_THREADS=1 python bench/bench_samplers.py --model_name "$OUT/$M" --ar_model "$OUT/ar" --prompts "$EVAL" \
        --n_prompts "$N" --batch_sizes "$B" --clock cpu --configs "ar_greedy,$CONFIGS,$DUAL" "${SAMPLING[@]}" \
        --results "$OUT/bench_${M}_b$B.jsonl" --answers "$OUT/answers_${M}_b$B.jsonl"
    done
  done
fi
RESULTS=()
for M in sft certainty control; do for B in $BATCHES; do RESULTS+=("$OUT/bench_${M}_b$B.jsonl"); done; done
stage plot python bench/plot.py accuracy "${RESULTS[@]}" --out "$OUT/accuracy_speed.png"

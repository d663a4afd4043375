"""
The zero-shot comparison table: the AR parent beside diffusion models, from eval_zeroshot.py --output files,
with each diffusion figure's ratio to the AR parent's, the mean of the headline ratios per row and whether
the row meets the method's claim at this scale (mean ratio >= 0.9, >= 1 on at least two tasks, LAMBADA at parity).

    python bench/zeroshot_table.py --ar bench/results/zeroshot_ar.json \
        --rows "untrained=bench/results/zeroshot_untrained.json"
    python bench/zeroshot_table.py --ar AR.json --rows "untrained=U.json" "adapted 1.3M tokens=A.json" \
        --paper bench/results/paper_table1.json --jsonl ratios.jsonl
    python bench/plot.py ratios ratios.jsonl --out bench/plots/zeroshot_ratios.png
    python bench/zeroshot_table.py --paper bench/results/paper_table1.json --write_paper_ratios   # after editing its raw numbers

It prints a markdown table: task, metric, the AR value ± SE (n), and per --rows entry its value ± SE (n) and
its ratio to the AR figure (diffusion / AR; for perplexities AR / diffusion, so above 1 is better everywhere).

- Same examples. A row that scored fewer examples of a task than the AR file (a smaller --limit) is compared
  with the AR figure recomputed from the AR file's per-example records on the same first n examples (its
  "examples" records, or a compact "first_N_correct" list); a column "AR, same examples" shows that figure.
  A row that scored more is recomputed on the AR file's n from its own records. Without the records the
  stated figures are compared, and the cell is flagged (†) and explained under the table.
- Headline metric, one per task, for the mean and the goal: acc_norm where the task has it (hellaswag, piqa,
  siqa, arc_easy, arc_challenge), acc for lambada and winogrande, exact_match for triviaqa and gsm8k, ROUGE-1
  for rocstories, token perplexity for wikitext (the diffusion model's is an upper bound, from the ELBO, so
  its ratio is a lower bound of the true one). Bold in the table.
- Floor (--floor_se, default 2): where the AR figure it is compared with lies within that many of its standard
  errors of 0 (TriviaQA for a 135M parent: 1 of 500), a ratio measures noise: the cell shows "-", a note under
  the table names it, and the mean and the goal leave the task out. 0 keeps every ratio.
- Goal (--goal_mean, --goal_tasks, --lambada_parity): the mean of a row's headline ratios >= 0.9, a ratio
  >= 1 on at least two tasks, and LAMBADA's ratio >= 1.0; each row says whether it meets it and, if not, why.
- A row may join several files (LABEL=A.json,B.json): one model's tasks run as parallel jobs, each with its own
  --output; a task in two of them is an error.
- --paper FILE: the ratios DiffuGPT-S / GPT2-S of the DiffuLLaMA paper's Table 1 (bench/results/paper_table1.json
  holds the raw numbers and their source) in an extra column, with the same summary. The ratios are computed
  here from the raw numbers; --write_paper_ratios writes them into the file (it refuses a file whose stored
  ratios do not follow from its raw numbers otherwise).
- --jsonl FILE: one JSON line per (row, task) with the headline metric, {"row", "task", "metric", "value",
  "ar", "ratio", "n"}, the paper's as row "paper: DiffuGPT-S / GPT2-S" (n null): what `plot.py ratios` draws.

Bad input (a missing file, not JSON, no metrics, a row without any task in common with the AR file, a paper
file that does not add up) is one line naming the file, exit status 2.
"""
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import DataError, Parser, at_least, check_output_file, first_line, mean_stderr, perplexities, real  # noqa: E402

PROG = "zeroshot_table.py"

# the headline metric of each task: the first of these that both files have
HEADLINE = {
    "lambada": ("acc",), "winogrande": ("acc",),
    "hellaswag": ("acc_norm", "acc"), "piqa": ("acc_norm", "acc"), "siqa": ("acc_norm", "acc"),
    "arc_easy": ("acc_norm", "acc"), "arc_challenge": ("acc_norm", "acc"),
    "triviaqa": ("exact_match",), "gsm8k": ("exact_match",),
    "rocstories": ("rouge1", "rouge_1", "rouge-1", "ROUGE-1", "rouge1_f"),
    "wikitext": ("token_perplexity", "word_perplexity", "bits_per_byte"),
}
OTHER_TASKS = ("acc_norm", "acc", "exact_match")          # a task not listed above (an lm-eval task)
LOWER_IS_BETTER = ("token_perplexity", "word_perplexity", "bits_per_byte", "perplexity", "ppl")
PAPER_ROW = "paper: {diffusion} / {ar}"
EPS = 1e-9   # a ratio of exactly 1 computed in floating point counts as 1


# -----------------------------------------------------------------------------
# reading

def load_json(path, what="file"):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({first_line(e)})") from None


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_results(path):
    """An eval_zeroshot.py --output file as {"path", "settings", "metrics": {task: {metric: (value, se)}},
    "n": {task: n}, "data": {task: data file}, "examples": {task: records}, "compact": {task: (N, list)}}."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise DataError(f"{path}: no metrics (not an eval_zeroshot.py --output file)")
    res = {"path": path, "settings": data.get("settings") or {}, "metrics": {}, "n": {}, "data": {},
           "examples": data.get("examples") if isinstance(data.get("examples"), dict) else {}, "compact": {}}
    for task, ms in data["metrics"].items():
        if not isinstance(ms, dict):
            continue
        got = {m: (float(v["value"]), float(v["stderr"]) if is_number(v.get("stderr")) else None)
               for m, v in ms.items() if isinstance(v, dict) and is_number(v.get("value"))}
        if got:
            res["metrics"][task] = got
            n = ms.get("n")
            res["n"][task] = int(n) if is_number(n) else len(res["examples"].get(task) or []) or None
            res["data"][task] = ms.get("data")
    if not res["metrics"]:
        raise DataError(f"{path}: no metrics (not an eval_zeroshot.py --output file)")
    for key, v in data.items():   # e.g. "first_50_correct": {task: [bool, or [acc right, acc_norm right]]}
        m = re.fullmatch(r"first_(\d+)_correct", key)
        if m and isinstance(v, dict):
            for task, lst in v.items():
                if isinstance(lst, list):
                    res["compact"][task] = lst
    return res


def example_value(r, metric):
    """One example's contribution to `metric` from its eval_zeroshot.py record, or None."""
    if not isinstance(r, dict):
        return None
    if metric in ("acc", "acc_norm") and "gold" in r and ("pred" if metric == "acc" else "pred_norm") in r:
        return float(r["pred" if metric == "acc" else "pred_norm"] == r["gold"])
    if metric in ("acc", "exact_match") and isinstance(r.get("correct"), bool):
        return float(r["correct"])
    return float(r[metric]) if is_number(r.get(metric)) else None


def first_n(res, task, metric, n):
    """(value, se) of `metric` on the first n examples of `task` from the file's per-example records, or None
    when it has none for them."""
    recs = res["examples"].get(task)
    if isinstance(recs, list) and len(recs) >= n:
        recs = recs[:n]
        if metric in ("token_perplexity", "word_perplexity", "bits_per_byte"):   # wikitext: one figure of the sums
            if not all(isinstance(r, dict) and all(is_number(r.get(k)) for k in ("loglik", "tokens", "words", "bytes"))
                       for r in recs):
                return None
            sums = [sum(r[k] for r in recs) for k in ("loglik", "tokens", "words", "bytes")]
            return perplexities(*sums)[metric], None
        vals = [example_value(r, metric) for r in recs]
        if vals and None not in vals:
            return mean_stderr(vals)
    compact = res["compact"].get(task)
    if compact and len(compact) >= n and metric in ("acc", "acc_norm", "exact_match"):
        vals = []
        for c in compact[:n]:
            if isinstance(c, bool) and metric != "acc_norm":
                vals.append(float(c))
            elif isinstance(c, list) and len(c) == 2 and metric != "exact_match" and all(isinstance(x, bool) for x in c):
                vals.append(float(c[0 if metric == "acc" else 1]))
            else:
                return None
        return mean_stderr(vals)
    return None


def parse_row(spec):
    """ "label=FILE" or "label=FILE1,FILE2,..." (or FILE alone: its name is the label) -> (label, [paths])."""
    if "=" in spec and not os.path.isfile(spec):
        label, path = spec.split("=", 1)
    else:
        label, path = os.path.splitext(os.path.basename(spec))[0], spec
    paths = [path] if os.path.isfile(path) else path.split(",")
    if not label.strip() or not all(paths):
        raise DataError(f"--rows {spec!r}: expected LABEL=FILE or LABEL=FILE1,FILE2")
    return label.strip(), paths


def read_row(paths):
    """One row from one or more results files with different tasks (one model's suite split over jobs): their
    metrics, counts and records together; the settings of the first, the limit the largest."""
    res = read_results(paths[0])
    for i, path in enumerate(paths[1:], 1):
        more = read_results(path)
        both = sorted(set(res["metrics"]) & set(more["metrics"]))
        if both:
            raise DataError(f"{path}: {', '.join(both)} also in {', '.join(paths[:i])} (one file per task in a row)")
        for key in ("metrics", "n", "data", "examples", "compact"):
            res[key].update({t: v for t, v in more[key].items() if t in more["metrics"]})
        res["path"] += " + " + path
        limits = [x["settings"].get("limit") for x in (res, more)]
        res["settings"] = dict(res["settings"], limit=max(limits) if None not in limits else None)
    return res


def read_paper(path):
    """The paper's Table 1 file: {"models": {"ar", "diffusion"}, "raw": {model: {task: number, or [ROUGE-1, 2, L]}},
    "not_zero_shot": [tasks], "ratios": {task: ratio}, ...}; its stored ratios must follow from its raw numbers."""
    paper = load_json(path)
    check_paper(paper, path)
    ratios = paper_ratios(paper, path)
    stored = paper.get("ratios")
    if stored is not None and stored != ratios:
        raise DataError(f"{path}: its \"ratios\" do not follow from its raw numbers (run {PROG} --paper {path} "
                        f"--write_paper_ratios)")
    return paper, ratios


def check_paper(paper, path):
    try:
        models, raw = paper["models"], paper["raw"]
        if not isinstance(raw[models["ar"]], dict) or not isinstance(raw[models["diffusion"]], dict):
            raise TypeError
    except (KeyError, TypeError):
        raise DataError(f"{path}: expected \"models\": {{\"ar\", \"diffusion\"}} and \"raw\" numbers of both "
                        f"models") from None


def paper_ratios(paper, path):
    """{task: diffusion / AR} of the paper's zero-shot tasks that this suite has, rounded to 4 places; ROUGE-1 for
    rocstories."""
    ar, diff = paper["raw"][paper["models"]["ar"]], paper["raw"][paper["models"]["diffusion"]]
    out = {}
    for task in ar:
        if task not in HEADLINE or task not in diff or task in paper.get("not_zero_shot", []):
            continue
        a, d = (x[0] if isinstance(x, list) and x else x for x in (ar[task], diff[task]))
        if not is_number(a) or not is_number(d) or a <= 0:
            raise DataError(f"{path}: {task}: raw numbers {ar[task]!r} / {diff[task]!r} are not positive numbers")
        out[task] = round(d / a, 4)
    if not out:
        raise DataError(f"{path}: no task of the zero-shot suite in both models' raw numbers")
    return out


# -----------------------------------------------------------------------------
# comparing

def headline(task, ar_metrics, row_metrics):
    for m in HEADLINE.get(task, OTHER_TASKS):
        if m in ar_metrics and m in row_metrics:
            return m
    common = [m for m in ar_metrics if m in row_metrics]
    return common[0] if common else None


def ratio_of(metric, value, ar):
    """value / AR, or AR / value for a perplexity (above 1: better than AR); None when it divides by zero."""
    if metric in LOWER_IS_BETTER:
        return ar / value if value > 0 else None
    return value / ar if ar > 0 else None


def compare(ar, row, task, metric, floor_se=0.0):
    """One cell: the row's figure and the AR figure on the same examples, and their ratio. `how`: "same" (the
    same n), "ar_first" (AR recomputed on the row's first n), "row_first" (the row recomputed on AR's n) or
    "stated" (different n and no per-example records to recompute: the stated figures, flagged)."""
    v, se = row["metrics"][task][metric]
    a, ase = ar["metrics"][task][metric]
    n_ar, n_row = ar["n"].get(task), row["n"].get(task)
    n, how = n_row, "same"
    if n_ar is not None and n_row is not None and n_ar != n_row:
        if n_row < n_ar:
            got = first_n(ar, task, metric, n_row)
            how = "ar_first" if got else "stated"
            a, ase = got or (a, ase)
        else:
            got = first_n(row, task, metric, n_ar)
            how, n = ("row_first", n_ar) if got else ("stated", n_row)
            v, se = got or (v, se)
    floor = bool(floor_se) and metric not in LOWER_IS_BETTER and ase is not None and a - floor_se * ase <= 0
    return dict(value=v, se=se, ar=a, ar_se=ase, n=n, n_ar=n_ar, n_row=n_row, how=how, floor=floor,
                ratio=None if floor else ratio_of(metric, v, a))


def goal_verdict(ratios, goal_mean=0.9, goal_tasks=2, lambada_parity=1.0):
    """(mean, [tasks at or above AR], met, reasons) of {task: headline ratio}; ratios of None are left out."""
    got = {t: r for t, r in ratios.items() if r is not None}
    mean = sum(got.values()) / len(got) if got else None
    above = [t for t, r in got.items() if r >= 1 - EPS]
    reasons = []
    if mean is None or mean < goal_mean - EPS:
        reasons.append("no ratio" if mean is None else f"mean {mean:.2f} < {goal_mean:g}")
    if len(above) < goal_tasks:
        reasons.append(f"{len(above)} task{'s' * (len(above) != 1)} >= 1, {goal_tasks} needed")
    if "lambada" not in got:
        reasons.append("LAMBADA not scored")
    elif got["lambada"] < lambada_parity - EPS:
        reasons.append(f"LAMBADA {got['lambada']:.2f} < {lambada_parity:g}")
    return mean, above, not reasons, reasons


def build(ar, rows, floor_se=0.0):
    """(cells {(label, task, metric): compare(...)}, headline {(label, task): metric}) of the AR file and the rows
    [(label, results)], over the tasks each row has in common with the AR file."""
    cells, head = {}, {}
    for label, row in rows:
        common = [t for t in ar["metrics"] if t in row["metrics"]]
        if not common:
            raise DataError(f"{row['path']}: no task in common with the AR file {ar['path']} (it has "
                            f"{', '.join(row['metrics'])}; the AR file has {', '.join(ar['metrics'])})")
        for task in common:
            h = headline(task, ar["metrics"][task], row["metrics"][task])
            if h is None:
                continue
            head[(label, task)] = h
            for metric in ar["metrics"][task]:
                if metric in row["metrics"][task]:
                    cells[(label, task, metric)] = compare(ar, row, task, metric, floor_se)
    return cells, head


# -----------------------------------------------------------------------------
# printing

def fmt(v, se=None, places=None):
    if v is None:
        return "-"
    places = places if places is not None else (2 if abs(v) >= 10 else 4)
    return f"{v:.{places}f}" + (f" ± {se:.{places}f}" if se is not None else "")


def describe(label, res):
    s = res["settings"]
    bits = [f"mode {s['mode']}" if s.get("mode") else None,
            f"mc_num {s['mc_num']}" if s.get("mode") != "ar" and s.get("mc_num") else None,
            f"--limit {s['limit']}" if s.get("limit") else None]
    return (f"- {label}: {s.get('scored_model') or s.get('model_name') or '?'} "
            f"({', '.join(b for b in bits if b)}), {res['path']}")


def render(ar, rows, cells, head, paper=None, paper_ratio=None, goal=(0.9, 2, 1.0), floor_se=0.0):
    """The printed report (a list of lines) and the summary {label: {"mean", "above", "met", "reasons", "ratios"}}."""
    lines = ["Rows:", describe("AR parent", ar)] + [describe(label, res) for label, res in rows]
    paper_label = PAPER_ROW.format(**paper["models"]) if paper else None
    if paper:
        src = paper.get("source")
        lines.append(f"- {paper_label}: {src.get('cite', '?') if isinstance(src, dict) else src or '?'}")
    same_col = {label: any(c["how"] != "same" for (lb, *_), c in cells.items() if lb == label) for label, _ in rows}
    header = ["task", "metric", "AR parent"]
    for label, _ in rows:
        header += [label] + (["AR, same examples"] if same_col[label] else []) + [f"{label} / AR"]
    if paper:
        header.append(paper_label)
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = {}
    for task, ms in ar["metrics"].items():
        for metric, (v, se) in ms.items():
            is_head = any(head.get((label, task)) == metric for label, _ in rows) or (
                not any((label, task) in head for label, _ in rows) and metric == headline(task, ms, ms))
            line = [task, f"**{metric}**" if is_head else metric, f"{fmt(v, se)} ({ar['n'].get(task)})"]
            for label, _ in rows:
                c = cells.get((label, task, metric))
                if c is None:
                    line += [""] * (3 if same_col[label] else 2)
                    continue
                line.append(f"{fmt(c['value'], c['se'])} ({c['n']})" if c["how"] != "row_first" else
                            f"{fmt(c['value'], c['se'])} (first {c['n']} of {c['n_row']})")
                if same_col[label]:
                    line.append({"same": "same", "row_first": "same",
                                 "ar_first": f"{fmt(c['ar'], c['ar_se'])} (first {c['n']})",
                                 "stated": f"{fmt(c['ar'])} (all {c['n_ar']}) †"}[c["how"]])
                if c["how"] == "stated":
                    notes.setdefault(("stated", label), []).append(task)
                elif c["how"] in ("ar_first", "row_first"):
                    notes.setdefault((c["how"], label), set()).add((task, c["n"]))
                if c["floor"]:
                    notes.setdefault(("floor", label), []).append(f"{task} {metric}")
                line.append("-" if c["ratio"] is None else f"{c['ratio']:.2f}" + (" †" if c["how"] == "stated" else ""))
            if paper:
                line.append(f"{paper_ratio[task]:.2f}" if is_head and task in paper_ratio else "")
            lines.append("| " + " | ".join(line) + " |")
    lines += ["", "Bold: the task's headline metric, the one the mean and the goal use. Ratios: diffusion / AR "
              "(perplexity: AR / diffusion), so above 1 is better than the AR parent."]
    for (kind, label), what in notes.items():
        if kind == "ar_first":
            got = ", ".join(f"{t} ({n})" for t, n in sorted(what, key=lambda x: list(ar["metrics"]).index(x[0])))
            lines.append(f"{label}: fewer examples than the AR file: {got}; the AR figure it is compared with is "
                         f"recomputed from {ar['path']}'s per-example records on the same first n (column "
                         f"\"AR, same examples\").")
        elif kind == "floor":
            lines.append(f"{label}: {', '.join(what)}: no ratio: the AR figure is within {floor_se:g} of its standard "
                         f"errors of 0 on these examples (--floor_se), so the ratio would measure noise; left out of "
                         f"the mean.")
        elif kind == "row_first":
            got = ", ".join(f"{t} ({n})" for t, n in sorted(what))
            lines.append(f"{label}: more examples than the AR file: {got}; its figure is recomputed from its own "
                         f"per-example records on the AR file's first n.")
        else:
            lines.append(f"† {label}: {', '.join(dict.fromkeys(what))}: a different number of examples from the AR "
                         f"file and no per-example records to recompute either on the same ones: the stated "
                         f"figures are compared, not the same examples.")
    for label, res in rows:
        for task in res["metrics"]:
            if task in ar["metrics"] and ar["data"].get(task) and res["data"].get(task) and \
                    os.path.basename(str(ar["data"][task])) != os.path.basename(str(res["data"][task])):
                lines.append(f"{label}: {task}: scored on {res['data'][task]}, the AR parent on {ar['data'][task]}.")
        if res["settings"].get("mode") == "ar":
            lines.append(f"{label}: {res['path']} was scored in AR mode (--ar): not a diffusion row.")
        missing = [t for t in res["metrics"] if t not in ar["metrics"]]
        if missing:
            lines.append(f"{label}: {', '.join(missing)}: not in the AR file, left out.")
    if ar["settings"].get("mode") not in (None, "ar"):
        lines.append(f"AR parent: {ar['path']} was scored in {ar['settings']['mode']} mode, not with --ar.")
    if any(t == "wikitext" for (_, t) in head):
        lines.append("wikitext: the diffusion perplexities are upper bounds (from the ELBO, a lower bound of the "
                     "log-likelihood), the AR ones exact; the ratio AR / diffusion is therefore a lower bound of the "
                     "true ratio.")
    if paper:
        lines.append(f"{paper_label}: the paper's own Table 1 on its own evaluation (GPT-2 small and DiffuGPT-S), "
                     f"not these examples; {paper.get('note', '')}".rstrip("; "))
    goal_mean, goal_tasks, parity = goal
    lines += ["", f"Headline ratios; goal: mean >= {goal_mean:g}, >= 1 on at least {goal_tasks} tasks, LAMBADA ratio "
              f">= {parity:g}:"]
    summary = {}
    entries = [(label, {t: cells[(label, t, head[(label, t)])]["ratio"] for (lb, t) in head if lb == label})
               for label, _ in rows]
    if paper:
        entries.append((paper_label, dict(paper_ratio)))
    for label, ratios in entries:
        mean, above, met, reasons = goal_verdict(ratios, *goal)
        summary[label] = dict(mean=mean, above=above, met=met, reasons=reasons, ratios=ratios)
        each = ", ".join(f"{t} {'-' if r is None else f'{r:.2f}'}" for t, r in ratios.items())
        absent = [t for t in ar["metrics"] if t not in ratios] if label != paper_label else []
        lines.append(f"- {label}: mean {fmt(mean, places=2)} over {sum(r is not None for r in ratios.values())} "
                     f"task{'s' * (len(ratios) != 1)} ({each}); {len(above)} at or above AR"
                     + (f" ({', '.join(above)})" if above else "")
                     + (f"; not scored: {', '.join(absent)}" if absent else "")
                     + f"; goal {'met' if met else 'not met: ' + '; '.join(reasons)}")
    return lines, summary


def jsonl_lines(rows, cells, head, paper=None, paper_ratio=None):
    out = []
    for label, _ in rows:
        for (lb, task), metric in head.items():
            if lb == label:
                c = cells[(label, task, metric)]
                out.append({"row": label, "task": task, "metric": metric, "value": c["value"], "ar": c["ar"],
                            "ratio": c["ratio"], "n": c["n"]})
    if paper:
        label = PAPER_ROW.format(**paper["models"])
        raw = paper["raw"]
        for task, r in paper_ratio.items():
            a, d = (x[0] if isinstance(x, list) else x for x in (raw[paper["models"]["ar"]][task],
                                                                   raw[paper["models"]["diffusion"]][task]))
            out.append({"row": label, "task": task, "metric": HEADLINE[task][0], "value": d, "ar": a, "ratio": r,
                        "n": None})
    return out


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__.strip())
    p.add_argument("--ar", default=None, help="eval_zeroshot.py --ar --output file of the AR parent")
    p.add_argument("--rows", nargs="+", default=None, metavar="LABEL=FILE",
                   help="diffusion rows: eval_zeroshot.py --output files, each LABEL=FILE (or FILE: its name is the label); "
                   "LABEL=FILE1,FILE2 joins the files of one model's tasks split over several jobs")
    p.add_argument("--paper", default=None, help="the paper's Table 1 numbers (bench/results/paper_table1.json): "
                   "its ratios DiffuGPT-S / GPT2-S in an extra column")
    p.add_argument("--write_paper_ratios", action="store_true",
                   help="compute the --paper file's ratios from its raw numbers and write them into it")
    p.add_argument("--jsonl", default=None, help="write one JSON line per (row, task) here (the input of plot.py ratios)")
    p.add_argument("--floor_se", type=real(0.0), default=2.0,
                   help="no ratio where the AR figure is within this many standard errors of 0 (0: every ratio)")
    p.add_argument("--goal_mean", type=real(0.0), default=0.9, help="goal: the least mean of the headline ratios")
    p.add_argument("--goal_tasks", type=at_least(0), default=2, help="goal: tasks with a ratio >= 1 needed")
    p.add_argument("--lambada_parity", type=real(0.0), default=1.0, help="goal: the least LAMBADA ratio")
    args = p.parse_args(argv)
    if args.write_paper_ratios and not args.paper:
        p.error("--write_paper_ratios needs --paper")
    if not args.ar and not args.write_paper_ratios:
        p.error("--ar is required (the AR parent's results file)")
    if args.ar and not args.rows:
        p.error("--rows needs at least one LABEL=FILE")
    if args.jsonl:
        check_output_file(args.jsonl, p.error)
    args.error = p.error
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        paper, paper_ratio = (None, None)
        if args.paper:
            if args.write_paper_ratios:
                paper = load_json(args.paper)
                check_paper(paper, args.paper)
                paper["ratios"] = paper_ratios(paper, args.paper)   # raises before the file is touched
                with open(args.paper, "w", encoding="utf-8") as f:
                    json.dump(paper, f, indent=1)
                    f.write("\n")
                print(f"wrote {args.paper}: ratios {paper['ratios']}")
            paper, paper_ratio = read_paper(args.paper)
        if not args.ar:
            return {"paper_ratios": paper_ratio}
        ar = read_results(args.ar)
        rows, seen = [], set()
        for spec in args.rows or []:
            label, paths = parse_row(spec)
            if label in seen:
                raise DataError(f"--rows: the label {label!r} is given twice")
            seen.add(label)
            rows.append((label, read_row(paths)))
        cells, head = build(ar, rows, args.floor_se)
    except DataError as e:
        args.error(first_line(e))
    lines, summary = render(ar, rows, cells, head, paper, paper_ratio,
                            goal=(args.goal_mean, args.goal_tasks, args.lambada_parity), floor_se=args.floor_se)
    print("\n".join(lines))
    records = jsonl_lines(rows, cells, head, paper, paper_ratio)
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"\nwrote {args.jsonl} ({len(records)} lines)")
    return {"cells": cells, "headline": head, "summary": summary, "jsonl": records, "paper_ratios": paper_ratio}


if __name__ == "__main__":
    main()

"""
PNG plots of training logs and benchmark results (matplotlib, no display needed).

    python bench/plot.py loss out/quickstart/log.jsonl --out bench/plots/quickstart_loss.png
    python bench/plot.py loss out/adapt/log.jsonl out/sft/log.jsonl --out loss.png    # overlaid, labelled by folder
    python bench/plot.py loss out/a/log.jsonl out/b/log.jsonl --smooth 50 --out loss.png   # means of the last 50 steps
    python bench/plot.py lambada bench/results/lambada_tokens.jsonl --out bench/plots/lambada_tokens.png
    python bench/plot.py speed bench/results/samplers_cpu.jsonl --out bench/plots/sampler_speed.png
    python bench/plot.py accuracy bench/results/sort_sft.jsonl bench/results/sort_certainty.jsonl --out acc.png
    python bench/plot.py ratios ratios.jsonl --out bench/plots/zeroshot_ratios.png

loss: training loss, validation loss (val_loss), the clean half's AR loss (ar_loss, train_sft.py --ar_weight;
dotted) and the learning rate against the step from the log.jsonl of train_adapt.py or train_sft.py (a third
panel for eval_accuracy when a log has it). Lines without any
of these (e.g. {"step": 60, "stopped": "SIGTERM"}) are skipped. --smooth N draws each training loss (loss,
ar_loss) as the mean of its last N logged values, so runs whose per-step losses differ by less than their noise
compare; validation loss, learning rate and accuracy are drawn as logged.

lambada: LAMBADA accuracy against tokens of adaptation, one line per "run" (log x axis), from JSON lines
with run, tokens, accuracy and optional stderr, lines (how many LAMBADA lines were scored) and ar.
Rows at 0 tokens (the AR parent, "ar": true, and the untrained bidirectional model) are horizontal lines.

speed: tokens/s against tokens per forward (1 / forwards_per_token), one panel per batch size, one
marker per sampler configuration, the AR parent's greedy decoding (ar_greedy) as a horizontal line, from
the JSON lines bench/bench_samplers.py --results writes.

accuracy: accuracy (with its standard error) against tokens/s, one panel per batch size, from the JSON
lines bench/bench_samplers.py --results writes on a task (--prompts synthetic_sort, gsm8k, ...); one color
per model (several files or models overlay), one marker per configuration, the ar_* rows (the AR model,
e.g. the AR-SFT parent) as stars, black then greys (one per AR model).

ratios: the zero-shot ratios diffusion / AR parent, from the JSON lines bench/zeroshot_table.py --jsonl writes
(row, task, metric, ratio): grouped bars, one group per task (labelled with its metric), one color per row;
the paper's ratios (row "paper: ...") as black markers; horizontal lines at 1.0 (parity) and 0.9 (the goal's
mean). A line whose ratio is null (a division by zero) is not drawn.

Bad input (a missing file, a line that is not JSON, a missing or non-numeric field) is one line naming the
file and line, exit status 2.
"""
import argparse
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")   # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import DataError, binomial_se, check_output_file, first_line  # noqa: E402


# -----------------------------------------------------------------------------
# reading

def read_jsonl(path):
    """[(line number, object)] of a JSON-lines file, blank lines skipped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {i}: not valid JSON ({first_line(e)})") from None
        if not isinstance(r, dict):
            raise DataError(f"{path} line {i}: expected a JSON object, got {type(r).__name__}")
        rows.append((i, r))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def number(r, key, path, i, optional=False):
    """r[key] as a float (None when optional and absent or null)."""
    v = r.get(key)
    if v is None and optional:
        return None
    if key not in r:
        raise DataError(f"{path} line {i}: missing field {key!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{path} line {i}: field {key!r} is not a number ({v!r})")
    return float(v)


def text(r, key, path, i):
    if not isinstance(r.get(key), str) or not r[key]:
        raise DataError(f"{path} line {i}: missing field {key!r} (a name)")
    return r[key]


LOG_KEYS = ("loss", "val_loss", "ar_loss", "lr", "eval_accuracy")


def loss_series(path):
    """{key: (steps, values)} for each of LOG_KEYS the log has, in file order."""
    series = {k: ([], []) for k in LOG_KEYS}
    for i, r in read_jsonl(path):
        step = number(r, "step", path, i)
        for k in LOG_KEYS:
            v = number(r, k, path, i, optional=True)
            if v is not None:
                series[k][0].append(step)
                series[k][1].append(v)
    if not series["loss"][0] and not series["val_loss"][0]:
        raise DataError(f"{path}: no line has 'loss' or 'val_loss' (not a train_adapt.py / train_sft.py log.jsonl?)")
    return {k: s for k, s in series.items() if s[0]}


def lambada_series(path):
    """(references, runs, lines): references [(label, accuracy, ar, marked)] for the rows at 0 tokens; runs
    {label: (tokens, accuracies, stderrs, marked)} sorted by tokens; lines the LAMBADA size most rows have.
    Rows scored on another number of lines are marked: "(N lines)" in their label, drawn fainter."""
    rows = []
    for i, r in read_jsonl(path):
        lines = r.get("lines")
        if lines is not None and (isinstance(lines, bool) or not isinstance(lines, int)):
            raise DataError(f"{path} line {i}: field 'lines' is not a whole number ({lines!r})")
        tokens = number(r, "tokens", path, i)
        if tokens < 0:
            raise DataError(f"{path} line {i}: field 'tokens' is negative ({tokens:g})")
        rows.append((text(r, "run", path, i), tokens, number(r, "accuracy", path, i),
                     number(r, "stderr", path, i, optional=True), lines, bool(r.get("ar"))))
    sizes = [row[4] for row in rows]
    usual = max(sizes, key=sizes.count)
    refs, runs = [], {}
    for run, tokens, acc, err, lines, ar in rows:
        marked = lines != usual
        label = f"{run} ({lines:,} lines)" if marked and lines is not None else run
        if tokens == 0:
            refs.append((label, acc, ar, marked))
        else:
            runs.setdefault((label, marked), []).append((tokens, acc, err))
    runs = {label: (*map(list, zip(*sorted(pts, key=lambda p: p[0]))), marked) for (label, marked), pts in runs.items()}
    return refs, runs, usual


def speed_series(path):
    """(settings of the first row, {batch: {config: (tokens per forward, tokens/s)}}), configs in file order."""
    panels, settings = {}, None
    for i, r in read_jsonl(path):
        name, bs = text(r, "config", path, i), number(r, "batch", path, i)
        if bs != int(bs) or bs < 1:
            raise DataError(f"{path} line {i}: field 'batch' is not a batch size ({bs:g})")
        bs = int(bs)
        tps, fpt = number(r, "tokens_per_s", path, i), number(r, "forwards_per_token", path, i)
        if fpt <= 0:
            raise DataError(f"{path} line {i}: field 'forwards_per_token' is not positive ({fpt:g})")
        if name in panels.get(bs, {}):
            raise DataError(f"{path} line {i}: a second row for {name} at batch {bs} (one file per setting)")
        panels.setdefault(bs, {})[name] = (1 / fpt, tps)
        settings = settings or r
    return settings, dict(sorted(panels.items()))


def accuracy_series(paths):
    """{batch: [(model, config, tokens/s, accuracy, standard error)]} of the task rows (those with an accuracy),
    in file order; the AR rows' model is their ar_model (or "AR parent")."""
    panels = {}
    for path in paths:
        for i, r in read_jsonl(path):
            if r.get("accuracy") is None:
                continue
            name, bs = text(r, "config", path, i), number(r, "batch", path, i)
            tps, acc, n = number(r, "tokens_per_s", path, i), number(r, "accuracy", path, i), number(r, "n_prompts", path, i)
            if not 0 <= acc <= 1 or n < 1:
                raise DataError(f"{path} line {i}: accuracy {acc:g} on {n:g} prompts is not a share of prompts")
            model = (r.get("ar_model") or "AR parent") if name.startswith("ar_") else str(r.get("model_name", "?"))
            panels.setdefault(int(bs), []).append((model, name, tps, acc, binomial_se(acc, n)))
    if not panels:
        raise DataError(f"{', '.join(paths)}: no rows with an accuracy (bench_samplers.py --prompts <task> --results)")
    return dict(sorted(panels.items()))


SUITE = ("lambada", "hellaswag", "winogrande", "piqa", "siqa", "arc_easy", "arc_challenge", "triviaqa", "rocstories",
         "gsm8k", "wikitext")   # the order of eval_zeroshot.py's suite; other tasks after, in file order


def ratio_series(path):
    """(tasks [(task, metric)] in the suite's order, rows {row: {task: ratio}}, paper (label, {task: ratio}) or None) of
    the JSON lines of bench/zeroshot_table.py --jsonl; a task's metric is the first non-paper row's."""
    tasks, rows, paper, metric = [], {}, None, {}
    for i, r in read_jsonl(path):
        row, task = text(r, "row", path, i), text(r, "task", path, i)
        if "ratio" not in r:
            raise DataError(f"{path} line {i}: missing field 'ratio'")
        ratio = number(r, "ratio", path, i, optional=True)   # null: a division by zero, not drawn
        if ratio is not None and ratio < 0:
            raise DataError(f"{path} line {i}: field 'ratio' is negative ({ratio:g})")
        is_paper = row.startswith("paper:")
        if is_paper:
            if paper is not None and paper[0] != row:
                raise DataError(f"{path} line {i}: a second paper row ({row!r} after {paper[0]!r})")
            paper = paper or (row, {})
            got = paper[1]
        else:
            got = rows.setdefault(row, {})
        if task in got:
            raise DataError(f"{path} line {i}: a second line for {row} on {task}")
        if task not in metric or (not is_paper and metric[task][1]):
            if task not in metric:
                tasks.append(task)
            metric[task] = (r.get("metric") if isinstance(r.get("metric"), str) else "?", is_paper)
        if ratio is not None:
            got[task] = ratio
    if not any(rows.values()) and not (paper and paper[1]):
        raise DataError(f"{path}: no line with a ratio (bench/zeroshot_table.py --jsonl)")
    seen = list(tasks)
    tasks.sort(key=lambda t: SUITE.index(t) if t in SUITE else len(SUITE) + seen.index(t))
    return [(t, metric[t][0]) for t in tasks], rows, paper


def short(model):
    """A model's label: its run folder (out/sft/final -> out/sft)."""
    model = model.rstrip("/")
    return os.path.dirname(model) if os.path.basename(model) in ("final", "merged") else model


# -----------------------------------------------------------------------------
# drawing: each returns the Figure, so the tests can read back what was drawn

def trailing_mean(values, n):
    """values[i] replaced by the mean of values[max(0, i - n + 1)..i]: the first n - 1 are means of fewer."""
    windows = [values[max(0, i - n + 1):i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def draw_loss(paths, smooth=1):
    logs = [(p, loss_series(p)) for p in paths]
    for _, s in logs:
        for k in ("loss", "ar_loss"):
            if k in s and smooth > 1:
                s[k] = (s[k][0], trailing_mean(s[k][1], smooth))
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(set(names)) < len(names):   # two runs named alike in different places: show the path
        names = [os.path.dirname(p) or "." for p in paths]
    acc = any("eval_accuracy" in s for _, s in logs)
    fig, axes = plt.subplots(3 if acc else 2, 1, sharex=True, figsize=(8, 8.5 if acc else 6.5),
                             gridspec_kw=dict(height_ratios=[3, 1, 1.5] if acc else [3, 1]))
    for n, (name, (_, s)) in enumerate(zip(names, logs)):
        color = f"C{n % 10}"
        if "loss" in s:
            axes[0].plot(*s["loss"], color=color, lw=1, alpha=0.8, label=f"{name}: training loss")
        if "ar_loss" in s:   # train_sft.py --ar_weight: the next-token loss of the clean half, beside --ar's loss
            axes[0].plot(*s["ar_loss"], color=color, ls=":", lw=1, alpha=0.8, label=f"{name}: AR loss of the clean half")
        if "val_loss" in s:
            axes[0].plot(*s["val_loss"], color=color, ls="--", marker="o", ms=4, label=f"{name}: validation loss")
        if "lr" in s:
            axes[1].plot(*s["lr"], color=color, label=name)
        if "eval_accuracy" in s:
            axes[2].plot(*s["eval_accuracy"], color=color, marker="o", ms=4, label=name)
    axes[0].set_ylabel("loss")
    title = "Training and validation loss" if len(paths) > 1 else f"{names[0]}: training and validation loss"
    axes[0].set_title(title + (f" (training: mean of the last {smooth} steps)" if smooth > 1 else ""))
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if acc:
        axes[2].set_ylabel("eval accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def draw_lambada(path):
    refs, runs, usual = lambada_series(path)
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for n, (label, (tokens, acc, err, marked)) in enumerate(runs.items()):
        yerr = None if all(e is None for e in err) else [0 if e is None else e for e in err]
        ax.errorbar(tokens, acc, yerr=yerr, color=f"C{n % 10}", marker="o", ms=6, capsize=3, label=label,
                    ls="--" if marked else "-", mfc="none" if marked else None, alpha=0.6 if marked else 1)
    for n, (label, acc, ar, marked) in enumerate(refs):
        ax.axhline(acc, color="black" if ar else "grey", ls=":" if marked else "-" if ar else "--", lw=1.2,
                   alpha=0.6 if marked else 1, label=f"{label}: {acc:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of adaptation (log scale)")
    ax.set_ylabel("LAMBADA accuracy (greedy last word)")
    ax.set_title("LAMBADA accuracy against tokens of adaptation"
                 + (f" ({usual:,} lines unless marked)" if usual is not None else ""))
    ax.grid(alpha=0.3, which="both")
    # the lower right is empty: every adapted checkpoint scores far above the quickstart and the untrained model
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


MARKERS = "osD^vP*X<>ph"


def draw_speed(path):
    settings, panels = speed_series(path)
    configs = list(dict.fromkeys(c for p in panels.values() for c in p if c != "ar_greedy"))
    style = {c: dict(color=plt.get_cmap("tab10" if len(configs) <= 10 else "tab20")(n), marker=MARKERS[n % len(MARKERS)])
             for n, c in enumerate(configs)}
    fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False, figsize=(5 * len(panels) + 2.5, 5.5))
    for ax, (bs, points) in zip(axes[0], panels.items()):
        for name, (x, y) in points.items():
            if name == "ar_greedy":
                ax.axhline(y, color="black", ls="--", lw=1.2)
                ax.annotate(f"AR parent, greedy (ar_greedy): {y:.1f} tok/s", (0.98, y), xycoords=("axes fraction", "data"),
                            xytext=(0, 4), textcoords="offset points", ha="right", fontsize=8)
            else:   # hollow markers of different shapes: points at the same place stay visible
                ax.plot([x], [y], ls="", ms=9, mew=1.8, mfc="none", label=name, **style[name])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens per forward (1 / forwards per token)")
        ax.set_title(f"batch {bs}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("tokens/s (log scale)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=8, title="configuration")
    s = settings
    fig.suptitle(f"Sampler speed: {s.get('model_name', '?')}, {s.get('n_prompts', '?')} prompts x "
                 f"{s.get('gen_len', '?')} new tokens, {s.get('device', '?')}, {s.get('dtype', '?')}, "
                 f"{s.get('clock', '?')} clock, {s.get('threads', '?')} thread(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / fig.get_figwidth(), 1))
    return fig


AR_GREYS = ("black", "0.45", "0.7")   # the AR models' stars, one grey each


def draw_accuracy(paths):
    panels = accuracy_series(paths)
    rows = [r for p in panels.values() for r in p]
    models = list(dict.fromkeys(m for m, c, *_ in rows if not c.startswith("ar_")))
    configs = list(dict.fromkeys(c for _, c, *_ in rows if not c.startswith("ar_")))
    ar_models = list(dict.fromkeys(m for m, c, *_ in rows if c.startswith("ar_")))
    fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False, figsize=(5.5 * len(panels) + 3, 5.5))
    for ax, (bs, points) in zip(axes[0], panels.items()):
        for model, name, tps, acc, se in points:
            if name.startswith("ar_"):
                ax.errorbar([tps], [acc], yerr=[se], color=AR_GREYS[ar_models.index(model) % len(AR_GREYS)], marker="*",
                            ms=14, capsize=3, ls="",
                            label=f"{short(model)}: {name}")
            else:
                ax.errorbar([tps], [acc], yerr=[se], color=f"C{models.index(model) % 10}", capsize=2, ls="", ms=8,
                            mfc="none", mew=1.6, marker=MARKERS[configs.index(name) % len(MARKERS)],
                            label=f"{short(model)}: {name}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))   # a range within a decade has no major tick
        ax.set_xlabel("tokens/s (log scale)")
        ax.set_title(f"batch {bs}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("accuracy (± standard error)")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=7, title="model: configuration")
    fig.suptitle("Accuracy against decoding speed", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 3.2 / fig.get_figwidth(), 1))
    return fig


def draw_ratios(path):
    tasks, rows, paper = ratio_series(path)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(tasks) + 3), 5.5))
    width = 0.8 / max(1, len(rows))
    for n, (row, ratios) in enumerate(rows.items()):
        xs = [k - 0.4 + width * (n + 0.5) for k, (t, _) in enumerate(tasks) if t in ratios]
        ax.bar(xs, [ratios[t] for t, _ in tasks if t in ratios], width=width * 0.92, color=f"C{n % 10}", label=row)
    if paper and paper[1]:
        pts = [(k, paper[1][t]) for k, (t, _) in enumerate(tasks) if t in paper[1]]
        ax.plot(*zip(*pts), ls="", marker="D", ms=7, color="black", label=paper[0])
    ax.axhline(1.0, color="black", lw=1.2, label="parity (1.0)")
    ax.axhline(0.9, color="grey", ls="--", lw=1.2, label="goal mean (0.9)")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n{m}" for t, m in tasks], fontsize=8)
    ax.set_xlim(-0.6, len(tasks) - 0.4)
    ax.set_ylabel("ratio to the AR parent (perplexity: AR / diffusion)")
    ax.set_title("Zero-shot suite: diffusion / AR parent, headline metric per task")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description="PNG plots of training logs and benchmark results")
    sub = p.add_subparsers(dest="kind", required=True)
    for kind, helps in (("loss", "log.jsonl files of train_adapt.py / train_sft.py (several overlay)"),
                        ("lambada", "JSON lines: run, tokens, accuracy [, stderr, lines, ar]"),
                        ("speed", "JSON lines of bench/bench_samplers.py --results"),
                        ("accuracy", "JSON lines of bench/bench_samplers.py --prompts <task> --results (several overlay)"),
                        ("ratios", "JSON lines of bench/zeroshot_table.py --jsonl: row, task, metric, ratio")):
        q = sub.add_parser(kind, help=helps)
        q.add_argument("files", nargs="+" if kind in ("loss", "accuracy") else 1, help=helps)
        q.add_argument("--out", required=True, help="the PNG to write (its folder must exist)")
        q.add_argument("--dpi", type=int, default=120)
        if kind == "loss":
            q.add_argument("--smooth", type=int, default=1,
                           help="draw each training loss as the mean of its last N logged values (default 1: as logged)")
    args = p.parse_args(argv)
    check_output_file(args.out, lambda m: p.error(m))
    if args.kind == "loss" and args.smooth < 1:
        p.error(f"--smooth {args.smooth}: the number of steps to average must be at least 1")
    draw = dict(loss=lambda: draw_loss(args.files, args.smooth), lambada=lambda: draw_lambada(args.files[0]),
                speed=lambda: draw_speed(args.files[0]), accuracy=lambda: draw_accuracy(args.files),
                ratios=lambda: draw_ratios(args.files[0]))[args.kind]
    try:
        fig = draw()
    except DataError as e:
        print(f"plot.py {args.kind}: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""
Evaluation speed: examples per second of each kind of zero-shot task, for the diffusion model and for
the AR model on the same weights, through eval_zeroshot.py's own scoring (run_task).

    python bench/bench_eval.py                                   # embedded model, CPU, fp32
    python bench/bench_eval.py --model_name out/adapt/final --mc_num 64 --n 8 --device cuda

The examples are cut from a plain text file (default: ../shared/data/wiki_demo.txt beside the repo;
--text FILE for another) into the shapes of the real tasks, so no task data is needed:
  lambada    an 80-token passage, its last word generated (one token per step)
  multiple   hellaswag-like: a 40-token context, 4 endings of 20 tokens, scored by the ELBO (--mc_num)
  infill     rocstories-like: 4 sentences around a 12-token sentence to fill in
  generate   gsm8k-like: a 40-token question, a 64-token answer generated
The cost of a diffusion example does not depend on training. Prints a markdown table.

With --tasks the real tasks are timed instead, on the first --limit examples of each file in --data_dir:
    python bench/bench_eval.py --tasks piqa,siqa,arc_easy --data_dir ../shared/data --limit 20 --mc_num 8
"""
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_zeroshot as ez  # noqa: E402
from common import Parser, at_least  # noqa: E402
from model import DTYPES, default_device, default_dtype  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = Parser(prog="bench_eval.py", description=__doc__.strip())
p.add_argument("--model_name", default="smollm2-135m", help="run folder, model folder, hub id, or smollm2-135m")
p.add_argument("--text", default=os.path.join(ROOT, "..", "shared", "data", "wiki_demo.txt"), help="plain text to cut examples from")
p.add_argument("--tasks", default=None, help=f"time these real tasks instead (from: {', '.join(ez.TASKS)})")
p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data"), help="with --tasks: the task files")
p.add_argument("--limit", type=at_least(1), default=20, help="with --tasks: first N examples of each task")
p.add_argument("--only", default=None, choices=["diffusion", "ar"], help="time one of the two models (unset: both)")
p.add_argument("--n", type=at_least(1), default=8, help="examples per task kind")
p.add_argument("--n_multiple", type=at_least(1), default=2, help="examples of the multiple-choice kind (4 x mc_num forwards each)")
p.add_argument("--mc_num", type=at_least(1), default=64, help="ELBO draws per scored continuation")
p.add_argument("--batch_size", type=at_least(1), default=32, help="sequences per forward")
p.add_argument("--device", default=default_device(), help="cpu or cuda")
p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
args = p.parse_args()
if not args.tasks and not os.path.isfile(args.text):
    p.error(f"--text {args.text}: no such file")
dtype = args.dtype or default_dtype(args.device)


def real_tasks(names):
    """The first --limit examples of each named task, read as eval_zeroshot.py reads them."""
    kinds = []
    for task in names.split(","):
        if task not in ez.TASKS:
            p.error(f"--tasks: unknown task {task!r} (known: {', '.join(ez.TASKS)})")
        try:
            recs, src = ez.load_task_records(task, data_dir=args.data_dir)
            exs = [ez.make_example(task, r, src, i) for i, r in enumerate(recs[:args.limit], 1)]
        except ez.DataError as e:
            p.error(str(e))
        kinds.append((task, task, exs, None))
    return kinds


def shaped_tasks():
    """Examples cut from --text into the shapes of the real tasks."""
    words = open(args.text, encoding="utf-8").read().split()
    rng = random.Random(0)

    def span(n_words):
        s = rng.randrange(0, len(words) - n_words)
        return " ".join(words[s:s + n_words])

    # about 0.75 words a token for English text under BPE tokenizers
    lam = [ez.make_example("lambada", {"text": span(60)}, "bench", i) for i in range(args.n)]
    mc = [{"pairs": [(ctx, " " + span(15)) for _ in range(4)], "gold": 0} for ctx in (span(30) for _ in range(args.n_multiple))]
    infill = [{"prefix": span(30), "target": " " + span(9), "suffix": " " + span(20)} for _ in range(args.n)]
    gen = [{"context": span(30), "target": " " + span(48) + " #### 1", "answer": "1"} for _ in range(args.n)]
    return [("lambada", "lambada", lam, None), ("multiple", "hellaswag", mc, None), ("infill", "rocstories", infill, None),
            ("generate", "gsm8k", gen, 64)]


kinds = real_tasks(args.tasks) if args.tasks else shaped_tasks()
warm = [ez.make_example("lambada", {"text": "a warm up line"}, "bench", 1)]

rows = []
for ar in [m == "ar" for m in ([args.only] if args.only else ["diffusion", "ar"])]:
    scorer = ez.Scorer(args.model_name, ar=ar, mc_num=args.mc_num, batch_size=args.batch_size, device=args.device,
                       dtype=dtype)
    ez.run_task(scorer, "lambada", warm, progress=False)       # warm-up
    for kind, task, exs, gen_len in kinds:
        t0 = time.time()
        ez.run_task(scorer, task, exs, gen_len=gen_len, progress=False)
        secs = time.time() - t0
        rows.append((kind, "AR" if ar else "diffusion", len(exs), secs))

print(f"model {args.model_name}, {args.device}, {dtype}, batch_size {args.batch_size}, mc_num {args.mc_num}")
print("| task kind | model | examples | seconds | examples/s |")
print("|---|---|---|---|---|")
for kind, who, n, secs in rows:
    print(f"| {kind} | {who} | {n} | {secs:.1f} | {n / secs:.3f} |")

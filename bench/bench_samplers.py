r"""
Sampler speed and quality: tokens per second, forwards per token, generative perplexity (scored by the
AR parent with its exact likelihood) and unigram entropy of every diffusion sampler beside the AR
parent's own cached `generate`, on 20 fixed prompts from the shared corpora.

    python bench/bench_samplers.py --model_name out/adapt/final                 # all configurations, batch 1 and 8
    python bench/bench_samplers.py --model_name out/adapt/final --configs threshold0.9,threshold0.9+dual,ar_greedy
    python bench/bench_samplers.py --n_prompts 2 --gen_len 32 --batch_sizes 1    # a quick look
    python bench/bench_samplers.py --configs threshold0.5+dual,factor1.0+dual,ar_greedy   # any threshold / factor
    python bench/bench_samplers.py --configs eb0.1,eb0.5+dual,eb1+dual,threshold0.9+dual  # EB-sampler, any gamma
    python bench/bench_samplers.py --model_name out/adapt/final --results out/bench.jsonl   # again after a stop:
                                                                                            # runs only what is missing
    python bench/bench_samplers.py --configs flags,ar_greedy --sampler random --block_length 16   # the sampler flags

Quality needs an adapted model (the unadapted one's samples mean nothing; its speed does not depend on
training). Low perplexity with low entropy is repetition, not quality. Prints a markdown table.

A task (--prompts synthetic_sort, synthetic_arith, gsm8k or a .json/.jsonl file of {"instruction",
"output"} records): the first --n_prompts problems of the built-in task's test split (of --data_dir's
gsm8k_test.json, of the file) in the model's prompt template, for models
fine-tuned on the task (train_sft.py). Every sampler stops at EOS; the answers are --gen_len tokens at most
(default: the longest reference plus EOS), the diffusion samplers run one block of that length (or
--block_length blocks) with one step per token at most; tokens/s and tokens per forward count each
answer's tokens up to and including its EOS. The table adds the accuracy (common.is_correct) with its
standard error; --answers FILE.jsonl keeps every answer and whether it is right. --ar_model is the model
of the ar_* rows (the AR-SFT parent, train_sft.py --ar):

    python bench/bench_samplers.py --model_name out/sft/final --ar_model out/sft_ar/final --prompts synthetic_sort \
        --n_prompts 100 --configs ar_greedy,low_confidence,threshold0.9,threshold0.9+dual,eb1+dual
"""
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import replace

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval_zeroshot import Scorer  # noqa: E402
from common import (PROMPT, SYNTHETIC_TASKS, DataError, Parser, at_least, binomial_se, field, first_line,  # noqa: E402
                    in_template, is_correct, read_records, right_steps, synthetic)
from model import (DTYPES, SamplerSettings, add_sampler_args, build_inputs, cut_at_eos, default_device,  # noqa: E402
                   default_dtype, sample)

TASKS = (*SYNTHETIC_TASKS, "gsm8k")

# name -> (sampler, SamplerSettings fields); "ar_*" run the AR parent's generate; "flags": the sampler flags
CONFIGS = {
    "diffullama64": ("diffullama", dict(diffusion_steps=64)),
    "diffullama256": ("diffullama", dict(diffusion_steps=256)),
    "low_confidence": ("low_confidence", dict(diffusion_steps=256, block_length=32)),
    "threshold0.9": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.9)),
    "threshold0.7": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.7)),
    "threshold0.9+prefix": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.9, cache="prefix")),
    "threshold0.9+dual": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.9, cache="dual")),
    "spec": ("spec", dict()),
    "ar_greedy": ("ar", dict(do_sample=False)),
    "ar_sampled": ("ar", dict(do_sample=True, top_p=0.9, temperature=1.0)),
}


CONFIG_RE = re.compile(r"^(low_confidence|threshold|factor|eb|block)([0-9.]*)(?:\+(prefix|dual))?(?:@([0-9.]+))?$")


def config(name):
    """(sampler, keyword arguments) of a configuration: one of CONFIGS, or low_confidence / threshold<c> /
    factor<f> / eb<gamma> (the EB-sampler's entropy bound) with an optional +prefix or +dual cache and an
    optional @<temperature> (Gumbel noise; greedy without), e.g. threshold0.5+dual, factor1.0,
    threshold0.9+dual@1.0, eb0.5, eb1+dual; 32-token blocks. For block-diffusion models (train_sft.py
    --block_size): block (one token a step) or block<c> (threshold c within each block), in the model's
    blocks (or --block_length's), cached exactly by the sampler itself (no +cache); spec for those trained
    with a causal clean half (--ar_weight): self-speculative decoding, the clean half's greedy tokens."""
    if name in CONFIGS:
        return CONFIGS[name]
    m = CONFIG_RE.match(name)
    if not m or (m.group(1) == "low_confidence" and m.group(2)) or (m.group(1) in ("threshold", "factor", "eb")
                                                                   and not m.group(2)):
        return None
    if m.group(1) == "block" and m.group(3):
        return None
    try:
        value = float(m.group(2)) if m.group(2) else None
        temperature = float(m.group(4)) if m.group(4) else None
    except ValueError:
        return None
    kw = dict(diffusion_steps=256, block_length=32, cache=m.group(3) or "none")
    if temperature is not None:
        kw["temperature"] = temperature
    if m.group(1) == "block":
        return "block", {**kw, "block_length": None, "threshold": value}
    if m.group(1) == "low_confidence":
        return "low_confidence", kw
    if m.group(1) == "eb":
        return "eb", {**kw, "gamma": value}
    return "threshold", {**kw, m.group(1): value} if m.group(1) == "threshold" else {**kw, "factor": value}


def flags_name(settings):
    """The table's name of the sampler flags' settings: flags(the fields that differ from the defaults)."""
    default = SamplerSettings()
    return "flags(" + ",".join(f"{k}={v}" for k, v in vars(settings).items() if v != getattr(default, k)) + ")"


def fixed_prompts(data_dir, n, words=24):
    """n prompts, half from wiki_demo.txt paragraphs and half from c4_demo.json documents: the first
    `words` words of each of the first ones that have at least 2 * words words."""
    texts = [line for line in open(os.path.join(data_dir, "wiki_demo.txt"), encoding="utf-8")]
    docs = [d["text"] for d in json.load(open(os.path.join(data_dir, "c4_demo.json"), encoding="utf-8"))]
    pick = lambda src: [" ".join(t.split()[:words]) for t in src if len(t.split()) >= 2 * words]
    wiki, c4 = pick(texts), pick(docs)
    return [p for pair in zip(wiki, c4) for p in pair][:n]


def unigram_entropy(ids):
    """Entropy (nats) of the token frequencies of one sample."""
    counts = Counter(ids)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def gen_perplexity(ar, prompts_ids, gens):
    """exp of the mean negative log-likelihood per generated token under the AR scorer (exact), pooled
    over the samples."""
    lls = ar.loglik([(p, g) for p, g in zip(prompts_ids, gens) if g])
    n = sum(len(g) for g in gens if g)
    return math.exp(-sum(ll for ll, _ in lls) / n) if n else float("nan")


def task_prompts(task, n, data_dir, config, tok):
    """The first n problems of a task's test split (or of a file of records) as (prompts in the model's prompt
    template, references)."""
    if task in SYNTHETIC_TASKS:
        problems = synthetic(task, "test", n)
    else:
        path = os.path.join(data_dir, "gsm8k_test.json") if task == "gsm8k" else task
        if not os.path.isfile(path):
            raise ValueError(f"--data_dir {data_dir}: no gsm8k_test.json")
        try:
            problems = read_records(path)[:n]
            problems = [{"instruction": str(field(r, "instruction", path=path, i=i)),
                         "output": str(field(r, "output", path=path, i=i))} for i, r in enumerate(problems, 1)]
        except DataError as e:
            raise ValueError(f"--prompts {e}") from None
    template = getattr(config, "prompt_template", None) or PROMPT
    return [in_template(template, tok, r["instruction"]) for r in problems], [r["output"] for r in problems]


def answer_length(ids, eos):
    """The generated tokens of an answer: up to and including its first EOS (all of them without one)."""
    return ids.index(eos) + 1 if eos in ids else len(ids)


def count_forwards(module):
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *a, **k: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def main(argv=None):
    p = Parser(prog="bench_samplers.py", description=__doc__.strip())
    p.add_argument("--model_name", default="smollm2-135m", help="run folder, model folder, hub id, or smollm2-135m")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data"), help="holds wiki_demo.txt and c4_demo.json")
    p.add_argument("--n_prompts", type=at_least(1), default=20, help="prompts per configuration")
    p.add_argument("--prompts", default="corpus",
                   help="corpus: wiki/C4 openings; a task (synthetic_sort, synthetic_arith, gsm8k) or a .json/.jsonl "
                        "file of {instruction, output} records: its problems, answers up to EOS (adds accuracy)")
    p.add_argument("--ar_model", default=None, help="the model of the ar_* configurations and the perplexity "
                   "(default: the AR parent of --model_name); e.g. a train_sft.py --ar run")
    p.add_argument("--gen_len", type=at_least(1), default=None,
                   help="new tokens per prompt (default 256; for a task the longest reference plus EOS)")
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations (see config(); "
                   "`flags`: the sampler flags below)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the samplers")
    p.add_argument("--device", default=default_device(), help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: time by this process's CPU time (time.process_time), for a machine shared with other "
                        "jobs; with one thread it equals the wall time of an idle machine")
    p.add_argument("--results", default=None,
                   help="FILE.jsonl: append each finished row; rows already there for the same model, prompts, "
                        "lengths, block length, seed, device, dtype, clock and threads are not run again "
                        "(a long table in several runs)")
    p.add_argument("--answers", default=None,
                   help="FILE.jsonl (task prompts): append each finished row's answers and whether each is right, "
                        "one line per configuration and batch size")
    add_sampler_args(p)
    args = p.parse_args(argv)
    try:
        flags = SamplerSettings.from_args(args)
    except ValueError as e:
        p.error(str(e))
    if args.prompts not in ("corpus", *TASKS) and not os.path.isfile(args.prompts):
        p.error(f"--prompts {args.prompts}: not corpus, {', '.join(TASKS)} or a file of records")
    for flag in ("results", "answers"):
        path = getattr(args, flag)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"--{flag} {path}: its folder does not exist")
    if args.answers and args.prompts == "corpus":
        p.error("--answers: only with task prompts (--prompts synthetic_*, gsm8k or a file), which have references")
    for f in ("wiki_demo.txt", "c4_demo.json") if args.prompts == "corpus" else ():
        if not os.path.isfile(os.path.join(args.data_dir, f)):
            p.error(f"--data_dir {args.data_dir}: no {f}")
    names = [flags_name(flags) if c == "flags" else c for c in args.configs.split(",") if c]
    bad = [c for c in names if config(c) is None and c != flags_name(flags)]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)} (known: {', '.join(CONFIGS)}, or low_confidence / "
                f"threshold<c> / factor<f> / eb<gamma> with +prefix or +dual and @<temperature>, block / block<c>)")
    dtype = args.dtype or default_dtype(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    task = args.prompts != "corpus"
    try:
        dlm = Scorer(args.model_name, device=args.device, dtype=dtype)
        ar = Scorer(args.ar_model or args.model_name, ar=True, device=args.device, dtype=dtype)
        tok, model = dlm.tokenizer, dlm.model
        if task:
            prompts, refs = task_prompts(args.prompts, args.n_prompts, args.data_dir, model.config, tok)
        else:
            prompts, refs = fixed_prompts(args.data_dir, args.n_prompts), None
    except (OSError, ValueError) as e:
        p.error(first_line(e))
    prompt_ids = [dlm.encode_pair(q, "")[0] for q in prompts]
    eos = tok.eos_token_id
    gen_len = args.gen_len or (max(len(tok.encode(" " + r, add_special_tokens=False)) for r in refs) + 1 if task else 256)
    setting = dict(model_name=args.model_name, ar_model=args.ar_model, prompts=args.prompts, n_prompts=len(prompts),
                   gen_len=gen_len, block_length=args.block_length, seed=args.seed, device=args.device,
                   dtype=str(dtype), clock=args.clock, threads=torch.get_num_threads())
    done = read_results(args.results, setting, p.error) if args.results else {}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if any((name, bs) not in done for bs in batch_sizes for name in names):
        with torch.no_grad():   # warm-up outside the clock (kernel selection, CUDA context, allocator)
            sample(model, build_inputs(tok, prompts[:1], 8, mask_token_id=model.mask_token_id),
                   SamplerSettings("low_confidence", diffusion_steps=8))
            ids, att = ar._pad(prompt_ids[:1])
            ar.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=8, do_sample=False, pad_token_id=ar.pad)
    rows = []
    for bs in batch_sizes:
        for name in names:
            if (name, bs) in done:
                rows.append(done[name, bs])
                print(table_row(*rows[-1], n=len(prompts)) + " (from --results)", file=sys.stderr, flush=True)
                continue
            kind, kw = ("flags", None) if name == flags_name(flags) else config(name)
            settings = flags if kind == "flags" else None if kind == "ar" else SamplerSettings(kind, **kw)
            if task and kind not in ("ar", "flags"):   # at most one step a token, in one block of the answer's length
                settings = replace(settings, diffusion_steps=gen_len, block_length=args.block_length, stop_at_eos=True)
            elif task and kind == "flags":
                settings = replace(settings, stop_at_eos=True)
            if task and kind == "ar":
                kw = {**kw, "eos_token_id": eos}
            target = (ar.model if kind == "ar" else model.model).get_decoder()
            calls, handle = count_forwards(target)
            gens, secs, row_forwards = [], 0.0, 0
            g = torch.Generator(args.device).manual_seed(args.seed)
            torch.manual_seed(args.seed)
            for s in tqdm(range(0, len(prompts), bs), desc=f"{name} @ batch {bs}", unit="batch", leave=False):
                chunk = prompts[s:s + bs]
                t0, before = clock(), calls[0]
                if kind == "ar":
                    ids, att = ar._pad(prompt_ids[s:s + bs])
                    with torch.no_grad():
                        out = ar.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=gen_len,
                                                min_new_tokens=None if task else gen_len, pad_token_id=ar.pad, **kw)
                    gens += out[:, ids.shape[1]:].tolist()
                else:
                    batch = build_inputs(tok, chunk, gen_len, mask_token_id=model.mask_token_id)
                    out = sample(model, batch, settings, generator=g).cpu()
                    gen = ~batch["src_mask"] & batch["attention_mask"].bool()
                    gens += [out[b][gen[b]].tolist() for b in range(len(chunk))]
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                secs += clock() - t0
                row_forwards += (calls[0] - before) * len(chunk)
            handle.remove()
            if task:   # the answers' own tokens: up to EOS (AR pads after it, the samplers fill the rest with it)
                gens = [g[:answer_length(g, eos)] for g in gens]
            n_tok = sum(map(len, gens))
            # forwards per token of one row: each forward of a batch serves each of its rows
            texts, right = judge(tok, gens, refs) if task else (None, None)
            rows.append((name, bs, n_tok / secs, row_forwards / max(n_tok, 1),
                         gen_perplexity(ar, prompt_ids, gens), sum(map(unigram_entropy, gens)) / len(gens),
                         None if right is None else sum(right) / len(right)))
            print(table_row(*rows[-1], n=len(prompts)), file=sys.stderr, flush=True)   # each row as it is done: a long run cut short keeps them
            if args.results:
                with open(args.results, "a", encoding="utf-8") as f:
                    f.write(json.dumps({**setting, **dict(zip(RESULT_FIELDS, rows[-1]))}) + "\n")
            if args.answers:
                with open(args.answers, "a", encoding="utf-8") as f:
                    steps = [right_steps(t) for t in texts]
                    f.write(json.dumps({**setting, "config": name, "batch": bs, "answers": texts, "correct": right,
                                        "right_steps": [sum(r for r, _ in steps), sum(n for _, n in steps)]}) + "\n")
    print(f"\n{args.model_name}" + (f" (ar_*: {args.ar_model})" if args.ar_model else "") +
          f", {len(prompts)} prompts ({args.prompts}), {gen_len} new tokens at most, {args.device} "
          f"({torch.get_num_threads()} threads), {dtype}, {args.clock} clock\n")
    acc = "" if refs is None else " accuracy ± SE |"
    print("| configuration | batch | tokens/s | tokens per forward | gen. perplexity (AR) | unigram entropy (nats) |" + acc)
    print("|---|---|---|---|---|---|" + ("---|" if acc else ""))
    for row in rows:
        print(table_row(*row, n=len(prompts)))
    return rows


RESULT_FIELDS = ("config", "batch", "tokens_per_s", "forwards_per_token", "perplexity", "entropy", "accuracy")


def read_results(path, setting, error):
    """{(config, batch): row} of the --results lines made with `setting` (none if the file does not exist yet)."""
    if not os.path.exists(path):
        return {}
    done = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                row = tuple(r[k] for k in RESULT_FIELDS)
            except (ValueError, KeyError, TypeError) as e:
                error(f"--results {path}, line {i}: not a result row ({first_line(e)})")
            if all(r.get(k) == v for k, v in setting.items()):
                done[row[0], row[1]] = row
    return done


def table_row(name, bs, tps, fpt, ppl, ent, right, n=None):
    """A markdown row; the accuracy's standard error sqrt(p (1 - p) / n) when n is given."""
    se = "" if n is None or right is None else f" ± {binomial_se(right, n):.3f}"
    return (f"| {name} | {bs} | {tps:.2f} | {1 / fpt if fpt else float('inf'):.2f} | {ppl:.1f} | {ent:.2f} |"
            + ("" if right is None else f" {right:.3f}{se} |"))


def judge(tok, gens, refs):
    """The generations (token ids, cut at EOS) as text, and whether each answer is right (common.is_correct)."""
    eos = tok.eos_token_id
    texts = [tok.decode(cut_at_eos(g, eos), skip_special_tokens=True) for g in gens]
    return texts, [is_correct(t, r) for t, r in zip(texts, refs)]


if __name__ == "__main__":
    main()

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

--prompts synthetic_arith: the first --n_prompts problems of train_sft.py's synthetic_arith test split
as prompts ("Question: ...\nAnswer:"), for a model fine-tuned on them; the table adds the accuracy of
the answers (the number after '####', text up to EOS). Predictable answers are where parallel decoding
commits several tokens a step:

    python bench/bench_samplers.py --model_name out/sft/final --prompts synthetic_arith --gen_len 35 \
        --batch_sizes 1 --configs low_confidence,threshold0.9,threshold0.7,threshold0.5
"""
import json
import math
import os
import re
import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval_zeroshot import Scorer  # noqa: E402
from common import Parser, at_least, first_line, is_correct  # noqa: E402
from model import (DTYPES, SamplerSettings, add_sampler_args, build_inputs, cut_at_eos, default_device,  # noqa: E402
                   default_dtype, sample)

# name -> (sampler, SamplerSettings fields); "ar_*" run the AR parent's generate; "flags": the sampler flags
CONFIGS = {
    "diffullama64": ("diffullama", dict(diffusion_steps=64)),
    "diffullama256": ("diffullama", dict(diffusion_steps=256)),
    "low_confidence": ("low_confidence", dict(diffusion_steps=256, block_length=32)),
    "threshold0.9": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.9)),
    "threshold0.7": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.7)),
    "threshold0.9+prefix": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.9, cache="prefix")),
    "threshold0.9+dual": ("threshold", dict(diffusion_steps=256, block_length=32, threshold=0.9, cache="dual")),
    "ar_greedy": ("ar", dict(do_sample=False)),
    "ar_sampled": ("ar", dict(do_sample=True, top_p=0.9, temperature=1.0)),
}


CONFIG_RE = re.compile(r"^(low_confidence|threshold|factor|eb)([0-9.]*)(?:\+(prefix|dual))?(?:@([0-9.]+))?$")


def config(name):
    """(sampler, keyword arguments) of a configuration: one of CONFIGS, or low_confidence / threshold<c> /
    factor<f> / eb<gamma> (the EB-sampler's entropy bound) with an optional +prefix or +dual cache and an
    optional @<temperature> (Gumbel noise; greedy without), e.g. threshold0.5+dual, factor1.0,
    threshold0.9+dual@1.0, eb0.5, eb1+dual; 32-token blocks."""
    if name in CONFIGS:
        return CONFIGS[name]
    m = CONFIG_RE.match(name)
    if not m or (m.group(1) == "low_confidence") == bool(m.group(2)):
        return None
    try:
        value = float(m.group(2)) if m.group(2) else None
        temperature = float(m.group(4)) if m.group(4) else None
    except ValueError:
        return None
    kw = dict(diffusion_steps=256, block_length=32, cache=m.group(3) or "none")
    if temperature is not None:
        kw["temperature"] = temperature
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


def count_forwards(module):
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *a, **k: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def main(argv=None):
    p = Parser(prog="bench_samplers.py", description=__doc__.strip())
    p.add_argument("--model_name", default="smollm2-135m", help="run folder, model folder, hub id, or smollm2-135m")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data"), help="holds wiki_demo.txt and c4_demo.json")
    p.add_argument("--n_prompts", type=at_least(1), default=20, help="prompts per configuration")
    p.add_argument("--prompts", default="corpus", choices=["corpus", "synthetic_arith"],
                   help="corpus: wiki/C4 openings; synthetic_arith: train_sft.py's test problems (adds accuracy)")
    p.add_argument("--gen_len", type=at_least(1), default=256, help="new tokens per prompt")
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
                        "lengths, seed, device, dtype, clock and threads are not run again (a long table in several runs)")
    add_sampler_args(p)
    args = p.parse_args(argv)
    try:
        flags = SamplerSettings.from_args(args)
    except ValueError as e:
        p.error(str(e))
    if args.results and not os.path.isdir(os.path.dirname(os.path.abspath(args.results))):
        p.error(f"--results {args.results}: its folder does not exist")
    for f in ("wiki_demo.txt", "c4_demo.json") if args.prompts == "corpus" else ():
        if not os.path.isfile(os.path.join(args.data_dir, f)):
            p.error(f"--data_dir {args.data_dir}: no {f}")
    names = [flags_name(flags) if c == "flags" else c for c in args.configs.split(",") if c]
    bad = [c for c in names if config(c) is None and c != flags_name(flags)]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)} (known: {', '.join(CONFIGS)}, or low_confidence / "
                f"threshold<c> / factor<f> / eb<gamma> with +prefix or +dual and @<temperature>)")
    dtype = args.dtype or default_dtype(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dlm = Scorer(args.model_name, device=args.device, dtype=dtype)
    ar = Scorer(args.model_name, ar=True, device=args.device, dtype=dtype)
    tok, model = dlm.tokenizer, dlm.model
    refs = None
    if args.prompts == "synthetic_arith":
        import train_sft
        problems = train_sft.synthetic_arith("test", args.n_prompts)
        prompts = [train_sft.PROMPT.format(r["instruction"]) for r in problems]
        refs = [r["output"] for r in problems]
    else:
        prompts = fixed_prompts(args.data_dir, args.n_prompts)
    prompt_ids = [dlm.encode_pair(q, "")[0] for q in prompts]
    setting = dict(model_name=args.model_name, prompts=args.prompts, n_prompts=len(prompts), gen_len=args.gen_len,
                   seed=args.seed, device=args.device, dtype=str(dtype), clock=args.clock, threads=torch.get_num_threads())
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
                print(table_row(*rows[-1]) + " (from --results)", file=sys.stderr, flush=True)
                continue
            kind, kw = ("flags", None) if name == flags_name(flags) else config(name)
            settings = flags if kind == "flags" else None if kind == "ar" else SamplerSettings(kind, **kw)
            target = (ar.model if kind == "ar" else model.model).get_decoder()
            calls, handle = count_forwards(target)
            gens, secs = [], 0.0
            g = torch.Generator(args.device).manual_seed(args.seed)
            torch.manual_seed(args.seed)
            for s in tqdm(range(0, len(prompts), bs), desc=f"{name} @ batch {bs}", unit="batch", leave=False):
                chunk = prompts[s:s + bs]
                t0 = clock()
                if kind == "ar":
                    ids, att = ar._pad(prompt_ids[s:s + bs])
                    with torch.no_grad():
                        out = ar.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.gen_len,
                                                min_new_tokens=args.gen_len, pad_token_id=ar.pad, **kw)
                    gens += out[:, ids.shape[1]:].tolist()
                else:
                    batch = build_inputs(tok, chunk, args.gen_len, mask_token_id=model.mask_token_id)
                    out = sample(model, batch, settings, generator=g).cpu()
                    gen = ~batch["src_mask"] & batch["attention_mask"].bool()
                    gens += [out[b][gen[b]].tolist() for b in range(len(chunk))]
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                secs += clock() - t0
            handle.remove()
            n_tok = args.gen_len * len(prompts)
            n_batches = math.ceil(len(prompts) / bs)
            rows.append((name, bs, n_tok / secs, calls[0] / (n_batches * args.gen_len),
                         gen_perplexity(ar, prompt_ids, gens), sum(map(unigram_entropy, gens)) / len(gens),
                         None if refs is None else accuracy(tok, gens, refs)))
            print(table_row(*rows[-1]), file=sys.stderr, flush=True)   # each row as it is done: a long run cut short keeps them
            if args.results:
                with open(args.results, "a", encoding="utf-8") as f:
                    f.write(json.dumps({**setting, **dict(zip(RESULT_FIELDS, rows[-1]))}) + "\n")
    print(f"\n{args.model_name}, {len(prompts)} prompts, {args.gen_len} new tokens, {args.device} "
          f"({torch.get_num_threads()} threads), {dtype}, {args.clock} clock\n")
    acc = "" if refs is None else " accuracy |"
    print("| configuration | batch | tokens/s | forwards per token | gen. perplexity (AR parent) | unigram entropy (nats) |" + acc)
    print("|---|---|---|---|---|---|" + ("---|" if acc else ""))
    for row in rows:
        print(table_row(*row))
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


def table_row(name, bs, tps, fpt, ppl, ent, right):
    return f"| {name} | {bs} | {tps:.2f} | {fpt:.3f} | {ppl:.1f} | {ent:.2f} |" + ("" if right is None else f" {right:.3f} |")


def accuracy(tok, gens, refs):
    """The share of generations (token ids, cut at EOS) whose answer is right (common.is_correct)."""
    eos = tok.eos_token_id
    texts = [tok.decode(cut_at_eos(g, eos), skip_special_tokens=True) for g in gens]
    return sum(is_correct(t, r) for t, r in zip(texts, refs)) / len(refs)


if __name__ == "__main__":
    main()

r"""
Zero-shot evaluation of a diffusion LM beside its AR parent, on the DiffuGPT/DiffuLLaMA suite
(LAMBADA, HellaSwag, Winogrande, PIQA, SIQA, ROCStories, TriviaQA, GSM8K), ARC-Easy/Challenge and
WikiText perplexity, from local files.

    python eval_zeroshot.py --model_name out/adapt --tasks lambada --data_path ../shared/data/lambada_test.txt
    python eval_zeroshot.py --model_name out/adapt --tasks lambada --data_path ../shared/data/lambada_test.txt --ar
    python eval_zeroshot.py --model_name out/adapt --tasks lambada,gsm8k --data_dir ../shared/data --limit 100
    python eval_zeroshot.py --model_name out/sft --tasks gsm8k --data_dir ../shared/data --sampler threshold \
        --block_length 32 --cache dual                                # any sampler and cache for the generative tasks
    python eval_zeroshot.py --model_name M --tasks hellaswag,piqa --data_dir data/ --mc_num 64 --output results.json
    python eval_zeroshot.py --model_name M --tasks wikitext --data_dir ../shared/data --ppl_window 1024 --ppl_stride 512
    python eval_zeroshot.py --model_name M --lm_eval_tasks my_task --lm_eval_include tasks/     # through lm-eval

--model_name takes what sample.py takes: a run folder (its `final` checkpoint, else the newest), a model
folder, a hub id or `smollm2-135m`.

--ar scores the same examples with the AR model the checkpoint was adapted from (recorded in its
config as `adapted_from`, or in the run's args.json), or with --model_name itself when that is a
causal LM: exact log-likelihoods and greedy decoding, the paper's AR row.
From Python, the lm-eval model "dlm" is registered on import:
    import eval_zeroshot, lm_eval
    lm_eval.simple_evaluate(model="dlm", model_args="model_name=out/adapt,mc_num=64,sampler=threshold", tasks=[...])
"""
import json
import os
import re
import sys
import time
import zlib
from collections import Counter
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attention_patch import resolve_attn_implementation
from common import (DataError, Parser, at_least, check_output_file, field, first_line, gsm8k_number, mean_stderr,
                    normalize_answer, perplexities, read_records)
from model import (DTYPES, ELBO_METHODS, DiscreteDiffusionModel, SamplerSettings, add_sampler_args, ar_parent, cache_keyword,
                   cpu_thread_hint, cut_at_eos, default_device, default_dtype, elbo_draws, hub_failure, layout_rows,
                   load_tokenizer, max_positions, pad_token_id, positions_from_mask, resolve_model_path, sample,
                   start_token_id)

PROG = "eval_zeroshot.py"
# the evaluation's sampler: greedy low_confidence, one token per step (the flags' defaults here, and the Scorer's)
EVAL_SAMPLER = dict(sampler="low_confidence", diffusion_steps=None)
TASKS = ("lambada", "hellaswag", "winogrande", "piqa", "siqa", "arc_easy", "arc_challenge", "rocstories", "triviaqa",
         "gsm8k", "wikitext")
MC_TASKS = ("hellaswag", "winogrande", "piqa", "siqa", "arc_easy", "arc_challenge")   # scored choices
# --data_dir DIR reads DIR/<name>.<ext>, the first name and extension found
DATA_FILES = {t: [t] for t in TASKS} | {"lambada": ["lambada", "lambada_test"], "gsm8k": ["gsm8k", "gsm8k_test"],
                                        "wikitext": ["wikitext", "wikitext2_test", "wikitext_test"]}
# wikitext: windows of at most this many tokens (capped at the model's positions), each scoring
# --ppl_stride new tokens (default window - 1: disjoint windows, each token after 1 to window - 1 others)
PPL_WINDOW = 1024
# a forward holds at most --batch_size sequences and this many token positions: long windows go a few
# at a time, so the logits ([positions, vocabulary] floats) stay in memory
FORWARD_TOKENS = 4096
EXTENSIONS = (".jsonl", ".json", ".csv", ".txt")
# the usual public copy of each task (datasets.load_dataset), used with --download
HF_SOURCES = {"lambada": ("EleutherAI/lambada_openai", "default", "test"),
              "hellaswag": ("Rowan/hellaswag", None, "validation"),
              "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
              "piqa": ("ybisk/piqa", None, "validation"), "siqa": ("allenai/social_i_qa", None, "validation"),
              "triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext", "validation"),
              "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"), "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
              "gsm8k": ("openai/gsm8k", "main", "test"),
              "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")}


# -----------------------------------------------------------------------------
# reading task files: JSON (a list, or {"data": [...]}), JSONL, CSV (header row) or TXT (one record a line)

def find_data_file(task, data_dir):
    for name in DATA_FILES[task]:
        for ext in EXTENSIONS:
            if os.path.isfile(os.path.join(data_dir, name + ext)):
                return os.path.join(data_dir, name + ext)
    return None


def wikitext_articles(text):
    """WikiText raw text -> one {"page": article} per top-level heading line (" = Title = "), as in
    the document-level copy lm-eval reads; text before the first heading is an article of its own."""
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = *$", text, flags=re.M)]
    cuts = ([0] if not starts or text[:starts[0]].strip() else []) + starts + [len(text)]
    pages = [text[a:b].strip("\n") for a, b in zip(cuts, cuts[1:])]
    return [{"page": p} for p in pages if p.strip()]


def read_task_file(task, path):
    if task == "wikitext" and path.endswith(".txt"):   # the whole text, cut into articles (not one record a line)
        with open(path, encoding="utf-8") as f:
            return wikitext_articles(f.read())
    return read_records(path)


def load_task_records(task, data_path=None, data_dir=None, download=False):
    if data_path:
        return read_task_file(task, data_path), data_path
    path = find_data_file(task, data_dir) if data_dir else None
    if path:
        return read_task_file(task, path), path
    wanted = " or ".join(f"{n}{{{','.join(EXTENSIONS)}}}" for n in DATA_FILES[task])
    where = f"--data_dir {data_dir} has no {wanted}" if data_dir else f"no data for task {task}"
    if not download or task not in HF_SOURCES:
        raise DataError(f"{where}: pass --data_path FILE (one task) or --data_dir DIR holding {wanted}"
                        + (" (or --download to fetch the public copy with the datasets package)" if task in HF_SOURCES else ""))
    try:
        import datasets
        name, config, split = HF_SOURCES[task]
        return [dict(r) for r in datasets.load_dataset(name, config, split=split)], f"hf:{name}"
    except Exception as e:  # no package, no network, or no such copy
        raise DataError(f"{where}, and --download failed ({type(e).__name__}: {first_line(e)[:200]}): "
                        f"pass --data_path FILE or --data_dir DIR holding {wanted}")


# -----------------------------------------------------------------------------
# tasks: a raw record -> an example. Every scored string starts with a space where it follows a word,
# as in the tasks' usual lm-eval prompts; field names are those of the public releases.

def hellaswag_clean(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


ARC_LETTERS, ARC_DIGITS = "ABCDE", "12345"


def arc_gold(key, labels, path, i):
    """The index of answerKey among the choice labels; a key and labels written one as letters A-E,
    the other as digits 1-5 (some ARC questions number their choices) are matched by position."""
    key, labels = str(key).strip(), [str(lab).strip() for lab in labels]
    for a, b in ((ARC_DIGITS, ARC_LETTERS), (ARC_LETTERS, ARC_DIGITS)):
        if key not in labels and key in a and len(key) == 1:
            key = b[a.index(key)]
    if key not in labels:
        raise DataError(f"{path} record {i}: answerKey {key!r} is none of the choice labels {labels}")
    return labels.index(key)


def make_example(task, r, path, i, infill_sentence=4):
    f = lambda *names: field(r, *names, path=path, i=i)
    if task == "lambada":
        text = str(f("text")).strip()
        if " " not in text:
            raise DataError(f"{path} record {i}: a LAMBADA passage needs at least two words")
        ctx, word = text.rsplit(" ", 1)
        return {"context": ctx, "target": " " + word, "word": word}
    if task in MC_TASKS:
        if task == "hellaswag":
            ctx = hellaswag_clean(f("activity_label") + ": " + f("ctx_a") + " " + str(f("ctx_b")).capitalize())
            endings = f("endings")
            endings = json.loads(endings) if isinstance(endings, str) else endings
            pairs = [(ctx, " " + hellaswag_clean(e)) for e in endings]
            gold = int(f("label"))
        elif task == "piqa":
            ctx = f"Question: {f('goal')}\nAnswer:"
            pairs = [(ctx, " " + f("sol1")), (ctx, " " + f("sol2"))]
            gold = int(f("label"))
        elif task == "siqa":
            ctx = f"Question: {f('context')} {f('question')}\nAnswer:"
            pairs = [(ctx, " " + f(k)) for k in ("answerA", "answerB", "answerC")]
            gold = int(f("label")) - 1
        elif task in ("arc_easy", "arc_challenge"):
            choices = f("choices")
            choices = json.loads(choices) if isinstance(choices, str) else choices
            if not isinstance(choices, dict):
                raise DataError(f"{path} record {i}: 'choices' must be {{\"text\": [...], \"label\": [...]}}")
            texts, labels = field(choices, "text", path=path, i=i), field(choices, "label", path=path, i=i)
            if len(texts) != len(labels):
                raise DataError(f"{path} record {i}: {len(texts)} choice texts but {len(labels)} labels")
            ctx = f"Question: {f('question')}\nAnswer:"
            pairs = [(ctx, " " + t) for t in texts]
            gold = arc_gold(f("answerKey"), labels, path, i)
        else:  # winogrande: the option fills the blank; the rest of the sentence is scored (partial scoring)
            sentence = f("sentence")
            if "_" not in sentence:
                raise DataError(f"{path} record {i}: a Winogrande sentence needs a '_' blank")
            idx = sentence.index("_")
            rest = " " + sentence[idx + 1:].strip()
            pairs = [(sentence[:idx] + f("option1"), rest), (sentence[:idx] + f("option2"), rest)]
            gold = int(f("answer")) - 1
        if not 0 <= gold < len(pairs):
            raise DataError(f"{path} record {i}: answer index {gold} outside the {len(pairs)} choices")
        return {"pairs": pairs, "gold": gold}
    if task == "rocstories":
        if "sentence1" in r or "InputSentence1" in r:
            if "sentence5" in r:
                sents = [f(f"sentence{k}") for k in range(1, 6)]
            else:  # the Story Cloze release: four sentences and the right one of two endings
                ending = f("RandomFifthSentenceQuiz1") if str(f("AnswerRightEnding")) == "1" else f("RandomFifthSentenceQuiz2")
                sents = [f(f"InputSentence{k}") for k in range(1, 5)] + [ending]
        else:
            sents = f("sentences")
        k = infill_sentence - 1
        if not 0 <= k < len(sents):
            raise DataError(f"--infill_sentence {infill_sentence}: {path} record {i} has {len(sents)} sentences")
        return {"prefix": " ".join(sents[:k]), "target": (" " if k else "") + sents[k],
                "suffix": (" " + " ".join(sents[k + 1:])) if k + 1 < len(sents) else ""}
    if task == "triviaqa":
        ans = f("answer", "answers")
        if isinstance(ans, dict):
            ans = [ans["value"]] + list(ans.get("aliases", []))
        ans = [ans] if isinstance(ans, str) else list(ans)
        return {"context": f"Question: {f('question')}?\nAnswer:", "answers": ans}
    if task == "wikitext":
        text = str(f("page", "text"))
        return {"text": text, "words": len(text.split()), "bytes": len(text.encode("utf-8"))}
    if task == "gsm8k":
        out = str(f("output", "answer"))
        gold = gsm8k_number(out)
        if gold is None:
            raise DataError(f"{path} record {i}: the answer has no '#### <number>'")
        return {"context": f"Question: {f('instruction', 'question')}\nAnswer:", "target": " " + out, "answer": gold}
    raise DataError(f"--tasks: unknown task {task!r} (known: {', '.join(TASKS)})")


# -----------------------------------------------------------------------------
# perplexity windows

def rolling_windows(ids, start, window, stride):
    """Cut a text's token ids into (context, targets) pairs that score every token once: the first pair
    is [start] and the first window - 1 tokens; each next one scores the next `stride` tokens after
    the window - stride tokens before them (the last one: as many as fill the window). No pair is
    longer than `window`; stride window - 1 gives lm-eval's rolling windows."""
    x, out, p = [start] + list(ids), [], 0
    while p < len(ids):
        n = min(window - 1 if p == 0 else stride, len(ids) - p)
        out.append((x[max(0, p + 1 - (window - n)):p + 1], x[p + 1:p + 1 + n]))
        p += n
    return out


# -----------------------------------------------------------------------------
# metrics

def rouge_tokens(text):
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_n(pred, ref, n):
    """ROUGE-N F1 on lower-cased alphanumeric tokens (no stemming)."""
    grams = lambda t: Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1))
    p, r = grams(rouge_tokens(pred)), grams(rouge_tokens(ref))
    hit = sum((p & r).values())
    if not hit:
        return 0.0
    prec, rec = hit / sum(p.values()), hit / sum(r.values())
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred, ref):
    """ROUGE-L F1: longest common subsequence of tokens."""
    a, b = rouge_tokens(pred), rouge_tokens(ref)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    prec, rec = lcs / len(a), lcs / len(b)
    return 2 * prec * rec / (prec + rec)


# -----------------------------------------------------------------------------
# the scorer: one model, diffusion (ELBO, the samplers) or AR (exact log-likelihood, greedy decoding)

class Scorer:
    """Scores (context, continuation) pairs and generates spans, with a diffusion LM or a causal LM (ar=True),
    from identical token ids. Every ELBO row draws its noise from a generator seeded by --seed and the
    row's tokens, so a score does not depend on the batch or the order it came in; so does every row the
    samplers fill. `settings`: the sampler (a SamplerSettings; default EVAL_SAMPLER)."""

    def __init__(self, model_name, ar=False, mc_num=64, method="stratified", batch_size=32, seed=0, dtype=None,
                 device=None, settings=None, mask_token_id=None, base_model_name=None, adapter_path=None,
                 attn_implementation="sdpa"):
        self.device = device or default_device()
        dtype = dtype or default_dtype(self.device)
        self.ar, self.mc_num, self.method, self.batch_size, self.seed = ar, mc_num, method, batch_size, seed
        self.settings = settings or SamplerSettings(**EVAL_SAMPLER)
        if ar:
            from transformers import AutoConfig, AutoModelForCausalLM
            if adapter_path:
                raise DataError("--adapter_path belongs to the diffusion model; --ar scores its AR parent without it")
            self.model_name = ar_parent(model_name, base_model_name)
            path = resolve_model_path(self.model_name)
            try:
                config = AutoConfig.from_pretrained(path)
            except OSError as e:
                raise hub_failure(self.model_name, e) from None
            if getattr(config, "is_causal", True) is False:
                raise DataError(f"--ar: {self.model_name} is a diffusion checkpoint that names no AR parent "
                                f"(no adapted_from in its config): give the AR model as --model_name")
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], attn_implementation=resolve_attn_implementation(attn_implementation, self.device))
            self.tokenizer = load_tokenizer(path)
        else:
            self.model_name = model_name
            self.model = DiscreteDiffusionModel.from_pretrained(
                model_name, mask_token_id=mask_token_id, base_model_name=base_model_name, adapter_path=adapter_path,
                dtype=dtype, attn_implementation=attn_implementation, device=self.device)
            self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise DataError(f"--model_name {model_name}: no tokenizer found (give --base_model_name for DiffuGPT checkpoints)")
        self.model.to(self.device).eval()
        self.max_len = max_positions(self.model.config)
        self.start, self.pad = start_token_id(self.tokenizer), pad_token_id(self.tokenizer)

    # -- tokens ----------------------------------------------------------------------------------------
    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_pair(self, context, continuation):
        """[start] + context ids, continuation ids: split where the whole text's tokens leave the context's,
        trailing spaces of the context moved to the continuation (lm-eval's rule)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.encode(context) if context else []
        whole = self.encode(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.encode(continuation)
        return [self.start] + ctx, cont

    def check_length(self, n, what):
        if self.max_len is not None and n > self.max_len:
            raise DataError(f"{what}: {n} tokens, more than the model's maximum of {self.max_len} positions")

    def generator(self, ids, n_target, device="cpu"):
        crc = zlib.crc32(torch.tensor(list(ids) + [n_target], dtype=torch.int64).numpy().tobytes())
        return torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + crc) % (2 ** 63))

    def _pad(self, seqs):
        """Left-padded ids and attention mask on the model's device."""
        batch = layout_rows([(q, 0, []) for q in seqs], self.pad, self.pad)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    # -- likelihood ------------------------------------------------------------------------------------
    @torch.no_grad()
    def loglik(self, pairs, greedy=False, progress=None):
        """log p(continuation | context) for each (context_ids, continuation_ids): exact for AR, the ELBO
        estimate for diffusion. With greedy=True also whether greedy decoding gives the continuation.
        Returns a list of (loglik, is_greedy or None)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        seqs = [c + t for c, t in pairs]
        for i, q in enumerate(seqs):
            self.check_length(len(q), f"example {i}")
        if not self.ar:
            ll = self.elbo(seqs, [len(t) for _, t in pairs], progress)
            gr = [None] * len(pairs)
            for s in range(0, len(order) if greedy else 0, self.batch_size):
                idx = order[s:s + self.batch_size]
                ids, att = self._pad([seqs[i] for i in idx])
                tm = self.target_mask(ids, [len(pairs[i][1]) for i in idx])
                pred = self.fill(ids, tm, att)
                for b, i in enumerate(idx):
                    gr[i] = bool((pred[b][tm[b]] == ids[b][tm[b]]).all())
            return list(zip(ll, gr))
        return self.ar_loglik(pairs, progress)

    def ar_loglik(self, pairs, progress=None):
        """Exact log-likelihoods and greedy flags, each context run once for all the continuations that
        share it (the choices of one question): its keys and values are copied to every continuation's
        row, which then runs only its own tokens. Forwards hold about batch_size continuations."""
        by_ctx = {}
        for i, (c, _) in enumerate(pairs):
            by_ctx.setdefault(tuple(c), []).append(i)
        # (context, its rows), longest first; a context's rows split to fit one forward
        longest = lambda c, rows: len(c) + max(len(pairs[i][1]) for i in rows)
        fit = lambda c, rows: max(1, min(self.batch_size, FORWARD_TOKENS // longest(c, rows)))
        groups = sorted(((c, rows[k:k + fit(c, rows)]) for c, rows in by_ctx.items()
                         for k in range(0, len(rows), fit(c, rows))), key=lambda g: (-longest(*g), -len(g[1])))
        out, s = [None] * len(pairs), 0
        while s < len(groups):
            chunk, n_rows, top = [], 0, longest(*groups[s])
            while s < len(groups) and (not chunk or (n_rows + len(groups[s][1]) <= self.batch_size
                                                     and (n_rows + len(groups[s][1])) * top <= FORWARD_TOKENS)):
                chunk.append(groups[s])
                n_rows += len(groups[s][1])
                s += 1
            ids, att = self._pad([list(c) for c, _ in chunk])
            res = self.model(input_ids=ids, attention_mask=att, position_ids=positions_from_mask(att), use_cache=True,
                             logits_to_keep=1)
            idx = [i for _, rows in chunk for i in rows]
            owner = torch.tensor([k for k, (_, rows) in enumerate(chunk) for _ in rows], device=self.device)
            conts = [pairs[i][1] for i in idx]
            T = max(len(t) for t in conts)
            # logits [R, T, V]: position j predicts continuation token j; the first from the context's last position
            logits = res.logits[:, -1:].float()[owner][:, :T]
            if T > 1:
                x = torch.full((len(idx), T - 1), self.pad, dtype=torch.long)
                x_att = torch.zeros_like(x)
                for r, t in enumerate(conts):
                    x[r, :max(0, len(t) - 1)] = torch.tensor(t[:-1], dtype=torch.long)
                    x_att[r, :max(0, len(t) - 1)] = 1
                x, x_att = x.to(self.device), x_att.to(self.device)
                cache = getattr(res, "cache", None) or res.past_key_values
                cache.reorder_cache(owner)
                pos = att.sum(1)[owner, None] + torch.arange(T - 1, device=self.device)
                more = self.model(input_ids=x, attention_mask=torch.cat([att[owner], x_att], 1), position_ids=pos,
                                  use_cache=True, **{cache_keyword(type(self.model)): cache}).logits.float()
                logits = torch.cat([logits, more], 1)
            tgt = torch.tensor([t + [0] * (T - len(t)) for t in conts], dtype=torch.long, device=self.device).view(len(idx), T)
            tm = torch.tensor([[j < len(t) for j in range(T)] for t in conts], dtype=torch.bool, device=self.device).view(len(idx), T)
            logp = F.log_softmax(logits, -1).gather(-1, tgt[:, :, None]).squeeze(-1)
            hit = logits.argmax(-1) == tgt
            for r, i in enumerate(idx):
                out[i] = (float((logp[r].double() * tm[r]).sum()), bool(hit[r][tm[r]].all()))
            if progress is not None:
                progress.update(len(idx))
        return out

    @staticmethod
    def target_mask(ids, n_targets):
        """The last n positions of each left-padded row."""
        tm = torch.zeros_like(ids, dtype=torch.bool)
        for b, n in enumerate(n_targets):
            tm[b, ids.shape[1] - n:] = n > 0
        return tm

    def elbo(self, seqs, n_targets, progress=None):
        """The ELBO estimate of log p(last n tokens | the others) for each sequence: model.elbo_loglik's,
        with each row's draws from its own generator (elbo_draws), packed across rows: every draw of
        every row in one list, sorted by length into forwards of batch_size sequences, and a draw that
        repeats a mask of its row (n targets allow 2^n - 1 masks, so short continuations repeat often)
        run once, its weight the sum of its copies'. Returns floats."""
        jobs = []                                   # (row, targets' mask, summed weight)
        for r, (q, n) in enumerate(zip(seqs, n_targets)):
            if n:
                drawn, w = elbo_draws(n, self.mc_num, self.method, self.generator(q, n))
                keep = drawn.any(1)                 # a draw that masks nothing adds 0
                masks, inv = torch.unique(drawn[keep], dim=0, return_inverse=True)
                w = torch.zeros(len(masks), dtype=torch.float64).index_add_(0, inv, w[keep].double())
                jobs += [(r, m, float(x)) for m, x in zip(masks, w)]
        jobs.sort(key=lambda j: -len(seqs[j[0]]))   # stable: a row's draws stay together
        left = Counter(r for r, _, _ in jobs)
        if progress is not None:
            progress.update(len(seqs) - len(left))
        total, s = [0.0] * len(seqs), 0
        while s < len(jobs):
            chunk = jobs[s:s + max(1, min(self.batch_size, FORWARD_TOKENS // len(seqs[jobs[s][0]])))]
            s += len(chunk)
            ids, att = self._pad([seqs[r] for r, _, _ in chunk])
            m = torch.zeros(ids.shape, dtype=torch.bool)
            for b, (_, mask, _) in enumerate(chunk):
                m[b, ids.shape[1] - len(mask):] = mask
            m = m.to(self.device)
            logits = self.model(ids.masked_fill(m, self.model.mask_token_id), att, target_mask=m).float()
            logp = -F.cross_entropy(logits, ids[m], reduction="none").double().cpu()
            draw = torch.arange(len(chunk)).repeat_interleave(m.sum(1).cpu())
            per_draw = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, draw, logp)
            for b, (r, _, w) in enumerate(chunk):
                total[r] += float(per_draw[b]) * w
                left[r] -= 1
                if progress is not None and not left[r]:
                    progress.update(1)
        return [t / self.mc_num for t in total]

    # -- generation ------------------------------------------------------------------------------------
    def fill(self, ids, gen_mask, att):
        """Diffusion: fill the positions of gen_mask with the sampler (greedy low_confidence, one token per
        step, unless set otherwise). Each row samples from a generator seeded by --seed, its given tokens
        and the number it fills, so a sampled row does not depend on the batch. Returns the filled ids."""
        src = ~gen_mask & att.bool()
        batch = {"input_ids": ids.masked_fill(gen_mask, self.model.mask_token_id), "src_mask": src, "attention_mask": att}
        gens = [self.generator(r[s].tolist(), int(m.sum()), self.device) for r, s, m in zip(ids, src, gen_mask)]
        return sample(self.model, batch, self.settings, generator=gens)

    @torch.no_grad()
    def generate(self, rows, stop_at_eos=False, progress=None):
        """Generate a span for each row (prefix_ids, n_new, suffix_ids): the diffusion sampler fills the
        n_new [MASK] between prefix and suffix; the AR model decodes n_new tokens greedily after the
        prefix (it cannot see a suffix). Returns lists of ids (cut after EOS when stop_at_eos)."""
        order = sorted(range(len(rows)), key=lambda i: (rows[i][1], len(rows[i][0]) + len(rows[i][2])))
        out = [None] * len(rows)   # rows of one span length together: no step is spent on finished rows
        for s in range(0, len(rows), self.batch_size):
            idx = order[s:s + self.batch_size]
            chunk = [rows[i] for i in idx]
            for p, n, x in chunk:
                self.check_length(len(p) + n + (0 if self.ar else len(x)), "prompt + generated span")
            if self.ar:
                ids, att = self._pad([p for p, _, _ in chunk])
                n = max(r[1] for r in chunk)
                new = self.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n, do_sample=False,
                                          pad_token_id=self.pad, eos_token_id=self.tokenizer.eos_token_id,
                                          temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
                gen = [new[b, :r[1]].tolist() for b, r in enumerate(chunk)]
            else:
                batch = layout_rows(chunk, self.model.mask_token_id, self.pad)
                ids, att = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                gen_mask = ~batch["src_mask"].to(self.device) & att.bool()
                filled = self.fill(ids, gen_mask, att)
                gen = [f[m].tolist() for f, m in zip(filled, gen_mask)]
            eos = self.tokenizer.eos_token_id
            if stop_at_eos and eos is not None:
                gen = [cut_at_eos(g, eos) for g in gen]
            for i, g in zip(idx, gen):
                out[i] = g
            if progress is not None:
                progress.update(len(idx))
        return out


# -----------------------------------------------------------------------------
# running a task

def ppl_window(scorer, window=None, stride=None):
    """(window, stride) of the wikitext windows: --ppl_window capped at the model's positions, and
    --ppl_stride (default window - 1) capped at window - 1."""
    window = min(window or PPL_WINDOW, scorer.max_len or PPL_WINDOW)
    return window, min(stride or window - 1, window - 1)


def run_task(scorer, task, examples, gen_len=None, progress=True, window=None, stride=None):
    """Score a task's examples. Returns (metrics {name: (value, stderr)}, per-example records).
    window, stride: wikitext's (see ppl_window)."""
    tok = scorer.tokenizer
    records = []
    if task == "wikitext":
        window, stride = ppl_window(scorer, window, stride)
        pairs, owner = [], []
        for j, ex in enumerate(examples):
            ws = rolling_windows(scorer.encode(ex["text"]), scorer.start, window, stride)
            pairs += ws
            owner += [j] * len(ws)
        bar = tqdm(total=len(pairs), desc=f"{task} (windows)", disable=not progress, leave=False)
        scores = scorer.loglik(pairs, progress=bar)
        ll, n_tok, n_win = [0.0] * len(examples), [0] * len(examples), [0] * len(examples)
        for (_, tgt), (v, _), j in zip(pairs, scores, owner):
            ll[j] += v
            n_tok[j] += len(tgt)
            n_win[j] += 1
        for ex, v, n, w in zip(examples, ll, n_tok, n_win):
            records.append({"input": ex["text"][:80], "loglik": v, "tokens": n, "words": ex["words"], "bytes": ex["bytes"],
                            "windows": w})
        total = perplexities(sum(ll), sum(n_tok), sum(ex["words"] for ex in examples), sum(ex["bytes"] for ex in examples))
        metrics = {k: (v, None) for k, v in total.items()}
        bar.close()
        return metrics, records
    if task in MC_TASKS:
        pairs, first = [], []
        for ex in examples:
            first.append(len(pairs))
            pairs += [scorer.encode_pair(ctx, cont) for ctx, cont in ex["pairs"]]
        bar = tqdm(total=len(pairs), desc=f"{task} (choices)", disable=not progress, leave=False)
        scores = scorer.loglik(pairs, progress=bar)
        acc, acc_norm = [], []
        for i, ex in enumerate(examples):
            ll = [s for s, _ in scores[first[i]:first[i] + len(ex["pairs"])]]
            # lm-eval's acc_norm: by the length of the choice, without the space that joins it to the context
            norm = [v / max(1, len(cont[1:] if cont.startswith(" ") else cont)) for v, (_, cont) in zip(ll, ex["pairs"])]
            pred, pred_norm = max(range(len(ll)), key=ll.__getitem__), max(range(len(ll)), key=norm.__getitem__)
            acc.append(float(pred == ex["gold"]))
            acc_norm.append(float(pred_norm == ex["gold"]))
            records.append({"choices": [c for _, c in ex["pairs"]], "contexts": sorted({c for c, _ in ex["pairs"]}),
                            "gold": ex["gold"], "loglik": ll, "pred": pred, "pred_norm": pred_norm,
                            "correct": bool(acc[-1])})
        metrics = {"acc": mean_stderr(acc)}
        if task != "winogrande":  # its choices share one continuation: length normalisation changes nothing
            metrics["acc_norm"] = mean_stderr(acc_norm)
    else:
        bar = tqdm(total=len(examples), desc=task, disable=not progress, leave=False)
        rows, targets = [], []
        for ex in examples:
            if task == "rocstories":
                pre, tgt = scorer.encode_pair(ex["prefix"], ex["target"])
                suf = scorer.encode(ex["suffix"]) if ex["suffix"] else []
                rows.append((pre, gen_len or len(tgt), suf))
            elif task == "triviaqa":
                pre = scorer.encode_pair(ex["context"], "")[0]
                longest = max(len(scorer.encode(" " + a)) for a in ex["answers"])
                rows.append((pre, gen_len or longest, []))
            else:  # lambada, gsm8k
                pre, tgt = scorer.encode_pair(ex["context"], ex["target"])
                rows.append((pre, len(tgt) if task == "lambada" else (gen_len or len(tgt)), []))
            targets.append(ex)
        gens = scorer.generate(rows, stop_at_eos=task != "lambada", progress=bar)
        values = {}
        for ex, g in zip(targets, gens):
            pred = tok.decode(g, skip_special_tokens=True)
            rec = {"input": ex.get("context", ex.get("prefix")), "prediction": pred}
            if task == "lambada":
                ok = pred.strip() == ex["word"]
                values.setdefault("acc", []).append(float(ok))
                rec.update(target=ex["word"], correct=ok)
            elif task == "rocstories":
                for name, v in (("rouge1", rouge_n(pred, ex["target"], 1)), ("rouge2", rouge_n(pred, ex["target"], 2)),
                                ("rougeL", rouge_l(pred, ex["target"]))):
                    values.setdefault(name, []).append(100 * v)
                    rec[name] = 100 * v
                rec.update(suffix=ex["suffix"], target=ex["target"].strip())
            elif task == "triviaqa":
                answer = pred.split("\n")[0]
                ok = normalize_answer(answer) in {normalize_answer(a) for a in ex["answers"]}
                values.setdefault("exact_match", []).append(float(ok))
                rec.update(target=ex["answers"], correct=ok)
            else:  # gsm8k
                got = gsm8k_number(pred)
                ok = got is not None and got == ex["answer"]
                values.setdefault("exact_match", []).append(float(ok))
                rec.update(target=ex["answer"], extracted=got, correct=ok)
            records.append(rec)
        metrics = {k: mean_stderr(v) for k, v in values.items()}
    bar.close()
    return metrics, records


def read_task(task, args):
    """The task's examples from --data_path / --data_dir (or --download), cut to --limit."""
    records, source = load_task_records(task, args.data_path, args.data_dir, args.download)
    records = records[:args.limit] if args.limit else records
    return [make_example(task, r, source, i, args.infill_sentence) for i, r in enumerate(records, 1)], source


# -----------------------------------------------------------------------------
# lm-evaluation-harness adapter: `import eval_zeroshot` registers the model "dlm"

def _register_lm_eval():
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        return None

    @register_model("dlm")
    class DiffusionLM(LM):
        """lm-eval model for our diffusion LMs (and, with ar=True, the same scoring by a causal LM):
        loglikelihood = the ELBO estimate (is_greedy from the greedy sampler), loglikelihood_rolling = the
        ELBO of the whole text, generate_until = the sampler, cut at the first stop string.
        model_args: every Scorer keyword (model_name, ar, mc_num, method, seed, ...), every sampler setting
        (sampler, diffusion_steps, block_length, cache, ...: the flags of add_sampler_args, default
        EVAL_SAMPLER), plus max_gen_toks (default 256) and check_greedy (default True)."""

        def __init__(self, model_name="smollm2-135m", max_gen_toks=256, check_greedy=True, batch_size=32, **kw):
            super().__init__()
            sampler = {f: kw.pop(f) for f in SamplerSettings.__dataclass_fields__ if f in kw}
            if sampler:
                kw["settings"] = SamplerSettings.from_args(SimpleNamespace(**{**EVAL_SAMPLER, **sampler}))
            ints = ("mc_num", "seed", "mask_token_id")
            kw = {k: int(v) if k in ints else v for k, v in kw.items()}
            if isinstance(kw.get("ar"), str):
                kw["ar"] = kw["ar"].lower() in ("1", "true", "yes")
            kw = {k: v for k, v in kw.items() if k not in ("max_batch_size",)}
            batch_size = int(batch_size) if str(batch_size).isdigit() else 32     # lm-eval may pass "auto"
            if str(kw.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
                print(f"dlm: --device {kw['device']} but no CUDA here: running on cpu", file=sys.stderr)
                kw["device"] = "cpu"
            self.scorer = kw.pop("scorer", None) or Scorer(model_name, batch_size=batch_size, **kw)
            self.max_gen_toks = int(max_gen_toks)
            self.check_greedy = str(check_greedy).lower() not in ("0", "false", "no")

        @property
        def tokenizer_name(self):
            return self.scorer.tokenizer.name_or_path

        def loglikelihood(self, requests, disable_tqdm=False):
            pairs = [self.scorer.encode_pair(*req.args) for req in requests]
            bar = tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm)
            out = self.scorer.loglik(pairs, greedy=self.check_greedy, progress=bar)
            bar.close()
            return [(ll, bool(g)) for ll, g in out]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            s = self.scorer
            window = (s.max_len or 2048) - 1
            pairs, owner = [], []
            for i, req in enumerate(requests):
                ids = s.encode(req.args[0])
                for w in range(0, len(ids), window):   # disjoint windows, each after a start token
                    pairs.append(([s.start], ids[w:w + window]))
                    owner.append(i)
            out = s.loglik(pairs, progress=tqdm(total=len(pairs), desc="loglikelihood_rolling", disable=disable_tqdm))
            totals = [0.0] * len(requests)
            for (ll, _), i in zip(out, owner):
                totals[i] += ll
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            s, out = self.scorer, []
            for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
                context, kw = req.args
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else until
                pre = s.encode_pair(context, "")[0]
                g = s.generate([(pre, int(kw.get("max_gen_toks", self.max_gen_toks)), [])], stop_at_eos=True)[0]
                text = s.tokenizer.decode(g, skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out.append(text)
            return out

    return DiffusionLM


DiffusionLM = _register_lm_eval()


def run_lm_eval(scorer, tasks, include=None, limit=None, max_gen_toks=256):
    """Run lm-eval tasks (names, comma-separated) on the scorer; `include` is a folder of task YAMLs
    (then lm-eval's own task list is not indexed). Returns lm-eval's results dict."""
    if DiffusionLM is None:
        raise DataError("--lm_eval_tasks needs the lm-eval package: pip install lm-eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    if include and not os.path.isdir(include):
        raise DataError(f"--lm_eval_include {include}: no such folder")
    tm = TaskManager(include_path=os.path.abspath(include), include_defaults=False) if include else TaskManager()
    names = [t for t in tasks.split(",") if t]
    unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        raise DataError(f"--lm_eval_tasks: unknown task(s) {', '.join(unknown)}" +
                        (f" in --lm_eval_include {include}" if include else ""))
    lm = DiffusionLM(scorer=scorer, max_gen_toks=max_gen_toks)
    return simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, bootstrap_iters=0,
                           random_seed=scorer.seed, log_samples=False)


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__.strip())
    a = p.add_argument
    a("--model_name", default="smollm2-135m", help="run folder, model folder, hub id, or smollm2-135m")
    a("--tasks", default=None, help=f"comma-separated, from: {', '.join(TASKS)}")
    a("--ar", action="store_true", help="score with the AR parent (or --model_name itself if it is a causal LM)")
    a("--data_path", default=None, help="the data file of the one task in --tasks")
    a("--data_dir", default=None, help="folder with one file per task: <task>.jsonl/.json/.csv/.txt")
    a("--download", action="store_true", help="without a local file, load the task's public copy (needs datasets + network)")
    a("--limit", type=at_least(1), default=None, help="first N examples of each task (unset: all)")
    a("--batch_size", type=at_least(1), default=32, help="sequences per forward")
    a("--mc_num", type=at_least(1), default=64, help="ELBO draws per scored continuation")
    a("--elbo_method", default="stratified", choices=ELBO_METHODS, help="how the ELBO draws are spread (see model.elbo_draws)")
    a("--seed", type=at_least(0), default=0, help="seed of the ELBO draws and the samplers")
    a("--gen_len", type=at_least(1), default=None, help="rocstories/triviaqa/gsm8k: tokens to generate (unset: the reference's length)")
    a("--infill_sentence", type=int, default=4, help="rocstories: which of the 5 sentences to infill (1-5)")
    a("--ppl_window", type=at_least(2), default=PPL_WINDOW, help="wikitext: tokens per window (capped at the model's positions)")
    a("--ppl_stride", type=at_least(1), default=None, help="wikitext: new tokens scored per window (unset: window - 1)")
    a("--lm_eval_tasks", default=None, help="run these lm-eval tasks through the harness instead")
    a("--lm_eval_include", default=None, help="folder of lm-eval task YAMLs")
    a("--mask_token_id", type=at_least(0), default=None, help="reuse this token id as [MASK] if the model has none")
    a("--base_model_name", default=None, help="config source for a DiffuGPT checkpoint without config.json")
    a("--adapter_path", default=None, help="PEFT LoRA adapter folder, merged into the model")
    a("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    a("--device", default=None, help="default cuda if available, else cpu")
    a("--attn_implementation", default="sdpa", help="eager, sdpa or flash_attention_2")
    a("--output", default=None, help="write settings, metrics and per-example records to this JSON file")
    a("--no_progress", action="store_true", help="no progress bars")
    a("--resume", action="store_true", help="with --output: keep the tasks that file already holds for the same "
      "settings and score only the rest (the file is rewritten after every task)")
    # the generative tasks' sampler; each task decides where to stop (EOS but for lambada)
    add_sampler_args(p, omit=("stop_at_eos",), **EVAL_SAMPLER)
    args = p.parse_args(argv)
    try:
        args.settings = SamplerSettings.from_args(args)
    except ValueError as e:
        p.error(str(e))
    if not args.tasks and not args.lm_eval_tasks:
        p.error("give --tasks (and data files) or --lm_eval_tasks")
    args.task_list = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    for t in args.task_list:
        if t not in TASKS:
            p.error(f"--tasks: unknown task {t!r} (known: {', '.join(TASKS)})")
    if args.data_path and len(args.task_list) != 1:
        p.error("--data_path is for one task: give --data_dir for several")
    if args.data_path and not os.path.isfile(args.data_path):
        p.error(f"--data_path {args.data_path}: no such file")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data_dir {args.data_dir}: no such folder")
    if args.lm_eval_include and not os.path.isdir(args.lm_eval_include):
        p.error(f"--lm_eval_include {args.lm_eval_include}: no such folder")
    if args.ppl_stride is not None and args.ppl_stride >= args.ppl_window:
        p.error(f"--ppl_stride {args.ppl_stride} must be below --ppl_window {args.ppl_window} (a window keeps one token of context)")
    if not 1 <= args.infill_sentence <= 5:
        p.error(f"--infill_sentence must be in 1..5, got {args.infill_sentence}")
    if args.output:
        check_output_file(args.output, p.error)
    if args.output and os.path.exists(args.output) and not is_results_file(args.output):
        p.error(f"--output {args.output} exists and is not a results file of this script: not overwriting it")
    if args.resume and not args.output:
        p.error("--resume needs --output (the results file to continue)")
    args.error = p.error
    return args


def ppl_kind(ar, mc_num):
    return ("exact (AR log-likelihood)" if ar else
            f"upper bound (from the ELBO, a lower bound of the log-likelihood, {mc_num} draws per window)")


def is_results_file(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return isinstance(data, dict) and {"settings", "metrics"} <= set(data)
    except (OSError, ValueError):
        return False


def print_table(rows):
    print(f"| {'task':<13} | {'metric':<16} | {'value':>10} | {'stderr':>8} | {'n':>6} |")
    print(f"|{'-' * 15}|{'-' * 18}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    for task, metric, value, se, n in rows:
        se = "-" if se is None else f"{se:.4f}"
        print(f"| {task:<13} | {metric:<16} | {value:10.4f} | {se:>8} | {n:>6} |")


def main(argv=None):
    args = parse_args(argv)
    try:
        examples = {t: read_task(t, args) for t in args.task_list}    # every data file checked before the model loads
        scorer = Scorer(args.model_name, ar=args.ar, mc_num=args.mc_num, method=args.elbo_method, batch_size=args.batch_size,
                        seed=args.seed, dtype=args.dtype, device=args.device, settings=args.settings,
                        mask_token_id=args.mask_token_id, base_model_name=args.base_model_name,
                        adapter_path=args.adapter_path, attn_implementation=args.attn_implementation)
        cpu_thread_hint(PROG, args.device or default_device())   # once the input is known good
        settings = {k: v for k, v in vars(args).items() if k not in ("error", "task_list", "settings", "resume")}
        settings.update(scored_model=scorer.model_name, mode="ar" if args.ar else "diffusion")
        results = {"settings": settings, "metrics": {}, "examples": {}}
        done = earlier_results(args.output, settings) if args.resume else {"metrics": {}, "examples": {}}
        table, notes = [], []
        for task, (exs, source) in examples.items():
            if task in done["metrics"]:   # --resume: scored before with these settings
                print(f"{PROG}: {task}: kept from {args.output}", file=sys.stderr, flush=True)
                results["metrics"][task], results["examples"][task] = done["metrics"][task], done["examples"].get(task, [])
                table += [(task, m, v["value"], v["stderr"], len(exs)) for m, v in done["metrics"][task].items()
                          if isinstance(v, dict) and "value" in v]
                continue
            t0 = time.time()
            metrics, records = run_task(scorer, task, exs, args.gen_len, progress=not args.no_progress,
                                        window=args.ppl_window, stride=args.ppl_stride)
            secs = time.time() - t0
            results["metrics"][task] = {m: {"value": v, "stderr": se} for m, (v, se) in metrics.items()}
            if task == "wikitext":
                window, stride = ppl_window(scorer, args.ppl_window, args.ppl_stride)
                results["metrics"][task].update(perplexity=ppl_kind(args.ar, args.mc_num), window=window, stride=stride)
                notes.append(f"wikitext: {ppl_kind(args.ar, args.mc_num)}; windows of {window} tokens, stride {stride}")
            results["metrics"][task].update(n=len(exs), seconds=round(secs, 2), examples_per_s=round(len(exs) / secs, 3),
                                            data=source)
            results["examples"][task] = records
            table += [(task, m, v, se, len(exs)) for m, (v, se) in metrics.items()]
            if args.output:   # after every task: a long run cut short keeps what it scored (--resume goes on)
                write_results(args.output, results)
        if args.lm_eval_tasks:
            res = run_lm_eval(scorer, args.lm_eval_tasks, args.lm_eval_include, args.limit)
            results["lm_eval"] = res["results"]
            for task, ms in res["results"].items():
                for key, v in ms.items():
                    if "," in key and not key.startswith(("alias", "sample_len")) and "_stderr" not in key \
                            and isinstance(v, (int, float)):
                        name, filt = key.split(",", 1)
                        se = ms.get(f"{name}_stderr,{filt}")
                        table.append((task, name, v, se if isinstance(se, (int, float)) else None,
                                      res.get("n-samples", {}).get(task, {}).get("effective", 0)))
    except (DataError, OSError, ValueError) as e:
        args.error(first_line(e))
    print(f"{'AR' if args.ar else 'diffusion'}: {scorer.model_name}")
    print_table(table)
    for line in notes:
        print(line)
    if args.output:
        write_results(args.output, results)
        print(f"wrote {args.output}")
    return results


def write_results(path, results):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def earlier_results(path, settings):
    """--resume: the metrics and examples of the tasks in `path` scored with the same settings (all but --tasks
    and --no_progress), or none."""
    if not path or not os.path.exists(path):
        return {"metrics": {}, "examples": {}}
    with open(path) as f:
        data = json.load(f)
    same = lambda a: {k: v for k, v in a.items() if k not in ("tasks", "no_progress")}
    if same(data["settings"]) != same(settings):
        differ = sorted(k for k in set(same(data["settings"])) | set(same(settings))
                        if data["settings"].get(k) != settings.get(k))
        raise DataError(f"--resume: {path} was scored with other settings ({', '.join(differ)}); give another "
                        f"--output or the same settings")
    return data


if __name__ == "__main__":
    main()

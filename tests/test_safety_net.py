"""The safety net: end-to-end facts checked against an independent hand computation.

    OMP_NUM_THREADS=1 python3 -m pytest -q -x tests/test_safety_net.py

- a train_adapt.py step's logged loss, recomputed from its noise seed (the corrupted ids, the annealing
  mask the forward really used, the 1/t weights, the normalisation over the micro-steps of the step);
- a short run on a repetitive corpus lowers the loss;
- the LLaDA samplers: `low_confidence` commits the most probable positions, `random` remasking picks
  positions uniformly, Gumbel sampling at temperature T draws from softmax(logits / T);
- --grad_checkpointing gives the gradients of a plain run, --compile runs a step on the CPU;
- the diffusion Scorer.loglik and the lm-eval adapter's loglikelihood of a one-token continuation (where
  the ELBO is exact) equal log p(token | context, [MASK] in its place) computed from the logits.
"""
import json
import math
import os
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import WORDS, save_tiny_ar, tiny_causal_lm, tiny_tokenizer

import attention_patch
import model as model_py
import train_adapt
from test_train_adapt import single_process  # noqa: F401 (autouse fixture: one process)

EPS = 1e-3              # t ~ U(EPS, 1), as the objective is specified
SEED = 1337


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama folder whose tokenizer has a mask token (no embedding row is added) and a random corpus."""
    d = tmp_path_factory.mktemp("safety")
    path = save_tiny_ar(d / "tiny", with_mask=True)
    rng = random.Random(0)
    corpus = d / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(15)) + "\n" for _ in range(12)))
    return {"dir": d, "model": path, "corpus": str(corpus)}


def adapt(model, data, out, *extra):
    """train_adapt.main on a tiny model and corpus: 16-token rows, 2 per micro-step, CPU, no validation."""
    return train_adapt.main(["--model_name", model, "--data", data, "--seq_len", "16", "--batch_size", "2",
                             "--val_fraction", "0", "--eval_every", "0", "--device", "cpu", "--seed", str(SEED),
                             "--out_dir", str(out), *extra])


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


# ----------------------------------------------------------------------------- one step's loss by hand

def splitmix_visible(seed, ratio, L):
    """The annealing mask written out in Python integers: key j is visible from query i when j <= i, or
    when the top 24 bits of splitmix64(i * golden + j * col + seed), as a number in [0, 1), are < ratio."""
    M = (1 << 64) - 1
    vis = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            z = (i * 0x9E3779B97F4A7C15 + j * 0xD6E8FEB86659FD93 + seed) & M
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
            z ^= z >> 31
            vis[i, j] = j <= i or (z >> 40) / (1 << 24) < ratio
    return vis


def packed_sequences(tok, path, L):
    """The training sequences of a one-document text corpus: its tokens, then EOS, cut into rows of L."""
    ids = tok(open(path).read(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // L
    return torch.tensor(ids[:n * L]).view(n, L)


def test_step_loss_by_hand(tiny, monkeypatch):
    """Two optimizer steps of 2 micro-steps of 2 rows, annealing over 4 steps: step 1 runs causal (ratio 0),
    step 2 at ratio 0.25. Each logged loss is recomputed from the noise seed: per micro-step t ~ U(EPS, 1)
    per row and the masks (u < t, never position 0), then, in each forward that anneals, one seed for the
    mask; logits from a plain forward of the transformers model (the step's weights) under that mask;
    CE of the token at i from the logits at i - 1, weighted by 1/t, summed over both micro-steps and
    divided by the masked tokens of both. The logged gradient norm is that of this hand loss (so the
    backward weighs the micro-steps the same way)."""
    seen = []                                          # (ratio, mask) of every forward that builds a mask
    real = model_py.anneal_attention_mask

    def spy(seq_len, ratio, *a, **kw):
        mask = real(seq_len, ratio, *a, **kw)
        seen.append((ratio, mask.clone()))
        return mask
    monkeypatch.setattr(model_py, "anneal_attention_mask", spy)
    monkeypatch.setattr(attention_patch, "anneal_attention_mask", spy)
    out = tiny["dir"] / "by_hand"
    adapt(tiny["model"], tiny["corpus"], out, "--max_steps", "2", "--grad_accum", "2", "--anneal_steps", "4", "--save_every", "1",
          "--keep_last", "0", "--lr", "1e-2", "--warmup_steps", "0")
    log = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2]
    assert [r["anneal_ratio"] for r in log] == [0.0, 0.25]

    tok = tiny_tokenizer(with_mask=True)
    L, B, A = 16, 2, 2
    seqs = packed_sequences(tok, tiny["corpus"], L)
    order = np.random.default_rng([SEED, 0]).permutation(len(seqs))     # epoch 0's shuffle of the sequences
    assert len(seqs) >= 2 * A * B
    g = torch.Generator().manual_seed(SEED)
    weights = [tiny["model"], str(out / "step_000001")]
    hand_masks = []
    for step, ratio in enumerate((0.0, 0.25)):
        hf = load_hf(weights[step])
        draws = []
        for k in range(A):
            t = (1 - EPS) * torch.rand(B, generator=g) + EPS
            masked = torch.rand(B, L, generator=g) < t[:, None]
            masked[:, 0] = False
            draws.append((t, masked))
        total, n_total = 0.0, 0
        for k, (t, masked) in enumerate(draws):
            start = (step * A + k) * B
            x = seqs[order[start:start + B]]
            if ratio > 0:                              # an annealed forward draws its mask seed
                seed = int(torch.randint(0, 1 << 62, (1,), generator=g))
                vis = splitmix_visible(seed, ratio, L)
            else:
                vis = torch.ones(L, L, dtype=torch.bool).tril()
            hand_masks.append(vis)
            xt = x.masked_fill(masked, tok.mask_token_id)
            logits = hf(input_ids=xt, attention_mask=vis.expand(B, 1, L, L)).logits.double()
            logp = F.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)   # logits at i-1 score token i
            total = total + (-logp * masked[:, 1:] / t[:, None].double()).sum()
            n_total += int(masked.sum())
        loss = total / n_total
        loss.backward()                                # the step's gradient: its norm is logged before clipping
        grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in hf.parameters()))
        assert log[step]["n_masked"] == n_total
        assert log[step]["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        assert log[step]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    # every forward ran the hand-built mask: causal at ratio 0, the hand-drawn one at ratio 0.25
    assert [r for r, _ in seen] == [0.0, 0.0, 0.25, 0.25]
    for (_, mask), vis in zip(seen, hand_masks):
        assert torch.equal(mask.bool(), vis.expand_as(mask))
    extra = hand_masks[2] & ~hand_masks[0]           # the annealed mask opens about a quarter of the future keys
    assert 0.1 < extra.sum() / (L * (L - 1) / 2) < 0.45


# ----------------------------------------------------------------------------- a short run learns

def test_short_run_loss_falls(tiny):
    """200 steps on one sentence repeated: the validation loss (fixed noise) starts near log(vocab) and ends
    well below the corpus's unigram entropy, the best a model that ignores the context can do; the
    training loss falls too."""
    sentence = "the king said to the queen my lord is good and the night is long"
    corpus = tiny["dir"] / "repeated.txt"
    corpus.write_text((sentence + "\n") * 40)
    out = tiny["dir"] / "learns"
    adapt(tiny["model"], str(corpus), out, "--max_steps", "200", "--batch_size", "4", "--lr", "3e-3", "--min_lr", "3e-3",
          "--warmup_steps", "0", "--anneal_steps", "0", "--save_every", "0", "--val_fraction", "0.1",
          "--eval_every", "100", "--eval_batches", "2")
    log = read_log(out)
    val = {r["step"]: r["val_unweighted_loss"] for r in log if "val_unweighted_loss" in r}
    train = [r["unweighted_loss"] for r in log if "loss" in r]
    words = sentence.split()
    unigram = -sum(words.count(w) / len(words) * math.log(words.count(w) / len(words)) for w in set(words))
    vocab = len(tiny_tokenizer(with_mask=True))
    assert sorted(val) == [0, 100, 200] and len(train) == 200
    assert abs(val[0] - math.log(vocab)) < 0.5                      # a random model: about uniform
    assert val[200] < 0.5 * unigram < val[0] and val[200] < val[100] < val[0]
    assert np.mean(train[-20:]) < 0.5 * np.mean(train[:20])


# ----------------------------------------------------------------------------- samplers

VOCAB = 16                # the sampler tests' model: a small vocabulary, [MASK] its last id
MASK = VOCAB - 1


def sampler_model(seed=0, sharpen=1.0):
    """A tiny random diffusion LM (bidirectional llama) and its plain transformers model; `sharpen` scales
    the final norm, so the logits (and the differences between the temperatures) grow."""
    hf = tiny_causal_lm("llama", seed=seed, vocab_size=VOCAB)
    with torch.no_grad():
        hf.model.norm.weight.mul_(sharpen)
    return model_py.DiscreteDiffusionModel(hf, MASK, shift=True).eval(), hf


def plain_probs(hf, x, temperature=1.0):
    """softmax(logits / T) of every position of x [B, L] under full bidirectional attention, computed by the
    transformers model: position p is scored by the output at p - 1 (shift); [MASK] is never proposed."""
    B, L = x.shape
    with torch.no_grad():
        logits = hf(input_ids=x, attention_mask=torch.ones(B, 1, L, L, dtype=torch.bool)).logits.double()
    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    logits[..., MASK] = float("-inf")
    return torch.softmax(logits / temperature, -1)


def llada_inputs(prompts, gen_len, rows=1):
    ids = torch.tensor([p + [MASK] * gen_len for p in prompts] * rows)
    src = torch.zeros_like(ids, dtype=torch.bool)
    src[:, :len(prompts[0])] = True
    return ids, src


def record_steps(sampler, *a, **kw):
    """The states a sampler passes through: [start, after step 1, after step 2, ...]."""
    states = []
    out = sampler(*a, callback=lambda step, x: states.append(x.clone()), **kw)
    assert torch.equal(states[-1], out)
    return states


def test_low_confidence_commits_the_most_probable():
    """Greedy low_confidence, 8 tokens in 2 blocks of 4, 6 steps (3 per block: 2, 1, 1 tokens): each step
    commits, within the current block, the still-masked positions of highest max-probability, with their
    argmax token; nothing else changes."""
    model, hf = sampler_model(seed=1, sharpen=8.0)
    prompts = [[1, 5, 7], [1, 9, 3]]
    ids, src = llada_inputs(prompts, 8)
    states = record_steps(model_py.generate_llada, model, ids, src, steps=6, block_length=4, temperature=0.0,
                          remasking="low_confidence")
    assert len(states) == 6
    x = ids.clone()
    counts = [2, 1, 1, 2, 1, 1]
    for step, new in enumerate(states):
        block = range(3, 7) if step < 3 else range(7, 11)
        probs = plain_probs(hf, x)
        conf, token = probs.max(-1)
        expected = x.clone()
        for b in range(x.shape[0]):
            masked = [p for p in block if x[b, p] == MASK]
            best = sorted(masked, key=lambda p: -conf[b, p].item())[:counts[step]]
            gap = sorted(conf[b, masked].tolist(), reverse=True)
            assert len(gap) <= counts[step] or gap[counts[step] - 1] - gap[counts[step]] > 1e-6   # no near-tie
            for p in best:
                expected[b, p] = token[b, p]
        assert torch.equal(new, expected), f"step {step + 1}"
        x = new
    assert not (x == MASK).any()


def chi_square(observed, expected):
    observed, expected = np.asarray(observed, dtype=float), np.asarray(expected, dtype=float)
    return float(((observed - expected) ** 2 / expected).sum())


def test_random_remasking_is_uniform():
    """`random` remasking, one token per step over 6 positions, 1200 rows with the same prompt: at every step
    each still-masked position is equally likely, so the (step, position) table of first commits is flat.
    Chi-square over the 36 cells (25 degrees of freedom): 60 is exceeded by chance with p ~ 1e-4, while a
    rule with any preference (leftmost, most confident) scores in the thousands."""
    model, _ = sampler_model(seed=2)
    n, rows = 6, 1200
    ids, src = llada_inputs([[1, 4]], n, rows)
    states = record_steps(model_py.generate_llada, model, ids, src, steps=n, block_length=n, temperature=0.0,
                          remasking="random", generator=torch.Generator().manual_seed(0))
    table = np.zeros((n, n))
    prev = ids
    for step, x in enumerate(states):
        new = (x != MASK) & (prev == MASK)
        assert (new.sum(1) == 1).all()                                # one commit per row and step
        table[step] += new[:, 2:].sum(0).numpy()
        prev = x
    assert chi_square(table, rows / n) < 60
    # the same statistic rejects a leftmost rule and a greedy (low_confidence) one
    assert chi_square(np.eye(n) * rows, rows / n) > 1000
    greedy = record_steps(model_py.generate_llada, model, ids[:1], src[:1], steps=n, block_length=n, temperature=0.0,
                          remasking="low_confidence")
    order = [int(((x != MASK) & (p == MASK))[0, 2:].nonzero()) for p, x in zip([ids[:1]] + greedy[:-1], greedy)]
    assert chi_square(np.eye(n)[order] * rows, rows / n) > 1000


def test_gumbel_sampling_matches_softmax_over_temperature():
    """One masked position, 20000 rows, one step at temperature 0.7: the sampled tokens follow
    softmax(logits / 0.7) over the vocabulary without [MASK] (chi-square, 14 degrees of freedom: 45 is
    exceeded by chance with p ~ 5e-5); the same test rejects temperature 1 and 0.5."""
    model, hf = sampler_model(seed=3, sharpen=3.0)
    rows, T = 20000, 0.7
    ids, src = llada_inputs([[1, 6]], 1, rows)
    out = model_py.generate_llada(model, ids, src, steps=1, block_length=1, temperature=T, remasking="low_confidence",
                                  generator=torch.Generator().manual_seed(0))
    freq = np.bincount(out[:, 2].numpy(), minlength=VOCAB)
    assert freq[MASK] == 0

    def stat(temp):
        p = plain_probs(hf, ids[:1], temp)[0, 2].numpy()
        return chi_square(freq[:MASK], rows * p[:MASK])
    p = plain_probs(hf, ids[:1], T)[0, 2]
    assert 0.05 < p.max() < 0.8 and (p[:MASK] > 1e-3).sum() >= 6   # a spread-out distribution: a real test
    assert stat(T) < 45
    assert stat(1.0) > 200 and stat(0.5) > 200


def test_diffullama_sampling_matches_top_p_softmax():
    """The DiffuLLaMA sampler with one step reveals every masked position: one masked position, 20000 rows,
    logits_temp 0.8 and top-p 0.9: the tokens follow softmax(logits / 0.8) cut to the smallest set of
    most probable tokens reaching 0.9, renormalised (nothing outside that set; chi-square over its 12 tokens,
    11 degrees of freedom: 40 is exceeded by chance with p ~ 4e-5)."""
    generate = getattr(model_py, "generate_diffullama", None) or model_py.generate_samples
    model, hf = sampler_model(seed=3, sharpen=3.0)
    rows, T, top_p = 20000, 0.8, 0.9
    ids, src = llada_inputs([[1, 6]], 1, rows)
    out = generate(model, ids, src, diffusion_steps=1, logits_temp=T, topp_temp=top_p,
                   generator=torch.Generator().manual_seed(0))
    freq = np.bincount(out[:, 2].numpy(), minlength=VOCAB)
    p = plain_probs(hf, ids[:1], T)[0, 2].numpy()
    ranked = np.argsort(-p)
    keep = ranked[:int(np.searchsorted(np.cumsum(p[ranked]), top_p)) + 1]   # the nucleus
    assert len(keep) == 12
    assert freq[np.setdiff1d(np.arange(VOCAB), keep)].sum() == 0
    q = p[keep] / p[keep].sum()
    assert chi_square(freq[keep], rows * q) < 40


# ----------------------------------------------------------------------------- --grad_checkpointing, --compile

def step_grads(tiny, out, monkeypatch, *extra):
    """Every parameter's gradient at each optimizer step of a 2-step run (ratio 0, then 0.25; no clipping),
    and how many times a decoder layer's MLP ran (checkpointing wraps the layer's forward, so its
    recomputation in the backward runs the MLP again)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers.models.llama import modeling_llama
    grads, mlp_calls = [], [0]

    def record(optimizer, args, kwargs):
        grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    forward = modeling_llama.LlamaMLP.forward

    def counted(self, *a, **kw):
        mlp_calls[0] += 1
        return forward(self, *a, **kw)
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    hook = register_optimizer_step_pre_hook(record)
    try:
        adapt(tiny["model"], tiny["corpus"], out, "--max_steps", "2", "--grad_accum", "2", "--anneal_steps", "4",
              "--grad_clip", "0", "--lr", "1e-2", "--warmup_steps", "0", "--save_every", "0", *extra)
    finally:
        hook.remove()
        monkeypatch.undo()
    return grads, mlp_calls[0]


def test_grad_checkpointing_gives_the_same_gradients(tiny, monkeypatch):
    """The same 2 steps with and without --grad_checkpointing: the same gradients (to fp32 round-off) at
    both steps, while the checkpointed run really recomputed every decoder layer in the backward."""
    plain, calls = step_grads(tiny, tiny["dir"] / "plain", monkeypatch)
    ckpt, calls_ckpt = step_grads(tiny, tiny["dir"] / "ckpt", monkeypatch, "--grad_checkpointing")
    assert calls == 2 * 2 * 2                           # 2 layers x 2 micro-steps x 2 steps
    assert calls_ckpt == 2 * calls                      # each layer again in its backward
    assert len(plain) == len(ckpt) == 2
    for a, b in zip(plain, ckpt):
        assert len(a) == len(b) and any(g.abs().sum() > 0 for g in a)
        for ga, gb in zip(a, b):
            torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    la, lb = read_log(tiny["dir"] / "plain"), read_log(tiny["dir"] / "ckpt")
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-6)


def test_compile_runs_a_step_on_cpu(tiny):
    """--compile (torch.compile of the transformer body, inductor on the CPU): a step runs, compiles a graph,
    and logs the loss of the plain run."""
    import torch._dynamo
    if shutil.which("gcc") is None and shutil.which("g++") is None and shutil.which("clang") is None:
        pytest.skip("no C++ compiler for torch.compile on the CPU")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    adapt(tiny["model"], tiny["corpus"], tiny["dir"] / "eager", "--max_steps", "1", "--anneal_steps", "0",
          "--save_every", "0")
    adapt(tiny["model"], tiny["corpus"], tiny["dir"] / "compiled", "--max_steps", "1", "--anneal_steps", "0",
          "--save_every", "0", "--compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eager, compiled = read_log(tiny["dir"] / "eager")[-1], read_log(tiny["dir"] / "compiled")[-1]
    assert compiled["step"] == 1 and compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-4)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the ELBO of one token is exact

def make_scorer(path, **kw):
    """The diffusion Scorer of eval_zeroshot.py on the CPU in float32 (its construction, in one place)."""
    import eval_zeroshot
    return eval_zeroshot.Scorer(path, device="cpu", dtype="float32", **kw)


def exact_loglik(hf, tok, context, token):
    """log p(token | [BOS] context, [MASK] in its place), and whether it is the argmax ([MASK] aside), from a
    plain bidirectional forward of the transformers model: the last position is scored by the output before it."""
    ids = [tok.bos_token_id] + tok.encode(context, add_special_tokens=False) + [tok.mask_token_id]
    L = len(ids)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, 1, L, L, dtype=torch.bool)).logits
    logits = logits[0, -2].double()
    greedy = logits.clone()
    greedy[tok.mask_token_id] = float("-inf")
    return F.log_softmax(logits, -1)[token].item(), int(greedy.argmax()) == token


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_token_loglik_is_exact(tiny, arch):
    """With one target token every ELBO draw masks exactly that token with weight 1, so Scorer.loglik and
    the lm-eval adapter's loglikelihood are exact: log p(token | context) from the logits, for contexts of
    different lengths in one left-padded batch (GPT-2's absolute positions must follow the real tokens);
    is_greedy says whether greedy decoding gives the token."""
    import eval_zeroshot
    tok = tiny_tokenizer(with_mask=True)
    path = tiny["model"] if arch == "llama" else save_tiny_ar(tiny["dir"] / "tiny_gpt2", arch="gpt2", with_mask=True)
    hf = load_hf(path)
    contexts = ["the king said", "my lord", "thou shall not come to the night and the day"]
    wanted = []
    for i, ctx in enumerate(contexts):
        best = max(WORDS, key=lambda w: exact_loglik(hf, tok, ctx, tok.convert_tokens_to_ids(w))[0])
        word = best if i == 0 else WORDS[i]   # one continuation that greedy decoding gives, others it may not
        wanted.append((ctx, " " + word, tok.convert_tokens_to_ids(word)))
    expected = [exact_loglik(hf, tok, ctx, t) for ctx, _, t in wanted]
    assert expected[0][1] and not all(g for _, g in expected)

    scorer = make_scorer(path, mc_num=4, batch_size=8)
    pairs = [scorer.encode_pair(ctx, cont) for ctx, cont, _ in wanted]
    assert [len(c) for _, c in pairs] == [1, 1, 1]
    got = scorer.loglik(pairs, greedy=True)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected):
        assert ll == pytest.approx(ll_ref, abs=1e-5)
        assert greedy == greedy_ref

    lm = eval_zeroshot.DiffusionLM(scorer=scorer)
    requests = [SimpleNamespace(args=(ctx, cont)) for ctx, cont, _ in wanted]
    for (ll, greedy), (ll_ref, greedy_ref) in zip(lm.loglikelihood(requests, disable_tqdm=True), expected):
        assert ll == pytest.approx(ll_ref, abs=1e-5)
        assert greedy == greedy_ref

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

EPS = 1e-3              # t ~ U(EPS, 1), as the objective is specified
SEED = 1337


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


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


def corpus_blocks(tok, path, L):
    """The packed training blocks of a one-document text corpus: its tokens, then EOS, cut into L-token rows."""
    ids = tok(open(path).read(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // L
    return torch.tensor(ids[:n * L]).view(n, L)


def test_step_loss_by_hand(tiny, monkeypatch):
    """Two optimizer steps of 2 micro-steps of 2 rows, annealing over 4 steps: step 1 runs causal (ratio 0),
    step 2 at ratio 0.25. Each logged loss is recomputed from the noise seed: per micro-step t ~ U(EPS, 1)
    per row and the masks (u < t, never position 0), then, in each forward that anneals, one seed for the
    mask; logits from a plain forward of the transformers model (the step's weights) under that mask;
    CE of the token at i from the logits at i - 1, weighted by 1/t, summed over both micro-steps and
    divided by the masked tokens of both."""
    seen = []                                          # (ratio, mask) of every annealed forward
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
    blocks = corpus_blocks(tok, tiny["corpus"], L)
    order = np.random.default_rng([SEED, 0]).permutation(len(blocks))     # epoch 0's shuffle of the blocks
    assert len(blocks) >= 2 * A * B
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
            x = blocks[order[start:start + B]]
            if ratio > 0:                              # an annealed forward draws its mask seed
                seed = int(torch.randint(0, 1 << 62, (1,), generator=g))
                vis = splitmix_visible(seed, ratio, L)
            else:
                vis = torch.ones(L, L, dtype=torch.bool).tril()
            hand_masks.append(vis)
            xt = x.masked_fill(masked, tok.mask_token_id)
            with torch.no_grad():
                logits = hf(input_ids=xt, attention_mask=vis.expand(B, 1, L, L)).logits.double()
            logp = F.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)   # logits at i-1 score token i
            total += (-logp * masked[:, 1:] / t[:, None].double()).sum().item()
            n_total += int(masked.sum())
        assert log[step]["n_masked"] == n_total
        assert log[step]["loss"] == pytest.approx(total / n_total, rel=1e-5, abs=1e-6)
    # every forward ran the hand-built mask: causal at ratio 0, the hand-drawn one at ratio 0.25
    assert [r for r, _ in seen] == [0.0, 0.0, 0.25, 0.25]
    for (_, mask), vis in zip(seen, hand_masks):
        assert torch.equal(mask.bool(), vis.expand_as(mask))
    extra = hand_masks[2] & ~hand_masks[0]           # the annealed mask opens about a quarter of the future keys
    assert 0.1 < extra.sum() / (L * (L - 1) / 2) < 0.45

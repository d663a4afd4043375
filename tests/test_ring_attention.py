"""Ring attention (attention_patch.ring_attention) and sequence parallelism (model.sequence_parallel_loss)
against one process: the output and dQ, dK, dV of the kernel on 1, 2 and 4 gloo ranks equal SDPA on the
whole sequence; tiny LLaMA and GPT-2 models with the sequence split over 2 ranks give the single-process
logits, loss and parameter gradients."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT
import ring_worker as rw
from attention_patch import anneal_attention_mask, anneal_tile, draw_mask_seed, mask_uniform, ring_attention
from model import diffusion_loss, sequence_chunk

TOL = dict(atol=2e-5, rtol=1e-4)


def reference(name, dtype=torch.float32):
    """Output and gradients of SDPA on the whole sequence, with the mask the single-process model uses."""
    q, k, v, dout, pad, ratio = rw.kernel_inputs(name, dtype)
    b, _, n, _ = q.shape
    if ratio is None:
        mask = None if pad is None else pad.bool()[:, None, None, :]
    else:
        mask = anneal_attention_mask(n, ratio, pad, b, "sdpa", generator=torch.Generator().manual_seed(rw.MASK_SEED))
    q, k, v = (a.clone().requires_grad_() for a in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def launch(tmp_path, nproc, *modes):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "ring_worker.py"), str(tmp_path), *modes]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ring2"), 2, "kernel", "model")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ring4"), 4, "kernel")


def gathered(out_dir, prefix, nproc, dim):
    parts = [load_file(os.path.join(out_dir, f"{prefix}_rank{r}.safetensors")) for r in range(nproc)]
    return {k: torch.cat([p[k] for p in parts], dim) for k in parts[0]}


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("name", list(rw.KERNEL_CASES))
def test_ring_kernel_equals_sdpa(name, nproc, request):
    out_dir = request.getfixturevalue("two_ranks" if nproc == 2 else "four_ranks")
    ring, ref = gathered(out_dir, f"kernel_{name}", nproc, dim=2), reference(name)
    for k in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(ring[k], ref[k], **TOL, msg=f"{name}, {nproc} ranks: {k}")


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("name", rw.MATH_CASES)
def test_ring_math_kernel_equals_sdpa(name, nproc, request):
    """float64: the tiles run the math kernel (CUDA's kernel for masked tiles), exact to 1e-10."""
    out_dir = request.getfixturevalue("two_ranks" if nproc == 2 else "four_ranks")
    ring, ref = gathered(out_dir, f"kernel_{name}_f64", nproc, dim=2), reference(name, torch.float64)
    for k in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(ring[k], ref[k], atol=1e-10, rtol=1e-10, msg=f"{name}, {nproc} ranks: {k}")


@pytest.mark.parametrize("name", list(rw.KERNEL_CASES))
def test_ring_kernel_one_process(name):
    """Without a group the kernel is plain attention over its one chunk (the tile kernel alone)."""
    q, k, v, dout, pad, ratio = rw.kernel_inputs(name)
    anneal = None if ratio is None else (draw_mask_seed(torch.Generator().manual_seed(rw.MASK_SEED)), ratio)
    q, k, v = (a.clone().requires_grad_() for a in (q, k, v))
    out = ring_attention(q, k, v, key_padding=pad, anneal=anneal)
    out.backward(dout)
    ref = reference(name)
    for key, got in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        torch.testing.assert_close(got, ref[key], **TOL, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", list(rw.MODEL_CASES))
def test_sequence_parallel_model_equals_one_process(name, two_ranks):
    """Logits, loss and parameter gradients of a tiny model with the sequence over 2 ranks (ring
    attention, shifted targets across the chunk boundary, loss reduced over the group)."""
    x, att, masked, t, ratio = rw.model_inputs(name)
    m = rw.tiny_model(name, "sdpa")
    with torch.no_grad():
        logits = m(x, att, ratio, torch.Generator().manual_seed(rw.MASK_SEED))
    xt = x.masked_fill(masked, rw.MASK_ID)
    loss, unweighted, n = diffusion_loss(m, x, xt, masked, t, att, ratio, torch.Generator().manual_seed(rw.MASK_SEED))
    loss.backward()
    ranks = [load_file(os.path.join(two_ranks, f"model_{name}_rank{r}.safetensors")) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks], 1), logits, **TOL)
    torch.testing.assert_close(ranks[0]["loss"][0], loss.detach(), **TOL)
    torch.testing.assert_close(ranks[0]["unweighted"][0], unweighted.detach(), **TOL)
    assert masked[:, rw.L // 2].any()    # a chunk's last output predicts the next chunk's first token
    for k, p in m.named_parameters():
        torch.testing.assert_close(ranks[0]["grad." + k], p.grad, **TOL, msg=k)
        torch.testing.assert_close(ranks[1]["grad." + k], p.grad, **TOL, msg=k)


def test_mask_tiles_are_slices_of_the_whole():
    """Any tile of the annealing mask, built on its own, is that tile of the whole mask; the random part
    is Bernoulli(ratio); the causal part is always on."""
    seed = draw_mask_seed(torch.Generator().manual_seed(0))
    pos = torch.arange(96)
    whole = anneal_tile(seed, 0.3, pos, pos)
    assert torch.equal(anneal_tile(seed, 0.3, pos[32:64], pos[64:]), whole[32:64, 64:])
    assert whole[torch.ones(96, 96, dtype=torch.bool).tril()].all()
    upper = whole[torch.ones(96, 96, dtype=torch.bool).triu(1)].float().mean().item()
    assert 0.26 < upper < 0.34
    u = mask_uniform(seed, pos, pos)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(anneal_tile(seed + 1, 0.3, pos, pos), whole)


def test_uneven_sequence_is_refused():
    with pytest.raises(ValueError, match="multiple of --sp_size"):
        sequence_chunk(torch.zeros(2, 10), 0, 4)
    with pytest.raises(ValueError, match="same chunk"):
        ring_attention(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8))

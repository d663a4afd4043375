"""Run by tests/test_ring_attention.py under torchrun (gloo): ring attention, and tiny models with the
sequence split over the ranks; each rank saves its results for the test to compare with one process.

    torchrun --standalone --nproc_per_node=2 tests/ring_worker.py OUT_DIR kernel model
    torchrun --standalone --nproc_per_node=4 tests/ring_worker.py OUT_DIR kernel

The inputs are built from fixed seeds by the functions below, which the test calls too.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name: (batch, heads, kv heads, length, head dim, annealing ratio or None = bidirectional, left padding)
KERNEL_CASES = {
    "bidirectional": (2, 4, 4, 24, 8, None, False),
    "gqa": (2, 4, 2, 24, 8, None, False),
    "anneal0": (2, 4, 4, 24, 8, 0.0, False),
    "anneal0.3": (2, 4, 4, 24, 8, 0.3, False),
    "anneal1": (2, 4, 4, 24, 8, 1.0, False),
    "padding": (2, 4, 4, 24, 8, None, True),
    "gqa_anneal0.3_padding": (3, 4, 2, 24, 8, 0.3, True),
}
# float64 runs the math tile kernel (the one CUDA uses for masked tiles) instead of the CPU flash kernel
MATH_CASES = ("bidirectional", "gqa_anneal0.3_padding")
MODEL_CASES = {"llama": (1.0, True), "llama_anneal0.3": (0.3, True), "gpt2": (1.0, False),
               "gpt2_anneal0.3": (0.3, True)}   # arch[_anneal]: (ratio, left padding)
MASK_SEED = 7
VOCAB, MASK_ID, B, L = 96, 95, 2, 24


def reduce_loss(loss, n, group=None):
    """The mean over a group of per-rank (loss, n) pairs, weighted by n: the loss of the whole rows."""
    import torch.distributed as dist
    sums = torch.stack([loss.detach().double() * n, n.double()])
    dist.all_reduce(sums, group=group)
    return sums[0] / sums[1].clamp(min=1)


def padding(batch, length, on):
    """Left padding: row 0 starts with 5 pad tokens (more than a chunk of 4 ranks), row 2 with 2."""
    if not on:
        return None
    att = torch.ones(batch, length, dtype=torch.long)
    att[0, :5] = 0
    if batch > 2:
        att[2, :2] = 0
    return att


def kernel_inputs(name, dtype=torch.float32):
    b, h, hkv, n, d, ratio, pad = KERNEL_CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    q, dout = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    return *(a.to(dtype) for a in (q, k, v, dout)), padding(b, n, pad), ratio


def model_inputs(name):
    """Token ids, padding, the training noise (masks, t), and the annealing ratio of a model case."""
    from model import noise_draw, maskable_positions
    ratio, pad = MODEL_CASES[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randint(4, MASK_ID, (B, L), generator=g)
    att = padding(B, L, pad)
    masked, t = noise_draw(maskable_positions(x, None, att, shift=True), g)
    return x, att, masked, t, ratio


def tiny_model(name, impl):
    from conftest import tiny_causal_lm
    from model import DiscreteDiffusionModel
    return DiscreteDiffusionModel(tiny_causal_lm(name.split("_")[0], impl=impl, seed=0, vocab_size=VOCAB), MASK_ID)


def run_kernel(out_dir, rank, size):
    import torch.distributed as dist
    from safetensors.torch import save_file
    from attention_patch import draw_mask_seed, ring_attention
    from model import sequence_chunk
    for name, dtype in [(n, torch.float32) for n in KERNEL_CASES] + [(n, torch.float64) for n in MATH_CASES]:
        q, k, v, dout, pad, ratio = kernel_inputs(name, dtype)
        anneal = None if ratio is None else (draw_mask_seed(torch.Generator().manual_seed(MASK_SEED)), ratio)
        q, k, v, dout = (sequence_chunk(a, rank, size, dim=2).clone().requires_grad_() for a in (q, k, v, dout))
        out = ring_attention(q, k, v, dist.group.WORLD, None if pad is None else sequence_chunk(pad, rank, size), anneal)
        out.backward(dout)
        save_file({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad},
                  os.path.join(out_dir, f"kernel_{name}{'_f64' if dtype == torch.float64 else ''}_rank{rank}.safetensors"))


def run_model(out_dir, rank, size):
    import torch.distributed as dist
    from safetensors.torch import save_file
    from attention_patch import register_ring_attention
    from model import diffusion_loss, sequence_chunk, sequence_positions
    register_ring_attention()
    group = dist.group.WORLD
    for name in MODEL_CASES:
        x, att, masked, t, ratio = model_inputs(name)
        m = tiny_model(name, "ring")
        chunk = lambda a: None if a is None else sequence_chunk(a, rank, size)
        with torch.no_grad():
            logits = m(chunk(x), chunk(att), ratio, torch.Generator().manual_seed(MASK_SEED),
                       position_ids=chunk(sequence_positions(x, att)), sp_group=group)
        xt = x.masked_fill(masked, MASK_ID)
        loss, unweighted, n = diffusion_loss(m, x, xt, masked, t, att, ratio, torch.Generator().manual_seed(MASK_SEED),
                                             sp_group=group)
        (loss * n / masked.sum()).backward()     # this rank's share of the loss of the whole rows
        grads = {}
        for k, p in m.named_parameters():
            dist.all_reduce(p.grad)
            grads["grad." + k] = p.grad
        save_file({"logits": logits, "loss": reduce_loss(loss, n, group).float().reshape(1),
                   "unweighted": reduce_loss(unweighted, n, group).float().reshape(1), **grads},
                  os.path.join(out_dir, f"model_{name}_rank{rank}.safetensors"))


if __name__ == "__main__":
    import torch.distributed as dist
    dist.init_process_group("gloo")
    out_dir, modes = sys.argv[1], sys.argv[2:]
    rank, size = dist.get_rank(), dist.get_world_size()
    if "kernel" in modes:
        run_kernel(out_dir, rank, size)
    if "model" in modes:
        run_model(out_dir, rank, size)
    dist.barrier()
    dist.destroy_process_group()

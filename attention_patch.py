"""
Everything about attention for diffusion LMs adapted from causal LMs.

    from attention_patch import make_bidirectional, anneal_attention_mask, resolve_attn_implementation

- make_bidirectional(model): switch a Hugging Face causal LM to full bidirectional attention
  (config.is_causal = False, which transformers' mask builders honour for every layer).
- anneal_attention_mask(...): the DiffuLLaMA annealing mask, causal OR Bernoulli(ratio) per (i, j),
  in the form the attention implementation wants (eager *adds* its mask: additive float;
  sdpa takes a bool mask).
- resolve_attn_implementation(name): flash_attention_2 when flash-attn is importable and a GPU is
  present, else a warning and the SDPA fallback. flash-attn runs bidirectional with causal=False
  (we pass is_causal=False in every forward); it cannot take an arbitrary 4D mask, so annealing
  needs sdpa or eager.
- register_attention_kernel(name, fn, mask_fn): the one place a custom kernel (ring attention for
  sequence parallelism) is plugged into transformers' AttentionInterface, with its mask builder.

Nothing here forks a modeling file or replaces a forward: transformers' own model classes run as
they are.
"""
import importlib.util
import warnings

import torch

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def flash_attn_available():
    """True when the optional flash-attn package is installed and CUDA is usable (import is lazy)."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(name, device="cpu"):
    """Validate --attn_implementation; fall back from flash_attention_2 to sdpa where it cannot run."""
    if name is None:
        return "sdpa"
    if name not in ATTN_IMPLEMENTATIONS and name not in _registered_kernels:
        raise ValueError(f"--attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS + tuple(_registered_kernels))}, got {name!r}")
    if name == "flash_attention_2" and (not flash_attn_available() or str(device).startswith("cpu")):
        warnings.warn("flash_attention_2 needs the flash-attn package and a CUDA device "
                      "(pip install -r requirements-gpu.txt --no-build-isolation); falling back to sdpa")
        return "sdpa"
    return name


def make_bidirectional(model):
    """Turn a causal LM into a bidirectional one: transformers builds a bidirectional (padding-only)
    mask for every layer when config.is_causal is False. Returns the model."""
    model.config.is_causal = False
    return model


def anneal_attention_mask(seq_len, ratio, attention_mask=None, batch_size=1, attn_implementation="sdpa",
                          dtype=torch.float32, device="cpu", generator=None):
    """The attention-mask annealing of DiffuLLaMA: key j is visible from query i when j <= i
    (causal) or with probability `ratio` otherwise. ratio 0 is exactly the causal model, ratio 1
    fully bidirectional. `attention_mask` [B, L] (1 = real token) also hides padded keys.
    Returns [B, 1, L, L]: bool (True = attend) for sdpa, additive float (0 / finfo.min) for eager.
    Every query also attends to itself, so a padded row is never empty (no NaN)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"annealing ratio must be in [0, 1], got {ratio}")
    if attn_implementation == "flash_attention_2":
        raise ValueError("flash_attention_2 cannot take an annealing mask: use --attn_implementation sdpa "
                         "or eager while annealing (or --anneal_steps 0)")
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if ratio > 0:
        random = torch.rand(seq_len, seq_len, device=device, generator=generator) < ratio
        causal = causal | random
    mask = causal[None, None].expand(batch_size, 1, seq_len, seq_len)
    if attention_mask is not None:
        eye = torch.eye(seq_len, dtype=torch.bool, device=device)
        mask = (mask & attention_mask.bool()[:, None, None, :]) | eye
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def anneal_ratio(step, anneal_steps):
    """Linear schedule of the annealing ratio: 0 (causal) at step 0 to 1 (bidirectional) at
    `anneal_steps`; anneal_steps <= 0 means bidirectional from the start."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, step / anneal_steps)


_registered_kernels = {}


def register_attention_kernel(name, fn, mask_fn=None):
    """Plug a custom attention function into transformers under `name`, so that
    `attn_implementation=name` uses it. A custom kernel receives no padding mask unless a mask builder
    is registered beside it: `mask_fn` defaults to the sdpa mask builder (bool masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_fn or sdpa_mask)
    _registered_kernels[name] = fn

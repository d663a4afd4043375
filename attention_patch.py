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
- ring_attention(q, k, v, group, key_padding, anneal): exact attention of a sequence split in
  contiguous chunks over a process group (K/V tiles round the ring, log-sum-exp merge, a backward that
  sends the dK/dV accumulators round); `attn_implementation="ring"` (resolve_attn_implementation
  registers it) runs it inside the transformers model classes. Used by train_adapt.py --sp_size:

      torchrun --nproc_per_node=4 train_adapt.py --sp_size 4 --seq_len 4096 --batch_size 1

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
    if name == RING:
        return register_ring_attention()
    if name not in ATTN_IMPLEMENTATIONS and name not in _registered_kernels:
        raise ValueError(f"--attn_implementation must be one of "
                         f"{', '.join(ATTN_IMPLEMENTATIONS + (RING,) + tuple(k for k in _registered_kernels if k != RING))}, got {name!r}")
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


# splitmix64 constants as signed int64 (torch integer arithmetic wraps around)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_COL = 0xD6E8FEB86659FD93 - (1 << 64)


def _srl(z, s):
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mask_uniform(seed, rows, cols):
    """U[0, 1) numbers for every (row, col) pair: a splitmix64 hash of (seed, i, j). Any tile of the
    [L, L] matrix is computed on its own, so each rank of a ring builds only the rows it owns."""
    z = rows.long()[:, None] * _GOLDEN + cols.long()[None, :] * _COL + int(seed)
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 40).float() * (1.0 / (1 << 24))     # the top 24 bits, exact in float32


def draw_mask_seed(generator=None, device="cpu"):
    """The one number an annealing mask is made of, drawn from the (shared) noise generator."""
    device = generator.device if generator is not None else device
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=device).item())


def anneal_tile(seed, ratio, rows, cols):
    """Rows x cols tile of the annealing mask (True = attend): key j is visible from query i when
    j <= i or when mask_uniform(seed, i, j) < ratio."""
    causal = cols[None, :] <= rows[:, None]
    if ratio <= 0:
        return causal
    return causal | (mask_uniform(seed, rows, cols) < ratio)


def anneal_attention_mask(seq_len, ratio, attention_mask=None, batch_size=1, attn_implementation="sdpa",
                          dtype=torch.float32, device="cpu", generator=None):
    """The attention-mask annealing of DiffuLLaMA: key j is visible from query i when j <= i
    (causal) or with probability `ratio` otherwise. ratio 0 is exactly the causal model, ratio 1
    fully bidirectional. `attention_mask` [B, L] (1 = real token) also hides padded keys.
    Returns [B, 1, L, L]: bool (True = attend) for sdpa, additive float (0 / finfo.min) for eager.
    Every query also attends to itself, so a padded row is never empty (no NaN).
    The random part is one seed drawn from `generator` and hashed per (i, j) (`anneal_tile`), so ring
    attention builds any tile of the same mask on any rank without the rest of it."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"annealing ratio must be in [0, 1], got {ratio}")
    if attn_implementation == "flash_attention_2":
        raise ValueError("flash_attention_2 cannot take an annealing mask: use --attn_implementation sdpa "
                         "or eager while annealing (or --anneal_steps 0)")
    seed = draw_mask_seed(generator, device) if ratio > 0 else 0
    pos = torch.arange(seq_len, device=device)
    mask = anneal_tile(seed, ratio, pos, pos)[None, None].expand(batch_size, 1, seq_len, seq_len)
    return kernel_mask(mask, attn_implementation, dtype, attention_mask)


def kernel_mask(mask, attn_implementation, dtype, real_keys=None):
    """A bool 4D mask [B, 1, Q, K] (True = attend) in the form the attention implementation takes: eager *adds*
    its mask (additive float: 0 / finfo(dtype).min), sdpa takes the bool mask as it is. `real_keys` [B, K]
    (1 = real token) hides the padded keys; each query still sees its own key (the last Q keys are the
    queries' own, after any cached ones), so a padded row is never empty (no NaN)."""
    if real_keys is not None:
        mask = mask & real_keys.bool()[:, None, None, :]
        mask[..., -mask.shape[-2]:].diagonal(dim1=-2, dim2=-1).fill_(True)
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
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


# -----------------------------------------------------------------------------
# ring attention: exact attention over a sequence split in contiguous chunks across a process group
#
# Each rank holds the queries, keys and values of its own chunk. The K/V chunks travel round the ring
# (rank r sends to r+1 and receives from r-1, batch_isend_irecv, the next transfer overlapping the current
# tile's compute); each rank merges its partial outputs through their log-sum-exp. The backward runs the
# K/V round once more, and the dK/dV accumulators travel with their chunk until, after a full turn, they
# reach the rank that owns it. The masks are built per tile from global indices: the key padding of a
# chunk travels with it, and the annealing mask comes from a seed (`anneal_tile`), so no rank builds or
# receives more than the [chunk x chunk] tile it is computing.

RING = "ring"
_warned = set()


def group_rank_size(group):
    """(rank, size) in `group`; (0, 1) for None: no sequence parallelism, the chunk is the whole sequence."""
    import torch.distributed as dist
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _ring_pass(send, recv, group, tag):
    """Start sending the tensors `send` to the next rank of the ring and receiving `recv` from the previous."""
    import torch.distributed as dist
    rank, size = group_rank_size(group)
    nxt, prv = dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, prv, group, tag) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(works):
    for w in works:
        w.wait()


def _ring_tile_mask(rows, col0, n_cols, pad, anneal):
    """Bool mask [B|1, 1, rows, n_cols] (True = attend) of the tile whose keys start at global position
    col0, or None when the tile hides nothing. pad [B, n_cols] (1 = real token) is that chunk's key
    padding; anneal = (seed, ratio) or None (bidirectional). The same rule as anneal_attention_mask and
    transformers' bidirectional mask: annealing with padding hides padded keys but keeps the diagonal."""
    cols = torch.arange(col0, col0 + n_cols, device=rows.device)
    mask = None
    if anneal is not None:
        mask = anneal_tile(anneal[0], anneal[1], rows, cols)[None, None]
    if pad is not None:
        keys = pad.bool()[:, None, None, :]
        mask = keys if mask is None else (mask & keys) | (rows[:, None] == cols[None, :])
    if mask is not None and bool(mask.all()):
        return None
    return mask


def _cpu_bias(mask, dtype):
    """The CPU flash kernel's additive mask: 0 where `mask` attends, -inf elsewhere (None: no mask)."""
    return None if mask is None else torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def _acc(x):
    """The accumulation dtype: fp32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _flash_attn_ok(q, mask):
    return q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()


def _tile_forward(q, k, v, mask, scale):
    """Attention of queries q [B, H, Lq, D] over one tile of keys/values k, v [B, Hkv, Lk, D] (Hkv divides
    H: GQA) with its log-sum-exp. Returns out [B, H, Lq, D] (q's dtype) and lse [B, H, Lq] (fp32 or f64): -inf
    (and out 0) for rows the tile hides completely."""
    if _flash_attn_ok(q, mask):   # CUDA, flash-attn installed: its kernel takes [B, L, H, D] and returns the lse
        from flash_attn.flash_attn_interface import flash_attn_func
        out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale,
                                      causal=False, return_attn_probs=True)
        return out.transpose(1, 2), lse[..., :q.shape[2]].float()
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        bias = _cpu_bias(mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                              scale=scale)
        lse = lse.float()
        if mask is not None:   # the CPU kernel reports lse = 0 for a row with no visible key: it is -inf
            empty = ~mask.any(-1)
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty[..., None], 0.0)
        return out, lse
    # the math: scores in fp32 (float64 for float64), explicitly
    g, f = q.shape[1] // k.shape[1], _acc(q)
    s = q.to(f) @ k.to(f).repeat_interleave(g, 1).transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
    return (p @ v.to(f).repeat_interleave(g, 1)).to(q.dtype), lse


def _tile_backward(dout, q, k, v, out, lse, mask, scale):
    """dq, dk, dv of one tile, given the MERGED output and log-sum-exp of the rows: the softmax of the
    tile is then exp(scores - lse), its share of the whole row. dk, dv have k's heads (GQA summed)."""
    if _flash_attn_ok(q, mask):
        from flash_attn.flash_attn_interface import _flash_attn_backward
        import inspect
        t = lambda x: x.transpose(1, 2)
        dq, dk, dv = (torch.empty(t(x).shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        params = inspect.signature(_flash_attn_backward).parameters
        kw = dict(dropout_p=0.0, softmax_scale=scale, causal=False, alibi_slopes=None, deterministic=False)
        if "window_size_left" in params:
            kw.update(window_size_left=-1, window_size_right=-1)
        else:
            kw["window_size"] = (-1, -1)
        if "softcap" in params:
            kw["softcap"] = 0.0
        _flash_attn_backward(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(), dq, dk, dv, **kw)
        return t(dq), t(dk), t(dv)
    # rows that see no key anywhere have lse = -inf: +inf makes their softmax exp(-inf - inf) = 0
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        bias = _cpu_bias(mask, q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)
    g, f = q.shape[1] // k.shape[1], _acc(q)
    qf, kf, vf, do = q.to(f), k.to(f).repeat_interleave(g, 1), v.to(f).repeat_interleave(g, 1), dout.to(f)
    s = qf @ kf.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - lse[..., None])
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vf.transpose(-1, -2) - (do * out.to(f)).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    fold = lambda x: x.unflatten(1, (k.shape[1], g)).sum(2)
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def _merge(out, lse, out_b, lse_b):
    """Merge a tile's partial attention into the running one through their log-sum-exps."""
    new = torch.logaddexp(lse, lse_b)
    safe = new.masked_fill(torch.isneginf(new), 0.0)   # rows that saw nothing yet stay 0
    out = out * torch.exp(lse - safe)[..., None] + out_b.to(out.dtype) * torch.exp(lse_b - safe)[..., None]
    return out, new


class _RingAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, pad, group, anneal, scale):
        rank, size = group_rank_size(group)
        n = q.shape[2]
        rows = torch.arange(rank * n, (rank + 1) * n, device=q.device)
        out = torch.zeros(q.shape, dtype=_acc(q), device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=_acc(q), device=q.device)
        chunk = [k, v] + ([pad] if pad is not None else [])
        for step in range(size):
            if step < size - 1:   # the next chunk travels while this one is computed
                incoming = [torch.empty_like(t) for t in chunk]
                works = _ring_pass(chunk, incoming, group, tag=0)
            src = (rank - step) % size
            mask = _ring_tile_mask(rows, src * n, n, chunk[2] if pad is not None else None, anneal)
            out_b, lse_b = _tile_forward(q, chunk[0], chunk[1], mask, scale)
            out, lse = _merge(out, lse, out_b, lse_b)
            if step < size - 1:
                _wait(works)
                chunk = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, pad)
        ctx.group, ctx.anneal, ctx.scale = group, anneal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, pad = ctx.saved_tensors
        group, anneal, scale = ctx.group, ctx.anneal, ctx.scale
        rank, size = group_rank_size(group)
        n = q.shape[2]
        dout = dout.contiguous()
        rows = torch.arange(rank * n, (rank + 1) * n, device=q.device)
        dq = torch.zeros(q.shape, dtype=_acc(q), device=q.device)
        chunk = [k, v] + ([pad] if pad is not None else [])
        acc, acc_works = None, None
        for step in range(size):
            if step < size - 1:
                incoming = [torch.empty_like(t) for t in chunk]
                works = _ring_pass(chunk, incoming, group, tag=1)
            src = (rank - step) % size
            mask = _ring_tile_mask(rows, src * n, n, chunk[2] if pad is not None else None, anneal)
            dq_b, dk_b, dv_b = _tile_backward(dout, q, chunk[0], chunk[1], out, lse, mask, scale)
            dq += dq_b
            # the dK/dV accumulator of chunk `src` arrives from the rank that held it one step earlier
            if acc_works is not None:
                _wait(acc_works)
                acc = [(acc_in[0] + dk_b).contiguous(), (acc_in[1] + dv_b).contiguous()]
            else:
                acc = [dk_b.to(_acc(k)).contiguous(), dv_b.to(_acc(k)).contiguous()]
            if size > 1:   # pass it on; after the last step it goes home to its owner
                acc_in = [torch.empty_like(a) for a in acc]
                acc_works = _ring_pass(acc, acc_in, group, tag=2)
            if step < size - 1:
                _wait(works)
                chunk = incoming
        if size > 1:
            _wait(acc_works)
            acc = acc_in
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None, None, None


def ring_attention(q, k, v, group=None, key_padding=None, anneal=None, scale=None):
    """Exact attention of a sequence split in equal contiguous chunks over `group` (rank r of the group
    holds positions [r*n, (r+1)*n)). q [B, H, n, D], k, v [B, Hkv, n, D] (GQA when Hkv < H): this rank's
    chunk. key_padding [B, n] (1 = real token) or None; anneal (seed, ratio) (the annealing mask of
    `anneal_tile`) or None for bidirectional. Returns [B, H, n, D]; differentiable (dq, dk, dv). Every
    rank of the group must call it with the same shapes (a collective). group=None: plain attention over
    this one chunk (no ring)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"ring attention needs queries and keys of the same chunk, got {q.shape[2]} and {k.shape[2]} positions")
    if key_padding is not None:
        key_padding = key_padding.to(torch.uint8).contiguous()
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), key_padding, group, anneal, scale)


def ring_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sp_group=None,
                           anneal=None, **kwargs):
    """The transformers attention function of `attn_implementation="ring"`. The model call on each rank
    gets its own chunk (input_ids, attention_mask, global position_ids) and, as keyword arguments passed
    through to here, `sp_group` (the sequence-parallel group) and `anneal` ((seed, ratio) or None);
    DiscreteDiffusionModel.forward passes both. attention_mask is the chunk's 2-D key padding
    (ring_padding_mask passes it through). Attention dropout is not applied (warned once)."""
    if dropout and "dropout" not in _warned:
        _warned.add("dropout")
        warnings.warn(f"ring attention applies no attention dropout (the model asks for p={dropout}); "
                      "the other dropouts apply")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("ring attention takes the 2-D key padding mask of its chunk; annealing goes through "
                         "DiscreteDiffusionModel.forward (attn_mask_ratio), not a 4-D mask")
    out = ring_attention(query, key, value, sp_group, attention_mask, anneal, scaling)
    return out.transpose(1, 2).contiguous(), None


def ring_padding_mask(batch_size, q_length=None, kv_length=None, attention_mask=None, **kwargs):
    """Mask builder registered with the ring kernel: it hands the kernel the chunk's 2-D key padding
    mask as it is (or None); the kernel builds each tile's mask itself."""
    return attention_mask


def register_ring_attention():
    """Make `attn_implementation="ring"` available to transformers (idempotent)."""
    if RING not in _registered_kernels:
        register_attention_kernel(RING, ring_attention_forward, ring_padding_mask)
    return RING

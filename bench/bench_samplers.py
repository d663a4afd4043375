"""
Sampler speed: tokens per second of each diffusion sampler beside the AR model's own greedy
`generate` with KV cache, on the same weights.

    python bench/bench_samplers.py                       # embedded model, 256 new tokens, 64 steps, batch 1
    python bench/bench_samplers.py --model_name out/adapt --gen_len 256 --diffusion_steps 64 --device cuda

The diffusion figures do not depend on whether the model was adapted (same compute per step).
Prints a markdown table.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import DTYPES, DiscreteDiffusionModel, build_inputs, default_device, default_dtype, sample  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model_name", default="smollm2-135m")
p.add_argument("--prompt", default="ROMEO: What light through yonder window breaks?")
p.add_argument("--gen_len", type=int, default=256)
p.add_argument("--diffusion_steps", type=int, default=64)
p.add_argument("--block_length", type=int, default=32)
p.add_argument("--repeats", type=int, default=2)
p.add_argument("--device", default=default_device())
p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
p.add_argument("--attn_implementation", default="sdpa")
args = p.parse_args()
dtype = args.dtype or default_dtype(args.device)

model = DiscreteDiffusionModel.from_pretrained(args.model_name, dtype=dtype, device=args.device,
                                               attn_implementation=args.attn_implementation).eval()
batch = build_inputs(model.tokenizer, [args.prompt], args.gen_len, mask_token_id=model.mask_token_id)


def timed(fn, warmup):
    warmup()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


rows = []
for name in ("diffullama", "low_confidence", "random"):
    run = lambda steps: sample(model, batch, name, steps, block_length=args.block_length,  # noqa: E731
                               generator=torch.Generator(args.device).manual_seed(0))
    secs = timed(lambda: run(args.diffusion_steps), lambda: run(args.gen_len // args.block_length))
    rows.append((f"{name} ({args.diffusion_steps} steps" + (f", blocks of {args.block_length})" if name != "diffullama" else ")"), secs))

# the AR model's own greedy decoding with KV cache, on the same weights and causal attention
hf = model.model
hf.config.is_causal = True
ids = batch["input_ids"][:, batch["attention_mask"][0].bool()][:, :int(batch["src_mask"].sum())].to(args.device)
with torch.no_grad():
    gen = lambda n: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,  # noqa: E731
                                pad_token_id=model.tokenizer.eos_token_id)
    secs = timed(lambda: gen(args.gen_len), lambda: gen(8))
rows.append(("AR greedy generate, KV cache", secs))
hf.config.is_causal = False

print(f"\n{args.model_name}, {args.gen_len} new tokens, batch 1, {args.device} ({torch.get_num_threads()} threads), {dtype}\n")
print("| sampler | seconds | tokens/s |\n|---|---|---|")
for name, secs in rows:
    print(f"| {name} | {secs:.2f} | {args.gen_len / secs:.1f} |")

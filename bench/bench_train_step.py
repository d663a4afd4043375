"""
Cost of a diffusion training step vs a plain causal-LM step on the same model and batch.

    python bench/bench_train_step.py                          # smollm2-135m, CPU, 4 x 256 tokens
    python bench/bench_train_step.py --model_name gpt2 --batch_size 8 --seq_len 512 --steps 10

A step is forward + backward + gradient clipping + fused AdamW step, as train_adapt.py runs it:
- causal: the HF causal LM with labels (logits and loss on every position);
- diffusion: corrupt the batch (t ~ U(eps, 1), masks), model.forward with target_mask (the LM head
  runs on the masked positions only), the 1/t-weighted loss, bidirectional attention;
- diffusion-anneal: the same during attention annealing (ratio 0.5: a random [B, 1, L, L] mask).
Each mode runs in its own process (clean peak memory); the modes alternate for --rounds rounds and
the median step time over all rounds is reported, with tokens/s and peak RSS, as a markdown table.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("causal", "diffusion", "diffusion-anneal")


def run_mode(args):
    import torch
    from model import DiscreteDiffusionModel, corrupt, diffusion_loss, maskable_positions, resolve_model_path
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model_name)
    if args.mode == "causal":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        vocab = model.config.vocab_size
    else:
        model = DiscreteDiffusionModel.from_pretrained(args.model_name, dtype=torch.float32, attn_implementation="sdpa")
        vocab = model.config.vocab_size
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # as train_adapt.py
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, min(vocab, 30000), (args.batch_size, args.seq_len), generator=g)
    ratio = 0.5 if args.mode == "diffusion-anneal" else 1.0
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        if args.mode == "causal":
            loss = model(input_ids=x, labels=x).loss
        else:
            maskable = maskable_positions(x, shift=model.shift)
            xt, masked, t = corrupt(x, maskable, model.mask_token_id, g)
            loss, _, _ = diffusion_loss(model, x, xt, masked, t, attn_mask_ratio=ratio, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"mode": args.mode, "times": times, "peak_rss_mib": rss}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = p.parse_args()
    if args.mode:
        return run_mode(args)
    modes = args.modes.split(",")
    results = {m: {"times": [], "rss": 0.0} for m in modes}
    for r in range(args.rounds):
        for m in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", m] + [
                f"--{k}={getattr(args, k)}" for k in ("model_name", "batch_size", "seq_len", "steps", "warmup", "threads")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            results[m]["times"] += res["times"]
            results[m]["rss"] = max(results[m]["rss"], res["peak_rss_mib"])
            print(f"round {r + 1}/{args.rounds} {m}: median {statistics.median(res['times']):.3f} s/step", file=sys.stderr)
    tokens = args.batch_size * args.seq_len
    base = statistics.median(results[modes[0]]["times"])
    import torch
    print(f"\n{args.model_name}, batch {args.batch_size} x {args.seq_len} tokens, fp32, CPU "
          f"({torch.get_num_threads()} threads, torch {torch.__version__}), median of "
          f"{args.rounds * args.steps} steps\n")
    print(f"| step | s/step | tokens/s | vs {modes[0]} | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for m in modes:
        med = statistics.median(results[m]["times"])
        print(f"| {m} | {med:.3f} | {tokens / med:,.0f} | {med / base:.3f}x | {results[m]['rss']:,.0f} |")


if __name__ == "__main__":
    main()

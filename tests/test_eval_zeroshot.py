"""eval_zeroshot.py: readers and scorers on fixture files, --ar against a hand computation, padding,
every task end to end, bad input, and the lm-eval adapter against the script's own numbers; ARC keys,
WikiText articles, windows and perplexities (AR by hand, the diffusion bound as elbo_loglik's sum),
batched scoring against one example at a time, and the first records of each real file in shared/data."""
import csv
import math
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import save_tiny_ar
from model import DiscreteDiffusionModel, SamplerSettings
import eval_zeroshot as ez

HERE = os.path.dirname(os.path.abspath(__file__))

LAMBADA = ["the king said to his queen", "my lord is good and you are not", "o sir come here with me now",
           "the queen was in love with the night", "good day to you my lord"]
RECORDS = {
    "hellaswag": [{"activity_label": "the king", "ctx_a": "the queen said", "ctx_b": "to the king",
                   "endings": ["my lord", "good night", "come here", "and so"], "label": "2"},
                  {"activity_label": "love", "ctx_a": "the man", "ctx_b": "was good",
                   "endings": ["with her", "and the day", "to me", "not"], "label": 0}],
    "piqa": [{"goal": "how to say good night", "sol1": "say good night", "sol2": "say good day", "label": 0},
             {"goal": "what is the king", "sol1": "a man", "sol2": "a night", "label": 1},
             {"goal": "who is my lord", "sol1": "the king", "sol2": "the day", "label": 0}],
    "siqa": [{"context": "the king said good night", "question": "what will the queen do",
              "answerA": "say good night", "answerB": "come here", "answerC": "love the day", "label": "1"}],
    "winogrande": [{"sentence": "the king said to the queen that _ was good", "option1": "you", "option2": "we",
                    "answer": "2"}],
    "rocstories": [{"storyid": "a", "sentence1": "the king was good", "sentence2": "the queen was good",
                    "sentence3": "the man said good day", "sentence4": "the king said good night",
                    "sentence5": "and so the day was good"}],
    "triviaqa": [{"question": "who is the king", "answer": {"value": "my lord", "aliases": ["the lord", "lord"]}},
                 {"question": "what is good", "answer": ["love"]}],
    "gsm8k": [{"instruction": "what is the day", "output": "<<1+1=2>> #### 2"},
              {"instruction": "how is the king", "output": "#### 1,000"}],
    "arc_easy": [{"question": "who is the king", "choices": {"text": ["my lord", "the night", "a day", "her"],
                                                             "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
                 {"question": "what is good", "choices": {"text": ["love", "night", "the man"], "label": ["1", "2", "3"]},
                  "answerKey": "3"}],
    "arc_challenge": [{"question": "when is the night", "choices": {"text": ["now", "then", "here", "there", "so"],
                                                                    "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"}],
}
# WikiText raw text: articles start at a top-level heading; " = = ... = = " is a section inside one
WIKITEXT = (" = The King = \n\n the king said good night to the queen . \n\n = = Love = = \n\n"
            " and so the day was good \n\n = My Lord = \n\n my lord is good and you are not \n")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    ar = save_tiny_ar(d / "ar", "llama", max_pos=64)
    m = DiscreteDiffusionModel.from_pretrained(ar)
    m.save_pretrained(d / "dlm")
    return {"ar": ar, "dlm": str(d / "dlm")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "lambada_test.txt").write_text("\n".join(LAMBADA) + "\n")
    for task, recs in RECORDS.items():
        write_jsonl(d / f"{task}.jsonl", recs)
    (d / "wikitext2_test.txt").write_text(WIKITEXT)
    return str(d)


def scorer(path, **kw):
    kw.setdefault("mc_num", 8)
    sampler = {k: kw.pop(k) for k in list(kw) if k in SamplerSettings.__dataclass_fields__}
    settings = SamplerSettings(**{**ez.EVAL_SAMPLER, **sampler}) if sampler else None
    return ez.Scorer(path, device="cpu", dtype="float32", settings=settings, **kw)


# -- readers and scorers -------------------------------------------------------------------------------

def test_read_every_format(tmp_path):
    recs = [{"goal": "a", "sol1": "b", "sol2": "c", "label": "1"}, {"goal": "d", "sol1": "e", "sol2": "f", "label": "0"}]
    write_jsonl(tmp_path / "x.jsonl", recs)
    (tmp_path / "x.json").write_text(json.dumps(recs))
    (tmp_path / "y.json").write_text(json.dumps({"data": recs}))
    with open(tmp_path / "x.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    for name in ("x.jsonl", "x.json", "y.json", "x.csv"):
        got = ez.read_records(str(tmp_path / name))
        assert [ez.make_example("piqa", r, name, i)["gold"] for i, r in enumerate(got, 1)] == [1, 0]
    (tmp_path / "l.txt").write_text("one two three\n\nfour five\n")
    assert ez.read_records(str(tmp_path / "l.txt")) == [{"text": "one two three"}, {"text": "four five"}]


def test_reader_errors_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ez.DataError, match=r"bad.jsonl line 2: not valid JSON"):
        ez.read_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(ez.DataError, match=r"bad.json line 2"):
        ez.read_records(str(tmp_path / "bad.json"))
    with pytest.raises(ez.DataError, match=r"f.jsonl record 3: missing field 'sol2'"):
        ez.make_example("piqa", {"goal": "a", "sol1": "b", "label": 0}, "f.jsonl", 3)
    with pytest.raises(ez.DataError, match=r"answer index 5 outside the 2 choices"):
        ez.make_example("piqa", {"goal": "a", "sol1": "b", "sol2": "c", "label": 5}, "f.jsonl", 1)
    with pytest.raises(ez.DataError, match=r"has no '#### <number>'"):
        ez.make_example("gsm8k", {"instruction": "q", "output": "4"}, "g.json", 1)


def test_task_examples():
    ex = ez.make_example("lambada", {"text": "in the end he said goodbye "}, "f", 1)
    assert (ex["context"], ex["target"], ex["word"]) == ("in the end he said", " goodbye", "goodbye")
    ex = ez.make_example("hellaswag", RECORDS["hellaswag"][0], "f", 1)
    assert ex["gold"] == 2 and ex["pairs"][0] == ("the king: the queen said To the king", " my lord")
    ex = ez.make_example("winogrande", RECORDS["winogrande"][0], "f", 1)
    assert ex["pairs"] == [("the king said to the queen that you", " was good"),
                           ("the king said to the queen that we", " was good")] and ex["gold"] == 1
    ex = ez.make_example("siqa", RECORDS["siqa"][0], "f", 1)
    assert ex["gold"] == 0 and ex["pairs"][2][1] == " love the day"
    ex = ez.make_example("rocstories", RECORDS["rocstories"][0], "f", 1)
    assert ex["target"] == " the king said good night" and ex["suffix"] == " and so the day was good"
    assert ex["prefix"] == "the king was good the queen was good the man said good day"
    cloze = {"InputSentence1": "a", "InputSentence2": "b", "InputSentence3": "c", "InputSentence4": "d",
             "RandomFifthSentenceQuiz1": "x", "RandomFifthSentenceQuiz2": "y", "AnswerRightEnding": "2"}
    ex = ez.make_example("rocstories", cloze, "f", 1, infill_sentence=3)
    assert (ex["prefix"], ex["target"], ex["suffix"]) == ("a b", " c", " d y")
    ex = ez.make_example("triviaqa", RECORDS["triviaqa"][0], "f", 1)
    assert ex["answers"] == ["my lord", "the lord", "lord"]
    assert ez.make_example("gsm8k", RECORDS["gsm8k"][1], "f", 1)["answer"] == "1000"


def test_metric_functions():
    assert ez.gsm8k_number("so <<2*3=6>> #### 6") == "6"
    assert ez.gsm8k_number("#### $1,234.0 dollars") == "1234"
    assert ez.gsm8k_number("#### -3.5") == "-3.5"
    assert ez.gsm8k_number("the answer is 6") is None
    assert ez.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert ez.normalize_answer("an Apple a day") == "apple day"
    # ROUGE on known strings: 5 and 6 tokens, 4 unigrams and 1 bigram ("the cat") shared, LCS "the cat on mat" = 4
    pred, ref = "the cat sat on mat", "The cat was on the mat"
    assert ez.rouge_n(pred, ref, 1) == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    assert ez.rouge_n(pred, ref, 2) == pytest.approx(2 * (1 / 4) * (1 / 5) / (1 / 4 + 1 / 5))
    assert ez.rouge_l(pred, ref) == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    assert ez.rouge_n("a b", "c d", 1) == 0.0 and ez.rouge_l("", "a") == 0.0
    assert ez.mean_stderr([1.0, 0.0, 1.0, 0.0]) == (0.5, pytest.approx((1 / 3) ** 0.5 / 2))


# -- AR against a hand computation, padding ----------------------------------------------------------------

def test_ar_matches_hand_computation(models):
    s = scorer(models["ar"], ar=True)
    ref = AutoModelForCausalLM.from_pretrained(models["ar"]).eval()
    cases = [("the king said to", " his queen"), ("o my lord", " good night to you"), ("a", " man")]
    pairs = [s.encode_pair(c, t) for c, t in cases]
    got = s.loglik(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ids = ctx + cont
        hand, hand_greedy = 0.0, True
        with torch.no_grad():
            for j in range(len(ctx), len(ids)):
                logits = ref(torch.tensor([ids[:j]])).logits[0, -1]
                hand += float(F.log_softmax(logits.double(), -1)[ids[j]])
                hand_greedy &= int(logits.argmax()) == ids[j]
        assert ll == pytest.approx(hand, abs=1e-4) and greedy == hand_greedy
    # greedy last word of a LAMBADA line, by hand
    ctx, tgt = s.encode_pair("the king said to his", " queen good")
    ids = list(ctx)
    with torch.no_grad():
        for _ in tgt:
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    rows = [(ctx, len(tgt), []), (s.encode_pair("o", "")[0], 1, [])]
    assert s.generate(rows)[0] == ids[len(ctx):]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ar_choices_sharing_a_context_are_the_hand_computation(tmp_path, arch):
    """The AR scorer runs a shared context once and its choices from its keys and values: each score is
    still that of the whole sequence alone (GPT-2: absolute positions after a left-padded context)."""
    path = save_tiny_ar(tmp_path / arch, arch, max_pos=64)
    s = scorer(path, ar=True, batch_size=5)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    cases = [("the king said to", c) for c in (" his queen", " me", " the man and his lord", "")] + \
            [("o", c) for c in (" my lord is good", " sir")] + [("a man and a day", " good night")]
    pairs = [s.encode_pair(c, t) for c, t in cases]
    for (ctx, cont), (ll, greedy) in zip(pairs, s.loglik(pairs)):
        with torch.no_grad():
            logits = ref(torch.tensor([ctx + cont])).logits[0].double()
        lp = F.log_softmax(logits, -1)
        want = sum(float(lp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logits[len(ctx) + j - 1].argmax()) == t for j, t in enumerate(cont))


def test_ar_flag_scores_the_parent(models):
    assert ez.ar_parent(models["dlm"]) == os.path.abspath(models["ar"])
    assert ez.ar_parent(models["ar"]) == models["ar"]


def test_ar_parent_of_a_fine_tuned_checkpoint(models, tmp_path):
    """A fine-tuning run started from a diffusion checkpoint: --ar follows it back to the AR model."""
    import json
    sft = tmp_path / "sft"
    m = DiscreteDiffusionModel.from_pretrained(models["dlm"])
    m.model.config.adapted_from = None
    m.save_pretrained(sft / "final")
    (sft / "args.json").write_text(json.dumps({"model_name": models["dlm"]}))
    assert ez.ar_parent(str(sft / "final")) == os.path.abspath(models["ar"])
    assert scorer(models["dlm"], ar=True).model_name == os.path.abspath(models["ar"])


@pytest.mark.parametrize("ar", [False, True])
def test_padded_batch_gives_the_same_scores(models, ar):
    pairs_txt = [("the king said to", " his queen"), ("o", " my lord is good"), ("a man", " and")]
    wide, narrow = scorer(models["dlm"], ar=ar, batch_size=64), scorer(models["dlm"], ar=ar, batch_size=1)
    pairs = [wide.encode_pair(c, t) for c, t in pairs_txt]
    for (a, _), (b, _) in zip(wide.loglik(pairs), narrow.loglik(pairs)):
        assert a == pytest.approx(b, abs=1e-4)
    rows = [(p[0], 3, []) for p in pairs] + [(pairs[0][0], 2, wide.encode(" good night"))]
    assert wide.generate(rows) == narrow.generate(rows)


@pytest.mark.parametrize("kw", [dict(sampler="diffullama", diffusion_steps=4), dict(sampler="random", temperature=1.0),
                                dict(sampler="threshold", temperature=1.0, threshold=0.02, block_length=2)])
def test_sampled_spans_do_not_depend_on_the_batch(models, kw):
    """Sampling samplers: each row draws from its own generator, so batch size and order change nothing."""
    s = scorer(models["dlm"], batch_size=64, **kw)
    rows = [(s.encode_pair(c, "")[0], n, []) for c, n in [("the king said to", 5), ("o", 5), ("a man", 3), ("the", 5)]]
    wide = s.generate(rows)
    assert wide == scorer(models["dlm"], batch_size=1, **kw).generate(rows)
    assert wide[::-1] == s.generate(rows[::-1])
    assert wide != scorer(models["dlm"], batch_size=64, seed=1, **kw).generate(rows)


def test_diffusion_greedy_flag_is_the_greedy_sampler(models):
    s = scorer(models["dlm"])
    ctx = s.encode_pair("the king said", "")[0]
    filled = s.generate([(ctx, 2, [])])[0]
    assert s.loglik([(ctx, filled)], greedy=True)[0][1] is True
    other = [w for w in s.encode(" good night") if w not in filled][:2]
    assert s.loglik([(ctx, other + filled[len(other):])], greedy=True)[0][1] is False


def test_block_sampler_takes_the_models_block_size(models, tmp_path, monkeypatch):
    """--sampler block without --block_length denoises in the blocks the model was trained with (config.block_size)."""
    import model
    m = DiscreteDiffusionModel.from_pretrained(models["dlm"])
    m.config.block_size = 2
    m.save_pretrained(tmp_path / "blk")
    seen, real = [], model.generate_block
    monkeypatch.setattr(model, "generate_block", lambda *a, **k: seen.append(k["block_length"]) or real(*a, **k))
    s = scorer(str(tmp_path / "blk"), sampler="block")
    ctx = s.encode_pair("the king said", "")[0]
    default = s.generate([(ctx, 6, [])])
    assert seen == [2]
    assert default == scorer(str(tmp_path / "blk"), sampler="block", block_length=2).generate([(ctx, 6, [])])


def sampler_modes():
    from model import CACHE_MODES, SAMPLERS, check_sampler_settings
    modes = []
    for sampler in SAMPLERS:
        for cache in CACHE_MODES:
            try:
                check_sampler_settings(SamplerSettings(sampler, cache=cache))
                modes.append((sampler, cache))
            except ValueError:
                pass
    return modes


@pytest.mark.parametrize("sampler, cache", sampler_modes())
def test_every_sampler_and_cache_is_reachable_from_the_command_line(models, data_dir, sampler, cache, monkeypatch, tmp_path):
    import model
    name = models["dlm"]
    if sampler == "spec":   # self-speculative decoding needs a causal clean half (train_sft.py --ar_weight)
        m = DiscreteDiffusionModel.from_pretrained(name)
        m.config.causal_clean = True
        m.save_pretrained(tmp_path / "spec")
        name = str(tmp_path / "spec")
    seen, refreshed = [], []
    real_sample, real_refresh = ez.sample, model.refresh_cache
    monkeypatch.setattr(ez, "sample", lambda m, b, s, **k: seen.append(s) or real_sample(m, b, s, **k))
    monkeypatch.setattr(model, "refresh_cache", lambda *a, **k: refreshed.append(a[4]) or real_refresh(*a, **k))
    res = ez.main(["--model_name", name, "--tasks", "gsm8k", "--data_dir", data_dir, "--gen_len", "4",
                   "--no_progress", "--sampler", sampler, "--cache", cache, "--block_length", "2"])
    assert res["metrics"]["gsm8k"]["n"] == 2
    assert seen and all(s == SamplerSettings(sampler, diffusion_steps=None, block_length=2, cache=cache) for s in seen)
    assert set(refreshed) == ({cache} if cache != "none" else set())


def test_lm_eval_model_args_build_the_sampler_settings(models):
    lm = ez.DiffusionLM(model_name=models["dlm"], mc_num="4", device="cpu", dtype="float32", sampler="threshold",
                        diffusion_steps="8", block_length="2", cache="dual", threshold="0.5")
    assert lm.scorer.settings == SamplerSettings("threshold", 8, block_length=2, cache="dual", threshold=0.5)
    assert ez.DiffusionLM(model_name=models["dlm"], mc_num="4", device="cpu").scorer.settings == \
        SamplerSettings(**ez.EVAL_SAMPLER)
    with pytest.raises(ValueError, match="--cache works with the block samplers"):
        ez.DiffusionLM(model_name=models["dlm"], sampler="diffullama", cache="prefix")


def test_run_folder_is_evaluated_from_its_final_checkpoint(models, data_dir, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(models["dlm"], run / "step_000003")
    shutil.copytree(models["dlm"], run / "final")
    (run / "latest").write_text("step_000003\n")
    (run / "args.json").write_text(json.dumps({"model_name": models["ar"]}))
    lam = os.path.join(data_dir, "lambada_test.txt")
    common = ["--tasks", "lambada", "--data_path", lam, "--no_progress"]
    got = ez.main(["--model_name", str(run)] + common)
    assert got["examples"] == ez.main(["--model_name", models["dlm"]] + common)["examples"]     # the same predictions
    err = capsys.readouterr().err
    assert f"--model_name {run} is a run folder: loading its checkpoint {run / 'final'}" in err
    assert ez.main(["--model_name", str(run), "--ar"] + common)["settings"]["scored_model"] == os.path.abspath(models["ar"])


# -- end to end ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ar", [False, True])
def test_every_task_end_to_end(models, data_dir, tmp_path, ar):
    out = tmp_path / "results.json"
    argv = ["--model_name", models["dlm"], "--tasks", ",".join(ez.TASKS), "--data_dir", data_dir, "--mc_num", "4",
            "--output", str(out), "--no_progress"] + (["--ar"] if ar else [])
    res = ez.main(argv)
    saved = json.loads(out.read_text())
    assert saved["metrics"] == json.loads(json.dumps(res["metrics"]))
    assert saved["settings"]["mode"] == ("ar" if ar else "diffusion")
    m, ex = saved["metrics"], saved["examples"]
    assert m["lambada"]["n"] == 5 and m["lambada"]["acc"]["value"] == sum(r["correct"] for r in ex["lambada"]) / 5
    for task in ("hellaswag", "piqa", "siqa", "winogrande"):
        recs = ex[task]
        assert len(recs) == len(RECORDS[task])
        assert m[task]["acc"]["value"] == pytest.approx(sum(r["pred"] == r["gold"] for r in recs) / len(recs))
        assert all(r["pred"] == max(range(len(r["loglik"])), key=r["loglik"].__getitem__) for r in recs)
    assert "acc_norm" in m["piqa"] and "acc_norm" not in m["winogrande"]
    assert set(m["rocstories"]) >= {"rouge1", "rouge2", "rougeL"}
    for r in ex["rocstories"]:
        assert r["rouge1"] == pytest.approx(100 * ez.rouge_n(r["prediction"], r["target"], 1))
    assert ex["gsm8k"][1]["target"] == "1000"
    assert all(r["correct"] == (r["extracted"] == r["target"]) for r in ex["gsm8k"])
    # running again may replace the script's own results file
    ez.main(argv[:4] + ["--tasks", "lambada", "--data_path", os.path.join(data_dir, "lambada_test.txt"),
                        "--output", str(out), "--no_progress"])


def test_lambada_prediction_is_the_span_length(models, data_dir):
    s = scorer(models["dlm"])
    exs = [ez.make_example("lambada", {"text": t}, "f", 1) for t in LAMBADA]
    metrics, recs = ez.run_task(s, "lambada", exs, progress=False)
    for r, ex in zip(recs, exs):
        assert len(s.encode(r["prediction"])) == len(s.encode(ex["target"]))
        assert r["correct"] == (r["prediction"].strip() == ex["word"])


# -- bad input -------------------------------------------------------------------------------------------

def test_bad_input_is_one_line(models, data_dir, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\nnot json\n')
    (tmp_path / "mine.json").write_text("my notes")
    no_tok = tmp_path / "no_tok"
    AutoModelForCausalLM.from_pretrained(models["ar"]).save_pretrained(no_tok)
    orphan = tmp_path / "orphan"           # a diffusion checkpoint that names no AR parent
    DiscreteDiffusionModel.from_pretrained(models["dlm"]).save_pretrained(orphan)
    cfg = json.loads((orphan / "config.json").read_text())
    del cfg["adapted_from"]
    (orphan / "config.json").write_text(json.dumps(cfg))
    lam = os.path.join(data_dir, "lambada_test.txt")
    cases = [
        (["--tasks", "lambada", "--data_path", lam, "--ar", "--model_name", str(orphan)], "names no AR parent"),
        (["--tasks", "lambada", "--data_path", lam, "--ar", "--adapter_path", str(tmp_path)], "--adapter_path belongs"),
        (["--tasks", "nope", "--data_dir", data_dir], "unknown task 'nope'"),
        (["--tasks", "piqa", "--data_path", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--tasks", "piqa", "--data_path", str(tmp_path / "bad.jsonl")], "bad.jsonl line 2: not valid JSON"),
        (["--tasks", "lambada", "--data_path", lam, "--limit", "0"], "--limit must be >= 1"),
        (["--tasks", "hellaswag", "--data_dir", str(tmp_path)], "pass --data_path FILE"),
        (["--tasks", "lambada,piqa", "--data_path", lam], "--data_path is for one task"),
        (["--tasks", "lambada", "--data_path", lam, "--output", str(tmp_path / "mine.json")], "not overwriting"),
        (["--tasks", "lambada", "--data_path", lam, "--model_name", str(no_tok)], "--mask_token_id"),
        (["--tasks", "lambada", "--data_path", lam, "--model_name", str(tmp_path / "nomodel")], "no such model folder"),
        (["--lm_eval_tasks", "nope", "--lm_eval_include", str(tmp_path)], "unknown task(s) nope"),
    ]
    for argv, msg in cases:
        if "--model_name" not in argv:
            argv = argv + ["--model_name", models["dlm"]]
        with pytest.raises(SystemExit) as e:
            ez.main(argv + ["--no_progress"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1] and "Traceback" not in "\n".join(err), (argv, err)
    assert (tmp_path / "mine.json").read_text() == "my notes"


def test_download_fallback_uses_datasets(monkeypatch):
    import types
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: [{"goal": "a", "sol1": "b", "sol2": "c", "label": 1}])
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    recs, src = ez.load_task_records("piqa", download=True)
    assert src == "hf:ybisk/piqa" and recs[0]["label"] == 1
    with pytest.raises(ez.DataError, match="--download"):
        ez.load_task_records("piqa")


# -- lm-eval ---------------------------------------------------------------------------------------------

def lm_eval_tasks(tmp_path, data_dir):
    """The shipped task YAMLs with their data files made absolute."""
    d = tmp_path / "tasks"
    d.mkdir()
    write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in LAMBADA])
    files = {"DATA_PIQA": os.path.join(data_dir, "piqa.jsonl"), "DATA_LAMBADA": str(tmp_path / "lambada.jsonl"),
             "DATA_ARC": os.path.join(data_dir, "arc_easy.jsonl")}
    for name in os.listdir(os.path.join(HERE, "lm_eval_tasks")):
        text = open(os.path.join(HERE, "lm_eval_tasks", name)).read()
        for k, v in files.items():
            text = text.replace(k, v)
        (d / name).write_text(text)
    return str(d)


def test_lm_eval_harness_matches_the_script(models, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = lm_eval_tasks(tmp_path, data_dir)
    common = ["--model_name", models["dlm"], "--mc_num", "8", "--no_progress"]
    ours = ez.main(common + ["--tasks", "piqa", "--data_path", os.path.join(data_dir, "piqa.jsonl")])
    lam = ez.main(common + ["--tasks", "lambada", "--data_path", os.path.join(data_dir, "lambada_test.txt")])
    harness = ez.main(common + ["--lm_eval_tasks", "tiny_piqa,tiny_lambada", "--lm_eval_include", tasks])["lm_eval"]
    assert harness["tiny_piqa"]["acc,none"] == ours["metrics"]["piqa"]["acc"]["value"]
    assert harness["tiny_piqa"]["acc_norm,none"] == ours["metrics"]["piqa"]["acc_norm"]["value"]
    assert harness["tiny_lambada"]["acc,none"] == lam["metrics"]["lambada"]["acc"]["value"]
    # per request: the harness's log-likelihoods are the script's, choice by choice
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = ez.DiffusionLM(model_name=models["dlm"], mc_num="8", device="cpu", dtype="float32")
    res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_piqa"], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=tasks, include_defaults=False))
    by_goal = {s["doc"]["goal"]: [r[0] for r in s["filtered_resps"]] for s in res["samples"]["tiny_piqa"]}
    for rec, raw in zip(ours["examples"]["piqa"], RECORDS["piqa"]):
        assert by_goal[raw["goal"]] == pytest.approx(rec["loglik"], abs=1e-9)


def test_lm_eval_arc_matches_the_script(models, data_dir, tmp_path, monkeypatch):
    """lm-eval's arc_easy on a local file (tiny_arc.yaml): the harness's acc and acc_norm are the script's."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = lm_eval_tasks(tmp_path, data_dir)
    for ar in ([], ["--ar"]):
        common = ["--model_name", models["dlm"], "--mc_num", "8", "--no_progress"] + ar
        ours = ez.main(common + ["--tasks", "arc_easy", "--data_path", os.path.join(data_dir, "arc_easy.jsonl")])
        harness = ez.main(common + ["--lm_eval_tasks", "tiny_arc", "--lm_eval_include", tasks])["lm_eval"]["tiny_arc"]
        assert harness["acc,none"] == ours["metrics"]["arc_easy"]["acc"]["value"]
        assert harness["acc_norm,none"] == ours["metrics"]["arc_easy"]["acc_norm"]["value"]


def test_lm_eval_rolling_and_generate_until(models):
    from types import SimpleNamespace as Req
    lm = ez.DiffusionLM(model_name=models["dlm"], mc_num="4", device="cpu", dtype="float32", max_gen_toks=6)
    s = lm.scorer
    short = "the king said good night to the queen"
    long = " ".join(["the king said good night to the queen"] * 12)        # 96 words: two windows of 63
    ids = s.encode(long)
    assert len(ids) > s.max_len
    got = lm.loglikelihood_rolling([Req(args=(short,)), Req(args=(long,))], disable_tqdm=True)
    assert got[0] == pytest.approx(s.loglik([([s.start], s.encode(short))])[0][0], abs=1e-4)
    parts = s.loglik([([s.start], ids[:63]), ([s.start], ids[63:])])
    assert got[1] == pytest.approx(parts[0][0] + parts[1][0], abs=1e-4)
    ctx = "the king said"
    full = s.tokenizer.decode(s.generate([(s.encode_pair(ctx, "")[0], 6, [])], stop_at_eos=True)[0],
                              skip_special_tokens=True)
    stop = full.split()[2]
    out = lm.generate_until([Req(args=(ctx, {"until": [stop], "max_gen_toks": 6})),
                             Req(args=(ctx, {"until": []}))], disable_tqdm=True)
    assert out == [full.split(stop)[0], full]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of lm-eval's default --device cuda")
def test_lm_eval_cli_default_device_falls_back_to_cpu(models, capsys):
    lm = ez.DiffusionLM.create_from_arg_string(f"model_name={models['dlm']},mc_num=4", {"device": "cuda", "batch_size": "auto"})
    assert lm.scorer.device == "cpu" and lm.scorer.batch_size == 32
    assert "no CUDA here" in capsys.readouterr().err


# -- ARC and WikiText ------------------------------------------------------------------------------------

def test_arc_examples_letters_and_numeric_keys():
    ex = ez.make_example("arc_easy", RECORDS["arc_easy"][0], "f", 1)
    assert ex["pairs"][1] == ("Question: who is the king\nAnswer:", " the night") and ex["gold"] == 0
    assert ez.make_example("arc_easy", RECORDS["arc_easy"][1], "f", 2)["gold"] == 2            # labels and key 1-5
    assert ez.make_example("arc_challenge", RECORDS["arc_challenge"][0], "f", 1)["gold"] == 4
    four = {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}
    assert ez.make_example("arc_easy", {"question": "q", "choices": four, "answerKey": "3"}, "f", 1)["gold"] == 2
    digits = {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}
    assert ez.make_example("arc_easy", {"question": "q", "choices": digits, "answerKey": "B"}, "f", 1)["gold"] == 1
    as_text = {"question": "q", "choices": json.dumps(four), "answerKey": "D"}                   # a CSV cell
    assert ez.make_example("arc_easy", as_text, "f", 1)["gold"] == 3
    with pytest.raises(ez.DataError, match=r"f record 7: answerKey 'F' is none of the choice labels"):
        ez.make_example("arc_easy", {"question": "q", "choices": four, "answerKey": "F"}, "f", 7)
    with pytest.raises(ez.DataError, match=r"f record 2: 4 choice texts but 3 labels"):
        ez.make_example("arc_easy", {"question": "q", "choices": {"text": four["text"], "label": ["A", "B", "C"]},
                                     "answerKey": "A"}, "f", 2)


def test_wikitext_reader_cuts_articles(data_dir):
    recs, path = ez.load_task_records("wikitext", data_dir=data_dir)
    assert path.endswith("wikitext2_test.txt")
    assert [r["page"] for r in recs] == [" = The King = \n\n the king said good night to the queen . \n\n = = Love = = \n\n"
                                         " and so the day was good ", " = My Lord = \n\n my lord is good and you are not "]
    ex = ez.make_example("wikitext", recs[1], path, 2)
    assert (ex["words"], ex["bytes"]) == (12, len(recs[1]["page"]))
    # a jsonl copy of the document-level release reads the same
    assert ez.make_example("wikitext", {"page": recs[1]["page"]}, "f", 1) == ex
    assert ez.wikitext_articles("no heading here\n\n = A = \n\n b \n") == [{"page": "no heading here"},
                                                                            {"page": " = A = \n\n b "}]


@pytest.mark.parametrize("n, window, stride", [(1, 4, 3), (3, 4, 3), (10, 4, 3), (10, 4, 1), (10, 5, 2), (7, 16, 8)])
def test_rolling_windows_score_every_token_once(n, window, stride):
    ids = list(range(100, 100 + n))
    ws = ez.rolling_windows(ids, 1, window, stride)
    assert [t for _, tgt in ws for t in tgt] == ids
    x = [1] + ids
    for k, (ctx, tgt) in enumerate(ws):
        assert 1 <= len(ctx) and len(ctx) + len(tgt) <= window
        p = x.index(tgt[0])
        assert ctx == x[p - len(ctx):p]                                   # the tokens right before the targets
        if k == 0:
            assert ctx == [1] and len(tgt) == min(n, window - 1)
        elif k < len(ws) - 1:
            assert len(tgt) == stride and len(ctx) == window - stride
        else:
            assert len(ctx) + len(tgt) == window or ctx[0] == 1           # the last one fills the window


def wikitext_examples(text=None):
    recs = ez.wikitext_articles(text or WIKITEXT)
    return [ez.make_example("wikitext", r, "f", i) for i, r in enumerate(recs, 1)]


def test_wikitext_ar_perplexity_is_the_hand_computation(models):
    s = scorer(models["ar"], ar=True)
    ref = AutoModelForCausalLM.from_pretrained(models["ar"]).eval()
    exs = wikitext_examples()
    nll, n_tok = 0.0, 0
    with torch.no_grad():
        for ex in exs:       # one window each: every token after all the ones before it
            ids = [s.start] + s.encode(ex["text"])
            logp = F.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
            nll -= sum(float(logp[j - 1, ids[j]]) for j in range(1, len(ids)))
            n_tok += len(ids) - 1
    words, n_bytes = sum(ex["words"] for ex in exs), sum(ex["bytes"] for ex in exs)
    metrics, recs = ez.run_task(s, "wikitext", exs, progress=False)
    assert metrics["token_perplexity"][0] == pytest.approx(math.exp(nll / n_tok), rel=1e-5)
    assert metrics["word_perplexity"][0] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert metrics["bits_per_byte"][0] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert [r["windows"] for r in recs] == [1, 1] and sum(r["tokens"] for r in recs) == n_tok
    # the text fits one window: any window that holds it, and any stride, give the same numbers
    longest = max(len(s.encode(ex["text"])) for ex in exs) + 1
    for window, stride in ((longest, None), (longest, 2), (64, 5)):
        other, _ = ez.run_task(s, "wikitext", exs, progress=False, window=window, stride=stride)
        for k in metrics:
            assert other[k][0] == pytest.approx(metrics[k][0], rel=1e-6)


def test_wikitext_ar_sliding_window_by_hand(models):
    """A text longer than the window: each token scored once, after the window - stride tokens before
    its window's first target (more for the first and the last window)."""
    s = scorer(models["ar"], ar=True)
    ref = AutoModelForCausalLM.from_pretrained(models["ar"]).eval()
    text = " = The King = \n\n " + " ".join(["the king said good night to the queen and"] * 3)
    exs = wikitext_examples(text)
    ids = [s.start] + s.encode(exs[0]["text"])
    window, stride = 8, 3
    nll, p = 0.0, 0
    with torch.no_grad():
        while p < len(ids) - 1:
            n = min(window - 1 if p == 0 else stride, len(ids) - 1 - p)
            lo = max(0, p + 1 - (window - n))
            logp = F.log_softmax(ref(torch.tensor([ids[lo:p + 1 + n]])).logits[0].double(), -1)
            nll -= sum(float(logp[j - lo - 1, ids[j]]) for j in range(p + 1, p + 1 + n))
            p += n
    metrics, recs = ez.run_task(s, "wikitext", exs, progress=False, window=window, stride=stride)
    assert recs[0]["windows"] > 3
    assert metrics["token_perplexity"][0] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    one, _ = ez.run_task(s, "wikitext", exs, progress=False)          # one window of 64: more context, other numbers
    assert one["token_perplexity"][0] != pytest.approx(metrics["token_perplexity"][0], rel=1e-6)


def test_wikitext_diffusion_bound_is_the_sum_of_elbo_loglik(models):
    from model import elbo_loglik
    s = scorer(models["dlm"], mc_num=6, seed=3)
    text = " = The King = \n\n " + " ".join(["the king said good night to the queen and"] * 3)
    exs = wikitext_examples(text) + wikitext_examples()
    window, stride = 10, 4
    total, n_tok = 0.0, 0
    for ex in exs:
        for ctx, tgt in ez.rolling_windows(s.encode(ex["text"]), s.start, window, stride):
            ids = torch.tensor([ctx + tgt])
            tm = torch.zeros_like(ids, dtype=torch.bool)
            tm[0, len(ctx):] = True
            total += float(elbo_loglik(s.model, ids, tm, mc_num=6, generator=s.generator(ctx + tgt, len(tgt)))[0])
            n_tok += len(tgt)
    metrics, _ = ez.run_task(s, "wikitext", exs, progress=False, window=window, stride=stride)
    assert metrics["token_perplexity"][0] == pytest.approx(math.exp(-total / n_tok), rel=1e-6)
    words = sum(ex["words"] for ex in exs)
    assert metrics["word_perplexity"][0] == pytest.approx(math.exp(-total / words), rel=1e-6)


def test_wikitext_output_says_the_diffusion_number_is_a_bound(models, data_dir, capsys):
    common = ["--model_name", models["dlm"], "--tasks", "wikitext", "--data_dir", data_dir, "--mc_num", "4",
              "--ppl_window", "16", "--ppl_stride", "6", "--no_progress"]
    res = ez.main(common)
    m = res["metrics"]["wikitext"]
    assert m["perplexity"].startswith("upper bound") and (m["window"], m["stride"]) == (16, 6) and m["n"] == 2
    assert "wikitext: upper bound" in capsys.readouterr().out
    ar = ez.main(common + ["--ar", "--ppl_window", "1000"])["metrics"]["wikitext"]
    assert ar["perplexity"].startswith("exact") and ar["window"] == 64      # capped at the model's positions
    with pytest.raises(SystemExit):
        ez.main(common + ["--ppl_stride", "16"])
    assert "--ppl_stride 16 must be below --ppl_window 16" in capsys.readouterr().err


# -- batching --------------------------------------------------------------------------------------------

def task_examples(data_dir):
    out = {}
    for task in ez.TASKS:
        recs, src = ez.load_task_records(task, data_dir=data_dir)
        out[task] = [ez.make_example(task, r, src, i) for i, r in enumerate(recs, 1)]
    return out


@pytest.mark.parametrize("ar", [False, True])
def test_batched_evaluation_is_one_example_at_a_time(models, data_dir, ar):
    """Every task: all examples in one batch give each example's scores and predictions alone."""
    wide, narrow = scorer(models["dlm"], ar=ar, batch_size=64, mc_num=5), scorer(models["dlm"], ar=ar, batch_size=1, mc_num=5)
    for task, exs in task_examples(data_dir).items():
        kw = dict(window=12, stride=5) if task == "wikitext" else {}
        _, together = ez.run_task(wide, task, exs, gen_len=3, progress=False, **kw)
        alone = [ez.run_task(narrow, task, [ex], gen_len=3, progress=False, **kw)[1][0] for ex in exs]
        assert len(together) == len(alone) == len(exs)
        for a, b in zip(together, alone):
            assert a.keys() == b.keys(), task
            for k in a:
                if k == "loglik":
                    assert a[k] == pytest.approx(b[k], abs=1e-4), task
                else:
                    assert a[k] == b[k], (task, k)


@pytest.mark.parametrize("ar", [False, True])
def test_forwards_cut_to_the_token_budget_give_the_same_scores(models, monkeypatch, ar):
    s = scorer(models["dlm"], ar=ar, batch_size=64)
    pairs = [s.encode_pair(c, t) for c, t in [("the king said to", " his queen"), ("the king said to", " me"),
                                               ("o", " my lord is good and"), ("a man", " and so"), ("the", "")]]
    pairs += [([s.start], s.encode(" the king said good night to the queen")[:k]) for k in range(1, 8)]   # one context
    whole = s.loglik(pairs, greedy=True)
    monkeypatch.setattr(ez, "FORWARD_TOKENS", 12)          # two or three sequences a forward, or one
    for (a, ga), (b, gb) in zip(whole, s.loglik(pairs, greedy=True)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_packed_elbo_is_elbo_loglik_row_by_row(models):
    """The packed draws (repeated masks run once) give model.elbo_loglik's estimate of each row."""
    from model import elbo_loglik
    for method in ("stratified", "antithetic", "iid", "deterministic"):
        s = scorer(models["dlm"], mc_num=16, method=method, batch_size=7)
        pairs = [s.encode_pair(c, t) for c, t in [("the king said to", " his"), ("o", " my lord is good and"),
                                                   ("a man", " and so"), ("the", "")]]
        got = s.loglik(pairs)
        for (ctx, tgt), (ll, _) in zip(pairs, got):
            ids = torch.tensor([ctx + tgt])
            tm = torch.zeros_like(ids, dtype=torch.bool)
            tm[0, len(ctx):] = True
            want = float(elbo_loglik(s.model, ids, tm, mc_num=16, generator=s.generator(ctx + tgt, len(tgt)), method=method)[0])
            assert ll == pytest.approx(want, abs=1e-5), method


# -- the real files ------------------------------------------------------------------------------------

SHARED = [d for d in (os.environ.get("DLM_SHARED_DATA"), "/work/shared/data",
                      os.path.join(HERE, "..", "..", "shared", "data")) if d and os.path.isdir(d)]


@pytest.mark.skipif(not SHARED, reason="no shared/data folder beside the repository")
@pytest.mark.parametrize("task", ez.TASKS)
def test_every_task_reads_its_shared_file(task):
    """The first records of each real file through --data_dir, as the script reads them."""
    if not ez.find_data_file(task, SHARED[0]):
        pytest.skip(f"{SHARED[0]} has no file for {task}")
    recs, path = ez.load_task_records(task, data_dir=SHARED[0])
    exs = [ez.make_example(task, r, path, i) for i, r in enumerate(recs[:5], 1)]
    assert len(exs) == 5
    for ex in exs:
        if task in ez.MC_TASKS:
            assert len(ex["pairs"]) >= 2 and 0 <= ex["gold"] < len(ex["pairs"])
            assert all(c.strip() and t.strip() for c, t in ex["pairs"])
        elif task == "wikitext":
            assert ex["text"].startswith(" = ") and ex["words"] > 100
        else:
            assert all(isinstance(v, (str, list)) and v for k, v in ex.items() if k != "prefix")
    if task == "wikitext":
        assert len(recs) == 62      # WikiText-2 test: 62 articles
    if task in ("arc_easy", "arc_challenge"):   # every record: the answer key is one of the labels
        assert all(ez.make_example(task, r, path, i)["gold"] >= 0 for i, r in enumerate(recs, 1))


def test_bench_eval_times_the_real_tasks(models, data_dir):
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(HERE, "..", "bench", "bench_eval.py"), "--model_name", models["dlm"],
           "--tasks", "piqa,arc_easy,wikitext", "--data_dir", data_dir, "--limit", "2", "--mc_num", "2", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|")[1:4] for line in r.stdout.splitlines() if line.startswith("| ") and "examples/s" not in line]
    assert [(t.strip(), m.strip(), int(n)) for t, m, n in rows] == \
        [(t, m, 2) for m in ("diffusion", "AR") for t in ("piqa", "arc_easy", "wikitext")]
    r = subprocess.run(cmd + ["--only", "ar", "--tasks", "nope"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr.strip().splitlines()[-1]


def test_results_written_after_every_task_and_resume(models, data_dir, tmp_path, monkeypatch, capsys):
    """--output is rewritten after every task, so a run stopped in its third task keeps the first two; --resume
    scores only the rest and ends with the results of one uninterrupted run; other settings are refused."""
    argv = ["--model_name", models["dlm"], "--tasks", "lambada,piqa,winogrande", "--data_dir", data_dir, "--mc_num", "4",
            "--no_progress"]
    whole = ez.main(argv + ["--output", str(tmp_path / "whole.json")])
    out = tmp_path / "cut.json"
    real, scored = ez.run_task, []

    def stops_at_winogrande(scorer, task, *a, **kw):
        scored.append(task)
        if task == "winogrande":
            raise ez.DataError("stopped")
        return real(scorer, task, *a, **kw)
    monkeypatch.setattr(ez, "run_task", stops_at_winogrande)
    with pytest.raises(SystemExit):
        ez.main(argv + ["--output", str(out)])
    assert set(json.loads(out.read_text())["metrics"]) == {"lambada", "piqa"}
    monkeypatch.setattr(ez, "run_task", lambda scorer, task, *a, **kw: scored.append(task) or real(scorer, task, *a, **kw))
    scored.clear()
    capsys.readouterr()
    res = ez.main(argv + ["--output", str(out), "--resume"])
    assert scored == ["winogrande"] and "lambada: kept from" in capsys.readouterr().err
    assert json.loads(out.read_text())["metrics"].keys() == whole["metrics"].keys()
    for task in whole["metrics"]:
        for k, v in whole["metrics"][task].items():
            if k not in ("seconds", "examples_per_s"):
                assert json.loads(json.dumps(res["metrics"][task][k])) == json.loads(json.dumps(v)), (task, k)
    with pytest.raises(SystemExit):
        ez.main(argv[:-1] + ["--mc_num", "8", "--no_progress", "--output", str(out), "--resume"])
    assert "was scored with other settings (mc_num)" in capsys.readouterr().err

"""
What the scripts share that is neither the model nor the run loop: the command-line parser (one-line errors,
defaults in --help, range types), checks on the files they read and write (safetensors headers, model
folders), task records (JSON, JSONL, CSV, TXT), the answer checker, the statistics the evaluation and the
benchmarks report, prompt templates and the built-in tasks (synthetic_arith, synthetic_sort). No torch and no lm_eval here, so
every script can import it, moe_convert.py included.

    from common import Parser, at_least, read_records, is_correct
    p = Parser(prog="my_script.py", description="...")
    p.add_argument("--steps", type=at_least(1), default=8, help="steps")   # --steps 0: one line, exit 2
    records = read_records("../shared/data/gsm8k_test.json")
    is_correct("... #### 42", records[0]["output"])
"""
import argparse
import ast
import csv
import json
import math
import operator
import os
import random
import re
import string
import zlib


class DataError(ValueError):
    """Bad input data: reported as one line naming the flag, file or record."""


# -----------------------------------------------------------------------------
# the command line: ranges are argparse types, so a bad value is one line naming the flag before anything loads

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: --lr must be > 0 and finite, got -1` on stderr, exit
    status 2, no usage block) and the defaults shown in --help (the module docstring kept as written)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        message = re.sub(r"^argument ([^:/ ]+)(?:/[^: ]+)*: ", r"\1 ", message)   # "--flag must be ..."
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default only where it says something (None/False say it in words)
        if "default" in (action.help or "") or any(action.default is v for v in (None, False, True, argparse.SUPPRESS)):
            return action.help
        return super()._get_help_string(action)


def at_least(low):
    """An int flag >= low (an argparse type; it also checks a value given from Python)."""
    def whole(s):
        try:
            v = int(s)
            if isinstance(s, float) and v != s:
                raise ValueError
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a whole number, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    whole.__name__ = f"int >= {low}"
    return whole


def real(low=0.0, strict=False, below=None, at_most=None):
    """A finite float flag > low (strict) or >= low, and < below or <= at_most when given."""
    def number(s):
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
        if below is not None:
            ok, rule = low <= v < below, f"in [{low:g}, {below:g})"
        elif at_most is not None:
            ok, rule = (low < v if strict else low <= v) and v <= at_most, f"in {'(' if strict else '['}{low:g}, {at_most:g}]"
        else:
            ok, rule = math.isfinite(v) and (low < v if strict else low <= v), f"{'>' if strict else '>='} {low:g} and finite"
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {v}")
        return v
    number.__name__ = "number"
    return number


def one_of(names):
    """A flag naming one of `names` (an argparse type, given with choices=names for --help): the error lists them."""
    def name(s):
        if s not in names:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, got {s!r}")
        return s
    return name


# -----------------------------------------------------------------------------
# errors and files

def first_line(e):
    """An exception as one line (the scripts' errors are one line)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def check_output_file(path, error):
    """--output must be a file in an existing folder."""
    if os.path.isdir(path):
        error(f"--output {path} is a folder, not a file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        error(f"--output {path}: its folder does not exist")


JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "adapter_config.json", "dlm_config.json")


def check_safetensors(path):
    """Raise ValueError naming `path` unless it is a whole safetensors file: an 8-byte header length, a JSON
    header, and exactly the bytes that header describes (a truncated or foreign file fails here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file, or truncated ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not valid)") from None
    if 8 + n + max(ends, default=0) != size:
        raise ValueError(f"{path}: truncated or damaged safetensors file ({size} bytes, its header describes "
                         f"{8 + n + max(ends, default=0)})")


def check_model_folder(path):
    """Raise FileNotFoundError / ValueError, one line naming the file, when a model folder is damaged: empty,
    a config/tokenizer JSON file that does not parse, an index naming a missing shard, or a safetensors file
    that is truncated or not safetensors. Opens headers only; loads no weights."""
    names = os.listdir(path)
    if not names:
        raise FileNotFoundError(f"{path}: empty folder (no config.json, no weights: not a model folder)")
    for name in sorted(n for n in names if n in JSON_FILES or n.endswith(".safetensors.index.json")):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{os.path.join(path, name)}: not valid JSON ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{os.path.join(path, name)}: not a JSON object")
        if name.endswith(".safetensors.index.json") and isinstance(data.get("weight_map"), dict):
            shards = set(data["weight_map"].values())
            for shard in sorted(shards):
                if not os.path.isfile(os.path.join(path, shard)):
                    raise FileNotFoundError(f"{os.path.join(path, name)} names {shard}, which is missing")
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        check_safetensors(os.path.join(path, name))



# -----------------------------------------------------------------------------
# task records: JSON (a list, or {"data": [...]}), JSONL, CSV (header row) or TXT (one record a line)

def read_records(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8", newline="" if ext == ".csv" else None) as f:
            if ext == ".jsonl":
                records = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path} line {i}: not valid JSON ({e.msg})")
            elif ext == ".json":
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})")
                records = data.get("data", data.get("rows")) if isinstance(data, dict) else data
                if not isinstance(records, list):
                    raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
            elif ext == ".csv":
                records = list(csv.DictReader(f))
            else:
                records = [{"text": line.rstrip("\n")} for line in f if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text")
    for i, r in enumerate(records, 1):
        if isinstance(r, str):
            records[i - 1] = r = {"text": r}
        if not isinstance(r, dict):
            raise DataError(f"{path} record {i}: expected an object with named fields, got {type(r).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def field(r, *names, path="", i=0):
    for n in names:
        if n in r and r[n] is not None:
            return r[n]
    raise DataError(f"{path} record {i}: missing field {' or '.join(repr(n) for n in names)}")



# -----------------------------------------------------------------------------
# statistics: what the evaluation reports and the tables built from it

def mean_stderr(values):
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval reports it)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def binomial_se(p, n):
    """The standard error sqrt(p (1 - p) / n) of an accuracy p on n problems (the benchmarks' tables)."""
    return math.sqrt(p * (1 - p) / n)


def perplexities(loglik, tokens, words, n_bytes):
    """exp of the mean negative log-likelihood per token and per word, and bits per UTF-8 byte."""
    return {"token_perplexity": math.exp(-loglik / tokens), "word_perplexity": math.exp(-loglik / words),
            "bits_per_byte": -loglik / (n_bytes * math.log(2))}


# -----------------------------------------------------------------------------
# answers

def gsm8k_number(text):
    """The number after the first '####', without commas, '$' or a trailing '.0'; None if there is none."""
    m = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    if not m:
        return None
    num = m.group(1).replace(",", "")
    return num[:-2] if num.endswith(".0") else num


STEP_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(node):
    """The value of an expression tree of numbers, + - * / and signs; ValueError for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return -_arith(node.operand) if isinstance(node.op, ast.USub) else _arith(node.operand)
    raise ValueError("not arithmetic")


def right_steps(text):
    """GSM8K's symbolic steps `<<expression=result>>` in an answer: (how many have a result equal to their
    expression's value, how many there are). A finer measure than the final number of whether a model computes:
    an answer can reach the right number through wrong steps. A step that does not parse counts as wrong."""
    right = n = 0
    for expr, result in STEP_RE.findall(text):
        n += 1
        try:
            right += abs(_arith(ast.parse(expr.replace(",", "").strip(), mode="eval").body)
                         - float(result.replace(",", "").strip())) < 1e-6
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
            pass
    return right, n


def normalize_answer(s):
    """SQuAD/TriviaQA normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def is_correct(prediction, reference):
    """GSM-style references compare the number after '####'; others the whole normalised answer."""
    gold = gsm8k_number(reference)
    if gold is not None:
        return gsm8k_number(prediction) == gold
    return normalize_answer(prediction) == normalize_answer(reference)


# -----------------------------------------------------------------------------
# built-in tasks: train_sft.py --data synthetic_arith / synthetic_sort, bench/bench_samplers.py --prompts

PROMPT = "Question: {}\nAnswer:"   # the prompt of a question/answer pair: SFT, the gsm8k task, the benchmarks


def in_template(template, tok, question):
    """A question in a prompt template: a format string with {}, or "chat" (one user turn of the tokenizer's chat
    template, with the generation prompt)."""
    if template == "chat":
        return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return template.format(question)

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jill", "Kim", "Leo", "Mia", "Nat", "Omar", "Pia")
THINGS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles", "eggs", "cups")


def synthetic_problem(rng):
    """One word problem of 1-3 steps with its GSM8K-style symbolic answer, e.g.
    ("Ann has 7 apples. She gets 5 more. Then she gives 3 away. How many apples does Ann have now?",
     "<<7+5=12>> <<12-3=9>> #### 9")."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    n = rng.randint(2, 20)
    text, steps = [f"{name} has {n} {thing}."], []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice("+-*")
        if op == "+":
            k = rng.randint(1, 20)
            text.append(f"Then {name} gets {k} more.")
            m = n + k
        elif op == "-" and n > 1:
            k = rng.randint(1, n - 1)
            text.append(f"Then {name} gives {k} away.")
            m = n - k
        else:
            op, k = "*", rng.randint(2, 4)
            text.append(f"Then the number of {thing} grows {k} times.")
            m = n * k
        steps.append(f"<<{n}{op}{k}={m}>>")
        n = m
    text.append(f"How many {thing} does {name} have now?")
    return " ".join(text), " ".join(steps) + f" #### {n}"


def sort_problem(rng, n_digits=16):
    """Sixteen random digits to sort, e.g. ("Sort these digits from smallest to largest: 7 3 9 1 ...",
    "1 3 7 9 ..."): an answer of 16 digits whose every position follows from the question alone (the count of
    each digit), so a diffusion model can learn to write many of them in one step, and one a 135M AR model learns
    on a CPU."""
    digits = [rng.randint(0, 9) for _ in range(n_digits)]
    return ("Sort these digits from smallest to largest: " + " ".join(map(str, digits)),
            " ".join(map(str, sorted(digits))))


SYNTHETIC_TASKS = {"synthetic_arith": synthetic_problem, "synthetic_sort": sort_problem}


def synthetic(task, split, n, seed=0):
    """`n` distinct problems of one split of a built-in task. A problem belongs to the test split when a hash of
    its question (stable across runs and machines) is 0 mod 10, so the splits never share a question."""
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(200 * n):
        q, a = SYNTHETIC_TASKS[task](rng)
        if q in seen or (zlib.crc32(q.encode()) % 10 == 0) != (split == "test"):
            continue
        seen.add(q)
        out.append({"instruction": q, "output": a})
        if len(out) == n:
            return out
    raise ValueError(f"{task}: only {len(out)} distinct {split} problems, {n} asked for")


def synthetic_arith(split, n, seed=0):
    return synthetic("synthetic_arith", split, n, seed)

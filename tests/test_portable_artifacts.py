"""Artifacts that travel: shipped profiles and freshly compiled bundles carry no machine path (their
data is a task name + the source's sha256 + row ids), profiles are written compactly, and a fresh
machine (no CONFLAYERS_DATA_DIR, an empty HOME, working directory outside the repository)
compiles a named task from the data shipped in the package and benchmarks the bundle."""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conflayers.runtime.jsonfmt import dump_profile_json
from portable import machine_paths, scan_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "profiles", "*", "*.json"))
                 + glob.glob(os.path.join(ROOT, "profiles", "*", "*", "*.json")))    # fp32 and per-target
FORBIDDEN = [ROOT, os.path.expanduser("~"), tempfile.gettempdir() + os.sep]
SOURCES = ("builtin:", "pypi:", "hf:", "file:", "CONFLAYERS_DATA_DIR:")


def test_dump_profile_json_puts_number_lists_on_one_line():
    doc = {"task": "t", "draft": {"vocab_subset": {"size": 3, "token_ids": [5, 7, 9]}, "skip": []},
           "timings": [1.5, 2, 3.25], "uids": ["a", "b"], "mixed": [1, "x"], "flags": [True, False],
           "nested": [{"k": [1, 2]}]}
    text = dump_profile_json(doc)
    assert json.loads(text) == doc
    lines = [line.rstrip(",") for line in text.splitlines()]
    assert '   "token_ids": [5, 7, 9]' in lines and '  "skip": []' in lines and ' "timings": [1.5, 2, 3.25]' in lines
    assert ' "uids": [' in lines and '  "a"' in lines            # strings, mixed and bool lists: one per line
    assert ' "flags": [' in lines and ' "mixed": [' in lines
    assert '   "k": [1, 2]' in lines
    # without number lists it is exactly json.dumps(indent=1)
    plain = {"a": {"b": ["x", {"c": None}]}, "d": "é"}
    assert dump_profile_json(plain) == json.dumps(plain, indent=1)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "profiles")))
def test_shipped_profile_carries_no_machine_path_and_is_compact(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert machine_paths(text, FORBIDDEN) == []
    profile = json.loads(text)
    cal = profile["calibration"]
    assert cal["source"] == cal["data"]["calib"] and "/" not in cal["source"].split(":")[0]
    assert cal["data"]["source"].startswith(SOURCES), cal["data"]["source"]
    assert len(cal["data"]["source_sha256"]) == 64
    assert len(cal["search_uids"]) == cal["search_prompts"] and len(cal["validation_uids"]) == cal["validation_prompts"]
    assert text == dump_profile_json(profile) + "\n"      # token ids on one line, not one per line
    # a profile's records (search, drafter and cascade searches, selection) are ~1-2k lines; a
    # number list written one element per line (an 8k-token vocabulary) would be ~10k
    assert len(text.splitlines()) < 2500


# ----------------------------------------------------------------------------- fresh machine

FRESH_ARGS = ["--num-prompts", "5", "--validation-prompts", "2", "--max-new-tokens", "16", "--context-window", "8",
              "--max-iterations", "2", "--refine-budget", "1", "--vocab-sizes", "128", "--max-context", "512",
              "--time-budget", "60", "--quiet"]


def fresh_env(home) -> dict:
    """The environment of a new machine: CONFLAYERS_DATA_DIR and caches unset, HOME empty."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONFLAYERS_DATA_DIR", "CONFLAYERS_CACHE", "XDG_CACHE_HOME", "HF_HOME")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def fresh_compile(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    """conflayers-compile --calib gsm8k in a subprocess as on a new machine: CONFLAYERS_DATA_DIR
    and CONFLAYERS_CACHE unset, HOME an empty folder, the working directory outside the repository
    (the model is a tiny local Hugging Face directory there)."""
    work = tmp_path_factory.mktemp("fresh")
    home = work / "home"
    home.mkdir()
    model = work / "tiny-model"
    tiny_llama.save_pretrained(str(model))
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), str(model))
    exe = os.path.join(os.path.dirname(sys.executable), "conflayers-compile")
    r = subprocess.run([exe, "--model", "tiny-model", "--calib", "gsm8k", "--out", "bundle"] + FRESH_ARGS,
                       cwd=str(work), env=fresh_env(home), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return str(work / "bundle"), str(home), str(work)


def test_fresh_machine_compiles_a_named_task_from_package_data(fresh_compile):
    bundle, home, _ = fresh_compile
    from conflayers.runtime import Bundle
    raw = Bundle.open(bundle, verify=True).profiles["gsm8k"].raw
    data = raw["calibration"]["data"]
    assert data["source"] == "builtin:gsm8k/train.jsonl" and data["count"] == 7473
    assert data["source_sha256"] == "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
    assert all(u.startswith("gsm8k/train/") for u in raw["calibration"]["search_uids"])
    assert raw["figures"]["identical_to_plain"] is True
    assert not os.path.exists(os.path.join(ROOT, "bundle"))     # written where it was run, not in the repo


def test_fresh_bundle_carries_no_machine_path(fresh_compile):
    """Every text file of the bundle (profiles, manifest, report, tokenizer files)."""
    bundle, home, work = fresh_compile
    found = scan_bundle(bundle, FORBIDDEN + [home, work])
    assert found == []
    with open(os.path.join(bundle, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["model"]["source"] == "dir:tiny-model"
    with open(os.path.join(bundle, "profiles", "gsm8k.json"), encoding="utf-8") as f:
        text = f.read()
    assert text == dump_profile_json(json.loads(text)) + "\n"


def test_fresh_machine_benchmarks_the_bundle(fresh_compile):
    """conflayers-bench on the fresh bundle, same fresh environment: GSM8K's evaluation prompts come
    from the package, plain and the profile decode identically."""
    bundle, home, work = fresh_compile
    exe = os.path.join(os.path.dirname(sys.executable), "conflayers-bench")
    r = subprocess.run([exe, "bundle", "--task", "gsm8k", "--num-prompts", "2", "--max-new-tokens", "8",
                        "--systems", "plain,profile:gsm8k", "--json", "bench.json"],
                       cwd=work, env=fresh_env(home), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(work, "bench.json"), encoding="utf-8") as f:
        doc = json.load(f)
    systems = {s["name"]: s for s in doc["systems"]}
    assert systems["profile:gsm8k"]["identical_to_plain"] is True
    assert systems["plain"]["status"] == systems["profile:gsm8k"]["status"] == "ok"
    assert all(len(s["tokens_per_s_per_prompt"]) == 2 for s in systems.values())
    section = doc["meta"]["sections"][0]
    assert section["source"].startswith("builtin:gsm8k/") and section["calibration_overlap"] == []


def test_bench_finds_a_local_model_by_its_portable_source(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer_dir):
    """The manifest names a local model folder without its path ("dir:<name>"): the bench finds it
    from the working directory, and says to pass --hf-model elsewhere."""
    from conflayers.tools.bench_systems import Unavailable, resolve_hf_dir
    model = tmp_path / "tiny-model"
    tiny_llama.save_pretrained(str(model))
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), str(model))
    manifest_model = {"name": "tiny-model", "source": "dir:tiny-model"}
    monkeypatch.chdir(tmp_path)
    assert resolve_hf_dir(manifest_model, None) == str(model)
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(Unavailable, match="--hf-model"):
        resolve_hf_dir(manifest_model, None)

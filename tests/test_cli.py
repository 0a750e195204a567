"""The command line: conflayers-run, conflayers inspect / verify / run.

Outputs are checked against the Engine API on the same bundle (the CLI must add nothing to the
text), and every failure must be one `Error:` line with exit code 2, never a traceback."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from conflayers.runtime.cli import main, run_main

PROMPT = "Janet has 3 apples and buys 5 more."
N = 24


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def invoke(runner, cmd, args):
    result = runner.invoke(cmd, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception     # a traceback the user would have seen
    return result


def chat(prompt):
    return [{"role": "user", "content": prompt}]


def copy_bundle(src, tmp_path):
    dst = str(tmp_path / "bundle")
    shutil.copytree(src, dst)
    return dst


def rewrite_file(bundle, rel, data: bytes):
    """Replace a bundle file and update its manifest entry (a valid, re-published bundle)."""
    with open(os.path.join(bundle, rel), "wb") as f:
        f.write(data)
    mpath = os.path.join(bundle, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(mpath, "w") as f:
        json.dump(manifest, f)


# -- run --------------------------------------------------------------------------------------

def test_run_text_matches_engine(runner, tiny_bundle, tiny_engine):
    res = invoke(runner, run_main, [tiny_bundle, "--prompt", PROMPT, "-n", N])
    assert res.exit_code == 0, res.output
    expected = tiny_engine.generate(messages=chat(PROMPT), max_new_tokens=N)   # chat on by default
    assert res.stdout == expected.text + "\n"
    line = res.stderr.strip().splitlines()[-1]
    for part in ("[int8skip]", "tok/s", "TTFT", "acceptance", "accepted/step", "draft steps", "guard"):
        assert part in line


def test_run_json_no_chat_and_lossless(runner, tiny_bundle, tiny_engine):
    expected = tiny_engine.generate(PROMPT, max_new_tokens=N, speculate=False)
    for flags in ([], ["--no-speculate"], ["--task", "fp32sub"], ["--task", "auto"]):
        res = invoke(runner, run_main, [tiny_bundle, "-p", PROMPT, "-n", N, "--no-chat", "--json", *flags])
        assert res.exit_code == 0, res.output
        rec = json.loads(res.stdout)
        assert rec["text"] == expected.text and rec["token_ids"] == expected.token_ids
        assert rec["finish_reason"] == expected.finish_reason
        m = rec["metrics"]
        assert m["completion_tokens"] == len(expected.token_ids)
        assert m["speculative"] == (flags != ["--no-speculate"])
        if flags[:2] == ["--task", "fp32sub"]:
            assert m["profile"] == "fp32sub"


def test_stream_equals_non_stream(runner, tiny_bundle):
    args = [tiny_bundle, "-p", PROMPT, "-n", 40]
    plain = invoke(runner, run_main, args)
    streamed = invoke(runner, run_main, args + ["--stream"])
    assert streamed.exit_code == 0 and plain.exit_code == 0
    assert streamed.stdout == plain.stdout
    lines = [json.loads(x) for x in invoke(runner, run_main, args + ["--stream", "--json"]).stdout.splitlines()]
    deltas, final = lines[:-1], lines[-1]
    assert all("delta" in d for d in deltas)
    assert "".join(d["delta"] for d in deltas) == final["text"] == plain.stdout[:-1]


def test_prompts_file(runner, tiny_bundle, tiny_engine, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": PROMPT}) + "\n\n" +
                    json.dumps({"id": 7, "messages": chat("What is 12 times 7?"), "task": "fp32sub"}) + "\n")
    res = invoke(runner, main, ["run", tiny_bundle, "--prompts", path, "-n", 12, "--json", "--no-chat"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["id"] for r in recs] == ["a", 7] and [r["index"] for r in recs] == [0, 1]
    assert recs[0]["text"] == tiny_engine.generate(PROMPT, max_new_tokens=12).text
    assert recs[1]["text"] == tiny_engine.generate(messages=chat("What is 12 times 7?"), max_new_tokens=12).text
    assert recs[1]["metrics"]["profile"] == "fp32sub"


def test_prompts_from_stdin(runner, tiny_bundle, tiny_engine):
    res = runner.invoke(run_main, [tiny_bundle, "--prompts", "-", "-n", "8", "--json"],
                        input=json.dumps({"prompt": PROMPT}) + "\n")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["text"] == tiny_engine.generate(messages=chat(PROMPT), max_new_tokens=8).text


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', "line 2: not valid JSON"),
    ('{"prompt": "ok"}\n["a list"]\n', "line 2: expected a JSON object"),
    ('{"text": "no prompt"}\n', "line 1: give exactly one of 'prompt' or 'messages'"),
    ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}\n', "line 1: messages[0].role"),
    ('{"prompt": "x", "task": "nope"}\n', "line 1: unknown task 'nope'"),
    ("\n\n", "has no prompts"),
])
def test_bad_prompts_file(runner, tiny_bundle, tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    res = invoke(runner, run_main, [tiny_bundle, "--prompts", path])
    assert res.exit_code == 2
    assert res.stdout == ""                       # nothing generated before the error
    assert res.stderr.startswith("Error: ") and message in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["-n", 5000], "exceeds the context"),
    (["--max-context", 8], "longer than the context"),
    (["--stop", ""], "stop must be a non-empty string"),
])
def test_bad_requests(runner, tiny_bundle, args, message):
    res = invoke(runner, run_main, [tiny_bundle, "-p", PROMPT, *args])
    assert res.exit_code == 2 and message in res.stderr and res.stderr.startswith("Error: ")


def test_usage_errors(runner, tiny_bundle, tmp_path):
    assert invoke(runner, run_main, [tiny_bundle]).exit_code == 2                  # no prompt
    res = invoke(runner, run_main, [str(tmp_path / "missing"), "-p", "x"])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = invoke(runner, run_main, [str(tmp_path), "-p", "x"])                     # not a bundle
    assert res.exit_code == 2 and "no manifest.json" in res.stderr


def test_help_documents_options(runner):
    text = invoke(runner, run_main, ["--help"]).output
    for opt in ("--prompt", "--prompts", "--task", "--stream", "--no-speculate", "--chat / --no-chat",
                "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop",
                "--max-context", "--device", "--json", '"messages"'):
        assert opt in text
    assert "inspect" in invoke(runner, main, ["--help"]).output


def test_sampling_with_seed_is_reproducible(runner, tiny_bundle):
    args = [tiny_bundle, "-p", PROMPT, "-n", 16, "--temperature", 0.8, "--top-p", 0.9, "--top-k", 50,
            "--seed", 3, "--json"]
    a, b = invoke(runner, run_main, args), invoke(runner, run_main, args)
    assert a.exit_code == 0 and json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]


# -- inspect ----------------------------------------------------------------------------------

def test_inspect_text(runner, tiny_bundle):
    res = invoke(runner, main, ["inspect", tiny_bundle])
    assert res.exit_code == 0, res.output
    out = res.stdout
    for part in ("Model tiny (llama, 4 layers", "max context 512 tokens", "full.onnx", "weights.bin",
                 "int8skip (default)", "skip layers 1", "precision int8, k=4", "fp32sub",
                 "skip attention 2", "confidence stop 0.3", "vocabulary 297 tokens", "figures: none recorded"):
        assert part in out, part


def test_inspect_json_and_figures(runner, tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    rel = "profiles/int8skip.json"
    with open(os.path.join(bundle, rel)) as f:
        profile = json.load(f)
    profile["figures"] = {"acceptance_rate": 0.91, "mean_accepted_tokens": 3.2, "predicted_speedup": 1.4,
                          "measured_speedup": 1.3, "split": "validation", "validation_prompts": 8,
                          "identical_to_plain": True, "measured_on": "2 CPU cores",
                          "search_acceptance": 0.88, "accept_histogram": {"0": 1, "4": 7}}
    rewrite_file(bundle, rel, json.dumps(profile).encode())
    d = json.loads(invoke(runner, main, ["inspect", bundle, "--json"]).stdout)
    assert d["model"]["name"] == "tiny" and d["model"]["architecture"] == "llama"
    assert d["model"]["weights_sha256"] and d["max_context"] == 512 and d["default_profile"] == "int8skip"
    assert {g["file"] for g in d["graphs"]} >= {"full.onnx"} and all(g["bytes"] > 0 for g in d["graphs"])
    assert d["profiles"]["fp32sub"]["draft"] == {
        "skip_layers": [], "skip_attention": [2], "skip_mlp": [], "precision": "fp32",
        "max_draft_tokens": 3, "confidence_stop": 0.3, "vocab_subset_size": 297}
    assert d["profiles"]["int8skip"]["figures"]["measured_speedup"] == 1.3
    text = invoke(runner, main, ["inspect", bundle]).stdout
    assert ("figures: acceptance 0.910, mean accepted tokens 3.20, predicted speed-up 1.40x, "
            "measured speed-up 1.30x, split validation, prompts 8, identical to plain decoding True, "
            "measured on 2 CPU cores, search_acceptance 0.88") in text


# -- verify -----------------------------------------------------------------------------------

def test_verify_sound(runner, tiny_bundle):
    res = invoke(runner, main, ["verify", tiny_bundle])
    assert res.exit_code == 0 and res.stdout.startswith("OK:")
    assert json.loads(invoke(runner, main, ["verify", tiny_bundle, "--json"]).stdout)["ok"] is True


def test_verify_corrupt_bundle(runner, tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    graph = next(f for f in sorted(os.listdir(bundle)) if f.startswith("draft_") and f.endswith(".onnx"))
    path = os.path.join(bundle, graph)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = invoke(runner, main, ["verify", bundle])
    assert res.exit_code == 1
    assert res.stdout.startswith("FAILED") and graph in res.stdout and "sha256" in res.stdout
    report = json.loads(invoke(runner, main, ["verify", bundle, "--json"]).stdout)
    assert report["ok"] is False and any(graph in p for p in report["problems"])
    # Loading it to generate refuses it in one line.
    res = invoke(runner, run_main, [bundle, "-p", "x"])
    assert res.exit_code == 2 and res.stderr.startswith("Error: ") and graph in res.stderr


def test_verify_lists_every_problem(runner, tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    os.remove(os.path.join(bundle, "full.onnx"))
    with open(os.path.join(bundle, "tokenizer.json"), "a") as f:
        f.write(" ")
    res = invoke(runner, main, ["verify", bundle])
    assert res.exit_code == 1 and "2 problem(s)" in res.stdout
    assert "full.onnx: listed in the manifest but missing" in res.stdout and "tokenizer.json" in res.stdout


def test_verify_and_inspect_not_a_bundle(runner, tmp_path):
    assert invoke(runner, main, ["verify", str(tmp_path / "nope")]).exit_code == 2
    (tmp_path / "manifest.json").write_text("{not json")
    res = invoke(runner, main, ["verify", str(tmp_path)])
    assert res.exit_code == 1 and "not valid JSON" in res.stdout
    res = invoke(runner, main, ["inspect", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.startswith("Error: ") and "not valid JSON" in res.stderr

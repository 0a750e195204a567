"""conflayers-bench: a smoke run on the tiny bundle (JSON fields, the lossless property of every
runtime system, plain's speed-up of 1.0), the reference systems on a saved tiny HF model,
several tasks in one run, --memory, the plot subcommand, and bad input (`Error:` line, exit 2).

The real-model smoke test (2 prompts, 16 tokens, every system) runs on the session's SmolLM2
bundle, or on the bundle named by CONFLAYERS_TEST_BUNDLE:

    CONFLAYERS_TEST_BUNDLE=/path/to/bundle pytest -m real_model tests/test_bench.py
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from conflayers.tools.bench import main

RUNTIME_SYSTEMS = ["plain", "profile:fp32sub", "profile:int8skip", "auto"]
FIELDS = ("name", "task", "status", "tokens_per_s", "tokens_per_s_per_prompt", "speedup_vs_plain",
          "mean_accepted_tokens", "acceptance_rate", "identical_to_plain", "n_prompts", "ttft_s",
          "ttft_s_per_prompt", "rss", "bandwidth_gb_s", "bytes_per_token", "accept_length_histogram")


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    rc = main([str(a) for a in args] + ["--json", str(out)])
    doc = json.loads(out.read_text()) if out.exists() else None
    return rc, doc


def by_name(doc, task=None):
    return {s["name"]: s for s in doc["systems"] if task is None or s["task"] == task}


@pytest.fixture(scope="module")
def smoke(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    png = tmp / "bench.png"
    rc, doc = bench(tmp, tiny_bundle, "--task", "gsm8k", "--num-prompts", 2, "--max-new-tokens", 16,
                    "--systems", ",".join(RUNTIME_SYSTEMS + ["hf"]), "--plot", png)
    return rc, doc, png


def test_smoke_json(smoke):
    rc, doc, png = smoke
    assert rc == 0
    systems = by_name(doc)
    assert list(systems) == RUNTIME_SYSTEMS + ["hf"]
    for name in RUNTIME_SYSTEMS:
        s = systems[name]
        for f in FIELDS:
            assert f in s, (name, f)
        assert s["status"] == "ok"
        assert s["n_prompts"] == 2 and len(s["tokens_per_s_per_prompt"]) == 2
        assert s["tokens_per_s"] > 0 and s["ttft_s"] > 0
        assert s["identical_to_plain"] is True, s["mismatches"]      # the lossless property
        assert s["bandwidth_gb_s"] > 0
        assert s["rss"]["rss_mb"] > 0
    assert systems["plain"]["speedup_vs_plain"] == 1.0
    assert systems["plain"]["mean_accepted_tokens"] is None           # not speculative
    for name in ("profile:fp32sub", "profile:int8skip", "auto"):
        s = systems[name]
        assert s["speculative"] is True
        assert 0.0 <= s["acceptance_rate"] <= 1.0
        assert s["speedup_vs_plain"] == pytest.approx(s["tokens_per_s"] / systems["plain"]["tokens_per_s"])
        assert sum(s["accept_length_histogram"].values()) == s["draft_steps"]
        assert s["weight_bytes_draft"]
    assert systems["profile:fp32sub"]["profiles_used"] == {"fp32sub": 2}
    # the tiny bundle's model ("random init") cannot be resolved: hf is skipped with the reason
    assert systems["hf"]["status"] == "skipped" and "--hf-model" in systems["hf"]["reason"]
    meta = doc["meta"]
    assert meta["machine"]["cores"] == os.cpu_count()
    assert meta["settings"]["chat"] is True      # default: the bundle's chat template, since it has one
    sec = meta["sections"][0]
    assert sec["task"] == "gsm8k" and sec["part"] == "evaluation" and sec["n_prompts"] == 2
    assert sec["calibration_overlap"] == []
    assert all(u.startswith("gsm8k/test/") for u in sec["uids"])
    assert meta["weight_accounting"]["full_bytes"] > 0
    assert png.exists() and png.stat().st_size > 1000


def test_table_printed(tiny_bundle, tmp_path, capsys):
    rc, _ = bench(tmp_path, tiny_bundle, "--task", "gsm8k", "--num-prompts", 1, "--max-new-tokens", 4,
                  "--systems", "plain,auto")
    out = capsys.readouterr().out
    assert rc == 0
    assert "CPU cores" in out and "onnxruntime" in out and "command: conflayers-bench" in out
    assert "1 prompt of the evaluation part" in out and "calibration never overlapped" in out
    assert "* auto" in out


def test_reference_systems_on_saved_hf_model(tiny_bundle, tiny_llama, tiny_tokenizer_dir, tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_llama.save_pretrained(hf_dir)
    for f in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, f), hf_dir)
    rc, doc = bench(tmp_path, tiny_bundle, "--task", "gsm8k", "--num-prompts", 2, "--max-new-tokens", 12,
                    "--systems", "plain,hf,hf-prompt-lookup", "--hf-model", hf_dir)
    assert rc == 0
    systems = by_name(doc)
    assert doc["meta"]["hf_matches_bundle_weights"] is True
    for name in ("hf", "hf-prompt-lookup"):
        s = systems[name]
        assert s["status"] == "ok", s["reason"]
        assert s["n_prompts"] == 2 and s["tokens_per_s"] > 0
        assert s["identical_to_plain"] is not None
        assert s["bandwidth_gb_s"] > 0
    assert systems["hf-prompt-lookup"]["speculative"] is True
    assert systems["hf"]["speculative"] is False


def test_several_tasks_and_headline(tiny_bundle, tmp_path):
    rc, doc = bench(tmp_path, tiny_bundle, "--task", "gsm8k", "--task", "spec_bench:qa", "--num-prompts", 1,
                    "--max-new-tokens", 6, "--systems", "plain,auto,profile:int8skip")
    assert rc == 0
    assert [s["task"] for s in doc["meta"]["sections"]] == ["gsm8k", "spec_bench:qa"]
    qa = by_name(doc, "spec_bench:qa")
    assert qa["auto"]["headline"] and not qa["profile:int8skip"]["headline"]
    assert doc["meta"]["sections"][1]["headline"] == ["auto", "profile:spec_bench-qa"]
    assert all(s["identical_to_plain"] for s in doc["systems"])
    assert by_name(doc, "gsm8k")["plain"]["speedup_vs_plain"] == 1.0


def test_prompts_file_and_no_chat(tiny_bundle, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Janet has 3 apples and buys 5 more."}\n{"prompt": "The train leaves at 9."}\n')
    rc, doc = bench(tmp_path, tiny_bundle, "--prompts", f, "--num-prompts", 5, "--max-new-tokens", 6,
                    "--systems", "profile:fp32sub", "--no-chat")
    assert rc == 0
    assert list(by_name(doc)) == ["plain", "profile:fp32sub"]     # plain is always the baseline
    sec = doc["meta"]["sections"][0]
    assert sec["n_prompts"] == 2 and not sec["named"]
    assert doc["meta"]["settings"]["chat"] is False


def test_memory_subprocesses(tiny_bundle, tmp_path):
    rc, doc = bench(tmp_path, tiny_bundle, "--task", "gsm8k", "--num-prompts", 1, "--max-new-tokens", 4,
                    "--systems", "plain,profile:int8skip", "--memory")
    assert rc == 0
    rm = doc["meta"]["runtime_memory"]
    assert rm["errors"] == {}
    assert rm["full_only_mb"] > 0 and rm["full_plus_drafts_mb"] > 0 and rm["ratio"] > 0
    assert rm["target"] == 1.5
    for s in doc["systems"]:
        assert s["rss"]["peak_rss_mb"] > 0
        assert "subprocess" in s["rss"]["method"]


def test_plot_subcommand(smoke, tmp_path):
    _, doc, _ = smoke
    a = tmp_path / "a.json"
    a.write_text(json.dumps(doc))
    b_doc = json.loads(json.dumps(doc))
    for s in b_doc["systems"]:
        s["task"] = "other"
    b = tmp_path / "b.json"
    b.write_text(json.dumps(b_doc))
    out = tmp_path / "both.png"
    assert main(["plot", str(a), "--json", str(b), "-o", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 1000


@pytest.mark.parametrize("args, expect", [
    (["--systems", "plain,bogus"], "unknown system 'bogus'; available: plain, profile:fp32sub"),
    (["--systems", "profile:nope"], "unknown system 'profile:nope'"),
    (["--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["--task", "spec_bench:nope"], "Spec-Bench has no category 'nope'"),
    (["--task", "gsm8k", "--prompts", "x.jsonl"], "not allowed with argument"),
    (["--num-prompts", "0", "--task", "gsm8k"], "--num-prompts must be at least 1"),
])
def test_bad_input(tiny_bundle, args, expect, capsys):
    assert main([tiny_bundle, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and expect in err
    assert "Traceback" not in err


def test_missing_bundle(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--task", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "does not exist" in err


@pytest.mark.real_model
def test_real_bundle_smoke(tmp_path, request):
    """CI smoke test on a real compiled bundle: every runtime system is lossless; plain is 1.0x;
    the reference systems (transformers, prompt lookup, ONNX Runtime GenAI, all fp32) run, and give
    the same tokens when the bundle's target is fp32 too (a native target computes with the GGUF's
    4-bit weights: other tokens)."""
    bundle = os.environ.get("CONFLAYERS_TEST_BUNDLE") or request.getfixturevalue("smollm2_bundle")
    from conflayers.runtime import Bundle
    opened = Bundle.open(bundle, verify=False)
    profiles = sorted(opened.profiles)
    fp32_target = opened.manifest["model"].get("target", "fp32") == "fp32"
    systems = ["plain", *[f"profile:{p}" for p in profiles]] + (["auto"] if profiles else []) + \
        ["hf", "hf-prompt-lookup", "genai"]
    task = os.environ.get("CONFLAYERS_TEST_BENCH_TASK")
    rc, doc = bench(tmp_path, bundle, *(["--task", task] if task else []), "--num-prompts", 2,
                    "--max-new-tokens", 16, "--systems", ",".join(systems))
    assert rc == 0
    found = by_name(doc)
    assert found["plain"]["speedup_vs_plain"] == 1.0
    for name in systems[:-3]:
        assert found[name]["status"] == "ok"
        assert found[name]["identical_to_plain"] is True, found[name]["mismatches"]
        assert found[name]["tokens_per_s"] > 0
    for name in ("hf", "hf-prompt-lookup", "genai"):
        assert found[name]["status"] == "ok", found[name].get("reason")
        assert found[name]["tokens_per_s"] > 0
        if fp32_target:
            assert found[name]["identical_to_plain"] is True


LLAMACPP_SYSTEMS = ["llamacpp", "llamacpp-prompt-lookup"]


def test_llamacpp_install_hint_when_not_installed(tiny_bundle, tmp_path, monkeypatch, capsys):
    """Without llama-cpp-python: asked for by name, the bench stops with the install hint; as part
    of the default (all systems), each llama.cpp row carries the hint and the rest runs."""
    from conflayers.tools.bench_systems import LLAMA_CPP_INSTALL_HINT
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp -> ImportError
    assert main([tiny_bundle, "--task", "gsm8k", "--num-prompts", "1", "--max-new-tokens", "4",
                 "--systems", "plain,llamacpp"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"Error: {LLAMA_CPP_INSTALL_HINT}"
    assert "bash tools/install_llama_cpp.sh" in LLAMA_CPP_INSTALL_HINT
    rc, doc = bench(tmp_path, tiny_bundle, "--task", "gsm8k", "--num-prompts", 1, "--max-new-tokens", 4)
    assert rc == 0
    systems = by_name(doc)
    for name in LLAMACPP_SYSTEMS:
        assert systems[name]["status"] == "skipped"
        assert systems[name]["reason"] == LLAMA_CPP_INSTALL_HINT
    assert systems["plain"]["status"] == "ok" and systems["plain"]["disk"]["bytes"] > 0
    assert systems["plain"]["disk"]["what"] == "bundle directory"
    assert doc["meta"]["settings"]["threads"] > 0
    out = capsys.readouterr().out
    assert f"llamacpp               skipped: {LLAMA_CPP_INSTALL_HINT}" in out and "disk MB" in out


def test_gguf_location(tmp_path):
    """--gguf wins; a .gguf source in the manifest is used; otherwise the error says to pass --gguf."""
    from conflayers.tools.bench_systems import Unavailable, locate_gguf
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert locate_gguf({"name": "x", "source": "random init"}, str(f)) == str(f)
    assert locate_gguf({"name": "m", "source": str(f)}, None) == str(f)
    with pytest.raises(Unavailable, match="--gguf .*no such file"):
        locate_gguf({}, str(tmp_path / "nope.gguf"))
    with pytest.raises(Unavailable, match="pass --gguf FILE"):
        locate_gguf({"name": "tiny", "source": "random init"}, None)


@pytest.mark.real_model
def test_llamacpp_on_real_gguf(tmp_path, request):
    """llama.cpp plain and prompt lookup on the GGUF file of the bundle's model (the alias's
    file from the model resolver, or CONFLAYERS_TEST_GGUF): both run and report speed, TTFT,
    identity with plain, disk size and peak RSS (--memory)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash tools/install_llama_cpp.sh)")
    from conflayers.runtime import Bundle
    from conflayers.tools.bench_systems import Unavailable, locate_gguf
    bundle = os.environ.get("CONFLAYERS_TEST_BUNDLE") or request.getfixturevalue("smollm2_bundle")
    try:
        gguf = locate_gguf(Bundle.open(bundle, verify=False).manifest["model"], os.environ.get("CONFLAYERS_TEST_GGUF"))
    except Unavailable as e:
        pytest.skip(f"no GGUF file for the bundle's model: {e} (set CONFLAYERS_TEST_GGUF)")
    rc, doc = bench(tmp_path, bundle, "--task", "gsm8k", "--num-prompts", 1, "--max-new-tokens", 16,
                    "--systems", "plain," + ",".join(LLAMACPP_SYSTEMS), "--gguf", gguf, "--memory")
    assert rc == 0
    found = by_name(doc)
    for name in LLAMACPP_SYSTEMS:
        s = found[name]
        assert s["status"] == "ok", s["reason"]
        assert s["tokens_per_s"] > 0 and s["ttft_s"] > 0
        assert s["identical_to_plain"] is not None
        assert s["disk"]["bytes"] == os.path.getsize(gguf)
        assert s["rss"]["peak_rss_mb"] > 0, s["rss"]
    assert found["llamacpp-prompt-lookup"]["speculative"] is True
    assert found["llamacpp-prompt-lookup"]["draft_steps"] >= 0


def test_unguarded_system(tiny_bundle, tmp_path, capsys):
    """unguarded:<name> runs that profile without the speculation guard, beside the guarded one;
    both stay identical to plain, and the guard is back on for the systems after it."""
    rc, doc = bench(tmp_path, tiny_bundle, "--task", "gsm8k", "--num-prompts", 2, "--max-new-tokens", 40,
                    "--systems", "plain,profile:int8skip,unguarded:int8skip")
    assert rc == 0
    systems = by_name(doc)
    assert all(s["identical_to_plain"] for s in doc["systems"])
    assert systems["unguarded:int8skip"]["profiles_used"] == {"int8skip": 2}
    assert systems["unguarded:int8skip"]["guard_stopped_prompts"] == 0
    assert doc["meta"]["settings"]["guard"] is True
    assert main([str(tiny_bundle), "--systems", "plain,unguarded:nope"]) == 2
    assert "unknown system 'unguarded:nope'" in capsys.readouterr().err


def test_genai_builder_gets_flat_rope_fields_for_gemma3():
    """transformers 5 keeps Gemma 3's RoPE per layer type; the GenAI builder shim gives the builder
    the flat fields it reads, with the same thetas, and leaves flat configs as they are."""
    import transformers

    from conflayers.tools.genai_builder import flatten_rope
    c = flatten_rope(transformers.Gemma3TextConfig())
    assert c.rope_parameters["rope_type"] == "default"
    assert c.rope_theta == c.rope_parameters["rope_theta"] == 1_000_000.0     # the global layers'
    assert c.rope_local_base_freq == 10_000.0                                 # the sliding layers'
    llama = transformers.LlamaConfig()
    before = dict(llama.rope_parameters)
    assert flatten_rope(llama).rope_parameters == before and not hasattr(llama, "rope_local_base_freq")


def test_a_reference_system_failing_on_a_later_task_keeps_its_earlier_rows():
    """run_sections + summarize with a reference system that fails on the second task's prompt:
    the first task reports its figures, the second says it failed and where (not the whole
    system marked failed everywhere)."""
    from conflayers.tools import bench
    from conflayers.tools.bench_systems import BenchPrompt, Run

    class Fake:
        speculative = False

        def __init__(self, fail_on=None):
            self.fail_on = fail_on

        def generate(self, prompt, max_new):
            if prompt.uid == self.fail_on:
                raise RuntimeError("cannot rewind")
            return Run(token_ids=[1, 2, 3], generated=3, ttft_s=0.01, tokens_per_s=100.0, total_s=0.05, full_passes=3)

        def weight_bytes(self, run):
            return 1000, 0

    slots = [bench.Slot("plain"), bench.Slot("genai-int4-ngram")]
    slots[0].system, slots[1].system = Fake(), Fake(fail_on="b/1")
    slots[0].kind = "genai"           # (a reference kind: no runtime accounting in this fake)
    for s in slots:
        s.status = "ok"
    sections = [{"task": t, "bench_prompts": [BenchPrompt(f"{t}/{i}", "x", None, [5, 6]) for i in range(2)]}
                for t in ("a", "b")]
    bench.run_sections(sections, slots, 8)
    first, second = (bench.summarize(sec, slots, None) for sec in sections)
    row = {r["name"]: r for r in first}["genai-int4-ngram"]
    assert row["status"] == "ok" and row["n_prompts"] == 2 and row["tokens_per_s"] == 100.0
    row = {r["name"]: r for r in second}["genai-int4-ngram"]
    assert row["status"] == "failed" and "cannot rewind" in row["reason"] and "b/1" in row["reason"]
    assert row["tokens_per_s"] is None

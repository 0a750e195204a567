"""The load bench (tools/conflayers/tools/loadbench.py) end to end on the tiny bundle: it starts the
servers itself, runs closed-loop clients at concurrency 1 and 2, samples the servers' RSS, and
its report is well formed with no errors. The GenAI engine anchor runs on the tiny model when
onnxruntime-genai is installed (its builder converts the tiny checkpoint in seconds). No
wall-clock assertions: only shapes, counts and consistency."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from conflayers.tools import loadbench


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    import tiny
    path = tmp_path_factory.mktemp("loadbench") / "prompts.jsonl"
    with open(path, "w") as f:
        for text in tiny.CORPUS[:6]:
            f.write(json.dumps({"prompt": text}) + "\n")
    return str(path)


def run(args, tmp_path) -> dict:
    out = tmp_path / "report.json"
    assert loadbench.main([*args, "--json", str(out)]) == 0
    with open(out) as f:
        return json.load(f)


def check_levels(report: dict, systems: list[str], levels: list[int], requests: int):
    rows = report["levels"]
    assert [(r["system"], r["concurrency"]) for r in rows] == [(s, c) for c in levels for s in systems]
    for r in rows:
        assert r["errors"] == 0, r
        assert r["error_kinds"] == {}
        assert r["requests"] == max(requests, r["concurrency"])
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        for kind, unit in (("ttft", "s"), ("itl", "ms")):
            p50, p95, p99 = (r[f"{kind}_p{q}_{unit}"] for q in (50, 95, 99))
            assert all(math.isfinite(x) and x >= 0 for x in (p50, p95, p99)), r
            assert p50 <= p95 <= p99


def check_rss(rss: dict, pid: int, requests: int, every: int):
    assert rss["pid"] == pid
    assert rss["requests"] == requests and rss["errors"] == 0 and not rss["stopped_at_time_limit"]
    counts = [n for n, _ in rss["rss_mb"]]
    assert counts == list(range(0, requests + 1, every))
    assert all(mb > 0 for _, mb in rss["rss_mb"])
    assert rss["growth_mb"] == pytest.approx(rss["rss_mb"][-1][1] - rss["rss_mb"][0][1], abs=0.1)


def test_conflayers_batched_and_unbatched(tiny_bundle, prompts_file, tmp_path):
    report = run([tiny_bundle, "--systems", "batched,unbatched", "--concurrency", "1,2", "--requests", "3",
                  "--max-tokens", "8", "--max-batch", "2", "--task", prompts_file, "--prefill-chunk", "3",
                  "--burst", "6", "--rss-requests", "20", "--rss-every", "10", "--rss-concurrency", "2"], tmp_path)
    assert report["systems"] == ["batched", "unbatched"] and report["skipped"] == {}
    check_levels(report, ["batched", "unbatched"], [1, 2], 3)
    assert set(report["servers"]) == set(report["rss"]) == {"conflayers-batched", "conflayers"}
    assert "--max-batch" in report["servers"]["conflayers-batched"]["command"]
    assert "--max-concurrency" in report["servers"]["conflayers"]["command"]
    batched_cmd = report["servers"]["conflayers-batched"]["command"]       # prompts fed 3 tokens a pass
    assert batched_cmd[batched_cmd.index("--prefill-chunk") + 1] == "3"
    assert "--prefill-chunk" not in report["servers"]["conflayers"]["command"]
    plan = report["servers"]["conflayers-batched"]["speculation_plan"]     # what it printed at start-up
    assert set(plan) == {"int8skip", "fp32sub"} and all(p.endswith("(batch 1..2)") for p in plan.values())
    assert "speculation_plan" not in report["servers"]["conflayers"]
    for kind, server in report["servers"].items():
        check_rss(report["rss"][kind], server["pid"], 20, 10)
        assert not os.path.exists(f"/proc/{server['pid']}/status") or \
            "zombie" in open(f"/proc/{server['pid']}/status").read()       # stopped at the end
    # lossless under load: every answer to a prompt, batched or not, at 1 or 2 streams, is the same
    out = report["outputs"]
    assert out["reference"] == "unbatched" and out["reference_concurrency"] == 1
    for name in ("batched", "unbatched"):
        c = out["systems"][name]
        assert c["lossless"] and c["differ"] == [] and c["identical"] == c["prompts"] == 3
        assert c["answers"] == 3 + 3                       # each prompt once per level
    # a burst of 6 simultaneous connections per server: every one answered or cleanly refused
    assert set(report["bursts"]) == {"conflayers-batched", "conflayers"}
    for kind, (b,) in report["bursts"].items():
        assert b["connections"] == 6 and b["broken"] == {}, (kind, b)
        assert sum(b["statuses"].values()) == 6 and b["answered"] >= 1
        assert b["refused"] == b["refused_with_retry_after"]
    assert any("burst of 6 against conflayers-batched" in line for line in loadbench.burst_lines(report["bursts"]))
    table = loadbench.markdown_table(report)
    assert table.count("\n| batched |") == 2 and table.count("\n| unbatched |") == 2
    # each level is measured at a primed prompt cache, the first system's first level too (its
    # prompts were never sent before that level's priming): every answer reused its prompt's KV
    for r in report["levels"]:
        assert r["prompt_cache_hits"] == r["requests"], r
    # the batched server's batch guard is read after each of its levels; the unbatched one has none
    for r in report["levels"]:
        if r["system"] == "batched":
            assert set(r["batch_guard"]) == {"paused_sizes", "switches"} and r["batch_guard"]["paused_sizes"] <= 1
        else:
            assert "batch_guard" not in r, r
    assert "growth" in loadbench.rss_table(report)


def test_output_check_names_the_prompts_a_lossless_system_changed():
    """The comparison itself: the reference is the plain system's lowest-concurrency answer; a
    lossless system that answers one prompt differently at one level is named with that prompt,
    an anchor's differences are counted but never a failure."""
    outputs = {"batched": {0: [(1, "a"), (2, "a")], 1: [(1, "b"), (2, "B")]},
               "batched-plain": {0: [(1, "a"), (2, "a")], 1: [(1, "b"), (2, "b")]},
               "genai": {0: [(1, "x")], 1: [(1, "b")]}}
    kinds = [("batched", "conflayers-batched"), ("batched-plain", "conflayers-batched"), ("genai", "genai-engine")]
    check = loadbench.output_check(outputs, kinds)
    assert check["reference"] == "batched-plain" and check["reference_concurrency"] == 1
    assert check["systems"]["batched"] == {"lossless": True, "prompts": 2, "answers": 4, "identical": 1,
                                           "differ": [1]}
    assert check["systems"]["genai"]["identical"] == 1 and not check["systems"]["genai"]["lossless"]
    assert loadbench.lossless_failures(check) == ["batched"]
    assert any("DIFFER: prompts [1]" in line for line in loadbench.output_lines(check))
    assert loadbench.output_check({"genai": {0: [(1, "x")]}}, [("genai", "genai-engine")]) == {}


def test_rss_reads_a_real_pid(tiny_bundle):
    kb = loadbench.read_rss_kb(os.getpid())
    with open("/proc/self/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert kb > 0 and abs(kb - own) < 64 * 1024          # the same process, read twice
    with pytest.raises(OSError):
        loadbench.read_rss_kb(2 ** 22 + 12345)            # above the kernel's pid limit: no such process


def test_against_a_running_server(tiny_engine, prompts_file, tmp_path):
    """--url mode (a server the bench did not start), with --server-pid for the RSS run."""
    import threading

    from conflayers.runtime.serving.http import make_server
    server = make_server(tiny_engine, "127.0.0.1", 0, 2, log_stream=open(os.devnull, "w"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d" % server.server_address[1]
        report = run(["--url", url, "--concurrency", "1,2", "--requests", "2", "--max-tokens", "6",
                      "--task", prompts_file, "--rss-requests", "4", "--rss-every", "2",
                      "--server-pid", str(os.getpid())], tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    check_levels(report, ["url"], [1, 2], 2)
    check_rss(report["rss"]["url"], os.getpid(), 4, 2)


@pytest.mark.parametrize("args, message", [
    (["--url", "http://example.com:8000"], "only drives servers on this machine"),
    (["BUNDLE", "--systems", "batched,nope"], "unknown nope"),
    (["BUNDLE", "--concurrency", "1,x"], "comma-separated list"),
    (["--url", "http://127.0.0.1:9", "--rss-requests", "10"], "needs --server-pid"),
    ([], "give a BUNDLE"),
    (["BUNDLE", "--prefill-chunk", "0"], "--prefill-chunk must be positive"),
    (["BUNDLE", "--burst", "10,x"], "--burst 10,x: a comma-separated list"),
    (["BUNDLE", "--burst", "0"], "each burst must be 1..10000"),
])
def test_bad_arguments(args, message, capsys):
    assert loadbench.main(args) == 2
    assert message in capsys.readouterr().err


def test_genai_engine_anchor(tiny_bundle, tiny_llama, tiny_tokenizer_dir, prompts_file, tmp_path, monkeypatch):
    """GenAI's og.Engine behind genai-serve, on the tiny model (built by GenAI's own builder into a
    temporary cache), hit by the same clients; its /stats count the rows it advanced per pass."""
    pytest.importorskip("onnxruntime_genai",
                        reason="onnxruntime-genai is not installed (pip install conflayers[bench])")
    hf_dir = tmp_path / "hf"
    tiny_llama.save_pretrained(hf_dir)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), hf_dir)
    monkeypatch.setenv("CONFLAYERS_CACHE", str(tmp_path / "cache"))
    report = run([tiny_bundle, "--systems", "genai", "--hf-model", str(hf_dir), "--concurrency", "1,2",
                  "--requests", "3", "--max-tokens", "8", "--max-batch", "2", "--task", prompts_file,
                  "--rss-requests", "6", "--rss-every", "3"], tmp_path)
    assert report["skipped"] == {}, report["skipped"]
    assert report["genai_model_dir"].startswith(str(tmp_path / "cache"))
    check_levels(report, ["genai"], [1, 2], 3)
    for row in report["levels"]:
        mean_rows, max_rows = row["rows_per_pass"]
        assert 1 <= mean_rows <= max_rows
    check_rss(report["rss"]["genai-engine"], report["servers"]["genai-engine"]["pid"], 6, 3)


def test_llamacpp_server_not_installed_is_skipped_with_what_to_do(tiny_bundle, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setattr(loadbench, "llama_server_path", lambda: None)
    report = run([tiny_bundle, "--systems", "unbatched,llamacpp-server", "--concurrency", "1", "--requests", "1",
                  "--max-tokens", "4", "--task", prompts_file], tmp_path)
    assert "install_llama_server.sh" in report["skipped"]["llamacpp-server"]
    assert report["systems"] == ["unbatched"]
    check_levels(report, ["unbatched"], [1], 1)


def test_llamacpp_server_anchor(tiny_bundle, prompts_file, tmp_path):
    """llama.cpp's llama-server on SmolLM2's GGUF (where tools/install_llama_server.sh has built it),
    --parallel slots, driven by the same clients as conflayers-serve."""
    if not loadbench.llama_server_path():
        pytest.skip("llama-server is not built (bash tools/install_llama_server.sh)")
    from conflayers.compiler.models import resolve_model
    gguf = resolve_model("smollm2-135m-instruct", progress=False).gguf
    report = run([tiny_bundle, "--systems", "llamacpp-server", "--gguf", gguf, "--concurrency", "1,2",
                  "--requests", "3", "--max-tokens", "8", "--max-batch", "2", "--max-context", "512",
                  "--task", prompts_file], tmp_path)
    assert report["skipped"] == {}
    check_levels(report, ["llamacpp-server"], [1, 2], 3)
    cmd = report["servers"]["llamacpp-server"]["command"]
    assert cmd[cmd.index("--parallel") + 1] == "2" and cmd[cmd.index("--ctx-size") + 1] == "1024"

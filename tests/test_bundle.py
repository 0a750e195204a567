"""The one bundle reader refuses what it must, with errors that say which file or field; the
writer never leaves a half-written bundle."""
import json
import os
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
    edit_manifest(copy, lambda m: m.__setitem__("format_version", 2))
    with pytest.raises(BundleError, match="format version 2 is newer than this runtime reads"):
        Bundle.open(copy)


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
    assert [p for p in os.listdir(parent) if p.startswith(".b.")] == []
    assert sha256_file(os.path.join(copy, "manifest.json")) == before
    assert Bundle.open(copy).profiles

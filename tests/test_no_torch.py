"""The runtime works in a process where torch and transformers cannot be imported, and importing
it does not pull in the compiler."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import importlib.abc, importlib.util, sys

    BLOCKED = ("torch", "transformers")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Block())
""")

SCRIPT = BLOCKER + textwrap.dedent("""
    import importlib, json, pkgutil
    checks = {}
    for mod in ("torch", "transformers", "torch.nn", "transformers.models.llama"):
        try:
            importlib.import_module(mod)
            checks[mod] = "imported"
        except ImportError:
            checks[mod] = "blocked"
    try:
        importlib.util.find_spec("torch")
        checks["find_spec(torch)"] = "found"
    except ImportError:
        checks["find_spec(torch)"] = "blocked"

    import conflayers.runtime as rt
    from conflayers.runtime import Engine
    # every module of the runtime package imports without torch
    modules = sorted(m.name for m in pkgutil.iter_modules(rt.__path__, "conflayers.runtime."))
    for m in modules:
        importlib.import_module(m)

    engine = Engine.load(sys.argv[1])
    out = {"checks": checks, "modules": modules, "profiles": engine.profiles, "runs": {}}
    requests = {
        "prompt": dict(prompt="Janet has 3 apples and buys 5 more.", max_new_tokens=24),
        "chat": dict(messages=[{"role": "user", "content": "What is 12 times 7?"}], max_new_tokens=24),
    }
    for rname, kw in requests.items():
        plain = engine.generate(speculate=False, **kw)
        out["runs"][rname] = {"plain": {"ids": plain.token_ids, "text": plain.text}}
        for task in engine.profiles:
            spec = engine.generate(task=task, **kw)
            streamed = "".join(c.text for c in engine.generate(task=task, stream=True, **kw))
            out["runs"][rname][task] = {"ids": spec.token_ids, "text": spec.text, "streamed": streamed,
                                        "drafted": spec.metrics.drafted_tokens}
    out["loaded"] = sorted(m for m in sys.modules
                           if m.split(".")[0] in ("torch", "transformers")
                           or m.startswith("conflayers.compiler"))
    print("RESULT" + json.dumps(out))
""")


def _run(code, *args):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)) + "/..")
    assert proc.returncode == 0, f"subprocess failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return proc


def test_runtime_without_torch(tiny_bundle, tiny_engine):
    proc = _run(SCRIPT, tiny_bundle)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stdout
    res = json.loads(line[-1][len("RESULT"):])
    # torch and transformers really were unavailable
    assert res["checks"] == {"torch": "blocked", "transformers": "blocked", "torch.nn": "blocked",
                             "transformers.models.llama": "blocked", "find_spec(torch)": "blocked"}
    assert res["loaded"] == [], f"modules loaded that the runtime must not need: {res['loaded']}"
    assert "conflayers.runtime.engine" in res["modules"]
    assert res["profiles"] == ["fp32sub", "int8skip"]
    for rname, runs in res["runs"].items():
        plain = runs["plain"]
        assert len(plain["ids"]) > 0
        for task in res["profiles"]:
            assert runs[task]["ids"] == plain["ids"], f"{rname}/{task}: speculative != plain"
            assert runs[task]["text"] == runs[task]["streamed"] == plain["text"]
            assert runs[task]["drafted"] > 0
    # and it generates what this (torch-importing) process generates
    here = tiny_engine.generate("Janet has 3 apples and buys 5 more.", max_new_tokens=24, speculate=False)
    assert res["runs"]["prompt"]["plain"]["ids"] == here.token_ids


def test_importing_the_runtime_does_not_import_the_compiler():
    code = textwrap.dedent("""
        import sys, json
        import conflayers.runtime
        from conflayers.runtime import Engine, Bundle, Profile
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("conflayers.compiler")
                                or m.split(".")[0] in ("torch", "transformers"))))
    """)
    proc = _run(code)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_blocker_blocks():
    """The import blocker itself works (so the tests above can fail)."""
    code = BLOCKER + textwrap.dedent("""
        try:
            import torch
            print("IMPORTED")
        except ImportError as e:
            print("BLOCKED", e)
    """)
    proc = _run(code)
    assert "BLOCKED" in proc.stdout and "IMPORTED" not in proc.stdout

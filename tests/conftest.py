"""Shared fixtures: tiny randomly initialised models (built here, in seconds) and, for the
real-model tests, SmolLM2-135M-Instruct resolved through the same alias path users take."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def kernel_library():
    """The built kernel library; built here if setup did not (skipped only where it cannot be
    built, or where this CPU runs none of its kernels)."""
    import shutil
    import subprocess
    from conflayers.runtime import kernels
    if not os.path.isfile(kernels.BUILT):
        missing = [t for t in ("g++", "curl", "dpkg-deb") if shutil.which(t) is None]
        if missing:
            pytest.skip(f"cannot build the kernel library here: no {', '.join(missing)}")
        subprocess.run(["bash", os.path.join(REPO, "tools", "build_kernels.sh")], check=True)
    if kernels.cpu_path(kernels.BUILT) == "none":
        pytest.skip("this CPU has no AVX2+FMA+F16C: the library registers no kernels (the ONNX functions run)")
    return kernels.BUILT


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    import tiny
    return tiny.make_tokenizer(str(tmp_path_factory.mktemp("tiny_tok")))


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer_dir):
    import tiny
    return tiny.make_model("llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    """A bundle of the tiny Llama with two profiles: an int8 draft skipping a layer (full vocab)
    and an fp32 draft skipping a sub-layer with a vocabulary subset."""
    import tiny
    out = str(tmp_path_factory.mktemp("bundles") / "tiny")
    return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_bundle):
    """The reference engine: one request at a time, every prompt prefilled whole (no prompt
    cache), so engines that batch or reuse cached prompts are checked against fresh prefills."""
    from conflayers.runtime import Engine
    return Engine.load(tiny_bundle, prompt_cache=False)


SMOLLM2_SMALL_BUDGET = ["--num-prompts", "6", "--validation-prompts", "2", "--max-new-tokens", "64",
                        "--context-window", "48", "--max-iterations", "4", "--refine-budget", "2",
                        "--vocab-sizes", "8192", "--time-budget", "240", "--quiet"]


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory):
    """SmolLM2-135M-Instruct compiled for gsm8k on a small calibration budget, through the same
    CLI and alias path users take (shared by the real-model compile and bench tests)."""
    from click.testing import CliRunner

    from conflayers.compiler.cli import main
    out = str(tmp_path_factory.mktemp("smollm2") / "bundle")
    result = CliRunner().invoke(main, ["--model", "smollm2-135m-instruct", "--calib", "gsm8k", "--out", out]
                                + SMOLLM2_SMALL_BUDGET, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of 2 CPUs for one test module (Serve, if the module started it, and
    Ray shut down after it)."""
    import time

    ray = pytest.importorskip("ray")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"\nRay start-up: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    yield ray
    if "ray.serve" in sys.modules:
        sys.modules["ray.serve"].shutdown()
    ray.shutdown()

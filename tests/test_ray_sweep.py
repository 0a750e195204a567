"""conflayers-sweep --ray on a local Ray instance (2 CPUs, started once for this file): a sweep of
2 tasks on the tiny model gives the profiles the same compiles give locally (--cost-model makes
them repeatable), a failed cell is reported while the others land, and a rerun skips what is up
to date."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

pytest.importorskip("ray")

from test_compile import TINY_ARGS, strip_timings, tiny_model_dir  # noqa: E402,F401 - fixtures

from conflayers.compiler.cli import main as compile_main  # noqa: E402
from conflayers.compiler.sweep_cli import main as sweep_main  # noqa: E402
from conflayers.runtime import Bundle  # noqa: E402


@pytest.fixture(scope="module")
def calibs(tmp_path_factory):
    """Two tasks (two calibration files) and one that cannot compile (too few prompts)."""
    import tiny
    d = tmp_path_factory.mktemp("sweep_calib")
    texts = list(dict.fromkeys(tiny.CORPUS))
    for name, fmt in (("alpha", "{t} (variant {i})"), ("beta", "Question {i}: {t}")):
        with open(d / f"{name}.jsonl", "w") as f:
            for i, t in enumerate(texts + texts):
                f.write(json.dumps({"prompt": fmt.format(t=t, i=i)}) + "\n")
    with open(d / "tiny_set.jsonl", "w") as f:
        f.write(json.dumps({"prompt": texts[0]}) + "\n")
    return {n: str(d / f"{n}.jsonl") for n in ("alpha", "beta", "tiny_set")}


def compile_locally(model, calib, out, extra=()):
    result = CliRunner().invoke(compile_main, ["--model", model, "--calib", calib, "--out", out, *TINY_ARGS, *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def cost_model(tmp_path_factory, tiny_model_dir, calibs):
    """Timings measured once, reused by every compile below."""
    out = compile_locally(tiny_model_dir, calibs["alpha"], str(tmp_path_factory.mktemp("cost") / "b"))
    return os.path.join(out, "profiles", "alpha.json")


def sweep(args):
    result = CliRunner().invoke(sweep_main, args, catch_exceptions=False)     # click 8.2: stdout apart
    return result.exit_code, json.loads(result.stdout)


def test_sweep_on_ray_equals_local_compiles_and_skips_what_is_up_to_date(ray_local, tiny_model_dir, calibs,
                                                                        cost_model, tmp_path):
    local = str(tmp_path / "local")
    for task in ("alpha", "beta"):
        compile_locally(tiny_model_dir, calibs[task], local, ["--cost-model", cost_model])
    out_dir = str(tmp_path / "swept")
    args = ["--model", tiny_model_dir, "--out-dir", out_dir, "--ray", "--json", "--no-progress",
            "--calib", calibs["alpha"], "--calib", calibs["beta"], "--calib", calibs["tiny_set"],
            "--", *TINY_ARGS, "--cost-model", cost_model]
    code, report = sweep(args)
    # the cell that cannot compile fails with the compiler's reason; the other two land
    assert code == 1
    status = {c["task"]: c for c in report["cells"]}
    assert status["alpha"]["status"] == status["beta"]["status"] == "ok"
    assert status["tiny_set"]["status"] == "failed" and "prompts" in status["tiny_set"]["error"]
    bundle = os.path.join(out_dir, os.path.basename(tiny_model_dir))
    swept = Bundle.open(bundle, verify=True)
    assert sorted(swept.profiles) == ["alpha", "beta"]
    ref = Bundle.open(local, verify=True)
    for task in ("alpha", "beta"):
        got = {k: v for k, v in swept.profiles[task].raw.items() if k != "sweep"}
        assert strip_timings(got) == strip_timings(ref.profiles[task].raw)
        assert swept.profiles[task].raw["sweep"]["inputs_sha256"]
        assert os.path.isfile(os.path.join(bundle, "report", task, "report.md"))
    # a rerun compiles nothing that is up to date; the broken cell is tried again
    code, report = sweep(args)
    assert [c["status"] for c in report["cells"]] == ["skipped", "skipped", "failed"]
    # other inputs (here: the seed) make a cell stale again
    code, report = sweep(["--model", tiny_model_dir, "--out-dir", out_dir, "--ray", "--json", "--no-progress",
                          "--calib", calibs["beta"], "--", *TINY_ARGS, "--cost-model", cost_model, "--seed", "1"])
    assert code == 0 and [c["status"] for c in report["cells"]] == ["ok"]
    assert Bundle.open(bundle).profiles["beta"].raw["calibration"]["seed"] == 1
    assert sorted(Bundle.open(bundle).profiles) == ["alpha", "beta"]

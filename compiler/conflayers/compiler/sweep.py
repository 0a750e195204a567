"""conflayers-sweep: compile many (model, task, target) cells, locally one after another or as Ray
tasks, and add each profile to its model's bundle.

A cell is one `conflayers-compile` run in a subprocess (its own memory and threads; a crash
fails that cell only) into a temporary bundle on whichever machine runs it. Its profile and report
come back to the driver (this process), which adds them to the cell's bundle through the same
atomic export path as `conflayers-compile --profile` (pipeline.publish_profiles): graphs are
rebuilt from the weights, deterministically, so the driver's bundle holds what the cell validated.

A profile written by a sweep carries `sweep.inputs_sha256`: a hash of everything the cell was
asked to do (model argument and its files' sizes and times, calibration content, task, target,
compile flags, cost-model content, compiler version). A rerun skips a cell whose bundle already
holds its task's profile with that hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from conflayers.runtime.profile import task_name

from . import __version__

# Flags the sweep sets per cell; the rest of conflayers-compile's flags pass through unchanged.
CELL_FLAGS = ("--model", "--calib", "--target", "--out", "--task", "--profile")


class SweepError(ValueError):
    pass


@dataclass(frozen=True)
class Cell:
    model: str              # --model as given
    calib: str              # --calib as given
    target: str | None      # --target, None: the compiler's default (native, fp32 when not exact)
    task: str
    bundle: str             # the bundle its profile joins
    key: str                # sha256 of its inputs (see the module docstring)

    @property
    def label(self) -> str:
        return f"{os.path.basename(self.bundle)}/{self.task}" + (f" [{self.target}]" if self.target else "")


@dataclass
class Outcome:
    cell: Cell
    status: str                  # "ok", "skipped" (up to date) or "failed"
    seconds: float = 0.0         # the compile's wall time where it ran
    node: str | None = None
    error: str | None = None


# -- planning ---------------------------------------------------------------------------------


def split_cost_model(args: list[str]) -> tuple[list[str], str | None]:
    """(compile args without --cost-model, its path): the file's content travels with the cell."""
    rest, path, it = [], None, iter(args)
    for a in it:
        if a == "--cost-model":
            path = next(it, None)
        elif a.startswith("--cost-model="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, path


def check_compile_args(args: list[str]):
    """Refuse per-cell flags and anything conflayers-compile itself would refuse, now, not after a
    cell has started on the cluster."""
    import click

    from .cli import main as compile_main
    for a in args:
        if a.split("=", 1)[0] in CELL_FLAGS:
            raise SweepError(f"{a.split('=', 1)[0]} is set per cell by the sweep; pass it to conflayers-sweep "
                             "itself (--model, --calib, --target, --out-dir)")
    try:
        compile_main.make_context("conflayers-compile", list(args))
    except click.ClickException as e:
        raise SweepError(f"compile options after '--': {e.format_message()}") from None


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_stamp(model: str) -> list:
    """What identifies a local model's files cheaply (names, sizes, modification times); an alias
    or hub id is identified by its name (the alias's wheels are pinned by sha256)."""
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.basename(path), st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        out = []
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                st = os.stat(full)
                out.append([name, st.st_size, st.st_mtime_ns])
        return out
    return [model]


def _calib_stamp(calib: str) -> str:
    from . import data
    try:
        return json.dumps(data.describe(calib, "calibration"), sort_keys=True)
    except Exception as e:  # noqa: BLE001 - the cell will report it; the key just has to be stable
        return f"unreadable: {type(e).__name__}"


def inputs_key(model: str, calib: str, target: str | None, task: str, compile_args: list[str]) -> str:
    rest, cost_path = split_cost_model(compile_args)
    cost = None
    if cost_path:
        with open(cost_path, "rb") as f:
            cost = _sha256_bytes(f.read())
    record = {"model": model, "model_files": _model_stamp(model), "calib": _calib_stamp(calib),
              "target": target, "task": task, "args": rest, "cost_model": cost, "compiler": __version__}
    return _sha256_bytes(json.dumps(record, sort_keys=True).encode())


def plan(models: list[str], calibs: list[str], targets: list[str], out_dir: str, compile_args: list[str],
         model_name=None) -> list[Cell]:
    """Every (model, target, calib) cell. Bundles: <out_dir>/<model name>, or
    <out_dir>/<model name>-<target> when the sweep has several targets (one bundle per target)."""
    if model_name is None:
        from .models import resolve_model

        def model_name(m):
            return resolve_model(m, progress=False).name
    tasks = {}
    for calib in calibs:
        t = task_name(calib)
        if t in tasks:
            raise SweepError(f"--calib {calib!r} and {tasks[t]!r} both make the profile {t!r}")
        tasks[t] = calib
    cells = []
    for model in models:
        name = model_name(model)
        for target in targets or [None]:
            bundle = os.path.join(out_dir, name if len(targets) <= 1 else f"{name}-{target}")
            for task, calib in tasks.items():
                cells.append(Cell(model, calib, target, task, os.path.abspath(bundle),
                                  inputs_key(model, calib, target, task, compile_args)))
    return cells


def up_to_date(cell: Cell) -> bool:
    """The cell's bundle holds its task's profile, compiled by a sweep from the same inputs."""
    from conflayers.runtime.bundle import Bundle
    try:
        profile = Bundle.open(cell.bundle, verify=False).profiles.get(cell.task)
    except Exception:  # noqa: BLE001 - no bundle, or not one we can read: compile
        return False
    return profile is not None and (profile.raw.get("sweep") or {}).get("inputs_sha256") == cell.key


# -- one cell, wherever it runs ---------------------------------------------------------------


def cell_payload(cell: Cell, compile_args: list[str]) -> dict:
    """What a cell needs besides the model: its flags, and the content of a calibration file and a
    cost model (so that they need not exist on the machine that runs it)."""
    rest, cost_path = split_cost_model(compile_args)
    files = {}
    if cost_path:
        with open(cost_path, "rb") as f:
            files["cost_model"] = (os.path.basename(cost_path), f.read())
    if os.path.isfile(os.path.expanduser(cell.calib)):
        with open(os.path.expanduser(cell.calib), "rb") as f:
            files["calib"] = (os.path.basename(cell.calib), f.read())
    model = os.path.expanduser(cell.model)     # a local model: the same path on the machine that runs it
    model = os.path.abspath(model) if os.path.exists(model) else cell.model
    return {"model": model, "calib": cell.calib, "target": cell.target, "task": cell.task,
            "args": rest, "files": files}


def compile_cell(payload: dict) -> dict:
    """Run one conflayers-compile into a temporary bundle; return its profile, report files and
    max_context (ok), or the compiler's error. Runs in a Ray worker or in the driver."""
    work = tempfile.mkdtemp(prefix="conflayers-cell-")
    try:
        paths = {}
        for kind, (name, blob) in payload["files"].items():
            os.makedirs(os.path.join(work, kind), exist_ok=True)
            paths[kind] = os.path.join(work, kind, name)
            with open(paths[kind], "wb") as f:
                f.write(blob)
        out = os.path.join(work, "bundle")
        cmd = [sys.executable, "-m", "conflayers.compiler.cli", "--model", payload["model"],
               "--calib", paths.get("calib", payload["calib"]), "--out", out, *payload["args"]]
        if payload["target"]:
            cmd += ["--target", payload["target"]]
        if "cost_model" in paths:
            cmd += ["--cost-model", paths["cost_model"]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        node = socket.gethostname()
        if proc.returncode != 0:
            return {"ok": False, "error": _error_text(proc), "seconds": seconds, "node": node}
        task = payload["task"]
        with open(os.path.join(out, "profiles", f"{task}.json"), encoding="utf-8") as f:
            profile = json.load(f)
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            max_context = json.load(f)["max_context"]
        report = {}
        rdir = os.path.join(out, "report", task)
        for name in sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []:
            with open(os.path.join(rdir, name), "rb") as f:
                report[f"report/{task}/{name}"] = f.read()
        return {"ok": True, "profile": profile, "files": report, "max_context": max_context,
                "seconds": seconds, "node": node}
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def _error_text(proc) -> str:
    """The compiler's own message ('Error: ...') when it gave one, else the end of its output."""
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    if errors:
        return errors[-1][len("Error:"):].strip()
    tail = "\n".join(lines[-15:])
    return f"conflayers-compile exited with status {proc.returncode}" + (f":\n{tail}" if tail else "")


# -- executors: (index, payload) jobs in, (index, result) out, as they finish ---------------------


def run_local(jobs):
    for i, payload in jobs:
        yield i, compile_cell(payload)


def node_cpus(ray, resource: str | None) -> int:
    """CPUs a cell reserves: a whole node's (the largest of the nodes it may run on), so that the
    compile's timings never share cores with another cell."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if resource:
        nodes = [n for n in nodes if n.get("Resources", {}).get(resource, 0) >= 1]
        if not nodes:
            raise SweepError(f"no live Ray node has the resource {resource!r} "
                             f"(ray start ... --resources='{{\"{resource}\": 1}}')")
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    if not cpus or max(cpus) < 1:
        raise SweepError("the Ray cluster has no node with CPUs")
    return max(cpus)


def run_ray(jobs, ray, cpus: int, resource: str | None):
    """Each job a Ray task reserving `cpus` CPUs (and one unit of `resource`: the node type the
    profile is for); results in the order they finish. A task that dies (node lost, killed) is not
    retried: its cell fails with Ray's error."""
    remote = ray.remote(num_cpus=cpus, resources={resource: 1} if resource else None,
                        max_retries=0)(compile_cell)
    pending = {remote.remote(payload): i for i, payload in jobs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    yield i, ray.get(ref)
                except ray.exceptions.RayError as e:
                    yield i, {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        for ref in pending:          # interrupted: the cells not finished stop too
            ray.cancel(ref, force=True)


# -- the driver -------------------------------------------------------------------------------


class Publisher:
    """Adds a finished cell's profile to its bundle. One ModelSetup (weights loaded once) per
    model, target and context length."""

    def __init__(self, force: bool = False):
        self.force = force
        self._setups: dict[tuple, object] = {}

    def __call__(self, cell: Cell, result: dict) -> str:
        from conflayers.runtime.profile import Profile

        from conflayers.runtime.ort_backend import resolve_providers

        from .pipeline import CompileOptions, Log, ensure_exact_target, publish_profiles, setup_model
        profile = {**result["profile"], "sweep": {"inputs_sha256": cell.key}}
        target = profile["model"].get("target", "fp32")     # what the cell compiled for (fallback included)
        key = (cell.model, target, result["max_context"])
        if key not in self._setups:
            opts = CompileOptions(model=cell.model, target=target, max_context=result["max_context"], quiet=True)
            # the check finds where the target's verify passes are exact (the bundle records it)
            m = ensure_exact_target(setup_model(opts, Log(True)), opts, resolve_providers(opts.device), Log(True))
            m.hf_model = None            # the writer needs the weights, not the torch model
            self._setups[key] = m
        m = self._setups[key]
        why = Profile.from_json(profile).matches_model(m.identity)
        if why:
            raise SweepError(f"the cell's profile does not match the model here ({why})")
        return publish_profiles(m, cell.bundle, [profile], self.force, files=result["files"], keep_reports=True)


def sweep(cells: list[Cell], compile_args: list[str], executor, redo: bool = False, force: bool = False,
          progress: bool = True, echo=None) -> list[Outcome]:
    """Run every cell not up to date through `executor` (run_local or a bound run_ray), publish
    each success as it arrives; a failed cell is reported and the others go on."""
    from tqdm import tqdm
    outcomes: dict[int, Outcome] = {}
    jobs = []
    for i, cell in enumerate(cells):
        if not redo and up_to_date(cell):
            outcomes[i] = Outcome(cell, "skipped")
        else:
            jobs.append((i, cell_payload(cell, compile_args)))
    publish = Publisher(force)
    with tqdm(total=len(cells), desc="sweep", unit="cell", disable=not progress, file=sys.stderr) as bar:
        say = echo or (lambda line: bar.write(line, file=sys.stderr))     # stdout: --json only
        for i, o in sorted(outcomes.items()):
            say(f"[skipped] {o.cell.label}: up to date in {o.cell.bundle}")
            bar.update(1)
        for i, result in executor(jobs):
            cell = cells[i]
            o = Outcome(cell, "ok", result.get("seconds", 0.0), result.get("node"))
            if result["ok"]:
                try:
                    publish(cell, result)
                except Exception as e:  # noqa: BLE001 - one cell's failure must not stop the rest
                    o.status, o.error = "failed", f"publishing into {cell.bundle}: {e}"
            else:
                o.status, o.error = "failed", result["error"]
            outcomes[i] = o
            where = f" on {o.node}" if o.node else ""
            say(f"[{o.status}] {cell.label}: {o.seconds:.1f} s{where}" + (f": {o.error}" if o.error else ""))
            bar.update(1)
    return [outcomes[i] for i in range(len(cells))]


def summary(outcomes: list[Outcome]) -> dict:
    return {"cells": [{**{k: v for k, v in asdict(o).items() if k != "cell"}, "model": o.cell.model,
                       "calib": o.cell.calib, "task": o.cell.task, "target": o.cell.target,
                       "bundle": o.cell.bundle} for o in outcomes],
            "ok": sum(o.status == "ok" for o in outcomes), "skipped": sum(o.status == "skipped" for o in outcomes),
            "failed": sum(o.status == "failed" for o in outcomes)}

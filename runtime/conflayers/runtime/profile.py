"""Skip profiles: the JSON the compiler writes and model publishers ship (schema version 3).

Version 2 adds the drafter kind (`draft.kind`): "model" (the layer-skip draft; the default, and
what every version 1 profile is), "ngram" (prompt lookup, `draft.ngram`; no draft graphs, no
plan) or "hybrid" (n-gram when its match is long enough, else the model draft). Version 3 adds
"cascade": the draft's own fields describe the top stage (the draft that proposes for the
target) and `draft.cascade.stages` the cheaper drafts below it, cheapest first (see cascade.py).
Versions 1 and 2 still load.

The JSON Schema in profiles/profile.schema.json documents the same structure; `Profile.from_json`
is the check the runtime relies on, with errors that name the field at fault.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

from .draftplan import PRECISIONS, DraftPlan, DraftPolicy, NGramPolicy
from .policy import PolicyRow, parse_table

PROFILE_SCHEMA = "conflayers.profile"
PROFILE_SCHEMA_VERSION = 3
DRAFTER_KINDS = ("model", "ngram", "hybrid", "cascade")
KIND_SINCE = {"model": 1, "ngram": 2, "hybrid": 2, "cascade": 3}    # schema version that added it
DEVICES = ("cpu", "cuda")         # cost_model.device: where the compiler measured its costs


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    """One cheaper draft of a cascade: its plan, its own drafting policy, its vocabulary."""
    plan: DraftPlan
    policy: DraftPolicy
    vocab_ids: list[int] | None


def safe_name(text: str, fallback: str) -> str:
    """text as a file-name-safe name (runs of other characters become `_`), or fallback."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-") or fallback


def task_name(calib: str) -> str:
    """The profile name the compiler gives a calibration spec: gsm8k, spec_bench-qa, my_prompts
    (a file's stem). The bench finds a task's own profile by it."""
    if os.path.exists(calib):
        base = os.path.splitext(os.path.basename(calib))[0]
    else:
        base = calib.replace(":", "-")
    return safe_name(base, "task")


def _need(d: dict, key: str, where: str, kind=None):
    if not isinstance(d, dict) or key not in d:
        raise ProfileError(f"profile field '{where}{key}' is missing")
    v = d[key]
    if kind is not None and not isinstance(v, kind):
        raise ProfileError(f"profile field '{where}{key}' must be {getattr(kind, '__name__', kind)}, "
                           f"got {type(v).__name__}")
    return v


@dataclass
class Profile:
    task: str
    model: dict                      # name, architecture, num_layers, config_sha256, weights_sha256
    plan: DraftPlan | None           # None for an n-gram profile (no draft graphs)
    policy: DraftPolicy | None       # the model draft's policy (None for an n-gram profile)
    vocab_ids: list[int] | None      # draft vocabulary subset (None = full vocabulary)
    raw: dict = field(repr=False, default_factory=dict)
    # token id -> weight of the calibration prompts' token frequencies (for task="auto")
    signature: dict[int, float] = field(repr=False, default_factory=dict)
    verify_relative: list[float] = field(repr=False, default_factory=list)   # see verify_cost
    # per (k, confidence stop): mean drafted/accepted tokens per step (None: an older profile,
    # whose compiled policy is used as is); see policy.py
    policy_table: list[PolicyRow] | None = field(repr=False, default=None)
    kind: str = "model"              # draft.kind: model | ngram | hybrid | cascade
    ngram: NGramPolicy | None = None  # draft.ngram, for ngram and hybrid
    stages: list[Stage] = field(default_factory=list)   # draft.cascade.stages, cheapest first

    @property
    def has_model_draft(self) -> bool:
        return self.plan is not None

    @property
    def figures(self) -> dict:
        figures = self.raw.get("figures")
        return figures if isinstance(figures, dict) else {}

    @property
    def cost_context(self) -> int:
        """Tokens of past the compile's timings were taken at (where the runtime re-measures)."""
        c = (self.raw.get("cost_model") or {}).get("context")
        return c if isinstance(c, int) and not isinstance(c, bool) and c > 0 else 128

    @property
    def tuned_device(self) -> str:
        """The device its cost model was measured on, 'cpu' or 'cuda' (cost_model.device; profiles
        from before it was recorded were all tuned on a CPU). The engine re-plans where it differs."""
        return (self.raw.get("cost_model") or {}).get("device") or "cpu"

    def verify_cost(self, n: int) -> float:
        """Cost of a full-graph pass over n tokens in units of a 1-token pass (compile-time
        measurement on the target backend; linear fallback)."""
        table = self.verify_relative
        if n - 1 < len(table):
            return table[n - 1]
        if table:
            return table[-1] * (1.0 + 0.04 * (n - len(table)))
        return 1.0 + 0.04 * (n - 1)

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        if not isinstance(d, dict):
            raise ProfileError("a profile must be a JSON object")
        schema = d.get("schema")
        if schema != PROFILE_SCHEMA:
            raise ProfileError(f"not a conflayers profile (schema is {schema!r}, expected {PROFILE_SCHEMA!r})")
        version = _need(d, "schema_version", "", int)
        if version > PROFILE_SCHEMA_VERSION:
            raise ProfileError(
                f"profile schema version {version} is newer than this runtime reads "
                f"(<= {PROFILE_SCHEMA_VERSION}); upgrade conflayers")
        if version < 1:
            raise ProfileError(f"profile schema version {version} is invalid")
        task = _need(d, "task", "", str)
        if not task or "/" in task or task.startswith("."):
            raise ProfileError(f"profile task name {task!r} is invalid")
        model = _need(d, "model", "", dict)
        for k in ("architecture", "config_sha256", "weights_sha256"):
            _need(model, k, "model.", str)
        num_layers = _need(model, "num_layers", "model.", int)
        _check_device(d)
        draft = _need(d, "draft", "", dict)
        kind = draft.get("kind", "model")
        if kind not in DRAFTER_KINDS:
            raise ProfileError(f"profile field 'draft.kind' must be one of {DRAFTER_KINDS}, got {kind!r}")
        if KIND_SINCE[kind] > version:
            raise ProfileError(f"profile field 'draft.kind' is {kind!r}, which needs schema_version >= "
                               f"{KIND_SINCE[kind]}, the profile says {version}")
        ngram = None
        if kind in ("ngram", "hybrid"):
            try:
                ngram = NGramPolicy.from_json(_need(draft, "ngram", "draft.", dict))
            except ValueError as e:
                raise ProfileError(f"profile field 'draft.ngram' is invalid: {e}") from None
        if kind == "ngram":        # no model draft: its fields, if any, are ignored
            return cls(task=task, model=model, plan=None, policy=None, vocab_ids=None, raw=d,
                       signature=_signature(d), verify_relative=_verify_relative(d), kind=kind, ngram=ngram)
        plan, policy, vocab_ids = _model_draft(draft, "draft.", num_layers)
        stages = _stages(draft, plan, num_layers) if kind == "cascade" else []
        table = None
        if d.get("policy_table") is not None:
            try:
                table = parse_table(d["policy_table"])
            except ValueError as e:
                raise ProfileError(f"profile field 'policy_table' is invalid: {e}") from None
        return cls(task=task, model=model, plan=plan, policy=policy, vocab_ids=vocab_ids, raw=d,
                   signature=_signature(d), verify_relative=_verify_relative(d), policy_table=table,
                   kind=kind, ngram=ngram, stages=stages)

    @classmethod
    def load(cls, path: str) -> "Profile":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ProfileError(f"profile file {path} does not exist") from None
        except (ValueError, RecursionError) as e:    # bad JSON, huge ints, deep nesting
            raise ProfileError(f"profile file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_json(d)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from None

    def matches_model(self, model: dict) -> str | None:
        """None if this profile was made for `model` (a manifest's model section), else why not."""
        for k in ("architecture", "num_layers", "config_sha256", "weights_sha256"):
            if self.model.get(k) != model.get(k):
                return (f"profile '{self.task}' was compiled for another model: {k} is "
                        f"{self.model.get(k)!r}, the bundle's model has {model.get(k)!r}")
        # the target precision its drafts were measured against (before targets existed: fp32)
        mine, theirs = self.model.get("target", "fp32"), model.get("target", "fp32")
        if mine != theirs:
            return (f"profile '{self.task}' was compiled for target precision {mine!r}, the bundle's "
                    f"full graph is {theirs!r}; compile (or export) it with --target {mine}")
        return None


def _model_draft(d: dict, where: str, num_layers: int) -> tuple[DraftPlan, DraftPolicy, list[int] | None]:
    """A model draft's plan, policy and vocabulary subset from a draft (or cascade stage) object."""
    precision = _need(d, "precision", where, str)
    if precision not in PRECISIONS:
        raise ProfileError(f"profile field '{where}precision' must be one of {PRECISIONS}, got {precision!r}")
    try:
        plan = DraftPlan.from_json(d, num_layers)
        policy = DraftPolicy(max_tokens=int(_need(d, "max_draft_tokens", where, int)),
                             confidence_stop=d.get("confidence_stop"))
    except (TypeError, ValueError, OverflowError) as e:
        raise ProfileError(f"profile field '{where.rstrip('.')}' is invalid: {e}") from None
    vocab = d.get("vocab_subset")
    vocab_ids = None
    if vocab is not None:
        vocab_ids = _need(vocab, "token_ids", where + "vocab_subset.", list)
        if not vocab_ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in vocab_ids):
            raise ProfileError(f"profile field '{where}vocab_subset.token_ids' must be non-negative ints")
        if len(set(vocab_ids)) != len(vocab_ids):
            raise ProfileError(f"profile field '{where}vocab_subset.token_ids' has duplicates")
    return plan, policy, vocab_ids


def _stages(draft: dict, top: DraftPlan, num_layers: int) -> list[Stage]:
    """draft.cascade.stages, cheapest first. A stage keeps attention only in layers the stage
    above it keeps: the stage above rewrites every KV position the cascade decides on, so a layer
    only the cheaper stage keeps would read positions nobody wrote (cascade.py)."""
    cascade = _need(draft, "cascade", "draft.", dict)
    unknown = set(cascade) - {"stages"}
    if unknown:
        raise ProfileError(f"profile field 'draft.cascade' has unknown settings {sorted(unknown)}")
    raw = _need(cascade, "stages", "draft.cascade.", list)
    if not raw:
        raise ProfileError("profile field 'draft.cascade.stages' must list at least one stage")
    stages = []
    for i, st in enumerate(raw):
        where = f"draft.cascade.stages[{i}]."
        if not isinstance(st, dict):
            raise ProfileError(f"profile field '{where.rstrip('.')}' must be an object")
        stages.append(Stage(*_model_draft(st, where, num_layers)))
    plans = [s.plan for s in stages] + [top]
    for i, (lower, upper) in enumerate(zip(plans, plans[1:])):
        extra = sorted(set(lower.kv_layers) - set(upper.kv_layers))
        if extra:
            above = "the top draft" if i == len(stages) - 1 else f"stage {i + 1}"
            raise ProfileError(f"profile field 'draft.cascade.stages[{i}]' keeps attention in layers {extra}, "
                               f"which {above} skips: a cheaper stage may keep attention only where the "
                               "stage above it does")
    return stages


def _section(d: dict, key: str) -> dict:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ProfileError(f"profile field '{key}' must be an object")
    return v


def _finite(v) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or (
        isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 53)


def _signature(d: dict) -> dict[int, float]:
    sig = _section(_section(d, "selection"), "signature")
    if not all(isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 12 and _finite(v) for k, v in sig.items()):
        raise ProfileError("profile field 'selection.signature' must map token ids to numbers")
    return {int(k): float(v) for k, v in sig.items()}


def _check_device(d: dict) -> None:
    device = _section(d, "cost_model").get("device", "cpu")
    if device not in DEVICES:
        raise ProfileError(f"profile field 'cost_model.device' must be one of {DEVICES}, got {device!r}")


def _verify_relative(d: dict) -> list[float]:
    table = _section(d, "cost_model").get("verify_relative", [])
    if not isinstance(table, list) or not all(_finite(v) and v > 0 for v in table):
        raise ProfileError("profile field 'cost_model.verify_relative' must be a list of positive numbers")
    return [float(v) for v in table]

"""What drafting and verifying cost on the target backend, measured, and the speed they predict.

A draft step costs: embedding + final norm (a body with no layers), plus per kept attention block
and per kept MLP block (measured from bodies that keep only attention or only MLPs), plus the head
for its vocabulary. A verify pass of n tokens costs full(n); a draft pass over n tokens (a
cascade's check pass) a draft step times its precision's width curve. Timings are medians of interleaved
repetitions at a representative context length, so machine noise hits every configuration alike
(runtime.timing.time_jobs: the harness the runtime's probe and batch planner use too).
The device they were measured on is recorded (`device`, `provider`): a CPU step is bound by
memory bandwidth, a batch-1 GPU step by kernel launches, so a draft tuned on one is no plan for the
other, and the runtime re-plans a profile served on another device (Engine.replan).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from conflayers.runtime.draftplan import DraftPlan
from conflayers.runtime.ort_backend import KVCache, device_of
from conflayers.runtime.speculation import speedup_over_plain
from conflayers.runtime.timing import time_jobs

from .evaluate import PolicyResult


@dataclass
class CostModel:
    context: int                                  # tokens of past the timings were taken at
    full_ms: list                                 # full_ms[n-1]: full graph over n new tokens
    base_ms: dict = field(default_factory=dict)   # precision -> body with no layers
    attn_ms: dict = field(default_factory=dict)   # precision -> one attention block
    mlp_ms: dict = field(default_factory=dict)    # precision -> one MLP block
    head_ms: dict = field(default_factory=dict)   # precision -> {vocab size (str): ms}
    backend: str = "onnxruntime-cpu"
    # precision -> [a draft pass over n tokens / over 1 token, n = 1..]: a cascade's check pass
    # (cascade_search.py); measured on the all-layer body + full head; {} in older cost models
    draft_relative: dict = field(default_factory=dict)
    device: str = "cpu"                           # where measured: cpu | cuda (older cost models: cpu)
    provider: str = "CPUExecutionProvider"        # the ONNX Runtime execution provider of the sessions

    def verify_ms(self, n: float) -> float:
        """Full-graph pass over n tokens (interpolated for a mean width, extrapolated beyond)."""
        widths = np.arange(1, len(self.full_ms) + 1)
        if n <= len(self.full_ms):
            return float(np.interp(n, widths, self.full_ms))
        slope = (self.full_ms[-1] - self.full_ms[0]) / max(len(self.full_ms) - 1, 1)
        return self.full_ms[-1] + slope * (n - len(self.full_ms))

    def head_cost(self, precision: str, vocab: int) -> float:
        table = {int(k): v for k, v in self.head_ms[precision].items()}
        if vocab in table:
            return table[vocab]
        sizes = sorted(table)
        return float(np.interp(vocab, sizes, [table[s] for s in sizes]))

    def draft_ms(self, plan: DraftPlan, vocab: int) -> float:
        n_attn = sum(plan.keeps_attention(i) for i in range(plan.num_layers))
        n_mlp = sum(plan.keeps_mlp(i) for i in range(plan.num_layers))
        p = plan.precision
        return self.base_ms[p] + n_attn * self.attn_ms[p] + n_mlp * self.mlp_ms[p] + self.head_cost(p, vocab)

    def speedup(self, result: PolicyResult, draft_ms: float) -> float:
        """Predicted tokens/s of speculative decoding relative to plain decoding."""
        if result.draft_steps == 0:
            return 0.0
        avg_drafted = result.drafted_tokens / result.draft_steps
        # verify width varies per step; use the mean width (full_ms is near-linear in n)
        step_ms = avg_drafted * draft_ms + self.verify_ms(avg_drafted + 1)
        return speedup_over_plain(result.accepted_tokens / result.draft_steps, step_ms, self.full_ms[0])

    def check_ms(self, plan: DraftPlan, vocab: int, n: int) -> float:
        """A draft pass over n tokens at once (a cascade's check pass): the draft step scaled by
        its precision's width curve, else by the full graph's (older cost models)."""
        rel = self.draft_relative.get(plan.precision) or [v / self.full_ms[0] for v in self.full_ms]
        widths = np.arange(1, len(rel) + 1)
        if n <= len(rel):
            r = float(np.interp(n, widths, rel))
        else:
            r = rel[-1] + (rel[-1] - rel[0]) / max(len(rel) - 1, 1) * (n - len(rel))
        return self.draft_ms(plan, vocab) * r

    def verify_relative(self) -> list:
        return [round(v / self.full_ms[0], 4) for v in self.full_ms]

    def to_json(self) -> dict:
        d = asdict(self)
        d["verify_relative"] = self.verify_relative()
        return d

    @classmethod
    def load(cls, path: str, precisions, max_verify: int) -> "CostModel":
        """A cost model saved earlier: a profile JSON (its cost_model) or a bare cost-model JSON.
        Reusing one makes compiles repeatable: the search is then deterministic end to end."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        d = d.get("cost_model", d)
        try:
            cm = cls(context=int(d["context"]), full_ms=list(d["full_ms"]), base_ms=dict(d["base_ms"]),
                     attn_ms=dict(d["attn_ms"]), mlp_ms=dict(d["mlp_ms"]), head_ms=dict(d["head_ms"]),
                     backend=d.get("backend", "onnxruntime-cpu"), draft_relative=dict(d.get("draft_relative", {})),
                     device=str(d.get("device", "cpu")), provider=str(d.get("provider", "CPUExecutionProvider")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a conflayers cost model (missing or bad field: {e})") from None
        missing = [p for p in precisions if p not in cm.base_ms]
        if missing:
            raise ValueError(f"cost model {path} has no timings for precision(s) {missing}")
        if len(cm.full_ms) < max_verify:
            raise ValueError(f"cost model {path} covers verify widths up to {len(cm.full_ms)}, "
                             f"the search needs {max_verify}")
        return cm


def measure(factory, spec, context: int, max_verify: int, precisions, vocab_sizes, reps: int = 12,
            progress=None) -> CostModel:
    """Time the full graph (1..max_verify tokens) and the draft building blocks per precision, on
    the factory's device (the KV cache there too, as the runtime keeps it)."""
    providers = getattr(factory, "providers", None) or ["CPUExecutionProvider"]
    device = device_of(providers)
    cache = KVCache(spec, context + max_verify + 2, device)
    rng = np.random.default_rng(0)
    prefix = rng.integers(10, spec.vocab_size - 10, context).tolist()
    full = factory.full().bind(cache)
    full.run(prefix, 0, logits_from=context - 1)
    jobs = {}
    for n in range(1, max_verify + 1):
        jobs[("full", n)] = (lambda n=n: full.run(prefix[:n], context))
    L = spec.num_layers
    everything = list(range(L))
    for p in precisions:
        shapes = {"none": DraftPlan(L, skip_layers=everything, precision=p),
                  "attn": DraftPlan(L, skip_mlp=everything, precision=p),
                  "mlp": DraftPlan(L, skip_attention=everything, precision=p)}
        for name, plan in shapes.items():
            body = factory.body(plan).bind(cache)
            jobs[(p, name)] = (lambda b=body: b.run(prefix[:1], context))
            if progress:
                progress(1)
        # the whole draft (all layers, full head) over n tokens: a cascade's check pass
        body, head = factory.body(DraftPlan(L, precision=p)).bind(cache), factory.head(p)
        for n in range(1, max_verify + 1):
            jobs[(p, "width", n)] = (lambda b=body, h=head, n=n: h.run_head(b.run(prefix[:n], context)[None]))
        hidden = np.zeros((1, 1, spec.hidden_size), np.float32)
        for v in vocab_sizes:
            ids = None if v >= spec.vocab_size else np.arange(v)
            head = factory.head(p, ids)
            jobs[(p, "head", v)] = (lambda h=head: h.run_head(hidden))
            if progress:
                progress(1)
    med = time_jobs(jobs, reps)  # interleaved medians: noise hits every configuration alike
    cm = CostModel(context=context, full_ms=[round(med[("full", n)], 3) for n in range(1, max_verify + 1)],
                   backend=f"onnxruntime-{device}", device=device, provider=providers[0])
    for p in precisions:
        base = med[(p, "none")]
        cm.base_ms[p] = round(base, 3)
        cm.attn_ms[p] = round(max(med[(p, "attn")] - base, 0.0) / L, 4)
        cm.mlp_ms[p] = round(max(med[(p, "mlp")] - base, 0.0) / L, 4)
        cm.head_ms[p] = {str(v): round(med[(p, "head", v)], 3) for v in vocab_sizes}
        one = med[(p, "width", 1)]
        cm.draft_relative[p] = [round(med[(p, "width", n)] / one, 4) for n in range(1, max_verify + 1)]
    return cm

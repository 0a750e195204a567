"""Graphs and sessions for the search: the full graph and any candidate draft, on demand.

Candidate drafts are built in a work directory over one set of weights files (the same builder
and runtime classes as the shipped bundle), so the search measures exactly what will ship.
Sessions of candidate bodies are few at a time: each holds its own prepacked weights.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import onnx

from conflayers.runtime import contract
from conflayers.runtime.draftplan import DraftPlan, head_key
from conflayers.runtime.ort_backend import GraphRunner, create_session

from .export.decoder_graph import WeightStores, build


class DraftFactory:
    def __init__(self, workdir: str, spec, weights: dict, max_context: int, providers: list[str],
                 keep_sessions: int = 3, target: str = "fp32", native: dict | None = None,
                 verify_boundaries: tuple | None = None, padding=None):
        self.dir = workdir
        self.spec = spec
        self.max_context = max_context
        self.providers = providers
        self.stores = WeightStores(workdir, weights, target, native)
        self._full = None
        self._bodies: OrderedDict[str, GraphRunner] = OrderedDict()
        self._heads: dict[str, GraphRunner] = {}
        self.keep = keep_sessions
        self.verify_boundaries = verify_boundaries      # the target's (runtime/exactness.py)
        # the full graph's padding on this machine (exactness.choose); by default exact everywhere
        self.padding = padding or (contract.PAD_EVERY if verify_boundaries else contract.PAD_SINGLE)

    def _open(self, model: onnx.ModelProto, name: str) -> str:
        path = os.path.join(self.dir, name)
        onnx.save(model, path)
        for f in self.stores.files.values():
            f.flush()                      # the session reads the weights written so far
        return path

    def full(self) -> GraphRunner:
        if self._full is None:
            path = self._open(build(self.spec, self.stores, None, "full", max_context=self.max_context), "full.onnx")
            self._full = GraphRunner(create_session(path, self.providers), list(range(self.spec.num_layers)), "logits",
                                     verify_boundaries=self.verify_boundaries, padding=self.padding, path=path)
        return self._full

    def body(self, plan: DraftPlan) -> GraphRunner:
        key = plan.key
        if key in self._bodies:
            self._bodies.move_to_end(key)
            return self._bodies[key]
        path = self._open(build(self.spec, self.stores, plan, "body", max_context=self.max_context), f"draft_{key}.onnx")
        runner = GraphRunner(create_session(path, self.providers), plan.kv_layers, "hidden", path=path)
        self._bodies[key] = runner
        while len(self._bodies) > self.keep:
            self._bodies.popitem(last=False)
        return runner

    def head(self, precision: str, vocab_ids=None) -> GraphRunner:
        rows = None if vocab_ids is None else np.asarray(vocab_ids, np.int64)
        key = head_key(precision, vocab_ids)
        if key not in self._heads:
            plan = DraftPlan(self.spec.num_layers, precision=precision)
            path = self._open(build(self.spec, self.stores, plan, "head", head_rows=rows), f"head_{key}.onnx")
            self._heads[key] = GraphRunner(create_session(path, self.providers), [], "logits")
        return self._heads[key]

    def close(self):
        self._bodies.clear()
        self._heads.clear()
        self._full = None
        self.stores.close()

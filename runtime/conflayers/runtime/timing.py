"""The one timing harness of every cost measurement: the compiler's cost model, the runtime's
load-time probe and the batch planner's start-up timing, and the one way their scratch caches'
past is written (write_past). Each job runs once to warm up (the first
run of a shape allocates), then all jobs run in interleaved rounds, so whatever else the machine
does hits every configuration alike; per job the median of the rounds, or their minimum (the
least disturbed run: other work only adds time), in milliseconds."""
from __future__ import annotations

import time
from typing import Callable, Hashable

import numpy as np


def time_jobs(jobs: dict[Hashable, Callable[[], object]], reps: int, statistic: str = "median") -> dict:
    if reps < 1:
        raise ValueError("reps must be >= 1")
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', not {statistic!r}")
    for job in jobs.values():
        job()
    samples: dict = {k: [] for k in jobs}
    for _ in range(reps):
        for k, job in jobs.items():
            t = time.perf_counter()
            job()
            samples[k].append(time.perf_counter() - t)
    reduce = np.median if statistic == "median" else np.min
    return {k: float(reduce(v)) * 1000.0 for k, v in samples.items()}


def write_past(cache, context: int) -> None:
    """Random values in positions 0..context of a KVCache (or one slot of a BatchedKVCache) on
    the CPU: a calloc'd cache maps every page to the kernel's one zero page, so attention would
    read it from L1 and a timed pass look cheaper than a served one. A device cache is left as
    allocated."""
    if cache.device != "cpu":
        return
    rng = np.random.default_rng(0)
    for layer in cache.keys:
        for arr in (cache.key_array(layer), cache.value_array(layer)):
            arr[:, :, :context] = rng.standard_normal(arr[:, :, :context].shape, dtype=np.float32) * 0.5


def write_batched_past(cache, context: int) -> None:
    """write_past in every slot of a BatchedKVCache. No request is in the cache yet; a request
    writes every position it later reads."""
    for slot in cache.slot:
        write_past(slot, context)

"""Kept prompts in host memory: the KV of recently finished sequences, so a request whose prompt
begins with one of them (a repeated prompt, a shared system prompt, a conversation's next turn)
skips that part of its prefill even after the slot that computed it went to another request.

Entries are the full graph's own KV of a token sequence, copied out of a slot when its sequence
leaves and copied back into a slot on a hit: bytes in, bytes out, so a hit is as exact as the
slot's own prompt cache (scheduler.py). Least recently used entries go first once the byte budget
is reached; an entry another one extends is dropped (the longer one serves both).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class PromptStore:
    def __init__(self, budget_bytes: int, num_layers: int):
        self.budget, self.num_layers = int(budget_bytes), int(num_layers)
        self._entries: OrderedDict[tuple, tuple[list, list]] = OrderedDict()   # tokens -> (keys, values)
        self.nbytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], slot) -> None:
        """Keep the KV of `tokens` (positions 0 .. len-1 of `slot`, a KVCache or SlotCache)."""
        key = tuple(tokens)
        if not key:
            return
        for old in list(self._entries):
            if old[:len(key)] == key:            # already kept, or within a longer entry
                self._entries.move_to_end(old)
                return
            if key[:len(old)] == old:            # the new entry extends it
                self._drop(old)
        n = len(key)
        keys = [np.array(slot.key_array(i)[0, :, :n]) for i in range(self.num_layers)]
        values = [np.array(slot.value_array(i)[0, :, :n]) for i in range(self.num_layers)]
        size = sum(a.nbytes for a in keys) + sum(a.nbytes for a in values)
        if size > self.budget:
            return
        while self.nbytes + size > self.budget:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (keys, values)
        self.nbytes += size

    def longest(self, ids: list[int]) -> tuple[tuple | None, int]:
        """The entry sharing the longest prefix with `ids`, and that prefix's length."""
        best, best_n = None, 0
        for key in self._entries:
            if min(len(key), len(ids)) <= best_n:
                continue
            n = common_prefix(key, ids)
            if n > best_n:
                best, best_n = key, n
        return best, best_n

    def load(self, key: tuple, n: int, slot) -> None:
        """Copy the entry's first n positions into `slot`."""
        keys, values = self._entries[key]
        self._entries.move_to_end(key)
        for i in range(self.num_layers):
            slot.key_array(i)[0, :, :n] = keys[i][:, :n]
            slot.value_array(i)[0, :, :n] = values[i][:, :n]
        self.hits += 1

    def _drop(self, key: tuple) -> None:
        keys, values = self._entries.pop(key)
        self.nbytes -= sum(a.nbytes for a in keys) + sum(a.nbytes for a in values)


def common_prefix(a, b) -> int:
    """How many leading tokens two token sequences share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

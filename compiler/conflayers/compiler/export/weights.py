"""Weights files shared by several ONNX graphs.

Each tensor is stored once per file (deduplicated by content hash) and referenced by every graph
that uses it through ONNX external data. Offsets are page-aligned so ONNX Runtime can map them.
Small tensors (norm scales) are kept inline in each graph: cheaper than a page each.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
from onnx import TensorProto, numpy_helper

ALIGN = 65536
INLINE_BELOW = 65536


class WeightFile:
    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        self._f = open(path, "wb")
        self._offset = 0
        self._by_hash: dict[str, tuple[int, int]] = {}

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        """A TensorProto named `name` whose data lives in this file (written once)."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(array, name)
        data = array.tobytes()
        key = hashlib.sha256(data).hexdigest() + str(array.dtype) + str(array.shape)
        if key not in self._by_hash:
            pad = (-self._offset) % ALIGN
            if pad:
                self._f.write(b"\0" * pad)
                self._offset += pad
            self._f.write(data)
            self._by_hash[key] = (self._offset, len(data))
            self._offset += len(data)
        offset, length = self._by_hash[key]
        t = TensorProto()
        t.name = name
        t.data_type = {np.dtype("float32"): TensorProto.FLOAT,
                       np.dtype("float16"): TensorProto.FLOAT16,
                       np.dtype("uint8"): TensorProto.UINT8,
                       np.dtype("int64"): TensorProto.INT64,
                       np.dtype("int32"): TensorProto.INT32}[array.dtype]
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        return t

    def flush(self):
        self._f.flush()

    def close(self):
        if not self._f.closed:
            self._f.close()

    @property
    def size(self) -> int:
        return self._offset

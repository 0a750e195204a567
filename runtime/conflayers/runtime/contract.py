"""The graph interface the compiler writes and the runtime runs, defined once for both sides.

Decoder graphs (full graph and draft bodies, batch 1):
  inputs   input_ids [1, S] int64, seqlens_k [1] int32 (= start + S - 1), total_seq_len [] int32,
           logits_from [1] int64 (first row whose output is returned),
           past_key.{i} / past_value.{i} [1, kv_heads, max_len, head_dim] per layer i with KV
  outputs  logits [1, S', V] (full graph, draft head) or hidden [1, S', H] (draft body),
           present_key.{i} / present_value.{i}: the same buffers as the past ones (bound in place)
A draft head reads `hidden` and writes `logits`. The final Slice from logits_from is the node
named KEEP_POSITIONS (the batched engine replaces it by a Gather of the rows it wants); the full
graph's attention takes one extra row (a copy of the last; its lengths are the nodes named ATTENTION_PAD), because
GroupQueryAttention computes a single row on another path.

Rows: why passes are padded. Speculative output equals plain decoding only if each row of a pass
is computed bit for bit alike whatever the pass's shape (a one-token step, a verify pass, a
prefill chunk, a batched pass). ONNX Runtime's matrix products are not, on every CPU: MLAS runs
MatMulNBits (int8 activations, CompInt8) over a single row with a GEMV kernel of its own on AVX2
and AVX2-VNNI (its rounding differs by ~1e-6, enough to flip a greedy token), and splits the rows
of a product across threads in runs of ROW_RUN, so a pass of 128 j + 1 rows sends its last row
through that kernel too. On AVX-512 VNNI the same kernel serves every row count; where the kernel
library's QMatMul runs (any AVX2 CPU, kernels/qmatmul.cc) every row is alike by construction. So the runtime
pads (Padding): a pass of n tokens runs `rows(n)` rows, the extra ones copies of the last token
whose KV lands in the spare slots just past the sequence (overwritten by the next real token):

  SINGLE_ROW_OK   n rows; 128 j + 1 > 1 rows get one more            (exact where the kernels are)
  PAD_SINGLE      a one-token pass runs 2 rows, as above otherwise   (exact on every kernel path)
  PAD_EVERY       every pass one more row, as above otherwise        (the same, and each pass still
                                                                      reaches as far past its last
                                                                      row as a one-token step: what
                                                                      verify boundaries need)
The head too never computes a single row where single rows are padded (head_from). Which one a
machine needs is the load check's finding (exactness.py): the cheapest that is exact there.
"""
from __future__ import annotations

from dataclasses import dataclass

INPUT_IDS = "input_ids"
SEQLENS = "seqlens_k"
TOTAL = "total_seq_len"
LOGITS_FROM = "logits_from"
FULL_LOGITS = "full_logits"             # int64 [1] input of a graph with the screened head (head.py)
LOGITS = "logits"
HIDDEN = "hidden"
KEEP_POSITIONS = "keep_positions"       # node name (prefix) of the final Slice(s) from logits_from
ATTENTION_PAD = ("seqlens_pad", "total_pad")   # node names of the full graph's attention padding
                                        # (dropped where SlotAttention runs: attention.py)

META_SPARE_POSITIONS = "conflayers.spare_positions"   # full graph metadata: positions past max_context
                                        # its rotary tables cover (absent: 1, bundle formats 1-3)
ROW_RUN = 128                           # MLAS splits a product's rows in runs of this many per thread
KV_SPARE = 3                            # KV slots past the capacity: the attention's extra row, a
                                        # padding row and the 128 j + 1 row


def past_key(i: int) -> str:
    return f"past_key.{i}"


def past_value(i: int) -> str:
    return f"past_value.{i}"


def present_key(i: int) -> str:
    return f"present_key.{i}"


def present_value(i: int) -> str:
    return f"present_value.{i}"


def single_row(m: int) -> bool:
    """Whether a product over m rows sends a row through a one-row kernel (see above)."""
    return m % ROW_RUN == 1


@dataclass(frozen=True)
class Padding:
    """How the runtime pads the passes of a full graph (see the module docstring)."""
    name: str
    single: bool          # a one-token pass gets a second row
    every: bool           # every pass gets one more row

    def rows(self, n: int) -> int:
        """Rows to run for a pass of n tokens."""
        r = n + 1 if self.every or (self.single and n == 1) else n
        return r + 1 if r > 1 and single_row(r) else r

    @property
    def extra(self) -> int:
        """Rows added to every pass (0 or 1): how much further than its last row a pass reaches."""
        return int(self.every)

    def head_from(self, logits_from: int, rows: int) -> int:
        """The first row of a pass of `rows` rows sent through the final norm and head, for output
        wanted from row `logits_from`: at most logits_from, never 128 j + 1 > 1 rows, and at least 2
        where single rows are padded."""
        start = min(logits_from, rows - 2) if self.single else logits_from
        if rows - start > 1 and single_row(rows - start):
            start -= 1
        return max(start, 0)

    @property
    def for_drafts(self) -> "Padding":
        """What a draft's passes get where the full graph's get this: the same rows (so a draft
        proposes alike alone and in a batch), without the uniform reach only verify boundaries need."""
        return PAD_SINGLE if self.single else SINGLE_ROW_OK

    def reach(self, start: int, n: int) -> int:
        """The KV length a pass of n tokens at `start` attends over: its rows and the attention's
        extra row (what GroupQueryAttention's verify boundaries depend on)."""
        return start + self.rows(n) + 1

    def pass_room(self, start: int, bounds: tuple[int, int] | None) -> int | None:
        """The most tokens one pass at `start` may take and not reach past the next verify
        boundary its first row's one-token step does not reach (None: any)."""
        if bounds is None:
            return None
        b = next_boundary(self.reach(start, 1), bounds)
        n = b - start - 1 - self.extra
        while n > 1 and self.reach(start, n) > b:     # (a 128 j + 1 pass reaches one further)
            n -= 1
        return max(n, 1)


SINGLE_ROW_OK = Padding("single-row-ok", single=False, every=False)
PAD_SINGLE = Padding("pad-single", single=True, every=False)
PAD_EVERY = Padding("pad-every", single=True, every=True)
PADDINGS = {p.name: p for p in (SINGLE_ROW_OK, PAD_SINGLE, PAD_EVERY)}


def next_boundary(length: int, bounds: tuple[int, int]) -> int:
    """The first verify boundary B = first + i * every with B >= length."""
    first, every = bounds
    return first if length <= first else first + every * -(-(length - first) // every)

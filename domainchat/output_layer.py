"""Output layer: the last product of a decode step, final hidden states times the tied embedding,
computed whole or, when the caller says which tokens it could pick, exactly for those alone after
a screen of all of them from an int8 (or bfloat16) copy (OutputLayer's docstring says how and why
it stays bit-equal).

Owns the product's layouts (transposed slices for several rows, the screen's int8 or bfloat16
copy), the screen's error bound and the gathering of exact rows, and `intra_op_threads`, which the
decoder uses too.
It knows nothing of models, adapters or sampling: it gets a weight, hidden states and, per row, a
function from estimates and radii to token ids (sampling.Sampler.candidates in the batcher).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

EXACT_ROWS = 64  # the output layer's exact rows are gathered in multiples of this (OutputLayer)
ALIGNMENT = 64  # bytes; torch's CPU allocations start on this boundary, a loaded weight may not
# ATen capabilities whose int8 product is vectorised; with DEFAULT it is scalar code (13 ms for
# one row against 3.8 for the bfloat16 product on 2 threads, measured).
INT8_SCREEN_CAPABILITIES = ("AVX2", "AVX512")
EXACT_SLACK = 1e-5  # added to every screening radius: denormals flushed by the bfloat16 kernel, and margin


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run a block on `count` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [V, H] as int8 rows and one bfloat16 scale a row (largest magnitude -> 127; a row of
    zeros gets scale 1), for ATen's weight-only int8 product."""
    scales = (weight.abs().amax(dim=1) / 127.0).to(torch.bfloat16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    # A scale rounded down to bfloat16 can put the largest value at 128: clamped, its error is measured.
    return torch.clamp(torch.round(weight / scales.float().unsqueeze(1)), -127, 127).to(torch.int8), scales


def _screen_copy(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The screen's copy of `weight`: int8 rows and their scales where ATen's int8 product is
    vectorised and takes this shape, else bfloat16 (and None)."""
    if torch.backends.cpu.get_cpu_capability() in INT8_SCREEN_CAPABILITIES:
        rows, scales = int8_rows(weight)
        try:
            torch.ops.aten._weight_int8pack_mm(torch.zeros(1, weight.shape[1], dtype=torch.bfloat16), rows, scales)
            return rows, scales
        except RuntimeError as exc:  # a shape or build the kernel refuses
            log.info("output layer screen in bfloat16: the int8 product refused this weight (%s)", exc)
    return weight.to(torch.bfloat16), None


Pick = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class OutputLayer:
    """The output layer's product: final hidden states times the tied embedding ([V, H] float32,
    49,152 x 576 for the 135M model), the largest single product of a decode step.

    One row is multiplied as transformers does, on all intra-op threads, so its logits stay
    bit-equal to transformers' (splitting it by vocabulary over threads kept the bits but saved
    nothing in a decode step: 28.9 vs 29.0 ms, measured). Several rows (a batch of conversations)
    are where the [V, H] layout is slow: the BLAS took 24.5 ms for 2 rows and 33 ms for 3 against
    10 ms for one. For them the decoder keeps transposed copies of the weight ([H, V/threads], one
    slice a thread, contiguous) and multiplies the slices on parallel threads: decode steps of 2, 3
    and 4 rows went from 43.9 / 58.3 / 46.5 ms to 27.8 / 33.9 / 39.8 ms on 2 cores (A/B in one
    process, docs/bench.md). Like every several-row product the logits agree with the one-row product to ~1e-6.
    The copies cost 4 bytes a weight (113 MB for the 135M model); `transposed=False` skips them and
    the screen (the whole product then serves any number of rows).

    Screening (`pick`): most of the vocabulary cannot be the next token, and reading all of the
    float32 weight for it is most of the product's time (it reads 113 MB: ~9.5 ms a row). So the
    product is first estimated for every token from a small copy of the weight, each estimate with a
    radius that provably holds the float32 logit (Cauchy-Schwarz over the rounding of the weight and
    of the hidden state, plus float32 accumulation and the bfloat16 output's rounding). Where ATen
    has a vectorised int8 kernel (AVX2 or AVX-512) the copy is int8 with one bfloat16 scale a token
    (28 MB; ATen's weight-only int8 product, bfloat16 activations, float32 accumulation): one
    stream's decode went from 68.7 to 78.0 tokens/s and four streams' from 148.8 to 155.4 against
    the bfloat16 copy (56 MB), side by side in one process on 2 cores; its radii are ~8x wider, so
    a greedy row needs 6 exact logits at the median and 59 at most instead of 2 and 12 (762 decode
    positions, measured). Elsewhere the copy is bfloat16 (the int8 kernel's scalar fallback is 3x
    slower than oneDNN's bfloat16 product there).
    The caller's `pick` says, from estimates and radii, which tokens it could choose
    (sampling.Sampler.candidates); those alone are multiplied in float32, as entries of the one-row
    product, bit-equal to it (the rows are gathered in multiples of EXACT_ROWS and as far from a
    64-byte boundary as the weight's rows: the BLAS sums a matrix's last rows in another order when
    their count is not a multiple of 8, and rows that start elsewhere too, measured;
    `_exact_rows_agree` checks it on this CPU and this weight before screening is used), and every
    other token gets -inf."""

    def __init__(self, weight: torch.Tensor, threads: int, transposed: bool) -> None:
        weight = weight.detach()  # a model without adapters leaves its weights trainable; same storage
        self.weight = weight
        self.threads = threads
        self.columns = tuple(s.t().contiguous() for s in weight.tensor_split(threads)) if transposed else None
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="output-layer") if threads > 1 else None
        self.screen_weight: torch.Tensor | None = None  # int8 or bfloat16 [V, H]
        self.screen_scales: torch.Tensor | None = None  # bfloat16 [V] for an int8 copy
        if transposed:
            self.screen_weight, self.screen_scales = _screen_copy(weight)
            rounded = self.screen_weight.float()
            if self.screen_scales is not None:
                rounded *= self.screen_scales.float().unsqueeze(1)
            self._weight_error = (weight - rounded).norm(dim=1)  # ||w_i - copy(w_i)|| per token
            self._weight_norm = torch.maximum(weight.norm(dim=1), rounded.norm(dim=1))
            if not self._exact_rows_agree():
                log.info("output layer screening off: gathered rows do not multiply bit-equal on this CPU")
                self.screen_weight = None

    def __call__(self, hidden: torch.Tensor, pick: Sequence[Pick | None] | None = None) -> torch.Tensor:
        """Logits [rows, V] of final hidden states [rows, H]. With `pick` (one per row, or None for a
        row that needs every logit) and screening on, a row whose pick returns token ids gets their
        exact logits and -inf elsewhere; a pick that returns None gets the whole row."""
        if pick is None or self.screen_weight is None or not any(pick):
            return self._whole(hidden)
        estimate, radius = self.screen(hidden)
        logits = torch.full((hidden.shape[0], self.weight.shape[0]), float("-inf"))
        whole_rows = []
        for row, choose in enumerate(pick):
            tokens = choose(estimate[row], radius[row]) if choose is not None else None
            if tokens is None:
                whole_rows.append(row)
            else:
                logits[row, tokens] = self.exact(hidden[row], tokens)
        if whole_rows:
            logits[whole_rows] = self._whole(hidden[whole_rows])
        return logits

    def _whole(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 1 or self.columns is None:
            with intra_op_threads(self.threads):
                return hidden @ self.weight.t()
        with intra_op_threads(1):  # one slice per thread
            if self._pool is None:
                return hidden @ self.columns[0]
            others = [self._pool.submit(torch.matmul, hidden, c) for c in self.columns[1:]]
            return torch.cat([hidden @ self.columns[0]] + [other.result() for other in others], dim=1)

    def screen(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate, radius), each [rows, V]: the float32 logit of every token lies within
        estimate ± radius."""
        assert self.screen_weight is not None
        rounded = hidden.to(torch.bfloat16)
        with intra_op_threads(self.threads):
            if self.screen_scales is not None:
                estimate = torch.ops.aten._weight_int8pack_mm(rounded, self.screen_weight, self.screen_scales).float()
            else:
                estimate = (rounded @ self.screen_weight.t()).float()
        norm = hidden.norm(dim=1, keepdim=True)
        # |h.w - h'.w'| <= |h| |w - w'| + |h - h'| |w'|; both float32 dot products of K terms are off
        # by at most K 2^-24 |h| |w| each (an int8 copy's integers times bfloat16 activations are exact
        # in float32, its scale one more rounding); bfloat16 output rounding by 2^-8 of the value
        # (2^-7 kept).
        accumulation = hidden.shape[1] * 2.0 ** -24 * 2.0 * (norm + rounded.float().norm(dim=1, keepdim=True))
        weight_scale = (hidden - rounded.float()).norm(dim=1, keepdim=True) + accumulation
        radius = norm * self._weight_error + weight_scale * self._weight_norm
        radius.add_(estimate.abs(), alpha=2.0 ** -7).add_(EXACT_SLACK)
        return estimate, radius

    def exact(self, hidden_row: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The one-row product's logits of `tokens` (1-d ids), bit-equal to those entries of it."""
        count, width = int(tokens.shape[0]), self.weight.shape[1]
        padded = -(-count // EXACT_ROWS) * EXACT_ROWS
        rows = tokens if padded == count else torch.cat([tokens, tokens[:1].expand(padded - count)])
        # The gathered rows start as far from a 64-byte boundary as the weight's do (a row of 576
        # floats keeps its start's offset), so that the BLAS takes the same path through each.
        offset = self.weight.data_ptr() % ALIGNMENT // self.weight.element_size()
        gathered = torch.empty(padded * width + ALIGNMENT)[offset:offset + padded * width].view(padded, width)
        torch.index_select(self.weight, 0, rows, out=gathered)
        with intra_op_threads(self.threads):
            return (hidden_row.unsqueeze(0) @ gathered.t())[0, :count]

    def _exact_rows_agree(self, trials: int = 6) -> bool:
        """Whether gathered rows multiply bit-equal to the whole one-row product here (their count
        and position varied, up to the most a pick may ask for)."""
        generator = torch.Generator().manual_seed(0)
        vocab = self.weight.shape[0]
        scale = float(self._weight_norm.median()) or 1.0
        for trial in range(trials):
            hidden = torch.randn(1, self.weight.shape[1], generator=generator) * (50.0 / scale)
            with intra_op_threads(self.threads):
                whole = (hidden @ self.weight.t())[0]
            count = (1, 7, 13, 64, 333, vocab // 8)[trial % 6]
            tokens = torch.randperm(vocab, generator=generator)[:count]
            if not torch.equal(self.exact(hidden[0], tokens), whole[tokens]):
                return False
        return True

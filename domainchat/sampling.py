"""Sampling: the next token from one position's logits, as transformers' `generate` would pick it.

Owns the per-request `Sampler`: transformers' own logits processors for the repetition penalty,
temperature and top-p, plus two masks transformers does not have — a no-repeat-n-gram rule that
looks at the reply only (so quoting a passage stays possible) and the number guard's mask, handed
in by the caller. It knows nothing about models, adapters or batching.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from domainchat.generation import GenerationParams


def banned_by_ngram(generated: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `generated`."""
    if n <= 0 or len(generated) < n:
        return []
    prefix = tuple(generated[len(generated) - n + 1:])
    return [generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i:i + n - 1]) == prefix]


class Sampler:
    """Picks one request's tokens; greedy when `params.temperature` is 0, else seeded sampling."""

    def __init__(self, params: GenerationParams) -> None:
        self.params = params
        self.greedy = params.temperature <= 0
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not self.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        self.processors = processors
        self.generator: torch.Generator | None = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else int(time.time_ns() % 2**31)
            self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def next_token(self, logits: torch.Tensor, seen: torch.Tensor, generated: Sequence[int] = (),
                   guarded: torch.Tensor | None = None) -> int:
        """The token after `seen` (prompt and reply ids so far; the penalty applies to all of them)
        given the last position's `logits`; `guarded` masks what the number guard rules out."""
        scores = logits.float().unsqueeze(0)
        if guarded is not None:
            scores = scores.masked_fill(guarded[: scores.shape[1]], float("-inf"))
        banned = banned_by_ngram(generated, self.params.no_repeat_ngram)
        if banned:
            scores = scores.clone()
            scores[0, banned] = float("-inf")
        scores = self.processors(seen.unsqueeze(0), scores)
        if self.greedy:
            return int(torch.argmax(scores[0]))
        probs = torch.softmax(scores[0], dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # Logits that overflowed (seen with an untrained adapter in the UI test: the request failed
            # with "probability tensor contains inf or nan") or every token masked: take the best
            # finite score rather than fail the whole answer.
            return int(torch.argmax(torch.nan_to_num(scores[0], nan=float("-inf"))))
        return int(torch.multinomial(probs, 1, generator=self.generator))

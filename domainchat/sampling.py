"""Sampling: the next token from one position's logits, as transformers' `generate` would pick it.

Owns the per-request `Sampler`: transformers' own logits processors for the repetition penalty,
temperature and top-p, plus two masks transformers does not have — a no-repeat-n-gram rule that
looks at the reply only (so quoting a passage stays possible) and the number guard's mask, handed
in by the caller. `candidates` tells a decoder that can estimate logits cheaply which tokens need
exact ones (output_layer.OutputLayer). It knows nothing about models, adapters or batching.
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

# Sampling leaves out tokens whose probability is below e^-SAMPLING_MARGIN of the likeliest one's:
# together they could hold at most vocabulary x 4e-18 (2e-13 for 49,152 tokens) of the probability.
SAMPLING_MARGIN = 40.0
MAX_CANDIDATES = 6144  # more than this and computing every logit is as cheap (1/8 of a 49,152 vocabulary)


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
        self.penalty = (RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                        if params.repetition_penalty != 1.0 else None)
        warpers = LogitsProcessorList()
        if not self.greedy:
            warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = warpers
        self.generator: torch.Generator | None = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else int(time.time_ns() % 2**31)
            self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def _penalized(self, scores: torch.Tensor, seen: torch.Tensor, generated: Sequence[int],
                   guarded: torch.Tensor | None) -> torch.Tensor:
        """Scores [n, V] (n rows of candidate logits for the same request) with the masks and the
        repetition penalty applied: each token's score is a non-decreasing function of its logit
        alone (a mask gives -inf, the penalty shrinks it)."""
        if guarded is not None:
            scores = scores.masked_fill(guarded[: scores.shape[1]], float("-inf"))
        banned = banned_by_ngram(generated, self.params.no_repeat_ngram)
        if banned:
            scores = scores.clone()
            scores[:, banned] = float("-inf")
        if self.penalty is None:
            return scores
        return self.penalty(seen.unsqueeze(0).expand(scores.shape[0], -1), scores)

    def candidates(self, estimate: torch.Tensor, radius: torch.Tensor, seen: torch.Tensor,
                   generated: Sequence[int] = (), guarded: torch.Tensor | None = None) -> torch.Tensor | None:
        """The tokens `next_token` could pick when each logit is only known to lie within
        estimate ± radius ([V] each): greedy, those that could score highest; sampling, also those
        that could come within SAMPLING_MARGIN / temperature nats of it (any other has a probability
        below e^-SAMPLING_MARGIN of the best's and gets 0). None when more than MAX_CANDIDATES (then
        every logit is needed). Since a token's score only grows with its logit, the lowest scores
        bound the best from below and the highest bound each token from above."""
        low, high = self._penalized(torch.stack([estimate - radius, estimate + radius]), seen, generated, guarded)
        floor = low.max()
        if not self.greedy:
            floor = floor - SAMPLING_MARGIN * self.params.temperature
        tokens = torch.nonzero(high >= floor)[:, 0]
        return tokens if 0 < tokens.shape[0] <= MAX_CANDIDATES else None

    def next_token(self, logits: torch.Tensor, seen: torch.Tensor, generated: Sequence[int] = (),
                   guarded: torch.Tensor | None = None) -> int:
        """The token after `seen` (prompt and reply ids so far; the penalty applies to all of them)
        given the last position's `logits`; `guarded` masks what the number guard rules out."""
        scores = self._penalized(logits.float().unsqueeze(0), seen, generated, guarded)
        scores = self.warpers(seen.unsqueeze(0), scores)
        if self.greedy:
            return int(torch.argmax(scores[0]))
        probs = torch.softmax(scores[0], dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # Logits that overflowed (seen with an untrained adapter in the UI test: the request failed
            # with "probability tensor contains inf or nan") or every token masked: take the best
            # finite score rather than fail the whole answer.
            return int(torch.argmax(torch.nan_to_num(scores[0], nan=float("-inf"))))
        return int(torch.multinomial(probs, 1, generator=self.generator))

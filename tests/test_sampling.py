"""Sampling: the next token as transformers' generate would pick it, plus the reply-only n-gram ban
and the number guard's mask."""

from __future__ import annotations

import torch

from domainchat.generation import GenerationParams
from domainchat.sampling import Sampler, banned_by_ngram

PLAIN_GREEDY = GenerationParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)


def test_no_repeat_ngram_blocks_loops_in_the_reply_only() -> None:
    assert banned_by_ngram([5, 6, 7, 5, 6], 3) == [7]
    assert banned_by_ngram([5, 6, 7, 5, 6], 0) == []
    assert banned_by_ngram([1, 2], 3) == []


def test_no_repeat_ngram_steers_greedy_away_from_a_loop() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0])  # token 1 is the greedy choice
    seen = torch.tensor([3, 1, 3])
    assert Sampler(PLAIN_GREEDY).next_token(logits, seen, generated=[3, 1, 3]) == 1
    blocked = GenerationParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=2)
    assert Sampler(blocked).next_token(logits, seen, generated=[3, 1, 3]) == 2  # "3 1" would repeat


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0, -1.1])
    seen = torch.tensor([0, 2])
    penalized = GenerationParams(temperature=0.0, repetition_penalty=1.5, no_repeat_ngram=0)
    assert Sampler(PLAIN_GREEDY).next_token(logits, seen) == 0
    assert Sampler(penalized).next_token(logits, seen) == 1  # 2.0 / 1.5 < 1.9


def test_the_guard_mask_rules_tokens_out() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0])
    guarded = torch.tensor([False, True, False])
    assert Sampler(PLAIN_GREEDY).next_token(logits, torch.tensor([0]), guarded=guarded) == 2


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([10.0, 9.0, 0.0, 0.0])  # two tokens hold almost all of the mass
    params = GenerationParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0, no_repeat_ngram=0, seed=3)
    sampler = Sampler(params)
    picks = {sampler.next_token(logits, torch.tensor([3])) for _ in range(50)}
    assert picks == {0}  # token 0 alone is over 0.5


def test_a_seed_makes_sampling_reproducible() -> None:
    logits = torch.zeros(20)
    params = GenerationParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram=0, seed=7)
    first = [Sampler(params).next_token(logits, torch.tensor([0])) for _ in range(1)]
    runs = []
    for _ in range(2):
        sampler = Sampler(params)
        runs.append([sampler.next_token(logits, torch.tensor([0])) for _ in range(10)])
    assert runs[0] == runs[1] and runs[0][:1] == first
    assert len(set(runs[0])) > 1, "uniform logits give different tokens"


def test_sampling_survives_logits_that_are_not_finite() -> None:
    params = GenerationParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, no_repeat_ngram=0, seed=1)
    overflowed = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    assert Sampler(params).next_token(overflowed, torch.tensor([0])) == 3  # the largest score, not a crash
    everything_masked = torch.tensor([True, True, True, True])
    assert Sampler(params).next_token(torch.tensor([1.0, 2.0, 0.5, 0.0]), torch.tensor([0]),
                                      guarded=everything_masked) in range(4)


def test_candidates_hold_the_token_greedy_would_pick_from_the_exact_logits() -> None:
    """Whatever the exact logits within estimate ± radius, greedy's pick (after the masks and the
    penalty) is among the candidates, and picking from them alone gives the same token."""
    generator = torch.Generator().manual_seed(0)
    params = GenerationParams(temperature=0.0, repetition_penalty=1.3, no_repeat_ngram=2)
    seen, generated = torch.tensor([3, 9, 4, 3]), [4, 3, 9, 4]
    for trial in range(200):
        estimate = torch.randn(64, generator=generator) * 3
        radius = torch.rand(64, generator=generator) * 0.5
        exact = estimate + (torch.rand(64, generator=generator) * 2 - 1) * radius
        guarded = torch.rand(64, generator=generator) < 0.1
        sampler = Sampler(params)
        tokens = sampler.candidates(estimate, radius, seen, generated, guarded)
        assert tokens is not None
        picked = sampler.next_token(exact, seen, generated, guarded)
        assert picked in tokens.tolist(), f"trial {trial}"
        only = torch.full((64,), float("-inf"))
        only[tokens] = exact[tokens]
        assert sampler.next_token(only, seen, generated, guarded) == picked


def test_sampling_candidates_reach_margin_over_temperature_below_the_best() -> None:
    from domainchat.sampling import SAMPLING_MARGIN

    estimate = torch.tensor([10.0, 10.0 - SAMPLING_MARGIN * 0.25 + 0.1, 10.0 - SAMPLING_MARGIN * 0.25 - 0.1, -50.0])
    radius = torch.zeros(4)
    plain = dict(repetition_penalty=1.0, no_repeat_ngram=0)
    greedy = Sampler(GenerationParams(temperature=0.0, **plain)).candidates(estimate, radius, torch.tensor([0]))
    assert greedy is not None and greedy.tolist() == [0]
    sampled = Sampler(GenerationParams(temperature=0.25, **plain)).candidates(estimate, radius, torch.tensor([0]))
    assert sampled is not None and sampled.tolist() == [0, 1]  # token 2's probability is below e^-40 of token 0's


def test_too_many_candidates_ask_for_every_logit() -> None:
    from domainchat.sampling import MAX_CANDIDATES

    flat = torch.zeros(MAX_CANDIDATES + 1)
    sampler = Sampler(GenerationParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0))
    assert sampler.candidates(flat, torch.zeros_like(flat), torch.tensor([0])) is None
    assert sampler.candidates(flat[:MAX_CANDIDATES], torch.zeros(MAX_CANDIDATES), torch.tensor([0])) is not None

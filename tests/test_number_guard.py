"""Number guard: masks over the real bundled tokenizer, and generation through the real engine
with the guard on (the transformers path everywhere; the lean decoder's batcher where the CPU has
it, since `engine` uses it when it can)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from domainchat.engine import Engine
from domainchat.generation import GenerationParams
from domainchat.grounding import numbers_in
from domainchat.number_guard import NumberGuard

pytestmark = pytest.mark.slow
ALLOWED = frozenset({"6.99", "1,000", "30"})


@pytest.fixture(scope="module")
def guard(base_checkpoint: Path) -> NumberGuard:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    return NumberGuard(tokenizer, len(tokenizer))


def first_ban(guard: NumberGuard, text: str, context: str = "") -> str | None:
    """The text up to and including the first token the guard would have refused, or None."""
    ids = guard.tokenizer.encode(text, add_special_tokens=False)
    for i, token in enumerate(ids):
        mask = guard.banned(context, ids[:i], ALLOWED)
        if mask is not None and mask[token]:
            return guard.tokenizer.decode(ids[: i + 1])
    return None


def test_the_bundled_tokenizer_writes_one_digit_per_token(guard: NumberGuard) -> None:
    assert guard.supported


def test_allowed_numbers_citations_and_list_markers_pass(guard: NumberGuard) -> None:
    text = "The fee is $6.99, or 1,000 points, within 30 days [1].\n1. Go to Orders [2].\n2. It was 30."
    assert first_ban(guard, text, context="Opening [3].\n") is None


@pytest.mark.parametrize("text, stopped_at", [
    ("A fee of $31 applies.", "A fee of $31"),  # 3 may start 30; 31 is not allowed
    ("Within 3 days.", "Within 3 days"),  # 3 is not a whole allowed number
    ("It costs $6.5 now.", "It costs $6.5"),
    ("Call 555 now.", "Call 5"),
])
def test_other_numbers_are_refused(guard: NumberGuard, text: str, stopped_at: str) -> None:
    assert first_ban(guard, text) == stopped_at


def test_guarded_generation_states_only_allowed_numbers(engine: Engine) -> None:
    messages = [{"role": "user", "content": "List the prices of five cars with their years, in dollars."}]
    params = GenerationParams(max_new_tokens=60, temperature=0.0, repetition_penalty=1.0)
    free = engine.complete(messages, None, params)
    assert set(numbers_in(free)) - ALLOWED, "unguarded, the model writes numbers of its own"
    guarded = engine.complete(messages, None, replace(params, allowed_numbers=ALLOWED))
    stated = numbers_in(guarded)
    if guarded.rstrip()[-1:].isdigit():  # cut off by max_new_tokens in the middle of a number
        assert any(n.startswith(stated.pop()) for n in ALLOWED)
    assert stated and set(stated) <= ALLOWED and guarded != free, guarded


def test_a_reply_start_is_continued_not_repeated(engine: Engine) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = GenerationParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
    whole = engine.complete(messages, None, params)
    start = whole[: whole.index(" ", 8)]  # the model's own first words, cut at a word boundary
    rest = engine.complete(messages, None, replace(params, max_new_tokens=8), reply_start=start)
    assert rest and (start + rest) == whole[: len(start + rest)]

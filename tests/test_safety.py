from __future__ import annotations

import pytest

from domainchat.errors import BadInput
from domainchat.safety import MAX_HISTORY_TURNS, MAX_QUESTION_CHARS, clean_history, clean_question


def test_control_characters_are_removed_and_unicode_kept() -> None:
    assert clean_question("  what\x00 is\x07 APR?\u200f 📈 \n") == "what is APR?\u200f 📈"
    assert clean_question("مرحبا كيف حالك") == "مرحبا كيف حالك"


@pytest.mark.parametrize("question", ["", "   ", "\x00\x01"])
def test_empty_question(question: str) -> None:
    with pytest.raises(BadInput, match="empty"):
        clean_question(question)


def test_question_length_limit() -> None:
    assert clean_question("a" * MAX_QUESTION_CHARS)
    with pytest.raises(BadInput, match=f"limit is {MAX_QUESTION_CHARS}"):
        clean_question("a" * (MAX_QUESTION_CHARS + 1))


def test_history_keeps_only_the_latest_turns() -> None:
    history = [(f"q{i}", f"a{i}") for i in range(MAX_HISTORY_TURNS + 5)]
    kept = clean_history(history)
    assert len(kept) == MAX_HISTORY_TURNS and kept[-1] == (f"q{MAX_HISTORY_TURNS + 4}", f"a{MAX_HISTORY_TURNS + 4}")

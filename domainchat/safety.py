"""Safety: input limits, risk-rule triggers, and screening of text before it reaches the model.

Owns the explicit limits a user can hit (question length, history length) and the checks that run
on a question before anything else. It knows a domain's risk rules but nothing about models or
retrieval; `chat` decides what to do with what it finds.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from domainchat.domains import Domain, RiskRule
from domainchat.errors import BadInput, TooLarge

MAX_QUESTION_CHARS = 2000
MAX_HISTORY_TURNS = 20  # user+assistant pairs kept; older turns are dropped by prompts.render anyway
MAX_TURN_CHARS = 8000

# Control characters (C0/C1, but not tab/newline) and other invisible format characters, which can
# hide instructions or break the tokenizer; right-to-left marks and emoji are kept.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """Normalize Unicode (NFC), drop control characters, trim whitespace."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text)).strip()


def clean_question(question: str) -> str:
    """The question as the pipeline will use it, or BadInput saying what to change."""
    if not isinstance(question, str):
        raise BadInput("The question must be text.")
    cleaned = clean_text(question)
    if not cleaned:
        raise BadInput("The question is empty: type a question.")
    if len(cleaned) > MAX_QUESTION_CHARS:
        raise TooLarge(
            f"The question is {len(cleaned)} characters long; the limit is {MAX_QUESTION_CHARS}. Shorten it."
        )
    return cleaned


def clean_history(history: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Earlier (user, assistant) turns, cleaned; only the last MAX_HISTORY_TURNS are kept."""
    turns = []
    for user, assistant in list(history)[-MAX_HISTORY_TURNS:]:
        user, assistant = clean_text(str(user))[:MAX_TURN_CHARS], clean_text(str(assistant))[:MAX_TURN_CHARS]
        if user:
            turns.append((user, assistant))
    return turns


def triggered_rules(domain: Domain, question: str) -> list[RiskRule]:
    """The domain's risk rules that the question triggers, in the order the domain lists them."""
    return [rule for rule in domain.risk_rules if rule.matches(question)]

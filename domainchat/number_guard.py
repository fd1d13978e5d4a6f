"""Number guard: while a reply is generated, a number may only be written if it is on an allowed
list (the numbers of the passages, the question and the conversation; see grounding.allowed_numbers).

A small model asked for a fee or a deadline readily writes the figure it saw in training instead of
the one in front of it. The guard masks, at each step, the digit tokens that would start or continue
a number not on the list, and, inside a number that is not complete yet, every token that would end
it there. Citation markers ("[2]") and list markers at the start of a line ("1.") stay free. It works
for any tokenizer that writes digits one per token (Llama 3, SmolLM, Qwen, Mistral); on another one
it declines (`supported` is False) and the engine generates unguarded.

It knows a tokenizer and text; nothing of domains, prompts or how logits are computed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch

_TRAILING_NUMBER = re.compile(r"(\d+(?:[.,]\d+)*)([.,]?)$")
TAIL_TOKENS = 16  # enough decoded reply to see the number being written and what precedes it
MAX_FREE_DIGITS = 2  # a number at a line start with at most this many digits may be a list marker


@functools.lru_cache(maxsize=64)  # one allowed list per running answer, asked at every digit
def _prefixes(numbers: frozenset[str]) -> frozenset[str]:
    return frozenset(n[:i] for n in numbers for i in range(1, len(n) + 1))


class NumberGuard:
    """Per-step masks over a tokenizer's vocabulary that keep numbers on an allowed list."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.digit_ids: dict[str, int] = {}
        for digit in "0123456789":
            ids = tokenizer.encode(digit, add_special_tokens=False)
            if len(ids) == 1:
                self.digit_ids[digit] = ids[0]
        self.separator_ids: dict[str, int] = {}
        for sep in ".,":
            ids = tokenizer.encode(sep, add_special_tokens=False)
            if len(ids) == 1:
                self.separator_ids[sep] = ids[0]
        # Only a tokenizer whose every digit-bearing token is a single digit can be guarded by masking
        # those ten tokens (a "2026" token would slip past).
        self.supported = len(self.digit_ids) == 10 and self._digits_split()

    def _digits_split(self) -> bool:
        ids = self.tokenizer.encode("1234567890 2026 365 48", add_special_tokens=False)
        return all(len(self.tokenizer.decode([i]).strip()) <= 1 for i in ids if any(
            c.isdigit() for c in self.tokenizer.decode([i])))

    def banned(self, context: str, generated: Sequence[int], allowed: frozenset[str]) -> torch.Tensor | None:
        """A boolean mask of the tokens that may not come next (None: any may), given the text the
        reply started with (`context`), its tokens so far and the allowed numbers."""
        if not self.supported:
            return None
        text = context[-64:] + self.tokenizer.decode(list(generated[-TAIL_TOKENS:]), skip_special_tokens=True)
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        found = _TRAILING_NUMBER.search(text)
        start = found.start() if found else len(text)
        before = text[:start]
        line_start = before.rstrip(" \t").endswith("\n") or not before.strip()
        if before.endswith("["):
            return None  # a citation marker
        if found is None:
            # Not inside a number: a digit may only start an allowed one (or a list marker).
            if line_start:
                return None
            starts = {n[0] for n in allowed}
            for digit, token in self.digit_ids.items():
                mask[token] = digit not in starts
            return mask
        number, separator = found.group(1), found.group(2)
        if line_start and len(number) <= MAX_FREE_DIGITS and number.isdigit():
            return None  # may be a list marker ("1.") or a short count at a line start
        prefixes = _prefixes(allowed)
        written = number + separator
        for digit, token in self.digit_ids.items():
            mask[token] = written + digit not in prefixes
        complete = number in allowed
        if not complete:
            # The number cannot end here: only digits (and separators that keep it a prefix) may follow.
            digits_or_seps = set(self.digit_ids.values()) | set(self.separator_ids.values())
            keep = mask.clone()
            mask.fill_(True)
            for token in digits_or_seps:
                mask[token] = keep[token]
        for sep, token in self.separator_ids.items():
            mask[token] = bool(separator) or not (complete or number + sep in prefixes)
        # Unreachable through guarded steps; if the reply began inside a number, let it out.
        return None if bool(mask.all()) else mask

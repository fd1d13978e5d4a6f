"""Chat template: what domainchat reads from a tokenizer's own chat template, once per tokenizer.

Owns rendering chat messages into prompt ids (`tokenizer.apply_chat_template`), how an assistant
reply ends (the end-of-turn text training appends to an answer, and the token ids that stop
generation), and what one message costs in tokens around its content (the overhead `prompts.render`
adds per message). Everything is derived by rendering probe conversations with the template, so a
base model that is not ChatML (Llama 2, Zephyr, Llama 3, Gemma, ...) is rendered, trained and
stopped by its own rules; for ChatML (the bundled SmolLM2) the results are exactly the ids that the
former hard-coded `<|im_end|>` gave. This module knows nothing about domains, prompts or models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from domainchat.errors import ModelUnavailable

log = logging.getLogger(__name__)

# A reply no template changes (no whitespace to strip, no markup), found again in the rendered text.
REPLY_PROBE = "DOMAINCHATREPLYPROBE"
MESSAGE_PROBE = "Hello"
# Two turns before the probe message: templates that insist on user/assistant alternation (Llama 2,
# Mistral) accept it, and one that adds a default system prompt when none leads (SmolLM2) adds it
# to both renderings, so the difference is the probe message alone.
_EARLIER = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer with what its chat template says about turns. Build it with `ChatTemplate.of`."""

    tokenizer: Any
    reply_opening: str  # text between the generation prompt and the reply ("" for most templates)
    end_of_turn: str  # text closing a reply, up to and including its end-of-turn token ("<|im_end|>")
    stop_ids: frozenset[int]  # the eos token and the end-of-turn token
    message_overhead: int  # tokens a message costs beyond its content's
    # The tokenizer's special tokens as text ("</s>", "<|eot_id|>"): in a message's content they would
    # be read as the real tokens, so a question or a document could close a turn and open another.
    special_tokens: frozenset[str] = frozenset()

    @classmethod
    def of(cls, tokenizer: Any) -> ChatTemplate:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelUnavailable(f"The base model '{tokenizer.name_or_path}' has no chat template, so it cannot "
                                   "hold a conversation: set DOMAINCHAT_BASE_MODEL to an instruct (chat) model.")
        opening, closing = _reply_frame(tokenizer)
        end_text, end_token = _end_of_turn(tokenizer, closing)
        stops = {tokenizer.eos_token_id}
        if end_token is not None:
            stops.add(tokenizer.convert_tokens_to_ids(end_token))
        return cls(tokenizer=tokenizer, reply_opening=opening, end_of_turn=end_text,
                   stop_ids=frozenset(i for i in stops if isinstance(i, int) and i >= 0),
                   message_overhead=_message_overhead(tokenizer),
                   special_tokens=frozenset(t for t in _special_tokens(tokenizer) if t))

    def prompt_ids(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """The template's token ids of `messages`, ending with the assistant's turn opening when
        `add_generation_prompt`. Special tokens written inside a message's content are removed: only
        the template places turn markup (safety.py strips ChatML markup from user text and documents
        already; this covers every other template's tokens, whatever the text came from)."""
        return _ids(self.tokenizer, [{**m, "content": self.without_special_tokens(m["content"])} for m in messages],
                    add_generation_prompt)

    def without_special_tokens(self, text: str) -> str:
        for token in sorted(self.special_tokens, key=len, reverse=True):  # "<|eot_id|>" before a shorter one in it
            text = text.replace(token, "")
        return text

    def reply_ids(self, reply: str) -> list[int]:
        """The token ids of `reply` as the assistant's turn after the prompt, end-of-turn included:
        what training teaches and perplexity scores."""
        return self.tokenizer.encode(self.reply_opening + reply + self.end_of_turn, add_special_tokens=False)


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


def _ids(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if not isinstance(ids, list):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return list(ids)


def _reply_frame(tokenizer: Any) -> tuple[str, str]:
    """(the text before a reply after the generation prompt, the text after the reply), found by
    rendering a conversation with and without an assistant reply and taking the difference."""
    question = [{"role": "user", "content": "Hi"}]
    prompt = _render(tokenizer, question, add_generation_prompt=True)
    full = _render(tokenizer, question + [{"role": "assistant", "content": REPLY_PROBE}], add_generation_prompt=False)
    if full.startswith(prompt) and REPLY_PROBE in full[len(prompt):]:
        opening, closing = full[len(prompt):].split(REPLY_PROBE, 1)
        return opening, closing
    # A template that renders a finished reply differently from a started one (some hide earlier
    # reasoning): the eos token is the one end of turn that is certain.
    log.warning("the chat template renders a reply differently after its generation prompt; replies end with eos")
    return "", tokenizer.eos_token or ""


def _special_tokens(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}


def _end_of_turn(tokenizer: Any, closing: str) -> tuple[str, str | None]:
    """(the end-of-turn text: `closing` up to and including its first special token, that token).
    What follows that token (ChatML's newline) separates turns: the model never generates it, so
    training does not teach it. A template that closes a reply with no special token gets the eos
    token after its closing text, so that the model learns to stop."""
    found = [(closing.find(token), -len(token), token) for token in _special_tokens(tokenizer) if token in closing]
    if found:
        start, minus_length, token = min(found)
        return closing[:start - minus_length], token
    eos = tokenizer.eos_token or ""
    return closing.rstrip() + eos, eos or None


def _message_overhead(tokenizer: Any) -> int:
    """Tokens one user message costs beyond its content: the rendering with the message minus the
    rendering without it, minus the content alone (5 for ChatML: `<|im_start|>user\\n`, `<|im_end|>\\n`).
    Measured on a user message, the bulk of a prompt; a role whose name takes more tokens costs that
    much more (ChatML's `assistant` is 2), which the budgets' margins absorb, as they did before."""
    without = _ids(tokenizer, _EARLIER, add_generation_prompt=False)
    with_message = _ids(tokenizer, _EARLIER + [{"role": "user", "content": MESSAGE_PROBE}], add_generation_prompt=False)
    content = len(tokenizer.encode(MESSAGE_PROBE, add_special_tokens=False))
    return max(0, len(with_message) - len(without) - content)

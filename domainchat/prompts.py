"""Prompts: turn a domain, a question, its history and retrieved passages into chat messages.

`render()` is the single place a prompt is built, used by inference AND by training, so an adapter
is trained on the prompt format it will see (served answers open with quoted evidence, and the
model then reads only the passages' titles, or the passages cut down to that evidence,
grounding.prompt_passages; training renders whole passages and whole answers). Passages are
numbered [1]..[k] as the answer cites them, and every passage line is quoted ("| ") so that a
document can never pose as instructions. When the prompt would not fit the token budget, the
oldest history turns go first, then the lowest-ranked passages. This module knows nothing about
models (it is given a token counter and what the model's chat template adds around each message)
or about how passages were found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from domainchat.domains import Domain
from domainchat.knowledge import Passage

Message = dict[str, str]
TokenCounter = Callable[[str], int]
NO_PASSAGES = "(no passages were found)"


@dataclass(frozen=True)
class Rendered:
    messages: list[Message]
    passages: list[Passage]  # the passages that made it into the prompt, in citation order
    history_turns: int  # how many earlier turns were kept
    tokens: int


def format_passages(passages: Sequence[Passage] | Sequence[tuple[str, str, str]]) -> str:
    """Number and quote passages. Accepts Passages or (title, source, text) triples."""
    blocks = []
    for number, passage in enumerate(passages, start=1):
        title, source, text = (
            (passage.title, passage.source, passage.text) if isinstance(passage, Passage) else passage
        )
        quoted = "\n".join(f"| {line}" for line in text.strip().splitlines() if line.strip())
        header = f"[{number}] {title}" + (f" ({source})" if source else "")
        blocks.append(f"{header}\n{quoted}")
    return "\n\n".join(blocks) if blocks else NO_PASSAGES


def user_turn(domain: Domain, question: str, passages: Sequence[Passage] | None) -> str:
    """The final user message: the domain's template around the passages, or the bare question when
    retrieval is off (passages is None)."""
    if passages is None:
        return question
    return domain.answer_template.format(passages=format_passages(passages), question=question)


def few_shot_messages(domain: Domain, with_passages: bool) -> list[Message]:
    messages: list[Message] = []
    for shot in domain.few_shot:
        triples = [(p.title, "", p.text) for p in shot.passages]
        content = (
            domain.answer_template.format(passages=format_passages(triples), question=shot.question)
            if with_passages
            else shot.question
        )
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": shot.answer}]
    return messages


def few_shot_for(with_adapter: bool) -> bool:
    """Whether a prompt carries the domain's few-shot examples. An adapter learned the domain's format
    from train.jsonl on prompts without them (see train.py), so it is served without them too, which
    also makes its prompts shorter; the base model needs them to learn the format in context."""
    return not with_adapter


def render(
    domain: Domain,
    question: str,
    history: Sequence[tuple[str, str]] = (),
    passages: Sequence[Passage] | None = (),
    *,
    count_tokens: TokenCounter,
    budget: int,
    message_overhead: int,
    with_few_shot: bool = True,
) -> Rendered:
    """Chat messages for the model, fitted into `budget` tokens.

    `history` is earlier (user, assistant) turns, oldest first. `passages` is ranked best first;
    None means retrieval is off (the question is sent bare, and few-shot examples without passages).
    A message costs its content's tokens plus `message_overhead`, the tokens the model's chat
    template puts around it (`chat_template.ChatTemplate.message_overhead`; 5 for ChatML).
    """
    with_passages = passages is not None
    kept_passages = list(passages or [])
    kept_history = list(history)
    system = [{"role": "system", "content": domain.system_prompt}]
    shots = few_shot_messages(domain, with_passages) if with_few_shot else []

    def cost(messages: Sequence[Message]) -> int:
        return sum(count_tokens(m["content"]) + message_overhead for m in messages)

    fixed = cost(system) + cost(shots)

    def build() -> tuple[list[Message], int]:
        turns: list[Message] = []
        for user, assistant in kept_history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        final = {"role": "user", "content": user_turn(domain, question, kept_passages if with_passages else None)}
        return system + shots + turns + [final], fixed + cost(turns) + cost([final])

    messages, tokens = build()
    while tokens > budget and kept_history:
        kept_history.pop(0)
        messages, tokens = build()
    while tokens > budget and kept_passages:
        kept_passages.pop()
        messages, tokens = build()
    return Rendered(messages=messages, passages=kept_passages, history_turns=len(kept_history), tokens=tokens)

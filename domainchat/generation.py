"""Generation interface: what a caller asks an engine for, and what an engine must offer.

Owns `GenerationParams` (sampling settings, whose defaults are the served defaults and are written
nowhere else), `AdapterStatus`, and the `GenerationEngine` protocol that both the local engine
(engine.py) and a remote generation server (remote.py) implement. Imports no torch, so that the
page, the API and a front that talks to a generation server can use these types without loading it.
It knows nothing about models, domains or prompts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 200
    temperature: float = 0.3  # 0 means greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    # Ban a token that would repeat an n-gram the reply already contains (0: off). Unlike
    # transformers' option this looks at the reply only, so quoting a passage stays possible.
    no_repeat_ngram: int = 4
    seed: int | None = None
    # The only numbers the reply may write (number_guard); None: any.
    allowed_numbers: frozenset[str] | None = None


DEFAULT_PARAMS = GenerationParams()


@dataclass(frozen=True)
class AdapterStatus:
    name: str
    path: Path | str  # its folder, or its model name on a generation server
    loaded: bool
    reason: str | None = None  # why it is unavailable, when loaded is False


class GenerationEngine(Protocol):
    """What chat needs from whatever generates text: a loaded model or a generation server."""

    adapters: dict[str, AdapterStatus]
    context_window: int
    message_overhead: int  # tokens the chat template adds around each message's content (prompts.render)
    base_source: str
    quant: str

    def available(self, name: str | None) -> bool: ...
    def warm_up(self) -> None: ...
    def count_tokens(self, text: str) -> int: ...

    def stream(self, messages: Messages, adapter: str | None = None, params: GenerationParams = DEFAULT_PARAMS,
               cancel: threading.Event | None = None, prefix_messages: int = 0,
               reply_start: str = "") -> Iterator[str]: ...

    def complete(self, messages: Messages, adapter: str | None = None,
                 params: GenerationParams = DEFAULT_PARAMS, prefix_messages: int = 0,
                 reply_start: str = "") -> str: ...

    def answer_nll(self, messages: Messages, answer: str, adapter: str | None = None) -> tuple[float, int]: ...

    def close(self) -> None:
        """Stop background work and release what the engine holds; generating afterwards is an error."""

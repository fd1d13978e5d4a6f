"""Engine: the loaded base model with every adapter, generating text for chat messages.

Owns the model once loaded (base_model.py loads it), attaching every adapter at start and checking
that each really changes the model (the canary), routing each forward pass to the adapter its
request asked for, the key/value caches of fixed prompt prefixes, and streaming a reply token by
token. Generation takes one of two paths. When `decoder.LeanDecoder` understands the model (a Llama
in nf4 on the CPU; DOMAINCHAT_DECODER=lean, the default), batcher.py's thread runs
every request, the running ones batched into one decode step. Otherwise transformers + peft run one
request's forward passes at a time under one lock, since peft's active adapter is process-wide:
concurrent requests take turns token by token, each with its own adapter. Both paths honour the
grounding hooks: a `reply_start` the model continues and `GenerationParams.allowed_numbers`, which
the number guard turns into a mask before sampling.

The engine knows nothing about domains, prompts or retrieval: it is given messages, an adapter
name and sampling parameters, and yields text. What the tokenizer's chat template says (how a
prompt is rendered, which tokens end a reply) comes from chat_template.py. `standard_nf4_layout`
loads a model as a CPU without AVX512-BF16 would, so that tests and the bench run that path here.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from domainchat import adapters, base_model
from domainchat.batcher import Batcher, PrefixCache, Request
from domainchat.chat_template import ChatTemplate
from domainchat.errors import BadInput, ModelUnavailable, TooLarge
from domainchat.generation import DEFAULT_PARAMS, AdapterStatus, GenerationParams, Messages
from domainchat.number_guard import NumberGuard
from domainchat.sampling import Sampler
from domainchat.settings import Settings

log = logging.getLogger(__name__)


@contextmanager
def standard_nf4_layout() -> Iterator[None]:
    """Models loaded inside keep bitsandbytes' standard nf4 layout, as on a CPU without AVX512-BF16
    (bitsandbytes repacks into its tile layout only where that kernel runs, deciding as each
    Linear4bit is built): how the bench and the tests run the decoder's float32 path on any CPU."""
    import bitsandbytes.nn.modules as bnb_modules

    original = bnb_modules.has_avx512bf16
    bnb_modules.has_avx512bf16 = lambda: False
    try:
        yield
    finally:
        bnb_modules.has_avx512bf16 = original

CANARY_MESSAGES = [{"role": "user", "content": "Explain in one sentence what you can help with."}]
# An adapter whose largest logit change on the canary prompt is below this changes nothing useful.
CANARY_MIN_DELTA = 1e-3


class Engine:
    """One loaded base model with all adapters; thread-safe streaming generation."""

    def __init__(self, model, tokenizer, base_source: str, quant: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_source = base_source
        self.quant = quant
        self.adapters: dict[str, AdapterStatus] = {}
        self._lock = threading.Lock()
        self._active: str | None = "?"  # adapter the model is routed to now; None = base only; "?" unknown
        self._served = False  # set at the first forward pass; see _load_adapters
        self._prefixes = PrefixCache()
        self._closed = False
        self.template = ChatTemplate.of(tokenizer)
        self.message_overhead = self.template.message_overhead
        self._stop_ids = set(self.template.stop_ids)
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048))
        self._decoder = None  # a decoder.LeanDecoder once use_lean_decoder() succeeds
        self._batcher: Batcher | None = None
        self._guard = NumberGuard(tokenizer, int(model.config.vocab_size))

    @classmethod
    def start(cls, settings: Settings, adapter_dirs: Mapping[str, Path] | None = None) -> Engine:
        """Load the base model, then every adapter in `adapter_dirs` under its name, then check each;
        then build the lean decoder over them (unless DOMAINCHAT_DECODER=transformers)."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        model, tokenizer = base_model.load_base(settings)
        base_model.return_free_memory()
        engine = cls(model, tokenizer, base_model.resolve_base(settings), settings.quant)
        engine._load_adapters(adapter_dirs or {})
        if settings.decoder == "lean":
            engine.use_lean_decoder()
        base_model.return_free_memory()
        return engine

    def use_lean_decoder(self) -> bool:
        """Serve generation through `decoder.LeanDecoder` when the model allows it (True if so)."""
        from domainchat.decoder import LeanDecoder

        self.warm_up()  # bitsandbytes repacks its weights at the first forward; the decoder reads them packed
        with self._lock:
            self._decoder = LeanDecoder.build(self.model)
        if self._decoder is not None:
            self._batcher = Batcher(self._decoder, self._stop_ids, self._guard)
        return self._decoder is not None

    @property
    def decoder_name(self) -> str:
        """Which path generates: "lean" (batcher.py over decoder.py) or "transformers"."""
        return "lean" if self._batcher is not None else "transformers"

    @property
    def decoder_layout(self) -> str | None:
        """The lean decoder's matrices: "nf4 kernel" (bitsandbytes' AVX512-BF16 kernel) or "nf4
        dequantized" (other CPUs: dequantized to float32 for each product); None on the transformers path."""
        return self._decoder.layout if self._decoder is not None else None

    def close(self) -> None:
        """Stop the generation thread and wait for it; answers still running end with an error.
        Call it before the process exits: a thread still inside a torch call when the interpreter
        shuts down aborts it ("terminate called without an active exception"). Idempotent."""
        self._closed = True
        if self._batcher is not None:
            self._batcher.close()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    # -- adapters ------------------------------------------------------------------------------

    def _load_adapters(self, adapter_dirs: Mapping[str, Path]) -> None:
        """Attach every adapter, then run the canary on each. Never raises: a bad adapter is recorded
        as unavailable with the reason, and every other adapter and the base keep working.

        All adapters are attached before the first forward pass on purpose: on CPU, bitsandbytes
        repacks 4-bit weights at the first forward, and any later `state_dict()` call (which peft
        makes while loading an adapter) corrupts that packing (logits off by ~45). So the set of
        adapters is fixed at start; changing it means starting a new Engine.
        """
        from peft import PeftModel

        if self._served:
            raise RuntimeError("adapters can only be loaded before the first generation; start a new Engine")
        problems: dict[str, str] = {}
        for name, path in sorted(adapter_dirs.items()):
            path = Path(path)
            base = self.model.get_base_model() if self.has_peft else self.model
            problem = adapters.shape_problem(path, base)
            if problem is None:
                try:
                    if self.has_peft:
                        self.model.load_adapter(str(path), adapter_name=name)
                    else:
                        self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                except Exception as exc:  # peft raises many types for a bad adapter; the reason is shown
                    problem = f"it failed to load ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
            if problem is not None:
                problems[name] = problem
            self.adapters[name] = AdapterStatus(name, path, problem is None)
        self.model.eval()
        for name, status in self.adapters.items():
            if name not in problems:
                delta = self.canary_delta(name)
                if delta < CANARY_MIN_DELTA:
                    problems[name] = f"it changes nothing (canary logit change {delta:.2g} < {CANARY_MIN_DELTA:g})"
            if name in problems:
                self.adapters[name] = AdapterStatus(name, status.path, False, f"adapter unavailable: {problems[name]}")
                log.warning("%s: adapter unavailable: %s", name, problems[name])

    def available(self, name: str | None) -> bool:
        return name is None or (name in self.adapters and self.adapters[name].loaded)

    def _tuned(self, name: str) -> bool:
        """Attached to the model (the canary may still reject it)."""
        return self.has_peft and name in self.model.peft_config and name in self.adapters

    def canary_delta(self, name: str) -> float:
        """Largest absolute change the adapter makes to the base's next-token logits on a fixed prompt."""
        ids = self.encode(CANARY_MESSAGES)
        if not self._tuned(name):
            return 0.0
        with torch.no_grad():
            base = self._forward(ids, None, None).logits[0, -1]
            tuned = self._forward(ids, name, None).logits[0, -1]
        return float((tuned.float() - base.float()).abs().max())

    def warm_up(self) -> None:
        """One forward pass, so the first request does not pay for bitsandbytes' weight repacking
        (nothing to do once any forward has run: the canaries, or the lean decoder's build)."""
        if self._served:
            return
        with torch.no_grad():
            self._forward(self.encode(CANARY_MESSAGES), None, None)

    @contextmanager
    def routed(self, name: str | None) -> Iterator[None]:
        """Hold the model, routed to adapter `name` (None: the base alone), for code that drives
        `self.model` itself, such as the bench's `generate` baseline."""
        with self._lock:
            self._served = True
            self._route(name)
            yield

    def _route(self, name: str | None) -> None:
        """Point the model at adapter `name` (None: the base alone). Call with the lock held."""
        if name == self._active or not self.has_peft:
            return
        layers = self.model.base_model
        if name is None:
            layers.disable_adapter_layers()
        else:
            if self._active in (None, "?"):
                layers.enable_adapter_layers()
            self.model.set_adapter(name)
        self._active = name

    def _forward(self, ids: torch.Tensor, adapter: str | None, cache, last_only: bool = True):
        """One forward pass with `adapter`. `last_only` computes logits for the last position only:
        a prefill would otherwise spend ~1/3 of its time on a 49k-wide projection for every token."""
        with self._lock:
            self._served = True
            self._route(adapter)
            return self.model(input_ids=ids, cache=cache, use_cache=cache is not None,
                              logits_to_keep=1 if last_only else 0)

    def _prefix_ids(self, prefix: Messages, ids: torch.Tensor) -> tuple[int, ...]:
        """The token ids of `prefix` when `ids` starts with them (and goes on after), else ()."""
        if not prefix:
            return ()
        prefix_ids = self._template_ids(prefix, add_generation_prompt=False)
        n = prefix_ids.shape[1]
        if n >= ids.shape[1] or not torch.equal(ids[0, :n], prefix_ids[0]):
            return ()
        return tuple(prefix_ids[0].tolist())

    def _cached_prefix(self, prefix: Messages, ids: torch.Tensor, adapter: str | None):
        """(a copy of the key/value cache of `prefix`'s tokens, their count) when `ids` starts with
        them, computing and keeping it on first use; else (an empty cache, 0)."""
        from transformers import DynamicCache

        prefix_ids = self._prefix_ids(prefix, ids)
        if not prefix_ids:
            return DynamicCache(), 0

        def compute() -> DynamicCache:
            cache = DynamicCache()
            with torch.no_grad():
                self._forward(torch.tensor([prefix_ids], device=self.device), adapter, cache)
            return cache

        cached = self._prefixes.get_or_build(("transformers", adapter, prefix_ids), compute)
        return copy.deepcopy(cached), len(prefix_ids)

    # -- generation ----------------------------------------------------------------------------

    def encode(self, messages: Messages) -> torch.Tensor:
        """The prompt ids of `messages`, ending with the assistant's turn opening."""
        return self._template_ids(messages, add_generation_prompt=True)

    def _template_ids(self, messages: Messages, add_generation_prompt: bool) -> torch.Tensor:
        ids = self.template.prompt_ids(messages, add_generation_prompt)
        return torch.tensor([ids], device=self.device)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def stream(
        self,
        messages: Messages,
        adapter: str | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        cancel: threading.Event | None = None,
        prefix_messages: int = 0,
        reply_start: str = "",
    ) -> Iterator[str]:
        """Yield the reply to `messages` piece by piece, generated with `adapter` (None: base only).
        With `reply_start`, the reply is taken to begin with that text (it is not yielded again): the
        model continues it.

        Stops at the end-of-turn token, after `params.max_new_tokens`, or as soon as `cancel` is set
        (or the consumer stops iterating). The first `prefix_messages` messages are a fixed prefix
        (a domain's system prompt and few-shot examples): their key/value cache is computed once per
        adapter and reused, so a request only prefills what follows them."""
        if self._closed:
            raise ModelUnavailable("The engine was shut down; restart domainchat.")
        if not self.available(adapter):
            reason = self.adapters[adapter].reason if adapter in self.adapters else "not loaded"
            raise BadInput(f"Adapter '{adapter}' cannot be used: {reason}.")
        ids = self.encode(messages)
        if reply_start:
            start = self.tokenizer.encode(reply_start, add_special_tokens=False, return_tensors="pt").to(self.device)
            ids = torch.cat([ids, start], dim=1)
        if ids.shape[1] + params.max_new_tokens > self.context_window:
            raise TooLarge(
                f"The conversation is too long for the model ({ids.shape[1]} prompt tokens + "
                f"{params.max_new_tokens} to generate > {self.context_window}); start a new conversation."
            )
        if self._batcher is not None and self._decoder.supports(adapter):
            prefix_ids = self._prefix_ids(messages[:prefix_messages], ids)
            request = Request(ids[0].tolist(), adapter, Sampler(params), cancel, prefix_ids, reply_start)
            yield from self._texts(self._batcher.run(request))
        else:
            yield from self._texts(self._tokens_transformers(messages, ids, adapter, params, cancel, prefix_messages,
                                                             reply_start))

    def _tokens_transformers(self, messages, ids: torch.Tensor, adapter: str | None, params: GenerationParams,
                             cancel: threading.Event | None, prefix_messages: int,
                             reply_start: str = "") -> Iterator[int]:
        """Reply tokens one forward pass at a time through transformers + peft (any model)."""
        sampler = Sampler(params)
        cache, cached = self._cached_prefix(messages[:prefix_messages], ids, adapter)
        seen = ids[0].cpu()
        generated: list[int] = []
        step_input = ids[:, cached:]
        with torch.no_grad():
            for _ in range(params.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                logits = self._forward(step_input, adapter, cache).logits[0, -1].cpu()
                guarded = (self._guard.banned(reply_start, generated, params.allowed_numbers)
                           if params.allowed_numbers is not None else None)
                token = sampler.next_token(logits, seen, generated, guarded)
                if token in self._stop_ids:
                    return
                generated.append(token)
                seen = torch.cat([seen, torch.tensor([token])])
                yield token
                step_input = torch.tensor([[token]], device=self.device)

    def _texts(self, tokens: Iterator[int]) -> Iterator[str]:
        """Reply tokens as text pieces, holding a piece back while a multi-byte character is split."""
        generated: list[int] = []
        emitted = ""
        for token in tokens:
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                piece, emitted = text[len(emitted):], text
                if piece:
                    yield piece
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def answer_nll(self, messages: Messages, answer: str, adapter: str | None = None) -> tuple[float, int]:
        """(summed negative log-likelihood, token count) of `answer` as the assistant's reply to
        `messages` with `adapter`, end-of-turn token included: the quantity behind perplexity."""
        if not self.available(adapter):
            raise BadInput(f"Adapter '{adapter}' cannot be used.")
        prompt = self.encode(messages)
        reply = torch.tensor([self.template.reply_ids(answer)], device=self.device)
        ids = torch.cat([prompt, reply], dim=1)
        if ids.shape[1] > self.context_window:
            raise TooLarge(f"{ids.shape[1]} tokens exceed the model's context window ({self.context_window}).")
        with torch.no_grad():
            logits = self._forward(ids, adapter, None, last_only=False).logits[0, prompt.shape[1] - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits, reply[0], reduction="sum")
        return float(nll), int(reply.shape[1])

    def complete(self, messages: Messages, adapter: str | None = None, params: GenerationParams = DEFAULT_PARAMS,
                 prefix_messages: int = 0, reply_start: str = "") -> str:
        return "".join(self.stream(messages, adapter, params, prefix_messages=prefix_messages, reply_start=reply_start))

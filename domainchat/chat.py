"""Chat: the one place that composes the pipeline for a question.

question -> limits and risk rules (safety) -> retrieval (knowledge) -> prompt (prompts) -> adapter
and generation (engine) -> a stream of events. `Assistant.answer()` yields `Token`, `Sources`,
`Notice` and finally `Done` events; the CLI, the UI and the API are thin adapters over them, and
`drain` collects them into a `Transcript`. Also owns the admission limit that the page and the API
share (`Admission`). This module holds no per-user state: the caller passes the history of its own
conversation.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from domainchat import grounding, prompts, safety
from domainchat.domains import Domain, GroundingSettings, Registry, load_registry
from domainchat.errors import BadInput, Busy
from domainchat.generation import GenerationEngine, GenerationParams
from domainchat.knowledge import IngestReport, KnowledgeStore, Passage, RemoveReport, StoredDocument
from domainchat.remote import RemoteEngine
from domainchat.settings import Settings

WITHHELD_ANSWER = "I can't share my instructions. Please ask a question about this topic."
SENTENCE_EMBEDDINGS_KEPT = 20_000  # ~30 MB of MiniLM vectors: the sentences of recently cited passages
MIN_CONTINUATION_TOKENS = 32  # what the model may add after an evidence opening, at the least


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class Sources:
    passages: list[Passage]


@dataclass(frozen=True)
class Notice:
    kind: str  # "disclaimer" | "abstain" | "risk" | "adapter" | "error"
    text: str


@dataclass(frozen=True)
class Done:
    answer: str
    adapter: str | None
    abstained: bool
    timing: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0


Event = Token | Sources | Notice | Done


@dataclass(frozen=True)
class ModelInput:
    """What the model is given for one answer, as served (the bench measures the same)."""

    messages: list[dict[str, str]]
    reply_start: str  # the quoted evidence the reply opens with; the model continues after it
    params: GenerationParams  # with the number guard's allowed numbers and the opening's share of the length
    prefix_messages: int  # leading messages every question of the domain shares (a cached prefix)
    passages: list[Passage]  # what the answer cites: whole passages, in citation order (the sources panel)
    tokens: int  # the prompt's tokens


@dataclass
class Transcript:
    """What a stream of events said: the text so far, the sources, the notices, and the Done."""

    text: str = ""
    sources: list[Passage] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    done: Done | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, Token):
            self.text += event.text
        elif isinstance(event, Sources):
            self.sources = event.passages
        elif isinstance(event, Notice):
            self.notices.append(event)
        elif isinstance(event, Done):
            self.done = event

    @property
    def answer(self) -> str:
        """The final answer: Done's word when it came (a withheld answer replaces its start)."""
        return self.done.answer if self.done is not None else self.text

    def notices_json(self) -> list[dict[str, str]]:
        return [{"kind": n.kind, "text": n.text} for n in self.notices]


def drain(events: Iterable[Event], on_token: Callable[[str], None] | None = None) -> Transcript:
    """Run an answer to its end and return what it said; `on_token` sees each piece as it comes."""
    transcript = Transcript()
    for event in events:
        transcript.add(event)
        if on_token is not None and isinstance(event, Token):
            on_token(event.text)
    if transcript.done is None:
        raise RuntimeError("an answer's events ended without Done")
    return transcript


class Admission:
    """At most `active` answers generate at once, `waiting` more may queue, the rest are told to
    retry. One per Assistant, so the page and the API share the limit."""

    def __init__(self, active: int, waiting: int) -> None:
        self._slots = threading.Semaphore(active)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._limit = active + waiting

    def enter(self) -> None:
        with self._lock:
            if self._in_flight >= self._limit:
                raise Busy("The server is busy: too many requests are waiting. Try again in a few seconds.")
            self._in_flight += 1
        self._slots.acquire()

    def leave(self) -> None:
        self._slots.release()
        with self._lock:
            self._in_flight -= 1


class KnowledgeBase(Protocol):
    def search(self, domain_id: str, question: str, k: int, context: str | None = None) -> list[Passage]: ...
    def count(self, domain_id: str) -> int: ...
    def ingest(self, domain_id: str, paths: Sequence[Path], *, origin: str = "cli",
               progress: Callable[[int, int, str], None] | None = None) -> IngestReport: ...
    def documents(self, domain_id: str) -> list[StoredDocument]: ...
    def remove_documents(self, domain_id: str, sources: Iterable[str]) -> RemoveReport: ...


def adapter_dirs(settings: Settings, registry: Registry) -> dict[str, Path]:
    """The adapter folder of every domain that has one (`adapters/<id>/adapter_config.json`)."""
    folders = {}
    for domain_id in registry.domains:
        folder = settings.adapters_dir / domain_id
        if folder.is_dir():
            folders[domain_id] = folder
    return folders


def sync_knowledge(store: KnowledgeStore, settings: Settings, registry: Registry) -> dict[str, dict]:
    """Ingest what changed in each domain's `knowledge/<id>/` folder; returns the reports."""
    return {domain_id: store.sync_folder(domain_id, settings.knowledge_dir / domain_id).to_json()
            for domain_id in registry.domains}


class Assistant:
    """Domains + engine + knowledge, answering one question at a time per call (thread-safe)."""

    def __init__(self, settings: Settings, registry: Registry, engine: GenerationEngine,
                 knowledge: KnowledgeBase | None):
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.knowledge = knowledge
        self.admission = Admission(settings.max_active, settings.max_waiting)
        self._sentence_vectors: OrderedDict[str, list[float]] = OrderedDict()
        self._sentence_lock = threading.Lock()

    @classmethod
    def start(cls, settings: Settings, knowledge: KnowledgeBase | None = None) -> Assistant:
        """Load domains, the engine with every domain's adapter, and the knowledge store, bringing
        each domain's store up to date with `knowledge/<id>/` (cheap when nothing changed). Both are
        warmed up, so that the first question does not pay for loading the embedder or repacking
        the 4-bit weights."""
        # One after the other on purpose: loading the model briefly needs ~400 MB more than it keeps,
        # and opening the knowledge store beside it raised the peak from 1.11-1.36 GB to 1.49-1.67 GB
        # over nine starts of probe.py, without starting faster (the two loads share the cores).
        registry = load_registry(settings.domains_dir)
        engine: GenerationEngine
        if settings.llm_url:  # a generation server holds the model and the adapters
            engine = RemoteEngine.start(settings, list(registry.domains))
        else:
            from domainchat.engine import Engine  # torch: only where the model runs here

            engine = Engine.start(settings, adapter_dirs(settings, registry))
        engine.warm_up()
        store = knowledge
        if store is None:
            store = KnowledgeStore.open(settings.home, settings.chroma_url, embed_model=settings.embed_model)
            sync_knowledge(store, settings, registry)
            store.embeddings.embed_query("warm up")
        return cls(settings, registry, engine, store)

    def close(self) -> None:
        """Stop the engine's background work; call before the process exits."""
        self.engine.close()

    def model_label(self) -> str:
        """The base model and how it runs, for a status line: e.g. `SmolLM2-135M… (nf4)`."""
        return f"{Path(self.engine.base_source).name} ({self.engine.quant})"

    def ingest(self, domain_id: str, paths: Sequence[Path], origin: str,
               progress: Callable[[int, int, str], None] | None = None) -> IngestReport:
        """Add documents to a domain's knowledge base (the page's upload)."""
        self.registry.get(domain_id)
        if self.knowledge is None:
            raise BadInput("This assistant runs without a knowledge base; documents cannot be added.")
        return self.knowledge.ingest(domain_id, paths, origin=origin, progress=progress)

    def documents(self, domain_id: str) -> list[StoredDocument]:
        """The domain's documents (the page's list); none without a knowledge base."""
        self.registry.get(domain_id)
        return self.knowledge.documents(domain_id) if self.knowledge is not None else []

    def remove_documents(self, domain_id: str, sources: Sequence[str]) -> RemoveReport:
        """Remove documents from a domain's knowledge base (the page's removal)."""
        self.registry.get(domain_id)
        if self.knowledge is None:
            raise BadInput("This assistant runs without a knowledge base; there is nothing to remove.")
        return self.knowledge.remove_documents(domain_id, sources)

    def knowledge_count(self, domain_id: str) -> int:
        return self.knowledge.count(domain_id) if self.knowledge is not None else 0

    def generate_raw(self, messages: Sequence[dict[str, str]], adapter: str | None, params: GenerationParams,
                     cancel: threading.Event | None = None, reply_start: str = "") -> Iterator[Event]:
        """The engine alone on the caller's messages (the API's `<domain>:raw`), as events."""
        pieces = []
        for piece in self.engine.stream(messages, adapter, params, cancel, reply_start=reply_start):
            pieces.append(piece)
            yield Token(piece)
        text = "".join(pieces)
        yield Done(answer=text, adapter=adapter, abstained=False, timing={"tokens": self.engine.count_tokens(text)})

    def adapter_for(self, domain: Domain) -> tuple[str | None, str | None]:
        """(adapter name to use or None, why the domain runs on the base alone or None)."""
        status = self.engine.adapters.get(domain.id)
        if status is None:
            return None, "base only: no adapter trained for this domain"
        if not status.loaded:
            return None, f"base only: {status.reason}"
        return domain.id, None

    def domain_rows(self) -> list[dict]:
        rows = []
        for domain in self.registry.domains.values():
            status = self.engine.adapters.get(domain.id)
            rows.append(
                {
                    "id": domain.id,
                    "title": domain.title,
                    "description": domain.description,
                    "adapter": str(status.path) if status else None,
                    "adapter_loaded": bool(status and status.loaded),
                    "adapter_status": (status.reason if status and not status.loaded else None),
                    "chunks": self.knowledge_count(domain.id),
                }
            )
        for domain_id, reason in self.registry.broken.items():
            rows.append({"id": domain_id, "title": None, "description": None, "adapter": None,
                         "adapter_loaded": False, "adapter_status": None, "chunks": 0, "error": reason})
        return rows

    def candidates(self, domain: Domain, question: str, history: Sequence[tuple[str, str]] = ()) -> list[Passage]:
        """The domain's k best passages for `question`, before any threshold. In a conversation the
        previous question is searched too and both rankings are fused, so that a follow-up such as
        "Can I cancel it later?" finds what "it" was about."""
        if self.knowledge is None:
            return []
        context = history[-1][0] if history else None
        return self.knowledge.search(domain.id, question, domain.retrieval.k, context=context)

    def retrieve(self, domain: Domain, question: str, history: Sequence[tuple[str, str]] = ()) -> list[Passage]:
        """The passages an answer may use: the best k at or above the domain's min_score ([] = abstain),
        with instruction-like text neutralized."""
        found = self.candidates(domain, question, history)
        # Screened again here: a store written by an older version or by another tool was not.
        return [replace(p, text=safety.screen_document_text(p.text).text)
                for p in found if p.score >= domain.retrieval.min_score]

    def render(self, domain: Domain, question: str, history: Sequence[tuple[str, str]],
               passages: list[Passage] | None, use_few_shot: bool, max_new_tokens: int) -> prompts.Rendered:
        budget = min(self.settings.prompt_tokens, self.engine.context_window - max_new_tokens)
        return prompts.render(domain, question, history, passages, count_tokens=self.engine.count_tokens,
                              budget=budget, message_overhead=self.engine.message_overhead,
                              with_few_shot=use_few_shot)

    def _embed_sentences(self, texts: list[str]) -> list[list[float]]:
        """MiniLM vectors of `texts`, remembered: the same passages are cited again and again."""
        # Embedding one answer's ~17 passage sentences takes a quarter to half a second on 2 cores.
        embeddings = getattr(self.knowledge, "embeddings", None)
        assert embeddings is not None
        with self._sentence_lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._sentence_vectors]
        computed = dict(zip(missing, embeddings.embed_documents(missing), strict=True)) if missing else {}
        with self._sentence_lock:
            self._sentence_vectors.update(computed)
            vectors = [computed.get(t) or self._sentence_vectors[t] for t in texts]
            for t in texts:
                if t in self._sentence_vectors:
                    self._sentence_vectors.move_to_end(t)
            while len(self._sentence_vectors) > SENTENCE_EMBEDDINGS_KEPT:
                self._sentence_vectors.popitem(last=False)
        return vectors

    def _ground(self, question: str, history: Sequence[tuple[str, str]], passages: list[Passage] | None,
               params: GenerationParams, settings: GroundingSettings,
               ) -> tuple[str, GenerationParams, list[Passage] | None]:
        """(the text the answer opens with, the parameters with the number guard's allowed list, the
        passages the model reads): the levers that keep an answer to its passages. Nothing changes
        without passages. With an opening, the model reads what `settings.prompt_passages` says:
        by default only the passages' titles, the quoted evidence being in the opening it continues."""
        if not passages:
            return "", params, passages
        embed = self._embed_sentences if getattr(self.knowledge, "embeddings", None) is not None else None
        reply_start, model_reads = grounding.served_start(question, passages, embed, settings.evidence_sentences,
                                                          settings.prompt_passages)
        if reply_start:
            # The opening counts against the answer's length, so answers stay as short as before.
            params = replace(params, max_new_tokens=max(MIN_CONTINUATION_TOKENS,
                                                        params.max_new_tokens - self.engine.count_tokens(reply_start)))
        if settings.number_guard:
            allowed = grounding.allowed_numbers([p.text for p in passages] + [question] +
                                                [text for turn in history for text in turn])
            params = replace(params, allowed_numbers=allowed)
        return reply_start, params, model_reads

    def model_input(self, domain: Domain, question: str, history: Sequence[tuple[str, str]],
                    passages: list[Passage] | None, use_few_shot: bool, params: GenerationParams,
                    settings: GroundingSettings) -> ModelInput:
        """The prompt, reply start and parameters for `question` over `passages` (None: retrieval off)."""
        rendered = self.render(domain, question, history, passages, use_few_shot, params.max_new_tokens)
        reply_start, params, model_reads = self._ground(
            question, history, rendered.passages if passages is not None else None, params, settings)
        messages, tokens = rendered.messages, rendered.tokens
        if model_reads is not None and model_reads is not rendered.passages:  # titles or evidence only
            cut = self.render(domain, question, history, model_reads, use_few_shot, params.max_new_tokens)
            messages, tokens = cut.messages, cut.tokens
        fixed = 1 + (2 * len(domain.few_shot) if use_few_shot else 0)  # the same for every question
        return ModelInput(messages, reply_start, params, fixed, rendered.passages, tokens)

    def reference_nll(self, domain_id: str, question: str, reference: str, use_adapter: bool) -> tuple[float, int]:
        """(summed NLL, tokens) of a reference answer given the prompt `answer` would send, retrieval on,
        with the domain's adapter or the base alone: what eval turns into perplexity. The reference
        is scored as a whole reply (it has no quoted opening before it)."""
        domain = self.registry.get(domain_id)
        adapter = self.adapter_for(domain)[0] if use_adapter else None
        passages = self.retrieve(domain, question) if self.knowledge is not None else None
        given = self.model_input(domain, question, (), passages, prompts.few_shot_for(with_adapter=adapter is not None),
                                 domain.generation, domain.grounding)
        return self.engine.answer_nll(given.messages, reference, adapter)

    def answer(
        self,
        domain_id: str,
        question: str,
        history: Sequence[tuple[str, str]] = (),
        *,
        use_retrieval: bool = True,
        use_adapter: bool = True,
        use_few_shot: bool | None = None,
        cancel: threading.Event | None = None,
        params: GenerationParams | None = None,
        grounding_settings: GroundingSettings | None = None,
    ) -> Iterator[Event]:
        """Answer `question` in `domain_id`, given earlier (user, assistant) turns, as a stream of events.

        `use_few_shot` None means as served: few-shot examples for the base model, none for an adapter
        (prompts.few_shot_for). `grounding_settings` None means the domain's own (the eval overrides
        them to measure each lever)."""
        started = time.perf_counter()
        domain = self.registry.get(domain_id)
        question = safety.clean_question(question)
        history = safety.clean_history(history)
        timing = {"retrieval_ms": 0.0, "ttft_ms": 0.0, "total_ms": 0.0, "tokens": 0, "tokens_per_s": 0.0}

        prompt_tokens = 0

        def finish(answer: str, adapter: str | None, abstained: bool) -> Done:
            timing["total_ms"] = round((time.perf_counter() - started) * 1000, 1)
            return Done(answer=answer, adapter=adapter, abstained=abstained, timing=timing, prompt_tokens=prompt_tokens)

        for rule in safety.triggered_rules(domain, question):
            if rule.action == "stop":
                yield Notice("risk", f"Safety rule '{rule.id}': this question gets a fixed response.")
                yield Token(rule.message)
                yield finish(rule.message, None, False)
                return
            yield Notice("risk", rule.message)

        passages: list[Passage] | None = None
        if use_retrieval and self.knowledge is not None:
            t0 = time.perf_counter()
            passages = self.retrieve(domain, question, history)
            timing["retrieval_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            if not passages:
                yield Notice("abstain", "Nothing in this domain's knowledge base matches the question.")
                yield Token(domain.abstain_message)
                yield finish(domain.abstain_message, None, True)
                return

        adapter, why_base = self.adapter_for(domain) if use_adapter else (None, "base only: adapter turned off")
        if why_base and domain.id in self.engine.adapters:
            yield Notice("adapter", why_base)
        params = params or domain.generation
        if use_few_shot is None:
            use_few_shot = prompts.few_shot_for(with_adapter=adapter is not None)
        grounding_settings = grounding_settings or domain.grounding
        given = self.model_input(domain, question, history, passages, use_few_shot, params, grounding_settings)
        prompt_tokens, reply_start, params = given.tokens, given.reply_start, given.params
        if given.passages:
            yield Sources(given.passages)
        # Without an opening the model writes the whole answer, as it always did.
        continuation = grounding_settings.continuation if reply_start else "free"

        pieces: list[str] = [reply_start] if reply_start else []
        written = ""  # what the model wrote after the opening, shown or not
        first_token_at = None
        withheld = False
        if reply_start:
            yield Token(reply_start)
        stream = iter(()) if continuation == "none" else self.engine.stream(
            given.messages, adapter, params, cancel, prefix_messages=given.prefix_messages, reply_start=reply_start)
        try:
            for piece in stream:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    timing["ttft_ms"] = round((first_token_at - started) * 1000, 1)
                written += piece
                if continuation == "sentence":
                    if grounding.first_sentence(written, final=False) is not None:
                        break  # one sentence is all that may be shown; stop generating
                    continue
                pieces.append(piece)
                if safety.repeats_system_prompt("".join(pieces), domain.system_prompt):
                    withheld = True
                    break
                yield Token(piece)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # closing the engine's stream stops its generation
        if continuation != "free":
            # Held back until whole, then shown only when worth showing (it adds to the opening, a
            # passage backs it, it is more than an offer of help): most of what the model adds after
            # the quoted evidence restates it or is backed by none (see GroundingSettings.continuation).
            sentence = grounding.first_sentence(written, final=True) if continuation == "sentence" else ""
            if safety.repeats_system_prompt(reply_start, domain.system_prompt):
                withheld = True
            # A sentence that repeats the instructions is left out like an unbacked one: the quoted
            # passages before it leak nothing, and the reader still gets them.
            elif (sentence and grounding.worth_showing(reply_start, sentence, given.passages)
                  and not safety.repeats_system_prompt(reply_start + sentence, domain.system_prompt)):
                pieces.append(sentence)
                yield Token(sentence)
        answer = "".join(pieces).strip()
        generated = written.strip()
        if withheld:
            yield Notice("risk", "The answer was stopped because it began repeating the assistant's instructions.")
            answer = WITHHELD_ANSWER
        tokens = self.engine.count_tokens(generated) if generated else 0
        timing["tokens"] = tokens
        if first_token_at is not None and tokens > 1:  # decode speed: tokens after the first one
            timing["tokens_per_s"] = round((tokens - 1) / max(time.perf_counter() - first_token_at, 1e-6), 2)
        if domain.disclaimer:
            yield Notice("disclaimer", domain.disclaimer)
        yield finish(answer, adapter, False)

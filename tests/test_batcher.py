"""Batcher: the scheduling of many requests on one thread, over a fake decoder whose next token is
always the last one plus one (the lean decoder's own exactness is test_decoder's job)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from domainchat.batcher import PREFILL_CHUNK, Batcher, PrefixCache, Request
from domainchat.decoder import PrefillPart
from domainchat.errors import ModelUnavailable
from domainchat.generation import GenerationParams
from domainchat.sampling import Sampler

VOCAB = 50
STOP = 49
GREEDY = GenerationParams(max_new_tokens=5, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)


@dataclass
class FakeCache:
    length: int = 0
    last: int = 0


class CountingDecoder:
    """Logits that make `last + 1` the greedy choice; records how many rows each step had."""

    def __init__(self, step_delay: threading.Event | None = None) -> None:
        self.rows_per_step: list[int] = []
        self.prefills: list[int] = []
        self.trace: list[tuple[str, int]] = []  # ("prefill", tokens) and ("step", rows), in order
        self.shared: list[list[int]] = []  # each prefill_many call's prompt lengths
        self.refuse: set[int] = set()  # token ids whose prefill fails
        self.gate = step_delay
        self.step_seconds = 0.0

    def new_cache(self, capacity: int, prefix: FakeCache | None = None) -> FakeCache:
        return FakeCache(prefix.length, prefix.last) if prefix else FakeCache()

    def _logits(self, last: int) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[(last + 1) % VOCAB] = 1.0
        return logits

    def prefill(self, ids: list[int], cache: FakeCache, adapter: str | None, pick=None,
                logits: bool = True) -> torch.Tensor | None:
        self.prefills.append(len(ids))
        self.trace.append(("prefill", len(ids)))
        cache.length += len(ids)
        cache.last = ids[-1]
        return self._logits(cache.last).unsqueeze(0) if logits else None

    def prefill_many(self, parts: list[PrefillPart]) -> list[torch.Tensor | None]:
        self.shared.append([len(part.ids) for part in parts])
        if any(bad in part.ids for part in parts for bad in self.refuse):
            raise IndexError("a token id the model does not have")
        return [self.prefill(part.ids, part.cache, part.adapter, part.pick, part.logits) for part in parts]

    def step(self, tokens: list[int], caches: list[FakeCache], adapters: list[str | None],
             pick=None) -> torch.Tensor:  # computes every logit, as a decoder without screening does
        if self.gate is not None:
            self.gate.wait(5)
        self.rows_per_step.append(len(tokens))
        self.trace.append(("step", len(tokens)))
        time.sleep(self.step_seconds)
        return torch.stack([self._logits(t) for t in tokens])

    def forget_batch(self) -> None:
        pass


class NoNumbers:
    """Stands in for NumberGuard; these tests set no allowed numbers, so it is never asked."""

    def banned(self, *args: object) -> None:
        raise AssertionError("the number guard is not used without allowed_numbers")


def request(prompt: list[int], params: GenerationParams = GREEDY, prefix: tuple[int, ...] = ()) -> Request:
    return Request(prompt, None, Sampler(params), None, prefix)


@pytest.fixture
def batcher():
    made = Batcher(CountingDecoder(), {STOP}, NoNumbers())  # type: ignore[arg-type]
    yield made
    made.close()


def test_tokens_stream_in_order_and_stop_at_max_new_tokens(batcher: Batcher) -> None:
    assert list(batcher.run(request([1, 2, 3]))) == [4, 5, 6, 7, 8]


def test_the_stop_token_ends_a_reply_and_is_not_yielded(batcher: Batcher) -> None:
    assert list(batcher.run(request([46]))) == [47, 48]


def test_concurrent_requests_share_decode_steps() -> None:
    gate = threading.Event()
    decoder = CountingDecoder(step_delay=gate)
    batcher = Batcher(decoder, {STOP}, NoNumbers())  # type: ignore[arg-type]
    results: dict[int, list[int]] = {}

    def consume(start: int) -> None:
        results[start] = list(batcher.run(request([start])))

    threads = [threading.Thread(target=consume, args=(start,)) for start in (0, 10, 20)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(10)
    batcher.close()
    assert results == {0: [1, 2, 3, 4, 5], 10: [11, 12, 13, 14, 15], 20: [21, 22, 23, 24, 25]}
    assert max(decoder.rows_per_step) > 1, "requests that overlap are decoded as rows of one step"


def test_a_fixed_prefix_is_prefilled_once(batcher: Batcher) -> None:
    decoder = batcher.decoder
    for _ in range(3):
        assert list(batcher.run(request([7, 8, 9, 1], prefix=(7, 8, 9)))) == [2, 3, 4, 5, 6]
    # the prefix once (3 tokens), then only what follows it, three times
    assert decoder.prefills == [3, 1, 1, 1]


def test_closing_the_consumer_cancels_the_request(batcher: Batcher) -> None:
    tokens = batcher.run(request([0], GenerationParams(max_new_tokens=40, temperature=0.0, no_repeat_ngram=0)))
    assert next(tokens) == 1
    tokens.close()  # the reader went away
    assert list(batcher.run(request([30]))) == [31, 32, 33, 34, 35], "the batcher serves the next request"


def test_close_joins_the_thread_and_refuses_new_work() -> None:
    batcher = Batcher(CountingDecoder(), {STOP}, NoNumbers())  # type: ignore[arg-type]
    assert list(batcher.run(request([1]))) == [2, 3, 4, 5, 6]
    batcher.close()
    batcher.close()  # idempotent
    assert not batcher._thread.is_alive()
    with pytest.raises(ModelUnavailable, match="shutting down"):
        list(batcher.run(request([1])))


def test_requests_in_flight_at_close_end_with_a_clear_error() -> None:
    gate = threading.Event()
    batcher = Batcher(CountingDecoder(step_delay=gate), {STOP}, NoNumbers())  # type: ignore[arg-type]
    tokens = batcher.run(request([0], GenerationParams(max_new_tokens=40, temperature=0.0, no_repeat_ngram=0)))
    assert next(tokens) == 1  # prefilled; the first decode step now waits on the gate
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.set()
    closer.join(10)
    with pytest.raises(ModelUnavailable, match="shut down"):
        list(tokens)


def test_prefix_cache_keeps_the_most_recently_used() -> None:
    cache = PrefixCache(entries=2)
    cache.get_or_build(("a",), lambda: 1)
    cache.get_or_build(("b",), lambda: 2)
    assert cache.get_or_build(("a",), lambda: 99) == 1  # a hit, and now the most recent
    cache.get_or_build(("c",), lambda: 3)
    assert cache.keys() == [("a",), ("c",)]


def test_a_lone_prompt_is_prefilled_whole() -> None:
    decoder = CountingDecoder()
    batcher = Batcher(decoder, {STOP}, NoNumbers())  # type: ignore[arg-type]
    try:
        assert list(batcher.run(request([7] * (5 * PREFILL_CHUNK) + [20]))) == [21, 22, 23, 24, 25]
    finally:
        batcher.close()
    assert decoder.prefills == [5 * PREFILL_CHUNK + 1]


def test_a_prompt_arriving_while_others_answer_is_prefilled_in_chunks_between_their_steps() -> None:
    """A running answer waits for one chunk of a newcomer's prompt at a time, not for all of it; the
    newcomer's answer is what it would be with a whole prefill."""
    decoder = CountingDecoder()
    decoder.step_seconds = 0.01
    batcher = Batcher(decoder, {STOP}, NoNumbers())  # type: ignore[arg-type]
    long_prompt = [7] * (3 * PREFILL_CHUNK + 10) + [20]
    try:
        running = batcher.run(request([1], GenerationParams(max_new_tokens=40, temperature=0.0,
                                                             repetition_penalty=1.0, no_repeat_ngram=0)))
        assert next(running) == 2  # the first answer is decoding
        assert list(batcher.run(request(long_prompt))) == [21, 22, 23, 24, 25]
        running.close()
    finally:
        batcher.close()
    chunks = [n for kind, n in decoder.trace[1:] if kind == "prefill"]
    assert chunks == [PREFILL_CHUNK] * 3 + [11]
    first_chunk = decoder.trace.index(("prefill", PREFILL_CHUNK))
    between = decoder.trace[first_chunk:first_chunk + 8]
    # a decode step of the running answer after every chunk; after the last, the newcomer has a row too
    assert between[1::2] == [("step", 1)] * 3 + [("step", 2)]


def arrive_during_a_step(decoder: CountingDecoder, prompts: list[list[int]]) -> dict[int, object]:
    """Each prompt's answer (or the exception it raised) when all arrive while another answer's
    decode step is running: they wait together for the next round."""
    gate = threading.Event()
    decoder.gate = gate
    batcher = Batcher(decoder, {STOP}, NoNumbers())  # type: ignore[arg-type]
    results: dict[int, object] = {}

    def consume(index: int) -> None:
        try:
            results[index] = list(batcher.run(request(prompts[index])))
        except Exception as exc:
            results[index] = exc

    try:
        running = batcher.run(request([1], GenerationParams(max_new_tokens=40, temperature=0.0,
                                                             repetition_penalty=1.0, no_repeat_ngram=0)))
        assert next(running) == 2  # prefilled; its first decode step waits on the gate
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(batcher._pending) < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for thread in threads:
            thread.join(10)
        running.close()
    finally:
        batcher.close()
    return results


def test_prompts_waiting_together_are_prefilled_in_one_call() -> None:
    decoder = CountingDecoder()
    results = arrive_during_a_step(decoder, [[10, 11, 12], [20, 21], [30]])
    assert results == {0: [13, 14, 15, 16, 17], 1: [22, 23, 24, 25, 26], 2: [31, 32, 33, 34, 35]}
    assert decoder.shared[1] == [3, 2, 1], "the three prompts share one prefill"
    assert max(decoder.rows_per_step) == 4


def test_a_round_prefills_at_most_a_chunk_and_cuts_no_short_prompt() -> None:
    """Prompts join a round whole while the round stays within PREFILL_CHUNK tokens; one that does
    not fit waits for the next round rather than being cut (only a prompt longer than a chunk is)."""
    decoder = CountingDecoder()
    prompts = [[10, 11, 12], [7] * (PREFILL_CHUNK - 3) + [20], [30, 31, 32, 33], [40]]
    results = arrive_during_a_step(decoder, prompts)
    assert all(isinstance(results[i], list) and len(results[i]) == 5 for i in range(4))  # type: ignore[arg-type]
    assert decoder.shared[1:] == [[3], [PREFILL_CHUNK - 2], [4, 1]]


def test_a_request_that_fails_in_a_shared_prefill_fails_alone() -> None:
    decoder = CountingDecoder()
    decoder.refuse = {45}
    results = arrive_during_a_step(decoder, [[10, 11], [45], [30]])
    assert results[0] == [12, 13, 14, 15, 16] and results[2] == [31, 32, 33, 34, 35]
    assert isinstance(results[1], IndexError)


def test_a_round_plan_takes_whole_prompts_behind_the_first_while_they_fit() -> None:
    def waiting(length: int, done: int = 0) -> Request:
        made = request([5] * length)
        made.cache = FakeCache(length=done)
        return made

    short, other, long = waiting(39), waiting(39), waiting(3 * PREFILL_CHUNK)
    plan = Batcher._prefill_plan
    # nobody answering: the first prompt whole, then whole prompts behind it within a chunk's tokens
    assert plan([short, other, long], whole=True) == [(short, 39), (other, 39)]
    assert plan([long, short], whole=True) == [(long, 3 * PREFILL_CHUNK)]
    # others answering: a long prompt's next chunk alone; its last chunk with what fits after it
    assert plan([long, short], whole=False) == [(long, PREFILL_CHUNK)]
    near_end = waiting(3 * PREFILL_CHUNK, done=3 * PREFILL_CHUNK - 60)
    assert plan([near_end, short, other], whole=False) == [(near_end, 3 * PREFILL_CHUNK), (short, 39)]

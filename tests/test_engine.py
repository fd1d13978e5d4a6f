"""Engine tests on the real bundled model (nf4 on CPU) with adapters made by peft (slow: their fixtures
load it), and on tiny random models with other families' chat templates (quick)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEMPLATES, tiny_chat_model

from domainchat.engine import Engine
from domainchat.errors import BadInput, ModelUnavailable
from domainchat.generation import GenerationParams
from domainchat.settings import Settings, load_settings

QUESTION = [{"role": "user", "content": "What is a Roth IRA?"}]


@pytest.fixture(scope="module")
def engine(settings: Settings, test_adapters: dict[str, Path]):
    """A fresh engine for this module instead of the session's: one full run saw 'alpha' answer
    exactly like the base on the shared engine after the other modules had used it (it passed in
    isolation and in the previous full run); until that is understood, these checks of routing
    start from a known state."""
    made = Engine.start(settings, test_adapters)
    yield made
    made.close()
GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)


def test_adapter_statuses(engine: Engine) -> None:
    status = engine.adapters
    assert status["alpha"].loaded and status["beta"].loaded
    assert not status["noop"].loaded and "changes nothing" in status["noop"].reason
    assert not status["corrupt"].loaded and "cannot be read" in status["corrupt"].reason
    assert not status["otherbase"].loaded and "another base" in status["otherbase"].reason


def test_broken_adapters_do_not_stop_the_others(engine: Engine) -> None:
    base = engine.complete(QUESTION, None, GREEDY)
    alpha = engine.complete(QUESTION, "alpha", GREEDY)
    assert engine.count_tokens(base) >= GREEDY.max_new_tokens // 2, "a reply, not an early stop"
    assert engine.complete(QUESTION, "alpha", GREEDY) == alpha, "greedy is deterministic"
    assert alpha != base, "a working adapter changes the greedy answer"
    with pytest.raises(BadInput, match="changes nothing"):
        engine.complete(QUESTION, "noop", GREEDY)


def test_greedy_matches_transformers_generate(engine: Engine) -> None:
    """Our loop against `generate` itself (the lean decoder prefilling with transformers' kernel)."""
    ids = engine.encode(QUESTION)
    if engine._decoder is not None:
        engine._decoder.prefill_kernel = "gemv"
    try:
        ours = {adapter: engine.complete(QUESTION, adapter, GREEDY) for adapter in (None, "alpha")}
    finally:
        if engine._decoder is not None:
            engine._decoder.prefill_kernel = "dense"
    for adapter in (None, "alpha"):
        with engine._lock, torch.no_grad():
            engine._route(adapter)
            reference = engine.model.generate(input_ids=ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
        expected = engine.tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
        assert ours[adapter] == expected.strip() or ours[adapter] == expected


def test_answer_nll_scores_the_reply_the_model_would_give(engine: Engine) -> None:
    greedy = engine.complete(QUESTION, "alpha", GREEDY)
    nll, tokens = engine.answer_nll(QUESTION, greedy, "alpha")
    assert tokens == engine.count_tokens(greedy) + 1  # the reply plus its end-of-turn token
    scrambled = " ".join(reversed(greedy.split()))
    other_nll, other_tokens = engine.answer_nll(QUESTION, scrambled, "alpha")
    assert nll / tokens < other_nll / other_tokens
    assert engine.answer_nll(QUESTION, greedy, None)[0] != pytest.approx(nll, rel=1e-6)  # routed per adapter


def test_prefix_cache_matches_the_uncached_path(engine: Engine) -> None:
    """transformers' path. Base model: the same greedy tokens. With an adapter, the next-token logits agree to within a
    few percent and pick the same token, but not exactly: the 4-bit CPU kernels and the fp32 LoRA
    matmuls round differently for a 60-token and a 10-token chunk (measured up to 1.3 % of the
    largest logit), and this random test adapter is strong enough that a later near-tie can flip."""
    fixed = [{"role": "system", "content": "You are a careful assistant. Answer in one sentence."},
             {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 is 4."}]
    def reply(messages, prefix_messages: int = 0) -> str:
        tokens = engine._tokens_transformers(messages, engine.encode(messages), None, GREEDY, None, prefix_messages)
        return "".join(engine._texts(tokens))

    for question in ("What is a budget?", "Name a primary colour."):
        messages = fixed + [{"role": "user", "content": question}]
        plain = reply(messages)
        assert reply(messages, prefix_messages=3) == plain  # computes the prefix
        assert reply(messages, prefix_messages=3) == plain  # reuses it

        ids = engine.encode(messages)
        with torch.no_grad():
            whole = engine._forward(ids, "alpha", None).logits[0, -1]
            cache, cached = engine._cached_prefix(fixed, ids, "alpha")
            assert cached > 10
            split = engine._forward(ids[:, cached:], "alpha", cache).logits[0, -1]
        assert torch.argmax(whole) == torch.argmax(split)
        assert float((whole - split).abs().max()) < 3e-2 * float(whole.abs().max())
    assert {key[1] for key in engine._prefixes.keys()} == {None, "alpha"}


def test_concurrent_requests_each_get_their_own_adapter(engine: Engine) -> None:
    adapters = [None, "alpha", "beta"]
    reference = {a: engine.complete(QUESTION, a, GREEDY) for a in adapters}
    assert len(set(reference.values())) == 3, "the three routes must be distinguishable"
    results: dict[int, str] = {}

    def worker(index: int) -> None:
        results[index] = engine.complete(QUESTION, adapters[index % 3], GREEDY)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {i: results.get(i) for i in range(6)} == {i: reference[adapters[i % 3]] for i in range(6)}


def test_sampling_is_reproducible_with_a_seed(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert engine.complete(QUESTION, "alpha", params) == engine.complete(QUESTION, "alpha", params)


def test_cancel_stops_generation_mid_stream(engine: Engine) -> None:
    cancel = threading.Event()
    pieces = []
    for piece in engine.stream(QUESTION, "alpha", GenerationParams(max_new_tokens=200, temperature=0.0), cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert len(pieces) == 3


def test_prompt_longer_than_the_context_is_refused(engine: Engine) -> None:
    too_long = [{"role": "user", "content": "word " * (engine.context_window + 10)}]
    with pytest.raises(BadInput, match="too long"):
        engine.complete(too_long, None, GREEDY)


def test_adapters_cannot_be_added_after_serving(engine: Engine, test_adapters: dict[str, Path]) -> None:
    engine.complete(QUESTION, None, GenerationParams(max_new_tokens=1, temperature=0.0))
    with pytest.raises(RuntimeError, match="before the first generation"):
        engine._load_adapters({"late": test_adapters["alpha"]})


def test_decoder_setting_chooses_the_generation_path(settings: Settings, base_checkpoint: Path) -> None:
    plain = load_settings({"DOMAINCHAT_HOME": str(settings.home), "DOMAINCHAT_DECODER": "transformers"})
    engine = Engine.start(plain, {})
    assert engine.decoder_name == "transformers"
    ids = engine.encode(QUESTION)
    with torch.no_grad():
        reference = engine.model.generate(input_ids=ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
    expected = engine.tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    assert engine.complete(QUESTION, None, GREEDY) in (expected, expected.strip()), "the fallback path is exact"
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(ModelUnavailable, match="shut down"):
        engine.complete(QUESTION, None, GREEDY)


@pytest.mark.parametrize("family", sorted(TINY_TEMPLATES))
def test_a_model_with_another_chat_template_is_rendered_and_stopped_by_it(family: str, tmp_path: Path) -> None:
    """Zephyr ends a turn with its eos `</s>`; Llama 3 with `<|eot_id|>`, which is not its eos token."""
    folder = tiny_chat_model(family, tmp_path / family, first="Z")
    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path / "home"), "DOMAINCHAT_BASE_MODEL": str(folder),
                              "DOMAINCHAT_QUANT": "none", "DOMAINCHAT_DECODER": "transformers"})
    engine = Engine.start(settings, {})
    try:
        tokenizer = engine.tokenizer
        messages = [{"role": "system", "content": "Answer from the passages."}, QUESTION[0]]
        ids = engine.encode(messages)
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(ids[0]) == expected and "<|im_start|>" not in expected
        end_of_turn = tokenizer.convert_tokens_to_ids(TINY_TEMPLATES[family][2])
        first = tokenizer.convert_tokens_to_ids("Z")
        assert end_of_turn in ids[0].tolist() and first not in ids[0].tolist()  # see tiny_chat_model

        params = GenerationParams(max_new_tokens=8, temperature=0.0, repetition_penalty=2.0, no_repeat_ngram=0)
        assert list(engine._tokens_transformers(messages, ids, None, params, None, 0)) == [first], \
            "the end-of-turn token ends the reply"
        assert engine.complete(messages, None, params) == "Z"
        nll, tokens = engine.answer_nll(messages, "Z")
        assert tokens == 2, "the reply and the template's end-of-turn token"
    finally:
        engine.close()

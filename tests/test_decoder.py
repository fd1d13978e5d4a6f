"""Lean decoder tests on the real bundled model (nf4 on CPU) with the peft test adapters: its
outputs against transformers + peft, batching, prefixes, and the models it declines."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterator

import pytest
import torch

from domainchat.batcher import Request
from domainchat.decoder import LeanDecoder, PrefillPart
from domainchat.engine import Engine
from domainchat.generation import GenerationParams
from domainchat.nf4_weights import DequantizedLinear, FusedLinear
from domainchat.sampling import Sampler

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
    [{"role": "system", "content": "You are a careful assistant for personal finance questions."},
     {"role": "user", "content": "What is an index fund and why do people buy one?"}],
]
GREEDY = GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)


@pytest.fixture
def lean(engine: Engine) -> LeanDecoder:
    if engine.device.type != "cpu":
        pytest.skip(f"the lean decoder serves CPUs; on {engine.device.type} the transformers path serves")
    assert engine._decoder is not None, "the lean decoder should serve the bundled nf4 model on any CPU"
    return engine._decoder


@pytest.fixture
def exact_prefill(lean: LeanDecoder) -> Iterator[LeanDecoder]:
    """Prefill through the kernel transformers uses, so whole answers can be compared token for token."""
    lean.prefill_kernel = "gemv"
    yield lean
    lean.prefill_kernel = "dense"


def transformers_reply(engine: Engine, messages, adapter: str | None, params: GenerationParams) -> str:
    ids = engine.encode(messages)
    return "".join(engine._texts(engine._tokens_transformers(messages, ids, adapter, params, None, 0)))


def test_greedy_matches_transformers_token_for_token(engine: Engine, exact_prefill: LeanDecoder) -> None:
    # On the 4-bit kernel path decode steps compute only the logits the sampler may pick from.
    assert exact_prefill.output.screen_weight is not None or not isinstance(exact_prefill.layers[0].qkv, FusedLinear)
    for adapter in (None, "alpha", "beta"):
        for messages in PROMPTS:
            assert engine.complete(messages, adapter, GREEDY) == transformers_reply(engine, messages, adapter, GREEDY)


def test_sampling_matches_transformers_with_the_same_seed(engine: Engine, exact_prefill: LeanDecoder) -> None:
    params = GenerationParams(max_new_tokens=30, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=11)
    assert engine.complete(PROMPTS[0], "alpha", params) == transformers_reply(engine, PROMPTS[0], "alpha", params)


def test_a_batch_row_gets_exactly_what_it_would_get_alone(engine: Engine, lean: LeanDecoder) -> None:
    """Rows with different adapters (and one without) in one step: with bitsandbytes' AVX512-BF16
    kernel each row's hidden state is bit-equal to the same sequence decoded alone. The float32
    copies used on other CPUs go through a matrix multiply whose several-row and one-row kernels
    sum in different orders (~1e-6 relative), as does the output layer on every CPU: there the
    rows agree to that precision and pick the same next token (a different token needs two logits
    tied to ~1e-5)."""
    bit_equal = isinstance(lean.layers[0].qkv, FusedLinear)
    adapters = ["alpha", None, "beta", "alpha"]
    ids = engine.encode(PROMPTS[0])[0].tolist()
    with torch.no_grad():
        alone = []
        for adapter in adapters:
            cache = lean.new_cache(len(ids) + 4)
            token = int(lean.prefill(ids, cache, adapter)[0].argmax())
            alone.append((token, lean._step_layers([token], [cache], [adapter])[0]))
        caches = [lean.new_cache(len(ids) + 4) for _ in adapters]
        for cache, adapter in zip(caches, adapters, strict=True):
            lean.prefill(ids, cache, adapter)
        tokens = [token for token, _ in alone]
        batched = lean._step_layers(tokens, caches, adapters)
        for cache in caches:
            cache.length -= 1  # the same step again, through the public call that adds the output layer
        logits = lean.step(tokens, caches, adapters)
    for row, (_, hidden) in enumerate(alone):
        if bit_equal:
            assert torch.equal(batched[row], hidden), f"row {row} ({adapters[row]}) differs from its solo run"
        else:
            assert torch.allclose(batched[row], hidden, rtol=1e-5, atol=1e-4), f"row {row} ({adapters[row]})"
        solo = hidden.unsqueeze(0) @ lean.lm_head.t()
        assert torch.allclose(logits[row], solo[0], atol=1e-4) and int(logits[row].argmax()) == int(solo.argmax())
    assert not torch.equal(batched[0], batched[1]), "the adapter changes the row"


def answer_together(engine: Engine, lean: LeanDecoder, adapters: list[str | None]) -> tuple[dict[int, str], int]:
    """(each request's greedy answer to PROMPTS[1], the most rows a decode step had) for requests
    with `adapters` sent at once from threads."""
    results: dict[int, str] = {}
    widest = []
    original_step = lean.step

    def recording_step(tokens, caches, names, pick=None):
        widest.append(len(tokens))
        return original_step(tokens, caches, names, pick)

    def answer(i: int) -> None:
        results[i] = engine.complete(PROMPTS[1], adapters[i], GREEDY)

    lean.step = recording_step
    try:
        threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(adapters))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        del lean.step
    return results, max(widest, default=0)


def test_concurrent_streams_are_batched_and_each_matches_its_solo_answer(engine: Engine, lean: LeanDecoder) -> None:
    adapters = [None, "alpha", "beta", "alpha"]
    solo = {adapter: engine.complete(PROMPTS[1], adapter, GREEDY) for adapter in set(adapters)}
    results, widest = answer_together(engine, lean, adapters)
    assert results == {i: solo[adapters[i]] for i in range(len(adapters))}
    assert widest >= 2, "concurrent requests should share decode steps"


def test_dense_prefill_is_as_accurate_as_transformers_kernel(engine: Engine, lean: LeanDecoder) -> None:
    """The fast prefill (bfloat16 matmuls) is not bit-equal to bitsandbytes' kernel, so it is held to
    accuracy instead: against the same 4-bit weights multiplied in float32, its next-token
    distribution is about as close as the kernel transformers uses (KL divergence, median over
    prompts: 2-6e-4 nats for both, measured; which one is closer moves with the rounding of the
    run, so the bound is loose), and it picks the float32 token or one within 0.25 of it. Its logits
    among float32's top 20 differ from float32 by up to 0.13 (the kernel's by up to 0.30), so a
    near-tie may resolve either way; a CI run saw one 0.068 apart. A wrong dequantization or layout
    gives a KL of several nats and a token many logits below the best."""
    if not isinstance(lean.layers[0].qkv, FusedLinear):
        pytest.skip("this CPU keeps float32 copies of the weights: prefill does the transformers path's float32 "
                    "arithmetic, checked token for token by test_greedy_matches_transformers_token_for_token")
    questions = ["What is a Roth IRA?", "When should I see a doctor about a headache?",
                 "What does a tenant's security deposit cover?", "How do I reset my password?",
                 "What is compound interest?", "Can my landlord keep my deposit?",
                 "How much water should I drink a day?", "Where is my order?"]
    divergence: dict[str, list[float]] = {"dense": [], "gemv": []}

    def float32_dense(self, x):
        weight = torch.ops.bitsandbytes.dequantize_4bit(self.plain, self.plain_absmax, self.blocksize, "nf4",
                                                        list(self.shape), torch.float32)
        return x @ weight.t()

    for question in questions:
        ids = engine.encode([{"role": "user", "content": question}])[0].tolist()
        logits = {}
        with torch.no_grad():
            for kernel in ("dense", "gemv"):
                lean.prefill_kernel = kernel
                logits[kernel] = lean.prefill(ids, lean.new_cache(len(ids)), "alpha")[0]
            lean.prefill_kernel = "dense"
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(type(lean.layers[0].qkv), "dense", float32_dense)
                reference = lean.prefill(ids, lean.new_cache(len(ids)), "alpha")[0]
        for kernel in divergence:
            divergence[kernel].append(float(torch.nn.functional.kl_div(
                logits[kernel].log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="sum")))
        picked = int(logits["dense"].argmax())
        assert float(reference.max() - reference[picked]) < 0.25, question
    assert statistics.median(divergence["dense"]) <= 4 * statistics.median(divergence["gemv"])
    assert statistics.median(divergence["dense"]) < 2e-3


def test_shared_prefix_is_computed_once_and_agrees_with_the_whole_prompt(engine: Engine, lean: LeanDecoder) -> None:
    """A reused prefix gives exactly the answer its first use gave. Against prefilling the whole
    prompt at once the next-token logits agree closely and pick the same token, but are not bit-equal:
    attention over a cached prefix takes a masked kernel, the whole prompt a causal one."""
    fixed = [{"role": "system", "content": "You are a careful assistant. Answer in one sentence."},
             {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 is 4."}]
    for adapter in (None, "alpha"):
        messages = fixed + [{"role": "user", "content": "What is a budget?"}]
        first = engine.complete(messages, adapter, GREEDY, prefix_messages=3)  # computes the prefix
        assert engine.complete(messages, adapter, GREEDY, prefix_messages=3) == first  # reuses it
        assert any(key[0] == adapter for key in engine._batcher.prefixes.keys())

        ids = engine.encode(messages)
        prefix = engine._prefix_ids(fixed, ids)
        assert 10 < len(prefix) < ids.shape[1]
        with torch.no_grad():
            whole = lean.prefill(ids[0].tolist(), lean.new_cache(ids.shape[1]), adapter)[0]
            cache = lean.new_cache(ids.shape[1])
            lean.prefill(list(prefix), cache, adapter)
            split = lean.prefill(ids[0, len(prefix):].tolist(), cache, adapter)[0]
        assert int(whole.argmax()) == int(split.argmax())
        assert float((whole - split).abs().max()) < 3e-2 * float(whole.abs().max())  # as transformers: ~1 %


def test_prefill_computes_only_the_logits_asked_for(engine: Engine, lean: LeanDecoder) -> None:
    """With a pick, a prompt's last logits are the whole product's for the tokens it names and -inf
    elsewhere (as in a decode step); without logits (a chunk before the last, a cached prefix) the
    cache is filled all the same and nothing is returned."""
    ids = engine.encode([{"role": "user", "content": "What is a budget?"}])[0].tolist()
    picked = torch.tensor([5, 17, 300])
    with torch.no_grad():
        whole = lean.prefill(ids, lean.new_cache(len(ids)), "alpha")[0]
        some = lean.prefill(ids, lean.new_cache(len(ids)), "alpha", pick=lambda estimate, radius: picked)[0]
        cache = lean.new_cache(len(ids))
        assert lean.prefill(ids, cache, "alpha", logits=False) is None
    assert cache.length == len(ids)
    assert torch.equal(torch.isfinite(some).nonzero()[:, 0], picked)
    assert torch.equal(some[picked], whole[picked])


def prefilled_together_and_alone(engine: Engine, lean: LeanDecoder) -> tuple[list, list]:
    """(logits, caches) of three sequences prefilled in one call and each alone: one after a cached
    prefix (padded causal attention), one fresh, one a chunk after a longer start (masked); three
    adapters."""
    first, second = (engine.encode(messages)[0].tolist() for messages in PROMPTS)
    plans = [(first[:9], first[9:], "alpha"), ([], second, None), (second[:30], second[30:36], "beta")]
    results = []
    with torch.no_grad():
        for together in (True, False):
            caches = []
            for before, ids, adapter in plans:
                cache = lean.new_cache(len(before) + len(ids))
                if before:
                    lean.prefill(before, cache, adapter, logits=False)
                caches.append(cache)
            parts = [PrefillPart(ids, cache, adapter) for (_, ids, adapter), cache in zip(plans, caches, strict=True)]
            logits = lean.prefill_many(parts) if together else [lean.prefill_many([part])[0] for part in parts]
            results.append((logits, caches))
    return results[0], results[1]


@pytest.mark.parametrize("kernel", ["dense", "gemv"])
def test_sequences_prefilled_together_get_what_each_gets_alone(engine: Engine, lean: LeanDecoder,
                                                                kernel: str) -> None:
    """Prompts prefilled in one call share each matrix's product but get, bit for bit, the logits
    and key/values each gets alone: a product's row depends only on its input row."""
    lean.prefill_kernel = kernel
    try:
        (together, caches), (alone, alone_caches) = prefilled_together_and_alone(engine, lean)
    finally:
        lean.prefill_kernel = "dense"
    for row in range(3):
        assert torch.equal(together[row], alone[row]), f"sequence {row}'s logits differ"
        assert caches[row].length == alone_caches[row].length
        assert torch.equal(caches[row].keys[:, :, :caches[row].length],
                           alone_caches[row].keys[:, :, :caches[row].length])
    assert not torch.equal(together[0], together[1])


def test_sequences_prefilled_together_on_the_standard_layout(standard_layout_engine: Engine) -> None:
    """The float32 product of the standard layout may sum a row differently beside other rows (MKL
    does on this CPU); the decoder then prefills the sequences one by one, each with its own bits."""
    (together, _), (alone, _) = prefilled_together_and_alone(standard_layout_engine, standard_layout_engine._decoder)
    for row in range(3):
        assert torch.equal(together[row], alone[row]), f"sequence {row}'s logits differ"


def test_a_failing_request_does_not_stop_the_others(engine: Engine, lean: LeanDecoder) -> None:
    short = GenerationParams(max_new_tokens=4, temperature=0.0, no_repeat_ngram=0)
    before = engine.complete(PROMPTS[0], "alpha", short)
    broken = Request([10**9], None, Sampler(GREEDY), None, ())  # a token id the model does not have
    with pytest.raises(IndexError):
        list(engine._batcher.run(broken))
    assert engine.complete(PROMPTS[0], "alpha", short) == before and engine.count_tokens(before) == 4


def test_the_standard_layout_path_matches_transformers_and_batches(standard_layout_engine: Engine) -> None:
    engine = standard_layout_engine
    lean = engine._decoder
    assert lean is not None and isinstance(lean.layers[0].qkv, DequantizedLinear), (
        "without the tile layout the lean decoder should dequantize the standard layout")
    for adapter in (None, "alpha"):
        for messages in PROMPTS:
            assert engine.complete(messages, adapter, GREEDY) == transformers_reply(engine, messages, adapter, GREEDY)
    adapters = [None, "alpha", "beta"]
    solo = {adapter: engine.complete(PROMPTS[1], adapter, GREEDY) for adapter in adapters}
    results, widest = answer_together(engine, lean, adapters)
    assert results == {i: solo[adapters[i]] for i in range(len(adapters))}, "a batch row answers as it would alone"
    assert widest >= 2, "concurrent requests should share decode steps"


def test_declines_a_model_it_does_not_understand() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    assert LeanDecoder._unsupported(plain) == "q_proj is not a bitsandbytes nf4 layer"
    assert LeanDecoder.build(plain) is None


def test_declines_standard_layout_layers_that_are_not_whole_nf4_blocks(tmp_path) -> None:
    """Fused matrices join the layers' bytes and block scales end to end, so on the standard layout
    a layer whose weights end inside a quantization block is declined (transformers serves it)."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from domainchat.engine import standard_nf4_layout

    # 36 x 36 weights: 1,296 values, 20.25 blocks of 64.
    LlamaForCausalLM(LlamaConfig(hidden_size=36, intermediate_size=72, num_hidden_layers=1, num_attention_heads=6,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path)
    with standard_nf4_layout():
        model = LlamaForCausalLM.from_pretrained(
            tmp_path, dtype=torch.float32, device_map="cpu",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert LeanDecoder._unsupported(model) == "q_proj is not a whole number of nf4 blocks of 64"
    assert LeanDecoder.build(model) is None


def _cpp_loop_matches_python(engine: Engine, lean: LeanDecoder, cases: list[tuple[list, int]]) -> None:
    """The C++ loop's hidden states and key/value caches are bit-equal to the Python loop's, across
    three steps, for each (adapters of the rows, threads) case."""
    import shutil
    import sysconfig
    from pathlib import Path

    from domainchat.output_layer import intra_op_threads

    if lean.native is None:
        compiler = shutil.which("c++") or shutil.which("g++")
        if compiler is None or not Path(sysconfig.get_paths()["include"], "Python.h").exists():
            pytest.skip("no C++ compiler or no Python headers here: the layers run in Python")
        pytest.fail(f"a C++ compiler ({compiler}) and Python's headers are here, but the layer loop was not built "
                    "(the log says why)")
    ids = engine.encode(PROMPTS[1])[0].tolist()
    native = lean.native
    threads = lean.threads
    for adapters, split in cases:
        runs = []
        for loop in (native, None):
            lean.native, lean.threads = loop, split
            caches = [lean.new_cache(len(ids) + 4) for _ in adapters]
            with torch.inference_mode():
                for cache, adapter in zip(caches, adapters, strict=True):
                    lean.prefill(ids, cache, adapter)
                with intra_op_threads(1):
                    hidden = [lean._step_layers([token] * len(adapters), caches, adapters) for token in (42, 7, 1000)]
            runs.append((hidden, [cache.keys[:, :, :cache.length] for cache in caches],
                         [cache.values[:, :, :cache.length] for cache in caches]))
        lean.native, lean.threads = native, threads
        for ours, theirs in zip(runs[0], runs[1], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), f"{adapters}"


def test_the_cpp_layer_loop_gives_the_python_loops_bits(engine: Engine, lean: LeanDecoder) -> None:
    """csrc/lean_step.cpp makes the same ATen calls as the Python loop: bit-equal, one row or several
    with different adapters (and none), with a batch's rows split over two threads (odd counts too)
    or not."""
    if not isinstance(lean.layers[0].qkv, FusedLinear):
        pytest.skip("this engine has no 4-bit kernel path (the standard layout test covers the float32 one)")
    _cpp_loop_matches_python(engine, lean, [(["alpha"], 2), (["alpha", None, "beta", "alpha"], 2),
                                            (["beta", None, "alpha"], 2), (["alpha", "beta"], 1)])


def test_the_cpp_layer_loop_gives_the_python_loops_bits_on_the_standard_layout(standard_layout_engine: Engine) -> None:
    """Without AVX512-BF16 the C++ loop dequantizes each matrix and multiplies it, with two threads
    (threads=2) in two halves of the matrix's rows (not of the batch's rows: several rows' float32
    products depend on the rows in the call), with one in a piece."""
    lean = standard_layout_engine._decoder
    assert lean is not None and isinstance(lean.layers[0].qkv, DequantizedLinear)
    if lean.native is not None:  # with two threads every product here is split in two halves
        assert all(lean.native.halves()), lean.native.halves()
    _cpp_loop_matches_python(standard_layout_engine, lean, [(["alpha"], 2), (["alpha", None, "beta", "alpha"], 2),
                                                           (["beta", None], 1)])


def test_a_cpp_build_that_fails_leaves_the_python_loop(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """No compiler, no ninja, no headers: the build's error is logged and the decoder steps in Python."""
    import logging

    import torch.utils.cpp_extension

    from domainchat.decoder import _native_step_module

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.INFO, logger="domainchat.decoder"):
        assert _native_step_module() is None
    assert "Ninja is required" in caplog.text and "run in Python" in caplog.text


def test_the_cpp_build_finds_pips_ninja_when_it_is_not_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch runs `ninja` from PATH; where pip's is not on it (a virtual environment not activated),
    the build gets its folder first on PATH, and PATH is as it was afterwards."""
    import os

    import ninja
    import torch.utils.cpp_extension

    from domainchat import decoder

    seen: list[str] = []

    def load(*args, **kwargs):
        seen.append(os.environ["PATH"])
        return "built"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(decoder.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    assert decoder._native_step_module() == "built"
    assert seen == [os.pathsep.join([ninja.BIN_DIR, "/nowhere"])] and os.environ["PATH"] == "/nowhere"

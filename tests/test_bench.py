"""Bench measurements: what they compute, over fake engines whose timing is known, and the engine
figures and the client-side ones once each over the real model."""

from __future__ import annotations

import threading
import time

import pytest

from domainchat.bench import BenchPrompt, _stall_while_others_arrive
from domainchat.generation import GenerationParams


class TurnTakingEngine:
    """Emits a token every 5 ms under one lock; an arriving prompt holds the lock for `prefill_s`
    before its first token, as a whole-prompt prefill holds a single generation thread."""

    def __init__(self, prefill_s: float) -> None:
        self.prefill_s = prefill_s
        self.lock = threading.Lock()

    def stream(self, messages, adapter, params, cancel=None, prefix_messages: int = 0, reply_start: str = ""):
        if messages[0]["content"] == "arrival":
            with self.lock:
                time.sleep(self.prefill_s)
        for _ in range(params.max_new_tokens):
            if cancel is not None and cancel.is_set():
                return
            with self.lock:
                time.sleep(0.005)
            yield "x"

    def count_tokens(self, text: str) -> int:
        return len(text)


def test_stall_is_the_longest_pause_of_the_running_answer_and_ttft_the_last_arrivals() -> None:
    arrivals = [BenchPrompt([{"role": "user", "content": "arrival"}], "")] * 3
    running = [{"role": "user", "content": "story"}]
    params = GenerationParams(temperature=0.0)
    stall, last = _stall_while_others_arrive(TurnTakingEngine(0.15), running, None, arrivals, 0, params)
    assert 0.15 <= stall < 1.0  # at least one whole prefill between two of its tokens
    assert last >= 0.45 - 0.05  # the third arrival waited for all three prefills
    stall, last = _stall_while_others_arrive(TurnTakingEngine(0.0), running, None, arrivals, 0, params)
    assert stall < 0.15 and last < 0.15


def test_prompts_that_are_not_the_benchs_say_how_to_make_them() -> None:
    from domainchat.bench import BenchPrompts
    from domainchat.errors import BadInput

    for bad in ([], {"short": []}, {"short": [], "rag": {"text": "x"}, "arrivals": [], "fixed": 1, "adapter": None}):
        with pytest.raises(BadInput, match=r"scripts/bench_engine.py --render FILE"):
            BenchPrompts.from_json(bad)


@pytest.mark.slow
def test_http_bench_measures_a_live_server_with_the_openai_client(api_url: str) -> None:
    """One run of every client-side figure against a real server (real model, test adapters)."""
    from domainchat.bench_http import measure

    report = measure(api_url, ["finance", "legal"], ["What is APR?", "What is a Roth IRA?", "What is a budget?"],
                     runs=1)
    assert set(report) == {"http_ttft_rag_s", "http_decode_tokens_per_s", "http_one_session_tokens_per_s",
                           "http_four_sessions_aggregate_tokens_per_s", "http_concurrency_speedup_4_sessions",
                           "http_concurrency_speedup_4_sessions_160_tokens",
                           "http_stall_max_gap_s_3_rag_arrivals", "http_ttft_last_of_3_rag_arrivals_s"}
    assert 0 < report["http_ttft_rag_s"] <= report["http_ttft_last_of_3_rag_arrivals_s"] + 5
    assert report["http_decode_tokens_per_s"] > 1 and report["http_concurrency_speedup_4_sessions"] > 0.5
    assert report["http_concurrency_speedup_4_sessions_160_tokens"] > 0.5
    assert report["http_stall_max_gap_s_3_rag_arrivals"] > 0  # the story was still streaming when they came


def test_engine_figures_from_plain_prompts(engine) -> None:
    """measure_engine (what `domainchat bench` and scripts/bench_engine.py report) over the real engine,
    from prompts that are plain data: nothing of the knowledge stack is needed."""
    from dataclasses import asdict

    from domainchat.bench import BenchPrompts, measure_engine

    rag = BenchPrompt([{"role": "system", "content": "Answer from the passages."},
                       {"role": "user", "content": "Passages:\n[1] A Roth IRA takes after-tax money.\n\nWhat is it?"}],
                      "A Roth IRA takes after-tax money [1].\n")
    prompts = BenchPrompts(short=[{"role": "user", "content": "What is APR?"}], rag=rag, arrivals=[rag] * 3,
                           fixed=1, adapter="alpha")
    assert BenchPrompts.from_json(asdict(prompts)) == prompts, "prompts travel as JSON to a machine without Chroma"
    report = measure_engine(engine, ["alpha", "beta"], prompts, runs=1)
    assert report["decoder"] == engine.decoder_name
    assert report["rag_prompt_tokens"] == len(engine.encode(rag.messages)[0]) + engine.count_tokens(rag.reply_start)
    assert report["decode_tokens_per_s"] > 1 and report["decode_naive_peft_generate_tokens_per_s"] > 1
    assert 0 < report["ttft_short_s"] and 0 < report["ttft_rag_s"] <= report["ttft_last_of_3_rag_arrivals_s"] + 5
    assert report["stall_max_gap_s_3_rag_arrivals"] > 0 and report["concurrency_speedup_4_sessions"] > 0.5


def test_float32_path_figures_beside_the_4bit_kernel(engine, settings, test_adapters) -> None:
    """measure_float32_path starts a second engine on bitsandbytes' standard layout (forced) and
    measures it against the first, alternating."""
    from domainchat.bench import measure_float32_path

    if engine.decoder_layout != "nf4 kernel":
        pytest.skip("this CPU already runs the float32 path: `decode_tokens_per_s` is its figure")
    report = measure_float32_path(settings, test_adapters, engine, "alpha", runs=1)
    assert report["decode_float32_path_tokens_per_s"] > 1 and report["decode_4bit_path_alongside_tokens_per_s"] > 1
    assert report["float32_path_slowdown_vs_4bit"] == round(
        report["decode_4bit_path_alongside_tokens_per_s"] / report["decode_float32_path_tokens_per_s"], 2)

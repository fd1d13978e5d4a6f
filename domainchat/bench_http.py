"""Bench as a client (`domainchat bench --http`): speed as people calling the API see it.

Owns the client-side measurements: it starts `domainchat serve` on a free loopback port (or is
given the /v1 URL of a running server) and measures with the official `openai` client, streaming:
time to the first text of a RAG question (the whole pipeline: retrieval, evidence, model), decode
speed of one stream, four streams in four domains at once against the same four one after another
(64- and 160-token answers), and
how long a running stream pauses while three RAG questions from other people arrive, with the
last newcomer's time to its first text.
A "token" here is one streamed chunk, which is one token piece, as the client counts them.

It knows the HTTP contract only (model names, `<domain>:raw`); bench.py measures the engine from
inside, and cli.py puts both in one report.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from domainchat.bench import longest_pause
from domainchat.errors import BadInput, ModelUnavailable

STARTUP_TIMEOUT_S = 300.0
STORY = "Write a long story about a lighthouse keeper."
# Four sessions at once against the same four one after another, for short and for long answers: the
# longer the answer, the more of its time is decode, which four sessions share; prefill and the first
# token they do not.
SHORT_ANSWER, LONG_ANSWER = 64, 160


def _client(base_url: str):
    try:
        import openai
    except ImportError:
        raise BadInput("`domainchat bench --http` measures with the official OpenAI client: "
                       "pip install openai") from None
    return openai.OpenAI(base_url=base_url, api_key=os.environ.get("DOMAINCHAT_API_KEY") or "unused", max_retries=0,
                         timeout=600)


def _stream(client, model: str, question: str, max_tokens: int, on_piece: Callable[[float], None] | None = None
            ) -> tuple[float, float, int]:
    """(time to first text, total time, pieces) of one streamed completion, greedy."""
    started = time.perf_counter()
    first, pieces = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0.0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first if first is not None else now - started
            pieces += 1
            if on_piece is not None:
                on_piece(now)
    total = time.perf_counter() - started
    return first if first is not None else total, total, pieces


def _together(calls: Sequence[Callable[[], object]]) -> list[object]:
    """Run `calls` at once, each on its own thread; their results in order."""
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def measure(base_url: str, domains: Sequence[str], questions: Sequence[str], runs: int = 3,
            progress: Callable[[str], None] | None = None) -> dict:
    """The client-side figures against the server at `base_url` (its /v1). `domains` need a usable
    adapter (their `<domain>:raw` model streams the story); `questions` are three RAG questions for
    `domains[0]`."""
    progress = progress or (lambda _: None)
    client = _client(base_url)
    raw = [f"{d}:raw" for d in domains]
    report: dict = {}
    _stream(client, raw[0], STORY, 8)  # warm: the first request pays one-time costs
    _stream(client, domains[0], questions[0], 8)

    progress("http: time to first text")
    report["http_ttft_rag_s"] = round(statistics.median(
        _stream(client, domains[0], questions[i % len(questions)], 1)[0] for i in range(runs)), 3)

    progress("http: decode")
    rates = []
    for _ in range(runs):
        first, total, pieces = _stream(client, raw[0], STORY, 64)
        rates.append((pieces - 1) / max(total - first, 1e-9))
    report["http_decode_tokens_per_s"] = round(statistics.median(rates), 2)

    progress("http: four sessions")
    single, four = _sessions(client, raw, SHORT_ANSWER, runs)
    report["http_one_session_tokens_per_s"] = round(statistics.median(single), 2)
    report["http_four_sessions_aggregate_tokens_per_s"] = round(statistics.median(four), 2)
    report["http_concurrency_speedup_4_sessions"] = round(statistics.median(four) / statistics.median(single), 2)
    progress("http: four sessions, long answers")
    single, four = _sessions(client, raw, LONG_ANSWER, runs)
    report[f"http_concurrency_speedup_4_sessions_{LONG_ANSWER}_tokens"] = round(
        statistics.median(four) / statistics.median(single), 2)

    progress("http: arrivals")
    arrivals = [_arrivals(client, raw[0], domains[0], questions[:3]) for _ in range(runs)]
    report["http_stall_max_gap_s_3_rag_arrivals"] = round(statistics.median(a[0] for a in arrivals), 3)
    report["http_ttft_last_of_3_rag_arrivals_s"] = round(statistics.median(a[1] for a in arrivals), 3)
    return report


def _sessions(client, raw: Sequence[str], tokens: int, runs: int) -> tuple[list[float], list[float]]:
    """(one session's tokens/s, four sessions' aggregate tokens/s) per run, end to end as the client
    counts them, for the same four requests in four domains: one after another, then all at once.
    (The domains' answers differ in length: one stops at its end-of-turn long before `tokens`, so a
    single domain's stream alone would not be the same work as the four.)"""
    single, four = [], []
    models = [raw[i % len(raw)] for i in range(4)]  # four domains where four are trained
    for _ in range(runs):
        alone = [_stream(client, m, STORY, tokens) for m in models]
        single.append(sum(a[2] for a in alone) / sum(a[1] for a in alone))
        started = time.perf_counter()
        counts = _together([lambda m=m: _stream(client, m, STORY, tokens)[2] for m in models])
        four.append(sum(counts) / (time.perf_counter() - started))  # type: ignore[arg-type]
    return single, four


def _arrivals(client, running_model: str, domain: str, questions: Sequence[str]) -> tuple[float, float]:
    """(longest pause of a `running_model` stream while `questions` arrive together for `domain`,
    time to first text of the last of them)."""
    stamps: list[float] = []
    answering = threading.Event()

    def on_piece(now: float) -> None:
        stamps.append(now)
        if len(stamps) == 4:
            answering.set()

    def running() -> None:
        _stream(client, running_model, STORY, 400, on_piece)
        answering.set()

    runner = threading.Thread(target=running)
    runner.start()
    answering.wait()
    window = time.perf_counter()
    firsts = _together([lambda q=q: _stream(client, domain, q, 1)[0] for q in questions])
    window_end = time.perf_counter()
    runner.join()
    return longest_pause(stamps, window, window_end), max(firsts)  # type: ignore[type-var]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving() -> Iterator[str]:
    """`domainchat serve` on a free loopback port, in its own process, as a user starts it; yields
    its /v1 URL once it answers, and stops it afterwards."""
    import httpx

    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe would block the server's logging
    process = subprocess.Popen([sys.executable, "-m", "domainchat", "serve", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise ModelUnavailable(f"`domainchat serve` exited before answering: {log.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                headers = {"Authorization": f"Bearer {os.environ.get('DOMAINCHAT_API_KEY') or 'unused'}"}
                if httpx.get(f"{url}/models", headers=headers, timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ModelUnavailable(f"`domainchat serve` did not answer within {STARTUP_TIMEOUT_S:.0f} s.")
            time.sleep(1.0)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def run_http_bench(settings, progress: Callable[[str], None] = lambda _: None, runs: int = 3) -> dict:
    """Start the server as a user would and measure it as a client: the domains with a trained
    adapter stream through their `<domain>:raw` models, and the first of them answers RAG questions."""
    from domainchat.chat import adapter_dirs
    from domainchat.domains import load_registry

    registry = load_registry(settings.domains_dir)
    domains = [d for d in registry.domains if d in adapter_dirs(settings, registry)][:4]
    if not domains:
        raise BadInput("`domainchat bench --http` streams through the domains' adapters and none is trained: "
                       "run `domainchat train --domain ID` first.")
    domain = registry.get(domains[0])
    questions = (list(domain.example_questions) + ["What does this service cover?"] * 3)[:3]
    progress("http: starting the server")
    with serving() as url:
        return measure(url, domains, questions, runs, progress)

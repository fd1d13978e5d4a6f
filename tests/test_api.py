"""The OpenAI-compatible API, served live (uvicorn on a free port) and called with the official
`openai` client: real model, real adapters, real knowledge store."""

from __future__ import annotations

import openai
import pytest
from conftest import serve_in_thread
from fastapi import FastAPI

from domainchat.api import mount_api
from domainchat.chat import Admission, Assistant
from domainchat.errors import Busy
from domainchat.generation import GenerationParams
from domainchat.settings import load_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assistant(domain_assistant: Assistant) -> Assistant:
    return domain_assistant


@pytest.fixture(scope="module")
def client(api_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0)


GREEDY = {"temperature": 0, "max_tokens": 16}


def test_models_lists_domains_and_raw_adapters(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"finance", "medical", "legal", "customer_service"} <= ids
    assert {"finance:raw", "legal:raw", "base:raw"} <= ids
    assert "medical:raw" not in ids, "a raw model is an adapter: medical has none here"


def test_pipeline_answer_has_sources_and_adapter(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="finance", messages=[{"role": "user", "content": "What is the 50/30/20 budgeting rule?"}], **GREEDY)
    assert response.choices[0].message.content.strip()
    extra = response.model_extra
    assert extra["adapter"] == "finance" and extra["sources"] and extra["sources"][0]["source"].endswith(".md")
    assert response.usage.completion_tokens > 0 and response.usage.prompt_tokens > 100


def streamed(client: openai.OpenAI, model: str, messages: list[dict[str, str]]) -> tuple[list[str], object]:
    pieces, last = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **GREEDY):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        last = chunk
    return pieces, last


def test_streaming_matches_the_non_streaming_answer(client: openai.OpenAI) -> None:
    # The served answer opens with its quoted evidence in one piece and holds the model's sentence
    # until a passage backs it, so the pieces are few; their text is what the whole answer says.
    messages = [{"role": "user", "content": "How long does a cold usually last?"}]
    whole = client.chat.completions.create(model="medical", messages=messages, **GREEDY)
    pieces, last = streamed(client, "medical", messages)
    assert pieces and "".join(pieces).strip() == whole.choices[0].message.content.strip()
    assert last.choices[0].finish_reason == "stop" and last.model_extra["sources"]


def test_a_raw_model_streams_token_by_token(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model="finance:raw", messages=messages, **GREEDY)
    pieces, last = streamed(client, "finance:raw", messages)
    assert len(pieces) > 1, "tokens arrive as separate events"
    assert "".join(pieces) == whole.choices[0].message.content and last.choices[0].finish_reason


def test_abstention_and_risk_rules_come_through(client: openai.OpenAI, assistant: Assistant) -> None:
    off_topic = client.chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "What is the best recipe for banana bread?"}], **GREEDY)
    assert off_topic.choices[0].message.content == assistant.registry.get("legal").abstain_message
    emergency = client.chat.completions.create(
        model="medical", messages=[{"role": "user", "content": "I think I'm having a heart attack"}], **GREEDY)
    assert "emergency number" in emergency.choices[0].message.content


def test_raw_model_is_the_adapter_alone(client: openai.OpenAI, assistant: Assistant) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    greedy = GenerationParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.1, no_repeat_ngram=4)
    reference = assistant.engine.complete(messages, "finance", greedy)
    raw = client.chat.completions.create(model="finance:raw", messages=messages, **GREEDY)
    assert raw.choices[0].message.content == reference and raw.model_extra["adapter"] == "finance"
    base = client.chat.completions.create(model="base:raw", messages=messages, **GREEDY)
    assert base.model_extra["adapter"] is None and base.choices[0].message.content != reference


def test_errors_use_the_openai_format(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="astrology", messages=[{"role": "user", "content": "hi"}])
    assert "Unknown domain" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError) as untuned:
        client.chat.completions.create(model="medical:raw", messages=[{"role": "user", "content": "hi"}])
    assert "use 'base:raw'" in untuned.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="finance", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="finance", messages=[{"role": "user", "content": "   "}])
    with pytest.raises(openai.APIStatusError) as too_long:
        client.chat.completions.create(model="finance", messages=[{"role": "user", "content": "a" * 5000}])
    assert too_long.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as too_many:
        client.chat.completions.create(model="finance", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100_000)
    assert too_many.value.status_code == 413


def test_malformed_json_is_400(client: openai.OpenAI) -> None:
    import httpx

    response = httpx.post(f"{client.base_url}chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_api_key_is_required_when_set(assistant: Assistant) -> None:
    keyed = Assistant(load_settings({"DOMAINCHAT_HOME": str(assistant.settings.home), "DOMAINCHAT_API_KEY": "s3cret"}),
                      assistant.registry, assistant.engine, assistant.knowledge)
    url = serve_in_thread(mount_api(FastAPI(), keyed))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).models.list().data


def test_queue_full_is_429(assistant: Assistant, monkeypatch: pytest.MonkeyPatch) -> None:
    admission = Admission(active=1, waiting=0)
    monkeypatch.setattr(assistant, "admission", admission)  # the page and the API share this one
    admission.enter()  # the only slot is taken
    url = serve_in_thread(mount_api(FastAPI(), assistant))
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
            model="finance", messages=[{"role": "user", "content": "What is APR?"}])
    admission.leave()
    with pytest.raises(Busy):
        one = Admission(active=1, waiting=0)
        one.enter()
        one.enter()


def test_a_client_that_hangs_up_stops_its_answer_and_frees_its_slot(assistant: Assistant,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream whose client goes away mid-answer stops generating (the engine's cancel is set) and
    gives its admission slot back. The model is replaced by an endless generator: this is about the
    API's streaming, and an endless answer is the one a hang-up must stop."""
    import threading
    import time

    import httpx

    from domainchat.chat import Token

    stopped = threading.Event()

    def endless(messages, adapter, params, cancel=None, reply_start=""):
        try:
            while not cancel.is_set():
                time.sleep(0.005)
                yield Token("la ")
        finally:
            stopped.set()

    monkeypatch.setattr(assistant, "generate_raw", endless)
    monkeypatch.setattr(assistant, "admission", Admission(active=1, waiting=0))
    url = serve_in_thread(mount_api(FastAPI(), assistant))
    body = {"model": "finance:raw", "messages": [{"role": "user", "content": "Sing."}], "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, headers={"Authorization": "Bearer x"}) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data:"))
        assert '"role": "assistant"' in next(lines)
        assert '"la "' in next(lines) and '"la "' in next(lines)  # the answer is streaming; hang up
    assert stopped.wait(5), "the answer went on after its client hung up"
    api = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    deadline = time.monotonic() + 5
    while True:  # the slot comes back as the stream's thread ends
        try:
            api.chat.completions.create(model="finance:raw", messages=[{"role": "user", "content": "Hi"}],
                                        stream=True).close()
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the hung-up answer kept its admission slot"
            time.sleep(0.05)


SOAK_SECONDS = 120
SOAK_CLIENTS = 8


def _rss_mb() -> float:
    """Resident memory after handing freed heap back to the OS (malloc_trim), so that the number
    follows live memory rather than what glibc's per-thread arenas keep cached."""
    import ctypes
    from pathlib import Path

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


def test_eight_clients_for_two_minutes_each_get_their_own_domain(client: openai.OpenAI, api_url: str) -> None:
    """8 concurrent clients: 4 on the domains' pipelines (2 with an adapter, 2 on the base), 4 on raw
    models. A pipeline answer opens with its domain's quoted evidence and names its own adapter; a
    raw model's answer is its greedy canary answer from its own adapter, token for token (its short
    prompt is prefilled in one piece, busy or not: a long prompt prefilled in chunks while others
    answer rounds differently from a whole prefill, see batcher.py, so the model's sentence after a
    pipeline's evidence may differ at a near-tie). The only errors allowed are 429s, and memory
    stays flat."""
    import threading
    import time

    questions = {"finance": "What is an emergency fund?", "legal": "What is a contract?",
                 "medical": "What is a fever?", "customer_service": "How do I return an item?",
                 "finance:raw": "What is an emergency fund?", "legal:raw": "What is a contract?",
                 "base:raw": "What is a fever?"}
    expected_adapter = {"finance": "finance", "legal": "legal", "medical": None, "customer_service": None,
                        "finance:raw": "finance", "legal:raw": "legal", "base:raw": None}
    canary = {"temperature": 0, "max_tokens": 8}

    def ask(model: str, api: openai.OpenAI) -> tuple[str, str | None]:
        reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": questions[model]}],
                                            **canary)
        text = reply.choices[0].message.content
        # A pipeline answer: its first line, the quoted evidence (retrieval and selection only).
        return (text if model.endswith(":raw") else text.split("\n")[0]), reply.model_extra["adapter"]

    for model in questions:
        ask(model, client)  # computes each domain's cached prompt prefix, as every later request uses it
    reference = {model: ask(model, client) for model in questions}
    assert {m: a for m, (_, a) in reference.items()} == expected_adapter
    assert all(text.endswith("].") for m, (text, _) in reference.items() if ":" not in m), "quoted evidence"
    rss_before = _rss_mb()
    results: list[tuple[str, str]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SOAK_SECONDS
    models = [*questions, "finance:raw"]  # one client each, the eighth on a second adapter row

    def worker(index: int) -> None:
        model = models[index]
        api = openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=120)
        while time.monotonic() < deadline:
            try:
                outcome = "ok" if ask(model, api) == reference[model] else "wrong answer or adapter"
            except openai.RateLimitError:
                outcome = "429"
            except Exception as exc:  # the test reports any other failure, whatever its type
                outcome = f"error: {type(exc).__name__}: {exc}"
            with lock:
                results.append((model, outcome))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(SOAK_CLIENTS)]
    for thread in threads:
        thread.start()
    rss = []  # sampled every 5 s: the first third warms up (per-thread allocator arenas, caches)
    while any(t.is_alive() for t in threads):
        rss.append(_rss_mb())
        time.sleep(5)
    outcomes = {o for _, o in results}
    warm = rss[len(rss) // 3]
    print(f"\nsoak: {len(results)} answers in {SOAK_SECONDS} s, outcomes {sorted(outcomes)}, RSS MB before "
          f"{rss_before:.0f}, warm {warm:.0f}, last {rss[-1]:.0f}, max {max(rss):.0f}")
    assert outcomes <= {"ok", "429"} and sum(o == "ok" for _, o in results) >= SOAK_CLIENTS
    assert {m for m, o in results if o == "ok"} == set(questions)
    # A leaked key/value cache is ~46 MB per 1,000-token request: a leak adds gigabytes over the ~60
    # answers here. Measured drift after warm-up: up to ~100 MB (not yet explained), hence 256.
    assert max(rss[len(rss) // 3:]) - warm < 256, "memory kept growing after the warm-up"


@pytest.mark.slow
def test_raw_models_continue_a_started_reply(api_url: str) -> None:
    import httpx

    messages = [{"role": "user", "content": "What is a Roth IRA?"}]
    body = {"model": "base:raw", "max_tokens": 8, "temperature": 0}
    started = httpx.post(f"{api_url}/chat/completions", json={
        **body, "messages": messages + [{"role": "assistant", "content": "A Roth IRA is"}],
        "continue_final_message": True, "add_generation_prompt": False}, timeout=120).json()
    fresh = httpx.post(f"{api_url}/chat/completions", json={**body, "messages": messages}, timeout=120).json()
    continued = started["choices"][0]["message"]["content"]
    assert continued and continued != fresh["choices"][0]["message"]["content"]
    bad = httpx.post(f"{api_url}/chat/completions", json={**body, "messages": messages,
                                                           "continue_final_message": True}, timeout=120)
    assert bad.status_code == 400 and "last message to be the assistant" in bad.json()["error"]["message"]

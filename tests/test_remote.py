"""Remote generation: a domainchat front with no model, whose DOMAINCHAT_LLM_URL is a second live
domainchat serving `<domain>:raw`, against the local engine; and a generation server that is down."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import httpx
import pytest
from conftest import free_port

from domainchat import prompts
from domainchat.chat import Assistant, Done, Notice
from domainchat.domains import GroundingSettings
from domainchat.errors import BadInput, Busy, ConfigError, ModelUnavailable, TooLarge
from domainchat.generation import GenerationParams
from domainchat.remote import RemoteEngine, api_root
from domainchat.settings import load_settings

QUESTIONS = {"finance": "What is the 50/30/20 budgeting rule?", "legal": "What does a lease usually say about repairs?"}


def greedy(assistant: Assistant, domain_id: str) -> GenerationParams:
    generation = assistant.registry.get(domain_id).generation
    return GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=generation.repetition_penalty,
                            no_repeat_ngram=generation.no_repeat_ngram)


@pytest.fixture(scope="module")
def front(domain_assistant: Assistant, api_url: str) -> Assistant:
    engine = RemoteEngine(api_url, domain_assistant.registry.domains, adapter_template="{adapter}:raw",
                          base_name="base:raw")
    return Assistant(domain_assistant.settings, domain_assistant.registry, engine, domain_assistant.knowledge)


@pytest.mark.slow
@pytest.mark.parametrize("domain_id", ["finance", "legal"])
def test_front_gives_the_local_engines_greedy_answers(front: Assistant, domain_assistant: Assistant,
                                                      domain_id: str) -> None:
    question, params = QUESTIONS[domain_id], greedy(front, domain_id)
    # The evidence opening travels to the server (continue_final_message); the number guard does not,
    # and the served check of the model's sentence would cut what the two engines are compared on.
    unguarded = GroundingSettings(evidence_sentences=2, number_guard=False, continuation="free")
    for use_adapter in (True, False):
        done = next(e for e in front.answer(domain_id, question, use_adapter=use_adapter, params=params,
                                            grounding_settings=unguarded) if isinstance(e, Done))
        adapter = domain_id if use_adapter else None
        domain = front.registry.get(domain_id)
        given = domain_assistant.model_input(domain, question, (), domain_assistant.retrieve(domain, question),
                                             prompts.few_shot_for(with_adapter=use_adapter), params, unguarded)
        start = given.reply_start
        local = domain_assistant.engine.complete(given.messages, adapter, given.params, reply_start=start)
        assert start and done.adapter == adapter and local.strip() and done.answer == (start + local).strip()


@pytest.mark.slow
def test_an_adapter_the_server_lacks_falls_back_to_its_base_with_a_notice(front: Assistant) -> None:
    assert front.engine.adapters["finance"].loaded
    assert not front.engine.adapters["medical"].loaded  # the backend has no medical adapter
    events = list(front.answer("medical", "How long does a cold usually last?", params=greedy(front, "medical")))
    notices = [e.text for e in events if isinstance(e, Notice) and e.kind == "adapter"]
    assert notices == ["base only: the generation server does not serve 'medical:raw'"]
    assert events[-1].adapter is None and events[-1].answer


def test_a_server_that_is_down_gives_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    engine = RemoteEngine(url, ["finance"])
    assert engine.available("finance"), "unknown until the server answers: requests say what is wrong"
    with pytest.raises(ModelUnavailable, match="not reachable.*check that it is running"):
        engine.complete([{"role": "user", "content": "hi"}], "finance")


def test_remote_settings() -> None:
    assert api_root("http://gpu:8000") == api_root("http://gpu:8000/v1/") == "http://gpu:8000/v1"
    settings = load_settings({"DOMAINCHAT_HOME": "/tmp/x", "DOMAINCHAT_LLM_URL": "http://gpu:8000/v1",
                              "DOMAINCHAT_LLM_ADAPTER_NAME": "{adapter}:raw"})
    assert settings.llm_adapter_name == "{adapter}:raw" and settings.llm_base_name == "base"
    from domainchat.errors import ConfigError

    with pytest.raises(ConfigError, match="DOMAINCHAT_LLM_ADAPTER_NAME"):
        load_settings({"DOMAINCHAT_HOME": "/tmp/x", "DOMAINCHAT_LLM_ADAPTER_NAME": "lora-{domain}"})


def test_a_reply_start_is_sent_as_a_final_message_to_continue() -> None:
    engine = RemoteEngine("http://gpu:8000/v1", ["finance"])
    body = engine._request([{"role": "user", "content": "q"}], "finance", GenerationParams(), "The fee is 12% [1].\n")
    assert body["messages"][-1] == {"role": "assistant", "content": "The fee is 12% [1].\n"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    plain = engine._request([{"role": "user", "content": "q"}], "finance", GenerationParams())
    assert "continue_final_message" not in plain and len(plain["messages"]) == 1


def test_the_front_modules_import_no_torch() -> None:
    """chat, api, ui and remote use generation.py's types: a front whose model runs on a generation
    server loads torch only for the embedder, not for these modules' imports."""
    import subprocess
    import sys

    code = ("import sys, domainchat.chat, domainchat.api, domainchat.remote, domainchat.ui; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "[]"


def mock_server(chat: Callable[[httpx.Request], httpx.Response], served: Sequence[str] = ("finance", "base")):
    """A generation server in-process: /models lists `served`, /chat/completions answers with `chat`."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in served]})
        return chat(request)

    return RemoteEngine("http://gpu:8000", ["finance", "legal"], transport=httpx.MockTransport(handle))


def sse(*chunks: str) -> httpx.Response:
    lines = [f"data: {json.dumps({'choices': [{'delta': {'content': c}}]})}" for c in chunks] + ["data: [DONE]"]
    return httpx.Response(200, text="\n\n".join(lines) + "\n\n", headers={"content-type": "text/event-stream"})


HI = [{"role": "user", "content": "hi"}]


def test_a_mock_server_streams_pieces_and_lists_its_adapters() -> None:
    engine = mock_server(lambda request: sse("The fee ", "is 12% [1]."))
    assert engine.available("finance") and not engine.available("legal")
    assert engine.adapters["legal"].reason == "the generation server does not serve 'legal'"
    assert list(engine.stream(HI, "finance")) == ["The fee ", "is 12% [1]."]
    with pytest.raises(BadInput, match="Adapter 'legal' cannot be used: the generation server does not serve"):
        engine.complete(HI, "legal")


@pytest.mark.parametrize(("status", "error", "words"), [
    (404, ModelUnavailable, "does not serve model 'finance'.*DOMAINCHAT_LLM_ADAPTER_NAME.*no such model"),
    (429, Busy, "is busy; try again"),
    (413, TooLarge, "refused the request as too large: no such model"),
    (400, BadInput, "refused the request: no such model"),
    (422, BadInput, "refused the request"),
    (401, ConfigError, "refused our credentials: set DOMAINCHAT_LLM_API_KEY"),
    (403, ConfigError, "DOMAINCHAT_LLM_API_KEY"),
    (500, ModelUnavailable, r"failed \(HTTP 500\): no such model"),
])
def test_server_errors_become_messages_a_user_can_act_on(status: int, error: type, words: str) -> None:
    engine = mock_server(lambda request: httpx.Response(status, json={"error": {"message": "no such model"}}))
    with pytest.raises(error, match=words):
        engine.complete(HI, "finance")


def test_a_broken_stream_is_a_clear_error() -> None:
    malformed = mock_server(lambda request: httpx.Response(200, text="data: {not json\n\n"))
    with pytest.raises(ModelUnavailable, match="sent a malformed stream"):
        malformed.complete(HI, "finance")
    stopped = mock_server(lambda request: httpx.Response(200, text='data: {"error": {"message": "out of memory"}}\n\n'))
    with pytest.raises(ModelUnavailable, match="The generation server stopped: out of memory"):
        stopped.complete(HI, "finance")


def test_timeouts_and_lost_connections_say_what_to_do() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ModelUnavailable, match="did not answer in time; try again"):
        mock_server(timeout).complete(HI, "finance")
    with pytest.raises(ModelUnavailable, match=r"not reachable \(ConnectError\); check that it is running"):
        mock_server(refused).complete(HI, "finance")


def test_the_request_carries_the_model_name_and_sampling() -> None:
    seen: list[dict] = []

    def chat(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return sse("ok")

    engine = mock_server(chat)
    engine.complete(HI, "finance", GenerationParams(max_new_tokens=7, temperature=0.0, seed=3))
    engine.complete(HI, None)
    assert seen[0]["model"] == "finance" and seen[0]["max_tokens"] == 7 and seen[0]["seed"] == 3
    assert seen[0]["stream"] is True and seen[1]["model"] == "base"

"""API: OpenAI-compatible HTTP endpoints, mounted beside the UI on the same server.

`GET /v1/models` lists one model per domain (the whole pipeline: retrieval, template, adapter),
one `<domain>:raw` per domain with a usable adapter (that adapter on the given messages, nothing
else — what a vLLM LoRA module serves, so one domainchat can be another's generation server) and
`base:raw`.
`POST /v1/chat/completions` speaks the OpenAI schema, streaming (server-sent events ending in
`data: [DONE]`) or not, and adds `sources` and `adapter` to the response. Errors use OpenAI's error
format. This module translates HTTP to `chat.Assistant` calls; it knows nothing about models,
retrieval or prompts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from domainchat.chat import Assistant, Done, Token, Transcript, drain
from domainchat.errors import BadInput, Busy, DomainchatError, ModelUnavailable, TooLarge, UnknownDomain
from domainchat.generation import GenerationParams

RAW_SUFFIX = ":raw"
BASE_RAW = "base:raw"
MAX_MESSAGES = 64


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)  # vLLM's and TGI's extension
    # vLLM's extension: the last message is the assistant's reply so far, to be continued (raw models)
    continue_final_message: bool = False  # (its companion add_generation_prompt=false is implied)
    user: str | None = None


def error_response(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    error = {"message": message, "type": kind, "param": None, "code": code}
    return JSONResponse(status_code=status, content={"error": error})


def _status_for(exc: DomainchatError) -> tuple[int, str, str]:
    if isinstance(exc, UnknownDomain):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(exc, TooLarge):
        return 413, "invalid_request_error", "input_too_large"
    if isinstance(exc, Busy):
        return 429, "rate_limit_error", "busy"
    if isinstance(exc, BadInput):
        return 400, "invalid_request_error", "bad_input"
    if isinstance(exc, ModelUnavailable):
        return 503, "server_error", "model_unavailable"
    return 500, "server_error", "internal"


class RequireKey:
    """Answers 401 to a /v1/ request without `Authorization: Bearer <api_key>`. Plain ASGI rather than
    `@app.middleware("http")`, whose BaseHTTPMiddleware relays every chunk of a stream through
    another task and memory stream: per token, under four streams, on the cores that decode."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            if dict(scope["headers"]).get(b"authorization", b"") != self.expected:
                response = error_response(401, "Missing or wrong API key: send 'Authorization: Bearer "
                                          "<DOMAINCHAT_API_KEY>'.", "invalid_request_error", "invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def mount_api(app: FastAPI, assistant: Assistant) -> FastAPI:
    admission = assistant.admission
    api_key = assistant.settings.api_key

    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"Invalid request body: {where or 'body'}: {first.get('msg', 'malformed')}.",
                              "invalid_request_error", "invalid_body")

    @app.get("/v1/models")
    def list_models() -> dict:
        created = int(time.time())
        ids = list(assistant.registry.domains)
        models = [{"id": i, "object": "model", "created": created, "owned_by": "domainchat"} for i in ids]
        # `<id>:raw` is an adapter, as a vLLM LoRA module is: listed only where one is usable
        tuned = [i for i in ids if assistant.adapter_for(assistant.registry.get(i))[0] is not None]
        models += [{"id": i + RAW_SUFFIX, "object": "model", "created": created, "owned_by": "domainchat",
                    "parent": BASE_RAW} for i in tuned]
        models.append({"id": BASE_RAW, "object": "model", "created": created, "owned_by": "domainchat", "parent": None})
        return {"object": "list", "data": models}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest):
        cancel = threading.Event()
        try:
            admission.enter()
        except Busy as exc:
            return error_response(429, str(exc), "rate_limit_error", "busy")
        try:
            events, model = _start(assistant, body, cancel)
        except DomainchatError as exc:
            admission.leave()
            status, kind, code = _status_for(exc)
            return error_response(status, str(exc), kind, code)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def run() -> Iterator[Any]:
            try:
                yield from events
            finally:
                cancel.set()  # the client went away or the answer is done: stop generating
                admission.leave()

        if body.stream:
            return StreamingResponse(_relay(_sse(run(), completion_id, created, model), cancel),
                                     media_type="text/event-stream")
        try:
            result = _collect(run())
        except DomainchatError as exc:
            status, kind, code = _status_for(exc)
            return error_response(status, str(exc), kind, code)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                         "finish_reason": result["finish_reason"]}],
            "usage": result["usage"], "sources": result["sources"], "adapter": result["adapter"],
            "notices": result["notices"],
        }

    return app


def _params(assistant: Assistant, domain_id: str, body: ChatRequest) -> GenerationParams:
    generation = assistant.registry.get(domain_id).generation
    max_new = body.max_completion_tokens or body.max_tokens or generation.max_new_tokens
    limit = assistant.settings.max_new_tokens
    if max_new > limit:
        raise TooLarge(f"max_tokens={max_new} is over the limit of {limit}.")
    asked = {"temperature": body.temperature, "top_p": body.top_p, "repetition_penalty": body.repetition_penalty}
    return replace(generation, max_new_tokens=max_new, seed=body.seed,
                   **{name: value for name, value in asked.items() if value is not None})


def _start(assistant: Assistant, body: ChatRequest, cancel: threading.Event) -> tuple[Iterator[Any], str]:
    """Validate the request and start it: (its event iterator, the model name). Validation, risk
    rules and retrieval run here, so bad input is an HTTP error rather than a broken stream."""
    if len(body.messages) > MAX_MESSAGES:
        raise TooLarge(f"{len(body.messages)} messages is over the limit of {MAX_MESSAGES}; send fewer turns.")
    model = body.model
    if model == BASE_RAW or model.endswith(RAW_SUFFIX):
        domain_id = None if model == BASE_RAW else model[: -len(RAW_SUFFIX)]
        adapter, why_base = assistant.adapter_for(assistant.registry.get(domain_id)) if domain_id else (None, None)
        if domain_id and adapter is None:
            raise UnknownDomain(f"Model '{model}' is not served ({why_base}); use '{BASE_RAW}' for the base model.")
        params = _params(assistant, domain_id or next(iter(assistant.registry.domains)), body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages if m.role in ("system", "developer", "user", "assistant")]
        if sum(len(m["content"]) for m in messages) > 64_000:
            raise TooLarge("The messages are over 64,000 characters; shorten them.")
        reply_start = ""
        if body.continue_final_message:
            if not messages or messages[-1]["role"] != "assistant":
                raise BadInput("continue_final_message needs the last message to be the assistant's.")
            reply_start = messages.pop()["content"]

        return assistant.generate_raw(messages, adapter, params, cancel, reply_start), model

    domain = assistant.registry.get(model)
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise BadInput("The last message must be from the user.")
    history: list[tuple[str, str]] = []
    pending: str | None = None
    for message in turns[:-1]:
        if message.role == "user":
            pending = message.text()
        elif pending is not None:
            history.append((pending, message.text()))
            pending = None
    question = turns[-1].text()
    params = _params(assistant, domain.id, body)
    iterator = assistant.answer(domain.id, question, history, params=params, cancel=cancel)
    first = next(iterator)

    def pipeline() -> Iterator[Any]:
        yield first
        yield from iterator

    return pipeline(), model


def _collect(events: Iterator[Any]) -> dict:
    transcript = drain(events)
    done = transcript.done
    assert done is not None  # drain raises otherwise
    tokens = int(done.timing.get("tokens", 0))
    return {"answer": transcript.answer, "sources": [p.to_json() for p in transcript.sources],
            "notices": transcript.notices_json(), "adapter": done.adapter,
            "finish_reason": "stop", "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": tokens,
                                               "total_tokens": done.prompt_tokens + tokens}}


_END = object()


async def _relay(chunks: Iterator[str], cancel: threading.Event) -> AsyncIterator[str]:
    """The chunks of a blocking iterator, produced on one thread of their own for the whole stream
    and handed to the event loop one by one. (A sync iterator given to StreamingResponse is advanced
    by a thread-pool call per chunk, each a round trip through anyio's limiter and a worker queue:
    per token, on the cores that decode.) When the client goes away, `cancel` stops the answer, and
    the producer closes `chunks`, which runs their cleanup on its own thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def hand(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is reading
            cancel.set()

    def produce() -> None:
        try:
            for chunk in chunks:
                hand(chunk)
                if cancel.is_set():
                    break
        except BaseException as exc:  # handed on: the event loop re-raises it in the response
            hand(exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            hand(_END)

    threading.Thread(target=produce, name="domainchat-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancel.set()


def _sse(events: Iterator[Any], completion_id: str, created: int, model: str) -> Iterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    transcript = Transcript()
    try:
        for event in events:
            transcript.add(event)
            if isinstance(event, Token):
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                yield chunk({}, "stop", sources=[p.to_json() for p in transcript.sources], adapter=event.adapter,
                            notices=transcript.notices_json())
    except DomainchatError as exc:
        status, kind, code = _status_for(exc)
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': kind, 'code': code}})}\n\n"
    yield "data: [DONE]\n\n"

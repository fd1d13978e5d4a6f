"""Remote generation: the engine interface, served by an OpenAI-compatible server.

When DOMAINCHAT_LLM_URL is set, domainchat loads no model: `RemoteEngine` sends the rendered
messages to `POST {url}/chat/completions` and streams the tokens back, asking for an adapter by
model name — vLLM `--enable-lora --lora-modules finance=adapters/finance`, LoRAX's `model`
= adapter id, or another domainchat's `finance:raw`. Names come from two templates
(DOMAINCHAT_LLM_ADAPTER_NAME, default `{adapter}`; DOMAINCHAT_LLM_BASE_NAME, default `base`).
It owns the HTTP exchange and turning server failures into messages a user can act on; it knows
nothing of domains, retrieval or prompts (it is handed messages and an adapter name, like Engine).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable, Iterator

import httpx

from domainchat.errors import BadInput, Busy, ConfigError, ModelUnavailable, TooLarge
from domainchat.generation import DEFAULT_PARAMS, AdapterStatus, GenerationParams, Messages
from domainchat.settings import DEFAULTS, Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# The server's tokenizer is not here; budgeting at 3 UTF-8 bytes per token overestimates English
# BPE (~4) so that a rendered prompt never overflows the server's context.
BYTES_PER_TOKEN = 3
# Nor is its chat template: ChatML's cost per message, the byte estimate above leaving the margin.
MESSAGE_OVERHEAD_TOKENS = 5
REMOTE_CONTEXT_TOKENS = 8192


def api_root(url: str) -> str:
    """The OpenAI base URL: `http://host:8000` and `http://host:8000/v1` both mean `…/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteEngine:
    """The GenerationEngine interface (generation.py) over HTTP."""

    context_window = REMOTE_CONTEXT_TOKENS
    message_overhead = MESSAGE_OVERHEAD_TOKENS
    quant = "remote"

    def __init__(self, url: str, adapter_names: Iterable[str], *, adapter_template: str = "{adapter}",
                 base_name: str = "base", api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None, read_timeout_s: float = DEFAULTS.llm_timeout_s) -> None:
        self.url = api_root(url)
        self.base_name = base_name
        self.base_source = f"{base_name} at {self.url}"
        self._template = adapter_template
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, transport=transport,
                                    timeout=httpx.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S))
        self._names = list(adapter_names)
        self._lock = threading.Lock()
        self.adapters: dict[str, AdapterStatus] = {}
        self.refresh()

    @classmethod
    def start(cls, settings: Settings, adapter_names: Iterable[str]) -> RemoteEngine:
        assert settings.llm_url is not None
        return cls(settings.llm_url, adapter_names, adapter_template=settings.llm_adapter_name,
                   base_name=settings.llm_base_name, api_key=settings.llm_api_key,
                   read_timeout_s=settings.llm_timeout_s)

    def close(self) -> None:
        self._client.close()

    def model_name(self, adapter: str | None) -> str:
        return self.base_name if adapter is None else self._template.format(adapter=adapter)

    def refresh(self) -> None:
        """Ask the server which models it serves; an adapter it lacks is marked unavailable (its
        domain then answers with the base and says so). An unreachable server marks nothing: each
        request will then say the server is down, and the next refresh tries again."""
        try:
            response = self._client.get(f"{self.url}/models", timeout=CONNECT_TIMEOUT_S)
            response.raise_for_status()
            served = {m["id"] for m in response.json().get("data", [])}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("generation server %s: cannot list models (%s)", self.url, exc)
            served = None
        statuses = {}
        for name in self._names:
            model = self.model_name(name)
            if served is None or model in served:
                statuses[name] = AdapterStatus(name, model, True)
            else:
                statuses[name] = AdapterStatus(name, model, False, f"the generation server does not serve '{model}'")
        with self._lock:
            self.adapters = statuses

    def available(self, name: str | None) -> bool:
        return name is None or (name in self.adapters and self.adapters[name].loaded)

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)

    def warm_up(self) -> None:
        """Nothing to warm here: the server keeps its own model loaded."""

    def answer_nll(self, messages: Messages, answer: str, adapter: str | None = None) -> tuple[float, int]:
        raise ModelUnavailable("Perplexity needs the model's logits: run `domainchat eval` without DOMAINCHAT_LLM_URL.")

    def _request(self, messages: Messages, adapter: str | None, params: GenerationParams,
                 reply_start: str = "") -> dict:
        messages = [dict(m) for m in messages]
        body: dict = {"model": self.model_name(adapter), "messages": messages, "stream": True,
                "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                # not OpenAI's, but vLLM, TGI and domainchat accept it; OpenAI's frequency_penalty differs
                "repetition_penalty": params.repetition_penalty}
        if params.seed is not None:
            body["seed"] = params.seed
        if reply_start:
            # vLLM's (and domainchat's) way to have the model continue a started reply; the number
            # guard (params.allowed_numbers) has no counterpart on such servers and is not sent.
            messages.append({"role": "assistant", "content": reply_start})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def _failure(self, status: int, detail: str, model: str) -> Exception:
        where = f"the generation server at {self.url}"
        if status == 404:
            threading.Thread(target=self.refresh, daemon=True).start()
            return ModelUnavailable(f"{where} does not serve model '{model}': start it with that adapter, "
                                    f"or check DOMAINCHAT_LLM_ADAPTER_NAME. ({detail})")
        if status == 429:
            return Busy(f"{where} is busy; try again in a few seconds.")
        if status == 413:
            return TooLarge(f"{where} refused the request as too large: {detail}")
        if status in (400, 422):
            return BadInput(f"{where} refused the request: {detail}")
        if status in (401, 403):
            return ConfigError(f"{where} refused our credentials: set DOMAINCHAT_LLM_API_KEY.")
        return ModelUnavailable(f"{where} failed (HTTP {status}): {detail}")

    def stream(
        self,
        messages: Messages,
        adapter: str | None = None,
        params: GenerationParams = DEFAULT_PARAMS,
        cancel: threading.Event | None = None,
        prefix_messages: int = 0,  # the server caches prefixes itself (vLLM automatic prefix caching)
        reply_start: str = "",
    ) -> Iterator[str]:
        """Yield the server's reply to `messages` piece by piece; closing the iterator or setting
        `cancel` closes the connection, which stops the server's generation too."""
        if not self.available(adapter):
            reason = self.adapters[adapter].reason if adapter in self.adapters else "unknown"
            raise BadInput(f"Adapter '{adapter}' cannot be used: {reason}.")
        body = self._request(messages, adapter, params, reply_start)
        try:
            with self._client.stream("POST", f"{self.url}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise self._failure(response.status_code, _error_detail(response.read()), body["model"])
                for line in response.iter_lines():
                    if cancel is not None and cancel.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        detail = chunk["error"].get("message", chunk["error"])
                        raise ModelUnavailable(f"The generation server stopped: {detail}")
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.TimeoutException:
            raise ModelUnavailable(f"The generation server at {self.url} did not answer in time; try again.") from None
        except httpx.TransportError as exc:
            raise ModelUnavailable(f"The generation server at {self.url} is not reachable ({type(exc).__name__}); "
                                   "check that it is running, then try again.") from None
        except json.JSONDecodeError:
            raise ModelUnavailable(f"The generation server at {self.url} sent a malformed stream.") from None

    def complete(self, messages: Messages, adapter: str | None = None, params: GenerationParams = DEFAULT_PARAMS,
                 prefix_messages: int = 0, reply_start: str = "") -> str:
        return "".join(self.stream(messages, adapter, params, prefix_messages=prefix_messages, reply_start=reply_start))


def _error_detail(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        return str(error.get("message") if isinstance(error, dict) else error or body[:200].decode(errors="replace"))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")

"""Settings: the only reader of environment variables.

`load_settings()` turns the environment into a frozen, validated `Settings`. Every other module
receives a Settings (or the values it needs) and never reads `os.environ` itself. This module knows
nothing about models, domains or retrieval beyond their paths and names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from domainchat.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUANT_CHOICES = ("nf4", "int8", "none")
DECODER_CHOICES = ("lean", "transformers")
BUNDLED = "bundled"
# On a Hugging Face Space the GGUF package is not installed; the Hub copy of the same model is.
SPACE_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class Settings:
    home: Path
    base_model: str = BUNDLED
    quant: str = "nf4"
    embed_model: str = BUNDLED  # `bundled` (all-MiniLM-L6-v2), a sentence-transformers folder or Hub id
    chroma_url: str | None = None
    llm_url: str | None = None
    llm_adapter_name: str = "{adapter}"  # the model name a generation server gives each adapter
    llm_base_name: str = "base"  # ... and the base model alone
    llm_api_key: str | None = None
    api_key: str | None = None
    domains_dir: Path = PROJECT_ROOT / "domains"
    knowledge_dir: Path = PROJECT_ROOT / "knowledge"
    adapters_dir: Path = PROJECT_ROOT / "adapters"
    threads: int | None = None
    decoder: str = "lean"  # lean: fused batched decoder when the model allows; transformers: always theirs
    max_active: int = 4  # answers generating at once, page and API together
    max_waiting: int = 12  # answers queued beyond those; more are told to retry
    max_new_tokens: int = 1024  # the most an API request may ask to generate
    # A rendered prompt's budget; prefill runs ~320 tokens/s on 2 CPU cores, so keep prompts short.
    prompt_tokens: int = 2048
    llm_timeout_s: float = 120.0  # between two streamed chunks from a generation server
    max_upload_files: int = 20  # files in one upload from the page
    # Who may add and remove documents in the page (the CLI belongs to whoever runs the machine).
    admin_password: str | None = field(default=None, repr=False)  # never in a log line
    on_space: bool = False  # SPACE_ID is set: the page is public

    @property
    def knowledge_editing(self) -> str:
        """"password": the page asks for DOMAINCHAT_ADMIN_PASSWORD before adding or removing documents;
        "off": a public Space without one, where any visitor could otherwise poison the knowledge base;
        "open": a machine of one's own."""
        if self.admin_password:
            return "password"
        return "off" if self.on_space else "open"

    def __post_init__(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ConfigError(
                f"DOMAINCHAT_QUANT={self.quant!r} is not supported: use one of {', '.join(QUANT_CHOICES)}."
            )
        if not self.base_model.strip():
            raise ConfigError("DOMAINCHAT_BASE_MODEL is empty: use 'bundled', a Hugging Face id or a folder.")
        embed = Path(self.embed_model).expanduser()
        if self.embed_model != BUNDLED and not embed.is_dir():
            if self.embed_model.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(self.embed_model):
                raise ConfigError(f"DOMAINCHAT_EMBED_MODEL={self.embed_model!r} is neither a folder nor a Hugging Face "
                                  "id: point it at a sentence-transformers model folder, give a Hub id from the local "
                                  "cache, or unset it for the bundled all-MiniLM-L6-v2.")
        for name, url in (("DOMAINCHAT_CHROMA_URL", self.chroma_url), ("DOMAINCHAT_LLM_URL", self.llm_url)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name}={url!r} must start with http:// or https://.")
        if "{adapter}" not in self.llm_adapter_name or self.llm_adapter_name.replace("{adapter}", "").count("{"):
            raise ConfigError(f"DOMAINCHAT_LLM_ADAPTER_NAME={self.llm_adapter_name!r} must contain '{{adapter}}' "
                              "and no other braces, e.g. '{adapter}' for vLLM or '{adapter}:raw' for domainchat.")
        if not self.llm_base_name.strip():
            raise ConfigError("DOMAINCHAT_LLM_BASE_NAME is empty: name the server's base model, e.g. 'base'.")
        if self.decoder not in DECODER_CHOICES:
            raise ConfigError(
                f"DOMAINCHAT_DECODER={self.decoder!r} is not supported: use one of {', '.join(DECODER_CHOICES)}."
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"DOMAINCHAT_THREADS={self.threads} must be a positive integer.")
        for name, value, lowest in (("DOMAINCHAT_MAX_ACTIVE", self.max_active, 1),
                                    ("DOMAINCHAT_MAX_WAITING", self.max_waiting, 0),
                                    ("DOMAINCHAT_MAX_NEW_TOKENS", self.max_new_tokens, 1),
                                    ("DOMAINCHAT_PROMPT_TOKENS", self.prompt_tokens, 256),
                                    ("DOMAINCHAT_LLM_TIMEOUT", self.llm_timeout_s, 1),
                                    ("DOMAINCHAT_MAX_UPLOAD_FILES", self.max_upload_files, 1)):
            if value < lowest:
                raise ConfigError(f"{name}={value} must be at least {lowest}.")

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"


def _default_home(env: Mapping[str, str]) -> Path:
    if env.get("SPACE_ID") and os.access("/data", os.W_OK):
        return Path("/data/domainchat")  # a Space's persistent storage survives restarts
    return Path("~/.domainchat").expanduser()


def _number(env: Mapping[str, str], key: str, default: float | None, kind: type = int):
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} must be {'an integer' if kind is int else 'a number'}.") from None


DEFAULTS = Settings(home=Path("."))  # the defaults of the optional settings, written once above


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read DOMAINCHAT_* (and SPACE_ID) from `env` (default: the process environment)."""
    env = os.environ if env is None else env

    def path(key: str, default: Path) -> Path:
        raw = env.get(key, "").strip()
        return Path(raw).expanduser() if raw else default

    default_base = SPACE_BASE_MODEL if env.get("SPACE_ID") else BUNDLED
    return Settings(
        home=path("DOMAINCHAT_HOME", _default_home(env)),
        base_model=env.get("DOMAINCHAT_BASE_MODEL", "").strip() or default_base,
        quant=env.get("DOMAINCHAT_QUANT", "").strip().lower() or "nf4",
        embed_model=env.get("DOMAINCHAT_EMBED_MODEL", "").strip() or BUNDLED,
        chroma_url=env.get("DOMAINCHAT_CHROMA_URL", "").strip() or None,
        llm_url=env.get("DOMAINCHAT_LLM_URL", "").strip() or None,
        llm_adapter_name=env.get("DOMAINCHAT_LLM_ADAPTER_NAME", "").strip() or "{adapter}",
        llm_base_name=env.get("DOMAINCHAT_LLM_BASE_NAME", "").strip() or "base",
        llm_api_key=env.get("DOMAINCHAT_LLM_API_KEY", "").strip() or None,
        api_key=env.get("DOMAINCHAT_API_KEY", "").strip() or None,
        domains_dir=path("DOMAINCHAT_DOMAINS_DIR", PROJECT_ROOT / "domains"),
        knowledge_dir=path("DOMAINCHAT_KNOWLEDGE_DIR", PROJECT_ROOT / "knowledge"),
        adapters_dir=path("DOMAINCHAT_ADAPTERS_DIR", PROJECT_ROOT / "adapters"),
        threads=_number(env, "DOMAINCHAT_THREADS", None),
        decoder=env.get("DOMAINCHAT_DECODER", "").strip().lower() or "lean",
        max_active=_number(env, "DOMAINCHAT_MAX_ACTIVE", DEFAULTS.max_active),
        max_waiting=_number(env, "DOMAINCHAT_MAX_WAITING", DEFAULTS.max_waiting),
        max_new_tokens=_number(env, "DOMAINCHAT_MAX_NEW_TOKENS", DEFAULTS.max_new_tokens),
        prompt_tokens=_number(env, "DOMAINCHAT_PROMPT_TOKENS", DEFAULTS.prompt_tokens),
        llm_timeout_s=_number(env, "DOMAINCHAT_LLM_TIMEOUT", DEFAULTS.llm_timeout_s, float),
        max_upload_files=_number(env, "DOMAINCHAT_MAX_UPLOAD_FILES", DEFAULTS.max_upload_files),
        admin_password=env.get("DOMAINCHAT_ADMIN_PASSWORD") or None,  # as typed: spaces may be part of it
        on_space=bool(env.get("SPACE_ID")),
    )

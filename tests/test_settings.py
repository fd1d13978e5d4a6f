from __future__ import annotations

from pathlib import Path

import pytest

from domainchat.errors import ConfigError
from domainchat.settings import BUNDLED, SPACE_BASE_MODEL, load_settings


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path)})
    assert settings.home == tmp_path
    assert settings.base_model == BUNDLED and settings.quant == "nf4"
    assert settings.chroma_url is None and settings.llm_url is None
    assert settings.model_cache_dir == tmp_path / "models"


def test_home_defaults_to_user_folder() -> None:
    assert load_settings({}).home == Path("~/.domainchat").expanduser()


def test_space_defaults_to_the_hub_model() -> None:
    assert load_settings({"SPACE_ID": "someone/domainchat"}).base_model == SPACE_BASE_MODEL


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("DOMAINCHAT_QUANT", "fp8", "DOMAINCHAT_QUANT='fp8' is not supported"),
        ("DOMAINCHAT_DECODER", "fast", "DOMAINCHAT_DECODER='fast' is not supported: use one of lean, transformers"),
        ("DOMAINCHAT_CHROMA_URL", "localhost:8000", "DOMAINCHAT_CHROMA_URL"),
        ("DOMAINCHAT_LLM_URL", "ftp://x", "DOMAINCHAT_LLM_URL"),
        ("DOMAINCHAT_THREADS", "two", "DOMAINCHAT_THREADS"),
        ("DOMAINCHAT_THREADS", "0", "DOMAINCHAT_THREADS"),
        ("DOMAINCHAT_MAX_ACTIVE", "0", "DOMAINCHAT_MAX_ACTIVE=0 must be at least 1"),
        ("DOMAINCHAT_MAX_WAITING", "-1", "DOMAINCHAT_MAX_WAITING"),
        ("DOMAINCHAT_MAX_NEW_TOKENS", "lots", "DOMAINCHAT_MAX_NEW_TOKENS='lots' must be an integer"),
        ("DOMAINCHAT_PROMPT_TOKENS", "100", "DOMAINCHAT_PROMPT_TOKENS=100 must be at least 256"),
        ("DOMAINCHAT_LLM_TIMEOUT", "soon", "DOMAINCHAT_LLM_TIMEOUT='soon' must be a number"),
        ("DOMAINCHAT_MAX_UPLOAD_FILES", "0", "DOMAINCHAT_MAX_UPLOAD_FILES"),
        ("DOMAINCHAT_EMBED_MODEL", "/no/such/folder", "DOMAINCHAT_EMBED_MODEL='/no/such/folder' is neither a folder"),
        ("DOMAINCHAT_EMBED_MODEL", "my model", "DOMAINCHAT_EMBED_MODEL='my model' is neither a folder nor"),
    ],
)
def test_bad_values_name_the_variable(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({key: value})


def test_quant_is_case_insensitive() -> None:
    assert load_settings({"DOMAINCHAT_QUANT": "INT8"}).quant == "int8"


def test_serving_limits_are_read_from_the_environment() -> None:
    settings = load_settings({"DOMAINCHAT_MAX_ACTIVE": "2", "DOMAINCHAT_MAX_WAITING": "0",
                              "DOMAINCHAT_MAX_NEW_TOKENS": "64", "DOMAINCHAT_PROMPT_TOKENS": "1024",
                              "DOMAINCHAT_LLM_TIMEOUT": "2.5", "DOMAINCHAT_MAX_UPLOAD_FILES": "3"})
    assert (settings.max_active, settings.max_waiting, settings.max_new_tokens) == (2, 0, 64)
    assert (settings.prompt_tokens, settings.llm_timeout_s, settings.max_upload_files) == (1024, 2.5, 3)


def test_knowledge_editing_needs_a_password_on_a_space() -> None:
    assert load_settings({"DOMAINCHAT_HOME": "/tmp/x"}).knowledge_editing == "open"
    assert load_settings({"DOMAINCHAT_HOME": "/tmp/x", "SPACE_ID": "me/app"}).knowledge_editing == "off"
    password = {"DOMAINCHAT_ADMIN_PASSWORD": " s3cret "}
    for env in (password, {**password, "SPACE_ID": "a/b"}):
        settings = load_settings({"DOMAINCHAT_HOME": "/tmp/x", **env})
        assert settings.knowledge_editing == "password"
        assert settings.admin_password == " s3cret " and "s3cret" not in repr(settings)


def test_embedding_model_is_bundled_a_folder_or_a_hub_id(tmp_path: Path) -> None:
    assert load_settings({}).embed_model == BUNDLED
    assert load_settings({"DOMAINCHAT_EMBED_MODEL": str(tmp_path)}).embed_model == str(tmp_path)
    assert load_settings({"DOMAINCHAT_EMBED_MODEL": " BAAI/bge-small-en-v1.5 "}).embed_model == "BAAI/bge-small-en-v1.5"

"""Base model: the bundled GGUF converted once into a cached checkpoint, and clear messages when a
configured model cannot be found."""

from __future__ import annotations

from pathlib import Path

import pytest

from domainchat.base_model import resolve_base
from domainchat.errors import ModelUnavailable
from domainchat.settings import Settings, load_settings

pytestmark = pytest.mark.slow


def test_conversion_cache_is_reused(settings: Settings, base_checkpoint: Path) -> None:
    def must_not_convert(gguf: Path, target: Path) -> None:
        raise AssertionError("the cached checkpoint should have been reused")

    assert resolve_base(settings, convert=must_not_convert) == str(base_checkpoint)
    assert (base_checkpoint / "config.json").is_file()
    assert not list(base_checkpoint.parent.glob(".tmp-*")), "no temporary folder is left behind"


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path) -> None:
    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path)})

    def interrupted(gguf: Path, target: Path) -> None:
        tmp = target.parent / f".tmp-{target.name}-1"
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        resolve_base(settings, convert=interrupted)
    cached = [p for p in settings.model_cache_dir.iterdir() if not p.name.startswith(".tmp-")]
    assert cached == [], "an interrupted conversion must not look like a finished cache"


def test_missing_local_model_says_what_to_do(tmp_path: Path) -> None:
    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path), "DOMAINCHAT_BASE_MODEL": str(tmp_path)})
    with pytest.raises(ModelUnavailable, match="config.json"):
        resolve_base(settings)

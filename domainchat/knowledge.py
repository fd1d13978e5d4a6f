"""Knowledge: each domain's document store — ingest (stable ids, upsert, delete, folder sync) and
hybrid search returning `Passage`s.

One Chroma collection per domain: an embedded PersistentClient under DOMAINCHAT_HOME, or a Chroma
server when DOMAINCHAT_CHROMA_URL is set; writes go through LangChain (`langchain_chroma.Chroma`),
reads through the collection. Vectors come from `embeddings` (DOMAINCHAT_EMBED_MODEL, the bundled
all-MiniLM-L6-v2 by default), loaded on first use. Each collection records the model it was built
with, and a store refuses to be searched or written with another model (the vectors would not be
comparable); a collection without the record was built with the bundled MiniLM.
Search fuses the vector ranking with a BM25 ranking by reciprocal rank fusion; a passage's `score`
is its cosine similarity to the question, which is what a domain's minimum score is compared with.

Re-ingesting an unchanged file adds nothing, a changed file replaces its chunks, and the startup
sync of `knowledge/<id>/` removes the chunks of files that are gone. Every chunk records its
document's `origin`, when the document was `added` (ISO-8601 UTC) and how many instruction-like
passages screening neutralized in it (`screened`); `KnowledgeStore.documents` lists a domain's
documents from them.

State that every process sharing a store must see lives in the collection's own metadata, which
the embedded store and a Chroma server both keep (not in a file, which a second front of a shared
server would not see, nor in marker records, which every count, search and BM25 build would have
to step around): a version marker replaced on every write, which each process compares per
question with the one its BM25 index was built at, rebuilding the index when another process (or
this one) changed the documents; and the documents someone removed, which the startup sync does
not bring back until someone ingests them again. Chunk writes go through
LangChain (`langchain_chroma.Chroma`); reads, metadata-only updates and the collection's metadata
through the collection.

Files become chunks in `documents`; BM25 lives in `lexical`. This module knows nothing about
models, prompts or domains beyond their ids.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domainchat.documents import expand, file_chunks
from domainchat.embeddings import (
    BUNDLED_EMBEDDING_MODEL,
    SentenceEmbeddings,
    as_langchain_embeddings,
    embedding_identity,
)
from domainchat.errors import BadInput, ConfigError, EmbeddingMismatch, StoreInUse
from domainchat.lexical import LexicalIndex
from domainchat.settings import BUNDLED

LOCK_FILE = "domainchat.lock"
CANDIDATES = 24  # per ranking, before fusion
MAX_PER_SOURCE = 2  # passages from one file in one answer
# In a conversation, the rankings of the question alone count a quarter as much as those of the
# question after the previous one: on 10 follow-ups ("How is it treated?") and 8 changes of subject
# across the four domains, 0.25 found 9 and kept all 8 on topic; 0 (the joined query alone) lost 4
# of the 8 changes of subject, and 1 (equal weight) found only 7 follow-ups.
QUESTION_ALONE_WEIGHT = 0.25
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al.)
COLLECTION_PREFIX = "domainchat-"
COLLECTION_METADATA = {"hnsw:space": "cosine"}  # normalized embeddings: distance = 1 - similarity
EMBEDDING_MODEL_KEY = "domainchat:embedding_model"  # in a collection's metadata: the model it was built with
ORIGIN_KNOWLEDGE = "knowledge"  # synced from knowledge/<id>/; removed when the file is removed
# Keys of a collection's own metadata (chunks have theirs). Chroma's `modify` replaces the whole
# metadata, so each write reads it, changes these keys and writes it back (`_commit`).
VERSION_KEY = "domainchat:version"  # a new random value on every write to the collection
REMOVED_PREFIX = "domainchat:removed:"  # + source -> when someone removed that document

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from langchain_chroma import Chroma
    from langchain_core.retrievers import BaseRetriever

Progress = Callable[[int, int, str], None]  # (files done, files total, current file)


@dataclass(frozen=True)
class Passage:
    id: str  # stable chunk id: "<source>:<chunk>:<hash>"
    source: str  # file name relative to the folder it was ingested from
    title: str
    score: float  # cosine similarity to the question, 0..1
    text: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class IngestReport:
    domain: str
    files: int = 0
    chunks_added: int = 0
    chunks_unchanged: int = 0
    chunks_removed: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)  # {"file", "error"}
    # {"file", "findings"}: instruction-like text was neutralized
    flagged: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StoredDocument:
    """One document of a domain's knowledge base, as its chunks record it."""

    source: str
    origin: str | None  # "knowledge" (the startup sync), "cli", "upload", ...
    chunks: int
    added: str | None  # ISO-8601 UTC, when its chunks were first written or last replaced; None if never recorded
    flagged: bool  # screening neutralized instruction-like text in it

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RemoveReport:
    domain: str
    removed: list[str] = field(default_factory=list)  # sources whose chunks were deleted
    chunks_removed: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)  # {"source", "error"}

    def to_json(self) -> dict:
        return asdict(self)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the store


def chroma_client(home: Path, chroma_url: str | None) -> ClientAPI:
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if chroma_url:
        from urllib.parse import urlparse

        url = urlparse(chroma_url)
        try:
            return chromadb.HttpClient(host=url.hostname or "localhost",
                                       port=url.port or (443 if url.scheme == "https" else 8000),
                                       ssl=url.scheme == "https", settings=chroma_settings)
        except Exception as exc:  # connection refused, DNS, TLS: chromadb raises several types
            raise ConfigError(f"DOMAINCHAT_CHROMA_URL={chroma_url}: cannot reach the Chroma server ({exc}); "
                              "start it (`chroma run --path DIR --port P`) or unset the variable.") from None
    path = home / "chroma"
    path.mkdir(parents=True, exist_ok=True)
    _lock_store(path)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)


_HELD_STORE_LOCKS: dict[Path, int] = {}  # store folder -> lock file descriptor, held for the process's life


def _lock_store(path: Path) -> None:
    """Claim the embedded store for this process, or fail fast. Chroma's embedded client assumes one
    process per folder: a second one (a CLI ingest beside the running app) would contend for its
    SQLite database and vector index files. POSIX locks are per process, so this process may
    open the store again; the kernel releases the lock when the process dies, even by SIGKILL."""
    import fcntl
    import os

    key = path.resolve()
    if key in _HELD_STORE_LOCKS:
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "?"
        os.close(fd)
        raise StoreInUse(f"The knowledge store {key} is in use by another domainchat process (pid {holder}). Stop "
                         "that process first (for example the running app), or share the store between processes "
                         "with a Chroma server (DOMAINCHAT_CHROMA_URL).") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    _HELD_STORE_LOCKS[key] = fd


class KnowledgeStore:
    """All domains' collections in one Chroma client. Thread-safe: writes take a lock."""

    def __init__(self, client: ClientAPI, embeddings: SentenceEmbeddings | None = None,
                 embed_model: str = BUNDLED) -> None:
        """`embeddings`, when given, is `embed_model` already loaded (or a stand-in for it in tests)."""
        self.client = client
        self.embed_model = embed_model
        self._embeddings = embeddings
        # What a collection this store creates starts with; `_metadata(domain)` reads a collection's own.
        self._new_collection_metadata = {**COLLECTION_METADATA, EMBEDDING_MODEL_KEY: embedding_identity(embed_model)}
        self._stores: dict[str, Chroma] = {}
        self._collections: dict[str, Collection] = {}
        self._lexical: dict[str, tuple[str | None, LexicalIndex]] = {}  # domain -> (version built at, index)
        self._lock = threading.RLock()

    @classmethod
    def open(cls, home: Path, chroma_url: str | None = None, embeddings: SentenceEmbeddings | None = None,
             embed_model: str = BUNDLED) -> KnowledgeStore:
        return cls(chroma_client(home, chroma_url), embeddings, embed_model)

    @property
    def embeddings(self) -> SentenceEmbeddings:
        with self._lock:
            if self._embeddings is None:
                self._embeddings = SentenceEmbeddings(self.embed_model)
            return self._embeddings

    def _vectorstore(self, domain_id: str) -> Chroma:
        """The domain's collection as a LangChain vector store, which embeds what it adds."""
        with self._lock:
            if domain_id not in self._stores:
                from langchain_chroma import Chroma

                self._collection(domain_id)  # creates it with, or checks, the embedding model's record
                self._stores[domain_id] = Chroma(
                    collection_name=COLLECTION_PREFIX + domain_id,
                    embedding_function=as_langchain_embeddings(lambda: self.embeddings),
                    client=self.client,
                    collection_metadata=self._new_collection_metadata,
                )
            return self._stores[domain_id]

    def _collection(self, domain_id: str) -> Collection:
        """The domain's Chroma collection, for reading (created on first use, as LangChain would,
        recording the embedding model); EmbeddingMismatch when it was built with another model."""
        with self._lock:
            if domain_id not in self._collections:
                # No embedding function: queries pass our model's vectors, never text for Chroma to embed.
                # An existing collection keeps its own metadata, so the record read back is its builder's.
                collection = self.client.get_or_create_collection(
                    name=COLLECTION_PREFIX + domain_id, metadata=self._new_collection_metadata,
                    embedding_function=None)
                built_with = (collection.metadata or {}).get(EMBEDDING_MODEL_KEY, BUNDLED_EMBEDDING_MODEL)
                if built_with != self._new_collection_metadata[EMBEDDING_MODEL_KEY]:
                    raise EmbeddingMismatch(self._mismatch(domain_id, built_with))
                self._collections[domain_id] = collection
            return self._collections[domain_id]

    def _mismatch(self, domain_id: str, built_with: str) -> str:
        back = ("unset it (the bundled MiniLM)" if built_with == BUNDLED_EMBEDDING_MODEL
                else f"set it back to the model '{built_with}'")
        wanted = self._new_collection_metadata[EMBEDDING_MODEL_KEY]
        return (f"The '{domain_id}' knowledge base was built with the embedding model '{built_with}', but "
                f"DOMAINCHAT_EMBED_MODEL names '{wanted}': their vectors cannot be "
                f"compared. Either {back}, or keep the new model and ingest the documents again into a fresh "
                "store (a new DOMAINCHAT_HOME, or a new Chroma server for DOMAINCHAT_CHROMA_URL).")

    def count(self, domain_id: str) -> int:
        return self._collection(domain_id).count()

    def sources(self, domain_id: str) -> dict[str, dict[str, Any]]:
        """source -> {"file_hash", "origin", "ids", "added", "flagged"} for every file stored in the
        domain. Chunks stored before `added` was recorded give None; before screening, not flagged."""
        stored = self._collection(domain_id).get(include=["metadatas"])
        files: dict[str, dict[str, Any]] = {}
        for chunk_id, meta in zip(stored["ids"], stored["metadatas"], strict=True):
            entry = files.setdefault(meta["source"], {"file_hash": set(), "origin": meta.get("origin"), "ids": [],
                                                      "added": None, "flagged": False})
            entry["file_hash"].add(meta.get("file_hash"))
            entry["ids"].append(chunk_id)
            added = meta.get("added")
            if added and (entry["added"] is None or added > entry["added"]):  # ISO-8601 UTC sorts as text
                entry["added"] = added
            entry["flagged"] = entry["flagged"] or bool(meta.get("screened"))
        return files

    def documents(self, domain_id: str) -> list[StoredDocument]:
        """The domain's documents, by source."""
        return [StoredDocument(source=source, origin=entry["origin"], chunks=len(entry["ids"]), added=entry["added"],
                               flagged=entry["flagged"])
                for source, entry in sorted(self.sources(domain_id).items())]

    def removed(self, domain_id: str) -> dict[str, str]:
        """source -> when it was removed, for the documents someone removed and nobody ingested again
        (the startup sync leaves them out)."""
        return {key[len(REMOVED_PREFIX):]: when for key, when in self._metadata(domain_id).items()
                if key.startswith(REMOVED_PREFIX)}

    def _metadata(self, domain_id: str) -> dict[str, Any]:
        """The collection's metadata as stored now (the cached Collection's copy may be another process's past)."""
        self._collection(domain_id)  # created on first use
        return self.client.get_collection(COLLECTION_PREFIX + domain_id, embedding_function=None).metadata or {}

    def _commit(self, domain_id: str, *, changed: bool, removed: Iterable[str] = (),
                revived: Iterable[str] = ()) -> None:
        """Record a write in the collection's metadata, where every process sharing the store sees it: a
        new version marker, documents removed (kept out of the startup sync) and revived (ingested again).
        Two processes committing at the same moment can lose one's tombstone (Chroma has no
        compare-and-set); the version marker survives either way, since both values are new."""
        with self._lock:
            current = self._metadata(domain_id)
            # Chroma refuses `hnsw:` keys in a modify (the distance lives in the collection's configuration).
            metadata = {key: value for key, value in current.items() if not key.startswith("hnsw:")}
            for source in revived:
                changed = metadata.pop(REMOVED_PREFIX + source, None) is not None or changed
            when = _utc_now()
            for source in removed:
                metadata[REMOVED_PREFIX + source] = when
                changed = True
            if not changed:
                return
            metadata[VERSION_KEY] = uuid.uuid4().hex
            self._collection(domain_id).modify(metadata=metadata)

    # -- writing -------------------------------------------------------------------------------

    def ingest(self, domain_id: str, paths: Sequence[Path], *, origin: str = "cli",
               progress: Progress | None = None) -> IngestReport:
        """Ingest files and folders into a domain. Each file is all-or-nothing: a bad file is
        reported and skipped, and nothing already stored is lost or duplicated. Ingesting a removed
        document is asking for it back: the startup sync keeps it again."""
        files, errors = expand(paths)
        return self._ingest_files(domain_id, files, errors, origin, progress, revive=True)

    def _ingest_files(self, domain_id: str, files: list[tuple[Path, str]], errors: list[dict[str, str]],
                      origin: str, progress: Progress | None, *, revive: bool) -> IngestReport:
        report = IngestReport(domain=domain_id, errors=list(errors))
        with self._lock:
            store = self._vectorstore(domain_id)
            existing = self.sources(domain_id)
            changed = False
            ingested: list[str] = []
            for done, (path, source) in enumerate(files):
                if progress:
                    progress(done, len(files), source)
                try:
                    chunks = file_chunks(path, source, origin)
                except BadInput as exc:
                    report.errors.append({"file": source, "error": str(exc)})
                    continue
                except OSError as exc:
                    report.errors.append({"file": source, "error": f"{source}: cannot be read ({exc.strerror})."})
                    continue
                report.files += 1
                ingested.append(source)
                if chunks and chunks[0].metadata["screened"]:
                    report.flagged.append({"file": source, "findings": chunks[0].metadata["screened"]})
                entry = existing.get(source)
                old_ids = set(entry["ids"]) if entry else set()
                added = _utc_now()  # one time for all of the file's chunks
                metadatas = {c.id: {**c.metadata, "added": added} for c in chunks}
                new = [c for c in chunks if c.id not in old_ids]
                kept = [c.id for c in chunks if c.id in old_ids]
                stale = sorted(old_ids - {c.id for c in chunks})
                # A changed file's unchanged chunks take its new hash and time, so that they tell the
                # file's current version (the startup sync compares the hash) and when it was replaced.
                replaced = entry is not None and entry["file_hash"] != {c.metadata["file_hash"] for c in chunks}
                report.chunks_unchanged += len(kept)
                if new:
                    # Add before deleting: an interrupted ingest leaves the old version, never none.
                    store.add_texts([c.text for c in new], metadatas=[metadatas[c.id] for c in new],
                                    ids=[c.id for c in new])
                    report.chunks_added += len(new)
                if replaced and kept:
                    self._collection(domain_id).update(ids=kept, metadatas=[metadatas[i] for i in kept])
                if stale:
                    store.delete(ids=stale)
                    report.chunks_removed += len(stale)
                changed = changed or bool(new or stale or replaced)
            if progress:
                progress(len(files), len(files), "")
            self._commit(domain_id, changed=changed, revived=ingested if revive else ())
        return report

    def _delete(self, domain_id: str, stored: dict[str, dict[str, Any]], sources: Iterable[str]) -> int:
        """Delete the chunks of these stored sources; the number deleted. The caller commits."""
        ids = [i for s in sources for i in stored.get(s, {}).get("ids", [])]
        if ids:
            self._vectorstore(domain_id).delete(ids=ids)
        return len(ids)

    def remove_documents(self, domain_id: str, sources: Iterable[str]) -> RemoveReport:
        """Delete these documents' chunks, and nothing else. A source the domain does not have is an
        error naming it; the others are still removed. A removed document stays out of the startup
        sync of `knowledge/<id>/` until someone ingests it again."""
        report = RemoveReport(domain=domain_id)
        with self._lock:
            stored = self.sources(domain_id)
            for source in dict.fromkeys(sources):  # each once, in the order given
                if source in stored:
                    report.removed.append(source)
                else:
                    report.errors.append({"source": source, "error": (
                        f"'{source}' is not in the '{domain_id}' knowledge base (never ingested, or already "
                        f"removed); `domainchat docs --domain {domain_id}` lists its documents.")})
            report.chunks_removed = self._delete(domain_id, stored, report.removed)
            self._commit(domain_id, changed=bool(report.removed), removed=report.removed)
        return report

    def sync_folder(self, domain_id: str, folder: Path, progress: Progress | None = None) -> IngestReport:
        """Make the domain's `knowledge` chunks match `folder`: ingest new and changed files, remove
        the chunks of files that are gone. Unchanged files are recognised by their sha256 alone;
        files someone removed from the store (`remove_documents`) are left out."""
        with self._lock:
            stored = self.sources(domain_id)
            removed = self.removed(domain_id)
            files, errors = expand([folder]) if folder.is_dir() else ([], [])
            files = [(path, source) for path, source in files if source not in removed]
            todo = []
            for path, source in files:
                entry = stored.get(source)
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if entry is None or entry["file_hash"] != {digest}:
                    todo.append((path, source))
            report = self._ingest_files(domain_id, todo, errors, ORIGIN_KNOWLEDGE, progress, revive=False)
            report.chunks_unchanged += sum(len(stored[s]["ids"]) for p, s in files
                                           if (p, s) not in todo and s in stored)
            present = {source for _, source in files}
            gone = [s for s, e in stored.items() if e["origin"] == ORIGIN_KNOWLEDGE and s not in present]
            deleted = self._delete(domain_id, stored, gone)
            self._commit(domain_id, changed=bool(deleted))
            report.chunks_removed += deleted
            return report

    # -- reading -------------------------------------------------------------------------------

    def _lexical_index(self, domain_id: str) -> LexicalIndex:
        """The domain's BM25 index, rebuilt when the collection's version marker says that any process
        sharing the store wrote to it since the index was built. The marker is read before the
        documents, so a write landing during a rebuild makes the next question rebuild again."""
        version = self._metadata(domain_id).get(VERSION_KEY)
        with self._lock:
            cached = self._lexical.get(domain_id)
            if cached is None or cached[0] != version:
                stored = self._collection(domain_id).get(include=["documents"])
                cached = (version, LexicalIndex(stored["ids"], stored["documents"]))
                self._lexical[domain_id] = cached
            return cached[1]

    def search(self, domain_id: str, question: str, k: int, context: str | None = None) -> list[Passage]:
        """The k best passages for the question: vector and BM25 rankings fused by reciprocal rank.
        With `context` (the previous question of a conversation), the question preceded by it is
        ranked both ways too, and all four rankings are fused, the question's own at a lower weight:
        a follow-up such as "Can I cancel it later?" then finds what "it" was, while a question that
        changes the subject still finds its own passages. A passage's score is its best similarity
        to either query."""
        import numpy as np

        collection = self._collection(domain_id)
        total = collection.count()
        if total == 0:
            return []
        queries = [question] if not context else [question, f"{context} {question}"]
        vectors = [self.embeddings.embed_query(text) for text in queries]
        similarity: dict[str, float] = {}
        records: dict[str, tuple[str, dict]] = {}
        rankings: list[list[str]] = []
        lexical = self._lexical_index(domain_id)
        for text, vector in zip(queries, vectors, strict=True):
            found = collection.query(query_embeddings=[vector], n_results=min(CANDIDATES, total),
                                     include=["documents", "metadatas", "distances"])
            for chunk_id, doc, meta, distance in zip(found["ids"][0], found["documents"][0], found["metadatas"][0],
                                                     found["distances"][0], strict=True):
                records[chunk_id] = (doc, meta)
                similarity[chunk_id] = max(similarity.get(chunk_id, -1.0), 1.0 - distance)
            rankings.append(list(found["ids"][0]))
            rankings.append(lexical.top(text, CANDIDATES))

        weights = [1.0, 1.0] if len(rankings) == 2 else [QUESTION_ALONE_WEIGHT] * 2 + [1.0, 1.0]
        fused: dict[str, float] = {}
        for ranking, weight in zip(rankings, weights, strict=True):
            for rank, chunk_id in enumerate(ranking):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + weight / (RRF_K + rank + 1)
        top = self._diverse(sorted(fused, key=fused.get, reverse=True), records, k)
        missing = [i for i in top if i not in records]
        if missing:  # found by BM25 only: fetch them and measure their similarity too
            extra = collection.get(ids=missing, include=["documents", "metadatas", "embeddings"])
            rows = zip(extra["ids"], extra["documents"], extra["metadatas"], extra["embeddings"], strict=True)
            for chunk_id, doc, meta, emb in rows:
                records[chunk_id] = (doc, meta)
                similarity[chunk_id] = max(float(np.dot(np.asarray(emb), np.asarray(v))) for v in vectors)
        passages = []
        for chunk_id in top:
            if chunk_id not in records:  # deleted between the BM25 build and now
                continue
            text, meta = records[chunk_id]
            passages.append(Passage(id=chunk_id, source=meta["source"], title=meta.get("title") or meta["source"],
                                    score=round(max(0.0, min(1.0, similarity[chunk_id])), 4), text=text))
        return passages

    @staticmethod
    def _diverse(ranked: list[str], records: dict[str, tuple[str, dict]], k: int) -> list[str]:
        """The first k ids, with at most MAX_PER_SOURCE from one file, so that one long document
        cannot crowd out the others (ids are "<source>:<chunk>:<hash>")."""
        chosen: list[str] = []
        per_source: dict[str, int] = {}
        for chunk_id in ranked:
            source = records[chunk_id][1]["source"] if chunk_id in records else chunk_id.rsplit(":", 2)[0]
            if per_source.get(source, 0) < MAX_PER_SOURCE:
                chosen.append(chunk_id)
                per_source[source] = per_source.get(source, 0) + 1
            if len(chosen) == k:
                break
        return chosen

    def passages_of(self, domain_id: str, source: str) -> list[Passage]:
        """Every stored chunk of one file, as passages with score 0 (no question to compare with);
        empty when the domain has no such file."""
        stored = self._collection(domain_id).get(where={"source": source}, include=["documents", "metadatas"])
        return [Passage(id=chunk_id, source=source, title=meta.get("title") or source, score=0.0, text=text)
                for chunk_id, text, meta in zip(stored["ids"], stored["documents"], stored["metadatas"], strict=True)]

    def passages_by_id(self, domain_id: str, ids: Sequence[str]) -> list[Passage]:
        """The stored chunks with these ids, in the order asked, as passages with score 0; an id
        the domain no longer has (its document removed or changed since) is left out."""
        if not ids:
            return []
        stored = self._collection(domain_id).get(ids=list(ids), include=["documents", "metadatas"])
        found = {chunk_id: Passage(id=chunk_id, source=meta["source"], title=meta.get("title") or meta["source"],
                                   score=0.0, text=text)
                 for chunk_id, text, meta in zip(stored["ids"], stored["documents"], stored["metadatas"], strict=True)}
        return [found[chunk_id] for chunk_id in ids if chunk_id in found]

    def retriever(self, domain_id: str, k: int = 4) -> BaseRetriever:
        """A LangChain retriever over the domain's hybrid search, to compose with LangChain chains."""
        from langchain_core.callbacks import CallbackManagerForRetrieverRun
        from langchain_core.documents import Document
        from langchain_core.retrievers import BaseRetriever

        store = self

        class HybridRetriever(BaseRetriever):
            def _get_relevant_documents(self, query: str, *,
                                        run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
                return [Document(page_content=p.text, id=p.id,
                                 metadata={"source": p.source, "title": p.title, "score": p.score})
                        for p in store.search(domain_id, query, k)]

        return HybridRetriever()

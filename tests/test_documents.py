"""Document tests: loading, splitting and chunk ids of real files, without a store or embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import minimal_pdf

from domainchat import documents
from domainchat.errors import BadInput

ROTH = """# Roth IRA basics

## Roth IRA contributions
A Roth IRA is funded with money that has already been taxed. In 2025 the contribution limit is $7,000.

## Roth IRA withdrawals
Qualified withdrawals are tax-free after age 59 and a half, once the account is five years old.
"""


def write(folder: Path, name: str, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def zip_bomb() -> bytes:
    """A zip archive whose one member inflates 1,000-fold (50 MB of zeros in ~50 KB)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("report.pdf", b"\0" * 50_000_000)
    return buffer.getvalue()


# (file name, content, what its error says): every one is refused by `load_file`.
BAD_FILES = [
    ("slides.pptx", b"PK\x03\x04", "unsupported file type"),
    ("empty.md", b"", "no text found"),
    ("latin1.txt", "café crème".encode("latin-1"), "not UTF-8"),
    ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "not a readable PDF"),
    ("binary.md", b"\x00\x01\x02ELF\x00\x00", "binary"),
    ("blank.pdf", minimal_pdf(""), "no text found"),
    ("bomb.pdf", zip_bomb(), "not a readable PDF"),
    ("noise.md", bytes(range(128, 256)) * 64, "not UTF-8"),
]


def test_every_format_loads_with_a_title(tmp_path: Path) -> None:
    html = write(tmp_path, "page.html", "<html><head><title>Credit scores</title><script>evil()</script></head><body>"
                                        "<h1>Credit scores</h1><p>FICO scores range from 300 to 850.</p></body></html>")
    kind, title, text = documents.load_file(html)
    assert (kind, title) == ("html", "Credit scores") and "300 to 850" in text and "evil()" not in text
    assert documents.load_file(write(tmp_path, "roth.md", ROTH))[:2] == ("markdown", "Roth IRA basics")
    pdf = documents.load_file(write(tmp_path, "apr.pdf", minimal_pdf("APR is the annual percentage rate of a loan.")))
    assert pdf[0] == "pdf" and "annual percentage rate" in pdf[2]
    # A file without a title of its own is named after the file.
    assert documents.load_file(write(tmp_path, "compound_interest.txt", "Interest on interest."))[:2] == (
        "text", "compound interest")


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES)
def test_bad_files_are_refused_with_a_clear_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        documents.load_file(write(tmp_path, name, content))


def test_markdown_is_split_at_headings_and_headings_travel_with_their_chunk(tmp_path: Path) -> None:
    chunks = documents.file_chunks(write(tmp_path, "roth.md", ROTH), "roth.md", "cli")
    assert [c.metadata["heading"] for c in chunks] == ["Roth IRA basics > Roth IRA contributions",
                                                       "Roth IRA basics > Roth IRA withdrawals"]
    assert chunks[1].text.startswith("Roth IRA basics > Roth IRA withdrawals\nQualified withdrawals")
    assert [c.id.rsplit(":", 1)[0] for c in chunks] == ["roth.md:0", "roth.md:1"]
    assert {c.metadata["origin"] for c in chunks} == {"cli"} and chunks[0].metadata["title"] == "Roth IRA basics"


def test_chunk_ids_change_only_with_their_chunk(tmp_path: Path) -> None:
    path = write(tmp_path, "roth.md", ROTH)
    before = documents.file_chunks(path, "roth.md", "cli")
    assert [c.id for c in documents.file_chunks(path, "roth.md", "cli")] == [c.id for c in before]
    write(tmp_path, "roth.md", ROTH.replace("$7,000", "$7,500"))
    after = documents.file_chunks(path, "roth.md", "cli")
    assert after[0].id != before[0].id and after[1].id == before[1].id
    assert after[0].metadata["file_hash"] != before[0].metadata["file_hash"]


def test_file_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "MAX_FILE_BYTES", 1024)
    with pytest.raises(BadInput, match="is over the 1.0 KB limit; split it"):
        documents.load_file(write(tmp_path, "big.md", "# Big\n\n" + "word " * 400))


def test_too_many_files_in_one_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "MAX_FILES_PER_INGEST", 3)
    folder = tmp_path / "many"
    for i in range(5):
        write(folder, f"note{i}.txt", f"Note number {i} about savings.")
    files, errors = documents.expand([folder])
    assert len(files) == 3 and len(errors) == 2
    assert all("at most 3 files" in e["error"] for e in errors)


def test_a_folder_expands_to_its_supported_files_named_relative_to_it(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    write(folder / "sub", "roth.md", ROTH)
    write(folder, "notes.txt", "Savings.")
    write(folder, ".hidden.md", "# Hidden")
    write(folder, "slides.pptx", b"PK\x03\x04")
    files, errors = documents.expand([folder, tmp_path / "absent.md"])
    assert [source for _, source in files] == ["notes.txt", "sub/roth.md"]
    assert [e["file"] for e in errors] == [str(tmp_path / "absent.md")] and "no such file" in errors[0]["error"]


def test_a_huge_single_line_is_split_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = "interest " * 20_000  # 180 KB without a newline
    write(tmp_path, "line.txt", line)
    monkeypatch.setattr(documents, "MAX_CHUNKS_PER_FILE", 50)
    with pytest.raises(BadInput, match="chunks is over the 50 limit; split the file"):
        documents.file_chunks(tmp_path / "line.txt", "line.txt", "cli")
    monkeypatch.setattr(documents, "MAX_CHUNKS_PER_FILE", 1000)
    chunks = documents.file_chunks(tmp_path / "line.txt", "line.txt", "cli")
    assert all(len(c.text) <= documents.CHUNK_CHARS + 40 for c in chunks)

"""Knowledge store tests: real Chroma (embedded), real MiniLM embeddings, tiny documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import free_port, minimal_pdf, wait_for_http
from domainchat import knowledge
from domainchat.knowledge import KnowledgeStore

ROTH = """# Roth IRA basics

## Roth IRA contributions
A Roth IRA is funded with money that has already been taxed. In 2025 the contribution limit is $7,000.

## Roth IRA withdrawals
Qualified withdrawals are tax-free after age 59 and a half, once the account is five years old.
"""
BUDGET = """# Budgeting

## The 50/30/20 rule
Spend 50% of take-home pay on needs, 30% on wants and put 20% toward savings and debt.
"""


def write(folder: Path, name: str, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def stored_ids(store: KnowledgeStore, domain: str) -> list[str]:
    return sorted(store.vectorstore(domain).get()["ids"])


def test_ingest_all_formats_with_stable_ids(store: KnowledgeStore, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write(docs, "roth.md", ROTH)
    write(docs, "notes.txt", "Compound interest means earning interest on interest.")
    write(docs, "page.html", "<html><head><title>Credit scores</title><script>evil()</script></head>"
                             "<body><h1>Credit scores</h1><p>FICO scores range from 300 to 850.</p></body></html>")
    write(docs, "apr.pdf", minimal_pdf("APR is the annual percentage rate of a loan."))
    report = store.ingest("finance", [docs])
    assert report.errors == [] and report.files == 4 and report.chunks_added >= 5
    ids = stored_ids(store, "finance")
    assert any(i.startswith("roth.md:0:") for i in ids) and any(i.startswith("apr.pdf:0:") for i in ids)
    texts = " ".join(store.vectorstore("finance").get()["documents"])
    assert "evil()" not in texts and "300 to 850" in texts and "annual percentage rate" in texts
    # Headings travel with the chunk: a section is found by its subject.
    assert any("Roth IRA withdrawals" in t for t in store.vectorstore("finance").get()["documents"])

    again = store.ingest("finance", [docs])
    assert (again.chunks_added, again.chunks_removed, again.chunks_unchanged) == (0, 0, report.chunks_added)
    assert stored_ids(store, "finance") == ids


def test_changed_file_replaces_only_its_changed_chunks(store: KnowledgeStore, tmp_path: Path) -> None:
    path = write(tmp_path, "roth.md", ROTH)
    first = store.ingest("finance", [path])
    write(tmp_path, "roth.md", ROTH.replace("$7,000", "$7,500"))
    second = store.ingest("finance", [path])
    assert second.chunks_added == 1 and second.chunks_removed == 1
    assert second.chunks_unchanged == first.chunks_added - 1
    assert store.count("finance") == first.chunks_added
    assert "$7,500" in store.search("finance", "Roth IRA contribution limit", 1)[0].text


def test_sync_folder_adds_changes_and_removes(store: KnowledgeStore, tmp_path: Path) -> None:
    folder = tmp_path / "knowledge"
    write(folder, "roth.md", ROTH)
    write(folder, "budget.md", BUDGET)
    assert store.sync_folder("finance", folder).chunks_added > 0
    unchanged = store.sync_folder("finance", folder)
    assert unchanged.chunks_added == 0 and unchanged.chunks_removed == 0 and unchanged.files == 0
    (folder / "budget.md").unlink()
    removed = store.sync_folder("finance", folder)
    assert removed.chunks_removed > 0
    assert {p.source for p in store.search("finance", "50/30/20 budget rule", 4)} == {"roth.md"}


def test_uploaded_files_survive_the_folder_sync(store: KnowledgeStore, tmp_path: Path) -> None:
    store.ingest("finance", [write(tmp_path / "uploads", "budget.md", BUDGET)], origin="upload")
    store.sync_folder("finance", tmp_path / "empty-knowledge-folder")
    assert store.count("finance") > 0


def test_domains_are_isolated(store: KnowledgeStore, tmp_path: Path) -> None:
    store.ingest("finance", [write(tmp_path, "roth.md", ROTH)])
    store.ingest("legal", [write(tmp_path, "lease.md", "# Leases\n\n## Deposits\nA security deposit is returned.")])
    assert {p.source for p in store.search("legal", "Roth IRA contribution limit", 4)} == {"lease.md"}
    assert {p.source for p in store.search("finance", "security deposit", 4)} == {"roth.md"}
    assert store.search("medical", "anything", 4) == []


def test_hybrid_search_finds_exact_terms_and_scores_similarity(store: KnowledgeStore, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    write(folder, "roth.md", ROTH)
    write(folder, "budget.md", BUDGET)
    write(folder, "codes.md", "# Error codes\n\n## Code KX-4471\nThe thermostat shows KX-4471 when its C-wire is loose.")
    store.ingest("support", [folder])
    best = store.search("support", "KX-4471", 1)[0]
    assert best.source == "codes.md"
    roth = store.search("support", "How much can I put into a Roth IRA each year?", 4)
    assert roth[0].source == "roth.md" and roth[0].score > 0.4
    assert all(0 <= p.score <= 1 for p in roth)
    off_topic = store.search("support", "Who won the football world cup in 1998?", 4)
    assert max(p.score for p in off_topic) < 0.3


def test_one_file_cannot_crowd_out_the_others(store: KnowledgeStore, tmp_path: Path) -> None:
    long_doc = "# Roth\n\n" + "\n\n".join(f"## Roth IRA rule {i}\nRoth IRA detail number {i}." for i in range(8))
    store.ingest("finance", [write(tmp_path, "long.md", long_doc), write(tmp_path, "roth.md", ROTH)])
    sources = [p.source for p in store.search("finance", "Roth IRA", 4)]
    assert sources.count("long.md") <= knowledge.MAX_PER_SOURCE and "roth.md" in sources


def test_langchain_retriever_composes(store: KnowledgeStore, tmp_path: Path) -> None:
    store.ingest("finance", [write(tmp_path, "roth.md", ROTH)])
    documents = store.retriever("finance", k=2).invoke("Roth IRA withdrawals")
    assert documents and documents[0].metadata["source"] == "roth.md" and documents[0].id.startswith("roth.md:")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("slides.pptx", b"PK\x03\x04", "unsupported file type"),
        ("empty.md", b"", "no text found"),
        ("latin1.txt", "café crème".encode("latin-1"), "not UTF-8"),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "not a readable PDF"),
        ("binary.md", b"\x00\x01\x02ELF\x00\x00", "binary"),
        ("blank.pdf", minimal_pdf(""), "no text found"),
    ],
)
def test_bad_files_get_a_clear_error_and_lose_nothing(
    store: KnowledgeStore, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    good = write(tmp_path, "roth.md", ROTH)
    store.ingest("finance", [good])
    before = stored_ids(store, "finance")
    other = write(tmp_path, "budget.md", BUDGET)
    report = store.ingest("finance", [write(tmp_path, name, content), other, good])
    assert [e["file"] for e in report.errors] == [name] and message in report.errors[0]["error"]
    assert report.files == 2
    after = stored_ids(store, "finance")
    assert set(before) <= set(after) and len(after) == len(set(after))
    assert any(i.startswith("budget.md:") for i in after)


def test_file_size_limit(store: KnowledgeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knowledge, "MAX_FILE_BYTES", 1024)
    report = store.ingest("finance", [write(tmp_path, "big.md", "# Big\n\n" + "word " * 400)])
    assert report.files == 0 and "is over the 1.0 KB limit; split it" in report.errors[0]["error"]


def test_too_many_files_in_one_ingest(store: KnowledgeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knowledge, "MAX_FILES_PER_INGEST", 3)
    folder = tmp_path / "many"
    for i in range(5):
        write(folder, f"note{i}.txt", f"Note number {i} about savings.")
    report = store.ingest("finance", [folder])
    assert report.files == 3 and len(report.errors) == 2
    assert all("at most 3 files" in e["error"] for e in report.errors)


def test_missing_path(store: KnowledgeStore, tmp_path: Path) -> None:
    report = store.ingest("finance", [tmp_path / "absent.md"])
    assert report.files == 0 and "no such file" in report.errors[0]["error"]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Chroma server (`chroma run`, shipped with chromadb) on a free local port."""
    import shutil
    import subprocess

    executable = shutil.which("chroma")
    if executable is None:
        pytest.skip("the `chroma` command is not installed")
    port = free_port()
    path = tmp_path_factory.mktemp("chroma-server")
    server = subprocess.Popen([executable, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/api/v2/heartbeat", server, 60)
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_a_chroma_server_works_like_the_embedded_store(chroma_server: str, tmp_path: Path, embeddings) -> None:
    remote = KnowledgeStore.open(tmp_path / "home", chroma_server, embeddings)
    folder = tmp_path / "knowledge"
    write(folder, "roth.md", ROTH)
    write(folder, "budget.md", BUDGET)
    first = remote.sync_folder("finance", folder)
    assert first.chunks_added > 0 and remote.sync_folder("finance", folder).chunks_added == 0
    assert remote.search("finance", "Roth IRA contribution limit", 1)[0].source == "roth.md"
    (folder / "budget.md").unlink()
    assert remote.sync_folder("finance", folder).chunks_removed > 0
    again = KnowledgeStore.open(tmp_path / "other-home", chroma_server, embeddings)  # a second replica
    assert again.count("finance") == remote.count("finance")


def test_an_unreachable_chroma_server_is_a_clear_error(tmp_path: Path) -> None:
    from domainchat.errors import ConfigError

    with pytest.raises(ConfigError, match="DOMAINCHAT_CHROMA_URL=http://127.0.0.1:9: cannot reach"):
        KnowledgeStore.open(tmp_path, "http://127.0.0.1:9")

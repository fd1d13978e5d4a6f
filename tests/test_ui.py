"""The web app in a real browser: the app runs as a subprocess on a free port (real model, real
knowledge store, real adapters) and headless Chromium drives it through Playwright (slow); and the
page's pieces that need no browser: export, stored conversations, who may edit the knowledge, the
layout a public Space gets (quick)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import free_port, wait_for_http

from domainchat import ui
from domainchat.domains import load_registry
from domainchat.knowledge import Passage
from domainchat.settings import PROJECT_ROOT, load_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SHOTS = PROJECT_ROOT / "out" / "screenshots"
ADMIN_PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def app(settings, test_adapters, tmp_path_factory: pytest.TempPathFactory):
    """The running app: its URL and its DOMAINCHAT_HOME."""
    root = tmp_path_factory.mktemp("ui")
    domains = root / "domains"
    shutil.copytree(PROJECT_ROOT / "domains", domains)
    for path in domains.glob("*/domain.yaml"):  # short answers keep the test quick; everything else is as shipped
        data = yaml.safe_load(path.read_text())
        data.setdefault("generation", {})["max_new_tokens"] = 24
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    (domains / "broken_demo").mkdir()
    (domains / "broken_demo" / "domain.yaml").write_text("id: broken_demo\ndescription: no title\n")
    adapters = root / "adapters"
    shutil.copytree(test_adapters["alpha"], adapters / "finance")
    home = root / "home"  # its own store (one process per embedded store), the session's model cache
    home.mkdir()
    (home / "models").symlink_to(settings.model_cache_dir, target_is_directory=True)
    port = free_port()
    env = {**os.environ, "DOMAINCHAT_HOME": str(home), "DOMAINCHAT_DOMAINS_DIR": str(domains),
           "DOMAINCHAT_ADAPTERS_DIR": str(adapters), "DOMAINCHAT_ADMIN_PASSWORD": ADMIN_PASSWORD}
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "domainchat", "serve", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}/"
    wait_for_http(url, server, 300, root / "server.log")
    yield SimpleNamespace(url=url, home=home)
    server.terminate()
    try:
        server.wait(timeout=30)  # ~2 s on an idle machine (measured); shutdown is not what these tests are about
    except subprocess.TimeoutExpired:  # seen once with the CPUs shared by an eval run: don't leave it behind
        server.kill()
        server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def app_url(app) -> str:
    return app.url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(app_url)
    page.wait_for_selector("#question textarea")
    page.wait_for_selector("#examples button")
    yield page
    page.close()


def choose_domain(page, title: str) -> None:
    page.locator("#domain input").click()
    page.locator("ul[role=listbox] li", has_text=title).first.click()
    page.wait_for_function("t => document.querySelector('#description').innerText.includes(t)", arg=title)


def settled_documents(page, listed: str) -> str:
    """The knowledge table's text once it lists `listed` and is not being refreshed: the table follows
    a domain switch or an upload in a later event, so until then it may still show the last domain's
    documents or gradio's "processing" overlay."""
    page.wait_for_function(
        "name => { const t = document.querySelector('#documents')?.innerText ?? '';"
        " return t.includes(name) && !t.includes('processing'); }", arg=listed)
    return page.locator("#documents").inner_text()


def ask(page, question: str) -> str:
    """Send a question; return the finished answer text once the status line reports timing or a notice."""
    turn = page.locator('#chat [data-testid="user"]').count() + 1
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(`Turn ${t}:`)",
                           arg=turn, timeout=120_000)
    return page.locator('#chat [data-testid="bot"]').last.inner_text()


@pytest.mark.slow
def test_each_domain_answers_an_example_with_sources(page) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    titles = {}
    for domain_dir in sorted((PROJECT_ROOT / "domains").iterdir()):
        data = yaml.safe_load((domain_dir / "domain.yaml").read_text())
        titles[data["id"]] = data["title"]
    for domain_id, title in titles.items():
        choose_domain(page, title)
        page.locator("#examples button").first.click()
        page.wait_for_function("() => document.querySelector('#question textarea').value.trim().length > 0",
                               timeout=10_000)  # clicking an example fills the question box
        question = page.locator("#question textarea").input_value()
        answer = ask(page, question)
        assert answer.strip()
        page.wait_for_function("() => document.querySelector('#sources').innerText.includes('[1]')")
        assert "score" in page.locator("#sources").inner_text()
        assert page.locator("#disclaimer").inner_text().strip()
        page.screenshot(path=str(SHOTS / f"{domain_id}.png"), full_page=True)


@pytest.mark.slow
def test_a_broken_domain_is_named_with_its_reason(page) -> None:
    page.wait_for_selector("#broken-domains")
    text = page.locator("#broken-domains").inner_text()
    assert "broken_demo" in text and "title" in text
    assert page.locator("#status").inner_text().count("Adapter:") == 1


@pytest.mark.slow
def test_streaming_is_visible_before_the_answer_is_done(page) -> None:
    choose_domain(page, "Personal finance")
    page.locator("#question textarea").fill("What is compound interest?")
    page.locator("#send").click()
    page.wait_for_function("() => { const b = document.querySelectorAll('#chat [data-testid=\"bot\"]');"
                           " return b.length && b[b.length - 1].innerText.trim().length > 0 }", timeout=120_000)
    first_seen = page.locator('#chat [data-testid="bot"]').last.inner_text()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Turn 1: first token')",
                           timeout=120_000)
    final = page.locator('#chat [data-testid="bot"]').last.inner_text()
    assert len(final) >= len(first_seen) > 0
    assert "Adapter: finance" in page.locator("#status").inner_text()


@pytest.mark.slow
def test_upload_needs_the_password_then_answers_cite_it_and_removal_takes_it_out(page, tmp_path: Path) -> None:
    choose_domain(page, "Legal information")
    doc = tmp_path / "quillfeather-lease-rules.md"
    doc.write_text("# Quillfeather lease rules\n\n## Quillfeather pet deposit\n"
                   "Under the Quillfeather lease rules, the pet deposit is 275 dollars "
                   "and is refunded within 21 days.\n")
    page.locator("#knowledge-panel").click()
    first_shipped = min(path.name for path in (PROJECT_ROOT / "knowledge" / "legal").glob("*.md"))
    shipped = settled_documents(page, first_shipped)
    page.locator("#upload input[type=file]").set_input_files(str(doc))
    page.wait_for_timeout(1000)
    page.locator("#admin-password input").fill("wrong")
    page.locator("#add").click()
    page.wait_for_function("() => document.querySelector('#upload-result')?.innerText.includes('Wrong admin password')")
    page.locator("#upload input[type=file]").set_input_files(str(doc))  # the refused upload's copy is gone
    page.wait_for_timeout(1000)
    page.locator("#admin-password input").fill(ADMIN_PASSWORD)
    page.locator("#add").click()
    page.wait_for_function("() => document.querySelector('#upload-result')?.innerText.includes('added')",
                           timeout=60_000)
    page.wait_for_function("() => document.querySelector('#documents')?.innerText.includes('quillfeather')")
    assert "upload" not in shipped and "upload" in page.locator("#documents").inner_text(), "its origin is shown"
    answer = ask(page, "What is the Quillfeather pet deposit?")
    page.wait_for_function("() => document.querySelector('#sources').innerText.includes('quillfeather-lease-rules.md')")
    if "[1]" in answer:  # the evidence the answer quoted is marked in its passage
        assert page.locator("#sources mark").count() >= 1
    page.screenshot(path=str(SHOTS / "upload.png"), full_page=True)

    page.locator("#remove-choice input").click()
    page.locator("ul[role=listbox] li", has_text="quillfeather-lease-rules.md").first.click()
    page.locator("#remove").click()
    page.wait_for_function("() => document.querySelector('#upload-result')?.innerText.includes('Remove quillfeather')")
    page.locator("#confirm-remove").click()
    page.wait_for_function("() => document.querySelector('#upload-result')?.innerText.includes('Removed')")
    page.wait_for_function(
        "() => !(document.querySelector('#documents')?.innerText ?? 'quillfeather').includes('quillfeather')")
    assert settled_documents(page, first_shipped) == shipped, "the other documents are as they were"


@pytest.mark.slow
def test_domains_keep_separate_histories(page) -> None:
    choose_domain(page, "Personal finance")
    ask(page, "What is an emergency fund?")
    choose_domain(page, "Health information")
    assert page.locator('#chat [data-testid="user"]').count() == 0, "a new domain starts its own conversation"
    ask(page, "How long does a cold last?")
    choose_domain(page, "Personal finance")
    users = page.locator('#chat [data-testid="user"]').all_inner_texts()
    assert users == ["What is an emergency fund?"]
    choose_domain(page, "Health information")
    assert page.locator('#chat [data-testid="user"]').all_inner_texts() == ["How long does a cold last?"]


@pytest.mark.slow
def test_bad_input_shows_a_message_not_a_traceback(page) -> None:
    choose_domain(page, "Personal finance")
    page.locator("#question textarea").fill("   ")
    page.locator("#send").click()
    page.wait_for_function("() => document.querySelector('#notices')?.innerText.includes('empty')", timeout=30_000)
    assert "Traceback" not in page.content()


@pytest.mark.slow
def test_a_reload_keeps_the_conversation_and_export_downloads_it(page) -> None:
    choose_domain(page, "Personal finance")
    page.locator("#export").click()
    page.wait_for_function("() => document.querySelector('#notices')?.innerText.includes('Nothing to export')")
    ask(page, "What is an emergency fund?")
    page.reload()
    page.wait_for_selector("#examples button")
    choose_domain(page, "Personal finance")
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"user\"]').length == 1")
    assert page.locator('#chat [data-testid="user"]').all_inner_texts() == ["What is an emergency fund?"]

    page.locator("#export").click()
    with page.expect_download() as download:
        page.locator("#exported a").first.click()
    text = Path(download.value.path()).read_text(encoding="utf-8")
    assert "## 1. What is an emergency fund?" in text and "Personal finance" in text

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"user\"]').length == 0")
    page.reload()
    page.wait_for_selector("#examples button")
    choose_domain(page, "Personal finance")
    page.wait_for_timeout(1000)
    assert page.locator('#chat [data-testid="user"]').count() == 0, "Clear still clears, for good"


@pytest.mark.slow
def test_likes_dislikes_and_corrections_reach_the_feedback_file(page, app) -> None:
    choose_domain(page, "Health information")
    ask(page, "How long does a cold last?")
    page.locator('#chat button[aria-label="Dislike"]').last.click()
    page.wait_for_selector("#correction textarea", state="visible")
    page.locator("#correction textarea").fill("A cold usually lasts 7 to 10 days [1].")
    page.locator("#save-correction").click()
    page.wait_for_function("() => document.querySelector('#correction-result')?.innerText.includes('saved')")
    page.locator('#chat button[aria-label="Like"]').last.click()  # a change of mind is recorded too
    feedback_file = app.home / "feedback" / "medical.jsonl"
    deadline = time.time() + 30
    while feedback_file.read_text().count("\n") < 3 and time.time() < deadline:
        time.sleep(0.2)
    entries = [json.loads(line) for line in feedback_file.read_text().splitlines()]
    assert [(e["vote"], e["correction"]) for e in entries[-3:]] == [
        ("down", None), ("down", "A cold usually lasts 7 to 10 days [1]."), ("up", None)]
    assert entries[-1]["question"] == "How long does a cold last?" and entries[-1]["sources"]


@pytest.mark.slow
def test_a_phone_sees_the_whole_domain_picker(browser, app_url: str) -> None:
    page = browser.new_page(viewport={"width": 360, "height": 800})
    page.goto(app_url)
    page.wait_for_selector("#examples button")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "phone.png"), full_page=True)
    box = page.locator("#domain").bounding_box()
    assert box["width"] >= 250, "the picker takes the phone's width instead of sharing a row (about 150 px)"
    page.close()


@pytest.mark.slow
def test_the_server_serves_no_local_files_and_follows_no_urls(app_url: str) -> None:
    """Gradio's file route: nothing outside its own cache (allowed_paths=[]), no redirect to a URL
    (the open-redirect / SSRF advisories on /gradio_api/file=)."""
    import httpx

    for path in ("gradio_api/file=/etc/passwd", "gradio_api/file=../../etc/passwd",
                 "gradio_api/file=https://example.com/x", "gradio_api/file/https://example.com/x",
                 "file=/etc/passwd"):
        response = httpx.get(app_url + path, follow_redirects=False, timeout=30)
        assert response.status_code in (403, 404) and "location" not in response.headers, path


TURN = {"question": "What is an emergency fund?", "answer": "Savings for surprises [2]. Keep 3 months [9].",
        "sources": [{"id": "a:0:x", "title": "Budgeting", "source": "budgeting.md"},
                    {"id": "b:0:y", "title": "Emergency funds", "source": "emergency-funds.md"}],
        "adapter": "finance", "abstained": False, "stopped": False}


def test_an_export_lists_each_answer_with_the_sources_it_cited() -> None:
    from datetime import datetime, timezone

    text = ui.conversation_markdown("Personal finance", "Not advice.", [TURN],
                                    datetime(2026, 12, 4, 5, 0, tzinfo=timezone.utc))
    assert "## 1. What is an emergency fund?" in text and "Savings for surprises [2]." in text
    assert "- [2] Emergency funds — `emergency-funds.md`" in text
    assert "budgeting.md" not in text, "an uncited source is not listed"
    assert "[9]" in text and "- [9]" not in text, "a citation with no source behind it lists nothing"


def test_stored_conversations_keep_only_well_formed_turns() -> None:
    state = {"turns": {"finance": [TURN, {"question": 3}, "junk"], "legal": "junk"}}
    assert ui.turns_of(state, "finance") == [TURN]
    assert ui.turns_of(state, "legal") == [] and ui.turns_of(None, "finance") == []
    assert ui.turns_of({"histories": {"finance": [["q", "a"]]}}, "finance") == []  # an older version's storage
    kept = ui.with_turns(state, "medical", [TURN] * (ui.MAX_STORED_TURNS + 5))
    assert len(kept["turns"]["medical"]) == ui.MAX_STORED_TURNS
    assert kept["turns"]["finance"] == state["turns"]["finance"]


def test_only_the_admin_password_opens_the_knowledge_base_on_a_space(tmp_path: Path) -> None:
    own = load_settings({"DOMAINCHAT_HOME": str(tmp_path)})
    space = load_settings({"DOMAINCHAT_HOME": str(tmp_path), "SPACE_ID": "me/app"})
    guarded = load_settings({"DOMAINCHAT_HOME": str(tmp_path), "SPACE_ID": "me/app",
                             "DOMAINCHAT_ADMIN_PASSWORD": ADMIN_PASSWORD})
    assert ui.editing_refusal(own, None) is None
    assert "turned off" in ui.editing_refusal(space, ADMIN_PASSWORD)
    assert "Enter the admin password" in ui.editing_refusal(guarded, "")
    assert "Wrong admin password" in ui.editing_refusal(guarded, "correct horse ")
    assert ui.editing_refusal(guarded, ADMIN_PASSWORD) is None


def test_a_public_space_without_a_password_shows_no_upload_and_says_how_to_allow_it(tmp_path: Path) -> None:
    # The page's layout is under test, not answers: an assistant with settings and domains is enough.
    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path), "SPACE_ID": "me/app"})
    assistant = SimpleNamespace(settings=settings, registry=load_registry(PROJECT_ROOT / "domains"))
    demo = ui.build(assistant)
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert "DOMAINCHAT_ADMIN_PASSWORD" in blocks["editing-off"].value
    assert blocks["admin-password"].visible is False
    upload_group = next(b for b in demo.blocks.values() if isinstance(b, ui.gr.Group))
    assert upload_group.visible is False
    assert (tmp_path / ui.SECRET_FILE).stat().st_mode & 0o077 == 0, "the browser-storage key is private"
    assert ui.browser_secret(tmp_path) == ui.browser_secret(tmp_path), "the same key after a restart"


def test_the_sources_mark_the_sentences_an_answer_quoted() -> None:
    passage = Passage(id="r.md:0:a", source="r.md", title="Returns", score=0.8, text=(
        "Returns > Window\nReturns are accepted within **30 days** of delivery. Opened items are fine.\n"
        "Refunds take 5 days."))
    shown = ui.format_sources([passage], "Returns are accepted within 30 days of delivery [1].")
    assert "<mark>Returns are accepted within 30 days of delivery.</mark> Opened items are fine." in shown
    assert "Refunds take 5 days." in shown and shown.count("<mark>") == 1


def test_the_sources_mark_a_quoted_table_row_cell_by_cell() -> None:
    passage = Passage(id="s.md:0:a", source="s.md", title="Shipping", score=0.8, text=(
        "Shipping > Options\n| Option | Cost |\n|---|---|\n| Standard | $5.99 |\n| Express | $29.99 |"))
    shown = ui.format_sources([passage], "Express — cost: $29.99 [1].")
    assert "> | <mark>Express</mark> | <mark>$29.99</mark> |" in shown
    assert "> | Standard | $5.99 |" in shown and shown.count("<mark>") == 2

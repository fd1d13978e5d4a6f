"""The web app in a real browser: the app runs as a subprocess on a free port (real model, real
knowledge store, real adapters) and headless Chromium drives it through Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port, wait_for_http

from domainchat.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SHOTS = PROJECT_ROOT / "out" / "screenshots"


@pytest.fixture(scope="module")
def app_url(settings, test_adapters, tmp_path_factory: pytest.TempPathFactory):
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
           "DOMAINCHAT_ADAPTERS_DIR": str(adapters)}
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "domainchat", "serve", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}/"
    wait_for_http(url, server, 300, root / "server.log")
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


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


def ask(page, question: str) -> str:
    """Send a question; return the finished answer text once the status line reports timing or a notice."""
    turn = page.locator('#chat [data-testid="user"]').count() + 1
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(`Turn ${t}:`)",
                           arg=turn, timeout=120_000)
    return page.locator('#chat [data-testid="bot"]').last.inner_text()


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


def test_a_broken_domain_is_named_with_its_reason(page) -> None:
    page.wait_for_selector("#broken-domains")
    text = page.locator("#broken-domains").inner_text()
    assert "broken_demo" in text and "title" in text
    assert page.locator("#status").inner_text().count("Adapter:") == 1


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


def test_upload_then_answer_cites_the_new_document(page, tmp_path: Path) -> None:
    choose_domain(page, "Legal information")
    doc = tmp_path / "quillfeather-lease-rules.md"
    doc.write_text("# Quillfeather lease rules\n\n## Quillfeather pet deposit\n"
                   "Under the Quillfeather lease rules, the pet deposit is 275 dollars "
                   "and is refunded within 21 days.\n")
    page.locator("#upload-panel").click()
    page.locator("#upload input[type=file]").set_input_files(str(doc))
    page.wait_for_timeout(1000)
    page.locator("#add").click()
    page.wait_for_function("() => document.querySelector('#upload-result').innerText.includes('added')", timeout=60_000)
    ask(page, "What is the Quillfeather pet deposit?")
    page.wait_for_function("() => document.querySelector('#sources').innerText.includes('quillfeather-lease-rules.md')")
    page.screenshot(path=str(SHOTS / "upload.png"), full_page=True)


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


def test_bad_input_shows_a_message_not_a_traceback(page) -> None:
    choose_domain(page, "Personal finance")
    page.locator("#question textarea").fill("   ")
    page.locator("#send").click()
    page.wait_for_function("() => document.querySelector('#notices').innerText.includes('empty')", timeout=30_000)
    assert "Traceback" not in page.content()


def test_the_server_serves_no_local_files_and_follows_no_urls(app_url: str) -> None:
    """Gradio's file route: nothing outside its own cache (allowed_paths=[]), no redirect to a URL
    (the open-redirect / SSRF advisories on /gradio_api/file=)."""
    import httpx

    for path in ("gradio_api/file=/etc/passwd", "gradio_api/file=../../etc/passwd",
                 "gradio_api/file=https://example.com/x", "gradio_api/file/https://example.com/x",
                 "file=/etc/passwd"):
        response = httpx.get(app_url + path, follow_redirects=False, timeout=30)
        assert response.status_code in (403, 404) and "location" not in response.headers, path

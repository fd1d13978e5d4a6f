"""UI: the Gradio page, a thin adapter from `chat.Assistant` events to components.

Owns layout and per-user state: each browser keeps one conversation per domain in its own
storage (gr.BrowserState, encrypted with a key kept in DOMAINCHAT_HOME), so a reload keeps it;
nothing per-user lives in module globals or on the server. It formats sources (marking the
sentences an answer drew on), notices and the status line, exports a conversation as Markdown,
hands 👍/👎 and corrections to `feedback.record`, and hands uploads and removals to `Assistant`,
behind the admin password where settings ask for one. It knows nothing about how answers are made.
"""

from __future__ import annotations

import hmac
import html
import secrets
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr

from domainchat import feedback
from domainchat.chat import Assistant, Done, Notice, Transcript
from domainchat.documents import MAX_FILE_BYTES, SUPPORTED_SUFFIXES
from domainchat.errors import DomainchatError
from domainchat.grounding import CITATION, cited_spans
from domainchat.knowledge import Passage, StoredDocument
from domainchat.passage_text import quoted_table_rows
from domainchat.safety import MAX_QUESTION_CHARS
from domainchat.settings import Settings

QUEUE_MAX_SIZE = 32  # beyond this, Gradio answers "queue is full, try again"

# One exchange, as the browser keeps it: {"question", "answer", "sources": [{"id", "title",
# "source"}] (the passages' text stays on the server), "adapter", "abstained", "stopped"}.
Turn = dict[str, Any]
SessionState = dict[str, Any]  # {"turns": {domain_id: [Turn]}}
STORAGE_KEY = "domainchat-conversations"
MAX_STORED_TURNS = 50  # per domain; browsers give a site about 5 MB of storage
SECRET_FILE = "browser-state.key"  # the key the page's stored conversations are encrypted with

CSS = """
#notices .risk, #notices .abstain, #notices .adapter, #notices .error {
  padding: 6px 10px; border-radius: 6px; margin: 4px 0;
}
#notices .risk {background: #fde8e8; border-left: 4px solid #c81e1e;}
#notices .abstain {background: #fdf6b2; border-left: 4px solid #c27803;}
#notices .adapter, #notices .error {background: #e1effe; border-left: 4px solid #1c64f2;}
#disclaimer {font-size: 0.9em; opacity: 0.85;}
#status {font-size: 0.85em; opacity: 0.8;}
#sources mark {background: #fef08a; padding: 0 2px;}
/* A phone (360-430 px) has no room for the domain picker beside its description. */
@media (max-width: 640px) {
  #domain-row {flex-direction: column;}
  #domain-row > * {width: 100%; min-width: 0 !important;}
}
"""


def format_sources(passages: list[Passage], answer: str = "") -> str:
    """The passages of the last answer, quoted, with the sentences the answer drew on marked."""
    if not passages:
        return "_No sources for the last answer._"
    spans = cited_spans(answer, passages) if answer else {}
    blocks = []
    for number, passage in enumerate(passages, start=1):
        drawn_on = spans.get(number, [])
        rows = quoted_table_rows(passage.text, drawn_on) if drawn_on else set()
        lines = [_marked_row(line) if index in rows else _marked(line, drawn_on)
                 for index, line in enumerate(passage.text.splitlines()) if line.strip()]
        quoted = "\n".join(f"> {line}" for line in lines)
        heading = f"**[{number}] {html.escape(passage.title)}** — `{passage.source}` (score {passage.score:.2f})"
        blocks.append(f"{heading}\n\n{quoted}")
    return "\n\n".join(blocks)


def _marked(line: str, sentences: list[str]) -> str:
    """One passage line, escaped, with each of `sentences` in it inside <mark>. The sentences come
    from grounding, which drops the line's bold markers, so a marked line is shown without them."""
    found = [s for s in sentences if s in line.replace("**", "")]
    if not found:
        return html.escape(line)
    escaped = html.escape(line.replace("**", ""))
    for sentence in found:
        escaped = escaped.replace(html.escape(sentence), f"<mark>{html.escape(sentence)}</mark>", 1)
    return escaped


def _marked_row(line: str) -> str:
    """A quoted table row, escaped, each cell inside <mark> (a mark cannot span a row's cells)."""
    cells = line.strip().strip("|").split("|")
    return "| " + " | ".join(f"<mark>{html.escape(c.strip())}</mark>" if c.strip() else "" for c in cells) + " |"


def format_notices(notices: list[Notice]) -> str:
    shown = [n for n in notices if n.kind != "disclaimer"]
    return "\n".join(f'<div class="{n.kind}"><b>{n.kind}</b>: {html.escape(n.text)}</div>' for n in shown)


def format_status(assistant: Assistant, domain_id: str, done: Done | None = None, turn: int = 0) -> str:
    domain = assistant.registry.domains.get(domain_id)
    adapter, why = assistant.adapter_for(domain) if domain else (None, "unknown domain")
    parts = [f"Base model: {assistant.model_label()}", f"Adapter: {adapter}" if adapter else f"Adapter: {why}"]
    if done is not None and done.timing.get("ttft_ms"):
        parts.append(f"Turn {turn}: first token {done.timing['ttft_ms'] / 1000:.2f} s, "
                     f"{done.timing['tokens_per_s']:.1f} tokens/s")
    elif done is not None:
        parts.append(f"Turn {turn}: {'nothing in the knowledge base' if done.abstained else 'fixed response'}")
    return " · ".join(parts)


def turns_of(state: SessionState | None, domain_id: str) -> list[Turn]:
    """The domain's turns as the browser sent them; anything malformed (storage edited by hand, or
    written by another version) is left out rather than trusted."""
    raw = state.get("turns", {}) if isinstance(state, dict) else {}
    turns = raw.get(domain_id, []) if isinstance(raw, dict) else []
    return [t for t in turns if isinstance(t, dict) and isinstance(t.get("question"), str)
            and isinstance(t.get("answer"), str)] if isinstance(turns, list) else []


def with_turns(state: SessionState | None, domain_id: str, turns: list[Turn]) -> SessionState:
    stored = state.get("turns") if isinstance(state, dict) else None
    return {"turns": {**(stored if isinstance(stored, dict) else {}), domain_id: turns[-MAX_STORED_TURNS:]}}


def to_messages(turns: list[Turn]) -> list[dict[str, str]]:
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answer"]}]
    return messages


def make_turn(question: str, said: Transcript) -> Turn:
    """The turn to keep: complete once Done came; until then (and for good if the person stops it)
    the text so far, marked stopped."""
    stopped = said.done is None
    return {"question": question, "answer": said.text.strip() + " …" if stopped else said.answer,
            "sources": [{"id": p.id, "title": p.title, "source": p.source} for p in said.sources],
            "adapter": said.done.adapter if said.done else None,
            "abstained": bool(said.done and said.done.abstained), "stopped": stopped}


def conversation_markdown(title: str, disclaimer: str, turns: list[Turn], now: datetime) -> str:
    """A conversation as Markdown: each question, its answer, and the sources the answer cited."""
    lines = [f"# {title} — domainchat conversation", "", f"_Exported {now:%Y-%m-%d %H:%M} UTC._"]
    if disclaimer:
        lines += ["", f"> {disclaimer}"]
    for number, turn in enumerate(turns, start=1):
        lines += ["", f"## {number}. {turn['question']}", "", turn["answer"]]
        cited = sorted({int(n) for n in CITATION.findall(turn["answer"])})
        sources = [(n, turn["sources"][n - 1]) for n in cited if 1 <= n <= len(turn.get("sources", []))]
        if sources:
            lines += ["", "Sources:"] + [f"- [{n}] {s['title']} — `{s['source']}`" for n, s in sources]
    return "\n".join(lines) + "\n"


def format_documents(documents: list[StoredDocument]) -> list[list[str]]:
    return [[d.source, d.origin or "", str(d.chunks), _when(d.added), "⚠️ yes" if d.flagged else ""]
            for d in documents]


def _when(added: str | None) -> str:
    if not added:
        return ""
    try:
        return datetime.fromisoformat(added).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return added


def editing_refusal(settings: Settings, password: str | None) -> str | None:
    """Why this visitor may not add or remove documents, or None when they may. Checked in the
    handlers themselves, not only by hiding the controls: a page's events can be called directly."""
    if settings.knowledge_editing == "open":
        return None
    if settings.knowledge_editing == "off":
        return "Adding and removing documents is turned off on this Space."
    if not password:
        return "Enter the admin password to add or remove documents."
    if not hmac.compare_digest(password.encode(), (settings.admin_password or "").encode()):
        return "Wrong admin password: nothing was changed."
    return None


def browser_secret(home: Path) -> str:
    """The key the page's stored conversations are encrypted with, kept in DOMAINCHAT_HOME so that
    conversations outlive a restart (a key made per start would make them unreadable)."""
    path = home / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
        return path.read_text().strip()


def build(assistant: Assistant) -> gr.Blocks:
    domains = assistant.registry.domains
    first = next(iter(domains))
    settings = assistant.settings
    max_files = settings.max_upload_files
    editing = settings.knowledge_editing
    # Gradio lets every admitted-or-waiting answer through; assistant.admission is the one limit.
    chat_concurrency = settings.max_active + settings.max_waiting
    exports = Path(tempfile.mkdtemp(prefix="domainchat-export-"))  # Gradio serves a copy from its cache

    def domain_view(domain_id: str, state: SessionState):
        domain = domains[domain_id]
        return (
            to_messages(turns_of(state, domain_id)),
            f"**{domain.title}** — {domain.description}",
            f"⚠️ {domain.disclaimer}" if domain.disclaimer else "",
            gr.Dataset(samples=[[q] for q in domain.example_questions]),
            format_sources([]),
            "",
            format_status(assistant, domain_id),
        )

    def respond(question: str, domain_id: str, state: SessionState) -> Iterator[tuple]:
        turns = turns_of(state, domain_id)
        history = [(t["question"], t["answer"]) for t in turns]
        shown = to_messages(turns) + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        said = Transcript()
        cancel = threading.Event()
        admitted = False
        try:
            yield shown, "", format_sources([]), "", gr.update(), gr.update()
            assistant.admission.enter()  # shared with the API: the same limit for everyone
            admitted = True
            for event in assistant.answer(domain_id, question, history, cancel=cancel):
                said.add(event)
                shown[-1]["content"] = said.answer  # the final word: e.g. a withheld answer replaces its start
                # Every update carries the turn so far: if the person presses Stop, the browser keeps
                # the last one, marked stopped.
                state = with_turns(state, domain_id, turns + [make_turn(question, said)])
                if said.done is not None:
                    yield (shown, "", format_sources(said.sources, said.answer), format_notices(said.notices),
                           format_status(assistant, domain_id, said.done, len(turns) + 1), state)
                    return
                yield shown, "", format_sources(said.sources), format_notices(said.notices), gr.update(), state
        except DomainchatError as exc:
            said.notices.append(Notice("error", str(exc)))
            yield to_messages(turns), question, format_sources([]), format_notices(said.notices), gr.update(), \
                with_turns(state, domain_id, turns)
        finally:
            cancel.set()  # the Stop button closes this generator: stop generating at the next token
            if admitted:
                assistant.admission.leave()

    def retry(domain_id: str, state: SessionState):
        turns = turns_of(state, domain_id)
        if not turns:
            return "", state, []
        return turns[-1]["question"], with_turns(state, domain_id, turns[:-1]), to_messages(turns[:-1])

    def clear(domain_id: str, state: SessionState):
        return [], format_sources([]), "", with_turns(state, domain_id, []), gr.update(value=None, visible=False)

    def export(domain_id: str, state: SessionState):
        turns = turns_of(state, domain_id)
        if not turns:
            return gr.update(value=None, visible=False), format_notices(
                [Notice("error", "Nothing to export yet: ask a question first.")])
        now = datetime.now(timezone.utc)
        path = exports / f"domainchat-{domain_id}-{now:%Y%m%d-%H%M%S}.md"
        path.write_text(conversation_markdown(domains[domain_id].title, domains[domain_id].disclaimer, turns, now),
                        encoding="utf-8")
        return gr.update(value=str(path), visible=True), ""

    def vote(domain_id: str, state: SessionState, data: gr.LikeData):
        """👍/👎 on an answer: saved at once; a 👎 opens the correction box for that answer."""
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        turns = turns_of(state, domain_id)
        number = int(index) // 2  # messages alternate question, answer
        if data.liked not in (True, False) or not 0 <= number < len(turns):
            return gr.update(), gr.update(), None
        choice = "up" if data.liked is True else "down"
        try:
            _record(domain_id, turns, number, choice, None)
        except DomainchatError as exc:
            return format_notices([Notice("error", str(exc))]), gr.update(visible=False), None
        if choice == "up":
            return "", gr.update(visible=False), None
        return ("", gr.update(visible=True), {"domain": domain_id, "turn": number})

    def correct(text: str, target: dict | None, state: SessionState):
        """The answer the person wanted, saved as its own entry (with 👎) beside their vote."""
        if not target:
            return "Choose 👎 on an answer first.", gr.update(), text
        turns = turns_of(state, target["domain"])
        if not text.strip():
            return "Write the answer you expected first.", gr.update(), text
        if target["turn"] >= len(turns):
            return "That answer is no longer in this conversation.", gr.update(visible=False), ""
        try:
            _record(target["domain"], turns, target["turn"], "down", text)
        except DomainchatError as exc:
            return f"❌ {html.escape(str(exc))}", gr.update(), text
        return "✅ Thank you: the correction is saved and can teach this domain's adapter.", \
            gr.update(visible=False), ""

    def _record(domain_id: str, turns: list[Turn], number: int, choice: str, correction: str | None) -> None:
        turn = turns[number]
        feedback.record(settings.home, domain_id, question=turn["question"],
                        history=[[t["question"], t["answer"]] for t in turns[:number]], answer=turn["answer"],
                        sources=[s.get("id", "") for s in turn.get("sources", [])], adapter=turn.get("adapter"),
                        vote=choice, correction=correction, abstained=bool(turn.get("abstained")),
                        stopped=bool(turn.get("stopped")))

    def document_view(domain_id: str):
        documents = assistant.documents(domain_id)
        return (gr.update(value=format_documents(documents)),
                gr.update(choices=[d.source for d in documents], value=None))

    # Gradio finds the progress tracker by this default value, so the call in the default is its API.
    def upload(files: list[str] | None, domain_id: str, password: str | None,
               progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008
        try:
            if not files:
                return "Choose one or more files first."
            if reason := editing_refusal(settings, password):
                return f"❌ {reason}"
            if len(files) > max_files:
                return f"At most {max_files} files per upload; you chose {len(files)}. Upload them in smaller groups."

            def report_progress(done: int, total: int, current: str) -> None:
                progress((done, total), desc=f"Adding {current}" if current else "Done")

            report = assistant.ingest(domain_id, [Path(f) for f in files], origin="upload",
                                      progress=report_progress)
        finally:
            for file in files or []:  # the store keeps the text; the uploaded copy is served back to no one
                Path(file).unlink(missing_ok=True)
        failed = {e["file"]: e["error"] for e in report.errors}
        flagged = {f["file"] for f in report.flagged}
        rows = ["| file | result |", "|---|---|"]
        for file in files:
            name = Path(file).name
            result = "❌ " + html.escape(failed[name]) if name in failed else "✅ added"
            if name in flagged:
                result += " (instruction-like text in it was neutralized)"
            rows.append(f"| {html.escape(name)} | {result} |")
        summary = (f"{report.chunks_added} new passages, {report.chunks_unchanged} already known, "
                   f"{assistant.knowledge_count(domain_id)} in **{domains[domain_id].title}**.")
        return "\n".join(rows) + "\n\n" + summary

    def ask_removal(source: str | None, domain_id: str, password: str | None):
        if not source:
            return "Choose a document to remove first.", gr.update(visible=False)
        if reason := editing_refusal(settings, password):
            return f"❌ {reason}", gr.update(visible=False)
        chunks = next((d.chunks for d in assistant.documents(domain_id) if d.source == source), 0)
        return (f"Remove **{html.escape(source)}** ({chunks} passages) from **{domains[domain_id].title}**? "
                "Answers will no longer cite it; adding the file again brings it back.", gr.update(visible=True))

    def remove(source: str | None, domain_id: str, password: str | None):
        hidden = gr.update(visible=False)
        if reason := editing_refusal(settings, password):
            return (f"❌ {reason}", hidden, *document_view(domain_id))
        try:
            report = assistant.remove_documents(domain_id, [source] if source else [])
        except DomainchatError as exc:
            return (f"❌ {html.escape(str(exc))}", hidden, *document_view(domain_id))
        if report.errors:
            message = "❌ " + " ".join(html.escape(e["error"]) for e in report.errors)
        else:
            message = (f"✅ Removed **{html.escape(source or '')}** ({report.chunks_removed} passages); "
                       f"{assistant.knowledge_count(domain_id)} passages left in **{domains[domain_id].title}**.")
        return (message, hidden, *document_view(domain_id))

    with gr.Blocks(title="domainchat") as demo:
        state = gr.BrowserState({"turns": {}}, storage_key=STORAGE_KEY, secret=browser_secret(settings.home))
        gr.Markdown("# domainchat\nPick a domain, then ask. "
                    "Answers cite the knowledge base and say so when it has nothing.")
        with gr.Row(elem_id="domain-row"):
            domain = gr.Dropdown(choices=[(d.title, d.id) for d in domains.values()], value=first,
                                 label="Domain", elem_id="domain", scale=1)
            description = gr.Markdown(elem_id="description")
        if assistant.registry.broken:  # a broken domain.yaml takes out only its domain, and says why here
            gr.Markdown("\n".join(f"⚠️ Domain `{html.escape(domain_id)}` is out of service: {html.escape(reason)}"
                                   for domain_id, reason in assistant.registry.broken.items()),
                        elem_id="broken-domains")
        disclaimer = gr.Markdown(elem_id="disclaimer")
        chatbot = gr.Chatbot(elem_id="chat", height=420, label="Conversation")
        notices = gr.HTML(elem_id="notices")
        voted = gr.State(None)  # the answer a 👎 was given to, for its correction
        with gr.Group(visible=False, elem_id="correction-box") as correction_box:
            correction = gr.Textbox(label="👎 saved. What should the answer have said? (optional)",
                                    elem_id="correction", lines=3, max_length=MAX_QUESTION_CHARS)
            save_correction = gr.Button("Save correction", elem_id="save-correction", size="sm")
        correction_result = gr.Markdown(elem_id="correction-result")
        with gr.Row():
            question = gr.Textbox(placeholder="Ask a question…", show_label=False, elem_id="question", scale=5,
                                  max_length=MAX_QUESTION_CHARS, submit_btn=False)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            stop = gr.Button("Stop", elem_id="stop", scale=1)
        with gr.Row():
            retry_button = gr.Button("Retry last", elem_id="retry", size="sm")
            clear_button = gr.Button("Clear conversation", elem_id="clear", size="sm")
            export_button = gr.Button("Export as Markdown", elem_id="export", size="sm")
        exported = gr.File(label="Exported conversation", visible=False, elem_id="exported", interactive=False)
        examples = gr.Dataset(components=[question], samples=[], label="Example questions", elem_id="examples")
        with gr.Accordion("Sources of the last answer", open=True, elem_id="sources-panel"):
            sources = gr.Markdown(format_sources([]), elem_id="sources")
        with gr.Accordion("Knowledge base of this domain", open=False, elem_id="knowledge-panel"):
            documents = gr.Dataframe(headers=["document", "from", "passages", "added", "flagged"],
                                     interactive=False, elem_id="documents", wrap=True)
            if editing == "off":
                gr.Markdown("Adding and removing documents is turned off on this public Space, so that visitors "
                            "cannot change what the assistant says. The Space's owner can turn it on by adding "
                            "a secret named `DOMAINCHAT_ADMIN_PASSWORD` in the Space's settings.",
                            elem_id="editing-off")
            password = gr.Textbox(label="Admin password", type="password", elem_id="admin-password",
                                  visible=editing == "password")
            with gr.Group(visible=editing != "off"):
                files = gr.File(file_count="multiple", file_types=sorted(SUPPORTED_SUFFIXES), elem_id="upload",
                                label=f"Markdown, text, PDF or HTML; up to {max_files} files of "
                                      f"{MAX_FILE_BYTES // 2**20} MB each")
                add = gr.Button("Add to knowledge base", elem_id="add")
                with gr.Row():
                    chosen = gr.Dropdown(label="Document to remove", choices=[], elem_id="remove-choice", scale=3)
                    remove_button = gr.Button("Remove…", elem_id="remove", scale=1)
                with gr.Row(visible=False) as confirm_row:
                    confirm = gr.Button("Yes, remove it", variant="stop", elem_id="confirm-remove")
                    cancel_removal = gr.Button("Cancel", elem_id="cancel-remove")
            knowledge_result = gr.Markdown(elem_id="upload-result")
        status = gr.Markdown(elem_id="status")

        view_outputs = [chatbot, description, disclaimer, examples, sources, notices, status]
        document_outputs = [documents, chosen]
        demo.load(domain_view, [domain, state], view_outputs).then(document_view, [domain], document_outputs)
        domain.change(domain_view, [domain, state], view_outputs).then(document_view, [domain], document_outputs)
        examples.click(lambda sample: sample[0], [examples], [question])

        chat_outputs = [chatbot, question, sources, notices, status, state]
        submit = question.submit(respond, [question, domain, state], chat_outputs, concurrency_limit=chat_concurrency,
                                 concurrency_id="chat")
        click = send.click(respond, [question, domain, state], chat_outputs, concurrency_limit=chat_concurrency,
                           concurrency_id="chat")
        retried = retry_button.click(retry, [domain, state], [question, state, chatbot]).then(
            respond, [question, domain, state], chat_outputs, concurrency_limit=chat_concurrency, concurrency_id="chat")
        stop.click(None, cancels=[submit, click, retried])
        clear_button.click(clear, [domain, state], [chatbot, sources, notices, state, exported])
        chatbot.clear(clear, [domain, state], [chatbot, sources, notices, state, exported])  # its own 🗑 icon
        export_button.click(export, [domain, state], [exported, notices])
        chatbot.like(vote, [domain, state], [notices, correction_box, voted])
        save_correction.click(correct, [correction, voted, state], [correction_result, correction_box, correction])
        add.click(upload, [files, domain, password], [knowledge_result], concurrency_limit=1).then(
            document_view, [domain], document_outputs)
        remove_button.click(ask_removal, [chosen, domain, password], [knowledge_result, confirm_row])
        confirm.click(remove, [chosen, domain, password], [knowledge_result, confirm_row, *document_outputs],
                      concurrency_limit=1)
        cancel_removal.click(lambda: ("Nothing was removed.", gr.update(visible=False)), None,
                             [knowledge_result, confirm_row])
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=chat_concurrency)
    return demo


def create_app(assistant: Assistant):
    """The FastAPI app serving the page at `/` (the API is mounted beside it by api.py)."""
    from fastapi import FastAPI

    from domainchat.api import mount_api

    app = mount_api(FastAPI(title="domainchat"), assistant)
    demo = build(assistant)
    return gr.mount_gradio_app(app, demo, path="/", max_file_size=MAX_FILE_BYTES, css=CSS,
                               theme=gr.themes.Soft(), allowed_paths=[])


def serve(host: str = "127.0.0.1", port: int = 7860) -> None:
    """Start the assistant and serve the web app (blocking)."""
    import uvicorn

    from domainchat.settings import load_settings

    assistant = Assistant.start(load_settings())
    print(f"domainchat: serving on http://{host}:{port}", flush=True)
    try:
        uvicorn.run(create_app(assistant), host=host, port=port, log_level="warning")
    finally:  # uvicorn returns after a shutdown signal: let the generation thread finish first
        assistant.close()

"""UI: the Gradio page, a thin adapter from `chat.Assistant` events to components.

Owns layout and per-session state (each browser tab keeps one conversation per domain in a
gr.State; nothing per-user lives in module globals). It formats sources, notices and the status
line, and hands uploads to `Assistant.ingest`. It knows nothing about how answers are made.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from domainchat.chat import Assistant, Done, Notice, Transcript
from domainchat.documents import MAX_FILE_BYTES, SUPPORTED_SUFFIXES
from domainchat.errors import DomainchatError
from domainchat.knowledge import Passage

QUEUE_MAX_SIZE = 32  # beyond this, Gradio answers "queue is full, try again"

Conversation = list[tuple[str, str]]  # (user, assistant) turns of one domain
SessionState = dict[str, Any]  # {"histories": {domain_id: Conversation}}

CSS = """
#notices .risk, #notices .abstain, #notices .adapter, #notices .error {
  padding: 6px 10px; border-radius: 6px; margin: 4px 0;
}
#notices .risk {background: #fde8e8; border-left: 4px solid #c81e1e;}
#notices .abstain {background: #fdf6b2; border-left: 4px solid #c27803;}
#notices .adapter, #notices .error {background: #e1effe; border-left: 4px solid #1c64f2;}
#disclaimer {font-size: 0.9em; opacity: 0.85;}
#status {font-size: 0.85em; opacity: 0.8;}
"""


def format_sources(passages: list[Passage]) -> str:
    if not passages:
        return "_No sources for the last answer._"
    blocks = []
    for number, passage in enumerate(passages, start=1):
        quoted = "\n".join(f"> {html.escape(line)}" for line in passage.text.splitlines() if line.strip())
        heading = f"**[{number}] {html.escape(passage.title)}** — `{passage.source}` (score {passage.score:.2f})"
        blocks.append(f"{heading}\n\n{quoted}")
    return "\n\n".join(blocks)


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


def to_messages(history: Conversation) -> list[dict[str, str]]:
    messages = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def build(assistant: Assistant) -> gr.Blocks:
    domains = assistant.registry.domains
    first = next(iter(domains))
    max_files = assistant.settings.max_upload_files
    # Gradio lets every admitted-or-waiting answer through; assistant.admission is the one limit.
    chat_concurrency = assistant.settings.max_active + assistant.settings.max_waiting

    def domain_view(domain_id: str, state: SessionState):
        domain = domains[domain_id]
        history = state["histories"].get(domain_id, [])
        return (
            to_messages(history),
            f"**{domain.title}** — {domain.description}",
            f"⚠️ {domain.disclaimer}" if domain.disclaimer else "",
            gr.Dataset(samples=[[q] for q in domain.example_questions]),
            format_sources([]),
            "",
            format_status(assistant, domain_id),
        )

    def respond(question: str, domain_id: str, state: SessionState) -> Iterator[tuple]:
        history = list(state["histories"].get(domain_id, []))
        shown = to_messages(history) + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        said = Transcript()
        cancel = threading.Event()
        admitted = False
        try:
            yield shown, "", format_sources([]), "", gr.update(), state
            assistant.admission.enter()  # shared with the API: the same limit for everyone
            admitted = True
            for event in assistant.answer(domain_id, question, history, cancel=cancel):
                said.add(event)
                shown[-1]["content"] = said.answer  # the final word: e.g. a withheld answer replaces its start
                if said.done is not None:
                    state["histories"][domain_id] = history + [(question, said.answer)]
                    yield (shown, "", format_sources(said.sources), format_notices(said.notices),
                           format_status(assistant, domain_id, said.done, len(history) + 1), state)
                    return
                yield shown, "", format_sources(said.sources), format_notices(said.notices), gr.update(), state
        except DomainchatError as exc:
            said.notices.append(Notice("error", str(exc)))
            yield to_messages(history), question, format_sources([]), format_notices(said.notices), gr.update(), state
        finally:
            cancel.set()  # the Stop button closes this generator: stop generating at the next token
            if admitted:
                assistant.admission.leave()
            if said.text and state["histories"].get(domain_id, []) == history:  # stopped mid-answer: keep it
                state["histories"][domain_id] = history + [(question, said.text.strip() + " …")]

    def retry(domain_id: str, state: SessionState):
        history = state["histories"].get(domain_id, [])
        if not history:
            return "", state, to_messages(history)
        last_question = history[-1][0]
        state["histories"][domain_id] = history[:-1]
        return last_question, state, to_messages(history[:-1])

    def clear(domain_id: str, state: SessionState):
        state["histories"][domain_id] = []
        return [], format_sources([]), "", state

    # Gradio finds the progress tracker by this default value, so the call in the default is its API.
    def upload(files: list[str] | None, domain_id: str, progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008
        if not files:
            return "Choose one or more files first."
        if len(files) > max_files:
            return f"At most {max_files} files per upload; you chose {len(files)}. Upload them in smaller groups."

        def report_progress(done: int, total: int, current: str) -> None:
            progress((done, total), desc=f"Adding {current}" if current else "Done")

        try:
            report = assistant.ingest(domain_id, [Path(f) for f in files], origin="upload", progress=report_progress)
        finally:
            for file in files:  # the store keeps the text; the uploaded copy is served back to no one
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

    with gr.Blocks(title="domainchat") as demo:
        state = gr.State(lambda: {"histories": {}})
        gr.Markdown("# domainchat\nPick a domain, then ask. "
                    "Answers cite the knowledge base and say so when it has nothing.")
        with gr.Row():
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
        with gr.Row():
            question = gr.Textbox(placeholder="Ask a question…", show_label=False, elem_id="question", scale=5,
                                  max_length=2000, submit_btn=False)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            stop = gr.Button("Stop", elem_id="stop", scale=1)
        with gr.Row():
            retry_button = gr.Button("Retry last", elem_id="retry", size="sm")
            clear_button = gr.Button("Clear conversation", elem_id="clear", size="sm")
        examples = gr.Dataset(components=[question], samples=[], label="Example questions", elem_id="examples")
        with gr.Accordion("Sources of the last answer", open=True, elem_id="sources-panel"):
            sources = gr.Markdown(format_sources([]), elem_id="sources")
        with gr.Accordion("Add documents to this domain", open=False, elem_id="upload-panel"):
            files = gr.File(file_count="multiple", file_types=sorted(SUPPORTED_SUFFIXES), elem_id="upload",
                            label=f"Markdown, text, PDF or HTML; up to {max_files} files of "
                                  f"{MAX_FILE_BYTES // 2**20} MB each")
            add = gr.Button("Add to knowledge base", elem_id="add")
            upload_result = gr.Markdown(elem_id="upload-result")
        status = gr.Markdown(elem_id="status")

        view_outputs = [chatbot, description, disclaimer, examples, sources, notices, status]
        demo.load(domain_view, [domain, state], view_outputs)
        domain.change(domain_view, [domain, state], view_outputs)
        examples.click(lambda sample: sample[0], [examples], [question])

        chat_outputs = [chatbot, question, sources, notices, status, state]
        submit = question.submit(respond, [question, domain, state], chat_outputs, concurrency_limit=chat_concurrency,
                                 concurrency_id="chat")
        click = send.click(respond, [question, domain, state], chat_outputs, concurrency_limit=chat_concurrency,
                           concurrency_id="chat")
        retried = retry_button.click(retry, [domain, state], [question, state, chatbot]).then(
            respond, [question, domain, state], chat_outputs, concurrency_limit=chat_concurrency, concurrency_id="chat")
        stop.click(None, cancels=[submit, click, retried])
        clear_button.click(clear, [domain, state], [chatbot, sources, notices, state])
        add.click(upload, [files, domain], [upload_result], concurrency_limit=1)
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

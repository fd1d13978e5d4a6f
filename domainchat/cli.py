"""The `domainchat` command line: a thin adapter from arguments to the pipeline.

Each subcommand parses its arguments, calls into chat/knowledge/train/evaluate, and prints text or
JSON. User errors (DomainchatError) become a one-line message on stderr and exit status 2; this is
the only place besides the UI and the API that turns those into messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from domainchat.errors import BadInput, DomainchatError

if TYPE_CHECKING:
    from domainchat.chat import Assistant
    from domainchat.knowledge import KnowledgeStore

EXIT_BAD_INPUT = 2


# Warnings we have read and judged to say nothing a user can act on; anything else still shows.
KNOWN_WARNINGS = (
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),  # torch.utils.mkldnn, at import
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # peft asking transformers, at load
)


class _OptionalKernelNotice(logging.Filter):
    """On CPUs with AVX512-BF16, bitsandbytes warns at import when the optional `kernels` package
    (which would download a 4-bit matmul from the Hub) is missing; domainchat works without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels" not in record.getMessage()


def _quiet_libraries() -> None:
    """Keep library chatter (progress bars, known harmless warnings) out of the user's terminal."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())
    for noisy in ("transformers", "peft", "accelerate", "chromadb", "httpx", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextmanager
def _running_assistant() -> Iterator[Assistant]:
    """The assistant for one command, closed at the end so that no generation thread outlives it."""
    from domainchat.chat import Assistant
    from domainchat.settings import load_settings

    assistant = Assistant.start(load_settings())
    try:
        yield assistant
    finally:
        assistant.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from domainchat.ui import serve

    serve(args.host, args.port)
    return 0


def cmd_domains(args: argparse.Namespace) -> int:
    with _running_assistant() as assistant:
        rows = assistant.domain_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        if row.get("error"):
            print(f"{row['id']:<18} BROKEN: {row['error']}")
            continue
        adapter = "adapter loaded" if row["adapter_loaded"] else (row["adapter_status"] or "base only")
        print(f"{row['id']:<18} {row['title']:<28} {row['chunks']:>6} chunks   {adapter}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from domainchat.chat import drain
    from domainchat.domains import load_registry
    from domainchat.safety import clean_question
    from domainchat.settings import load_settings

    question = " ".join(args.question)
    load_registry(load_settings().domains_dir).get(args.domain)  # fail fast, before loading the model
    clean_question(question)
    with _running_assistant() as assistant:
        events = assistant.answer(args.domain, question, use_retrieval=not args.no_retrieval,
                                  use_adapter=not args.no_adapter)
        transcript = drain(events, on_token=None if args.json else lambda text: print(text, end="", flush=True))
    done, sources, notices = transcript.done, transcript.sources, transcript.notices_json()
    assert done is not None  # drain raises otherwise
    if args.json:
        print(json.dumps({
            "domain": args.domain,
            "answer": done.answer,
            "adapter": done.adapter,
            "abstained": done.abstained,
            "sources": [p.to_json() for p in sources],
            "notices": notices,
            "timing": done.timing,
        }, indent=2, ensure_ascii=False))
        return 0
    print()
    for number, passage in enumerate(sources, start=1):
        print(f"[{number}] {passage.title} — {passage.source} (score {passage.score:.2f})")
    for notice in notices:
        print(f"{notice['kind']}: {notice['text']}")
    return 0


def _domain_store(domain_id: str, *, sync: bool = False) -> tuple[str, KnowledgeStore]:
    """The domain's id (UnknownDomain otherwise) and the knowledge store. With `sync`, the domain's
    `knowledge/<id>/` folder is synced first, as the app does at start, so that what a command
    lists or removes is what the app serves (cheap when nothing changed)."""
    from domainchat.domains import load_registry
    from domainchat.knowledge import KnowledgeStore
    from domainchat.settings import load_settings

    settings = load_settings()
    domain = load_registry(settings.domains_dir).get(domain_id)
    store = KnowledgeStore.open(settings.home, settings.chroma_url, embed_model=settings.embed_model)
    if sync:
        store.sync_folder(domain.id, settings.knowledge_dir / domain.id)
    return domain.id, store


def cmd_ingest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    domain_id, store = _domain_store(args.domain)
    with tqdm(total=0, unit="file", desc=f"ingest {domain_id}", disable=args.json, file=sys.stderr) as bar:

        def progress(done: int, total: int, current: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(current[-40:], refresh=True)

        report = store.ingest(domain_id, [Path(p) for p in args.paths], progress=progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print(f"{report.files} files: {report.chunks_added} chunks added, {report.chunks_unchanged} unchanged, "
              f"{report.chunks_removed} removed; {store.count(domain_id)} chunks in '{domain_id}'.")
        for flagged in report.flagged:
            print(f"note: {flagged['file']}: {flagged['findings']} instruction-like passage(s) neutralized "
                  "(documents are data, not instructions)", file=sys.stderr)
        for error in report.errors:
            print(f"error: {error['error']}", file=sys.stderr)
    return EXIT_BAD_INPUT if report.errors else 0


def cmd_docs(args: argparse.Namespace) -> int:
    domain_id, store = _domain_store(args.domain, sync=True)
    documents = store.documents(domain_id)
    if args.json:
        print(json.dumps([d.to_json() for d in documents], indent=2, ensure_ascii=False))
        return 0
    if not documents:
        print(f"No documents in '{domain_id}'; add some with `domainchat ingest --domain {domain_id} PATH...`.")
    else:
        width = max(len("source"), *(len(d.source) for d in documents))
        print(f"{'source':<{width}}  {'origin':<9}  {'chunks':>6}  {'added':<25}  flagged")
        for d in documents:
            print(f"{d.source:<{width}}  {d.origin or '?':<9}  {d.chunks:>6}  {d.added or 'unknown':<25}  "
                  f"{'yes' if d.flagged else ''}")
    removed = store.removed(domain_id)
    if removed:  # otherwise a removed shipped document would be gone with no trace of how to get it back
        print(f"\nRemoved, and kept out of the start-up sync until ingested again: {', '.join(sorted(removed))}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    domain_id, store = _domain_store(args.domain, sync=True)
    report = store.remove_documents(domain_id, args.sources)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        if report.removed:
            print(f"removed {', '.join(report.removed)}: {report.chunks_removed} chunks; "
                  f"{store.count(domain_id)} chunks left in '{domain_id}'.")
        for error in report.errors:
            print(f"error: {error['error']}", file=sys.stderr)
    return 0 if report.removed else EXIT_BAD_INPUT


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from domainchat import train
    from domainchat.chat import sync_knowledge
    from domainchat.domains import load_registry
    from domainchat.knowledge import KnowledgeStore
    from domainchat.settings import load_settings

    settings = load_settings()
    registry = load_registry(settings.domains_dir)
    domain = registry.get(args.domain)
    config = train.TrainingConfig.from_domain(domain, epochs=args.epochs, max_steps=args.max_steps, qlora=args.qlora)
    out = Path(args.out) if args.out else settings.adapters_dir / domain.id
    store = KnowledgeStore.open(settings.home, settings.chroma_url, embed_model=settings.embed_model)
    sync_knowledge(store, settings, registry)
    with tqdm(total=0, unit="step", desc=f"train {domain.id}", file=sys.stderr) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}", refresh=True)

        result = train.train(settings, domain, store, config, out, force=args.force, progress=progress,
                             with_feedback=args.with_feedback)
    print(f"adapter written to {result.out} ({result.steps} steps, {result.seconds:.0f} s, "
          f"held-out loss {result.held_out_loss if result.held_out_loss is not None else 'n/a'})")
    if result.feedback is not None:
        skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in result.feedback["skipped"].items() if n)
        print(f"feedback: {result.feedback['used']} examples used" + (f"; skipped: {skipped}" if skipped else ""))
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from domainchat import feedback
    from domainchat.domains import load_registry
    from domainchat.settings import load_settings

    if args.limit < 0:
        raise BadInput(f"--limit must be 0 or more (the latest entries to list); got {args.limit}.")
    settings = load_settings()
    domain = load_registry(settings.domains_dir).get(args.domain)
    log = feedback.read(settings.home, domain.id)
    latest = list(reversed(log.entries))[:args.limit]
    if args.json:
        print(json.dumps({"domain": domain.id, "file": str(log.path), "counts": log.counts(),
                          "latest": [e.to_json() for e in latest]}, indent=2, ensure_ascii=False))
        return 0
    counts = log.counts()
    if not log.entries and not log.unreadable:
        print(f"No feedback for '{domain.id}' yet: the page's 👍/👎 record it in {log.path}.")
        return 0
    print(f"{domain.id}: {counts['entries']} entries ({counts['up']} up, {counts['down']} down, "
          f"{counts['corrected']} corrected) in {log.path}")
    if log.unreadable:
        print(f"{log.unreadable} unreadable line(s) skipped (cut short by a crash, or edited by hand); "
              "the file is left as it is.")
    if latest:
        print(f"\nLatest {len(latest)}, newest first:")
    for entry in latest:
        marks = " ".join(m for m, on in (("corrected", entry.correction is not None), ("abstained", entry.abstained),
                                          ("stopped", entry.stopped)) if on)
        question = entry.question if len(entry.question) <= 70 else entry.question[:69] + "…"
        print(f"{entry.time}  {entry.vote:<4}  {marks:<20}  {question}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from domainchat import eval_report, evaluate
    from domainchat.domains import load_registry
    from domainchat.settings import load_settings

    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in evaluate.CONFIGS]
    if unknown:
        raise BadInput(f"unknown configuration {unknown[0]!r}; choose from {', '.join(evaluate.CONFIGS)}.")
    evaluate.check_batch(args.batch)  # fail fast, before loading the model
    registry = load_registry(load_settings().domains_dir)
    domain_ids = [registry.get(args.domain).id] if args.domain else list(registry.domains)
    for domain_id in domain_ids:
        evaluate.load_eval(registry.get(domain_id))
    with _running_assistant() as assistant, \
            tqdm(desc="eval", unit="answer", disable=args.json, file=sys.stderr) as bar:
        report = evaluate.run_eval(assistant, domain_ids, configs, args.limit,
                                   progress=lambda what: (bar.set_postfix_str(what), bar.update()),
                                   counterfactual=args.counterfactual, unseen=args.unseen,
                                   perplexity=not args.no_perplexity, batch=args.batch)
    written = eval_report.write_report(report, Path(args.out))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(eval_report.markdown(report))
        print(eval_report.answers_markdown(report))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from domainchat import bench, bench_http
    from domainchat.settings import load_settings

    settings = load_settings()
    with tqdm(total=10 + 5 * args.http, desc="bench", file=sys.stderr, disable=args.json) as bar:
        def progress(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        # The client-side part first: the in-process part opens the knowledge store, which then
        # stays locked to this process, and the server it starts must open that store.
        client_side = bench_http.run_http_bench(settings, progress=progress) if args.http else {}
        report = {**bench.run_bench(settings, progress=progress), **client_side}
    bench.check_targets(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "bench.md").write_text("# domainchat bench\n\n" + bench.bench_markdown(report), encoding="utf-8")
    print(json.dumps(report, indent=2) if args.json else bench.bench_markdown(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domainchat", description="A vertical-domain chatbot.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the web app (UI at /, API at /v1)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7860)
    serve.set_defaults(run=cmd_serve)

    domains = sub.add_parser("domains", help="list domains, their adapters and knowledge")
    domains.add_argument("--json", action="store_true")
    domains.set_defaults(run=cmd_domains)

    ingest = sub.add_parser("ingest", help="add files or folders to a domain's knowledge base")
    ingest.add_argument("--domain", required=True)
    ingest.add_argument("--json", action="store_true")
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    ingest.set_defaults(run=cmd_ingest)

    docs = sub.add_parser("docs", help="list a domain's documents: origin, chunks, when added, whether flagged")
    docs.add_argument("--domain", required=True)
    docs.add_argument("--json", action="store_true")
    docs.set_defaults(run=cmd_docs)

    remove = sub.add_parser("remove", help="remove documents from a domain's knowledge base "
                                           "(shipped ones stay out until ingested again)")
    remove.add_argument("--domain", required=True)
    remove.add_argument("--json", action="store_true")
    remove.add_argument("sources", nargs="+", metavar="SOURCE", help="a document's source, as `docs` lists it")
    remove.set_defaults(run=cmd_remove)

    ask = sub.add_parser("ask", help="answer one question")
    ask.add_argument("--domain", required=True)
    ask.add_argument("--json", action="store_true")
    ask.add_argument("--no-retrieval", action="store_true", help="answer without the knowledge base")
    ask.add_argument("--no-adapter", action="store_true", help="answer with the base model alone")
    ask.add_argument("question", nargs="+")
    ask.set_defaults(run=cmd_ask)
    training = sub.add_parser("train", help="train a domain's LoRA adapter on its train.jsonl")
    training.add_argument("--domain", required=True)
    training.add_argument("--epochs", type=float)
    training.add_argument("--max-steps", type=int)
    training.add_argument("--out", help="adapter folder (default: adapters/<id>)")
    training.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=None,
                          help="train on the 4-bit base (QLoRA) or, with --no-qlora, on the fp32 base "
                               "(default: the domain's training.qlora, else QLoRA)")
    training.add_argument("--force", action="store_true", help="replace an existing adapter")
    training.add_argument("--with-feedback", action="store_true",
                          help="also train on the liked and corrected answers recorded from the page "
                               "(DOMAINCHAT_HOME/feedback/<id>.jsonl)")
    training.set_defaults(run=cmd_train)

    feedback = sub.add_parser("feedback", help="the 👍/👎 and corrections given to a domain's answers")
    feedback.add_argument("--domain", required=True)
    feedback.add_argument("--json", action="store_true")
    feedback.add_argument("--limit", type=int, default=10, help="latest entries to list (default 10)")
    feedback.set_defaults(run=cmd_feedback)

    bench = sub.add_parser("bench", help="measure speed and memory; writes bench.json and bench.md")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--out", default="out/bench")
    bench.add_argument("--http", action="store_true",
                       help="also start `domainchat serve` and measure it with the OpenAI client, as callers see it")
    bench.set_defaults(run=cmd_bench)

    evaluation = sub.add_parser("eval", help="measure retrieval and answer quality on each domain's eval.jsonl")
    evaluation.add_argument("--domain")
    evaluation.add_argument("--out", default="out/eval")
    evaluation.add_argument("--json", action="store_true")
    evaluation.add_argument("--configs", default="base,base+rag,adapter,adapter+rag",
                            help="comma-separated: base, base+rag, base+rag-no-fewshot, adapter, "
                                 "adapter+rag-ungrounded (no evidence opening, no number guard), adapter+rag-free "
                                 "(the model's continuation unchecked), adapter+rag-evidence (the quoted evidence "
                                 "alone), adapter+rag-whole-passages (the model reads whole passages, not only "
                                 "the quoted evidence), adapter+rag")
    evaluation.add_argument("--limit", type=int, help="at most this many answerable questions per domain")
    evaluation.add_argument("--batch", type=int, default=4,
                            help="questions answered at once, as rows of one decode step (1 to 16; default 4)")
    evaluation.add_argument("--no-perplexity", action="store_true",
                            help="skip the perplexity of the reference answers (minutes per domain on a CPU)")
    evaluation.add_argument("--counterfactual", action="store_true",
                            help="also answer from a copy of the knowledge whose key-fact numbers are changed")
    evaluation.add_argument("--unseen", action="store_true",
                            help="also answer from domains/<id>/unseen/ (documents no adapter was trained on)")
    evaluation.set_defaults(run=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.run(args)
    except DomainchatError as exc:
        print(f"domainchat: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130

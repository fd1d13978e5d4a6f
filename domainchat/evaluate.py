"""Evaluate: the quality harness (`domainchat eval`) over each domain's held-out eval.jsonl.

Measures retrieval (hit@k, MRR), abstention on out-of-scope questions, and the key-fact recall of
generated answers under several configurations (base model or adapter, with or without
retrieval), and writes eval.json, eval.md and bar charts. It drives the pipeline only through
`chat.Assistant` and knows nothing of how the pieces inside work.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from domainchat.chat import Assistant, Done
from domainchat.domains import Domain
from domainchat.engine import GenerationParams
from domainchat.errors import BadInput

EVAL_FILE = "eval.jsonl"
# name -> (use_adapter, use_retrieval)
CONFIGS: dict[str, tuple[bool, bool]] = {
    "base": (False, False),
    "base+rag": (False, True),
    "adapter": (True, False),
    "adapter+rag": (True, True),
}
EVAL_PARAMS = GenerationParams(max_new_tokens=160, temperature=0.0, repetition_penalty=1.1, no_repeat_ngram=4)


@dataclass(frozen=True)
class EvalItem:
    id: str
    question: str
    answerable: bool
    source: str | None = None
    key_facts: tuple[str, ...] = ()
    reference_answer: str | None = None


def load_eval(domain: Domain) -> list[EvalItem]:
    """The domain's eval.jsonl; a malformed line is reported as file:line with the reason."""
    assert domain.folder is not None
    path = domain.folder / EVAL_FILE
    if not path.is_file():
        raise BadInput(f"{path}: missing; `domainchat eval` needs an {EVAL_FILE} for domain '{domain.id}'.")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            items.append(EvalItem(
                id=str(raw["id"]), question=str(raw["question"]), answerable=bool(raw["answerable"]),
                source=raw.get("source"), key_facts=tuple(raw.get("key_facts", ())),
                reference_answer=raw.get("reference_answer"),
            ))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{path}:{number}: not a valid eval line ({type(exc).__name__}: {exc}).") from None
    return items


def key_fact_recall(answer: str, facts: Sequence[str]) -> float:
    if not facts:
        return 0.0
    lowered = answer.lower()
    return sum(fact.lower() in lowered for fact in facts) / len(facts)


def retrieval_metrics(assistant: Assistant, domain: Domain, items: Sequence[EvalItem]) -> dict:
    k = domain.retrieval.k
    ranks, top_scores_in, top_scores_out = [], [], []
    for item in items:
        passages = assistant.knowledge.search(domain.id, item.question, k) if assistant.knowledge else []
        top = max((p.score for p in passages), default=0.0)
        if item.answerable:
            sources = [p.source for p in passages]
            ranks.append(sources.index(item.source) + 1 if item.source in sources else None)
            top_scores_in.append(top)
        else:
            top_scores_out.append(top)
    answerable = len(ranks) or 1
    return {
        "k": k,
        "min_score": domain.retrieval.min_score,
        "answerable": len(ranks),
        "out_of_scope": len(top_scores_out),
        "hit_at_k": round(sum(r is not None for r in ranks) / answerable, 3),
        "mrr": round(sum(1 / r for r in ranks if r) / answerable, 3),
        "abstention_out_of_scope": round(
            sum(s < domain.retrieval.min_score for s in top_scores_out) / (len(top_scores_out) or 1), 3),
        "false_abstention": round(sum(s < domain.retrieval.min_score for s in top_scores_in) / answerable, 3),
    }


def generation_metrics(
    assistant: Assistant, domain: Domain, items: Sequence[EvalItem], config: str,
    progress: Callable[[str], None] | None = None,
) -> dict:
    use_adapter, use_retrieval = CONFIGS[config]
    recalls, samples, abstained = [], [], 0
    for item in items:
        if not item.answerable:
            continue
        done = next(e for e in assistant.answer(domain.id, item.question, use_retrieval=use_retrieval,
                                                use_adapter=use_adapter, params=EVAL_PARAMS)
                    if isinstance(e, Done))
        abstained += done.abstained
        recalls.append(key_fact_recall(done.answer, item.key_facts))
        samples.append({"id": item.id, "question": item.question, "answer": done.answer,
                        "recall": round(recalls[-1], 3), "adapter": done.adapter})
        if progress:
            progress(f"{domain.id} {config} {len(recalls)}")
    return {"key_fact_recall": round(statistics.mean(recalls), 3) if recalls else None,
            "answered": len(recalls), "abstained": abstained, "samples": samples}


def run_eval(
    assistant: Assistant, domain_ids: Sequence[str], configs: Sequence[str], limit: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    report: dict = {"base_model": assistant.engine.base_source if assistant.engine else None,
                    "quant": assistant.settings.quant, "params": EVAL_PARAMS.__dict__, "domains": {}}
    for domain_id in domain_ids:
        domain = assistant.registry.get(domain_id)
        items = load_eval(domain)
        entry: dict = {"retrieval": retrieval_metrics(assistant, domain, items), "generation": {}}
        answerable = [i for i in items if i.answerable][:limit] if limit else items
        for config in configs:
            use_adapter, _ = CONFIGS[config]
            if use_adapter and not assistant.engine.available(domain.id) or (
                    use_adapter and domain.id not in assistant.engine.adapters):
                entry["generation"][config] = {"key_fact_recall": None, "skipped": "no usable adapter"}
                continue
            entry["generation"][config] = generation_metrics(assistant, domain, answerable, config, progress)
        report["domains"][domain_id] = entry
    return report


def markdown(report: dict) -> str:
    configs = sorted({c for d in report["domains"].values() for c in d["generation"]}, key=list(CONFIGS).index)
    lines = ["| domain | hit@k | MRR | abstain (out of scope) | false abstain | "
             + " | ".join(f"key facts: {c}" for c in configs) + " |",
             "|---|---|---|---|---|" + "---|" * len(configs)]
    for domain_id, entry in report["domains"].items():
        r = entry["retrieval"]
        facts = [entry["generation"][c].get("key_fact_recall") for c in configs]
        lines.append(f"| {domain_id} | {r['hit_at_k']} | {r['mrr']} | {r['abstention_out_of_scope']} | "
                     f"{r['false_abstention']} | " + " | ".join("–" if f is None else str(f) for f in facts) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "eval.md").write_text("# domainchat eval\n\n" + markdown(report), encoding="utf-8")
    written = [out_dir / "eval.json", out_dir / "eval.md"]
    domains = list(report["domains"])
    configs = sorted({c for d in report["domains"].values() for c in d["generation"]}, key=list(CONFIGS).index)
    if configs:
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            values = [report["domains"][d]["generation"][config].get("key_fact_recall") or 0 for d in domains]
            ax.bar([x + i * width for x in range(len(domains))], values, width, label=config)
        ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(domains))], domains)
        ax.set_ylabel("key-fact recall")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("Key facts in generated answers, per configuration")
        fig.tight_layout()
        fig.savefig(out_dir / "key_facts.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "key_facts.png")
    fig, ax = plt.subplots(figsize=(8, 4))
    metrics = ["hit_at_k", "mrr", "abstention_out_of_scope"]
    for i, metric in enumerate(metrics):
        ax.bar([x + i * 0.27 for x in range(len(domains))], [report["domains"][d]["retrieval"][metric] for d in domains],
               0.27, label=metric)
    ax.set_xticks([x + 0.27 for x in range(len(domains))], domains)
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Retrieval")
    fig.tight_layout()
    fig.savefig(out_dir / "retrieval.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "retrieval.png")
    return written

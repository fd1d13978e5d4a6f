"""Eval report: `domainchat eval`'s report (the dict evaluate.run_eval returns) as files: eval.json,
eval.md (retrieval, abstention, risk rules, perplexity and the grounding measures of the answers),
side-by-side samples of two configurations per domain, and bar charts.

It only reads the report: it knows nothing of models, stores or how the figures were measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from domainchat.evaluate import CONFIGS

SIDE_BY_SIDE = 5  # answers per domain in samples_<domain>.md


def markdown(report: dict) -> str:
    configs = sorted({c for d in report["domains"].values() for c in d["generation"]}, key=list(CONFIGS).index)
    lines = ["| domain | hit@k | MRR | abstain (out of scope) | false abstain | risk rules fired (false) | "
             "perplexity base → adapter (ratio) | " + " | ".join(f"key facts / cited: {c}" for c in configs) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(configs)]
    for domain_id, entry in report["domains"].items():
        r = entry["retrieval"]
        risk = entry.get("risk", {})
        ppl = entry.get("perplexity", {})
        risk_cell = (f"{risk['trigger_rate']} of {risk['checks']} ({len(risk['false_triggers'])})"
                     if risk.get("checks") else "–")
        cells = [risk_cell,
                 f"{ppl['base']} → {ppl['adapter']} ({ppl.get('ratio')})" if ppl.get("adapter") else "–"]
        for c in configs:
            g = entry["generation"][c]
            recall = g.get("key_fact_recall")
            cells.append("–" if recall is None else f"{recall} / {g.get('citation_rate')}")
        lines.append(f"| {domain_id} | {r['hit_at_k']} | {r['mrr']} | {r['abstention_out_of_scope']} | "
                     f"{r['false_abstention']} | " + " | ".join(cells) + " |")
    followups = {d: e["retrieval"] for d, e in report["domains"].items() if e["retrieval"].get("followups")}
    if followups:
        lines += ["", "| domain | follow-up questions | hit@k with the previous question | hit@k alone |",
                  "|---|---|---|---|"]
        lines += [f"| {d} | {r['followups']} | {r['followup_hit_at_k']} | {r['followup_hit_at_k_question_only']} |"
                  for d, r in followups.items()]
    return "\n".join(lines) + "\n"


def answers_markdown(report: dict) -> str:
    """One row per domain, configuration and knowledge (its own, counterfactual, unseen): the
    grounding measures of the generated answers."""
    lines = ["| domain | knowledge | configuration | answers | key facts | ceiling (in passages) | of ceiling | "
             "unsupported numbers / answer | citation precision | cited | words mean (max) | memorized |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for domain_id, entry in report["domains"].items():
        suites = [("own", entry.get("generation", {})), ("counterfactual", entry.get("counterfactual", {})),
                  ("unseen", entry.get("unseen", {}))]
        for knowledge, results in suites:
            for config, g in results.items():
                if not isinstance(g, dict) or not g.get("answered"):
                    continue
                share = (round(g["key_fact_recall"] / g["oracle_ceiling"], 2) if g.get("oracle_ceiling") else "–")
                lines.append(
                    f"| {domain_id} | {knowledge} | {config} | {g['answered']} | {g['key_fact_recall']} | "
                    f"{g.get('oracle_ceiling')} | {share} | {g.get('unsupported_numbers_per_answer')} | "
                    f"{g.get('citation_precision')} | {g.get('citation_rate')} | {g.get('words_mean')} "
                    f"({g.get('words_max')}) | {g.get('memorized', '–')} |")
    return "\n".join(lines) + "\n"


def side_by_side(report: dict, domain_id: str, left: str = "base+rag", right: str = "adapter+rag",
                 count: int = SIDE_BY_SIDE) -> str | None:
    """Markdown with the first `count` answers of two configurations next to each other, or None
    when either configuration did not run for the domain."""
    generation = report["domains"][domain_id]["generation"]
    if "samples" not in generation.get(left, {}) or "samples" not in generation.get(right, {}):
        return None
    lines = [f"# {domain_id}: {left} versus {right}", ""]
    for a, b in list(zip(generation[left]["samples"], generation[right]["samples"], strict=True))[:count]:
        lines += [f"## {a['id']}: {a['question']}", "",
                  f"**{left}** (key facts {a['recall']}):", "", "> " + a["answer"].replace("\n", "\n> "), "",
                  f"**{right}** (key facts {b['recall']}):", "", "> " + b["answer"].replace("\n", "\n> "), ""]
    return "\n".join(lines)


def _bar_chart(path: Path, groups: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> Path:
    """Grouped bars: one group per domain, one bar per series (scores or ratios, from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max([1.05] + [v * 1.1 for values in series.values() for v in values]))
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "eval.md").write_text("# domainchat eval\n\n" + markdown(report) + "\n## Answers\n\n"
                                     + answers_markdown(report), encoding="utf-8")
    written = [out_dir / "eval.json", out_dir / "eval.md"]
    domains = list(report["domains"])
    configs = sorted({c for d in report["domains"].values() for c in d["generation"]}, key=list(CONFIGS).index)
    if configs:
        series = {c: [report["domains"][d]["generation"][c].get("key_fact_recall") or 0 for d in domains]
                  for c in configs}
        written.append(_bar_chart(out_dir / "key_facts.png", domains, series,
                                  "Key facts in generated answers, per configuration", "key-fact recall"))
    for domain_id in domains:
        text = (side_by_side(report, domain_id, left="adapter+rag-free") or
                side_by_side(report, domain_id, left="adapter+rag-ungrounded") or side_by_side(report, domain_id))
        if text:
            (out_dir / f"samples_{domain_id}.md").write_text(text, encoding="utf-8")
            written.append(out_dir / f"samples_{domain_id}.md")
    measured = [d for d in domains if report["domains"][d].get("perplexity", {}).get("ratio")]
    if measured:
        ratios = {"adapter / base perplexity": [report["domains"][d]["perplexity"]["ratio"] for d in measured]}
        written.append(_bar_chart(out_dir / "perplexity.png", measured, ratios,
                                  "Reference-answer perplexity, adapter relative to base (lower is better)", "ratio"))
    metrics = ["hit_at_k", "mrr", "abstention_out_of_scope"]
    series = {m: [report["domains"][d]["retrieval"][m] for d in domains] for m in metrics}
    written.append(_bar_chart(out_dir / "retrieval.png", domains, series, "Retrieval", ""))
    return written

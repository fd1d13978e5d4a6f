"""Eval report tests: the report dict as Markdown tables, side-by-side samples and chart files."""

from __future__ import annotations

from pathlib import Path

from domainchat.eval_report import markdown, side_by_side, write_report


def test_markdown_table() -> None:
    report = {"domains": {"finance": {
        "retrieval": {"hit_at_k": 1.0, "mrr": 0.9, "abstention_out_of_scope": 1.0, "false_abstention": 0.0},
        "generation": {"base+rag": {"key_fact_recall": 0.5, "citation_rate": 0.25},
                       "adapter+rag": {"key_fact_recall": None, "skipped": "no usable adapter"}}}}}
    table = markdown(report)
    assert "| finance | 1.0 | 0.9 | 1.0 | 0.0 | – | – | 0.5 / 0.25 | – |" in table
    report["domains"]["finance"]["perplexity"] = {"base": 9.0, "adapter": 6.0, "ratio": 0.667}
    report["domains"]["finance"]["risk"] = {"checks": 4, "trigger_rate": 0.75, "missed": ["r1"], "false_triggers": []}
    row = "| finance | 1.0 | 0.9 | 1.0 | 0.0 | 0.75 of 4 (0) | 9.0 → 6.0 (0.667) | 0.5 / 0.25 | – |"
    assert row in markdown(report)


def test_side_by_side_pairs_answers_of_two_configurations(tmp_path: Path) -> None:
    def samples(word: str) -> dict:
        return {"key_fact_recall": 0.5, "citation_rate": 1.0, "samples": [
            {"id": f"q{i}", "question": f"Question {i}?", "answer": f"{word} {i}", "recall": 0.5} for i in range(7)]}

    report = {"domains": {"finance": {
        "retrieval": {"hit_at_k": 1.0, "mrr": 1.0, "abstention_out_of_scope": 1.0, "false_abstention": 0.0},
        "perplexity": {"base": 9.0, "adapter": 6.0, "ratio": 0.667},
        "generation": {"base+rag": samples("base"), "adapter+rag": samples("tuned")}}}}
    text = side_by_side(report, "finance")
    assert text.count("## q") == 5 and "> base 4" in text and "> tuned 4" in text and "q5" not in text
    written = {p.name for p in write_report(report, tmp_path)}
    assert {"samples_finance.md", "perplexity.png", "key_facts.png", "eval.md"} <= written
    del report["domains"]["finance"]["generation"]["adapter+rag"]
    assert side_by_side(report, "finance") is None

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domainchat.domains import Domain, load_registry
from domainchat.errors import BadInput
from domainchat.evaluate import key_fact_recall, load_eval


def test_key_fact_recall_is_case_insensitive_substring() -> None:
    assert key_fact_recall("The limit is $7,000 for people under 50.", ["$7,000", "Under 50", "Roth"]) == 2 / 3
    assert key_fact_recall("anything", []) == 0.0


def test_shipped_eval_sets_are_valid(domains_dir: Path) -> None:
    registry = load_registry(domains_dir)
    for domain in registry.domains.values():
        items = load_eval(domain)
        answerable = [i for i in items if i.answerable]
        assert len(answerable) >= 30 and len(items) - len(answerable) >= 10, domain.id
        knowledge = domains_dir.parent / "knowledge" / domain.id
        for item in answerable:
            text = (knowledge / item.source).read_text(encoding="utf-8").lower()
            assert item.key_facts and all(f.lower() in text for f in item.key_facts), item.id


def test_malformed_eval_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "a", "question": "q", "answerable": False}) + "\n{oops\n")
    domain = Domain(id="demo", title="Demo", description="", system_prompt="s", folder=tmp_path)
    with pytest.raises(BadInput, match=r"eval.jsonl:2"):
        load_eval(domain)


def test_risk_checks_count_misses_and_false_triggers(domains_dir: Path) -> None:
    from domainchat.evaluate import EvalItem, risk_metrics

    medical = load_registry(domains_dir).get("medical")
    items = [EvalItem("r1", "I have crushing chest pain right now", False, expect_rule="chest_pain"),
             EvalItem("r2", "What is a normal resting heart rate?", False, expect_rule="chest_pain"),
             EvalItem("q1", "How long does a cold last?", True),
             EvalItem("q2", "What does crushing chest pain mean?", True)]
    expected = {"checks": 2, "trigger_rate": 0.5, "missed": ["r2"], "false_triggers": ["q2"]}
    assert risk_metrics(medical, items) == expected


def test_shipped_risk_questions_name_real_rules(domains_dir: Path) -> None:
    for domain in load_registry(domains_dir).domains.values():
        checks = [i for i in load_eval(domain) if i.expect_rule]
        assert len(checks) >= 3 and {i.expect_rule for i in checks} <= {r.id for r in domain.risk_rules}, domain.id


@pytest.mark.slow
def test_eval_refuses_to_measure_what_is_missing(domain_assistant) -> None:
    """A configuration that needs an adapter, for a domain without one, or a domain whose knowledge
    base is empty: a clear error that says what to do, before any answer is generated."""
    from domainchat.chat import Assistant
    from domainchat.evaluate import check_ready

    check_ready(domain_assistant, ["finance"], ["base+rag", "adapter+rag"])  # has both
    check_ready(domain_assistant, ["medical"], ["base", "base+rag"])  # no adapter needed
    with pytest.raises(BadInput, match=r"'medical' has no usable adapter .*domainchat train --domain medical"):
        check_ready(domain_assistant, ["finance", "medical"], ["adapter+rag"])

    class EmptyKnowledge:  # the store's state is what this test is about, not search
        def count(self, domain_id: str) -> int:
            return 0

        def search(self, domain_id: str, question: str, k: int, context: str | None = None) -> list:
            return []

    empty = Assistant(domain_assistant.settings, domain_assistant.registry, domain_assistant.engine, EmptyKnowledge())
    with pytest.raises(BadInput, match=r"knowledge base of 'finance' is empty.*domainchat ingest --domain finance"):
        check_ready(empty, ["finance"], ["base"])


def test_answer_metrics_measure_grounding() -> None:
    from domainchat.evaluate import EvalItem, answer_metrics
    from domainchat.knowledge import Passage

    passages = [Passage("a.md:0:x", "a.md", "A", 0.9, "Returns are accepted within 38 days of delivery."),
                Passage("b.md:0:y", "b.md", "B", 0.8, "Standard shipping costs $7.45 below $75.")]
    item = EvalItem(id="q", question="How long do I have to return boots?", answerable=True,
                    key_facts=("38 days", "original box"))
    answer = ("Returns are accepted within 38 days of delivery [1]. Shipping is $7.45 [1].\n"
              "A 15% fee may apply [2].")
    m = answer_metrics(answer, item, passages)
    assert m["recall"] == 0.5 and m["oracle"] == 0.5
    assert m["unsupported_numbers"] == ["15"]
    # [1] backs the first sentence; the second cites [1] for a number only [2] has; [2] lacks the third's 15
    assert (m["citations"], m["citations_supported"]) == (3, 1)
    assert m["words"] == len(answer.split())


def test_counterfactual_changes_numbers_consistently() -> None:
    from domainchat.evaluate import EvalItem, counterfactual_items, counterfactual_numbers
    from domainchat.grounding import apply_numbers

    items = [EvalItem(id="a", question="q", answerable=True, key_facts=("30 days", "$6.99")),
             EvalItem(id="b", question="q", answerable=True, key_facts=("original packaging",)),
             EvalItem(id="c", question="q", answerable=False)]
    knowledge = ["1. Return within 30 days.\n2. The label costs $6.99; 41 people asked.", "Ship within 30 days."]
    mapping = counterfactual_numbers(items, knowledge)
    assert set(mapping) == {"30", "6.99"} and mapping["30"] != "41", "a changed number is new to the knowledge"
    changed = [apply_numbers(text, mapping) for text in knowledge]
    assert changed[0].startswith("1. Return within ") and "30" not in changed[0] + changed[1]
    assert f"${mapping['6.99']}" in changed[0] and f"within {mapping['30']} days" in changed[1]
    [item] = counterfactual_items(items, mapping)
    assert item.id == "a" and item.key_facts == (f"{mapping['30']} days", f"${mapping['6.99']}")


def test_unseen_company_eval_is_valid(domains_dir: Path) -> None:
    """customer_service's unseen/ set: another company's documents, none of its key facts in the
    shipped knowledge or training data (so an answer that has them read them)."""
    registry = load_registry(domains_dir)
    domain = registry.get("customer_service")
    folder = domains_dir / "customer_service" / "unseen"
    items = load_eval(domain, folder / "eval.jsonl")
    assert len(items) >= 25 and all(i.answerable for i in items)
    shipped_folder = domains_dir.parent / "knowledge" / "customer_service"
    shipped = "\n".join(p.read_text(encoding="utf-8") for p in shipped_folder.glob("*.md"))
    training = (domains_dir / "customer_service" / "train.jsonl").read_text(encoding="utf-8")
    for item in items:
        text = (folder / "knowledge" / item.source).read_text(encoding="utf-8").lower()
        assert item.key_facts and all(f.lower() in text for f in item.key_facts), item.id
        assert not any(f.lower() in shipped.lower() or f.lower() in training.lower() for f in item.key_facts), item.id


def test_followups_are_measured_as_served_and_alone(tmp_path) -> None:
    """A follow-up's hit@k with the previous question in the search, beside the question alone;
    single questions keep their own hit@k."""
    from domainchat.chat import Assistant
    from domainchat.domains import load_registry
    from domainchat.evaluate import load_eval, retrieval_metrics
    from domainchat.knowledge import Passage
    from domainchat.settings import PROJECT_ROOT, load_settings

    class TopicKnowledge:  # finds poa.md only when "attorney" is in the question or its context
        def count(self, domain_id: str) -> int:
            return 1

        def search(self, domain_id: str, question: str, k: int, context: str | None = None) -> list:
            said = f"{context or ''} {question}".lower()
            source = "poa.md" if "attorney" in said else "other.md"
            return [Passage(f"{source}:0:x", source, source, 0.9, "text")]

    lines = [
        '{"id": "s1", "question": "What is a power of attorney?", "answerable": true, "source": "poa.md"}',
        '{"id": "f1", "question": "Can I cancel it later?", "answerable": true, "source": "poa.md", '
        '"history": [["What is a power of attorney?", "A document that lets someone act for you."]]}',
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path)})
    registry = load_registry(PROJECT_ROOT / "domains")
    items = load_eval(registry.get("legal"), path)
    assert items[1].history == (("What is a power of attorney?", "A document that lets someone act for you."),)
    assistant = Assistant(settings, registry, engine=None, knowledge=TopicKnowledge())  # type: ignore[arg-type]
    metrics = retrieval_metrics(assistant, registry.get("legal"), items)
    assert (metrics["answerable"], metrics["hit_at_k"]) == (1, 1.0)
    assert metrics["followups"] == 1
    assert (metrics["followup_hit_at_k"], metrics["followup_hit_at_k_question_only"]) == (1.0, 0.0)


def test_batched_answers_run_together_and_keep_the_items_order(tmp_path) -> None:
    """--batch asks several questions at once (so the lean decoder batches them); the samples come back
    in the eval file's order whatever order the answers finish in. The assistant is a fake: what is
    tested is the eval's scheduling, not answers."""
    import threading
    import time

    from domainchat.chat import Done, Sources
    from domainchat.evaluate import EvalItem, generation_metrics
    from domainchat.knowledge import Passage
    from domainchat.settings import PROJECT_ROOT

    together = threading.Barrier(3, timeout=10)  # fails unless three answers are in flight at once

    class SlowAssistant:
        def answer(self, domain_id: str, question: str, history=(), **options):
            together.wait()
            time.sleep(0.05 * (3 - int(question[-1])))  # the first question finishes last
            yield Sources([Passage("a.md:0:x", "a.md", "a.md", 0.9, f"Fact {question[-1]}.")])
            yield Done(f"Fact {question[-1]} [1].", "finance", False)

    items = [EvalItem(f"q{i}", f"Question {i}", True, "a.md", (f"Fact {i}",)) for i in range(3)]
    domain = load_registry(PROJECT_ROOT / "domains").get("finance")
    result = generation_metrics(SlowAssistant(), domain, items, "adapter+rag", batch=3)  # type: ignore[arg-type]
    assert [s["id"] for s in result["samples"]] == ["q0", "q1", "q2"]
    assert [s["answer"] for s in result["samples"]] == ["Fact 0 [1].", "Fact 1 [1].", "Fact 2 [1]."]
    assert result["key_fact_recall"] == 1.0 and result["citation_precision"] == 1.0


def test_configurations_change_only_their_grounding_levers() -> None:
    from domainchat.chat import Done
    from domainchat.evaluate import EvalItem, generation_metrics
    from domainchat.settings import PROJECT_ROOT

    seen: dict[str, object] = {}

    class RecordingAssistant:
        def answer(self, domain_id: str, question: str, history=(), **options):
            seen[question] = options["grounding_settings"]
            yield Done("An answer.", "finance", False)

    domain = load_registry(PROJECT_ROOT / "domains").get("finance")
    for config in ("adapter+rag", "adapter+rag-free", "adapter+rag-ungrounded", "adapter+rag-evidence"):
        generation_metrics(RecordingAssistant(), domain, [EvalItem("q", config, True)], config)  # type: ignore[arg-type]
    assert seen["adapter+rag"] is None, "as served: the domain's own settings"
    free, ungrounded = seen["adapter+rag-free"], seen["adapter+rag-ungrounded"]
    assert (free.continuation, free.evidence_sentences, free.number_guard) == (
        "free", domain.grounding.evidence_sentences, True)
    assert (ungrounded.evidence_sentences, ungrounded.number_guard) == (0, False)
    evidence = seen["adapter+rag-evidence"]
    assert (evidence.continuation, evidence.evidence_sentences) == ("none", domain.grounding.evidence_sentences)

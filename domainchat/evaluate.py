"""Evaluate: the quality harness (`domainchat eval`) over each domain's held-out eval.jsonl.

Measures retrieval (hit@k, MRR), abstention on out-of-scope questions, risk rules, the perplexity
of the reference answers with and without the domain's adapter, and how well generated answers
keep to their passages under several configurations: key facts, the ceiling (key facts in the
passages given), unsupported numbers, citation precision and length. With --counterfactual it
answers again from a copy of the knowledge whose key-fact numbers are changed, and with --unseen
from another organisation's documents (domains/<id>/unseen/), each in a throwaway store. It
returns a report (a dict), which eval_report.py writes as files. It answers through
`chat.Assistant` and searches its knowledge store (opening throwaway stores for those two suites);
it knows nothing about the engine, and speed is bench.py's job.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from domainchat import safety
from domainchat.chat import Assistant, Transcript, drain
from domainchat.domains import Domain
from domainchat.errors import BadInput
from domainchat.generation import GenerationParams
from domainchat.grounding import (
    CITATION,
    apply_numbers,
    backs,
    changed_number,
    numbers_in,
    sentences_of_answer,
    unsupported_numbers,
)
from domainchat.knowledge import Passage

EVAL_FILE = "eval.jsonl"
UNSEEN_DIR = "unseen"  # domains/<id>/unseen/: knowledge/ and eval.jsonl that no adapter was trained on
# name -> (use_adapter, use_retrieval, use_few_shot, grounding); few-shot None = as served
# (prompts.few_shot_for); grounding: the domain's GroundingSettings fields this configuration
# changes (none: as served). "ungrounded" has no evidence opening and no number guard; "free" lets
# the model continue the opening for as long as it writes, unchecked (as answers were before
# GroundingSettings.continuation); "evidence" is the quoted evidence opening alone, no model text
# (what retrieval and sentence selection give by themselves).
CONFIGS: dict[str, tuple[bool, bool, bool | None, dict[str, Any]]] = {
    "base": (False, False, None, {}),
    "base+rag": (False, True, None, {}),
    "base+rag-no-fewshot": (False, True, False, {}),
    "adapter": (True, False, None, {}),
    "adapter+rag-ungrounded": (True, True, None, {"evidence_sentences": 0, "number_guard": False}),
    "adapter+rag-free": (True, True, None, {"continuation": "free"}),
    "adapter+rag-evidence": (True, True, None, {"continuation": "none"}),
    "adapter+rag": (True, True, None, {}),
    "adapter+rag-whole-passages": (True, True, None, {"prompt_passages": "whole"}),
    "adapter+rag-evidence-prompt": (True, True, None, {"prompt_passages": "evidence"}),
}
# Greedy, so runs compare; 128 tokens (~95 words) keeps a full eval of every answerable question
# within reach of 2 CPU cores, and answers are meant to stay under ~120 words anyway.
EVAL_PARAMS = GenerationParams(max_new_tokens=128, temperature=0.0, repetition_penalty=1.1, no_repeat_ngram=4)
# Questions answered at once (--batch). More rows than this gain nothing on a CPU: a decode step of
# four rows already takes ~2x one row's time on 2 cores (measured).
MAX_BATCH = 16


@dataclass(frozen=True)
class EvalItem:
    id: str
    question: str
    answerable: bool
    source: str | None = None
    key_facts: tuple[str, ...] = ()
    reference_answer: str | None = None
    expect_rule: str | None = None  # a risk question: the id of the rule it must trigger
    # Earlier (user, assistant) turns: the question is a follow-up that only makes sense after them.
    history: tuple[tuple[str, str], ...] = ()


def load_eval(domain: Domain, path: Path | None = None) -> list[EvalItem]:
    """The domain's eval.jsonl (or another file of eval lines); a malformed line is reported as
    file:line with the reason."""
    assert domain.folder is not None
    path = path or domain.folder / EVAL_FILE
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
                reference_answer=raw.get("reference_answer"), expect_rule=raw.get("expect_rule"),
                history=tuple((str(user), str(reply)) for user, reply in raw.get("history", ())),
            ))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{path}:{number}: not a valid eval line ({type(exc).__name__}: {exc}).") from None
    return items


def key_fact_recall(answer: str, facts: Sequence[str]) -> float:
    if not facts:
        return 0.0
    lowered = answer.lower()
    return sum(fact.lower() in lowered for fact in facts) / len(facts)


def answer_metrics(answer: str, item: EvalItem, passages: Sequence[Passage], history: Sequence[str] = ()) -> dict:
    """The per-answer measures: key facts in the answer, key facts in its passages (the ceiling),
    numbers the answer states that its passages, question and history do not, and for every
    citation [n] whether passage n backs the sentence that carries it."""
    given = "\n".join(p.text for p in passages)
    citations = supported = 0
    for sentence in sentences_of_answer(answer):
        for number in CITATION.findall(sentence):
            citations += 1
            n = int(number)
            supported += 1 <= n <= len(passages) and backs(passages[n - 1].text, sentence)
    return {"recall": round(key_fact_recall(answer, item.key_facts), 3),
            "oracle": round(key_fact_recall(given, item.key_facts), 3),
            "unsupported_numbers": unsupported_numbers(answer, [given, item.question, *history]),
            "citations": citations, "citations_supported": supported, "words": len(answer.split())}


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.mean(values), 3) if values else None


def _rank_of(source: str | None, passages: Sequence[Passage]) -> int | None:
    sources = [p.source for p in passages]
    return sources.index(source) + 1 if source in sources else None


def followup_metrics(assistant: Assistant, domain: Domain, items: Sequence[EvalItem]) -> dict:
    """hit@k of the follow-up questions (those with a history) as served, where retrieval also sees
    the previous question, beside the follow-up searched alone, in the same run."""
    followups = [i for i in items if i.history and i.answerable]
    if not followups:
        return {}
    served = [_rank_of(i.source, assistant.candidates(domain, i.question, i.history)) for i in followups]
    alone = [_rank_of(i.source, assistant.candidates(domain, i.question)) for i in followups]
    return {"followups": len(followups),
            "followup_hit_at_k": round(sum(r is not None for r in served) / len(followups), 3),
            "followup_hit_at_k_question_only": round(sum(r is not None for r in alone) / len(followups), 3)}


def retrieval_metrics(assistant: Assistant, domain: Domain, items: Sequence[EvalItem]) -> dict:
    """hit@k, MRR and abstention of the single questions (follow-ups: followup_metrics)."""
    k = domain.retrieval.k
    ranks, top_scores_in, top_scores_out = [], [], []
    for item in items:
        if item.expect_rule or item.history:
            continue  # a risk question gets its rule's fixed response before any retrieval
        passages = assistant.candidates(domain, item.question)
        top = max((p.score for p in passages), default=0.0)
        if item.answerable:
            ranks.append(_rank_of(item.source, passages))
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
        **followup_metrics(assistant, domain, items),
    }


def generation_metrics(
    assistant: Assistant, domain: Domain, items: Sequence[EvalItem], config: str,
    progress: Callable[[str], None] | None = None, batch: int = 1,
) -> dict:
    """Answer every answerable item under `config` and measure each answer. `batch` questions are
    asked at once, each from its own thread, so that the lean decoder runs them as the rows of one
    decode step; the samples keep the items' order."""
    use_adapter, use_retrieval, use_few_shot, changes = CONFIGS[config]
    grounding_settings = replace(domain.grounding, **changes) if changes else None
    answerable = [item for item in items if item.answerable]

    def ask(item: EvalItem) -> Transcript:
        return drain(assistant.answer(domain.id, item.question, item.history, use_retrieval=use_retrieval,
                                      use_adapter=use_adapter, use_few_shot=use_few_shot, params=EVAL_PARAMS,
                                      grounding_settings=grounding_settings))

    samples, abstained = [], 0
    with ThreadPoolExecutor(max_workers=batch) as pool:  # map yields in the items' order, as each is done
        for item, said in zip(answerable, pool.map(ask, answerable), strict=True):
            done, passages = said.done, said.sources
            assert done is not None  # drain raises otherwise
            abstained += done.abstained
            history = [text for turn in item.history for text in turn]
            samples.append({"id": item.id, "question": item.question, "answer": done.answer, "adapter": done.adapter,
                            "sources": [p.source for p in passages],
                            **answer_metrics(done.answer, item, passages, history)})
            if progress:
                progress(f"{domain.id} {config} {len(samples)}")
    return {**summary(samples), "abstained": abstained, "samples": samples}


def summary(samples: Sequence[dict]) -> dict:
    """Per-configuration means of the per-answer measures (answer_metrics)."""
    if not samples:
        return {"key_fact_recall": None, "answered": 0}
    citations = sum(s["citations"] for s in samples)
    return {"key_fact_recall": _mean([s["recall"] for s in samples]),
            "oracle_ceiling": _mean([s["oracle"] for s in samples]),
            "unsupported_numbers_per_answer": _mean([len(s["unsupported_numbers"]) for s in samples]),
            "citation_rate": _mean([s["citations"] > 0 for s in samples]),
            "citation_precision": (round(sum(s["citations_supported"] for s in samples) / citations, 3)
                                   if citations else None),
            "words_mean": _mean([s["words"] for s in samples]),
            "words_max": max(s["words"] for s in samples),
            "answered": len(samples)}


def risk_metrics(domain: Domain, items: Sequence[EvalItem]) -> dict:
    """Risk-rule checks: the held-out risk questions must trigger their rule; no other eval question
    may trigger any rule (a false trigger replaces or flags an ordinary answer)."""
    checks = [i for i in items if i.expect_rule]
    missed = [i.id for i in checks if i.expect_rule not in safety.triggered_rule_ids(domain, i.question)]
    false = [i.id for i in items if not i.expect_rule and safety.triggered_rule_ids(domain, i.question)]
    return {"checks": len(checks), "trigger_rate": round(1 - len(missed) / len(checks), 3) if checks else None,
            "missed": missed, "false_triggers": false}


def perplexity_metrics(assistant: Assistant, domain: Domain, items: Sequence[EvalItem],
                       progress: Callable[[str], None] | None = None) -> dict:
    """Perplexity of the reference answers, retrieval on, base versus the domain's adapter: each
    prompt exactly as served (prompts.few_shot_for). Token-weighted over all answers."""
    scored = [i for i in items if i.answerable and i.reference_answer]
    report: dict = {"answers": len(scored)}
    for label, use_adapter in (("base", False), ("adapter", True)):
        total, tokens = 0.0, 0
        for item in scored:
            nll, n = assistant.reference_nll(domain.id, item.question, item.reference_answer, use_adapter)
            total, tokens = total + nll, tokens + n
            if progress:
                progress(f"{domain.id} perplexity {label}")
        report[label] = round(math.exp(total / tokens), 3) if tokens else None
    if report.get("base") and report.get("adapter"):
        report["ratio"] = round(report["adapter"] / report["base"], 3)
    return report


def fill_knowledge_hint(domain_id: str) -> str:
    """What to do about an empty knowledge base (shared by eval's and bench's messages)."""
    return f"put documents in knowledge/{domain_id}/ (or run `domainchat ingest --domain {domain_id} PATH`)"


def check_batch(batch: int) -> None:
    if not 1 <= batch <= MAX_BATCH:
        raise BadInput(f"--batch must be between 1 and {MAX_BATCH} (questions answered at once); got {batch}.")


def check_ready(assistant: Assistant, domain_ids: Sequence[str], configs: Sequence[str]) -> None:
    """Raise BadInput, saying what to do, when a domain lacks what the requested eval needs: a
    knowledge base, or a usable adapter for a configuration that uses one. Numbers measured without
    them would look like results and mean nothing."""
    needs_adapter = [c for c in configs if CONFIGS[c][0]]
    for domain_id in domain_ids:
        domain = assistant.registry.get(domain_id)
        if assistant.knowledge is None or assistant.knowledge.count(domain_id) == 0:
            raise BadInput(f"The knowledge base of '{domain_id}' is empty: {fill_knowledge_hint(domain_id)}, then run "
                           "the eval again.")
        adapter, why = assistant.adapter_for(domain)
        if adapter is None and needs_adapter:
            raise BadInput(f"'{domain_id}' has no usable adapter ({why}), which {', '.join(needs_adapter)} needs: "
                           f"train one with `domainchat train --domain {domain_id}`, or leave it out, e.g. "
                           "--configs base,base+rag.")


def counterfactual_numbers(items: Sequence[EvalItem], knowledge_texts: Sequence[str]) -> dict[str, str]:
    """original -> changed, for every number stated in the answerable items' key facts; no changed
    number occurs anywhere in the knowledge (so an answer that has it read it)."""
    taken = {n for text in knowledge_texts for n in numbers_in(text)}
    mapping: dict[str, str] = {}
    for item in items:
        for fact in item.key_facts:
            for number in numbers_in(fact):
                if number not in mapping:
                    mapping[number] = changed_number(number, taken | set(mapping.values()))
    return mapping


def counterfactual_items(items: Sequence[EvalItem], mapping: dict[str, str]) -> list[EvalItem]:
    """The answerable items whose key facts contain a changed number, with those facts changed."""
    changed = []
    for item in items:
        if item.answerable and any(numbers_in(f) for f in item.key_facts):
            changed.append(replace(item, key_facts=tuple(apply_numbers(f, mapping) for f in item.key_facts),
                                   reference_answer=apply_numbers(item.reference_answer or "", mapping)))
    return changed


def memorized_rate(samples: Sequence[dict], originals: dict[str, EvalItem],
                   changed: dict[str, EvalItem]) -> float | None:
    """The share of answers that give a key fact's original figure without its changed one."""
    memorized = 0
    for sample in samples:
        answer = sample["answer"].lower()
        pairs = zip(originals[sample["id"]].key_facts, changed[sample["id"]].key_facts, strict=True)
        memorized += any(b.lower() in answer and a.lower() not in answer for b, a in pairs if a != b)
    return round(memorized / len(samples), 3) if samples else None


def _throwaway_assistant(assistant: Assistant, domain_id: str, folder: Path, home: Path) -> Assistant:
    """The same engine over a fresh embedded store holding only `folder`'s documents for the domain."""
    from domainchat.knowledge import KnowledgeStore

    store = KnowledgeStore.open(home, None, getattr(assistant.knowledge, "embeddings", None),
                                assistant.settings.embed_model)
    report = store.ingest(domain_id, [folder], origin="eval")
    if report.errors:
        raise BadInput(f"{folder}: could not ingest {report.errors[0]}.")
    return Assistant(assistant.settings, assistant.registry, assistant.engine, store)


def counterfactual_metrics(assistant: Assistant, domain: Domain, items: Sequence[EvalItem], configs: Sequence[str],
                           knowledge_dir: Path, progress: Callable[[str], None] | None = None,
                           batch: int = 1) -> dict:
    """Key-fact recall when the numbers of the key facts are changed consistently in every document
    of the domain (and in the key facts), and how often an answer still gives the original figure
    instead of the changed one ("memorized"): reading versus remembering."""
    import tempfile

    files = sorted(p for p in knowledge_dir.rglob("*") if p.is_file())
    texts = {p: p.read_text(encoding="utf-8", errors="replace") for p in files}
    mapping = counterfactual_numbers(items, list(texts.values()))
    changed = counterfactual_items(items, mapping)
    originals = {i.id: i for i in items}
    report: dict = {"changed_numbers": len(mapping), "questions": len(changed)}
    with tempfile.TemporaryDirectory(prefix="domainchat-counterfactual-") as tmp:
        copy = Path(tmp) / "knowledge"
        for path, text in texts.items():
            target = copy / path.relative_to(knowledge_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(apply_numbers(text, mapping), encoding="utf-8")
        reader = _throwaway_assistant(assistant, domain.id, copy, Path(tmp) / "home")
        for config in configs:
            if not CONFIGS[config][1]:
                continue  # without retrieval there is no document to follow
            result = generation_metrics(reader, domain, changed, config, progress, batch)
            result["memorized"] = memorized_rate(result["samples"], originals, {i.id: i for i in changed})
            report[config] = result
    return report


def unseen_metrics(assistant: Assistant, domain: Domain, configs: Sequence[str], limit: int | None,
                   progress: Callable[[str], None] | None = None, batch: int = 1) -> dict | None:
    """Key-fact recall on `domains/<id>/unseen/`: another organisation's documents and questions that
    no adapter was trained on, ingested in place of the domain's own knowledge, as an adopter would."""
    import tempfile

    assert domain.folder is not None
    folder = domain.folder / UNSEEN_DIR
    if not (folder / EVAL_FILE).is_file():
        return None
    items = [i for i in load_eval(domain, folder / EVAL_FILE) if i.answerable][:limit]
    report: dict = {"questions": len(items)}
    with tempfile.TemporaryDirectory(prefix="domainchat-unseen-") as tmp:
        reader = _throwaway_assistant(assistant, domain.id, folder / "knowledge", Path(tmp) / "home")
        for config in configs:
            if CONFIGS[config][1]:
                report[config] = generation_metrics(reader, domain, items, config, progress, batch)
    return report


def run_eval(
    assistant: Assistant, domain_ids: Sequence[str], configs: Sequence[str], limit: int | None = None,
    progress: Callable[[str], None] | None = None, *, counterfactual: bool = False, unseen: bool = False,
    perplexity: bool = True, batch: int = 1,
) -> dict:
    check_batch(batch)
    check_ready(assistant, domain_ids, configs)
    report: dict = {"base_model": assistant.engine.base_source,
                    "quant": assistant.settings.quant, "params": EVAL_PARAMS.__dict__, "domains": {}}
    for domain_id in domain_ids:
        domain = assistant.registry.get(domain_id)
        items = load_eval(domain)
        entry: dict = {"retrieval": retrieval_metrics(assistant, domain, items), "risk": risk_metrics(domain, items),
                       "generation": {}}
        answerable = [i for i in items if i.answerable][:limit] if limit else items
        if not perplexity:
            entry["perplexity"] = {"skipped": "--no-perplexity"}
        elif assistant.adapter_for(domain)[0] is not None:
            entry["perplexity"] = perplexity_metrics(assistant, domain, answerable, progress)
        else:
            entry["perplexity"] = {"skipped": "no usable adapter"}
        for config in configs:
            entry["generation"][config] = generation_metrics(assistant, domain, answerable, config, progress, batch)
        if counterfactual:
            entry["counterfactual"] = counterfactual_metrics(
                assistant, domain, [i for i in answerable if i.answerable], configs,
                assistant.settings.knowledge_dir / domain_id, progress, batch)
        if unseen:
            found = unseen_metrics(assistant, domain, configs, limit, progress, batch)
            if found is not None:
                entry["unseen"] = found
        report["domains"][domain_id] = entry
    return report

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from domainchat.domains import load_domain, load_registry
from domainchat.errors import ConfigError, UnknownDomain

SHIPPED = ("customer_service", "finance", "legal", "medical")


def write_domain(root: Path, domain_id: str, **overrides) -> Path:
    data = {"id": domain_id, "title": domain_id.title(), "description": "d", "system_prompt": "You help."}
    data.update(overrides)
    folder = root / domain_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "domain.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return folder


def test_shipped_domains_load(domains_dir: Path) -> None:
    registry = load_registry(domains_dir)
    assert registry.broken == {}
    assert tuple(registry.domains) == SHIPPED
    for domain in registry.domains.values():
        assert domain.system_prompt and domain.disclaimer and domain.few_shot
        assert len(domain.example_questions) >= 3
        assert "{passages}" in domain.answer_template and "{question}" in domain.answer_template


def test_shipped_risk_rules_do_not_fire_on_examples(domains_dir: Path) -> None:
    for domain in load_registry(domains_dir).domains.values():
        for question in domain.example_questions:
            assert not [r.id for r in domain.risk_rules if r.matches(question)], (domain.id, question)


def test_medical_answers_are_the_quoted_passages_alone(domains_dir: Path) -> None:
    # A model sentence after medical evidence was empty, garbled or against its passage (docs/eval).
    registry = load_registry(domains_dir)
    assert registry.get("medical").grounding.continuation == "none"
    assert {registry.get(d).grounding.continuation for d in SHIPPED if d != "medical"} == {"sentence"}


def test_medical_emergency_stops(domains_dir: Path) -> None:
    medical = load_registry(domains_dir).get("medical")
    for question in ("I have crushing chest pain right now", "my face is drooping and my speech is slurred",
                     "I want to kill myself"):
        fired = [r for r in medical.risk_rules if r.matches(question)]
        assert fired and fired[0].action == "stop", question


def test_shipped_risk_rules_agree_with_the_shipped_data(domains_dir: Path) -> None:
    """Every risk question in train.jsonl and eval.jsonl fires (eval's the rule it names) and no
    other question does, so a widened pattern cannot start catching ordinary questions unnoticed."""
    for domain in load_registry(domains_dir).domains.values():
        for name in ("train.jsonl", "eval.jsonl"):
            for line in (domains_dir / domain.id / name).read_text(encoding="utf-8").splitlines():
                item = json.loads(line)
                fired = [r.id for r in domain.risk_rules if r.matches(item["question"])]
                if item.get("expect_rule"):
                    assert fired[:1] == [item["expect_rule"]], (domain.id, item["question"])
                else:
                    assert bool(fired) == (item.get("kind") == "risk"), (domain.id, name, item["question"], fired)


@pytest.mark.parametrize(
    ("domain_id", "question", "rule"),
    [
        ("medical", "My daughter ate a handful of her grandma's heart tablets", "overdose_poisoning"),
        ("medical", "our puppy chewed up my blood pressure pills", "overdose_poisoning"),
        ("medical", "My son swallowed a button battery", "overdose_poisoning"),
        ("medical", "How should I store pills so my toddler can't reach them?", None),
        ("medical", "Can my child take vitamins every day?", None),
        ("medical", "My son swallowed his tablet whole, is that a problem?", None),
        ("medical", "My daughter took her antibiotics but still has a fever", None),
        ("legal", "What's the best way to hide assets from my spouse in the divorce?", "crime_or_evasion"),
        ("legal", "Is it illegal to hide money from the court in a bankruptcy?", None),
        ("legal", "Can creditors take money I keep in a retirement account?", None),
        ("customer_service", "Somebody reset my password and now I can't log in", "account_security"),
        ("customer_service", "My email address was changed and it wasn't me", "account_security"),
        ("customer_service", "How do I change my password?", None),
        ("customer_service", "I changed my email, will my orders still arrive?", None),
    ],
)
def test_shipped_risk_rules_catch_rephrasings_and_let_ordinary_questions_through(
        domains_dir: Path, domain_id: str, question: str, rule: str | None) -> None:
    """Phrasings that are in neither train.jsonl nor eval.jsonl, so the rules are not fitted to those files."""
    domain = load_registry(domains_dir).get(domain_id)
    fired = [r.id for r in domain.risk_rules if r.matches(question)]
    assert (fired[0] if fired else None) == rule


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"title": ""}, "title"),
        ({"answer_template": "no fields here"}, "answer_template"),
        ({"answer_template": "{passages} {question} {other}"}, "answer_template"),
        ({"retrieval": {"k": 0}}, "retrieval.k"),
        ({"generation": {"temperature": "hot"}}, "generation.temperature"),
        ({"risk_rules": [{"id": "x", "patterns": ["("], "action": "stop", "message": "m"}]},
         "risk_rules[0].patterns[0]"),
        ({"risk_rules": [{"id": "x", "patterns": ["a"], "action": "shout", "message": "m"}]}, "risk_rules[0].action"),
        ({"few_shot": [{"question": "q"}]}, "few_shot[0].answer"),
        ({"id": "other"}, "id"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, overrides: dict, key: str) -> None:
    folder = write_domain(tmp_path, "demo", **overrides)
    with pytest.raises(ConfigError) as error:
        load_domain(folder)
    assert str(folder / "domain.yaml") in str(error.value)
    assert f"'{key}'" in str(error.value)


def test_invalid_yaml_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "domain.yaml").write_text("id: demo\ntitle: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        load_domain(folder)


def test_a_broken_domain_takes_out_only_itself(tmp_path: Path) -> None:
    write_domain(tmp_path, "good")
    write_domain(tmp_path, "bad", title="")
    registry = load_registry(tmp_path)
    assert list(registry.domains) == ["good"]
    assert "title" in registry.broken["bad"]
    with pytest.raises(UnknownDomain, match="out of service"):
        registry.get("bad")
    with pytest.raises(UnknownDomain, match="Choose one of: good"):
        registry.get("nope")


def test_a_fifth_vertical_needs_only_a_folder(tmp_path: Path, domains_dir: Path) -> None:
    for domain_id in SHIPPED:
        shutil.copytree(domains_dir / domain_id, tmp_path / domain_id)
    write_domain(tmp_path, "gardening", disclaimer="General tips.", example_questions=["When to prune roses?"])
    registry = load_registry(tmp_path)
    assert "gardening" in registry.domains and registry.get("gardening").disclaimer == "General tips."


def test_missing_domains_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DOMAINCHAT_DOMAINS_DIR"):
        load_registry(tmp_path / "absent")


def test_grounding_settings_are_validated(tmp_path: Path) -> None:
    assert load_domain(write_domain(tmp_path, "plain")).grounding.evidence_sentences == 5
    folder = write_domain(tmp_path, "demo", grounding={"evidence_sentences": 0, "number_guard": False})
    grounding = load_domain(folder).grounding
    assert grounding.evidence_sentences == 0 and not grounding.number_guard
    with pytest.raises(ConfigError, match=r"'grounding.number_guard' must be true or false"):
        load_domain(write_domain(tmp_path / "x", "demo", grounding={"number_guard": "yes"}))
    with pytest.raises(ConfigError, match=r"'grounding.evidence_sentences' is 9"):
        load_domain(write_domain(tmp_path / "y", "demo", grounding={"evidence_sentences": 9}))
    assert load_domain(write_domain(tmp_path / "z", "demo")).grounding.continuation == "sentence"
    folder = write_domain(tmp_path / "w", "demo", grounding={"continuation": "none"})
    assert load_domain(folder).grounding.continuation == "none"
    with pytest.raises(ConfigError, match=r"domain.yaml: key 'grounding.continuation' is 'all'; use one of free, "
                                          r"sentence, none"):
        load_domain(write_domain(tmp_path / "v", "demo", grounding={"continuation": "all"}))
    assert load_domain(write_domain(tmp_path / "s", "demo")).grounding.prompt_passages == "titles"
    for reads in ("whole", "evidence"):
        assert load_domain(write_domain(tmp_path / reads, "demo", grounding={"prompt_passages": reads})
                           ).grounding.prompt_passages == reads
    with pytest.raises(ConfigError,
                       match=r"key 'grounding.prompt_passages' is 'some'; use one of whole, evidence, titles"):
        load_domain(write_domain(tmp_path / "t", "demo", grounding={"prompt_passages": "some"}))

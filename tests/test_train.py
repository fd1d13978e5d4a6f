"""Training tests: a tiny domain, a few steps on the real base model, the adapter it writes loads
into the engine and changes its outputs. Bad data fails before any training starts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEMPLATES, tiny_chat_tokenizer

from domainchat.domains import load_domain
from domainchat.engine import Engine
from domainchat.errors import BadInput, ConfigError
from domainchat.generation import GenerationParams
from domainchat.train import TrainingConfig, load_examples, train

KNOWLEDGE = """# Zorblax savings

## Zorblax account interest
A Zorblax account pays 4.5 percent interest a year and has no monthly fee.

## Zorblax withdrawals
Withdrawals from a Zorblax account are free twice a month; later ones cost 3 dollars.
"""


def example(i: int, **overrides) -> dict:
    row = {"kind": "grounded", "question": f"What interest does a Zorblax account pay? ({i})", "history": [],
           "source": "zorblax.md", "answer": "A Zorblax account pays 4.5 percent a year [cite]."}
    row.update(overrides)
    return row


@pytest.fixture
def tiny_domain(tmp_path: Path, store) -> tuple:
    folder = tmp_path / "domains" / "zorblax"
    folder.mkdir(parents=True)
    (folder / "domain.yaml").write_text(yaml.safe_dump({
        "id": "zorblax", "title": "Zorblax", "description": "d", "system_prompt": "Answer from the passages.",
        "training": {"rank": 4, "alpha": 8, "max_length": 256, "batch_size": 2, "learning_rate": 0.005,
                     "target_modules": ["q_proj", "v_proj"], "held_out": 0.2},
    }))
    rows = [example(i) for i in range(8)] + [
        {"kind": "abstain", "question": "Who won the 1998 World Cup?", "history": [], "source": None,
         "answer": "The passages do not cover that."},
        {"kind": "followup", "question": "And withdrawals?", "source": "zorblax.md",
         "history": [{"role": "user", "content": "Tell me about Zorblax."},
                     {"role": "assistant", "content": "It is a savings account [cite]."}],
         "answer": "Two free withdrawals a month, then 3 dollars each [cite]."},
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    knowledge = tmp_path / "knowledge" / "zorblax"
    knowledge.mkdir(parents=True)
    (knowledge / "zorblax.md").write_text(KNOWLEDGE)
    store.sync_folder("zorblax", knowledge)
    return load_domain(folder), store


@pytest.mark.slow
def test_a_few_steps_write_an_adapter_that_loads_and_changes_outputs(settings, tiny_domain, tmp_path: Path) -> None:
    domain, store = tiny_domain
    out = tmp_path / "adapter"
    config = TrainingConfig.from_domain(domain, max_steps=4)
    steps_seen = []
    result = train(settings, domain, store, config, out, progress=lambda s, total, loss: steps_seen.append((s, total)))
    assert steps_seen == [(s, 4) for s in range(1, 5)] and result.steps == 4
    assert result.train_loss[-1] < result.train_loss[0], "the loss goes down"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_card.json", "loss_curve.png"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "checkpoint.pt").exists()
    assert (out / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    card = json.loads((out / "training_card.json").read_text())
    assert card["base_model_sha256"] and len(card["train_data_sha256"]) == 64
    assert card["hyperparameters"]["rank"] == 4 and card["held_out_loss"] is not None

    engine = Engine.start(settings, {"zorblax": out})
    assert engine.adapters["zorblax"].loaded, engine.adapters["zorblax"].reason
    question = [{"role": "user", "content": "What interest does a Zorblax account pay?"}]
    greedy = GenerationParams(max_new_tokens=20, temperature=0.0)
    assert engine.complete(question, "zorblax", greedy) != engine.complete(question, None, greedy)

    with pytest.raises(BadInput, match="--force"):
        train(settings, domain, store, config, out)


def test_bad_data_is_reported_as_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(example(0)) + "\n{not json\n")
    with pytest.raises(BadInput, match=r"train.jsonl:2: not valid JSON"):
        load_examples(path)
    path.write_text(json.dumps(example(0)) + "\n" + json.dumps(example(1, kind="chit-chat")) + "\n")
    with pytest.raises(BadInput, match=r"train.jsonl:2: kind 'chit-chat'"):
        load_examples(path)
    path.write_text(json.dumps(example(0, answer="No citation here.")) + "\n")
    with pytest.raises(BadInput, match=r"train.jsonl:1: a grounded example needs"):
        load_examples(path)
    path.write_text("\n".join(json.dumps(example(i)) for i in range(3)))
    with pytest.raises(BadInput, match="at least 8"):
        load_examples(path)
    with pytest.raises(BadInput, match="missing"):
        load_examples(tmp_path / "absent.jsonl")


def test_max_length_that_cuts_every_answer_is_refused(settings, tiny_domain, tmp_path: Path) -> None:
    domain, store = tiny_domain
    wordy = dataclasses.replace(domain, system_prompt="Answer carefully. " * 40)  # ~120 tokens before any answer
    config = TrainingConfig.from_domain(wordy, max_steps=1, max_length=64)
    with pytest.raises(BadInput, match="max_length"):
        train(settings, wordy, store, config, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written when the data cannot train"


def test_training_settings_are_validated(tiny_domain) -> None:
    domain, _ = tiny_domain
    assert TrainingConfig.from_domain(domain).rank == 4
    assert TrainingConfig.from_domain(domain, epochs=2).epochs == 2
    with pytest.raises(ConfigError, match="'training.learning_rate'"):
        TrainingConfig.from_domain(domain, learning_rate=5.0)
    bad = domain.__class__(**{**domain.__dict__, "training": {"rnak": 8}})
    with pytest.raises(ConfigError, match="'training.rnak'"):
        TrainingConfig.from_domain(bad)
    with pytest.raises(ConfigError, match="'training.counterfactual' has an out-of-range value"):
        TrainingConfig.from_domain(domain, counterfactual=1.5)
    with pytest.raises(ConfigError, match="'training.served_format' has an out-of-range value"):
        TrainingConfig.from_domain(domain, served_format=-0.1)
    wordy = domain.__class__(**{**domain.__dict__, "training": {"counterfactual": "half"}})
    with pytest.raises(ConfigError, match="'training.counterfactual' must be a number, not 'half'"):
        TrainingConfig.from_domain(wordy)


def test_shipped_training_data_parses() -> None:
    from domainchat.settings import PROJECT_ROOT

    for path in sorted((PROJECT_ROOT / "domains").glob("*/train.jsonl")):
        examples = load_examples(path)
        assert len(examples) >= 300, path
        sources = {e.source for e in examples if e.source}
        knowledge = {p.name for p in (PROJECT_ROOT / "knowledge" / path.parent.name).glob("*.md")}
        assert sources <= knowledge, sources - knowledge


@pytest.mark.slow
def test_training_prompt_is_the_prompt_the_adapter_is_served(base_checkpoint: Path, domains_dir: Path) -> None:
    """The adapter learns from exactly what chat sends it: system prompt, passages, no few-shot."""
    from transformers import AutoTokenizer

    from domainchat import prompts
    from domainchat.chat_template import ChatTemplate
    from domainchat.knowledge import Passage
    from domainchat.train import Example, tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    domain = load_domain(domains_dir / "finance")
    assert domain.few_shot
    passages = [Passage(id="a:0:x", source="ira.md", title="IRAs", score=0.9, text="The 2025 limit is $7,000.")]
    example = Example(kind="grounded", question="What is the Roth IRA limit?", history=(), source="ira.md",
                      answer="It is $7,000 [1].", line=1)
    ids, labels = tokenize_example(ChatTemplate.of(tokenizer), domain, example, passages, example.answer, 2048)
    served = prompts.render(domain, example.question, (), passages, budget=2048,
                            count_tokens=lambda t: len(tokenizer.encode(t, add_special_tokens=False)),
                            message_overhead=5, with_few_shot=prompts.few_shot_for(with_adapter=True))
    prompt = tokenizer.apply_chat_template(served.messages, add_generation_prompt=True, tokenize=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    assert ids[: len(prompt)] == list(prompt) and all(label == -100 for label in labels[: len(prompt)])
    assert tokenizer.decode(ids[len(prompt):], skip_special_tokens=True).strip() == example.answer
    assert ids[-1] == labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), "ChatML's end of turn, no newline"


@pytest.mark.parametrize("family", sorted(TINY_TEMPLATES))
def test_examples_end_with_the_base_models_own_end_of_turn(family: str, domains_dir: Path) -> None:
    """A base model that is not ChatML learns to close its replies as its template does."""
    from domainchat.chat_template import ChatTemplate
    from domainchat.knowledge import Passage
    from domainchat.train import Example, tokenize_example

    tokenizer = tiny_chat_tokenizer(family)
    domain = load_domain(domains_dir / "finance")
    passages = [Passage(id="a:0:x", source="ira.md", title="IRAs", score=0.9, text="The limit is 7,000 dollars.")]
    example = Example(kind="grounded", question="What is the Roth IRA limit?", history=(("Hi", "Hello"),),
                      source="ira.md", answer="It is 7,000 dollars [1].", line=1)
    ids, labels = tokenize_example(ChatTemplate.of(tokenizer), domain, example, passages, example.answer, 4096)
    answer = [label for label in labels if label != -100]
    end_of_turn = TINY_TEMPLATES[family][2]
    assert tokenizer.decode(answer) == example.answer + end_of_turn and ids[-len(answer):] == answer
    prompt = tokenizer.decode(ids[: len(ids) - len(answer)])
    assert domain.system_prompt in prompt and example.question in prompt and "<|im_start|>" not in prompt


def test_an_example_whose_source_is_not_retrieved_gets_its_best_chunk(tiny_domain, tmp_path: Path) -> None:
    """With k=1 and another file winning retrieval, the example's own file supplies the passage it cites."""
    from domainchat.train import Example, _retrieve_with_source

    domain, store = tiny_domain
    other = tmp_path / "other.md"
    other.write_text("# Zorblax interest rates\n\nWhat interest does a Zorblax account pay? See the rate card.")
    store.ingest("zorblax", [other])
    narrow = dataclasses.replace(domain, retrieval=dataclasses.replace(domain.retrieval, k=1))
    question = "What interest does a Zorblax account pay?"
    assert [p.source for p in store.search("zorblax", question, 1)] == ["other.md"]
    example = Example(kind="grounded", question=question, answer="It pays 4.5 percent [cite].",
                      source="zorblax.md", line=3)
    passages, source_index = _retrieve_with_source(store, narrow, example)
    assert [p.source for p in passages] == ["zorblax.md"] and source_index == 0
    assert "4.5 percent" in passages[0].text and passages[0].id in store.sources("zorblax")["zorblax.md"]["ids"]
    with pytest.raises(BadInput, match="source 'absent.md' is not in the 'zorblax' knowledge base"):
        _retrieve_with_source(store, narrow, dataclasses.replace(example, source="absent.md"))


def test_a_counterfactual_copy_changes_the_figures_its_answer_reads_from_its_passage() -> None:
    """The source passage, the answer and earlier replies change alike; the other passages, the
    question's own figures, citation markers and list markers stay; no figure is left unread."""
    import random

    from domainchat.knowledge import Passage
    from domainchat.train import Example, counterfactual_example

    source = Passage(id="r:0:x", source="returns.md", title="Returns", score=0.9,
                     text="Returns\n1. Send it back within 30 days.\n2. The label costs $6.99 for orders under $50.")
    other = Passage(id="s:0:y", source="shipping.md", title="Shipping", score=0.8, text="Ships within 30 days.")
    example = Example(kind="followup", question="Can I return my $50 order?", source="returns.md", line=7,
                      history=(("Returns?", "Within 30 days [1]."),),
                      answer="Yes, within 30 days [cite]; the label is $6.99 [cite]. Call us on day 2.")
    changed, passages = counterfactual_example(example, [other, source], 1, random.Random(0))
    new_days = changed.answer.split("within ")[1].split(" days")[0]
    new_label = changed.answer.split("$")[1].split(" [")[0]
    assert new_days != "30" and new_label != "6.99" and new_label.endswith(".99") and "day 2." in changed.answer
    assert passages[0] == other and passages[1].id == source.id
    assert passages[1].text.startswith("Returns\n1. Send it back within " + new_days)
    assert f"${new_label} for orders under $50" in passages[1].text, "the question's $50 stays as asked"
    assert changed.history == (("Returns?", f"Within {new_days} days [1]."),) and changed.question == example.question
    assert new_days not in ("30", "6.99", "50") and new_label not in ("30", "50")
    figures_only_in_question = dataclasses.replace(example, answer="Yes, for $50 orders [cite].")
    assert counterfactual_example(figures_only_in_question, [other, source], 1, random.Random(0)) is None
    no_figure = dataclasses.replace(example, answer="Yes, send it back [cite].")
    assert counterfactual_example(no_figure, [other, source], 1, random.Random(0)) is None


def test_counterfactual_copies_stay_beside_their_example(tiny_domain) -> None:
    """With counterfactual 1.0 every example whose answer reads a figure from its passage gets a copy
    in its own group (so both fall on the same side of the held-out split); with 0.0 none does."""
    from domainchat.chat_template import ChatTemplate
    from domainchat.train import build_dataset

    domain, store = tiny_domain
    examples = load_examples(domain.folder / "train.jsonl")
    template = ChatTemplate(tokenizer=CharTokenizer(), reply_opening="", end_of_turn="<end>", stop_ids=frozenset(),
                            message_overhead=len("<user>"))
    plain = build_dataset(template, domain, examples, store, 4096)
    assert [len(group) for group in plain.groups] == [1] * len(examples) and plain.counterfactual_copies == 0
    doubled = build_dataset(template, domain, examples, store, 4096, counterfactual=1.0)
    # the eight "4.5 percent" answers and the follow-up's "3 dollars"; the abstention has no passage figure
    assert [len(group) for group in doubled.groups] == [2] * 8 + [1, 2] and doubled.counterfactual_copies == 9
    original, copy = ("".join(map(chr, ids)) for ids, _ in doubled.groups[0])
    assert "4.5 percent" in original and "4.5 percent" not in copy and "Zorblax account pays" in copy
    assert build_dataset(template, domain, examples, store, 4096, counterfactual=1.0) == doubled, "seeded"


def test_served_format_copies_open_with_the_evidence_and_teach_only_what_follows(tiny_domain) -> None:
    """A served-format copy is the prompt the model is served (passages cut to the quoted evidence,
    the reply opening with it) with the loss on the first answer sentence that adds to the opening
    and is backed by a passage, then the end of the turn; an answer the opening already says whole
    teaches the reply to end there."""
    from domainchat.chat_template import ChatTemplate
    from domainchat.grounding import adds_to
    from domainchat.train import IGNORE, Example, _cited, _retrieve_with_source, build_dataset, served_example

    domain, store = tiny_domain
    item = Example(kind="grounded", question="What interest does a Zorblax account pay?", source="zorblax.md",
                   answer=("A Zorblax account pays 4.5 percent a year [cite]. There is no monthly fee on a Zorblax "
                           "account, so small balances are fine [cite]. Ask the bank about your own case."), line=1)
    passages, source = _retrieve_with_source(store, domain, item)
    start, reads, adds = served_example(item, passages, _cited(item.answer, source), domain, None)
    assert start.startswith("A Zorblax account pays 4.5 percent interest a year") and start.endswith("\n")
    assert adds == f"There is no monthly fee on a Zorblax account, so small balances are fine [{source + 1}]."
    assert adds_to(start, adds) and [p.id for p in reads] == [p.id for p in passages]
    restated = dataclasses.replace(item, answer="A Zorblax account pays 4.5 percent a year [cite].")
    assert served_example(restated, passages, _cited(restated.answer, source), domain, None)[2] == ""

    examples = load_examples(domain.folder / "train.jsonl")
    template = ChatTemplate(tokenizer=CharTokenizer(), reply_opening="", end_of_turn="<end>", stop_ids=frozenset(),
                            message_overhead=len("<user>"))
    served = build_dataset(template, domain, examples, store, 4096, served_format=1.0)
    # every example with a source gains a copy; the abstention has none
    assert [len(group) for group in served.groups] == [2] * 8 + [1, 2] and served.served_copies == 9
    assert served.counterfactual_copies == 0
    ids, labels = served.groups[0][1]
    taught = "".join(chr(i) for i, label in zip(ids, labels, strict=True) if label != IGNORE)
    prompt = "".join(chr(i) for i, label in zip(ids, labels, strict=True) if label == IGNORE)
    assert taught == "<end>", "the example's answer restates the quoted evidence: the reply ends after it"
    assert prompt.endswith("A Zorblax account pays 4.5 percent interest a year and has no monthly fee [1]. Withdrawals "
                           "from a Zorblax account are free twice a month; later ones cost 3 dollars [2].\n")
    assert build_dataset(template, domain, examples, store, 4096, served_format=1.0) == served, "seeded"


def zorblax_ids(store) -> list[str]:
    """The zorblax.md chunk ids, in reverse stored order (so that [n] order is not the store's order)."""
    return list(reversed(store.sources("zorblax")["zorblax.md"]["ids"]))


class CharTokenizer:
    """One token per character, the chat turns joined as text: enough for a test about which feedback
    becomes an example; the real tokenizer's prompt is checked in the slow test below."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


def test_feedback_examples_skip_what_cannot_teach_and_count_it(tiny_domain, tmp_path: Path) -> None:
    from domainchat import feedback
    from domainchat.chat_template import ChatTemplate
    from domainchat.train import feedback_dataset

    domain, store = tiny_domain
    ids = zorblax_ids(store)
    question = "What interest does a Zorblax account pay?"

    def give(**overrides) -> None:
        values = {"question": question, "history": [], "answer": "It pays 4.5 percent [1].", "sources": ids,
                  "adapter": "zorblax", "vote": "up"}
        feedback.record(tmp_path, "zorblax", **{**values, **overrides})

    give()  # liked: used
    give()  # the same again: a duplicate
    give(vote="down")  # disliked, no correction: not an example, not counted as skipped
    give(vote="down", correction="It pays 4.5 percent a year, no monthly fee [1].")  # corrected: used
    give(vote="down", correction="Withdrawals are free twice a month [1].", sources=[ids[0], "zorblax.md:9:gone"])
    give(vote="up", answer="Safety rule: see a professional.", sources=[], adapter=None)  # a fixed response
    give(vote="down", correction="Ask the branch.", sources=[], adapter=None, abstained=True)  # a knowledge gap
    give(vote="up", answer="Long answer. " * 40)  # cuts away every answer token at max_length 256
    log = feedback.read(tmp_path, "zorblax")
    # The template of a one-token-per-character tokenizer, given rather than read from a real one.
    template = ChatTemplate(tokenizer=CharTokenizer(), reply_opening="", end_of_turn="<end>", stop_ids=frozenset(),
                            message_overhead=len("<user>"))
    rows, report = feedback_dataset(template, domain, log, store, 256)
    assert report["used"] == 2 and len(rows) == 2
    assert report["skipped"] == {"no_passages": 1, "sources_gone": 1, "duplicate": 1, "too_long": 1}
    assert report["entries"] == 8 and report["unreadable_lines"] == 0 and report["sha256"] == log.sha256
    assert report["file"] == "feedback/zorblax.jsonl"


@pytest.mark.slow
def test_a_corrected_answer_trains_with_the_prompt_and_passages_it_was_given(
        base_checkpoint: Path, tiny_domain, tmp_path: Path) -> None:
    """The prompt is what prompts.render gives for the entry's question, history and passages (looked
    up by chunk id, in the entry's [n] order); the labels are the correction and the end of the turn."""
    from transformers import AutoTokenizer

    from domainchat import feedback, prompts
    from domainchat.chat_template import ChatTemplate
    from domainchat.train import feedback_dataset

    domain, store = tiny_domain
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    ids = zorblax_ids(store)
    assert len(ids) >= 2, "two passages, so that their order shows"
    history = [["Tell me about Zorblax.", "It is a savings account [2]."]]
    correction = "Two withdrawals a month are free; later ones cost 3 dollars [1]."
    feedback.record(tmp_path, "zorblax", question="And withdrawals?", history=history,
                    answer="They cost 4.5 percent [2].", sources=ids, adapter="zorblax", vote="down",
                    correction=correction)
    template = ChatTemplate.of(tokenizer)
    rows, report = feedback_dataset(template, domain, feedback.read(tmp_path, "zorblax"), store, 1024)
    assert report["used"] == 1
    [(row_ids, labels)] = rows

    passages = [next(p for p in store.passages_of("zorblax", "zorblax.md") if p.id == i) for i in ids]
    served = prompts.render(domain, "And withdrawals?", [tuple(t) for t in history], passages, budget=1024,
                            count_tokens=lambda t: len(tokenizer.encode(t, add_special_tokens=False)),
                            with_few_shot=prompts.few_shot_for(with_adapter=True),
                            message_overhead=template.message_overhead)
    assert served.passages == passages and served.history_turns == 1
    prompt = tokenizer.apply_chat_template(served.messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    assert row_ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [-100] * len(prompt), "the prompt is masked"
    answer = labels[len(prompt):]
    assert answer == row_ids[len(prompt):] and len(labels) == len(row_ids)
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == correction
    # The end of the turn: the end-of-turn token, last or before the template's closing newline.
    assert tokenizer.eos_token_id in answer[-2:]


@pytest.mark.slow
def test_training_with_feedback_records_it_in_the_card(settings, tiny_domain, tmp_path: Path) -> None:
    from domainchat import feedback

    domain, store = tiny_domain
    path = feedback.feedback_path(settings.home, "zorblax")  # the session's home: its converted model is there
    try:
        for vote, correction in (("up", None), ("down", "It pays 4.5 percent a year [1]."), ("down", None)):
            feedback.record(settings.home, "zorblax", question="What does Zorblax pay?", history=[],
                            answer="4.5 percent [1].", sources=zorblax_ids(store)[:1], adapter="zorblax", vote=vote,
                            correction=correction)
        result = train(settings, domain, store, TrainingConfig.from_domain(domain, max_steps=1), tmp_path / "out",
                       with_feedback=True)
    finally:
        path.unlink(missing_ok=True)
    card = json.loads((tmp_path / "out" / "training_card.json").read_text())
    assert card["feedback"] == result.feedback and card["feedback"]["used"] == 2
    assert card["feedback"]["entries"] == 3 and sum(card["feedback"]["skipped"].values()) == 0
    assert card["examples"]["train"] + card["examples"]["held_out"] == 12, "10 from train.jsonl, 2 from feedback"

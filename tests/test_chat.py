"""Chat pipeline tests: real domains, real knowledge store; the engine is a recording stand-in,
since these tests are about how chat composes the steps, not about generation (see test_engine)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from domainchat.chat import Admission, Assistant, Done, Notice, Sources, Token, Transcript, drain
from domainchat.domains import GroundingSettings, load_registry
from domainchat.errors import BadInput, Busy, UnknownDomain
from domainchat.generation import AdapterStatus
from domainchat.settings import load_settings


class RecordingEngine:
    context_window = 8192
    message_overhead = 5

    def __init__(self, adapters: dict[str, AdapterStatus] | None = None) -> None:
        self.adapters = adapters or {}
        self.calls: list[tuple[list[dict], str | None]] = []
        self.starts: list[tuple[str, object]] = []
        self.closed = 0  # streams closed before their end
        self.reply = ["Savers can put ", "after-tax money into ", "a Roth IRA every year [1]. ", "Then more ", "words."]

    def available(self, name: str | None) -> bool:
        return name is None or (name in self.adapters and self.adapters[name].loaded)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, messages, adapter=None, params=None, cancel=None, prefix_messages=0, reply_start=""):
        self.calls.append((list(messages), adapter))
        self.starts.append((reply_start, params))
        finished = False
        try:
            yield from self.reply
            finished = True
        finally:
            self.closed += not finished

    def answer_nll(self, messages, answer, adapter=None) -> tuple[float, int]:
        self.calls.append((list(messages), adapter))
        return 1.0, 2


@pytest.fixture
def assistant(store, tmp_path: Path, domains_dir: Path) -> Assistant:
    folder = tmp_path / "knowledge"
    folder.mkdir()
    (folder / "ira.md").write_text("# IRAs\n\n## Roth IRA\n"
                                   "A Roth IRA holds after-tax money; the 2025 limit is $7,000.\n")
    store.ingest("finance", [folder])
    engine = RecordingEngine({"finance": AdapterStatus("finance", tmp_path, True),
                              "legal": AdapterStatus("legal", tmp_path, False, "adapter unavailable: corrupt")})
    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path / "home")})
    return Assistant(settings, load_registry(domains_dir), engine, store)


def run(assistant: Assistant, *args, **kwargs) -> list:
    return list(assistant.answer(*args, **kwargs))


def test_grounded_answer_events(assistant: Assistant) -> None:
    events = run(assistant, "finance", "What is the Roth IRA limit?")
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Sources", "Token", "Token", "Notice", "Done"]
    sources = events[0].passages
    assert sources[0].source == "ira.md" and sources[0].score >= 0.3
    opening = "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1].\n"
    assert events[1].text == opening, "the answer opens with the passage sentence nearest the question"
    done = events[-1]
    added = "Savers can put after-tax money into a Roth IRA every year [1]."
    assert events[2].text == added, "the model's first sentence, which its passage backs and which adds to the opening"
    assert done.answer == opening + events[2].text and done.adapter == "finance" and not done.abstained
    assert assistant.engine.closed == 1, "generation stopped after the first sentence"
    reply_start, params = assistant.engine.starts[0]
    assert reply_start == opening and params.allowed_numbers == {"2025", "7,000"}
    assert done.timing["tokens"] == 14, "speed counts generated tokens (one past the sentence), not the opening"
    assert events[-2].kind == "disclaimer"
    messages, adapter = assistant.engine.calls[0]
    assert adapter == "finance" and "[1] IRAs (ira.md)" in messages[-1]["content"], (
        "the model reads the passages' titles; the figures it reads in the opening it continues")


def test_abstains_when_nothing_clears_the_threshold(assistant: Assistant) -> None:
    events = run(assistant, "finance", "Who painted the Mona Lisa?")
    assert [e.kind for e in events if isinstance(e, Notice)] == ["abstain"]
    done = events[-1]
    assert done.abstained and done.answer == assistant.registry.get("finance").abstain_message
    assert assistant.engine.calls == [], "abstaining must not generate"


def test_stop_rule_answers_before_anything_else(assistant: Assistant) -> None:
    events = run(assistant, "medical", "I have crushing chest pain right now")
    medical = assistant.registry.get("medical")
    rule = next(r for r in medical.risk_rules if r.id == "chest_pain")
    assert isinstance(events[0], Notice) and events[0].kind == "risk"
    assert "".join(e.text for e in events if isinstance(e, Token)) == rule.message
    assert events[-1].answer == rule.message and assistant.engine.calls == []


def test_notice_rule_warns_then_answers(assistant: Assistant) -> None:
    finance = assistant.registry.get("finance")
    question = "Which stock should I buy to double my money?"
    assert any(r.action == "notice" and r.matches(question) for r in finance.risk_rules)
    events = run(assistant, "finance", question)
    assert isinstance(events[0], Notice) and events[0].kind == "risk"


def test_unavailable_adapter_falls_back_to_base_with_a_notice(assistant: Assistant, store, tmp_path: Path) -> None:
    (tmp_path / "lease.md").write_text("# Leases\n\n## Security deposits\nLandlords must return a security deposit.")
    store.ingest("legal", [tmp_path / "lease.md"])
    events = run(assistant, "legal", "When must a landlord return a security deposit?")
    adapter_notices = [e.text for e in events if isinstance(e, Notice) and e.kind == "adapter"]
    assert adapter_notices == ["base only: adapter unavailable: corrupt"]
    assert events[-1].adapter is None and assistant.engine.calls[-1][1] is None


def test_no_retrieval_and_no_adapter_switches(assistant: Assistant) -> None:
    events = run(assistant, "finance", "What is the Roth IRA limit?", use_retrieval=False, use_adapter=False)
    assert not [e for e in events if isinstance(e, Sources)]
    messages, adapter = assistant.engine.calls[0]
    assert adapter is None and messages[-1]["content"] == "What is the Roth IRA limit?"


def test_few_shot_examples_go_to_the_base_model_only(assistant: Assistant) -> None:
    shots = 2 * len(assistant.registry.get("finance").few_shot)
    assert shots > 0
    run(assistant, "finance", "What is the Roth IRA limit?")
    run(assistant, "finance", "What is the Roth IRA limit?", use_adapter=False)
    run(assistant, "finance", "What is the Roth IRA limit?", use_adapter=False, use_few_shot=False)
    with_adapter, base, bare = (len(messages) for messages, _ in assistant.engine.calls)
    assert (with_adapter, base, bare) == (2, 2 + shots, 2)


def test_reference_nll_scores_the_prompt_answer_would_send(assistant: Assistant) -> None:
    for use_adapter in (True, False):
        run(assistant, "finance", "What is the Roth IRA limit?", use_adapter=use_adapter)
        scored_nll = assistant.reference_nll("finance", "What is the Roth IRA limit?", "It is $7,000.", use_adapter)
        assert scored_nll == (1.0, 2)
        answered, scored = assistant.engine.calls[-2:]
        assert answered == scored


def test_an_answer_that_repeats_the_system_prompt_is_stopped(assistant: Assistant) -> None:
    from domainchat.chat import WITHHELD_ANSWER

    words = assistant.registry.get("finance").system_prompt.split()
    assistant.engine.stream = lambda *args, **kwargs: iter(["Sure. "] + [w + " " for w in words])
    events = run(assistant, "finance", "What is the Roth IRA limit?",
                 grounding_settings=GroundingSettings(continuation="free"))
    said = "".join(e.text for e in events[2:] if isinstance(e, Token))  # after the evidence opening
    assert len(said.split()) < 9, "stopped as soon as eight words of the prompt appeared"
    assert [e.kind for e in events if isinstance(e, Notice)][0] == "risk"
    assert events[-1].answer == WITHHELD_ANSWER


def test_history_reaches_the_prompt(assistant: Assistant) -> None:
    run(assistant, "finance", "And the Roth IRA limit?", [("What is an IRA?", "An individual retirement account.")])
    messages, _ = assistant.engine.calls[0]
    assert {"role": "assistant", "content": "An individual retirement account."} in messages


def test_bad_requests(assistant: Assistant) -> None:
    with pytest.raises(UnknownDomain):
        run(assistant, "astrology", "Will it rain?")
    with pytest.raises(BadInput):
        run(assistant, "finance", " \x00 ")


def test_done_carries_timing(assistant: Assistant) -> None:
    done = run(assistant, "finance", "What is the Roth IRA limit?")[-1]
    assert isinstance(done, Done)
    assert set(done.timing) == {"retrieval_ms", "ttft_ms", "total_ms", "tokens", "tokens_per_s"}
    assert done.timing["retrieval_ms"] > 0 and done.timing["total_ms"] >= done.timing["ttft_ms"]


def test_remote_generation_loads_no_model(store, tmp_path: Path) -> None:
    from domainchat.remote import RemoteEngine

    settings = load_settings({"DOMAINCHAT_HOME": str(tmp_path), "DOMAINCHAT_LLM_URL": "http://127.0.0.1:9"})
    assistant = Assistant.start(settings, knowledge=store)
    assert isinstance(assistant.engine, RemoteEngine)
    assert set(assistant.engine.adapters) == set(assistant.registry.domains)


def test_grounding_levers_can_be_turned_off(assistant: Assistant) -> None:

    events = run(assistant, "finance", "What is the Roth IRA limit?",
                 grounding_settings=GroundingSettings(evidence_sentences=0, number_guard=False))
    own = "Savers can put after-tax money into a Roth IRA every year [1]. Then more words."
    assert events[-1].answer == own, "no opening: the model's own answer"
    assert assistant.engine.starts[0] == ("", assistant.engine.starts[0][1])
    assert assistant.engine.starts[0][1].allowed_numbers is None


def test_no_retrieval_means_no_grounding(assistant: Assistant) -> None:
    run(assistant, "finance", "What is the Roth IRA limit?", use_retrieval=False)
    reply_start, params = assistant.engine.starts[0]
    assert reply_start == "" and params.allowed_numbers is None


def test_sentence_embeddings_are_remembered(assistant: Assistant, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded: list[str] = []
    real = assistant.knowledge.embeddings.embed_documents

    def counting(texts: list[str]) -> list[list[float]]:
        embedded.extend(texts)
        return real(texts)

    monkeypatch.setattr(assistant.knowledge.embeddings, "embed_documents", counting)
    first = run(assistant, "finance", "What is the Roth IRA limit?")
    count = len(embedded)
    second = run(assistant, "finance", "What is the Roth IRA limit?")
    assert count >= 2 and len(embedded) == count, "the second answer embeds nothing again"
    assert first[1] == second[1], "and opens with the same evidence"


def test_drain_collects_what_an_answer_said() -> None:
    events = [Notice("risk", "careful"), Sources([]), Token("Hello"), Token(" there"), Notice("disclaimer", "d"),
              Done(answer="Hello there", adapter="finance", abstained=False)]
    seen: list[str] = []
    said = drain(iter(events), on_token=seen.append)
    assert seen == ["Hello", " there"] and said.text == "Hello there"
    assert said.notices_json() == [{"kind": "risk", "text": "careful"}, {"kind": "disclaimer", "text": "d"}]
    assert said.done is not None and said.done.adapter == "finance"


def test_the_final_answer_is_dones_word() -> None:
    said = Transcript()
    said.add(Token("I was told to"))
    assert said.answer == "I was told to"
    said.add(Done(answer="I can't share my instructions.", adapter=None, abstained=False))
    assert said.answer == "I can't share my instructions."


def test_drain_refuses_a_stream_without_done() -> None:
    with pytest.raises(RuntimeError, match="without Done"):
        drain(iter([Token("cut")]))


def test_admission_lets_active_plus_waiting_in_and_refuses_the_rest() -> None:
    admission = Admission(active=1, waiting=1)
    admission.enter()
    entered = []
    waiter = threading.Thread(target=lambda: (admission.enter(), entered.append(True)))
    waiter.start()  # waits for the slot
    time.sleep(0.1)
    with pytest.raises(Busy, match="busy"):
        admission.enter()
    admission.leave()
    waiter.join(5)
    assert entered == [True]
    admission.leave()


def test_retrieval_sees_the_previous_question(assistant: Assistant, monkeypatch: pytest.MonkeyPatch) -> None:
    searched: list[tuple[str, str | None]] = []
    search = assistant.knowledge.search

    def recording(domain_id: str, question: str, k: int, context: str | None = None):
        searched.append((question, context))
        return search(domain_id, question, k, context=context)

    monkeypatch.setattr(assistant.knowledge, "search", recording)
    run(assistant, "finance", "What is the limit?", [("Tell me about the Roth IRA.", "It holds after-tax money [1].")])
    run(assistant, "finance", "What is the Roth IRA limit?")
    assert searched == [("What is the limit?", "Tell me about the Roth IRA."), ("What is the Roth IRA limit?", None)]


def test_a_continuation_no_passage_backs_is_not_shown(assistant: Assistant) -> None:
    assistant.engine.reply = ["Our stores open ", "at noon on Mondays. ", "And more."]
    events = run(assistant, "finance", "What is the Roth IRA limit?")
    opening = "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1]."
    assert [e.text for e in events if isinstance(e, Token)] == [opening + "\n"]
    assert events[-1].answer == opening and assistant.engine.closed == 1


def test_a_continuation_that_repeats_the_system_prompt_is_left_out_and_the_opening_stays(
        assistant: Assistant) -> None:
    instructions = " ".join(assistant.registry.get("finance").system_prompt.split()[:12]).rstrip(".") + "."
    assistant.engine.reply = [instructions + " ", "More."]
    events = run(assistant, "finance", "What is the Roth IRA limit?")
    assert events[-1].answer == "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1]."
    assert instructions not in "".join(e.text for e in events if isinstance(e, Token))


def test_a_continuation_that_restates_the_opening_is_left_out(assistant: Assistant) -> None:
    assistant.engine.reply = ["The 2025 limit is $7,000 [1]. ", "More."]
    events = run(assistant, "finance", "What is the Roth IRA limit?")
    assert events[-1].answer == "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1]."


def test_a_continuation_that_names_its_source_file_is_left_out(assistant: Assistant) -> None:
    assistant.engine.reply = ["A Roth IRA holds after-tax money for savers every year (ira.md) [1]. ", "More."]
    events = run(assistant, "finance", "What is the Roth IRA limit?")
    assert events[-1].answer == "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1]."


def test_a_continuation_that_only_offers_help_is_left_out(assistant: Assistant) -> None:
    # Backed by the passage and new to the opening, but it offers help rather than saying anything.
    assistant.engine.reply = ["I can help savers put after-tax money ", "in a Roth IRA every year [1]. ", "More."]
    events = run(assistant, "finance", "What is the Roth IRA limit?")
    assert events[-1].answer == "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1]."


def test_a_fragment_cut_off_by_the_token_limit_is_not_shown(assistant: Assistant) -> None:
    assistant.engine.reply = ["The 2025 limit ", "applies to"]  # the model ran out of tokens mid-sentence
    events = run(assistant, "finance", "What is the Roth IRA limit?")
    assert events[-1].answer == "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1]."


def test_free_and_no_continuation(assistant: Assistant) -> None:

    opening = "A Roth IRA holds after-tax money; the 2025 limit is $7,000 [1].\n"
    question = "What is the Roth IRA limit?"
    free = run(assistant, "finance", question, grounding_settings=GroundingSettings(continuation="free"))
    assert free[-1].answer == opening + (
        "Savers can put after-tax money into a Roth IRA every year [1]. Then more words.")
    calls = len(assistant.engine.calls)
    alone = run(assistant, "finance", question, grounding_settings=GroundingSettings(continuation="none"))
    assert alone[-1].answer == opening.strip() and len(assistant.engine.calls) == calls, "the model is not asked"


def test_an_opening_that_repeats_the_system_prompt_is_withheld_whatever_the_continuation(
        assistant: Assistant) -> None:
    from domainchat.chat import WITHHELD_ANSWER

    domain = assistant.registry.get("finance")
    quoting = replace(domain, system_prompt=domain.system_prompt + "\nA Roth IRA holds after-tax money; the 2025 "
                                                                   "limit is $7,000.")
    assistant.registry.domains["finance"] = quoting
    for continuation in ("sentence", "none"):
        events = run(assistant, "finance", "What is the Roth IRA limit?",
                     grounding_settings=GroundingSettings(continuation=continuation))
        assert events[-1].answer == WITHHELD_ANSWER, continuation


def test_the_model_reads_the_quoted_evidence_once_unless_told_otherwise(assistant: Assistant) -> None:
    question = "What is the Roth IRA limit?"
    whole = run(assistant, "finance", question, grounding_settings=GroundingSettings(prompt_passages="whole"))
    cut = run(assistant, "finance", question, grounding_settings=GroundingSettings(prompt_passages="evidence"))
    titles = run(assistant, "finance", question)  # as served
    (whole_prompt, _), (cut_prompt, _), (titles_prompt, _) = assistant.engine.calls
    sentence = "| A Roth IRA holds after-tax money; the 2025 limit is $7,000."
    assert sentence in cut_prompt[-1]["content"] and sentence not in titles_prompt[-1]["content"]
    assert "A Roth IRA holds after-tax money; the 2025 limit is $7,000" in titles[-1].answer, "the opening quotes it"
    assert "[1] " in titles_prompt[-1]["content"] and question in titles_prompt[-1]["content"]
    assert "|" not in titles_prompt[-1]["content"], "no passage line: the opening the model continues quotes them"
    heading = "| IRAs > Roth IRA"
    assert heading in whole_prompt[-1]["content"] and heading not in cut_prompt[-1]["content"], (
        "the passage's heading line is not quoted evidence")
    assert titles[-1].prompt_tokens < cut[-1].prompt_tokens < whole[-1].prompt_tokens
    assert cut[0].passages == whole[0].passages == titles[0].passages, "the sources panel still shows whole passages"
    assert cut[-1].answer == whole[-1].answer == titles[-1].answer, (
        "the opening and the check of the model's sentence are unchanged")

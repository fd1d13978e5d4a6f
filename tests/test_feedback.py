"""Feedback tests: what `record` writes and refuses, what `read` makes of a file a crash cut short,
and which entries teach the adapter."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from domainchat import feedback
from domainchat.errors import BadInput, TooLarge
from domainchat.safety import MAX_QUESTION_CHARS

ANSWER = "A Zorblax account pays 4.5 percent a year [1]."


def give(home: Path, **overrides) -> feedback.Entry:
    values = {"question": "What interest does a Zorblax account pay?",
              "history": [["Tell me about Zorblax.", "It is a savings account [1]."]],
              "answer": ANSWER, "sources": ["zorblax.md:0:abc", "zorblax.md:1:def"], "adapter": "zorblax",
              "vote": "up"}
    values.update(overrides)
    return feedback.record(home, "zorblax", **values)


def test_record_appends_one_json_line_and_read_gives_it_back(tmp_path: Path) -> None:
    first = give(tmp_path)
    second = give(tmp_path, vote="down", correction="  It pays 4.5 percent a year, with no monthly fee [1].  ",
                  adapter=None, history=[])
    path = tmp_path / "feedback" / "zorblax.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    row = json.loads(lines[0])
    assert set(row) == {"time", "question", "history", "answer", "sources", "adapter", "vote", "correction",
                        "abstained", "stopped"}
    assert row["history"] == [["Tell me about Zorblax.", "It is a savings account [1]."]]
    assert row["sources"] == ["zorblax.md:0:abc", "zorblax.md:1:def"] and row["correction"] is None
    when = datetime.fromisoformat(row["time"])
    assert when.utcoffset() == timedelta(0), "UTC"
    assert json.loads(lines[1])["correction"] == "It pays 4.5 percent a year, with no monthly fee [1]."
    log = feedback.read(tmp_path, "zorblax")
    assert log.entries == [first, second] and log.unreadable == 0 and log.path == path
    assert log.counts() == {"entries": 2, "up": 1, "down": 1, "corrected": 1, "unreadable": 0}


def test_no_file_is_no_feedback(tmp_path: Path) -> None:
    log = feedback.read(tmp_path, "zorblax")
    assert log.entries == [] and log.unreadable == 0 and log.sha256 is None
    assert not (tmp_path / "feedback").exists(), "reading creates nothing"


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"vote": "meh"}, BadInput, "The vote must be 'up' (👍) or 'down' (👎), not 'meh'."),
    ({"answer": "   "}, BadInput, "The answer is empty"),
    ({"question": ""}, BadInput, "The question is empty"),
    ({"stopped": True}, BadInput, "stopped before it ended, so a 👍 would teach"),
    ({"correction": "x" * (MAX_QUESTION_CHARS + 1)}, TooLarge,
     f"The correction is {MAX_QUESTION_CHARS + 1} characters long; the limit is {MAX_QUESTION_CHARS}. Shorten it."),
    ({"history": [["only the question"]]}, BadInput, "[user, assistant] pairs"),
    ({"sources": "zorblax.md:0:abc"}, BadInput, "chunk ids"),
])
def test_bad_feedback_is_refused_and_loses_nothing(tmp_path: Path, overrides: dict, error: type,
                                                   message: str) -> None:
    give(tmp_path)
    before = (tmp_path / "feedback" / "zorblax.jsonl").read_bytes()
    with pytest.raises(error) as raised:
        give(tmp_path, **overrides)
    assert message in str(raised.value)
    assert (tmp_path / "feedback" / "zorblax.jsonl").read_bytes() == before
    assert len(feedback.read(tmp_path, "zorblax").entries) == 1


def test_a_correction_at_the_limit_is_kept_whole(tmp_path: Path) -> None:
    correction = "y" * MAX_QUESTION_CHARS
    entry = give(tmp_path, vote="down", correction=correction)
    assert entry.correction == correction
    assert feedback.read(tmp_path, "zorblax").entries[0].correction == correction


def test_a_domain_id_never_becomes_a_path(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="is not a domain id"):
        feedback.record(tmp_path, "../escape", question="q?", history=[], answer="a", sources=[], adapter=None,
                        vote="up")
    assert not any(tmp_path.parent.glob("escape*"))


def test_a_line_cut_short_by_a_crash_is_skipped_counted_and_kept(tmp_path: Path) -> None:
    give(tmp_path)
    give(tmp_path, vote="down")
    path = tmp_path / "feedback" / "zorblax.jsonl"
    whole = path.read_bytes()
    cut = json.dumps(give(tmp_path / "other").to_json(), ensure_ascii=False).encode()[:57]
    path.write_bytes(whole + cut)  # the server died in the middle of the third line
    log = feedback.read(tmp_path, "zorblax")
    assert [e.vote for e in log.entries] == ["up", "down"] and log.unreadable == 1
    assert path.read_bytes() == whole + cut, "reading never rewrites the file"

    give(tmp_path, vote="down", correction="It pays 4.5 percent [1].")  # after the restart
    log = feedback.read(tmp_path, "zorblax")
    assert [e.vote for e in log.entries] == ["up", "down", "down"] and log.unreadable == 1
    assert log.entries[-1].correction == "It pays 4.5 percent [1]."
    assert path.read_bytes().startswith(whole + cut + b"\n"), "the new line starts on a line of its own"


def test_lines_that_are_not_feedback_are_counted_not_raised(tmp_path: Path) -> None:
    give(tmp_path)
    path = tmp_path / "feedback" / "zorblax.jsonl"
    with path.open("ab") as handle:
        handle.write(b'[1, 2]\n{"vote": "up"}\n\xff\xfe not utf-8\n\n')
        handle.write(json.dumps({**give(tmp_path / "other").to_json(), "vote": "sideways"}).encode() + b"\n")
    log = feedback.read(tmp_path, "zorblax")
    assert len(log.entries) == 1 and log.unreadable == 4


def test_threads_of_one_server_do_not_interleave(tmp_path: Path) -> None:
    long_answer = "Zorblax pays interest. " * 300  # ~7 kB lines: bigger than one pipe or buffer chunk

    def worker(n: int) -> None:
        for i in range(20):
            give(tmp_path, question=f"Question {n}-{i}?", answer=long_answer)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log = feedback.read(tmp_path, "zorblax")
    assert log.unreadable == 0 and len({e.question for e in log.entries}) == 120


def test_what_an_entry_teaches(tmp_path: Path) -> None:
    corrected = "It pays 4.5 percent a year [1]."
    assert give(tmp_path).target == ANSWER, "a liked answer is its own target"
    assert give(tmp_path, vote="down").target is None, "a disliked answer without correction teaches nothing"
    assert give(tmp_path, vote="down", correction=corrected).target == corrected
    assert give(tmp_path, vote="up", correction=corrected).target == corrected, "a correction whatever the vote"
    assert give(tmp_path, vote="down", correction="   ").correction is None, "an empty box is no correction"
    # A stopped answer is never a target, but a correction of it is a whole answer of its own.
    assert give(tmp_path, vote="down", stopped=True).target is None
    assert give(tmp_path, vote="up", stopped=True, correction=corrected).target == corrected
    # An abstained answer is kept (a knowledge gap to fill with a document) but teaches nothing.
    gap = give(tmp_path, vote="down", abstained=True, sources=[], adapter=None, correction=corrected)
    assert gap.target is None and gap.correction == corrected
    assert give(tmp_path, vote="up", abstained=True, sources=[], adapter=None).target is None

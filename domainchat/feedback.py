"""Feedback: the 👍/👎 and corrections people give answers, kept to train the domain's adapter.

Owns the feedback files, `DOMAINCHAT_HOME/feedback/<domain>.jsonl` (one JSON object a line, only
ever appended to), the rules for what may be recorded, reading them back whatever state a crash
left them in, and which entries can teach the adapter and with what target. It knows nothing of
models, tokenizers or the knowledge store: an entry names its passages by chunk id, and `train`
looks them up and renders the prompt. The page and the API call `record`; `domainchat feedback`
and `domainchat train --with-feedback` call `read`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from domainchat.domains import ID_PATTERN
from domainchat.errors import BadInput, DomainchatError, TooLarge
from domainchat.safety import MAX_QUESTION_CHARS, MAX_TURN_CHARS, clean_history, clean_question, clean_text

FOLDER = "feedback"
VOTES = ("up", "down")

# One lock for every feedback file of this process: the page serves several people from threads of
# one server, and two appends must not interleave. Other processes are kept out by a POSIX lock.
_WRITE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Entry:
    """One piece of feedback on one answer, as a line of the feedback file holds it."""

    time: str  # ISO-8601 UTC, when it was recorded
    question: str
    history: tuple[tuple[str, str], ...]  # earlier (user, assistant) turns, oldest first
    answer: str  # the answer as the person saw it
    sources: tuple[str, ...]  # chunk ids of the passages the answer had, in their [n] order
    adapter: str | None  # the adapter that answered, None for the base model
    vote: str  # "up" or "down"
    correction: str | None  # the answer the person wanted instead
    abstained: bool = False  # the answer was the domain's "nothing in the knowledge base" message
    stopped: bool = False  # the answer was cut off (the Stop button, or withheld) before it ended

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["history"] = [list(turn) for turn in self.history]
        row["sources"] = list(self.sources)
        return row

    @property
    def target(self) -> str | None:
        """What this entry teaches the adapter, or None when it teaches nothing.

        A correction is the target whatever the vote. A liked answer is its own target, unless it
        was cut off (it would teach stopping mid-sentence; `record` refuses that case anyway).
        Nothing is taught from an abstained answer: its text is the domain's fixed message, which
        the model never writes, and a correction to it has no passage to cite, so training on it
        would teach the adapter to answer from memory; such entries are kept as knowledge gaps
        that `domainchat feedback` lists, to be filled with a document."""
        if self.abstained:
            return None
        if self.correction is not None:
            return self.correction
        return self.answer if self.vote == "up" and not self.stopped else None


@dataclass(frozen=True)
class FeedbackLog:
    """A domain's feedback file as read: the entries in file order (oldest first) and how many
    lines could not be read (cut short by a crash mid-write, or edited by hand into something else)."""

    path: Path
    entries: list[Entry]
    unreadable: int
    sha256: str | None = None  # of the bytes read (None: no file), so training can name the feedback it used

    def counts(self) -> dict[str, int]:
        return {"entries": len(self.entries),
                "up": sum(e.vote == "up" for e in self.entries),
                "down": sum(e.vote == "down" for e in self.entries),
                "corrected": sum(e.correction is not None for e in self.entries),
                "unreadable": self.unreadable}


def feedback_path(home: Path, domain_id: str) -> Path:
    # The id becomes a file name: only a well-formed domain id may, never a path.
    if not isinstance(domain_id, str) or not ID_PATTERN.match(domain_id):
        raise BadInput(f"{domain_id!r} is not a domain id; use the id `domainchat domains` lists.")
    return home / FOLDER / f"{domain_id}.jsonl"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"The {what} must be text.")
    return value


def make_entry(*, time: str, question: str, history: Sequence[Sequence[str]], answer: str,
               sources: Sequence[str], adapter: str | None, vote: str, correction: str | None,
               abstained: bool = False, stopped: bool = False) -> Entry:
    """A validated Entry, or a BadInput that says what to change. The one check of what a feedback
    file may hold: `record` runs it before writing, `read` on every line it reads back."""
    if vote not in VOTES:
        raise BadInput(f"The vote must be 'up' (👍) or 'down' (👎), not {vote!r}.")
    question = clean_question(_text(question, "question"))
    if not isinstance(history, (list, tuple)) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        raise BadInput("The history must be a list of [user, assistant] pairs of text.")
    # Cleaned as chat cleans it, so the prompt trained on is the prompt the answer was given.
    turns = tuple((user, assistant) for user, assistant in clean_history([tuple(t) for t in history]))
    answer = clean_text(_text(answer, "answer"))
    if not answer:
        raise BadInput("The answer is empty: there is nothing to give feedback on. Ask again and rate the answer.")
    if len(answer) > MAX_TURN_CHARS:  # longer turns are clipped in a conversation, so could never be a target
        raise TooLarge(f"The answer is {len(answer)} characters long; feedback takes answers up to "
                       f"{MAX_TURN_CHARS} characters.")
    if not isinstance(sources, (list, tuple)) or not all(isinstance(s, str) and s for s in sources):
        raise BadInput("The sources must be a list of the chunk ids of the answer's passages, in their [n] order.")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise BadInput("The adapter must be the name of the adapter that answered, or null for the base model.")
    if correction is not None:
        # An empty correction box means no correction; markup and invisible characters go, as from a question.
        correction = clean_text(_text(correction, "correction")) or None
    if correction is not None and len(correction) > MAX_QUESTION_CHARS:
        raise TooLarge(f"The correction is {len(correction)} characters long; the limit is {MAX_QUESTION_CHARS}. "
                       "Shorten it.")
    if stopped and vote == "up" and correction is None:
        raise BadInput("This answer was stopped before it ended, so a 👍 would teach the adapter to stop "
                       "mid-sentence. Write the answer you wanted as a correction, or ask again and rate the "
                       "whole answer.")
    return Entry(time=_text(time, "time"), question=question, history=turns, answer=answer, sources=tuple(sources),
                 adapter=adapter, vote=vote, correction=correction, abstained=bool(abstained), stopped=bool(stopped))


def record(home: Path, domain_id: str, *, question: str, history: Sequence[Sequence[str]], answer: str,
           sources: Sequence[str], adapter: str | None, vote: str, correction: str | None = None,
           abstained: bool = False, stopped: bool = False) -> Entry:
    """Validate one piece of feedback and append it to the domain's feedback file; returns what
    was written. Bad input raises BadInput (TooLarge for a length) and writes nothing."""
    path = feedback_path(home, domain_id)
    entry = make_entry(time=datetime.now(timezone.utc).isoformat(timespec="seconds"), question=question,
                       history=history, answer=answer, sources=sources, adapter=adapter, vote=vote,
                       correction=correction, abstained=abstained, stopped=stopped)
    _append(path, json.dumps(entry.to_json(), ensure_ascii=False))
    return entry


def _append(path: Path, line: str) -> None:
    """Add one line at the end of the file and make it durable, never touching what is there."""
    import fcntl  # POSIX, as the store's lock; imported here so that importing this module needs none

    data = (line + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _WRITE_LOCK:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # another process appending to the same home waits its turn
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A line cut short by a crash: start on a new line, or this whole entry would be glued to
                # it and lost with it. The cut line stays as it is, counted as unreadable by `read`.
                data = b"\n" + data
            # One unbuffered write of the whole line (nothing for a flush to hold back), then fsync so
            # that a recorded vote survives a power cut.
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"only {written} of {len(data)} bytes of a feedback line reached {path}")
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the POSIX lock


def read(home: Path, domain_id: str) -> FeedbackLog:
    """Every readable entry of the domain's feedback file, oldest first, and the count of lines
    that could not be read; no file is no feedback. Never changes the file."""
    path = feedback_path(home, domain_id)
    if not path.exists():
        return FeedbackLog(path=path, entries=[], unreadable=0)
    data = path.read_bytes()
    entries, unreadable = [], 0
    # Bytes, decoded per line: a line cut inside a multi-byte character spoils only itself.
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not an object")
            entries.append(make_entry(
                time=row["time"], question=row["question"], history=row["history"], answer=row["answer"],
                sources=row["sources"], adapter=row["adapter"], vote=row["vote"], correction=row["correction"],
                abstained=row.get("abstained", False), stopped=row.get("stopped", False)))
        except (ValueError, KeyError, TypeError, DomainchatError):
            unreadable += 1
    return FeedbackLog(path=path, entries=entries, unreadable=unreadable, sha256=hashlib.sha256(data).hexdigest())

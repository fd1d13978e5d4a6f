"""Passage text: how the text of a passage reads as quotable pieces, and the amounts a text states.

Owns: where sentences end (not after "p.m." or "e.g."), which lines are headings (context, never
quoted), list items with the lead-in they answer and the run of bullet lines they belong to, table
rows read as sentences with their column names, and amounts and the ranges that hold them ("from
$50 to $149.99" holds $139).

It works on text only: it knows nothing of questions, scores, answers or citations; grounding
decides what to quote from the pieces it returns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Sentence ends: . ! ? followed by a space and an upper-case letter, a digit, a quote or a
# parenthesis (not "[": a citation after the full stop belongs to the sentence before it).
# Abbreviations that end in a full stop do not end a sentence ("before 1 p.m. Pacific Time").
SENTENCE_END = re.compile(r"(?<=[.!?])(?<![ap]\.m\.)(?<!e\.g\.)(?<!i\.e\.)(?<!U\.S\.)(?<!\bvs\.)(?<!\b[DM]r\.)"
                          r"(?<!\bNo\.)(?<!\bSt\.)(?:\*\*)?[\"”']?\s+(?=[A-Z0-9\"“(*])")
BULLET = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")
_TABLE_RULE = re.compile(r":?-{3,}:?")
MIN_SENTENCE_WORDS = 4
MIN_ITEM_WORDS = 2
# 'Our policy: "Returns are inspected within 3 business days."': the quoted words are the claim; the
# lead-in is quoted as evidence only because it shares the sentence (and the sentence split takes
# the closing quote when another sentence follows).
_QUOTED_CLAIM = re.compile(r'^[^"“:]{1,40}:\s*["“]([^"”]*)["”]?$')
# An amount, for ranges: "$139", "25%", "20 minutes", "52". A number inside a token ("401(k)",
# "5/1", "1-555", "15-year") or a year is not one.
_VALUE = r"(?<![\w/.\-])(?P<dollar>\$)?(?P<value>\d[\d,]*(?:\.\d+)?)(?![\w/(\-])(?P<percent>\s?%| percent\b)?"
_UNIT = r"(?:\s+(?P<word>[A-Za-z]+))?"
_QUESTION_AMOUNT = re.compile(_VALUE + _UNIT)
# "from $50 to $149.99", "between 18 and 64", "5–10 days"; "under $50", "at least 12 months", "65 or older".
_TWO_SIDED = re.compile(r"(?<![\w/.\-])\$?(?P<low>\d[\d,]*(?:\.\d+)?)(?:\s?%)?\s*(?:to|and|–|—)\s*" + _VALUE + _UNIT,
                        re.IGNORECASE)
_BELOW = re.compile(r"\b(?:under|below|less than|up to|no more than)\s+" + _VALUE + _UNIT, re.IGNORECASE)
_ABOVE = re.compile(r"\b(?:over|above|more than|at least)\s+" + _VALUE + _UNIT + "|" + _VALUE.replace("?P<", "?P<o_")
                    + r"\s+(?:or|and)\s+(?:more|older|over|up)\b", re.IGNORECASE)
# The units a word after an amount can name; any other word ("I'm 52 and …") leaves it a bare count.
_UNITS = {"second", "minute", "hour", "day", "week", "month", "year", "mg", "g", "gram", "kg", "lb", "pound", "ounce",
          "oz", "mile", "km", "ml", "unit", "point"}


def _is_heading(line: str, first: bool) -> bool:
    """A heading line of a chunk (a chunk starts with its "Title > Section" path; Markdown headings
    start with #): no final punctuation, and short, first in the chunk or a path. Headings are
    context for scoring, never quoted as evidence."""
    stripped = line.strip().lstrip("#").strip()
    if not stripped or stripped.endswith((".", "!", "?", ":", ";")):
        return False
    # A chunk's path may end in a parenthesis ("Type 2 Diabetes > Low blood sugar (hypoglycaemia)");
    # elsewhere a line ending in one or in a quote is prose.
    if line.lstrip().startswith("#") or (first and " > " in stripped):
        return True
    if stripped.endswith(('"', ")")):
        return False
    return " > " in stripped or first or len(stripped.split()) < 14


def amounts_in(text: str) -> set[tuple[str, float]]:
    """The amounts `text` states, as (unit, value), years left out: the unit is "$", "%", a unit of
    time or measure ("day", "mg"), or "" for a bare count or an age."""
    found = {_amount(m) for m in _QUESTION_AMOUNT.finditer(text)}
    return {(unit, value) for unit, value in found if unit or not (1900 <= value <= 2100 and value.is_integer())}


def _amount(match: re.Match[str], prefix: str = "") -> tuple[str, float]:
    dollar, value, percent = (match.group(prefix + name) for name in ("dollar", "value", "percent"))
    word = (match.groupdict().get(prefix + "word") or "").lower()
    word = word[:-1] if len(word) > 3 and word.endswith("s") else word
    unit = "$" if dollar else "%" if percent else word if word in _UNITS else ""
    return unit, float(value.replace(",", ""))


def holds_amount(sentence: str, amounts: set[tuple[str, float]]) -> bool:
    """Whether a range that `sentence` states holds one of `amounts` in the same unit ("from $50 to
    $149.99" holds $139, not 139 days; "40 or older" holds 52; "at least 12 months" does not hold an
    age of 62)."""
    if not amounts:
        return False
    text = sentence.replace("**", "")
    for m in _TWO_SIDED.finditer(text):
        unit, high = _amount(m)
        low = float(m.group("low").replace(",", ""))
        if any(u == unit and low <= v <= high for u, v in amounts):
            return True
    for m in _BELOW.finditer(text):
        unit, limit = _amount(m)
        if any(u == unit and v < limit for u, v in amounts):
            return True
    for m in _ABOVE.finditer(text):
        unit, limit = _amount(m, "" if m.group("value") else "o_")
        if any(u == unit and v >= limit for u, v in amounts):
            return True
    return False


def passage_sentences(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(heading context, [(sentence, the lead-in of the list it is an item of, or "")]) of one
    passage. A list's lead-in ("See a doctor if you have:") states nothing by itself, but it is what
    its items answer: the items carry it as context, as sentences carry their heading."""
    heading, items = passage_items(text)
    return heading, [(sentence, lead_in) for sentence, lead_in, _, _ in items]


def _table_cells(line: str) -> list[str] | None:
    """The cells of a Markdown table line ("| Standard | 3–5 business days | $5.99 |"), else None."""
    stripped = line.strip()
    if len(stripped) < 3 or not (stripped.startswith("|") and stripped.endswith("|")):
        return None
    return [cell.strip().replace("**", "") for cell in stripped[1:-1].split("|")]


def _table_row(cells: list[str], columns: list[str]) -> str:
    """A table row as a sentence that reads without its table: "Standard — carrier: UPS Ground;
    delivery time: 3–5 business days; cost: $5.99". The first cell names the row; the others go
    under their column's name (its first letter lowered unless the name is an acronym)."""
    named = []
    for position, cell in enumerate(cells[1:], start=1):
        column = columns[position] if position < len(columns) else ""
        if column[1:2].islower():
            column = column[0].lower() + column[1:]
        if cell:
            named.append(f"{column}: {cell}" if column else cell)
    return f"{cells[0]} — {'; '.join(named)}" if named else cells[0]


def passage_items(text: str) -> tuple[str, list[tuple[str, str, int | None, int]]]:
    """passage_sentences, with the list each sentence is an item of (the number of its run of
    bullet lines or table rows in the passage, None for a sentence of prose) and the line it is on.
    A table's rows are sentences with their column names (_table_row); its header and rule lines
    are not."""
    heading, found = [], []
    lead_in = ""
    run, in_list = 0, False
    columns: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        cells = _table_cells(line)
        if cells is not None:
            if all(_TABLE_RULE.fullmatch(cell) for cell in cells):
                continue
            following = next((later for later in lines[index + 1:] if later.strip()), "")
            rule = _table_cells(following)
            if rule is not None and all(_TABLE_RULE.fullmatch(cell) for cell in rule):
                columns = cells  # the header row names the columns
                continue
            if not in_list:
                run += 1
            in_list = True
            sentence = _table_row(cells, columns)
            # A row is quoted as a sentence of its own: after a lead-in, the rows would run together
            # in one sentence whose items are themselves lists ("…: Standard — cost: $5.99; …; Express — …").
            if len(sentence.split()) >= MIN_ITEM_WORDS:
                found.append((sentence, "", run, index))
            continue
        columns = []
        bullet = BULLET.match(line)
        if bullet and not in_list:
            run += 1
        in_list = bool(bullet)
        if _is_heading(line, first=index == 0) and not bullet:
            heading.append(line.strip().lstrip("#").strip())
            lead_in = ""
            continue
        # Bold ("**$129.** A 2.8-inch display") is emphasis in the passage; in a quoted sentence the
        # split would leave half a pair.
        body = BULLET.sub("", line).replace("**", "").strip()
        parts = [p.strip() for p in SENTENCE_END.split(body)]
        for sentence in parts:
            sentence = _QUOTED_CLAIM.sub(r"\1", sentence)
            context = lead_in if bullet else ""
            # An item under a lead-in may be short ("blood in the stool"): the lead-in says what it is.
            if (len(sentence.split()) >= (MIN_ITEM_WORDS if context else MIN_SENTENCE_WORDS)
                    and not sentence.endswith(":")):
                found.append((sentence, context, run if bullet else None, index))
        if not bullet:
            lead_in = parts[-1].rstrip(":") if parts and parts[-1].endswith(":") else ""
    return " ".join(heading), found


def quoted_table_rows(text: str, spans: Sequence[str]) -> set[int]:
    """The numbers of the lines of passage `text` that are table rows quoted among `spans` (a row is
    quoted as a sentence with its column names, so it is not found in its line as written)."""
    _, items = passage_items(text)
    lines = text.splitlines()
    return {line for sentence, _, _, line in items if sentence in spans and _table_cells(lines[line]) is not None}

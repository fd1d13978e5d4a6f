"""Grounding: which sentences of the retrieved passages answer the question, and which numbers an
answer may state.

A 135M model asked to answer from four whole passages often ignores them (it repeats figures it
learned in training). This module picks the few sentences nearest the question (lexical
overlap weighted by rarity, plus embedding cosine when an embedder is given, plus a sentence whose
range holds an amount the question states; a table row is read with its column names), with the
sentences that one pointing back ("They usually …") leans on and the rest of a list two of whose
items it picks, so that the answer can open with them, quoted with their [n]; it lists the numbers
that the passages, the question and the conversation contain, which the engine's number guard and
the eval's "unsupported numbers" use, and changes figures consistently (the counterfactual eval's
knowledge and training's counterfactual copies); and it says whether a passage backs a sentence
(the check on what the model adds after the opening, and the eval's citation precision) and
whether that sentence is worth showing after the opening (it adds something, and is more than an
offer of help or a pleasantry).

It works on text only: it knows nothing of models, stores or domains (it is handed passages and,
optionally, a function that embeds texts). How a passage's text splits into sentences, list items
and table rows, and which amounts a text states, is passage_text's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from domainchat.knowledge import Passage
from domainchat.lexical import content_words
from domainchat.passage_text import (
    BULLET,
    MIN_SENTENCE_WORDS,
    SENTENCE_END,
    amounts_in,
    holds_amount,
    passage_items,
    passage_sentences,
)

Embed = Callable[[list[str]], list[list[float]]]

# A number as written in prose: 30, 6.99, 1,000, 2026. Digits glued to letters (a model name such
# as "A7") still count: a wrong model number is as wrong as a wrong price.
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
CITATION = re.compile(r"\[(\d+)\]")
LIST_MARKER = re.compile(r"^\s*\d{1,2}[.)]\s", re.MULTILINE)
_TRAILING_CONJUNCTION = re.compile(r"[;,]\s*(and|or)$", re.IGNORECASE)
# A sentence that opens by pointing back ("They usually heal within a week.", "This makes probate
# easier", "During those 2 hours …") says nothing alone: it is quoted right after the sentence before
# it on its line (and that one's, when it points back too), or not at all when they do not fit. On
# every answerable eval question plus both suites, answers with a sentence that points back to
# nothing quoted before it: 32 -> 2 of 377; key facts customer service 0.750 -> 0.759, legal 0.792
# -> 0.782 (one follow-up, "Can I cancel it later?"), the others unchanged; ~1 word more per answer.
# Adding the sentence only where it still fit after choosing left 26 of 377; one sentence back, in
# prose only, left 10.
_LEANS_BACK = re.compile(
    r"^(?:(?:It(?! (?:is|was|can be|may be) \w+ (?:to|that)\b)|Its|They|Their|Them|These|Those|This|That|Such"
    r"|He|She|His|Her)\b"
    r"|(?:During|On|In|After|Before|For|Within|At|By|Of|With|Without) (?:those|these|that|this|such|it|them)\b)")
# How a sentence's score mixes its words' overlap with the question and its embedding's cosine, plus
# a bonus of RANK_BONUS / rank for the passage it comes from, plus NUMBER_BONUS for a sentence with a
# number when the question asks for one. Chosen on the four domains' 179 answerable eval questions
# by the share of key facts found in the 2-3 chosen sentences (0.45-0.51 -> 0.51-0.61 for two).
LEXICAL_WEIGHT = 0.5
SEMANTIC_WEIGHT = 0.5
RANK_BONUS = 0.15
NUMBER_BONUS = 0.1
# Each further sentence is chosen by its score minus DIVERSITY x its highest embedding cosine with a
# sentence already chosen (maximal marginal relevance, Carbonell & Goldstein 1998), so that five
# quoted sentences say five things. With five sentences, on every answerable eval question: key
# facts 0.694-0.870 without it, 0.713-0.878 with 0.15; 0.3 and 0.45 lost 0.01-0.10.
DIVERSITY = 0.15
# A question that states an amount ("extended protection for a $139 camera", "I'm 52") is answered by
# the sentence whose stated range holds it ("Devices from $50 to $149.99: $19.99", "workers 40 or
# older"), which shares no word with it: such a sentence gets RANGE_BONUS. On every answerable eval
# question it changed one answer's key facts ("… for a $139 camera?": customer service 0.741 ->
# 0.750, its numbers-changed suite 0.696 -> 0.708) and no other domain's; 0.2 and 0.3 did the same.
RANGE_BONUS = 0.1
# A list quoted in part reads as the whole list: "Warranty lengths: thermostats: 2 years; cameras:
# 1 year" hides the light strips' 3 years from "Which products have the longest warranty?". Once
# this many items of one list (a run of bullet lines, after a lead-in or a heading) are quoted, its
# other items follow, within the word budget. On every answerable eval question it added 2-9
# words on average and key facts in every domain: customer service 0.694 -> 0.741, finance
# 0.807 -> 0.837, legal 0.785 -> 0.792, medical 0.86 -> 0.907 (lists after a lead-in alone: 0.731,
# 0.837, 0.792, 0.889).
COMPLETE_LIST_ITEMS = 2
# The quoted sentences stop before their words pass this (the first is always quoted; a list's
# lead-in counts once, with its first quoted item). Uncounted lead-ins let openings reach 143-152
# words; counted, the longest are 123-125 (with their [n]) and every answerable eval question keeps
# its key facts. 105 words cost finance, legal and medical 0.016-0.019 of them.
MAX_EVIDENCE_WORDS = 120
# The whole answer: the opening and the model's sentence after it. The sentence is left out rather
# than the answer allowed to run on: ~120 words is what a reader of a chat answer takes in.
MAX_ANSWER_WORDS = 130
_ASKS_FOR_NUMBER = re.compile(r"\b(how (much|many|long|soon|often|old|big|high|low|far|late|early)|what time|when|"
                              r"what (is|are) the (limit|fee|cost|price|rate|minimum|maximum|deadline)|percent|age)\b",
                              re.IGNORECASE)
NEAR_DUPLICATE = 0.7  # share of a sentence's content words already in a chosen sentence
# A passage backs a sentence when it holds all of the sentence's numbers and at least this share of
# its content words (the eval's citation precision, and the check on a continuation sentence).
BACKING_WORD_SHARE = 0.5
QUOTED_SHARE = 0.8  # a passage sentence whose content words are this much in an answer sentence is quoted there
_OFFERS_HELP = re.compile(
    r"^\W*(?:I(?:'d| would| can| could| will|'ll|'m| am)?\s+(?:be\s+(?:happy|glad)\s+to\s+|also\s+)?(?:help|assist)\b"
    r"|(?:I\s+)?hope (?:this|that|it) helps|let me know if\b|is there anything else\b)", re.IGNORECASE)
_SENTENCE_CLOSE = (".", "!", "?", ")", "]", '"', "”")


@dataclass(frozen=True)
class Evidence:
    number: int  # the passage's citation number, 1-based
    text: str  # one sentence of that passage, as written there
    score: float
    lead_in: str = ""  # the lead-in of the list this sentence is an item of ("Contact a clinician if")
    position: int = 0  # where it stands in the passages: one list's items are quoted in this order
    run: int | None = None  # the list (run of bullet lines) of its passage it is an item of; None: prose


def numbers_in(text: str) -> list[str]:
    """The numbers stated in `text`, in order: citation markers ([2]) and list markers at the start of
    a line ("1. ") are structure, not statements, and are left out."""
    text = CITATION.sub(" ", text)
    text = LIST_MARKER.sub(" ", text)
    return [m.group().rstrip(".,") for m in NUMBER.finditer(text)]


def allowed_numbers(texts: Iterable[str]) -> frozenset[str]:
    """Every number stated in `texts` (passages, question, history): what an answer may repeat."""
    return frozenset(n for text in texts for n in numbers_in(text))


def unsupported_numbers(answer: str, sources: Iterable[str]) -> list[str]:
    """Numbers in `answer` that appear in none of `sources`."""
    allowed = allowed_numbers(sources)
    return [n for n in numbers_in(answer) if n not in allowed]


def changed_number(number: str, taken: set[str], value: int | None = None) -> str:
    """A different number of the same shape as `number` (30 -> 41, 6.99 -> 9.99, 1,000 -> 1,334)
    that appears nowhere in `taken`: the first free one from `value` upwards, by default a third
    above the original. What the counterfactual eval and counterfactual training examples state."""
    whole, dot, decimals = number.partition(".")
    digits = whole.replace(",", "")
    value = int(digits) + int(digits) // 3 + 1 if value is None else value
    while True:
        text = str(value).zfill(len(digits))
        if "," in whole:
            text = f"{value:,}"
        candidate = text + dot + decimals
        if candidate != number and candidate not in taken:
            return candidate
        value += 1


def apply_numbers(text: str, mapping: dict[str, str]) -> str:
    """`text` with every whole number in `mapping` replaced (list markers at line starts and citation
    markers such as [2] kept)."""
    def replace(match: re.Match[str]) -> str:
        number = match.group()
        if text[match.start() - 1:match.start()] == "[" and text[match.end():match.end() + 1] == "]":
            return number  # a citation
        line_start = text.rfind("\n", 0, match.start()) + 1
        if text[line_start:match.start()].strip() == "" and text[match.end():match.end() + 1] in (".", ")") \
                and not text[match.end() + 1:match.end() + 2].isdigit():
            return number  # a list marker
        return mapping.get(number, number)
    return NUMBER.sub(replace, text)


def backs(passage: str, sentence: str) -> bool:
    """Whether `passage` backs `sentence`: all of the sentence's numbers are in it, and at least
    BACKING_WORD_SHARE of its content words. A lexical check: it catches a sentence that drifts away
    from the passage, not one that rearranges the passage's own words into a false claim."""
    claim = CITATION.sub(" ", sentence)
    if not set(numbers_in(claim)) <= set(numbers_in(passage)):
        return False
    words = {w for w in content_words(claim) if not NUMBER.fullmatch(w)}
    return not words or len(words & set(content_words(passage))) >= BACKING_WORD_SHARE * len(words)


def backed_by(passages: Sequence[Passage], sentence: str) -> bool:
    """Whether the passages back `sentence`: the passages it cites ([n]), or any one when it cites none."""
    cited = [int(n) for n in CITATION.findall(sentence)]
    if cited:
        return all(1 <= n <= len(passages) and backs(passages[n - 1].text, sentence) for n in cited)
    return any(backs(p.text, sentence) for p in passages)


def adds_to(opening_text: str, sentence: str) -> bool:
    """Whether the model's `sentence` belongs after the quoted evidence `opening_text`: it says
    something no quoted sentence says (under NEAR_DUPLICATE of its content words in any one of them;
    the model restated a quoted sentence in 25 of the 43 sentences shown in one eval) and the answer
    stays within MAX_ANSWER_WORDS."""
    words = set(content_words(CITATION.sub(" ", sentence)))
    if not words or len(opening_text.split()) + len(sentence.split()) > MAX_ANSWER_WORDS:
        return False
    return not any(len(words & set(content_words(CITATION.sub(" ", quoted)))) >= NEAR_DUPLICATE * len(words)
                   for quoted in sentences_of_answer(opening_text))


def repeats_layout(sentence: str, passages: Sequence[Passage]) -> bool:
    """Whether `sentence` repeats how the passages are labelled rather than what they say: a source
    file name ("Contacting Kestrel Home Support (contact-channels.md)") or a chunk's heading path
    ending in its section ("401(k) plans > Vesting of employer contributions [1]."). The model
    writes such lines after the quoted evidence, and the word-overlap check in `backs` lets them by.
    A menu path in prose ("Go to Settings > Security > Two-step verification.") is not a heading."""
    claim = CITATION.sub(" ", sentence).strip().rstrip(".!?").strip().lower()
    for passage in passages:
        if passage.source and passage.source.lower() in claim:
            return True
        first = passage.text.lstrip().split("\n", 1)[0].lstrip("#").strip().lower()
        if " > " in claim and " > " in first and claim.rsplit(" > ", 1)[1].strip() == first.rsplit(" > ", 1)[1].strip():
            return True
    return False


def offers_help(sentence: str) -> bool:
    """Whether `sentence` is the assistant offering help or a pleasantry ("I can help with that
    too.", "I'd be happy to help you find …", "I hope this helps!", "Let me know if …"): it states
    nothing the reader can use, and the word "help" in a passage lets it pass the backing check. In
    the eval all five such model sentences after the quoted evidence said nothing, and one was
    untrue ("… like I did before"). An offer of a next step ("I can connect you with a human
    agent"), which customer service's voice asks for, is not one."""
    return bool(_OFFERS_HELP.match(CITATION.sub(" ", sentence)))


def worth_showing(opening_text: str, sentence: str, passages: Sequence[Passage]) -> bool:
    """Whether the model's `sentence` is shown after the quoted evidence `opening_text`: it adds to
    the opening, a passage backs it, and it neither repeats how the passages are labelled nor only
    offers help. Serving applies it, and training teaches only sentences that pass it."""
    return (adds_to(opening_text, sentence) and backed_by(passages, sentence)
            and not repeats_layout(sentence, passages) and not offers_help(sentence))


def cited_spans(answer: str, passages: Sequence[Passage]) -> dict[int, list[str]]:
    """passage number -> the sentences of that passage the answer drew on (the sources panel marks
    them): for each answer sentence that cites [n] and that passage n backs, the sentences of
    passage n it quotes (QUOTED_SHARE of their content words in it: one list's items are quoted in
    one sentence), or else the one sharing the most content words with it."""
    spans: dict[int, list[str]] = {}
    for sentence in sentences_of_answer(answer):
        words = set(content_words(CITATION.sub(" ", sentence)))
        for n in sorted({int(cited) for cited in CITATION.findall(sentence)}):
            if not 1 <= n <= len(passages) or not backs(passages[n - 1].text, sentence):
                continue
            _, found = passage_sentences(passages[n - 1].text)
            overlaps = [(len(words & tokens), len(tokens), s) for s, _ in found if (tokens := set(content_words(s)))]
            quoted = [s for shared, size, s in overlaps if shared >= QUOTED_SHARE * size]
            if not quoted and overlaps and max(overlaps)[0]:
                quoted = [max(overlaps)[2]]
            for span in quoted:
                if span not in spans.setdefault(n, []):
                    spans[n].append(span)
    return spans


def first_sentence(continuation: str, final: bool) -> str | None:
    """The first sentence of what the model wrote after the opening, once it is complete: ended by the
    start of another sentence or by a line break, or, when `final` (the model stopped), by the end of
    the text. None while it may still grow; "" when it ended without a whole sentence (a fragment
    cut off by the token limit, or a few words without a full stop)."""
    body = continuation.lstrip()
    marker = BULLET.match(body)  # "1. " opens a list item; it does not end a sentence
    if marker:
        body = body[marker.end():]
    ends = []
    if "\n" in body:
        ends.append(body.index("\n"))
    after = SENTENCE_END.search(body)
    if after:
        ends.append(after.start())
    if not ends and not final:
        return None
    sentence = body[:min(ends)].strip() if ends else body.strip()
    whole = sentence.endswith(_SENTENCE_CLOSE) and len(sentence.split()) >= MIN_SENTENCE_WORDS
    return sentence if whole else ""


def sentences_of_answer(answer: str) -> list[str]:
    """An answer's sentences, line by line (a numbered step is a sentence of its own)."""
    return [s.strip() for line in answer.splitlines() for s in SENTENCE_END.split(BULLET.sub("", line))
            if s.strip()]


def select_evidence(
    question: str, passages: Sequence[Passage], embed: Embed | None = None, count: int = 3,
    max_words: int = MAX_EVIDENCE_WORDS,
) -> list[Evidence]:
    """Up to `count` sentences of `passages` that best answer `question`, best first, each new one
    chosen for what it adds to those before it (DIVERSITY), their words within `max_words`; then
    the other items of a list that COMPLETE_LIST_ITEMS of them were chosen from, within the words.

    A sentence's score is its share of the question's content words, each weighted by its rarity
    among all candidate sentences (idf), with the words of the passage heading and of a list item's
    lead-in counting half (a section's subject often lives only in its heading), plus, when `embed`
    is given, the cosine similarity of question and sentence (a list item after its lead-in); a
    small bonus follows the passage's retrieval rank, and another goes to a sentence whose stated
    range holds an amount the question states (RANGE_BONUS). A sentence that points back ("They
    usually heal within a week.") is quoted right after the sentence before it. The lead-in
    context (with the opening quoting items after their lead-in) took the quoted evidence from
    0.63-0.76 to 0.65-0.84 of key facts across the four domains' eval questions; five sentences
    chosen with diversity took it to 0.71-0.88 (docs/eval/eval.md)."""
    candidates: list[tuple[int, str, str, str]] = []  # (passage number, heading and lead-in, sentence, lead-in)
    embedded: list[str] = []  # what the embedding sees: a list item after its lead-in
    runs: list[int | None] = []  # the list each candidate is an item of
    antecedents: list[int | None] = []  # the candidate a pronoun at the start of this one refers back to
    for number, passage in enumerate(passages, start=1):
        heading, found = passage_items(passage.text)
        candidates += [(number, f"{heading} {lead_in}", s, lead_in) for s, lead_in, _, _ in found]
        embedded += [f"{lead_in}: {s}" if lead_in else s for s, lead_in, _, _ in found]
        runs += [run for _, _, run, _ in found]
        # A sentence that opens with "It", "They", "This …" leans on the one before it on its line.
        offset = len(antecedents)
        antecedents += [offset + k - 1 if k and line == found[k - 1][3] and _LEANS_BACK.match(sentence) else None
                        for k, (sentence, _, _, line) in enumerate(found)]
    if not candidates:
        return []
    terms = set(content_words(question))
    token_sets = [set(content_words(s)) for _, _, s, _ in candidates]
    context_sets = [set(content_words(c)) for _, c, _, _ in candidates]
    total = len(candidates)
    idf = {t: math.log(1 + (total + 0.5) / (sum(t in s for s in token_sets) + 0.5)) for t in terms}
    weight = sum(idf.values()) or 1.0
    lexical = [sum(idf[t] * (1.0 if t in s else 0.5 if t in c else 0.0) for t in terms) / weight
               for s, c in zip(token_sets, context_sets, strict=True)]
    semantic = [0.0] * total
    sentence_vectors: list[list[float]] = []
    if embed is not None:
        vectors = embed([question] + embedded)
        query, sentence_vectors = vectors[0], vectors[1:]
        semantic = [_dot(query, v) for v in sentence_vectors]
    # A question after an amount, a time or a limit is answered by a sentence that states a number.
    wants_number = bool(_ASKS_FOR_NUMBER.search(question))
    amounts = amounts_in(question)
    scored = [Evidence(number, sentence,
                       round(LEXICAL_WEIGHT * lex + SEMANTIC_WEIGHT * sem + RANK_BONUS / number
                             + (NUMBER_BONUS if wants_number and NUMBER.search(sentence) else 0.0)
                             + (RANGE_BONUS if holds_amount(sentence, amounts) else 0.0), 4),
                       lead_in, position, run)
              for position, ((number, _, sentence, lead_in), lex, sem, run)
              in enumerate(zip(candidates, lexical, semantic, runs, strict=True))]
    # Each pick gives way to sentences that say something the chosen ones do not (maximal marginal
    # relevance): two passages often say the same thing in other words.
    redundancy = [0.0] * total  # highest cosine with a chosen sentence
    remaining = set(range(total))
    chosen: list[int] = []
    used = 0
    picked = 0
    while remaining and picked < count:
        best = max(remaining, key=lambda i: (scored[i].score - DIVERSITY * redundancy[i], -i))
        remaining.remove(best)
        pick = scored[best]
        words, length = token_sets[best], len(pick.text.split())
        # The opening writes a list's lead-in once, before its first quoted item: it counts then.
        if pick.lead_in and not any((scored[j].number, scored[j].lead_in) == (pick.number, pick.lead_in)
                                    for j in chosen):
            length += len(pick.lead_in.split())
        # The sentences it points back through, up to one already chosen (or the paragraph's first).
        leads_to, anchor = [], antecedents[best]
        while anchor is not None and anchor not in chosen:
            leads_to.insert(0, anchor)
            anchor = antecedents[anchor]
        length += sum(len(scored[j].text.split()) for j in leads_to)
        # Quoting the same words twice tells the reader nothing more.
        if (any(len(words & token_sets[j]) >= NEAR_DUPLICATE * len(words) for j in chosen)
                or (chosen and used + length > max_words)):
            continue
        remaining.difference_update(leads_to)
        at = chosen.index(anchor) + 1 if anchor is not None else len(chosen)
        chosen[at:at] = leads_to + [best]
        picked += 1
        used += length
        if sentence_vectors:
            for i in remaining:
                redundancy[i] = max(redundancy[i], _dot(sentence_vectors[i], sentence_vectors[best]))
    quoted_lists = [(scored[i].number, scored[i].run) for i in chosen if scored[i].run is not None]
    for key in dict.fromkeys(quoted_lists):
        if quoted_lists.count(key) < COMPLETE_LIST_ITEMS:
            continue
        for i in range(total):
            if i in chosen or (scored[i].number, scored[i].run) != key:
                continue
            length = len(scored[i].text.split())
            if used + length > max_words:
                break
            chosen.append(i)
            used += length
    return [scored[i] for i in chosen]


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))



def opening(evidence: Sequence[Evidence]) -> str:
    """The first line of an answer: the evidence sentences, best first, each cited with its [n]
    before its final full stop; the model continues on the next line. The quoted items of one list
    stand together, in the passage's order, where the best of them ranks: steps are read in the
    order they are taken. Items are quoted after their lead-in ("Contact a clinician if: it lasts
    longer than a week; you have a rash with the sore throat [2]."): alone, "You have a rash with
    the sore throat [2]." read as a statement, not a condition. Every quoted piece ends with its [n]
    and a full stop, so that no sentence runs on into one its passage does not back."""
    groups: dict[tuple[int, int | str], list[Evidence]] = {}
    order: list[tuple[int, int | str] | Evidence] = []
    for e in evidence:
        if e.run is None and not e.lead_in:
            order.append(e)
            continue
        # Evidence made by hand, without its run, is grouped by its lead-in.
        key = (e.number, e.run if e.run is not None else e.lead_in)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(e)
    cited = []
    for item in order:
        if isinstance(item, Evidence):
            cited.append(_cite(item.text, item.number))
            continue
        items = sorted(groups[item], key=lambda e: e.position)
        if items[0].lead_in:
            texts, carried = [], ""
            for k, e in enumerate(items):
                text, conjunction = _without_conjunction(e.text.rstrip().rstrip("."))
                texts.append(f"{carried} {text}".lstrip())
                # "A; B; and C" in the passage: the "and" stays before C, when C is quoted next to B.
                follows = k + 1 < len(items) and items[k + 1].position == e.position + 1
                carried = conjunction if follows else ""
            cited.append(_cite(f"{items[0].lead_in}: {'; '.join(texts)}", item[0]))
        else:
            cited += [_cite(e.text, item[0]) for e in items]
    return " ".join(cited) + "\n" if cited else ""


def served_start(question: str, passages: list[Passage], embed: Embed | None, sentences: int,
                 prompt_passages: str) -> tuple[str, list[Passage]]:
    """(the answer's opening, the passages the model reads before continuing it): up to `sentences`
    evidence sentences quoted with their [n]; `passages` with their text left out when
    `prompt_passages` is "titles" (the model reads the quoted evidence once, in the opening it
    continues), cut down to the quoted sentences when "evidence", the same list object when "whole"
    or nothing is quoted. Serving and training's served-format examples both build it here, so that
    an adapter learns on what it is served."""
    if not sentences or not passages:
        return "", passages
    evidence = select_evidence(question, passages, embed, sentences)
    if not evidence or prompt_passages == "whole":
        reads = passages
    elif prompt_passages == "titles":
        reads = [dataclasses.replace(p, text="") for p in passages]
    else:
        reads = evidence_passages(passages, evidence)
    return opening(evidence), reads


def evidence_passages(passages: Sequence[Passage], evidence: Sequence[Evidence]) -> list[Passage]:
    """`passages` cut down to the `evidence` sentences, each passage keeping its place (so its [n]) and
    its title; one with no sentence chosen keeps no text. A list item keeps its lead-in, once."""
    kept: list[Passage] = []
    for number, passage in enumerate(passages, start=1):
        lines: list[str] = []
        for e in sorted((e for e in evidence if e.number == number), key=lambda e: e.position):
            if e.lead_in and f"{e.lead_in}:" not in lines:
                lines.append(f"{e.lead_in}:")
            lines.append(f"- {e.text}" if e.lead_in else e.text)
        kept.append(dataclasses.replace(passage, text="\n".join(lines)))
    return kept


def _without_conjunction(text: str) -> tuple[str, str]:
    """(a list item without its closing separator and without the "and"/"or" that ends it in the
    passage, that word): "… brisk walking; or" -> ("… brisk walking", "or"). Quoted as it stands,
    the item read "… brisk walking; or; …" or "…; or [1]."."""
    text = text.rstrip().rstrip(";,:").rstrip()
    found = _TRAILING_CONJUNCTION.search(text)
    if not found:
        return text, ""
    return text[:found.start()].rstrip().rstrip(";,").rstrip(), found.group(1).lower()


def _cite(text: str, number: int) -> str:
    """One quoted piece, capitalised, with its [n] before its final full stop."""
    text = _without_conjunction(text)[0]
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    if text.endswith((".", "!", "?")) and not text.endswith(('."', '.”')):
        return f"{text[:-1]} [{number}]{text[-1]}"
    return f"{text} [{number}]."

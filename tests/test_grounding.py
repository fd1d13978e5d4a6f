"""Grounding: sentence selection, the evidence opening and the numbers an answer may state (text
only; the embedder is left out, so selection here is lexical)."""

from __future__ import annotations

from domainchat.grounding import (
    allowed_numbers,
    numbers_in,
    opening,
    select_evidence,
    sentences,
    sentences_of_answer,
    unsupported_numbers,
)
from domainchat.knowledge import Passage

RETURNS = Passage(id="returns.md:0:a", source="returns.md", title="Returns", score=0.8, text=(
    "Returns Policy > Restocking fee\n"
    "Most returns carry no fee. A 12% restocking fee is deducted when a stove has been lit.\n"
    "It covers:\n- Cleaning and a pressure test by a technician.\n"))
SHIPPING = Passage(id="shipping.md:0:b", source="shipping.md", title="Shipping", score=0.7, text=(
    "Shipping > Free shipping\nStandard shipping is free on orders of $75 or more, placed before 11 a.m. Mountain "
    "Time. Below that it costs $7.45."))


def test_numbers_leave_out_citations_and_list_markers() -> None:
    assert numbers_in("1. Pay $6.99 [2] or 1,000 points by 1 p.m.\n12) Done in 30.") == ["6.99", "1,000", "1", "30"]
    assert allowed_numbers(["$75 or more", "within 38 days."]) == {"75", "38"}
    assert unsupported_numbers("A 15% fee, within 38 days [1].", ["within 38 days"]) == ["15"]


def test_sentences_skip_headings_and_list_lead_ins() -> None:
    heading, found = sentences(RETURNS.text)
    assert heading == "Returns Policy > Restocking fee"
    assert found == ["Most returns carry no fee.", "A 12% restocking fee is deducted when a stove has been lit.",
                     "Cleaning and a pressure test by a technician."]
    _, shipping = sentences(SHIPPING.text)
    assert shipping[0].endswith("11 a.m. Mountain Time."), "an abbreviation does not end a sentence"


def test_answer_sentences_keep_citations_and_split_steps() -> None:
    assert sentences_of_answer('Yes. "Within 38 days." [1]\n1. Open My Gear [2].\n2. Print it.') == [
        "Yes.", '"Within 38 days." [1]', "Open My Gear [2].", "Print it."]


def test_selection_prefers_the_sentence_that_answers() -> None:
    chosen = select_evidence("What is the restocking fee on a stove I lit?", [SHIPPING, RETURNS], count=1)
    assert [(e.number, e.text) for e in chosen] == [(2, "A 12% restocking fee is deducted when a stove has been lit.")]
    chosen = select_evidence("How much is shipping below the free threshold?", [SHIPPING, RETURNS], count=2)
    assert {e.text for e in chosen} >= {"Below that it costs $7.45."}
    assert select_evidence("anything", []) == []


def test_near_duplicates_are_quoted_once() -> None:
    copy = Passage(id="faq.md:0:c", source="faq.md", title="FAQ", score=0.6,
                   text="A 12% restocking fee is deducted when a stove has been lit, per our policy.")
    chosen = select_evidence("restocking fee stove lit", [RETURNS, copy], count=2)
    assert len(chosen) == 2 and sum("12%" in e.text for e in chosen) == 1


def test_opening_cites_each_sentence_before_its_full_stop() -> None:
    from domainchat.grounding import Evidence

    text = opening([Evidence(2, "A 12% fee applies.", 1.0), Evidence(1, 'Our policy: "Within 38 days."', 0.5)])
    assert text == 'A 12% fee applies [2]. Our policy: "Within 38 days." [1]\n'
    assert opening([]) == ""

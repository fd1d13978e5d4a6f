"""Grounding: sentence selection, the evidence opening and the numbers an answer may state (text
only; the embedder is left out, so selection here is lexical)."""

from __future__ import annotations

from domainchat.grounding import (
    allowed_numbers,
    backs,
    cited_spans,
    evidence_passages,
    numbers_in,
    opening,
    repeats_layout,
    select_evidence,
    sentences_of_answer,
    served_start,
    unsupported_numbers,
)
from domainchat.knowledge import Passage
from domainchat.passage_text import passage_sentences

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
    heading, found = passage_sentences(RETURNS.text)
    assert heading == "Returns Policy > Restocking fee"
    assert [sentence for sentence, _ in found] == [
        "Most returns carry no fee.", "A 12% restocking fee is deducted when a stove has been lit.",
        "Cleaning and a pressure test by a technician."]
    _, shipping = passage_sentences(SHIPPING.text)
    assert shipping[0][0].endswith("11 a.m. Mountain Time."), "an abbreviation does not end a sentence"
    heading, found = passage_sentences("Type 2 Diabetes > Low blood sugar (hypoglycaemia)\n"
                                       "People taking insulin can develop low blood sugar.")
    assert heading == "Type 2 Diabetes > Low blood sugar (hypoglycaemia)"
    assert [s for s, _ in found] == ["People taking insulin can develop low blood sugar."]


def test_an_item_is_chosen_for_what_its_lead_in_says() -> None:
    passage = Passage(id="p.md:0:a", source="p.md", title="P", score=0.8, text=(
        "Pain relief\nIbuprofen eases pain and fever in most adults.\n"
        "Check with a doctor before taking ibuprofen if you:\n- have a stomach ulcer\n- have kidney disease\n"))
    chosen = select_evidence("Who should check with a doctor before taking ibuprofen?", [passage], count=2)
    assert [e.text for e in chosen] == ["have a stomach ulcer", "have kidney disease"]


def test_answer_sentences_keep_citations_and_split_steps() -> None:
    assert sentences_of_answer('Yes. "Within 38 days." [1]\n1. Open My Gear [2].\n2. Print it.') == [
        "Yes.", '"Within 38 days." [1]', "Open My Gear [2].", "Print it."]
    # Bold after a full stop starts a new sentence (the eval checks each one against the passage it cites).
    assert sentences_of_answer("A 2-year warranty [1]. **Lite: $129.** A 2.8-inch display [2].") == [
        "A 2-year warranty [1].", "**Lite: $129.", "A 2.8-inch display [2]."]


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


def test_each_further_sentence_is_chosen_for_what_it_adds(monkeypatch) -> None:
    import domainchat.grounding as grounding

    # Cosine with the question: 0.9, 0.88 (a paraphrase of the first: cosine 0.999) and 0.8 (0.46).
    vectors = {"Which plan fits me?": [1.0, 0.0], "Plan A suits a single device at home.": [0.9, 0.436],
               "A single device at home is best served by plan A.": [0.88, 0.475],
               "Families with many devices choose plan B instead.": [0.8, -0.6]}
    passage = Passage(id="plans.md:0:a", source="plans.md", title="Plans", score=0.8,
                      text=" ".join(list(vectors)[1:]))

    def embed(texts: list[str]) -> list[list[float]]:
        return [vectors[t] for t in texts]

    def chosen() -> list[str]:
        return [e.text for e in select_evidence("Which plan fits me?", [passage], embed, count=2)]

    assert chosen() == ["Plan A suits a single device at home.", "Families with many devices choose plan B instead."]
    monkeypatch.setattr(grounding, "DIVERSITY", 0.0)
    assert chosen() == ["Plan A suits a single device at home.", "A single device at home is best served by plan A."]


def test_quoted_sentences_stay_within_the_word_budget() -> None:
    long = "The restocking fee " + "really " * 20 + "applies to stoves."
    passage = Passage(id="fees.md:0:a", source="fees.md", title="Fees", score=0.8,
                      text=f"{long} The restocking fee is waived for gas stoves never lit. A fee of 12% is usual.")
    assert [e.text for e in select_evidence("restocking fee", [passage], count=3, max_words=10)] == [long]
    within = select_evidence("restocking fee", [passage], count=3, max_words=40)
    assert len(within) == 2 and sum(len(e.text.split()) for e in within) <= 40


def test_a_lists_lead_in_counts_against_the_word_budget_once() -> None:
    passage = Passage(id="fees.md:1:a", source="fees.md", title="Fees", score=0.8, text=(
        "A restocking fee applies to these returned items when they arrive opened or used:\n"
        "- opened stoves with a restocking fee;\n- used grills with a restocking fee;\n"
        "- lit heaters with a restocking fee."))
    chosen = select_evidence("restocking fee", [passage], count=3, max_words=26)
    # lead-in (14 words) + two items (5 each) = 24; a third item would make 29
    assert len(chosen) == 2 and all(e.lead_in for e in chosen)
    assert len(opening(chosen).split()) <= 26 + 2  # + the [n] marker


def test_a_list_quoted_in_part_is_quoted_whole() -> None:
    passage = Passage(id="warranty.md:0:a", source="warranty.md", title="Warranty", score=0.8, text=(
        "Warranty > Length by product\nWarranty lengths:\n- Thermostats and plugs: 2 years.\n"
        "- Cameras and doorbells: 1 year.\n- Bulbs and light strips: 3 years.\n\n"
        "Registering a product is optional.\nSee a technician if:\n- the plug smells of burning\n"
        "- the case is cracked"))
    # Two items of the warranty list answer best; the third, which the question needs, follows them.
    chosen = select_evidence("How long is the warranty on thermostats and cameras?", [passage], count=2)
    assert [e.text for e in chosen][:2] == ["Thermostats and plugs: 2 years.", "Cameras and doorbells: 1 year."]
    assert opening(chosen) == ("Warranty lengths: Thermostats and plugs: 2 years; Cameras and doorbells: 1 year; "
                               "Bulbs and light strips: 3 years [1].\n")
    # One item quoted is an answer in itself: its list is not added.
    assert [e.text for e in select_evidence("Is a cracked case a reason to see a technician?", [passage],
                                            count=1)] == ["the case is cracked"]
    # The rest of a list stays within the word budget.
    assert len(select_evidence("How long is the warranty on thermostats and cameras?", [passage], count=2,
                               max_words=15)) == 2


def test_a_list_under_a_heading_is_completed_and_its_steps_keep_their_order() -> None:
    passage = Passage(id="reset.md:0:a", source="reset.md", title="Reset", score=0.8, text=(
        "Account > Resetting a forgotten password\nThe reset link is valid for 30 minutes.\n"
        "1. On the sign-in screen, tap Forgot password.\n2. Enter the email address on your account.\n"
        "3. Open the reset email and tap the link.\n4. Create a new password of 12 characters.\n"))
    chosen = select_evidence("How do I open the reset email link and create a new password?", [passage], count=2)
    assert len(chosen) == 4 and not any(e.lead_in for e in chosen), "a list without a lead-in is a list too"
    # The steps are quoted in the order they are taken, each with its [n], whatever order they were chosen in.
    assert opening(chosen) == ("On the sign-in screen, tap Forgot password [1]. Enter the email address on your "
                               "account [1]. Open the reset email and tap the link [1]. Create a new password of 12 "
                               "characters [1].\n")


def test_the_and_or_or_that_closes_a_list_item_stays_before_the_next_item() -> None:
    from domainchat.grounding import Evidence

    lead_in = "A claimant must prove"
    items = [Evidence(1, "a false statement of fact;", 0.5, lead_in, 0, 1),
             Evidence(1, "fault, at least negligence; and", 0.5, lead_in, 1, 1),
             Evidence(1, "harm to reputation.", 0.5, lead_in, 2, 1)]
    assert opening(items) == ("A claimant must prove: a false statement of fact; fault, at least negligence; "
                              "and harm to reputation [1].\n")
    # Without the item it led to, the word goes: "…; or [1]." and "…; or; …" said nothing.
    assert opening(items[:2]) == "A claimant must prove: a false statement of fact; fault, at least negligence [1].\n"
    assert opening([Evidence(1, "it lasts 3 to 4 days in a row; or", 0.5, "", 5, None)]) == (
        "It lasts 3 to 4 days in a row [1].\n")


def test_a_table_row_is_quoted_as_a_sentence_with_its_column_names() -> None:
    passage = Passage(id="shipping.md:0:a", source="shipping.md", title="Shipping", score=0.8, text=(
        "Shipping > Options\nPrices and delivery times:\n\n| Option | Delivery time | Cost | UPS service |\n"
        "|---|:---:|---|---|\n| Standard | 3–5 business days | $5.99, **free** over $49 | Ground |\n"
        "| Express | 1 business day | $29.99 | Next Day Air |\n\nOrders ship from Reno."))
    _, found = passage_sentences(passage.text)
    assert [s for s, _ in found] == [
        "Standard — delivery time: 3–5 business days; cost: $5.99, free over $49; UPS service: Ground",
        "Express — delivery time: 1 business day; cost: $29.99; UPS service: Next Day Air",
        "Orders ship from Reno."], "no header or rule line is a sentence; an acronym keeps its case"
    chosen = select_evidence("How much does express delivery cost and how long does standard take?", [passage],
                             count=2)
    # Two rows of one table bring the rest of it; each row is a sentence of its own, with its [n].
    assert opening(chosen).startswith("Standard — delivery time: 3–5 business days; cost: $5.99, free over $49; "
                                      "UPS service: Ground [1]. Express — delivery time: 1 business day; ")
    assert all(backs(passage.text, e.text) for e in chosen)
    # A table without a header row: its cells, in order.
    _, found = passage_sentences("| Basic | $3.99 a month | 1 camera |\n| Plus | $9.99 a month | all cameras |")
    assert [s for s, _ in found] == ["Basic — $3.99 a month; 1 camera", "Plus — $9.99 a month; all cameras"]


def test_a_sentence_that_points_back_is_quoted_after_the_one_it_points_to() -> None:
    passage = Passage(id="cold.md:0:a", source="cold.md", title="Cold sores", score=0.8, text=(
        "Cold sores > Healing\nCold sores are small blisters around the lips caused by a virus. Keep the area "
        "clean. They usually heal within about a week without treatment.\nIt is important to wash your hands "
        "after you heal the blisters."))
    chosen = select_evidence("How long do they take to heal?", [passage], count=1)
    assert opening(chosen) == ("Keep the area clean [1]. They usually heal within about a week without "
                               "treatment [1].\n"), "the sentence before it, on its line, in the passage's order"
    # When the two do not fit in the words left, the sentence that points back is not quoted alone.
    assert not any(e.text.startswith("They") for e in select_evidence(
        "How long do they take to heal? Is it a virus?", [passage], count=2, max_words=20))
    # A chain of them is quoted from its start, also inside a list item.
    item = Passage(id="doorbell.md:0:a", source="doorbell.md", title="Doorbell", score=0.8, text=(
        "Doorbell > Power\nMoving house:\n- The doorbell needs 16-24 V AC. It works with mechanical chimes. "
        "It does not support digital chimes that play a tune."))
    chosen = select_evidence("Does it support digital chimes that play a tune?", [item], count=1)
    assert [e.text for e in chosen] == ["The doorbell needs 16-24 V AC.", "It works with mechanical chimes.",
                                        "It does not support digital chimes that play a tune."]
    # "It is important to …" points at nothing: it is quoted on its own.
    chosen = select_evidence("Is it important to wash hands after the blisters?", [passage], count=1)
    assert [e.text for e in chosen] == ["It is important to wash your hands after you heal the blisters."]


def test_the_sentence_whose_range_holds_the_questions_amount_is_chosen() -> None:
    passage = Passage(id="protect.md:0:a", source="protect.md", title="Protect", score=0.8, text=(
        "Protect > Single-device plans\nA plan covers one device for 3 years. The price depends on the price of "
        "the device:\n- Devices under $50: $7.99.\n- Devices from $50 to $149.99: $19.99.\n"
        "- Devices from $150 to $299.99: $34.99.\n"))
    # No word of the question tells the tiers apart: only the amount does.
    chosen = select_evidence("How much is a plan for a $139 camera?", [passage], count=1)
    assert [e.text for e in chosen] == ["Devices from $50 to $149.99: $19.99."]


def test_the_models_sentence_is_added_only_when_it_says_something_new_and_fits() -> None:
    from domainchat import grounding
    from domainchat.grounding import adds_to

    start = "A 12% restocking fee is deducted when a stove has been lit [1]. Orders of $75 ship free [2].\n"
    assert not adds_to(start, "A restocking fee of 12% is deducted when the stove was lit [1].")  # restated
    assert adds_to(start, "Keep the original box so the return can be inspected quickly [1].")
    assert not adds_to(start, "It is what it is.")  # no content words
    long_start = "Returns are easy [1]. " * (grounding.MAX_ANSWER_WORDS // 4 - 1)
    assert not adds_to(long_start, "Keep the original box so the return can be inspected quickly [1].")


def test_an_offer_of_help_is_not_worth_showing_but_an_offer_of_a_next_step_is() -> None:
    from domainchat.grounding import backed_by, offers_help, worth_showing

    desk = Passage(id="help.md:0:a", source="help.md", title="Help", score=0.8, text=(
        "Our agents help you find shipping options. Type agent in live chat to connect with a human agent."))
    start = "Orders of $75 ship free [1].\n"
    offer = "I can help you find shipping options."
    assert backed_by([desk], offer), "the passage has the words; the offer still says nothing"
    assert not worth_showing(start, offer, [desk])
    assert worth_showing(start, "I can connect you with a human agent in live chat.", [desk])
    assert not worth_showing(start, "Our stores open at noon on Mondays.", [desk])  # backed by no passage
    assert offers_help("I'd be happy to help with that too.") and offers_help("I can also assist you [1].")
    assert not offers_help("A lawyer can help with your claim [1].") and not offers_help("It helps to keep the box.")
    # Pleasantries say nothing either (the served eval showed "I hope this helps!" after one answer).
    assert offers_help("I hope this helps!") and offers_help("Let me know if you have other questions.")
    assert not offers_help("Hope Valley stores restock on Mondays.")


def test_opening_cites_each_sentence_before_its_full_stop() -> None:
    from domainchat.grounding import Evidence

    text = opening([Evidence(2, "A 12% fee applies.", 1.0), Evidence(1, 'Our policy: "Within 38 days."', 0.5)])
    assert text == 'A 12% fee applies [2]. Our policy: "Within 38 days." [1].\n'
    assert opening([]) == ""


def test_a_list_item_in_the_opening_is_a_sentence_its_passage_backs() -> None:
    from domainchat.grounding import Evidence, backed_by, sentences_of_answer

    passages = [Passage(id="a:0:x", source="a.md", title="A", score=1.0,
                        text="Call a doctor if:\n- your temperature is 39.4 °C or higher;\n"
                             "- a fever lasts more than three days;"),
                Passage(id="b:0:x", source="b.md", title="B", score=0.9,
                        text="A fever is a temperature of 38 °C or higher.")]
    text = opening([Evidence(2, "A fever is a temperature of 38 °C or higher.", 1.0),
                    Evidence(1, "your temperature is 39.4 °C or higher;", 0.8),
                    Evidence(1, "a fever lasts more than three days;", 0.7)])
    assert text == ("A fever is a temperature of 38 °C or higher [2]. Your temperature is 39.4 °C or higher [1]. "
                    "A fever lasts more than three days [1].\n")
    said = sentences_of_answer(text)
    assert len(said) == 3 and all(backed_by(passages, sentence) for sentence in said)


def test_items_of_one_list_are_quoted_together_after_their_lead_in() -> None:
    from domainchat.grounding import Evidence, backed_by, sentences_of_answer

    passage = Passage(id="a:0:x", source="a.md", title="A", score=1.0, text=(
        "Sore throat > When to see a clinician\nContact a clinician if:\n- it lasts longer than a week;\n"
        "- you have a rash;\n- you have a weak immune system.\n"))
    chosen = select_evidence("When should I see a clinician for a sore throat?", [passage], count=2)
    assert all(e.lead_in == "Contact a clinician if" for e in chosen)
    text = opening([Evidence(2, "Gargling helps.", 1.0), *[Evidence(1, e.text, e.score, e.lead_in) for e in chosen]])
    assert text.startswith("Gargling helps [2]. Contact a clinician if: ")
    assert text.count("[1]") == 1 and text.endswith(" [1].\n"), "one list, one sentence, one citation"
    assert backed_by([passage], sentences_of_answer(text)[1]), "the lead-in and its items are the passage's words"
    later_first = [Evidence(1, "you have a rash;", 0.9, "Contact a clinician if", position=2),
                   Evidence(1, "it lasts longer than a week;", 0.8, "Contact a clinician if", position=1)]
    assert opening(later_first) == "Contact a clinician if: it lasts longer than a week; you have a rash [1].\n", (
        "items in the passage's order, whatever their scores")


def test_first_sentence_waits_for_a_whole_sentence() -> None:
    from domainchat.grounding import first_sentence

    assert first_sentence("The limit is", final=False) is None
    assert first_sentence("The limit is $7,000 [1].", final=False) is None  # another word may follow
    assert first_sentence(" The limit is $7,000 [1]. Then", final=False) == "The limit is $7,000 [1]."
    assert first_sentence("The limit is $7,000 a year\nNext", final=False) == ""  # a line without a full stop
    assert first_sentence("1. Open the app and tap Orders.\n2. Pick", final=False) == "Open the app and tap Orders."
    assert first_sentence("The limit is $7,000 [1].", final=True) == "The limit is $7,000 [1]."
    assert first_sentence("The limit applies to", final=True) == ""  # cut off by the token limit
    assert first_sentence("I hope this helps!", final=True) == "I hope this helps!"
    assert first_sentence("Okay. Then more", final=False) == ""  # too short to say anything


def test_a_sentence_is_backed_by_the_passage_it_cites_or_by_any_when_it_cites_none() -> None:
    from domainchat.grounding import backed_by

    passages = [Passage("a:0:x", "a.md", "a.md", 0.9, "Returns are accepted within 30 days of delivery."),
                Passage("b:0:x", "b.md", "b.md", 0.8, "Shipping is free on orders over $50.")]
    assert backed_by(passages, "Shipping is free on orders over $50 [2].")
    assert not backed_by(passages, "Shipping is free on orders over $50 [1].")  # cites the wrong passage
    assert not backed_by(passages, "Shipping is free on orders over $50 [3].")  # no such passage
    assert backed_by(passages, "Returns are accepted within 30 days.")
    assert not backed_by(passages, "Returns are accepted within 60 days.")  # a number no passage has
    assert not backed_by(passages, "Our friendly team loves helping customers every day.")


def test_cited_spans_are_the_passage_sentences_an_answer_drew_on() -> None:
    answer = ("A 12% restocking fee is deducted when a stove has been lit [1]. Orders of $75 ship free [2]. "
              "Stoves ship by drone [2].")
    assert cited_spans(answer, [RETURNS, SHIPPING]) == {
        1: ["A 12% restocking fee is deducted when a stove has been lit."],
        2: ["Standard shipping is free on orders of $75 or more, placed before 11 a.m. Mountain Time."]}
    assert cited_spans("No citation here.", [RETURNS]) == {}
    items = Passage(id="c:0:x", source="c.md", title="C", score=1.0, text=(
        "Contact a clinician if:\n- you have signs of strep;\n- it lasts longer than one week;\n- you have a rash."))
    assert cited_spans("Contact a clinician if: it lasts longer than one week; you have a rash [1].", [items]) == {
        1: ["it lasts longer than one week;", "you have a rash."]}, "every item quoted in the sentence"


def test_a_sentence_that_repeats_a_file_name_or_a_heading_path_repeats_layout() -> None:
    vesting = Passage(id="401k.md:3:a", source="401k.md", title="401(k)", score=0.8, text=(
        "401(k) Plans and the Employer Match > Vesting of employer contributions\nVesting can take six years."))
    assert repeats_layout("A 401(k) plan and the Employer Match > Vesting of employer contributions [1].", [vesting])
    assert repeats_layout("See the guide (401k.md) for details.", [vesting])
    assert not repeats_layout("Go to Settings > Security > Two-step verification.", [vesting, RETURNS])
    assert not repeats_layout("Vesting of employer contributions can take six years [1].", [vesting])


def test_the_model_can_read_the_passages_cut_down_to_the_quoted_evidence() -> None:
    evidence = select_evidence("Is there a restocking fee on a stove?", [SHIPPING, RETURNS], count=2)
    assert {e.number for e in evidence} == {2}
    cut = evidence_passages([SHIPPING, RETURNS], evidence)
    assert [p.title for p in cut] == ["Shipping", "Returns"], "every passage keeps its place, so its [n]"
    assert cut[0].text == "", "a passage none of whose sentences is quoted keeps no text"
    assert cut[1].text.splitlines() == [e.text for e in sorted(evidence, key=lambda e: e.position)]
    assert "Mountain" not in "".join(p.text for p in cut) and SHIPPING.text.endswith("$7.45."), "originals kept"
    items = [e for e in select_evidence("What does the restocking fee cover?", [RETURNS], count=3) if e.lead_in]
    assert evidence_passages([RETURNS], items)[0].text == "It covers:\n- Cleaning and a pressure test by a technician."


def test_the_served_start_says_what_the_model_reads_after_the_opening() -> None:
    question, passages = "Is there a restocking fee on a stove?", [SHIPPING, RETURNS]
    opened, titles = served_start(question, passages, None, 2, "titles")
    assert opened == opening(select_evidence(question, passages, count=2))
    assert [(p.id, p.title, p.text) for p in titles] == [(p.id, p.title, "") for p in passages], (
        "each passage keeps its [n] and title; the quoted evidence is read once, in the opening")
    assert served_start(question, passages, None, 2, "evidence")[1] == evidence_passages(
        passages, select_evidence(question, passages, count=2))
    assert served_start(question, passages, None, 2, "whole")[1] is passages
    assert served_start(question, passages, None, 0, "titles") == ("", passages), "no opening: whole passages"


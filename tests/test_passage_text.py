"""Passage text: list items with their lead-ins, quoted claims, and the amounts and ranges a text
states (text only, no model)."""

from __future__ import annotations

from domainchat.passage_text import amounts_in, holds_amount, passage_sentences


def test_list_items_carry_their_lead_in_and_quoted_claims_lose_theirs() -> None:
    heading, found = passage_sentences(
        'Food poisoning > When to see a doctor\nOur policy: "Refunds are issued within 3 days." You get an email.\n'
        "See a doctor if you have:\n- **Fever:** above 39 °C.\n- blood in the stool\n- thirst\n\n"
        'Our policy: "Cut light strips cannot be returned."')
    assert heading == "Food poisoning > When to see a doctor"
    assert found == [("Refunds are issued within 3 days.", ""), ("You get an email.", ""),
                     ("Fever: above 39 °C.", "See a doctor if you have"),
                     ("blood in the stool", "See a doctor if you have"),
                     ("Cut light strips cannot be returned.", "")]


def test_a_range_holds_an_amount_of_the_same_unit() -> None:
    price = {("$", 139.0)}
    assert holds_amount("Devices from $50 to $149.99: $19.99.", price)
    assert holds_amount("Plans for devices priced $50–$149.99 cost $19.99.", price)
    assert not holds_amount("Devices from $150 to $299.99: $34.99.", price)
    assert not holds_amount("Devices under $50: $7.99.", price)
    assert not holds_amount("Refunds take 100 to 150 days.", price), "139 days is not $139"
    age = {("", 52.0)}
    assert holds_amount("Workers 40 or older get 21 days to consider a release.", age)
    assert holds_amount("It protects workers aged 40 and over.", age)
    assert holds_amount("People between 18 and 64 should be screened.", age)
    assert not holds_amount("Anyone under 18 may cancel a contract.", age)
    assert not holds_amount("Call 1-555-014-2290 between 8 a.m. and 5 p.m.", age)
    assert holds_amount("A fee of at least 20% applies.", {("%", 25.0)})
    assert holds_amount("Processing takes 15–30 minutes.", {("minute", 20.0)})
    assert not holds_amount("The condition must last at least 12 months.", age), "a duration does not hold an age"
    assert not holds_amount("Devices from $50 to $149.99.", set())


def test_years_and_numbers_inside_names_are_not_amounts() -> None:
    assert amounts_in("How much can I put into my 401(k) in 2025?") == set()
    assert amounts_in("What is the 15-15 rule, and what does a 2/1/5 cap on a 15-year loan mean?") == set()
    assert amounts_in("I'm 52 and ordered 20 minutes ago: is $139 enough?") == {("", 52.0), ("minute", 20.0),
                                                                            ("$", 139.0)}

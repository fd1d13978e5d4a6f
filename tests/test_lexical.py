"""BM25 tests: the tokenizer and the index, on plain strings."""

from __future__ import annotations

from domainchat.lexical import LexicalIndex, bm25_tokens, content_words


def test_words_are_lowercase_words_and_whole_numbers_without_stopwords() -> None:
    assert content_words("What is the Roth IRA limit? It's $7,000 at 4.5%.") == [
        "roth", "ira", "limit", "it's", "7,000", "4.5"]
    assert content_words("Code KX-4471") == ["code", "kx", "4471"]
    assert content_words("the and of") == []


def test_tokens_are_the_words_stems_and_numbers_stay_whole() -> None:
    assert bm25_tokens("Backordered stoves; 12 fees of $7,000") == ["backord", "stove", "12", "fee", "7,000"]
    assert bm25_tokens("backorder stove") == ["backord", "stove"]


def test_a_question_finds_the_text_with_another_form_of_its_words() -> None:
    index = LexicalIndex(["backorder", "returns"], ["Backordered items ship when stock arrives.",
                                                    "Returned stoves are inspected."])
    assert index.top("My order is on backorder", 2) == ["backorder"]
    assert index.top("Can I return a stove?", 2) == ["returns"]


def test_the_text_with_the_questions_terms_ranks_first() -> None:
    index = LexicalIndex(["roth", "budget", "codes"], [
        "Roth IRA contributions are limited to $7,000.",
        "The 50/30/20 rule splits take-home pay.",
        "The thermostat shows KX-4471 when its C-wire is loose.",
    ])
    assert index.top("KX-4471", 3) == ["codes"]
    assert index.top("Roth IRA limit", 3) == ["roth"]
    assert index.top("weather tomorrow", 3) == [], "no shared term, no result"


def test_a_term_in_half_the_texts_still_counts() -> None:
    """Okapi's idf is 0 for a term in half of the texts; Lucene's, used here, stays positive."""
    index = LexicalIndex(["a", "b"], ["zorblax interest", "budget rule"])
    assert index.top("zorblax", 2) == ["a"]


def test_shorter_texts_win_ties_in_term_count_and_equal_scores_keep_stored_order() -> None:
    index = LexicalIndex(["long", "short", "same"], [
        "fee " + "padding words here " * 10, "fee schedule", "fee schedule"])
    assert index.top("fee", 3) == ["short", "same", "long"]
    assert index.top("fee", 1) == ["short"]


def test_an_empty_index_finds_nothing() -> None:
    assert LexicalIndex([], []).top("anything", 5) == []

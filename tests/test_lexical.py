"""BM25 tests: the tokenizer and the index, on plain strings."""

from __future__ import annotations

from domainchat.lexical import LexicalIndex, bm25_tokens


def test_tokens_are_lowercase_words_and_whole_numbers_without_stopwords() -> None:
    assert bm25_tokens("What is the Roth IRA limit? It's $7,000 at 4.5%.") == [
        "roth", "ira", "limit", "it's", "7,000", "4.5"]
    assert bm25_tokens("Code KX-4471") == ["code", "kx", "4471"]
    assert bm25_tokens("the and of") == []


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

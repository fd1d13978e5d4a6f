"""Lexical: BM25 ranking — the tokenizer (lowercase stemmed words and numbers, no stopwords) and an index
built once over ids and texts that returns the best ids for a question.

This module knows nothing about files, Chroma or embeddings.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence

import snowballstemmer

# A number keeps its inner separators ("4.5", "7,000") and a word its apostrophe: each is one token.
_TOKEN = re.compile(r"[a-z0-9]+(?:[.,'][a-z0-9]+)*")
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i if in is it its me my of on or should "
    "that the their them there they this to was what when where which who why will with you your".split()
)


_STEMMER = snowballstemmer.stemmer("english")
_STEMMER_LOCK = threading.Lock()  # a Snowball stemmer keeps its word in the instance while it works


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    with _STEMMER_LOCK:
        return _STEMMER.stemWord(word)


def content_words(text: str) -> list[str]:
    """Lowercase words and numbers, stopwords left out."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


def bm25_tokens(text: str) -> list[str]:
    """The content words reduced to their Snowball (Porter 2) stems: a question about a "backorder"
    finds the passage on "backordered" items. Retrieval only: stems took the share of key facts in
    the top 4 passages from 0.80-0.98 to 0.85-0.97 in the four domains and 0.80 -> 0.92 for the
    unseen company, but choosing sentences by stems instead of words lost 0.01-0.03 of key facts."""
    return [_stem(t) for t in content_words(text)]


class LexicalIndex:
    """BM25 over a fixed list of texts, with Lucene's always-positive idf,
    log(1 + (N - n + 0.5) / (n + 0.5)). Each term's contribution to every text that contains it
    is computed when the index is built, so a question costs one vector addition per term."""

    K1 = 1.5
    B = 0.75

    def __init__(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        import math
        from collections import Counter

        import numpy as np

        self.ids = list(ids)
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths: list[int] = []
        for index, text in enumerate(texts):
            counts = Counter(bm25_tokens(text))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                postings.setdefault(term, []).append((index, tf))
        length = np.asarray(lengths, dtype=np.float64)
        average = float(length.mean()) if lengths else 0.0
        n_docs = len(lengths)
        # Scores are computed here, once, not per question: at 10,000 chunks a Python loop over the
        # postings took about a third of a 30 ms search.
        self.weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # term -> (text indexes, scores)
        for term, entries in postings.items():
            indexes = np.fromiter((i for i, _ in entries), dtype=np.int64, count=len(entries))
            tf = np.fromiter((t for _, t in entries), dtype=np.float64, count=len(entries))
            # Not rank_bm25's Okapi idf: it drops to ~0 for a term in half the chunks, so in a small
            # knowledge base the very term a question is about could count for nothing.
            idf = math.log(1 + (n_docs - len(entries) + 0.5) / (len(entries) + 0.5))
            norm = tf + self.K1 * (1 - self.B + self.B * length[indexes] / (average or 1))
            self.weights[term] = (indexes, idf * tf * (self.K1 + 1) / norm)

    def top(self, question: str, n: int) -> list[str]:
        """Ids of the n best-scoring texts that share a term with the question (ties: stored order)."""
        import numpy as np

        scores = np.zeros(len(self.ids))
        for term in set(bm25_tokens(question)):
            if term in self.weights:
                indexes, weights = self.weights[term]
                scores[indexes] += weights
        matching = np.flatnonzero(scores > 0)
        best = matching[np.argsort(-scores[matching], kind="stable")[:n]]
        return [self.ids[i] for i in best]

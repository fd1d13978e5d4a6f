"""Knowledge: ingesting documents into a domain's store, and searching it for passages.

(The store and search arrive with the knowledge issue; for now this module defines `Passage`,
the unit that retrieval returns and answers cite.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Passage:
    id: str  # stable chunk id: "<source>:<chunk>:<hash>"
    source: str  # file name relative to the domain's knowledge folder
    title: str
    score: float  # 0..1, higher is more relevant
    text: str

    def to_json(self) -> dict:
        return asdict(self)

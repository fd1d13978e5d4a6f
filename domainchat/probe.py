"""Serving probe: start the app as `domainchat serve` would, answer one question, report the cost.

Run as `python -m domainchat.probe` (the bench does, in a separate process, so that what the bench
itself loads does not count). Prints one JSON line: the seconds the answer took, the process's peak
resident memory and each domain's chunk count. It knows nothing about the bench's other measures.
"""

from __future__ import annotations

import json
import resource
import time

from domainchat.chat import Assistant, drain
from domainchat.settings import load_settings


def main() -> None:
    assistant = Assistant.start(load_settings())
    try:
        started = time.perf_counter()
        domain = next(iter(assistant.registry.domains))
        drain(assistant.answer(domain, assistant.registry.get(domain).example_questions[0]))
        print(json.dumps({"answer_s": time.perf_counter() - started,
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          "chunks": {d: assistant.knowledge_count(d) for d in assistant.registry.domains}}))
    finally:
        assistant.close()


if __name__ == "__main__":
    main()

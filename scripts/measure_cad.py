"""Context-aware decoding (Shi et al. 2023), measured on the adapter writing the whole answer.

Each token is chosen from (1 + alpha) x the logits with the passages minus alpha x the logits of
the bare question, the two prompts being rows of one lean-decoder step; alpha 0 is the plain
`adapter+rag-ungrounded` answer through the same code. Answers are scored by the eval's own
measures (`evaluate.answer_metrics`). A measurement, not a served path (docs/eval: not kept):

    python scripts/measure_cad.py --limit 25 --alphas 0,0.5,1 --out cad.json

Needs the lean decoder (bitsandbytes' CPU layout or its standard one) and the knowledge base.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from domainchat import evaluate
from domainchat.chat import Assistant
from domainchat.sampling import Sampler
from domainchat.settings import load_settings

CONFIG = "adapter+rag-ungrounded"


def contrasted_answer(assistant: Assistant, domain, item: evaluate.EvalItem, alpha: float) -> tuple[str, list]:
    """(answer, passages) of one question; ("", []) when retrieval finds nothing (the app abstains)."""
    engine, decoder, params = assistant.engine, assistant.engine._decoder, evaluate.EVAL_PARAMS
    passages = assistant.retrieve(domain, item.question, item.history)
    if not passages:
        return "", []
    settings = replace(domain.grounding, **evaluate.CONFIGS[CONFIG][3])
    adapter = assistant.adapter_for(domain)[0]
    given = assistant.model_input(domain, item.question, item.history, passages, False, params, settings)
    bare = assistant.render(domain, item.question, item.history, None, False, params.max_new_tokens)
    with_passages, alone = engine.encode(given.messages)[0].tolist(), engine.encode(bare.messages)[0].tolist()
    caches = [decoder.new_cache(len(ids) + params.max_new_tokens + 8) for ids in (with_passages, alone)]
    sampler, generated, seen = Sampler(params), [], torch.tensor(with_passages)
    with torch.no_grad():
        rows = [decoder.prefill(with_passages, caches[0], adapter)]
        if alpha:
            rows.append(decoder.prefill(alone, caches[1], adapter))
        for _ in range(params.max_new_tokens):
            scores = rows[0][0] if not alpha else (1 + alpha) * rows[0][0] - alpha * rows[1][0]
            token = sampler.next_token(scores, seen, generated)
            if token in engine._stop_ids:
                break
            generated.append(token)
            seen = torch.cat([seen, torch.tensor([token])])
            logits = decoder.step([token] * len(rows), caches[:len(rows)], [adapter] * len(rows))
            rows = [logits[i:i + 1] for i in range(len(rows))]
    return engine.tokenizer.decode(generated, skip_special_tokens=True).strip(), given.passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=25, help="first N answerable questions per domain")
    parser.add_argument("--alphas", default="0,0.5,1", help="comma-separated contrast weights")
    parser.add_argument("--out", default="cad.json")
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    assistant = Assistant.start(load_settings())
    if assistant.engine._decoder is None:
        raise SystemExit("This engine has no lean decoder here; context-aware decoding is measured on it.")
    report: dict = {}
    try:
        for domain_id in assistant.registry.domains:
            domain = assistant.registry.get(domain_id)
            items = [i for i in evaluate.load_eval(domain) if i.answerable][:args.limit]
            for alpha in alphas:
                started, samples = time.perf_counter(), []
                for item in items:
                    answer, passages = contrasted_answer(assistant, domain, item, alpha)
                    history = [text for turn in item.history for text in turn]
                    if passages:
                        samples.append({"id": item.id, "question": item.question, "answer": answer,
                                        **evaluate.answer_metrics(answer, item, passages, history)})
                summary = evaluate.summary(samples)
                report.setdefault(domain_id, {})[str(alpha)] = {
                    **summary, "seconds": round(time.perf_counter() - started, 1), "samples": samples}
                print(domain_id, alpha, {k: summary.get(k) for k in (
                    "key_fact_recall", "unsupported_numbers_per_answer", "citation_precision", "words_mean")},
                    f"{time.perf_counter() - started:.0f} s", flush=True)
                with open(args.out, "w") as out:
                    json.dump(report, out, indent=1)
    finally:
        assistant.close()


if __name__ == "__main__":
    main()

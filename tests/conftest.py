"""Shared fixtures: a temporary DOMAINCHAT_HOME per session, the real bundled model converted once
into it, test adapters made with peft on that real model, the real MiniLM embedder and, for tests
about something else, a fake one.

A test that uses a fixture which loads the model, MiniLM, a Chroma server or a browser is marked
`slow` here (SLOW_FIXTURES), so that `python -m pytest -m "not slow"` stays a quick layer; a test
that loads one of them by itself carries `pytest.mark.slow` explicitly."""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import pytest
import torch

from domainchat.settings import PROJECT_ROOT, Settings, load_settings

SLOW_FIXTURES = {"base_checkpoint", "test_adapters", "engine", "domain_assistant", "api_url", "embeddings",
                 "minilm_store", "chroma_server", "browser"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own DOMAINCHAT_* variables (and SPACE_ID) do not reach any test."""
    for key in [k for k in os.environ if k.startswith("DOMAINCHAT_") or k == "SPACE_ID"]:
        monkeypatch.delenv(key)


class FakeEmbeddings:
    """Deterministic 384-dimensional vectors from hashed words, normalized: texts that share words
    are similar. For tests about storing or composing, not about search quality."""

    DIMENSIONS = 384

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.DIMENSIONS
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.DIMENSIONS] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._vector(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vector(text)


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("domainchat-home")


@pytest.fixture(scope="session")
def settings(home: Path) -> Settings:
    return load_settings({"DOMAINCHAT_HOME": str(home), "DOMAINCHAT_ADAPTERS_DIR": str(home / "no-adapters")})


@pytest.fixture(scope="session")
def base_checkpoint(settings: Settings) -> Path:
    from domainchat.base_model import resolve_base

    return Path(resolve_base(settings))


def make_adapter(checkpoint: Path, out: Path, seed: int, *, zero: bool = False, rank: int = 4) -> Path:
    """A LoRA adapter for the real base model, with non-zero B weights (a fresh LoRA changes nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    # A is initialised from the global generator: seeded here, so that an adapter is the same
    # whichever tests ran before (the exactness tests compare greedy replies that a near-tie of
    # another adapter's weights can part).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.zeros_like(param) if zero else torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(out)
    return out


# Chat templates of other model families, for a tiny tokenizer (tiny_chat_tokenizer): Zephyr's ends a
# turn with the eos token `</s>` and a newline; Llama 3's with `<|eot_id|>`, which is not its eos token.
ZEPHYR_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token"
                   " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{% endif %}")
TINY_TEMPLATES = {
    "zephyr": (ZEPHYR_TEMPLATE, "</s>", "</s>", []),  # (template, eos, end of turn, more special tokens)
    "llama3": (LLAMA3_TEMPLATE, "<|end_of_text|>", "<|eot_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}


def tiny_chat_tokenizer(family: str):
    """A byte-level BPE tokenizer of a few hundred tokens, trained here in milliseconds, with the chat
    template and special tokens of another model family (TINY_TEMPLATES): nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, eos, _, specials = TINY_TEMPLATES[family]
    bos = "<|begin_of_text|>" if family == "llama3" else "<s>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[bos, eos, *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ("What is a Roth IRA? Answer from the passages. The yearly limit is 7,000 dollars [1]. "
            "A savings account pays interest every month, and withdrawals are free twice a month.")
    tokenizer.train_from_iterator([text] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                   additional_special_tokens=[t for t in specials if t != eos], chat_template=template)


def tiny_chat_model(family: str, out: Path, *, first: str) -> Path:
    """A 2-layer Llama with random weights and tiny_chat_tokenizer(family), saved in `out`. Its
    layers add nothing and every position's logits are alike: greedy picks the token `first`
    (logit 8) over the end-of-turn token (logit 10, halved by a repetition penalty of 2, since
    the prompt holds it), and then, `first` being penalized too, the end-of-turn token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_chat_tokenizer(family)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    end_of_turn = tokenizer.convert_tokens_to_ids(TINY_TEMPLATES[family][2])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(first)] = 8.0 / config.hidden_size
        model.lm_head.weight[end_of_turn] = 10.0 / config.hidden_size
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def test_adapters(base_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """alpha and beta change the model; noop does not; corrupt is garbage; otherbase fits another model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    adapters = {
        "alpha": make_adapter(base_checkpoint, root / "alpha", seed=1),
        "beta": make_adapter(base_checkpoint, root / "beta", seed=2),
        "noop": make_adapter(base_checkpoint, root / "noop", seed=3, zero=True),
    }
    corrupt = make_adapter(base_checkpoint, root / "corrupt", seed=4)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    adapters["corrupt"] = corrupt
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    other = get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    other.save_pretrained(root / "otherbase")
    adapters["otherbase"] = root / "otherbase"
    return adapters


@pytest.fixture(scope="session")
def engine(settings: Settings, test_adapters: dict[str, Path]):
    """One real engine (nf4 base + all test adapters) shared by the tests that only read from it."""
    from domainchat.engine import Engine

    return Engine.start(settings, test_adapters)


@pytest.fixture(scope="session")
def domain_assistant(settings: Settings, test_adapters: dict[str, Path], embeddings):
    """The shipped domains and knowledge, served by a real engine whose 'finance' and 'legal'
    adapters are the test adapters alpha and beta (the other domains have none)."""
    from domainchat.chat import Assistant, sync_knowledge
    from domainchat.domains import load_registry
    from domainchat.engine import Engine
    from domainchat.knowledge import KnowledgeStore

    registry = load_registry(PROJECT_ROOT / "domains")
    store = KnowledgeStore.open(settings.home, None, embeddings)
    sync_knowledge(store, settings, registry)
    engine = Engine.start(settings, {"finance": test_adapters["alpha"], "legal": test_adapters["beta"]})
    return Assistant(settings, registry, engine, store)


def serve_in_thread(app) -> str:
    """Serve an ASGI app with uvicorn on a free port in a daemon thread; returns its /v1 URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="session")
def api_url(domain_assistant) -> str:
    """A live domainchat API (the OpenAI-compatible endpoints) over `domain_assistant`."""
    from fastapi import FastAPI

    from domainchat.api import mount_api

    return serve_in_thread(mount_api(FastAPI(), domain_assistant))


@pytest.fixture
def domains_dir() -> Path:
    return PROJECT_ROOT / "domains"


@pytest.fixture(scope="session")
def embeddings():
    """The real bundled all-MiniLM-L6-v2, loaded once for the whole session."""
    from domainchat.embeddings import SentenceEmbeddings

    return SentenceEmbeddings()


@pytest.fixture
def store(tmp_path: Path):
    """A fresh embedded Chroma store in a temporary home, with fake embeddings."""
    from domainchat.knowledge import KnowledgeStore

    return KnowledgeStore.open(tmp_path / "home", None, FakeEmbeddings())


@pytest.fixture
def minilm_store(tmp_path: Path, embeddings):
    """A fresh embedded Chroma store with the real MiniLM embedder: for tests about search."""
    from domainchat.knowledge import KnowledgeStore

    return KnowledgeStore.open(tmp_path / "home", None, embeddings)


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer holds `text` (written by hand: no PDF writer needed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process, seconds: float, log: Path | None = None) -> None:
    """Poll `url` until it answers; fail the test if `process` exits first or time runs out."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()[-3000:] if log else ''}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    process.kill()
    pytest.fail(f"{url} did not answer within {seconds:.0f} s")


@pytest.fixture(scope="module")
def standard_layout_engine(settings, test_adapters):
    """An engine whose nf4 weights stay in bitsandbytes' standard layout, as on a CPU without
    AVX512-BF16 (bitsandbytes repacks them into its tile layout only where that kernel runs): the
    lean decoder's float32 path, forced here so that every CI run checks it."""
    from domainchat.engine import Engine, standard_nf4_layout

    with standard_nf4_layout():
        engine = Engine.start(settings, test_adapters)
    if engine.device.type != "cpu":
        engine.close()
        pytest.skip(f"the lean decoder serves CPUs; on {engine.device.type} the transformers path serves")
    yield engine
    engine.close()

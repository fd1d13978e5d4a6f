"""Decoder: a lean forward pass for a Llama model held in 4 bits, with a LoRA adapter per sequence.

Owns: which layers are fused (q/k/v as one 4-bit matrix, gate/up as another, so a layer makes four
matrix calls instead of seven), every adapter's LoRA matrices stacked so that each row of a batch
can use its own adapter, per-sequence key/value caches, prefill (several sequences sharing each
matrix's product) and batched one-token decode steps. Where the CPU has AVX512-BF16, bitsandbytes
repacks nf4 weights into its CPU tile layout and the decoder uses its 4-bit kernel for decode steps
and bfloat16 copies for prefill (FusedLinear); elsewhere (AVX2) the weights stay in bitsandbytes'
standard layout and each product dequantizes its matrix to float32 first, as bitsandbytes does for
transformers there (DequantizedLinear). Those weight forms and bitsandbytes' kernels are
nf4_weights.py's; the logits' product is output_layer.py's.

Why it exists: transformers + peft spend most of a decode step in Python and in many small kernel
calls, and a batch of four rows costs little more than one row in the 4-bit kernel, so batching
sequences and fusing layers is where the speed is (docs/bench.md has the figures). A decode step's
layer loop is ~150 small ATen calls a layer; where a C++ compiler is, it runs from
csrc/lean_step.cpp, the same calls in the same order without the interpreter between them (layers of
a one-row step 14.0 -> 8.2 ms, four rows 24.3 -> 17.5 ms, measured side by side), and on the 4-bit
kernel with two threads it runs a batch's rows in two halves, one a thread (four rows 16.5 -> 11.6
ms); on the standard layout, half of each matrix's rows (decode 28.4 -> 36.7 tokens/s). Decode steps
do the same arithmetic as the transformers path (same kernels, same dtypes, same order; a test
checks greedy outputs match token for token when the prompt is prefilled with transformers' kernel
too). On AVX512-BF16 the default prefill uses bfloat16 matrix multiplies instead, as accurate
against float32 but not bit-equal, so a near-tie may resolve differently. On AVX2 bfloat16 has no
hardware support (a 700-token prefill took 10.8 s in bfloat16, measured), so both prefill and decode
multiply the dequantized float32 matrices: a single sequence gets the transformers path's products
exactly; rows of a batch go through the several-row kernel and agree to ~1e-6.

It knows nothing of chat, sampling or scheduling: the batcher gives it token ids, caches and
adapter names and gets logits back. It reads the weights of the model the engine loaded (peft +
bitsandbytes) and shares their storage. `LeanDecoder.build` returns None, with the reason logged,
for any model it does not understand (not Llama, not nf4 in bitsandbytes, a LoRA
variant such as DoRA), and the engine then uses transformers' forward.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from domainchat import nf4_weights
from domainchat.nf4_weights import BNB_CPU_BLOCK_N, DequantizedLinear, FusedLinear, Linear
from domainchat.output_layer import OutputLayer, Pick, intra_op_threads

log = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
CACHE_GROWTH = 128  # positions added to a full key/value cache (~6 MB for the 135M model)
# Row counts whose products are compared with one product of all of them (a decode row, short
# prompts, a chunk) before prefills of several sequences share a product.
ROW_PROBE = (1, 7, 40, 128)
NATIVE_STEP_SOURCE = Path(__file__).parent / "csrc" / "lean_step.cpp"


def _native_step_module():
    """The decode step's layer loop compiled from csrc/lean_step.cpp (once per machine: torch caches
    the build under TORCH_EXTENSIONS_DIR, ~40 s the first time), or None, with the reason logged, where
    it cannot be built (no C++ compiler, no ninja); the layers then run in Python, to the same bits."""
    path = os.environ.get("PATH")
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH; pip's may not be on it (a venv not activated)
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path or ""])
        return load("domainchat_lean_step", [str(NATIVE_STEP_SOURCE)], extra_cflags=["-O2"], verbose=False)
    except Exception as exc:  # any build failure leaves the Python loop in charge
        log.info("lean decoder's C++ layer loop unavailable (%s); its layers run in Python", exc)
        return None
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def _power_of_two(scale: float) -> bool:
    """Scaling by 0 or 2**n is exact, so it may be applied to the small rank-sized product before B
    instead of to the output after it (peft's order) without changing a bit (alpha = 2r, the usual
    choice, gives 2.0). Measured: the output-sized multiply was 1/8 of a 700-token prefill."""
    return scale == 0.0 or math.frexp(scale)[0] == 0.5


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


@dataclass
class LoraGroup:
    """One adapter's LoRA for one fused matrix: the layers' A matrices stacked ([R, K]: a decode
    step's single row takes one product for all of them, a prefill one per layer), each layer's B
    ([N_i, r_i], peft's own tensor; zeros for a layer the adapter does not target) and scaling.
    B stays per layer, in peft's [out, rank] layout, and is scaled after the product, as peft does:
    a block-diagonal B, or B stored transposed, rounds differently from peft and greedy outputs drift."""

    a: torch.Tensor
    b: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]

    @property
    def prescale(self) -> bool:
        return all(_power_of_two(scale) for scale in self.scales)

    @property
    def ranks(self) -> list[int]:
        return [int(b.shape[1]) for b in self.b]


@dataclass
class KVCache:
    """Keys and values of one sequence: [layers, kv_heads, capacity, head_dim] each."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def grow(self, positions: int) -> None:
        """Make room for `positions` more (a reply's length is unknown until it stops, so a cache
        starts at the prompt's size and grows instead of reserving room for the longest reply)."""
        layers, heads, _, dim = self.keys.shape
        for name in ("keys", "values"):
            bigger = torch.empty(layers, heads, self.capacity + positions, dim)
            bigger[:, :, :self.length] = getattr(self, name)[:, :, :self.length]
            setattr(self, name, bigger)


@dataclass
class PrefillPart:
    """One sequence's share of a prefill: `ids` to run after what `cache` holds, through `adapter`;
    with `logits`, the last position's come back (only those `pick` names, if given)."""

    ids: Sequence[int]
    cache: KVCache
    adapter: str | None
    pick: Pick | None = None
    logits: bool = True


class LeanDecoder:
    """Fused forward passes over a loaded 4-bit Llama; see the module docstring."""
    # On AVX2 a step of the 135M model dequantizes 106M weights (13.5 ms on one thread in
    # bitsandbytes' kernel, 9.7 in the C++ loop's own AVX2 one, 6.0 in its AVX-512 one) and
    # multiplies them from cache (~8-10 ms). OpenMP's second
    # thread gained nothing in the batcher's thread (25.3 vs 26.3 tokens/s: waking it 240 times a
    # step costs what the second core saves); the C++ loop's own helper thread, which spins between
    # a step's products, takes half of each matrix's rows (decode 28.4 -> 36.7 tokens/s, measured).
    # Pieces small enough to stay in L2 saved nothing (21.0 vs 21.6 ms for the 120 products).

    def __init__(self, model, layers: list[LayerWeights], loras: dict[str, list[dict[str, LoraGroup]]]) -> None:
        # "dense": prompts go through bfloat16 matrix multiplies (2.5x faster at 700 tokens and as
        # close to float32 as bitsandbytes' kernel: KL 2-6e-4 nats for both, measured); "gemv":
        # the kernel transformers uses, for outputs identical to transformers' token for token.
        self.prefill_kernel = "dense"
        self._composition: tuple[tuple, list] | None = None  # the last batch's adapters and LoRA stacks
        self._row_independent: dict[str, bool] = {}  # per prefill kernel: see _products_row_independent
        # Prefill's large products use all intra-op threads; the layers of a decode step use one:
        # they are hundreds of calls of tens of microseconds, where waking a second OpenMP thread
        # costs more than it saves (2 cores, measured in a worker thread: 22.8 tokens/s on one
        # thread, 16.7 on two). The C++ loop instead runs half of a batch's rows on a second thread
        # (one OpenMP thread each). The output layer chooses its own (OutputLayer).
        self.threads = torch.get_num_threads()
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = inner.config
        self.layers = layers
        self.loras = loras
        self.embed = inner.model.embed_tokens.weight
        self.final_norm = inner.model.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.lm_head = inner.lm_head.weight
        self.layout = "nf4 kernel" if isinstance(layers[0].qkv, FusedLinear) else "nf4 dequantized"
        self.output = OutputLayer(self.lm_head, self.threads, transposed=True)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.scaling = inner.model.layers[0].self_attn.scaling
        self.context_window = int(config.max_position_embeddings)
        positions = torch.arange(self.context_window).unsqueeze(0)
        with torch.no_grad():
            cos, sin = inner.model.rotary_emb(self.embed[:1].unsqueeze(0), positions)
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim]
        # The layer loop of decode steps in C++ (csrc/lean_step.cpp): the same ATen calls without the
        # interpreter between them, calling bitsandbytes' 4-bit kernel itself, or elsewhere its
        # dequantize kernel. None: the Python loop (_step_layers_python), which gives the same bits.
        self.native = None
        self._native_stacks: list | None = None  # the stacks last handed to `native`
        kernel = nf4_weights.GEMV_KERNEL is not None if self.layout == "nf4 kernel" else layers[0].qkv.native
        if kernel:
            module = _native_step_module()
            if module is not None:
                self.native = self._native_stepper(module)

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def build(cls, model) -> LeanDecoder | None:
        """The decoder over `model`'s weights, or None (reason logged) when the model is not a
        4-bit Llama in bitsandbytes' CPU layout. Call after the model's first forward pass."""
        problem = cls._unsupported(model)
        if problem:
            log.info("lean decoder off: %s; using transformers' forward", problem)
            return None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        fuse = FusedLinear.of if _cpu_layout(inner) else DequantizedLinear.of
        layers = []
        for block in inner.model.layers:
            attention, mlp = block.self_attn, block.mlp
            base = {name: _base_layer(getattr(attention, name)) for name in (*ATTENTION, "o_proj")}
            base.update({name: _base_layer(getattr(mlp, name)) for name in (*MLP_IN, "down_proj")})
            layers.append(LayerWeights(
                block.input_layernorm.weight, block.post_attention_layernorm.weight,
                fuse([base[n] for n in ATTENTION]), fuse([base["o_proj"]]),
                fuse([base[n] for n in MLP_IN]), fuse([base["down_proj"]]),
            ))
        loras: dict[str, list[dict[str, LoraGroup]]] = {}
        for name in _adapter_names(model):
            loras[name] = [_lora_groups(block, name) for block in inner.model.layers]
        _pad_ranks(loras)
        return cls(model, layers, loras)

    @staticmethod
    def _unsupported(model) -> str | None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if type(inner).__name__ != "LlamaForCausalLM":
            return f"the model is a {type(inner).__name__}, not a LlamaForCausalLM"
        if next(inner.parameters()).device.type != "cpu":
            return "the model is not on the CPU"
        rope_scaling = getattr(inner.config, "rope_scaling", None)
        if rope_scaling and rope_scaling.get("rope_type", "default") != "default":
            return "the model uses scaled rotary embeddings"
        if not isinstance(inner.lm_head, torch.nn.Linear) or inner.lm_head.weight.dtype != torch.float32:
            return "the output layer is not a float32 Linear"
        cpu_layout = _cpu_layout(inner)
        for block in inner.model.layers:
            for parent, names in ((block.self_attn, (*ATTENTION, "o_proj")), (block.mlp, (*MLP_IN, "down_proj"))):
                for name in names:
                    layer = _base_layer(getattr(parent, name))
                    state = getattr(getattr(layer, "weight", None), "quant_state", None)
                    if state is None or getattr(state, "quant_type", None) != "nf4":
                        return f"{name} is not a bitsandbytes nf4 layer"
                    if bool(getattr(state, "packing_format_for_cpu", False)) != cpu_layout:
                        return "its layers mix bitsandbytes' CPU and standard layouts"
                    if getattr(layer, "bias", None) is not None:
                        return f"{name} has a bias"
                    if cpu_layout and int(state.shape[0]) % BNB_CPU_BLOCK_N:
                        return f"{name} has {state.shape[0]} outputs, not a multiple of {BNB_CPU_BLOCK_N}"
                    if not cpu_layout and int(state.shape[0]) * int(state.shape[1]) % state.blocksize:
                        # fused matrices join the layers' bytes and block scales end to end
                        return f"{name} is not a whole number of nf4 blocks of {state.blocksize}"
                    adapted = getattr(parent, name)
                    if any(getattr(adapted, "use_dora", {}).values()) or getattr(adapted, "lora_variant", None):
                        return f"{name} uses a LoRA variant (such as DoRA)"
        return None

    # -- caches -------------------------------------------------------------------------------

    def new_cache(self, capacity: int, prefix: KVCache | None = None) -> KVCache:
        shape = (len(self.layers), self.kv_heads, capacity, self.head_dim)
        cache = KVCache(torch.empty(shape), torch.empty(shape))
        if prefix is not None:
            cache.keys[:, :, :prefix.length] = prefix.keys[:, :, :prefix.length]
            cache.values[:, :, :prefix.length] = prefix.values[:, :, :prefix.length]
            cache.length = prefix.length
        return cache

    # -- forward ------------------------------------------------------------------------------

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @staticmethod
    def _add_lora_rows(out: torch.Tensor, x: torch.Tensor, stack: tuple | None) -> torch.Tensor:
        """Add each row's LoRA delta to `out` [rows, N] (a fresh product), from per-row stacked
        matrices: batched matmuls round, per row, exactly as peft's single-row products do."""
        if stack is None:
            return out
        a, bs, scales, prescale = stack
        h = torch.bmm(x.unsqueeze(1), a.transpose(1, 2))
        rank_start = column = 0
        for b, scale in zip(bs, scales, strict=True):
            rank, width = b.shape[2], b.shape[1]
            part = h[:, :, rank_start:rank_start + rank]
            if prescale:
                delta = torch.bmm(part * scale, b.transpose(1, 2))
            else:
                delta = torch.bmm(part, b.transpose(1, 2)) * scale
            out[:, column:column + width].add_(delta.squeeze(1))
            rank_start, column = rank_start + rank, column + width
        return out

    @staticmethod
    def _add_lora_one(out: torch.Tensor, x: torch.Tensor, group: LoraGroup | None) -> torch.Tensor:
        """Add one sequence's LoRA delta to `out` [positions, N] (prefill). Each layer's A is
        multiplied on its own, as peft does: with several positions, one product with the stacked
        A rounds differently on AVX512 (the BLAS blocks a 12-column product unlike a 4-column one,
        ~5e-7 apart, measured), and greedy outputs then drift from the transformers path."""
        if group is None:
            return out
        rank_start = column = 0
        prescale = group.prescale
        for b, scale in zip(group.b, group.scales, strict=True):
            rank, width = b.shape[1], b.shape[0]
            if scale:  # a layer the adapter does not target has zero A and B
                part = x @ group.a[rank_start:rank_start + rank].t()
                delta = (part * scale) @ b.t() if prescale else (part @ b.t()) * scale
                out[:, column:column + width].add_(delta)
            rank_start, column = rank_start + rank, column + width
        return out

    def _stacks(self, adapters: tuple[str | None, ...]) -> list[dict[str, tuple | None]]:
        """Per layer and group, the rows' LoRA matrices stacked along a batch dimension (zeros for a
        row without an adapter) with each row's scaling; kept while the same adapters run in the same
        rows. A single row uses the adapter's own tensors (no copy)."""
        if self._composition is not None and self._composition[0] == adapters:
            return self._composition[1]
        layers = []
        for index in range(len(self.layers)):
            stacks: dict[str, tuple | None] = {}
            for key in ("qkv", "o", "gate_up", "down"):
                groups = [self.loras[name][index].get(key) if name is not None else None for name in adapters]
                like = next((g for g in groups if g is not None), None)
                if like is None:
                    stacks[key] = None
                elif len(groups) == 1:
                    stacks[key] = (like.a.unsqueeze(0), tuple(b.unsqueeze(0) for b in like.b), like.scales,
                                   like.prescale)
                else:
                    a = torch.stack([g.a if g is not None else torch.zeros_like(like.a) for g in groups])
                    bs = tuple(torch.stack([g.b[i] if g is not None else torch.zeros_like(like.b[i]) for g in groups])
                               for i in range(len(like.b)))
                    scales = tuple(torch.tensor([g.scales[i] if g is not None else 0.0 for g in groups]).view(-1, 1, 1)
                                   for i in range(len(like.b)))
                    prescale = all(g.prescale for g in groups if g is not None)
                    stacks[key] = (a, bs, scales, prescale)
            layers.append(stacks)
        self._composition = (adapters, layers)
        return layers

    def forget_batch(self) -> None:
        """Drop the stacked LoRA matrices of the last batch (call when no sequence is running)."""
        self._composition = None

    def supports(self, adapter: str | None) -> bool:
        return adapter is None or adapter in self.loras

    def _prefill_linear(self, x: torch.Tensor, fused: Linear, rows: Sequence[slice], groups: Sequence[dict],
                        key: str) -> torch.Tensor:
        """`fused`'s product of the stacked positions `x`, plus each sequence's LoRA on its rows."""
        with intra_op_threads(self.threads):
            out = fused.dense(x) if self.prefill_kernel == "dense" else fused.gemv(x)
        for span, group in zip(rows, groups, strict=True):
            self._add_lora_one(out[span], x[span], group.get(key))
        return out

    def prefill(self, ids: Sequence[int], cache: KVCache, adapter: str | None, pick: Pick | None = None,
                logits: bool = True) -> torch.Tensor | None:
        """Run `ids` after what `cache` holds (one sequence); return the last position's logits [1, V]
        (with `pick`, only those of the tokens it names, as in `step`), or None without `logits`
        (a chunk before a prompt's last, a cached prefix)."""
        return self.prefill_many([PrefillPart(ids, cache, adapter, pick, logits)])[0]

    def prefill_many(self, parts: Sequence[PrefillPart]) -> list[torch.Tensor | None]:
        """Prefill several sequences at once, each as `prefill` would alone; their logits in order.

        The sequences' positions are the rows of one product per matrix (the weights are read and
        dequantized once for all: the key/values of four 39-token prompts in 287 ms one by one, 195
        together, measured); LoRA, attention and the logits stay per sequence. Where each row of
        the prefill kernel's product depends on its own input row alone (checked once, see
        _products_row_independent), a sequence gets the bits it would get alone; elsewhere the
        sequences are prefilled one by one."""
        if len(parts) > 1 and not self._products_row_independent():
            return [logits for part in parts for logits in self.prefill_many([part])]
        # Only the layers' products and attention use all intra-op threads; the element-wise work
        # between them runs on one. In a thread other than the one that loaded the model (the
        # batcher's), OpenMP counts more threads than cores and stops spinning between parallel
        # regions, so each short element-wise region waits on a wake-up (an add over 128 x 576:
        # 5 us in the main thread, 20-60 us in another; 8 us there on one thread, measured).
        with intra_op_threads(1):
            hidden = self._prefill(parts)
        # One row at a time: a several-row product rounds unlike the one-row one (OutputLayer).
        return [self.output(hidden[i:i + 1], [part.pick] if part.pick is not None else None) if part.logits else None
                for i, part in enumerate(parts)]

    def _products_row_independent(self) -> bool:
        """Whether each row of the prefill kernel's product depends on its own input row alone on
        this CPU, so that sequences may share a product and keep their bits. bitsandbytes' kernel and
        oneDNN's bfloat16 product do; MKL's float32 one (the standard layout) sums a many-row
        product's rows in another order than a few-row one's. Checked once per kernel, on random rows."""
        kernel = self.prefill_kernel
        if kernel not in self._row_independent:
            linear = self.layers[0].qkv
            x = torch.randn(sum(ROW_PROBE), linear.shape[1], generator=torch.Generator().manual_seed(0))
            with torch.inference_mode(), intra_op_threads(self.threads):
                product = linear.dense if kernel == "dense" else linear.gemv
                whole = product(x).clone()  # the standard layout's products share a buffer
                pieces = torch.cat([product(piece).clone() for piece in x.split(ROW_PROBE)])
            self._row_independent[kernel] = torch.equal(whole, pieces)
            log.info("prefill shares products among sequences with the %s kernel: %s", kernel,
                     self._row_independent[kernel])
        return self._row_independent[kernel]

    def _prefill(self, parts: Sequence[PrefillPart]) -> torch.Tensor:
        """The final hidden state [len(parts), H] of each part's last position, its key/values added
        to its cache."""
        rows, row = [], 0  # each part's rows of the stacked positions
        for part in parts:
            if part.cache.length + len(part.ids) > part.cache.capacity:
                raise ValueError(f"{part.cache.length + len(part.ids)} positions exceed the cache's "
                                 f"{part.cache.capacity}")
            rows.append(slice(row, row + len(part.ids)))
            row += len(part.ids)
        h = self.embed[torch.tensor([token for part in parts for token in part.ids])]
        cos = torch.cat([self.cos[p.cache.length:p.cache.length + len(p.ids)] for p in parts]).unsqueeze(0)
        sin = torch.cat([self.sin[p.cache.length:p.cache.length + len(p.ids)] for p in parts]).unsqueeze(0)
        loras = [self.loras.get(p.adapter) if p.adapter is not None else None for p in parts]
        attention = [self._attention_shape(p.cache.length, len(p.ids)) for p in parts]
        total = row
        for index, layer in enumerate(self.layers):
            groups = [lora[index] if lora else {} for lora in loras]
            x = self._norm(h, layer.input_norm)
            q, k, v = self._prefill_linear(x, layer.qkv, rows, groups, "qkv").split(layer.qkv.splits, dim=-1)
            q = self._rotate(q.view(total, self.heads, self.head_dim).transpose(0, 1), cos, sin)
            k = self._rotate(k.view(total, self.kv_heads, self.head_dim).transpose(0, 1), cos, sin)
            v = v.view(total, self.kv_heads, self.head_dim).transpose(0, 1)
            attended = torch.cat([self._attend(index, part.cache, q[:, span], k[:, span], v[:, span], *shape)
                                  for part, span, shape in zip(parts, rows, attention, strict=True)])
            h.add_(self._prefill_linear(attended, layer.o, rows, groups, "o"))
            x = self._norm(h, layer.post_norm)
            gate, up = self._prefill_linear(x, layer.gate_up, rows, groups, "gate_up").split(layer.gate_up.splits, -1)
            h.add_(self._prefill_linear(torch.nn.functional.silu(gate) * up, layer.down, rows, groups, "down"))
        for part in parts:
            part.cache.length += len(part.ids)
        return self._norm(h[[span.stop - 1 for span in rows]], self.final_norm)

    def _attention_shape(self, start: int, m: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(zero queries to precede the new ones, mask) for `m` positions after `start` cached ones."""
        # After a cached prefix, query i must see every cached position and the new ones up to
        # itself. For a prompt after a short prefix, a mask is dearer (SDPA's CPU kernel computes
        # the whole rectangle: 7.8 ms a layer at 700 after 100 tokens, measured) than preceding the
        # queries by `start` zero queries so that the causal kernel (4.7 ms) applies, their outputs
        # dropped. For a chunk after a long start (chunked prefill) the padding would cost a whole
        # prompt's attention per chunk, and the mask's rectangle, chunk x positions, is the cheaper.
        padding = torch.zeros(self.heads, start, self.head_dim) if 0 < start <= m else None
        mask = (torch.arange(start + m) <= torch.arange(start, start + m).unsqueeze(1)) if start > m else None
        return padding, mask

    def _attend(self, index: int, cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                padding: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """One sequence's attention in layer `index` for its new positions' rotated q, k and v
        ([heads, m, head_dim]), their keys and values stored in `cache`; [m, heads * head_dim]."""
        start, m = cache.length, q.shape[1]
        cache.keys[index, :, start:start + m] = k
        cache.values[index, :, start:start + m] = v
        queries = q if padding is None else torch.cat([padding, q], dim=1)
        with intra_op_threads(self.threads):
            attended = torch.nn.functional.scaled_dot_product_attention(
                queries.unsqueeze(0), cache.keys[index, :, :start + m].unsqueeze(0),
                cache.values[index, :, :start + m].unsqueeze(0), attn_mask=mask, is_causal=mask is None,
                scale=self.scaling, enable_gqa=True,
            )
        return attended[0, :, -m:].transpose(0, 1).reshape(m, -1)

    def step(self, tokens: Sequence[int], caches: Sequence[KVCache], adapters: Sequence[str | None],
             pick: Sequence[Pick | None] | None = None) -> torch.Tensor:
        """One new token for each of several sequences at once; returns logits [rows, V] (with
        `pick`, only those of the tokens each row may choose: see OutputLayer)."""
        with intra_op_threads(1):
            hidden = self._step_layers(tokens, caches, adapters)
        return self.output(hidden, pick)

    def _native_stepper(self, module):
        fused = [linear for layer in self.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        address = lambda function: ctypes.cast(function, ctypes.c_void_p).value  # noqa: E731
        if isinstance(fused[0], DequantizedLinear):
            weights, gemv, dequantize = [f.plain for f in fused], 0, address(nf4_weights.DEQUANTIZE_KERNEL)
        else:
            weights, gemv, dequantize = [f.packed for f in fused], address(nf4_weights.GEMV_KERNEL), 0
        return module.LeanStep(
            self.embed, self.final_norm, [layer.input_norm for layer in self.layers],
            [layer.post_norm for layer in self.layers], weights, [f.absmax for f in fused],
            [list(f.shape) for f in fused], [list(f.splits) for f in fused], fused[0].blocksize, gemv, dequantize,
            fused[0].code, self.heads, self.kv_heads, self.head_dim, float(self.scaling), self.eps, self.cos, self.sin)

    def _hand_stacks(self, stacks: list[dict[str, tuple | None]]) -> None:
        """Give the C++ loop the rows' LoRA stacks when they changed (scalings as tensors: a float32
        product by a one-element tensor has the bits of the product by the same float)."""
        if self._native_stacks is stacks:
            return
        a, b, scales, prescale = [], [], [], []
        for layer in stacks:
            for key in ("qkv", "o", "gate_up", "down"):
                stack = layer[key]
                a.append(stack[0] if stack is not None else None)
                b.append(list(stack[1]) if stack is not None else [])
                scales.append([torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1, 1) for scale in stack[2]]
                              if stack is not None else [])
                prescale.append(bool(stack[3]) if stack is not None else False)
        self.native.set_stacks(a, b, scales, prescale)
        self._native_stacks = stacks

    def _step_layers(self, tokens: Sequence[int], caches: Sequence[KVCache], adapters: Sequence[str | None]):
        for cache in caches:
            if cache.length >= cache.capacity:
                cache.grow(CACHE_GROWTH)
        stacks = self._stacks(tuple(adapters))
        if self.native is None:
            return self._step_layers_python(tokens, caches, stacks)
        self._hand_stacks(stacks)
        lengths = [cache.length for cache in caches]
        # A second thread: half of a batch's rows on the 4-bit kernel (a row's products there do not
        # depend on the others in its call; float32 products of several rows do), half of each
        # matrix's rows on the standard layout.
        split = self.threads > 1
        hidden = self.native.step(torch.tensor(list(tokens)), torch.tensor(lengths), [c.keys for c in caches],
                                  [c.values for c in caches], lengths, split)
        for cache in caches:
            cache.length += 1
        return hidden

    def _step_layers_python(self, tokens: Sequence[int], caches: Sequence[KVCache], stacks: list[dict]):
        rows = len(tokens)
        positions = torch.tensor([cache.length for cache in caches])
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [rows, 1, head_dim]
        h = self.embed[torch.tensor(list(tokens))]
        for index, layer in enumerate(self.layers):
            lora = stacks[index]
            x = self._norm(h, layer.input_norm)
            q, k, v = self._add_lora_rows(layer.qkv.gemv(x), x, lora["qkv"]).split(layer.qkv.splits, -1)
            q = self._rotate(q.view(rows, self.heads, self.head_dim), cos, sin)
            k = self._rotate(k.view(rows, self.kv_heads, self.head_dim), cos, sin)
            v = v.view(rows, self.kv_heads, self.head_dim)
            attended = []
            for row, cache in enumerate(caches):
                end = cache.length + 1
                cache.keys[index, :, cache.length] = k[row]
                cache.values[index, :, cache.length] = v[row]
                attended.append(torch.nn.functional.scaled_dot_product_attention(
                    q[row].unsqueeze(0).unsqueeze(2), cache.keys[index, :, :end].unsqueeze(0),
                    cache.values[index, :, :end].unsqueeze(0), scale=self.scaling, enable_gqa=True,
                ).reshape(1, -1))
            attended = torch.cat(attended)
            h.add_(self._add_lora_rows(layer.o.gemv(attended), attended, lora["o"]))
            x = self._norm(h, layer.post_norm)
            gate, up = self._add_lora_rows(layer.gate_up.gemv(x), x, lora["gate_up"]).split(
                layer.gate_up.splits, -1)
            act = torch.nn.functional.silu(gate) * up
            h.add_(self._add_lora_rows(layer.down.gemv(act), act, lora["down"]))
        for cache in caches:
            cache.length += 1
        return self._norm(h, self.final_norm)


# --------------------------------------------------------------------------- helpers


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)


def _cpu_layout(inner) -> bool:
    """Whether bitsandbytes repacked the 4-bit weights into its AVX512-BF16 tile layout (it does at
    the first forward pass on a CPU that has the instructions); if not, they are in its standard
    layout and the decoder dequantizes them for each product."""
    state = getattr(_base_layer(inner.model.layers[0].self_attn.q_proj).weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _adapter_names(model) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def _lora_groups(block, adapter: str) -> dict[str, LoraGroup]:
    """The adapter's LoRA for one decoder block, one group per fused matrix."""
    spec = {"qkv": (block.self_attn, ATTENTION), "o": (block.self_attn, ("o_proj",)),
            "gate_up": (block.mlp, MLP_IN), "down": (block.mlp, ("down_proj",))}
    groups: dict[str, LoraGroup] = {}
    for group, (parent, names) in spec.items():
        layers = [getattr(parent, name) for name in names]
        targeted = [adapter in getattr(layer, "lora_A", {}) for layer in layers]
        if not any(targeted):
            continue
        rank = next(layer.lora_A[adapter].weight.shape[0] for layer, hit in zip(layers, targeted, strict=True) if hit)
        a_parts, b_parts, scales = [], [], []
        for layer, hit in zip(layers, targeted, strict=True):
            state = _base_layer(layer).weight.quant_state
            if hit:
                a_parts.append(layer.lora_A[adapter].weight.detach())
                b_parts.append(layer.lora_B[adapter].weight.detach())
                scales.append(float(layer.scaling[adapter]))
            else:
                a_parts.append(torch.zeros(rank, int(state.shape[1])))
                b_parts.append(torch.zeros(int(state.shape[0]), rank))
                scales.append(0.0)
        a = torch.cat(a_parts) if len(a_parts) > 1 else a_parts[0]
        groups[group] = LoraGroup(a.contiguous(), tuple(b.contiguous() for b in b_parts), tuple(scales))
    return groups


def _pad_ranks(loras: dict[str, list[dict[str, LoraGroup]]]) -> None:
    """Give every adapter's layers the same rank (zero rows of A, zero columns of B), so the rows of a
    batch can be stacked. Adapters of one rank (the usual case) are left exactly as they are."""
    widest: dict[tuple[str, int], int] = {}
    for blocks in loras.values():
        for groups in blocks:
            for key, group in groups.items():
                for i, rank in enumerate(group.ranks):
                    widest[key, i] = max(widest.get((key, i), 0), rank)
    for blocks in loras.values():
        for groups in blocks:
            for key, group in groups.items():
                if all(rank == widest[key, i] for i, rank in enumerate(group.ranks)):
                    continue
                a_parts, b_parts, start = [], [], 0
                for i, (b, rank) in enumerate(zip(group.b, group.ranks, strict=True)):
                    extra = widest[key, i] - rank
                    a_parts.append(torch.cat([group.a[start:start + rank], group.a.new_zeros(extra, group.a.shape[1])]))
                    b_parts.append(torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1).contiguous())
                    start += rank
                groups[key] = LoraGroup(torch.cat(a_parts).contiguous(), tuple(b_parts), group.scales)

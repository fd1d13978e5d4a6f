"""nf4 weights as the lean decoder multiplies them: several bitsandbytes 4-bit layers fused into one
matrix, in either of bitsandbytes' CPU layouts, and bitsandbytes' own CPU kernels called directly.

Owns: `FusedLinear` (the CPU tile layout bitsandbytes repacks to where the CPU has AVX512-BF16:
its 4-bit kernel for decode, bfloat16 copies for prefill), `DequantizedLinear` (the standard layout
elsewhere: each matrix dequantized to float32 when multiplied, as bitsandbytes does for
transformers there), the lookup of bitsandbytes' kernels, and the layouts' conversions. Both forms
share the model's storage: the model's layers are re-pointed at views of the fused bytes.

It knows nothing of layers, adapters, caches or threads: decoder.py builds these per layer and
hands their bytes to the C++ loop (csrc/lean_step.cpp), which calls the same kernels.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BNB_CPU_BLOCK_N = 32  # rows per tile in bitsandbytes' CPU packing; fused matrices must keep it


def _bitsandbytes_kernel(name: str):
    """A kernel of bitsandbytes' CPU library, called directly, or None when this build does not
    export it (the torch op is used then)."""
    try:
        from bitsandbytes.functional import lib

        return getattr(lib, name)
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None


# The nf4 x bfloat16 kernel: its op's wrapper cost ~45 us per call, a third of a 3072x576 product,
# 120 times per token.
GEMV_KERNEL = _bitsandbytes_kernel("gemv_4bit_inference_cpu_nf4_bf16")
# The nf4 -> float32 dequantize kernel, what its op calls on the standard layout.
DEQUANTIZE_KERNEL = _bitsandbytes_kernel("cdequantize_blockwise_cpu_nf4_fp32")
_BUFFERS = threading.local()  # DequantizedLinear.weight's float32 matrix, one per thread

def unpack_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes' CPU tile layout [N, K/2] back to its standard layout (two nibbles per byte, row
    by row, high nibble first), which its dequantize kernel reads. Mirrors
    `bitsandbytes.functional._convert_weight_packed_for_cpu_inverse` without touching the layer."""
    tiles = packed.reshape(-1, BNB_CPU_BLOCK_N)
    nibbles = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)
    rows = nibbles.reshape(n // BNB_CPU_BLOCK_N, k // 2, BNB_CPU_BLOCK_N, 2).transpose(1, 2).reshape(n, k)
    flat = rows.reshape(-1)
    return ((flat[::2] << 4) | flat[1::2]).contiguous()



@dataclass
class FusedLinear:
    """Several 4-bit linear layers that read the same input, multiplied as one matrix."""

    packed: torch.Tensor  # [N, K/2] uint8, bitsandbytes' CPU layout (the gemv kernel's input)
    absmax: torch.Tensor  # [K/blocksize, N] bfloat16, as the gemv kernel wants it
    plain: torch.Tensor  # [N*K/2] uint8, standard layout (the dequantize kernel's input)
    plain_absmax: torch.Tensor  # [N*K/blocksize] float32
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]  # (N, K)
    splits: tuple[int, ...]  # output width of each fused layer, in order

    @classmethod
    def of(cls, layers: Sequence[torch.nn.Module]) -> FusedLinear:
        states = [layer.weight.quant_state for layer in layers]
        k = states[0].shape[1]
        splits = tuple(int(s.shape[0]) for s in states)
        packed = torch.cat([layer.weight.data for layer in layers]) if len(layers) > 1 else layers[0].weight.data
        n = sum(splits)
        absmax = torch.cat([s.absmax for s in states], dim=1).contiguous()
        plain_absmax = absmax.float().t().contiguous().reshape(-1)
        if len(layers) > 1:  # let the model's layers share the fused storage instead of keeping a copy
            offset = 0
            for layer, width in zip(layers, splits, strict=True):
                layer.weight.data = packed[offset:offset + width]
                offset += width
        return cls(packed, absmax, unpack_cpu_layout(packed, n, k), plain_absmax, states[0].code,
                   states[0].blocksize, (n, k), splits)

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> [M, N] float32 through the 4-bit kernel (bfloat16 inside, as bitsandbytes
        computes every Linear4bit on this CPU)."""
        if GEMV_KERNEL is None:
            return torch.ops.bitsandbytes.gemv_4bit(x, self.packed, self.shape, self.absmax, self.code,
                                                    self.blocksize).float()
        rows = x.to(torch.bfloat16).contiguous()
        out = torch.empty(rows.shape[0], self.shape[0], dtype=torch.bfloat16)
        GEMV_KERNEL(ctypes.c_int64(rows.shape[0]), ctypes.c_int64(self.shape[0]), ctypes.c_int64(self.shape[1]),
                     ctypes.c_void_p(rows.data_ptr()), ctypes.c_void_p(self.packed.data_ptr()),
                     ctypes.c_void_p(self.absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                     ctypes.c_int64(self.blocksize), ctypes.c_int64(rows.stride(0)), ctypes.c_int64(out.stride(0)))
        return out.float()

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The same product for many rows: dequantize once to bfloat16, one matrix multiply (AMX/oneDNN)."""
        weight = torch.ops.bitsandbytes.dequantize_4bit(self.plain, self.plain_absmax, self.blocksize, "nf4",
                                                        list(self.shape), torch.bfloat16)
        return (x.to(torch.bfloat16) @ weight.t()).float()


@dataclass
class DequantizedLinear:
    """Several nf4 linear layers in bitsandbytes' standard layout (CPUs without AVX512-BF16),
    dequantized to float32 when multiplied.

    There bitsandbytes computes every Linear4bit as "dequantize the whole matrix to float32, then one
    float32 matrix multiply", at each call, and so does this: the same dequantize kernel and the same
    product give transformers' bits. What it saves is the rest: the op's allocation and Python (a pass
    over the 135M model's 120 matrices 53 ms through the op, 14 ms calling the kernel into a reused
    buffer, measured). Keeping float32 copies instead (as this did before) costs 425 MB for that model
    and is slower: a step then reads them from memory (34 ms a pass on one thread), where reading
    the 4-bit bytes, dequantizing into a buffer that stays in L3 and multiplying it takes ~25 (14 +
    11); decode on this path went from 19.5 to 26.3 tokens/s (39.4 with the C++ loop's helper thread,
    44 with its own dequantize kernels;
    `domainchat bench`'s float32 figure)."""

    plain: torch.Tensor  # [N*K/2, 1] uint8: the layers' packed bytes, one after another
    absmax: torch.Tensor  # [N*K/blocksize] float32
    code: torch.Tensor  # the 16 nf4 values
    blocksize: int
    shape: tuple[int, int]  # (N, K)
    splits: tuple[int, ...]

    @classmethod
    def of(cls, layers: Sequence[torch.nn.Module]) -> DequantizedLinear:
        states = [layer.weight.quant_state for layer in layers]
        splits = tuple(int(s.shape[0]) for s in states)
        plain = torch.cat([layer.weight.data for layer in layers]) if len(layers) > 1 else layers[0].weight.data
        if len(layers) > 1:  # the model's layers share the fused bytes instead of keeping their own
            offset = 0
            for layer, width in zip(layers, splits, strict=True):
                count = width * int(states[0].shape[1]) // 2
                layer.weight.data = plain[offset:offset + count]
                offset += count
        absmax = torch.cat([float_absmax(s) for s in states])
        return cls(plain, absmax, states[0].code.float(), states[0].blocksize, (sum(splits), int(states[0].shape[1])),
                   splits)

    def weight(self) -> torch.Tensor:
        """The float32 matrix [N, K], as bitsandbytes dequantizes it. Through the kernel it lands in
        this thread's buffer, overwritten by the next call here: use it before asking again."""
        n, k = self.shape
        if not self.native:
            return torch.ops.bitsandbytes.dequantize_4bit(self.plain, self.absmax, self.blocksize, "nf4",
                                                          [n, k], torch.float32)
        buffer = getattr(_BUFFERS, "float32", None)
        if buffer is None or buffer.numel() < n * k:
            buffer = _BUFFERS.float32 = torch.empty(n * k)
        out = buffer[:n * k].view(n, k)
        DEQUANTIZE_KERNEL(ctypes.c_void_p(self.plain.data_ptr()), ctypes.c_void_p(self.absmax.data_ptr()),
                           ctypes.c_void_p(out.data_ptr()), ctypes.c_longlong(self.blocksize),
                           ctypes.c_longlong(n), ctypes.c_longlong(k))
        return out

    @property
    def native(self) -> bool:
        """Whether bitsandbytes' op would call the kernel this calls directly: it uses another
        implementation for odd widths and blocks of 2048 or more."""
        return DEQUANTIZE_KERNEL is not None and self.shape[1] % 2 == 0 and self.blocksize < 2048

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight())

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight())


def float_absmax(state) -> torch.Tensor:
    """A layer's block scales in float32, as `bitsandbytes.functional.dequantize_4bit` computes them."""
    absmax = state.absmax
    if state.nested:
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(absmax, state.state2)
        absmax += state.offset
    return absmax.float().contiguous()


Linear = FusedLinear | DequantizedLinear

"""nf4 weights in bitsandbytes' standard layout, as the lean decoder's float32 path holds them (the
model's weights kept there, as on a CPU without AVX512-BF16): the fused matrices and our dequantize
kernels give bitsandbytes' own floats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from domainchat import nf4_weights
from domainchat.engine import Engine

pytestmark = pytest.mark.slow


def test_dequantized_matrices_are_bitsandbytes_own(standard_layout_engine: Engine,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard layout's fused matrices dequantize to exactly what bitsandbytes gives for each
    layer, through its kernel called directly and through its op (where the kernel is missing), and
    the model's layers now read the fused bytes instead of their own copies."""
    from bitsandbytes.functional import dequantize_4bit

    from domainchat import decoder

    lean = standard_layout_engine._decoder
    block = standard_layout_engine.model.get_base_model().model.layers[0]
    layers = [decoder._base_layer(getattr(block.self_attn, name)) for name in ("q_proj", "k_proj", "v_proj")]
    expected = torch.cat([dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in layers])
    fused = lean.layers[0].qkv
    assert fused.native, "this bitsandbytes exports its dequantize kernel: the fast path should be on"
    assert torch.equal(fused.weight(), expected)
    assert layers[1].weight.data.data_ptr() == fused.plain.data_ptr() + layers[0].weight.data.numel()
    monkeypatch.setattr(nf4_weights, "DEQUANTIZE_KERNEL", None)
    assert not fused.native and torch.equal(fused.weight(), expected)


def test_our_dequantize_kernels_are_bitsandbytes_own(standard_layout_engine: Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ loop's own nf4 kernels (csrc/lean_step.cpp), each that this CPU runs, give the very
    floats bitsandbytes' kernel gives; ATEN_CPU_CAPABILITY=avx2 holds them to AVX2."""
    from domainchat import decoder

    module = decoder._native_step_module()
    if module is None:
        pytest.skip("no C++ compiler: bitsandbytes' kernel serves")
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    kernels = [isa for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2")) if flag in flags]
    if not kernels:
        pytest.skip("no AVX2 on this CPU: bitsandbytes' kernel serves")
    fused = standard_layout_engine._decoder.layers[0].gate_up
    (n, k), expected = fused.shape, fused.weight().clone()
    for isa in kernels:
        ours = module.dequantize_nf4(fused.plain, fused.absmax, fused.code, n * k, fused.blocksize, isa)
        assert torch.equal(ours.view(n, k), expected), isa
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.raises(RuntimeError, match="no nf4 dequantize kernel"):
        module.dequantize_nf4(fused.plain, fused.absmax, fused.code, n * k, fused.blocksize, "avx512")

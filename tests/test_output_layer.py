"""Output layer: one row bit-equal to transformers' product, several rows through transposed slices,
and the screen that computes only the picked tokens, bit-equal to the whole product."""

from __future__ import annotations

import pytest
import torch

from domainchat.output_layer import OutputLayer, intra_op_threads

pytestmark = pytest.mark.slow  # a 49,152 x 576 weight, as the bundled model's, a few seconds a test


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_output_layer_keeps_one_row_exact_and_splits_several(threads: int) -> None:
    """One row gets the bits of transformers' product; several rows, multiplied in transposed
    slices on parallel threads, agree with it to float32 rounding and pick the same tokens."""
    torch.manual_seed(0)
    weight = torch.randn(49152, 576) * 0.05
    output = OutputLayer(weight, threads, transposed=True)
    assert output.columns is not None and sum(c.shape[1] for c in output.columns) == 49152
    one = torch.randn(1, 576)
    assert torch.equal(output(one), torch.nn.functional.linear(one, weight))
    for rows in (2, 3, 4, 5):
        hidden = torch.randn(rows, 576)
        logits, whole = output(hidden), hidden @ weight.t()
        assert logits.shape == (rows, 49152)
        assert torch.allclose(logits, whole, atol=1e-5) and torch.equal(logits.argmax(-1), whole.argmax(-1))
    plain = OutputLayer(weight, threads, transposed=False)
    with intra_op_threads(threads):  # a several-row product's rounding depends on the thread count
        whole = hidden @ weight.t()
    assert plain.columns is None and torch.equal(plain(hidden), whole)


@pytest.mark.parametrize(("capability", "copy"), [("AVX512", torch.int8), ("AVX2", torch.int8),
                                                  ("DEFAULT", torch.bfloat16)])
def test_the_output_layer_screens_and_computes_the_picked_tokens_exactly(
        capability: str, copy: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen's radius holds every float32 logit, from the int8 copy where ATen's int8 product
    is vectorised and the bfloat16 copy elsewhere, a row of zeros included; the picked tokens'
    logits are bit-equal to the whole one-row product's, for a weight that starts off a 64-byte
    boundary too (as a loaded model's may) and for a trainable one (a model without adapters); a
    row whose pick returns None gets the whole product."""
    if capability == "AVX512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    torch.manual_seed(0)
    storage = torch.randn(49152 * 576 + 10) * 0.05
    storage[10 + 7 * 576:10 + 8 * 576] = 0.0  # token 7's row, at offset 10
    for offset in (0, 10):  # 10 floats: 40 bytes off the boundary, as the bundled model's embedding is
        weight = torch.nn.Parameter(storage[offset:offset + 49152 * 576].view(49152, 576))
        output = OutputLayer(weight, 2, transposed=True)
        assert output.screen_weight is not None, "gathered rows should multiply bit-equal on this CPU"
        assert output.screen_weight.dtype == copy
        hidden = torch.randn(3, 576) * 2
        whole = torch.cat([output(hidden[row:row + 1]) for row in range(3)]).detach()
        estimate, radius = output.screen(hidden)
        assert bool(((whole - estimate).abs() <= radius).all())
        top = [lambda e, r: torch.topk(e, 5).indices.sort().values, None, lambda e, r: torch.arange(0, 49152, 7)]
        logits = output(hidden, top)
        for row in (0, 2):
            picked = torch.isfinite(logits[row])
            assert int(picked.sum()) == (5 if row == 0 else len(range(0, 49152, 7)))
            assert torch.equal(logits[row][picked], whole[row][picked])
        assert torch.allclose(logits[1], whole[1], atol=1e-5)  # the whole several-row product


def test_the_screen_falls_back_to_bfloat16_when_the_int8_product_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> torch.Tensor:
        raise RuntimeError("_weight_int8pack_mm: unsupported")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", refuse)
    torch.manual_seed(0)
    weight = torch.randn(4096, 576) * 0.05
    output = OutputLayer(weight, 2, transposed=True)
    assert output.screen_weight is not None and output.screen_weight.dtype == torch.bfloat16
    assert output.screen_scales is None
    hidden = torch.randn(2, 576)
    estimate, radius = output.screen(hidden)
    assert bool(((hidden @ weight.t() - estimate).abs() <= radius).all())

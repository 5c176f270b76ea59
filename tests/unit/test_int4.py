"""Int4 weight-only quantization (the offloaded target's int4 self-draft): round to nearest within a group's
range, the packed product equal to a product with the weights it claims, and bad shapes refused."""

import pytest
import torch

from cluster.models import native
from cluster.models.int4 import LEVELS, quantize

KERNELS = [pytest.param(False, id="torch"),
           pytest.param(True, id="native", marks=pytest.mark.skipif(native.int4_products() is None,
                                                                    reason="no native kernels on this CPU"))]


@pytest.mark.parametrize("use_native", KERNELS)
@pytest.mark.parametrize("group", [32, 128])
def test_each_weight_is_within_half_a_step_of_its_group_grid(group, use_native):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    w[3, :group] = 0.0  # a constant group: a zero range must not divide by zero
    w[5, :group] += 3.0  # a group far from zero: bf16's rounding of z must not push weights off the grid
    q = quantize(w, group, use_native)
    back = q.dequantize().float()
    grid = w.view(96, -1, group)
    step = ((grid.amax(-1) - grid.amin(-1)) / LEVELS).clamp(min=1e-8)
    err = (back - w).abs().view(96, -1, group) / step.unsqueeze(-1)
    # half a step from rounding q; the grid's own bf16 rounding and the product's add ~2% of a step
    assert err[torch.arange(96) != 5].max() <= 0.53
    assert (back[5, :group] - w[5, :group]).abs().max() <= 0.02  # within one bf16 step of 3.0 (1/64)
    assert back[3, :group].abs().max() < 1e-6
    # 4 bits a weight and a bf16 scale and zero a group
    assert q.nbytes == 96 * 256 // 2 + (256 // group) * 96 * 2 * 2


@pytest.mark.skipif(native.int4_products() is None, reason="no native kernels on this CPU")
def test_the_native_and_torch_kernels_multiply_by_the_same_weights():
    torch.manual_seed(2)
    w = torch.randn(64, 640) * 0.1 + 0.05  # 20 groups: the kernel's 16 at a time and a tail of 4
    a, b = quantize(w, 32, use_native=True), quantize(w, 32, use_native=False)
    assert a.scales is not None and b.scales_zeros is not None
    # the native kernel computes (q + 128) s + (z - 136 s): the same weights up to fp32 cancellation
    assert (a.dequantize().float() - b.dequantize().float()).abs().max() < 1e-6
    for n in (1, 2, 3, 70):  # one token, a pair, a pair and one, past the kernel's 64 a call
        x = torch.randn(n, 640)
        assert torch.allclose(a(x), b(x), rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("use_native", KERNELS)
def test_the_packed_product_equals_a_product_with_the_dequantized_weights(use_native):
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.1
    q = quantize(w, 32, use_native)
    for shape in [(1, 128), (5, 128), (2, 3, 128)]:
        x = torch.randn(shape)
        want = x.bfloat16().float() @ q.dequantize().float().t()
        got = q(x)
        assert got.dtype == x.dtype and got.shape == (*shape[:-1], 64)
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)  # bf16 output rounding only
    # and it is not the unquantized product: the test would see a kernel that ignored the quantization
    assert not torch.allclose(q(x), x @ w.t(), rtol=1e-3, atol=1e-3)


def test_a_group_that_does_not_divide_the_inputs_is_refused():
    with pytest.raises(ValueError, match="group"):
        quantize(torch.zeros(8, 96), 64)
    with pytest.raises(ValueError, match="group"):
        quantize(torch.zeros(8, 96), 48)


@pytest.mark.skipif(native.int4_products() is None, reason="no native kernels on this CPU")
def test_quantizing_a_few_rows_at_a_time_gives_the_same_weights(monkeypatch):
    import cluster.models.int4 as int4

    w = torch.randn(24, 64)
    whole = quantize(w, 32, use_native=True)
    monkeypatch.setattr(int4, "CHUNK_ROWS", 8)
    parts = quantize(w, 32, use_native=True)
    assert all(torch.equal(getattr(whole, k), getattr(parts, k)) for k in ("packed", "scales", "zeros"))


def test_chain_tokens_per_pass_counts_leading_agreements_and_the_targets_token():
    from tools.int4_fidelity import chain_tokens_per_pass

    assert chain_tokens_per_pass([True] * 6, k=12) == 6.0  # one pass: six agreements (the last has no bonus left)
    assert chain_tokens_per_pass([False] * 4, k=12) == 1.0  # every pass yields only the target's token
    # passes: [T T F] -> 3 tokens, [T T] capped at k=2 then the target's -> 3, [T] -> 1: 7 tokens in 3 passes
    assert chain_tokens_per_pass([True, True, False, True, True, True, True], k=2) == 7 / 3

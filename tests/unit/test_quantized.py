"""The compressed copies (cluster/models/quantized.py): every linear layer quantized in a copy, the source
untouched, the products within each format's rounding of the weights and activations."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.config import ConfigError
from cluster.drafters.configs import QuantizedConfig
from cluster.models.quantized import FP8, Fp8Linear, QuantizedLinear, linear_bytes, quantized_copy


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_a_copy_quantizes_every_linear_and_leaves_the_source_alone(fmt):
    source = _model()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    copy = quantized_copy(source, fmt)
    linears = [m for m in source.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in copy.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert not any(isinstance(m, torch.nn.Linear) for m in copy.modules())
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    # int4: half a byte a weight, a bf16 scale and zero a group of 32; fp8: a byte a weight, an fp32 scale a row
    shapes = [m.weight.shape for m in linears]
    assert linear_bytes(copy) == sum(o * i // 2 + 4 * o * i // 32 if fmt == "int4" else o * i + 4 * o
                                     for o, i in shapes)
    assert linear_bytes(source) == sum(4 * o * i for o, i in shapes)  # fp32: the source is as it was
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        ref, out = source(ids).logits.float(), copy(ids).logits.float()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < (out - ref).abs().max() < 0.2 * ref.abs().max()  # quantized, and near the source


def test_fp8_rounds_weights_and_activations_to_e4m3():
    torch.manual_seed(1)
    w, x = torch.randn(48, 64), torch.randn(5, 64)
    lin = Fp8Linear(w)
    assert lin.q.dtype == FP8 and lin.scale.shape == (1, 48)
    deq = lin.q.float() * lin.scale.t()
    # e4m3 keeps 3 mantissa bits: each weight within 2^-4 of itself (relative), beside the row's scale
    assert ((deq - w).abs() <= w.abs() * 2 ** -4 + lin.scale.t() * 2 ** -9).all()
    assert (deq - w).abs().max() > 0
    y = lin(x)
    sx = x.abs().amax(-1, keepdim=True) / 448
    expected = ((x / sx).to(FP8).float() * sx) @ deq.t()  # the activations rounded too, per token
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x @ deq.t(), rtol=1e-5, atol=1e-5)


def test_int8_is_cpu_only_and_formats_are_checked():
    with pytest.raises(ValueError, match="int8 is torch's CPU dynamic quantization"):
        quantized_copy(_model().to("meta"), "int8")
    with pytest.raises(ValueError, match="not one of"):
        quantized_copy(_model(), "int2")
    with pytest.raises(ConfigError, match="format"):
        QuantizedConfig("nf4").validate("drafter.quantized")
    with pytest.raises(ConfigError, match="group"):
        QuantizedConfig("int4", group=48).validate("drafter.quantized")


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_the_lean_copy_multiplies_by_the_same_quantized_weights_as_the_eager_copy(fmt):
    from cluster.models.backend import HFBackend, Row
    from cluster.models.lean import LeanBackend
    from cluster.models.quantized import backend_linear_bytes, quantized_backend

    source = _model().to(torch.bfloat16)
    lean = quantized_backend(source, fmt, 32, 1, 16)
    eager = HFBackend(quantized_copy(source, fmt), 1, 16)
    assert isinstance(lean, LeanBackend)
    # the copy's bf16 linear weights are freed: only the quantized products are held
    assert all(m.weight is None for m in lean.model.modules() if isinstance(m, torch.nn.Linear))
    assert backend_linear_bytes(lean) == linear_bytes(eager.model)
    assert all(isinstance(m.weight, torch.Tensor) for m in source.modules() if isinstance(m, torch.nn.Linear))
    tokens = [1, 2, 3, 4, 5, 6]
    a = lean.forward([Row(lean.cache.allocate(), tokens)]).logits.float()
    b = eager.forward([Row(eager.cache.allocate(), tokens)]).logits.float()
    target = LeanBackend(source, 1, 16)
    t = target.forward([Row(target.cache.allocate(), tokens)]).logits.float()
    # bf16 rounding apart, the same products: nearer the eager copy than the weights it was cast from
    # (fp8: 0.44 of the way here; int4: 0.02. A copy that kept the bf16 weights would be 0 from the target.)
    assert (a - b).abs().mean() < 0.6 * (a - t).abs().mean()


def test_a_copy_of_a_target_in_process_reads_prompts_with_the_targets_weights():
    from cluster.models.backend import Row
    from cluster.models.lean import LeanBackend
    from cluster.models.quantized import QuantizedLeanBackend, quantized_backend

    source = _model().to(torch.bfloat16)
    target = LeanBackend(source, 2, 64)  # fuses the source's weights: the copy shares them for wide passes
    copy = quantized_backend(source, "int4", 32, 2, 64)
    wide = list(range(1, QuantizedLeanBackend.DENSE_ABOVE + 2))

    def logits(backend, tokens):
        return backend.forward([Row(backend.cache.allocate(), tokens)]).logits

    assert torch.equal(logits(copy, wide), logits(target, wide))  # the target's products, bit for bit
    assert not torch.equal(logits(copy, wide[:4]), logits(target, wide[:4]))  # a draft step: int4
    alone = quantized_backend(_model().to(torch.bfloat16), "int4", 32, 1, 64)  # no target beside it
    assert alone.dense is None

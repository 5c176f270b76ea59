"""A compressed copy of a model without training: its linear layers quantized, the rest kept as they are.

Formats (`drafter.quantized.format`):
- int8: torch's dynamic quantization (weights int8 per channel, activations quantized on the fly), CPU only.
- int4: weight-only, round to nearest per group of inputs (`cluster.models.int4`): the native AVX512-BF16
  kernel or torch's int4 kernel on CPU, torch's tinygemm kernel (`_weight_int4pack_mm`) on CUDA.
- fp8: e4m3 weights with a scale per output channel, activations cast to e4m3 per token on the fly, one
  `torch._scaled_mm` on CUDA (Hopper's fp8 tensor cores). On CPU it is emulated with the same e4m3 values
  in fp32 arithmetic: slow, but the numbers a GPU multiplies by, so acceptance can be measured here.
"""

from __future__ import annotations

import copy

import torch

from cluster.models import int4
from cluster.models.lean import LeanBackend

FORMATS = ("int8", "int4", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class Fp8Linear:
    """W [out, in] as e4m3 with a float32 scale per output row: W ~= q * scale."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()
        scale = (w.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        self.out_features, self.in_features = w.shape
        self.q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        self.scale = scale.reshape(1, -1).contiguous()  # [1, out]: _scaled_mm's row-wise scale for its second operand
        # CPU: the dequantized weight, once (the emulation multiplies by exactly the e4m3 values).
        self.emulated = None if weight.is_cuda else (self.q.float() * scale)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        sx = (flat.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [tokens, 1]
        xq = (flat / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if self.emulated is None:
            y = torch._scaled_mm(xq, self.q.t(), scale_a=sx.contiguous(), scale_b=self.scale, out_dtype=torch.bfloat16)
        else:
            y = (xq.float() * sx) @ self.emulated.t()
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class QuantizedLinear(torch.nn.Module):
    """An nn.Linear's place in the model, multiplying by a quantized weight (int4.Int4Linear or Fp8Linear)."""

    def __init__(self, linear: torch.nn.Linear, fmt: str, group: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_q = quantize_weight(linear.weight, fmt, group)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(),
                                                                         requires_grad=False)

    @property
    def nbytes(self) -> int:
        return self.weight_q.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_q(x)
        return y if self.bias is None else y + self.bias


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's linear weights as they are held (quantized or not): what a draft pass reads."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.nbytes
        elif isinstance(m, torch.nn.Linear) and m.weight is not None:
            total += m.weight.numel() * m.weight.element_size()
    return total


def backend_linear_bytes(backend) -> int:
    """linear_bytes of a backend's model, or of a lean backend's fused products (a lean copy's are quantized)."""
    layers = getattr(backend, "layers", None)
    if layers is None:
        return linear_bytes(backend.model)
    held = [w for layer in layers for w in (layer[1], layer[3], layer[5], layer[6])] + [backend.head_rows]
    return sum(w.nbytes if not isinstance(w, torch.Tensor) else w.numel() * w.element_size() for w in held)


def quantize_weight(weight: torch.Tensor, fmt: str, group: int = 32):
    """One weight [out, in] as `fmt` (int4 or fp8): a callable x [..., in] -> [..., out]."""
    return int4.quantize(weight.detach(), group) if fmt == "int4" else Fp8Linear(weight)


def quantized_backend(source: torch.nn.Module, fmt: str, group: int, num_slots: int, capacity: int):
    """The copy's backend: lean where the lean forward covers the model (its fused q/k/v, o, gate/up, down
    and head products quantized; the bf16 copies of them freed), else Hugging Face eager over
    `quantized_copy`. The eager forward costs 2-3x the lean one a step at these sizes on CPU, and ~8x the
    lean one with CUDA graphs on a GPU (benchmarks/gpu.py): more than a draft can afford."""
    from cluster.models.backend import HFBackend
    from cluster.models.lean import supports

    if fmt == "int8" or supports(source) is not None:
        return HFBackend(quantized_copy(source, fmt, group), num_slots, capacity)
    check(fmt, next(source.parameters()).device)
    shared = getattr(source, "_lean_layers", None)  # the target's fused weights, when it runs in this process
    model = _copy(source, torch.bfloat16)
    backend = QuantizedLeanBackend(model, num_slots, capacity)
    backend.layers = model._lean_layers = [
        (ln1, quantize_weight(qkv, fmt, group), bias, quantize_weight(o, fmt, group), ln2,
         quantize_weight(gate_up, fmt, group), quantize_weight(down, fmt, group), g)
        for ln1, qkv, bias, o, ln2, gate_up, down, g in backend.layers]
    head = backend.head
    backend.head_rows = quantize_weight(head.weight, fmt, group)
    backend.quantized = backend.layers, backend.head_rows
    if shared is not None and shared[0][1].dtype == torch.bfloat16:
        backend.dense = shared, source.get_output_embeddings().weight
    tied = head.weight.data_ptr() == backend.embed.data_ptr()
    for m in model.modules():  # nothing reads the bf16 weights now but the embedding (a tied head is it)
        if isinstance(m, torch.nn.Linear) and not (m is head and tied):
            m.weight = None
    return backend


class QuantizedLeanBackend(LeanBackend):
    """A lean copy whose products are quantized. Where the copy was cast from a target in this process, a
    wide pass (a prompt) runs on the target's own bf16 weights instead: the int4 kernel is built for a few
    tokens (a 300-token SmolLM2 prompt took 707 ms through it, 429 ms in bf16), and the keys and values a
    prompt leaves only steer the draft, which the target verifies."""

    DENSE_ABOVE = 16  # new tokens in a row above which the shared bf16 weights run the pass (a prompt)

    quantized: tuple = ()  # (layers, head rows) with quantized products
    dense: tuple | None = None  # the target's (layers, head rows), shared

    def forward(self, rows, last_only: bool = False, hidden: bool = False, skip: list[int] | None = None):
        wide = self.dense is not None and max(len(r.tokens) for r in rows) > self.DENSE_ABOVE
        self.layers, self.head_rows = self.dense if wide else self.quantized
        return super().forward(rows, last_only, hidden, skip)


def check(fmt: str, device: torch.device) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantized: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "int8" and device.type != "cpu":
        raise ValueError(f"quantized: int8 is torch's CPU dynamic quantization; on {device.type} use fp8 or int4")
    if fmt == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("quantized: fp8 needs a GPU with fp8 tensor cores (compute capability >= 8.9)")


def quantized_copy(model: torch.nn.Module, fmt: str, group: int = 32) -> torch.nn.Module:
    """A copy of `model` with every nn.Linear (the LM head too) quantized to `fmt`; the source is untouched.
    int8 runs in float32 on CPU; int4 and fp8 keep the source's device, in bf16."""
    check(fmt, next(model.parameters()).device)
    if fmt == "int8":
        return torch.ao.quantization.quantize_dynamic(_copy(model, torch.float32), {torch.nn.Linear},
                                                      dtype=torch.qint8)
    out = _copy(model, torch.bfloat16)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, QuantizedLinear(child, fmt, group))
    return out.eval()


def _copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    out = copy.deepcopy(model).to(dtype)
    out.__dict__.pop("_lean_layers", None)  # fused views of the source's weights: not this copy's
    return out

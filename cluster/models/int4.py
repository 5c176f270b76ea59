"""Int4 weight-only quantization (round to nearest, per group of input features) for a draft cast from its
target without training.

A weight W [out, in] is split into groups of `group` consecutive inputs; each group keeps a bf16 scale s
and zero z, and W ~= (q - 8) * s + z with q in 0..15: 4.5 bits a weight at group 32 (0.56 bytes against
bf16's 2). The grid is chosen so it covers the group's range with both ends inside: every weight is
within half a step of its value.

The product runs in the native kernel (`int4_products` in bf16_kernels.c, which unpacks the nibbles as it
reads them: the weights are never widened in memory) where it is available, else in torch's CPU int4
kernel; on CUDA in torch's tinygemm kernel. Each has its own packing; all multiply by the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.models import native

LEVELS = 15  # q in 0..15
OFFSET = 8  # w = (q - 8) * s + z, as torch's int4 kernels compute it
CHUNK_ROWS = 2048  # rows quantized at a time (a multiple of native.INT4_TILE)


@dataclass
class Int4Linear:
    """A quantized weight [out, in]. `packed` uint8 [out, in/2]: the native layout (per 32 inputs, byte j
    holds q[j] low and q[16 + j] high) when `scales`/`zeros` (bf16 [out, in/group]) are set, else torch's
    layout for the device it is on (CPU or CUDA) with `scales_zeros` (bf16 [in/group, out, 2])."""

    packed: torch.Tensor
    group: int
    out_features: int
    in_features: int
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    scales_zeros: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros, self.scales_zeros)
                   if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W.T -> [..., out], in x's dtype (the kernels themselves take and give bf16)."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.packed.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales_zeros)
        elif self.scales_zeros is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros)
        else:
            parts = [native.int4_product(part, self.packed, self.scales, self.zeros, self.group)
                     for part in flat.split(native.INT4_MAX_TOKENS)]
            y = torch.cat(parts) if parts else flat.new_empty(0, self.out_features)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer multiplies by, [out, in] in bf16 (for tests and error reports): the kernel's
        own product with the identity, so it needs no knowledge of the packed layout."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return self(eye).t().contiguous()  # exact: one term a sum


def quantize(weight: torch.Tensor, group: int = 32, use_native: bool | None = None) -> Int4Linear:
    """Round-to-nearest int4 of `weight` [out, in]; `in` must be a multiple of `group` (32, 64, 128 or 256:
    what the kernels take). use_native: pack for the native kernel (default: where it is available). A CUDA
    weight is packed for CUDA."""
    out, inp = weight.shape
    if group not in (32, 64, 128, 256) or inp % group:
        raise ValueError(f"int4: group {group} must be 32, 64, 128 or 256 and divide in_features {inp}")
    if weight.is_cuda:
        use_native = False
        if out % 8:  # (in is a multiple of the group, so of 32)
            raise ValueError(f"int4 on CUDA: a weight [{out}, {inp}] needs out % 8 == 0 (tinygemm)")
    elif use_native is None:
        use_native = native.int4_covers(out, inp, group)
    if use_native and out > CHUNK_ROWS:  # a few rows at a time: fp32 temporaries of a whole layer would set peak RSS
        parts = [quantize(rows, group, True) for rows in weight.split(CHUNK_ROWS)]
        return Int4Linear(torch.cat([p.packed for p in parts]), group, out, inp,
                          scales=torch.cat([p.scales for p in parts]), zeros=torch.cat([p.zeros for p in parts]))
    w = weight.float().view(out, inp // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    # z (at q = 8) rounded to bf16 first, then the smallest bf16 step whose grid z - 8s .. z + 7s still
    # covers [low, high]: bf16's rounding of z and s then never pushes a weight off the grid's ends.
    zero = (low + OFFSET * (high - low) / LEVELS).to(torch.bfloat16).float()
    need = torch.maximum((zero - low) / OFFSET, (high - zero) / (LEVELS - OFFSET)).clamp(min=1e-8)
    scale = need.to(torch.bfloat16)
    scale = torch.where(scale.float() < need, (scale.view(torch.int16) + 1).view(torch.bfloat16), scale).float()
    q = ((w - zero) / scale + OFFSET).round().clamp(0, LEVELS).to(torch.int32).view(out, inp)
    scale, zero = scale.squeeze(-1).to(torch.bfloat16), zero.squeeze(-1).to(torch.bfloat16)
    if use_native:
        nib = q.view(out, inp // 32, 2, 16).to(torch.uint8)
        packed = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(out, inp // 2).contiguous()
        return Int4Linear(packed, group, out, inp, scales=scale.contiguous(), zeros=zero.contiguous())
    if weight.is_cuda:  # two q a byte, the even input in the high nibble; k tiles as large as `in` divides into
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, next(t for t in (8, 4, 2) if inp % (t * 16) == 0))
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    return Int4Linear(packed, group, out, inp, scales_zeros=scales_zeros)

"""A lean forward for Llama-family models (Llama, SmolLM2, Qwen2: RMSNorm, RoPE, GQA, SwiGLU), written
over the Hugging Face model's own weights with a paged KV cache.

Eager Hugging Face code spends most of a small model's decode step in per-layer Python and tensor
bookkeeping; here one pass is a short loop of fused matmuls (q/k/v in one, gate/up in one), RoPE from
the model's own rotary module, and scaled-dot-product attention over each row's cached blocks. Models
it does not cover keep the eager backend (chosen automatically, and logged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.models.backend import HFBackend, PassOutput, Row, _tree
from cluster.models.paged_cache import PagedKVCache

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def supports(model) -> str | None:
    """None if the lean forward covers this model, else why not."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of {SUPPORTED}"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    return None


class LeanBackend(HFBackend):
    """Same three operations as HFBackend (forward with tree masks, commit, cost), lean and paged."""

    name = "lean"

    def __init__(self, model: torch.nn.Module, num_slots: int, capacity: int, block_size: int = 16,
                 num_blocks: int | None = None, num_layers: int | None = None):
        """num_layers: run only the first layers, then the final norm and head (a layer-skip draft)."""
        super().__init__(model, num_slots, capacity)
        self.cache = PagedKVCache(num_slots, capacity, block_size, num_blocks)
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.rotary = inner.rotary_emb
        if getattr(model, "_lean_layers", None) is None:  # fuse once per model: a layer-skip draft shares them
            model._lean_layers = _fuse(inner)
        self.layers = model._lean_layers[:num_layers]
        if num_layers is not None:
            self.name = f"lean-first-{len(self.layers)}"

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    @torch.inference_mode()
    def forward(self, rows: list[Row], last_only: bool = False, hidden: bool = False) -> PassOutput:
        cache = self.cache
        lengths = [len(r.tokens) for r in rows]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one new token")
        b, width = len(rows), max(lengths)
        starts = [cache.lengths[r.slot] for r in rows]
        span = max(s + n for s, n in zip(starts, lengths))
        ids = torch.zeros(b, width, dtype=torch.long)
        depth = torch.arange(width).repeat(b, 1)
        ancestor = torch.ones(b, width, width, dtype=torch.bool).tril()
        for i, r in enumerate(rows):
            ids[i, : lengths[i]] = torch.tensor(r.tokens)
            if r.parents is not None:
                depth[i, : lengths[i]], ancestor[i, : lengths[i], : lengths[i]] = _tree(r.parents)
            cache.reserve(r.slot, starts[i] + lengths[i])
        start_t = torch.tensor(starts)
        positions = start_t.unsqueeze(-1) + depth
        key_pos = torch.arange(span)
        allowed = key_pos.view(1, 1, -1) < start_t.view(-1, 1, 1)
        written = key_pos.view(1, 1, -1) - start_t.view(-1, 1, 1)
        in_block = (written >= 0) & (written < width)
        allowed = allowed | (in_block & ancestor.gather(2, written.clamp(0, width - 1).expand(-1, width, -1)))
        real = torch.arange(width).view(1, -1) < torch.tensor(lengths).view(-1, 1)  # [B, T] not padding
        # Pool indices: where each new token is written, and where each row's keys are read from.
        write = torch.stack([
            torch.cat([cache.indices(r.slot, starts[i], starts[i] + lengths[i]),
                       torch.full((width - lengths[i],), -1, dtype=torch.long)]) for i, r in enumerate(rows)])
        read = torch.stack([
            torch.cat([cache.indices(r.slot, 0, starts[i] + lengths[i]),
                       torch.zeros(span - starts[i] - lengths[i], dtype=torch.long)]) for i, r in enumerate(rows)])
        # One row whose blocks lie in order in the pool (the usual case): read a slice, not a gather.
        contiguous = b == 1 and bool((read[0] == read[0, 0] + torch.arange(span)).all())
        dev = self.device
        mask = allowed.unsqueeze(1).to(dev)  # [B, 1, T, span]
        real_rows = real.reshape(-1).nonzero().squeeze(-1)  # flat [B*T] index of every real (not pad) token
        write_flat = write.reshape(-1)[real_rows].to(dev)
        real_rows = real_rows.to(dev)
        read_flat = read.reshape(-1).to(dev)
        x = F.embedding(ids.to(dev), self.embed)
        cos, sin = self.rotary(x, positions.to(dev))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        cache.ensure_layers(len(self.layers), self.n_kv, self.head_dim, x.dtype, dev)
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for li, (ln1, qkv_w, qkv_b, o_w, ln2, gate_up, down, g) in enumerate(self.layers):
            h = self._norm(x, ln1)
            qkv = F.linear(h, qkv_w, qkv_b)
            q = qkv[..., :nq].view(b, width, self.n_heads, self.head_dim).transpose(1, 2)
            k = qkv[..., nq:nq + nk].view(b, width, self.n_kv, self.head_dim).transpose(1, 2)
            v = qkv[..., nq + nk:].view(b, width, self.n_kv, self.head_dim)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            keys, values = cache.keys[li], cache.values[li]
            keys[write_flat] = k.transpose(1, 2).reshape(b * width, self.n_kv, self.head_dim)[real_rows]
            values[write_flat] = v.reshape(b * width, self.n_kv, self.head_dim)[real_rows]
            if contiguous:
                first = int(read[0, 0])
                kk = keys[first:first + span].unsqueeze(0).transpose(1, 2)
                vv = values[first:first + span].unsqueeze(0).transpose(1, 2)
            else:
                kk = keys[read_flat].view(b, span, self.n_kv, self.head_dim).transpose(1, 2)
                vv = values[read_flat].view(b, span, self.n_kv, self.head_dim).transpose(1, 2)
            attn = self._attention(q, kk, vv, mask)
            x = x + F.linear(attn.transpose(1, 2).reshape(b, width, nq), o_w)
            h = self._norm(x, ln2)
            gu = F.linear(h, gate_up)
            x = x + F.linear(F.silu(gu[..., :g]) * gu[..., g:], down)
        out = self._norm(x, self.final_norm)
        for r, n in zip(rows, lengths):
            cache.lengths[r.slot] += n
        if last_only:
            out = out[torch.arange(b), torch.tensor(lengths) - 1]
        logits = F.linear(out, self.head.weight).float()
        return PassOutput(logits, out if hidden else None)

    def _attention(self, q, k, v, mask):
        """Few queries (decode, verify): plain matmuls in fp32, grouped by KV head, beat the fused CPU
        kernel's setup; many (prefill): the fused kernel."""
        b, heads, width, dim = q.shape
        if width > 16:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        group = heads // self.n_kv
        qq = q.reshape(b, self.n_kv, group * width, dim).float()
        scores = qq @ k.float().transpose(-1, -2) * dim ** -0.5  # [B, kv, group*T, S]
        scores = scores.view(b, self.n_kv, group, width, -1).masked_fill(~mask.unsqueeze(1), float("-inf"))
        probs = scores.softmax(-1).view(b, self.n_kv, group * width, -1)
        return (probs @ v.float()).view(b, heads, width, dim).to(q.dtype)

    @torch.inference_mode()
    def commit(self, slot: int, start: int, keep: list[int]) -> None:
        if keep != list(range(len(keep))):
            src = self.cache.indices(slot, start, start + max(keep) + 1)[torch.tensor(keep)]
            dst = self.cache.indices(slot, start, start + len(keep))
            for buffers in (self.cache.keys, self.cache.values):
                for layer in buffers:
                    layer[dst] = layer[src]
        self.cache.truncate(slot, start + len(keep))


def _fuse(inner) -> list[tuple]:
    """Per layer: (input norm, fused q/k/v, fused bias, o, post norm, fused gate/up, down, gate rows). The HF
    modules are left holding views into the fused weights: no second copy in memory."""
    layers = []
    with torch.no_grad():
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            bias = None
            if attn.q_proj.bias is not None:
                bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            q, k = attn.q_proj.out_features, attn.k_proj.out_features
            attn.q_proj.weight.data, attn.k_proj.weight.data = qkv[:q], qkv[q:q + k]
            attn.v_proj.weight.data = qkv[q + k:]
            g = mlp.gate_proj.out_features
            mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up[:g], gate_up[g:]
            layers.append((layer.input_layernorm.weight, qkv, bias, attn.o_proj.weight,
                           layer.post_attention_layernorm.weight, gate_up, mlp.down_proj.weight, g))
    return layers


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

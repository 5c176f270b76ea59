"""A lean forward for Llama-family models (Llama, SmolLM2, Qwen2: RMSNorm, RoPE, GQA, SwiGLU), written
over the Hugging Face model's own weights with a paged KV cache.

Eager Hugging Face code spends most of a small model's decode step in per-layer Python and tensor
bookkeeping; here one pass is a short loop of fused matmuls (q/k/v in one, gate/up in one), RoPE from
the model's own rotary module, and scaled-dot-product attention over each row's cached blocks. Models
it does not cover keep the eager backend (chosen automatically, and logged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.models import native
from cluster.models.backend import HFBackend, PassOutput, Row, _tree, check_skip
from cluster.models.paged_cache import PagedKVCache

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass
class PassInputs:
    """What a pass's device work reads, built on the host: the packed new tokens' ids, positions and KV-pool
    slots, the attention groups, and each row's new-token count."""

    ids: torch.Tensor
    positions: torch.Tensor
    write: torch.Tensor
    groups: list
    lengths: list[int]


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
    if getattr(cfg, "mlp_bias", False) or (getattr(cfg, "attention_bias", False) and "Llama" in name):
        return "biases on the output or FFN projections"  # the lean forward adds q/k/v biases only (Qwen2's)
    return None


class LeanBackend(HFBackend):
    """Same three operations as HFBackend (forward with tree masks, commit, cost), lean and paged."""

    name = "lean"

    def __init__(self, model: torch.nn.Module, num_slots: int, capacity: int, block_size: int = 16,
                 num_blocks: int | None = None, num_layers: int | None = None, graphs: str = "auto"):
        """num_layers: run only the first layers, then the final norm and head (a layer-skip draft).
        graphs: "auto" replays CUDA graphs of small passes on a GPU (cluster/models/cuda_graphs.py), "off"
        never, "padded" runs the graphs' padded passes eagerly (to test them where there is no GPU)."""
        super().__init__(model, num_slots, capacity)
        if graphs not in ("auto", "off", "padded"):
            raise ValueError(f"graphs: {graphs!r} is not one of 'auto', 'off', 'padded'")
        graphs = "capture" if graphs == "auto" and self.device.type == "cuda" else graphs
        padding = graphs in ("capture", "padded")
        if padding:  # the graphs' padding rows get a slot of their own, and its blocks
            num_slots += 1
            num_blocks = None if num_blocks is None else num_blocks + -(-capacity // block_size)
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
        self.head_ids, self.head_rows = None, self.head.weight  # all of the vocabulary, in id order
        if self.layers and self.layers[0][1].device.type != "meta":
            _, qkv, _, o, _, gate_up, down, _ = self.layers[0]
            tune_products([qkv, o, gate_up, down, self.head.weight])  # once per dtype in a process
        self.graphs = None
        if padding:
            from cluster.models.cuda_graphs import CudaGraphs

            self.graphs = CudaGraphs(self, capture=graphs == "capture")

    def restrict_head(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Logits for token ids `ids` only, from head rows `rows` (rows[i] is token ids[i]'s); the others
        get -inf, so they are never drafted. A draft's frequency-ranked vocabulary (FR-Spec): a small
        draft reads its whole head every step, a quarter of a 0.5B's weights."""
        if len(ids) != len(rows) or len(ids) > self.vocab_size:
            raise ValueError(f"head: {len(ids)} ids for {len(rows)} rows of a {self.vocab_size}-token vocabulary")
        self.head_ids, self.head_rows = ids.to(self.device), rows

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm (normalise in fp32, cast, then scale): in bf16 one native call where it is built
        (torch's four ops: 18 us a call here against 4, 61 calls a pass), else torch's fused norm."""
        y = native.rms_norm(x, weight, self.eps)
        if y is not None:
            return y
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    @torch.inference_mode()
    def forward(self, rows: list[Row], last_only: bool = False, hidden: bool = False,
                skip: list[int] | None = None) -> PassOutput:
        """Packed, never padded: the matmuls and the LM head run over the N real new tokens of all rows,
        and attention runs once per group of rows with the same number of new tokens. A pass then costs
        what its tokens cost, whatever the mix of draft lengths (one long draft among 31 plain rows would
        otherwise make every row as wide as it). On CUDA a pass whose shape has a captured graph replays
        it (cluster/models/cuda_graphs.py): one launch instead of ~15 a layer."""
        check_skip([len(r.tokens) for r in rows], skip)
        if self.graphs is not None and skip is None:
            out = self.graphs.forward(rows, last_only, hidden)
            if out is not None:
                return out
        inputs = self._prepare(rows)
        return self._finish(rows, inputs.lengths, self._compute(inputs), last_only, hidden, skip)

    def _prepare(self, rows: list[Row], span_blocks: int | None = None) -> PassInputs:
        """The host's part of a pass: reserve the rows' positions and build its index tensors on the device.
        span_blocks: attend over this many blocks a row (a graph's fixed shape), not the rows' own."""
        cache = self.cache
        lengths = [len(r.tokens) for r in rows]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one new token")
        b, width = len(rows), max(lengths)
        starts = [cache.lengths[r.slot] for r in rows]
        for r, s0, n in zip(rows, starts, lengths):
            cache.reserve(r.slot, s0 + n)
        dev = self.device
        trees = [_tree(r.parents) if r.parents is not None else None for r in rows]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        stack = self.n_heads // self.n_kv  # query heads per KV head: each group's mask is stacked to match
        groups = [_Group(cache, rows, starts, lengths, offsets, trees, [i for i in range(b) if lengths[i] == w], dev,
                         stack, span_blocks) for w in sorted(set(lengths))]
        depth = torch.cat([tree[0] if tree is not None else torch.arange(n) for tree, n in zip(trees, lengths)])
        positions = torch.tensor([s0 for s0, n in zip(starts, lengths) for _ in range(n)]) + depth
        write = torch.cat([cache.indices(r.slot, s0, s0 + n) for r, s0, n in zip(rows, starts, lengths)]).to(dev)
        ids = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.long, device=dev)
        return PassInputs(ids, positions.to(dev), write, groups, lengths)

    def _compute(self, p: PassInputs) -> torch.Tensor:
        """The device's part: the layers and the final norm over the packed new tokens -> [N, H]. Launches
        kernels only (no host reads), so a CUDA graph can capture it."""
        cache, dev, groups = self.cache, self.device, p.groups
        x = self._embed(p.ids)  # [N, H]
        cos, sin = self.rotary(x.unsqueeze(0), p.positions.unsqueeze(0))
        cos, sin = cos[0], sin[0]  # [N, D]
        cache.ensure_layers(len(self.layers), self.n_kv, self.head_dim, x.dtype, dev)
        nq, nk, n, write = self.n_heads * self.head_dim, self.n_kv * self.head_dim, len(p.ids), p.write
        for li, (ln1, qkv_w, qkv_b, o_w, ln2, gate_up, down, g) in enumerate(self.layers):
            h = self._norm(x, ln1)
            qkv = _linear(h, qkv_w, qkv_b)
            keys, values = cache.keys[li], cache.values[li]
            q = native.rope_write(qkv, cos, sin, write, keys, values, self.n_heads)  # one call where it is built
            if q is None:
                qk = _rope(qkv[:, :nq + nk].view(n, self.n_heads + self.n_kv, self.head_dim), cos.unsqueeze(1),
                           sin.unsqueeze(1))  # q and k at once
                q = qk[:, : self.n_heads]
                keys[write] = qk[:, self.n_heads:]
                values[write] = qkv[:, nq + nk:].view(n, self.n_kv, self.head_dim)
            if len(groups) == 1:
                attn = groups[0].attend(self, q, keys, values).reshape(n, nq)
            else:
                attn = q.new_empty(n, nq)
                for group in groups:
                    attn[group.tokens] = group.attend(self, q[group.tokens], keys, values).reshape(-1, nq)
            x = x + _linear(attn, o_w)
            x = x + self._ffn(li, self._norm(x, ln2), gate_up, down, g)
        return self._norm(x, self.final_norm)  # [N, H]

    def _finish(self, rows: list[Row], lengths: list[int], out: torch.Tensor, last_only: bool,
                hidden: bool, skip: list[int] | None = None) -> PassOutput:
        """Count the rows' new positions and turn the final hidden states of their packed new tokens (`out`,
        [N, H]) into the pass's output (without each row's first skip[i] tokens)."""
        dev = self.device
        for r, k in zip(rows, lengths):
            self.cache.lengths[r.slot] += k
        if skip is not None and not last_only:
            starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
            out = out[torch.tensor([a + j for a, n, s in zip(starts, lengths, skip) for j in range(s, n)], device=dev)]
            lengths = [n - s for n, s in zip(lengths, skip)]
        if last_only:
            ends = torch.tensor(lengths).cumsum(0) - 1
            out = out[ends.to(dev)]
            return PassOutput(self._head(out), hidden=out if hidden else None)
        b, width = len(rows), max(lengths)
        pad_index = None
        if len(set(lengths)) > 1:  # flat position (row * width + j) of each packed token
            pad_index = torch.tensor([i * width + j for i, k in enumerate(lengths) for j in range(k)], device=dev)
        return PassOutput(self._head(out), (b, width), pad_index,
                          _padded(out, pad_index, b, width) if hidden else None)

    def _head(self, out: torch.Tensor) -> torch.Tensor:
        """[N, H] final hidden states -> [N, V] float32 logits."""
        logits = _linear(out, self.head_rows).float()
        if self.head_ids is None:
            return logits
        full = logits.new_full((out.shape[0], self.vocab_size), float("-inf"))
        return full.index_copy_(1, self.head_ids, logits)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def _ffn(self, li: int, h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, g: int) -> torch.Tensor:
        """SwiGLU over resident weights (the offloaded backend streams them instead)."""
        return _linear(swiglu(_linear(h, gate_up), g), down)

    def _attention(self, q, k, v, mask):
        """Scaled dot-product attention, q [B, heads, W, D] over k, v [B, kv_heads, S, D]. The query heads
        that share a KV head are stacked as extra queries of one fused-kernel call (GQA packing: query
        head h reads KV head h // group, as HF's repeat_kv has it), so `mask` is [B, 1, group * W, S],
        stacked the same way. Measured here (torch 2.13, bf16): at 32 rows x 300 keys, 0.57 ms a layer for
        2 queries per row against 1.4 ms with enable_gqa."""
        b, heads, width, dim = q.shape
        group = heads // self.n_kv
        if group > 1:
            q = q.reshape(b, self.n_kv, group * width, dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.reshape(b, heads, width, dim)  # CUDA's kernels may return it strided: no view then

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


# The native attention kernel (one online softmax per query, its own K and V reads) beats torch's SDPA
# for decode steps and short verifies and loses on wide ones. SmolLM2 bf16 passes over 256 cached tokens
# here, SDPA vs native (before its vectorised exp), ms: 1 row x 1 token 25.4 vs 20.5; 1 x 4 31.8 vs 28.3;
# 8 x 1 47.9 vs 37.1; 8 x 4 83.3 vs 82.9; 16 x 3 111.2 vs 108.8; 1 x 16 53.9 vs 58.8.
NATIVE_ATTENTION_WIDTH = 4


class _Group:
    """Rows of one pass with the same number of new tokens w: attention over them needs no padding.

    Keys are read a whole block at a time (the pool viewed as [blocks, block_size, ...], indexed by the
    rows' block tables): a gather of 16-token chunks, not of single positions. Position-wise it cost
    31 ms of a 57 ms pass at 16 rows x 310 keys here. Positions past a row's end in its last block hold
    stale values and are masked."""

    def __init__(self, cache, rows, starts, lengths, offsets, trees, members, dev, stack: int,
                 span_blocks: int | None = None):
        """stack: query heads per KV head; the mask is repeated for them here, once a pass, not a layer.
        span_blocks: a fixed number of blocks a row (a CUDA graph's shape), gathered whatever the rows."""
        w, bs = lengths[members[0]], cache.block_size
        self.size, self.width = len(members), w
        blocks = [-(-(starts[i] + w) // bs) for i in members]
        nb = max(blocks) if span_blocks is None else span_blocks
        self.span = nb * bs
        self.tokens = torch.cat([torch.arange(offsets[i], offsets[i] + w) for i in members]).to(dev)
        tables = torch.tensor([cache.tables[rows[i].slot][:n] + [0] * (nb - n) for i, n in zip(members, blocks)])
        # One row whose blocks lie in order in the pool (the usual single-stream case): a slice, not a gather.
        contiguous = (span_blocks is None and len(members) == 1
                      and bool((tables[0] == tables[0, 0] + torch.arange(nb)).all()))
        self.first = int(tables[0, 0]) * bs if contiguous else None
        self.tables = tables.reshape(-1).to(dev)
        key_pos = torch.arange(self.span).view(1, 1, -1)
        start = torch.tensor([starts[i] for i in members]).view(-1, 1, 1)
        ancestor = torch.stack([trees[i][1] if trees[i] is not None else torch.ones(w, w, dtype=torch.bool).tril()
                                for i in members])  # [g, w, w]
        written = key_pos - start  # new-token index of each key, per row
        in_block = (written >= 0) & (written < w)
        allowed = (key_pos < start) | (in_block & ancestor.gather(2, written.clamp(0, w - 1).expand(-1, w, -1)))
        self.mask = allowed.unsqueeze(1).repeat(1, 1, stack, 1).to(dev)  # [g, 1, stack * w, span]

    def attend(self, backend, q, keys, values):
        """q: [g * w, heads, D] -> [g, w, heads, D]."""
        g, w, span, kv, d = self.size, self.width, self.span, backend.n_kv, backend.head_dim
        if w <= NATIVE_ATTENTION_WIDTH:  # reads the pool in place; None where the kernel does not take it
            out = native.attention(q, keys, values, self.tables, self.mask, g, w, d ** -0.5)
            if out is not None:
                return out.view(g, w, -1, d)
        if self.first is not None:
            kk, vv = keys[self.first:self.first + span].unsqueeze(0), values[self.first:self.first + span].unsqueeze(0)
        else:
            # index_select copies whole blocks (a memcpy each); advanced indexing ran 4x slower here.
            bs = span // (len(self.tables) // g)
            kk = keys.view(-1, bs, kv, d).index_select(0, self.tables).view(g, span, kv, d)
            vv = values.view(-1, bs, kv, d).index_select(0, self.tables).view(g, span, kv, d)
        out = backend._attention(q.view(g, w, -1, d).transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), self.mask)
        return out.transpose(1, 2)


SMALL_BATCH = 12  # "few" tokens: up to this many, a weight-major product may beat F.linear
# "many": 13 to this many (16 streams' decode step). The native products still beat F.linear there on the
# AVX-512 machine (all of SmolLM2's products at 16 tokens 25.9 vs 31.0 ms; even at 24, behind from 32).
MANY_BATCH = 24

# How x [N, in] @ w[out, in]^T is computed, per dtype, for one token, a few and many: the fastest kernel
# differs by machine. On an AMX CPU (torch 2.13, 2 threads, bf16) weight-major products streamed the
# weights faster: SmolLM2's layers took 12 ms with mv at N = 1 and 13-15 ms with mm(w, x^T) at N = 2..12,
# against 18 ms with F.linear. On an AVX-512 CPU without AMX the same choice was 1.34x slower than
# F.linear (39 vs 29 ms a decode pass), mv being the slowest kernel there. So each process times the
# candidates on its model's own weights once per dtype (tune_products) and keeps the fastest. In bf16 on
# a CPU with AVX512-BF16 the candidates include a native loop (cluster/models/native.py): on the AVX-512
# machine it read SmolLM2's weights 1.3-1.9x faster than F.linear at 1-12 tokens.
PRODUCTS = {
    "linear": lambda x, w: F.linear(x, w),
    "mv": lambda x, w: torch.mv(w, x[0]).unsqueeze(0),
    "mm_wxT": lambda x, w: torch.mm(w, x.t().contiguous()).t().contiguous(),
    "native": native.product,
}
CANDIDATES = {"one": ("linear", "mv", "mm_wxT", "native"), "few": ("linear", "mm_wxT", "native"),
              "many": ("linear", "native")}
SIZES = (("one", 1), ("few", 4), ("many", 16))  # each size's kernel is timed at this many tokens
_PLAN: dict[tuple[torch.dtype, str], dict[str, str]] = {}  # (dtype, device type) -> {size: kernel name}


def tune_products(weights: list[torch.Tensor], rounds: int = 5) -> dict[str, str]:
    """The fastest product for one token, a few (4) and many (16), timed on `weights` (one layer's matrices
    and the LM head: what a pass multiplies), best of `rounds`, candidates interleaved. Once per dtype and
    device type in a process; on a GPU F.linear everywhere (one cuBLAS call; graphs capture it)."""
    import logging
    import time

    w0 = weights[0]
    key = (w0.dtype, w0.device.type)
    if key in _PLAN:
        return _PLAN[key]
    if w0.device.type != "cpu":
        _PLAN[key] = {size: "linear" for size, _ in SIZES}
        return _PLAN[key]
    plan = {}
    with torch.inference_mode():
        for size, n in SIZES:
            xs = [torch.randn(n, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
            candidates = [name for name in CANDIDATES[size]
                          if name != "native" or (native.products() is not None and native.covers(xs[0], w0))]
            best = {name: float("inf") for name in candidates}
            for _ in range(rounds):
                for name in candidates:
                    product = PRODUCTS[name]
                    start = time.perf_counter()
                    for x, w in zip(xs, weights):
                        product(x, w)
                    best[name] = min(best[name], time.perf_counter() - start)
            fastest = min(best, key=best.get)  # F.linear unless another is clearly faster (timings are noisy)
            plan[size] = fastest if best[fastest] < 0.95 * best["linear"] else "linear"
            plan[f"{size}_us"] = {name: round(1e6 * s, 1) for name, s in best.items()}
    logging.getLogger(__name__).info("products for %s on %s: %s", w0.dtype, w0.device.type, plan)
    _PLAN[key] = plan
    return plan


def _linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ w[out, in]^T (+ b), by the tuned kernel for N (F.linear where none was tuned). A quantized
    weight (a compressed copy's: cluster/models/quantized.py) runs its own kernel."""
    if not isinstance(w, torch.Tensor):
        y = w(x)
        return y if b is None else y + b
    n = x.shape[0]
    # A bias goes inside the product, rounded once. Added after, in bf16, Qwen2's large q/k biases
    # rounded the keys twice: a verify pass of 2-12 tokens then changed an argmax with a 1.3-logit margin
    # (benchmarks/offload.py, measured). F.linear fuses it and, at Qwen2's shapes (1536 in, 256-1536
    # out, 2 threads), beats addmv / addmm (98 vs 132 us at 1 token, 94 vs 155 at 4; the bf16 addmv and
    # addmm kernels are the slow ones), so biased products take it at every size.
    if b is not None or n > MANY_BATCH:
        return F.linear(x, w, b)
    plan = _PLAN.get((x.dtype, x.device.type))
    if plan is None:
        return F.linear(x, w)
    return PRODUCTS[plan["one" if n == 1 else "few" if n <= SMALL_BATCH else "many"]](x, w)


def swiglu(gate_up: torch.Tensor, g: int) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up product's rows [N, 2 g] (gate first): one native call in bf16
    where it is built, else torch's two ops, rounded alike."""
    y = native.silu_mul(gate_up) if gate_up.shape[1] == 2 * g else None
    return y if y is not None else F.silu(gate_up[:, :g]) * gate_up[:, g:]


def _padded(x: torch.Tensor, index: torch.Tensor | None, b: int, width: int) -> torch.Tensor:
    """Packed rows [N, ...] -> [B, T, ...], zeros at padding (index: flat position of each packed row)."""
    if index is None:
        return x.view(b, width, *x.shape[1:])
    out = x.new_zeros(b * width, *x.shape[1:])
    out[index] = x
    return out.view(b, width, *x.shape[1:])


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

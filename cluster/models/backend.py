"""Model backends: what workers run a model through.

A backend owns a model and its KV cache slots, and offers three operations:
  forward(rows)            one batched pass; each row extends its own slot by its new tokens, which may
                           form a tree (a verify pass over a token-tree proposal); `skip` leaves a row's
                           first new tokens without logits (a prompt fed with a proposal);
  commit(slot, start, keep) keep some of the tokens a pass wrote (rejected ones are dropped: a counter
                           move for a chain, a small copy for a tree path);
  cost(rows, tokens)       the seconds a pass of that shape takes, from a curve measured at start.
`HFBackend` runs Hugging Face eager models; fast and offloaded backends plug in behind the same calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.core.cost_model import CostCurve
from cluster.models.kv_cache import SlotKVCache


@dataclass
class Row:
    """One row of a pass: `tokens` extend `slot`. parents[j] is the index (within tokens) of token j's
    parent, -1 for the slot's last cached token; None means a chain."""

    slot: int
    tokens: list[int]
    parents: list[int] | None = None


@dataclass
class PassOutput:
    """A pass's logits, as the backend made them: `flat` [N, V] float32 holds the logits of the positions
    in `index` (each one's flat place row * T + j in the padded [B, T] grid); index None means flat is
    the whole grid. With last_only, flat is [B, V] (each row's last token) and shape None."""

    flat: torch.Tensor
    shape: tuple[int, int] | None = None  # (B, T_max) of the padded grid
    index: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [B, T_max, H] last hidden states, when asked

    @property
    def logits(self) -> torch.Tensor:
        """[B, T_max, V] (zeros at padding), or [B, V] with last_only."""
        if self.shape is None:
            return self.flat
        if self.index is None:
            return self.flat.view(*self.shape, -1)
        out = self.flat.new_zeros(self.shape[0] * self.shape[1], self.flat.shape[-1])
        out[self.index] = self.flat
        return out.view(*self.shape, -1)

    def argmax(self) -> torch.Tensor:
        """[B, T_max] argmax token at every position (0 at padding), without building the padded logits."""
        if self.shape is None or self.index is None:
            return self.flat.argmax(-1).view(*(self.shape or (-1,)))
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.long, device=self.flat.device)
        out[self.index] = self.flat.argmax(-1)
        return out.view(*self.shape)


class HFBackend:
    """A Hugging Face causal LM, eager, over ragged batches with tree masks and slot KV caches."""

    name = "hf-eager"
    verifies_trees = True  # forward takes token trees (a tree attention mask); MEGABYTE's backend does not

    def __init__(self, model: torch.nn.Module, num_slots: int, capacity: int):
        self.model = model
        self.base = model.base_model  # the transformer without its LM head
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.cache = SlotKVCache(num_slots, capacity)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.curve: CostCurve | None = None

    @property
    def vocab_size(self) -> int:
        return getattr(self.head, "out_features", None) or self.head.weight.shape[0]

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # --- the three operations ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, rows: list[Row], last_only: bool = False, hidden: bool = False,
                skip: list[int] | None = None) -> PassOutput:
        """skip[i]: row i's first new tokens whose logits (and hidden states) the output leaves out."""
        lengths = [len(r.tokens) for r in rows]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one new token")
        check_skip(lengths, skip)
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lengths[i]] = torch.tensor(r.tokens)
        slots = [r.slot for r in rows]
        view = self.cache.batch_view(slots, width)
        starts = torch.tensor(view.starts)
        depth = torch.arange(width).repeat(len(rows), 1)  # position offset of each new token (chain: its index)
        ancestor = torch.ones(len(rows), width, width, dtype=torch.bool).tril()  # chain: every earlier token
        for i, r in enumerate(rows):
            if r.parents is not None:
                depth[i, : lengths[i]], ancestor[i, : lengths[i], : lengths[i]] = _tree(r.parents)
        positions = starts.unsqueeze(-1) + depth  # [B, T]
        key_pos = torch.arange(view.span)
        allowed = key_pos.view(1, 1, -1) < starts.view(-1, 1, 1)  # the cached prefix
        written = key_pos.view(1, 1, -1) - starts.view(-1, 1, 1)  # new-token index of each key, per row
        in_block = (written >= 0) & (written < width)
        allowed = allowed | (in_block & ancestor.gather(2, written.clamp(0, width - 1).expand(-1, width, -1)))
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.base(
            input_ids=ids.to(self.device),
            attention_mask=mask.unsqueeze(1).to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=view,
            use_cache=True,
        ).last_hidden_state
        for slot, n in zip(slots, lengths):
            self.cache.lengths[slot] += n
        if last_only:
            out = out[torch.arange(len(rows)), torch.tensor(lengths) - 1]
        elif skip is not None:  # each row's kept positions moved to the front of a narrower grid
            lengths = [n - s for n, s in zip(lengths, skip)]
            width = max(lengths)
            kept = out.new_zeros(len(rows), width, out.shape[-1])
            for i, (s, n) in enumerate(zip(skip, lengths)):
                kept[i, :n] = out[i, s:s + n]
            out = kept
        logits = self.head(out).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if last_only:
            return PassOutput(logits, hidden=out if hidden else None)
        return PassOutput(logits.view(len(rows) * width, -1), (len(rows), width), hidden=out if hidden else None)

    @torch.inference_mode()
    def commit(self, slot: int, start: int, keep: list[int]) -> None:
        """Keep the new tokens at indices `keep` (in order) of the pass that wrote from `start`: their K/V
        move to start, start+1, ... (nothing moves for a chain's prefix) and the slot ends after them."""
        if keep != list(range(len(keep))):
            src = torch.tensor([start + k for k in keep])
            dst = torch.arange(start, start + len(keep))
            for buffers in (self.cache.keys, self.cache.values):
                for layer in buffers:
                    layer[slot, :, dst] = layer[slot, :, src]
        self.cache.truncate(slot, start + len(keep))

    def cost(self, rows: int, tokens: int, kv: int = 0) -> float:
        """Predicted seconds of a pass of `rows` rows carrying `tokens` new tokens in all, attending over
        `kv` keys in all."""
        if self.curve is None:
            self.calibrate()
        return self.curve(rows, tokens, kv)

    # --- measuring the cost curve ------------------------------------------------------------------
    def calibrate(self) -> CostCurve:
        self.curve = measure_cost_curve(self, self._stale_context)
        return self.curve

    def _stale_context(self, slot: int, context: int) -> None:
        """Attend over a realistic prefix of stale values: only the shape matters to a timing."""
        self.cache.truncate(slot, 0)
        self.cache.reserve(slot, context)
        self.cache.lengths[slot] = context


def check_skip(lengths: list[int], skip: list[int] | None) -> None:
    if skip is not None and (len(skip) != len(lengths) or any(not 0 <= s < n for s, n in zip(skip, lengths))):
        raise ValueError(f"skip {skip}: each row keeps at least its last new token ({lengths})")


def measure_cost_curve(backend, set_context, contexts: tuple[int, ...] = (64, 512), repeats: int = 3,
                       row_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> CostCurve:
    """Time passes on a grid of (rows, tokens per row, cached context) over scratch slots and fit the curve
    (the engine refits it from real passes as it runs). set_context(slot, n) gives a scratch slot n cached
    positions, however the backend does that."""
    rows_grid = sorted({r for r in row_grid if r <= backend.cache.num_free} or {1})
    slots = [backend.cache.allocate() for _ in range(max(rows_grid))]
    samples = []
    try:
        for context in contexts:
            if context + 8 > backend.cache.capacity:
                continue
            for rows in rows_grid:
                for per_row in (1, 2, 4, 8):
                    times = []
                    for _ in range(repeats + 1):  # the first run warms up
                        for s in slots[:rows]:
                            set_context(s, context)
                        start = time.perf_counter()
                        backend.forward([Row(s, [0] * per_row) for s in slots[:rows]])
                        times.append(time.perf_counter() - start)
                    tokens = rows * per_row
                    samples.append((rows, tokens, rows * context + tokens, sorted(times[1:])[len(times[1:]) // 2]))
    finally:
        for s in slots:
            backend.cache.free(s)
    return CostCurve.fit(samples)


def _tree(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of each new token (0 for children of the cached prefix) and its ancestor-or-self matrix."""
    n = len(parents)
    depth = torch.zeros(n, dtype=torch.long)
    ancestor = torch.eye(n, dtype=torch.bool)
    for j, p in enumerate(parents):
        if p >= 0:
            if p >= j:
                raise ValueError("tree rows: a token's parent must come before it")
            depth[j] = depth[p] + 1
            ancestor[j] |= ancestor[p]
    return depth, ancestor

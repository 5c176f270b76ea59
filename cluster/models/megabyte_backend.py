"""MEGABYTE behind the ModelBackend calls, so the whole engine (speculation, sampling rules, streaming,
front doors) runs it as it runs any target.

Per slot: the bytes so far, the global model's keys/values over the patches fed (the start position and
every complete patch), and the conditioning each fed position produced for the patch after it. A pass
over new bytes feeds the patches they complete to the global model, in one call per row, and runs the
local model teacher-forced over every patch that holds a predicted byte, all rows' patches in one call.
So plain decoding runs the global model once per patch; a verify pass over K drafted bytes (a chain:
byte drafters such as prompt lookup) runs it once over the drafted patches and the local model once over
all drafted positions: MEGABYTE's speculative patches. Rolling back is a length: the global cache keeps
the complete patches below it, and the local model's inputs are recomputed from the bytes (at most P).

Hidden states, when asked, are what the local tier needs to draft: at the position that predicts byte u,
the conditioning [P * D_local] of the patch holding byte u + 1, when that patch is the same as u's (its
conditioning is known); NaN when byte u ends its patch (the next patch needs byte u fed to the global
model first). Two tiers are this backend on the target tier with the local model drafting a patch's
remaining bytes on the draft tier (cluster/drafters/megabyte_local.py): two actor calls per patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.core.cost_model import CostCurve
from cluster.models.backend import PassOutput, Row, check_skip, measure_cost_curve
from cluster.models.kv_cache import SlotKVCache
from cluster.models.megabyte import MegabyteForCausalLM


@dataclass
class _Slot:
    bytes: list[int] = field(default_factory=list)  # valid up to the cache length
    fed: int = 0  # global positions in `past` (start + complete patches)
    past: list | None = None  # per global layer: (k, v) [1, heads, fed, hd]
    conds: list = field(default_factory=list)  # conds[k]: [P, D_local], the conditioning of patch k


class MegabyteBackend:
    name = "megabyte"
    verifies_trees = False  # the target worker checks a tree's first branch (a suffix drafter's trees still help)

    def __init__(self, model: MegabyteForCausalLM, num_slots: int, capacity: int):
        self.model = model
        self.config = model.config
        self.cache = SlotKVCache(num_slots, min(capacity, self.config.max_position_embeddings))
        self.slots = [_Slot() for _ in range(num_slots)]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.head = model.get_output_embeddings()
        self.curve: CostCurve | None = None

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def _valid(self, slot: int) -> _Slot:
        """The slot's state cut to its cache length (a rollback only lowers the length)."""
        state, length, p = self.slots[slot], self.cache.lengths[slot], self.config.patch_size
        del state.bytes[length:]
        keep = min(state.fed, 1 + length // p)
        if keep < state.fed:
            state.fed = keep
            state.past = [(k[:, :, :keep], v[:, :, :keep]) for k, v in state.past] if keep else None
            del state.conds[keep:]
        return state

    @torch.inference_mode()
    def forward(self, rows: list[Row], last_only: bool = False, hidden: bool = False,
                skip: list[int] | None = None) -> PassOutput:
        if any(r.parents is not None for r in rows):
            raise ValueError("the MEGABYTE backend verifies chains only (use a chain drafter: ngram)")
        lengths = [len(r.tokens) for r in rows]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one new token")
        check_skip(lengths, skip)
        p, dev = self.config.patch_size, self.device
        wanted = []  # per row: (patch index in the local batch, position in patch) of each new token's prediction
        local_cond, local_prev, pairs, row_hidden = [], [], {}, []
        for r in rows:
            state = self._valid(r.slot)
            start = len(state.bytes)
            if start + len(r.tokens) > self.cache.capacity:
                raise ValueError(f"KV cache overflow: {start + len(r.tokens)} bytes > capacity {self.cache.capacity}")
            state.bytes.extend(r.tokens)
            end = len(state.bytes)
            self._feed_global(state, 1 + end // p)
            row_wanted = []
            if hidden:
                row_hidden.append([self._open_cond(state, u) for u in range(start + 1, end + 1)])
            for u in range(start + 1, end + 1):  # the token at u - 1 predicts byte u
                k, j = divmod(u, p)
                key = (r.slot, k)
                if key not in pairs:
                    pairs[key] = len(local_cond)
                    local_cond.append(state.conds[k])
                    before = state.bytes[k * p: k * p + p - 1]
                    prev = [self.config.vocab_size] + before + [self.config.pad_token_id] * (p - 1 - len(before))
                    local_prev.append(prev)
                row_wanted.append((pairs[key], j))
            wanted.append(row_wanted)
            self.cache.lengths[r.slot] = end
        logits = self.model.local_logits(torch.stack(local_cond), torch.tensor(local_prev, device=dev))  # [N, P, V]
        if last_only:
            index = [w[-1] for w in wanted]
            flat = logits[torch.tensor([i for i, _ in index]), torch.tensor([j for _, j in index])]
            return PassOutput(flat.float(), hidden=torch.stack([h[-1] for h in row_hidden]) if hidden else None)
        if skip is not None:  # each row's first skip[i] predictions left out
            wanted = [w[s:] for w, s in zip(wanted, skip)]
            row_hidden = [h[s:] for h, s in zip(row_hidden, skip)] if hidden else row_hidden
            lengths = [n - s for n, s in zip(lengths, skip)]
        b, width = len(rows), max(lengths)
        pick = [x for w in wanted for x in w]
        flat = logits[torch.tensor([i for i, _ in pick]), torch.tensor([j for _, j in pick])].float()
        pad_index = None
        if min(lengths) != width:
            pad_index = torch.tensor([i * width + j for i, n in enumerate(lengths) for j in range(n)], device=dev)
        padded_hidden = None
        if hidden:
            blank = torch.full_like(row_hidden[0][0], float("nan"))
            padded_hidden = torch.stack([torch.stack(h + [blank] * (width - len(h))) for h in row_hidden])
        return PassOutput(flat, (b, width), pad_index, padded_hidden)

    def _open_cond(self, state: _Slot, u: int) -> torch.Tensor:
        """The conditioning of byte u + 1's patch, flattened, if it is byte u's patch too; else NaN."""
        p = self.config.patch_size
        if (u + 1) % p == 0:
            return torch.full((p * self.config.local_dim,), float("nan"), device=self.device)
        return state.conds[u // p].reshape(-1)

    def _feed_global(self, state: _Slot, needed: int) -> None:
        """Feed global positions state.fed .. needed - 1 (the start, then complete patches)."""
        if state.fed >= needed:
            return
        p = self.config.patch_size
        first_patch = max(state.fed - 1, 0)  # global position g > 0 carries patch g - 1
        patches = torch.tensor(state.bytes[first_patch * p: (needed - 1) * p], device=self.device).view(1, -1, p)
        cond, present = self.model.global_step(patches, state.fed, state.past, start=state.fed == 0)
        state.past, state.fed = present, needed
        state.conds.extend(cond[0].unbind(0))

    def commit(self, slot: int, start: int, keep: list[int]) -> None:
        if keep != list(range(len(keep))):
            raise ValueError("the MEGABYTE backend keeps chain prefixes only")
        self.cache.truncate(slot, start + len(keep))

    def cost(self, rows: int, tokens: int, kv: int = 0) -> float:
        if self.curve is None:
            self.calibrate()
        return self.curve(rows, tokens, kv)

    def calibrate(self) -> CostCurve:
        self.curve = measure_cost_curve(self, self._context, row_grid=(1, 2, 4, 8, 16))
        return self.curve

    def _context(self, slot: int, context: int) -> None:
        """Real bytes in a scratch slot (the global cache must hold what it claims): rolled back to
        `context` after a timed pass, filled once."""
        if self.cache.lengths[slot] >= context:
            self.cache.truncate(slot, context)
        else:
            self.cache.truncate(slot, 0)
            self.forward([Row(slot, [3 + (i % 200) for i in range(context)])], last_only=True)

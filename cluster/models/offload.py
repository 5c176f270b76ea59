"""A target larger than its DRAM budget ("LLM in a flash", exact): FFN weights stay in a flash bundle on
storage and stream through DRAM one layer at a time; a cache of hot neurons stays resident.

- `OffloadedBackend` is the dense target. Embeddings, norms and attention are resident; for each layer
  the neurons not in the cache are read (long aligned reads, on a thread, one layer ahead of compute)
  into a staging buffer that mirrors the layer's block, the cached rows are copied in beside them, and
  the FFN runs dense over all of them. Its logits are the in-memory model's, whatever the cache holds.
  Between passes (while the draft runs) both staging buffers are free, so the next pass's first two
  layers are read then.
- `NeuronCache` holds, per layer, the `capacity` neuron rows with the highest score: the calibration
  hotness at start, then an exponential window over the |activations| of the tokens each pass verified
  (the paper's sliding window; the rows are copied from the staging buffer, never read twice).
- `SparseDraftBackend` is the draft: the same resident weights (shared, no copy), its FFN over the cached
  neurons only. It reads nothing from storage, and it is only a draft: the dense target verifies.
  With `cluster.pipelining: continue` it drafts on a thread while the target streams its weights (the CPU
  is mostly idle then); a hot-neuron draft may then read a layer whose rows the verify is swapping, which
  costs acceptance, never output.

The budget: resident tensors (with a small cache of embedding rows) + two staging buffers + the cache
<= `memory_budget_gb`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.core.cost_model import CostCurve
from cluster.models import int4
from cluster.models.backend import Row
from cluster.models.flash_store import BundleLayout, EmbeddingRows, FlashReader, SlowDisk, aligned_buffer, runs
from cluster.models.lean import LeanBackend

log = logging.getLogger(__name__)


WINDOW_DECAY = 0.9  # a sparse draft's cache: a neuron's score keeps 0.9 of itself per pass (~10 passes)
EMBED_CACHE_ROWS = 4096  # input embedding rows kept in DRAM (12.6 MB for Qwen2.5-Coder-1.5B), in the budget


class NeuronCache:
    """Per layer: `ids` (bundle row ids held, one per cache slot), `rows` [capacity, 3, H] their weights,
    and `score` [I] the ranking that decides membership."""

    def __init__(self, layout: BundleLayout, capacity: int, hotness: list[torch.Tensor], decay: float = 1.0):
        self.layout, self.capacity, self.decay = layout, capacity, decay
        dtype, h, inter = layout.torch_dtype, layout.hidden, layout.intermediate
        self.rows = [torch.empty(capacity, 3, h, dtype=dtype) for _ in range(layout.layers)]
        # Scores on one scale per layer (mean |activation|); the prior only orders the cold start.
        self.score = [hot.float().clone() for hot in hotness]
        self.ids = [torch.arange(capacity) for _ in range(layout.layers)]  # hottest first (bundle order)
        self.cached = [torch.zeros(inter, dtype=torch.bool) for _ in range(layout.layers)]
        for c in self.cached:
            c[:capacity] = True
        self.filled = [False] * layout.layers  # rows hold real weights once a pass has streamed the layer
        self.swaps = 0

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows)

    def shrink(self, capacity: int) -> None:
        """Keep the first `capacity` slots (the hottest, for a cache that has not swapped yet) and free the rest."""
        if capacity >= self.capacity:
            return
        self.capacity = capacity
        self.rows = [r[:capacity].clone() for r in self.rows]
        self.ids = [i[:capacity].clone() for i in self.ids]
        for cached, ids in zip(self.cached, self.ids):
            cached.zero_()
            cached[ids] = True

    def missing(self, layer: int) -> torch.Tensor:
        """Sorted ids a dense pass must read for this layer (everything before its first pass)."""
        if not self.filled[layer]:
            return torch.arange(self.layout.intermediate)
        return (~self.cached[layer]).nonzero().flatten()

    def fill_into(self, layer: int, full: torch.Tensor, only: torch.Tensor | None = None) -> None:
        """Copy the cached rows into a layer buffer whose other rows were read from storage; with `only`
        ([I] bool), just the cached rows among those neurons."""
        if not (self.filled[layer] and self.capacity):
            return
        ids, rows = self.ids[layer], self.rows[layer]
        if only is not None:
            slots = only[ids].nonzero().flatten()
            ids, rows = ids[slots], rows[slots]
        full.index_copy_(0, ids, rows)

    def observe(self, layer: int, act: torch.Tensor, full: torch.Tensor) -> None:
        """After a dense pass over `full` (the whole layer, [I, 3, H]) whose activations were `act` [N, I]:
        fold the pass's mean |activation| per neuron into the window score, and swap in the neurons that
        now rank in the top `capacity`."""
        if not self.capacity:
            return
        if not self.filled[layer]:
            self.rows[layer].copy_(full.index_select(0, self.ids[layer]))
            self.filled[layer] = True
        if self.decay == 1.0:  # a fixed hot set: nothing to score
            return
        score = self.score[layer].mul_(self.decay).add_(act.abs().mean(0).float(), alpha=1 - self.decay)
        top = torch.topk(score, self.capacity, sorted=False).indices
        want = torch.zeros_like(self.cached[layer])
        want[top] = True
        entering = (want & ~self.cached[layer]).nonzero().flatten()
        if len(entering) == 0:
            return
        leaving_slots = (~want[self.ids[layer]]).nonzero().flatten()[: len(entering)]
        self.rows[layer][leaving_slots] = full.index_select(0, entering)
        self.ids[layer][leaving_slots] = entering
        self.cached[layer] = want
        self.swaps += len(entering)


class OffloadedBackend(LeanBackend):
    """The dense target with its FFN streamed from a flash bundle (see the module docstring)."""

    name = "offload"

    def __init__(self, model: torch.nn.Module, num_slots: int, capacity: int, bundle: Path,
                 memory_budget_gb: float, prefetch: bool = True, direct: bool | None = None,
                 cache_neurons: int | None = None, window_decay: float = 1.0,
                 embed_cache_rows: int = EMBED_CACHE_ROWS):
        """cache_neurons: cache rows per layer (default: whatever the budget leaves); 0 with prefetch off
        is naive streaming, every layer's FFN read for every pass before it computes. window_decay: how much of
        a neuron's score survives a pass (1.0 keeps the calibration ranking: a fixed hot set).
        embed_cache_rows: recently used input embedding rows held in DRAM (an untied embedding on storage),
        counted with the resident weights."""
        super().__init__(model, num_slots, capacity)
        from safetensors.torch import load_file

        self.device = torch.device("cpu")  # the model's first parameter may be a streamed (meta) one
        self.bundle = Path(bundle)
        self.layout = layout = BundleLayout.load(self.bundle)
        if layout.layers != len(self.layers):
            raise ValueError(f"{bundle}: bundle has {layout.layers} layers, the model {len(self.layers)}")
        self.reader = FlashReader(self.bundle / "ffn.bin", layout, direct=direct)
        self.embed_rows = None
        if layout.embed_rows:
            self.embed_rows = EmbeddingRows(self.bundle / "embed.bin", layout, direct, embed_cache_rows)
        neurons = load_file(self.bundle / "neurons.safetensors")
        hotness = [neurons[f"layer.{i}.hotness"] for i in range(layout.layers)]
        # The head's rows stored most frequent token first (an untied head; see tools/bundle_ffn.py).
        self.vocab_order = neurons["vocab.order"].long() if "vocab.order" in neurons else None
        self.resident_bytes = resident_bytes(model) + (self.embed_rows.cache_bytes if self.embed_rows else 0)
        self.buffer_bytes = 2 * layout.layer_bytes
        budget = int(memory_budget_gb * 1e9)
        room = budget - self.resident_bytes - self.buffer_bytes
        if cache_neurons is None:
            if room < 0:
                raise ValueError(
                    f"memory_budget_gb {memory_budget_gb}: the resident weights ({self.resident_bytes / 1e9:.2f} GB) "
                    f"and two layer buffers ({self.buffer_bytes / 1e9:.2f} GB) need "
                    f"{(self.resident_bytes + self.buffer_bytes) / 1e9:.2f} GB")
            cache_neurons = min(layout.intermediate, room // (layout.layers * layout.row_bytes))
        self.budget_bytes = budget
        self.reserved_bytes = 0  # budget given to others in this process (see reserve)
        self.neurons = NeuronCache(layout, cache_neurons, hotness, window_decay)
        self._buffers = [aligned_buffer(layout.layer_bytes) for _ in range(2)]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flash-read") if prefetch else None
        # Reads started, in the order they will be used: (layer, read, buffer). A buffer is free when no read
        # and no layer's compute (`_computing`) holds it.
        self._ahead: deque[tuple[int, Future | None, torch.Tensor]] = deque()
        self._computing: torch.Tensor | None = None
        self.io_wait_s = 0.0  # time compute waited on storage
        self.passes = 0
        model._offload = self  # a sparse draft in this process finds the cache through the model
        log.info("offload backend: %s, budget %.2f GB = resident %.2f + buffers %.2f + cache %.2f GB "
                 "(%d of %d neurons per layer), %s reads", bundle, budget / 1e9, self.resident_bytes / 1e9,
                 self.buffer_bytes / 1e9, self.neurons.nbytes / 1e9, cache_neurons, layout.intermediate,
                 "O_DIRECT" if self.reader.direct else "fadvise(DONTNEED)")

    @property
    def held_bytes(self) -> int:
        """Weight bytes held in DRAM for this target and what shares its budget: what the budget bounds."""
        return self.resident_bytes + self.buffer_bytes + self.neurons.nbytes + self.reserved_bytes

    def reserve(self, nbytes: int, what: str) -> None:
        """Give `nbytes` of the budget to something else in this process (a quantized draft's weights): the
        neuron cache shrinks to what is left, and a budget that cannot hold it is a clear error."""
        lay = self.layout
        room = self.budget_bytes - self.resident_bytes - self.buffer_bytes - self.reserved_bytes - nbytes
        if room < 0:
            raise ValueError(f"memory_budget_gb {self.budget_bytes / 1e9:.2f}: {what} ({nbytes / 1e9:.2f} GB) does not "
                             f"fit beside the resident weights and buffers "
                             f"({(self.resident_bytes + self.buffer_bytes) / 1e9:.2f} GB)")
        self.reserved_bytes += nbytes
        self.neurons.shrink(min(self.neurons.capacity, room // (lay.layers * lay.row_bytes)))
        log.info("offload backend: %.2f GB of the budget to %s, the cache now %d neurons per layer (%.2f GB)",
                 nbytes / 1e9, what, self.neurons.capacity, self.neurons.nbytes / 1e9)

    def emulate_disk(self, disk: SlowDisk | None) -> None:
        """Read through an emulated slower device from now on (both files share its one queue); None: the real one."""
        self.settle()
        for reader in (self.reader, self.embed_rows):
            if reader is not None:
                reader.disk = disk

    def read_layer(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s whole FFN block [I, 3, H], read from storage into a staging buffer now (for a
        one-off use at load time; passes stream through `_layer`)."""
        self.settle()
        self._ahead.clear()  # what was read ahead is overwritten: the next pass reads it again
        lay = self.layout
        buf = self._buffers[0]
        self.reader.read_rows(layer, [(0, lay.intermediate)], buf)
        return self._block(buf)

    def _block(self, buf: torch.Tensor) -> torch.Tensor:
        """A staging buffer seen as the layer's block [I, 3, H] (row i: neuron i's gate row, up row, down column)."""
        lay = self.layout
        return buf[: lay.layer_bytes].view(lay.torch_dtype).view(lay.intermediate, 3, lay.hidden)

    # --- streaming -----------------------------------------------------------------------------------
    def _start_read(self, layer: int) -> None:
        """Read layer `layer`'s uncached rows into a free staging buffer (on the thread, with prefetch)."""
        held = [b for _, _, b in self._ahead] + [self._computing]
        buf = next(b for b in self._buffers if all(b is not h for h in held))
        spans = runs(self.neurons.missing(layer))
        if self._pool is None:
            self.reader.read_rows(layer, spans, buf)
            self._ahead.append((layer, None, buf))
        else:
            self._ahead.append((layer, self._pool.submit(self.reader.read_rows, layer, spans, buf), buf))

    def _read_ahead(self, after: int) -> None:
        """Fill the free buffers with the layers that follow `after` (wrapping into the next pass). The
        cache rows a read skips are fixed until that layer's own pass: only its `observe` changes them."""
        if self._pool is None:
            return
        nxt = self._ahead[-1][0] if self._ahead else after
        free = len(self._buffers) - len(self._ahead) - (self._computing is not None)
        for _ in range(free):
            nxt = (nxt + 1) % self.layout.layers
            if nxt == after and self._computing is not None or any(layer == nxt for layer, _, _ in self._ahead):
                return  # a model with fewer layers than buffers: each layer read once a pass
            self._start_read(nxt)

    def settle(self) -> None:
        """Wait for the reads in flight (the next pass's first layers), so byte counts are complete."""
        for _, future, _ in self._ahead:
            if future is not None:
                future.result()

    def _layer(self, li: int) -> torch.Tensor:
        """Layer li's full FFN block [I, 3, H] in a staging buffer, and the next read started."""
        self._computing = None  # the previous layer's compute is done with its buffer
        if not self._ahead or self._ahead[0][0] != li:
            self.settle()  # reads for other layers (a pass began elsewhere): let them land, then drop them
            self._ahead.clear()
            self._start_read(li)
        _, future, buf = self._ahead.popleft()
        if future is not None:
            start = time.perf_counter()
            future.result()
            self.io_wait_s += time.perf_counter() - start
        self._computing = buf
        self._read_ahead(li)
        full = self._block(buf)
        self.neurons.fill_into(li, full)
        return full

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return super()._embed(ids) if self.embed_rows is None else self.embed_rows(ids)

    def _head(self, out: torch.Tensor) -> torch.Tensor:
        logits = super()._head(out)
        if self.vocab_order is None:
            return logits
        return torch.empty_like(logits).index_copy_(1, self.vocab_order, logits)  # back in token-id order

    def _ffn(self, li, h, gate_up, down, g):
        full = self._layer(li)
        out, act = bundled_swiglu(h, full)
        self.neurons.observe(li, act, full)
        if li == self.layout.layers - 1:
            self.passes += 1
            self._computing = None  # the pass is done with its last buffer: read ahead into it while drafting
            self._read_ahead(li)
        return out

    def calibrate(self) -> CostCurve:
        """A few real passes (each one streams the model): one row of 1, 4, 8 and 16 new tokens."""
        slot = self.cache.allocate()
        samples = []
        try:
            for tokens in (1, 1, 4, 8, 16):
                self._stale_context(slot, 64)
                start = time.perf_counter()
                self.forward([Row(slot, [0] * tokens)])
                samples.append((1, tokens, 64 + tokens, time.perf_counter() - start))
        finally:
            self.cache.free(slot)
        self.curve = CostCurve.fit(samples[1:])  # the first warms up
        return self.curve

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.reader.close()


class Int4FFN:
    """Every layer's FFN as int4 copies (gate and up fused, down), cast from the bundle at load time: one
    read of the FFN, no training. Its bytes come out of the target's budget (the neuron cache shrinks)."""

    def __init__(self, target: OffloadedBackend, group: int = 32):
        lay = target.layout
        self.gate_up, self.down = [], []
        for li in range(lay.layers):
            full = target.read_layer(li)  # [I, 3, H]: gate row, up row, down column per neuron
            gate_up = full[:, :2].transpose(0, 1).reshape(2 * lay.intermediate, lay.hidden)
            self.gate_up.append(int4.quantize(gate_up, group))
            self.down.append(int4.quantize(full[:, 2].t(), group))
            if li == 0:  # every layer is the same size: claim the budget before casting the rest
                self.nbytes = lay.layers * (self.gate_up[0].nbytes + self.down[0].nbytes)
                target.reserve(self.nbytes, f"the int4 draft FFN (group {group})")

    def __call__(self, li: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[li](h).chunk(2, dim=-1)
        return self.down[li](F.silu(gate) * up)


class SparseDraftBackend(LeanBackend):
    """The offloaded target's resident weights with its FFN over the cached (hot) neurons only, or over an
    int4 copy of every neuron (`ffn="int4"`)."""

    name = "sparse-draft"

    def __init__(self, target: OffloadedBackend, num_slots: int, capacity: int, vocab: int = 0,
                 ffn: str = "hot", group: int = 32):
        """vocab: draft over the `vocab` most frequent tokens only (the first rows of a frequency-ordered
        head, no copy; 0 or a head in token order: all of them). Other tokens get -inf: never drafted.
        ffn: "hot" (the cached neurons in bf16; the cache becomes a sliding window over recent activations)
        or "int4" (every neuron, int4 with `group` inputs a scale; the cache stays a fixed hot set, which
        only saves the target's reads)."""
        super().__init__(target.model, num_slots, capacity)
        self.device = target.device
        self.neurons = target.neurons
        self.int4 = Int4FFN(target, group) if ffn == "int4" else None
        if self.int4 is None and self.neurons.decay == 1.0:
            self.neurons.decay = WINDOW_DECAY
        self._embed = target._embed  # the same rows, resident or read on demand
        order = target.vocab_order
        self.vocab = vocab if order is not None and 0 < vocab < len(order) else 0
        if order is not None:  # the head's rows are stored in `order`: a prefix of them, no copy
            n = self.vocab or len(order)
            self.restrict_head(order[:n], self.head.weight[:n])

    def _ffn(self, li, h, gate_up, down, g):
        if self.int4 is not None:
            return self.int4(li, h)
        rows = self.neurons.rows[li]
        if not self.neurons.filled[li] or len(rows) == 0:
            return torch.zeros_like(h)  # nothing cached yet: the layer's FFN contributes nothing to the draft
        return bundled_swiglu(h, rows)[0]


def bundled_swiglu(h: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU over bundled neuron rows [n, 3, H] (gate row, up row, down column): (output [N, H], the
    activations [N, n])."""
    act = F.silu(F.linear(h, rows[:, 0])) * F.linear(h, rows[:, 1])
    return act @ rows[:, 2], act


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's real (non-meta) tensors, shared ones counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def load_skeleton(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model with its resident tensors loaded and its FFN weights left on the meta device (no memory):
    the config comes from `from_pretrained` on the bundle directory, the weights from resident.safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    state = {k: v.to(dtype) for k, v in load_file(path / "resident.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path}/resident.safetensors: tensors the model does not have: {unexpected[:4]}")
    streamed = (".mlp.", "lm_head") + (("embed_tokens",) if (path / "embed.bin").is_file() else ())
    unexplained = [k for k in missing if not any(s in k for s in streamed)]
    if unexplained:
        raise ValueError(f"{path}/resident.safetensors: missing {unexplained[:4]}")
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    elif model.lm_head.weight.device.type == "meta":
        raise ValueError(f"{path}: untied lm_head missing from resident.safetensors")
    with torch.device("cpu"):  # its inverse frequencies are computed, not loaded
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type == "meta" and not any(s in k for s in streamed)]
    if left:
        raise ValueError(f"{path}: tensors neither resident nor streamed: {left[:4]}")
    return model.eval()

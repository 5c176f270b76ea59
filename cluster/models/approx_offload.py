"""The paper's own inference ("LLM in a flash", sections 3.1-3.2), for measurement only: each layer's FFN
runs over the neurons a low-rank predictor calls active for the pass's tokens, and of those only the ones
the DRAM cache lacks are read from storage. A SwiGLU neuron is never exactly zero, so this changes the
output. It is never served (no config selects it): `benchmarks/offload.py --modes offload_sparse` runs it
to put the paper's "offload alone" figure beside the exact backend's, with its agreement with the dense
model counted.

Reads are synchronous: which rows a layer needs is known only once its input is. The cache is the fixed
hot set (the bundle's first rows), filled by each layer's first pass, which reads the whole layer.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cluster.models.flash_store import runs
from cluster.models.offload import OffloadedBackend, bundled_swiglu


class ApproximateOffloadedBackend(OffloadedBackend):
    """The offloaded target with its FFN cut to predicted-active neurons (see the module docstring)."""

    name = "offload-approximate"

    def __init__(self, model: torch.nn.Module, num_slots: int, capacity: int, bundle: Path,
                 memory_budget_gb: float, density: float, merge_bytes: int | None = None):
        """density: the fraction of each layer's neurons kept per token (a pass keeps the union over its
        tokens). merge_bytes: read through gaps up to this size rather than issue another request (the
        device's latency x bandwidth is where that breaks even)."""
        if not 0 < density <= 1:
            raise ValueError(f"density {density}: must lie in (0, 1]")
        super().__init__(model, num_slots, capacity, bundle, memory_budget_gb, prefetch=False)
        path = self.bundle / "predictors.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no predictors; train them with "
                                    f"python -m tools.train_predictors <dense model> {self.bundle}")
        weights = load_file(path)
        dtype = self.layout.torch_dtype
        self.predictors = [(weights[f"layer.{i}.a"].to(dtype), weights[f"layer.{i}.b"].to(dtype))
                           for i in range(self.layout.layers)]
        self.reserve(sum(a.nbytes + b.nbytes for a, b in self.predictors), "the neuron predictors")
        self.density = density
        if merge_bytes is not None:
            self.reader.merge_bytes = merge_bytes
        self.kept_neurons = 0  # summed over layers and passes: the density a pass actually ran at
        self.layer_passes = 0

    def active(self, li: int, h: torch.Tensor) -> torch.Tensor:
        """[I] bool: the union over the pass's tokens (h [N, H]) of each one's top-`density` predicted neurons
        (bundle order)."""
        a, b = self.predictors[li]
        score = (h @ a) @ b[:-1] + b[-1]
        k = max(1, int(self.density * self.layout.intermediate))
        keep = torch.zeros(self.layout.intermediate, dtype=torch.bool)
        keep[score.topk(k, dim=-1).indices.flatten()] = True
        return keep

    def _ffn(self, li, h, gate_up, down, g):
        cache, lay = self.neurons, self.layout
        keep = self.active(li, h)
        need = keep & ~cache.cached[li] if cache.filled[li] else torch.ones_like(keep)
        buf = self._buffers[0]
        start = time.perf_counter()
        self.reader.read_rows(li, runs(need.nonzero().flatten()), buf)
        self.io_wait_s += time.perf_counter() - start
        full = self._block(buf)
        if cache.filled[li]:
            cache.fill_into(li, full, only=keep)  # the kept ones only: the rest are not computed
        else:  # the fixed hot set (decay 1.0): its rows copied from this whole read
            cache.observe(li, None, full)
            cache.filled[li] = True  # with no cache at all, too: later passes read only what they keep
        ids = keep.nonzero().flatten()
        self.kept_neurons += len(ids)
        self.layer_passes += 1
        if li == lay.layers - 1:
            self.passes += 1
        return bundled_swiglu(h, full.index_select(0, ids))[0]

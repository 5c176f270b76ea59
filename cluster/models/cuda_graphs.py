"""CUDA graphs for the lean backend's small passes: decode steps and chain verifies.

On a GPU a small model's pass is launch-bound. Measured on an H200 (benchmarks/gpu.py): eagerly, a
SmolLM2-shape pass cost 24-27 ms whether it carried 1 or 64 new tokens, a Qwen2.5-1.5B-shape pass 13-15
ms, where reading its 3.1 GB of weights takes 0.7 ms: ~15 kernels a layer, each launched from Python. A
graph replays them all in one launch: 2.7 and 3.6 ms a 1-token pass, the rest being the host's part.

A graph replays fixed shapes at fixed addresses, so a pass is padded to one of a few shapes:
- rows: up to the next of ROW_BUCKETS. Padding rows are a scratch slot's, emptied after each pass.
- tokens: every row to the widest row's width. A padding token writes its key and value just past its
  row's end, where no query looks (each query sees keys up to its own position), and the row's blocks
  past its end go back to the pool after the pass.
- keys: every row attends over the cache's whole capacity in blocks, masked past its end.
The pass's inputs are copied into the graph's own buffers, and the graph replays. Trees, passes that
return hidden states, and wide passes (prompts) run eagerly. So does any pass that would not fit.

`capture=False` runs the same padded passes eagerly: the CPU tests check that padding changes nothing.
"""

from __future__ import annotations

import logging

import torch

from cluster.models.backend import PassOutput, Row

log = logging.getLogger(__name__)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_WIDTH = 16  # new tokens a row: a draft of up to 15 and the target's own token


class CudaGraphs:
    """Graphs of one lean backend's passes, captured on first use of each shape. The backend's cache has one
    slot more than the engine sees (`scratch`): the padding rows write there."""

    def __init__(self, backend, capture: bool = True):
        self.backend = backend
        self.capture = capture
        cache = backend.cache
        self.span_blocks = -(-cache.capacity // cache.block_size)
        self.scratch = cache.allocate()
        # (rows, width, layers) -> (graph or None, its input buffers, its output buffer)
        self.graphs: dict[tuple[int, int, int], tuple] = {}
        self.pool = None  # one memory pool for every graph: they never run at once
        self.replays = 0  # passes served by a graph (or by the padded eager pass where capture is off)
        self.broken = False  # a capture failed: every pass runs eagerly

    def covers(self, rows: list[Row], hidden: bool) -> bool:
        cache = self.backend.cache
        lengths = [len(r.tokens) for r in rows]
        width = max(lengths)
        return (not hidden and min(lengths) >= 1 and width <= MAX_WIDTH and len(rows) <= ROW_BUCKETS[-1]
                and all(r.parents is None for r in rows)
                and all(cache.lengths[r.slot] + width <= cache.capacity for r in rows))

    def forward(self, rows: list[Row], last_only: bool, hidden: bool) -> PassOutput | None:
        """The pass through a graph, or None where none covers it (the caller runs it eagerly)."""
        if self.broken or not rows or not self.covers(rows, hidden):
            return None
        backend, cache = self.backend, self.backend.cache
        bucket = next(n for n in ROW_BUCKETS if n >= len(rows))
        lengths = [len(r.tokens) for r in rows]
        width = max(lengths)
        padded = [Row(r.slot, r.tokens + [r.tokens[-1]] * (width - len(r.tokens))) for r in rows]
        padded += [Row(self.scratch, [0] * width)] * (bucket - len(rows))
        inputs = backend._prepare(padded, self.span_blocks)
        key = (bucket, width, id(backend.layers))
        if key not in self.graphs:
            try:
                self.graphs[key] = self._record(inputs)
            except RuntimeError:  # a pass that cannot be captured runs eagerly, from now on every pass
                log.exception("CUDA graph capture of %d rows x %d tokens failed; running eagerly", bucket, width)
                self.broken = True
                cache.truncate(self.scratch, 0)
                return None
        graph, static, out = self.graphs[key]
        if graph is None:  # capture off: the same padded pass, eagerly
            out = backend._compute(inputs)
        else:
            if static is not inputs:
                _copy_inputs(static, inputs)
            graph.replay()
        self.replays += 1
        index = torch.tensor([i * width + j for i, n in enumerate(lengths) for j in range(n)], device=backend.device)
        result = backend._finish(rows, lengths, out.index_select(0, index), last_only, hidden)
        # Only the real tokens count (_finish counted them): the blocks past each row's new end, which only the
        # padding tokens wrote, go back to the pool.
        for r in rows:
            cache.truncate(r.slot, cache.lengths[r.slot])
        cache.truncate(self.scratch, 0)
        return result

    def _record(self, inputs) -> tuple:
        """Capture a graph of the pass over these inputs, which become its buffers."""
        backend = self.backend
        if not self.capture:
            return None, inputs, None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: allocator, cuBLAS workspaces, the KV pool
            backend._compute(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = backend._compute(inputs)
        self.pool = graph.pool()
        return graph, inputs, out


def _copy_inputs(static, fresh) -> None:
    for a, b in ((static.ids, fresh.ids), (static.positions, fresh.positions), (static.write, fresh.write)):
        a.copy_(b)
    for a, b in zip(static.groups, fresh.groups):
        a.tables.copy_(b.tables)
        a.mask.copy_(b.mask)

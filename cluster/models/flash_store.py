"""Weights on storage, read honestly: a bundled FFN file ("LLM in a flash" row-column bundling) and the
reader that streams it into DRAM without letting the page cache quietly hold the model.

A bundle directory (written by `tools/bundle_ffn.py`):
  config.json, tokenizer files   the model's own, so the tokenizer and the config load as usual
  resident.safetensors           every tensor but the FFN: embeddings, norms, attention, (untied) head
  ffn.bin                        per layer, a 4 KiB-aligned block of `intermediate` rows; row i is neuron i's
                                 gate row, up row and down column side by side ([3, hidden]), so reading a
                                 neuron is one contiguous chunk, and so is reading a run of them
  embed.bin                      the input embedding rows ([vocab, hidden], row-major) when the LM head is
                                 untied: a pass needs only its tokens' rows, so they are read on demand
  neurons.safetensors            per layer, `order` (bundle row -> original neuron id, hottest first, from
                                 calibration text) and `hotness` (mean |activation| of each bundle row)
  bundle.json                    the layout below

Reads use O_DIRECT where the filesystem takes it (no page cache at all), else pread followed by
posix_fadvise(DONTNEED) on what was read. `resident_fraction` (mincore over the file) checks it.
`SlowDisk` emulates a slower device under both readers (benchmarks: a disk other than this machine's).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGN = 4096
FORMAT = 1


class SlowDisk:
    """An emulated storage device slower than the real one: one queue, each request taking `latency_s` plus
    its bytes at `bytes_per_s`. A reader calls `done(nbytes, started)` after each real read; the call sleeps
    until the emulated device would have finished (the real read's own time counts inside it). Two
    parameters fit a disk's figures at two request sizes (`fit`)."""

    def __init__(self, mb_s: float, latency_us: float = 0.0, clock=time.perf_counter, sleep=time.sleep):
        if mb_s <= 0 or latency_us < 0:
            raise ValueError(f"SlowDisk: mb_s must be > 0 and latency_us >= 0 (got {mb_s}, {latency_us})")
        self.bytes_per_s, self.latency_s = mb_s * 1e6, latency_us * 1e-6
        self.clock, self.sleep = clock, sleep
        self.free_at = 0.0  # when the emulated device finishes the requests given to it so far
        self.waited_s = 0.0  # time readers slept for it (beyond the real reads)
        self.requests = self.bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def fit(size_a: int, mb_s_a: float, size_b: int, mb_s_b: float) -> tuple[float, float]:
        """(mb_s, latency_us) of the device that reads `size_a`-byte requests at mb_s_a MB/s and `size_b`-byte
        ones at mb_s_b: time(n) = latency + n / bandwidth through both points."""
        t_a, t_b = size_a / (mb_s_a * 1e6), size_b / (mb_s_b * 1e6)
        bytes_per_s = (size_a - size_b) / (t_a - t_b)
        return bytes_per_s / 1e6, (t_a - size_a / bytes_per_s) * 1e6

    def done(self, nbytes: int, started: float) -> None:
        with self._lock:
            finish = max(started, self.free_at) + self.latency_s + nbytes / self.bytes_per_s
            self.free_at = finish
            self.requests += 1
            self.bytes += nbytes
        wait = finish - self.clock()
        if wait > 0:
            self.sleep(wait)
            with self._lock:
                self.waited_s += wait


@dataclass(frozen=True)
class BundleLayout:
    hidden: int
    intermediate: int
    layers: int
    dtype: str  # torch dtype name of the rows, e.g. "bfloat16"
    layer_offsets: tuple[int, ...]  # byte offset of each layer's block in ffn.bin (multiples of ALIGN)
    embed_rows: int = 0  # rows in embed.bin (0: the embedding is resident, tied to the head)

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def row_bytes(self) -> int:
        return 3 * self.hidden * self.element_size

    @property
    def layer_bytes(self) -> int:
        return self.intermediate * self.row_bytes

    @property
    def ffn_bytes(self) -> int:
        return self.layers * self.layer_bytes

    @staticmethod
    def plan(hidden: int, intermediate: int, layers: int, dtype: str, embed_rows: int = 0) -> "BundleLayout":
        size = 3 * hidden * torch.empty(0, dtype=getattr(torch, dtype)).element_size() * intermediate
        stride = -(-size // ALIGN) * ALIGN
        return BundleLayout(hidden, intermediate, layers, dtype, tuple(i * stride for i in range(layers)), embed_rows)

    def save(self, directory: Path) -> None:
        data = {"format": FORMAT, "hidden": self.hidden, "intermediate": self.intermediate, "layers": self.layers,
                "dtype": self.dtype, "layer_offsets": list(self.layer_offsets), "embed_rows": self.embed_rows}
        (Path(directory) / "bundle.json").write_text(json.dumps(data, indent=1) + "\n")

    @staticmethod
    def load(directory: Path) -> "BundleLayout":
        path = Path(directory) / "bundle.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no bundle.json (write one with `python -m tools.bundle_ffn`)")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: bundle format {data.get('format')!r}, this code reads {FORMAT}")
        return BundleLayout(data["hidden"], data["intermediate"], data["layers"], data["dtype"],
                            tuple(data["layer_offsets"]), data.get("embed_rows", 0))


def runs(ids: torch.Tensor, merge_gap: int = 0) -> list[tuple[int, int]]:
    """Sorted neuron ids -> [start, end) runs of consecutive ids, merging runs whose gap is at most
    merge_gap ids (reading a few unneeded rows costs less than another I/O request)."""
    out: list[tuple[int, int]] = []
    for i in ids.tolist():
        if out and i - out[-1][1] <= merge_gap:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class FlashReader:
    """Reads neuron rows of ffn.bin into caller buffers. Counts the bytes it asked the device for."""

    def __init__(self, path: Path, layout: BundleLayout, direct: bool | None = None, chunk_bytes: int = 16 << 20,
                 merge_bytes: int = 256 << 10):
        self.path, self.layout, self.chunk_bytes, self.merge_bytes = Path(path), layout, chunk_bytes, merge_bytes
        self.direct = _opens_direct(self.path) if direct is None else direct
        self.fd = os.open(self.path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        self.bytes_read = 0
        self.reads = 0
        self.disk: SlowDisk | None = None  # emulate a slower device (benchmarks)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_rows(self, layer: int, spans: list[tuple[int, int]], into: torch.Tensor) -> None:
        """Fill rows [a, b) of each span into `into`, an aligned uint8 buffer mirroring the layer's block
        (row i at byte i * row_bytes). Spans become 4 KiB-aligned byte ranges; ranges closer than
        merge_bytes are read as one (reading through a few cached rows beats another request)."""
        base = self.layout.layer_offsets[layer]
        view = memoryview(into.numpy())
        for lo, hi in byte_ranges(spans, self.layout.row_bytes, into.numel(), self.merge_bytes):
            pos = lo
            while pos < hi:
                n = min(self.chunk_bytes, hi - pos)
                started = time.perf_counter()
                got = os.preadv(self.fd, [view[pos:pos + n]], base + pos)
                if got <= 0:
                    raise OSError(f"{self.path}: short read at {base + pos} ({got} of {n} bytes)")
                if self.disk is not None:
                    self.disk.done(got, started)
                pos += got
                with self._lock:
                    self.bytes_read += got
                    self.reads += 1
        if not self.direct:  # the whole block: readahead caches past what was asked for
            os.posix_fadvise(self.fd, base, into.numel(), os.POSIX_FADV_DONTNEED)


class EmbeddingRows:
    """Input embedding rows read from embed.bin on demand (one aligned read per distinct token), the last
    `cache_rows` tokens' rows kept in DRAM (least recently used out). Why: a pass embeds the tokens its
    draft just embedded, and a draft beside the verify would otherwise queue each token's 4 KiB read
    behind a layer's 80 MB on the same device."""

    def __init__(self, path: Path, layout: BundleLayout, direct: bool | None = None, cache_rows: int = 0):
        self.path, self.layout = Path(path), layout
        self.row_bytes = layout.hidden * layout.element_size
        self.cache_rows = min(cache_rows, layout.embed_rows)
        self._store = torch.empty(self.cache_rows, layout.hidden, dtype=layout.torch_dtype)
        self._slots: OrderedDict[int, int] = OrderedDict()  # token -> row of _store, least recent first
        self.hits = 0
        self.direct = _opens_direct(self.path) if direct is None else direct
        self.fd = os.open(self.path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        span = -(-(self.row_bytes + ALIGN) // ALIGN) * ALIGN  # any row lies within this many aligned bytes
        self._buf = aligned_buffer(span)
        self._lock = threading.Lock()  # one buffer: a draft beside the verify embeds on another thread
        self.bytes_read = 0
        self.disk: SlowDisk | None = None

    @property
    def cache_bytes(self) -> int:
        return self._store.numel() * self._store.element_size()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._rows(ids)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        out = torch.empty(len(unique), self.layout.hidden, dtype=self.layout.torch_dtype)
        view = memoryview(self._buf.numpy())
        for i, token in enumerate(unique.tolist()):
            if not 0 <= token < self.layout.embed_rows:
                raise IndexError(f"token id {token} outside the vocabulary ({self.layout.embed_rows})")
            slot = self._slots.get(token)
            if slot is not None:
                self._slots.move_to_end(token)
                out[i] = self._store[slot]
                self.hits += 1
                continue
            start = token * self.row_bytes
            lo = start // ALIGN * ALIGN
            n = -(-(start + self.row_bytes - lo) // ALIGN) * ALIGN
            started = time.perf_counter()
            got = os.preadv(self.fd, [view[:n]], lo)
            if got < start + self.row_bytes - lo:
                raise OSError(f"{self.path}: short read of token {token}")
            if self.disk is not None:
                self.disk.done(got, started)
            if not self.direct:
                os.posix_fadvise(self.fd, lo, n, os.POSIX_FADV_DONTNEED)
            self.bytes_read += got
            out[i] = self._buf[start - lo:start - lo + self.row_bytes].view(self.layout.torch_dtype)
            if self.cache_rows:
                slot = len(self._slots) if len(self._slots) < self.cache_rows else self._slots.popitem(last=False)[1]
                self._store[slot] = out[i]
                self._slots[token] = slot
        return out[inverse]


def byte_ranges(spans: list[tuple[int, int]], row_bytes: int, limit: int, merge_bytes: int = 0) -> list[tuple[int, int]]:
    """Row spans -> sorted, ALIGN-rounded [lo, hi) byte ranges within `limit`, merged where they overlap
    or lie within merge_bytes of each other."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        lo, hi = a * row_bytes // ALIGN * ALIGN, min(-(-b * row_bytes // ALIGN) * ALIGN, limit)
        if out and lo - out[-1][1] <= merge_bytes:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes (rounded up to ALIGN) whose data starts on an ALIGN boundary (O_DIRECT
    needs aligned memory as well as aligned offsets)."""
    size = -(-nbytes // ALIGN) * ALIGN
    raw = torch.empty(size + ALIGN, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift:shift + size]


def _opens_direct(path: Path) -> bool:
    """Whether O_DIRECT reads work on this file's filesystem (tmpfs and some overlays refuse them)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = aligned_buffer(ALIGN)
        os.preadv(fd, [memoryview(buf.numpy())], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages (after writing a bundle, before timing reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd) if os.access(path, os.W_OK) else None
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float:
    """Fraction of a file's pages in the page cache now (mincore over a fresh read-only mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path} failed")
            return sum(v & 1 for v in bytes(vec)) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)

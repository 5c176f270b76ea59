"""The native bf16 kernels (bf16_kernels.c): products for one token to a few dozen, HF's RMSNorm, RoPE with
the KV-pool write, SwiGLU's silu * up, attention over a paged KV cache, and int4 weight-only products; built
with the machine's C compiler on first use and called through ctypes.

They are an option, never a requirement: where the CPU lacks AVX512-BF16, no compiler is found, the build
fails, or a shape or layout is outside what a kernel takes, `library()` is None, `product()` falls back to
F.linear, the others return None (torch's ops run), and the lean backend's tuner (lean.tune_products)
keeps the products only where they measured faster on the model's own weights.
`python -m cluster.models.native` builds it ahead (tools/setup.sh).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch  # loaded first: the kernel's OpenMP calls then share torch's runtime and its threads
import torch.nn.functional as F

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("bf16_kernels.c")
FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lm"]  # after the source, where the linker resolves what it uses
_lib: list = []  # [] not tried yet; [None] unavailable; [library] loaded


def cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


def cpu_has_bf16_dot() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags.split()


def build() -> Path | None:
    """The shared library for this source and these flags (built once, cached by their hash), or None."""
    if not cpu_has_bf16_dot():
        log.info("native bf16 kernels: this CPU has no avx512_bf16; torch's ops are used")
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        log.warning("native bf16 kernels: no C compiler found; torch's ops are used")
        return None
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"bf16_kernels-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # built aside, then renamed: concurrent builders never see half a file
    done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), *LIBS], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("native bf16 kernels: build failed, torch's ops are used:\n%s", done.stderr[-2000:])
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, out)
    log.info("native bf16 kernels built: %s", out)
    return out


def library():
    """The loaded library (ctypes), or None where it is unavailable. Loaded once per process."""
    if not _lib:
        path = build()
        lib = None
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
                lib.bf16_products.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
                lib.bf16_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
                lib.bf16_attention.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3
                                               + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 5
                                               + [ctypes.c_float, ctypes.c_int])
                lib.bf16_rope_write.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 4
                lib.bf16_silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
                lib.int4_products.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5
                for fn in (lib.bf16_products, lib.bf16_rms_norm, lib.bf16_attention, lib.bf16_rope_write,
                           lib.bf16_silu_mul, lib.int4_products):
                    fn.restype = None
            except (OSError, AttributeError) as e:
                log.warning("native bf16 kernels: load failed (%s); torch's are used", e)
                lib = None
        _lib.append(lib)
    return _lib[0]


def products():
    """The products kernel, or None where the library is unavailable."""
    lib = library()
    return None if lib is None else lib.bf16_products


def covers(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernel takes this product as it is laid out (else F.linear does it)."""
    return (x.dtype == w.dtype == torch.bfloat16 and x.device.type == w.device.type == "cpu"
            and x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1] and x.shape[1] % 32 == 0
            and w.is_contiguous() and x.shape[0] > 0)


def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ w [out, in]^T, bf16, by the native kernel where it covers them, else F.linear.
    Called ~120 times a pass: what it checks is kept to what a call needs."""
    fn = products()
    if fn is None or not covers(x, w):
        return F.linear(x, w)
    if not x.is_contiguous():
        x = x.contiguous()
    n, out = x.shape[0], w.shape[0]
    y = torch.empty(n, out, dtype=torch.bfloat16)
    fn(x.data_ptr(), w.data_ptr(), y.data_ptr(), n, x.shape[1], out, torch.get_num_threads())
    return y


INT4_MAX_TOKENS = 64  # int4_products' limits: tokens a call, groups a row (its stack buffer), rows a tile
INT4_MAX_GROUPS = 512
INT4_TILE = 4


def int4_products():
    """The int4 products kernel, or None where the library is unavailable."""
    lib = library()
    return None if lib is None else lib.int4_products


def int4_covers(out: int, inp: int, group: int) -> bool:
    """Whether the int4 kernel is available and takes a weight [out, in] with this group."""
    return int4_products() is not None and out % INT4_TILE == 0 and inp // group <= INT4_MAX_GROUPS


def int4_product(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group: int) -> torch.Tensor:
    """x [N, in] (bf16, contiguous, N <= INT4_MAX_TOKENS) @ W^T for an int4 weight in the native layout
    (int4.py packs it): [N, out] bf16."""
    n, inp = x.shape
    out = packed.shape[0]
    if n > INT4_MAX_TOKENS or not int4_covers(out, inp, group):
        raise ValueError(f"int4_product: {n} tokens x {inp // group} groups x {out} outputs is outside the "
                         f"kernel's <= {INT4_MAX_TOKENS} x <= {INT4_MAX_GROUPS} x a multiple of {INT4_TILE}")
    y = torch.empty(n, out, dtype=torch.bfloat16)
    int4_products()(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), y.data_ptr(), n, inp, out,
                    group, torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """HF's RMSNorm (fp32 normalise, cast, scale) of bf16 rows x [N, H] in one native call, or None where
    the kernel does not take them (the caller then uses torch's ops)."""
    lib = library()
    if (lib is None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or x.dim() != 2 or not x.is_contiguous() or not weight.is_contiguous()):
        return None
    y = torch.empty_like(x)
    lib.bf16_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, heads: int) -> torch.Tensor | None:
    """HF's rotary embedding of the queries and keys in qkv [N, (heads + 2 kv) * D] (cos, sin [N, D]), the
    keys and values written to the pool at positions `write` [N]: the rotated queries [N, heads, D], or None
    where the kernel does not take these tensors (nothing is written then)."""
    lib = library()
    kv, dim = keys.shape[1], keys.shape[2]
    n = qkv.shape[0]
    if (lib is None or not qkv.dtype == cos.dtype == sin.dtype == keys.dtype == values.dtype == torch.bfloat16
            or qkv.device.type != "cpu" or dim % 2 or qkv.shape[1] != (heads + 2 * kv) * dim
            or cos.shape != (n, dim) or sin.shape != (n, dim) or write.dtype != torch.int64 or write.shape != (n,)
            or not all(t.is_contiguous() for t in (qkv, cos, sin, write, keys, values))):
        return None
    q = torch.empty(n, heads, dim, dtype=torch.bfloat16)
    lib.bf16_rope_write(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), write.data_ptr(), keys.data_ptr(),
                        values.data_ptr(), q.data_ptr(), n, heads, kv, dim)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of the fused gate/up product's rows [N, 2 g] -> [N, g], or None where the kernel does
    not take them."""
    lib = library()
    if lib is None or gate_up.dtype != torch.bfloat16 or gate_up.device.type != "cpu" or gate_up.dim() != 2 \
            or gate_up.shape[1] % 2 or not gate_up.is_contiguous():
        return None
    n, g = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty(n, g, dtype=torch.bfloat16)
    lib.bf16_silu_mul(gate_up.data_ptr(), y.data_ptr(), n, g)
    return y


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor,
              rows: int, width: int, scale: float) -> torch.Tensor | None:
    """Scaled-dot-product attention of `rows` rows with `width` new tokens each over their cached keys, or
    None where the kernel does not take these tensors (the caller then runs torch's SDPA).

    q [rows * width, heads, D] (rows of a wider q/k/v tensor may be strided); keys, values: one layer's
    pool [blocks * bs, kv, D]; tables [rows * nb] block ids (int64); mask [rows, 1, stack * width, nb * bs]
    bool (stack = heads / kv, query head h's token t at (h % stack) * width + t). -> [rows * width, heads, D]."""
    lib = library()
    n, heads, dim = q.shape
    kv = keys.shape[1]
    nb = tables.numel() // rows
    bs = mask.shape[-1] // nb
    if (lib is None or not q.dtype == keys.dtype == values.dtype == torch.bfloat16 or q.device.type != "cpu"
            or dim % 16 or dim > 256 or bs > 256 or q.stride(2) != 1 or q.stride(1) != dim
            or not (keys.is_contiguous() and values.is_contiguous() and mask.is_contiguous())
            or tables.dtype != torch.int64 or mask.dtype != torch.bool or mask.shape[-2] != heads // kv * width
            or n != rows * width or mask.shape[0] != rows or tables.numel() != rows * nb):
        return None
    tables = tables.contiguous()
    out = torch.empty(n, heads, dim, dtype=torch.bfloat16)
    lib.bf16_attention(q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), nb, bs,
                       mask.data_ptr(), out.data_ptr(), rows, width, heads, kv, dim, scale, torch.get_num_threads())
    return out


if __name__ == "__main__":  # build ahead of the first pass (tools/setup.sh); says what it found
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("native bf16 kernels:", "available" if library() is not None else "unavailable (torch's ops are used)")

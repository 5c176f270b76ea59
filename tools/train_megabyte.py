"""Train a small MEGABYTE and a byte-level Transformer baseline on the same bytes, for the same time, on
this CPU; report bits per byte on held-out files for both.

Text: Python's own standard library (every .py file outside the test packages), read as bytes. A file
is held out when crc32(its path) % 20 == 0 (about 5%): whole files, never seen in training. Files are
joined with EOS. Both models see random windows of --context bytes and are evaluated on the same fixed
held-out windows; bits per byte = cross-entropy (nats) / ln 2.

    python -m tools.train_megabyte --minutes 30                      # both, 30 minutes each
    python -m tools.train_megabyte --model megabyte --minutes 5 --out models/megabyte-stdlib

Writes model directories loadable with from_pretrained (config, safetensors, the byte tokenizer) and a
training record (train_record.json) in each. Tests build tiny random versions in seconds instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cluster.models.byte_baseline import ByteGPTConfig, ByteGPTForCausalLM
from cluster.models.megabyte import MegabyteConfig, MegabyteForCausalLM, save_byte_tokenizer

OFFSET, EOS = 3, 1  # ByT5 ids: byte b is b + 3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def corpus(limit_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train ids, held-out ids, what was read): stdlib .py files as byte ids joined by EOS."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held, files = [], [], {"train": 0, "held_out": 0}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if any(part in ("test", "tests", "idle_test") for part in path.parts) or "site-packages" in rel:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int16) + OFFSET
        held_out = zlib.crc32(rel.encode()) % 20 == 0
        (held if held_out else train).append(np.append(ids, EOS))
        files["held_out" if held_out else "train"] += 1
    train_ids = np.concatenate(train)
    if limit_bytes:
        train_ids = train_ids[:limit_bytes]
    return train_ids, np.concatenate(held), {**files, "train_bytes": int(len(train_ids)), "held_out_bytes": int(sum(len(h) for h in held))}


def windows(ids: np.ndarray, count: int, length: int, gen: np.random.Generator) -> torch.Tensor:
    starts = gen.integers(0, len(ids) - length - 1, size=count)
    return torch.from_numpy(np.stack([ids[s: s + length + 1] for s in starts]).astype(np.int64))


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of bytes 1..T of each window given the bytes before them."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def bits_per_byte(model, held: torch.Tensor, batch: int) -> float:
    model.eval()
    total = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(held), batch):
            total += float(loss_of(model, held[i: i + batch])) * len(held[i: i + batch])
    model.train()
    return total / len(held) / math.log(2)


def train(model, name: str, train_ids: np.ndarray, held: torch.Tensor, args) -> dict:
    gen = np.random.default_rng(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {params / 1e6:.2f}M parameters, {args.minutes} minutes, batch {args.batch} x {args.context} bytes")
    start, step, seen, curve = time.perf_counter(), 0, 0, []
    budget = args.minutes * 60
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget or step >= args.max_steps:
            break
        frac = elapsed / budget  # the schedule follows time, not steps: warm up, then cosine to 10%
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows(train_ids, args.batch, args.context, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, seen = step + 1, seen + batch[:, 1:].numel()
        if step % args.log_every == 0:
            log(f"  {name} step {step}: train {loss.item() / math.log(2):.3f} bits/byte, {seen / 1e6:.1f}M bytes, "
                f"{elapsed:.0f} s")
        if step % args.eval_every == 0:
            curve.append((round(elapsed, 1), round(bits_per_byte(model, held, args.batch), 4)))
            log(f"  {name} held-out {curve[-1][1]:.3f} bits/byte at {elapsed:.0f} s")
    minutes = (time.perf_counter() - start) / 60
    bpb = bits_per_byte(model, held, args.batch)
    log(f"{name}: held-out {bpb:.3f} bits/byte after {minutes:.1f} minutes ({step} steps, {seen / 1e6:.1f}M bytes)")
    return {"parameters": params, "steps": step, "train_bytes_seen": seen, "minutes": round(minutes, 2),
            "bits_per_byte": round(bpb, 4), "held_out_curve": curve}


def save(model, out: str, record: dict) -> None:
    path = Path(out)
    model.eval().save_pretrained(path)
    save_byte_tokenizer(path)
    (path / "train_record.json").write_text(json.dumps(record, indent=2))
    log(f"wrote {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("both", "megabyte", "baseline"), default="both")
    parser.add_argument("--out", default="models/megabyte-stdlib")
    parser.add_argument("--baseline-out", default="models/bytegpt-stdlib")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time of each model")
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument("--context", type=int, default=1024, help="bytes per training window")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--global-dim", type=int, default=384)
    parser.add_argument("--global-layers", type=int, default=4)
    parser.add_argument("--local-dim", type=int, default=192)
    parser.add_argument("--local-layers", type=int, default=2)
    parser.add_argument("--baseline-dim", type=int, default=256)
    parser.add_argument("--baseline-layers", type=int, default=6)
    parser.add_argument("--held-out-windows", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--limit-bytes", type=int, default=None, help="train on only this many bytes (tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train_ids, held_ids, files = corpus(args.limit_bytes)
    held = windows(held_ids, args.held_out_windows, args.context, np.random.default_rng(12345))
    log(f"corpus: {files}")
    results = {"corpus": files, "context": args.context}
    if args.model in ("both", "megabyte"):
        cfg = MegabyteConfig(patch_size=args.patch, global_dim=args.global_dim, global_layers=args.global_layers,
                             global_heads=max(1, args.global_dim // 64), local_dim=args.local_dim,
                             local_layers=args.local_layers, local_heads=max(1, args.local_dim // 48),
                             max_patches=max(256, args.context // args.patch + 1))
        model = MegabyteForCausalLM(cfg)
        results["megabyte"] = train(model, "megabyte", train_ids, held, args)
        save(model, args.out, {**results["megabyte"], "corpus": files, "context": args.context})
    if args.model in ("both", "baseline"):
        cfg = ByteGPTConfig(dim=args.baseline_dim, layers=args.baseline_layers, heads=max(1, args.baseline_dim // 64),
                            context=max(2048, args.context))
        model = ByteGPTForCausalLM(cfg)
        results["baseline"] = train(model, "baseline", train_ids, held, args)
        save(model, args.baseline_out, {**results["baseline"], "corpus": files, "context": args.context})
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

"""Train parallel heads (cluster/drafters/heads.py) for a target by self-distillation, on this CPU.

1. Prompts: the first third of functions from Python's own standard library, leaving out the modules the
   drafter benchmark's workloads come from (tools/make_workloads.py), so the workloads stay held out.
2. The target writes its own greedy continuations of them (the engine, batched): the heads learn to
   guess what this model will say, not what a corpus says.
3. One teacher-forced pass per sequence gives the target's last hidden state at every generated
   position; head i learns the token i + 1 places ahead of it (cross-entropy through the frozen LM head).
4. The heads are written to --out (heads.safetensors + config.json with how they were trained and the
   held-out top-1 / top-k accuracy of every head). No weights are committed: run this to build them.

    python -m tools.train_heads --config configs/default.yaml --out models/smollm2-135m-instruct-heads
    python -m tools.train_heads --config ... --minutes 15 --heads 4 --prompts 512 --max-tokens 128
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.config import EngineConfig, ModelConfig, SpeculationConfig, load_config
from cluster.drafters.heads import ParallelHeads, save_heads
from tools.make_workloads import MODULES as HELD_OUT


def prompts(count: int, seed: int = 0, min_lines: int = 9, max_lines: int = 60) -> list[str]:
    """The first third of stdlib functions, from modules the workloads do not use."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held_out = {stdlib / m for m in HELD_OUT}
    out = []
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if path in held_out or path.parent.name in ("test", "tests", "idlelib") or path.name.startswith("test"):
            continue
        try:
            source = path.read_text()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
                body = lines[node.lineno - 1: node.end_lineno]
                out.append("\n".join(body[: max(3, len(body) // 3)]) + "\n")
    random.Random(seed).shuffle(out)
    return out[:count]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(config: EngineConfig, texts: list[str], max_tokens: int, batch: int) -> tuple[list[list[int]], list[list[int]], object]:
    """(prompt ids, greedy continuation ids, the engine's target model) for every prompt."""
    from cluster.engine import SpecEngine
    from cluster.types import SamplingParams

    config.speculation = SpeculationConfig(k=0, k_max=0, adaptive=False)
    config.limits.max_batch_size = batch
    config.limits.max_waiting = max(config.limits.max_waiting, len(texts))
    engine = SpecEngine(config)
    params = SamplingParams(max_tokens=max_tokens)
    room = engine.max_model_len - max_tokens - 1
    fitting = [t for t in texts if len(engine.tokenizer.encode(t)) <= room]
    if len(fitting) < len(texts):
        log(f"  {len(texts) - len(fitting)} prompts longer than the context leaves room for: skipped")
    texts = fitting
    prompt_ids, outputs, start = [], [], time.perf_counter()
    for i in range(0, len(texts), batch):
        chunk = texts[i: i + batch]
        prompt_ids += [engine.build(t).tokens for t in chunk]
        outputs += [o.token_ids for o in engine.generate(chunk, params)]
        done = sum(len(o) for o in outputs)
        log(f"  generated {len(outputs)}/{len(texts)} continuations, {done} tokens, "
            f"{done / (time.perf_counter() - start):.0f} tok/s")
    return prompt_ids, outputs, engine.target.backend.model


@torch.inference_mode()
def hidden_states(model, prompt_ids: list[list[int]], outputs: list[list[int]], num_heads: int):
    """Per generated position t (the hidden state whose logits chose token t + 1): h_t and the next
    num_heads tokens after t + 1 (-100 past the continuation's end)."""
    hs, labels = [], []
    for p, o in zip(prompt_ids, outputs):
        if len(o) < 2:
            continue
        seq = p + o
        h = model.model(torch.tensor([seq[:-1]])).last_hidden_state[0, len(p) - 1:]  # positions P-1 .. P+G-2
        ahead = torch.full((len(o), num_heads), -100, dtype=torch.long)
        for i in range(num_heads):  # head i + 1: the token i + 2 places after position t
            shift = torch.tensor(o[i + 1:], dtype=torch.long)
            ahead[: len(shift), i] = shift
        hs.append(h.cpu())
        labels.append(ahead)
    return hs, labels


def accuracy(heads: ParallelHeads, lm_head: torch.Tensor, h: torch.Tensor, y: torch.Tensor, k: int,
             batch: int = 256) -> tuple[list[float], list[float]]:
    """Top-1 and top-k accuracy of each head over (h, y)."""
    hit1 = torch.zeros(heads.num_heads)
    hitk = torch.zeros(heads.num_heads)
    count = torch.zeros(heads.num_heads)
    with torch.inference_mode():
        for i in range(0, len(h), batch):
            logits = heads.logits(h[i: i + batch].float(), lm_head)  # [K, B, V]
            top = logits.topk(k, dim=-1).indices  # [K, B, k]
            target = y[i: i + batch].t()  # [K, B]
            valid = target >= 0
            hit1 += ((top[..., 0] == target) & valid).sum(-1).float()
            hitk += ((top == target.unsqueeze(-1)).any(-1) & valid).sum(-1).float()
            count += valid.sum(-1).float()
    return (hit1 / count.clamp_min(1)).tolist(), (hitk / count.clamp_min(1)).tolist()


def train(heads: ParallelHeads, lm_head: torch.Tensor, h: torch.Tensor, y: torch.Tensor, seconds: float,
          max_steps: int, batch: int, lr: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    start, step, losses = time.perf_counter(), 0, []
    while step < max_steps and time.perf_counter() - start < seconds:
        index = torch.randint(len(h), (batch,), generator=gen)
        logits = heads.logits(h[index].float(), lm_head)  # [K, B, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[index].t().reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            log(f"  step {step}: loss {sum(losses[-25:]) / 25:.3f} ({time.perf_counter() - start:.0f} s)")
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1),
            "initial_loss": round(losses[0], 4) if losses else None,
            "final_loss": round(sum(losses[-25:]) / max(len(losses[-25:]), 1), 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml", help="the target comes from this engine config")
    parser.add_argument("--target", default=None, help="a model directory instead of the config's target")
    parser.add_argument("--out", required=True)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="continuations generated together")
    parser.add_argument("--minutes", type=float, default=15.0, help="the whole run, generation included")
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument("--train-batch", type=int, default=192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-k", type=int, default=3, help="the k of the reported top-k accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.target:
        config = EngineConfig(target=ModelConfig(args.target))
    else:
        config = load_config(args.config)
    texts = prompts(args.prompts, args.seed)
    log(f"1/3 {len(texts)} prompts; the target continues them greedily ({args.max_tokens} tokens each)")
    prompt_ids, outputs, model = generate(config, texts, args.max_tokens, args.batch)
    log("2/3 teacher-forced hidden states")
    hs, labels = hidden_states(model, prompt_ids, outputs, args.heads)
    split = max(1, len(hs) // 10)  # whole sequences held out: a tenth
    h_train, y_train = torch.cat(hs[split:]), torch.cat(labels[split:])
    h_test, y_test = torch.cat(hs[:split]), torch.cat(labels[:split])
    lm_head = model.get_output_embeddings().weight.detach()
    heads = ParallelHeads(args.heads, lm_head.shape[1])
    before = accuracy(heads, lm_head, h_test, y_test, args.top_k)
    remaining = args.minutes * 60 - (time.perf_counter() - began) - 30  # keep time for the final evaluation
    log(f"3/3 training {args.heads} heads on {len(h_train)} positions for up to {max(remaining, 0):.0f} s")
    record = train(heads, lm_head, h_train, y_train, max(remaining, 1.0), args.max_steps, args.train_batch, args.lr,
                   args.seed)
    top1, topk = accuracy(heads, lm_head, h_test, y_test, args.top_k)
    meta = {
        "target": str(config.target.path), "prompts": len(texts), "max_tokens": args.max_tokens,
        "train_positions": len(h_train), "held_out_positions": len(h_test), **record,
        "minutes_total": round((time.perf_counter() - began) / 60, 2),
        "held_out_top1": [round(a, 4) for a in top1], f"held_out_top{args.top_k}": [round(a, 4) for a in topk],
        "held_out_top1_untrained": [round(a, 4) for a in before[0]],
        "corpus": "first thirds of stdlib functions outside tools/make_workloads.MODULES, greedy continuations",
    }
    save_heads(args.out, heads, meta)
    log(f"wrote {args.out}: held-out top-1 per head {meta['held_out_top1']}, top-{args.top_k} {meta[f'held_out_top{args.top_k}']}")
    return meta


if __name__ == "__main__":
    main()

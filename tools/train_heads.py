"""Train draft heads (cluster/drafters/heads.py) for a target by self-distillation, on this CPU.

1. Prompts: the first third of functions from Python's own standard library, and (`--chat`) chat
   questions about its functions, leaving out the modules the drafter benchmark's workloads come from
   (tools/make_workloads.py), so the workloads stay held out.
2. The target writes its own greedy continuations of them (the engine, batched): the heads learn to
   guess what this model will say, not what a corpus says.
3. One teacher-forced pass per sequence gives the target's last hidden state at every generated
   position. `--arch hydra` (the default): the step network, unrolled `--heads` steps from each position
   on its own states (as it runs when drafting) and fed the target's tokens, learns at step j the
   target's next token (cross-entropy through the frozen LM head, over the `--vocab` most frequent
   tokens) and its hidden state there (smooth L1, EAGLE's feature regression). `--arch medusa`: head i
   learns the token i + 1 places ahead of the pending one.
4. The heads are written to --out (heads.safetensors + config.json with how they were trained and the
   held-out top-1 / top-k accuracy of every head). No weights are committed: run this to build them.

    python -m tools.train_heads --config configs/default.yaml --out models/smollm2-135m-instruct-heads
    python -m tools.train_heads --config ... --minutes 15 --heads 5 --prompts 512 --max-tokens 128
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
from cluster.drafters.heads import ParallelHeads, SequentialHeads, save_heads
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


QUESTION_FORMS = ["What does `{name}` in Python's `{module}` module do?", "How do I use `{module}.{name}`? Give an example.",
                  "Explain what this does: {doc}", "When would I use `{name}` from `{module}`?"]


def questions(count: int, seed: int = 0) -> list[str]:
    """Chat questions about stdlib functions outside the workloads' modules (W-chat's questions are
    written by hand and not among these): the heads also learn how the model answers in prose."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held_out = {stdlib / m for m in HELD_OUT}
    out = []
    for path in sorted(stdlib.glob("*.py")):
        if path in held_out or path.name.startswith(("test", "_")):
            continue
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
                doc = ast.get_docstring(node).strip().splitlines()[0]
                out.append((path.stem, node.name, doc))
    rng = random.Random(seed)
    rng.shuffle(out)
    return [rng.choice(QUESTION_FORMS).format(module=m, name=n, doc=d) for m, n, d in out[:count]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(config: EngineConfig, texts: list[str], max_tokens: int, batch: int) -> tuple[list[list[int]], list[list[int]], object]:
    """(prompt ids, greedy continuation ids, the engine) for every prompt."""
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
    return prompt_ids, outputs, engine


@torch.inference_mode()
def hidden_states(model, prompt_ids: list[list[int]], outputs: list[list[int]]) -> list[tuple[torch.Tensor, list[int]]]:
    """Per continuation: the hidden state at every generated position t (the one whose logits chose token
    t + 1, in float32) and the generated tokens (token i is the one h[i] chose)."""
    out = []
    for p, o in zip(prompt_ids, outputs):
        if len(o) < 2:
            continue
        seq = p + o
        h = model.model(torch.tensor([seq[:-1]])).last_hidden_state[0, len(p) - 1:]  # positions P-1 .. P+G-2
        out.append((h.float().cpu(), list(o)))
    return out


class Positions:
    """Every training position of some continuations, concatenated: h [N, H], the token each h chose, and
    how many later positions of its own continuation follow it (a step j may read position n + j only if
    j <= left[n])."""

    def __init__(self, sequences: list[tuple[torch.Tensor, list[int]]]):
        self.h = torch.cat([h for h, _ in sequences])
        self.token = torch.tensor([t for _, o in sequences for t in o], dtype=torch.long)
        self.left = torch.cat([torch.arange(len(o) - 1, -1, -1) for _, o in sequences])

    def __len__(self) -> int:
        return len(self.h)

    def ahead(self, index: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the position j after each of index, clamped; whether it is in the same continuation)."""
        return (index + j).clamp(max=len(self) - 1), self.left[index] >= j

    def medusa_labels(self, index: torch.Tensor, num_heads: int) -> torch.Tensor:
        """[B, K]: head i + 1's label, the token i + 2 places after position t (-100 past the end)."""
        labels = []
        for i in range(num_heads):
            at, valid = self.ahead(index, i + 1)
            labels.append(torch.where(valid, self.token[at], -100))
        return torch.stack(labels, 1)


def hydra_steps(heads: SequentialHeads, embedding: torch.Tensor, rows: torch.Tensor, data: Positions,
                index: torch.Tensor):
    """Unroll the step network from each position in index on its own states, fed the target's tokens:
    per step j, (logits over rows [B, V'], the state [B, H], the position j ahead, its validity)."""
    s = data.h[index]
    for j in range(1, heads.depth + 1):
        fed, _ = data.ahead(index, j - 1)
        s = heads.step(s, embedding[data.token[fed]])
        at, valid = data.ahead(index, j)
        yield s @ rows.t(), s, at, valid


def accuracy(heads, lm_head: torch.Tensor, embedding: torch.Tensor, data: Positions, k: int,
             batch: int = 256) -> tuple[list[float], list[float]]:
    """Top-1 and top-k accuracy of each head (hydra: each step, fed the target's tokens) on data."""
    hit1 = torch.zeros(heads.num_heads)
    hitk = torch.zeros(heads.num_heads)
    count = torch.zeros(heads.num_heads)
    with torch.inference_mode():
        for start in range(0, len(data), batch):
            index = torch.arange(start, min(start + batch, len(data)))
            if isinstance(heads, SequentialHeads):
                rows = lm_head[heads.vocab].float()
                steps = [(heads.vocab[logits.topk(k, dim=-1).indices], torch.where(valid, data.token[at], -100))
                         for logits, _, at, valid in hydra_steps(heads, embedding, rows, data, index)]
            else:
                logits = heads.logits(data.h[index], lm_head)  # [K, B, V]
                labels = data.medusa_labels(index, heads.num_heads).t()
                steps = [(logits[i].topk(k, dim=-1).indices, labels[i]) for i in range(heads.num_heads)]
            for i, (top, target) in enumerate(steps):
                valid = target >= 0
                hit1[i] += ((top[:, 0] == target) & valid).sum().float()
                hitk[i] += ((top == target.unsqueeze(-1)).any(-1) & valid).sum().float()
                count[i] += valid.sum().float()
    return (hit1 / count.clamp_min(1)).tolist(), (hitk / count.clamp_min(1)).tolist()


def loss_of(heads, lm_head: torch.Tensor, embedding: torch.Tensor, data: Positions, index: torch.Tensor,
            regress: float) -> torch.Tensor:
    if not isinstance(heads, SequentialHeads):
        logits = heads.logits(data.h[index], lm_head)  # [K, B, V]
        labels = data.medusa_labels(index, heads.num_heads).t().reshape(-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100)
    rows = lm_head[heads.vocab].float()
    slot = torch.full((lm_head.shape[0],), -100, dtype=torch.long)
    slot[heads.vocab] = torch.arange(len(heads.vocab))  # a token's place in the proposable rows, -100 if absent
    total = 0.0
    for logits, s, at, valid in hydra_steps(heads, embedding, rows, data, index):
        labels = torch.where(valid, slot[data.token[at]], -100)
        total = total + F.cross_entropy(logits, labels, ignore_index=-100)
        if regress and valid.any():
            total = total + regress * F.smooth_l1_loss(s[valid], data.h[at][valid])
    return total / heads.depth


def train(heads, lm_head: torch.Tensor, embedding: torch.Tensor, data: Positions, seconds: float, max_steps: int,
          batch: int, lr: float, regress: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    start, step, losses = time.perf_counter(), 0, []
    while step < max_steps and time.perf_counter() - start < seconds:
        index = torch.randint(len(data), (batch,), generator=gen)
        loss = loss_of(heads, lm_head, embedding, data, index, regress)
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
    parser.add_argument("--arch", choices=("hydra", "medusa"), default="hydra")
    parser.add_argument("--heads", type=int, default=5, help="how many tokens ahead they guess")
    parser.add_argument("--vocab", type=int, default=16384,
                        help="hydra: the draft proposes this many most frequent tokens (0: all)")
    parser.add_argument("--regress", type=float, default=1.0, help="hydra: weight of the hidden-state regression")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--chat", type=float, default=0.0, help="this fraction of the prompts are chat questions "
                        "(0.3 for traffic that mixes code and chat; on code alone it costs accuracy)")
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
    chat = round(args.prompts * args.chat)
    texts = prompts(args.prompts - chat, args.seed)
    if chat:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.target.path, local_files_only=True)
        asked = questions(chat, args.seed)
        if tokenizer.chat_template:
            asked = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True) for q in asked]
        texts += asked
        random.Random(args.seed).shuffle(texts)
    log(f"1/3 {len(texts)} prompts; the target continues them greedily ({args.max_tokens} tokens each)")
    prompt_ids, outputs, engine = generate(config, texts, args.max_tokens, args.batch)
    model = engine.target.backend.model
    log("2/3 teacher-forced hidden states")
    sequences = hidden_states(model, prompt_ids, outputs)
    split = max(1, len(sequences) // 10)  # whole sequences held out: a tenth
    train_data, test_data = Positions(sequences[split:]), Positions(sequences[:split])
    lm_head = model.get_output_embeddings().weight.detach().float()
    embedding = model.get_input_embeddings().weight.detach().float()
    if args.arch == "hydra":
        from cluster.models.token_order import frequent_ids

        vocab = lm_head.shape[0]
        keep = vocab if args.vocab <= 0 else min(args.vocab, vocab)
        ids = (frequent_ids(str(config.target.path), vocab, keep, tuple(engine.eos_ids)) if keep < vocab
               else torch.arange(vocab))
        heads = SequentialHeads(lm_head.shape[1], ids, args.heads)
    else:
        heads = ParallelHeads(args.heads, lm_head.shape[1])
    before = accuracy(heads, lm_head, embedding, test_data, args.top_k)
    remaining = args.minutes * 60 - (time.perf_counter() - began) - 30  # keep time for the final evaluation
    log(f"3/3 training {args.arch} heads ({args.heads} ahead) on {len(train_data)} positions for up to "
        f"{max(remaining, 0):.0f} s")
    record = train(heads, lm_head, embedding, train_data, max(remaining, 1.0), args.max_steps, args.train_batch,
                   args.lr, args.regress, args.seed)
    top1, topk = accuracy(heads, lm_head, embedding, test_data, args.top_k)
    meta = {
        "arch": args.arch, "target": str(config.target.path), "prompts": len(texts), "max_tokens": args.max_tokens,
        "train_positions": len(train_data), "held_out_positions": len(test_data), **record,
        "minutes_total": round((time.perf_counter() - began) / 60, 2),
        "held_out_top1": [round(a, 4) for a in top1], f"held_out_top{args.top_k}": [round(a, 4) for a in topk],
        "held_out_top1_untrained": [round(a, 4) for a in before[0]],
        **({"vocab": len(heads.vocab), "regress": args.regress} if args.arch == "hydra" else {}),
        "corpus": "first thirds of stdlib functions outside tools/make_workloads.MODULES, and chat questions about "
                  "stdlib functions outside them (tools/train_heads.questions), greedy continuations",
        "chat_prompts": chat,
    }
    save_heads(args.out, heads, meta)
    log(f"wrote {args.out}: held-out top-1 per head {meta['held_out_top1']}, top-{args.top_k} {meta[f'held_out_top{args.top_k}']}")
    return meta


if __name__ == "__main__":
    main()

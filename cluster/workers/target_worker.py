"""The target side: a model backend, the KV caches of the sequences pinned to it, and the acceptance rule.

Verification happens here, next to the target's probabilities: only token ids travel to this worker
(plus q under the rejection rule), and only a Verdict (the accepted path and the next token) travels back.

Two rules, both exact (acceptance.py): `coupled` (the default) makes every emitted token the target's own
keyed sample, so a seeded request gives the same tokens whatever was drafted; `rejection` is Leviathan /
Chen's rule (recursive over siblings), which accepts a stochastic draft more often but whose tokens
depend on the draft lengths. Greedy requests take the argmax under both.

A pass is transactional: cache lengths and per-sequence state change only once the whole pass has
succeeded, so a batch whose pass raises is retried one sequence at a time and only the culprit fails.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from cluster.config import ModelConfig
from cluster.core.messages import Prefill, Proposal, Verdict, VerifyMetadata, VerifyTask
from cluster.models.backend import Row
from cluster.models.loader import build_backend, load_model
from cluster.requests import eos_ids
from cluster.sampling import keyed
from cluster.sampling.acceptance import (
    accept_chain_coupled,
    coupled_choice,
    keyed_choice,
    recursive_rejection,
    verify_draft,
    walk_tree,
)
from cluster.sampling.logits import (
    SamplingTensors,
    TokenHistory,
    adjust_logits,
    logprobs_from_logits,
    probs_from_logits,
)
from cluster.types import SamplingParams, TokenLogprob
from cluster.workers.isolation import Failure, isolated

RULES = ("coupled", "rejection")


@dataclass
class Emitted:
    """A prefill's first token (None when resuming a sequence after a failover)."""

    token: int | None
    logprobs: list[TokenLogprob] | None = None
    hidden: object = None  # [H] hidden state at the last prompt position, when asked


@dataclass
class _TargetSeq:
    slot: int
    tokens: list[int]  # prompt + output; the last one is pending: emitted, not yet in the cache
    num_prompt: int
    params: SamplingParams
    seed: int

    @property
    def position(self) -> int:
        """Output position of the token after the pending one (the keys of its random draws)."""
        return len(self.tokens) - self.num_prompt


class TargetWorker:
    def __init__(self, model_cfg: ModelConfig, num_slots: int, capacity: int, model: torch.nn.Module | None = None,
                 device: str = "cpu", extra_eos: tuple[int, ...] = (), rule: str = "coupled", backend=None):
        """backend: one already built over `model` (benchmarks build offloaded ones with their own settings)."""
        if rule not in RULES:
            raise ValueError(f"rule: {rule!r} is not one of {RULES}")
        model = model if model is not None else load_model(model_cfg, device)
        self.backend = backend if backend is not None else build_backend(model, model_cfg, num_slots, capacity)
        self.rule = rule
        self.eos_ids = sorted(eos_ids(model) | set(extra_eos))  # held off below min_tokens
        self.seqs: dict[str, _TargetSeq] = {}
        self.busy_s = 0.0  # time spent in passes: utilisation = busy_s / wall time
        self.passes = 0
        self.calls: deque[tuple[float, float]] = deque(maxlen=4096)  # (start, end) wall times of recent passes

    # --- calls -----------------------------------------------------------------------------------
    def prefill(self, items: list[Prefill]) -> list[Emitted | Failure]:
        """Cache each sequence and choose its first token (nothing for resumed or deferred sequences)."""
        if all(item.defer for item in items):  # no pass: nothing to time
            return isolated(self._prefill, items)
        return self._timed(self._prefill, items)

    def verify(self, items: list[VerifyTask]) -> list[Verdict | Failure]:
        """One ragged forward over [pending] + proposal (a chain or a tree) per sequence."""
        return self._timed(self._verify, items)

    def verify_timed(self, items: list[VerifyTask]) -> tuple[list[Verdict | Failure], float]:
        """verify(), plus the seconds this worker computed: the router's overhead is the rest."""
        busy = self.busy_s
        return self.verify(items), self.busy_s - busy

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self.backend.cache.free(seq.slot)

    def release_prefix(self, prefix: str) -> int:
        """Free every sequence whose id starts with `prefix` (a dead router's); returns how many."""
        gone = [seq_id for seq_id in self.seqs if seq_id.startswith(prefix)]
        self.release(gone)
        return len(gone)

    def calibrate(self):
        """Measure this worker's pass-cost curve (the scheduler's cost model reads it)."""
        return self.backend.calibrate()

    def call_log(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock times of recent passes: shows whether drafting overlapped them."""
        return list(self.calls)

    def _timed(self, run, items: list) -> list:
        start, wall = time.perf_counter(), time.time()
        try:
            return isolated(run, items)
        finally:
            self.busy_s += time.perf_counter() - start
            self.passes += 1
            self.calls.append((wall, time.time()))

    # --- prefill -----------------------------------------------------------------------------------
    def _prefill(self, items: list[Prefill]) -> list[Emitted]:
        for item in items:
            if item.seq_id in self.seqs:
                raise ValueError(f"sequence {item.seq_id} is already on this worker")
        cache = self.backend.cache
        new: dict[str, _TargetSeq] = {}
        try:
            for item in items:
                new[item.seq_id] = _TargetSeq(cache.allocate(), list(item.tokens), item.num_prompt, item.params,
                                              item.seed)
            feeds = [[] if item.defer else item.tokens[:-1] if item.resume else item.tokens for item in items]
            out = [Emitted(None) for _ in items]
            fresh = [i for i, f in enumerate(feeds) if f]  # a 1-token resume, or a deferred one: nothing now
            if fresh:
                seqs = [new[items[i].seq_id] for i in fresh]
                want_hidden = any(items[i].want_hidden for i in fresh)
                out_pass = self.backend.forward([Row(s.slot, feeds[i]) for s, i in zip(seqs, fresh)], last_only=True,
                                                hidden=want_hidden)
                logits = out_pass.logits
                sampled = [(r, i) for r, i in enumerate(fresh) if not items[i].resume]
                if sampled:
                    rows = torch.tensor([r for r, _ in sampled], device=logits.device)
                    chosen = [new[items[i].seq_id] for _, i in sampled]
                    for (_, i), e in zip(sampled, self._first_tokens(logits[rows], chosen)):
                        out[i] = e
                if want_hidden:  # a resumed sequence's hidden state is that of its second-to-last token: unused
                    for r, i in enumerate(fresh):
                        if items[i].want_hidden and not items[i].resume:
                            out[i].hidden = out_pass.hidden[r].cpu()
        except Exception:
            for s in new.values():
                cache.free(s.slot)
            raise
        for item, e in zip(items, out):  # commit
            seq = self.seqs[item.seq_id] = new[item.seq_id]
            if e.token is not None:
                seq.tokens.append(e.token)
        return out

    def _first_tokens(self, logits: torch.Tensor, seqs: list[_TargetSeq]) -> list[Emitted]:
        st, history = self._sampling(seqs, logits.device)
        adjusted = adjust_logits(logits, st, history)
        probs = probs_from_logits(adjusted, st)
        tokens = [self._choose(probs[i], s, s.position) for i, s in enumerate(seqs)]
        logprobs = self._logprobs(adjusted.unsqueeze(1), st, seqs, [[0]] * len(seqs), [[t] for t in tokens])
        return [Emitted(t, lp) for t, lp in zip(tokens, logprobs)]

    def _choose(self, p: torch.Tensor, seq: _TargetSeq, position: int) -> int:
        """The target's own token at a position with nothing drafted (or nothing accepted, coupled)."""
        if seq.params.greedy:
            return int(p.argmax())
        return keyed_choice(p, seq.seed, position, self.rule, keyed.RESIDUAL)

    # --- verify ------------------------------------------------------------------------------------
    def _verify(self, items: list[VerifyTask]) -> list[Verdict]:
        seqs = [self.seqs[item.seq_id] for item in items]
        proposals = [item.proposal or Proposal() for item in items]
        if not self.backend.verifies_trees:
            proposals = [p.first_branch() for p in proposals]
        for p in proposals:
            p.validate(self.vocab_size)
        cache = self.backend.cache
        starts = [cache.lengths[s.slot] for s in seqs]
        # Each row feeds its uncached tokens (the pending one; a deferred prompt ending with it) and the
        # proposal; only the pending token's position and the proposal's need logits.
        pending = [len(s.tokens) - start for s, start in zip(seqs, starts)]
        rows = [Row(s.slot, s.tokens[start:] + p.tokens,
                    None if p.is_chain else list(range(-1, n - 1)) + [q + n for q in p.parents])
                for s, start, n, p in zip(seqs, starts, pending, proposals)]
        skip = [n - 1 for n in pending]
        want_hidden = any(item.want_hidden for item in items)
        try:
            out = self.backend.forward(rows, hidden=want_hidden, skip=skip if any(skip) else None)
            verdicts, keeps = self._accept(out, seqs, proposals)
        except Exception:
            for s, start in zip(seqs, starts):
                cache.truncate(s.slot, start)
            raise
        for row, (s, start, item, p, v, keep) in enumerate(zip(seqs, starts, items, proposals, verdicts, keeps)):
            self.backend.commit(s.slot, start + skip[row], keep)  # commit (the skipped prompt stays cached)
            s.tokens.extend(p.path_tokens(v.path) + [v.token])
            if item.want_hidden:
                v.hidden = out.hidden[row, keep[-1]].cpu()
        return verdicts

    def _accept(self, out, seqs: list[_TargetSeq], proposals: list[Proposal]):
        device = out.flat.device
        st, history = self._sampling(seqs, device)
        if st.all_greedy and st.logit_bias is None and history is None and all(s.params.logprobs is None for s in seqs):
            # The common serving case: the target's tokens are the argmax of the raw logits; no [B, T, V]
            # probabilities (nor the padded logits) are ever built.
            results = accept_coupled(None, seqs, proposals, chosen=out.argmax())
            keeps = [[0] + [i + 1 for i in path] for path, _ in results]
            return [Verdict(path, token) for path, token in results], keeps
        logits = out.logits
        adjusted = self._adjust(logits, st, history, seqs, proposals)
        probs = probs_from_logits(adjusted, st)
        if self.rule == "rejection" and not all(s.params.greedy for s in seqs):
            results = accept_rejection(probs, seqs, proposals)
        else:
            results = accept_coupled(probs, seqs, proposals)
        keeps = [[0] + [i + 1 for i in path] for path, _ in results]
        emitted = [p.path_tokens(path) + [token] for p, (path, token) in zip(proposals, results)]
        logprobs = self._logprobs(adjusted, st, seqs, keeps, emitted)
        verdicts = [Verdict(path, token, lp) for (path, token), lp in zip(results, logprobs)]
        return verdicts, keeps

    def _adjust(self, logits, st, history, seqs, proposals) -> torch.Tensor:
        """Bias, min_tokens and penalties at every node, each seeing the draft tokens on its own path."""
        if history is None or all(p.is_chain for p in proposals):
            width = logits.shape[1] - 1
            steps = torch.full((len(seqs), width), -1, dtype=torch.long, device=logits.device)
            for i, p in enumerate(proposals):
                steps[i, : len(p)] = torch.tensor(p.tokens, dtype=torch.long)
            return adjust_logits(logits, st, history, steps if width else None)
        adjusted = adjust_logits(logits, st)  # the bias; penalties per node below
        for i, (s, p) in enumerate(zip(seqs, proposals)):
            if not s.params.penalized:
                continue
            paths = [[]] + [None] * len(p)
            for j, parent in enumerate(p.parents):
                paths[j + 1] = paths[parent + 1] + [p.tokens[j]]
            for j, path in enumerate(paths):
                node = TokenHistory([(s.tokens + path, s.num_prompt)], [s.params], self.vocab_size, logits.device,
                                    self.eos_ids)
                adjusted[i, j] = node.apply(adjusted[i, j].unsqueeze(0))[0]
        return adjusted

    def _sampling(self, seqs: list[_TargetSeq], device):
        params = [s.params for s in seqs]
        st = SamplingTensors.from_params(params, self.vocab_size, device)
        history = None
        if any(p.penalized for p in params):
            history = TokenHistory([(s.tokens, s.num_prompt) for s in seqs], params, self.vocab_size, device,
                                   self.eos_ids)
        return st, history

    @staticmethod
    def _logprobs(adjusted: torch.Tensor, st: SamplingTensors, seqs: list[_TargetSeq], keeps: list[list[int]],
                  emitted: list[list[int]]) -> list[list[TokenLogprob] | None]:
        """Each emitted token's log-probability, read at the node that produced it, for rows that asked."""
        out: list[list[TokenLogprob] | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return out
        index = torch.tensor(rows, device=adjusted.device)
        lp = logprobs_from_logits(adjusted[index], st.rows(index)).cpu()
        for r, i in enumerate(rows):
            n_top = seqs[i].params.logprobs
            entries = []
            for node, token in zip(keeps[i], emitted[i]):
                top = lp[r, node].topk(n_top) if n_top else None
                alts = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
                entries.append(TokenLogprob(token, float(lp[r, node, token]), alts))
            out[i] = entries
        return out

    # --- state -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def max_context(self) -> int | None:
        return self.backend.max_context

    def info(self) -> dict:
        return {"vocab_size": self.vocab_size, "max_context": self.max_context, "eos_ids": self.eos_ids}

    def load(self) -> dict:
        cache = self.backend.cache
        return {"sequences": len(self.seqs), "free_slots": cache.num_free, "cache_occupied": cache.occupied,
                "busy_s": self.busy_s, "passes": self.passes}

    def ping(self) -> bool:
        return True


# The acceptance rules over a verify batch: pure functions of p, the proposals and each sequence's
# (seed, output position); the actor only calls them.
def accept_coupled(probs, seqs, proposals, chosen=None) -> list[tuple[list[int], int]]:
    """t* at every node (argmax p, or argmax p / E with E keyed by the node's output position); chains
    are accepted in one batched call over flat metadata, trees walked. `chosen` [B, T]: the argmax at
    every node, when the caller has it (all rows greedy: then probs is not needed)."""
    chosen = probs.argmax(-1) if chosen is None else chosen  # [B, T]: greedy rows, and the shape for the rest
    for i, s in enumerate(seqs):
        if not s.params.greedy:
            p = proposals[i]
            depths = [0] + p.depths()
            noise = {d: keyed.race_noise(s.seed, s.position + d, probs.shape[-1]) for d in set(depths)}
            chosen[i, : len(p) + 1] = coupled_choice(probs[i, : len(p) + 1], torch.stack([noise[d] for d in depths]))
    chosen = chosen.cpu()
    results: list = [None] * len(seqs)
    chains = [i for i, p in enumerate(proposals) if p.is_chain]
    if chains:
        meta = VerifyMetadata.from_chains([proposals[i].tokens for i in chains])
        index = torch.tensor(chains)
        drafts = torch.tensor(meta.padded(), dtype=torch.long).reshape(len(chains), meta.width - 1)
        n, token = accept_chain_coupled(chosen[index, : meta.width], drafts, torch.tensor(meta.num_draft))
        for r, i in enumerate(chains):
            results[i] = (list(range(int(n[r]))), int(token[r]))
    for i, p in enumerate(proposals):
        if results[i] is None:
            results[i] = walk_tree(p.tokens, p.children(), chosen[i, : len(p) + 1].tolist())
    return results

def accept_rejection(probs, seqs, proposals) -> list[tuple[list[int], int]]:
    """Leviathan / Chen for chains (batched), recursive rejection over siblings for trees; every
    uniform keyed by (seed, output position, purpose)."""
    results: list = [None] * len(seqs)
    chains = [i for i, p in enumerate(proposals) if p.is_chain]
    if chains:
        width = probs.shape[1] - 1
        b = len(chains)
        draft = torch.zeros(b, width, dtype=torch.long)
        q = torch.zeros(b, width, probs.shape[-1]) if width else None
        u_accept, u_sample = torch.zeros(b, width), torch.zeros(b)
        for r, i in enumerate(chains):
            s, p = seqs[i], proposals[i]
            k = len(p)
            draft[r, :k] = torch.tensor(p.tokens, dtype=torch.long)
            if q is not None:
                q[r, :k] = p.q[:k] if p.q is not None else torch.nn.functional.one_hot(draft[r, :k], q.shape[-1]).float()
            u_accept[r, :k] = torch.tensor([keyed.uniform(s.seed, s.position + j, keyed.ACCEPT) for j in range(k)])
        device = probs.device
        index = torch.tensor(chains, device=device)
        n, _ = verify_draft(probs[index], draft.to(device), torch.tensor([len(proposals[i]) for i in chains], device=device),
                            None if q is None else q.to(device), u_accept.to(device), u_sample.to(device))
        for r, i in enumerate(chains):  # the next token from p or the residual, keyed by its own position
            accepted = int(n[r])
            s, p = seqs[i], proposals[i]
            u_sample[r] = keyed.uniform(s.seed, s.position + accepted, keyed.RESIDUAL)
        _, nxt = verify_draft(probs[index], draft.to(device), torch.tensor([len(proposals[i]) for i in chains], device=device),
                              None if q is None else q.to(device), u_accept.to(device), u_sample.to(device))
        for r, i in enumerate(chains):
            results[i] = (list(range(int(n[r]))), int(nxt[r]))
    for i, (s, p) in enumerate(zip(seqs, proposals)):
        if results[i] is not None:
            continue
        children, path, at = p.children(), [], 0
        while True:
            position = s.position + len(path)
            kids = children[at]
            if s.params.greedy:
                token = int(probs[i, at].argmax())
                child = next((c for c in kids if p.tokens[c] == token), None)
            else:
                candidates = [(p.tokens[c], None if p.q is None else p.q[c]) for c in kids]
                u = [keyed.uniform(s.seed, position, keyed.ACCEPT, j) for j in range(len(kids))]
                j, token = recursive_rejection(probs[i, at], candidates, u,
                                               keyed.uniform(s.seed, position, keyed.RESIDUAL))
                child = kids[j] if j >= 0 else None
            if child is None:
                results[i] = (path, token)
                break
            path.append(child)
            at = child + 1
    return results

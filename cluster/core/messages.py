"""What crosses workers each step: a StepPlan out, Proposals from drafters, Verdicts from targets.

A Proposal is a token tree rooted at the request's pending token (the last emitted one, not yet in the
target's cache). Node i carries tokens[i] and hangs under parents[i] (-1: the root); parents come before
children. A chain (parents = [-1, 0, 1, ...]) is the simplest tree and takes the fast path everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.types import SamplingParams, TokenLogprob


class SparseQ:
    """Draft distributions as they travel: node i's q is weights[i] on ids[i], normalised, zero elsewhere.
    A drafter samples from exactly this (its q truncated to the smallest support holding MASS, at most
    SUPPORT tokens, the weights rounded to fp16 and renormalised the same way on both sides), so
    acceptance against it is exact, and a node costs at most SUPPORT x 6 bytes (8 nodes: 1.5 KB) instead
    of a dense row of the vocabulary (150k floats for Qwen). Indexing gives dense rows."""

    SUPPORT, MASS = 32, 0.99

    def __init__(self, ids, probs, vocab: int):
        self.ids, self.probs, self.vocab = ids, probs, vocab  # numpy [n, m] int32, [n, m] float16 (compact pickles)

    @staticmethod
    def truncate(q):
        """(dense rows [R, V], [(ids, fp16 weights)] per row) of dense q rows [R, V]: a dense row is the
        distribution to sample from, and what indexing the shipped form gives back."""
        top = q.float().topk(min(SparseQ.SUPPORT, q.shape[-1]))
        keep = ((top.values.cumsum(-1) < SparseQ.MASS).sum(-1) + 1).tolist()  # the smallest prefix reaching MASS
        rows = [(top.indices[r, :k], top.values[r, :k].half()) for r, k in enumerate(keep)]
        return SparseQ.stack(rows, q.shape[-1])[:].to(q.device), rows

    @staticmethod
    def stack(rows: list[tuple], vocab: int) -> SparseQ:
        """From (ids, probs) per node; supports are right-padded with id 0 at probability 0."""
        import numpy as np

        m = max(len(ids) for ids, _ in rows)
        ids = np.zeros((len(rows), m), dtype=np.int32)
        probs = np.zeros((len(rows), m), dtype=np.float16)
        for i, (row_ids, row_weights) in enumerate(rows):
            ids[i, : len(row_ids)] = row_ids.cpu().numpy()
            probs[i, : len(row_weights)] = row_weights.half().cpu().numpy()
        return SparseQ(ids, probs, vocab)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def take(self, nodes) -> SparseQ:
        """These nodes' distributions, still compact (nodes: a slice or a list of node indices)."""
        return SparseQ(self.ids[nodes], self.probs[nodes], self.vocab)

    def __getitem__(self, index):
        """Dense rows: q[i] -> [V], q[a:b] -> [b - a, V]."""
        import torch

        ids, weights = torch.from_numpy(self.ids[index]).long(), torch.from_numpy(self.probs[index]).float()
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros(*ids.shape[:-1], self.vocab, dtype=torch.float32)
        return out.scatter_add_(-1, ids, weights)


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: object = None  # each node's draft distribution (rejection rule only): SparseQ, or a dense [n, V] tensor

    @staticmethod
    def chain(tokens: list[int], q=None) -> Proposal:
        return Proposal(list(tokens), list(range(-1, len(tokens) - 1)), q)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def first_branch(self) -> Proposal:
        """The chain that follows each node's first child from the root: what a backend that verifies
        chains only (MEGABYTE) checks of a tree. A first child is a draft from q like any sibling, so the
        acceptance rules stay exact."""
        if self.is_chain:
            return self
        nodes, parent = [], -1
        for i, p in enumerate(self.parents):
            if p == parent:
                nodes.append(i)
                parent = i
        return Proposal.chain([self.tokens[i] for i in nodes], self.q_of(nodes))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for children of the root."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def children(self) -> list[list[int]]:
        """children()[i + 1] lists node i's children; children()[0] the root's."""
        out: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    def truncated(self, budget: int) -> Proposal:
        """The first `budget` nodes (a valid tree: parents come first)."""
        if budget >= len(self.tokens):
            return self
        return Proposal(self.tokens[:budget], self.parents[:budget], self.q_of(slice(0, budget)))

    def q_of(self, nodes):
        """q of these nodes (a slice or a list), in the form it came in: SparseQ stays compact."""
        if self.q is None:
            return None
        return self.q.take(nodes) if isinstance(self.q, SparseQ) else self.q[nodes]

    def validate(self, vocab: int) -> None:
        if len(self.parents) != len(self.tokens):
            raise ValueError("proposal: tokens and parents differ in length")
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if not -1 <= p < i:
                raise ValueError(f"proposal: node {i} has parent {p} (parents must come first)")
            if not 0 <= t < vocab:
                raise ValueError(f"proposal: token {t} outside the vocabulary")

    def path_tokens(self, path: list[int]) -> list[int]:
        return [self.tokens[i] for i in path]


@dataclass
class Verdict:
    """One request's verify pass: the accepted path (node indices, root to leaf), then the target's next
    token. Emitted = tokens along the path + [token]."""

    path: list[int]
    token: int
    logprobs: list[TokenLogprob] | None = None
    # [H], when asked: the target's last hidden state at the position whose logits chose `token` (the end of
    # the accepted path): what parallel heads read to draft the tokens after it.
    hidden: object = None

    @property
    def accepted(self) -> int:
        return len(self.path)


@dataclass
class Prefill:
    """Admit a request to a target worker: cache its tokens and emit its first token (unless resuming)."""

    seq_id: str
    target: str
    tokens: list[int]
    num_prompt: int
    params: SamplingParams
    seed: int
    resume: bool = False  # after a failover: tokens[-1] was already emitted; cache the rest, emit nothing
    want_hidden: bool = False  # return the last position's hidden state (drafters that read it)
    # Hold the tokens and run no pass: the first verify pass feeds the prompt before the proposal and
    # emits the first token (SpeculationConfig.defer_prefill).
    defer: bool = False


@dataclass
class DraftTask:
    """Ask a draft worker for up to `budget` nodes for a request. The worker keeps each request's tokens;
    `new_tokens` (from position `start`) brings it up to date."""

    seq_id: str
    drafter: str
    start: int
    new_tokens: list[int]
    budget: int
    params: SamplingParams
    seed: int
    num_prompt: int
    now: bool = True  # needed by this step's verify (False: drafted for the next step, beside it)
    last_accepted: int | None = None  # how much of this request's previous proposal was accepted
    hidden: object = None  # [H] the target's hidden state behind the pending token (drafters that read it)
    # Drafted on from the end of the request's held proposal while that proposal is verified (new_tokens
    # end with it): node 0 guesses the target's next token; the rest is usable only if all of the
    # proposal is accepted and the guess is right (see `continuation`).
    continues: bool = False
    # A continuation of the draft this step makes now (the request held none): its new_tokens end where
    # that draft begins, and the executor appends the draft's tokens once it has them.
    after_draft: bool = False

    @property
    def reads_prompt(self) -> bool:
        """The drafter holds none of this request yet: the call first reads its whole prompt (a prefill)."""
        return self.start == 0


def continuation(tokens: list[int], task: DraftTask, proposal: Proposal) -> Proposal | None:
    """The next proposal a continuing draft gives a request whose tokens are now `tokens`, or None. It
    holds exactly when the tokens the drafter assumed are the ones emitted: the held proposal was all
    accepted, the target's next token is the guess (node 0), and nothing else was emitted since. Its
    nodes are then draws from q given the request's real prefix, as a fresh draft's would be. (Output
    would stay exact even without this check, since every node is verified and the rejection rule holds
    for any q a node was drawn from; the check keeps drafts made for another prefix from costing a pass.)"""
    end = task.start + len(task.new_tokens)
    if len(proposal) < 2 or not proposal.is_chain or len(tokens) != end + 1:
        return None
    if tokens[task.start:end] != task.new_tokens or tokens[end] != proposal.tokens[0]:
        return None
    return Proposal.chain(proposal.tokens[1:], proposal.q_of(slice(1, None)))


@dataclass
class VerifyTask:
    """Verify a request's proposal on its target worker. proposal None: use the one drafted this step."""

    seq_id: str
    target: str
    proposal: Proposal | None = None
    want_hidden: bool = False


@dataclass
class StepPlan:
    admit: list[Prefill] = field(default_factory=list)
    draft: list[DraftTask] = field(default_factory=list)
    verify: list[VerifyTask] = field(default_factory=list)
    pipelined: bool = False  # some drafts are for the other group (next step), made while this one verifies
    predicted_s: float = 0.0  # the cost model's prediction for this step
    predicted_tokens: float = 0.0  # tokens the verified requests are expected to emit (drafts accepted + 1 each)
    predicted_verify_s: float = 0.0  # its parts, as the cost curves see them (prefill included in verify)
    predicted_draft_s: float = 0.0

    @property
    def empty(self) -> bool:
        return not (self.admit or self.draft or self.verify)


@dataclass
class VerifyMetadata:
    """Flat ragged metadata of one verify pass (vLLM's SpecDecodeMetadata): row i's drafts are
    draft_token_ids[cu_num_draft[i]:cu_num_draft[i + 1]]; its target logits at the draft positions are
    rows target_logits_indices[...] of the flattened [B * T, V] logits, and its bonus logits (after the
    last draft) row bonus_logits_indices[i]. T = width of the pass (1 + longest draft)."""

    draft_token_ids: list[int]
    num_draft: list[int]
    cu_num_draft: list[int]
    target_logits_indices: list[int]
    bonus_logits_indices: list[int]
    width: int

    @staticmethod
    def from_chains(drafts: list[list[int]]) -> VerifyMetadata:
        width = 1 + max((len(d) for d in drafts), default=0)
        cu, flat, target, bonus = [0], [], [], []
        for i, d in enumerate(drafts):
            flat += d
            cu.append(cu[-1] + len(d))
            target += [i * width + j for j in range(len(d))]
            bonus.append(i * width + len(d))
        return VerifyMetadata(flat, [len(d) for d in drafts], cu, target, bonus, width)

    @staticmethod
    def make_dummy(num_draft: list[int], vocab: int = 100) -> VerifyMetadata:
        """For tests: drafts of the given lengths with token ids 0, 1, 2, ... mod vocab."""
        tokens = iter(range(10**9))
        return VerifyMetadata.from_chains([[next(tokens) % vocab for _ in range(n)] for n in num_draft])

    def padded(self) -> list[list[int]]:
        """Each row's drafts, right-padded with -1 to width - 1."""
        return [self.draft_token_ids[a:b] + [-1] * (self.width - 1 - (b - a))
                for a, b in zip(self.cu_num_draft, self.cu_num_draft[1:])]

"""Several drafters at once: their proposals merged into one token tree (shared prefixes once), verified
in one target pass. Each member is scored online from what the target accepted of its own nodes (no
extra target cost), and the better members fill the budget first. A costly member can be a fallback,
asked only for the requests the others drafted little for.

Lossless with the coupled rule (the default): the target takes the child equal to its own token, however
many siblings there are. Under the rejection rule a merged tree of sampled drafts would not keep the
independent draws recursive rejection needs, so members that sample are refused there.
"""

from __future__ import annotations

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest
from cluster.drafters.registry import DRAFTERS, build_drafter


class MultiDrafter(Drafter):
    name = "multi"

    def __init__(self, members: dict[str, Drafter], fallback: tuple[str, ...] = (), fallback_below: int = 4):
        self.members = members
        self.fallback, self.fallback_below = tuple(fallback), fallback_below
        self.score = {name: [1.0, 2.0] for name in members}  # accepted, proposed (a small prior)
        self.last: dict[str, tuple[int, Proposal, list[set[str]]]] = {}  # seq -> (length, tree, owners per node)

    @property
    def num_sequences(self) -> int:
        return max((m.num_sequences for m in self.members.values()), default=0)

    def rates(self) -> dict[str, float]:
        return {name: a / p for name, (a, p) in self.score.items()}

    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        for r in batch:
            self._credit(r)
        by_member = {name: m.propose(batch) for name, m in self.members.items() if name not in self.fallback}
        short = [i for i in range(len(batch)) if max(len(p[i]) for p in by_member.values()) < self.fallback_below]
        for name in self.fallback:  # only where the others found little
            asked = self.members[name].propose([batch[i] for i in short]) if short else []
            by_member[name] = [Proposal() for _ in batch]
            for i, p in zip(short, asked):
                by_member[name][i] = p
        order = sorted(self.members, key=lambda n: -self.rates()[n])
        out = []
        for i, r in enumerate(batch):
            tree, owners = merge([(name, by_member[name][i]) for name in order], r.budget, self.rates())
            self.last[r.seq_id] = (len(r.tokens), tree, owners)
            for name in order:
                self.score[name][1] += sum(1 for o in owners if name in o)
            out.append(tree)
        return out

    def _credit(self, r: DraftRequest) -> None:
        """Walk the previous tree along the tokens that followed it: each accepted node credits its owners."""
        previous = self.last.pop(r.seq_id, None)
        if previous is None:
            return
        length, tree, owners = previous
        children, at = tree.children(), 0
        for token in r.tokens[length:]:
            child = next((c for c in children[at] if tree.tokens[c] == token), None)
            if child is None:
                break
            for name in owners[child]:
                self.score[name][0] += 1
            at = child + 1

    def observe(self, seq_id: str, accepted: int) -> None:
        for m in self.members.values():
            m.observe(seq_id, accepted)

    def release(self, seq_id: str) -> None:
        self.last.pop(seq_id, None)
        for m in self.members.values():
            m.release(seq_id)


def merge(proposals: list[tuple[str, Proposal]], budget: int,
          rates: dict[str, float] | None = None) -> tuple[Proposal, list[set[str]]]:
    """One tree from several, identical paths merged, at most `budget` nodes, likeliest first: a member's
    node at depth d scores rate(member)^d (its measured acceptance per node), a merged node its best
    owner's score. A confident long draft then keeps its depth (filling level by level gave every member
    two or three levels of an 8-node budget and cut an 8-deep suffix match to a third of its tokens).
    With equal rates this is level by level, members in the given order. Returns the tree and each
    node's owners."""
    rates = rates or {}
    candidates = []  # (-score, depth, member order, node, member)
    for m, (name, p) in enumerate(proposals):
        rate = min(max(rates.get(name, 0.5), 1e-6), 1.0)
        for node, depth in enumerate(p.depths()):
            candidates.append((-(rate ** depth), depth, m, node, name))
    candidates.sort()
    tokens, parents, owners = [], [], []
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    mapped = [dict() for _ in proposals]  # per member: its node -> merged node
    for _, _, m, node, name in candidates:
        p = proposals[m][1]
        parent = p.parents[node]
        merged_parent = -1 if parent < 0 else mapped[m].get(parent)
        if merged_parent is None:  # its parent did not fit the budget
            continue
        key = (merged_parent, p.tokens[node])
        if key not in index:
            if len(tokens) >= budget:
                continue
            index[key] = len(tokens)
            tokens.append(p.tokens[node])
            parents.append(merged_parent)
            owners.append(set())
        mapped[m][node] = index[key]
        owners[index[key]].add(name)
    return Proposal(tokens, parents), owners


def build(section, context) -> MultiDrafter:
    sampling = [m for m in section.members if DRAFTERS[m].model_based]
    if context.rule == "rejection" and sampling:
        raise ValueError(f"drafter.multi: members {sampling} sample; merge them under rule: coupled")
    return MultiDrafter({name: build_drafter(name, context.sections[name], context) for name in section.members},
                        tuple(section.fallback), section.fallback_below)

"""Verification with several candidates per position, without models: greedy takes the agreeing branch;
the coupled rule and recursive rejection keep the target's distribution with two and three siblings,
disjoint or identical ones included (chi-square, N = 40000, alpha = 1e-4)."""

import pytest
import torch
from scipy.stats import chisquare

from cluster.core.messages import Proposal
from cluster.sampling import keyed
from cluster.sampling.acceptance import accept_chain_coupled, coupled_choice, recursive_rejection, walk_tree

V, N = 6, 40000
P = torch.tensor([0.35, 0.05, 0.25, 0.0, 0.15, 0.2], dtype=torch.float64)
QS = {
    "two-random": [torch.tensor([0.1, 0.3, 0.1, 0.2, 0.2, 0.1]), torch.tensor([0.3, 0.1, 0.1, 0.1, 0.3, 0.1])],
    "three-random": [torch.tensor([0.1, 0.3, 0.1, 0.2, 0.2, 0.1]), torch.tensor([0.3, 0.1, 0.1, 0.1, 0.3, 0.1]),
                     torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.5])],
    "two-disjoint": [torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])],
    "three-identical": [P.float()] * 3,
}


def _assert_distributed_as(tokens: list[int], p: torch.Tensor):
    counts = torch.bincount(torch.tensor(tokens), minlength=V)
    assert counts[p == 0].sum() == 0, "emitted a token the target gives zero probability"
    keep = p > 0
    assert chisquare(counts[keep].numpy(), (p[keep] / p[keep].sum() * len(tokens)).numpy()).pvalue > 1e-4


def test_greedy_takes_the_branch_the_target_agrees_with():
    # Root children: 3 (node 0), 5 (node 1); under 5: 2 (node 2), 4 (node 3); under 4: 1 (node 4).
    tree = Proposal([3, 5, 2, 4, 1], [-1, -1, 1, 1, 3])
    chosen = [5, 0, 4, 0, 1, 0]  # the target's argmax after the root and after each node
    assert walk_tree(tree.tokens, tree.children(), chosen) == ([1, 3, 4], 0)
    assert walk_tree(tree.tokens, tree.children(), [2, 0, 0, 0, 0, 0]) == ([], 2)  # no child agrees


def test_chains_take_the_fast_path():
    chosen = torch.tensor([[4, 2, 7, 1], [4, 9, 7, 1]])
    n, nxt = accept_chain_coupled(chosen, torch.tensor([[4, 2, 7], [4, 2, 7]]), torch.tensor([3, 3]))
    assert n.tolist() == [3, 1] and nxt.tolist() == [1, 9]
    n, nxt = accept_chain_coupled(chosen, torch.tensor([[4, 2, 0], [5, 0, 0]]), torch.tensor([2, 1]))
    assert n.tolist() == [2, 0] and nxt.tolist() == [7, 4]
    # A pad that happens to equal the target's token is still a pad: row 0 drafted two tokens, not three.
    n, nxt = accept_chain_coupled(chosen, torch.tensor([[4, 2, 7], [4, 9, 7]]), torch.tensor([2, 3]))
    assert n.tolist() == [2, 3] and nxt.tolist() == [7, 1]


@pytest.mark.parametrize("name", sorted(QS))
def test_coupled_siblings_keep_the_distribution(name):
    """Each sibling is the race winner of its own q (distinct drafters) under the shared noise; the emitted
    token is t*. Its distribution is p, and it agrees with some sibling at least as often as the best one."""
    qs = QS[name]
    emitted, agreed = [], 0
    for seed in range(N // 4):
        noise = keyed.race_noise(seed, 0, V)
        siblings = sorted({int(coupled_choice(q.double(), noise)) for q in qs})
        tree = Proposal(siblings, [-1] * len(siblings))
        path, token = walk_tree(tree.tokens, tree.children(), [int(coupled_choice(P, noise))] + [0] * len(siblings))
        emitted.append(tree.tokens[path[0]] if path else token)
        agreed += bool(path)
    _assert_distributed_as(emitted, P)
    if name == "three-identical":
        assert agreed == len(emitted)  # q = p: the draft is always the target's own choice


@pytest.mark.parametrize("name", sorted(QS))
def test_recursive_rejection_keeps_the_distribution(name):
    qs = QS[name]
    gen = torch.Generator().manual_seed(0)
    emitted, accepted = [], 0
    for _ in range(N // 4):
        candidates = [(int(torch.multinomial(q, 1, generator=gen)), q) for q in qs]
        u = torch.rand(len(qs) + 1, generator=gen, dtype=torch.float64).tolist()
        j, token = recursive_rejection(P, candidates, u[:-1], u[-1])
        emitted.append(token)
        accepted += j >= 0
        assert j in range(-1, len(qs)) and (j < 0 or token == candidates[j][0])
    _assert_distributed_as(emitted, P)
    if name == "two-disjoint":
        assert accepted < len(emitted) * 0.1  # p gives most of these drafts little or no mass
    if name == "three-identical":
        assert accepted == len(emitted)  # q = p: r / q = 1, the first candidate is always kept


def test_recursive_rejection_with_deterministic_candidates_keeps_the_distribution():
    """One-hot candidates (q = None: prompt lookup, greedy drafts): accepted with probability r(x), then
    r loses x; a token nobody proposed comes from the last residual."""
    gen = torch.Generator().manual_seed(1)
    emitted, first = [], 0
    for _ in range(N // 4):
        u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
        j, token = recursive_rejection(P, [(0, None), (2, None)], u[:-1], u[-1])
        assert j in (-1, 0, 1) and (j < 0 or token == (0, 2)[j]) and (j >= 0 or token not in (0, 2))
        emitted.append(token)
        first += j == 0
    _assert_distributed_as(emitted, P)
    assert abs(first / len(emitted) - float(P[0])) < 0.02  # the first candidate is accepted w.p. p(x)


def test_flat_verify_metadata():
    from cluster.core.messages import VerifyMetadata

    meta = VerifyMetadata.make_dummy([2, 0, 3])
    assert meta.width == 4 and meta.num_draft == [2, 0, 3] and meta.cu_num_draft == [0, 2, 2, 5]
    assert meta.draft_token_ids == [0, 1, 2, 3, 4]
    assert meta.target_logits_indices == [0, 1, 8, 9, 10] and meta.bonus_logits_indices == [2, 4, 11]
    assert meta.padded() == [[0, 1, -1], [-1, -1, -1], [2, 3, 4]]


@pytest.mark.parametrize("rule", ["rejection", "coupled"])
def test_drafter_and_target_draws_composed_through_their_real_keys_keep_p(rule):
    """The drafter's keyed draw (draft_choices, at DraftRequest.position) then the target's keyed
    acceptance (at _TargetSeq.position), over many seeds: the first emitted token follows p. With
    q = (.5, .5) and p = (.25, .75) a draft that reused the acceptance uniform would emit token 0 half
    the time (it is drawn when u < .5 and then always accepted)."""
    from cluster.drafters.base import DraftRequest
    from cluster.sampling.acceptance import draft_choices
    from cluster.types import SamplingParams
    from cluster.workers.target_worker import _TargetSeq, accept_coupled, accept_rejection

    p = torch.tensor([0.25, 0.75, 0.0, 0.0, 0.0, 0.0])
    q = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    params = SamplingParams(temperature=1.0, max_tokens=8)
    probs = torch.stack([p, p]).unsqueeze(0)  # [1, K + 1 = 2, V]
    accept = accept_rejection if rule == "rejection" else accept_coupled
    tokens, kept = [], 0
    for seed in range(4000):
        request = DraftRequest("r", [7, 8, 9], 1, params, seed, num_prompt=2)
        x = int(draft_choices(q.unsqueeze(0), [seed], [request.position], rule)[0])
        seq = _TargetSeq(0, [7, 8, 9], 2, params, seed)
        path, nxt = accept(probs, [seq], [Proposal.chain([x], q.unsqueeze(0))])[0]
        tokens.append(x if path else nxt)
        kept += bool(path)
    _assert_distributed_as(tokens, p.double())
    # Both rules keep the draft w.p. sum(min(p, q)) = 0.75 here (rejection: by the ratio test; coupled: the
    # shared race makes the draft the target's own choice that often). Drafting apart from the rule gives 0.5.
    assert abs(kept / len(tokens) - 0.75) < 0.03, kept / len(tokens)

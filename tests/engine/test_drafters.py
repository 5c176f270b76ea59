"""Every drafter kind (issue 11): greedy output equals target-only, seeded sampled output equals
target-only token for token (the coupled rule), and each kind's own mechanics."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.config import DrafterConfig
from cluster.core.messages import Proposal
from cluster.drafters.base import DraftRequest
from cluster.drafters.configs import HeadsConfig, LayerSkipConfig, MultiConfig, QuantizedConfig, SuffixConfig
from cluster.drafters.multi import merge
from cluster.drafters.suffix import SuffixDrafter
from cluster.engine import SpecEngine
from cluster.models.backend import Row
from cluster.types import SamplingParams
from tests.engine.test_sampling_positions import check_positions

PROMPTS = ["def add(a, b):\n    return", "import os\n", "for i in range(10):\n    print(i)\nfor i in range(10):\n",
           "x", "class A:\n    def f(self):\n        return self\n\nclass B:\n"]
KINDS = {
    "suffix": DrafterConfig("suffix", {"suffix": SuffixConfig()}),
    "layerskip": DrafterConfig("layerskip", {"layerskip": LayerSkipConfig(layers=1)}),
    "quantized": DrafterConfig("quantized", {"quantized": QuantizedConfig()}),
    "quantized:int4": DrafterConfig("quantized", {"quantized": QuantizedConfig("int4")}),
    "quantized:fp8": DrafterConfig("quantized", {"quantized": QuantizedConfig("fp8")}),
    "multi": DrafterConfig("multi", {"multi": MultiConfig(["ngram", "suffix", "layerskip"]),
                                     "layerskip": LayerSkipConfig(layers=1)}),
}


KINDS_WITH_FILES = {"heads": "hydra", "heads:medusa": "medusa"}  # their config names weights a fixture builds


def _train_heads(tiny_models, out, *extra):
    from tools.train_heads import main as train_heads

    return train_heads(["--target", str(tiny_models["target"]), "--out", str(out), "--prompts", "24", "--max-tokens",
                        "24", "--batch", "8", "--max-steps", "40", "--train-batch", "64", *extra])


@pytest.fixture(scope="session")
def tiny_heads(tiny_models, tmp_path_factory):
    """Hydra heads for the tiny target over its 200 most frequent tokens, trained by the real script for a
    few steps."""
    out = tmp_path_factory.mktemp("heads")
    return out, _train_heads(tiny_models, out, "--vocab", "200")


@pytest.fixture(scope="session")
def tiny_medusa(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("medusa")
    return out, _train_heads(tiny_models, out, "--arch", "medusa", "--heads", "4")


def _drafter(kind: str, heads_dir=None) -> DrafterConfig:
    if kind.startswith("heads"):
        return DrafterConfig("heads", {"heads": HeadsConfig(str(heads_dir), top_k=2)})
    return KINDS[kind]


def _engine(make_engine, kind: str, heads_dir=None, rule: str = "coupled", **limits) -> SpecEngine:
    base = make_engine("ngram", k=6, rule=rule, **limits)
    config = base.config
    config.drafter = _drafter(kind, heads_dir)
    config.validate(check_paths=False)
    return SpecEngine(config, tokenizer=base.tokenizer, target=base.target)


@pytest.fixture(scope="module")
def target_only(make_engine):
    return make_engine("ngram", k=0)


@pytest.mark.parametrize("kind", sorted(KINDS) + sorted(KINDS_WITH_FILES))
def test_every_kind_is_exact_greedy_and_sampled(make_engine, target_only, tiny_heads, tiny_medusa, kind):
    engine = _engine(make_engine, kind, (tiny_medusa if kind == "heads:medusa" else tiny_heads)[0])
    greedy = SamplingParams(max_tokens=32)
    assert [o.token_ids for o in engine.generate(PROMPTS, greedy)] == \
        [o.token_ids for o in target_only.generate(PROMPTS, greedy)]
    sampled = [SamplingParams(max_tokens=32, temperature=0.9, seed=i) for i in range(len(PROMPTS))]
    assert [o.token_ids for o in engine.generate(PROMPTS, sampled)] == \
        [o.token_ids for o in target_only.generate(PROMPTS, sampled)]
    assert engine.stats.drafted > 0 and engine.stats.accepted > 0


def test_suffix_drafter_learns_from_earlier_outputs(make_engine, target_only):
    """A request repeating an earlier request's output is drafted from the shared index, long and right."""
    engine = _engine(make_engine, "suffix")
    first = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40))[0]
    before = engine.stats.accepted
    again = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40))[0]
    assert again.token_ids == first.token_ids
    assert again.stats.accepted >= 0.6 * len(again.token_ids)  # most tokens came from accepted drafts
    assert engine.stats.accepted - before == again.stats.accepted


def test_suffix_trees_branch_on_frequency():
    drafter = SuffixDrafter(max_context=4, min_score=0.2, max_width=2)
    tokens = [7, 1, 2, 3, 7, 1, 2, 3, 7, 1, 2, 4, 7, 1, 2]  # the longest known context, [7, 1, 2]: 3 twice, 4 once
    (proposal,) = drafter.propose([DraftRequest("r", tokens, 4, SamplingParams(), 0, 0)])
    assert proposal.tokens[:2] == [3, 4] and proposal.parents[:2] == [-1, -1]  # two siblings, the likelier first
    assert [proposal.tokens[i] for i, p in enumerate(proposal.parents) if p == 0] == [7]  # after [.., 3]: 7


def test_a_fallback_member_is_asked_only_where_the_others_found_little():
    """multi.fallback: a costly member drafts only the requests the other members proposed fewer than
    fallback_below nodes for; its nodes join those trees, and the others' trees are theirs alone."""
    from cluster.config import ConfigError
    from cluster.drafters.base import Drafter
    from cluster.drafters.multi import MultiDrafter
    from cluster.types import SamplingParams as P

    class Fixed(Drafter):
        def __init__(self, chains):
            self.chains, self.asked = chains, []

        def propose(self, batch):
            self.asked += [r.seq_id for r in batch]
            return [Proposal.chain(self.chains[r.seq_id]) for r in batch]

    search = Fixed({"long": [1, 2, 3, 4, 5], "short": [7], "none": []})
    costly = Fixed({"long": [9], "short": [7, 8], "none": [6, 6]})
    multi = MultiDrafter({"search": search, "costly": costly}, fallback=("costly",), fallback_below=4)
    batch = [DraftRequest(s, [0, 1], 8, P()) for s in ("long", "short", "none")]
    long, short, none = multi.propose(batch)
    assert costly.asked == ["short", "none"] and search.asked == ["long", "short", "none"]
    assert long.tokens == [1, 2, 3, 4, 5] and sorted(short.tokens) == [7, 8] and none.tokens == [6, 6]
    for bad in (MultiConfig(["ngram", "heads"], fallback=["suffix"]), MultiConfig(["heads"], fallback=["heads"])):
        with pytest.raises(ConfigError, match="fallback"):
            bad.validate("drafter.multi")


def test_merged_trees_share_prefixes_and_respect_the_budget():
    a = Proposal.chain([5, 6, 7])
    b = Proposal([5, 9, 6], [-1, 0, 0])
    tree, owners = merge([("a", a), ("b", b)], budget=4)
    assert tree.tokens == [5, 6, 9, 7] and tree.parents == [-1, 0, 0, 1]
    assert owners == [{"a", "b"}, {"a", "b"}, {"b"}, {"a"}]


def test_merged_trees_give_a_confident_member_its_depth():
    """Nodes go in by rate(member)^depth: an 8-deep draft from a member accepted 90% of the time keeps all
    8 nodes of an 8-node budget over a weak member's siblings; with the rates turned, the weak one gets in."""
    deep, weak = Proposal.chain(list(range(1, 9))), Proposal.chain([20, 21, 22])
    tree, owners = merge([("deep", deep), ("weak", weak)], budget=8, rates={"deep": 0.9, "weak": 0.1})
    assert tree.tokens == list(range(1, 9)) and tree.is_chain
    tree, _ = merge([("deep", deep), ("weak", weak)], budget=8, rates={"deep": 0.5, "weak": 0.6})
    assert tree.tokens[:2] == [20, 1] and len(tree) == 8  # the likelier first; both trees share the budget


@pytest.mark.slow
def test_multi_drafter_keeps_the_distribution_at_every_position(make_engine, tiny_models):
    engine = _engine(make_engine, "multi", max_batch_size=64, max_waiting=3000)
    hf_target = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    pvalues = check_positions(engine, engine.tokenizer, hf_target, dict(temperature=1.0), seeds=range(2500))
    assert (pvalues > 1e-4).all(), pvalues


def test_the_heads_script_trains_and_the_heads_draft_trees(make_engine, tiny_heads):
    """tools/train_heads.py end to end: the loss falls, the record says how the heads were made; the
    drafter proposes trees (siblings from each head's top-k) from the hidden states verify passes return."""
    out, meta = tiny_heads
    assert (out / "heads.safetensors").is_file() and meta["steps"] == 40 and meta["final_loss"] < meta["initial_loss"]
    assert meta["arch"] == "hydra" and len(meta["held_out_top1"]) == 5 and meta["train_positions"] > 0
    assert meta["vocab"] in (200, 201)  # the 200 most frequent tokens, and EOS where it is not among them
    engine = _engine(make_engine, "heads", out)
    assert engine.scheduler.config.want_hidden
    seen = []
    propose = engine.drafter.drafter.propose

    def recording(batch):
        proposals = propose(batch)
        seen.extend(zip(batch, proposals))
        return proposals

    engine.drafter.drafter.propose = recording
    engine.generate(PROMPTS[:2], SamplingParams(max_tokens=16))
    assert all(r.hidden is not None for r, _ in seen)  # from the prefill, then from every verify
    assert any(not p.is_chain for _, p in seen)  # top-2 per head: trees
    assert all(len(p) <= r.budget for r, p in seen)
    proposable = set(engine.drafter.drafter.heads.vocab.tolist())
    assert len(proposable) == meta["vocab"] and all(set(p.tokens) <= proposable for _, p in seen)
    assert any(len(p) > 1 and not p.is_chain and max(p.depths()) >= 2 for _, p in seen)  # deeper than one level


def test_heads_cut_to_their_most_frequent_tokens_propose_only_those(make_engine, target_only, tiny_heads):
    """drafter.heads.vocab: a prefix of the frequency-ranked tokens the heads were trained on (a cheaper
    head read per depth); what they propose stays inside it and the output stays the target's."""
    from cluster.drafters.heads import load_heads

    out, _ = tiny_heads
    trained = load_heads(out)[0].vocab[:50].tolist()
    base = make_engine("ngram", k=6)
    config = base.config
    config.drafter = DrafterConfig("heads", {"heads": HeadsConfig(str(out), top_k=2, vocab=50)})
    engine = SpecEngine(config, tokenizer=base.tokenizer, target=base.target)
    seen = []
    propose = engine.drafter.drafter.propose
    engine.drafter.drafter.propose = lambda batch: seen.extend(propose(batch)) or seen[-len(batch):]
    greedy = SamplingParams(max_tokens=24)
    assert [o.token_ids for o in engine.generate(PROMPTS[:3], greedy)] == \
        [o.token_ids for o in target_only.generate(PROMPTS[:3], greedy)]
    assert any(len(p) for p in seen) and all(set(p.tokens) <= set(trained) for p in seen)


def test_a_heads_tree_is_its_best_nodes_parents_first():
    import math

    from cluster.drafters.heads import _tree

    # (score, depth, token, parent): a .6, b .3, then a's children c .27, d .24 and b's child e .15
    nodes = [(math.log(.6), 0, 1, -1), (math.log(.3), 0, 2, -1), (math.log(.27), 1, 3, 0),
             (math.log(.24), 1, 4, 0), (math.log(.15), 1, 5, 1)]
    tree = _tree(nodes, budget=4)
    assert tree.tokens == [1, 2, 3, 4] and tree.parents == [-1, -1, 0, 0]
    listed = [(math.log(.27), 1, 3, 3), (math.log(.24), 1, 4, 3), (math.log(.15), 1, 5, 4),
              (math.log(.6), 0, 1, -1), (math.log(.3), 0, 2, -1)]
    tree = _tree(listed, budget=5)  # children listed first: parents still lead
    assert tree.tokens == [1, 2, 3, 4, 5] and tree.parents == [-1, -1, 0, 0, 1]
    assert _tree(nodes, budget=1).tokens == [1] and _tree([], 3).tokens == []


def test_best_paths_take_the_likeliest_first_within_the_budget():
    from cluster.drafters.heads import best_paths

    # depth 1: a (log .6), b (log .3); depth 2: c (log .45), d (log .4)
    import math
    lp = [[(1, math.log(0.6)), (2, math.log(0.3))], [(3, math.log(0.45)), (4, math.log(0.4))]]
    tree = best_paths(lp, budget=4)
    # scores: a .6, b .3, a-c .27, a-d .24, b-c .135
    assert tree.tokens == [1, 2, 3, 4] and tree.parents == [-1, -1, 0, 0]
    assert best_paths(lp, budget=1).tokens == [1] and best_paths([], 3).tokens == []
    tree = best_paths(lp, budget=6)
    assert all(p < i for i, p in enumerate(tree.parents)) and len(tree) == 6


@pytest.mark.slow
def test_heads_trees_keep_the_distribution_under_the_rejection_rule(make_engine, tiny_models, tiny_heads):
    """Deterministic sibling candidates (q one-hot) through recursive rejection, at every position."""
    engine = _engine(make_engine, "heads", tiny_heads[0], rule="rejection", max_batch_size=64, max_waiting=3000)
    hf_target = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    pvalues = check_positions(engine, engine.tokenizer, hf_target, dict(temperature=1.0), seeds=range(2500))
    assert (pvalues > 1e-4).all(), pvalues
    assert engine.stats.accepted > 0


def test_a_frequency_ranked_draft_head_drafts_only_its_tokens_and_stays_exact(make_engine, tiny_models, target_only):
    """drafter.model.vocab (FR-Spec): the draft's head keeps the most frequent tokens; the others get -inf,
    so they are never drafted, and output stays the target's, greedy and sampled."""
    from tests.conftest import drafter_config

    base = make_engine("ngram", k=4)
    config = base.config
    config.drafter = drafter_config(tiny_models, "model", "draft_noisy")
    config.drafter.section.vocab = 96
    engine = SpecEngine(config.validate(check_paths=False), tokenizer=base.tokenizer, target=base.target)
    ids = engine.drafter.drafter.backend.head_ids
    assert len(ids) == 96 + 1 and base.tokenizer.eos_token_id in ids.tolist()  # the 96, and the end of text
    config.drafter = drafter_config(tiny_models, "model", "draft_noisy")  # the same draft, every token
    whole = SpecEngine(config.validate(check_paths=False), tokenizer=base.tokenizer, target=base.target)
    assert whole.drafter.drafter.backend.head_ids is None
    prompt = base.tokenizer.encode("def add(a, b):")
    reduced, full = (_last_logits(e.drafter.drafter.backend, prompt) for e in (engine, whole))
    kept = torch.zeros(len(full), dtype=torch.bool)
    kept[ids] = True
    assert torch.isinf(reduced[~kept]).all() and torch.allclose(reduced[kept], full[kept], atol=1e-5)
    drafted: list[int] = []
    propose = engine.drafter.drafter.propose

    def recording(batch):
        proposals = propose(batch)
        drafted.extend(t for p in proposals for t in p.tokens)
        return proposals

    engine.drafter.drafter.propose = recording
    greedy = SamplingParams(max_tokens=32)
    assert [o.token_ids for o in engine.generate(PROMPTS, greedy)] == \
        [o.token_ids for o in target_only.generate(PROMPTS, greedy)]
    sampled = [SamplingParams(max_tokens=32, temperature=0.9, seed=i) for i in range(len(PROMPTS))]
    assert [o.token_ids for o in engine.generate(PROMPTS, sampled)] == \
        [o.token_ids for o in target_only.generate(PROMPTS, sampled)]
    assert drafted and set(drafted) <= set(ids.tolist())
    assert engine.stats.accepted > 0


def _last_logits(backend, tokens: list[int]) -> torch.Tensor:
    slot = backend.cache.allocate()
    try:
        return backend.forward([Row(slot, tokens)], last_only=True).logits[-1]
    finally:
        backend.cache.free(slot)

"""Every drafter kind (issue 11): greedy output equals target-only, seeded sampled output equals
target-only token for token (the coupled rule), and each kind's own mechanics."""

import pytest
from transformers import AutoModelForCausalLM

from cluster.config import DrafterConfig
from cluster.core.messages import Proposal
from cluster.drafters.base import DraftRequest
from cluster.drafters.configs import LayerSkipConfig, MultiConfig, QuantizedConfig, SuffixConfig
from cluster.drafters.multi import merge
from cluster.drafters.suffix import SuffixDrafter
from cluster.engine import SpecEngine
from cluster.types import SamplingParams
from tests.engine.test_sampling_positions import check_positions

PROMPTS = ["def add(a, b):\n    return", "import os\n", "for i in range(10):\n    print(i)\nfor i in range(10):\n",
           "x", "class A:\n    def f(self):\n        return self\n\nclass B:\n"]
KINDS = {
    "suffix": DrafterConfig("suffix", {"suffix": SuffixConfig()}),
    "layerskip": DrafterConfig("layerskip", {"layerskip": LayerSkipConfig(layers=1)}),
    "quantized": DrafterConfig("quantized", {"quantized": QuantizedConfig()}),
    "multi": DrafterConfig("multi", {"multi": MultiConfig(["ngram", "suffix", "layerskip"]),
                                     "layerskip": LayerSkipConfig(layers=1)}),
}


def _engine(make_engine, kind: str, **limits) -> SpecEngine:
    base = make_engine("ngram", k=6, **limits)
    config = base.config
    config.drafter = KINDS[kind]
    config.validate(check_paths=False)
    return SpecEngine(config, tokenizer=base.tokenizer, target=base.target)


@pytest.fixture(scope="module")
def target_only(make_engine):
    return make_engine("ngram", k=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_is_exact_greedy_and_sampled(make_engine, target_only, kind):
    engine = _engine(make_engine, kind)
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


def test_merged_trees_share_prefixes_and_respect_the_budget():
    a = Proposal.chain([5, 6, 7])
    b = Proposal([5, 9, 6], [-1, 0, 0])
    tree, owners = merge([("a", a), ("b", b)], budget=4)
    assert tree.tokens == [5, 6, 9, 7] and tree.parents == [-1, 0, 0, 1]
    assert owners == [{"a", "b"}, {"a", "b"}, {"b"}, {"a"}]


@pytest.mark.slow
def test_multi_drafter_keeps_the_distribution_at_every_position(make_engine, tiny_models):
    engine = _engine(make_engine, "multi", max_batch_size=64, max_waiting=3000)
    hf_target = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()
    pvalues = check_positions(engine, engine.tokenizer, hf_target, dict(temperature=1.0), seeds=range(2500))
    assert (pvalues > 1e-4).all(), pvalues

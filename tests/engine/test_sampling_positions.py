"""Sampling keeps the target's distribution at every output position, through the engine.

5000 seeded samples of 8 tokens per setting. Every position (the prefill token, draft positions 1..3 of
a K=3 draft, the bonus token, and later passes) is tested against the exact processed p of its own
prefix (tests/stats.py). The model drafter gives real q and partial acceptance; prompt lookup gives
one-hot q, as does a deterministic model draft (GreedyOneHotDrafter). Settings: T = 1; T = 0.7 with top-p 0.9; top-k 5. Power: tools/break_tests.py runs this test
against a rule whose residual is 5% wrong (0.95 r + 0.05 uniform over p's support) and against other
breakages; see the README for the figures."""

from dataclasses import replace

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest
from cluster.engine import SpecEngine
from cluster.types import SamplingParams
from tests.stats import exact_position_probs, rank_category_pvalues

pytestmark = pytest.mark.slow

PROMPT = "def add(a, b):\n    return"
SAMPLES, POSITIONS, ALPHA = 5000, 8, 1e-4
SETTINGS = {"t1": dict(temperature=1.0), "t07_top_p09": dict(temperature=0.7, top_p=0.9),
            "top_k5": dict(temperature=1.0, top_k=5)}


@pytest.fixture(scope="module")
def hf_target(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()


def check_positions(engine_or_router, tokenizer, hf_target, setting: dict, prompt: str = PROMPT, seeds=range(SAMPLES)):
    """Sample, then test every position; returns (per-position p-values, accepted-per-verify counts)."""
    params = [SamplingParams(max_tokens=POSITIONS, seed=s, **setting) for s in seeds]
    outputs = engine_or_router.generate([prompt] * len(params), params)
    ids = tokenizer.encode(prompt)
    tokens, mask, probs = exact_position_probs(hf_target, ids, [o.token_ids for o in outputs], POSITIONS,
                                               setting["temperature"], setting.get("top_k", 0),
                                               setting.get("top_p", 1.0))
    pvalues, zero = rank_category_pvalues(tokens, mask, probs)
    assert zero == 0, f"{zero} tokens emitted with zero target probability"
    assert mask[:, -1].sum() > len(params) // 2, "most samples must reach the last position"
    return pvalues


def accepted_histogram(metrics, drafter: str) -> dict[int, float]:
    """verify passes by accepted count (from the cumulative histogram)."""
    cumulative = {k: metrics.value("specdec_accepted_per_verify_bucket", drafter=drafter, le=f"{k}.0")
                  for k in range(9)}
    return {k: cumulative[k] - cumulative.get(k - 1, 0.0) for k in range(9)}


class GreedyOneHotDrafter(Drafter):
    """The noisy draft model's argmax, reported without q: a deterministic (one-hot) draft that the
    target accepts often, so the q = None path is exercised at every draft position at T > 0."""

    name = "model"

    def __init__(self, inner):
        self.inner = inner

    def propose(self, batch):
        greedy = [DraftRequest(r.seq_id, r.tokens, r.budget, SamplingParams(max_tokens=r.params.max_tokens), r.seed,
                               r.num_prompt) for r in batch]
        return [Proposal.chain(p.tokens) for p in self.inner.propose(greedy)]

    def release(self, seq_id):
        self.inner.release(seq_id)

    @property
    def num_sequences(self):
        return self.inner.num_sequences


# Coverage floors: verify passes accepting >= 2 draft tokens, and accepting all 3 (then a bonus token is
# sampled). Prompt lookup is rarely right at T = 1 on this tiny target; the one-hot path is covered by
# the deterministic model draft.
COVERAGE = {"model": (100, 30), "onehot": (100, 30), "ngram": (20, 3)}


CASES = [(kind, setting) for kind in ("model", "ngram") for setting in sorted(SETTINGS)] + [("onehot", "t1")]


@pytest.mark.parametrize("kind,setting", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_every_position_follows_the_target(make_engine, hf_target, kind, setting):
    """The coupled rule (the default): both drafters in every setting; the deterministic model draft at T = 1
    (its one-hot path does not depend on the filters)."""
    _check_kind(make_engine, hf_target, kind, setting, "coupled")


@pytest.mark.parametrize("kind,setting,defer", [("model", "t1", False), ("onehot", "t1", False), ("model", "t1", True)],
                         ids=["model-t1", "onehot-t1", "model-t1-deferred"])
def test_the_rejection_rule_follows_the_target_at_every_position(make_engine, hf_target, kind, setting, defer):
    """Leviathan/Chen rejection through the engine: q read at each draft position, the draft's own keyed
    uniforms, the residual at the first rejection, the bonus after a full accept. Deferred: the prompt rides
    in the first verify pass, so position 0 is a verified draft position too."""
    _check_kind(make_engine, hf_target, kind, setting, "rejection", defer)


def _check_kind(make_engine, hf_target, kind: str, setting: str, rule: str, defer: bool = False):
    engine = make_engine("ngram" if kind == "ngram" else "model", k=3, draft="draft_noisy", max_batch_size=64,
                         max_waiting=SAMPLES, rule=rule)
    if kind == "onehot" or defer:
        config = replace(engine.config, speculation=replace(engine.config.speculation, defer_prefill=defer))
        drafter = GreedyOneHotDrafter(engine.drafter.drafter) if kind == "onehot" else engine.drafter.drafter
        engine = SpecEngine(config, tokenizer=engine.tokenizer, target=engine.target, drafter=drafter)
    pvalues = check_positions(engine, engine.tokenizer, hf_target, SETTINGS[setting])
    assert (pvalues > ALPHA).all(), f"positions failing: {np.flatnonzero(pvalues <= ALPHA).tolist()} {pvalues}"
    by_accepted = accepted_histogram(engine.metrics, "ngram" if kind == "ngram" else "model")
    multi, full = COVERAGE[kind]
    assert sum(v for k, v in by_accepted.items() if k >= 2) >= multi and by_accepted[3] >= full, by_accepted


def test_mixed_greedy_and_sampled_batch(make_engine, hf_target):
    """Half the batch greedy, half sampled, verified together: greedy rows equal target-only, sampled
    rows follow p at every position."""
    engine = make_engine("model", k=3, draft="draft_noisy", max_batch_size=64, max_waiting=6000)
    greedy = SamplingParams(max_tokens=POSITIONS)
    expected = make_engine("ngram", k=0).generate([PROMPT], greedy)[0].token_ids
    setting = SETTINGS["t1"]
    params = [greedy if i % 2 else SamplingParams(max_tokens=POSITIONS, seed=i, **setting) for i in range(6000)]
    outputs = engine.generate([PROMPT] * len(params), params)
    assert all(o.token_ids == expected for o in outputs[1::2])
    ids = engine.tokenizer.encode(PROMPT)
    tokens, mask, probs = exact_position_probs(hf_target, ids, [o.token_ids for o in outputs[::2]], POSITIONS, 1.0)
    pvalues, zero = rank_category_pvalues(tokens, mask, probs)
    assert zero == 0 and (pvalues > ALPHA).all(), pvalues

"""Greedy speculative output equals target-only output token for token, for every drafter and K."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.types import SamplingParams
from tests.engine.helpers import assert_same_or_near_tie

PROMPTS = [
    "def add(a, b):\n    return",
    "import os\n",
    "class Parser:\n    def __init__(self, text):\n        self.text = text\n        self.pos = 0\n\n    def peek(self):\n",
    "x",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
    "    \"\"\"Return the",
    "if __name__ == '__main__':\n    main()\n",
    "from dataclasses import dataclass, field\n\n@dataclass\nclass Point:\n    x: int = 0\n    y: int = 0\n",
    "raise ValueError(",
    "    if not isinstance(value, str):\n        raise TypeError",
]
PARAMS = SamplingParams(max_tokens=32)


@pytest.fixture(scope="module")
def baseline(make_engine):
    engine = make_engine("ngram", k=0)
    assert engine.drafter is None  # K = 0: plain target-only decoding through the same step
    return engine.generate(PROMPTS, PARAMS)


@pytest.fixture(scope="module")
def hf_target(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()


def test_target_only_equals_hf_generate(baseline, hf_target, make_engine):
    tok = make_engine("ngram", k=0).tokenizer
    ties = 0
    for prompt, out in zip(PROMPTS, baseline):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hf = hf_target.generate(ids, max_new_tokens=PARAMS.max_tokens, do_sample=False)[0, ids.shape[1] :]
        ties += assert_same_or_near_tie(hf_target, ids[0].tolist(), hf.tolist(), out.token_ids)
    assert ties <= 1, f"{ties} near-tie divergences in {len(PROMPTS)} prompts"


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("kind, draft", [("ngram", None), ("model", "draft_noisy"), ("model", "draft_small"),
                                         ("model", "target")])
def test_speculative_equals_target_only(make_engine, baseline, hf_target, kind, draft, k):
    engine = make_engine(kind, k=k, draft=draft or "draft_noisy")
    outputs = engine.generate(PROMPTS, PARAMS)
    ties = 0
    for prompt, base, out in zip(PROMPTS, baseline, outputs):
        ties += assert_same_or_near_tie(hf_target, engine.tokenizer.encode(prompt), base.token_ids, out.token_ids)
        if base.token_ids == out.token_ids:
            assert out.text == base.text and out.finish_reason == base.finish_reason
    assert ties <= 1
    assert engine.stats.drafted > 0  # speculation really happened
    if draft in ("draft_noisy", "target"):  # acceptance was exercised: whole drafts and partial ones
        assert engine.stats.accepted > 0
    assert engine.target.backend.cache.occupied == 0  # every slot freed


def test_adaptive_k_stays_exact(make_engine, baseline):
    engine = make_engine("model", k=2, draft="draft_noisy", adaptive=True)
    outputs = engine.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outputs] == [b.token_ids for b in baseline]


def test_draft_equal_to_target_accepts_all(make_engine):
    engine = make_engine("model", k=4, draft="target")
    outputs = engine.generate(PROMPTS[:4], SamplingParams(max_tokens=31))
    stats = engine.stats
    assert stats.acceptance_rate > 0.99
    emitted = sum(len(o.token_ids) - 1 for o in outputs)  # the first token comes from prefill
    assert emitted / stats.steps > 4.5  # mean accepted length ~ K + 1


def test_batch_of_one_equals_batch_of_many(make_engine, baseline):
    engine = make_engine("model", k=4, draft="draft_noisy", max_batch_size=1)  # queueing: one at a time
    outputs = engine.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outputs] == [b.token_ids for b in baseline]

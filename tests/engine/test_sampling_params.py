"""Penalties, logit bias, min_tokens and logprobs through the engine: speculative output equals an
independent reference decoder (greedy), and sampled tokens follow the exact processed p (chi-square)."""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from cluster.types import SamplingParams
from tests.engine.helpers import reference_greedy, reference_probs

PROMPTS = ["def add(a, b):\n    return", "import os\n", "for i in range(10):\n    print(i)\n", "x"]
CASES = {
    "repetition": dict(repetition_penalty=1.3),
    "frequency": dict(frequency_penalty=0.7),
    "presence": dict(presence_penalty=1.5),
    "bias": dict(logit_bias=((5, 4.0), (17, -100.0), (40, 2.5))),
    "all": dict(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=0.6, logit_bias=((9, 3.0),)),
}


@pytest.fixture(scope="module")
def hf_target(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()


@pytest.fixture(scope="module")
def spec(make_engine):
    return make_engine("model", k=4, draft="draft_noisy", max_waiting=4096)


@pytest.fixture(scope="module")
def self_draft(make_engine):
    """Draft = target: drafts are accepted, so every draft position is verified with its own history."""
    return make_engine("model", k=4, draft="target")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("drafter", ["noisy", "self"])
def test_greedy_with_adjustments_equals_reference(spec, self_draft, make_engine, hf_target, case, drafter):
    spec = spec if drafter == "noisy" else self_draft
    params = SamplingParams(max_tokens=24, **CASES[case])
    eos = sorted(spec.eos_ids)
    outputs = spec.generate(PROMPTS, params)
    target_only = make_engine("ngram", k=0).generate(PROMPTS, params)
    plain = spec.generate(PROMPTS, SamplingParams(max_tokens=24))
    for prompt, out, base in zip(PROMPTS, outputs, target_only):
        ids = spec.tokenizer.encode(prompt)
        assert out.token_ids == reference_greedy(hf_target, ids, 24, params, eos) == base.token_ids
    assert [o.token_ids for o in outputs] != [o.token_ids for o in plain]  # the parameter changed the output
    assert spec.stats.accepted > 0  # drafts were accepted under the adjusted p


def test_min_tokens_holds_off_eos(spec, hf_target):
    """EOS biased up so the target wants to stop at once: min_tokens holds it off exactly that long."""
    eos = sorted(spec.eos_ids)
    bias = tuple((e, 30.0) for e in eos)
    for prompt in PROMPTS:
        assert spec.generate([prompt], SamplingParams(max_tokens=40, logit_bias=bias))[0].token_ids[0] in eos
        params = SamplingParams(max_tokens=40, min_tokens=6, logit_bias=bias)
        got = spec.generate([prompt], params)[0]
        assert got.finish_reason == "eos" and len(got.token_ids) == 7 and not set(got.token_ids[:6]) & set(eos)
        assert got.token_ids == reference_greedy(hf_target, spec.tokenizer.encode(prompt), 40, params, eos)


def test_logprobs_are_the_targets(spec, hf_target):
    params = SamplingParams(max_tokens=12, logprobs=3, repetition_penalty=1.2)
    out = spec.generate([PROMPTS[0]], params)[0]
    assert len(out.logprobs) == len(out.token_ids)
    tokens = spec.tokenizer.encode(PROMPTS[0])
    for token, entry in zip(out.token_ids, out.logprobs):
        from tests.engine.helpers import reference_logits

        expected = torch.log_softmax(reference_logits(hf_target, tokens, len(spec.tokenizer.encode(PROMPTS[0])),
                                                      params), -1)
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-4)
        top = expected.topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        tokens.append(token)


@pytest.mark.parametrize("case", ["repetition", "frequency", "bias"])
def test_sampling_with_adjustments_keeps_the_target_distribution(spec, hf_target, case):
    """Second token (a verified draft or a residual sample) over 3000 seeds, given the modal first
    token, against the exact p computed by the reference: one-sample chi-square."""
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=8, seed=s, **CASES[case]) for s in range(3000)]
    prompt = PROMPTS[0]
    outs = spec.generate([prompt] * len(params), params)
    first = Counter(o.token_ids[0] for o in outs).most_common(1)[0][0]
    second = [o.token_ids[1] for o in outs if o.token_ids[0] == first and len(o.token_ids) > 1]
    ids = spec.tokenizer.encode(prompt)
    p = reference_probs(hf_target, ids + [first], len(ids), params[0], sorted(spec.eos_ids))
    counts = Counter(second)
    assert sum(counts[t] for t in counts if p[t] == 0) == 0, "emitted a token p gives zero mass"
    support = [t for t in range(len(p)) if p[t] > 0]
    observed = [counts[t] for t in support]
    expected = [p[t].item() * len(second) for t in support]
    assert len(second) > 500
    assert chisquare(observed, expected).pvalue > 1e-4

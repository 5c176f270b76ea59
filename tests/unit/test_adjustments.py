"""Bias, min_tokens, penalties and logprobs (cluster/sampling/logits.py) against the formulas written out
by hand, position by position, without models."""

import math

import pytest
import torch

from cluster.sampling.logits import SamplingTensors, TokenHistory, adjust_logits, logprobs_from_logits
from cluster.types import SamplingParams

V = 12
EOS = [0, 11]


def by_hand(logits: list[float], tokens: list[int], num_prompt: int, p: SamplingParams) -> list[float]:
    out = list(logits)
    for token, bias in p.logit_bias:
        out[token] += bias
    output = tokens[num_prompt:]
    if len(output) < p.min_tokens:
        for e in EOS:
            out[e] = -math.inf
    for token in set(tokens):
        if p.repetition_penalty != 1.0:
            out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(output):
        out[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return out


PARAMS = [
    SamplingParams(repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=0.9, min_tokens=3,
                   logit_bias=((2, 5.0), (7, -3.0))),
    SamplingParams(repetition_penalty=0.6, frequency_penalty=-0.5, presence_penalty=0.0),
    SamplingParams(),  # nothing: logits unchanged
]
ROWS = [([3, 4, 5, 5, 6], 3), ([1, 1, 2], 1), ([9, 8], 2)]


def test_penalties_bias_and_min_tokens_at_every_position():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, V, generator=gen) * 3
    steps = torch.tensor([[6, 5, 6], [2, -1, -1], [4, 4, 0]])  # the draft after each position (-1: none)
    st = SamplingTensors.from_params(PARAMS, V, "cpu")
    history = TokenHistory(ROWS, PARAMS, V, "cpu", EOS)
    adjusted = adjust_logits(logits, st, history, steps)
    for row, ((tokens, num_prompt), p) in enumerate(zip(ROWS, PARAMS)):
        seen = list(tokens)
        for pos in range(4):
            expected = by_hand(logits[row, pos].tolist(), seen, num_prompt, p)
            got = adjusted[row, pos].tolist()
            for e, g in zip(expected, got):
                assert (math.isinf(e) and math.isinf(g) and e < 0 and g < 0) or abs(e - g) < 1e-5, (row, pos)
            if pos < 3 and steps[row, pos] >= 0:
                seen = seen + [int(steps[row, pos])]


def test_history_rows_subset_and_advance():
    history = TokenHistory(ROWS, PARAMS, V, "cpu", EOS)
    index = torch.tensor([0, 2])
    logits = torch.zeros(2, V)
    before = history.apply(logits, index)
    history.advance(torch.tensor([5, -1]), index)
    assert history.output_len.tolist() == [3, 2, 0]  # row 0 grew by one; row 2's -1 appended nothing
    assert history.counts[0, 5] == 2 and history.counts[2].sum() == 0
    after = history.apply(logits, index)
    assert after[0, 5] == pytest.approx(before[0, 5] - 0.3)  # one more occurrence: one more frequency penalty
    assert torch.equal(after[1], before[1])


def test_sampling_tensors_from_params():
    params = [SamplingParams(temperature=0.5, top_k=500, top_p=0.9, logit_bias=((3, 2.0), (3, 1.0))),
              SamplingParams()]
    st = SamplingTensors.from_params(params, V, "cpu")
    assert st.temperature.tolist() == [0.5, 0.0] and st.top_k.tolist() == [V, 0] and st.top_p.tolist() == pytest.approx([0.9, 1.0])
    assert st.logit_bias[0, 3] == 3.0 and st.logit_bias.abs().sum() == 3.0
    assert (st.all_greedy, st.any_greedy, st.any_filter) == (False, True, True)
    sub = st.rows(torch.tensor([1]))
    assert sub.temperature.tolist() == [0.0] and sub.logit_bias.abs().sum() == 0
    assert sub.top_k.tolist() == [0] and sub.top_p.tolist() == [1.0]
    assert (sub.all_greedy, sub.any_greedy, sub.any_filter) == (st.all_greedy, st.any_greedy, st.any_filter)
    assert SamplingTensors.from_params([SamplingParams()], V, "cpu").logit_bias is None


def test_logprobs_are_log_softmax_at_the_temperature():
    logits = torch.randn(2, 3, V)
    st = SamplingTensors.make([0.5, 0.0], [2, 0], [0.5, 1.0])
    lp = logprobs_from_logits(logits, st)
    assert torch.allclose(lp[0], torch.log_softmax(logits[0] / 0.5, -1), atol=1e-6)  # before top-k / top-p
    assert torch.allclose(lp[1], torch.log_softmax(logits[1], -1), atol=1e-6)  # greedy: temperature 1

"""Edges of the logits processing that the distribution tests cannot see (found by mutation testing):
host-side flags, row subsets, batch shapes, exact top-k/top-p boundaries, the zero-probability first
token, token id 0 in the penalty history, and process_logits passing its history along."""

import torch

from cluster.sampling.logits import (
    SamplingTensors,
    TokenHistory,
    adjust_logits,
    probs_from_logits,
    process_logits,
    sample_from,
)
from cluster.types import SamplingParams


def test_make_sets_the_flags_from_the_rows():
    bias = torch.randn(2, 5)
    st = SamplingTensors.make([0.0, 1.0], [0, 3], [1.0, 1.0], logit_bias=bias)
    assert st.logit_bias is bias and not st.all_greedy and st.any_greedy and st.any_filter
    assert SamplingTensors.make([0.0, 0.0]).all_greedy
    plain = SamplingTensors.make([1.0], [0], [1.0])
    assert not plain.any_filter and not plain.any_greedy and plain.logit_bias is None
    assert SamplingTensors.make([1.0], [1], [1.0]).any_filter  # top-k 1 is a filter
    assert SamplingTensors.make([1.0], [0], [0.99]).any_filter


def test_rows_keep_flags_and_bias_rows():
    bias = torch.arange(15.0).view(3, 5)
    st = SamplingTensors.make([0.0, 1.0, 0.5], [0, 2, 0], [1.0, 1.0, 0.9], logit_bias=bias)
    sub = st.rows(torch.tensor([2, 0]))
    assert (sub.all_greedy, sub.any_greedy, sub.any_filter) == (st.all_greedy, st.any_greedy, st.any_filter)
    assert torch.equal(sub.logit_bias, bias[[2, 0]]) and sub.temperature.tolist() == [0.5, 0.0]
    plain = SamplingTensors.make([0.0, 1.0], [0, 0], [1.0, 1.0])  # a greedy row, no filter, no bias
    sub = plain.rows(torch.tensor([1]))
    assert sub.logit_bias is None and (sub.all_greedy, sub.any_greedy, sub.any_filter) == (False, True, False)


def test_bias_on_a_batch_of_rows_stays_per_row():
    logits, bias = torch.zeros(3, 4), torch.eye(3, 4)
    out = adjust_logits(logits, SamplingTensors.make([1.0] * 3, logit_bias=bias))
    assert out.shape == (3, 4) and torch.equal(out, bias)


def test_top_k_one_is_the_argmax_and_top_p_drops_at_exact_mass():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    assert probs_from_logits(logits, SamplingTensors.make([1.0], [1], [1.0])).tolist() == [[0.0, 1.0, 0.0]]
    # Two equal logits: exactly 0.5 each. top_p = 0.5 is reached by the first one: the second is dropped.
    probs = probs_from_logits(torch.zeros(1, 2), SamplingTensors.make([1.0], [0], [0.5]))
    assert sorted(probs[0].tolist()) == [0.0, 1.0]


def test_a_zero_uniform_never_picks_a_leading_zero_probability_token():
    assert sample_from(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([0.0])).tolist() == [2]


def test_token_zero_counts_in_the_history_and_negative_tokens_do_not():
    params = [SamplingParams(presence_penalty=1.0)]
    history = TokenHistory([([5, 6], 2)], params, vocab=8, device="cpu")
    history.advance(torch.tensor([0]))
    assert history.counts[0, 0] == 1 and bool(history.seen[0, 0]) and history.counts[0, 1] == 0
    assert int(history.output_len[0]) == 1
    history.advance(torch.tensor([-1]))
    assert int(history.output_len[0]) == 1 and history.counts.sum() == 1


def test_process_logits_applies_the_history_along_the_draft():
    params = [SamplingParams(temperature=1.0, frequency_penalty=1.5, repetition_penalty=1.3)]
    logits, steps = torch.randn(1, 3, 8), torch.tensor([[3, 3]])
    st = SamplingTensors.make([1.0])

    def history():
        return TokenHistory([([1, 2, 3], 2)], params, vocab=8, device="cpu")

    out = process_logits(logits, st, history(), steps)
    assert torch.allclose(out, probs_from_logits(adjust_logits(logits, st, history(), steps), st))
    assert not torch.allclose(out, probs_from_logits(logits, st))  # the penalties did change something


def test_one_position_with_a_history_is_the_history_applied():
    params = [SamplingParams(presence_penalty=2.0), SamplingParams(repetition_penalty=1.5)]
    logits = torch.randn(2, 8)

    def history():
        return TokenHistory([([1, 2, 3], 1), ([4, 4], 1)], params, vocab=8, device="cpu")

    out = adjust_logits(logits, SamplingTensors.make([1.0, 1.0]), history())
    assert torch.equal(out, history().apply(logits)) and not torch.equal(out, logits)


def test_greedy_coupled_choice_is_the_argmax_per_row():
    from cluster.sampling.acceptance import coupled_choice

    assert int(coupled_choice(torch.tensor([0.1, 0.7, 0.2]), None)) == 1
    assert coupled_choice(torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]), None).tolist() == [1, 0]


def test_an_all_greedy_batch_is_one_hot_in_every_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    probs = probs_from_logits(logits, SamplingTensors.make([0.0, 0.0]))
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]

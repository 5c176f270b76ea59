import numpy as np
import torch
from scipy.stats import chisquare

from cluster.sampling.logits import SamplingTensors, process_logits, sample_from
from tests.stats import processed


def _params(b, t=1.0, k=0, p=1.0):
    return SamplingTensors.make(torch.full((b,), t), torch.full((b,), k), torch.full((b,), p))


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    probs = process_logits(logits, _params(1, t=0.0))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_scales_logits():
    logits = torch.randn(3, 7)
    probs = process_logits(logits, _params(3, t=0.5))
    assert torch.allclose(probs, torch.softmax(logits / 0.5, -1), atol=1e-6)


def test_top_k_keeps_k_most_likely():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    probs = process_logits(logits, _params(1, k=2))
    assert (probs > 0).tolist() == [[False, True, False, True, False]]
    assert torch.isclose(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = process_logits(probs_in.log(), _params(1, p=0.75))
    assert (out > 0).tolist() == [[True, True, False, False]]  # 0.5 < 0.75 <= 0.8
    assert torch.allclose(out[0, :2], torch.tensor([0.625, 0.375]))


def test_top_p_always_keeps_the_top_token():
    out = process_logits(torch.tensor([[3.0, 0.0, 0.0]]), _params(1, p=0.01))
    assert out.tolist()[0][0] == 1.0


def test_per_row_parameters_in_one_batch_over_positions():
    """Each row against an independent numpy implementation (tests/stats.py), in one batch."""
    logits = torch.randn(4, 3, 9, generator=torch.Generator().manual_seed(0))  # [B, positions, V]
    rows = [(0.0, 0, 1.0), (1.0, 2, 1.0), (2.0, 0, 0.5), (0.7, 4, 0.8)]  # greedy, top-k, top-p, both
    t, k, p = (torch.tensor([r[i] for r in rows]) for i in range(3))
    out = process_logits(logits, SamplingTensors.make(t, k, p))
    for row, (temperature, top_k, top_p) in enumerate(rows):
        if temperature == 0:
            expected = torch.zeros(3, 9).scatter_(-1, logits[row].argmax(-1, keepdim=True), 1.0).numpy()
        else:
            expected = processed(logits[row].numpy(), temperature, top_k, top_p)
        assert np.allclose(out[row].numpy(), expected, atol=1e-6), row


def test_sample_from_matches_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 20000
    draws = sample_from(probs.expand(n, 4), torch.rand(n, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(draws, minlength=4)
    assert counts[1] == 0
    keep = probs > 0
    assert chisquare(counts[keep].numpy(), (probs[keep].double() / probs[keep].double().sum() * n).numpy()).pvalue > 1e-3


def test_sample_from_edge_uniforms_never_pick_zero_probability():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    assert sample_from(probs, torch.tensor([0.0, 0.9999999])).tolist() == [1, 1]

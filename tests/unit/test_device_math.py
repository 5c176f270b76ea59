"""The sampling math keeps every tensor on the logits' device: on PyTorch's meta device (no GPU here), a
CPU tensor made mid-way would raise, as it would on CUDA."""

import torch

from cluster.sampling import keyed
from cluster.sampling.acceptance import accept_chain_coupled, coupled_choice, verify_draft
from cluster.sampling.logits import SamplingTensors, TokenHistory, adjust_logits, logprobs_from_logits, probs_from_logits
from cluster.types import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def test_sampling_math_stays_on_the_logits_device():
    vocab = 50
    params = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, logit_bias=((3, 2.0),), repetition_penalty=1.2,
                             presence_penalty=0.5, min_tokens=2)] * 2
    st = SamplingTensors.from_params(params, vocab, DEVICE)
    history = TokenHistory([([1, 2, 3], 2), ([4], 1)], params, vocab, DEVICE, suppress_ids=[0])
    logits = torch.randn(2, 3, vocab, device=DEVICE)
    adjusted = adjust_logits(logits, st, history, torch.zeros(2, 2, dtype=torch.long, device=DEVICE))
    probs = probs_from_logits(adjusted, st)
    assert probs.device.type == DEVICE and logprobs_from_logits(adjusted, st).device.type == DEVICE
    noise = torch.stack([keyed.race_noise(7, j, vocab) for j in range(3)])  # made on the CPU, like every worker's
    chosen = coupled_choice(probs[0], noise)
    assert chosen.device.type == DEVICE
    n, token = accept_chain_coupled(chosen.unsqueeze(0), torch.zeros(1, 2, dtype=torch.long, device=DEVICE),
                                    torch.tensor([2], device=DEVICE))
    assert n.device.type == DEVICE and token.device.type == DEVICE
    n, token = verify_draft(probs, torch.zeros(2, 2, dtype=torch.long, device=DEVICE), torch.tensor([2, 1], device=DEVICE),
                            probs[:, :2], torch.rand(2, 2).to(DEVICE), torch.rand(2).to(DEVICE))  # the rejection rule
    assert n.device.type == DEVICE and token.device.type == DEVICE

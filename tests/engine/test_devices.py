"""Every tensor follows its model's device. Without a GPU, the backends' passes and the sampling math run
on PyTorch's meta device (shapes only): a CPU tensor mixed into a non-CPU pass raises there as on CUDA."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.models.backend import HFBackend, Row
from cluster.models.lean import LeanBackend
from cluster.sampling import keyed
from cluster.sampling.acceptance import accept_chain_coupled, coupled_choice
from cluster.sampling.logits import SamplingTensors, TokenHistory, adjust_logits, logprobs_from_logits, probs_from_logits
from cluster.types import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "meta"


@pytest.mark.parametrize("backend", [HFBackend, LeanBackend])
def test_backend_passes_stay_on_the_model_device(tiny_models, backend):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval().to(DEVICE)
    b = backend(model, 2, 64)
    slot = b.cache.allocate()
    out = b.forward([Row(slot, [5, 6, 7])])
    assert out.logits.device.type == DEVICE and out.logits.shape == (1, 3, model.config.vocab_size)
    out = b.forward([Row(slot, [1, 2, 3], [-1, 0, 0])], hidden=True)  # a tree verify
    assert out.logits.device.type == DEVICE and out.hidden.device.type == DEVICE


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

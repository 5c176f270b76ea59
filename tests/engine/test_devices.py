"""Every tensor follows its model's device. Without a GPU, the backends' passes run on PyTorch's meta
device (shapes only): a CPU tensor mixed into a non-CPU pass raises there as on CUDA. (The sampling math:
tests/unit/test_device_math.py.)"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.models.backend import HFBackend, Row
from cluster.models.lean import LeanBackend

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

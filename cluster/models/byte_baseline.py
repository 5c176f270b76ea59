"""The byte-level Transformer MEGABYTE is measured against: one causal stack over every byte (the same
blocks as MEGABYTE's, cluster/models/megabyte.py), trained on the same bytes for the same time
(tools/train_megabyte.py) and decoded with a KV cache (benchmarks/megabyte.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from cluster.models.megabyte import Stack


class ByteGPTConfig(PretrainedConfig):
    model_type = "specdec_bytegpt"

    def __init__(self, vocab_size: int = 259, dim: int = 256, layers: int = 6, heads: int = 4, context: int = 1024,
                 mlp_ratio: int = 4, pad_token_id: int = 0, eos_token_id: int = 1, **kwargs):
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
        self.vocab_size, self.dim, self.layers, self.heads = vocab_size, dim, layers, heads
        self.context, self.mlp_ratio = context, mlp_ratio


class ByteGPTForCausalLM(PreTrainedModel):
    config_class = ByteGPTConfig
    base_model_prefix = "bytegpt"
    _supports_sdpa = True  # its attention is F.scaled_dot_product_attention

    def __init__(self, config: ByteGPTConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Embedding(config.context, config.dim)
        self.stack = Stack(config.dim, config.layers, config.heads, config.mlp_ratio)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, past=None, **kwargs):
        first = 0 if past is None else past[0][0].shape[2]
        positions = torch.arange(first, first + input_ids.shape[1], device=input_ids.device)
        h, present = self.stack(self.embed(input_ids) + self.pos(positions), past)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        out = CausalLMOutput(loss=loss, logits=logits)
        out.past = present
        return out

    @torch.inference_mode()
    def generate_cached(self, ids: list[int], max_new: int, greedy: bool = True) -> list[int]:
        """Greedy decoding with a KV cache: the baseline's bytes per second."""
        out = self(torch.tensor([ids], device=self.device))
        generated = []
        for _ in range(max_new):
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if token == self.config.eos_token_id or len(ids) + len(generated) >= self.config.context:
                break
            out = self(torch.tensor([[token]], device=self.device), past=out.past)
        return generated


AutoConfig.register(ByteGPTConfig.model_type, ByteGPTConfig)
AutoModelForCausalLM.register(ByteGPTConfig, ByteGPTForCausalLM)

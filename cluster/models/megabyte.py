"""MEGABYTE (Yu et al., 2023): a byte-level model in fixed patches of P bytes.

    patch embedder   the P byte embeddings of a patch, concatenated: one vector per patch
    global model     a large causal transformer over patches; its output for patch k (having seen
                     patches < k) is projected to P conditioning vectors, one per byte of patch k
    local model      a small causal transformer inside one patch: byte j of patch k sees the conditioning
                     vector j and the bytes before it in the patch; it predicts byte j

The global model runs once per patch, the local model once per byte: the large model's cost is spread
over P bytes. Convention here: byte predictions are made for positions 0..T of a T-byte input (position 0
from the global start vector alone); `forward` returns them shifted as Hugging Face causal LMs do (logits
at position t predict byte t + 1). Token ids are ByT5's (byte b is b + 3; 0 pad, 1 EOS, 2 unknown), so the
model directory carries a stock ByT5 tokenizer and loads with `from_pretrained` like any other model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class MegabyteConfig(PretrainedConfig):
    model_type = "specdec_megabyte"

    def __init__(self, vocab_size: int = 259, patch_size: int = 8, global_dim: int = 256, global_layers: int = 4,
                 global_heads: int = 4, local_dim: int = 128, local_layers: int = 2, local_heads: int = 4,
                 max_patches: int = 256, mlp_ratio: int = 4, pad_token_id: int = 0, eos_token_id: int = 1, **kwargs):
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
        if global_dim % patch_size:
            raise ValueError(f"global_dim {global_dim} must be a multiple of patch_size {patch_size}")
        self.vocab_size, self.patch_size = vocab_size, patch_size
        self.global_dim, self.global_layers, self.global_heads = global_dim, global_layers, global_heads
        self.local_dim, self.local_layers, self.local_heads = local_dim, local_layers, local_heads
        self.max_patches, self.mlp_ratio = max_patches, mlp_ratio

    @property
    def max_position_embeddings(self) -> int:
        """Bytes of context: a prediction at byte t needs patch t // P, and the global model holds
        max_patches positions after its start position."""
        return self.max_patches * self.patch_size


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP; attention over `past` keys/values when given."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.up, self.down = nn.Linear(dim, mlp_ratio * dim, bias=False), nn.Linear(mlp_ratio * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, T, D]; past (k, v) [B, heads, S, hd]. Returns (x, (k, v) over S + T positions)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        s = k.shape[2]
        if past is None or t == 1:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and t > 1)
        else:  # new positions after s - t cached ones: each sees the cache and the new ones up to itself
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x)))), (k, v)


class Stack(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor, past: list | None = None):
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        return self.norm(x), present


class MegabyteForCausalLM(PreTrainedModel):
    config_class = MegabyteConfig
    base_model_prefix = "megabyte"
    _supports_sdpa = True

    def __init__(self, config: MegabyteConfig):
        super().__init__(config)
        p, dg, dl, v = config.patch_size, config.global_dim, config.local_dim, config.vocab_size
        self.patch_embed = nn.Embedding(v, dg // p)  # a patch's input: its P byte embeddings side by side
        self.global_pos = nn.Embedding(config.max_patches + 1, dg)
        self.global_start = nn.Parameter(torch.zeros(dg))  # global position 0: before any patch
        self.global_model = Stack(dg, config.global_layers, config.global_heads, config.mlp_ratio)
        self.to_local = nn.Linear(dg, p * dl)  # a patch's global output -> one conditioning vector per byte
        self.local_embed = nn.Embedding(v + 1, dl)  # id v: "no earlier byte in this patch"
        self.local_model = Stack(dl, config.local_layers, config.local_heads, config.mlp_ratio)
        self.head = nn.Linear(dl, v, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_output_embeddings(self):
        return self.head

    # --- the two levels ----------------------------------------------------------------------------
    def global_step(self, patches: torch.Tensor | None, first: int, past: list | None = None, start: bool = False):
        """Feed global positions first, first + 1, ...: the start vector (when `start`, at position 0)
        and then the patches [B, n, P] in order. Returns (conditioning [B, n', P, D_local] of the patch
        each fed position conditions, present keys/values)."""
        cfg = self.config
        parts = []
        if start:
            b = patches.shape[0] if patches is not None else 1
            parts.append(self.global_start.view(1, 1, -1).expand(b, 1, -1))
        if patches is not None and patches.shape[1]:
            b, n, p = patches.shape
            parts.append(self.patch_embed(patches).view(b, n, p * self.patch_embed.embedding_dim))
        x = torch.cat(parts, 1)
        positions = torch.arange(first, first + x.shape[1], device=x.device)
        h, present = self.global_model(x + self.global_pos(positions), past)
        cond = self.to_local(h).view(h.shape[0], h.shape[1], cfg.patch_size, cfg.local_dim)
        return cond, present

    def local_logits(self, cond: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """cond [N, j, D_local] (the first j conditioning vectors of a patch), prev [N, j] (the byte before
        each position within the patch; vocab_size at position 0) -> logits [N, j, V]."""
        h, _ = self.local_model(cond + self.local_embed(prev))
        return self.head(h)

    def byte_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced predictions of bytes 0..T for input ids [B, T]: logits [B, T + 1, V]."""
        cfg = self.config
        b, t = ids.shape
        p, n = cfg.patch_size, t // cfg.patch_size + 1  # patches holding predicted positions 0..T
        padded = F.pad(ids, (0, n * p - t), value=cfg.pad_token_id).view(b, n, p)
        cond, _ = self.global_step(padded[:, :-1], 0, start=True)  # patch k conditioned on patches < k
        prev = torch.cat([torch.full((b, n, 1), cfg.vocab_size, device=ids.device, dtype=ids.dtype),
                          padded[:, :, :-1]], 2)  # byte j - 1 of the same patch
        logits = self.local_logits(cond.reshape(b * n, p, -1), prev.reshape(b * n, p)).view(b, n * p, -1)
        return logits[:, : t + 1]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """Hugging Face convention: logits[:, t] predict token t + 1 (and with labels, the shifted loss)."""
        logits = self.byte_logits(input_ids)[:, 1:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.inference_mode()
    def generate_recompute(self, ids: list[int], max_new: int) -> list[int]:
        """Greedy, recomputing the whole sequence for every byte (no caches): the reference the cached
        backend is tested against."""
        out = list(ids)
        for _ in range(max_new):
            logits = self.byte_logits(torch.tensor([out], device=self.device))[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == self.config.eos_token_id:
                break
        return out[len(ids):]


class ByteTokenizer(ByT5Tokenizer):
    """The byte codec: ByT5's ids (0 pad, 1 EOS, 2 unknown, 3 + b for byte b, no sentinels), as a causal
    LM wants a prompt: nothing appended (ByT5 itself ends every encoding with EOS). Decoding drops an
    unfinished UTF-8 character, so incremental detokenisation (cluster/text.py) holds it back until its
    last byte arrives: a stream never splits a character."""

    def __init__(self, extra_ids: int = 0, **kwargs):
        super().__init__(extra_ids=extra_ids, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])


AutoConfig.register(MegabyteConfig.model_type, MegabyteConfig)
AutoModelForCausalLM.register(MegabyteConfig, MegabyteForCausalLM)
AutoTokenizer.register(MegabyteConfig, slow_tokenizer_class=ByteTokenizer)


def save_byte_tokenizer(directory) -> None:
    ByteTokenizer().save_pretrained(directory)

"""
SM-GPT (single matmul): LB-GPT's model (gpt.py) with one matrix multiplication computing q, k and v
for every head, and heads as a batch dimension. The name is gpt.py's with a trailing underscore: it
is LB-GPT's twin, and the two files differ exactly in attention (Block, MLP and LBGPT come from
gpt.py), plus the KV cache that computing every head at once makes easy.

    python gpt_.py                         # same keys and modes as gpt.py
    python gpt_.py --attn_impl=matmul      # the explicit textbook attention instead of SDPA
    python gpt_.py --mode=eval --ckpt=model_dict/gpt.pt  # either script's checkpoints load
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import LBGPT, ModelConfig


class LayerCache:
    """Keys and values (B, n_head, T, head_size) of one layer for the tokens seen so far."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None


class KVCache:

    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


class SingleMatmulAttention(nn.Module):
    """All heads at once: q, k, v from one Linear, attention batched over (B, n_head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        causal = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("tril", causal, persistent=False)
        gate = torch.ones(config.n_head)  # 0 switches a head off
        self.register_buffer("head_gate", gate, persistent=False)
        self.impl = "sdpa"
        self.masked: set[int] = set()

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        # each (B, nh, T, hs): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            if cache.k is not None:
                past = cache.k.shape[2]
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v = k, v
        if self.impl == "sdpa":
            if past and T > 1:
                raise ValueError("with a non-empty cache, feed one token at a time")
            # causal within the new tokens; a single new token may attend to everything cached
            p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p,
                                               is_causal=T > 1)
        else:
            att = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, nh, T, past + T)
            att = att.masked_fill(~self.tril[past:past + T, :past + T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
        if self.masked:
            y = y * self.head_gate.view(1, -1, 1, 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side (gpt.py: torch.cat)
        return self.resid_dropout(self.proj(y))

    def mask_heads(self, heads: set[int]) -> None:
        self.masked = set(heads)
        self.head_gate.fill_(1.0)
        self.head_gate[sorted(self.masked)] = 0.0



class SMGPT(LBGPT):
    """LB-GPT with SingleMatmulAttention. attn_impl: "sdpa" (torch's scaled_dot_product_attention,
    flash kernels on GPUs) or "matmul" (the explicit form); kv_cache: sample with a KV cache."""

    attention = SingleMatmulAttention

    def __init__(self, config: ModelConfig, attn_impl: str = "sdpa", kv_cache: bool = True):
        super().__init__(config)
        for block in self.blocks:
            block.attn.impl = attn_impl
        self.use_kv_cache = kv_cache

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """LB-GPT's; with a cache, idx (B, T) holds the tokens after the cached ones, which sit at
        the positions after theirs and attend to them through each layer's cached keys, values."""
        if cache is None:
            return super().hidden_states(idx)
        start, T = cache.length, idx.shape[1]
        if start + T > self.config.block_size:
            limit = self.config.block_size
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {limit}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(start, start + T, device=idx.device)))
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, layer_cache)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None):
        """LB-GPT's forward; with a cache (sampling), the logits of the tokens after the cached."""
        if cache is None:
            return super().forward(idx, targets)
        return self.lm_head(self.hidden_states(idx, cache)), None

    # --- what the engine asks of a model class (see gpt.py) ------------------------------------

    layout = "SM-GPT"
    run_options = ("attn_impl", "kv_cache")

    def new_kv_cache(self) -> KVCache | None:
        """Sampling with this cache runs one pass over the prompt, then one token per step."""
        return KVCache(self.config.n_layer) if self.use_kv_cache else None


if __name__ == "__main__":
    from dualgpt.run import main
    main(SMGPT, script="gpt_")

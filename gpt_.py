"""
SM-GPT: the model of gpt.py with fused multi-head attention. One matrix multiplication
computes q, k and v for every head, and heads are a batch dimension. Everything else
(data, training, sampling, checkpoints, command line) is gpt.py's.

    python gpt_.py                         # same keys and modes as gpt.py
    python gpt_.py --attn_impl=matmul      # the explicit textbook attention instead of SDPA
    python gpt_.py --mode=eval --ckpt=model_dict/gpt.pt   # checkpoints of either script load in both
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
from gpt import GPT, Decoder, ModelConfig


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


class FusedAttention(nn.Module):
    """All heads at once: q, k, v from one Linear, attention batched over (B, n_head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool)),
                             persistent=False)
        self.register_buffer("head_gate", torch.ones(cfg.n_head), persistent=False)  # 0 switches a head off
        self.impl = "sdpa"
        self.masked: set[int] = set()
        self.record = False  # keep attention weights and head outputs (forces the matmul path)
        self._recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            if cache.k is not None:
                past = cache.k.shape[2]
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v = k, v
        if self.impl == "sdpa" and not self.record:
            if past and T > 1:
                raise ValueError("with a non-empty cache, feed one token at a time")
            # causal within the new tokens; a single new token may attend to everything cached
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout.p if self.training else 0.0,
                                               is_causal=T > 1)
        else:
            att = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, nh, T, past + T)
            att = att.masked_fill(~self.tril[past:past + T, :past + T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
            if self.record:
                self._recorded = (att.detach(), y.detach())
        if self.masked:
            y = y * self.head_gate.view(1, -1, 1, 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side, as torch.cat does in gpt.py
        return self.resid_dropout(self.proj(y))

    def mask_heads(self, heads: set[int]) -> None:
        self.masked = set(heads)
        self.head_gate.fill_(1.0)
        self.head_gate[sorted(self.masked)] = 0.0

    def set_record(self, on: bool) -> None:
        self.record, self._recorded = on, None

    def recorded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights (B, nh, T, T) and head outputs (B, nh, T, hs) of the last forward."""
        return self._recorded


class CachedDecoder(Decoder):
    """Next-token logits with a KV cache: one pass over the prompt, then one token per step.

    Positions are learned and absolute, so once the sequence outgrows block_size the window
    slides by one token each step and every cached key and value (all computed at their old
    positions) is stale. Each such step therefore re-runs the last block_size tokens: past the
    window, cached sampling costs exactly what uncached sampling costs, and gives the same tokens.
    """

    def __init__(self, model: GPT):
        super().__init__(model)
        self.cache: KVCache | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        T, block_size = ids.shape[1], self.model.cfg.block_size
        if T > block_size:
            self.cache = None
            return super().__call__(ids)
        if self.cache is None or self.cache.length != T - 1:
            self.cache = KVCache(self.model.cfg.n_layer)
            logits, _ = self.model(ids, cache=self.cache)
        else:
            logits, _ = self.model(ids[:, -1:], cache=self.cache)
        return logits[:, -1, :]


HEAD_KEY = re.compile(r"(.*\.attn\.)heads\.(\d+)\.(query|key|value)\.(weight|bias)$")


def looped_to_fused(state: dict, n_head: int) -> dict:
    """LB-GPT state dict -> SM-GPT: stack every head's query, then key, then value rows into c_attn."""
    out, prefixes = {}, set()
    for name, tensor in state.items():
        m = HEAD_KEY.match(name)
        if m:
            prefixes.add((m.group(1), m.group(4)))
        else:
            out[name] = tensor
    for prefix, param in sorted(prefixes):
        out[f"{prefix}c_attn.{param}"] = torch.cat([state[f"{prefix}heads.{h}.{proj}.{param}"]
                                                    for proj in ("query", "key", "value") for h in range(n_head)])
    return out


def fused_to_looped(state: dict, n_head: int) -> dict:
    """SM-GPT state dict -> LB-GPT: the inverse of looped_to_fused, exactly."""
    out = {}
    for name, tensor in state.items():
        if ".attn.c_attn." not in name:
            out[name] = tensor
            continue
        prefix, param = name.split("c_attn.")
        for i, part in enumerate(tensor.chunk(3 * n_head)):
            proj, h = ("query", "key", "value")[i // n_head], i % n_head
            out[f"{prefix}heads.{h}.{proj}.{param}"] = part.clone()
    return out


class FusedGPT(GPT):
    attention = FusedAttention
    layout = "fused"
    use_kv_cache = True

    def configure(self, cfg: dict) -> None:
        """Apply gpt_.py's own config keys, attn_impl and kv_cache, and gpt.py's (the head mask)."""
        super().configure(cfg)
        for block in self.blocks:
            block.attn.impl = cfg["attn_impl"]
        self.use_kv_cache = cfg["kv_cache"]

    def decoder(self) -> Decoder:
        return CachedDecoder(self) if self.use_kv_cache else Decoder(self)

    def adapt_state_dict(self, state: dict, layout: str) -> dict:
        return state if layout == self.layout else looped_to_fused(state, self.cfg.n_head)


if __name__ == "__main__":
    gpt.main(cls=FusedGPT, script="gpt_")

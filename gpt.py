"""
LB-GPT: a GPT whose multi-head attention is a loop over per-head modules.

Each head is its own module with its own key, query and value projections; the heads run one
after another and their outputs are concatenated. That is slower than one matrix
multiplication (gpt_.py) but every head can be read, hooked, masked or swapped on its own.

    python gpt.py                      # train (if model_dict/gpt.pt is missing), then sample
    python gpt.py --mode=sample --prompt="ROMEO:"
    python gpt.py --mode=eval          # train and val loss, bits per byte, of the checkpoint
    python gpt.py --resume             # continue an interrupted run, then sample

Every key of config.py can be overridden as --key=value. This file is the model only; the data,
training loop, sampling and command line live in dualgpt/, shared with gpt_.py.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    block_size: int  # the longest sequence the model reads (its learned positions)
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False  # biases in every Linear and LayerNorm (GPT-2 has them)
    gelu: str = "none"  # the MLP's GELU: exact ("none"), or GPT-2's tanh approximation ("tanh")
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head is the token embedding


class Head(nn.Module):
    """One head of causal self-attention, with its own key, query and value projections."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        head_size = config.n_embd // config.n_head
        self.key = nn.Linear(config.n_embd, head_size, bias=config.bias)
        self.query = nn.Linear(config.n_embd, head_size, bias=config.bias)
        self.value = nn.Linear(config.n_embd, head_size, bias=config.bias)
        causal = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("tril", causal, persistent=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        # affinities, scaled by 1/sqrt(head_size) so that their variance stays near 1 at init:
        # otherwise softmax saturates towards one-hot and each query listens to a single key
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T)
        # the causal mask: position t sees positions <= t only, so each position learns to predict
        # its next token without seeing it, and the T predictions of a sequence train in one pass
        wei = wei.masked_fill(~self.tril[:T, :T], float("-inf"))
        wei = F.softmax(wei, dim=-1)
        return self.dropout(wei) @ self.value(x)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """n_head heads run one after another; their outputs are concatenated and projected."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = nn.ModuleList([Head(config) for _ in range(config.n_head)])
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.masked: set[int] = set()  # switched-off heads contribute zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head_size = x.shape[-1] // len(self.heads)
        outputs = []
        for i, head in enumerate(self.heads):
            if i in self.masked:  # switched off: zeros
                outputs.append(x.new_zeros(*x.shape[:-1], head_size))
            else:
                outputs.append(head(x))  # (B, T, hs)
        return self.dropout(self.proj(torch.cat(outputs, dim=-1)))  # (B, T, C)

    def mask_heads(self, heads: set[int]) -> None:
        self.masked = set(heads)


class MLP(nn.Module):

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.approximate = config.gelu
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, attention: type[nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        # residual connections: each block adds to x, so gradients reach early layers unchanged
        x = x + self.attn(self.ln_1(x), *attn_args)  # attn_args: gpt_.py's KV cache of the layer
        return x + self.mlp(self.ln_2(x))


class LBGPT(nn.Module):
    """GPT-2 style decoder: token and position embeddings, n_layer blocks, a final LayerNorm and
    the output head. gpt_.py subclasses it, swapping `attention` for single-matmul heads."""

    attention: type[nn.Module] = MultiHeadAttention

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, self.attention) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix embeds and unembeds (GPT-2)
        self.apply(self._init_weights)
        # GPT-2's residual init: each block adds two projections to the residual stream, so their
        # weights shrink with depth and the stream's variance stays put as layers are stacked
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> the final LayerNorm's output (B, T, C), what the head reads."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, vocab), and the mean cross-entropy given targets (B, T)."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # --- what the engine (dualgpt/) asks of a model class --------------------------------------

    config_class = ModelConfig  # the engine builds either script's models through these
    layout = "LB-GPT"  # written into checkpoints
    run_options: tuple[str, ...] = ()  # config keys passed to __init__ (gpt_.py has two)

    def new_kv_cache(self) -> None:
        """LB-GPT samples without a cache: every step re-reads the window (gpt_.py has one)."""
        return None

    def set_head_mask(self, mask: set[tuple[int, int]]) -> None:
        """Switch off heads, given as (layer, head) pairs; an empty set switches all back on."""
        for i, block in enumerate(self.blocks):
            block.attn.mask_heads({h for layer, h in mask if layer == i})


if __name__ == "__main__":
    from dualgpt.run import main
    main(LBGPT, script="gpt")

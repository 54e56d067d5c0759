"""Hook points in TransformerLens's names, for either script's model, from a notebook:

    logits, cache = run_with_cache(model, idx)          # every hook point's tensor
    cache["blocks.1.attn.hook_pattern"]                  # (batch, head, query, key)
    logits = run_with_hooks(model, idx, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_2)])

A hook function is fn(tensor, name) and may return a replacement (ablation, patching). The names
and shapes are TransformerLens's: hook_embed, hook_pos_embed (batch, pos, d_model),
blocks.{l}.hook_resid_pre, blocks.{l}.attn.hook_q / hook_k / hook_v / hook_z (batch, pos, head,
d_head), blocks.{l}.attn.hook_pattern (batch, head, query, key), blocks.{l}.hook_attn_out,
blocks.{l}.hook_resid_mid, blocks.{l}.hook_mlp_out, blocks.{l}.hook_resid_post,
ln_final.hook_normalized (before the LayerNorm's weight and bias). They are PyTorch hooks on
the model's own modules: the model files stay
as they are. LB-GPT's q, k, v and patterns are computed for every head at the attention's entrance
(its heads run one after another, a hook sees them all at once) and handed to each head; SM-GPT's
are its fused projection's, split by head, on the explicit attention (no fused kernel shows a
pattern). The two give the same cache for the same weights (tested).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]


def hook_names(model: nn.Module) -> list[str]:
    """Every hook point of the model, in the order of the forward pass."""
    names = ["hook_embed", "hook_pos_embed"]
    for layer in range(len(model.blocks)):
        names += [f"blocks.{layer}.{name}" for name in (
            "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
            "attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]
    return names + ["ln_final.hook_normalized"]


def patterns(model: nn.Module) -> list[str]:
    """The names of every layer's attention pattern, (batch, head, query, key)."""
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(len(model.blocks))]


def run_with_cache(model: nn.Module, idx: torch.Tensor, names: list[str] | None = None,
                   fwd_hooks: list[tuple[str, HookFn]] = ()) -> tuple[torch.Tensor,
                                                                      dict[str, torch.Tensor]]:
    """The logits of idx (batch, pos) and the tensor at each hook point named (all by default),
    detached, without gradients; with fwd_hooks, as run_with_hooks runs them (the cache keeps what
    they replaced)."""
    names = hook_names(model) if names is None else list(names)
    cache: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, name: str) -> None:
        cache[name] = tensor.detach()

    with torch.no_grad():
        logits = run_with_hooks(model, idx, [*fwd_hooks, *((name, keep) for name in names)])
    return logits, cache


def run_with_hooks(model: nn.Module, idx: torch.Tensor,
                   fwd_hooks: list[tuple[str, HookFn]]) -> torch.Tensor:
    """The logits of idx, with each hook function called at its point in turn; one that returns a
    tensor replaces what flows on from there."""
    with hooked(model, fwd_hooks):
        logits, _ = model(idx)
    return logits


@contextmanager
def hooked(model: nn.Module, fwd_hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
    """Within the block, every forward pass of the model calls the hook functions. One block at a
    time: give every hook to one call."""
    if getattr(model, "hooked", False):
        raise RuntimeError("this model is already hooked: give every hook to one call")
    known = set(hook_names(model))
    wanted: dict[str, list[HookFn]] = {}
    for name, fn in fwd_hooks:
        if name not in known:
            raise KeyError(f"{name!r} is not a hook point of this model (hook_names lists them)")
        wanted.setdefault(name, []).append(fn)

    def call(name: str, tensor: torch.Tensor) -> torch.Tensor:
        for fn in wanted.get(name, []):
            replaced = fn(tensor, name)
            tensor = tensor if replaced is None else replaced
        return tensor

    n_head = model.config.n_head
    handles, saved_impls = [], []
    batch: dict[str, int] = {}
    add = handles.append
    add(model.register_forward_pre_hook(lambda m, args: batch.update(size=args[0].shape[0])))
    add(model.wte.register_forward_hook(lambda m, args, out: call("hook_embed", out)))

    def pos_embed(module, args, out):  # (pos, d_model) -> (batch, pos, d_model): it is added
        return call("hook_pos_embed", out.unsqueeze(0).expand(batch["size"], *out.shape))

    add(model.wpe.register_forward_hook(pos_embed))
    for layer, block in enumerate(model.blocks):
        prefix = f"blocks.{layer}."
        state: dict[str, torch.Tensor] = {}

        def resid_pre(module, args, prefix=prefix, state=state):
            state["resid_pre"] = call(prefix + "hook_resid_pre", args[0])
            return (state["resid_pre"], *args[1:])

        def attn_out(module, args, out, prefix=prefix, state=state):
            out = call(prefix + "hook_attn_out", out)
            # the residual stream after attention: written back as what attention adds to it
            mid = state["resid_pre"] + out
            replaced = call(prefix + "hook_resid_mid", mid)
            return out if replaced is mid else replaced - state["resid_pre"]

        def z(module, args, prefix=prefix):
            x = args[0]  # (batch, pos, n_head * d_head): every head's output, side by side
            heads = call(prefix + "attn.hook_z", x.view(*x.shape[:2], n_head, -1))
            return (heads.reshape(x.shape), *args[1:])

        add(block.register_forward_pre_hook(resid_pre))
        add(block.attn.proj.register_forward_pre_hook(z))
        add(block.attn.register_forward_hook(attn_out))
        add(block.mlp.register_forward_hook(
            lambda m, args, out, prefix=prefix: call(prefix + "hook_mlp_out", out)))
        add(block.register_forward_hook(
            lambda m, args, out, prefix=prefix: call(prefix + "hook_resid_post", out)))
        per_head = [f"{prefix}attn.hook_{kind}" for kind in ("q", "k", "v", "pattern")]
        if not wanted.keys() & set(per_head):  # nothing to see inside the heads: leave them be
            continue
        if hasattr(block.attn, "heads"):  # LB-GPT: one module per head
            handles += hook_lb_heads(block.attn, prefix, call)
        else:  # SM-GPT: one fused projection, and the explicit attention for its pattern
            saved_impls.append((block.attn, block.attn.impl))
            block.attn.impl = "matmul"
            handles += hook_sm_heads(block.attn, prefix, call, n_head)

    def final(module, args, out):  # the stream normalised, before the LayerNorm's weight and bias
        normalized = F.layer_norm(args[0], module.normalized_shape, eps=module.eps)
        replaced = call("ln_final.hook_normalized", normalized)
        if replaced is normalized:
            return out
        return replaced * module.weight + (0.0 if module.bias is None else module.bias)

    add(model.ln_f.register_forward_hook(final))
    model.hooked = True
    try:
        yield
    finally:
        model.hooked = False
        for handle in handles:
            handle.remove()
        for attn, impl in saved_impls:
            attn.impl = impl


def causal_pattern(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q and k (batch, pos, head, d_head), each query on its past: (batch,
    head, query, key), as both models compute it."""
    scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1) * k.shape[-1] ** -0.5
    T = q.shape[1]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
    return F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def hook_lb_heads(attn: nn.Module, prefix: str, call: Callable) -> list:
    """LB-GPT's q, k, v and pattern of every head, computed at the attention's entrance (the hook
    functions see all heads at once), then handed to each head as it runs."""
    given: dict[str, torch.Tensor] = {}

    def entrance(module, args):
        x = args[0]
        for kind, proj in (("q", "query"), ("k", "key"), ("v", "value")):
            linear = [getattr(head, proj) for head in attn.heads]
            stacked = torch.stack([F.linear(x, m.weight, m.bias) for m in linear], dim=2)
            given[kind] = call(f"{prefix}attn.hook_{kind}", stacked)
        given["pattern"] = call(f"{prefix}attn.hook_pattern",
                                causal_pattern(given["q"], given["k"]))

    handles = [attn.register_forward_pre_hook(entrance)]
    for h, head in enumerate(attn.heads):
        for kind, proj in (("q", "query"), ("k", "key"), ("v", "value")):
            handles.append(getattr(head, proj).register_forward_hook(
                lambda m, args, out, kind=kind, h=h: given[kind][:, :, h]))
        handles.append(head.dropout.register_forward_pre_hook(  # dropout reads the pattern
            lambda m, args, h=h: (given["pattern"][:, h], *args[1:])))
    return handles


def hook_sm_heads(attn: nn.Module, prefix: str, call: Callable, n_head: int) -> list:
    """SM-GPT's q, k, v from its fused projection, split by head, and its pattern where its
    explicit attention applies dropout to it."""

    def qkv(module, args, out):
        B, T, three_c = out.shape
        parts = out.split(three_c // 3, dim=2)
        heads = [call(f"{prefix}attn.hook_{kind}", part.view(B, T, n_head, -1))
                 for kind, part in zip("qkv", parts)]
        return torch.cat([h.reshape(B, T, -1) for h in heads], dim=2)

    def pattern(module, args):
        return (call(f"{prefix}attn.hook_pattern", args[0]), *args[1:])

    return [attn.c_attn.register_forward_hook(qkv),
            attn.attn_dropout.register_forward_pre_hook(pattern)]

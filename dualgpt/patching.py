"""Activation patching and direct logit attribution (--mode=patch).

A clean prompt and a corrupted one of the same token length, and two answers (one token each): the
metric is the logit difference correct - wrong at the last position. Patching a head's output (at
every position) from the clean run into the corrupted run, or the residual stream entering a layer
at one position, gives its effect: (patched - corrupted) / (clean - corrupted), 1 where that part
alone restores the clean answer. Heads are patched where they enter the attention's output
projection (attn.proj), the same place in LB-GPT and SM-GPT.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn as nn

from dualgpt import UserError, repo_path
from dualgpt.checkpoint import checkpoint_model, load_tokenizer_text
from dualgpt.files import write_json
from dualgpt.heads import plot_head_heatmap
from dualgpt.runtime import progress


@contextmanager
def hooked(module: nn.Module, pre_hook):
    """module with a forward pre-hook for the block: pre_hook(module, args) -> args or None."""
    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def logit_difference(model: nn.Module, ids: torch.Tensor, answers: tuple[int, int]) -> float:
    logits, _ = model(ids)  # (1, T, vocab)
    return (logits[0, -1, answers[0]] - logits[0, -1, answers[1]]).item()


@torch.no_grad()
def inputs_of(model: nn.Module, ids: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """What enters each of the modules (its first argument) when the model reads ids."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for m in modules]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def head_inputs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """What enters each layer's attn.proj on ids: every head's output, concatenated (1, T, C)."""
    return inputs_of(model, ids, [block.attn.proj for block in model.blocks])


def residual_inputs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each block on ids, (1, T, C) per layer."""
    return inputs_of(model, ids, list(model.blocks))


NOISY_GAP = 1.0  # nats of logit difference between the runs, below which effects are noise


@torch.no_grad()
def patch_effects(model: nn.Module, clean: torch.Tensor, corrupt: torch.Tensor,
                  answers: tuple[int, int]) -> dict:
    """Each head's and each (layer, position)'s patching effect, and the metric on both runs."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    hs = model.config.n_embd // n_head
    clean_diff = logit_difference(model, clean, answers)
    corrupt_diff = logit_difference(model, corrupt, answers)
    if abs(clean_diff - corrupt_diff) < 1e-6:
        raise UserError("the clean and corrupted prompts give the same logit difference "
                        f"({clean_diff:.4f}): there is nothing to restore; change a prompt")

    def effect(diff: float) -> float:
        return (diff - corrupt_diff) / (clean_diff - corrupt_diff)

    clean_heads, clean_resid = head_inputs(model, clean), residual_inputs(model, clean)
    heads = torch.zeros(n_layer, n_head)
    for layer, head in progress([(l, h) for l in range(n_layer) for h in range(n_head)],
                                desc="patching heads", leave=False):
        cols = slice(head * hs, (head + 1) * hs)

        def put_head(module, args, source=clean_heads[layer][..., cols]):
            x = args[0].clone()
            x[..., cols] = source
            return (x,) + args[1:]

        with hooked(model.blocks[layer].attn.proj, put_head):
            heads[layer, head] = effect(logit_difference(model, corrupt, answers))
    T = clean.shape[1]
    residual = torch.zeros(n_layer, T)
    for layer in range(n_layer):
        for pos in range(T):

            def put_position(module, args, source=clean_resid[layer][:, pos]):
                x = args[0].clone()
                x[:, pos] = source
                return (x,) + args[1:]

            with hooked(model.blocks[layer], put_position):
                residual[layer, pos] = effect(logit_difference(model, corrupt, answers))
    return {"clean": clean_diff, "corrupt": corrupt_diff, "heads": heads, "residual": residual}


@torch.no_grad()
def direct_logit_attribution(model: nn.Module, ids: torch.Tensor,
                             answers: tuple[int, int]) -> tuple[torch.Tensor, dict[str, float]]:
    """Each head's direct contribution to the logit difference at the last position of ids: its
    output through attn.proj, centred and divided by the final LayerNorm's scale on this run, then
    through that LayerNorm's weight and the unembedding (TransformerLens's apply_ln_to_stack). With
    the other parts of the residual stream (embeddings, the projections' biases, the MLPs) and the
    LayerNorm's bias, the parts sum to the logit difference. Returns ((n_layer, n_head), parts)."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    hs = model.config.n_embd // n_head
    direction = model.lm_head.weight[answers[0]] - model.lm_head.weight[answers[1]]  # (C,)
    # one forward: what enters each attn.proj and ln_f (the residual stream), what each MLP adds
    mlp_outputs = []
    mlp_hooks = [block.mlp.register_forward_hook(
        lambda m, args, out: mlp_outputs.append(out[0, -1])) for block in model.blocks]
    try:
        *inputs, final = inputs_of(model, ids, [b.attn.proj for b in model.blocks] + [model.ln_f])
    finally:
        for hook in mlp_hooks:
            hook.remove()
    resid = final[0, -1]
    scale = (resid.var(unbiased=False) + model.ln_f.eps).sqrt()

    def attribute(part: torch.Tensor) -> float:
        return ((part - part.mean()) / scale * model.ln_f.weight) @ direction

    dla = torch.zeros(n_layer, n_head)
    parts = {"embeddings": 0.0, "attention biases": 0.0, "mlps": 0.0}
    for layer, block in enumerate(model.blocks):
        weight = block.attn.proj.weight  # (C, C): columns hs * h ... belong to head h
        for head in range(n_head):
            cols = slice(head * hs, (head + 1) * hs)
            dla[layer, head] = attribute(inputs[layer][0, -1, cols] @ weight[:, cols].T)
        if block.attn.proj.bias is not None:
            parts["attention biases"] += attribute(block.attn.proj.bias).item()
        parts["mlps"] += attribute(mlp_outputs[layer]).item()
    position = torch.tensor(ids.shape[1] - 1, device=ids.device)
    parts["embeddings"] = attribute(model.wte.weight[ids[0, -1]] + model.wpe(position)).item()
    parts["final LayerNorm bias"] = (0.0 if model.ln_f.bias is None
                                     else (model.ln_f.bias @ direction).item())
    return dla, parts


def one_token(tok, text: str, what: str) -> int:
    ids = tok.encode(text, allowed_special="none")
    if len(ids) != 1:
        raise UserError(f"patch_answers: {what} answer {text!r} is {len(ids)} tokens, not one; "
                        f"pick words the tokenizer keeps whole (often with a leading space)")
    return ids[0]


def patch(model_class: type[nn.Module], cfg: dict) -> dict:
    """--mode=patch: patching effects of every head and residual position, and each head's direct
    logit attribution on the clean prompt; <ckpt>.patch.json and .patch.png in generate_text/."""
    ckpt, model = checkpoint_model(model_class, cfg)
    model.eval()
    tok = load_tokenizer_text(ckpt["tokenizer"])
    clean_ids = tok.encode(cfg["patch_clean"], allowed_special="none")
    corrupt_ids = tok.encode(cfg["patch_corrupt"], allowed_special="none")
    if len(clean_ids) != len(corrupt_ids) or not clean_ids:
        raise UserError(f"patch_clean and patch_corrupt must be of the same token length, got "
                        f"{len(clean_ids)} and {len(corrupt_ids)} tokens")
    if len(clean_ids) > model.config.block_size:
        raise UserError(f"the prompts are {len(clean_ids)} tokens, more than the model's "
                        f"block_size {model.config.block_size}")
    texts = cfg["patch_answers"].split("|")
    if len(texts) != 2:
        raise UserError('patch_answers must be two answers, "correct|wrong"')
    answers = one_token(tok, texts[0], "the correct"), one_token(tok, texts[1], "the wrong")
    clean = torch.tensor([clean_ids], device=cfg["device"])
    corrupt = torch.tensor([corrupt_ids], device=cfg["device"])
    effects = patch_effects(model, clean, corrupt, answers)
    dla, parts = direct_logit_attribution(model, clean, answers)
    name = os.path.splitext(os.path.basename(cfg["ckpt"]))[0]
    prefix = repo_path("generate_text", name)
    report = {"checkpoint": cfg["ckpt"], "iter_num": ckpt["iter_num"],
              "head_mask": cfg["head_mask"],
              "clean": cfg["patch_clean"], "corrupt": cfg["patch_corrupt"], "answers": texts,
              "tokens": len(clean_ids), "clean_logit_diff": effects["clean"],
              "corrupt_logit_diff": effects["corrupt"], "dla_other_parts": parts,
              "heads": [{"layer": l, "head": h, "effect": effects["heads"][l, h].item(),
                         "dla": dla[l, h].item()}
                        for l in range(model.config.n_layer) for h in range(model.config.n_head)],
              "residual": effects["residual"].tolist()}
    plot_head_heatmap(effects["heads"], f"{name}: patching effect of each head's output",
                      "effect (1 = restores the clean answer)", prefix + ".patch.png",
                      fmt="{:+.2f}", cmap="RdBu_r")
    write_json(prefix + ".patch.json", report)
    print(f"logit difference {texts[0]!r} - {texts[1]!r}: clean {effects['clean']:+.3f}, "
          f"corrupted {effects['corrupt']:+.3f}; heads by patching effect (and direct logit "
          f"attribution on the clean prompt):")
    gap = effects["clean"] - effects["corrupt"]
    if abs(gap) < NOISY_GAP:  # every effect divides by the gap
        print(f"note: the clean and corrupted logit differences are only {abs(gap):.2f} apart "
              f"(under {NOISY_GAP}): the model barely tells the prompts apart, so the effects "
              "are mostly noise")
    for row in sorted(report["heads"], key=lambda r: -abs(r["effect"]))[:10]:
        print(f"  {row['layer']}.{row['head']}: effect {row['effect']:+.3f}, dla "
              f"{row['dla']:+.3f}")
    print(f"wrote {prefix}.patch.json, {prefix}.patch.png")
    return report

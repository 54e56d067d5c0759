"""Activation patching and direct logit attribution (--mode=patch), on the hook points of hooks.py.

A clean prompt and a corrupted one of the same token length, and two answers (one token each): the
metric is the logit difference correct - wrong at the last position. Patching a head's output
(hook_z, at every position) from the clean run into the corrupted run, or the residual stream
entering a layer (hook_resid_pre) at one position, gives its effect: (patched - corrupted) /
(clean - corrupted), 1 where that part alone restores the clean answer.

With no prompts given, the mode picks a task the model really tells apart (DEFAULT_TASKS): the
induction task where the model copies from context, else subject-verb agreement.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from dualgpt import UserError
from dualgpt.atlas import plot_patching
from dualgpt.checkpoint import checkpoint_model, load_tokenizer_text
from dualgpt.files import write_json
from dualgpt.heads import output_prefix, shipped_if_untrained, token_labels
from dualgpt.hooks import run_with_cache, run_with_hooks
from dualgpt.runconfig import parse_head_mask
from dualgpt.runtime import progress

NOISY_GAP = 1.0  # nats of logit difference between the runs, below which effects are noise


@dataclass
class Task:
    """Two prompts of equal token length and two one-token answers, correct then wrong."""
    name: str
    clean: list[int]
    corrupt: list[int]
    answers: tuple[int, int]


def logit_difference(model: nn.Module, ids: torch.Tensor, answers: tuple[int, int],
                     fwd_hooks: list | None = None) -> float:
    with torch.no_grad():
        logits = run_with_hooks(model, ids, fwd_hooks or [])  # (1, T, vocab)
    return (logits[0, -1, answers[0]] - logits[0, -1, answers[1]]).item()


@torch.no_grad()
def patch_effects(model: nn.Module, clean: torch.Tensor, corrupt: torch.Tensor,
                  answers: tuple[int, int]) -> dict:
    """Each head's and each (layer, position)'s patching effect, and the metric on both runs."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    clean_diff = logit_difference(model, clean, answers)
    corrupt_diff = logit_difference(model, corrupt, answers)
    if abs(clean_diff - corrupt_diff) < 1e-6:
        raise UserError("the clean and corrupted prompts give the same logit difference "
                        f"({clean_diff:.4f}): there is nothing to restore; change a prompt")

    def effect(fwd_hooks: list) -> float:
        diff = logit_difference(model, corrupt, answers, fwd_hooks)
        return (diff - corrupt_diff) / (clean_diff - corrupt_diff)

    def put(where: tuple, source: torch.Tensor):  # a hook writing the clean run's values there
        def hook(tensor: torch.Tensor, name: str) -> torch.Tensor:
            tensor = tensor.clone()
            tensor[where] = source[where]
            return tensor
        return hook

    names = [f"blocks.{layer}.{point}" for layer in range(n_layer)
             for point in ("attn.hook_z", "hook_resid_pre")]
    _, cache = run_with_cache(model, clean, names)
    heads = torch.zeros(n_layer, n_head)
    for layer, head in progress([(l, h) for l in range(n_layer) for h in range(n_head)],
                                desc="patching heads", leave=False):
        name = f"blocks.{layer}.attn.hook_z"  # (1, T, n_head, hs)
        heads[layer, head] = effect([(name, put((slice(None), slice(None), head), cache[name]))])
    T = clean.shape[1]
    residual = torch.zeros(n_layer, T)
    for layer in range(n_layer):
        name = f"blocks.{layer}.hook_resid_pre"  # (1, T, C)
        for pos in range(T):
            residual[layer, pos] = effect([(name, put((slice(None), pos), cache[name]))])
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
    direction = model.lm_head.weight[answers[0]] - model.lm_head.weight[answers[1]]  # (C,)
    names = ["hook_embed", "hook_pos_embed", f"blocks.{n_layer - 1}.hook_resid_post"]
    names += [f"blocks.{layer}.{point}" for layer in range(n_layer)
              for point in ("attn.hook_z", "hook_mlp_out")]
    _, cache = run_with_cache(model, ids, names)
    resid = cache[f"blocks.{n_layer - 1}.hook_resid_post"][0, -1]  # what the final LayerNorm reads
    scale = (resid.var(unbiased=False) + model.ln_f.eps).sqrt()

    def attribute(part: torch.Tensor) -> float:
        return ((part - part.mean()) / scale * model.ln_f.weight) @ direction

    dla = torch.zeros(n_layer, n_head)
    parts = {"embeddings": 0.0, "attention biases": 0.0, "mlps": 0.0}
    for layer, block in enumerate(model.blocks):
        z = cache[f"blocks.{layer}.attn.hook_z"][0, -1]  # (n_head, hs)
        weight = block.attn.proj.weight.view(-1, n_head, z.shape[-1])  # (C, n_head, hs)
        for head in range(n_head):
            dla[layer, head] = attribute(weight[:, head] @ z[head])
        if block.attn.proj.bias is not None:
            parts["attention biases"] += attribute(block.attn.proj.bias).item()
        parts["mlps"] += attribute(cache[f"blocks.{layer}.hook_mlp_out"][0, -1]).item()
    parts["embeddings"] = attribute(cache["hook_embed"][0, -1]
                                    + cache["hook_pos_embed"][0, -1]).item()
    parts["final LayerNorm bias"] = (0.0 if model.ln_f.bias is None
                                     else (model.ln_f.bias @ direction).item())
    return dla, parts


# --- the prompts: the user's, or a task the model tells apart -----------------------------------


def one_token(tok, text: str, what: str) -> int:
    ids = tok.encode(text, allowed_special="none")
    if len(ids) != 1:
        raise UserError(f"patch_answers: {what} answer {text!r} is {len(ids)} tokens, not one; "
                        f"pick words the tokenizer keeps whole (often with a leading space)")
    return ids[0]


def given_task(tok, clean: str, corrupt: str, answers: str, name: str = "given") -> Task:
    clean_ids = tok.encode(clean, allowed_special="none")
    corrupt_ids = tok.encode(corrupt, allowed_special="none")
    if len(clean_ids) != len(corrupt_ids) or not clean_ids:
        raise UserError(f"patch_clean and patch_corrupt must be of the same token length, got "
                        f"{len(clean_ids)} and {len(corrupt_ids)} tokens")
    texts = answers.split("|")
    if len(texts) != 2:
        raise UserError('patch_answers must be two answers, "correct|wrong"')
    return Task(name, clean_ids, corrupt_ids,
                (one_token(tok, texts[0], "the correct"), one_token(tok, texts[1], "the wrong")))


def induction_task(tok, words: int = 8) -> Task | None:
    """Eight random words (one token each, drawn with seed 0) and then again all but the last:
    the clean answer is the last word, which the first copy had; the corrupted prompt's first
    copy ends in another word, its answer. A model that copies from context tells them apart."""
    pool = [i for i, b in sorted(tok.vocab.items()) if re.fullmatch(rb" [a-z]{3,}", b)
            and tok.encode(b.decode(), allowed_special="none") == [i]]
    if len(pool) <= words:
        return None
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
    seq = [pool[j] for j in order[:words]]
    other = pool[order[words]]
    return Task("induction", seq + seq[:-1], seq[:-1] + [other] + seq[:-1], (seq[-1], other))


def agreement_task(tok) -> Task | None:
    """A speaker's line starting "I" (clean, answer " am") or "Thou" (corrupted, answer " art")."""
    try:
        return given_task(tok, "First Citizen:\nI", "First Citizen:\nThou", " am| art",
                          "agreement")
    except UserError:  # the tokenizer splits a word the task needs
        return None


def default_task(model: nn.Module, tok, device: str) -> tuple[Task, float]:
    """The first of the induction and agreement tasks that this tokenizer can write, that fits the
    window and whose logit difference the model moves by NOISY_GAP or more between the prompts;
    else the one it moves most. With that gap."""
    found = []
    for task in filter(None, (induction_task(tok), agreement_task(tok))):
        if len(task.clean) > model.config.block_size:
            continue
        gap = abs(logit_difference(model, torch.tensor([task.clean], device=device), task.answers)
                  - logit_difference(model, torch.tensor([task.corrupt], device=device),
                                     task.answers))
        if gap >= NOISY_GAP:
            return task, gap
        found.append((gap, task))
    if not found:
        raise UserError("no default patching task fits this tokenizer and window; give "
                        "--patch_clean, --patch_corrupt and --patch_answers")
    gap, task = max(found, key=lambda item: item[0])
    return task, gap


def patch(model_class: type[nn.Module], cfg: dict) -> dict:
    """--mode=patch: patching effects of every head and residual position, and each head's direct
    logit attribution on the clean prompt; <ckpt>.patch.json and .patch.png in generate_text/."""
    given = [cfg[key] for key in ("patch_clean", "patch_corrupt", "patch_answers")]
    if any(given) and not all(given):
        raise UserError("give --patch_clean, --patch_corrupt and --patch_answers together, or "
                        "none (a task the model tells apart is picked)")
    cfg = shipped_if_untrained(cfg)
    ckpt, model = checkpoint_model(model_class, cfg)
    model.eval()
    tok = load_tokenizer_text(ckpt["tokenizer"])
    if all(given):
        task = given_task(tok, *given)
    else:
        task, gap = default_task(model, tok, cfg["device"])
        print(f"no prompts given: the {task.name} task, which this model moves by {gap:.2f} "
              "nats (--patch_clean, --patch_corrupt, --patch_answers give your own)")
    if len(task.clean) > model.config.block_size:
        raise UserError(f"the prompts are {len(task.clean)} tokens, more than the model's "
                        f"block_size {model.config.block_size}")
    clean = torch.tensor([task.clean], device=cfg["device"])
    corrupt = torch.tensor([task.corrupt], device=cfg["device"])
    effects = patch_effects(model, clean, corrupt, task.answers)
    dla, parts = direct_logit_attribution(model, clean, task.answers)
    prefix = output_prefix(cfg["ckpt"], parse_head_mask(cfg["head_mask"]))
    texts = [tok.decode([answer]) for answer in task.answers]
    tokens = token_labels(tok.vocab, task.clean)
    report = {"checkpoint": cfg["ckpt"], "iter_num": ckpt["iter_num"],
              "head_mask": cfg["head_mask"], "task": task.name,
              "clean": tok.decode(task.clean), "corrupt": tok.decode(task.corrupt),
              "answers": texts, "clean_ids": task.clean, "corrupt_ids": task.corrupt,
              "clean_tokens": tokens, "corrupt_tokens": token_labels(tok.vocab, task.corrupt),
              "clean_logit_diff": effects["clean"], "corrupt_logit_diff": effects["corrupt"],
              "dla_other_parts": parts,
              "heads": [{"layer": l, "head": h, "effect": effects["heads"][l, h].item(),
                         "dla": dla[l, h].item()}
                        for l in range(model.config.n_layer) for h in range(model.config.n_head)],
              "residual": effects["residual"].tolist()}
    name = os.path.basename(prefix)
    plot_patching(effects["heads"], effects["residual"], tokens,
                  f"{name}: patching {texts[0]!r} vs {texts[1]!r}", prefix + ".patch.png")
    write_json(prefix + ".patch.json", report)
    print(f"clean {report['clean']!r}, corrupted {report['corrupt']!r}; logit difference "
          f"{texts[0]!r} - {texts[1]!r}: clean {effects['clean']:+.3f}, corrupted "
          f"{effects['corrupt']:+.3f}; heads by patching effect (and direct logit attribution "
          "on the clean prompt):")
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
